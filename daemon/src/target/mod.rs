//! The target role: register with the coordinator, stage what it orders.
//!
//! One task ([`run`]) owns the state of every staging and drives the
//! [`Fetcher`] of each (swarm, pull) or takes the chunks the origin pushes.
//! Requests to peers run as their own tasks and report back on a channel,
//! so the loop never waits on the network. Orders are kept under
//! `DATA/staging/` until the release is staged, so a restarted target
//! resumes them, fetching only what its store lacks. An order may come
//! with a patch from a release the target holds: its deltas are fetched
//! as a staging of their own (a unit, see [`patching`]) and the
//! files it covers rebuilt, or fetched as chunks if that fails.
//!
//! Delivery (the coordinator's `Deliver`) runs as a task of its own, one at
//! a time per target: drain, materialise under `DATA/releases`, hooks,
//! switch, undrain; its outcome goes to the coordinator as `Delivered`.
//!
//! What lives here, the target role and nothing of the coordinator's:
//!
//! - this module: the role's loop — registration, reports, stagings;
//! - [`deliver`]: materialising a staged release, hooks, the switch;
//! - [`health`]: in load or drained, and the endpoint load balancers poll;
//! - [`patching`]: rebuilding files from an order's deltas.
//!
//! It may use [`net`](crate::net), [`store`](crate::store),
//! [`transfer`](crate::transfer) and the shared plumbing at the crate's
//! root; never [`coordinator`](crate::coordinator).

pub mod deliver;
pub mod health;
pub mod patching;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use convoy_chunker::{ChunkHash, ChunkRef, Manifest, ReleaseId};
use libp2p::identity::PublicKey;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use self::deliver::Releases;
use self::health::Load;
use self::patching::{plan_patch, signed_patch, PatchJob, PlannedPatch};
use crate::net::serve::{ChunkList, Chunks, ReceiveError};
use crate::net::{NetEvent, NetHandle, Reply, RequestError};
use crate::protocol::{
    self, signed_bytes, Announcement, ChunkRequest, ChunkResponse, ControlRequest, ControlResponse,
    DeliveryReport, DistributionMode, Labels, PatchedOrder, Place, StageOrder, StageOrderDelta,
    StageProgress, StageState, TargetReport, MAX_CONTROL_FRAME,
};
use crate::store::{
    collect, compact_in_background, rebuild_in_store, Collector, Pass, Rebuilt, Retention, Store,
    StoreSource,
};
use crate::transfer::crowd::Wait;
use crate::transfer::{
    Announcer, FetchAction, FetchConfig, Fetcher, HaveSet, Locality, Mode, ANNOUNCE_RARE_EVERY,
    STARVED_PATIENCE,
};

/// Requests in flight to the origin in pull mode (64 KiB chunks: 8 MiB).
/// Its answers pass through several tasks and the store on each side, so
/// even on loopback a chunk's round trip is milliseconds: 32 held an
/// uncapped 1 GiB pull to 2.0 s where 128 took it to 1.6-1.8 s. An origin
/// with more requests than it can serve soon answers busy, which cuts
/// the window to what it was serving.
const PULL_WINDOW: usize = 128;
/// How often received chunks are made durable.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Heartbeat until the coordinator says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// Peers whose labels a target remembers.
const MAX_KNOWN_PEERS: usize = 4096;
/// Stagings a target runs at once.
const MAX_STAGINGS: usize = 16;
/// Flush ticks (seconds) without a new delta chunk before a patch is given
/// up and its files' chunks fetched instead.
const PATCH_STALL_TICKS: u32 = 10;

/// How a target is set up.
pub struct TargetConfig {
    /// The coordinator's peer id (its public key: manifests must be signed by it).
    pub coordinator: PeerId,
    /// Where to reach it.
    pub coordinator_addrs: Vec<Multiaddr>,
    /// Where this target listens: its first report already tells peers
    /// how to reach it (a staging can start right after registration).
    pub listening: Vec<Multiaddr>,
    /// This target's labels.
    pub labels: Labels,
    /// The data directory (orders in progress live under `staging/`).
    pub data_dir: PathBuf,
    /// The releases delivered here.
    pub releases: Arc<Releases>,
    /// Whether the target is in load.
    pub load: Arc<Load>,
    /// Where the health endpoint listens, reported to the coordinator.
    pub health_addr: Option<String>,
    /// How often the store drops what no kept release uses (see
    /// [`collect`]); `None`: never.
    pub gc_every: Option<Duration>,
}

