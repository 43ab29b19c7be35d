//! One set of test bodies, run against every [`Store`] implementation.

use convoy_chunker::{
    pack, ChunkHash, ChunkRef, Compressor, Encoding, Entry, EntryKind, Manifest, StoredChunk,
};

use super::*;

fn chunk(data: &[u8]) -> (ChunkRef, StoredChunk) {
    let r = ChunkRef {
        hash: ChunkHash::of(data),
        len: data.len() as u32,
    };
    (r, Compressor::new().store(data))
}

fn release(app: &str, version: &str, parts: &[&[u8]]) -> Manifest {
    let chunks: Vec<ChunkRef> = parts.iter().map(|p| chunk(p).0).collect();
    let size = chunks.iter().map(|c| u64::from(c.len)).sum();
    Manifest::new(
        app,
        version,
        vec![Entry {
            path: "f".into(),
            kind: EntryKind::File {
                mode: 0o644,
                size,
                chunks,
            },
        }],
    )
    .unwrap()
}

fn put(store: &dyn Store, parts: &[&[u8]]) {
    let chunks: Vec<_> = parts.iter().map(|p| chunk(p)).collect();
    store.put_chunks(&chunks).unwrap();
    store.flush().unwrap();
}

fn chunks_round_trip_with_sizes(store: &dyn Store) {
    let text = b"let x = 1;\n".repeat(500);
    let (r, s) = chunk(&text);
    assert!(!store.contains_chunk(&r.hash).unwrap());
    put(store, &[&text, b"tiny"]);
    assert!(store.contains_chunk(&r.hash).unwrap());
    let got = store.get_chunk(&r.hash).unwrap().unwrap();
    assert_eq!(got, s);
    assert_eq!(got.encoding, Encoding::Zstd);
    assert_eq!(got.into_verified(&r).unwrap(), text);
    let infos = store
        .chunk_info(&[r.hash, ChunkHash::of(b"absent"), ChunkHash::of(b"tiny")])
        .unwrap();
    assert_eq!(infos[0].unwrap().raw_len, text.len() as u32);
    assert_eq!(infos[0].unwrap().stored_len, s.bytes.len() as u32);
    assert_eq!(infos[1], None);
    assert_eq!(infos[2].unwrap().raw_len, 4);
    assert_eq!(
        store
            .contains_chunks(&[ChunkHash::of(b"absent"), r.hash])
            .unwrap(),
        [false, true]
    );
    assert_eq!(store.chunk_hashes().unwrap().len(), 2);
}

fn release_names_resolve_and_are_immutable(store: &dyn Store) {
    let v1 = release("web", "1", &[b"a"]);
    let id = store.put_release(&v1).unwrap();
    assert_eq!(id, v1.release_id());
    assert_eq!(store.resolve("web", "1").unwrap(), Some(id));
    assert_eq!(store.resolve("web", "2").unwrap(), None);
    assert_eq!(store.get_manifest(&id).unwrap(), Some(v1.clone()));
    // Same release again: fine. Another release under the same name: refused.
    assert_eq!(store.put_release(&v1).unwrap(), id);
    let other = release("web", "1", &[b"b"]);
    assert!(
        matches!(store.put_release(&other), Err(StoreError::NameTaken { existing, .. }) if existing == id)
    );
    let names = store.releases().unwrap();
    assert_eq!(names.len(), 1);
    assert_eq!(
        (names[0].app.as_str(), names[0].version.as_str()),
        ("web", "1")
    );
}

fn verify_finds_corrupt_and_missing_chunks(store: &dyn Store) {
    put(store, &[b"good chunk", b"soon bad"]);
    store
        .put_release(&release("web", "1", &[b"good chunk", b"never stored"]))
        .unwrap();
    assert_eq!(verify(store, &()).unwrap().corrupt, vec![]);
    // Overwrite a chunk's body with other bytes: what disk corruption looks like.
    let bad = ChunkRef {
        hash: ChunkHash::of(b"soon bad"),
        len: 8,
    };
    store
        .put_chunks(&[(
            bad,
            StoredChunk {
                encoding: Encoding::Raw,
                bytes: b"evil bad".to_vec(),
            },
        )])
        .unwrap();
    let report = verify(store, &()).unwrap();
    assert_eq!(report.chunks_checked, 2);
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].hash, bad.hash.to_hex());
    assert_eq!(report.missing.len(), 1);
    assert_eq!(
        report.missing[0].hash,
        ChunkHash::of(b"never stored").to_hex()
    );
    assert_eq!(report.missing[0].release, "web@1");
    assert!(!report.is_clean());
    assert_eq!(report.missing_manifests, Vec::<String>::new());
}

