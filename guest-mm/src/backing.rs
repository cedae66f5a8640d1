//! Host backing of guest memory, and how to give it back to the host.
//!
//! Every leaf the table maps points into a registered [`BackingRegion`];
//! a release is clipped to registered regions, so nothing outside them is
//! ever released. How memory is released depends on the kind:
//!
//! | kind | release |
//! |------|---------|
//! | anonymous private | `MADV_DONTNEED`, up to [`BATCH_RUNS`] runs per `process_madvise` call |
//! | shared file (memfd) | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` |
//! | hugetlb | whole huge pages only; partly released huge pages are tracked until every 4 KiB of them is released |
//! | simulated | nothing (tests, loom); the release is only reported to a hook |
//!
//! A gather's flush releases all its runs through one `ReleaseBatch`:
//! shared-file runs are queued and punched one by one (a large batch split
//! across threads, one file per thread: see
//! `ReleaseBatch::submit_parallel`); anonymous runs are queued and
//! handed to the kernel as one
//! `process_madvise(PIDFD_SELF, iov, n, MADV_DONTNEED)` per
//! [`BATCH_RUNS`] runs (Linux 6.13 allows any advice on the caller itself,
//! 6.14 added `PIDFD_SELF`, and 6.16 batches the TLB flushes of such a
//! call), instead of one `madvise` each. Where the kernel refuses the call
//! before it ever worked (older kernels: `EINVAL`, `EBADF`, `ENOSYS`,
//! `EPERM`, `ESRCH`), batching is turned off for the registry and every
//! run gets its own `madvise`; any other failure or a partial result
//! redoes that batch run by run (`MADV_DONTNEED` is idempotent), so errors
//! are still reported per run. `PIDFD_SELF` always means the calling
//! process, so a forked child can never release its parent's memory.
//!
//! **A release the kernel refuses.** Each `madvise` and punch-hole is
//! tried [`RELEASE_ATTEMPTS`] times. A range that still fails is recorded
//! as *unreleased*: its table entries are already gone (cleared, or
//! discarded / ballooned markers) but the memory is still there, so it is
//! kept on a list, counted in `TableStats::unreleased_bytes`, reported in
//! the flush's [`ReleaseError`], and released again by the teardown's
//! flush, when nothing can map it any more (not earlier: a fault may make
//! a discarded page present again at any time, without the table lock,
//! and a release behind it would destroy what the guest wrote since). A
//! range that is mapped again (a map, a fault restoring a discarded page)
//! leaves the list: it is in use, and its next unmap releases it. So: a
//! host page that no entry maps is either released or on the list.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::addr::Hva;
use crate::entry::PAGE_SIZE;
use crate::fault::{FaultInjection, INJECTED_ERRNO};
use crate::sync::{lock, AtomicU64, Mutex, Ordering};

/// Attempts at one `madvise` or punch-hole before the range is recorded as
/// unreleased (see the module doc).
pub const RELEASE_ATTEMPTS: u32 = 3;

/// A hook called with each released host range of a [`BackingKind::Simulated`] region.
pub type ReleaseHook = Arc<dyn Fn(Hva, u64) + Send + Sync>;

/// What kind of memory backs a region, and so how to release it.
#[derive(Clone)]
pub enum BackingKind {
    /// Private anonymous memory (THP or not).
    Anonymous,
    /// A shared mapping of a file such as a memfd; `offset` is the file
    /// offset of the region's first byte.
    SharedFile {
        /// The file (owned by the caller; must outlive the table).
        fd: RawFd,
        /// File offset of the region's start.
        offset: u64,
    },
    /// hugetlb pages of `page_size` bytes, anonymous (`file: None`) or a
    /// hugetlbfs/memfd file at an offset.
    Hugetlb {
        /// The huge page size (e.g. 2 MiB).
        page_size: u64,
        /// `(fd, offset)` for a file mapping.
        file: Option<(RawFd, u64)>,
    },
    /// No real memory is released; `hook` sees each range instead.
    Simulated {
        /// Called with every released range.
        hook: Option<ReleaseHook>,
    },
}

impl std::fmt::Debug for BackingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackingKind::Anonymous => f.write_str("Anonymous"),
            BackingKind::SharedFile { fd, offset } => {
                write!(f, "SharedFile(fd {fd}, offset {offset:#x})")
            }
            BackingKind::Hugetlb { page_size, file } => {
                write!(f, "Hugetlb({page_size:#x}, {file:?})")
            }
            BackingKind::Simulated { .. } => f.write_str("Simulated"),
        }
    }
}

/// A host range that guest memory may be mapped to.
#[derive(Clone, Debug)]
pub struct BackingRegion {
    /// First host address (4 KiB aligned; huge-page aligned for hugetlb).
    pub hva: Hva,
    /// Length in bytes.
    pub len: u64,
    /// How to release it.
    pub kind: BackingKind,
}

/// Identifies a registered region.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BackingId(pub usize);

/// Errors of registering backing.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackingError {
    /// The region is empty, unaligned or wraps around.
    #[error("backing region {hva} + {len:#x} is invalid: it must be non-empty, 4 KiB aligned (huge-page aligned for hugetlb) and must not wrap")]
    Invalid {
        /// Start.
        hva: Hva,
        /// Length.
        len: u64,
    },
    /// The region overlaps one already registered.
    #[error("backing region {hva} + {len:#x} overlaps a registered region; register each host range once")]
    Overlap {
        /// Start.
        hva: Hva,
        /// Length.
        len: u64,
    },
}

/// A release that the kernel refused [`RELEASE_ATTEMPTS`] times; the
/// memory stays allocated and is recorded as unreleased.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("releasing host memory {hva} + {len:#x} failed ({op}, {attempts} attempts): errno {errno}; the guest mapping is gone but the host memory is still allocated: it is counted in the table's unreleased_bytes and released at teardown (or by its next unmap if it is mapped again)")]
pub struct ReleaseError {
    /// Start.
    pub hva: Hva,
    /// Length.
    pub len: u64,
    /// The call that failed.
    pub op: &'static str,
    /// errno of the last attempt.
    pub errno: i32,
    /// Attempts made.
    pub attempts: u32,
}

/// A range whose release failed: how to release it again.
#[derive(Clone, Copy, Debug)]
struct Unreleased {
    hva: u64,
    len: u64,
    /// `(fd, file offset)` for a punch-hole, `None` for `madvise`.
    punch: Option<(RawFd, u64)>,
}

struct Region {
    start: u64,
    end: u64,
    kind: BackingKind,
    /// hugetlb: huge page base -> bitmap of released 4 KiB sub-pages.
    partial: BTreeMap<u64, Vec<u64>>,
}

/// Most runs one `process_madvise` call takes (the kernel's limit,
/// `UIO_MAXIOV`, is 1024; past ~64 the gain is flat on the measured host).
pub const BATCH_RUNS: usize = 128;

/// Least anonymous bytes one submit must release before it is split across
/// threads ([`crate::Gather::set_release_threads`]).
pub const PARALLEL_MIN_BYTES: u64 = 128 << 20;
/// Least bytes per thread of a parallel release.
pub const PARALLEL_SHARE_MIN: u64 = 64 << 20;
/// Most threads of a parallel release.
pub const MAX_RELEASE_THREADS: usize = 8;
/// The least the threads of a parallel release claim at a time (16 MiB of
/// 4 KiB pages is about 2 ms of work, of 2 MiB pages about 40 µs).
pub const PARALLEL_CHUNK: u64 = 16 << 20;

