//! Seccomp filters, one per thread kind (the `vmm` binary's confinement).
//!
//! Every thread of the monitor process installs the filter of its kind
//! ([`ThreadKind`]) with [`install`] as the first thing it does, before it
//! reads anything a guest (or an API client) controls: vCPU threads before
//! their first `KVM_RUN`, the device thread before its first `poll`, the
//! userfaultfd handler before its first fault message, the API thread
//! before its first `accept`; the main thread once it has started every
//! thread that needs more than it keeps (after `Vm::start`, before it waits
//! for the guest). A filter allows the system calls that kind was seen to
//! make (`strace -f` on `vmm run` with every backing, the balloon, releases,
//! a Linux boot, the API service and its failure paths; then the whole test
//! suite with the filters on) and, for `ioctl`, only the request numbers it
//! uses; anything else kills the process (`SECCOMP_RET_KILL_PROCESS`: the
//! exit status says `SIGSYS`). The filters are built with rust-vmm's
//! `seccompiler` (Firecracker's) and installed per thread, without TSYNC.
//!
//! Invariants:
//! - **Stacking.** A thread inherits the filters of the thread that
//!   created it, and the kernel applies all of them (the strictest answer
//!   wins). So a thread that creates threads after its own filter is
//!   installed (main: the reclaim thread; reclaim: the release helpers;
//!   API: tokio's blocking pool) allows what its children do before they
//!   install theirs (thread start-up: `set_robust_list`, `rseq`,
//!   `sigaltstack`, `PR_SET_NAME`), and its children's filters only narrow
//!   it. The release helpers (`gmm-release`, spawned inside guest-mm)
//!   install nothing of their own: they run under the reclaim thread's
//!   filter, which is the reclaim/release kind.
//! - **Off by default.** The library is also used in-process by the `gmm`
//!   tools and the tests: until the binary calls [`enable`], [`install`]
//!   does nothing. `vmm` enables it unless `--no-seccomp` is given.
//! - **No executable memory.** `mmap` and `mprotect` are allowed only
//!   without `PROT_EXEC`; `tgkill` only to threads of this process;
//!   `clone` only for threads (`CLONE_THREAD`); `clone3`, whose flags BPF
//!   cannot read, fails with `ENOSYS` in the kinds that create threads (a
//!   second filter stacked under their allow-list), so glibc uses `clone`.
//! - **No file opened behind our back.** glibc's `free` opens
//!   `/proc/sys/vm/overcommit_memory` the first time it shrinks the heap of
//!   a thread's arena (`heap_trim` → `shrink_heap`), in whichever thread
//!   frees; no filter allows `openat`, so a confined thread died of
//!   `SIGSYS` in `free` (seen: the balloon's device thread dropping a
//!   request's buffer). [`enable`] turns heap trimming off
//!   (`M_TRIM_THRESHOLD` at its maximum) before any filter exists: freed
//!   heap memory stays with the process for reuse (the monitor's heap is
//!   small; guest RAM is never on it). The hidden
//!   `--seccomp-test-heap-trim` mode checks it (`tests/seccomp.rs`).
//! - A filter that cannot be installed once confinement was asked for is
//!   fatal (the process aborts with a message): running unconfined when
//!   the user asked otherwise is worse than not running.
//!
//! The per-kind lists and the reasons for each entry are in
//! `docs/DESIGN.md` ("Seccomp filters").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Errors of building or enabling the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused a rule or the filter (a bug in this module).
    #[error(
        "building the seccomp filter of the {0} threads failed: {1}; run with --no-seccomp to \
         work around it and report this"
    )]
    Build(&'static str, String),
    /// The kernel does not offer seccomp filters.
    #[error(
        "this kernel does not offer seccomp filters ({0}); run with --no-seccomp (the monitor is \
         then not confined) or use a kernel built with CONFIG_SECCOMP_FILTER"
    )]
    Unsupported(std::io::Error),
    /// [`enable`] was called twice.
    #[error("seccomp filters were already enabled in this process")]
    AlreadyEnabled,
}

/// The kinds of threads of the monitor, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// The main thread, once the VM runs: waits, API of `vmm run`, metrics,
    /// teardown: the release itself when it waits for it before the
    /// reclaim thread begins (and, through inheritance, what the reclaim
    /// thread does).
    Main = 0,
    /// A vCPU: `KVM_RUN` and its exits, including the devices a vCPU runs
    /// (serial, i8042, virtio-mmio registers, the balloon's fallback path).
    Vcpu,
    /// A virtio device thread: `poll` on ioeventfds, balloon releases.
    Device,
    /// The userfaultfd handler: fault messages, `UFFDIO_COPY/ZEROPAGE/WAKE`.
    Uffd,
    /// The reclaim thread of teardown and the release helpers it starts.
    Reclaim,
    /// The API thread (tokio, hyper) and its blocking handler threads.
    Api,
    /// The `sigwait` thread of the service (SIGTERM/SIGINT).
    Signals,
    /// The serial console's stdin reader (a Linux guest on a terminal).
    ConsoleInput,
}

