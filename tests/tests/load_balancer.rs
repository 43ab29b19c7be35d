//! Zero downtime behind a real load balancer: `convoy demo --lb` puts
//! HAProxy in front of a fleet whose targets each run a web app from the
//! released package, drives load through it with wrk, and rolls out three
//! times — rolling, blue-green, and a release whose validate hook fails
//! and rolls back. No request may fail, and the versions HAProxy serves
//! must follow each strategy.
//!
//! Needs haproxy and wrk on PATH; skipped without them unless
//! `CONVOY_REQUIRE_LB` is set (as `.ci/run` sets it, having installed
//! them).

use std::process::Command;

use convoy_tests::bin_dir;
use serde_json::Value;

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

#[test]
fn three_roll_outs_behind_haproxy_fail_no_request_and_serve_what_each_strategy_says() {
    if !(on_path("haproxy") && on_path("wrk")) {
        assert!(
            std::env::var_os("CONVOY_REQUIRE_LB").is_none(),
            "haproxy and wrk are not on PATH"
        );
        eprintln!("no haproxy or wrk here: skipped");
        return;
    }
    let bin = bin_dir();
    let logs = tempfile::tempdir().unwrap();
    let out = Command::new(bin.join("convoy"))
        .args(["demo", "--lb", "--json", "--nodes", "6", "--size", "1MiB"])
        .arg("--logs")
        .arg(logs.path())
        .output()
        .expect("convoy demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs_of = || {
        let mut text = String::new();
        for e in std::fs::read_dir(logs.path()).unwrap().flatten() {
            let body = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(15).collect();
            text.push_str(&format!("--- {}\n", e.path().display()));
            for l in tail.iter().rev() {
                text.push_str(l);
                text.push('\n');
            }
        }
        text
    };
    assert!(
        out.status.success(),
        "convoy demo --lb failed:\n{stderr}\n{stdout}\n{}",
        logs_of()
    );
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON document");
    let wrk = &v["load_balancer"]["wrk"];
    let requests = wrk["requests"].as_u64().unwrap();
    assert!(requests > 0, "wrk sent nothing: {wrk}");
    assert_eq!(wrk["failed"], 0, "failed requests: {wrk}");
    let rows = v["deployments"].as_array().unwrap();
    let row = |version: &str| {
        rows.iter()
            .find(|r| r["version"] == version)
            .unwrap_or_else(|| panic!("no web@{version} in {v}"))
    };
    let served = |version: &str, when: &str| -> Vec<String> {
        let s = &row(version)["served"][when];
        assert_eq!(s["failed"], 0, "web@{version} {when}: {s}");
        s["versions"].as_object().unwrap().keys().cloned().collect()
    };
    // 0.9 live before the load; 1.0 rolling: both served during, then 1.0.
    assert_eq!(row("0.9")["result"], "succeeded");
    assert_eq!(row("1.0")["result"], "succeeded");
    assert_eq!(served("1.0", "during"), ["0.9", "1.0"]);
    assert_eq!(served("1.0", "after"), ["1.0"]);
    // 1.1 blue-green: only the new one after the swap.
    assert_eq!(row("1.1")["result"], "succeeded");
    assert_eq!(served("1.1", "after"), ["1.1"]);
    // 1.2 fails its validation: rolled back, only 1.1 after (and never
    // served while it ran: its target was out of load).
    assert_eq!(row("1.2")["result"], "rolled_back");
    assert_eq!(served("1.2", "during"), ["1.1"]);
    assert_eq!(served("1.2", "after"), ["1.1"]);
}
