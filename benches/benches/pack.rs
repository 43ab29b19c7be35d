//! Packing a 256 MiB tree of mixed files into a fresh RocksDB store,
//! beside the bare chunk+hash loop over the same bytes held in memory.

use convoy_benches::{bare_fastcdc_blake3, noise, write_mixed_tree};
use convoy_chunker::pack;
use convoy_daemon::store::{Ingest, RocksStore, Store};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn pack_into_store(c: &mut Criterion) {
    let tree = tempfile::tempdir().unwrap();
    let total = write_mixed_tree(tree.path(), 256 << 20, 7).unwrap();
    let mut group = c.benchmark_group("pack 256MiB mixed tree");
    group.throughput(Throughput::Bytes(total));
    group.sample_size(10);
    let flat = noise(total as usize, 7);
    group.bench_function("bare fastcdc+blake3 in memory (reference)", |b| {
        b.iter(|| bare_fastcdc_blake3(&flat))
    });
    group.bench_function("pack into fresh RocksStore", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                let store = RocksStore::open(dir.path()).unwrap();
                let ingest = Ingest::new(&store);
                let m = pack(tree.path(), "bench", "1", &&ingest, &()).unwrap();
                store.flush().unwrap();
                store.put_release(&m).unwrap();
                dir
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, pack_into_store);
criterion_main!(benches);
