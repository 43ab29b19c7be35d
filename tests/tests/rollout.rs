//! Roll-outs with real processes: a coordinator with a pipelines file,
//! targets with health endpoints, the operator commands over the API.

use convoy_tests::{http, TestFleet};
use serde_json::Value;

const PRODUCTION: &str = r#"
[environments.production]
selector = "env=production"
blue_green = true

[apps.web]
pipeline = ["production"]

[apps.web.rollout]
strategy = "live"
waves = "100%"
mode = "push"
drain_seconds = 0.1
progress_deadline_seconds = 20
"#;

/// A fleet of `n` production targets, alternately blue and green.
fn fleet(n: usize, pipelines: &str) -> TestFleet {
    let mut f = TestFleet::with_pipelines(pipelines, &[]);
    for i in 0..n {
        let slice = if i % 2 == 0 {
            "slice=blue"
        } else {
            "slice=green"
        };
        f.add_target(&["--label", "env=production", "--label", slice]);
    }
    f.wait_for_targets(n);
    f
}

const VALIDATE_OK: &str = r#"grep -q "web $CONVOY_VERSION" "$CONVOY_RELEASE_DIR/index.html""#;

fn publish(f: &TestFleet, version: &str, validate: &str) {
    publish_with(f, version, None, validate)
}

fn publish_with(f: &TestFleet, version: &str, after_activate: Option<&str>, validate: &str) {
    let dir = f.web_app(version, None, after_activate, Some(validate));
    let release = format!("web@{version}");
    f.convoy(&["publish", dir.to_str().unwrap(), &release])
        .success();
}

/// Starts a roll-out without following it; returns its id.
fn start(f: &TestFleet, version: &str, args: &[&str]) -> u64 {
    let release = format!("web@{version}");
    let mut all = vec!["deploy", release.as_str(), "--env", "production", "--json"];
    all.extend_from_slice(args);
    f.operator(&all).success().json()["id"]
        .as_u64()
        .expect("an id")
}

/// Every target's `current` link, health status and health body agree on
/// `version`, and the status says in load or not.
fn assert_on(f: &TestFleet, i: usize, version: &str, in_load: bool) {
    let (status, body) = f.health(i);
    assert_eq!(
        f.current(i, "web").as_deref(),
        Some(version),
        "target {i}'s link"
    );
    assert_eq!(
        body["active"]["web"], version,
        "target {i}'s health body: {body}"
    );
    assert_eq!(
        status,
        if in_load { 200 } else { 503 },
        "target {i}: {body}"
    );
    assert_eq!(body["in_load"], in_load);
}

fn delivered(v: &Value) -> usize {
    v["target_states"].as_object().map_or(0, |t| {
        t.values().filter(|t| t["state"] == "Delivered").count()
    })
}

#[test]
fn every_strategy_goes_live_and_the_health_endpoint_follows() {
    let f = fleet(4, PRODUCTION);
    publish(&f, "1", VALIDATE_OK);
    let (code, v) = f.deploy_web("1", &["--strategy", "live", "--waves", "50%,100%"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["outcome"], "succeeded");
    for i in 0..4 {
        assert_on(&f, i, "1", true);
    }

    publish(&f, "2", VALIDATE_OK);
    let (code, v) = f.deploy_web(
        "2",
        &[
            "--strategy",
            "rolling",
            "--waves",
            "1,100%",
            "--drain",
            "0.2",
        ],
    );
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["waves"].as_array().map(Vec::len), Some(2));
    for i in 0..4 {
        assert_on(&f, i, "2", true);
    }

    // Both slices are in load: blue counts as live, green gets v3.
    publish(&f, "3", VALIDATE_OK);
    let (code, v) = f.deploy_web("3", &["--strategy", "blue-green", "--mode", "swarm"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["live_slice"], "Green");
    for i in 0..4 {
        if i % 2 == 1 {
            assert_on(&f, i, "3", true);
        } else {
            assert_on(&f, i, "2", false);
        }
    }

    // Blue-green rollback swaps the slices back: blue kept v2.
    let r = f
        .operator(&["rollback", "web", "--env", "production", "--json"])
        .success()
        .json();
    assert_eq!(r["failed"], serde_json::json!({}), "{r}");
    for i in 0..4 {
        if i % 2 == 0 {
            assert_on(&f, i, "2", true);
        } else {
            assert_on(&f, i, "3", false);
        }
    }

    let h = f.operator(&["history", "web", "--json"]).success().json();
    let actions: Vec<&str> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "publish", "deploy", "finished", "publish", "deploy", "finished", "publish", "deploy",
            "finished", "rollback"
        ]
    );
    let publisher = h["history"][0]["by"].as_str().unwrap();
    assert!(publisher.starts_with("operator local (12D3"), "{publisher}");
    let deployer = h["history"][1]["by"].as_str().unwrap();
    assert!(
        deployer.starts_with("token api-token from 127.0.0.1:"),
        "{deployer}"
    );
    assert_eq!(h["history"][2]["by"], "coordinator");
}

