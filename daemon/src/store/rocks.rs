//! The RocksDB store: the one place that knows its column families, its
//! pack files and their tuning.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use convoy_chunker::{ChunkHash, ChunkRef, Manifest, Patch, ReleaseId, StoredChunk};
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};

use super::packs::{Location, Packs, RECORD_HEADER};
use super::{ChunkInfo, Release, Store, StoreError};

/// The chunk index, keyed by hash: raw length, stored length (u32 LE
/// each), pack id (u32 LE) and record offset (u64 LE). The bodies live in
/// pack files under `packs/` (see `packs.rs`): measured, this writes a
/// fresh release faster than RocksDB blob files, whose single flush job
/// (copying and checksumming every body again) capped packing near
/// 370 MiB/s whatever the thread count.
const CF_CHUNK_INFO: &str = "chunk_info";
const INDEX_VALUE_LEN: usize = 20;
/// Directory of the pack files, inside the store.
const PACKS_DIR: &str = "packs";
/// Encoded manifests keyed by release id.
const CF_MANIFESTS: &str = "manifests";
/// `app@version` -> release id (32 bytes) + arrival sequence (u64 BE).
const CF_NAMES: &str = "names";
/// Record logs: `log name, 0, sequence (u64 big-endian)` → record.
const CF_LOGS: &str = "logs";
/// Encoded patch records keyed by target id then base id (64 bytes).
const CF_PATCHES: &str = "patches";

/// Memtable size of the index: about 80 bytes a chunk, so one memtable
/// holds the index of ~50 GiB of new chunks.
const INDEX_WRITE_BUFFER_BYTES: usize = 64 << 20;
/// Index entries that wait in memory for their packs' sync at most; past
/// this `put_chunks` syncs itself (about 100 bytes each: 6 MiB, for some
/// 4 GiB of chunks).
const MAX_PENDING_ENTRIES: usize = 1 << 16;
/// Memtables per family before writes wait for a flush.
const MAX_WRITE_BUFFERS: i32 = 3;
/// A pack whose live records fill less than this share (in percent) is
/// rewritten by [`Store::compact`].
const COMPACT_BELOW_LIVE_PERCENT: u64 = 50;
/// Flush and compaction threads.
const BACKGROUND_JOBS: i32 = 2;
/// Bloom filter bits per key on the small families: most lookups during a
/// pack or a diff are for chunks the store lacks.
const BLOOM_BITS_PER_KEY: f64 = 10.0;

/// A [`Store`] in a RocksDB directory.
pub struct RocksStore {
    db: DB,
    packs: Packs,
    path: PathBuf,
    next_seq: AtomicU64,
    /// Serialises name writes so a name check and its write are one step.
    names_lock: Mutex<()>,
    logs_lock: Mutex<()>,
    /// Index entries of chunks whose pack bytes may not be on disk yet.
    /// They reach RocksDB only in the synced write that follows their
    /// packs' sync, so no index entry is ever on disk (synced or written
    /// back by the kernel) before the bytes it points to.
    pending: Mutex<HashMap<ChunkHash, (ChunkInfo, Location)>>,
    /// Held through a whole sync (take the pending entries, sync the
    /// packs, write the entries), so two syncs cannot interleave: one that
    /// found no dirty pack could otherwise write entries whose packs the
    /// other is still syncing.
    sync_lock: Mutex<()>,
    /// Why writes stopped: a sync failed. Nothing written since the last
    /// good sync can be trusted to reach the disk, and retrying an fsync
    /// can report success for pages the kernel already dropped, so the
    /// store takes no more writes until it is opened again.
    stopped: Mutex<Option<String>>,
    /// One compaction at a time.
    compact_lock: Mutex<()>,
}

impl RocksStore {
    /// Opens (creating if needed) the store in directory `path`. A store
    /// another process has open gives [`StoreError::Locked`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let display = path.display().to_string();
        crate::durable::create_dir_all(path).map_err(|e| StoreError::Db {
            path: display.clone(),
            reason: format!("cannot create directory: {e}"),
        })?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(BACKGROUND_JOBS);
        // Index entries wait in `pending` until `flush` has synced the
        // packs they point into; then one synced write of the log makes
        // them durable. (Flushing the memtable to a table file every
        // second instead cost each target a table, its compaction and
        // three fsyncs a second: 9% of a 50-target swarm's CPU.)

