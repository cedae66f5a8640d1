//! `gmm bench linux`: the same Linux guest (the fixture in
//! `../shared/linux-guest/`) under our `vmm`, QEMU and Firecracker, one
//! monitor at a time, in the same run.
//!
//! Each monitor boots the guest in sessions (a boot is ~35 s on a host
//! that emulates guest ring 0, so one boot serves several rows):
//!
//! - **idle, side by side** (`--mem`, guest in `idle` mode): every
//!   monitor's guest boots, one after the other; once all of them idle
//!   (init's first report), each process's CPU time is counted over the same
//!   `--idle-windows` windows of `--idle-seconds`, and its median window
//!   is `*_idle_cpu_pct` (% of one core; every window in `idle_windows`).
//!   Counted at the same time, host noise falls on every monitor alike.
//!   Every monitor asks the guest for its balloon statistics every
//!   `idle_stats_polling_s` meanwhile (QEMU through QMP), so each window
//!   holds the same guest work.
//! - **boot + balloon** (`--mem`, default 256 MiB, guest in `idle` mode),
//!   one monitor at a time: spawn → the console line `INIT-REACHED` is
//!   `*_init_s`; then the balloon target is raised by `--inflate` MiB
//!   (ours and Firecracker: `PATCH /balloon`; QEMU: QMP `balloon`) and
//!   the guest's own virtio-balloon driver inflates it; the time until
//!   the device reports the whole amount (`GET /balloon/statistics`
//!   `actual_mib`; QMP `query-balloon` `actual`) gives
//!   `*_inflate_mib_per_s`.
//! - **teardown** (each of `--teardown-sizes`, guest RAM populated
//!   host-side where the monitor can: ours `--populate`, QEMU
//!   `prealloc=on`; Firecracker has no such option, so its RSS at the stop
//!   is reported beside its time): once `INIT-REACHED`, the stop request
//!   (`--stops`: SIGTERM, or `PUT /actions SendCtrlAltDel` for ours and
//!   Firecracker; QEMU: QMP `quit` either way) starts the clock;
//!   `stop_to_memory_back_ms` runs until the process's RSS fell below a
//!   tenth of what it was and the host has the memory: its `MemFree`
//!   rose by eight tenths of that RSS (polled every ms; an exiting
//!   process's RSS reads 0 once its main thread left the address space,
//!   before its last thread freed it); with `--backing memfd` until the
//!   host's `Shmem` fell by nine tenths of it instead (a file's pages come
//!   back when they are punched or the file is closed, not when they
//!   leave the RSS); `stop_to_exit_ms` until `waitpid` returned.
//! - **backing** (`--backing`): anonymous guest RAM, or memfd for ours
//!   (`--backing memfd`) and QEMU (`memory-backend-memfd,share=on`);
//!   Firecracker has no memfd-backed guest RAM and is then skipped.
//!
//! Ours and Firecracker get the same API calls (`PUT /boot-source`,
//! `/machine-config`, `/balloon`, `/actions`). `monitor_setup_ms` is our
//! `vmm`'s own figure (`InstanceStart` received to just before the first
//! `KVM_RUN`), read from its log: the median of the boot session's and
//! of `--setup-starts` more starts, each stopped once its vCPUs ran (one
//! start is a single sample of a few ms, which another process on the
//! machine can double). A peer that
//! is not installed is skipped and says why; nothing is assumed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::peer::{rss_of, sock_path, tail, vmm_binary, which, Qmp, SockFile, Waited};
use crate::rng::{ms, round};
use crate::schema::{LinuxBacking, LinuxIdleWindows, LinuxResult, LinuxTeardownRow as TeardownRow};
pub use crate::schema::{Monitor, Stop};
use crate::units::{human_bytes, parse_size, parse_size_list, SizeList};
use crate::{emit_json, say};

/// The kernel command line the fixture needs on this host (its README).
pub const FIXTURE_CMDLINE: &str = "console=ttyS0 noxsave \
    clearcpuid=popcnt,cx16,smap,smep,pcid,invpcid,fsgsbase,rdrand,rdseed,rdpid \
    nopti mitigations=off tsc=reliable no_timer_check reboot=k panic=-1 \
    i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Whether a thread named `name` (its `comm`, at most 15 bytes) is one of
