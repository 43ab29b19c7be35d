//! The coordinator role: origin of releases and tracker of the fleet.
//!
//! It holds published releases in its store, knows every registered target
//! (labels, addresses, liveness, what each holds) and runs stagings: it
//! signs the manifest, orders the chosen targets to stage it, tells each
//! whom to fetch from (swarm), and serves chunks as the origin — through a
//! [`Seeder`] in swarm mode, a [`Pusher`] in push mode, plainly in pull
//! mode. Stagings in progress are recorded in `DATA/stagings.json`, so a
//! restarted coordinator picks them up as targets report back.
//!
//! It also runs roll-outs and answers the operator API: see [`operate`].
//!
//! What lives here, the coordinator role and nothing of the target's:
//!
//! - this module: the role's loop — registry of targets, tracker of what
//!   each holds, stagings, the origin's serving;
//! - [`operate`]: roll-outs and the API on that loop;
//! - [`rollout`]: the roll-out engine, a sans-I/O state machine;
//! - [`deployments`]: the book of roll-outs, promotions and history;
//! - [`api`]: the operator API over HTTP;
//! - [`operators`]: the principals allowed to publish and stage;
//! - [`deltas`]: the origin's patches, made in the background.
//!
//! It may use [`net`](crate::net), [`store`](crate::store),
//! [`transfer`](crate::transfer) and the shared plumbing at the crate's
//! root; never [`target`](crate::target).

pub mod api;
mod deltas;
pub mod deployments;
mod operate;
pub mod operators;
pub mod rollout;
mod web;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use convoy_chunker::{ChunkHash, ChunkRef, Manifest, ReleaseId};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::coordinator::operators::{Operators, Refusals};
use crate::net::serve::{ChunkList, Chunks, ReceiveError};
use crate::net::{ChunkAnswer, NetEvent, NetHandle, Reply};
use crate::protocol::{
    busy, signed_bytes, Announcement, ChunkRequest, ChunkResponse, ControlRequest, ControlResponse,
    DistributionMode, FleetMember, Labels, PatchedOrder, PeerInfo, StageOrder, StageOrderDelta,
    StageProgress, StageState, StagingReport, TargetReport, TargetStaging, MAX_HASHES_PER_QUERY,
    MAX_LABELS, MAX_LABEL_BYTES, MAX_PEERS_PER_LIST,
};
use crate::store::{collect, compact_in_background, Collector, Pass, Retention, Store};
use crate::transfer::crowd::Wait;
use crate::transfer::{HaveSet, PeerPool, PushAction, PushConfig, Pusher, Seeder, ServeDecision};

/// Registered targets the coordinator tracks.
const MAX_MEMBERS: usize = 10_000;
/// Stagings kept (finished ones are dropped oldest first).
const MAX_RUNS: usize = 256;
/// Roll-out orders kept per target that has not reported yet.
const MAX_DEFERRED: usize = 64;
/// Operator CLI sessions open at once, at most.
const MAX_SESSIONS: usize = 1024;
/// How long an operator waits before it sends an upload answered busy
/// (all [`MAX_UPLOADS`](crate::net::serve::MAX_UPLOADS) slots taken) again.
const UPLOAD_RETRY: Duration = Duration::from_millis(20);

/// How a coordinator is set up.
pub struct CoordinatorConfig {
    /// Signs manifests; its public key is in the peer id targets trust.
    pub keypair: Keypair,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The origin's own labels (its `dc`).
    pub labels: Labels,
    /// Push mode: targets served at once (K).
    pub push_parallel: usize,
    /// Swarm mode: peers named to each target.
    pub swarm_degree: usize,
    /// How often targets report, at most: a fleet too large for
    /// `max_reports_per_second` at this cadence is asked to report less
    /// often ([`Coordinator::heartbeat`]).
    pub heartbeat: Duration,
    /// Reports per second the fleet sends at most, on average.
    pub max_reports_per_second: u64,
    /// Apps, environments and their pipelines.
    pub pipelines: crate::pipeline::Pipelines,
    /// Who may publish, upload, stage and list the fleet.
    pub operators: Operators,
    /// Refused attempts, shared with the API, for `/metrics`.
    pub refusals: Arc<Refusals>,
    /// Releases the origin's store keeps per app, besides those of the
    /// stagings and roll-outs it remembers.
    pub retain: usize,
    /// How often the store drops what nobody keeps; `None`: never.
    pub gc_every: Option<Duration>,
    /// Older releases of an app whose deltas into a new release are made
    /// after its publish (besides those the fleet runs); 0: none.
    pub delta_bases: usize,
}

struct Member {
    report: TargetReport,
    last_seen: Instant,
    connected: bool,
}

#[derive(Clone, Serialize, Deserialize)]
struct RunRecord {
    id: u64,
    name: String,
    release: String,
    mode: DistributionMode,
    targets: Vec<String>,
    started_unix_ms: u64,
}

struct Run {
    record: RunRecord,
    release: ReleaseId,
    order: StageOrder,
    /// The manifest as a delta against each of a few older releases of
    /// its app: a target holding one is sent that instead of the whole.
    manifest_deltas: HashMap<ReleaseId, Vec<u8>>,
    /// Patches into the release, by base: a target holding one is sent
    /// it, and rebuilds the files it covers from their deltas.
    offers: HashMap<ReleaseId, deltas::Offer>,
    /// The patches' delta chunks, as units of their own (see
    /// [`crate::protocol::patch_unit`]), each seeded like the release.
    units: HashMap<ReleaseId, UnitRun>,
    chunks: ChunkList,
    release_bytes: u64,
    targets: RunTargets,
    started: Instant,
    origin_bytes: Arc<AtomicU64>,
    seeder: Option<Seeder<PeerId>>,
    /// Chunks the seeder handed out that are on their way.
    gifts: usize,
    pusher: Option<Pusher<PeerId>>,
    progress: RunProgress,
}

/// A staging's targets in the order they were given (import ranks follow
/// it), with a set beside them: every report, have-set and chunk request
/// asks whether its sender is one, and a list of 10,000 made each ask
/// cost 10,000 comparisons.
struct RunTargets {
    list: Vec<PeerId>,
    set: HashSet<PeerId>,
}

impl RunTargets {
    fn new(mut list: Vec<PeerId>) -> Self {
        let mut set = HashSet::with_capacity(list.len());
        list.retain(|p| set.insert(*p));
        Self { list, set }
    }

    fn contains(&self, peer: &PeerId) -> bool {
        self.set.contains(peer)
    }
}

impl std::ops::Deref for RunTargets {
    type Target = [PeerId];
    fn deref(&self) -> &[PeerId] {
        &self.list
    }
}

/// What a staging's targets last reported of it, and how many have not
/// yet reported it staged or failed: whether a run has ended is asked on
/// every report.
struct RunProgress {
    of: HashMap<PeerId, StageProgress>,
    unfinished: usize,
}

impl RunProgress {
    fn new(targets: usize) -> Self {
        Self {
            of: HashMap::new(),
            unfinished: targets,
        }
    }

    /// Records a target's report (of one of the run's targets).
    fn record(&mut self, peer: PeerId, p: StageProgress) {
        let done = |p: &StageProgress| p.state != StageState::Running;
        match (self.of.get(&peer).is_some_and(done), done(&p)) {
            (false, true) => self.unfinished -= 1,
            (true, false) => self.unfinished += 1,
            _ => {}
        }
        self.of.insert(peer, p);
    }

    fn get(&self, peer: &PeerId) -> Option<&StageProgress> {
        self.of.get(peer)
    }

    /// Every target has reported the staging staged or failed.
    fn finished(&self) -> bool {
        self.unfinished == 0
    }
}

/// A patch's delta chunks on their way in a run.
struct UnitRun {
    chunks: ChunkList,
    /// In swarm mode.
    seeder: Option<Seeder<PeerId>>,
}

impl Run {
    /// Whether `peer` is a target of this run and `unit` is the release
    /// or one of its patches' units.
    fn fetches(&self, peer: &PeerId, unit: &ReleaseId) -> bool {
        (self.release == *unit || self.units.contains_key(unit)) && self.targets.contains(peer)
    }

    /// Whether the origin seeds `unit` to a swarm rather than serving
    /// every target itself.
    fn seeds(&self, unit: &ReleaseId) -> bool {
        if *unit == self.release {
            self.seeder.is_some()
        } else {
            self.units.get(unit).is_some_and(|u| u.seeder.is_some())
        }
    }

