//! Building a manifest from a directory, handing every chunk to a sink.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::chunk::{chunk_slice, ChunkRef, StreamChunker};
use crate::manifest::{limits, Entry, EntryKind, Manifest, ManifestError, MODE_MASK};
use crate::BoxError;

/// Files up to this size are read whole; larger ones are streamed.
const READ_WHOLE_MAX: u64 = 4 << 20;

/// Where packing puts chunks: a store, a counter, an upload.
///
/// Packing runs on several threads; each file gets its own writer.
pub trait ChunkSink: Sync {
    /// Receives the chunks of one file.
    type Writer: ChunkWriter;
    /// A writer for the next file.
    fn writer(&self) -> Self::Writer;
}

/// Receives the chunks of one file, in order.
pub trait ChunkWriter {
    /// One chunk: its bytes and its reference.
    fn write(&mut self, bytes: &[u8], chunk: &ChunkRef) -> Result<(), BoxError>;
    /// The file is done: make what was written visible to the sink.
    fn finish(self) -> Result<(), BoxError>;
}

/// Keeps nothing: packing only to learn the manifest.
pub struct Discard;

impl ChunkSink for Discard {
    type Writer = Discard;
    fn writer(&self) -> Discard {
        Discard
    }
}

impl ChunkWriter for Discard {
    fn write(&mut self, _: &[u8], _: &ChunkRef) -> Result<(), BoxError> {
        Ok(())
    }
    fn finish(self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Told how far long-running work has got.
pub trait Progress: Sync {
    /// The total amount of work, in bytes, once known.
    fn set_total(&self, _bytes: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
}

/// Reports nothing.
impl Progress for () {}

/// Why a directory could not be packed. Each variant names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// Reading the tree failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A file name that is not UTF-8.
    #[error("{path}: file name is not UTF-8; rename it (manifests hold UTF-8 paths)")]
    NonUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// A device file, socket or FIFO.
    #[error("{path}: {kind} cannot be packaged; remove it from the tree")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The tree breaks a manifest rule (escaping symlink, too many files...).
    #[error("{root}: {source}")]
    Invalid {
        /// The packed directory.
        root: PathBuf,
        /// The broken rule.
        source: ManifestError,
    },
    /// The sink refused a chunk.
    #[error("{path}: storing a chunk failed: {source}")]
    Sink {
        /// The file being chunked.
        path: PathBuf,
        /// What the sink said.
        source: BoxError,
    },
}

struct PendingFile {
    index: usize,
    path: PathBuf,
    size: u64,
}

/// Chunks the tree under `root` into a [`Manifest`] for `app`@`version`,
/// sending every chunk of every file to `sink`. Uses rayon's current pool:
/// run it inside `ThreadPool::install` to choose the number of threads.
/// Symlinks are recorded, never followed.
pub fn pack<S: ChunkSink>(
    root: &Path,
    app: &str,
    version: &str,
    sink: &S,
    progress: &dyn Progress,
) -> Result<Manifest, PackError> {
    let invalid = |source| PackError::Invalid {
        root: root.to_path_buf(),
        source,
    };
    crate::manifest::validate_name("app", app).map_err(invalid)?;
    crate::manifest::validate_name("version", version).map_err(invalid)?;
    let meta = fs::metadata(root).map_err(|source| PackError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(PackError::Io {
            path: root.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let (mut entries, mut files) = walk(root)?;
    progress.set_total(files.iter().map(|f| f.size).sum());
    // Largest first, so one big file does not start last and run alone.
    files.sort_by_key(|f| std::cmp::Reverse(f.size));
    let chunked: Vec<(usize, u64, Vec<ChunkRef>)> = files
        .par_iter()
        .map_init(StreamChunker::new, |chunker, file| {
            let (size, chunks) = chunk_file(file, chunker, sink, progress)?;
            Ok((file.index, size, chunks))
        })
        .collect::<Result<_, PackError>>()?;
    for (index, size, chunks) in chunked {
        if let EntryKind::File {
            size: s, chunks: c, ..
        } = &mut entries[index].kind
        {
            *s = size;
            *c = chunks;
        }
    }
    Manifest::new(app, version, entries).map_err(invalid)
}

/// Lists the tree: every entry (files without chunks yet) and the files to chunk.
fn walk(root: &Path) -> Result<(Vec<Entry>, Vec<PendingFile>), PackError> {
    let mut entries = Vec::new();
    let mut files = Vec::new();
    let mut total: u64 = 0;
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PackError::Io { path, source }
        };
        for item in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let item = item.map_err(io_err(&dir))?;
            let path = item.path();
            let name = item
                .file_name()
                .into_string()
                .map_err(|_| PackError::NonUtf8 { path: path.clone() })?;
            let rel_path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let ft = meta.file_type();
            let mode = meta.permissions().mode() & MODE_MASK;
            let kind = if ft.is_dir() {
                stack.push((path.clone(), rel_path.clone()));
                EntryKind::Dir { mode }
            } else if ft.is_file() {
                total += meta.len();
                if total > limits::MAX_TOTAL_BYTES {
                    return Err(PackError::Invalid {
                        root: root.to_path_buf(),
                        source: ManifestError::TooLarge { bytes: total },
                    });
                }
                files.push(PendingFile {
                    index: entries.len(),
                    path: path.clone(),
                    size: meta.len(),
                });
                EntryKind::File {
                    mode,
                    size: 0,
                    chunks: Vec::new(),
                }
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(io_err(&path))?;
                let target = target
                    .into_os_string()
                    .into_string()
                    .map_err(|_| PackError::NonUtf8 { path: path.clone() })?;
                EntryKind::Symlink { target }
            } else {
                let kind = if ft.is_fifo() {
                    "a FIFO"
                } else if ft.is_socket() {
                    "a socket"
                } else if ft.is_block_device() {
                    "a block device"
                } else {
                    "a character device"
                };
                return Err(PackError::Unsupported { path, kind });
            };
            entries.push(Entry {
                path: rel_path,
                kind,
            });
            if entries.len() > limits::MAX_ENTRIES {
                return Err(PackError::Invalid {
                    root: root.to_path_buf(),
                    source: ManifestError::TooManyEntries {
                        count: entries.len(),
                    },
                });
            }
        }
    }
    Ok((entries, files))
}

/// Chunks one file; returns its size as read and its chunk list.
fn chunk_file<S: ChunkSink>(
    file: &PendingFile,
    chunker: &mut StreamChunker,
    sink: &S,
    progress: &dyn Progress,
) -> Result<(u64, Vec<ChunkRef>), PackError> {
    let path = &file.path;
    let io_err = |source| PackError::Io {
        path: path.clone(),
        source,
    };
    let mut writer = sink.writer();
    let mut chunks = Vec::with_capacity((file.size / crate::AVG_CHUNK_SIZE as u64) as usize + 1);
    let mut each = |bytes: &[u8], chunk: ChunkRef| -> Result<(), ChunkFailure> {
        writer.write(bytes, &chunk).map_err(ChunkFailure::Sink)?;
        progress.advance(bytes.len() as u64);
        chunks.push(chunk);
        Ok(())
    };
    let handle = File::open(path).map_err(io_err)?;
    let size = if file.size <= READ_WHOLE_MAX {
        let mut data = Vec::with_capacity(file.size as usize);
        io::Read::read_to_end(&mut io::BufReader::new(handle), &mut data).map_err(io_err)?;
        chunk_slice(&data, &mut each).map_err(|e| e.into_pack(path))?;
        data.len() as u64
    } else {
        chunker
            .chunk_reader(handle, &mut each)
            .map_err(|e| e.into_pack(path))?
    };
    writer.finish().map_err(|source| PackError::Sink {
        path: path.clone(),
        source,
    })?;
    Ok((size, chunks))
}

enum ChunkFailure {
    Io(io::Error),
    Sink(BoxError),
}

impl From<io::Error> for ChunkFailure {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl ChunkFailure {
    fn into_pack(self, path: &Path) -> PackError {
        let path = path.to_path_buf();
        match self {
            Self::Io(source) => PackError::Io { path, source },
            Self::Sink(source) => PackError::Sink { path, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn pack_dir(root: &Path) -> Result<Manifest, PackError> {
        pack(root, "web", "1.0", &Discard, &())
    }

    #[test]
    fn same_tree_in_two_places_gives_the_same_release_id() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            fs::create_dir(root.join("lib")).unwrap();
            fs::write(root.join("lib/x.so"), vec![3u8; 300_000]).unwrap();
            fs::write(root.join("README"), "hi").unwrap();
            symlink("lib/x.so", root.join("link")).unwrap();
        }
        let (ma, mb) = (pack_dir(a.path()).unwrap(), pack_dir(b.path()).unwrap());
        assert_eq!(ma.release_id(), mb.release_id());
        assert_eq!(ma.entries().len(), 4);
    }

    #[test]
    fn fifo_is_refused_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = pack_dir(d.path()).unwrap_err();
        assert!(
            matches!(&err, PackError::Unsupported { path, .. } if path == &fifo),
            "{err}"
        );
    }

    /// Needs root (to create the device node), as the test machines have.
    #[test]
    fn character_device_is_refused_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("null");
        let c = std::ffi::CString::new(dev.to_str().unwrap()).unwrap();
        let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
        assert_eq!(made, 0, "mknod failed: {}", std::io::Error::last_os_error());
        let err = pack_dir(d.path()).unwrap_err();
        assert!(
            matches!(&err, PackError::Unsupported { path, kind: "a character device" } if path == &dev),
            "{err}"
        );
    }

    #[test]
    fn socket_is_refused_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = pack_dir(d.path()).unwrap_err();
        assert!(
            matches!(&err, PackError::Unsupported { path: p, .. } if p == &path),
            "{err}"
        );
    }

    #[test]
    fn escaping_symlink_is_refused_naming_it() {
        let d = tempfile::tempdir().unwrap();
        symlink("/etc/passwd", d.path().join("pw")).unwrap();
        let err = pack_dir(d.path()).unwrap_err();
        assert!(err.to_string().contains("\"pw\""), "{err}");
    }

    #[test]
    fn non_utf8_name_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xff");
        fs::write(d.path().join(name), "x").unwrap();
        assert!(matches!(pack_dir(d.path()), Err(PackError::NonUtf8 { .. })));
    }

    #[test]
    fn missing_root_names_it() {
        let err = pack_dir(Path::new("/nonexistent/convoy")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/convoy"), "{err}");
    }

    #[test]
    fn large_file_streams_to_the_same_chunks_as_in_memory() {
        let d = tempfile::tempdir().unwrap();
        let data = crate::testutil::pseudo_random((READ_WHOLE_MAX as usize) * 3 + 17, 5);
        fs::write(d.path().join("big"), &data).unwrap();
        let m = pack_dir(d.path()).unwrap();
        let mut expected = Vec::new();
        chunk_slice::<()>(&data, |_, c| {
            expected.push(c);
            Ok(())
        })
        .unwrap();
        let got: Vec<_> = m.chunk_refs().copied().collect();
        assert_eq!(got, expected);
    }
}