/// The most one thread of a background release claims at a time (about
/// 4.5 ms of work at 4 KiB pages): what a helper that gets no CPU can hold
/// back from the flushing thread once that joins in
/// ([`crate::Gather::set_release_background`]).
pub const BACKGROUND_CLAIM_MAX: u64 = 64 << 20;

/// What a helper made slow by the fault point `release_helper_slow` waits
/// before each claim: a helper that gets a share of a core, not none.
pub const SLOW_HELPER_PAUSE: Duration = Duration::from_millis(20);

/// The shortest window over which a background release's pace is judged
/// (`Pace`, below).
pub const BACKGROUND_WINDOW_MIN: Duration = Duration::from_millis(20);

/// How a background release's caller judges its helpers: every `window`
/// it looks at how much they released in it, and joins in if that was
/// less than `floor` (or than all that was left). So it joins when the
/// helpers are *starved* (they get less CPU than the slowest pace it
/// accepts), not when they are merely sharing the cores: idle-priority
/// helpers beside a busy neighbour that still leaves them a quarter of a
/// core release at their own pace and take nothing from it, while on a
/// host with no idle CPU at all the caller joins after one window. A
/// fixed deadline for the whole release (the rule before) waited all of
/// it there, and passed needlessly beside a neighbour that left the
/// helpers just under half a core (`gmm bench interference --only
/// teardown`: in one of two rounds traced with `perf sched`, then 60+ ms
/// of release at normal priority).
#[derive(Clone, Copy, Debug)]
struct Pace {
    window: Duration,
    floor: u64,
}

impl Pace {
    /// The pace of a release of `bytes` whose `k` helpers must release at
    /// least a GiB per `per_gib`: a window holds two claims per helper at
    /// that pace (claims complete whole, so a shorter window would now and
    /// then see none at a good pace), but no more than the whole release
    /// at that pace, and at least [`BACKGROUND_WINDOW_MIN`]. `per_gib`
    /// zero: no pace is slow enough (the caller joins after the first
    /// window unless all is released by then).
    fn new(per_gib: Duration, k: usize, bytes: u64) -> Pace {
        const GIB: f64 = (1u64 << 30) as f64;
        let claims = (2 * k.max(1) as u64 * BACKGROUND_CLAIM_MAX).min(bytes);
        let window = per_gib
            .mul_f64(claims as f64 / GIB)
            .clamp(BACKGROUND_WINDOW_MIN, Duration::from_secs(3600));
        let floor = if per_gib.is_zero() {
            u64::MAX
        } else {
            (window.as_secs_f64() / per_gib.as_secs_f64() * GIB) as u64
        };
        Pace { window, floor }
    }
}

/// What one of `k` threads claims next from a lane with `left` bytes not
/// yet claimed: a `2k`th of what is left (guided self-scheduling), in
/// whole 2 MiB pieces, at least [`PARALLEL_CHUNK`] (or all that is left).
///
/// Why claims shrink instead of being one fixed small size: every
/// `madvise` or punch ends in a TLB flush that interrupts the other CPUs
/// running this process, which in a parallel release are the other release
/// threads. At 2 MiB pages a 16 MiB claim is about as long as that
/// interruption, so fixed 16 MiB claims made a 2-thread release of
/// THP-backed memory only 0.85-0.9x a munmap, where claims of 64 MiB and
/// more reach ~0.6x (a plain C release of 256 MiB to 4 GiB with a KVM
/// memslot over it; at 4 KiB pages the claim size made no measurable
/// difference). Large claims first keep those flushes few; small claims at
/// the end keep a thread that got a CPU late (a `SCHED_IDLE` helper beside
/// a busy core, or one that started late: `FlusherCpu`) from holding the
/// others up with a large claim of its own.
///
/// Public so that a baseline outside guest-mm (`gmm bench interference`'s
/// idle-priority release) claims exactly as a release here does.
pub fn claim_size(left: u64, k: usize) -> u64 {
    const PIECE: u64 = 2 << 20;
    let guided = (left / (2 * k.max(1) as u64)) & !(PIECE - 1);
    guided.max(PARALLEL_CHUNK).min(left)
}
/// How long the workers of a parallel release (the caller of a foreground
/// one, and every helper) wait for the helpers to be through their thread
/// start before they claim their first chunk. A new thread's start maps
/// memory (Rust's signal stack: `mmap` and `mprotect`; glibc's malloc
/// arena: `mmap`), which takes the mmap lock for writing, and a worker's
/// `madvise` holds it for reading for a whole claim (a quarter of the
/// release, with two threads): a helper whose start came after another
/// worker's first `madvise` began waited that long (`perf` on
/// `sched_switch`: the helper in `rwsem_down_write_slowpath` under
/// `do_mprotect_pkey`), and the next `madvise` calls of the others waited
/// behind its queued write in turn. With the wait, alternated same-run
/// pairs of `gmm bench teardown --sizes 512M,1G --page-size 2M --reps 12
/// --no-process`, slowest memory back of each run: 1 GiB 2.07-3.01 ->
/// 2.11-2.29 ms (five pairs), 512 MiB 1.66-2.43 -> 1.37-1.58 ms (three);
/// medians unchanged (1 GiB 1.75-2.20 -> 1.76-2.11 ms, 512 MiB 1.12-1.23
/// -> 1.12-1.23 ms). In the background (4 KiB pages, `SCHED_IDLE` helpers
/// only), where the second helper's start and its spawn waited for the
/// first helper's first 64 MiB claim: four pairs of `--sizes 1G,2G
/// --page-size 4K --reps 5`, 1 GiB medians 37.0-49.3 -> 31.9-38.1 ms.
pub const HELPER_START_WAIT: Duration = Duration::from_micros(200);

/// Yields until `n` threads are through their thread start (each adds 1
/// to `started` first thing), or for [`HELPER_START_WAIT`] at most (a
/// helper whose spawn failed never comes). Also the teardown bench's
/// plain-thread baseline waits with it, so both release the same way.
pub fn wait_started(started: &std::sync::atomic::AtomicUsize, n: usize) {
    let t = Instant::now();
    loop {
        std::thread::yield_now();
        if started.load(Ordering::Acquire) >= n || t.elapsed() >= HELPER_START_WAIT {
            return;
        }
    }
}

/// The name of a parallel release's helper threads (they run
/// `SCHED_IDLE`).
pub const RELEASE_THREAD_NAME: &str = "gmm-release";

/// A helper's tid while it may be boosted; [`TID_BUSY`] while the flusher
/// boosts it; 0 once the helper is done (or never started).
const TID_BUSY: i32 = -1;