    /// The chunk list and seeder of `unit`: the release, or one of its
    /// patches' units.
    fn unit_mut(&mut self, unit: &ReleaseId) -> Option<(&ChunkList, Option<&mut Seeder<PeerId>>)> {
        if *unit == self.release {
            return Some((&self.chunks, self.seeder.as_mut()));
        }
        let u = self.units.get_mut(unit)?;
        Some((&u.chunks, u.seeder.as_mut()))
    }

    /// Every seeder of the run, the release's last.
    fn seeders(&mut self) -> impl Iterator<Item = (ReleaseId, &mut Seeder<PeerId>)> {
        self.units
            .iter_mut()
            .filter_map(|(u, r)| Some((*u, r.seeder.as_mut()?)))
            .chain(self.seeder.as_mut().map(|s| (self.release, s)))
    }
}

/// Gifts (see [`Seeder::gift`]) on their way at once: two keep the
/// origin's uplink busy across a round trip, and a few in the upload queue
/// barely delay the chunks targets ask for.
const MAX_GIFTS: usize = 2;
/// The origin's uplink counts as idle for [`Seeder::gift`] with less than
/// this queued.
const GIFT_IDLE_BACKLOG: Duration = Duration::from_millis(50);

enum Internal {
    Pushed {
        run: u64,
        peer: PeerId,
        chunk: u32,
        ok: bool,
    },
    /// A chunk the seeder handed out arrived (or did not).
    Gifted {
        run: u64,
        unit: ReleaseId,
        peer: PeerId,
        chunk: u32,
        ok: bool,
    },
    /// Chunks the seeder chose to serve that did not go out.
    Unsent {
        run: u64,
        unit: ReleaseId,
        peer: PeerId,
        chunks: Vec<u32>,
    },
    Ordered {
        run: u64,
    },
    /// Something happened to a roll-out.
    Rollout {
        id: u64,
        event: crate::coordinator::rollout::Event,
    },
    /// A flush ended.
    Flushed(Result<(), String>),
    /// A staging's manifest was read and its chunks looked up (or not).
    Prepared {
        id: u64,
        run: Result<Box<Run>, String>,
        begun: Begun,
    },
    /// `stagings.json` was written (or not) with the unfinished stagings
    /// `ids`; a staging that waited for it may send its orders.
    RunsSaved {
        ids: Vec<u64>,
        result: Result<(), String>,
        begun: Option<(u64, Begun)>,
    },
    /// The recorder opened (or could not open) a roll-out's log.
    Opened {
        opening: operate::Opening,
        result: Result<(), String>,
    },
    /// The recorder wrote (or could not write) a promotion.
    Promoted {
        promoting: operate::Promoting,
        result: Result<(), String>,
    },
    /// The recorder wrote (or could not write) an event of a roll-out.
    Recorded {
        id: u64,
        at: u64,
        event: crate::coordinator::rollout::Event,
        result: Result<(), String>,
        steered: Option<operate::Steered>,
    },
    /// A collection pass ended.
    Collected(Pass),
    /// A release's deltas were made (or not).
    DeltasMade,
    /// A roll-out's order did not reach its target: it is sent again when
    /// the target next reports.
    Undelivered {
        id: u64,
        peer: PeerId,
        request: ControlRequest,
    },
    /// An operator's request that needed the disk, answered off the loop:
    /// the chunks it told the operator the origin holds (spared by the
    /// next collection pass), and the answer.
    Answered {
        spare: Vec<ChunkHash>,
        reply: Reply<ControlResponse>,
        response: ControlResponse,
    },
}

struct Coordinator {
    config: CoordinatorConfig,
    net: NetHandle,
    chunks: Arc<Chunks>,
    members: HashMap<PeerId, Member>,
    runs: BTreeMap<u64, Run>,
    internal: mpsc::Sender<Internal>,
    /// When what was stored is synced.
    sync: crate::net::serve::Syncer,
    deployments: crate::coordinator::deployments::Deployments,
    /// Roll-out events waiting for the recorder (see [`Coordinator::rollout_event`]).
    queue: std::collections::VecDeque<(u64, crate::coordinator::rollout::Event)>,
    /// Per roll-out, events handed to the recorder and not yet applied.
    recording: HashMap<u64, usize>,
    /// The releases of roll-outs whose logs are being opened, by app and
    /// environment: a collection pass keeps them.
    opening: HashMap<(String, String), ReleaseId>,
    /// Where the recorder says an event is written.
    recorded: mpsc::UnboundedSender<Internal>,
    /// After a restart: when to send again what roll-outs had in flight
    /// (targets have re-registered by then).
    resend_at: Option<Instant>,
    /// Chunk bytes targets received, by distribution mode.
    bytes_by_mode: BTreeMap<&'static str, u64>,
    /// Roll-out orders waiting for their target to report (it restarted,
    /// or the coordinator did and it has not re-registered yet).
    deferred: HashMap<PeerId, Vec<(u64, ControlRequest)>>,
    /// Collection passes: while one runs, what would name or stage a
    /// release waits until it ends, so the pass never drops what it needs.
    collector: Collector<Waiting>,
    /// The unfinished stagings `stagings.json` records (or is being
    /// rewritten with), by id.
    saved_runs: Vec<u64>,
    /// Stagings whose manifest and chunks are being looked up, by id.
    starting: BTreeMap<u64, Starting>,
    /// Operator CLI sessions by their peer id: who they act for, as
    /// history records it (see [`ControlRequest::Operator`]).
    sessions: HashMap<PeerId, String>,
    /// Releases whose deltas are due, made one at a time.
    deltas: deltas::Deltas,
    /// Manifest bytes of the staging orders targets took, by form.
    order_bytes: Arc<OrderBytes>,
    /// Targets back (after their restart or ours) owed their unfinished
    /// orders, per run: sent together at the next tick, so a restarted
    /// coordinator's fleet coming back costs one grouping of a run's
    /// candidates per tick, not one per target (10,000 of them, each of
    /// 10,000 candidates).
    returning: BTreeMap<u64, Vec<PeerId>>,
}

/// Manifest bytes of staging orders targets took: sent as a delta against
/// a release they hold, or whole.
#[derive(Default)]
struct OrderBytes {
    delta: AtomicU64,
    whole: AtomicU64,
}

/// A request that waits for a collection pass.
enum Waiting {
    Control(PeerId, ControlRequest, Reply<ControlResponse>),
    Api(crate::coordinator::api::Call),
}

/// Who started a staging, told once its orders go out.
enum Begun {
    /// An operator's `convoy stage`, answered with the staging's id.
    Operator {
        by: String,
        app: String,
        version: String,
        /// The targets it asked for, as said when none is live.
        selector: String,
        reply: Reply<ControlResponse>,
    },
    /// A stage command of roll-out `id`: a staging that cannot start
    /// fails its targets.
    Rollout(u64),
}

/// A staging being looked up off the loop.
struct Starting {
    release: Option<ReleaseId>,
    targets: Vec<PeerId>,
}

/// Said to a request refused while a collection pass runs.
const TOO_MANY_WAITING: &str =
    "the origin is collecting garbage, with too many requests waiting; try again";

/// Runs the coordinator until `shutdown` completes.
pub async fn run(
    config: CoordinatorConfig,
    chunks: Arc<Chunks>,
    net: NetHandle,
    mut events: mpsc::Receiver<NetEvent>,
    mut calls: mpsc::Receiver<crate::coordinator::api::Call>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel(4096);
    // Unbounded: the record writer never waits for the loop (dropping the
    // book joins it, and a full channel would hold it there).
    let (recorded, mut recorded_rx) = mpsc::unbounded_channel();
    let deployments = crate::coordinator::deployments::Deployments::load(chunks.store.clone())
        .map_err(anyhow::Error::msg)?;
    let unfinished = deployments.all.values().any(|d| !d.rollout.is_done());
    let grace = (config.heartbeat * 3).max(Duration::from_secs(3));
    let delta_bases = config.delta_bases;
    let mut c = Coordinator {
        config,
        net,
        chunks,
        members: HashMap::new(),
        runs: BTreeMap::new(),
        internal: tx,
        recorded,
        sync: Default::default(),
        deployments,
        queue: Default::default(),
        recording: Default::default(),
        opening: Default::default(),
        resend_at: unfinished.then(|| Instant::now() + grace),
        bytes_by_mode: BTreeMap::new(),
        deferred: HashMap::new(),
        collector: Collector::default(),
        saved_runs: Vec::new(),
        starting: BTreeMap::new(),
        sessions: HashMap::new(),
        deltas: deltas::Deltas::new(delta_bases),
        order_bytes: Arc::default(),
        returning: BTreeMap::new(),
    };
    c.load_runs();
    match c.chunks.store.releases() {
        Ok(releases) => c.deltas.resume(&releases),
        Err(e) => warn!("deltas not resumed: {e}"),
    }
    c.drive_deltas();
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    let mut tick = tokio::time::interval(operate::TICK);
    let gc_every = c
        .config
        .gc_every
        .unwrap_or(Duration::from_secs(86_400 * 365));
    let mut gc = tokio::time::interval_at(tokio::time::Instant::now() + gc_every, gc_every);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = gc.tick(), if c.config.gc_every.is_some() => c.collect_garbage(),
            Some(ev) = events.recv() => c.on_net(ev).await,
            Some(ev) = rx.recv() => c.on_internal(ev).await,
            Some(ev) = recorded_rx.recv() => c.on_internal(ev).await,
            Some(call) = calls.recv() => c.on_api(call),
            _ = tick.tick() => {
                c.tick_rollouts();
                c.drive_gifts();
                c.send_returning();
            }
            _ = flush.tick() => c.flush_if_dirty(),
        }
    }
    info!("coordinator stopping: flushing the store");
    c.chunks.flush().await.map_err(anyhow::Error::msg)?;
    Ok(())
}

