//! `convoy pack / inspect / diff / unpack / verify / gc` through the real binary.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use convoy_tests::{noise, Convoy};

fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("static/css")).unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();
    fs::write(root.join("bin/server"), noise(3 << 20, 1)).unwrap();
    fs::set_permissions(root.join("bin/server"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        root.join("static/css/site.css"),
        "body { margin: 0 }\n".repeat(5000),
    )
    .unwrap();
    fs::write(root.join("static/private.key"), "secret").unwrap();
    fs::set_permissions(
        root.join("static/private.key"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::write(root.join("empty"), "").unwrap();
    symlink("bin/server", root.join("run")).unwrap();
    symlink("../bin", root.join("static/bin")).unwrap();
}

/// Every path under `root` with its kind, mode, content or link target.
fn snapshot(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&p).unwrap();
            let mode = meta.mode() & 0o7777;
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if meta.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o}")
            } else {
                format!("file {mode:o} {}", blake3::hash(&fs::read(&p).unwrap()))
            };
            out.push((rel, what));
        }
    }
    out.sort();
    out
}

#[test]
fn pack_then_unpack_gives_an_identical_tree() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let convoy = Convoy::new(&work.path().join("store"));
    let packed = convoy.pack(&src, "web@1.0", &["--json"]).success().json();
    assert_eq!(packed["app"], "web");
    assert_eq!(packed["files"], 4);
    for field in [
        "release_id",
        "bytes",
        "chunks",
        "unique_chunks",
        "new_chunks",
        "new_bytes",
        "seconds",
    ] {
        assert!(!packed[field].is_null(), "pack --json lacks {field}");
    }
    assert!(
        packed["stored_bytes"].as_u64() < packed["bytes"].as_u64(),
        "the css compresses"
    );
    let dest = work.path().join("out");
    convoy.ok(&["unpack", "web@1.0", dest.to_str().unwrap()]);
    assert_eq!(snapshot(&src), snapshot(&dest));
}

#[test]
fn repacking_an_unchanged_tree_gives_the_same_id_and_writes_nothing() {
    let work = tempfile::tempdir().unwrap();
    sample_tree(&work.path().join("a"));
    let convoy = Convoy::new(&work.path().join("store"));
    let first = convoy
        .pack(&work.path().join("a"), "web@1", &["--json"])
        .success()
        .json();
    let again = convoy
        .pack(&work.path().join("a"), "web@1", &["--json"])
        .success()
        .json();
    assert_eq!(first["release_id"], again["release_id"]);
    assert_eq!(again["new_chunks"], 0);
    // Plain output is the id alone, for scripts.
    let plain = convoy.pack(&work.path().join("a"), "web@1", &[]).success();
    assert_eq!(plain.stdout.trim(), first["release_id"].as_str().unwrap());
}

#[test]
fn a_version_cannot_be_repacked_with_other_content() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let convoy = Convoy::new(&work.path().join("store"));
    convoy.pack(&src, "web@1", &[]).success();
    fs::write(src.join("empty"), "changed").unwrap();
    let run = convoy.pack(&src, "web@1", &[]);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("web@1 already names release"),
        "{}",
        run.stderr
    );
}

#[test]
fn inserting_one_byte_in_a_50_mib_file_moves_at_most_3_chunks() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    fs::create_dir_all(&v1).unwrap();
    fs::create_dir_all(&v2).unwrap();
    let mut data = noise(50 << 20, 42);
    fs::write(v1.join("big.bin"), &data).unwrap();
    data.insert(25 << 20, 0xAB);
    fs::write(v2.join("big.bin"), &data).unwrap();
    let convoy = Convoy::new(&work.path().join("store"));
    convoy.pack(&v1, "big@1", &[]).success();
    convoy.pack(&v2, "big@2", &[]).success();
    let diff = convoy.ok(&["diff", "big@1", "big@2", "--json"]).json();
    let new = diff["chunks_new"].as_u64().unwrap();
    assert!((1..=3).contains(&new), "{diff}");
    assert!(diff["bytes_new"].as_u64().unwrap() <= 3 * 256 * 1024);
    assert!(diff["chunks_total"].as_u64().unwrap() > 500);
    // Random bytes do not compress: the wire carries what is new, no more.
    assert!(diff["wire_bytes_new"].as_u64().unwrap() >= diff["bytes_new"].as_u64().unwrap());
}

