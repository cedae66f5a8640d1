//! Table pages and their RCU-style reclamation.
//!
//! **Pages.** A [`TablePage`] is 4 KiB of `AtomicU64` entries. In production
//! they are carved from `mmap`ed chunks (so that the table costs exactly
//! 4 KiB per page of RSS, with no allocator headers) and freed pages are
//! filled with [`POISON`] and reused oldest-first, so a reader of freed
//! memory sees poison for as long as possible. Under `cfg(loom)` pages are
//! boxed and never reused.
//!
//! **Readers.** A lockless reader registers once ([`Rcu::register`]) and
//! then *pins* its slot around each read section: it stores the current
//! epoch in its slot and issues a *light* fence. A writer that unlinked
//! something calls [`Rcu::synchronize`]: a *heavy* fence, an epoch bump,
//! then it waits until every slot is idle or carries the new epoch. By
//! default both fences are SeqCst fences. With `GUEST_MM_MEMBARRIER=1`, where
//! the kernel offers `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, the
//! heavy fence is that system call and the light fence only a compiler
//! barrier (liburcu's "memb" flavour): cheaper pins, dearer grace periods.
//!
//! **Deferred freeing.** [`Rcu::retire`] hands unlinked table pages over
//! (the `call_rcu` analogue); they are freed at the end of the next grace
//! period that *starts* after the hand-over. If the list cannot grow, the
//! caller waits for a grace period itself and frees synchronously (the
//! kernel's `tlb_remove_table_one` fallback). [`Rcu::barrier`] is the
//! `rcu_barrier` analogue: it returns when everything retired before the
//! call has been freed.

use std::ptr::NonNull;

use crate::entry::{ENTRIES, POISON};
use crate::fault::FailPoint;
use crate::mutation::{broken, Rule};
use crate::sync::{backoff, fence, lock, AtomicU64, AtomicUsize, Mutex, Ordering};

/// One 4 KiB page of a stage-2 table.
#[repr(C, align(4096))]
pub struct TablePage {
    pub(crate) entries: [AtomicU64; ENTRIES],
}

/// A raw pointer to a table page that the table owns. Table pages are
/// shared between the locked writer and lockless readers; who may free
/// them, and when, is the subject of this module.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct PagePtr(pub(crate) NonNull<TablePage>);

// SAFETY: a PagePtr is an address; the page it names is only accessed
// through atomics, and freeing follows the RCU protocol of this module.
unsafe impl Send for PagePtr {}
// SAFETY: as above.
unsafe impl Sync for PagePtr {}

impl PagePtr {
    /// The page's address, as stored in a table entry.
    pub(crate) fn addr(self) -> u64 {
        self.0.as_ptr() as u64
    }
    /// # Safety
    /// `addr` must come from [`PagePtr::addr`] of a page that is still
    /// allocated: either the caller holds the table lock and the page is
    /// linked, or the caller is pinned and read the address from a linked
    /// entry inside the same read section.
    pub(crate) unsafe fn from_addr<'a>(addr: u64) -> &'a TablePage {
        // SAFETY: per the contract above the page is allocated for the
        // lifetime the caller picks (bounded by its lock or read section).
        unsafe { &*(addr as usize as *const TablePage) }
    }
    /// # Safety
    /// The page must still be allocated (see [`PagePtr::from_addr`]).
    pub(crate) unsafe fn get<'a>(self) -> &'a TablePage {
        // SAFETY: forwarded contract.
        unsafe { self.0.as_ref() }
    }
}

/// Allocates table pages.
pub(crate) struct PagePool {
    inner: Mutex<PoolInner>,
    in_use: AtomicUsize,
    peak: AtomicUsize,
    freed_total: AtomicU64,
}

struct PoolInner {
    #[cfg(not(loom))]
    chunks: Vec<(usize, usize)>,
    #[cfg(not(loom))]
    fresh: Option<(usize, usize)>,
    /// Poisoned pages, oldest first.
    free: std::collections::VecDeque<PagePtr>,
    #[cfg(loom)]
    all: Vec<PagePtr>,
}

