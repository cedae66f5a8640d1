//! The preemptible gather: the `mmu_gather` analogue.
//!
//! **The rule, in order: 1) unhook, 2) invalidate, 3) free.** An unmap
//! clears entries under the table lock and records in a [`Gather`] what it
//! cleared: the guest-physical range to invalidate, the host backing runs to
//! release (coalesced into maximal runs) and the table pages it unlinked.
//! [`Gather::flush`] then, with no table lock held:
//!
//! 1. *invalidates*: bumps the table's invalidation sequence (every
//!    translation cache drops its contents at its next read section), calls
//!    the subscribers' `invalidate_range_start`, and waits for a grace
//!    period, so no reader still holds a translation of a cleared entry;
//! 2. *releases* the backing runs (`madvise`, punch-hole, whole huge pages),
//!    then calls `invalidate_range_end`;
//! 3. *hands the table pages to deferred freeing* (freed after the next
//!    grace period).
//!
//! The gather is an owned value: it may be carried across blocking calls
//! and across lock drops. Its storage is an 8-entry array inside the gather
//! (on the caller's stack) followed by page-sized batches allocated one at
//! a time and chained up to [`MAX_BATCHES`] (about 10K entries). When the
//! cap is reached, or a batch cannot be allocated, the gather reports
//! itself full and the unmap flushes before it goes on: an unmap always
//! makes progress, however little memory there is.
//!
//! **Concurrent gathers.** A gather that cleared entries registers its
//! range as *pending* until its flush has released the backing. Another
//! unmapper of an overlapping range that found entries already cleared
//! must not report completion before that: its flush waits for every older
//! overlapping pending gather (the kernel's `tlb_flush_pending`). Mappers and
//! the fault path wait the same way before installing into a pending range,
//! so a page being released is never resurrected under the releaser.

use std::alloc::{alloc, dealloc, Layout};
use std::mem::MaybeUninit;
use std::ptr::NonNull;

use crate::addr::{Gpa, Hva};
use crate::backing::ReleaseError;
use crate::entry::{ADDRESS_LIMIT, LEVELS};
use crate::mutation::{broken, Rule};
use crate::notify::Invalidation;
use crate::reclaim::PagePtr;
use crate::sync::Ordering;
use crate::table::Stage2Table;

/// Entries in the on-stack fallback array.
pub const LOCAL_ENTRIES: usize = 8;
/// Entries per allocated batch page.
#[cfg(not(loom))]
pub const BATCH_ENTRIES: usize = (4096 - 16) / std::mem::size_of::<Entry>();
/// Entries per allocated batch page.
#[cfg(loom)]
pub const BATCH_ENTRIES: usize = 4;
/// Batch pages chained at most before a flush is forced (~10K entries).
#[cfg(not(loom))]
pub const MAX_BATCHES: usize = 10_000 / BATCH_ENTRIES + 1;
/// Batch pages chained at most before a flush is forced.
#[cfg(loom)]
pub const MAX_BATCHES: usize = 2;
/// Slots kept free for table pages unlinked while an unmap unwinds.
const RESERVE: usize = LEVELS as usize;

/// One recorded item.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Entry {
    /// Host backing `[hva, hva + len)` to release.
    Release { hva: u64, len: u64 },
    /// An unlinked table page to free after a grace period.
    Table(PagePtr),
}

struct Batch {
    len: usize,
    entries: [MaybeUninit<Entry>; BATCH_ENTRIES],
}

/// What a flush did, for callers and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatherStats {
    /// Flushes that did work.
    pub flushes: u64,
    /// Flushes forced because the batch cap was reached.
    pub forced_flushes: u64,
    /// Times a batch page could not be allocated (the on-stack fallback).
    pub fallback_batches: u64,
    /// Batch pages allocated.
    pub batch_allocs: u64,
    /// Backing runs released.
    pub release_runs: u64,
    /// Bytes of backing released.
    pub released_bytes: u64,
    /// Table pages handed to deferred freeing.
    pub tables_retired: u64,
    /// Times this gather waited for another gather's pending flush.
    pub pending_waits: u64,
    /// Releases split across helper threads (see
    /// [`Gather::set_release_threads`]).
    pub parallel_releases: u64,
    /// Background releases ([`Gather::set_release_background`]) whose
    /// flushing thread joined in: a window showed the helpers starved
    /// (slower than the slowest pace accepted), or a helper could not be
    /// spawned.
    pub background_joins: u64,
    /// 4 KiB pages a balloon unmap newly marked *ballooned* (present or
    /// discarded before; a page already in the balloon is not counted
    /// again).
    pub ballooned_pages: u64,
}

