//! The one way guest memory goes back to the host.
//!
//! [`VmMemory::release`] is called by everything that gives guest memory
//! back while the VM lives: [`crate::Vm::release_range`], the balloon's
//! inflate and its free page reporting. [`VmMemory::release_all`] is the
//! teardown's. Both go through the stage-2 gather, so the table's rule
//! holds for every release: unhook → invalidate (translation caches, KVM
//! side, a grace period) → release the backing by kind (`MADV_DONTNEED`,
//! punch-hole, whole huge pages).
//!
//! **Order of a release.**
//! 1. The runs are checked: non-empty, 4 KiB-aligned, each inside one
//!    region (callers add their own rules: leaf alignment, reserved low
//!    memory).
//! 2. Demand faults are armed first: the runs, rounded out to 2 MiB windows
//!    (clipped to their region), are registered with the userfaultfd
//!    handler, under its lock, which is dropped before the gather. A touch
//!    before the gather still finds the old page; a touch after it faults
//!    into the handler.
//! 3. guest_memfd only (no userfaultfd there, see below): leaves the table
//!    holds as *discarded* are made present again first, so that the
//!    gather releases them too.
//! 4. One gather unmaps every run (`Discard` or `Balloon` markers) and is
//!    finished: when `release` returns, the memory is back with the host.
//!
//! **guest_memfd.** The kernel refuses to register a guest_memfd mapping
//! with userfaultfd, so a released guest_memfd page comes back on its next
//! touch through KVM (or the host mapping) and the kernel alone: a fresh
//! zeroed page of the file, exactly what a demand fault would install, but
//! the table never hears of it and keeps its *discarded* marker. A later
//! release over such a page would find nothing present and release nothing
//! (the gather releases only what it unmaps), so step 3 first turns the
//! range's discarded leaves back into present ones
//! ([`guest_mm::Stage2Table::fault_in`], which waits for pending flushes
//! over them), and the gather then punches the whole range. The teardown
//! does the same over all of RAM. Ballooned pages a guest touches anyway
//! are not seen either: they are freed with the file.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use guest_mm::runs::merge_runs;
use guest_mm::{GatherStats, Gpa, PageState, UnmapMode};

use super::backing::{Backing, PageSize, SIZE_2M, SIZE_4K};
use super::stage2::{Stage2Error, TeardownStats};
use super::uffd::UffdError;
use super::VmMemory;

/// What a released page becomes in the stage-2 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseMode {
    /// *Discarded*: the page faults back in (zeros) on its next touch
    /// (`Vm::release_range`, free page reporting).
    Discard,
    /// *Ballooned*: the guest gave the page away; it comes back only
    /// through a deflate.
    Balloon,
}

impl From<ReleaseMode> for UnmapMode {
    fn from(m: ReleaseMode) -> Self {
        match m {
            ReleaseMode::Discard => UnmapMode::Discard,
            ReleaseMode::Balloon => UnmapMode::Balloon,
        }
    }
}

