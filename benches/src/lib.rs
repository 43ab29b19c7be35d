//! Shared pieces of Convoy's benchmarks: the bare reference loop and
//! generated input trees.
#![deny(missing_docs)]

use std::fs;
use std::io::Write;
use std::path::Path;

pub mod netns;

use convoy_chunker::{AVG_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// The reference: FastCDC v2020 over `data` and BLAKE3 of each chunk,
/// with nothing else. Returns the number of chunks (so nothing is optimised away).
pub fn bare_fastcdc_blake3(data: &[u8]) -> usize {
    let mut n = 0;
    for c in fastcdc::v2020::FastCDC::new(data, MIN_CHUNK_SIZE, AVG_CHUNK_SIZE, MAX_CHUNK_SIZE) {
        std::hint::black_box(blake3::hash(&data[c.offset..c.offset + c.length]));
        n += 1;
    }
    n
}

/// Convoy's own chunk-and-hash path over the same data.
pub fn convoy_chunk_hash(data: &[u8]) -> usize {
    let mut n = 0;
    convoy_chunker::chunk_slice::<()>(data, |_, c| {
        std::hint::black_box(c);
        n += 1;
        Ok(())
    })
    .expect("infallible");
    n
}

/// Deterministic incompressible bytes from a seed (BLAKE3 in XOF mode).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Writes about `total` bytes of incompressible files of mixed sizes
/// (1 KiB to 64 MiB, log-uniform, in nested directories) under `root`.
/// Returns the bytes written.
pub fn write_mixed_tree(root: &Path, total: u64, seed: u64) -> std::io::Result<u64> {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut written = 0u64;
    let mut i = 0u64;
    while written < total {
        // log2(size) uniform in [10, 26): 1 KiB .. 64 MiB.
        let bits = 10 + next() % 16;
        let size = ((1u64 << bits) + next() % (1u64 << bits)).min(total - written);
        let dir = root.join(format!("d{:02}/s{:02}", i % 16, (i / 16) % 8));
        fs::create_dir_all(&dir)?;
        let mut f = fs::File::create(dir.join(format!("f{i:05}.bin")))?;
        let mut left = size as usize;
        let mut part = 0u64;
        while left > 0 {
            let n = left.min(8 << 20);
            f.write_all(&noise(n, seed ^ (i << 20) ^ part))?;
            left -= n;
            part += 1;
        }
        written += size;
        i += 1;
    }
    Ok(written)
}

/// Writes one file of `size` incompressible bytes, 8 MiB at a time.
pub fn write_big_file(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut f = fs::File::create(path)?;
    let mut left = size;
    let mut part = 0;
    while left > 0 {
        let n = left.min(8 << 20) as usize;
        f.write_all(&noise(n, seed ^ part))?;
        left -= n as u64;
        part += 1;
    }
    Ok(())
}
