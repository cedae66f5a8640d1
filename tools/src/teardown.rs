//! `gmm bench teardown`: destroying a fully populated microVM, against
//! baselines and peers measured in the same run.
//!
//! For each size, every repetition runs each strategy once, in an order
//! rotated per repetition, on freshly populated memory:
//!
//! - **vm**: a [`vmm::Vm`] of that size is created and started; with
//!   `--populate host` its vCPUs are paused at once and all guest RAM is
//!   populated host-side (`MADV_POPULATE_WRITE`); with `--populate guest`
//!   the guest writes and verifies its RAM (ring 3, ~11 µs per first touch
//!   under kvm_pvm) and the host tops up the rest (page tables, image).
//!   `destroy_ms` is the `Vm::destroy` call (stop and join the vCPUs, hand
//!   off reclamation); `reclaim_ms` runs from the same start until the
//!   memory is back with the host: the whole-VM stage-2 gather released
//!   all guest RAM (`Reclaimed::memory_back_ms`; the thread that released
//!   it, the waiting one or the VM's reclaim thread (`reclaims_by_waiter`
//!   counts the former), samples RSS right then, and `rss_back` requires
//!   it back near its starting level; `background_joins` counts the
//!   repetitions in which the release's idle-priority helpers fell below
//!   its slowest pace and the releasing thread joined in). `reclaim_cores`
//!   is how many CPUs the teardown kept busy (the process's CPU time over
//!   the wall time, destroy to `wait_reclaim`; `split_cores` and
//!   `split_kvm_cores` the same over the baselines' timed release): with
//!   idle-priority helpers, a teardown beside busy cores gets fewer than
//!   the plain threads of the split do. `reclaim_done_ms` runs until
//!   `Teardown::wait_reclaim` returns: also the KVM VM dropped, the fault
//!   handler stopped, the emptied RAM unmapped (for memfd the file
//!   closed). RSS before launch, once
//!   populated, at memory-back and after reclaim shows the memory coming
//!   back.
//! - **munmap**: the limit. Anonymous: an equally populated private mapping
//!   (same leaf advice), one `munmap`. memfd: a memfd of the same size,
//!   mapped shared and populated, then `munmap` + `close` (file freed).
//! - **naive**: one release per 4 KiB page under one mutex (Cloud
//!   Hypervisor's pattern; `MADV_DONTNEED` for anonymous memory, a
//!   `fallocate(PUNCH_HOLE)` per page for memfd), then the `munmap` (and
//!   `close`) of the emptied mapping, all timed.
//! - **split** (4 KiB rows, 2+ cores: the kernel's bound of the 0.6x
//!   target): the release the VM splits across its cores, done by plain
//!   threads with nothing else: no VM, no table, no KVM memslot, no
//!   hand-off. Anonymous: an equally populated mapping, `split_threads`
//!   threads each `madvise(MADV_DONTNEED)` one contiguous share at once,
//!   then the `munmap` of the emptied mapping. memfd: the files the VM's
//!   RAM is split into ([`vmm::memory::backing::memfd_files`]), each populated
//!   through its mapping and punched whole by one of the threads, then
//!   `munmap` + `close`. All timed, thread start included (the VM starts
//!   its helpers too); no thread releases before every thread is through
//!   its start (guest-mm's `wait_started`, at most 200 µs: a thread start
//!   takes the mmap lock for writing, and would otherwise wait for another
//!   thread's whole `madvise`). Where even this takes more than 0.6x the
//!   munmap, no teardown split as many ways can reach 0.6x in that run.
//! - **split with KVM** (every row; `split_kvm_threads`): the VM's own
//!   release done by as many plain threads as the VM's teardown uses
//!   (the split's where it is measured; one where the VM releases huge
//!   pages on one thread, each region then released whole), of a VM's own
//!   guest RAM while its KVM VM
//!   exists: a VM made and populated as the row's VM is (`--populate`),
//!   its vCPUs stopped. KVM's MMU notifier runs in every release and zaps
//!   what the guest's run left mapped (shadow or TDP entries): after
//!   `--populate guest` that is every page, a cost the VM's teardown pays
//!   too. The gap from *split* is KVM's, the gap from the VM's own figure
//!   the monitor's; where it alone takes more than the munmap, no
//!   teardown that releases beside KVM gets under 1.0x in that run (on
//!   this host 256 MiB of THP: 0.75-0.94 ms beside KVM against 0.66-0.78
//!   for munmap, four runs of 5-9). The threads claim chunks as the VM's release does
//!   (guest-mm's `claim_size`, at most `BACKGROUND_CLAIM_MAX`): anonymous,
//!   from one cursor over the regions, `madvise(MADV_DONTNEED)` each;
//!   memfd, the VM's files, one thread per file, punched a chunk at a
//!   time. Only the release is timed (the VM's teardown after it is not).
//!   The claims matter here and not in *split*: KVM's notifier zaps a
//!   release's whole range under KVM's MMU lock, so two threads releasing
//!   one half each took turns (4 GiB after `--populate guest`: 174-180
//!   ms, against 160-165 ms for the VM's own release).
//! - **qemu** (peer, when `qemu-system-x86_64` is found): QEMU with a
//!   preallocated RAM backend and `-S` (the guest never runs), at 4 KiB
//!   rows with transparent huge pages disabled for the process (QEMU
//!   advises huge pages on all its RAM; see `qemu_command`); once QMP
//!   answered `qmp_capabilities` and the process's RSS reached the size,
//!   `quit` is sent and the time until the process has exited (waitpid) is
//!   `qemu_ms`.
//! - **process** (like with like for the QEMU peer): the `vmm` binary next
//!   to `gmm`, `vmm run --populate --api-sock PATH` (RAM populated
//!   host-side, vCPUs held paused); once its API answers and its RSS reached
//!   the size, a shutdown request is sent and the time until the process
//!   has exited is `process_exit_ms`.
//!
//! Rows: every size x `--page-size` (2M, 4K) x `--backing` (anon, memfd);
//! `--matrix` is the whole set (256M, 1G, 2G, 4G x 2M, 4K x anon,
//! memfd). Each row measures its own baselines on the same kind of memory,
//! its strategies interleaved (rotated every repetition), and reports
//! medians. Targets (reported, never enforced), per row: issue 12's goal
//! 3, memory back (`reclaim_ms`) <= 1.0x munmap, <= 0.6x at 4 KiB leaves
//! from 1 GiB, the destroy call <= 1 ms (`targets_met`); the older ones,
//! reclaim within 1.1x of munmap and destroy within 5 ms; the VMM process
//! gone sooner than QEMU.

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cpu::process_cpu_time;
use crate::reporting::{mib_since, Overlap, Reported};
use anyhow::{bail, Context, Result};
use guest_mm::backing::{BACKGROUND_CLAIM_MAX, MAX_RELEASE_THREADS, PARALLEL_SHARE_MIN};
use guest_mm::PageSize as Leaf;
use vmm::{Backing, Console, MemSize, PageSize, Vm, VmConfig, Workload};

use crate::mem::{anon_huge_bytes, AnonRegion, PAGE};
use crate::peer::{
    kernel, kvm_modules, qmp_ready, sigterm, sock_path, start_service_vm, tail, vmm_binary,
    wait_rss, which, ServiceSpec, ServiceVm, SockFile, Waited,
};
use crate::rng::{median, ms, round};
use crate::schema::{QemuInfo, TeardownResult, TeardownSize};
use crate::units::human_bytes;

/// Idle time before each timed section.
const SETTLE: Duration = Duration::from_millis(30);
/// How long a peer may take to become ready, per GiB (plus a base).
const READY_PER_GIB: Duration = Duration::from_secs(20);

/// Guest RAM backing for the bench.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingArg {
    /// Private anonymous memory.
    Anon,
    /// A shared memfd.
    Memfd,
}

impl BackingArg {
    fn name(self) -> &'static str {
        match self {
            BackingArg::Anon => "anon",
            BackingArg::Memfd => "memfd",
        }
    }
}

/// Who populates guest RAM before the teardown.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Populate {
    /// The host, `MADV_POPULATE_WRITE` with the vCPUs paused (fast).
    Host,
    /// The guest writes and verifies its RAM in ring 3 (slow under
    /// kvm_pvm: ~11 µs per page); the host tops up the rest.
    Guest,
}

