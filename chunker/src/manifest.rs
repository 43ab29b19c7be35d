//! The manifest of a package and the rules every manifest obeys.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkHash, ChunkRef, MAX_CHUNK_SIZE};
use crate::codec;

/// Bounds every manifest obeys, whether packed here or received.
pub mod limits {
    /// Entries (files, directories, symlinks) in one package.
    pub const MAX_ENTRIES: usize = 1 << 20;
    /// Sum of the sizes of a package's files: 256 GiB.
    pub const MAX_TOTAL_BYTES: u64 = 256 << 30;
    /// Bytes in a path or a symlink target.
    pub const MAX_PATH_BYTES: usize = 4096;
    /// Bytes in one path component.
    pub const MAX_COMPONENT_BYTES: usize = 255;
    /// Bytes in an app name or a version.
    pub const MAX_NAME_BYTES: usize = 64;
    /// Bytes in an encoded manifest.
    pub const MAX_ENCODED_BYTES: usize = 256 << 20;
}

/// Permission bits a manifest carries; setuid, setgid and sticky are not.
pub const MODE_MASK: u32 = 0o777;

/// The name of a release: BLAKE3 of its encoded manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReleaseId(pub [u8; 32]);

impl ReleaseId {
    /// The id of an encoded manifest.
    pub fn of_encoded(encoded: &[u8]) -> Self {
        Self(*blake3::hash(encoded).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        ChunkHash(self.0).to_hex()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(hex: &str) -> Option<Self> {
        ChunkHash::from_hex(hex).map(|h| Self(h.0))
    }
}

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleaseId({})", &self.to_hex()[..16])
    }
}

/// One path of a package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path, `/`-separated, UTF-8.
    pub path: String,
    /// What is at the path.
    pub kind: EntryKind,
}

/// What a manifest entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir {
        /// Permission bits (within [`MODE_MASK`]).
        mode: u32,
    },
    /// A regular file.
    File {
        /// Permission bits (within [`MODE_MASK`]).
        mode: u32,
        /// Length in bytes: the sum of the chunk lengths.
        size: u64,
        /// The file's content, in order.
        chunks: Vec<ChunkRef>,
    },
    /// A symbolic link.
    Symlink {
        /// The link's target, relative and inside the release.
        target: String,
    },
}

/// The ordered entries of a package, with its app and version.
///
/// A `Manifest` is valid by construction: [`Manifest::new`] and
/// [`Manifest::decode`] refuse anything [`ManifestError`] describes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    app: String,
    version: String,
    entries: Vec<Entry>,
}

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    /// An app name or version is empty, too long or has characters outside
    /// `A-Z a-z 0-9 . _ -` (and `+` in versions).
    #[error("invalid {what} {value:?}: use 1-64 of A-Z a-z 0-9 . _ - (and + in versions), starting with a letter or digit")]
    BadName {
        /// `app` or `version`.
        what: &'static str,
        /// The refused value.
        value: String,
    },
    /// A path that is absolute, has an empty, `.` or `..` component, a NUL, or is too long.
    #[error("{path:?}: paths must be relative, without empty, '.' or '..' components, NUL bytes, or more than {} bytes", limits::MAX_PATH_BYTES)]
    BadPath {
        /// The refused path.
        path: String,
    },
    /// Two entries with the same path.
    #[error("{path:?} appears twice")]
    Duplicate {
        /// The repeated path.
        path: String,
    },
    /// Entries out of order (an encoded manifest is canonical).
    #[error("{path:?} is out of order: entries must be sorted by path")]
    Unsorted {
        /// The first entry out of place.
        path: String,
    },
    /// An entry whose parent is not a directory of the manifest.
    #[error("{path:?}: its parent is not a directory of the release")]
    MissingParent {
        /// The orphaned entry.
        path: String,
    },
    /// A symlink whose target is absolute or leaves the release root.
    #[error("symlink {path:?} -> {target:?} leaves the release (targets must be relative, stay inside, and use '..' only as a leading prefix)")]
    SymlinkEscapes {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// Permission bits outside [`MODE_MASK`].
    #[error("{path:?}: mode {mode:o} has bits beyond {:o}", MODE_MASK)]
    BadMode {
        /// The entry.
        path: String,
        /// The refused mode.
        mode: u32,
    },
    /// A file whose chunk list does not add up to its size, or a chunk of
    /// impossible length.
    #[error("{path:?}: chunk list does not match the file size {size}")]
    BadChunks {
        /// The file.
        path: String,
        /// Its declared size.
        size: u64,
    },
    /// More entries than [`limits::MAX_ENTRIES`].
    #[error("{count} entries: a package may hold at most {}", limits::MAX_ENTRIES)]
    TooManyEntries {
        /// Entries found.
        count: usize,
    },
    /// More bytes than [`limits::MAX_TOTAL_BYTES`].
    #[error(
        "{bytes} bytes of files: a package may hold at most {}",
        limits::MAX_TOTAL_BYTES
    )]
    TooLarge {
        /// Bytes found.
        bytes: u64,
    },
}

