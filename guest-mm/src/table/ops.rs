//! The table's writing operations: map, unmap (and its modes), protect,
//! teardown and balloon deflate.
//!
//! **Invariants.**
//! - *Unhook → invalidate → free.* Unmap and protect only change entries
//!   (under the table lock, through [`Stage2Table::visit_range`]) and
//!   record in the caller's [`Gather`] what must be invalidated, released
//!   and freed; nothing is released under the lock. The gather's flush
//!   does the rest, in that order.
//! - *All or nothing on bad input.* A refused range, missing permissions,
//!   a wrong gather or (for [`Stage2Table::unmap`] and
//!   [`Stage2Table::protect`]) a page that is not mapped change nothing. A
//!   map that fails part-way rolls back what it installed without
//!   releasing backing.
//! - *No resurrection.* A map waits for every pending flush overlapping
//!   its range before it installs, so a page being released by another
//!   unmapper is never mapped again under it.
//!
//! **Concurrency.** Writers serialise on the table lock, held for bounded
//! stretches; lockless readers run alongside and see every entry either
//! before or after each single store. Fault commits take no table lock:
//! they swap discarded markers for present leaves with compare-and-swap,
//! so every writer's change goes through `replace_entry`, which does the
//! same for those entries. Pre-checks (is the range free, is
//! it all mapped) run pinned, without the lock; they only decide whether
//! to refuse, and the locked walk re-checks what it changes.

use super::error::check_range;
use super::writer_walk::{each, replace_entry, Visitor};
use super::{MapError, RangeError, Stage2Table, UnmapError};
use crate::addr::{Gpa, Hva, PageSize, Perms};
use crate::entry::{level_size, Pte, ADDRESS_LIMIT, PAGE_SIZE, SW_BALLOONED, SW_DISCARDED};
use crate::gather::Gather;
use crate::sync::{AtomicU64, Ordering};

/// What an unmap leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnmapMode {
    /// Clear the entries and release the backing.
    Remove,
    /// Release the backing but keep a *discarded* marker: the guest page
    /// still exists and faults back in ([`Stage2Table::fault_in`]).
    Discard,
    /// Release the backing and keep a *ballooned* marker.
    Balloon,
    /// Clear the entries without releasing the backing (the memory stays
    /// with its owner, e.g. a memslot being moved).
    Detach,
}

impl Stage2Table {
    /// Map `[gpa, gpa + len)` to `[hva, hva + len)` with `perms`, using the
    /// largest leaves up to `max_leaf` that alignment allows. The whole
    /// range must be below the table's guest address limit, unmapped, and
    /// the host range registered backing. On error nothing stays mapped.
    pub fn map(
        &self,
        gpa: Gpa,
        hva: Hva,
        len: u64,
        perms: Perms,
        max_leaf: PageSize,
    ) -> Result<(), MapError> {
        let (start, end) = check_range(gpa, len)?;
        if end.0 > self.cfg.guest_address_limit {
            return Err(RangeError::OutOfRange {
                start,
                len,
                limit: self.cfg.guest_address_limit,
            }
            .into());
        }
        if !hva.0.is_multiple_of(PAGE_SIZE) {
            return Err(RangeError::Unaligned {
                what: "host address",
                value: hva.0,
            }
            .into());
        }
        if perms.is_empty() {
            return Err(MapError::NoPermissions(gpa));
        }
        if !self.backing.covers(hva.0, len) {
            return Err(MapError::NotBacked { hva, len });
        }
        if self.is_dying() {
            return Err(MapError::Dying);
        }
        if let Some(a) = self.first_used(start, end) {
            return Err(MapError::AlreadyMapped(a));
        }
        let max_level = max_leaf.level();
        if max_level == 1 {
            // Whole GiBs at 4 KiB leaves fill their part of the leaf arena:
            // let it be one huge page (a hint, see `LeafArena::prefer_huge`).
            let mut gib = start.0.next_multiple_of(1 << 30);
            while gib + (1 << 30) <= end.0 {
                self.arena.prefer_huge(gib);
                gib += 1 << 30;
            }
        }
        let mut addr = start;
        loop {
            let l = self.lock();
            if self.is_dying() {
                drop(l);
                self.rollback(start, addr);
                return Err(MapError::Dying);
            }
            if self.pending_overlaps(addr, end) {
                drop(l);
                self.wait_pending(addr, end, 0);
                continue;
            }
            let mut budget = self.cfg.yield_entries;
            while addr < end && budget > 0 {
                let at = Hva(hva.0 + (addr.0 - start.0));
                match self.install(addr, at, end.0 - addr.0, max_level, perms, budget) {
                    Ok((size, entries)) => {
                        addr = Gpa(addr.0 + size);
                        budget = budget.saturating_sub(entries.max(1));
                    }
                    Err(e) => {
                        drop(l);
                        self.rollback(start, addr);
                        return Err(e);
                    }
                }
            }
            drop(l);
            if addr >= end {
                break;
            }
        }
        self.backing.note_mapped(hva.0, len);
        Ok(())
    }

