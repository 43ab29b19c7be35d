//! Serving and receiving chunk bodies: what both roles do with the store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use convoy_chunker::{ChunkRef, Encoding, Manifest, ReleaseId, StoredChunk};

use crate::net::rate::Pacer;
use crate::net::ChunkAnswer;
use crate::protocol::{busy, ChunkResponse, WireChunk, MAX_GET_BATCH};
use crate::store::Store;
use crate::transfer::crowd::{busy_for, Crowd, Wait};

/// Releases whose chunk lists are kept in memory.
const MAX_RELEASES: usize = 64;
/// Patch units (see [`crate::protocol::patch_unit`]) whose chunk lists are
/// kept in memory; beyond, the oldest is forgotten (its chunks are then
/// refused, and the targets fetching it fall back to the release's chunks).
const MAX_UNITS: usize = 256;
/// Releases remembered as not in the store, so that requests for them are
/// refused without reading it again.
const MAX_ABSENT: usize = 1024;
/// How long a peer is asked to wait while a release's manifest is read.
const LOADING_RETRY: Duration = Duration::from_millis(20);
/// Manifests read off the loop at once; requests for more releases not
/// in memory are answered busy without reading.
pub const MAX_LOADING: usize = 16;
/// Operator uploads being verified and stored at once, whoever sends
/// them; more are answered busy. Each holds a chunk of up to 1 MiB.
pub const MAX_UPLOADS: usize = 32;

/// A release's distinct chunks, in index order.
pub type ChunkList = Arc<Vec<ChunkRef>>;

/// The store, the caps and the counters a daemon shares between tasks.
pub struct Chunks {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Upload cap.
    pub upload: Pacer,
    /// Download cap.
    pub download: Pacer,
    lists: Mutex<HashMap<ReleaseId, ChunkList>>,
    /// Patch units being distributed, oldest first.
    units: Mutex<std::collections::VecDeque<(ReleaseId, ChunkList)>>,
    loading: Mutex<Loading>,
    serving: AtomicUsize,
    /// Chunk body bytes sent.
    pub bytes_sent: AtomicU64,
    /// Chunk body bytes received and stored.
    pub bytes_received: AtomicU64,
    /// Fault injection for tests: serve every chunk with a byte flipped.
    pub corrupt_uploads: std::sync::atomic::AtomicBool,
    uploads: Arc<tokio::sync::Semaphore>,
    /// The origin's askers told to wait their turn ([`Chunks::origin`],
    /// [`Wait::Turn`]); a target answers by [`busy_for`] alone (a crowd
    /// rule cost its swarm 5–9% of p99 in the simulator: peers told to
    /// wait their turn idled uplinks that would have served them).
    crowd: Option<Mutex<Crowd<libp2p::PeerId>>>,
}

/// Manifests being read off the loop, and releases the store lacked.
#[derive(Debug, Default)]
struct Loading {
    /// Being read (at most [`MAX_LOADING`]).
    now: HashSet<ReleaseId>,
    /// Not in the store when last read (at most [`MAX_ABSENT`]).
    absent: HashSet<ReleaseId>,
}

/// Why a received chunk was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The bytes are not the chunk (the sender is faulty or hostile).
    #[error("{0}")]
    Invalid(String),
    /// The store failed (a full disk, say); the sender is not at fault.
    #[error("{0}")]
    Store(String),
}

impl Chunks {
    /// Shares `store` under the given caps (bytes per second).
    pub fn new(store: Arc<dyn Store>, upload: Option<u64>, download: Option<u64>) -> Arc<Self> {
        Arc::new(Self::with(store, upload, download, None))
    }

    /// As [`Chunks::new`], for the origin: an asker it answers busy is
    /// told to come back after the others waiting ([`Crowd`]).
    pub fn origin(store: Arc<dyn Store>, upload: Option<u64>, download: Option<u64>) -> Arc<Self> {
        let crowd = Some(Mutex::new(Crowd::default()));
        Arc::new(Self::with(store, upload, download, crowd))
    }