/// An environment behind a load balancer: the drain and the wait after
/// it follow its checks, and a drain too short for them is warned of.
#[test]
fn a_load_balancers_checks_set_the_drain_and_a_shorter_one_is_warned_of() {
    let pipelines = PRODUCTION.replace(
        "blue_green = true\n",
        "blue_green = true\n[environments.production.load_balancer]\n\
         check_interval_seconds = 0.1\nfall = 2\nrise = 3\n",
    );
    // The app's own default would be 0.1 s: too short for 2 checks.
    let pipelines = pipelines.replace("drain_seconds = 0.1\n", "");
    let f = fleet(2, &pipelines);
    publish(&f, "1", VALIDATE_OK);
    let (code, v) = f.deploy_web("1", &["--strategy", "rolling", "--drain", "0.1"]);
    assert_eq!(code, Some(0), "{v}");
    let warnings: Vec<&str> = v["notices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["notice"]["Warning"].as_str())
        .collect();
    assert_eq!(warnings.len(), 1, "{v}");
    assert!(
        warnings[0].contains("2 failed checks 0.1 s apart: 0.2 s"),
        "{}",
        warnings[0]
    );
    let text = f.operator(&["status", &v["id"].to_string()]).success();
    assert!(
        text.stdout.contains("warning: the drain (0.1 s)"),
        "{}",
        text.stdout
    );
    // Without --drain: (fall + 1) × interval, and rise × interval after.
    publish(&f, "2", VALIDATE_OK);
    let (code, v) = f.deploy_web("2", &["--strategy", "rolling"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["drain_seconds"], 0.3, "{v}");
    assert_eq!(v["settle_seconds"], 0.3, "{v}");
    assert!(
        !v["notices"].to_string().contains("Warning"),
        "{}",
        v["notices"]
    );
    for i in 0..2 {
        assert_on(&f, i, "2", true);
    }
}

#[test]
fn past_the_failure_threshold_every_target_goes_back() {
    let f = fleet(4, PRODUCTION);
    publish(&f, "1", VALIDATE_OK);
    assert_eq!(f.deploy_web("1", &[]).0, Some(0));
    // v2 fails validation on target-2 only: the others activate it first
    // (or after), and all must end on v1.
    publish(
        &f,
        "2",
        r#"case "$CONVOY_RELEASE_DIR" in */target-2/*) echo "500 on /healthz" >&2; exit 1;; esac"#,
    );
    let (code, v) = f.deploy_web(
        "2",
        &[
            "--strategy",
            "rolling",
            "--waves",
            "1,2,3,4",
            "--drain",
            "0.1",
        ],
    );
    assert_eq!(code, Some(2), "rolled back: {v}");
    assert_eq!(v["outcome"], "rolled_back");
    assert_eq!(v["failures"], 1);
    let notices = v["notices"].to_string();
    assert!(notices.contains("500 on /healthz"), "{notices}");
    assert!(notices.contains("Halted"), "{notices}");
    for i in 0..4 {
        assert_on(&f, i, "1", true);
    }
}

#[test]
fn pause_resume_abort_and_one_roll_out_at_a_time() {
    let f = fleet(3, PRODUCTION);
    publish(&f, "1", VALIDATE_OK);
    assert_eq!(f.deploy_web("1", &[]).0, Some(0));
    publish(&f, "2", VALIDATE_OK);
    let id = start(
        &f,
        "2",
        &[
            "--strategy",
            "rolling",
            "--waves",
            "1,2,3",
            "--drain",
            "0.5",
        ],
    );
    f.operator(&["pause", &id.to_string()]).success();
    let v = f.wait_status(id, "a pause", |v| v["phase"].get("Paused").is_some());
    let wave = v["phase"]["Paused"].as_u64().unwrap() as usize;
    // Paused before wave `wave`: exactly the earlier waves delivered.
    assert_eq!(delivered(&v), wave, "{v}");
    let on_v2 = (0..3)
        .filter(|i| f.current(*i, "web").as_deref() == Some("2"))
        .count();
    assert_eq!(on_v2, wave);

    // A second roll-out of the app to the environment is refused.
    publish(&f, "3", VALIDATE_OK);
    let refused = f.operator(&["deploy", "web@3", "--env", "production"]);
    assert!(!refused.ok);
    assert!(
        refused.stderr.contains(&format!("deployment {id}")) && refused.stderr.contains("running"),
        "{}",
        refused.stderr
    );

    f.operator(&["resume", &id.to_string()]).success();
    let v = f.wait_status(id, "the end", |v| v["outcome"].is_string());
    assert_eq!(v["outcome"], "succeeded", "{v}");
    for i in 0..3 {
        assert_on(&f, i, "2", true);
    }

    // Abort after the first wave: every target ends on v2 again.
    let id = start(
        &f,
        "3",
        &[
            "--strategy",
            "rolling",
            "--waves",
            "1,2,3",
            "--drain",
            "0.5",
        ],
    );
    f.wait_status(id, "a delivered target", |v| delivered(v) >= 1);
    f.operator(&["abort", &id.to_string()]).success();
    let v = f.wait_status(id, "the end", |v| v["outcome"].is_string());
    assert_eq!(v["outcome"], "aborted", "{v}");
    for i in 0..3 {
        assert_on(&f, i, "2", true);
    }
    let steer = f.operator(&["resume", &id.to_string()]);
    assert!(
        !steer.ok && steer.stderr.contains("has ended"),
        "{}",
        steer.stderr
    );
}

#[test]
fn a_restarted_coordinator_finishes_the_roll_out() {
    let mut f = fleet(3, PRODUCTION);
    publish(&f, "1", VALIDATE_OK);
    assert_eq!(f.deploy_web("1", &[]).0, Some(0));
    publish(&f, "2", VALIDATE_OK);
    let id = start(
        &f,
        "2",
        &["--strategy", "rolling", "--waves", "1,2,3", "--drain", "1"],
    );
    f.wait_status(id, "a delivered target", |v| delivered(v) >= 1);
    f.coordinator.kill();
    f.coordinator.restart();
    let v = f.wait_status(id, "the end", |v| v["outcome"].is_string());
    assert_eq!(v["outcome"], "succeeded", "{v}");
    for i in 0..3 {
        assert_on(&f, i, "2", true);
    }
    // What happened before the restart was replayed from the store.
    let notices = v["notices"].to_string();
    assert!(notices.contains("\"Distributed\""), "{notices}");
    assert!(notices.contains("\"WaveDone\""), "{notices}");
}

#[test]
fn a_target_killed_mid_activation_comes_back_whole_and_consistent() {
    let mut f = fleet(2, PRODUCTION);
    publish(&f, "1", VALIDATE_OK);
    assert_eq!(f.deploy_web("1", &[]).0, Some(0));
    // On target-1, after_activate (after the switch) marks that it runs
    // and waits, so the test can kill the daemon there.
    publish_with(
        &f,
        "2",
        Some(
            r#"case "$CONVOY_RELEASE_DIR" in */target-1/*)
  touch "$CONVOY_RELEASE_DIR/../../../activating"
  for i in $(seq 1 300); do kill -0 $PPID 2>/dev/null || exit 1; sleep 0.1; done;;
esac"#,
        ),
        VALIDATE_OK,
    );
    let id = start(&f, "2", &["--waves", "100%", "--progress-deadline", "1.5"]);
    let marker = f.target_dir(1).join("activating");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "target-1 never ran after_activate"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    f.targets[1].kill();
    // Killed after the switch: the link names v2 whole.
    assert_eq!(f.current(1, "web").as_deref(), Some("2"));
    f.targets[1].restart();
    // Its report and its health endpoint say what its link says, and the
    // roll-out (which gave up on it and halted) brings it back to v1.
    let v = f.wait_status(id, "the end", |v| v["outcome"].is_string());
    assert_eq!(v["outcome"], "rolled_back", "{v}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let link = f.current(1, "web");
        let (_, body) = f.health(1);
        if f.current(1, "web") == link {
            assert_eq!(
                body["active"]["web"].as_str(),
                link.as_deref(),
                "health and link agree"
            );
        }
        if link.as_deref() == Some("1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "target-1 stayed on {link:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for i in 0..2 {
        assert_on(&f, i, "1", true);
    }
}

#[test]
fn promotion_follows_the_pipeline_and_force_is_recorded() {
    let f = {
        let mut f = TestFleet::with_pipelines(
            r#"
[environments.staging]
selector = "env=staging"
[environments.production]
selector = "env=production"
[apps.web]
pipeline = ["staging", "production"]
[apps.web.rollout]
strategy = "live"
mode = "pull"
"#,
            &[],
        );
        f.add_target(&["--label", "env=staging"]);
        f.add_target(&["--label", "env=production"]);
        f.wait_for_targets(2);
        f
    };
    publish(&f, "1", VALIDATE_OK);
    let refused = f.operator(&["deploy", "web@1", "--env", "production"]);
    assert!(
        !refused.ok && refused.stderr.contains("not promoted"),
        "{}",
        refused.stderr
    );
    let refused = f.operator(&["promote", "web@1", "--to", "production"]);
    assert!(
        !refused.ok && refused.stderr.contains("must succeed in staging"),
        "{}",
        refused.stderr
    );
    let run = f.operator(&["deploy", "web@1", "--env", "staging", "--follow"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(f.current(0, "web").as_deref(), Some("1"));
    assert_eq!(f.current(1, "web"), None, "production untouched");
    f.operator(&["promote", "web@1", "--to", "production"])
        .success();
    let run = f.operator(&["deploy", "web@1", "--env", "production", "--follow"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(f.current(1, "web").as_deref(), Some("1"));

    publish(&f, "2", VALIDATE_OK);
    let p = f
        .operator(&[
            "promote",
            "web@2",
            "--to",
            "production",
            "--force",
            "--json",
        ])
        .success()
        .json();
    assert_eq!(p["forced"], true);
    let h = f.operator(&["history", "web", "--json"]).success().json();
    let forced = h["history"].as_array().unwrap().iter().any(|e| {
        e["action"] == "promote"
            && e["version"] == "2"
            && e["detail"].as_str().unwrap().contains("forced")
    });
    assert!(forced, "{h}");
    assert_eq!(h["promotions"].as_array().map(Vec::len), Some(2));
}

#[test]
fn the_api_refuses_requests_without_the_token() {
    let f = fleet(1, PRODUCTION);
    let addr = f.api_addr();
    for path in ["/v1/deployments", "/metrics", "/v1/fleet"] {
        let (status, body) = http(&addr, "GET", path, None);
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _) = http(&addr, "GET", path, Some("not-the-token"));
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = http(&addr, "POST", "/v1/deployments/1/abort", None);
    assert_eq!(status, 401);
    let token = f.api_token();
    let (status, body) = http(&addr, "GET", "/metrics", Some(&token));
    assert_eq!(status, 200);
    assert!(
        body.contains("convoy_targets{state=\"in_load\"} 1"),
        "{body}"
    );
    let (status, body) = http(&addr, "GET", "/v1/pipelines", Some(&token));
    assert_eq!(status, 200);
    assert!(body.contains("production"), "{body}");

    let cli = convoy_tests::Convoy::new(&f.path().join("cli-store"));
    let api = format!("http://{addr}");
    let run = cli.run(&["--api", &api, "status"]);
    assert!(
        !run.ok && run.stderr.contains("no API token"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_demo_runs_three_roll_outs_and_leaves_nothing_behind() {
    let store = tempfile::tempdir().unwrap();
    let cli = convoy_tests::Convoy::new(store.path());
    let logs = store.path().join("logs");
    let run = cli.run(&[
        "demo",
        "--nodes",
        "4",
        "--size",
        "1MiB",
        "--json",
        "--logs",
        logs.to_str().unwrap(),
    ]);
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    let v = run.json();
    let results: Vec<(&str, &str, &str, &str)> = v["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["version"].as_str().unwrap(),
                d["strategy"].as_str().unwrap(),
                d["mode"].as_str().unwrap(),
                d["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("1.0", "rolling", "swarm", "succeeded"),
            ("1.1", "blue-green", "push", "succeeded"),
            ("1.2", "rolling", "swarm", "rolled_back"),
        ]
    );
    for d in v["deployments"].as_array().unwrap() {
        assert!(d["distribution_seconds"].as_f64().is_some(), "{d}");
        assert!(d["delivery_seconds"].as_f64().is_some(), "{d}");
        assert!(d["bytes_moved"].as_u64().unwrap() > 0, "{d}");
    }
    // The patch moved far less than the first release.
    let moved = |i: usize| v["deployments"][i]["bytes_moved"].as_u64().unwrap();
    assert!(moved(1) * 4 < moved(0), "{v}");
    assert_eq!(
        v["fleet"],
        "health 200 (in load): 2× web@1.1 green; 503 (drained): 2× web@1.0 blue"
    );
    // Every daemon it started has exited, and its directory is gone.
    assert_eq!(
        std::fs::read_dir(&logs).unwrap().count(),
        5,
        "a log per daemon"
    );
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("convoyd") && cmdline.contains("convoy-demo-") {
            left.push(cmdline);
        }
    }
    assert!(left.is_empty(), "still running: {left:?}");
    let dirs = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("convoy-demo-"))
        .count();
    assert_eq!(dirs, 0, "the demo's directory is removed");
}
