//! The process-wide gauge of table pages in use
//! ([`guest_mm::reclaim::live_table_pages`]): it follows allocations,
//! frees after a grace period and dropped tables exactly, so that `gmm
//! soak` can require it back at its baseline after every VM. One test in
//! its own binary: the gauge counts every table of the process.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

mod common;

use common::*;
use guest_mm::reclaim::live_table_pages;
use guest_mm::*;

#[test]
fn the_gauge_follows_allocations_frees_and_dropped_tables() {
    let before = live_table_pages();
    let (t, _log) = simulated_table(TableConfig::default());
    let root = live_table_pages() - before;
    assert_eq!(root, t.stats().table_pages, "a new table counts its pages");

    // 16 MiB of 4 KiB leaves: leaf tables under one directory.
    t.map(Gpa(0), Hva(FAKE_HVA), 16 << 20, Perms::RW, PageSize::Size4K)
        .unwrap();
    let mapped = live_table_pages() - before;
    assert!(mapped > root, "mapping allocated table pages");
    assert_eq!(mapped, t.stats().table_pages);

    // Removed: the tables are unlinked, freed after a grace period.
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(0), 16 << 20, UnmapMode::Remove)
        .unwrap();
    g.finish().unwrap();
    t.rcu_barrier();
    assert_eq!(live_table_pages() - before, t.stats().table_pages);
    assert!(
        live_table_pages() - before < mapped,
        "unmapping freed pages"
    );

    // A second table, then both dropped with pages still in use: the
    // gauge is back where it started.
    let (u, _log2) = simulated_table(TableConfig::default());
    u.map(Gpa(0), Hva(FAKE_HVA), 4 << 20, Perms::RW, PageSize::Size4K)
        .unwrap();
    assert_eq!(
        live_table_pages() - before,
        t.stats().table_pages + u.stats().table_pages
    );
    drop((t, u));
    assert_eq!(
        live_table_pages(),
        before,
        "dropped tables leave no page counted"
    );
}
