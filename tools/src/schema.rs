//! The JSON results of the benches: one typed struct per `--json` line.
//!
//! Each bench (`unmap`, `balloon`, `launch`, `service`, `linux`, `stress`,
//! `stress-vm`, `soak`) builds its result as one of these structs and prints it
//! with [`crate::emit_json`]; `gmm bench report` reads the saved line back into
//! the same struct (`serde_json::from_value`), so a bench and the report
//! cannot drift apart silently: a field renamed or removed on one side is
//! a "missing field" error on the other, shown as "not measured" in the
//! report. The rules:
//!
//! - unknown fields are ignored (no `deny_unknown_fields`): a bench may add
//!   figures before the report shows them;
//! - a plain field is required; `Option<T>` may be absent or `null` (serde
//!   reads a missing `Option` as `None`): figures a bench cannot always
//!   measure, and figures added after results were saved that `--from`
//!   must still read;
//! - per-repetition arrays (`*_all`) are raw data the report does not use;
//!   they default to empty.
//!
//! The structs of `gmm bench walk` and `gmm bench teardown` mirror what
//! those benches print today ([`WalkResult`], [`TeardownResult`]); the
//! benches themselves still build their own private structs, to be
//! switched to these. `gmm bench fault` and `gmm bench interference` are
//! described from their field lists ([`FaultResult`],
//! [`InterferenceResult`]). [`VmmRunResult`] is the part of `vmm run
//! --json` the report reads (vmm cannot depend on this crate).

use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------
// gmm bench unmap

/// `gmm bench unmap --size S --json`, and each size of `--sizes`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct UnmapResult {
    pub tool: String,
    pub size_bytes: u64,
    pub page_size: String,
    pub reps: u32,
    /// guest-mm grace periods use membarrier.
    pub membarrier: bool,
    /// Median unmap + finish through the gather.
    pub gather_ms: f64,
    /// Median single madvise over the region.
    pub limit_ms: f64,
    /// Median per-4K-page madvise under a mutex.
    pub per_page_ms: f64,
    /// Median sort + merge + per-run madvise.
    pub per_run_ms: f64,
    /// Median sort + merge part of `per_run_ms`.
    pub per_run_sort_ms: f64,
    /// Runs the per-run strategy found.
    pub per_run_runs: u64,
    pub ratio_vs_limit: f64,
    pub ratio_per_page_vs_gather: f64,
    pub ratio_per_run_vs_gather: f64,
    /// Longest table-lock hold during the unmap, over all repetitions.
    pub max_lock_hold_us: f64,
    /// Median over repetitions of each repetition's longest hold.
    pub median_rep_max_lock_hold_us: f64,
    /// Longest time the holder was on a CPU during one lock hold, over all
    /// repetitions (thread CPU time): a wall-clock maximum far above this
    /// one is the holder being descheduled, not work under the lock.
    pub max_lock_hold_cpu_us: f64,
    /// The environment's own stalls, measured in the same run: a busy loop
    /// reading the clock, with no lock and no work, right after the gathers
    /// for as long as all gather repetitions took together (at least
    /// 100 ms); its longest gap between two clock reads (interrupts,
    /// hypervisor steal, preemption).
    pub env_max_stall_us: f64,
    /// Gaps over 50 µs in that loop.
    pub env_stalls_over_50us: u64,
    /// Upper bound of the 99th percentile lock hold (power-of-two
    /// histogram, capped at the maximum; results saved before the cap can
    /// hold a bucket's bound above the maximum, which the report caps).
    pub lock_hold_p99_us_upper: f64,
    /// Upper bound of the 99.9th percentile lock hold (same histogram,
    /// capped at the maximum).
    pub lock_hold_p999_us_upper: Option<f64>,
    /// The environment's own "holds": the same busy loop cut into sections
    /// of a fixed number of clock reads, calibrated to last as long as a
    /// median lock hold when nothing interrupts them (`env_hold_work_us`).
    /// No lock, no table: a section takes longer only when the environment
    /// stalls it. Upper bound of their 99.9th percentile (the lock holds'
    /// histogram, capped at the maximum), their longest, and how many
    /// there were.
    pub env_hold_p999_us_upper: Option<f64>,
    pub env_hold_max_us: Option<f64>,
    pub env_hold_work_us: Option<f64>,
    pub env_holds: Option<u64>,
    /// Lock holds of all repetitions: `[bucket upper bound µs, count]`.
    pub lock_hold_hist_us: Vec<(f64, u64)>,
    /// Table-lock acquisitions during one unmap.
    pub lock_acquisitions: u64,
    /// The per-page baseline's mutex hold (the whole loop).
    pub per_page_lock_hold_ms: f64,
    /// Release system calls made by the gather in one unmap.
    pub release_calls: u64,
    pub flushes: u64,
    pub forced_flushes: u64,
    pub fallback_batches: u64,
    pub batch_allocs: u64,
    pub tables_retired: u64,
    /// Table pages in bytes with the region mapped, before unmapping.
    pub table_bytes: u64,
    pub table_overhead_pct: f64,
    /// Median time to map the region (not part of any comparison).
    pub map_ms: f64,
    /// Median time to re-touch the region (fault it all back in).
    pub touch_ms: f64,
    /// 2M runs: the process's `AnonHugePages` after touching, lowest over
    /// all touches (how much of the region really was THP-backed).
    pub anon_huge_bytes_after_touch: Option<u64>,
    /// Resident bytes of the region after each strategy (worst repetition).
    pub rss_after_gather: u64,
    pub rss_after_limit: u64,
    pub rss_after_per_page: u64,
    pub rss_after_per_run: u64,
    /// Every strategy brought every byte back.
    pub released_ok: bool,
    /// Every repetition's figures, in run order.
    #[serde(default)]
    pub gather_ms_all: Vec<f64>,
    #[serde(default)]
    pub limit_ms_all: Vec<f64>,
    #[serde(default)]
    pub per_page_ms_all: Vec<f64>,
    #[serde(default)]
    pub per_run_ms_all: Vec<f64>,
    /// MiB the host kernel reported to its hypervisor (free page
    /// reporting) while this size was measured (all strategies, set-up
    /// included); null where the kernel has no counter, and in results
    /// saved before it was measured.
    #[serde(default)]
    pub host_reported_mib: Option<f64>,
    /// Each repetition's longest table-lock hold (µs).
    #[serde(default)]
    pub max_lock_hold_us_all: Vec<f64>,
    /// Per gather repetition: MiB the host kernel reported to its
    /// hypervisor (free page reporting) during the timed unmap. Empty
    /// where the kernel has no counter, and in results saved before it
    /// was measured.
    #[serde(default)]
    pub host_reported_mib_all: Vec<f64>,
    /// Each repetition's involuntary context switches of the unmapping
    /// thread during the timed unmap: a hold that spans one is wall time
    /// the holder spent descheduled (other load on the machine).
    #[serde(default)]
    pub preempted_during_unmap_all: Vec<u64>,
    pub targets: UnmapTargets,
}

/// The targets as `gmm bench unmap` evaluates them on one size.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct UnmapTargets {
    /// gather ≤ 1.10 × limit.
    pub gather_within_1_10x_limit: bool,
    /// per-page ≥ 10 × gather (retired in the report: bounded by the
    /// kernel, see `report.rs`).
    pub at_least_10x_per_page: bool,
    /// max lock hold ≤ 100 µs (wall clock).
    pub lock_hold_le_100us: bool,
    /// max lock hold ≤ 100 µs in the holder's CPU time.
    pub lock_hold_cpu_le_100us: bool,
    /// table overhead ≤ 0.2 % (meaningful at 4 KiB leaves).
    pub table_overhead_le_0_2pct: bool,
}

