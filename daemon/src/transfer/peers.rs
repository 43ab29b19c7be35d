//! Whom a target of a swarm fetches from: the coordinator's rule, which
//! the simulator follows too.
//!
//! Half of a target's places go to the nearest peers (same zone, then
//! same data centre, then any; a random choice among equals), the rest to
//! random ones, so the swarm graph stays connected across zones and data
//! centres (nearest alone splits a fleet into islands that each need the
//! origin for everything).
//!
//! The candidates are grouped by place once ([`PeerPool::new`]); each
//! target's list is then drawn in time proportional to its degree, not to
//! the fleet: ordering every candidate for every target cost the
//! coordinator 10^8 steps at 10,000 targets.

use std::collections::HashMap;
use std::hash::Hash;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The candidates of one staging, grouped by data centre and zone.
pub struct PeerPool<P, D, Z> {
    all: Vec<P>,
    /// Indices into `all`, per data centre and per (data centre, zone).
    dcs: HashMap<D, Vec<usize>>,
    zones: HashMap<(D, Z), Vec<usize>>,
}

impl<P: Copy + Eq, D: Hash + Eq + Clone, Z: Hash + Eq + Clone> PeerPool<P, D, Z> {
    /// Groups `candidates`, each with its data centre and zone.
    pub fn new(candidates: impl IntoIterator<Item = (P, D, Z)>) -> Self {
        let mut pool = Self {
            all: Vec::new(),
            dcs: HashMap::new(),
            zones: HashMap::new(),
        };
        for (p, dc, zone) in candidates {
            let i = pool.all.len();
            pool.all.push(p);
            pool.dcs.entry(dc.clone()).or_default().push(i);
            pool.zones.entry((dc, zone)).or_default().push(i);
        }
        pool
    }

    /// `degree` peers (fewer if the pool has fewer) for `me`, which stands
    /// at `(dc, zone)` and is never chosen: half the places to the nearest,
    /// the rest at random. `seed` makes the draw repeatable (the
    /// coordinator seeds it per target, so its lists differ).
    pub fn choose(&self, me: P, dc: &D, zone: &Z, degree: usize, seed: u64) -> Vec<P> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut chosen: Vec<usize> = Vec::with_capacity(degree);
        let near = degree.div_ceil(2);
        let zone = self.zones.get(&(dc.clone(), zone.clone()));
        for tier in [zone, self.dcs.get(dc)].into_iter().flatten() {
            self.draw(Tier::Of(tier), me, near, &mut chosen, &mut rng);
        }
        // Anyone makes up the near half, then takes the rest.
        self.draw(Tier::All, me, near, &mut chosen, &mut rng);
        self.draw(Tier::All, me, degree, &mut chosen, &mut rng);
        chosen.into_iter().map(|i| self.all[i]).collect()
    }

    /// Adds distinct members of `tier` to `chosen` until it holds `upto`,
    /// or the tier is used up: random picks while most of it is free, then
    /// a walk from a random start, so a small tier ends.
    fn draw(&self, tier: Tier, me: P, upto: usize, chosen: &mut Vec<usize>, rng: &mut SmallRng) {
        let len = match tier {
            Tier::Of(t) => t.len(),
            Tier::All => self.all.len(),
        };
        if len == 0 {
            return;
        }
        let at = |k: usize| match tier {
            Tier::Of(t) => t[k],
            Tier::All => k,
        };
        let fits = |i: usize, chosen: &[usize]| self.all[i] != me && !chosen.contains(&i);
        let mut tries = 4 * upto + 8;
        while chosen.len() < upto && tries > 0 {
            tries -= 1;
            let i = at(rng.random_range(0..len));
            if fits(i, chosen) {
                chosen.push(i);
            }
        }
        let start = rng.random_range(0..len);
        for k in 0..len {
            if chosen.len() >= upto {
                break;
            }
            let i = at((start + k) % len);
            if fits(i, chosen) {
                chosen.push(i);
            }
        }
    }
}

/// Where [`PeerPool::draw`] draws from: some candidates, or all.
#[derive(Clone, Copy)]
enum Tier<'a> {
    Of(&'a [usize]),
    All,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_nearest_half_random_so_other_zones_are_reached() {
        // Eight peers in zone a, eight in zone b of one data centre.
        let pool = PeerPool::new((0..16u32).map(|p| (p, "dc0", if p < 8 { "a" } else { "b" })));
        for seed in 0..50 {
            let chosen = pool.choose(0, &"dc0", &"a", 4, seed);
            assert_eq!(chosen.len(), 4);
            assert!(!chosen.contains(&0), "chose itself: {chosen:?}");
            let mut distinct = chosen.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 4, "a peer twice: {chosen:?}");
            assert!(chosen[..2].iter().all(|p| *p < 8), "{chosen:?}");
        }
        // Over many targets' draws the random half reaches the other zone.
        let reached = (0..50)
            .filter(|s| pool.choose(0, &"dc0", &"a", 4, *s).iter().any(|p| *p >= 8))
            .count();
        assert!(reached > 10, "another zone reached in {reached} of 50");
        // Fewer candidates than places: all of them.
        let two = PeerPool::new([(1u32, 0, 0), (9u32, 1, 0)]);
        let mut got = two.choose(1, &0, &0, 8, 3);
        got.sort();
        assert_eq!(got, [9]);
    }

    #[test]
    fn near_places_spill_to_the_data_centre_then_anywhere() {
        // Zone a holds one other peer, its data centre two more; the rest
        // are in another data centre.
        let pool = PeerPool::new(
            [(0u32, 0, 'a'), (1, 0, 'a'), (2, 0, 'b'), (3, 0, 'b')]
                .into_iter()
                .chain((4..100).map(|p| (p, 1, 'a'))),
        );
        for seed in 0..20 {
            let chosen = pool.choose(0, &0, &'a', 8, seed);
            assert_eq!(chosen.len(), 8);
            assert_eq!(chosen[0], 1, "its zone first: {chosen:?}");
            assert!(
                chosen[1..3].iter().all(|p| *p == 2 || *p == 3),
                "{chosen:?}"
            );
            assert!(!chosen.contains(&0));
        }
    }

    #[test]
    fn a_large_pool_gives_distinct_peers_nearest_first() {
        let pool = PeerPool::new((0..100_000u32).map(|p| (p, p % 10, p % 20)));
        for t in (0..100_000u32).step_by(997) {
            let chosen = pool.choose(t, &(t % 10), &(t % 20), 16, u64::from(t));
            assert_eq!(chosen.len(), 16);
            assert!(
                chosen[..8].iter().all(|p| p % 20 == t % 20 && *p != t),
                "{chosen:?}"
            );
            let mut distinct = chosen.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 16, "{chosen:?}");
        }
    }
}
