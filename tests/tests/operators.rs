//! Operators and targets are different principals. Root on one target has
//! its identity key and the fleet key; with them it may report and exchange
//! chunks, but not publish, upload, ask which chunks the origin lacks,
//! stage, read a staging, list the fleet or call the operator API.

use convoy_chunker::{ChunkHash, Manifest};
use convoy_daemon::net::client::parse_peer_addr;
use convoy_daemon::net::{self, NetConfig, NetEvent};
use convoy_daemon::protocol::{
    operator_proof_bytes, ChunkRequest, ChunkResponse, ControlRequest, ControlResponse,
    DistributionMode, WireChunk,
};
use convoy_tests::{http, Convoy, TestFleet};
use libp2p::identity::Keypair;

fn history(fleet: &TestFleet, app: &str) -> Vec<serde_json::Value> {
    let path = format!("/v1/apps/{app}/history");
    let (status, body) = http(&fleet.api_addr(), "GET", &path, Some(&fleet.api_token()));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["history"].as_array().expect("a history").clone()
}

#[test]
fn a_stolen_target_key_may_not_act_as_an_operator() {
    let mut fleet = TestFleet::new(&[]);
    fleet.add_target(&[]);
    fleet.wait_for_targets(1);
    let pkg = fleet.package("v1", 256 << 10, 3);
    fleet
        .convoy(&["publish", pkg.to_str().unwrap(), "web@1"])
        .success();

    // Root on the target takes its keys.
    fleet.targets[0].stop();
    let stolen = std::fs::read(fleet.target_dir(0).join("identity.key")).expect("identity");
    let identity = Keypair::from_protobuf_encoding(&stolen).expect("an identity");
    let thief = identity.public().to_peer_id();
    let fleet_key = convoy_daemon::fleet_key::read(&fleet.key).expect("fleet key");
    let bytes = b"#!/bin/sh\nevil\n".to_vec();
    let hash = ChunkHash::of(&bytes);
    let manifest = Manifest::new("web", "1.5", vec![])
        .expect("a manifest")
        .encode();
    let refusals_before = fleet.refused("not_operator");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The target's own identity and the fleet key, as its daemon uses them.
        let (coordinator, addr) = parse_peer_addr(&fleet.coordinator.addr).unwrap();
        let (client, mut events) = net::start(NetConfig {
            keypair: identity.clone(),
            listen: Vec::new(),
            fleet_key,
            request_timeout: std::time::Duration::from_secs(30),
            admission_timeout: net::ADMISSION_TIMEOUT,
            security: net::Security::default(),
        })
        .unwrap();
        client.add_addresses(coordinator, vec![addr]).await;
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if let NetEvent::Control { reply, .. } = ev {
                    reply.send(ControlResponse::Denied).await;
                }
            }
        });
        let asks = [
            ("missing-chunks", ControlRequest::MissingChunks(vec![hash])),
            ("publish", ControlRequest::Publish { manifest }),
            (
                "stage",
                ControlRequest::StartStaging {
                    release: "web@1".into(),
                    selector: Default::default(),
                    mode: DistributionMode::Pull,
                },
            ),
            ("staging status", ControlRequest::StagingStatus { id: 1 }),
            ("fleet", ControlRequest::Fleet),
        ];
        for (what, ask) in asks {
            let answer = client.control(coordinator, ask).await.expect("an answer");
            assert_eq!(answer, ControlResponse::Denied, "{what} was not refused");
        }
        let upload = ChunkRequest::Upload {
            hash,
            len: bytes.len() as u32,
            chunk: WireChunk {
                encoding: convoy_chunker::Encoding::Raw.flag(),
                bytes: bytes.clone(),
            },
        };
        let answer = client.chunk(coordinator, upload).await.expect("an answer");
        assert_eq!(answer, ChunkResponse::Denied, "upload was not refused");
        // Nor can the target's key open an operator session for itself.
        let proof = operator_proof_bytes(&thief.to_bytes(), &coordinator.to_bytes());
        let session = ControlRequest::Operator {
            public_key: identity.public().encode_protobuf(),
            signature: identity.sign(&proof).unwrap(),
        };
        let answer = client
            .control(coordinator, session)
            .await
            .expect("an answer");
        assert_eq!(
            answer,
            ControlResponse::Denied,
            "the target's key opened a session"
        );
        // Nor with a listed operator's proof for another session (replayed):
        // the signature covers the session's own id.
        let operator_key = fleet.coordinator.ready["operator_key_file"]
            .as_str()
            .unwrap();
        let operator =
            convoy_daemon::coordinator::operators::read_key(std::path::Path::new(operator_key))
                .unwrap();
        let elsewhere = Keypair::generate_ed25519().public().to_peer_id();
        let replayed = operator_proof_bytes(&elsewhere.to_bytes(), &coordinator.to_bytes());
        let session = ControlRequest::Operator {
            public_key: operator.public().encode_protobuf(),
            signature: operator.sign(&replayed).unwrap(),
        };
        let answer = client
            .control(coordinator, session)
            .await
            .expect("an answer");
        assert_eq!(
            answer,
            ControlResponse::Denied,
            "a replayed proof opened a session"
        );
        client.shutdown().await;
    });

    assert_eq!(fleet.refused("not_operator"), refusals_before + 8);
    let log = fleet.coordinator.log_text();
    for what in ["publish", "upload", "missing-chunks", "stage", "fleet"] {
        assert!(
            log.lines().any(|l| l.contains("not an operator")
                && l.contains(&thief.to_string())
                && l.contains(what)),
            "no refusal of {what} by {thief} logged:\n{log}"
        );
    }
    // Nothing it sent took effect: web@1.5 was never published, the chunk
    // never stored.
    let history = history(&fleet, "web");
    assert!(history.iter().all(|h| h["version"] != "1.5"), "{history:?}");
    let held = fleet.convoy(&["stage", "web@1.5", "--mode", "pull"]);
    assert!(
        !held.ok && held.stderr.contains("not published"),
        "{}",
        held.stderr
    );

    // Neither the fleet key nor no token opens any API route.
    let bad_tokens_before = fleet.refused("bad_token");
    let wrong = std::fs::read_to_string(&fleet.key).unwrap();
    let routes = [
        ("GET", "/v1/pipelines"),
        ("POST", "/v1/promotions"),
        ("POST", "/v1/deployments"),
        ("GET", "/v1/deployments"),
        ("GET", "/v1/deployments/1"),
        ("POST", "/v1/deployments/1/pause"),
        ("POST", "/v1/deployments/1/resume"),
        ("POST", "/v1/deployments/1/abort"),
        ("POST", "/v1/rollbacks"),
        ("GET", "/v1/apps/web/history"),
        ("GET", "/v1/fleet"),
        ("GET", "/metrics"),
    ];
    for (method, path) in routes {
        for token in [None, Some(wrong.trim())] {
            let (status, body) = http(&fleet.api_addr(), method, path, token);
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
        }
    }
    assert_eq!(
        fleet.refused("bad_token"),
        bad_tokens_before + 2 * routes.len() as u64
    );
}