/// Called by a helper before it exits: its tid may not be used any more
/// (the kernel may reuse it). Waits while the flusher is boosting it.
fn retire_tid(tid: &std::sync::atomic::AtomicI32) {
    loop {
        let t = tid.load(Ordering::SeqCst);
        if t == TID_BUSY {
            std::hint::spin_loop();
            std::thread::yield_now();
            continue;
        }
        if tid
            .compare_exchange(t, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

/// Gives the helper whose tid is in `tid`, if it is still working, the
/// calling thread's scheduling policy (leaving `SCHED_IDLE` needs
/// `CAP_SYS_NICE` or a `RLIMIT_NICE` that allows nice 0; best effort).
fn boost_tid(tid: &std::sync::atomic::AtomicI32) {
    let t = tid.load(Ordering::SeqCst);
    if t <= 0
        || tid
            .compare_exchange(t, TID_BUSY, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
    {
        return;
    }
    // SAFETY: queries the calling thread's policy only.
    let policy = unsafe { libc::sched_getscheduler(0) };
    let p = libc::sched_param { sched_priority: 0 };
    if policy == libc::SCHED_OTHER || policy == libc::SCHED_BATCH {
        // SAFETY: `t` is a live thread of this process: it cannot retire
        // (and its tid cannot be reused) while the slot holds TID_BUSY.
        let _ = unsafe { libc::sched_setscheduler(t, policy, &p) };
    }
    tid.store(t, Ordering::SeqCst);
}

/// Run when a release helper ends, by return or by panic: retires its
/// tid (so no boost can reach a reused one) and counts it done for a
/// background caller waiting on `finished` (which would otherwise wait
/// for a helper that panicked until its pace showed it starved).
struct HelperDone<'a> {
    tid: &'a std::sync::atomic::AtomicI32,
    finished: &'a (std::sync::Mutex<usize>, std::sync::Condvar),
}

impl Drop for HelperDone<'_> {
    fn drop(&mut self) {
        retire_tid(self.tid);
        *self.finished.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.finished.1.notify_one();
    }
}

/// Makes the calling thread `SCHED_IDLE`: it runs only on a core that no
/// normal thread wants. Lowering one's own policy needs no privilege; if
/// the kernel refuses anyway, the thread keeps its priority.
fn set_idle_priority() {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes only the calling thread's (pid 0) policy; `p` is a
    // valid parameter for SCHED_IDLE, which takes priority 0.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) };
}

/// Where the flusher of a parallel release runs: the CPUs it may use and
/// the one it is on.
///
/// Why a helper needs it: a new thread is queued on the CPU of the thread
/// that made it, and the flusher keeps that CPU busy, so a helper waited
/// there until the load balancer moved it, up to milliseconds (a plain C
/// test on this 2-vCPU virtual machine: 0.5-3 ms behind a busy creator),
/// while the other core idled. Wake-ups do not help on a virtual machine
/// either: an idle vCPU looks preempted to the guest's scheduler, which
/// then keeps a woken thread on the waker's CPU. So the flusher yields its
/// CPU after making its helpers (until they are through their thread
/// start: [`HELPER_START_WAIT`]), and a helper that finds itself on
/// the flusher's CPU moves to another one ([`FlusherCpu::leave`]): in the
/// same test the helper was running on the other CPU 33-170 µs after it
/// was made, and the creator had its CPU back after 16-149 µs.
#[derive(Clone, Copy)]
struct FlusherCpu {
    allowed: libc::cpu_set_t,
    cpu: usize,
}

impl FlusherCpu {
    /// The calling thread's; `None` if it cannot be read.
    fn of_caller() -> Option<FlusherCpu> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: reads the calling thread's affinity into `allowed`,
        // whose size is passed.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&allowed), &mut allowed) };
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).ok()?;
        (rc == 0).then_some(FlusherCpu { allowed, cpu })
    }

    /// Called by a new helper first: if it runs on the flusher's CPU, it
    /// moves to another CPU the flusher may use (restricting its affinity
    /// migrates it at once), then may use them all again (so that the
    /// scheduler can still move it where a core is free, e.g. once it is
    /// boosted at the end). Best effort.
    fn leave(&self) {
        // SAFETY: sched_getcpu has no preconditions.
        if usize::try_from(unsafe { libc::sched_getcpu() }) != Ok(self.cpu) {
            return;
        }
        let mut away = self.allowed;
        // SAFETY: `away` is a valid cpu_set_t and `cpu` < CPU_SETSIZE (the
        // kernel returned it).
        let others = unsafe {
            libc::CPU_CLR(self.cpu, &mut away);
            libc::CPU_COUNT(&away)
        };
        if others == 0 {
            return;
        }
        let size = std::mem::size_of_val(&away);
        // SAFETY: change only the calling thread's (pid 0) affinity; the
        // sets are valid and their size is passed.
        unsafe {
            libc::sched_setaffinity(0, size, &away);
            libc::sched_setaffinity(0, size, &self.allowed);
        }
    }
}

/// `PIDFD_SELF_THREAD_GROUP` (Linux 6.14): the calling process.
pub const PIDFD_SELF: libc::c_int = -10001;

/// Batching state: not tried yet, works, refused by this kernel.
const BATCH_UNKNOWN: u64 = 0;
const BATCH_WORKS: u64 = 1;
const BATCH_REFUSED: u64 = 2;

/// Counters of what was released.
#[derive(Default)]
pub(crate) struct ReleaseCounters {
    /// Release system calls (a batch counts once).
    pub(crate) calls: AtomicU64,
    /// `process_madvise` calls that released a whole batch.
    pub(crate) batched_calls: AtomicU64,
    /// Runs released by those calls.
    pub(crate) batched_runs: AtomicU64,
    /// Batches redone run by run (refused, failed or partial).
    pub(crate) batch_fallbacks: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) outside: AtomicU64,
    /// Attempts of one `madvise` / punch-hole that failed and were retried
    /// or given up on.
    pub(crate) failed_attempts: AtomicU64,
}

/// All regions of one table.
pub(crate) struct BackingRegistry {
    regions: Mutex<Vec<Region>>,
    pub(crate) counters: ReleaseCounters,
    /// `BATCH_UNKNOWN`, `BATCH_WORKS` or `BATCH_REFUSED`.
    batching: AtomicU64,
    /// Ranges whose release failed (module doc). Plain `std`: loom's
    /// backings are simulated and never fail, so this stays empty there.
    unreleased: std::sync::Mutex<Vec<Unreleased>>,
    /// Bytes on `unreleased`: the one load a map or fault pays for it.
    unreleased_bytes: std::sync::atomic::AtomicU64,
}

/// One shared-file run waiting in a [`ReleaseBatch`]: the host range
/// `[hva, hva + len)` is `[off, off + len)` of `fd`.
#[derive(Clone, Copy)]
struct Punch {
    fd: RawFd,
    off: u64,
    hva: u64,
    len: u64,
}

const NO_PUNCH: Punch = Punch {
    fd: -1,
    off: 0,
    hva: 0,
    len: 0,
};

/// Runs waiting to be released: anonymous ones for one `process_madvise`
/// call, shared-file ones for their punch-holes; and the first release
/// error of a flush. Lives on the flusher's stack: no allocation (only a
/// parallel submit allocates, for its lanes and helper threads).
pub(crate) struct ReleaseBatch<'a> {
    reg: &'a BackingRegistry,
    /// The table's injection points (`batch_release` forces the run-by-run
    /// fallback; `madvise`, `punch_hole` fail those calls).
    faults: &'a FaultInjection,
    iov: [libc::iovec; BATCH_RUNS],
    n: usize,
    bytes: u64,
    /// Shared-file runs waiting for their punch-hole.
    punches: [Punch; BATCH_RUNS],
    np: usize,
    punch_bytes: u64,
    first_err: Option<ReleaseError>,
    /// Threads a large submit may use, and the injection point that makes
    /// spawning one fail.
    threads: usize,
    spawn_fail: Option<&'a crate::fault::FailPoint>,
    /// Makes background helpers behave as if starved (tests).
    stall: Option<&'a crate::fault::FailPoint>,
    /// Makes background helpers slow but not starved (tests).
    slow: Option<&'a crate::fault::FailPoint>,
    /// Makes a helper panic holding a claimed chunk (tests).
    helper_panic: Option<&'a crate::fault::FailPoint>,
    /// A parallel submit runs in the background, at a GiB per this or
    /// faster ([`crate::Gather::set_release_background`]).
    background: Option<Duration>,
    parallel: u64,
    /// Background submits whose caller joined in.
    joins: u64,
}

