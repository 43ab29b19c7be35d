//! `convoy bench`: a local fleet, every mode, figures against the bound.
//!
//! Starts a coordinator and N targets as real `convoyd` processes on
//! loopback in a temporary directory, publishes a generated package (fresh
//! content per mode, so no mode profits from an earlier one), stages it in
//! each mode with the same caps, and reports completion times over the
//! targets, bytes moved and the Kumar–Ross bound. `rsync` stands for the
//! staging-diff push teams run today: an rsync daemon on loopback serves
//! the unpacked tree to each target directory, K at a time; `tcp` is the
//! ceiling: the same bytes copied over plain TCP sockets, K at a time.

mod baseline;
pub(crate) mod fleet;
mod report;

pub(crate) use report::meta;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Result};
use convoy_daemon::net::client::Client;
use convoy_daemon::protocol::{
    ControlRequest, ControlResponse, DistributionMode, StageState, StagingReport,
};
use convoy_daemon::store::{RocksStore, Store};
use convoy_daemon::transfer::kumar_ross_bound;
use convoy_daemon::units::{parse_bytes, unix_ms};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::remote::{control, count, follow, publish_dir, quantile, runtime};
use crate::Output;
use fleet::{convoyd_path, start_fleet, wait_for_targets, Fleet, ProcStats};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Targets to start
    #[arg(long, default_value_t = 10)]
    pub nodes: usize,
    /// Package size [default: 16MiB]
    #[arg(long)]
    pub size: Option<String>,
    /// Every target's upload cap (bytes per second, or "unlimited")
    #[arg(long, default_value = "2MiB")]
    pub uplink: String,
    /// The origin's upload cap [default: --uplink]
    #[arg(long)]
    pub origin_uplink: Option<String>,
    /// Every target's download cap [default: unlimited]
    #[arg(long)]
    pub downlink: Option<String>,
    /// Modes to run, in order: swarm, push, pull, rsync (the staging-diff
    /// push of today), tcp (the same bytes over plain TCP: the ceiling;
    /// then again as tcp-verify, which BLAKE3-hashes and fsyncs what it
    /// receives, as a target must)
    #[arg(long, value_delimiter = ',', default_value = "swarm,push,pull")]
    pub modes: Vec<String>,
    /// Also stage a second version with this percentage of the content
    /// changed in 64 KiB runs, and report the update
    #[arg(long, value_name = "PERCENT", conflicts_with_all = ["edits", "from"])]
    pub change: Option<f64>,
    /// Also stage a second version with N small edits (1 to 8 bytes each)
    /// scattered over the files, as a recompiled or minified bundle
    /// changes, and report the update
    #[arg(long, value_name = "N", conflicts_with = "from")]
    pub edits: Option<u64>,
    /// Stage this tree instead of a generated package (each mode on a fresh
    /// fleet, since the content cannot be made new per mode)
    #[arg(long, value_name = "DIR", conflicts_with = "size")]
    pub from: Option<PathBuf>,
    /// With --from: then stage this tree as the update
    #[arg(long, value_name = "DIR", requires = "from", conflicts_with_all = ["change", "edits"])]
    pub to: Option<PathBuf>,
    /// The coordinator's --delta-bases: an update's binary deltas are made
    /// from this many older versions and sent to targets holding one; 0
    /// moves updates as chunks only (to compare)
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub delta_bases: usize,
    /// Label the targets into this many data centres (dc0 holds the origin)
    #[arg(long, default_value_t = 1)]
    pub dcs: usize,
    /// Run each data centre in a network namespace of its own, joined to
    /// the others through a backbone namespace by veth links (addresses
    /// in 198.18.0.0/15; everything is removed at the end, also on
    /// Ctrl-C). Needs root and iproute2. Convoy modes only
    #[arg(long)]
    pub netns: bool,
    /// With --netns: cap each data centre's link, each way (bytes per
    /// second, with a tbf qdisc) [default: uncapped]
    #[arg(long, value_name = "RATE", requires = "netns")]
    pub dc_link: Option<String>,
    /// Push, rsync and tcp: targets served at once (K)
    #[arg(long, default_value_t = 4)]
    pub push_parallel: usize,
    /// The handshake every daemon offers first (convoyd --security):
    /// `tls` (AES-GCM) or `noise` (ChaCha20-Poly1305), to compare their cost
    #[arg(long, value_name = "HANDSHAKE", default_value = "tls")]
    pub security: convoy_daemon::net::Security,
    /// Run rsync without -z (as within one data centre, where compressing
    /// costs more than it saves); by default it compresses, as a push
    /// across data centres runs
    #[arg(long)]
    pub rsync_plain: bool,
    /// Write results.json, results.md and completion.svg here
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Keep every daemon's log here (NAME.log) [default: in the temporary
    /// directory, removed at the end]
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Run each mode this many times (fresh content each time) and
    /// report each run, then the median and range over the runs
    #[arg(long, value_name = "R", default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    pub repeat: usize,
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
    /// chunks the new version adds (convoy modes: with the origin's deltas
    /// where they are smaller, as a target holding the old version plans).
    pub package_bytes: u64,
    pub update: bool,
    /// For a convoy update with deltas: the chunks the new version adds
    /// (`package_bytes` without deltas), and the bytes of the origin's
    /// deltas from the old version.
    pub package_bytes_without_deltas: Option<u64>,
    pub delta_bytes: Option<u64>,
    /// Caps in bytes per second; null is unlimited.
    pub uplink_bytes_per_sec: Option<u64>,
    pub origin_uplink_bytes_per_sec: Option<u64>,
    pub downlink_bytes_per_sec: Option<u64>,
    pub completion_seconds: Quantiles,
    pub origin_egress_bytes: u64,
    /// Every byte the run moved, control included: for convoy modes what
    /// the daemons' TCP connections carried (chunk bodies, orders with
    /// their manifests, have announcements, bitfields, heartbeats during
    /// the run, noise and yamux framing) as the receivers counted it; for
    /// rsync its whole protocol stream both ways; for tcp the bytes copied.
    pub total_bytes: u64,
    /// Convoy modes: the same bytes as the senders counted them (read once
    /// chunk traffic had stopped): a cross-check of `total_bytes`.
    pub total_bytes_sent: Option<u64>,
    /// Chunk bodies (payload) the targets received; the copies' bytes for
    /// the baselines.
    pub chunk_bytes: u64,
    /// For an update, the one reference every mode is set against: the
    /// 64 KiB runs of the package that changed (what tcp sends), and the
    /// bytes of the chunks the new version adds (FastCDC, as packed).
    pub changed_bytes: Option<u64>,
    pub new_chunk_bytes: Option<u64>,
    /// Chunk bodies the targets received from another data centre, as
    /// the daemons count them.
    pub cross_dc_bytes: u64,
    /// With --netns: the bytes that crossed between data centres as the
    /// kernel counted them on the links (every byte entering a data
    /// centre, headers and control included, less the bench's own).
    pub cross_dc_link_bytes: Option<u64>,
    /// The most any target received, over `package_bytes`.
    pub max_target_bytes_ratio: f64,
    /// The Kumar-Ross bound; null when the caps leave it unbounded.
    pub bound_seconds: Option<f64>,
    pub ratio_to_bound: Option<f64>,
    pub verified_nodes: usize,
    /// CPU seconds of the whole fleet (every process taking part), and of
    /// the origin's side alone.
    pub cpu_seconds: f64,
    pub origin_cpu_seconds: f64,
    pub wall_seconds: f64,
    /// Peak resident memory during the run (convoy modes).
    pub origin_peak_rss_bytes: Option<u64>,
    pub target_peak_rss_bytes: Option<u64>,
    /// Completion time of each target, sorted; `null` (infinite) for a
    /// target that failed or did not finish.
    pub per_target_seconds: Vec<f64>,
    /// Which of the `--repeat` runs (from 0).
    pub repeat: usize,
}

