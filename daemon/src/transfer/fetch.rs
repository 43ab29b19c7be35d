//! A target fetching the chunks it lacks.

use std::collections::{BTreeMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{ChunkIndex, HaveSet, Locality};

/// Where a fetcher may get chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// From peers and the origin.
    Swarm,
    /// From the origin only.
    Pull,
}

/// Tuning of a [`Fetcher`].
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Swarm or pull.
    pub mode: Mode,
    /// Requests in flight per peer: enough to keep its link busy while a
    /// request crosses the network.
    pub window: usize,
    /// A request unanswered for this long is given up and made elsewhere.
    pub request_timeout: Duration,
    /// When this few chunks are missing and all are requested, a request
    /// that is overdue (older than [`FetchConfig::endgame_slowness`] times the
    /// typical round trip) is also made to a second peer (the endgame).
    pub endgame_chunks: usize,
    /// How many typical round trips a request may take before the endgame
    /// duplicates it.
    pub endgame_slowness: u32,
    /// In a transfer of at most four times [`FetchConfig::endgame_chunks`]
    /// chunks, the endgame duplicates at most one chunk in this many of
    /// those the fetcher started without, so a small update (where every
    /// chunk is one of the last) moves no more than it needs; a request
    /// that never comes is still made again on its timeout.
    pub endgame_share: u32,
    /// A peer that declined a chunk is not asked for it again for this long.
    pub refusal_backoff: Duration,
    /// A peer that answered "busy" is left alone for this long.
    pub busy_backoff: Duration,
    /// This target's rank among the targets of its data centre, and their
    /// number (from the tracker). Chunk `c` is fetched from another data
    /// centre (or a remote origin) only by the target of rank
    /// `c % size`; the others wait for it to hold the chunk, so each chunk
    /// crosses into a data centre about once. `(0, 1)` imports everything.
    pub import_rank: (u32, u32),
    /// Whether the origin is in this target's data centre; if not, chunks
    /// from it are imports like those from another data centre.
    pub origin_in_my_dc: bool,
    /// Failed requests (timed out, or answered with bad bytes) for one
    /// chunk before it is given up ([`FetchAction::GaveUp`]).
    pub max_failures: u32,
    /// Seed of the random tie-breaks; runs with one seed are identical.
    pub seed: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Swarm,
            window: 8,
            request_timeout: Duration::from_secs(30),
            endgame_chunks: 16,
            endgame_slowness: 3,
            endgame_share: 8,
            refusal_backoff: Duration::from_millis(500),
            busy_backoff: Duration::from_millis(20),
            import_rank: (0, 1),
            origin_in_my_dc: true,
            max_failures: 8,
            seed: 0,
        }
    }
}

impl FetchConfig {
    /// The speculative copies (an endgame's second request, an idle
    /// origin's extra copy) a transfer of `missing` chunks may cost: in a
    /// small one (at most four endgames' worth), where every chunk is one
    /// of the last and a second copy races the one already coming, one in
    /// [`FetchConfig::endgame_share`]; `None` (no such cap) in a large one.
    pub fn small_transfer_duplicates(&self, missing: usize) -> Option<usize> {
        (missing <= 4 * self.endgame_chunks).then(|| missing / self.endgame_share.max(1) as usize)
    }
}

/// What a [`Fetcher`] wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchAction<P> {
    /// Ask `peer` for `chunk`.
    Request {
        /// Who to ask.
        peer: P,
        /// What to ask for.
        chunk: ChunkIndex,
    },
    /// Withdraw a request: the chunk came from elsewhere.
    Cancel {
        /// Who was asked.
        peer: P,
        /// The chunk.
        chunk: ChunkIndex,
    },
    /// Tell peers this target now holds `chunk`.
    Announce {
        /// The chunk now held.
        chunk: ChunkIndex,
    },
    /// `peer` sent a chunk that failed verification: disconnect and never
    /// accept it again.
    Ban {
        /// The offender.
        peer: P,
    },
    /// `chunk` failed [`FetchConfig::max_failures`] times and is no longer
    /// requested: the transfer cannot complete without new peers.
    GaveUp {
        /// The chunk given up.
        chunk: ChunkIndex,
    },
    /// Nothing could be asked of anyone for [`STARVED_PATIENCE`]: this
    /// target now imports from other data centres whatever it lacks.
    ImportAll,
    /// Every chunk is held.
    Complete,
}

struct Peer {
    locality: Locality,
    have: HaveSet,
    in_flight: usize,
    /// Chunks this peer declined to serve, and until when not to ask again.
    refused: BTreeMap<ChunkIndex, Instant>,
    /// The peer said it is busy: ask it nothing before this.
    busy_until: Option<Instant>,
    /// Busy answers in a row: from the origin each doubles the back-off (a
    /// lone busy origin in pull mode must not be asked by every target
    /// every 20 ms).
    busy_streak: u32,
    /// Requests this peer may have in flight: [`FetchConfig::window`] at
    /// first, cut to what it was serving when it answers "busy", grown by
    /// one for each chunk it serves, so a fleet of requesters settles on
    /// what each uplink serves instead of asking a full peer again and
    /// again.
    window: usize,
    /// When it last answered anything (a chunk, a refusal, busy).
    last_heard: Option<Instant>,
    /// Its smoothed time from request to chunk (as the fetcher's own).
    round_trip: Option<Duration>,
}

impl Peer {
    fn has_slot(&self) -> bool {
        self.in_flight < self.window
    }
}

/// The chunks the target ranked `rank` of `size` in its data centre
/// imports: every `size`-th from `rank`, or all when it is alone.
fn imports(len: usize, (rank, size): (u32, u32)) -> HaveSet {
    if size <= 1 {
        return HaveSet::full(len);
    }
    HaveSet::from_indices(len, (rank..len as u32).step_by(size as usize))
}

/// Marks `chunk` in `set` or not.
fn set_if(set: &mut HaveSet, chunk: ChunkIndex, yes: bool) {
    if yes {
        set.insert(chunk);
    } else {
        set.remove(chunk);
    }
}

struct Outstanding<P> {
    peer: P,
    since: Instant,
    /// The endgame has looked at this overdue request; it is retried when a
    /// slot frees, not on a timer.
    overdue: bool,
}

/// A request must be this old before the endgame may duplicate it, however
/// fast round trips have been.
const ENDGAME_MIN_AGE: Duration = Duration::from_millis(20);

/// Bounds on what a fetcher keeps (TigerBeetle style: every map has a limit).
const MAX_PEERS: usize = 1024;
const MAX_WINDOW: usize = 256;

/// The longest the origin's busy back-off grows.
const MAX_BUSY_BACKOFF: Duration = Duration::from_millis(640);
/// The longest a busy peer is left alone on its own estimate (a peer
/// cannot keep others away for long by claiming a long queue).
const MAX_BUSY_WAIT: Duration = Duration::from_secs(5);
/// The longest wait the origin may ask for: its turn behind every other
/// target waiting ([`crate::transfer::crowd::Crowd`]). 100,000 targets pulling
/// from one origin wait about 100,000 × 125 ms, 3.5 hours, for a turn;
/// capped at 10 minutes they came back early, found it not their turn
/// and went to the tail again (simulated: 50M events for 4% of them).
const MAX_ORIGIN_BUSY_WAIT: Duration = Duration::from_secs(6 * 3600);

