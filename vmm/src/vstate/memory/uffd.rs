//! Demand faults: a userfaultfd handler thread for released guest RAM.
//!
//! Only ranges whose backing is about to be released are registered
//! (missing mode, [`FaultHandler::arm`], called by the memory owner's
//! release before its gather), so memory that was never released keeps its
//! transparent huge pages and never pays for a user-space fault. When the
//! guest (through KVM) or the VMM touches a released page, the kernel
//! queues a fault message; the handler thread resolves it with a zero page
//! (`UFFDIO_ZEROPAGE`, or `UFFDIO_COPY` from a zero buffer for hugetlb,
//! which has no zero-page ioctl), counts it and records its latency. The
//! ioctls and messages come from the `userfaultfd` crate.
//!
//! guest_memfd has no handler: the kernel refuses to register its mappings
//! ([`super::Backing::has_demand_faults`]).
//!
//! Concurrency: arming and resolutions are serialised by one lock (arming
//! holds it exclusively, a resolution shared), so a resolution never
//! interleaves with a registration. The release itself (the gather) runs
//! without it. On top of that a [`FaultHook`] (the stage-2 table) sees
//! every resolution as begin → install (without waking the faulting
//! thread) → commit; if commit says an unmap raced, the installed page is
//! dropped again (`Shared::undo`) and the fault is retried, so a fault
//! never resurrects a page an in-flight unmap released.
//!
//! Granularity: a fault installs the whole leaf the mirror holds around the
//! faulting address ([`FaultHook::fault_granule`]: 4 KiB or 2 MiB, aligned in
//! guest physical space, never more than the backing's page size; hugetlb
//! always a whole huge page); if that fails part-way it falls back to the
//! faulting 4 KiB page, so every fault makes progress.
//! Counters are updated before the faulting thread is woken.
//!
//! **Failed calls** (injectable, [`super::MemoryFaults`]): a fault is never
//! lost and a page is never committed that is not there. A failed
//! `UFFDIO_ZEROPAGE` is replaced by a `UFFDIO_COPY` of zeros; a fill that
//! still fails installs and commits nothing (the table keeps its marker)
//! and wakes the thread, which faults again and is resolved anew; a failed
//! `UFFDIO_WAKE` is retried, then kept and retried by the handler loop
//! every [`WAKE_RETRY_MS`] ms until it succeeds; a failed
//! `UFFDIO_REGISTER` is retried, then fails the arming, and with it the
//! release, before anything was released.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{Event, FeatureFlags, Uffd, UffdBuilder};
use vmm_sys_util::eventfd::EventFd;

use super::backing::{Backing, RegionDesc, SIZE_2M, SIZE_4K};
use super::faults::{MemoryFaults, SYSCALL_ATTEMPTS};

/// How often the handler retries a wake-up that failed, ms.
pub const WAKE_RETRY_MS: i32 = 5;

/// Errors of the fault handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// userfaultfd(2) or UFFDIO_API failed.
    #[error(
        "creating the userfaultfd failed ({0}); run as root, or allow it with \
         `sysctl vm.unprivileged_userfaultfd=1`; shmem and hugetlb backings also need \
         the kernel's MISSING_SHMEM / MISSING_HUGETLBFS features"
    )]
    Create(userfaultfd::Error),
    /// UFFDIO_REGISTER failed (every attempt); nothing was released.
    #[error(
        "registering [{0:#x}, +{1:#x}) with userfaultfd failed: {2}; nothing was released, \
         retry the release"
    )]
    Register(u64, u64, std::io::Error),
    /// The backing has no userfaultfd support.
    #[error("{0} backing has no userfaultfd support")]
    Unsupported(Backing),
    /// eventfd / thread creation failed.
    #[error("starting the fault handler failed: {0}")]
    Start(std::io::Error),
}