/// Tells the coordinator how a delivery ended, until it takes the report:
/// a coordinator under load answers "busy" (its queue from the network
/// was full) and one that restarts does not answer, and a report lost
/// left the roll-out waiting for the target until its deadline (a
/// 10,000-target wave lost 286 of them to busy answers). Gives up after
/// about a minute; the coordinator, if it restarted, orders again and a
/// delivered release answers at once.
pub async fn report_delivery(net: &NetHandle, coordinator: PeerId, report: DeliveryReport) {
    for attempt in 0..8u32 {
        match net
            .control(coordinator, ControlRequest::Delivered(report.clone()))
            .await
        {
            Ok(ControlResponse::Ok) => return,
            Ok(ControlResponse::Denied) => {
                warn!("the coordinator refused the delivery report");
                return;
            }
            Ok(other) => debug!(attempt, "delivery report not taken: {other:?}"),
            Err(e) => debug!(attempt, "cannot report the delivery: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt).min(Duration::from_secs(10)))
            .await;
    }
    warn!(release = %report.release, "the coordinator took no report of this delivery");
}

/// The coordinator's public key, taken from its peer id (ed25519 ids embed it).
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(mh.digest()).ok()
}

enum Internal {
    /// The answer to one batched request: each chunk's outcome.
    Fetched {
        release: ReleaseId,
        peer: PeerId,
        outcomes: Vec<(u32, Outcome)>,
    },
    Pushed {
        release: ReleaseId,
        index: u32,
        bytes: u64,
    },
    /// The store refused a chunk of `release` the origin pushed.
    StoreFailed {
        release: ReleaseId,
        error: String,
    },
    Staged {
        release: ReleaseId,
        result: Result<(), String>,
    },
    Registered(Result<ControlResponse, RequestError>),
    /// A collection pass ended.
    Collected(Pass),
    /// A flush ended.
    Flushed(Result<(), String>),
    /// An order was checked and its chunks looked up off the loop; the
    /// reply, if any, waits for it to be installed.
    Prepared(
        Result<Box<Prepared>, String>,
        Option<Reply<ControlResponse>>,
    ),
    /// A patch's files were rebuilt (or some not) from its deltas.
    Rebuilt {
        unit: ReleaseId,
        rebuilt: Rebuilt,
    },
}

/// An order checked against the coordinator's key, with what the store
/// holds of it: everything accepting it needs from the disk.
struct Prepared {
    order: StageOrder,
    manifest: Arc<Manifest>,
    id: ReleaseId,
    chunks: ChunkList,
    held: Vec<bool>,
    /// The release its name resolves to here.
    already: Option<ReleaseId>,
    /// The patch it came with, planned.
    patch: Option<PlannedPatch>,
}

enum Outcome {
    Stored(u64),
    Invalid(String),
    Refused,
    /// Declined for now; the peer's estimate of when it has room.
    Busy(Duration),
    Failed(RequestError),
    StoreFailed(String),
}

struct Staging {
    order: StageOrder,
    manifest: Arc<Manifest>,
    chunks: ChunkList,
    have: HaveSet,
    /// Chunks not to fetch: a release's that its patch rebuilds (until it
    /// has or has failed), a patch unit's deltas this target does not
    /// need. The coordinator is told they are held, so it does not send them.
    deferred: HaveSet,
    /// A release's patch unit, fetched beside it.
    unit: Option<ReleaseId>,
    /// A patch unit's files to rebuild once its wanted chunks are held.
    job: Option<Arc<PatchJob>>,
    fetcher: Option<Fetcher<PeerId>>,
    /// Peers of this staging and how close each is.
    peers: BTreeMap<PeerId, Locality>,
    /// The chunks held since the last announcement.
    announcer: Announcer,
    started: Instant,
    /// Once it ended: how long it took, and when by the wall clock.
    finished: Option<(Duration, SystemTime)>,
    bytes_received: u64,
    bytes_cross_dc: u64,
    state: StageState,
    origin_in_my_dc: bool,
    finishing: bool,
    /// Chunks held at the last watchdog tick, and ticks without progress.
    watch: (usize, u32),
}

impl Staging {
    /// `peer`, at `locality`, takes part in this staging: added to the
    /// swarm's fetcher when new, re-ranked when its place is known better
    /// now (a claim, then the coordinator's list). True when new.
    fn meet(&mut self, now: Instant, peer: PeerId, locality: Locality) -> bool {
        let swarm = self.order.mode == DistributionMode::Swarm;
        let fetcher = self.fetcher.as_mut().filter(|_| swarm);
        match self.peers.insert(peer, locality) {
            None => {
                if let Some(f) = fetcher {
                    f.add_peer(now, peer, locality, HaveSet::empty(self.have.len()));
                }
                true
            }
            Some(was) => {
                if let (Some(f), true) = (fetcher, was != locality) {
                    f.set_locality(now, peer, locality);
                }
                false
            }
        }
    }
    /// A staging of `chunks` (held: `have`), deferring `deferred`; its
    /// fetcher, if any, is set by the caller.
    fn new(
        order: StageOrder,
        manifest: Arc<Manifest>,
        chunks: ChunkList,
        have: HaveSet,
        deferred: HaveSet,
        coordinator: PeerId,
        origin_in_my_dc: bool,
    ) -> Self {
        Self {
            order,
            manifest,
            chunks,
            have,
            deferred,
            unit: None,
            job: None,
            fetcher: None,
            peers: [(coordinator, Locality::Origin)].into(),
            announcer: Announcer::new(Instant::now()),
            started: Instant::now(),
            finished: None,
            bytes_received: 0,
            bytes_cross_dc: 0,
            state: StageState::Running,
            origin_in_my_dc,
            finishing: false,
            watch: (0, 0),
        }
    }

    /// Whether every chunk it needs is held: all of a release's; a patch
    /// unit's wanted ones.
    fn has_all(&self) -> bool {
        match self.job {
            None => self.have.is_full(),
            Some(_) => (0..self.have.len() as u32)
                .all(|i| self.have.contains(i) || self.deferred.contains(i)),
        }
    }

    /// Marks it ended (its state is set by the caller).
    fn finish(&mut self) {
        self.finishing = false;
        self.finished = Some((self.started.elapsed(), SystemTime::now()));
    }

    fn progress(&self, release: ReleaseId) -> StageProgress {
        let (elapsed, at) = match self.finished {
            Some((d, at)) => (d, Some(at)),
            None => (self.started.elapsed(), None),
        };
        StageProgress {
            release,
            chunks_held: self.have.count() as u32,
            chunks_total: self.have.len() as u32,
            bytes_received: self.bytes_received,
            bytes_received_cross_dc: self.bytes_cross_dc,
            elapsed_ms: elapsed.as_millis() as u64,
            finished_unix_ms: at.map(crate::units::unix_ms),
            state: self.state.clone(),
        }
    }
}

struct Target {
    config: TargetConfig,
    coordinator_key: PublicKey,
    net: NetHandle,
    chunks: Arc<Chunks>,
    stagings: HashMap<ReleaseId, Staging>,
    /// Where each known peer stands: as the coordinator's peer lists
    /// name it, or as its have-set claims when no list has.
    places: HashMap<PeerId, Place>,
    /// Where this target stands, by its labels.
    place: Place,
    internal: mpsc::Sender<Internal>,
    heartbeat: Duration,
    registered: bool,
    registering: bool,
    /// When what was stored is synced.
    sync: crate::net::serve::Syncer,
    listen: Vec<Multiaddr>,
    /// Releases being delivered (a repeated order is answered, not rerun).
    delivering: Arc<std::sync::Mutex<HashSet<ReleaseId>>>,
    /// Held by the delivery or rollback that runs.
    delivery_lock: Arc<tokio::sync::Mutex<()>>,
    /// Collection passes: while one runs, orders to stage or deliver wait
    /// (with their source) until it ends, so it never drops what they need.
    collector: Collector<(PeerId, ControlRequest)>,
}

/// Runs the target until `shutdown` completes.
pub async fn run(
    config: TargetConfig,
    chunks: Arc<Chunks>,
    net: NetHandle,
    mut events: mpsc::Receiver<NetEvent>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let coordinator_key = public_key_of(&config.coordinator).ok_or_else(|| {
        anyhow::anyhow!(
            "coordinator peer id {} does not embed a public key; use the id convoyd coordinator prints",
            config.coordinator
        )
    })?;
    crate::durable::create_dir_all(&config.data_dir.join("staging"))?;
    net.add_addresses(config.coordinator, config.coordinator_addrs.clone())
        .await;
    let (tx, mut rx) = mpsc::channel(4096);
    let mut t = Target {
        coordinator_key,
        net,
        chunks,
        stagings: HashMap::new(),
        places: HashMap::new(),
        place: Place::of(&config.labels),
        internal: tx,
        heartbeat: DEFAULT_HEARTBEAT,
        registered: false,
        registering: false,
        sync: Default::default(),
        listen: config.listening.clone(),
        delivering: Arc::default(),
        delivery_lock: Arc::default(),
        collector: Collector::default(),
        config,
    };
    t.resume_orders();
    t.register();
    // Polled only while a staging runs or has chunks to announce: an idle
    // target sleeps instead of waking 20 times a second. After such a
    // pause the first tick comes at once, the next a period later.
    let mut announce = tokio::time::interval(ANNOUNCE_RARE_EVERY);
    announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut heartbeat = tokio::time::interval(t.heartbeat);
    let gc_every = t
        .config
        .gc_every
        .unwrap_or(Duration::from_secs(86_400 * 365));
    let mut gc = tokio::time::interval_at(tokio::time::Instant::now() + gc_every, gc_every);
    tokio::pin!(shutdown);
    loop {
        let wake = t.next_timeout();
        tokio::select! {
            _ = gc.tick(), if t.config.gc_every.is_some() => t.collect_garbage(),
            _ = &mut shutdown => break,
            Some(ev) = events.recv() => t.on_net(ev).await,
            Some(ev) = rx.recv() => t.on_internal(ev).await,
            _ = announce.tick(), if t.announcing() => t.announce(false),
            _ = flush.tick() => {
                t.flush_if_dirty();
                t.watchdog();
            }
            _ = heartbeat.tick() => t.register(),
            _ = sleep_until(wake) => t.on_timeout(),
        }
    }
    info!("target stopping: flushing the store");
    if let Err(e) = t.chunks.flush().await {
        warn!("cannot flush the store: {e}");
    }
    Ok(())
}

/// Asks `peer` for a batch of chunks, stores those that verify and reports
/// each one's outcome on `tx`.
async fn fetch(
    net: NetHandle,
    chunks: Arc<Chunks>,
    tx: mpsc::Sender<Internal>,
    release: ReleaseId,
    peer: PeerId,
    indices: Vec<u32>,
    refs: Vec<ChunkRef>,
) {
    let bytes: u64 = refs.iter().map(|c| u64::from(c.len)).sum();
    chunks.download.acquire(bytes).await;
    let request = ChunkRequest::Get {
        release,
        indices: indices.clone(),
    };
    let every = |outcome: &dyn Fn() -> Outcome| indices.iter().map(|i| (*i, outcome())).collect();
    let outcomes: Vec<(u32, Outcome)> = match net.chunk(peer, request).await {
        Ok(ChunkResponse::Chunks(wires)) if wires.len() == indices.len() => {
            let mut outcomes: Vec<(u32, Outcome)> = Vec::with_capacity(indices.len());
            let mut received = Vec::new();
            for ((index, cref), wire) in indices.iter().zip(&refs).zip(wires) {
                match wire {
                    Some(w) => received.push((*index, *cref, w)),
                    None => outcomes.push((*index, Outcome::Refused)),
                }
            }
            let (got, batch): (Vec<u32>, Vec<_>) =
                received.into_iter().map(|(i, c, w)| (i, (c, w))).unzip();
            let results = chunks.receive_many(batch).await;
            outcomes.extend(got.into_iter().zip(results).map(|(i, r)| {
                (
                    i,
                    match r {
                        Ok(n) => Outcome::Stored(n),
                        Err(ReceiveError::Invalid(e)) => Outcome::Invalid(e),
                        Err(ReceiveError::Store(e)) => Outcome::StoreFailed(e),
                    },
                )
            }));
            outcomes
        }
        Ok(ChunkResponse::Refused) => every(&|| Outcome::Refused),
        Ok(ChunkResponse::Busy { retry_ms }) => {
            every(&|| Outcome::Busy(Duration::from_millis(retry_ms.into())))
        }
        Ok(other) => {
            let why = format!(
                "unexpected answer to a request for {} chunks: {}",
                indices.len(),
                describe(&other)
            );
            every(&|| Outcome::Invalid(why.clone()))
        }
        Err(e) => every(&|| Outcome::Failed(e.clone())),
    };
    let _ = tx
        .send(Internal::Fetched {
            release,
            peer,
            outcomes,
        })
        .await;
}

/// A chunk answer for a log line, without its bytes.
fn describe(response: &ChunkResponse) -> String {
    match response {
        ChunkResponse::Chunks(w) => format!("{} chunks", w.len()),
        other => format!("{other:?}"),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Checks an order against the coordinator's key and reads what the store
/// holds of it; with `record` (the data directory) records the order
/// first, unless its release is already the one its name resolves to.
/// Blocking: reads the store and syncs a file.
fn prepare(
    order: StageOrder,
    store: &dyn Store,
    chunks: &Chunks,
    coordinator_key: &PublicKey,
    record: Option<&Path>,
) -> Result<Prepared, String> {
    let manifest = Manifest::decode(&order.manifest).map_err(|e| e.to_string())?;
    let id = manifest.release_id();
    if !coordinator_key.verify(&signed_bytes(&id), &order.signature) {
        return Err(format!(
            "release {id}: the manifest is not signed by the coordinator this target trusts"
        ));
    }
    let already = store
        .resolve(manifest.app(), manifest.version())
        .map_err(|e| e.to_string())?;
    let list = chunks.add_release(&manifest);
    let hashes: Vec<_> = list.iter().map(|c| c.hash).collect();
    let held = store.contains_chunks(&hashes).map_err(|e| e.to_string())?;
    if let Some(dir) = record.filter(|_| already != Some(id)) {
        let bytes = protocol::encode::<_, MAX_CONTROL_FRAME>(&order).map_err(|e| e.to_string())?;
        crate::durable::write_atomically(&order_path(dir, &id), &bytes)
            .map_err(|e| format!("cannot record the order: {e}"))?;
    }
    Ok(Prepared {
        order,
        manifest: Arc::new(manifest),
        id,
        chunks: list,
        held,
        already,
        patch: None,
    })
}

/// A staging order as it came: its manifest whole, or as a delta against
/// a release this target holds.
enum Incoming {
    Whole(StageOrder),
    Delta(StageOrderDelta),
    /// With a patch from a release it holds.
    Patched(PatchedOrder),
}

/// Prepares an order that comes with a patch: the record is decoded and
/// its signature checked before anything else, then checked against its
/// base (which must be in the store) and the order's manifest before the
/// order is recorded; a patch this target refuses refuses the order (the
/// coordinator sends it without). Blocking.
fn prepare_patched(
    po: PatchedOrder,
    store: &dyn Store,
    chunks: &Chunks,
    coordinator_key: &PublicKey,
    record: &Path,
) -> Result<Prepared, String> {
    let patch = signed_patch(&po, coordinator_key)?;
    let order = if po.manifest_is_delta {
        let delta = StageOrderDelta {
            base: patch.base(),
            order: po.order,
        };
        whole_order(store, delta)?
    } else {
        po.order
    };
    let base = store
        .get_manifest(&patch.base())
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("release {}, the patch's base, is not here", patch.base()))?;
    let target = Manifest::decode(&order.manifest).map_err(|e| e.to_string())?;
    patch
        .check_against(&base, &target)
        .map_err(|e| format!("refusing patch {}: {e}", patch.id()))?;
    drop(target);
    let mut prepared = prepare(order, store, chunks, coordinator_key, Some(record))?;
    prepared.patch = plan_patch(
        store,
        patch,
        base,
        prepared.manifest.clone(),
        &prepared.chunks,
        &prepared.held,
    )?;
    Ok(prepared)
}

/// The whole order a [`StageOrderDelta`] stands for: its manifest rebuilt
/// against the base's in the store. The signature is checked after, by
/// [`prepare`], as for any order. Blocking.
fn whole_order(store: &dyn Store, d: StageOrderDelta) -> Result<StageOrder, String> {
    let base = store
        .get_manifest(&d.base)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "release {} is not here to rebuild the manifest from",
                d.base
            )
        })?;
    let manifest = convoy_chunker::apply_manifest_delta(&base, &d.order.manifest)
        .map_err(|e| format!("cannot rebuild the manifest from release {}: {e}", d.base))?;
    Ok(StageOrder {
        manifest: manifest.encode(),
        ..d.order
    })
}

