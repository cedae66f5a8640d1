//! `vmm --api-sock`: the monitor as a service, driven over its socket the
//! way Firecracker's documentation drives Firecracker, on real KVM.
//!
//! - the default guest: configuration, wrong-phase and malformed calls
//!   (400 with a `fault_message`, nothing changed), start, pause/resume,
//!   balloon target followed by the guest's driver, `GET /memory`,
//!   `FlushMetrics`, `SendCtrlAltDel` → exit 0;
//! - `--backing memfd|guest-memfd`: guest RAM is that kind (the process's
//!   mappings), `huge_pages` "2M" is refused with it, and a balloon
//!   inflate is released through it (guest-memfd only where KVM has it);
//! - SIGTERM ends a running VM at once with exit 0, memory released;
//! - the Linux fixture (one boot, 2 vCPUs, RAM populated host-side): free
//!   page reporting gives the guest's free memory back (`GET /memory`
//!   `discarded_bytes`, the process's RSS), statistics arrive with the
//!   guest's own figures, the balloon follows `PATCH /balloon`, and
//!   `SendCtrlAltDel` ends the process with status 0.
//!
//! Skips loudly without `/dev/kvm`, the `vmm` binary or (Linux) the fixture.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{kvm_or_skip, linux_fixture, loud, vmm_bin, ApiProcess};
use vmm::api::{call, ApiError};

/// A `vmm --api-sock` process with the calls these tests make.
struct Svc(ApiProcess);

impl std::ops::Deref for Svc {
    type Target = ApiProcess;
    fn deref(&self) -> &ApiProcess {
        &self.0
    }
}

impl Svc {
    fn spawn(bin: &Path, name: &str, extra: &[&str]) -> Svc {
        Svc(ApiProcess::spawn("vmm", bin, &format!("svc-{name}"), extra))
    }

    fn call(&self, m: &str, p: &str, body: Option<Value>) -> Result<Value, ApiError> {
        call(&self.sock, m, p, body.as_ref())
    }

    fn ok(&self, m: &str, p: &str, body: Option<Value>) -> Value {
        self.call(m, p, body.clone())
            .unwrap_or_else(|e| panic!("{m} {p} {body:?}: {e}"))
    }

    /// Asserts a 400 whose `fault_message` contains `has`.
    fn refused(&self, m: &str, p: &str, body: Option<Value>, has: &str) {
        match self.call(m, p, body.clone()) {
            Err(ApiError::Refused { status, message }) => {
                assert_eq!(status, 400, "{m} {p}: {message}");
                assert!(
                    message.contains(has),
                    "{m} {p} {body:?}: {message:?} lacks {has:?}"
                );
            }
            other => panic!("{m} {p} {body:?}: expected a 400, got {other:?}"),
        }
    }

