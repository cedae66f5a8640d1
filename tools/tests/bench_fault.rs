//! End-to-end checks of `gmm bench fault` and `gmm bench interference`: a
//! short real run of each, its JSON fields, and bad arguments. No figure is
//! asserted against a target (those are benchmark results), only that the
//! faults really happened and the fields are consistent.

use std::path::PathBuf;

mod common;
use common::*;

#[test]
fn bench_fault_json() {
    if !kvm_or_skip("bench_fault_json") {
        return;
    }
    for refill in ["touch", "table", "plain"] {
        let v = short_fault_run(&["--rounds", "2", "--storm-refill", refill]);
        assert_eq!(v["tool"], "bench-fault");
        assert_eq!(v["storm_refill"], refill);
        for k in [
            "p50_us_quiet",
            "p99_us_quiet",
            "max_us_quiet",
            "p50_us_storm",
            "p99_us_storm",
            "max_us_storm",
            "p99_ratio",
            "storm_releases_per_sec",
            "env_spin_max_gap_us",
            "lock_hold_max_us_storm",
            "handler_mean_us_storm",
        ] {
            assert!(num(&v, k) >= 0.0, "{k}: {v}");
        }
        // Every timed read was a fault the handler resolved.
        assert_eq!(num(&v, "samples_quiet"), 400.0, "{v}");
        assert_eq!(num(&v, "samples_storm"), 400.0, "{v}");
        assert!(num(&v, "handler_faults") >= 800.0, "{v}");
        assert_eq!(num(&v, "handler_errors"), 0.0, "{v}");
        assert!(num(&v, "storm_releases_per_sec") > 0.0, "{v}");
        assert!(num(&v, "p50_us_quiet") <= num(&v, "p99_us_quiet"), "{v}");
        assert!(num(&v, "p99_us_storm") <= num(&v, "max_us_storm"), "{v}");
        assert!(
            matches!(v["verdict"].as_str(), Some("met" | "missed")),
            "{v}"
        );
        // The baseline phase (a plain storm beside the victim) runs in
        // every round, unless the storm is plain itself.
        if refill == "plain" {
            assert!(v["p99_us_plain_storm"].is_null(), "{v}");
        } else {
            assert!(num(&v, "p99_us_plain_storm") > 0.0, "{v}");
            let r = num(&v, "p99_ratio_plain_storm");
            let want = num(&v, "p99_us_plain_storm") / num(&v, "p99_us_quiet");
            assert!((r - want).abs() < 0.01, "{v}");
            assert!(num(&v, "handler_faults") >= 1200.0, "{v}");
        }
    }
    let v = short_fault_run(&["--rounds", "1", "--no-baseline"]);
    assert!(v["p99_us_plain_storm"].is_null(), "{v}");
    assert!(v["p99_ratio_plain_storm"].is_null(), "{v}");
}

/// `gmm bench fault` on 64 MiB, 200 faults a phase, with `extra`: its JSON.
fn short_fault_run(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench", "fault", "--mem", "64M", "--faults", "200", "--json",
    ];
    args.extend_from_slice(extra);
    let out = gmm(&args);
    assert!(
        out.status.success(),
        "bench fault {extra:?} failed: {out:?}"
    );
    last_json(&out)
}

fn vmm_next_to_gmm() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_gmm")).with_file_name("vmm");
    p.is_file().then_some(p)
}

