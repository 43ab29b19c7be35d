//! The origin makes a release's binary deltas after its publish, in the
//! background, and a restarted origin makes those it had not made, and
//! only those. A staging order's manifest goes as a delta to a target
//! holding an older release.

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

/// `count` small files of pseudo-random bytes; `changed` of them differ
/// by `seed`.
fn many_files(root: &Path, name: &str, count: usize, changed: usize, seed: u64) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..count {
        let s = if i < changed {
            seed + i as u64
        } else {
            i as u64
        };
        std::fs::write(dir.join(format!("f{i:04}.js")), noise(3000, s)).unwrap();
    }
    dir
}

fn stage(fleet: &TestFleet, release: &str, selector: &str) {
    fleet
        .convoy(&[
            "stage",
            release,
            "--mode",
            "pull",
            "--targets",
            selector,
            "--wait",
            "--timeout",
            "60",
        ])
        .success();
}

fn order_bytes(fleet: &TestFleet, form: &str) -> u64 {
    metric(
        fleet,
        &format!("convoy_order_manifest_bytes_total{{form=\"{form}\"}}"),
    )
}

#[test]
fn a_target_holding_an_older_release_is_sent_the_manifest_as_a_delta() {
    let mut fleet = TestFleet::new(&["--delta-bases", "0"]);
    fleet.add_target(&["--label", "name=a"]);
    fleet.wait_for_targets(1);
    let root = fleet.path().to_path_buf();
    // 300 files: a manifest of about 20 KB; one file changes.
    publish(&fleet, &many_files(&root, "v1", 300, 0, 0), "web@1");
    publish(&fleet, &many_files(&root, "v2", 300, 1, 9000), "web@2");
    stage(&fleet, "web@1", "name=a");
    let whole = order_bytes(&fleet, "whole");
    assert!(whole > 10_000, "{whole} bytes: web@1's manifest, whole");
    assert_eq!(order_bytes(&fleet, "delta"), 0);

    stage(&fleet, "web@2", "name=a");
    let delta = order_bytes(&fleet, "delta");
    assert!(delta > 0 && delta * 20 < whole, "{delta} bytes as a delta");
    assert_eq!(
        order_bytes(&fleet, "whole"),
        whole,
        "nothing else sent whole"
    );

    // A target that holds no older release gets the manifest whole.
    fleet.add_target(&["--label", "name=b"]);
    fleet.wait_for_targets(2);
    stage(&fleet, "web@2", "name=b");
    let now = order_bytes(&fleet, "whole");
    assert!(
        now > whole + whole / 2,
        "web@2's manifest whole: {}",
        now - whole
    );
    assert_eq!(order_bytes(&fleet, "delta"), delta);
}

/// Sends `request` to target `i` as the peer holding `identity`, with the
/// fleet key, and returns the answer.
fn order_as(
    fleet: &TestFleet,
    identity: &libp2p::identity::Keypair,
    i: usize,
    request: convoy_daemon::protocol::ControlRequest,
) -> convoy_daemon::protocol::ControlResponse {
    use convoy_daemon::net::{self, NetConfig};
    let fleet_key = convoy_daemon::fleet_key::read(&fleet.key).expect("fleet key");
    let (target, addr) = convoy_daemon::client::parse_peer_addr(&fleet.targets[i].addr).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, mut events) = net::start(NetConfig {
            keypair: identity.clone(),
            listen: Vec::new(),
            fleet_key,
            request_timeout: Duration::from_secs(30),
            admission_timeout: net::ADMISSION_TIMEOUT,
        })
        .unwrap();
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        client.add_addresses(target, vec![addr]).await;
        let answer = client.control(target, request).await.expect("an answer");
        client.shutdown().await;
        answer
    })
}

#[test]
fn an_order_with_the_manifest_as_a_delta_is_taken_only_from_the_coordinator_as_signed() {
    use convoy_daemon::protocol::{
        signed_bytes, ControlRequest, ControlResponse, DistributionMode, StageOrder,
        StageOrderDelta,
    };
    use convoy_daemon::store::{RocksStore, Store};
    use libp2p::identity::Keypair;

    let mut fleet = TestFleet::new(&["--delta-bases", "0"]);
    fleet.add_target(&["--label", "name=a"]);
    fleet.add_target(&["--label", "name=b"]);
    fleet.wait_for_targets(2);
    let root = fleet.path().to_path_buf();
    publish(&fleet, &many_files(&root, "v1", 300, 0, 0), "web@1");
    publish(&fleet, &many_files(&root, "v2", 300, 1, 9000), "web@2");
    stage(&fleet, "web@1", "name=a");
    let (v1, v2) = {
        let store = RocksStore::open(&root.join("cli-store")).unwrap();
        let get = |v: &str| {
            let id = store.resolve("web", v).unwrap().unwrap();
            store.get_manifest(&id).unwrap().unwrap()
        };
        (get("1"), get("2"))
    };
    let order = |signer: &Keypair, signed: &convoy_chunker::Manifest| {
        ControlRequest::StageFrom(StageOrderDelta {
            base: v1.release_id(),
            order: StageOrder {
                manifest: convoy_chunker::manifest_delta(&v1, &v2),
                signature: signer.sign(&signed_bytes(&signed.release_id())).unwrap(),
                mode: DistributionMode::Pull,
                origin_labels: Default::default(),
            },
        })
    };
    let read_key =
        |path: PathBuf| Keypair::from_protobuf_encoding(&std::fs::read(path).unwrap()).unwrap();

    // Root on target b has its key and the fleet key: not the coordinator.
    fleet.targets[1].stop();
    let thief = read_key(fleet.target_dir(1).join("identity.key"));
    let answer = order_as(&fleet, &thief, 0, order(&thief, &v2));
    assert_eq!(answer, ControlResponse::Denied);

    // The coordinator's own key, but a signature over another release: the
    // rebuilt manifest is refused.
    fleet.coordinator.stop();
    let coordinator = read_key(root.join("coordinator/identity.key"));
    match order_as(&fleet, &coordinator, 0, order(&coordinator, &v1)) {
        ControlResponse::Error(e) => assert!(e.contains("not signed"), "{e}"),
        other => panic!("an order signed for another release was answered {other:?}"),
    }
    // Signed over the rebuilt manifest's id, it is taken.
    let answer = order_as(&fleet, &coordinator, 0, order(&coordinator, &v2));
    assert_eq!(answer, ControlResponse::Ok);
}
