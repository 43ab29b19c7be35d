//! A fleet in one process: the origin and N targets run the production
//! state machines ([`Fetcher`], [`Seeder`], [`Pusher`]) over a virtual
//! network stepped in virtual time.
//!
//! The glue between those machines is the daemon's own: a target asks
//! for up to [`MAX_GET_BATCH`] chunks of one peer in a request, answered
//! at once when all are sent; it announces what it holds on the
//! [`Announcer`]'s cadence; every server, origin or target, answers busy
//! by [`crate::transfer::crowd::busy_for`]; a request once made cannot be withdrawn
//! (its answer is ignored), as on the wire.
//!
//! The network model: every node has an uplink of fixed rate that sends
//! one answer at a time, first come first served (so requests queue at
//! busy peers as they would at a capped socket); every message takes a
//! fixed one-way latency. Downlinks are not modelled (the bound uses them
//! only through `min(d_i)`, which benchmarks leave uncapped). Runs are
//! deterministic for a given [`SimConfig::seed`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use super::{
    kumar_ross_bound, Announcer, ChunkIndex, FetchAction, FetchConfig, Fetcher, HaveSet, Locality,
    Mode, PeerPool, PushAction, PushConfig, Pusher, Seeder, ServeDecision, ANNOUNCE_RARE_EVERY,
};
use crate::protocol::MAX_GET_BATCH;

/// Which distribution mode to simulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimMode {
    /// Targets fetch from each other and the origin.
    Swarm,
    /// The origin sends each target what it lacks, K at a time.
    Push,
    /// Targets fetch from the origin only.
    Pull,
}

impl SimMode {
    /// The mode's name as the CLI and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Swarm => "swarm",
            Self::Push => "push",
            Self::Pull => "pull",
        }
    }
}

/// A simulated fleet and release.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Distribution mode.
    pub mode: SimMode,
    /// Number of targets.
    pub targets: usize,
    /// Length of each distinct chunk of the release.
    pub chunk_sizes: Vec<u32>,
    /// Chunks every target holds before the transfer (an update).
    pub preloaded: Vec<ChunkIndex>,
    /// Origin uplink, bytes per second.
    pub origin_uplink: f64,
    /// Target uplink, bytes per second.
    pub target_uplink: f64,
    /// Data centres the targets are spread over (the origin is in the first).
    pub dcs: usize,
    /// Zones per data centre.
    pub zones: usize,
    /// One-way latency of every message.
    pub latency: Duration,
    /// Peers named to each target, as the coordinator's `--swarm-degree`
    /// chooses them ([`PeerPool`]); links are symmetric, as a peer
    /// that dials another is taken up by it.
    pub swarm_degree: usize,
    /// Targets (0-based) that serve corrupt bytes for every chunk.
    pub corrupt_targets: Vec<usize>,
    /// Target-side tuning.
    pub fetch: FetchConfig,
    /// Origin-side tuning for push.
    pub push: PushConfig,
    /// Seeder copy limits for swarm: (normal, when the origin is idle).
    pub seeder_copies: (u32, u32),
    /// Seed for peer choice and every fetcher's tie-breaks.
    pub seed: u64,
    /// Virtual time after which the run stops unfinished.
    pub time_limit: Duration,
    /// Events after which the run stops unfinished (a bound against a
    /// scheduling bug spinning at one instant).
    pub max_events: u64,
}

impl SimConfig {
    /// `targets` targets, a release of `bytes` in 64 KiB chunks, every
    /// uplink at `uplink` bytes per second.
    pub fn new(mode: SimMode, targets: usize, bytes: u64, uplink: f64) -> Self {
        let chunk = 64 * 1024u64;
        let mut chunk_sizes = vec![chunk as u32; (bytes / chunk) as usize];
        if !bytes.is_multiple_of(chunk) {
            chunk_sizes.push((bytes % chunk) as u32);
        }
        Self {
            mode,
            targets,
            chunk_sizes,
            preloaded: Vec::new(),
            origin_uplink: uplink,
            target_uplink: uplink,
            dcs: 1,
            zones: 1,
            latency: Duration::from_millis(1),
            swarm_degree: 8,
            corrupt_targets: Vec::new(),
            fetch: FetchConfig::default(),
            push: PushConfig::default(),
            seeder_copies: (1, 2),
            seed: 1,
            time_limit: Duration::from_secs(24 * 3600),
            max_events: 50_000_000,
        }
    }

    /// The bytes each target lacks at the start.
    pub fn bytes_needed(&self) -> u64 {
        let held = HaveSet::from_indices(self.chunk_sizes.len(), self.preloaded.iter().copied());
        held.missing()
            .map(|c| u64::from(self.chunk_sizes[c as usize]))
            .sum()
    }