#[test]
fn scattered_edits_move_far_less_with_deltas_and_diff_inspect_and_pack_say_so() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    fs::create_dir_all(&v1).unwrap();
    fs::create_dir_all(&v2).unwrap();
    let mut bundle = noise(2 << 20, 5);
    fs::write(v1.join("bundle.js"), &bundle).unwrap();
    fs::write(v1.join("same.txt"), "unchanged\n").unwrap();
    // A byte in every 16 KiB: every chunk of the bundle is new.
    for i in (8 << 10..bundle.len()).step_by(16 << 10) {
        bundle[i] ^= 0x55;
    }
    fs::write(v2.join("bundle.js"), &bundle).unwrap();
    fs::write(v2.join("same.txt"), "unchanged\n").unwrap();
    let convoy = Convoy::new(&work.path().join("store"));
    convoy.pack(&v1, "web@1", &[]).success();
    let packed = convoy.pack(&v2, "web@2", &["--json"]).success().json();
    assert_eq!(packed["deltas"][0]["base"], "web@1", "{packed}");
    assert_eq!(packed["deltas"][0]["files"], 1);
    assert!(packed["delta_seconds"].as_f64().is_some());

    let diff = convoy.ok(&["diff", "web@1", "web@2", "--json"]).json();
    let (chunks, deltas) = (
        diff["wire_bytes_new"].as_u64().unwrap(),
        diff["wire_bytes_with_deltas"].as_u64().unwrap(),
    );
    assert!(chunks >= 2 << 20, "{diff}");
    assert!(
        deltas * 100 < chunks,
        "{deltas} bytes with deltas, {chunks} without"
    );
    assert_eq!(
        diff["delta_bytes"].as_u64().unwrap(),
        deltas,
        "no chunk left to fetch"
    );
    assert_eq!(diff["delta_files"][0]["path"], "bundle.js");
    assert_eq!(diff["delta_files"].as_array().unwrap().len(), 1);
    assert!(diff["deltas_made"].is_null(), "made by pack, found by diff");

    let inspect = convoy
        .ok(&["inspect", "web@2", "--summary", "--json"])
        .json();
    assert_eq!(inspect["deltas"][0]["base"], "web@1", "{inspect}");
    let text = convoy.ok(&["inspect", "web@2", "--summary"]).stdout;
    assert!(text.contains("deltas    from web@1: 1 files"), "{text}");

    // Without deltas at pack time, diff makes them.
    let other = Convoy::new(&work.path().join("store2"));
    other.pack(&v1, "web@1", &[]).success();
    let packed = other
        .pack(&v2, "web@2", &["--delta-bases", "0", "--json"])
        .success()
        .json();
    assert_eq!(packed["deltas"].as_array().unwrap().len(), 0);
    let diff = other.ok(&["diff", "web@1", "web@2", "--json"]).json();
    assert!(diff["deltas_made"]["files_patched"] == 1, "{diff}");
    assert_eq!(diff["wire_bytes_with_deltas"].as_u64().unwrap(), deltas);
}

#[test]
fn escaping_symlink_is_refused_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("conf")).unwrap();
    symlink("../../etc/shadow", src.join("conf/link")).unwrap();
    let run = Convoy::new(&work.path().join("store")).pack(&src, "web@1", &[]);
    assert!(!run.ok);
    assert!(run.stderr.contains("conf/link"), "{}", run.stderr);
}

#[test]
fn fifo_in_tree_is_refused_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let fifo = std::ffi::CString::new(src.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let run = Convoy::new(&work.path().join("store")).pack(&src, "web@1", &[]);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("pipe") && run.stderr.contains("FIFO"),
        "{}",
        run.stderr
    );
}

#[test]
fn bad_app_name_is_refused() {
    let work = tempfile::tempdir().unwrap();
    fs::create_dir_all(work.path().join("src")).unwrap();
    let run =
        Convoy::new(&work.path().join("store")).pack(&work.path().join("src"), "../web@1", &[]);
    assert!(!run.ok);
    assert!(run.stderr.contains("invalid app"), "{}", run.stderr);
}

/// Writes a manifest whose only path is `..` into the store's RocksDB
/// directly, as a corrupted or hostile store would hold it.
#[test]
fn hostile_manifest_in_the_store_is_refused_naming_the_path() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("xx"), "payload").unwrap();
    let store = work.path().join("store");
    let convoy = Convoy::new(&store);
    let id = convoy.pack(&src, "web@1", &[]).success().stdout;
    let cfs = ["chunk_info", "manifests", "names", "logs", "patches"];
    {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &store, cfs).unwrap();
        let manifests = db.cf_handle("manifests").unwrap();
        let key = blake3::Hash::from_hex(id.trim()).unwrap();
        let mut bytes = db.get_cf(manifests, key.as_bytes()).unwrap().unwrap();
        // Same length, so the encoding stays well-formed: "xx" becomes "..".
        let at = bytes.windows(2).position(|w| w == b"xx").unwrap();
        bytes[at..at + 2].copy_from_slice(b"..");
        let evil = blake3::hash(&bytes);
        db.put_cf(manifests, evil.as_bytes(), &bytes).unwrap();
        let mut name = evil.as_bytes().to_vec();
        name.extend_from_slice(&99u64.to_be_bytes());
        db.put_cf(db.cf_handle("names").unwrap(), b"web@evil", name)
            .unwrap();
    }
    let dest = work.path().join("out");
    let run = convoy.run(&["unpack", "web@evil", dest.to_str().unwrap()]);
    assert!(!run.ok);
    assert!(run.stderr.contains("\"..\""), "{}", run.stderr);
    assert!(!dest.exists());
}

