//! The fault path: making a *discarded* page present again, for the
//! monitor's userfaultfd handler (the `kvm_mmu_page_fault` analogue),
//! committed without the table lock.
//!
//! **Invariants.**
//! - *Lock-free commit.* A fault walks to the entry inside an RCU read
//!   section (the shared mode: table pages it reads stay allocated) and
//!   swaps the discarded marker for the present leaf with one
//!   compare-and-swap, as KVM's TDP MMU installs under `mmu_lock` held for
//!   read. It never waits for a writer's lock hold. Writers change a
//!   discarded marker only with compare-and-swap too
//!   ([`super::writer_walk::replace_entry`]), so of a fault and a writer
//!   racing for one entry exactly one wins and the other sees the winner's
//!   entry: an unmap that loses zaps the restored leaf (invalidates and
//!   releases it); a split that loses splits the present leaf. A failed
//!   swap is retried from the walk.
//! - A page the table still maps commits at once
//!   ([`FaultOutcome::AlreadyPresent`]), without waiting for anything:
//!   nobody is releasing it (an unmap clears the entry before it
//!   releases), and the faulting thread may be a reader pinned in the
//!   fast walk, which must never wait for a grace period.
//! - *No resurrection under a releaser.* A discarded page covered by a
//!   pending flush is never restored: the check reads the lockless pending
//!   ranges ([`Stage2Table::pending_overlaps_lockless`]), which every
//!   gather publishes before it clears an entry. The `_if_unchanged`
//!   variants also fail with `Retry` when an invalidation ran since the
//!   caller's snapshot (`mmu_invalidate_seq`). Both are checked before the
//!   swap and *again after it*: a writer that discarded the page anew
//!   between check and swap (the same marker value, ABA) registered its
//!   range before its store, so the second check sees it, and the fault
//!   swaps its leaf back (or, if a writer already took the leaf, leaves it
//!   to that writer) and retries. That undo, and only it, takes the table
//!   lock: present entries change only under it, so a writer never stores
//!   over an entry it read as present after the fault swapped it back.
//! - Ballooned pages and holes are refused at once, before any pending
//!   check (they are never restored, so a fault on one never waits behind
//!   a release); only a marker's saved permissions come back, on the
//!   whole leaf.
//!
//! **Concurrency.** No table lock and no allocation on the commit (the
//! rare undo above aside): the
//! caller is pinned (a [`crate::Walker`]'s reader, or one registered for
//! the call by the `Stage2Table` entry points, which are not hot paths and
//! must not be called while the thread is pinned). Waits for pending
//! flushes happen unpinned. The `fault_cas` mutation rule stores the leaf
//! blindly and skips the second check.

use std::sync::atomic::Ordering::Relaxed;

use super::writer_walk::is_restorable;
use super::{FaultError, FaultSnapshot, Stage2Table};
use crate::addr::{Gpa, Hva, PageSize};
use crate::entry::{
    index, level_size, Pte, ADDRESS_LIMIT, LEVELS, PAGE_SIZE, POISON, SW_BALLOONED,
};
use crate::mutation::{broken, Rule};
use crate::reclaim::{PagePtr, Reader};
use crate::sync::Ordering;

/// What [`Stage2Table::fault_in`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The page was present already.
    AlreadyPresent {
        /// Host address of the faulting page.
        hva: Hva,
        /// Leaf size.
        size: PageSize,
    },
    /// A discarded leaf was made present again; its backing must be
    /// populated by the caller (or is demand-zero).
    Restored {
        /// First guest address of the restored leaf.
        leaf_gpa: Gpa,
        /// Host address of the leaf.
        leaf_hva: Hva,
        /// Leaf size.
        size: PageSize,
    },
}

/// One pinned attempt's result.
pub(crate) enum Attempt {
    /// Committed (or nothing to do).
    Done(FaultOutcome),
    /// A pending flush covers the page: wait for it unpinned, or retry.
    Pending,
    /// Refused.
    Failed(FaultError),
}

impl Stage2Table {
    /// Make the discarded page at `gpa` present again (its whole leaf).
    /// Waits for pending flushes over it first, so a page being released
    /// is never resurrected under the releaser. Registers a reader for the
    /// call (not a hot path; must not be called while pinned): hot callers
    /// use [`crate::Walker::fault_in`].
    pub fn fault_in(&self, gpa: Gpa) -> Result<FaultOutcome, FaultError> {
        let mut r = self.rcu.register();
        self.fault_in_waiting(&mut r, gpa)
    }

