//! Which chunks of a release a party holds.

use fixedbitset::FixedBitSet;

use super::ChunkIndex;

/// A set of chunk indices of one release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaveSet(FixedBitSet);

impl HaveSet {
    /// Holds nothing of a release of `len` chunks.
    pub fn empty(len: usize) -> Self {
        Self(FixedBitSet::with_capacity(len))
    }

    /// Holds all of a release of `len` chunks.
    pub fn full(len: usize) -> Self {
        let mut s = FixedBitSet::with_capacity(len);
        s.insert_range(..);
        Self(s)
    }

    /// Holds the listed chunks.
    pub fn from_indices(len: usize, held: impl IntoIterator<Item = ChunkIndex>) -> Self {
        let mut s = Self::empty(len);
        for i in held {
            s.insert(i);
        }
        s
    }

    /// The release's chunk count.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for a release without chunks.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether chunk `i` is held.
    pub fn contains(&self, i: ChunkIndex) -> bool {
        self.0.contains(i as usize)
    }

    /// Marks chunk `i` held; returns false if it already was.
    pub fn insert(&mut self, i: ChunkIndex) -> bool {
        !self.0.put(i as usize)
    }

    /// Marks chunk `i` not held.
    pub fn remove(&mut self, i: ChunkIndex) {
        self.0.set(i as usize, false);
    }

    /// Chunks held.
    pub fn count(&self) -> usize {
        self.0.count_ones(..)
    }

    /// True when every chunk is held.
    pub fn is_full(&self) -> bool {
        self.0.is_full()
    }

    /// The held chunks, ascending.
    pub fn iter(&self) -> impl Iterator<Item = ChunkIndex> + '_ {
        self.0.ones().map(|i| i as ChunkIndex)
    }

    /// The chunks not held, ascending.
    pub fn missing(&self) -> impl Iterator<Item = ChunkIndex> + '_ {
        self.0.zeroes().map(|i| i as ChunkIndex)
    }

    /// The chunks not held, ascending from `start`, then from 0 up to it:
    /// a scan that begins anywhere without walking the bits before it.
    pub fn missing_from(&self, start: ChunkIndex) -> impl Iterator<Item = ChunkIndex> + '_ {
        self.missing_from_where(start, &[], &[])
    }

    /// The chunks not held here, held in every set of `all_of` and in
    /// none of `none_of`, in the order of [`HaveSet::missing_from`]: 64
    /// chunks to a step, so a peer holding little of what is missing
    /// costs little to scan.
    pub fn missing_from_where<'a>(
        &'a self,
        start: ChunkIndex,
        all_of: &'a [&'a HaveSet],
        none_of: &'a [&'a HaveSet],
    ) -> impl Iterator<Item = ChunkIndex> + 'a {
        let len = self.len();
        assert!(
            all_of.iter().chain(none_of).all(|s| s.len() == len),
            "sets of different releases"
        );
        let len = len as u64;
        let start = if len == 0 { 0 } else { u64::from(start) % len };
        self.missing_in(all_of, none_of, start, len)
            .chain(self.missing_in(all_of, none_of, 0, start))
    }

    /// The chunks in `from..to` not held, in all of `all_of` and none of
    /// `none_of`, ascending.
    fn missing_in<'a>(
        &'a self,
        all_of: &'a [&'a HaveSet],
        none_of: &'a [&'a HaveSet],
        from: u64,
        to: u64,
    ) -> impl Iterator<Item = ChunkIndex> + 'a {
        const BITS: u64 = usize::BITS as u64;
        let blocks = self.0.as_slice();
        let first = (from / BITS) as usize;
        let last = to.div_ceil(BITS) as usize;
        (first..last.min(blocks.len())).flat_map(move |b| {
            let base = b as u64 * BITS;
            let mut zeroes = !blocks[b];
            for s in all_of {
                zeroes &= s.0.as_slice()[b];
            }
            for s in none_of {
                zeroes &= !s.0.as_slice()[b];
            }
            if b == first {
                zeroes &= usize::MAX << (from % BITS);
            }
            std::iter::from_fn(move || {
                if zeroes == 0 {
                    return None;
                }
                let i = base + u64::from(zeroes.trailing_zeros());
                zeroes &= zeroes - 1;
                Some(i)
            })
            .take_while(move |i| *i < to)
            .map(|i| i as ChunkIndex)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_from_wraps_and_matches_missing() {
        for len in [0usize, 1, 63, 64, 65, 200] {
            let h = HaveSet::from_indices(len, (0..len as u32).filter(|i| i % 3 == 0));
            let all: Vec<_> = h.missing().collect();
            for start in [0u32, 1, 62, 63, 64, 130, 199] {
                let got: Vec<_> = h.missing_from(start).collect();
                let mut sorted = got.clone();
                sorted.sort();
                assert_eq!(sorted, all, "len {len} start {start}");
                if let Some(&f) = got.first() {
                    let s = if len == 0 { 0 } else { start % len as u32 };
                    let expect = all.iter().copied().find(|c| *c >= s).unwrap_or(all[0]);
                    assert_eq!(f, expect, "len {len} start {start}");
                }
            }
        }
    }

    #[test]
    fn missing_from_where_is_missing_filtered_by_the_masks() {
        for len in [0usize, 1, 63, 64, 65, 200] {
            let set = |m: u32| HaveSet::from_indices(len, (0..len as u32).filter(|i| i % m == 0));
            let (h, two, five, seven) = (set(3), set(2), set(5), set(7));
            for start in [0u32, 1, 62, 63, 64, 130, 199] {
                let want: Vec<_> = h
                    .missing_from(start)
                    .filter(|c| two.contains(*c) && five.contains(*c) && !seven.contains(*c))
                    .collect();
                let got: Vec<_> = h
                    .missing_from_where(start, &[&two, &five], &[&seven])
                    .collect();
                assert_eq!(got, want, "len {len} start {start}");
                let all: Vec<_> = h.missing_from_where(start, &[], &[]).collect();
                assert_eq!(all, h.missing_from(start).collect::<Vec<_>>());
            }
        }
    }
}