impl ThreadKind {
    /// Every kind, in discriminant order.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Uffd,
        ThreadKind::Reclaim,
        ThreadKind::Api,
        ThreadKind::Signals,
        ThreadKind::ConsoleInput,
    ];

    /// The name used in messages and by `--seccomp-test-violation`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Uffd => "uffd",
            ThreadKind::Reclaim => "reclaim",
            ThreadKind::Api => "api",
            ThreadKind::Signals => "signals",
            ThreadKind::ConsoleInput => "console-input",
        }
    }

    /// Whether threads of this kind create threads once confined (main:
    /// the reclaim thread; reclaim: the release helpers; API: tokio's
    /// blocking pool).
    pub fn creates_threads(self) -> bool {
        matches!(
            self,
            ThreadKind::Main | ThreadKind::Reclaim | ThreadKind::Api
        )
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// What a filter does with a call it does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// Kill the process (`SIGSYS`): the default.
    KillProcess,
    /// Debugging aid (hidden `--seccomp-trap`): report the call on stderr
    /// (kind, number, first arguments) and fail it with `ENOSYS`.
    Trap,
}

/// The compiled filters, one per kind (index: discriminant), and the one
/// that makes `clone3` fail for the kinds that create threads.
struct Programs {
    progs: Vec<BpfProgram>,
    no_clone3: BpfProgram,
}

static PROGRAMS: OnceLock<Programs> = OnceLock::new();

/// Kind + 1 of the thread that must make a forbidden call right after its
/// filter is installed (0: none). Test mode only.
static VIOLATE: AtomicU8 = AtomicU8::new(0);

/// Test mode of the heap-trim rule: 0 off; 1: the first device thread
/// frees enough for glibc to trim its arena, after its filter; 2: the
/// same, and [`enable`] leaves trimming on (the rule broken).
static HEAP_TRIM_TEST: AtomicU8 = AtomicU8::new(0);

/// The call the test mode makes: `getpgid(0)`, harmless, and allowed by no
/// filter (a unit test checks that).
pub const FORBIDDEN_TEST_SYSCALL: i64 = libc::SYS_getpgid;

thread_local! {
    /// This thread's kind + 1 (0: none installed), for the trap report.
    static KIND: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Compiles every filter and turns confinement on for this process: from
/// now on [`install`] applies the filter of its kind to the calling
/// thread. Call once, early, from the binary.
pub fn enable(mismatch: Mismatch) -> Result<(), SeccompError> {
    // PR_GET_SECCOMP fails with EINVAL on a kernel without seccomp.
    // SAFETY: PR_GET_SECCOMP takes no pointer arguments.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
        return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
    }
    let progs = ThreadKind::ALL
        .into_iter()
        .map(|k| program(k, mismatch))
        .collect::<Result<Vec<_>, _>>()?;
    let no_clone3 = no_clone3_program()?;
    if HEAP_TRIM_TEST.load(Ordering::SeqCst) != 2 {
        no_heap_trim();
    }
    if mismatch == Mismatch::Trap {
        install_trap_handler();
    }
    PROGRAMS
        .set(Programs { progs, no_clone3 })
        .map_err(|_| SeccompError::AlreadyEnabled)
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    PROGRAMS.get().is_some()
}

/// Test mode: the first thread of `kind` makes [`FORBIDDEN_TEST_SYSCALL`]
/// right after installing its filter (with confinement off it just makes
/// it and goes on). For the tests that check the filters really kill.
#[doc(hidden)]
pub fn set_test_violation(kind: ThreadKind) {
    VIOLATE.store(kind as u8 + 1, Ordering::SeqCst);
}

/// Test mode: the first device thread, once confined, allocates and frees
/// enough heap for glibc to trim its arena (see the module documentation);
/// with `trimming_on` [`enable`] also leaves trimming on, so that the run
/// must die of `SIGSYS` (the test's proof that it would catch the bug).
/// Call before [`enable`].
#[doc(hidden)]
pub fn set_test_heap_trim(trimming_on: bool) {
    HEAP_TRIM_TEST.store(1 + u8::from(trimming_on), Ordering::SeqCst);
}

