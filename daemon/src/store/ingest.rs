//! Packing straight into a store: the [`ChunkSink`] that dedups, compresses
//! and batches.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use convoy_chunker::{
    BoxError, ChunkHash, ChunkRef, ChunkSink, ChunkWriter, Compressor, StoredChunk,
};

use super::Store;

/// A writer hands its batch to the store once it holds this many stored bytes.
const BATCH_BYTES: usize = 8 << 20;

thread_local! {
    /// One zstd context per packing thread, reused for every file.
    static COMPRESSOR: RefCell<Compressor> = RefCell::new(Compressor::new());
}

/// Writes packed chunks into a [`Store`]: each distinct chunk the store
/// lacks is compressed once and written in batches; chunks the store holds
/// cost one lookup of its small info family.
pub struct Ingest<'a> {
    store: &'a dyn Store,
    /// Chunks met so far in this pack, so repeats are neither looked up nor counted twice.
    seen: Mutex<HashSet<ChunkHash>>,
    new_chunks: AtomicU64,
    new_bytes: AtomicU64,
    new_stored_bytes: AtomicU64,
}

/// What an [`Ingest`] added to its store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Distinct chunks met.
    pub unique_chunks: u64,
    /// Chunks the store did not have.
    pub new_chunks: u64,
    /// Their uncompressed bytes.
    pub new_bytes: u64,
    /// Their bytes as stored.
    pub new_stored_bytes: u64,
}

impl<'a> Ingest<'a> {
    /// A sink into `store`.
    pub fn new(store: &'a dyn Store) -> Self {
        Self {
            store,
            seen: Mutex::new(HashSet::new()),
            new_chunks: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            new_stored_bytes: AtomicU64::new(0),
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> IngestStats {
        IngestStats {
            unique_chunks: self.seen.lock().expect("seen set poisoned").len() as u64,
            new_chunks: self.new_chunks.load(Ordering::Relaxed),
            new_bytes: self.new_bytes.load(Ordering::Relaxed),
            new_stored_bytes: self.new_stored_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The chunks of one file on their way into the store.
pub struct IngestWriter<'i, 'a> {
    ingest: &'i Ingest<'a>,
    batch: Vec<(ChunkRef, StoredChunk)>,
    batch_bytes: usize,
}

impl<'i, 'a> ChunkSink for &'i Ingest<'a> {
    type Writer = IngestWriter<'i, 'a>;

    fn writer(&self) -> Self::Writer {
        IngestWriter {
            ingest: self,
            batch: Vec::new(),
            batch_bytes: 0,
        }
    }
}

impl IngestWriter<'_, '_> {
    fn put_batch(&mut self) -> Result<(), BoxError> {
        if !self.batch.is_empty() {
            self.ingest.store.put_chunks(&self.batch)?;
            self.batch.clear();
            self.batch_bytes = 0;
        }
        Ok(())
    }
}

impl ChunkWriter for IngestWriter<'_, '_> {
    fn write(&mut self, bytes: &[u8], chunk: &ChunkRef) -> Result<(), BoxError> {
        let first_time = self
            .ingest
            .seen
            .lock()
            .expect("seen set poisoned")
            .insert(chunk.hash);
        if !first_time || self.ingest.store.contains_chunk(&chunk.hash)? {
            return Ok(());
        }
        let stored = COMPRESSOR.with(|c| c.borrow_mut().store(bytes));
        let ingest = self.ingest;
        ingest.new_chunks.fetch_add(1, Ordering::Relaxed);
        ingest
            .new_bytes
            .fetch_add(u64::from(chunk.len), Ordering::Relaxed);
        ingest
            .new_stored_bytes
            .fetch_add(stored.bytes.len() as u64, Ordering::Relaxed);
        self.batch_bytes += stored.bytes.len();
        self.batch.push((*chunk, stored));
        if self.batch_bytes >= BATCH_BYTES {
            self.put_batch()?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), BoxError> {
        self.put_batch()
    }
}