/// Sends `response` on `reply`; with no reply (an order replayed after a
/// collection pass, answered when it was held) logs a failure instead.
fn answer(reply: Option<Reply<ControlResponse>>, response: ControlResponse) {
    match (reply, response) {
        (Some(reply), response) => reply.answer(response),
        (None, ControlResponse::Error(e)) => {
            warn!("an order that waited for garbage collection failed: {e}")
        }
        (None, _) => {}
    }
}

fn order_path(dir: &Path, release: &ReleaseId) -> PathBuf {
    dir.join("staging")
        .join(format!("{}.order", release.to_hex()))
}

/// The set of indices whose flag is set.
fn set_of(flags: &[bool]) -> HaveSet {
    HaveSet::from_indices(
        flags.len(),
        flags
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i as u32),
    )
}

fn label<'a>(labels: &'a Labels, key: &str) -> &'a str {
    labels.get(key).map(String::as_str).unwrap_or("")
}

impl Target {
    fn locality_of(&self, peer: &PeerId) -> Locality {
        if *peer == self.config.coordinator {
            return Locality::Origin;
        }
        match self.places.get(peer) {
            Some(p) => Locality::between((&self.place.dc, &self.place.zone), (&p.dc, &p.zone)),
            None => Locality::OtherDc,
        }
    }

    fn next_timeout(&self) -> Option<Instant> {
        self.stagings
            .values()
            .filter_map(|s| s.fetcher.as_ref()?.poll_timeout())
            .min()
    }

    fn on_timeout(&mut self) {
        let now = Instant::now();
        let due: Vec<ReleaseId> = self
            .stagings
            .iter()
            .filter(|(_, s)| {
                s.fetcher
                    .as_ref()
                    .and_then(|f| f.poll_timeout())
                    .is_some_and(|t| t <= now)
            })
            .map(|(r, _)| *r)
            .collect();
        for r in due {
            if let Some(f) = self.stagings.get_mut(&r).and_then(|s| s.fetcher.as_mut()) {
                f.handle_timeout(now);
            }
            self.drive(r);
        }
    }

