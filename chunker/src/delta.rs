//! Binary deltas between releases, and the patch record that lists them.
//!
//! A delta rebuilds one file of a release from one file of an older release
//! of the same app: zstd with the base file as a reference prefix,
//! long-distance matching on and a window that covers the base. The deltas
//! from a base release to a target release are chunked and named like any
//! file's content, and a [`Patch`] lists them: per patched file, the base
//! file it starts from (path and [`file_digest`]), the delta's chunks and
//! the result's size. Whoever applies a delta re-chunks the result and
//! checks it against the target's manifest ([`apply_file`]): a wrong base,
//! a corrupt delta or a lying record gives an error, never a wrong file.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::chunk::{chunk_slice, ChunkHash, ChunkRef, MAX_CHUNK_SIZE};
use crate::codec::{self, DecodeError};
use crate::manifest::{limits, EntryKind, Manifest, ReleaseId};
use crate::materialise::ChunkSource;
use crate::pack::{ChunkSink, ChunkWriter};
use crate::BoxError;

/// First bytes of an encoded [`Patch`].
pub const PATCH_MAGIC: [u8; 4] = *b"CVYP";

/// The largest file, base or result, a delta is made for: 256 MiB. Making
/// a delta holds both in memory, with zstd's window over them.
pub const MAX_DELTA_FILE_BYTES: u64 = 256 << 20;

/// The zstd level deltas are made at. Measured with `delta-bench --level`
/// on the six release pairs of `scripts/fetch-pairs.py`: level 3 makes
/// 15% more delta bytes at 2.3 times the speed (200 against 86 MiB of
/// changed input per CPU second); level 19 makes 32% fewer at 3 MiB/s,
/// below the 5 MiB/s per core a release's deltas must be made at.
pub const DELTA_LEVEL: i32 = 9;

/// The name of a patch: BLAKE3 of its encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PatchId(pub [u8; 32]);

impl PatchId {
    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        ChunkHash(self.0).to_hex()
    }
}

impl std::fmt::Display for PatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for PatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PatchId({})", &self.to_hex()[..16])
    }
}

/// What names a file's content in a patch: BLAKE3 over its chunk list
/// (each chunk's hash and length). Chunks are verified by their hashes, so
/// this names the bytes as surely as hashing them, without reading them.
pub fn file_digest(chunks: &[ChunkRef]) -> ChunkHash {
    let mut h = blake3::Hasher::new();
    h.update(b"convoy file v1 ");
    for c in chunks {
        h.update(&c.hash.0);
        h.update(&c.len.to_le_bytes());
    }
    ChunkHash(*h.finalize().as_bytes())
}

/// One file a patch rebuilds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchFile {
    /// The file's path in the target release.
    pub path: String,
    /// The base file's path in the base release (the same path, or where
    /// the file was before a move).
    pub base_path: String,
    /// [`file_digest`] of the base file.
    pub base_digest: ChunkHash,
    /// The delta's bytes, chunked.
    pub delta: Vec<ChunkRef>,
    /// The rebuilt file's size.
    pub size: u64,
    /// The stored (wire) bytes of the file's distinct chunks, so that a
    /// target, which knows only their raw lengths, can weigh the delta
    /// against fetching them ([`plan_fetch`]).
    pub wire_bytes: u64,
}

impl PatchFile {
    /// The delta's length in bytes.
    pub fn delta_len(&self) -> u64 {
        self.delta.iter().map(|c| u64::from(c.len)).sum()
    }
}

/// The deltas that rebuild files of `target` from files of `base`.
///
/// A `Patch` obeys its own limits by construction ([`Patch::decode`]
/// refuses what breaks them); [`Patch::check_against`] checks it against
/// the two manifests before a byte of it is fetched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    base: ReleaseId,
    target: ReleaseId,
    files: Vec<PatchFile>,
}

/// Why a patch record is refused, or a delta is not made or not applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// The bytes are not a patch record.
    #[error("corrupt patch record: {0}")]
    Decode(#[from] DecodeError),
    /// The record breaks a limit or does not match the releases it names.
    #[error("patch record refused: {0}")]
    Invalid(String),
    /// A file too large to make or apply a delta for.
    #[error("{path}: {size} bytes is more than deltas are made for ({max} bytes)", max = MAX_DELTA_FILE_BYTES)]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// zstd failed to make or apply the delta (a corrupt delta, or one for
    /// another base).
    #[error("{path}: the delta does not apply: {reason}")]
    Zstd {
        /// The file.
        path: String,
        /// What zstd said.
        reason: String,
    },
    /// The rebuilt file is not the one the target release lists.
    #[error("{path}: the rebuilt file does not match the release (wrong base or corrupt delta)")]
    Mismatch {
        /// The file.
        path: String,
    },
    /// A chunk of a base file or of a delta could not be read.
    #[error("{path}: {source}")]
    Source {
        /// The file it belongs to.
        path: String,
        /// What the source said.
        source: BoxError,
    },
    /// The sink refused a delta chunk.
    #[error("{path}: storing the delta failed: {source}")]
    Sink {
        /// The file.
        path: String,
        /// What the sink said.
        source: BoxError,
    },
}

