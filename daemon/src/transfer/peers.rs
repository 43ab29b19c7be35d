//! Whom a target of a swarm fetches from: the coordinator's rule, which
//! the simulator follows too.

use super::Locality;

/// Picks `degree` of `others` for one target: half the places go to the
/// nearest (same zone, then data centre, then any; `mix`, a per-pair
/// pseudo-random number, orders equals), the rest to random ones by
/// `mix`, so the swarm graph stays connected across zones and data
/// centres (nearest alone splits a fleet into islands that each need the
/// origin for everything).
pub fn choose_peers<P: Copy>(mut others: Vec<(Locality, u64, P)>, degree: usize) -> Vec<P> {
    others.sort_by_key(|o| (o.0, o.1));
    let near = degree.div_ceil(2).min(others.len());
    let mut chosen: Vec<P> = others[..near].iter().map(|o| o.2).collect();
    let mut rest: Vec<&(Locality, u64, P)> = others[near..].iter().collect();
    rest.sort_by_key(|o| o.1);
    chosen.extend(rest.iter().take(degree - near.min(degree)).map(|o| o.2));
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_nearest_half_random_so_other_zones_are_reached() {
        // Eight peers in this zone, eight in another; mix orders them.
        let others: Vec<(Locality, u64, u32)> = (0..16u32)
            .map(|p| {
                let place = if p < 8 {
                    Locality::SameZone
                } else {
                    Locality::SameDc
                };
                (place, u64::from((p * 7919) % 16), p)
            })
            .collect();
        let chosen = choose_peers(others, 4);
        assert_eq!(chosen.len(), 4);
        let near = chosen.iter().filter(|p| **p < 8).count();
        assert!(chosen[..2].iter().all(|p| *p < 8), "{chosen:?}");
        assert!(near < 4, "no place left for another zone: {chosen:?}");
        // Fewer candidates than places: all of them.
        assert_eq!(choose_peers(vec![(Locality::OtherDc, 1, 9u32)], 8), [9]);
    }
}
