//! The `vmm` binary: `vmm run --json` output and exit codes.

use std::process::Command;

/// Prints on the real stderr (not captured by the test harness).
macro_rules! loud {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

fn kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        loud!("SKIPPED: /dev/kvm not available; the vmm binary needs real KVM");
    }
    ok
}

/// Whether `vmm` refused a guest-memfd run because this host's KVM cannot
/// back guest RAM with a guest_memfd (then says SKIPPED, with vmm's reason).
fn no_guest_memfd_here(test: &str, out: &std::process::Output) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    let lacks = out.status.code() == Some(i32::from(vmm::EXIT_HOST_CANNOT));
    if lacks {
        // Status 3 is for what the host lacks, and here only guest_memfd
        // can be missing (the other runs of these tests use the same KVM).
        assert!(err.contains("KVM_CAP_GUEST_MEMFD"), "{test}: {err}");
        loud!("SKIPPED: {test}: {}", err.trim());
    }
    lacks
}

fn vmm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("run vmm")
}

#[test]
fn run_json_reports_success() {
    if !kvm() {
        return;
    }
    let out = vmm(&["run", "--mem", "64M", "--vcpus", "2", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("guest: vcpu 1: pattern ok"), "{stdout}");
    let last = stdout.lines().last().expect("output");
    let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(v["guest_ok"], true);
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["mem_bytes"], 64u64 << 20);
    for k in [
        "boot_ms",
        "run_ms",
        "teardown_ms",
        "reclaim_ms",
        "rss_peak_bytes",
        "rss_after_teardown_bytes",
        "faults",
    ] {
        assert!(v[k].is_number(), "{k} missing in {last}");
    }
    assert!(v["rss_peak_bytes"].as_u64().unwrap() > 60 << 20);
}

