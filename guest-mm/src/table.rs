//! The stage-2 table: a 4-level radix tree of 512-entry table pages that
//! maps guest-physical pages to host backing.
//!
//! **Writers** (map, unmap, protect, fault-in, teardown) hold the table
//! lock while they change entries, and never for longer than
//! [`TableConfig::yield_entries`] entries: a long operation drops the lock
//! and retakes it, resuming after the last address it finished (forward
//! progress). Entries are changed with single atomic stores, so a reader
//! sees either the old or the new entry, never a mix. A huge leaf that must
//! be split is rebuilt as a full sub-table off-line and swapped in with one
//! store; the old leaf's range is invalidated through the gather.
//!
//! **Readers** ([`crate::walk`]) take no lock: they walk inside an RCU read
//! section with Acquire loads. A table page is published with a Release
//! store after it is filled, and freed only after it was unlinked and a
//! grace period passed ([`crate::reclaim`]).
//!
//! **Pending invalidations across lock drops.** When an unmap drops the
//! lock with cleared entries not yet invalidated, it keeps them in its
//! gather and keeps its range registered as *pending*; it does not flush
//! first. Whoever could be hurt by the un-invalidated state waits for the
//! pending flush instead: another unmapper before it reports completion,
//! a mapper or the fault path before it installs into the range.
//!
//! Lock order: table lock → pending-set lock → page pool / backing
//! registry locks. Flushes (subscribers, grace periods, releases) run with
//! none of them held, except that file and hugetlb releases are made under
//! the backing registry lock (it guards their partial huge-page records).

use std::ptr::NonNull;
use std::sync::atomic::AtomicU64 as StatU64;
use std::time::Instant;

use thiserror::Error;

use crate::addr::{Gpa, Hva, PageSize, Perms};
use crate::backing::{BackingError, BackingId, BackingRegion, BackingRegistry};
use crate::entry::{
    index, level_size, Pte, ADDRESS_LIMIT, LEVELS, PAGE_SIZE, POISON, SW_BALLOONED, SW_DISCARDED,
};
use crate::fault::FaultInjection;
use crate::gather::{Gather, GatherStats};
use crate::mutation::{broken, Rule};
use crate::notify::{InvalidationSubscriber, SubscribeError, SubscriberId, Subscribers};
use crate::reclaim::{PagePtr, Rcu, TablePage};
use crate::sync::{lock, wait, AtomicBool, AtomicU64, Condvar, Mutex, MutexGuard, Ordering};

/// Tunables of a table.
#[derive(Clone, Debug)]
pub struct TableConfig {
    /// Entries a writer may visit before it drops and retakes the table lock.
    pub yield_entries: u32,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            yield_entries: 2048,
        }
    }
}

/// Why a guest-physical range was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RangeError {
    /// Zero length.
    #[error("the range at {0} is empty; give a length of at least 4 KiB")]
    Empty(Gpa),
    /// Not 4 KiB aligned.
    #[error("{what} {value:#x} is not 4 KiB aligned; align addresses and lengths to 4096")]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// Past the table's address width, or wrapping around.
    #[error("range {start} + {len:#x} goes past the table's {limit:#x} guest-physical limit")]
    OutOfRange {
        /// Start.
        start: Gpa,
        /// Length.
        len: u64,
        /// The limit.
        limit: u64,
    },
}

/// Errors of [`Stage2Table::map`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MapError {
    /// Bad range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// No permissions given.
    #[error("mapping {0} without any of R/W/X would be invisible; give at least read permission")]
    NoPermissions(Gpa),
    /// The host range is not registered backing.
    #[error(
        "host range {hva} + {len:#x} is not inside registered backing; call register_backing first"
    )]
    NotBacked {
        /// Start.
        hva: Hva,
        /// Length.
        len: u64,
    },
    /// Part of the range is mapped (or a marker) already.
    #[error("guest page {0} is already mapped; unmap it first")]
    AlreadyMapped(Gpa),
    /// A table page could not be allocated; nothing stays mapped.
    #[error("out of memory for a table page while mapping {0}; nothing was mapped")]
    OutOfMemory(Gpa),
    /// The table is being torn down.
    #[error("the table is being torn down")]
    Dying,
}

