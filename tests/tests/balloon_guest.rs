//! The default guest's own virtio-balloon driver ([`Workload::Balloon`]) on
//! a real VM: the guest verifies its share, negotiates the virtio-mmio
//! device, and follows the target the host sets. Inflating 128 MiB of a
//! 256 MiB guest gives the memory back to the host (process RSS, `mincore`,
//! memfd blocks) and leaves ballooned markers in the stage-2 table;
//! deflating to 0 makes the guest touch every page again (demand faults
//! through the userfaultfd handler) and verify its pattern there.
//!
//! The tests of this file run one at a time (they compare process RSS).
//! They are the positive side of the balloon rules of
//! `guest-mm/src/mutation.rs` (a real guest driver's requests are served);
//! the guest waits are condition polls with a deadline, not sleeps.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_mm::{Gpa, PageState};
use tests::virtio::{file_bytes, resident_pages};
use tests::{
    balloon_driver_config, config, console_text, destroy_and_check, kvm_or_skip, loud,
    start_balloon_driver, GUEST_TIMEOUT,
};
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::guest::balloon::{DriverError, DriverState};
use vmm::vstate::vcpu::VcpuOutcome;
use vmm::{Backing, PageSize, Vm, Workload};

const MIB: u64 = 1 << 20;
const BALLOON: u64 = 128 * MIB;
const PAGES: u64 = BALLOON / 4096;

static SERIAL: Mutex<()> = Mutex::new(());

fn host_of(vm: &Vm, gpa: u64) -> usize {
    let r = vm
        .memory()
        .regions()
        .into_iter()
        .find(|r| r.contains(gpa, 1))
        .expect("gpa in RAM");
    r.host_addr + usize::try_from(gpa - r.gpa.0).expect("fits")
}

fn count_states(vm: &Vm, start: u64, end: u64) -> (u64, u64) {
    let (mut ballooned, mut present) = (0, 0);
    for a in (start..end).step_by(4096) {
        match vm.stage2().table().query(Gpa(a)) {
            PageState::Ballooned { .. } => ballooned += 1,
            PageState::Present { .. } => present += 1,
            _ => {}
        }
    }
    (ballooned, present)
}

fn guest_balloon(name: &str, backing: Backing, page: PageSize) {
    if !kvm_or_skip(name) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut c, console) = config("256M", 1, backing, page, Workload::Balloon);
    c.balloon = Some(BalloonConfig::default());
    let (mut vm, _) = start_balloon_driver(c, &console);
    let (start, end) = vmm::guest::share(vm.config().mem.bytes(), 1, 0);
    let lo = end - BALLOON;
    let host = host_of(&vm, lo);
    let files = Some(vm.memory().regions()[0].files).filter(|f| f.first().is_some());
    assert_eq!(resident_pages(host, BALLOON), PAGES, "the guest wrote them");
    let blocks0 = files.as_ref().map(file_bytes);
    let rss0 = vmm::proc_stats::rss().rss;
    let dev = vm.balloon().expect("balloon configured").clone();

    // Inflate 128 MiB.
    let t = Instant::now();
    vm.set_balloon_target(u32::try_from(PAGES).expect("fits"))
        .expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == PAGES)
        .expect("status");
    let inflate_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(ok, "inflate did not finish: {st:?} {:?}", vm.outcomes());
    let rss1 = vmm::proc_stats::rss().rss;
    let c = dev.counters();
    assert_eq!(c.errors, 0, "{:?}", dev.lock().device().recent_errors());
    assert_eq!(dev.lock().errors(), 0, "{:?}", dev.lock().recent_errors());
    assert_eq!(c.pages_inflated, PAGES);
    assert_eq!(dev.lock().device().actual_pages(), PAGES as u32);
    assert_eq!(st.inflated, PAGES);
    assert_eq!(resident_pages(host, BALLOON), 0, "ballooned pages gone");
    let drop = rss0.saturating_sub(rss1);
    assert!(
        drop >= 120 * MIB,
        "RSS dropped by {} MiB only ({} -> {} MiB)",
        drop / MIB,
        rss0 / MIB,
        rss1 / MIB
    );
    if let (Some(files), Some(b0)) = (files, blocks0) {
        let b1 = file_bytes(&files);
        assert!(
            b0.saturating_sub(b1) >= BALLOON,
            "memfd blocks dropped by {} MiB",
            b0.saturating_sub(b1) / MIB
        );
    }
    assert_eq!(count_states(&vm, lo, end), (PAGES, 0));
    let below = (lo - start) / 4096;
    assert_eq!(count_states(&vm, start, lo), (0, below), "the rest stays");
    assert_eq!(vm.check_pattern(start, lo).expect("host read"), 0);

    // Deflate to 0: the guest touches and re-verifies every page.
    let faults0 = vm.fault_stats().summary().faults;
    let t = Instant::now();
    vm.set_balloon_target(0).expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == 0 && s.reverified == PAGES)
        .expect("status");
    let deflate_ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(ok, "deflate did not finish: {st:?} {:?}", vm.outcomes());
    assert_eq!(st.bad_words, 0, "guest re-verify failed: {st:?}");
    assert_eq!(st.first_bad, None);
    assert_eq!(st.error, None);
    assert_eq!(dev.counters().pages_deflated, PAGES);
    assert_eq!(dev.lock().device().actual_pages(), 0);
    let faults = vm.fault_stats().summary().faults - faults0;
    assert!(faults > 0, "deflated pages came back through the handler");
    assert_eq!(count_states(&vm, lo, end), (0, PAGES));
    assert_eq!(resident_pages(host, BALLOON), PAGES);
    assert_eq!(vm.stage2().unexpected_faults(), 0);
    assert_eq!(vm.check_pattern(start, end).expect("host read"), 0);
    let rss2 = vmm::proc_stats::rss().rss;

    vm.finish_probes().expect("post CMD_EXIT");
    assert!(vm.wait(GUEST_TIMEOUT), "{:?}", vm.outcomes());
    let text = console_text(&console);
    assert!(vm.guest_ok(), "{:?}\n{text}", vm.outcomes());
    let st = vm.balloon_driver_status().expect("status");
    assert_eq!(st.state, DriverState::Exited);
    for line in [
        "balloon driver ready",
        &format!("balloon at {PAGES} pages"),
        "balloon at 0 pages",
    ] {
        assert!(text.contains(line), "missing {line:?} in console:\n{text}");
    }
    loud!(
        "{name}: inflate {} MiB in {inflate_ms:.1} ms (device {:.1} ms), RSS {} -> {} MiB; \
         deflate + guest re-verify {deflate_ms:.1} ms, {faults} faults, RSS {} MiB",
        BALLOON / MIB,
        c.inflate_ns_total as f64 / 1e6,
        rss0 / MIB,
        rss1 / MIB,
        rss2 / MIB
    );
    std::mem::drop(dev);
    destroy_and_check(vm);
}