    /// Polls `GET path` until `pred` holds on the answer.
    fn wait_get(&self, path: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let v = self.ok("GET", path, None);
            if pred(&v) {
                return v;
            }
            assert!(t.elapsed() < timeout, "GET {path} never satisfied: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn setup(name: &str) -> Option<PathBuf> {
    if !kvm_or_skip(name) {
        return None;
    }
    vmm_bin(name)
}

#[test]
fn embedded_guest_through_the_api() {
    let name = "embedded_guest_through_the_api";
    let Some(bin) = setup(name) else { return };
    let mut s = Svc::spawn(&bin, "embedded", &[]);
    // Not started: Firecracker's defaults.
    let i = s.ok("GET", "/", None);
    assert_eq!(i["state"], "Not started", "{i}");
    assert_eq!(i["id"], "anonymous-instance");
    assert!(s.ok("GET", "/version", None)["firecracker_version"].is_string());
    assert_eq!(
        s.ok("GET", "/machine-config", None),
        json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
               "track_dirty_pages": false, "huge_pages": "None"})
    );
    // Malformed and wrong-phase calls: 400, nothing changed.
    s.refused("GET", "/nope", None, "Invalid request method and/or path");
    s.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2})),
        "mem_size_mib",
    );
    s.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 256, "memory": 1})),
        "unknown field",
    );
    s.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": "two", "mem_size_mib": 256})),
        "invalid type",
    );
    s.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 64, "mem_size_mib": 256})),
        "1 to 32",
    );
    s.refused(
        "PATCH",
        "/vm",
        Some(json!({"state": "Paused"})),
        "before starting",
    );
    s.refused("GET", "/memory", None, "before starting");
    s.refused("GET", "/balloon", None, "No balloon");
    assert_eq!(s.ok("GET", "/machine-config", None)["vcpu_count"], 1);
    // Configure and start.
    s.ok(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "Transparent"})),
    );
    s.ok(
        "PUT",
        "/balloon",
        Some(json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1})),
    );
    let metrics = std::env::temp_dir().join(format!("gmm-svc-metrics-{}", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    s.ok("PUT", "/metrics", Some(json!({"metrics_path": metrics})));
    s.ok(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(s.ok("GET", "/", None)["state"], "Running");
    s.refused(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 128})),
        "after starting",
    );
    s.refused(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
        "after starting",
    );
    assert_eq!(s.ok("GET", "/machine-config", None)["mem_size_mib"], 256);
    // Pause and resume.
    s.ok("PATCH", "/vm", Some(json!({"state": "Paused"})));
    assert_eq!(s.ok("GET", "/", None)["state"], "Paused");
    s.ok("PATCH", "/vm", Some(json!({"state": "Resumed"})));
    assert_eq!(s.ok("GET", "/", None)["state"], "Running");
    // The guest's driver follows the target.
    s.ok("PATCH", "/balloon", Some(json!({"amount_mib": 16})));
    assert_eq!(s.ok("GET", "/balloon", None)["amount_mib"], 16);
    s.wait_get("/balloon/statistics", Duration::from_secs(60), |v| {
        v["actual_mib"] == 16 && v["target_pages"] == 4096
    });
    // The entries are marked first, the memory released by the gather's
    // flush after them: wait for both (the check below reads the rest).
    let mem = s.wait_get("/memory", Duration::from_secs(10), |v| {
        v["ballooned_bytes"] == json!(16u64 << 20) && v["released_bytes"].as_u64() >= Some(16 << 20)
    });
    for k in [
        "table_bytes",
        "discarded_bytes",
        "released_bytes",
        "gathers",
        "max_lock_hold_us",
        "p99_lock_hold_us",
        "invalidations",
        "demand_faults",
    ] {
        assert!(
            mem.get(k).is_some_and(Value::is_number),
            "{k} missing: {mem}"
        );
    }
    assert!(mem["released_bytes"].as_u64() >= Some(16 << 20), "{mem}");
    s.ok(
        "PUT",
        "/actions",
        Some(json!({"action_type": "FlushMetrics"})),
    );
    let line = std::fs::read_to_string(&metrics).unwrap_or_default();
    let flushed: Value = serde_json::from_str(line.lines().next().unwrap_or("")).expect("metrics");
    assert_eq!(flushed["memory"]["ballooned_bytes"], json!(16u64 << 20));
    // A clean stop of the default guest.
    s.ok(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    let (status, took) = s.0.wait_exit(Duration::from_secs(30));
    let err = s.output();
    assert!(status.success(), "{status:?}\n{err}");
    loud!("{name}: SendCtrlAltDel -> exit in {took:?}");
    let lines = std::fs::read_to_string(&metrics).unwrap_or_default();
    let exit: Value = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["event"] == "exit")
        .unwrap_or_else(|| panic!("no exit line in {lines}"));
    // What guest memory held before the teardown (taken for this line).
    assert!(
        exit["memory"]["guest_ram_bytes"].as_u64().unwrap_or(0) > 0,
        "{exit}"
    );
    let _ = std::fs::remove_file(&metrics);
}

/// `vmm --api-sock S --backing KIND`: the VM's RAM is that kind (seen in
/// the process's mappings), `huge_pages` "2M" is refused with it, and the
/// guest's balloon gives memory back through it. memfd always; guest-memfd
/// where the host's KVM has it (else a loud skip of that part).
#[test]
fn backing_flag_chooses_what_guest_ram_is() {
    let name = "backing_flag_chooses_what_guest_ram_is";
    let Some(bin) = setup(name) else { return };
    let mut kinds = vec![("memfd", "/memfd:guest-ram")];
    if tests::guest_memfd_or_skip(name) {
        kinds.push(("guest-memfd", "anon_inode:[kvm-gmem]"));
    }
    for (kind, mapping) in kinds {
        let mut s = Svc::spawn(&bin, &format!("backing-{kind}"), &["--backing", kind]);
        s.refused(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"})),
            "hugetlbfs",
        );
        s.ok(
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 128})),
        );
        s.ok(
            "PUT",
            "/balloon",
            Some(json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 0})),
        );
        s.ok(
            "PUT",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
        );
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.child.id()))
            .expect("the service's mappings");
        assert!(maps.contains(mapping), "{kind}: no {mapping} in\n{maps}");
        s.ok("PATCH", "/balloon", Some(json!({"amount_mib": 16})));
        // The entries are marked first, the memory released by the
        // gather's flush after them: wait for both.
        s.wait_get("/memory", Duration::from_secs(60), |v| {
            v["ballooned_bytes"] == json!(16u64 << 20)
                && v["released_bytes"].as_u64() >= Some(16 << 20)
        });
        s.ok(
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
        );
        let (status, _) = s.0.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{kind}: {status:?}\n{}", s.output());
        loud!("{name}: {kind}: guest RAM mapped as {mapping}, 16 MiB ballooned and released");
    }
}