impl Patch {
    /// A patch from `base` to `target` rebuilding `files` (any order).
    pub fn new(base: ReleaseId, target: ReleaseId, mut files: Vec<PatchFile>) -> Self {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let patch = Self {
            base,
            target,
            files,
        };
        debug_assert!(patch.validate().is_ok());
        patch
    }

    /// Decodes a patch record and checks its own limits.
    pub fn decode(bytes: &[u8]) -> Result<Self, DeltaError> {
        let patch: Self = codec::decode_as(PATCH_MAGIC, bytes)?;
        patch.validate()?;
        Ok(patch)
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_as(PATCH_MAGIC, self)
    }

    /// BLAKE3 of [`Patch::encode`].
    pub fn id(&self) -> PatchId {
        PatchId(*blake3::hash(&self.encode()).as_bytes())
    }

    /// The release the deltas start from.
    pub fn base(&self) -> ReleaseId {
        self.base
    }

    /// The release they rebuild.
    pub fn target(&self) -> ReleaseId {
        self.target
    }

    /// The patched files, sorted by path.
    pub fn files(&self) -> &[PatchFile] {
        &self.files
    }

    /// Every delta chunk once, in order of first use.
    pub fn delta_chunks(&self) -> Vec<ChunkRef> {
        let mut seen = HashSet::new();
        self.files
            .iter()
            .flat_map(|f| &f.delta)
            .filter(|c| seen.insert(c.hash))
            .copied()
            .collect()
    }

    /// The deltas' bytes (distinct chunks).
    pub fn delta_bytes(&self) -> u64 {
        self.delta_chunks().iter().map(|c| u64::from(c.len)).sum()
    }

    /// Checks the limits a record obeys whatever releases it names: files
    /// sorted and unique, at most [`limits::MAX_ENTRIES`], sizes within
    /// [`MAX_DELTA_FILE_BYTES`], each delta non-empty, of valid chunks and
    /// smaller than its result (a delta is kept only where it saves).
    pub fn validate(&self) -> Result<(), DeltaError> {
        let bad = |m: String| Err(DeltaError::Invalid(m));
        if self.files.len() > limits::MAX_ENTRIES {
            return bad(format!("{} files", self.files.len()));
        }
        let mut previous: Option<&str> = None;
        for f in &self.files {
            if f.path.len() > limits::MAX_PATH_BYTES || f.base_path.len() > limits::MAX_PATH_BYTES {
                return bad("a path is too long".into());
            }
            if previous.is_some_and(|p| p >= f.path.as_str()) {
                return bad(format!("{:?} is out of order or repeated", f.path));
            }
            previous = Some(&f.path);
            if f.size > MAX_DELTA_FILE_BYTES {
                return bad(format!("{:?}: result of {} bytes", f.path, f.size));
            }
            if f.delta.is_empty()
                || f.delta
                    .iter()
                    .any(|c| c.len == 0 || c.len as usize > MAX_CHUNK_SIZE)
            {
                return bad(format!("{:?}: empty delta or bad chunk length", f.path));
            }
            if f.wire_bytes > f.size {
                return bad(format!(
                    "{:?}: {} wire bytes for a {}-byte file",
                    f.path, f.wire_bytes, f.size
                ));
            }
            if f.delta_len() >= f.size.max(1) {
                return bad(format!(
                    "{:?}: a delta of {} bytes for a {}-byte file",
                    f.path,
                    f.delta_len(),
                    f.size
                ));
            }
        }
        Ok(())
    }

    /// Checks that this patch goes from `base` to `target`: every file a
    /// file of `target` of the stated size, every base a file of `base`
    /// with the stated digest.
    pub fn check_against(&self, base: &Manifest, target: &Manifest) -> Result<(), DeltaError> {
        let bad = |m: String| Err(DeltaError::Invalid(m));
        if base.release_id() != self.base || target.release_id() != self.target {
            return bad("it names other releases".into());
        }
        let base_files = files_by_path(base);
        let target_files = files_by_path(target);
        for f in &self.files {
            match target_files.get(f.path.as_str()) {
                Some((size, _)) if *size == f.size => {}
                _ => {
                    return bad(format!(
                        "{:?} is not a file of that size in the target",
                        f.path
                    ))
                }
            }
            match base_files.get(f.base_path.as_str()) {
                Some((_, chunks)) if file_digest(chunks) == f.base_digest => {}
                _ => {
                    return bad(format!(
                        "{:?} is not a file with that content in the base",
                        f.base_path
                    ))
                }
            }
        }
        Ok(())
    }
}

fn files_by_path(m: &Manifest) -> HashMap<&str, (u64, &[ChunkRef])> {
    m.entries()
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File { size, chunks, .. } => Some((e.path.as_str(), (*size, &chunks[..]))),
            _ => None,
        })
        .collect()
}

/// zstd's window for a delta: covers the base and the result.
fn window_log(base: usize, result: usize) -> u32 {
    let span = (base + result).max(1) as u64;
    (64 - (span - 1).leading_zeros()).clamp(10, 30)
}

/// A delta that rebuilds `new` from `base` (zstd, `base` as reference prefix).
pub fn make_delta(base: &[u8], new: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, base)?;
    encoder.window_log(window_log(base.len(), new.len()))?;
    encoder.long_distance_matching(true)?;
    encoder.include_checksum(false)?;
    encoder.set_pledged_src_size(Some(new.len() as u64))?;
    encoder.include_contentsize(true)?;
    encoder.write_all(new)?;
    encoder.finish()
}

