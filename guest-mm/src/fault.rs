//! Fault injection points, so that every fallback path can be forced in tests.
//!
//! A [`FailPoint`] is consulted before a fallible step (an allocation, a
//! batched release, spawning a release helper, every system call of the
//! release and teardown path). Off by default, and then it costs one
//! relaxed load (the fault path consults none at all; see
//! `docs/DESIGN.md`, "Failure injection", for what each point's failure
//! leads to).
//!
//! A check that fails stands for the system call failing: the caller takes
//! its error path with [`INJECTED_ERRNO`] instead of making the call.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The errno an injected system-call failure reports (`EAGAIN`: the
/// transient kind a bounded retry is meant for; a point that stays armed
/// makes it permanent).
pub const INJECTED_ERRNO: i32 = libc::EAGAIN;

/// One injectable failure site.
#[derive(Debug, Default)]
pub struct FailPoint {
    /// Set by any `fail_*`, cleared by `clear`: the only load made while off.
    armed: AtomicBool,
    fail_next: AtomicU64,
    every: AtomicU64,
    calls: AtomicU64,
    injected: AtomicU64,
}

impl FailPoint {
    /// A point that never fails (for statics).
    pub const fn new() -> FailPoint {
        FailPoint {
            armed: AtomicBool::new(false),
            fail_next: AtomicU64::new(0),
            every: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }
    /// Make the next `n` checks fail.
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::Relaxed);
        self.armed.store(true, Ordering::Relaxed);
    }
    /// Make every `k`-th check fail (0 turns it off), counting from now.
    pub fn fail_every(&self, k: u64) {
        self.calls.store(0, Ordering::Relaxed);
        self.every.store(k, Ordering::Relaxed);
        self.armed.store(true, Ordering::Relaxed);
    }
    /// Fail every check until [`FailPoint::clear`].
    pub fn fail_always(&self) {
        self.fail_every(1);
    }
    /// Stop injecting.
    pub fn clear(&self) {
        self.armed.store(false, Ordering::Relaxed);
        self.fail_next.store(0, Ordering::Relaxed);
        self.every.store(0, Ordering::Relaxed);
    }
    /// How many failures were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
    /// Whether this check should fail: one relaxed load while the point
    /// is off. Public so that the monitor's own points (`vmm`) share it.
    #[inline]
    pub fn should_fail(&self) -> bool {
        if !self.armed.load(Ordering::Relaxed) {
            return false;
        }
        self.should_fail_armed()
    }

    #[cold]
    fn should_fail_armed(&self) -> bool {
        let calls = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let pending = self.fail_next.load(Ordering::Relaxed);
        let fail = if pending > 0 {
            self.fail_next
                .compare_exchange(pending, pending - 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        } else {
            let every = self.every.load(Ordering::Relaxed);
            every != 0 && calls.is_multiple_of(every)
        };
        if fail {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        fail
    }
}

/// All injection sites of one table.
#[derive(Debug, Default)]
pub struct FaultInjection {
    /// Allocation of a gather batch page (forces the 8-entry on-stack fallback).
    pub batch_alloc: FailPoint,
    /// Allocation of a table page (map and split fail with `OutOfMemory`).
    pub table_alloc: FailPoint,
    /// Growth of the deferred-free list (forces a synchronous grace period).
    pub defer_alloc: FailPoint,
    /// A batched `process_madvise` release (forces one `madvise` per run).
    pub batch_release: FailPoint,
    /// Spawning a helper thread of a parallel release (its share is then
    /// released inline).
    pub release_thread: FailPoint,
    /// A helper of a background release gets no CPU until every chunk is
    /// claimed (a starved `SCHED_IDLE` helper): the flushing thread must
    /// claim them all once a window shows its helpers starved.
    pub release_helper_stall: FailPoint,
    /// A helper of a background release pauses before each claim
    /// ([`crate::backing::SLOW_HELPER_PAUSE`]: a helper that gets only a
    /// share of a core): the flushing thread must not join helpers that
    /// keep the slowest pace it accepts.
    pub release_helper_slow: FailPoint,
    /// A helper of a parallel release panics right after claiming its
    /// first chunk, before releasing it: the flushing thread must not wait
    /// for it (a background caller's window) and must release the chunk
    /// it held.
    pub release_helper_panic: FailPoint,
    /// One `madvise(MADV_DONTNEED)` of a release (anonymous runs, anonymous
    /// hugetlb pages): retried, then recorded as unreleased.
    pub madvise: FailPoint,
    /// One `fallocate(PUNCH_HOLE)` of a release (memfd, hugetlbfs):
    /// retried, then recorded as unreleased.
    pub punch_hole: FailPoint,
}

/// The `munmap` of a table-page pool chunk when a table is dropped. Process
/// wide (a pool outlives nothing that could hold a table's points); a
/// chunk that stays mapped is kept on the leaked list
/// ([`crate::reclaim::leaked_table_bytes`]) and unmapped again by
/// [`crate::reclaim::retry_leaked_table_chunks`].
pub static POOL_MUNMAP: FailPoint = FailPoint::new();