/// Whether `punches[i]` is the first punch of its file.
fn first_of_file(punches: &[Punch], i: usize) -> bool {
    punches[..i].iter().all(|p| p.fd != punches[i].fd)
}

/// How many different files `punches` punch.
fn distinct_files(punches: &[Punch]) -> usize {
    (0..punches.len())
        .filter(|&i| first_of_file(punches, i))
        .count()
}

/// A run of a [`Lane`]: anonymous, or `(fd, file offset)` of a shared file.
#[derive(Clone, Copy)]
struct Piece {
    hva: u64,
    len: u64,
    file: Option<(RawFd, u64)>,
}

/// Runs a parallel release treats as one concatenated range, claimed
/// piece by piece ([`claim_size`]) from `cursor` by `k` threads (plain std
/// atomics: this is not part of the protocol loom models; loom's backings
/// are simulated and never reach here).
struct Lane {
    pieces: Vec<Piece>,
    bytes: u64,
    k: usize,
    /// The most one claim takes.
    max_claim: u64,
    cursor: std::sync::atomic::AtomicU64,
    /// Bytes of claims released so far (a background caller's measure of
    /// its helpers' pace: [`Pace`]).
    released: std::sync::atomic::AtomicU64,
}

impl Lane {
    /// A lane that `k` threads claim from, at most `max_claim` at a time.
    fn new(pieces: Vec<Piece>, k: usize, max_claim: u64) -> Lane {
        Lane {
            bytes: pieces.iter().map(|p| p.len).sum(),
            k,
            max_claim,
            pieces,
            cursor: std::sync::atomic::AtomicU64::new(0),
            released: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Claims the next `[lo, hi)` of the lane, `None` once all is claimed.
    fn claim(&self) -> Option<(u64, u64)> {
        let mut lo = self.cursor.load(Ordering::Relaxed);
        loop {
            if lo >= self.bytes {
                return None;
            }
            let hi = lo + claim_size(self.bytes - lo, self.k).min(self.max_claim);
            match self
                .cursor
                .compare_exchange_weak(lo, hi, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some((lo, hi)),
                Err(now) => lo = now,
            }
        }
    }

    /// All anonymous runs in one lane, the punches of each file in one lane
    /// per file, in the order they were queued; `k` threads claim from
    /// them, at most `max_claim` at a time.
    fn sort(
        anon: impl Iterator<Item = Piece>,
        punches: &[Punch],
        k: usize,
        max_claim: u64,
    ) -> Vec<Lane> {
        let mut lanes = Vec::new();
        let anon: Vec<Piece> = anon.collect();
        if !anon.is_empty() {
            lanes.push(Lane::new(anon, k, max_claim));
        }
        for (i, first) in punches.iter().enumerate() {
            if !first_of_file(punches, i) {
                continue;
            }
            let of_file = punches.iter().filter(|p| p.fd == first.fd);
            lanes.push(Lane::new(
                of_file
                    .map(|p| Piece {
                        hva: p.hva,
                        len: p.len,
                        file: Some((p.fd, p.off)),
                    })
                    .collect(),
                k,
                max_claim,
            ));
        }
        lanes
    }

    /// Whether no thread has claimed a chunk of the lane yet.
    fn untouched(&self) -> bool {
        self.cursor.load(Ordering::Relaxed) == 0
    }

    /// Whether a chunk of the lane is left to claim.
    fn has_work(&self) -> bool {
        self.cursor.load(Ordering::Relaxed) < self.bytes
    }

    /// Claims the lane's next chunk and releases it; `None` once nothing is
    /// left to claim, else the first error of the chunk.
    fn release_chunk(
        &self,
        reg: &BackingRegistry,
        faults: &FaultInjection,
    ) -> Option<Result<(), ReleaseError>> {
        let (lo, hi) = self.claim()?;
        let mut res = Ok(());
        let mut at = 0u64;
        for p in &self.pieces {
            let (a, b) = (at.max(lo), (at + p.len).min(hi));
            if a < b {
                let s = p.hva + (a - at);
                let one = match p.file {
                    None => reg.madvise(s, b - a, faults),
                    Some((fd, off)) => reg.punch(fd, off + (a - at), s, b - a, faults),
                };
                if res.is_ok() {
                    res = one;
                }
            }
            at += p.len;
            if at >= hi {
                break;
            }
        }
        self.released.fetch_add(hi - lo, Ordering::Relaxed);
        Some(res)
    }
}

impl<'a> ReleaseBatch<'a> {
    /// Queue one run. The caller submits a full batch first, outside the
    /// registry lock ([`BackingRegistry::release_into`]).
    /// Whether either queue is full (the next push must wait for a submit).
    fn full(&self) -> bool {
        self.n == BATCH_RUNS || self.np == BATCH_RUNS
    }

    /// Queue one shared-file run (see [`ReleaseBatch::push`]).
    fn push_punch(&mut self, p: Punch) {
        debug_assert!(self.np < BATCH_RUNS, "push into a full release batch");
        self.punches[self.np] = p;
        self.np += 1;
        self.punch_bytes += p.len;
    }

    fn push(&mut self, s: u64, len: u64) {
        debug_assert!(self.n < BATCH_RUNS, "push into a full release batch");
        self.iov[self.n] = libc::iovec {
            iov_base: s as *mut libc::c_void,
            iov_len: len as usize,
        };
        self.n += 1;
        self.bytes += len;
    }

    fn error(&mut self, e: ReleaseError) {
        self.reg.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.first_err.get_or_insert(e);
    }

    /// Let large submits use up to `threads` threads.
    pub(crate) fn set_threads(&mut self, threads: usize, faults: &'a FaultInjection) {
        self.threads = threads.clamp(1, MAX_RELEASE_THREADS);
        self.spawn_fail = Some(&faults.release_thread);
        self.stall = Some(&faults.release_helper_stall);
        self.slow = Some(&faults.release_helper_slow);
        self.helper_panic = Some(&faults.release_helper_panic);
    }

    /// Run parallel submits in the background (see
    /// [`ReleaseBatch::submit_parallel`]), joining in once the helpers
    /// release less than a GiB per `per_gib` ([`Pace`]).
    pub(crate) fn set_background(&mut self, per_gib: Option<Duration>) {
        self.background = per_gib;
    }

    /// Releases the queued runs: the anonymous ones by one
    /// `process_madvise`, or one `madvise` per run where that is refused,
    /// fails, or is partial; the shared-file ones by one punch-hole each; a
    /// large amount split across threads when allowed.
    fn submit(&mut self) {
        let (n, bytes, np, pbytes) = (self.n, self.bytes, self.np, self.punch_bytes);
        (self.n, self.bytes, self.np, self.punch_bytes) = (0, 0, 0, 0);
        if n + np == 0 {
            return;
        }
        let total = bytes + pbytes;
        let mut k = (total / PARALLEL_SHARE_MIN).min(self.threads as u64) as usize;
        if n == 0 {
            // Punches of one file serialise on its lock: one thread per file.
            k = k.min(distinct_files(&self.punches[..np]));
        }
        if k > 1 && total >= PARALLEL_MIN_BYTES {
            self.submit_parallel(n, np, k);
            return;
        }
        self.submit_anonymous(n, bytes);
        for i in 0..np {
            let p = self.punches[i];
            if let Err(e) = self.reg.punch(p.fd, p.off, p.hva, p.len, self.faults) {
                self.error(e);
            }
        }
    }

    /// Releases the first `n` queued anonymous runs (`bytes` in all) on
    /// this thread.
    fn submit_anonymous(&mut self, n: usize, bytes: u64) {
        if n == 0 {
            return;
        }
        let reg = self.reg;
        let c = &reg.counters;
        let state = reg.batching.load(Ordering::Relaxed);
        let injected = self.faults.batch_release.should_fail();
        if n > 1 && state != BATCH_REFUSED && !injected {
            c.calls.fetch_add(1, Ordering::Relaxed);
            // SAFETY: every iovec is a page-aligned run inside a registered
            // region, which the caller keeps mapped for the table's
            // lifetime; the table has unmapped the runs and waited for
            // readers (as for `madvise` below). PIDFD_SELF names this
            // process; the kernel only reads the `n` iovecs.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    PIDFD_SELF,
                    self.iov.as_ptr(),
                    n,
                    libc::MADV_DONTNEED,
                    0,
                )
            };
            if r >= 0 && r as u64 == bytes {
                if state == BATCH_UNKNOWN {
                    reg.batching.store(BATCH_WORKS, Ordering::Relaxed);
                }
                c.batched_calls.fetch_add(1, Ordering::Relaxed);
                c.batched_runs.fetch_add(n as u64, Ordering::Relaxed);
                c.bytes.fetch_add(bytes, Ordering::Relaxed);
                return;
            }
            if r < 0 && state == BATCH_UNKNOWN {
                let errno = std::io::Error::last_os_error().raw_os_error();
                if let Some(libc::EINVAL | libc::EBADF | libc::ENOSYS | libc::EPERM | libc::ESRCH) =
                    errno
                {
                    reg.batching.store(BATCH_REFUSED, Ordering::Relaxed);
                }
            }
        }
        if n > 1 {
            c.batch_fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        for i in 0..n {
            let v = self.iov[i];
            if let Err(e) = reg.madvise(v.iov_base as u64, v.iov_len as u64, self.faults) {
                self.error(e);
            }
        }
    }

    /// Releases the `n` queued anonymous runs and the `np` queued
    /// shared-file runs with up to `k` threads. The runs are sorted into
    /// *lanes*: one for all anonymous runs, one per file. Each lane is seen
    /// as one concatenated range, cut into chunks ([`claim_size`]: whole
    /// 2 MiB pieces), which the caller's thread and `k - 1` helpers
    /// claim one at a time from the lane's cursor. A thread works on one
    /// lane until it is empty, then picks the next: first a lane no thread
    /// has started (from lane `i` on for thread `i`), only then one another
    /// thread is still on. A file's punch-holes serialise on the file's
    /// lock in the kernel, so threads on different files are what makes a
    /// shared-file release parallel. The caller joins the helpers
    /// before returning, so the flush order (release, then
    /// `invalidate_range_end`, then freeing tables) is unchanged.
    ///
    /// Helpers are named `gmm-release` and run `SCHED_IDLE`: they only use
    /// a core nothing else wants (a running vCPU of another VM keeps its
    /// core), while the caller keeps its own priority. Because work is
    /// claimed chunk by chunk, a helper that gets no CPU only delays the
    /// caller by the chunk it holds, at most a `2k`th of what was left when
    /// it claimed it (and an idle core pulls it over as soon as the caller
    /// waits); a helper that starts late finds little or nothing left.
    ///
    /// **In the background** ([`ReleaseBatch::set_background`]) the caller
    /// does not work at first: `k` helpers do, all `SCHED_IDLE`, claiming
    /// at most [`BACKGROUND_CLAIM_MAX`] at a time, while the caller sleeps.
    /// So on a host whose cores are busy (another VM's vCPUs) the release
    /// takes only CPU time nobody else wants; on an idle host both cores
    /// still work. The caller's *pace* bounds the wait: once a window
    /// shows the helpers releasing slower than the slowest pace it accepts
    /// ([`Pace`]: they are starved), the caller claims what is left at its
    /// own priority, as in a foreground release, so a starved release
    /// still ends (no privilege is needed for that: a thread made
    /// `SCHED_IDLE` could not return to normal priority unprivileged), at
    /// that pace or faster. The caller also joins at once if any helper
    /// could not be spawned.
    fn submit_parallel(&mut self, n: usize, np: usize, k: usize) {
        let anon = self.iov[..n].iter().map(|v| Piece {
            hva: v.iov_base as u64,
            len: v.iov_len as u64,
            file: None,
        });
        let max_claim = if self.background.is_some() {
            BACKGROUND_CLAIM_MAX
        } else {
            u64::MAX
        };
        let lanes = Lane::sort(anon, &self.punches[..np], k, max_claim);
        let lanes = &lanes[..];
        let bytes: u64 = lanes.iter().map(|l| l.bytes).sum();
        let pace = self.background.map(|per_gib| Pace::new(per_gib, k, bytes));
        let reg = self.reg;
        let faults = self.faults;
        // Claims chunks until none is left in any lane; returns the first
        // error. A thread picks a lane nobody has started yet (its file's
        // lock is free), from its own index on, and only then one another
        // thread is working on.
        // A helper made slow (`release_helper_slow`) pauses before each
        // claim.
        let work = |me: usize, pause: Option<Duration>| -> Option<ReleaseError> {
            let mut first = None;
            let order = |j: usize| (me + j) % lanes.len();
            loop {
                let pick = (0..lanes.len())
                    .map(order)
                    .find(|&l| lanes[l].untouched())
                    .or_else(|| (0..lanes.len()).map(order).find(|&l| lanes[l].has_work()));
                let Some(l) = pick else {
                    return first;
                };
                loop {
                    if let Some(p) = pause {
                        std::thread::sleep(p);
                    }
                    match lanes[l].release_chunk(reg, faults) {
                        None => break,
                        Some(Err(e)) => {
                            first.get_or_insert(e);
                        }
                        Some(Ok(())) => {}
                    }
                }
            }
        };
        let mut errs: [Option<ReleaseError>; MAX_RELEASE_THREADS + 1] = Default::default();
        let tids: [std::sync::atomic::AtomicI32; MAX_RELEASE_THREADS] = Default::default();
        let flusher = FlusherCpu::of_caller();
        // Helpers done so far, for a background caller's wait.
        let finished = (std::sync::Mutex::new(0usize), std::sync::Condvar::new());
        // Helpers past their thread start, for every worker's wait before
        // its first claim ([`HELPER_START_WAIT`]).
        let started = std::sync::atomic::AtomicUsize::new(0);
        // In the background every worker is a helper, helper 0 included.
        let first_helper = usize::from(pace.is_none());
        let helpers_wanted = k - first_helper;
        errs[MAX_RELEASE_THREADS] = std::thread::scope(|sc| {
            let mut helpers: [Option<std::thread::ScopedJoinHandle<'_, Option<ReleaseError>>>;
                MAX_RELEASE_THREADS] = Default::default();
            for (i, (h, tid)) in helpers
                .iter_mut()
                .zip(&tids)
                .enumerate()
                .take(k)
                .skip(first_helper)
            {
                let injected = self.spawn_fail.is_some_and(|f| f.should_fail());
                // No thread: the caller claims its chunks instead.
                *h = if injected {
                    None
                } else {
                    let work = &work;
                    let finished = &finished;
                    let started = &started;
                    let stall = pace.is_some() && self.stall.is_some_and(|f| f.should_fail());
                    let slow = pace.is_some() && self.slow.is_some_and(|f| f.should_fail());
                    let panic = self.helper_panic.is_some_and(|f| f.should_fail());
                    std::thread::Builder::new()
                        .name(RELEASE_THREAD_NAME.into())
                        .spawn_scoped(sc, move || {
                            // The thread start (its mappings) is behind us.
                            started.fetch_add(1, Ordering::Release);
                            // Leave first, at the flusher's priority: made
                            // SCHED_IDLE on the flusher's CPU, it would not
                            // run again to leave it.
                            if let Some(f) = flusher {
                                f.leave();
                            }
                            set_idle_priority();
                            // SAFETY: gettid has no preconditions.
                            tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                            // From here on, however the helper ends (a
                            // panic included), its tid is retired and the
                            // background caller is told it is done.
                            let _done = HelperDone { tid, finished };
                            if stall {
                                // Injected starvation: no CPU until the
                                // caller has claimed everything.
                                while lanes.iter().any(Lane::has_work) {
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                            }
                            if panic {
                                let held = lanes.iter().find_map(Lane::claim);
                                panic!("injected: a release helper panics holding {held:?}");
                            }
                            // No claim before the other helpers are through
                            // their thread start either.
                            wait_started(started, helpers_wanted);
                            work(i, slow.then_some(SLOW_HELPER_PAUSE))
                        })
                        .ok()
                };
            }
            let spawned = helpers.iter().filter(|h| h.is_some()).count();
            match pace {
                // Background: sleep while the helpers work, until they are
                // done or a window shows them starved (then join in below).
                Some(p) if spawned == k => {
                    let released = || lanes.iter().map(|l| l.released.load(Ordering::Relaxed));
                    let mut done = finished.0.lock().unwrap_or_else(|e| e.into_inner());
                    let (mut end, mut at) = (Instant::now() + p.window, 0u64);
                    while *done < spawned {
                        let now = Instant::now();
                        let Some(left) = end.checked_duration_since(now).filter(|d| !d.is_zero())
                        else {
                            let r: u64 = released().sum();
                            if r.saturating_sub(at) < p.floor.min(bytes.saturating_sub(at)) {
                                self.joins += 1;
                                break;
                            }
                            (end, at) = (now + p.window, r);
                            continue;
                        };
                        done = finished
                            .1
                            .wait_timeout(done, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
                // A helper is missing: its share is the caller's at once.
                Some(_) => self.joins += 1,
                // Let a helper queued on this CPU run and leave it (above),
                // and let every helper through its thread start before the
                // first claim (bounded: [`HELPER_START_WAIT`]).
                None if spawned > 0 => wait_started(&started, spawned),
                None => {}
            }
            let mine = work(0, None);
            // Nothing is left to claim: what a helper still holds is now on
            // the flusher's critical path, so it gets the flusher's policy
            // (an idle-priority thread preempted mid-chunk can wait 100+ ms
            // for its next turn on a busy core; measured 188-281 ms vs
            // ~65 ms). The flusher waits meanwhile, so together they still
            // use no more CPU than the flusher alone.
            for tid in &tids {
                boost_tid(tid);
            }
            for (i, h) in helpers.iter_mut().enumerate() {
                if let Some(t) = h.take() {
                    // A panicking helper should not happen (madvise only);
                    // if it does, the chunk it held is released here
                    // instead (`MADV_DONTNEED` is idempotent; fault point
                    // `release_helper_panic`).
                    errs[i] = t.join().unwrap_or_else(|_| {
                        for lane in lanes {
                            lane.cursor.store(0, Ordering::Relaxed);
                        }
                        work(0, None)
                    });
                }
            }
            mine
        });
        self.parallel += 1;
        for e in errs.into_iter().flatten() {
            self.error(e);
        }
    }

    /// Releases what is queued; returns the first error of the whole batch,
    /// after everything was attempted, how many submits were split across
    /// threads and in how many background ones the caller joined in.
    pub(crate) fn finish(mut self) -> (Result<(), ReleaseError>, u64, u64) {
        self.submit();
        let r = self.first_err.take().map_or(Ok(()), Err);
        (r, self.parallel, self.joins)
    }
}

impl BackingRegistry {
    pub(crate) fn new() -> BackingRegistry {
        BackingRegistry {
            regions: Mutex::new(Vec::new()),
            counters: ReleaseCounters::default(),
            batching: AtomicU64::new(BATCH_UNKNOWN),
            unreleased: std::sync::Mutex::new(Vec::new()),
            unreleased_bytes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(crate) fn register(&self, r: BackingRegion) -> Result<BackingId, BackingError> {
        let align = match r.kind {
            BackingKind::Hugetlb { page_size, .. } => page_size.max(PAGE_SIZE),
            _ => PAGE_SIZE,
        };
        let end = r.hva.0.checked_add(r.len);
        let invalid = BackingError::Invalid {
            hva: r.hva,
            len: r.len,
        };
        let Some(end) = end else { return Err(invalid) };
        if r.len == 0
            || !align.is_power_of_two()
            || !r.hva.0.is_multiple_of(align)
            || !r.len.is_multiple_of(align)
        {
            return Err(invalid);
        }
        let mut regions = lock(&self.regions);
        if regions.iter().any(|x| x.start < end && r.hva.0 < x.end) {
            return Err(BackingError::Overlap {
                hva: r.hva,
                len: r.len,
            });
        }
        regions.push(Region {
            start: r.hva.0,
            end,
            kind: r.kind,
            partial: BTreeMap::new(),
        });
        regions.sort_by_key(|x| x.start);
        let id = regions.iter().position(|x| x.start == r.hva.0).unwrap_or(0);
        Ok(BackingId(id))
    }

    /// Whether `[hva, hva + len)` lies inside registered regions with no gap.
    pub(crate) fn covers(&self, hva: u64, len: u64) -> bool {
        let Some(end) = hva.checked_add(len) else {
            return false;
        };
        let regions = lock(&self.regions);
        let mut at = hva;
        for r in regions.iter() {
            if r.end <= at {
                continue;
            }
            if r.start > at {
                return false;
            }
            at = r.end;
            if at >= end {
                return true;
            }
        }
        false
    }

    /// A page of `[hva, hva + len)` is mapped again: forget partial releases
    /// there, and unreleased ranges (in use again: never to be released
    /// behind the new mapping's back).
    pub(crate) fn note_mapped(&self, hva: u64, len: u64) {
        self.forget_unreleased(hva, len);
        let mut regions = lock(&self.regions);
        for r in regions.iter_mut() {
            if r.partial.is_empty() || r.end <= hva || hva + len <= r.start {
                continue;
            }
            if let BackingKind::Hugetlb { page_size, .. } = r.kind {
                let mut a = hva.max(r.start);
                let end = (hva + len).min(r.end);
                while a < end {
                    let base = a & !(page_size - 1);
                    if let Some(bits) = r.partial.get_mut(&base) {
                        let i = ((a - base) / PAGE_SIZE) as usize;
                        bits[i / 64] &= !(1 << (i % 64));
                        if bits.iter().all(|&b| b == 0) {
                            r.partial.remove(&base);
                        }
                    }
                    a += PAGE_SIZE;
                }
            }
        }
    }

    /// Huge pages that are partly released and so still allocated.
    pub(crate) fn partial_huge_pages(&self) -> usize {
        lock(&self.regions).iter().map(|r| r.partial.len()).sum()
    }

    /// A release batch for one flush, with the table's injection points.
    pub(crate) fn batch<'a>(&'a self, faults: &'a FaultInjection) -> ReleaseBatch<'a> {
        ReleaseBatch {
            reg: self,
            faults,
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH_RUNS],
            n: 0,
            bytes: 0,
            punches: [NO_PUNCH; BATCH_RUNS],
            np: 0,
            punch_bytes: 0,
            first_err: None,
            threads: 1,
            spawn_fail: None,
            stall: None,
            slow: None,
            helper_panic: None,
            background: None,
            parallel: 0,
            joins: 0,
        }
    }

    /// Release `[hva, hva + len)`, clipped to registered regions, through
    /// `batch`: anonymous and shared-file runs are queued there, other
    /// kinds are released at once (under the registry lock, which guards
    /// their partial huge-page bookkeeping). Errors are counted and kept in
    /// the batch.
    ///
    /// A full batch is submitted with the registry lock dropped: a submit
    /// may take long (a parallel release of gigabytes), and maps and faults
    /// take this lock.
    pub(crate) fn release_into(&self, hva: u64, len: u64, batch: &mut ReleaseBatch<'_>) {
        let end = hva.saturating_add(len);
        let mut at = hva;
        let mut covered = 0u64;
        loop {
            if batch.full() {
                batch.submit();
            }
            let mut regions = lock(&self.regions);
            let mut full = false;
            for r in regions.iter_mut() {
                let s = at.max(r.start);
                let e = end.min(r.end);
                if s >= e {
                    continue;
                }
                let queued = matches!(
                    r.kind,
                    BackingKind::Anonymous | BackingKind::SharedFile { .. }
                );
                if queued && batch.full() {
                    full = true;
                    break;
                }
                if let Err(err) = self.release_in(r, s, e, batch) {
                    batch.error(err);
                }
                covered += e - s;
                at = e;
            }
            if !full {
                break;
            }
        }
        if covered < len {
            self.counters
                .outside
                .fetch_add(len - covered, Ordering::Relaxed);
        }
    }

    /// Releases `[s, e)` of region `r`: anonymous and shared-file runs are
    /// queued in `batch` (which has room: the caller checked), the other
    /// kinds released now.
    fn release_in(
        &self,
        r: &mut Region,
        s: u64,
        e: u64,
        batch: &mut ReleaseBatch<'_>,
    ) -> Result<(), ReleaseError> {
        let faults = batch.faults;
        match r.kind.clone() {
            BackingKind::Anonymous => {
                batch.push(s, e - s);
                Ok(())
            }
            BackingKind::SharedFile { fd, offset } => {
                batch.push_punch(Punch {
                    fd,
                    off: offset + (s - r.start),
                    hva: s,
                    len: e - s,
                });
                Ok(())
            }
            BackingKind::Simulated { hook } => {
                self.count(e - s);
                if let Some(h) = hook {
                    h(Hva(s), e - s);
                }
                Ok(())
            }
            BackingKind::Hugetlb { page_size, file } => {
                let mut whole: Vec<(u64, u64)> = Vec::new();
                let first = s.next_multiple_of(page_size);
                let last = e & !(page_size - 1);
                if first < last {
                    whole.push((first, last));
                }
                // The partial head and tail: record the 4 KiB pages; a huge
                // page whose every sub-page is released goes too.
                for (ps, pe) in [(s, first.min(e)), (last.max(first).max(s), e)] {
                    if ps >= pe {
                        continue;
                    }
                    let base = ps & !(page_size - 1);
                    let nbits = (page_size / PAGE_SIZE) as usize;
                    let bits = r
                        .partial
                        .entry(base)
                        .or_insert_with(|| vec![0u64; nbits.div_ceil(64)]);
                    let mut a = ps;
                    while a < pe {
                        let i = ((a - base) / PAGE_SIZE) as usize;
                        bits[i / 64] |= 1 << (i % 64);
                        a += PAGE_SIZE;
                    }
                    let full = (0..nbits).all(|i| bits[i / 64] & (1 << (i % 64)) != 0);
                    if full {
                        r.partial.remove(&base);
                        whole.push((base, base + page_size));
                    }
                }
                let mut res = Ok(());
                for (ws, we) in whole {
                    let one = match file {
                        None => self.madvise(ws, we - ws, faults),
                        Some((fd, offset)) => {
                            self.punch(fd, offset + (ws - r.start), ws, we - ws, faults)
                        }
                    };
                    if res.is_ok() {
                        res = one;
                    }
                }
                res
            }
        }
    }

    fn count(&self, bytes: u64) {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `MADV_DONTNEED` of `[s, s + len)`, retried; recorded as unreleased
    /// if every attempt fails.
    fn madvise(&self, s: u64, len: u64, faults: &FaultInjection) -> Result<(), ReleaseError> {
        self.attempt(s, len, None, "madvise(MADV_DONTNEED)", || {
            if faults.madvise.should_fail() {
                return Err(INJECTED_ERRNO);
            }
            // SAFETY: [s, s+len) lies inside a registered region, which the
            // caller mapped and keeps mapped for the table's lifetime; the
            // table has unmapped it and waited for readers, so dropping its
            // contents is what every user of this range asked for.
            let rc =
                unsafe { libc::madvise(s as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            Ok(())
        })
    }

    /// Punch-hole of `[off, off + len)` of `fd` (host range `[s, s + len)`),
    /// retried; recorded as unreleased if every attempt fails.
    fn punch(
        &self,
        fd: RawFd,
        off: u64,
        s: u64,
        len: u64,
        faults: &FaultInjection,
    ) -> Result<(), ReleaseError> {
        self.attempt(
            s,
            len,
            Some((fd, off)),
            "fallocate(PUNCH_HOLE|KEEP_SIZE)",
            || {
                let (Ok(off), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
                    return Err(libc::EINVAL);
                };
                if faults.punch_hole.should_fail() {
                    return Err(INJECTED_ERRNO);
                }
                // SAFETY: fallocate on a caller-owned fd; no memory of ours is touched.
                let rc = unsafe {
                    libc::fallocate(
                        fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        l,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
                }
                Ok(())
            },
        )
    }

    /// Runs one release call up to [`RELEASE_ATTEMPTS`] times (both calls
    /// are idempotent). Success releases the range, so it leaves the
    /// unreleased list; failure puts it there.
    fn attempt(
        &self,
        s: u64,
        len: u64,
        punch: Option<(RawFd, u64)>,
        op: &'static str,
        mut call: impl FnMut() -> Result<(), i32>,
    ) -> Result<(), ReleaseError> {
        let c = &self.counters;
        let mut errno = 0;
        for _ in 0..RELEASE_ATTEMPTS {
            c.calls.fetch_add(1, Ordering::Relaxed);
            match call() {
                Ok(()) => {
                    c.bytes.fetch_add(len, Ordering::Relaxed);
                    self.forget_unreleased(s, len);
                    return Ok(());
                }
                Err(e) => {
                    errno = e;
                    c.failed_attempts.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !crate::mutation::broken(crate::mutation::Rule::UnreleasedRecord) {
            self.record_unreleased(Unreleased { hva: s, len, punch });
        }
        Err(ReleaseError {
            hva: Hva(s),
            len,
            op,
            errno,
            attempts: RELEASE_ATTEMPTS,
        })
    }

    fn record_unreleased(&self, u: Unreleased) {
        let mut list = self.unreleased.lock().unwrap_or_else(|e| e.into_inner());
        // A range already on the list (a teardown retry that failed again)
        // is not counted twice.
        Self::cut(&mut list, u.hva, u.len);
        list.push(u);
        self.unreleased_bytes.store(
            list.iter().map(|u| u.len).sum(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Removes `[hva, hva + len)` from `list`, splitting ranges it cuts.
    fn cut(list: &mut Vec<Unreleased>, hva: u64, len: u64) {
        let end = hva + len;
        let mut i = 0;
        while i < list.len() {
            let u = list[i];
            let (us, ue) = (u.hva, u.hva + u.len);
            if ue <= hva || end <= us {
                i += 1;
                continue;
            }
            list.swap_remove(i);
            let piece = |a: u64, b: u64| Unreleased {
                hva: a,
                len: b - a,
                punch: u.punch.map(|(fd, off)| (fd, off + (a - us))),
            };
            if us < hva {
                list.push(piece(us, hva));
            }
            if end < ue {
                list.push(piece(end, ue));
            }
        }
    }

    /// `[hva, hva + len)` was released or is in use again: not unreleased.
    /// One relaxed load while nothing is on the list.
    pub(crate) fn forget_unreleased(&self, hva: u64, len: u64) {
        if self
            .unreleased_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            return;
        }
        let mut list = self.unreleased.lock().unwrap_or_else(|e| e.into_inner());
        Self::cut(&mut list, hva, len);
        self.unreleased_bytes.store(
            list.iter().map(|u| u.len).sum(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Bytes whose release failed and that are still allocated.
    pub(crate) fn unreleased_bytes(&self) -> u64 {
        self.unreleased_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The unreleased ranges, sorted.
    pub(crate) fn unreleased(&self) -> Vec<(Hva, u64)> {
        let list = self.unreleased.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(Hva, u64)> = list.iter().map(|u| (Hva(u.hva), u.len)).collect();
        v.sort_by_key(|&(h, _)| h.0);
        v
    }

    /// Releases every unreleased range again (the teardown's flush, once
    /// nothing can map them any more); returns the first error. A range
    /// that fails again stays on the list.
    pub(crate) fn retry_unreleased(&self, faults: &FaultInjection) -> Result<(), ReleaseError> {
        let list = std::mem::take(&mut *self.unreleased.lock().unwrap_or_else(|e| e.into_inner()));
        self.unreleased_bytes
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let mut first = None;
        for u in list {
            let r = match u.punch {
                None => self.madvise(u.hva, u.len, faults),
                Some((fd, off)) => self.punch(fd, off, u.hva, u.len, faults),
            };
            if let Err(e) = r {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's affinity.
    fn affinity() -> libc::cpu_set_t {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: reads the calling thread's affinity into `set`.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        assert_eq!(rc, 0);
        set
    }

    #[test]
    fn a_helper_on_the_flushers_cpu_moves_and_may_use_every_cpu_again() {
        let full = affinity();
        // SAFETY: CPU_COUNT reads a valid set.
        if unsafe { libc::CPU_COUNT(&full) } < 2 {
            eprintln!("SKIPPED: a_helper_on_the_flushers_cpu_moves...: needs 2 CPUs");
            return;
        }
        std::thread::spawn(move || {
            // Pin this thread to the first CPU it may use, as if queued there.
            let cpu = (0..libc::CPU_SETSIZE as usize)
                // SAFETY: CPU_ISSET reads a valid set, cpu < CPU_SETSIZE.
                .find(|&c| unsafe { libc::CPU_ISSET(c, &full) })
                .unwrap();
            // SAFETY: an all-zero cpu_set_t is a valid empty set.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `one` is valid, cpu < CPU_SETSIZE; pins this thread.
            unsafe {
                libc::CPU_SET(cpu, &mut one);
                assert_eq!(
                    libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one),
                    0
                );
            }
            // SAFETY: sched_getcpu has no preconditions.
            assert_eq!(unsafe { libc::sched_getcpu() }, cpu as i32);
            let f = FlusherCpu { allowed: full, cpu };
            f.leave();
            // SAFETY: as above.
            let now = unsafe { libc::sched_getcpu() };
            assert_ne!(now, cpu as i32, "the helper left the flusher's CPU");
            // SAFETY: CPU_EQUAL reads two valid sets.
            let all_again = unsafe { libc::CPU_EQUAL(&affinity(), &full) };
            assert!(all_again, "and may use every CPU again");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn claims_shrink_in_whole_pieces_and_cover_the_lane() {
        for bytes in [
            2 << 20,
            130 << 20,
            256 << 20,
            1 << 30,
            3 << 30,
            4 << 30,
            64 << 30,
        ] {
            for (k, max) in
                (1..=MAX_RELEASE_THREADS).flat_map(|k| [(k, u64::MAX), (k, BACKGROUND_CLAIM_MAX)])
            {
                let lane = Lane::new(
                    vec![Piece {
                        hva: 0,
                        len: bytes,
                        file: None,
                    }],
                    k,
                    max,
                );
                let (mut at, mut last, mut claims) = (0, u64::MAX, 0);
                while let Some((lo, hi)) = lane.claim() {
                    let c = hi - lo;
                    assert!(c <= max, "{bytes} {k}: {c} is over the cap {max}");
                    assert_eq!(lo, at, "{bytes} {k}: claims are contiguous");
                    assert!(c <= last, "{bytes} {k}: claims never grow");
                    assert_eq!(c % (2 << 20), 0, "{bytes} {k}: {c} is not whole pieces");
                    assert!(c >= PARALLEL_CHUNK || hi == bytes, "{bytes} {k}: {c}");
                    (at, last, claims) = (hi, c, claims + 1);
                }
                assert_eq!(at, bytes, "{bytes} {k}: the lane is covered");
                // Few claims: the first is a 2k-th of the lane, then they
                // shrink geometrically down to PARALLEL_CHUNK.
                assert!(
                    claims <= 8 * k as u64 + bytes / (64 << 20),
                    "{bytes} {k}: {claims}"
                );
            }
        }
        let lane = Lane::new(
            vec![Piece {
                hva: 0,
                len: 1 << 30,
                file: None,
            }],
            2,
            u64::MAX,
        );
        assert_eq!(lane.claim(), Some((0, 256 << 20)));
        assert_eq!(lane.claim(), Some((256 << 20, 448 << 20)));
    }
}
