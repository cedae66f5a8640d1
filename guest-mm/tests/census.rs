//! `Stage2Table::census` against what was mapped, discarded and ballooned.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

use guest_mm::{
    BackingKind, BackingRegion, Census, Gpa, Hva, PageSize, Perms, Stage2Table, TableConfig,
    UnmapMode,
};

const MIB: u64 = 1 << 20;

#[test]
fn census_counts_leaves_and_markers() {
    // 8 MiB of host memory, 2 MiB aligned (never touched: simulated backing).
    let buf: &'static mut [u8] = Box::leak(vec![0u8; 10 * MIB as usize].into_boxed_slice());
    let host = (buf.as_mut_ptr() as u64).next_multiple_of(2 * MIB);
    let table = Stage2Table::new(TableConfig::default()).unwrap();
    let kind = BackingKind::Simulated { hook: None };
    table
        .register_backing(BackingRegion {
            hva: Hva(host),
            len: 8 * MIB,
            kind,
        })
        .unwrap();
    // 4 MiB as 2 MiB leaves at 0, 4 MiB as 4 KiB leaves at 64 MiB.
    table
        .map(Gpa(0), Hva(host), 4 * MIB, Perms::RW, PageSize::Size2M)
        .unwrap();
    table
        .map(
            Gpa(64 * MIB),
            Hva(host + 4 * MIB),
            4 * MIB,
            Perms::RW,
            PageSize::Size4K,
        )
        .unwrap();
    let all = table.census(Gpa(0), Gpa(1 << 30));
    assert_eq!(
        all,
        Census {
            leaves: [1024, 2, 0],
            present_bytes: 8 * MIB,
            ..Census::default()
        }
    );
    // Balloon 3 pages and discard 1 MiB of the 4 KiB part; discard a whole
    // 2 MiB leaf.
    let mut g = table.gather();
    table
        .unmap(&mut g, Gpa(64 * MIB), 3 * 4096, UnmapMode::Balloon)
        .unwrap();
    table
        .unmap(&mut g, Gpa(65 * MIB), MIB, UnmapMode::Discard)
        .unwrap();
    table
        .unmap(&mut g, Gpa(2 * MIB), 2 * MIB, UnmapMode::Discard)
        .unwrap();
    g.finish().unwrap();
    let c = table.census(Gpa(0), Gpa(1 << 30));
    assert_eq!(c.ballooned_bytes, 3 * 4096);
    assert_eq!(c.discarded_bytes, 3 * MIB);
    assert_eq!(c.present_bytes, 8 * MIB - 3 * MIB - 3 * 4096);
    assert_eq!(c.leaves, [1024 - 256 - 3, 1, 0]);
    assert_eq!(c.poisoned, 0);
    // A range that cuts a leaf counts the part it covers.
    let part = table.census(Gpa(MIB), Gpa(MIB + 8192));
    assert_eq!((part.present_bytes, part.leaves), (8192, [0, 1, 0]));
    assert_eq!(table.census(Gpa(5), Gpa(5)), Census::default());
}
