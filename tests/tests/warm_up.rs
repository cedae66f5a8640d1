//! `vm::warm_up` (what the service does while it waits for
//! `InstanceStart`) makes an empty KVM VM ahead of time, and the next
//! `Vm::new` of the process starts from it instead of creating its own:
//! its VM is that very file descriptor, the guest boots and verifies its
//! RAM on it, and the VM after it makes its own again. Seen through the
//! process's `kvm-vm` descriptors (`/proc/self/fd`), so a `Vm::new` that
//! ignored the spare (two KVM VMs) or a warm-up that made none fails it.
//!
//! One test in this binary: no other test may create VMs meanwhile.

use tests::{boot_and_verify, destroy_and_check, kvm_or_skip};
use vmm::{Backing, PageSize};

/// The file descriptors of this process that are KVM VMs.
fn kvm_vm_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("reading /proc/self/fd")
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:kvm-vm")
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    fds.sort();
    fds
}

#[test]
fn the_next_vm_starts_from_the_warmed_up_kvm_vm() {
    if !kvm_or_skip("the_next_vm_starts_from_the_warmed_up_kvm_vm") {
        return;
    }
    assert_eq!(kvm_vm_fds(), Vec::<String>::new(), "a KVM VM before any");
    vmm::vstate::vm::warm_up();
    let spare = kvm_vm_fds();
    assert_eq!(spare.len(), 1, "warm_up made no KVM VM: {spare:?}");

    let vm = boot_and_verify("32M", 1, Backing::Anon, PageSize::Size2M);
    assert_eq!(
        kvm_vm_fds(),
        spare,
        "Vm::new made a KVM VM of its own instead of taking the warmed-up one"
    );
    // The spare is gone: the next VM makes its own.
    let second = boot_and_verify("32M", 1, Backing::Anon, PageSize::Size2M);
    let both = kvm_vm_fds();
    assert_eq!(both.len(), 2, "two VMs, two KVM VMs: {both:?}");
    destroy_and_check(second);
    destroy_and_check(vm);
    assert_eq!(
        kvm_vm_fds(),
        Vec::<String>::new(),
        "a KVM VM outlived its Vm"
    );
}
