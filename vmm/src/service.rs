//! The monitor as a service: Firecracker's API life cycle around one [`Vm`].
//!
//! `vmm --api-sock PATH` starts with no VM, in state `Not started`: calls
//! configure it (`/machine-config`, `/boot-source`, `/balloon`, `/metrics`,
//! `/logger`), `InstanceStart` creates and starts it; `vmm --config-file`
//! applies the same calls from a JSON file and starts at once. The
//! [`Service`] is the [`Handler`] of the API server and the owner of the VM;
//! [`Service::run`] is the main thread's loop: it waits for the end of the
//! VM or a stop request, then tears the VM down (vCPUs kicked, guest memory
//! released through the stage-2 gather) and returns how it ended.
//!
//! **States.** `Not started` → (`InstanceStart`) `Running` ⇄ (`PATCH /vm`)
//! `Paused` → ended (the guest stopped: reset, shutdown, the default guest
//! finished; or a stop request: SIGTERM/SIGINT). Calls in the wrong phase get
//! 400 with Firecracker's messages ([`Request::phase`]); a refused call
//! changes nothing.
//!
//! **Locking.** One mutex guards the configuration and the VM; handlers hold
//! it for the call only (`PATCH /vm` waits for the vCPUs to park, at most
//! [`PAUSE_TIMEOUT`]). The main loop never holds it while it waits: it
//! sleeps on the VM's [`EndWaiter`] (or the service's condition variable
//! before the start), woken by the guest's end, a stop request or the next
//! statistics poll, so an idle service costs no CPU. A stop request reaches
//! the loop at once (a notify, no polling).
//!
//! **Threads and seccomp.** While [`Service::run`] waits for the start, an
//! API `InstanceStart` is handed to it (the handler thread waits for the
//! answer, even if it arrives before the main thread reached its loop:
//! [`Service::expect_runner`]): the VM is created and its threads started
//! by the main thread,
//! so they inherit none of the API thread's seccomp filter
//! ([`crate::seccomp`]); the main thread then installs its own filter
//! before it waits on the guest. Without a waiting runner (library use)
//! the handler starts the VM itself, as before.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::api::models::{
    ActionType, Balloon, BalloonStats, BalloonStatsUpdate, HugePages, InstanceInfo, InstanceState,
    Logger, MachineConfig, Version, VmConfigFile, VmState,
};
use crate::api::request::{Phase, Request};
use crate::api::server::{ApiFault, Handler, Reply};
use crate::boot::LinuxSpec;
use crate::devices::serial::Console;
use crate::devices::virtio::balloon::{BalloonConfig, BalloonCounters};
use crate::guest::Workload;
use crate::seccomp;
use crate::vstate::memory::{check_backing, Backing, MemSize, MemoryReport, PageSize};
use crate::vstate::vcpu::VcpuOutcome;
use crate::vstate::vm::{EndWaiter, Vm, VmConfig};

/// How long `PATCH /vm` waits for the vCPUs to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Firecracker's message for a pre-boot call after the start.
pub const AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
/// Firecracker's message for a post-boot call before the start.
pub const BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// How the service's VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Ended {
    /// A stop request (signal number).
    Signal(i32),
    /// The guest stopped: reset, power-off or shutdown (Linux), every vCPU
    /// done (the default guest), or an error (`ok` false).
    Guest {
        /// A clean stop.
        ok: bool,
        /// vCPU and outcome.
        what: String,
    },
    /// Nothing was started and a stop request came.
    NotStarted,
}

/// What the service needs besides API calls.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Instance ID (`GET /`).
    pub id: String,
    /// Where the guest console goes.
    pub console: Console,
    /// Populate all guest RAM host-side before the vCPUs start (benchmarks
    /// of a populated guest's teardown).
    pub populate: bool,
    /// What guest RAM is made of, for every VM of this service (`vmm
    /// --backing`): anon, memfd or guest-memfd, with 4 KiB leaves, or 2 MiB
    /// ones where `huge_pages` is `Transparent`. `None`: `huge_pages`
    /// alone decides, as in Firecracker (see [`backing_for`]).
    pub backing: Option<Backing>,
}

struct Inner {
    cfg: VmConfigFile,
    vm: Option<Vm>,
    waiter: Option<EndWaiter>,
    paused: bool,
    /// Torn down (or being torn down): nothing more is served.
    ended: bool,
    started_at: Option<Instant>,
    next_stats: Option<Instant>,
    /// [`Service::run`] waits for the start and starts the VM itself when
    /// asked (`start_asked`), answering in `start_answer`.
    runner_waiting: bool,
    /// The thread that will run [`Service::run`], from
    /// [`Service::expect_runner`] until the start: an `InstanceStart` from
    /// any other thread waits for it even before its loop is reached.
    runner: Option<std::thread::ThreadId>,
    start_asked: bool,
    /// When the API thread received the `InstanceStart` it handed over:
    /// the start of `monitor_setup_ms` (the hand-over's wake-up is the
    /// monitor's too).
    start_received: Option<Instant>,
    start_answer: Option<Result<Reply, ApiFault>>,
}

