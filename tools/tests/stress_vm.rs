//! End-to-end checks of `gmm stress-vm` on real KVM: a short run cycles the
//! balloon with no violation, and the detectors fire when a fault is
//! injected on purpose (so a clean run is not vacuous). Without `/dev/kvm`
//! the tests print a loud `SKIPPED` line and pass.

use serde_json::Value;

mod common;
use common::*;

#[test]
fn stress_vm_cycles_without_violations() {
    if !kvm_or_skip("stress_vm_cycles_without_violations") {
        return;
    }
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
    check_clean_run(&["--page-size", "2M"]);
}

fn check_clean_run(extra: &[&str]) {
    let mut args = vec![
        "stress-vm",
        "--seconds",
        "3",
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--json",
    ];
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
    assert!(num(&v, "rss_min_bytes") > 0.0);
    assert!(num(&v, "rss_max_bytes") >= num(&v, "rss_min_bytes"));
    num(&v, "max_lock_hold_us");
    for k in [
        "guest_errors",
        "stale_translations",
        "use_after_free",
        "shadow_mismatches",
        "device_errors",
        "unexpected_faults",
        "final_bad_words",
        "not_released",
        "stalls",
        "violations",
    ] {
        assert_eq!(num(&v, k), 0.0, "{k} in {v}\n{stderr}");
    }
    assert_eq!(v["ok"], Value::Bool(true));
}

/// A device thread that keeps translations across invalidations (a cache
/// never shot down) is caught translating ballooned pages.
#[test]
fn stress_vm_catches_a_stale_translation_cache() {
    if !kvm_or_skip("stress_vm_catches_a_stale_translation_cache") {
        return;
    }
    let out = gmm(&[
        "stress-vm",
        "--seconds",
        "1.5",
        "--mem",
        "32M",
        "--vcpus",
        "2",
        "--inject",
        "stale-cache",
        "--json",
    ]);
    let v = last_json(&out);
    assert!(
        !out.status.success(),
        "an injected stale cache went unnoticed: {v}"
    );
    assert!(num(&v, "stale_released") > 0.0, "{v}");
    assert!(num(&v, "stale_translations") > 0.0, "{v}");
    assert!(num(&v, "injected_hits") > 0.0, "{v}");
    assert_eq!(num(&v, "violations"), num(&v, "stale_translations"), "{v}");
    assert_eq!(v["ok"], Value::Bool(false));
}

/// A guest word overwritten behind the guest's back is caught by the
/// guest's own verification (and the run fails).
#[test]
fn stress_vm_catches_corrupted_guest_memory() {
    if !kvm_or_skip("stress_vm_catches_corrupted_guest_memory") {
        return;
    }
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
    assert!(num(&v, "guest_bad_words") > 0.0, "{v}");
    assert_eq!(num(&v, "use_after_free"), 0.0, "{v}");
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