#[test]
fn corrupted_chunk_on_disk_is_found_by_verify() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data.bin"), noise(2 << 20, 9)).unwrap();
    let store = work.path().join("store");
    let convoy = Convoy::new(&store);
    convoy.pack(&src, "web@1", &[]).success();
    let clean = convoy.ok(&["verify", "--json"]).json();
    assert_eq!(clean["ok"], true);
    assert!(clean["report"]["chunks_checked"].as_u64().unwrap() > 5);
    // Flip one byte in the middle of the pack file that holds the chunk bodies.
    let blob = fs::read_dir(store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "pack"))
        .expect("chunk bodies live in a pack file");
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    fs::write(&blob, bytes).unwrap();
    let run = convoy.run(&["verify"]);
    assert!(!run.ok, "verify must fail on a corrupt store");
    assert!(run.stdout.contains("corrupt chunk "), "{}", run.stdout);
    assert!(run.stderr.contains("1 corrupt"), "{}", run.stderr);
}

#[test]
fn unpack_refuses_a_non_empty_destination_without_force() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let convoy = Convoy::new(&work.path().join("store"));
    convoy.pack(&src, "web@1", &[]).success();
    let dest = work.path().join("out");
    fs::create_dir_all(&dest).unwrap();
    fs::write(dest.join("keep-me"), "x").unwrap();
    let run = convoy.run(&["unpack", "web@1", dest.to_str().unwrap()]);
    assert!(!run.ok);
    assert!(run.stderr.contains("--force"), "{}", run.stderr);
    assert!(dest.join("keep-me").exists());
    convoy.ok(&["unpack", "web@1", dest.to_str().unwrap(), "--force"]);
    assert_eq!(snapshot(&src), snapshot(&dest));
}

#[test]
fn gc_keeps_the_newest_releases_and_the_store_still_verifies() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let convoy = Convoy::new(&work.path().join("store"));
    for v in 1..=3u64 {
        fs::write(src.join("app.bin"), noise(1 << 20, v)).unwrap();
        convoy.pack(&src, &format!("web@{v}"), &[]).success();
    }
    let report = convoy.ok(&["gc", "--keep", "2", "--json"]).json();
    assert_eq!(report["removed"], serde_json::json!(["web@1"]));
    assert!(report["chunks_removed"].as_u64().unwrap() > 0);
    let list = convoy.ok(&["list", "--json"]).json();
    let versions: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(versions, ["2", "3"]);
    assert_eq!(convoy.ok(&["verify", "--json"]).json()["ok"], true);
}

#[test]
fn a_store_in_use_by_another_process_gives_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let store_dir = work.path().join("store");
    let _held = convoy_daemon::store::RocksStore::open(&store_dir).unwrap();
    let run = Convoy::new(&store_dir).run(&["list"]);
    assert!(!run.ok);
    assert!(
        run.stderr.contains("in use by another process"),
        "{}",
        run.stderr
    );
}

#[test]
fn inspect_shows_entries_and_accepts_an_id_prefix() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    sample_tree(&src);
    let convoy = Convoy::new(&work.path().join("store"));
    let id = convoy
        .pack(&src, "web@1", &[])
        .success()
        .stdout
        .trim()
        .to_string();
    let info = convoy.ok(&["inspect", &id[..10], "--json"]).json();
    assert_eq!(info["version"], "1");
    assert_eq!(info["symlinks"], 2);
    assert_eq!(info["missing_chunks"], 0);
    let paths: Vec<_> = info["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"static/css/site.css"));
    let text = convoy.ok(&["inspect", "web@1"]).stdout;
    assert!(text.contains("run -> bin/server"), "{text}");
    let missing = convoy.run(&["inspect", "web@9"]);
    assert!(
        !missing.ok && missing.stderr.contains("no release web@9"),
        "{}",
        missing.stderr
    );
}

/// A name whose manifest is gone (as a damaged store could hold) is
/// reported by `verify` with the others, not an abort of the check.
#[test]
fn verify_reports_a_name_without_its_manifest() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), "payload").unwrap();
    let store = work.path().join("store");
    let convoy = Convoy::new(&store);
    convoy.pack(&src, "web@1", &[]).success();
    {
        let cfs = ["chunk_info", "manifests", "names", "logs", "patches"];
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &store, cfs).unwrap();
        let mut value = [7u8; 32].to_vec();
        value.extend_from_slice(&5u64.to_be_bytes());
        db.put_cf(db.cf_handle("names").unwrap(), b"web@ghost", value)
            .unwrap();
    }
    let run = convoy.run(&["verify"]);
    assert!(!run.ok);
    assert!(
        run.stdout.contains("missing manifest of web@ghost"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("and 2 releases"), "{}", run.stdout);
}
