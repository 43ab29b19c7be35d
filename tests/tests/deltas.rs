//! The origin makes a release's binary deltas after its publish, in the
//! background, and a restarted origin makes those it had not made, and
//! only those. A staging order's manifest goes as a delta to a target
//! holding an older release, and with the patch from it: the target
//! fetches the deltas and rebuilds the files, or falls back to chunks.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use convoy_tests::{noise, TestFleet};

fn patches(fleet: &TestFleet, result: &str) -> u64 {
    fleet.metric(&format!(
        "convoy_delta_patches_total{{result=\"{result}\"}}"
    ))
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

/// A fleet (coordinator flags `extra`) with a target per name, labelled
/// `name=NAME`, all registered; and its directory.
fn fleet_of(names: &[&str], extra: &[&str]) -> (TestFleet, PathBuf) {
    let mut fleet = TestFleet::new(extra);
    for name in names {
        fleet.add_target(&["--label", &format!("name={name}")]);
    }
    fleet.wait_for_targets(names.len());
    let root = fleet.path().to_path_buf();
    (fleet, root)
}

/// `web@VERSION`'s manifest in `store`.
fn web(store: &dyn convoy_daemon::store::Store, version: &str) -> convoy_chunker::Manifest {
    let id = store.resolve("web", version).unwrap().unwrap();
    store.get_manifest(&id).unwrap().unwrap()
}

#[test]
fn a_restarted_origin_makes_the_deltas_it_had_not_made_and_not_those_it_had() {
    let mut fleet = TestFleet::new(&["--delta-bases", "0"]);
    let root = fleet.path().to_path_buf();
    fleet.publish(&version(&root, "v1", None), "web@1");
    fleet.publish(&version(&root, "v2", Some(20_000)), "web@2");
    assert_eq!(patches(&fleet, "made"), 0, "delta making is off");

    // On again: at start, the newest release of each app is due.
    fleet.coordinator.set_arg("--delta-bases", "2");
    fleet.coordinator.restart();
    wait_patches(&fleet, "made", 1);
    let delta = fleet.metric("convoy_delta_bytes_total");
    let replaced = fleet.metric("convoy_delta_replaced_wire_bytes_total");
    assert!(delta > 0 && delta < 8 << 10, "{delta} bytes of deltas");
    // Every chunk but perhaps a short last one holds an edit.
    assert!(replaced >= 15 << 16, "they replace {replaced} wire bytes");

    // Made once: the next start finds the patch in the store.
    fleet.coordinator.restart();
    wait_patches(&fleet, "reused", 1);
    assert_eq!(patches(&fleet, "made"), 0);

    // A publish makes the new release's deltas from the two before it.
    fleet.publish(&version(&root, "v3", Some(15_000)), "web@3");
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
    fleet.metric(&format!(
        "convoy_order_manifest_bytes_total{{form=\"{form}\"}}"
    ))
}

#[test]
fn a_target_holding_an_older_release_is_sent_the_manifest_as_a_delta() {
    let (mut fleet, root) = fleet_of(&["a"], &["--delta-bases", "0"]);
    // 300 files: a manifest of about 20 KB; one file changes.
    fleet.publish(&many_files(&root, "v1", 300, 0, 0), "web@1");
    fleet.publish(&many_files(&root, "v2", 300, 1, 9000), "web@2");
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
    let (target, addr) =
        convoy_daemon::net::client::parse_peer_addr(&fleet.targets[i].addr).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, mut events) = net::start(NetConfig {
            keypair: identity.clone(),
            listen: Vec::new(),
            fleet_key,
            request_timeout: Duration::from_secs(30),
            admission_timeout: net::ADMISSION_TIMEOUT,
            security: net::Security::default(),
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
    use convoy_daemon::store::RocksStore;
    use libp2p::identity::Keypair;

    let (mut fleet, root) = fleet_of(&["a", "b"], &["--delta-bases", "0"]);
    fleet.publish(&many_files(&root, "v1", 300, 0, 0), "web@1");
    fleet.publish(&many_files(&root, "v2", 300, 1, 9000), "web@2");
    stage(&fleet, "web@1", "name=a");
    let (v1, v2) = {
        let store = RocksStore::open(&root.join("cli-store")).unwrap();
        (web(&store, "1"), web(&store, "2"))
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

/// Bytes target `name` received in a staging's report.
fn received_by(report: &serde_json::Value, name: &str) -> u64 {
    report["per_target"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["labels"]["name"] == name)
        .unwrap_or_else(|| panic!("no target {name} in {report}"))["bytes_received"]
        .as_u64()
        .unwrap()
}

/// Reads every file of `app@version` back from target `i`'s store (each
/// chunk verified; the target stopped) and compares it with `dir`.
fn assert_staged_as(fleet: &mut TestFleet, i: usize, release: &str, dir: &Path) {
    use convoy_daemon::store::{RocksStore, Store, StoreSource};
    fleet.targets[i].stop();
    let store = RocksStore::open(&fleet.target_store(i)).unwrap();
    let (app, version) = release.split_once('@').unwrap();
    let id = store.resolve(app, version).unwrap().expect("staged");
    let manifest = store.get_manifest(&id).unwrap().unwrap();
    let mut files = 0;
    for (path, chunks) in manifest.files() {
        let bytes = convoy_chunker::read_file(&StoreSource(&store), path, chunks).unwrap();
        assert!(
            bytes == std::fs::read(dir.join(path)).unwrap(),
            "target {i}: {path} differs from the release"
        );
        files += 1;
    }
    assert!(files > 0);
}

#[test]
fn targets_holding_the_base_fetch_the_deltas_and_rebuild_the_release() {
    let (mut fleet, root) = fleet_of(&["a", "b", "c"], &[]);
    fleet.publish(&version(&root, "v1", None), "web@1");
    fleet.stage_and_wait("web@1", "swarm", "");
    // Nearly every 64 KiB chunk of v2 holds an edit: about 1 MiB of new chunks.
    let v2 = version(&root, "v2", Some(20_000));
    let v2_dir = v2.to_str().unwrap();
    let published = fleet
        .convoy(&["publish", v2_dir, "web@2", "--wait-deltas", "--json"])
        .success()
        .json();
    let deltas = &published["deltas"];
    assert_eq!(deltas["pending"], false, "{published}");
    assert_eq!(deltas["patches"][0]["base"], "web@1", "{published}");
    assert_eq!(deltas["patches"][0]["files"], 1);
    let delta_bytes = deltas["patches"][0]["delta_bytes"].as_u64().unwrap();
    assert!(delta_bytes > 0 && delta_bytes < 8 << 10, "{published}");
    // A target that holds no older release.
    fleet.add_target(&["--label", "name=d"]);
    fleet.wait_for_targets(4);

    let report = fleet.stage_and_wait("web@2", "swarm", "");
    assert_eq!(report["staged"], 4, "{report}");
    assert_eq!(fleet.metric("convoy_delta_orders_total"), 3);
    let spared = fleet.metric("convoy_delta_spared_wire_bytes_total");
    assert!(spared > 3 * (900 << 10), "{spared} bytes spared");
    for name in ["a", "b", "c"] {
        let n = received_by(&report, name);
        assert!(
            n < 16 << 10,
            "target {name} received {n} bytes, not only deltas"
        );
    }
    // d fetched v2's chunks: from the origin or from peers that rebuilt them.
    let d = received_by(&report, "d");
    assert!(d > 900 << 10, "target d received {d} bytes");
    // The origin sent the deltas about once, and v2's chunks to d.
    let origin = report["origin_egress_bytes"].as_u64().unwrap();
    assert!(origin < d + (16 << 10), "the origin sent {origin} bytes");
    for i in 0..4 {
        assert_staged_as(&mut fleet, i, "web@2", &v2);
    }
}

#[test]
fn a_delta_that_does_not_rebuild_its_file_is_refused_and_the_chunks_fetched() {
    use convoy_chunker::{file_digest, Patch, PatchConfig, PatchFile};
    use convoy_daemon::store::patch_in_store;

    let (mut fleet, root) = fleet_of(&["a"], &["--delta-bases", "0"]);
    fleet.publish(&version(&root, "v1", None), "web@1");
    let v2 = version(&root, "v2", Some(20_000));
    fleet.publish(&v2, "web@2");
    // Another base: v2 with one byte changed. A delta from it to v2
    // copies nearly all of it; applied to v1, it gives v1's bytes back.
    let v1b = root.join("v1b");
    std::fs::create_dir_all(&v1b).unwrap();
    let mut bytes = std::fs::read(v2.join("app.js")).unwrap();
    bytes[5] ^= 1;
    std::fs::write(v1b.join("app.js"), bytes).unwrap();
    fleet.publish(&v1b, "web@1b");
    fleet.stage_and_wait("web@1", "pull", "name=a");

    // A patch that claims to go from web@1 to web@2, its delta made
    // against web@1b: signed by the origin, as a faulty origin would.
    plant_patch(&mut fleet, &root, |store| {
        let (v1, v1b, v2m) = (web(store, "1"), web(store, "1b"), web(store, "2"));
        let (made, _) = patch_in_store(store, &v1b, &v2m, &PatchConfig::default()).unwrap();
        let v1_files: std::collections::HashMap<&str, &[convoy_chunker::ChunkRef]> =
            v1.files().collect();
        let files: Vec<PatchFile> = made
            .files()
            .iter()
            .map(|f| PatchFile {
                base_digest: file_digest(v1_files[f.base_path.as_str()]),
                ..f.clone()
            })
            .collect();
        assert_eq!(files.len(), 1);
        Patch::new(v1.release_id(), v2m.release_id(), files)
    });
    stage_past_the_patch(&mut fleet, &v2, "cannot rebuild a file from its delta");
}

/// Stops the origin, puts the patch `make` gives into its store, and
/// starts it again: a patch as a faulty origin would have made it.
fn plant_patch(
    fleet: &mut TestFleet,
    root: &Path,
    make: impl FnOnce(&convoy_daemon::store::RocksStore) -> convoy_chunker::Patch,
) {
    use convoy_daemon::store::{RocksStore, Store};
    fleet.coordinator.stop();
    {
        let store = RocksStore::open(&root.join("coordinator/store")).unwrap();
        let patch = make(&store);
        store.put_patch(&patch).unwrap();
        store.flush().unwrap();
    }
    fleet.coordinator.restart();
    fleet.wait_for_targets(1);
}

/// Stages web@2 on target a, which holds web@1 and is sent the planted
/// patch; checks its log says `why` the patch failed, that it fetched
/// the chunks instead, and that it staged v2 bit for bit.
fn stage_past_the_patch(fleet: &mut TestFleet, v2: &Path, why: &str) {
    let report = fleet.stage_and_wait("web@2", "pull", "name=a");
    assert_eq!(report["staged"], 1, "{report}");
    assert_eq!(
        fleet.metric("convoy_delta_orders_total"),
        1,
        "the patch was sent"
    );
    let log = fleet.targets[0].log_text();
    assert!(log.contains(why), "no {why:?} in the log:\n{log}");
    let n = received_by(&report, "a");
    assert!(n > 900 << 10, "a fetched {n} bytes: not the chunks");
    assert_staged_as(fleet, 0, "web@2", v2);
}

#[test]
fn a_patch_whose_deltas_never_come_is_given_up_and_the_chunks_fetched() {
    use convoy_chunker::{ChunkHash, ChunkRef, Patch, PatchFile};

    let (mut fleet, root) = fleet_of(&["a"], &["--delta-bases", "0"]);
    fleet.publish(&version(&root, "v1", None), "web@1");
    let v2 = version(&root, "v2", Some(20_000));
    fleet.publish(&v2, "web@2");
    fleet.stage_and_wait("web@1", "pull", "name=a");

    // A patch whose delta chunk the origin does not hold: asked for, it is
    // answered with nothing, again and again.
    plant_patch(&mut fleet, &root, |store| {
        let (v1m, v2m) = (web(store, "1"), web(store, "2"));
        let (path, base) = v1m.files().next().unwrap();
        let file = PatchFile {
            path: path.to_string(),
            base_path: path.to_string(),
            base_digest: convoy_chunker::file_digest(base),
            delta: vec![ChunkRef {
                hash: ChunkHash::of(b"never stored"),
                len: 100,
            }],
            size: 1 << 20,
            wire_bytes: 1 << 20,
        };
        Patch::new(v1m.release_id(), v2m.release_id(), vec![file])
    });
    stage_past_the_patch(&mut fleet, &v2, "giving the patch up");
}

#[test]
fn an_order_with_a_hostile_patch_record_is_refused_before_any_work() {
    use convoy_chunker::{Patch, PatchFile};
    use convoy_daemon::protocol::{
        signed_bytes, signed_patch_bytes, ControlRequest, ControlResponse, DistributionMode,
        PatchedOrder, StageOrder,
    };
    use convoy_daemon::store::RocksStore;
    use libp2p::identity::Keypair;

    let (mut fleet, root) = fleet_of(&["a"], &["--delta-bases", "0"]);
    fleet.publish(&version(&root, "v1", None), "web@1");
    fleet.publish(&version(&root, "v2", Some(20_000)), "web@2");
    fleet.stage_and_wait("web@1", "pull", "name=a");
    let (v1, v2) = {
        let store = RocksStore::open(&root.join("cli-store")).unwrap();
        (web(&store, "1"), web(&store, "2"))
    };
    fleet.coordinator.stop();
    let coordinator = Keypair::from_protobuf_encoding(
        &std::fs::read(root.join("coordinator/identity.key")).unwrap(),
    )
    .unwrap();
    let (path, chunks) = v1.files().next().unwrap();
    let file = PatchFile {
        path: path.to_string(),
        base_path: path.to_string(),
        base_digest: convoy_chunker::file_digest(chunks),
        delta: vec![chunks[0]],
        size: 1 << 20,
        wire_bytes: 1 << 19,
    };
    let order = |record: Vec<u8>, signed: &[u8]| {
        ControlRequest::StagePatched(PatchedOrder {
            order: StageOrder {
                manifest: v2.encode(),
                signature: coordinator.sign(&signed_bytes(&v2.release_id())).unwrap(),
                mode: DistributionMode::Pull,
                origin_labels: Default::default(),
            },
            manifest_is_delta: false,
            patch_signature: coordinator.sign(signed).unwrap(),
            patch: record,
        })
    };
    let signed = |p: &Patch| order(p.encode(), &signed_patch_bytes(&p.id()));
    let refused =
        |request: ControlRequest, why: &str| match order_as(&fleet, &coordinator, 0, request) {
            ControlResponse::Error(e) => assert!(e.contains(why), "{e}"),
            other => panic!("a hostile patch was answered {other:?}"),
        };
    let patch = |f: PatchFile| Patch::new(v1.release_id(), v2.release_id(), vec![f]);

    // From a member that is not the coordinator: not read at all.
    let member = Keypair::generate_ed25519();
    let answer = order_as(&fleet, &member, 0, signed(&patch(file.clone())));
    assert_eq!(answer, ControlResponse::Denied);
    // Not a record (a record that decodes but breaks its limits, a 1 TiB
    // file say, is refused by the same decoding: see the chunker's tests).
    refused(
        order(b"CVYP garbage".to_vec(), b"x"),
        "refusing the patch record",
    );
    // A good record, signed over another.
    let other = patch(PatchFile {
        size: 2 << 20,
        ..file.clone()
    });
    refused(
        order(
            patch(file.clone()).encode(),
            &signed_patch_bytes(&other.id()),
        ),
        "not signed",
    );
    // Signed, but its file is not one of the release: a path out of it.
    refused(
        signed(&patch(PatchFile {
            path: "../outside".into(),
            ..file.clone()
        })),
        "refusing patch",
    );
    // Signed, its base file another's content.
    refused(
        signed(&patch(PatchFile {
            base_digest: convoy_chunker::ChunkHash([7; 32]),
            ..file.clone()
        })),
        "refusing patch",
    );
    // Signed, from a base the target does not hold.
    refused(
        signed(&Patch::new(
            v2.release_id(),
            v2.release_id(),
            vec![file.clone()],
        )),
        "is not here",
    );
    // None of them was recorded or started.
    let orders = std::fs::read_dir(fleet.target_dir(0).join("staging"))
        .unwrap()
        .count();
    assert_eq!(orders, 0, "an order with a refused patch was recorded");
}

#[test]
fn in_push_mode_a_holder_of_the_base_is_sent_only_the_deltas() {
    let (mut fleet, root) = fleet_of(&["a"], &[]);
    fleet.publish(&version(&root, "v1", None), "web@1");
    fleet.stage_and_wait("web@1", "push", "name=a");
    let v2 = version(&root, "v2", Some(20_000));
    let run = fleet
        .convoy(&["publish", v2.to_str().unwrap(), "web@2", "--wait-deltas"])
        .success();
    assert!(
        run.stderr.contains("deltas made by the origin in")
            && run.stderr.contains("from web@1 (1 file,"),
        "{}",
        run.stderr
    );

    // The origin pushes what the deltas do not rebuild (nothing here); the
    // target pulls the deltas.
    let report = fleet.stage_and_wait("web@2", "push", "name=a");
    assert_eq!(report["staged"], 1, "{report}");
    assert_eq!(fleet.metric("convoy_delta_orders_total"), 1);
    let n = received_by(&report, "a");
    assert!(n < 16 << 10, "a received {n} bytes, not only deltas");
    assert_staged_as(&mut fleet, 0, "web@2", &v2);
}
