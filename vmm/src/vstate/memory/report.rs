//! [`MemoryReport`]: what only this monitor knows about a VM's guest
//! memory, for `GET /memory` and the metrics file.
//!
//! Invariant: every figure is read from the live state (a pinned census of
//! the stage-2 table, the table's and the fault handler's counters); none
//! is kept on the side, so the report cannot drift from the table.

use std::sync::atomic::Ordering::Relaxed;

use guest_mm::Gpa;
use serde::{Deserialize, Serialize};

use super::VmMemory;

/// A snapshot of guest memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Guest RAM, bytes.
    pub guest_ram_bytes: u64,
    /// Stage-2 table pages × 4 KiB.
    pub table_bytes: u64,
    /// Present leaves of 4 KiB.
    pub leaves_4k: u64,
    /// Present leaves of 2 MiB.
    pub leaves_2m: u64,
    /// Guest RAM mapped and present, bytes.
    pub present_bytes: u64,
    /// Bytes in the balloon.
    pub ballooned_bytes: u64,
    /// Bytes released and not touched since (they fault back in).
    pub discarded_bytes: u64,
    /// Gathers flushed that did work.
    pub gathers: u64,
    /// Backing bytes the gathers released.
    pub released_bytes: u64,
    /// Longest table-lock hold, µs.
    pub max_lock_hold_us: f64,
    /// 99th percentile of table-lock holds, µs (upper bound of its
    /// power-of-two bucket).
    pub p99_lock_hold_us: f64,
    /// Invalidations the table ran.
    pub invalidations: u64,
    /// Demand faults resolved by the userfaultfd handler.
    pub demand_faults: u64,
}

/// The upper bound, in ns, of the bucket holding quantile `q` of a log2
/// histogram (bucket `i` counts `[2^i, 2^(i+1))` ns); 0 when empty.
pub fn hist_quantile_ns(hist: &[u64], q: f64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = ((total as f64) * q).ceil() as u64;
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= want {
            return 1u64 << (i + 1).min(63);
        }
    }
    1u64 << hist.len().min(63)
}

impl VmMemory {
    /// What guest memory looks like now (one pinned census of the table:
    /// do not call from a thread that is pinned).
    pub fn report(&self) -> MemoryReport {
        let table = self.stage2().table();
        let size = self.size().bytes();
        let census = table.census(Gpa(0), Gpa(size));
        let stats = table.stats();
        MemoryReport {
            guest_ram_bytes: size,
            table_bytes: table.table_bytes(),
            leaves_4k: census.leaves[0],
            leaves_2m: census.leaves[1],
            present_bytes: census.present_bytes,
            ballooned_bytes: census.ballooned_bytes,
            discarded_bytes: census.discarded_bytes,
            gathers: stats.flushes,
            released_bytes: stats.released_bytes,
            max_lock_hold_us: stats.lock_hold_max_ns as f64 / 1e3,
            p99_lock_hold_us: hist_quantile_ns(&stats.lock_hold_hist, 0.99) as f64 / 1e3,
            invalidations: stats.invalidations,
            demand_faults: self.fault_stats().faults.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_log2_histogram() {
        assert_eq!(hist_quantile_ns(&[], 0.99), 0);
        assert_eq!(hist_quantile_ns(&[0, 0, 0], 0.99), 0);
        // 99 holds in [1024, 2048), one in [2^20, 2^21).
        let mut h = vec![0u64; 32];
        h[10] = 99;
        h[20] = 1;
        assert_eq!(hist_quantile_ns(&h, 0.99), 2048);
        assert_eq!(hist_quantile_ns(&h, 1.0), 1 << 21);
    }

    #[test]
    fn report_follows_releases() {
        use crate::vstate::memory::{test_memory, ReleaseMode};

        let mem = test_memory("16M");
        let r = mem.report();
        assert_eq!(r.guest_ram_bytes, 16 << 20);
        assert_eq!(r.present_bytes, 16 << 20);
        assert_eq!(r.leaves_4k, 4096);
        assert_eq!(
            (r.ballooned_bytes, r.discarded_bytes, r.released_bytes),
            (0, 0, 0)
        );
        assert!(r.table_bytes > 0);
        mem.release(&[(2 << 20, 1 << 20)], ReleaseMode::Discard)
            .expect("release");
        mem.release(&[(8 << 20, 3 * 4096)], ReleaseMode::Balloon)
            .expect("balloon");
        let r = mem.report();
        assert_eq!(r.discarded_bytes, 1 << 20);
        assert_eq!(r.ballooned_bytes, 3 * 4096);
        assert_eq!(r.present_bytes, (16 << 20) - (1 << 20) - 3 * 4096);
        assert_eq!(r.released_bytes, (1 << 20) + 3 * 4096);
        assert!(r.gathers >= 1 && r.invalidations >= 1, "{r:?}");
    }
}