fn gc_keeps_newest_releases_per_app_and_their_chunks(store: &dyn Store) {
    put(
        store,
        &[
            b"shared", b"v1 only", b"v2 only", b"v3 only", b"api", b"orphan",
        ],
    );
    for (v, own) in [("1", b"v1 only"), ("2", b"v2 only"), ("3", b"v3 only")] {
        store
            .put_release(&release("web", v, &[b"shared", own]))
            .unwrap();
    }
    store.put_release(&release("api", "1", &[b"api"])).unwrap();
    let report = gc(store, 2).unwrap();
    assert_eq!(report.removed, vec!["web@1".to_string()]);
    assert_eq!(report.kept.len(), 3);
    assert_eq!(report.chunks_removed, 2); // "v1 only" and "orphan"
    assert_eq!(store.resolve("web", "1").unwrap(), None);
    let has = |d: &[u8]| store.contains_chunk(&ChunkHash::of(d)).unwrap();
    assert!(has(b"shared") && has(b"v2 only") && has(b"v3 only") && has(b"api"));
    assert!(!has(b"v1 only") && !has(b"orphan"));
    assert!(verify(store, &()).unwrap().is_clean());
}

fn patch_between(from: &Manifest, to: &Manifest, delta: &[u8]) -> convoy_chunker::Patch {
    let file = |m: &Manifest| m.files().next().unwrap().1.to_vec();
    convoy_chunker::Patch::new(
        from.release_id(),
        to.release_id(),
        vec![convoy_chunker::PatchFile {
            path: "f".into(),
            base_path: "f".into(),
            base_digest: convoy_chunker::file_digest(&file(from)),
            delta: vec![chunk(delta).0],
            size: file(to).iter().map(|c| u64::from(c.len)).sum(),
            wire_bytes: file(to).iter().map(|c| u64::from(c.len)).sum(),
        }],
    )
}

fn patches_live_while_both_their_releases_do_and_keep_their_deltas(store: &dyn Store) {
    put(
        store,
        &[
            b"shared", b"v1 only", b"v2 only", b"v3 only", b"d12", b"d23",
        ],
    );
    let v: Vec<Manifest> = [("1", b"v1 only"), ("2", b"v2 only"), ("3", b"v3 only")]
        .iter()
        .map(|(v, own)| release("web", v, &[b"shared", *own]))
        .collect();
    for m in &v {
        store.put_release(m).unwrap();
    }
    let p12 = patch_between(&v[0], &v[1], b"d12");
    let p23 = patch_between(&v[1], &v[2], b"d23");
    store.put_patch(&p12).unwrap();
    store.put_patch(&p23).unwrap();
    assert_eq!(
        store.patches_to(&v[2].release_id()).unwrap(),
        vec![p23.clone()]
    );
    assert_eq!(store.patch_ends().unwrap().len(), 2);
    let report = gc(store, 2).unwrap();
    assert_eq!(report.removed, vec!["web@1".to_string()]);
    assert_eq!(report.patches_removed, 1, "web@1 -> web@2 goes with web@1");
    assert!(store.patches_to(&v[1].release_id()).unwrap().is_empty());
    assert_eq!(store.patches_to(&v[2].release_id()).unwrap(), vec![p23]);
    let has = |d: &[u8]| store.contains_chunk(&ChunkHash::of(d)).unwrap();
    assert!(has(b"d23") && !has(b"d12"));
    store
        .delete_patch(&v[1].release_id(), &v[2].release_id())
        .unwrap();
    assert!(store.patch_ends().unwrap().is_empty());
}