impl Populate {
    fn name(self) -> &'static str {
        match self {
            Populate::Host => "host",
            Populate::Guest => "guest",
        }
    }
}

/// One row of the bench: what guest RAM (and its baselines) is made of.
#[derive(Clone, Copy, Debug)]
struct Case {
    backing: BackingArg,
    page: Leaf,
    populate: Populate,
}

impl Case {
    /// The row's backing, as the monitor names it.
    fn vm_backing(&self) -> Backing {
        match self.backing {
            BackingArg::Anon => Backing::Anon,
            BackingArg::Memfd => Backing::Memfd,
        }
    }

    /// The row's leaf size, as the monitor names it.
    fn vm_page(&self) -> PageSize {
        if self.page == Leaf::Size4K {
            PageSize::Size4K
        } else {
            PageSize::Size2M
        }
    }
}

/// Options of `gmm bench teardown`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Guest RAM sizes (comma-separated, multiples of 2M), e.g. 1G,2G,4G.
    #[arg(long, default_value = "1G,2G,4G", value_parser = crate::units::parse_size_list)]
    pub sizes: crate::units::SizeList,
    /// Guest RAM backings, comma-separated (each row's baselines use the
    /// same kind), e.g. anon,memfd.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "anon")]
    pub backing: Vec<BackingArg>,
    /// Leaf sizes of guest RAM and of the baselines' advice, comma-separated:
    /// 2M (THP where the host allows it) and/or 4K.
    #[arg(long, value_delimiter = ',', default_value = "2M", value_parser = crate::units::parse_leaf)]
    pub page_size: Vec<Leaf>,
    /// The whole matrix: sizes 256M,1G,2G,4G x page sizes 2M,4K x
    /// backings anon,memfd (overrides --sizes, --page-size and --backing).
    #[arg(long)]
    pub matrix: bool,
    /// Skip the per-4 KiB naive strategy (slow at 4 GiB).
    #[arg(long)]
    pub no_naive: bool,
    /// Who populates guest RAM: host (fast) or guest (ring-3 touch, slow).
    #[arg(long, value_enum, default_value_t = Populate::Host)]
    pub populate: Populate,
    /// Repetitions of each strategy (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: u32,
    /// QEMU binary for the peer (looked up in PATH unless it has a '/').
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Skip the QEMU peer.
    #[arg(long)]
    pub no_qemu: bool,
    /// Skip the `vmm` process shutdown-to-exit measurement.
    #[arg(long)]
    pub no_process: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// The strategies, in their base order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    Vm,
    Munmap,
    Naive,
    Split,
    SplitKvm,
    Qemu,
    Process,
    Service,
}

/// Populate `[addr, addr+len)` for writing: `MADV_POPULATE_WRITE`, or, on
/// kernels without it, one read and write-back per 4 KiB page.
///
/// # Safety
///
/// The range must be a live writable mapping of this process that nothing
/// else writes concurrently (rewriting a byte must not lose a store).
unsafe fn populate_range(addr: u64, len: u64) -> Result<()> {
    let n = usize::try_from(len).context("range too large")?;
    // SAFETY: the caller guarantees a live mapping; populating does not
    // change its contents.
    let rc = unsafe {
        libc::madvise(
            addr as usize as *mut libc::c_void,
            n,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err).context("madvise(MADV_POPULATE_WRITE) failed");
    }
    for off in (0..len).step_by(PAGE as usize) {
        let p = (addr + off) as usize as *mut u8;
        // SAFETY: inside the caller's mapping, which nothing else writes.
        unsafe { p.write_volatile(p.read_volatile()) };
    }
    Ok(())
}

/// `Shmem:` of /proc/meminfo, bytes.
fn host_shmem() -> u64 {
    meminfo("Shmem:")
}

fn meminfo(key: &str) -> u64 {
    vmm::proc_stats::meminfo(key).unwrap_or(0)
}

/// One VM teardown.
struct VmRun {
    destroy_ms: f64,
    reclaim_ms: f64,
    memory_back_ms: f64,
    rss_at_memory_back: u64,
    stop_vcpus_ms: f64,
    internal_ms: f64,
    barrier_ms: f64,
    vm_drop_ms: f64,
    gather_ms: f64,
    unmap_ms: f64,
    populate_ms: f64,
    rss_before: u64,
    rss_populated: u64,
    rss_after: u64,
    resident: u64,
    thp: u64,
    shmem_freed: u64,
    /// The thread in `wait_reclaim` released the memory, not the VM's
    /// reclaim thread (`Reclaimed::by_waiter`).
    by_waiter: bool,
    /// The releasing thread joined its background helpers
    /// (`TeardownStats::background_joins`).
    joined: bool,
    /// CPUs the teardown kept busy: this process's CPU time from the
    /// start of `destroy` until `wait_reclaim` returned, over that time.
    cores: f64,
    /// MiB the host kernel reported to its hypervisor in that window
    /// (`None`: it has no counter).
    host_reported_mib: Option<f64>,
}

/// A VM of the row's kind, populated as `--populate` says, its vCPUs
/// stopped (paused, or finished with their pass), with what was measured
/// on the way.
struct ReadyVm {
    vm: Vm,
    populate_ms: f64,
    rss_before: u64,
    rss_populated: u64,
    resident: u64,
    thp: u64,
}

fn ready_vm(a: &Case, size: u64) -> Result<ReadyVm> {
    let mut c = VmConfig::new(MemSize::from_bytes(size).context("guest RAM size")?);
    c.backing = a.vm_backing();
    c.page_size = a.vm_page();
    c.workload = Workload::Verify;
    c.console = Console::Null;
    let rss_before = vmm::proc_stats::rss().rss;
    let timeout = Duration::from_secs(60) + READY_PER_GIB * (size.div_ceil(1 << 30) as u32);
    let t = Instant::now();
    let mut vm = Vm::new(c).context("creating the microVM (is /dev/kvm usable?)")?;
    let populate_all = |vm: &Vm| -> Result<()> {
        for r in vm.memory().regions() {
            // SAFETY: a live guest RAM mapping owned by `vm`; the vCPUs have
            // not started (host) or have finished (guest), so nothing else
            // writes it.
            unsafe { populate_range(r.host_addr as u64, r.len)? };
        }
        Ok(())
    };
    match a.populate {
        Populate::Host => {
            // Like `vmm run --populate`: populated, then the vCPUs started
            // and held paused (QEMU's -S).
            populate_all(&vm)?;
            vm.start().context("starting the vCPUs")?;
            if !vm.pause(Duration::from_secs(10)) {
                bail!("the vCPUs did not pause within 10 s");
            }
        }
        Populate::Guest => {
            vm.start().context("starting the vCPUs")?;
            if !vm.wait(timeout) || !vm.guest_ok() {
                bail!(
                    "the guest did not verify its {} within {} s",
                    human_bytes(size),
                    timeout.as_secs()
                );
            }
            // The guest wrote its share; the rest (page tables, image) is
            // topped up host-side.
            populate_all(&vm)?;
        }
    }
    let populate_ms = ms(t.elapsed());
    let resident = guest_resident(&vm);
    let rss_populated = vmm::proc_stats::rss().rss;
    let thp = anon_huge_bytes().unwrap_or(0);
    Ok(ReadyVm {
        vm,
        populate_ms,
        rss_before,
        rss_populated,
        resident,
        thp,
    })
}

/// Guest RAM resident in host memory (`mincore` over every region).
fn guest_resident(vm: &Vm) -> u64 {
    vm.memory()
        .regions()
        .iter()
        .map(|r| guest_mm::stress::resident_bytes(r.host_addr as u64, r.len))
        .sum()
}

/// CPUs this process kept busy since `cpu0` (its CPU time then) and `t`.
fn cores(cpu0: Duration, t: Instant) -> f64 {
    let wall = t.elapsed().as_secs_f64();
    if wall > 0.0 {
        process_cpu_time().saturating_sub(cpu0).as_secs_f64() / wall
    } else {
        0.0
    }
}