    /// Picks up the orders a previous run left unfinished.
    fn resume_orders(&mut self) {
        let dir = self.config.data_dir.join("staging");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("order") {
                continue;
            }
            let order = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    protocol::decode::<StageOrder, MAX_CONTROL_FRAME>(&b).map_err(|e| e.to_string())
                });
            match order.and_then(|o| self.accept(o)) {
                Ok(id) => info!(release = %id, "resuming staging"),
                Err(e) => {
                    warn!(path = %path.display(), "dropping an unreadable order: {e}");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// Sends a report: registration at first, then heartbeats.
    fn register(&mut self) {
        if self.registering {
            return;
        }
        self.registering = true;
        let mut report = self.report();
        let (store, load, releases) = (
            self.chunks.store.clone(),
            self.config.load.clone(),
            self.config.releases.clone(),
        );
        let net = self.net.clone();
        let coordinator = self.config.coordinator;
        let tx = self.internal.clone();
        tokio::spawn(async move {
            // What the disk says is read off the loop.
            let from_disk = tokio::task::spawn_blocking(move || {
                let held = store
                    .releases()
                    .map(|rs| rs.into_iter().map(|r| r.id).collect())
                    .unwrap_or_default();
                (held, self::health::health(&load, &releases).active)
            })
            .await;
            if let Ok((held, active)) = from_disk {
                (report.releases, report.active) = (held, active);
            }
            let r = net
                .control(coordinator, ControlRequest::Report(report))
                .await;
            let _ = tx.send(Internal::Registered(r)).await;
        });
    }

    /// What the loop knows for a report; the releases held and active
    /// are filled in from the disk by [`Target::register`].
    fn report(&self) -> TargetReport {
        TargetReport {
            labels: self.config.labels.clone(),
            addrs: self.listen.iter().map(|a| a.to_string()).collect(),
            releases: Vec::new(),
            stagings: self
                .stagings
                .iter()
                .filter(|(_, s)| s.job.is_none())
                .map(|(r, s)| {
                    // A release's bytes include its patch's deltas.
                    let mut p = s.progress(*r);
                    if let Some(u) = s.unit.and_then(|u| self.stagings.get(&u)) {
                        p.bytes_received += u.bytes_received;
                        p.bytes_received_cross_dc += u.bytes_cross_dc;
                    }
                    p
                })
                .collect(),
            bytes_sent: self.chunks.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.chunks.bytes_received.load(Ordering::Relaxed),
            wire_bytes_sent: self.net.wire_bytes().sent,
            wire_bytes_received: self.net.wire_bytes().received,
            active: Default::default(),
            in_load: self.config.load.in_load(),
            health: self.config.health_addr.clone(),
        }
    }

    async fn on_net(&mut self, event: NetEvent) {
        match event {
            NetEvent::Listening(addr) => {
                if !self.listen.contains(&addr) {
                    self.listen.push(addr);
                }
            }
            NetEvent::Admitted(peer) if peer != self.config.coordinator => {
                // A swarm peer back after a disconnection: exchange have-sets again.
                if self.places.contains_key(&peer) {
                    let running: Vec<ReleaseId> = self
                        .stagings
                        .iter()
                        .filter(|(_, s)| {
                            s.order.mode == DistributionMode::Swarm && !s.peers.contains_key(&peer)
                        })
                        .map(|(r, _)| *r)
                        .collect();
                    for r in running {
                        self.send_bitfield(r, peer);
                    }
                }
            }
            NetEvent::Admitted(peer) => {
                // The coordinator back after a restart: it serves again.
                let now = Instant::now();
                let ids: Vec<ReleaseId> = self.stagings.keys().copied().collect();
                for r in ids {
                    let s = self.stagings.get_mut(&r).expect("listed");
                    if let Some(f) = s.fetcher.as_mut() {
                        s.peers.insert(peer, Locality::Origin);
                        f.add_peer(now, peer, Locality::Origin, HaveSet::full(s.have.len()));
                    }
                    self.drive(r);
                }
            }
            NetEvent::Disconnected(peer) => {
                let now = Instant::now();
                let ids: Vec<ReleaseId> = self.stagings.keys().copied().collect();
                for r in ids {
                    let s = self.stagings.get_mut(&r).expect("listed");
                    if peer != self.config.coordinator {
                        s.peers.remove(&peer);
                    }
                    if let Some(f) = s.fetcher.as_mut() {
                        f.remove_peer(now, peer);
                    }
                    self.drive(r);
                }
                if peer == self.config.coordinator {
                    self.registered = false;
                }
            }
            NetEvent::Chunk {
                peer,
                request,
                reply,
            } => match request {
                ChunkRequest::Get { release, indices } => {
                    match self.chunks.admit(peer, &release, &indices, Wait::Backlog) {
                        Ok(wanted) => {
                            tokio::spawn(self.chunks.clone().serve(wanted, reply, None));
                        }
                        Err(answer) => reply.send(answer).await,
                    }
                }
                ChunkRequest::Put {
                    release,
                    index,
                    chunk,
                } => {
                    if peer != self.config.coordinator {
                        reply.send(ChunkResponse::Denied).await;
                        return;
                    }
                    let Some(s) = self.stagings.get(&release) else {
                        reply
                            .send(ChunkResponse::Rejected("no such staging".into()))
                            .await;
                        return;
                    };
                    let Some(cref) = s.chunks.get(index as usize).copied() else {
                        reply
                            .send(ChunkResponse::Rejected("chunk index out of range".into()))
                            .await;
                        return;
                    };
                    let chunks = self.chunks.clone();
                    let tx = self.internal.clone();
                    tokio::spawn(async move {
                        chunks.download.acquire(chunk.bytes.len() as u64).await;
                        match chunks.receive(cref, chunk).await {
                            Ok(bytes) => {
                                reply.send(ChunkResponse::Stored).await;
                                let _ = tx
                                    .send(Internal::Pushed {
                                        release,
                                        index,
                                        bytes,
                                    })
                                    .await;
                            }
                            Err(e) => {
                                reply.send(ChunkResponse::Rejected(e.to_string())).await;
                                if let ReceiveError::Store(error) = e {
                                    let _ = tx.send(Internal::StoreFailed { release, error }).await;
                                }
                            }
                        }
                    });
                }
                ChunkRequest::Upload { .. } => reply.send(ChunkResponse::Denied).await,
            },
            NetEvent::Control {
                peer,
                request,
                reply,
            } => self.on_control(peer, request, Some(reply)),
            NetEvent::Have { peer, announcement } => self.on_have(peer, announcement),
        }
    }

    fn on_have(&mut self, peer: PeerId, Announcement { release, chunks }: Announcement) {
        let now = Instant::now();
        let locality = self.locality_of(&peer);
        if let Some(s) = self.stagings.get_mut(&release) {
            // A peer may announce before its have-set arrives.
            if s.order.mode == DistributionMode::Swarm && s.fetcher.is_some() {
                s.meet(now, peer, locality);
            }
            if let Some(f) = s.fetcher.as_mut() {
                f.handle_haves(now, peer, chunks);
            }
        }
        self.drive(release);
    }

    /// Starts a collection pass unless one runs: it keeps the newest
    /// `--retain` releases of each app, those delivered here (trees kept)
    /// or being delivered, and the chunks of releases being staged.
    fn collect_garbage(&mut self) {
        let Some(unused) = self.collector.start() else {
            return;
        };
        // A staging that ended named its release, which retention keeps
        // or not; one that runs has only its chunks so far.
        let running = || {
            self.stagings
                .iter()
                .filter(|(_, s)| s.state == StageState::Running)
        };
        let mut pinned: HashSet<ReleaseId> = running().map(|(id, _)| *id).collect();
        pinned.extend(self.delivering.lock().expect("not poisoned").iter());
        // A patch unit's base is read when its files are rebuilt.
        pinned.extend(running().filter_map(|(_, s)| Some(s.job.as_ref()?.base.release_id())));
        // A release's chunks; a patch unit's deltas.
        let lists: Vec<ChunkList> = running().map(|(_, s)| s.chunks.clone()).collect();
        let (store, releases) = (self.chunks.store.clone(), self.config.releases.clone());
        let store_after = store.clone();
        let (lock, tx) = (self.delivery_lock.clone(), self.internal.clone());
        tokio::spawn(async move {
            // No delivery reads or removes a tree meanwhile.
            let _deliveries_wait = lock.lock().await;
            let pass = tokio::task::spawn_blocking(move || -> Result<_, String> {
                let mut retention = Retention {
                    newest: releases.retained(),
                    pinned,
                    pinned_chunks: lists
                        .iter()
                        .flat_map(|l| l.iter().map(|c| c.hash))
                        .collect(),
                };
                for app in releases.apps().map_err(|e| e.to_string())? {
                    for version in releases.versions(&app).map_err(|e| e.to_string())? {
                        if let Some(id) =
                            store.resolve(&app, &version).map_err(|e| e.to_string())?
                        {
                            retention.pinned.insert(id);
                        }
                    }
                }
                collect(&*store, &retention, Some(&unused)).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("the collection pass failed: {e}")));
            let removed = pass.as_ref().is_ok_and(|(r, _)| r.chunks_removed > 0);
            // Deliveries and orders go on while the space is given back:
            // compaction runs beside them.
            drop(_deliveries_wait);
            let _ = tx.send(Internal::Collected(pass)).await;
            if removed {
                compact_in_background(store_after).await;
            }
        });
    }

    /// Answers a control request on `reply` (`None`: an order replayed
    /// after a collection pass, already answered; a failure is logged).
    /// What needs the disk is done off the loop and answered from there.
    fn on_control(
        &mut self,
        peer: PeerId,
        request: ControlRequest,
        reply: Option<Reply<ControlResponse>>,
    ) {
        let from_coordinator = peer == self.config.coordinator;
        if from_coordinator
            && matches!(
                request,
                ControlRequest::StageFrom(_) | ControlRequest::StagePatched(_)
            )
            && self.collector.running()
        {
            // Held, it would be carried out after the pass, which may drop
            // its base: refused, the coordinator sends the whole order.
            let why = "collecting garbage; send the whole order";
            return answer(reply, ControlResponse::Error(why.into()));
        }
        let order = matches!(
            request,
            ControlRequest::Stage(_) | ControlRequest::Deliver { .. }
        );
        if from_coordinator && order && self.collector.running() {
            if self.collector.full() {
                let why = "collecting garbage, with too many orders waiting; try again";
                return answer(reply, ControlResponse::Error(why.into()));
            }
            // Answered now, carried out when the pass ends; its outcome is
            // reported as for any order.
            self.collector.hold((peer, request));
            return answer(reply, ControlResponse::Ok);
        }
        match request {
            ControlRequest::Stage(order) if from_coordinator => {
                self.accept_off_loop(Incoming::Whole(order), reply)
            }
            ControlRequest::StageFrom(order) if from_coordinator => {
                self.accept_off_loop(Incoming::Delta(order), reply)
            }
            ControlRequest::StagePatched(order) if from_coordinator => {
                self.accept_off_loop(Incoming::Patched(order), reply)
            }
            ControlRequest::Deliver {
                release,
                drain_ms,
                settle_ms,
            } if from_coordinator => {
                self.deliver(release, LoadWindow::new(drain_ms, settle_ms), reply)
            }
            ControlRequest::Rollback {
                app,
                drain_ms,
                settle_ms,
            } if from_coordinator => {
                self.rollback(app, LoadWindow::new(drain_ms, settle_ms), reply)
            }
            ControlRequest::SetLoad { in_load, wait_ms } if from_coordinator => {
                let load = self.config.load.clone();
                tokio::spawn(async move {
                    let changes = in_load != load.in_load();
                    let set = tokio::task::spawn_blocking(move || load.set(in_load)).await;
                    answer(
                        reply,
                        match set {
                            Ok(Ok(())) => {
                                info!(in_load, "load changed");
                                if changes && wait_ms > 0 {
                                    // Answered once the load balancer has
                                    // seen it: what changes next (the other
                                    // slice's drain, a delivery) waits.
                                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                                }
                                ControlResponse::Ok
                            }
                            Ok(Err(e)) => {
                                ControlResponse::Error(format!("cannot record the load state: {e}"))
                            }
                            Err(e) => ControlResponse::Error(format!("cannot set the load: {e}")),
                        },
                    )
                });
            }
            request => {
                let response = self.answer_now(peer, request);
                answer(reply, response);
            }
        }
    }

    /// Answers what needs nothing from the disk.
    fn answer_now(&mut self, peer: PeerId, request: ControlRequest) -> ControlResponse {
        let from_coordinator = peer == self.config.coordinator;
        match request {
            ControlRequest::Peers {
                release,
                peers,
                rank,
                dc_size,
            } if from_coordinator => {
                self.on_peers(release, peers, rank, dc_size);
                ControlResponse::Ok
            }
            ControlRequest::Stage(_)
            | ControlRequest::StageFrom(_)
            | ControlRequest::StagePatched(_)
            | ControlRequest::Peers { .. }
            | ControlRequest::Deliver { .. }
            | ControlRequest::Rollback { .. }
            | ControlRequest::SetLoad { .. } => {
                warn!(%peer, "refusing an order from a peer that is not the coordinator");
                ControlResponse::Denied
            }
            ControlRequest::Bitfield {
                release,
                len,
                bits,
                place,
            } => {
                self.on_bitfield(peer, release, len, &bits, place);
                ControlResponse::Ok
            }
            _ => ControlResponse::Error("a target does not answer that request".into()),
        }
    }

    /// Starts delivering a staged release, unless it is being delivered;
    /// answers once its manifest is read (off the loop).
    fn deliver(
        &mut self,
        release: ReleaseId,
        window: LoadWindow,
        reply: Option<Reply<ControlResponse>>,
    ) {
        let answer = move |response| answer(reply, response);
        if self
            .stagings
            .get(&release)
            .is_some_and(|s| s.state != StageState::Staged)
        {
            return answer(ControlResponse::Error(format!(
                "{release} is still being staged here"
            )));
        }
        if !self
            .delivering
            .lock()
            .expect("not poisoned")
            .insert(release)
        {
            return answer(ControlResponse::Ok);
        }
        let (store, releases, load) = (
            self.chunks.store.clone(),
            self.config.releases.clone(),
            self.config.load.clone(),
        );
        let lock = self.delivery_lock.clone();
        let delivering = self.delivering.clone();
        let net = self.net.clone();
        let coordinator = self.config.coordinator;
        tokio::spawn(async move {
            let read = store.clone();
            let manifest = tokio::task::spawn_blocking(move || read.get_manifest(&release)).await;
            let manifest = manifest
                .map_err(|e| e.to_string())
                .and_then(|read| read.map_err(|e| e.to_string()))
                .and_then(|m| m.ok_or_else(|| format!("{release} is not staged here")));
            let manifest = match manifest {
                Ok(m) => m,
                Err(e) => {
                    delivering.lock().expect("not poisoned").remove(&release);
                    return answer(ControlResponse::Error(e));
                }
            };
            answer(ControlResponse::Ok);
            let task = DeliveryTask {
                manifest,
                window,
                releases,
                load,
                store,
                lock,
            };
            let report = task.run().await;
            delivering.lock().expect("not poisoned").remove(&release);
            report_delivery(&net, coordinator, report).await;
        });
    }

    /// Makes an app's previous release active again, off the loop: out
    /// of load around it when `window` says so, since its `after_activate`
    /// restarts the app.
    fn rollback(&mut self, app: String, window: LoadWindow, reply: Option<Reply<ControlResponse>>) {
        let Ok(guard) = self.delivery_lock.clone().try_lock_owned() else {
            let busy = ControlResponse::Error("a delivery is running; try again".into());
            return answer(reply, busy);
        };
        let (releases, load) = (self.config.releases.clone(), self.config.load.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let rolled = window.around(&load, releases.rollback(&app)).await;
            let response = match rolled {
                Ok(version) => {
                    info!(app, version, "rolled back");
                    ControlResponse::Ok
                }
                Err(e) => ControlResponse::Error(e.to_string()),
            };
            answer(reply, response);
        });
    }

    /// Prepares an order off the loop (signature, manifest, what the store
    /// holds, the order recorded) and installs it when that is done.
    fn accept_off_loop(&mut self, order: Incoming, reply: Option<Reply<ControlResponse>>) {
        self.collector.reading();
        let (store, chunks) = (self.chunks.store.clone(), self.chunks.clone());
        let key = self.coordinator_key.clone();
        let record = self.config.data_dir.clone();
        let tx = self.internal.clone();
        tokio::spawn(async move {
            let prepared = tokio::task::spawn_blocking(move || {
                let order = match order {
                    Incoming::Whole(order) => order,
                    Incoming::Delta(d) => whole_order(&*store, d)?,
                    Incoming::Patched(po) => {
                        return prepare_patched(po, &*store, &chunks, &key, &record)
                    }
                };
                prepare(order, &*store, &chunks, &key, Some(&record))
            })
            .await
            .unwrap_or_else(|e| Err(format!("cannot prepare the order: {e}")));
            let _ = tx
                .send(Internal::Prepared(prepared.map(Box::new), reply))
                .await;
        });
    }

    /// Checks an order and starts or resumes it, on the loop: for orders
    /// read back at start, before the loop runs.
    fn accept(&mut self, order: StageOrder) -> Result<ReleaseId, String> {
        let store = self.chunks.store.clone();
        let prepared = prepare(order, &*store, &self.chunks, &self.coordinator_key, None)?;
        self.install(prepared)
    }

    /// Starts or resumes a prepared order, and its patch's unit.
    fn install(&mut self, prepared: Prepared) -> Result<ReleaseId, String> {
        let Prepared {
            order,
            manifest,
            id,
            chunks,
            held,
            already,
            patch,
        } = prepared;
        if self.stagings.contains_key(&id) {
            return Ok(id);
        }
        if self.stagings.len() >= MAX_STAGINGS {
            self.stagings.retain(|_, s| s.state == StageState::Running);
            if self.stagings.len() >= MAX_STAGINGS {
                // Not started: not resumed at the next start either.
                let _ = std::fs::remove_file(order_path(&self.config.data_dir, &id));
                return Err(format!("already staging {MAX_STAGINGS} releases"));
            }
        }
        let have = set_of(&held);
        let staged = already == Some(id);
        let patch = patch.filter(|_| !staged);
        let deferred = HaveSet::from_indices(
            chunks.len(),
            patch.iter().flat_map(|p| p.rebuilt.iter().copied()),
        );
        let origin_in_my_dc = label(&order.origin_labels, "dc") == self.place.dc;
        let fetcher = self.fetcher(order.mode, origin_in_my_dc, &have, &deferred);
        info!(release = %id, name = %format!("{}@{}", manifest.app(), manifest.version()),
              mode = order.mode.name(), held = have.count(), total = have.len(),
              rebuilt_from_deltas = deferred.count(), "staging");
        let mut staging = Staging::new(
            order,
            manifest,
            chunks,
            have,
            deferred,
            self.config.coordinator,
            origin_in_my_dc,
        );
        staging.fetcher = fetcher;
        if staged {
            staging.state = StageState::Staged;
            staging.finished = Some((Duration::ZERO, SystemTime::now()));
        }
        if let Some(p) = patch {
            staging.unit = Some(p.unit);
            self.install_patch(&staging.order, p);
        }
        self.stagings.insert(id, staging);
        self.send_bitfield(id, self.config.coordinator);
        if staged {
            self.register();
        } else {
            self.drive(id);
            self.check_complete(id);
        }
        Ok(id)
    }

    /// A fetcher for a staging in `mode` (none in push mode: the origin
    /// sends), holding `have`, not asking for `deferred`.
    fn fetcher(
        &self,
        mode: DistributionMode,
        origin_in_my_dc: bool,
        have: &HaveSet,
        deferred: &HaveSet,
    ) -> Option<Fetcher<PeerId>> {
        if mode == DistributionMode::Push {
            return None;
        }
        let mut config = FetchConfig {
            mode: if mode == DistributionMode::Pull {
                Mode::Pull
            } else {
                Mode::Swarm
            },
            origin_in_my_dc,
            seed: seed_of(&self.net.peer_id()),
            ..FetchConfig::default()
        };
        config.request_timeout = Duration::from_secs(30);
        if mode == DistributionMode::Pull {
            // One source: its requests must cover the whole
            // bandwidth-delay product of the link on their own.
            config.window = PULL_WINDOW;
        }
        let mut f = Fetcher::deferring(have.clone(), deferred.clone(), config);
        f.add_peer(
            Instant::now(),
            self.config.coordinator,
            Locality::Origin,
            HaveSet::full(have.len()),
        );
        Some(f)
    }

    /// Starts fetching a patch's delta chunks, as a unit of their own: from
    /// the swarm in swarm mode, else from the origin (in push mode too:
    /// the origin pushes the release's chunks, the target pulls its deltas).
    fn install_patch(&mut self, release_order: &StageOrder, p: PlannedPatch) {
        let unit = p.unit;
        self.chunks.add_unit(unit, p.chunks.clone());
        let mode = match release_order.mode {
            DistributionMode::Swarm => DistributionMode::Swarm,
            _ => DistributionMode::Pull,
        };
        let order = StageOrder {
            mode,
            ..release_order.clone()
        };
        let have = set_of(&p.held);
        let unwanted = set_of(&p.unwanted);
        let origin_in_my_dc = label(&order.origin_labels, "dc") == self.place.dc;
        let fetcher = self.fetcher(mode, origin_in_my_dc, &have, &unwanted);
        info!(release = %p.job.release, patch = %unit, files = p.job.files.len(),
              wire_bytes = p.wire_bytes, wire_bytes_without_deltas = p.wire_bytes_without,
              "rebuilding files from deltas");
        let mut staging = Staging::new(
            order,
            p.job.target.clone(),
            p.chunks,
            have,
            unwanted,
            self.config.coordinator,
            origin_in_my_dc,
        );
        staging.fetcher = fetcher;
        staging.job = Some(p.job);
        self.stagings.insert(unit, staging);
        self.send_bitfield(unit, self.config.coordinator);
        self.drive(unit);
        self.check_complete(unit);
    }

    fn on_peers(
        &mut self,
        release: ReleaseId,
        peers: Vec<protocol::PeerInfo>,
        rank: u32,
        size: u32,
    ) {
        let me = self.net.peer_id();
        let mut new = Vec::new();
        for p in peers {
            let Ok(id) = PeerId::from_bytes(&p.peer_id) else {
                continue;
            };
            if id == me || id == self.config.coordinator {
                continue;
            }
            let addrs: Vec<Multiaddr> = p.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            self.net.learn_addresses(id, addrs);
            if self.places.len() >= MAX_KNOWN_PEERS && !self.places.contains_key(&id) {
                continue;
            }
            self.places.insert(id, Place::of(&p.labels));
            new.push(id);
        }
        let now = Instant::now();
        let localities: Vec<(PeerId, Locality)> =
            new.iter().map(|p| (*p, self.locality_of(p))).collect();
        // The release's patch unit swarms among the same peers: those
        // fetching it answer with their have-sets, the others ignore it.
        let unit = self.stagings.get(&release).and_then(|s| s.unit);
        for staging in std::iter::once(release).chain(unit) {
            let Some(s) = self.stagings.get_mut(&staging) else {
                continue;
            };
            let Some(f) = s.fetcher.as_mut() else {
                continue;
            };
            if size > 0 && rank < size {
                f.set_import_rank(now, rank, size);
            }
            if s.order.mode != DistributionMode::Swarm {
                continue;
            }
            let fresh: Vec<PeerId> = localities
                .iter()
                .filter(|(p, loc)| s.meet(now, *p, *loc))
                .map(|(p, _)| *p)
                .collect();
            for p in fresh {
                self.send_bitfield(staging, p);
            }
            self.drive(staging);
        }
    }

    fn on_bitfield(
        &mut self,
        peer: PeerId,
        release: ReleaseId,
        len: u32,
        bits: &[u8],
        place: Place,
    ) {
        // A peer no peer list named (lists are not symmetric) is placed
        // where it says it is; the coordinator's word, when it comes, wins.
        if !place.within_limits() {
            warn!(%peer, "ignoring a have-set whose place is longer than labels may be");
            return;
        }
        if self.places.len() < MAX_KNOWN_PEERS && peer != self.config.coordinator {
            self.places.entry(peer).or_insert(place);
        }
        let locality = self.locality_of(&peer);
        let Some(s) = self.stagings.get_mut(&release) else {
            return;
        };
        if len as usize != s.have.len() || bits.len() != (len as usize).div_ceil(8) {
            warn!(%peer, "ignoring a have-set of the wrong length");
            return;
        }
        if peer == self.config.coordinator {
            return;
        }
        // Whatever the mode this target staged in, it serves what it holds
        // to the swarm of a later staging of the same release.
        let have = HaveSet::from_indices(
            len as usize,
            (0..len).filter(|i| bits[(*i / 8) as usize] & (1 << (i % 8)) != 0),
        );
        let now = Instant::now();
        let new = s.meet(now, peer, locality);
        if let Some(f) = s
            .fetcher
            .as_mut()
            .filter(|_| s.order.mode == DistributionMode::Swarm)
        {
            // Merged: announcements may have overtaken this have-set.
            f.handle_haves(now, peer, have.iter());
        }
        if new {
            self.send_bitfield(release, peer);
        }
        self.drive(release);
    }

    fn send_bitfield(&self, release: ReleaseId, to: PeerId) {
        let Some(s) = self.stagings.get(&release) else {
            return;
        };
        let len = s.have.len();
        let mut bits = vec![0u8; len.div_ceil(8)];
        // The coordinator is told deferred chunks are held: it neither
        // pushes nor hands them out. Peers are told only what is.
        let deferred = (to == self.config.coordinator).then_some(&s.deferred);
        for i in s
            .have
            .iter()
            .chain(deferred.into_iter().flat_map(HaveSet::iter))
        {
            bits[(i / 8) as usize] |= 1 << (i % 8);
        }
        let net = self.net.clone();
        let place = self.place.clone();
        tokio::spawn(async move {
            let req = ControlRequest::Bitfield {
                release,
                len: len as u32,
                bits,
                place,
            };
            if let Err(e) = net.control(to, req).await {
                debug!(peer = %to, "have-set not delivered: {e}");
            }
        });
    }

    /// Whether announcements may be due: a staging is running (its chunks
    /// are announced on the tick's cadence) or has chunks still to announce.
    fn announcing(&self) -> bool {
        self.stagings
            .values()
            .any(|s| s.state == StageState::Running || !s.announcer.is_idle())
    }

    /// Sends the chunks held since the last announcement to every peer:
    /// at once when `now`, soon when one of them is rare, else on the
    /// slower cadence.
    fn announce(&mut self, now: bool) {
        let at = Instant::now();
        for (release, s) in self.stagings.iter_mut() {
            let Some(chunks) = s.announcer.due(at, now) else {
                continue;
            };
            for chunks in chunks.chunks(protocol::MAX_HAVE_BATCH) {
                for peer in s.peers.keys() {
                    let announcement = Announcement {
                        release: *release,
                        chunks: chunks.to_vec(),
                    };
                    self.net.announce(*peer, announcement);
                }
            }
        }
    }

    /// Carries out what a staging's fetcher decided.
    fn drive(&mut self, release: ReleaseId) {
        let Some(s) = self.stagings.get_mut(&release) else {
            return;
        };
        let Some(f) = s.fetcher.as_mut() else {
            return;
        };
        let mut complete = false;
        let mut gave_up = None;
        let is_unit = s.job.is_some();
        // This round's requests, per peer: sent a few chunks to a request.
        let mut batches: BTreeMap<PeerId, Vec<u32>> = BTreeMap::new();
        while let Some(action) = f.poll_action() {
            match action {
                FetchAction::Request { peer, chunk } => {
                    batches.entry(peer).or_default().push(chunk);
                }
                // A request in flight cannot be withdrawn; its answer is ignored.
                FetchAction::Cancel { .. } => {}
                FetchAction::Announce { chunk } => {
                    if s.order.mode == DistributionMode::Swarm {
                        s.announcer.held(chunk, f.holders(chunk));
                    }
                }
                FetchAction::Ban { peer } => {
                    warn!(%peer, release = %release, "peer sent a corrupt chunk: banning it");
                    s.peers.remove(&peer);
                    let net = self.net.clone();
                    tokio::spawn(async move { net.ban(peer).await });
                }
                FetchAction::GaveUp { chunk } if s.job.is_some() => {
                    warn!(patch = %release, chunk, "a delta chunk failed too often: giving the patch up");
                    gave_up = Some(format!("delta chunk {chunk} failed too often"));
                }
                FetchAction::GaveUp { chunk } => {
                    warn!(release = %release, chunk, "chunk failed too often; waiting for new peers");
                }
                FetchAction::ImportAll => {
                    info!(release = %release, "no chunk to ask for in {} s: importing from any data centre", STARVED_PATIENCE.as_secs());
                }
                FetchAction::Complete => complete = true,
            }
        }
        for (peer, wanted) in batches {
            for indices in wanted.chunks(protocol::MAX_GET_BATCH) {
                let refs = indices.iter().map(|i| s.chunks[*i as usize]).collect();
                tokio::spawn(fetch(
                    self.net.clone(),
                    self.chunks.clone(),
                    self.internal.clone(),
                    release,
                    peer,
                    indices.to_vec(),
                    refs,
                ));
            }
        }
        if let Some(why) = gave_up {
            self.end_patch(release, Err(why));
        } else if complete || is_unit {
            self.check_complete(release);
        }
    }

    async fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::Fetched {
                release,
                peer,
                outcomes,
            } => {
                let now = Instant::now();
                let Some(s) = self.stagings.get_mut(&release) else {
                    return;
                };
                let Some(f) = s.fetcher.as_mut() else {
                    return;
                };
                let mut store_failed = None;
                for (index, outcome) in outcomes {
                    match outcome {
                        Outcome::Stored(bytes) => {
                            self.sync.stored();
                            // Every byte that arrived counts, endgame duplicates too.
                            s.have.insert(index);
                            s.bytes_received += bytes;
                            let cross = match s.peers.get(&peer) {
                                Some(Locality::OtherDc) => true,
                                Some(Locality::Origin) => !s.origin_in_my_dc,
                                _ => false,
                            };
                            if cross {
                                s.bytes_cross_dc += bytes;
                            }
                            f.handle_chunk(now, peer, index, true);
                        }
                        Outcome::Invalid(why) => {
                            warn!(%peer, index, "invalid chunk: {why}");
                            f.handle_chunk(now, peer, index, false);
                        }
                        Outcome::Refused => f.handle_refused(now, peer, index),
                        Outcome::Busy(wait) => f.handle_busy(now, peer, index, wait),
                        Outcome::StoreFailed(e) => {
                            store_failed = Some(e);
                            break;
                        }
                        Outcome::Failed(e) => {
                            // Asked elsewhere after a back-off. A peer is dropped
                            // only when its connection goes (NetEvent::Disconnected),
                            // so a failure under load loses no knowledge of it.
                            debug!(%peer, index, "request failed: {e}");
                            f.handle_refused(now, peer, index);
                        }
                    }
                }
                if let Some(e) = store_failed {
                    self.store_failed(release, &e);
                    return;
                }
                self.drive(release);
            }
            Internal::StoreFailed { release, error } => self.store_failed(release, &error),
            Internal::Pushed {
                release,
                index,
                bytes,
            } => {
                self.sync.stored();
                if let Some(s) = self.stagings.get_mut(&release) {
                    s.have.insert(index);
                    s.bytes_received += bytes;
                    if !s.origin_in_my_dc {
                        s.bytes_cross_dc += bytes;
                    }
                    // In swarm mode, a chunk the origin handed out.
                    if let Some(f) = s.fetcher.as_mut() {
                        f.handle_gift(Instant::now(), index);
                    }
                }
                self.drive(release);
                self.check_complete(release);
            }
            Internal::Staged { release, result } => {
                if let Some(s) = self.stagings.get_mut(&release) {
                    s.finish();
                    match result {
                        Ok(()) => {
                            info!(release = %release, seconds = s.started.elapsed().as_secs_f64(), "staged");
                            s.state = StageState::Staged;
                            let _ =
                                std::fs::remove_file(order_path(&self.config.data_dir, &release));
                        }
                        Err(e) => {
                            warn!(release = %release, "staging failed: {e}");
                            s.state = StageState::Failed(e);
                        }
                    }
                }
                self.announce(true);
                self.register();
            }
            Internal::Collected(pass) => {
                for (peer, request) in self.collector.finish(pass) {
                    self.on_control(peer, request, None);
                }
            }
            Internal::Flushed(result) => self.sync.finished(result),
            Internal::Rebuilt { unit, rebuilt } => self.end_patch(unit, Ok(rebuilt)),
            Internal::Prepared(prepared, reply) => {
                self.collector.read();
                let response = match prepared.and_then(|p| self.install(*p)) {
                    Ok(_) => ControlResponse::Ok,
                    Err(e) => ControlResponse::Error(e),
                };
                answer(reply, response);
            }
            Internal::Registered(result) => {
                self.registering = false;
                match result {
                    Ok(ControlResponse::Registered { heartbeat_ms }) => {
                        if !self.registered {
                            info!(coordinator = %self.config.coordinator, "registered");
                        }
                        self.registered = true;
                        self.heartbeat = Duration::from_millis(heartbeat_ms.clamp(100, 60_000));
                    }
                    Ok(other) => warn!("coordinator refused registration: {other:?}"),
                    Err(e) => {
                        if self.registered {
                            warn!("lost the coordinator: {e}");
                        } else {
                            debug!("coordinator not reachable yet: {e}");
                        }
                        self.registered = false;
                    }
                }
            }
        }
    }

    /// Fails staging `release`, whose chunk the store refused: it takes no
    /// more writes (a full disk, a failed sync), so asking for more would
    /// only move bytes it drops. A patch unit is given up instead.
    fn store_failed(&mut self, release: ReleaseId, e: &str) {
        let Some(s) = self
            .stagings
            .get_mut(&release)
            .filter(|s| s.state == StageState::Running)
        else {
            return;
        };
        warn!(release = %release, "cannot store a chunk: {e}; the staging fails");
        if s.job.is_some() {
            self.end_patch(release, Err(format!("store: {e}")));
            return;
        }
        s.finish();
        s.state = StageState::Failed(format!("store: {e}"));
        s.fetcher = None;
        self.register();
    }

    /// Ends patch unit `unit`: its release gets the chunks of the files it
    /// rebuilt (`Err`: it was given up, and why), and asks for every chunk
    /// still deferred, as if there had been no patch.
    fn end_patch(&mut self, unit: ReleaseId, rebuilt: Result<Rebuilt, String>) {
        let Some(u) = self.stagings.get_mut(&unit) else {
            return;
        };
        let Some(job) = u.job.clone() else {
            return;
        };
        if u.state != StageState::Running {
            return;
        }
        u.finish();
        u.state = match &rebuilt {
            Ok(r) if r.failed.is_empty() => StageState::Staged,
            Ok(r) => StageState::Failed(format!("{} files not rebuilt", r.failed.len())),
            Err(why) => StageState::Failed(format!("given up: {why}")),
        };
        // It asks for nothing more; the deltas it holds are still served.
        u.fetcher = None;
        let release = job.release;
        let Some(s) = self
            .stagings
            .get_mut(&release)
            .filter(|s| s.unit == Some(unit) && s.state == StageState::Running)
        else {
            return;
        };
        let now = Instant::now();
        let rebuilt = rebuilt.unwrap_or_default();
        for (path, why) in &rebuilt.failed {
            warn!(release = %release, path, "cannot rebuild a file from its delta, fetching its chunks: {why}");
        }
        info!(release = %release, files = rebuilt.files.len(), bytes = rebuilt.bytes,
              failed = rebuilt.failed.len(), "rebuilt files from deltas");
        let index: HashMap<ChunkHash, u32> = s
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (c.hash, i as u32))
            .collect();
        let files: HashMap<&str, &[ChunkRef]> = s.manifest.files().collect();
        let given: Vec<u32> = rebuilt
            .files
            .iter()
            .filter_map(|p| files.get(p.as_str()))
            .flat_map(|chunks| chunks.iter())
            .filter_map(|c| index.get(&c.hash).copied())
            .filter(|i| s.deferred.contains(*i))
            .collect();
        for &i in &given {
            if s.have.insert(i) {
                if let Some(f) = s.fetcher.as_mut() {
                    f.handle_gift(now, i);
                }
            }
        }
        let rest: Vec<u32> = s.deferred.iter().filter(|i| !s.have.contains(*i)).collect();
        s.deferred = HaveSet::empty(s.have.len());
        if let Some(f) = s.fetcher.as_mut() {
            f.undefer(now, rest.iter().copied());
        }
        if !given.is_empty() {
            self.sync.stored();
        }
        if !rest.is_empty() {
            // The coordinator was told they were held.
            self.send_bitfield(release, self.config.coordinator);
        }
        self.drive(release);
        self.check_complete(release);
    }

    /// Once every chunk is held: make them durable, then name the release.
    fn check_complete(&mut self, release: ReleaseId) {
        let Some(s) = self.stagings.get_mut(&release) else {
            return;
        };
        if !s.has_all() || s.finishing || s.state != StageState::Running {
            return;
        }
        s.finishing = true;
        let store = self.chunks.store.clone();
        if let Some(job) = s.job.clone() {
            // A patch unit: rebuild its files off the loop.
            let tx = self.internal.clone();
            tokio::spawn(async move {
                let rebuilt = tokio::task::spawn_blocking(move || {
                    rebuild_in_store(&*store, &job.base, &job.target, &job.files)
                })
                .await
                .unwrap_or_else(|e| Rebuilt {
                    failed: vec![("(all)".into(), e.to_string())],
                    ..Rebuilt::default()
                });
                let _ = tx
                    .send(Internal::Rebuilt {
                        unit: release,
                        rebuilt,
                    })
                    .await;
            });
            return;
        }
        let manifest = s.manifest.clone();
        let tx = self.internal.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                store.flush().map_err(|e| e.to_string())?;
                store.put_release(&manifest).map_err(|e| e.to_string())?;
                Ok(())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let _ = tx.send(Internal::Staged { release, result }).await;
        });
    }

    /// A patch that made no progress for [`PATCH_STALL_TICKS`] seconds is
    /// given up. (A staging its data centre's importer does not reach
    /// imports for itself: the fetcher's own rule,
    /// [`crate::transfer::STARVED_PATIENCE`], which the simulator runs too.)
    fn watchdog(&mut self) {
        let mut given_up = Vec::new();
        for (r, s) in self.stagings.iter_mut() {
            let held = s.have.count();
            if s.fetcher.is_none() {
                continue;
            }
            if s.state != StageState::Running || s.finishing || held != s.watch.0 {
                s.watch = (held, 0);
                continue;
            }
            s.watch.1 += 1;
            if s.job.is_some() && s.watch.1 == PATCH_STALL_TICKS {
                info!(patch = %r, held, "no delta chunk for {PATCH_STALL_TICKS} s: giving the patch up");
                given_up.push(*r);
            }
        }
        for unit in given_up {
            self.end_patch(
                unit,
                Err(format!("no delta chunk for {PATCH_STALL_TICKS} s")),
            );
        }
    }

    /// Syncs what was stored, from a task.
    fn flush_if_dirty(&mut self) {
        self.sync
            .start(&self.chunks, &self.internal, Internal::Flushed);
    }
}