/// Turns glibc's heap trimming off for the whole process (see the module
/// documentation: trimming a thread arena opens a file the first time).
fn no_heap_trim() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt takes two integers; it only sets an allocator
        // parameter (returns 0 on failure, which leaves trimming on).
        if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) } == 0 {
            eprintln!("vmm: mallopt(M_TRIM_THRESHOLD) failed: a confined thread may die in free()");
        }
    }
}

/// The heap-trim test mode's work: 64 blocks of 64 KiB (under glibc's
/// mmap threshold, so from this thread's arena) allocated, then freed: the
/// arena's top then exceeds the default trim threshold.
fn exercise_heap_trim() {
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
    std::hint::black_box(&blocks);
    drop(blocks);
}

/// Applies the filter of `kind` to the calling thread (nothing if
/// confinement is off). Fatal if the kernel refuses it.
pub fn install(kind: ThreadKind) {
    if let Some(p) = PROGRAMS.get() {
        let first = if kind.creates_threads() {
            seccompiler::apply_filter(&p.no_clone3)
        } else {
            Ok(())
        };
        if let Err(e) = first.and_then(|()| seccompiler::apply_filter(&p.progs[kind as usize])) {
            eprintln!(
                "vmm: installing the seccomp filter of a {} thread failed ({e}); aborting \
                 (run with --no-seccomp to run unconfined)",
                kind.name()
            );
            std::process::abort();
        }
        KIND.with(|c| c.set(kind as u8 + 1));
    }
    if VIOLATE
        .compare_exchange(kind as u8 + 1, 0, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        eprintln!(
            "vmm: test mode: a {} thread makes a forbidden system call",
            kind.name()
        );
        // SAFETY: getpgid(0) takes no pointer and changes nothing.
        let _ = unsafe { libc::syscall(FORBIDDEN_TEST_SYSCALL, 0) };
    }
    if kind == ThreadKind::Device && HEAP_TRIM_TEST.swap(0, Ordering::SeqCst) != 0 {
        eprintln!("vmm: test mode: a device thread frees enough heap for glibc to trim it");
        exercise_heap_trim();
        eprintln!("vmm: test mode: the device thread's heap trim passed");
    }
}

/// The filter stacked under the allow-list of the kinds that create
/// threads: `clone3` fails with `ENOSYS` (its flags are in memory, where
/// BPF cannot check them), so glibc falls back to `clone`, whose flags the
/// allow-list checks (`CLONE_THREAD`: threads, never processes). The
/// allow-list still lists `clone3`: of two stacked filters the stricter
/// answer wins, and `ERRNO` is stricter than `ALLOW` but not than `KILL`.
pub fn no_clone3_program() -> Result<BpfProgram, SeccompError> {
    let err = |e: &dyn std::fmt::Display| SeccompError::Build("clone3", e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(&e))?;
    let mut r = Rules::new();
    allow(&mut r, &[libc::SYS_clone3]);
    let filter = SeccompFilter::new(
        r,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| err(&e))?;
    BpfProgram::try_from(filter).map_err(|e| err(&e))
}

/// The BPF program of `kind` for this architecture.
pub fn program(kind: ThreadKind, mismatch: Mismatch) -> Result<BpfProgram, SeccompError> {
    let action = match mismatch {
        Mismatch::KillProcess => SeccompAction::KillProcess,
        Mismatch::Trap => SeccompAction::Trap,
    };
    compile(kind, action)
}

/// The BPF program of `kind` with `mismatch` for what it does not allow.
fn compile(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let err = |e: &dyn std::fmt::Display| SeccompError::Build(kind.name(), e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(&e))?;
    let filter = SeccompFilter::new(
        rules(kind).map_err(|e| err(&e))?,
        mismatch,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| err(&e))?;
    BpfProgram::try_from(filter).map_err(|e| err(&e))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A condition on argument `arg` (64-bit compare).
fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, Len::Qword, op, value)
}

/// Allows `nrs` whatever their arguments.
fn allow(r: &mut Rules, nrs: &[i64]) {
    for &n in nrs {
        r.insert(n, Vec::new());
    }
}

/// Allows `nr` when `arg` equals one of `values`.
fn allow_arg(
    r: &mut Rules,
    nr: i64,
    arg: u8,
    values: &[u64],
) -> Result<(), seccompiler::BackendError> {
    allow_any(r, nr, values.iter().map(|&v| cond(arg, Op::Eq, v)))
}

