//! The origin in swarm mode: hand each chunk to few targets, let the swarm
//! multiply it.

use std::collections::{BTreeMap, BTreeSet};

use super::{ChunkIndex, HaveSet};

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
/// or, when its uplink would otherwise idle, while fewer than `idle_copies`
/// do. So the origin's egress stays near `min_copies` times the release,
/// and its spare capacity still goes to the rarest chunks.
pub struct Seeder<P> {
    copies: Vec<u32>,
    targets: BTreeMap<P, HaveSet>,
    sending: BTreeSet<(P, ChunkIndex)>,
    min_copies: u32,
    idle_copies: u32,
    /// Refusals per (target, chunk), to serve a chunk a target keeps asking for.
    refused: BTreeMap<(P, ChunkIndex), u32>,
}

/// A target asks the origin for a chunk only when no peer it knows holds
/// it; after this many refusals the origin serves it anyway, so a lost
/// announcement or a banned holder cannot stall a target.
pub const SERVE_AFTER_REFUSALS: u32 = 4;

/// (target, chunk) refusals remembered; beyond, the oldest are forgotten.
const MAX_REFUSALS: usize = 1 << 16;

impl<P: Copy + Ord> Seeder<P> {
    /// A seeder for a release of `chunks` chunks.
    pub fn new(chunks: usize, min_copies: u32, idle_copies: u32) -> Self {
        assert!(
            min_copies >= 1 && idle_copies >= min_copies,
            "copy limits out of order"
        );
        Self {
            copies: vec![0; chunks],
            targets: BTreeMap::new(),
            sending: BTreeSet::new(),
            min_copies,
            idle_copies,
            refused: BTreeMap::new(),
        }
    }

    /// A target joined, holding `have`.
    pub fn add_target(&mut self, peer: P, have: HaveSet) {
        self.remove_target(peer);
        for c in have.iter() {
            self.copies[c as usize] += 1;
        }
        self.targets.insert(peer, have);
    }

    /// A target left: its copies, and the sends to it, no longer count.
    pub fn remove_target(&mut self, peer: P) {
        self.refused.retain(|(p, _), _| *p != peer);
        if let Some(have) = self.targets.remove(&peer) {
            for c in have.iter() {
                self.copies[c as usize] -= 1;
            }
        }
        let gone: Vec<_> = self
            .sending
            .range((peer, 0)..=(peer, ChunkIndex::MAX))
            .copied()
            .collect();
        for (p, c) in gone {
            self.sending.remove(&(p, c));
            self.copies[c as usize] -= 1;
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
            self.copies[chunk as usize] += 1;
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
        let limit = if uplink_idle {
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
        self.copies[chunk as usize] += 1;
        ServeDecision::Serve
    }

    /// A send did not arrive (cancelled, or the target went away).
    pub fn handle_send_failed(&mut self, peer: P, chunk: ChunkIndex) {
        if self.sending.remove(&(peer, chunk)) {
            self.copies[chunk as usize] -= 1;
        }
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
        // Idle, a second copy is allowed, not a third.
        assert_eq!(s.handle_request(2, 0, true), ServeDecision::Serve);
        s.add_target(3u32, HaveSet::empty(2));
        assert_eq!(s.handle_request(3, 0, true), ServeDecision::Refuse);
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
