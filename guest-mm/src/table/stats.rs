//! The table's counters: the public snapshot ([`TableStats`]), the live
//! counters behind it, and the timed table lock ([`Locked`]) that records
//! how long every hold of the table lock lasted.
//!
//! **Invariants.** Counters only count: no decision of the table depends
//! on them (the `pending_waiters` gauge is read by tests to know a thread
//! is blocked, never by the table). A snapshot is a set of independent
//! relaxed loads, not a consistent cut.
//!
//! **Concurrency.** The counters are `std` atomics on purpose (not the
//! [`crate::sync`] shim): lockless readers never depend on them, so loom
//! need not explore them. Every hold of the table lock goes through
//! [`Stage2Table::lock`], whose guard times the hold on the wall clock
//! (and, when [`Stage2Table::set_cpu_lock_stats`] is on, in the holder's
//! CPU time) and records it when dropped, still holding the lock.

use std::sync::atomic::{AtomicBool as StatBool, AtomicU64 as StatU64, Ordering::Relaxed};
use std::time::Instant;

use super::Stage2Table;
use crate::gather::GatherStats;
use crate::sync::{lock, MutexGuard};

/// A snapshot of the table's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Table-lock acquisitions.
    pub lock_acquisitions: u64,
    /// Longest table-lock hold, in nanoseconds.
    pub lock_hold_max_ns: u64,
    /// Histogram of lock holds: bucket `i` counts holds in `[2^i, 2^(i+1))` ns.
    pub lock_hold_hist: Vec<u64>,
    /// Longest on-CPU time of the holder during one lock hold, in
    /// nanoseconds (0 unless [`Stage2Table::set_cpu_lock_stats`] is on).
    /// A wall-clock hold much longer than this one means the holder was
    /// descheduled while holding the lock.
    pub lock_hold_cpu_max_ns: u64,
    /// Histogram of on-CPU hold times, buckets as `lock_hold_hist`.
    pub lock_hold_cpu_hist: Vec<u64>,
    /// Table pages in use now: linked, or awaiting a grace period (leaf
    /// pages need none: unlinked, they stay in the leaf arena, see
    /// `reclaim::arena`).
    pub table_pages: u64,
    /// Peak of `table_pages` (the sum of the peaks of leaf and other
    /// pages: an upper bound).
    pub table_pages_peak: u64,
    /// Table pages (of level 2 and above) freed after a grace period.
    pub tables_freed: u64,
    /// Table pages waiting for a grace period.
    pub tables_retired_pending: u64,
    /// Grace periods waited for.
    pub grace_periods: u64,
    /// Deferred frees that fell back to a synchronous grace period.
    pub sync_fallbacks: u64,
    /// Invalidations (flush step 1).
    pub invalidations: u64,
    /// Flushes that did work.
    pub flushes: u64,
    /// Flushes forced by the batch cap.
    pub forced_flushes: u64,
    /// Batch allocations that failed (on-stack fallback used).
    pub fallback_batches: u64,
    /// Batch pages allocated.
    pub batch_allocs: u64,
    /// Waits for another gather's pending flush.
    pub pending_waits: u64,
    /// Threads blocked right now waiting for another gather's pending
    /// flush (a gauge, not a count).
    pub pending_waiters: u64,
    /// Release system calls (a batched `process_madvise` counts once).
    pub release_calls: u64,
    /// `process_madvise` calls that released a whole batch of runs.
    pub release_batched_calls: u64,
    /// Runs released by those calls.
    pub release_batched_runs: u64,
    /// Batches redone with one `madvise` per run (refused, failed, partial
    /// or injected).
    pub release_batch_fallbacks: u64,
    /// Bytes released.
    pub released_bytes: u64,
    /// Failed release calls.
    pub release_errors: u64,
    /// Bytes a release was asked for outside registered backing (refused).
    pub release_outside_bytes: u64,
    /// `madvise` / punch-hole attempts that failed (each is retried up to
    /// `backing::RELEASE_ATTEMPTS` times).
    pub release_failed_attempts: u64,
    /// Bytes whose release failed every attempt and that are still
    /// allocated (no entry maps them; released again at teardown).
    pub unreleased_bytes: u64,
    /// Huge leaves split.
    pub splits: u64,
    /// Discarded leaves made present by the fault path.
    pub faults_restored: u64,
    /// Fault commits that lost a compare-and-swap to a writer, or undid
    /// theirs after the second check, and went again.
    pub fault_cas_retries: u64,
    /// Walks that read a poisoned (freed) table page. Must stay 0.
    pub use_after_free: u64,
    /// hugetlb pages partly released (still allocated).
    pub partial_huge_pages: u64,
    /// The invalidation sequence.
    pub invalidate_seq: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) lock_acq: StatU64,
    pub(crate) lock_max_ns: StatU64,
    pub(crate) lock_hist: [StatU64; 32],
    pub(crate) lock_cpu_max_ns: StatU64,
    pub(crate) lock_cpu_hist: [StatU64; 32],
    /// Whether lock holds are also timed in thread CPU time.
    pub(crate) cpu_lock_stats: StatBool,
    pub(crate) invalidations: StatU64,
    pub(crate) flushes: StatU64,
    pub(crate) forced_flushes: StatU64,
    pub(crate) fallback_batches: StatU64,
    pub(crate) batch_allocs: StatU64,
    pub(crate) pending_waits: StatU64,
    /// Gauge: threads blocked in `wait_pending` now.
    pub(crate) pending_waiters: StatU64,
    pub(crate) splits: StatU64,
    pub(crate) faults_restored: StatU64,
    pub(crate) fault_cas_retries: StatU64,
    pub(crate) use_after_free: StatU64,
}

