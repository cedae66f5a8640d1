//! The fault path: making a *discarded* page present again, for the
//! monitor's userfaultfd handler (the `kvm_mmu_page_fault` analogue).
//!
//! **Invariants.**
//! - A page the table still maps commits at once ([`FaultOutcome::AlreadyPresent`]),
//!   without waiting for anything: nobody is releasing it (an unmap clears
//!   the entry before it releases), and the faulting thread may be a
//!   reader pinned in the fast walk, which must never wait for a grace
//!   period.
//! - A discarded page covered by a pending flush is never restored under
//!   the releaser: [`Stage2Table::fault_in`] waits for that flush, and the
//!   `_if_unchanged` variants fail with `Retry` at once, as they do when
//!   an invalidation ran since the caller's sequence snapshot
//!   (`mmu_invalidate_seq`), so a fault resolved with stale knowledge is
//!   resolved again.
//! - Ballooned pages and holes are refused; only a marker's saved
//!   permissions come back, on the whole leaf.
//!
//! **Concurrency.** The decision and the store happen in one hold of the
//! table lock (entries change only under it, so the entry read stays true
//! for the hold); waits for pending flushes happen with the lock dropped.

use std::sync::atomic::Ordering::Relaxed;

use super::{FaultError, Stage2Table};
use crate::addr::{Gpa, Hva, PageSize};
use crate::entry::{level_size, Pte, ADDRESS_LIMIT, PAGE_SIZE, SW_BALLOONED, SW_DISCARDED};
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

impl Stage2Table {
    /// Make the discarded page at `gpa` present again (its whole leaf).
    /// Waits for pending flushes over it first, so a page being released
    /// is never resurrected under the releaser.
    pub fn fault_in(&self, gpa: Gpa) -> Result<FaultOutcome, FaultError> {
        self.fault_in_inner(gpa, None)
    }

    /// Like [`Stage2Table::fault_in`], but fails with `Retry` if an
    /// invalidation ran since `seq` was read with
    /// [`Stage2Table::invalidate_seq`] (the caller resolved the page with
    /// stale knowledge and must resolve it again).
    pub fn fault_in_if_unchanged(&self, gpa: Gpa, seq: u64) -> Result<FaultOutcome, FaultError> {
        self.fault_in_inner(gpa, Some(seq))
    }

    /// Like [`Stage2Table::fault_in_if_unchanged`] for every leaf that
    /// overlaps `[gpa, gpa + len)` (the range a fault handler installed):
    /// discarded leaves become present, present ones are left alone.
    /// Returns the number of leaves restored.
    pub fn fault_in_range_if_unchanged(
        &self,
        gpa: Gpa,
        len: u64,
        seq: u64,
    ) -> Result<u64, FaultError> {
        let end = gpa.0.saturating_add(len.max(1)).min(ADDRESS_LIMIT);
        let mut a = gpa.0 & !(PAGE_SIZE - 1);
        let mut restored = 0;
        while a < end {
            match self.fault_in_inner(Gpa(a), Some(seq))? {
                FaultOutcome::AlreadyPresent { size, .. } => {
                    a = (a & !(size.bytes() - 1)) + size.bytes();
                }
                FaultOutcome::Restored { leaf_gpa, size, .. } => {
                    restored += 1;
                    a = leaf_gpa.0 + size.bytes();
                }
            }
        }
        Ok(restored)
    }

    fn fault_in_inner(&self, gpa: Gpa, seq: Option<u64>) -> Result<FaultOutcome, FaultError> {
        if gpa.0 >= ADDRESS_LIMIT {
            return Err(FaultError::OutOfRange(gpa));
        }
        let a = gpa.0 & !(PAGE_SIZE - 1);
        loop {
            let l = self.lock();
            if self.is_dying() {
                return Err(FaultError::Dying);
            }
            // Entries change only under the table lock, so this one read
            // stays true for the rest of the hold.
            let (slot, e, level) = self.find_locked(Gpa(a));
            let size = level_size(level);
            let leaf_gpa = a & !(size - 1);
            let ps = PageSize::from_level(level).unwrap_or(PageSize::Size4K);
            // A page the table still maps is not being released by anyone
            // (an unmap clears the entry before it releases), so it commits
            // at once: a reader pinned in the fast walk may be the one
            // faulting, and it must never wait for a grace period.
            if e.is_present() {
                return Ok(FaultOutcome::AlreadyPresent {
                    hva: Hva(e.addr() + (a - leaf_gpa)),
                    size: ps,
                });
            }
            let (page, page_end) = (Gpa(a), Gpa(a + PAGE_SIZE));
            if self.pending_overlaps(page, page_end) {
                drop(l);
                if seq.is_some() {
                    return Err(FaultError::Retry(gpa));
                }
                self.wait_pending(page, page_end, 0);
                continue;
            }
            if let Some(s) = seq {
                if self.inval_seq.load(Ordering::Acquire) != s {
                    return Err(FaultError::Retry(gpa));
                }
            }
            if e.markers() & SW_BALLOONED != 0 {
                return Err(FaultError::Ballooned(gpa));
            }
            if e.markers() & SW_DISCARDED == 0 {
                return Err(FaultError::NotMapped(gpa));
            }
            slot.store(
                Pte::leaf(e.addr(), e.saved_perms(), level).0,
                Ordering::Release,
            );
            drop(l);
            self.backing.note_mapped(e.addr(), size);
            self.stats.faults_restored.fetch_add(1, Relaxed);
            return Ok(FaultOutcome::Restored {
                leaf_gpa: Gpa(leaf_gpa),
                leaf_hva: Hva(e.addr()),
                size: ps,
            });
        }
    }
}