impl RunResult {
    /// Targets that failed or did not finish.
    pub fn unfinished(&self) -> usize {
        self.per_target_seconds
            .iter()
            .filter(|t| !t.is_finite())
            .count()
    }
}

/// What one run measured; [`RunResult::new`] adds the setting and the bound.
struct Measured {
    mode: &'static str,
    package_bytes: u64,
    update: bool,
    /// Without deltas, and the deltas' bytes, when deltas were used.
    deltas: Option<(u64, u64)>,
    /// Completion time of each target that finished.
    done: Vec<f64>,
    origin_egress_bytes: u64,
    total_bytes: u64,
    total_bytes_sent: Option<u64>,
    chunk_bytes: u64,
    cross_dc_bytes: u64,
    cross_dc_link_bytes: Option<u64>,
    max_target_bytes: u64,
    verified_nodes: usize,
    cpu: Cpu,
    wall_seconds: f64,
    peak_rss: Option<(u64, u64)>,
}

/// CPU seconds: the whole fleet, and the origin's part.
#[derive(Clone, Copy, Default)]
struct Cpu {
    fleet: f64,
    origin: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            fleet: self.fleet - o.fleet,
            origin: self.origin - o.origin,
        }
    }
}

impl RunResult {
    fn new(args: &BenchArgs, rates: &Rates, mut m: Measured) -> Self {
        // A target that did not finish never did: its time is infinite,
        // and so are the run's p99 and max, however many others finished.
        let unfinished = args.nodes.saturating_sub(m.done.len());
        m.done
            .extend(std::iter::repeat_n(f64::INFINITY, unfinished));
        m.done.sort_by(f64::total_cmp);
        let mut q = Quantiles::of(&m.done);
        if unfinished > 0 {
            q.p99 = f64::INFINITY;
        }
        let bound = bound(rates, args.nodes, args.dcs, m.package_bytes);
        Self {
            mode: m.mode.into(),
            nodes: args.nodes,
            package_bytes: m.package_bytes,
            update: m.update,
            package_bytes_without_deltas: m.deltas.map(|d| d.0),
            delta_bytes: m.deltas.map(|d| d.1),
            uplink_bytes_per_sec: rates.uplink,
            origin_uplink_bytes_per_sec: rates.origin,
            downlink_bytes_per_sec: rates.downlink,
            completion_seconds: q,
            origin_egress_bytes: m.origin_egress_bytes,
            total_bytes: m.total_bytes,
            total_bytes_sent: m.total_bytes_sent,
            chunk_bytes: m.chunk_bytes,
            changed_bytes: None,
            new_chunk_bytes: None,
            cross_dc_bytes: m.cross_dc_bytes,
            cross_dc_link_bytes: m.cross_dc_link_bytes,
            max_target_bytes_ratio: m.max_target_bytes as f64 / m.package_bytes.max(1) as f64,
            bound_seconds: bound,
            ratio_to_bound: bound.map(|b| q.p99 / b),
            verified_nodes: m.verified_nodes,
            cpu_seconds: m.cpu.fleet,
            origin_cpu_seconds: m.cpu.origin,
            wall_seconds: m.wall_seconds,
            origin_peak_rss_bytes: m.peak_rss.map(|r| r.0),
            target_peak_rss_bytes: m.peak_rss.map(|r| r.1),
            per_target_seconds: m.done,
            repeat: 0,
        }
    }
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

/// The caps of a run in bytes per second; `None` is unlimited.
struct Rates {
    uplink: Option<u64>,
    origin: Option<u64>,
    downlink: Option<u64>,
    /// Each data centre's link, with --netns.
    dc_link: Option<u64>,
}

impl Rates {
    /// Seconds the slowest mode (the origin sending N copies) would take,
    /// at the origin's cap or, uncapped, at a loopback-ish 20 MiB/s.
    fn slowest_seconds(&self, nodes: usize, bytes: u64) -> f64 {
        nodes as f64 * bytes as f64 / self.origin.unwrap_or(20 << 20) as f64
    }
}

/// The modes `convoy bench` runs.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Convoy(DistributionMode),
    Rsync,
    Tcp,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Convoy(m) => m.name(),
            Mode::Rsync => "rsync",
            Mode::Tcp => "tcp",
        }
    }
}