    fn with(
        store: Arc<dyn Store>,
        upload: Option<u64>,
        download: Option<u64>,
        crowd: Option<Mutex<Crowd<libp2p::PeerId>>>,
    ) -> Self {
        Self {
            store,
            upload: Pacer::new(upload),
            download: Pacer::new(download),
            lists: Mutex::new(HashMap::new()),
            units: Mutex::default(),
            loading: Mutex::default(),
            serving: AtomicUsize::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            corrupt_uploads: Default::default(),
            uploads: Arc::new(tokio::sync::Semaphore::new(MAX_UPLOADS)),
            crowd,
        }
    }

    /// One of the [`MAX_UPLOADS`] slots for an operator's upload, held
    /// until it is stored; `None` when all are taken: answer busy.
    pub fn upload_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.uploads.clone().try_acquire_owned().ok()
    }

    /// Remembers a release's chunk list, so its chunks can be named by index.
    pub fn add_release(&self, manifest: &Manifest) -> ChunkList {
        let id = manifest.release_id();
        let mut lists = self.lists.lock().expect("lists lock");
        if let Some(l) = lists.get(&id) {
            return l.clone();
        }
        if lists.len() >= MAX_RELEASES {
            lists.clear();
        }
        let list = Arc::new(manifest.unique_chunks());
        lists.insert(id, list.clone());
        self.loading
            .lock()
            .expect("loading lock")
            .absent
            .remove(&id);
        list
    }

    /// Remembers a patch unit's chunk list (the patch's delta chunks), so
    /// peers can fetch them by index as they fetch a release's.
    pub fn add_unit(&self, unit: ReleaseId, list: ChunkList) {
        let mut units = self.units.lock().expect("units lock");
        if units.iter().any(|(u, _)| *u == unit) {
            return;
        }
        if units.len() >= MAX_UNITS {
            units.pop_front();
        }
        units.push_back((unit, list));
    }

    /// The chunk list of a release, if it is in memory; if not, starts
    /// reading its manifest from the store in a blocking task and says
    /// what to answer meanwhile: busy for a moment, or refused when the
    /// store did not have it the last time it was read.
    fn list_or_load(self: &Arc<Self>, release: &ReleaseId) -> Result<ChunkList, ChunkResponse> {
        if let Some(l) = self.lists.lock().expect("lists lock").get(release) {
            return Ok(l.clone());
        }
        let units = self.units.lock().expect("units lock");
        if let Some((_, l)) = units.iter().find(|(u, _)| u == release) {
            return Ok(l.clone());
        }
        drop(units);
        let mut loading = self.loading.lock().expect("loading lock");
        if loading.absent.contains(release) {
            return Err(ChunkResponse::Refused);
        }
        if loading.now.len() < MAX_LOADING && loading.now.insert(*release) {
            let (me, release) = (self.clone(), *release);
            tokio::task::spawn_blocking(move || {
                let manifest = me.store.get_manifest(&release);
                let mut loading = me.loading.lock().expect("loading lock");
                loading.now.remove(&release);
                match manifest {
                    Ok(Some(m)) => {
                        drop(loading);
                        me.add_release(&m);
                    }
                    Ok(None) => {
                        if loading.absent.len() >= MAX_ABSENT {
                            loading.absent.clear();
                        }
                        loading.absent.insert(release);
                    }
                    // Read again at the next request.
                    Err(e) => tracing::warn!(%release, "cannot read a manifest: {e}"),
                }
            });
        }
        Err(busy(LOADING_RETRY))
    }

    /// Manifests being read off the loop now (see [`MAX_LOADING`]).
    pub fn manifests_loading(&self) -> usize {
        self.loading.lock().expect("loading lock").now.len()
    }

    /// Whether the upload queue is full (a request from `peer` now would
    /// wait too long), and if so how long `peer` is told to wait.
    pub fn busy(&self, peer: libp2p::PeerId, wait: Wait) -> Option<Duration> {
        let now = Instant::now();
        let backlog = self.upload.backlog(now);
        let serving = self.serving.load(Ordering::Relaxed);
        match (&self.crowd, wait) {
            (Some(crowd), Wait::Turn) => crowd
                .lock()
                .expect("crowd lock")
                .busy(now, peer, backlog, serving),
            _ => busy_for(backlog, serving),
        }
    }

    /// Admits a request for chunks `indices` of `release`: the chunks to
    /// read (`None` for an index outside the release), or the answer to
    /// send instead — rejected (no chunk, or more than
    /// [`MAX_GET_BATCH`]), refused (release unknown) or busy (the upload
    /// queue is full, or the release's manifest is being read; `wait`
    /// says for how long).
    pub fn admit(
        self: &Arc<Self>,
        peer: libp2p::PeerId,
        release: &ReleaseId,
        indices: &[u32],
        wait: Wait,
    ) -> Result<Vec<Option<ChunkRef>>, ChunkResponse> {
        if indices.is_empty() || indices.len() > MAX_GET_BATCH {
            return Err(ChunkResponse::Rejected(format!(
                "a request names {} chunks; 1 to {MAX_GET_BATCH} are allowed",
                indices.len()
            )));
        }
        let list = self.list_or_load(release)?;
        if let Some(wait) = self.busy(peer, wait) {
            return Err(busy(wait));
        }
        Ok(indices
            .iter()
            .map(|i| list.get(*i as usize).copied())
            .collect())
    }

    /// Whether nothing is queued for upload.
    pub fn upload_idle(&self) -> bool {
        self.serving.load(Ordering::Relaxed) == 0
    }

    /// Answers a request for `chunks` from the store (`None` where the
    /// request named no chunk to send), at the upload cap, adding the bytes
    /// sent to `counter` too; says which went out. Runs as its own task.
    pub async fn serve(
        self: Arc<Self>,
        chunks: Vec<Option<ChunkRef>>,
        reply: ChunkAnswer,
        counter: Option<Arc<AtomicU64>>,
    ) -> Vec<bool> {
        self.serving.fetch_add(1, Ordering::Relaxed);
        let mut wires = self.read_many(chunks).await;
        let corrupt = self.corrupt_uploads.load(Ordering::Relaxed);
        let mut n = 0;
        for wire in wires.iter_mut().flatten() {
            if corrupt {
                tracing::warn!("corrupting an upload (--fault-corrupt-uploads)");
                let last = wire.bytes.len() - 1;
                wire.bytes[last] ^= 0x55;
            }
            n += wire.bytes.len() as u64;
        }
        if n > 0 {
            self.upload.acquire(n).await;
            self.bytes_sent.fetch_add(n, Ordering::Relaxed);
            if let Some(c) = counter {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
        let sent = wires.iter().map(Option::is_some).collect();
        reply.send(ChunkResponse::Chunks(wires)).await;
        self.serving.fetch_sub(1, Ordering::Relaxed);
        sent
    }

    /// A chunk in its wire form, if held.
    pub async fn read(&self, chunk: ChunkRef) -> Option<WireChunk> {
        self.read_many(vec![Some(chunk)]).await.pop().flatten()
    }

    /// Chunks in their wire form, `None` where not held or not asked; one
    /// store task for them all.
    async fn read_many(&self, chunks: Vec<Option<ChunkRef>>) -> Vec<Option<WireChunk>> {
        let store = self.store.clone();
        let n = chunks.len();
        tokio::task::spawn_blocking(move || {
            chunks
                .iter()
                .map(|c| {
                    let stored = store.get_chunk(&c.as_ref()?.hash).ok()??;
                    Some(WireChunk {
                        encoding: stored.encoding.flag(),
                        bytes: stored.bytes,
                    })
                })
                .collect()
        })
        .await
        .unwrap_or_else(|_| vec![None; n])
    }

    /// Verifies a received chunk against its name and stores it. Returns
    /// its stored size.
    pub async fn receive(&self, chunk: ChunkRef, wire: WireChunk) -> Result<u64, ReceiveError> {
        self.receive_many(vec![(chunk, wire)])
            .await
            .pop()
            .expect("one result per chunk")
    }

    /// Verifies received chunks against their names and stores those that
    /// match, in one store write. Returns each one's stored size or why it
    /// was not stored, in order.
    pub async fn receive_many(
        &self,
        chunks: Vec<(ChunkRef, WireChunk)>,
    ) -> Vec<Result<u64, ReceiveError>> {
        if chunks.is_empty() {
            return Vec::new();
        }
        let store = self.store.clone();
        let n = chunks.len();
        let results = tokio::task::spawn_blocking(move || {
            let mut results = Vec::with_capacity(chunks.len());
            let mut valid = Vec::with_capacity(chunks.len());
            for (chunk, wire) in chunks {
                let checked = Encoding::from_flag(wire.encoding)
                    .ok_or_else(|| format!("unknown chunk encoding {}", wire.encoding))
                    .and_then(|encoding| {
                        let stored = StoredChunk {
                            encoding,
                            bytes: wire.bytes,
                        };
                        stored.verify(&chunk).map_err(|e| e.to_string())?;
                        Ok(stored)
                    });
                match checked {
                    Ok(stored) => {
                        results.push(Ok(stored.bytes.len() as u64));
                        valid.push((chunk, stored));
                    }
                    Err(e) => results.push(Err(ReceiveError::Invalid(e))),
                }
            }
            if let Err(e) = store.put_chunks(&valid) {
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(ReceiveError::Store(e.to_string()));
                }
            }
            results
        })
        .await
        .unwrap_or_else(|e| {
            (0..n)
                .map(|_| Err(ReceiveError::Store(e.to_string())))
                .collect()
        });
        let stored: u64 = results.iter().flatten().sum();
        self.bytes_received.fetch_add(stored, Ordering::Relaxed);
        results
    }

    /// Makes the chunks received so far durable.
    pub async fn flush(&self) -> Result<(), String> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush().map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }
}