/// The service: configuration, the VM, and the stop request.
pub struct Service {
    opts: ServiceOptions,
    inner: Mutex<Inner>,
    /// Before the start: woken by `InstanceStart` and stop requests.
    cv: Condvar,
    /// A signal asked to stop (its number; 0 = none).
    stop_signal: std::sync::atomic::AtomicI32,
    stopping: AtomicBool,
    /// One `InstanceStart` handed to the runner at a time.
    start_gate: Mutex<()>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn bad(msg: impl Into<String>) -> ApiFault {
    ApiFault::bad(msg)
}

/// The backing and leaf size Firecracker's `huge_pages` stands for.
fn backing_of(h: HugePages) -> (Backing, PageSize) {
    match h {
        HugePages::None => (Backing::Anon, PageSize::Size4K),
        HugePages::Transparent => (Backing::Anon, PageSize::Size2M),
        HugePages::Size2M => (Backing::Hugetlb, PageSize::Size2M),
    }
}

/// The backing and leaf size of guest RAM: `huge_pages` as in Firecracker
/// (none: anon with 4 KiB leaves; `Transparent`: anon with 2 MiB leaves;
/// `2M`: hugetlbfs), unless the service was given a backing kind
/// ([`ServiceOptions::backing`]): then that kind, with 2 MiB leaves for
/// `Transparent` and 4 KiB for `None`; `2M` (hugetlbfs) is refused with
/// it, since the two name different memory.
pub fn backing_for(h: HugePages, kind: Option<Backing>) -> Result<(Backing, PageSize), ApiFault> {
    match (kind, h) {
        (None, h) => Ok(backing_of(h)),
        (Some(k), HugePages::None) => Ok((k, PageSize::Size4K)),
        (Some(k), HugePages::Transparent) => Ok((k, PageSize::Size2M)),
        (Some(k), HugePages::Size2M) => Err(bad(format!(
            "huge_pages \"2M\" means hugetlbfs, but this monitor was started with \
             --backing {k}: leave huge_pages out (4 KiB leaves) or set it to \"Transparent\" \
             (2 MiB leaves)"
        ))),
    }
}

/// Checks a machine configuration as `PUT /machine-config` does, for a
/// service whose backing kind is `kind` ([`ServiceOptions::backing`]).
pub fn check_machine(m: &MachineConfig, kind: Option<Backing>) -> Result<MemSize, ApiFault> {
    if !(1..=32).contains(&m.vcpu_count) {
        return Err(bad(format!(
            "vcpu_count {} is out of range: give 1 to 32 vCPUs",
            m.vcpu_count
        )));
    }
    if m.smt {
        return Err(bad("smt is not supported by this monitor: set it to false"));
    }
    if m.track_dirty_pages {
        return Err(bad(
            "track_dirty_pages is not supported (no snapshots): set it to false",
        ));
    }
    if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
        return Err(bad(
            "CPU templates are not supported: leave cpu_template out",
        ));
    }
    let bytes = m
        .mem_size_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| bad("mem_size_mib is too large"))?;
    let size = MemSize::from_bytes(bytes).map_err(|e| bad(format!("mem_size_mib: {e}")))?;
    let (backing, page) = backing_for(m.huge_pages, kind)?;
    check_backing(size, backing, page)
        .map_err(|e| bad(format!("huge_pages: {e}")).host_cannot_if(e.host_cannot()))?;
    Ok(size)
}

/// Checks a balloon configuration against the VM it is for: hinting is not
/// offered, and the target must fit what the guest's driver can give. A
/// Linux guest (a boot source is set) may give all its RAM; the default
/// guest's driver runs on vCPU 0 and inflates only vCPU 0's share of the
/// workload memory, so a larger target could never be reached.
fn check_balloon(b: &Balloon, cfg: &VmConfigFile) -> Result<(), ApiFault> {
    if b.free_page_hinting {
        return Err(bad(
            "free_page_hinting is not supported by this monitor (free_page_reporting is): \
             set it to false",
        ));
    }
    let m = &cfg.machine_config;
    let mem_mib = m.mem_size_mib;
    if u64::from(b.amount_mib) > mem_mib {
        return Err(bad(format!(
            "amount_mib {} is more than the guest's {mem_mib} MiB of RAM",
            b.amount_mib
        )));
    }
    if cfg.boot_source.is_none() {
        let mem = mem_mib << 20;
        let vcpus = u32::from(m.vcpu_count.max(1));
        let share_mib = if mem > crate::guest::layout::WORKLOAD_START {
            let (s, e) = crate::guest::share(mem, vcpus, 0);
            (e - s) >> 20
        } else {
            0
        };
        if u64::from(b.amount_mib) > share_mib {
            return Err(bad(format!(
                "amount_mib {} does not fit the default guest's balloon: its driver (vCPU 0) \
                 gives only vCPU 0's share of the workload memory, {share_mib} MiB of {mem_mib} \
                 MiB with {vcpus} vCPU(s); ask for at most {share_mib}, or set a boot source \
                 (a Linux guest may give all its RAM)",
                b.amount_mib
            )));
        }
    }
    Ok(())
}

impl Ended {
    /// Whether the process should exit 0: a stop request, or a guest that
    /// stopped cleanly.
    pub fn is_clean(&self) -> bool {
        !matches!(self, Ended::Guest { ok: false, .. })
    }
}