/// `gmm bench unmap --sizes A,B,.. --json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct UnmapMulti {
    pub tool: String,
    pub page_size: String,
    pub sizes: Vec<u64>,
    pub max_lock_hold_us_by_size: Vec<(u64, f64)>,
    pub median_rep_max_lock_hold_us_by_size: Vec<(u64, f64)>,
    pub lock_hold_p99_us_upper_by_size: Vec<(u64, f64)>,
    #[serde(default)]
    pub lock_hold_p999_us_upper_by_size: Vec<(u64, f64)>,
    /// The largest size's max hold is no larger than the smallest size's.
    pub lock_hold_not_larger_at_largest: bool,
    /// The same comparison on the median of each repetition's max hold.
    pub median_rep_max_not_larger_at_largest: bool,
    pub runs: Vec<UnmapResult>,
}

// ---------------------------------------------------------------------
// gmm bench walk (mirrors walk.rs's `WalkJson`)

// ---------------------------------------------------------------------
// gmm bench balloon

/// `gmm bench balloon --pattern P --json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BalloonResult {
    pub tool: String,
    pub pattern: String,
    pub size_bytes: u64,
    /// 4 KiB pages inflated.
    pub pages: u64,
    /// Coalesced runs of the PFNs.
    pub runs: u64,
    pub page_size: String,
    pub vm_mem_bytes: u64,
    pub per_chain: u64,
    pub notifies: u64,
    /// Release system calls of one inflate (batched `process_madvise`
    /// calls count once; the per-run baseline makes `runs` calls).
    pub release_syscalls: u64,
    pub reps: u32,
    pub membarrier: bool,
    /// Median first notify → last used buffer.
    pub inflate_ms: f64,
    /// Median of the device's own release time (arm + gather), summed over
    /// the notifies of one inflate.
    pub device_release_ms: f64,
    /// Median deflate of the same pages (first notify → last used buffer).
    pub deflate_ms: f64,
    /// Median one madvise per coalesced run, on a fresh VM's RAM (a KVM
    /// memslot, like the inflated memory).
    pub madvise_ms: f64,
    /// Median one madvise per 4 KiB page on a fresh VM's RAM (Cloud
    /// Hypervisor's pattern).
    pub per_page_ms: f64,
    /// As `madvise_ms`, on a plain anonymous mapping (no KVM).
    pub madvise_plain_ms: f64,
    /// As `per_page_ms`, on a plain anonymous mapping (no KVM).
    pub per_page_plain_ms: f64,
    /// madvise_ms / inflate_ms (1.0 = as fast; higher = faster).
    pub ratio_vs_madvise: f64,
    /// per_page_ms / inflate_ms.
    pub ratio_vs_per_page: f64,
    pub ratio_vs_madvise_plain: f64,
    pub ratio_vs_per_page_plain: f64,
    /// The target for this pattern, as the bench states it.
    pub target: String,
    pub target_met: bool,
    /// Process RSS drop across the inflate (median).
    pub rss_drop_bytes: u64,
    /// Inflated bytes still resident after each strategy (worst rep).
    pub resident_after_inflate: u64,
    pub resident_after_madvise: u64,
    pub resident_after_per_page: u64,
    /// Device errors over all repetitions.
    pub device_errors: u64,
    /// Every strategy brought every inflated page back, the device counted
    /// every page inflated and deflated, and no errors.
    pub released_ok: bool,
    #[serde(default)]
    pub inflate_ms_all: Vec<f64>,
    #[serde(default)]
    pub madvise_ms_all: Vec<f64>,
    #[serde(default)]
    pub per_page_ms_all: Vec<f64>,
    /// The guest's own driver's notify timing; absent with
    /// `--no-guest-notify` (its fields are then left out of the JSON).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub guest_notify: Option<BalloonGuestNotify>,
}

/// `gmm bench balloon`'s second VM: the embedded guest's own balloon
/// driver timing its `QueueNotify` writes (flattened into
/// [`BalloonResult`]: the field names are the bench's JSON names).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BalloonGuestNotify {
    /// The guest's own driver: p50/p99/max of its `QueueNotify` writes
    /// (rdtsc around the write) during an inflate of `vcpu_notify_bytes`,
    /// whose notifies release memory, µs.
    pub vcpu_notify_p99_us: f64,
    pub vcpu_notify_p50_us: f64,
    pub vcpu_notify_max_us: f64,
    pub vcpu_notify_count: u64,
    pub vcpu_notify_bytes: u64,
    /// The same for the deflate that follows (nothing to release).
    pub vcpu_notify_p99_us_idle: f64,
    pub vcpu_notify_p50_us_idle: f64,
    pub vcpu_notify_max_us_idle: f64,
    pub vcpu_notify_count_idle: u64,
    /// TSC rate used for the conversion (calibrated).
    pub tsc_khz: u64,
    /// `DeviceThread` (ioeventfd), `Vcpu` or `Mixed`.
    pub vcpu_notify_path: String,
}

// ---------------------------------------------------------------------
// gmm bench teardown (mirrors teardown.rs's `TeardownResult`)

/// The QEMU peer, once found and probed.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct QemuInfo {
    pub path: String,
    pub version: String,
    /// `kvm` if `-accel kvm` started, else `tcg` (with `-S` the guest never
    /// runs, so the accelerator only changes VM creation and teardown).
    pub accel: String,
    /// RAM backend object used.
    pub backend: String,
}

