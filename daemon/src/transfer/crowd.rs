//! When a busy server answers "wait", and for how long: the rule the
//! daemon's chunk serving ([`crate::net::serve`]) and the simulator's
//! origin ([`super::sim`]) share.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Serves queued beyond this (at the upload cap) are answered busy.
const MAX_UPLOAD_BACKLOG: Duration = Duration::from_millis(500);
/// Serves reading or waiting at once, whatever the cap.
pub const MAX_SERVES: usize = 128;
/// Whether a server with `backlog` of uploads queued at its cap and
/// `serving` serves reading or waiting answers a new request busy, and if
/// so how long the asker is told to wait: the rule of [`Chunks::busy`],
/// which the simulator's origin follows too. Without it, a server with
/// more requests than it can send within the askers' timeout sends none in
/// time: each times out in the queue and is made again at its tail.
pub fn busy_for(backlog: Duration, serving: usize) -> Option<Duration> {
    if serving >= MAX_SERVES {
        return Some(Duration::ZERO);
    }
    (backlog > MAX_UPLOAD_BACKLOG).then(|| backlog - MAX_UPLOAD_BACKLOG)
}

/// How a busy server tells an asker to wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Its turn after the askers already waiting ([`Crowd`]), where the
    /// server keeps one: the origin's pulling targets, which have nowhere
    /// else to go.
    Turn,
    /// The backlog's excess ([`busy_for`]): a swarm's targets, which find
    /// most chunks at their peers meanwhile and come to the origin for
    /// what no peer holds. Told turns minutes away, 10,000 simulated
    /// targets lost the origin as that last resort: the few chunks whose
    /// importers had no neighbour in the origin's data centre crossed to
    /// the other nine only at their importers' turns, 400 s after the
    /// rest (p99 4.2× the bound, 256 MiB in 10 dcs).
    Backlog,
}

/// The askers a server has told to wait and not served since, so that
/// each is told to come back after its turn: with N askers all told the
/// same short wait, a lone origin in pull mode answered every one of
/// them busy about twice a second (1,000 targets: 31.8M simulated events
/// for 256,000 chunks, 98% of them busy answers).
#[derive(Debug)]
pub struct Crowd<P> {
    /// Each waiting asker and when it was told to come back.
    waiting: HashMap<P, Instant>,
    /// Size after the last sweep of askers long overdue.
    swept: usize,
}

/// An asker that has not come back this long after its turn is forgotten.
const CROWD_GRACE: Duration = Duration::from_secs(30);

impl<P: std::hash::Hash + Eq + Copy> Default for Crowd<P> {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
            swept: 0,
        }
    }
}

impl<P: std::hash::Hash + Eq + Copy> Crowd<P> {
    /// Whether `peer`'s request is answered busy ([`busy_for`]), and for
    /// how long: the backlog's excess plus a serve's share of the backlog
    /// for every other asker already waiting.
    pub fn busy(
        &mut self,
        now: Instant,
        peer: P,
        backlog: Duration,
        serving: usize,
    ) -> Option<Duration> {
        let Some(excess) = busy_for(backlog, serving) else {
            self.waiting.remove(&peer);
            return None;
        };
        // Back at its turn: served, though the queue is over the mark (the
        // askers before it were let in the same way, so it is about as
        // long as when the turn was given). Sent to the tail again instead,
        // an asker found the queue just over the mark about every other
        // time, and 10,000 pulling targets left the origin idle 43% of
        // the time.
        if serving < MAX_SERVES && self.waiting.get(&peer).is_some_and(|back| *back <= now) {
            self.waiting.remove(&peer);
            return None;
        }
        if self.waiting.len() >= 2 * self.swept.max(64) {
            self.waiting.retain(|_, back| *back + CROWD_GRACE > now);
            self.swept = self.waiting.len();
        }
        let ahead = self.waiting.len() - usize::from(self.waiting.contains_key(&peer));
        let per_serve = backlog / serving.max(1) as u32;
        let wait = excess + per_serve.saturating_mul(ahead as u32);
        self.waiting.insert(peer, now + wait);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_asker_is_told_to_wait_behind_the_others_and_forgotten_once_served() {
        let t0 = Instant::now();
        let mut crowd = Crowd::default();
        // 1.5 s queued over 3 serves: 1 s over the limit, 0.5 s a serve.
        let (backlog, serving) = (Duration::from_millis(1500), 3);
        let ms = Duration::from_millis;
        assert_eq!(crowd.busy(t0, 'a', backlog, serving), Some(ms(1000)));
        assert_eq!(crowd.busy(t0, 'b', backlog, serving), Some(ms(1500)));
        assert_eq!(crowd.busy(t0, 'c', backlog, serving), Some(ms(2000)));
        // Asking again keeps no place of its own in the count.
        assert_eq!(crowd.busy(t0, 'a', backlog, serving), Some(ms(2000)));
        assert_eq!(crowd.waiting.len(), 3);
        // Served: it leaves the crowd; the next asker has one fewer ahead.
        assert_eq!(crowd.busy(t0, 'a', ms(100), 1), None);
        assert_eq!(crowd.busy(t0, 'd', backlog, serving), Some(ms(2000)));
        // Back at its turn, 'b' is let in though the queue is as long.
        let turn = t0 + ms(1500);
        assert_eq!(
            crowd.busy(turn - ms(1), 'b', backlog, serving),
            Some(ms(2000))
        );
        let turn = turn - ms(1) + ms(2000);
        assert_eq!(crowd.busy(turn, 'b', backlog, serving), None);
        assert_eq!(crowd.waiting.len(), 2);
        // Unless the server is at its limit of serves.
        assert!(crowd.busy(turn, 'b', backlog, MAX_SERVES).is_some());
        // Not busy: nobody is told to wait, whatever the crowd.
        assert_eq!(crowd.busy(t0, 'e', ms(400), 1), None);
    }

    #[test]
    fn askers_that_never_came_back_are_forgotten() {
        let t0 = Instant::now();
        let mut crowd = Crowd::default();
        let (backlog, serving) = (Duration::from_millis(600), 1);
        for i in 0..100u32 {
            crowd.busy(t0, i, backlog, serving);
        }
        let later = t0 + Duration::from_secs(3600);
        for i in 100..300u32 {
            crowd.busy(later, i, backlog, serving);
        }
        assert!(crowd.waiting.len() <= 200, "{}", crowd.waiting.len());
    }
}
