//! A real Linux guest (the fixture `../shared/linux-guest/`: vmlinux with a
//! PVH note, busybox initrd whose `init` prints markers) on real KVM.
//!
//! Three boots in all (each ~25-60 s on a PVM host, whose guest ring 0 is
//! emulated): a library boot with 1 vCPU, a balloon and `guest.mode=idle`
//! that is ended by Ctrl-Alt-Del through the i8042, the same on guest_memfd
//! backing (where the host's KVM has it; else a loud skip), and a `vmm run`
//! process with 2 vCPUs whose guest ends itself with `reboot -f` (exit
//! status 0).
//! The bad-kernel tests run `vmm run --kernel <bad>` and need neither KVM
//! nor a boot: they must fail fast with a message, before any VM exists.
//!
//! Skips (loudly): no `/dev/kvm`, no fixture (`GMM_LINUX_GUEST_DIR` or
//! `../shared/linux-guest/` from the repository root), no `vmm` binary next
//! to the test's directory (`cargo build --release -p vmm`, or
//! `GMM_VMM_BIN`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tests::{
    config, console_text, destroy_and_check, kvm_or_skip, linux_fixture as fixture, loud, vmm_bin,
    wait_console,
};
use vmm::boot::LinuxSpec;
use vmm::vstate::vcpu::VcpuOutcome;
use vmm::{Backing, PageSize, Vm, Workload};

/// Generous: boots take ~25-40 s here.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The boots run one after the other: on a 2-core PVM host two guests
/// whose ring 0 is emulated slow each other down far more than twice
/// (~100 s each in parallel against ~25 s alone).
static ONE_BOOT_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn boot_slot() -> std::sync::MutexGuard<'static, ()> {
    ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// What boot 1 inflates: Linux's driver moves ~1-4 MiB/s here (emulated
/// ring 0), and the deflate waits as long again.
const INFLATE_MIB: u32 = 16;

