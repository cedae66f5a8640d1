//! The pending-flush registry: the `tlb_flush_pending` analogue.
//!
//! An unmap may drop the table lock (its budget ran out, or its gather
//! filled) with entries cleared but not yet invalidated and their backing
//! not yet released. It does not flush first: its gather keeps them, and
//! its range stays registered here as *pending* until the gather's flush
//! has released the backing ([`Stage2Table::pending_done`]).
//!
//! **Invariants.**
//! - A gather's range is (re)registered under the table lock at every lock
//!   acquisition of an unmap, before any entry is cleared in that hold, so
//!   a cleared-but-not-released entry is always covered by a registration.
//! - A registration carries a ticket in registration order; waiters wait
//!   only for registrations *older* than their call (a snapshot of the
//!   next ticket), so two unmappers never wait for each other.
//! - A gather removes its own registration before it waits in its flush,
//!   and waits only for other gathers (`me`): no self-deadlock.
//!
//! - Every registration is also published, for the lockless fault commit,
//!   in a fixed array of atomic ranges ([`PendingRanges`]) *before* the
//!   gather clears any entry under it: a fault that read an entry the
//!   gather stored (an Acquire load of a Release store) sees the range in
//!   [`Stage2Table::pending_overlaps_lockless`]. A range only widens while
//!   registered; it is emptied when the gather's flush is done. When the
//!   array is full the registration counts in `overflow`, which makes
//!   every lockless check answer "pending" (conservative: the fault
//!   retries).
//!
//! **Concurrency.** The set is guarded by the pending-set lock, taken
//! under the table lock or alone, never the other way round (lock order:
//! table → pending set). Waiters sleep on a condition variable notified
//! whenever a registration is removed. The atomic ranges are written
//! only under the pending-set lock and read by faults without any lock.
//! The `mutation` rule `pending_wait` makes every check and wait here
//! ignore the registry.

use std::sync::atomic::Ordering::Relaxed;

use super::Stage2Table;
use crate::addr::Gpa;
use crate::mutation::{broken, Rule};
use crate::sync::{lock, wait, AtomicU64, Ordering};

/// Slots of the lockless summary (a table rarely has more than a few
/// gathers in flight; more spill into `overflow`).
#[cfg(not(loom))]
const SLOTS: usize = 32;
#[cfg(loom)]
const SLOTS: usize = 2;

/// One published range; `end == 0` means free.
struct PendingRange {
    start: AtomicU64,
    end: AtomicU64,
}

/// The pending ranges as the lockless fault commit reads them.
pub(super) struct PendingRanges {
    slots: [PendingRange; SLOTS],
    /// Registrations that found no free slot.
    overflow: AtomicU64,
}

impl Default for PendingRanges {
    fn default() -> Self {
        PendingRanges {
            slots: std::array::from_fn(|_| PendingRange {
                start: AtomicU64::new(0),
                end: AtomicU64::new(0),
            }),
            overflow: AtomicU64::new(0),
        }
    }
}

/// One gather's registered range.
struct Pending {
    gather: u64,
    ticket: u64,
    start: Gpa,
    end: Gpa,
    /// Its slot in [`PendingRanges`], or `None` if it overflowed.
    slot: Option<usize>,
}

impl Pending {
    fn overlaps(&self, start: Gpa, end: Gpa) -> bool {
        self.start < end && start < self.end
    }
}

/// The registered ranges, oldest first.
#[derive(Default)]
pub(super) struct PendingSet {
    list: Vec<Pending>,
    next_ticket: u64,
}

impl Stage2Table {
    /// Register (or widen) gather `id`'s pending range. Table lock held.
    pub(super) fn pending_add(&self, id: u64, start: Gpa, end: Gpa) {
        let mut p = lock(&self.pending);
        let ranges = &self.pending_ranges;
        if let Some(x) = p.list.iter_mut().find(|x| x.gather == id) {
            x.start = x.start.min(start);
            x.end = x.end.max(end);
            if let Some(i) = x.slot {
                // Widen only: a reader sees this range or a wider one.
                ranges.slots[i].start.fetch_min(start.0, Ordering::Release);
                ranges.slots[i].end.fetch_max(end.0, Ordering::Release);
            }
            return;
        }
        // Slots are claimed and freed only under the pending-set lock.
        let slot = (0..SLOTS).find(|&i| ranges.slots[i].end.load(Ordering::Relaxed) == 0);
        match slot {
            Some(i) => {
                ranges.slots[i].start.store(start.0, Ordering::Release);
                ranges.slots[i].end.store(end.0.max(1), Ordering::Release);
            }
            None => {
                ranges.overflow.fetch_add(1, Ordering::Release);
            }
        }
        let ticket = p.next_ticket;
        p.next_ticket += 1;
        p.list.push(Pending {
            gather: id,
            ticket,
            start,
            end,
            slot,
        });
    }

    /// Gather `id` has released its backing.
    pub(crate) fn pending_done(&self, id: u64) {
        let mut p = lock(&self.pending);
        let Some(at) = p.list.iter().position(|x| x.gather == id) else {
            return;
        };
        let x = p.list.remove(at);
        let ranges = &self.pending_ranges;
        match x.slot {
            Some(i) => {
                ranges.slots[i].end.store(0, Ordering::Release);
                ranges.slots[i].start.store(0, Ordering::Release);
            }
            None => {
                ranges.overflow.fetch_sub(1, Ordering::Release);
            }
        }
        self.pending_cv.notify_all();
    }

    /// Whether a pending range may overlap `[start, end)`, without any
    /// lock (the fault commit's check). Sees every registration that
    /// happened before an entry store the caller has read with Acquire;
    /// may answer `true` for one that just ended (the caller retries).
    #[inline]
    pub(super) fn pending_overlaps_lockless(&self, start: Gpa, end: Gpa) -> bool {
        if broken(Rule::PendingWait) {
            return false;
        }
        let ranges = &self.pending_ranges;
        if ranges.overflow.load(Ordering::Acquire) != 0 {
            return true;
        }
        ranges.slots.iter().any(|r| {
            let e = r.end.load(Ordering::Acquire);
            e != 0 && start.0 < e && r.start.load(Ordering::Acquire) < end.0
        })
    }

    /// Whether any pending range overlaps `[start, end)`.
    pub(super) fn pending_overlaps(&self, start: Gpa, end: Gpa) -> bool {
        if broken(Rule::PendingWait) {
            return false;
        }
        lock(&self.pending)
            .list
            .iter()
            .any(|x| x.overlaps(start, end))
    }

    /// Wait until every pending range overlapping `[start, end)` that was
    /// registered before this call, by a gather other than `me`, is done.
    /// Returns whether it waited.
    pub(crate) fn wait_pending(&self, start: Gpa, end: Gpa, me: u64) -> bool {
        if broken(Rule::PendingWait) {
            return false;
        }
        let mut p = lock(&self.pending);
        let snap = p.next_ticket;
        let mut waited = false;
        while p
            .list
            .iter()
            .any(|x| x.gather != me && x.ticket < snap && x.overlaps(start, end))
        {
            if !waited {
                // Counted while the pending lock is held, so whoever sees
                // the gauge move knows we will block (or are blocked) until
                // the pending flush is done.
                self.stats.pending_waiters.fetch_add(1, Relaxed);
            }
            waited = true;
            p = wait(&self.pending_cv, p);
        }
        if waited {
            self.stats.pending_waiters.fetch_sub(1, Relaxed);
            self.stats.pending_waits.fetch_add(1, Relaxed);
        }
        waited
    }
}
