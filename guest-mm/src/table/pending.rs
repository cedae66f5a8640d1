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
//! **Concurrency.** The set is guarded by the pending-set lock, taken
//! under the table lock or alone, never the other way round (lock order:
//! table → pending set). Waiters sleep on a condition variable notified
//! whenever a registration is removed. The `mutation` rule `pending_wait`
//! makes [`Stage2Table::pending_overlaps`] and
//! [`Stage2Table::wait_pending`] ignore the registry.

use std::sync::atomic::Ordering::Relaxed;

use super::Stage2Table;
use crate::addr::Gpa;
use crate::mutation::{broken, Rule};
use crate::sync::{lock, wait};

/// One gather's registered range.
struct Pending {
    gather: u64,
    ticket: u64,
    start: Gpa,
    end: Gpa,
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
        if let Some(x) = p.list.iter_mut().find(|x| x.gather == id) {
            x.start = x.start.min(start);
            x.end = x.end.max(end);
            return;
        }
        let ticket = p.next_ticket;
        p.next_ticket += 1;
        p.list.push(Pending {
            gather: id,
            ticket,
            start,
            end,
        });
    }

    /// Gather `id` has released its backing.
    pub(crate) fn pending_done(&self, id: u64) {
        let mut p = lock(&self.pending);
        let before = p.list.len();
        p.list.retain(|x| x.gather != id);
        if p.list.len() != before {
            self.pending_cv.notify_all();
        }
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
