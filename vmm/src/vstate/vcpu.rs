//! vCPU threads: the `KVM_RUN` loop, exit dispatch, and kicking.
//!
//! Each vCPU runs on its own thread. To get a vCPU out of `KVM_RUN` (pause,
//! shutdown), the controller first publishes the request in [`RunControl`],
//! then sends the thread [`kick_signal`]. The signal handler sets
//! `kvm_run.immediate_exit` through a thread-local pointer, so the request
//! is seen whether the signal lands inside `KVM_RUN` (which returns `EINTR`)
//! or just before it (the next `KVM_RUN` returns at once). The loop clears
//! `immediate_exit` and re-reads the request after every `EINTR`.
//!
//! Idle: the default guest waits for work with the report operation
//! [`OP_IDLE`]: the vCPU thread blocks in [`RunControl`] until the work
//! epoch moves (every host action that may give the guest work bumps it:
//! [`RunControl::wake`]), a pause or stop is requested, or
//! [`IDLE_BACKSTOP`] passes, then re-enters the guest, which looks again.
//! No wake-up is lost: the thread remembers the epoch it last returned to
//! the guest with and blocks only while it is unchanged, and the host
//! publishes the work before it bumps the epoch.
//!
//! **Standby.** A VM's vCPU threads are started with it, before its vCPUs
//! exist (`Standby`): each makes its heap arena, installs its seccomp
//! filter and waits; the start hands each its vCPU. A thread's start-up
//! (stack, signal stack, arena, installing its filter: about half a
//! millisecond here) so overlaps the VM's set-up instead of
//! delaying the first `KVM_RUN`. A thread runs no guest code unconfined.
//!
//! Two loops: the default guest's (`run_loop`: report device, exceptions,
//! the console alone on the port bus, `hlt` ends the vCPU) and a Linux
//! guest's (`linux_loop`: port I/O to [`LegacyIo`], MMIO to the bus, KVM's
//! in-kernel irqchip handles `hlt`, a reset request or a KVM
//! shutdown/system event ends the VM). Both split a port access into bytes
//! by its access size, which they read from `kvm_run` beside kvm-ioctls'
//! exit (`pio_in`, `pio_out`).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::{GuestAccess, VmMemory};

use crate::devices::legacy::{split_in, split_out, LegacyIo};
use crate::devices::report::{
    has_error_code, GuestException, PatternReport, ProbeReport, EXC_PORT, OP_DONE, OP_HELLO,
    OP_IDLE, OP_PROBE, OP_RESULT, REPORT_MMIO,
};
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::MmioBus;
use crate::guest::balloon::{DriverError, OP_BALLOON_ERROR};

/// vCPU threads started ahead of their vCPUs, each waiting for its
/// [`VcpuFd`] and [`VcpuContext`] (see the module documentation). Threads
/// not handed a vCPU end and are joined when this is dropped (a failed VM
/// creation, a VM destroyed before its start).
#[derive(Debug, Default)]
pub(crate) struct Standby {
    /// In vCPU index order; the next start takes the first.
    waiting: Vec<(JoinHandle<VcpuOutcome>, SyncSender<Handover>)>,
}

/// What a waiting vCPU thread is handed at the start.
type Handover = (VcpuFd, VcpuContext);

