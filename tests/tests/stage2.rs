//! The stage-2 table (guest-mm) inside a running VM: releases go through
//! its gather and leave discarded markers, guest touches fault them back in
//! through the table's sequence protocol, host-side access uses the fast
//! walk, and teardown releases everything through a whole-VM gather.
//!
//! No rule of `guest-mm/src/mutation.rs` is aimed at by this file (it
//! checks the monitor's plumbing); no assertion here depends on timing.

use std::time::Duration;

use guest_mm::{Gpa, PageState};
use tests::{config, kvm_or_skip, GUEST_TIMEOUT};
use vmm::guest::pattern;
use vmm::{Backing, PageSize, Vm, Workload};

fn run_probe_vm(backing: Backing, page: PageSize) -> Vm {
    let (c, _console) = config("64M", 1, backing, page, Workload::Probe);
    let mut vm = Vm::new(c).expect("VM creation");
    vm.start().expect("start");
    assert!(vm.wait_results(GUEST_TIMEOUT), "{:?}", vm.outcomes());
    vm
}

fn release_faults_back_through_table(name: &str, backing: Backing, page: PageSize) {
    if !kvm_or_skip(name) {
        return;
    }
    let mut vm = run_probe_vm(backing, page);
    let seed = vm.config().seed;
    let granule = page.bytes();
    let target = 8 << 20;
    let table = vm.stage2().table().clone();
    // the table mirrors the slot with leaves of the backing's page size
    match table.query(Gpa(target)) {
        PageState::Present { size, .. } => assert_eq!(size.bytes(), granule),
        s => panic!("{s:?}"),
    }
    let inv_before = table.stats().invalidations;
    vm.release_range(target, granule).expect("release");
    assert!(
        matches!(table.query(Gpa(target)), PageState::Discarded { .. }),
        "release must leave a discarded marker"
    );
    assert!(table.stats().invalidations > inv_before);
    assert!(table.stats().released_bytes >= granule);
    assert!(
        vm.stage2()
            .kvm_side()
            .starts
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "the KVM-side subscriber must hear the invalidation"
    );
    // the guest touches it: demand fault, committed into the table
    let p = vm
        .probe(target + ((granule / 2) & !0xfff), Duration::from_secs(10))
        .unwrap()
        .expect("probe");
    assert_eq!((p.or_words, p.first_word), (0, 0));
    assert!(
        matches!(table.query(Gpa(target)), PageState::Present { .. }),
        "the fault must mark the page present again"
    );
    assert!(table.stats().faults_restored >= 1);
    assert_eq!(vm.stage2().unexpected_faults(), 0);
    // host-side reads go through the fast walk: the neighbour is intact
    let next = target + granule;
    assert_eq!(vm.check_pattern(next, next + granule).unwrap(), 0);
    let mut acc = vm.stage2().access();
    let mut w = [0u8; 8];
    acc.read(next + 8, &mut w).unwrap();
    assert_eq!(u64::from_le_bytes(w), pattern(next + 8, seed));
    assert!(acc.stats().translations > 0);
    vm.finish_probes().unwrap();
    assert!(vm.wait(GUEST_TIMEOUT));
    let mut t = vm.destroy();
    let r = t.wait_reclaim();
    assert_eq!(
        r.stage2.table_pages_left, 1,
        "table pages freed after the barrier"
    );
    assert!(r.stage2.released_bytes > 0);
}

#[test]
fn anon_2m_release_and_fault_go_through_the_table() {
    release_faults_back_through_table(
        "anon_2m_release_and_fault_go_through_the_table",
        Backing::Anon,
        PageSize::Size2M,
    );
}

#[test]
fn anon_4k_release_and_fault_go_through_the_table() {
    release_faults_back_through_table(
        "anon_4k_release_and_fault_go_through_the_table",
        Backing::Anon,
        PageSize::Size4K,
    );
}

#[test]
fn memfd_release_and_fault_go_through_the_table() {
    release_faults_back_through_table(
        "memfd_release_and_fault_go_through_the_table",
        Backing::Memfd,
        PageSize::Size2M,
    );
}

#[test]
fn teardown_releases_all_guest_ram_through_the_gather() {
    if !kvm_or_skip("teardown_releases_all_guest_ram_through_the_gather") {
        return;
    }
    let vm = tests::boot_and_verify("128M", 2, Backing::Anon, PageSize::Size2M);
    let table = vm.stage2().table().clone();
    let mut t = vm.destroy();
    let r = t.wait_reclaim();
    assert_eq!(
        r.stage2.released_bytes,
        128 << 20,
        "every mapped byte released by the gather"
    );
    assert_eq!(r.stage2.table_pages_left, 1);
    assert!(table.is_dying());
    assert_eq!(table.query(Gpa(4 << 20)), PageState::Unmapped);
}