/// Allows `nr` when the `int` argument `arg` (32-bit compare: the upper
/// half of the register is not the kernel's) equals one of `values`.
fn allow_int_arg(
    r: &mut Rules,
    nr: i64,
    arg: u8,
    values: &[i32],
) -> Result<(), seccompiler::BackendError> {
    allow_any(r, nr, values.iter().map(|&v| int_is(arg, v)))
}

/// Allows `nr` when any one of `conds` holds.
fn allow_any(
    r: &mut Rules,
    nr: i64,
    conds: impl Iterator<Item = Result<SeccompCondition, seccompiler::BackendError>>,
) -> Result<(), seccompiler::BackendError> {
    let e = r.entry(nr).or_default();
    for c in conds {
        e.push(SeccompRule::new(vec![c?])?);
    }
    Ok(())
}

/// `int` argument `arg` equals `v` (32-bit compare).
fn int_is(arg: u8, v: i32) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, Len::Dword, Op::Eq, u64::from(v as u32))
}

/// The `madvise` advice this process gives: releasing memory (`DONTNEED`,
/// `REMOVE` for a file's pages: the fault handler's undo), THP advice on
/// guest RAM and guest-mm's table-page pool, populating guest RAM. glibc's
/// own calls (a thread's stack at exit, trimming malloc's heaps) use
/// `DONTNEED` too.
pub const MADVISE_ADVICE: [i32; 5] = [
    libc::MADV_DONTNEED,
    libc::MADV_REMOVE,
    libc::MADV_HUGEPAGE,
    libc::MADV_NOHUGEPAGE,
    libc::MADV_POPULATE_WRITE,
];

/// The only `fallocate` mode: punching a hole without changing the size.
pub const FALLOCATE_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// Allows `ioctl` with these request numbers.
fn allow_ioctls(r: &mut Rules, reqs: &[u64]) -> Result<(), seccompiler::BackendError> {
    // The request is an unsigned int in the kernel: compare 32 bits.
    let e = r.entry(libc::SYS_ioctl).or_default();
    for &v in reqs {
        e.push(SeccompRule::new(vec![SeccompCondition::new(
            1,
            Len::Dword,
            Op::Eq,
            v,
        )?])?);
    }
    Ok(())
}

/// ioctl request numbers (`_IOC(dir, type, nr, size)`).
pub mod ioctls {
    use kvm_bindings::{
        kvm_ioeventfd, kvm_irqfd, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    };

    const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
    }
    const NONE: u64 = 0;
    const W: u64 = 1;
    const R: u64 = 2;
    const KVMIO: u64 = 0xAE;
    const UFFDIO: u64 = 0xAA;

    /// `KVM_RUN`.
    pub const KVM_RUN: u64 = ioc(NONE, KVMIO, 0x80, 0);
    /// `KVM_GET_REGS`.
    pub const KVM_GET_REGS: u64 = ioc(R, KVMIO, 0x81, size_of::<kvm_regs>());
    /// `KVM_SET_REGS`.
    pub const KVM_SET_REGS: u64 = ioc(W, KVMIO, 0x82, size_of::<kvm_regs>());
    /// `KVM_GET_SREGS`.
    pub const KVM_GET_SREGS: u64 = ioc(R, KVMIO, 0x83, size_of::<kvm_sregs>());
    /// `KVM_GET_TSC_KHZ`.
    pub const KVM_GET_TSC_KHZ: u64 = ioc(NONE, KVMIO, 0xa3, 0);
    /// `KVM_SET_USER_MEMORY_REGION`.
    pub const KVM_SET_USER_MEMORY_REGION: u64 =
        ioc(W, KVMIO, 0x46, size_of::<kvm_userspace_memory_region>());
    /// `KVM_IRQFD`.
    pub const KVM_IRQFD: u64 = ioc(W, KVMIO, 0x76, size_of::<kvm_irqfd>());
    /// `KVM_IOEVENTFD`.
    pub const KVM_IOEVENTFD: u64 = ioc(W, KVMIO, 0x79, size_of::<kvm_ioeventfd>());
    /// `UFFDIO_REGISTER` (`struct uffdio_register`: 32 bytes).
    pub const UFFDIO_REGISTER: u64 = ioc(R | W, UFFDIO, 0x00, 32);
    /// `UFFDIO_UNREGISTER` (`struct uffdio_range`: 16 bytes).
    pub const UFFDIO_UNREGISTER: u64 = ioc(R, UFFDIO, 0x01, 16);
    /// `UFFDIO_WAKE`.
    pub const UFFDIO_WAKE: u64 = ioc(R, UFFDIO, 0x02, 16);
    /// `UFFDIO_COPY` (`struct uffdio_copy`: 40 bytes).
    pub const UFFDIO_COPY: u64 = ioc(R | W, UFFDIO, 0x03, 40);
    /// `UFFDIO_ZEROPAGE` (`struct uffdio_zeropage`: 32 bytes).
    pub const UFFDIO_ZEROPAGE: u64 = ioc(R | W, UFFDIO, 0x04, 32);
}

