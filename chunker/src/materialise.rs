//! Writing a release's tree into a directory, all or nothing.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::chunk::{ChunkHash, ChunkRef};
use crate::manifest::{EntryKind, Manifest};
use crate::pack::Progress;
use crate::stored::{ChunkError, StoredChunk};
use crate::BoxError;

/// Where materialising gets chunks from: a store, a peer, a cache.
pub trait ChunkSource: Sync {
    /// The stored form of `chunk`; [`materialise`] verifies it.
    fn stored_chunk(&self, chunk: &ChunkRef) -> Result<StoredChunk, BoxError>;
}

/// Files a new tree may share with one already written: a hard link
/// instead of a copy. Whoever implements it answers only for files that
/// nobody has changed since they were written.
pub trait Reuse: Sync {
    /// A file holding exactly `chunks` with permission bits `mode`, to be
    /// hard-linked at `path`; `None` to write it.
    fn existing(&self, path: &str, mode: u32, chunks: &[ChunkRef]) -> Option<PathBuf>;
}

/// Shares nothing.
impl Reuse for () {
    fn existing(&self, _: &str, _: u32, _: &[ChunkRef]) -> Option<PathBuf> {
        None
    }
}

/// Why a tree could not be written. Nothing is left under the destination.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaterialiseError {
    /// The destination holds files and `force` was not given.
    #[error("{0}: destination is not empty (pass --force to replace it)")]
    NotEmpty(PathBuf),
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The source could not give a chunk.
    #[error("{path}: chunk {hash} unavailable: {source}")]
    Source {
        /// The file that needs it.
        path: String,
        /// The missing chunk.
        hash: ChunkHash,
        /// What the source said.
        source: BoxError,
    },
    /// The source gave bytes that are not the chunk.
    #[error("{path}: {source}")]
    Corrupt {
        /// The file that needs it.
        path: String,
        /// How the chunk is wrong.
        source: ChunkError,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> MaterialiseError + '_ {
    move |source| MaterialiseError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `manifest`'s tree as `dest`, with every chunk from `source`
/// verified against its hash. The tree is built in a temporary directory
/// beside `dest` and renamed into place at the end, so a failure or a
/// crash never leaves a partial tree under `dest`. An existing empty `dest`
/// is replaced; a non-empty one only with `force`.
pub fn materialise(
    manifest: &Manifest,
    source: &dyn ChunkSource,
    dest: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<(), MaterialiseError> {
    materialise_reusing(manifest, source, &(), dest, force, progress)
}

/// [`materialise`], hard-linking the files `reuse` offers instead of
/// writing them (a link that fails is written instead).
pub fn materialise_reusing(
    manifest: &Manifest,
    source: &dyn ChunkSource,
    reuse: &dyn Reuse,
    dest: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<(), MaterialiseError> {
    let occupied = match fs::symlink_metadata(dest) {
        Ok(meta) if meta.is_dir() => fs::read_dir(dest).map_err(io_at(dest))?.next().is_some(),
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_at(dest)(e)),
    };
    if occupied && !force {
        return Err(MaterialiseError::NotEmpty(dest.to_path_buf()));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}.convoy-partial-"))
        .tempdir_in(parent)
        .map_err(io_at(parent))?;
    let root = staging.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(io_at(root))?;
    progress.set_total(manifest.file_totals().1);
    write_tree(manifest, source, reuse, root, progress)?;
    // Every file and directory below is synced: a power cut after the
    // rename finds the whole tree, never names for empty files.
    sync_dir(root)?;
    if occupied {
        // Move the old tree aside first: rename cannot replace a non-empty directory.
        let trash = tempfile::Builder::new()
            .prefix(&format!(".{name}.convoy-old-"))
            .tempdir_in(parent)
            .map_err(io_at(parent))?;
        let old = trash.path().join("old");
        fs::rename(dest, &old).map_err(io_at(dest))?;
        fs::rename(root, dest).map_err(io_at(dest))?;
        sync_dir(parent)?;
        drop(trash); // removes the old tree
    } else {
        fs::rename(root, dest).map_err(io_at(dest))?;
        sync_dir(parent)?;
    }
    // The staging directory is now `dest`: keep it.
    let _ = staging.keep();
    Ok(())
}

fn write_tree(
    manifest: &Manifest,
    source: &dyn ChunkSource,
    reuse: &dyn Reuse,
    root: &Path,
    progress: &dyn Progress,
) -> Result<(), MaterialiseError> {
    // Directories first (writable while we fill them), then files in
    // parallel, then links, then the directories' own modes, deepest first.
    let entries = manifest.entries();
    for e in entries {
        if let EntryKind::Dir { .. } = e.kind {
            let p = root.join(&e.path);
            fs::create_dir(&p).map_err(io_at(&p))?;
        }
    }
    entries
        .par_iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File { mode, chunks, .. } => Some((e.path.as_str(), *mode, chunks)),
            _ => None,
        })
        .try_for_each(|(path, mode, chunks)| {
            let full = root.join(path);
            if let Some(existing) = reuse.existing(path, mode, chunks) {
                if fs::hard_link(&existing, &full).is_ok() {
                    progress.advance(chunks.iter().map(|c| u64::from(c.len)).sum());
                    return Ok(());
                }
            }
            write_file(root, path, mode, chunks, source, progress)
        })?;
    for e in entries {
        if let EntryKind::Symlink { target } = &e.kind {
            let p = root.join(&e.path);
            symlink(target, &p).map_err(io_at(&p))?;
        }
    }
    for e in entries.iter().rev() {
        if let EntryKind::Dir { mode } = e.kind {
            // Opened before its mode may take away the owner's read.
            let p = root.join(&e.path);
            let dir = File::open(&p).map_err(io_at(&p))?;
            dir.set_permissions(fs::Permissions::from_mode(mode))
                .and_then(|()| dir.sync_all())
                .map_err(io_at(&p))?;
        }
    }
    Ok(())
}

