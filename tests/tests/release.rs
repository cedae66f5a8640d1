//! Release guest RAM from the host while the guest runs: the guest must then
//! read zeros, the fault handler must have resolved the fault, pages that
//! were not released keep their pattern, and a fault hook that refuses a
//! commit makes the handler retry.
//!
//! No rule of `guest-mm/src/mutation.rs` is aimed at by this file; no
//! assertion here is a wall-clock limit (the timeouts only bound waits for
//! the guest, and a paused guest must not answer within one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_mm::{Gpa, PageState};
use tests::{
    config, destroy_and_check, finish_guest_ok, kvm_or_skip, loud, HugePages, GUEST_TIMEOUT,
};
use vmm::guest::pattern;
use vmm::vstate::vcpu::VcpuOutcome;
use vmm::{Backing, FaultHook, MemoryError, PageSize, Vm, VmConfig, VmError, Workload};

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

fn started_probe_vm(c: VmConfig) -> Vm {
    let mut vm = Vm::new(c).expect("VM creation");
    vm.start().expect("vCPU start");
    assert!(
        vm.wait_results(GUEST_TIMEOUT),
        "no pattern result: {:?}",
        vm.outcomes()
    );
    let (_, results, _) = vm.reports();
    assert!(results.iter().all(|r| r.ok()), "{results:?}");
    vm
}

/// Probes `gpa` and returns (OR of the page's words, first word).
fn probe(vm: &mut Vm, gpa: u64) -> (u64, u64) {
    let p = vm
        .probe(gpa, PROBE_TIMEOUT)
        .expect("control page")
        .unwrap_or_else(|| {
            panic!(
                "guest did not answer probe of {gpa:#x}: {:?}",
                vm.outcomes()
            )
        });
    assert_eq!(p.gpa, gpa & !0xfff);
    (p.or_words, p.first_word)
}

fn release_and_probe(name: &str, backing: Backing, page: PageSize) {
    if !kvm_or_skip(name) {
        return;
    }
    let (c, console) = config("64M", 2, backing, page, Workload::Probe);
    let seed = c.seed;
    let mut vm = started_probe_vm(c);
    let granule = page.bytes();
    // vCPU 0's share starts at 2 MiB; release one leaf in the middle of it.
    let target = 8 << 20;
    let inside = target + ((granule / 2) & !0xfff);
    let other = target + granule + 0x3000;
    assert_eq!(probe(&mut vm, inside).1, pattern(inside, seed));
    assert_eq!(vm.check_pattern(target, target + granule).unwrap(), 0);
    let faults_before = vm.fault_stats().summary().faults;

    vm.release_range(target, granule).expect("release");

    let p = vm
        .probe(inside, PROBE_TIMEOUT)
        .unwrap()
        .expect("probe answered");
    assert_eq!(
        (p.or_words, p.first_word),
        (0, 0),
        "released page must read zeros"
    );
    assert!(
        p.read_ns > 0,
        "the guest times its read with the TSC: {p:?}"
    );
    loud!(
        "{name}: guest read of the released page took {} us",
        p.read_ns / 1000
    );
    let s = vm.fault_stats().summary();
    assert!(
        s.faults > faults_before,
        "the guest's touch of released memory must go through the fault handler: {s:?}"
    );
    assert_eq!((s.releases, s.errors), (1, 0), "{s:?}");
    assert!(s.mean_latency_us > 0.0);
    // The host sees zeros too, over the whole released leaf.
    let words = granule / 8;
    assert_eq!(vm.check_pattern(target, target + granule).unwrap(), words);
    // Memory next to it was not released.
    assert_eq!(probe(&mut vm, other).1, pattern(other & !0xfff, seed));
    assert_eq!(
        vm.check_pattern(other & !0xfff, (other & !0xfff) + 4096)
            .unwrap(),
        0
    );
    // Release again (already registered) and touch again.
    vm.check_pattern(target, target + 8).unwrap();
    vm.release_range(target, granule).expect("second release");
    assert_eq!(probe(&mut vm, target).0, 0);

    finish_guest_ok(&mut vm, &console);
    loud!("{name}: fault stats {:?}", vm.fault_stats().summary());
    destroy_and_check(vm);
}

