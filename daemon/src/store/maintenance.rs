//! Whole-store checks and clean-up, the same for every [`Store`].

use std::collections::{BTreeMap, HashSet};

use convoy_chunker::{ChunkHash, ChunkRef, Progress, ReleaseId};
use rayon::prelude::*;
use serde::Serialize;

use super::{Release, Store, StoreError};

/// Chunks re-hashed per store read in [`verify`].
const VERIFY_BATCH: usize = 256;

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Chunks re-hashed.
    pub chunks_checked: u64,
    /// Their uncompressed bytes.
    pub bytes_checked: u64,
    /// Chunks whose bytes are not what their name says, or cannot be read.
    pub corrupt: Vec<CorruptChunk>,
    /// Chunks a stored release needs that the store lacks.
    pub missing: Vec<MissingChunk>,
    /// Releases checked for missing chunks.
    pub releases_checked: u64,
    /// Names (`app@version`) whose manifest is gone.
    pub missing_manifests: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is corrupt or missing.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.missing_manifests.is_empty()
    }
}

/// A chunk that failed verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CorruptChunk {
    /// The chunk's name, hex.
    pub hash: String,
    /// What is wrong.
    pub reason: String,
}

/// A chunk a release needs and the store lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MissingChunk {
    /// The chunk's name, hex.
    pub hash: String,
    /// A release that needs it, as `app@version`.
    pub release: String,
}

/// Re-hashes every chunk (on rayon's threads) and checks that every named
/// release's manifest decodes and its chunks are present.
pub fn verify(store: &dyn Store, progress: &dyn Progress) -> Result<VerifyReport, StoreError> {
    let hashes = store.chunk_hashes()?;
    let infos = store.chunk_info(&hashes)?;
    progress.set_total(infos.iter().flatten().map(|i| u64::from(i.raw_len)).sum());
    let checked: Vec<Result<(u64, Option<CorruptChunk>), StoreError>> = hashes
        .par_chunks(VERIFY_BATCH)
        .zip(infos.par_chunks(VERIFY_BATCH))
        .flat_map_iter(|(hashes, infos)| {
            hashes.iter().zip(infos).map(|(hash, info)| {
                let len = info.map_or(0, |i| i.raw_len);
                progress.advance(u64::from(len));
                let corrupt = |reason: String| CorruptChunk {
                    hash: hash.to_hex(),
                    reason,
                };
                let stored = match store.get_chunk(hash) {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        return Ok((0, Some(corrupt("size record without content".into()))))
                    }
                    Err(
                        StoreError::Db { reason, .. } | StoreError::Corrupt { what: reason, .. },
                    ) => return Ok((0, Some(corrupt(reason)))),
                    Err(e) => return Err(e),
                };
                let chunk = ChunkRef { hash: *hash, len };
                Ok(match stored.into_verified(&chunk) {
                    Ok(raw) => (raw.len() as u64, None),
                    Err(e) => (0, Some(corrupt(e.to_string()))),
                })
            })
        })
        .collect();
    let mut report = VerifyReport::default();
    for item in checked {
        let (bytes, corrupt) = item?;
        report.chunks_checked += 1;
        report.bytes_checked += bytes;
        report.corrupt.extend(corrupt);
    }
    let present: HashSet<ChunkHash> = hashes.into_iter().collect();
    for release in store.releases()? {
        report.releases_checked += 1;
        let name = format!("{}@{}", release.app, release.version);
        let Some(manifest) = store.get_manifest(&release.id)? else {
            report.missing_manifests.push(name);
            continue;
        };
        let mut reported = HashSet::new();
        for c in manifest.chunk_refs() {
            if !present.contains(&c.hash) && reported.insert(c.hash) {
                report.missing.push(MissingChunk {
                    hash: c.hash.to_hex(),
                    release: name.clone(),
                });
            }
        }
    }
    Ok(report)
}

/// What [`gc`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Releases kept, as `app@version`, newest first per app.
    pub kept: Vec<String>,
    /// Releases removed, as `app@version`.
    pub removed: Vec<String>,
    /// Patch records removed (their base or target was).
    pub patches_removed: u64,
    /// Chunks removed.
    pub chunks_removed: u64,
    /// Their bytes as stored.
    pub stored_bytes_removed: u64,
}

