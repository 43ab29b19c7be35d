//! Power cuts at seeded points, on a file system that drops what was not
//! synced ([`CutFs`]). A child process (this test binary, run again) does
//! the work on the mount and says on stdout what it was told is durable;
//! the power goes at a seeded operation, the child is killed, and the
//! parent checks what survived:
//! - the store, while collection passes drop garbage and compact packs
//!   beside the writers: every chunk its index holds reads back with its
//!   hash; every chunk a flush said was durable, and every chunk of every
//!   named release, is held;
//! - delivery: `current` names a whole tree whose files are those of its
//!   release, the one last activated or the one being activated, and the
//!   history agrees with the link.
//!
//! Set `CONVOY_POWER_CUTS=N` for N cuts per test (default 12). Mounting
//! needs root and `/dev/fuse`; elsewhere the tests say they did not run,
//! unless `CONVOY_REQUIRE_POWER_CUTS` is set (as `.ci/run` sets it), when
//! they fail.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use convoy_chunker::{ChunkHash, ChunkRef, Compressor, Manifest};
use convoy_daemon::store::{
    collect, Ingest, MemoryStore, Retention, RocksStore, Store, StoreSource,
};
use convoy_daemon::target::deliver::Releases;
use convoy_tests::cutfs::CutFs;

const CHILD: &str = "CONVOY_CUTFS_CHILD";

fn cuts() -> u64 {
    std::env::var("CONVOY_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// A small deterministic generator (splitmix64).
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut next = rng(seed);
    (0..len.div_ceil(8))
        .flat_map(|_| next().to_le_bytes())
        .take(len)
        .collect()
}

/// Runs this test again as a child doing `work` on `dir`; the returned
/// thread gives its stdout lines once it has ended.
fn child(
    test: &str,
    work: &str,
    dir: &Path,
    seed: u64,
) -> (Child, std::thread::JoinHandle<Vec<String>>) {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD, format!("{work}:{seed}:{}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the test binary runs again");
    let out = c.stdout.take().unwrap();
    let lines =
        std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).collect());
    (c, lines)
}

