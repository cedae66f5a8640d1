//! The lockless fast walk (the `gup_fast` analogue) and per-thread
//! translation caches.
//!
//! A device thread owns a [`Walker`]: a registered RCU reader plus two
//! small direct-mapped caches. [`Walker::pin`] opens a read section
//! ([`WalkGuard`]); translations borrowed from the guard cannot outlive it,
//! so no host pointer is held across an invalidation.
//!
//! **The one-load path.** A 4 KiB leaf entry lives at a place computed
//! from the guest address alone: leaf table pages are the table's leaf
//! arena ([`crate::reclaim`]'s `arena`), page `gpa >> 21` each. So a
//! translation of an address below the arena's *readable end* (the end of
//! the highest GiB that ever had a level-2 page: everything below it is
//! readable, rule `arena_readable`; read once per pin) loads that one
//! entry, with Acquire, after one compare, and depends on no other load:
//! a present 4 KiB leaf there is always one a walk from the root would
//! find (only emptied leaf pages are unlinked, a split fills one with
//! leaves equal to the huge leaf it replaces before it links it; rule
//! `leaf_clear`), and an arena page never linked reads as empty. The
//! level-2 entry is read only when that entry is not a present 4 KiB leaf
//! (2 MiB leaves), or first, in two cases that only order the loads (both
//! entries are live and either answers correctly): a directory slot whose
//! last lookup found a 2 MiB leaf reads its level-2 entry before the
//! translation cache, and a walker whose last leaf found outside the
//! one-load path was a 2 MiB one skips the arena in its next read
//! sections, until it finds a 4 KiB leaf again (a GiB of 2 MiB leaves has
//! no linked leaf pages: the load would find nothing, at the cost of a
//! TLB miss on the zero page).
//!
//! **The caches.** The *translation cache* ([`CACHE_SLOTS`] 4 KiB pages)
//! holds huge-leaf pages and pages reached by a walk from the root, and
//! answers them without reading the table; a 4 KiB leaf under a cached
//! directory page is answered first, by the directory path, and never
//! enters it. The *directory cache* ([`DIR_SLOTS`] slots, one per 1 GiB of guest
//! memory, so 64 GiB without conflicts) holds, for a 1 GiB region, the
//! level-2 table page a walk of it reached (the page whose entries each
//! cover 2 MiB: a leaf-table pointer, a 2 MiB leaf or a marker). A walk
//! starts there and reads two live entries instead of four: the level-2
//! entry (one 4 KiB page per GiB, so it stays in the CPU's cache) and the
//! leaf. It caches *structure*, not translations: both entries are read
//! live, with Acquire, so neither is ever stale, and the leaf table is
//! reached through a linked entry read in this read section, exactly as a
//! walk from the root reaches it. What must hold instead is that the
//! cached level-2 page is still allocated: table pages are freed only
//! after a grace period that starts after they were unlinked, and a writer
//! that unlinks a table page of level 2 or above bumps the table's
//! *unlink sequence* right after the unhook, under the table lock
//! (`Rcu::note_unlinked`; rule `leaf_cache_unlink`). Each pin reads it
//! after its fence and forgets every cached page if it moved (in O(1):
//! slots are tagged with a walker-local generation). So a cached page is
//! used only in a read section that a grace period freeing it would have
//! to wait for. A page unlinked but not yet freed is empty (only empty
//! table pages are unlinked), so a walk from it finds nothing, never a
//! stale leaf. Leaf tables are unlinked with every removal of a whole
//! 2 MiB (an unmap storm; a balloon leaves markers, which keep their
//! tables), but they stay in the leaf arena and are never freed, so
//! unlinking them moves nothing and empties no walker's cache; level-2
//! pages go only when a whole GiB empties. An
//! invalidation (entries cleared) empties the translation cache only: the
//! directory holds no entry.
//!
//! **Protocol: the walker is waited for, never retried.** A walk reads the
//! entries with Acquire loads inside its read section and takes no lock.
//! An unmap clears entries, bumps the table's invalidation sequence and
//! waits for a grace period before it releases any backing. So a walker
//! that raced the unmap and saw the old translation is still inside its
//! read section and the release waits for it; a walker that pins after
//! the grace period sees the cleared entry. Each pin compares the cache's
//! sequence with the table's and empties the cache if they differ (the
//! shootdown), so the cache never outlives an invalidation either.
//! Hence: *after an unmap returns, no new walk yields the old backing*, and
//! no walker touches backing after its release.
//!
//! The hot path takes no lock, allocates nothing and logs nothing; events
//! are counted in the walker ([`WalkStats`]).
//!
//! A read section is also vm-memory's `GuestMemory`:
//! [`WalkGuard::memory`] ([`crate::view`]) translates through
//! [`WalkGuard::translate_for`], with the same guarantee, for slices that
//! borrow the guard.

