//! Data centres joined by real links: a fleet in network namespaces (one
//! per data centre, joined through a backbone by capped veth links), and
//! what a partition does to a staging and to a roll-out.
//!
//! Needs root and iproute2; skipped without them unless
//! `CONVOY_REQUIRE_NETNS` is set (as `.ci/run` sets it).

use std::time::{Duration, Instant};

use convoy_benches::netns::Lab;
use convoy_tests::TestFleet;
use serde_json::Value;

/// One test at a time: each runs a fleet that keeps this machine's two
/// cores busy, and the bench's test checks its namespaces are gone, which
/// another test's lab could take the slot of.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this machine can make a lab; if not, the test may skip.
fn can_make_labs() -> bool {
    match Lab::new(1, None) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CONVOY_REQUIRE_NETNS").is_none(),
                "cannot make a network lab: {e:#}"
            );
            eprintln!("no network lab here ({e:#}): skipped");
            false
        }
    }
}

/// A lab of `dcs` data centres with links capped at `rate` bytes/s, or
/// `None` where this machine cannot make one (and the test may skip).
fn lab(dcs: usize, rate: u64) -> Option<Lab> {
    match Lab::new(dcs, Some(rate)) {
        Ok(lab) => Some(lab),
        Err(e) => {
            assert!(
                std::env::var_os("CONVOY_REQUIRE_NETNS").is_none(),
                "cannot make a network lab: {e:#}"
            );
            eprintln!("no network lab here ({e:#}): skipped");
            None
        }
    }
}

