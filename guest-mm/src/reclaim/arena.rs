//! The leaf arena: where a table's leaf table pages (level 1) live. Each
//! has a fixed place, chosen by the 2 MiB of guest memory it maps: page
//! `gpa >> 21` of one reservation. So the entry of a 4 KiB guest page is
//! at an address computed from the guest address alone, and the fast walk
//! reads it with one load that depends on no other entry
//! ([`LeafArena::entry`]), as a flat page map would, while the table stays
//! a radix tree (level-2 entries still link the page, writers still walk
//! from the root).
//!
//! The reservation covers the table's guest address limit
//! (`TableConfig::guest_address_limit`, at most [`ADDRESS_LIMIT`]): 1/512
//! of it, so 512 GiB of address space (not memory) for the full 48-bit
//! width, 8 MiB for a 4 GiB guest. The table maps nothing at or past its
//! limit, so no level-2 page, and no walk, ever reaches past the end.
//!
//! **Pages.** The reservation starts on a 2 MiB boundary, so the *part*
//! that covers one GiB of guest memory (512 leaf pages, 2 MiB) can be one
//! transparent huge page. It is, only where a map covers that GiB whole
//! at 4 KiB leaves before anything opened it
//! ([`LeafArena::prefer_huge`]): those 512 pages are all used then, so the
//! huge page costs no RSS they would not, and the fast walk's random
//! loads there need one TLB entry. Every other part keeps 4 KiB pages
//! (`MADV_NOHUGEPAGE`), each charged when first written: a small guest, or
//! a guest of 2 MiB leaves that splits a few, pays 4 KiB per leaf page,
//! not 2 MiB per GiB.
//!
//! **Invariants.**
//! - *A leaf page is the same 2 MiB forever.* Its place is its region: it
//!   is never freed to another use while the table lives, so reclamation
//!   has nothing to wait for. An unlinked leaf page simply stays where it
//!   is, empty, and is linked again when its region is mapped again. It
//!   costs RSS until the table is dropped (at most 1/512 of the guest
//!   memory ever mapped at 4 KiB leaves). Nor is it ever poisoned: every
//!   entry it holds is a level-1 leaf, a level-1 marker or zero, none with
//!   LARGE, which is why the fast walk's one-load path tests the needed
//!   permissions alone ([`crate::walk`]).
//! - *A present leaf entry means a reachable entry.* Only empty leaf pages
//!   are unlinked ([`super`]'s writers clear entries first), one taken but
//!   never linked is zeroed when given back, and a split fills one, before the
//!   link, with leaves equivalent to the linked huge leaf it replaces. So
//!   a lockless reader that finds a present leaf at `entry(gpa)` finds what
//!   a walk from the root would find, at the same moment or within the
//!   same split: the protocol of [`crate::walk`] needs no other check.
//! - *Readable below the readable end.* The reservation starts
//!   inaccessible (`PROT_NONE`). [`LeafArena::open`] makes the part that
//!   covers a GiB of guest memory readable and writable before a level-2
//!   table page of that GiB is linked, and first makes every part below
//!   it that is still closed readable (`PROT_READ`: never written, it
//!   reads as the kernel's shared zero page, so as empty entries). Only
//!   then does it raise the *readable end* (the end of the highest GiB
//!   opened, Release). Nothing ever closes again. So every entry below the
//!   readable end a reader loaded (Acquire) is readable, and the fast walk
//!   reads a 4 KiB page's entry after one compare with that end, with no
//!   other check (rule `arena_readable`). What a guest that asks for
//!   addresses where nothing is mapped can make the host do is bounded by
//!   the guest memory mapped: below the readable end, the zero page mapped
//!   into at most one page-table page per GiB; past it, nothing is read.
//!
//! **Concurrency.** `open`, `take` and the `put_back`s run under the table lock;
//! readers load entries with Acquire and take no lock. Under `cfg(loom)`
//! the arena is a boxed array of the tiny geometry's pages, always open.

use std::ptr::NonNull;

use super::pool::{self, PagePtr, TablePage};
#[cfg(loom)]
use crate::entry::index;
use crate::entry::{level_shift, ADDRESS_LIMIT};
#[cfg(not(loom))]
use crate::mutation::{broken, Rule};
use crate::sync::{AtomicU64, Ordering};

