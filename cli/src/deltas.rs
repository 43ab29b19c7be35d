//! The CLI's side of binary deltas: made after a pack, reported by diff
//! and inspect.

use std::collections::HashSet;

use anyhow::Result;
use convoy_chunker::{plan_fetch, ChunkRef, FetchPlan, Manifest, Patch, PatchConfig, PatchStats};
use convoy_daemon::store::{patch_in_store, wire_lens, Release, RocksStore, Store};
use serde_json::{json, Value};

use indicatif::BinaryBytes;

/// One patch made (or found) for a release.
pub struct Made {
    /// The base's `app@version`.
    pub base: String,
    /// The patch.
    pub patch: Patch,
    /// What making it cost; `None` when it was stored already.
    pub stats: Option<PatchStats>,
}

impl Made {
    pub fn json(&self) -> Value {
        json!({
            "base": self.base,
            "patch_id": self.patch.id().to_hex(),
            "files": self.patch.files().len(),
            "delta_bytes": self.patch.delta_bytes(),
            "made": self.stats,
        })
    }

    pub fn line(&self) -> String {
        let took = match &self.stats {
            Some(s) => format!(
                " in {:.2}s ({} changed, {:.1} MiB/s per core)",
                s.seconds,
                BinaryBytes(s.changed_bytes),
                mib_per_cpu_second(s)
            ),
            None => " (stored already)".into(),
        };
        format!(
            "deltas from {}: {} files, {}{took}",
            self.base,
            self.patch.files().len(),
            BinaryBytes(self.patch.delta_bytes())
        )
    }
}

fn mib_per_cpu_second(s: &PatchStats) -> f64 {
    if s.cpu_seconds > 0.0 {
        s.changed_bytes as f64 / (1 << 20) as f64 / s.cpu_seconds
    } else {
        0.0
    }
}

/// Makes the patches into `target` from the newest `count` other releases
/// of its app in the store (by arrival), reusing those already stored.
pub fn after_pack(store: &RocksStore, target: &Manifest, count: usize) -> Result<Vec<Made>> {
    let id = target.release_id();
    let mut bases: Vec<Release> = store
        .releases()?
        .into_iter()
        .filter(|r| r.app == target.app() && r.id != id)
        .collect();
    bases.sort_by_key(|r| std::cmp::Reverse(r.seq));
    let mut seen = HashSet::new();
    let mut made = Vec::new();
    for r in bases.into_iter().filter(|r| seen.insert(r.id)).take(count) {
        let Some(base) = store.get_manifest(&r.id)? else {
            continue;
        };
        made.push(make(store, &base, target)?);
    }
    Ok(made)
}

/// The patch from `base` to `target`, made now if none is stored.
pub fn make(store: &RocksStore, base: &Manifest, target: &Manifest) -> Result<Made> {
    let (patch, stats) = patch_in_store(store, base, target, &PatchConfig::default())?;
    Ok(Made {
        base: format!("{}@{}", base.app(), base.version()),
        patch,
        stats,
    })
}

/// What a holder of `from` fetches to get `to` with the patch: the plan,
/// with wire lengths from the store.
pub fn plan(
    store: &RocksStore,
    from: &Manifest,
    to: &Manifest,
    patch: &Patch,
) -> Result<FetchPlan> {
    let wire = wire_lens(store, to)?;
    let held: HashSet<_> = from.chunk_refs().map(|c| c.hash).collect();
    let wire_len = |c: &ChunkRef| wire.get(&c.hash).copied().unwrap_or(u64::from(c.len));
    Ok(plan_fetch(
        to,
        from,
        patch,
        &|h| held.contains(h),
        &wire_len,
    ))
}

/// The files a plan rebuilds from deltas, for `--json`.
pub fn plan_files(plan: &FetchPlan) -> Vec<Value> {
    plan.patched
        .iter()
        .map(|f| {
            json!({
                "path": f.path,
                "base_path": f.base_path,
                "delta_bytes": f.delta_len(),
                "size": f.size,
            })
        })
        .collect()
}
