//! Criterion benchmarks of the entropy coder on FrankenSplit's 48×28×28 latent.
//! `frankensplit bench codec` reports the same numbers without criterion, and
//! `tools/bench/compressai_codec.py` sets them against CompressAI's.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use frankensplit_codec::{DecodeLimits, EntropyBottleneck, LatentShape};

fn codec(c: &mut Criterion) {
    let shape = LatentShape::new(48, 28, 28);
    let eb = EntropyBottleneck::synthetic(48);
    let latent = eb.synthetic_latent(shape, 0x5EED);
    let string = eb.compress(&latent, shape).unwrap();
    let mut group = c.benchmark_group("entropy_bottleneck_48x28x28");
    group.throughput(Throughput::Elements(shape.len() as u64));
    group.bench_function("compress", |b| b.iter(|| eb.compress(&latent, shape).unwrap()));
    group.bench_function("decompress", |b| {
        b.iter(|| eb.decompress(&string, shape, DecodeLimits::default()).unwrap())
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