/// monitor `m`'s vCPU threads: ours `vcpu0`, `vcpu1`, ...; QEMU
/// `CPU 0/KVM`; Firecracker `fc_vcpu 0`.
pub fn is_vcpu_thread(m: Monitor, name: &str) -> bool {
    match m {
        Monitor::Ours => name
            .strip_prefix("vcpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        Monitor::Qemu => name.starts_with("CPU ") && name.ends_with("/KVM"),
        Monitor::Fc => name.starts_with("fc_vcpu"),
    }
}

/// Seconds between the guest's idle reports (`guest.period`): each
/// report reads `/proc/meminfo` a byte per system call, seconds of
/// emulated guest kernel here, so an idle window must fit between two.
const GUEST_PERIOD_S: u32 = 600;

/// Seconds between the balloon statistics each monitor asks its guest
/// for, all three alike (`LinuxResult::idle_stats_polling_s`): every idle
/// window then holds the same guest work.
const STATS_POLLING_S: u32 = 1;

/// `--idle-seconds`: more than 0, less than half of [`GUEST_PERIOD_S`].
fn parse_idle_seconds(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let max = f64::from(GUEST_PERIOD_S) / 2.0;
    if v > 0.0 && v <= max {
        Ok(v)
    } else {
        Err(format!(
            "{s}: the idle window must be more than 0 and at most {max} s (the guest reports every {GUEST_PERIOD_S} s)"
        ))
    }
}

/// How long a boot to `INIT-REACHED` may take.
const BOOT_BUDGET: Duration = Duration::from_secs(180);
/// How long the balloon may take to reach its target.
const INFLATE_BUDGET: Duration = Duration::from_secs(120);
/// How long a stopped monitor may take to exit.
const EXIT_BUDGET: Duration = Duration::from_secs(60);
/// How long after its exit a monitor's memory may take to reach the host.
const BACK_AFTER_EXIT: Duration = Duration::from_secs(10);

/// Options of `gmm bench linux`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory with `vmlinux` and `initrd.cpio` (default:
    /// $GMM_LINUX_GUEST_DIR, else ../shared/linux-guest beside the repo).
    #[arg(long)]
    pub guest_dir: Option<PathBuf>,
    /// Guest RAM of the boot + balloon session.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs of every session.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// MiB the balloon inflates by.
    #[arg(long, default_value_t = 32)]
    pub inflate: u64,
    /// Guest RAM sizes of the teardown sessions.
    #[arg(long, default_value = "1G,2G", value_parser = parse_size_list)]
    pub teardown_sizes: SizeList,
    /// Skip the teardown sessions.
    #[arg(long)]
    pub no_teardown: bool,
    /// How the teardown sessions stop the guest (each a session per size).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sigterm")]
    pub stops: Vec<Stop>,
    /// Firecracker's `huge_pages` for ours and Firecracker: `None` (4 KiB
    /// pages) or `Transparent` (THP, what QEMU's RAM gets by default).
    #[arg(long, default_value = "Transparent")]
    pub huge_pages: String,
    /// What guest RAM is made of, for ours and QEMU: anonymous memory, or
    /// memfd (shared file memory: ours `--backing memfd`, QEMU
    /// `memory-backend-memfd`). Firecracker has no memfd-backed guest RAM:
    /// with memfd it is skipped, and the result says why.
    #[arg(long, value_enum, default_value = "anon")]
    pub backing: LinuxBacking,
    /// Length of each idle window, over which every monitor's CPU time is
    /// counted while its booted guest's init waits (clock-tick
    /// resolution). The windows start at init's first idle report and
    /// must all end before its next one.
    #[arg(long, default_value_t = 10.0, value_parser = parse_idle_seconds)]
    pub idle_seconds: f64,
    /// Idle windows, one after the other; every monitor's guest idles in
    /// all of them at once, and each monitor's figure is its median.
    /// 5 by default: in the report with 3, a monitor's windows spread
    /// by 1-2 points around its median (10 s more each cost little next
    /// to the boots).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=30))]
    pub idle_windows: u32,
    /// Extra starts of ours, each stopped (SIGTERM) right after its first
    /// `KVM_RUN`, for `monitor_setup_ms` (the median of them and the
    /// boot session's own).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub setup_starts: u32,
    /// Monitors to run, of `ours`, `qemu`, `fc`.
    #[arg(long, value_delimiter = ',', default_value = "ours,qemu,fc")]
    pub monitors: Vec<Monitor>,
    /// QEMU binary (looked up in PATH unless it has a '/').
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    /// Firecracker binary (default: ../shared/firecracker/firecracker
    /// beside the repo, else `firecracker` in PATH).
    #[arg(long)]
    pub firecracker: Option<String>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

impl Monitor {
    fn name(self) -> &'static str {
        match self {
            Monitor::Ours => "ours",
            Monitor::Qemu => "qemu",
            Monitor::Fc => "fc",
        }
    }
}

/// The fixture and how to start each monitor.
struct Setup {
    huge_pages: String,
    backing: LinuxBacking,
    kernel: PathBuf,
    initrd: PathBuf,
    vcpus: u32,
    vmm: Option<PathBuf>,
    qemu: Option<PathBuf>,
    fc: Option<PathBuf>,
}

/// A running monitor with the guest console streamed line by line.
struct Running {
    monitor: Monitor,
    child: Waited,
    lines: Receiver<(Instant, String)>,
    /// API socket (ours, Firecracker) or QMP socket (QEMU).
    sock: SockFile,
    qmp: Option<Qmp>,
    started: Instant,
    mem: u64,
    backing: LinuxBacking,
    /// Console lines seen, for error messages and our JSON summary.
    seen: Vec<String>,
}

fn default_guest_dir() -> PathBuf {
    std::env::var_os("GMM_LINUX_GUEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/linux-guest"),
        PathBuf::from,
    )
}

fn default_fc() -> String {
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/firecracker/firecracker");
    if beside.is_file() {
        beside.display().to_string()
    } else {
        "firecracker".into()
    }
}

