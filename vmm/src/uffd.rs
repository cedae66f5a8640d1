//! Demand faults: a userfaultfd handler thread for released guest RAM.
//!
//! Only ranges whose backing was released are registered (missing mode), so
//! memory that was never released keeps its transparent huge pages and never
//! pays for a user-space fault. When the guest (through KVM) or the VMM
//! touches a released page, the kernel queues a fault message; the handler
//! thread resolves it with a zero page (`UFFDIO_ZEROPAGE`, or `UFFDIO_COPY`
//! from a zero buffer for hugetlb, which has no zero-page ioctl), counts it
//! and records its latency.
//!
//! Concurrency: releases and resolutions are serialised by one lock (release
//! holds it exclusively, a resolution shared), so a resolution never
//! interleaves with a release of the same range. On top of that a
//! [`FaultHook`] (the stage-2 table) sees every resolution as
//! begin → install (without waking the faulting thread) → commit; if commit
//! says an unmap raced, the installed page is discarded again and the fault is
//! retried, so a fault never resurrects a page an in-flight unmap released.
//!
//! Granularity: a fault installs the whole leaf the mirror holds around the
//! faulting address ([`FaultHook::fault_granule`]: 4 KiB or 2 MiB, aligned in
//! guest physical space, never more than the backing's page size; hugetlb
//! always a whole huge page); if that fails part-way it falls back to the
//! faulting 4 KiB page, so every fault makes progress.
//! Counters are updated before the faulting thread is woken.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::memory::{Backing, GuestRam, MemoryError, RegionDesc, SIZE_2M, SIZE_4K};

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_MODE_DONTWAKE: u64 = 1;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());

/// Errors of the fault handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// userfaultfd(2) failed.
    #[error(
        "userfaultfd() failed: {0}; run as root or allow it with \
         `sysctl vm.unprivileged_userfaultfd=1`"
    )]
    Create(std::io::Error),
    /// UFFDIO_API failed.
    #[error(
        "UFFDIO_API failed (kernel lacks the needed userfaultfd features for this backing?): {0}"
    )]
    Api(std::io::Error),
    /// UFFDIO_REGISTER failed.
    #[error("registering [{0:#x}, +{1:#x}) with userfaultfd failed: {2}")]
    Register(u64, u64, std::io::Error),
    /// Discarding backing failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The stage-2 release failed.
    #[error(transparent)]
    Stage2(#[from] crate::stage2::Stage2Error),
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

/// Counters of the fault handler.
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
    /// Ranges released.
    pub releases: AtomicU64,
    /// Installs that failed for another reason than "already present".
    pub errors: AtomicU64,
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
    /// Ranges released.
    pub releases: u64,
    /// Failed installs (should stay 0).
    pub errors: u64,
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
        }
    }
}

/// State shared by the handler thread and the releasing side.
struct Shared {
    uffd: OwnedFd,
    regions: Vec<RegionDesc>,
    /// Exclusive for release, shared for resolution.
    lock: RwLock<()>,
    /// Host ranges already registered, as sorted, disjoint `[start, end)`
    /// with touching ranges merged: bounded by guest RAM, however many
    /// releases overlap.
    registered: Mutex<Vec<(u64, u64)>>,
    stats: FaultStats,
    hook: Arc<dyn FaultHook>,
    zero_buf: Option<ZeroBuf>,
}

/// A 2 MiB zero source for UFFDIO_COPY (hugetlb).
struct ZeroBuf(usize);
impl Drop for ZeroBuf {
    fn drop(&mut self) {
        // SAFETY: self.0 is a 2 MiB anonymous mapping owned by this value.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, SIZE_2M as usize) };
    }
}

