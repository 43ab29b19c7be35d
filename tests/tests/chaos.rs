//! Seeded chaos on a local fleet: targets and the coordinator are killed
//! (SIGKILL) at random points of stagings and roll-outs and restarted, and
//! targets lose power: each target's data directory is a [`CutFs`] mount,
//! and a power cut kills the target and drops everything it had not
//! synced. After every roll-out the fleet is checked against the
//! invariants the README promises:
//!
//! - every target is on exactly one whole release: its `current` link names
//!   a tree equal to the package published under that version;
//! - its link, its health endpoint, its own history and the coordinator's
//!   view of it agree;
//! - the roll-out ended `succeeded`, `rolled_back`, `failed` or `aborted`,
//!   and the environment is not split: after success every target in load
//!   runs the new release; otherwise no target runs it and those in load run
//!   what they ran before;
//! - a target that had the release whole in its store when it was killed
//!   fetches not a byte of it again after its restart (its staging of the
//!   release, as its reports give it, receives nothing).
//!
//! `CONVOY_CHAOS_TRIALS` (default 3, what CI runs) and `CONVOY_CHAOS_SEED`
//! (default 1) choose the run; each trial prints what it did, and a
//! violation names the seed and trial that reproduce it. Power cuts need
//! root and `/dev/fuse`; elsewhere they are plain kills, and the run says
//! so (it fails instead when `CONVOY_REQUIRE_POWER_CUTS` is set, as
//! `.ci/run` sets it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use convoy_tests::cutfs::CutFs;
use convoy_tests::{http, noise, TestFleet};
use serde_json::Value;

const TARGETS: usize = 3;
/// New bytes in every version; targets download at most 4 MiB/s, so a
/// staging takes about a second and kills land in it as well as in
/// delivery.
const NEW_BYTES: usize = 4 << 20;

const PIPELINES: &str = r#"
[environments.production]
selector = "env=production"
blue_green = true

[apps.web]
pipeline = ["production"]

[apps.web.rollout]
strategy = "rolling"
waves = "1,100%"
mode = "swarm"
drain_seconds = 0.1
progress_deadline_seconds = 2
"#;

const VALIDATE_OK: &str = r#"grep -q "web $CONVOY_VERSION" "$CONVOY_RELEASE_DIR/index.html""#;

/// SplitMix64: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// Whom a kill hits, and how.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Victim {
    Coordinator,
    Target(usize),
    /// The target is killed and loses what it had not synced.
    PowerCut(usize),
}

/// One kill: `after_ms` after the previous step, down for `down_ms`.
#[derive(Clone, Copy, Debug)]
struct Kill {
    victim: Victim,
    after_ms: u64,
    down_ms: u64,
}

/// What one trial does.
#[derive(Debug)]
struct Plan {
    strategy: &'static str,
    mode: &'static str,
    kills: Vec<Kill>,
}

impl Plan {
    fn draw(rng: &mut Rng) -> Self {
        let strategy = rng.pick(&["live", "rolling", "blue-green"]);
        let mode = rng.pick(&["swarm", "push", "pull"]);
        let kills = (0..1 + rng.below(2))
            .map(|_| Kill {
                victim: match rng.below(2 * TARGETS as u64 + 1) as usize {
                    0 => Victim::Coordinator,
                    i if i <= TARGETS => Victim::Target(i - 1),
                    i => Victim::PowerCut(i - TARGETS - 1),
                },
                // A roll-out here takes 1-3 s: most kills land in it.
                after_ms: rng.below(1200),
                // Up to 5 s: past twice the progress deadline, so some
                // kills fail their target and halt the roll-out.
                down_ms: rng.below(5000),
            })
            .collect();
        Self {
            strategy,
            mode,
            kills,
        }
    }
}

/// One target as everything that knows about it says.
#[derive(Debug, PartialEq)]
struct Seen {
    link: Option<String>,
    health_active: Option<String>,
    health_status: u16,
    in_load: bool,
    history_last: Option<String>,
    view_active: Option<String>,
    view_in_load: Option<bool>,
    view_alive: bool,
}

impl Seen {
    fn agrees(&self) -> Result<(), String> {
        let link = self.link.as_ref().ok_or("no current link")?;
        let mut wrong = Vec::new();
        if self.health_active.as_ref() != Some(link) {
            wrong.push("health endpoint");
        }
        if self.health_status != if self.in_load { 200 } else { 503 } {
            wrong.push("health status");
        }
        if self.history_last.as_ref() != Some(link) {
            wrong.push("target history");
        }
        if !self.view_alive
            || self.view_active.as_ref() != Some(link)
            || self.view_in_load != Some(self.in_load)
        {
            wrong.push("coordinator's view");
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!("{} disagree with the link", wrong.join(", ")))
        }
    }
}

