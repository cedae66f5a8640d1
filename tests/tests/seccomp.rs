//! The `vmm` binary's seccomp filters (`vmm/src/seccomp.rs`) on real KVM.
//!
//! For each thread kind, the binary's hidden test mode
//! (`--seccomp-test-violation KIND`) makes the first thread of that kind
//! call a system call no filter allows right after installing its filter:
//! with the filters on (the default) the process must die of `SIGSYS`,
//! with `--no-seccomp` the same run must go on and end cleanly. So a
//! filter that is never installed, installed too late (after the thread
//! started its work), or that allows everything, fails here. Every other
//! end-to-end test that runs the binary (`linux.rs`, `service.rs`,
//! `api_firecracker.rs`, the tools' benchmarks) runs it confined, which is
//! what shows the filters allow what the monitor needs.
//!
//! Also: a confined thread can free heap memory (glibc's heap trimming,
//! which opens a file, is off; `--seccomp-test-heap-trim`); the API socket
//! is owner-only, an existing path is refused and
//! `--replace-api-sock` replaces a stale socket but never another file.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tests::{kvm_or_skip, loud, vmm_bin, ApiProcess};

/// A `vmm run` of the embedded guest with a balloon, so that every thread
/// kind of a run exists: vCPU, device (the balloon's thread), uffd (anon
/// RAM), reclaim (teardown), main.
fn run(bin: &Path, extra: &[&str]) -> Output {
    tests::child(bin)
        .args([
            "run",
            "--mem",
            "64M",
            "--balloon-target",
            "16M",
            "--timeout-secs",
            "60",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run vmm")
}

fn text(o: &Output) -> String {
    format!(
        "{:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_sigsys(kind: &str, o: &Output) {
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGSYS),
        "a {kind} thread's forbidden call must kill the process with SIGSYS: {}",
        text(o)
    );
    // The forbidden call was made by the thread of that kind, after its
    // filter was installed (the test mode says so just before).
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!(
            "test mode: a {kind} thread makes a forbidden system call"
        )),
        "{}",
        text(o)
    );
}

#[test]
fn a_forbidden_call_in_a_run_thread_kills_the_process_with_sigsys() {
    let name = "a_forbidden_call_in_a_run_thread_kills_the_process_with_sigsys";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(bin) = vmm_bin(name) else {
        return;
    };
    for kind in ["vcpu", "device", "uffd", "reclaim", "main"] {
        let o = run(&bin, &["--seccomp-test-violation", kind]);
        assert_sigsys(kind, &o);
        // The same call unconfined is harmless: the run ends well.
        let o = run(&bin, &["--seccomp-test-violation", kind, "--no-seccomp"]);
        assert!(o.status.success(), "{kind} with --no-seccomp: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("test mode"),
            "{kind}: the test mode did not run: {}",
            text(&o)
        );
    }
    // And a normal confined run succeeds.
    let o = run(&bin, &[]);
    assert!(o.status.success(), "{}", text(&o));
}

/// glibc opens a file the first time it trims a thread arena's heap: a
/// confined thread that frees enough died of SIGSYS in `free` (the
/// balloon's device thread did). With trimming off (what `vmm` does) the
/// device thread's heap-trim exercise passes; with trimming left on (the
/// test-only switch) the same run must die of SIGSYS, which shows the
/// exercise reaches the trim.
#[test]
fn a_confined_thread_can_free_its_heap() {
    let name = "a_confined_thread_can_free_its_heap";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(bin) = vmm_bin(name) else {
        return;
    };
    let o = run(&bin, &["--seccomp-test-heap-trim", "trimming-off"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the device thread's heap trim passed"),
        "the exercise did not run: {}",
        text(&o)
    );
    let o = run(&bin, &["--seccomp-test-heap-trim", "trimming-on"]);
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGSYS),
        "with glibc's heap trimming on, the exercise must die in free(): {}",
        text(&o)
    );
}