impl GcReport {
    /// Logs what a running daemon's pass removed, if it removed anything.
    pub fn log(&self) {
        if self.chunks_removed > 0 || !self.removed.is_empty() {
            tracing::info!(
                releases = ?self.removed,
                chunks = self.chunks_removed,
                bytes = self.stored_bytes_removed,
                "collected garbage"
            );
        }
    }
}

/// Keeps the newest `keep` releases of each app (by arrival in this
/// store), removes the older ones, then every chunk no kept release uses.
/// For a store no daemon runs on; a daemon collects with [`collect`].
pub fn gc(store: &dyn Store, keep: usize) -> Result<GcReport, StoreError> {
    assert!(keep >= 1, "gc must keep at least one release per app");
    let retention = Retention {
        newest: keep,
        ..Retention::default()
    };
    let (report, _) = collect(store, &retention, None)?;
    store.compact()?;
    Ok(report)
}

/// What one collection pass found: its report and the chunks unused now.
pub type Pass = Result<(GcReport, HashSet<ChunkHash>), String>;

/// A daemon's side of its collection passes: whether one runs, the
/// requests that wait for it (`W`, at most [`Collector::MAX_WAITING`]),
/// the requests read off the loop that a pass must not overlap, and the
/// chunks the last pass found unused.
#[derive(Debug)]
pub struct Collector<W> {
    waiting: Option<Vec<W>>,
    reading: usize,
    unused: HashSet<ChunkHash>,
}

impl<W> Default for Collector<W> {
    fn default() -> Self {
        Self {
            waiting: None,
            reading: 0,
            unused: HashSet::new(),
        }
    }
}

impl<W> Collector<W> {
    /// Requests that wait for a pass, at most; past this they are refused.
    pub const MAX_WAITING: usize = 256;

    /// Starts a pass unless one runs or a request is being read off the
    /// loop ([`Collector::reading`]); then the chunks the last pass found
    /// unused, for [`collect`].
    pub fn start(&mut self) -> Option<HashSet<ChunkHash>> {
        if self.waiting.is_some() || self.reading > 0 {
            return None;
        }
        self.waiting = Some(Vec::new());
        Some(std::mem::take(&mut self.unused))
    }

    /// Whether a pass runs: requests that would need what it may drop
    /// wait for it.
    pub fn running(&self) -> bool {
        self.waiting.is_some()
    }

    /// Whether [`Collector::MAX_WAITING`] requests wait already.
    pub fn full(&self) -> bool {
        self.waiting
            .as_ref()
            .is_some_and(|w| w.len() >= Self::MAX_WAITING)
    }

    /// Keeps `request` until the running pass ends.
    pub fn hold(&mut self, request: W) {
        let waiting = self.waiting.as_mut().expect("a pass runs");
        assert!(waiting.len() < Self::MAX_WAITING, "room to wait");
        waiting.push(request);
    }

    /// A pass ended: logs it, keeps what it found unused, and returns the
    /// requests that waited, to be carried out now.
    pub fn finish(&mut self, pass: Pass) -> Vec<W> {
        match pass {
            Ok((report, unused)) => {
                report.log();
                self.unused = unused;
            }
            Err(e) => tracing::warn!("collecting garbage: {e}"),
        }
        self.waiting.take().unwrap_or_default()
    }

    /// A request that names or stages a release is being read off the
    /// loop (an order prepared, chunks looked up): what it reads is not
    /// pinned or spared yet, so no pass starts until [`Collector::read`].
    pub fn reading(&mut self) {
        debug_assert!(!self.running(), "requests wait while a pass runs");
        self.reading += 1;
    }

    /// A request [`Collector::reading`] announced is back on the loop.
    pub fn read(&mut self) {
        self.reading = self.reading.checked_sub(1).expect("one reading each");
    }