/// The result for one size (medians over the repetitions).
/// Fields a saved file may predate default.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct TeardownSize {
    /// Guest RAM (and baseline) size.
    pub size_bytes: u64,
    /// This row's backing (`anon`, `memfd`) and leaf size (`2M`: THP
    /// advice, `4K`), the same for the VM and its baselines.
    #[serde(default)]
    pub backing: String,
    #[serde(default)]
    pub page_size: String,
    /// `Vm::destroy` call: stop and join the vCPUs, hand off reclamation.
    pub destroy_ms: f64,
    /// From the start of `destroy` until guest RAM was back with the host
    /// (the whole-VM gather released it; RSS sampled then).
    pub reclaim_ms: f64,
    /// From the start of `destroy` until `wait_reclaim` returned (also the
    /// KVM VM dropped, the fault handler stopped, RAM unmapped).
    pub reclaim_done_ms: f64,
    /// This process's VmRSS sampled by the releasing thread the moment
    /// guest RAM was back (median).
    pub rss_at_memory_back_bytes: u64,
    /// Repetitions in which the thread waiting in `wait_reclaim` released
    /// the memory itself (the VM's reclaim thread had not begun yet).
    #[serde(default)]
    pub reclaims_by_waiter: u32,
    /// Repetitions in which the releasing thread joined its idle-priority
    /// release helpers before they were done (they fell below its slowest
    /// pace, or a helper could not be spawned):
    /// `TeardownStats::background_joins`.
    #[serde(default)]
    pub background_joins: u32,
    /// CPUs the VM's teardown kept busy: the process's CPU time from the
    /// start of `destroy` until `wait_reclaim` returned, over that wall
    /// time (median). Its idle-priority helpers only get idle CPUs, so
    /// beside busy cores it falls below `split_cores`. Null in results
    /// saved before it was measured.
    #[serde(default)]
    pub reclaim_cores: Option<f64>,
    #[serde(default)]
    pub reclaim_cores_all: Vec<f64>,
    /// The same over the *split* baseline's timed release (plain threads at
    /// normal priority).
    #[serde(default)]
    pub split_cores: Option<f64>,
    #[serde(default)]
    pub split_cores_all: Vec<f64>,
    /// The same over the *split beside KVM* baseline's timed release.
    #[serde(default)]
    pub split_kvm_cores: Option<f64>,
    #[serde(default)]
    pub split_kvm_cores_all: Vec<f64>,
    /// Parts of destroy and reclaim as the VM measured them: stopping and
    /// joining the vCPUs, the reclaim thread's own end-to-end time, dropping
    /// the KVM VM, the stage-2 gather (zap + release), its final grace
    /// period (table pages freed), the munmap of guest RAM.
    pub destroy_stop_vcpus_ms: f64,
    pub reclaim_internal_ms: f64,
    pub reclaim_vm_drop_ms: f64,
    pub reclaim_stage2_gather_ms: f64,
    pub reclaim_stage2_barrier_ms: f64,
    pub reclaim_unmap_ms: f64,
    /// The reclaim thread's time not in the parts above (thread hand-off,
    /// fault handler stop, stage-2 table drop), per repetition, median.
    pub reclaim_other_ms: f64,
    /// Host-side populate of the VM (or guest run + top-up), for context.
    pub populate_ms: f64,
    /// One munmap (+ close for memfd) of an equally populated mapping.
    pub munmap_ms: f64,
    /// Per-4 KiB release under one lock, then munmap (+ close).
    pub naive_ms: f64,
    /// reclaim_ms / munmap_ms.
    pub ratio_vs_munmap: f64,
    /// The *split* baseline (4 KiB rows on 2+ cores; null elsewhere): the
    /// same release done at once by `split_threads` plain threads, no VM
    /// (anon: one `madvise(MADV_DONTNEED)` of a share each; memfd: the
    /// VM's files punched whole, one thread each), then munmap (+ close).
    #[serde(default)]
    pub split_ms: Option<f64>,
    #[serde(default)]
    pub split_threads: Option<u32>,
    /// split_ms / munmap_ms: the kernel's bound of a release split that
    /// many ways in this run (medians).
    #[serde(default)]
    pub split_ratio_vs_munmap: Option<f64>,
    /// The *split with KVM* baseline (every row): a VM
    /// populated as this row's VM (same `populate`), its vCPUs stopped,
    /// whose guest RAM as many plain threads as the VM's own teardown uses
    /// (`split_kvm_threads`) release at once (in chunks sized as the VM's
    /// release sizes them, whole regions on one thread; memfd: one thread
    /// per file)
    /// while the KVM VM
    /// exists, so KVM's MMU notifier (zapping whatever shadow or TDP
    /// entries the guest's run left) runs in every release: the bound of a
    /// release split that many ways beside KVM. Release only (the VM's
    /// teardown afterwards is not timed).
    #[serde(default)]
    pub split_kvm_ms: Option<f64>,
    /// split_kvm_ms / munmap_ms (medians).
    #[serde(default)]
    pub split_kvm_ratio_vs_munmap: Option<f64>,
    /// Threads of the split beside KVM (the VM's own release's).
    #[serde(default)]
    pub split_kvm_threads: Option<u32>,
    /// naive_ms / reclaim_ms (how much faster the VM teardown is).
    pub ratio_naive_vs_reclaim: f64,
    /// QEMU quit → process exited (waitpid), when measured.
    pub qemu_ms: Option<f64>,
    /// QEMU's VmRSS once ready, before quit (median).
    pub qemu_rss_bytes: Option<u64>,
    /// QEMU's `AnonHugePages` once ready (median): all of its RAM at 2 MiB
    /// anonymous rows (QEMU advises huge pages), none at 4 KiB rows (started
    /// with `PR_SET_THP_DISABLE`).
    #[serde(default)]
    pub qemu_thp_bytes: Option<u64>,
    /// `vmm` shutdown request sent → process exited (waitpid).
    pub process_exit_ms: Option<f64>,
    /// `vmm` shutdown request sent → API answered.
    pub process_ack_ms: Option<f64>,
    /// The `vmm` process's own `teardown_ms` / `reclaim_ms` (its JSON).
    pub process_destroy_ms: Option<f64>,
    pub process_reclaim_ms: Option<f64>,
    /// The `vmm` process's VmRSS once ready, before shutdown (median).
    pub process_rss_bytes: Option<u64>,
    /// `vmm --api-sock --populate` (the service, its embedded guest running)
    /// SIGTERM sent → process exited (waitpid), anonymous backing only.
    pub service_sigterm_ms: Option<f64>,
    #[serde(default)]
    pub service_sigterm_ms_all: Vec<f64>,
    /// This process's VmRSS before the VM was created, once populated, and
    /// after reclaim (medians).
    pub rss_before_bytes: u64,
    pub rss_populated_bytes: u64,
    pub rss_after_bytes: u64,
    /// Guest RAM resident (mincore) just before destroy (median).
    pub guest_resident_bytes: u64,
    /// This process's `AnonHugePages` once populated, for the VM and the
    /// two baselines (medians): the teardown cost depends on how much of
    /// the memory the kernel backed with transparent huge pages.
    pub vm_thp_bytes: u64,
    pub munmap_thp_bytes: u64,
    pub naive_thp_bytes: u64,
    /// rss_populated - rss_after (median).
    pub rss_returned_bytes: u64,
    /// Every VM repetition was populated to the full size and its RSS came
    /// back to within 16 MiB of where it started.
    pub rss_back: bool,
    /// memfd: host `Shmem` (meminfo) freed by the VM teardown (median;
    /// system-wide, so other processes add noise).
    pub shmem_freed_bytes: Option<u64>,
    /// Issue 12, goal 3: memory back (reclaim_ms) <= 1.0 x munmap_ms.
    #[serde(default)]
    pub memory_back_within_1x_munmap: bool,
    /// Goal 3 at 4 KiB backing from 1 GiB: memory back <= 0.6 x munmap_ms
    /// (null where it does not apply: 2M leaves or below 1 GiB).
    #[serde(default)]
    pub memory_back_within_0_6x_munmap: Option<bool>,
    /// Goal 3: the destroy call <= 1 ms.
    #[serde(default)]
    pub destroy_within_1ms: bool,
    /// Every goal-3 target that applies to this row was met.
    #[serde(default)]
    pub targets_met: bool,
    /// The older targets: reclaim_ms <= 1.1 x munmap_ms, destroy_ms <= 5 ms.
    pub reclaim_within_1_10x_munmap: bool,
    pub destroy_within_5ms: bool,
    /// Target: process_exit_ms < qemu_ms; null when either was not measured.
    pub faster_than_qemu: Option<bool>,
    /// Every repetition, in run order.
    #[serde(default)]
    pub destroy_ms_all: Vec<f64>,
    /// Per VM repetition, in run order: MiB the host kernel reported to
    /// its hypervisor (free page reporting) from the start of `destroy`
    /// until `wait_reclaim` returned. Empty where the kernel has no
    /// counter, and in results saved before it was measured.
    #[serde(default)]
    pub host_reported_mib_all: Vec<f64>,
    #[serde(default)]
    pub reclaim_ms_all: Vec<f64>,
    #[serde(default)]
    pub reclaim_done_ms_all: Vec<f64>,
    #[serde(default)]
    pub reclaim_internal_ms_all: Vec<f64>,
    #[serde(default)]
    pub reclaim_stage2_gather_ms_all: Vec<f64>,
    #[serde(default)]
    pub munmap_ms_all: Vec<f64>,
    #[serde(default)]
    pub naive_ms_all: Vec<f64>,
    #[serde(default)]
    pub split_ms_all: Vec<f64>,
    #[serde(default)]
    pub split_kvm_ms_all: Vec<f64>,
    #[serde(default)]
    pub qemu_ms_all: Vec<f64>,
    #[serde(default)]
    pub process_exit_ms_all: Vec<f64>,
}

/// The `--json` object.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TeardownResult {
    /// `bench-teardown`.
    pub tool: String,
    /// `anon`, `memfd` or both (`anon,memfd`): the rows' backings (guest
    /// RAM, baselines and the QEMU backend); each row names its own.
    pub backing: String,
    /// Leaf sizes of the rows (`2M`, `4K` or `2M,4K`); each row names its own.
    pub page_size: String,
    /// Who populated guest RAM in the in-process VM: `host` or `guest`
    /// (the QEMU and vmm process peers are always populated host-side).
    pub populate: String,
    /// Repetitions per strategy.
    pub reps: u32,
    /// guest-mm grace periods use membarrier.
    pub membarrier: bool,
    /// Machine: CPUs available, RAM, kernel release.
    pub cores: usize,
    pub mem_total_bytes: u64,
    pub kernel: String,
    /// KVM modules loaded (kvm_intel, kvm_amd, kvm_pvm).
    #[serde(default)]
    pub kvm_modules: Vec<String>,
    /// The QEMU peer, or null when skipped.
    pub qemu: Option<QemuInfo>,
    /// Why the QEMU peer was skipped.
    pub qemu_skipped: Option<String>,
    /// Whether the `vmm` process was measured.
    pub process_measured: bool,
    /// What the munmap baseline is and whether it is like with like.
    pub munmap_baseline: String,
    /// MiB the host kernel reported to its hypervisor (free page
    /// reporting) while the whole bench ran; null where the kernel has no
    /// counter, and in results saved before it was measured.
    #[serde(default)]
    pub host_reported_mib: Option<f64>,
    #[serde(default)]
    pub sizes: Vec<TeardownSize>,
}