fn a_collection_keeps_pins_and_spares_fresh_chunks_for_one_pass(store: &dyn Store) {
    put(
        store,
        &[b"old", b"pinned only", b"staged", b"uploaded", b"newest"],
    );
    store.put_release(&release("web", "1", &[b"old"])).unwrap();
    store
        .put_release(&release("web", "2", &[b"pinned only"]))
        .unwrap();
    store
        .put_release(&release("web", "3", &[b"newest"]))
        .unwrap();
    let pinned = store.resolve("web", "2").unwrap().unwrap();
    let retention = Retention {
        newest: 1,
        pinned: [pinned].into(),
        pinned_chunks: [ChunkHash::of(b"staged")].into(),
    };
    let has = |d: &[u8]| store.contains_chunk(&ChunkHash::of(d)).unwrap();
    // First pass: web@1 goes, but its chunk and the upload nobody named
    // yet were not unused at a pass before, so they stay.
    let (report, unused) = collect(store, &retention, Some(&Default::default())).unwrap();
    assert_eq!(report.removed, vec!["web@1".to_string()]);
    assert_eq!(report.chunks_removed, 0);
    assert_eq!(
        unused,
        [ChunkHash::of(b"old"), ChunkHash::of(b"uploaded")].into()
    );
    assert!(has(b"old") && has(b"uploaded"));
    // The upload is named before the next pass: it stays; the other goes.
    store
        .put_release(&release("web", "4", &[b"uploaded"]))
        .unwrap();
    let (report, unused) = collect(store, &retention, Some(&unused)).unwrap();
    assert_eq!(report.chunks_removed, 1);
    assert!(!has(b"old"));
    assert!(has(b"pinned only") && has(b"staged") && has(b"uploaded"));
    assert_eq!(store.resolve("web", "2").unwrap(), Some(pinned));
    // web@3 is no longer the newest, and not pinned: its name goes now,
    // its chunk at the next pass.
    assert_eq!(store.resolve("web", "3").unwrap(), None);
    assert_eq!(unused, [ChunkHash::of(b"newest")].into());
    assert!(has(b"newest"));
    assert!(verify(store, &()).unwrap().is_clean());
}

fn ingest_counts_new_chunks_once(store: &dyn Store) {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("a"), &data).unwrap();
    std::fs::write(dir.path().join("b"), &data).unwrap();
    let ingest = Ingest::new(store);
    let m = pack(dir.path(), "web", "1", &&ingest, &()).unwrap();
    let stats = ingest.stats();
    assert_eq!(stats.unique_chunks as usize, m.unique_chunks().len());
    assert_eq!(stats.new_chunks, stats.unique_chunks);
    assert_eq!(stats.new_bytes, 300_000);
    assert!(
        stats.new_stored_bytes < stats.new_bytes,
        "repetitive data compresses"
    );
    // Packing again adds nothing.
    let again = Ingest::new(store);
    pack(dir.path(), "web", "1", &&again, &()).unwrap();
    assert_eq!(again.stats().new_chunks, 0);
}

/// `n` pseudo-random bytes from `seed`, a byte flipped every `edit_every`.
fn noise(n: usize, seed: u64, edit_every: Option<usize>) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for i in edit_every
        .map_or(0..0, |e| e / 2..n)
        .step_by(edit_every.unwrap_or(1))
    {
        out[i] ^= 0x5a;
    }
    out
}

/// Packs files `a` and `b` (seeds 1 and 2, edited every `edit_every`).
fn pack_ab(store: &dyn Store, version: &str, edit_every: Option<usize>) -> Manifest {
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("a", 1), ("b", 2)] {
        std::fs::write(dir.path().join(name), noise(300_000, seed, edit_every)).unwrap();
    }
    pack(dir.path(), "web", version, &&Ingest::new(store), &()).unwrap()
}