/// Freed pages stay poisoned in the free list until this many are queued.
#[cfg(not(loom))]
const QUARANTINE: usize = 64;
#[cfg(not(loom))]
const CHUNK_PAGES: usize = 256;

impl PagePool {
    pub(crate) fn new() -> PagePool {
        PagePool {
            inner: Mutex::new(PoolInner {
                #[cfg(not(loom))]
                chunks: Vec::new(),
                #[cfg(not(loom))]
                fresh: None,
                free: std::collections::VecDeque::new(),
                #[cfg(loom)]
                all: Vec::new(),
            }),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            freed_total: AtomicU64::new(0),
        }
    }

    /// Pages currently part of some table (or awaiting their grace period).
    pub(crate) fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
    pub(crate) fn freed_total(&self) -> u64 {
        self.freed_total.load(Ordering::Relaxed)
    }

    /// A zeroed page, or `None` when memory is exhausted (or injected).
    pub(crate) fn alloc(&self, fail: &FailPoint) -> Option<PagePtr> {
        if fail.should_fail() {
            return None;
        }
        let page = self.alloc_raw()?;
        let n = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        Some(page)
    }

    #[cfg(not(loom))]
    fn alloc_raw(&self) -> Option<PagePtr> {
        let mut inner = lock(&self.inner);
        if inner.free.len() > QUARANTINE {
            if let Some(p) = inner.free.pop_front() {
                drop(inner);
                // SAFETY: the page is on the free list: allocated, unlinked,
                // past its grace period, and owned by nobody but us now.
                let page = unsafe { p.get() };
                for e in &page.entries {
                    e.store(0, Ordering::Relaxed);
                }
                return Some(p);
            }
        }
        let (next, end) = match inner.fresh {
            Some((next, end)) if next < end => (next, end),
            _ => {
                let bytes = CHUNK_PAGES * 4096;
                // SAFETY: anonymous private mapping with no address hint;
                // the result is checked against MAP_FAILED.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        bytes,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if addr == libc::MAP_FAILED {
                    return None;
                }
                // Table pages are touched one by one: keep THP from
                // charging 2 MiB for the first one. Failure only costs RSS.
                // SAFETY: the range was just mapped by us.
                unsafe { libc::madvise(addr, bytes, libc::MADV_NOHUGEPAGE) };
                let a = addr as usize;
                inner.chunks.push((a, bytes));
                (a, a + bytes)
            }
        };
        inner.fresh = Some((next + 4096, end));
        // Fresh anonymous memory reads as zero, which is a valid array of
        // zero atomics, and is 4096-aligned.
        NonNull::new(next as *mut TablePage).map(PagePtr)
    }

    #[cfg(loom)]
    fn alloc_raw(&self) -> Option<PagePtr> {
        let b = Box::new(TablePage {
            entries: std::array::from_fn(|_| AtomicU64::new(0)),
        });
        let p = PagePtr(NonNull::from(Box::leak(b)));
        lock(&self.inner).all.push(p);
        Some(p)
    }

    /// Poison and free `page`.
    ///
    /// # Safety
    /// The page must be unlinked from every table and a grace period must
    /// have elapsed since (no reader can still hold its address), and it
    /// must not be freed twice.
    pub(crate) unsafe fn free(&self, page: PagePtr) {
        // SAFETY: the page is still allocated (we are freeing it now) and
        // by the contract nobody else accesses it.
        let p = unsafe { page.get() };
        for e in &p.entries {
            e.store(POISON, Ordering::Relaxed);
        }
        lock(&self.inner).free.push_back(page);
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        self.freed_total.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for PagePool {
    fn drop(&mut self) {
        let inner = lock(&self.inner);
        #[cfg(not(loom))]
        for &(addr, bytes) in &inner.chunks {
            // SAFETY: every chunk was mapped by alloc_raw; the pool is being
            // dropped, so the table that used its pages is gone too.
            unsafe { libc::munmap(addr as *mut libc::c_void, bytes) };
        }
        #[cfg(loom)]
        for p in &inner.all {
            // SAFETY: boxed in alloc_raw and never freed before.
            drop(unsafe { Box::from_raw(p.0.as_ptr()) });
        }
    }
}

#[cfg(not(loom))]
mod membarrier {
    use std::sync::atomic::{AtomicU8, Ordering};

    const CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    /// 0 = not probed, 1 = usable, 2 = unavailable.
    static STATE: AtomicU8 = AtomicU8::new(0);

    /// Register this process for expedited private membarrier, once.
    pub(super) fn init() {
        if STATE.load(Ordering::Acquire) != 0 {
            return;
        }
        // Symmetric SeqCst fences are the default: measured with `gmm bench
        // walk`, membarrier's IPI on every grace period cost walkers ~38%
        // under an unmap storm on a 2-core VM, while a fence per pin (pins
        // amortised over a batch of translations) cost nothing measurable.
        // GUEST_MM_MEMBARRIER=1 opts in to the asymmetric scheme.
        let off = std::env::var_os("GUEST_MM_NO_MEMBARRIER").is_some()
            || std::env::var_os("GUEST_MM_MEMBARRIER").is_none_or(|v| v != "1");
        // SAFETY: membarrier takes two ints and touches no memory of ours.
        let ok = !off
            && unsafe { libc::syscall(libc::SYS_membarrier, CMD_REGISTER_PRIVATE_EXPEDITED, 0) }
                == 0;
        STATE.store(if ok { 1 } else { 2 }, Ordering::Release);
    }

    #[inline(always)]
    pub(super) fn asymmetric() -> bool {
        STATE.load(Ordering::Relaxed) == 1
    }

    /// A full memory barrier on every thread of this process.
    pub(super) fn heavy() -> bool {
        // SAFETY: as in init; registration succeeded, so the command is valid.
        unsafe { libc::syscall(libc::SYS_membarrier, CMD_PRIVATE_EXPEDITED, 0) == 0 }
    }
}

/// Whether readers pin with a compiler barrier only (membarrier in use).
pub fn asymmetric_fences() -> bool {
    #[cfg(not(loom))]
    {
        membarrier::init();
        membarrier::asymmetric()
    }
    #[cfg(loom)]
    false
}

#[inline(always)]
fn light_fence() {
    #[cfg(not(loom))]
    if membarrier::asymmetric() {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        return;
    }
    fence(Ordering::SeqCst);
}

fn heavy_fence() {
    #[cfg(not(loom))]
    if membarrier::asymmetric() && membarrier::heavy() {
        return;
    }
    fence(Ordering::SeqCst);
}

/// One reader's slot: 0 when idle, else the epoch it pinned at.
#[repr(align(64))]
pub(crate) struct ReaderSlot {
    state: AtomicU64,
    in_use: crate::sync::AtomicBool,
}

/// The reclamation domain of one table: readers, epochs, retired pages.
pub(crate) struct Rcu {
    epoch: AtomicU64,
    slots: Mutex<Vec<crate::sync::Arc<ReaderSlot>>>,
    retired: Mutex<Vec<PagePtr>>,
    grace_periods: AtomicU64,
    sync_fallbacks: AtomicU64,
    pub(crate) pool: PagePool,
}

/// A registered reader. Not `Sync`: one thread pins it at a time.
pub(crate) struct Reader {
    slot: crate::sync::Arc<ReaderSlot>,
    _not_sync: std::marker::PhantomData<std::cell::Cell<()>>,
}

/// A read section; table pages read inside it stay allocated until it ends.
pub(crate) struct ReadGuard<'r> {
    slot: &'r ReaderSlot,
}