fn vm_once(a: &Case, size: u64) -> Result<VmRun> {
    let ReadyVm {
        vm,
        populate_ms,
        rss_before,
        rss_populated,
        resident,
        thp,
    } = ready_vm(a, size)?;
    let shmem0 = host_shmem();
    std::thread::sleep(SETTLE);
    let reported = Reported::start();
    let (cpu0, t) = (process_cpu_time(), Instant::now());
    let mut td = vm.destroy();
    let destroy_ms = ms(t.elapsed());
    let r = td.wait_reclaim();
    let (reclaim_ms, busy) = (ms(t.elapsed()), cores(cpu0, t));
    let host_reported_mib = mib_since(reported);
    let shmem1 = host_shmem();
    let rss_after = vmm::proc_stats::rss().rss;
    Ok(VmRun {
        destroy_ms,
        reclaim_ms,
        memory_back_ms: r.memory_back_ms,
        rss_at_memory_back: r.rss_at_memory_back,
        stop_vcpus_ms: td.stop_vcpus_ms,
        internal_ms: r.reclaim_ms,
        barrier_ms: r.stage2.barrier_ms,
        vm_drop_ms: r.vm_drop_ms,
        gather_ms: r.stage2.gather_ms,
        unmap_ms: r.unmap_ms,
        populate_ms,
        rss_before,
        rss_populated,
        rss_after,
        resident,
        thp,
        shmem_freed: shmem0.saturating_sub(shmem1),
        by_waiter: r.by_waiter,
        joined: r.stage2.background_joins > 0,
        cores: busy,
        host_reported_mib,
    })
}

/// A shared memfd mapping of `len` bytes (2 MiB aligned), closed and
/// unmapped by [`MemfdRegion::release`] or on drop.
struct MemfdRegion {
    file: Option<std::fs::File>,
    base: u64,
    len: u64,
    mapped: bool,
}

impl MemfdRegion {
    fn new(len: u64, leaf: Leaf) -> Result<MemfdRegion> {
        // SAFETY: a NUL-terminated static name; no memory side effects.
        let fd = unsafe { libc::memfd_create(c"gmm-teardown".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create failed");
        }
        // SAFETY: fd was just returned by memfd_create and is owned by
        // nobody else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len).context("sizing the memfd")?;
        let n = usize::try_from(len).context("size does not fit the address space")?;
        // SAFETY: a fresh shared mapping of our own memfd at a kernel-chosen
        // address; checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the memfd failed");
        }
        let advice = if leaf == Leaf::Size4K {
            libc::MADV_NOHUGEPAGE
        } else {
            libc::MADV_HUGEPAGE
        };
        // SAFETY: the mapping made above; the advice is a hint (as for
        // guest RAM, whose advice this mirrors).
        unsafe { libc::madvise(p, n, advice) };
        Ok(MemfdRegion {
            file: Some(file),
            base: p as u64,
            len,
            mapped: true,
        })
    }

    fn populate(&self) -> Result<()> {
        // SAFETY: our own live mapping; nothing else accesses it.
        unsafe { populate_range(self.base, self.len) }
    }

    fn resident(&self) -> u64 {
        guest_mm::stress::resident_bytes(self.base, self.len)
    }

    /// One hole punched per 4 KiB page, under `lock`.
    fn punch_per_page(&self, lock: &Mutex<()>) -> Result<()> {
        let fd = self.file.as_ref().map_or(-1, |f| f.as_raw_fd());
        let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
        for off in (0..self.len).step_by(PAGE as usize) {
            // SAFETY: our own memfd; punching drops only its pages.
            let rc = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    PAGE as libc::off_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("fallocate(PUNCH_HOLE) at {off:#x} failed"));
            }
        }
        Ok(())
    }

    /// One hole punched over the whole file.
    fn punch_all(&self) -> Result<()> {
        let fd = self.file.as_ref().map_or(-1, |f| f.as_raw_fd());
        let len = libc::off_t::try_from(self.len).context("memfd too large")?;
        // SAFETY: our own memfd; punching drops only its pages.
        let rc = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .context("fallocate(PUNCH_HOLE) of the whole memfd failed");
        }
        Ok(())
    }

    /// munmap, then close (the file's pages are freed).
    fn release(&mut self) {
        if self.mapped {
            // SAFETY: our own mapping, no reference into it is held.
            unsafe { libc::munmap(self.base as usize as *mut libc::c_void, self.len as usize) };
            self.mapped = false;
        }
        self.file = None;
    }
}

impl Drop for MemfdRegion {
    fn drop(&mut self) {
        self.release();
    }
}

/// One munmap or naive baseline: (ms, resident before, THP before).
fn baseline_once(a: &Case, size: u64, naive: bool) -> Result<(f64, u64, u64)> {
    match a.backing {
        BackingArg::Anon => {
            let r = AnonRegion::new(size, a.page)?;
            // SAFETY: our own fresh mapping; nothing else accesses it.
            unsafe { populate_range(r.base, r.len)? };
            let resident = r.resident();
            let thp = anon_huge_bytes().unwrap_or(0);
            let lock = Mutex::new(());
            std::thread::sleep(SETTLE);
            let t = Instant::now();
            if naive {
                r.release_per_page(&lock)?;
            }
            drop(r);
            Ok((ms(t.elapsed()), resident, thp))
        }
        BackingArg::Memfd => {
            let mut r = MemfdRegion::new(size, a.page)?;
            r.populate()?;
            let resident = r.resident();
            let thp = anon_huge_bytes().unwrap_or(0);
            let lock = Mutex::new(());
            std::thread::sleep(SETTLE);
            let t = Instant::now();
            if naive {
                r.punch_per_page(&lock)?;
            }
            r.release();
            Ok((ms(t.elapsed()), resident, thp))
        }
    }
}

/// Threads of the *split* baseline of `size` bytes: as many as the VM's
/// teardown splits its release of 4 KiB pages across (every core, at most
/// guest-mm's [`MAX_RELEASE_THREADS`], at least [`PARALLEL_SHARE_MIN`]
/// each), or `None` where the row has no split baseline (2 MiB leaves, a
/// release on one thread).
fn split_threads(case: &Case, size: u64, cores: usize) -> Option<usize> {
    let k = vm_release_threads(size, cores);
    (case.page == Leaf::Size4K && k > 1).then_some(k)
}

/// Threads the VM's own teardown releases `size` bytes of this row's RAM
/// with, which the *split beside KVM* baseline uses too: one where the
/// release frees huge pages below vmm's `HUGE_PARALLEL_MIN_BYTES`
/// (`teardown_release_threads`), else as [`vm_release_threads`].
fn kvm_release_threads(case: &Case, size: u64, cores: usize) -> usize {
    if vmm::memory::release::teardown_release_threads(case.vm_backing(), case.vm_page(), size) <= 1
    {
        1
    } else {
        vm_release_threads(size, cores)
    }
}

/// Threads a VM's teardown splits its release of `size` bytes of 4 KiB
/// pages across on `cores` cores: every core, at most guest-mm's
/// [`MAX_RELEASE_THREADS`], at least [`PARALLEL_SHARE_MIN`] each (at
/// least one).
pub(crate) fn vm_release_threads(size: u64, cores: usize) -> usize {
    let by_size = usize::try_from(size / PARALLEL_SHARE_MIN).unwrap_or(usize::MAX);
    cores.min(MAX_RELEASE_THREADS).min(by_size).max(1)
}

/// `len` cut into `k` shares on 2 MiB boundaries: `(offset, len)`, the
/// last share taking what is left; empty shares are left out.
fn shares(len: u64, k: usize) -> Vec<(u64, u64)> {
    const PIECE: u64 = 2 << 20;
    let k = k.max(1) as u64;
    let each = len.div_ceil(k).next_multiple_of(PIECE);
    (0..k)
        .map(|i| ((i * each).min(len), each.min(len.saturating_sub(i * each))))
        .filter(|&(_, l)| l > 0)
        .collect()
}