use std::cell::Cell;
use std::marker::PhantomData;

use thiserror::Error;

use crate::addr::{Gpa, Hva, PageSize, Perms};
use crate::entry::{
    index, level_shift, level_size, Pte, ADDRESS_LIMIT, FRAME_MASK, LARGE, PAGE_SHIFT, PAGE_SIZE,
    POISON, SW_BALLOONED,
};
use crate::mutation::{broken, Rule};
use crate::reclaim::{ArenaView, PagePtr, ReadGuard, Reader, TablePage};
use crate::sync::{Arc, Ordering};
use crate::table::{Lookup, Stage2Table};

/// Entries in a walker's translation cache.
pub const CACHE_SLOTS: usize = 64;

/// Entries in a walker's directory cache: one per 1 GiB region (at the
/// production geometry), so 64 GiB of guest memory map without conflicts.
#[cfg(not(loom))]
pub const DIR_SLOTS: usize = 64;
/// Entries in a walker's directory cache (tiny under loom).
#[cfg(loom)]
pub const DIR_SLOTS: usize = 2;

/// The level of the table pages the directory cache holds.
const DIR_LEVEL: u32 = 2;

/// log2 of the guest bytes one directory slot covers: one entry at level
/// 3 (1 GiB; the whole level-2 page below it).
const DIR_SHIFT: u32 = level_shift(DIR_LEVEL + 1);

/// Where the generation starts in a directory tag: above every region
/// number of any 64-bit address and [`HUGE_HINT`], so that an address at
/// or above [`ADDRESS_LIMIT`] (whose region no slot ever holds) matches no
/// tag and the directory path needs no range check.
const GEN_SHIFT: u32 = u64::BITS - DIR_SHIFT + 1;

/// A directory tag bit that no region number has: set, it says the slot's
/// last lookup found a 2 MiB leaf, so the next one reads the level-2 entry
/// first (a GiB of 2 MiB leaves has no linked leaf pages: the arena load
/// would find nothing). A hint, never a translation: the entry is read
/// live either way. In the tag, so the 4 KiB path's one compare (a tag
/// without it) is unchanged.
const HUGE_HINT: u64 = 1 << (u64::BITS - DIR_SHIFT);

/// The access a translation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading guest memory.
    Read,
    /// Writing guest memory.
    Write,
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum WalkError {
    /// Nothing mapped.
    #[error("guest address {0} is not mapped")]
    NotMapped(Gpa),
    /// The page's backing was released; it must be faulted back in.
    #[error("guest page {0} is discarded; fault it in first")]
    Discarded(Gpa),
    /// The page is in the balloon.
    #[error("guest page {0} is ballooned")]
    Ballooned(Gpa),
    /// Mapped without the needed permission.
    #[error("guest address {gpa} does not allow {access:?}")]
    PermissionDenied {
        /// Where.
        gpa: Gpa,
        /// What was asked.
        access: Access,
    },
    /// Past the table's width.
    #[error("guest range at {0} goes past the table's limit")]
    OutOfRange(Gpa),
    /// The walk read a freed (poisoned) table page: a reclamation bug.
    #[error("the walk for {0} read a freed table page (use-after-free)")]
    UseAfterFree(Gpa),
}