/// The cadence at which `members` targets send at most `per_second`
/// reports a second between them, and not more often than `configured`.
fn report_cadence(configured: Duration, members: usize, per_second: u64) -> Duration {
    let spread = (members as u64 * 1000).div_ceil(per_second.max(1));
    configured.max(Duration::from_millis(spread))
}

fn now_unix_ms() -> u64 {
    crate::units::unix_ms(SystemTime::now())
}

fn label<'a>(labels: &'a Labels, key: &str) -> &'a str {
    labels.get(key).map(String::as_str).unwrap_or("")
}

impl Run {
    /// Sends chunk `index` of this run's `unit` (its release, or a patch
    /// unit) to `peer` unasked, at the upload cap, counting its bytes as
    /// the origin's; true once stored there.
    fn put(
        &self,
        net: &NetHandle,
        chunks: &Arc<Chunks>,
        unit: ReleaseId,
        peer: PeerId,
        index: u32,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let (net, chunks) = (net.clone(), chunks.clone());
        let (counter, release) = (self.origin_bytes.clone(), unit);
        let list = match self.units.get(&unit) {
            Some(u) => &u.chunks,
            None => &self.chunks,
        };
        let cref = list.get(index as usize).copied();
        async move {
            let Some(cref) = cref else {
                return false;
            };
            let Some(wire) = chunks.read(cref).await else {
                return false;
            };
            let n = wire.bytes.len() as u64;
            chunks.upload.acquire(n).await;
            let req = ChunkRequest::Put {
                release,
                index,
                chunk: wire,
            };
            let r = net.chunk(peer, req).await;
            counter.fetch_add(n, Ordering::Relaxed);
            chunks.bytes_sent.fetch_add(n, Ordering::Relaxed);
            matches!(r, Ok(ChunkResponse::Stored))
        }
    }
}

/// What a staging's order takes from the coordinator's configuration.
#[derive(Clone)]
struct Origin {
    keypair: Keypair,
    labels: Labels,
    push_parallel: usize,
}

impl Origin {
    fn of(config: &CoordinatorConfig) -> Self {
        Self {
            keypair: config.keypair.clone(),
            labels: config.labels.clone(),
            push_parallel: config.push_parallel,
        }
    }
}

/// A staging's run: the release's manifest (resolved from the record's
/// name when `release` is not given) and its chunks' sizes are read from
/// the store, and the order signed. Blocking: it reads the disk.
fn prepare_run(
    chunks: &Chunks,
    origin: &Origin,
    mut record: RunRecord,
    release: Option<ReleaseId>,
    targets: Vec<PeerId>,
) -> Result<Run, String> {
    let targets = RunTargets::new(targets);
    let release = match release {
        Some(r) => r,
        None => {
            let name = &record.name;
            let (app, version) = name
                .split_once('@')
                .ok_or_else(|| format!("{name:?} is not APP@VERSION"))?;
            chunks
                .store
                .resolve(app, version)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{name} is not published"))?
        }
    };
    record.release = release.to_hex();
    let manifest = chunks
        .store
        .get_manifest(&release)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("release {release} is not in the origin's store"))?;
    let list = chunks.add_release(&manifest);
    let hashes: Vec<_> = list.iter().map(|c| c.hash).collect();
    let wire: HashMap<ChunkHash, u64> = hashes
        .iter()
        .zip(
            chunks
                .store
                .chunk_info(&hashes)
                .map_err(|e| e.to_string())?,
        )
        .filter_map(|(h, i)| Some((*h, u64::from(i?.stored_len))))
        .collect();
    let release_bytes = wire.values().sum();
    let signature = origin
        .keypair
        .sign(&signed_bytes(&release))
        .map_err(|e| e.to_string())?;
    let order = StageOrder {
        manifest: manifest.encode(),
        signature,
        mode: record.mode,
        origin_labels: origin.labels.clone(),
    };
    let manifest_deltas = manifest_deltas(&*chunks.store, &manifest, release, order.manifest.len());
    let swarm = record.mode == DistributionMode::Swarm;
    let offers = deltas::offers(&*chunks.store, &manifest, &origin.keypair, &wire);
    let units = offers
        .values()
        .map(|o| {
            chunks.add_unit(o.unit, o.chunks.clone());
            let unit = UnitRun {
                chunks: o.chunks.clone(),
                // Deltas are small: each goes out once, however idle the
                // uplink (extra copies would be most of their bytes).
                seeder: swarm.then(|| Seeder::new(o.chunks.len(), 1, 1)),
            };
            (o.unit, unit)
        })
        .collect();
    let started = Instant::now()
        .checked_sub(Duration::from_millis(
            now_unix_ms().saturating_sub(record.started_unix_ms),
        ))
        .unwrap_or_else(Instant::now);
    Ok(Run {
        seeder: swarm.then(|| Seeder::new(list.len(), 1, 2)),
        gifts: 0,
        pusher: (record.mode == DistributionMode::Push).then(|| {
            Pusher::new(PushConfig {
                parallel_targets: origin.push_parallel,
                ..PushConfig::default()
            })
        }),
        record,
        release,
        order,
        manifest_deltas,
        offers,
        units,
        chunks: list,
        release_bytes,
        progress: RunProgress::new(targets.len()),
        targets,
        started,
        origin_bytes: Arc::new(AtomicU64::new(0)),
    })
}

/// Older releases of an app a staging's manifest is sent as a delta
/// against, at most: the newest ones, which targets most likely hold.
const MANIFEST_DELTA_BASES: usize = 4;

/// `manifest` as a delta against the newest [`MANIFEST_DELTA_BASES`] older
/// releases of its app in `store`, where that is under half the whole
/// (`whole` bytes). Blocking; a base that cannot be read is skipped.
fn manifest_deltas(
    store: &dyn Store,
    manifest: &Manifest,
    release: ReleaseId,
    whole: usize,
) -> HashMap<ReleaseId, Vec<u8>> {
    let Ok(releases) = store.releases() else {
        return HashMap::new();
    };
    let seq = releases
        .iter()
        .filter(|r| r.id == release)
        .map(|r| r.seq)
        .max()
        .unwrap_or(u64::MAX);
    let mut older: Vec<_> = releases
        .iter()
        .filter(|r| r.app == manifest.app() && r.id != release && r.seq < seq)
        .collect();
    older.sort_by_key(|r| std::cmp::Reverse(r.seq));
    older.dedup_by_key(|r| r.id);
    older
        .into_iter()
        .take(MANIFEST_DELTA_BASES)
        .filter_map(|r| {
            let base = store.get_manifest(&r.id).ok()??;
            let delta = convoy_chunker::manifest_delta(&base, manifest);
            (delta.len() < whole / 2).then_some((r.id, delta))
        })
        .collect()
}

/// Runs `put` as its own task and tells the coordinator how it went.
fn spawn_put(
    tx: mpsc::Sender<Internal>,
    put: impl std::future::Future<Output = bool> + Send + 'static,
    done: impl FnOnce(bool) -> Internal + Send + 'static,
) {
    tokio::spawn(async move {
        let ok = put.await;
        let _ = tx.send(done(ok)).await;
    });
}

impl Coordinator {
    /// Syncs what was stored, from a task.
    fn flush_if_dirty(&mut self) {
        self.sync
            .start(&self.chunks, &self.internal, Internal::Flushed);
    }

    fn runs_path(&self) -> PathBuf {
        self.config.data_dir.join("stagings.json")
    }