/// Runs `f(0)` on the calling thread and `f(1)` .. `f(k - 1)` on as many
/// new threads, all at once (each first waits until every thread is
/// through its start, as guest-mm's release does:
/// [`guest_mm::backing::wait_started`]); the first error once all have
/// returned.
fn on_threads(k: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let started = std::sync::atomic::AtomicUsize::new(0);
    let go = |i: usize| {
        started.fetch_add(1, std::sync::atomic::Ordering::Release);
        guest_mm::backing::wait_started(&started, k);
        f(i)
    };
    std::thread::scope(|sc| {
        let go = &go;
        let helpers: Vec<_> = (1..k).map(|i| sc.spawn(move || go(i))).collect();
        let mine = if k > 0 { go(0) } else { Ok(()) };
        helpers.into_iter().fold(mine, |acc, h| {
            let one = h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a split thread panicked")));
            acc.and(one)
        })
    })
}

/// What one run of a split baseline measured.
struct SplitRun {
    ms: f64,
    /// Bytes resident before the release.
    resident: u64,
    /// CPUs the timed release kept busy (see [`cores`]).
    cores: f64,
}

/// One *split* baseline (see the module doc) with `threads` threads.
fn split_once(a: &Case, size: u64, threads: usize) -> Result<SplitRun> {
    match a.backing {
        BackingArg::Anon => {
            let r = AnonRegion::new(size, a.page)?;
            // SAFETY: our own fresh mapping; nothing else accesses it.
            unsafe { populate_range(r.base, r.len)? };
            let resident = r.resident();
            let parts = shares(size, threads);
            std::thread::sleep(SETTLE);
            let (cpu0, t) = (process_cpu_time(), Instant::now());
            let res = on_threads(parts.len(), |i| {
                let (off, len) = parts[i];
                r.dontneed(off, len)
            });
            drop(r);
            let (el, cores) = (ms(t.elapsed()), cores(cpu0, t));
            res?;
            Ok(SplitRun {
                ms: el,
                resident,
                cores,
            })
        }
        BackingArg::Memfd => {
            let (n, file_len) = vmm::memory::backing::memfd_files(size);
            let mut files = Vec::with_capacity(n);
            let mut left = size;
            for _ in 0..n {
                let len = file_len.min(left);
                left -= len;
                let f = MemfdRegion::new(len, a.page)?;
                f.populate()?;
                files.push(f);
            }
            let resident: u64 = files.iter().map(MemfdRegion::resident).sum();
            let k = threads.clamp(1, n.max(1));
            std::thread::sleep(SETTLE);
            let (cpu0, t) = (process_cpu_time(), Instant::now());
            let res = on_threads(k, |i| {
                files
                    .iter()
                    .skip(i)
                    .step_by(k)
                    .try_for_each(MemfdRegion::punch_all)
            });
            for f in &mut files {
                f.release();
            }
            let (el, cores) = (ms(t.elapsed()), cores(cpu0, t));
            res?;
            Ok(SplitRun {
                ms: el,
                resident,
                cores,
            })
        }
    }
}

/// One *split with KVM* baseline (see the module doc): a VM populated as
/// the row's VM is, its vCPUs stopped, whose guest RAM `threads` plain
/// threads release at once while the KVM VM and its memory slots still
/// exist (chunks sized as the VM's own release sizes them; anon: claimed
/// from one cursor over the regions, each `madvise(MADV_DONTNEED)`d;
/// memfd: the VM's files, one thread per file, punched chunk by chunk);
/// then the VM is torn down, untimed.
fn split_kvm_once(a: &Case, size: u64, threads: usize) -> Result<SplitRun> {
    let ready = ready_vm(a, size)?;
    let regions = ready.vm.memory().regions();
    let k = threads.max(1);
    let files: Vec<_> = regions
        .iter()
        .flat_map(|r| r.files.spans().collect::<Vec<_>>())
        .collect();
    // anon: (region index, offset in it, bytes left in all regions).
    let cursor = Mutex::new((0usize, 0u64, regions.iter().map(|r| r.len).sum::<u64>()));
    let next = || -> Option<(u64, u64)> {
        let mut c = cursor.lock().unwrap_or_else(|e| e.into_inner());
        let (i, off, left) = *c;
        let r = regions.get(i)?;
        // One thread releases each region whole, as the VM's one-thread
        // release does; more claim chunks as its helpers do.
        let take = if k == 1 {
            r.len - off
        } else {
            guest_mm::backing::claim_size(left, k).min(BACKGROUND_CLAIM_MAX)
        }
        .min(r.len - off);
        *c = if off + take == r.len {
            (i + 1, 0, left - take)
        } else {
            (i, off + take, left - take)
        };
        Some((r.host_addr as u64 + off, take))
    };
    // A file is punched in chunks sized as a lane's of the VM's release.
    let punch = |fd: std::os::fd::RawFd, len: u64| -> Result<()> {
        let mut off = 0;
        while off < len {
            let take = if k == 1 {
                len - off
            } else {
                guest_mm::backing::claim_size(len - off, k).min(BACKGROUND_CLAIM_MAX)
            };
            let (o, l) = (
                libc::off_t::try_from(off).context("file too large")?,
                libc::off_t::try_from(take).context("file too large")?,
            );
            // SAFETY: one of the VM's memfds, open while `ready.vm` lives;
            // punching drops only its pages.
            let rc = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    o,
                    l,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("fallocate(PUNCH_HOLE) of a VM file at {off:#x}"));
            }
            off += take;
        }
        Ok(())
    };
    let n = match a.backing {
        BackingArg::Anon => k,
        BackingArg::Memfd => k.clamp(1, files.len().max(1)),
    };
    std::thread::sleep(SETTLE);
    let (cpu0, t) = (process_cpu_time(), Instant::now());
    let res = on_threads(n, |i| match a.backing {
        BackingArg::Anon => {
            while let Some((addr, len)) = next() {
                // SAFETY: a part of the VM's guest RAM mapping, which lives
                // until `ready.vm` is torn down below; its vCPUs are stopped
                // and no device runs, so nothing holds a reference into it.
                unsafe { crate::mem::dontneed(addr, len)? };
            }
            Ok(())
        }
        BackingArg::Memfd => files
            .iter()
            .skip(i)
            .step_by(n)
            .try_for_each(|f| punch(f.fd, f.len)),
    });
    let (el, busy) = (ms(t.elapsed()), cores(cpu0, t));
    let left = guest_resident(&ready.vm);
    let mut td = ready.vm.destroy();
    td.wait_reclaim();
    res?;
    if left > size / 64 {
        bail!(
            "the split-with-KVM baseline left {} of {} resident",
            human_bytes(left),
            human_bytes(size)
        );
    }
    Ok(SplitRun {
        ms: el,
        resident: ready.resident,
        cores: busy,
    })
}

/// Time a child may take to become ready with `size` bytes populated.
fn ready_budget(size: u64) -> Duration {
    Duration::from_secs(30) + READY_PER_GIB * u32::try_from(size.div_ceil(1 << 30)).unwrap_or(64)
}

/// QEMU advises huge pages on all its RAM (`MADV_HUGEPAGE`), so at 4 KiB
/// leaves it runs with transparent huge pages disabled for the process
/// (`PR_SET_THP_DISABLE`, kept across `execve`): like with like, 4 KiB
/// pages against 4 KiB pages. `qemu_once` checks what the kernel gave it.
fn qemu_command(q: &QemuInfo, size: u64, sock: &Path, leaf: Leaf) -> Command {
    let mut c = Command::new(&q.path);
    if leaf == Leaf::Size4K {
        // SAFETY: the closure runs in the forked child before `execve` and
        // makes one system call (async-signal-safe); it touches no memory
        // of the parent and allocates nothing.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c.args([
        "-machine",
        "none",
        "-nodefaults",
        "-nographic",
        "-S",
        "-accel",
        &q.accel,
    ])
    .arg("-object")
    .arg(format!("{},id=m0,size={size},prealloc=on", q.backend))
    .args(["-machine", "memory-backend=m0", "-qmp"])
    .arg(format!("unix:{},server=on,wait=off", sock.display()))
    .stdout(Stdio::null());
    c
}

