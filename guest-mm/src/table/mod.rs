//! The stage-2 table: a 4-level radix tree of 512-entry table pages that
//! maps guest-physical pages to host backing.
//!
//! **Invariants** (the crate's `docs/DESIGN.md` states them in full):
//!
//! 1. *Unhook → invalidate → free.* Writers clear entries under the table
//!    lock and record what they cleared in a [`Gather`]; invalidation,
//!    the grace period, the release of backing and the freeing of table
//!    pages happen in the gather's flush, with no table lock held, in
//!    that order.
//! 2. *Single-store changes.* Every entry changes with one atomic store: a
//!    reader sees either the old or the new entry, never a mix. A table
//!    page is published with a Release store after it is filled; a huge
//!    leaf that must be split is rebuilt as a full sub-table off-line and
//!    swapped in with one store.
//! 3. *Bounded lock holds.* A writer visits at most
//!    [`TableConfig::yield_entries`] entries per hold of the table lock,
//!    then drops it and resumes after the last address it finished.
//! 4. *Pending invalidations across lock drops* (`tlb_flush_pending`): an
//!    unmap that drops the lock with cleared entries not yet flushed keeps
//!    its range registered as pending; whoever the un-invalidated state
//!    could hurt waits for that flush instead.
//!
//! **Concurrency.** Writers (map, unmap, protect, fault-in, teardown)
//! serialise on the table lock; readers ([`crate::walk`], [`crate::view`])
//! take no lock and walk inside an RCU read section with Acquire loads;
//! table pages are freed only after they were unlinked and a grace period
//! passed ([`crate::reclaim`]). Lock order: table lock → pending-set lock
//! → page pool / backing registry locks. Flushes (subscribers, grace
//! periods, releases) run with none of them held, except that file and
//! hugetlb releases are made under the backing registry lock (it guards
//! their partial huge-page records).
//!
//! **Files**, one concept each: `error` (errors and the range check),
//! `stats` (counters and the timed table lock), `pending` (the
//! pending-flush registry), `lookup` (lockless lookups, [`PageState`]),
//! `writer_walk` (the locked walks: install, visit, split), `ops` (map,
//! unmap, protect, teardown, deflate) and `fault_in` (the fault path).

mod error;
mod fault_in;
mod fault_seq;
mod lookup;
mod ops;
mod pending;
mod stats;
mod writer_walk;

use std::sync::atomic::{AtomicU64 as StatU64, Ordering::Relaxed};

pub use error::{FaultError, MapError, NewTableError, RangeError, UnmapError};
pub use fault_in::FaultOutcome;
pub use fault_seq::FaultSnapshot;
pub(crate) use lookup::{state_of, Lookup};
pub use lookup::{Census, PageState};
pub use ops::UnmapMode;
use pending::{PendingRanges, PendingSet};
use stats::Counters;
pub use stats::TableStats;

use crate::addr::Gpa;
use crate::backing::{BackingError, BackingId, BackingRegion, BackingRegistry};
use crate::entry::{level_size, ADDRESS_LIMIT};
use crate::fault::FaultInjection;
use crate::gather::Gather;
use crate::notify::{InvalidationSubscriber, SubscribeError, SubscriberId, Subscribers};
use crate::reclaim::{LeafArena, PagePtr, Rcu, TablePage};
use crate::sync::{AtomicBool, AtomicU64, Condvar, Mutex, Ordering};

/// Tunables of a table.
#[derive(Clone, Debug)]
pub struct TableConfig {
    /// Entries a writer may visit before it drops and retakes the table lock.
    pub yield_entries: u32,
    /// One past the highest guest-physical address the table may map
    /// (rounded up to 1 GiB; default and maximum [`ADDRESS_LIMIT`]): a map
    /// past it is refused with [`RangeError::OutOfRange`]. It sizes the
    /// leaf arena's reservation of address space, 1/512 of it: 512 GiB
    /// (never memory) at the default, which counts against an
    /// address-space limit (`ulimit -v`); a VMM sets its guest's top.
    pub guest_address_limit: u64,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            yield_entries: 2048,
            guest_address_limit: ADDRESS_LIMIT,
        }
    }
}

impl TableConfig {
    /// The default configuration for guest addresses below `limit`.
    pub fn with_limit(limit: u64) -> TableConfig {
        TableConfig {
            guest_address_limit: limit,
            ..TableConfig::default()
        }
    }
}

/// The stage-2 table of one guest.
pub struct Stage2Table {
    root: PagePtr,
    /// Where the leaf table pages live (`reclaim::arena`).
    pub(crate) arena: LeafArena,
    lock: Mutex<()>,
    pending: Mutex<PendingSet>,
    pending_ranges: PendingRanges,
    pending_cv: Condvar,
    dying: AtomicBool,
    cfg: TableConfig,
    pub(crate) rcu: Rcu,
    pub(crate) backing: BackingRegistry,
    pub(crate) subscribers: Subscribers,
    /// Bumped by every invalidation; translation caches compare against it.
    pub(crate) inval_seq: AtomicU64,
    /// Bumped per window by every invalidation; fault commits compare
    /// against it (see `fault_seq.rs`).
    pub(crate) fault_seqs: fault_seq::FaultSeqs,
    pub(crate) next_gather_id: StatU64,
    pub(crate) stats: Counters,
    /// Injectable failures, for tests of every fallback path.
    pub faults: FaultInjection,
}

