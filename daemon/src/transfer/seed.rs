//! The origin in swarm mode: hand each chunk to few targets, let the swarm
//! multiply it.

use std::collections::{BTreeMap, BTreeSet};

use super::{ChunkIndex, FetchConfig, HaveSet};

/// The origin's answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeDecision {
    /// Send the chunk.
    Serve,
    /// Decline: enough targets hold or are getting it; ask them.
    Refuse,
}

/// Decides which requests the origin serves in swarm mode. It tracks every
/// target's have-set (the tracker's view) and the copies it is sending, and
/// serves a chunk while fewer than `min_copies` targets hold or receive it —
/// or, when its uplink would otherwise idle and every chunk has its
/// `min_copies`, while fewer than `idle_copies` do. So the origin's egress
/// stays near `min_copies` times the release, no extra copy delays a chunk
/// the fleet has not got at all, and spare capacity at the end still goes
/// to the rarest chunks.
pub struct Seeder<P> {
    copies: Vec<u32>,
    /// Chunks with fewer than `min_copies` copies.
    short: usize,
    targets: BTreeMap<P, HaveSet>,
    sending: BTreeSet<(P, ChunkIndex)>,
    min_copies: u32,
    idle_copies: u32,
    /// Refusals per (target, chunk), to serve a chunk a target keeps asking for.
    refused: BTreeMap<(P, ChunkIndex), u32>,
    /// Where [`Seeder::gift`] looks for a short chunk next, which target
    /// it favours on a tie, and how many copies beyond `min_copies` it has
    /// handed out.
    cursor: usize,
    turn: usize,
    extra: usize,
    /// The most copies beyond `min_copies` [`Seeder::gift`] hands out;
    /// fixed the first time it may, from the chunks some target lacks then.
    extra_budget: Option<usize>,
}

/// A target asks the origin for a chunk only when no peer it knows holds
/// it; after this many refusals the origin serves it anyway, so a lost
/// announcement or a banned holder cannot stall a target.
pub const SERVE_AFTER_REFUSALS: u32 = 4;

/// (target, chunk) refusals remembered; beyond, the oldest are forgotten.
const MAX_REFUSALS: usize = 1 << 16;

/// Chunks [`Seeder::gift`] weighs when it looks for the rarest.
const GIFT_SAMPLE: usize = 1024;

impl<P: Copy + Ord> Seeder<P> {
    /// A seeder for a release of `chunks` chunks. With `idle_copies`
    /// equal to `min_copies` the origin sends no extra copy, served or
    /// handed out, however idle its uplink: the fewest bytes rather than
    /// the soonest end (a patch's deltas, whose bytes are the point).
    pub fn new(chunks: usize, min_copies: u32, idle_copies: u32) -> Self {
        assert!(
            min_copies >= 1 && idle_copies >= min_copies,
            "copy limits out of order"
        );
        Self {
            copies: vec![0; chunks],
            short: chunks,
            targets: BTreeMap::new(),
            sending: BTreeSet::new(),
            min_copies,
            idle_copies,
            refused: BTreeMap::new(),
            cursor: 0,
            turn: 0,
            extra: 0,
            extra_budget: None,
        }
    }

    /// A target joined, holding `have`.
    pub fn add_target(&mut self, peer: P, have: HaveSet) {
        self.remove_target(peer);
        for c in have.iter() {
            self.add_copy(c);
        }
        self.targets.insert(peer, have);
    }

    /// A target left: its copies, and the sends to it, no longer count.
    pub fn remove_target(&mut self, peer: P) {
        self.refused.retain(|(p, _), _| *p != peer);
        if let Some(have) = self.targets.remove(&peer) {
            for c in have.iter() {
                self.drop_copy(c);
            }
        }
        let gone: Vec<_> = self
            .sending
            .range((peer, 0)..=(peer, ChunkIndex::MAX))
            .copied()
            .collect();
        for (p, c) in gone {
            self.sending.remove(&(p, c));
            self.drop_copy(c);
        }
    }

    /// A target announced it holds `chunk`.
    pub fn handle_have(&mut self, peer: P, chunk: ChunkIndex) {
        let Some(have) = self.targets.get_mut(&peer) else {
            return;
        };
        if chunk as usize >= have.len() || !have.insert(chunk) {
            return;
        }
        // A copy we sent is already counted.
        if !self.sending.remove(&(peer, chunk)) {
            self.add_copy(chunk);
        }
    }