impl Standby {
    /// Starts `n` threads named `vcpu0`..: each allocates (so that its
    /// heap arena exists), applies the vCPU seccomp filter, then waits.
    pub(crate) fn spawn(n: u32) -> std::io::Result<Self> {
        let mut s = Standby::default();
        for i in 0..n {
            let (tx, rx) = sync_channel::<Handover>(1);
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    // glibc gives a thread's first allocation its own arena
                    // (a mapping): made here, not before the first KVM_RUN.
                    drop(std::hint::black_box(Box::new(0u64)));
                    crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu);
                    match rx.recv() {
                        Ok((fd, ctx)) => run(fd, ctx),
                        Err(_) => VcpuOutcome::Stopped,
                    }
                })?;
            s.waiting.push((t, tx));
        }
        Ok(s)
    }

    /// Hands the next waiting thread its vCPU; returns the thread.
    pub(crate) fn start(
        &mut self,
        fd: VcpuFd,
        ctx: VcpuContext,
    ) -> std::io::Result<JoinHandle<VcpuOutcome>> {
        if self.waiting.is_empty() {
            return Err(std::io::Error::other("no vCPU thread is waiting"));
        }
        let (t, tx) = self.waiting.remove(0);
        match tx.send((fd, ctx)) {
            Ok(()) => Ok(t),
            Err(_) => {
                let _ = t.join();
                Err(std::io::Error::other(
                    "a vCPU thread ended before its start",
                ))
            }
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        for (t, tx) in self.waiting.drain(..) {
            drop(tx);
            let _ = t.join();
        }
    }
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads (SIGRTMIN).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Const-initialised thread local without destructor: no allocation, safe
    // to touch from a signal handler.
    let p = KVM_RUN_PTR.with(Cell::get);
    if !p.is_null() {
        // SAFETY: p points at this thread's vCPU kvm_run mapping; it is set
        // while the VcpuFd is alive and cleared before it is dropped. A
        // volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&raw mut (*p).immediate_exit, 1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    res
}

/// What the controller asks of the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Request {
    /// Keep running.
    Run = 0,
    /// Leave `KVM_RUN` and wait.
    Pause = 1,
    /// Leave `KVM_RUN` and exit the thread.
    Stop = 2,
}

/// The longest an [`OP_IDLE`] wait blocks without a wake-up: a safety net
/// only, every host action that gives the guest work wakes it at once.
pub const IDLE_BACKSTOP: Duration = Duration::from_secs(1);

/// Pause/stop requests and their acknowledgements, and the work epoch that
/// idle vCPUs ([`OP_IDLE`]) wait on (one mutex and condition variable for
/// both, so that a pause or stop also ends an idle wait).
#[derive(Debug, Default)]
pub struct RunControl {
    request: AtomicU8,
    /// Number of vCPU threads parked (paused or finished).
    parked: Mutex<u32>,
    cv: Condvar,
    /// Bumped (under `parked`) whenever the guest may have new work.
    epoch: AtomicU64,
    /// [`OP_IDLE`] waits that blocked, and of them those that ended on
    /// [`IDLE_BACKSTOP`].
    idle_waits: AtomicU64,
    idle_timeouts: AtomicU64,
    /// Measurement knob: [`OP_IDLE`] returns at once (the guest spins).
    idle_spins: AtomicBool,
}