impl Stage2Table {
    /// A new, empty table for guest addresses below
    /// `cfg.guest_address_limit`.
    pub fn new(cfg: TableConfig) -> Result<crate::sync::Arc<Stage2Table>, NewTableError> {
        let lim = cfg.guest_address_limit;
        if lim == 0 || lim > ADDRESS_LIMIT {
            return Err(NewTableError::BadLimit(lim));
        }
        let limit = lim.next_multiple_of(level_size(3)).min(ADDRESS_LIMIT);
        let rcu = Rcu::new();
        let faults = FaultInjection::default();
        let arena = LeafArena::new(limit).map_err(|source| NewTableError::Reserve {
            bytes: LeafArena::reservation(limit),
            limit,
            source,
        })?;
        let root = rcu
            .pool
            .alloc(&faults.table_alloc)
            .ok_or(NewTableError::OutOfMemory)?;
        Ok(crate::sync::Arc::new(Stage2Table {
            root,
            arena,
            lock: Mutex::new(()),
            pending: Mutex::new(PendingSet::default()),
            pending_ranges: PendingRanges::default(),
            pending_cv: Condvar::new(),
            dying: AtomicBool::new(false),
            cfg: TableConfig {
                yield_entries: cfg.yield_entries.max(1),
                guest_address_limit: limit,
            },
            rcu,
            backing: BackingRegistry::new(),
            subscribers: Subscribers::new(),
            inval_seq: AtomicU64::new(0),
            fault_seqs: fault_seq::FaultSeqs::default(),
            next_gather_id: StatU64::new(1),
            stats: Counters::default(),
            faults,
        }))
    }

    pub(crate) fn root(&self) -> &TablePage {
        // SAFETY: the root is allocated in new() and freed only with the table.
        unsafe { self.root.get() }
    }
    /// One past the highest guest-physical address this table maps: the
    /// configured limit rounded up to 1 GiB.
    pub fn guest_address_limit(&self) -> u64 {
        self.cfg.guest_address_limit
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

    /// The invalidation sequence: bumped by every invalidation anywhere in
    /// the table.
    pub fn invalidate_seq(&self) -> u64 {
        self.inval_seq.load(Ordering::Acquire)
    }

    /// What a fault handler reads before it resolves `[gpa, gpa + len)`
    /// outside the lock (`mmu_invalidate_seq`, per range): pass it to
    /// [`Stage2Table::fault_in_if_unchanged`] or
    /// [`Stage2Table::fault_in_range_if_unchanged`], which fail with
    /// `Retry` if an invalidation touched the range since.
    pub fn fault_seq(&self, gpa: Gpa, len: u64) -> FaultSnapshot {
        let start = gpa.0.min(ADDRESS_LIMIT - 1);
        let end = start.saturating_add(len.max(1)).min(ADDRESS_LIMIT);
        // The global count, for a commit outside the range.
        let global = self.inval_seq.load(Ordering::Acquire);
        FaultSnapshot {
            value: self.fault_seqs.value(start, end),
            global,
            start,
            end,
        }
    }

    /// Threads blocked right now waiting for another gather's pending flush
    /// (`TableStats::pending_waiters` without the rest of the snapshot):
    /// lets a test wait for a thread to be really blocked instead of
    /// sleeping and hoping.
    pub fn pending_waiters(&self) -> u64 {
        self.stats.pending_waiters.load(Relaxed)
    }

    /// Grace periods completed so far (`TableStats::grace_periods`
    /// without the rest of the snapshot; takes no lock, so it may be called
    /// from a release hook or a subscriber).
    pub fn grace_periods(&self) -> u64 {
        self.rcu.grace_periods()
    }

    /// Host ranges whose release failed every attempt and that are still
    /// allocated, sorted (see [`crate::backing`]): no entry maps them, and
    /// the teardown's flush releases them again.
    pub fn unreleased(&self) -> Vec<(crate::addr::Hva, u64)> {
        self.backing.unreleased()
    }

    /// Bytes of table pages in use now (`TableStats::table_pages`).
    pub fn table_bytes(&self) -> u64 {
        (self.rcu.pool.in_use() as u64 + self.arena.in_use()) * 4096
    }

    /// The `rcu_barrier` analogue: every table page unlinked so far is freed.
    pub fn rcu_barrier(&self) {
        self.rcu.barrier();
    }

    /// Whether teardown has started.
    pub fn is_dying(&self) -> bool {
        self.dying.load(Ordering::Acquire)
    }
}