/// How a target leaves load around a change of its release and comes
/// back: what the coordinator's order says, from the environment's load
/// balancer settings.
#[derive(Clone, Copy, Debug)]
struct LoadWindow {
    /// Drain this long first (the load balancer stops sending requests).
    drain: Option<Duration>,
    /// After going back into load, wait this long before answering (the
    /// load balancer sends requests again).
    settle: Duration,
}

impl LoadWindow {
    fn new(drain_ms: Option<u64>, settle_ms: u64) -> Self {
        Self {
            drain: drain_ms.map(Duration::from_millis),
            settle: Duration::from_millis(settle_ms),
        }
    }

    /// Runs `change` drained, if the window drains and the target is in
    /// load (a drained target stays drained: only what this drained goes
    /// back into load), then waits the settle time.
    async fn around<T>(self, load: &Load, change: impl std::future::Future<Output = T>) -> T {
        // Not kept on disk: a target killed mid-change restarts in load.
        let drained = self.drain.filter(|_| load.in_load());
        let draining = drained.map(|_| load.drain());
        if let Some(period) = drained {
            info!(?period, "drained");
            tokio::time::sleep(period).await;
        }
        let out = change.await;
        if let Some(draining) = draining {
            drop(draining);
            info!("back in load");
            tokio::time::sleep(self.settle).await;
        }
        out
    }
}