/// Errors of a release.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// A run that is empty, not 4 KiB-aligned or not inside one region.
    #[error("cannot release [{gpa:#x}, +{len:#x}): not whole 4 KiB pages inside one RAM region")]
    OutsideRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Arming demand faults failed (nothing was released).
    #[error(transparent)]
    Arm(#[from] UffdError),
    /// The gather refused or the host did not take memory back.
    #[error(transparent)]
    Stage2(#[from] Stage2Error),
}

/// Huge-page-backed RAM below this is released by the caller alone.
pub const HUGE_PARALLEL_MIN_BYTES: u64 = 512 << 20;

/// Threads of the teardown's release of `bytes` of guest RAM (the caller
/// plus `SCHED_IDLE` helpers named [`guest_mm::backing::RELEASE_THREAD_NAME`],
/// which claim a shrinking share of what is left; guest-mm `backing.rs`).
///
/// - 4 KiB pages: every core. Freeing 4 KiB pages costs ~70 ms per GiB,
///   which a second core nearly halves; the helpers run only on cores no
///   normal thread wants (a running vCPU of another VM keeps its core,
///   goal 4 of issue 12): all of them, in the background, while the
///   caller sleeps and watches their pace; if a window shows them starved
///   (slower than [`TEARDOWN_SLOWEST_PER_GIB`]), the caller, at its own
///   priority, claims whatever they have not got to.
/// - Huge pages (THP, or memfd with shmem THP enabled: `shmem_enabled`
///   other than `never`/`deny`): every core from
///   [`HUGE_PARALLEL_MIN_BYTES`], the caller alone below. A huge page is
///   freed in ~6 µs (~3 ms per GiB), so a helper's fixed costs (its
///   spawn and start, ~0.1 ms, and the wait for it:
///   [`guest_mm::backing::HELPER_START_WAIT`]) are a large part of a
///   small release. With two threads (`gmm bench teardown --page-size
///   2M`, 3 same-run rounds): 512 MiB 0.88-0.91x munmap (one thread
///   0.96-1.18x), 1 GiB 0.68-0.69x (0.94-1.10x), 2-4 GiB 0.61-0.71x
///   (1.07-1.21x). At 256 MiB two threads win only on an idle host
///   (2026-12-06, Intel host, six alternated pairs of builds, `--sizes
///   256M --reps 9 --no-naive --no-qemu --no-process`: 0.92-1.07x munmap,
///   median 1.01x, against 0.97-1.39x, median 1.19x); with the bench's
///   peers in the rotation (naive, QEMU, the `vmm` process: three pairs,
///   and one `gmm bench report`) the helper got no CPU in time in two of
///   the pairs and in the report (CPUs busy 0.87-0.94), and the
///   two-thread runs read 0.91-1.65x against 1.00-1.49x with one. A
///   helper that gets no CPU costs the caller its start wait and its
///   claim (a quarter of the release), which at ~1 ms of work is a gamble
///   on the host's idleness, so below 512 MiB the caller stays alone.
/// - memfd: holes are punched, which the kernel serialises on each file's
///   lock, so guest-mm gives each file its own lane; memfd RAM is split
///   into several files for this ([`super::backing::RegionFiles`]).
/// - guest_memfd is one file: its punches are never split (guest-mm runs
///   one thread per file), whatever this says.
pub fn teardown_release_threads(backing: Backing, page: PageSize, bytes: u64) -> usize {
    if frees_huge_pages(backing, page) && bytes < HUGE_PARALLEL_MIN_BYTES {
        1
    } else {
        cores()
    }
}

/// The slowest pace, per GiB, at which a teardown's release of 4 KiB
/// pages may run in the background (only on cores nothing else wants)
/// before the releasing thread joins in at its own priority: four times
/// what freeing a GiB of 4 KiB pages costs one core here (~70 ms), so
/// helpers that get a quarter of a core or more are left to it, and the
/// memory comes back within about four times its one-core time however
/// busy the host. The caller judges the pace window by window
/// (`set_release_background` in guest-mm): where no core is idle it joins
/// after the first window (70 ms at 4 GiB), not after the whole release's
/// time.
///
/// Why (issue 12, goal 4): a teardown that releases at normal priority
/// shares the cores with the running vCPUs and fault handlers of every
/// other VM. `gmm bench interference --only teardown` (3 rounds, 4 GiB of
/// 4 KiB pages torn down beside a looping VM on 2 cores): the victim's
/// demand-fault p99 rose by +1246-1345 % with the releasing thread at
/// normal priority, by +16-128 % with the whole release at idle priority
/// (an experiment with no bound: unbounded on a busy host), and by
/// +24 % with the background release; its loop rate dropped 17.7-25.1 %
/// in the foreground, not at all in the background.
///
/// Before, the bound was a deadline of half this (140 ms per GiB in all):
/// beside the bench's looping victim the helpers release a GiB in ~160 ms
/// (they share the cores, they are not starved), so the deadline passed
/// whenever they were a little slower: in one of two rounds traced with
/// `perf sched`, where the caller then released the last ~0.5 GiB at
/// normal priority (60+ ms of the victim's cores). Three
/// alternated pairs of 5-round runs (2026-12-05) showed no difference in
/// the victim's figures (fault p99 +16.4-37.5 % before, +19.3-25.0 %
/// after; the rounds spread from -17 % to +151 %): the release's own cost
/// to the neighbour is the kernel's (see `gmm bench interference
/// --only idle-release`).
///
/// Huge pages (~3 ms per GiB) are released in the foreground: the releasing
/// thread's wake-up when its helpers finish (0.15-0.6 ms on a VM host,
/// see `Reclaimer` in `vm.rs`) would be a large part of such a release.
pub const TEARDOWN_SLOWEST_PER_GIB: Duration = Duration::from_millis(280);

/// [`TEARDOWN_SLOWEST_PER_GIB`] for RAM of this kind (`None`, the
/// foreground, where the release frees huge pages).
pub fn teardown_pace(backing: Backing, page: PageSize) -> Option<Duration> {
    (!frees_huge_pages(backing, page)).then_some(TEARDOWN_SLOWEST_PER_GIB)
}

/// Whether releasing RAM of this kind frees huge pages: THP, or memfd
/// with shmem THP enabled (`shmem_enabled` other than `never`/`deny`).
fn frees_huge_pages(backing: Backing, page: PageSize) -> bool {
    static SHMEM_THP: OnceLock<bool> = OnceLock::new();
    match (backing, page) {
        (_, PageSize::Size4K) => false,
        (Backing::Memfd, PageSize::Size2M) => *SHMEM_THP.get_or_init(shmem_thp),
        (_, PageSize::Size2M) => true,
    }
}

/// This process's usable cores, read once (`available_parallelism` reads
/// cgroup files: [`VmMemory::new`] reads it so that a teardown does not).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES
        .get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

/// Whether shmem (memfd) may get transparent huge pages: the selected
/// value of `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is neither
/// `never` nor `deny` (unreadable: assume it may).
fn shmem_thp() -> bool {
    let Ok(s) = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled") else {
        return true;
    };
    shmem_thp_in(&s)
}

