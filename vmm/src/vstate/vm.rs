//! The microVM: KVM VM, guest RAM slots, devices, vCPU threads, teardown.
//!
//! Life cycle: [`Vm::new`] creates the VM, its guest memory ([`VmMemory`]:
//! mappings, KVM memory slots, stage-2 table, userfaultfd handler), the
//! default guest's set-up, the devices (the balloon's device thread and its
//! ioeventfds, [`crate::devices::virtio::thread`]) and the vCPUs;
//! [`Vm::start`] runs one thread per vCPU; [`Vm::wait`] waits for the guest
//! to finish; [`Vm::destroy`] stops and joins the vCPUs, then the device
//! thread, and returns, while a reclaim thread (made with the VM, asleep
//! until then) releases guest
//! RAM ([`VmMemory::release_all`]: the stage-2 whole-VM gather), then drops
//! the VM, then closes the memory (stops the fault handler, unmaps the
//! emptied guest RAM, closes its files), in that order
//! ([`Teardown::wait_reclaim`] waits for it).
//! Dropping a `Vm` without `destroy` does the same synchronously.
//!
//! Threads: vCPU threads only touch shared state through `Arc`s
//! ([`RunControl`], [`ReportBoard`], the serial device) and read guest
//! memory through their own accessor of the stage-2 table (its vm-memory
//! view, pinned per read), never through a raw mapping, so no read depends
//! on the order of teardown. The device thread holds its device (and through it guest memory)
//! and is joined before guest memory is released; with
//! [`VmConfig::device_threads`] off, or for a queue whose ioeventfd KVM
//! refuses, the vCPU that writes `QueueNotify` runs the device instead.
//!
//! With [`VmConfig::linux`] the VM boots a Linux kernel instead of the
//! default guest ([`crate::boot`]): everything about the boot is checked
//! before KVM is opened; the in-kernel irqchip and PIT are created before
//! the vCPUs; the legacy port devices ([`crate::devices::legacy::LegacyIo`]) and the virtio-mmio
//! devices get their interrupts through irqfds ([`super::linux`]); the VM
//! ends when the guest asks for a reset ([`Vm::wait_linux`]).

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::linux;
use super::vcpu::{self, ReportBoard, Reports, Request, RunControl, VcpuContext, VcpuOutcome};
use crate::boot::{self, LinuxSpec};
use crate::devices::report::{PatternReport, ProbeReport};
use crate::devices::serial::{Console, SerialDevice};
use crate::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonTransport};
use crate::devices::virtio::mmio::VirtioMmio;
use crate::devices::virtio::thread::{self, DeviceThread, NotifyPath};
use crate::devices::virtio::{MmioBus, BALLOON_MMIO_BASE, MMIO_WINDOW};
use crate::guest::{self, control, layout, EntryArgs, GuestError, Workload};
use crate::vstate::memory::{
    self, Backing, FaultHook, FaultStats, MemSize, MemoryConfig, MemoryError, NoHook, PageSize,
    ReleaseError, ReleaseMode, Stage2, Stage2Error, TeardownStats, VmMemory,
};