/// What every Rust thread of this process does once running: memory
/// (allocator), locks, signals (the vCPU kick, thread exit), time, stderr.
fn base(r: &mut Rules) -> Result<(), seccompiler::BackendError> {
    use libc::*;
    allow(
        r,
        &[
            SYS_brk,
            SYS_munmap,
            SYS_mremap,
            SYS_futex,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_restart_syscall,
            SYS_exit,
            SYS_gettid,
            SYS_getpid,
            SYS_sched_yield,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_getrandom,
            SYS_write,
            SYS_close,
        ],
    );
    // No executable memory.
    for nr in [SYS_mmap, SYS_mprotect] {
        r.insert(
            nr,
            vec![SeccompRule::new(vec![cond(
                2,
                Op::MaskedEq(PROT_EXEC as u64),
                0,
            )?])?],
        );
    }
    allow_int_arg(r, SYS_madvise, 2, &MADVISE_ADVICE)?;
    // Signals only to this process's own threads (the vCPU kick, abort).
    let pid = u64::from(std::process::id());
    r.insert(
        SYS_tgkill,
        vec![SeccompRule::new(vec![cond(0, Op::Eq, pid)?])?],
    );
    // Reading an fd's flags only. Debug builds check with them: std that
    // an fd being closed is open (`F_GETFD`, e.g. when a vCPU drops its
    // `VcpuFd`), tokio that a listener it adopts is non-blocking
    // (`F_GETFL`).
    allow_arg(r, SYS_fcntl, 1, &[F_GETFD as u64, F_GETFL as u64])?;
    Ok(())
}

/// What a thread needs to start threads, and what those threads do before
/// they install their own filter.
fn spawner(r: &mut Rules) -> Result<(), seccompiler::BackendError> {
    use libc::*;
    // clone3 is made to fail with ENOSYS by a filter stacked under this
    // one (`no_clone3_program`); glibc then uses clone.
    allow(
        r,
        &[
            SYS_clone3,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_sched_getaffinity,
        ],
    );
    r.insert(
        SYS_clone,
        vec![SeccompRule::new(vec![cond(
            0,
            Op::MaskedEq(CLONE_THREAD as u64),
            CLONE_THREAD as u64,
        )?])?],
    );
    // The children name themselves and install their own filter (which
    // can only narrow this one).
    allow_arg(
        r,
        SYS_prctl,
        0,
        &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64],
    )?;
    allow_arg(r, SYS_seccomp, 0, &[u64::from(SECCOMP_SET_MODE_FILTER)])?;
    Ok(())
}

/// Releasing guest memory (a gather's flush): `madvise` (base),
/// `process_madvise` batches (`MADV_DONTNEED` on this process only, no
/// flags), punch-hole for file backings, arming demand faults on the
/// userfaultfd first.
fn releaser(r: &mut Rules) -> Result<(), seccompiler::BackendError> {
    r.insert(
        libc::SYS_process_madvise,
        vec![SeccompRule::new(vec![
            int_is(0, guest_mm::backing::PIDFD_SELF)?,
            int_is(3, libc::MADV_DONTNEED)?,
            int_is(4, 0)?,
        ])?],
    );
    punch_hole(r)?;
    allow_ioctls(r, &[ioctls::UFFDIO_REGISTER])?;
    Ok(())
}

/// `fallocate` that punches a hole ([`FALLOCATE_MODE`]) and nothing else.
fn punch_hole(r: &mut Rules) -> Result<(), seccompiler::BackendError> {
    allow_int_arg(r, libc::SYS_fallocate, 1, &[FALLOCATE_MODE])
}

/// Reads files without being able to write or create any (`/proc`,
/// cgroup limits for `available_parallelism`).
fn read_only_files(r: &mut Rules) -> Result<(), seccompiler::BackendError> {
    use libc::*;
    let writeish = (O_ACCMODE | O_CREAT | O_TRUNC) as u64;
    r.insert(
        SYS_openat,
        vec![SeccompRule::new(vec![cond(2, Op::MaskedEq(writeish), 0)?])?],
    );
    allow(
        r,
        &[SYS_read, SYS_lseek, SYS_statx, SYS_newfstatat, SYS_fstat],
    );
    Ok(())
}