fn shmem_thp_in(setting: &str) -> bool {
    let selected = setting
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'));
    !matches!(selected, Some("never" | "deny"))
}

impl VmMemory {
    /// Releases the backing of every `(gpa, len)` run through **one**
    /// gather, leaving `mode` markers: the one release entry point of a
    /// running VM (see the module doc for the order of its steps). Returns
    /// the gather's statistics once the memory is back with the host.
    pub fn release(
        &self,
        runs: &[(u64, u64)],
        mode: ReleaseMode,
    ) -> Result<GatherStats, ReleaseError> {
        let regions = self.ram.regions();
        let mut windows = Vec::with_capacity(runs.len());
        for &(gpa, len) in runs {
            let region = regions.iter().find(|r| r.contains(gpa, len));
            let Some(r) = region
                .filter(|_| len != 0 && gpa.is_multiple_of(SIZE_4K) && len.is_multiple_of(SIZE_4K))
            else {
                return Err(ReleaseError::OutsideRam { gpa, len });
            };
            let lo = (gpa & !(SIZE_2M - 1)).max(r.gpa.0);
            let hi = (gpa + len).next_multiple_of(SIZE_2M).min(r.gpa.0 + r.len);
            windows.push((lo, hi - lo));
        }
        if runs.is_empty() {
            return Ok(GatherStats::default());
        }
        if let Some(f) = &self.faults {
            // Merged, the windows are registered once each (per region).
            f.arm(&merge_runs(windows))?;
        }
        if self.ram.backing() == Backing::GuestMemfd {
            for &(gpa, len) in runs {
                self.resync_discarded(gpa, len);
            }
        }
        let table = self.stage2.table();
        let mut g = table.gather();
        let mut first = None;
        for &(gpa, len) in runs {
            if let Err(e) = table.unmap_existing(&mut g, Gpa(gpa), len, mode.into()) {
                first.get_or_insert(e);
            }
        }
        let stats = g.finish().map_err(Stage2Error::from)?;
        self.stats
            .releases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match first {
            Some(e) => Err(Stage2Error::from(e).into()),
            None => Ok(stats),
        }
    }