/// Polls (bounded: 90 s) `convoy staging ID --json` until `done` says so.
fn wait_staging(fleet: &TestFleet, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let run = fleet.convoy(&["staging", id, "--json"]);
        if run.ok {
            let v = run.json();
            if done(&v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen in 90 s: {}{}",
            run.stdout,
            run.stderr
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The entries of `per_target` whose peers are in data centre `dc`.
fn in_dc<'a>(status: &'a Value, fleet: &TestFleet, dc: &[usize]) -> Vec<&'a Value> {
    let peers: Vec<&str> = dc
        .iter()
        .map(|i| fleet.targets[*i].peer_id.as_str())
        .collect();
    status["per_target"]
        .as_array()
        .expect("per_target")
        .iter()
        .filter(|t| peers.contains(&t["peer_id"].as_str().unwrap_or_default()))
        .collect()
}

fn staged(t: &Value) -> bool {
    t["state"] == "staged"
}

/// Six targets, two in each of three data centres, the coordinator in dc0.
fn fleet_of_three_dcs(lab: &Lab, coordinator: &[&str]) -> TestFleet {
    let mut fleet = TestFleet::in_lab(lab, coordinator);
    for i in 0..6 {
        let dc = i / 2;
        fleet.add_target_in(
            dc,
            &[
                "--label",
                &format!("dc=dc{dc}"),
                "--label",
                "env=production",
            ],
        );
    }
    fleet.wait_for_targets(6);
    fleet
}

#[test]
fn a_data_centre_cut_off_mid_staging_finishes_after_without_refetching() {
    let _one = serial();
    let Some(lab) = lab(3, 2 << 20) else { return };
    let fleet = fleet_of_three_dcs(&lab, &["--label", "dc=dc0"]);
    let pkg = fleet.package("v1", 12 << 20, 5);
    fleet.publish(&pkg, "web@1");
    let before = lab.link_bytes().unwrap();
    let started = fleet
        .convoy(&["stage", "web@1", "--mode", "swarm", "--json"])
        .success()
        .json();
    let id = started["staging"].to_string();
    let far = [4, 5];
    // Cut dc2 off once both its targets hold a quarter of the release.
    let at_cut = wait_staging(&fleet, &id, "dc2 holding a quarter", |s| {
        in_dc(s, &fleet, &far).iter().all(|t| {
            t["chunks_held"].as_u64().unwrap_or(0) * 4 >= t["chunks_total"].as_u64().unwrap()
        })
    });
    let t0 = Instant::now();
    lab.set_link(2, false).unwrap();
    let held: Vec<u64> = in_dc(&at_cut, &fleet, &far)
        .iter()
        .map(|t| t["chunks_held"].as_u64().unwrap())
        .collect();
    let total = at_cut["per_target"][0]["chunks_total"].as_u64().unwrap();
    assert!(
        held.iter().all(|h| *h < total),
        "dc2 finished before the cut: {held:?} of {total}"
    );
    // The others finish while dc2 is cut off.
    let cut = wait_staging(&fleet, &id, "dc0 and dc1 staged", |s| {
        in_dc(s, &fleet, &[0, 1, 2, 3]).iter().all(|t| staged(t))
    });
    for t in in_dc(&cut, &fleet, &far) {
        assert!(!staged(t), "a target of the cut dc2 staged: {t}");
    }
    eprintln!("others staged {:?} after the cut", t0.elapsed());
    lab.set_link(2, true).unwrap();
    let t1 = Instant::now();
    let done = wait_staging(&fleet, &id, "dc2 staged after the link came back", |s| {
        s["staged"] == 6
    });
    eprintln!("dc2 staged {:?} after the link came back", t1.elapsed());
    // Each dc2 target received about the release once: had it fetched
    // again what it held at the cut (a quarter at least), it would have
    // received a quarter more.
    let release = done["release_bytes"].as_u64().unwrap();
    for t in in_dc(&done, &fleet, &far) {
        let got = t["bytes_received"].as_u64().unwrap();
        eprintln!("a dc2 target received {got} bytes of {release}");
        assert!(
            got <= release + release / 10,
            "a dc2 target received {got} bytes of a {release}-byte release: {t}"
        );
    }
    // Both counts of what crossed: the daemons' (chunk bodies) and the
    // kernel's (everything on the links, headers and control included).
    let links = convoy_benches::netns::cross_dc_bytes(&before, &lab.link_bytes().unwrap());
    let daemons = done["cross_dc_bytes"].as_u64().unwrap();
    eprintln!("cross-dc bytes: daemons {daemons}, links {links}");
    assert!(
        daemons > 0 && links >= daemons,
        "the links carried {links} bytes, the daemons count {daemons} across"
    );
}

const PRODUCTION: &str = r#"
[environments.production]
selector = "env=production"

[apps.web]
pipeline = ["production"]

[apps.web.rollout]
strategy = "rolling"
waves = "100%"
mode = "swarm"
drain_seconds = 0.1
progress_deadline_seconds = 20
"#;

/// A fleet of three data centres under PRODUCTION with web@1 live
/// everywhere and web@2 published, its `before_activate` hook given.
fn live_on_v1(lab: &Lab, pipelines: &tempfile::NamedTempFile, before: Option<&str>) -> TestFleet {
    std::fs::write(pipelines.path(), PRODUCTION).unwrap();
    let path = pipelines.path().to_str().unwrap();
    let fleet = fleet_of_three_dcs(lab, &["--label", "dc=dc0", "--pipelines", path]);
    let validate = r#"grep -q "web $CONVOY_VERSION" "$CONVOY_RELEASE_DIR/index.html""#;
    for (v, before) in [("1", None), ("2", before)] {
        let dir = fleet.web_app(v, before, None, Some(validate));
        fleet
            .convoy(&["publish", dir.to_str().unwrap(), &format!("web@{v}")])
            .success();
    }
    assert_eq!(fleet.deploy_web("1", &[]).0, Some(0));
    fleet
}

/// The targets a roll-out's notices say failed.
fn failed_targets(status: &Value) -> Vec<String> {
    let mut failed: Vec<String> = status["notices"]
        .as_array()
        .expect("notices")
        .iter()
        .filter_map(|n| n["notice"]["Failed"]["target"].as_str())
        .map(str::to_string)
        .collect();
    failed.sort();
    failed
}

/// Waits until dc2 is back and reporting, then until every target's
/// `current` link and health endpoint agree; asserts they name web@1.
fn all_on_v1_once_joined(fleet: &TestFleet) {
    fleet.wait_for_targets(6);
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..6 {
        loop {
            let (_, health) = fleet.health(i);
            let link = fleet.current(i, "web");
            if health["active"]["web"].as_str() == Some("1") && link.as_deref() == Some("1") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "target-{i} is not back on web@1 60 s after its link returned: {health}, link {link:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// dc2's two targets against a tolerance of one failure.
fn dc2(fleet: &TestFleet) -> Vec<String> {
    let mut ids = vec![
        fleet.targets[4].peer_id.clone(),
        fleet.targets[5].peer_id.clone(),
    ];
    ids.sort();
    ids
}

#[test]
fn a_roll_out_to_a_data_centre_cut_off_halts_in_distribution_and_touches_none() {
    let _one = serial();
    let Some(lab) = lab(3, 8 << 20) else { return };
    let pipelines = tempfile::NamedTempFile::new().unwrap();
    let fleet = live_on_v1(&lab, &pipelines, None);
    lab.set_link(2, false).unwrap();
    let (code, v) = fleet.deploy_web("2", &["--max-failures", "1", "--progress-deadline", "1"]);
    // Nothing was delivered: the roll-out failed (exit 3), with nothing
    // to roll back.
    assert_eq!(code, Some(3), "failed: {v}");
    assert_eq!(v["outcome"], "failed", "{v}");
    assert_eq!(failed_targets(&v), dc2(&fleet), "{v}");
    assert!(
        v["notices"]
            .to_string()
            .contains("more than the 1 tolerated"),
        "{v}"
    );
    assert_eq!(v["activations"], serde_json::json!({}), "{v}");
    lab.set_link(2, true).unwrap();
    all_on_v1_once_joined(&fleet);
}

/// The cut comes while dc2's targets run web@2's `before_activate`: they
/// switch to web@2 cut off, the roll-out gives up on them at its deadline
/// and rolls the rest back, and when dc2 joins again it is brought back
/// to web@1 — no target is left live on the release the fleet rolled back.
#[test]
fn a_roll_out_cut_off_mid_delivery_halts_by_its_deadline_and_leaves_none_half_live() {
    let _one = serial();
    let Some(lab) = lab(3, 8 << 20) else { return };
    let pipelines = tempfile::NamedTempFile::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().display();
    // dc2's targets (target-4, target-5) say they are activating, then
    // wait (bounded) for the test to open the gate.
    let hook = format!(
        r#"case "$CONVOY_RELEASE_DIR" in */target-4/*|*/target-5/*)
  touch "{gate}/$(basename "$(dirname "$(dirname "$(dirname "$CONVOY_RELEASE_DIR")")")")"
  for i in $(seq 1 300); do [ -e "{gate}/open" ] && exit 0; sleep 0.1; done; exit 1;;
esac"#
    );
    let fleet = live_on_v1(&lab, &pipelines, Some(&hook));
    let deploying = std::thread::scope(|s| {
        let run =
            s.spawn(|| fleet.deploy_web("2", &["--max-failures", "1", "--progress-deadline", "2"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(dir.path().join("target-4").exists() && dir.path().join("target-5").exists()) {
            assert!(Instant::now() < deadline, "dc2 never ran before_activate");
            std::thread::sleep(Duration::from_millis(20));
        }
        lab.set_link(2, false).unwrap();
        std::fs::write(dir.path().join("open"), "").unwrap();
        run.join().unwrap()
    });
    let (code, v) = deploying;
    assert_eq!(code, Some(2), "rolled back: {v}");
    assert_eq!(v["outcome"], "rolled_back", "{v}");
    assert_eq!(failed_targets(&v), dc2(&fleet), "{v}");
    for i in 0..4 {
        assert_eq!(fleet.current(i, "web").as_deref(), Some("1"), "target-{i}");
    }
    // Cut off, dc2's targets went on and switched to web@2.
    let deadline = Instant::now() + Duration::from_secs(30);
    while [4, 5]
        .iter()
        .any(|i| fleet.current(*i, "web").as_deref() != Some("2"))
    {
        assert!(
            Instant::now() < deadline,
            "dc2 did not switch while cut off: {:?} {:?}",
            fleet.current(4, "web"),
            fleet.current(5, "web")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.set_link(2, true).unwrap();
    all_on_v1_once_joined(&fleet);
}

/// The namespaces `ip netns list` shows whose names start with `prefix`.
fn namespaces_named(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Starts `convoy bench --netns ARGS`, and reads its stderr up to the line
/// naming its lab: the child, the lab's namespace prefix, and the rest of
/// stderr.
fn bench_in_lab(args: &[&str], out: &std::path::Path) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(convoy_tests::bin_dir().join("convoy"))
        .args(["bench", "--netns"])
        .args(args)
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("convoy bench starts");
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    // "3 data centres in network namespaces convoyN-dc0…, …"
    let prefix = line
        .split_whitespace()
        .find_map(|w| w.strip_suffix("dc0…,"))
        .unwrap_or_else(|| panic!("no lab named in {line:?}"))
        .to_string();
    // Keep draining stderr so the bench never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (child, prefix)
}

#[test]
fn the_bench_in_network_namespaces_counts_cross_dc_bytes_twice_and_leaves_nothing() {
    let _one = serial();
    if !can_make_labs() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    // Interrupted (Ctrl-C) while its fleet runs: its lab goes too.
    let (mut child, prefix) = bench_in_lab(
        &[
            "--dcs",
            "3",
            "--nodes",
            "3",
            "--size",
            "64MiB",
            "--dc-link",
            "1MiB",
        ],
        out.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while namespaces_named(&prefix).len() < 4 {
        assert!(Instant::now() < deadline, "no lab {prefix}* appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child with a valid signal.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted bench fails");
    assert_eq!(
        namespaces_named(&prefix),
        Vec::<String>::new(),
        "left behind"
    );

    // A whole run: both counts of what crossed between data centres.
    let (child, prefix) = bench_in_lab(
        &[
            "--dcs",
            "2",
            "--nodes",
            "4",
            "--size",
            "4MiB",
            "--dc-link",
            "8MiB",
            "--uplink",
            "8MiB",
            "--modes",
            "swarm,push",
        ],
        out.path(),
    );
    let run = child.wait_with_output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    assert_eq!(
        namespaces_named(&prefix),
        Vec::<String>::new(),
        "left behind"
    );
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    let runs = results["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{results}");
    for r in runs {
        assert_eq!(r["verified_nodes"], 4, "{r}");
        let daemons = r["cross_dc_bytes"].as_u64().unwrap();
        let links = r["cross_dc_link_bytes"].as_u64().unwrap();
        // dc1's two targets each take the release in at least once over
        // the link in push (the origin sends each its copy), at least
        // once in all in swarm; the links carry that and their headers.
        let release = r["package_bytes"].as_u64().unwrap();
        assert!(daemons >= release, "{r}");
        assert!(
            links >= daemons && links < daemons + daemons / 5 + (1 << 20),
            "links {links} against the daemons' {daemons}: {r}"
        );
        // The link's cap enters the bound: 4 MiB at 8 MiB/s.
        assert!(r["bound_seconds"].as_f64().unwrap() >= 0.5, "{r}");
    }
}
