//! Walkers against mappers/unmappers on real memory: no use-after-free, no
//! stale translation, memory really released (bounded to seconds).

use std::time::Duration;

use guest_mm::stress::{run, StressConfig, StressReport};

fn check(cfg: StressConfig) -> StressReport {
    let r = run(&cfg).expect("stress set-up");
    eprintln!("{r:#?}");
    assert!(
        r.walks_ok > 1000,
        "walkers must have translated: {}",
        r.walks_ok
    );
    assert!(
        r.unmaps >= 10 && r.maps >= 3,
        "mutators must have worked: {} unmaps, {} maps",
        r.unmaps,
        r.maps
    );
    assert_eq!(r.use_after_free, 0);
    assert_eq!(r.stale_translations, 0);
    assert_eq!(r.not_released, 0);
    assert_eq!(r.oracle_mismatch, 0);
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
    check(StressConfig {
        duration: Duration::from_millis(2500),
        ..StressConfig::default()
    });
    with_batch_allocation_failures();
}

fn with_batch_allocation_failures() {
    let r = check(StressConfig {
        duration: Duration::from_millis(2000),
        fail_batch_every: 1,
        yield_entries: 64,
        ..StressConfig::default()
    });
    assert!(
        r.fallback_batches > 0,
        "the on-stack fallback must have been used"
    );
}