/// Counters of one walker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Translations asked for.
    pub translations: u64,
    /// Answered by the cache.
    pub cache_hits: u64,
    /// Table walks.
    pub walks: u64,
    /// Translations that failed.
    pub failures: u64,
    /// Cache shootdowns seen at pin time.
    pub shootdowns: u64,
    /// Walks that read poison.
    pub use_after_free: u64,
    /// Walks that needed no walk from the root: the leaf arena's one
    /// load, or a start at a cached level-2 table page (the directory
    /// cache). Part of `walks`.
    pub leaf_hits: u64,
    /// Directory caches dropped at pin time because table pages of level
    /// 2 or above were unlinked.
    pub leaf_flushes: u64,
}

/// Each translation bumps exactly one of `cache_hits`, `leaf_hits`,
/// `full_walks` and `out_of_range` (the hot path pays one increment);
/// the totals are sums of them.
#[derive(Default)]
struct Counters {
    cache_hits: Cell<u64>,
    leaf_hits: Cell<u64>,
    full_walks: Cell<u64>,
    out_of_range: Cell<u64>,
    failures: Cell<u64>,
    shootdowns: Cell<u64>,
    use_after_free: Cell<u64>,
    leaf_flushes: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

/// A direct-mapped software TLB keyed by guest frame.
struct TlbCache {
    seq: Cell<u64>,
    /// gfn + 1, 0 = empty.
    tags: [Cell<u64>; CACHE_SLOTS],
    /// host page address | perms (bits 0-2) | level (bits 3-5).
    vals: [Cell<u64>; CACHE_SLOTS],
}

impl TlbCache {
    fn new(seq: u64) -> TlbCache {
        TlbCache {
            seq: Cell::new(seq),
            tags: std::array::from_fn(|_| Cell::new(0)),
            vals: std::array::from_fn(|_| Cell::new(0)),
        }
    }
    fn clear(&self) {
        for t in &self.tags {
            t.set(0);
        }
    }
}

/// One directory cache slot.
#[derive(Default)]
struct DirSlot {
    /// Region number (`gpa >> DIR_SHIFT`) | generation, and
    /// [`HUGE_HINT`] if set; valid only when the generation is the cache's
    /// current one (0 never is).
    tag: Cell<u64>,
    /// The level-2 table page's address.
    page: Cell<u64>,
}

/// A direct-mapped cache of level-2 table pages keyed by 1 GiB region (see
/// the module documentation for why a cached page is always still
/// allocated).
struct DirCache {
    /// The current generation, shifted to [`GEN_SHIFT`] (never 0).
    gen: Cell<u64>,
    /// The unlink sequence the current generation was started under.
    unlink_seq: Cell<u64>,
    /// The last leaf this walker found outside the one-load path was a
    /// 2 MiB one: its next read sections skip the leaf arena and start at
    /// the directory (a GiB of 2 MiB leaves has no linked leaf pages: the
    /// arena load would find nothing, and cost a TLB miss). Cleared by
    /// the next 4 KiB leaf found another way. Only orders the loads.
    huge_first: Cell<bool>,
    slots: [DirSlot; DIR_SLOTS],
}

impl DirCache {
    fn new(unlink_seq: u64) -> DirCache {
        DirCache {
            gen: Cell::new(1 << GEN_SHIFT),
            unlink_seq: Cell::new(unlink_seq),
            huge_first: Cell::new(false),
            slots: std::array::from_fn(|_| DirSlot::default()),
        }
    }