impl RunControl {
    /// The guest may have new work (a command posted, a device changed):
    /// bumps the work epoch and wakes the vCPUs waiting in [`OP_IDLE`].
    /// Call it after the work is visible to the guest.
    pub fn wake(&self) {
        let _g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// [`OP_IDLE`] waits that blocked, and how many of them ended only on
    /// [`IDLE_BACKSTOP`].
    pub fn idle_waits(&self) -> (u64, u64) {
        (
            self.idle_waits.load(Ordering::Relaxed),
            self.idle_timeouts.load(Ordering::Relaxed),
        )
    }

    /// With `true`, [`OP_IDLE`] returns at once and the guest spins as if
    /// it had no way to wait (for measurements); `false` (the default)
    /// blocks.
    pub fn set_idle_spins(&self, spin: bool) {
        self.idle_spins.store(spin, Ordering::SeqCst);
        self.wake();
    }

    /// Called by a vCPU thread on [`OP_IDLE`]: blocks while the epoch is
    /// `*seen`, nothing is requested and `backstop` has not passed; then
    /// records the epoch the thread returns to the guest with.
    fn idle(&self, seen: &mut u64, backstop: Duration) {
        let mut g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let idle = |_: &mut u32| {
            self.epoch.load(Ordering::SeqCst) == *seen
                && self.get() == Request::Run
                && !self.idle_spins.load(Ordering::SeqCst)
        };
        if idle(&mut g) {
            self.idle_waits.fetch_add(1, Ordering::Relaxed);
            let (_g, res) = self
                .cv
                .wait_timeout_while(g, backstop, idle)
                .unwrap_or_else(|e| e.into_inner());
            if res.timed_out() {
                self.idle_timeouts.fetch_add(1, Ordering::Relaxed);
            }
        }
        *seen = self.epoch.load(Ordering::SeqCst);
    }

    /// Publishes [`Request::Stop`] (the caller then kicks the threads) and
    /// says whether `n` threads were parked at that moment, under the same
    /// lock: each of them is waiting in `check` or has finished, and leaves
    /// without entering the guest. Read after the stop instead, the count
    /// could miss a parked thread already woken by it, on its way out.
    pub fn stop(&self, n: u32) -> bool {
        let g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.request.store(Request::Stop as u8, Ordering::SeqCst);
        self.cv.notify_all();
        *g >= n
    }

    /// Publishes a request (the caller then kicks the threads).
    pub fn set(&self, r: Request) {
        let _g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.request.store(r as u8, Ordering::SeqCst);
        self.cv.notify_all();
    }

    fn get(&self) -> Request {
        match self.request.load(Ordering::SeqCst) {
            0 => Request::Run,
            1 => Request::Pause,
            _ => Request::Stop,
        }
    }

    /// Waits until `n` threads are parked.
    pub fn wait_parked(&self, n: u32, timeout: std::time::Duration) -> bool {
        let g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |p| *p < n)
            .unwrap_or_else(|e| e.into_inner());
        *g >= n
    }

    /// Marks a thread as parked for good (finished).
    fn park_forever(&self) {
        let mut g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        self.cv.notify_all();
    }

    /// Called by a vCPU thread: returns false if it must stop. Blocks while
    /// paused.
    fn check(&self) -> bool {
        match self.get() {
            Request::Run => true,
            Request::Stop => false,
            Request::Pause => {
                let mut g = self.parked.lock().unwrap_or_else(|e| e.into_inner());
                *g += 1;
                self.cv.notify_all();
                while self.get() == Request::Pause {
                    g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                *g -= 1;
                self.get() == Request::Run
            }
        }
    }
}

/// Why a vCPU thread ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum VcpuOutcome {
    /// The guest reported done.
    Done,
    /// Stopped by the VMM before finishing.
    Stopped,
    /// A guest exception.
    Exception(GuestException),
    /// `hlt` outside the exception path.
    Halted,
    /// Triple fault.
    Shutdown,
    /// The guest's balloon driver stopped on an error
    /// ([`OP_BALLOON_ERROR`]); the guest spins after the report.
    BalloonDriverError(DriverError),
    /// KVM could not run or emulate the guest.
    KvmError(String),
    /// A Linux guest asked for a reset: 0xfe to the i8042 (`reboot=k`) or a
    /// KVM reset system event. The monitor ends the VM (a clean end).
    Reset,
    /// A Linux guest powered off (KVM shutdown system event).
    PowerOff,
}

impl VcpuOutcome {
    /// Whether this ends a Linux guest cleanly (it asked to go away).
    pub fn is_linux_exit(&self) -> bool {
        matches!(self, Self::Reset | Self::PowerOff | Self::Shutdown)
    }
}

/// Everything the guest reported, shared by all vCPU threads.
#[derive(Debug, Default)]
pub struct Reports {
    /// First `OP_HELLO` seen.
    pub first_hello: Option<Instant>,
    /// Just before the first `KVM_RUN` of vCPU 0.
    pub first_run: Option<Instant>,
    /// Pattern results.
    pub results: Vec<PatternReport>,
    /// Probe answers.
    pub probes: Vec<ProbeReport>,
    /// Balloon driver errors ([`OP_BALLOON_ERROR`]), by vCPU.
    pub driver_errors: Vec<(u32, DriverError)>,
    /// Finished vCPUs with their outcome.
    pub outcomes: Vec<(u32, VcpuOutcome)>,
}

