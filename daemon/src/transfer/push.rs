//! The origin in push mode: each target gets exactly the chunks it lacks,
//! K targets at a time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{ChunkIndex, HaveSet};

/// Tuning of a [`Pusher`].
#[derive(Clone, Debug)]
pub struct PushConfig {
    /// Targets being sent to at once (K).
    pub parallel_targets: usize,
    /// Chunks in flight per target.
    pub window: usize,
    /// Sends of one chunk to one target before the target is given up.
    pub max_attempts: u32,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            parallel_targets: 4,
            window: 8,
            max_attempts: 3,
        }
    }
}

/// What a [`Pusher`] wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushAction<P> {
    /// Send `chunk` to `peer`.
    Send {
        /// The target.
        peer: P,
        /// The chunk.
        chunk: ChunkIndex,
    },
    /// `peer` holds every chunk.
    Done {
        /// The target.
        peer: P,
    },
    /// `peer` rejected the same chunk `max_attempts` times, or went away.
    Failed {
        /// The target.
        peer: P,
    },
}

struct Active {
    to_send: VecDeque<ChunkIndex>,
    in_flight: BTreeSet<ChunkIndex>,
    attempts: BTreeMap<ChunkIndex, u32>,
}

/// Schedules the staging-diff push.
pub struct Pusher<P> {
    config: PushConfig,
    waiting: VecDeque<(P, Vec<ChunkIndex>)>,
    active: BTreeMap<P, Active>,
    actions: VecDeque<PushAction<P>>,
}

impl<P: Copy + Ord> Pusher<P> {
    /// A pusher with no targets yet.
    pub fn new(config: PushConfig) -> Self {
        assert!(config.parallel_targets >= 1 && config.window >= 1 && config.max_attempts >= 1);
        Self {
            config,
            waiting: VecDeque::new(),
            active: BTreeMap::new(),
            actions: VecDeque::new(),
        }
    }

    /// Queues `peer`, which holds `have`, for the chunks it lacks.
    pub fn add_target(&mut self, peer: P, have: &HaveSet) {
        self.waiting.push_back((peer, have.missing().collect()));
        self.fill();
    }

    /// `peer` stored `chunk` after verifying it.
    pub fn handle_delivered(&mut self, peer: P, chunk: ChunkIndex) {
        if let Some(a) = self.active.get_mut(&peer) {
            a.in_flight.remove(&chunk);
        }
        self.fill();
    }

    /// `peer` received `chunk` damaged; it is sent again, up to the limit.
    pub fn handle_rejected(&mut self, peer: P, chunk: ChunkIndex) {
        let max = self.config.max_attempts;
        let Some(a) = self.active.get_mut(&peer) else {
            return;
        };
        if !a.in_flight.remove(&chunk) {
            return;
        }
        if a.attempts.get(&chunk).copied().unwrap_or(1) >= max {
            self.active.remove(&peer);
            self.actions.push_back(PushAction::Failed { peer });
        } else {
            a.to_send.push_front(chunk);
        }
        self.fill();
    }

    /// `peer` went away; the next target takes its slot.
    pub fn remove_target(&mut self, peer: P) {
        let was_active = self.active.remove(&peer).is_some();
        let before = self.waiting.len();
        self.waiting.retain(|(p, _)| *p != peer);
        if was_active || self.waiting.len() != before {
            self.actions.push_back(PushAction::Failed { peer });
        }
        self.fill();
    }

    /// Targets being sent to now.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// True when no target is waiting or being sent to.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty()
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<PushAction<P>> {
        self.actions.pop_front()
    }

    fn fill(&mut self) {
        // Retire finished targets, admit waiting ones, then top up windows.
        let done: Vec<P> = self
            .active
            .iter()
            .filter(|(_, a)| a.to_send.is_empty() && a.in_flight.is_empty())
            .map(|(p, _)| *p)
            .collect();
        for peer in done {
            self.active.remove(&peer);
            self.actions.push_back(PushAction::Done { peer });
        }
        while self.active.len() < self.config.parallel_targets {
            let Some((peer, missing)) = self.waiting.pop_front() else {
                break;
            };
            if missing.is_empty() {
                self.actions.push_back(PushAction::Done { peer });
                continue;
            }
            let active = Active {
                to_send: missing.into(),
                in_flight: BTreeSet::new(),
                attempts: BTreeMap::new(),
            };
            self.active.insert(peer, active);
        }
        for (peer, a) in &mut self.active {
            while a.in_flight.len() < self.config.window {
                let Some(chunk) = a.to_send.pop_front() else {
                    break;
                };
                a.in_flight.insert(chunk);
                *a.attempts.entry(chunk).or_insert(0) += 1;
                self.actions
                    .push_back(PushAction::Send { peer: *peer, chunk });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut Pusher<u32>) -> Vec<PushAction<u32>> {
        std::iter::from_fn(|| p.poll_action()).collect()
    }

    #[test]
    fn sends_only_missing_chunks_to_k_targets_at_a_time() {
        let mut p = Pusher::new(PushConfig {
            parallel_targets: 2,
            window: 10,
            max_attempts: 3,
        });
        for t in 0..3 {
            p.add_target(t, &HaveSet::from_indices(4, [0, 1]));
        }
        let sends = drain(&mut p);
        assert_eq!(p.active(), 2);
        assert_eq!(
            sends,
            [
                PushAction::Send { peer: 0, chunk: 2 },
                PushAction::Send { peer: 0, chunk: 3 },
                PushAction::Send { peer: 1, chunk: 2 },
                PushAction::Send { peer: 1, chunk: 3 },
            ]
        );
        p.handle_delivered(0, 2);
        p.handle_delivered(0, 3);
        let next = drain(&mut p);
        assert_eq!(next[0], PushAction::Done { peer: 0 });
        assert!(next.contains(&PushAction::Send { peer: 2, chunk: 2 }));
    }

    #[test]
    fn a_damaged_chunk_is_resent_then_the_target_given_up() {
        let mut p = Pusher::new(PushConfig {
            parallel_targets: 1,
            window: 1,
            max_attempts: 2,
        });
        p.add_target(7, &HaveSet::empty(1));
        assert_eq!(drain(&mut p), [PushAction::Send { peer: 7, chunk: 0 }]);
        p.handle_rejected(7, 0);
        assert_eq!(drain(&mut p), [PushAction::Send { peer: 7, chunk: 0 }]);
        p.handle_rejected(7, 0);
        assert_eq!(drain(&mut p), [PushAction::Failed { peer: 7 }]);
        assert!(p.is_idle());
    }

    #[test]
    fn a_target_holding_everything_is_done_at_once() {
        let mut p = Pusher::new(PushConfig::default());
        p.add_target(1, &HaveSet::full(3));
        assert_eq!(drain(&mut p), [PushAction::Done { peer: 1 }]);
    }
}