    /// Chunks that are about to be named (an operator was told the store
    /// holds them): the next pass does not remove them.
    pub fn spare(&mut self, chunks: impl IntoIterator<Item = ChunkHash>) {
        for c in chunks {
            self.unused.remove(&c);
        }
    }
}

/// Gives the space of removed chunks back ([`Store::compact`]) on a
/// blocking thread, beside the store's writers; a failure is logged.
pub async fn compact_in_background(store: std::sync::Arc<dyn Store>) {
    match tokio::task::spawn_blocking(move || store.compact()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("compacting the store after a collection pass: {e}"),
        Err(e) => tracing::warn!("compacting the store after a collection pass: {e}"),
    }
}

/// What a collection keeps.
#[derive(Clone, Debug, Default)]
pub struct Retention {
    /// Named releases kept per app, newest (by arrival) first.
    pub newest: usize,
    /// Named releases kept whatever their age: active, previous, being
    /// delivered or staged.
    pub pinned: HashSet<ReleaseId>,
    /// Chunks kept whether or not a kept release names them: those of
    /// releases being staged, not named yet.
    pub pinned_chunks: HashSet<ChunkHash>,
}

/// Removes the named releases `retention` does not keep, then the chunks
/// no kept release or pin uses; [`Store::compact`] gives their space back
/// (it may run beside writers, so a daemon runs it after the pass). With
/// `unused_before` (the set the previous pass returned) only chunks that
/// were unused then too are removed: a chunk written or uploaded since,
/// and not yet named (a publish under way), survives at least one pass.
/// Returns what was done and the chunks unused now.
pub fn collect(
    store: &dyn Store,
    retention: &Retention,
    unused_before: Option<&HashSet<ChunkHash>>,
) -> Result<(GcReport, HashSet<ChunkHash>), StoreError> {
    let mut by_app: BTreeMap<String, Vec<Release>> = BTreeMap::new();
    for r in store.releases()? {
        by_app.entry(r.app.clone()).or_default().push(r);
    }
    let mut report = GcReport::default();
    let mut kept_ids: HashSet<ReleaseId> = retention.pinned.clone();
    for releases in by_app.values_mut() {
        releases.sort_by_key(|r| std::cmp::Reverse(r.seq));
        for (i, r) in releases.iter().enumerate() {
            let name = format!("{}@{}", r.app, r.version);
            if i < retention.newest || retention.pinned.contains(&r.id) {
                kept_ids.insert(r.id);
                report.kept.push(name);
            } else {
                store.delete_release(&r.app, &r.version)?;
                report.removed.push(name);
            }
        }
    }
    let mut used: HashSet<ChunkHash> = retention.pinned_chunks.clone();
    for id in &kept_ids {
        if let Some(m) = store.get_manifest(id)? {
            used.extend(m.chunk_refs().map(|c| c.hash));
        }
    }
    // A patch lives while both its releases do; its deltas with it.
    for (base, target) in store.patch_ends()? {
        if !(kept_ids.contains(&base) && kept_ids.contains(&target)) {
            store.delete_patch(&base, &target)?;
            report.patches_removed += 1;
        }
    }
    for id in &kept_ids {
        for patch in store.patches_to(id)? {
            used.extend(patch.delta_chunks().iter().map(|c| c.hash));
        }
    }
    let unused: HashSet<ChunkHash> = store
        .chunk_hashes()?
        .into_iter()
        .filter(|h| !used.contains(h))
        .collect();
    let doomed: Vec<ChunkHash> = match unused_before {
        Some(before) => unused.intersection(before).copied().collect(),
        None => unused.iter().copied().collect(),
    };
    report.stored_bytes_removed = store
        .chunk_info(&doomed)?
        .iter()
        .flatten()
        .map(|i| u64::from(i.stored_len))
        .sum();
    report.chunks_removed = doomed.len() as u64;
    for batch in doomed.chunks(VERIFY_BATCH * 16) {
        store.delete_chunks(batch)?;
    }
    let still_unused = match unused_before {
        Some(_) => unused
            .difference(&doomed.into_iter().collect())
            .copied()
            .collect(),
        None => HashSet::new(),
    };
    Ok((report, still_unused))
}
