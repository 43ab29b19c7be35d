//! The origin's deltas: after a release is published, the patches into it
//! from the app's recent releases (and those the fleet runs) are made in
//! the background, one release at a time, while no collection pass runs.
//! Publishing never waits for them. A patch already in the store is not
//! made again, so a restarted origin picks up where it stopped: at start,
//! the newest release of every app is due again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use convoy_chunker::{plan_fetch, ChunkHash, ChunkRef, Manifest, PatchConfig, ReleaseId};
use libp2p::identity::Keypair;
use tracing::{info, warn};

use crate::net::serve::ChunkList;
use crate::protocol::{patch_unit, signed_patch_bytes, DeltasReport, PatchSummary};
use crate::store::{patch_in_store, Release, Store};

/// Releases waiting for their deltas, at most; past this the oldest is
/// dropped (its deltas are made when it is due again, or never: a release
/// published 64 releases ago matters little).
const MAX_DUE: usize = 64;

/// What the origin's delta making has done, for `/metrics`.
#[derive(Default)]
pub struct DeltaCounters {
    /// Patches made.
    pub made: AtomicU64,
    /// Patches found in the store already (not made again).
    pub reused: AtomicU64,
    /// Patches that could not be made.
    pub failed: AtomicU64,
    /// Bytes of the deltas made.
    pub delta_bytes: AtomicU64,
    /// Bytes of the changed files they were made from.
    pub changed_bytes: AtomicU64,
    /// Wire bytes of the new chunks the deltas replace, for a holder of
    /// each base.
    pub replaced_wire_bytes: AtomicU64,
    /// CPU microseconds of the delta making, over threads.
    pub cpu_micros: AtomicU64,
    /// Staging orders targets took with a patch.
    pub orders: AtomicU64,
    /// Wire bytes those targets were spared, as planned for a holder of
    /// the patch's base (a file whose rebuild fails is fetched after all).
    pub spared_wire_bytes: AtomicU64,
}

/// A patch a staging offers to targets holding its base.
pub(super) struct Offer {
    /// The unit its delta chunks travel as.
    pub unit: ReleaseId,
    /// The encoded record.
    pub record: Vec<u8>,
    /// The coordinator's signature over it.
    pub signature: Vec<u8>,
    /// Its distinct delta chunks.
    pub chunks: ChunkList,
    /// The staging's manifest as a delta against the base's, where that
    /// is under half the whole.
    pub manifest_delta: Option<Vec<u8>>,
    /// Wire bytes a target holding the base is spared ([`plan_fetch`]).
    pub spared: u64,
}

/// The patches into `manifest` in `store`, signed, by base; `wire` gives
/// the stored length of the release's chunks. Blocking; a patch whose
/// base cannot be read is left out.
pub(super) fn offers(
    store: &dyn Store,
    manifest: &Manifest,
    keypair: &Keypair,
    wire: &HashMap<ChunkHash, u64>,
) -> HashMap<ReleaseId, Offer> {
    let Ok(patches) = store.patches_to(&manifest.release_id()) else {
        return HashMap::new();
    };
    let whole = manifest.encode().len();
    let wire_len = |c: &ChunkRef| wire.get(&c.hash).copied().unwrap_or(u64::from(c.len));
    patches
        .into_iter()
        .filter_map(|patch| {
            let base = store.get_manifest(&patch.base()).ok()??;
            let in_base: HashSet<ChunkHash> = base.unique_chunks().iter().map(|c| c.hash).collect();
            let plan = plan_fetch(manifest, &base, &patch, &|h| in_base.contains(h), &wire_len);
            if plan.patched.is_empty() {
                return None;
            }
            let delta = convoy_chunker::manifest_delta(&base, manifest);
            let signature = keypair.sign(&signed_patch_bytes(&patch.id())).ok()?;
            Some((
                patch.base(),
                Offer {
                    unit: patch_unit(&patch.id()),
                    record: patch.encode(),
                    signature,
                    chunks: Arc::new(patch.delta_chunks()),
                    manifest_delta: (delta.len() < whole / 2).then_some(delta),
                    spared: plan.wire_bytes_without_deltas - plan.wire_bytes,
                },
            ))
        })
        .collect()
}

