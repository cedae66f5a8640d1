//! End-to-end checks of `gmm stress-vm` on real KVM: a short run cycles the
//! balloon with no violation, and the detectors fire when a fault is
//! injected on purpose (so a clean run is not vacuous). With the test-only
//! `mutation` feature (`cargo test -p tools --release --features mutation
//! --test stress_vm`), the run must also fail, with the violation kind
//! each rule's bug produces, when guest-mm's grace period or cache
//! shootdown is broken (`GMM_BREAK_RULE`). Without `/dev/kvm` the tests
//! print a loud `SKIPPED` line on the real stderr (past the harness's
//! output capture) and pass.

use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

mod common;
use common::*;

/// The runs here share the host's cores with each other's vCPUs and
/// device threads; run them one at a time, so that what each must show
/// (cycles, releases met by device threads, detectors firing) is measured
/// as in a run of its own.
fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static VM: Mutex<()> = Mutex::new(());
    VM.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn stress_vm_cycles_without_violations() {
    if !kvm_or_skip("stress_vm_cycles_without_violations") {
        return;
    }
    let _one = one_vm_at_a_time();
    check_clean_run(&["--page-size", "4K"]);
}

/// 2 MiB leaves: the balloon splits them and deflates in pieces that are
/// not 2 MiB aligned, so a demand fault must install only the faulting
/// 4 KiB leaf, never its still-ballooned neighbours (a 2 MiB fill there
/// leaked them: unexpected faults, pages never released again).
#[test]
fn stress_vm_with_2m_leaves_faults_in_only_the_split_leaf() {
    if !kvm_or_skip("stress_vm_with_2m_leaves_faults_in_only_the_split_leaf") {
        return;
    }
    let _one = one_vm_at_a_time();
    check_clean_run(&["--page-size", "2M"]);
}

/// The configuration every real run here uses (a few seconds each).
const RUN: [&str; 7] = [
    "stress-vm",
    "--seconds",
    "3",
    "--mem",
    "64M",
    "--vcpus",
    "2",
];