/// A swarm target that has had nothing to ask anyone for this long
/// imports whatever it lacks ([`Fetcher::handle_timeout`]): the one
/// importer of a chunk in its data centre may be out of its reach (with
/// two peers each, 126 of 600 simulated targets in 10 dcs sat in islands
/// that never got some chunks). Long enough that a data centre waiting
/// for the origin's next chunks, which reach it within seconds, does not
/// import them twice.
pub const STARVED_PATIENCE: Duration = Duration::from_secs(10);

/// A peer that has answered before and then answers nothing for this many
/// of its round trips has stalled ([`Fetcher::handle_timeout`]).
pub const STALL_ROUND_TRIPS: u32 = 8;
/// ... but never sooner than this.
pub const STALL_FLOOR: Duration = Duration::from_secs(2);

/// Candidates a pick weighs: the rarest of this many wins.
const PICK_SAMPLE: usize = 256;

/// The target side of swarm and pull: decides which chunk to request from
/// which peer. Feed it peers, their have-announcements and the outcome of
/// each request; drain [`Fetcher::poll_action`] after every input.
pub struct Fetcher<P> {
    config: FetchConfig,
    have: HaveSet,
    /// Chunks not to request: they are expected from elsewhere (a file
    /// rebuilt from a delta) and arrive as gifts, or are asked for after
    /// [`Fetcher::undefer`].
    deferred: HaveSet,
    /// Held or deferred: what picks skip.
    blocked: HaveSet,
    peers: BTreeMap<P, Peer>,
    banned: Vec<P>,
    /// Non-origin peers holding each chunk.
    holders: Vec<u32>,
    /// Peers in this target's data centre holding each chunk.
    local_holders: Vec<u32>,
    /// The chunks with a holder in `holders`, and in `local_holders`: the
    /// sets a pick's scan masks with.
    held: HaveSet,
    held_locally: HaveSet,
    /// The chunks this target imports from other data centres when none
    /// of its own holds them ([`FetchConfig::import_rank`]).
    imports: HaveSet,
    /// Requests in flight per chunk (two at most, in the endgame).
    outstanding: BTreeMap<ChunkIndex, Vec<Outstanding<P>>>,
    actions: VecDeque<FetchAction<P>>,
    rng: SmallRng,
    completed: bool,
    /// Failed requests per chunk; a chunk at the limit is not requested.
    failures: BTreeMap<ChunkIndex, u32>,
    /// Smoothed time from request to chunk (1/8 weight per sample, as TCP's SRTT).
    round_trip: Option<Duration>,
    /// Endgame duplicates allowed ([`FetchConfig::endgame_share`]), and made.
    endgame_budget: usize,
    duplicates: usize,
    /// Since when nothing has been in flight while chunks were missing
    /// (see [`STARVED_PATIENCE`]).
    starved_since: Option<Instant>,
}

impl<P: Copy + Ord + Hash + std::fmt::Debug> Fetcher<P> {
    /// A fetcher for a release of `have.len()` chunks, already holding `have`.
    pub fn new(have: HaveSet, config: FetchConfig) -> Self {
        let deferred = HaveSet::empty(have.len());
        Self::deferring(have, deferred, config)
    }

    /// A fetcher that holds `have` and requests none of `deferred` until
    /// [`Fetcher::undefer`]: those come as gifts ([`Fetcher::handle_gift`])
    /// from elsewhere, such as files rebuilt from deltas. It completes
    /// when every chunk is held, deferred ones included.
    pub fn deferring(have: HaveSet, deferred: HaveSet, config: FetchConfig) -> Self {
        assert!(
            config.window >= 1 && config.window <= MAX_WINDOW,
            "window out of range"
        );
        assert_eq!(
            have.len(),
            deferred.len(),
            "deferred set of another release"
        );
        let n = have.len();
        let mut blocked = have.clone();
        for c in deferred.iter() {
            blocked.insert(c);
        }
        // A small transfer (every chunk one of the last) gets a strict cap;
        // a large one keeps the endgame free, which its tail needs when a
        // peer's queue is deep.
        let needed = n - blocked.count();
        let endgame_budget = config
            .small_transfer_duplicates(needed)
            .unwrap_or(usize::MAX);
        let mut f = Self {
            endgame_budget,
            duplicates: 0,
            rng: SmallRng::seed_from_u64(config.seed),
            config,
            have,
            deferred,
            blocked,
            peers: BTreeMap::new(),
            banned: Vec::new(),
            holders: vec![0; n],
            local_holders: vec![0; n],
            held: HaveSet::empty(n),
            held_locally: HaveSet::empty(n),
            imports: HaveSet::empty(n),
            outstanding: BTreeMap::new(),
            actions: VecDeque::new(),
            completed: false,
            failures: BTreeMap::new(),
            round_trip: None,
            starved_since: None,
        };
        f.imports = imports(n, f.config.import_rank);
        f.check_complete();
        f
    }

    /// The tracker re-ranked this data centre's targets (one joined, left
    /// or was banned); see [`FetchConfig::import_rank`].
    pub fn set_import_rank(&mut self, now: Instant, rank: u32, size: u32) {
        assert!(
            rank < size.max(1),
            "rank {rank} outside a data centre of {size}"
        );
        self.rank_as(rank, size);
        self.schedule(now);
    }

    fn rank_as(&mut self, rank: u32, size: u32) {
        self.config.import_rank = (rank, size);
        self.imports = imports(self.have.len(), self.config.import_rank);
    }

    /// What this target holds.
    pub fn have(&self) -> &HaveSet {
        &self.have
    }

    /// True once every chunk is held.
    pub fn is_complete(&self) -> bool {
        self.completed
    }

    /// How many peers other than the origin hold `chunk`, as far as this
    /// fetcher knows.
    pub fn holders(&self, chunk: ChunkIndex) -> u32 {
        self.holders[chunk as usize]
    }

    /// Requests in flight, to every peer.
    pub fn in_flight(&self) -> usize {
        self.outstanding.values().map(Vec::len).sum()
    }

    /// A peer is connected, holding `have`. In pull mode only the origin is used.
    pub fn add_peer(&mut self, now: Instant, peer: P, locality: Locality, have: HaveSet) {
        assert_eq!(have.len(), self.have.len(), "have-set of another release");
        if self.banned.contains(&peer) || self.peers.contains_key(&peer) {
            return;
        }
        if self.config.mode == Mode::Pull && locality != Locality::Origin {
            return;
        }
        assert!(self.peers.len() < MAX_PEERS, "more than {MAX_PEERS} peers");
        for c in have.iter() {
            self.count_holder(c, locality, 1);
        }
        self.peers.insert(
            peer,
            Peer {
                locality,
                have,
                in_flight: 0,
                refused: BTreeMap::new(),
                busy_until: None,
                busy_streak: 0,
                window: self.config.window,
                last_heard: None,
                round_trip: None,
            },
        );
        self.schedule(now);
    }