// ---------------------------------------------------------------------
// gmm bench launch

/// p50 / p90 / max of one figure, ms.
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy)]
pub struct Dist {
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

/// `gmm bench launch --json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LaunchResult {
    pub tool: String,
    pub count: u32,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub cores: usize,
    pub kvm_modules: Vec<String>,
    /// Rounds the cycles ran in (the rates are their medians).
    #[serde(default)]
    pub rounds: u32,
    /// Cycles / wall time (one VM at a time), median of the rounds.
    pub launches_per_sec: f64,
    /// Cycles / CPU time (user + system, all threads) spent in them,
    /// median of the rounds.
    pub launches_per_cpu_sec: f64,
    /// Each round's cycles / wall time.
    #[serde(default)]
    pub launches_per_sec_rounds: Vec<f64>,
    /// Each round's cycles / CPU time.
    #[serde(default)]
    pub launches_per_cpu_sec_rounds: Vec<f64>,
    /// All cycles / wall time of all of them.
    #[serde(default)]
    pub launches_per_sec_overall: f64,
    /// CPU time per cycle, ms.
    pub cpu_ms_per_launch: f64,
    pub wall_s: f64,
    /// What `boot_ms` means.
    pub boot_ms_is: String,
    pub boot_ms: Dist,
    /// `Vm::new` → every vCPU verified its RAM.
    pub ready_ms: Dist,
    /// The `Vm::destroy` call.
    pub teardown_ms: Dist,
    /// `destroy` → guest RAM back with the host.
    pub reclaim_ms: Dist,
    /// VMs kept alive at once for the RSS figure.
    pub alive_vms: u32,
    pub rss_base_bytes: u64,
    pub rss_alive_bytes: u64,
    /// Guest RAM resident (mincore) over the live VMs.
    pub guest_resident_bytes: u64,
    /// Stage-2 table pages over the live VMs (part of the overhead).
    pub stage2_table_bytes: u64,
    /// (rss_alive − rss_base − guest_resident) / alive_vms.
    pub rss_overhead_per_vm_bytes: Option<u64>,
    /// VmRSS once the live VMs were destroyed and reclaimed.
    pub rss_after_bytes: u64,
    /// 20 launches per second (the cycles run one at a time).
    pub meets_20_per_sec: bool,
    #[serde(default)]
    pub boot_ms_all: Vec<f64>,
    #[serde(default)]
    pub ready_ms_all: Vec<f64>,
    /// The guest's work alone, done by plain threads after every cycle
    /// (`guest_work.rs`); `None` with `--no-bound`.
    #[serde(default)]
    pub bound: Option<LaunchBound>,
}

/// The launch bench's bound: the default guest's write-and-verify of its
/// RAM by one plain thread per vCPU on anonymous memory mapped like guest
/// RAM, no VM (`gmm bench launch`, `bound`).
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct LaunchBound {
    /// Cycles / wall time, median of the rounds.
    pub launches_per_sec: f64,
    /// Cycles / CPU time, median of the rounds.
    pub launches_per_cpu_sec: f64,
    /// The lower of the two (the launch's own per-core rule).
    pub per_core: f64,
    /// Each round's cycles / wall time.
    pub launches_per_sec_rounds: Vec<f64>,
    /// CPU time per cycle, ms.
    pub cpu_ms_per_launch: f64,
    /// The VMs' per-core rate over the bound's.
    pub ratio_vs_bound: f64,
    /// The VMs' CPU time per launch minus the bound's: what the monitor
    /// and KVM add to the guest's own work, ms.
    pub monitor_cpu_ms_per_launch: f64,
}

// ---------------------------------------------------------------------
// gmm bench service (the Firecracker API)

/// `gmm bench service --json`.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct ServiceResult {
    pub vms: usize,
    pub mem_bytes: u64,
    pub idle_seconds: f64,
    pub launches_per_s: f64,
    /// Each launch: process spawn → `InstanceStart` answered, ms.
    pub launch_ms: Vec<f64>,
    pub launch_ms_p50: f64,
    /// `InstanceStart` → first `KVM_RUN` (the monitor's log), median.
    pub monitor_setup_ms_p50: Option<f64>,
    /// `InstanceStart` → the guest's first report from ring 3, median.
    pub first_guest_report_ms_p50: Option<f64>,
    pub idle_cpu_pct_per_vm: f64,
    pub idle_cpu_pct_max_vm: f64,
    pub idle_cpu_pct_all: Vec<f64>,
    /// One clock tick over the window, % of a core: figures below it read 0.
    pub idle_cpu_resolution_pct: f64,
    pub stop_to_exit_ms_p50: f64,
}

// ---------------------------------------------------------------------
// gmm bench linux

/// A monitor under test.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Monitor {
    /// Our `vmm`.
    Ours,
    /// QEMU (`-M microvm`).
    Qemu,
    /// Firecracker.
    Fc,
}

/// What guest RAM is made of in `gmm bench linux`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinuxBacking {
    /// Anonymous private memory (every monitor's default).
    #[default]
    Anon,
    /// Shared file memory: ours `--backing memfd`, QEMU
    /// `memory-backend-memfd` (Firecracker has none).
    Memfd,
}

impl LinuxBacking {
    /// The name used in options, JSON and messages.
    pub fn name(self) -> &'static str {
        match self {
            LinuxBacking::Anon => "anon",
            LinuxBacking::Memfd => "memfd",
        }
    }
}

/// How a running guest is stopped.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stop {
    /// Ours and Firecracker: SIGTERM; QEMU: QMP `quit`.
    Sigterm,
    /// Ours and Firecracker: `PUT /actions SendCtrlAltDel` (the guest
    /// restarts through the i8042, which ends the VM); QEMU: QMP `quit`.
    CtrlAltDel,
}

/// One teardown row of `gmm bench linux`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LinuxTeardownRow {
    pub monitor: Monitor,
    pub stop: Stop,
    pub mem_mib: u64,
    /// Whether guest RAM was populated host-side before the stop.
    pub populated: bool,
    pub rss_at_stop_bytes: u64,
    pub stop_to_memory_back_ms: Option<f64>,
    pub stop_to_exit_ms: f64,
    pub exit_status: Option<i32>,
}

/// One monitor's idle windows in `gmm bench linux` (side by side: window
/// `i` of every monitor is the same span of time).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LinuxIdleWindows {
    pub monitor: Monitor,
    /// Length of each window, s.
    pub seconds: f64,
    /// The whole process's CPU in each window, % of one core.
    pub cpu_pct: Vec<f64>,
    /// The vCPU threads' part of it, window by window.
    pub vcpu_cpu_pct: Vec<f64>,
}