impl Drop for ReadGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // Release: our reads of table pages happen-before a writer's
        // Acquire load that sees the slot idle, and so before its free.
        self.slot.state.store(0, Ordering::Release);
    }
}

impl Reader {
    /// Enter a read section.
    #[inline(always)]
    pub(crate) fn pin(&mut self, rcu: &Rcu) -> ReadGuard<'_> {
        let e = rcu.epoch.load(Ordering::Relaxed);
        self.slot.state.store(e, Ordering::Relaxed);
        light_fence();
        ReadGuard { slot: &self.slot }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.slot.state.store(0, Ordering::Release);
        self.slot.in_use.store(false, Ordering::Release);
    }
}

impl Rcu {
    pub(crate) fn new() -> Rcu {
        #[cfg(not(loom))]
        membarrier::init();
        Rcu {
            epoch: AtomicU64::new(1),
            slots: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            grace_periods: AtomicU64::new(0),
            sync_fallbacks: AtomicU64::new(0),
            pool: PagePool::new(),
        }
    }

    /// Register a reader (takes a lock; not for hot paths).
    pub(crate) fn register(&self) -> Reader {
        let mut slots = lock(&self.slots);
        let slot = match slots.iter().find(|s| {
            s.in_use
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        }) {
            Some(s) => s.clone(),
            None => {
                let s = crate::sync::Arc::new(ReaderSlot {
                    state: AtomicU64::new(0),
                    in_use: crate::sync::AtomicBool::new(true),
                });
                slots.push(s.clone());
                s
            }
        };
        Reader {
            slot,
            _not_sync: std::marker::PhantomData,
        }
    }

