//! `convoy load-worker`: many simulated targets in one process, each a
//! real libp2p peer of its own (identity, TCP connection, TLS, fleet
//! proof) that speaks the target's side of the control protocol to a real
//! coordinator: reports at the cadence the coordinator sets, takes staging
//! orders and peer lists, reports staging progress, sends its have-set,
//! delivers and reports the delivery. It stores nothing: a staging takes a
//! drawn time instead of fetching chunks, which is what lets a few
//! processes stand for thousands of servers.
//!
//! What it saw goes to stdout as JSON lines for the driver
//! ([`super::Tally`]): one per order received, and a status line a second.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Args;
use convoy_chunker::{Manifest, ReleaseId};
use convoy_daemon::net::{self, NetConfig, NetEvent, NetHandle, Reply, Security};
use convoy_daemon::protocol::{
    ChunkRequest, ChunkResponse, ControlRequest, ControlResponse, DeliveryReport, Labels, Place,
    StageOrder, StageProgress, StageState, TargetReport,
};
use libp2p::{identity::Keypair, Multiaddr, PeerId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::sleep_until;

/// Registrations one worker has in flight: the coordinator takes at most
/// 128 connections in their handshake at once and refuses the rest.
const REGISTERING_AT_ONCE: usize = 32;

/// `convoy load-worker`'s flags (the driver sets them).
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The coordinator's address, with its /p2p/ id
    #[arg(long)]
    pub coordinator: String,
    /// The fleet key
    #[arg(long)]
    pub fleet_key_file: PathBuf,
    /// Index of the first simulated target (labels and seeds follow it)
    #[arg(long)]
    pub first: usize,
    /// Simulated targets in this process
    #[arg(long)]
    pub count: usize,
    /// Data centres the targets are spread over, two zones each
    #[arg(long)]
    pub dcs: usize,
    /// Milliseconds a staging takes; each target draws 0.5–1.5× this
    #[arg(long)]
    pub stage_ms: u64,
}

/// Counters every simulated target of the process adds to.
#[derive(Default)]
struct Counters {
    registered: AtomicU64,
    reports: AtomicU64,
    report_failures: AtomicU64,
    heartbeat_ms: AtomicU64,
}

/// One line for the driver.
type Line = serde_json::Value;

pub fn worker(args: WorkerArgs) -> Result<()> {
    convoy_daemon::net::raise_open_files_limit();
    let key = convoy_daemon::fleet_key::read(&args.fleet_key_file)?;
    let addr: Multiaddr = args
        .coordinator
        .parse()
        .with_context(|| format!("--coordinator {}", args.coordinator))?;
    let coordinator = addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .context("--coordinator must end in /p2p/ID")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let counters = Arc::new(Counters::default());
        let (lines, mut lines_rx) = mpsc::unbounded_channel::<Line>();
        let registering = Arc::new(Semaphore::new(REGISTERING_AT_ONCE));
        for i in args.first..args.first + args.count {
            let config = NetConfig {
                keypair: Keypair::generate_ed25519(),
                listen: Vec::new(),
                fleet_key: key,
                request_timeout: Duration::from_secs(60),
                admission_timeout: net::ADMISSION_TIMEOUT,
                security: Security::Tls,
            };
            let (handle, events) = net::start(config)?;
            handle.add_addresses(coordinator, vec![addr.clone()]).await;
            let sim = Simulated::new(
                i,
                &args,
                handle,
                coordinator,
                counters.clone(),
                lines.clone(),
            );
            tokio::spawn(sim.run(events, registering.clone()));
        }
        // The printer: order lines as they come, a status line a second.
        let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                Some(line) = lines_rx.recv() => writeln!(stdout, "{line}")?,
                _ = tick.tick() => {
                    let c = &counters;
                    let status = json!({
                        "e": "status",
                        "registered": c.registered.load(Ordering::Relaxed),
                        "reports": c.reports.load(Ordering::Relaxed),
                        "report_failures": c.report_failures.load(Ordering::Relaxed),
                        "heartbeat_ms": c.heartbeat_ms.load(Ordering::Relaxed),
                    });
                    writeln!(stdout, "{status}")?;
                    // The driver reads on; a closed pipe ends the worker.
                    stdout.flush()?;
                }
            }
        }
    })
}

fn unix_ms() -> u64 {
    convoy_daemon::units::unix_ms(SystemTime::now())
}

/// A staging on a simulated target.
struct Staging {
    chunks_total: u32,
    app: String,
    version: String,
    started: Instant,
    /// When it is done (drawn at the order).
    done_at: Instant,
    finished_unix_ms: Option<u64>,
}

enum Internal {
    Reported(Result<u64, String>),
}

