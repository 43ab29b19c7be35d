//! Distribution logic — swarm, push and pull — as sans-I/O state machines.
//!
//! Nothing here touches a socket, a clock or a thread. Each machine takes
//! inputs through `handle_*(now, ...)` and yields what to do through
//! `poll_action()`; `poll_timeout()` says when it next wants to be woken.
//! The daemon drives them over libp2p; [`sim`] drives the very same code
//! for a whole fleet of virtual targets in one process.
//!
//! - [`Fetcher`]: a target getting the chunks it lacks, from peers (swarm)
//!   or from the origin only (pull): rarest-first with random tie-breaks,
//!   a window of requests in flight per peer, peers in the same zone, then
//!   data centre preferred, an endgame that re-requests the last chunks
//!   from other peers, and bans for peers that send bad chunks.
//! - [`Seeder`]: the origin in swarm mode, handing each chunk to few
//!   targets and letting the swarm multiply it.
//! - [`Pusher`]: the origin in push mode, sending each target exactly the
//!   chunks it lacks, K targets at a time.
//!
//! Chunks are named by their index in the release's list of distinct
//! chunks ([`Manifest::unique_chunks`](convoy_chunker::Manifest::unique_chunks)),
//! which every party derives from the same signed manifest.
//!
//! - [`crowd`]: when a busy server answers "wait", and for how long.
//!
//! It may use the [`protocol`](crate::protocol)'s types and nothing else
//! of the crate: no I/O, no role.

mod announce;
pub mod crowd;
mod fetch;
mod have;
mod peers;
mod push;
mod seed;
pub mod sim;

pub use announce::{Announcer, ANNOUNCE_EVERY, ANNOUNCE_RARE_EVERY, RARE_HOLDERS};
pub use fetch::{FetchAction, FetchConfig, Fetcher, Mode, STARVED_PATIENCE};
pub use have::HaveSet;
pub use peers::PeerPool;
pub use push::{PushAction, PushConfig, Pusher};
pub use seed::{Seeder, ServeDecision};

/// Index of a chunk in a release's list of distinct chunks.
pub type ChunkIndex = u32;

/// How close a peer is; the order is the order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Locality {
    /// Same data centre and zone.
    SameZone,
    /// Same data centre, another zone.
    SameDc,
    /// Another data centre.
    OtherDc,
    /// The origin: asked last in swarm mode, only one asked in pull mode.
    Origin,
}

impl Locality {
    /// Where a peer with labels `(dc, zone)` stands from one with `mine`.
    pub fn between(mine: (&str, &str), theirs: (&str, &str)) -> Self {
        match (mine.0 == theirs.0, mine.1 == theirs.1) {
            (true, true) => Self::SameZone,
            (true, false) => Self::SameDc,
            _ => Self::OtherDc,
        }
    }

    /// A peer of this locality serves chunks that no closer peer holds.
    fn is_local(self) -> bool {
        matches!(self, Self::SameZone | Self::SameDc)
    }
}

/// Kumar & Ross (2006): no scheme delivers a file of `file_bytes` from an
/// origin uploading `origin_up` to targets uploading `ups` and downloading
/// `downs` (bytes per second) sooner than this many seconds.
pub fn kumar_ross_bound(file_bytes: u64, origin_up: f64, ups: &[f64], downs: &[f64]) -> f64 {
    assert_eq!(
        ups.len(),
        downs.len(),
        "one upload and one download rate per target"
    );
    let f = file_bytes as f64;
    let n = ups.len() as f64;
    let min_down = downs.iter().copied().fold(f64::INFINITY, f64::min);
    let total_up = origin_up + ups.iter().sum::<f64>();
    (f / origin_up).max(f / min_down).max(n * f / total_up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_the_origin_upload_time_when_the_swarm_has_capacity() {
        let ups = vec![2.0; 50];
        let downs = vec![f64::INFINITY; 50];
        let t = kumar_ross_bound(16, 2.0, &ups, &downs);
        assert!((t - 8.0).abs() < 1e-9);
    }

    #[test]
    fn bound_is_aggregate_capacity_when_targets_upload_little() {
        let ups = vec![0.0; 10];
        let downs = vec![100.0; 10];
        // 10 copies of 16 bytes through one 2 B/s origin: 80 s.
        assert!((kumar_ross_bound(16, 2.0, &ups, &downs) - 80.0).abs() < 1e-9);
    }

    #[test]
    fn locality_orders_zone_then_dc_then_elsewhere() {
        assert_eq!(
            Locality::between(("eu1", "a"), ("eu1", "a")),
            Locality::SameZone
        );
        assert_eq!(
            Locality::between(("eu1", "a"), ("eu1", "b")),
            Locality::SameDc
        );
        assert_eq!(
            Locality::between(("eu1", "a"), ("us1", "a")),
            Locality::OtherDc
        );
        assert!(Locality::SameZone < Locality::SameDc && Locality::OtherDc < Locality::Origin);
    }
}