    /// Like [`Stage2Table::fault_in`], but fails with `Retry` if an
    /// invalidation touched the range of `seq` since it was read with
    /// [`Stage2Table::fault_seq`] (the caller resolved the page with stale
    /// knowledge and must resolve it again) or a flush is pending over the
    /// page.
    pub fn fault_in_if_unchanged(
        &self,
        gpa: Gpa,
        seq: FaultSnapshot,
    ) -> Result<FaultOutcome, FaultError> {
        let mut r = self.rcu.register();
        let _g = r.pin(&self.rcu);
        match self.fault_attempt(gpa, Some(seq)) {
            Attempt::Done(o) => Ok(o),
            Attempt::Pending => Err(FaultError::Retry(gpa)),
            Attempt::Failed(e) => Err(e),
        }
    }

    /// Like [`Stage2Table::fault_in_if_unchanged`] for every leaf that
    /// overlaps `[gpa, gpa + len)` (the range a fault handler installed):
    /// discarded leaves become present, present ones are left alone.
    /// Returns the number of leaves restored. Hot callers use
    /// [`crate::Walker::fault_in_range_if_unchanged`].
    pub fn fault_in_range_if_unchanged(
        &self,
        gpa: Gpa,
        len: u64,
        seq: FaultSnapshot,
    ) -> Result<u64, FaultError> {
        let mut r = self.rcu.register();
        self.fault_in_range_with(&mut r, gpa, len, seq)
    }

    /// [`Stage2Table::fault_in`] with the caller's reader: pinned attempts,
    /// unpinned waits for pending flushes.
    pub(crate) fn fault_in_waiting(
        &self,
        r: &mut Reader,
        gpa: Gpa,
    ) -> Result<FaultOutcome, FaultError> {
        loop {
            let attempt = {
                let _g = r.pin(&self.rcu);
                self.fault_attempt(gpa, None)
            };
            match attempt {
                Attempt::Done(o) => return Ok(o),
                Attempt::Failed(e) => return Err(e),
                Attempt::Pending => {
                    let a = Gpa(gpa.0 & !(PAGE_SIZE - 1));
                    self.wait_pending(a, Gpa(a.0 + PAGE_SIZE), 0);
                }
            }
        }
    }

    /// [`Stage2Table::fault_in_range_if_unchanged`] with the caller's
    /// reader, in one read section.
    pub(crate) fn fault_in_range_with(
        &self,
        r: &mut Reader,
        gpa: Gpa,
        len: u64,
        seq: FaultSnapshot,
    ) -> Result<u64, FaultError> {
        let end = gpa.0.saturating_add(len.max(1)).min(ADDRESS_LIMIT);
        let mut a = gpa.0 & !(PAGE_SIZE - 1);
        let mut restored = 0;
        let _g = r.pin(&self.rcu);
        while a < end {
            match self.fault_attempt(Gpa(a), Some(seq)) {
                Attempt::Done(FaultOutcome::AlreadyPresent { size, .. }) => {
                    a = (a & !(size.bytes() - 1)) + size.bytes();
                }
                Attempt::Done(FaultOutcome::Restored { leaf_gpa, size, .. }) => {
                    restored += 1;
                    a = leaf_gpa.0 + size.bytes();
                }
                Attempt::Pending => return Err(FaultError::Retry(Gpa(a))),
                Attempt::Failed(e) => return Err(e),
            }
        }
        Ok(restored)
    }

    /// Whether a commit at `[page, page_end)` must not happen now: a
    /// pending flush covers it, or (with `seq`) an invalidation ran since.
    #[inline]
    fn fault_blocked(
        &self,
        page: Gpa,
        page_end: Gpa,
        seq: Option<FaultSnapshot>,
    ) -> Option<Attempt> {
        if self.pending_overlaps_lockless(page, page_end) {
            return Some(Attempt::Pending);
        }
        match seq {
            Some(s) if self.invalidated_since(s, page, page_end) => {
                Some(Attempt::Failed(FaultError::Retry(page)))
            }
            _ => None,
        }
    }

