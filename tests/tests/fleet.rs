//! A real fleet on loopback: a coordinator and convoyd targets as
//! processes, driven through the `convoy` CLI.

use std::time::{Duration, Instant};

use convoy_tests::{Convoy, TestFleet};

/// Polls a staging's status through the CLI until `done` says so (bounded).
fn wait_staging(
    fleet: &TestFleet,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = fleet.convoy(&["staging", id, "--json"]);
        if run.ok && done(&run.json()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen in 60 s: {}{}",
            run.stdout,
            run.stderr
        );
    }
}

/// The distinct chunks of `release`, as the publisher's store counts them.
fn chunks_of(fleet: &TestFleet, release: &str) -> u64 {
    let i = fleet
        .convoy(&["inspect", release, "--summary", "--json"])
        .success()
        .json();
    i["unique_chunks"].as_u64().unwrap()
}

/// Waits (bounded: 30 s) until `daemon`'s collection passes have removed
/// `n` chunks, as its log counts them.
fn wait_for_passes_to_remove(daemon: &convoy_tests::Daemon, n: u64) {
    let removed = || -> u64 {
        daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("collected garbage"))
            .filter_map(|l| l.split(" chunks=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while removed() < n {
        assert!(
            Instant::now() < deadline,
            "the passes removed {} of {n} chunks in 30 s",
            removed()
        );
    }
}

fn verify_store(fleet: &TestFleet, i: usize) {
    let run = Convoy::new(&fleet.target_store(i)).run(&["verify", "--json"]);
    let json = run.success().json();
    assert_eq!(json["ok"], true, "target {i}: {json}");
}

#[test]
fn a_swarm_of_ten_targets_stages_and_every_store_verifies() {
    let mut fleet = TestFleet::new(&[]);
    for i in 0..10 {
        // A mixed fleet: every daemon accepts both handshakes.
        let security = if i < 5 { "tls" } else { "noise" };
        fleet.add_target(&[
            "--label",
            &format!("dc=dc{}", i % 2),
            "--security",
            security,
        ]);
    }
    fleet.wait_for_targets(10);
    let pkg = fleet.package("v1", 6 << 20, 1);
    let id = fleet.publish(&pkg, "web@1");
    let report = fleet.stage_and_wait("web@1", "swarm", "all");
    assert_eq!(report["staged"], 10, "{report}");
    assert_eq!(report["release_id"], id.as_str());
    // Peers served each other: the origin sent a few copies, not ten (a
    // target that cannot reach its peers falls back to the origin alone).
    let origin = report["origin_egress_bytes"].as_u64().unwrap();
    let release = report["release_bytes"].as_u64().unwrap();
    assert!(origin <= 4 * release, "origin sent {origin} for {release}");
    for i in 0..10 {
        fleet.targets[i].stop();
        verify_store(&fleet, i);
        let list = Convoy::new(&fleet.target_store(i))
            .ok(&["list", "--json"])
            .json();
        assert!(
            list.to_string().contains(&id),
            "target {i} lacks the release: {list}"
        );
    }
}

/// Peer lists are not symmetric: with two peers each, most targets are
/// asked by peers no list named to them. Those still stand in the one data
/// centre (their have-sets say where they are), so nothing counts as
/// crossing a data centre and no one ranks them below the rest.
#[test]
fn peers_that_found_a_target_first_are_placed_where_they_stand() {
    let mut fleet = TestFleet::new(&["--swarm-degree", "2", "--label", "dc=one"]);
    for _ in 0..8 {
        fleet.add_target(&["--label", "dc=one", "--label", "zone=a"]);
    }
    fleet.wait_for_targets(8);
    let pkg = fleet.package("v1", 4 << 20, 3);
    fleet.publish(&pkg, "web@1");
    let report = fleet.stage_and_wait("web@1", "swarm", "all");
    assert_eq!(report["staged"], 8, "{report}");
    let origin = report["origin_egress_bytes"].as_u64().unwrap();
    let release = report["release_bytes"].as_u64().unwrap();
    assert!(origin < 8 * release, "the peers served nothing: {report}");
    assert_eq!(report["cross_dc_bytes"], 0, "{report}");
}

#[test]
fn every_byte_a_connection_carries_is_counted_beside_the_chunks() {
    let mut fleet = TestFleet::new(&[]);
    fleet.add_target(&[]);
    fleet.wait_for_targets(1);
    let pkg = fleet.package("v1", 2 << 20, 4);
    fleet.publish(&pkg, "web@1");
    let report = fleet.stage_and_wait("web@1", "pull", "all");
    let staged = report["total_bytes"].as_u64().unwrap();
    let wire = |dir: &str| {
        fleet.target_metric(
            0,
            &format!("convoy_wire_bytes_total{{direction=\"{dir}\"}}"),
        )
    };
    let (received, sent) = (wire("received"), wire("sent"));
    let chunks = fleet.target_metric(0, "convoy_chunk_bytes_total{direction=\"received\"}");
    assert!(chunks >= staged && staged >= 2 << 20, "{chunks} {staged}");
    // Framing, the order's manifest, bitfields and heartbeats come on
    // top of the chunks, and not much.
    assert!(
        received > chunks,
        "{received} on the wire, {chunks} of chunks"
    );
    assert!(
        received < chunks + chunks / 20 + (256 << 10),
        "{received} for {chunks}"
    );
    assert!(sent > 0, "requests and reports went out");
    // The target talks only to the origin: what it received, the origin
    // sent (read later, with the operator's sessions on top).
    let origin = fleet.metric("convoy_wire_bytes_total{direction=\"sent\"}");
    assert!(
        origin >= received,
        "origin sent {origin}, target received {received}"
    );
}

#[test]
fn push_and_pull_stage_exactly_the_missing_chunks() {
    let mut fleet = TestFleet::new(&["--push-parallel", "2"]);
    for _ in 0..3 {
        fleet.add_target(&[]);
    }
    fleet.wait_for_targets(3);
    let v1 = fleet.package("v1", 4 << 20, 2);
    fleet.publish(&v1, "api@1");
    let first = fleet.stage_and_wait("api@1", "push", "all");
    assert_eq!(first["staged"], 3, "{first}");
    // v2 appends to the file: only the last chunks change.
    let v2 = fleet.package("v2", 4 << 20, 2);
    let mut bytes = std::fs::read(v2.join("bin/app")).unwrap();
    bytes.extend(convoy_tests::noise(100_000, 9));
    std::fs::write(v2.join("bin/app"), bytes).unwrap();
    fleet.publish(&v2, "api@2");
    let second = fleet.stage_and_wait("api@2", "pull", "all");
    assert_eq!(second["staged"], 3, "{second}");
    let total = second["total_bytes"].as_u64().unwrap();
    assert!(
        total < 3 * (1 << 20),
        "an append moved {total} bytes to three targets"
    );
}

#[test]
fn a_target_killed_mid_transfer_resumes_without_refetching() {
    interrupted_mid_transfer_resumes(|target| target.kill());
}

/// SIGTERM (what systemd sends to stop a unit): convoyd exits cleanly,
/// its order kept, and takes it up again where it was.
#[test]
fn a_target_stopped_by_sigterm_mid_transfer_exits_cleanly_and_resumes() {
    interrupted_mid_transfer_resumes(|target| {
        assert!(target.stop(), "SIGTERM mid-transfer: not a clean exit")
    });
}

fn interrupted_mid_transfer_resumes(interrupt: impl FnOnce(&mut convoy_tests::Daemon)) {
    // A slow origin (2 MiB/s) makes the 8 MiB transfer last about 4 s.
    let mut fleet = TestFleet::new(&["--upload-rate", "2MiB"]);
    fleet.add_target(&[]);
    fleet.wait_for_targets(1);
    let pkg = fleet.package("v1", 8 << 20, 3);
    fleet.publish(&pkg, "web@1");
    let started = fleet
        .convoy(&["stage", "web@1", "--mode", "pull", "--json"])
        .success()
        .json();
    let id = started["staging"].to_string();
    // Wait until the target reports a third of the chunks, then stop it.
    wait_staging(&fleet, &id, "a third of the chunks", |s| {
        s["per_target"][0]["chunks_held"].as_u64().unwrap_or(0) * 3
            >= s["per_target"][0]["chunks_total"]
                .as_u64()
                .unwrap_or(u64::MAX)
    });
    interrupt(&mut fleet.targets[0]);
    fleet.targets[0].restart();
    wait_staging(&fleet, &id, "staging to finish", |s| s["staged"] == 1);
    let status = fleet.convoy(&["staging", &id, "--json"]).success().json();
    let after_restart = status["per_target"][0]["bytes_received"].as_u64().unwrap();
    let release = status["release_bytes"].as_u64().unwrap();
    assert!(
        after_restart < release * 4 / 5,
        "the restarted target fetched {after_restart} of {release} bytes again"
    );
    fleet.targets[0].stop();
    verify_store(&fleet, 0);
}

#[test]
fn a_peer_serving_corrupt_chunks_is_banned_and_the_release_still_completes() {
    let mut fleet = TestFleet::new(&["--upload-rate", "4MiB"]);
    let liar = fleet.add_target(&["--label", "role=liar", "--fault-corrupt-uploads"]);
    fleet.wait_for_targets(1);
    let pkg = fleet.package("v1", 4 << 20, 4);
    fleet.publish(&pkg, "web@1");
    // The liar gets the release first, so the others find it holding everything.
    fleet.stage_and_wait("web@1", "pull", "role=liar");
    for _ in 0..4 {
        fleet.add_target(&["--label", "role=honest"]);
    }
    fleet.wait_for_targets(5);
    let report = fleet.stage_and_wait("web@1", "swarm", "role=honest");
    assert_eq!(report["staged"], 4, "{report}");
    let bans = fleet.targets[1..]
        .iter()
        .filter(|t| t.log_text().contains("corrupt chunk: banning"))
        .count();
    assert!(bans >= 1, "no honest target banned the liar");
    assert!(fleet.targets[liar].log_text().contains("corrupting"));
    for i in 1..5 {
        fleet.targets[i].stop();
        verify_store(&fleet, i);
    }
}

#[test]
fn without_the_fleet_key_nothing_can_be_fetched_or_ordered() {
    let mut fleet = TestFleet::new(&[]);
    fleet.add_target(&[]);
    fleet.wait_for_targets(1);
    let pkg = fleet.package("v1", 1 << 20, 5);
    fleet.publish(&pkg, "web@1");
    let other = fleet.path().join("other.key");
    assert!(
        std::process::Command::new(convoy_tests::bin_dir().join("convoyd"))
            .arg("fleet-key")
            .arg(&other)
            .status()
            .unwrap()
            .success()
    );
    let cli = Convoy::new(&fleet.path().join("intruder-store"));
    let addr = fleet.coordinator.addr.clone();
    let operator_key = fleet.coordinator.ready["operator_key_file"]
        .as_str()
        .unwrap()
        .to_string();
    // Even the operator's own key does not help without the fleet key.
    let with_other_key = |args: &[&str]| {
        let mut all = vec![
            "--coordinator",
            addr.as_str(),
            "--fleet-key-file",
            other.to_str().unwrap(),
            "--operator-key-file",
            operator_key.as_str(),
        ];
        all.extend_from_slice(args);
        cli.run(&all)
    };
    let fleet_list = with_other_key(&["fleet"]);
    assert!(!fleet_list.ok);
    assert!(
        fleet_list.stderr.contains("not a member of this fleet"),
        "{}",
        fleet_list.stderr
    );
    let order = with_other_key(&["stage", "web@1", "--mode", "pull"]);
    assert!(!order.ok);
    let upload = with_other_key(&["publish", pkg.to_str().unwrap(), "evil@1"]);
    assert!(!upload.ok);
    // A daemon with the wrong key never joins.
    let mut intruder = fleet.key.clone();
    intruder.set_file_name("other.key");
    let args: Vec<String> = [
        "target",
        "--data-dir",
        fleet.path().join("intruder").to_str().unwrap(),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--fleet-key-file",
        other.to_str().unwrap(),
        "--coordinator",
        &addr,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let intruder = convoy_tests::Daemon::start(&args, &fleet.path().join("intruder.log"));
    let staged = fleet.stage_and_wait("web@1", "pull", "all");
    assert_eq!(staged["targets"], 1, "the intruder was counted: {staged}");
    let members = fleet.convoy(&["fleet", "--json"]).success().json();
    assert!(!members.to_string().contains(&intruder.peer_id));
    // The coordinator's releases are untouched: evil@1 was never published.
    let list = fleet.convoy(&["stage", "evil@1", "--mode", "pull"]);
    assert!(
        !list.ok && list.stderr.contains("not published"),
        "{}",
        list.stderr
    );
}

#[test]
fn a_coordinator_restarted_mid_staging_lets_the_targets_finish() {
    let mut fleet = TestFleet::new(&["--upload-rate", "2MiB"]);
    for _ in 0..3 {
        fleet.add_target(&[]);
    }
    fleet.wait_for_targets(3);
    let pkg = fleet.package("v1", 8 << 20, 6);
    fleet.publish(&pkg, "web@1");
    let started = fleet
        .convoy(&["stage", "web@1", "--mode", "swarm", "--json"])
        .success()
        .json();
    let id = started["staging"].to_string();
    wait_staging(&fleet, &id, "some progress", |s| {
        s["per_target"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["chunks_held"].as_u64().unwrap_or(0) > 8))
    });
    fleet.coordinator.kill();
    fleet.coordinator.restart();
    wait_staging(&fleet, &id, "every target staged", |s| s["staged"] == 3);
    for i in 0..3 {
        fleet.targets[i].stop();
        verify_store(&fleet, i);
    }
}

#[test]
fn a_running_target_drops_old_releases_and_keeps_what_its_staging_needs() {
    let mut fleet = TestFleet::new(&["--upload-rate", "4MiB"]);
    // A pass every 100 ms: a staging of four seconds lives through dozens.
    fleet.add_target(&["--gc-interval", "100ms", "--retain", "2"]);
    fleet.wait_for_targets(1);
    for v in 1..=3u64 {
        let pkg = fleet.package(&format!("v{v}"), 1 << 20, 40 + v);
        fleet.publish(&pkg, &format!("web@{v}"));
        fleet.stage_and_wait(&format!("web@{v}"), "pull", "all");
    }
    let big = fleet.package("v4", 16 << 20, 44);
    fleet.publish(&big, "web@4");
    let staged = fleet.stage_and_wait("web@4", "pull", "all");
    assert_eq!(staged["staged"], 1, "{staged}");
    // Passes every 100 ms drop web@1 and web@2 and, a pass later, their
    // chunks: wait (bounded) until the log has counted them all.
    let dropped = chunks_of(&fleet, "web@1") + chunks_of(&fleet, "web@2");
    wait_for_passes_to_remove(&fleet.targets[0], dropped);
    fleet.targets[0].stop();
    verify_store(&fleet, 0);
    let cli = Convoy::new(&fleet.target_store(0));
    assert_eq!(cli.names(), ["web@3", "web@4"]);
    // Only the kept releases' chunks remain.
    let kept: u64 = ["web@3", "web@4"]
        .iter()
        .map(|r| {
            let i = cli
                .run(&["inspect", r, "--summary", "--json"])
                .success()
                .json();
            i["unique_chunks"].as_u64().unwrap()
        })
        .sum();
    let verified = cli.run(&["verify", "--json"]).success().json();
    assert_eq!(
        verified["report"]["chunks_checked"].as_u64(),
        Some(kept),
        "{verified}"
    );
}

#[test]
fn a_running_origin_drops_old_releases_and_keeps_what_is_being_published() {
    let mut fleet = TestFleet::new(&["--gc-interval", "100ms", "--retain", "2"]);
    // Publishing asks which chunks the origin lacks, uploads them, then
    // names the release, all through passes every 100 ms.
    for v in 1..=3u64 {
        let pkg = fleet.package(&format!("v{v}"), 4 << 20, 60 + v);
        fleet.publish(&pkg, &format!("web@{v}"));
    }
    let dropped = chunks_of(&fleet, "web@1");
    wait_for_passes_to_remove(&fleet.coordinator, dropped);
    let gone = fleet.convoy(&["stage", "web@1", "--mode", "pull"]);
    assert!(
        !gone.ok && gone.stderr.contains("not published"),
        "{}",
        gone.stderr
    );
    let kept = chunks_of(&fleet, "web@2") + chunks_of(&fleet, "web@3");
    fleet.coordinator.stop();
    let store = fleet.path().join("coordinator/store");
    assert_eq!(Convoy::new(&store).names(), ["web@2", "web@3"]);
    let verified = Convoy::new(&store)
        .run(&["verify", "--json"])
        .success()
        .json();
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(
        verified["report"]["chunks_checked"].as_u64(),
        Some(kept),
        "{verified}"
    );
}

#[test]
fn a_finished_staging_is_not_recorded_again_at_every_report() {
    use std::os::unix::fs::MetadataExt;
    let mut fleet = TestFleet::new(&[]);
    fleet.add_target(&[]);
    fleet.wait_for_targets(1);
    let pkg = fleet.package("v1", 256 << 10, 70);
    fleet.publish(&pkg, "web@1");
    fleet.stage_and_wait("web@1", "pull", "all");
    // The report that ended the staging recorded that; each record
    // replaces the file, so a new one would have a new inode.
    let file = fleet.path().join("coordinator/stagings.json");
    let recorded = std::fs::metadata(&file).unwrap().ino();
    // Five more reports (bounded: heartbeats come every 200 ms).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut reports, mut last) = (0, u64::MAX);
    while reports < 5 {
        assert!(Instant::now() < deadline, "only {reports} reports in 30 s");
        let fleet_now = fleet.convoy(&["fleet", "--json"]).success().json();
        let seen = fleet_now["targets"][0]["last_seen_ms"].as_u64().unwrap();
        if seen < last {
            reports += 1;
        }
        last = seen;
    }
    assert_eq!(
        std::fs::metadata(&file).unwrap().ino(),
        recorded,
        "stagings.json was written again though no staging started or ended"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), "[]");
}