    /// Records the unfinished stagings, when they are not the ones
    /// recorded already (a report after a staging ended changes nothing
    /// there, and each write costs two fsyncs).
    ///
    /// The recorder's thread writes the file, in the order the loop asks;
    /// `begun`, a staging that waits for its record, goes on once it is
    /// written.
    fn save_runs(&mut self, begun: Option<(u64, Begun)>) {
        let records: Vec<&RunRecord> = self
            .runs
            .values()
            .filter(|r| !self.run_finished(r))
            .map(|r| &r.record)
            .collect();
        let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
        if ids == self.saved_runs && begun.is_none() {
            return;
        }
        let json = serde_json::to_vec_pretty(&records).expect("records serialise");
        self.saved_runs = ids.clone();
        let recorded = self.recorded.clone();
        let then = Box::new(move |result| {
            let _ = recorded.send(Internal::RunsSaved { ids, result, begun });
        });
        self.deployments.write_file(self.runs_path(), json, then);
    }

    /// `stagings.json` was written (or not): a staging that waited for it
    /// sends its orders.
    fn on_runs_saved(
        &mut self,
        ids: Vec<u64>,
        result: Result<(), String>,
        begun: Option<(u64, Begun)>,
    ) {
        if let Err(e) = result {
            warn!("cannot record stagings: {e}");
            // Written again at the next change.
            if self.saved_runs == ids {
                self.saved_runs.clear();
            }
        }
        let Some((id, begun)) = begun else {
            return;
        };
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        let (release, targets, mode) = (run.release, run.targets.to_vec(), run.record.mode);
        info!(
            id,
            name = %run.record.name,
            mode = mode.name(),
            targets = targets.len(),
            "staging started"
        );
        if let Begun::Operator {
            by,
            app,
            version,
            reply,
            ..
        } = begun
        {
            let h = crate::coordinator::deployments::HistoryEntry::new(
                "stage",
                &by,
                format!(
                    "staging {id} to {} targets in {} mode",
                    targets.len(),
                    mode.name()
                ),
                Some(&version),
                None,
                None,
            );
            self.deployments.record(&app, &h);
            reply.answer(ControlResponse::StagingStarted {
                id,
                release,
                targets: targets.len() as u32,
            });
        }
        self.send_orders(id, targets);
    }