/// Reports plus a condition variable to wait for new ones.
#[derive(Debug, Default)]
pub struct ReportBoard {
    /// The reports.
    pub reports: Mutex<Reports>,
    /// Notified on every new report.
    pub cv: Condvar,
}

impl ReportBoard {
    fn update(&self, f: impl FnOnce(&mut Reports)) {
        let mut g = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g);
        self.cv.notify_all();
    }

    /// Waits until `pred` holds or `timeout` passes; returns whether it held.
    pub fn wait_for(&self, timeout: std::time::Duration, pred: impl Fn(&Reports) -> bool) -> bool {
        let g = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |r| !pred(r))
            .unwrap_or_else(|e| e.into_inner());
        pred(&g)
    }
}

/// What a vCPU thread needs.
pub struct VcpuContext {
    /// vCPU index.
    pub index: u32,
    /// Pause/stop requests.
    pub control: Arc<RunControl>,
    /// Where reports go.
    pub board: Arc<ReportBoard>,
    /// The console.
    pub serial: Arc<SerialDevice>,
    /// Guest memory, to read exception frames: this thread's accessor of
    /// the stage-2 table (made on first use: registering a reader is not
    /// free, and most vCPUs never need it), read through its vm-memory view
    /// ([`GuestAccess::with_view`]). The accessor holds the table, not the
    /// mappings, and every read is a pinned walk, so nothing here relies on
    /// the order in which the VM and its memory go (a released or unmapped
    /// page is an error, never a host access).
    pub memory: Arc<VmMemory>,
    /// The accessor, once made.
    pub access: std::cell::OnceCell<std::cell::RefCell<GuestAccess>>,
    /// MMIO devices (virtio-mmio windows).
    pub mmio: Arc<MmioBus>,
    /// The port devices of a Linux guest; `Some` selects the Linux loop.
    pub legacy: Option<Arc<LegacyIo>>,
}

enum Exit {
    None,
    Out(u16, u32),
    Mmio(u64, u32),
    Stop(VcpuOutcome),
    Interrupted,
}

/// Runs vCPU `vcpu` until the guest finishes or the VMM stops it, on a
/// thread [`Standby`] confined.
fn run(mut vcpu: VcpuFd, ctx: VcpuContext) -> VcpuOutcome {
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN_PTR.with(|c| c.set(run_ptr));
    if ctx.index == 0 {
        let now = Instant::now();
        ctx.board.update(|r| {
            r.first_run.get_or_insert(now);
        });
    }
    let outcome = match ctx.legacy.clone() {
        Some(io) => linux_loop(&mut vcpu, &ctx, &io),
        None => run_loop(&mut vcpu, &ctx),
    };
    KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
    ctx.board
        .update(|r| r.outcomes.push((ctx.index, outcome.clone())));
    ctx.control.park_forever();
    outcome
}