        let mut small = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
        small.set_block_based_table_factory(&table);
        small.set_max_write_buffer_number(MAX_WRITE_BUFFERS);
        let mut index = small.clone();
        index.set_write_buffer_size(INDEX_WRITE_BUFFER_BYTES);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNK_INFO, index),
            ColumnFamilyDescriptor::new(CF_MANIFESTS, small.clone()),
            ColumnFamilyDescriptor::new(CF_NAMES, small.clone()),
            ColumnFamilyDescriptor::new(CF_LOGS, small.clone()),
            ColumnFamilyDescriptor::new(CF_PATCHES, small),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
            let reason = e.into_string();
            if reason.contains("LOCK") || reason.contains("lock hold") {
                StoreError::Locked {
                    path: display.clone(),
                }
            } else {
                StoreError::Db {
                    path: display.clone(),
                    reason,
                }
            }
        })?;
        let packs = Packs::open(&path.join(PACKS_DIR)).map_err(|e| StoreError::Db {
            path: display.clone(),
            reason: format!("pack directory: {e}"),
        })?;
        let store = Self {
            db,
            packs,
            path: path.to_path_buf(),
            next_seq: AtomicU64::new(0),
            names_lock: Mutex::new(()),
            logs_lock: Mutex::new(()),
            pending: Mutex::new(HashMap::new()),
            sync_lock: Mutex::new(()),
            stopped: Mutex::new(None),
            compact_lock: Mutex::new(()),
        };
        let newest = store.releases()?.iter().map(|r| r.seq).max();
        store
            .next_seq
            .store(newest.map_or(0, |s| s + 1), Ordering::SeqCst);
        Ok(store)
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the store fail as on a disk that cannot write: the next sync
    /// fails, and writes stop from then on.
    #[cfg(test)]
    pub(crate) fn fail_syncs_for_tests(&self) {
        self.packs.fail_syncs();
        self.put_chunks(&[(
            ChunkRef {
                hash: ChunkHash::of(b"x"),
                len: 1,
            },
            convoy_chunker::Compressor::new().store(b"x"),
        )])
        .expect("writes still go");
        self.flush().expect_err("an injected sync failure");
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }

    fn db_err(&self) -> impl Fn(rocksdb::Error) -> StoreError + '_ {
        move |e| StoreError::Db {
            path: self.path.display().to_string(),
            reason: e.into_string(),
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            what: what.into(),
        }
    }

    /// Refuses a write once a sync has failed.
    fn check_writable(&self) -> Result<(), StoreError> {
        match &*self.stopped.lock().expect("stopped flag poisoned") {
            None => Ok(()),
            Some(reason) => Err(StoreError::Stopped {
                path: self.path.display().to_string(),
                reason: reason.clone(),
            }),
        }
    }

    /// Writes `batch` durably, and with it every pending index entry,
    /// after the packs those point into are synced. The entries leave
    /// `pending` only once RocksDB has them, so that a read during the
    /// sync finds each chunk in one or the other. A failure stops the
    /// store's writes (see [`RocksStore::stopped`]) and keeps the entries
    /// pending, so that reads still find the chunks this process wrote.
    fn write_synced(&self, mut batch: WriteBatch) -> Result<(), StoreError> {
        let _one_sync = self.sync_lock.lock().expect("sync lock poisoned");
        self.check_writable()?;
        let pending: Vec<(ChunkHash, (ChunkInfo, Location))> = self
            .pending
            .lock()
            .expect("pending poisoned")
            .iter()
            .map(|(hash, entry)| (*hash, *entry))
            .collect();
        let index = self.cf(CF_CHUNK_INFO);
        for (hash, (info, at)) in &pending {
            batch.put_cf(index, hash.0, encode_index(*info, *at));
        }
        let result = self
            .packs
            .sync()
            .map_err(|e| format!("syncing packs: {e}"))
            .and_then(|()| {
                let mut w = WriteOptions::default();
                w.set_sync(true);
                self.db.write_opt(batch, &w).map_err(|e| e.into_string())
            });
        if let Err(reason) = result {
            tracing::error!(path = %self.path.display(), "store stops taking writes: {reason}");
            *self.stopped.lock().expect("stopped flag poisoned") = Some(reason.clone());
            return Err(StoreError::Stopped {
                path: self.path.display().to_string(),
                reason,
            });
        }
        // Entries put again meanwhile (or deleted) are not this sync's.
        let mut left = self.pending.lock().expect("pending poisoned");
        for (hash, entry) in pending {
            if left.get(&hash) == Some(&entry) {
                left.remove(&hash);
            }
        }
        Ok(())
    }

    fn decode_name(&self, key: &[u8], value: &[u8]) -> Result<Release, StoreError> {
        let key = std::str::from_utf8(key).map_err(|_| self.corrupt("release name"))?;
        let (app, version) = key
            .split_once('@')
            .ok_or_else(|| self.corrupt(format!("release name {key:?}")))?;
        let (id, seq) =
            decode_name_value(value).ok_or_else(|| self.corrupt(format!("record of {key}")))?;
        Ok(Release {
            app: app.into(),
            version: version.into(),
            id,
            seq,
        })
    }
}