/// A rate flag: a size per second, or `unlimited`.
fn parse_rate(text: &str, flag: &str) -> Result<Option<u64>> {
    if text == "unlimited" {
        return Ok(None);
    }
    match parse_bytes(text).map_err(|e| anyhow!("--{flag}: {e}"))? {
        0 => bail!("--{flag} must be more than 0 (or \"unlimited\")"),
        r => Ok(Some(r)),
    }
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

/// Copies the package in `from` to `to`, its files' bytes changed by
/// `edit` (given a generator seeded with `seed` and the total size).
fn write_modified(
    from: &Path,
    to: &Path,
    seed: u64,
    edit: impl FnOnce(&mut SmallRng, &mut [Vec<u8>], u64),
) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut files: Vec<PathBuf> = std::fs::read_dir(from)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let mut contents: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let total: u64 = contents.iter().map(|c| c.len() as u64).sum();
    edit(&mut rng, &mut contents, total);
    for (p, c) in files.iter().zip(contents) {
        std::fs::write(to.join(p.file_name().expect("a file")), c)?;
    }
    Ok(())
}

/// Copies `from` to `to` and overwrites `percent` of its bytes in 64 KiB
/// runs at random places.
fn write_changed(from: &Path, to: &Path, percent: f64, seed: u64) -> Result<()> {
    write_modified(from, to, seed, |rng, contents, total| {
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
    })
}

