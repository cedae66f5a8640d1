//! End-to-end checks of the `gmm` binary: each command runs briefly, its
//! last stdout line parses as JSON with the documented fields, and bad
//! arguments fail with a clear message and a non-zero status.

use serde_json::Value;

mod common;
use common::*;

#[test]
fn stress_json() {
    let out = gmm(&["stress", "--seconds", "1", "--json"]);
    assert!(out.status.success(), "stress failed: {out:?}");
    let v = last_json(&out);
    for k in [
        "walks",
        "unmaps",
        "flushes",
        "fallback_batches",
        "use_after_free",
        "stale_translations",
        "max_lock_hold_us",
    ] {
        num(&v, k);
    }
    assert!(num(&v, "walks") > 0.0);
    assert_eq!(num(&v, "violations"), 0.0);
}

#[test]
fn stress_fault_injection_json() {
    let out = gmm(&[
        "stress",
        "--seconds",
        "0.5",
        "--fail-batch-every",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "stress failed: {out:?}");
    let v = last_json(&out);
    assert_eq!(num(&v, "violations"), 0.0);
}

#[test]
fn bench_unmap_json() {
    let out = gmm(&["bench", "unmap", "--size", "64M", "--reps", "1", "--json"]);
    assert!(out.status.success(), "bench unmap failed: {out:?}");
    let v = last_json(&out);
    for k in [
        "size_bytes",
        "gather_ms",
        "limit_ms",
        "per_page_ms",
        "per_run_ms",
        "ratio_vs_limit",
        "ratio_per_page_vs_gather",
        "max_lock_hold_us",
        "release_calls",
        "table_bytes",
        "table_overhead_pct",
    ] {
        num(&v, k);
    }
    assert_eq!(num(&v, "size_bytes"), (64u64 << 20) as f64);
    assert!(num(&v, "gather_ms") > 0.0);
    assert!(num(&v, "limit_ms") > 0.0);
    assert!(num(&v, "release_calls") >= 1.0);
    assert_eq!(v["released_ok"], Value::Bool(true));
    // Lock-hold p99.9 beside the maximum, and the environment's own
    // hold-length sections measured in the same run.
    let p999 = num(&v, "lock_hold_p999_us_upper");
    assert!(
        p999 > 0.0 && p999 <= num(&v, "max_lock_hold_us"),
        "p99.9 {p999}: {v}"
    );
    let (work, env_p999, env_max) = (
        num(&v, "env_hold_work_us"),
        num(&v, "env_hold_p999_us_upper"),
        num(&v, "env_hold_max_us"),
    );
    assert!(work >= 1.0, "sections of at least 1 µs: {v}");
    assert!(
        env_max >= work && env_p999 > 0.0 && env_p999 <= env_max,
        "{v}"
    );
    // At least 100 ms of sections of `work` µs each (a section never
    // takes less than the fastest one).
    let n = num(&v, "env_holds");
    assert!(n >= 1.0 && n * work <= 100_000.0 * 50.0, "{v}");
    // The host's free page reporting: one window per gather repetition.
    assert_host_reported(&v, &v, 1);
}

#[test]
fn bench_unmap_sizes_json() {
    let out = gmm(&[
        "bench", "unmap", "--sizes", "8M,16M", "--reps", "1", "--json",
    ]);
    assert!(out.status.success(), "bench unmap --sizes failed: {out:?}");
    let v = last_json(&out);
    let by_size = v["max_lock_hold_us_by_size"]
        .as_array()
        .expect("max_lock_hold_us_by_size is a list");
    assert_eq!(by_size.len(), 2);
    assert_eq!(v["runs"].as_array().map(Vec::len), Some(2));
    assert!(v["lock_hold_not_larger_at_largest"].is_boolean());
}

#[test]
fn bench_walk_json() {
    let out = gmm(&[
        "bench",
        "walk",
        "--seconds",
        "0.1",
        "--rounds",
        "2",
        "--mem",
        "64M",
        "--json",
    ]);
    assert!(out.status.success(), "bench walk failed: {out:?}");
    let v = last_json(&out);
    for k in [
        "walk_per_s",
        "walk_under_unmap_per_s",
        "rwlock_per_s",
        "rwlock_under_unmap_per_s",
        "vm_memory_per_s",
        "vm_memory_4_regions_per_s",
        "walk_sequential_per_s",
        "page_map_unlocked_per_s",
        "page_map_under_unmap_per_s",
        "page_map_storm_ops_per_s",
        "page_map_under_unmap_ratio",
        "under_unmap_vs_page_map_bound",
        "walk_vs_vm_memory",
        "walk_vs_rwlock",
        "under_unmap_ratio",
        "under_unmap_vs_rwlock_under_unmap",
        "guest_memory_view_per_s",
        "vm_memory_slices_per_s",
        "guest_memory_view_vs_vm_memory_slices",
        "guest_memory_view_vs_rwlock",
        "vm_memory_slices_vs_vm_memory",
        "threads",
    ] {
        assert!(num(&v, k) > 0.0, "{k} should be positive in {v}");
        let s = &v["spread"][k];
        if k != "threads" && k != "page_map_storm_ops_per_s" {
            assert!(
                num(s, "min") <= num(s, "median") && num(s, "median") <= num(s, "max"),
                "spread of {k}: {s}"
            );
        }
    }
    assert_eq!(num(&v, "rounds"), 2.0);
    assert_eq!(num(&v, "use_after_free"), 0.0);
}

#[test]
fn bad_arguments_fail() {
    // Each bad value is refused with the message that names what is wrong
    // (not merely "some error").
    for (args, needle) in [
        (
            &["bench", "unmap", "--size", "0"][..],
            "the size must be greater than zero",
        ),
        (
            &["bench", "unmap", "--size", "lots"],
            "expected a positive number with an optional K/M/G/T suffix",
        ),
        (
            &["bench", "unmap", "--page-size", "3K"],
            "expected 4K or 2M",
        ),
        (
            &["stress", "--seconds=-1"],
            "must be more than 0 and at most 86400 seconds",
        ),
        (
            &["stress", "--seconds", "0"],
            "must be more than 0 and at most 86400 seconds",
        ),
        (
            &["bench", "walk", "--mem", "3M"],
            "--mem 3 MiB is not a multiple of 2 MiB",
        ),
        (
            &["bench", "unmap", "--sizes", "1G,0"],
            "invalid size \"0\": the size must be greater than zero",
        ),
        (
            &["bench", "walk", "--storm-rate", "0"],
            "expected operations per second above 0",
        ),
        (
            &["bench", "unmap", "--size", "3M", "--page-size", "2M"],
            "size 3 MiB is not a multiple of the 2M page size",
        ),
    ] {
        let out = gmm(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in: {err}"
        );
    }
}

#[test]
fn bench_balloon_json() {
    if !kvm_or_skip("bench_balloon_json") {
        return;
    }
    // The guest driver's notify timing (a second VM, ~20 s here) once:
    // it does not depend on the host-side pattern.
    for (pattern, guest) in [
        ("contiguous", true),
        ("scattered", false),
        ("fragmented", false),
    ] {
        let mut args = vec![
            "bench",
            "balloon",
            "--size",
            "32M",
            "--pattern",
            pattern,
            "--reps",
            "1",
            "--json",
        ];
        if !guest {
            args.push("--no-guest-notify");
        }
        let out = gmm(&args);
        assert!(
            out.status.success(),
            "bench balloon {pattern} failed: {out:?}"
        );
        let v = last_json(&out);
        assert_eq!(v["pattern"], pattern, "{v}");
        assert_eq!(num(&v, "pages"), 8192.0, "{v}");
        for k in [
            "inflate_ms",
            "madvise_ms",
            "per_page_ms",
            "madvise_plain_ms",
            "per_page_plain_ms",
            "ratio_vs_madvise",
            "ratio_vs_per_page",
            "deflate_ms",
            "rss_drop_bytes",
        ] {
            num(&v, k);
        }
        assert!(num(&v, "inflate_ms") > 0.0, "{v}");
        assert!(v["target_met"].is_boolean(), "{v}");
        // One release call per coalesced run at most (fewer when batched).
        let (calls, runs) = (num(&v, "release_syscalls"), num(&v, "runs"));
        assert!(calls >= 1.0 && calls <= runs, "{v}");
        assert_eq!(v["released_ok"], true, "{v}");
        assert_eq!(num(&v, "resident_after_inflate"), 0.0, "{v}");
        if guest {
            // 16 inflate requests of 64 MiB, each notify timed; the
            // deflate's as many.
            assert!(num(&v, "vcpu_notify_count") >= 16.0, "{v}");
            assert_eq!(
                num(&v, "vcpu_notify_bytes"),
                1024.0 * 1024.0 * 1024.0,
                "{v}"
            );
            assert!(num(&v, "vcpu_notify_count_idle") >= 16.0, "{v}");
            let (p50, p99) = (num(&v, "vcpu_notify_p50_us"), num(&v, "vcpu_notify_p99_us"));
            assert!(
                p50 > 0.0 && p50 <= p99 && p99 <= num(&v, "vcpu_notify_max_us"),
                "{v}"
            );
            assert!(num(&v, "tsc_khz") > 0.0, "{v}");
            assert!(v["vcpu_notify_path"].is_string(), "{v}");
        } else {
            assert!(v.get("vcpu_notify_p99_us").is_none(), "{v}");
            assert!(v.get("tsc_khz").is_none(), "{v}");
        }
    }
}

/// A bench killed outright (SIGKILL: no `Drop` runs) leaves no VM behind:
/// its `vmm` children die with it (`PR_SET_PDEATHSIG`). Without that, a
/// `vmm --api-sock` started by `gmm bench service` keeps running forever.
#[test]
fn a_killed_bench_leaves_no_vm_running() {
    use std::time::Duration;
    if !kvm_or_skip("a_killed_bench_leaves_no_vm_running") {
        return;
    }
    let mut bench = std::process::Command::new(env!("CARGO_BIN_EXE_gmm"))
        .args([
            "bench",
            "service",
            "--vms",
            "1",
            "--mem",
            "64M",
            "--seconds",
            "60",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("gmm runs");
    match vmm::child::kill_and_check_orphan(
        &mut bench,
        "vmm",
        Duration::from_secs(60),
        Duration::from_secs(10),
    ) {
        vmm::child::Orphan::Ended => {}
        other => panic!("the killed gmm bench service's vmm: {other:?}"),
    }
}
