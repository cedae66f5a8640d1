//! The locked writer walks: how writers find, create, split and unlink
//! entries while they hold the table lock.
//!
//! - [`Stage2Table::install`]: map's walk down to a new leaf, creating
//!   table pages on the way, and the empty slots after it in its page;
//! - [`Stage2Table::visit_range`]: the loop shared by unmap, protect,
//!   teardown and deflate, which visits every leaf and marker of a range
//!   in bounded lock holds, splitting huge leaves that are only partly
//!   covered and unlinking table pages that become empty;
//!
//! **Invariants.**
//! - Every entry is changed with one atomic store, so a lockless reader
//!   sees the old or the new entry, never a mix. A new table page is
//!   filled before its pointer is stored with Release; a split builds the
//!   complete equivalent sub-table off-line and swaps it in with one
//!   Release store (readers see the old leaf or the table, never a hole),
//!   and records the old leaf's range for invalidation.
//! - A table page that becomes empty is unhooked (its entry cleared) and
//!   recorded once in the gather, which retires it after its flush's grace
//!   period; it is never freed here.
//! - A writer visits at most `yield_entries` entries per lock hold, then
//!   drops the lock and resumes where it stopped; a full gather is flushed
//!   with the lock dropped (forward progress, bounded holds).
//! - What a [`Visitor`] keeps back over a leaf table page (the unmap's
//!   invalidation range and release run) reaches the gather before that
//!   page's visit returns, early stops included, so a flush always covers
//!   every entry cleared before it (rule `leaf_notes`).
//!
//! - A *discarded* marker is the one entry that changes without the table
//!   lock: the fault commit ([`super::fault_in`]) swaps it for a present
//!   leaf with compare-and-swap. So writers change such an entry only with
//!   compare-and-swap too ([`replace_entry`]): when it fails a fault won,
//!   and the writer reads the entry again and acts on what is there now
//!   (a present leaf to invalidate and release). A split of a discarded
//!   huge marker is swapped in the same way; the sub-table of a lost race
//!   was never linked and is freed at once. Every other entry changes only
//!   under the table lock.
//!
//! **Concurrency.** Everything here runs with the table lock held, except
//! [`Stage2Table::visit_range`], which takes and drops it itself and
//! flushes gathers between holds. Entries are read with Relaxed loads:
//! writers store them under the same lock, and the one lockless change
//! (a fault's restore) is caught by the writers' compare-and-swap.

use std::ptr::NonNull;
use std::sync::atomic::Ordering::Relaxed;

use super::{MapError, Stage2Table, UnmapError};
use crate::addr::{Gpa, Hva, Perms};
use crate::entry::{index, level_size, Pte, ENTRIES, LEVELS, SW_BALLOONED, SW_DISCARDED};
use crate::gather::Gather;
use crate::mutation::{broken, Rule};
use crate::reclaim::{PagePtr, TablePage};
use crate::sync::{AtomicU64, Ordering};

/// Whether a fault may restore `e` without the table lock (a discarded
/// marker, not in the balloon).
pub(super) fn is_restorable(e: Pte) -> bool {
    e.markers() & (SW_DISCARDED | SW_BALLOONED) == SW_DISCARDED
}

/// A writer's change of `slot` from `old` (read under the table lock) to
/// `new`. A restorable marker may be swapped for a present leaf by a fault
/// at any moment, so it is changed with compare-and-swap; `false` means a
/// fault won and the caller must read the entry again. Any other entry
/// changes only under the table lock and is stored. The `fault_cas`
/// mutation rule stores blindly.
pub(super) fn replace_entry(slot: &AtomicU64, old: Pte, new: Pte) -> bool {
    if is_restorable(old) && !broken(Rule::FaultCas) {
        slot.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    } else {
        slot.store(new.0, Ordering::Release);
        true
    }
}

fn page_is_empty(p: &TablePage) -> bool {
    p.entries.iter().all(|e| e.load(Relaxed) == 0)
}

/// What [`Stage2Table::visit_range`] does to each leaf and marker of its
/// range.
///
/// A visitor changes the entry with [`replace_entry`] before any other
/// effect and returns whether the change took (`false`: a fault restored
/// the entry first; it is read again and the visitor called on what is
/// there now). What it records for the gather (an invalidation, a
/// release) must reach the gather before the visit of the table page it
/// is in ends: a flush may follow, and it must see every entry cleared
/// before it. Closures with the shape of [`Visitor::entry`] are visitors.
pub(super) trait Visitor {
    /// Visit `e` in `slot`, at `level`, mapping guest memory from `base`.
    fn entry(
        &mut self,
        slot: &AtomicU64,
        e: Pte,
        level: u32,
        base: Gpa,
        g: &mut Gather<'_>,
    ) -> bool;