/// The table lock, timed.
pub(crate) struct Locked<'t> {
    t: &'t Stage2Table,
    _g: MutexGuard<'t, ()>,
    since: Instant,
    /// Thread CPU time at acquisition, when CPU lock stats are on.
    cpu_since: Option<u64>,
}

/// This thread's CPU time in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Records one hold of `ns` into a maximum and a log2 histogram.
fn record_hold(max: &StatU64, hist: &[StatU64; 32], ns: u64) {
    max.fetch_max(ns, Relaxed);
    let bucket = (63 - ns.max(1).leading_zeros()) as usize;
    hist[bucket.min(hist.len() - 1)].fetch_add(1, Relaxed);
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // The CPU-time window is read inside the wall-clock one (started
        // after it, ended before it), so a hold's CPU time never exceeds
        // its wall time by the clock reads' own cost.
        let cpu = self.cpu_since.map(|c0| thread_cpu_ns().saturating_sub(c0));
        let ns = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let s = &self.t.stats;
        record_hold(&s.lock_max_ns, &s.lock_hist, ns);
        if let Some(cpu) = cpu {
            record_hold(&s.lock_cpu_max_ns, &s.lock_cpu_hist, cpu);
        }
    }
}

impl Stage2Table {
    /// Take the table lock. Held for at most `yield_entries` entries
    /// visited; the hold is timed (see the module doc).
    pub(crate) fn lock(&self) -> Locked<'_> {
        let g = lock(&self.lock);
        self.stats.lock_acq.fetch_add(1, Relaxed);
        let since = Instant::now();
        let cpu_since = self.stats.cpu_lock_stats.load(Relaxed).then(thread_cpu_ns);
        Locked {
            t: self,
            _g: g,
            since,
            cpu_since,
        }
    }

    /// Also time every lock hold in the holder's CPU time (two
    /// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)` calls per hold; off by
    /// default). Benchmarks turn it on to tell a long hold from a holder
    /// that was descheduled while holding the lock.
    pub fn set_cpu_lock_stats(&self, on: bool) {
        self.stats.cpu_lock_stats.store(on, Relaxed);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TableStats {
        let s = &self.stats;
        let b = &self.backing.counters;
        let l = |a: &StatU64| a.load(Relaxed);
        let hist: Vec<u64> = s.lock_hist.iter().map(l).collect();
        TableStats {
            lock_acquisitions: l(&s.lock_acq),
            lock_hold_max_ns: l(&s.lock_max_ns),
            lock_hold_hist: hist,
            lock_hold_cpu_max_ns: l(&s.lock_cpu_max_ns),
            lock_hold_cpu_hist: s.lock_cpu_hist.iter().map(l).collect(),
            table_pages: self.rcu.pool.in_use() as u64 + self.arena.in_use(),
            table_pages_peak: self.rcu.pool.peak() as u64 + self.arena.peak(),
            tables_freed: self.rcu.pool.freed_total(),
            tables_retired_pending: self.rcu.retired_len() as u64,
            grace_periods: self.rcu.grace_periods(),
            sync_fallbacks: self.rcu.sync_fallbacks(),
            invalidations: l(&s.invalidations),
            flushes: l(&s.flushes),
            forced_flushes: l(&s.forced_flushes),
            fallback_batches: l(&s.fallback_batches),
            batch_allocs: l(&s.batch_allocs),
            pending_waits: l(&s.pending_waits),
            pending_waiters: l(&s.pending_waiters),
            release_calls: b.calls.load(Relaxed),
            release_batched_calls: b.batched_calls.load(Relaxed),
            release_batched_runs: b.batched_runs.load(Relaxed),
            release_batch_fallbacks: b.batch_fallbacks.load(Relaxed),
            released_bytes: b.bytes.load(Relaxed),
            release_errors: b.errors.load(Relaxed),
            release_outside_bytes: b.outside.load(Relaxed),
            release_failed_attempts: b.failed_attempts.load(Relaxed),
            unreleased_bytes: self.backing.unreleased_bytes(),
            splits: l(&s.splits),
            faults_restored: l(&s.faults_restored),
            fault_cas_retries: l(&s.fault_cas_retries),
            use_after_free: l(&s.use_after_free),
            partial_huge_pages: self.backing.partial_huge_pages() as u64,
            invalidate_seq: self.inval_seq.load(Relaxed),
        }
    }

    /// Reset the lock-hold maximum and histogram (between benchmark phases).
    pub fn reset_lock_stats(&self) {
        self.stats.lock_max_ns.store(0, Relaxed);
        self.stats.lock_cpu_max_ns.store(0, Relaxed);
        for h in self.stats.lock_hist.iter().chain(&self.stats.lock_cpu_hist) {
            h.store(0, Relaxed);
        }
    }

    pub(crate) fn account_flush(&self, did_work: bool) {
        if did_work {
            self.stats.flushes.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn fold_gather_stats(&self, g: &GatherStats) {
        let s = &self.stats;
        s.forced_flushes.fetch_add(g.forced_flushes, Relaxed);
        s.fallback_batches.fetch_add(g.fallback_batches, Relaxed);
        s.batch_allocs.fetch_add(g.batch_allocs, Relaxed);
    }
}