    /// `peer` asks for `chunk`; `uplink_idle` says the origin has nothing
    /// else queued. A served chunk counts as a copy from now on.
    pub fn handle_request(
        &mut self,
        peer: P,
        chunk: ChunkIndex,
        uplink_idle: bool,
    ) -> ServeDecision {
        let Some(copies) = self.copies.get(chunk as usize).copied() else {
            return ServeDecision::Refuse;
        };
        let limit = if uplink_idle && self.short == 0 {
            self.idle_copies
        } else {
            self.min_copies
        };
        if !self.targets.contains_key(&peer) || self.sending.contains(&(peer, chunk)) {
            return ServeDecision::Refuse;
        }
        let asked = self.refused.get(&(peer, chunk)).copied().unwrap_or(0);
        if copies >= limit && asked < SERVE_AFTER_REFUSALS {
            if self.refused.len() >= MAX_REFUSALS {
                self.refused.pop_first();
            }
            self.refused.insert((peer, chunk), asked + 1);
            return ServeDecision::Refuse;
        }
        self.refused.remove(&(peer, chunk));
        self.sending.insert((peer, chunk));
        self.add_copy(chunk);
        ServeDecision::Serve
    }

    /// A chunk the origin should send unasked, and to whom. Targets ask
    /// the origin only for what none of their peers holds, and cannot tell
    /// a chunk nobody holds from one their few peers lack; the origin can.
    /// So it hands out, first, each chunk with fewer than `min_copies`
    /// copies; then, while `uplink_idle` says nothing else waits for its
    /// uplink, a copy of the rarest chunk, until each has a quarter of
    /// the targets or it has sent what the targets lacked once more that
    /// way (one copy in eight of a small transfer, as
    /// [`FetchConfig::small_transfer_duplicates`] says) — the
    /// last chunks it sends otherwise spread from a single holder while
    /// its uplink idles. Each goes to the target with the fewest sends from
    /// the origin under way, and counts as a copy from now on, as a served
    /// request does.
    pub fn gift(&mut self, uplink_idle: bool) -> Option<(P, ChunkIndex)> {
        if self.targets.is_empty() {
            return None;
        }
        let n = self.copies.len();
        let (chunk, extra) = if self.short > 0 {
            let c = (0..n)
                .map(|i| ((self.cursor + i) % n) as ChunkIndex)
                .find(|c| self.copies[*c as usize] < self.min_copies)?;
            self.cursor = (c as usize + 1) % n;
            (c, false)
        } else {
            let enough = (self.targets.len() as u32 / 4).max(self.min_copies + 1);
            // No extra copy where none is allowed (see `Seeder::new`).
            if !uplink_idle || self.idle_copies == self.min_copies {
                return None;
            }
            if self.extra >= self.extra_budget() {
                return None;
            }
            // The rarest of a sample from a rotating start: a pick costs
            // O(sample), not O(chunks), and every chunk comes round.
            let (copies, c) = (0..n.min(GIFT_SAMPLE))
                .map(|i| {
                    let c = (self.cursor + i) % n;
                    (self.copies[c], c as ChunkIndex)
                })
                .min()?;
            if copies >= enough {
                self.cursor = (self.cursor + GIFT_SAMPLE) % n;
                return None;
            }
            (c, true)
        };
        // Ties go round the targets in turn: the first in turn with the
        // fewest sends, so a walk from the turn stops at the first with
        // none (a walk of every target per gift cost a fleet of 10,000
        // a sixth of the coordinator's CPU).
        let start = self.turn % self.targets.len();
        let in_turn = self.targets.iter().enumerate().skip(start);
        let mut best: Option<(usize, usize, P)> = None;
        for (i, (p, have)) in in_turn.chain(self.targets.iter().enumerate().take(start)) {
            if have.contains(chunk) || self.sending.contains(&(*p, chunk)) {
                continue;
            }
            let sends = self.sending.range((*p, 0)..=(*p, ChunkIndex::MAX)).count();
            if best.is_none_or(|(least, _, _)| sends < least) {
                best = Some((sends, i, *p));
                if sends == 0 {
                    break;
                }
            }
        }
        let (_, turn, peer) = best?;
        self.turn = turn + 1;
        // Only a copy that goes out spends the budget.
        self.extra += usize::from(extra);
        self.sending.insert((peer, chunk));
        self.add_copy(chunk);
        Some((peer, chunk))
    }

    /// The most extra copies: as many as the chunks some target lacks when
    /// first asked (once per run: a pass over the chunks), a share of them
    /// in a small transfer.
    fn extra_budget(&mut self) -> usize {
        *self.extra_budget.get_or_insert_with(|| {
            let targets = self.targets.len() as u32;
            let missing = self.copies.iter().filter(|c| **c < targets).count();
            // A small transfer is capped as the targets' endgame is: an
            // extra copy races the one a target already fetches from a
            // peer (measured with `convoy bench --nodes 10 --size 16MiB
            // --uplink 2MiB --change 1 --modes swarm`: uncapped, one target
            // in some runs received 1.17-1.56x the update).
            FetchConfig::default()
                .small_transfer_duplicates(missing)
                .unwrap_or(missing)
        })
    }