/// The guest's last `MEMTOTAL <kB> MEMFREE <kB>` line (idle mode prints one
/// per period): MemTotal in kB.
fn last_memtotal(text: &str) -> Option<u64> {
    text.lines()
        .rev()
        .filter(|l| l.contains("MEMFREE"))
        .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// Waits until `pred` holds for the guest's latest MemTotal (kB).
fn wait_memtotal(
    buf: &std::sync::Mutex<Vec<u8>>,
    pred: impl Fn(u64) -> bool,
    timeout: Duration,
) -> Option<u64> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Some(t) = last_memtotal(&console_text(buf)).filter(|&t| pred(t)) {
            return Some(t);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// Boot 1: library API, 1 vCPU, guest RAM populated host-side, a balloon
/// (statistics, no DEFLATE_ON_OOM, no reporting) driven by Linux's own
/// driver: inflating [`INFLATE_MIB`] takes as much off the guest's MemTotal
/// and at least 7/8 of it off the process's RSS (the stage-2 gather
/// released it),
/// deflating gives MemTotal back; statistics arrive; Ctrl-Alt-Del through
/// the i8042 ends the VM.
#[test]
fn linux_boots_with_balloon_and_ctrl_alt_del_ends_it() {
    let name = "linux_boots_with_balloon_and_ctrl_alt_del_ends_it";
    if !kvm_or_skip(name) {
        return;
    }
    balloon_boot(name, Backing::Anon);
}

/// Boot 3: boot 1 on guest_memfd backing, where the host's KVM has it:
/// Linux's own balloon driver against punched holes of a file KVM maps
/// without the process (the memory is seen by `mincore`, not in RSS).
#[test]
fn linux_balloon_on_guest_memfd_gives_memory_back() {
    let name = "linux_balloon_on_guest_memfd_gives_memory_back";
    if !tests::guest_memfd_or_skip(name) {
        return;
    }
    balloon_boot(name, Backing::GuestMemfd);
}

/// Host memory behind guest RAM: RSS for process memory; for guest_memfd,
/// which KVM maps without the process, the file's resident pages.
fn host_memory(vm: &Vm, backing: Backing) -> u64 {
    match backing {
        Backing::GuestMemfd => vm.memory().resident_bytes(),
        _ => vmm::proc_stats::rss().rss,
    }
}

/// A library boot of the fixture with 1 vCPU, a balloon and
/// `guest.mode=idle` on `backing`: statistics, an inflate of [`INFLATE_MIB`] that
/// must come back to the host, a deflate, then Ctrl-Alt-Del ends it.
fn balloon_boot(name: &str, backing: Backing) {
    use vmm::devices::virtio::balloon::BalloonConfig;
    let Some(dir) = fixture(name) else { return };
    let _slot = boot_slot();
    let (mut c, console) = config("256M", 1, backing, PageSize::Size4K, Workload::Verify);
    c.balloon = Some(BalloonConfig {
        stats: true,
        deflate_on_oom: false,
        reporting: false,
    });
    let mut spec = LinuxSpec::new(dir.join("vmlinux"));
    spec.initrd = Some(dir.join("initrd.cpio"));
    spec.cmdline = format!("{} quiet guest.mode=idle guest.period=1", spec.cmdline);
    c.linux = Some(spec);
    let mut vm = Vm::new(c).expect("VM creation");
    assert!(
        vm.linux_cmdline()
            .is_some_and(|l| l.contains("virtio_mmio.device=4K@0x1000001000:5")),
        "{:?}",
        vm.linux_cmdline()
    );
    vm.memory().populate().expect("populate guest RAM");
    let t0 = Instant::now();
    vm.start().expect("start");
    let up = wait_console(&console, "NPROC", BOOT_TIMEOUT);
    let text = console_text(&console);
    assert!(up, "no NPROC line; outcomes {:?}\n{text}", vm.outcomes());
    loud!(
        "{name}: init reached after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(text.contains("INIT-REACHED"), "{text}");
    assert!(text.contains("NPROC 1"), "{text}");
    assert!(text.contains("BALLOON present"), "{text}");
    assert!(
        text.contains("VIRTIO virtio0 0x0005 virtio_balloon"),
        "{text}"
    );
    assert!(vm.first_run().is_some());
    let balloon = vm.balloon().cloned().expect("balloon");

    // Statistics: the driver sent its first buffer at probe; asking again
    // brings fresh ones.
    let updates = balloon.counters().stats_updates;
    balloon.request_stats();
    let t = Instant::now();
    while balloon.counters().stats_updates <= updates && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        balloon.counters().stats_updates > updates,
        "no statistics after a request: {:?}",
        balloon.counters()
    );
    let stats = balloon.lock().device().last_stats().map(<[_]>::to_vec);
    let total = stats
        .as_ref()
        .and_then(|s| s.iter().find(|s| s.tag == 5))
        .map(|s| s.val);
    assert!(
        total.is_some_and(|t| t > 128 << 20 && t <= 256 << 20),
        "the guest's total memory (tag 5) is missing or wrong: {stats:?}"
    );

    // Inflate INFLATE_MIB.
    let before = wait_memtotal(&console, |_| true, Duration::from_secs(30)).expect("MEMTOTAL");
    let rss0 = host_memory(&vm, backing);
    let t = Instant::now();
    balloon.set_target_pages(INFLATE_MIB << 8);
    let after = wait_memtotal(
        &console,
        |m| m <= before - u64::from(INFLATE_MIB) * 1024,
        Duration::from_secs(240),
    );
    let took = t.elapsed();
    let rss1 = host_memory(&vm, backing);
    let report = vm.memory().report();
    assert_eq!(
        after,
        Some(before - u64::from(INFLATE_MIB) * 1024),
        "MemTotal did not drop by exactly {INFLATE_MIB} MiB\n{}",
        console_text(&console)
    );
    assert_eq!(
        report.ballooned_bytes,
        u64::from(INFLATE_MIB) << 20,
        "{report:?}"
    );
    assert!(
        rss0.saturating_sub(rss1) >= (u64::from(INFLATE_MIB) << 20) / 8 * 7,
        "host memory ({backing:?}) fell only {} KiB ({rss0} -> {rss1})",
        rss0.saturating_sub(rss1) >> 10
    );
    loud!(
        "{name}: inflated {INFLATE_MIB} MiB in {:.1} s, host memory ({backing:?}) -{} MiB",
        took.as_secs_f64(),
        rss0.saturating_sub(rss1) >> 20
    );
    // Deflate: MemTotal comes back.
    balloon.set_target_pages(0);
    let back = wait_memtotal(&console, |m| m >= before, Duration::from_secs(240));
    assert_eq!(back, Some(before), "{}", console_text(&console));
    assert_eq!(vm.memory().report().ballooned_bytes, 0);
    assert_eq!(balloon.counters().errors, 0, "{:?}", balloon.counters());

    vm.send_ctrl_alt_del().expect("ctrl-alt-del");
    let end = vm.wait_linux(Some(Duration::from_secs(240)));
    assert_eq!(
        end.as_ref().map(|(_, o)| o),
        Some(&VcpuOutcome::Reset),
        "{end:?}\n{}",
        console_text(&console)
    );
    drop(balloon);
    let (t, _) = destroy_and_check(vm);
    assert_eq!(t.outcomes[0], VcpuOutcome::Reset);
}

/// Boot 2: `vmm run --kernel` with 2 vCPUs; the guest's `reboot -f` ends
/// the process with status 0 and a JSON summary as the last line.
#[test]
fn vmm_run_kernel_two_vcpus_reboot_exits_zero() {
    let name = "vmm_run_kernel_two_vcpus_reboot_exits_zero";
    if !kvm_or_skip(name) {
        return;
    }
    let (Some(dir), Some(bin)) = (fixture(name), vmm_bin(name)) else {
        return;
    };
    let _slot = boot_slot();
    let t0 = Instant::now();
    let out = tests::child(bin)
        .args([
            "run",
            "--json",
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--timeout-secs",
            "180",
        ])
        .arg("--kernel")
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initrd.cpio"))
        .output()
        .expect("run vmm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    loud!("{name}: vmm ran {:.1} s", t0.elapsed().as_secs_f64());
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    for m in ["INIT-REACHED", "NPROC 2", "BALLOON absent", "SHUTDOWN"] {
        assert!(stdout.contains(m), "no {m:?} in\n{stdout}");
    }
    let last = stdout.lines().last().unwrap_or_default();
    for f in [
        "\"boot\":\"linux\"",
        "\"exit_reason\":\"reset\"",
        "\"guest_ok\":true",
        "\"monitor_setup_ms\":",
    ] {
        assert!(last.contains(f), "{f} missing in the JSON line {last}");
    }
}

/// Runs `vmm run --kernel` with a bad input; asserts a fast failure whose
/// message contains `expect`.
fn bad(test: &str, args: &[&str], kernel: &std::path::Path, expect: &str) {
    let Some(bin) = vmm_bin(test) else { return };
    let t0 = Instant::now();
    let out = tests::child(bin)
        .args(["run", "--mem", "256M", "--kernel"])
        .arg(kernel)
        .args(args)
        .output()
        .expect("run vmm");
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{test}: succeeded?\n{stderr}");
    assert!(
        stderr.contains(expect),
        "{test}: {expect:?} not in the message:\n{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Linux version"),
        "{test}: a guest ran"
    );
    assert!(took < Duration::from_secs(5), "{test}: took {took:?}");
}

fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("gmm-linux-bad-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn bad_kernels_fail_fast_with_a_clear_message() {
    let name = "bad_kernels_fail_fast_with_a_clear_message";
    let Some(dir) = fixture(name) else { return };
    let vmlinux = std::fs::read(dir.join("vmlinux")).expect("read fixture");
    let t = tmpdir();
    // Truncated: the header and program headers survive, the segments do not.
    let p = t.join("truncated");
    std::fs::write(&p, &vmlinux[..1 << 20]).expect("write");
    bad(name, &[], &p, "truncated");
    // Cut inside the ELF header.
    let p = t.join("stub");
    std::fs::write(&p, &vmlinux[..40]).expect("write");
    bad(name, &[], &p, "truncated");
    // e_machine = AArch64.
    let mut arm = vmlinux.clone();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes());
    let p = t.join("aarch64");
    std::fs::write(&p, &arm).expect("write");
    bad(name, &[], &p, "not a 64-bit x86 kernel");
    // Neither ELF nor bzImage.
    let p = t.join("script");
    std::fs::write(&p, b"#!/bin/sh\necho not a kernel\n").expect("write");
    bad(name, &[], &p, "neither an x86-64 ELF vmlinux nor a bzImage");
    // Missing files.
    bad(name, &[], &t.join("missing"), "cannot read the kernel");
    let initrd = t.join("no-initrd");
    bad(
        name,
        &["--initrd", initrd.to_str().unwrap_or("x")],
        &dir.join("vmlinux"),
        "cannot read the initrd",
    );
    // Too long a command line.
    let long = "x".repeat(4000);
    bad(
        name,
        &["--cmdline", &long],
        &dir.join("vmlinux"),
        "shorten --cmdline",
    );
    // Kernel larger than RAM (it loads at 16 MiB), RAM above 3 GiB.
    let k = dir.join("vmlinux");
    let out = tests::child(vmm_bin(name).unwrap_or_default())
        .args(["run", "--mem", "16M", "--kernel"])
        .arg(&k)
        .output();
    if let Ok(out) = out {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains("raise --mem"), "{e}");
    }
    let out = tests::child(vmm_bin(name).unwrap_or_default())
        .args(["run", "--mem", "4G", "--kernel"])
        .arg(&k)
        .output();
    if let Ok(out) = out {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains("3 GiB"), "{e}");
    }
    // An initrd that does not fit between the kernel and the end of RAM.
    let big = t.join("big-initrd");
    std::fs::write(&big, vec![0u8; 40 << 20]).expect("write");
    let out = tests::child(vmm_bin(name).unwrap_or_default())
        .args(["run", "--mem", "32M", "--kernel"])
        .arg(&k)
        .arg("--initrd")
        .arg(&big)
        .output();
    if let Ok(out) = out {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains("does not fit"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&t);
}