/// The rules of `kind`.
fn rules(kind: ThreadKind) -> Result<Rules, seccompiler::BackendError> {
    use libc::*;
    let mut r = Rules::new();
    base(&mut r)?;
    match kind {
        ThreadKind::Vcpu => {
            allow_ioctls(
                &mut r,
                &[
                    ioctls::KVM_RUN,
                    ioctls::KVM_GET_REGS,
                    ioctls::KVM_GET_SREGS,
                    ioctls::KVM_GET_TSC_KHZ,
                ],
            )?;
            // Devices run on the vCPU: eventfd reads/writes (irqfd), the
            // balloon's fallback path releases memory.
            allow(&mut r, &[SYS_read]);
            releaser(&mut r)?;
        }
        ThreadKind::Device => {
            allow(&mut r, &[SYS_poll, SYS_ppoll, SYS_read]);
            releaser(&mut r)?;
            // SCHED_BATCH for itself only.
            allow_arg(&mut r, SYS_sched_setscheduler, 0, &[0])?;
        }
        ThreadKind::Uffd => {
            allow(&mut r, &[SYS_poll, SYS_ppoll, SYS_read]);
            punch_hole(&mut r)?;
            allow_ioctls(
                &mut r,
                &[
                    ioctls::UFFDIO_COPY,
                    ioctls::UFFDIO_ZEROPAGE,
                    ioctls::UFFDIO_WAKE,
                ],
            )?;
        }
        ThreadKind::Reclaim => {
            spawner(&mut r)?;
            releaser(&mut r)?;
            read_only_files(&mut r)?;
            allow_ioctls(&mut r, &[ioctls::UFFDIO_UNREGISTER])?;
            // guest-mm's release helpers (children of this thread) make
            // themselves SCHED_IDLE, and the releasing thread raises a
            // helper still busy at the end back to its own policy: a
            // thread id of this process, which BPF cannot check. A helper
            // that starts on the releasing thread's CPU moves itself to
            // another one (its own affinity only; `sched_getcpu` is a
            // vDSO call, or `getcpu` where there is none).
            allow(
                &mut r,
                &[SYS_sched_setscheduler, SYS_sched_getscheduler, SYS_getcpu],
            );
            allow_int_arg(&mut r, SYS_sched_setaffinity, 0, &[0])?;
        }
        ThreadKind::Main => {
            // What the reclaim thread (its child) needs, and teardown.
            spawner(&mut r)?;
            releaser(&mut r)?;
            allow_ioctls(&mut r, &[ioctls::UFFDIO_UNREGISTER])?;
            allow(
                &mut r,
                &[SYS_sched_setscheduler, SYS_sched_getscheduler, SYS_getcpu],
            );
            allow_int_arg(&mut r, SYS_sched_setaffinity, 0, &[0])?;
            // Metrics and log files (append), /proc, the API socket's
            // removal.
            allow(
                &mut r,
                &[
                    SYS_openat,
                    SYS_read,
                    SYS_lseek,
                    SYS_statx,
                    SYS_newfstatat,
                    SYS_fstat,
                    SYS_unlink,
                    SYS_mincore,
                    SYS_poll,
                    SYS_exit_group,
                    SYS_sched_getaffinity,
                ],
            );
        }
        ThreadKind::Api => {
            // tokio's blocking pool.
            spawner(&mut r)?;
            allow(
                &mut r,
                &[
                    SYS_epoll_wait,
                    SYS_epoll_pwait,
                    SYS_epoll_ctl,
                    SYS_accept4,
                    SYS_read,
                    SYS_recvfrom,
                    SYS_writev,
                    SYS_sendto,
                    SYS_shutdown,
                    // Handlers: kernel/initrd checks, metrics and log
                    // files, memory reports.
                    SYS_openat,
                    SYS_statx,
                    SYS_newfstatat,
                    SYS_fstat,
                    SYS_lseek,
                    SYS_mincore,
                ],
            );
        }
        ThreadKind::Signals => {
            allow(&mut r, &[SYS_rt_sigtimedwait]);
        }
        ThreadKind::ConsoleInput => {
            allow(&mut r, &[SYS_read]);
        }
    }
    Ok(r)
}

