//! Helpers shared by the end-to-end tests in `tests/tests/`: KVM presence
//! (tests print a loud SKIPPED line and return where `/dev/kvm` is missing),
//! a guard that raises `vm.nr_hugepages` for hugetlb tests and restores it,
//! small VM builders, and a checked teardown.
//!
//! Every skip and every informational line of these tests goes through
//! [`loud!`], which writes past the test harness's output capture.

/// Prints a line on the real stderr, bypassing the test harness's output
/// capture, so that a skipped test is visible in a plain `cargo test` run.
#[macro_export]
macro_rules! loud {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

use std::ffi::OsStr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{Backing, Console, MemSize, PageSize, Vm, VmConfig, Workload};

/// A command for a process a test starts (`vmm`, Firecracker, a wrapper
/// around them) that dies with the test's thread, however the test run
/// ends: a run killed outright (a CI timeout) runs no `Drop`, and a VM it
/// left behind would hold its memory and CPU time through every test
/// after it ([`vmm::child::die_with_parent`]). Spawn it from the test's
/// own thread, which waits for or kills it.
pub fn child(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    vmm::child::die_with_parent(&mut c);
    c
}

/// True if `/dev/kvm` can be opened read-write; otherwise prints why the
/// calling test is skipped.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            loud!("SKIPPED: {test}: /dev/kvm not available ({e}); this test needs real KVM");
            false
        }
    }
}

/// True if `/dev/kvm` works and its KVM can back guest RAM with a
/// host-mappable, shared guest_memfd; otherwise prints why the calling
/// test is skipped (the message of `vmm`'s own check: what is missing).
pub fn guest_memfd_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    let (c, _) = config(
        "16M",
        1,
        Backing::GuestMemfd,
        PageSize::Size4K,
        Workload::Verify,
    );
    match Vm::new(c) {
        Ok(_) => true,
        Err(vmm::VmError::Memory(e @ vmm::MemoryError::GuestMemfdUnsupported(_))) => {
            loud!("SKIPPED: {test}: {e}");
            false
        }
        Err(e) => panic!("{test}: a guest-memfd VM could not be created: {e}"),
    }
}

/// Makes at least `pages` free 2 MiB huge pages available for the guard's
/// lifetime, raising `vm.nr_hugepages` if needed and restoring it on drop.
#[derive(Debug)]
pub struct HugePages {
    restore: Option<u64>,
}

impl HugePages {
    /// Returns `None` (after printing SKIPPED) if the pages cannot be had.
    pub fn reserve(test: &str, pages: u64) -> Option<Self> {
        let free = vmm::proc_stats::free_huge_pages();
        if free >= pages {
            return Some(Self { restore: None });
        }
        let cur = vmm::proc_stats::nr_hugepages().unwrap_or(0);
        let want = cur + (pages - free);
        if let Err(e) = vmm::proc_stats::set_nr_hugepages(want) {
            loud!(
                "SKIPPED: {test}: needs {pages} free huge pages, host has {free} and raising \
                 vm.nr_hugepages failed ({e}); run as root or set vm.nr_hugepages"
            );
            return None;
        }
        let guard = Self { restore: Some(cur) };
        let now = vmm::proc_stats::free_huge_pages();
        if now < pages {
            loud!(
                "SKIPPED: {test}: raised vm.nr_hugepages to {want} but only {now} huge pages \
                 are free (fragmented memory?)"
            );
            return None;
        }
        Some(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(v) = self.restore {
            if let Err(e) = vmm::proc_stats::set_nr_hugepages(v) {
                loud!("WARNING: could not restore vm.nr_hugepages to {v}: {e}");
            }
        }
    }
}

/// A config with the console captured into the returned buffer.
pub fn config(
    mem: &str,
    vcpus: u32,
    backing: Backing,
    page_size: PageSize,
    workload: Workload,
) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let mem: MemSize = mem.parse().expect("test sizes are valid");
    let mut c = VmConfig::new(mem);
    c.vcpus = vcpus;
    c.backing = backing;
    c.page_size = page_size;
    c.workload = workload;
    c.console = Console::Capture(Arc::clone(&buf));
    (c, buf)
}

