//! `convoy load-test` at a small scale: the harness, and the coordinator
//! it loads, end to end.

use convoy_tests::Convoy;

#[test]
fn a_small_load_test_registers_stages_and_rolls_out_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let convoy = Convoy::new(dir.path());
    // 40 targets at most 20 reports a second between them: every 2 s each.
    let run = convoy.ok(&[
        "load-test",
        "--targets",
        "40",
        "--workers",
        "2",
        "--window",
        "2",
        "--stage-seconds",
        "0.3",
        "--waves",
        "25%,100%",
        "--max-reports-per-second",
        "20",
        "--json",
    ]);
    let v = run.json();
    let row = &v["rows"][0];
    assert_eq!(row["targets"], 40, "{row}");
    assert_eq!(
        row["heartbeat_ms"], 2000,
        "the cadence was not spread: {row}"
    );
    let rate = row["reports_per_s"].as_f64().unwrap();
    assert!((10.0..=30.0).contains(&rate), "{rate} reports/s");
    assert_eq!(row["report_failures"], 0, "{row}");
    assert_eq!(row["rollout_outcome"], "succeeded", "{row}");
    assert_eq!(row["wave_targets"], serde_json::json!([10, 30]), "{row}");
    // A wave whose orders did not all arrive is infinite (null in JSON).
    for key in ["stage_orders_s", "peer_lists_s", "staged_s"] {
        assert!(row[key].as_f64().is_some_and(|s| s > 0.0), "{key}: {row}");
    }
    for w in row["wave_orders_s"].as_array().unwrap() {
        assert!(
            w.as_f64().is_some(),
            "a wave's orders never all arrived: {row}"
        );
    }
    assert!(
        row["restart_s"].as_f64().is_some_and(|s| s > 0.0),
        "not every target came back after the restart: {row}"
    );
    let listed = row["fleet_api_s"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{row}");
    assert!(row["rss_bytes"].as_u64().unwrap() > 0, "{row}");
}
