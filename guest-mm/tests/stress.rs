//! Walkers against mappers/unmappers on real memory: no use-after-free, no
//! stale translation, memory really released (bounded to seconds).

use std::time::Duration;

use guest_mm::stress::{run, StressConfig};

fn check(cfg: StressConfig) {
    let r = run(&cfg).expect("stress set-up");
    eprintln!("{r:#?}");
    assert!(
        r.walks_ok > 1000,
        "walkers must have translated: {}",
        r.walks_ok
    );
    assert!(r.unmaps > 20 && r.maps > 10, "mutators must have worked");
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
}

#[test]
fn stress_walkers_vs_unmappers() {
    check(StressConfig {
        duration: Duration::from_millis(2500),
        ..StressConfig::default()
    });
}

#[test]
fn stress_with_batch_allocation_failures() {
    let cfg = StressConfig {
        duration: Duration::from_millis(1500),
        fail_batch_every: 2,
        yield_entries: 64,
        ..StressConfig::default()
    };
    let r = run(&cfg).expect("stress set-up");
    assert!(
        r.fallback_batches > 0,
        "the on-stack fallback must have been used"
    );
    check(cfg);
}
