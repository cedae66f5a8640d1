//! Micro-benchmarks of the table and gather primitives: map/unmap of one
//! entry, translate (cached and uncached), the flush of a full batch, and
//! the writer walk over a whole GiB of 4 KiB leaves (teardown, unmap).
//! Backing is simulated (nothing is dereferenced or released), so these
//! measure the table itself.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use guest_mm::*;

const FAKE: u64 = 0x1000_0000_0000;
const M2: u64 = 2 << 20;

fn table() -> Arc<Stage2Table> {
    let t = Stage2Table::new(TableConfig::default()).expect("table");
    t.register_backing(BackingRegion {
        hva: Hva(FAKE),
        len: 64 << 30,
        kind: BackingKind::Simulated { hook: None },
    })
    .expect("backing");
    t
}

fn map_unmap(c: &mut Criterion) {
    let t = table();
    // keep the path's table pages alive so we measure the entry, not allocation
    t.map(Gpa(0), Hva(FAKE), 4096, Perms::RW, PageSize::Size4K)
        .expect("map");
    c.bench_function("map_one_4k", |b| {
        b.iter(|| {
            t.map(
                Gpa(4096),
                Hva(FAKE + 4096),
                4096,
                Perms::RW,
                PageSize::Size4K,
            )
            .expect("map");
            let mut g = t.gather();
            t.unmap(&mut g, Gpa(4096), 4096, UnmapMode::Detach)
                .expect("unmap");
            // the flush (invalidate + grace period) is measured too
            g.finish().expect("flush");
        })
    });
}

fn translate(c: &mut Criterion) {
    let t = table();
    t.map(Gpa(0), Hva(FAKE), 256 * M2, Perms::RW, PageSize::Size4K)
        .expect("map");
    let mut w = t.walker();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Gpa((x % (256 * M2)) & !7)
    };
    c.bench_function("translate_uncached_4k_leaves", |b| {
        let g = w.pin();
        b.iter(|| black_box(g.translate_uncached(next(), Access::Read).is_ok()))
    });
    c.bench_function("translate_cached_same_page", |b| {
        let g = w.pin();
        b.iter(|| black_box(g.translate(Gpa(8192), Access::Read).is_ok()))
    });
    c.bench_function("pin_translate_unpin", |b| {
        b.iter(|| {
            let g = w.pin();
            black_box(g.translate(Gpa(8192), Access::Read).is_ok())
        })
    });
}

fn flush_full_batch(c: &mut Criterion) {
    let t = table();
    // pages mapped to reversed backing: nothing coalesces, one entry each
    let pages = 10_000u64;
    c.bench_function("unmap_and_flush_10k_scattered_pages", |b| {
        b.iter_batched(
            || {
                for i in 0..pages {
                    t.map(
                        Gpa(i * 4096),
                        Hva(FAKE + (pages - i) * 8192),
                        4096,
                        Perms::RW,
                        PageSize::Size4K,
                    )
                    .expect("map");
                }
            },
            |_| {
                let mut g = t.gather();
                t.unmap(&mut g, Gpa(0), pages * 4096, UnmapMode::Remove)
                    .expect("unmap");
                g.finish().expect("flush")
            },
            BatchSize::PerIteration,
        )
    });
}

/// The writer walk's cost per entry (`zap_leaf` in `table/ops.rs`): a
/// full-mm teardown and a `Remove` unmap of 1 GiB mapped at 4 KiB leaves
/// to contiguous backing (one coalesced release run, which the simulated
/// backing does not perform), a fresh table each time.
fn walk_one_gib(c: &mut Criterion) {
    const GIB: u64 = 1 << 30;
    let mapped = || {
        let t = table();
        t.map(Gpa(0), Hva(FAKE), GIB, Perms::RW, PageSize::Size4K)
            .expect("map");
        t
    };
    c.bench_function("teardown_1g_4k_leaves", |b| {
        b.iter_batched(
            mapped,
            |t| {
                let mut g = t.gather_full_mm();
                t.teardown(&mut g).expect("teardown");
                black_box(g.finish().expect("flush"));
                t
            },
            BatchSize::PerIteration,
        )
    });
    c.bench_function("unmap_1g_4k_leaves", |b| {
        b.iter_batched(
            mapped,
            |t| {
                let mut g = t.gather();
                t.unmap(&mut g, Gpa(0), GIB, UnmapMode::Remove)
                    .expect("unmap");
                black_box(g.finish().expect("flush"));
                t
            },
            BatchSize::PerIteration,
        )
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = map_unmap, translate, flush_full_batch, walk_one_gib
}
criterion_main!(benches);