impl Running {
    fn spawn(s: &Setup, monitor: Monitor, mem: u64, populate: bool, mode: &str) -> Result<Self> {
        let sock = SockFile(sock_path(monitor.name()));
        let _ = std::fs::remove_file(&sock.0);
        let cmdline = format!("{FIXTURE_CMDLINE} guest.mode={mode} guest.period={GUEST_PERIOD_S}");
        let mib = mem >> 20;
        let started = Instant::now();
        let cmd = match monitor {
            Monitor::Ours => {
                let mut c = Command::new(s.vmm.as_ref().context("no vmm binary")?);
                c.arg("--api-sock").arg(&sock.0);
                if populate {
                    c.arg("--populate");
                }
                if s.backing == LinuxBacking::Memfd {
                    c.args(["--backing", "memfd"]);
                }
                c
            }
            Monitor::Qemu => {
                let mut c = Command::new(s.qemu.as_ref().context("no QEMU")?);
                c.args([
                    "-M",
                    "microvm,acpi=off,rtc=on",
                    "-enable-kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                    "-smp",
                ])
                .arg(s.vcpus.to_string())
                .arg("-object")
                .arg(format!(
                    "{},id=m0,size={mib}M,prealloc={}",
                    match s.backing {
                        LinuxBacking::Anon => "memory-backend-ram",
                        LinuxBacking::Memfd => "memory-backend-memfd,share=on",
                    },
                    if populate { "on" } else { "off" }
                ))
                .args(["-m", &format!("{mib}M"), "-machine", "memory-backend=m0"])
                .args(["-nodefaults", "-no-user-config", "-nographic"])
                // Thread names (`CPU 0/KVM`): the idle window counts the
                // vCPU threads apart.
                .args(["-name", "gmm-linux,debug-threads=on"])
                .args(["-serial", "stdio", "-no-reboot", "-kernel"])
                .arg(&s.kernel)
                .arg("-initrd")
                .arg(&s.initrd)
                .args([
                    "-device",
                    "virtio-balloon-device,id=balloon0",
                    "-append",
                    &cmdline,
                    "-qmp",
                ])
                .arg(format!("unix:{},server=on,wait=off", sock.0.display()));
                c
            }
            Monitor::Fc => {
                let mut c = Command::new(s.fc.as_ref().context("no Firecracker")?);
                c.arg("--api-sock").arg(&sock.0);
                c
            }
        };
        let (child, lines) = Waited::spawn_lines(cmd)?;
        let mut r = Running {
            monitor,
            child,
            lines,
            sock,
            qmp: None,
            started,
            mem,
            backing: s.backing,
            seen: Vec::new(),
        };
        match monitor {
            Monitor::Qemu => {
                r.wait_socket()?;
                let mut q = Qmp::connect(&r.sock.0).context("connecting to QMP")?;
                q.line()?;
                q.execute(r#"{"execute":"qmp_capabilities"}"#)?;
                // The guest's balloon statistics every second, as ours and
                // Firecracker are asked for below: the same guest work in
                // every monitor's idle window.
                q.execute(
                    &json!({
                        "execute": "qom-set",
                        "arguments": {
                            "path": "/machine/peripheral/balloon0",
                            "property": "guest-stats-polling-interval",
                            "value": STATS_POLLING_S,
                        },
                    })
                    .to_string(),
                )?;
                r.qmp = Some(q);
            }
            // The same Firecracker API calls to both.
            Monitor::Ours | Monitor::Fc => {
                r.wait_socket()?;
                r.api(
                    "PUT",
                    "/boot-source",
                    &json!({
                        "kernel_image_path": s.kernel, "initrd_path": s.initrd, "boot_args": cmdline,
                    }),
                )?;
                r.api(
                    "PUT",
                    "/machine-config",
                    &json!({
                        "vcpu_count": s.vcpus, "mem_size_mib": mib, "huge_pages": s.huge_pages,
                    }),
                )?;
                r.api(
                    "PUT",
                    "/balloon",
                    &json!({
                        "amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": STATS_POLLING_S,
                    }),
                )?;
                r.api(
                    "PUT",
                    "/actions",
                    &json!({ "action_type": "InstanceStart" }),
                )?;
            }
        }
        Ok(r)
    }

    fn who(&self) -> &'static str {
        self.monitor.name()
    }

    fn died(&mut self) -> Result<()> {
        if let Some(o) = self.child.exited() {
            bail!(
                "{} exited early ({}): {}\nconsole: {}",
                self.who(),
                o.status,
                tail(&o.stderr),
                self.seen[self.seen.len().saturating_sub(5)..].join("\n")
            );
        }
        Ok(())
    }

    fn wait_socket(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !crate::peer::listening(&self.sock.0) {
            self.died()?;
            if Instant::now() > deadline {
                bail!("{} did not listen on its socket in 30 s", self.who());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    fn api(&self, method: &str, uri: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        vmm::api::call(&self.sock.0, method, uri, Some(body))
            .with_context(|| format!("{} refused {method} {uri} {body}", self.who()))
    }

    /// Waits for a console line starting with `marker`; when it was read.
    fn wait_line(&mut self, marker: &str, budget: Duration) -> Result<Instant> {
        let deadline = Instant::now() + budget;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok((t, l)) => {
                    let hit = l.trim_start().starts_with(marker);
                    self.seen.push(l);
                    if hit {
                        return Ok(t);
                    }
                }
                Err(_) => self.died()?,
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no `{marker}` on the console within {} s; last lines:\n{}",
                    self.who(),
                    budget.as_secs(),
                    self.seen[self.seen.len().saturating_sub(8)..].join("\n")
                );
            }
        }
    }