impl Service {
    /// A service with no VM.
    pub fn new(opts: ServiceOptions) -> Arc<Self> {
        Arc::new(Self {
            opts,
            inner: Mutex::new(Inner {
                cfg: VmConfigFile::default(),
                vm: None,
                waiter: None,
                paused: false,
                ended: false,
                started_at: None,
                next_stats: None,
                runner_waiting: false,
                runner: None,
                start_asked: false,
                start_received: None,
                start_answer: None,
            }),
            cv: Condvar::new(),
            stop_signal: std::sync::atomic::AtomicI32::new(0),
            stopping: AtomicBool::new(false),
            start_gate: Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a `--config-file` (every section as its `PUT` would) and
    /// starts the VM.
    pub fn configure_and_start(&self, file: VmConfigFile) -> Result<(), ApiFault> {
        if !file.drives.is_empty() {
            return Err(bad(
                "drives are not supported by this monitor: give \"drives\": []",
            ));
        }
        self.handle(Request::PutMachineConfig(file.machine_config))?;
        if let Some(b) = file.boot_source {
            self.handle(Request::PutBootSource(b))?;
        }
        if let Some(b) = file.balloon {
            self.handle(Request::PutBalloon(b))?;
        }
        if let Some(m) = file.metrics {
            self.handle(Request::PutMetrics(m))?;
        }
        if let Some(l) = file.logger {
            self.handle(Request::PutLogger(l))?;
        }
        self.handle(Request::Action(ActionType::InstanceStart))
            .map(|_| ())
    }

    /// Declares that the calling thread will call [`Service::run`]: from
    /// now on an `InstanceStart` made by any other thread (the API's) is
    /// handed to it, even one that arrives before it reaches its loop, so
    /// the VM's threads never inherit the API thread's seccomp filter.
    /// Call it before the API server starts.
    pub fn expect_runner(&self) {
        self.lock().runner = Some(std::thread::current().id());
    }

    /// Asks the service to stop (from the signal thread): the main loop
    /// tears the VM down at once.
    pub fn request_stop(&self, signal: i32) {
        self.stop_signal.store(signal, Ordering::SeqCst);
        self.stopping.store(true, Ordering::SeqCst);
        let g = self.lock();
        if let Some(w) = &g.waiter {
            w.wake();
        }
        drop(g);
        self.cv.notify_all();
    }

    fn stop_requested(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The main thread's loop: waits for the start (and makes it: an
    /// `InstanceStart` from the API is run here, so the VM's threads are
    /// this thread's children, not the API thread's, and inherit no API
    /// seccomp filter), then confines itself ([`seccomp`]) and waits for
    /// the end of the VM or a stop request; tears the VM down (memory back
    /// first) and returns how it ended.
    pub fn run(&self) -> Ended {
        // Before the start.
        let waiter = {
            let mut g = self.lock();
            g.runner_waiting = true;
            g.runner.get_or_insert(std::thread::current().id());
            loop {
                if g.start_asked {
                    g.start_asked = false;
                    let answer = self.start_instance(&mut g);
                    g.start_answer = Some(answer);
                    self.cv.notify_all();
                }
                if self.stop_requested() {
                    g.ended = true;
                    g.runner_waiting = false;
                    g.runner = None;
                    self.cv.notify_all();
                    return Ended::NotStarted;
                }
                if let Some(w) = g.waiter.clone() {
                    g.runner_waiting = false;
                    g.runner = None;
                    break w;
                }
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        };
        seccomp::install(seccomp::ThreadKind::Main);
        // Running: sleep until the end, a stop or the next stats poll.
        loop {
            let timeout = self
                .lock()
                .next_stats
                .map_or(Duration::from_secs(3600), |t| {
                    t.saturating_duration_since(Instant::now())
                });
            let ended = waiter.wait(timeout, || self.stop_requested());
            if ended || self.stop_requested() {
                break;
            }
            self.poll_stats();
        }
        let (vm, cfg) = {
            let mut g = self.lock();
            g.ended = true;
            g.waiter = None;
            (g.vm.take(), g.cfg.clone())
        };
        let signal = self.stop_signal.load(Ordering::SeqCst);
        let how = match &vm {
            Some(vm) if signal == 0 => {
                let outcomes = vm.outcomes();
                let ok = !outcomes.is_empty()
                    && outcomes.iter().all(|(_, o)| {
                        o.is_linux_exit() || matches!(o, VcpuOutcome::Done | VcpuOutcome::Stopped)
                    });
                Ended::Guest {
                    ok,
                    what: outcomes
                        .first()
                        .map_or_else(|| "stopped".into(), |(i, o)| format!("vCPU {i}: {o:?}")),
                }
            }
            _ => Ended::Signal(signal),
        };
        if let Some(vm) = vm {
            // The monitor's own share of the start: InstanceStart received
            // to the first KVM_RUN.
            let t0 = self.lock().started_at;
            if let (Some(t0), Some(run)) = (t0, vm.first_run()) {
                let setup = run.saturating_duration_since(t0).as_secs_f64() * 1e3;
                self.log(&cfg, "Info", &format!("monitor_setup_ms={setup:.3}"));
            }
            // The default guest's first report (it reached ring 3).
            if let (Some(t0), (Some(hello), _, _)) = (t0, vm.reports()) {
                let ms = hello.saturating_duration_since(t0).as_secs_f64() * 1e3;
                self.log(&cfg, "Info", &format!("first_guest_report_ms={ms:.3}"));
            }
            // The exit's metrics line says what guest memory held before the
            // teardown: a census of the whole table (~4 ms of CPU at 4 GiB
            // of 4 KiB leaves, ahead of the release), taken only for that
            // line.
            let memory = cfg.metrics.as_ref().map(|_| vm.memory().report());
            let balloon = vm.balloon().map(|b| b.counters());
            let mut teardown = vm.destroy();
            let reclaimed = teardown.wait_reclaim();
            if let Some(m) = &cfg.metrics {
                let _ = write_metrics(
                    Path::new(&m.metrics_path),
                    &MetricsLine {
                        utc_timestamp_ms: now_ms(),
                        event: "exit",
                        memory,
                        balloon,
                        teardown_ms: Some(teardown.teardown_ms),
                        memory_back_ms: Some(reclaimed.memory_back_ms),
                    },
                );
            }
            self.log(
                &cfg,
                "Info",
                &format!("microVM ended ({how:?}); guest memory released"),
            );
        }
        how
    }

    fn poll_stats(&self) {
        let mut g = self.lock();
        let interval = g
            .cfg
            .balloon
            .as_ref()
            .map_or(0, |b| b.stats_polling_interval_s);
        if interval == 0 {
            g.next_stats = None;
            return;
        }
        if g.next_stats.is_some_and(|t| t <= Instant::now()) {
            if let Some(b) = g.vm.as_ref().and_then(Vm::balloon) {
                b.request_stats();
            }
            g.next_stats = Some(Instant::now() + Duration::from_secs(interval.into()));
        }
    }

    fn log(&self, cfg: &VmConfigFile, level: &str, msg: &str) {
        // Firecracker's levels, most severe first; the logger's `level`
        // (default Info) is the least severe written, `Off` writes nothing.
        const LEVELS: [&str; 5] = ["error", "warning", "info", "debug", "trace"];
        let rank = |l: &str| LEVELS.iter().position(|x| x.eq_ignore_ascii_case(l));
        let max = cfg
            .logger
            .as_ref()
            .and_then(|l| l.level.as_deref())
            .map_or(rank("info"), rank);
        if rank(level).is_none_or(|r| max.is_none_or(|m| r > m)) {
            return;
        }
        let shown = if cfg.logger.as_ref().is_some_and(|l| l.show_level) {
            format!(" {level}")
        } else {
            String::new()
        };
        let line = format!("[{}]{shown} {msg}\n", self.opts.id);
        match cfg.logger.as_ref().and_then(|l| l.log_path.as_ref()) {
            Some(p) => {
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            None => eprint!("{line}"),
        }
    }

    fn state(g: &Inner) -> InstanceState {
        match (&g.vm, g.paused) {
            (None, _) => InstanceState::NotStarted,
            (Some(_), true) => InstanceState::Paused,
            (Some(_), false) => InstanceState::Running,
        }
    }

    fn start(&self, g: &mut Inner) -> Result<(), ApiFault> {
        let t0 = g.start_received.take().unwrap_or_else(Instant::now);
        let m = &g.cfg.machine_config;
        let size = check_machine(m, self.opts.backing)?;
        if let Some(b) = &g.cfg.balloon {
            // The machine or boot source may have changed since PUT /balloon.
            check_balloon(b, &g.cfg)
                .map_err(|e| bad(format!("InstanceStart failed: {}", e.message)))?;
        }
        let (backing, page_size) = backing_for(m.huge_pages, self.opts.backing)?;
        let mut config = VmConfig::new(size);
        config.vcpus = u32::from(m.vcpu_count);
        config.backing = backing;
        config.page_size = page_size;
        config.console = self.opts.console.clone();
        if let Some(b) = &g.cfg.balloon {
            config.balloon = Some(BalloonConfig {
                stats: b.stats_polling_interval_s > 0,
                deflate_on_oom: b.deflate_on_oom,
                reporting: b.free_page_reporting,
            });
            // The default guest's vCPU 0 driver follows the target.
            config.workload = Workload::Balloon;
        }
        if let Some(bs) = &g.cfg.boot_source {
            let mut spec = LinuxSpec::new(&bs.kernel_image_path);
            spec.initrd = bs.initrd_path.as_ref().map(Into::into);
            if let Some(a) = &bs.boot_args {
                spec.cmdline = a.clone();
            }
            config.linux = Some(spec);
        }
        let mut vm = Vm::new(config).map_err(|e| ApiFault::vm_failed("InstanceStart", &e))?;
        if self.opts.populate {
            vm.memory()
                .populate()
                .map_err(|e| bad(format!("populating guest RAM failed: {e}")))?;
        }
        if let (Some(b), Some(dev)) = (&g.cfg.balloon, vm.balloon()) {
            dev.set_target_pages(b.amount_mib << 8);
        }
        vm.start()
            .map_err(|e| ApiFault::vm_failed("InstanceStart", &e))?;
        g.waiter = Some(vm.end_waiter());
        g.vm = Some(vm);
        g.started_at = Some(t0);
        let interval = g
            .cfg
            .balloon
            .as_ref()
            .map_or(0, |b| b.stats_polling_interval_s);
        g.next_stats =
            (interval > 0).then(|| Instant::now() + Duration::from_secs(interval.into()));
        self.cv.notify_all();
        Ok(())
    }

    fn start_instance(&self, g: &mut Inner) -> Result<Reply, ApiFault> {
        self.start(g)?;
        self.log(&g.cfg, "Info", "microVM started");
        Ok(Reply::NoContent)
    }

    /// Hands an `InstanceStart` to the thread in [`Service::run`] and waits
    /// for its answer.
    fn start_on_runner(&self) -> Result<Reply, ApiFault> {
        let received = Instant::now();
        let _one = self.start_gate.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = self.lock();
        if g.ended || self.stop_requested() {
            return Err(bad("The microVM is shutting down."));
        }
        if g.vm.is_some() {
            return Err(bad(AFTER_START));
        }
        g.start_asked = true;
        g.start_received = Some(received);
        self.cv.notify_all();
        loop {
            if let Some(a) = g.start_answer.take() {
                return a;
            }
            if g.ended {
                return Err(bad("The microVM is shutting down."));
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn balloon_stats(g: &Inner) -> Result<BalloonStats, ApiFault> {
        let cfg =
            g.cfg.balloon.as_ref().ok_or_else(|| {
                bad("No balloon device is configured: PUT /balloon before the start")
            })?;
        if cfg.stats_polling_interval_s == 0 {
            return Err(bad(
                "Balloon statistics are not enabled: set stats_polling_interval_s > 0 in PUT /balloon",
            ));
        }
        let vm = g.vm.as_ref().ok_or_else(|| bad(BEFORE_START))?;
        let dev = vm.balloon().ok_or_else(|| bad("the VM has no balloon"))?;
        let stats = BalloonStats::of(dev.lock().device());
        Ok(stats)
    }

    fn dispatch(&self, g: &mut Inner, req: Request) -> Result<Reply, ApiFault> {
        match req {
            Request::GetInstance => Reply::json(&InstanceInfo {
                app_name: "vmm".into(),
                id: self.opts.id.clone(),
                state: Self::state(g),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
            }),
            Request::GetVersion => Reply::json(&Version {
                firecracker_version: env!("CARGO_PKG_VERSION").into(),
            }),
            Request::GetMachineConfig => Reply::json(&g.cfg.machine_config),
            Request::PutMachineConfig(m) => {
                check_machine(&m, self.opts.backing)?;
                g.cfg.machine_config = m;
                Ok(Reply::NoContent)
            }
            Request::PatchMachineConfig(u) => {
                let m = g.cfg.machine_config.updated(&u);
                check_machine(&m, self.opts.backing)?;
                g.cfg.machine_config = m;
                Ok(Reply::NoContent)
            }
            Request::PutBootSource(b) => {
                std::fs::File::open(&b.kernel_image_path).map_err(|e| {
                    bad(format!(
                        "cannot open kernel_image_path {}: {e}",
                        b.kernel_image_path
                    ))
                })?;
                if let Some(i) = &b.initrd_path {
                    std::fs::File::open(i)
                        .map_err(|e| bad(format!("cannot open initrd_path {i}: {e}")))?;
                }
                g.cfg.boot_source = Some(b);
                Ok(Reply::NoContent)
            }
            Request::GetBalloon => match &g.cfg.balloon {
                Some(b) => Reply::json(b),
                None => Err(bad(
                    "No balloon device is configured: PUT /balloon before the start",
                )),
            },
            Request::PutBalloon(b) => {
                check_balloon(&b, &g.cfg)?;
                g.cfg.balloon = Some(b);
                Ok(Reply::NoContent)
            }
            Request::PatchBalloon(u) => {
                let Some(cfg) = g.cfg.balloon.clone() else {
                    return Err(bad(
                        "No balloon device is configured: PUT /balloon before the start",
                    ));
                };
                let next = Balloon {
                    amount_mib: u.amount_mib,
                    ..cfg
                };
                check_balloon(&next, &g.cfg)?;
                if let Some(vm) = &g.vm {
                    // Through the VM: it also wakes an idle default guest.
                    vm.set_balloon_target(u.amount_mib << 8)
                        .map_err(|e| bad(e.to_string()))?;
                }
                g.cfg.balloon = Some(next);
                Ok(Reply::NoContent)
            }
            Request::GetBalloonStats => Reply::json(&Self::balloon_stats(g)?),
            Request::PatchBalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s: s,
            }) => {
                let Some(cfg) = g.cfg.balloon.clone() else {
                    return Err(bad(
                        "No balloon device is configured: PUT /balloon before the start",
                    ));
                };
                if g.vm.is_some() && (s == 0) != (cfg.stats_polling_interval_s == 0) {
                    return Err(bad(
                        "Balloon statistics cannot be turned on or off after the start: change \
                         the interval only",
                    ));
                }
                g.cfg.balloon = Some(Balloon {
                    stats_polling_interval_s: s,
                    ..cfg
                });
                // The first update at once, as Firecracker schedules it.
                if g.vm.is_some() && s > 0 {
                    g.next_stats = Some(Instant::now());
                    if let Some(w) = &g.waiter {
                        w.wake();
                    }
                }
                Ok(Reply::NoContent)
            }
            Request::Action(ActionType::InstanceStart) => self.start_instance(g),
            Request::Action(ActionType::SendCtrlAltDel) => {
                let vm = g.vm.as_mut().ok_or_else(|| bad(BEFORE_START))?;
                if vm.linux_cmdline().is_some() {
                    vm.send_ctrl_alt_del()
                } else {
                    // The default guest's own clean stop: vCPU 0 finishes,
                    // the others already have.
                    vm.resume();
                    vm.finish_probes()
                }
                .map_err(|e| bad(format!("SendCtrlAltDel failed: {e}")))?;
                Ok(Reply::NoContent)
            }
            Request::Action(ActionType::FlushMetrics) => {
                // No metrics file: nothing to write, as Firecracker answers
                // (204).
                let Some(m) = g.cfg.metrics.as_ref() else {
                    return Ok(Reply::NoContent);
                };
                let vm = g.vm.as_ref();
                write_metrics(
                    Path::new(&m.metrics_path),
                    &MetricsLine {
                        utc_timestamp_ms: now_ms(),
                        event: "flush",
                        memory: vm.map(|v| v.memory().report()),
                        balloon: vm.and_then(Vm::balloon).map(|b| b.counters()),
                        teardown_ms: None,
                        memory_back_ms: None,
                    },
                )
                .map_err(|e| bad(format!("writing metrics to {} failed: {e}", m.metrics_path)))?;
                Ok(Reply::NoContent)
            }
            Request::PatchVm(state) => {
                let vm = g.vm.as_ref().ok_or_else(|| bad(BEFORE_START))?;
                match state {
                    VmState::Paused => {
                        if !vm.pause(PAUSE_TIMEOUT) {
                            return Err(ApiFault::internal(format!(
                                "the vCPUs did not pause within {PAUSE_TIMEOUT:?}"
                            )));
                        }
                        g.paused = true;
                    }
                    VmState::Resumed => {
                        vm.resume();
                        g.paused = false;
                    }
                }
                Ok(Reply::NoContent)
            }
            Request::GetVmConfig => Reply::json(&g.cfg),
            Request::PutMetrics(m) => {
                if let Some(cur) = &g.cfg.metrics {
                    // Firecracker: "Reinitialization of metrics not allowed."
                    return Err(bad(format!(
                        "Reinitialization of metrics not allowed: the metrics system already \
                         writes to {}",
                        cur.metrics_path
                    )));
                }
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&m.metrics_path)
                    .map_err(|e| {
                        bad(format!("cannot open metrics_path {}: {e}", m.metrics_path))
                    })?;
                g.cfg.metrics = Some(m);
                Ok(Reply::NoContent)
            }
            Request::PutLogger(l) => {
                check_logger(&l)?;
                g.cfg.logger = Some(l);
                Ok(Reply::NoContent)
            }
            Request::GetMemory => {
                let vm = g.vm.as_ref().ok_or_else(|| bad(BEFORE_START))?;
                Reply::json(&vm.memory().report())
            }
        }
    }
}

fn check_logger(l: &Logger) -> Result<(), ApiFault> {
    if let Some(level) = &l.level {
        let ok = ["error", "warning", "info", "debug", "trace", "off"]
            .contains(&level.to_ascii_lowercase().as_str());
        if !ok {
            return Err(bad(format!(
                "level {level:?} is not one of Error, Warning, Info, Debug, Trace, Off"
            )));
        }
    }
    if let Some(p) = &l.log_path {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p)
            .map_err(|e| bad(format!("cannot open log_path {p}: {e}")))?;
    }
    Ok(())
}

/// One line of the metrics file.
#[derive(Debug, Serialize)]
struct MetricsLine {
    utc_timestamp_ms: u64,
    event: &'static str,
    memory: Option<MemoryReport>,
    balloon: Option<BalloonCounters>,
    teardown_ms: Option<f64>,
    memory_back_ms: Option<f64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn write_metrics(path: &Path, line: &MetricsLine) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    let mut s = serde_json::to_string(line).map_err(std::io::Error::other)?;
    s.push('\n');
    f.write_all(s.as_bytes())
}

impl Handler for Service {
    fn handle(&self, req: Request) -> Result<Reply, ApiFault> {
        let mut g = self.lock();
        if g.ended || self.stop_requested() {
            return Err(bad("The microVM is shutting down."));
        }
        let runner_elsewhere = g.runner.is_some_and(|t| t != std::thread::current().id());
        if (g.runner_waiting || runner_elsewhere)
            && req == Request::Action(ActionType::InstanceStart)
        {
            drop(g);
            return self.start_on_runner();
        }
        let started = g.vm.is_some();
        match (req.phase(), started) {
            (Phase::PreBoot, true) => return Err(bad(AFTER_START)),
            (Phase::PostBoot, false) => return Err(bad(BEFORE_START)),
            _ => {}
        }
        self.dispatch(&mut g, req)
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and every thread it
/// starts afterwards: call before any other thread exists) and starts a
/// thread that waits for them and asks `service` to stop.
pub fn stop_on_signals(service: &Arc<Service>) -> std::io::Result<()> {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which
    // initializes it; the calls only touch the local set and this thread's
    // mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    let s = Arc::clone(service);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::seccomp::install(crate::seccomp::ThreadKind::Signals);
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialized signal set; `sig` is a
                // valid out-pointer. The signals are blocked in every
                // thread, so sigwait is the only receiver.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc == 0 {
                    s.request_stop(sig);
                }
            }
        })?;
    Ok(())
}

/// Parses a `--config-file`.
pub fn read_config_file(path: &Path) -> Result<VmConfigFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "config file {} is not a valid VM configuration: {e}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::{BalloonUpdate, BootSource};

    fn svc() -> Arc<Service> {
        Service::new(ServiceOptions {
            id: "t".into(),
            console: Console::Null,
            populate: false,
            backing: None,
        })
    }

    #[test]
    fn a_backing_kind_keeps_huge_pages_for_the_leaf_size_only() {
        use HugePages::{Size2M, Transparent};
        assert_eq!(
            backing_for(HugePages::None, None).ok(),
            Some((Backing::Anon, PageSize::Size4K))
        );
        assert_eq!(
            backing_for(Size2M, None).ok(),
            Some((Backing::Hugetlb, PageSize::Size2M))
        );
        for k in [Backing::Anon, Backing::Memfd, Backing::GuestMemfd] {
            assert_eq!(
                backing_for(HugePages::None, Some(k)).ok(),
                Some((k, PageSize::Size4K))
            );
            assert_eq!(
                backing_for(Transparent, Some(k)).ok(),
                Some((k, PageSize::Size2M))
            );
            let e = backing_for(Size2M, Some(k)).expect_err("hugetlbfs with a backing kind");
            assert!(e.message.contains("hugetlbfs"), "{}", e.message);
        }
        // PUT /machine-config refuses the pair and keeps what it had.
        let s = Service::new(ServiceOptions {
            id: "t".into(),
            console: Console::Null,
            populate: false,
            backing: Some(Backing::Memfd),
        });
        let before = s.inner.lock().unwrap().cfg.machine_config.clone();
        let mut m = before.clone();
        m.huge_pages = Size2M;
        let e = s.handle(Request::PutMachineConfig(m)).unwrap_err();
        assert!(e.message.contains("--backing memfd"), "{}", e.message);
        assert_eq!(s.inner.lock().unwrap().cfg.machine_config, before);
        let mut m = before.clone();
        m.huge_pages = Transparent;
        assert_eq!(s.handle(Request::PutMachineConfig(m)), Ok(Reply::NoContent));
    }

    /// An `InstanceStart` that reaches the API before the main thread is
    /// in `run` is handed to it all the same (the API thread never makes
    /// the VM: its threads would inherit the API's seccomp filter).
    #[test]
    fn instance_start_before_the_runner_loop_waits_for_the_runner() {
        let s = svc();
        s.expect_runner();
        let s2 = Arc::clone(&s);
        let h = std::thread::spawn(move || s2.handle(Request::Action(ActionType::InstanceStart)));
        let t = Instant::now();
        while !s.lock().start_asked {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the API thread did not hand the start to the runner"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(s.lock().vm.is_none(), "the API thread made the VM itself");
        // The runner's `monitor_setup_ms` starts when the API thread got
        // the request, not when the runner woke.
        assert!(
            s.lock().start_received.is_some_and(|r| r <= Instant::now()),
            "the receipt time was not handed to the runner"
        );
        // No runner comes in this test: end the service; the handler's wait
        // ends with "shutting down".
        {
            let mut g = s.lock();
            g.start_asked = false;
            g.ended = true;
        }
        s.cv.notify_all();
        let r = h.join().expect("handler thread");
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn pre_boot_configuration_and_wrong_phase_calls() {
        let s = svc();
        assert!(
            matches!(s.handle(Request::GetInstance), Ok(Reply::Json(v)) if v["state"] == "Not started")
        );
        let m = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 64,
            ..MachineConfig::default()
        };
        assert_eq!(
            s.handle(Request::PutMachineConfig(m.clone())),
            Ok(Reply::NoContent)
        );
        assert_eq!(s.handle(Request::GetMachineConfig), Reply::json(&m),);
        // Bad values change nothing.
        for bad in [
            MachineConfig {
                vcpu_count: 0,
                ..m.clone()
            },
            MachineConfig {
                vcpu_count: 33,
                ..m.clone()
            },
            MachineConfig {
                mem_size_mib: 0,
                ..m.clone()
            },
            MachineConfig {
                mem_size_mib: 3,
                ..m.clone()
            },
            MachineConfig {
                smt: true,
                ..m.clone()
            },
            MachineConfig {
                cpu_template: Some("T2".into()),
                ..m.clone()
            },
        ] {
            let e = s.handle(Request::PutMachineConfig(bad)).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(!e.message.is_empty());
        }
        assert_eq!(s.handle(Request::GetMachineConfig), Reply::json(&m));
        // Post-boot calls before the start.
        for r in [
            Request::Action(ActionType::SendCtrlAltDel),
            Request::PatchVm(VmState::Paused),
        ] {
            assert_eq!(s.handle(r).unwrap_err().message, BEFORE_START);
        }
        assert!(s.handle(Request::GetMemory).is_err());
        // Balloon: too big refused, hinting refused, then a good one.
        let b = Balloon {
            amount_mib: 65,
            deflate_on_oom: false,
            stats_polling_interval_s: 1,
            free_page_hinting: false,
            free_page_reporting: true,
        };
        assert!(s.handle(Request::PutBalloon(b.clone())).is_err());
        assert!(s
            .handle(Request::PutBalloon(Balloon {
                amount_mib: 8,
                free_page_hinting: true,
                ..b.clone()
            }))
            .is_err());
        assert!(s.handle(Request::GetBalloon).is_err());
        let b = Balloon { amount_mib: 8, ..b };
        assert_eq!(
            s.handle(Request::PutBalloon(b.clone())),
            Ok(Reply::NoContent)
        );
        assert_eq!(
            s.handle(Request::PatchBalloon(BalloonUpdate { amount_mib: 16 })),
            Ok(Reply::NoContent)
        );
        let got = s.handle(Request::GetBalloon).unwrap();
        assert_eq!(
            got,
            Reply::json(&Balloon {
                amount_mib: 16,
                ..b
            })
            .unwrap()
        );
        assert!(s
            .handle(Request::PutBootSource(BootSource {
                kernel_image_path: "/nonexistent/vmlinux".into(),
                initrd_path: None,
                boot_args: None
            }))
            .is_err());
        assert!(s
            .handle(Request::PutLogger(Logger {
                log_path: None,
                level: Some("Loud".into()),
                show_level: false,
                show_log_origin: false,
                module: None
            }))
            .is_err());
        // Metrics: once, as Firecracker.
        let metrics = std::env::temp_dir().join(format!("vmm-svc-metrics-{}", std::process::id()));
        let m = crate::api::models::Metrics {
            metrics_path: metrics.display().to_string(),
        };
        assert_eq!(
            s.handle(Request::PutMetrics(m.clone())),
            Ok(Reply::NoContent)
        );
        let e = s.handle(Request::PutMetrics(m)).unwrap_err();
        assert!(
            e.message
                .starts_with("Reinitialization of metrics not allowed"),
            "{e:?}"
        );
        let _ = std::fs::remove_file(&metrics);
        // Statistics and FlushMetrics exist only after the start.
        for r in [
            Request::GetBalloonStats,
            Request::Action(ActionType::FlushMetrics),
        ] {
            assert_eq!(s.handle(r).unwrap_err().message, BEFORE_START);
        }
        let cfg = s.handle(Request::GetVmConfig).unwrap();
        let Reply::Json(v) = cfg else {
            panic!("no body")
        };
        assert_eq!(v["machine-config"]["mem_size_mib"], 64);
        assert!(v.get("boot-source").is_none());
    }

    #[test]
    fn the_logger_writes_what_its_level_lets_through() {
        let s = svc();
        let path = std::env::temp_dir().join(format!("vmm-svc-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let logger = |level: &str| Logger {
            log_path: Some(path.display().to_string()),
            level: Some(level.into()),
            show_level: true,
            show_log_origin: false,
            module: None,
        };
        let mut cfg = VmConfigFile {
            logger: Some(logger("Warning")),
            ..VmConfigFile::default()
        };
        s.log(&cfg, "Info", "not shown");
        s.log(&cfg, "Error", "shown");
        cfg.logger = Some(logger("off"));
        s.log(&cfg, "Error", "not shown either");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(text, "[t] Error shown\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_default_guests_balloon_holds_at_most_vcpu_0s_share() {
        let s = svc();
        let m = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 66,
            ..MachineConfig::default()
        };
        assert_eq!(s.handle(Request::PutMachineConfig(m)), Ok(Reply::NoContent));
        // 64 MiB of workload memory after the first 2 MiB: 32 MiB each.
        let b = |amount_mib| Balloon {
            amount_mib,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_hinting: false,
            free_page_reporting: false,
        };
        let e = s.handle(Request::PutBalloon(b(33))).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("vCPU 0's share"), "{}", e.message);
        assert!(e.message.contains("at most 32"), "{}", e.message);
        assert!(
            s.handle(Request::GetBalloon).is_err(),
            "a refused PUT changes nothing"
        );
        assert_eq!(s.handle(Request::PutBalloon(b(32))), Ok(Reply::NoContent));
        let e = s
            .handle(Request::PatchBalloon(BalloonUpdate { amount_mib: 40 }))
            .unwrap_err();
        assert!(e.message.contains("at most 32"), "{}", e.message);
        assert_eq!(s.handle(Request::GetBalloon), Reply::json(&b(32)));
        // More vCPUs shrink the share: the start refuses what no longer fits.
        let m4 = MachineConfig {
            vcpu_count: 4,
            mem_size_mib: 66,
            ..MachineConfig::default()
        };
        assert_eq!(
            s.handle(Request::PutMachineConfig(m4)),
            Ok(Reply::NoContent)
        );
        let e = s
            .handle(Request::Action(ActionType::InstanceStart))
            .unwrap_err();
        assert!(
            e.message.starts_with("InstanceStart failed"),
            "{}",
            e.message
        );
        assert!(e.message.contains("at most 16"), "{}", e.message);
        // A Linux guest's driver may give all its RAM.
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            s.handle(Request::PutBootSource(BootSource {
                kernel_image_path: exe.display().to_string(),
                initrd_path: None,
                boot_args: None,
            })),
            Ok(Reply::NoContent)
        );
        assert_eq!(
            s.handle(Request::PatchBalloon(BalloonUpdate { amount_mib: 66 })),
            Ok(Reply::NoContent)
        );
        let e = s
            .handle(Request::PatchBalloon(BalloonUpdate { amount_mib: 67 }))
            .unwrap_err();
        assert!(e.message.contains("66 MiB of RAM"), "{}", e.message);
    }

    #[test]
    fn a_stop_before_the_start_ends_the_run() {
        let s = svc();
        s.request_stop(libc::SIGTERM);
        assert_eq!(s.run(), Ended::NotStarted);
        assert!(s.handle(Request::GetInstance).is_err());
    }
}