    /// Visit `e`, a 4 KiB leaf or marker of a leaf table page, in address
    /// order within the page. May keep what it records back until
    /// [`Visitor::leaves_done`], and must record at most one gather entry
    /// per call (the gather's reserve counts on it).
    #[inline(always)]
    fn leaf(&mut self, slot: &AtomicU64, e: Pte, base: Gpa, g: &mut Gather<'_>) -> bool {
        self.entry(slot, e, 1, base, g)
    }

    /// The visit of a leaf table page is over (called before every return
    /// from it): record in `g` what [`Visitor::leaf`] kept back, at most
    /// one gather entry.
    #[inline(always)]
    fn leaves_done(&mut self, _g: &mut Gather<'_>) {}
}

impl<F> Visitor for F
where
    F: FnMut(&AtomicU64, Pte, u32, Gpa, &mut Gather<'_>) -> bool,
{
    #[inline(always)]
    fn entry(
        &mut self,
        slot: &AtomicU64,
        e: Pte,
        level: u32,
        base: Gpa,
        g: &mut Gather<'_>,
    ) -> bool {
        self(slot, e, level, base, g)
    }
}

/// `f` as a [`Visitor`]: gives a closure the signature a visitor needs
/// (closures passed straight to a generic parameter get no higher-ranked
/// lifetimes).
pub(super) fn each<F>(f: F) -> F
where
    F: FnMut(&AtomicU64, Pte, u32, Gpa, &mut Gather<'_>) -> bool,
{
    f
}

impl Stage2Table {
    /// Install a leaf for `addr` (mapped to `hva`), the largest up to
    /// `max_level` that the alignment of both and the `remaining` length
    /// allow, and after it leaves of that size in the following empty
    /// slots of the same table page, at most `budget` in all. Returns the
    /// bytes and the entries installed (at least one). Table lock held.
    pub(super) fn install(
        &self,
        addr: Gpa,
        hva: Hva,
        remaining: u64,
        max_level: u32,
        perms: Perms,
        budget: u32,
    ) -> Result<(u64, u32), MapError> {
        let (addr, hva) = (addr.0, hva.0);
        let mut page = self.root();
        let mut level = LEVELS;
        loop {
            let size = level_size(level);
            let first = index(addr, level);
            let slot = &page.entries[first];
            let e = Pte(slot.load(Ordering::Relaxed));
            let fits = level <= max_level
                && level < LEVELS
                && addr.is_multiple_of(size)
                && hva.is_multiple_of(size)
                && remaining >= size;
            if fits && e.is_none() {
                // The following slots of this page fit as this one does
                // (still aligned, inside `remaining`): fill them too while
                // they are empty, each with its own store, as separate
                // calls would, without walking down again for each.
                let mut n = 0usize;
                let mut left = remaining;
                while first + n < ENTRIES && (n as u64) < u64::from(budget.max(1)) && left >= size {
                    let s = &page.entries[first + n];
                    if n > 0 && !Pte(s.load(Ordering::Relaxed)).is_none() {
                        break;
                    }
                    s.store(
                        Pte::leaf(hva + n as u64 * size, perms, level).0,
                        Ordering::Release,
                    );
                    n += 1;
                    left -= size;
                }
                return Ok((n as u64 * size, n as u32));
            }
            if e.is_none() {
                let child = self
                    .new_table_page(level - 1, addr)
                    .ok_or(MapError::OutOfMemory(Gpa(addr)))?;
                // Publish the zeroed page; readers that see it see zeros.
                slot.store(Pte::table(child.addr()).0, Ordering::Release);
                // SAFETY: just linked; table lock held.
                page = unsafe { child.get() };
                level -= 1;
                continue;
            }
            if e.is_table(level) {
                // SAFETY: linked table page, table lock held.
                page = unsafe { PagePtr::from_addr(e.addr()) };
                level -= 1;
                continue;
            }
            return Err(MapError::AlreadyMapped(Gpa(addr)));
        }
    }

    /// The writer loop shared by unmap, protect and deflate: take the lock,
    /// visit at most `yield_entries` entries of `[start, end)` with `f`,
    /// drop the lock, flush the gather if it filled, resume where it
    /// stopped. With `pending`, the gather's range is (re)registered as
    /// pending at every lock acquisition. `f` gets the slot, its entry, its
    /// level and the first guest address the entry maps; it changes the
    /// entry with [`replace_entry`] before any other effect and returns
    /// whether the change took (`false`: a fault restored the entry first;
    /// it is read again and `f` called on what is there now).
    pub(super) fn visit_range<F: Visitor>(
        &self,
        g: &mut Gather<'_>,
        start: Gpa,
        end: Gpa,
        pending: bool,
        f: &mut F,
    ) -> Result<(), UnmapError> {
        let mut addr = start.0;
        while addr < end.0 {
            let l = self.lock();
            if pending {
                self.pending_add(g.id, start, end);
            }
            let mut budget = self.cfg.yield_entries;
            let r = self.visit(self.root(), LEVELS, addr, end.0, g, &mut budget, f);
            drop(l);
            match r {
                Ok(reached) => addr = reached,
                Err(at) => {
                    if let Err(e) = g.flush() {
                        g.record_error(e);
                    }
                    return Err(UnmapError::OutOfMemory { at: Gpa(at) });
                }
            }
            if g.is_full() {
                if let Err(e) = g.flush() {
                    g.record_error(e);
                }
            }
        }
        Ok(())
    }

    /// Visit leaves and markers covering `[addr, end)` below `page`,
    /// splitting huge leaves that are only partly covered, freeing table
    /// pages that become empty. Stops when the budget is spent or the
    /// gather is full; returns the address reached, or `Err(addr)` if a
    /// split could not allocate. Table lock held.
    #[allow(clippy::too_many_arguments)]
    fn visit<F: Visitor>(
        &self,
        page: &TablePage,
        level: u32,
        mut addr: u64,
        end: u64,
        g: &mut Gather<'_>,
        budget: &mut u32,
        f: &mut F,
    ) -> Result<u64, u64> {
        let size = level_size(level);
        if level == 1 {
            return Ok(self.visit_leaves(page, addr, end, g, budget, f));
        }
        while addr < end {
            if *budget == 0 || g.is_full() {
                return Ok(addr);
            }
            *budget -= 1;
            let slot = &page.entries[index(addr, level)];
            let e = Pte(slot.load(Ordering::Relaxed));
            let base = addr & !(size - 1);
            let ent_end = base + size;
            let stop = ent_end.min(end);
            if e.is_none() {
                addr = stop;
                continue;
            }
            if e.is_table(level) {
                // SAFETY: linked table page, table lock held.
                let child = unsafe { PagePtr::from_addr(e.addr()) };
                if level == 2 && addr == base && end >= ent_end && broken(Rule::LeafClear) {
                    // The bug this switch injects: each leaf is changed in
                    // a copy (recorded for invalidation and release as
                    // usual); what becomes a marker is stored, what is
                    // cleared is left in place, and a table whose leaves
                    // were all cleared is unhooked with them still there.
                    let mut cleared = true;
                    for (i, le) in child.entries.iter().enumerate() {
                        let v = Pte(le.load(Relaxed));
                        if !v.is_none() {
                            let copy = AtomicU64::new(v.0);
                            f.entry(&copy, v, 1, Gpa(base + i as u64 * level_size(1)), g);
                            let n = copy.load(Relaxed);
                            if n != 0 {
                                le.store(n, Ordering::Release);
                                cleared = false;
                            }
                        }
                    }
                    if cleared {
                        slot.store(0, Ordering::Release);
                        self.arena.put_back(PagePtr(NonNull::from(child)));
                    }
                    addr = stop;
                    continue;
                }
                let reached = self.visit(child, level - 1, addr, stop, g, budget, f)?;
                if page_is_empty(child) {
                    // Unhook; the page is freed after a grace period, or
                    // stays in the leaf arena.
                    slot.store(0, Ordering::Release);
                    if level == 2 {
                        self.arena.put_back(PagePtr(NonNull::from(child)));
                        if reached < stop {
                            return Ok(reached);
                        }
                        addr = stop;
                        continue;
                    }
                    if level > 2 {
                        // The child is of level 2 or above: walkers may
                        // hold it across read sections (their directory
                        // cache); tell them before the grace period that
                        // frees it can start.
                        self.rcu.note_unlinked();
                    }
                    g.note_table(PagePtr(NonNull::from(child)));
                }
                if reached < stop {
                    return Ok(reached);
                }
                addr = stop;
                continue;
            }
            if addr != base || end < ent_end {
                let child = self.split(e, level, base, g).ok_or(addr)?;
                if !replace_entry(slot, e, Pte::table(child.addr())) {
                    // A fault restored the marker first: split again from
                    // the present leaf. This sub-table was never linked.
                    // SAFETY: no walk from the root ever reached it.
                    unsafe { self.drop_unlinked_page(level - 1, child) };
                }
                continue;
            }
            if f.entry(slot, e, level, Gpa(base), g) {
                addr = stop;
            }
        }
        Ok(end)
    }

    /// [`Stage2Table::visit`] on a leaf table page (level 1): every entry
    /// is a 4 KiB leaf, a marker or empty, so there is nothing to split or
    /// descend into; the loop reads the entries and hands those that are
    /// not empty to [`Visitor::leaf`], then calls [`Visitor::leaves_done`]
    /// before it returns, so nothing a visitor keeps back outlives the
    /// page's visit. Returns the address reached. Table lock held.
    #[inline(always)]
    fn visit_leaves<F: Visitor>(
        &self,
        page: &TablePage,
        addr: u64,
        end: u64,
        g: &mut Gather<'_>,
        budget: &mut u32,
        f: &mut F,
    ) -> u64 {
        let size = level_size(1);
        let page_base = addr & !(level_size(2) - 1);
        let first = index(addr, 1);
        // `end` is past `addr` and at most the page's end.
        let last = index(end - 1, 1);
        let mut reached = end;
        // The budget in a register, written back once.
        let mut left = *budget;
        for (i, slot) in page.entries[first..=last].iter().enumerate() {
            let i = first + i;
            if left == 0 || g.is_full() {
                reached = page_base + i as u64 * size;
                break;
            }
            left -= 1;
            let mut e = Pte(slot.load(Ordering::Relaxed));
            while !e.is_none() && !f.leaf(slot, e, Gpa(page_base + i as u64 * size), g) {
                e = Pte(slot.load(Ordering::Relaxed));
            }
        }
        *budget = left;
        if reached < end && broken(Rule::LeafNotes) {
            // Broken on purpose: stopped early (the lock's yield, a full
            // gather), the visit leaves what the visitor kept back with it,
            // to be recorded when a later visit goes on: after the flush
            // that should have covered it.
            return reached;
        }
        f.leaves_done(g);
        reached
    }

    /// A zeroed table page of `level` for the guest range of `addr`: the
    /// leaf arena's page of that 2 MiB for level 1 (after the fault point
    /// `table_alloc`, so that injected failures reach every level), else
    /// a pool page; a level-2 page first opens the arena for its GiB
    /// (`reclaim::arena`: readable before reachable, and every GiB below
    /// it readable). `None`: out of memory. Table lock held.
    pub(super) fn new_table_page(&self, level: u32, addr: u64) -> Option<PagePtr> {
        if level == 1 {
            if self.faults.table_alloc.should_fail() {
                return None;
            }
            return Some(self.arena.take(addr));
        }
        if level == 2 && !self.arena.open(addr) {
            return None;
        }
        self.rcu.pool.alloc(&self.faults.table_alloc)
    }

    /// Give back `page` of `level`, taken by [`Stage2Table::new_table_page`]
    /// and never linked. Table lock held.
    ///
    /// # Safety
    /// No walk from the root can have reached `page`, and it must not be
    /// used again.
    unsafe fn drop_unlinked_page(&self, level: u32, page: PagePtr) {
        if level == 1 {
            // It may hold the markers of a split that lost its race.
            self.arena.put_back_unused(page);
        } else {
            // SAFETY: forwarded: never reachable, so no reader holds it.
            unsafe { self.rcu.pool.free(page) };
        }
    }

    /// Build the sub-table equivalent to huge leaf (or marker) `e` at
    /// `level` mapping `base`, off-line. The caller swaps it in with one
    /// store.
    fn split(&self, e: Pte, level: u32, base: u64, g: &mut Gather<'_>) -> Option<PagePtr> {
        let child = self.new_table_page(level - 1, base)?;
        // SAFETY: freshly allocated, not yet linked; table lock held.
        let cp = unsafe { child.get() };
        let sub = level_size(level - 1);
        for (i, slot) in cp.entries.iter().enumerate() {
            let fa = e.addr() + i as u64 * sub;
            let v = if e.is_present() {
                Pte::leaf(fa, e.perms(), level - 1)
            } else {
                Pte::marker(fa, e.saved_perms(), level - 1, e.markers())
            };
            slot.store(v.0, Ordering::Relaxed);
        }
        if e.is_present() {
            // Break-before-make, made atomic: readers see the old leaf or
            // the equivalent table; caches holding the old leaf drop it.
            g.note_invalidate(Gpa(base), level_size(level), false);
        }
        self.stats.splits.fetch_add(1, Relaxed);
        Some(child)
    }
}