/// What the origin holds of the patches into `release`. Blocking.
pub(super) fn report(
    store: &dyn Store,
    release: ReleaseId,
    pending: bool,
) -> Result<DeltasReport, String> {
    let patches = store.patches_to(&release).map_err(|e| e.to_string())?;
    let releases = store.releases().map_err(|e| e.to_string())?;
    let name = |id: ReleaseId| {
        releases
            .iter()
            .find(|r| r.id == id)
            .map(|r| format!("{}@{}", r.app, r.version))
    };
    Ok(DeltasReport {
        release,
        pending,
        patches: patches
            .iter()
            .map(|p| PatchSummary {
                base: p.base(),
                base_name: name(p.base()),
                files: p.files().len() as u32,
                delta_bytes: p.delta_bytes(),
            })
            .collect(),
    })
}

/// The loop's side: which releases are due, whether a job runs.
pub(super) struct Deltas {
    /// Older releases of the app to make patches from (besides those the
    /// fleet runs); 0 turns delta making off.
    bases: usize,
    due: VecDeque<ReleaseId>,
    /// The release whose deltas are being made.
    running: Option<ReleaseId>,
    pub(super) counters: Arc<DeltaCounters>,
    /// Threads that make deltas: all cores but one, at the lowest
    /// priority, so serving chunks is never starved: a delta is worth
    /// making only while the CPU has nothing more urgent to do.
    pool: Option<Arc<rayon::ThreadPool>>,
}

/// The calling thread's id, which Linux's priority calls take.
fn thread_id() -> libc::id_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

/// Gives the calling thread the lowest scheduling priority (nice 19;
/// Linux keeps a nice value per thread). A failure only costs speed.
fn lowest_priority() {
    // SAFETY: setpriority only reads its arguments.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, thread_id(), 19) };
    if rc != 0 {
        warn!(
            "cannot lower a delta thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Deltas {
    pub(super) fn new(bases: usize) -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get().saturating_sub(1).max(1))
            .unwrap_or(1);
        let pool = (bases > 0)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("convoy-delta-{i}"))
                    .start_handler(|_| lowest_priority())
                    .build()
                    .map_err(|e| warn!("no threads for deltas, none are made: {e}"))
                    .ok()
            })
            .flatten()
            .map(Arc::new);
        Self {
            bases,
            due: VecDeque::new(),
            running: None,
            counters: Arc::default(),
            pool,
        }
    }

    /// `release`'s deltas are due.
    pub(super) fn due(&mut self, release: ReleaseId) {
        if self.pool.is_none() || self.due.contains(&release) {
            return;
        }
        if self.due.len() >= MAX_DUE {
            self.due.pop_front();
        }
        self.due.push_back(release);
    }

    /// The newest release of every app, at start.
    pub(super) fn resume(&mut self, releases: &[Release]) {
        let mut newest: std::collections::HashMap<&str, &Release> = Default::default();
        for r in releases {
            let e = newest.entry(r.app.as_str()).or_insert(r);
            if r.seq > e.seq {
                *e = r;
            }
        }
        let mut apps: Vec<&&Release> = newest.values().collect();
        apps.sort_by_key(|r| r.seq);
        for r in apps {
            self.due(r.id);
        }
    }

    /// The next job, unless one runs: the release and the settings.
    pub(super) fn next(&mut self) -> Option<Job> {
        let pool = self.pool.clone().filter(|_| self.running.is_none())?;
        let release = self.due.pop_front()?;
        self.running = Some(release);
        Some(Job {
            release,
            bases: self.bases,
            pool,
            counters: self.counters.clone(),
            active: Vec::new(),
        })
    }

    /// The job ended.
    pub(super) fn done(&mut self) {
        self.running = None;
    }

    /// Whether `release`'s deltas are being made or due.
    pub(super) fn pending(&self, release: &ReleaseId) -> bool {
        self.running == Some(*release) || self.due.contains(release)
    }
}

