//! `convoy bench`: a local fleet, every mode, figures against the bound.
//!
//! Starts a coordinator and N targets as real `convoyd` processes on
//! loopback in a temporary directory, publishes a generated package (fresh
//! content per mode, so no mode profits from an earlier one), stages it in
//! each mode with the same caps, and reports completion times over the
//! targets, bytes moved and the Kumar–Ross bound. `rsync` stands for the
//! staging-diff push teams run today: an rsync daemon on loopback serves
//! the unpacked tree to each target directory, K at a time.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use convoy_daemon::client::Client;
use convoy_daemon::protocol::{ControlRequest, ControlResponse, DistributionMode, StageState};
use convoy_daemon::store::{RocksStore, Store};
use convoy_daemon::transfer::kumar_ross_bound;
use convoy_daemon::units::{format_bytes, parse_bytes};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use serde_json::json;

use crate::remote::{completion_seconds, control, count, follow, publish_dir, quantile, runtime};
use crate::Output;

/// What `convoy bench` was asked to do.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Targets to start
    #[arg(long, default_value_t = 10)]
    pub nodes: usize,
    /// Package size
    #[arg(long, default_value = "16MiB")]
    pub size: String,
    /// Every target's upload cap (bytes per second)
    #[arg(long, default_value = "2MiB")]
    pub uplink: String,
    /// The origin's upload cap [default: --uplink]
    #[arg(long)]
    pub origin_uplink: Option<String>,
    /// Every target's download cap [default: none]
    #[arg(long)]
    pub downlink: Option<String>,
    /// Modes to run, in order: swarm, push, pull, rsync
    #[arg(long, value_delimiter = ',', default_value = "swarm,push,pull")]
    pub modes: Vec<String>,
    /// Also stage a second version with this percentage of the content
    /// changed, and report the update
    #[arg(long, value_name = "PERCENT")]
    pub change: Option<f64>,
    /// Label the targets into this many data centres (dc0 holds the origin)
    #[arg(long, default_value_t = 1)]
    pub dcs: usize,
    /// Push and rsync: targets served at once (K)
    #[arg(long, default_value_t = 4)]
    pub push_parallel: usize,
    /// Write results.json, results.md and completion.svg here
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Keep every daemon's log here (NAME.log) [default: in the temporary
    /// directory, removed at the end]
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// The daemons' log level (error, warn, info, debug, trace)
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub daemon_log_level: String,
    /// The convoyd binary [default: next to this program]
    #[arg(long, value_name = "PATH")]
    pub convoyd: Option<PathBuf>,
}

/// One mode's figures.
#[derive(Serialize, Clone)]
pub struct RunResult {
    pub mode: String,
    pub nodes: usize,
    /// Bytes each target had to receive: the release, or for an update the
    /// chunks the new version adds.
    pub package_bytes: u64,
    pub update: bool,
    pub uplink_bytes_per_sec: u64,
    pub origin_uplink_bytes_per_sec: u64,
    pub downlink_bytes_per_sec: Option<u64>,
    pub completion_seconds: Quantiles,
    pub origin_egress_bytes: u64,
    pub total_bytes: u64,
    pub cross_dc_bytes: u64,
    /// The most any target received, over `package_bytes`.
    pub max_target_bytes_ratio: f64,
    pub bound_seconds: f64,
    pub ratio_to_bound: f64,
    pub verified_nodes: usize,
    pub cpu_seconds: f64,
    pub wall_seconds: f64,
    /// Completion time of each target, sorted.
    pub per_target_seconds: Vec<f64>,
}

#[derive(Serialize, Clone, Copy)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Quantiles {
    fn of(sorted: &[f64]) -> Self {
        Self {
            p50: quantile(sorted, 0.5),
            p99: quantile(sorted, 0.99),
            max: sorted.last().copied().unwrap_or(0.0),
        }
    }
}

