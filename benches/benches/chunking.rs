//! Chunk+hash throughput of convoy-chunker beside the bare FastCDC+BLAKE3 loop.

use convoy_benches::{bare_fastcdc_blake3, convoy_chunk_hash, noise};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn chunk_and_hash(c: &mut Criterion) {
    let data = noise(64 << 20, 1);
    let mut group = c.benchmark_group("chunk+hash 64MiB");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(20);
    group.bench_function("bare fastcdc+blake3 (reference)", |b| {
        b.iter(|| bare_fastcdc_blake3(&data))
    });
    group.bench_function("convoy chunk_slice", |b| {
        b.iter(|| convoy_chunk_hash(&data))
    });
    group.finish();
}

criterion_group!(benches, chunk_and_hash);
criterion_main!(benches);
