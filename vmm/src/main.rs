//! `vmm`: command-line front end. `vmm run` boots the embedded default guest,
//! waits for it to verify its memory, tears the VM down and reports timings
//! (human-readable, or one JSON object as the last stdout line with --json).
//!
//! With `--balloon-target SIZE` the VM gets a virtio-balloon and vCPU 0 runs
//! the guest's balloon driver: once the guest has verified its RAM, the
//! target is set, and the run measures how long the guest took to inflate
//! to it and what the process's RSS was before and after.

use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::guest::balloon::DriverState;
use vmm::proc_stats;
use vmm::{Backing, Console, MemSize, PageSize, Vm, VmConfig, Workload};

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

#[derive(Parser)]
#[command(
    name = "vmm",
    about = "KVM microVM monitor",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Serve Firecracker's API on this Unix socket (created owner-only; it
    /// must not exist): the monitor starts with no VM, in state
    /// `Not started`, and runs until the VM it starts ends.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<std::path::PathBuf>,
    /// Boot at once from a JSON file in Firecracker's format
    /// (`boot-source`, `machine-config`, `balloon`, `metrics`, `logger`).
    #[arg(long, value_name = "FILE")]
    config_file: Option<std::path::PathBuf>,
    /// Instance ID (`GET /`).
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Populate all guest RAM host-side before the vCPUs start (for
    /// benchmarks of a populated guest's teardown).
    #[arg(long)]
    populate: bool,
    /// What guest RAM is made of: anon, memfd (shared file memory) or
    /// guest-memfd (a KVM guest_memfd, Linux 6.18+). Firecracker's
    /// `huge_pages` then picks only the leaf size (`None`: 4 KiB,
    /// `Transparent`: 2 MiB; "2M", hugetlbfs, is refused). Without it
    /// `huge_pages` decides, as in Firecracker.
    #[arg(long, value_name = "KIND", value_parser = ["anon", "memfd", "guest-memfd"])]
    backing: Option<String>,
    #[command(flatten)]
    confine: Confine,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// Confinement options (`vmm` and `vmm run`).
#[derive(clap::Args, Clone, Default)]
struct Confine {
    /// Run without the per-thread seccomp filters (debugging only: by
    /// default every thread may make only the system calls its kind needs,
    /// and any other call kills the process with SIGSYS).
    #[arg(long)]
    no_seccomp: bool,
    /// If the API socket path exists and is a socket (left by a monitor
    /// that died), remove it and listen there; without it an existing path
    /// is refused.
    #[arg(long)]
    replace_api_sock: bool,
    /// Debugging: report a forbidden system call on stderr and fail it with
    /// ENOSYS instead of killing the process.
    #[arg(long, hide = true, conflicts_with = "no_seccomp")]
    seccomp_trap: bool,
    /// Test mode: the first thread of this kind (main, vcpu, device, uffd,
    /// reclaim, api, signals, console-input) makes a forbidden system call
    /// right after installing its filter.
    #[arg(long, hide = true, value_name = "KIND")]
    seccomp_test_violation: Option<String>,
    /// Test mode: the first device thread frees enough heap for glibc to
    /// trim it, once confined; `trimming-on` also leaves glibc's heap
    /// trimming on (the fix undone: the run must die of SIGSYS).
    #[arg(long, hide = true, value_name = "MODE", value_parser = ["trimming-off", "trimming-on"])]
    seccomp_test_heap_trim: Option<String>,
}

impl Confine {
    /// Turns the filters on (unless --no-seccomp) and arms the test mode.
    fn apply(&self) -> anyhow::Result<()> {
        use vmm::seccomp::{self, Mismatch, ThreadKind};
        if let Some(k) = &self.seccomp_test_violation {
            let kind = ThreadKind::from_name(k).with_context(|| {
                format!(
                    "--seccomp-test-violation {k:?}: not a thread kind (main, vcpu, device, \
                     uffd, reclaim, api, signals, console-input)"
                )
            })?;
            seccomp::set_test_violation(kind);
        }
        if let Some(m) = &self.seccomp_test_heap_trim {
            seccomp::set_test_heap_trim(m == "trimming-on");
        }
        if self.no_seccomp {
            return Ok(());
        }
        let mismatch = if self.seccomp_trap {
            Mismatch::Trap
        } else {
            Mismatch::KillProcess
        };
        seccomp::enable(mismatch)?;
        Ok(())
    }
}

/// Starts the API server on `path`: an existing socket there is removed
/// first with `replace` (anything else that exists is refused, by the
/// server without `replace`).
fn start_api_server(
    path: &std::path::Path,
    replace: bool,
    handler: Arc<dyn vmm::api::server::Handler>,
) -> anyhow::Result<vmm::api::server::ApiServer> {
    use std::os::unix::fs::FileTypeExt;
    if replace {
        if let Ok(m) = path.symlink_metadata() {
            if !m.file_type().is_socket() {
                anyhow::bail!(
                    "--replace-api-sock: {} exists and is not a socket: refusing to remove it; \
                     choose another path",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the old API socket {}", path.display()))?;
        }
    }
    Ok(vmm::api::server::ApiServer::start(path, handler)?)
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the embedded default guest, let it verify its RAM, tear down;
    /// or, with --kernel, boot a Linux kernel until it reboots.
    Run(Box<RunArgs>),
    /// Talk to a running `vmm run --api-sock PATH`.
    Ctl(CtlArgs),
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The VMM's API socket.
    #[arg(long)]
    api_sock: std::path::PathBuf,
    /// `balloon set SIZE`, `balloon get`, `balloon stats`, `pause`,
    /// `resume`, `shutdown` or `status`.
    #[arg(required = true, num_args = 1..=3)]
    words: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest RAM size, e.g. 256M, 1G (a multiple of 2M).
    #[arg(long, default_value = "256M")]
    mem: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// RAM backing: anon, memfd, hugetlb or guest-memfd (a KVM guest_memfd,
    /// host-mapped and shared; Linux 6.18+).
    #[arg(long, default_value = "anon")]
    backing: String,
    /// Leaf size: 4K or 2M.
    #[arg(long, default_value = "2M")]
    page_size: String,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// After the guest verified its RAM, release this many MiB at the start
    /// of vCPU 0's share and have the guest read one page per leaf back
    /// (each read is a demand fault; all must read zeros).
    #[arg(long, default_value_t = 0)]
    release_mib: u64,
    /// Attach a virtio-balloon and, once the guest verified its RAM, have
    /// the guest's driver (vCPU 0) inflate it to SIZE (e.g. 128M; a multiple
    /// of 4K, at most vCPU 0's share of RAM).
    #[arg(long, value_name = "SIZE")]
    balloon_target: Option<String>,
    /// Serve the control API (Firecracker-style HTTP over this Unix socket;
    /// see `vmm ctl`) and run until it is told to shut down. Attaches a
    /// balloon whose guest driver (vCPU 0) follows the target.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<std::path::PathBuf>,
    /// Give up on the guest after this many seconds (default 60; no limit
    /// for a Linux guest).
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Boot this Linux kernel (x86-64 ELF vmlinux with a PVH note, or a
    /// bzImage) instead of the embedded guest; the VM ends when the guest
    /// reboots (exit status 0).
    #[arg(long, value_name = "PATH")]
    kernel: Option<std::path::PathBuf>,
    /// An initramfs for --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<std::path::PathBuf>,
    /// The kernel command line for --kernel (default: the one this host
    /// needs, see `../shared/linux-guest/README.md`); the monitor appends
    /// `virtio_mmio.device=` for its devices.
    #[arg(long, value_name = "STR", requires = "kernel")]
    cmdline: Option<String>,
    /// With --kernel: attach a virtio-balloon (virtio-mmio, announced on
    /// the command line).
    #[arg(long, requires = "kernel")]
    balloon: bool,
    /// Populate all guest RAM host-side (`MADV_POPULATE_WRITE`) before the
    /// vCPUs start. With `--api-sock`, the vCPUs are then held paused (like
    /// QEMU's `-S`) and a shutdown request stops them at once instead of
    /// letting the guest finish: the teardown of a fully populated, idle
    /// VM (`gmm bench teardown` times it from outside).
    #[arg(long)]
    populate: bool,
    #[command(flatten)]
    confine: Confine,
}

/// The `--json` object (also the source of the human summary).
#[derive(serde::Serialize)]
struct Summary {
    /// Every vCPU finished and verified its share (and, with --release-mib,
    /// every released leaf read back as zeros).
    guest_ok: bool,
    vcpus: u32,
    mem_bytes: u64,
    backing: String,
    page_size: String,
    /// From `main()` entry to the first guest report (a vCPU reached ring 3).
    boot_ms: Option<f64>,
    /// From starting the vCPUs until all finished.
    run_ms: f64,
    /// The `Vm::destroy` call (stop and join vCPUs, hand off reclamation).
    teardown_ms: f64,
    /// From `Vm::destroy` until guest RAM was unmapped.
    reclaim_ms: f64,
    /// From destroy until the whole-VM gather had released guest RAM (the
    /// memory is back; the VM and address space go after), ms.
    memory_back_ms: f64,
    /// `VmHWM` before teardown.
    rss_peak_bytes: u64,
    /// `VmRSS` after reclamation.
    rss_after_teardown_bytes: u64,
    /// `VmRSS` before the VM was created.
    rss_before_bytes: u64,
    /// Demand faults resolved by the userfaultfd handler.
    faults: u64,
    /// Handler-side latency (message read to wake-up).
    fault_mean_latency_us: f64,
    fault_max_latency_us: f64,
    released_bytes: u64,
    released_leaves_read_zero: u64,
    /// Guest-side time to read a released page (TSC), fault included.
    guest_fault_read_mean_us: f64,
    guest_fault_read_max_us: f64,
    pages_verified: u64,
    /// `--balloon-target` in bytes (0 without).
    balloon_target_bytes: u64,
    /// Bytes in the balloon when the driver reached the target (the
    /// driver's `actual`).
    balloon_inflated_bytes: u64,
    /// From setting the target until the guest's driver reported `actual`
    /// equal to it (guest notices, fills PFN arrays, device unmaps).
    balloon_inflate_ms: f64,
    /// Device-side time of the inflate requests (validate, gather, release).
    balloon_device_inflate_ms: f64,
    /// Backing the device's gathers released.
    balloon_released_bytes: u64,
    /// `VmRSS` just before the target was set.
    rss_before_inflate_bytes: u64,
    /// `VmRSS` once the guest reached the target.
    rss_after_inflate_bytes: u64,
    /// Guest RAM resident in host memory just before the target was set
    /// (`mincore` over the guest RAM mappings: for a file backing, the
    /// file's pages, whoever maps them). The measure for guest-memfd, whose
    /// guest pages KVM takes from the file without mapping them in this
    /// process (they are not in `VmRSS`).
    guest_resident_before_inflate_bytes: u64,
    /// Guest RAM resident once the guest reached the target.
    guest_resident_after_inflate_bytes: u64,
    /// Guest errors counted by the balloon device and its transport.
    balloon_device_errors: u64,
    /// What stopped the guest's balloon driver, if anything.
    balloon_driver_error: Option<String>,
    /// Stage-2 table bytes while the guest ran (table pages × 4 KiB).
    stage2_table_bytes: u64,
    /// Longest stage-2 table-lock hold over the VM's life, µs.
    stage2_max_lock_hold_us: f64,
    /// Stage-2 invalidations (flushes) seen by the KVM-side subscriber.
    stage2_invalidations: u64,
    /// The whole-VM gather in teardown: zap + invalidate + release, ms.
    stage2_teardown_gather_ms: f64,
    /// Bytes the teardown gather released.
    stage2_teardown_released_bytes: u64,
    outcomes: Vec<vmm::vstate::vcpu::VcpuOutcome>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What `--release-mib` did.
#[derive(Default)]
struct ReleaseRun {
    bytes: u64,
    zero_leaves: u64,
    ok: bool,
    /// Guest-measured time to read one released 4 KiB page (demand fault
    /// included), sum and max in ns.
    read_ns_total: u64,
    read_ns_max: u64,
}

/// Releases `mib` MiB at the start of vCPU 0's share once the guest has
/// verified it, then has the guest read the first page of every leaf.
fn release_and_read_back(vm: &mut Vm, mib: u64, timeout: Duration) -> anyhow::Result<ReleaseRun> {
    if !vm.wait_results(timeout) {
        return Ok(ReleaseRun::default());
    }
    let leaf = vm.config().page_size.bytes();
    let (start, end) = vmm::guest::share(vm.config().mem.bytes(), vm.config().vcpus, 0);
    let len = (mib << 20).min(end - start) / leaf * leaf;
    vm.release_range(start, len)
        .context("releasing guest RAM")?;
    let mut r = ReleaseRun {
        bytes: len,
        ..ReleaseRun::default()
    };
    let mut gpa = start;
    while gpa < start + len {
        match vm.probe(gpa, timeout)? {
            Some(p) if p.or_words == 0 => {
                r.zero_leaves += 1;
                r.read_ns_total += p.read_ns;
                r.read_ns_max = r.read_ns_max.max(p.read_ns);
            }
            _ => break,
        }
        gpa += leaf;
    }
    vm.finish_probes()?;
    r.ok = r.zero_leaves == len / leaf;
    Ok(r)
}

/// What `--balloon-target` did.
#[derive(Default)]
struct BalloonRun {
    ok: bool,
    inflated_bytes: u64,
    inflate_ms: f64,
    device_inflate_ms: f64,
    released_bytes: u64,
    rss_before: u64,
    rss_after: u64,
    resident_before: u64,
    resident_after: u64,
    device_errors: u64,
    driver_error: Option<String>,
}

/// Parses a balloon size: bytes with an optional K/M/G suffix, a non-zero
/// multiple of 4 KiB.
fn parse_balloon_target(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (digits, shift) = match t.as_bytes().last() {
        Some(b'K' | b'k') => (&t[..t.len() - 1], 10),
        Some(b'M' | b'm') => (&t[..t.len() - 1], 20),
        Some(b'G' | b'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| {
            anyhow::anyhow!("--balloon-target {s:?} is not a size: use e.g. 512K, 128M or 1G")
        })?;
    if bytes == 0 || !bytes.is_multiple_of(4096) {
        anyhow::bail!("--balloon-target {s:?}: the balloon takes whole 4 KiB pages, at least one");
    }
    Ok(bytes)
}

/// Once the guest verified its RAM, sets the balloon target to `bytes` and
/// waits for the guest's driver to reach it; then tells vCPU 0 to finish.
fn inflate_to_target(vm: &mut Vm, bytes: u64, timeout: Duration) -> anyhow::Result<BalloonRun> {
    let mut r = BalloonRun::default();
    if !vm.wait_results(timeout) {
        return Ok(r);
    }
    let (st, running) = vm
        .wait_balloon_driver(timeout, |s| s.state == DriverState::Running)
        .context("reading the guest's balloon driver status")?;
    let dev = Arc::clone(vm.balloon().context("the VM has no balloon")?);
    if running {
        let pages = bytes / 4096;
        r.rss_before = proc_stats::rss().rss;
        r.resident_before = vm.memory().resident_bytes();
        let t = Instant::now();
        vm.set_balloon_target(u32::try_from(pages).context("balloon target too large")?)?;
        let (st, reached) = vm
            .wait_balloon_driver(timeout, |s| s.pages == pages)
            .context("reading the guest's balloon driver status")?;
        r.inflate_ms = ms(t.elapsed());
        r.rss_after = proc_stats::rss().rss;
        r.resident_after = vm.memory().resident_bytes();
        r.inflated_bytes = st.pages * 4096;
        r.driver_error = st.error.map(|e| e.to_string());
        r.ok = reached;
        if !reached && r.driver_error.is_none() {
            r.driver_error = Some(format!(
                "the guest's balloon driver did not reach {pages} pages (at {} pages, state {:?})",
                st.pages, st.state
            ));
        }
    } else {
        r.driver_error = Some(st.error.map_or_else(
            || {
                format!(
                    "the guest's balloon driver did not start (state {:?})",
                    st.state
                )
            },
            |e| e.to_string(),
        ));
    }
    let c = dev.counters();
    r.device_inflate_ms = c.inflate_ns_total as f64 / 1e6;
    r.released_bytes = c.bytes_released;
    r.device_errors = c.errors + dev.lock().errors();
    // CMD_EXIT: vCPU 0 leaves the driver loop and reports done.
    vm.finish_probes()
        .context("posting the exit command to the guest")?;
    Ok(r)
}

/// The `--json` object of a Linux run.
#[derive(serde::Serialize)]
struct LinuxSummary {
    /// "linux".
    boot: &'static str,
    /// The guest ended by asking for it (reset, power off).
    guest_ok: bool,
    vcpus: u32,
    mem_bytes: u64,
    backing: String,
    kernel: String,
    cmdline: String,
    /// From process start to just before vCPU 0's first `KVM_RUN`.
    monitor_setup_ms: Option<f64>,
    /// From starting the vCPUs until the guest ended.
    run_ms: f64,
    /// What ended the VM: "reset", "power-off", "triple-fault", "timeout", or
    /// the error.
    exit_reason: String,
    teardown_ms: f64,
    reclaim_ms: f64,
    memory_back_ms: f64,
    rss_peak_bytes: u64,
    rss_after_teardown_bytes: u64,
    outcomes: Vec<vmm::vstate::vcpu::VcpuOutcome>,
}

fn exit_reason(o: Option<&vmm::vstate::vcpu::VcpuOutcome>) -> String {
    use vmm::vstate::vcpu::VcpuOutcome;
    match o {
        None => "timeout".into(),
        Some(VcpuOutcome::Reset) => "reset".into(),
        Some(VcpuOutcome::PowerOff) => "power-off".into(),
        Some(VcpuOutcome::Shutdown) => "triple-fault".into(),
        Some(o) => format!("{o:?}"),
    }
}

/// `vmm run --kernel`: boots Linux, console on stdout, until the guest
/// reboots (or --timeout-secs); then tears down and waits for guest RAM to
/// be released before returning.
fn run_linux(args: &RunArgs, kernel: &std::path::Path) -> anyhow::Result<bool> {
    let t0 = *PROCESS_START.get_or_init(Instant::now);
    let mem: MemSize = args.mem.parse()?;
    if args.balloon_target.is_some() || args.release_mib > 0 || args.api_sock.is_some() {
        anyhow::bail!(
            "--balloon-target, --release-mib and --api-sock drive the embedded guest: leave them              out with --kernel (use --balloon to attach a balloon)"
        );
    }
    let mut config = VmConfig::new(mem);
    config.vcpus = args.vcpus;
    config.backing = args.backing.parse()?;
    config.page_size = args.page_size.parse()?;
    config.console = Console::Stdout;
    let mut spec = vmm::boot::LinuxSpec::new(kernel);
    spec.initrd.clone_from(&args.initrd);
    if let Some(c) = &args.cmdline {
        spec.cmdline.clone_from(c);
    }
    config.linux = Some(spec);
    if args.balloon {
        config.balloon = Some(BalloonConfig::default());
    }
    let mut vm = Vm::new(config).context("creating the microVM")?;
    if vmm::devices::serial::stdin_is_terminal() {
        vmm::devices::serial::spawn_stdin_reader(Arc::clone(vm.serial()))
            .context("starting the console input thread")?;
    }
    if args.populate {
        vm.memory().populate()?;
    }
    let t_start = Instant::now();
    vm.start().context("starting vCPUs")?;
    // Every thread that needs more than main keeps is started.
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Main);
    let end = vm.wait_linux(args.timeout_secs.map(Duration::from_secs));
    let run_ms = ms(t_start.elapsed());
    let monitor_setup_ms = vm.first_run().map(|t| ms(t.duration_since(t0)));
    let cmdline = vm.linux_cmdline().unwrap_or_default().to_string();
    let rss_peak = proc_stats::rss().peak;
    let mut teardown = vm.destroy();
    let reclaimed = teardown.wait_reclaim();
    let outcome = end.map(|(_, o)| o);
    let guest_ok = outcome.as_ref().is_some_and(|o| o.is_linux_exit());
    let summary = LinuxSummary {
        boot: "linux",
        guest_ok,
        vcpus: args.vcpus,
        mem_bytes: mem.bytes(),
        backing: args.backing.clone(),
        kernel: kernel.display().to_string(),
        cmdline,
        monitor_setup_ms,
        run_ms,
        exit_reason: exit_reason(outcome.as_ref()),
        teardown_ms: teardown.teardown_ms,
        reclaim_ms: reclaimed.reclaim_ms,
        memory_back_ms: reclaimed.memory_back_ms,
        rss_peak_bytes: rss_peak,
        rss_after_teardown_bytes: proc_stats::rss().rss,
        outcomes: teardown.outcomes.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "vmm: linux guest ended: {} after {:.1} s (monitor set-up {} ms), teardown {:.2} ms, \
             memory back after {:.1} ms",
            summary.exit_reason,
            run_ms / 1e3,
            monitor_setup_ms.map_or_else(|| "n/a".into(), |m| format!("{m:.1}")),
            summary.teardown_ms,
            summary.memory_back_ms
        );
    }
    Ok(guest_ok)
}

fn run(args: &RunArgs) -> anyhow::Result<bool> {
    if let Some(k) = &args.kernel {
        return run_linux(args, k);
    }
    let t0 = *PROCESS_START.get_or_init(Instant::now);
    let mem: MemSize = args.mem.parse()?;
    let backing: Backing = args.backing.parse()?;
    let page_size: PageSize = args.page_size.parse()?;
    let balloon_target = args
        .balloon_target
        .as_deref()
        .map(parse_balloon_target)
        .transpose()?;
    if let Some(b) = balloon_target {
        if args.release_mib > 0 {
            anyhow::bail!(
                "--balloon-target and --release-mib both need vCPU 0's workload: use one per run"
            );
        }
        let (s, e) = vmm::guest::share(mem.bytes(), args.vcpus, 0);
        if b > e - s {
            anyhow::bail!(
                "--balloon-target {} MiB is more than vCPU 0's share of guest RAM ({} MiB; the \
                 guest balloons only its own pages): lower it, raise --mem or use fewer --vcpus",
                b >> 20,
                (e - s) >> 20
            );
        }
    }
    let rss_before = proc_stats::rss().rss;
    let mut config = VmConfig::new(mem);
    config.vcpus = args.vcpus;
    config.backing = backing;
    config.page_size = page_size;
    config.console = Console::Stdout;
    if args.release_mib > 0 {
        config.workload = Workload::Probe;
    }
    if balloon_target.is_some() || args.api_sock.is_some() {
        config.workload = Workload::Balloon;
        config.balloon = Some(BalloonConfig::default());
    }
    let timeout = Duration::from_secs(args.timeout_secs.unwrap_or(60));
    let mut vm = Vm::new(config).context("creating the microVM")?;
    if args.populate {
        // Before the vCPUs start: nothing else touches guest RAM.
        vm.memory().populate()?;
    }
    let held = args.populate && args.api_sock.is_some();
    // The API server (its thread) before the main thread's filter; its
    // requests wait in the channel until the loop of `serve_api` runs.
    let api = match &args.api_sock {
        Some(path) => {
            let (tx, rx) = std::sync::mpsc::channel::<ApiMsg>();
            let server = start_api_server(
                path,
                args.confine.replace_api_sock,
                Arc::new(Forward(std::sync::Mutex::new(tx))),
            )?;
            Some((server, rx))
        }
        None => None,
    };
    let t_start = Instant::now();
    vm.start().context("starting vCPUs")?;
    // Every thread that needs more than main keeps is started.
    vmm::seccomp::install(vmm::seccomp::ThreadKind::Main);
    if held && !vm.pause(timeout) {
        anyhow::bail!("the vCPUs did not pause within {} s", timeout.as_secs());
    }
    let release = if args.release_mib > 0 {
        release_and_read_back(&mut vm, args.release_mib, timeout)?
    } else {
        ReleaseRun {
            ok: true,
            ..ReleaseRun::default()
        }
    };
    let balloon = match balloon_target {
        Some(b) => inflate_to_target(&mut vm, b, timeout)?,
        None => BalloonRun {
            ok: true,
            ..BalloonRun::default()
        },
    };
    let finished = match api {
        Some((server, rx)) => {
            serve_api(&mut vm, server, &rx, mem.bytes(), args.vcpus, timeout, held)
        }
        None => vm.wait(timeout),
    };
    let run_time = t_start.elapsed();
    let (first_hello, results, _) = vm.reports();
    // A held guest (--populate --api-sock) never runs its workload: it is
    // OK when it was shut down on request.
    let guest_ok = finished && (held || vm.guest_ok()) && release.ok && balloon.ok;
    let faults = vm.fault_stats().summary();
    let rss_peak = proc_stats::rss().peak;
    let table_bytes = vm.stage2().table().table_bytes();
    let invalidations = vm
        .stage2()
        .kvm_side()
        .starts
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut teardown = vm.destroy();
    let reclaimed = teardown.wait_reclaim();
    let rss_after = proc_stats::rss().rss;
    let summary = Summary {
        guest_ok,
        vcpus: args.vcpus,
        mem_bytes: mem.bytes(),
        backing: backing.to_string(),
        page_size: page_size.to_string(),
        boot_ms: first_hello.map(|h| ms(h - t0)),
        run_ms: ms(run_time),
        teardown_ms: teardown.teardown_ms,
        reclaim_ms: reclaimed.reclaim_ms,
        memory_back_ms: reclaimed.memory_back_ms,
        rss_peak_bytes: rss_peak,
        rss_after_teardown_bytes: rss_after,
        rss_before_bytes: rss_before,
        faults: faults.faults,
        fault_mean_latency_us: faults.mean_latency_us,
        fault_max_latency_us: faults.max_latency_us,
        released_bytes: release.bytes,
        released_leaves_read_zero: release.zero_leaves,
        guest_fault_read_mean_us: if release.zero_leaves == 0 {
            0.0
        } else {
            release.read_ns_total as f64 / release.zero_leaves as f64 / 1e3
        },
        guest_fault_read_max_us: release.read_ns_max as f64 / 1e3,
        pages_verified: results.iter().filter(|r| r.ok()).map(|r| r.pages()).sum(),
        balloon_target_bytes: balloon_target.unwrap_or(0),
        balloon_inflated_bytes: balloon.inflated_bytes,
        balloon_inflate_ms: balloon.inflate_ms,
        balloon_device_inflate_ms: balloon.device_inflate_ms,
        balloon_released_bytes: balloon.released_bytes,
        rss_before_inflate_bytes: balloon.rss_before,
        rss_after_inflate_bytes: balloon.rss_after,
        guest_resident_before_inflate_bytes: balloon.resident_before,
        guest_resident_after_inflate_bytes: balloon.resident_after,
        balloon_device_errors: balloon.device_errors,
        balloon_driver_error: balloon.driver_error.clone(),
        stage2_table_bytes: table_bytes,
        stage2_max_lock_hold_us: reclaimed.stage2.max_lock_hold_us,
        stage2_invalidations: invalidations,
        stage2_teardown_gather_ms: reclaimed.stage2.gather_ms,
        stage2_teardown_released_bytes: reclaimed.stage2.released_bytes,
        outcomes: teardown.outcomes.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        if !finished {
            println!("vmm: guest did not finish within {} s", timeout.as_secs());
        }
        for (i, o) in summary.outcomes.iter().enumerate() {
            println!("vmm: vcpu {i}: {o:?}");
        }
        println!(
            "vmm: guest {} ({} vCPUs, {} {} RAM, {} pages verified)",
            if guest_ok { "OK" } else { "FAILED" },
            summary.vcpus,
            mem,
            backing,
            summary.pages_verified
        );
        if summary.released_bytes > 0 {
            println!(
                "vmm: released {} MiB; {} leaves read back as zeros; {} demand faults, \
                 handler mean {:.1} us, max {:.1} us; guest read of a released page \
                 mean {:.1} us, max {:.1} us",
                summary.released_bytes >> 20,
                summary.released_leaves_read_zero,
                summary.faults,
                summary.fault_mean_latency_us,
                summary.fault_max_latency_us,
                summary.guest_fault_read_mean_us,
                summary.guest_fault_read_max_us
            );
        }
        if summary.balloon_target_bytes > 0 {
            println!(
                "vmm: balloon inflated {} MiB of {} MiB in {:.2} ms (device {:.2} ms), \
                 RSS {} -> {} MiB, guest RAM resident {} -> {} MiB, {} device errors",
                summary.balloon_inflated_bytes >> 20,
                summary.balloon_target_bytes >> 20,
                summary.balloon_inflate_ms,
                summary.balloon_device_inflate_ms,
                summary.rss_before_inflate_bytes >> 20,
                summary.rss_after_inflate_bytes >> 20,
                summary.guest_resident_before_inflate_bytes >> 20,
                summary.guest_resident_after_inflate_bytes >> 20,
                summary.balloon_device_errors
            );
            if let Some(e) = &summary.balloon_driver_error {
                println!("vmm: {e}");
            }
        }
        println!(
            "vmm: boot {} ms, run {:.1} ms, teardown {:.2} ms, peak RSS {} MiB, RSS after teardown {} MiB",
            summary
                .boot_ms
                .map_or_else(|| "n/a".to_string(), |b| format!("{b:.2}")),
            summary.run_ms,
            summary.teardown_ms,
            summary.rss_peak_bytes >> 20,
            summary.rss_after_teardown_bytes >> 20
        );
    }
    Ok(guest_ok)
}

/// A request from the API thread and where to send the answer.
type ApiMsg = (
    vmm::api::request::Request,
    std::sync::mpsc::Sender<Result<vmm::api::server::Reply, vmm::api::server::ApiFault>>,
);

/// Forwards API requests to the thread that owns the VM (`vmm run`).
struct Forward(std::sync::Mutex<std::sync::mpsc::Sender<ApiMsg>>);

impl vmm::api::server::Handler for Forward {
    fn handle(
        &self,
        req: vmm::api::request::Request,
    ) -> Result<vmm::api::server::Reply, vmm::api::server::ApiFault> {
        use vmm::api::server::ApiFault;
        let (tx, rx) = std::sync::mpsc::channel();
        self.0
            .lock()
            .map_err(|_| ApiFault::bad("the VMM is shutting down"))?
            .send((req, tx))
            .map_err(|_| ApiFault::bad("the VMM is shutting down"))?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| ApiFault::internal("the VMM did not answer in time"))?
    }
}

/// Serve the control API (`vmm run --api-sock`: the workload runner's
/// subset of Firecracker's API, on the same server as `vmm --api-sock`)
/// until the guest finishes (after `SendCtrlAltDel`), or, with `hold` (the
/// vCPUs are held paused), until `SendCtrlAltDel`. Returns whether it
/// finished.
fn serve_api(
    vm: &mut Vm,
    server: vmm::api::server::ApiServer,
    rx: &std::sync::mpsc::Receiver<ApiMsg>,
    mem: u64,
    vcpus: u32,
    timeout: Duration,
    hold: bool,
) -> bool {
    use vmm::api::models::{
        ActionType, Balloon, BalloonStats, InstanceInfo, InstanceState, VmState,
    };
    use vmm::api::request::Request;
    use vmm::api::server::{ApiFault, Reply};
    // Stops serving (and removes the socket) when this returns.
    let _server = server;
    let (s, e) = vmm::guest::share(mem, vcpus, 0);
    let mut shutdown_at: Option<Instant> = None;
    let mut paused = false;
    loop {
        if vm.wait(Duration::ZERO) {
            return true;
        }
        if shutdown_at.is_some_and(|t| t.elapsed() > timeout) {
            return false;
        }
        // Wait for a request (answered at once), but look at the guest
        // again every 20 ms, every 1 ms once it was told to shut down.
        let poll = Duration::from_millis(if shutdown_at.is_some() { 1 } else { 20 });
        let first = rx.recv_timeout(poll).ok();
        for (req, reply) in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            let stop = Request::Action(ActionType::SendCtrlAltDel);
            if hold && req == stop {
                let _ = reply.send(Ok(Reply::NoContent));
                return true;
            }
            let balloon = vm.balloon().cloned();
            let no_balloon = || ApiFault::bad("this VM has no balloon");
            let answer = match req {
                Request::PatchBalloon(u) => balloon.ok_or_else(no_balloon).and_then(|_| {
                    let b = u64::from(u.amount_mib) << 20;
                    if b > e - s {
                        Err(ApiFault::bad(format!(
                            "a balloon of {} MiB does not fit: at most vCPU 0's share of {} MiB",
                            u.amount_mib,
                            (e - s) >> 20
                        )))
                    } else {
                        vm.set_balloon_target(u.amount_mib << 8)
                            .map(|()| Reply::NoContent)
                            .map_err(|e| ApiFault::bad(e.to_string()))
                    }
                }),
                Request::GetBalloon => balloon.ok_or_else(no_balloon).and_then(|bl| {
                    let t = bl.lock();
                    let d = t.device();
                    Reply::json(&Balloon {
                        amount_mib: d.target_pages() >> 8,
                        deflate_on_oom: d.deflate_on_oom(),
                        stats_polling_interval_s: 0,
                        free_page_hinting: false,
                        free_page_reporting: d.reporting(),
                    })
                }),
                Request::GetBalloonStats => balloon
                    .ok_or_else(no_balloon)
                    .and_then(|bl| Reply::json(&BalloonStats::of(bl.lock().device()))),
                Request::PatchVm(VmState::Paused) => {
                    if vm.pause(Duration::from_secs(5)) {
                        paused = true;
                        Ok(Reply::NoContent)
                    } else {
                        Err(ApiFault::internal("the vCPUs did not pause within 5 s"))
                    }
                }
                Request::PatchVm(VmState::Resumed) => {
                    vm.resume();
                    paused = false;
                    Ok(Reply::NoContent)
                }
                Request::Action(ActionType::SendCtrlAltDel) => {
                    vm.resume();
                    shutdown_at.get_or_insert_with(Instant::now);
                    vm.finish_probes()
                        .map(|()| Reply::NoContent)
                        .map_err(|e| ApiFault::bad(e.to_string()))
                }
                Request::GetInstance => Reply::json(&InstanceInfo {
                    app_name: "vmm".into(),
                    id: "vmm-run".into(),
                    state: if paused {
                        InstanceState::Paused
                    } else {
                        InstanceState::Running
                    },
                    vmm_version: env!("CARGO_PKG_VERSION").into(),
                }),
                Request::GetMemory => Reply::json(&vm.memory().report()),
                other => Err(ApiFault::bad(format!(
                    "{other:?} is not served by `vmm run --api-sock`: use `vmm --api-sock PATH` \
                     (the full Firecracker API)"
                ))),
            };
            let _ = reply.send(answer);
        }
    }
}

/// `vmm ctl`: one API call, its answer printed as JSON.
fn ctl(args: &CtlArgs) -> anyhow::Result<()> {
    use serde_json::json;
    let w: Vec<&str> = args.words.iter().map(String::as_str).collect();
    let (method, uri, body) = match w.as_slice() {
        ["balloon", "set", size] => {
            let mib = size
                .parse::<MemSize>()
                .map(|m| m.bytes() >> 20)
                .or_else(|_| parse_balloon_target(size).map(|b| b >> 20))
                .or_else(|_| {
                    if *size == "0" {
                        Ok(0)
                    } else {
                        Err(anyhow::anyhow!("bad size"))
                    }
                })
                .with_context(|| format!("invalid balloon size {size:?}: use e.g. 512M or 0"))?;
            ("PATCH", "/balloon", Some(json!({ "amount_mib": mib })))
        }
        ["balloon", "get"] | ["balloon"] => ("GET", "/balloon", None),
        ["balloon", "stats"] => ("GET", "/balloon/statistics", None),
        ["pause"] => ("PATCH", "/vm", Some(json!({ "state": "Paused" }))),
        ["resume"] => ("PATCH", "/vm", Some(json!({ "state": "Resumed" }))),
        ["shutdown"] => (
            "PUT",
            "/actions",
            Some(json!({ "action_type": "SendCtrlAltDel" })),
        ),
        ["status"] => ("GET", "/", None),
        _ => anyhow::bail!(
            "unknown command {:?}: use balloon set SIZE | balloon get | balloon stats | pause | \
             resume | shutdown | status",
            args.words.join(" ")
        ),
    };
    let v = vmm::api::call(&args.api_sock, method, uri, body.as_ref())?;
    println!(
        "{}",
        if v.is_null() {
            "{}".to_string()
        } else {
            v.to_string()
        }
    );
    Ok(())
}

/// `vmm --api-sock PATH` / `vmm --config-file FILE`: the monitor as a
/// service ([`vmm::service`]).
fn serve(cli: &Cli) -> anyhow::Result<ExitCode> {
    use vmm::service::{self, Service, ServiceOptions};
    if cli.api_sock.is_none() && cli.config_file.is_none() {
        anyhow::bail!(
            "nothing to do: give --api-sock PATH (serve Firecracker's API), --config-file FILE \
             (boot from a file), or a command (`vmm run`, `vmm ctl`; see --help)"
        );
    }
    let config = cli
        .config_file
        .as_deref()
        .map(service::read_config_file)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let backing = cli.backing.as_deref().map(str::parse).transpose()?;
    let svc = Service::new(ServiceOptions {
        id: cli.id.clone(),
        console: Console::Stdout,
        populate: cli.populate,
        backing,
    });
    // This thread makes the VM (svc.run below), also for an InstanceStart
    // that reaches the API before it gets there.
    svc.expect_runner();
    // Before any other thread exists, so that all inherit the mask.
    service::stop_on_signals(&svc).context("setting up SIGTERM/SIGINT handling")?;
    let _server = match &cli.api_sock {
        Some(p) => Some(start_api_server(
            p,
            cli.confine.replace_api_sock,
            Arc::clone(&svc) as Arc<dyn vmm::api::server::Handler>,
        )?),
        None => None,
    };
    // What does not depend on the configuration (the supported CPUID, an
    // empty KVM VM), made while InstanceStart has not come (the API is up:
    // a start that comes now waits for it).
    vmm::vstate::vm::warm_up();
    if let Some(cfg) = config {
        if let Err(f) = svc.configure_and_start(cfg) {
            if f.host_cannot {
                eprintln!("vmm: error: {}", f.message);
                return Ok(ExitCode::from(vmm::EXIT_HOST_CANNOT));
            }
            anyhow::bail!("{}", f.message);
        }
    }
    let how = svc.run();
    eprintln!("vmm: {how:?}");
    Ok(if how.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The exit status of a run that ended in `e`:
/// [`vmm::EXIT_HOST_CANNOT`] if any cause says this host cannot run what was
/// asked ([`vmm::VmError::host_cannot`]), else 2.
fn error_status(e: &anyhow::Error) -> u8 {
    let host = e.chain().any(|c| {
        c.downcast_ref::<vmm::VmError>()
            .is_some_and(vmm::VmError::host_cannot)
            || c.downcast_ref::<vmm::MemoryError>()
                .is_some_and(vmm::MemoryError::host_cannot)
    });
    if host {
        vmm::EXIT_HOST_CANNOT
    } else {
        2
    }
}

/// `e` and its causes, joined by ": ", leaving out a cause whose text the
/// message so far already ends with (an error that prints its source
/// inside its own message, as most of ours do).
fn chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.ends_with(&c) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&c);
    }
    msg
}

