//! Convoy's package format: content-defined chunks, manifests, diffs.
//!
//! A package (a build directory) becomes a [`Manifest`]: its entries sorted
//! by path, each regular file a list of [`ChunkRef`]s cut by FastCDC v2020
//! (16/64/256 KiB) and named by BLAKE3. The [`ReleaseId`] is the BLAKE3 of
//! the canonical encoding, so the same tree packed anywhere gets the same id.
//!
//! - [`pack`] walks a directory, chunks files on all of rayon's threads with
//!   bounded memory, and hands every chunk to a [`ChunkSink`].
//! - [`Compressor`] and [`StoredChunk`]: the form a chunk is stored and sent
//!   in (zstd when that saves a tenth); [`StoredChunk::into_verified`]
//!   decompresses and checks the hash.
//! - [`Diff`]: which chunks of a release a holder lacks.
//! - [`make_patch`] and [`Patch`]: binary deltas (zstd, the base file as
//!   reference prefix) that rebuild files of a release from an older one,
//!   and the record that lists them; [`apply_file`] rebuilds a file and
//!   checks it against the new manifest.
//! - [`materialise`] writes a manifest's tree from any [`ChunkSource`],
//!   verifying every chunk, all or nothing.
//!
//! No async runtime, database or network here.
//!
//! ```
//! use convoy_chunker::{Diff, Entry, EntryKind, Manifest, ChunkHash, ChunkRef};
//!
//! let file = |data: &[u8]| EntryKind::File {
//!     mode: 0o644,
//!     size: data.len() as u64,
//!     chunks: vec![ChunkRef { hash: ChunkHash::of(data), len: data.len() as u32 }],
//! };
//! let v1 = Manifest::new("web", "1.0", vec![Entry { path: "index.html".into(), kind: file(b"v1") }])?;
//! let v2 = Manifest::new("web", "1.1", vec![Entry { path: "index.html".into(), kind: file(b"v2!") }])?;
//! let diff = Diff::between(&v1, &v2);
//! assert_eq!((diff.new.len(), diff.bytes_new), (1, 3));
//! assert_eq!(Manifest::decode(&v2.encode())?.release_id(), v2.release_id());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod chunk;
pub mod codec;
mod delta;
mod diff;
mod manifest;
mod materialise;
mod pack;
mod stored;

pub use chunk::{
    chunk_slice, ChunkHash, ChunkRef, StreamChunker, AVG_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
pub use codec::DecodeError;
pub use delta::{
    apply_delta, apply_file, apply_manifest_delta, file_digest, make_delta, make_patch,
    manifest_delta, plan_fetch, read_file, DeltaError, FetchPlan, Patch, PatchConfig, PatchFile,
    PatchId, PatchStats, DELTA_LEVEL, MAX_DELTA_FILE_BYTES, PATCH_MAGIC,
};
pub use diff::Diff;
pub use manifest::{
    limits, validate_name, Entry, EntryKind, Manifest, ManifestError, ReleaseId, MODE_MASK,
};
pub use materialise::{materialise, materialise_reusing, ChunkSource, MaterialiseError, Reuse};
pub use pack::{pack, ChunkSink, ChunkWriter, Discard, PackError, Progress};
pub use stored::{ChunkError, Compressor, Encoding, StoredChunk, COMPRESSION_LEVEL};

/// Errors from the other side of a trait ([`ChunkSink`], [`ChunkSource`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic pseudo-random bytes (xorshift64*), independent of any crate.
    pub(crate) fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(len);
        out
    }
}
