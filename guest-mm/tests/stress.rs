//! Walkers against mappers/unmappers on real memory: no use-after-free, no
//! stale translation, memory really released, no error, no panic.
//!
//! Rules guarded (`GMM_BREAK_RULE`, feature `mutation`): `grace_period` and
//! `unhook_order` (walkers read released pages, zero, through live or
//! cached translations; released memory is found resident again),
//! `cache_shootdown` (walkers' and mutators' caches keep translations
//! across unmaps; a mutator's cached translation of a range it just
//! unmapped is found at once), `deferred_free` (the scanner's and walkers'
//! pinned walks of a GiB churn read its freed level-2 page: poison),
//! `leaf_clear` (walkers read released pages through leaf entries left in
//! the leaf arena).
//! Half the walkers' read sections go through the vm-memory view
//! (`read_slice`, `get_slices`), so the same rules guard that path:
//! `view_stale_reads` counts what it caught.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

use std::time::Duration;

use guest_mm::stress::{run, StressConfig, StressReport};

/// Churn cycles wanted before the test stops adding rounds: the
/// deferred-free detector catches a given removal only now and then.
const CHURNS_WANTED: u64 = 64;
/// Rounds of the main configuration at most (a loaded machine does less
/// per round).
const MAX_ROUNDS: usize = 4;

/// Run `cfg` and check that nothing was violated.
fn check(cfg: StressConfig) -> StressReport {
    let t0 = std::time::Instant::now();
    let r = run(&cfg).expect("stress set-up");
    // Reported, not asserted: wall-clock bounds belong to benchmarks.
    eprintln!("{r:#?}\nrun of {:?} took {:?}", cfg.duration, t0.elapsed());
    let why = &r.first_violation;
    assert_eq!(r.thread_panics, 0, "{why:?}");
    assert_eq!(r.op_errors, 0, "{why:?}");
    assert_eq!(r.use_after_free, 0, "{why:?}");
    assert_eq!(r.stale_translations, 0, "{why:?}");
    assert_eq!(r.view_stale_reads, 0, "{why:?}");
    assert_eq!(r.not_released, 0, "{why:?}");
    assert_eq!(r.oracle_mismatch, 0, "{why:?}");
    assert_eq!(r.violations(), 0, "{why:?}");
    assert_eq!(
        r.region_resident_end_bytes, 0,
        "teardown must release every page"
    );
    assert_eq!(
        r.table_pages_end, 1,
        "only the root may stay after teardown + barrier"
    );
    r
}

// One test running both configurations in turn: run in parallel they
// would starve each other on a 2-core machine.
#[test]
fn stress_walkers_vs_unmappers() {
    let mut total = StressReport::default();
    for _ in 0..MAX_ROUNDS {
        let r = check(StressConfig {
            duration: Duration::from_millis(2500),
            ..StressConfig::default()
        });
        total.walks_ok += r.walks_ok;
        total.cache_hits += r.cache_hits;
        total.view_reads += r.view_reads;
        total.view_reads_ok += r.view_reads_ok;
        total.shootdowns += r.shootdowns;
        total.unmaps += r.unmaps;
        total.maps += r.maps;
        total.churns += r.churns;
        total.scans += r.scans;
        if total.churns >= CHURNS_WANTED {
            break;
        }
    }
    // The runs must have exercised what the detectors need.
    assert!(
        total.walks_ok > 1000,
        "walkers must have translated: {}",
        total.walks_ok
    );
    assert!(
        total.view_reads_ok > 1000,
        "walkers must have read through the vm-memory view: {} of {} reads",
        total.view_reads_ok,
        total.view_reads
    );
    assert!(
        total.cache_hits > 1000 && total.shootdowns > 10,
        "walkers must have used their caches across unmaps: {} hits, {} shootdowns",
        total.cache_hits,
        total.shootdowns
    );
    assert!(
        total.unmaps >= 10 && total.maps >= 3,
        "mutators must have worked: {} unmaps, {} maps",
        total.unmaps,
        total.maps
    );
    assert!(
        total.churns >= CHURNS_WANTED / 4 && total.scans >= 16,
        "blocks must have been churned under the scanner: {} churns, {} scans",
        total.churns,
        total.scans
    );
    with_batch_allocation_failures();
}

/// Every gather batch allocation fails: the on-stack fallback, flushes
/// every few entries. Slow per operation, so only violations and the
/// fallback itself are required here.
fn with_batch_allocation_failures() {
    let r = check(StressConfig {
        duration: Duration::from_millis(2000),
        fail_batch_every: 1,
        yield_entries: 64,
        ..StressConfig::default()
    });
    assert!(r.unmaps >= 5, "mutators must have worked: {}", r.unmaps);
    assert!(
        r.fallback_batches > 0,
        "the on-stack fallback must have been used"
    );
}