    /// Undo a partial map of `[start, end)` without releasing backing.
    fn rollback(&self, start: Gpa, end: Gpa) {
        if end <= start {
            return;
        }
        let mut g = self.gather();
        let _ = self.unmap_inner(&mut g, start, end, UnmapMode::Detach, false);
        let _ = g.flush();
    }

    // ---- unmap / protect ----

    /// Unmap `[gpa, gpa + len)` into gather `g`. Every page must be mapped
    /// (present or a marker) or nothing is changed. The backing is released
    /// when `g` is flushed, which the unmap does itself whenever the gather
    /// fills; call [`Gather::finish`] (or `flush`) to complete.
    pub fn unmap(
        &self,
        g: &mut Gather<'_>,
        gpa: Gpa,
        len: u64,
        mode: UnmapMode,
    ) -> Result<(), UnmapError> {
        let (start, end) = self.check_writer(g, gpa, len)?;
        if let Some(hole) = self.first_hole(start, end) {
            // The hole may be another unmapper's work in flight: do not
            // report before its backing is released.
            let _ = g.flush();
            self.wait_pending(start, end, g.id);
            return Err(UnmapError::NotMapped(hole));
        }
        self.unmap_inner(g, start, end, mode, true)
    }

    /// Like [`Stage2Table::unmap`], but pages of the range that are not
    /// mapped are skipped instead of refused (balloon reports, teardown of
    /// sparse ranges). Still waits for other unmappers' pending flushes
    /// over the range before the gather's flush reports completion.
    pub fn unmap_existing(
        &self,
        g: &mut Gather<'_>,
        gpa: Gpa,
        len: u64,
        mode: UnmapMode,
    ) -> Result<(), UnmapError> {
        let (start, end) = self.check_writer(g, gpa, len)?;
        self.unmap_inner(g, start, end, mode, true)
    }

    /// The checks every ranged writer starts with: a valid range, this
    /// table's (non-full-mm) gather, a table that is not being torn down.
    fn check_writer(&self, g: &Gather<'_>, gpa: Gpa, len: u64) -> Result<(Gpa, Gpa), UnmapError> {
        let r = check_range(gpa, len)?;
        self.check_gather(g, false)?;
        if self.is_dying() {
            return Err(UnmapError::Dying);
        }
        Ok(r)
    }

    fn check_gather(&self, g: &Gather<'_>, full_mm: bool) -> Result<(), UnmapError> {
        if !std::ptr::eq(g.table, self) {
            return Err(UnmapError::WrongTable);
        }
        if g.full_mm != full_mm {
            return Err(UnmapError::WrongGatherKind);
        }
        Ok(())
    }