/// One QEMU run: (quit sent → process exited ms, RSS when ready, its
/// `AnonHugePages` when ready). Fails if QEMU's RAM got huge pages at 4 KiB
/// leaves: the row would compare unlike memory.
fn qemu_once(q: &QemuInfo, size: u64, leaf: Leaf) -> Result<(f64, u64, u64)> {
    let sock = SockFile(sock_path("qmp"));
    let _ = std::fs::remove_file(&sock.0);
    let mut w = Waited::spawn(qemu_command(q, size, &sock.0, leaf))?;
    let budget = ready_budget(size);
    let deadline = Instant::now() + budget;
    let mut qmp = qmp_ready(&mut w, &sock.0, deadline)?;
    let rss = wait_rss(w.pid, size, deadline, "QEMU")?;
    std::thread::sleep(SETTLE);
    let thp = vmm::proc_stats::kib_field(format!("/proc/{}/smaps_rollup", w.pid), "AnonHugePages:")
        .unwrap_or(0);
    if leaf == Leaf::Size4K && thp > 0 {
        bail!(
            "QEMU's RAM has {} of transparent huge pages although it was started with \
             PR_SET_THP_DISABLE for a 4 KiB row: the comparison would not be like with like",
            human_bytes(thp)
        );
    }
    let t = Instant::now();
    if let Err(e) = qmp.send("{\"execute\":\"quit\"}") {
        let why = match w.wait(Duration::from_secs(5)) {
            Ok((_, o)) => format!("QEMU had exited ({}): {}", o.status, tail(&o.stderr)),
            Err(e) => format!("{e:#}"),
        };
        bail!("sending quit to QEMU failed ({e}); {why}");
    }
    let (end, out) = w.wait(budget)?;
    if !out.status.success() {
        bail!("QEMU exited with {}: {}", out.status, tail(&out.stderr));
    }
    Ok((ms(end.saturating_duration_since(t)), rss, thp))
}

/// QEMU's RAM backend object for `b`.
fn qemu_backend(b: BackingArg) -> &'static str {
    match b {
        BackingArg::Anon => "memory-backend-ram",
        BackingArg::Memfd => "memory-backend-memfd,share=on",
    }
}

/// Finds QEMU and works out an accelerator that starts (`kvm`, else `tcg`).
fn probe_qemu(a: &Args) -> std::result::Result<QemuInfo, String> {
    let backing = a.backing.first().copied().unwrap_or(BackingArg::Anon);
    let path = which(&a.qemu).ok_or_else(|| format!("{} not found", a.qemu))?;
    let version = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} --version failed: {e}", path.display()))?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let backend = qemu_backend(backing);
    let mut errors = Vec::new();
    for accel in ["kvm", "tcg"] {
        let q = QemuInfo {
            path: path.display().to_string(),
            version: version.clone(),
            accel: accel.to_string(),
            backend: backend.to_string(),
        };
        match qemu_once(&q, 2 << 20, Leaf::Size4K) {
            Ok(_) => return Ok(q),
            Err(e) => errors.push(format!("-accel {accel}: {e:#}")),
        }
    }
    Err(format!("QEMU did not start: {}", errors.join("; ")))
}

/// One `vmm` process run.
struct ProcessRun {
    exit_ms: f64,
    ack_ms: f64,
    destroy_ms: Option<f64>,
    reclaim_ms: Option<f64>,
    rss: u64,
}

fn process_once(a: &Case, vmm: &Path, size: u64) -> Result<ProcessRun> {
    let sock = SockFile(sock_path("vmm"));
    let _ = std::fs::remove_file(&sock.0);
    let mut cmd = Command::new(vmm);
    cmd.args(["run", "--json", "--populate", "--mem"])
        .arg(format!("{}M", size >> 20))
        .args(["--backing", a.backing.name(), "--page-size"])
        .arg(if a.page == Leaf::Size4K { "4K" } else { "2M" })
        .arg("--api-sock")
        .arg(&sock.0)
        .stdout(Stdio::piped());
    let mut w = Waited::spawn(cmd)?;
    let budget = ready_budget(size);
    let deadline = Instant::now() + budget;
    // The API is served only after RAM was populated.
    loop {
        if let Some(o) = w.exited() {
            bail!("vmm exited early ({}): {}", o.status, tail(&o.stderr));
        }
        if sock.0.exists() && vmm::api::call(&sock.0, "GET", "/", None).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("vmm did not serve its API in time");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rss = wait_rss(w.pid, size, deadline, "vmm")?;
    std::thread::sleep(SETTLE);
    let body = serde_json::json!({ "action_type": "SendCtrlAltDel" });
    let t = Instant::now();
    vmm::api::call(&sock.0, "PUT", "/actions", Some(&body)).context("sending shutdown")?;
    let ack_ms = ms(t.elapsed());
    let (end, out) = w.wait(budget)?;
    if !out.status.success() {
        bail!("vmm exited with {}: {}", out.status, tail(&out.stderr));
    }
    let summary: Option<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok());
    let field = |k: &str| {
        summary
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(serde_json::Value::as_f64)
    };
    Ok(ProcessRun {
        exit_ms: ms(end.saturating_duration_since(t)),
        ack_ms,
        destroy_ms: field("teardown_ms"),
        reclaim_ms: field("reclaim_ms"),
        rss,
    })
}

/// One `vmm --api-sock --populate` run: the service's embedded guest,
/// configured and started over the API, RAM populated host-side; SIGTERM
/// sent → process exited, ms.
fn service_once(a: &Case, vmm: &Path, size: u64) -> Result<f64> {
    let budget = ready_budget(size);
    let vm = start_service_vm(
        &ServiceSpec {
            vmm,
            tag: "svc",
            mem: size,
            huge: a.page != Leaf::Size4K,
            stats_polling_s: 0,
            who: "the vmm service",
        },
        Instant::now() + budget,
    )?;
    std::thread::sleep(SETTLE);
    let ServiceVm { mut w, sock: _sock } = vm;
    let t = Instant::now();
    sigterm(&mut w, "the vmm service")?;
    let (end, out) = w.wait(budget)?;
    if !out.status.success() {
        bail!(
            "vmm service exited with {}: {}",
            out.status,
            tail(&out.stderr)
        );
    }
    Ok(ms(end.saturating_duration_since(t)))
}

fn med_opt(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| round(median(v), 3))
}

fn r3(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| round(*x, 3)).collect()
}