/// Copies `from` to `to` with `edits` edits of 1 to 8 random bytes at
/// random places, spread over the files by their size.
fn write_edited(from: &Path, to: &Path, edits: u64, seed: u64) -> Result<()> {
    write_modified(from, to, seed, |rng, contents, total| {
        for _ in 0..edits {
            // A byte of the whole package, then the file it falls in.
            let mut at = rng.random_range(0..total.max(1));
            let f = contents
                .iter()
                .position(|c| {
                    let hit = at < c.len() as u64;
                    if !hit {
                        at -= c.len() as u64;
                    }
                    hit
                })
                .expect("an offset inside the package");
            let len = contents[f].len();
            let n = rng.random_range(1..=8usize).min(len - at as usize);
            rng.fill_bytes(&mut contents[f][at as usize..at as usize + n]);
        }
    })
}

/// Runs the benchmark; prints and writes the results.
pub fn bench(args: BenchArgs, out: &Output) -> Result<ExitCode> {
    if args.nodes == 0 || args.dcs == 0 || args.push_parallel == 0 {
        bail!("--nodes, --dcs and --push-parallel must be at least 1");
    }
    let size = match (&args.size, &args.from) {
        (Some(s), _) => parse_bytes(s).map_err(|e| anyhow!("--size: {e}"))?,
        (None, Some(dir)) => {
            if !dir.is_dir() {
                bail!("--from {}: not a directory", dir.display());
            }
            if let Some(to) = args.to.as_ref().filter(|t| !t.is_dir()) {
                bail!("--to {}: not a directory", to.display());
            }
            baseline::dir_bytes(dir)?
        }
        (None, None) => 16 << 20,
    };
    let uplink = parse_rate(&args.uplink, "uplink")?;
    let rates = Rates {
        uplink,
        origin: match &args.origin_uplink {
            Some(t) => parse_rate(t, "origin-uplink")?,
            None => uplink,
        },
        downlink: match &args.downlink {
            Some(t) => parse_rate(t, "downlink")?,
            None => None,
        },
        dc_link: match &args.dc_link {
            Some(t) => parse_rate(t, "dc-link")?,
            None => None,
        },
    };
    if size == 0 {
        bail!("--size must be more than 0");
    }
    if args.edits == Some(0) {
        bail!("--edits must be at least 1");
    }
    if let Some(c) = args.change {
        if !(c > 0.0 && c <= 100.0) {
            bail!("--change is a percentage in (0, 100]");
        }
    }
    let mut modes = Vec::new();
    for m in &args.modes {
        match m.as_str() {
            "rsync" | "tcp" if args.netns => {
                bail!("--netns runs the convoy modes (swarm, push, pull), not {m}")
            }
            "rsync" if which("rsync").is_none() => {
                eprintln!("convoy bench: rsync is not installed; skipping the rsync mode");
            }
            "rsync" => modes.push(Mode::Rsync),
            "tcp" => modes.push(Mode::Tcp),
            other => modes.push(Mode::Convoy(
                other
                    .parse::<DistributionMode>()
                    .map_err(|e| anyhow!("--modes: {e}; or rsync, tcp"))?,
            )),
        }
    }
    let convoyd = convoyd_path(args.convoyd.as_deref())?;
    let rt = runtime()?;
    let (idle, results) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        // Installed before anything starts: a signal that comes while the
        // fleet (or its network lab) is being set up waits for the first
        // await, and is not the default death that would leave it behind.
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = run_all(&args, &rates, size, &modes, &convoyd) => r,
            _ = int.recv() => Err(anyhow!("interrupted; the fleet is stopped and its directory removed")),
            _ = term.recv() => Err(anyhow!("terminated; the fleet is stopped and its directory removed")),
        }
    })?;
    report::report(&idle, &results, &args, out)?;
    let mut failed = false;
    for r in results.iter().filter(|r| r.unfinished() > 0) {
        eprintln!(
            "convoy bench: {} of {} targets did not finish {}{}: its p99 is infinite",
            r.unfinished(),
            r.nodes,
            r.mode,
            if r.update { " (update)" } else { "" },
        );
        failed = true;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Resident memory of the idle fleet, just after every target registered.
#[derive(Serialize)]
pub struct IdleRss {
    pub origin_bytes: u64,
    pub target_max_bytes: u64,
}

async fn run_all(
    args: &BenchArgs,
    rates: &Rates,
    size: u64,
    modes: &[Mode],
    convoyd: &Path,
) -> Result<(IdleRss, Vec<RunResult>)> {
    let mut fleet = start_fleet(args, rates, convoyd).await?;
    let mut client = fleet.operator_client().await?;
    wait_for_targets(&client, args.nodes).await?;
    let idle = fleet.idle_rss();
    let mut store = RocksStore::open(&fleet.dir.path().join("cli-store"))?;
    let mut results = Vec::new();
    let runs = (0..args.repeat).flat_map(|r| modes.iter().map(move |m| (r, *m)));
    for (k, (repeat, mode)) in runs.enumerate() {
        let name = mode.name();
        if k > 0 && args.from.is_some() {
            // The same trees again: only a fleet that holds nothing yet
            // measures this mode on its own.
            client.close().await;
            drop(store);
            drop(fleet);
            fleet = start_fleet(args, rates, convoyd).await?;
            client = fleet.operator_client().await?;
            wait_for_targets(&client, args.nodes).await?;
            store = RocksStore::open(&fleet.dir.path().join("cli-store"))?;
        }
        // Each run's versions and content are its own.
        let tag = |v: u32| match args.repeat {
            1 => v.to_string(),
            _ => format!("r{repeat}-{v}"),
        };
        let generated = fleet.dir.path().join(format!("pkg-{name}-{}", tag(1)));
        let v1 = match &args.from {
            Some(dir) => dir.clone(),
            None => {
                write_package(&generated, size, 1000 + k as u64)?;
                generated
            }
        };
        let edited = fleet.dir.path().join(format!("pkg-{name}-{}", tag(2)));
        let v2 = match (&args.to, args.change, args.edits) {
            (Some(to), _, _) => Some(to.clone()),
            (None, Some(pct), _) => {
                write_changed(&v1, &edited, pct, 2000 + k as u64)?;
                Some(edited)
            }
            (None, None, Some(n)) => {
                write_edited(&v1, &edited, n, 2000 + k as u64)?;
                Some(edited)
            }
            (None, None, None) => None,
        };
        let v2 = v2.as_deref();
        let mut runs = match mode {
            Mode::Convoy(m) => {
                let mut runs = vec![
                    stage_once(&client, &store, &fleet, args, rates, m, &v1, &tag(1), None).await?,
                ];
                if let Some(v2) = v2 {
                    let base = store
                        .resolve("bench", &format!("{name}-{}", tag(1)))?
                        .and_then(|id| store.get_manifest(&id).ok().flatten());
                    runs.push(
                        stage_once(&client, &store, &fleet, args, rates, m, v2, &tag(2), base)
                            .await?,
                    );
                }
                runs
            }
            Mode::Rsync | Mode::Tcp => {
                // A baseline's copies of an earlier run would be its base.
                let dirs = match mode {
                    Mode::Rsync => vec![name],
                    _ => vec![baseline::tcp_mode(false), baseline::tcp_mode(true)],
                };
                for dir in dirs {
                    let copies = fleet.dir.path().join(dir);
                    if copies.exists() {
                        std::fs::remove_dir_all(&copies)?;
                    }
                }
                match mode {
                    Mode::Rsync => baseline::rsync_runs(&fleet, args, rates, &v1, v2)?,
                    _ => baseline::tcp_runs(&fleet, args, rates, &v1, v2)?,
                }
            }
        };
        let reference = match v2 {
            Some(v2) => Some(update_reference(&v1, v2)?),
            None => None,
        };
        for r in runs.iter_mut() {
            r.repeat = repeat;
            if let (true, Some((changed, new_chunks))) = (r.update, reference) {
                r.changed_bytes = Some(changed);
                r.new_chunk_bytes = Some(new_chunks);
            }
            eprintln!("{}", report::summary_line(r));
        }
        results.extend(runs);
    }
    client.close().await;
    drop(fleet);
    Ok((idle, results))
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
    let (id, manifest, _, _) = publish_dir(client, store, dir, "bench", &version).await?;
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
    let mut package_bytes: u64 = store
        .chunk_info(&needed.iter().map(|c| c.hash).collect::<Vec<_>>())?
        .iter()
        .map(|i| i.map_or(0, |i| u64::from(i.stored_len)))
        .sum();
    // An update is staged once the origin has made its deltas (a staging
    // that starts before does not use them).
    let mut deltas = None;
    if let Some(b) = &base {
        let made = crate::remote::deltas_made(client, id, Duration::from_secs(600)).await?;
        if let Some(p) = made.patches.iter().find(|p| p.base == b.release_id()) {
            let with = with_deltas(store, b, &manifest)?;
            deltas = Some((package_bytes, p.delta_bytes));
            package_bytes = with;
        }
    }
    let stats = ProcStats::of_fleet(fleet);
    stats.reset_peak_rss();
    let cpu0 = stats.cpu();
    // Every target's time runs from here, the one instant before the
    // order, to its own report of when it finished (the fleet shares this
    // host's clock).
    let traffic0 = fleet.traffic(client).await?;
    let links0 = fleet.lab.as_ref().map(|l| l.link_bytes()).transpose()?;
    let ordered = SystemTime::now();
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
    let slowest = rates.slowest_seconds(args.nodes, package_bytes);
    let timeout = Duration::from_secs_f64(3.0 * slowest + 120.0);
    let report = match follow(client, staging, Some(timeout)).await {
        Ok(r) => r,
        Err(e) => match fleet.diagnose() {
            Some(why) => return Err(e.context(why)),
            None => return Err(e),
        },
    };
    let wall = started.elapsed().as_secs_f64();
    let cpu = stats.cpu() - cpu0;
    let traffic = fleet.traffic_once_quiet(client).await? - traffic0;
    let cross_dc_link_bytes = match (&fleet.lab, links0) {
        (Some(lab), Some(before)) => Some(convoy_benches::netns::cross_dc_bytes(
            &before,
            &lab.link_bytes()?,
        )),
        _ => None,
    };
    let (staged, _) = count(&report);
    let progress: Vec<_> = report
        .targets
        .iter()
        .filter_map(|t| t.progress.as_ref())
        .collect();
    // A failed target makes the p99 infinite; the report says why.
    let failed: Vec<&str> = progress
        .iter()
        .filter_map(|p| match &p.state {
            StageState::Failed(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    if let Some(first) = failed.first() {
        eprintln!(
            "convoy bench: {} of {} targets failed {}, the first with: {first}",
            failed.len(),
            args.nodes,
            mode.name()
        );
    }
    Ok(RunResult::new(
        args,
        rates,
        Measured {
            mode: mode.name(),
            package_bytes,
            update: base.is_some(),
            deltas,
            done: completion_since(&report, ordered),
            origin_egress_bytes: report.origin_bytes_sent,
            total_bytes: traffic.wire_received,
            total_bytes_sent: Some(traffic.wire_sent),
            chunk_bytes: traffic.chunks_received,
            cross_dc_bytes: progress.iter().map(|p| p.bytes_received_cross_dc).sum(),
            cross_dc_link_bytes,
            max_target_bytes: progress.iter().map(|p| p.bytes_received).max().unwrap_or(0),
            verified_nodes: progress
                .iter()
                .filter(|p| p.state == StageState::Staged)
                .count()
                .min(staged),
            cpu,
            wall_seconds: wall,
            peak_rss: Some(stats.peak_rss()),
        },
    ))
}

/// An update's reference: the bytes of the 64 KiB runs that differ between
/// the trees, and of the chunks `v2` has that `v1` has not.
fn update_reference(v1: &Path, v2: &Path) -> Result<(u64, u64)> {
    let pack = |dir: &Path| {
        convoy_chunker::pack(dir, "bench", "reference", &convoy_chunker::Discard, &())
            .map_err(|e| anyhow!("cannot chunk {}: {e}", dir.display()))
    };
    let (old, new) = (pack(v1)?, pack(v2)?);
    let held: std::collections::HashSet<_> = old.chunk_refs().map(|c| c.hash).collect();
    let new_chunks = new
        .unique_chunks()
        .iter()
        .filter(|c| !held.contains(&c.hash))
        .map(|c| u64::from(c.len))
        .sum();
    Ok((baseline::changed_bytes(v1, v2)?, new_chunks))
}

/// Seconds from `ordered` to each staged target's report of when it
/// finished (verified and durable), sorted.
fn completion_since(report: &StagingReport, ordered: SystemTime) -> Vec<f64> {
    let t0 = unix_ms(ordered);
    let mut v: Vec<f64> = report
        .targets
        .iter()
        .filter_map(|t| t.progress.as_ref())
        .filter(|p| p.state == StageState::Staged)
        .filter_map(|p| p.finished_unix_ms)
        .map(|at| at.saturating_sub(t0) as f64 / 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The wire bytes a target holding `base` receives to get `target`, with
/// the patch between them (made here as the origin makes it): per file,
/// the delta or the chunks, whichever is smaller.
fn with_deltas(
    store: &RocksStore,
    base: &convoy_chunker::Manifest,
    target: &convoy_chunker::Manifest,
) -> Result<u64> {
    let (patch, _) = convoy_daemon::store::patch_in_store(
        store,
        base,
        target,
        &convoy_chunker::PatchConfig::default(),
    )?;
    let wire = convoy_daemon::store::wire_lens(store, target)?;
    let in_base: std::collections::HashSet<_> = base.chunk_refs().map(|c| c.hash).collect();
    let plan = convoy_chunker::plan_fetch(target, base, &patch, &|h| in_base.contains(h), &|c| {
        wire.get(&c.hash).copied().unwrap_or(u64::from(c.len))
    });
    Ok(plan.wire_bytes)
}

/// The Kumar-Ross bound for these caps, or `None` when they leave it at 0.
fn bound(rates: &Rates, nodes: usize, dcs: usize, bytes: u64) -> Option<f64> {
    let cap = |r: Option<u64>| r.map_or(f64::INFINITY, |r| r as f64);
    let ups = vec![cap(rates.uplink); nodes];
    let downs = vec![cap(rates.downlink); nodes];
    let mut b = kumar_ross_bound(bytes, cap(rates.origin), &ups, &downs);
    // With capped links between data centres (--netns --dc-link), every
    // data centre holding targets but not the origin takes the whole
    // release in through its link, which the origin's data centre must
    // first send out through its own.
    if dcs > 1 && nodes > 1 {
        b = b.max(bytes as f64 / cap(rates.dc_link));
    }
    (b.is_finite() && b > 0.0).then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> BenchArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let argv = std::iter::once("bench").chain(flags.iter().copied());
        <Cli as clap::Parser>::parse_from(argv).bench
    }

    const NO_CAPS: Rates = Rates {
        uplink: None,
        origin: None,
        downlink: None,
        dc_link: None,
    };

    #[test]
    fn a_capped_link_between_data_centres_bounds_the_time() {
        let rates = Rates {
            dc_link: Some(1 << 20),
            ..NO_CAPS
        };
        // 8 MiB through a 1 MiB/s link: 8 s, whatever else is uncapped.
        assert_eq!(bound(&rates, 10, 3, 8 << 20), Some(8.0));
        // One data centre: no link to cross.
        assert_eq!(bound(&rates, 10, 1, 8 << 20), None);
        let slow_origin = Rates {
            origin: Some(512 << 10),
            ..rates
        };
        assert_eq!(bound(&slow_origin, 10, 3, 8 << 20), Some(16.0));
    }

    fn measured(done: Vec<f64>) -> Measured {
        Measured {
            mode: "swarm",
            package_bytes: 1 << 20,
            update: false,
            deltas: None,
            done,
            origin_egress_bytes: 0,
            total_bytes: 0,
            total_bytes_sent: None,
            chunk_bytes: 0,
            cross_dc_bytes: 0,
            cross_dc_link_bytes: None,
            max_target_bytes: 0,
            verified_nodes: 0,
            cpu: Cpu::default(),
            wall_seconds: 1.0,
            peak_rss: None,
        }
    }

    #[test]
    fn a_target_that_did_not_finish_makes_the_p99_infinite() {
        let (args, rates) = (args(&["--nodes", "200"]), NO_CAPS);
        // 199 of 200 done in a second: the 200th weighs on p99 and max.
        let r = RunResult::new(&args, &rates, measured(vec![1.0; 199]));
        assert_eq!(r.unfinished(), 1);
        assert_eq!(r.completion_seconds.p50, 1.0);
        assert!(r.completion_seconds.p99.is_infinite());
        assert!(r.completion_seconds.max.is_infinite());
        assert_eq!(r.per_target_seconds.len(), 200);
        let all = RunResult::new(&args, &rates, measured(vec![1.0; 200]));
        assert_eq!(all.unfinished(), 0);
        assert_eq!(all.completion_seconds.p99, 1.0);
    }

    #[test]
    fn a_targets_time_runs_from_the_order_to_its_own_finish() {
        use convoy_daemon::protocol::{StageProgress, TargetStaging};
        let ordered = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t0 = unix_ms(ordered);
        // Each target's own clock started when the order reached it: a
        // late receipt must not shorten its time.
        let target = |finished: Option<u64>, elapsed_ms, state| TargetStaging {
            peer_id: String::new(),
            labels: Default::default(),
            progress: Some(StageProgress {
                release: convoy_chunker::ReleaseId([0; 32]),
                chunks_held: 0,
                chunks_total: 0,
                bytes_received: 0,
                bytes_received_cross_dc: 0,
                elapsed_ms,
                finished_unix_ms: finished.map(|ms| t0 + ms),
                state,
            }),
            alive: true,
        };
        let report = StagingReport {
            id: 1,
            name: String::new(),
            release: convoy_chunker::ReleaseId([0; 32]),
            mode: DistributionMode::Push,
            chunks_total: 0,
            release_bytes: 0,
            elapsed_ms: 0,
            origin_bytes_sent: 0,
            targets: vec![
                target(Some(2500), 100, StageState::Staged),
                target(Some(1500), 1500, StageState::Staged),
                target(None, 9000, StageState::Running),
                target(Some(700), 700, StageState::Failed("disk full".into())),
            ],
        };
        assert_eq!(completion_since(&report, ordered), vec![1.5, 2.5]);
    }

    #[test]
    fn a_convoy_run_is_set_against_both_tcp_copies() {
        let args = args(&["--nodes", "1"]);
        let run = |mode: &str, secs: f64| {
            let mut r = RunResult::new(&args, &NO_CAPS, measured(vec![secs]));
            r.mode = mode.into();
            r
        };
        let runs = [run("tcp", 1.0), run("tcp-verify", 2.0), run("pull", 4.0)];
        let line = report::against_tcp(&runs);
        assert!(
            line.contains("pull: 0.25 of tcp's speed, 0.50 of tcp-verify's"),
            "{line}"
        );
        assert_eq!(report::against_tcp(&runs[2..]), "", "no tcp run, no line");
    }

    #[test]
    fn an_update_is_set_against_the_bytes_that_changed_and_the_new_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_package(&a, 8 << 20, 1).unwrap();
        write_edited(&a, &b, 10, 2).unwrap();
        let (changed, new_chunks) = update_reference(&a, &b).unwrap();
        assert_eq!(changed, baseline::changed_bytes(&a, &b).unwrap());
        // Ten edits: at most two chunks each (one on a boundary), of at
        // most 256 KiB, out of 8 MiB.
        assert!(
            new_chunks > 0 && new_chunks <= 20 * (256 << 10),
            "{new_chunks}"
        );
        let args = args(&["--nodes", "2"]);
        let mut r = RunResult::new(&args, &NO_CAPS, measured(vec![1.0, 1.0]));
        (r.update, r.total_bytes, r.total_bytes_sent) = (true, 2 << 20, Some(2 << 20));
        (r.changed_bytes, r.new_chunk_bytes) = (Some(2 << 20), Some(4 << 20));
        r.chunk_bytes = 1 << 20;
        let text = report::against_reference(&[r]);
        assert!(
            text.contains("swarm (update): 1.00 MiB per target moved, 0.50x the bytes that changed (2.00 MiB), 0.25x the new chunks' (4.00 MiB)"),
            "{text}"
        );
        assert!(
            text.contains("as the senders did (+0.00%), of which chunk bodies 1.00 MiB"),
            "{text}"
        );
    }

    #[test]
    fn repeated_runs_are_summed_up_as_median_and_range() {
        let args = args(&["--nodes", "2", "--repeat", "4"]);
        let runs: Vec<RunResult> = [vec![1.0, 3.0], vec![1.0, 1.0], vec![2.0, 2.0], vec![1.0]]
            .into_iter()
            .map(|done| RunResult::new(&args, &NO_CAPS, measured(done)))
            .collect();
        let s = report::summary(&runs);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].runs, 4);
        // p99 per run: 3, 1, 2, infinite (a target did not finish).
        assert_eq!(s[0].p99_seconds.min, 1.0);
        assert_eq!(s[0].p99_seconds.median, 2.0);
        assert!(s[0].p99_seconds.max.is_infinite());
    }

    #[test]
    fn edited_package_differs_in_small_scattered_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_package(&a, 8 << 20, 1).unwrap();
        write_edited(&a, &b, 40, 2).unwrap();
        assert_eq!(baseline::dir_bytes(&b).unwrap(), 8 << 20);
        let (x, y) = (
            std::fs::read(a.join("part-0000.bin")).unwrap(),
            std::fs::read(b.join("part-0000.bin")).unwrap(),
        );
        let first_half: Vec<usize> = (0..x.len()).filter(|i| x[*i] != y[*i]).collect();
        let all: usize = ["part-0000.bin", "part-0001.bin"]
            .iter()
            .map(|f| {
                let (x, y) = (
                    std::fs::read(a.join(f)).unwrap(),
                    std::fs::read(b.join(f)).unwrap(),
                );
                x.iter().zip(&y).filter(|(p, q)| p != q).count()
            })
            .sum();
        // 40 edits of 1 to 8 bytes (a random byte may equal the old one).
        assert!((20..=320).contains(&all), "{all} bytes differ");
        assert!(!first_half.is_empty(), "edits land in every file of 4 MiB");
        // 64 KiB runs touched: nearly one per edit, where --change 1% would
        // touch about 1.3 runs in all.
        let runs = baseline::changed_bytes(&a, &b).unwrap() / (64 << 10);
        assert!(runs >= 30, "{runs} runs touched");
    }

    #[test]
    fn changed_package_differs_by_the_share_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_package(&a, 8 << 20, 1).unwrap();
        write_changed(&a, &b, 1.0, 2).unwrap();
        let changed = baseline::changed_bytes(&a, &b).unwrap();
        // 1% of 8 MiB, counted in 64 KiB runs that may straddle two.
        assert!(
            ((80 << 10)..=4 * (84 << 10)).contains(&changed),
            "{changed}"
        );
        assert_eq!(baseline::dir_bytes(&b).unwrap(), 8 << 20);
    }
}
