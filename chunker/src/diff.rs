//! What a target still needs of a release.

use std::collections::HashSet;

use serde::Serialize;

use crate::chunk::{ChunkHash, ChunkRef};
use crate::manifest::Manifest;

/// The chunks of a release that a holder lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Distinct chunks the release has.
    pub chunks_total: usize,
    /// Their uncompressed bytes.
    pub bytes_total: u64,
    /// The distinct chunks the holder lacks, in order of first use.
    pub new: Vec<ChunkRef>,
    /// Their uncompressed bytes.
    pub bytes_new: u64,
}

impl Diff {
    /// The chunks of `release` for which `held` says no.
    pub fn new(release: &Manifest, mut held: impl FnMut(&ChunkHash) -> bool) -> Self {
        let unique = release.unique_chunks();
        let bytes_total = unique.iter().map(|c| u64::from(c.len)).sum();
        let chunks_total = unique.len();
        let new: Vec<ChunkRef> = unique.into_iter().filter(|c| !held(&c.hash)).collect();
        let bytes_new = new.iter().map(|c| u64::from(c.len)).sum();
        Self {
            chunks_total,
            bytes_total,
            new,
            bytes_new,
        }
    }

    /// What a holder of `from` lacks of `to`.
    pub fn between(from: &Manifest, to: &Manifest) -> Self {
        let held: HashSet<ChunkHash> = from.chunk_refs().map(|c| c.hash).collect();
        Self::new(to, |h| held.contains(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Entry, EntryKind};

    fn release(files: &[(&str, &[&[u8]])]) -> Manifest {
        let entries = files
            .iter()
            .map(|(path, parts)| {
                let chunks: Vec<ChunkRef> = parts
                    .iter()
                    .map(|p| ChunkRef {
                        hash: ChunkHash::of(p),
                        len: p.len() as u32,
                    })
                    .collect();
                Entry {
                    path: (*path).into(),
                    kind: EntryKind::File {
                        mode: 0o644,
                        size: chunks.iter().map(|c| u64::from(c.len)).sum(),
                        chunks,
                    },
                }
            })
            .collect();
        Manifest::new("web", "1", entries).unwrap()
    }

    #[test]
    fn between_versions_lists_only_changed_chunks_once() {
        let v1 = release(&[("a", &[b"aaaa", b"bbbb"]), ("b", &[b"cccc"])]);
        let v2 = release(&[
            ("a", &[b"aaaa", b"BBBBB"]),
            ("b", &[b"cccc"]),
            ("c", &[b"BBBBB"]),
        ]);
        let d = Diff::between(&v1, &v2);
        assert_eq!(d.chunks_total, 3);
        assert_eq!(d.bytes_total, 13);
        assert_eq!(
            d.new,
            vec![ChunkRef {
                hash: ChunkHash::of(b"BBBBB"),
                len: 5
            }]
        );
        assert_eq!(d.bytes_new, 5);
    }

    #[test]
    fn holder_with_nothing_needs_everything_and_holder_with_all_needs_nothing() {
        let v = release(&[("a", &[b"x", b"y"])]);
        assert_eq!(Diff::new(&v, |_| false).new.len(), 2);
        assert!(Diff::new(&v, |_| true).new.is_empty());
        assert!(Diff::between(&v, &v).new.is_empty());
    }
}