    /// Reads the child's console lines that came so far.
    fn drain(&mut self) {
        while let Ok((_, l)) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// The process's CPU time so far, and each vCPU thread's
    /// ([`is_vcpu_thread`]: the guest's own kernel, run or emulated inside
    /// `KVM_RUN`); `None` if the process is gone.
    fn cpu_now(&self) -> Option<CpuNow> {
        let (pid, m) = (self.child.pid, self.monitor);
        let vcpus = vmm::proc_stats::thread_cpu_times(pid)
            .into_iter()
            .filter(|(_, name, _)| is_vcpu_thread(m, name))
            .map(|(tid, _, cpu)| (tid, cpu))
            .collect();
        Some(CpuNow {
            total: vmm::proc_stats::cpu_time_of(pid)?,
            vcpus,
        })
    }

    /// Fails unless the guest kept sending its balloon statistics through
    /// an idle window that began at `since` (the work each window must
    /// hold alike, [`STATS_POLLING_S`]): QEMU's last update came in the
    /// window (the guest also sends one when its driver starts); ours and
    /// Firecracker have statistics and poll them at that interval.
    fn stats_arrived(&mut self, since: SystemTime) -> Result<()> {
        let since = since
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let why = match self.monitor {
            Monitor::Qemu => {
                let q = self.qmp.as_mut().context("no QMP")?;
                let l = q.execute(
                    r#"{"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats"}}"#,
                )?;
                let v: serde_json::Value = serde_json::from_str(&l)?;
                match v["return"]["last-update"].as_u64() {
                    Some(t) if t >= since => None,
                    t => Some(format!(
                        "its last update (s) {t:?} came before the window began ({since})"
                    )),
                }
            }
            _ => {
                let b = vmm::api::call(&self.sock.0, "GET", "/balloon", None)
                    .with_context(|| format!("{}: GET /balloon", self.who()))?;
                let st = vmm::api::call(&self.sock.0, "GET", "/balloon/statistics", None)
                    .with_context(|| format!("{}: GET /balloon/statistics", self.who()))?;
                if b["stats_polling_interval_s"].as_u64() != Some(u64::from(STATS_POLLING_S)) {
                    Some(format!("the balloon is {b}"))
                } else if !st["free_memory"].is_u64() {
                    Some(format!("the statistics are {st}"))
                } else {
                    None
                }
            }
        };
        match why {
            None => Ok(()),
            Some(why) => bail!(
                "{}: the guest was not polled for its balloon statistics every {STATS_POLLING_S} s in the idle window ({why}), so it did not do the work the other monitors' guests do",
                self.who()
            ),
        }
    }

    /// Bytes in the balloon now.
    fn ballooned(&mut self) -> Result<u64> {
        match self.monitor {
            Monitor::Qemu => {
                let q = self.qmp.as_mut().context("no QMP")?;
                let l = q.execute(r#"{"execute":"query-balloon"}"#)?;
                let v: serde_json::Value = serde_json::from_str(&l)?;
                let actual = v["return"]["actual"]
                    .as_u64()
                    .context("query-balloon without `actual`")?;
                Ok(self.mem.saturating_sub(actual))
            }
            _ => {
                let v = vmm::api::call(&self.sock.0, "GET", "/balloon/statistics", None)
                    .with_context(|| format!("{}: GET /balloon/statistics", self.who()))?;
                let mib = v["actual_mib"].as_u64().with_context(|| {
                    format!("{}: statistics without actual_mib: {v}", self.who())
                })?;
                Ok(mib << 20)
            }
        }
    }

    /// Inflates the balloon by `mib` MiB; seconds until the device had it.
    fn inflate(&mut self, mib: u64) -> Result<f64> {
        let target = mib << 20;
        let t = Instant::now();
        match self.monitor {
            Monitor::Qemu => {
                let q = self.qmp.as_mut().context("no QMP")?;
                q.execute(&format!(
                    r#"{{"execute":"balloon","arguments":{{"value":{}}}}}"#,
                    self.mem - target
                ))?;
            }
            _ => {
                self.api("PATCH", "/balloon", &json!({ "amount_mib": mib }))?;
            }
        }
        loop {
            // Keep the console drained (and the child's pipe from filling).
            self.drain();
            if self.ballooned()? >= target {
                return Ok(t.elapsed().as_secs_f64());
            }
            self.died()?;
            if t.elapsed() > INFLATE_BUDGET {
                bail!(
                    "{}: the balloon did not reach {mib} MiB in {} s",
                    self.who(),
                    INFLATE_BUDGET.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends the stop request and times memory back and exit.
    fn stop(
        mut self,
        populated: bool,
        how: Stop,
    ) -> Result<(TeardownRow, Option<serde_json::Value>)> {
        self.drain();
        let rss = rss_of(self.child.pid);
        // Memory is back once the host has it, not once the RSS says so:
        // `/proc/<pid>/statm` reads 0 as soon as the process's main thread
        // has left the address space on its way out, while another of its
        // threads may still be freeing it (QEMU at 1 GiB: the RSS gone
        // 1.5-3 ms after `quit`, the host's MemFree up only after 8-10).
        // Anon: the host's `MemFree` must have risen by eight tenths of
        // that RSS (the rest: the binary, libraries, page cache). memfd:
        // the guest's pages live in the file, whose pages the host gets
        // back only once they are punched or the file is closed: a
        // process can drop them from its RSS (munmap) and still hold
        // them; the host's `Shmem` must have fallen by nine tenths of it.
        let (key, host0) = match self.backing {
            LinuxBacking::Memfd => ("Shmem:", vmm::proc_stats::meminfo("Shmem:")),
            LinuxBacking::Anon => ("MemFree:", vmm::proc_stats::meminfo("MemFree:")),
        };
        let host0 = host0.with_context(|| format!("reading {key} in /proc/meminfo"))?;
        let host_back = || {
            vmm::proc_stats::meminfo(key).is_some_and(|now| match self.backing {
                LinuxBacking::Memfd => now + rss / 10 * 9 <= host0,
                LinuxBacking::Anon => now >= host0 + rss / 10 * 8,
            })
        };
        let t = Instant::now();
        match self.monitor {
            Monitor::Qemu => {
                self.qmp
                    .as_mut()
                    .context("no QMP")?
                    .send(r#"{"execute":"quit"}"#)?;
            }
            _ if how == Stop::CtrlAltDel => {
                self.api(
                    "PUT",
                    "/actions",
                    &json!({ "action_type": "SendCtrlAltDel" }),
                )?;
            }
            _ => {
                let pid = libc::pid_t::try_from(self.child.pid)?;
                // SAFETY: our own unreaped child (its waiter has not
                // reported), so the pid is still ours.
                if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                    bail!("SIGTERM to {} failed", self.who());
                }
            }
        }
        let mut back = None;
        let mut rss_low = false;
        let exit = loop {
            rss_low = rss_low || rss_of(self.child.pid) < rss / 10;
            if back.is_none() && rss_low && host_back() {
                back = Some(ms(t.elapsed()));
            }
            if let Some(o) = self.child.exited() {
                break o;
            }
            if t.elapsed() > EXIT_BUDGET {
                bail!(
                    "{} did not exit within {} s of the stop",
                    self.who(),
                    EXIT_BUDGET.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let exit_ms = ms(t.elapsed());
        // The memory may be freed only by the exit (a memfd's last close,
        // the last thread of a process that releases nothing itself): that
        // takes milliseconds; a host whose free memory others took in the
        // meantime leaves the figure out after `BACK_AFTER_EXIT`.
        let exited = Instant::now();
        while back.is_none() && exited.elapsed() < BACK_AFTER_EXIT {
            if host_back() {
                back = Some(ms(t.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        while let Ok((_, l)) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        // Our monitor logs its own share of the start on stderr.
        let summary = String::from_utf8_lossy(&exit.stderr)
            .lines()
            .find_map(|l| l.split("monitor_setup_ms=").nth(1))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| json!({ "monitor_setup_ms": v }));
        Ok((
            TeardownRow {
                monitor: self.monitor,
                stop: how,
                mem_mib: self.mem >> 20,
                populated,
                rss_at_stop_bytes: rss,
                stop_to_memory_back_ms: back.map(|b| round(b, 3)),
                stop_to_exit_ms: round(exit_ms, 3),
                exit_status: exit.status.code(),
            },
            summary,
        ))
    }
}

/// A monitor process's CPU time at one instant ([`Running::cpu_now`]).
struct CpuNow {
    total: Duration,
    vcpus: Vec<(u32, Duration)>,
}

impl CpuNow {
    /// % of one core over `el` since `before`: the whole process's, and
    /// its vCPU threads' (the same threads at both ends: a vCPU thread is
    /// never replaced while the guest idles; one missing at either end is
    /// not counted; `None` without any).
    fn pct_since(&self, before: &CpuNow, el: Duration) -> (f64, Option<f64>) {
        let pct = |d: Duration| round(d.as_secs_f64() / el.as_secs_f64() * 100.0, 3);
        let vcpu: Duration = self
            .vcpus
            .iter()
            .filter_map(|(tid, a)| {
                let (_, b) = before.vcpus.iter().find(|(t, _)| t == tid)?;
                Some(a.saturating_sub(*b))
            })
            .sum();
        let any = !self.vcpus.is_empty() && !before.vcpus.is_empty();
        (
            pct(self.total.saturating_sub(before.total)),
            any.then(|| pct(vcpu)),
        )
    }
}

/// Boots every monitor's guest, one after the other, and, once all of
/// them idle, counts each process's CPU over the same `--idle-windows`
/// windows of `--idle-seconds`. Host noise (other load, this VM's own hypervisor)
/// then falls on every monitor alike; in boot sessions minutes apart each
/// met its own, and one monitor's window could read 2 points above
/// another's for the same guest work. Fills `r`'s idle fields with each
/// monitor's median window; a monitor that fails is skipped, with why.
fn idle_side_by_side(s: &Setup, monitors: &[Monitor], a: &Args, r: &mut LinuxResult) {
    let names: Vec<&str> = monitors.iter().map(|m| m.name()).collect();
    say(
        a.json,
        &format!(
            "idle, side by side: {} booting one after the other ({}, {} vCPUs each), then {} windows of {} s ...\n",
            names.join(", "),
            human_bytes(a.mem),
            a.vcpus,
            a.idle_windows,
            a.idle_seconds
        ),
    );
    let skip = |r: &mut LinuxResult, m: Monitor, e: anyhow::Error| {
        say(a.json, &format!("  {}: FAILED: {e:#}\n", m.name()));
        r.skipped.push(format!("{} idle: {e:#}", m.name()));
    };
    // One boot after the other, the earlier guests idling meanwhile: boots
    // at once put 3 guests' vCPUs on 2 cores, where a guest kernel that
    // spins for another vCPU (stop_machine, IPIs) waits for it to be
    // scheduled, and three boots took minutes instead of ~35 s each.
    let mut up = Vec::new();
    for &m in monitors {
        let booted = Running::spawn(s, m, a.mem, false, "idle").and_then(|mut run| {
            // init's first idle report (after `NPROC`: init prints a
            // `MEMTOTAL` line at its start too): it has read /proc/meminfo
            // (busybox `read` takes it a byte per system call: ~2 s of
            // emulated guest kernel here) and now sleeps for a period.
            run.wait_line("NPROC", BOOT_BUDGET)?;
            run.wait_line("MEMTOTAL", Duration::from_secs(60))?;
            Ok(run)
        });
        match booted {
            Ok(run) => up.push(run),
            Err(e) => skip(r, m, e),
        }
        up.iter_mut().for_each(Running::drain);
    }
    let since = SystemTime::now();
    let lines_before: Vec<usize> = up.iter().map(|run| run.seen.len()).collect();
    let window = Duration::from_secs_f64(a.idle_seconds);
    let mut figures: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); up.len()];
    for _ in 0..a.idle_windows {
        let before: Vec<Option<CpuNow>> = up.iter().map(Running::cpu_now).collect();
        let t = Instant::now();
        while let Some(left) = (t + window).checked_duration_since(Instant::now()) {
            up.iter_mut().for_each(Running::drain);
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
        let el = t.elapsed();
        for (i, run) in up.iter().enumerate() {
            if let (Some(b), Some(n)) = (&before[i], run.cpu_now()) {
                let (all, vcpu) = n.pct_since(b, el);
                figures[i].0.push(all);
                figures[i].1.extend(vcpu);
            }
        }
    }
    for ((mut run, (cpu, vcpu)), mark) in up.into_iter().zip(figures).zip(lines_before) {
        let m = run.monitor;
        run.drain();
        let reported = run.seen[mark..]
            .iter()
            .any(|l| l.trim_start().starts_with("MEMTOTAL"));
        let checked = if reported {
            // Each report is seconds of emulated guest kernel: this guest
            // did more work in the windows than the others.
            Err(anyhow::anyhow!(
                "its guest reported (`MEMTOTAL`) during the idle windows: ask for fewer or shorter windows"
            ))
        } else if cpu.len() < a.idle_windows as usize {
            Err(anyhow::anyhow!(
                "its CPU time could be read in {} of {} windows (did it exit?)",
                cpu.len(),
                a.idle_windows
            ))
        } else {
            run.stats_arrived(since)
        };
        if let Err(e) = checked {
            skip(r, m, e);
            continue;
        }
        let med = |v: &[f64]| (v.len() == cpu.len()).then(|| round(crate::rng::median(v), 3));
        let (idle, idle_vcpu) = (med(&cpu), med(&vcpu));
        say(
            a.json,
            &format!(
                "  {}: idle {idle:?} % of a core (windows {cpu:?}), vCPU threads {idle_vcpu:?} %\n",
                m.name()
            ),
        );
        match m {
            Monitor::Ours => (r.ours_idle_cpu_pct, r.ours_idle_vcpu_cpu_pct) = (idle, idle_vcpu),
            Monitor::Qemu => (r.qemu_idle_cpu_pct, r.qemu_idle_vcpu_cpu_pct) = (idle, idle_vcpu),
            Monitor::Fc => (r.fc_idle_cpu_pct, r.fc_idle_vcpu_cpu_pct) = (idle, idle_vcpu),
        }
        r.idle_windows.push(LinuxIdleWindows {
            monitor: m,
            seconds: a.idle_seconds,
            cpu_pct: cpu,
            vcpu_cpu_pct: vcpu,
        });
        if let Err(e) = run.stop(false, Stop::Sigterm) {
            r.skipped.push(format!(
                "{}: stopping after the idle windows: {e:#}",
                m.name()
            ));
        }
    }
    r.idle_side_by_side = !r.idle_windows.is_empty();
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(round(a / b, 3)),
        _ => None,
    }
}

/// Run the command.
/// `monitor_setup_ms` of our monitor's summary, if it logged one.
fn setup_ms(summary: Option<&serde_json::Value>) -> Option<f64> {
    summary
        .and_then(|v| v.get("monitor_setup_ms"))
        .and_then(serde_json::Value::as_f64)
}

/// One start of ours through the API, stopped as soon as its vCPUs ran:
/// its `monitor_setup_ms`.
fn quick_start(s: &Setup, mem: u64) -> Result<Option<f64>> {
    let run = Running::spawn(s, Monitor::Ours, mem, false, "idle")?;
    // InstanceStart is answered once the vCPU threads exist; their first
    // KVM_RUN follows within a few ms.
    std::thread::sleep(Duration::from_millis(100));
    let (_, summary) = run.stop(false, Stop::Sigterm)?;
    Ok(setup_ms(summary.as_ref()))
}

pub fn cmd(a: &Args) -> Result<()> {
    let max = f64::from(GUEST_PERIOD_S) / 2.0;
    if a.idle_seconds * f64::from(a.idle_windows) > max {
        bail!(
            "--idle-windows {} of --idle-seconds {} take longer than {max} s: the windows must end before the guest's next report (every {GUEST_PERIOD_S} s); ask for fewer or shorter windows",
            a.idle_windows,
            a.idle_seconds
        );
    }
    let dir = a.guest_dir.clone().unwrap_or_else(default_guest_dir);
    let (kernel, initrd) = (dir.join("vmlinux"), dir.join("initrd.cpio"));
    if !kernel.is_file() || !initrd.is_file() {
        bail!(
            "the Linux guest fixture is not at {} (vmlinux, initrd.cpio): pass --guest-dir \
             or set GMM_LINUX_GUEST_DIR",
            dir.display()
        );
    }
    let mut r = LinuxResult {
        kernel: kernel.display().to_string(),
        mem_mib: a.mem >> 20,
        vcpus: a.vcpus,
        backing: a.backing,
        inflate_mib: a.inflate,
        idle_stats_polling_s: Some(STATS_POLLING_S),
        ..LinuxResult::default()
    };
    let mut s = Setup {
        huge_pages: a.huge_pages.clone(),
        backing: a.backing,
        kernel,
        initrd,
        vcpus: a.vcpus,
        vmm: None,
        qemu: None,
        fc: None,
    };
    let mut monitors = Vec::new();
    for &m in &a.monitors {
        let found = match m {
            Monitor::Ours => vmm_binary()
                .map(|p| s.vmm = Some(p))
                .map_err(|e| format!("{e:#}")),
            Monitor::Qemu => which(&a.qemu)
                .map(|p| s.qemu = Some(p))
                .ok_or_else(|| format!("{} not found (apt-get install qemu-system-x86)", a.qemu)),
            Monitor::Fc if a.backing == LinuxBacking::Memfd => {
                Err("Firecracker has no memfd-backed guest RAM (--backing memfd)".to_string())
            }
            Monitor::Fc => {
                let fc = a.firecracker.clone().unwrap_or_else(default_fc);
                which(&fc)
                    .map(|p| s.fc = Some(p))
                    .ok_or_else(|| format!("{fc} not found"))
            }
        };
        match found {
            Ok(()) => monitors.push(m),
            Err(why) => {
                say(a.json, &format!("SKIPPED {}: {why}\n", m.name()));
                r.skipped.push(format!("{}: {why}", m.name()));
            }
        }
    }
    if !monitors.is_empty() {
        idle_side_by_side(&s, &monitors, a, &mut r);
    }
    for &m in &monitors {
        say(
            a.json,
            &format!(
                "{}: boot + balloon, {}, {} vCPUs ...\n",
                m.name(),
                human_bytes(a.mem),
                a.vcpus
            ),
        );
        let session = (|| -> Result<_> {
            let mut run = Running::spawn(&s, m, a.mem, false, "idle")?;
            let init = run.wait_line("INIT-REACHED", BOOT_BUDGET)?;
            let init_s = init.saturating_duration_since(run.started).as_secs_f64();
            run.wait_line("NPROC", Duration::from_secs(60))?;
            // The balloon driver is up once init's first idle report is out.
            run.wait_line("MEMTOTAL", Duration::from_secs(60))?;
            let inflate_s = run.inflate(a.inflate)?;
            let (_, summary) = run.stop(false, Stop::Sigterm)?;
            Ok((init_s, inflate_s, summary))
        })();
        match session {
            Ok((init_s, inflate_s, summary)) => {
                let rate = round(a.inflate as f64 / inflate_s, 3);
                say(a.json, &format!("  INIT-REACHED after {init_s:.1} s; balloon +{} MiB in {inflate_s:.2} s ({rate} MiB/s)\n", a.inflate));
                let init_s = Some(round(init_s, 3));
                match m {
                    Monitor::Ours => {
                        r.ours_init_s = init_s;
                        r.ours_inflate_mib_per_s = Some(rate);
                        r.monitor_setup_ms_all.extend(setup_ms(summary.as_ref()));
                    }
                    Monitor::Qemu => {
                        r.qemu_init_s = init_s;
                        r.qemu_inflate_mib_per_s = Some(rate);
                    }
                    Monitor::Fc => {
                        r.fc_init_s = init_s;
                        r.fc_inflate_mib_per_s = Some(rate);
                    }
                }
            }
            Err(e) => {
                say(a.json, &format!("  FAILED: {e:#}\n"));
                r.skipped
                    .push(format!("{} boot + balloon: {e:#}", m.name()));
            }
        }
        if m == Monitor::Ours && a.setup_starts > 0 {
            say(
                a.json,
                &format!(
                    "  {} more starts for InstanceStart -> first KVM_RUN ...\n",
                    a.setup_starts
                ),
            );
            for _ in 0..a.setup_starts {
                match quick_start(&s, a.mem) {
                    Ok(Some(x)) => r.monitor_setup_ms_all.push(x),
                    Ok(None) => r
                        .skipped
                        .push("ours: a start logged no monitor_setup_ms".into()),
                    Err(e) => r.skipped.push(format!("ours: a start failed: {e:#}")),
                }
            }
            say(
                a.json,
                &format!(
                    "  InstanceStart -> first KVM_RUN: median {} ms of {:?}\n",
                    round(crate::rng::median(&r.monitor_setup_ms_all), 3),
                    r.monitor_setup_ms_all
                ),
            );
        }
        let sizes: &[u64] = if a.no_teardown {
            &[]
        } else {
            &a.teardown_sizes.0
        };
        for (&size, &how) in sizes
            .iter()
            .flat_map(|sz| a.stops.iter().map(move |h| (sz, h)))
        {
            let populated = m != Monitor::Fc;
            say(
                a.json,
                &format!(
                    "{}: teardown of a running guest, {}, stop {how:?} ...\n",
                    m.name(),
                    human_bytes(size)
                ),
            );
            let row = Running::spawn(&s, m, size, populated, "idle").and_then(|mut run| {
                run.wait_line("NPROC", BOOT_BUDGET)?;
                // The keyboard driver binds before init runs; a second more
                // and the guest is idle.
                std::thread::sleep(Duration::from_millis(1000));
                run.stop(populated, how).map(|(row, _)| row)
            });
            match row {
                Ok(row) => {
                    say(
                        a.json,
                        &format!(
                            "  RSS {} at the stop; memory back {:?} ms, exit {} ms (status {:?})\n",
                            human_bytes(row.rss_at_stop_bytes),
                            row.stop_to_memory_back_ms,
                            row.stop_to_exit_ms,
                            row.exit_status
                        ),
                    );
                    r.teardown.push(row);
                }
                Err(e) => {
                    say(a.json, &format!("  FAILED: {e:#}\n"));
                    r.skipped.push(format!(
                        "{} teardown {}: {e:#}",
                        m.name(),
                        human_bytes(size)
                    ));
                }
            }
        }
    }
    // The boot session's figure counts with `--setup-starts 0` too.
    let all = &r.monitor_setup_ms_all;
    r.monitor_setup_ms = (!all.is_empty()).then(|| round(crate::rng::median(all), 3));
    r.init_vs_qemu = ratio(r.ours_init_s, r.qemu_init_s);
    r.init_vs_fc = ratio(r.ours_init_s, r.fc_init_s);
    r.inflate_vs_qemu = ratio(r.ours_inflate_mib_per_s, r.qemu_inflate_mib_per_s);
    r.inflate_vs_fc = ratio(r.ours_inflate_mib_per_s, r.fc_inflate_mib_per_s);
    emit_json(a.json, &r)?;
    if !a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}

#[cfg(test)]
mod vcpu_thread_tests {
    use super::{is_vcpu_thread, parse_idle_seconds, Monitor, GUEST_PERIOD_S};

    /// The idle window fits between two of the guest's reports; anything
    /// else is refused with the reason.
    #[test]
    fn idle_window_is_bounded_by_the_guest_period() {
        assert_eq!(parse_idle_seconds("10"), Ok(10.0));
        let max = f64::from(GUEST_PERIOD_S) / 2.0;
        assert_eq!(parse_idle_seconds(&max.to_string()), Ok(max));
        for bad in ["0", "-1", "nan", "x", &(max + 1.0).to_string()] {
            let e = parse_idle_seconds(bad).expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
    }

    /// Each monitor's vCPU threads by the names they give them, and
    /// nothing else (API, device, I/O and helper threads).
    #[test]
    fn vcpu_threads_by_monitor() {
        for (m, yes, no) in [
            (
                Monitor::Ours,
                &["vcpu0", "vcpu1", "vcpu31"][..],
                &["vcpu", "vcpu-setup", "vmm", "api"][..],
            ),
            (
                Monitor::Qemu,
                &["CPU 0/KVM", "CPU 1/KVM"][..],
                &["qemu-system-x86", "IO mon_iothread", "CPU 0/TCG"][..],
            ),
            (
                Monitor::Fc,
                &["fc_vcpu 0", "fc_vcpu 1"][..],
                &["fc_api", "firecracker", "fc_vmm"][..],
            ),
        ] {
            for n in yes {
                assert!(is_vcpu_thread(m, n), "{m:?} {n}");
            }
            for n in no {
                assert!(!is_vcpu_thread(m, n), "{m:?} {n}");
            }
        }
    }
}