#[test]
fn one_operator_key_publishes_from_eight_sessions_at_once() {
    let fleet = TestFleet::new(&[]);
    // Each CLI run is a session of its own, with an identity of its own
    // that the operator key signed: they neither share nor close each
    // other's connections.
    let pkgs: Vec<_> = (0..8u64)
        .map(|i| fleet.package(&format!("p{i}"), 4 << 20, 80 + i))
        .collect();
    let operator_key = fleet.coordinator.ready["operator_key_file"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::scope(|s| {
        for (i, pkg) in pkgs.iter().enumerate() {
            let (fleet, operator_key) = (&fleet, &operator_key);
            s.spawn(move || {
                // Each publisher packs into a store of its own.
                let cli = Convoy::new(&fleet.path().join(format!("cli-store-{i}")));
                cli.run(&[
                    "--coordinator",
                    &fleet.coordinator.addr,
                    "--fleet-key-file",
                    fleet.key.to_str().unwrap(),
                    "--operator-key-file",
                    operator_key,
                    "publish",
                    pkg.to_str().unwrap(),
                    &format!("app{i}@1"),
                ])
                .success();
            });
        }
    });
    let history = fleet
        .operator(&["history", "app7", "--json"])
        .success()
        .json();
    let by = history["history"][0]["by"].as_str().unwrap().to_string();
    assert!(by.starts_with("operator local (12D3"), "{by}");
}