struct Chaos {
    fleet: TestFleet,
    /// Each target's data directory, when power cuts are possible here.
    disks: Vec<CutFs>,
    /// Version → release id (hex).
    ids: BTreeMap<u64, String>,
}

impl Drop for Chaos {
    fn drop(&mut self) {
        // The targets stop before their file systems go.
        self.fleet.targets.clear();
        self.disks.clear();
    }
}

impl Chaos {
    fn start() -> Self {
        // Collection passes run during the trials too.
        let mut fleet = TestFleet::with_pipelines(PIPELINES, &["--gc-interval", "20s"]);
        let mut disks = Vec::new();
        if CutFs::available() {
            for i in 0..TARGETS {
                let dir = fleet.target_dir(i);
                std::fs::create_dir(&dir).expect("a mount point");
                disks.push(CutFs::mount(&dir).expect("mounting a power-cut file system"));
            }
        } else {
            assert!(
                std::env::var_os("CONVOY_REQUIRE_POWER_CUTS").is_none(),
                "power cuts need root and /dev/fuse"
            );
            eprintln!("no root or /dev/fuse here: power cuts are plain kills");
        }
        for i in 0..TARGETS {
            let slice = if i % 2 == 0 {
                "slice=blue"
            } else {
                "slice=green"
            };
            fleet.add_target(&[
                "--label",
                "env=production",
                "--label",
                slice,
                "--download-rate",
                "4MiB",
                "--gc-interval",
                "20s",
            ]);
        }
        fleet.wait_for_targets(TARGETS);
        Self {
            fleet,
            disks,
            ids: BTreeMap::new(),
        }
    }

    /// Publishes version `v`: the web app with `NEW_BYTES` of its own.
    fn publish(&mut self, v: u64) {
        let dir = self
            .fleet
            .web_app(&v.to_string(), None, None, Some(VALIDATE_OK));
        std::fs::write(dir.join("app.bin"), noise(NEW_BYTES, v)).expect("app");
        let run = self
            .fleet
            .convoy(&[
                "publish",
                dir.to_str().expect("UTF-8"),
                &format!("web@{v}"),
                "--json",
            ])
            .success();
        let id = run.json()["release_id"]
            .as_str()
            .expect("a release id")
            .to_string();
        self.ids.insert(v, id);
    }

    fn deploy(&self, v: u64, strategy: &str, mode: &str) -> u64 {
        let release = format!("web@{v}");
        self.fleet
            .operator(&[
                "deploy",
                &release,
                "--env",
                "production",
                "--json",
                "--strategy",
                strategy,
                "--mode",
                mode,
                "--waves",
                "1,100%",
                "--drain",
                "0.1",
                "--progress-deadline",
                "2",
            ])
            .success()
            .json()["id"]
            .as_u64()
            .expect("an id")
    }

    /// The phase deployment `id` is in (`Distributing`, `Delivering`,
    /// `Switching`, `RollingBack`, `Done`), as its status says.
    fn phase(&self, id: u64) -> String {
        let run = self.fleet.operator(&["status", &id.to_string(), "--json"]);
        if !run.ok {
            return "unknown".into();
        }
        match &run.json()["phase"] {
            Value::String(p) => p.clone(),
            Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
            other => other.to_string(),
        }
    }

    /// The coordinator's fleet view by peer id, if it answers.
    fn view(&self) -> Option<BTreeMap<String, Value>> {
        let run = self.fleet.convoy(&["fleet", "--json"]);
        if !run.ok {
            return None;
        }
        Some(
            run.json()["targets"]
                .as_array()?
                .iter()
                .map(|t| (t["peer_id"].as_str().unwrap_or("").to_string(), t.clone()))
                .collect(),
        )
    }

    /// Whether the coordinator's view says target `i` holds version `v`.
    fn holds(&self, view: &BTreeMap<String, Value>, i: usize, v: u64) -> bool {
        let id = &self.ids[&v];
        view.get(&self.fleet.targets[i].peer_id)
            .and_then(|t| t["releases"].as_array())
            .is_some_and(|r| r.iter().any(|r| release_hex(r).as_deref() == Some(id)))
    }