impl Manifest {
    /// Builds a manifest from entries in any order, sorting them by path and
    /// checking every rule.
    pub fn new(
        app: impl Into<String>,
        version: impl Into<String>,
        mut entries: Vec<Entry>,
    ) -> Result<Self, ManifestError> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = Self {
            app: app.into(),
            version: version.into(),
            entries,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Decodes and validates an encoded manifest; see [`codec`] for the format.
    pub fn decode(bytes: &[u8]) -> Result<Self, codec::DecodeError> {
        let manifest: Self = codec::decode(bytes)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The canonical encoding; its BLAKE3 is the [`ReleaseId`].
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// The release id: BLAKE3 of [`Manifest::encode`].
    pub fn release_id(&self) -> ReleaseId {
        ReleaseId::of_encoded(&self.encode())
    }

    /// The app this release belongs to.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The release's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Entries, sorted by path.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Regular files: their number and total size.
    pub fn file_totals(&self) -> (usize, u64) {
        self.entries
            .iter()
            .filter_map(|e| match &e.kind {
                EntryKind::File { size, .. } => Some(*size),
                _ => None,
            })
            .fold((0, 0), |(n, b), s| (n + 1, b + s))
    }

    /// Regular files: each path with its chunks, in path order.
    pub fn files(&self) -> impl Iterator<Item = (&str, &[ChunkRef])> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { chunks, .. } => Some((e.path.as_str(), chunks.as_slice())),
            _ => None,
        })
    }

    /// Every chunk reference in file order, repeats included.
    pub fn chunk_refs(&self) -> impl Iterator<Item = &ChunkRef> {
        self.entries.iter().flat_map(|e| match &e.kind {
            EntryKind::File { chunks, .. } => chunks.as_slice(),
            _ => &[],
        })
    }

    /// Each distinct chunk once, in order of first use.
    pub fn unique_chunks(&self) -> Vec<ChunkRef> {
        let mut seen = HashSet::new();
        self.chunk_refs()
            .filter(|c| seen.insert(c.hash))
            .copied()
            .collect()
    }

    /// Checks every rule of [`ManifestError`].
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_name("app", &self.app, false)?;
        check_name("version", &self.version, true)?;
        if self.entries.len() > limits::MAX_ENTRIES {
            return Err(ManifestError::TooManyEntries {
                count: self.entries.len(),
            });
        }
        // Path -> is a directory; entries come sorted, so a parent ("a")
        // always precedes its children ("a/b"): it is a prefix.
        let mut dirs: HashMap<&str, bool> = HashMap::with_capacity(self.entries.len());
        let mut total: u64 = 0;
        let mut previous: Option<&str> = None;
        for entry in &self.entries {
            let path = entry.path.as_str();
            check_path(path)?;
            if let Some(prev) = previous {
                if prev == path {
                    return Err(ManifestError::Duplicate { path: path.into() });
                }
                if prev > path {
                    return Err(ManifestError::Unsorted { path: path.into() });
                }
            }
            previous = Some(path);
            if let Some((parent, _)) = path.rsplit_once('/') {
                if dirs.get(parent) != Some(&true) {
                    return Err(ManifestError::MissingParent { path: path.into() });
                }
            }
            dirs.insert(path, matches!(entry.kind, EntryKind::Dir { .. }));
            match &entry.kind {
                EntryKind::Dir { mode } => check_mode(path, *mode)?,
                EntryKind::File { mode, size, chunks } => {
                    check_mode(path, *mode)?;
                    let mut sum: u64 = 0;
                    for c in chunks {
                        if c.len == 0 || c.len as usize > MAX_CHUNK_SIZE {
                            return Err(ManifestError::BadChunks {
                                path: path.into(),
                                size: *size,
                            });
                        }
                        sum += u64::from(c.len);
                    }
                    if sum != *size {
                        return Err(ManifestError::BadChunks {
                            path: path.into(),
                            size: *size,
                        });
                    }
                    total = total.saturating_add(*size);
                    if total > limits::MAX_TOTAL_BYTES {
                        return Err(ManifestError::TooLarge { bytes: total });
                    }
                }
                EntryKind::Symlink { target } => check_symlink(path, target)?,
            }
        }
        Ok(())
    }
}