/// Applies a delta made by [`make_delta`] to `base`; refuses a result
/// longer than `size` (a hostile delta cannot make it allocate more).
pub fn apply_delta(base: &[u8], delta: &[u8], size: u64) -> std::io::Result<Vec<u8>> {
    let mut decoder = zstd::stream::read::Decoder::with_ref_prefix(delta, base)?;
    decoder.window_log_max(window_log(base.len(), size as usize))?;
    let mut out = Vec::with_capacity(size as usize);
    decoder.take(size + 1).read_to_end(&mut out)?;
    if out.len() as u64 != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} bytes rebuilt, {size} expected", out.len()),
        ));
    }
    Ok(out)
}

/// Rebuilds one patched file from its base's bytes and its delta's bytes,
/// and checks it: re-chunked with the pinned FastCDC parameters, it must
/// give exactly `expected` (the target manifest's chunk list). Returns the
/// file's bytes; each of `expected`'s chunks is a slice of them.
pub fn apply_file(
    file: &PatchFile,
    base: &[u8],
    delta: &[u8],
    expected: &[ChunkRef],
) -> Result<Vec<u8>, DeltaError> {
    if file.size > MAX_DELTA_FILE_BYTES || base.len() as u64 > MAX_DELTA_FILE_BYTES {
        return Err(DeltaError::TooLarge {
            path: file.path.clone(),
            size: file.size.max(base.len() as u64),
        });
    }
    let out = apply_delta(base, delta, file.size).map_err(|e| DeltaError::Zstd {
        path: file.path.clone(),
        reason: e.to_string(),
    })?;
    let mut i = 0;
    let matched = chunk_slice(&out, |_, c| {
        let ok = expected.get(i) == Some(&c);
        i += 1;
        if ok {
            Ok(())
        } else {
            Err(())
        }
    });
    if matched.is_err() || i != expected.len() {
        return Err(DeltaError::Mismatch {
            path: file.path.clone(),
        });
    }
    Ok(out)
}

/// The encoding of `target`'s manifest as a delta against `base`'s: what a
/// holder of `base` is sent instead of the whole manifest. An upgrade's
/// manifest repeats most of its base's chunk names, which no compressor
/// can shrink otherwise (32 random bytes each).
pub fn manifest_delta(base: &Manifest, target: &Manifest) -> Vec<u8> {
    make_delta(&base.encode(), &target.encode(), DELTA_LEVEL)
        .expect("zstd makes a delta of in-memory bytes")
}

/// Rebuilds the manifest [`manifest_delta`] encoded from its base's, and
/// decodes and validates it. Whoever trusts it checks its release id
/// (the signature over it): a delta applied to another base may still
/// rebuild a valid manifest, only never the one signed.
pub fn apply_manifest_delta(base: &Manifest, delta: &[u8]) -> Result<Manifest, DeltaError> {
    let encoded =
        apply_bounded(&base.encode(), delta, limits::MAX_ENCODED_BYTES as u64).map_err(|e| {
            DeltaError::Zstd {
                path: "(manifest)".into(),
                reason: e.to_string(),
            }
        })?;
    Ok(Manifest::decode(&encoded)?)
}

/// Applies a delta whose result's size is unknown but at most `max`.
fn apply_bounded(base: &[u8], delta: &[u8], max: u64) -> std::io::Result<Vec<u8>> {
    let mut decoder = zstd::stream::read::Decoder::with_ref_prefix(delta, base)?;
    decoder.window_log_max(window_log(base.len(), max as usize))?;
    let mut out = Vec::new();
    decoder.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {max} bytes"),
        ));
    }
    Ok(out)
}

/// Reads a whole file from its chunks, each verified.
pub fn read_file(
    source: &dyn ChunkSource,
    path: &str,
    chunks: &[ChunkRef],
) -> Result<Vec<u8>, DeltaError> {
    let size: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
    let mut out = Vec::with_capacity(size as usize);
    for c in chunks {
        let raw = source
            .stored_chunk(c)
            .and_then(|s| s.into_verified(c).map_err(BoxError::from))
            .map_err(|source| DeltaError::Source {
                path: path.into(),
                source,
            })?;
        out.extend_from_slice(&raw);
    }
    Ok(out)
}

/// What making a patch found and cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PatchStats {
    /// Target files with content the base lacks.
    pub files_changed: usize,
    /// Of those, files for which a delta was made (a base file was found,
    /// both within [`MAX_DELTA_FILE_BYTES`]).
    pub files_tried: usize,
    /// Files too large for a delta.
    pub files_too_large: usize,
    /// Deltas kept (smaller than the chunks they replace).
    pub files_patched: usize,
    /// Bytes of the changed files: the input deltas were made from.
    pub changed_bytes: u64,
    /// The kept deltas' bytes.
    pub delta_bytes: u64,
    /// Wire bytes of the new chunks the kept deltas replace.
    pub replaced_wire_bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// CPU time summed over threads, of the delta making alone.
    pub cpu_seconds: f64,
    /// The most input one delta held in memory (base + result + delta);
    /// zstd's own tables come on top.
    pub max_delta_input_bytes: u64,
}