    fn seen(&self, view: &BTreeMap<String, Value>) -> Vec<Seen> {
        (0..TARGETS)
            .map(|i| {
                let addr = self.fleet.targets[i].ready["health"]
                    .as_str()
                    .expect("a health address");
                let (status, body) = http(addr, "GET", "/health", None);
                let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let history: Vec<String> = std::fs::read(
                    self.fleet
                        .target_dir(i)
                        .join("releases/web/.convoy/history.json"),
                )
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
                let member = view.get(&self.fleet.targets[i].peer_id);
                Seen {
                    link: self.fleet.current(i, "web"),
                    health_active: body["active"]["web"].as_str().map(str::to_string),
                    health_status: status,
                    in_load: body["in_load"] == true,
                    history_last: history.last().cloned(),
                    view_active: member
                        .and_then(|m| m["active"]["web"].as_str())
                        .map(str::to_string),
                    view_in_load: member.and_then(|m| m["in_load"].as_bool()),
                    view_alive: member.is_some_and(|m| m["alive"] == true),
                }
            })
            .collect()
    }

    /// Target `i`'s tree of version `v` equals the package published as `v`.
    fn tree_is_whole(&self, i: usize, v: &str) -> Result<(), String> {
        let tree = self.fleet.target_dir(i).join("releases/web").join(v);
        let package = self.fleet.path().join(format!("web-{v}"));
        let (got, want) = (listing(&tree), listing(&package));
        if got == want {
            Ok(())
        } else {
            let differ: BTreeSet<_> = got
                .symmetric_difference(&want)
                .map(|(p, ..)| p.clone())
                .collect();
            Err(format!(
                "tree of {v} differs from its package in {differ:?}"
            ))
        }
    }
}

/// A release id as the JSON of a report holds it (hex, or 32 numbers).
fn release_hex(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a
            .iter()
            .map(|b| b.as_u64().map(|b| format!("{b:02x}")))
            .collect(),
        _ => None,
    }
}

/// Every file under `root`: its path, whether it is executable, its BLAKE3.
fn listing(root: &Path) -> BTreeSet<(String, bool, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .expect("under the root")
                .display()
                .to_string();
            let hash = std::fs::read(&path)
                .map(|b| blake3::hash(&b).to_hex().to_string())
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            out.insert((rel, meta.permissions().mode() & 0o111 != 0, hash));
        }
    }
    out
}