    /// Forget every cached page (O(1): a new generation; the slots are
    /// cleared only when the generation wraps).
    fn forget(&self) {
        let next = self.gen.get().wrapping_add(1 << GEN_SHIFT);
        if next == 0 {
            for s in &self.slots {
                s.tag.set(0);
            }
            self.gen.set(1 << GEN_SHIFT);
        } else {
            self.gen.set(next);
        }
    }
}

/// A translation, valid while the guard it was borrowed from lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation<'g> {
    /// The guest address translated.
    pub gpa: Gpa,
    /// Where it lives in this process.
    pub hva: Hva,
    /// Permissions of the leaf.
    pub perms: Perms,
    /// Leaf size.
    pub size: PageSize,
    /// Bytes from `hva` to the end of the leaf (contiguous on the host).
    pub len_in_leaf: u64,
    _guard: PhantomData<&'g ()>,
}

/// A device thread's handle for lockless translation.
pub struct Walker {
    table: Arc<Stage2Table>,
    reader: Reader,
    cache: TlbCache,
    dir: DirCache,
    counters: Counters,
}

#[cfg(not(loom))]
impl Stage2Table {
    /// A walker for this table (registers an RCU reader; not a hot path).
    pub fn walker(self: &Arc<Self>) -> Walker {
        Walker::new(self)
    }
}

impl Walker {
    /// A walker for `table` (registers an RCU reader; not a hot path).
    pub fn new(table: &Arc<Stage2Table>) -> Walker {
        Walker {
            table: table.clone(),
            reader: table.rcu.register(),
            cache: TlbCache::new(table.inval_seq.load(Ordering::Acquire)),
            dir: DirCache::new(table.rcu.unlink_seq()),
            counters: Counters::default(),
        }
    }

    /// Open a read section. Keep it short: unmaps wait for it to end
    /// before they release backing.
    #[inline]
    pub fn pin(&mut self) -> WalkGuard<'_> {
        let rg = self.reader.pin(&self.table.rcu);
        // After the pin's fence: an invalidation whose grace period does
        // not wait for us has bumped the sequence before we read it.
        let seq = self.table.inval_seq.load(Ordering::Acquire);
        // Likewise: a grace period that frees a level-2 (or higher) page
        // unlinked since our last pin starts after this sequence moved.
        let unlinks = self.table.rcu.unlink_seq();
        if self.cache.seq.get() != seq && !broken(Rule::CacheShootdown) {
            self.cache.clear();
            self.cache.seq.set(seq);
            bump(&self.counters.shootdowns);
        }
        if self.dir.unlink_seq.get() != unlinks && !broken(Rule::LeafCacheUnlink) {
            self.dir.unlink_seq.set(unlinks);
            self.dir.forget();
            bump(&self.counters.leaf_flushes);
        }
        WalkGuard {
            table: &self.table,
            cache: &self.cache,
            dir: &self.dir,
            dir_gen: self.dir.gen.get(),
            arena: if self.dir.huge_first.get() {
                self.table.arena.view().below(0)
            } else {
                self.table.arena.view()
            },
            counters: &self.counters,
            _rg: rg,
        }
    }

    /// The table walked.
    pub fn table(&self) -> &Arc<Stage2Table> {
        &self.table
    }

    /// [`Stage2Table::fault_in`] through this walker's reader: lock-free
    /// pinned attempts, unpinned waits for pending flushes, no reader
    /// registration. Must not be called while this walker is pinned.
    pub fn fault_in(&mut self, gpa: Gpa) -> Result<crate::FaultOutcome, crate::FaultError> {
        self.table.fault_in_waiting(&mut self.reader, gpa)
    }

    /// [`Stage2Table::fault_in_range_if_unchanged`] through this walker's
    /// reader, in one read section: the userfaultfd handler's commit (no
    /// lock, no allocation, never waits).
    pub fn fault_in_range_if_unchanged(
        &mut self,
        gpa: Gpa,
        len: u64,
        seq: crate::FaultSnapshot,
    ) -> Result<u64, crate::FaultError> {
        self.table
            .fault_in_range_with(&mut self.reader, gpa, len, seq)
    }

    /// Counters so far.
    pub fn stats(&self) -> WalkStats {
        let c = &self.counters;
        let walks = c.leaf_hits.get() + c.full_walks.get();
        WalkStats {
            translations: c.cache_hits.get() + walks + c.out_of_range.get(),
            cache_hits: c.cache_hits.get(),
            walks,
            failures: c.failures.get(),
            shootdowns: c.shootdowns.get(),
            use_after_free: c.use_after_free.get(),
            leaf_hits: c.leaf_hits.get(),
            leaf_flushes: c.leaf_flushes.get(),
        }
    }
}

