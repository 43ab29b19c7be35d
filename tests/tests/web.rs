//! The coordinator's web view in a real browser: `tests/web/view.mjs`
//! drives headless Chromium (Playwright) against a local fleet — a
//! roll-out watched to `succeeded`, one paused and resumed from the page,
//! a failing release shown `rolled_back`, an environment rolled back from
//! the page — and saves a screenshot at each step under
//! `target/<profile>/test-artefacts/web/`.
//!
//! Needs Chromium (`/usr/bin/chromium`) and `tests/web/node_modules`
//! (`npm ci --prefix tests/web`, which `scripts/test.sh` runs); skipped
//! without them unless `CONVOY_REQUIRE_WEB` is set (as `.ci/run` sets it).

use std::path::Path;
use std::process::Command;

use convoy_tests::{bin_dir, TestFleet};

const PIPELINES: &str = r#"
[environments.production]
selector = "env=production"

[apps.web]
pipeline = ["production"]

[apps.web.rollout]
strategy = "live"
waves = "100%"
mode = "swarm"
drain_seconds = 0.1
progress_deadline_seconds = 20
"#;

#[test]
fn an_operator_watches_pauses_and_rolls_back_in_the_web_view() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !(Path::new(&chromium).is_file() && web.join("node_modules/playwright-core").is_dir()) {
        assert!(
            std::env::var_os("CONVOY_REQUIRE_WEB").is_none(),
            "no {chromium} or no {}/node_modules (npm ci --prefix tests/web)",
            web.display()
        );
        eprintln!("no Chromium or Playwright here: skipped");
        return;
    }
    let mut fleet = TestFleet::with_pipelines(PIPELINES, &[]);
    for i in 0..4 {
        fleet.add_target(&[
            "--label",
            "env=production",
            "--label",
            &format!("dc=dc{}", i % 2),
        ]);
    }
    fleet.wait_for_targets(4);
    let validate = r#"grep -q "web $CONVOY_VERSION" "$CONVOY_RELEASE_DIR/index.html""#;
    for (v, check) in [
        ("1", validate),
        ("2", validate),
        ("3", "echo 'web 3 answers 500' >&2; exit 1"),
    ] {
        let dir = fleet.web_app(v, None, None, Some(check));
        fleet
            .convoy(&["publish", dir.to_str().unwrap(), &format!("web@{v}")])
            .success();
    }
    let shots = bin_dir().join("test-artefacts/web");
    let _ = std::fs::remove_dir_all(&shots);
    let out = Command::new("node")
        .arg(web.join("view.mjs"))
        .env("CONVOY_URL", format!("http://{}", fleet.api_addr()))
        .env("CONVOY_TOKEN", fleet.api_token())
        .env("CONVOY_SHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the web view failed (screenshots in {}):\n{stdout}\n{stderr}",
        shots.display()
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(seen["dcs"], serde_json::json!([["dc0", 2], ["dc1", 2]]));
    for shot in seen["shots"].as_array().expect("shots") {
        let path = shot.as_str().unwrap();
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "{path}: {len} bytes");
        eprintln!("screenshot: {path}");
    }
    // Every target ends where the page's rollback put it.
    for i in 0..4 {
        assert_eq!(fleet.current(i, "web").as_deref(), Some("1"), "target-{i}");
    }
}