#[test]
fn guest_driver_inflates_and_deflates_anon_4k() {
    guest_balloon(
        "guest_driver_inflates_and_deflates_anon_4k",
        Backing::Anon,
        PageSize::Size4K,
    );
}

#[test]
fn guest_driver_inflates_and_deflates_anon_2m() {
    guest_balloon(
        "guest_driver_inflates_and_deflates_anon_2m",
        Backing::Anon,
        PageSize::Size2M,
    );
}

#[test]
fn guest_driver_inflates_and_deflates_memfd_4k() {
    guest_balloon(
        "guest_driver_inflates_and_deflates_memfd_4k",
        Backing::Memfd,
        PageSize::Size4K,
    );
}

#[test]
fn guest_driver_inflates_and_deflates_memfd_2m() {
    guest_balloon(
        "guest_driver_inflates_and_deflates_memfd_2m",
        Backing::Memfd,
        PageSize::Size2M,
    );
}

/// Without a balloon device the driver finds no virtio magic, records the
/// error, reports it and stops; the VM stays up.
#[test]
fn guest_driver_reports_a_missing_device() {
    let name = "guest_driver_reports_a_missing_device";
    if !kvm_or_skip(name) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (c, console) = config("16M", 1, Backing::Anon, PageSize::Size2M, Workload::Balloon);
    let mut vm = Vm::new(c).expect("VM creation");
    vm.start().expect("vCPU start");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.state == DriverState::Failed)
        .expect("status");
    assert!(ok, "{st:?} {:?}", vm.outcomes());
    assert_eq!(st.error, Some(DriverError::BadMagic(0)));
    // The report (OP_BALLOON_ERROR) ends vCPU 0 with the decoded error.
    assert!(vm.wait(Duration::from_secs(10)), "{:?}", vm.outcomes());
    assert_eq!(
        vm.outcomes()[0].1,
        VcpuOutcome::BalloonDriverError(DriverError::BadMagic(0))
    );
    assert_eq!(
        vm.balloon_driver_errors(),
        vec![(0, DriverError::BadMagic(0))]
    );
    assert!(!vm.guest_ok());
    let text = console_text(&console);
    assert!(
        text.contains("guest: vcpu 0: balloon driver error 1"),
        "{text}"
    );
    destroy_and_check(vm);
}

