//! A killed `convoy pack` and a full disk lose nothing that was already safe.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use convoy_tests::{bin_dir, noise, Convoy};

fn write_files(dir: &Path, count: u64, size: usize, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        fs::write(dir.join(format!("f{i:03}.bin")), noise(size, seed + i)).unwrap();
    }
}

#[test]
fn pack_killed_mid_way_leaves_the_store_consistent_and_repack_completes() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let convoy = Convoy::new(&store);
    let small = work.path().join("small");
    write_files(&small, 2, 1 << 20, 1);
    convoy.pack(&small, "web@1", &[]).success();

    let big = work.path().join("big");
    write_files(&big, 48, 8 << 20, 100);
    let mut child = Command::new(bin_dir().join("convoy"))
        .arg("--store")
        .arg(&store)
        .args([
            "--threads",
            "1",
            "pack",
            big.to_str().unwrap(),
            "--app",
            "web",
            "--version",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has written 64 MiB of chunk bodies into its packs.
    let packed_bytes = || -> u64 {
        fs::read_dir(store.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let before = packed_bytes();
    let deadline = Instant::now() + Duration::from_secs(60);
    while packed_bytes() < before + (64 << 20) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "pack finished before it could be killed"
        );
        assert!(
            Instant::now() < deadline,
            "pack wrote less than 64 MiB within 60 s"
        );
        std::thread::yield_now();
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // The old release is intact, the half-packed one does not exist.
    let list = convoy.ok(&["list", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(convoy.ok(&["verify", "--json"]).json()["ok"], true);
    // Packing again completes, and the release comes back out byte for byte.
    convoy.pack(&big, "web@2", &[]).success();
    assert_eq!(convoy.ok(&["verify", "--json"]).json()["ok"], true);
    let out = work.path().join("out");
    convoy.ok(&["unpack", "web@2", out.to_str().unwrap()]);
    for i in [0, 47] {
        let name = format!("f{i:03}.bin");
        assert!(
            fs::read(big.join(&name)).unwrap() == fs::read(out.join(&name)).unwrap(),
            "{name} differs"
        );
    }
}

/// Mounts a 48 MiB tmpfs; needs root, which the test environment (and CI) has.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=48m",
                "convoy-test",
                dir.path().to_str().unwrap(),
            ])
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root"
        );
        Self(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn full_disk_fails_pack_and_keeps_what_was_stored() {
    let disk = SmallDisk::mount();
    let work = tempfile::tempdir().unwrap();
    let store = disk.0.path().join("store");
    let convoy = Convoy::new(&store);
    let small = work.path().join("small");
    write_files(&small, 2, 4 << 20, 1);
    convoy.pack(&small, "web@1", &[]).success();

    let big = work.path().join("big");
    write_files(&big, 10, 8 << 20, 50);
    let run = convoy.pack(&big, "web@2", &[]);
    assert!(!run.ok, "packing 80 MiB into a 48 MiB disk must fail");
    assert!(
        run.stderr.contains("No space left") || run.stderr.contains("space"),
        "{}",
        run.stderr
    );

    let list = convoy.ok(&["list", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "only web@1 exists");
    assert_eq!(convoy.ok(&["verify", "--json"]).json()["ok"], true);
}

#[test]
fn unpack_onto_a_full_disk_fails_and_leaves_no_partial_tree() {
    let disk = SmallDisk::mount();
    let work = tempfile::tempdir().unwrap();
    let convoy = Convoy::new(&work.path().join("store"));
    let src = work.path().join("src");
    write_files(&src, 8, 8 << 20, 7);
    convoy.pack(&src, "web@1", &[]).success();
    let dest = disk.0.path().join("out");
    let run = convoy.run(&["unpack", "web@1", dest.to_str().unwrap()]);
    assert!(!run.ok, "64 MiB cannot fit a 48 MiB disk");
    assert!(run.stderr.contains("No space left"), "{}", run.stderr);
    assert!(!dest.exists());
    let left = fs::read_dir(disk.0.path()).unwrap().count();
    assert_eq!(left, 0, "the partial tree was not removed");
}