    /// `peer` stands elsewhere than it was thought to (its labels came
    /// after it did); the origin stays the origin.
    pub fn set_locality(&mut self, now: Instant, peer: P, locality: Locality) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let was = p.locality;
        if was == locality || was == Locality::Origin || locality == Locality::Origin {
            return;
        }
        let held: Vec<ChunkIndex> = p.have.iter().collect();
        for c in held {
            self.count_holder(c, was, -1);
            self.count_holder(c, locality, 1);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.locality = locality;
        }
        self.schedule(now);
    }

    /// A peer is gone; its requests are made elsewhere.
    pub fn remove_peer(&mut self, now: Instant, peer: P) {
        self.forget_peer(peer);
        self.schedule(now);
    }

    /// `peer` announced that it now holds `chunk`.
    pub fn handle_have(&mut self, now: Instant, peer: P, chunk: ChunkIndex) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if chunk as usize >= p.have.len() || !p.have.insert(chunk) {
            return;
        }
        let locality = p.locality;
        self.count_holder(chunk, locality, 1);
        // Only this peer can serve something new; others' choices only narrow.
        self.fill(now, peer);
        self.endgame(now);
    }

    /// `peer` holds all of `chunks` (a have-set, or a batch of
    /// announcements); what was known of it before stays known, so
    /// announcements that overtake each other lose nothing.
    pub fn handle_haves(
        &mut self,
        now: Instant,
        peer: P,
        chunks: impl IntoIterator<Item = ChunkIndex>,
    ) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let locality = p.locality;
        let new: Vec<ChunkIndex> = chunks
            .into_iter()
            .filter(|c| (*c as usize) < p.have.len() && p.have.insert(*c))
            .collect();
        if new.is_empty() {
            return;
        }
        for c in new {
            self.count_holder(c, locality, 1);
        }
        self.fill(now, peer);
        self.endgame(now);
    }

    /// `peer` answered the request for `chunk`; `valid` says whether the
    /// bytes hashed to the chunk's name (the driver checks, then tells).
    pub fn handle_chunk(&mut self, now: Instant, peer: P, chunk: ChunkIndex, valid: bool) {
        let smooth = |rt: Option<Duration>, sample| match rt {
            None => sample,
            Some(rt) => (rt * 7 + sample) / 8,
        };
        if let Some(since) = self.request_time(chunk, peer) {
            let sample = now.saturating_duration_since(since);
            self.round_trip = Some(smooth(self.round_trip, sample));
            if let Some(p) = self.peers.get_mut(&peer) {
                p.round_trip = Some(smooth(p.round_trip, sample));
            }
        }
        self.heard(now, peer);
        let was_outstanding = self.settle(chunk, peer);
        if !valid {
            self.count_failure(chunk);
            self.ban(peer);
        } else if was_outstanding && self.hold(chunk) {
            // Withdraw the endgame duplicate, if any.
            self.withdraw(chunk);
            self.actions.push_back(FetchAction::Announce { chunk });
            self.check_complete();
        }
        if valid {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.busy_streak = 0;
                p.window = (p.window + 1).min(self.config.window);
            }
            // A freed slot at this peer; nothing became newly eligible elsewhere.
            self.fill(now, peer);
            self.endgame(now);
            self.note_starving(now);
        } else {
            self.schedule(now);
        }
    }

    /// `chunk` arrived unasked (the origin handed it out, see
    /// [`Seeder::gift`](super::Seeder::gift)), verified and stored: it is
    /// held, announced, and any request for it withdrawn.
    pub fn handle_gift(&mut self, now: Instant, chunk: ChunkIndex) {
        if chunk as usize >= self.have.len() || !self.hold(chunk) {
            return;
        }
        self.withdraw(chunk);
        self.actions.push_back(FetchAction::Announce { chunk });
        self.check_complete();
        self.schedule(now);
    }

    /// Deferred chunks that are to be requested after all (the delta that
    /// was to rebuild them failed, or never came).
    pub fn undefer(&mut self, now: Instant, chunks: impl IntoIterator<Item = ChunkIndex>) {
        for c in chunks {
            if (c as usize) < self.deferred.len() && self.deferred.contains(c) {
                self.deferred.remove(c);
                if !self.have.contains(c) {
                    self.blocked.remove(c);
                }
            }
        }
        self.schedule(now);
    }

    /// Deferred chunks not held yet.
    pub fn deferred_missing(&self) -> usize {
        self.deferred
            .iter()
            .filter(|c| !self.have.contains(*c))
            .count()
    }

    /// Marks `chunk` held; false if it was.
    fn hold(&mut self, chunk: ChunkIndex) -> bool {
        self.blocked.insert(chunk);
        self.have.insert(chunk)
    }

    /// Cancels every request for `chunk`.
    fn withdraw(&mut self, chunk: ChunkIndex) {
        for o in self.outstanding.remove(&chunk).unwrap_or_default() {
            if let Some(p) = self.peers.get_mut(&o.peer) {
                p.in_flight -= 1;
            }
            self.actions.push_back(FetchAction::Cancel {
                peer: o.peer,
                chunk,
            });
        }
    }

    /// `peer` declined to serve `chunk` (busy, or the origin wants the swarm
    /// to spread it); it is asked of another holder.
    pub fn handle_refused(&mut self, now: Instant, peer: P, chunk: ChunkIndex) {
        self.heard(now, peer);
        if self.settle(chunk, peer) {
            let until = now + self.config.refusal_backoff;
            if let Some(p) = self.peers.get_mut(&peer) {
                p.refused.insert(chunk, until);
            }
        }
        self.schedule(now);
    }

    /// `peer` declined `chunk` because its upload queue is full, and
    /// expects room in `retry_after`; it is asked nothing for that long (at
    /// least [`FetchConfig::busy_backoff`], at most [`MAX_BUSY_WAIT`]).
    pub fn handle_busy(&mut self, now: Instant, peer: P, chunk: ChunkIndex, retry_after: Duration) {
        self.heard(now, peer);
        if self.settle(chunk, peer) {
            if let Some(p) = self.peers.get_mut(&peer) {
                // Swarm peers free up fast and others can be asked meanwhile;
                // the origin is the one every target falls back to.
                let streak = if p.locality == Locality::Origin {
                    p.busy_streak.min(6)
                } else {
                    0
                };
                // The origin is trusted to name its queue; any other peer
                // claiming a long one is asked again after MAX_BUSY_WAIT.
                let most = if p.locality == Locality::Origin {
                    MAX_ORIGIN_BUSY_WAIT
                } else {
                    MAX_BUSY_WAIT
                };
                let backoff = (self.config.busy_backoff * 2u32.pow(streak))
                    .min(MAX_BUSY_BACKOFF.max(self.config.busy_backoff))
                    .max(retry_after.min(most));
                p.busy_streak += 1;
                p.busy_until = Some(now + backoff);
                // It was serving what is still in flight to it, at most.
                p.window = p.window.min(p.in_flight).max(1);
            }
        }
        self.schedule(now);
    }

    /// Gives up requests older than the timeout and ends back-offs; call at
    /// [`Fetcher::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            p.refused.retain(|_, until| *until > now);
            if p.busy_until.is_some_and(|t| t <= now) {
                p.busy_until = None;
            }
        }
        let timeout = self.config.request_timeout;
        let expired: Vec<(ChunkIndex, P)> = self
            .outstanding
            .iter()
            .flat_map(|(c, os)| {
                os.iter()
                    .filter(|o| now.duration_since(o.since) >= timeout)
                    .map(|o| (*c, o.peer))
            })
            .collect();
        for (chunk, peer) in expired {
            self.settle(chunk, peer);
            self.count_failure(chunk);
            self.actions.push_back(FetchAction::Cancel { peer, chunk });
        }
        for (peer, at) in self.stalls() {
            if at <= now {
                self.give_up_on(now, peer);
            }
        }
        if self.starved_until().is_some_and(|t| t <= now) {
            // Whatever its data centre's importers are doing, none of it
            // reaches this target: it imports for itself, as one alone in
            // its data centre would.
            self.rank_as(0, 1);
            self.actions.push_back(FetchAction::ImportAll);
        }
        self.schedule(now);
    }

    /// When a starved swarm target starts importing everything it lacks.
    fn starved_until(&self) -> Option<Instant> {
        let narrow = self.config.mode == Mode::Swarm && self.config.import_rank.1 > 1;
        self.starved_since
            .filter(|_| narrow)
            .map(|t| t + STARVED_PATIENCE)
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<FetchAction<P>> {
        self.actions.pop_front()
    }

    /// When [`Fetcher::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let requests = self
            .outstanding
            .values()
            .flatten()
            .map(|o| o.since + self.config.request_timeout);
        let refusals = self
            .peers
            .values()
            .flat_map(|p| p.refused.values().copied().chain(p.busy_until));
        let endgame = self.in_endgame().then(|| {
            let patience = self.endgame_patience();
            self.outstanding
                .values()
                .filter(|l| l.len() == 1 && !l[0].overdue)
                .map(move |l| l[0].since + patience)
        });
        let stalls = self.stalls().into_iter().map(|(_, at)| at);
        requests
            .chain(refusals)
            .chain(stalls)
            .chain(endgame.into_iter().flatten())
            .chain(self.starved_until())
            .min()
    }

    /// Notes that `peer` answered something.
    fn heard(&mut self, now: Instant, peer: P) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_heard = Some(now);
        }
    }

    /// Every peer that will count as stalled, with when. A peer that has
    /// answered before and has requests in flight stalls when silent for
    /// [`STALL_ROUND_TRIPS`] of its own round trips (at least
    /// [`STALL_FLOOR`], at most the request timeout) since its last answer
    /// or its oldest request in flight, whichever is later.
    /// A peer behind a cut link answers nothing, and its requests would
    /// otherwise wait out the whole request timeout each. One pass over
    /// the requests in flight: this runs after every input.
    fn stalls(&self) -> Vec<(P, Instant)> {
        let mut oldest: BTreeMap<P, Instant> = BTreeMap::new();
        for o in self.outstanding.values().flatten() {
            let t = oldest.entry(o.peer).or_insert(o.since);
            *t = (*t).min(o.since);
        }
        oldest
            .into_iter()
            .filter_map(|(peer, oldest)| {
                let patience = self.stall_patience(peer)?;
                let heard = self.peers.get(&peer)?.last_heard;
                Some((peer, heard.map_or(oldest, |h| h.max(oldest)) + patience))
            })
            .collect()
    }

    /// How long `peer` may be silent, once it has answered a request.
    fn stall_patience(&self, peer: P) -> Option<Duration> {
        let round_trip = self.peers.get(&peer)?.round_trip?;
        Some(
            (round_trip * STALL_ROUND_TRIPS)
                .max(STALL_FLOOR)
                .min(self.config.request_timeout),
        )
    }

    /// `peer` stalled: its requests are withdrawn and made elsewhere (not
    /// counted against the chunks: the fault is the peer's), and it is
    /// asked nothing for as long as it was given, then one request at a
    /// time until it answers again.
    fn give_up_on(&mut self, now: Instant, peer: P) {
        let Some(patience) = self.stall_patience(peer) else {
            return;
        };
        let chunks: Vec<ChunkIndex> = self
            .outstanding
            .iter()
            .filter(|(_, os)| os.iter().any(|o| o.peer == peer))
            .map(|(c, _)| *c)
            .collect();
        for chunk in chunks {
            self.settle(chunk, peer);
            self.actions.push_back(FetchAction::Cancel { peer, chunk });
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.busy_until = Some(now + patience);
            p.window = 1;
            // Silent since now: the next stall is measured from here.
            p.last_heard = Some(now);
        }
    }

    fn request_time(&self, chunk: ChunkIndex, peer: P) -> Option<Instant> {
        self.outstanding
            .get(&chunk)?
            .iter()
            .find(|o| o.peer == peer)
            .map(|o| o.since)
    }

    /// Chunks that may still be requested: neither held nor deferred.
    fn requestable(&self) -> usize {
        self.have.len() - self.blocked.count()
    }

    fn in_endgame(&self) -> bool {
        let missing = self.requestable();
        missing > 0
            && missing <= self.config.endgame_chunks
            && self.outstanding.len() >= missing
            && self.duplicates < self.endgame_budget
    }

    fn endgame_patience(&self) -> Duration {
        let typical = self.round_trip.unwrap_or(self.config.request_timeout / 4);
        (typical * self.config.endgame_slowness).max(ENDGAME_MIN_AGE)
    }

    fn count_holder(&mut self, chunk: ChunkIndex, locality: Locality, delta: i32) {
        let c = chunk as usize;
        if locality != Locality::Origin {
            self.holders[c] = self.holders[c].wrapping_add_signed(delta);
            set_if(&mut self.held, chunk, self.holders[c] > 0);
        }
        if locality.is_local() {
            self.local_holders[c] = self.local_holders[c].wrapping_add_signed(delta);
            set_if(&mut self.held_locally, chunk, self.local_holders[c] > 0);
        }
    }

    /// Removes the request for `chunk` to `peer`; true if there was one.
    fn settle(&mut self, chunk: ChunkIndex, peer: P) -> bool {
        let Some(list) = self.outstanding.get_mut(&chunk) else {
            return false;
        };
        let Some(at) = list.iter().position(|o| o.peer == peer) else {
            return false;
        };
        list.swap_remove(at);
        if list.is_empty() {
            self.outstanding.remove(&chunk);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.in_flight -= 1;
        }
        true
    }

    fn count_failure(&mut self, chunk: ChunkIndex) {
        let n = self.failures.entry(chunk).or_insert(0);
        *n += 1;
        if *n == self.config.max_failures {
            self.actions.push_back(FetchAction::GaveUp { chunk });
        }
    }

    fn given_up(&self, chunk: ChunkIndex) -> bool {
        self.failures
            .get(&chunk)
            .is_some_and(|n| *n >= self.config.max_failures)
    }

    fn ban(&mut self, peer: P) {
        self.forget_peer(peer);
        if !self.banned.contains(&peer) {
            assert!(self.banned.len() < MAX_PEERS, "more than {MAX_PEERS} bans");
            self.banned.push(peer);
            self.actions.push_back(FetchAction::Ban { peer });
        }
    }

    fn forget_peer(&mut self, peer: P) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        for c in p.have.iter() {
            self.count_holder(c, p.locality, -1);
        }
        self.outstanding.retain(|_, list| {
            list.retain(|o| o.peer != peer);
            !list.is_empty()
        });
        // A chunk only this peer held may now be worth asking the origin
        // again: clear refusals so it is reconsidered.
        for q in self.peers.values_mut() {
            q.refused.clear();
        }
    }

    fn check_complete(&mut self) {
        if !self.completed && self.have.is_full() {
            self.completed = true;
            self.actions.push_back(FetchAction::Complete);
        }
    }

    /// Fills every peer's window, closest peers first.
    fn schedule(&mut self, now: Instant) {
        if self.completed {
            self.note_starving(now);
            return;
        }
        let mut order: Vec<(Locality, usize, P)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.has_slot())
            .map(|(id, p)| (p.locality, p.in_flight, *id))
            .collect();
        order.sort();
        for (_, _, peer) in order {
            self.fill(now, peer);
        }
        self.endgame(now);
        self.note_starving(now);
    }

    /// Starts or ends the wait [`STARVED_PATIENCE`] bounds: nothing in
    /// flight while some chunk may be asked for.
    fn note_starving(&mut self, now: Instant) {
        let starved = !self.completed && self.outstanding.is_empty() && self.requestable() > 0;
        self.starved_since = if starved {
            self.starved_since.or(Some(now))
        } else {
            None
        };
    }

    /// Fills one peer's window.
    fn fill(&mut self, now: Instant, peer: P) {
        if self.completed {
            return;
        }
        while self
            .peers
            .get(&peer)
            .is_some_and(|p| p.has_slot() && p.busy_until.is_none())
        {
            let Some(chunk) = self.pick(peer) else { break };
            self.request(now, peer, chunk);
        }
    }

    /// The rarest chunk `peer` may serve, ties broken at random.
    fn pick(&mut self, peer: P) -> Option<ChunkIndex> {
        let p = &self.peers[&peer];
        // Each chunk should cross a data-centre link once, and leave the
        // origin as few times as possible: ask further away only for what
        // no closer peer holds, and from another data centre only what
        // this target imports for its own (`imports`) while none of its
        // data centre holds it.
        let (all_of, none_of): (&[&HaveSet], &[&HaveSet]) = match p.locality {
            _ if self.config.mode != Mode::Swarm => (&[&p.have], &[]),
            Locality::SameZone | Locality::SameDc => (&[&p.have], &[]),
            Locality::OtherDc => (&[&p.have, &self.imports], &[&self.held_locally]),
            Locality::Origin if self.config.origin_in_my_dc => (&[&p.have], &[&self.held]),
            Locality::Origin => (&[&p.have, &self.imports], &[&self.held]),
        };
        let mut best: Option<(u32, ChunkIndex)> = None;
        let mut ties = 0u32;
        let mut seen = 0usize;
        // Rarest of a sample: the scan starts at a random chunk and stops
        // after PICK_SAMPLE candidates, so a pick costs O(sample), not
        // O(chunks) — a 1 GiB release has 16k chunks. With one holder (pull,
        // or the origin) every candidate is as rare: the first one wins.
        let start = self
            .rng
            .random_range(0..self.have.len().max(1) as ChunkIndex);
        for c in self.blocked.missing_from_where(start, all_of, none_of) {
            if seen >= PICK_SAMPLE || best.is_some_and(|(r, _)| r <= 1) {
                break;
            }
            let i = c as usize;
            if p.refused.contains_key(&c) || self.outstanding.contains_key(&c) || self.given_up(c) {
                continue;
            }
            seen += 1;
            let rarity = self.holders[i];
            match best {
                Some((r, _)) if rarity > r => {}
                Some((r, _)) if rarity == r => {
                    ties += 1;
                    if self.rng.random_range(0..=ties) == 0 {
                        best = Some((rarity, c));
                    }
                }
                _ => {
                    best = Some((rarity, c));
                    ties = 0;
                }
            }
        }
        best.map(|(_, c)| c)
    }

    fn request(&mut self, now: Instant, peer: P, chunk: ChunkIndex) {
        self.outstanding
            .entry(chunk)
            .or_default()
            .push(Outstanding {
                peer,
                since: now,
                overdue: false,
            });
        self.peers
            .get_mut(&peer)
            .expect("requesting from a known peer")
            .in_flight += 1;
        self.actions.push_back(FetchAction::Request { peer, chunk });
    }

    /// When every missing chunk is requested and few remain, ask a second
    /// holder for each overdue one, so one slow peer does not hold the
    /// release back.
    fn endgame(&mut self, now: Instant) {
        if !self.in_endgame() {
            return;
        }
        let patience = self.endgame_patience();
        let mut single: Vec<(ChunkIndex, P)> = Vec::new();
        for (c, list) in self.outstanding.iter_mut() {
            if list.len() == 1 && now.saturating_duration_since(list[0].since) >= patience {
                list[0].overdue = true;
                single.push((*c, list[0].peer));
            }
        }
        for (chunk, first) in single {
            let second = self
                .peers
                .iter()
                .filter(|(id, p)| {
                    **id != first
                        && p.have.contains(chunk)
                        && !p.refused.contains_key(&chunk)
                        && p.busy_until.is_none()
                        && p.has_slot()
                })
                .min_by_key(|(_, p)| (p.locality, p.in_flight))
                .map(|(id, _)| *id);
            if let Some(peer) = second {
                if self.duplicates == self.endgame_budget {
                    break;
                }
                self.duplicates += 1;
                self.request(now, peer, chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(f: &mut Fetcher<u32>) -> Vec<FetchAction<u32>> {
        std::iter::from_fn(|| f.poll_action()).collect()
    }

    fn requests(actions: &[FetchAction<u32>]) -> Vec<(u32, ChunkIndex)> {
        actions
            .iter()
            .filter_map(|a| match a {
                FetchAction::Request { peer, chunk } => Some((*peer, *chunk)),
                _ => None,
            })
            .collect()
    }

    /// Without the endgame, which the endgame tests turn on.
    fn config(window: usize) -> FetchConfig {
        FetchConfig {
            window,
            endgame_chunks: 0,
            ..FetchConfig::default()
        }
    }

    #[test]
    fn asks_for_the_rarest_chunk_first() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(4), config(1));
        // Chunks 0-2 have three holders, chunk 3 only peer 9.
        f.add_peer(
            now,
            1,
            Locality::SameZone,
            HaveSet::from_indices(4, [0, 1, 2]),
        );
        f.add_peer(
            now,
            2,
            Locality::SameZone,
            HaveSet::from_indices(4, [0, 1, 2]),
        );
        drain(&mut f);
        f.add_peer(now, 9, Locality::SameZone, HaveSet::full(4));
        assert_eq!(requests(&drain(&mut f)), [(9, 3)]);
    }

    #[test]
    fn keeps_a_window_of_requests_per_peer() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(20), config(4));
        f.add_peer(now, 1, Locality::SameZone, HaveSet::full(20));
        f.add_peer(now, 2, Locality::SameDc, HaveSet::full(20));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.iter().filter(|(p, _)| *p == 1).count(), 4);
        assert_eq!(asked.iter().filter(|(p, _)| *p == 2).count(), 4);
        let distinct: std::collections::HashSet<_> = asked.iter().map(|(_, c)| c).collect();
        assert_eq!(
            distinct.len(),
            8,
            "no chunk is asked twice outside the endgame"
        );
    }

    #[test]
    fn a_busy_peer_gets_fewer_requests_until_it_serves_again() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(20), config(4));
        f.add_peer(now, 1, Locality::SameZone, HaveSet::full(20));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 4);
        // It took two and declined two: its window is the two it took.
        f.handle_busy(now, 1, asked[2].1, Duration::ZERO);
        f.handle_busy(now, 1, asked[3].1, Duration::ZERO);
        let due = f.poll_timeout().unwrap();
        f.handle_timeout(due);
        assert!(requests(&drain(&mut f)).is_empty(), "two still in flight");
        // Each chunk served frees its slot and widens the window by one.
        f.handle_chunk(due, 1, asked[0].1, true);
        assert_eq!(requests(&drain(&mut f)).len(), 2);
        f.handle_chunk(due, 1, asked[1].1, true);
        assert_eq!(requests(&drain(&mut f)).len(), 2);
        // Never beyond the configured window.
        assert_eq!(f.in_flight(), 4);
    }

    /// A peer at `locality` answers busy asking for `wait`, which is
    /// honoured; then for a week, of which only `bound` is.
    fn busy_waits_are_honoured_up_to(locality: Locality, wait: Duration, bound: Duration) {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(4), config(1));
        f.add_peer(now, 1, locality, HaveSet::full(4));
        let asked = requests(&drain(&mut f));
        f.handle_busy(now, 1, asked[0].1, wait);
        let due = now + wait;
        assert_eq!(f.poll_timeout(), Some(due));
        f.handle_timeout(due);
        let again = requests(&drain(&mut f));
        assert_eq!(again.len(), 1);
        f.handle_busy(due, 1, again[0].1, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(f.poll_timeout(), Some(due + bound));
    }

    #[test]
    fn a_busy_peer_is_left_alone_as_long_as_it_asks_within_a_bound() {
        busy_waits_are_honoured_up_to(Locality::SameDc, Duration::from_millis(300), MAX_BUSY_WAIT);
    }

    /// The origin names a turn behind every target waiting for it.
    #[test]
    fn the_origin_may_name_a_turn_hours_away_but_not_days() {
        busy_waits_are_honoured_up_to(
            Locality::Origin,
            Duration::from_secs(3 * 3600),
            MAX_ORIGIN_BUSY_WAIT,
        );
    }

    #[test]
    fn asks_the_origin_only_for_what_no_peer_holds() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(4), config(8));
        f.add_peer(now, 1, Locality::SameZone, HaveSet::from_indices(4, [0, 1]));
        f.add_peer(now, 0, Locality::Origin, HaveSet::full(4));
        let asked = requests(&drain(&mut f));
        let from_origin: Vec<_> = asked
            .iter()
            .filter(|(p, _)| *p == 0)
            .map(|(_, c)| *c)
            .collect();
        assert_eq!(from_origin.len(), 2);
        assert!(from_origin.iter().all(|c| *c >= 2), "{from_origin:?}");
    }

    #[test]
    fn a_gift_is_held_announced_and_no_longer_asked_for() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(2), config(8));
        f.add_peer(now, 0, Locality::Origin, HaveSet::full(2));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 2);
        f.handle_gift(now, 1);
        let actions = drain(&mut f);
        assert!(actions.contains(&FetchAction::Cancel { peer: 0, chunk: 1 }));
        assert!(actions.contains(&FetchAction::Announce { chunk: 1 }));
        assert!(f.have().contains(1) && !f.is_complete());
        assert_eq!(f.in_flight(), 1);
        // A gift of a held chunk, or of one out of range, changes nothing.
        f.handle_gift(now, 1);
        f.handle_gift(now, 9);
        assert!(drain(&mut f).is_empty());
        f.handle_gift(now, 0);
        assert!(drain(&mut f).contains(&FetchAction::Complete));
    }

    #[test]
    fn deferred_chunks_are_not_asked_for_until_undeferred_and_count_for_completion() {
        let now = Instant::now();
        // Chunks 2..6 are to come from a delta.
        let deferred = HaveSet::from_indices(6, 2..6);
        let mut f = Fetcher::deferring(HaveSet::empty(6), deferred, config(8));
        f.add_peer(now, 0, Locality::Origin, HaveSet::full(6));
        let mut asked: Vec<ChunkIndex> = requests(&drain(&mut f)).iter().map(|r| r.1).collect();
        asked.sort();
        assert_eq!(asked, [0, 1]);
        f.handle_chunk(now, 0, 0, true);
        f.handle_chunk(now, 0, 1, true);
        assert!(requests(&drain(&mut f)).is_empty());
        assert!(!f.is_complete(), "the deferred chunks are still missing");
        assert_eq!(f.deferred_missing(), 4);
        // Two arrive rebuilt; the delta of the others failed: asked for now.
        f.handle_gift(now, 2);
        f.handle_gift(now, 3);
        f.undefer(now, [4, 5]);
        let mut asked: Vec<ChunkIndex> = requests(&drain(&mut f)).iter().map(|r| r.1).collect();
        asked.sort();
        assert_eq!(asked, [4, 5]);
        f.handle_chunk(now, 0, 4, true);
        f.handle_chunk(now, 0, 5, true);
        assert!(drain(&mut f).contains(&FetchAction::Complete));
        assert_eq!(f.deferred_missing(), 0);
    }

    #[test]
    fn asks_another_data_centre_only_for_what_none_in_its_own_holds() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(4), config(8));
        f.add_peer(now, 1, Locality::SameDc, HaveSet::from_indices(4, [0]));
        f.add_peer(now, 2, Locality::OtherDc, HaveSet::full(4));
        let asked = requests(&drain(&mut f));
        assert!(asked.contains(&(1, 0)));
        assert!(!asked.contains(&(2, 0)), "{asked:?}");
        assert_eq!(asked.iter().filter(|(p, _)| *p == 2).count(), 3);
    }

    /// Four chunks to fetch, as rank 1 of 2 in its data centre: of
    /// another data centre's peers it imports the odd chunks only.
    fn odd_chunks_importer() -> Fetcher<u32> {
        let cfg = FetchConfig {
            import_rank: (1, 2),
            origin_in_my_dc: false,
            ..config(8)
        };
        Fetcher::new(HaveSet::empty(4), cfg)
    }

    #[test]
    fn only_the_designated_importer_fetches_from_another_data_centre() {
        let now = Instant::now();
        let mut f = odd_chunks_importer();
        f.add_peer(now, 1, Locality::SameDc, HaveSet::empty(4));
        f.add_peer(now, 2, Locality::OtherDc, HaveSet::full(4));
        let mut asked = requests(&drain(&mut f));
        asked.sort();
        assert_eq!(asked, [(2, 1), (2, 3)]);
        // Once the local peer holds chunk 0, it is fetched from there.
        f.handle_have(now, 1, 0);
        assert_eq!(requests(&drain(&mut f)), [(1, 0)]);
        // The importer of chunk 2 left: this target now imports everything.
        f.set_import_rank(now, 0, 1);
        assert_eq!(requests(&drain(&mut f)), [(2, 2)]);
    }

    /// The importer of chunks 0 and 2 is out of this target's reach (no
    /// local peer of its holds them): once it has had nothing to ask for
    /// STARVED_PATIENCE, it imports them itself.
    #[test]
    fn a_target_its_importers_never_reach_imports_for_itself() {
        let now = Instant::now();
        let mut f = odd_chunks_importer();
        f.add_peer(now, 1, Locality::SameDc, HaveSet::empty(4));
        f.add_peer(now, 2, Locality::OtherDc, HaveSet::full(4));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 2);
        for (peer, chunk) in asked {
            f.handle_chunk(now, peer, chunk, true);
        }
        assert!(requests(&drain(&mut f)).is_empty());
        let due = f.poll_timeout().expect("a starved target keeps a deadline");
        assert_eq!(due, now + STARVED_PATIENCE);
        f.handle_timeout(due - Duration::from_millis(1));
        assert!(requests(&drain(&mut f)).is_empty(), "imported too soon");
        f.handle_timeout(due);
        let actions = drain(&mut f);
        assert!(actions.contains(&FetchAction::ImportAll), "{actions:?}");
        let mut asked = requests(&actions);
        asked.sort();
        assert_eq!(asked, [(2, 0), (2, 2)]);
    }

    #[test]
    fn what_this_data_centre_holds_is_not_imported_even_when_its_holder_is_busy() {
        let now = Instant::now();
        let mut f = odd_chunks_importer();
        f.add_peer(now, 1, Locality::SameDc, HaveSet::from_indices(4, [1]));
        assert_eq!(requests(&drain(&mut f)), [(1, 1)]);
        f.handle_busy(now, 1, 1, Duration::from_secs(1));
        assert!(requests(&drain(&mut f)).is_empty());
        // Chunk 1 waits for the local peer; chunk 3 comes from afar.
        f.add_peer(now, 2, Locality::OtherDc, HaveSet::full(4));
        assert_eq!(requests(&drain(&mut f)), [(2, 3)]);
    }

    #[test]
    fn a_peer_placed_again_is_asked_as_what_it_is() {
        let now = Instant::now();
        let mut f = odd_chunks_importer();
        // Peer 2's labels were unknown when it came.
        f.add_peer(now, 2, Locality::OtherDc, HaveSet::full(4));
        let mut asked = requests(&drain(&mut f));
        asked.sort();
        assert_eq!(asked, [(2, 1), (2, 3)]);
        // It stands in this data centre: everything may come from it.
        f.set_locality(now, 2, Locality::SameZone);
        let mut asked = requests(&drain(&mut f));
        asked.sort();
        assert_eq!(asked, [(2, 0), (2, 2)]);
        // Its holdings count once, as local: gone with it, nothing is left.
        f.remove_peer(now, 2);
        assert!(f.local_holders.iter().chain(&f.holders).all(|n| *n == 0));
    }

    #[test]
    fn a_busy_origin_is_left_alone_longer_each_time() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(4), config(1));
        f.add_peer(now, 1, Locality::Origin, HaveSet::full(4));
        let asked = requests(&drain(&mut f));
        f.handle_busy(now, 1, asked[0].1, Duration::ZERO);
        assert!(requests(&drain(&mut f)).is_empty());
        let due = f.poll_timeout().unwrap();
        assert_eq!(due, now + FetchConfig::default().busy_backoff);
        f.handle_timeout(due);
        let again = requests(&drain(&mut f));
        assert_eq!(again.len(), 1);
        // Busy again: twice as long. A chunk served resets the back-off.
        let base = FetchConfig::default().busy_backoff;
        f.handle_busy(due, 1, again[0].1, Duration::ZERO);
        let due2 = f.poll_timeout().unwrap();
        assert_eq!(due2, due + 2 * base);
        f.handle_timeout(due2);
        let third = requests(&drain(&mut f));
        f.handle_chunk(due2, 1, third[0].1, true);
        let next = requests(&drain(&mut f));
        f.handle_busy(due2, 1, next[0].1, Duration::ZERO);
        assert_eq!(f.poll_timeout().unwrap(), due2 + base);
    }

    #[test]
    fn pull_mode_uses_only_the_origin() {
        let now = Instant::now();
        let mut f = Fetcher::new(
            HaveSet::empty(4),
            FetchConfig {
                mode: Mode::Pull,
                ..config(8)
            },
        );
        f.add_peer(now, 1, Locality::SameZone, HaveSet::full(4));
        f.add_peer(now, 0, Locality::Origin, HaveSet::full(4));
        let asked = requests(&drain(&mut f));
        assert_eq!(asked.len(), 4);
        assert!(asked.iter().all(|(p, _)| *p == 0));
    }

    #[test]
    fn bad_chunk_bans_the_peer_and_the_chunk_is_asked_elsewhere() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(1), config(1));
        f.add_peer(now, 1, Locality::SameZone, HaveSet::full(1));
        f.add_peer(now, 2, Locality::SameDc, HaveSet::full(1));
        assert_eq!(requests(&drain(&mut f)), [(1, 0)]);
        f.handle_chunk(now, 1, 0, false);
        let actions = drain(&mut f);
        assert!(actions.contains(&FetchAction::Ban { peer: 1 }));
        assert_eq!(requests(&actions), [(2, 0)]);
        // A banned peer does not come back.
        f.add_peer(now, 1, Locality::SameZone, HaveSet::full(1));
        f.handle_chunk(now, 2, 0, true);
        let actions = drain(&mut f);
        assert_eq!(
            actions,
            [FetchAction::Announce { chunk: 0 }, FetchAction::Complete]
        );
    }

    #[test]
    fn endgame_asks_a_second_peer_for_an_overdue_chunk_and_cancels_the_loser() {
        let start = Instant::now();
        let mut f = Fetcher::new(
            HaveSet::empty(2),
            FetchConfig {
                endgame_chunks: 16,
                endgame_share: 1,
                ..config(1)
            },
        );
        let now = start;
        f.add_peer(now, 1, Locality::SameZone, HaveSet::full(2));
        f.add_peer(now, 2, Locality::SameZone, HaveSet::full(2));
        let first = requests(&drain(&mut f));
        assert_eq!(first.len(), 2);
        // Peer 1 delivers; its slot is free, so the chunk peer 2 still owes
        // is also asked of peer 1.
        let (_, c1) = first.iter().find(|(p, _)| *p == 1).copied().unwrap();
        let (_, c2) = first.iter().find(|(p, _)| *p == 2).copied().unwrap();
        // Peer 1 answers in 10 ms: that is the typical round trip now.
        let now = start + Duration::from_millis(10);
        f.handle_chunk(now, 1, c1, true);
        assert!(requests(&drain(&mut f)).is_empty(), "not overdue yet");
        let due = f.poll_timeout().unwrap();
        assert_eq!(due, start + ENDGAME_MIN_AGE.max(Duration::from_millis(30)));
        f.handle_timeout(due);
        let actions = drain(&mut f);
        assert!(
            actions.contains(&FetchAction::Request { peer: 1, chunk: c2 }),
            "{actions:?}"
        );
        f.handle_chunk(now, 1, c2, true);
        let actions = drain(&mut f);
        assert!(
            actions.contains(&FetchAction::Cancel { peer: 2, chunk: c2 }),
            "{actions:?}"
        );
        assert!(actions.contains(&FetchAction::Complete));
        assert!(f.is_complete());
    }

    #[test]
    fn a_small_transfer_is_never_duplicated_a_large_one_within_its_share() {
        for (chunks, budget) in [(6u32, 0usize), (64, 8)] {
            let start = Instant::now();
            let mut f = Fetcher::new(
                HaveSet::empty(chunks as usize),
                FetchConfig {
                    endgame_chunks: 64,
                    // Half the chunks go to each peer.
                    window: chunks as usize / 2,
                    ..config(1)
                },
            );
            f.add_peer(start, 1, Locality::SameZone, HaveSet::full(chunks as usize));
            f.add_peer(start, 2, Locality::SameZone, HaveSet::full(chunks as usize));
            let first = requests(&drain(&mut f));
            assert_eq!(
                first.iter().filter(|(p, _)| *p == 2).count(),
                chunks as usize / 2
            );
            // Peer 1 answers everything at once; peer 2 never does.
            let mut now = start + Duration::from_millis(10);
            for (p, c) in &first {
                if *p == 1 {
                    f.handle_chunk(now, 1, *c, true);
                }
            }
            let mut duplicates = 0;
            for _ in 0..chunks {
                let actions = drain(&mut f);
                for (p, c) in requests(&actions) {
                    assert_eq!(p, 1);
                    duplicates += 1;
                    f.handle_chunk(now, 1, c, true);
                }
                match f.poll_timeout() {
                    Some(t) if t < start + Duration::from_secs(1) => {
                        now = t;
                        f.handle_timeout(now);
                    }
                    _ => break,
                }
            }
            assert_eq!(duplicates, budget, "{chunks} chunks");
        }
    }

    #[test]
    fn a_chunk_that_keeps_failing_is_given_up() {
        let mut now = Instant::now();
        let cfg = FetchConfig {
            max_failures: 3,
            ..config(1)
        };
        let mut f = Fetcher::new(HaveSet::empty(1), cfg);
        f.add_peer(now, 1, Locality::SameZone, HaveSet::full(1));
        for attempt in 1..=3 {
            assert_eq!(requests(&drain(&mut f)), [(1, 0)], "attempt {attempt}");
            now = f.poll_timeout().unwrap();
            f.handle_timeout(now);
        }
        let actions = drain(&mut f);
        assert!(
            actions.contains(&FetchAction::GaveUp { chunk: 0 }),
            "{actions:?}"
        );
        assert!(requests(&actions).is_empty());
        assert_eq!(f.poll_timeout(), None, "nothing left to wait for");
    }

    #[test]
    fn a_timed_out_request_is_made_again() {
        let start = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(1), config(1));
        f.add_peer(start, 1, Locality::SameZone, HaveSet::full(1));
        assert_eq!(requests(&drain(&mut f)), [(1, 0)]);
        let due = f.poll_timeout().unwrap();
        assert_eq!(due, start + FetchConfig::default().request_timeout);
        f.handle_timeout(due);
        let actions = drain(&mut f);
        assert!(actions.contains(&FetchAction::Cancel { peer: 1, chunk: 0 }));
        assert_eq!(requests(&actions), [(1, 0)]);
    }

    /// A peer cut off (its link down) answers nothing: once it has been
    /// silent for eight of its round trips (at least two seconds), what
    /// is in flight to it is asked of others, long before the request
    /// timeout, and it is left alone for as long.
    #[test]
    fn a_peer_that_falls_silent_has_its_requests_made_elsewhere() {
        let start = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(40), config(4));
        f.add_peer(start, 1, Locality::SameZone, HaveSet::full(40));
        let first = requests(&drain(&mut f));
        assert_eq!(first.len(), 4);
        // It answers each request in 100 ms, then falls silent.
        let mut now = start;
        for (_, chunk) in &first {
            now += Duration::from_millis(100);
            f.handle_chunk(now, 1, *chunk, true);
        }
        let in_flight = requests(&drain(&mut f));
        assert!(!in_flight.is_empty());
        let last_answer = now;
        // Peer 2 holds just what is in flight to peer 1, so nothing is
        // asked of it until peer 1 stalls.
        let held = HaveSet::from_indices(40, in_flight.iter().map(|(_, c)| *c));
        f.add_peer(now, 2, Locality::SameDc, held);
        assert!(requests(&drain(&mut f)).is_empty());
        let due = f.poll_timeout().unwrap();
        assert_eq!(
            due,
            last_answer + STALL_FLOOR,
            "8 × 100 ms is under the floor"
        );
        f.handle_timeout(due);
        let actions = drain(&mut f);
        for (peer, chunk) in in_flight.iter().filter(|(p, _)| *p == 1) {
            assert!(
                actions.contains(&FetchAction::Cancel {
                    peer: *peer,
                    chunk: *chunk
                }),
                "chunk {chunk} withdrawn from the silent peer: {actions:?}"
            );
        }
        let mut again = requests(&actions);
        again.sort();
        let mut expected: Vec<_> = in_flight.iter().map(|(_, c)| (2, *c)).collect();
        expected.sort();
        assert_eq!(again, expected, "asked of the other peer");
        // Not a failure of the chunks: none is given up, and the timeout
        // still counts from their new requests.
        assert!(!actions
            .iter()
            .any(|a| matches!(a, FetchAction::GaveUp { .. })));
        // Left alone for as long, then asked one chunk at a time.
        let back = due + STALL_FLOOR;
        f.handle_timeout(back);
        let retried: Vec<_> = requests(&drain(&mut f))
            .into_iter()
            .filter(|(p, _)| *p == 1)
            .collect();
        assert_eq!(retried.len(), 1, "{retried:?}");
    }

    /// A slow peer that keeps answering is not stalled, however long each
    /// answer takes once its round trip has grown to match.
    #[test]
    fn a_slow_peer_that_keeps_answering_keeps_its_requests() {
        let start = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(400), config(4));
        f.add_peer(start, 1, Locality::SameZone, HaveSet::full(400));
        let mut now = start;
        // Answered in the order asked, one every 1.5 s: a crowded uplink.
        let mut queue = std::collections::VecDeque::new();
        for _ in 0..100 {
            let actions = drain(&mut f);
            assert!(
                !actions
                    .iter()
                    .any(|a| matches!(a, FetchAction::Cancel { .. })),
                "{actions:?}"
            );
            queue.extend(requests(&actions).into_iter().map(|(_, c)| c));
            let chunk = queue.pop_front().expect("a request in flight");
            now += Duration::from_millis(1500);
            assert!(f.poll_timeout().unwrap() > now, "stalled while answering");
            f.handle_chunk(now, 1, chunk, true);
        }
        assert!(!drain(&mut f)
            .iter()
            .any(|a| matches!(a, FetchAction::Cancel { .. })));
    }

    #[test]
    fn refused_chunk_is_asked_again_after_the_back_off() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(1), config(4));
        f.add_peer(now, 0, Locality::Origin, HaveSet::full(1));
        drain(&mut f);
        f.handle_refused(now, 0, 0);
        assert!(requests(&drain(&mut f)).is_empty());
        let due = f.poll_timeout().unwrap();
        assert_eq!(due, now + FetchConfig::default().refusal_backoff);
        f.handle_timeout(due);
        assert_eq!(requests(&drain(&mut f)), [(0, 0)]);
    }

    #[test]
    fn refused_chunk_is_asked_of_another_holder_once_one_appears() {
        let now = Instant::now();
        let mut f = Fetcher::new(HaveSet::empty(1), config(4));
        f.add_peer(now, 0, Locality::Origin, HaveSet::full(1));
        assert_eq!(requests(&drain(&mut f)), [(0, 0)]);
        f.handle_refused(now, 0, 0);
        assert!(
            requests(&drain(&mut f)).is_empty(),
            "not asked of the refusing origin again"
        );
        f.add_peer(now, 5, Locality::SameZone, HaveSet::empty(1));
        f.handle_have(now, 5, 0);
        assert_eq!(requests(&drain(&mut f)), [(5, 0)]);
    }

    #[test]
    fn a_target_that_already_holds_everything_is_complete_at_once() {
        let mut f: Fetcher<u32> = Fetcher::new(HaveSet::full(3), config(1));
        assert!(f.is_complete());
        assert_eq!(drain(&mut f), [FetchAction::Complete]);
    }
}