/// The userfaultfd fault handler of one VM.
pub struct FaultHandler {
    shared: Arc<Shared>,
    stop_fd: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHandler")
            .field("stats", &self.shared.stats.summary())
            .finish()
    }
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl FaultHandler {
    /// Creates the userfaultfd for `ram` and starts the handler thread.
    pub fn start(ram: &GuestRam, hook: Arc<dyn FaultHook>) -> Result<Self, UffdError> {
        // SAFETY: plain syscall with flag arguments; returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Create(last_err()));
        }
        let fd = RawFd::try_from(fd).map_err(|_| UffdError::Create(last_err()))?;
        // SAFETY: fd was just returned by userfaultfd and is owned by no one else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
        let features = match ram.backing() {
            Backing::Anon => 0,
            Backing::Memfd => UFFD_FEATURE_MISSING_SHMEM,
            Backing::Hugetlb => UFFD_FEATURE_MISSING_HUGETLBFS,
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a pointer to a uffdio_api that lives
        // across the call; the layout matches the kernel's.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(UffdError::Api(last_err()));
        }
        // SAFETY: eventfd with flags only; returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(UffdError::Start(last_err()));
        }
        // SAFETY: efd is a fresh fd owned by no one else.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let zero_buf = if ram.backing() == Backing::Hugetlb {
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
                return Err(UffdError::Start(last_err()));
            }
            Some(ZeroBuf(p as usize))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            uffd,
            regions: ram.regions(),
            lock: RwLock::new(()),
            registered: Mutex::new(Vec::new()),
            stats: FaultStats::default(),
            hook,
            zero_buf,
        });
        let s2 = Arc::clone(&shared);
        let stop_raw = stop_fd.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || s2.run(stop_raw))
            .map_err(UffdError::Start)?;
        Ok(Self {
            shared,
            stop_fd,
            thread: Some(thread),
        })
    }

    /// Arms demand faults on `[gpa, gpa+len)` and calls `release` to drop
    /// its backing (the stage-2 gather): the next touch faults into the
    /// handler and reads zeros.
    pub fn release_range(
        &self,
        ram: &GuestRam,
        gpa: u64,
        len: u64,
        release: impl FnOnce() -> Result<(), UffdError>,
    ) -> Result<(), UffdError> {
        let d = ram.checked_region(gpa, len)?;
        // Exclusive against resolutions only while registering. The release
        // itself (a gather, which waits for a grace period) runs without
        // it: a fast-walk reader pinned in that grace period may be the one
        // faulting, and the table's sequence protocol already keeps a fault
        // from resurrecting a page being released.
        let w = self.shared.lock.write().unwrap_or_else(|e| e.into_inner());
        // Register first, then discard: a touch in between still finds the
        // old page, a touch after the discard faults into the handler.
        let host = d.host_of(gpa) as u64;
        let mut reg = self
            .shared
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !covered(&reg, host, host + len) {
            let mut r = UffdioRegister {
                range: UffdioRange { start: host, len },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: the range lies in a guest RAM mapping that outlives the
            // handler (Vm drops the handler first); the struct lives across
            // the call.
            if unsafe { libc::ioctl(self.shared.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut r) } != 0 {
                return Err(UffdError::Register(gpa, len, last_err()));
            }
            insert(&mut reg, host, host + len);
        }
        drop(reg);
        drop(w);
        release()?;
        self.shared.stats.releases.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> &FaultStats {
        &self.shared.stats
    }

    /// Stops the handler thread (also on drop).
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.stop_fd.as_raw_fd(), (&raw const one).cast(), 8) };
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
    fn run(&self, stop_fd: RawFd) {
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
        loop {
            // SAFETY: fds is a live array of two pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if last_err().kind() == std::io::ErrorKind::Interrupted {
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
            let mut msg = UffdMsg::default();
            let sz = std::mem::size_of::<UffdMsg>();
            // SAFETY: reads at most sz bytes into a live UffdMsg of that size.
            let r = unsafe { libc::read(self.uffd.as_raw_fd(), (&raw mut msg).cast(), sz) };
            if r != isize::try_from(sz).unwrap_or(-1) {
                continue; // EAGAIN: another wake-up raced us
            }
            if msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            self.resolve(msg.address, Instant::now());
        }
    }

    /// Resolves the fault at host address `addr` (message read at `t0`).
    /// Counters are updated before the faulting thread is woken, so it sees
    /// its own fault counted.
    fn resolve(&self, addr: u64, t0: Instant) {
        let Some(d) = self
            .regions
            .iter()
            .find(|d| addr >= d.host_addr as u64 && addr - (d.host_addr as u64) < d.len)
        else {
            return;
        };
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
            let (cg, cl) = match installed {
                Some((h, l)) => (d.gpa.0 + (h - d.host_addr as u64), l),
                None => (page_gpa, SIZE_4K),
            };
            if self.hook.fault_commit(cg, cl, seq) {
                break (host, granule, installed);
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            if let Some((h, l)) = installed {
                self.undo(d, h, l);
            }
            std::thread::yield_now();
        };
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let bytes = installed.map_or(0, |(_, l)| l);
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.stats.latency_ns_total.fetch_add(ns, Ordering::Relaxed);
        self.stats.latency_ns_max.fetch_max(ns, Ordering::Relaxed);
        self.stats.faults.fetch_add(1, Ordering::AcqRel);
        let range = UffdioRange {
            start: host,
            len: granule,
        };
        // SAFETY: UFFDIO_WAKE reads a live uffdio_range; waking a range with
        // no waiters is harmless.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WAKE, &range) };
    }

    /// Installs zeros at the leaf `[host, host+len)` containing the faulting
    /// address `addr`; false if nothing was installed (already present).
    ///
    /// A leaf that fails part-way (`EEXIST` after some pages, or any other
    /// error) falls back to the single 4 KiB page at `addr`, so the faulting
    /// access always makes progress.
    fn install(&self, backing: Backing, addr: u64, host: u64, len: u64) -> Option<(u64, u64)> {
        if self.fill(backing, host, len) == 0 {
            return Some((host, len));
        }
        // A huge page freed by a release reaches the pool asynchronously, so
        // right after a release the copy can fail with ENOMEM: retry briefly.
        if backing == Backing::Hugetlb {
            for _ in 0..200 {
                if last_err().raw_os_error() != Some(libc::ENOMEM) || resident(host) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
                if self.fill(backing, host, len) == 0 {
                    return Some((host, len));
                }
            }
        }
        let page = addr & !(SIZE_4K - 1);
        if backing != Backing::Hugetlb && len > SIZE_4K && self.fill(backing, page, SIZE_4K) == 0 {
            return Some((page, SIZE_4K));
        }
        // hugetlb allocates before it finds the page present, so a duplicate
        // fault on an exactly sized pool fails with ENOMEM: ask the kernel.
        if last_err().raw_os_error() != Some(libc::EEXIST) && !resident(page) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            // Out of memory or a bug: the access will fault again; do not spin.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        None
    }

    /// One UFFDIO_ZEROPAGE (or UFFDIO_COPY of zeros for hugetlb) without
    /// waking; returns the ioctl's result (errno in `last_err`).
    fn fill(&self, backing: Backing, host: u64, len: u64) -> libc::c_int {
        if let (Backing::Hugetlb, Some(z)) = (backing, &self.zero_buf) {
            let mut c = UffdioCopy {
                dst: host,
                src: z.0 as u64,
                len,
                mode: UFFDIO_MODE_DONTWAKE,
                copy: 0,
            };
            // SAFETY: dst is a registered guest RAM range that outlives the
            // handler; src is our 2 MiB zero mapping; the struct is live.
            unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut c) }
        } else {
            let mut z = UffdioZeropage {
                range: UffdioRange { start: host, len },
                mode: UFFDIO_MODE_DONTWAKE,
                zeropage: 0,
            };
            // SAFETY: the range is a registered guest RAM range that outlives
            // the handler; the struct is live across the call.
            unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) }
        }
    }

    /// Drops what `install` put at `[host, host+len)`.
    fn undo(&self, d: &RegionDesc, host: u64, len: u64) {
        let ulen = usize::try_from(len).unwrap_or(0);
        match d.backing {
            Backing::Anon => {
                // SAFETY: the range is inside guest RAM owned by the VM,
                // which outlives this handler; dropping pages is intended.
                unsafe { libc::madvise(host as *mut libc::c_void, ulen, libc::MADV_DONTNEED) };
            }
            Backing::Memfd | Backing::Hugetlb => {
                // SAFETY: as above; MADV_REMOVE punches the hole in the memfd.
                unsafe { libc::madvise(host as *mut libc::c_void, ulen, libc::MADV_REMOVE) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory::PageSize;

    fn host_touch_faults(backing: Backing, page: PageSize) {
        let ram = GuestRam::new("8M".parse().unwrap(), backing, page).unwrap();
        let gm = ram.guest_memory();
        let gpa = 4 << 20;
        gm.write_obj(0x1234_u64, GuestAddress(gpa + 64)).unwrap();
        let h = FaultHandler::start(&ram, Arc::new(NoHook)).unwrap();
        h.release_range(&ram, gpa, page.bytes(), || {
            Ok(ram.discard(gpa, page.bytes())?)
        })
        .unwrap();
        assert_eq!(gm.read_obj::<u64>(GuestAddress(gpa + 64)).unwrap(), 0);
        let s = h.stats().summary();
        assert_eq!(
            (s.faults, s.releases, s.errors),
            (1, 1, 0),
            "{backing} {page}: {s:?}"
        );
        // Resolved pages stay; a second read does not fault.
        assert_eq!(gm.read_obj::<u64>(GuestAddress(gpa + 128)).unwrap(), 0);
        assert_eq!(h.stats().summary().faults, 1);
    }

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

    #[test]
    fn host_touch_of_released_anon_faults() {
        host_touch_faults(Backing::Anon, PageSize::Size2M);
        host_touch_faults(Backing::Anon, PageSize::Size4K);
    }

    #[test]
    fn host_touch_of_released_memfd_faults() {
        host_touch_faults(Backing::Memfd, PageSize::Size4K);
        host_touch_faults(Backing::Memfd, PageSize::Size2M);
    }
}
