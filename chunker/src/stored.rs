//! The stored and wire form of a chunk: compressed once, when packed.

use crate::chunk::{ChunkHash, ChunkRef, MAX_CHUNK_SIZE};

/// zstd level used when packing. Chosen by measurement (README, "Compression"):
/// level 1 packs text at several hundred MiB/s per core; higher levels saved
/// a few percent more and cost several times the CPU.
pub const COMPRESSION_LEVEL: i32 = 1;

/// A chunk is stored compressed only when that saves at least this share
/// (numerator over 10) of its size; else it is stored raw.
const MIN_SAVING_TENTHS: usize = 1;

/// How a chunk's bytes are stored and sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The chunk's own bytes.
    Raw = 0,
    /// A zstd frame of the chunk's bytes.
    Zstd = 1,
}

impl Encoding {
    /// The flag byte that names this encoding in storage and on the wire.
    pub fn flag(self) -> u8 {
        self as u8
    }

    /// The encoding a flag byte names.
    pub fn from_flag(flag: u8) -> Option<Self> {
        match flag {
            0 => Some(Self::Raw),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A chunk in the form it is stored and sent: raw or zstd-compressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChunk {
    /// Which form `bytes` is in.
    pub encoding: Encoding,
    /// The stored bytes.
    pub bytes: Vec<u8>,
}

/// Why stored bytes are not the chunk they claim to be.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The zstd frame is corrupt or decompresses to more than the chunk's length.
    #[error("chunk {hash}: compressed bytes do not decompress ({reason})")]
    Decompress {
        /// The chunk concerned.
        hash: ChunkHash,
        /// What zstd said.
        reason: String,
    },
    /// The bytes have another length than the manifest lists.
    #[error("chunk {hash}: {actual} bytes where {expected} were expected")]
    Length {
        /// The chunk concerned.
        hash: ChunkHash,
        /// Length from the manifest.
        expected: usize,
        /// Length of the bytes at hand.
        actual: usize,
    },
    /// The bytes hash to another name.
    #[error("chunk {hash}: content hashes to {actual}")]
    Hash {
        /// The chunk concerned.
        hash: ChunkHash,
        /// What the bytes hash to.
        actual: ChunkHash,
    },
}

/// Compresses chunks for storage, reusing one zstd context.
pub struct Compressor {
    zstd: zstd::bulk::Compressor<'static>,
}

impl Compressor {
    /// A compressor at [`COMPRESSION_LEVEL`].
    pub fn new() -> Self {
        Self {
            zstd: zstd::bulk::Compressor::new(COMPRESSION_LEVEL)
                .expect("zstd accepts its own default level"),
        }
    }

    /// The stored form of `raw`: compressed if that saves a tenth, else raw.
    pub fn store(&mut self, raw: &[u8]) -> StoredChunk {
        let limit = raw.len() - raw.len() * MIN_SAVING_TENTHS / 10;
        if let Ok(bytes) = self.zstd.compress(raw) {
            if bytes.len() <= limit {
                return StoredChunk {
                    encoding: Encoding::Zstd,
                    bytes,
                };
            }
        }
        StoredChunk {
            encoding: Encoding::Raw,
            bytes: raw.to_vec(),
        }
    }
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new()
    }
}

impl StoredChunk {
    /// Decompresses and checks that the bytes are the chunk `expected` names.
    pub fn into_verified(self, expected: &ChunkRef) -> Result<Vec<u8>, ChunkError> {
        let raw = match self.encoding {
            Encoding::Raw => self.bytes,
            Encoding::Zstd => decompress(&self.bytes, expected.hash)?,
        };
        check(&raw, expected)?;
        Ok(raw)
    }

    /// Checks that the bytes are the chunk `expected` names, keeping them
    /// in their stored form (what a daemon stores and serves on).
    pub fn verify(&self, expected: &ChunkRef) -> Result<(), ChunkError> {
        match self.encoding {
            Encoding::Raw => check(&self.bytes, expected),
            Encoding::Zstd => check(&decompress(&self.bytes, expected.hash)?, expected),
        }
    }
}

fn decompress(bytes: &[u8], hash: ChunkHash) -> Result<Vec<u8>, ChunkError> {
    // The capacity bounds what a hostile frame can make us allocate.
    zstd::bulk::decompress(bytes, MAX_CHUNK_SIZE).map_err(|e| ChunkError::Decompress {
        hash,
        reason: e.to_string(),
    })
}

fn check(raw: &[u8], expected: &ChunkRef) -> Result<(), ChunkError> {
    let hash = expected.hash;
    if raw.len() != expected.len as usize {
        return Err(ChunkError::Length {
            hash,
            expected: expected.len as usize,
            actual: raw.len(),
        });
    }
    let actual = ChunkHash::of(raw);
    if actual != hash {
        return Err(ChunkError::Hash { hash, actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(raw: &[u8]) -> ChunkRef {
        ChunkRef {
            hash: ChunkHash::of(raw),
            len: raw.len() as u32,
        }
    }

    #[test]
    fn text_is_stored_compressed_and_round_trips() {
        let raw = b"function add(a, b) { return a + b; }\n".repeat(1000);
        let stored = Compressor::new().store(&raw);
        assert_eq!(stored.encoding, Encoding::Zstd);
        assert!(stored.bytes.len() < raw.len() / 5);
        assert_eq!(stored.into_verified(&chunk(&raw)).unwrap(), raw);
    }

    #[test]
    fn incompressible_bytes_are_stored_raw() {
        let mut raw = vec![0u8; 65536];
        blake3::Hasher::new()
            .update(b"noise")
            .finalize_xof()
            .fill(&mut raw);
        let stored = Compressor::new().store(&raw);
        assert_eq!(stored.encoding, Encoding::Raw);
        assert_eq!(stored.bytes, raw);
    }

    #[test]
    fn flipped_byte_is_a_hash_error() {
        let raw = vec![7u8; 1000];
        let mut stored = StoredChunk {
            encoding: Encoding::Raw,
            bytes: raw.clone(),
        };
        stored.bytes[500] ^= 1;
        assert!(matches!(
            stored.into_verified(&chunk(&raw)),
            Err(ChunkError::Hash { .. })
        ));
    }

    #[test]
    fn garbage_zstd_frame_is_a_decompress_error() {
        let raw = vec![7u8; 1000];
        let stored = StoredChunk {
            encoding: Encoding::Zstd,
            bytes: vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3],
        };
        assert!(matches!(
            stored.into_verified(&chunk(&raw)),
            Err(ChunkError::Decompress { .. })
        ));
    }

    #[test]
    fn bomb_larger_than_a_chunk_is_refused() {
        let huge = vec![0u8; MAX_CHUNK_SIZE * 4];
        let stored = StoredChunk {
            encoding: Encoding::Zstd,
            bytes: zstd::bulk::compress(&huge, 1).unwrap(),
        };
        assert!(stored.into_verified(&chunk(&huge[..10])).is_err());
    }
}