    /// A send did not arrive (cancelled, or the target went away).
    pub fn handle_send_failed(&mut self, peer: P, chunk: ChunkIndex) {
        if self.sending.remove(&(peer, chunk)) {
            self.drop_copy(chunk);
        }
    }

    fn add_copy(&mut self, chunk: ChunkIndex) {
        let c = &mut self.copies[chunk as usize];
        *c += 1;
        if *c == self.min_copies {
            self.short -= 1;
        }
    }

    fn drop_copy(&mut self, chunk: ChunkIndex) {
        let c = &mut self.copies[chunk as usize];
        if *c == self.min_copies {
            self.short += 1;
        }
        *c -= 1;
    }

    /// Whether `peer` is a target of this seeder.
    pub fn has_target(&self, peer: P) -> bool {
        self.targets.contains_key(&peer)
    }

    /// Targets that hold or are receiving `chunk`.
    pub fn copies(&self, chunk: ChunkIndex) -> u32 {
        self.copies[chunk as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_a_chunk_once_then_refuses_while_busy() {
        let mut s = Seeder::new(2, 1, 2);
        s.add_target(1u32, HaveSet::empty(2));
        s.add_target(2u32, HaveSet::empty(2));
        assert_eq!(s.handle_request(1, 0, false), ServeDecision::Serve);
        assert_eq!(s.handle_request(2, 0, false), ServeDecision::Refuse);
        assert_eq!(s.handle_request(2, 1, false), ServeDecision::Serve);
        // Idle, and every chunk sent once: a second copy is allowed, not a
        // third.
        assert_eq!(s.handle_request(2, 0, true), ServeDecision::Serve);
        s.add_target(3u32, HaveSet::empty(2));
        assert_eq!(s.handle_request(3, 0, true), ServeDecision::Refuse);
    }

    #[test]
    fn no_second_copy_while_a_chunk_has_none() {
        let mut s = Seeder::new(2, 1, 2);
        s.add_target(1u32, HaveSet::empty(2));
        s.add_target(2u32, HaveSet::empty(2));
        assert_eq!(s.handle_request(1, 0, true), ServeDecision::Serve);
        // Chunk 1 has no copy yet: idle or not, chunk 0 waits for the swarm.
        assert_eq!(s.handle_request(2, 0, true), ServeDecision::Refuse);
        assert_eq!(s.handle_request(1, 1, true), ServeDecision::Serve);
        assert_eq!(s.handle_request(2, 0, true), ServeDecision::Serve);
        // A lost send makes chunk 1 short again.
        s.handle_send_failed(1, 1);
        assert_eq!(s.handle_request(2, 1, false), ServeDecision::Serve);
        s.remove_target(2);
        assert_eq!(s.copies(0), 1);
        assert_eq!(s.handle_request(1, 1, true), ServeDecision::Serve);
    }

    #[test]
    fn without_idle_copies_each_chunk_goes_out_once() {
        let n = 100;
        let mut s = Seeder::new(n, 1, 1);
        for t in 0..20u32 {
            s.add_target(t, HaveSet::empty(n));
        }
        for c in 0..n as ChunkIndex {
            assert_eq!(s.gift(true).map(|g| g.1), Some(c));
        }
        // Every chunk has its copy: none handed out or served again while
        // the swarm spreads them, however idle the uplink (with idle
        // copies allowed, the rarest would get more: see below).
        assert_eq!(s.gift(true), None);
        assert_eq!(s.handle_request(7, 0, true), ServeDecision::Refuse);
        // A target that keeps asking is served in the end (a lost
        // announcement must not stall it).
        for _ in 1..SERVE_AFTER_REFUSALS {
            assert_eq!(s.handle_request(7, 0, true), ServeDecision::Refuse);
        }
        assert_eq!(s.handle_request(7, 0, true), ServeDecision::Serve);
    }

    #[test]
    fn gifts_cover_every_chunk_once_spread_over_the_targets() {
        let mut s = Seeder::new(4, 1, 2);
        assert_eq!(s.gift(true), None, "no target to give to");
        s.add_target(1u32, HaveSet::empty(4));
        s.add_target(2u32, HaveSet::from_indices(4, [1]));
        assert_eq!(s.handle_request(2, 0, false), ServeDecision::Serve);
        // Chunks 0 and 1 have their copy: 2 and 3 remain, one to each
        // target (2 already receives chunk 0, so 1 gets the first).
        assert_eq!(s.gift(false), Some((1, 2)));
        assert_eq!(s.gift(false), Some((2, 3)));
        // Every chunk has a copy: more only while the uplink idles.
        assert_eq!(s.gift(false), None);
        // A gift that did not arrive is given again.
        s.handle_send_failed(2, 3);
        assert_eq!(s.gift(false), Some((1, 3)));
        // Delivered gifts are announced like anything else.
        s.handle_have(1, 3);
        assert_eq!(s.copies(3), 1);
        assert_eq!(s.handle_request(2, 3, false), ServeDecision::Refuse);
    }

    #[test]
    fn an_idle_origin_gives_the_rarest_chunks_more_copies_within_a_budget() {
        // 20 targets: a quarter is 5 copies. Of 100 chunks, chunk 0 has 5
        // copies, the others 4: each of those gets one more, rarest first.
        let n = 100;
        let mut s = Seeder::new(n, 1, 2);
        for t in 0..20u32 {
            let have = match t {
                0..4 => HaveSet::full(n),
                4 => HaveSet::from_indices(n, [0]),
                _ => HaveSet::empty(n),
            };
            s.add_target(t, have);
        }
        assert_eq!(s.gift(false), None, "only while the uplink idles");
        let (to, chunk) = s.gift(true).unwrap();
        assert_eq!(chunk, 1);
        assert!(to >= 4, "to a target that lacks it: {to}");
        for c in 2..n as ChunkIndex {
            assert_eq!(s.gift(true).map(|g| g.1), Some(c));
        }
        assert_eq!(s.gift(true), None, "every chunk has a quarter");
        // 40 targets, one copy each: the budget (what they lack once
        // more) ends it first.
        let mut s = Seeder::new(n, 1, 2);
        s.add_target(0u32, HaveSet::full(n));
        for t in 1..40u32 {
            s.add_target(t, HaveSet::empty(n));
        }
        for _ in 0..n {
            assert!(s.gift(true).is_some());
        }
        assert_eq!(s.gift(true), None);
    }

    #[test]
    fn a_small_transfer_gets_few_extra_copies() {
        // Updates of 6 and of 64 missing chunks, among 12 targets: one
        // extra copy in eight, so none for 6 and 8 for 64.
        for (missing, budget) in [(6usize, 0usize), (64, 8)] {
            let n = 200;
            let mut s = Seeder::new(n, 1, 2);
            let held = HaveSet::from_indices(n, (missing as ChunkIndex)..n as ChunkIndex);
            s.add_target(0u32, HaveSet::full(n));
            for t in 1..12u32 {
                s.add_target(t, held.clone());
            }
            let extra = std::iter::from_fn(|| s.gift(true)).take(1000).count();
            assert_eq!(extra, budget, "{missing} missing");
        }
    }

    #[test]
    fn a_chunk_asked_for_again_and_again_is_served() {
        let mut s = Seeder::new(1, 1, 1);
        s.add_target(1u32, HaveSet::empty(1));
        s.add_target(2u32, HaveSet::full(1));
        for _ in 0..SERVE_AFTER_REFUSALS {
            assert_eq!(s.handle_request(1, 0, false), ServeDecision::Refuse);
        }
        assert_eq!(s.handle_request(1, 0, false), ServeDecision::Serve);
    }

    #[test]
    fn a_delivered_copy_is_counted_once() {
        let mut s = Seeder::new(1, 1, 1);
        s.add_target(1u32, HaveSet::empty(1));
        s.handle_request(1, 0, false);
        s.handle_have(1, 0);
        assert_eq!(s.copies(0), 1);
    }

    #[test]
    fn copies_of_a_departed_target_no_longer_count() {
        let mut s = Seeder::new(1, 1, 1);
        s.add_target(1u32, HaveSet::full(1));
        s.add_target(2u32, HaveSet::empty(1));
        assert_eq!(s.handle_request(2, 0, false), ServeDecision::Refuse);
        s.remove_target(1);
        assert_eq!(s.handle_request(2, 0, false), ServeDecision::Serve);
        s.handle_send_failed(2, 0);
        assert_eq!(s.copies(0), 0);
    }

    #[test]
    fn unknown_targets_and_chunks_are_refused() {
        let mut s = Seeder::new(1, 1, 1);
        assert_eq!(s.handle_request(9u32, 0, true), ServeDecision::Refuse);
        s.add_target(1u32, HaveSet::empty(1));
        assert_eq!(s.handle_request(1, 7, true), ServeDecision::Refuse);
    }
}
