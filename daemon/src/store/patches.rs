//! Making a release's deltas inside a store, once; rebuilding files from them.

use std::collections::HashMap;

use convoy_chunker::{
    apply_file, make_patch, read_file, ChunkHash, ChunkRef, ChunkSink, ChunkWriter, DeltaError,
    Manifest, Patch, PatchConfig, PatchFile, PatchStats,
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

/// What rebuilding a patch's files in a store gave.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// Files rebuilt, verified against the target manifest and stored.
    pub files: Vec<String>,
    /// Files that could not be, and why.
    pub failed: Vec<(String, String)>,
    /// Bytes of the rebuilt files.
    pub bytes: u64,
}

/// Rebuilds `files` (of a patch from `base` to `target`) in `store`: each
/// from its base file and its delta, both read from the store and every
/// chunk verified; the result re-chunked and checked against `target`'s
/// chunk list ([`convoy_chunker::apply_file`]) before its chunks are
/// stored. A file that fails is listed with the reason: its chunks are
/// to be fetched. Blocking.
pub fn rebuild_in_store(
    store: &dyn Store,
    base: &Manifest,
    target: &Manifest,
    files: &[PatchFile],
) -> Rebuilt {
    let bases: HashMap<&str, &[ChunkRef]> = base.files().collect();
    let targets: HashMap<&str, &[ChunkRef]> = target.files().collect();
    let source = StoreSource(store);
    let ingest = Ingest::new(store);
    let mut out = Rebuilt::default();
    for f in files {
        let one = || -> Result<u64, String> {
            let base_chunks = bases
                .get(f.base_path.as_str())
                .ok_or_else(|| format!("no {:?} in the base release", f.base_path))?;
            let expected = targets
                .get(f.path.as_str())
                .ok_or_else(|| "not a file of the release".to_string())?;
            let base_bytes =
                read_file(&source, &f.base_path, base_chunks).map_err(|e| e.to_string())?;
            let delta = read_file(&source, &f.path, &f.delta).map_err(|e| e.to_string())?;
            let bytes = apply_file(f, &base_bytes, &delta, expected).map_err(|e| e.to_string())?;
            let mut writer = (&ingest).writer();
            let mut at = 0;
            for c in expected.iter() {
                let end = at + c.len as usize;
                writer
                    .write(&bytes[at..end], c)
                    .map_err(|e| format!("cannot store a chunk: {e}"))?;
                at = end;
            }
            writer
                .finish()
                .map_err(|e| format!("cannot store a chunk: {e}"))?;
            Ok(bytes.len() as u64)
        };
        match one() {
            Ok(n) => {
                out.bytes += n;
                out.files.push(f.path.clone());
            }
            Err(why) => out.failed.push((f.path.clone(), why)),
        }
    }
    out
}
