//! Teardown gives guest RAM back: RSS (anon, memfd) and free huge pages
//! (hugetlb, which RSS does not count) return to where they were.
//!
//! The tests take one lock so that they run one at a time: RSS is per
//! process, and another test's VM would disturb it.
//!
//! No rule of `guest-mm/src/mutation.rs` is aimed at by this file; times
//! are printed (past the harness's capture), never asserted.

use std::sync::Mutex;

use tests::{boot_and_verify, kvm_or_skip, loud, HugePages};
use vmm::memory::free_huge_pages;
use vmm::proc_stats::rss;
use vmm::{Backing, PageSize};

static SERIAL: Mutex<()> = Mutex::new(());
const MIB: u64 = 1 << 20;

fn rss_returns(name: &str, backing: Backing, page: PageSize) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip(name) {
        return;
    }
    let before = rss().rss;
    let vm = boot_and_verify("128M", 2, backing, page);
    let during = rss().rss;
    assert!(
        during >= before + 120 * MIB,
        "{name}: guest RAM not resident while running: before {} MiB, during {} MiB",
        before / MIB,
        during / MIB
    );
    let mut t = vm.destroy();
    let r = t.wait_reclaim();
    let after = rss().rss;
    loud!(
        "{name}: RSS before {} MiB, during {} MiB, after {} MiB; teardown {:.2} ms, \
         reclaim {:.2} ms",
        before / MIB,
        during / MIB,
        after / MIB,
        t.teardown_ms,
        r.reclaim_ms
    );
    assert_eq!(r.unmapped_bytes, 128 * MIB);
    assert!(
        after <= before + 4 * MIB,
        "{name}: RSS did not come back: before {} KiB, after {} KiB",
        before >> 10,
        after >> 10
    );
}

#[test]
fn anon_rss_returns() {
    rss_returns("anon_rss_returns", Backing::Anon, PageSize::Size2M);
}

#[test]
fn anon_4k_rss_returns() {
    rss_returns("anon_4k_rss_returns", Backing::Anon, PageSize::Size4K);
}

#[test]
fn memfd_rss_returns() {
    rss_returns("memfd_rss_returns", Backing::Memfd, PageSize::Size2M);
}

/// A caller that does not wait still gets the memory back: the VM's
/// reclaim thread takes the remains (a caller that waits at once usually
/// releases them itself, see `vmm::Vm::destroy`).
#[test]
fn memory_comes_back_with_nobody_waiting() {
    let name = "memory_comes_back_with_nobody_waiting";
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip(name) {
        return;
    }
    let before = rss().rss;
    let vm = boot_and_verify("128M", 2, Backing::Anon, PageSize::Size4K);
    let mut t = vm.destroy();
    let t0 = std::time::Instant::now();
    while rss().rss > before + 4 * MIB {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{name}: RSS still {} MiB (before {} MiB) 10 s after destroy, with nobody waiting",
            rss().rss / MIB,
            before / MIB
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let r = t.wait_reclaim();
    loud!(
        "{name}: memory back {:.2} ms after destroy, in the background",
        r.memory_back_ms
    );
    assert!(!r.by_waiter, "{name}: the memory came back before the wait");
    assert_eq!(r.unmapped_bytes, 128 * MIB);
}

#[test]
fn hugetlb_pages_return() {
    let name = "hugetlb_pages_return";
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip(name) {
        return;
    }
    let Some(_pages) = HugePages::reserve(name, 32) else {
        return;
    };
    let before = free_huge_pages();
    let vm = boot_and_verify("64M", 1, Backing::Hugetlb, PageSize::Size2M);
    let during = free_huge_pages();
    assert!(
        during + 32 <= before,
        "guest did not use huge pages: {before} -> {during}"
    );
    let r = vm.destroy().wait_reclaim();
    assert_eq!(r.unmapped_bytes, 64 * MIB, "{r:?}");
    assert_eq!(free_huge_pages(), before, "huge pages not returned");
}

#[test]
fn large_guest_costs_only_what_it_touches() {
    let name = "large_guest_costs_only_what_it_touches";
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_or_skip(name) {
        return;
    }
    // 8 GiB of guest RAM is created (8 page directories, no real-mode TSS
    // slot below 4 GiB) but never run: only the set-up area is touched.
    let before = rss().rss;
    let (c, _) = tests::config(
        "8G",
        4,
        Backing::Anon,
        PageSize::Size2M,
        vmm::Workload::Verify,
    );
    let vm = vmm::Vm::new(c).expect("8 GiB VM");
    let during = rss().rss;
    assert!(
        during <= before + 8 * MIB,
        "set-up of an 8 GiB guest made {} MiB resident",
        (during - before) / MIB
    );
    assert_eq!(vm.memory().regions()[0].len, 8 << 30);
    let mut t = vm.destroy();
    assert_eq!(t.wait_reclaim().unmapped_bytes, 8 << 30);
}
