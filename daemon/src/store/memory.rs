//! A [`Store`] in memory: for tests and simulations.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use convoy_chunker::{ChunkHash, ChunkRef, Manifest, Patch, ReleaseId, StoredChunk};

use super::{ChunkInfo, Release, Store, StoreError};

/// A [`Store`] held in memory; nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    chunks: BTreeMap<ChunkHash, (u32, StoredChunk)>,
    manifests: HashMap<ReleaseId, Vec<u8>>,
    names: BTreeMap<(String, String), (ReleaseId, u64)>,
    next_seq: u64,
    logs: BTreeMap<String, Vec<Vec<u8>>>,
    /// Encoded patches by (target, base).
    patches: BTreeMap<(ReleaseId, ReleaseId), Vec<u8>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("memory store lock poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("memory store lock poisoned")
    }
}

impl Store for MemoryStore {
    fn append_record(&self, log: &str, record: &[u8]) -> Result<u64, StoreError> {
        let mut inner = self.write();
        let l = inner.logs.entry(log.to_string()).or_default();
        l.push(record.to_vec());
        Ok(l.len() as u64 - 1)
    }

    fn records(&self, log: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self.read().logs.get(log).cloned().unwrap_or_default())
    }

    fn logs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .read()
            .logs
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn put_chunks(&self, chunks: &[(ChunkRef, StoredChunk)]) -> Result<(), StoreError> {
        let mut inner = self.write();
        for (chunk, stored) in chunks {
            inner.chunks.insert(chunk.hash, (chunk.len, stored.clone()));
        }
        Ok(())
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Option<StoredChunk>, StoreError> {
        Ok(self.read().chunks.get(hash).map(|(_, s)| s.clone()))
    }

    fn chunk_info(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkInfo>>, StoreError> {
        let inner = self.read();
        Ok(hashes
            .iter()
            .map(|h| {
                inner.chunks.get(h).map(|(raw_len, s)| ChunkInfo {
                    raw_len: *raw_len,
                    stored_len: s.bytes.len() as u32,
                })
            })
            .collect())
    }

    fn chunk_hashes(&self) -> Result<Vec<ChunkHash>, StoreError> {
        Ok(self.read().chunks.keys().copied().collect())
    }

    fn delete_chunks(&self, hashes: &[ChunkHash]) -> Result<(), StoreError> {
        let mut inner = self.write();
        for h in hashes {
            inner.chunks.remove(h);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn put_release(&self, manifest: &Manifest) -> Result<ReleaseId, StoreError> {
        let encoded = manifest.encode();
        let id = ReleaseId::of_encoded(&encoded);
        let key = (manifest.app().to_string(), manifest.version().to_string());
        let mut inner = self.write();
        if let Some(&(existing, _)) = inner.names.get(&key) {
            return if existing == id {
                Ok(id)
            } else {
                Err(StoreError::NameTaken {
                    app: key.0,
                    version: key.1,
                    existing,
                })
            };
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.manifests.insert(id, encoded);
        inner.names.insert(key, (id, seq));
        Ok(id)
    }

    fn get_manifest(&self, id: &ReleaseId) -> Result<Option<Manifest>, StoreError> {
        let inner = self.read();
        let Some(bytes) = inner.manifests.get(id) else {
            return Ok(None);
        };
        Manifest::decode(bytes)
            .map(Some)
            .map_err(|source| StoreError::BadManifest {
                path: "(memory)".into(),
                id: *id,
                source,
            })
    }

    fn resolve(&self, app: &str, version: &str) -> Result<Option<ReleaseId>, StoreError> {
        Ok(self
            .read()
            .names
            .get(&(app.to_string(), version.to_string()))
            .map(|(id, _)| *id))
    }

    fn releases(&self) -> Result<Vec<Release>, StoreError> {
        Ok(self
            .read()
            .names
            .iter()
            .map(|((app, version), (id, seq))| Release {
                app: app.clone(),
                version: version.clone(),
                id: *id,
                seq: *seq,
            })
            .collect())
    }

    fn delete_release(&self, app: &str, version: &str) -> Result<(), StoreError> {
        let mut inner = self.write();
        if let Some((id, _)) = inner.names.remove(&(app.to_string(), version.to_string())) {
            if !inner.names.values().any(|(other, _)| *other == id) {
                inner.manifests.remove(&id);
            }
        }
        Ok(())
    }

    fn put_patch(&self, patch: &Patch) -> Result<(), StoreError> {
        self.write()
            .patches
            .insert((patch.target(), patch.base()), patch.encode());
        Ok(())
    }

    fn patches_to(&self, target: &ReleaseId) -> Result<Vec<Patch>, StoreError> {
        self.read()
            .patches
            .range((*target, ReleaseId([0; 32]))..=(*target, ReleaseId([0xff; 32])))
            .map(|(_, bytes)| {
                Patch::decode(bytes).map_err(|e| StoreError::Corrupt {
                    path: "(memory)".into(),
                    what: format!("patch: {e}"),
                })
            })
            .collect()
    }

    fn patch_ends(&self) -> Result<Vec<(ReleaseId, ReleaseId)>, StoreError> {
        Ok(self
            .read()
            .patches
            .keys()
            .map(|(target, base)| (*base, *target))
            .collect())
    }

    fn delete_patch(&self, base: &ReleaseId, target: &ReleaseId) -> Result<(), StoreError> {
        self.write().patches.remove(&(*target, *base));
        Ok(())
    }

    fn compact(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
