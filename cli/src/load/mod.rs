//! `convoy load-test`: one real coordinator under thousands of targets.
//!
//! For each fleet size it starts a `convoyd coordinator` and spreads the
//! targets over a few `convoy load-worker` processes ([`worker`]): each
//! target is a libp2p peer of its own that registers, proves the fleet
//! key, reports at the coordinator's cadence, takes orders and reports
//! progress, but stores nothing. Then it measures what the coordinator
//! must do at that scale: heartbeat handling (its CPU over a window of
//! steady reports), its memory, how long staging orders take to reach
//! every target, how long each roll-out wave's orders take, and how fast
//! `convoy fleet` and the API's fleet listing answer.

pub mod worker;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use convoy_daemon::net::client::Client;
use convoy_daemon::protocol::{ControlRequest, ControlResponse, DistributionMode};
use convoy_daemon::store::RocksStore;
use convoy_daemon::units::unix_ms;
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::fleet::{convoyd_path, cpu_seconds, rss, Fleet, Proc};
use crate::operate::Api;
use crate::remote::{control, publish_dir, runtime};
use crate::Output;

/// `convoy load-test`'s flags.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Fleet sizes to measure, comma-separated: a fresh coordinator each
    #[arg(long, value_delimiter = ',', default_value = "1000,3000,10000")]
    pub targets: Vec<usize>,
    /// Processes the simulated targets are spread over
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Data centres the targets are spread over, two zones each
    #[arg(long, default_value_t = 4)]
    pub dcs: usize,
    /// Seconds a simulated target takes to stage (each draws 0.5–1.5× this)
    #[arg(long, default_value_t = 2.0)]
    pub stage_seconds: f64,
    /// Seconds of steady heartbeats over which the coordinator's CPU is measured
    #[arg(long, default_value_t = 20)]
    pub window: u64,
    /// The coordinator's --heartbeat-ms [default: its own]
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// The coordinator's --max-reports-per-second [default: its own]
    #[arg(long)]
    pub max_reports_per_second: Option<u64>,
    /// Roll-out waves, as `convoy deploy --waves` takes them
    #[arg(long, default_value = "10%,100%")]
    pub waves: String,
    /// Write results.json (one entry per fleet size) into this directory
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the coordinators' and workers' logs here
    #[arg(long)]
    pub logs: Option<PathBuf>,
    /// The convoyd binary [default: next to this one]
    #[arg(long)]
    pub convoyd: Option<PathBuf>,
}

/// What one fleet size measured.
#[derive(Debug, Serialize)]
pub struct Row {
    pub targets: usize,
    /// Seconds from the workers' start until the coordinator listed every
    /// target alive.
    pub register_s: f64,
    /// The heartbeat the coordinator asked for.
    pub heartbeat_ms: u64,
    /// Reports the coordinator answered per second over the window.
    pub reports_per_s: f64,
    /// The coordinator's CPU over the window, in percent of one core.
    pub heartbeat_cpu_pct: f64,
    /// The workers' over the same window (the simulated targets' side).
    pub workers_cpu_pct: f64,
    /// Its resident memory at the end of the window, and its peak.
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// `convoy fleet --json` run as a process, each try's wall time.
    pub fleet_cli_s: Vec<f64>,
    /// `GET /v1/fleet`, each try.
    pub fleet_api_s: Vec<f64>,
    /// Seconds from the staging request until the last target had its
    /// order, and its peer list.
    pub stage_orders_s: f64,
    pub peer_lists_s: f64,
    /// Seconds until the coordinator saw every target staged.
    pub staged_s: f64,
    /// The coordinator's CPU seconds over the staging, and the workers'.
    pub staging_cpu_s: f64,
    pub workers_staging_cpu_s: f64,
    /// Per wave: seconds from its start (the coordinator's notice) until
    /// its last target had its delivery order.
    pub wave_orders_s: Vec<f64>,
    /// Per wave: its targets.
    pub wave_targets: Vec<usize>,
    /// Seconds the whole roll-out took, and how it ended.
    pub rollout_s: f64,
    pub rollout_outcome: String,
    /// Seconds from the coordinator's restart (killed, started again on
    /// its data) until it listed every target alive again, and its CPU
    /// seconds over that.
    pub restart_s: f64,
    pub restart_cpu_s: f64,
    /// Reports that failed (refused, timed out) before the restart.
    pub report_failures: u64,
}