fn check_name(what: &'static str, value: &str, version: bool) -> Result<(), ManifestError> {
    let allowed = |c: char| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (version && c == '+')
    };
    let ok = !value.is_empty()
        && value.len() <= limits::MAX_NAME_BYTES
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.chars().all(allowed);
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadName {
            what,
            value: value.into(),
        })
    }
}

/// Checks an app name (`what` = "app") or a version (`what` = "version").
pub fn validate_name(what: &'static str, value: &str) -> Result<(), ManifestError> {
    check_name(what, value, what == "version")
}

fn check_path(path: &str) -> Result<(), ManifestError> {
    let ok = !path.is_empty()
        && path.len() <= limits::MAX_PATH_BYTES
        && !path.contains('\0')
        && path.split('/').all(|c| {
            !c.is_empty() && c != "." && c != ".." && c.len() <= limits::MAX_COMPONENT_BYTES
        });
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadPath { path: path.into() })
    }
}

fn check_mode(path: &str, mode: u32) -> Result<(), ManifestError> {
    if mode & !MODE_MASK == 0 {
        Ok(())
    } else {
        Err(ManifestError::BadMode {
            path: path.into(),
            mode,
        })
    }
}

/// A target stays inside the release when it is relative, has no empty or
/// `.` components, uses `..` only as a leading prefix, and that prefix climbs
/// no higher than the link's own directory is deep. Then resolution climbs
/// real directories only (every parent in a manifest is a directory) and
/// descends through names of the release, whose links obey the same rule.
fn check_symlink(path: &str, target: &str) -> Result<(), ManifestError> {
    let escapes = || ManifestError::SymlinkEscapes {
        path: path.into(),
        target: target.into(),
    };
    if target.is_empty()
        || target.len() > limits::MAX_PATH_BYTES
        || target.starts_with('/')
        || target.contains('\0')
    {
        return Err(escapes());
    }
    let depth = path.matches('/').count();
    let mut ups = 0;
    let mut descended = false;
    for component in target.split('/') {
        match component {
            "" | "." => return Err(escapes()),
            ".." if descended => return Err(escapes()),
            ".." => ups += 1,
            _ => descended = true,
        }
    }
    if ups > depth {
        return Err(escapes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Dir { mode: 0o755 },
        }
    }

    fn file(path: &str, content: &[u8]) -> Entry {
        let chunks = if content.is_empty() {
            vec![]
        } else {
            vec![ChunkRef {
                hash: ChunkHash::of(content),
                len: content.len() as u32,
            }]
        };
        Entry {
            path: path.into(),
            kind: EntryKind::File {
                mode: 0o644,
                size: content.len() as u64,
                chunks,
            },
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        }
    }

    fn build(entries: Vec<Entry>) -> Result<Manifest, ManifestError> {
        Manifest::new("web", "1.0.0", entries)
    }

    #[test]
    fn valid_tree_is_accepted_and_sorted() {
        let m = build(vec![
            file("b/x.js", b"x"),
            dir("b"),
            file("a.txt", b"hello"),
            link("b/up", "../a.txt"),
            file("empty", b""),
        ])
        .unwrap();
        let paths: Vec<_> = m.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a.txt", "b", "b/up", "b/x.js", "empty"]);
        assert_eq!(m.file_totals(), (3, 6));
    }

    #[test]
    fn absolute_path_is_refused() {
        assert!(matches!(
            build(vec![file("/etc/passwd", b"x")]),
            Err(ManifestError::BadPath { .. })
        ));
    }

    #[test]
    fn dot_dot_component_is_refused() {
        assert!(matches!(
            build(vec![dir("a"), file("a/../../x", b"x")]),
            Err(ManifestError::BadPath { .. })
        ));
        assert!(matches!(
            build(vec![file("..", b"x")]),
            Err(ManifestError::BadPath { .. })
        ));
    }

    #[test]
    fn empty_and_dot_components_are_refused() {
        for p in ["", "a//b", "a/", "./a", "a/."] {
            assert!(
                matches!(
                    build(vec![dir("a"), file(p, b"x")]),
                    Err(ManifestError::BadPath { .. })
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn nul_in_path_is_refused() {
        assert!(matches!(
            build(vec![file("a\0b", b"x")]),
            Err(ManifestError::BadPath { .. })
        ));
    }

    #[test]
    fn overlong_component_is_refused() {
        let name = "n".repeat(limits::MAX_COMPONENT_BYTES + 1);
        assert!(matches!(
            build(vec![file(&name, b"x")]),
            Err(ManifestError::BadPath { .. })
        ));
    }

    #[test]
    fn duplicate_path_is_refused() {
        let err = build(vec![file("a", b"1"), file("a", b"2")]).unwrap_err();
        assert_eq!(err, ManifestError::Duplicate { path: "a".into() });
    }

    #[test]
    fn entry_under_a_file_or_symlink_is_refused() {
        assert!(matches!(
            build(vec![file("a", b"1"), file("a/b", b"2")]),
            Err(ManifestError::MissingParent { .. })
        ));
        assert!(matches!(
            build(vec![link("l", "x"), file("l/b", b"2")]),
            Err(ManifestError::MissingParent { .. })
        ));
        assert!(matches!(
            build(vec![file("nodir/b", b"2")]),
            Err(ManifestError::MissingParent { .. })
        ));
    }

    #[test]
    fn escaping_symlinks_are_refused() {
        for (path, target) in [
            ("l", "/etc/passwd"),
            ("l", ".."),
            ("d/l", "../.."),
            ("d/l", "x/../../.."),
            ("d/l", "x/.."),
            ("l", "./x"),
            ("l", ""),
            ("l", "a//b"),
        ] {
            let err = build(vec![dir("d"), link(path, target)]).unwrap_err();
            assert!(
                matches!(err, ManifestError::SymlinkEscapes { .. }),
                "{path} -> {target}: {err}"
            );
        }
    }

    #[test]
    fn symlinks_inside_the_release_are_accepted() {
        build(vec![
            dir("d"),
            dir("d/e"),
            link("d/e/l", "../../top"),
            link("d/m", "e/l"),
            link("t", "d"),
        ])
        .unwrap();
    }

    #[test]
    fn setuid_mode_is_refused() {
        let e = Entry {
            path: "a".into(),
            kind: EntryKind::Dir { mode: 0o4755 },
        };
        assert!(matches!(build(vec![e]), Err(ManifestError::BadMode { .. })));
    }

    #[test]
    fn chunk_list_must_add_up_to_size() {
        let mut e = file("a", b"hello");
        if let EntryKind::File { size, .. } = &mut e.kind {
            *size = 6;
        }
        assert!(matches!(
            build(vec![e]),
            Err(ManifestError::BadChunks { .. })
        ));
        let oversized = Entry {
            path: "b".into(),
            kind: EntryKind::File {
                mode: 0o644,
                size: MAX_CHUNK_SIZE as u64 + 1,
                chunks: vec![ChunkRef {
                    hash: ChunkHash([0; 32]),
                    len: MAX_CHUNK_SIZE as u32 + 1,
                }],
            },
        };
        assert!(matches!(
            build(vec![oversized]),
            Err(ManifestError::BadChunks { .. })
        ));
    }

    #[test]
    fn bad_app_and_version_names_are_refused() {
        for (app, version) in [
            ("", "1"),
            ("we b", "1"),
            ("web@x", "1"),
            ("-web", "1"),
            ("web", "1/2"),
            ("web", ""),
        ] {
            assert!(
                matches!(
                    Manifest::new(app, version, vec![]),
                    Err(ManifestError::BadName { .. })
                ),
                "{app}@{version}"
            );
        }
        Manifest::new("my_app.v2", "1.4.2+build-7", vec![]).unwrap();
    }

    #[test]
    fn too_many_bytes_are_refused() {
        let big = Entry {
            path: "big".into(),
            kind: EntryKind::File {
                mode: 0o644,
                size: limits::MAX_TOTAL_BYTES + MAX_CHUNK_SIZE as u64,
                chunks: vec![
                    ChunkRef {
                        hash: ChunkHash([1; 32]),
                        len: MAX_CHUNK_SIZE as u32
                    };
                    (limits::MAX_TOTAL_BYTES / MAX_CHUNK_SIZE as u64 + 1) as usize
                ],
            },
        };
        assert!(matches!(
            build(vec![big]),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn too_many_entries_are_refused() {
        let entries = vec![dir("a"); limits::MAX_ENTRIES + 1];
        assert!(matches!(
            build(entries),
            Err(ManifestError::TooManyEntries { .. })
        ));
    }

    #[test]
    fn unique_chunks_drop_repeats_in_first_use_order() {
        let m = build(vec![
            file("a", b"same"),
            file("b", b"same"),
            file("c", b"other"),
        ])
        .unwrap();
        assert_eq!(m.chunk_refs().count(), 3);
        let unique: Vec<_> = m.unique_chunks().iter().map(|c| c.hash).collect();
        assert_eq!(unique, [ChunkHash::of(b"same"), ChunkHash::of(b"other")]);
    }
}
