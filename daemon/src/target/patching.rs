//! A target's side of a patch: checking the record an order carries and
//! choosing, per file, whether to rebuild it from its delta or fetch its
//! chunks. The delta chunks travel as a transfer unit of their own (see
//! [`patch_unit`]); the target's loop fetches them like a release's and
//! rebuilds the files with [`crate::store::rebuild_in_store`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use convoy_chunker::{plan_fetch, ChunkHash, ChunkRef, Manifest, Patch, PatchFile, ReleaseId};
use libp2p::identity::PublicKey;

use crate::net::serve::ChunkList;
use crate::protocol::{patch_unit, signed_patch_bytes, PatchedOrder};
use crate::store::Store;

/// A patch's files to rebuild once its delta chunks are held.
pub struct PatchJob {
    /// The release the files belong to.
    pub release: ReleaseId,
    /// The base release's manifest (held in the store).
    pub base: Manifest,
    /// The release's manifest.
    pub target: Arc<Manifest>,
    /// The files to rebuild.
    pub files: Vec<PatchFile>,
}

/// A patch taken with an order, planned against what the store holds.
pub struct PlannedPatch {
    /// The unit its delta chunks travel as.
    pub unit: ReleaseId,
    /// What to rebuild.
    pub job: Arc<PatchJob>,
    /// The patch's distinct delta chunks, in unit order.
    pub chunks: ChunkList,
    /// Which of them the store holds.
    pub held: Vec<bool>,
    /// Which of them not to fetch: the deltas of files fetched as chunks.
    pub unwanted: Vec<bool>,
    /// Indices, in the release's distinct chunks, of the chunks the
    /// rebuilt files give: not fetched unless a rebuild fails.
    pub rebuilt: Vec<u32>,
    /// Estimated wire bytes: the plan's, and without the patch.
    pub wire_bytes: u64,
    /// Estimated wire bytes of the release's missing chunks.
    pub wire_bytes_without: u64,
}

/// Decodes an order's patch record (its limits checked) and checks the
/// coordinator's signature over it: before any other work.
pub fn signed_patch(order: &PatchedOrder, key: &PublicKey) -> Result<Patch, String> {
    let patch =
        Patch::decode(&order.patch).map_err(|e| format!("refusing the patch record: {e}"))?;
    if !key.verify(&signed_patch_bytes(&patch.id()), &order.patch_signature) {
        return Err(format!(
            "patch {}: not signed by the coordinator this target trusts",
            patch.id()
        ));
    }
    Ok(patch)
}

/// Plans `patch` for a target whose store holds `held` of `target`'s
/// distinct `chunks`: per file, the delta or the missing chunks,
/// whichever is smaller ([`plan_fetch`]); a file is rebuilt only where the
/// store holds its whole base file. `None` when no file is worth
/// rebuilding. The patch must have been checked against both manifests
/// ([`Patch::check_against`]). Blocking: reads the store's index.
pub fn plan_patch(
    store: &dyn Store,
    patch: Patch,
    base: Manifest,
    target: Arc<Manifest>,
    chunks: &[ChunkRef],
    held: &[bool],
) -> Result<Option<PlannedPatch>, String> {
    let base_chunks = base.unique_chunks();
    let base_hashes: Vec<ChunkHash> = base_chunks.iter().map(|c| c.hash).collect();
    let base_held = store
        .contains_chunks(&base_hashes)
        .map_err(|e| e.to_string())?;
    let holding: HashSet<ChunkHash> = chunks
        .iter()
        .zip(held)
        .filter(|(_, h)| **h)
        .map(|(c, _)| c.hash)
        .chain(
            base_hashes
                .iter()
                .zip(&base_held)
                .filter(|(_, h)| **h)
                .map(|(c, _)| *c),
        )
        .collect();
    // A target knows only chunks' raw lengths; the record says what each
    // patched file's chunks weigh on the wire, so its chunks are weighed
    // at that file's ratio.
    let files: HashMap<&str, &[ChunkRef]> = target.files().collect();
    let mut ratio: HashMap<ChunkHash, f64> = HashMap::new();
    for f in patch.files() {
        let r = f.wire_bytes as f64 / f.size.max(1) as f64;
        for c in files.get(f.path.as_str()).copied().unwrap_or_default() {
            ratio.insert(c.hash, r);
        }
    }
    let wire_len = |c: &ChunkRef| {
        ratio
            .get(&c.hash)
            .map_or(u64::from(c.len), |r| (f64::from(c.len) * r).ceil() as u64)
    };
    let plan = plan_fetch(&target, &base, &patch, &|h| holding.contains(h), &wire_len);
    if plan.patched.is_empty() {
        return Ok(None);
    }
    let unit = patch_unit(&patch.id());
    let delta_chunks = patch.delta_chunks();
    let delta_hashes: Vec<ChunkHash> = delta_chunks.iter().map(|c| c.hash).collect();
    let delta_held = store
        .contains_chunks(&delta_hashes)
        .map_err(|e| e.to_string())?;
    let wanted: HashSet<ChunkHash> = plan.delta_chunks.iter().map(|c| c.hash).collect();
    let unwanted = delta_chunks
        .iter()
        .zip(&delta_held)
        .map(|(c, h)| !h && !wanted.contains(&c.hash))
        .collect();
    let fetched: HashSet<ChunkHash> = plan.chunks.iter().map(|c| c.hash).collect();
    let rebuilt = chunks
        .iter()
        .zip(held)
        .enumerate()
        .filter(|(_, (c, h))| !**h && !fetched.contains(&c.hash))
        .map(|(i, _)| i as u32)
        .collect();
    Ok(Some(PlannedPatch {
        unit,
        job: Arc::new(PatchJob {
            release: target.release_id(),
            base,
            target,
            files: plan.patched,
        }),
        chunks: Arc::new(delta_chunks),
        held: delta_held,
        unwanted,
        rebuilt,
        wire_bytes: plan.wire_bytes,
        wire_bytes_without: plan.wire_bytes_without_deltas,
    }))
}