/// When a daemon makes what it stored durable: a flush at a time, from a
/// task (a disk slow to sync holds up no loop), and only after a write.
#[derive(Debug, Default)]
pub struct Syncer {
    /// Chunks were stored since the last flush began.
    dirty: bool,
    /// A flush runs; the next waits for it.
    flushing: bool,
}

impl Syncer {
    /// Chunks were stored.
    pub fn stored(&mut self) {
        self.dirty = true;
    }

    /// Flushes `chunks` from a task, unless one runs or nothing was stored
    /// since the last began; its outcome, wrapped by `done`, goes to `tx`
    /// and must come back to [`Syncer::finished`].
    pub fn start<T: Send + 'static>(
        &mut self,
        chunks: &Arc<Chunks>,
        tx: &tokio::sync::mpsc::Sender<T>,
        done: fn(Result<(), String>) -> T,
    ) {
        if self.flushing || !std::mem::take(&mut self.dirty) {
            return;
        }
        self.flushing = true;
        let (chunks, tx) = (chunks.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(done(chunks.flush().await)).await;
        });
    }

    /// The flush [`Syncer::start`] began ended.
    pub fn finished(&mut self, result: Result<(), String>) {
        self.flushing = false;
        if let Err(e) = result {
            tracing::warn!("cannot flush the store: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn uploads_past_the_limit_find_no_slot_until_one_is_stored() {
        let chunks = Chunks::new(Arc::new(MemoryStore::new()), None, None);
        // Written out, not the constant: a higher limit must fail here.
        let held: Vec<_> = (0..32).map(|_| chunks.upload_slot()).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(chunks.upload_slot().is_none(), "a 33rd upload at once");
        drop(held);
        assert!(chunks.upload_slot().is_some());
    }
}