/// With two vCPUs only vCPU 0 drives the balloon, from the end of its own
/// share; vCPU 1 verifies and finishes, and its share is untouched.
#[test]
fn guest_driver_balloons_only_vcpu0_share() {
    let name = "guest_driver_balloons_only_vcpu0_share";
    if !kvm_or_skip(name) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (c, console) = balloon_driver_config("128M", 2, Backing::Anon);
    let (mut vm, _) = start_balloon_driver(c, &console);
    let mem = vm.config().mem.bytes();
    let (s0, e0) = vmm::guest::share(mem, 2, 0);
    let (s1, e1) = vmm::guest::share(mem, 2, 1);
    let pages = 8 * MIB / 4096;
    let dev = vm.balloon().expect("balloon").clone();
    vm.set_balloon_target(u32::try_from(pages).expect("fits"))
        .expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == pages)
        .expect("status");
    assert!(ok, "{st:?} {:?}", vm.outcomes());
    assert_eq!(count_states(&vm, e0 - 8 * MIB, e0), (pages, 0));
    assert_eq!(count_states(&vm, s0, e0 - 8 * MIB).0, 0);
    assert_eq!(count_states(&vm, s1, e1), (0, (e1 - s1) / 4096));
    assert_eq!(vm.check_pattern(s1, e1).expect("host read"), 0);
    // vCPU 1 finished on its own.
    assert!(vm
        .outcomes()
        .iter()
        .any(|(i, o)| *i == 1 && *o == VcpuOutcome::Done));
    tests::finish_guest_ok(&mut vm, &console);
    drop(dev);
    destroy_and_check(vm);
}

/// Free page reporting from the guest: the driver reports 8 MiB below its
/// balloon on the reporting queue; the device releases the backing through
/// the gather (discarded, not ballooned); the guest touches the pages again
/// (demand faults) and verifies them.
#[test]
fn guest_driver_reports_free_pages() {
    let name = "guest_driver_reports_free_pages";
    if !kvm_or_skip(name) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (c, console) = balloon_driver_config("64M", 1, Backing::Memfd);
    let (mut vm, st) = start_balloon_driver(c, &console);
    assert!(st.reporting, "reporting negotiated: {st:?}");
    let dev = vm.balloon().expect("balloon").clone();
    assert!(dev.lock().device().reporting());
    // 4 MiB in the balloon first: the report covers the 8 MiB below it.
    let balloon = 4 * MIB / 4096;
    vm.set_balloon_target(u32::try_from(balloon).expect("fits"))
        .expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == balloon)
        .expect("status");
    assert!(ok, "{st:?}");
    let (start, end) = vmm::guest::share(vm.config().mem.bytes(), 1, 0);
    let pages = 8 * MIB / 4096;
    let faults0 = vm.fault_stats().summary().faults;
    let seq = vm.balloon_report_free(pages).expect("post");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.seq == seq && s.reverified == pages)
        .expect("status");
    assert!(ok, "{st:?} {:?}", vm.outcomes());
    assert_eq!(st.reported, pages);
    assert_eq!(st.bad_words, 0, "{st:?}");
    let c = dev.counters();
    assert_eq!(c.errors, 0, "{:?}", dev.lock().device().recent_errors());
    assert_eq!(c.bytes_reported, 8 * MIB);
    assert_eq!(c.bytes_released, 4 * MIB + 8 * MIB);
    assert!(vm.fault_stats().summary().faults - faults0 >= pages);
    let lo = end - 4 * MIB;
    assert_eq!(count_states(&vm, lo, end), (balloon, 0), "balloon kept");
    assert_eq!(count_states(&vm, start, lo), (0, (lo - start) / 4096));
    assert_eq!(vm.check_pattern(start, lo).expect("host read"), 0);
    assert_eq!(vm.stage2().unexpected_faults(), 0);
    vm.finish_probes().expect("post CMD_EXIT");
    assert!(vm.wait(GUEST_TIMEOUT), "{:?}", vm.outcomes());
    let text = console_text(&console);
    assert!(vm.guest_ok(), "{:?}\n{text}", vm.outcomes());
    assert!(
        text.contains(&format!("free pages reported so far {pages}")),
        "{text}"
    );
    drop(dev);
    destroy_and_check(vm);
}

/// Without `REPORTING` offered the driver negotiates without it and counts
/// report commands as refused; inflating still works.
#[test]
fn guest_driver_without_reporting() {
    let name = "guest_driver_without_reporting";
    if !kvm_or_skip(name) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut c, console) = config("32M", 1, Backing::Anon, PageSize::Size4K, Workload::Balloon);
    c.balloon = Some(BalloonConfig {
        stats: false,
        deflate_on_oom: false,
        reporting: false,
    });
    let (mut vm, st) = start_balloon_driver(c, &console);
    assert!(!st.reporting);
    let seq = vm.balloon_report_free(16).expect("post");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.seq == seq)
        .expect("status");
    assert!(ok, "{st:?}");
    assert_eq!(st.reports_refused, 1);
    assert_eq!(st.reported, 0);
    let dev = vm.balloon().expect("balloon").clone();
    assert!(!dev.lock().device().deflate_on_oom());
    vm.set_balloon_target(256).expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == 256)
        .expect("status");
    assert!(ok, "{st:?}");
    assert_eq!(dev.counters().errors, 0);
    assert_eq!(dev.lock().errors(), 0, "{:?}", dev.lock().recent_errors());
    vm.finish_probes().expect("post CMD_EXIT");
    assert!(vm.wait(GUEST_TIMEOUT), "{:?}", vm.outcomes());
    assert!(vm.guest_ok(), "{:?}", vm.outcomes());
    drop(dev);
    destroy_and_check(vm);
}
