//! Making a release's deltas inside a store, once.

use std::collections::HashMap;

use convoy_chunker::{
    make_patch, ChunkHash, ChunkRef, DeltaError, Manifest, Patch, PatchConfig, PatchStats,
};

use super::{Ingest, Store, StoreError, StoreSource};

/// Why a patch could not be made in a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PatchError {
    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Making a delta failed.
    #[error(transparent)]
    Delta(#[from] DeltaError),
    /// A chunk of the target release is not in the store.
    #[error("release {release} has chunks missing from the store; run `convoy verify`")]
    Incomplete {
        /// `app@version`.
        release: String,
    },
}

/// The stored (wire) length of every distinct chunk of `manifest`.
pub fn wire_lens(
    store: &dyn Store,
    manifest: &Manifest,
) -> Result<HashMap<ChunkHash, u64>, PatchError> {
    let unique = manifest.unique_chunks();
    let hashes: Vec<ChunkHash> = unique.iter().map(|c| c.hash).collect();
    let infos = store.chunk_info(&hashes)?;
    hashes
        .into_iter()
        .zip(infos)
        .map(|(h, info)| match info {
            Some(i) => Ok((h, u64::from(i.stored_len))),
            None => Err(PatchError::Incomplete {
                release: format!("{}@{}", manifest.app(), manifest.version()),
            }),
        })
        .collect()
}

/// The patch from `base` to `target` in `store`: the stored one if there
/// is one (so a restarted origin does not make it again, and `None` for
/// the stats), else made now from the store's chunks, its deltas flushed,
/// then the record stored.
pub fn patch_in_store(
    store: &dyn Store,
    base: &Manifest,
    target: &Manifest,
    config: &PatchConfig,
) -> Result<(Patch, Option<PatchStats>), PatchError> {
    let base_id = base.release_id();
    if let Some(p) = store
        .patches_to(&target.release_id())?
        .into_iter()
        .find(|p| p.base() == base_id)
    {
        return Ok((p, None));
    }
    // A base chunk missing from the store fails the read that needs it,
    // naming its file.
    let wire = wire_lens(store, target)?;
    let wire_len = |c: &ChunkRef| wire.get(&c.hash).copied().unwrap_or(u64::from(c.len));
    let ingest = Ingest::new(store);
    let (patch, stats) = make_patch(
        base,
        target,
        &StoreSource(store),
        &wire_len,
        &&ingest,
        config,
    )?;
    store.flush()?;
    store.put_patch(&patch)?;
    Ok((patch, Some(stats)))
}