struct Simulated {
    net: NetHandle,
    coordinator: PeerId,
    labels: Labels,
    stage_ms: u64,
    rng: SmallRng,
    stagings: HashMap<ReleaseId, Staging>,
    releases: Vec<ReleaseId>,
    active: BTreeMap<String, String>,
    previous: BTreeMap<String, String>,
    in_load: bool,
    heartbeat: Duration,
    registered: bool,
    counters: Arc<Counters>,
    lines: mpsc::UnboundedSender<Line>,
    internal: (mpsc::Sender<Internal>, mpsc::Receiver<Internal>),
}

impl Simulated {
    fn new(
        index: usize,
        args: &WorkerArgs,
        net: NetHandle,
        coordinator: PeerId,
        counters: Arc<Counters>,
        lines: mpsc::UnboundedSender<Line>,
    ) -> Self {
        let dcs = args.dcs.max(1);
        let labels: Labels = [
            ("env".to_string(), "load".to_string()),
            ("dc".to_string(), format!("dc{}", index % dcs)),
            ("zone".to_string(), format!("z{}", (index / dcs) % 2)),
        ]
        .into();
        Self {
            net,
            coordinator,
            labels,
            stage_ms: args.stage_ms,
            rng: SmallRng::seed_from_u64(index as u64),
            stagings: HashMap::new(),
            releases: Vec::new(),
            active: BTreeMap::new(),
            previous: BTreeMap::new(),
            in_load: true,
            heartbeat: Duration::from_secs(1),
            registered: false,
            counters,
            lines,
            internal: mpsc::channel(4),
        }
    }