/// The captured console as text.
pub fn console_text(buf: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Generous limit for a guest of at most 256 MiB to finish.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Boots the verify workload to completion and checks everything the guest
/// and the host can see; returns the VM (not yet destroyed).
pub fn boot_and_verify(mem: &str, vcpus: u32, backing: Backing, page_size: PageSize) -> Vm {
    let (c, console) = config(mem, vcpus, backing, page_size, Workload::Verify);
    let mut vm = Vm::new(c).expect("VM creation");
    vm.start().expect("vCPU start");
    assert!(
        vm.wait(GUEST_TIMEOUT),
        "guest did not finish: {:?}",
        vm.outcomes()
    );
    let text = console_text(&console);
    assert!(
        vm.guest_ok(),
        "guest failed: {:?}\nconsole:\n{text}",
        vm.outcomes()
    );
    let (hello, results, _) = vm.reports();
    assert!(hello.is_some(), "no hello report");
    assert_eq!(results.len(), vcpus as usize);
    let mem_bytes = vm.config().mem.bytes();
    let mut covered = 0;
    for r in &results {
        assert!(r.ok(), "vcpu {} reported {} bad words", r.vcpu, r.bad_words);
        covered += r.share_end - r.share_start;
        // Host-side check of what the guest wrote.
        let bad = vm
            .check_pattern(r.share_start, r.share_end)
            .expect("host read");
        assert_eq!(
            bad, 0,
            "host sees {bad} wrong words in vcpu {}'s share",
            r.vcpu
        );
    }
    assert_eq!(covered, mem_bytes - vmm::guest::layout::WORKLOAD_START);
    for i in 0..vcpus {
        assert!(
            text.contains(&format!("guest: vcpu {i}: start")),
            "missing start line of vcpu {i} in console:\n{text}"
        );
        assert!(
            text.contains(&format!("guest: vcpu {i}: pattern ok")),
            "missing end line of vcpu {i} in console:\n{text}"
        );
    }
    vm
}

pub mod virtio;

/// Destroys `vm` and checks that its memory went back to the host: all of
/// guest RAM unmapped and the stage-2 table freed (but its root). The
/// caller must have dropped its own references to the VM's devices first
/// (a device keeps guest RAM alive). Returns what the teardown did.
pub fn destroy_and_check(vm: Vm) -> (vmm::Teardown, vmm::Reclaimed) {
    let mem = vm.config().mem.bytes();
    let mut t = vm.destroy();
    let r = t.wait_reclaim();
    assert_eq!(r.unmapped_bytes, mem, "guest RAM not unmapped: {r:?}");
    assert_eq!(r.stage2.table_pages_left, 1, "table pages left: {r:?}");
    (t, r)
}

/// A config whose guest runs its balloon driver on 4 KiB pages, with the
/// balloon device offered with its defaults (see [`config`]).
pub fn balloon_driver_config(
    mem: &str,
    vcpus: u32,
    backing: Backing,
) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let (mut c, console) = config(mem, vcpus, backing, PageSize::Size4K, Workload::Balloon);
    c.balloon = Some(vmm::devices::virtio::balloon::BalloonConfig::default());
    (c, console)
}

/// Ends the guest's probe loop, waits for it to finish and asserts that it
/// verified its memory, with the outcomes and the console on failure.
pub fn finish_guest_ok(vm: &mut Vm, console: &Mutex<Vec<u8>>) {
    vm.finish_probes().expect("finish probes");
    assert!(
        vm.wait(GUEST_TIMEOUT),
        "guest did not finish: {:?}",
        vm.outcomes()
    );
    assert!(
        vm.guest_ok(),
        "{:?}\n{}",
        vm.outcomes(),
        console_text(console)
    );
}

/// Creates and starts the VM of `c` (a balloon config and a workload that
/// runs the guest's balloon driver), waits until every vCPU reported its
/// first verify and the driver runs; returns the VM and the driver status.
/// Panics with the outcomes and the console on the way if anything fails.
pub fn start_balloon_driver(
    c: VmConfig,
    console: &Mutex<Vec<u8>>,
) -> (Vm, vmm::guest::balloon::DriverStatus) {
    use vmm::guest::balloon::DriverState;
    let mut vm = Vm::new(c).expect("VM creation");
    vm.start().expect("vCPU start");
    assert!(
        vm.wait_results(GUEST_TIMEOUT),
        "{:?}\n{}",
        vm.outcomes(),
        console_text(console)
    );
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.state == DriverState::Running)
        .expect("status");
    assert!(
        ok,
        "driver not running: {st:?} {:?}\n{}",
        vm.outcomes(),
        console_text(console)
    );
    (vm, st)
}

/// The Linux guest fixture's directory (`GMM_LINUX_GUEST_DIR`, else
/// `../shared/linux-guest/` beside the repository), or a loud skip.
pub fn linux_fixture(test: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("GMM_LINUX_GUEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/linux-guest"),
        std::path::PathBuf::from,
    );
    if dir.join("vmlinux").is_file() && dir.join("initrd.cpio").is_file() {
        Some(dir)
    } else {
        loud!(
            "SKIPPED: {test}: the Linux fixture is not at {} (vmlinux, initrd.cpio); set \
             GMM_LINUX_GUEST_DIR",
            dir.display()
        );
        None
    }
}