fn log_key(log: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(log.len() + 9);
    k.extend_from_slice(log.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn name_key(app: &str, version: &str) -> Vec<u8> {
    format!("{app}@{version}").into_bytes()
}

fn decode_name_value(value: &[u8]) -> Option<(ReleaseId, u64)> {
    let id: [u8; 32] = value.get(..32)?.try_into().ok()?;
    let seq: [u8; 8] = value.get(32..)?.try_into().ok()?;
    Some((ReleaseId(id), u64::from_be_bytes(seq)))
}

fn encode_index(info: ChunkInfo, at: Location) -> [u8; INDEX_VALUE_LEN] {
    let mut out = [0; INDEX_VALUE_LEN];
    out[..4].copy_from_slice(&info.raw_len.to_le_bytes());
    out[4..8].copy_from_slice(&info.stored_len.to_le_bytes());
    out[8..12].copy_from_slice(&at.pack.to_le_bytes());
    out[12..].copy_from_slice(&at.offset.to_le_bytes());
    out
}

fn decode_index(bytes: &[u8]) -> Option<(ChunkInfo, Location)> {
    let b: [u8; INDEX_VALUE_LEN] = bytes.try_into().ok()?;
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let info = ChunkInfo {
        raw_len: u32_at(0),
        stored_len: u32_at(4),
    };
    let at = Location {
        pack: u32_at(8),
        offset: u64::from_le_bytes(b[12..].try_into().expect("8 bytes")),
    };
    Some((info, at))
}

impl RocksStore {
    fn index_entry(&self, hash: &ChunkHash) -> Result<Option<(ChunkInfo, Location)>, StoreError> {
        if let Some(entry) = self.pending.lock().expect("pending poisoned").get(hash) {
            return Ok(Some(*entry));
        }
        match self
            .db
            .get_pinned_cf(self.cf(CF_CHUNK_INFO), hash.0)
            .map_err(self.db_err())?
        {
            None => Ok(None),
            Some(v) => decode_index(&v)
                .map(Some)
                .ok_or_else(|| self.corrupt(format!("index record of chunk {hash}"))),
        }
    }

    /// Files index entries to be written at the next sync; syncs now when
    /// too many wait.
    fn put_index(&self, entries: &[(ChunkHash, ChunkInfo, Location)]) -> Result<(), StoreError> {
        let waiting = {
            let mut pending = self.pending.lock().expect("pending poisoned");
            for (hash, info, at) in entries {
                pending.insert(*hash, (*info, *at));
            }
            pending.len()
        };
        if waiting >= MAX_PENDING_ENTRIES {
            self.flush()?;
        }
        Ok(())
    }

    fn io_err(&self, what: &str) -> impl Fn(std::io::Error) -> StoreError + '_ {
        let what = what.to_string();
        move |e| StoreError::Db {
            path: self.path.display().to_string(),
            reason: format!("{what}: {e}"),
        }
    }
}

impl Drop for RocksStore {
    /// Pending index entries are written on a clean close, as they would
    /// be by a flush.
    fn drop(&mut self) {
        if let Err(e) = Store::flush(self) {
            tracing::warn!(path = %self.path.display(), "store not flushed on close: {e}");
        }
    }
}

impl Store for RocksStore {
    fn append_record(&self, log: &str, record: &[u8]) -> Result<u64, StoreError> {
        let _one_writer = self.logs_lock.lock().expect("logs lock poisoned");
        // The log's last key, if any: seek back from its highest possible key.
        let cf = self.cf(CF_LOGS);
        let mut prefix = log.as_bytes().to_vec();
        prefix.push(0);
        let last = log_key(log, u64::MAX);
        let mut it = self
            .db
            .iterator_cf(cf, IteratorMode::From(&last, rocksdb::Direction::Reverse));
        let seq = match it.next().transpose().map_err(self.db_err())? {
            Some((k, _)) if k.len() == prefix.len() + 8 && k.starts_with(&prefix) => {
                let n: [u8; 8] = k[prefix.len()..].try_into().expect("8 bytes");
                u64::from_be_bytes(n) + 1
            }
            _ => 0,
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, log_key(log, seq), record);
        self.write_synced(batch)?;
        Ok(seq)
    }

    fn records(&self, log: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut prefix = log.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_LOGS),
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(self.db_err())?;
            if !(k.len() == prefix.len() + 8 && k.starts_with(&prefix)) {
                break;
            }
            out.push(v.to_vec());
        }
        Ok(out)
    }

    fn logs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        let it = self.db.iterator_cf(
            self.cf(CF_LOGS),
            IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, _) = item.map_err(self.db_err())?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let name = k
                .len()
                .checked_sub(9)
                .and_then(|n| std::str::from_utf8(&k[..n]).ok())
                .ok_or_else(|| self.corrupt("record log key"))?;
            if out.last().map(String::as_str) != Some(name) {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    fn put_chunks(&self, chunks: &[(ChunkRef, StoredChunk)]) -> Result<(), StoreError> {
        if chunks.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        // The guard keeps compaction off the pack until the entries are filed.
        let (locations, _writing) = self
            .packs
            .append(chunks)
            .map_err(self.io_err("writing a pack"))?;
        let entries: Vec<_> = chunks
            .iter()
            .zip(locations)
            .map(|((chunk, stored), at)| {
                let info = ChunkInfo {
                    raw_len: chunk.len,
                    stored_len: stored.bytes.len() as u32,
                };
                (chunk.hash, info, at)
            })
            .collect();
        self.put_index(&entries)
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Option<StoredChunk>, StoreError> {
        let Some((info, at)) = self.index_entry(hash)? else {
            return Ok(None);
        };
        match self.packs.read(hash, at, info.stored_len) {
            Ok(stored) => Ok(Some(stored)),
            Err(what) => {
                // Compaction may have moved the record, and removed its
                // pack, since the index was read: look once more.
                match self.index_entry(hash)? {
                    None => Ok(None),
                    Some((info, moved)) if moved != at => self
                        .packs
                        .read(hash, moved, info.stored_len)
                        .map(Some)
                        .map_err(|what| self.corrupt(format!("chunk {hash}: {what}"))),
                    Some(_) => Err(self.corrupt(format!("chunk {hash}: {what}"))),
                }
            }
        }
    }

    fn chunk_info(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkInfo>>, StoreError> {
        let pending: Vec<Option<ChunkInfo>> = {
            let p = self.pending.lock().expect("pending poisoned");
            hashes.iter().map(|h| p.get(h).map(|(i, _)| *i)).collect()
        };
        let keys: Vec<&[u8]> = hashes.iter().map(|h| h.0.as_slice()).collect();
        self.db
            .batched_multi_get_cf(self.cf(CF_CHUNK_INFO), keys, false)
            .into_iter()
            .zip(hashes)
            .zip(pending)
            .map(|((r, hash), pending)| match r.map_err(self.db_err())? {
                _ if pending.is_some() => Ok(pending),
                None => Ok(None),
                Some(v) => decode_index(&v)
                    .map(|(info, _)| Some(info))
                    .ok_or_else(|| self.corrupt(format!("index record of chunk {hash}"))),
            })
            .collect()
    }

    fn chunk_hashes(&self) -> Result<Vec<ChunkHash>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CHUNK_INFO), IteratorMode::Start)
        {
            let (key, _) = item.map_err(self.db_err())?;
            let key: [u8; 32] = (*key).try_into().map_err(|_| self.corrupt("chunk key"))?;
            out.push(ChunkHash(key));
        }
        out.extend(self.pending.lock().expect("pending poisoned").keys());
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn delete_chunks(&self, hashes: &[ChunkHash]) -> Result<(), StoreError> {
        {
            let mut pending = self.pending.lock().expect("pending poisoned");
            for hash in hashes {
                pending.remove(hash);
            }
        }
        let index = self.cf(CF_CHUNK_INFO);
        let mut batch = WriteBatch::default();
        for hash in hashes {
            batch.delete_cf(index, hash.0);
        }
        self.write_synced(batch)
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Pack bytes first, then the index that points into them.
        self.write_synced(WriteBatch::default())
    }

    fn put_release(&self, manifest: &Manifest) -> Result<ReleaseId, StoreError> {
        let encoded = manifest.encode();
        let id = ReleaseId::of_encoded(&encoded);
        let (app, version) = (manifest.app(), manifest.version());
        let _guard = self.names_lock.lock().expect("names lock poisoned");
        if let Some(existing) = self.resolve(app, version)? {
            return if existing == id {
                Ok(id)
            } else {
                Err(StoreError::NameTaken {
                    app: app.into(),
                    version: version.into(),
                    existing,
                })
            };
        }
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let mut value = id.0.to_vec();
        value.extend_from_slice(&seq.to_be_bytes());
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_MANIFESTS), id.0, &encoded);
        batch.put_cf(self.cf(CF_NAMES), name_key(app, version), value);
        self.write_synced(batch)?;
        Ok(id)
    }

    fn get_manifest(&self, id: &ReleaseId) -> Result<Option<Manifest>, StoreError> {
        let Some(bytes) = self
            .db
            .get_pinned_cf(self.cf(CF_MANIFESTS), id.0)
            .map_err(self.db_err())?
        else {
            return Ok(None);
        };
        if ReleaseId::of_encoded(&bytes) != *id {
            return Err(self.corrupt(format!("manifest {id} (content does not match its id)")));
        }
        Manifest::decode(&bytes)
            .map(Some)
            .map_err(|source| StoreError::BadManifest {
                path: self.path.display().to_string(),
                id: *id,
                source,
            })
    }

    fn resolve(&self, app: &str, version: &str) -> Result<Option<ReleaseId>, StoreError> {
        let key = name_key(app, version);
        match self
            .db
            .get_pinned_cf(self.cf(CF_NAMES), &key)
            .map_err(self.db_err())?
        {
            None => Ok(None),
            Some(v) => Ok(Some(self.decode_name(&key, &v)?.id)),
        }
    }

    fn releases(&self) -> Result<Vec<Release>, StoreError> {
        self.db
            .iterator_cf(self.cf(CF_NAMES), IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.map_err(self.db_err())?;
                self.decode_name(&k, &v)
            })
            .collect()
    }

    fn delete_release(&self, app: &str, version: &str) -> Result<(), StoreError> {
        let _guard = self.names_lock.lock().expect("names lock poisoned");
        let Some(id) = self.resolve(app, version)? else {
            return Ok(());
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_NAMES), name_key(app, version));
        let still_named = self
            .releases()?
            .iter()
            .any(|r| r.id == id && (r.app != app || r.version != version));
        if !still_named {
            batch.delete_cf(self.cf(CF_MANIFESTS), id.0);
        }
        self.write_synced(batch)
    }

    fn put_patch(&self, patch: &Patch) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_PATCHES),
            patch_key(&patch.base(), &patch.target()),
            patch.encode(),
        );
        self.write_synced(batch)
    }

    fn patches_to(&self, target: &ReleaseId) -> Result<Vec<Patch>, StoreError> {
        self.db
            .prefix_iterator_cf(self.cf(CF_PATCHES), target.0)
            .map(|item| item.map_err(self.db_err()))
            .take_while(|item| {
                item.as_ref()
                    .map_or(true, |(k, _)| k.starts_with(&target.0))
            })
            .map(|item| {
                let (_, v) = item?;
                Patch::decode(&v).map_err(|e| self.corrupt(format!("patch into {target}: {e}")))
            })
            .collect()
    }

    fn patch_ends(&self) -> Result<Vec<(ReleaseId, ReleaseId)>, StoreError> {
        self.db
            .iterator_cf(self.cf(CF_PATCHES), IteratorMode::Start)
            .map(|item| {
                let (k, _) = item.map_err(self.db_err())?;
                let id = |b: &[u8]| b.try_into().map(ReleaseId);
                match (k.get(32..), k.get(..32)) {
                    (Some(base), Some(target)) if k.len() == 64 => {
                        Ok((id(base).unwrap(), id(target).unwrap()))
                    }
                    _ => Err(self.corrupt("patch key")),
                }
            })
            .collect()
    }

    fn delete_patch(&self, base: &ReleaseId, target: &ReleaseId) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_PATCHES), patch_key(base, target));
        self.write_synced(batch)
    }

    fn compact(&self) -> Result<(), StoreError> {
        let _one_compaction = self.compact_lock.lock().expect("compact lock poisoned");
        // Packs are sealed, so nothing is appended to them again; those a
        // writer still holds are left for next time. Every other writer
        // has filed its entries, which the flush writes to the index.
        let (sealed_below, busy) = self.packs.seal();
        self.flush()?;
        let mut live: BTreeMap<u32, Vec<(ChunkHash, ChunkInfo, Location)>> = BTreeMap::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_CHUNK_INFO), IteratorMode::Start)
        {
            let (key, value) = item.map_err(self.db_err())?;
            let hash = ChunkHash((*key).try_into().map_err(|_| self.corrupt("chunk key"))?);
            let (info, at) = decode_index(&value)
                .ok_or_else(|| self.corrupt(format!("index record of chunk {hash}")))?;
            live.entry(at.pack).or_default().push((hash, info, at));
        }
        let mut emptied = Vec::new();
        for id in self.packs.ids().map_err(self.io_err("listing packs"))? {
            if id >= sealed_below || busy.contains(&id) {
                continue;
            }
            let records = live.remove(&id).unwrap_or_default();
            let live_bytes: u64 = records
                .iter()
                .map(|(_, info, _)| RECORD_HEADER + u64::from(info.stored_len))
                .sum();
            let len = self.packs.len(id).map_err(self.io_err("reading a pack"))?;
            if live_bytes * 100 >= len * COMPACT_BELOW_LIVE_PERCENT {
                continue;
            }
            // Move the live records to a new pack, then point the index there.
            for batch in records.chunks(1024) {
                let mut moved = Vec::with_capacity(batch.len());
                for (hash, info, at) in batch {
                    let stored = self
                        .packs
                        .read(hash, *at, info.stored_len)
                        .map_err(|what| self.corrupt(format!("chunk {hash}: {what}")))?;
                    let chunk = ChunkRef {
                        hash: *hash,
                        len: info.raw_len,
                    };
                    moved.push((chunk, stored));
                }
                self.put_chunks(&moved)?;
            }
            emptied.push(id);
        }
        self.flush()?;
        for id in emptied {
            self.packs
                .remove(id)
                .map_err(self.io_err("removing a pack"))?;
        }
        for cf in [CF_CHUNK_INFO, CF_MANIFESTS, CF_NAMES, CF_LOGS, CF_PATCHES] {
            self.db
                .compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }
}