/// `gmm bench linux --json`.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct LinuxResult {
    pub kernel: String,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// What guest RAM was made of (results saved before it existed: anon).
    #[serde(default)]
    pub backing: LinuxBacking,
    pub inflate_mib: u64,
    /// `InstanceStart` → first `KVM_RUN` of ours: the median of
    /// `monitor_setup_ms_all`.
    pub monitor_setup_ms: Option<f64>,
    /// The boot session's figure and those of `--setup-starts` starts
    /// stopped right after their first `KVM_RUN`.
    #[serde(default)]
    pub monitor_setup_ms_all: Vec<f64>,
    pub ours_init_s: Option<f64>,
    pub qemu_init_s: Option<f64>,
    pub fc_init_s: Option<f64>,
    pub ours_inflate_mib_per_s: Option<f64>,
    pub qemu_inflate_mib_per_s: Option<f64>,
    pub fc_inflate_mib_per_s: Option<f64>,
    /// Host CPU of the whole monitor process while the booted guest idles,
    /// % of one core: with `idle_side_by_side`, the median of the
    /// monitor's `idle_windows`.
    pub ours_idle_cpu_pct: Option<f64>,
    pub qemu_idle_cpu_pct: Option<f64>,
    pub fc_idle_cpu_pct: Option<f64>,
    /// The part of `*_idle_cpu_pct` the monitor's vCPU threads used (the
    /// guest's own kernel, run or emulated inside `KVM_RUN`), % of one
    /// core; the rest is the monitor's other threads.
    #[serde(default)]
    pub ours_idle_vcpu_cpu_pct: Option<f64>,
    #[serde(default)]
    pub qemu_idle_vcpu_cpu_pct: Option<f64>,
    #[serde(default)]
    pub fc_idle_vcpu_cpu_pct: Option<f64>,
    /// Seconds between the balloon statistics every monitor asked the
    /// guest for during the idle window (ours and Firecracker:
    /// `stats_polling_interval_s`; QEMU: `guest-stats-polling-interval`
    /// through QMP), so that each idle guest did the same work. `None` in
    /// results saved before QEMU was asked too (it then did not poll).
    #[serde(default)]
    pub idle_stats_polling_s: Option<u32>,
    /// Whether every monitor's guest idled at the same time, counted over
    /// the same windows (`idle_windows`), so that host noise falls on all
    /// alike; `false` in results saved before, when each monitor's guest
    /// idled in its own boot session, minutes apart.
    #[serde(default)]
    pub idle_side_by_side: bool,
    /// Each window's idle CPU, per monitor (side by side only).
    #[serde(default)]
    pub idle_windows: Vec<LinuxIdleWindows>,
    /// ours_init_s / qemu_init_s and / fc_init_s.
    pub init_vs_qemu: Option<f64>,
    pub init_vs_fc: Option<f64>,
    /// ours_inflate_mib_per_s / the peer's.
    pub inflate_vs_qemu: Option<f64>,
    pub inflate_vs_fc: Option<f64>,
    pub teardown: Vec<LinuxTeardownRow>,
    /// Monitors or sessions that did not run, and why.
    pub skipped: Vec<String>,
}

impl LinuxResult {
    /// One monitor's idle windows, if measured side by side.
    pub fn idle_windows_of(&self, m: Monitor) -> Option<&LinuxIdleWindows> {
        self.idle_windows.iter().find(|w| w.monitor == m)
    }

    /// The part of one monitor's idle CPU its vCPU threads used, %.
    pub fn idle_vcpu_of(&self, m: Monitor) -> Option<f64> {
        match m {
            Monitor::Ours => self.ours_idle_vcpu_cpu_pct,
            Monitor::Qemu => self.qemu_idle_vcpu_cpu_pct,
            Monitor::Fc => self.fc_idle_vcpu_cpu_pct,
        }
    }

    /// `(init s, idle CPU %, inflate MiB/s)` of one monitor.
    pub fn of(&self, m: Monitor) -> (Option<f64>, Option<f64>, Option<f64>) {
        match m {
            Monitor::Ours => (
                self.ours_init_s,
                self.ours_idle_cpu_pct,
                self.ours_inflate_mib_per_s,
            ),
            Monitor::Qemu => (
                self.qemu_init_s,
                self.qemu_idle_cpu_pct,
                self.qemu_inflate_mib_per_s,
            ),
            Monitor::Fc => (
                self.fc_init_s,
                self.fc_idle_cpu_pct,
                self.fc_inflate_mib_per_s,
            ),
        }
    }
}

// ---------------------------------------------------------------------
// gmm stress

/// The JSON line of `gmm stress`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StressResult {
    pub tool: String,
    pub seconds: f64,
    pub walkers: u32,
    pub mutators: u32,
    pub mem_bytes: u64,
    pub membarrier: bool,
    pub fail_batch_every: u64,
    pub walks: u64,
    pub walks_ok: u64,
    pub walks_per_s: f64,
    pub maps: u64,
    pub unmaps: u64,
    pub faults: u64,
    pub protects: u64,
    pub flushes: u64,
    pub fallback_batches: u64,
    pub grace_periods: u64,
    pub splits: u64,
    pub released_bytes: u64,
    pub max_lock_hold_us: f64,
    pub use_after_free: u64,
    pub stale_translations: u64,
    pub not_released: u64,
    pub oracle_mismatch: u64,
    pub op_errors: u64,
    pub thread_panics: u64,
    pub first_violation: Option<String>,
    pub cache_hits: u64,
    pub shootdowns: u64,
    pub churns: u64,
    pub scans: u64,
    pub view_reads: u64,
    pub view_reads_ok: u64,
    pub view_stale_reads: u64,
    pub violations: u64,
    pub rss_start_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_end_bytes: u64,
    pub region_resident_end_bytes: u64,
    pub table_pages_end: u64,
    pub ok: bool,
}

// ---------------------------------------------------------------------
// gmm stress-vm

/// `gmm stress-vm --json`.
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct StressVmResult {
    pub tool: String,
    pub seconds: f64,
    pub elapsed_s: f64,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub device_threads: u32,
    pub backing: String,
    pub page_size: String,
    pub membarrier: bool,
    pub inject: Option<String>,
    /// The rule this (mutation) build breaks, if any.
    pub broken_rule: Option<String>,
    pub cycles: u64,
    pub pages_inflated: u64,
    pub pages_deflated: u64,
    pub pages_reported: u64,
    pub driver_pages_inflated: u64,
    pub driver_pages_deflated: u64,
    pub driver_pages_reverified: u64,
    pub balloon_max_pages: u64,
    pub bytes_released: u64,
    pub demand_faults: u64,
    pub guest_passes: u64,
    pub guest_bad_words: u64,
    pub driver_bad_words: u64,
    pub driver_errors: u64,
    pub vcpu_failures: u64,
    pub guest_errors: u64,
    pub walks: u64,
    pub walks_ok: u64,
    pub walks_ballooned: u64,
    pub walks_discarded: u64,
    pub walks_per_s: f64,
    pub bytes_copied: u64,
    pub read_sections: u64,
    pub front_sections: u64,
    pub front_releases: u64,
    pub read_section_max_us: f64,
    pub stable_batches: u64,
    pub inflate_batches: u64,
    pub teardown_walks: u64,
    pub teardown_walks_ok: u64,
    pub injected_hits: u64,
    pub injected_stale_reads: u64,
    pub stale_released: u64,
    pub stale_data: u64,
    pub changed_under_reader: u64,
    pub stale_translations: u64,
    pub use_after_free: u64,
    pub shadow_mismatches: u64,
    /// Of which pages of the balloonable range not present at the end.
    pub left_not_present: u64,
    pub device_errors: u64,
    pub unexpected_faults: u64,
    pub final_bad_words: u64,
    pub not_released: u64,
    pub stalls: u64,
    /// Device threads blocked inside one read section.
    pub stuck_readers: u64,
    /// The longest table-lock hold, wall clock (a holder descheduled
    /// while it held the lock counts the time it waited).
    pub max_lock_hold_us: f64,
    /// The longest hold in the holder's own CPU time: the work done under
    /// the lock.
    #[serde(default)]
    pub max_lock_hold_cpu_us: f64,
    pub rss_min_bytes: u64,
    pub rss_max_bytes: u64,
    pub rss_after_reclaim_bytes: u64,
    pub reclaim_ms: f64,
    pub tables_freed: u64,
    pub table_pages_end: u64,
    pub violations: u64,
    /// The first violation a device thread counted, described.
    pub first_walk_violation: Option<String>,
    pub ok: bool,
}

// ---------------------------------------------------------------------
// gmm soak

