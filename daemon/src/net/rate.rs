//! Upload and download caps: a shared pacer per direction.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far a pacer may fall behind real time and catch up in one burst.
const BURST: Duration = Duration::from_millis(50);

/// Paces transfers to a rate in bytes per second. Each transfer reserves
/// its bytes' share of time on a virtual clock and starts when that clock
/// says so; idle time is not saved up beyond a short burst, so a rate of
/// R means at most R bytes per second plus one burst, over any interval.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: Option<u64>,
    next_free: Mutex<Instant>,
}

impl Pacer {
    /// A pacer at `bytes_per_sec`, or unlimited when `None`.
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        if let Some(r) = bytes_per_sec {
            assert!(r > 0, "a rate cap must be positive");
        }
        Self {
            bytes_per_sec,
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// The cap, if any.
    pub fn rate(&self) -> Option<u64> {
        self.bytes_per_sec
    }

    /// Reserves `bytes` at `now`; returns when they may be sent.
    pub fn reserve(&self, now: Instant, bytes: u64) -> Instant {
        let Some(rate) = self.bytes_per_sec else {
            return now;
        };
        let mut next = self.next_free.lock().expect("pacer lock");
        let floor = now.checked_sub(BURST).unwrap_or(now);
        let start = (*next).max(floor);
        *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        start.max(now)
    }

    /// How long the queue ahead is at `now`: zero when a transfer could start now.
    pub fn backlog(&self, now: Instant) -> Duration {
        if self.bytes_per_sec.is_none() {
            return Duration::ZERO;
        }
        self.next_free
            .lock()
            .expect("pacer lock")
            .saturating_duration_since(now)
    }

    /// Waits for a slot for `bytes`.
    pub async fn acquire(&self, bytes: u64) {
        let at = self.reserve(Instant::now(), bytes);
        tokio::time::sleep_until(at.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let p = Pacer::new(None);
        let now = Instant::now();
        assert_eq!(p.reserve(now, u64::MAX), now);
        assert_eq!(p.backlog(now), Duration::ZERO);
    }

    #[test]
    fn reservations_are_spaced_by_size_over_rate() {
        let p = Pacer::new(Some(1 << 20));
        let now = Instant::now() + Duration::from_secs(1);
        let a = p.reserve(now, 1 << 20);
        let b = p.reserve(now, 1 << 19);
        let c = p.reserve(now, 1);
        // The first starts at once, drawing on the 50 ms burst allowance;
        // the others queue behind it.
        assert_eq!(a, now);
        assert_eq!(b - a, Duration::from_millis(950));
        assert_eq!(c - b, Duration::from_millis(500));
        assert!(p.backlog(now) > Duration::from_millis(1400));
        assert!(p.backlog(now) < Duration::from_millis(1500));
    }

    #[test]
    fn idle_time_is_not_saved_beyond_a_burst() {
        let p = Pacer::new(Some(1000));
        let t0 = Instant::now();
        p.reserve(t0, 1000);
        let later = t0 + Duration::from_secs(10);
        // After a long idle, ten 100-byte sends cannot all start at once.
        let last = (0..10).map(|_| p.reserve(later, 100)).last().unwrap();
        assert!(
            last >= later + Duration::from_millis(850),
            "{:?}",
            last - later
        );
    }
}