/// The Firecracker binary to compare with (`GMM_FIRECRACKER_BIN`, else
/// `../shared/firecracker/firecracker` beside the repository), or a loud
/// skip.
pub fn firecracker_bin(test: &str) -> Option<std::path::PathBuf> {
    let p = std::env::var_os("GMM_FIRECRACKER_BIN").map_or_else(
        || {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/firecracker/firecracker")
        },
        std::path::PathBuf::from,
    );
    if p.is_file() {
        Some(p)
    } else {
        loud!(
            "SKIPPED: {test}: no Firecracker binary at {}; set GMM_FIRECRACKER_BIN",
            p.display()
        );
        None
    }
}

/// The `vmm` binary next to the test's directory (`GMM_VMM_BIN` wins), or
/// a loud skip.
pub fn vmm_bin(test: &str) -> Option<std::path::PathBuf> {
    let p = std::env::var_os("GMM_VMM_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("vmm"))
        })?;
    if p.is_file() {
        Some(p)
    } else {
        loud!(
            "SKIPPED: {test}: no vmm binary at {}: run `cargo build --release -p vmm` (same \
             profile and target dir as the tests) or set GMM_VMM_BIN",
            p.display()
        );
        None
    }
}

/// Waits until the captured console contains `marker`.
pub fn wait_console(buf: &std::sync::Mutex<Vec<u8>>, marker: &str, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if console_text(buf).contains(marker) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A monitor process serving an API socket (`vmm --api-sock`, Firecracker),
/// its stdout and stderr collected line by line into one text; killed on
/// drop, socket removed.
#[derive(Debug)]
pub struct ApiProcess {
    /// For messages.
    pub name: String,
    /// The process.
    pub child: std::process::Child,
    /// Its API socket.
    pub sock: std::path::PathBuf,
    out: Arc<Mutex<String>>,
    /// The threads copying stdout and stderr into `out`; each ends at its
    /// pipe's end of file.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl ApiProcess {
    /// Starts `bin --api-sock <tmp>/gmm-<tag>-<name>-<pid>.sock extra...` and
    /// waits until the socket accepts connections.
    pub fn spawn(name: &str, bin: &std::path::Path, tag: &str, extra: &[&str]) -> ApiProcess {
        use std::io::{BufRead, Read};
        use std::process::Stdio;
        let sock =
            std::env::temp_dir().join(format!("gmm-{tag}-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut child = child(bin)
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let out = Arc::new(Mutex::new(String::new()));
        let pipes = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        let readers = pipes
            .into_iter()
            .flatten()
            .map(|pipe| {
                let o = Arc::clone(&out);
                std::thread::spawn(move || {
                    for l in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                        let mut g = o.lock().unwrap_or_else(|e| e.into_inner());
                        g.push_str(&l);
                        g.push('\n');
                    }
                })
            })
            .collect();
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{name}: no API socket at {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        ApiProcess {
            name: name.into(),
            child,
            sock,
            out,
            readers,
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Its last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        let o = self.output();
        let lines: Vec<&str> = o.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until its output holds `marker`; false after `timeout`.
    pub fn wait_output(&self, marker: &str, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.output().contains(marker) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Waits for the exit (killed, and the test failed, after `timeout`):
    /// its status and how long it took. Returns once [`Self::output`]
    /// holds everything it printed (at most 5 s after the exit).
    pub fn wait_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, Duration) {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                let took = t.elapsed();
                // What it printed last may still be on its way from the
                // pipes: wait (a little) for the readers to reach the end,
                // so that `output` holds all of it.
                let drained = Instant::now();
                while !self.readers.iter().all(|r| r.is_finished())
                    && drained.elapsed() < Duration::from_secs(5)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                return (s, took);
            }
            if t.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Firecracker leaves its socket behind.
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Firecracker's `PUT /boot-source` body for the Linux fixture in `dir`,
/// its `init` in `guest.mode=idle` (it stays up, printing its memory every
/// 5 s).
pub fn idle_boot_source(dir: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "kernel_image_path": dir.join("vmlinux"),
        "initrd_path": dir.join("initrd.cpio"),
        "boot_args": format!("{} quiet guest.mode=idle guest.period=5", vmm::boot::DEFAULT_CMDLINE),
    })
}

pub mod fuzz;
