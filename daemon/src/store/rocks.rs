//! The RocksDB store: the one place that knows its column families and tuning.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use convoy_chunker::{ChunkHash, ChunkRef, Manifest, ReleaseId, StoredChunk};
use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, FlushOptions, IteratorMode, Options,
    WriteBatch, WriteOptions, DB,
};

use super::{ChunkInfo, Release, Store, StoreError};

/// Chunk bodies (flag byte + stored bytes), keyed by hash. Values live in
/// blob files, so compaction never rewrites them.
const CF_CHUNKS: &str = "chunks";
/// Per chunk: raw and stored length (8 bytes), keyed by hash. Small, so
/// `contains` and diff sizing never touch the chunk bodies.
const CF_CHUNK_INFO: &str = "chunk_info";
/// Encoded manifests keyed by release id.
const CF_MANIFESTS: &str = "manifests";
/// `app@version` -> release id (32 bytes) + arrival sequence (u64 BE).
const CF_NAMES: &str = "names";

/// Memtable size of the chunks family; with [`MAX_WRITE_BUFFERS`] it bounds
/// what unflushed chunk bodies may occupy in memory.
const CHUNK_WRITE_BUFFER_BYTES: usize = 32 << 20;
/// Memtables per family before writes wait for a flush.
const MAX_WRITE_BUFFERS: i32 = 3;
/// Values at least this large go to blob files (nearly every chunk).
const MIN_BLOB_BYTES: u64 = 4 << 10;
/// Target size of one blob file.
const BLOB_FILE_BYTES: u64 = 256 << 20;
/// Flush and compaction threads.
const BACKGROUND_JOBS: i32 = 2;
/// Bloom filter bits per key on the small families: most lookups during a
/// pack or a diff are for chunks the store lacks.
const BLOOM_BITS_PER_KEY: f64 = 10.0;

/// A [`Store`] in a RocksDB directory.
pub struct RocksStore {
    db: DB,
    path: PathBuf,
    next_seq: AtomicU64,
    /// Serialises name writes so a name check and its write are one step.
    names_lock: Mutex<()>,
}

impl RocksStore {
    /// Opens (creating if needed) the store in directory `path`. A store
    /// another process has open gives [`StoreError::Locked`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let display = path.display().to_string();
        std::fs::create_dir_all(path).map_err(|e| StoreError::Db {
            path: display.clone(),
            reason: format!("cannot create directory: {e}"),
        })?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // Chunk writes skip the WAL; atomic flush keeps chunks and their
        // info in step when memtables reach disk.
        db_opts.set_atomic_flush(true);
        db_opts.set_max_background_jobs(BACKGROUND_JOBS);

        let mut chunks = Options::default();
        chunks.set_enable_blob_files(true);
        chunks.set_min_blob_size(MIN_BLOB_BYTES);
        chunks.set_blob_file_size(BLOB_FILE_BYTES);
        chunks.set_enable_blob_gc(true);
        chunks.set_write_buffer_size(CHUNK_WRITE_BUFFER_BYTES);
        chunks.set_max_write_buffer_number(MAX_WRITE_BUFFERS);

        let mut small = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
        small.set_block_based_table_factory(&table);
        small.set_max_write_buffer_number(MAX_WRITE_BUFFERS);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunks),
            ColumnFamilyDescriptor::new(CF_CHUNK_INFO, small.clone()),
            ColumnFamilyDescriptor::new(CF_MANIFESTS, small.clone()),
            ColumnFamilyDescriptor::new(CF_NAMES, small),
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
        let store = Self {
            db,
            path: path.to_path_buf(),
            next_seq: AtomicU64::new(0),
            names_lock: Mutex::new(()),
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

    fn unlogged() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.disable_wal(true);
        w
    }

    fn synced() -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(true);
        w
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

fn name_key(app: &str, version: &str) -> Vec<u8> {
    format!("{app}@{version}").into_bytes()
}