    /// Releases all guest memory: a full-mm gather over the whole table
    /// (every backing released, one invalidation; 4 KiB pages, anonymous
    /// or memfd, split across all cores by idle-priority helpers, see
    /// [`teardown_release_threads`]), then the grace period that frees the
    /// table pages. The
    /// table is dying from then on: nothing maps, unmaps or faults any
    /// more. Only for teardown, once nothing runs the guest.
    pub fn release_all(&self) -> Result<TeardownStats, ReleaseError> {
        let t = Instant::now();
        let table = self.stage2.table();
        if self.ram.backing() == Backing::GuestMemfd {
            for r in self.ram.regions() {
                self.resync_discarded(r.gpa.0, r.len);
            }
        }
        let mut g = table.gather_full_mm();
        g.set_release_threads(teardown_release_threads(
            self.ram.backing(),
            self.ram.page_size(),
            self.ram.size().bytes(),
        ));
        g.set_release_background(teardown_pace(self.ram.backing(), self.ram.page_size()));
        table.teardown(&mut g).map_err(Stage2Error::from)?;
        let st = g.finish().map_err(Stage2Error::from)?;
        let gather_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        table.rcu_barrier();
        let barrier_ms = t.elapsed().as_secs_f64() * 1e3;
        let ts = table.stats();
        Ok(TeardownStats {
            gather_ms,
            barrier_ms,
            released_bytes: st.released_bytes,
            release_calls: ts.release_calls,
            parallel_releases: st.parallel_releases,
            background_joins: st.background_joins,
            table_pages_left: ts.table_pages,
            max_lock_hold_us: ts.lock_hold_max_ns as f64 / 1e3,
        })
    }

    /// guest_memfd: makes the *discarded* leaves of `[gpa, gpa + len)`
    /// present again (the kernel may have refilled them behind the table's
    /// back), so that a gather over the range releases them. Returns the
    /// leaves restored.
    fn resync_discarded(&self, gpa: u64, len: u64) -> u64 {
        let table = self.stage2.table();
        let mut walker = table.walker();
        let end = gpa + len;
        let mut leaves = Vec::new();
        let mut at = gpa;
        while at < end {
            // Pinned for at most 2 MiB of queries at a time, so a writer's
            // grace period never waits long for us.
            let stop = (at + SIZE_2M).min(end);
            let g = walker.pin();
            while at < stop {
                let next = match g.query(Gpa(at)) {
                    PageState::Discarded { size, .. } => {
                        let base = at & !(size.bytes() - 1);
                        leaves.push(base);
                        base + size.bytes()
                    }
                    PageState::Present { size, .. } | PageState::Ballooned { size, .. } => {
                        (at & !(size.bytes() - 1)) + size.bytes()
                    }
                    PageState::Unmapped => at + SIZE_4K,
                };
                at = next;
            }
        }
        // Unpinned: fault_in may wait for another releaser's pending flush.
        // A leaf that changed since the query (ballooned, restored by
        // someone else) is left as it is; a dying table refuses the unmap
        // that follows anyway.
        leaves
            .iter()
            .filter(|&&l| table.fault_in(Gpa(l)).is_ok())
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shmem_thp_reads_the_selected_setting() {
        assert!(!shmem_thp_in(
            "always within_size advise [never] deny force\n"
        ));
        assert!(!shmem_thp_in(
            "always within_size advise never [deny] force\n"
        ));
        assert!(shmem_thp_in(
            "always within_size [advise] never deny force\n"
        ));
        assert!(shmem_thp_in(
            "[always] within_size advise never deny force\n"
        ));
        assert!(shmem_thp_in("garbage"));
    }

    #[test]
    fn teardown_splits_4k_pages_and_large_huge_page_ram() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (small, large) = (HUGE_PARALLEL_MIN_BYTES - (2 << 20), HUGE_PARALLEL_MIN_BYTES);
        for bytes in [256 << 20, small, large] {
            for backing in [Backing::Anon, Backing::Memfd] {
                assert_eq!(
                    teardown_release_threads(backing, PageSize::Size4K, bytes),
                    cores
                );
            }
        }
        assert_eq!(
            teardown_release_threads(Backing::Anon, PageSize::Size2M, small),
            1
        );
        assert_eq!(
            teardown_release_threads(Backing::Anon, PageSize::Size2M, large),
            cores
        );
        let memfd_2m = teardown_release_threads(Backing::Memfd, PageSize::Size2M, small);
        assert_eq!(memfd_2m, if shmem_thp() { 1 } else { cores });
        assert_eq!(
            teardown_release_threads(Backing::Memfd, PageSize::Size2M, large),
            cores
        );
    }
}