/// log2 of the guest bytes one leaf page maps (2 MiB).
const LEAF_SHIFT: u32 = level_shift(2);
/// Leaf pages of the whole guest address space.
#[cfg(loom)]
const LEAF_PAGES: usize = (ADDRESS_LIMIT >> LEAF_SHIFT) as usize;
/// log2 of the guest bytes a level-2 page covers (1 GiB): the unit `open`
/// makes accessible.
#[cfg(not(loom))]
const OPEN_SHIFT: u32 = level_shift(3);
/// Arena bytes that cover one GiB of guest memory.
#[cfg(not(loom))]
const OPEN_BYTES: usize = (1usize << (OPEN_SHIFT - LEAF_SHIFT)) * 4096;

/// The leaf table pages of one table (see the module documentation).
pub(crate) struct LeafArena {
    #[cfg(not(loom))]
    base: usize,
    /// Leaf pages the reservation holds (one per 2 MiB below the limit).
    #[cfg(not(loom))]
    pages: usize,
    #[cfg(loom)]
    pages: Box<[TablePage]>,
    /// Guest addresses below this have readable entries (see the module
    /// documentation); raised only by `open`, under the table lock.
    /// Always the whole width under loom.
    readable_end: AtomicU64,
    /// Leaf pages linked into the table now.
    linked: AtomicU64,
    /// Peak of `linked`.
    peak: AtomicU64,
}

// SAFETY: the arena is memory owned by the table; it is accessed through
// atomics only, and mapped or unmapped only by its owner.
#[cfg(not(loom))]
unsafe impl Send for LeafArena {}
// SAFETY: as above.
#[cfg(not(loom))]
unsafe impl Sync for LeafArena {}

impl LeafArena {
    /// Bytes of address space the arena of a table with guest address
    /// limit `limit` reserves.
    pub(crate) const fn reservation(limit: u64) -> u64 {
        (limit >> LEAF_SHIFT) * 4096
    }