/// What the workers saw, gathered from their lines.
#[derive(Default)]
struct Tally {
    registered: HashMap<usize, u64>,
    reports: HashMap<usize, u64>,
    report_failures: HashMap<usize, u64>,
    /// The heartbeat the coordinator last asked of each worker's targets.
    heartbeat_ms: HashMap<usize, u64>,
    /// Per kind of order, per target id: when it first came.
    orders: HashMap<String, HashMap<String, u64>>,
}

impl Tally {
    fn sum(map: &HashMap<usize, u64>) -> u64 {
        map.values().sum()
    }

    fn take(&mut self, worker: usize, line: &Value) {
        let n = |k: &str| line[k].as_u64().unwrap_or(0);
        match line["e"].as_str() {
            Some("status") => {
                self.registered.insert(worker, n("registered"));
                self.reports.insert(worker, n("reports"));
                self.report_failures.insert(worker, n("report_failures"));
                self.heartbeat_ms.insert(worker, n("heartbeat_ms"));
            }
            Some(kind) => {
                let id = line["id"].as_str().unwrap_or_default().to_string();
                self.orders
                    .entry(kind.to_string())
                    .or_default()
                    .entry(id)
                    .or_insert(n("ms"));
            }
            None => {}
        }
    }

    /// How many targets had an order of `kind`, and when the last one came.
    fn last(&self, kind: &str) -> (usize, u64) {
        self.orders.get(kind).map_or((0, 0), |m| {
            (m.len(), m.values().copied().max().unwrap_or(0))
        })
    }
}

pub fn load_test(args: LoadArgs, out: &Output) -> Result<ExitCode> {
    if args.targets.contains(&0) || args.workers == 0 || args.dcs == 0 {
        bail!("--targets, --workers and --dcs must be at least 1");
    }
    convoy_daemon::net::raise_open_files_limit();
    let convoyd = convoyd_path(args.convoyd.as_deref())?;
    let rt = runtime()?;
    let mut rows = Vec::new();
    for &n in &args.targets {
        let row = rt.block_on(async {
            tokio::select! {
                r = measure(&args, n, &convoyd) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; the coordinator and workers are stopped")),
            }
        })?;
        if !out.json {
            print_row(&row);
        }
        rows.push(row);
    }
    let value = json!({
        "meta": crate::bench::meta(),
        "workers": args.workers,
        "dcs": args.dcs,
        "stage_seconds": args.stage_seconds,
        "window_s": args.window,
        "waves": args.waves,
        "rows": rows,
    });
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("results.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&value)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if out.json {
        println!("{value}");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_row(r: &Row) {
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!("{} targets:", r.targets);
    println!(
        "  registered in {:.1} s; heartbeat {} ms: {:.0} reports/s, coordinator {:.1}% of a core (workers {:.0}%)",
        r.register_s, r.heartbeat_ms, r.reports_per_s, r.heartbeat_cpu_pct, r.workers_cpu_pct
    );
    println!(
        "  coordinator RSS {} (peak {})",
        convoy_daemon::units::format_bytes(r.rss_bytes),
        convoy_daemon::units::format_bytes(r.peak_rss_bytes)
    );
    println!(
        "  fleet listing: convoy fleet {:.2} s, GET /v1/fleet {:.2} s (slowest of {})",
        max(&r.fleet_cli_s),
        max(&r.fleet_api_s),
        r.fleet_api_s.len()
    );
    println!(
        "  staging: orders at every target in {:.2} s, peer lists {:.2} s, all staged {:.1} s \
         (coordinator {:.1} CPU-s, workers {:.1})",
        r.stage_orders_s, r.peer_lists_s, r.staged_s, r.staging_cpu_s, r.workers_staging_cpu_s
    );
    let waves: Vec<String> = r
        .wave_orders_s
        .iter()
        .zip(&r.wave_targets)
        .map(|(s, n)| format!("{s:.2} s ({n} targets)"))
        .collect();
    println!(
        "  roll-out {} in {:.1} s; wave orders: {}",
        r.rollout_outcome,
        r.rollout_s,
        waves.join(", ")
    );
    println!(
        "  coordinator killed and restarted: every target back in {:.1} s ({:.1} CPU-s)",
        r.restart_s, r.restart_cpu_s
    );
    if r.report_failures > 0 {
        println!("  {} reports failed before the restart", r.report_failures);
    }
}

const PIPELINES: &str = "\
[environments.load]
selector = \"env=load\"

[apps.load]
pipeline = [\"load\"]
";

/// Workers' processes, and what they tell.
struct Workers {
    procs: Vec<Proc>,
    tally: Arc<Mutex<Tally>>,
}

impl Workers {
    fn start(args: &LoadArgs, n: usize, fleet: &Fleet) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut procs = Vec::new();
        let per = n.div_ceil(args.workers);
        for w in 0..args.workers {
            let first = w * per;
            let count = per.min(n.saturating_sub(first));
            if count == 0 {
                break;
            }
            let log = std::fs::File::create(fleet.log(&format!("worker-{w}")))?;
            let mut child = Command::new(&exe)
                .args([
                    "load-worker",
                    "--coordinator",
                    &fleet.coordinator_addr,
                    "--fleet-key-file",
                    &fleet.key_file.display().to_string(),
                    "--first",
                    &first.to_string(),
                    "--count",
                    &count.to_string(),
                    "--dcs",
                    &args.dcs.to_string(),
                    "--stage-ms",
                    &((args.stage_seconds * 1000.0) as u64).to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start {}", exe.display()))?;
            let stdout = child.stdout.take().expect("piped");
            let t = tally.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        t.lock().expect("tally").take(w, &v);
                    }
                }
            });
            procs.push(Proc {
                child,
                name: format!("worker-{w}"),
            });
        }
        Ok(Self { procs, tally })
    }

    /// Fails if a worker has exited: its targets are gone, and waiting
    /// for them would only time out.
    fn check(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited ({status}); its log says why", p.name);
            }
        }
        Ok(())
    }

    /// CPU seconds the workers have used: they share this machine with
    /// the coordinator, as a real fleet's targets do not.
    fn cpu(&self) -> f64 {
        self.procs.iter().map(|p| cpu_seconds(p.child.id())).sum()
    }

    fn with<T>(&self, f: impl FnOnce(&Tally) -> T) -> T {
        f(&self.tally.lock().expect("tally"))
    }
}