#[test]
fn release_anon_2m() {
    release_and_probe("release_anon_2m", Backing::Anon, PageSize::Size2M);
}

#[test]
fn release_anon_4k() {
    release_and_probe("release_anon_4k", Backing::Anon, PageSize::Size4K);
}

#[test]
fn release_memfd_2m() {
    release_and_probe("release_memfd_2m", Backing::Memfd, PageSize::Size2M);
}

#[test]
fn release_memfd_4k() {
    release_and_probe("release_memfd_4k", Backing::Memfd, PageSize::Size4K);
}

#[test]
fn release_hugetlb() {
    let name = "release_hugetlb";
    if !kvm_or_skip(name) {
        return;
    }
    let Some(_pages) = HugePages::reserve(name, 32) else {
        return;
    };
    release_and_probe(name, Backing::Hugetlb, PageSize::Size2M);
}

#[test]
fn release_rejects_bad_ranges() {
    if !kvm_or_skip("release_rejects_bad_ranges") {
        return;
    }
    let (c, _) = config("64M", 1, Backing::Anon, PageSize::Size2M, Workload::Verify);
    let vm = Vm::new(c).expect("VM creation");
    let released = vm.stage2().table().stats().released_bytes;
    // Reserved low memory, unaligned start, unaligned length, past the end.
    for (gpa, len) in [
        (0, 2 << 20),
        (3 << 20, 2 << 20),
        (4 << 20, 4096),
        (62 << 20, 4 << 20),
    ] {
        let e = vm.release_range(gpa, len).expect_err("bad range accepted");
        assert!(
            matches!(
                e,
                VmError::Memory(MemoryError::BadRange { gpa: g, len: l, granule: 0x20_0000 })
                    if (g, l) == (gpa, len)
            ),
            "{gpa:#x}+{len:#x}: {e:?}"
        );
        assert!(
            matches!(
                vm.stage2().table().query(Gpa(gpa)),
                PageState::Present { .. }
            ),
            "{gpa:#x}: a refused range is left alone"
        );
    }
    assert_eq!(vm.stage2().table().stats().released_bytes, released);
    destroy_and_check(vm);
}

/// Refuses the first `refuse` commits, records every committed range.
#[derive(Default)]
struct RecordingHook {
    refuse: AtomicU64,
    seq: AtomicU64,
    committed: Mutex<Vec<(u64, u64)>>,
}

impl FaultHook for RecordingHook {
    fn fault_begin(&self, _gpa: u64, _len: u64) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    fn fault_commit(&self, gpa: u64, len: u64, _seq: u64) -> bool {
        if self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1))
            .is_ok()
        {
            return false;
        }
        self.committed.lock().unwrap().push((gpa, len));
        true
    }
}

#[test]
fn fault_hook_sees_faults_and_retries() {
    if !kvm_or_skip("fault_hook_sees_faults_and_retries") {
        return;
    }
    let hook = Arc::new(RecordingHook {
        refuse: AtomicU64::new(2),
        ..Default::default()
    });
    let (mut c, _) = config("64M", 1, Backing::Anon, PageSize::Size4K, Workload::Probe);
    c.fault_hook = hook.clone();
    let mut vm = started_probe_vm(c);
    let target = 16 << 20;
    vm.release_range(target, 4096).unwrap();
    assert_eq!(probe(&mut vm, target), (0, 0));
    let s = vm.fault_stats().summary();
    assert_eq!(s.retries, 2, "two refused commits, two retries: {s:?}");
    assert!(
        hook.seq.load(Ordering::SeqCst) >= 3,
        "begin called per attempt"
    );
    assert!(
        hook.committed.lock().unwrap().contains(&(target, 4096)),
        "hook not told about {target:#x}: {:?}",
        hook.committed.lock().unwrap()
    );
    vm.finish_probes().unwrap();
    assert!(vm.wait(GUEST_TIMEOUT));
    destroy_and_check(vm);
}

