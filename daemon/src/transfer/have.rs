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
}