fn a_patch_rebuilds_its_files_and_a_corrupt_base_fails_only_its_file(target: &dyn Store) {
    // The origin holds both releases and makes the patch.
    let origin = MemoryStore::new();
    let v1 = pack_ab(&origin, "1", None);
    let v2 = pack_ab(&origin, "2", Some(20_000));
    let (patch, _) =
        patch_in_store(&origin, &v1, &v2, &convoy_chunker::PatchConfig::default()).unwrap();
    assert_eq!(patch.files().len(), 2);
    // The target holds web@1 and the deltas.
    assert_eq!(pack_ab(target, "1", None), v1);
    let deltas: Vec<_> = patch
        .delta_chunks()
        .into_iter()
        .map(|c| (c, origin.get_chunk(&c.hash).unwrap().unwrap()))
        .collect();
    target.put_chunks(&deltas).unwrap();
    // One chunk of the base of `a` rots.
    let a_base = v1.files().find(|(p, _)| *p == "a").unwrap().1[1];
    target
        .put_chunks(&[(
            a_base,
            StoredChunk {
                encoding: Encoding::Raw,
                bytes: vec![0; a_base.len as usize],
            },
        )])
        .unwrap();

    let rebuilt = rebuild_in_store(target, &v1, &v2, patch.files());
    assert_eq!(rebuilt.files, vec!["b".to_string()]);
    assert_eq!(rebuilt.failed.len(), 1);
    assert_eq!(rebuilt.failed[0].0, "a");
    assert_eq!(rebuilt.bytes, 300_000);
    // Every chunk of `b` in web@2 is now held, and reads back verified.
    let b = v2.files().find(|(p, _)| *p == "b").unwrap().1;
    for c in b {
        let stored = target.get_chunk(&c.hash).unwrap().expect("rebuilt chunk");
        stored.into_verified(c).unwrap();
    }
    // None of the new chunks of `a` is.
    let a = v2.files().find(|(p, _)| *p == "a").unwrap().1;
    let held = target
        .contains_chunks(&a.iter().map(|c| c.hash).collect::<Vec<_>>())
        .unwrap();
    assert!(held.iter().filter(|h| **h).count() <= 1, "{held:?}");
}

fn deleting_a_release_keeps_a_manifest_another_name_uses(store: &dyn Store) {
    let a = release("web", "1", &[b"x"]);
    store.put_release(&a).unwrap();
    store.delete_release("web", "1").unwrap();
    assert_eq!(store.get_manifest(&a.release_id()).unwrap(), None);
    assert_eq!(store.releases().unwrap(), vec![]);
}

fn record_logs_append_in_order_and_list_by_prefix(store: &dyn Store) {
    assert_eq!(store.records("rollout/1").unwrap(), Vec::<Vec<u8>>::new());
    assert_eq!(store.append_record("rollout/1", b"a").unwrap(), 0);
    assert_eq!(store.append_record("rollout/10", b"x").unwrap(), 0);
    assert_eq!(store.append_record("rollout/1", b"b").unwrap(), 1);
    assert_eq!(store.append_record("history/web", b"h").unwrap(), 0);
    assert_eq!(
        store.records("rollout/1").unwrap(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    assert_eq!(store.records("rollout/10").unwrap(), vec![b"x".to_vec()]);
    assert_eq!(
        store.logs("rollout/").unwrap(),
        vec!["rollout/1".to_string(), "rollout/10".to_string()]
    );
}

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[test] fn $name() { super::$name(&super::MemoryStore::new()); })*
        }
        mod rocks {
            $(#[test] fn $name() {
                let dir = tempfile::tempdir().unwrap();
                super::$name(&super::RocksStore::open(dir.path()).unwrap());
            })*
        }
    };
}

store_tests!(
    chunks_round_trip_with_sizes,
    release_names_resolve_and_are_immutable,
    verify_finds_corrupt_and_missing_chunks,
    gc_keeps_newest_releases_per_app_and_their_chunks,
    patches_live_while_both_their_releases_do_and_keep_their_deltas,
    a_collection_keeps_pins_and_spares_fresh_chunks_for_one_pass,
    ingest_counts_new_chunks_once,
    a_patch_rebuilds_its_files_and_a_corrupt_base_fails_only_its_file,
    deleting_a_release_keeps_a_manifest_another_name_uses,
    record_logs_append_in_order_and_list_by_prefix,
);

#[test]
fn record_logs_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RocksStore::open(dir.path()).unwrap();
        store.append_record("rollout/1", b"started").unwrap();
    }
    let store = RocksStore::open(dir.path()).unwrap();
    assert_eq!(store.append_record("rollout/1", b"next").unwrap(), 1);
    assert_eq!(store.records("rollout/1").unwrap().len(), 2);
}