/// The stage-2 table's view of demand faults. Default methods do nothing.
///
/// The handler calls, for each resolution of `[gpa, gpa+len)`:
/// `fault_begin` (returns a sequence token), installs the page without
/// waking the faulting thread, then `fault_commit`. Returning `false` from
/// commit means an unmap of the range raced with the fault: the handler
/// discards what it installed and starts again from `fault_begin`.
pub trait FaultHook: Send + Sync {
    /// How much to install for a fault on the 4 KiB page at `gpa`: `max`
    /// (the backing's page size) unless the mirror holds smaller leaves
    /// there. Installing past a leaf would populate neighbours the guest
    /// has given away (ballooned pages a 2 MiB fill would bring back).
    fn fault_granule(&self, _gpa: u64, max: u64) -> u64 {
        max
    }
    /// Before installing backing for `[gpa, gpa+len)`.
    fn fault_begin(&self, _gpa: u64, _len: u64) -> u64 {
        0
    }
    /// After installing; `true` marks the range present and wakes the guest.
    fn fault_commit(&self, _gpa: u64, _len: u64, _seq: u64) -> bool {
        true
    }
}

/// The hook used when nothing mirrors guest RAM.
#[derive(Debug, Default)]
pub struct NoHook;
impl FaultHook for NoHook {}

/// Counters of demand faults and releases.
#[derive(Debug, Default)]
pub struct FaultStats {
    /// Faults resolved.
    pub faults: AtomicU64,
    /// Bytes installed (a fault that found its page already present
    /// installs none).
    pub bytes: AtomicU64,
    /// Commits refused by the hook (retries).
    pub retries: AtomicU64,
    /// Sum of resolution latencies (message read to wake), ns.
    pub latency_ns_total: AtomicU64,
    /// Largest resolution latency, ns.
    pub latency_ns_max: AtomicU64,
    /// Releases (calls of the memory owner's release entry point).
    pub releases: AtomicU64,
    /// Installs that failed for another reason than "already present".
    pub errors: AtomicU64,
    /// Zero-page fills that failed and were copied in instead.
    pub fill_fallbacks: AtomicU64,
    /// Wake-ups that failed and were tried again.
    pub wake_retries: AtomicU64,
}

/// A snapshot of [`FaultStats`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct FaultSummary {
    /// Faults resolved.
    pub faults: u64,
    /// Bytes installed.
    pub bytes: u64,
    /// Hook-refused commits.
    pub retries: u64,
    /// Mean latency, µs.
    pub mean_latency_us: f64,
    /// Max latency, µs.
    pub max_latency_us: f64,
    /// Releases.
    pub releases: u64,
    /// Failed installs (should stay 0).
    pub errors: u64,
    /// Zero-page fills replaced by a copy of zeros.
    pub fill_fallbacks: u64,
    /// Failed wake-ups retried.
    pub wake_retries: u64,
}

impl FaultStats {
    /// A consistent-enough snapshot.
    pub fn summary(&self) -> FaultSummary {
        let faults = self.faults.load(Ordering::Acquire);
        let total = self.latency_ns_total.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        let mean = if faults == 0 {
            0.0
        } else {
            total as f64 / faults as f64 / 1e3
        };
        #[allow(clippy::cast_precision_loss)]
        let max = self.latency_ns_max.load(Ordering::Relaxed) as f64 / 1e3;
        FaultSummary {
            faults,
            bytes: self.bytes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            mean_latency_us: mean,
            max_latency_us: max,
            releases: self.releases.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            fill_fallbacks: self.fill_fallbacks.load(Ordering::Relaxed),
            wake_retries: self.wake_retries.load(Ordering::Relaxed),
        }
    }
}

/// State shared by the handler thread and the arming side.
struct Shared {
    uffd: Uffd,
    regions: Vec<RegionDesc>,
    /// Exclusive for arming, shared for resolution.
    lock: RwLock<()>,
    /// Host ranges already registered, as sorted, disjoint `[start, end)`
    /// with touching ranges merged: bounded by guest RAM, however many
    /// releases overlap.
    registered: Mutex<Vec<(u64, u64)>>,
    stats: Arc<FaultStats>,
    hook: Arc<dyn FaultHook>,
    zero_buf: ZeroBuf,
    inject: Arc<MemoryFaults>,
}