    fn unmap_inner(
        &self,
        g: &mut Gather<'_>,
        start: Gpa,
        end: Gpa,
        mode: UnmapMode,
        register: bool,
    ) -> Result<(), UnmapError> {
        g.note_requested(start, end);
        let pending = register && !g.full_mm;
        // One visitor per mode, each with its mode a constant: the walk's
        // per-entry work is then only that mode's.
        match mode {
            UnmapMode::Remove => {
                self.visit_range(g, start, end, pending, &mut Zap::<REMOVE>::new())
            }
            UnmapMode::Detach => {
                self.visit_range(g, start, end, pending, &mut Zap::<DETACH>::new())
            }
            UnmapMode::Discard => {
                self.visit_range(g, start, end, pending, &mut Zap::<DISCARD>::new())
            }
            UnmapMode::Balloon => {
                self.visit_range(g, start, end, pending, &mut Zap::<BALLOON>::new())
            }
        }
    }
    /// Change the permissions of `[gpa, gpa + len)` (every page must be
    /// mapped). Lost permissions are invalidated through `g`.
    pub fn protect(
        &self,
        g: &mut Gather<'_>,
        gpa: Gpa,
        len: u64,
        perms: Perms,
    ) -> Result<(), UnmapError> {
        let (start, end) = self.check_writer(g, gpa, len)?;
        if perms.is_empty() {
            return Err(UnmapError::NoPermissions);
        }
        if let Some(hole) = self.first_hole(start, end) {
            return Err(UnmapError::NotMapped(hole));
        }
        self.visit_range(
            g,
            start,
            end,
            false,
            &mut each(|slot, e: Pte, level, base, g: &mut Gather<'_>| {
                if e.is_present() {
                    if e.perms() != perms {
                        if !replace_entry(slot, e, e.with_perms(perms)) {
                            return false;
                        }
                        if !perms.contains(e.perms()) {
                            g.note_invalidate(base, level_size(level), false);
                        }
                    }
                    true
                } else {
                    replace_entry(slot, e, Pte::marker(e.addr(), perms, level, e.markers()))
                }
            }),
        )
    }

    /// Tear the whole table down into a full-mm gather: every entry is
    /// cleared and its backing released at the flush; new maps, unmaps and
    /// faults fail with `Dying`. Then `finish` the gather and call
    /// [`Stage2Table::rcu_barrier`] to free the table pages.
    pub fn teardown(&self, g: &mut Gather<'_>) -> Result<(), UnmapError> {
        self.check_gather(g, true)?;
        self.dying.store(true, Ordering::Release);
        self.unmap_inner(g, Gpa(0), Gpa(ADDRESS_LIMIT), UnmapMode::Remove, false)
    }

    /// Turn ballooned markers in `[gpa, gpa + len)` back into discarded
    /// ones (balloon deflate): the pages fault back in on their next touch.
    /// Returns the number of 4 KiB pages deflated.
    pub fn deflate(&self, gpa: Gpa, len: u64) -> Result<u64, UnmapError> {
        let (start, end) = check_range(gpa, len)?;
        if self.is_dying() {
            return Err(UnmapError::Dying);
        }
        let mut g = self.gather();
        let mut pages = 0u64;
        self.visit_range(
            &mut g,
            start,
            end,
            false,
            &mut each(|slot, e: Pte, level, _base, _g: &mut Gather<'_>| {
                if e.markers() & SW_BALLOONED != 0 {
                    let m = Pte::marker(e.addr(), e.saved_perms(), level, SW_DISCARDED);
                    if !replace_entry(slot, e, m) {
                        return false;
                    }
                    pages += level_size(level) / PAGE_SIZE;
                }
                true
            }),
        )?;
        let _ = g.flush();
        Ok(pages)
    }
}

/// [`Zap`]'s modes, as constants ([`UnmapMode`] cannot be a const
/// parameter).
const REMOVE: u8 = 0;
const DETACH: u8 = 1;
const DISCARD: u8 = 2;
const BALLOON: u8 = 3;

