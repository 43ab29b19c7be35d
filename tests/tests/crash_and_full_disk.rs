//! A killed `convoy pack` and a full disk lose nothing that was already safe.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use convoy_tests::{bin_dir, noise, Convoy, TestFleet};

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

/// A 48 MiB tmpfs; mounting needs root, which the test environment (and
/// CI) has.
struct SmallDisk {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl SmallDisk {
    /// Mounts one on a new temporary directory.
    fn mount() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut disk = Self::mount_at(temp.path());
        disk._temp = Some(temp);
        disk
    }

    /// Mounts one on `path`, made if missing.
    fn mount_at(path: &Path) -> Self {
        fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=48m", "convoy-test"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root"
        );
        Self {
            path: path.to_path_buf(),
            _temp: None,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a daemon a failed test left running may still hold it.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn full_disk_fails_pack_and_keeps_what_was_stored() {
    let disk = SmallDisk::mount();
    let work = tempfile::tempdir().unwrap();
    let store = disk.path().join("store");
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
    let dest = disk.path().join("out");
    let run = convoy.run(&["unpack", "web@1", dest.to_str().unwrap()]);
    assert!(!run.ok, "64 MiB cannot fit a 48 MiB disk");
    assert!(run.stderr.contains("No space left"), "{}", run.stderr);
    assert!(!dest.exists());
    let left = fs::read_dir(disk.path()).unwrap().count();
    assert_eq!(left, 0, "the partial tree was not removed");
}

#[test]
fn a_pulling_target_whose_disk_fills_fails_the_staging_and_stops_fetching() {
    disk_fills_mid_staging("pull");
}

#[test]
fn a_target_whose_disk_fills_under_a_push_fails_the_staging() {
    disk_fills_mid_staging("push");
}

/// Stages 96 MiB in `mode` onto a target with a 48 MiB disk: the staging
/// fails by itself, naming the full disk; the chunk traffic stops; what
/// was staged before stays whole.
fn disk_fills_mid_staging(mode: &str) {
    // A paced origin, so that what it sends after the disk filled shows.
    let mut fleet = TestFleet::new(&["--upload-rate", "8MiB"]);
    let disk = SmallDisk::mount_at(&fleet.target_dir(0));
    fleet.add_target(&[]);
    fleet.wait_for_targets(1);
    fleet.publish(&fleet.package("v1", 2 << 20, 1), "web@1");
    assert_eq!(fleet.stage_and_wait("web@1", mode, "all")["staged"], 1);

    fleet.publish(&fleet.package("v2", 96 << 20, 2), "web@2");
    let before = fleet.metric("convoy_origin_bytes_sent_total");
    let run = fleet.convoy(&[
        "stage",
        "web@2",
        "--mode",
        mode,
        "--wait",
        "--timeout",
        "60",
        "--json",
    ]);
    assert!(!run.ok, "96 MiB cannot be staged on a 48 MiB disk");
    assert!(
        !run.stderr.contains("not finished"),
        "{mode}: the staging did not end: {}",
        run.stderr
    );
    let report = run.json();
    let state = report["per_target"][0]["state"]
        .as_str()
        .unwrap_or_default();
    assert!(
        state.starts_with("failed") && state.contains("No space left"),
        "{report}"
    );

    // It asks for nothing more: the origin's chunk traffic stops (bounded:
    // 15 s) once it has served what was already asked, well short of the
    // release a target still asking would take whole.
    let sent = || fleet.metric("convoy_origin_bytes_sent_total") - before;
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut last, mut since) = (sent(), Instant::now());
    while since.elapsed() < Duration::from_secs(1) {
        assert!(
            Instant::now() < deadline,
            "{mode}: chunk traffic had not stopped 15 s after the staging failed"
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = sent();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    assert!(
        last < 80 << 20,
        "{mode}: the origin sent {last} bytes of a 96 MiB release to a 48 MiB disk"
    );

    // What was staged before the disk filled is intact.
    fleet.targets[0].stop();
    let store = Convoy::new(&disk.path().join("store"));
    assert_eq!(store.names(), ["web@1"]);
    assert_eq!(store.ok(&["verify", "--json"]).json()["ok"], true);
}