/// Errors of VM creation and control.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error(
        "cannot open /dev/kvm: {0}; check that KVM is enabled (kvm module loaded) \
         and that you may read and write /dev/kvm"
    )]
    Kvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    /// More vCPUs than KVM allows.
    #[error("{0} vCPUs requested but KVM allows at most {1} per VM here: lower --vcpus")]
    TooManyVcpus(u32, usize),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A release of guest RAM.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// Guest set-up.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Thread or signal set-up.
    #[error("starting vCPU threads failed: {0}")]
    Thread(std::io::Error),
    /// start() twice.
    #[error("the VM was already started")]
    AlreadyStarted,
    /// Access to the control page failed.
    #[error("accessing the guest control page failed: {0}")]
    Control(String),
    /// The stage-2 table.
    #[error(transparent)]
    Stage2(#[from] Stage2Error),
    /// The Linux boot (kernel, initrd, command line, vCPU state).
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// An eventfd for an interrupt line.
    #[error("creating an interrupt eventfd failed: {0}")]
    EventFd(std::io::Error),
    /// Not a Linux VM.
    #[error("{0} needs a VM booted with a Linux kernel (VmConfig::linux)")]
    NotLinux(&'static str),
    /// The i8042 could not take the key sequence.
    #[error(transparent)]
    I8042(#[from] crate::devices::legacy::i8042::I8042Error),
    /// A balloon operation on a VM without one.
    #[error("{0} needs a VM with a balloon (VmConfig::balloon)")]
    NoBalloon(&'static str),
}

impl VmError {
    /// Whether this host cannot run what was asked as it stands: no usable
    /// `/dev/kvm`, guest RAM the host cannot provide
    /// ([`MemoryError::host_cannot`]) or address space the stage-2 table
    /// cannot reserve ([`Stage2Error::host_cannot`]). `vmm` exits with
    /// [`crate::EXIT_HOST_CANNOT`] for these.
    pub fn host_cannot(&self) -> bool {
        match self {
            VmError::Kvm(_) => true,
            VmError::Memory(e) => e.host_cannot(),
            VmError::Stage2(e) => e.host_cannot(),
            _ => false,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, VmError>;

/// How to build a VM.
#[derive(Clone)]
pub struct VmConfig {
    /// Guest RAM size.
    pub mem: MemSize,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// RAM backing.
    pub backing: Backing,
    /// Leaf size.
    pub page_size: PageSize,
    /// What the guest does.
    pub workload: Workload,
    /// Where the console goes.
    pub console: Console,
    /// Pattern seed.
    pub seed: u64,
    /// Told about every demand fault (the stage-2 table).
    pub fault_hook: Arc<dyn FaultHook>,
    /// A virtio-balloon at [`BALLOON_MMIO_BASE`], if wanted.
    pub balloon: Option<BalloonConfig>,
    /// Serve virtio queue notifications on a device thread woken by KVM
    /// ioeventfds (the default); false runs them on the vCPU that wrote
    /// `QueueNotify` (also the fallback when KVM refuses an ioeventfd).
    pub device_threads: bool,
    /// Boot this Linux kernel instead of the embedded default guest
    /// (`workload` and `seed` are then unused).
    pub linux: Option<LinuxSpec>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("mem", &self.mem)
            .field("vcpus", &self.vcpus)
            .field("backing", &self.backing)
            .field("page_size", &self.page_size)
            .field("workload", &self.workload)
            .field("seed", &self.seed)
            .field("device_threads", &self.device_threads)
            .field("linux", &self.linux)
            .finish_non_exhaustive()
    }
}

/// Where KVM may put its real-mode TSS pages (VMX).
const TSS_ADDR: u64 = 0xfffb_d000;

/// The default pattern seed.
pub const DEFAULT_SEED: u64 = 0x5eed_a5a5_0000_0000;

impl VmConfig {
    /// A config with 1 vCPU, anonymous 2M-page RAM, the verify workload and
    /// the console on stdout.
    pub fn new(mem: MemSize) -> Self {
        Self {
            mem,
            vcpus: 1,
            backing: Backing::Anon,
            page_size: PageSize::Size2M,
            workload: Workload::Verify,
            console: Console::Stdout,
            seed: DEFAULT_SEED,
            fault_hook: Arc::new(NoHook),
            balloon: None,
            device_threads: true,
            linux: None,
        }
    }
}

/// Waits for a VM's end from another thread ([`Vm::end_waiter`]).
#[derive(Debug, Clone)]
pub struct EndWaiter {
    board: Arc<ReportBoard>,
    need: usize,
}

impl EndWaiter {
    /// Blocks until the VM ended (true) or `stop()` holds or `timeout`
    /// passed (false). `stop` is evaluated under the board's lock, so a
    /// [`EndWaiter::wake`] after the state `stop` reads changed is never
    /// lost.
    pub fn wait(&self, timeout: Duration, stop: impl Fn() -> bool) -> bool {
        let need = self.need;
        self.board
            .wait_for(timeout, |r| r.outcomes.len() >= need || stop());
        self.ended()
    }

    /// Whether the VM ended.
    pub fn ended(&self) -> bool {
        let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
        r.outcomes.len() >= self.need
    }

    /// Wakes the waiters so that they evaluate `stop` again.
    pub fn wake(&self) {
        let _g = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
        self.board.cv.notify_all();
    }
}

/// How the VM ended and what the synchronous part of teardown cost. Guest
/// RAM may still be going back to the host: [`Teardown::wait_reclaim`]
/// waits for it (dropping a `Teardown` waits too).
#[derive(Debug)]
pub struct Teardown {
    /// Wall time of `destroy` (stop and join vCPUs, hand off the rest), ms.
    pub teardown_ms: f64,
    /// Of which stopping and joining the vCPUs, ms.
    pub stop_vcpus_ms: f64,
    /// The VM was paused: its vCPU threads (and the device thread) were
    /// handed to the reclaim thread unjoined, and `destroy` did not wait for
    /// them.
    pub handed_over: bool,
    /// Outcome of each vCPU, by index.
    pub outcomes: Vec<VcpuOutcome>,
    reclaim: Option<InFlight>,
    done: Option<Reclaimed>,
}

/// What background reclamation did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Reclaimed {
    /// From the start of `destroy` until the whole-VM gather had released
    /// all guest RAM to the host (the memory is back; the VM, the fault
    /// handler and the address space still go after this), ms.
    pub memory_back_ms: f64,
    /// Process RSS sampled right after `memory_back_ms`.
    pub rss_at_memory_back: u64,
    /// From the start of `destroy` until everything was gone: guest RAM
    /// released, KVM VM dropped, fault handler stopped, RAM unmapped, ms.
    pub reclaim_ms: f64,
    /// Of which dropping the KVM VM, ms.
    pub vm_drop_ms: f64,
    /// Of which unmapping guest RAM, ms.
    pub unmap_ms: f64,
    /// Bytes of guest RAM unmapped.
    pub unmapped_bytes: u64,
    /// The whole-VM stage-2 gather (zap, invalidate, release, table free).
    pub stage2: TeardownStats,
    /// The whole-VM release failed (its error was printed on stderr); the
    /// unmap of guest RAM that follows gave the memory back instead.
    pub release_failed: bool,
    /// The thread in [`Teardown::wait_reclaim`] reclaimed, not the VM's
    /// reclaim thread (which had not begun yet).
    pub by_waiter: bool,
}

impl Teardown {
    /// Waits until guest RAM is back with the host: releases it on the
    /// calling thread if the reclaim thread has not begun yet (see
    /// `Reclaimer`).
    pub fn wait_reclaim(&mut self) -> Reclaimed {
        if let Some(f) = self.reclaim.take() {
            self.done = Some(f.finish());
        }
        self.done.unwrap_or_default()
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.wait_reclaim();
    }
}

/// The first step of reclamation: guest RAM released, and when.
#[derive(Debug, Clone, Copy, Default)]
struct MemoryBack {
    stage2: TeardownStats,
    memory_back_ms: f64,
    rss_at_memory_back: u64,
    release_failed: bool,
}

impl MemoryBack {
    /// [`VmMemory::release_all`]; a failed release is reported (stderr and
    /// [`Reclaimed::release_failed`]) and leaves the memory to the munmap
    /// that follows (nothing leaks).
    fn release(memory: Option<&VmMemory>, t0: Instant) -> Self {
        let (stage2, release_failed) = match memory.map(VmMemory::release_all) {
            Some(Ok(s)) => (s, false),
            Some(Err(e)) => {
                eprintln!(
                    "vmm: teardown: releasing guest RAM failed ({e}); unmapping it gives \
                     it back instead"
                );
                (TeardownStats::default(), true)
            }
            None => (TeardownStats::default(), false),
        };
        let memory_back_ms = ms(t0.elapsed());
        Self {
            stage2,
            memory_back_ms,
            rss_at_memory_back: crate::proc_stats::rss().rss,
            release_failed,
        }
    }
}

/// The state released in the background after the vCPUs stopped. Field
/// order is drop order (if the reclaim thread cannot be spawned): VM,
/// devices, guest memory (which releases itself before it unmaps).
struct Remains {
    /// A paused VM's vCPU threads, not joined yet (every one was parked
    /// when `Stop` was set, so none enters the guest again), their fds
    /// and the bus they hold, and the device thread, not stopped yet.
    /// Empty otherwise: `teardown` joined and stopped them itself.
    device_thread: Option<DeviceThread>,
    vcpu_threads: Vec<JoinHandle<VcpuOutcome>>,
    vcpu_fds: Vec<VcpuFd>,
    mmio: Option<Arc<MmioBus>>,
    vm_fd: Option<VmFd>,
    balloon: Option<Arc<VirtioMmio<Balloon>>>,
    memory: Option<Arc<VmMemory>>,
}

impl Remains {
    /// Memory first: [`VmMemory::release_all`] tears the stage-2 table down
    /// through a whole-VM gather (which releases all backing and frees the
    /// table after a grace period): from then on the memory is back with
    /// the host. Then drops the VM (and its memory slots), then closes the
    /// memory: stops the fault handler, unmaps guest RAM, which by then
    /// holds nothing, and closes its files.
    ///
    /// Releasing before the VM goes is safe: the vCPUs are joined, so
    /// nothing runs the guest; KVM's mmu_notifier (guest_memfd: KVM's own
    /// invalidation) zaps whatever KVM mapped, as for any release; device
    /// threads walk through the table, which the gather marks dying and
    /// waits for.
    fn reclaim(mut self, t0: Instant) -> Reclaimed {
        // Nothing runs into the release: the device thread stops first.
        if let Some(mut t) = self.device_thread.take() {
            t.stop();
        }
        let back = MemoryBack::release(self.memory.as_deref(), t0);
        // A paused VM's vCPUs leave on their own meanwhile; once they are
        // joined the bus's device references go, so that the memory's
        // last references are ours.
        for t in self.vcpu_threads.drain(..) {
            let _ = t.join();
        }
        self.vcpu_fds.clear();
        self.mmio = None;
        let MemoryBack {
            stage2,
            memory_back_ms,
            rss_at_memory_back,
            release_failed,
        } = back;
        let t = Instant::now();
        self.vm_fd = None;
        let vm_drop = t.elapsed();
        // Devices hold the memory; ours go first. A caller that still holds
        // a device keeps it alive (the handler stops and RAM is unmapped
        // when its last holder drops it).
        self.balloon = None;
        let t = Instant::now();
        let unmapped_bytes = self
            .memory
            .take()
            .and_then(|m| Arc::try_unwrap(m).ok())
            .map_or(0, VmMemory::close);
        Reclaimed {
            memory_back_ms,
            rss_at_memory_back,
            reclaim_ms: ms(t0.elapsed()),
            vm_drop_ms: ms(vm_drop),
            unmap_ms: ms(t.elapsed()),
            unmapped_bytes,
            stage2,
            release_failed,
            by_waiter: false,
        }
    }
}

/// A microVM running the default guest.
pub struct Vm {
    config: VmConfig,
    vm_fd: Option<VmFd>,
    memory: Option<Arc<VmMemory>>,
    balloon: Option<Arc<VirtioMmio<Balloon>>>,
    /// Serves the balloon's queue notifications (ioeventfds), if any.
    balloon_thread: Option<DeviceThread>,
    balloon_notify: NotifyPath,
    mmio: Arc<MmioBus>,
    control: Arc<RunControl>,
    board: Arc<ReportBoard>,
    serial: Arc<SerialDevice>,
    /// A Linux guest's port devices and interrupt lines (`None`: the
    /// default guest).
    linux: Option<linux::LinuxPlatform>,
    vcpu_fds: Vec<VcpuFd>,
    /// The vCPU threads until the start hands them their vCPUs.
    standby: vcpu::Standby,
    threads: Vec<JoinHandle<VcpuOutcome>>,
    probe_seq: u64,
    destroyed: bool,
    /// The thread that will release guest RAM at teardown, made with the
    /// VM (`None` if it could not be: teardown then makes one).
    reclaimer: Option<Reclaimer>,
}

/// A thread made with the VM that sleeps until teardown hands it the
/// VM's remains, then releases them ([`Remains::reclaim`]).
///
/// Made early on purpose: a thread created at teardown starts at the back
/// of the run queue (CFS places new tasks after the others), which on a
/// busy host delayed the release by milliseconds; a sleeping thread that
/// is woken runs soon. Named `reclaim`, `SCHED_BATCH`: its wake-up never
/// preempts the thread in `destroy` (which, preempted, returned only after
/// the whole release: 3-8 ms at 1 GiB on the busy development host); it
/// runs on an idle core, or once the destroying thread blocks, at normal
/// weight: the release it drives is the teardown's critical path. Its
/// release helpers are `SCHED_IDLE` (see `memory/release.rs`).
///
/// **Whoever comes first.** The remains wait in a slot that the woken
/// thread and [`Teardown::wait_reclaim`] both try to take: a caller that
/// waits for the memory releases it on its own thread at once. A wake-up
/// onto an idle CPU is slow where that CPU is a halted vCPU of a VM host
/// (0.15-0.6 ms on the development VM, which has no guest halt polling,
/// against ~0.07 ms for all of `destroy`), and every caller in this
/// repository waits right after `destroy`; the thread serves callers that
/// go on with other work.
struct Reclaimer {
    slot: HandoverSlot,
    tx: std::sync::mpsc::SyncSender<()>,
    handle: JoinHandle<Option<Reclaimed>>,
}

/// A destroyed VM's remains and when its teardown began, until the
/// reclaim thread or the waiter takes them.
type HandoverSlot = Arc<Mutex<Option<(Box<Remains>, Instant)>>>;

/// Takes what is in `slot`, if anything is.
fn take_remains(slot: &HandoverSlot) -> Option<(Box<Remains>, Instant)> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// A reclaim handed to the reclaim thread: its slot and the thread.
struct InFlight {
    slot: HandoverSlot,
    handle: JoinHandle<Option<Reclaimed>>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight").finish_non_exhaustive()
    }
}

impl InFlight {
    /// Reclaims here if the thread has not taken the remains yet, else
    /// waits for it.
    fn finish(self) -> Reclaimed {
        let here = take_remains(&self.slot).map(|(r, t0)| Reclaimed {
            by_waiter: true,
            ..r.reclaim(t0)
        });
        // The thread finds the slot empty and ends, if it did not run the
        // reclaim itself.
        let there = self.handle.join().ok().flatten();
        here.or(there).unwrap_or_default()
    }
}

/// Makes the calling thread `SCHED_BATCH` (no wake-up preemption, same
/// weight). Best effort: a refusal leaves the thread as it was.
fn batch_priority() {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: 0 is the calling thread; `p` is a valid sched_param for
    // SCHED_BATCH, which takes priority 0.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &p) };
}

impl Reclaimer {
    fn spawn() -> Option<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let slot = HandoverSlot::default();
        let theirs = Arc::clone(&slot);
        std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || {
                batch_priority();
                crate::seccomp::install(crate::seccomp::ThreadKind::Reclaim);
                rx.recv().ok()?;
                take_remains(&theirs).map(|(r, t0)| r.reclaim(t0))
            })
            .ok()
            .map(|handle| Self { slot, tx, handle })
    }

    /// Puts `remains` in the slot and wakes the thread. If the thread is
    /// gone, [`InFlight::finish`] finds them there and reclaims them.
    fn start(self, remains: Box<Remains>, t0: Instant) -> InFlight {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((remains, t0));
        let _ = self.tx.send(());
        InFlight {
            slot: self.slot,
            handle: self.handle,
        }
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// KVM_GET_SUPPORTED_CPUID's answer, asked once per process: it is the
/// same for every VM (the host's CPUs and the kvm module), and asking took
/// 0.37 ms of every VM's creation here.
static SUPPORTED_CPUID: OnceLock<CpuId> = OnceLock::new();

/// The CPUID KVM supports ([`SUPPORTED_CPUID`]).
fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    if let Some(c) = SUPPORTED_CPUID.get() {
        return Ok(c.clone());
    }
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
    Ok(SUPPORTED_CPUID.get_or_init(|| c).clone())
}

/// A KVM VM made ahead of its [`Vm::new`] by [`warm_up`]: nothing in it
/// yet (no memory slot, no vCPU), taken by the next `Vm::new` of this
/// process.
static SPARE_VM: Mutex<Option<(Kvm, VmFd)>> = Mutex::new(None);

/// `/dev/kvm` and a new, empty KVM VM.
fn new_kvm_vm() -> Result<(Kvm, VmFd)> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm_fd = kvm
        .create_vm()
        .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?;
    Ok((kvm, vm_fd))
}

/// Does now what the next [`Vm::new`] of this process would start with
/// and needs nothing of its configuration for: asks KVM for the
/// supported CPUID (kept for every VM) and creates an empty KVM VM
/// (`SPARE_VM`; `KVM_CREATE_VM` took 0.38 ms here). The service calls it
/// while it waits for `InstanceStart`, whose latency is then that much
/// shorter. Best effort: a failure here is met again, and reported, by
/// `Vm::new`.
pub fn warm_up() {
    let Ok((kvm, vm_fd)) = new_kvm_vm() else {
        return;
    };
    let _ = supported_cpuid(&kvm);
    *SPARE_VM.lock().unwrap_or_else(|e| e.into_inner()) = Some((kvm, vm_fd));
}

/// The CPU the calling thread runs on (`None` if the kernel cannot say).
fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

/// Moves the calling thread off `cpu` if it runs there and another CPU of
/// its affinity mask exists, then gives it its whole mask back (it stays
/// where it was moved until the scheduler moves it again). For a new
/// thread that should run beside its creator: the kernel often places a
/// new thread on its creator's CPU, where it waits for the creator to
/// block or be preempted even while another CPU idles. Best effort: any
/// failure leaves the thread where it is.
fn leave_cpu(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    if current_cpu() != Some(cpu) {
        return;
    }
    let Some(all) = affinity() else { return };
    let mut others = all;
    // SAFETY: `cpu` is below CPU_SETSIZE (the kernel numbered it).
    unsafe { libc::CPU_CLR(cpu, &mut others) };
    // SAFETY: CPU_COUNT only reads the set.
    if unsafe { libc::CPU_COUNT(&others) } == 0 {
        return;
    }
    if set_affinity(&others) {
        set_affinity(&all);
    }
}

/// The calling thread's affinity mask (`None` if the kernel refused).
fn affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a cpu_set_t of the size passed; the kernel writes
    // at most that.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    (rc == 0).then_some(set)
}