/// Waits (polling every 100 ms, at most `limit`) until `done` holds.
async fn until(limit: Duration, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if done()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} within {} s", limit.as_secs());
        }
    }
}

/// Polls the coordinator's fleet listing every half second, once `ready`
/// holds of what the workers said, until `n` targets are alive (at most
/// 600 s, failing at once if a worker exits).
async fn wait_alive(
    client: &Client,
    workers: &mut Workers,
    n: usize,
    ready: impl Fn(&Tally) -> bool,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        workers.check()?;
        let ready = workers.with(&ready);
        let alive = if ready {
            match control(client, ControlRequest::Fleet).await? {
                ControlResponse::Fleet(m) => m.iter().filter(|m| m.alive).count(),
                other => bail!("unexpected answer to the fleet listing: {other:?}"),
            }
        } else {
            0
        };
        if alive >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            if !ready {
                bail!("the workers did not report {n} targets {what} within 600 s; their stderr and the coordinator's log may say why");
            }
            bail!("{alive} of {n} targets {what} within 600 s; the coordinator's log may say why");
        }
    }
}

/// A small release: four files of 64 KiB.
fn write_release(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for i in 0..4 {
        let mut buf = vec![0u8; 64 << 10];
        rng.fill_bytes(&mut buf);
        std::fs::write(dir.join(format!("part-{i}.bin")), buf)?;
    }
    Ok(())
}

