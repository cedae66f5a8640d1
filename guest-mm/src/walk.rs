//! The lockless fast walk (the `gup_fast` analogue) and per-thread
//! translation caches.
//!
//! A device thread owns a [`Walker`]: a registered RCU reader plus a small
//! direct-mapped translation cache. [`Walker::pin`] opens a read section
//! ([`WalkGuard`]); translations borrowed from the guard cannot outlive it,
//! so no host pointer is held across an invalidation.
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
use crate::entry::{level_size, ADDRESS_LIMIT, PAGE_SHIFT, PAGE_SIZE, SW_BALLOONED};
use crate::mutation::{broken, Rule};
use crate::reclaim::{ReadGuard, Reader};
use crate::sync::{Arc, Ordering};
use crate::table::{Lookup, Stage2Table};

/// Entries in a walker's translation cache.
pub const CACHE_SLOTS: usize = 64;

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
}

#[derive(Default)]
struct Counters {
    translations: Cell<u64>,
    cache_hits: Cell<u64>,
    walks: Cell<u64>,
    failures: Cell<u64>,
    shootdowns: Cell<u64>,
    use_after_free: Cell<u64>,
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
        if self.cache.seq.get() != seq && !broken(Rule::CacheShootdown) {
            self.cache.clear();
            self.cache.seq.set(seq);
            bump(&self.counters.shootdowns);
        }
        WalkGuard {
            table: &self.table,
            cache: &self.cache,
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
        seq: u64,
    ) -> Result<u64, crate::FaultError> {
        self.table
            .fault_in_range_with(&mut self.reader, gpa, len, seq)
    }

    /// Counters so far.
    pub fn stats(&self) -> WalkStats {
        let c = &self.counters;
        WalkStats {
            translations: c.translations.get(),
            cache_hits: c.cache_hits.get(),
            walks: c.walks.get(),
            failures: c.failures.get(),
            shootdowns: c.shootdowns.get(),
            use_after_free: c.use_after_free.get(),
        }
    }
}

/// An open read section of a [`Walker`].
pub struct WalkGuard<'w> {
    table: &'w Stage2Table,
    cache: &'w TlbCache,
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

    /// Translate `gpa` for `access`, through the cache, else by a lockless walk.
    #[inline]
    pub fn translate(&self, gpa: Gpa, access: Access) -> Result<Translation<'_>, WalkError> {
        self.translate_for(gpa, access.perms())
    }

    /// Translate `gpa` for a leaf that has every permission in `need`
    /// (none: any present leaf), through the cache, else by a lockless
    /// walk. A leaf that lacks one fails with `PermissionDenied` naming
    /// [`Access::Write`] if write was needed and missing, else
    /// [`Access::Read`].
    #[inline]
    pub fn translate_for(&self, gpa: Gpa, need: Perms) -> Result<Translation<'_>, WalkError> {
        bump(&self.counters.translations);
        let r = self.translate_inner(gpa, need);
        if r.is_err() {
            bump(&self.counters.failures);
        }
        r
    }

    /// Translate without the cache (always a table walk).
    #[inline]
    pub fn translate_uncached(
        &self,
        gpa: Gpa,
        access: Access,
    ) -> Result<Translation<'_>, WalkError> {
        bump(&self.counters.translations);
        let r = self.walk(gpa, access.perms(), false);
        if r.is_err() {
            bump(&self.counters.failures);
        }
        r
    }

    #[inline(always)]
    fn translate_inner(&self, gpa: Gpa, need: Perms) -> Result<Translation<'_>, WalkError> {
        let gfn = gpa.0 >> PAGE_SHIFT;
        let i = (gfn as usize) & (CACHE_SLOTS - 1);
        if self.cache.tags[i].get() == gfn + 1 {
            let v = self.cache.vals[i].get();
            let perms = Perms::from_bits((v & 7) as u8);
            let level = ((v >> 3) & 7) as u32;
            if perms.contains(need) {
                bump(&self.counters.cache_hits);
                let size = level_size(level);
                let off = gpa.0 & (PAGE_SIZE - 1);
                return Ok(Translation {
                    gpa,
                    hva: Hva((v & !(PAGE_SIZE - 1)) + off),
                    perms,
                    size: PageSize::from_level(level).unwrap_or(PageSize::Size4K),
                    len_in_leaf: size - (gpa.0 & (size - 1)),
                    _guard: PhantomData,
                });
            }
        }
        self.walk(gpa, need, true)
    }

    #[inline(always)]
    fn walk(&self, gpa: Gpa, need: Perms, fill: bool) -> Result<Translation<'_>, WalkError> {
        if gpa.0 >= ADDRESS_LIMIT {
            return Err(WalkError::OutOfRange(gpa));
        }
        bump(&self.counters.walks);
        match self.table.lookup(gpa) {
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
                if fill {
                    let gfn = gpa.0 >> PAGE_SHIFT;
                    let i = (gfn as usize) & (CACHE_SLOTS - 1);
                    self.cache.tags[i].set(gfn + 1);
                    self.cache.vals[i].set(
                        (hva & !(PAGE_SIZE - 1))
                            | u64::from(perms.bits())
                            | (u64::from(level) << 3),
                    );
                }
                Ok(Translation {
                    gpa,
                    hva: Hva(hva),
                    perms,
                    size: PageSize::from_level(level).unwrap_or(PageSize::Size4K),
                    len_in_leaf: size - off,
                    _guard: PhantomData,
                })
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