/// Sets the calling thread's affinity mask; whether the kernel took it.
fn set_affinity(set: &libc::cpu_set_t) -> bool {
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) == 0 }
}

/// What [`Vm::new`] creates beside the memory and the vCPUs.
struct Devices {
    balloon: Option<Arc<VirtioMmio<Balloon>>>,
    balloon_thread: Option<DeviceThread>,
    balloon_notify: NotifyPath,
    platform: Option<linux::LinuxPlatform>,
    mmio: MmioBus,
    control: Arc<RunControl>,
}

impl Vm {
    /// Creates the VM, its RAM, the guest set-up and the vCPUs (not running).
    pub fn new(config: VmConfig) -> Result<Self> {
        let mem = config.mem.bytes();
        // A Linux boot is read and checked before anything is created.
        let prepared = match &config.linux {
            Some(spec) => {
                let devices: Vec<boot::MmioDeviceInfo> = config
                    .balloon
                    .iter()
                    .map(|_| boot::MmioDeviceInfo {
                        base: BALLOON_MMIO_BASE,
                        size: MMIO_WINDOW,
                        irq: linux::BALLOON_GSI,
                    })
                    .collect();
                Some(boot::prepare(spec, mem, config.vcpus, &devices)?)
            }
            None => {
                guest::check_config(mem, config.vcpus)?;
                None
            }
        };
        memory::check_backing(config.mem, config.backing, config.page_size)?;
        let (kvm, vm_fd) = match SPARE_VM.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(spare) => spare,
            None => new_kvm_vm()?,
        };
        let max = kvm.get_max_vcpus();
        if usize::try_from(config.vcpus).unwrap_or(usize::MAX) > max {
            return Err(VmError::TooManyVcpus(config.vcpus, max));
        }
        // VMX hosts without unrestricted guest want a real-mode TSS area
        // (three pages below 4 GiB, outside every slot). It must not overlap
        // guest RAM, so only set it when RAM ends below it; the default
        // guest never enters real mode, and other backends ignore it.
        if mem <= TSS_ADDR {
            let _ = vm_fd.set_tss_address(TSS_ADDR as usize);
        }
        // The Vm keeps the memory until after vm_fd (and with it the
        // slots) is gone (`Remains`).
        let memory = Arc::new(VmMemory::new(
            MemoryConfig {
                size: config.mem,
                backing: config.backing,
                page_size: config.page_size,
            },
            Arc::clone(&config.fault_hook),
            Some(&vm_fd),
        )?);
        // The kernel is copied into guest RAM (~6 MiB of page faults and
        // copies, the longest part of a Linux start's set-up; the faults
        // are taken first in one `MADV_POPULATE_WRITE` per segment) by a
        // loader thread, while this thread creates the interrupt
        // controller, the devices, the vCPUs and their threads (which get
        // ready meanwhile: `vcpu::Standby`), then copies the initrd
        // (~2 MiB); the vCPUs' registers wait for the entry point. The
        // kernel's copy goes to the new thread because this thread's part
        // sleeps (creating KVM's interrupt controller and PIT took 5-20x
        // their CPU time in wall time here): with the roles the other way
        // round, the helper, often placed on this thread's CPU at its
        // creation, waited there until the kernel's copy was done (1.5-3
        // ms of a 5 ms start). The loader also moves itself off this
        // thread's CPU if it starts there (`leave_cpu`: a hint, its whole
        // affinity mask is given back at once). Starts with the Linux
        // fixture, InstanceStart to first `KVM_RUN`: median 4.95 -> 3.95
        // ms (24 alternated starts each; DESIGN, *Platform*).
        let (entry, (devices, mut vcpu_fds, standby)) = std::thread::scope(|s| -> Result<_> {
            let (cfg, fd, kvm, memory, p) = (&config, &vm_fd, &kvm, &memory, prepared.as_ref());
            let helper = move || -> Result<(Devices, Vec<VcpuFd>, vcpu::Standby)> {
                if p.is_some() {
                    // Before any vCPU exists, and after the memory slots: a
                    // slot registered after the irqchip waited ~4 ms here
                    // (256 MiB, on kvm_pvm) for what takes 0.3 ms before
                    // it, as Firecracker orders them too.
                    linux::create_irqchip(fd)?;
                }
                let devices = Self::devices(cfg, memory, fd, p)?;
                let vcpus = Self::vcpu_fds(kvm, fd, cfg, p.is_some())?;
                // The vCPU threads start now and get ready (arena, seccomp)
                // while the rest is set up; they wait for their vCPUs.
                let standby = vcpu::Standby::spawn(cfg.vcpus).map_err(VmError::Thread)?;
                if let Some(p) = p {
                    memory.prefault(p.initrd_range().as_slice());
                    p.load_initrd(memory.guest_memory())?;
                }
                Ok((devices, vcpus, standby))
            };
            let Some(p) = p else {
                guest::setup(memory.guest_memory(), mem, config.vcpus)?;
                return Ok((None, helper()?));
            };
            let parent_cpu = current_cpu();
            let kernel = move || {
                leave_cpu(parent_cpu);
                memory.prefault(p.kernel_loads());
                p.load_kernel(memory.guest_memory())
            };
            let loader = std::thread::Builder::new()
                .name("vm-setup".into())
                .spawn_scoped(s, kernel)
                .map_err(VmError::Thread)?;
            let rest = helper();
            let loaded = loader.join().map_err(|_| {
                VmError::Thread(std::io::Error::other("the set-up thread panicked"))
            })?;
            Ok((Some(loaded?), rest?))
        })?;
        if let Some(entry) = entry {
            for fd in &mut vcpu_fds {
                boot::cpu::setup_vcpu(fd, entry.protocol, entry.entry)?;
            }
        }
        Ok(Self {
            serial: devices.platform.as_ref().map_or_else(
                || Arc::new(SerialDevice::new(config.console.clone())),
                |p| Arc::clone(&p.io.serial),
            ),
            linux: devices.platform,
            config,
            vm_fd: Some(vm_fd),
            memory: Some(memory),
            balloon: devices.balloon,
            balloon_thread: devices.balloon_thread,
            balloon_notify: devices.balloon_notify,
            mmio: Arc::new(devices.mmio),
            control: devices.control,
            board: Arc::new(ReportBoard::default()),
            vcpu_fds,
            standby,
            threads: Vec::new(),
            probe_seq: 0,
            destroyed: false,
            reclaimer: Reclaimer::spawn(),
        })
    }

    /// The balloon (and its device thread) and the Linux platform devices
    /// of a VM being created.
    fn devices(
        config: &VmConfig,
        memory: &Arc<VmMemory>,
        vm_fd: &VmFd,
        prepared: Option<&boot::Prepared>,
    ) -> Result<Devices> {
        // Linux never balloons below 1 MiB; the default guest keeps its
        // structures below WORKLOAD_START.
        let reserved_below = if prepared.is_some() {
            boot::layout::HIMEM_START
        } else {
            layout::WORKLOAD_START
        };
        let mut mmio = MmioBus::default();
        let balloon = config.balloon.map(|offered| {
            Arc::new(VirtioMmio::new(BalloonTransport::balloon(
                Arc::clone(memory),
                offered,
                reserved_below,
            )))
        });
        let control = Arc::new(RunControl::default());
        let (mut balloon_thread, mut balloon_notify) = (None, NotifyPath::Vcpu);
        if let Some(b) = &balloon {
            if prepared.is_none() {
                // The default guest's driver polls (no interrupt
                // controller) and waits in OP_IDLE while the device works:
                // every buffer the device returns wakes it.
                let c = Arc::clone(&control);
                b.lock().set_waker(Box::new(move || c.wake()));
            }
            mmio.insert(BALLOON_MMIO_BASE, MMIO_WINDOW, b.clone());
            let queues = b.lock().queues().len();
            let reg = thread::register(
                vm_fd,
                "virtio-balloon",
                BALLOON_MMIO_BASE,
                queues,
                config.device_threads,
            );
            balloon_notify = reg.path();
            balloon_thread = DeviceThread::spawn(
                "virtio-balloon",
                Arc::clone(b),
                reg,
                crate::devices::virtio::balloon::THREAD_NICE,
            )
            .map_err(VmError::Thread)?;
        }
        let platform = match prepared {
            Some(p) => Some(linux::LinuxPlatform::new(
                vm_fd,
                config.console.clone(),
                balloon.as_deref(),
                p.cmdline(),
            )?),
            None => None,
        };
        Ok(Devices {
            balloon,
            balloon_thread,
            balloon_notify,
            platform,
            mmio,
            control,
        })
    }

    /// The vCPUs of a VM being created, with their CPUID; the default
    /// guest's also with their registers (a Linux guest's get theirs once
    /// its kernel is loaded: `boot::cpu::setup_vcpu`).
    fn vcpu_fds(kvm: &Kvm, vm_fd: &VmFd, config: &VmConfig, linux: bool) -> Result<Vec<VcpuFd>> {
        let mem = config.mem.bytes();
        let cpuid = supported_cpuid(kvm)?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let mut vcpu_fds = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))?;
            if linux {
                let id = boot::cpuid::for_vcpu(&cpuid, i, config.vcpus, tsc_deadline)?;
                fd.set_cpuid2(&id)
                    .map_err(|e| VmError::Ioctl("KVM_SET_CPUID2", e))?;
                vcpu_fds.push(fd);
                continue;
            }
            let mut id = cpuid.clone();
            for e in id.as_mut_slice() {
                if e.function == 1 {
                    e.ebx = (e.ebx & 0x00ff_ffff) | (i << 24);
                }
            }
            fd.set_cpuid2(&id)
                .map_err(|e| VmError::Ioctl("KVM_SET_CPUID2", e))?;
            let mut sregs = fd
                .get_sregs()
                .map_err(|e| VmError::Ioctl("KVM_GET_SREGS", e))?;
            guest::init_sregs(&mut sregs, i);
            fd.set_sregs(&sregs)
                .map_err(|e| VmError::Ioctl("KVM_SET_SREGS", e))?;
            let (share_start, share_end) = guest::share(mem, config.vcpus, i);
            let regs = guest::init_regs(&EntryArgs {
                index: i,
                share_start,
                share_end,
                seed: config.seed,
                workload: config.workload,
            });
            fd.set_regs(&regs)
                .map_err(|e| VmError::Ioctl("KVM_SET_REGS", e))?;
            vcpu_fds.push(fd);
        }
        Ok(vcpu_fds)
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory: mappings, stage-2 table, fault handler, releases.
    pub fn memory(&self) -> &Arc<VmMemory> {
        self.memory
            .as_ref()
            .unwrap_or_else(|| unreachable!("guest memory lives until destroy"))
    }

    /// The stage-2 table mirroring guest RAM.
    pub fn stage2(&self) -> &Stage2 {
        self.memory().stage2()
    }

    /// Who runs the balloon's queue notifications: the device thread
    /// (ioeventfds registered), the vCPU (`device_threads` off, or KVM
    /// refused), or both.
    pub fn balloon_notify_path(&self) -> NotifyPath {
        self.balloon_notify
    }

    /// Balloon notifications the device thread has run (0 without one).
    pub fn balloon_thread_notifies(&self) -> u64 {
        self.balloon_thread.as_ref().map_or(0, DeviceThread::served)
    }

    /// The virtio-balloon (virtio-mmio at [`BALLOON_MMIO_BASE`]), if
    /// configured.
    pub fn balloon(&self) -> Option<&Arc<VirtioMmio<Balloon>>> {
        self.balloon.as_ref()
    }

    /// Demand-fault and release counters.
    pub fn fault_stats(&self) -> &FaultStats {
        self.memory().fault_stats()
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<()> {
        if self.vcpu_fds.is_empty() {
            return Err(VmError::AlreadyStarted);
        }
        vcpu::install_kick_handler().map_err(VmError::Thread)?;
        let memory = Arc::clone(self.memory());
        for (i, fd) in (0u32..).zip(self.vcpu_fds.drain(..)) {
            let ctx = VcpuContext {
                index: i,
                control: Arc::clone(&self.control),
                board: Arc::clone(&self.board),
                serial: Arc::clone(&self.serial),
                memory: Arc::clone(&memory),
                access: std::cell::OnceCell::new(),
                mmio: Arc::clone(&self.mmio),
                legacy: self.linux.as_ref().map(|p| Arc::clone(&p.io)),
            };
            let t = self.standby.start(fd, ctx).map_err(VmError::Thread)?;
            self.threads.push(t);
        }
        Ok(())
    }

    /// The serial console device (a Linux guest's gets its input through
    /// [`SerialDevice::enqueue`]).
    pub fn serial(&self) -> &Arc<SerialDevice> {
        &self.serial
    }

    /// The kernel command line of a Linux VM (with the monitor's
    /// `virtio_mmio.device=` entries).
    pub fn linux_cmdline(&self) -> Option<&str> {
        self.linux.as_ref().map(|p| p.cmdline.as_str())
    }

    /// When vCPU 0 was about to enter the guest the first time.
    pub fn first_run(&self) -> Option<Instant> {
        self.board
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first_run
    }

    /// Sends Ctrl-Alt-Del to a Linux guest through the i8042 (IRQ 1); with
    /// the fixture's `reboot=k` the guest restarts, which ends the VM.
    pub fn send_ctrl_alt_del(&self) -> Result<()> {
        let p = self
            .linux
            .as_ref()
            .ok_or(VmError::NotLinux("send_ctrl_alt_del"))?;
        Ok(p.io.ctrl_alt_del()?)
    }

    /// Waits until the first vCPU of a Linux guest ends (a reset request, a
    /// shutdown, an error) or `timeout` passes (`None`: no limit); returns
    /// that vCPU and its outcome. The others are stopped by [`Vm::destroy`].
    pub fn wait_linux(&self, timeout: Option<Duration>) -> Option<(u32, VcpuOutcome)> {
        let t0 = Instant::now();
        loop {
            let step = match timeout {
                Some(t) => t.saturating_sub(t0.elapsed()),
                None => Duration::from_secs(3600),
            };
            if self.board.wait_for(step, |r| !r.outcomes.is_empty()) {
                let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
                return r.outcomes.first().cloned();
            }
            if timeout.is_some_and(|t| t0.elapsed() >= t) {
                return None;
            }
        }
    }

    /// Waits until every vCPU has finished; false on timeout.
    pub fn wait(&self, timeout: Duration) -> bool {
        let n = self.config.vcpus as usize;
        self.board.wait_for(timeout, |r| r.outcomes.len() >= n)
    }

    /// A handle that waits for this VM's end without borrowing the VM: a
    /// Linux guest ends with its first vCPU (reset, shutdown, error), the
    /// default guest when every vCPU finished.
    pub fn end_waiter(&self) -> EndWaiter {
        EndWaiter {
            board: Arc::clone(&self.board),
            need: if self.linux.is_some() {
                1
            } else {
                self.config.vcpus as usize
            },
        }
    }

    /// Waits until every vCPU has reported its pattern result.
    pub fn wait_results(&self, timeout: Duration) -> bool {
        let n = self.config.vcpus as usize;
        self.board.wait_for(timeout, |r| r.results.len() >= n)
    }

    /// A copy of what the guest reported so far.
    pub fn reports(&self) -> (Option<Instant>, Vec<PatternReport>, Vec<ProbeReport>) {
        let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
        (r.first_hello, r.results.clone(), r.probes.clone())
    }

    /// Outcomes of the vCPUs that finished, by index.
    pub fn outcomes(&self) -> Vec<(u32, VcpuOutcome)> {
        let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
        let mut o = r.outcomes.clone();
        o.sort_by_key(|(i, _)| *i);
        o
    }

    /// Whether vCPU 0 has finished (without copying the outcomes).
    fn vcpu0_finished(&self) -> bool {
        let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
        r.outcomes.iter().any(|(i, _)| *i == 0)
    }

    /// Whether every vCPU finished and verified its share.
    pub fn guest_ok(&self) -> bool {
        let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
        guest_ok(&r, self.config.vcpus)
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // SAFETY: the pthread handle belongs to a thread we spawned and
            // have not joined yet; the kick signal has a handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
        }
    }

    /// Takes every running vCPU out of `KVM_RUN` and holds it; returns once
    /// all are parked (or false after `timeout`).
    pub fn pause(&self, timeout: Duration) -> bool {
        self.control.set(Request::Pause);
        self.kick_all();
        self.control.wait_parked(self.config.vcpus, timeout)
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.control.set(Request::Run);
    }

    /// Releases the backing of `[gpa, gpa+len)` (whole leaves, not in the
    /// reserved low memory) while the guest may run, through
    /// [`VmMemory::release`]: the next access reads zeros, through the
    /// fault handler (guest_memfd: the kernel refills the page itself).
    pub fn release_range(&self, gpa: u64, len: u64) -> Result<()> {
        if gpa < layout::WORKLOAD_START {
            return Err(MemoryError::BadRange {
                gpa,
                len,
                granule: self.config.page_size.bytes(),
            }
            .into());
        }
        self.memory().checked_range(gpa, len)?;
        self.memory().release(&[(gpa, len)], ReleaseMode::Discard)?;
        Ok(())
    }

    fn post(&mut self, cmd: u64, arg: u64) -> Result<u64> {
        self.probe_seq += 1;
        let seq = self.probe_seq;
        // Device-side writes go through the stage-2 fast walk.
        let mut mem = self.stage2().access();
        mem.store_u64(layout::CONTROL + control::ARG, arg, Ordering::Relaxed)?;
        mem.store_u64(layout::CONTROL + control::CMD, cmd, Ordering::Relaxed)?;
        mem.store_u64(layout::CONTROL + control::SEQ, seq, Ordering::Release)?;
        // Posted: a vCPU waiting in OP_IDLE looks again.
        self.control.wake();
        Ok(seq)
    }

    /// Sets the balloon target to `pages` 4 KiB pages (configuration-change
    /// interrupt raised) and wakes the guest if it waits for work
    /// ([`Vm::wake_guest`]). Use this rather than the device's own
    /// `set_target_pages`, which an idle default guest would only see after
    /// [`vcpu::IDLE_BACKSTOP`].
    pub fn set_balloon_target(&self, pages: u32) -> Result<()> {
        let b = self
            .balloon
            .as_ref()
            .ok_or(VmError::NoBalloon("set_balloon_target"))?;
        b.set_target_pages(pages);
        self.control.wake();
        Ok(())
    }

    /// Tells the vCPUs that the guest may have work: a vCPU of the default
    /// guest waiting in `OP_IDLE` returns to the guest, which looks again.
    /// Call it after changing anything the guest polls (device state,
    /// guest memory) other than through [`Vm`]'s own methods, which wake
    /// by themselves.
    pub fn wake_guest(&self) {
        self.control.wake();
    }

    /// `OP_IDLE` waits that blocked a vCPU thread, and of them those that
    /// ended only on the backstop ([`vcpu::IDLE_BACKSTOP`]).
    pub fn idle_waits(&self) -> (u64, u64) {
        self.control.idle_waits()
    }

    /// Measurement knob: with `true` the vCPU threads return from `OP_IDLE`
    /// at once, so an idle guest spins (a host core at 100 %) as it did
    /// before it could wait; `false` (the default) lets it wait.
    pub fn set_idle_spins(&self, spin: bool) {
        self.control.set_idle_spins(spin);
    }

    /// Asks vCPU 0 (probe workload) to read the page at `gpa`; waits for the
    /// answer.
    pub fn probe(&mut self, gpa: u64, timeout: Duration) -> Result<Option<ProbeReport>> {
        let seq = self.post(control::CMD_PROBE, gpa)?;
        let found = self
            .board
            .wait_for(timeout, |r| r.probes.iter().any(|p| p.seq == seq));
        if !found {
            return Ok(None);
        }
        let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
        Ok(r.probes.iter().find(|p| p.seq == seq).copied())
    }

    /// Tells vCPU 0 (probe workload, balloon driver) to finish, and with
    /// [`Workload::BalloonStress`] every vCPU after its current pass.
    pub fn finish_probes(&mut self) -> Result<()> {
        self.post(control::CMD_EXIT, 0).map(|_| ())
    }

    /// The status block of the guest's balloon driver
    /// ([`Workload::Balloon`]), read from the control page.
    pub fn balloon_driver_status(&self) -> Result<guest::balloon::DriverStatus> {
        Ok(guest::balloon::DriverStatus::read(
            &mut self.stage2().access(),
        )?)
    }

    /// The guest balloon driver's own timing of its `QueueNotify` writes
    /// ([`guest::balloon::notify_timing`]), per queue (inflate, deflate,
    /// free page reporting), in guest TSC cycles.
    pub fn balloon_notify_times(&self) -> Result<Vec<guest::balloon::NotifyTimes>> {
        Ok(guest::balloon::NotifyTimes::read_all(
            &mut self.stage2().access(),
        )?)
    }

    /// Balloon driver errors the guest reported (`OP_BALLOON_ERROR`), by
    /// vCPU.
    pub fn balloon_driver_errors(&self) -> Vec<(u32, guest::balloon::DriverError)> {
        let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
        r.driver_errors.clone()
    }

    /// The per-vCPU blocks of [`Workload::BalloonStress`] (passes, bad
    /// words, first bad GPA), read from the control page through the fast
    /// walk.
    pub fn stress_status(&self) -> Result<Vec<guest::stress::VcpuStress>> {
        let mut page = vec![0u8; 0x1000];
        self.stage2().access().read(layout::CONTROL, &mut page)?;
        (0..self.config.vcpus)
            .map(|i| {
                guest::stress::VcpuStress::parse(&page, i)
                    .ok_or_else(|| VmError::Control(format!("no stress block for vCPU {i}")))
            })
            .collect()
    }

    /// Asks the guest's balloon driver ([`Workload::Balloon`]) to report
    /// `pages` pages just below its balloon as free (free page reporting),
    /// then touch and verify them again; taken when the driver is at its
    /// target. Returns the command's sequence (see
    /// [`guest::balloon::DriverStatus::seq`]).
    pub fn balloon_report_free(&mut self, pages: u64) -> Result<u64> {
        self.post(control::CMD_REPORT_FREE, pages)
    }

    /// Waits until the guest's balloon driver satisfies `pred` or stops
    /// (failed, exited, vCPU 0 finished); returns the last status seen, and
    /// whether `pred` held. Polls every 200 µs.
    pub fn wait_balloon_driver(
        &self,
        timeout: Duration,
        pred: impl Fn(&guest::balloon::DriverStatus) -> bool,
    ) -> Result<(guest::balloon::DriverStatus, bool)> {
        use guest::balloon::{DriverState, DriverStatus};
        let t0 = Instant::now();
        // One accessor (an RCU reader and its translation cache) for the
        // whole wait, not one per poll.
        let mut mem = self.stage2().access();
        loop {
            let s = DriverStatus::read(&mut mem)?;
            if pred(&s) {
                return Ok((s, true));
            }
            let stopped = matches!(s.state, DriverState::Failed | DriverState::Exited)
                || self.vcpu0_finished();
            if stopped || t0.elapsed() >= timeout {
                return Ok((s, false));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Host-side check of the guest's pattern over `[start, end)`: returns
    /// the number of words that differ from `gpa ^ seed`.
    pub fn check_pattern(&self, start: u64, end: u64) -> Result<u64> {
        let mut mem = self.stage2().access();
        let seed = self.config.seed;
        let mut bad = 0;
        let mut buf = vec![0u8; 1 << 20];
        let mut gpa = start;
        while gpa < end {
            let n = (end - gpa).min(buf.len() as u64);
            let chunk = &mut buf[..usize::try_from(n).unwrap_or(0)];
            mem.read(gpa, chunk)?;
            for (k, w) in chunk.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                if u64::from_le_bytes(b) != guest::pattern(gpa + k as u64 * 8, seed) {
                    bad += 1;
                }
            }
            gpa += n;
        }
        Ok(bad)
    }

    /// Tears the VM down: stops and joins the vCPUs, then hands the VM and
    /// its memory to a reclaim thread that releases guest RAM through the
    /// table's whole-VM gather, then drops the VM (and its memory slots),
    /// then closes the memory: fault handler stopped, guest RAM unmapped,
    /// files closed (see `Remains::reclaim`). Returns once the vCPUs are
    /// stopped; [`Teardown::wait_reclaim`] waits for the memory, and
    /// releases it on the calling thread if the reclaim thread has not
    /// begun yet (a caller that waits at once is usually first). This is
    /// the one teardown path.
    pub fn destroy(mut self) -> Teardown {
        self.teardown(true)
    }

    fn teardown(&mut self, background: bool) -> Teardown {
        let t0 = Instant::now();
        self.destroyed = true;
        // Whether every vCPU was parked when the stop was published (see
        // the hand-over below).
        let vcpus = u32::try_from(self.threads.len()).unwrap_or(u32::MAX);
        let all_parked = self.control.stop(vcpus);
        self.kick_all();
        // Synchronous on drop; otherwise the VM's reclaim thread (or a new
        // one if it could not be made with the VM, or this thread if no
        // thread can be made at all).
        let reclaimer = if background {
            self.reclaimer.take().or_else(Reclaimer::spawn)
        } else {
            None
        };
        // A paused VM gives its memory back while its threads are joined,
        // and the joins leave `destroy` too: a vCPU counted as parked when
        // `Stop` was published (under the count's lock) is waiting in
        // `check` or has finished; it leaves without entering the guest or
        // touching its memory again, with `Stopped` unless it reported an
        // outcome already. The reclaim thread stops the device thread
        // before it releases. A running VM's vCPUs are joined here first.
        let mut outcomes = vec![VcpuOutcome::Stopped; self.config.vcpus as usize];
        let paused = reclaimer.is_some() && all_parked;
        let mut remains = Remains {
            device_thread: None,
            vcpu_threads: Vec::new(),
            vcpu_fds: Vec::new(),
            mmio: None,
            vm_fd: None,
            balloon: None,
            memory: None,
        };
        if paused {
            let r = self.board.reports.lock().unwrap_or_else(|e| e.into_inner());
            for (i, o) in &r.outcomes {
                if let Some(slot) = outcomes.get_mut(*i as usize) {
                    *slot = o.clone();
                }
            }
            drop(r);
            remains.vcpu_threads = std::mem::take(&mut self.threads);
            remains.vcpu_fds = std::mem::take(&mut self.vcpu_fds);
            remains.device_thread = self.balloon_thread.take();
            remains.mmio = Some(std::mem::replace(
                &mut self.mmio,
                Arc::new(MmioBus::default()),
            ));
        } else {
            for (i, t) in self.threads.drain(..).enumerate() {
                if let Ok(o) = t.join() {
                    outcomes[i] = o;
                }
            }
            self.vcpu_fds.clear();
            // Nothing notifies any more: the device thread is stopped and
            // joined before guest memory is released, so no device request
            // runs into the teardown.
            if let Some(mut t) = self.balloon_thread.take() {
                t.stop();
            }
            // The vCPUs are joined: the bus's device references go, so
            // that the reclaim below holds the last references to the
            // handler and RAM.
            self.mmio = Arc::new(MmioBus::default());
        }
        let stop_vcpus_ms = ms(t0.elapsed());
        remains.vm_fd = self.vm_fd.take();
        remains.balloon = self.balloon.take();
        remains.memory = self.memory.take();
        let (reclaim, done) = match reclaimer {
            Some(r) => (Some(r.start(Box::new(remains), t0)), None),
            None => (None, Some(remains.reclaim(t0))),
        };
        Teardown {
            teardown_ms: ms(t0.elapsed()),
            stop_vcpus_ms,
            handed_over: paused,
            outcomes,
            reclaim,
            done,
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.destroyed {
            self.teardown(false);
        }
    }
}

/// Whether all `vcpus` finished with `Done` and verified their share.
pub fn guest_ok(r: &Reports, vcpus: u32) -> bool {
    let n = vcpus as usize;
    r.results.len() == n
        && r.results.iter().all(PatternReport::ok)
        && r.outcomes.len() == n
        && r.outcomes.iter().all(|(_, o)| *o == VcpuOutcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask() -> libc::cpu_set_t {
        affinity().expect("sched_getaffinity")
    }

    fn same(a: &libc::cpu_set_t, b: &libc::cpu_set_t) -> bool {
        // SAFETY: CPU_EQUAL only reads the two sets.
        unsafe { libc::CPU_EQUAL(a, b) }
    }

    fn pin(set: &libc::cpu_set_t) {
        assert!(set_affinity(set), "sched_setaffinity");
    }

    /// A thread that runs on the CPU it is told to leave ends up on
    /// another one with its whole affinity mask back; one told to leave
    /// a CPU it is not on, or with no other CPU in its mask, stays.
    #[test]
    fn leave_cpu_moves_off_the_given_cpu_and_keeps_the_mask() {
        std::thread::spawn(|| {
            let all = mask();
            // SAFETY: CPU_ISSET only reads the set.
            let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &all) })
                .collect();
            if cpus.len() < 2 {
                eprintln!(
                    "SKIPPED: leave_cpu_moves_off_the_given_cpu_and_keeps_the_mask: \
                     this thread may run on {} CPU(s), 2 are needed",
                    cpus.len()
                );
                return;
            }
            // Onto cpus[0], then the whole mask back: it stays there until
            // the scheduler moves it.
            // SAFETY: an all-zero cpu_set_t is a valid empty set.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: cpus[0] is below CPU_SETSIZE.
            unsafe { libc::CPU_SET(cpus[0], &mut one) };
            pin(&one);
            assert_eq!(current_cpu(), Some(cpus[0]));
            pin(&all);
            // (The scheduler may have moved it meanwhile: leave where it is.)
            let was = current_cpu();
            leave_cpu(was);
            let now = current_cpu();
            assert!(now.is_some() && now != was, "still on CPU {now:?}");
            assert!(same(&mask(), &all), "mask not given back");

            // Told to leave a CPU it is not on: no change of mask either.
            let here = current_cpu();
            leave_cpu(cpus.iter().copied().find(|&c| Some(c) != here));
            assert!(same(&mask(), &all));

            // A mask of one CPU: nowhere to go.
            pin(&one);
            leave_cpu(Some(cpus[0]));
            assert_eq!(current_cpu(), Some(cpus[0]));
            assert!(same(&mask(), &one));
        })
        .join()
        .expect("the test thread");
    }
}