async fn measure(args: &LoadArgs, n: usize, convoyd: &Path) -> Result<Row> {
    let mut fleet = Fleet::new("convoy-load-", args.logs.clone())?;
    let root = fleet.dir.path().to_path_buf();
    let pipelines = root.join("pipelines.toml");
    std::fs::write(&pipelines, PIPELINES)?;
    eprintln!(
        "== {n} targets: starting a coordinator in {}",
        root.display()
    );
    let mut cargs = fleet.common_args("coordinator", 0, "warn", 1);
    cargs.extend([
        "--pipelines".into(),
        pipelines.display().to_string(),
        "--label".into(),
        "dc=dc0".into(),
    ]);
    if let Some(h) = args.heartbeat_ms {
        cargs.extend(["--heartbeat-ms".into(), h.to_string()]);
    }
    if let Some(r) = args.max_reports_per_second {
        cargs.extend(["--max-reports-per-second".into(), r.to_string()]);
    }
    fleet.start_coordinator(convoyd, &cargs)?;
    let pid = fleet.coordinator_pid().context("no coordinator")?;
    let client = fleet.operator_client().await?;
    let store = RocksStore::open(&root.join("cli-store"))?;
    write_release(&root.join("release"))?;
    publish_dir(&client, &store, &root.join("release"), "load", "1").await?;

    eprintln!("   registering {n} targets from {} workers", args.workers);
    let started = Instant::now();
    let mut workers = Workers::start(args, n, &fleet)?;
    // The workers' count first: listing 10,000 targets costs the
    // coordinator a tenth of a second.
    let registered = |t: &Tally| Tally::sum(&t.registered) as usize >= n;
    wait_alive(&client, &mut workers, n, registered, "registered").await?;
    let register_s = started.elapsed().as_secs_f64();

    // Steady state: every target reports on the coordinator's cadence.
    // The cadence the last registrations were given (the first ones, in
    // a smaller fleet, may have been given a shorter one).
    let heartbeat = || workers.with(|t| t.heartbeat_ms.values().copied().max().unwrap_or(1000));
    let heartbeat_ms = heartbeat();
    eprintln!("   measuring heartbeat handling over {} s", args.window);
    tokio::time::sleep(Duration::from_millis(2 * heartbeat_ms)).await;
    let (cpu0, reports0) = (cpu_seconds(pid), workers.with(|t| Tally::sum(&t.reports)));
    let workers_cpu0 = workers.cpu();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.window)).await;
    let (cpu1, reports1) = (cpu_seconds(pid), workers.with(|t| Tally::sum(&t.reports)));
    let workers_cpu1 = workers.cpu();
    // Every target has reported since the fleet was whole: its cadence.
    let heartbeat_ms = heartbeat();
    let secs = t0.elapsed().as_secs_f64();
    let (rss_bytes, peak_rss_bytes) = rss(pid);

    // The fleet listing, as the CLI and as the API.
    let mut fleet_cli_s = Vec::new();
    let mut fleet_api_s = Vec::new();
    let exe = std::env::current_exe()?;
    let api = Arc::new(Api::new(
        fleet.coordinator_ready["api"].as_str().map(String::from),
        fleet.coordinator_ready["api_token_file"]
            .as_str()
            .map(PathBuf::from),
    ));
    for _ in 0..3 {
        let t = Instant::now();
        let status = Command::new(&exe)
            .args(["fleet", "--json"])
            .env("CONVOY_COORDINATOR", &fleet.coordinator_addr)
            .env("CONVOY_FLEET_KEY_FILE", &fleet.key_file)
            .env(
                "CONVOY_OPERATOR_KEY_FILE",
                fleet.coordinator_ready["operator_key_file"]
                    .as_str()
                    .unwrap_or_default(),
            )
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("convoy fleet failed: {status}");
        }
        fleet_cli_s.push(t.elapsed().as_secs_f64());
        let a = api.clone();
        let t = Instant::now();
        let listed = tokio::task::spawn_blocking(move || a.get("/v1/fleet")).await??;
        fleet_api_s.push(t.elapsed().as_secs_f64());
        let count = listed["targets"].as_array().map_or(0, Vec::len);
        if count < n {
            bail!("GET /v1/fleet listed {count} of {n} targets");
        }
    }

    // Staging to every target, swarm mode: orders, peer lists, progress.
    eprintln!("   staging load@1 to {n} targets");
    let (cpu_before, workers_before) = (cpu_seconds(pid), workers.cpu());
    let t0 = unix_ms(SystemTime::now());
    let staged_from = Instant::now();
    let id = match control(
        &client,
        ControlRequest::StartStaging {
            release: "load@1".into(),
            selector: Default::default(),
            mode: DistributionMode::Swarm,
        },
    )
    .await?
    {
        ControlResponse::StagingStarted { id, .. } => id,
        other => bail!("unexpected answer to the staging: {other:?}"),
    };
    until(
        Duration::from_secs(300),
        "not every target had its order",
        || {
            workers.check()?;
            Ok(workers.with(|t| t.last("stage").0 >= n && t.last("peers").0 >= n))
        },
    )
    .await?;
    let (_, stage_last) = workers.with(|t| t.last("stage"));
    let (_, peers_last) = workers.with(|t| t.last("peers"));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match control(&client, ControlRequest::StagingStatus { id }).await? {
            ControlResponse::Staging(r) => match crate::remote::count(&r) {
                (staged, _) if staged >= n => break,
                (_, 0) => {}
                (_, failed) => bail!("{failed} targets failed to stage"),
            },
            other => bail!("unexpected answer to the staging status: {other:?}"),
        }
        if Instant::now() > deadline {
            bail!("the staging had not ended within 600 s");
        }
    }
    let staged_s = staged_from.elapsed().as_secs_f64();
    let staging_cpu_s = cpu_seconds(pid) - cpu_before;
    let workers_staging_cpu_s = workers.cpu() - workers_before;

    // A roll-out of the staged release, live, in waves.
    eprintln!("   rolling load@1 out in waves {}", args.waves);
    let body = json!({"release": "load@1", "env": "load", "strategy": "live",
        "waves": args.waves, "mode": "swarm", "progress_deadline_seconds": 600});
    let a = api.clone();
    let rollout_from = Instant::now();
    let d = tokio::task::spawn_blocking(move || -> Result<Value> {
        let started = a.post("/v1/deployments", body)?;
        let id = started["id"].as_u64().context("no deployment id")?;
        crate::operate::watch(&a, id, false)
    })
    .await??;
    let rollout_s = rollout_from.elapsed().as_secs_f64();
    // The workers' lines come in a second behind at most.
    if d["outcome"] == "succeeded" {
        until(
            Duration::from_secs(10),
            "not every target's delivery order was seen",
            || {
                workers.check()?;
                Ok(workers.with(|t| t.last("deliver").0 >= n))
            },
        )
        .await?;
    }
    let delivered = workers.with(|t| t.orders.get("deliver").cloned().unwrap_or_default());
    let mut wave_orders_s = Vec::new();
    let mut wave_targets = Vec::new();
    for notice in d["notices"].as_array().into_iter().flatten() {
        let Some(w) = notice["notice"].get("WaveStarted") else {
            continue;
        };
        let at = notice["at_ms"].as_u64().unwrap_or(0);
        let targets: Vec<&str> = w["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let last = targets
            .iter()
            .map(|t| delivered.get(*t).copied())
            .collect::<Option<Vec<u64>>>()
            .and_then(|v| v.into_iter().max());
        wave_orders_s.push(last.map_or(f64::INFINITY, |l| l.saturating_sub(at) as f64 / 1e3));
        wave_targets.push(targets.len());
    }
    let report_failures = workers.with(|t| Tally::sum(&t.report_failures));

    // The coordinator killed and started again: every target comes back
    // on its own cadence and registers again.
    eprintln!("   restarting the coordinator with {n} targets connected");
    drop(client);
    let restarted = Instant::now();
    fleet.restart_coordinator(convoyd, &cargs)?;
    let pid = fleet.coordinator_pid().context("no coordinator")?;
    let client = fleet.operator_client().await?;
    wait_alive(
        &client,
        &mut workers,
        n,
        |_| true,
        "came back after the restart",
    )
    .await?;
    let restart_s = restarted.elapsed().as_secs_f64();
    let restart_cpu_s = cpu_seconds(pid);
    let (reports_before, reports_after) = (reports0, reports1);
    drop(workers);
    drop(fleet);
    Ok(Row {
        targets: n,
        register_s,
        heartbeat_ms,
        reports_per_s: (reports_after - reports_before) as f64 / secs,
        heartbeat_cpu_pct: (cpu1 - cpu0) / secs * 100.0,
        workers_cpu_pct: (workers_cpu1 - workers_cpu0) / secs * 100.0,
        rss_bytes,
        peak_rss_bytes,
        fleet_cli_s,
        fleet_api_s,
        stage_orders_s: stage_last.saturating_sub(t0) as f64 / 1e3,
        peer_lists_s: peers_last.saturating_sub(t0) as f64 / 1e3,
        staged_s,
        staging_cpu_s,
        workers_staging_cpu_s,
        wave_orders_s,
        wave_targets,
        rollout_s,
        rollout_outcome: d["outcome"].as_str().unwrap_or("unknown").to_string(),
        restart_s,
        restart_cpu_s,
        report_failures,
    })
}