/// A patch's key: its target's id, then its base's.
fn patch_key(base: &ReleaseId, target: &ReleaseId) -> [u8; 64] {
    let mut key = [0; 64];
    key[..32].copy_from_slice(&target.0);
    key[32..].copy_from_slice(&base.0);
    key
}

#[cfg(test)]
mod tests {
    use convoy_chunker::Compressor;

    use super::*;

    fn chunk(data: &[u8]) -> (ChunkRef, StoredChunk) {
        let r = ChunkRef {
            hash: ChunkHash::of(data),
            len: data.len() as u32,
        };
        (r, Compressor::new().store(data))
    }

    /// The index entries RocksDB itself holds, without the pending ones.
    fn indexed(store: &RocksStore) -> Vec<ChunkHash> {
        store
            .db
            .iterator_cf(store.cf(CF_CHUNK_INFO), IteratorMode::Start)
            .map(|item| ChunkHash((*item.unwrap().0).try_into().unwrap()))
            .collect()
    }

    #[test]
    fn index_entries_reach_rocksdb_only_after_their_packs_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let a = chunk(b"a chunk whose pack is not synced yet");
        store.put_chunks(std::slice::from_ref(&a)).unwrap();
        // Readable at once, but nothing of it in the index on disk.
        assert!(store.contains_chunk(&a.0.hash).unwrap());
        assert_eq!(store.chunk_hashes().unwrap(), vec![a.0.hash]);
        assert!(indexed(&store).is_empty());
        store.flush().unwrap();
        assert_eq!(indexed(&store), vec![a.0.hash]);
    }

    #[test]
    fn a_failed_sync_stops_writes_and_indexes_nothing_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let (synced, unsynced) = (chunk(b"synced before the failure"), chunk(b"written after"));
        {
            let store = RocksStore::open(dir.path()).unwrap();
            store.put_chunks(std::slice::from_ref(&synced)).unwrap();
            store.flush().unwrap();
            store.packs.fail_syncs();
            store.put_chunks(std::slice::from_ref(&unsynced)).unwrap();
            let e = store.flush().unwrap_err();
            assert!(matches!(e, StoreError::Stopped { .. }), "{e}");
            assert!(e.to_string().contains("injected fsync failure"), "{e}");
            // What this process wrote still reads back ...
            assert!(store.get_chunk(&unsynced.0.hash).unwrap().is_some());
            // ... but nothing more is taken, whatever the write.
            let more = chunk(b"refused");
            for e in [
                store.put_chunks(std::slice::from_ref(&more)).unwrap_err(),
                store.flush().unwrap_err(),
                store.append_record("log", b"x").unwrap_err(),
                store
                    .put_release(&Manifest::new("web", "1", vec![]).unwrap())
                    .unwrap_err(),
                store.delete_chunks(&[synced.0.hash]).unwrap_err(),
            ] {
                assert!(matches!(e, StoreError::Stopped { .. }), "{e}");
            }
            assert!(!store.contains_chunk(&more.0.hash).unwrap());
            assert_eq!(indexed(&store), vec![synced.0.hash]);
        }
        // Opened again: the chunk synced before the failure is held, the
        // other is not (it is fetched again), and writes go on.
        let store = RocksStore::open(dir.path()).unwrap();
        assert!(store.contains_chunk(&synced.0.hash).unwrap());
        assert!(!store.contains_chunk(&unsynced.0.hash).unwrap());
        store.put_chunks(std::slice::from_ref(&unsynced)).unwrap();
        store.flush().unwrap();
        assert!(store.contains_chunk(&unsynced.0.hash).unwrap());
    }

    #[test]
    fn chunks_are_found_while_a_flush_syncs_them() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(RocksStore::open(dir.path()).unwrap());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flusher = std::thread::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    store.flush().unwrap();
                }
            }
        });
        for i in 0..500u32 {
            let c = chunk(&i.to_le_bytes());
            store.put_chunks(std::slice::from_ref(&c)).unwrap();
            // Each check may fall in a sync of the flusher's.
            for _ in 0..50 {
                assert!(
                    store.contains_chunk(&c.0.hash).unwrap(),
                    "chunk {i} not found while a flush ran"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        flusher.join().unwrap();
    }

    #[test]
    fn too_many_pending_entries_sync_by_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let chunks: Vec<_> = (0..MAX_PENDING_ENTRIES as u32)
            .map(|i| chunk(&i.to_le_bytes()))
            .collect();
        for batch in chunks.chunks(4096) {
            store.put_chunks(batch).unwrap();
        }
        assert_eq!(indexed(&store).len(), MAX_PENDING_ENTRIES);
        assert!(store.pending.lock().unwrap().is_empty());
    }
}
