//! The one place that encodes and decodes manifests.
//!
//! Layout: the magic `CVYM`, a format version (u16, little-endian), then the
//! [`Manifest`](crate::Manifest) in bincode 2 (standard configuration:
//! variable-length integers, little-endian). Decoding refuses an unknown
//! magic or version, anything over [`limits::MAX_ENCODED_BYTES`], and
//! trailing bytes; [`decode_slice`] keeps what a length inside the bytes can
//! make the decoder allocate proportional to the bytes themselves. Swapping
//! the codec means changing this module only.

use serde::{de::DeserializeOwned, Serialize};

use crate::manifest::{limits, ManifestError};

/// First bytes of every encoded manifest.
pub const MAGIC: [u8; 4] = *b"CVYM";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = MAGIC.len() + 2;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ limits::MAX_ENCODED_BYTES }>()
}

/// How many bytes bincode may claim per byte of input. bincode claims a
/// value's in-memory size before it decodes it (eight bytes for a `u64` that
/// a variable-length integer writes in one), and a string's or byte
/// buffer's whole claimed length before it reads (and allocates) it.
pub const CLAIMS_PER_INPUT_BYTE: usize = 16;

/// Decodes one bincode value (standard configuration) from the front of
/// `body`, returning it and the bytes read.
///
/// bincode allocates a string or byte buffer at the length the input claims
/// before it finds the input too short; its only bound is the
/// configuration's limit, a constant. So the limit used here is the
/// smallest of a ladder of constants (powers of four from 4 KiB) that is at
/// least [`CLAIMS_PER_INPUT_BYTE`] times `body.len()`: a well-formed value
/// always fits, and a 175-byte input can no longer make the decoder allocate
/// 256 MiB (the fuzzer's `manifest` finding, now
/// `tests/hostile_lengths.rs`).
pub fn decode_slice<T: DeserializeOwned>(
    body: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    let claims = body.len().saturating_mul(CLAIMS_PER_INPUT_BYTE);
    macro_rules! ladder {
        ($($limit:expr),*) => {
            $(if claims <= $limit {
                let config = bincode::config::standard().with_limit::<{ $limit }>();
                return bincode::serde::decode_from_slice(body, config);
            })*
        };
    }
    ladder!(
        1 << 12,
        1 << 14,
        1 << 16,
        1 << 18,
        1 << 20,
        1 << 22,
        1 << 24,
        1 << 26,
        1 << 28,
        1 << 30,
        1 << 32
    );
    Err(bincode::error::DecodeError::LimitExceeded)
}

/// Why bytes are not a manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes do not start with [`MAGIC`].
    #[error("not a Convoy manifest (bad magic)")]
    BadMagic,
    /// A format version this build does not know.
    #[error("manifest format version {0} is not supported (this build reads version {FORMAT_VERSION}); upgrade convoy")]
    UnknownVersion(u16),
    /// More bytes than [`limits::MAX_ENCODED_BYTES`].
    #[error("manifest of {0} bytes exceeds the limit of {max} bytes", max = limits::MAX_ENCODED_BYTES)]
    TooLarge(usize),
    /// The body is not valid bincode for a manifest, or claims more than the limits.
    #[error("corrupt manifest: {0}")]
    Corrupt(String),
    /// Bytes left over after the manifest.
    #[error("corrupt manifest: {0} trailing bytes")]
    TrailingBytes(usize),
    /// The manifest decodes but breaks a rule.
    #[error("invalid manifest: {0}")]
    Invalid(#[from] ManifestError),
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_as(MAGIC, value)
}

/// [`encode`] behind another magic (a patch record's).
pub(crate) fn encode_as<T: Serialize>(magic: [u8; 4], value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("a valid manifest encodes within the size limit");
    out
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_as(MAGIC, bytes)
}