/// An open read section of a [`Walker`].
pub struct WalkGuard<'w> {
    table: &'w Stage2Table,
    cache: &'w TlbCache,
    dir: &'w DirCache,
    /// The directory cache's generation, fixed for the section (only a
    /// pin changes it): a copy the compiler may keep in a register.
    dir_gen: u64,
    /// The leaf arena, for the one-load path.
    arena: ArenaView<'w>,
    counters: &'w Counters,
    _rg: ReadGuard<'w>,
}

impl<'w> WalkGuard<'w> {
    /// What the table says about the page at `gpa`, like
    /// [`Stage2Table::query`] but inside this read section: no reader
    /// registration, no lock, no allocation (for fault handlers).
    pub fn query(&self, gpa: Gpa) -> crate::table::PageState {
        if gpa.0 >= ADDRESS_LIMIT {
            return crate::table::PageState::Unmapped;
        }
        crate::table::state_of(self.table.lookup(gpa), gpa)
    }

    /// Translate `gpa` for `access`, through the caches, else by a lockless walk.
    #[inline(always)]
    pub fn translate(&self, gpa: Gpa, access: Access) -> Result<Translation<'_>, WalkError> {
        self.translate_for(gpa, access.perms())
    }

    /// Translate `gpa` for a leaf that has every permission in `need`
    /// (none: any present leaf), through the caches, else by a lockless
    /// walk. A leaf that lacks one fails with `PermissionDenied` naming
    /// [`Access::Write`] if write was needed and missing, else
    /// [`Access::Read`].
    ///
    /// The common cases are inline, in this order: a present 4 KiB leaf
    /// below the arena's readable end (one compare, one live load in the
    /// leaf arena; skipped while the walker is in its 2 MiB mode), a
    /// translation-cache hit, a 2 MiB leaf in the level-2 entry of the
    /// GiB's cached level-2 page (which fills the translation cache). A
    /// slot whose last lookup found a 2 MiB leaf reads its level-2 entry
    /// first (`HUGE_HINT`). Everything else (a walk from the root, 1 GiB
    /// leaves, failures) is out of line.
    #[inline(always)]
    pub fn translate_for(&self, gpa: Gpa, need: Perms) -> Result<Translation<'_>, WalkError> {
        let want = u64::from(need.bits());
        // 1. A 4 KiB leaf: one live entry at its place in the leaf arena,
        //    below the arena's readable end (one compare), tested for the
        //    needed permissions only. Every entry of a leaf page is a
        //    level-1 leaf, a level-1 marker or empty, none with LARGE
        //    (`Pte::leaf`, `Pte::marker`); POISON, the one level-1 pattern
        //    with LARGE, is written only into pool pages being freed, and
        //    a leaf page is never freed while its table lives
        //    ([`crate::reclaim::arena`]).
        if want != 0 {
            if let Some(entry) = self.arena.entry(gpa.0) {
                let e = entry.load(Ordering::Acquire);
                if e & want == want {
                    bump(&self.counters.leaf_hits);
                    // A present leaf has no bit at or above the frame's
                    // (`Pte::leaf`; software bits are markers' only): the
                    // frame is the entry without its low 12 bits, a mask
                    // that fits an instruction's immediate.
                    let hva = (e & !(PAGE_SIZE - 1)) + (gpa.0 & (PAGE_SIZE - 1));
                    return Ok(translation(gpa, hva, Pte(e).perms(), 1));
                }
            }
        }
        // The directory: the level-2 page cached for the GiB, if any.
        let region = gpa.0 >> DIR_SHIFT;
        let slot = &self.dir.slots[(region as usize) & (DIR_SLOTS - 1)];
        // The level-2 entry, if the directory path read one (0: none).
        let mut e2 = 0;
        let key = region | self.dir_gen;
        let tag = slot.tag.get();
        if want != 0 && tag == key {
            // SAFETY: see `cached_page`.
            let dir = unsafe { cached_page(slot.page.get()) };
            e2 = dir.entries[index(gpa.0, DIR_LEVEL)].load(Ordering::Acquire);
        } else if want != 0 && tag == key | HUGE_HINT {
            // 1b. The slot's last lookup found a 2 MiB leaf: its level-2
            //     entry first (live, as in 3 below; anything else goes on
            //     without the hint). Laid out apart from path 1.
            std::hint::cold_path();
            // SAFETY: see `cached_page`.
            let dir = unsafe { cached_page(slot.page.get()) };
            e2 = dir.entries[index(gpa.0, DIR_LEVEL)].load(Ordering::Acquire);
            if e2 & (LARGE | want) == LARGE | want && e2 != POISON {
                bump(&self.counters.leaf_hits);
                self.dir.huge_first.set(true);
                let hva = (e2 & FRAME_MASK) + (gpa.0 & (level_size(DIR_LEVEL) - 1));
                return Ok(translation(gpa, hva, Pte(e2).perms(), DIR_LEVEL));
            }
            slot.tag.set(key);
        }
        // 2. The translation cache: what the paths below filled (2 MiB
        //    leaves, pages reached by a walk from the root).
        let gfn = gpa.0 >> PAGE_SHIFT;
        let i = (gfn as usize) & (CACHE_SLOTS - 1);
        if self.cache.tags[i].get() == gfn + 1 {
            let v = self.cache.vals[i].get();
            let perms = Perms::from_bits((v & 7) as u8);
            if perms.contains(need) {
                bump(&self.counters.cache_hits);
                let level = ((v >> 3) & 7) as u32;
                if level == 1 {
                    self.dir.huge_first.set(false);
                }
                let hva = (v & !(PAGE_SIZE - 1)) + (gpa.0 & (PAGE_SIZE - 1));
                return Ok(translation(gpa, hva, perms, level));
            }
        }
        // 3. A 2 MiB leaf with the needed permissions in the level-2 entry
        //    read above (POISON has LARGE too: only here is it compared).
        if e2 & (LARGE | want) == LARGE | want && e2 != POISON {
            bump(&self.counters.leaf_hits);
            slot.tag.set(key | HUGE_HINT);
            self.dir.huge_first.set(true);
            let hva = (e2 & FRAME_MASK) + (gpa.0 & (level_size(DIR_LEVEL) - 1));
            let perms = Pte(e2).perms();
            self.remember(gpa, hva, perms, DIR_LEVEL);
            return Ok(translation(gpa, hva, perms, DIR_LEVEL));
        }
        self.translate_slow(gpa, need)
    }

    /// Everything [`WalkGuard::translate_for`] does not answer inline.
    #[inline(never)]
    fn translate_slow(&self, gpa: Gpa, need: Perms) -> Result<Translation<'_>, WalkError> {
        let r = self.walk(gpa, need, true);
        match r {
            Ok(t) if t.size == PageSize::Size4K => self.dir.huge_first.set(false),
            Ok(_) => {}
            Err(_) => bump(&self.counters.failures),
        }
        r
    }

    /// Translate without the caches (always a table walk from the root).
    #[inline]
    pub fn translate_uncached(
        &self,
        gpa: Gpa,
        access: Access,
    ) -> Result<Translation<'_>, WalkError> {
        let r = self.walk(gpa, access.perms(), false);
        if r.is_err() {
            bump(&self.counters.failures);
        }
        r
    }

    /// Put a 4 KiB translation in the translation cache.
    #[inline(always)]
    fn remember(&self, gpa: Gpa, hva: u64, perms: Perms, level: u32) {
        let gfn = gpa.0 >> PAGE_SHIFT;
        let i = (gfn as usize) & (CACHE_SLOTS - 1);
        self.cache.tags[i].set(gfn + 1);
        self.cache.vals[i]
            .set((hva & !(PAGE_SIZE - 1)) | u64::from(perms.bits()) | (u64::from(level) << 3));
    }

    /// A table walk, from the cached leaf table if `cached` (filling both
    /// caches), else from the root.
    #[inline(always)]
    fn walk(&self, gpa: Gpa, need: Perms, cached: bool) -> Result<Translation<'_>, WalkError> {
        if gpa.0 >= ADDRESS_LIMIT {
            bump(&self.counters.out_of_range);
            return Err(WalkError::OutOfRange(gpa));
        }
        let found = if cached {
            self.lookup_cached(gpa)
        } else {
            bump(&self.counters.full_walks);
            self.table.lookup(gpa)
        };
        match found {
            Lookup::Leaf { pte, level } => {
                let size = level_size(level);
                let off = gpa.0 & (size - 1);
                let perms = pte.perms();
                if !perms.contains(need) {
                    let access = if need.writable() && !perms.writable() {
                        Access::Write
                    } else {
                        Access::Read
                    };
                    return Err(WalkError::PermissionDenied { gpa, access });
                }
                let hva = pte.addr() + off;
                if cached {
                    self.remember(gpa, hva, perms, level);
                }
                Ok(translation(gpa, hva, perms, level))
            }
            Lookup::Marker { pte, .. } if pte.markers() & SW_BALLOONED != 0 => {
                Err(WalkError::Ballooned(gpa))
            }
            Lookup::Marker { .. } => Err(WalkError::Discarded(gpa)),
            Lookup::None => Err(WalkError::NotMapped(gpa)),
            Lookup::Poison => {
                bump(&self.counters.use_after_free);
                Err(WalkError::UseAfterFree(gpa))
            }
        }
    }

    /// A lookup that starts at the level-2 page cached for `gpa`'s GiB,
    /// else at the root (and then caches the level-2 page the walk went
    /// through, if it reached one). `gpa` is below [`ADDRESS_LIMIT`].
    #[inline(always)]
    fn lookup_cached(&self, gpa: Gpa) -> Lookup {
        let region = gpa.0 >> DIR_SHIFT;
        let slot = &self.dir.slots[(region as usize) & (DIR_SLOTS - 1)];
        let tag = region | self.dir_gen;
        if slot.tag.get() & !HUGE_HINT == tag {
            bump(&self.counters.leaf_hits);
            // SAFETY: see `cached_page`.
            let page = unsafe { cached_page(slot.page.get()) };
            return self.table.lookup_from(page, DIR_LEVEL, gpa).0;
        }
        bump(&self.counters.full_walks);
        match self.table.lookup_to(gpa, DIR_LEVEL) {
            Ok(page) => {
                let found = self.table.lookup_from(page, DIR_LEVEL, gpa).0;
                if !matches!(found, Lookup::Poison) {
                    slot.tag.set(tag);
                    slot.page.set(std::ptr::from_ref(page) as u64);
                }
                found
            }
            Err(found) => found,
        }
    }

    /// Call `f` with each host-contiguous segment of `[gpa, gpa + len)`
    /// (a DMA scatter list), in order. Stops at the first failure.
    pub fn for_each_segment(
        &self,
        gpa: Gpa,
        len: u64,
        access: Access,
        mut f: impl FnMut(Gpa, Hva, u64),
    ) -> Result<(), WalkError> {
        let end = gpa.0.checked_add(len).ok_or(WalkError::OutOfRange(gpa))?;
        let mut at = gpa.0;
        while at < end {
            let t = self.translate(Gpa(at), access)?;
            let n = t.len_in_leaf.min(end - at);
            f(Gpa(at), t.hva, n);
            at += n;
        }
        Ok(())
    }

    /// Copy guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), WalkError> {
        let mut done = 0usize;
        self.for_each_segment(gpa, buf.len() as u64, Access::Read, |_, hva, n| {
            let n = n as usize;
            // SAFETY: hva..hva+n is registered backing mapped by the table
            // and, inside this read section, not yet released (the unmap
            // that clears it waits for us); buf has room for n more bytes.
            // The guest may write concurrently: the copy may see a mix,
            // as with any DMA.
            unsafe { std::ptr::copy_nonoverlapping(hva.as_ptr(), buf.as_mut_ptr().add(done), n) };
            done += n;
        })
    }

    /// Copy `buf` into guest memory at `gpa`. A failure writes nothing.
    pub fn write(&self, gpa: Gpa, buf: &[u8]) -> Result<(), WalkError> {
        if buf.is_empty() {
            return Ok(());
        }
        // The common case, a buffer inside one leaf: one translation.
        let t = self.translate(gpa, Access::Write)?;
        if buf.len() as u64 <= t.len_in_leaf {
            // SAFETY: as in read; the leaf is writable (checked) and holds
            // all of buf from t.hva on.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), t.hva.as_ptr(), buf.len()) };
            return Ok(());
        }
        let mut done = 0usize;
        // Translate everything first so a failure writes nothing.
        self.for_each_segment(gpa, buf.len() as u64, Access::Write, |_, _, _| {})?;
        self.for_each_segment(gpa, buf.len() as u64, Access::Write, |_, hva, n| {
            let n = n as usize;
            // SAFETY: as in read; the leaf is writable (checked).
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(done), hva.as_ptr(), n) };
            done += n;
        })
    }

    /// Read a little-endian `u64` at `gpa`.
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, WalkError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// A translation of `gpa` to `hva` by a leaf of `level`.
#[inline(always)]
fn translation<'g>(gpa: Gpa, hva: u64, perms: Perms, level: u32) -> Translation<'g> {
    let size = level_size(level);
    Translation {
        gpa,
        hva: Hva(hva),
        perms,
        size: PageSize::from_level(level).unwrap_or(PageSize::Size4K),
        len_in_leaf: size - (gpa.0 & (size - 1)),
        _guard: PhantomData,
    }
}

/// The table page of a directory cache slot.
///
/// # Safety
/// The caller is inside a read section of the walker whose cache holds
/// the slot, and the slot's tag carries the cache's current generation.
/// Then the page was read from a linked entry in a read section of this
/// walker with no unlink-sequence move seen since (each pin that sees one
/// starts a new generation). A level-2 table page is freed only by a grace
/// period that starts after such a move (the writer that unlinks it bumps
/// the sequence right after the unhook, under the table lock), and every
/// pin reads the sequence after its fence: so either the page is not
/// freed yet, or that grace period waits for this read section. (If it
/// was unlinked meanwhile, it is empty: a walk from it finds nothing.)
#[inline(always)]
unsafe fn cached_page<'g>(v: u64) -> &'g TablePage {
    // SAFETY: forwarded contract: the page is allocated for the section
    // (and `v` is its address as stored, page-aligned).
    unsafe { PagePtr::from_addr(v) }
}

impl Access {
    /// The leaf permission this access needs.
    #[inline(always)]
    pub const fn perms(self) -> Perms {
        match self {
            Access::Read => Perms::R,
            Access::Write => Perms::W,
        }
    }
}