/// Debugging aid: reports a trapped call and fails it with `ENOSYS`.
fn install_trap_handler() {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo and ucontext to an
        // SA_SIGINFO handler. For SIGSYS the system call number is the int
        // at offset 24 of siginfo (`_sigsys._syscall`, after the 16-byte
        // header and the 8-byte call address).
        let (nr, a0, a1, a2) = unsafe {
            let nr = *info.cast::<u8>().add(24).cast::<i32>();
            let uc = &mut *ctx.cast::<libc::ucontext_t>();
            let g = &mut uc.uc_mcontext.gregs;
            let args = (
                g[libc::REG_RDI as usize],
                g[libc::REG_RSI as usize],
                g[libc::REG_RDX as usize],
            );
            g[libc::REG_RAX as usize] = -i64::from(libc::ENOSYS);
            (nr, args.0, args.1, args.2)
        };
        let kind = KIND.with(std::cell::Cell::get);
        let name = kind
            .checked_sub(1)
            .and_then(|k| ThreadKind::ALL.get(usize::from(k)))
            .map_or("(inherited filter)", |k| k.name());
        let mut buf = [0u8; 160];
        let mut w = Fmt {
            buf: &mut buf,
            len: 0,
        };
        w.s("vmm: seccomp trap: ");
        w.s(name);
        w.s(" thread: syscall ");
        w.n(nr as u64);
        w.s(" args 0x");
        w.x(a0 as u64);
        w.s(" 0x");
        w.x(a1 as u64);
        w.s(" 0x");
        w.x(a2 as u64);
        w.s("\n");
        // SAFETY: writes `len` initialized bytes of a live buffer to stderr.
        let _ = unsafe { libc::write(2, w.buf.as_ptr().cast(), w.len) };
    }
    // SAFETY: a zeroed sigaction is valid; the handler only reads its
    // arguments, writes the saved RAX and calls write(2), which are
    // async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