#[test]
fn bench_interference_json() {
    if !kvm_or_skip("bench_interference_json") {
        return;
    }
    if vmm_next_to_gmm().is_none() {
        loud(
            "SKIPPED: bench_interference_json: no vmm binary next to gmm \
             (cargo build --release -p vmm): VM A is a vmm process",
        );
        return;
    }
    let out = gmm(&[
        "bench",
        "interference",
        "--rounds",
        "1",
        "--a-mem",
        "128M",
        "--a-balloon",
        "32M",
        "--b-mem",
        "32M",
        "--quiet-ms",
        "100",
        "--json",
    ]);
    assert!(out.status.success(), "bench interference failed: {out:?}");
    let v = last_json(&out);
    assert_eq!(v["tool"], "bench-interference");
    for k in [
        "victim_fault_p99_increase",
        "victim_loop_rate_drop",
        "victim_walk_p99_increase",
    ] {
        num(&v, k);
    }
    assert_eq!(num(&v, "victim_handler_errors"), 0.0, "{v}");
    let sc = v["scenarios"].as_array().expect("scenarios is an array");
    let names: Vec<&str> = sc.iter().filter_map(|s| s["scenario"].as_str()).collect();
    assert_eq!(
        names,
        [
            "teardown",
            "balloon",
            "munmap",
            "idle-release",
            "balloon-release"
        ],
        "{v}"
    );
    // The kernel baselines are shown, not judged: the top-level figures
    // are the worse of the two VM scenarios.
    let worst = sc[..2]
        .iter()
        .map(|s| num(s, "victim_fault_p99_increase"))
        .fold(f64::MIN, f64::max);
    assert_eq!(num(&v, "victim_fault_p99_increase"), worst, "{v}");
    assert_eq!(sc[2]["verdict"], "baseline", "{v}");
    assert_eq!(sc[3]["verdict"], "baseline", "{v}");
    assert_eq!(sc[4]["verdict"], "baseline", "{v}");
    // The releases really gave the memory back (the neighbour checks its
    // RSS and fails otherwise), with the teardown's threads and with the
    // balloon device's thread.
    assert!(
        sc[3]["event"]
            .as_str()
            .is_some_and(|e| e.contains("SCHED_IDLE thread(s)")),
        "{v}"
    );
    assert!(
        sc[4]["event"]
            .as_str()
            .is_some_and(|e| e.contains("32 MiB back with one thread at nice 19")),
        "{v}"
    );
    // Only the balloon's window waits on VM A's API (at least the request
    // that saw the inflate done).
    let polls: Vec<f64> = sc
        .iter()
        .map(|s| num(&s["a_api_polls"], "median"))
        .collect();
    assert!(
        polls[1] >= 1.0 && [0, 2, 3, 4].iter().all(|&i| polls[i] == 0.0),
        "{v}"
    );
    // The run-queue wait diagnostic is measured wherever the kernel keeps
    // scheduler statistics per thread (every window has wake-ups).
    if std::path::Path::new("/proc/self/schedstat").exists() {
        for s in sc {
            assert!(num(&s["runq_wait_us_quiet"], "median") > 0.0, "{s}");
            assert!(num(&s["runq_wait_us_event"], "median") > 0.0, "{s}");
            num(s, "victim_runq_wait_increase");
        }
    } else {
        loud("bench_interference_json: no /proc/self/schedstat: run-queue wait not checked");
    }
    for s in sc {
        assert!(num(s, "fault_samples_quiet") > 0.0, "{s}");
        assert!(num(s, "walk_samples_quiet") > 0.0, "{s}");
        assert!(
            s["loop_mib_per_sec_quiet"]["median"]
                .as_f64()
                .unwrap_or(0.0)
                > 0.0,
            "the guest's loop did not advance: {s}"
        );
        assert!(num(s, "victim_fault_p99_increase") >= -1.0, "{s}");
        // Each figure is the median of its per-round changes, shown with
        // their range (one round here: all three are that round's).
        for k in [
            "victim_fault_p99_increase",
            "victim_walk_p99_increase",
            "victim_loop_rate_drop",
        ] {
            let r = &s[format!("{k}_rounds")];
            let (lo, med, hi) = (num(r, "min"), num(r, "median"), num(r, "max"));
            assert!(lo <= med && med <= hi, "{k}: {s}");
            assert_eq!(med, num(s, k), "{k}: {s}");
        }
        assert!(
            matches!(s["verdict"].as_str(), Some("met" | "missed" | "baseline")),
            "{s}"
        );
    }
}

#[test]
fn bad_arguments_fail() {
    for (args, needle) in [
        (
            &["bench", "fault", "--storm-chunk", "1000"][..],
            "--storm-chunk must be a positive multiple of 4 KiB",
        ),
        (
            &["bench", "fault", "--mem", "16M", "--faults", "4000"],
            "is too small",
        ),
        (
            &[
                "bench",
                "interference",
                "--a-mem",
                "1G",
                "--a-balloon",
                "2G",
            ],
            "--a-balloon must be at least 1 MiB and below --a-mem",
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
