//! The page pool: where table pages come from and where freed ones wait.
//!
//! A [`TablePage`] is 4 KiB of `AtomicU64` entries. In production pages are
//! carved from `mmap`ed chunks (so that the table costs exactly 4 KiB of
//! RSS per page, with no allocator headers); under `cfg(loom)` they are
//! boxed and never reused.
//!
//! **Invariants.** A freed page is filled with [`POISON`] before it joins
//! the free list, and free pages are reused oldest-first, only once more
//! than a quarantine of them is queued: a reader of freed memory sees
//! poison for as long as possible, which walks count as use-after-free. A
//! page is zeroed again when it is handed out.
//!
//! **Concurrency.** The pool's lock guards the chunk and free lists and is
//! taken by allocation (under the table lock) and by freeing (after a
//! grace period); the page counts are relaxed atomics. Who may free a page,
//! and when, is the RCU domain's business ([`super::rcu`]): the pool's
//! `free` is `unsafe` with that contract.
//!
//! **Process-wide gauge.** [`live_table_pages`] counts the table pages of
//! every pool of the process that are in use now (linked, or awaiting
//! their grace period): a page counts from its allocation until it is
//! freed, or until its pool is dropped with it still in use (the chunk
//! goes with the pool). It is a `std` relaxed atomic, not the
//! [`crate::sync`] shim (no decision depends on it, as for the table's
//! statistics), and is exact whenever no table allocates or frees
//! concurrently: `gmm soak` reads it between VMs to catch tables and
//! table pages that outlive their VM.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64 as GaugeU64, Ordering::Relaxed as GaugeOrder};

use crate::entry::{ENTRIES, POISON};
use crate::fault::FailPoint;
use crate::sync::{lock, AtomicU64, AtomicUsize, Mutex, Ordering};

/// Table pages in use in all pools of the process (see the module doc).
static LIVE_TABLE_PAGES: GaugeU64 = GaugeU64::new(0);

/// Table pages in use now in every table (page pool) of this process:
/// linked into a table, or unlinked and awaiting their grace period. Pages
/// freed back to a pool's free list, or gone with their pool, do not
/// count. Exact when no table allocates or frees meanwhile (relaxed
/// loads and updates).
pub fn live_table_pages() -> u64 {
    LIVE_TABLE_PAGES.load(GaugeOrder)
}

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
        LIVE_TABLE_PAGES.fetch_add(1, GaugeOrder);
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
        LIVE_TABLE_PAGES.fetch_sub(1, GaugeOrder);
    }
}

/// Attempts at unmapping one pool chunk before it is kept as leaked.
#[cfg(not(loom))]
const MUNMAP_ATTEMPTS: u32 = 3;

/// Pool chunks whose `munmap` failed when their table was dropped: still
/// mapped (and so still counted in the process's RSS), kept here so that
/// they are accounted ([`leaked_table_bytes`]) and unmapped again
/// ([`retry_leaked_table_chunks`]). Addresses, as `(start, bytes)`.
#[cfg(not(loom))]
static LEAKED: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// `munmap` of one whole chunk, retried; the errno of the last failure.
#[cfg(not(loom))]
fn unmap_chunk(addr: usize, bytes: usize) -> Result<(), i32> {
    let mut errno = 0;
    for _ in 0..MUNMAP_ATTEMPTS {
        if crate::fault::POOL_MUNMAP.should_fail() {
            errno = crate::fault::INJECTED_ERRNO;
            continue;
        }
        // SAFETY: the chunk was mapped by alloc_raw and nothing uses it
        // any more: its pool was dropped (so was the table that used its
        // pages), or it is on the leaked list, which only this unmaps.
        if unsafe { libc::munmap(addr as *mut libc::c_void, bytes) } == 0 {
            return Ok(());
        }
        errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    }
    Err(errno)
}

/// Count `n` more table pages in use in [`live_table_pages`] (pages that
/// come from elsewhere than a pool: the leaf arena).
pub(super) fn gauge_add(n: u64) {
    LIVE_TABLE_PAGES.fetch_add(n, GaugeOrder);
}

/// Count `n` fewer table pages in use in [`live_table_pages`].
pub(super) fn gauge_sub(n: u64) {
    LIVE_TABLE_PAGES.fetch_sub(n, GaugeOrder);
}

/// `munmap` of a reservation that is not a pool chunk (no injected
/// failure); on failure it joins the leaked chunks, to be unmapped again
/// by [`retry_leaked_table_chunks`].
#[cfg(not(loom))]
pub(super) fn unmap_or_leak(addr: usize, bytes: usize) {
    for _ in 0..MUNMAP_ATTEMPTS {
        // SAFETY: the caller owns the mapping and nothing uses it any more.
        if unsafe { libc::munmap(addr as *mut libc::c_void, bytes) } == 0 {
            return;
        }
    }
    lock(&LEAKED).push((addr, bytes));
}

/// Bytes of table-page chunks that dropped tables could not unmap (a
/// failed `munmap`, retried `MUNMAP_ATTEMPTS` times): still mapped and
/// counted, see [`retry_leaked_table_chunks`]. Process wide.
#[cfg(not(loom))]
pub fn leaked_table_bytes() -> u64 {
    lock(&LEAKED).iter().map(|&(_, b)| b as u64).sum()
}

/// The chunks dropped tables could not unmap, as `(address, bytes)`.
#[cfg(not(loom))]
pub fn leaked_table_chunks() -> Vec<(u64, u64)> {
    lock(&LEAKED)
        .iter()
        .map(|&(a, b)| (a as u64, b as u64))
        .collect()
}

/// Unmaps again the chunks dropped tables could not unmap; returns the
/// bytes still leaked afterwards (0 once every chunk is gone).
#[cfg(not(loom))]
pub fn retry_leaked_table_chunks() -> u64 {
    let mut leaked = lock(&LEAKED);
    leaked.retain(|&(a, b)| unmap_chunk(a, b).is_err());
    leaked.iter().map(|&(_, b)| b as u64).sum()
}

impl Drop for PagePool {
    fn drop(&mut self) {
        // Pages still in use (a table dropped with its root, or with
        // pages never freed) go with their chunks.
        LIVE_TABLE_PAGES.fetch_sub(self.in_use() as u64, GaugeOrder);
        let inner = lock(&self.inner);
        #[cfg(not(loom))]
        for &(addr, bytes) in &inner.chunks {
            if unmap_chunk(addr, bytes).is_err() {
                // Still mapped: keep it accounted, to be unmapped again.
                lock(&LEAKED).push((addr, bytes));
            }
        }
        #[cfg(loom)]
        for p in &inner.all {
            // SAFETY: boxed in alloc_raw and never freed before.
            drop(unsafe { Box::from_raw(p.0.as_ptr()) });
        }
    }
}
