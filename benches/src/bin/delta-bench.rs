//! Prints what an upgrade moves per target on real release pairs: with
//! chunks, with binary deltas, and with `rsync -z`; what making the deltas
//! costs (time per core, memory) and how fast they apply.
//!
//! Pairs come from `scripts/fetch-pairs.py` (public npm, PyPI and crates.io
//! releases, cached outside the repository): one `NAME OLD_DIR NEW_DIR`
//! line each, on standard input or from `--pairs FILE`.
//!
//! Run: scripts/fetch-pairs.py | target/release/delta-bench [--json] [--no-rsync]
//!
//! For each pair, both trees are packed into a fresh store, then:
//! - chunks: the wire (stored) bytes of the new release's chunks the old
//!   one lacks, plus the encoded manifest a target is sent;
//! - deltas: what a holder of the old release fetches with the patch
//!   (`plan_fetch`: per file the delta or the chunks, whichever is
//!   smaller), plus the manifest as a delta against the old one's
//!   (`manifest_delta`) and the patch record;
//! - rsync -z: `Total bytes received` by an rsync that pulls the new tree
//!   into a copy of the old one over a pipe (`-e` with a local shell), as
//!   it would from another data centre: rolling checksums, compression,
//!   `--checksum` to find changed files (registries give every file one
//!   time stamp).
//!
//! Making: wall and CPU seconds, the changed bytes per CPU second (the goal
//! is at least 5 MiB/s per core), the most input one delta held and the
//! process's peak RSS while making (reset before, read after). Applying:
//! every patched file rebuilt from its base and delta and verified against
//! the new manifest, on one thread (goal: at least 100 MiB/s).

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use convoy_chunker::{apply_file, pack, read_file, Diff, Manifest, PatchConfig};
use convoy_daemon::store::{patch_in_store, wire_lens, Ingest, RocksStore, Store, StoreSource};
use serde_json::{json, Value};

const MIB: f64 = 1024.0 * 1024.0;