    /// The Kumar–Ross lower bound for this fleet, on the bytes each target lacks.
    pub fn bound_seconds(&self) -> f64 {
        let ups = vec![self.target_uplink; self.targets];
        let downs = vec![f64::INFINITY; self.targets];
        kumar_ross_bound(self.bytes_needed(), self.origin_uplink, &ups, &downs)
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// When each target held every chunk; `None` if it never did.
    pub completion: Vec<Option<Duration>>,
    /// Chunk bytes the origin sent.
    pub origin_egress: u64,
    /// Chunk bytes sent by anyone.
    pub total_bytes: u64,
    /// Chunk bytes that crossed between data centres.
    pub cross_dc_bytes: u64,
    /// Of those, the bytes that came into each data centre (by index).
    pub cross_dc_bytes_into: Vec<u64>,
    /// When each data centre first held every chunk between its targets
    /// (by index); `None` if it never did. The rest of a dc's targets'
    /// time is spreading inside it.
    pub dc_complete: Vec<Option<Duration>>,
    /// Requests the origin answered busy: its load beyond the chunks it
    /// sends, which a real coordinator pays for in CPU.
    pub origin_busy: u64,
    /// Bans issued by targets.
    pub bans: usize,
    /// Chunks a target stored without ever receiving them intact (must be zero).
    pub corrupt_stored: usize,
    /// Events processed.
    pub events: u64,
}

impl SimReport {
    /// Completion time at quantile `q` (0..=1) over the targets that
    /// completed, in seconds; `None` if some did not complete.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let mut t: Vec<f64> = self
            .completion
            .iter()
            .map(|c| c.map(|d| d.as_secs_f64()))
            .collect::<Option<_>>()?;
        if t.is_empty() {
            return Some(0.0);
        }
        t.sort_by(f64::total_cmp);
        let i = ((t.len() as f64 - 1.0) * q).round() as usize;
        Some(t[i])
    }
}

type Node = usize; // 0 = origin, 1..=N = targets
const ORIGIN: Node = 0;

#[derive(Debug)]
enum Msg {
    /// A request for up to [`MAX_GET_BATCH`] chunks.
    Request(Vec<ChunkIndex>),
    /// Its answer: the chunks sent (and whether intact), those refused.
    Answer {
        chunks: Vec<(ChunkIndex, bool)>,
        refused: Vec<ChunkIndex>,
    },
    /// Busy, and how long to wait.
    Busy(Vec<ChunkIndex>, Duration),
    /// An announcement (reaching one peer; [`Event::Announced`] reaches
    /// all of a node's peers at once).
    Haves(Vec<ChunkIndex>),
    /// A chunk sent unasked: by the origin ([`Seeder::gift`]) or pushed.
    Data {
        chunk: ChunkIndex,
        valid: bool,
        /// Sent unasked by the origin ([`Seeder::gift`]).
        gift: bool,
    },
    Delivered(ChunkIndex),
    /// A target tells the tracker it banned a peer.
    Banned(Node),
    Rejected(ChunkIndex),
}

#[derive(Debug)]
enum Event {
    Arrive {
        to: Node,
        from: Node,
        msg: Msg,
    },
    UplinkFree(Node),
    Timer(Node),
    /// A target's announcement tick.
    Announce(Node),
    /// An announcement arriving at every peer of `from` and the origin:
    /// one event for what the daemon sends as one message per peer, all
    /// of them the same latency away.
    Announced {
        from: Node,
        chunks: Vec<ChunkIndex>,
    },
}

/// An event in the queue, ordered by when it happens, then by when it
/// was scheduled (so runs are deterministic).
struct Queued {
    at: Duration,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// What a node's uplink sends next.
#[derive(Debug)]
struct Send {
    to: Node,
    chunks: Vec<ChunkIndex>,
    /// Answered as refused with the chunks.
    refused: Vec<ChunkIndex>,
    /// Unasked (a gift or a push), one chunk.
    unasked: Option<bool>,
}

struct Label {
    dc: usize,
    zone: usize,
}

struct Sim<'c> {
    cfg: &'c SimConfig,
    base: Instant,
    now: Duration,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    /// Targets neither complete nor corrupt (the run ends at zero).
    unsettled: usize,
    /// Each target's (rank, count) among its data centre's targets.
    import_ranks: Vec<(u32, u32)>,
    labels: Vec<Label>,
    neighbours: Vec<Vec<Node>>,
    uplink: Vec<VecDeque<Send>>,
    sending: Vec<bool>,
    /// When each node's uplink is free of the send it is making.
    sending_until: Vec<Duration>,
    fetchers: Vec<Option<Fetcher<Node>>>,
    /// The one timer each node has pending, if any.
    timer_at: Vec<Option<Duration>>,
    seeder: Option<Seeder<Node>>,
    /// The origin's askers told to wait their turn ([`crate::transfer::crowd::Crowd`]):
    /// in pull, where it is their only source; a swarm's origin, and every
    /// target, answers by [`crate::transfer::crowd::busy_for`] alone
    /// ([`crate::transfer::crowd::Wait`]), as the daemon's do.
    crowd: crate::transfer::crowd::Crowd<Node>,
    announcers: Vec<Announcer>,
    /// Whether a node's announcement tick is scheduled.
    ticking: Vec<bool>,
    pusher: Option<Pusher<Node>>,
    have: Vec<HaveSet>,
    /// Chunks each node has received intact at least once.
    received_intact: Vec<HaveSet>,
    banned: Vec<Vec<Node>>,
    /// The chunks held by some target in each data centre.
    dc_have: Vec<HaveSet>,
    report: SimReport,
}