/// The unmap's visitor in mode `M` (one of the constants above).
///
/// On a leaf table page it keeps the invalidation range and the current
/// run of host memory to release itself, and hands them to the gather
/// when the run breaks (the one gather entry a leaf may record) and when
/// the page's visit ends ([`Visitor::leaves_done`]), so that the common
/// case, the next 4 KiB of the same run, updates two fields of its own
/// instead of the gather's range, run and flags.
struct Zap<const M: u8> {
    /// Guest range cleared on this leaf page and not yet noted (empty:
    /// `start == end`).
    inv: (u64, u64),
    /// Host run released on this leaf page and not yet noted (`len` 0:
    /// none).
    run: (u64, u64),
}

impl<const M: u8> Zap<M> {
    const MODE: UnmapMode = match M {
        REMOVE => UnmapMode::Remove,
        DETACH => UnmapMode::Detach,
        DISCARD => UnmapMode::Discard,
        _ => UnmapMode::Balloon,
    };

    fn new() -> Self {
        Zap {
            inv: (0, 0),
            run: (0, 0),
        }
    }
}

impl<const M: u8> Visitor for Zap<M> {
    #[inline(always)]
    fn entry(
        &mut self,
        slot: &AtomicU64,
        e: Pte,
        level: u32,
        base: Gpa,
        g: &mut Gather<'_>,
    ) -> bool {
        let Some(present) = zap_entry(slot, e, level, g, Self::MODE) else {
            return false;
        };
        if present {
            let size = level_size(level);
            let release = Self::MODE != UnmapMode::Detach;
            g.note_invalidate(base, size, release);
            if release {
                g.note_release(Hva(e.addr()), size);
            }
        }
        true
    }

    #[inline(always)]
    fn leaf(&mut self, slot: &AtomicU64, e: Pte, base: Gpa, g: &mut Gather<'_>) -> bool {
        let Some(present) = zap_entry(slot, e, 1, g, Self::MODE) else {
            return false;
        };
        if present {
            // Leaves come in address order: the range only grows at its end.
            if self.inv.0 == self.inv.1 {
                self.inv.0 = base.0;
            }
            self.inv.1 = base.0 + PAGE_SIZE;
            if Self::MODE != UnmapMode::Detach {
                let hva = e.addr();
                if self.run.1 != 0 && self.run.0 + self.run.1 == hva {
                    self.run.1 += PAGE_SIZE;
                } else {
                    if self.run.1 != 0 {
                        g.note_release(Hva(self.run.0), self.run.1);
                    }
                    self.run = (hva, PAGE_SIZE);
                }
            }
        }
        true
    }

    #[inline(always)]
    fn leaves_done(&mut self, g: &mut Gather<'_>) {
        if self.inv.0 != self.inv.1 {
            let release = Self::MODE != UnmapMode::Detach;
            g.note_invalidate(Gpa(self.inv.0), self.inv.1 - self.inv.0, release);
            self.inv = (0, 0);
        }
        if self.run.1 != 0 {
            g.note_release(Hva(self.run.0), self.run.1);
            self.run = (0, 0);
        }
    }
}

/// The unmap's change of one leaf or marker at `level`: `None` if a fault
/// restored the entry first (read it again), else whether it was present
/// (its range is then to invalidate, and unless detached, to release).
#[inline(always)]
fn zap_entry(
    slot: &AtomicU64,
    e: Pte,
    level: u32,
    g: &mut Gather<'_>,
    mode: UnmapMode,
) -> Option<bool> {
    let present = e.is_present();
    let new = match mode {
        UnmapMode::Remove | UnmapMode::Detach => Pte::NONE,
        UnmapMode::Discard if present => Pte::marker(e.addr(), e.perms(), level, SW_DISCARDED),
        UnmapMode::Discard => return Some(false),
        UnmapMode::Balloon if present => Pte::marker(e.addr(), e.perms(), level, SW_BALLOONED),
        UnmapMode::Balloon if e.markers() & SW_BALLOONED != 0 => return Some(false),
        UnmapMode::Balloon => Pte::marker(e.addr(), e.saved_perms(), level, SW_BALLOONED),
    };
    if !replace_entry(slot, e, new) {
        return None;
    }
    if mode == UnmapMode::Balloon {
        g.stats.ballooned_pages += level_size(level) / PAGE_SIZE;
    }
    Some(present)
}