#[test]
fn an_operator_key_listed_by_name_may_publish_and_stage_and_history_names_it() {
    let keys = tempfile::tempdir().unwrap();
    let cli = Convoy::new(&keys.path().join("store"));
    let key_file = keys.path().join("alice.key");
    let made = cli
        .run(&["keygen", key_file.to_str().unwrap(), "--json"])
        .success()
        .json();
    let alice = made["operator_id"].as_str().expect("an id").to_string();
    let list = keys.path().join("operators");
    std::fs::write(&list, format!("# who may publish\nalice {alice}\n")).unwrap();

    let mut fleet = TestFleet::new(&["--operators", list.to_str().unwrap()]);
    assert!(
        fleet.coordinator.ready.get("operator_key_file").is_none(),
        "a coordinator with an operators file made a key of its own"
    );
    fleet.add_target(&[]);
    let as_alice = |args: &[&str]| fleet.convoy_as(key_file.to_str().unwrap(), args);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while as_alice(&["fleet", "--json"]).success().json()["targets"]
        .as_array()
        .is_none_or(|t| t.is_empty())
    {
        assert!(std::time::Instant::now() < deadline, "no target registered");
    }
    let pkg = fleet.package("v1", 256 << 10, 4);
    as_alice(&["publish", pkg.to_str().unwrap(), "web@1"]).success();
    as_alice(&["stage", "web@1", "--mode", "pull", "--wait"]).success();

    // An unlisted key is refused with a message that says why.
    let bob = keys.path().join("bob.key");
    cli.run(&["keygen", bob.to_str().unwrap()]).success();
    let refused_run = fleet.convoy_as(bob.to_str().unwrap(), &["fleet"]);
    assert!(!refused_run.ok);
    assert!(
        refused_run.stderr.contains("not in its operators file"),
        "{}",
        refused_run.stderr
    );

    let history = history(&fleet, "web");
    let by = format!("operator alice ({alice})");
    for action in ["publish", "stage"] {
        assert!(
            history
                .iter()
                .any(|h| h["action"] == action && h["by"] == by.as_str()),
            "no {action} by {by} in {history:?}"
        );
    }
}