/// Runs one transfer and reports what it measured.
pub fn run(cfg: &SimConfig) -> SimReport {
    assert!(cfg.targets >= 1 && cfg.dcs >= 1 && cfg.zones >= 1 && cfg.swarm_degree >= 1);
    let n = cfg.chunk_sizes.len();
    let nodes = cfg.targets + 1;
    let labels: Vec<Label> = (0..nodes)
        .map(|i| match i {
            ORIGIN => Label { dc: 0, zone: 0 },
            t => Label {
                dc: (t - 1) % cfg.dcs,
                zone: ((t - 1) / cfg.dcs) % cfg.zones,
            },
        })
        .collect();
    let start_have = HaveSet::from_indices(n, cfg.preloaded.iter().copied());
    let mut have = vec![start_have.clone(); nodes];
    have[ORIGIN] = HaveSet::full(n);
    let base = Instant::now();
    let mut import_ranks = vec![(0, 0); nodes];
    let mut per_dc = vec![0u32; cfg.dcs];
    for t in 1..nodes {
        let dc = labels[t].dc;
        import_ranks[t].0 = per_dc[dc];
        per_dc[dc] += 1;
    }
    for t in 1..nodes {
        import_ranks[t].1 = per_dc[labels[t].dc];
    }
    let corrupt = (0..cfg.targets)
        .filter(|t| cfg.corrupt_targets.contains(t))
        .count();
    let mut sim = Sim {
        cfg,
        base,
        now: Duration::ZERO,
        queue: BinaryHeap::new(),
        seq: 0,
        unsettled: cfg.targets - corrupt,
        import_ranks,
        neighbours: choose_neighbours(cfg, &labels),
        labels,
        uplink: (0..nodes).map(|_| VecDeque::new()).collect(),
        sending: vec![false; nodes],
        sending_until: vec![Duration::ZERO; nodes],
        fetchers: (0..nodes).map(|_| None).collect(),
        timer_at: vec![None; nodes],
        seeder: None,
        crowd: Default::default(),
        announcers: (0..nodes).map(|_| Announcer::new(base)).collect(),
        ticking: vec![false; nodes],
        pusher: None,
        received_intact: have.clone(),
        have,
        banned: vec![Vec::new(); nodes],
        dc_have: vec![start_have.clone(); cfg.dcs],
        report: SimReport {
            completion: vec![None; cfg.targets],
            origin_egress: 0,
            total_bytes: 0,
            cross_dc_bytes: 0,
            cross_dc_bytes_into: vec![0; cfg.dcs],
            dc_complete: vec![start_have.is_full().then_some(Duration::ZERO); cfg.dcs],
            origin_busy: 0,
            bans: 0,
            corrupt_stored: 0,
            events: 0,
        },
    };
    sim.start(&start_have);
    while sim.unsettled > 0 {
        let Some(Reverse(Queued { at, event, .. })) = sim.queue.pop() else {
            break;
        };
        if at > cfg.time_limit || sim.report.events >= cfg.max_events {
            break;
        }
        sim.now = at;
        sim.report.events += 1;
        sim.handle(event);
    }
    sim.report
}

/// Where target `b` stands from target `a`.
fn place(a: &Label, b: &Label) -> Locality {
    match (a.dc == b.dc, a.zone == b.zone) {
        (true, true) => Locality::SameZone,
        (true, false) => Locality::SameDc,
        _ => Locality::OtherDc,
    }
}

