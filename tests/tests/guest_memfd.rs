//! guest_memfd backing end to end (`Backing::GuestMemfd`: a KVM guest_memfd
//! created `MMAP | INIT_SHARED`, mapped shared as guest RAM and bound to
//! the memory slot with `KVM_SET_USER_MEMORY_REGION2`): the guest boots
//! and verifies its RAM, releases punch holes through the gather, the
//! balloon (the guest's own driver) gives memory back, and teardown
//! releases all of it.
//!
//! Where the memory is seen: KVM faults guest pages straight from the file,
//! so they are in neither the process RSS nor the file's `st_blocks`
//! (guest_memfd does not count them). The proof is `mincore` over the
//! guest RAM mapping (`VmMemory::resident_bytes`: the file's pages in the
//! page cache, whoever maps them) and, after teardown, `/proc/meminfo`'s
//! `Unevictable` (guest_memfd pages are unevictable).
//!
//! No userfaultfd: the kernel refuses to register guest_memfd mappings, so
//! a released page comes back on its next touch as a fresh zero page of
//! the file, and the table keeps its *discarded* marker. The tests check
//! that the next release still gives such a page back (the release makes
//! discarded leaves present again before its gather).
//!
//! Every test skips loudly where the host's KVM lacks guest_memfd support.
//! They run one at a time (one lock). No rule of
//! `guest-mm/src/mutation.rs` is aimed at by this file.

use std::sync::Mutex;
use std::time::Duration;

use guest_mm::{Gpa, PageState};
use tests::{
    balloon_driver_config, boot_and_verify, config, destroy_and_check, finish_guest_ok,
    guest_memfd_or_skip, loud, start_balloon_driver, GUEST_TIMEOUT,
};
use vmm::guest::pattern;
use vmm::{Backing, PageSize, Vm, Workload};

static SERIAL: Mutex<()> = Mutex::new(());
const MIB: u64 = 1 << 20;
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

fn unevictable() -> u64 {
    vmm::proc_stats::meminfo("Unevictable:").unwrap_or(0)
}

fn boot(name: &str, page: PageSize) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !guest_memfd_or_skip(name) {
        return;
    }
    let u0 = unevictable();
    let rss0 = vmm::proc_stats::rss().rss;
    let vm = boot_and_verify("128M", 2, Backing::GuestMemfd, page);
    let resident = vm.memory().resident_bytes();
    let rss1 = vmm::proc_stats::rss().rss;
    let u1 = unevictable();
    assert!(
        resident >= 126 * MIB,
        "{name}: the guest wrote its RAM into the file: {} MiB resident",
        resident / MIB
    );
    assert!(!vm.memory().has_demand_faults());
    assert_eq!(vm.fault_stats().summary().faults, 0);
    let (_, r) = destroy_and_check(vm);
    let u2 = unevictable();
    assert_eq!(
        r.stage2.released_bytes,
        128 * MIB,
        "{name}: the teardown gather punched all of guest RAM: {r:?}"
    );
    loud!(
        "{name}: guest RAM resident {} MiB (process RSS {} -> {} MiB: KVM maps the file, \
         not this process); host Unevictable {} -> {} -> {} MiB; memory back {:.2} ms",
        resident / MIB,
        rss0 / MIB,
        rss1 / MIB,
        u0 / MIB,
        u1 / MIB,
        u2 / MIB,
        r.memory_back_ms
    );
    assert!(
        u1.saturating_sub(u2) >= 100 * MIB,
        "{name}: teardown did not give the guest_memfd's pages back: Unevictable {} -> {} MiB",
        u1 / MIB,
        u2 / MIB
    );
}

#[test]
fn boot_guest_memfd_4k() {
    boot("boot_guest_memfd_4k", PageSize::Size4K);
}

#[test]
fn boot_guest_memfd_2m() {
    boot("boot_guest_memfd_2m", PageSize::Size2M);
}

/// Probes `gpa` and returns (OR of the page's words, first word).
fn probe(vm: &mut Vm, gpa: u64) -> (u64, u64) {
    let p = vm
        .probe(gpa, PROBE_TIMEOUT)
        .expect("control page")
        .unwrap_or_else(|| panic!("no answer to the probe of {gpa:#x}: {:?}", vm.outcomes()));
    (p.or_words, p.first_word)
}

fn state(vm: &Vm, gpa: u64) -> PageState {
    vm.stage2().table().query(Gpa(gpa))
}