    /// Wait for a grace period: every read section that was running when
    /// this call started has ended. Frees what was retired before the call.
    pub(crate) fn synchronize(&self) {
        let stolen = std::mem::take(&mut *lock(&self.retired));
        // Everything this thread unlinked or cleared, and everything
        // retired above, is visible to all readers after this fence; a
        // reader whose pin is not yet visible to us will see it.
        heavy_fence();
        let target = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let slots = lock(&self.slots);
            for s in slots.iter() {
                let mut spins = 0;
                loop {
                    let v = s.state.load(Ordering::Acquire);
                    if v == 0 || v >= target {
                        break;
                    }
                    backoff(&mut spins);
                }
            }
        }
        self.grace_periods.fetch_add(1, Ordering::Relaxed);
        for p in stolen {
            // SAFETY: p was unlinked before it was retired, and the grace
            // period above started after it was retired.
            unsafe { self.pool.free(p) };
        }
    }

    /// Hand unlinked pages over for freeing after a grace period. If the
    /// deferred list cannot grow, wait for a grace period now and free them
    /// synchronously.
    ///
    /// # Safety
    /// Every page must already be unlinked from the table (no new reader
    /// can reach it), and must be handed over only once.
    pub(crate) unsafe fn retire(&self, pages: &[PagePtr], fail: &FailPoint) {
        if pages.is_empty() {
            return;
        }
        if broken(Rule::DeferredFree) {
            for &p in pages {
                // SAFETY: this is the bug the `DeferredFree` switch injects
                // (mutation builds only): the pages are unlinked (contract),
                // but a reader may still be inside one when it is poisoned.
                unsafe { self.pool.free(p) };
            }
            return;
        }
        {
            let mut r = lock(&self.retired);
            if !fail.should_fail() && r.try_reserve(pages.len()).is_ok() {
                r.extend_from_slice(pages);
                return;
            }
        }
        self.sync_fallbacks.fetch_add(1, Ordering::Relaxed);
        self.synchronize();
        for &p in pages {
            // SAFETY: unlinked before this call (contract), and a full
            // grace period started after that.
            unsafe { self.pool.free(p) };
        }
    }

    /// Pages waiting for a grace period.
    pub(crate) fn retired_len(&self) -> usize {
        lock(&self.retired).len()
    }

    /// The `rcu_barrier` analogue: everything retired before this call is freed.
    pub(crate) fn barrier(&self) {
        self.synchronize();
    }

    pub(crate) fn grace_periods(&self) -> u64 {
        self.grace_periods.load(Ordering::Relaxed)
    }
    pub(crate) fn sync_fallbacks(&self) -> u64 {
        self.sync_fallbacks.load(Ordering::Relaxed)
    }
}

impl Drop for Rcu {
    fn drop(&mut self) {
        let stolen = std::mem::take(&mut *lock(&self.retired));
        for p in stolen {
            // SAFETY: the domain is being dropped: no reader exists (readers
            // hold the table alive), and each page was unlinked when retired.
            unsafe { self.pool.free(p) };
        }
    }
}