/// Each target's peers as the coordinator names them ([`PeerPool`]),
/// seeded per target; links are made symmetric.
fn choose_neighbours(cfg: &SimConfig, labels: &[Label]) -> Vec<Vec<Node>> {
    let nodes = labels.len();
    let mut links = vec![std::collections::BTreeSet::new(); nodes];
    let pool = PeerPool::new((1..nodes).map(|o| (o, labels[o].dc, labels[o].zone)));
    for t in 1..nodes {
        let (dc, zone) = (labels[t].dc, labels[t].zone);
        let seed = cfg.seed ^ ((t as u64) << 32);
        for o in pool.choose(t, &dc, &zone, cfg.swarm_degree, seed) {
            links[t].insert(o);
            links[o].insert(t);
        }
    }
    links.into_iter().map(|s| s.into_iter().collect()).collect()
}

impl Sim<'_> {
    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.queue.push(Reverse(Queued {
            at: self.now + after,
            seq: self.seq,
            event,
        }));
        self.seq += 1;
    }

    fn send(&mut self, from: Node, to: Node, msg: Msg) {
        self.schedule(self.cfg.latency, Event::Arrive { to, from, msg });
    }

    fn locality(&self, me: Node, peer: Node) -> Locality {
        if peer == ORIGIN {
            return Locality::Origin;
        }
        place(&self.labels[me], &self.labels[peer])
    }

    fn start(&mut self, start_have: &HaveSet) {
        let now = self.instant();
        match self.cfg.mode {
            SimMode::Push => {
                let mut pusher = Pusher::new(self.cfg.push.clone());
                for t in 1..=self.cfg.targets {
                    pusher.add_target(t, start_have);
                }
                self.pusher = Some(pusher);
                self.drain_pusher();
            }
            SimMode::Swarm | SimMode::Pull => {
                let mode = if self.cfg.mode == SimMode::Swarm {
                    Mode::Swarm
                } else {
                    Mode::Pull
                };
                let (min, idle) = self.cfg.seeder_copies;
                let mut seeder = Seeder::new(start_have.len(), min, idle);
                for t in 1..=self.cfg.targets {
                    seeder.add_target(t, start_have.clone());
                    let config = FetchConfig {
                        mode,
                        seed: self.cfg.seed.wrapping_mul(31).wrapping_add(t as u64),
                        import_rank: self.import_ranks[t],
                        origin_in_my_dc: self.labels[t].dc == self.labels[ORIGIN].dc,
                        ..self.cfg.fetch.clone()
                    };
                    let mut f = Fetcher::new(start_have.clone(), config);
                    f.add_peer(
                        now,
                        ORIGIN,
                        Locality::Origin,
                        HaveSet::full(start_have.len()),
                    );
                    if mode == Mode::Swarm {
                        for &p in &self.neighbours[t] {
                            f.add_peer(now, p, self.locality(t, p), start_have.clone());
                        }
                    }
                    self.fetchers[t] = Some(f);
                }
                if mode == Mode::Swarm {
                    self.seeder = Some(seeder);
                }
                for t in 1..=self.cfg.targets {
                    self.drain_fetcher(t);
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::UplinkFree(node) => {
                self.sending[node] = false;
                self.pump_uplink(node);
            }
            Event::Timer(node) => {
                if self.timer_at[node] != Some(self.now) {
                    return; // superseded by an earlier or later deadline
                }
                self.timer_at[node] = None;
                let now = self.instant();
                if let Some(f) = self.fetchers[node].as_mut() {
                    if f.poll_timeout().is_some_and(|t| t <= now) {
                        f.handle_timeout(now);
                    }
                }
                self.drain_fetcher(node);
            }
            Event::Announce(node) => {
                self.ticking[node] = false;
                self.announce(node, false);
            }
            Event::Arrive { to, from, msg } => self.arrive(to, from, msg),
            Event::Announced { from, chunks } => {
                for i in 0..self.neighbours[from].len() {
                    let to = self.neighbours[from][i];
                    self.arrive(to, from, Msg::Haves(chunks.clone()));
                }
                self.arrive(ORIGIN, from, Msg::Haves(chunks));
            }
        }
    }

    fn arrive(&mut self, to: Node, from: Node, msg: Msg) {
        if self.banned[to].contains(&from) {
            return;
        }
        let now = self.instant();
        match msg {
            Msg::Request(chunks) => {
                // Every server says busy as the daemon's does (`busy_for`).
                if let Some(wait) = self.busy(to, from) {
                    self.report.origin_busy += u64::from(to == ORIGIN);
                    self.send(to, from, Msg::Busy(chunks, wait));
                    return;
                }
                let idle = !self.sending[to] && self.uplink[to].is_empty();
                let (mut served, mut refused) = (Vec::new(), Vec::new());
                for c in chunks {
                    let serve = match (to, self.seeder.as_mut()) {
                        (ORIGIN, Some(seeder)) => {
                            seeder.handle_request(from, c, idle) == ServeDecision::Serve
                        }
                        _ => self.have[to].contains(c),
                    };
                    if serve {
                        served.push(c);
                    } else {
                        refused.push(c);
                    }
                }
                if served.is_empty() {
                    let chunks = Vec::new();
                    self.send(to, from, Msg::Answer { chunks, refused });
                } else {
                    self.uplink[to].push_back(Send {
                        to: from,
                        chunks: served,
                        refused,
                        unasked: None,
                    });
                    self.pump_uplink(to);
                }
            }
            Msg::Answer { chunks, refused } => {
                if let Some(f) = self.fetchers[to].as_mut() {
                    for (c, valid) in chunks {
                        if valid {
                            self.received_intact[to].insert(c);
                        }
                        f.handle_chunk(now, from, c, valid);
                    }
                    for c in refused {
                        f.handle_refused(now, from, c);
                    }
                }
                self.drain_fetcher(to);
            }
            Msg::Busy(chunks, wait) => {
                if let Some(f) = self.fetchers[to].as_mut() {
                    for c in chunks {
                        f.handle_busy(now, from, c, wait);
                    }
                }
                self.drain_fetcher(to);
            }
            Msg::Haves(chunks) => {
                if to == ORIGIN {
                    if let Some(s) = self.seeder.as_mut() {
                        for c in chunks {
                            s.handle_have(from, c);
                        }
                    }
                } else if let Some(f) = self.fetchers[to].as_mut() {
                    f.handle_haves(now, from, chunks);
                    self.drain_fetcher(to);
                }
            }
            Msg::Data {
                chunk,
                valid,
                gift: true,
            } => {
                if let (Some(f), true) = (self.fetchers[to].as_mut(), valid) {
                    self.received_intact[to].insert(chunk);
                    f.handle_gift(now, chunk);
                    self.drain_fetcher(to);
                }
            }
            Msg::Data {
                chunk,
                valid,
                gift: false,
            } => {
                // Pushed.
                let reply = if valid {
                    self.received_intact[to].insert(chunk);
                    self.store(to, chunk);
                    Msg::Delivered(chunk)
                } else {
                    Msg::Rejected(chunk)
                };
                self.send(to, from, reply);
            }
            Msg::Banned(peer) => {
                if let Some(s) = self.seeder.as_mut() {
                    s.remove_target(peer);
                }
            }
            Msg::Delivered(chunk) => {
                if let Some(p) = self.pusher.as_mut() {
                    p.handle_delivered(from, chunk);
                }
                self.drain_pusher();
            }
            Msg::Rejected(chunk) => {
                if let Some(p) = self.pusher.as_mut() {
                    p.handle_rejected(from, chunk);
                }
                self.drain_pusher();
            }
        }
    }

    /// Whether `node` answers a request busy now: its queued answers and
    /// the rest of the one it is sending, at its cap, against the
    /// daemon's rule.
    fn busy(&mut self, node: Node, asker: Node) -> Option<Duration> {
        let queued: u64 = self.uplink[node]
            .iter()
            .flat_map(|s| &s.chunks)
            .map(|c| u64::from(self.cfg.chunk_sizes[*c as usize]))
            .sum();
        let backlog = Duration::from_secs_f64(queued as f64 / self.rate(node))
            + self.sending_until[node].saturating_sub(self.now);
        let serving = self.uplink[node].len() + usize::from(self.sending[node]);
        // No seeder: pull, the origin the only source (`Wait::Turn`).
        if node == ORIGIN && self.seeder.is_none() {
            let now = self.instant();
            return self.crowd.busy(now, asker, backlog, serving);
        }
        crate::transfer::crowd::busy_for(backlog, serving)
    }

    fn rate(&self, node: Node) -> f64 {
        if node == ORIGIN {
            self.cfg.origin_uplink
        } else {
            self.cfg.target_uplink
        }
    }

    fn store(&mut self, node: Node, chunk: ChunkIndex) {
        if !self.received_intact[node].contains(chunk) {
            self.report.corrupt_stored += 1;
        }
        self.have[node].insert(chunk);
        let dc = self.labels[node].dc;
        if !self.dc_have[dc].contains(chunk) {
            self.dc_have[dc].insert(chunk);
            if self.dc_have[dc].is_full() {
                self.report.dc_complete[dc] = Some(self.now);
            }
        }
        if self.have[node].is_full() && self.report.completion[node - 1].is_none() {
            self.report.completion[node - 1] = Some(self.now);
            if !self.cfg.corrupt_targets.contains(&(node - 1)) {
                self.unsettled -= 1;
            }
        }
    }

    /// Starts the next queued send on `node`'s uplink, if it is free.
    fn pump_uplink(&mut self, node: Node) {
        if self.sending[node] {
            return;
        }
        // An idle origin hands out what the seeder says, as the daemon's
        // coordinator does.
        if node == ORIGIN && self.uplink[node].is_empty() {
            if let Some((to, chunk)) = self.seeder.as_mut().and_then(|s| s.gift(true)) {
                self.uplink[node].push_back(Send {
                    to,
                    chunks: vec![chunk],
                    refused: Vec::new(),
                    unasked: Some(true),
                });
            }
        }
        let Some(send) = self.uplink[node].pop_front() else {
            return;
        };
        let bytes: u64 = send
            .chunks
            .iter()
            .map(|c| u64::from(self.cfg.chunk_sizes[*c as usize]))
            .sum();
        let airtime = Duration::from_secs_f64(bytes as f64 / self.rate(node));
        self.sending[node] = true;
        self.sending_until[node] = self.now + airtime;
        self.report.total_bytes += bytes;
        if node == ORIGIN {
            self.report.origin_egress += bytes;
        }
        if self.labels[node].dc != self.labels[send.to].dc {
            self.report.cross_dc_bytes += bytes;
            self.report.cross_dc_bytes_into[self.labels[send.to].dc] += bytes;
        }
        let valid = !(node != ORIGIN && self.cfg.corrupt_targets.contains(&(node - 1)));
        self.schedule(airtime, Event::UplinkFree(node));
        let msg = match send.unasked {
            Some(gift) => Msg::Data {
                chunk: send.chunks[0],
                valid,
                gift,
            },
            None => Msg::Answer {
                chunks: send.chunks.into_iter().map(|c| (c, valid)).collect(),
                refused: send.refused,
            },
        };
        self.schedule(
            airtime + self.cfg.latency,
            Event::Arrive {
                to: send.to,
                from: node,
                msg,
            },
        );
    }

    /// Sends `node`'s pending announcement to its peers and the origin if
    /// its [`Announcer`] says so, and keeps its ticks coming while
    /// anything waits.
    fn announce(&mut self, node: Node, at_once: bool) {
        let now = self.instant();
        if let Some(chunks) = self.announcers[node].due(now, at_once) {
            let from = node;
            self.schedule(self.cfg.latency, Event::Announced { from, chunks });
        }
        if !self.announcers[node].is_idle() && !self.ticking[node] {
            // The daemon's ticks run on a fixed interval: the next one.
            let tick = ANNOUNCE_RARE_EVERY.as_nanos();
            let next = (self.now.as_nanos() / tick + 1) * tick;
            self.ticking[node] = true;
            let after = Duration::from_nanos((next - self.now.as_nanos()) as u64);
            self.schedule(after, Event::Announce(node));
        }
    }

    fn drain_fetcher(&mut self, node: Node) {
        let Some(mut f) = self.fetchers[node].take() else {
            return;
        };
        // This round's requests, per peer: a few chunks to a request.
        let mut batches: std::collections::BTreeMap<Node, Vec<ChunkIndex>> = Default::default();
        let mut held = false;
        while let Some(action) = f.poll_action() {
            match action {
                FetchAction::Request { peer, chunk } => {
                    batches.entry(peer).or_default().push(chunk)
                }
                // A request in flight cannot be withdrawn; its answer is ignored.
                FetchAction::Cancel { .. } => {}
                FetchAction::Announce { chunk } => {
                    self.store(node, chunk);
                    if self.cfg.mode == SimMode::Swarm {
                        self.announcers[node].held(chunk, f.holders(chunk));
                        held = true;
                    }
                }
                FetchAction::Ban { peer } => {
                    self.banned[node].push(peer);
                    self.report.bans += 1;
                    self.send(node, ORIGIN, Msg::Banned(peer));
                }
                FetchAction::Complete | FetchAction::GaveUp { .. } | FetchAction::ImportAll => {}
            }
        }
        for (peer, wanted) in batches {
            for chunks in wanted.chunks(MAX_GET_BATCH) {
                self.send(node, peer, Msg::Request(chunks.to_vec()));
            }
        }
        if let Some(t) = f.poll_timeout() {
            let at = self.now + t.saturating_duration_since(self.instant());
            if self.timer_at[node] != Some(at) {
                self.timer_at[node] = Some(at);
                self.schedule(at - self.now, Event::Timer(node));
            }
        }
        self.fetchers[node] = Some(f);
        if held {
            // A target that now holds everything announces at once.
            let done = self.have[node].is_full();
            self.announce(node, done);
        }
    }

    fn drain_pusher(&mut self) {
        let Some(mut p) = self.pusher.take() else {
            return;
        };
        while let Some(action) = p.poll_action() {
            match action {
                PushAction::Send { peer, chunk } => {
                    self.uplink[ORIGIN].push_back(Send {
                        to: peer,
                        chunks: vec![chunk],
                        refused: Vec::new(),
                        unasked: Some(false),
                    });
                }
                PushAction::Done { .. } | PushAction::Failed { .. } => {}
            }
        }
        self.pusher = Some(p);
        self.pump_uplink(ORIGIN);
    }
}

/// Runs `base` once per mode, in the order given.
pub fn run_modes(base: &SimConfig, modes: &[SimMode]) -> Vec<(SimMode, SimReport)> {
    modes
        .iter()
        .map(|&mode| {
            (
                mode,
                run(&SimConfig {
                    mode,
                    ..base.clone()
                }),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn all_complete(r: &SimReport) -> bool {
        r.completion.iter().all(Option::is_some)
    }

    #[test]
    fn pull_sends_every_target_everything_from_the_origin() {
        let cfg = SimConfig::new(SimMode::Pull, 20, 4 * MIB, 2.0 * MIB as f64);
        let r = run(&cfg);
        assert!(all_complete(&r));
        assert_eq!(r.origin_egress, 20 * 4 * MIB);
        assert_eq!(r.total_bytes, r.origin_egress);
        // Push from one origin cannot beat N*F/u_s = 40 s.
        assert!(r.quantile(1.0).unwrap() >= 40.0);
    }

    /// More requests than the origin can serve within a request timeout
    /// (100 targets × a window of 8 × 62 ms a chunk at 1 MiB/s = 50 s,
    /// over the 30 s timeout): without busy answers every request timed
    /// out in the queue and was made again at its tail, and the run never
    /// finished (seen at 500 targets, 2 MiB/s).
    #[test]
    fn pull_finishes_when_the_origin_has_more_requests_than_it_can_serve_in_time() {
        let cfg = SimConfig::new(SimMode::Pull, 100, MIB, MIB as f64);
        let r = run(&cfg);
        assert!(
            all_complete(&r),
            "{} of 100 unfinished",
            r.completion.iter().filter(|c| c.is_none()).count()
        );
        assert_eq!(
            r.origin_egress,
            100 * MIB,
            "each chunk sent once per target"
        );
        // N*F/u_s = 100 s; little time lost to back-offs.
        assert!(r.quantile(1.0).unwrap() < 110.0, "{:?}", r.quantile(1.0));
    }

    /// A lone origin told every waiting target the same short wait, so
    /// each asked about twice a second: 1,000 pulling targets of 16 MiB
    /// made 31.8M events, 98% of them busy answers. Told to wait their
    /// turn, they ask about once a turn.
    #[test]
    fn pulling_targets_wait_their_turn_at_a_busy_origin() {
        let cfg = SimConfig::new(SimMode::Pull, 300, 2 * MIB, 2.0 * MIB as f64);
        let r = run(&cfg);
        assert!(all_complete(&r));
        // N*F/u_s = 300 s; the origin's uplink never idles for long.
        assert!(r.quantile(1.0).unwrap() < 303.0, "{:?}", r.quantile(1.0));
        // Each request answered (300 x 8 of 4 chunks) or told to wait a few
        // times, and two events to every answer: far under the 4.5M of
        // every target asking every 640 ms.
        assert!(r.events < 100_000, "{} events", r.events);
    }

    #[test]
    fn push_sends_exactly_what_each_target_lacks() {
        let mut cfg = SimConfig::new(SimMode::Push, 10, 2 * MIB, 2.0 * MIB as f64);
        cfg.preloaded = (0..16).collect(); // half of 32 chunks
        let r = run(&cfg);
        assert!(all_complete(&r));
        assert_eq!(r.origin_egress, 10 * MIB);
    }

    #[test]
    fn swarm_of_200_targets_finishes_near_the_bound_with_little_origin_egress() {
        let cfg = SimConfig::new(SimMode::Swarm, 200, 8 * MIB, 2.0 * MIB as f64);
        let r = run(&cfg);
        assert!(
            all_complete(&r),
            "{:?}",
            r.completion.iter().filter(|c| c.is_none()).count()
        );
        let bound = cfg.bound_seconds();
        let max = r.quantile(1.0).unwrap();
        // 1.30x with the simulator's own glue (a chunk a request, haves
        // after 1 ms, busy targets at 4 queued chunks); 1.64x with the
        // daemon's (four a request answered whole, haves on the 50/250 ms
        // cadence, busy past 500 ms of backlog), which brought the
        // simulator within 7% of real daemons at 10, 50 and 200 targets.
        assert!(max <= 1.75 * bound, "max {max:.2}s vs bound {bound:.2}s");
        assert!(
            r.origin_egress <= 2 * 8 * MIB,
            "origin sent {} MiB",
            r.origin_egress / MIB
        );
    }

    #[test]
    fn swarm_is_at_least_ten_times_faster_than_push_and_pull_for_50_targets() {
        let base = SimConfig::new(SimMode::Swarm, 50, 16 * MIB, 2.0 * MIB as f64);
        let runs = run_modes(&base, &[SimMode::Swarm, SimMode::Push, SimMode::Pull]);
        let swarm = runs[0].1.quantile(0.99).unwrap();
        for (mode, report) in &runs[1..] {
            let other = report.quantile(0.99).unwrap();
            assert!(
                other >= 10.0 * swarm,
                "{} {other:.1}s vs swarm {swarm:.1}s",
                mode.name()
            );
        }
    }

    #[test]
    fn swarm_keeps_traffic_inside_data_centres() {
        let mut cfg = SimConfig::new(SimMode::Swarm, 48, 8 * MIB, 4.0 * MIB as f64);
        cfg.dcs = 4;
        cfg.zones = 2;
        let r = run(&cfg);
        assert!(all_complete(&r));
        let limit = 3 * 8 * MIB * 3 / 2; // 1.5 x package x (dcs - 1)
        assert!(
            r.cross_dc_bytes <= limit,
            "cross-dc {} MiB",
            r.cross_dc_bytes / MIB
        );
        // Every other data centre imported the package about once; the
        // origin's own imported less (its targets ask other data centres
        // only for what none of theirs holds yet, the origin last).
        let into = &r.cross_dc_bytes_into;
        assert_eq!(into.iter().sum::<u64>(), r.cross_dc_bytes);
        assert!(into[1..].iter().all(|b| into[0] < *b), "{into:?}");
        assert!(
            into[1..].iter().all(|b| (8 * MIB..=12 * MIB).contains(b)),
            "{into:?}"
        );
    }

    /// With two peers each, 600 targets in 10 dcs: some sit in islands of
    /// their data centre that a chunk's one importer never reaches (126
    /// never finished), and some chunks' importers have no neighbour in
    /// the origin's dc, so they reach theirs only from the origin, asked
    /// when no peer holds them. Told a turn behind every other asker,
    /// as pulling targets are, they got them 50 s after the rest (10,000
    /// targets of 256 MiB: 400 s after, p99 4.2x the bound).
    #[test]
    fn a_swarm_finishes_however_its_importers_are_linked() {
        let mut cfg = SimConfig::new(SimMode::Swarm, 600, 4 * MIB, 2.0 * MIB as f64);
        cfg.dcs = 10;
        cfg.swarm_degree = 2;
        let r = run(&cfg);
        let done = r.completion.iter().filter(|c| c.is_some()).count();
        assert_eq!(done, 600, "{} never finished", 600 - done);
        let at = |d: &Option<Duration>| d.expect("every dc holds the release").as_secs_f64();
        let origin_dc = at(&r.dc_complete[0]);
        for (dc, d) in r.dc_complete.iter().enumerate() {
            let late = at(d) - origin_dc;
            assert!(late < 6.0, "dc{dc} held the release {late:.1} s after dc0");
        }
    }

    #[test]
    fn corrupt_peers_are_banned_and_nothing_bad_is_stored() {
        let mut cfg = SimConfig::new(SimMode::Swarm, 30, 4 * MIB, 2.0 * MIB as f64);
        cfg.corrupt_targets = vec![0, 7];
        let r = run(&cfg);
        // Every honest target completes; the corrupt ones are expelled.
        for (t, c) in r.completion.iter().enumerate() {
            assert!(
                c.is_some() || cfg.corrupt_targets.contains(&t),
                "target {t} did not complete"
            );
        }
        assert!(r.bans > 0);
        assert_eq!(r.corrupt_stored, 0);
    }

    #[test]
    fn an_update_moves_only_the_changed_chunks() {
        let mut cfg = SimConfig::new(SimMode::Swarm, 20, 16 * MIB, 2.0 * MIB as f64);
        cfg.preloaded = (0..253).collect(); // 3 of 256 chunks changed
        let r = run(&cfg);
        assert!(all_complete(&r));
        let needed = cfg.bytes_needed();
        assert_eq!(needed, 3 * 64 * 1024);
        assert!(
            r.total_bytes as f64 <= 20.0 * 1.2 * needed as f64,
            "{} bytes moved",
            r.total_bytes
        );
    }

    #[test]
    fn same_seed_same_run_different_seed_still_completes() {
        let cfg = SimConfig::new(SimMode::Swarm, 40, 4 * MIB, 2.0 * MIB as f64);
        let (a, b) = (run(&cfg), run(&cfg));
        assert_eq!(a.completion, b.completion);
        assert_eq!(a.total_bytes, b.total_bytes);
        for seed in 2..6 {
            let r = run(&SimConfig {
                seed,
                ..cfg.clone()
            });
            assert!(all_complete(&r), "seed {seed}");
        }
    }
}