/// The highest N the child said as `WORD N` (0 if none). The test
/// harness may print its own words before the child's first line.
fn last_said(lines: &[String], word: &str) -> u64 {
    lines
        .iter()
        .filter_map(|l| l.rsplit_once(word))
        .filter_map(|(_, n)| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// The work a child was started for, if this process is one.
fn child_work() -> Option<(String, u64, PathBuf)> {
    let v = std::env::var(CHILD).ok()?;
    let mut parts = v.splitn(3, ':');
    let work = parts.next()?.to_string();
    let seed = parts.next()?.parse().ok()?;
    Some((work, seed, PathBuf::from(parts.next()?)))
}

/// One run of a child doing `work` on `dir` under `fs`; with `cut_after`,
/// the power goes after that many operations on the mount. Returns what
/// the child said and how many operations it did.
fn run(
    fs: &mut CutFs,
    test: &str,
    work: &str,
    dir: &Path,
    seed: u64,
    cut_after: Option<u64>,
) -> (Vec<String>, u64) {
    let start = fs.ops();
    if let Some(n) = cut_after {
        fs.arm(n);
    }
    let (mut c, lines) = child(test, work, dir, seed);
    // Until the power goes or the child is done, whichever is first
    // (bounded: a minute).
    for _ in 0..1200 {
        if fs.wait_for_cut(Duration::from_millis(50)) || c.try_wait().unwrap().is_some() {
            break;
        }
    }
    let _ = c.kill();
    // Killed, it runs nothing more, but one killed inside a request waits
    // for the request's answer.
    fs.release();
    let status = c.wait().unwrap();
    let ops = fs.ops() - start;
    fs.cut().expect("remount after the cut");
    if cut_after.is_none() {
        assert!(status.success(), "{work} failed without a power cut");
    }
    // Every line it wrote before it died: the pipe ends with it.
    (lines.join().expect("the child's output"), ops)
}

/// Runs `check` after a whole run and after `cuts()` runs cut at seeded
/// points spread over as many operations as the whole run took.
fn power_cuts(test: &str, work: &str, check: impl Fn(u64, &Path, &[String])) {
    assert!(
        CutFs::available(),
        "power-cut tests need root and /dev/fuse"
    );
    let mnt = tempfile::tempdir().unwrap();
    let mut fs = CutFs::mount(mnt.path()).expect("mounting the power-cut file system");
    let trial = |fs: &mut CutFs, seed: u64, cut: Option<u64>| {
        let dir = mnt.path().join(format!("trial-{seed}"));
        std::fs::create_dir(&dir).unwrap();
        // The trial's own directory is durable before it starts.
        std::fs::File::open(mnt.path()).unwrap().sync_all().unwrap();
        let (said, ops) = run(fs, test, work, &dir, seed, cut);
        check(seed, &dir, &said);
        ops
    };
    let whole = trial(&mut fs, 0, None);
    assert!(
        whole > 10,
        "the whole run did {whole} operations on the mount"
    );
    for seed in 1..=cuts() {
        let at = 1 + rng(seed)() % whole;
        eprintln!("{work}, seed {seed}: power cut after {at} of {whole} operations");
        trial(&mut fs, seed, Some(at));
    }
}

// ---- the store ----------------------------------------------------------

const BATCHES: u64 = 400;

fn batch(seed: u64, b: u64) -> Vec<(ChunkRef, convoy_chunker::StoredChunk)> {
    (0..4)
        .map(|i| {
            let data = bytes(seed ^ (b << 8) ^ i, 3000 + (i as usize) * 1000);
            let r = ChunkRef {
                hash: ChunkHash::of(&data),
                len: data.len() as u32,
            };
            (r, Compressor::new().store(&data))
        })
        .collect()
}

/// Two writers put batches while a third flushes; after each flush the
/// child prints `durable B`: every batch below B was put before the flush
/// began, so must be held after any cut. Every tenth batch also names a
/// release of the batches so far.
fn store_child(seed: u64, dir: &Path) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let store = std::sync::Arc::new(RocksStore::open(&dir.join("store")).unwrap());
    let done = std::sync::Arc::new(AtomicU64::new(0));
    let next = std::sync::Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (store, done, next) = (store.clone(), done.clone(), next.clone());
            std::thread::spawn(move || loop {
                let b = next.fetch_add(1, Ordering::SeqCst);
                if b >= BATCHES {
                    return;
                }
                store.put_chunks(&batch(seed, b)).unwrap();
                // Batches finish out of order: count the prefix done.
                while done
                    .compare_exchange(b, b + 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    std::thread::yield_now();
                }
                if b % 10 == 9 {
                    // A release of this batch: named only once its chunks
                    // are durable, as the coordinator's publish does.
                    let chunks: Vec<ChunkRef> =
                        batch(seed, b).into_iter().map(|(r, _)| r).collect();
                    let size = chunks.iter().map(|r| u64::from(r.len)).sum();
                    let file = convoy_chunker::EntryKind::File {
                        mode: 0o644,
                        size,
                        chunks,
                    };
                    let entry = convoy_chunker::Entry {
                        path: "f".into(),
                        kind: file,
                    };
                    let m = Manifest::new("web", b.to_string(), vec![entry]).unwrap();
                    store.flush().unwrap();
                    store.put_release(&m).unwrap();
                }
            })
        })
        .collect();
    // Collection passes run through it all: each writes a batch of
    // garbage, larger than the real chunks so packs become mostly dead,
    // then drops what no release names, keeping every batch's chunks.
    let collector = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let keep: std::collections::HashSet<ChunkHash> = (0..BATCHES)
                .flat_map(|b| batch(seed, b))
                .map(|(r, _)| r.hash)
                .collect();
            let retention = Retention {
                newest: usize::MAX,
                pinned: Default::default(),
                pinned_chunks: keep,
            };
            let (mut unused, mut removed) = (Default::default(), 0);
            for pass in 0u64.. {
                let finished = done.load(Ordering::SeqCst) >= BATCHES;
                let garbage: Vec<_> = (0..4)
                    .map(|i| {
                        let data = bytes(!seed ^ (pass << 8) ^ i, 20_000);
                        let r = ChunkRef {
                            hash: ChunkHash::of(&data),
                            len: data.len() as u32,
                        };
                        (r, Compressor::new().store(&data))
                    })
                    .collect();
                store.put_chunks(&garbage).unwrap();
                let (report, now_unused) = collect(&*store, &retention, Some(&unused)).unwrap();
                unused = now_unused;
                // As a daemon does after a pass: beside the writers.
                store.compact().unwrap();
                removed += report.chunks_removed;
                println!("removed {removed}");
                // Two passes at least: a pass removes the garbage the one
                // before found unused, so a run whose writers were done
                // before the first pass (it happened in CI) still collects.
                if finished && pass >= 1 {
                    return;
                }
            }
        })
    };
    loop {
        let before = done.load(Ordering::SeqCst);
        store.flush().unwrap();
        println!("durable {before}");
        if before >= BATCHES {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for w in writers {
        w.join().unwrap();
    }
    collector.join().unwrap();
}

#[test]
fn the_store_keeps_what_it_said_was_durable_through_power_cuts() {
    const TEST: &str = "the_store_keeps_what_it_said_was_durable_through_power_cuts";
    if let Some((_, seed, dir)) = child_work() {
        return store_child(seed, &dir);
    }
    power_cuts(TEST, "store", |seed, dir, said| {
        let durable = last_said(said, "durable ");
        if seed == 0 {
            assert!(
                last_said(said, "removed ") > 0,
                "the whole run collected nothing"
            );
        }
        let store = match RocksStore::open(&dir.join("store")) {
            Ok(s) => s,
            // Cut before RocksDB had made its first files durable: nothing
            // was said to be durable either.
            Err(e) => {
                assert_eq!(durable, 0, "seed {seed}: the store is gone: {e}");
                return;
            }
        };
        for hash in store.chunk_hashes().unwrap() {
            let stored = store
                .get_chunk(&hash)
                .unwrap_or_else(|e| panic!("seed {seed}: chunk {hash} indexed but unreadable: {e}"))
                .unwrap();
            let len = store.chunk_info(&[hash]).unwrap()[0].unwrap().raw_len;
            stored
                .into_verified(&ChunkRef { hash, len })
                .unwrap_or_else(|e| panic!("seed {seed}: chunk {hash} indexed but wrong: {e}"));
        }
        for b in 0..durable {
            for (r, _) in batch(seed, b) {
                assert!(
                    store.contains_chunk(&r.hash).unwrap(),
                    "seed {seed}: batch {b} was said durable ({durable}) but is lost"
                );
            }
        }
        for release in store.releases().unwrap() {
            let m = store.get_manifest(&release.id).unwrap().unwrap();
            for c in m.unique_chunks() {
                assert!(
                    store.contains_chunk(&c.hash).unwrap(),
                    "seed {seed}: release {} names chunk {} the store lost",
                    release.version,
                    c.hash
                );
            }
        }
    });
}

// ---- delivery -----------------------------------------------------------

const VERSIONS: u64 = 6;

/// The build tree of `version`: files that change from version to version
/// and some that do not (hard-linked from the active release).
fn build(root: &Path, version: u64) -> PathBuf {
    let dir = root.join(format!("build-{version}"));
    for i in 0..12u64 {
        let p = dir.join(format!("lib/part-{i}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let changes = i % 3 == 0;
        let seed = if changes { version * 100 + i } else { i };
        std::fs::write(&p, bytes(seed, 20_000 + (i as usize) * 3000)).unwrap();
    }
    std::fs::write(dir.join("VERSION"), version.to_string()).unwrap();
    dir
}

/// Delivers versions 1 to 6 in turn, printing `active V` after each.
fn delivery_child(seed: u64, dir: &Path) {
    let builds = tempfile::tempdir().unwrap();
    let store = MemoryStore::new();
    let manifests: Vec<Manifest> = (1..=VERSIONS)
        .map(|v| {
            let src = build(builds.path(), v);
            convoy_chunker::pack(&src, "web", &v.to_string(), &&Ingest::new(&store), &()).unwrap()
        })
        .collect();
    let releases = Releases::open(&dir.join("releases"), 3, Duration::from_secs(30)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Every trial delivers the same versions; the seed only picks the cut.
    let _ = seed;
    for m in &manifests {
        let linked = releases.materialise(m, &StoreSource(&store)).unwrap();
        rt.block_on(releases.activate(m, linked)).unwrap();
        println!("active {}", m.version());
    }
}

#[test]
fn delivery_leaves_current_on_a_whole_release_through_power_cuts() {
    const TEST: &str = "delivery_leaves_current_on_a_whole_release_through_power_cuts";
    if let Some((_, seed, dir)) = child_work() {
        return delivery_child(seed, &dir);
    }
    let builds = tempfile::tempdir().unwrap();
    power_cuts(TEST, "delivery", |seed, dir, said| {
        let last = last_said(said, "active ");
        let root = dir.join("releases");
        if !root.exists() {
            assert_eq!(last, 0, "seed {seed}: the releases are gone");
            return;
        }
        let releases = Releases::open(&root, 3, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("seed {seed}: cannot reopen: {e}"));
        let Some(active) = releases.active("web").unwrap() else {
            assert_eq!(
                last, 0,
                "seed {seed}: version {last} was active, now none is"
            );
            return;
        };
        let v: u64 = active.parse().unwrap();
        assert!(
            v == last || v == last + 1,
            "seed {seed}: current is {v}, but {last} was the last activated; the child said {said:?}"
        );
        let history = releases.history("web").unwrap();
        assert_eq!(
            history.last(),
            Some(&active),
            "seed {seed}: history {history:?}"
        );
        // The tree under current is the whole release.
        let expected = build(builds.path(), v);
        let current = root.join("web/current");
        for entry in walk(&expected) {
            let rel = entry.strip_prefix(&expected).unwrap();
            let got = std::fs::read(current.join(rel)).unwrap_or_else(|e| {
                panic!(
                    "seed {seed}: {} missing under current ({v}): {e}",
                    rel.display()
                )
            });
            assert!(
                got == std::fs::read(&entry).unwrap(),
                "seed {seed}: {} under current ({v}) is not the release's ({} bytes)",
                rel.display(),
                got.len()
            );
        }
    });
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