/// What a `gmm soak` sample counts (see `tools/src/soak.rs`).
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SoakSample {
    /// `VmRSS` after `malloc_trim(0)`.
    pub rss_bytes: u64,
    /// Entries of `/proc/self/fd`.
    pub fds: u64,
    /// Entries of `/proc/self/task`.
    pub threads: u64,
    /// Table pages in use in every stage-2 table of the process.
    pub table_pages: u64,
}

/// `gmm soak --json`. The `leaked_*` fields are the worst excess over the
/// baseline seen after any measured cycle (RSS: only beyond
/// `rss_tolerance_bytes`, else 0); `ok` is false if any is non-zero or a
/// cycle failed (`error`).
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct SoakResult {
    pub tool: String,
    /// `--minutes` asked for (warm-up included).
    pub minutes: f64,
    pub elapsed_s: f64,
    /// Measured cycles (after the warm-up).
    pub cycles: u64,
    pub warmup_cycles: u64,
    pub vcpus: u32,
    /// Guest RAM sizes, rotated.
    pub sizes_bytes: Vec<u64>,
    /// Guest RAM kinds, rotated (`anon-4K`, `anon-THP`, `memfd-4K`).
    pub variants: Vec<String>,
    #[serde(default)]
    pub kvm_modules: Vec<String>,
    /// The hidden `--inject-leak` kind, if any.
    pub inject_leak: Option<String>,
    pub baseline: SoakSample,
    /// The sample after the last measured cycle.
    pub end: SoakSample,
    /// Worst excess over the baseline of each resource, after any cycle.
    pub excess_max: SoakSample,
    pub rss_tolerance_bytes: u64,
    pub rss_excess_max_bytes: u64,
    pub leaked_rss_bytes: u64,
    pub leaked_fds: u64,
    pub leaked_threads: u64,
    pub leaked_table_pages: u64,
    /// Measured cycles whose sample showed a leak, and the first of them
    /// (1-based).
    pub cycles_leaking: u64,
    pub first_leak_cycle: Option<u64>,
    /// Longest wait for fds, threads and table pages to come back after a
    /// cycle (late thread exits), ms.
    pub settle_max_ms: f64,
    /// Launch to reclaimed, measured cycles, ms.
    pub cycle_ms: Dist,
    /// Over all cycles, warm-up included.
    pub demand_faults: u64,
    pub pages_inflated: u64,
    pub pages_deflated: u64,
    pub pages_reported: u64,
    /// What `--inject-leak` kept by the end.
    #[serde(default)]
    pub rss_leaks_injected_bytes: u64,
    #[serde(default)]
    pub fd_leaks_injected: u64,
    #[serde(default)]
    pub thread_leaks_injected: u64,
    #[serde(default)]
    pub tables_kept_injected: u64,
    /// RSS of the sample after each measured cycle.
    #[serde(default)]
    pub rss_bytes_all: Vec<u64>,
    /// Why the run stopped early, if a cycle failed.
    pub error: Option<String>,
    pub ok: bool,
}

// ---------------------------------------------------------------------
// vmm run --balloon-target --json (the report's balloon-rss steps)

/// The part of `vmm run --json` the report reads (vmm's `RunSummary`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct VmmRunResult {
    pub guest_ok: Option<bool>,
    pub mem_bytes: u64,
    pub backing: String,
    pub balloon_target_bytes: u64,
    pub balloon_inflated_bytes: u64,
    pub balloon_inflate_ms: f64,
    pub balloon_device_inflate_ms: Option<f64>,
    pub balloon_released_bytes: Option<u64>,
    pub rss_before_inflate_bytes: u64,
    pub rss_after_inflate_bytes: u64,
    /// Resident guest RAM (`mincore`): required for guest-memfd rows.
    pub guest_resident_before_inflate_bytes: Option<u64>,
    pub guest_resident_after_inflate_bytes: Option<u64>,
    pub balloon_device_errors: Option<u64>,
    pub balloon_driver_error: Option<String>,
}

// ---------------------------------------------------------------------
// gmm bench fault and gmm bench interference

/// Median, min and max of one figure over rounds.
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// `gmm bench fault --json`: userfaultfd demand-fault latency of one VM,
/// quiet and under an unmap/balloon storm on other ranges of the same VM.
/// The six figures the issue names are required; the rest default when a
/// saved file lacks them.
/// The `--json` object.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct FaultResult {
    #[serde(default)]
    pub tool: String,
    #[serde(default)]
    pub mem_bytes: u64,
    #[serde(default)]
    pub cores: usize,
    #[serde(default)]
    pub kvm_modules: Vec<String>,
    /// Where the threads ran.
    #[serde(default)]
    pub placement: String,
    #[serde(default)]
    pub rounds: u32,
    #[serde(default)]
    pub samples_per_phase: u64,
    #[serde(default)]
    pub samples_quiet: usize,
    #[serde(default)]
    pub samples_storm: usize,
    #[serde(default)]
    pub storm_chunk_bytes: u64,
    #[serde(default)]
    pub storm_refill: String,
    #[serde(default)]
    pub storm_range_bytes: u64,
    // The figures: medians over rounds of each phase's percentile.
    pub p50_us_quiet: f64,
    pub p99_us_quiet: f64,
    pub max_us_quiet: f64,
    pub p50_us_storm: f64,
    pub p99_us_storm: f64,
    pub max_us_storm: f64,
    /// p99_us_storm / p99_us_quiet.
    #[serde(default)]
    pub p99_ratio: f64,
    /// The baseline phase: the victim's p99 beside a `plain` storm (the
    /// same release-and-rewrite loop on an anonymous mapping of the
    /// process, no table, no handler, no KVM slot): what such a storm
    /// costs the victim through the kernel and the CPUs alone (median over
    /// rounds, µs). `None` without the phase (`--no-baseline`, a plain
    /// storm, results saved before it existed).
    #[serde(default)]
    pub p99_us_plain_storm: Option<f64>,
    /// p99_us_plain_storm / p99_us_quiet: the kernel bound of `p99_ratio`.
    #[serde(default)]
    pub p99_ratio_plain_storm: Option<f64>,
    #[serde(default)]
    pub p99_us_plain_storm_spread: Option<Spread>,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub verdict: String,
    /// Spread over rounds.
    #[serde(default)]
    pub p99_us_quiet_spread: Spread,
    #[serde(default)]
    pub p99_us_storm_spread: Spread,
    #[serde(default)]
    pub max_us_quiet_spread: Spread,
    #[serde(default)]
    pub max_us_storm_spread: Spread,
    /// Storm releases per second and MiB/s released (medians over rounds).
    #[serde(default)]
    pub storm_releases_per_sec: f64,
    #[serde(default)]
    pub storm_mib_per_sec: f64,
    /// Commits the table refused (retried faults), per phase (medians).
    #[serde(default)]
    pub retries_quiet: f64,
    #[serde(default)]
    pub retries_storm: f64,
    /// Longest table-lock hold during the phase (median over rounds), µs.
    #[serde(default)]
    pub lock_hold_max_us_quiet: f64,
    #[serde(default)]
    pub lock_hold_max_us_storm: f64,
    /// Mean time inside the fault handler per fault (message read → wake;
    /// storm phases include the storm's refill faults), medians, µs.
    #[serde(default)]
    pub handler_mean_us_quiet: f64,
    #[serde(default)]
    pub handler_mean_us_storm: f64,
    /// The environment's own stall: a clock-reading thread's longest gap
    /// per spin phase (medians, and the worst), µs, and its gaps > 50 µs
    /// per second.
    #[serde(default)]
    pub env_spin_max_gap_us: f64,
    #[serde(default)]
    pub env_spin_max_gap_us_worst: f64,
    #[serde(default)]
    pub env_spin_gaps_over_50us_per_sec: f64,
    /// Faults resolved by the handler and failed installs over the run.
    #[serde(default)]
    pub handler_faults: u64,
    #[serde(default)]
    pub handler_errors: u64,
    /// The host's load averages (1, 5, 15 min) at the start and the end:
    /// other work on the machine shares its cores with every thread here.
    #[serde(default)]
    pub loadavg: [String; 2],
}