/// Errors of [`Stage2Table::unmap`] and [`Stage2Table::protect`].
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UnmapError {
    /// Bad range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// Part of the range is not mapped; nothing was changed.
    #[error("guest page {0} is not mapped; nothing was changed (unmap only what is mapped)")]
    NotMapped(Gpa),
    /// Splitting a huge leaf needed a table page that could not be had.
    #[error("out of memory splitting the huge leaf at {at}; the range up to {at} was done and flushed, the rest is unchanged")]
    OutOfMemory {
        /// Where it stopped.
        at: Gpa,
    },
    /// The gather belongs to another table.
    #[error("the gather was opened on another table; open it with this table's gather()")]
    WrongTable,
    /// Teardown needs a full-mm gather and vice versa.
    #[error("teardown needs a gather from gather_full_mm(), and unmap one from gather()")]
    WrongGatherKind,
    /// No permissions given to protect.
    #[error("protect needs at least one permission; to remove access, unmap")]
    NoPermissions,
    /// The table is being torn down.
    #[error("the table is being torn down")]
    Dying,
}

/// Errors of the fault path.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FaultError {
    /// Nothing is mapped there.
    #[error("guest page {0} is not mapped: the guest touched memory it does not have")]
    NotMapped(Gpa),
    /// The page is in the balloon.
    #[error("guest page {0} is ballooned; deflate it before touching it")]
    Ballooned(Gpa),
    /// An invalidation ran since the caller's sequence snapshot.
    #[error("an invalidation raced with the fault at {0}; resolve it again")]
    Retry(Gpa),
    /// Out of the address width.
    #[error("{0} is beyond the table's guest-physical limit")]
    OutOfRange(Gpa),
    /// The table is being torn down.
    #[error("the table is being torn down")]
    Dying,
}

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

/// A snapshot of the table's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Table-lock acquisitions.
    pub lock_acquisitions: u64,
    /// Longest table-lock hold, in nanoseconds.
    pub lock_hold_max_ns: u64,
    /// Histogram of lock holds: bucket `i` counts holds in `[2^i, 2^(i+1))` ns.
    pub lock_hold_hist: Vec<u64>,
    /// Longest on-CPU time of the holder during one lock hold, in
    /// nanoseconds (0 unless [`Stage2Table::set_cpu_lock_stats`] is on).
    /// A wall-clock hold much longer than this one means the holder was
    /// descheduled while holding the lock.
    pub lock_hold_cpu_max_ns: u64,
    /// Histogram of on-CPU hold times, buckets as `lock_hold_hist`.
    pub lock_hold_cpu_hist: Vec<u64>,
    /// Table pages allocated now (including ones awaiting a grace period).
    pub table_pages: u64,
    /// Peak of `table_pages`.
    pub table_pages_peak: u64,
    /// Table pages freed after a grace period.
    pub tables_freed: u64,
    /// Table pages waiting for a grace period.
    pub tables_retired_pending: u64,
    /// Grace periods waited for.
    pub grace_periods: u64,
    /// Deferred frees that fell back to a synchronous grace period.
    pub sync_fallbacks: u64,
    /// Invalidations (flush step 1).
    pub invalidations: u64,
    /// Flushes that did work.
    pub flushes: u64,
    /// Flushes forced by the batch cap.
    pub forced_flushes: u64,
    /// Batch allocations that failed (on-stack fallback used).
    pub fallback_batches: u64,
    /// Batch pages allocated.
    pub batch_allocs: u64,
    /// Waits for another gather's pending flush.
    pub pending_waits: u64,
    /// Threads blocked right now waiting for another gather's pending
    /// flush (a gauge, not a count).
    pub pending_waiters: u64,
    /// Release system calls (a batched `process_madvise` counts once).
    pub release_calls: u64,
    /// `process_madvise` calls that released a whole batch of runs.
    pub release_batched_calls: u64,
    /// Runs released by those calls.
    pub release_batched_runs: u64,
    /// Batches redone with one `madvise` per run (refused, failed, partial
    /// or injected).
    pub release_batch_fallbacks: u64,
    /// Bytes released.
    pub released_bytes: u64,
    /// Failed release calls.
    pub release_errors: u64,
    /// Bytes a release was asked for outside registered backing (refused).
    pub release_outside_bytes: u64,
    /// Huge leaves split.
    pub splits: u64,
    /// Discarded leaves made present by the fault path.
    pub faults_restored: u64,
    /// Walks that read a poisoned (freed) table page. Must stay 0.
    pub use_after_free: u64,
    /// hugetlb pages partly released (still allocated).
    pub partial_huge_pages: u64,
    /// The invalidation sequence.
    pub invalidate_seq: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) lock_acq: StatU64,
    pub(crate) lock_max_ns: StatU64,
    pub(crate) lock_hist: [StatU64; 32],
    pub(crate) lock_cpu_max_ns: StatU64,
    pub(crate) lock_cpu_hist: [StatU64; 32],
    /// Whether lock holds are also timed in thread CPU time.
    pub(crate) cpu_lock_stats: std::sync::atomic::AtomicBool,
    pub(crate) invalidations: StatU64,
    pub(crate) flushes: StatU64,
    pub(crate) forced_flushes: StatU64,
    pub(crate) fallback_batches: StatU64,
    pub(crate) batch_allocs: StatU64,
    pub(crate) pending_waits: StatU64,
    /// Gauge: threads blocked in `wait_pending` now.
    pub(crate) pending_waiters: StatU64,
    pub(crate) splits: StatU64,
    pub(crate) faults_restored: StatU64,
    pub(crate) use_after_free: StatU64,
}

