//! Content-defined chunking (FastCDC v2020) and BLAKE3 chunk names.

use std::fmt;
use std::io::{self, Read};

use fastcdc::v2020::FastCDC;
use serde::{Deserialize, Serialize};

/// The smallest chunk FastCDC cuts, except the last chunk of a file.
pub const MIN_CHUNK_SIZE: usize = 16 * 1024;
/// The size FastCDC aims for.
pub const AVG_CHUNK_SIZE: usize = 64 * 1024;
/// No chunk is ever larger than this.
pub const MAX_CHUNK_SIZE: usize = 256 * 1024;

/// Bytes a [`StreamChunker`] reads ahead. Any multiple of
/// [`MAX_CHUNK_SIZE`] gives the same cut points; larger buffers mean fewer
/// copies of the unfinished tail.
const STREAM_BUFFER_SIZE: usize = 16 * MAX_CHUNK_SIZE;

/// The BLAKE3 hash of a chunk's uncompressed bytes: the chunk's name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(hex: &str) -> Option<Self> {
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| Self(*h.as_bytes()))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

/// One chunk of a file as a manifest lists it: its name and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk's bytes.
    pub hash: ChunkHash,
    /// Length of the uncompressed chunk, 1..=[`MAX_CHUNK_SIZE`].
    pub len: u32,
}

fn cutter(data: &[u8]) -> FastCDC<'_> {
    FastCDC::new(data, MIN_CHUNK_SIZE, AVG_CHUNK_SIZE, MAX_CHUNK_SIZE)
}

/// Splits `data` into chunks and calls `each(bytes, chunk)` for every one,
/// in order.
pub fn chunk_slice<E>(
    data: &[u8],
    mut each: impl FnMut(&[u8], ChunkRef) -> Result<(), E>,
) -> Result<(), E> {
    for cut in cutter(data) {
        let bytes = &data[cut.offset..cut.offset + cut.length];
        each(bytes, chunk_ref(bytes))?;
    }
    Ok(())
}

fn chunk_ref(bytes: &[u8]) -> ChunkRef {
    debug_assert!(!bytes.is_empty() && bytes.len() <= MAX_CHUNK_SIZE);
    ChunkRef {
        hash: ChunkHash::of(bytes),
        len: bytes.len() as u32,
    }
}

/// Chunks a stream with memory bounded by a fixed buffer, giving exactly the
/// cut points [`chunk_slice`] gives for the same bytes.
///
/// FastCDC decides a cut from at most [`MAX_CHUNK_SIZE`] bytes after the
/// chunk's start, so every chunk that ends before the buffer's end is final;
/// the unfinished tail moves to the front and the buffer is refilled.
pub struct StreamChunker {
    buf: Vec<u8>,
}

impl Default for StreamChunker {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamChunker {
    /// A chunker with its read buffer allocated once.
    pub fn new() -> Self {
        Self {
            buf: vec![0; STREAM_BUFFER_SIZE],
        }
    }

    /// Reads `source` to its end, calling `each(bytes, chunk)` per chunk.
    /// Returns the number of bytes read.
    pub fn chunk_reader<E: From<io::Error>>(
        &mut self,
        mut source: impl Read,
        mut each: impl FnMut(&[u8], ChunkRef) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut filled = 0;
        let mut total = 0u64;
        loop {
            let mut eof = false;
            while filled < self.buf.len() {
                match source.read(&mut self.buf[filled..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        filled += n;
                        total += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let data = &self.buf[..filled];
            let mut consumed = 0;
            for cut in cutter(data) {
                let end = cut.offset + cut.length;
                if !eof && end == filled {
                    break; // may grow once more bytes arrive
                }
                let bytes = &data[cut.offset..end];
                each(bytes, chunk_ref(bytes))?;
                consumed = end;
            }
            if eof {
                debug_assert_eq!(consumed, filled);
                return Ok(total);
            }
            assert!(consumed > 0, "a full buffer always yields a final chunk");
            self.buf.copy_within(consumed..filled, 0);
            filled -= consumed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::pseudo_random;
    use proptest::prelude::*;

    fn slice_chunks(data: &[u8]) -> Vec<ChunkRef> {
        let mut out = Vec::new();
        chunk_slice::<()>(data, |_, c| {
            out.push(c);
            Ok(())
        })
        .unwrap();
        out
    }

    fn stream_chunks(data: &[u8], read_size: usize) -> Vec<ChunkRef> {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        let n = StreamChunker::new()
            .chunk_reader::<io::Error>(Trickle(data, read_size), |_, c| {
                out.push(c);
                Ok(())
            })
            .unwrap();
        assert_eq!(n, data.len() as u64);
        out
    }

    /// Pins FastCDC's cut points and the BLAKE3 names for a fixed input: any
    /// change of chunk boundaries (crate version, parameters) fails here.
    #[test]
    fn golden_cut_points_and_hashes() {
        let data = pseudo_random(1 << 20, 0x5eed);
        let chunks = slice_chunks(&data);
        let lens: Vec<u32> = chunks.iter().map(|c| c.len).collect();
        assert_eq!(lens, GOLDEN_LENS, "cut points changed");
        assert_eq!(chunks[0].hash.to_hex(), GOLDEN_FIRST_HASH);
        assert_eq!(chunks.last().unwrap().hash.to_hex(), GOLDEN_LAST_HASH);
    }

    const GOLDEN_LENS: &[u32] = &[
        70860, 32337, 69488, 147106, 80103, 19470, 35570, 67267, 41465, 26848, 68082, 83047,
        140936, 165997,
    ];
    const GOLDEN_FIRST_HASH: &str =
        "c125be85dbcdfc546955754da2f4c7ecfdb7c965e4ea12010d5115847a81dc85";
    const GOLDEN_LAST_HASH: &str =
        "19aeb6f59f81c2e834f9f1ff3de94981d0628e73f263db900b7dbe4d6aef9bf7";

    #[test]
    fn chunks_cover_input_within_size_bounds() {
        let data = pseudo_random(3 << 20, 7);
        let chunks = slice_chunks(&data);
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        assert_eq!(total, data.len() as u64);
        for c in &chunks[..chunks.len() - 1] {
            assert!((MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&(c.len as usize)));
        }
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(slice_chunks(&[]).is_empty());
        assert!(stream_chunks(&[], 100).is_empty());
    }

    #[test]
    fn stream_matches_slice_across_buffer_refills() {
        let data = pseudo_random(5 * STREAM_BUFFER_SIZE + 12345, 99);
        assert_eq!(stream_chunks(&data, 1 << 20), slice_chunks(&data));
        // Long runs of zeros cut at MAX_CHUNK_SIZE, right at buffer edges.
        let zeros = vec![0u8; 3 * STREAM_BUFFER_SIZE];
        assert_eq!(stream_chunks(&zeros, 7777), slice_chunks(&zeros));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn stream_equals_slice(len in 0usize..(2 * STREAM_BUFFER_SIZE + 5), seed: u64, read in 1usize..300_000) {
            let data = pseudo_random(len, seed | 1);
            prop_assert_eq!(stream_chunks(&data, read), slice_chunks(&data));
        }

        #[test]
        fn chunking_is_deterministic(len in 0usize..(1 << 20), seed: u64) {
            let data = pseudo_random(len, seed | 1);
            prop_assert_eq!(slice_chunks(&data), slice_chunks(&data.clone()));
        }
    }
}
