//! Lockless lookups: the read side of the table, shared by the fast walk
//! ([`crate::walk`]), [`Stage2Table::query`] and the writers' pinned
//! pre-checks (is any page of a range mapped, or is one missing).
//!
//! **Invariants.** A lookup only reads: it loads entries with Acquire
//! (pairing with the writers' Release stores, so a table page is seen
//! filled once its pointer is seen), follows table pointers, and stops at
//! the first leaf, marker or empty entry. An entry equal to
//! [`POISON`] means a freed table page was read: the lookup returns
//! [`Lookup::Poison`] and counts it in `use_after_free` (it must stay 0).
//!
//! **Concurrency.** The caller is inside a read section of the table's
//! RCU domain (or holds the table lock): every table page reachable from
//! an entry read inside it stays allocated until the section ends
//! ([`crate::reclaim`]). No lock is taken and nothing is allocated.
//! `query`, `scan` and the pre-checks register a reader of their own (a
//! lock, not a hot path), so they must not be called while the calling
//! thread is pinned.

use std::sync::atomic::Ordering::Relaxed;

use super::Stage2Table;
use crate::addr::{Gpa, Hva, PageSize, Perms};
use crate::entry::{
    index, level_size, Pte, ADDRESS_LIMIT, LEVELS, PAGE_SIZE, POISON, SW_BALLOONED,
};
use crate::reclaim::{PagePtr, TablePage};
use crate::sync::Ordering;

/// What a pinned lookup found.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lookup {
    /// A present leaf at `level`.
    Leaf { pte: Pte, level: u32 },
    /// A discarded or ballooned marker at `level`.
    Marker { pte: Pte, level: u32 },
    /// Nothing mapped.
    None,
    /// A freed table page was read (a reclamation bug).
    Poison,
}

impl Lookup {
    /// What the non-table, non-poison entry `e` at `level` holds.
    #[inline(always)]
    fn of(e: Pte, level: u32) -> Lookup {
        if e.is_present() {
            Lookup::Leaf { pte: e, level }
        } else if e.is_marker() {
            Lookup::Marker { pte: e, level }
        } else {
            Lookup::None
        }
    }
}

/// How `[start, end)` of the table is used right now ([`Stage2Table::census`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Present leaves by size: 4 KiB, 2 MiB, 1 GiB (a leaf the range cuts
    /// counts once).
    pub leaves: [u64; 3],
    /// Bytes mapped and present.
    pub present_bytes: u64,
    /// Bytes discarded (released, fault back in on the next touch).
    pub discarded_bytes: u64,
    /// Bytes in the balloon.
    pub ballooned_bytes: u64,
    /// Freed table pages read (must stay 0; see `use_after_free`).
    pub poisoned: u64,
}

/// What the table knows about one guest page (for oracles and tools).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Nothing mapped.
    Unmapped,
    /// Mapped to `hva` (the address of this 4 KiB page).
    Present {
        /// Host address of the page.
        hva: Hva,
        /// Permissions.
        perms: Perms,
        /// Leaf size.
        size: PageSize,
    },
    /// Backing released; faults back in.
    Discarded {
        /// Host address it will come back at.
        hva: Hva,
        /// Leaf size.
        size: PageSize,
    },
    /// In the balloon.
    Ballooned {
        /// Host address of the page.
        hva: Hva,
        /// Leaf size.
        size: PageSize,
    },
}

impl Stage2Table {
    /// Walk to the entry for `gpa` (below [`ADDRESS_LIMIT`]). The caller
    /// must be inside a read section of this table's RCU domain, or hold
    /// the table lock.
    #[inline(always)]
    pub(crate) fn lookup(&self, gpa: Gpa) -> Lookup {
        self.lookup_from(self.root(), LEVELS, gpa).0
    }