struct Pending {
    gather: u64,
    ticket: u64,
    start: u64,
    end: u64,
}

#[derive(Default)]
struct PendingSet {
    list: Vec<Pending>,
    next_ticket: u64,
}

/// The stage-2 table of one guest.
pub struct Stage2Table {
    root: PagePtr,
    lock: Mutex<()>,
    pending: Mutex<PendingSet>,
    pending_cv: Condvar,
    dying: AtomicBool,
    cfg: TableConfig,
    pub(crate) rcu: Rcu,
    pub(crate) backing: BackingRegistry,
    pub(crate) subscribers: Subscribers,
    /// Bumped by every invalidation; translation caches compare against it.
    pub(crate) inval_seq: AtomicU64,
    pub(crate) next_gather_id: StatU64,
    pub(crate) stats: Counters,
    /// Injectable failures, for tests of every fallback path.
    pub faults: FaultInjection,
}

/// The table lock, timed.
pub(crate) struct Locked<'t> {
    t: &'t Stage2Table,
    _g: MutexGuard<'t, ()>,
    since: Instant,
    /// Thread CPU time at acquisition, when CPU lock stats are on.
    cpu_since: Option<u64>,
}

/// This thread's CPU time in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Records one hold of `ns` into a maximum and a log2 histogram.
fn record_hold(max: &StatU64, hist: &[StatU64; 32], ns: u64) {
    max.fetch_max(ns, std::sync::atomic::Ordering::Relaxed);
    let bucket = (63 - ns.max(1).leading_zeros()) as usize;
    hist[bucket.min(hist.len() - 1)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let ns = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let s = &self.t.stats;
        record_hold(&s.lock_max_ns, &s.lock_hist, ns);
        if let Some(c0) = self.cpu_since {
            let cpu = thread_cpu_ns().saturating_sub(c0);
            record_hold(&s.lock_cpu_max_ns, &s.lock_cpu_hist, cpu);
        }
    }
}

fn check_range(gpa: Gpa, len: u64) -> Result<(u64, u64), RangeError> {
    if len == 0 {
        return Err(RangeError::Empty(gpa));
    }
    if !gpa.0.is_multiple_of(PAGE_SIZE) {
        return Err(RangeError::Unaligned {
            what: "guest-physical address",
            value: gpa.0,
        });
    }
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(RangeError::Unaligned {
            what: "length",
            value: len,
        });
    }
    match gpa.0.checked_add(len) {
        Some(end) if end <= ADDRESS_LIMIT => Ok((gpa.0, end)),
        _ => Err(RangeError::OutOfRange {
            start: gpa,
            len,
            limit: ADDRESS_LIMIT,
        }),
    }
}

fn page_is_empty(p: &TablePage) -> bool {
    p.entries.iter().all(|e| e.load(Ordering::Relaxed) == 0)
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

/// What a pinned lookup found.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lookup {
    Leaf { pte: Pte, level: u32 },
    Marker { pte: Pte, level: u32 },
    None,
    Poison,
}