/// One scenario of `gmm bench interference`.
/// One scenario's figures in the JSON.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ScenarioResult {
    pub scenario: String,
    /// What VM A did.
    pub event: String,
    pub rounds: usize,
    pub victim_fault_p99_increase: Option<f64>,
    pub victim_walk_p99_increase: Option<f64>,
    pub victim_loop_rate_drop: Option<f64>,
    /// The per-round figures behind the three above (their median is the
    /// figure): the lowest, median and highest round.
    #[serde(default)]
    pub victim_fault_p99_increase_rounds: Option<Spread>,
    #[serde(default)]
    pub victim_walk_p99_increase_rounds: Option<Spread>,
    #[serde(default)]
    pub victim_loop_rate_drop_rounds: Option<Spread>,
    pub fault_p99_us_quiet: Spread,
    pub fault_p99_us_event: Spread,
    pub fault_p50_us_quiet: f64,
    pub fault_p50_us_event: f64,
    pub fault_max_us_event: f64,
    /// p99 over all rounds' samples pooled (quiet, event), µs: steadier
    /// than per-window p99s when windows hold few samples.
    pub fault_p99_us_pooled: [f64; 2],
    pub walk_p99_us_pooled: [f64; 2],
    pub walk_p99_us_quiet: Spread,
    pub walk_p99_us_event: Spread,
    pub loop_mib_per_sec_quiet: Spread,
    pub loop_mib_per_sec_event: Spread,
    pub fault_samples_quiet: usize,
    pub fault_samples_event: usize,
    pub walk_samples_quiet: usize,
    pub walk_samples_event: usize,
    /// The event window's length, ms.
    pub event_ms: Spread,
    /// VM A's CPU time during the event window, ms.
    pub a_cpu_ms: Spread,
    /// API requests the bench sent VM A during the event window (the
    /// balloon scenario's wait for the inflate's end; 0 otherwise).
    #[serde(default)]
    pub a_api_polls: Spread,
    /// A diagnostic, not judged: the mean run-queue wait per timeslice of
    /// VM B's threads that sleep and wake (prober, device thread, fault
    /// handler; `schedstat`), event window against quiet window, per round
    /// (fraction; median, and the rounds' spread). It measures the one way
    /// VM A reaches VM B on shared cores, the CPU, over every wake-up of
    /// the window rather than its slowest 1 %. `None`: no such accounting.
    #[serde(default)]
    pub victim_runq_wait_increase: Option<f64>,
    #[serde(default)]
    pub victim_runq_wait_increase_rounds: Option<Spread>,
    /// That wait per window, µs (quiet, event).
    #[serde(default)]
    pub runq_wait_us_quiet: Option<Spread>,
    #[serde(default)]
    pub runq_wait_us_event: Option<Spread>,
    /// `met` or `missed` (every figure ≤ 10 %); `baseline` for the kernel
    /// baseline (`munmap`: no VM), which is not judged.
    pub verdict: String,
}

/// `gmm bench interference --json`: what a noisy VM costs a victim VM.
/// The two fractions the issue names are required (null: not measured).
/// The `--json` object.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct InterferenceResult {
    #[serde(default)]
    pub tool: String,
    #[serde(default)]
    pub cores: usize,
    #[serde(default)]
    pub kvm_modules: Vec<String>,
    #[serde(default)]
    pub placement: String,
    #[serde(default)]
    pub a_mem_bytes: u64,
    #[serde(default)]
    pub a_balloon_bytes: u64,
    #[serde(default)]
    pub a_huge_pages: bool,
    #[serde(default)]
    pub b_mem_bytes: u64,
    #[serde(default)]
    pub rounds: u32,
    #[serde(default)]
    pub quiet_ms: u64,
    /// The worse scenario's figures (fractions: 0.10 = 10 %; null when not
    /// measured: no prober, no quiet samples).
    #[serde(deserialize_with = "Option::deserialize")]
    pub victim_fault_p99_increase: Option<f64>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub victim_loop_rate_drop: Option<f64>,
    #[serde(default)]
    pub victim_walk_p99_increase: Option<f64>,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub verdict: String,
    #[serde(default)]
    pub scenarios: Vec<ScenarioResult>,
    /// Zero words VM B's guest found (pages the prober released under its
    /// loop; expected, not an error).
    #[serde(default)]
    pub victim_guest_bad_words: u64,
    #[serde(default)]
    pub victim_handler_faults: u64,
    #[serde(default)]
    pub victim_handler_errors: u64,
    /// The host's load averages (1, 5, 15 min) at the start and the end:
    /// other work on the machine shares its cores with every thread here.
    #[serde(default)]
    pub loadavg: [String; 2],
}