#[test]
fn run_human_output() {
    if !kvm() {
        return;
    }
    let out = vmm(&[
        "run",
        "--mem",
        "32M",
        "--backing",
        "memfd",
        "--page-size",
        "4K",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("vmm: guest OK"), "{stdout}");
}

/// A VM runs under an address-space limit (`ulimit -v`) that fits its
/// guest: the stage-2 table reserves address space for the guest's RAM
/// only, not for the table's whole 48-bit width (512 GiB, which failed
/// here under this limit).
#[test]
fn runs_under_an_address_space_limit_its_guest_fits() {
    if !kvm() {
        return;
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 33554432 && exec \"$0\" run --mem 1G --vcpus 2 --json")
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .output()
        .expect("run vmm under sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?} under ulimit -v 32 GiB\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("output");
    let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(v["guest_ok"], true, "{last}");
}

#[test]
fn bad_config_exits_with_a_clear_message_and_its_status() {
    for (args, needle, status) in [
        (&["run", "--mem", "0"][..], "must not be 0", 2),
        (&["run", "--mem", "3M"][..], "multiple of 2 MiB", 2),
        (&["run", "--vcpus", "500"][..], "--vcpus", 2),
        (
            &["run", "--backing", "disk"][..],
            "anon, memfd, hugetlb or guest-memfd",
            2,
        ),
        // What the host lacks (here 32768 free huge pages) is status 3.
        (
            &["run", "--mem", "64G", "--backing", "hugetlb"][..],
            "vm.nr_hugepages",
            vmm::EXIT_HOST_CANNOT,
        ),
    ] {
        let out = vmm(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(i32::from(status)),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn run_release_counts_demand_faults() {
    if !kvm() {
        return;
    }
    let out = vmm(&["run", "--mem", "64M", "--release-mib", "8", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON");
    assert_eq!(v["guest_ok"], true);
    assert_eq!(v["released_bytes"], 8u64 << 20);
    // 2 MiB leaves: four leaves, each read once by the guest.
    assert_eq!(v["released_leaves_read_zero"], 4);
    assert!(v["faults"].as_u64().unwrap() >= 4, "{v}");
    assert!(v["fault_mean_latency_us"].as_f64().unwrap() > 0.0);
}

/// `--backing guest-memfd --release-mib`: the released leaves read back as
/// zeros without the userfaultfd handler (the kernel refills a punched
/// guest_memfd page itself), and teardown gives all of it back.
#[test]
fn run_guest_memfd_release() {
    if !kvm() {
        return;
    }
    let out = vmm(&[
        "run",
        "--mem",
        "64M",
        "--backing",
        "guest-memfd",
        "--release-mib",
        "8",
        "--json",
    ]);
    if no_guest_memfd_here("run_guest_memfd_release", &out) {
        return;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON");
    assert_eq!(v["guest_ok"], true);
    assert_eq!(v["backing"], "guest-memfd");
    assert_eq!(v["released_bytes"], 8u64 << 20);
    assert_eq!(v["released_leaves_read_zero"], 4);
    assert_eq!(v["faults"], 0, "no userfaultfd on guest_memfd: {v}");
    assert_eq!(v["stage2_teardown_released_bytes"], 64u64 << 20);
}

/// `--balloon-target`: the guest's driver inflates to the target, and the
/// JSON summary carries the balloon figures; resident guest RAM drops by
/// about the target, and so does RSS where guest RAM is mapped in the
/// process (not guest-memfd: KVM takes its guest pages from the file, they
/// never were in the RSS).
#[test]
fn run_balloon_target_inflates() {
    if !kvm() {
        return;
    }
    for backing in ["anon", "memfd", "guest-memfd"] {
        let out = vmm(&[
            "run",
            "--mem",
            "256M",
            "--backing",
            backing,
            "--balloon-target",
            "128M",
            "--json",
        ]);
        if backing == "guest-memfd" && no_guest_memfd_here("run_balloon_target_inflates", &out) {
            continue;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "exit {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("guest: vcpu 0: balloon at 32768 pages"),
            "{stdout}"
        );
        let last = stdout.lines().last().expect("output");
        let v: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
        assert_eq!(v["guest_ok"], true);
        assert_eq!(v["balloon_inflated_bytes"], 128u64 << 20);
        assert_eq!(v["balloon_released_bytes"], 128u64 << 20);
        assert_eq!(v["balloon_device_errors"], 0);
        assert!(v["balloon_driver_error"].is_null(), "{last}");
        assert!(v["balloon_inflate_ms"].as_f64().expect("number") > 0.0);
        let before = v["rss_before_inflate_bytes"].as_u64().expect("number");
        let after = v["rss_after_inflate_bytes"].as_u64().expect("number");
        let res0 = v["guest_resident_before_inflate_bytes"]
            .as_u64()
            .expect("number");
        let res1 = v["guest_resident_after_inflate_bytes"]
            .as_u64()
            .expect("number");
        assert!(
            res0 >= 240 << 20,
            "{backing}: the guest wrote its RAM: {last}"
        );
        assert!(
            res0.saturating_sub(res1) >= 120 << 20,
            "{backing}: resident guest RAM {res0} -> {res1}"
        );
        if backing != "guest-memfd" {
            assert!(
                before.saturating_sub(after) >= 120 << 20,
                "{backing}: RSS {before} -> {after}"
            );
        }
        loud!(
            "vmm run --backing {backing} --balloon-target 128M: inflate {} ms, RSS {} -> {} MiB, \
             guest RAM resident {} -> {} MiB",
            v["balloon_inflate_ms"],
            before >> 20,
            after >> 20,
            res0 >> 20,
            res1 >> 20
        );
    }
}

#[test]
fn balloon_target_beyond_the_share_exits_2() {
    let out = vmm(&[
        "run",
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--balloon-target",
        "64M",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vCPU 0's share"), "{err}");
    let out = vmm(&["run", "--balloon-target", "6K"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("whole 4 KiB pages"), "{err}");
}

fn rss_kib(pid: u32) -> u64 {
    vmm::proc_stats::rss_of(pid).unwrap_or(0) >> 10
}

#[test]
fn api_socket_drives_the_balloon_and_shuts_down() {
    if !kvm() {
        return;
    }
    let sock = std::env::temp_dir().join(format!("vmm-cli-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let s = sock.to_str().unwrap();
    struct Kill(Option<std::process::Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut guard = Kill(Some(
        Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["run", "--mem", "256M", "--api-sock", s, "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let pid = guard.0.as_ref().map_or(0, |c| c.id());
    let ctl = |w: &[&str]| {
        let mut a = vec!["ctl", "--api-sock", s];
        a.extend_from_slice(w);
        vmm(&a)
    };
    // wait until the API answers
    let t = std::time::Instant::now();
    while !ctl(&["status"]).status.success() {
        assert!(t.elapsed().as_secs() < 20, "the API socket never answered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // the guest first writes and verifies all its RAM
    while rss_kib(pid) < 240 * 1024 {
        assert!(
            t.elapsed().as_secs() < 30,
            "the guest never populated its RAM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = rss_kib(pid);
    assert!(ctl(&["balloon", "set", "128M"]).status.success());
    let t = std::time::Instant::now();
    while rss_kib(pid) + 100 * 1024 > before {
        assert!(
            t.elapsed().as_secs() < 20,
            "RSS never dropped: {} -> {} KiB",
            before,
            rss_kib(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // RSS falls as the pages are released; the driver's count of pages
    // in the balloon reaches the target when its last chain is done.
    let t = std::time::Instant::now();
    loop {
        let stats = ctl(&["balloon", "stats"]);
        let out = String::from_utf8_lossy(&stats.stdout).into_owned();
        if out.contains("\"actual_pages\":32768") {
            break;
        }
        assert!(
            t.elapsed().as_secs() < 20,
            "the balloon never reached 32768 pages: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let bad = ctl(&["balloon", "set", "999G"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not fit"));
    assert!(ctl(&["pause"]).status.success());
    assert!(ctl(&["resume"]).status.success());
    assert!(ctl(&["shutdown"]).status.success());
    let out = guard.0.take().unwrap().wait_with_output().unwrap();
    assert!(out.status.success());
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    assert!(last.contains("\"guest_ok\":true"), "{last}");
    assert!(!sock.exists(), "socket removed at exit");
}