struct Rates {
    uplink: u64,
    origin: u64,
    downlink: Option<u64>,
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) with a pid we own and a valid signal.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct Fleet {
    // Declared before `dir`: processes stop before their directory goes.
    targets: Vec<Proc>,
    coordinator: Option<Proc>,
    coordinator_addr: String,
    key_file: PathBuf,
    logs: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // SIGTERM all at once, then wait: stopping one by one takes N times longer.
        for p in self.targets.iter().chain(self.coordinator.iter()) {
            // SAFETY: as in `stop`.
            unsafe {
                libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        self.targets.clear();
        self.coordinator = None;
    }
}

impl Fleet {
    fn pids(&self) -> Vec<u32> {
        self.targets
            .iter()
            .chain(self.coordinator.iter())
            .map(|p| p.child.id())
            .collect()
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Starts a convoyd and waits for its ready line.
    fn spawn(&self, convoyd: &Path, name: &str, args: &[String]) -> Result<(Proc, String)> {
        let log = std::fs::File::create(self.log(name))?;
        let mut child = Command::new(convoyd)
            .args(args)
            .env_remove("CONVOY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", convoyd.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let proc = Proc {
            child,
            name: name.to_string(),
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let ready: serde_json::Value = serde_json::from_str(&line)
            .map_err(|_| anyhow!("{} did not start:\n{}", proc.name, self.tail(name)))?;
        let addr = ready["addrs"][0]
            .as_str()
            .ok_or_else(|| anyhow!("{name} printed no address"))?
            .to_string();
        Ok((proc, addr))
    }
}

fn convoyd_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let p = exe.with_file_name("convoyd");
    if !p.exists() {
        bail!(
            "convoyd is not next to {}; pass --convoyd PATH",
            exe.display()
        );
    }
    Ok(p)
}

/// CPU seconds (user + system) a process and its reaped children used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, and the same of its reaped children (the rsync
    // daemon forks one per transfer).
    let ticks: f64 = (11..=14)
        .filter_map(|i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

fn fleet_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// Writes a package of `size` incompressible bytes in files of at most 4 MiB.
fn write_package(dir: &Path, size: u64, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut left = size;
    let mut i = 0;
    while left > 0 {
        let n = left.min(4 << 20);
        let mut buf = vec![0u8; n as usize];
        rng.fill_bytes(&mut buf);
        std::fs::write(dir.join(format!("part-{i:04}.bin")), &buf)?;
        left -= n;
        i += 1;
    }
    Ok(())
}

/// Copies `from` to `to` and overwrites `percent` of its bytes in 64 KiB
/// runs at random places.
fn write_changed(from: &Path, to: &Path, percent: f64, seed: u64) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut files: Vec<PathBuf> = std::fs::read_dir(from)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let mut contents: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let total: u64 = contents.iter().map(|c| c.len() as u64).sum();
    let mut to_change = (total as f64 * percent / 100.0).round() as u64;
    const RUN: u64 = 64 << 10;
    while to_change > 0 {
        let f = rng.random_range(0..contents.len());
        let len = contents[f].len() as u64;
        let n = to_change.min(RUN).min(len);
        if n == 0 {
            continue;
        }
        let at = rng.random_range(0..=len - n) as usize;
        rng.fill_bytes(&mut contents[f][at..at + n as usize]);
        to_change -= n;
    }
    for (p, c) in files.iter().zip(contents) {
        std::fs::write(to.join(p.file_name().expect("a file")), c)?;
    }
    Ok(())
}

/// Runs the benchmark; prints and writes the results.
pub fn bench(args: BenchArgs, out: &Output) -> Result<ExitCode> {
    if args.nodes == 0 || args.dcs == 0 || args.push_parallel == 0 {
        bail!("--nodes, --dcs and --push-parallel must be at least 1");
    }
    let size = parse_bytes(&args.size).map_err(|e| anyhow!("--size: {e}"))?;
    let rate = |t: &str, what: &str| -> Result<u64> {
        match parse_bytes(t).map_err(|e| anyhow!("--{what}: {e}"))? {
            0 => bail!("--{what} must be more than 0"),
            r => Ok(r),
        }
    };
    let uplink = rate(&args.uplink, "uplink")?;
    let rates = Rates {
        uplink,
        origin: match &args.origin_uplink {
            Some(t) => rate(t, "origin-uplink")?,
            None => uplink,
        },
        downlink: args
            .downlink
            .as_deref()
            .map(|t| rate(t, "downlink"))
            .transpose()?,
    };
    if size == 0 {
        bail!("--size must be more than 0");
    }
    if let Some(c) = args.change {
        if !(c > 0.0 && c <= 100.0) {
            bail!("--change is a percentage in (0, 100]");
        }
    }
    let mut modes = Vec::new();
    for m in &args.modes {
        match m.as_str() {
            "rsync" => {
                if which("rsync").is_none() {
                    eprintln!("convoy bench: rsync is not installed; skipping the rsync mode");
                } else {
                    modes.push(None);
                }
            }
            other => modes.push(Some(
                other.parse::<DistributionMode>().map_err(|e| anyhow!(e))?,
            )),
        }
    }
    let convoyd = convoyd_path(args.convoyd.as_deref())?;
    let rt = runtime()?;
    let results = rt.block_on(async {
        tokio::select! {
            r = run_all(&args, &rates, size, &modes, &convoyd) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; the fleet is stopped and its directory removed")),
        }
    })?;
    report(&results, &args, out)?;
    Ok(ExitCode::SUCCESS)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

async fn run_all(
    args: &BenchArgs,
    rates: &Rates,
    size: u64,
    modes: &[Option<DistributionMode>],
    convoyd: &Path,
) -> Result<Vec<RunResult>> {
    let fleet = start_fleet(args, rates, convoyd).await?;
    let key = convoy_daemon::fleet_key::read(&fleet.key_file)?;
    let client = Client::connect(&fleet.coordinator_addr, key)
        .await
        .map_err(|e| anyhow!(e))?;
    wait_for_targets(&client, args.nodes).await?;
    let store = RocksStore::open(&fleet.dir.path().join("cli-store"))?;
    let mut results = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let name = mode.map_or("rsync", |m| m.name());
        let v1 = fleet.dir.path().join(format!("pkg-{name}-1"));
        write_package(&v1, size, 1000 + i as u64)?;
        let v2 = fleet.dir.path().join(format!("pkg-{name}-2"));
        if let Some(pct) = args.change {
            write_changed(&v1, &v2, pct, 2000 + i as u64)?;
        }
        let runs = match mode {
            Some(m) => {
                let mut runs = vec![
                    stage_once(&client, &store, &fleet, args, rates, *m, &v1, "1", None).await?,
                ];
                if args.change.is_some() {
                    let base = store
                        .resolve("bench", &format!("{name}-1"))?
                        .and_then(|id| store.get_manifest(&id).ok().flatten());
                    runs.push(
                        stage_once(&client, &store, &fleet, args, rates, *m, &v2, "2", base)
                            .await?,
                    );
                }
                runs
            }
            None => rsync_runs(&fleet, args, rates, &v1, args.change.map(|_| v2.as_path()))?,
        };
        for r in &runs {
            eprintln!(
                "{}{}: p50 {:.2}s p99 {:.2}s max {:.2}s, bound {:.2}s ({:.2}x), origin sent {}, cpu {:.1}s",
                r.mode,
                if r.update { " (update)" } else { "" },
                r.completion_seconds.p50,
                r.completion_seconds.p99,
                r.completion_seconds.max,
                r.bound_seconds,
                r.ratio_to_bound,
                format_bytes(r.origin_egress_bytes),
                r.cpu_seconds,
            );
        }
        results.extend(runs);
    }
    client.close().await;
    drop(fleet);
    Ok(results)
}

async fn start_fleet(args: &BenchArgs, rates: &Rates, convoyd: &Path) -> Result<Fleet> {
    let dir = tempfile::Builder::new().prefix("convoy-bench-").tempdir()?;
    let logs = args.logs.clone().unwrap_or_else(|| dir.path().join("logs"));
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let key_file = dir.path().join("fleet.key");
    convoy_daemon::fleet_key::generate(&key_file)?;
    let mut fleet = Fleet {
        targets: Vec::new(),
        coordinator: None,
        coordinator_addr: String::new(),
        key_file,
        logs,
        dir,
    };
    let common = |name: &str, up: u64| -> Vec<String> {
        let mut a = vec![
            "--data-dir".into(),
            fleet.dir.path().join(name).display().to_string(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--fleet-key-file".into(),
            fleet.key_file.display().to_string(),
            "--upload-rate".into(),
            up.to_string(),
            "--log-level".into(),
            args.daemon_log_level.clone(),
        ];
        if let Some(d) = rates.downlink {
            a.extend(["--download-rate".into(), d.to_string()]);
        }
        a
    };
    eprintln!(
        "starting a coordinator and {} targets in {}",
        args.nodes,
        fleet.dir.path().display()
    );
    let mut cargs = vec!["coordinator".to_string()];
    cargs.extend(common("coordinator", rates.origin));
    cargs.extend([
        "--label".into(),
        "dc=dc0".into(),
        "--push-parallel".into(),
        args.push_parallel.to_string(),
    ]);
    let (proc, addr) = fleet.spawn(convoyd, "coordinator", &cargs)?;
    fleet.coordinator = Some(proc);
    fleet.coordinator_addr = addr;
    for i in 0..args.nodes {
        let name = format!("target-{i:03}");
        let mut targs = vec!["target".to_string()];
        targs.extend(common(&name, rates.uplink));
        targs.extend([
            "--coordinator".into(),
            fleet.coordinator_addr.clone(),
            "--label".into(),
            format!("dc=dc{}", i % args.dcs),
            "--label".into(),
            format!("zone=z{}", (i / args.dcs) % 2),
        ]);
        let (proc, _) = fleet.spawn(convoyd, &name, &targs)?;
        fleet.targets.push(proc);
    }
    Ok(fleet)
}

async fn wait_for_targets(client: &Client, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if let ControlResponse::Fleet(m) = control(client, ControlRequest::Fleet).await? {
            let alive = m.iter().filter(|m| m.alive).count();
            if alive >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {alive} of {n} targets registered within 60 s");
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn stage_once(
    client: &Client,
    store: &RocksStore,
    fleet: &Fleet,
    args: &BenchArgs,
    rates: &Rates,
    mode: DistributionMode,
    dir: &Path,
    version: &str,
    base: Option<convoy_chunker::Manifest>,
) -> Result<RunResult> {
    let version = format!("{}-{version}", mode.name());
    let (_, manifest, _, _) = publish_dir(client, store, dir, "bench", &version).await?;
    // What each target must receive: the chunks its current release lacks.
    let unique = manifest.unique_chunks();
    let needed: Vec<_> = match &base {
        Some(b) => {
            let held: std::collections::HashSet<_> = b.chunk_refs().map(|c| c.hash).collect();
            unique
                .iter()
                .filter(|c| !held.contains(&c.hash))
                .copied()
                .collect()
        }
        None => unique.clone(),
    };
    let package_bytes: u64 = store
        .chunk_info(&needed.iter().map(|c| c.hash).collect::<Vec<_>>())?
        .iter()
        .map(|i| i.map_or(0, |i| u64::from(i.stored_len)))
        .sum();
    let pids = fleet.pids();
    let cpu0 = fleet_cpu(&pids);
    let started = Instant::now();
    let ControlResponse::StagingStarted { id: staging, .. } = control(
        client,
        ControlRequest::StartStaging {
            release: format!("bench@{version}"),
            selector: Default::default(),
            mode,
        },
    )
    .await?
    else {
        bail!("unexpected answer to a staging request");
    };
    let n = args.nodes as f64;
    let slowest = n * package_bytes as f64 / rates.origin as f64;
    let timeout = Duration::from_secs_f64(3.0 * slowest + 120.0);
    let report = follow(client, staging, Some(timeout)).await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = fleet_cpu(&pids) - cpu0;
    let secs = completion_seconds(&report);
    let (staged, _) = count(&report);
    let progress: Vec<_> = report
        .targets
        .iter()
        .filter_map(|t| t.progress.as_ref())
        .collect();
    let max_target = progress.iter().map(|p| p.bytes_received).max().unwrap_or(0);
    let bound = bound(rates, args.nodes, package_bytes);
    let q = Quantiles::of(&secs);
    Ok(RunResult {
        mode: mode.name().into(),
        nodes: args.nodes,
        package_bytes,
        update: base.is_some(),
        uplink_bytes_per_sec: rates.uplink,
        origin_uplink_bytes_per_sec: rates.origin,
        downlink_bytes_per_sec: rates.downlink,
        completion_seconds: q,
        origin_egress_bytes: report.origin_bytes_sent,
        total_bytes: progress.iter().map(|p| p.bytes_received).sum(),
        cross_dc_bytes: progress.iter().map(|p| p.bytes_received_cross_dc).sum(),
        max_target_bytes_ratio: max_target as f64 / package_bytes.max(1) as f64,
        bound_seconds: bound,
        ratio_to_bound: q.p99 / bound,
        verified_nodes: progress
            .iter()
            .filter(|p| p.state == StageState::Staged)
            .count()
            .min(staged),
        cpu_seconds: cpu,
        wall_seconds: wall,
        per_target_seconds: secs,
    })
}

fn bound(rates: &Rates, nodes: usize, bytes: u64) -> f64 {
    let ups = vec![rates.uplink as f64; nodes];
    let downs = vec![rates.downlink.map_or(f64::INFINITY, |d| d as f64); nodes];
    kumar_ross_bound(bytes, rates.origin as f64, &ups, &downs)
}

/// The staging-diff push of today: rsync from a daemon on loopback into a
/// directory per target, K at a time, each at 1/K of the origin's cap.
fn rsync_runs(
    fleet: &Fleet,
    args: &BenchArgs,
    rates: &Rates,
    v1: &Path,
    v2: Option<&Path>,
) -> Result<Vec<RunResult>> {
    let root = fleet.dir.path().join("rsync");
    std::fs::create_dir_all(&root)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = root.join("rsyncd.conf");
    let mut text = format!(
        "use chroot = no\nread only = yes\n[v1]\npath = {}\n",
        v1.display()
    );
    if let Some(v2) = v2 {
        text += &format!("[v2]\npath = {}\n", v2.display());
    }
    std::fs::write(&conf, text)?;
    let daemon = Proc {
        child: Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(fleet.log("rsyncd"))?)
            .spawn()
            .context("cannot start the rsync daemon")?,
        name: "rsyncd".into(),
    };
    // rsync gives no readiness signal: poll its port, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "{} did not listen within 10 s:\n{}",
                daemon.name,
                fleet.tail("rsyncd")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut runs = vec![rsync_once(
        &root,
        port,
        daemon.child.id(),
        "v1",
        args,
        rates,
        dir_bytes(v1)?,
        false,
    )?];
    if let Some(v2) = v2 {
        let changed = changed_bytes(v1, v2)?;
        runs.push(rsync_once(
            &root,
            port,
            daemon.child.id(),
            "v2",
            args,
            rates,
            changed,
            true,
        )?);
    }
    drop(daemon);
    Ok(runs)
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        n += e?.metadata()?.len();
    }
    Ok(n)
}

/// Bytes that differ between two trees of the same files (64 KiB runs).
fn changed_bytes(a: &Path, b: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(a)? {
        let p = e?.path();
        let x = std::fs::read(&p)?;
        let y = std::fs::read(b.join(p.file_name().expect("file")))?;
        n += x
            .chunks(64 << 10)
            .zip(y.chunks(64 << 10))
            .filter(|(x, y)| x != y)
            .map(|(x, _)| x.len() as u64)
            .sum::<u64>();
    }
    Ok(n)
}

#[allow(clippy::too_many_arguments)]
fn rsync_once(
    root: &Path,
    port: u16,
    daemon_pid: u32,
    module: &str,
    args: &BenchArgs,
    rates: &Rates,
    package_bytes: u64,
    update: bool,
) -> Result<RunResult> {
    let k = args.push_parallel;
    let per_transfer_kib = (rates.origin / k as u64 / 1024).max(1);
    let started = Instant::now();
    let mut done = Vec::new();
    let mut received = 0u64;
    let cpu0 = reaped_children_cpu() + cpu_seconds(daemon_pid);
    let mut next = 0;
    let mut running: Vec<(Child, usize)> = Vec::new();
    while next < args.nodes || !running.is_empty() {
        while running.len() < k && next < args.nodes {
            let dest = root.join(format!("target-{next:03}"));
            std::fs::create_dir_all(&dest)?;
            let child = Command::new("rsync")
                .args(["-a", "--stats", "--inplace"])
                .arg(format!("--bwlimit={per_transfer_kib}"))
                .arg(format!("rsync://127.0.0.1:{port}/{module}/"))
                .arg(format!("{}/", dest.display()))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("cannot run rsync")?;
            running.push((child, next));
            next += 1;
        }
        // Wait for the oldest transfer; the others run meanwhile.
        let (child, i) = running.remove(0);
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "rsync to target {i} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        done.push(started.elapsed().as_secs_f64());
        received += parse_rsync_received(&String::from_utf8_lossy(&output.stdout));
    }
    let cpu = reaped_children_cpu() + cpu_seconds(daemon_pid) - cpu0;
    done.sort_by(f64::total_cmp);
    let q = Quantiles::of(&done);
    let bound = bound(rates, args.nodes, package_bytes);
    Ok(RunResult {
        mode: "rsync".into(),
        nodes: args.nodes,
        package_bytes,
        update,
        uplink_bytes_per_sec: rates.uplink,
        origin_uplink_bytes_per_sec: rates.origin,
        downlink_bytes_per_sec: rates.downlink,
        completion_seconds: q,
        origin_egress_bytes: received,
        total_bytes: received,
        cross_dc_bytes: 0,
        max_target_bytes_ratio: 0.0,
        bound_seconds: bound,
        ratio_to_bound: q.p99 / bound,
        verified_nodes: done.len(),
        cpu_seconds: cpu,
        wall_seconds: started.elapsed().as_secs_f64(),
        per_target_seconds: done,
    })
}

/// CPU seconds of this process's children that have been waited for.
fn reaped_children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn parse_rsync_received(stats: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes received: "))
        .map(|v| v.replace(',', "").trim().parse().unwrap_or(0))
        .unwrap_or(0)
}

fn report(results: &[RunResult], args: &BenchArgs, out: &Output) -> Result<()> {
    let table = markdown(results, args);
    out.emit(json!({ "runs": results }), || table.clone());
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_vec_pretty(&json!({ "runs": results }))?,
        )?;
        std::fs::write(dir.join("results.md"), &table)?;
        plot(results, &dir.join("completion.svg"))?;
        eprintln!(
            "wrote results.json, results.md and completion.svg to {}",
            dir.display()
        );
    }
    Ok(())
}

fn markdown(results: &[RunResult], args: &BenchArgs) -> String {
    let mut s = format!(
        "convoy bench --nodes {} --size {} --uplink {}{}{}{} --dcs {}\n\n",
        args.nodes,
        args.size,
        args.uplink,
        args.origin_uplink
            .as_ref()
            .map(|o| format!(" --origin-uplink {o}"))
            .unwrap_or_default(),
        args.downlink
            .as_ref()
            .map(|o| format!(" --downlink {o}"))
            .unwrap_or_default(),
        args.change
            .map(|c| format!(" --change {c}"))
            .unwrap_or_default(),
        args.dcs,
    );
    s += "| mode | update | bytes/target | p50 s | p99 s | max s | bound s | p99/bound | origin egress | total moved | cross-dc | verified | fleet CPU s |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in results {
        s += &format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {}/{} | {:.1} |\n",
            r.mode,
            if r.update { "yes" } else { "no" },
            format_bytes(r.package_bytes),
            r.completion_seconds.p50,
            r.completion_seconds.p99,
            r.completion_seconds.max,
            r.bound_seconds,
            r.ratio_to_bound,
            format_bytes(r.origin_egress_bytes),
            format_bytes(r.total_bytes),
            format_bytes(r.cross_dc_bytes),
            r.verified_nodes,
            r.nodes,
            r.cpu_seconds,
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for r in results.iter().filter(|r| r.mode != "rsync") {
        let busy = r.cpu_seconds / (r.wall_seconds * cores);
        if busy > 0.8 {
            s += &format!(
                "\nwarning: {}{} used {:.0}% of the machine's {} cores: the caps are too high for this machine to encrypt and verify the fleet's traffic, so times measure the CPU, not the network\n",
                r.mode,
                if r.update { " (update)" } else { "" },
                busy * 100.0,
                cores
            );
        }
    }
    s
}

/// Completion-time distributions: the share of targets done against time.
fn plot(results: &[RunResult], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let max_t = results
        .iter()
        .map(|r| r.completion_seconds.max)
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.05;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("targets done over time", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_t, 0.0..1.0)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the staging started")
        .y_desc("share of targets staged")
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    for (i, r) in results.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let n = r.per_target_seconds.len().max(1) as f64;
        let mut points = vec![(0.0, 0.0)];
        for (k, t) in r.per_target_seconds.iter().enumerate() {
            points.push((*t, k as f64 / n));
            points.push((*t, (k + 1) as f64 / n));
        }
        let label = format!("{}{}", r.mode, if r.update { " (update)" } else { "" });
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_stats_parse() {
        let s = "Number of files: 3\nTotal bytes sent: 1,024\nTotal bytes received: 16,777,216\n";
        assert_eq!(parse_rsync_received(s), 16_777_216);
        assert_eq!(parse_rsync_received("nothing"), 0);
    }

    #[test]
    fn changed_package_differs_by_the_share_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_package(&a, 8 << 20, 1).unwrap();
        write_changed(&a, &b, 1.0, 2).unwrap();
        let changed = changed_bytes(&a, &b).unwrap();
        // 1% of 8 MiB, counted in 64 KiB runs that may straddle two.
        assert!(
            ((80 << 10)..=4 * (84 << 10)).contains(&changed),
            "{changed}"
        );
        assert_eq!(dir_bytes(&b).unwrap(), 8 << 20);
    }
}