#[test]
fn pause_and_resume() {
    if !kvm_or_skip("pause_and_resume") {
        return;
    }
    let (c, _) = config("64M", 2, Backing::Anon, PageSize::Size2M, Workload::Probe);
    let mut vm = started_probe_vm(c);
    // vCPU 1 has finished; vCPU 0 spins in ring 3 polling the control page.
    assert!(
        vm.pause(Duration::from_secs(5)),
        "vCPUs did not leave KVM_RUN"
    );
    let p = vm.probe(4 << 20, Duration::from_millis(300)).unwrap();
    assert!(p.is_none(), "a paused guest answered a probe: {p:?}");
    vm.resume();
    let p = vm.probe(4 << 20, PROBE_TIMEOUT).unwrap();
    assert!(p.is_some(), "resumed guest did not answer");
    vm.finish_probes().unwrap();
    assert!(vm.wait(GUEST_TIMEOUT));
    assert!(vm.guest_ok());
    destroy_and_check(vm);
}

#[test]
fn destroy_stops_a_spinning_guest() {
    if !kvm_or_skip("destroy_stops_a_spinning_guest") {
        return;
    }
    let (c, _) = config("64M", 1, Backing::Anon, PageSize::Size2M, Workload::Probe);
    let vm = started_probe_vm(c);
    let (t, _) = destroy_and_check(vm);
    // Running: `destroy` joins the vCPU itself.
    assert!(!t.handed_over);
    assert_eq!(t.outcomes, vec![VcpuOutcome::Stopped]);
}

#[test]
fn repeated_release_and_refault() {
    if !kvm_or_skip("repeated_release_and_refault") {
        return;
    }
    let (c, _) = config("32M", 1, Backing::Anon, PageSize::Size4K, Workload::Probe);
    let mut vm = started_probe_vm(c);
    let target = 4 << 20;
    for i in 0..50u64 {
        vm.release_range(target, 4096).unwrap();
        assert_eq!(probe(&mut vm, target), (0, 0), "round {i}");
        let s = vm.fault_stats().summary();
        assert_eq!((s.faults, s.errors), (i + 1, 0), "round {i}: {s:?}");
    }
    vm.finish_probes().unwrap();
    assert!(vm.wait(GUEST_TIMEOUT));
    assert!(vm.guest_ok());
    destroy_and_check(vm);
}

/// A paused VM hands its unjoined vCPU threads to the reclaim thread,
/// which releases guest RAM while they leave: the outcomes are still those
/// of the threads (the finished vCPU's own, `Stopped` for the paused one),
/// and all of RAM comes back and is unmapped.
#[test]
fn destroy_of_a_paused_vm() {
    if !kvm_or_skip("destroy_of_a_paused_vm") {
        return;
    }
    let (c, _) = config("64M", 2, Backing::Anon, PageSize::Size4K, Workload::Probe);
    let vm = started_probe_vm(c);
    // vCPU 1 has finished; vCPU 0 spins in ring 3 polling the control page.
    assert!(vm.pause(Duration::from_secs(5)), "vCPUs did not pause");
    vm.memory().populate().unwrap();
    assert_eq!(vm.memory().resident_bytes(), 64 << 20);
    let before: Vec<_> = vm.outcomes();
    let (t, r) = destroy_and_check(vm);
    // Paused: the vCPU threads go to the reclaim thread unjoined.
    assert!(t.handed_over, "destroy joined the vCPUs of a paused VM");
    assert_eq!(t.outcomes[0], VcpuOutcome::Stopped, "{:?}", t.outcomes);
    for (i, o) in before {
        assert_eq!(&t.outcomes[i as usize], &o, "vCPU {i}");
    }
    assert_eq!(r.stage2.released_bytes, 64 << 20, "{r:?}");
    assert!(
        r.memory_back_ms > 0.0 && r.memory_back_ms <= r.reclaim_ms,
        "{r:?}"
    );
}