/// How to make a patch.
#[derive(Clone, Debug)]
pub struct PatchConfig {
    /// zstd level.
    pub level: i32,
    /// Largest base or result file, at most [`MAX_DELTA_FILE_BYTES`].
    pub max_file_bytes: u64,
}

impl Default for PatchConfig {
    fn default() -> Self {
        Self {
            level: DELTA_LEVEL,
            max_file_bytes: MAX_DELTA_FILE_BYTES,
        }
    }
}

/// Makes the deltas from `base` to `target` and the patch that lists them,
/// on rayon's current pool. `source` holds both releases' chunks;
/// `wire_len` is a chunk's stored (on the wire) length; the deltas' chunks
/// go to `sink`. A file keeps its delta only where the delta is smaller
/// than the wire bytes of the file's chunks `base` lacks (rebuilding the
/// file yields them all); [`plan_fetch`] then weighs each delta against
/// what a given target lacks, so no target fetches more with the patch
/// than without.
pub fn make_patch<S: ChunkSink>(
    base: &Manifest,
    target: &Manifest,
    source: &dyn ChunkSource,
    wire_len: &(dyn Fn(&ChunkRef) -> u64 + Sync),
    sink: &S,
    config: &PatchConfig,
) -> Result<(Patch, PatchStats), DeltaError> {
    let started = Instant::now();
    let held: HashSet<ChunkHash> = base.chunk_refs().map(|c| c.hash).collect();
    let bases = BaseIndex::new(base);
    let mut stats = PatchStats::default();
    let mut jobs = Vec::new();
    for (path, chunks) in target.files() {
        let fresh: Vec<&ChunkRef> = {
            let mut seen = HashSet::new();
            chunks
                .iter()
                .filter(|c| !held.contains(&c.hash) && seen.insert(c.hash))
                .collect()
        };
        if fresh.is_empty() {
            continue;
        }
        stats.files_changed += 1;
        let size: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        stats.changed_bytes += size;
        let Some((base_path, base_chunks)) = bases.best_for(path, chunks) else {
            continue;
        };
        let base_size: u64 = base_chunks.iter().map(|c| u64::from(c.len)).sum();
        if size.max(base_size) > config.max_file_bytes.min(MAX_DELTA_FILE_BYTES) {
            stats.files_too_large += 1;
            continue;
        }
        // Rebuilding the file yields all its chunks: the delta replaces
        // the fetch of every one the base lacks.
        let saving: u64 = fresh.iter().map(|c| wire_len(c)).sum();
        let wire_bytes: u64 = distinct(chunks).map(wire_len).sum();
        stats.files_tried += 1;
        jobs.push(FileJob {
            path,
            chunks,
            base_path,
            base_chunks,
            size,
            saving,
            wire_bytes,
        });
    }
    let tried: Vec<Result<Tried, DeltaError>> = jobs
        .par_iter()
        .map(|job| job.run(source, sink, config.level))
        .collect();
    let mut files = Vec::new();
    let mut cpu = Duration::ZERO;
    for t in tried {
        let t = t?;
        // Every delta made counts, kept or not.
        cpu += t.took;
        stats.max_delta_input_bytes = stats.max_delta_input_bytes.max(t.held_bytes);
        if let Some(file) = t.kept {
            stats.delta_bytes += file.delta_len();
            stats.replaced_wire_bytes += t.saving;
            files.push(file);
        }
    }
    stats.files_patched = files.len();
    stats.cpu_seconds = cpu.as_secs_f64();
    stats.seconds = started.elapsed().as_secs_f64();
    Ok((
        Patch::new(base.release_id(), target.release_id(), files),
        stats,
    ))
}

/// One file's delta to make.
struct FileJob<'a> {
    path: &'a str,
    chunks: &'a [ChunkRef],
    base_path: &'a str,
    base_chunks: &'a [ChunkRef],
    size: u64,
    /// Wire bytes of the file's chunks the base lacks.
    saving: u64,
    /// Wire bytes of all its distinct chunks.
    wire_bytes: u64,
}

/// A delta made: kept (and its chunks written) or not.
struct Tried {
    kept: Option<PatchFile>,
    saving: u64,
    held_bytes: u64,
    took: Duration,
}

impl FileJob<'_> {
    fn run<S: ChunkSink>(
        &self,
        source: &dyn ChunkSource,
        sink: &S,
        level: i32,
    ) -> Result<Tried, DeltaError> {
        let started = Instant::now();
        let old = read_file(source, self.base_path, self.base_chunks)?;
        let new = read_file(source, self.path, self.chunks)?;
        let delta = make_delta(&old, &new, level).map_err(|e| DeltaError::Zstd {
            path: self.path.into(),
            reason: e.to_string(),
        })?;
        let held_bytes = (old.len() + new.len() + delta.len()) as u64;
        drop((old, new));
        let mut tried = Tried {
            kept: None,
            saving: self.saving,
            held_bytes,
            took: Duration::ZERO,
        };
        if delta.len() as u64 >= self.saving {
            tried.took = started.elapsed();
            return Ok(tried);
        }
        let mut writer = sink.writer();
        let mut refs = Vec::new();
        chunk_slice(&delta, |bytes, c| {
            refs.push(c);
            writer.write(bytes, &c)
        })
        .and_then(|()| writer.finish())
        .map_err(|source| DeltaError::Sink {
            path: self.path.into(),
            source,
        })?;
        tried.kept = Some(PatchFile {
            path: self.path.into(),
            base_path: self.base_path.into(),
            base_digest: file_digest(self.base_chunks),
            delta: refs,
            size: self.size,
            wire_bytes: self.wire_bytes,
        });
        tried.took = started.elapsed();
        Ok(tried)
    }
}

