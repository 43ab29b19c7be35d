//! The origin makes a release's binary deltas after its publish, in the
//! background, and a restarted origin makes those it had not made, and
//! only those.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use convoy_tests::{http, noise, TestFleet};

/// `convoy_delta_patches_total{result="RESULT"}`, or another delta metric.
fn metric(fleet: &TestFleet, line: &str) -> u64 {
    let (status, text) = http(
        &fleet.api_addr(),
        "GET",
        "/metrics",
        Some(&fleet.api_token()),
    );
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {line} in the metrics:\n{text}"))
        .parse()
        .expect("a count")
}

fn patches(fleet: &TestFleet, result: &str) -> u64 {
    metric(
        fleet,
        &format!("convoy_delta_patches_total{{result=\"{result}\"}}"),
    )
}

/// Waits (bounded: 60 s) until `patches(result)` reaches `n`.
fn wait_patches(fleet: &TestFleet, result: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while patches(fleet, result) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} patches {result} in 60 s:\n{}",
            fleet.coordinator.log_text()
        );
        // The metrics are another process's: polled, briefly.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A release of one 1 MiB file of pseudo-random bytes, with a byte changed
/// every `edit_every` bytes (a recompiled bundle: nearly every chunk new,
/// the delta tiny).
fn version(root: &Path, name: &str, edit_every: Option<usize>) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut bytes = noise(1 << 20, 7);
    if let Some(every) = edit_every {
        for i in (every / 2..bytes.len()).step_by(every) {
            bytes[i] ^= 0x5a;
        }
    }
    std::fs::write(dir.join("app.js"), bytes).unwrap();
    dir
}

fn publish(fleet: &TestFleet, dir: &Path, release: &str) {
    fleet
        .convoy(&["publish", dir.to_str().unwrap(), release])
        .success();
}

#[test]
fn a_restarted_origin_makes_the_deltas_it_had_not_made_and_not_those_it_had() {
    let mut fleet = TestFleet::new(&["--delta-bases", "0"]);
    let root = fleet.path().to_path_buf();
    publish(&fleet, &version(&root, "v1", None), "web@1");
    publish(&fleet, &version(&root, "v2", Some(20_000)), "web@2");
    assert_eq!(patches(&fleet, "made"), 0, "delta making is off");

    // On again: at start, the newest release of each app is due.
    fleet.coordinator.set_arg("--delta-bases", "2");
    fleet.coordinator.restart();
    wait_patches(&fleet, "made", 1);
    let delta = metric(&fleet, "convoy_delta_bytes_total");
    let replaced = metric(&fleet, "convoy_delta_replaced_wire_bytes_total");
    assert!(delta > 0 && delta < 8 << 10, "{delta} bytes of deltas");
    // Every chunk but perhaps a short last one holds an edit.
    assert!(replaced >= 15 << 16, "they replace {replaced} wire bytes");

    // Made once: the next start finds the patch in the store.
    fleet.coordinator.restart();
    wait_patches(&fleet, "reused", 1);
    assert_eq!(patches(&fleet, "made"), 0);

    // A publish makes the new release's deltas from the two before it.
    publish(&fleet, &version(&root, "v3", Some(15_000)), "web@3");
    wait_patches(&fleet, "made", 2);
    assert_eq!(patches(&fleet, "failed"), 0);
}