    /// Reserve the arena for guest addresses below `limit` (a multiple of
    /// 1 GiB, at most [`ADDRESS_LIMIT`]): address space only, nothing is
    /// accessible yet. The host's error if it refuses the reservation
    /// (typically `ENOMEM` under an address-space limit, `ulimit -v`).
    #[cfg(not(loom))]
    pub(crate) fn new(limit: u64) -> std::io::Result<LeafArena> {
        debug_assert!(limit <= ADDRESS_LIMIT && limit.is_multiple_of(1 << OPEN_SHIFT));
        let pages = (Self::reservation(limit) / 4096) as usize;
        let bytes = pages * 4096;
        // One part more than asked, so that the parts can start on a
        // 2 MiB boundary (a part can then be one huge page: `prefer_huge`).
        let slack = OPEN_BYTES - 4096;
        // SAFETY: an anonymous private reservation with no address hint;
        // the result is checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes + slack,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = addr as usize;
        let base = start.next_multiple_of(OPEN_BYTES);
        // The slack around the aligned reservation goes back (a failed
        // munmap only leaves address space reserved, never memory).
        for (at, len) in [(start, base - start), (base + bytes, start + slack - base)] {
            if len > 0 {
                // SAFETY: inside the reservation just made, outside the
                // part kept; nothing refers to it.
                unsafe { libc::munmap(at as *mut libc::c_void, len) };
            }
        }
        // Leaf pages are touched one by one: keep THP from charging 2 MiB
        // for the first (`prefer_huge` lifts this where a whole GiB is
        // mapped at 4 KiB leaves). Failure only costs RSS.
        // SAFETY: the range was just mapped by us.
        unsafe { libc::madvise(base as *mut libc::c_void, bytes, libc::MADV_NOHUGEPAGE) };
        Ok(LeafArena {
            base,
            pages,
            readable_end: AtomicU64::new(0),
            linked: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// The arena of the tiny loom geometry (the whole width, whatever the
    /// limit).
    #[cfg(loom)]
    pub(crate) fn new(_limit: u64) -> std::io::Result<LeafArena> {
        Ok(LeafArena {
            pages: (0..LEAF_PAGES)
                .map(|_| TablePage {
                    entries: std::array::from_fn(|_| AtomicU64::new(0)),
                })
                .collect(),
            readable_end: AtomicU64::new(ADDRESS_LIMIT),
            linked: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// Make the part of the arena that covers the GiB of `gpa` accessible,
    /// before a level-2 page for that GiB is linked, every closed part
    /// below it readable, then raise the readable end; `false` if the host
    /// refuses (nothing is raised then) or `gpa` is past the reservation
    /// (the table's limit keeps maps below it). Table lock held.
    #[cfg(not(loom))]
    pub(crate) fn open(&self, gpa: u64) -> bool {
        if (gpa >> LEAF_SHIFT) as usize >= self.pages {
            return false;
        }
        let gib = (gpa >> OPEN_SHIFT) as usize;
        let end = self.readable_end.load(Ordering::Relaxed);
        let readable_to = self.base + ((end >> OPEN_SHIFT) as usize) * OPEN_BYTES;
        let at = self.base + gib * OPEN_BYTES;
        // Everything from the readable end up to this GiB is closed (the
        // end is the end of the highest GiB opened): readable, it reads as
        // empty entries. Broken (rule `arena_readable`): left closed, so a
        // fast walk there faults.
        if at > readable_to && !broken(Rule::ArenaReadable) {
            // SAFETY: inside our reservation, below this GiB's part;
            // nothing maps there but us, and it was inaccessible, so no
            // reference into it exists.
            let r = unsafe {
                libc::mprotect(
                    readable_to as *mut libc::c_void,
                    at - readable_to,
                    libc::PROT_READ,
                )
            };
            if r != 0 {
                return false;
            }
        }
        // SAFETY: inside our reservation (checked above; it is whole
        // GiBs); nothing in the process maps there but us, and making it
        // accessible cannot invalidate any reference.
        let r = unsafe {
            libc::mprotect(
                at as *mut libc::c_void,
                OPEN_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if r != 0 {
            return false;
        }
        let opened_end = ((gib + 1) as u64) << OPEN_SHIFT;
        if opened_end > end {
            // Release: a reader that loads the new end (Acquire) reads the
            // arena after the mprotects above made it readable.
            self.readable_end.store(opened_end, Ordering::Release);
        }
        true
    }

    /// Let the part of the arena that covers the GiB at `gpa` (a multiple
    /// of 1 GiB) be one transparent huge page, if that part was never
    /// opened: called by a map that covers the whole GiB at 4 KiB leaves,
    /// before it links any of its 512 leaf pages. Those pages then cost
    /// the RSS they would have cost one by one (2 MiB), the kernel zeroes
    /// them in one fault instead of 512, and the fast walk's random loads
    /// there need one TLB entry instead of one per 2 MiB of guest memory
    /// (issue 12, goal 1: `gmm bench walk`'s `walk_vs_small_arena`,
    /// DESIGN 3b). A hint: `false` if the part was opened already (it may
    /// hold entries; it keeps its 4 KiB pages), THP is unavailable, or the
    /// host refuses; nothing else changes then. Where the first touch gets
    /// no huge page (fragmented host memory), `khugepaged` may collapse
    /// the part later: a copy the kernel makes with the part unmapped, so
    /// a reader or writer that touches it meanwhile waits in a page fault
    /// and then finds the same entries (no entry is lost or torn). Does
    /// not need the table lock: a race with an `open` only loses the
    /// hint.
    #[cfg(not(loom))]
    pub(crate) fn prefer_huge(&self, gpa: u64) -> bool {
        debug_assert!(gpa.is_multiple_of(1 << OPEN_SHIFT));
        if (gpa >> LEAF_SHIFT) as usize >= self.pages
            || gpa < self.readable_end.load(Ordering::Acquire)
        {
            return false;
        }
        let at = self.base + ((gpa >> OPEN_SHIFT) as usize) * OPEN_BYTES;
        // SAFETY: one part inside our reservation. The advice changes
        // neither its content nor its protection, so nothing that reads it
        // (if an `open` racing this call made it readable) is affected.
        unsafe { libc::madvise(at as *mut libc::c_void, OPEN_BYTES, libc::MADV_HUGEPAGE) == 0 }
    }

    /// No huge pages under loom (the arena is a boxed array).
    #[cfg(loom)]
    pub(crate) fn prefer_huge(&self, _gpa: u64) -> bool {
        false
    }

    /// Always open under loom.
    #[cfg(loom)]
    pub(crate) fn open(&self, _gpa: u64) -> bool {
        true
    }

    /// The leaf page of the 2 MiB of `gpa`.
    fn page(&self, gpa: u64) -> PagePtr {
        let i = (gpa >> LEAF_SHIFT) as usize;
        #[cfg(not(loom))]
        let p = (self.base + i * 4096) as *mut TablePage;
        #[cfg(loom)]
        let p = &self.pages[i] as *const TablePage as *mut TablePage;
        // SAFETY: an address inside a reservation (or a boxed slice),
        // neither of which starts at null.
        let p = unsafe { NonNull::new_unchecked(p) };
        PagePtr(p)
    }

    /// The leaf page for the 2 MiB of `gpa`, to be linked (or filled by a
    /// split, then linked). It is empty: pages are unlinked only empty,
    /// and one taken but never linked is zeroed when given back. The GiB
    /// must be open. Table lock held.
    pub(crate) fn take(&self, gpa: u64) -> PagePtr {
        let p = self.page(gpa);
        #[cfg(not(loom))]
        if broken(Rule::LeafKept) {
            // Broken: a page poisoned when given back is zeroed when
            // taken again, as the pool zeroes a page it hands out.
            // SAFETY: an arena page, open (the caller opened its GiB),
            // not linked (it is being taken), table lock held: we are its
            // only writer.
            unsafe { fill(p, 0) };
        }
        let n = self.linked.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        pool::gauge_add(1);
        p
    }

    /// `page`, unlinked now because it became empty: it stays where it is
    /// (see the module documentation). Table lock held.
    pub(crate) fn put_back(&self, page: PagePtr) {
        debug_assert!(self.contains(page));
        #[cfg(not(loom))]
        if broken(Rule::LeafKept) {
            // Broken: poisoned, as a freed pool page is (`pool::free`).
            // SAFETY: an arena page, open (it was linked), unlinked now,
            // table lock held: we are its only writer; readers only load.
            unsafe { fill(page, crate::entry::POISON) };
        }
        self.linked.fetch_sub(1, Ordering::Relaxed);
        pool::gauge_sub(1);
    }

    /// `page`, taken but never linked (a split that lost its race to a
    /// fault): zeroed, then given back. Table lock held.
    pub(crate) fn put_back_unused(&self, page: PagePtr) {
        // SAFETY: an arena page, open (it was taken), owned by the table;
        // the lock makes us its only writer. Readers may load it
        // meanwhile: unlinked, it holds the split's markers (never a
        // present leaf), and zeroes are empty too.
        unsafe { fill(page, 0) };
        self.put_back(page);
    }

    /// Whether `page` is one of this arena's pages.
    pub(crate) fn contains(&self, page: PagePtr) -> bool {
        #[cfg(not(loom))]
        let pages = self.pages;
        #[cfg(loom)]
        let pages = LEAF_PAGES;
        let first = self.page(0).addr();
        page.addr().wrapping_sub(first) < (pages as u64) * 4096
    }

    /// Leaf pages linked now.
    pub(crate) fn in_use(&self) -> u64 {
        self.linked.load(Ordering::Relaxed)
    }

    /// Peak of [`LeafArena::in_use`].
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// The arena as a walker reads it: a copy a read section may keep
    /// in a register.
    #[inline(always)]
    pub(crate) fn view(&self) -> ArenaView<'_> {
        ArenaView {
            #[cfg(not(loom))]
            base: self.base,
            #[cfg(loom)]
            arena: self,
            end: self.readable_end.load(Ordering::Acquire),
            _arena: std::marker::PhantomData,
        }
    }
}

/// Stores `value` in every entry of `page` (relaxed: readers load
/// entries one at a time and accept any value a writer left).
///
/// # Safety
/// `page` is an open arena page and the caller is its only writer (table
/// lock held); readers may load it meanwhile.
unsafe fn fill(page: PagePtr, value: u64) {
    // SAFETY: the caller's contract: the page is mapped and readable.
    let entries = unsafe { &page.get().entries };
    for e in entries {
        e.store(value, Ordering::Relaxed);
    }
}

/// A reader's copy of a [`LeafArena`]'s address and readable end.
#[derive(Clone, Copy)]
pub(crate) struct ArenaView<'a> {
    #[cfg(not(loom))]
    base: usize,
    #[cfg(loom)]
    arena: &'a LeafArena,
    /// The readable end when the view was taken (it only rises).
    end: u64,
    _arena: std::marker::PhantomData<&'a LeafArena>,
}

impl<'a> ArenaView<'a> {
    /// The same view, reading no entry at or above `end` (a lower end
    /// only makes the fast walk take its other paths).
    #[inline(always)]
    pub(crate) fn below(self, end: u64) -> ArenaView<'a> {
        ArenaView {
            end: self.end.min(end),
            ..self
        }
    }

    /// The leaf entry of the 4 KiB page at `gpa`, if `gpa` is below the
    /// readable end the view was taken with (else `None`: no leaf page
    /// there was ever linked).
    #[inline(always)]
    pub(crate) fn entry(self, gpa: u64) -> Option<&'a AtomicU64> {
        if gpa >= self.end {
            return None;
        }
        #[cfg(not(loom))]
        {
            let a = self.base + ((gpa >> 12) as usize) * 8;
            // SAFETY: below the readable end, loaded with Acquire after
            // the mprotects that made every part of the reservation below
            // it readable (`open`); that end is at most the table's limit,
            // which the reservation covers, and nothing closes again while
            // the arena lives (as long as 'a). The word is read and
            // written only as an atomic.
            Some(unsafe { &*(a as *const AtomicU64) })
        }
        #[cfg(loom)]
        {
            Some(&self.arena.pages[(gpa >> LEAF_SHIFT) as usize].entries[index(gpa, 1)])
        }
    }
}

#[cfg(not(loom))]
impl Drop for LeafArena {
    fn drop(&mut self) {
        pool::gauge_sub(self.in_use());
        pool::unmap_or_leak(self.base, self.pages * 4096);
    }
}

#[cfg(loom)]
impl Drop for LeafArena {
    fn drop(&mut self) {
        pool::gauge_sub(self.in_use());
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::{BackingKind, BackingRegion, Gpa, Hva, PageSize, Perms, Stage2Table, TableConfig};

    const GIB: u64 = 1 << 30;

    /// The `VmFlags` of the mapping of this process that holds `addr`.
    fn vm_flags(addr: u64) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("reading /proc/self/smaps");
        let mut inside = false;
        for line in smaps.lines() {
            // A mapping's first line starts with its range, `lo-hi` in hex.
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            if let Some((Ok(lo), Ok(hi))) =
                range.map(|(lo, hi)| (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(str::to_owned).collect();
                }
            }
        }
        panic!("no mapping of this process holds {addr:#x}");
    }

    #[test]
    fn whole_gibs_at_4k_leaves_get_a_huge_page_part_and_others_do_not() {
        let table = Stage2Table::new(TableConfig::default()).expect("table");
        let host = 0x7000_0000_0000u64;
        table
            .register_backing(BackingRegion {
                hva: Hva(host),
                len: 4 * GIB,
                kind: BackingKind::Simulated { hook: None },
            })
            .expect("backing");
        let part = |gpa: u64| table.arena.page(gpa).addr();
        assert!(
            part(0).is_multiple_of(2 << 20),
            "the arena's parts start on 2 MiB boundaries"
        );
        // GiB 1 whole at 4 KiB leaves; GiB 2 whole at 2 MiB leaves; 128 MiB
        // of GiB 3 at 4 KiB leaves; GiB 0 (made readable by the opens
        // above it) whole at 4 KiB leaves afterwards.
        let map = |gpa: u64, len: u64, leaf| {
            table
                .map(Gpa(gpa), Hva(host + gpa), len, Perms::RW, leaf)
                .expect("map");
        };
        map(GIB, GIB, PageSize::Size4K);
        map(2 * GIB, GIB, PageSize::Size2M);
        map(3 * GIB, 128 << 20, PageSize::Size4K);
        map(0, GIB, PageSize::Size4K);
        let huge = |gpa: u64| vm_flags(part(gpa)).iter().any(|f| f == "hg");
        assert!(huge(GIB), "a GiB mapped whole at 4 KiB leaves");
        assert!(!huge(2 * GIB), "a GiB of 2 MiB leaves links no leaf page");
        assert!(!huge(3 * GIB), "a part of a GiB keeps 4 KiB pages");
        assert!(!huge(0), "a part opened before its map keeps 4 KiB pages");
        // Every 4 KiB leaf still translates through the arena.
        let mut w = table.walker();
        let g = w.pin();
        for gpa in [GIB, GIB + 12345 * 4096, 3 * GIB + 4096, 4096] {
            let t = g.translate(Gpa(gpa), crate::Access::Read).expect("mapped");
            assert_eq!((t.hva.0, t.size), (host + gpa, PageSize::Size4K));
        }
    }
}
