//! The default guest's [`Workload::BalloonStress`] on a real VM: vCPU 0's
//! balloon driver follows the target while every vCPU keeps rewriting and
//! verifying its pattern (vCPU 0 below its balloon between polls), counting
//! passes in its control-page block, until `CMD_EXIT`.
//!
//! The guest's progress is awaited by polling its pass counters with a
//! deadline (`GUEST_TIMEOUT`), never by sleeping a fixed time.
//!
//! The positive side of the balloon rules of `guest-mm/src/mutation.rs`
//! under load (the guest's requests are served while it runs).

use std::time::{Duration, Instant};

use tests::{
    config, console_text, destroy_and_check, kvm_or_skip, loud, start_balloon_driver, GUEST_TIMEOUT,
};
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::vstate::vcpu::VcpuOutcome;
use vmm::{Backing, PageSize, Vm, Workload};

/// Waits until every vCPU's pass count exceeds `min[i]`.
fn wait_passes(vm: &Vm, min: &[u64]) -> Vec<u64> {
    let t0 = Instant::now();
    loop {
        let p: Vec<u64> = vm
            .stress_status()
            .expect("stress blocks")
            .iter()
            .map(|b| b.passes)
            .collect();
        if p.iter().zip(min).all(|(a, b)| a > b) || t0.elapsed() > GUEST_TIMEOUT {
            return p;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn balloon_stress(name: &str, vcpus: u32) {
    if !kvm_or_skip(name) {
        return;
    }
    let (mut c, console) = config(
        "32M",
        vcpus,
        Backing::Anon,
        PageSize::Size4K,
        Workload::BalloonStress,
    );
    c.balloon = Some(BalloonConfig::default());
    let (mut vm, _) = start_balloon_driver(c, &console);
    let n = vcpus as usize;
    let p0 = wait_passes(&vm, &vec![0; n]);
    assert!(p0.iter().all(|&p| p > 0), "every vCPU loops: {p0:?}");

    let dev = vm.balloon().expect("balloon").clone();
    let pages = 1024;
    vm.set_balloon_target(pages).expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == u64::from(pages))
        .expect("status");
    assert!(ok, "{st:?}");
    // The loops go on while part of vCPU 0's share is in the balloon.
    let p1 = wait_passes(&vm, &p0);
    assert!(p1.iter().zip(&p0).all(|(a, b)| a > b), "{p0:?} -> {p1:?}");
    vm.set_balloon_target(0).expect("balloon target");
    let (st, ok) = vm
        .wait_balloon_driver(GUEST_TIMEOUT, |s| s.pages == 0)
        .expect("status");
    assert!(ok, "{st:?}");
    assert_eq!(st.reverified, u64::from(pages));
    assert_eq!(st.bad_words, 0);
    // And they go on once the balloon is empty again.
    let p2 = wait_passes(&vm, &p1);
    assert!(p2.iter().zip(&p1).all(|(a, b)| a > b), "{p1:?} -> {p2:?}");

    vm.finish_probes().expect("post CMD_EXIT");
    assert!(vm.wait(GUEST_TIMEOUT), "{:?}", vm.outcomes());
    let text = console_text(&console);
    assert!(vm.guest_ok(), "{:?}\n{text}", vm.outcomes());
    assert!(vm.outcomes().iter().all(|(_, o)| *o == VcpuOutcome::Done));
    let blocks = vm.stress_status().expect("stress blocks");
    for b in &blocks {
        assert_eq!(b.bad_words, 0, "{b:?}");
        assert_eq!(b.first_bad, None, "{b:?}");
    }
    // One result per vCPU: no pass found a bad word.
    assert_eq!(vm.reports().1.len(), n);
    let mem = vm.config().mem.bytes();
    assert_eq!(
        vm.check_pattern(vmm::guest::layout::WORKLOAD_START, mem)
            .expect("host read"),
        0
    );
    assert_eq!(vm.stage2().unexpected_faults(), 0);
    loud!("{name}: passes {p0:?} -> {p1:?} -> {p2:?}, final {blocks:?}");
    drop(dev);
    destroy_and_check(vm);
}

#[test]
fn balloon_stress_one_vcpu() {
    balloon_stress("balloon_stress_one_vcpu", 1);
}

#[test]
fn balloon_stress_three_vcpus() {
    balloon_stress("balloon_stress_three_vcpus", 3);
}