/// Each distinct chunk of a list once, in order.
fn distinct(chunks: &[ChunkRef]) -> impl Iterator<Item = &ChunkRef> {
    let mut seen = HashSet::new();
    chunks.iter().filter(move |c| seen.insert(c.hash))
}

/// What a target fetches to get a release: for each patched file, the
/// delta or the chunks, whichever is smaller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchPlan {
    /// Files rebuilt from their deltas (in the patch's order).
    pub patched: Vec<PatchFile>,
    /// The delta chunks to fetch: distinct, not held.
    pub delta_chunks: Vec<ChunkRef>,
    /// The release's chunks to fetch: distinct, not held and not rebuilt.
    pub chunks: Vec<ChunkRef>,
    /// Estimated wire bytes of `delta_chunks` and `chunks`.
    pub wire_bytes: u64,
    /// Estimated wire bytes without the patch.
    pub wire_bytes_without_deltas: u64,
}

/// Chooses, for a target holding what `held` says, per patched file,
/// whether to fetch its delta or its missing chunks: a file is rebuilt
/// only where the target holds its whole base file and the delta chunks it
/// lacks cost less than the chunks the rebuild spares. `wire_len` weighs a
/// chunk of `target` (its stored length where known). The plan never
/// costs more than fetching the chunks.
pub fn plan_fetch(
    target: &Manifest,
    base: &Manifest,
    patch: &Patch,
    held: &dyn Fn(&ChunkHash) -> bool,
    wire_len: &dyn Fn(&ChunkRef) -> u64,
) -> FetchPlan {
    let missing: Vec<ChunkRef> = target
        .unique_chunks()
        .into_iter()
        .filter(|c| !held(&c.hash))
        .collect();
    let without: u64 = missing.iter().map(wire_len).sum();
    let mut plan = FetchPlan {
        wire_bytes_without_deltas: without,
        ..FetchPlan::default()
    };
    if patch.base() != base.release_id() || patch.target() != target.release_id() {
        plan.chunks = missing;
        plan.wire_bytes = without;
        return plan;
    }
    let files: HashMap<&str, &[ChunkRef]> = target.files().collect();
    let bases: HashMap<&str, &[ChunkRef]> = base.files().collect();
    // Candidates, most promising first: those whose missing chunks weigh
    // most over their delta.
    let mut candidates: Vec<(&PatchFile, &[ChunkRef], u64)> = patch
        .files()
        .iter()
        .filter_map(|f| {
            let chunks = *files.get(f.path.as_str())?;
            let base_chunks = *bases.get(f.base_path.as_str())?;
            if file_digest(base_chunks) != f.base_digest
                || !base_chunks.iter().all(|c| held(&c.hash))
            {
                return None;
            }
            let gain: u64 = distinct(chunks)
                .filter(|c| !held(&c.hash))
                .map(wire_len)
                .sum();
            Some((f, chunks, gain))
        })
        .collect();
    candidates.sort_by_key(|(f, _, gain)| std::cmp::Reverse(gain.saturating_sub(f.delta_len())));
    let mut covered: HashSet<ChunkHash> = HashSet::new();
    let mut fetched_deltas: HashSet<ChunkHash> = HashSet::new();
    for (f, chunks, _) in candidates {
        let spared: u64 = distinct(chunks)
            .filter(|c| !held(&c.hash) && !covered.contains(&c.hash))
            .map(wire_len)
            .sum();
        let cost: u64 = distinct(&f.delta)
            .filter(|c| !held(&c.hash) && !fetched_deltas.contains(&c.hash))
            .map(|c| u64::from(c.len))
            .sum();
        if cost >= spared {
            continue;
        }
        covered.extend(chunks.iter().map(|c| c.hash));
        for c in distinct(&f.delta) {
            if !held(&c.hash) && fetched_deltas.insert(c.hash) {
                plan.delta_chunks.push(*c);
            }
        }
        plan.patched.push(f.clone());
    }
    plan.patched.sort_by(|a, b| a.path.cmp(&b.path));
    plan.chunks = missing
        .into_iter()
        .filter(|c| !covered.contains(&c.hash))
        .collect();
    plan.wire_bytes = plan.chunks.iter().map(wire_len).sum::<u64>()
        + plan
            .delta_chunks
            .iter()
            .map(|c| u64::from(c.len))
            .sum::<u64>();
    debug_assert!(plan.wire_bytes <= without);
    plan
}

/// Finds, for a file of the target, the base file to make its delta from.
struct BaseIndex<'a> {
    by_path: HashMap<&'a str, &'a [ChunkRef]>,
    /// Base files using each chunk.
    by_chunk: HashMap<ChunkHash, Vec<&'a str>>,
    /// Base files by file name (the last path component).
    by_name: HashMap<&'a str, Vec<&'a str>>,
}