/// Makes a directory's entries durable.
fn sync_dir(dir: &Path) -> Result<(), MaterialiseError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

fn write_file(
    root: &Path,
    path: &str,
    mode: u32,
    chunks: &[ChunkRef],
    source: &dyn ChunkSource,
    progress: &dyn Progress,
) -> Result<(), MaterialiseError> {
    let full = root.join(path);
    // Owner-only until it is whole: a file that ends up 0600 is never
    // readable by others, not even while it is written.
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&full)
        .map_err(io_at(&full))?;
    for chunk in chunks {
        let stored = source
            .stored_chunk(chunk)
            .map_err(|source| MaterialiseError::Source {
                path: path.into(),
                hash: chunk.hash,
                source,
            })?;
        let raw = stored
            .into_verified(chunk)
            .map_err(|source| MaterialiseError::Corrupt {
                path: path.into(),
                source,
            })?;
        file.write_all(&raw).map_err(io_at(&full))?;
        progress.advance(raw.len() as u64);
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.sync_all())
        .map_err(io_at(&full))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::{pack, ChunkSink, ChunkWriter};
    use crate::stored::{Compressor, Encoding};
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;

    #[derive(Default)]
    struct MapStore(Mutex<HashMap<ChunkHash, StoredChunk>>);
    struct MapWriter<'a>(&'a MapStore, Compressor);
    impl<'a> ChunkSink for &'a MapStore {
        type Writer = MapWriter<'a>;
        fn writer(&self) -> MapWriter<'a> {
            MapWriter(self, Compressor::new())
        }
    }
    impl ChunkWriter for MapWriter<'_> {
        fn write(&mut self, bytes: &[u8], c: &ChunkRef) -> Result<(), BoxError> {
            let stored = self.1.store(bytes);
            self.0 .0.lock().unwrap().insert(c.hash, stored);
            Ok(())
        }
        fn finish(self) -> Result<(), BoxError> {
            Ok(())
        }
    }
    impl ChunkSource for MapStore {
        fn stored_chunk(&self, c: &ChunkRef) -> Result<StoredChunk, BoxError> {
            self.0
                .lock()
                .unwrap()
                .get(&c.hash)
                .cloned()
                .ok_or_else(|| "missing".into())
        }
    }

    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir(root.join("ro")).unwrap();
        fs::write(
            root.join("bin/app"),
            crate::testutil::pseudo_random(700_000, 3),
        )
        .unwrap();
        fs::set_permissions(root.join("bin/app"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(root.join("ro/data.txt"), "text ".repeat(10_000)).unwrap();
        fs::write(root.join("empty"), "").unwrap();
        symlink("bin/app", root.join("run")).unwrap();
        fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    }

    fn packed() -> (tempfile::TempDir, MapStore, Manifest) {
        let src = tempfile::tempdir().unwrap();
        sample_tree(src.path());
        let store = MapStore::default();
        let m = pack(src.path(), "web", "1", &&store, &()).unwrap();
        (src, store, m)
    }

    #[test]
    fn round_trip_reproduces_bytes_modes_and_links() {
        let (src, store, m) = packed();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("tree");
        materialise(&m, &store, &dest, false, &()).unwrap();
        for rel in ["bin/app", "ro/data.txt", "empty"] {
            assert_eq!(
                fs::read(src.path().join(rel)).unwrap(),
                fs::read(dest.join(rel)).unwrap(),
                "{rel}"
            );
        }
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dest.join("bin/app")), 0o750);
        assert_eq!(mode(&dest.join("ro")), 0o555);
        assert_eq!(
            fs::read_link(dest.join("run")).unwrap(),
            Path::new("bin/app")
        );
        // Nothing but the tree is left beside it.
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);
    }

    /// A source that, before giving each chunk after the first, looks at
    /// the file being written: the only partial file in the tree.
    struct Watching<'a> {
        inner: &'a MapStore,
        dest_parent: PathBuf,
        modes_seen: Mutex<Vec<u32>>,
    }

    impl ChunkSource for Watching<'_> {
        fn stored_chunk(&self, c: &ChunkRef) -> Result<StoredChunk, BoxError> {
            for staging in fs::read_dir(&self.dest_parent)? {
                let staging = staging?.path();
                if !staging.to_string_lossy().contains("convoy-partial") {
                    continue;
                }
                let f = staging.join("bin/app");
                if let Ok(m) = fs::metadata(&f) {
                    // Started and not whole: sample_tree's 700,000 bytes.
                    if m.len() > 0 && m.len() < 700_000 {
                        self.modes_seen.lock().unwrap().push(m.mode() & 0o7777);
                    }
                }
            }
            self.inner.stored_chunk(c)
        }
    }

    #[test]
    fn a_file_is_owner_only_until_it_is_whole() {
        let (_src, store, m) = packed();
        let out = tempfile::tempdir().unwrap();
        let watching = Watching {
            inner: &store,
            dest_parent: out.path().to_path_buf(),
            modes_seen: Mutex::new(Vec::new()),
        };
        materialise(&m, &watching, &out.path().join("tree"), false, &()).unwrap();
        let seen = watching.modes_seen.into_inner().unwrap();
        assert!(!seen.is_empty(), "bin/app was never seen half written");
        assert!(
            seen.iter().all(|m| *m == 0o600),
            "modes while written: {seen:?}"
        );
        let done = fs::metadata(out.path().join("tree/bin/app"))
            .unwrap()
            .mode();
        assert_eq!(done & 0o7777, 0o750);
    }

    #[test]
    fn corrupt_chunk_fails_and_leaves_no_tree() {
        let (_src, store, m) = packed();
        let victim = m.chunk_refs().next().unwrap().hash;
        store.0.lock().unwrap().insert(
            victim,
            StoredChunk {
                encoding: Encoding::Raw,
                bytes: vec![0; 10],
            },
        );
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("tree");
        let err = materialise(&m, &store, &dest, false, &()).unwrap_err();
        assert!(matches!(err, MaterialiseError::Corrupt { .. }), "{err}");
        assert_eq!(
            fs::read_dir(out.path()).unwrap().count(),
            0,
            "partial tree left behind"
        );
    }

    #[test]
    fn non_empty_destination_needs_force_and_is_then_replaced() {
        let (_src, store, m) = packed();
        let out = tempfile::tempdir().unwrap();
        fs::write(out.path().join("old-file"), "x").unwrap();
        let err = materialise(&m, &store, out.path(), false, &()).unwrap_err();
        assert!(matches!(err, MaterialiseError::NotEmpty(_)));
        materialise(&m, &store, out.path(), true, &()).unwrap();
        assert!(!out.path().join("old-file").exists());
        assert!(out.path().join("bin/app").exists());
    }
}
