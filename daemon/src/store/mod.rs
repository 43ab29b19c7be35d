//! Where chunks, manifests and release names live.
//!
//! [`Store`] is the typed API; [`RocksStore`] keeps it in RocksDB (the one
//! place that knows its column families and tuning) and [`MemoryStore`] in
//! memory, and both pass the same test bodies. [`Ingest`] is the
//! [`ChunkSink`](convoy_chunker::ChunkSink) that packing writes through;
//! [`verify`] and [`gc`] work on any store.
//!
//! Durability: chunk bodies are appended to pack files and indexed without
//! the write-ahead log; [`Store::flush`] syncs the packs, then the index. A
//! release (manifest + name) is written with a synced log entry, and only
//! after the flush of its chunks. A crash can lose chunks that no release
//! names yet (they are fetched or packed again), never a chunk a stored
//! release needs.
//!
//! It may use [`durable`](crate::durable) and the chunker; nothing of the
//! network or the roles.

mod ingest;
mod maintenance;
mod memory;
mod packs;
mod patches;
mod rocks;

use convoy_chunker::{
    BoxError, ChunkHash, ChunkRef, ChunkSource, DecodeError, Manifest, Patch, ReleaseId,
    StoredChunk,
};

pub use ingest::{Ingest, IngestStats, IngestWriter};
pub use maintenance::{
    collect, compact_in_background, gc, verify, Collector, GcReport, Pass, Retention, VerifyReport,
};
pub use memory::MemoryStore;
pub use patches::{patch_in_store, rebuild_in_store, wire_lens, PatchError, Rebuilt};
pub use rocks::RocksStore;

/// Sizes of a stored chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Uncompressed length.
    pub raw_len: u32,
    /// Length as stored and sent (compressed or not), without the flag byte.
    pub stored_len: u32,
}

/// A named release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// App name.
    pub app: String,
    /// Version.
    pub version: String,
    /// The manifest it names.
    pub id: ReleaseId,
    /// Order of arrival in this store; higher is newer.
    pub seq: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process has the store open.
    #[error("store {path} is in use by another process (a convoyd or another convoy command); stop it or pass another --store")]
    Locked {
        /// The store's directory.
        path: String,
    },
    /// The database could not be opened or an operation on it failed.
    #[error("store {path}: {reason}")]
    Db {
        /// The store's directory.
        path: String,
        /// What RocksDB said.
        reason: String,
    },
    /// A record that does not decode: disk corruption or a foreign database.
    #[error("store {path}: corrupt {what}; run `convoy verify`")]
    Corrupt {
        /// The store's directory.
        path: String,
        /// Which record.
        what: String,
    },
    /// A stored manifest that fails to decode.
    #[error("store {path}: manifest {id} is corrupt: {source}")]
    BadManifest {
        /// The store's directory.
        path: String,
        /// The release.
        id: ReleaseId,
        /// Why it does not decode.
        source: DecodeError,
    },
    /// A sync failed earlier: the store takes no writes until it is opened
    /// again (what was not synced may be lost, and is fetched again).
    #[error("store {path} takes no writes since a sync failed ({reason}); check the disk, then restart convoyd")]
    Stopped {
        /// The store's directory.
        path: String,
        /// What failed.
        reason: String,
    },
    /// `app@version` already names another release; versions are immutable.
    #[error("{app}@{version} already names release {existing}; publish under a new version")]
    NameTaken {
        /// App.
        app: String,
        /// Version.
        version: String,
        /// The release it names.
        existing: ReleaseId,
    },
}

/// The typed store API. Implementations are safe to share between threads.
pub trait Store: Send + Sync {
    /// Stores chunks whose bytes the caller has verified (or just hashed).
    /// Not durable until [`Store::flush`].
    fn put_chunks(&self, chunks: &[(ChunkRef, StoredChunk)]) -> Result<(), StoreError>;
    /// A chunk in its stored form.
    fn get_chunk(&self, hash: &ChunkHash) -> Result<Option<StoredChunk>, StoreError>;
    /// Sizes of each chunk, `None` where absent; one answer per hash, in order.
    fn chunk_info(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkInfo>>, StoreError>;
    /// Every chunk the store holds, in hash order.
    fn chunk_hashes(&self) -> Result<Vec<ChunkHash>, StoreError>;
    /// Removes chunks.
    fn delete_chunks(&self, hashes: &[ChunkHash]) -> Result<(), StoreError>;
    /// Makes every chunk written so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Stores a manifest and names it `app@version`, durably. Storing the
    /// same release twice is a no-op; a name taken by another release is
    /// refused with [`StoreError::NameTaken`].
    fn put_release(&self, manifest: &Manifest) -> Result<ReleaseId, StoreError>;
    /// A stored manifest, decoded and checked against its id.
    fn get_manifest(&self, id: &ReleaseId) -> Result<Option<Manifest>, StoreError>;
    /// The release `app@version` names.
    fn resolve(&self, app: &str, version: &str) -> Result<Option<ReleaseId>, StoreError>;
    /// Every named release.
    fn releases(&self) -> Result<Vec<Release>, StoreError>;
    /// Drops a name, and its manifest unless another name still uses it.
    fn delete_release(&self, app: &str, version: &str) -> Result<(), StoreError>;
    /// Stores a patch record, durably, replacing any from the same base to
    /// the same target. Its delta chunks must be flushed first.
    fn put_patch(&self, patch: &Patch) -> Result<(), StoreError>;
    /// Every stored patch into `target`, by base.
    fn patches_to(&self, target: &ReleaseId) -> Result<Vec<Patch>, StoreError>;
    /// Every stored patch's ends, as `(base, target)`.
    fn patch_ends(&self) -> Result<Vec<(ReleaseId, ReleaseId)>, StoreError>;
    /// Removes the patch from `base` to `target`, if stored.
    fn delete_patch(&self, base: &ReleaseId, target: &ReleaseId) -> Result<(), StoreError>;
    /// Gives the space of deleted chunks back to the file system.
    fn compact(&self) -> Result<(), StoreError>;
    /// Appends `record` to the log named `log`, durably; returns its
    /// sequence number (0 for a log's first record).
    fn append_record(&self, log: &str, record: &[u8]) -> Result<u64, StoreError>;
    /// Every record of `log`, in the order appended.
    fn records(&self, log: &str) -> Result<Vec<Vec<u8>>, StoreError>;
    /// The names of the logs that start with `prefix`, sorted.
    fn logs(&self, prefix: &str) -> Result<Vec<String>, StoreError>;

    /// Whether the store holds a chunk.
    fn contains_chunk(&self, hash: &ChunkHash) -> Result<bool, StoreError> {
        Ok(self.chunk_info(std::slice::from_ref(hash))?[0].is_some())
    }

    /// Whether the store holds each chunk; one answer per hash, in order.
    fn contains_chunks(&self, hashes: &[ChunkHash]) -> Result<Vec<bool>, StoreError> {
        Ok(self
            .chunk_info(hashes)?
            .into_iter()
            .map(|i| i.is_some())
            .collect())
    }
}

/// Reads chunks from a store for [`materialise`](convoy_chunker::materialise).
pub struct StoreSource<'a>(pub &'a dyn Store);

impl ChunkSource for StoreSource<'_> {
    fn stored_chunk(&self, chunk: &ChunkRef) -> Result<StoredChunk, BoxError> {
        self.0
            .get_chunk(&chunk.hash)?
            .ok_or_else(|| "not in the store; run `convoy verify`".into())
    }
}

#[cfg(test)]
mod tests;