/// Run the command.
pub fn cmd(a: &Args) -> Result<()> {
    let run_reported = Reported::start();
    let (sizes_arg, pages, backings) = if a.matrix {
        (
            vec![256 << 20, 1 << 30, 2 << 30, 4 << 30],
            vec![Leaf::Size2M, Leaf::Size4K],
            vec![BackingArg::Anon, BackingArg::Memfd],
        )
    } else {
        (a.sizes.0.clone(), a.page_size.clone(), a.backing.clone())
    };
    for &s in &sizes_arg {
        MemSize::from_bytes(s).with_context(|| format!("--sizes: {}", human_bytes(s)))?;
    }
    let (qemu, qemu_skipped) = if a.no_qemu {
        (None, Some("--no-qemu".to_string()))
    } else {
        match probe_qemu(a) {
            Ok(q) => (Some(q), None),
            Err(e) => (None, Some(e)),
        }
    };
    let vmm_bin = if a.no_process {
        None
    } else {
        Some(vmm_binary()?)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let strategies_of = |c: &Case, size: u64| {
        let b = c.backing;
        let mut v = vec![Strategy::Vm, Strategy::Munmap];
        if !a.no_naive {
            v.push(Strategy::Naive);
        }
        if split_threads(c, size, cores).is_some() {
            v.push(Strategy::Split);
        }
        v.push(Strategy::SplitKvm);
        if qemu.is_some() {
            v.push(Strategy::Qemu);
        }
        if vmm_bin.is_some() {
            v.push(Strategy::Process);
            // The service maps Firecracker's huge_pages onto anonymous memory.
            if b == BackingArg::Anon {
                v.push(Strategy::Service);
            }
        }
        v
    };
    let like_of = |b: BackingArg| match b {
        BackingArg::Anon => {
            "anon: an equally populated private anonymous mapping with the same leaf advice, \
             one munmap: like with like (guest RAM is that kind of mapping)"
        }
        BackingArg::Memfd => {
            "memfd: a memfd of the same size, mapped shared, populated, then munmap + close \
             (file freed): like with like (guest RAM is a memfd mapping)"
        }
    };
    let like = backings
        .iter()
        .map(|&b| like_of(b))
        .collect::<Vec<_>>()
        .join("; ");
    let join = |v: Vec<String>| v.join(",");
    let backing_names = join(backings.iter().map(|b| b.name().to_string()).collect());
    let page_names = join(pages.iter().map(ToString::to_string).collect());
    crate::say(
        a.json,
        &format!(
            "bench teardown: sizes {}, {backing_names} backing, {page_names} leaves, populated by the {}, {} reps\n  \
             munmap baseline (per row, same memory, same run): {like}\n  qemu peer: {}\n  vmm process: {}\n",
            sizes_arg
                .iter()
                .map(|s| human_bytes(*s))
                .collect::<Vec<_>>()
                .join(", "),
            a.populate.name(),
            a.reps,
            match (&qemu, &qemu_skipped) {
                (Some(q), _) => format!("{} (-accel {})", q.version, q.accel),
                (None, Some(why)) => format!("skipped: {why}"),
                (None, None) => "skipped".into(),
            },
            vmm_bin
                .as_ref()
                .map_or("skipped (--no-process)".into(), |p| p.display().to_string()),
        ),
    );
    let mut cases = Vec::new();
    for &size in &sizes_arg {
        for &page in &pages {
            for &backing in &backings {
                cases.push((
                    size,
                    Case {
                        backing,
                        page,
                        populate: a.populate,
                    },
                ));
            }
        }
    }
    let total: u64 = cases
        .iter()
        .map(|&(size, c)| u64::from(a.reps) * strategies_of(&c, size).len() as u64)
        .sum();
    let pb = crate::progress::bar(total, "teardown");
    let mut sizes = Vec::new();
    for &(size, case) in &cases {
        let strategies = strategies_of(&case, size);
        let qemu = qemu.clone().map(|mut q| {
            q.backend = qemu_backend(case.backing).to_string();
            q
        });
        let mut res = TeardownSize {
            size_bytes: size,
            backing: case.backing.name().into(),
            page_size: case.page.to_string(),
            rss_back: true,
            ..TeardownSize::default()
        };
        let (mut vmdrop, mut unmap, mut pop) = (vec![], vec![], vec![]);
        let (mut stopv, mut barrier, mut other) = (vec![], vec![], vec![]);
        let (mut vthp, mut mthp, mut nthp) = (vec![], vec![], vec![]);
        let (mut rb, mut rp, mut ra, mut resd, mut ret, mut shm) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut rmb: Vec<f64> = vec![];
        let mut qthp: Vec<f64> = vec![];
        let (mut qrss, mut pack, mut pdes, mut prec, mut prss) =
            (vec![], vec![], vec![], vec![], vec![]);
        for rep in 0..a.reps {
            let n = strategies.len();
            for k in 0..n {
                let s = strategies[(k + rep as usize) % n];
                pb.set_message(format!(
                    "{} {} {} {:?}",
                    human_bytes(size),
                    case.backing.name(),
                    case.page,
                    s
                ));
                match s {
                    Strategy::Vm => {
                        let r = vm_once(&case, size)?;
                        res.destroy_ms_all.push(r.destroy_ms);
                        res.reclaim_ms_all.push(r.memory_back_ms);
                        res.reclaim_done_ms_all.push(r.reclaim_ms);
                        rmb.push(r.rss_at_memory_back as f64);
                        res.reclaim_stage2_gather_ms_all.push(r.gather_ms);
                        stopv.push(r.stop_vcpus_ms);
                        other.push(
                            r.internal_ms
                                - r.stop_vcpus_ms
                                - r.vm_drop_ms
                                - r.gather_ms
                                - r.barrier_ms
                                - r.unmap_ms,
                        );
                        res.reclaim_internal_ms_all.push(r.internal_ms);
                        res.reclaims_by_waiter += u32::from(r.by_waiter);
                        res.background_joins += u32::from(r.joined);
                        res.reclaim_cores_all.push(round(r.cores, 2));
                        res.host_reported_mib_all.extend(r.host_reported_mib);
                        vthp.push(r.thp as f64);
                        barrier.push(r.barrier_ms);
                        vmdrop.push(r.vm_drop_ms);
                        unmap.push(r.unmap_ms);
                        pop.push(r.populate_ms);
                        rb.push(r.rss_before as f64);
                        rp.push(r.rss_populated as f64);
                        ra.push(r.rss_after as f64);
                        resd.push(r.resident as f64);
                        ret.push(r.rss_populated.saturating_sub(r.rss_after) as f64);
                        shm.push(r.shmem_freed as f64);
                        res.rss_back &= r.resident >= size
                            && r.rss_after <= r.rss_before + (16 << 20)
                            && r.rss_at_memory_back <= r.rss_before + (16 << 20);
                    }
                    Strategy::Munmap | Strategy::Naive => {
                        let naive = s == Strategy::Naive;
                        let (el, resident, thp) = baseline_once(&case, size, naive)?;
                        if resident < size {
                            bail!(
                                "the {} baseline was populated to only {} of {}",
                                if naive { "naive" } else { "munmap" },
                                human_bytes(resident),
                                human_bytes(size)
                            );
                        }
                        if naive {
                            res.naive_ms_all.push(el);
                            nthp.push(thp as f64);
                        } else {
                            res.munmap_ms_all.push(el);
                            mthp.push(thp as f64);
                        }
                    }
                    Strategy::Split | Strategy::SplitKvm => {
                        let kvm = s == Strategy::SplitKvm;
                        let k = if kvm {
                            kvm_release_threads(&case, size, cores)
                        } else {
                            split_threads(&case, size, cores).unwrap_or(1)
                        };
                        let SplitRun {
                            ms: el,
                            resident,
                            cores,
                        } = if kvm {
                            split_kvm_once(&case, size, k)?
                        } else {
                            split_once(&case, size, k)?
                        };
                        if resident < size {
                            bail!(
                                "the {} baseline was populated to only {} of {}",
                                if kvm { "split-with-KVM" } else { "split" },
                                human_bytes(resident),
                                human_bytes(size)
                            );
                        }
                        if kvm {
                            res.split_kvm_ms_all.push(el);
                            res.split_kvm_cores_all.push(round(cores, 2));
                            res.split_kvm_threads = Some(k as u32);
                        } else {
                            res.split_ms_all.push(el);
                            res.split_cores_all.push(round(cores, 2));
                            res.split_threads = Some(k as u32);
                        }
                    }
                    Strategy::Qemu => {
                        if let Some(q) = &qemu {
                            let (el, rss, thp) = qemu_once(q, size, case.page)
                                .with_context(|| format!("QEMU peer at {}", human_bytes(size)))?;
                            res.qemu_ms_all.push(el);
                            qrss.push(rss as f64);
                            qthp.push(thp as f64);
                        }
                    }
                    Strategy::Service => {
                        if let Some(v) = &vmm_bin {
                            let el = service_once(&case, v, size)
                                .with_context(|| format!("vmm service at {}", human_bytes(size)))?;
                            res.service_sigterm_ms_all.push(el);
                        }
                    }
                    Strategy::Process => {
                        if let Some(v) = &vmm_bin {
                            let r = process_once(&case, v, size)
                                .with_context(|| format!("vmm process at {}", human_bytes(size)))?;
                            res.process_exit_ms_all.push(r.exit_ms);
                            pack.push(r.ack_ms);
                            pdes.extend(r.destroy_ms);
                            prec.extend(r.reclaim_ms);
                            prss.push(r.rss as f64);
                        }
                    }
                }
                pb.inc(1);
                std::thread::sleep(SETTLE);
            }
        }
        res.destroy_ms = round(median(&res.destroy_ms_all), 3);
        res.reclaim_ms = round(median(&res.reclaim_ms_all), 3);
        res.reclaim_done_ms = round(median(&res.reclaim_done_ms_all), 3);
        res.rss_at_memory_back_bytes = median(&rmb) as u64;
        res.destroy_stop_vcpus_ms = round(median(&stopv), 3);
        let cores_of = |v: &Vec<f64>| (!v.is_empty()).then(|| round(median(v), 2));
        res.reclaim_cores = cores_of(&res.reclaim_cores_all);
        res.split_cores = cores_of(&res.split_cores_all);
        res.split_kvm_cores = cores_of(&res.split_kvm_cores_all);
        res.reclaim_internal_ms = round(median(&res.reclaim_internal_ms_all), 3);
        res.reclaim_other_ms = round(median(&other), 3);
        res.reclaim_stage2_barrier_ms = round(median(&barrier), 3);
        res.reclaim_vm_drop_ms = round(median(&vmdrop), 3);
        res.reclaim_stage2_gather_ms = round(median(&res.reclaim_stage2_gather_ms_all), 3);
        res.reclaim_unmap_ms = round(median(&unmap), 3);
        res.populate_ms = round(median(&pop), 1);
        res.munmap_ms = round(median(&res.munmap_ms_all), 3);
        res.naive_ms = round(median(&res.naive_ms_all), 3);
        res.ratio_vs_munmap = if res.munmap_ms > 0.0 {
            round(median(&res.reclaim_ms_all) / median(&res.munmap_ms_all), 3)
        } else {
            0.0
        };
        res.ratio_naive_vs_reclaim = if res.reclaim_ms > 0.0 {
            round(median(&res.naive_ms_all) / median(&res.reclaim_ms_all), 2)
        } else {
            0.0
        };
        res.split_ms = med_opt(&res.split_ms_all);
        res.split_ratio_vs_munmap = res
            .split_ms
            .filter(|_| res.munmap_ms > 0.0)
            .map(|_| round(median(&res.split_ms_all) / median(&res.munmap_ms_all), 3));
        res.split_kvm_ms = med_opt(&res.split_kvm_ms_all);
        res.split_kvm_ratio_vs_munmap =
            res.split_kvm_ms.filter(|_| res.munmap_ms > 0.0).map(|_| {
                round(
                    median(&res.split_kvm_ms_all) / median(&res.munmap_ms_all),
                    3,
                )
            });
        res.qemu_ms = med_opt(&res.qemu_ms_all);
        res.qemu_rss_bytes = (!qrss.is_empty()).then(|| median(&qrss) as u64);
        res.qemu_thp_bytes = (!qthp.is_empty()).then(|| median(&qthp) as u64);
        res.process_exit_ms = med_opt(&res.process_exit_ms_all);
        res.process_ack_ms = med_opt(&pack);
        res.process_destroy_ms = med_opt(&pdes);
        res.process_reclaim_ms = med_opt(&prec);
        res.process_rss_bytes = (!prss.is_empty()).then(|| median(&prss) as u64);
        res.service_sigterm_ms = med_opt(&res.service_sigterm_ms_all);
        res.rss_before_bytes = median(&rb) as u64;
        res.rss_populated_bytes = median(&rp) as u64;
        res.rss_after_bytes = median(&ra) as u64;
        res.guest_resident_bytes = median(&resd) as u64;
        res.vm_thp_bytes = median(&vthp) as u64;
        res.munmap_thp_bytes = median(&mthp) as u64;
        res.naive_thp_bytes = median(&nthp) as u64;
        res.rss_returned_bytes = median(&ret) as u64;
        res.shmem_freed_bytes = (case.backing == BackingArg::Memfd).then(|| median(&shm) as u64);
        let v = verdicts(
            res.ratio_vs_munmap,
            res.destroy_ms,
            res.process_exit_ms,
            res.qemu_ms,
        );
        res.reclaim_within_1_10x_munmap = v.reclaim_within_1_10x_munmap;
        res.destroy_within_5ms = v.destroy_within_5ms;
        res.faster_than_qemu = v.faster_than_qemu;
        let g = goal3(res.ratio_vs_munmap, res.destroy_ms, case.page, size);
        res.memory_back_within_1x_munmap = g.within_1x;
        res.memory_back_within_0_6x_munmap = g.within_0_6x;
        res.destroy_within_1ms = g.destroy_1ms;
        res.targets_met = g.met();
        for v in [
            &mut res.destroy_ms_all,
            &mut res.reclaim_ms_all,
            &mut res.reclaim_internal_ms_all,
            &mut res.reclaim_stage2_gather_ms_all,
            &mut res.munmap_ms_all,
            &mut res.naive_ms_all,
            &mut res.split_ms_all,
            &mut res.split_kvm_ms_all,
            &mut res.qemu_ms_all,
            &mut res.process_exit_ms_all,
            &mut res.service_sigterm_ms_all,
        ] {
            *v = r3(v);
        }
        let opt = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.3} ms"));
        let host = Overlap::split(&res.destroy_ms_all, &res.host_reported_mib_all).map_or(
            String::new(),
            |o| {
                format!(
                    "  host     {}\n",
                    o.text("teardowns", "`destroy` took", "ms")
                )
            },
        );
        pb.suspend(|| {
            crate::say(
                a.json,
                &format!(
                    "{} {} {}:\n  vm       destroy {:.3} ms (vCPUs {:.3}), reclaim {:>9.3} ms (memory back, released by the waiting thread in {} of {}, helpers joined in {}, CPUs busy {}; all done {:.3} ms, in thread {:.3}: drop VM {:.3}, stage-2 gather {:.3} + grace period {:.3}, unmap {:.3}, other {:.3}); populate {:.0} ms\n  \
                     munmap   {:>9.3} ms   reclaim/munmap x{:.3} (target <= 1.1: {})\n  \
                     naive    {:>9.3} ms   naive/reclaim x{:.2}\n  \
                     split    {} (kernel bound: {})\n  \
                     splitkvm {} (the same beside the VM's KVM: {})\n  \
                     qemu     {} (quit -> exit)\n  \
                     vmm      {} (shutdown -> exit; API ack {}, its destroy {}, its reclaim {})  faster than qemu: {}\n  \
                     service  {} (SIGTERM -> exit)\n  \
                     rss {} -> {} -> {} (returned {}), guest resident {}, rss back: {}{}\n  \
                     THP when populated: vm {}, munmap {}, naive {}\n  \
                     goal 3: memory back <= 1.0x munmap: {}, <= 0.6x (4K, >= 1 GiB): {}, destroy <= 1 ms: {} => {}\n{}",
                    human_bytes(size),
                    case.backing.name(),
                    case.page,
                    res.destroy_ms,
                    res.destroy_stop_vcpus_ms,
                    res.reclaim_ms,
                    res.reclaims_by_waiter,
                    res.reclaim_ms_all.len(),
                    res.background_joins,
                    res.reclaim_cores
                        .map_or("n/a".to_string(), |c| format!("{c:.2}")),
                    res.reclaim_done_ms,
                    res.reclaim_internal_ms,
                    res.reclaim_vm_drop_ms,
                    res.reclaim_stage2_gather_ms,
                    res.reclaim_stage2_barrier_ms,
                    res.reclaim_unmap_ms,
                    res.reclaim_other_ms,
                    res.populate_ms,
                    res.munmap_ms,
                    res.ratio_vs_munmap,
                    res.reclaim_within_1_10x_munmap,
                    res.naive_ms,
                    res.ratio_naive_vs_reclaim,
                    opt(res.split_ms),
                    res.split_ratio_vs_munmap.map_or("n/a".to_string(), |x| format!(
                        "{} threads, x{x:.3} munmap, CPUs busy {:.2}",
                        res.split_threads.unwrap_or(0),
                        res.split_cores.unwrap_or(0.0)
                    )),
                    opt(res.split_kvm_ms),
                    res.split_kvm_ratio_vs_munmap.map_or("n/a".to_string(), |x| format!(
                        "{} threads, x{x:.3} munmap, CPUs busy {:.2}",
                        res.split_kvm_threads.unwrap_or(0),
                        res.split_kvm_cores.unwrap_or(0.0)
                    )),
                    opt(res.qemu_ms),
                    opt(res.process_exit_ms),
                    opt(res.process_ack_ms),
                    opt(res.process_destroy_ms),
                    opt(res.process_reclaim_ms),
                    res.faster_than_qemu
                        .map_or("n/a".to_string(), |b| b.to_string()),
                    opt(res.service_sigterm_ms),
                    human_bytes(res.rss_before_bytes),
                    human_bytes(res.rss_populated_bytes),
                    human_bytes(res.rss_after_bytes),
                    human_bytes(res.rss_returned_bytes),
                    human_bytes(res.guest_resident_bytes),
                    res.rss_back,
                    res.shmem_freed_bytes
                        .map_or(String::new(), |b| format!(", host Shmem freed {}", human_bytes(b))),
                    human_bytes(res.vm_thp_bytes),
                    human_bytes(res.munmap_thp_bytes),
                    human_bytes(res.naive_thp_bytes),
                    res.memory_back_within_1x_munmap,
                    res.memory_back_within_0_6x_munmap
                        .map_or("n/a".to_string(), |b| b.to_string()),
                    res.destroy_within_1ms,
                    if res.targets_met { "met" } else { "MISSED" },
                    host,
                ),
            );
        });
        sizes.push(res);
    }
    pb.finish_and_clear();
    let out = TeardownResult {
        tool: "bench-teardown".into(),
        backing: backing_names,
        page_size: page_names,
        populate: a.populate.name().into(),
        reps: a.reps,
        membarrier: crate::membarrier(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_total_bytes: meminfo("MemTotal:"),
        kernel: kernel(),
        kvm_modules: kvm_modules(),
        qemu,
        qemu_skipped,
        process_measured: vmm_bin.is_some(),
        munmap_baseline: like.split_whitespace().collect::<Vec<_>>().join(" "),
        host_reported_mib: mib_since(run_reported),
        sizes,
    };
    crate::emit_json(a.json, &out)?;
    Ok(())
}

/// Issue 12's goal 3 for one row, from its figures.
#[derive(Debug, PartialEq)]
struct Goal3 {
    /// Memory back within 1.0x a bare munmap (a ratio of 0: unmeasured).
    within_1x: bool,
    /// 4 KiB leaves from 1 GiB: within 0.6x; `None` where it does not apply.
    within_0_6x: Option<bool>,
    /// The destroy call returned within 1 ms.
    destroy_1ms: bool,
}

impl Goal3 {
    fn met(&self) -> bool {
        self.within_1x && self.within_0_6x != Some(false) && self.destroy_1ms
    }
}

fn goal3(ratio_vs_munmap: f64, destroy_ms: f64, page: Leaf, size: u64) -> Goal3 {
    let measured = ratio_vs_munmap > 0.0;
    Goal3 {
        within_1x: measured && ratio_vs_munmap <= 1.0,
        within_0_6x: (page == Leaf::Size4K && size >= 1 << 30)
            .then_some(measured && ratio_vs_munmap <= 0.6),
        destroy_1ms: destroy_ms <= 1.0,
    }
}

/// The older targets for one size, from its figures.
#[derive(Debug, PartialEq)]
struct Verdicts {
    /// Memory back within 1.1x a bare munmap (a ratio of 0 means unmeasured).
    reclaim_within_1_10x_munmap: bool,
    /// The destroy call returned within 5 ms.
    destroy_within_5ms: bool,
    /// Our process exited before QEMU's (None unless both were measured).
    faster_than_qemu: Option<bool>,
}

fn verdicts(
    ratio_vs_munmap: f64,
    destroy_ms: f64,
    process_exit_ms: Option<f64>,
    qemu_ms: Option<f64>,
) -> Verdicts {
    Verdicts {
        reclaim_within_1_10x_munmap: ratio_vs_munmap > 0.0 && ratio_vs_munmap <= 1.1,
        destroy_within_5ms: destroy_ms <= 5.0,
        faster_than_qemu: match (process_exit_ms, qemu_ms) {
            (Some(p), Some(q)) => Some(p < q),
            _ => None,
        },
    }
}

#[cfg(test)]
mod verdict_tests {
    use super::{goal3, verdicts, Goal3, Leaf, Verdicts};

    /// Goal 3 written out case by case at its boundaries.
    #[test]
    fn goal3_at_its_boundaries() {
        const G: u64 = 1 << 30;
        let all = Goal3 {
            within_1x: true,
            within_0_6x: Some(true),
            destroy_1ms: true,
        };
        assert_eq!(goal3(0.6, 1.0, Leaf::Size4K, G), all);
        assert!(all.met());
        let r = goal3(0.61, 0.2, Leaf::Size4K, G);
        assert_eq!(r.within_0_6x, Some(false));
        assert!(r.within_1x && !r.met());
        // 0.6x applies only to 4 KiB leaves from 1 GiB.
        assert_eq!(goal3(0.9, 0.2, Leaf::Size4K, 256 << 20).within_0_6x, None);
        assert_eq!(goal3(0.9, 0.2, Leaf::Size2M, 4 * G).within_0_6x, None);
        assert!(goal3(1.0, 0.2, Leaf::Size2M, G).met());
        assert!(!goal3(1.001, 0.2, Leaf::Size2M, G).met());
        assert!(!goal3(0.5, 1.001, Leaf::Size2M, G).met());
        // Unmeasured is never met.
        assert!(!goal3(0.0, 0.2, Leaf::Size2M, G).met());
        assert_eq!(goal3(0.0, 0.2, Leaf::Size4K, G).within_0_6x, Some(false));
    }

    /// Expected outcomes written out case by case at each boundary (not
    /// recomputed with the code's thresholds).
    #[test]
    fn targets_at_their_boundaries() {
        let v = |r, d, p, q| verdicts(r, d, p, q);
        let met = Verdicts {
            reclaim_within_1_10x_munmap: true,
            destroy_within_5ms: true,
            faster_than_qemu: Some(true),
        };
        assert_eq!(v(1.0, 0.3, Some(5.0), Some(6.0)), met);
        assert_eq!(v(1.1, 5.0, Some(5.0), Some(5.5)), met);
        let r = v(1.1001, 5.001, Some(6.0), Some(6.0));
        assert!(!r.reclaim_within_1_10x_munmap);
        assert!(!r.destroy_within_5ms);
        assert_eq!(r.faster_than_qemu, Some(false));
        // Unmeasured figures are never a met target.
        assert!(!v(0.0, 0.3, None, None).reclaim_within_1_10x_munmap);
        assert_eq!(v(0.9, 0.3, None, Some(3.0)).faster_than_qemu, None);
        assert_eq!(v(0.9, 0.3, Some(3.0), None).faster_than_qemu, None);
        assert!(v(0.5, 0.0, None, None).reclaim_within_1_10x_munmap);
    }
}

#[cfg(test)]
mod split_tests {
    use super::{on_threads, shares};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every share runs once, each on its own thread but the first; the
    /// first error in share order is returned after all have run.
    #[test]
    fn on_threads_runs_every_share_and_keeps_the_first_error() {
        let ran = AtomicUsize::new(0);
        let main = std::thread::current().id();
        on_threads(3, |i| {
            ran.fetch_add(1 << (8 * i), Ordering::Relaxed);
            assert_eq!(i == 0, std::thread::current().id() == main);
            Ok(())
        })
        .expect("no share fails");
        assert_eq!(ran.load(Ordering::Relaxed), 0x01_01_01);
        let e = on_threads(4, |i| match i {
            1 | 3 => Err(anyhow::anyhow!("share {i}")),
            _ => Ok(()),
        })
        .expect_err("shares 1 and 3 fail");
        assert_eq!(e.to_string(), "share 1");
        assert!(on_threads(0, |_| Ok(())).is_ok());
    }

    const M2: u64 = 2 << 20;

    /// The split baseline's shares cover the region exactly, in order, on
    /// 2 MiB boundaries, and none is empty.
    #[test]
    fn shares_cover_the_region_on_2m_boundaries() {
        for (len, k) in [
            (1u64 << 30, 2usize),
            (1 << 30, 3),
            (256 << 20, 8),
            (6 * M2, 4),
            (M2, 2),
            (4 << 30, 1),
        ] {
            let s = shares(len, k);
            assert!(!s.is_empty() && s.len() <= k, "{len} {k}: {s:?}");
            let mut at = 0;
            for &(off, l) in &s {
                assert_eq!(off, at, "{len} {k}: {s:?}");
                assert!(l > 0 && off % M2 == 0, "{len} {k}: {s:?}");
                at += l;
            }
            assert_eq!(at, len, "{len} {k}: {s:?}");
        }
        assert_eq!(
            shares(1 << 30, 2),
            vec![(0, 512 << 20), (512 << 20, 512 << 20)]
        );
        // 6 pieces over 4 threads: 4 MiB each, the last share empty.
        assert_eq!(shares(6 * M2, 4).len(), 3);
    }
}