    async fn run(mut self, mut events: mpsc::Receiver<NetEvent>, registering: Arc<Semaphore>) {
        // The first report waits its turn among the process's registrations.
        let Ok(permit) = registering.acquire_owned().await else {
            return;
        };
        // Given back once registered.
        let mut permit = Some(permit);
        let mut reporting = false;
        let mut next_report = tokio::time::Instant::now();
        loop {
            let next_done = self
                .stagings
                .values()
                .filter(|s| s.finished_unix_ms.is_none())
                .map(|s| s.done_at)
                .min();
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_net(ev),
                    None => return,
                },
                Some(Internal::Reported(r)) = self.internal.1.recv() => {
                    reporting = false;
                    match r {
                        Ok(heartbeat_ms) => {
                            if !self.registered {
                                self.registered = true;
                                drop(permit.take());
                                self.counters.registered.fetch_add(1, Ordering::Relaxed);
                            }
                            self.counters.reports.fetch_add(1, Ordering::Relaxed);
                            self.heartbeat = Duration::from_millis(heartbeat_ms.clamp(100, 60_000));
                            self.counters.heartbeat_ms.store(heartbeat_ms, Ordering::Relaxed);
                            next_report = tokio::time::Instant::now() + self.heartbeat;
                        }
                        // As a target does: again at its cadence (the
                        // first registration's is a second).
                        Err(_) => {
                            self.counters.report_failures.fetch_add(1, Ordering::Relaxed);
                            next_report = tokio::time::Instant::now() + self.heartbeat;
                        }
                    }
                }
                _ = sleep_until(next_report), if !reporting => {
                    reporting = true;
                    self.report();
                }
                _ = sleep_until(next_done.unwrap_or(far).into()), if next_done.is_some() => {
                    self.finish_stagings();
                    // A target reports at once when a staging ends.
                    if !reporting {
                        reporting = true;
                        self.report();
                    }
                }
            }
        }
    }

    fn report(&self) {
        let now = Instant::now();
        let report = TargetReport {
            labels: self.labels.clone(),
            // Nothing listens there: the coordinator reaches a target on
            // its connection, and nobody fetches from these.
            addrs: vec!["/ip4/127.0.0.1/tcp/9".into()],
            releases: self.releases.clone(),
            stagings: self
                .stagings
                .iter()
                .map(|(r, s)| {
                    let held = match s.finished_unix_ms {
                        Some(_) => s.chunks_total,
                        None => {
                            let whole = s.done_at.saturating_duration_since(s.started);
                            let part = now.saturating_duration_since(s.started);
                            (u64::from(s.chunks_total) * part.as_millis() as u64
                                / whole.as_millis().max(1) as u64)
                                as u32
                        }
                    };
                    StageProgress {
                        release: *r,
                        chunks_held: held.min(s.chunks_total),
                        chunks_total: s.chunks_total,
                        bytes_received: 0,
                        bytes_received_cross_dc: 0,
                        elapsed_ms: now.saturating_duration_since(s.started).as_millis() as u64,
                        finished_unix_ms: s.finished_unix_ms,
                        state: match s.finished_unix_ms {
                            Some(_) => StageState::Staged,
                            None => StageState::Running,
                        },
                    }
                })
                .collect(),
            bytes_sent: 0,
            bytes_received: 0,
            wire_bytes_sent: self.net.wire_bytes().sent,
            wire_bytes_received: self.net.wire_bytes().received,
            active: self.active.clone(),
            in_load: self.in_load,
            health: None,
        };
        let (net, to, tx) = (self.net.clone(), self.coordinator, self.internal.0.clone());
        tokio::spawn(async move {
            let r = match net.control(to, ControlRequest::Report(report)).await {
                Ok(ControlResponse::Registered { heartbeat_ms }) => Ok(heartbeat_ms),
                Ok(other) => Err(format!("{other:?}")),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(Internal::Reported(r)).await;
        });
    }

    fn finish_stagings(&mut self) {
        let now = Instant::now();
        for (r, s) in &mut self.stagings {
            if s.finished_unix_ms.is_none() && s.done_at <= now {
                s.finished_unix_ms = Some(unix_ms());
                if !self.releases.contains(r) {
                    self.releases.push(*r);
                }
            }
        }
    }

    fn line(&self, what: &str) {
        let _ = self.lines.send(json!({
            "e": what,
            "id": self.net.peer_id().to_string(),
            "ms": unix_ms(),
        }));
    }

    fn on_net(&mut self, event: NetEvent) {
        let (peer, request, reply) = match event {
            NetEvent::Control {
                peer,
                request,
                reply,
            } => (peer, request, reply),
            // The origin's gifts are taken as a target takes them (this
            // one keeps nothing); nobody asks a simulated target for chunks.
            NetEvent::Chunk { request, reply, .. } => {
                let answer = match request {
                    ChunkRequest::Put { .. } => ChunkResponse::Stored,
                    _ => ChunkResponse::Refused,
                };
                tokio::spawn(reply.send(answer));
                return;
            }
            _ => return,
        };
        if peer != self.coordinator {
            return reply.answer(ControlResponse::Denied);
        }
        match request {
            ControlRequest::Stage(order) => self.stage(order, reply),
            // No simulated target holds a base: the whole order follows.
            ControlRequest::StageFrom(_) | ControlRequest::StagePatched(_) => {
                reply.answer(ControlResponse::Error("base release not held".into()))
            }
            ControlRequest::Peers { .. } => {
                self.line("peers");
                reply.answer(ControlResponse::Ok)
            }
            // No load balancer watches these targets: nothing to settle.
            ControlRequest::Deliver {
                release, drain_ms, ..
            } => self.deliver(release, drain_ms, reply),
            ControlRequest::SetLoad { in_load, .. } => {
                self.in_load = in_load;
                reply.answer(ControlResponse::Ok)
            }
            ControlRequest::Rollback { app, .. } => {
                match self.previous.get(&app) {
                    Some(v) => self.active.insert(app, v.clone()),
                    None => self.active.remove(&app),
                };
                reply.answer(ControlResponse::Ok)
            }
            _ => reply.answer(ControlResponse::Error(
                "a target does not answer that request".into(),
            )),
        }
    }

    fn stage(&mut self, order: StageOrder, reply: Reply<ControlResponse>) {
        self.line("stage");
        let manifest = match Manifest::decode(&order.manifest) {
            Ok(m) => m,
            Err(e) => return reply.answer(ControlResponse::Error(format!("bad manifest: {e}"))),
        };
        let release = manifest.release_id();
        if !self.stagings.contains_key(&release) {
            let now = Instant::now();
            let ms = self.stage_ms as f64 * self.rng.random_range(0.5..1.5);
            self.stagings.insert(
                release,
                Staging {
                    chunks_total: manifest.unique_chunks().len() as u32,
                    app: manifest.app().to_string(),
                    version: manifest.version().to_string(),
                    started: now,
                    done_at: now + Duration::from_millis(ms as u64),
                    finished_unix_ms: None,
                },
            );
        }
        reply.answer(ControlResponse::Ok);
        // A target tells the origin what it holds of the release at once.
        let len = self.stagings[&release].chunks_total;
        let bits = vec![0u8; (len as usize).div_ceil(8)];
        let request = ControlRequest::Bitfield {
            release,
            len,
            bits,
            place: Place::of(&self.labels),
        };
        let (net, to) = (self.net.clone(), self.coordinator);
        tokio::spawn(async move {
            let _ = net.control(to, request).await;
        });
    }

    fn deliver(
        &mut self,
        release: ReleaseId,
        drain_ms: Option<u64>,
        reply: Reply<ControlResponse>,
    ) {
        self.line("deliver");
        let Some(s) = self.stagings.get(&release) else {
            return reply.answer(ControlResponse::Error("release not staged".into()));
        };
        reply.answer(ControlResponse::Ok);
        let (app, version) = (s.app.clone(), s.version.clone());
        if let Some(old) = self.active.insert(app.clone(), version.clone()) {
            self.previous.insert(app, old);
        }
        let (net, to) = (self.net.clone(), self.coordinator);
        tokio::spawn(async move {
            let started = Instant::now();
            if let Some(ms) = drain_ms {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let report = DeliveryReport {
                release,
                result: Ok(version),
                switch_us: 0,
                total_ms: started.elapsed().as_millis() as u64,
            };
            convoy_daemon::target::report_delivery(&net, to, report).await;
        });
    }
}