    fn load_runs(&mut self) {
        let Ok(bytes) = std::fs::read(self.runs_path()) else {
            return;
        };
        let records: Vec<RunRecord> = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!("ignoring an unreadable stagings.json: {e}");
                return;
            }
        };
        for rec in records {
            let Some(release) = ReleaseId::from_hex(&rec.release) else {
                continue;
            };
            let targets = rec.targets.iter().filter_map(|t| t.parse().ok()).collect();
            let origin = Origin::of(&self.config);
            let prepared = prepare_run(&self.chunks, &origin, rec.clone(), Some(release), targets);
            match prepared {
                Ok(run) => {
                    info!(id = rec.id, name = %rec.name, "resuming staging");
                    self.saved_runs.push(rec.id);
                    self.runs.insert(rec.id, run);
                }
                Err(e) => warn!(id = rec.id, "cannot resume staging: {e}"),
            }
        }
    }

    /// Sends the targets that came back their unfinished orders, a run at
    /// a time (see `returning`).
    fn send_returning(&mut self) {
        for (id, mut back) in std::mem::take(&mut self.returning) {
            // Back twice within a tick: one order.
            back.sort_unstable();
            back.dedup();
            self.send_orders(id, back);
        }
    }

    fn run_finished(&self, run: &Run) -> bool {
        run.progress.finished()
    }

    /// Connected, and reported within five heartbeats (3 s at least, so a
    /// loaded machine's late heartbeat does not count as a departure).
    fn alive(&self, m: &Member) -> bool {
        m.connected && m.last_seen.elapsed() < (self.heartbeat() * 5).max(Duration::from_secs(3))
    }

    /// The cadence targets are asked to report at: the configured one, or
    /// slower when the fleet would otherwise send more than
    /// `max_reports_per_second` (as Nomad spreads its clients' heartbeats).
    /// Each report costs the coordinator a stream and its handshake (about
    /// 130 µs of CPU here), so 10,000 targets at one a second would take
    /// more than a core; what must be quick does not wait for a heartbeat
    /// (a target reports at once when a staging ends, a delivery is
    /// reported by its own message, a lost connection is seen at once).
    fn heartbeat(&self) -> Duration {
        report_cadence(
            self.config.heartbeat,
            self.members.len(),
            self.config.max_reports_per_second,
        )
    }

    async fn on_net(&mut self, event: NetEvent) {
        match event {
            NetEvent::Listening(_) | NetEvent::Admitted(_) => {}
            NetEvent::Disconnected(peer) => {
                self.sessions.remove(&peer);
                if let Some(m) = self.members.get_mut(&peer) {
                    m.connected = false;
                }
                for run in self.runs.values_mut() {
                    for (_, s) in run.seeders() {
                        s.remove_target(peer);
                    }
                    if let Some(p) = run.pusher.as_mut() {
                        p.remove_target(peer);
                    }
                }
                self.drive_pushes();
            }
            NetEvent::Chunk {
                peer,
                request,
                reply,
            } => self.on_chunk(peer, request, reply).await,
            NetEvent::Control {
                peer,
                request,
                reply,
            } => {
                // Requests that name, stage or read patches wait for a pass.
                let names_or_stages = matches!(
                    request,
                    ControlRequest::Publish { .. }
                        | ControlRequest::StartStaging { .. }
                        | ControlRequest::MissingChunks(_)
                        | ControlRequest::Deltas { .. }
                );
                if names_or_stages && self.collector.running() {
                    if self.collector.full() {
                        let refused = ControlResponse::Error(TOO_MANY_WAITING.into());
                        return reply.send(refused).await;
                    }
                    return self.collector.hold(Waiting::Control(peer, request, reply));
                }
                self.on_control(peer, request, reply);
            }
            NetEvent::Have {
                peer,
                announcement: Announcement { release, chunks },
            } => {
                for run in self.runs.values_mut() {
                    if let Some((_, Some(s))) = run.unit_mut(&release) {
                        for &c in &chunks {
                            s.handle_have(peer, c);
                        }
                    }
                }
            }
        }
    }

    async fn on_chunk(&mut self, peer: PeerId, request: ChunkRequest, reply: ChunkAnswer) {
        match request {
            ChunkRequest::Get { release, indices } => {
                let run = self
                    .runs
                    .values_mut()
                    .rev()
                    .find(|r| r.fetches(&peer, &release));
                // A swarm's target asks the origin for what no peer holds:
                // its last resort is never a turn minutes away (Wait::Backlog).
                let wait = match &run {
                    Some(r) if r.seeds(&release) => Wait::Backlog,
                    _ => Wait::Turn,
                };
                let mut wanted = match self.chunks.admit(peer, &release, &indices, wait) {
                    Ok(wanted) => wanted,
                    Err(answer) => return reply.send(answer).await,
                };
                let idle = self.chunks.upload_idle();
                let (run_id, counter) = match run {
                    Some(r) => {
                        let (id, counter) = (r.record.id, r.origin_bytes.clone());
                        if let Some((list, Some(seeder))) = r.unit_mut(&release) {
                            if !seeder.has_target(peer) {
                                seeder.add_target(peer, HaveSet::empty(list.len()));
                            }
                            for (index, chunk) in indices.iter().zip(wanted.iter_mut()) {
                                if chunk.is_some()
                                    && seeder.handle_request(peer, *index, idle)
                                        == ServeDecision::Refuse
                                {
                                    *chunk = None;
                                }
                            }
                        }
                        (Some(id), Some(counter))
                    }
                    None => (None, None),
                };
                let chunks = self.chunks.clone();
                let tx = self.internal.clone();
                tokio::spawn(async move {
                    let asked: Vec<bool> = wanted.iter().map(Option::is_some).collect();
                    let sent = chunks.serve(wanted, reply, counter).await;
                    let unsent: Vec<u32> = indices
                        .iter()
                        .zip(asked.iter().zip(sent))
                        .filter(|(_, (asked, sent))| **asked && !sent)
                        .map(|(i, _)| *i)
                        .collect();
                    if let (Some(run), false) = (run_id, unsent.is_empty()) {
                        let _ = tx
                            .send(Internal::Unsent {
                                run,
                                unit: release,
                                peer,
                                chunks: unsent,
                            })
                            .await;
                    }
                });
            }
            ChunkRequest::Upload { hash, len, chunk } => {
                if self.operator(peer, "upload").is_none() {
                    return reply.send(ChunkResponse::Denied).await;
                }
                let Some(slot) = self.chunks.upload_slot() else {
                    return reply.send(busy(UPLOAD_RETRY)).await;
                };
                let chunks = self.chunks.clone();
                self.sync.stored();
                tokio::spawn(async move {
                    let r = chunks.receive(ChunkRef { hash, len }, chunk).await;
                    drop(slot);
                    reply
                        .send(match r {
                            Ok(_) => ChunkResponse::Stored,
                            Err(ReceiveError::Invalid(e)) => ChunkResponse::Rejected(e),
                            Err(e) => ChunkResponse::Rejected(format!("origin: {e}")),
                        })
                        .await;
                });
            }
            ChunkRequest::Put { .. } => reply.send(ChunkResponse::Denied).await,
        }
    }

    /// Starts the next due release's deltas, unless a job or a collection
    /// pass runs; no pass starts while it runs (its deltas are written
    /// before the patch that names them).
    fn drive_deltas(&mut self) {
        if self.collector.running() {
            return;
        }
        let Some(mut job) = self.deltas.next() else {
            return;
        };
        job.active = self
            .members
            .values()
            .flat_map(|m| m.report.active.iter())
            .map(|(app, version)| (app.clone(), version.clone()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.collector.reading();
        let (store, tx) = (self.chunks.store.clone(), self.internal.clone());
        tokio::spawn(async move {
            if let Err(e) = tokio::task::spawn_blocking(move || job.run(&*store)).await {
                warn!("making deltas failed: {e}");
            }
            let _ = tx.send(Internal::DeltasMade).await;
        });
    }

    /// Starts a collection pass unless one runs: the origin keeps the
    /// newest `retain` releases of each app and every release of a staging
    /// or roll-out it remembers.
    fn collect_garbage(&mut self) {
        let Some(unused) = self.collector.start() else {
            return;
        };
        let mut pinned: HashSet<ReleaseId> = self.runs.values().map(|r| r.release).collect();
        pinned.extend(self.deployments.all.values().map(|d| d.release));
        pinned.extend(self.opening.values());
        pinned.extend(self.starting.values().filter_map(|s| s.release));
        let retention = Retention {
            newest: self.config.retain,
            pinned,
            pinned_chunks: HashSet::new(),
        };
        let (store, tx) = (self.chunks.store.clone(), self.internal.clone());
        let store_after = store.clone();
        tokio::spawn(async move {
            let pass = tokio::task::spawn_blocking(move || {
                collect(&*store, &retention, Some(&unused)).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("the collection pass failed: {e}")));
            let removed = pass.as_ref().is_ok_and(|(r, _)| r.chunks_removed > 0);
            // Publishes and stagings go on while the space is given back:
            // compaction runs beside them.
            let _ = tx.send(Internal::Collected(pass)).await;
            if removed {
                compact_in_background(store_after).await;
            }
        });
    }

    /// The name of operator `peer`, or `None` after logging and counting
    /// the refusal of its `what`: only an allow-listed operator key may ask
    /// for operator actions; the fleet key alone is not enough.
    fn operator(&self, peer: PeerId, what: &str) -> Option<String> {
        let by = self.sessions.get(&peer).cloned();
        if by.is_none() {
            warn!(%peer, what, "refused: not an operator (the fleet key alone may not ask for this)");
            Refusals::count(&self.config.refusals.not_operator);
        }
        by
    }

    /// A CLI session proves it acts for an operator key: the key must be
    /// listed and must have signed this session's id and ours.
    fn open_session(
        &mut self,
        peer: PeerId,
        public_key: &[u8],
        signature: &[u8],
    ) -> ControlResponse {
        let refuse = |why: &str| {
            warn!(%peer, "refused an operator session: {why}");
            Refusals::count(&self.config.refusals.not_operator);
            ControlResponse::Denied
        };
        let Ok(key) = libp2p::identity::PublicKey::try_decode_protobuf(public_key) else {
            return refuse("not a public key");
        };
        let id = key.to_peer_id();
        let Some(name) = self.config.operators.name(&id) else {
            return refuse(&format!("operator key {id} is not in the operators file"));
        };
        let proof =
            crate::protocol::operator_proof_bytes(&peer.to_bytes(), &self.net.peer_id().to_bytes());
        if !key.verify(&proof, signature) {
            return refuse(&format!(
                "the signature of operator key {id} does not cover this session"
            ));
        }
        if !self.sessions.contains_key(&peer) && self.sessions.len() >= MAX_SESSIONS {
            return ControlResponse::Error("too many operator sessions; try again".into());
        }
        self.sessions
            .insert(peer, format!("operator {name} ({id})"));
        ControlResponse::Ok
    }

    /// Answers `request` on `reply`: at once, or, for what needs the disk
    /// (which chunks the origin lacks, a publish, a staging's start), once
    /// a blocking task has done it.
    fn on_control(&mut self, peer: PeerId, request: ControlRequest, reply: Reply<ControlResponse>) {
        let operator_action = match &request {
            ControlRequest::MissingChunks(_) => Some("missing-chunks"),
            ControlRequest::Publish { .. } => Some("publish"),
            ControlRequest::StartStaging { .. } => Some("stage"),
            ControlRequest::StagingStatus { .. } => Some("staging status"),
            ControlRequest::Fleet => Some("fleet"),
            ControlRequest::Deltas { .. } => Some("deltas"),
            _ => None,
        };
        let operator = match operator_action {
            Some(what) => match self.operator(peer, what) {
                Some(name) => Some(name),
                None => return reply.answer(ControlResponse::Denied),
            },
            None => None,
        };
        let by = operator.unwrap_or_default();
        match request {
            ControlRequest::MissingChunks(hashes) => self.missing_chunks(hashes, reply),
            ControlRequest::Publish { manifest } => self.publish(by, manifest, reply),
            ControlRequest::Deltas { release } => {
                let pending = self.deltas.pending(&release);
                self.collector.reading();
                let (store, tx) = (self.chunks.store.clone(), self.internal.clone());
                tokio::spawn(async move {
                    let report = tokio::task::spawn_blocking(move || {
                        deltas::report(&*store, release, pending)
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                    let response = match report {
                        Ok(r) => ControlResponse::Deltas(r),
                        Err(e) => ControlResponse::Error(e),
                    };
                    let answered = Internal::Answered {
                        spare: Vec::new(),
                        reply,
                        response,
                    };
                    let _ = tx.send(answered).await;
                });
            }
            ControlRequest::StartStaging {
                release,
                selector,
                mode,
            } => self.start_staging(by, release, &selector, mode, reply),
            request => {
                let response = self.answer_now(peer, request);
                reply.answer(response);
            }
        }
    }

    /// The answer to a request that needs nothing from the disk.
    fn answer_now(&mut self, peer: PeerId, request: ControlRequest) -> ControlResponse {
        match request {
            ControlRequest::Report(report) => self.on_report(peer, report),
            ControlRequest::Bitfield {
                release, len, bits, ..
            } => {
                for run in self.runs.values_mut() {
                    if !run.targets.contains(&peer) {
                        continue;
                    }
                    let is_release = run.release == release;
                    let Some((list, seeder)) = run.unit_mut(&release) else {
                        continue;
                    };
                    if len as usize != list.len() || bits.len() != (len as usize).div_ceil(8) {
                        return ControlResponse::Error("have-set of the wrong length".into());
                    }
                    let have = HaveSet::from_indices(
                        len as usize,
                        (0..len).filter(|i| bits[(*i / 8) as usize] & (1 << (i % 8)) != 0),
                    );
                    if let Some(s) = seeder {
                        if s.has_target(peer) {
                            for c in have.iter() {
                                s.handle_have(peer, c);
                            }
                        } else {
                            s.add_target(peer, have.clone());
                        }
                    }
                    if let Some(p) = run.pusher.as_mut().filter(|_| is_release) {
                        p.remove_target(peer);
                        p.add_target(peer, &have);
                    }
                }
                self.drive_pushes();
                self.drive_gifts();
                ControlResponse::Ok
            }
            ControlRequest::MissingChunks(_)
            | ControlRequest::Publish { .. }
            | ControlRequest::Deltas { .. }
            | ControlRequest::StartStaging { .. } => {
                unreachable!("answered off the loop by on_control")
            }
            ControlRequest::StagingStatus { id } => match self.runs.get(&id) {
                Some(run) => ControlResponse::Staging(self.staging_report(run)),
                None => ControlResponse::Error(format!("no staging {id}")),
            },
            ControlRequest::Fleet => ControlResponse::Fleet(self.fleet()),
            ControlRequest::Delivered(report) => {
                self.on_delivered(peer, report);
                ControlResponse::Ok
            }
            ControlRequest::Operator {
                public_key,
                signature,
            } => self.open_session(peer, &public_key, &signature),
            ControlRequest::Stage(_)
            | ControlRequest::StageFrom(_)
            | ControlRequest::StagePatched(_)
            | ControlRequest::Peers { .. }
            | ControlRequest::Deliver { .. }
            | ControlRequest::Rollback { .. }
            | ControlRequest::SetLoad { .. } => ControlResponse::Denied,
        }
    }

    /// Answers which of `hashes` the origin lacks, from a blocking task.
    fn missing_chunks(&mut self, hashes: Vec<ChunkHash>, reply: Reply<ControlResponse>) {
        if hashes.len() > MAX_HASHES_PER_QUERY {
            return reply.answer(ControlResponse::Error(format!(
                "at most {MAX_HASHES_PER_QUERY} hashes per query"
            )));
        }
        self.collector.reading();
        let (store, tx) = (self.chunks.store.clone(), self.internal.clone());
        tokio::spawn(async move {
            let looked = tokio::task::spawn_blocking(move || {
                let held = store.contains_chunks(&hashes).map_err(|e| e.to_string())?;
                Ok::<_, String>((hashes, held))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let (spare, response) = match looked {
                // What an operator is told the origin holds is not
                // dropped by the next pass: a publish is under way.
                Ok((hashes, held)) => (
                    hashes
                        .iter()
                        .zip(&held)
                        .filter(|(_, h)| **h)
                        .map(|(c, _)| *c)
                        .collect(),
                    ControlResponse::Missing(
                        held.iter()
                            .enumerate()
                            .filter(|(_, h)| !**h)
                            .map(|(i, _)| i as u32)
                            .collect(),
                    ),
                ),
                Err(e) => (Vec::new(), ControlResponse::Error(e)),
            };
            let _ = tx
                .send(Internal::Answered {
                    spare,
                    reply,
                    response,
                })
                .await;
        });
    }

    /// Keeps a roll-out order until `peer` reports; the oldest go first
    /// past [`MAX_DEFERRED`] (their roll-outs have failed the target by
    /// then).
    fn defer(&mut self, peer: PeerId, id: u64, request: ControlRequest) {
        let list = self.deferred.entry(peer).or_default();
        if list.len() >= MAX_DEFERRED {
            list.remove(0);
        }
        list.push((id, request));
    }

    /// Every registered target as the coordinator sees it, by peer id.
    fn fleet(&self) -> Vec<FleetMember> {
        let mut members: Vec<FleetMember> = self
            .members
            .iter()
            .map(|(p, m)| FleetMember {
                peer_id: p.to_string(),
                alive: self.alive(m),
                last_seen_ms: m.last_seen.elapsed().as_millis() as u64,
                report: m.report.clone(),
            })
            .collect();
        members.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        members
    }

    fn on_report(&mut self, peer: PeerId, report: TargetReport) -> ControlResponse {
        if report.labels.len() > MAX_LABELS
            || report
                .labels
                .iter()
                .any(|(k, v)| k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES)
        {
            return ControlResponse::Error(format!(
                "at most {MAX_LABELS} labels of {MAX_LABEL_BYTES} bytes"
            ));
        }
        if !self.members.contains_key(&peer) && self.members.len() >= MAX_MEMBERS {
            return ControlResponse::Error("the fleet is full".into());
        }
        let was_alive = self.members.get(&peer).is_some_and(|m| self.alive(m));
        for p in &report.stagings {
            for run in self.runs.values_mut() {
                if run.release == p.release && run.targets.contains(&peer) {
                    let before = run.progress.get(&peer).map_or(0, |o| o.bytes_received);
                    *self
                        .bytes_by_mode
                        .entry(run.record.mode.name())
                        .or_default() += p.bytes_received.saturating_sub(before);
                    run.progress.record(peer, p.clone());
                }
            }
        }
        if !was_alive {
            info!(%peer, labels = ?report.labels, "target registered");
        }
        self.members.insert(
            peer,
            Member {
                report,
                last_seen: Instant::now(),
                connected: true,
            },
        );
        if !was_alive {
            // Back after a restart (its or ours): give it its unfinished orders.
            let pending: Vec<u64> = self
                .runs
                .values()
                .filter(|r| {
                    r.targets.contains(&peer)
                        && r.progress
                            .get(&peer)
                            .is_none_or(|p| p.state == StageState::Running)
                })
                .map(|r| r.record.id)
                .collect();
            for id in pending {
                self.returning.entry(id).or_default().push(peer);
            }
        }
        let finished: Vec<u64> = self
            .runs
            .iter()
            .filter(|(_, r)| self.run_finished(r))
            .map(|(id, _)| *id)
            .collect();
        if !finished.is_empty() {
            self.save_runs(None);
        }
        self.rollout_progress(peer);
        for (id, request) in self.deferred.remove(&peer).unwrap_or_default() {
            let deployment = self.deployments.all.get(&id);
            let rollout = deployment.map(|d| &d.rollout);
            // A delivery is not started for a roll-out that has ended.
            let ended = rollout.is_none_or(|r| r.is_done());
            if ended && matches!(request, ControlRequest::Deliver { .. }) {
                continue;
            }
            // A load order says what the roll-out wants now: the orders
            // go out at once, so a blue-green switch's drain deferred
            // before its rollback's undrain could otherwise land last and
            // leave the live slice out of load (chaos, seed 2026, trial 68).
            let request = match (request, rollout) {
                (ControlRequest::SetLoad { in_load, wait_ms }, Some(r)) => {
                    let wanted = r.wanted_load(&peer.to_string()).unwrap_or(in_load);
                    let wait_ms = deployment.map_or(wait_ms, |d| d.load.wait_ms(wanted));
                    ControlRequest::SetLoad {
                        in_load: wanted,
                        wait_ms,
                    }
                }
                (request, _) => request,
            };
            self.send_order(id, peer.to_string(), request);
        }
        ControlResponse::Registered {
            heartbeat_ms: self.heartbeat().as_millis() as u64,
        }
    }

    /// Names a release whose chunks the origin holds, from a blocking
    /// task: the manifest is decoded, its chunks looked up, the store
    /// synced and the name and history written there.
    fn publish(&mut self, by: String, bytes: Vec<u8>, reply: Reply<ControlResponse>) {
        self.collector.reading();
        let (store, tx) = (self.chunks.store.clone(), self.internal.clone());
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                let manifest = Manifest::decode(&bytes).map_err(|e| e.to_string())?;
                let hashes: Vec<_> = manifest.unique_chunks().iter().map(|c| c.hash).collect();
                let missing = store
                    .contains_chunks(&hashes)
                    .map_err(|e| e.to_string())?
                    .iter()
                    .filter(|h| !**h)
                    .count();
                if missing > 0 {
                    return Err(format!(
                        "{missing} of the release's chunks are not on the origin; upload them first"
                    ));
                }
                store.flush().map_err(|e| e.to_string())?;
                let id = store.put_release(&manifest).map_err(|e| e.to_string())?;
                info!(release = %id, by, "published");
                let h = crate::coordinator::deployments::HistoryEntry::new(
                    "publish",
                    &by,
                    format!("release {id}"),
                    Some(manifest.version()),
                    None,
                    None,
                );
                crate::coordinator::deployments::record(&*store, manifest.app(), &h);
                Ok(id)
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let response = match result {
                Ok(id) => ControlResponse::Published(id),
                Err(e) => ControlResponse::Error(e),
            };
            let _ = tx
                .send(Internal::Answered {
                    spare: Vec::new(),
                    reply,
                    response,
                })
                .await;
        });
    }

    /// Starts an operator's staging of `name` on the live targets
    /// `selector` picks; it is answered once its orders can go out.
    fn start_staging(
        &mut self,
        by: String,
        name: String,
        selector: &Labels,
        mode: DistributionMode,
        reply: Reply<ControlResponse>,
    ) {
        let Some((app, version)) = name.split_once('@') else {
            let e = format!("{name:?} is not APP@VERSION");
            return reply.answer(ControlResponse::Error(e));
        };
        let mut targets: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(_, m)| self.alive(m))
            .filter(|(_, m)| crate::pipeline::selects(selector, &m.report.labels))
            .map(|(p, _)| *p)
            .collect();
        targets.sort();
        let selector = if selector.is_empty() {
            "(all)".to_string()
        } else {
            selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        // Checked once the name is (an unpublished name is the first
        // thing to say).
        let begun = Begun::Operator {
            by,
            app: app.into(),
            version: version.into(),
            selector,
            reply,
        };
        self.begin_run(&name, None, targets, mode, begun);
    }

    /// Starts a staging of `name` (the release `release`, or the one the
    /// name resolves to) on `targets`: its manifest and chunks are looked
    /// up off the loop, its record written, then its orders sent.
    fn begin_run(
        &mut self,
        name: &str,
        release: Option<ReleaseId>,
        targets: Vec<PeerId>,
        mode: DistributionMode,
        begun: Begun,
    ) {
        let last = |ids: Option<&u64>| ids.copied().unwrap_or(0);
        let id = last(self.runs.keys().next_back()).max(last(self.starting.keys().next_back())) + 1;
        let record = RunRecord {
            id,
            name: name.to_string(),
            release: release.map(|r| r.to_hex()).unwrap_or_default(),
            mode,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            started_unix_ms: now_unix_ms(),
        };
        self.starting.insert(
            id,
            Starting {
                release,
                targets: targets.clone(),
            },
        );
        // A collection pass waits for an operator's staging: its release
        // is not pinned yet (a roll-out's is, by the roll-out).
        if matches!(begun, Begun::Operator { .. }) {
            self.collector.reading();
        }
        let (chunks, origin, tx) = (
            self.chunks.clone(),
            Origin::of(&self.config),
            self.internal.clone(),
        );
        tokio::spawn(async move {
            let prepared = tokio::task::spawn_blocking(move || {
                prepare_run(&chunks, &origin, record, release, targets).map(Box::new)
            })
            .await
            .unwrap_or_else(|e| Err(format!("looking the release up failed: {e}")));
            let _ = tx
                .send(Internal::Prepared {
                    id,
                    run: prepared,
                    begun,
                })
                .await;
        });
    }

    /// A staging was looked up: it is kept and its record written, or its
    /// starter learns why not.
    fn on_prepared(&mut self, id: u64, run: Result<Box<Run>, String>, begun: Begun) {
        if matches!(begun, Begun::Operator { .. }) {
            self.collector.read();
        }
        let starting = self.starting.remove(&id);
        let run = match run {
            Ok(run) => run,
            Err(e) => {
                match begun {
                    Begun::Operator { reply, .. } => reply.answer(ControlResponse::Error(e)),
                    Begun::Rollout(rollout) => {
                        for p in starting.map(|s| s.targets).unwrap_or_default() {
                            self.queue.push_back((
                                rollout,
                                crate::coordinator::rollout::Event::Staged(
                                    p.to_string(),
                                    Err(e.clone()),
                                ),
                            ));
                        }
                        self.drain_queue();
                    }
                }
                return;
            }
        };
        let begun = match begun {
            Begun::Operator {
                selector, reply, ..
            } if run.targets.is_empty() => {
                let e = format!("no live target matches {selector}");
                return reply.answer(ControlResponse::Error(e));
            }
            begun => begun,
        };
        while self.runs.len() >= MAX_RUNS {
            let oldest = *self.runs.keys().next().expect("not empty");
            self.runs.remove(&oldest);
        }
        self.runs.insert(id, *run);
        self.save_runs(Some((id, begun)));
    }

    /// Orders `to` to stage run `id`, then (swarm) names their peers.
    fn send_orders(&self, id: u64, to: Vec<PeerId>) {
        let Some(run) = self.runs.get(&id) else {
            return;
        };
        let peer_lists = if run.record.mode == DistributionMode::Swarm {
            self.peer_lists(run, &to)
        } else {
            Vec::new()
        };
        let net = self.net.clone();
        let order = run.order.clone();
        let tx = self.internal.clone();
        // Per target: the manifest as a delta against a release it holds,
        // the smallest such, else whole.
        let bases: Vec<Option<(ReleaseId, Vec<u8>)>> = to
            .iter()
            .map(|t| {
                let held = &self.members.get(t)?.report.releases;
                held.iter()
                    .filter_map(|b| run.manifest_deltas.get(b).map(|d| (*b, d)))
                    .min_by_key(|(_, d)| d.len())
                    .map(|(b, d)| (b, d.clone()))
            })
            .collect();
        // Per target: the patch from a release it holds that spares the
        // most, with the manifest as a delta against that release where
        // one was made.
        let patched: Vec<Option<(PatchedOrder, u64)>> = to
            .iter()
            .map(|t| {
                let held = &self.members.get(t)?.report.releases;
                let offer = held
                    .iter()
                    .filter_map(|b| run.offers.get(b))
                    .max_by_key(|o| o.spared)?;
                let delta = offer.manifest_delta.clone();
                let patched = PatchedOrder {
                    manifest_is_delta: delta.is_some(),
                    order: StageOrder {
                        manifest: delta.unwrap_or_else(|| order.manifest.clone()),
                        ..order.clone()
                    },
                    patch: offer.record.clone(),
                    patch_signature: offer.signature.clone(),
                };
                Some((patched, offer.spared))
            })
            .collect();
        let sent = self.order_bytes.clone();
        let counters = self.deltas.counters.clone();
        tokio::spawn(async move {
            let orders = to.iter().zip(bases).zip(patched).map(|((t, base), patched)| {
                let net = net.clone();
                let order = order.clone();
                let sent = sent.clone();
                let counters = counters.clone();
                async move {
                    if let Some((patched, spared)) = patched {
                        let n = patched.order.manifest.len() as u64;
                        let form = if patched.manifest_is_delta {
                            &sent.delta
                        } else {
                            &sent.whole
                        };
                        match net.control(*t, ControlRequest::StagePatched(patched)).await {
                            Ok(ControlResponse::Ok) => {
                                form.fetch_add(n, Ordering::Relaxed);
                                counters.orders.fetch_add(1, Ordering::Relaxed);
                                counters.spared_wire_bytes.fetch_add(spared, Ordering::Relaxed);
                                return;
                            }
                            Ok(other) => {
                                debug!(target = %t, "order with a patch not taken ({other:?}); sending it without")
                            }
                            Err(e) => debug!(target = %t, "order not delivered ({e}); sending it without a patch"),
                        }
                    }
                    if let Some((base, delta)) = base {
                        let n = delta.len() as u64;
                        let request = ControlRequest::StageFrom(StageOrderDelta {
                            base,
                            order: StageOrder {
                                manifest: delta,
                                ..order.clone()
                            },
                        });
                        match net.control(*t, request).await {
                            Ok(ControlResponse::Ok) => {
                                sent.delta.fetch_add(n, Ordering::Relaxed);
                                return;
                            }
                            Ok(other) => {
                                debug!(target = %t, "order with the manifest as a delta not taken ({other:?}); sending it whole")
                            }
                            Err(e) => debug!(target = %t, "order not delivered ({e}); sending it whole"),
                        }
                    }
                    let n = order.manifest.len() as u64;
                    match net.control(*t, ControlRequest::Stage(order)).await {
                        Ok(ControlResponse::Ok) => {
                            sent.whole.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(other) => warn!(target = %t, "target refused the order: {other:?}"),
                        Err(e) => warn!(target = %t, "order not delivered: {e}"),
                    }
                }
            });
            futures::future::join_all(orders).await;
            let lists = peer_lists.into_iter().map(|(t, req)| {
                let net = net.clone();
                async move {
                    if let Err(e) = net.control(t, req).await {
                        debug!(target = %t, "peer list not delivered: {e}");
                    }
                }
            });
            futures::future::join_all(lists).await;
            let _ = tx.send(Internal::Ordered { run: id }).await;
        });
    }

    /// The peer list of each of `to`, targets of a swarm run: whom each
    /// should fetch from — its data centre's first (same zone before
    /// other zones), then others, up to the configured degree, as
    /// [`PeerPool`] draws them — and its import rank in its data centre.
    /// The candidates are grouped once for the whole batch.
    fn peer_lists(&self, run: &Run, to: &[PeerId]) -> Vec<(PeerId, ControlRequest)> {
        let place = |p: &PeerId| {
            self.members.get(p).map_or(("", ""), |m| {
                (
                    label(&m.report.labels, "dc"),
                    label(&m.report.labels, "zone"),
                )
            })
        };
        // The run's targets, and live members that already hold the release.
        let seeds = self
            .members
            .iter()
            .filter(|(p, m)| {
                self.alive(m)
                    && m.report.releases.contains(&run.release)
                    && !run.targets.contains(p)
            })
            .map(|(p, _)| *p);
        let pool = PeerPool::new(run.targets.iter().copied().chain(seeds).map(|p| {
            let (dc, zone) = place(&p);
            (p, dc, zone)
        }));
        // A target's rank: its place among its data centre's targets.
        let mut dc_sizes: HashMap<&str, u32> = HashMap::new();
        let mut ranks: HashMap<PeerId, u32> = HashMap::with_capacity(run.targets.len());
        for p in run.targets.iter() {
            let n = dc_sizes.entry(place(p).0).or_default();
            ranks.insert(*p, *n);
            *n += 1;
        }
        let degree = self.config.swarm_degree.min(MAX_PEERS_PER_LIST);
        to.iter()
            .map(|target| {
                let (dc, zone) = place(target);
                // Per target, so lists differ between targets but not
                // between stagings: the next release's peers are this
                // one's, and their connections (each a TLS handshake of
                // some kilobytes) are reused. Seeded per release, an
                // update of 50 targets moved 58–67 KiB a target, not 39.
                let seed = blake3::hash(&target.to_bytes());
                let seed = u64::from_le_bytes(seed.as_bytes()[..8].try_into().expect("8"));
                let peers = pool
                    .choose(*target, &dc, &zone, degree, seed)
                    .iter()
                    .map(|p| {
                        let m = self.members.get(p);
                        PeerInfo {
                            peer_id: p.to_bytes(),
                            addrs: m.map(|m| m.report.addrs.clone()).unwrap_or_default(),
                            labels: m.map(|m| m.report.labels.clone()).unwrap_or_default(),
                        }
                    })
                    .collect();
                let request = ControlRequest::Peers {
                    release: run.release,
                    peers,
                    rank: ranks.get(target).copied().unwrap_or(0),
                    dc_size: dc_sizes.get(dc).copied().unwrap_or(0).max(1),
                };
                (*target, request)
            })
            .collect()
    }

    async fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::Collected(pass) => {
                for w in self.collector.finish(pass) {
                    match w {
                        Waiting::Control(peer, request, reply) => {
                            self.on_control(peer, request, reply)
                        }
                        Waiting::Api(call) => self.on_api(call),
                    }
                }
                self.drive_deltas();
            }
            Internal::DeltasMade => {
                self.collector.read();
                self.deltas.done();
                self.drive_deltas();
            }
            Internal::Pushed {
                run,
                peer,
                chunk,
                ok,
            } => {
                if let Some(p) = self.runs.get_mut(&run).and_then(|r| r.pusher.as_mut()) {
                    if ok {
                        p.handle_delivered(peer, chunk);
                    } else {
                        p.handle_rejected(peer, chunk);
                    }
                }
                self.drive_pushes();
            }
            Internal::Gifted {
                run,
                unit,
                peer,
                chunk,
                ok,
            } => {
                if let Some(r) = self.runs.get_mut(&run) {
                    r.gifts -= 1;
                    if let (Some((_, Some(s))), false) = (r.unit_mut(&unit), ok) {
                        // Unreachable, or not staging it: left out of the
                        // hand-outs until it asks or reports again.
                        debug!(%peer, chunk, run, "a chunk the origin handed out was not stored there; leaving the target out of hand-outs until it reports again");
                        s.handle_send_failed(peer, chunk);
                        s.remove_target(peer);
                    }
                }
                self.drive_gifts();
            }
            Internal::Unsent {
                run,
                unit,
                peer,
                chunks,
            } => {
                if let Some((_, Some(s))) = self.runs.get_mut(&run).and_then(|r| r.unit_mut(&unit))
                {
                    for chunk in chunks {
                        s.handle_send_failed(peer, chunk);
                    }
                }
            }
            Internal::Ordered { run } => debug!(run, "orders delivered"),
            Internal::Answered {
                spare,
                reply,
                response,
            } => {
                self.collector.read();
                self.collector.spare(spare);
                if let ControlResponse::Published(id) = &response {
                    self.deltas.due(*id);
                }
                reply.answer(response);
                self.drive_deltas();
            }
            Internal::Rollout { id, event } => self.rollout_event(id, event),
            Internal::Recorded {
                id,
                at,
                event,
                result,
                steered,
            } => self.on_recorded(id, at, event, result, steered),
            Internal::Flushed(result) => self.sync.finished(result),
            Internal::Prepared { id, run, begun } => self.on_prepared(id, run, begun),
            Internal::RunsSaved { ids, result, begun } => self.on_runs_saved(ids, result, begun),
            Internal::Opened { opening, result } => self.on_opened(opening, result),
            Internal::Promoted { promoting, result } => self.on_promoted(promoting, result),
            Internal::Undelivered { id, peer, request } => self.defer(peer, id, request),
        }
    }

    /// Sends what each swarm run's [`Seeder`] hands out, [`MAX_GIFTS`] at
    /// a time.
    fn drive_gifts(&mut self) {
        for run in self.runs.values_mut() {
            while run.gifts < MAX_GIFTS {
                let idle = self.chunks.upload.backlog(Instant::now()) < GIFT_IDLE_BACKLOG;
                // Patches' deltas first: every target holding a base needs them.
                let Some((unit, peer, chunk)) = run
                    .seeders()
                    .find_map(|(u, s)| s.gift(idle).map(|(p, c)| (u, p, c)))
                else {
                    break;
                };
                run.gifts += 1;
                let id = run.record.id;
                spawn_put(
                    self.internal.clone(),
                    run.put(&self.net, &self.chunks, unit, peer, chunk),
                    move |ok| Internal::Gifted {
                        run: id,
                        unit,
                        peer,
                        chunk,
                        ok,
                    },
                );
            }
        }
    }

    /// Carries out what each push run's [`Pusher`] decided.
    fn drive_pushes(&mut self) {
        for run in self.runs.values_mut() {
            while let Some(action) = run.pusher.as_mut().and_then(Pusher::poll_action) {
                match action {
                    PushAction::Send { peer, chunk } => {
                        let id = run.record.id;
                        spawn_put(
                            self.internal.clone(),
                            run.put(&self.net, &self.chunks, run.release, peer, chunk),
                            move |ok| Internal::Pushed {
                                run: id,
                                peer,
                                chunk,
                                ok,
                            },
                        );
                    }
                    PushAction::Done { peer } => debug!(%peer, "push complete"),
                    PushAction::Failed { peer } => {
                        warn!(%peer, "push failed: the target rejected chunks too often")
                    }
                }
            }
        }
    }

    fn staging_report(&self, run: &Run) -> StagingReport {
        StagingReport {
            id: run.record.id,
            name: run.record.name.clone(),
            release: run.release,
            mode: run.record.mode,
            chunks_total: run.chunks.len() as u32,
            release_bytes: run.release_bytes,
            elapsed_ms: run.started.elapsed().as_millis() as u64,
            origin_bytes_sent: run.origin_bytes.load(Ordering::Relaxed),
            targets: run
                .targets
                .iter()
                .map(|t| {
                    let m = self.members.get(t);
                    TargetStaging {
                        peer_id: t.to_string(),
                        labels: m.map(|m| m.report.labels.clone()).unwrap_or_default(),
                        progress: run.progress.get(t).cloned(),
                        alive: m.is_some_and(|m| self.alive(m)),
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_fleet_is_asked_to_report_less_often() {
        let second = Duration::from_secs(1);
        assert_eq!(report_cadence(second, 500, 1000), second);
        assert_eq!(report_cadence(second, 10_000, 1000), 10 * second);
        assert_eq!(
            report_cadence(second, 3_001, 1000),
            Duration::from_millis(3001)
        );
        assert_eq!(report_cadence(5 * second, 3_000, 1000), 5 * second);
    }

    #[test]
    fn a_run_ends_when_every_target_reported_it_done_and_not_before() {
        let progress = |state| StageProgress {
            release: ReleaseId([0; 32]),
            chunks_held: 0,
            chunks_total: 1,
            bytes_received: 0,
            bytes_received_cross_dc: 0,
            elapsed_ms: 0,
            finished_unix_ms: None,
            state,
        };
        let (a, b) = (PeerId::random(), PeerId::random());
        let targets = RunTargets::new(vec![a, b, a]);
        assert_eq!(targets.len(), 2, "a target named twice counts once");
        let mut run = RunProgress::new(targets.len());
        run.record(a, progress(StageState::Staged));
        run.record(a, progress(StageState::Staged));
        assert!(
            !run.finished(),
            "one target's repeated report ended the run"
        );
        run.record(b, progress(StageState::Running));
        assert!(!run.finished());
        run.record(b, progress(StageState::Failed("disk".into())));
        assert!(run.finished());
        // Restaged after a restart: running again.
        run.record(a, progress(StageState::Running));
        assert!(!run.finished());
    }
}