/// [`decode`] behind another magic (a patch record's).
pub(crate) fn decode_as<T: DeserializeOwned>(
    magic: [u8; 4],
    bytes: &[u8],
) -> Result<T, DecodeError> {
    if bytes.len() > limits::MAX_ENCODED_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if bytes.len() < HEADER_LEN || bytes[..MAGIC.len()] != magic {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let body = &bytes[HEADER_LEN..];
    let (value, read) = decode_slice(body).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if read != body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - read));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkHash, ChunkRef};
    use crate::manifest::{Entry, EntryKind, Manifest};
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest::new(
            "web",
            "1.4.2",
            vec![
                Entry {
                    path: "bin".into(),
                    kind: EntryKind::Dir { mode: 0o755 },
                },
                Entry {
                    path: "bin/app".into(),
                    kind: EntryKind::File {
                        mode: 0o755,
                        size: 5,
                        chunks: vec![ChunkRef {
                            hash: ChunkHash::of(b"hello"),
                            len: 5,
                        }],
                    },
                },
                Entry {
                    path: "current".into(),
                    kind: EntryKind::Symlink {
                        target: "bin/app".into(),
                    },
                },
            ],
        )
        .unwrap()
    }

    /// Pins the encoding: a change to it changes every release id.
    #[test]
    fn golden_encoding() {
        let encoded = sample().encode();
        assert_eq!(&encoded[..6], b"CVYM\x01\x00");
        assert_eq!(encoded.len(), GOLDEN_LEN);
        assert_eq!(sample().release_id().to_hex(), GOLDEN_ID);
    }

    const GOLDEN_LEN: usize = 89;
    const GOLDEN_ID: &str = "b6f7eca9e447ac35dc4d502abeb05f648caa51660165873ce1f7a0647a06599d";

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut e = sample().encode();
        e[4] = 2;
        assert!(matches!(
            Manifest::decode(&e),
            Err(DecodeError::UnknownVersion(2))
        ));
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut e = sample().encode();
        e[0] = b'X';
        assert!(matches!(Manifest::decode(&e), Err(DecodeError::BadMagic)));
        assert!(matches!(
            Manifest::decode(b"CV"),
            Err(DecodeError::BadMagic)
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut e = sample().encode();
        e.push(0);
        assert!(matches!(
            Manifest::decode(&e),
            Err(DecodeError::TrailingBytes(1))
        ));
    }

    #[test]
    fn truncation_is_refused() {
        let e = sample().encode();
        for cut in HEADER_LEN..e.len() {
            assert!(Manifest::decode(&e[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn huge_claimed_count_is_refused_without_allocating() {
        // Header, app "a", version "1", then an entry count of u64::MAX.
        let mut e = b"CVYM\x01\x00\x01a\x011".to_vec();
        e.push(253); // bincode varint marker for a u64
        e.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Manifest::decode(&e), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn oversized_input_is_refused() {
        let e = vec![0u8; limits::MAX_ENCODED_BYTES + 1];
        assert!(matches!(
            Manifest::decode(&e),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn decoded_manifest_is_validated() {
        // Encode an invalid manifest by bypassing the constructor.
        #[derive(serde::Serialize)]
        struct Raw {
            app: String,
            version: String,
            entries: Vec<Entry>,
        }
        let raw = Raw {
            app: "web".into(),
            version: "1".into(),
            entries: vec![Entry {
                path: "../escape".into(),
                kind: EntryKind::Dir { mode: 0o755 },
            }],
        };
        assert!(matches!(
            Manifest::decode(&encode(&raw)),
            Err(DecodeError::Invalid(ManifestError::BadPath { .. }))
        ));
        let unsorted = Raw {
            app: "web".into(),
            version: "1".into(),
            entries: vec![
                Entry {
                    path: "b".into(),
                    kind: EntryKind::Dir { mode: 0o755 },
                },
                Entry {
                    path: "a".into(),
                    kind: EntryKind::Dir { mode: 0o755 },
                },
            ],
        };
        assert!(matches!(
            Manifest::decode(&encode(&unsorted)),
            Err(DecodeError::Invalid(ManifestError::Unsorted { .. }))
        ));
    }

    fn arb_manifest() -> impl Strategy<Value = Manifest> {
        let name = "[a-z][a-z0-9]{0,6}";
        let entry = (
            name,
            any::<bool>(),
            0u32..0o777,
            proptest::collection::vec((any::<[u8; 32]>(), 1u32..1000), 0..4),
        );
        proptest::collection::vec(entry, 0..20).prop_map(|raw| {
            let mut seen = std::collections::HashSet::new();
            let entries = raw
                .into_iter()
                .filter(|(p, ..)| seen.insert(p.clone()))
                .map(|(path, is_dir, mode, chunks)| {
                    let kind = if is_dir {
                        EntryKind::Dir { mode }
                    } else {
                        let chunks: Vec<_> = chunks
                            .into_iter()
                            .map(|(h, len)| ChunkRef {
                                hash: ChunkHash(h),
                                len,
                            })
                            .collect();
                        EntryKind::File {
                            mode,
                            size: chunks.iter().map(|c| u64::from(c.len)).sum(),
                            chunks,
                        }
                    };
                    Entry { path, kind }
                })
                .collect();
            Manifest::new("app", "1.0", entries).unwrap()
        })
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(m in arb_manifest()) {
            let e = m.encode();
            prop_assert_eq!(Manifest::decode(&e).unwrap(), m.clone());
            prop_assert_eq!(m.release_id(), crate::manifest::ReleaseId::of_encoded(&e));
        }

        #[test]
        fn random_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut e = b"CVYM\x01\x00".to_vec();
            e.extend(tail);
            let _ = Manifest::decode(&e);
        }
    }
}
