//! Boot the default guest with 1 and 2 vCPUs on every backing the host
//! supports; the guest verifies its pattern, the host checks it too.
//!
//! No rule of `guest-mm/src/mutation.rs` is aimed at by this file; every
//! VM's teardown is checked (all RAM unmapped, stage-2 table freed).

use tests::{boot_and_verify, destroy_and_check, kvm_or_skip, HugePages};
use vmm::vstate::vcpu::VcpuOutcome;
use vmm::{Backing, PageSize};

fn boot(name: &str, mem: &str, vcpus: u32, backing: Backing, page: PageSize) {
    if !kvm_or_skip(name) {
        return;
    }
    let vm = boot_and_verify(mem, vcpus, backing, page);
    let mem_bytes = vm.config().mem.bytes();
    let mut t = vm.destroy();
    assert!(
        t.outcomes.iter().all(|o| *o == VcpuOutcome::Done),
        "{:?}",
        t.outcomes
    );
    assert_eq!(t.wait_reclaim().unmapped_bytes, mem_bytes);
}

#[test]
fn anon_2m_1vcpu() {
    boot("anon_2m_1vcpu", "128M", 1, Backing::Anon, PageSize::Size2M);
}

#[test]
fn anon_2m_2vcpus() {
    boot("anon_2m_2vcpus", "256M", 2, Backing::Anon, PageSize::Size2M);
}

#[test]
fn anon_4k_2vcpus() {
    boot("anon_4k_2vcpus", "64M", 2, Backing::Anon, PageSize::Size4K);
}

#[test]
fn memfd_2m_1vcpu() {
    boot("memfd_2m_1vcpu", "64M", 1, Backing::Memfd, PageSize::Size2M);
}

#[test]
fn memfd_4k_2vcpus() {
    boot(
        "memfd_4k_2vcpus",
        "64M",
        2,
        Backing::Memfd,
        PageSize::Size4K,
    );
}

#[test]
fn many_vcpus_share_ram() {
    boot(
        "many_vcpus_share_ram",
        "64M",
        4,
        Backing::Anon,
        PageSize::Size2M,
    );
}

#[test]
fn hugetlb_1_and_2_vcpus() {
    let name = "hugetlb_1_and_2_vcpus";
    if !kvm_or_skip(name) {
        return;
    }
    // Both boots in one test: the huge page guard is process-global state.
    let Some(_pages) = HugePages::reserve(name, 32) else {
        return;
    };
    for vcpus in [1, 2] {
        let vm = boot_and_verify("64M", vcpus, Backing::Hugetlb, PageSize::Size2M);
        destroy_and_check(vm);
    }
}

#[test]
fn guest_exception_is_reported() {
    use vmm::guest::{layout, FAULT_ADDR};
    use vmm::{Vm, Workload};
    if !kvm_or_skip("guest_exception_is_reported") {
        return;
    }
    let (c, _) = tests::config("16M", 1, Backing::Anon, PageSize::Size2M, Workload::Fault);
    let mut vm = Vm::new(c).expect("VM creation");
    vm.start().expect("start");
    assert!(vm.wait(tests::GUEST_TIMEOUT), "guest did not stop");
    assert!(!vm.guest_ok());
    let outcomes = vm.outcomes();
    let VcpuOutcome::Exception(e) = &outcomes[0].1 else {
        panic!("expected a page fault, got {outcomes:?}");
    };
    assert_eq!((e.vector, e.cr2), (14, FAULT_ADDR), "{e:?}");
    let image = layout::IMAGE..layout::IMAGE + layout::IMAGE_MAX;
    assert!(
        image.contains(&e.rip),
        "faulting rip {:#x} outside the image",
        e.rip
    );
    destroy_and_check(vm);
}