/// One delivery: drain, materialise, activate (hooks, switch), undrain.
struct DeliveryTask {
    manifest: Manifest,
    /// Out of load around it.
    window: LoadWindow,
    releases: Arc<Releases>,
    load: Arc<Load>,
    store: Arc<dyn crate::store::Store>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl DeliveryTask {
    async fn run(self) -> DeliveryReport {
        let started = Instant::now();
        let release = self.manifest.release_id();
        let _guard = self.lock.lock().await;
        let mut switch_us = 0;
        let manifest = Arc::new(self.manifest);
        let (m, releases, store) = (manifest.clone(), self.releases.clone(), self.store.clone());
        let change = async {
            let linked = tokio::task::spawn_blocking(move || {
                releases.materialise(&m, &StoreSource(&*store))
            })
            .await
            .map_err(|e| format!("materialising panicked: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
            match linked {
                Err(e) => Err(e),
                Ok(linked) => match self.releases.activate(&manifest, linked).await {
                    Ok(a) => {
                        switch_us = (a.switch_ms * 1000.0) as u64;
                        Ok(a.version)
                    }
                    Err(e) => Err(e.to_string()),
                },
            }
        };
        let result = self.window.around(&self.load, change).await;
        match &result {
            Ok(v) => info!(release = %release, version = %v, "delivered"),
            Err(e) => warn!(release = %release, "delivery failed: {e}"),
        }
        DeliveryReport {
            release,
            result,
            switch_us,
            total_ms: started.elapsed().as_millis() as u64,
        }
    }
}

fn seed_of(peer: &PeerId) -> u64 {
    let b = blake3::hash(&peer.to_bytes());
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
}