/// An owned batch of cleared translations awaiting invalidation and free.
pub struct Gather<'t> {
    pub(crate) table: &'t Stage2Table,
    pub(crate) id: u64,
    pub(crate) full_mm: bool,
    inv: Option<(u64, u64)>,
    inv_releases: bool,
    /// Bounding range of the unmaps requested since the last flush.
    pub(crate) requested: Option<(u64, u64)>,
    run: Option<(u64, u64)>,
    local: [MaybeUninit<Entry>; LOCAL_ENTRIES],
    local_len: usize,
    batches: [Option<NonNull<Batch>>; MAX_BATCHES],
    used_batches: usize,
    full: bool,
    first_error: Option<ReleaseError>,
    /// Threads a large anonymous release may be split across.
    release_threads: usize,
    /// A split release runs in the background, at a GiB per this or faster.
    release_background: Option<std::time::Duration>,
    pub(crate) stats: GatherStats,
}

// SAFETY: the batch pointers are owned by the gather (allocated by it, freed
// in Drop) and the entries are plain data; moving the gather to another
// thread moves that ownership along.
unsafe impl Send for Gather<'_> {}

impl<'t> Gather<'t> {
    pub(crate) fn new(table: &'t Stage2Table, full_mm: bool) -> Gather<'t> {
        Gather {
            table,
            id: table.next_gather_id.fetch_add(1, Ordering::Relaxed),
            full_mm,
            inv: None,
            inv_releases: false,
            requested: None,
            run: None,
            local: [MaybeUninit::uninit(); LOCAL_ENTRIES],
            local_len: 0,
            batches: [None; MAX_BATCHES],
            used_batches: 0,
            full: false,
            first_error: None,
            release_threads: 1,
            release_background: None,
            stats: GatherStats::default(),
        }
    }

    /// Let a flush release a large amount of anonymous memory (at least
    /// [`crate::backing::PARALLEL_MIN_BYTES`]) with up to `n` threads that
    /// claim shrinking shares of it from a shared cursor (a `2n`th of what
    /// is left, at least 16 MiB) and `MADV_DONTNEED` them
    /// (the kernel takes `mmap_lock` for reading there, so chunks free
    /// their pages in parallel); helpers run `SCHED_IDLE`, the flushing
    /// thread takes whatever they do not get to. Off (1) by default; meant
    /// for teardown. If a helper thread cannot be spawned (or
    /// `faults.release_thread` says so), the flushing thread releases
    /// the chunks itself.
    pub fn set_release_threads(&mut self, n: usize) {
        self.release_threads = n.clamp(1, crate::backing::MAX_RELEASE_THREADS);
    }

    /// Make a release split across threads ([`Gather::set_release_threads`])
    /// a *background* one: only `SCHED_IDLE` helpers work on it, while the
    /// flushing thread sleeps and watches their pace, window by window
    /// (at least [`crate::backing::BACKGROUND_WINDOW_MIN`]); once a window
    /// shows them releasing less than a GiB per `slowest_per_gib` (they
    /// are starved), the flushing thread claims what is left at its own
    /// priority. So a release beside busy cores (another VM's vCPUs) takes
    /// only the CPU time nobody else wants, and still ends, at that pace or
    /// faster, when nothing is idle. `None` (the default): the flushing
    /// thread works from the start.
    pub fn set_release_background(&mut self, slowest_per_gib: Option<std::time::Duration>) {
        self.release_background = slowest_per_gib;
    }

    /// Whether this gather tears down the whole table (`fullmm`).
    pub fn is_full_mm(&self) -> bool {
        self.full_mm
    }

    /// The counters of this gather so far.
    pub fn stats(&self) -> GatherStats {
        self.stats
    }

    /// Whether the unmap must flush before recording more.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Whether there is anything to invalidate, release or free.
    pub fn is_empty(&self) -> bool {
        self.inv.is_none() && self.run.is_none() && self.local_len == 0 && self.used_batches == 0
    }

    fn room(&self) -> usize {
        if self.used_batches == 0 {
            LOCAL_ENTRIES - self.local_len
        } else {
            match self.batches[self.used_batches - 1] {
                // SAFETY: batches[..used_batches] are allocated and owned by us.
                Some(b) => BATCH_ENTRIES - unsafe { b.as_ref() }.len,
                None => 0,
            }
        }
    }

    /// Make a fresh batch current, allocating it if needed.
    fn grow(&mut self) -> bool {
        if self.used_batches == MAX_BATCHES {
            self.stats.forced_flushes += 1;
            return false;
        }
        let idx = self.used_batches;
        if self.batches[idx].is_none() {
            if self.table.faults.batch_alloc.should_fail() {
                self.stats.fallback_batches += 1;
                return false;
            }
            let layout = Layout::new::<Batch>();
            // SAFETY: Batch has a non-zero size.
            let raw = unsafe { alloc(layout) }.cast::<Batch>();
            let Some(b) = NonNull::new(raw) else {
                self.stats.fallback_batches += 1;
                return false;
            };
            // SAFETY: freshly allocated for a Batch; entries may stay uninit.
            unsafe { std::ptr::addr_of_mut!((*b.as_ptr()).len).write(0) };
            self.batches[idx] = Some(b);
            self.stats.batch_allocs += 1;
        }
        if let Some(mut b) = self.batches[idx] {
            // SAFETY: allocated above or earlier, owned by us.
            unsafe { b.as_mut() }.len = 0;
        }
        self.used_batches += 1;
        true
    }

    fn push(&mut self, e: Entry) {
        debug_assert!(
            self.room() > 0,
            "gather overflow: the reserve was miscounted"
        );
        if self.used_batches == 0 {
            self.local[self.local_len] = MaybeUninit::new(e);
            self.local_len += 1;
        } else if let Some(mut b) = self.batches[self.used_batches - 1] {
            // SAFETY: batches[..used_batches] are allocated and owned by us.
            let b = unsafe { b.as_mut() };
            b.entries[b.len] = MaybeUninit::new(e);
            b.len += 1;
        }
        if self.room() <= RESERVE && !self.grow() {
            self.full = true;
        }
    }

    /// Record that `[gpa, gpa + len)` must be invalidated; `releases` says
    /// whether backing will be released for it.
    pub(crate) fn note_invalidate(&mut self, gpa: Gpa, len: u64, releases: bool) {
        let (gpa, end) = (gpa.0, gpa.0 + len);
        self.inv = Some(match self.inv {
            None => (gpa, end),
            Some((s, e)) => (s.min(gpa), e.max(end)),
        });
        self.inv_releases |= releases;
    }

    /// Record host backing to release, coalescing with the current run.
    pub(crate) fn note_release(&mut self, hva: Hva, len: u64) {
        let hva = hva.0;
        if broken(Rule::UnhookOrder) {
            // Broken on purpose: released here, under the table lock,
            // before any invalidation or grace period.
            let t = self.table;
            let mut batch = t.backing.batch(&t.faults);
            t.backing.release_into(hva, len, &mut batch);
            let _ = batch.finish();
            return;
        }
        match self.run {
            Some((s, l)) if s + l == hva => self.run = Some((s, l + len)),
            Some((s, l)) if hva + len == s => self.run = Some((hva, l + len)),
            Some((s, l)) => {
                self.push(Entry::Release { hva: s, len: l });
                self.run = Some((hva, len));
            }
            None => self.run = Some((hva, len)),
        }
    }

    /// Record an unlinked table page.
    pub(crate) fn note_table(&mut self, page: PagePtr) {
        self.push(Entry::Table(page));
    }

    pub(crate) fn note_requested(&mut self, start: Gpa, end: Gpa) {
        let (start, end) = (start.0, end.0);
        self.requested = Some(match self.requested {
            None => (start, end),
            Some((s, e)) => (s.min(start), e.max(end)),
        });
    }

    fn for_each_entry(&self, mut f: impl FnMut(Entry)) {
        for e in &self.local[..self.local_len] {
            // SAFETY: local[..local_len] were written by push.
            f(unsafe { e.assume_init() });
        }
        for b in self.batches[..self.used_batches].iter().flatten() {
            // SAFETY: allocated and owned by us.
            let b = unsafe { b.as_ref() };
            for e in &b.entries[..b.len] {
                // SAFETY: entries[..len] were written by push.
                f(unsafe { e.assume_init() });
            }
        }
    }

    fn invalidation(&self) -> Option<Invalidation> {
        if self.full_mm {
            return self.inv.map(|_| Invalidation {
                start: Gpa(0),
                end: Gpa(ADDRESS_LIMIT),
                full_mm: true,
                releases: true,
            });
        }
        self.inv.map(|(s, e)| Invalidation {
            start: Gpa(s),
            end: Gpa(e),
            full_mm: false,
            releases: self.inv_releases,
        })
    }

    /// Step 1 only (`tlb_flush_mmu_tlbonly`): invalidate translation caches
    /// and subscribers and wait for readers; keep the backing and table
    /// pages for a later [`Gather::flush`].
    pub fn flush_invalidate_only(&mut self) {
        if let Some(inv) = self.invalidation() {
            self.invalidate(&inv);
            self.table.subscribers.end(&inv);
            self.inv = None;
            self.inv_releases = false;
        }
    }

    fn invalidate(&mut self, inv: &Invalidation) {
        let t = self.table;
        t.inval_seq.fetch_add(1, Ordering::Release);
        t.fault_seqs.bump(inv.start, inv.end, inv.full_mm);
        t.subscribers.start(inv);
        if !broken(Rule::GracePeriod) {
            t.rcu.synchronize();
        }
        t.stats.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    /// Invalidate, release, then hand table pages to deferred freeing (in
    /// that order), then wait for older overlapping gathers of other
    /// unmappers. Returns the first release error after doing everything
    /// else; the entries are cleared either way, and a range whose release
    /// failed is kept on the backing's unreleased list (counted in
    /// `TableStats::unreleased_bytes`, released again by a later release
    /// over it or by the teardown's flush; see [`crate::backing`]).
    pub fn flush(&mut self) -> Result<(), ReleaseError> {
        let t = self.table;
        let did_work = !self.is_empty();
        // 1. invalidate
        let inv = self.invalidation();
        if let Some(inv) = &inv {
            self.invalidate(inv);
        }
        // 2. release
        let mut runs = 0u64;
        let mut bytes = 0u64;
        let mut first_err = self.first_error.take();
        let mut batch = t.backing.batch(&t.faults);
        batch.set_threads(self.release_threads, &t.faults);
        batch.set_background(self.release_background);
        let mut release = |hva: u64, len: u64| {
            runs += 1;
            bytes += len;
            t.backing.release_into(hva, len, &mut batch);
        };
        self.for_each_entry(|e| {
            if let Entry::Release { hva, len } = e {
                release(hva, len);
            }
        });
        if let Some((hva, len)) = self.run.take() {
            release(hva, len);
        }
        let (res, parallel, joins) = batch.finish();
        self.stats.parallel_releases += parallel;
        self.stats.background_joins += joins;
        if let Err(e) = res {
            first_err.get_or_insert(e);
        }
        // The teardown: nothing can map a host range again, so the ranges
        // earlier releases failed on are released now too.
        if self.full_mm && t.is_dying() {
            if let Err(e) = t.backing.retry_unreleased(&t.faults) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(inv) = &inv {
            t.subscribers.end(inv);
        }
        // 3. table pages to deferred freeing, in chunks without allocating
        // (the dangling placeholders are never handed over: only chunk[..n]).
        let mut chunk = [PagePtr(NonNull::dangling()); 32];
        let mut n = 0;
        let mut retired = 0u64;
        let retire = |pages: &[PagePtr]| {
            // SAFETY: every page in the gather was unlinked under the table
            // lock before it was recorded, and is recorded exactly once.
            unsafe { t.rcu.retire(pages, &t.faults.defer_alloc) };
        };
        self.for_each_entry(|e| {
            if let Entry::Table(p) = e {
                chunk[n] = p;
                n += 1;
                retired += 1;
                if n == chunk.len() {
                    retire(&chunk);
                    n = 0;
                }
            }
        });
        retire(&chunk[..n]);
        // Reset storage; keep allocated batches for reuse.
        self.local_len = 0;
        self.used_batches = 0;
        self.inv = None;
        self.inv_releases = false;
        self.full = false;
        // Our backing is released: others may now complete or install.
        t.pending_done(self.id);
        // tlb_flush_pending: do not report completion before older
        // overlapping unmaps of other gathers have released theirs.
        if let Some((s, e)) = self.requested.take() {
            if t.wait_pending(Gpa(s), Gpa(e), self.id) {
                self.stats.pending_waits += 1;
            }
        }
        if did_work {
            self.stats.flushes += 1;
        }
        self.stats.release_runs += runs;
        self.stats.released_bytes += bytes;
        self.stats.tables_retired += retired;
        t.account_flush(did_work);
        // Bound the memory held by retired pages between unmaps.
        if t.rcu.retired_len() >= 256 {
            t.rcu.synchronize();
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Flush and end the gather (`tlb_finish_mmu`).
    pub fn finish(mut self) -> Result<GatherStats, ReleaseError> {
        self.flush()?;
        Ok(self.stats)
    }

    pub(crate) fn record_error(&mut self, e: ReleaseError) {
        self.first_error.get_or_insert(e);
    }
}

impl Drop for Gather<'_> {
    fn drop(&mut self) {
        // Never leave cleared entries un-invalidated or pages unfreed.
        if !self.is_empty() || self.requested.is_some() {
            let _ = self.flush();
        }
        self.table.fold_gather_stats(&self.stats);
        for b in self.batches.iter_mut() {
            if let Some(b) = b.take() {
                // SAFETY: allocated in grow with this layout, freed once.
                unsafe { dealloc(b.as_ptr().cast(), Layout::new::<Batch>()) };
            }
        }
    }
}