/// `gmm bench walk --json`.
/// The five figures are required; the others default when a saved
/// file predates them.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WalkResult {
    #[serde(default)]
    pub tool: String,
    #[serde(default)]
    pub threads: u32,
    #[serde(default)]
    pub cores: usize,
    /// guest-mm pins with a compiler barrier and grace periods use membarrier.
    #[serde(default)]
    pub membarrier: bool,
    /// Walkers plus the storm thread outnumber the cores.
    #[serde(default)]
    pub storm_oversubscribed: bool,
    #[serde(default)]
    pub seconds_per_phase: f64,
    /// Rounds run (each phase once per round, order rotated); every
    /// figure is the median round, every ratio the median per-round ratio.
    #[serde(default)]
    pub rounds: u32,
    #[serde(default)]
    pub mem_bytes: u64,
    #[serde(default)]
    pub batch: u32,
    /// Cached path (`translate`), random addresses over the whole table.
    pub walk_per_s: f64,
    /// Uncached path (`translate_uncached`).
    #[serde(default)]
    pub walk_uncached_per_s: f64,
    /// Cached path over a 64-page working set (cache hits).
    #[serde(default)]
    pub walk_hot_per_s: f64,
    /// Cached path, consecutive 4 KiB pages (one translation per page,
    /// wrapping at the end of the table).
    #[serde(default)]
    pub walk_sequential_per_s: f64,
    /// Cached path, random addresses over the same memory mapped at
    /// 2 MiB leaves (a second table).
    #[serde(default)]
    pub walk_2m_per_s: f64,
    /// Cached path, random addresses, over a third table at 4 KiB leaves
    /// whose first GiB's leaf arena part keeps 4 KiB pages (guest-mm puts
    /// a GiB mapped whole at 4 KiB leaves in one huge page).
    #[serde(default)]
    pub walk_small_arena_per_s: f64,
    /// `walk_per_s / walk_small_arena_per_s`: what the huge arena page wins.
    #[serde(default)]
    pub walk_vs_small_arena: f64,
    /// One pin per translation (cached path).
    #[serde(default)]
    pub walk_pin_each_per_s: f64,
    /// Cached path while a storm unmaps and remaps random 2 MiB ranges.
    pub walk_under_unmap_per_s: f64,
    /// Cached path while another thread only spins (no table work): what
    /// sharing the machine costs by itself, the fair reference for the storm.
    #[serde(default)]
    pub walk_busy_neighbour_per_s: f64,
    /// Share of translations under the storm that found the page unmapped.
    #[serde(default)]
    pub walk_under_unmap_unmapped_pct: f64,
    /// The requested storm pace (null: as fast as it goes).
    #[serde(default)]
    pub storm_rate_requested: Option<f64>,
    /// Unmap+remap operations per second the storm achieved (median round).
    #[serde(default)]
    pub storm_ops_per_s: f64,
    /// Cache shootdowns walkers saw during the storm phases (all rounds,
    /// all walkers).
    #[serde(default)]
    pub storm_shootdowns: u64,
    /// `walk_under_unmap_per_s / walk_per_s` (target ≥ 0.9).
    #[serde(default)]
    pub under_unmap_ratio: f64,
    /// `walk_under_unmap_per_s / walk_busy_neighbour_per_s`.
    #[serde(default)]
    pub under_unmap_vs_busy_ratio: f64,
    pub rwlock_per_s: f64,
    pub rwlock_under_unmap_per_s: f64,
    #[serde(default)]
    pub rwlock_storm_ops_per_s: f64,
    #[serde(default)]
    pub rwlock_under_unmap_ratio: f64,
    /// vm-memory `get_host_address` over one region (no table at all).
    pub vm_memory_per_s: f64,
    /// Regions of the `vm_memory_per_s` baseline.
    #[serde(default)]
    pub vm_memory_regions: usize,
    /// vm-memory `get_host_address` over four regions.
    #[serde(default)]
    pub vm_memory_4_regions_per_s: f64,
    /// The `RwLock` baseline's page map read with no lock at all (no
    /// storm): one random 8-byte load per translation from an array of
    /// the same size as the stage-2 leaf entries (2 MiB per GiB). What a
    /// page-granular map costs on this machine, the bound of the walk.
    #[serde(default)]
    pub page_map_unlocked_per_s: f64,
    /// The same lock-free page map while another thread, paced to the
    /// guest-mm storm's rate, clears and sets again a random 2 MiB of it
    /// per operation (`page_map_storm_ops_per_s`): the bound of the walk
    /// under the storm on this machine.
    #[serde(default)]
    pub page_map_under_unmap_per_s: f64,
    #[serde(default)]
    pub page_map_storm_ops_per_s: f64,
    /// `page_map_under_unmap_per_s / page_map_unlocked_per_s`: the share
    /// of its rate any page-granular map keeps under the storm (the bound
    /// of `under_unmap_ratio`).
    #[serde(default)]
    pub page_map_under_unmap_ratio: f64,
    /// The median over rounds of `under_unmap_ratio` over
    /// `page_map_under_unmap_ratio`, each round's pair measured back to
    /// back: how much of the bound's share the walk kept (0 in files saved
    /// before it was measured).
    #[serde(default)]
    pub under_unmap_vs_page_map_bound: f64,
    /// `walk_per_s / rwlock_per_s` (target ≥ 1.2).
    #[serde(default)]
    pub walk_vs_rwlock: f64,
    /// `walk_per_s / page_map_unlocked_per_s`.
    #[serde(default)]
    pub walk_vs_page_map_unlocked: f64,
    /// `walk_per_s / vm_memory_per_s`, one region (target ≥ 0.8).
    #[serde(default)]
    pub walk_vs_vm_memory: f64,
    /// `walk_per_s / vm_memory_4_regions_per_s`.
    #[serde(default)]
    pub walk_vs_vm_memory_4_regions: f64,
    /// `walk_under_unmap_per_s / rwlock_under_unmap_per_s` (target ≥ 1.2).
    #[serde(default)]
    pub under_unmap_vs_rwlock_under_unmap: f64,
    /// Translations through guest-mm's vm-memory view of a read section
    /// (`GuestMemory::get_slices`, see `guest_memory_view_op`), random
    /// addresses over the whole table, one pin per batch.
    #[serde(default)]
    pub guest_memory_view_per_s: f64,
    /// What one view translation is.
    #[serde(default)]
    pub guest_memory_view_op: String,
    /// `guest_memory_view_per_s / walk_per_s` (target ≥ 0.8).
    #[serde(default)]
    pub guest_memory_view_vs_walk: f64,
    /// `guest_memory_view_per_s / vm_memory_per_s` (one region; issue 12
    /// goal 1 for the `GuestMemory` path: target ≥ 0.8).
    #[serde(default)]
    pub guest_memory_view_vs_vm_memory: f64,
    /// vm-memory's own `GuestMemoryMmap` (one region) through the view's
    /// call, `get_slices(addr, 8, Read)`: the `GuestMemory` path with no
    /// table at all (0: results saved before it was measured).
    #[serde(default)]
    pub vm_memory_slices_per_s: f64,
    /// `guest_memory_view_per_s / vm_memory_slices_per_s`.
    #[serde(default)]
    pub guest_memory_view_vs_vm_memory_slices: f64,
    /// `guest_memory_view_per_s / rwlock_per_s` (target ≥ 1.2).
    #[serde(default)]
    pub guest_memory_view_vs_rwlock: f64,
    /// `vm_memory_slices_per_s / vm_memory_per_s`: what vm-memory's own
    /// `GuestMemory` path keeps of its bare lookup (the bound of
    /// `guest_memory_view_vs_vm_memory`).
    #[serde(default)]
    pub vm_memory_slices_vs_vm_memory: f64,
    /// Lowest, median and highest round of every figure and ratio above.
    #[serde(default)]
    pub spread: std::collections::BTreeMap<String, Spread>,
    #[serde(default)]
    pub use_after_free: u64,
    #[serde(default)]
    pub targets: WalkTargets,
}

/// `gmm bench walk`'s own verdicts.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct WalkTargets {
    #[serde(default)]
    pub walk_ge_50m_per_s: bool,
    #[serde(default)]
    pub under_unmap_ge_0_8x: bool,
    /// Issue 12, goal 1.
    #[serde(default)]
    pub walk_ge_0_8x_vm_memory: bool,
    #[serde(default)]
    pub walk_ge_1_2x_rwlock: bool,
    #[serde(default)]
    pub under_unmap_ge_0_9x: bool,
    #[serde(default)]
    pub under_unmap_ge_1_2x_rwlock_under_unmap: bool,
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;

    use super::*;

    /// A bench's struct, printed and read back, is itself.
    fn round_trip<T: Serialize + DeserializeOwned>(v: &T) {
        let j = serde_json::to_value(v).expect("serialize");
        let back: T = serde_json::from_value(j.clone()).expect("read back");
        assert_eq!(serde_json::to_value(&back).expect("serialize"), j);
    }

    #[test]
    fn results_read_back_as_printed() {
        round_trip(&StressVmResult::default());
        round_trip(&LinuxResult {
            teardown: vec![LinuxTeardownRow {
                monitor: Monitor::Fc,
                stop: Stop::CtrlAltDel,
                mem_mib: 1024,
                populated: false,
                rss_at_stop_bytes: 1,
                stop_to_memory_back_ms: None,
                stop_to_exit_ms: 2.0,
                exit_status: Some(0),
            }],
            ..LinuxResult::default()
        });
        round_trip(&ServiceResult::default());
        round_trip(&TeardownSize::default());
        let f: FaultResult = serde_json::from_value(serde_json::json!({
            "p50_us_quiet": 1.0, "p99_us_quiet": 2.0, "max_us_quiet": 3.0,
            "p50_us_storm": 1.0, "p99_us_storm": 2.0, "max_us_storm": 3.0
        }))
        .expect("the six named figures suffice");
        round_trip(&f);
    }

    #[test]
    fn required_fields_are_required_and_unknown_ones_ignored() {
        let ok = serde_json::json!({
            "victim_fault_p99_increase": 0.1, "victim_loop_rate_drop": 0.0, "new_figure": 1
        });
        assert!(serde_json::from_value::<InterferenceResult>(ok).is_ok());
        let renamed = serde_json::json!({
            "victim_fault_p99_increase": 0.1, "victim_loop_drop": 0.0
        });
        let e = serde_json::from_value::<InterferenceResult>(renamed)
            .expect_err("a renamed field must fail");
        assert!(e.to_string().contains("victim_loop_rate_drop"), "{e}");
        // Fields beyond the named ones take their defaults when absent.
        let f: FaultResult = serde_json::from_value(serde_json::json!({
            "p50_us_quiet": 1.0, "p99_us_quiet": 2.0, "max_us_quiet": 3.0,
            "p50_us_storm": 1.0, "p99_us_storm": 2.0, "max_us_storm": 3.0
        }))
        .expect("optional fields may be absent");
        assert_eq!(f.samples_quiet, 0);
        // A named fraction may be null (not measured), never absent.
        let null = serde_json::json!({
            "victim_fault_p99_increase": null, "victim_loop_rate_drop": 0.0
        });
        assert!(serde_json::from_value::<InterferenceResult>(null).is_ok());
    }
}