fn decode_name_value(value: &[u8]) -> Option<(ReleaseId, u64)> {
    let id: [u8; 32] = value.get(..32)?.try_into().ok()?;
    let seq: [u8; 8] = value.get(32..)?.try_into().ok()?;
    Some((ReleaseId(id), u64::from_be_bytes(seq)))
}

fn encode_info(info: ChunkInfo) -> [u8; 8] {
    let mut out = [0; 8];
    out[..4].copy_from_slice(&info.raw_len.to_le_bytes());
    out[4..].copy_from_slice(&info.stored_len.to_le_bytes());
    out
}

fn decode_info(bytes: &[u8]) -> Option<ChunkInfo> {
    let bytes: [u8; 8] = bytes.try_into().ok()?;
    Some(ChunkInfo {
        raw_len: u32::from_le_bytes(bytes[..4].try_into().ok()?),
        stored_len: u32::from_le_bytes(bytes[4..].try_into().ok()?),
    })
}

impl Store for RocksStore {
    fn put_chunks(&self, chunks: &[(ChunkRef, StoredChunk)]) -> Result<(), StoreError> {
        let (bodies, infos) = (self.cf(CF_CHUNKS), self.cf(CF_CHUNK_INFO));
        let mut batch = WriteBatch::default();
        for (chunk, stored) in chunks {
            batch.put_cf(bodies, chunk.hash.0, stored.to_flagged());
            let info = ChunkInfo {
                raw_len: chunk.len,
                stored_len: stored.bytes.len() as u32,
            };
            batch.put_cf(infos, chunk.hash.0, encode_info(info));
        }
        self.db
            .write_opt(batch, &Self::unlogged())
            .map_err(self.db_err())
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Option<StoredChunk>, StoreError> {
        let Some(value) = self
            .db
            .get_pinned_cf(self.cf(CF_CHUNKS), hash.0)
            .map_err(self.db_err())?
        else {
            return Ok(None);
        };
        StoredChunk::from_flagged(&value)
            .map(Some)
            .ok_or_else(|| self.corrupt(format!("chunk {hash} (unknown encoding flag)")))
    }

    fn chunk_info(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkInfo>>, StoreError> {
        let keys: Vec<&[u8]> = hashes.iter().map(|h| h.0.as_slice()).collect();
        self.db
            .batched_multi_get_cf(self.cf(CF_CHUNK_INFO), keys, false)
            .into_iter()
            .zip(hashes)
            .map(|(r, hash)| match r.map_err(self.db_err())? {
                None => Ok(None),
                Some(v) => decode_info(&v)
                    .map(Some)
                    .ok_or_else(|| self.corrupt(format!("size record of chunk {hash}"))),
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
        Ok(out)
    }

    fn delete_chunks(&self, hashes: &[ChunkHash]) -> Result<(), StoreError> {
        let (bodies, infos) = (self.cf(CF_CHUNKS), self.cf(CF_CHUNK_INFO));
        let mut batch = WriteBatch::default();
        for hash in hashes {
            batch.delete_cf(bodies, hash.0);
            batch.delete_cf(infos, hash.0);
        }
        self.db
            .write_opt(batch, &Self::unlogged())
            .map_err(self.db_err())?;
        self.flush()
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut opts = FlushOptions::default();
        opts.set_wait(true);
        self.db
            .flush_cfs_opt(&[self.cf(CF_CHUNKS), self.cf(CF_CHUNK_INFO)], &opts)
            .map_err(self.db_err())
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
        self.db
            .write_opt(batch, &Self::synced())
            .map_err(self.db_err())?;
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
        self.db
            .write_opt(batch, &Self::synced())
            .map_err(self.db_err())
    }

    fn compact(&self) -> Result<(), StoreError> {
        for cf in [CF_CHUNKS, CF_CHUNK_INFO, CF_MANIFESTS, CF_NAMES] {
            self.db
                .compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }
}