impl<'a> BaseIndex<'a> {
    fn new(base: &'a Manifest) -> Self {
        let mut by_path = HashMap::new();
        let mut by_chunk: HashMap<ChunkHash, Vec<&str>> = HashMap::new();
        let mut by_name: HashMap<&str, Vec<&str>> = HashMap::new();
        for (path, chunks) in base.files() {
            by_path.insert(path, chunks);
            let mut seen = HashSet::new();
            for c in chunks {
                if seen.insert(c.hash) {
                    by_chunk.entry(c.hash).or_default().push(path);
                }
            }
            let name = path.rsplit('/').next().unwrap_or(path);
            by_name.entry(name).or_default().push(path);
        }
        Self {
            by_path,
            by_chunk,
            by_name,
        }
    }

    /// The same path; else the base file sharing the most bytes of chunks;
    /// else the file of the same name closest in size (a file that moved
    /// with a versioned directory, such as `pkg-1.2.dist-info/RECORD`).
    fn best_for(&self, path: &str, chunks: &[ChunkRef]) -> Option<(&'a str, &'a [ChunkRef])> {
        if let Some((p, c)) = self.by_path.get_key_value(path) {
            return Some((p, c));
        }
        let mut shared: HashMap<&str, u64> = HashMap::new();
        let mut seen = HashSet::new();
        for c in chunks.iter().filter(|c| seen.insert(c.hash)) {
            for p in self.by_chunk.get(&c.hash).into_iter().flatten() {
                *shared.entry(p).or_default() += u64::from(c.len);
            }
        }
        let best = shared
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
            .map(|(p, _)| p)
            .or_else(|| {
                let size: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
                let name = path.rsplit('/').next().unwrap_or(path);
                self.by_name.get(name)?.iter().copied().min_by_key(|p| {
                    let theirs: u64 = self.by_path[p].iter().map(|c| u64::from(c.len)).sum();
                    (theirs.abs_diff(size), *p)
                })
            })?;
        let (p, c) = self.by_path.get_key_value(best)?;
        Some((p, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Entry;
    use crate::stored::StoredChunk;
    use crate::testutil::pseudo_random;
    use std::sync::{Arc, Mutex};

    /// Chunks by hash, filled by packing and by patch making alike.
    #[derive(Default)]
    struct Chunks(Arc<Mutex<HashMap<ChunkHash, Vec<u8>>>>);

    impl ChunkSource for Chunks {
        fn stored_chunk(&self, chunk: &ChunkRef) -> Result<StoredChunk, BoxError> {
            let bytes = self.0.lock().unwrap().get(&chunk.hash).cloned();
            Ok(StoredChunk {
                encoding: crate::Encoding::Raw,
                bytes: bytes.ok_or("missing")?,
            })
        }
    }

    struct Writer(Arc<Mutex<HashMap<ChunkHash, Vec<u8>>>>);
    impl ChunkWriter for Writer {
        fn write(&mut self, bytes: &[u8], chunk: &ChunkRef) -> Result<(), BoxError> {
            self.0.lock().unwrap().insert(chunk.hash, bytes.to_vec());
            Ok(())
        }
        fn finish(self) -> Result<(), BoxError> {
            Ok(())
        }
    }
    impl ChunkSink for Chunks {
        type Writer = Writer;
        fn writer(&self) -> Writer {
            Writer(Arc::clone(&self.0))
        }
    }

    fn file(store: &Chunks, path: &str, data: &[u8]) -> Entry {
        let mut chunks = Vec::new();
        chunk_slice(data, |bytes, c| {
            store.0.lock().unwrap().insert(c.hash, bytes.to_vec());
            chunks.push(c);
            Ok::<_, ()>(())
        })
        .unwrap();
        Entry {
            path: path.into(),
            kind: EntryKind::File {
                mode: 0o644,
                size: data.len() as u64,
                chunks,
            },
        }
    }

    /// `data` with a byte changed every `every` bytes (a recompiled bundle).
    fn scattered_edits(data: &[u8], every: usize) -> Vec<u8> {
        let mut out = data.to_vec();
        for i in (every / 2..out.len()).step_by(every) {
            out[i] ^= 0x5a;
        }
        out
    }

    fn chunks_of(m: &Manifest, path: &str) -> Vec<ChunkRef> {
        m.files()
            .find(|(p, _)| *p == path)
            .map(|(_, c)| c.to_vec())
            .unwrap()
    }

    fn pair() -> (Chunks, Manifest, Manifest) {
        let store = Chunks::default();
        let old = pseudo_random(1 << 20, 7);
        let new = scattered_edits(&old, 10_000);
        let same = pseudo_random(100_000, 9);
        let release = |version: &str, app: &[u8]| {
            let files = vec![file(&store, "app.js", app), file(&store, "same.bin", &same)];
            Manifest::new("web", version, files).unwrap()
        };
        let (v1, v2) = (release("1", &old), release("2", &new));
        (store, v1, v2)
    }

    fn raw_len(c: &ChunkRef) -> u64 {
        u64::from(c.len)
    }

    #[test]
    fn scattered_edits_make_a_delta_far_smaller_than_the_new_chunks_and_it_rebuilds_the_file() {
        let (store, v1, v2) = pair();
        let (patch, stats) =
            make_patch(&v1, &v2, &store, &raw_len, &store, &PatchConfig::default()).unwrap();
        assert_eq!(stats.files_changed, 1, "same.bin is unchanged");
        assert_eq!(patch.files().len(), 1);
        let f = &patch.files()[0];
        assert_eq!(
            (f.path.as_str(), f.base_path.as_str()),
            ("app.js", "app.js")
        );
        // 105 edits of one byte in 1 MiB: every chunk is new, the delta tiny.
        assert!(stats.replaced_wire_bytes >= 1 << 20);
        assert!(f.delta_len() < 4096, "delta of {} bytes", f.delta_len());
        patch.check_against(&v1, &v2).unwrap();
        let base = read_file(&store, "app.js", &chunks_of(&v1, "app.js")).unwrap();
        let delta = read_file(&store, "delta", &f.delta).unwrap();
        let rebuilt = apply_file(f, &base, &delta, &chunks_of(&v2, "app.js")).unwrap();
        assert_eq!(
            rebuilt,
            read_file(&store, "app.js", &chunks_of(&v2, "app.js")).unwrap()
        );
        assert_eq!(Patch::decode(&patch.encode()).unwrap(), patch);
    }

    #[test]
    fn a_target_holding_the_base_fetches_the_delta_and_one_without_it_the_chunks() {
        let (store, v1, v2) = pair();
        let (patch, _) =
            make_patch(&v1, &v2, &store, &raw_len, &store, &PatchConfig::default()).unwrap();
        let base: HashSet<ChunkHash> = v1.chunk_refs().map(|c| c.hash).collect();
        let plan = plan_fetch(&v2, &v1, &patch, &|h| base.contains(h), &raw_len);
        assert_eq!(plan.patched, patch.files().to_vec());
        assert!(plan.chunks.is_empty(), "same.bin is held, app.js rebuilt");
        assert_eq!(plan.delta_chunks, patch.delta_chunks());
        assert_eq!(plan.wire_bytes, patch.delta_bytes());
        assert!(plan.wire_bytes_without_deltas >= 1 << 20);

        let nothing = plan_fetch(&v2, &v1, &patch, &|_| false, &raw_len);
        assert!(nothing.patched.is_empty() && nothing.delta_chunks.is_empty());
        assert_eq!(nothing.chunks, v2.unique_chunks());
        assert_eq!(nothing.wire_bytes, nothing.wire_bytes_without_deltas);
    }

    #[test]
    fn a_delta_is_fetched_only_where_it_costs_less_than_the_chunks_it_spares() {
        let (store, v1, v2) = pair();
        let (patch, _) =
            make_patch(&v1, &v2, &store, &raw_len, &store, &PatchConfig::default()).unwrap();
        let base: HashSet<ChunkHash> = v1.chunk_refs().map(|c| c.hash).collect();
        // Chunks that compress to almost nothing: the delta costs more.
        let plan = plan_fetch(&v2, &v1, &patch, &|h| base.contains(h), &|_| 10);
        assert!(plan.patched.is_empty());
        assert_eq!(plan.wire_bytes, plan.wire_bytes_without_deltas);
        // A patch for another pair of releases is not used at all.
        let plan = plan_fetch(&v1, &v2, &patch, &|h| base.contains(h), &raw_len);
        assert!(plan.patched.is_empty());
    }

    #[test]
    fn a_delta_applied_to_another_base_is_refused_by_verification() {
        let (store, v1, v2) = pair();
        let (patch, _) =
            make_patch(&v1, &v2, &store, &raw_len, &store, &PatchConfig::default()).unwrap();
        let f = &patch.files()[0];
        let delta = read_file(&store, "delta", &f.delta).unwrap();
        let mut wrong = read_file(&store, "app.js", &chunks_of(&v1, "app.js")).unwrap();
        wrong[1000] ^= 1;
        let err = apply_file(f, &wrong, &delta, &chunks_of(&v2, "app.js")).unwrap_err();
        assert!(matches!(err, DeltaError::Mismatch { .. }), "{err}");
        let base = read_file(&store, "app.js", &chunks_of(&v1, "app.js")).unwrap();
        let mut corrupt = delta.clone();
        let at = corrupt.len() / 2;
        corrupt[at] ^= 0xff;
        let err = apply_file(f, &base, &corrupt, &chunks_of(&v2, "app.js")).unwrap_err();
        assert!(
            matches!(err, DeltaError::Mismatch { .. } | DeltaError::Zstd { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_manifest_travels_as_a_delta_against_its_base_and_rebuilds_only_there() {
        let store = Chunks::default();
        let files = |changed: u64| -> Vec<Entry> {
            (0..50u64)
                .map(|i| {
                    let seed = if i == 7 { 1000 + changed } else { i };
                    file(&store, &format!("f{i:02}"), &pseudo_random(20_000, seed))
                })
                .collect()
        };
        let v1 = Manifest::new("web", "1", files(0)).unwrap();
        let v2 = Manifest::new("web", "2", files(1)).unwrap();
        let delta = manifest_delta(&v1, &v2);
        // One chunk name of 50 changed: the delta carries little more.
        assert!(
            delta.len() * 10 < v2.encode().len(),
            "{} bytes",
            delta.len()
        );
        assert_eq!(apply_manifest_delta(&v1, &delta).unwrap(), v2);
        // Against another base it rebuilds garbage, refused, or a manifest
        // of another id, which no signature over v2's id covers.
        let other = Manifest::new("web", "0", vec![file(&store, "x", b"unrelated")]).unwrap();
        assert!(apply_manifest_delta(&other, &delta)
            .map_or(true, |m| m.release_id() != v2.release_id()));
        let mut corrupt = delta.clone();
        let at = corrupt.len() / 2;
        corrupt[at] ^= 0xff;
        assert!(
            apply_manifest_delta(&v1, &corrupt).map_or(true, |m| m.release_id() != v2.release_id())
        );
    }

    #[test]
    fn a_delta_that_would_rebuild_more_than_the_stated_size_stops_there() {
        let base = pseudo_random(10_000, 1);
        let delta = make_delta(&base, &[7u8; 1 << 20], 3).unwrap();
        // Refused by zstd's window bound, or by the length cap.
        assert!(apply_delta(&base, &delta, 1000).is_err());
        let small = make_delta(&base, &[7u8; 900], 3).unwrap();
        let err = apply_delta(&base, &small, 800).unwrap_err();
        assert!(err.to_string().contains("800 expected"), "{err}");
    }

    #[test]
    fn no_delta_is_kept_where_it_would_not_be_smaller_than_the_chunks() {
        let store = Chunks::default();
        let v1 = Manifest::new(
            "web",
            "1",
            vec![file(&store, "a", &pseudo_random(300_000, 1))],
        )
        .unwrap();
        let v2 = Manifest::new(
            "web",
            "2",
            vec![file(&store, "a", &pseudo_random(300_000, 2))],
        )
        .unwrap();
        let (patch, stats) =
            make_patch(&v1, &v2, &store, &raw_len, &store, &PatchConfig::default()).unwrap();
        assert_eq!((stats.files_tried, stats.files_patched), (1, 0));
        assert!(patch.files().is_empty());
    }

    #[test]
    fn a_moved_file_gets_its_delta_from_where_it_was() {
        let store = Chunks::default();
        let old = pseudo_random(600_000, 3);
        let v1 = Manifest::new(
            "web",
            "1",
            vec![
                Entry {
                    path: "pkg-1.0".into(),
                    kind: EntryKind::Dir { mode: 0o755 },
                },
                file(&store, "pkg-1.0/lib.so", &old),
                file(&store, "pkg-1.0/RECORD", &pseudo_random(5000, 4)),
            ],
        )
        .unwrap();
        let mut record = pseudo_random(5000, 4);
        record[100] ^= 1;
        let v2 = Manifest::new(
            "web",
            "2",
            vec![
                Entry {
                    path: "pkg-1.1".into(),
                    kind: EntryKind::Dir { mode: 0o755 },
                },
                file(&store, "pkg-1.1/lib.so", &scattered_edits(&old, 50_000)),
                file(&store, "pkg-1.1/RECORD", &record),
            ],
        )
        .unwrap();
        let (patch, _) =
            make_patch(&v1, &v2, &store, &raw_len, &store, &PatchConfig::default()).unwrap();
        let bases: Vec<(&str, &str)> = patch
            .files()
            .iter()
            .map(|f| (f.path.as_str(), f.base_path.as_str()))
            .collect();
        assert_eq!(
            bases,
            [
                ("pkg-1.1/RECORD", "pkg-1.0/RECORD"),
                ("pkg-1.1/lib.so", "pkg-1.0/lib.so")
            ]
        );
    }

    #[test]
    fn hostile_patch_records_are_refused_before_any_work() {
        let (store, v1, v2) = pair();
        let (patch, _) =
            make_patch(&v1, &v2, &store, &raw_len, &store, &PatchConfig::default()).unwrap();
        let edit = |f: &dyn Fn(&mut PatchFile)| {
            let mut p = patch.clone();
            f(&mut p.files[0]);
            p
        };
        let refused = |p: Patch| {
            let decoded = Patch::decode(&p.encode());
            decoded.is_err() || decoded.unwrap().check_against(&v1, &v2).is_err()
        };
        assert!(refused(edit(&|f| f.path = "../../etc/passwd".into())));
        assert!(refused(edit(&|f| f.base_path = "/etc/shadow".into())));
        assert!(refused(edit(&|f| f.size = 1 << 40)));
        assert!(refused(edit(&|f| f.size += 1)));
        assert!(refused(edit(&|f| f.delta.clear())));
        assert!(refused(edit(&|f| f.delta[0].len = 0)));
        assert!(refused(edit(&|f| f.base_digest = ChunkHash([0; 32]))));
        assert!(refused(edit(&|f| f.wire_bytes = f.size + 1)));
        assert!(refused(edit(&|f| {
            f.delta = vec![
                ChunkRef {
                    hash: ChunkHash([1; 32]),
                    len: 200_000
                };
                8
            ]
        })));
        let mut twice = patch.clone();
        twice.files.push(twice.files[0].clone());
        assert!(refused(twice));
        assert!(Patch::decode(b"CVYM\x01\x00").is_err());
        assert!(patch.check_against(&v2, &v1).is_err(), "releases swapped");
        assert!(!refused(patch));
    }
}