fn check_clean_run(extra: &[&str]) {
    let mut args = RUN.to_vec();
    args.push("--json");
    args.extend_from_slice(extra);
    let out = gmm(&args);
    let v = last_json(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stress-vm failed: {v}\n{stderr}");
    assert!(num(&v, "cycles") >= 1.0, "{v}");
    assert!(num(&v, "pages_inflated") > 0.0, "{v}");
    assert!(num(&v, "pages_deflated") > 0.0, "{v}");
    assert!(num(&v, "pages_reported") > 0.0, "{v}");
    assert_eq!(num(&v, "pages_inflated"), num(&v, "driver_pages_inflated"));
    assert!(num(&v, "guest_passes") > 0.0, "{v}");
    assert!(num(&v, "walks_ok") > 0.0, "{v}");
    assert!(
        num(&v, "walks_ballooned") > 0.0,
        "walkers met the balloon: {v}"
    );
    assert!(num(&v, "stable_batches") > 0.0, "{v}");
    num(&v, "inflate_batches");
    // Not vacuous: device threads held pages at an inflate's or a report's
    // front, and some of them saw the gather clear those pages while they
    // still held and copied them (the grace period then kept the backing
    // until they let go).
    assert!(num(&v, "front_sections") > 0.0, "{v}");
    assert!(
        num(&v, "front_releases") > 0.0,
        "no read section held a page across its release: {v}"
    );
    assert!(num(&v, "rss_min_bytes") > 0.0);
    assert!(num(&v, "rss_max_bytes") >= num(&v, "rss_min_bytes"));
    // Holds were measured in the holder's CPU time too (the wall clock
    // also counts a descheduled holder's wait; the CPU time never exceeds
    // it by more than the clocks' skew).
    let (wall, cpu) = (num(&v, "max_lock_hold_us"), num(&v, "max_lock_hold_cpu_us"));
    assert!(cpu > 0.0 && cpu <= wall + 5.0, "{v}");
    for k in [
        "guest_errors",
        "stale_translations",
        "stale_released",
        "stale_data",
        "changed_under_reader",
        "use_after_free",
        "shadow_mismatches",
        "device_errors",
        "unexpected_faults",
        "final_bad_words",
        "not_released",
        "stalls",
        "stuck_readers",
        "violations",
    ] {
        assert_eq!(num(&v, k), 0.0, "{k} in {v}\n{stderr}");
    }
    assert_eq!(v["ok"], Value::Bool(true));
}

/// A device thread that keeps translations across invalidations (a cache
/// never shot down) and reads guest memory through them is caught by the
/// stale-data detector: it read pages whose backing was released.
#[test]
fn stress_vm_catches_a_stale_translation_cache() {
    if !kvm_or_skip("stress_vm_catches_a_stale_translation_cache") {
        return;
    }
    let _one = one_vm_at_a_time();
    let mut args = RUN.to_vec();
    args.extend_from_slice(&["--inject", "stale-cache", "--json"]);
    let out = gmm(&args);
    let v = last_json(&out);
    assert!(
        !out.status.success(),
        "an injected stale cache went unnoticed: {v}"
    );
    assert!(num(&v, "injected_hits") > 0.0, "{v}");
    // The fault really read memory the table no longer mapped ...
    assert!(
        num(&v, "injected_stale_reads") > 0.0,
        "the stale cache never sent a read to released backing: {v}"
    );
    // ... and the stale-data detector counted what it read.
    assert!(
        num(&v, "stale_data") > 0.0,
        "reads of released backing were not counted as stale data: {v}"
    );
    assert_eq!(num(&v, "use_after_free"), 0.0, "{v}");
    assert_eq!(v["ok"], Value::Bool(false));
}

/// A guest word overwritten behind the guest's back is caught by the
/// guest's own verification (and the run fails).
#[test]
fn stress_vm_catches_corrupted_guest_memory() {
    if !kvm_or_skip("stress_vm_catches_corrupted_guest_memory") {
        return;
    }
    let _one = one_vm_at_a_time();
    let out = gmm(&[
        "stress-vm",
        "--seconds",
        "1",
        "--mem",
        "32M",
        "--vcpus",
        "2",
        "--inject",
        "corrupt-page",
        "--json",
    ]);
    let v = last_json(&out);
    assert!(
        !out.status.success(),
        "injected corruption went unnoticed: {v}"
    );
    assert!(num(&v, "guest_errors") > 0.0, "{v}");
    assert!(
        num(&v, "guest_bad_words") > 0.0,
        "the guest did not see the word overwritten behind it: {v}"
    );
    assert_eq!(num(&v, "use_after_free"), 0.0, "{v}");
}

/// Runs the test configuration with `rule` broken; returns the JSON after
/// checking that the run failed.
#[cfg(feature = "mutation")]
fn broken_run(rule: &str) -> Value {
    let mut args = RUN.to_vec();
    args.push("--json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gmm"))
        .args(&args)
        .env("GMM_BREAK_RULE", rule)
        .output()
        .expect("the gmm binary runs");
    let v = last_json(&out);
    assert_eq!(v["broken_rule"].as_str(), Some(rule), "{v}");
    assert!(
        !out.status.success(),
        "stress-vm passed with {rule} broken: {v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["ok"], Value::Bool(false));
    v
}

/// Without the grace period a gather releases backing while device threads
/// still copy through translations they took before the clear: a page they
/// held reads the pattern, then zeros (the release, then the userfaultfd
/// handler's zero page) within one read section.
#[cfg(feature = "mutation")]
#[test]
fn stress_vm_catches_a_missing_grace_period() {
    if !kvm_or_skip("stress_vm_catches_a_missing_grace_period") {
        return;
    }
    let _one = one_vm_at_a_time();
    let v = broken_run("grace_period");
    assert!(
        num(&v, "changed_under_reader") > 0.0,
        "no page was seen released under a reader: {v}"
    );
    assert!(
        num(&v, "stale_data") >= num(&v, "changed_under_reader"),
        "{v}"
    );
}

/// Without the cache shootdown a walker answers from its translation cache
/// for pages the balloon took, and reads their released backing: stale
/// translations (ballooned pages translated, or their zeros read).
#[cfg(feature = "mutation")]
#[test]
fn stress_vm_catches_a_missing_cache_shootdown() {
    if !kvm_or_skip("stress_vm_catches_a_missing_cache_shootdown") {
        return;
    }
    let _one = one_vm_at_a_time();
    let v = broken_run("cache_shootdown");
    assert!(
        num(&v, "stale_translations") > 0.0,
        "no stale translation was caught: {v}"
    );
}

#[test]
fn stress_vm_rejects_bad_arguments() {
    for args in [
        &["stress-vm", "--vcpus", "0"][..],
        &["stress-vm", "--max-fraction", "0.99"],
        &["stress-vm", "--page-size", "1G"],
        &["stress-vm", "--mem", "3M"],
    ] {
        let out = gmm(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
}