#[test]
fn sigterm_ends_a_running_vm_at_once() {
    let name = "sigterm_ends_a_running_vm_at_once";
    let Some(bin) = setup(name) else { return };
    let mut s = Svc::spawn(&bin, "sigterm", &["--populate"]);
    s.ok(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 512, "huge_pages": "Transparent"})),
    );
    s.ok(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(s.ok("GET", "/", None)["state"], "Running");
    let pid = libc::pid_t::try_from(s.child.id()).expect("pid");
    let rss = vmm::proc_stats::rss_of(s.child.id()).unwrap_or(0);
    assert!(rss >= 512 << 20, "populated RSS only {rss}");
    // SAFETY: our own live child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let (status, took) = s.0.wait_exit(Duration::from_secs(10));
    let err = s.output();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(err.contains("Signal(15)"), "{err}");
    assert!(err.contains("guest memory released"), "{err}");
    assert!(
        took < Duration::from_secs(2),
        "SIGTERM -> exit took {took:?}"
    );
    loud!("{name}: SIGTERM -> exit in {took:?} (512 MiB populated)");
}

#[test]
fn linux_through_the_api_reporting_statistics_balloon() {
    let name = "linux_through_the_api_reporting_statistics_balloon";
    let Some(bin) = setup(name) else { return };
    let Some(dir) = linux_fixture(name) else {
        return;
    };
    let mut s = Svc::spawn(&bin, "linux", &["--populate"]);
    s.ok("PUT", "/boot-source", Some(tests::idle_boot_source(&dir)));
    s.ok(
        "PUT",
        "/machine-config",
        Some(json!({"vcpu_count": 2, "mem_size_mib": 256})),
    );
    s.ok(
        "PUT",
        "/balloon",
        Some(
            json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1,
                    "free_page_reporting": true}),
        ),
    );
    let t0 = Instant::now();
    s.ok(
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    let populated = vmm::proc_stats::rss_of(s.child.id()).unwrap_or(0);
    assert!(populated >= 256 << 20, "populated RSS only {populated}");
    assert!(
        s.wait_output("NPROC 2", Duration::from_secs(180)),
        "{}",
        s.tail(60)
    );
    loud!("{name}: NPROC after {:.1} s", t0.elapsed().as_secs_f64());
    assert!(s.tail(60).contains("BALLOON present"), "{}", s.tail(60));
    // Free page reporting: the guest's free memory goes back.
    let mem = s.wait_get("/memory", Duration::from_secs(240), |v| {
        v["discarded_bytes"].as_u64() >= Some(64 << 20)
    });
    let rss = vmm::proc_stats::rss_of(s.child.id()).unwrap_or(u64::MAX);
    assert!(
        populated.saturating_sub(rss) >= 64 << 20,
        "RSS {populated} -> {rss} after reporting {mem}"
    );
    loud!(
        "{name}: free page reporting released {} MiB, RSS -{} MiB",
        mem["discarded_bytes"].as_u64().unwrap_or(0) >> 20,
        populated.saturating_sub(rss) >> 20
    );
    // Statistics with the guest's own figures.
    let st = s.wait_get("/balloon/statistics", Duration::from_secs(30), |v| {
        v.get("total_memory").is_some() && v.get("free_memory").is_some()
    });
    let total = st["total_memory"].as_u64().unwrap_or(0);
    assert!(total > 128 << 20 && total <= 256 << 20, "{st}");
    assert!(st.get("available_memory").is_some(), "{st}");
    // The balloon follows the target.
    s.ok("PATCH", "/balloon", Some(json!({"amount_mib": 16})));
    s.wait_get("/balloon/statistics", Duration::from_secs(240), |v| {
        v["actual_mib"] == 16
    });
    s.refused(
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": "/x"})),
        "after starting",
    );
    // Ctrl-Alt-Del: the kernel restarts (reboot=k), the VM ends, exit 0.
    s.ok(
        "PUT",
        "/actions",
        Some(json!({"action_type": "SendCtrlAltDel"})),
    );
    let (status, took) = s.0.wait_exit(Duration::from_secs(240));
    let err = s.output();
    assert!(status.success(), "{status:?}\n{err}\n{}", s.tail(60));
    assert!(err.contains("monitor_setup_ms="), "{err}");
    loud!("{name}: SendCtrlAltDel -> exit in {took:?}");
}