/// Runs one trial: publish `v`, deploy it, kill and restart per the plan,
/// then check. `before` is the version targets in load run; returns the
/// how the roll-out ended, the version they run after and the phase each
/// kill hit.
fn trial(c: &mut Chaos, v: u64, before: u64, plan: &Plan) -> Result<Ended, String> {
    c.publish(v);
    let id = c.deploy(v, plan.strategy, plan.mode);
    // Targets killed while they held `v` whole: they must not fetch it again.
    let mut held_at_kill = BTreeSet::new();
    let mut hit = Vec::new();
    for kill in &plan.kills {
        std::thread::sleep(Duration::from_millis(kill.after_ms));
        hit.push(c.phase(id));
        match kill.victim {
            Victim::Coordinator => c.fleet.coordinator.kill(),
            Victim::Target(i) | Victim::PowerCut(i) => {
                if c.view().is_some_and(|view| c.holds(&view, i, v)) {
                    held_at_kill.insert(i);
                }
                c.fleet.targets[i].kill();
                if let (Victim::PowerCut(_), Some(disk)) = (kill.victim, c.disks.get_mut(i)) {
                    disk.cut()
                        .map_err(|e| format!("cutting target-{i}'s power: {e}"))?;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(kill.down_ms));
        match kill.victim {
            Victim::Coordinator => c.fleet.coordinator.restart(),
            Victim::Target(i) | Victim::PowerCut(i) => c.fleet.targets[i].restart(),
        }
    }

    // The roll-out ends, per the README's rules.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        let run = c.fleet.operator(&["status", &id.to_string(), "--json"]);
        if run.ok {
            let s = run.json();
            if s["outcome"].is_string() {
                break s;
            }
        }
        if Instant::now() > deadline {
            return Err(format!("deployment {id} did not end in 90 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let outcome = status["outcome"].as_str().unwrap_or("").to_string();
    if !["succeeded", "rolled_back", "failed", "aborted"].contains(&outcome.as_str()) {
        return Err(format!("deployment {id} ended {outcome:?}"));
    }
    let after = if outcome == "succeeded" { v } else { before };
    // Why it halted, for the trial's line.
    let why: Vec<String> = status["notices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let n = &n["notice"];
            n["Halted"].as_str().map(str::to_string).or_else(|| {
                n["Failed"]["reason"]
                    .as_str()
                    .map(|r| format!("{}: {r}", n["Failed"]["target"].as_str().unwrap_or("?")))
            })
        })
        .collect();

    // Every target converges: one whole release, everything agreeing, the
    // environment not split.
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let view = c.view().unwrap_or_default();
        let seen = c.seen(&view);
        let agree = seen.iter().all(|s| s.agrees().is_ok());
        let in_load: Vec<_> = seen.iter().filter(|s| s.in_load).collect();
        let settled = !in_load.is_empty()
            && in_load
                .iter()
                .all(|s| s.link.as_deref() == Some(&after.to_string()))
            && (outcome == "succeeded"
                || seen
                    .iter()
                    .all(|s| s.link.as_deref() != Some(&v.to_string())));
        if agree && settled {
            break seen;
        }
        if Instant::now() > deadline {
            let why: Vec<String> = seen
                .iter()
                .enumerate()
                .map(|(i, s)| format!("target-{i}: {:?} {s:?}", s.agrees()))
                .collect();
            return Err(format!(
                "deployment {id} ended {outcome}; after 30 s the fleet is not settled on \
                 {after} in load{}:\n{}",
                if outcome == "succeeded" {
                    String::new()
                } else {
                    format!(" with nobody on {v}")
                },
                why.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for (i, s) in seen.iter().enumerate() {
        let link = s.link.as_deref().expect("agreed on a link");
        c.tree_is_whole(i, link)
            .map_err(|e| format!("target-{i}: {e}"))?;
    }

    // What was durable was not fetched again.
    if !held_at_kill.is_empty() {
        let view = c.view().ok_or("no fleet view")?;
        for i in held_at_kill {
            let member = &view[&c.fleet.targets[i].peer_id];
            // Its staging of `v` since the restart (other releases' do not
            // count: a staging cut short by an earlier kill resumes).
            let received: u64 = member["stagings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["release_id"] == c.ids[&v].as_str())
                .filter_map(|s| s["bytes_received"].as_u64())
                .sum();
            if received != 0 {
                return Err(format!(
                    "target-{i} held web@{v} whole when it was killed, and received \
                     {received} bytes after its restart"
                ));
            }
        }
    }
    Ok(Ended {
        outcome,
        after,
        hit,
        why,
    })
}

/// How a trial ended.
struct Ended {
    outcome: String,
    after: u64,
    /// The roll-out's phase at each kill.
    hit: Vec<String>,
    /// Why targets failed and the roll-out halted, if it did.
    why: Vec<String>,
}

#[test]
fn seeded_kills_during_stagings_and_roll_outs_leave_every_invariant_whole() {
    let trials: u64 = std::env::var("CONVOY_CHAOS_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("CONVOY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut c = Chaos::start();
    c.publish(1);
    let id = c.deploy(1, "live", "push");
    let s = c
        .fleet
        .wait_status(id, "the first roll-out", |s| s["outcome"].is_string());
    assert_eq!(s["outcome"], "succeeded", "{s}");

    let started = Instant::now();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut phases: BTreeMap<String, u64> = BTreeMap::new();
    let mut on = 1;
    for t in 0..trials {
        // Each trial's plan from the seed and its number alone, so any one
        // can be rerun.
        let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0xA076_1D64_78BD_642F));
        let plan = Plan::draw(&mut rng);
        let v = t + 2;
        let t0 = Instant::now();
        match trial(&mut c, v, on, &plan) {
            Ok(ended) => {
                *outcomes.entry(ended.outcome.clone()).or_default() += 1;
                for (kill, phase) in plan.kills.iter().zip(&ended.hit) {
                    let who = match kill.victim {
                        Victim::Coordinator => "coordinator killed",
                        Victim::Target(_) => "target killed",
                        Victim::PowerCut(_) if c.disks.is_empty() => "target killed",
                        Victim::PowerCut(_) => "target's power cut",
                    };
                    *phases.entry(format!("{who} in {phase}")).or_default() += 1;
                }
                eprintln!(
                    "trial {t} (seed {seed}): {} {}, kills {:?} in {:?}: {} {:?}, ok in {:.1} s",
                    plan.strategy,
                    plan.mode,
                    plan.kills,
                    ended.hit,
                    ended.outcome,
                    ended.why,
                    t0.elapsed().as_secs_f64()
                );
                on = ended.after;
            }
            Err(violation) => panic!(
                "trial {t} of seed {seed} ({plan:?}) broke an invariant after {t} whole \
                 trials: {violation}\nrerun: CONVOY_CHAOS_SEED={seed} CONVOY_CHAOS_TRIALS={} \
                 cargo test -p convoy-tests --test chaos -- --nocapture",
                t + 1
            ),
        }
    }
    eprintln!(
        "{trials} trials (seed {seed}) in {:.0} s, 0 violations; outcomes {outcomes:?}; \
         kills {phases:?}",
        started.elapsed().as_secs_f64()
    );
}