fn release(name: &str, page: PageSize) {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !guest_memfd_or_skip(name) {
        return;
    }
    let (c, console) = config("64M", 2, Backing::GuestMemfd, page, Workload::Probe);
    let seed = c.seed;
    let mut vm = Vm::new(c).expect("VM creation");
    vm.start().expect("vCPU start");
    assert!(vm.wait_results(GUEST_TIMEOUT), "{:?}", vm.outcomes());
    let leaf = page.bytes();
    let target = 8 * MIB;
    let inside = target + ((leaf / 2) & !0xfff);
    let other = target + leaf + 0x3000;
    assert_eq!(probe(&mut vm, inside).1, pattern(inside, seed));
    assert_eq!(vm.memory().resident_bytes_of(target, leaf), leaf);

    vm.release_range(target, leaf).expect("release");
    assert_eq!(
        vm.memory().resident_bytes_of(target, leaf),
        0,
        "the hole is punched in the file"
    );
    assert!(matches!(state(&vm, inside), PageState::Discarded { .. }));
    // The guest reads zeros: the kernel gave it a fresh page of the file,
    // without the fault handler, and the table did not hear of it.
    assert_eq!(probe(&mut vm, inside), (0, 0));
    let s = vm.fault_stats().summary();
    assert_eq!((s.faults, s.releases, s.errors), (0, 1, 0), "{s:?}");
    assert!(vm.memory().resident_bytes_of(target, leaf) >= 4096);
    assert!(matches!(state(&vm, inside), PageState::Discarded { .. }));
    // Released again: the page the kernel refilled goes too.
    vm.release_range(target, leaf).expect("second release");
    assert_eq!(
        vm.memory().resident_bytes_of(target, leaf),
        0,
        "a refilled page behind a discarded marker was not released"
    );
    assert_eq!(probe(&mut vm, target), (0, 0));
    // The host sees zeros over the whole leaf (its reads restore the leaf
    // in the table), and the neighbour kept its data.
    assert_eq!(vm.check_pattern(target, target + leaf).unwrap(), leaf / 8);
    assert!(matches!(state(&vm, inside), PageState::Present { .. }));
    assert_eq!(probe(&mut vm, other).1, pattern(other & !0xfff, seed));

    finish_guest_ok(&mut vm, &console);
    assert_eq!(vm.stage2().unexpected_faults(), 0);
    destroy_and_check(vm);
}

#[test]
fn release_guest_memfd_4k() {
    release("release_guest_memfd_4k", PageSize::Size4K);
}

#[test]
fn release_guest_memfd_2m() {
    release("release_guest_memfd_2m", PageSize::Size2M);
}

const BALLOON: u64 = 128 * MIB;
const PAGES: u64 = BALLOON / 4096;

fn ballooned_pages(vm: &Vm, start: u64, end: u64) -> u64 {
    (start..end)
        .step_by(4096)
        .filter(|&a| matches!(state(vm, a), PageState::Ballooned { .. }))
        .count() as u64
}

/// The guest's own driver inflates 128 MiB of 256 MiB, deflates to 0
/// (re-verifying every page, which the kernel refills), and inflates
/// again: both inflates give the file's pages back.
#[test]
fn guest_driver_balloon_on_guest_memfd() {
    let name = "guest_driver_balloon_on_guest_memfd";
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !guest_memfd_or_skip(name) {
        return;
    }
    let (c, console) = balloon_driver_config("256M", 1, Backing::GuestMemfd);
    let (mut vm, _) = start_balloon_driver(c, &console);
    let (start, end) = vmm::guest::share(vm.config().mem.bytes(), 1, 0);
    let lo = end - BALLOON;
    let resident = |vm: &Vm| vm.memory().resident_bytes_of(lo, BALLOON);
    assert_eq!(resident(&vm), BALLOON, "the guest wrote them");
    let total0 = vm.memory().resident_bytes();
    let dev = vm.balloon().expect("balloon configured").clone();
    let mut drops = Vec::new();
    for round in 0..2 {
        vm.set_balloon_target(u32::try_from(PAGES).expect("fits"))
            .expect("balloon target");
        let (st, ok) = vm
            .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == PAGES)
            .expect("status");
        assert!(ok, "round {round}: inflate: {st:?} {:?}", vm.outcomes());
        assert_eq!(resident(&vm), 0, "round {round}: ballooned pages gone");
        let total1 = vm.memory().resident_bytes();
        assert!(
            total0.saturating_sub(total1) >= 120 * MIB,
            "round {round}: resident guest RAM {} -> {} MiB",
            total0 / MIB,
            total1 / MIB
        );
        drops.push(total0 - total1);
        assert_eq!(ballooned_pages(&vm, lo, end), PAGES);
        assert_eq!(dev.counters().errors, 0);

        vm.set_balloon_target(0).expect("balloon target");
        let (st, ok) = vm
            .wait_balloon_driver(GUEST_TIMEOUT, |s| {
                s.pages == 0 && s.reverified == PAGES * (round + 1)
            })
            .expect("status");
        assert!(ok, "round {round}: deflate: {st:?} {:?}", vm.outcomes());
        assert_eq!(st.bad_words, 0, "guest re-verify failed: {st:?}");
        // Refilled by the kernel, not the handler: still discarded in the
        // table, which the next inflate must see through.
        assert_eq!(resident(&vm), BALLOON);
        assert_eq!(vm.fault_stats().summary().faults, 0);
        assert_eq!(ballooned_pages(&vm, lo, end), 0);
        assert!(matches!(state(&vm, lo), PageState::Discarded { .. }));
    }
    assert_eq!(vm.check_pattern(start, end).expect("host read"), 0);
    assert_eq!(dev.counters().bytes_released, 2 * BALLOON);
    tests::finish_guest_ok(&mut vm, &console);
    loud!(
        "{name}: inflate of 128 MiB: resident guest RAM drop {} MiB, then {} MiB after a \
         deflate the kernel refilled",
        drops[0] / MIB,
        drops[1] / MIB
    );
    drop(dev);
    destroy_and_check(vm);
}