#[test]
fn config_file_boots_at_once_and_bad_files_are_refused() {
    let name = "config_file_boots_at_once_and_bad_files_are_refused";
    let Some(bin) = setup(name) else { return };
    let dir = std::env::temp_dir();
    let good = dir.join(format!("gmm-svc-config-{}.json", std::process::id()));
    std::fs::write(
        &good,
        r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
            "balloon": {"amount_mib": 4, "deflate_on_oom": false},
            "drives": []}"#,
    )
    .expect("write config");
    // Booted from the file, the API answers too; the guest's driver
    // reaches the file's balloon target.
    let mut s = Svc(ApiProcess::spawn(
        "vmm",
        &bin,
        "svc-config",
        &["--config-file", good.to_str().unwrap_or_default()],
    ));
    assert_eq!(s.ok("GET", "/", None)["state"], "Running");
    s.wait_get("/memory", Duration::from_secs(30), |v| {
        v["ballooned_bytes"] == json!(4u64 << 20)
    });
    let pid = libc::pid_t::try_from(s.child.id()).expect("pid");
    // SAFETY: our own live child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let (status, _) = s.0.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", s.tail(20));
    // Bad files: exit 2 at once with the reason, no VM (3 for a host limit).
    for (body, has, code) in [
        (
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "ram": 1}}"#,
            "unknown field",
            2,
        ),
        (
            r#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 64}}"#,
            "1 to 32",
            2,
        ),
        (r#"{"drives": [{"drive_id": "root"}]}"#, "drives", 2),
        ("{", "not a valid VM configuration", 2),
        // What the host lacks (here 32768 free huge pages) exits with 3,
        // as `vmm run` does.
        (
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 65536, "huge_pages": "2M"}}"#,
            "vm.nr_hugepages",
            vmm::EXIT_HOST_CANNOT,
        ),
    ] {
        let bad = dir.join(format!("gmm-svc-bad-{}.json", std::process::id()));
        std::fs::write(&bad, body).expect("write config");
        let t = Instant::now();
        let out = tests::child(&bin)
            .arg("--config-file")
            .arg(&bad)
            .output()
            .expect("run vmm");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(i32::from(code)), "{body}: {err}");
        assert!(err.contains(has), "{body}: {err:?} lacks {has:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_file(&bad);
    }
    let _ = std::fs::remove_file(&good);
}

/// Set in the run of [`a_killed_test_run_leaves_no_vmm_running`] that plays
/// the killed test: it starts a `vmm` the way every test here does, then
/// waits to be killed.
const HOLDER: &str = "GMM_TEST_HOLD_A_VMM";

/// A test run killed outright (a CI timeout: no `Drop` runs) leaves no
/// `vmm` behind: the processes tests start die with them
/// ([`tests::child`]). The test runs its own binary again as the run to
/// kill, finds the `vmm` that run started, kills the run with `SIGKILL`
/// and waits for the `vmm` to end. Without `PR_SET_PDEATHSIG` the `vmm`
/// keeps running, and this fails.
#[test]
fn a_killed_test_run_leaves_no_vmm_running() {
    let name = "a_killed_test_run_leaves_no_vmm_running";
    let Some(bin) = setup(name) else { return };
    if std::env::var_os(HOLDER).is_some() {
        // The run to kill: killed long before this ends (and the service
        // is killed on drop if not).
        let _s = Svc::spawn(&bin, "held", &[]);
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let mut run = tests::child(exe)
        .args([name, "--exact", "--test-threads=1"])
        .env(HOLDER, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run the test binary again");
    // The vmm is a child of the run's test thread, so of the run's process.
    match vmm::child::kill_and_check_orphan(
        &mut run,
        "vmm",
        Duration::from_secs(30),
        Duration::from_secs(10),
    ) {
        vmm::child::Orphan::Ended => {}
        other => panic!("the killed test run's vmm: {other:?}"),
    }
    loud!("{name}: the killed run's vmm ended with it");
}