/// A formatter into a fixed buffer (no allocation: used in a signal
/// handler).
struct Fmt<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Fmt<'_> {
    fn s(&mut self, s: &str) {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn digits(&mut self, mut v: u64, base: u64) {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b"0123456789abcdef"[(v % base) as usize];
            v /= base;
            if v == 0 {
                break;
            }
        }
        for &b in &tmp[i..] {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn n(&mut self, v: u64) {
        self.digits(v, 10);
    }
    fn x(&mut self, v: u64) {
        self.digits(v, 16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_for_x86_64() {
        for k in ThreadKind::ALL {
            let f = SeccompFilter::new(
                rules(k).unwrap(),
                SeccompAction::KillProcess,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            let p = BpfProgram::try_from(f).unwrap();
            assert!(!p.is_empty(), "{k:?}");
            // The kernel's limit is 4096 instructions.
            assert!(p.len() < 4096, "{k:?}: {} instructions", p.len());
            assert!(program(k, Mismatch::Trap).is_ok());
            // A kind that creates threads allows clone3 (turned into ENOSYS
            // by the stacked filter) and clone; the others neither.
            let r = rules(k).unwrap();
            for nr in [libc::SYS_clone3, libc::SYS_clone] {
                assert_eq!(r.contains_key(&nr), k.creates_threads(), "{k:?} {nr}");
            }
        }
        assert!(!no_clone3_program().unwrap().is_empty());
    }

    #[test]
    fn the_test_syscall_and_exec_are_forbidden_everywhere() {
        for k in ThreadKind::ALL {
            let r = rules(k).unwrap();
            for nr in [
                FORBIDDEN_TEST_SYSCALL,
                libc::SYS_execve,
                libc::SYS_fork,
                libc::SYS_ptrace,
                libc::SYS_socket,
            ] {
                assert!(!r.contains_key(&nr), "{k:?} allows {nr}");
            }
        }
    }

    /// Runs `f` in a new thread confined by `kind`'s rules, with `EPERM`
    /// instead of a kill for what they do not allow.
    fn confined<T: Send>(kind: ThreadKind, f: impl FnOnce() -> T + Send) -> T {
        let p = compile(kind, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                seccompiler::apply_filter(&p).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// The errno of a failed call, 0 for success.
    fn errno_of(rc: i64) -> i32 {
        if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    #[test]
    fn memory_calls_are_allowed_only_with_the_arguments_the_monitor_uses() {
        const LEN: usize = 2 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        let addr = mem as usize;
        // SAFETY: creates a file descriptor owned below.
        let fd = unsafe { libc::memfd_create(c"seccomp-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: sizes the memfd just created.
        assert_eq!(unsafe { libc::ftruncate(fd, LEN as i64) }, 0);
        // SAFETY: pidfd_open of this process takes no pointers.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) } as i32;
        for kind in [
            ThreadKind::Reclaim,
            ThreadKind::Vcpu,
            ThreadKind::Device,
            ThreadKind::Uffd,
            ThreadKind::Signals,
        ] {
            let releases = !matches!(kind, ThreadKind::Uffd | ThreadKind::Signals);
            let punches = kind != ThreadKind::Signals;
            let got = confined(kind, || {
                let madvise = |advice: i32| {
                    // SAFETY: advice on the test's own mapping; the
                    // allowed ones only drop or advise its contents.
                    errno_of(unsafe { libc::madvise(addr as *mut _, LEN, advice) }.into())
                };
                let iov = libc::iovec {
                    iov_base: addr as *mut _,
                    iov_len: LEN,
                };
                let process_madvise = |pidfd: i32, advice: i32| {
                    // SAFETY: one iovec of the test's own mapping.
                    errno_of(unsafe {
                        libc::syscall(libc::SYS_process_madvise, pidfd, &iov, 1, advice, 0)
                    })
                };
                let fallocate = |mode: i32| {
                    // SAFETY: the test's own memfd.
                    errno_of(unsafe { libc::fallocate(fd, mode, 0, 4096) }.into())
                };
                [
                    madvise(libc::MADV_DONTNEED),
                    madvise(libc::MADV_HUGEPAGE),
                    madvise(libc::MADV_FREE),
                    madvise(libc::MADV_DONTFORK),
                    madvise(libc::MADV_DONTNEED | (1 << 8)),
                    process_madvise(guest_mm::backing::PIDFD_SELF, libc::MADV_DONTNEED),
                    process_madvise(guest_mm::backing::PIDFD_SELF, libc::MADV_COLD),
                    process_madvise(pidfd, libc::MADV_DONTNEED),
                    fallocate(FALLOCATE_MODE),
                    fallocate(0),
                    fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
                ]
            });
            let eperm = libc::EPERM;
            let [dontneed, huge, free, dontfork, bad, pm_self, pm_cold, pm_other, punch, grow, zero] =
                got;
            assert_eq!(
                (dontneed, huge),
                (0, 0),
                "{kind:?}: the advice the monitor gives"
            );
            assert_eq!(
                (free, dontfork, bad),
                (eperm, eperm, eperm),
                "{kind:?}: other advice"
            );
            // The kernel may refuse PIDFD_SELF (before 6.14): not EPERM.
            assert_eq!(
                pm_self == eperm,
                !releases,
                "{kind:?}: batched release ({pm_self})"
            );
            assert_eq!(
                (pm_cold, pm_other),
                (eperm, eperm),
                "{kind:?}: other process_madvise"
            );
            assert_eq!(punch == 0, punches, "{kind:?}: punch-hole ({punch})");
            assert_eq!(
                (grow, zero),
                (eperm, eperm),
                "{kind:?}: other fallocate modes"
            );
        }
        // SAFETY: closes the fds and unmaps the mapping made above.
        unsafe {
            libc::close(pidfd);
            libc::close(fd);
            libc::munmap(mem, LEN);
        }
    }

    #[test]
    fn only_release_helpers_set_an_affinity_and_only_their_own() {
        // SAFETY: gettid has no preconditions.
        let other = unsafe { libc::gettid() };
        for kind in ThreadKind::ALL {
            let (own, others) = confined(kind, || {
                // SAFETY: an all-zero cpu_set_t is a valid empty set.
                let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                let size = std::mem::size_of_val(&set);
                // SAFETY: reads this thread's affinity into `set`, then sets
                // it (unchanged) on this thread and on the test's thread.
                unsafe {
                    libc::sched_getaffinity(0, size, &mut set);
                    (
                        errno_of(libc::sched_setaffinity(0, size, &set).into()),
                        errno_of(libc::sched_setaffinity(other, size, &set).into()),
                    )
                }
            });
            let allowed = matches!(kind, ThreadKind::Reclaim | ThreadKind::Main);
            assert_eq!(own == 0, allowed, "{kind:?}: own affinity ({own})");
            assert_eq!(others, libc::EPERM, "{kind:?}: another thread's affinity");
        }
    }

    #[test]
    fn names_round_trip() {
        for (i, k) in ThreadKind::ALL.into_iter().enumerate() {
            assert_eq!(k as usize, i);
            assert_eq!(ThreadKind::from_name(k.name()), Some(k));
        }
        assert_eq!(ThreadKind::from_name("nope"), None);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> and <linux/userfaultfd.h> on x86-64.
        assert_eq!(ioctls::KVM_RUN, 0xae80);
        assert_eq!(ioctls::KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(ioctls::KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(ioctls::KVM_IRQFD, 0x4020_ae76);
        assert_eq!(ioctls::KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(ioctls::UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(ioctls::UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(ioctls::UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(ioctls::UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(ioctls::UFFDIO_ZEROPAGE, 0xc020_aa04);
    }
}