/// Asks our child `pid` to stop.
fn sigterm(pid: u32) {
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: kill(2) takes no pointer; `pid` is our own child.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

fn sock(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gmm-seccomp-{tag}-{}.sock", std::process::id()))
}

/// `vmm --api-sock` (service) or `vmm run --api-sock` with `extra`,
/// stdout/stderr captured.
fn spawn(bin: &Path, service: bool, path: &Path, extra: &[&str]) -> std::process::Child {
    let mut c = tests::child(bin);
    if !service {
        c.args(["run", "--mem", "64M"]);
    }
    c.arg("--api-sock")
        .arg(path)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

fn wait_output(child: std::process::Child) -> Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("vmm did not exit within 60 s")
        .expect("wait for vmm")
}

fn wait_socket(path: &Path) {
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no API socket at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_forbidden_call_in_the_api_or_signal_thread_kills_the_process() {
    let name = "a_forbidden_call_in_the_api_or_signal_thread_kills_the_process";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(bin) = vmm_bin(name) else {
        return;
    };
    // The service's API and signal threads start before any request.
    for kind in ["api", "signals"] {
        let p = sock(kind);
        let _ = std::fs::remove_file(&p);
        let o = wait_output(spawn(&bin, true, &p, &["--seccomp-test-violation", kind]));
        assert_sigsys(kind, &o);
        let _ = std::fs::remove_file(&p);
        // Unconfined, the service serves and stops on SIGTERM.
        let child = spawn(
            &bin,
            true,
            &p,
            &["--seccomp-test-violation", kind, "--no-seccomp"],
        );
        wait_socket(&p);
        let v = vmm::api::call(&p, "GET", "/", None).expect("GET /");
        assert_eq!(v["state"], "Not started");
        sigterm(child.id());
        let o = wait_output(child);
        assert!(o.status.success(), "{kind} with --no-seccomp: {}", text(&o));
    }
    // `vmm run --api-sock`: its API thread too.
    let p = sock("run-api");
    let _ = std::fs::remove_file(&p);
    let o = wait_output(spawn(&bin, false, &p, &["--seccomp-test-violation", "api"]));
    assert_sigsys("api", &o);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn a_confined_service_starts_serves_and_stops() {
    let name = "a_confined_service_starts_serves_and_stops";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(bin) = vmm_bin(name) else {
        return;
    };
    let dir = std::env::temp_dir();
    let metrics = dir.join(format!("gmm-seccomp-metrics-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    let mut p = ApiProcess::spawn("confined", &bin, "seccomp", &[]);
    let call = |m: &str, u: &str, b: serde_json::Value| {
        vmm::api::call(&p.sock, m, u, Some(&b)).unwrap_or_else(|e| panic!("{m} {u}: {e}"))
    };
    call(
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": 128}),
    );
    call(
        "PUT",
        "/balloon",
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": false,
            "stats_polling_interval_s": 1, "free_page_reporting": true}),
    );
    call(
        "PUT",
        "/metrics",
        serde_json::json!({"metrics_path": metrics}),
    );
    // The start runs on the main thread; the API thread's filter has no
    // KVM ioctls.
    call(
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    call("PATCH", "/balloon", serde_json::json!({"amount_mib": 16}));
    call("PATCH", "/vm", serde_json::json!({"state": "Paused"}));
    call("PATCH", "/vm", serde_json::json!({"state": "Resumed"}));
    call(
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "FlushMetrics"}),
    );
    let m = vmm::api::call(&p.sock, "GET", "/memory", None).expect("GET /memory");
    assert!(m["guest_ram_bytes"].as_u64().unwrap_or(0) > 0, "{m}");
    // A second start is refused (by the phase check), not killed.
    assert!(vmm::api::call(
        &p.sock,
        "PUT",
        "/actions",
        Some(&serde_json::json!({"action_type": "InstanceStart"}))
    )
    .is_err());
    sigterm(p.child.id());
    let (status, _) = p.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{}", p.tail(30));
    let lines = std::fs::read_to_string(&metrics).unwrap_or_default();
    assert!(
        lines.contains("\"flush\"") && lines.contains("\"exit\""),
        "metrics: {lines}"
    );
    let _ = std::fs::remove_file(&metrics);
}

#[test]
fn the_api_socket_is_owner_only_and_replaced_only_when_asked() {
    let name = "the_api_socket_is_owner_only_and_replaced_only_when_asked";
    let Some(bin) = vmm_bin(name) else {
        return;
    };
    let p = sock("replace");
    let _ = std::fs::remove_file(&p);
    // A stale socket: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&p).expect("bind"));
    let o = wait_output(spawn(&bin, true, &p, &[]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        text(&o)
    );
    let child = spawn(&bin, true, &p, &["--replace-api-sock"]);
    wait_socket(&p);
    let mode = std::fs::metadata(&p).expect("socket").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the API socket must be owner-only");
    sigterm(child.id());
    let o = wait_output(child);
    assert!(o.status.success(), "{}", text(&o));
    // Never a file that is not a socket.
    std::fs::write(&p, b"not a socket").expect("write");
    let o = wait_output(spawn(&bin, true, &p, &["--replace-api-sock"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not a socket"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&p).unwrap_or_default(), b"not a socket");
    let _ = std::fs::remove_file(&p);
    loud!("{name}: stale socket replaced, other files kept");
}

/// The serial console's stdin reader exists only when stdin is a terminal:
/// run under `script` (a pty), with the Linux fixture (the reader is for a
/// Linux guest). The kill comes before the guest boots; the unconfined run
/// is cut short by `--timeout-secs` (exit status 1, not a signal).
#[test]
fn a_forbidden_call_in_the_console_input_thread_kills_the_process() {
    let name = "a_forbidden_call_in_the_console_input_thread_kills_the_process";
    if !kvm_or_skip(name) {
        return;
    }
    let (Some(bin), Some(dir)) = (vmm_bin(name), tests::linux_fixture(name)) else {
        return;
    };
    if Command::new("script").arg("--version").output().is_err() {
        loud!("SKIPPED: {name}: no `script` (util-linux) to give vmm a terminal");
        return;
    }
    let rc = |extra: &str| {
        let cmd = format!(
            "{} run --mem 128M --timeout-secs 2 --kernel {} --initrd {} \
             --seccomp-test-violation console-input {extra}; echo RC=$?",
            bin.display(),
            dir.join("vmlinux").display(),
            dir.join("initrd.cpio").display()
        );
        let o = tests::child("script")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .expect("run script");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            out.contains("test mode: a console-input thread"),
            "the console input thread did not run: {out}"
        );
        out.lines()
            .find_map(|l| l.trim().strip_prefix("RC=").map(str::to_owned))
            .unwrap_or_else(|| panic!("no exit status in {out}"))
    };
    // 128 + SIGSYS from the shell.
    assert_eq!(rc(""), (128 + libc::SIGSYS).to_string());
    assert_eq!(rc("--no-seccomp"), "1");
}
