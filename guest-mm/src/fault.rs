//! Fault injection points, so that every fallback path can be forced in tests.
//!
//! A [`FailPoint`] is consulted before a fallible step (an allocation, a
//! batched release, spawning a release helper). It is cheap (a few relaxed
//! atomic operations) and off by default.

use std::sync::atomic::{AtomicU64, Ordering};

/// One injectable failure site.
#[derive(Debug, Default)]
pub struct FailPoint {
    fail_next: AtomicU64,
    every: AtomicU64,
    calls: AtomicU64,
    injected: AtomicU64,
}

impl FailPoint {
    /// Make the next `n` checks fail.
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::Relaxed);
    }
    /// Make every `k`-th check fail (0 turns it off).
    pub fn fail_every(&self, k: u64) {
        self.every.store(k, Ordering::Relaxed);
    }
    /// Fail every check until [`FailPoint::clear`].
    pub fn fail_always(&self) {
        self.fail_every(1);
    }
    /// Stop injecting.
    pub fn clear(&self) {
        self.fail_next.store(0, Ordering::Relaxed);
        self.every.store(0, Ordering::Relaxed);
    }
    /// How many failures were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
    /// Whether this check should fail.
    pub(crate) fn should_fail(&self) -> bool {
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
}