/// One release's deltas, made off the loop.
pub(super) struct Job {
    pub(super) release: ReleaseId,
    bases: usize,
    pool: Arc<rayon::ThreadPool>,
    counters: Arc<DeltaCounters>,
    /// The `(app, version)`s the fleet runs: patches from them are made too.
    pub(super) active: Vec<(String, String)>,
}

impl Job {
    /// Makes the patches into the release from the newest `bases` older
    /// releases of its app and those the fleet runs. Blocking.
    pub(super) fn run(self, store: &dyn Store) {
        let Ok(Some(target)) = store.get_manifest(&self.release) else {
            return; // collected since, or unreadable: nothing to make
        };
        let releases = match store.releases() {
            Ok(r) => r,
            Err(e) => {
                warn!(release = %self.release, "deltas not made: {e}");
                return;
            }
        };
        let app = target.app();
        let seq = releases
            .iter()
            .filter(|r| r.id == self.release)
            .map(|r| r.seq)
            .max()
            .unwrap_or(u64::MAX);
        let mut older: Vec<&Release> = releases
            .iter()
            .filter(|r| r.app == app && r.id != self.release && r.seq < seq)
            .collect();
        older.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let mut seen = HashSet::new();
        let bases: Vec<&Release> = older
            .iter()
            .filter(|r| seen.insert(r.id))
            .take(self.bases)
            .chain(
                older
                    .iter()
                    .filter(|r| self.active.contains(&(r.app.clone(), r.version.clone()))),
            )
            .copied()
            .collect();
        let mut made = HashSet::new();
        for base in bases {
            if !made.insert(base.id) {
                continue;
            }
            let Ok(Some(from)) = store.get_manifest(&base.id) else {
                continue;
            };
            let started = Instant::now();
            let result = self
                .pool
                .install(|| patch_in_store(store, &from, &target, &PatchConfig::default()));
            let c = &self.counters;
            match result {
                Ok((_, None)) => {
                    c.reused.fetch_add(1, Ordering::Relaxed);
                }
                Ok((patch, Some(stats))) => {
                    c.made.fetch_add(1, Ordering::Relaxed);
                    c.delta_bytes
                        .fetch_add(stats.delta_bytes, Ordering::Relaxed);
                    c.changed_bytes
                        .fetch_add(stats.changed_bytes, Ordering::Relaxed);
                    c.replaced_wire_bytes
                        .fetch_add(stats.replaced_wire_bytes, Ordering::Relaxed);
                    c.cpu_micros
                        .fetch_add((stats.cpu_seconds * 1e6) as u64, Ordering::Relaxed);
                    info!(
                        from = %format!("{}@{}", base.app, base.version),
                        to = %format!("{app}@{}", target.version()),
                        files = patch.files().len(),
                        delta_bytes = stats.delta_bytes,
                        replaces_wire_bytes = stats.replaced_wire_bytes,
                        changed_bytes = stats.changed_bytes,
                        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
                        max_delta_input_bytes = stats.max_delta_input_bytes,
                        "deltas made"
                    );
                }
                Err(e) => {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    warn!(from = %format!("{}@{}", base.app, base.version),
                          to = %format!("{app}@{}", target.version()), "deltas not made: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_are_made_at_the_lowest_priority() {
        let deltas = Deltas::new(1);
        let pool = deltas.pool.as_ref().expect("a pool when bases > 0");
        let nice = pool.install(|| {
            // SAFETY: getpriority only reads its arguments.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, thread_id()) }
        });
        assert_eq!(nice, 19);
    }
}