/// What [`Shared::install`] did.
#[derive(Clone, Copy, Debug)]
enum Install {
    /// Zeros installed at `[host, host + len)`.
    Done(u64, u64),
    /// Nothing installed: the page was there already.
    Present,
    /// Nothing installed and nothing there: the fill failed.
    Failed,
}

/// A 2 MiB zero source for UFFDIO_COPY (hugetlb, and the fallback of a
/// failed UFFDIO_ZEROPAGE).
struct ZeroBuf(usize);
impl Drop for ZeroBuf {
    fn drop(&mut self) {
        // SAFETY: self.0 is a 2 MiB anonymous mapping owned by this value.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, SIZE_2M as usize) };
    }
}

/// The userfaultfd fault handler of one VM's RAM.
pub struct FaultHandler {
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHandler")
            .field("stats", &self.shared.stats.summary())
            .finish()
    }
}

/// The errno of a failed fill (`UFFDIO_ZEROPAGE` / `UFFDIO_COPY`).
fn errno_of(e: &userfaultfd::Error) -> i32 {
    match e {
        userfaultfd::Error::ZeropageFailed(e)
        | userfaultfd::Error::CopyFailed(e)
        | userfaultfd::Error::SystemError(e) => *e as i32,
        userfaultfd::Error::PartiallyCopied(_) => libc::EAGAIN,
        _ => libc::EIO,
    }
}