fn main() -> ExitCode {
    PROCESS_START.get_or_init(Instant::now);
    let cli = Cli::parse();
    let confine = match &cli.cmd {
        None => Some(&cli.confine),
        Some(Cmd::Run(a)) => Some(&a.confine),
        Some(Cmd::Ctl(_)) => None,
    };
    if let Some(Err(e)) = confine.map(Confine::apply) {
        eprintln!("vmm: error: {}", chain(&e));
        return ExitCode::from(2);
    }
    let Some(cmd) = cli.cmd else {
        return match serve(&cli) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("vmm: error: {}", chain(&e));
                ExitCode::from(error_status(&e))
            }
        };
    };
    match cmd {
        Cmd::Ctl(args) => match ctl(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmm ctl: error: {}", chain(&e));
                ExitCode::from(2)
            }
        },
        Cmd::Run(args) => match run(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("vmm: error: {}", chain(&e));
                ExitCode::from(error_status(&e))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{chain, error_status, parse_balloon_target};
    use anyhow::Context;
    use vmm::{MemoryError, VmError};

    #[test]
    fn a_host_that_cannot_is_told_apart_by_the_exit_status() {
        let missing = || MemoryError::GuestMemfdUnsupported("KVM_CAP_GUEST_MEMFD".into());
        let wrapped: Result<(), VmError> = Err(VmError::Memory(missing()));
        let e = wrapped.context("creating the microVM").unwrap_err();
        assert_eq!(error_status(&e), vmm::EXIT_HOST_CANNOT);
        let direct = anyhow::Error::new(missing()).context("parsing");
        assert_eq!(error_status(&direct), vmm::EXIT_HOST_CANNOT);
        let pages = VmError::Memory(MemoryError::NoHugePages { needed: 8, free: 0 });
        assert_eq!(
            error_status(&anyhow::Error::new(pages)),
            vmm::EXIT_HOST_CANNOT
        );
        // Mistakes of the request, and failures that are not the host's
        // fixed state, keep status 2.
        for e in [
            anyhow::Error::new(VmError::AlreadyStarted),
            anyhow::Error::new(VmError::Memory(MemoryError::ZeroSize)),
            anyhow::Error::new(VmError::TooManyVcpus(300, 255)),
            anyhow::anyhow!("is not supported by this host's KVM"),
        ] {
            assert_eq!(error_status(&e), 2, "{e:#}");
        }
    }

    #[test]
    fn a_table_the_host_cannot_reserve_exits_with_3_and_is_said_once() {
        let reserve = guest_mm::NewTableError::Reserve {
            bytes: 512 << 30,
            limit: 1 << 48,
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        };
        let e = Err::<(), _>(VmError::Stage2(vmm::Stage2Error::NewTable(reserve)))
            .context("creating the microVM")
            .unwrap_err();
        assert_eq!(error_status(&e), vmm::EXIT_HOST_CANNOT);
        // The table error prints its cause inside its own message: the
        // chain says it once.
        let msg = chain(&e);
        assert_eq!(msg.matches("ulimit -v").count(), 1, "{msg}");
        assert!(msg.starts_with("creating the microVM: creating the stage-2 table failed: "));
        // Causes that add something are kept.
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(chain(&e), "outer: middle: inner");
        let bad = guest_mm::NewTableError::BadLimit(0);
        let e = anyhow::Error::new(VmError::Stage2(vmm::Stage2Error::NewTable(bad)));
        assert_eq!(error_status(&e), 2);
    }

    #[test]
    fn balloon_target_sizes() {
        assert_eq!(parse_balloon_target("128M").unwrap(), 128 << 20);
        assert_eq!(parse_balloon_target("4k").unwrap(), 4096);
        assert_eq!(parse_balloon_target("1G").unwrap(), 1 << 30);
        assert_eq!(parse_balloon_target("8192").unwrap(), 8192);
        for bad in ["", "0", "0M", "6K", "12x", "M", "99999999999999999G"] {
            assert!(parse_balloon_target(bad).is_err(), "{bad:?}");
        }
    }
}