impl Stage2Table {
    /// A new, empty table.
    pub fn new(cfg: TableConfig) -> Result<crate::sync::Arc<Stage2Table>, MapError> {
        let rcu = Rcu::new();
        let faults = FaultInjection::default();
        let root = rcu
            .pool
            .alloc(&faults.table_alloc)
            .ok_or(MapError::OutOfMemory(Gpa(0)))?;
        Ok(crate::sync::Arc::new(Stage2Table {
            root,
            lock: Mutex::new(()),
            pending: Mutex::new(PendingSet::default()),
            pending_cv: Condvar::new(),
            dying: AtomicBool::new(false),
            cfg: TableConfig {
                yield_entries: cfg.yield_entries.max(1),
            },
            rcu,
            backing: BackingRegistry::new(),
            subscribers: Subscribers::new(),
            inval_seq: AtomicU64::new(0),
            next_gather_id: StatU64::new(1),
            stats: Counters::default(),
            faults,
        }))
    }

    pub(crate) fn root(&self) -> &TablePage {
        // SAFETY: the root is allocated in new() and freed only with the table.
        unsafe { self.root.get() }
    }

    pub(crate) fn lock(&self) -> Locked<'_> {
        let g = lock(&self.lock);
        self.stats.lock_acq.fetch_add(1, RELAXED);
        let cpu_since = self.stats.cpu_lock_stats.load(RELAXED).then(thread_cpu_ns);
        Locked {
            t: self,
            _g: g,
            since: Instant::now(),
            cpu_since,
        }
    }

    /// Also time every lock hold in the holder's CPU time (two
    /// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)` calls per hold; off by
    /// default). Benchmarks turn it on to tell a long hold from a holder
    /// that was descheduled while holding the lock.
    pub fn set_cpu_lock_stats(&self, on: bool) {
        self.stats.cpu_lock_stats.store(on, RELAXED);
    }

    /// Register host memory that guest pages may be mapped to.
    pub fn register_backing(&self, region: BackingRegion) -> Result<BackingId, BackingError> {
        self.backing.register(region)
    }

    /// Subscribe to invalidations.
    pub fn register_subscriber(
        &self,
        s: std::sync::Arc<dyn InvalidationSubscriber>,
    ) -> Result<SubscriberId, SubscribeError> {
        self.subscribers.register(s)
    }

    /// Stop hearing about invalidations.
    pub fn unregister_subscriber(&self, id: SubscriberId) -> Result<(), SubscribeError> {
        self.subscribers.unregister(id)
    }

    /// Open a gather for unmaps (`tlb_gather_mmu`).
    pub fn gather(&self) -> Gather<'_> {
        Gather::new(self, false)
    }

    /// Open a gather for tearing the whole table down (`fullmm`).
    pub fn gather_full_mm(&self) -> Gather<'_> {
        Gather::new(self, true)
    }

    /// The invalidation sequence (`mmu_invalidate_seq`): read it before
    /// resolving a fault outside the lock, pass it to
    /// [`Stage2Table::fault_in_if_unchanged`].
    pub fn invalidate_seq(&self) -> u64 {
        self.inval_seq.load(Ordering::Acquire)
    }

    /// Threads blocked right now waiting for another gather's pending flush
    /// (`TableStats::pending_waiters` without the rest of the snapshot):
    /// lets a test wait for a thread to be really blocked instead of
    /// sleeping and hoping.
    pub fn pending_waiters(&self) -> u64 {
        self.stats.pending_waiters.load(RELAXED)
    }

    /// Grace periods completed so far (`TableStats::grace_periods`
    /// without the rest of the snapshot; takes no lock, so it may be called
    /// from a release hook or a subscriber).
    pub fn grace_periods(&self) -> u64 {
        self.rcu.grace_periods()
    }

    /// Bytes of table pages allocated now.
    pub fn table_bytes(&self) -> u64 {
        self.rcu.pool.in_use() as u64 * 4096
    }

    /// The `rcu_barrier` analogue: every table page unlinked so far is freed.
    pub fn rcu_barrier(&self) {
        self.rcu.barrier();
    }

    /// Whether teardown has started.
    pub fn is_dying(&self) -> bool {
        self.dying.load(Ordering::Acquire)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TableStats {
        let s = &self.stats;
        let b = &self.backing.counters;
        let l = |a: &StatU64| a.load(RELAXED);
        let hist: Vec<u64> = s.lock_hist.iter().map(l).collect();
        TableStats {
            lock_acquisitions: l(&s.lock_acq),
            lock_hold_max_ns: l(&s.lock_max_ns),
            lock_hold_hist: hist,
            lock_hold_cpu_max_ns: l(&s.lock_cpu_max_ns),
            lock_hold_cpu_hist: s.lock_cpu_hist.iter().map(l).collect(),
            table_pages: self.rcu.pool.in_use() as u64,
            table_pages_peak: self.rcu.pool.peak() as u64,
            tables_freed: self.rcu.pool.freed_total(),
            tables_retired_pending: self.rcu.retired_len() as u64,
            grace_periods: self.rcu.grace_periods(),
            sync_fallbacks: self.rcu.sync_fallbacks(),
            invalidations: l(&s.invalidations),
            flushes: l(&s.flushes),
            forced_flushes: l(&s.forced_flushes),
            fallback_batches: l(&s.fallback_batches),
            batch_allocs: l(&s.batch_allocs),
            pending_waits: l(&s.pending_waits),
            pending_waiters: l(&s.pending_waiters),
            release_calls: b.calls.load(Ordering::Relaxed),
            release_batched_calls: b.batched_calls.load(Ordering::Relaxed),
            release_batched_runs: b.batched_runs.load(Ordering::Relaxed),
            release_batch_fallbacks: b.batch_fallbacks.load(Ordering::Relaxed),
            released_bytes: b.bytes.load(Ordering::Relaxed),
            release_errors: b.errors.load(Ordering::Relaxed),
            release_outside_bytes: b.outside.load(Ordering::Relaxed),
            splits: l(&s.splits),
            faults_restored: l(&s.faults_restored),
            use_after_free: l(&s.use_after_free),
            partial_huge_pages: self.backing.partial_huge_pages() as u64,
            invalidate_seq: self.inval_seq.load(Ordering::Relaxed),
        }
    }

    /// Reset the lock-hold maximum and histogram (between benchmark phases).
    pub fn reset_lock_stats(&self) {
        self.stats.lock_max_ns.store(0, RELAXED);
        self.stats.lock_cpu_max_ns.store(0, RELAXED);
        for h in self.stats.lock_hist.iter().chain(&self.stats.lock_cpu_hist) {
            h.store(0, RELAXED);
        }
    }

    pub(crate) fn account_flush(&self, did_work: bool) {
        if did_work {
            self.stats.flushes.fetch_add(1, RELAXED);
        }
    }

    pub(crate) fn fold_gather_stats(&self, g: &GatherStats) {
        let s = &self.stats;
        s.forced_flushes.fetch_add(g.forced_flushes, RELAXED);
        s.fallback_batches.fetch_add(g.fallback_batches, RELAXED);
        s.batch_allocs.fetch_add(g.batch_allocs, RELAXED);
    }

    // ---- pending flushes (tlb_flush_pending) ----

    /// Register (or widen) gather `id`'s pending range. Table lock held.
    fn pending_add(&self, id: u64, start: u64, end: u64) {
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

    fn pending_overlaps(&self, start: u64, end: u64) -> bool {
        if broken(Rule::PendingWait) {
            return false;
        }
        lock(&self.pending)
            .list
            .iter()
            .any(|x| x.start < end && start < x.end)
    }

    /// Wait until every pending range overlapping `[start, end)` that was
    /// registered before this call, by a gather other than `me`, is done.
    /// Returns whether it waited.
    pub(crate) fn wait_pending(&self, start: u64, end: u64, me: u64) -> bool {
        if broken(Rule::PendingWait) {
            return false;
        }
        let mut p = lock(&self.pending);
        let snap = p.next_ticket;
        let mut waited = false;
        while p
            .list
            .iter()
            .any(|x| x.gather != me && x.ticket < snap && x.start < end && start < x.end)
        {
            if !waited {
                // Counted while the pending lock is held, so whoever sees
                // the gauge move knows we will block (or are blocked) until
                // the pending flush is done.
                self.stats.pending_waiters.fetch_add(1, RELAXED);
            }
            waited = true;
            p = wait(&self.pending_cv, p);
        }
        if waited {
            self.stats.pending_waiters.fetch_sub(1, RELAXED);
            self.stats.pending_waits.fetch_add(1, RELAXED);
        }
        waited
    }

    // ---- lockless lookups (callers are pinned) ----

    /// Walk to the entry for `gpa`. The caller must be inside a read
    /// section of this table's RCU domain, or hold the table lock.
    #[inline(always)]
    pub(crate) fn lookup(&self, gpa: u64) -> Lookup {
        let mut page = self.root();
        let mut level = LEVELS;
        loop {
            let e = Pte(page.entries[index(gpa, level)].load(Ordering::Acquire));
            if e.0 == POISON {
                self.stats.use_after_free.fetch_add(1, RELAXED);
                return Lookup::Poison;
            }
            if e.is_table(level) {
                // SAFETY: read from a linked entry inside the caller's read
                // section (or under the lock): the page stays allocated.
                page = unsafe { PagePtr::from_addr(e.addr()) };
                level -= 1;
                continue;
            }
            if e.is_present() {
                return Lookup::Leaf { pte: e, level };
            }
            if e.is_marker() {
                return Lookup::Marker { pte: e, level };
            }
            return Lookup::None;
        }
    }

    /// What the table says about the page at `gpa` right now.
    pub fn query(&self, gpa: Gpa) -> PageState {
        if gpa.0 >= ADDRESS_LIMIT {
            return PageState::Unmapped;
        }
        let mut r = self.rcu.register();
        let _g = r.pin(&self.rcu);
        state_of(self.lookup(gpa.0), gpa.0)
    }

    /// Visit every leaf, marker and hole covering `[start, end)` in order,
    /// pinned, until `f` returns false. Returns whether it ran to the end.
    fn scan(&self, start: u64, end: u64, f: &mut impl FnMut(u64, Lookup) -> bool) -> bool {
        let mut r = self.rcu.register();
        let _g = r.pin(&self.rcu);
        self.scan_page(self.root(), LEVELS, start, end, f)
    }

    fn scan_page(
        &self,
        page: &TablePage,
        level: u32,
        mut addr: u64,
        end: u64,
        f: &mut impl FnMut(u64, Lookup) -> bool,
    ) -> bool {
        let size = level_size(level);
        while addr < end {
            let ent_end = (addr & !(size - 1)) + size;
            let stop = ent_end.min(end);
            let e = Pte(page.entries[index(addr, level)].load(Ordering::Acquire));
            let ok = if e.0 == POISON {
                self.stats.use_after_free.fetch_add(1, RELAXED);
                f(addr, Lookup::Poison)
            } else if e.is_table(level) {
                // SAFETY: linked entry read inside our read section.
                let child = unsafe { PagePtr::from_addr(e.addr()) };
                self.scan_page(child, level - 1, addr, stop, f)
            } else if e.is_present() {
                f(addr, Lookup::Leaf { pte: e, level })
            } else if e.is_marker() {
                f(addr, Lookup::Marker { pte: e, level })
            } else {
                f(addr, Lookup::None)
            };
            if !ok {
                return false;
            }
            addr = stop;
        }
        true
    }

    /// The first page of `[start, end)` with no leaf or marker.
    fn first_hole(&self, start: u64, end: u64) -> Option<u64> {
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
    fn first_used(&self, start: u64, end: u64) -> Option<u64> {
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

    // ---- map ----

    /// Map `[gpa, gpa + len)` to `[hva, hva + len)` with `perms`, using the
    /// largest leaves up to `max_leaf` that alignment allows. The whole
    /// range must be unmapped and the host range registered backing. On
    /// error nothing stays mapped.
    pub fn map(
        &self,
        gpa: Gpa,
        hva: Hva,
        len: u64,
        perms: Perms,
        max_leaf: PageSize,
    ) -> Result<(), MapError> {
        let (start, end) = check_range(gpa, len)?;
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
            return Err(MapError::AlreadyMapped(Gpa(a)));
        }
        let max_level = max_leaf.level();
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
                match self.install(addr, hva.0 + (addr - start), end - addr, max_level, perms) {
                    Ok(size) => addr += size,
                    Err(e) => {
                        drop(l);
                        self.rollback(start, addr);
                        return Err(e);
                    }
                }
                budget -= 1;
            }
            drop(l);
            if addr >= end {
                break;
            }
        }
        self.backing.note_mapped(hva.0, len);
        Ok(())
    }

    /// Install one leaf at `addr`. Table lock held.
    fn install(
        &self,
        addr: u64,
        hva: u64,
        remaining: u64,
        max_level: u32,
        perms: Perms,
    ) -> Result<u64, MapError> {
        let mut page = self.root();
        let mut level = LEVELS;
        loop {
            let size = level_size(level);
            let slot = &page.entries[index(addr, level)];
            let e = Pte(slot.load(Ordering::Relaxed));
            let fits = level <= max_level
                && level < LEVELS
                && addr.is_multiple_of(size)
                && hva.is_multiple_of(size)
                && remaining >= size;
            if fits && e.is_none() {
                slot.store(Pte::leaf(hva, perms, level).0, Ordering::Release);
                return Ok(size);
            }
            if e.is_none() {
                let child = self
                    .rcu
                    .pool
                    .alloc(&self.faults.table_alloc)
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

    /// Undo a partial map of `[start, end)` without releasing backing.
    fn rollback(&self, start: u64, end: u64) {
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
            return Err(UnmapError::NotMapped(Gpa(hole)));
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
    fn check_writer(&self, g: &Gather<'_>, gpa: Gpa, len: u64) -> Result<(u64, u64), UnmapError> {
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
        start: u64,
        end: u64,
        mode: UnmapMode,
        register: bool,
    ) -> Result<(), UnmapError> {
        g.note_requested(start, end);
        let pending = register && !g.full_mm;
        self.visit_range(g, start, end, pending, &mut |slot, e, level, base, g| {
            zap_leaf(slot, e, level, base, g, mode)
        })
    }

    /// The writer loop shared by unmap, protect and deflate: take the lock,
    /// visit at most `yield_entries` entries of `[start, end)` with `f`,
    /// drop the lock, flush the gather if it filled, resume where it
    /// stopped. With `pending`, the gather's range is (re)registered as
    /// pending at every lock acquisition.
    fn visit_range<F>(
        &self,
        g: &mut Gather<'_>,
        start: u64,
        end: u64,
        pending: bool,
        f: &mut F,
    ) -> Result<(), UnmapError>
    where
        F: FnMut(&AtomicU64, Pte, u32, u64, &mut Gather<'_>),
    {
        let mut addr = start;
        while addr < end {
            let l = self.lock();
            if pending {
                self.pending_add(g.id, start, end);
            }
            let mut budget = self.cfg.yield_entries;
            let r = self.visit(self.root(), LEVELS, addr, end, g, &mut budget, f);
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
            return Err(UnmapError::NotMapped(Gpa(hole)));
        }
        self.visit_range(
            g,
            start,
            end,
            false,
            &mut |slot, e: Pte, level, base, g: &mut Gather<'_>| {
                if e.is_present() {
                    if e.perms() != perms {
                        slot.store(e.with_perms(perms).0, Ordering::Release);
                        if !perms.contains(e.perms()) {
                            g.note_invalidate(base, level_size(level), false);
                        }
                    }
                } else {
                    let m = Pte::marker(e.addr(), perms, level, e.markers());
                    slot.store(m.0, Ordering::Release);
                }
            },
        )
    }

    /// Tear the whole table down into a full-mm gather: every entry is
    /// cleared and its backing released at the flush; new maps, unmaps and
    /// faults fail with `Dying`. Then `finish` the gather and call
    /// [`Stage2Table::rcu_barrier`] to free the table pages.
    pub fn teardown(&self, g: &mut Gather<'_>) -> Result<(), UnmapError> {
        self.check_gather(g, true)?;
        self.dying.store(true, Ordering::Release);
        self.unmap_inner(g, 0, ADDRESS_LIMIT, UnmapMode::Remove, false)
    }

    /// Visit leaves and markers covering `[addr, end)` below `page`,
    /// splitting huge leaves that are only partly covered, freeing table
    /// pages that become empty. Stops when the budget is spent or the
    /// gather is full; returns the address reached, or `Err(addr)` if a
    /// split could not allocate. Table lock held.
    #[allow(clippy::too_many_arguments)]
    fn visit<F>(
        &self,
        page: &TablePage,
        level: u32,
        mut addr: u64,
        end: u64,
        g: &mut Gather<'_>,
        budget: &mut u32,
        f: &mut F,
    ) -> Result<u64, u64>
    where
        F: FnMut(&AtomicU64, Pte, u32, u64, &mut Gather<'_>),
    {
        let size = level_size(level);
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
                let reached = self.visit(child, level - 1, addr, stop, g, budget, f)?;
                if page_is_empty(child) {
                    // Unhook; the page is freed after a grace period.
                    slot.store(0, Ordering::Release);
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
                slot.store(Pte::table(child.addr()).0, Ordering::Release);
                continue;
            }
            f(slot, e, level, base, g);
            addr = stop;
        }
        Ok(end)
    }

    /// Build the sub-table equivalent to huge leaf (or marker) `e` at
    /// `level`, off-line. The caller swaps it in with one store.
    fn split(&self, e: Pte, level: u32, base: u64, g: &mut Gather<'_>) -> Option<PagePtr> {
        let child = self.rcu.pool.alloc(&self.faults.table_alloc)?;
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
            g.note_invalidate(base, level_size(level), false);
        }
        self.stats.splits.fetch_add(1, RELAXED);
        Some(child)
    }

    // ---- faults ----

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
            let (slot, e, level) = self.find_locked(a);
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
            if self.pending_overlaps(a, a + PAGE_SIZE) {
                drop(l);
                if seq.is_some() {
                    return Err(FaultError::Retry(gpa));
                }
                self.wait_pending(a, a + PAGE_SIZE, 0);
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
            self.stats.faults_restored.fetch_add(1, RELAXED);
            return Ok(FaultOutcome::Restored {
                leaf_gpa: Gpa(leaf_gpa),
                leaf_hva: Hva(e.addr()),
                size: ps,
            });
        }
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
            &mut |slot, e: Pte, level, _base, _g: &mut Gather<'_>| {
                if e.markers() & SW_BALLOONED != 0 {
                    let m = Pte::marker(e.addr(), e.saved_perms(), level, SW_DISCARDED);
                    slot.store(m.0, Ordering::Release);
                    pages += level_size(level) / PAGE_SIZE;
                }
            },
        )?;
        let _ = g.flush();
        Ok(pages)
    }

    /// The slot, entry and level for `a`. Table lock held.
    fn find_locked(&self, a: u64) -> (&AtomicU64, Pte, u32) {
        let mut page = self.root();
        let mut level = LEVELS;
        loop {
            let slot = &page.entries[index(a, level)];
            let e = Pte(slot.load(Ordering::Relaxed));
            if e.is_table(level) {
                // SAFETY: linked table page, table lock held.
                page = unsafe { PagePtr::from_addr(e.addr()) };
                level -= 1;
                continue;
            }
            return (slot, e, level);
        }
    }
}

fn zap_leaf(slot: &AtomicU64, e: Pte, level: u32, base: u64, g: &mut Gather<'_>, mode: UnmapMode) {
    let size = level_size(level);
    let present = e.is_present();
    let new = match mode {
        UnmapMode::Remove | UnmapMode::Detach => Pte::NONE,
        UnmapMode::Discard if present => Pte::marker(e.addr(), e.perms(), level, SW_DISCARDED),
        UnmapMode::Discard => return,
        UnmapMode::Balloon if present => Pte::marker(e.addr(), e.perms(), level, SW_BALLOONED),
        UnmapMode::Balloon if e.markers() & SW_BALLOONED != 0 => return,
        UnmapMode::Balloon => Pte::marker(e.addr(), e.saved_perms(), level, SW_BALLOONED),
    };
    slot.store(new.0, Ordering::Release);
    if present {
        let release = mode != UnmapMode::Detach;
        g.note_invalidate(base, size, release);
        if release {
            g.note_release(e.addr(), size);
        }
    }
}

pub(crate) fn state_of(l: Lookup, gpa: u64) -> PageState {
    let off = |level: u32| gpa & (level_size(level) - 1) & !(PAGE_SIZE - 1);
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