impl FaultHandler {
    /// Creates the userfaultfd for `regions` (all of one backing) and
    /// starts the handler thread. Counters go to `stats`.
    pub fn start(
        regions: Vec<RegionDesc>,
        hook: Arc<dyn FaultHook>,
        stats: Arc<FaultStats>,
        inject: Arc<MemoryFaults>,
    ) -> Result<Self, UffdError> {
        let backing = regions.first().map_or(Backing::Anon, |r| r.backing);
        let features = match backing {
            Backing::Anon => FeatureFlags::empty(),
            Backing::Memfd => FeatureFlags::MISSING_SHMEM,
            Backing::Hugetlb => FeatureFlags::MISSING_HUGETLBFS,
            Backing::GuestMemfd => return Err(UffdError::Unsupported(backing)),
        };
        // Not user-mode only: KVM's own accesses to guest RAM (get_user_pages
        // from the vCPU threads) are kernel-mode faults and must be caught.
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(features)
            .create()
            .map_err(UffdError::Create)?;
        let stop = EventFd::new(libc::EFD_CLOEXEC).map_err(UffdError::Start)?;
        // Never written: reads as zeros, costs address space only.
        // SAFETY: fresh anonymous mapping, not touching existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE_2M as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(UffdError::Start(std::io::Error::last_os_error()));
        }
        let zero_buf = ZeroBuf(p as usize);
        let shared = Arc::new(Shared {
            uffd,
            regions,
            lock: RwLock::new(()),
            registered: Mutex::new(Vec::new()),
            stats,
            hook,
            zero_buf,
            inject,
        });
        let s2 = Arc::clone(&shared);
        let stop_raw = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || s2.run(stop_raw))
            .map_err(UffdError::Start)?;
        Ok(Self {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Arms demand faults on the guest ranges `windows` (the parts inside
    /// guest RAM): a touch after their backing is released faults into the
    /// handler. Ranges already armed are skipped. Exclusive against
    /// resolutions only while registering; the caller's release (a gather,
    /// which waits for a grace period) runs without the lock: a fast-walk
    /// reader pinned in that grace period may be the one faulting, and the
    /// table's sequence protocol already keeps a fault from resurrecting a
    /// page being released.
    pub fn arm(&self, windows: &[(u64, u64)]) -> Result<(), UffdError> {
        let _w = self.shared.lock.write().unwrap_or_else(|e| e.into_inner());
        let mut reg = self
            .shared
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for &(gpa, len) in windows {
            // The part of the window in each region (a window that merged
            // across touching regions is registered per region).
            for d in &self.shared.regions {
                let start = gpa.max(d.gpa.0);
                let end = (gpa + len).min(d.gpa.0 + d.len);
                if start >= end {
                    continue;
                }
                let host = d.host_of(start) as u64;
                let n = end - start;
                if covered(&reg, host, host + n) {
                    continue;
                }
                self.shared
                    .register(host, n)
                    .map_err(|e| UffdError::Register(start, n, e))?;
                insert(&mut reg, host, host + n);
            }
        }
        Ok(())
    }

    /// Stops the handler thread (also on drop).
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `[start, end)` lies inside one range of `reg` (sorted, disjoint,
/// touching ranges merged, as [`insert`] keeps it).
fn covered(reg: &[(u64, u64)], start: u64, end: u64) -> bool {
    // Only the first range that ends at or after `end` can hold it.
    let i = reg.partition_point(|&(_, e)| e < end);
    reg.get(i).is_some_and(|&(s, _)| s <= start)
}

/// Adds `[start, end)` to `reg`, merging it with every range it overlaps
/// or touches.
fn insert(reg: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let i = reg.partition_point(|&(_, e)| e < start);
    let j = i + reg[i..].iter().take_while(|&&(s, _)| s <= end).count();
    let (s, e) = reg[i..j]
        .iter()
        .fold((start, end), |(s, e), &(rs, re)| (s.min(rs), e.max(re)));
    reg.splice(i..j, [(s, e)]);
}

/// Whether the 4 KiB page at host address `page` is resident.
fn resident(page: u64) -> bool {
    let mut v = 0u8;
    // SAFETY: mincore reads page-table state of one page we own (guest RAM)
    // and writes one byte into `v`.
    let r = unsafe { libc::mincore(page as *mut libc::c_void, SIZE_4K as usize, &mut v) };
    r == 0 && v & 1 == 1
}

impl Shared {
    fn run(&self, stop_fd: i32) {
        crate::seccomp::install(crate::seccomp::ThreadKind::Uffd);
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Wake-ups that failed every attempt: retried from here until they
        // succeed (empty, and allocating nothing, unless one failed).
        let mut wakes: Vec<(u64, u64)> = Vec::new();
        loop {
            let timeout = if wakes.is_empty() { -1 } else { WAKE_RETRY_MS };
            // SAFETY: fds is a live array of two pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            wakes.retain(|&(h, l)| !self.wake(h, l));
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & libc::POLLIN == 0 {
                continue;
            }
            // None: another wake-up raced us (EAGAIN).
            if let Ok(Some(Event::Pagefault { addr, .. })) = self.uffd.read_event() {
                if let Some(w) = self.resolve(addr as u64, Instant::now()) {
                    wakes.push(w);
                }
            }
        }
    }

    /// `UFFDIO_REGISTER` of `[host, host + len)`, tried
    /// [`SYSCALL_ATTEMPTS`] times (registering a range again is harmless).
    fn register(&self, host: u64, len: u64) -> Result<(), std::io::Error> {
        let mut err = None;
        for _ in 0..SYSCALL_ATTEMPTS {
            let r = if self.inject.uffd_register.should_fail() {
                Err(std::io::Error::from_raw_os_error(
                    guest_mm::fault::INJECTED_ERRNO,
                ))
            } else {
                self.uffd
                    .register(host as *mut libc::c_void, super::backing::to_usize(len))
                    .map(|_| ())
                    .map_err(|e| match e {
                        userfaultfd::Error::SystemError(e) => {
                            std::io::Error::from_raw_os_error(e as i32)
                        }
                        e => std::io::Error::other(e),
                    })
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) => err = Some(e),
            }
        }
        Err(err.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EIO)))
    }

    /// `UFFDIO_WAKE` of `[host, host + len)`, tried [`SYSCALL_ATTEMPTS`]
    /// times; `false` if every attempt failed (the caller keeps it).
    fn wake(&self, host: u64, len: u64) -> bool {
        for _ in 0..SYSCALL_ATTEMPTS {
            if !self.inject.uffd_wake.should_fail()
                && self
                    .uffd
                    .wake(host as *mut libc::c_void, super::backing::to_usize(len))
                    .is_ok()
            {
                return true;
            }
            self.stats.wake_retries.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// Resolves the fault at host address `addr` (message read at `t0`).
    /// Counters are updated before the faulting thread is woken, so it sees
    /// its own fault counted. Returns the range to wake if waking it
    /// failed (the caller retries it).
    fn resolve(&self, addr: u64, t0: Instant) -> Option<(u64, u64)> {
        let d = self
            .regions
            .iter()
            .find(|d| addr >= d.host_addr as u64 && addr - (d.host_addr as u64) < d.len)?;
        let page_gpa = d.gpa.0 + ((addr - d.host_addr as u64) & !(SIZE_4K - 1));
        let _r = self.lock.read().unwrap_or_else(|e| e.into_inner());
        let max = d.page_size.bytes();
        let (host, granule, installed) = loop {
            // The leaf size the mirror has here, asked again on every
            // attempt: a split between the query and the commit moves the
            // invalidation sequence, so the commit fails and we come back.
            // Leaves are aligned in guest physical space (the mapping is
            // also 2 MiB-aligned on the host, see GuestRam::new).
            // hugetlb can only be filled a whole huge page at a time (and
            // releases only whole ones, so none of it was given away); a
            // 4 KiB region has nothing smaller to ask the mirror about.
            let mut granule = match d.backing {
                Backing::Hugetlb => max,
                _ if max == SIZE_4K => SIZE_4K,
                _ => self.hook.fault_granule(page_gpa, max),
            };
            if !granule.is_power_of_two() || !(SIZE_4K..=max).contains(&granule) {
                granule = SIZE_4K;
            }
            let gpa = page_gpa & !(granule - 1);
            let host = d.host_of(gpa) as u64;
            let seq = self.hook.fault_begin(gpa, granule);
            let installed = self.install(d.backing, addr, host, granule);
            // Commit what was really installed: the whole leaf, or only the
            // faulting 4 KiB page when the leaf install fell back (the
            // table may hold 4 KiB leaves there after a balloon split it).
            // Nothing is there after a failed fill: nothing to commit (the
            // table keeps its marker); the thread faults again once woken.
            let (cg, cl) = match installed {
                Install::Done(h, l) => (d.gpa.0 + (h - d.host_addr as u64), l),
                Install::Present => (page_gpa, SIZE_4K),
                Install::Failed => break (host, granule, installed),
            };
            if self.hook.fault_commit(cg, cl, seq) {
                break (host, granule, installed);
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            if let Install::Done(h, l) = installed {
                self.undo(d, h, l);
            }
            std::thread::yield_now();
        };
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bytes = match installed {
            Install::Done(_, l) => l,
            _ => 0,
        };
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.stats.latency_ns_total.fetch_add(ns, Ordering::Relaxed);
        self.stats.latency_ns_max.fetch_max(ns, Ordering::Relaxed);
        self.stats.faults.fetch_add(1, Ordering::AcqRel);
        // Waking a range with no waiters is harmless; a wake that fails
        // must be retried, or the faulting thread sleeps for ever.
        (!self.wake(host, granule)).then_some((host, granule))
    }

    /// Installs zeros at the leaf `[host, host+len)` containing the faulting
    /// address `addr`.
    ///
    /// A leaf that fails part-way (`EEXIST` after some pages, or any other
    /// error) falls back to the single 4 KiB page at `addr`, so the faulting
    /// access always makes progress.
    fn install(&self, backing: Backing, addr: u64, host: u64, len: u64) -> Install {
        let mut err = match self.fill(backing, host, len) {
            Ok(()) => return Install::Done(host, len),
            Err(e) => e,
        };
        // A huge page freed by a release reaches the pool asynchronously, so
        // right after a release the copy can fail with ENOMEM: retry briefly.
        if backing == Backing::Hugetlb {
            for _ in 0..200 {
                if err != libc::ENOMEM || resident(host) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
                match self.fill(backing, host, len) {
                    Ok(()) => return Install::Done(host, len),
                    Err(e) => err = e,
                }
            }
        }
        let page = addr & !(SIZE_4K - 1);
        if backing != Backing::Hugetlb && len > SIZE_4K {
            match self.fill(backing, page, SIZE_4K) {
                Ok(()) => return Install::Done(page, SIZE_4K),
                Err(e) => err = e,
            }
        }
        // hugetlb allocates before it finds the page present, so a duplicate
        // fault on an exactly sized pool fails with ENOMEM: ask the kernel.
        if err == libc::EEXIST || resident(page) {
            return Install::Present;
        }
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        // Out of memory or a failing ioctl: the access will fault again; do
        // not spin.
        std::thread::sleep(std::time::Duration::from_millis(1));
        Install::Failed
    }

    /// Installs zeros at `[host, host + len)` without waking: one
    /// UFFDIO_ZEROPAGE, or a UFFDIO_COPY of zeros for hugetlb (which has no
    /// zero-page ioctl) and where the zero-page ioctl failed; the errno on
    /// failure.
    fn fill(&self, backing: Backing, host: u64, len: u64) -> Result<(), i32> {
        let ulen = super::backing::to_usize(len);
        let dst = host as *mut libc::c_void;
        if backing != Backing::Hugetlb {
            let r = if self.inject.uffd_zeropage.should_fail() {
                Err(guest_mm::fault::INJECTED_ERRNO)
            } else {
                // SAFETY: the range is a registered guest RAM range that
                // outlives the handler.
                unsafe { self.uffd.zeropage(dst, ulen, false) }
                    .map(|_| ())
                    .map_err(|e| errno_of(&e))
            };
            match r {
                Ok(()) => return Ok(()),
                Err(libc::EEXIST) => return Err(libc::EEXIST),
                Err(_) => {
                    self.stats.fill_fallbacks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if self.inject.uffd_copy.should_fail() {
            return Err(guest_mm::fault::INJECTED_ERRNO);
        }
        // SAFETY: dst is a registered guest RAM range that outlives the
        // handler; src is our 2 MiB zero mapping, at least `len` long.
        unsafe {
            self.uffd
                .copy(self.zero_buf.0 as *const libc::c_void, dst, ulen, false)
        }
        .map(|_| ())
        .map_err(|e| errno_of(&e))
    }

    /// Drops what `install` put at `[host, host+len)` when the table
    /// refused the commit. Not a release of guest memory the table knows
    /// about (its entries still say *discarded*; nothing to invalidate), so
    /// it cannot go through the gather, which only releases what it
    /// unmaps: it takes back the handler's own uncommitted install.
    fn undo(&self, d: &RegionDesc, host: u64, len: u64) {
        let ulen = usize::try_from(len).unwrap_or(0);
        let advice = if d.backing.is_file() {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: the range is inside guest RAM owned by the VM's memory,
        // which outlives this handler; dropping these pages is intended
        // (MADV_REMOVE punches the hole in the file).
        unsafe { libc::madvise(host as *mut libc::c_void, ulen, advice) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_ranges_merge_and_cover() {
        let mut reg = Vec::new();
        insert(&mut reg, 0x40_0000, 0x60_0000);
        insert(&mut reg, 0x80_0000, 0xa0_0000);
        insert(&mut reg, 0x10_0000, 0x20_0000);
        assert_eq!(
            reg,
            vec![
                (0x10_0000, 0x20_0000),
                (0x40_0000, 0x60_0000),
                (0x80_0000, 0xa0_0000)
            ]
        );
        assert!(covered(&reg, 0x40_0000, 0x60_0000));
        assert!(covered(&reg, 0x41_0000, 0x42_0000));
        assert!(!covered(&reg, 0x50_0000, 0x90_0000));
        assert!(!covered(&reg, 0x20_0000, 0x30_0000));
        assert!(!covered(&reg, 0xa0_0000, 0xa1_0000));
        // Touching ranges join; one overlapping several swallows them.
        insert(&mut reg, 0x60_0000, 0x70_0000);
        assert_eq!(reg[1], (0x40_0000, 0x70_0000));
        assert!(covered(&reg, 0x50_0000, 0x70_0000));
        insert(&mut reg, 0x18_0000, 0x90_0000);
        assert_eq!(reg, vec![(0x10_0000, 0xa0_0000)]);
        assert!(covered(&reg, 0x10_0000, 0xa0_0000));
        assert!(!covered(&reg, 0x0f_f000, 0x10_1000));
        assert!(!covered(&[], 0, 0x1000));
    }
}