    /// Whether an invalidation touched `[page, page_end)` since `s`: one
    /// that touched the snapshot's range, which contains the page (the
    /// fault handler's leaf); for a page outside it, any invalidation.
    #[inline]
    fn invalidated_since(&self, s: FaultSnapshot, page: Gpa, page_end: Gpa) -> bool {
        if broken(Rule::FaultSeq) {
            return false;
        }
        if s.start <= page.0 && page_end.0 <= s.end {
            self.fault_seqs.value(s.start, s.end) != s.value
        } else {
            self.inval_seq.load(Ordering::Acquire) != s.global
        }
    }

    /// One lock-free attempt at `gpa`. The caller is pinned in this
    /// table's RCU domain.
    pub(crate) fn fault_attempt(&self, gpa: Gpa, seq: Option<FaultSnapshot>) -> Attempt {
        if gpa.0 >= ADDRESS_LIMIT {
            return Attempt::Failed(FaultError::OutOfRange(gpa));
        }
        let a = gpa.0 & !(PAGE_SIZE - 1);
        let (page, page_end) = (Gpa(a), Gpa(a + PAGE_SIZE));
        'walk: loop {
            if self.is_dying() {
                return Attempt::Failed(FaultError::Dying);
            }
            let mut table = self.root();
            let mut level = LEVELS;
            let (slot, e) = loop {
                let slot = &table.entries[index(a, level)];
                let e = Pte(slot.load(Ordering::Acquire));
                if e.0 == POISON {
                    self.stats.use_after_free.fetch_add(1, Relaxed);
                    return Attempt::Failed(FaultError::UseAfterFree(gpa));
                }
                if !e.is_table(level) {
                    break (slot, e);
                }
                // SAFETY: read from a linked entry inside the caller's
                // read section: the page stays allocated until it ends.
                table = unsafe { PagePtr::from_addr(e.addr()) };
                level -= 1;
            };
            let size = level_size(level);
            let leaf_gpa = a & !(size - 1);
            let ps = PageSize::from_level(level).unwrap_or(PageSize::Size4K);
            if e.is_present() {
                return Attempt::Done(FaultOutcome::AlreadyPresent {
                    hva: Hva(e.addr() + (a - leaf_gpa)),
                    size: ps,
                });
            }
            // Refused before the pending check: such an entry can never be
            // restored, so there is nothing to wait for, and a fault on it
            // (only a bug's: a translation kept across its release) must
            // not retry behind a release whose grace period may be waiting
            // for the faulting reader.
            if e.markers() & SW_BALLOONED != 0 {
                return Attempt::Failed(FaultError::Ballooned(gpa));
            }
            if !is_restorable(e) {
                return Attempt::Failed(FaultError::NotMapped(gpa));
            }
            if let Some(stop) = self.fault_blocked(page, page_end, seq) {
                return stop;
            }
            let leaf = Pte::leaf(e.addr(), e.saved_perms(), level);
            if broken(Rule::FaultCas) {
                slot.store(leaf.0, Ordering::Release);
            } else {
                if slot
                    .compare_exchange(e.0, leaf.0, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    // A writer changed the entry (or split the leaf): look again.
                    self.stats.fault_cas_retries.fetch_add(1, Relaxed);
                    continue 'walk;
                }
                // Checked again after the swap: a writer that discarded
                // the page anew since the first check registered its range
                // before storing the marker we swapped, so it is seen now.
                if let Some(stop) = self.fault_blocked(page, page_end, seq) {
                    // Undo, unless a writer already took the leaf over (it
                    // then invalidates and releases it itself). Under the
                    // table lock, so that present entries still change
                    // only there: no writer is between reading our leaf
                    // and storing over it. Rare (an overlapping release
                    // began inside this attempt); taking the lock while
                    // pinned is safe, as no writer waits for a grace
                    // period with the table lock held.
                    let l = self.lock();
                    let _ = slot.compare_exchange(leaf.0, e.0, Ordering::AcqRel, Ordering::Relaxed);
                    drop(l);
                    self.stats.fault_cas_retries.fetch_add(1, Relaxed);
                    return stop;
                }
            }
            self.backing.note_mapped(e.addr(), size);
            self.stats.faults_restored.fetch_add(1, Relaxed);
            return Attempt::Done(FaultOutcome::Restored {
                leaf_gpa: Gpa(leaf_gpa),
                leaf_hva: Hva(e.addr()),
                size: ps,
            });
        }
    }
}