fn run_loop(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> VcpuOutcome {
    // The work epoch the guest last looked for work at (see OP_IDLE).
    let mut seen = ctx.control.epoch.load(Ordering::SeqCst);
    loop {
        if !ctx.control.check() {
            return VcpuOutcome::Stopped;
        }
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if SerialDevice::handles(port) => {
                let (ptr, len) = (data.as_ptr(), data.len());
                // SAFETY: `ptr` and `len` are the data of this exit, as
                // kvm-ioctls returned it; `data` is not used again.
                match unsafe { pio_out(vcpu, ptr, len) } {
                    // String I/O (`rep outsb`) delivers every byte in one
                    // exit; a wide `out` sets the registers after `port`.
                    Some((size, data)) => {
                        split_out(port, size, data, |p, b| ctx.serial.write(p, b));
                        Exit::None
                    }
                    None => Exit::Stop(VcpuOutcome::KvmError(PIO_OVERLAP.into())),
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => Exit::Out(port, le_u32(data)),
            Ok(VcpuExit::MmioWrite(addr, data)) => match ctx.mmio.find(addr) {
                Some((dev, off)) => {
                    dev.write(off, data);
                    Exit::None
                }
                None => Exit::Mmio(addr, le_u32(data)),
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                match ctx.mmio.find(addr) {
                    Some((dev, off)) => dev.read(off, data),
                    None => data.fill(0),
                }
                Exit::None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let (ptr, len) = (data.as_mut_ptr(), data.len());
                // SAFETY: as for `IoOut` above.
                match unsafe { pio_in(vcpu, ptr, len) } {
                    Some((size, data)) => {
                        split_in(port, size, data, |p| ctx.serial.read(p));
                        Exit::None
                    }
                    None => Exit::Stop(VcpuOutcome::KvmError(PIO_OVERLAP.into())),
                }
            }
            Ok(VcpuExit::Hlt) => Exit::Stop(VcpuOutcome::Halted),
            Ok(VcpuExit::Shutdown) => Exit::Stop(VcpuOutcome::Shutdown),
            Ok(VcpuExit::InternalError) => {
                let sub = vcpu.get_kvm_run().__bindgen_anon_1;
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel fills the
                // `internal` member of the exit union.
                let suberror = unsafe { sub.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                Exit::Stop(VcpuOutcome::KvmError(format!(
                    "KVM internal error, suberror {suberror}, guest rip {rip:#x}"
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::Stop(VcpuOutcome::KvmError(format!(
                "VM entry failed: hardware reason {reason:#x} on cpu {cpu}"
            ))),
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Ok(other) => Exit::Stop(VcpuOutcome::KvmError(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => Exit::Stop(VcpuOutcome::KvmError(format!("KVM_RUN failed: {e}"))),
        };
        match exit {
            Exit::None => {}
            Exit::Interrupted => vcpu.set_kvm_immediate_exit(0),
            Exit::Stop(o) => return o,
            Exit::Mmio(addr, value) => {
                if addr == REPORT_MMIO {
                    if let Some(o) = report(vcpu, ctx, value, &mut seen) {
                        return o;
                    }
                }
            }
            Exit::Out(port, value) => {
                if port == EXC_PORT {
                    return VcpuOutcome::Exception(exception(vcpu, ctx, value));
                }
            }
        }
    }
}

/// Why a port exit could not be handled (no kernel does this).
const PIO_OVERLAP: &str = "KVM_EXIT_IO with its data inside the kvm_run struct";

/// The access size (1, 2 or 4 bytes) of the `KVM_EXIT_IO` that `vcpu`'s
/// last `KVM_RUN` returned: kvm-ioctls' `IoIn`/`IoOut` give the port and
/// `size * count` bytes, not how they divide (`inw` and a two-byte `rep
/// insb` look alike). `None` if the exit's data would overlap the
/// `kvm_run` struct (the kernel puts it on the page after it,
/// `KVM_PIO_PAGE_OFFSET`).
fn pio_size(vcpu: &mut VcpuFd) -> Option<usize> {
    let run = vcpu.get_kvm_run();
    // SAFETY: the last KVM_RUN returned KVM_EXIT_IO (kvm-ioctls decoded it
    // as IoIn/IoOut), for which the kernel fills the union's `io` member:
    // plain integers.
    let pio = unsafe { run.__bindgen_anon_1.io };
    let past = usize::try_from(pio.data_offset).ok()? >= std::mem::size_of_val(run);
    past.then_some(usize::from(pio.size))
}

/// The data of the port `in` exit that `vcpu`'s last `KVM_RUN` returned,
/// writable, and its element size (see [`pio_size`]); `None` if the data
/// would overlap the `kvm_run` struct. The slice borrows `vcpu`, so it is
/// gone before the next `KVM_RUN`.
///
/// # Safety
/// `ptr` and `len` must be the data slice kvm-ioctls' `VcpuExit::IoIn`
/// gave for that exit (a pointer into the vCPU's `kvm_run` mapping, which
/// lives as long as `vcpu`), and that slice must not be used again.
unsafe fn pio_in(vcpu: &mut VcpuFd, ptr: *mut u8, len: usize) -> Option<(usize, &mut [u8])> {
    let size = pio_size(vcpu)?;
    // SAFETY: per the caller, `ptr..ptr + len` is this exit's data in the
    // live mapping, with no other reference to it. `pio_size` checked that
    // it lies past the `kvm_run` struct, so the reference it made to the
    // struct (now gone) did not cover it.
    Some((size, unsafe { std::slice::from_raw_parts_mut(ptr, len) }))
}

/// As [`pio_in`], for an `out` exit (read-only data).
///
/// # Safety
/// As for [`pio_in`], with the slice of `VcpuExit::IoOut`.
unsafe fn pio_out(vcpu: &mut VcpuFd, ptr: *const u8, len: usize) -> Option<(usize, &[u8])> {
    let size = pio_size(vcpu)?;
    // SAFETY: as in `pio_in`, read-only.
    Some((size, unsafe { std::slice::from_raw_parts(ptr, len) }))
}

/// The `KVM_RUN` loop of a Linux guest. Never panics on guest data: unknown
/// ports read 0xff, unknown MMIO reads 0xff, writes to either are dropped.
fn linux_loop(vcpu: &mut VcpuFd, ctx: &VcpuContext, io: &LegacyIo) -> VcpuOutcome {
    loop {
        if !ctx.control.check() {
            return VcpuOutcome::Stopped;
        }
        if io.reset_requested() {
            return VcpuOutcome::Reset;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                let (ptr, len) = (data.as_mut_ptr(), data.len());
                // SAFETY: `ptr` and `len` are the data of this exit, as
                // kvm-ioctls returned it; `data` is not used again.
                let Some((size, data)) = (unsafe { pio_in(vcpu, ptr, len) }) else {
                    return VcpuOutcome::KvmError(PIO_OVERLAP.into());
                };
                io.read(port, size, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let (ptr, len) = (data.as_ptr(), data.len());
                // SAFETY: as for `IoIn` above.
                let Some((size, data)) = (unsafe { pio_out(vcpu, ptr, len) }) else {
                    return VcpuOutcome::KvmError(PIO_OVERLAP.into());
                };
                io.write(port, size, data);
                if io.reset_requested() {
                    return VcpuOutcome::Reset;
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => match ctx.mmio.find(addr) {
                Some((dev, off)) => dev.read(off, data),
                None => data.fill(0xff),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some((dev, off)) = ctx.mmio.find(addr) {
                    dev.write(off, data);
                }
            }
            // With the in-kernel irqchip KVM waits in HLT itself; should one
            // still come here, go back in (the LAPIC wakes the vCPU).
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => return VcpuOutcome::Shutdown,
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                    VcpuOutcome::PowerOff
                } else {
                    VcpuOutcome::Reset
                };
            }
            Ok(VcpuExit::InternalError) => {
                let sub = vcpu.get_kvm_run().__bindgen_anon_1;
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel fills the
                // `internal` member of the exit union.
                let suberror = unsafe { sub.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return VcpuOutcome::KvmError(format!(
                    "KVM internal error, suberror {suberror}, guest rip {rip:#x} (on a PVM host, \
                     see dmesg for the instruction the emulator stopped on)"
                ));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VcpuOutcome::KvmError(format!(
                    "VM entry failed: hardware reason {reason:#x} on cpu {cpu}"
                ))
            }
            Ok(VcpuExit::Intr) => vcpu.set_kvm_immediate_exit(0),
            Ok(other) => return VcpuOutcome::KvmError(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => return VcpuOutcome::KvmError(format!("KVM_RUN failed: {e}")),
        }
    }
}

/// The first (up to) four bytes of an exit's data as a little-endian `u32`.
fn le_u32(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

fn report(vcpu: &VcpuFd, ctx: &VcpuContext, op: u32, seen: &mut u64) -> Option<VcpuOutcome> {
    match op {
        OP_IDLE => {
            // A pause or stop ends the wait; the loop then sees it.
            ctx.control.idle(seen, IDLE_BACKSTOP);
            None
        }
        OP_HELLO => {
            let now = Instant::now();
            ctx.board.update(|r| {
                r.first_hello.get_or_insert(now);
            });
            None
        }
        OP_RESULT | OP_PROBE => {
            let regs = match vcpu.get_regs() {
                Ok(r) => r,
                Err(e) => return Some(VcpuOutcome::KvmError(format!("KVM_GET_REGS failed: {e}"))),
            };
            if op == OP_RESULT {
                let rep = PatternReport {
                    vcpu: ctx.index,
                    share_start: regs.rdi,
                    share_end: regs.rsi,
                    bad_words: regs.r8,
                    first_bad: (regs.r9 != u64::MAX).then_some(regs.r9),
                };
                ctx.board.update(|r| r.results.push(rep));
            } else {
                let khz = u64::from(vcpu.get_tsc_khz().unwrap_or(0));
                let read_ns = if khz == 0 {
                    0
                } else {
                    u64::try_from(u128::from(regs.r10) * 1_000_000 / u128::from(khz))
                        .unwrap_or(u64::MAX)
                };
                let rep = ProbeReport {
                    seq: regs.rsi,
                    gpa: regs.rdi,
                    or_words: regs.r8,
                    first_word: regs.r9,
                    read_ns,
                };
                ctx.board.update(|r| r.probes.push(rep));
            }
            None
        }
        OP_DONE => Some(VcpuOutcome::Done),
        OP_BALLOON_ERROR => {
            // rdi = error code, rsi = detail (see guest::balloon::status).
            let regs = match vcpu.get_regs() {
                Ok(r) => r,
                Err(e) => return Some(VcpuOutcome::KvmError(format!("KVM_GET_REGS failed: {e}"))),
            };
            let err = DriverError::from_code(regs.rdi, regs.rsi)
                .unwrap_or(DriverError::Unknown(0, regs.rsi));
            ctx.board.update(|r| r.driver_errors.push((ctx.index, err)));
            Some(VcpuOutcome::BalloonDriverError(err))
        }
        _ => Some(VcpuOutcome::KvmError(format!("unknown report opcode {op}"))),
    }
}

fn exception(vcpu: &VcpuFd, ctx: &VcpuContext, vector: u32) -> GuestException {
    let rsp = vcpu.get_regs().map(|r| r.rsp).unwrap_or(0);
    let cr2 = vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
    let rip_at = if has_error_code(vector) { rsp + 8 } else { rsp };
    let rip = ctx
        .access
        .get_or_init(|| std::cell::RefCell::new(ctx.memory.access()))
        .borrow_mut()
        .with_view(0, |m| m.read_obj::<u64>(GuestAddress(rip_at)), |_| None)
        .unwrap_or(0);
    GuestException {
        vcpu: ctx.index,
        vector,
        rip,
        cr2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread parked in `check`; `stop` counts it as parked, whenever
    /// the thread then leaves.
    #[test]
    fn stop_counts_a_parked_thread_as_parked() {
        let c = Arc::new(RunControl::default());
        c.set(Request::Pause);
        let t = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || c.check())
        };
        assert!(c.wait_parked(1, Duration::from_secs(10)), "never parked");
        assert!(c.stop(1), "a parked thread was not counted at the stop");
        assert!(
            !t.join().expect("check panicked"),
            "a stopped thread ran on"
        );
        assert!(!c.stop(2), "two threads counted where one parked");
    }

    #[test]
    fn a_resumed_thread_leaves_the_count() {
        let c = Arc::new(RunControl::default());
        c.set(Request::Pause);
        let t = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || c.check())
        };
        assert!(c.wait_parked(1, Duration::from_secs(10)), "never parked");
        c.set(Request::Run);
        assert!(t.join().expect("check panicked"));
        assert!(!c.wait_parked(1, Duration::ZERO));
    }
}
