//! `convoy sim` through the real binary: every mode, the data centres'
//! imports and the completion CDF.

use convoy_tests::Convoy;

#[test]
fn sim_reports_every_mode_per_data_centre_and_draws_the_cdf() {
    let work = tempfile::tempdir().unwrap();
    let svg = work.path().join("cdf.svg");
    let out = work.path().join("out");
    let run = Convoy::new(&work.path().join("store")).run(&[
        "--json",
        "sim",
        "--nodes",
        "30",
        "--size",
        "2MiB",
        "--dcs",
        "3",
        "--svg",
        svg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.ok, "{}", run.stderr);
    let rows = run.json();
    let rows = rows.as_array().unwrap();
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["swarm", "push", "pull"]);
    for r in rows {
        assert_eq!(r["completed"], 30, "{r}");
        let into = r["cross_dc_bytes_into"].as_array().unwrap();
        assert_eq!(into.len(), 3, "{r}");
        let sum: u64 = into.iter().map(|b| b.as_u64().unwrap()).sum();
        assert_eq!(sum, r["cross_dc_bytes"].as_u64().unwrap(), "{r}");
    }
    // Push and pull send every target everything from the origin; the
    // swarm finishes first.
    let p99 = |i: usize| rows[i]["p99_seconds"].as_f64().unwrap();
    assert!(p99(0) < p99(1) && p99(0) < p99(2), "{rows:?}");
    // The origin's busy answers: none in push, which sends unasked; many
    // in pull, 30 targets asking one uplink.
    let busy = |i: usize| rows[i]["origin_busy_answers"].as_u64().unwrap();
    assert_eq!(busy(1), 0, "{rows:?}");
    assert!(busy(2) > 0, "{rows:?}");
    // Every data centre came to hold the release.
    for r in rows {
        let at = r["dc_complete_seconds"].as_array().unwrap();
        assert!(
            at.len() == 3 && at.iter().all(|t| t.as_f64().is_some()),
            "{r}"
        );
    }
    // --out keeps the same rows with the commit and command, for
    // scripts/benchmarks.py.
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(saved["sim"].as_array().unwrap().len(), 3);
    assert!(saved["meta"]["command"]
        .as_str()
        .unwrap()
        .contains("--dcs 3"));
    assert!(out.join("completion.svg").exists() && out.join("results.md").exists());
    let drawn = std::fs::read_to_string(&svg).unwrap();
    for mode in modes {
        assert!(drawn.contains(mode), "{mode} missing from the SVG");
    }
}

#[test]
fn sim_names_a_bad_mode_once() {
    let work = tempfile::tempdir().unwrap();
    let run = Convoy::new(&work.path().join("store")).run(&["sim", "--modes", "swarm,flood"]);
    assert!(!run.ok);
    assert_eq!(run.stderr.matches("flood").count(), 1, "{}", run.stderr);
}
