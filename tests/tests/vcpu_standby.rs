//! A VM's vCPU threads start with `Vm::new`, before the VM does
//! (`vcpu::Standby`): they get ready while the rest of the VM is set up,
//! and the start only hands them their vCPUs. Seen through this process's
//! threads named `vcpu*` (`/proc/self/task`): a `Vm::new` that left them
//! to the start, a start that made threads of its own, or a VM dropped
//! before its start that left its waiting threads behind fails it.
//!
//! One test in this binary: no other test may create VMs meanwhile.

use std::time::{Duration, Instant};

use tests::{boot_and_verify, config, destroy_and_check, kvm_or_skip};
use vmm::guest::Workload;
use vmm::{Backing, PageSize, Vm};

/// This process's threads named `vcpu<N>`, by thread id.
fn vcpu_threads() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/proc/self/task")
        .expect("reading /proc/self/task")
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| {
                c.trim()
                    .strip_prefix("vcpu")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .filter_map(|t| t.file_name().to_string_lossy().parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Waits up to 5 s for the `vcpu<N>` threads to be `n` (a new thread
/// takes its name itself once it runs; a joined thread leaves
/// `/proc/self/task` a moment after its join returned).
fn settle(n: usize) -> Vec<u32> {
    let t0 = Instant::now();
    loop {
        let v = vcpu_threads();
        if v.len() == n || t0.elapsed() > Duration::from_secs(5) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn vcpu_threads_wait_from_vm_creation_and_end_with_an_unstarted_vm() {
    if !kvm_or_skip("vcpu_threads_wait_from_vm_creation_and_end_with_an_unstarted_vm") {
        return;
    }
    assert_eq!(
        vcpu_threads(),
        Vec::<u32>::new(),
        "vCPU threads before any VM"
    );

    // Created, never started: its threads wait, then end with it.
    let (c, _console) = config("32M", 3, Backing::Anon, PageSize::Size2M, Workload::Verify);
    let vm = Vm::new(c).expect("VM creation");
    let waiting = settle(3);
    assert_eq!(
        waiting.len(),
        3,
        "Vm::new left its vCPU threads to the start"
    );
    drop(vm);
    assert_eq!(
        settle(0),
        Vec::<u32>::new(),
        "a VM dropped before its start left vCPU threads behind"
    );

    // Started: the threads the start hands the vCPUs to are the ones that
    // waited, and the guest runs on them.
    let (c, _console) = config("32M", 2, Backing::Anon, PageSize::Size2M, Workload::Verify);
    let mut vm = Vm::new(c).expect("VM creation");
    let waiting = settle(2);
    assert_eq!(
        waiting.len(),
        2,
        "Vm::new left its vCPU threads to the start"
    );
    vm.start().expect("vCPU start");
    assert_eq!(
        vcpu_threads(),
        waiting,
        "the start ran the vCPUs on threads other than the waiting ones"
    );
    destroy_and_check(vm);
    assert_eq!(
        settle(0),
        Vec::<u32>::new(),
        "vCPU threads outlived their VM"
    );

    // And a whole boot still verifies its RAM on them.
    destroy_and_check(boot_and_verify("32M", 2, Backing::Anon, PageSize::Size2M));
    assert_eq!(
        settle(0),
        Vec::<u32>::new(),
        "vCPU threads outlived their VM"
    );
}
