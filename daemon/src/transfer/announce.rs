//! When a target tells its peers what it newly holds, and what it tells
//! them: the cadence the daemon keeps and the simulator replays.

use std::time::{Duration, Instant};

use super::ChunkIndex;

/// How often newly held chunks are announced to peers. An announcement
/// is a frame on a stream kept open to each peer; as a request each (at
/// c1be011) it cost more CPU than moving the chunks, and was sent every
/// 2 s. Measured on a 50-target loopback swarm: 2 s gave p99 12.1-13.3 s,
/// 250 ms 11.2-11.6 s, 500 ms 11.3-11.8 s.
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(250);
/// How soon a chunk few other peers hold is announced, and so how often a
/// driver asks [`Announcer::due`]: a swarm multiplies a chunk fastest
/// while it is rare, at the start (chunks straight from the origin) and
/// at the end.
pub const ANNOUNCE_RARE_EVERY: Duration = Duration::from_millis(50);
/// A chunk with fewer known holders than this is rare.
pub const RARE_HOLDERS: u32 = 3;

/// The chunks held since the last announcement of one transfer.
#[derive(Debug)]
pub struct Announcer {
    pending: Vec<ChunkIndex>,
    rare: bool,
    last: Instant,
}

impl Announcer {
    /// Nothing to announce yet; the slow cadence counts from `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            pending: Vec::new(),
            rare: false,
            last: now,
        }
    }

    /// `chunk` is now held; `holders` other peers are known to hold it.
    pub fn held(&mut self, chunk: ChunkIndex, holders: u32) {
        self.pending.push(chunk);
        self.rare |= holders < RARE_HOLDERS;
    }

    /// What to announce at this tick (ticks come every
    /// [`ANNOUNCE_RARE_EVERY`]): everything pending when `at_once`, when a
    /// rare chunk is among it, or when the slow cadence is due (half a
    /// tick of slack keeps it on the tick nearest [`ANNOUNCE_EVERY`]).
    pub fn due(&mut self, now: Instant, at_once: bool) -> Option<Vec<ChunkIndex>> {
        let slow =
            now.saturating_duration_since(self.last) >= ANNOUNCE_EVERY - ANNOUNCE_RARE_EVERY / 2;
        if self.pending.is_empty() || !(at_once || self.rare || slow) {
            return None;
        }
        self.rare = false;
        self.last = now;
        Some(std::mem::take(&mut self.pending))
    }

    /// Whether anything waits to be announced.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_chunks_wait_for_the_slow_cadence_rare_ones_go_at_the_next_tick() {
        let t0 = Instant::now();
        let tick = |n: u32| t0 + ANNOUNCE_RARE_EVERY * n;
        let mut a = Announcer::new(t0);
        a.held(1, RARE_HOLDERS);
        assert_eq!(a.due(tick(1), false), None);
        assert_eq!(a.due(tick(4), false), None);
        // 250 ms after the last: the slow cadence.
        assert_eq!(a.due(tick(5), false), Some(vec![1]));
        a.held(2, RARE_HOLDERS);
        a.held(3, 0);
        assert_eq!(a.due(tick(6), false), Some(vec![2, 3]));
        assert!(a.is_idle());
        assert_eq!(a.due(tick(20), true), None, "nothing to say");
        a.held(4, RARE_HOLDERS);
        assert_eq!(a.due(tick(7), true), Some(vec![4]));
    }
}