#[test]
fn rocks_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let m = release("web", "1", &[b"persisted"]);
    {
        let store = RocksStore::open(dir.path()).unwrap();
        put(&store, &[b"persisted"]);
        store.put_release(&m).unwrap();
    }
    let store = RocksStore::open(dir.path()).unwrap();
    assert_eq!(store.resolve("web", "1").unwrap(), Some(m.release_id()));
    assert!(store.contains_chunk(&ChunkHash::of(b"persisted")).unwrap());
    // Sequence numbers continue after a reopen, so "newest" stays right.
    store
        .put_release(&release("web", "2", &[b"persisted"]))
        .unwrap();
    let seqs: Vec<u64> = store.releases().unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [0, 1]);
}

#[test]
fn rocks_store_open_twice_is_locked_not_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    let _first = RocksStore::open(dir.path()).unwrap();
    let err = RocksStore::open(dir.path())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("in use by another process"));
}

#[test]
fn rocks_store_gc_gives_the_space_of_dropped_chunks_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(dir.path()).unwrap();
    let packs_bytes = || -> u64 {
        std::fs::read_dir(dir.path().join("packs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    // Three releases of 64 distinct incompressible 16 KiB chunks each, in
    // one pack; keeping one leaves it a third live, so it is rewritten.
    let noise = |seed: u8| -> Vec<Vec<u8>> {
        (0..64u8)
            .map(|i| {
                let mut b = vec![0u8; 16 << 10];
                blake3::Hasher::new()
                    .update(&[seed, i])
                    .finalize_xof()
                    .fill(&mut b);
                b
            })
            .collect()
    };
    for (version, seed) in [("1", 1u8), ("2", 2u8), ("3", 3u8)] {
        let parts = noise(seed);
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        put(&store, &refs);
        store.put_release(&release("web", version, &refs)).unwrap();
    }
    let before = packs_bytes();
    assert!(before >= 3 * 64 * (16 << 10));
    let report = gc(&store, 1).unwrap();
    assert_eq!(report.chunks_removed, 128);
    let after = packs_bytes();
    assert!(
        after <= before / 3 + (64 << 10),
        "{before} -> {after} bytes of packs"
    );
    assert!(verify(&store, &()).unwrap().is_clean());
    // Still readable after the rewrite, and after a reopen.
    drop(store);
    let store = RocksStore::open(dir.path()).unwrap();
    assert!(verify(&store, &()).unwrap().is_clean());
    assert_eq!(verify(&store, &()).unwrap().chunks_checked, 64);
}

#[test]
fn rocks_store_compacts_while_writers_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RocksStore::open(dir.path()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    // Writers keep every chunk; each pass drops a batch of garbage, so
    // packs are rewritten and removed while the writers append.
    let writers: Vec<_> = (0..2u32)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                for i in 0..400u32 {
                    if stop.load(Ordering::SeqCst) && i > 50 {
                        break;
                    }
                    let data = format!("writer {w} chunk {i} ").repeat(200).into_bytes();
                    let c = chunk(&data);
                    store.put_chunks(std::slice::from_ref(&c)).unwrap();
                    kept.push((c.0, data));
                }
                kept
            })
        })
        .collect();
    for pass in 0..20u32 {
        let garbage: Vec<_> = (0..50u32)
            .map(|i| chunk(&format!("garbage {pass} {i} ").repeat(300).into_bytes()))
            .collect();
        store.put_chunks(&garbage).unwrap();
        let hashes: Vec<ChunkHash> = garbage.iter().map(|(r, _)| r.hash).collect();
        store.delete_chunks(&hashes).unwrap();
        store.compact().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        for (r, data) in w.join().unwrap() {
            let got = store
                .get_chunk(&r.hash)
                .unwrap()
                .unwrap_or_else(|| panic!("chunk {} lost", r.hash));
            assert_eq!(got.into_verified(&r).unwrap(), data);
        }
    }
    assert!(verify(&*store, &()).unwrap().is_clean());
}

#[test]
fn no_pass_starts_while_a_request_is_read_off_the_loop() {
    let mut collector: Collector<()> = Collector::default();
    collector.reading();
    collector.reading();
    assert!(collector.start().is_none(), "a pass beside a read");
    collector.read();
    assert!(collector.start().is_none(), "a pass beside the other read");
    collector.read();
    assert!(collector.start().is_some());
}