struct Args {
    json: bool,
    rsync: bool,
    pairs: Option<PathBuf>,
    level: i32,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        json: false,
        rsync: true,
        pairs: None,
        level: convoy_chunker::DELTA_LEVEL,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = true,
            "--no-rsync" => args.rsync = false,
            "--pairs" => args.pairs = Some(it.next().context("--pairs needs a file")?.into()),
            "--level" => args.level = it.next().context("--level needs a zstd level")?.parse()?,
            "-h" | "--help" => {
                println!("usage: scripts/fetch-pairs.py | delta-bench [--pairs FILE] [--level ZSTD_LEVEL] [--no-rsync] [--json]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(args)
}

/// Peak RSS (VmHWM) of this process, in bytes.
fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the peak RSS to the current RSS (Linux: `5` to clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn pack_into(store: &RocksStore, dir: &Path, version: &str) -> Result<Manifest> {
    let ingest = Ingest::new(store);
    let m = pack(dir, "pair", version, &&ingest, &())?;
    store.flush()?;
    store.put_release(&m)?;
    Ok(m)
}

/// `rsync -z` pulling `new` into a copy of `old`: bytes received and sent.
fn rsync_z(old: &Path, new: &Path, scratch: &Path) -> Result<(u64, u64)> {
    let dest = scratch.join("rsync-dest");
    let status = Command::new("cp").arg("-a").arg(old).arg(&dest).status()?;
    if !status.success() {
        bail!("cp -a {} failed", old.display());
    }
    // The "remote shell" runs the server side here, over a pipe: rsync
    // then uses its delta algorithm and compression as across a network.
    let rsh = scratch.join("local-rsh");
    std::fs::write(&rsh, "#!/bin/sh\nshift\nexec \"$@\"\n")?;
    std::fs::set_permissions(&rsh, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let output = Command::new("rsync")
        // --checksum: registries stamp every file with one date, so the
        // default size-and-time check would skip changed files; it is also
        // rsync's cheapest honest mode (unchanged files cost a checksum in
        // the file list, not a block-checksum exchange).
        .args(["-rlptz", "--checksum", "--delete", "--stats", "-e"])
        .arg(&rsh)
        .arg(format!("localhost:{}/", new.display()))
        .arg(format!("{}/", dest.display()))
        .output()
        .context("cannot run rsync; install it (apt-get install rsync) or pass --no-rsync")?;
    if !output.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let same = Command::new("diff")
        .args(["-r", "-q"])
        .arg(new)
        .arg(&dest)
        .output()?;
    if !same.status.success() {
        bail!("rsync finished but its tree differs from {}", new.display());
    }
    let stats = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| -> Result<u64> {
        let line = stats
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("rsync printed no {name:?}"))?;
        let digits: String = line[name.len()..]
            .chars()
            .take_while(|c| !c.is_alphabetic())
            .filter(char::is_ascii_digit)
            .collect();
        Ok(digits.parse()?)
    };
    Ok((field("Total bytes received:")?, field("Total bytes sent:")?))
}

fn one_pair(name: &str, old: &Path, new: &Path, rsync: bool, level: i32) -> Result<Value> {
    let scratch = tempfile::tempdir()?;
    let store = RocksStore::open(&scratch.path().join("store"))?;
    let from = pack_into(&store, old, "old")?;
    let to = pack_into(&store, new, "new")?;
    let diff = Diff::between(&from, &to);
    let wire = wire_lens(&store, &to)?;
    let chunk_wire: u64 = diff.new.iter().map(|c| wire[&c.hash]).sum();
    let manifest_bytes = to.encode().len() as u64;

    reset_peak_rss();
    let rss_before = status_kib("VmRSS:") * 1024;
    let config = PatchConfig {
        level,
        ..PatchConfig::default()
    };
    let (patch, stats) = patch_in_store(&store, &from, &to, &config)?;
    let stats = stats.context("a fresh store holds no patch")?;
    let rss_peak = peak_rss();
    let patch_bytes = patch.encode().len() as u64;

    let held: std::collections::HashSet<_> = from.chunk_refs().map(|c| c.hash).collect();
    let wire_len = |c: &convoy_chunker::ChunkRef| wire[&c.hash];
    let plan = convoy_chunker::plan_fetch(&to, &from, &patch, &|h| held.contains(h), &wire_len);

    // Apply every delta the plan uses, as a target would: base from the
    // store, delta from the store, rebuilt and verified.
    let source = StoreSource(&store);
    let bases: std::collections::HashMap<&str, &[convoy_chunker::ChunkRef]> =
        from.files().collect();
    let targets: std::collections::HashMap<&str, &[convoy_chunker::ChunkRef]> =
        to.files().collect();
    let started = Instant::now();
    let mut applied = 0u64;
    for f in &plan.patched {
        let base = read_file(&source, &f.base_path, bases[f.base_path.as_str()])?;
        let delta = read_file(&source, &f.path, &f.delta)?;
        applied += apply_file(f, &base, &delta, targets[f.path.as_str()])?.len() as u64;
    }
    let apply_seconds = started.elapsed().as_secs_f64();

    let manifest_delta_bytes = convoy_chunker::manifest_delta(&from, &to).len() as u64;
    let with_chunks = chunk_wire + manifest_bytes;
    let with_deltas = plan.wire_bytes + manifest_delta_bytes + patch_bytes;
    let (rsync_received, rsync_sent) = if rsync {
        let (r, s) = rsync_z(old, new, scratch.path())?;
        (Some(r), Some(s))
    } else {
        (None, None)
    };
    let (files, bytes) = to.file_totals();
    Ok(json!({
        "pair": name,
        "files": files,
        "bytes": bytes,
        "bytes_new": diff.bytes_new,
        "manifest_bytes": manifest_bytes,
        "manifest_delta_bytes": manifest_delta_bytes,
        "payload_bytes_with_chunks": chunk_wire,
        "payload_bytes_with_deltas": plan.wire_bytes,
        "patch_record_bytes": patch_bytes,
        "bytes_with_chunks": with_chunks,
        "bytes_with_deltas": with_deltas,
        "rsync_z_bytes_received": rsync_received,
        "rsync_z_bytes_sent": rsync_sent,
        "deltas_vs_rsync": rsync_received.map(|r| with_deltas as f64 / r as f64),
        "chunks_vs_rsync": rsync_received.map(|r| with_chunks as f64 / r as f64),
        "files_patched": plan.patched.len(),
        "make": {
            "seconds": stats.seconds,
            "cpu_seconds": stats.cpu_seconds,
            "changed_bytes": stats.changed_bytes,
            "mib_per_cpu_second": stats.changed_bytes as f64 / MIB / stats.cpu_seconds.max(1e-9),
            "max_delta_input_bytes": stats.max_delta_input_bytes,
            "rss_before": rss_before,
            "rss_peak": rss_peak,
        },
        "apply": {
            "seconds": apply_seconds,
            "bytes": applied,
            "mib_per_second": applied as f64 / MIB / apply_seconds.max(1e-9),
        },
    }))
}

fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / MIB)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let mut input = String::new();
    match &args.pairs {
        Some(p) => input = std::fs::read_to_string(p)?,
        None => {
            std::io::stdin().read_to_string(&mut input)?;
        }
    }
    let mut rows = Vec::new();
    for line in input.as_bytes().lines() {
        let line = line?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [name, old, new] = parts[..] else {
            if parts.is_empty() {
                continue;
            }
            bail!("expected NAME OLD_DIR NEW_DIR, got {line:?}");
        };
        rows.push(one_pair(
            name,
            Path::new(old),
            Path::new(new),
            args.rsync,
            args.level,
        )?);
    }
    if rows.is_empty() {
        bail!("no pairs: pipe scripts/fetch-pairs.py into delta-bench");
    }
    let mut ratios: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["deltas_vs_rsync"].as_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = (!ratios.is_empty()).then(|| {
        let n = ratios.len();
        if n % 2 == 1 {
            ratios[n / 2]
        } else {
            (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
        }
    });
    if args.json {
        println!(
            "{}",
            json!({"level": args.level, "pairs": rows, "median_deltas_vs_rsync": median})
        );
        return Ok(());
    }
    println!(
        "{:<18} {:>9} {:>10} {:>10} {:>10} {:>7} {:>7} {:>6} {:>9} {:>9} {:>9}",
        "pair",
        "MiB",
        "chunks",
        "deltas",
        "rsync -z",
        "d/rsync",
        "c/rsync",
        "files",
        "make MiB/s",
        "delta mem",
        "apply MiB/s"
    );
    for r in &rows {
        let b = |k: &str| r[k].as_u64().unwrap_or(0);
        let ratio = |k: &str| r[k].as_f64().map_or("-".into(), |v| format!("{v:.2}"));
        println!(
            "{:<18} {:>9} {:>10} {:>10} {:>10} {:>7} {:>7} {:>6} {:>9.1} {:>9} {:>9.0}",
            r["pair"].as_str().unwrap_or(""),
            mib(b("bytes")),
            b("bytes_with_chunks"),
            b("bytes_with_deltas"),
            r["rsync_z_bytes_received"]
                .as_u64()
                .map_or("-".into(), |v| v.to_string()),
            ratio("deltas_vs_rsync"),
            ratio("chunks_vs_rsync"),
            b("files_patched"),
            r["make"]["mib_per_cpu_second"].as_f64().unwrap_or(0.0),
            mib(r["make"]["max_delta_input_bytes"].as_u64().unwrap_or(0)),
            r["apply"]["mib_per_second"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(m) = median {
        println!("median deltas/rsync: {m:.3} (goal <= 0.5; every pair <= 1)");
    }
    println!(
        "zstd level {}; bytes per target; `delta mem` is the most input one delta held, in MiB",
        args.level
    );
    Ok(())
}