    /// Walk to the entry for `gpa` (below [`ADDRESS_LIMIT`]) starting at
    /// table page `page` of `level` (the root at [`LEVELS`], or a page the
    /// caller knows covers `gpa`: the fast walk's directory cache).
    /// Returns what was found and the last table page read, with its level
    /// (the page holding the entry found).
    ///
    /// The caller must be inside a read section of this table's RCU domain
    /// (or hold the table lock), and `page` must still be allocated in it:
    /// the root, or a page read from a linked entry and not retired since
    /// ([`crate::walk`] checks the unlink sequence at every pin for that:
    /// writers bump it when they unlink a page of level 2 or above).
    /// A page unlinked since it was read is empty (only empty pages are
    /// unlinked), so a walk from it finds nothing mapped, never a stale
    /// leaf.
    #[inline(always)]
    pub(crate) fn lookup_from<'p>(
        &self,
        mut page: &'p TablePage,
        mut level: u32,
        gpa: Gpa,
    ) -> (Lookup, &'p TablePage, u32) {
        loop {
            let e = Pte(page.entries[index(gpa.0, level)].load(Ordering::Acquire));
            if e.0 == POISON {
                self.stats.use_after_free.fetch_add(1, Relaxed);
                return (Lookup::Poison, page, level);
            }
            if e.is_table(level) {
                // SAFETY: read from a linked entry inside the caller's read
                // section (or under the lock): the page stays allocated.
                page = unsafe { PagePtr::from_addr(e.addr()) };
                level -= 1;
                continue;
            }
            return (Lookup::of(e, level), page, level);
        }
    }

    /// Walk from the root to the table page of `level` that covers `gpa`
    /// (below [`ADDRESS_LIMIT`]): `Ok(page)`, or `Err(found)` with what
    /// the walk found above that level instead (a huge leaf, a marker,
    /// nothing, poison). Same contract as [`Stage2Table::lookup_from`].
    #[inline]
    pub(crate) fn lookup_to(&self, gpa: Gpa, level: u32) -> Result<&TablePage, Lookup> {
        let mut page = self.root();
        let mut at = LEVELS;
        while at > level {
            let e = Pte(page.entries[index(gpa.0, at)].load(Ordering::Acquire));
            if e.0 == POISON {
                self.stats.use_after_free.fetch_add(1, Relaxed);
                return Err(Lookup::Poison);
            }
            if !e.is_table(at) {
                return Err(Lookup::of(e, at));
            }
            // SAFETY: read from a linked entry inside the caller's read
            // section (or under the lock): the page stays allocated.
            page = unsafe { PagePtr::from_addr(e.addr()) };
            at -= 1;
        }
        Ok(page)
    }

    /// What the table says about the page at `gpa` right now.
    pub fn query(&self, gpa: Gpa) -> PageState {
        if gpa.0 >= ADDRESS_LIMIT {
            return PageState::Unmapped;
        }
        let mut r = self.rcu.register();
        let _g = r.pin(&self.rcu);
        state_of(self.lookup(gpa), gpa)
    }

    /// Count what `[start, end)` holds right now: present leaves by size,
    /// discarded and ballooned bytes. One pinned scan of the table (no
    /// lock; O(table pages) of the range), for monitoring, never a hot
    /// path. Must not be called while the calling thread is pinned.
    pub fn census(&self, start: Gpa, end: Gpa) -> Census {
        let mut c = Census::default();
        let end = Gpa(end.0.min(ADDRESS_LIMIT));
        if start.0 >= end.0 {
            return c;
        }
        self.scan(start, end, &mut |a, l| {
            let span = |level: u32| {
                let size = level_size(level);
                ((a.0 & !(size - 1)) + size).min(end.0) - a.0
            };
            match l {
                Lookup::Leaf { level, .. } => {
                    if let Some(n) = c.leaves.get_mut(level as usize - 1) {
                        *n += 1;
                    }
                    c.present_bytes += span(level);
                }
                Lookup::Marker { pte, level } if pte.markers() & SW_BALLOONED != 0 => {
                    c.ballooned_bytes += span(level);
                }
                Lookup::Marker { level, .. } => c.discarded_bytes += span(level),
                Lookup::Poison => c.poisoned += 1,
                Lookup::None => {}
            }
            true
        });
        c
    }

    /// Visit every leaf, marker and hole covering `[start, end)` in order,
    /// pinned, until `f` returns false. Returns whether it ran to the end.
    fn scan(&self, start: Gpa, end: Gpa, f: &mut impl FnMut(Gpa, Lookup) -> bool) -> bool {
        let mut r = self.rcu.register();
        let _g = r.pin(&self.rcu);
        self.scan_page(self.root(), LEVELS, start.0, end.0, f)
    }

    fn scan_page(
        &self,
        page: &TablePage,
        level: u32,
        mut addr: u64,
        end: u64,
        f: &mut impl FnMut(Gpa, Lookup) -> bool,
    ) -> bool {
        let size = level_size(level);
        if level == 1 {
            // A leaf table page: 4 KiB leaves, markers and holes only, in
            // one loop over its entries (`end` is at most the page's end).
            let page_base = addr & !(level_size(2) - 1);
            let (first, last) = (index(addr, 1), index(end - 1, 1));
            for (i, slot) in page.entries[first..=last].iter().enumerate() {
                let at = Gpa(addr.max(page_base + (first + i) as u64 * size));
                let e = Pte(slot.load(Ordering::Acquire));
                if !f(at, self.scanned(e, level)) {
                    return false;
                }
            }
            return true;
        }
        while addr < end {
            let ent_end = (addr & !(size - 1)) + size;
            let stop = ent_end.min(end);
            let e = Pte(page.entries[index(addr, level)].load(Ordering::Acquire));
            let ok = if e.0 != POISON && e.is_table(level) {
                // SAFETY: linked entry read inside our read section.
                let child = unsafe { PagePtr::from_addr(e.addr()) };
                self.scan_page(child, level - 1, addr, stop, f)
            } else {
                f(Gpa(addr), self.scanned(e, level))
            };
            if !ok {
                return false;
            }
            addr = stop;
        }
        true
    }

    /// What a scan found in `e` at `level`, not a table pointer (a poisoned
    /// entry is counted as a use after free).
    #[inline(always)]
    fn scanned(&self, e: Pte, level: u32) -> Lookup {
        if e.0 == POISON {
            self.stats.use_after_free.fetch_add(1, Relaxed);
            Lookup::Poison
        } else if e.is_present() {
            Lookup::Leaf { pte: e, level }
        } else if e.is_marker() {
            Lookup::Marker { pte: e, level }
        } else {
            Lookup::None
        }
    }

    /// The first page of `[start, end)` with no leaf or marker.
    pub(super) fn first_hole(&self, start: Gpa, end: Gpa) -> Option<Gpa> {
        let mut hole = None;
        self.scan(start, end, &mut |a, l| match l {
            Lookup::None | Lookup::Poison => {
                hole = Some(a);
                false
            }
            _ => true,
        });
        hole
    }

    /// The first page of `[start, end)` that has a leaf or marker.
    pub(super) fn first_used(&self, start: Gpa, end: Gpa) -> Option<Gpa> {
        let mut used = None;
        self.scan(start, end, &mut |a, l| match l {
            Lookup::None => true,
            _ => {
                used = Some(a);
                false
            }
        });
        used
    }
}

/// The [`PageState`] of the 4 KiB page at `gpa`, given what a lookup of
/// `gpa` found.
pub(crate) fn state_of(l: Lookup, gpa: Gpa) -> PageState {
    let off = |level: u32| gpa.0 & (level_size(level) - 1) & !(PAGE_SIZE - 1);
    let size = |level: u32| PageSize::from_level(level).unwrap_or(PageSize::Size4K);
    match l {
        Lookup::Leaf { pte, level } => PageState::Present {
            hva: Hva(pte.addr() + off(level)),
            perms: pte.perms(),
            size: size(level),
        },
        Lookup::Marker { pte, level } if pte.markers() & SW_BALLOONED != 0 => {
            PageState::Ballooned {
                hva: Hva(pte.addr() + off(level)),
                size: size(level),
            }
        }
        Lookup::Marker { pte, level } => PageState::Discarded {
            hva: Hva(pte.addr() + off(level)),
            size: size(level),
        },
        Lookup::None | Lookup::Poison => PageState::Unmapped,
    }
}
