//! `gmm bench report`: the markdown, the verdicts and the plots it builds
//! from saved JSON (`--from DIR`), its errors, and a `--quick` smoke run.
//!
//! The JSON files written here are FIXTURES: small, hand-made, with the
//! field names and shapes the benches print (`--json`), and numbers chosen
//! to exercise the met/missed boundaries. They are not measurements and
//! never end up in BENCHMARKS.md.

// The fixtures are large `json!` literals.
#![recursion_limit = "256"]

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Value};

mod common;
use common::{gmm, kvm_or_skip, loud};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A fresh, empty directory for one test, removed when the test ends
/// (passed or not).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("gmm-bench-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating a scratch directory");
    Scratch(d)
}

fn write(dir: &Path, name: &str, v: &Value) {
    std::fs::write(
        dir.join(name),
        serde_json::to_string_pretty(v).expect("JSON"),
    )
    .expect("write");
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The markdown table row whose first cells are `cells`.
fn row<'a>(md: &'a str, cells: &[&str]) -> &'a str {
    let prefix = format!("| {} |", cells.join(" | "));
    md.lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no row starting with {prefix:?} in:\n{md}"))
}

/// `r` (a table row) says `what` and ends with a missed verdict.
fn assert_missed(r: &str, what: &str) {
    assert!(r.contains(what) && r.ends_with("| **missed** |"), "{r}");
}

// ---------------------------------------------------------------------
// FIXTURES (hand-made, schema-faithful; not measurements)

/// FIXTURE: one size of `gmm bench unmap --sizes ... --json` (`runs[]`).
fn unmap_run(
    size: u64,
    gather: f64,
    limit: f64,
    per_page: f64,
    max_hold: f64,
    cpu_hold: f64,
    env_stall: f64,
) -> Value {
    json!({
        "tool": "bench-unmap", "size_bytes": size, "page_size": "4K", "reps": 3,
        "membarrier": false,
        "gather_ms": gather, "limit_ms": limit, "per_page_ms": per_page, "per_run_ms": limit * 1.05,
        "per_run_sort_ms": 0.5, "per_run_runs": 1,
        "ratio_vs_limit": gather / limit, "ratio_per_page_vs_gather": per_page / gather,
        "ratio_per_run_vs_gather": limit * 1.05 / gather,
        "max_lock_hold_us": max_hold, "median_rep_max_lock_hold_us": max_hold * 0.8,
        "max_lock_hold_cpu_us": cpu_hold, "env_max_stall_us": env_stall,
        "env_stalls_over_50us": if env_stall > 50.0 { 2 } else { 0 },
        "lock_hold_p99_us_upper": 32.768, "lock_hold_p999_us_upper": 131.072,
        "env_hold_p999_us_upper": if env_stall > 50.0 { 65.536 } else { 16.384 },
        "env_hold_max_us": env_stall + 5.0, "env_hold_work_us": 12.0, "env_holds": 40000,
        "lock_hold_hist_us": [[4.096, 3], [16.384, 90], [32.768, 6], [131.072, 1]],
        "lock_acquisitions": 100, "per_page_lock_hold_ms": per_page,
        "release_calls": 1, "flushes": 1, "forced_flushes": 0, "fallback_batches": 0,
        "batch_allocs": 4, "tables_retired": 514, "table_bytes": size / 500,
        "table_overhead_pct": 0.1965, "map_ms": 3.0, "touch_ms": 400.0,
        "anon_huge_bytes_after_touch": null,
        "rss_after_gather": 0, "rss_after_limit": 0, "rss_after_per_page": 0, "rss_after_per_run": 0,
        "released_ok": true,
        "gather_ms_all": [gather], "limit_ms_all": [limit], "per_page_ms_all": [per_page],
        "per_run_ms_all": [limit], "max_lock_hold_us_all": [max_hold],
        "preempted_during_unmap_all": [0],
        "targets": {"gather_within_1_10x_limit": true, "at_least_10x_per_page": true,
                    "lock_hold_le_100us": true, "lock_hold_cpu_le_100us": true,
                    "table_overhead_le_0_2pct": true}
    })
}

/// FIXTURE: `gmm bench unmap --sizes 256M,1G --json`. At 1 GiB the gather
/// takes 1.2× the limit (missed) and one hold reaches 120 µs of wall time
/// (missed) but only 30 µs on CPU, while a lock-free busy loop stalled for
/// up to 255 µs in the same run.
fn unmap_fixture() -> Value {
    json!({
        "tool": "bench-unmap", "page_size": "4K", "sizes": [256 * MIB, GIB],
        "max_lock_hold_us_by_size": [[256 * MIB, 40.0], [GIB, 120.0]],
        "median_rep_max_lock_hold_us_by_size": [[256 * MIB, 30.0], [GIB, 35.0]],
        "lock_hold_p99_us_upper_by_size": [[256 * MIB, 32.768], [GIB, 32.768]],
        "lock_hold_not_larger_at_largest": false, "median_rep_max_not_larger_at_largest": false,
        "runs": [
            unmap_run(256 * MIB, 21.0, 20.0, 250.0, 40.0, 41.5, 12.0),
            unmap_run(GIB, 96.0, 80.0, 1200.0, 120.0, 30.0, 255.0),
        ]
    })
}

/// FIXTURE: `gmm bench walk --json`.
fn walk_fixture() -> Value {
    json!({
        "tool": "bench-walk", "threads": 1, "cores": 2, "membarrier": false,
        "storm_oversubscribed": false, "seconds_per_phase": 1.0, "mem_bytes": GIB, "batch": 64,
        "walk_per_s": 110e6, "walk_uncached_per_s": 130e6, "walk_hot_per_s": 380e6,
        "walk_pin_each_per_s": 100e6, "walk_under_unmap_per_s": 77e6,
        "walk_busy_neighbour_per_s": 98e6, "walk_under_unmap_unmapped_pct": 0.1,
        "storm_rate_requested": null, "storm_ops_per_s": 110000.0, "storm_shootdowns": 30000,
        "under_unmap_ratio": 0.7, "under_unmap_vs_busy_ratio": 0.786,
        "rwlock_per_s": 155e6, "rwlock_under_unmap_per_s": 127e6, "rwlock_storm_ops_per_s": 110000.0,
        "rwlock_under_unmap_ratio": 0.82, "vm_memory_per_s": 223e6, "vm_memory_regions": 4,
        "walk_vs_rwlock": 1.25, "walk_vs_vm_memory": 0.49, "use_after_free": 0,
        "guest_memory_view_per_s": 95e6, "guest_memory_view_op": "get_slices (fixture)",
        "guest_memory_view_vs_walk": 0.86, "guest_memory_view_vs_vm_memory": 0.43,
        "targets": {"walk_ge_50m_per_s": true, "under_unmap_ge_0_8x": false}
    })
}

/// FIXTURE: `gmm bench balloon --pattern P --json`.
fn balloon_fixture(pattern: &str, inflate: f64, madvise: f64, per_page: f64) -> Value {
    let (runs, syscalls) = match pattern {
        "contiguous" => (1, 1),
        "scattered" => (65536, 512),
        _ => (3840, 30),
    };
    json!({
        "tool": "bench-balloon", "pattern": pattern, "size_bytes": 512 * MIB, "pages": 131072,
        "runs": runs, "page_size": "4K",
        "vm_mem_bytes": GIB, "per_chain": 256, "notifies": 2, "release_syscalls": syscalls,
        "reps": 3, "membarrier": false, "inflate_ms": inflate, "device_release_ms": inflate * 0.98,
        "deflate_ms": inflate / 10.0, "madvise_ms": madvise, "per_page_ms": per_page,
        "madvise_plain_ms": madvise * 0.9, "per_page_plain_ms": per_page * 0.9,
        "ratio_vs_madvise": madvise / inflate, "ratio_vs_per_page": per_page / inflate,
        "ratio_vs_madvise_plain": madvise * 0.9 / inflate,
        "ratio_vs_per_page_plain": per_page * 0.9 / inflate,
        "target": "fixture", "target_met": true, "rss_drop_bytes": 512 * MIB,
        "resident_after_inflate": 0, "resident_after_madvise": 0, "resident_after_per_page": 0,
        "device_errors": 0, "released_ok": true,
        "inflate_ms_all": [inflate], "madvise_ms_all": [madvise], "per_page_ms_all": [per_page],
        "vcpu_notify_p99_us": 40.0, "vcpu_notify_p50_us": 20.0, "vcpu_notify_max_us": 90.0,
        "vcpu_notify_count": 64, "vcpu_notify_bytes": 16 * MIB,
        "vcpu_notify_p99_us_idle": 8.0, "vcpu_notify_p50_us_idle": 5.0,
        "vcpu_notify_max_us_idle": 12.0, "vcpu_notify_count_idle": 64, "tsc_khz": 2_000_000,
        "vcpu_notify_path": "DeviceThread"
    })
}

/// FIXTURE: one size of `gmm bench teardown --json` (`sizes[]`).
fn teardown_size(size: u64, destroy: f64, reclaim: f64, munmap: f64, qemu: Option<f64>) -> Value {
    json!({
        "size_bytes": size, "destroy_ms": destroy, "reclaim_ms": reclaim,
        "reclaim_done_ms": reclaim + 2.0, "rss_at_memory_back_bytes": 6 * MIB,
        "destroy_stop_vcpus_ms": 0.1, "reclaim_internal_ms": reclaim + 1.9,
        "reclaim_vm_drop_ms": 1.0, "reclaim_stage2_gather_ms": reclaim * 0.5,
        "reclaim_stage2_barrier_ms": 0.01, "reclaim_unmap_ms": 0.01,
        "reclaim_other_ms": reclaim * 0.5, "populate_ms": 300.0,
        "munmap_ms": munmap, "naive_ms": munmap * 5.0, "ratio_vs_munmap": reclaim / munmap,
        "ratio_naive_vs_reclaim": munmap * 5.0 / reclaim,
        "qemu_ms": qemu, "qemu_rss_bytes": qemu.map(|_| size),
        "process_exit_ms": reclaim + 5.0, "process_ack_ms": 0.2,
        "process_destroy_ms": destroy, "process_reclaim_ms": reclaim, "process_rss_bytes": size,
        "rss_before_bytes": 5 * MIB, "rss_populated_bytes": size + 5 * MIB,
        "rss_after_bytes": 5 * MIB, "guest_resident_bytes": size,
        "vm_thp_bytes": size, "munmap_thp_bytes": size, "naive_thp_bytes": size,
        "rss_returned_bytes": size, "rss_back": true, "shmem_freed_bytes": null,
        "reclaim_within_1_10x_munmap": reclaim / munmap <= 1.1, "destroy_within_5ms": destroy <= 5.0,
        "faster_than_qemu": qemu.map(|q| reclaim + 5.0 < q),
        "destroy_ms_all": [destroy], "reclaim_ms_all": [reclaim],
        "reclaim_done_ms_all": [reclaim + 2.0], "reclaim_internal_ms_all": [reclaim + 1.9],
        "reclaim_stage2_gather_ms_all": [reclaim * 0.5], "munmap_ms_all": [munmap],
        "naive_ms_all": [munmap * 5.0], "qemu_ms_all": [], "process_exit_ms_all": [reclaim + 5.0]
    })
}

/// FIXTURE: `gmm bench teardown --sizes 1G,2G,4G --json`. At 4 GiB the
/// reclaim takes 1.2× the munmap (missed) and the destroy call 6 ms
/// (missed); QEMU is measured at 1 GiB (the vmm process exits sooner) and
/// 2 GiB (it does not). At 4 GiB the RSS at memory back is 40 MiB, not
/// back near its starting 5 MiB (`rss_back: false`).
fn teardown_fixture() -> Value {
    let mut big = teardown_size(4 * GIB, 6.0, 420.0, 350.0, None);
    big["rss_at_memory_back_bytes"] = json!(40 * MIB);
    big["rss_back"] = json!(false);
    json!({
        "tool": "bench-teardown", "backing": "anon", "page_size": "2M", "populate": "host",
        "reps": 3, "membarrier": false, "cores": 2, "mem_total_bytes": 24 * GIB,
        "kernel": "fixture", "kvm_modules": ["kvm"],
        "qemu": {"path": "/usr/bin/qemu-system-x86_64", "version": "QEMU emulator version 7.2 (fixture)",
                 "accel": "kvm", "backend": "memory-backend-ram"},
        "qemu_skipped": null, "process_measured": true,
        "munmap_baseline": "an equally populated private anonymous mapping (fixture)",
        "sizes": [
            teardown_size(GIB, 0.8, 90.0, 85.0, Some(200.0)),
            teardown_size(2 * GIB, 0.9, 180.0, 170.0, Some(150.0)),
            big,
        ]
    })
}

/// FIXTURE: `gmm bench launch --json`: 25/s wall, 30 per CPU-second.
fn launch_fixture() -> Value {
    let d = |p50: f64| json!({"p50": p50, "p90": p50 * 1.5, "max": p50 * 2.0});
    json!({
        "tool": "bench-launch", "count": 20, "mem_bytes": 128 * MIB, "vcpus": 1, "cores": 2,
        "kvm_modules": ["kvm"], "launches_per_sec": 25.0, "launches_per_cpu_sec": 30.0,
        "cpu_ms_per_launch": 33.3, "wall_s": 0.8, "boot_ms_is": "fixture",
        "boot_ms": d(1.8), "ready_ms": d(40.0), "teardown_ms": d(0.2), "reclaim_ms": d(4.0),
        "alive_vms": 4, "rss_base_bytes": 5 * MIB, "rss_alive_bytes": 520 * MIB,
        "guest_resident_bytes": 512 * MIB, "stage2_table_bytes": 48 * 1024,
        "rss_overhead_per_vm_bytes": 12288, "rss_after_bytes": 5 * MIB, "meets_20_per_sec": true,
        "boot_ms_all": [1.8], "ready_ms_all": [40.0]
    })
}

/// FIXTURE: `gmm stress-vm --json` with `errors` guest errors, `stale`
/// stale translations and `uaf` use-after-free (the other counters 0).
fn stress_vm_fixture(errors: u64, stale: u64, uaf: u64) -> Value {
    let violations = errors + stale + uaf;
    json!({
        "tool": "stress-vm", "seconds": 20.0, "elapsed_s": 20.4, "mem_bytes": 256 * MIB,
        "vcpus": 2, "device_threads": 2, "backing": "anon", "page_size": "4K",
        "membarrier": false, "inject": null, "broken_rule": null, "cycles": 41, "pages_inflated": 160000,
        "pages_deflated": 160000, "pages_reported": 52000, "driver_pages_inflated": 160000,
        "driver_pages_deflated": 160000, "driver_pages_reverified": 212000,
        "balloon_max_pages": 24000, "bytes_released": 870 * MIB, "demand_faults": 212000,
        "guest_passes": 2600, "guest_bad_words": errors, "driver_bad_words": 0,
        "driver_errors": 0, "vcpu_failures": 0, "guest_errors": errors, "walks": 3000000,
        "walks_ok": 2400000, "walks_ballooned": 380000, "walks_discarded": 220000,
        "walks_per_s": 150000.0, "bytes_copied": 10 * GIB, "read_sections": 3000000,
        "front_sections": 0, "front_releases": 0, "read_section_max_us": 80.0,
        "stable_batches": 36000, "injected_stale_reads": 0, "changed_under_reader": 0,
        "left_not_present": 0, "stuck_readers": 0, "reclaim_ms": 3.0,
        "first_walk_violation": null,
        "inflate_batches": 1600, "teardown_walks": 5000, "teardown_walks_ok": 20,
        "injected_hits": 0, "stale_released": stale, "stale_data": 0,
        "stale_translations": stale, "use_after_free": uaf, "shadow_mismatches": 0,
        "device_errors": 0, "unexpected_faults": 0, "final_bad_words": 0, "not_released": 0,
        "stalls": 0, "max_lock_hold_us": 44.9, "max_lock_hold_cpu_us": 12.5, "rss_min_bytes": 180 * MIB,
        "rss_max_bytes": 262 * MIB, "rss_after_reclaim_bytes": 5 * MIB, "tables_freed": 130,
        "table_pages_end": 1, "violations": violations, "ok": violations == 0
    })
}

/// FIXTURE: `vmm run --mem 1G --balloon-target 512M --backing B --json`:
/// RSS `before` → `after` MiB across the inflate.
fn balloon_rss_fixture(backing: &str, before_mib: u64, after_mib: u64) -> Value {
    json!({
        "guest_ok": true, "vcpus": 1, "mem_bytes": GIB, "backing": backing, "page_size": "2M",
        "boot_ms": 3.7, "run_ms": 2500.0, "teardown_ms": 0.12, "reclaim_ms": 3.0,
        "memory_back_ms": 1.5, "rss_peak_bytes": GIB + 3 * MIB,
        "rss_after_teardown_bytes": 3 * MIB, "rss_before_bytes": 3 * MIB, "faults": 0,
        "fault_mean_latency_us": 0.0, "fault_max_latency_us": 0.0, "released_bytes": 0,
        "released_leaves_read_zero": 0, "guest_fault_read_mean_us": 0.0,
        "guest_fault_read_max_us": 0.0, "pages_verified": 261632,
        "balloon_target_bytes": 512 * MIB, "balloon_inflated_bytes": 512 * MIB,
        "balloon_inflate_ms": 21.0, "balloon_device_inflate_ms": 2.4,
        "balloon_released_bytes": 512 * MIB, "rss_before_inflate_bytes": before_mib * MIB,
        "rss_after_inflate_bytes": after_mib * MIB, "balloon_device_errors": 0,
        "balloon_driver_error": null, "stage2_table_bytes": 12288,
        "stage2_max_lock_hold_us": 10.2, "stage2_invalidations": 32,
        "stage2_teardown_gather_ms": 0.3, "stage2_teardown_released_bytes": 512 * MIB,
        "outcomes": ["Done"]
    })
}

/// FIXTURE: the same for `--backing guest-memfd`: RSS stays at 3 MiB (KVM
/// maps the guest_memfd's pages, the process does not), resident guest RAM
/// (`mincore`) goes `before` → `after` MiB.
fn guest_memfd_rss_fixture(before_mib: u64, after_mib: u64) -> Value {
    let mut v = balloon_rss_fixture("guest-memfd", 3, 3);
    v["rss_peak_bytes"] = json!(4 * MIB);
    v["guest_resident_before_inflate_bytes"] = json!(before_mib * MIB);
    v["guest_resident_after_inflate_bytes"] = json!(after_mib * MIB);
    v
}

/// Every fixture, as the report's file names.
/// FIXTURE: `gmm bench service --json`: the busiest idle VM at `idle_max`
/// % of a core, InstanceStart -> first KVM_RUN 1.5 ms.
fn service_fixture(idle_max: f64) -> Value {
    json!({
        "vms": 4, "mem_bytes": 64 * MIB, "idle_seconds": 10.0, "launches_per_s": 90.0,
        "launch_ms": [8.0, 9.0, 10.0, 11.0], "launch_ms_p50": 9.5,
        "monitor_setup_ms_p50": 1.5, "first_guest_report_ms_p50": 2.0,
        "idle_cpu_pct_per_vm": idle_max / 4.0, "idle_cpu_pct_max_vm": idle_max,
        "idle_cpu_pct_all": [0.0, 0.0, 0.0, idle_max], "idle_cpu_resolution_pct": 0.1,
        "stop_to_exit_ms_p50": 8.0
    })
}

/// FIXTURE: `gmm bench linux --json`: our share of the start `setup_ms`,
/// an idle Linux guest 0.6 %, QEMU skipped.
fn linux_fixture(setup_ms: f64) -> Value {
    json!({
        "kernel": "vmlinux", "mem_mib": 256, "vcpus": 2, "inflate_mib": 32,
        "monitor_setup_ms": setup_ms, "ours_init_s": 27.0, "fc_init_s": 28.0,
        "ours_inflate_mib_per_s": 8.9, "fc_inflate_mib_per_s": 9.6,
        "ours_idle_cpu_pct": 0.6, "fc_idle_cpu_pct": 0.7,
        "ours_idle_vcpu_cpu_pct": 0.5, "fc_idle_vcpu_cpu_pct": 0.45,
        "teardown": [{"monitor": "ours", "stop": "ctrl-alt-del", "mem_mib": 1024, "populated": true,
                      "rss_at_stop_bytes": GIB, "stop_to_memory_back_ms": 9.0,
                      "stop_to_exit_ms": 12.0, "exit_status": 0}],
        "skipped": ["qemu: not found"]
    })
}

/// FIXTURE: `gmm bench fault --json`: quiet p99 `quiet` µs, storm p99
/// `storm` µs.
fn fault_fixture(quiet: f64, storm: f64) -> Value {
    json!({
        "p50_us_quiet": quiet / 4.0, "p99_us_quiet": quiet, "max_us_quiet": quiet * 3.0,
        "p50_us_storm": storm / 4.0, "p99_us_storm": storm, "max_us_storm": storm * 3.0,
        "p99_ratio": if quiet > 0.0 { storm / quiet } else { 0.0 },
        "samples_quiet": 10000, "samples_storm": 9000,
        "a_field_the_report_does_not_know": true
    })
}

/// FIXTURE: one scenario of `gmm bench interference --json`.
fn scenario_fixture(name: &str, fault: f64, loop_drop: f64, verdict: &str) -> Value {
    let sp = |x: f64| json!({"median": x, "min": x, "max": x});
    json!({
        "scenario": name,
        "event": format!("the {name} event"),
        "rounds": 1,
        "victim_fault_p99_increase": fault,
        "victim_walk_p99_increase": 0.0,
        "victim_loop_rate_drop": loop_drop,
        "fault_p99_us_quiet": sp(10.0),
        "fault_p99_us_event": sp(10.0 * (1.0 + fault)),
        "fault_p50_us_quiet": 5.0,
        "fault_p50_us_event": 6.0,
        "fault_max_us_event": 90.0,
        "fault_p99_us_pooled": [10.0, 10.0 * (1.0 + fault)],
        "walk_p99_us_pooled": [2.0, 2.0],
        "walk_p99_us_quiet": sp(2.0),
        "walk_p99_us_event": sp(2.0),
        "loop_mib_per_sec_quiet": sp(1000.0),
        "loop_mib_per_sec_event": sp(1000.0 * (1.0 - loop_drop)),
        "fault_samples_quiet": 100,
        "fault_samples_event": 100,
        "walk_samples_quiet": 100,
        "walk_samples_event": 100,
        "event_ms": sp(500.0),
        "a_cpu_ms": sp(400.0),
        "verdict": verdict
    })
}

/// FIXTURE: `gmm bench interference --json` (fractions).
fn interference_fixture(fault_p99_increase: f64, loop_rate_drop: f64) -> Value {
    json!({
        "victim_fault_p99_increase": fault_p99_increase,
        "victim_loop_rate_drop": loop_rate_drop
    })
}

fn write_fixtures(dir: &Path) {
    write(dir, "unmap.json", &unmap_fixture());
    write(dir, "walk.json", &walk_fixture());
    // contiguous: 0.95× madvise per run (met); scattered: 6× per page (met);
    // fragmented: informational.
    write(
        dir,
        "balloon-contiguous.json",
        &balloon_fixture("contiguous", 100.0, 95.0, 400.0),
    );
    write(
        dir,
        "balloon-scattered.json",
        &balloon_fixture("scattered", 50.0, 60.0, 300.0),
    );
    write(
        dir,
        "balloon-fragmented.json",
        &balloon_fixture("fragmented", 40.0, 45.0, 300.0),
    );
    write(dir, "teardown.json", &teardown_fixture());
    write(dir, "launch.json", &launch_fixture());
    write(dir, "stress-vm.json", &stress_vm_fixture(0, 0, 0));
    // anon: 1027 → 515 MiB, a drop of 512 MiB (met); memfd: 1027 → 560
    // MiB, 467 MiB (missed: < 480 MiB).
    write(
        dir,
        "balloon-rss-anon.json",
        &balloon_rss_fixture("anon", 1027, 515),
    );
    write(
        dir,
        "balloon-rss-memfd.json",
        &balloon_rss_fixture("memfd", 1027, 560),
    );
    // guest-memfd: resident guest RAM 1024 → 512 MiB (met), RSS flat.
    write(
        dir,
        "balloon-rss-guest-memfd.json",
        &guest_memfd_rss_fixture(1024, 512),
    );
    write(dir, "service.json", &service_fixture(0.3));
    write(dir, "linux.json", &linux_fixture(3.0));
    write(dir, "fault.json", &fault_fixture(20.0, 30.0));
    write(dir, "interference.json", &interference_fixture(0.05, 0.02));
}

// ---------------------------------------------------------------------

#[test]
fn report_from_fixtures_computes_verdicts_and_draws_plots() {
    let dir = scratch("fixtures");
    write_fixtures(&dir);
    let md_path = dir.join("B.md");
    let dir_s = dir.to_str().expect("utf-8 temp dir");
    let md_s = md_path.to_str().expect("utf-8 temp dir");
    let out = gmm(&["bench", "report", "--from", dir_s, "--markdown", md_s]);
    assert!(out.status.success(), "report failed: {}", text(&out));
    let md = read(&md_path);

    // Plots: present, complete SVG documents, titled, linked relative to
    // the markdown (same directory here).
    for (svg, title) in [
        ("reclaim-unmap.svg", "Unmap: release time vs. region size"),
        ("lock-hold.svg", "Table-lock holds during unmap"),
        ("walk.svg", "Fast walk: translations per second"),
        ("inflate.svg", "Balloon inflate rate by PFN pattern"),
        (
            "reclaim-teardown.svg",
            "VM teardown: reclaim time vs. guest size",
        ),
    ] {
        let s = read(&dir.join(svg));
        assert!(
            s.trim_start().starts_with("<svg") || s.trim_start().starts_with("<?xml"),
            "{svg}: {}",
            &s[..s.len().min(200)]
        );
        assert!(
            s.trim_end().ends_with("</svg>"),
            "{svg} is not a complete SVG document"
        );
        assert!(s.contains(title), "{svg} lacks its title {title:?}");
        assert!(
            s.contains("<text"),
            "{svg} has no text (axis labels, legend)"
        );
        assert!(
            md.contains(&format!("]({svg})")),
            "markdown does not link {svg}"
        );
    }
    assert!(read(&dir.join("reclaim-teardown.svg")).contains("QEMU quit"));

    // Unmap: 1.05× (met) then 1.2× (missed); per-page 11.9× and 12.5× (met).
    // The retired per-page target has no verdict column, only its kernel
    // bound (per-page / one madvise: 12.5× and 15×).
    let r = row(
        &md,
        &["256 MiB", "21.0", "20.0", "1.05×", "250", "11.9×", "12.5×"],
    );
    assert!(r.ends_with("| met | met |"), "{r}");
    let r = row(
        &md,
        &["1 GiB", "96.0", "80.0", "1.20×", "1200", "12.5×", "15.0×"],
    );
    assert!(r.ends_with("| **missed** | **missed** |"), "{r}");
    // Wall hold, CPU hold, p99 and p99.9 bounds, the busy loop's stall
    // (stalls over 50 µs), its hold-length sections' p99.9 and max.
    assert!(
        r.contains("| 120.0 | 30.0 | 32.8 | 131.1 | 255.0 (2) | 65.5 / 260.0 |"),
        "{r}"
    );
    let r = row(&md, &["256 MiB", "21.0"]);
    assert!(
        r.contains("| 40.0 | 41.5 | 32.8 | 131.1 | 12.0 (0) | 16.4 / 17.0 |"),
        "{r}"
    );
    assert!(
        md.contains(
            "*Max hold on CPU* is the longest hold measured in the holder's own thread CPU time"
        ),
        "{md}"
    );
    row(
        &md,
        &[
            "unmap",
            "gather ≤ 1.10× one madvise (every size)",
            "worst 1.20× at 1 GiB",
            "**missed**",
        ],
    );
    row(
        &md,
        &[
            "unmap",
            "gather ≥ 10× faster than per-page madvise (every size)",
            "11.9× at 256 MiB (bound 12.5×); 12.5× at 1 GiB (bound 15.0×); bound: per-page / one madvise",
            "retired: kernel bound",
        ],
    );
    row(
        &md,
        &[
            "unmap",
            "table-lock hold ≤ 100 µs (every size)",
            "worst 120.0 µs wall at 1 GiB, 30.0 µs on CPU, p99.9 ≤ 131.1 µs; a lock-free busy loop stalled up to 255.0 µs in the same run, its 12.0 µs sections took p99.9 ≤ 65.5 µs, max 260.0 µs",
            "**missed**",
        ],
    );

    // Walk (issue 12's ratios): 0.49× vm-memory (missed), 1.25× RwLock
    // (met), 0.7× alone under the storm (missed), and, with no ratio in
    // the file, 77 / 127 M/s under the storms (missed).
    for (target, measured, verdict) in [
        (
            "fast walk ≥ 0.8× vm-memory's get_host_address (one region)",
            "0.49×",
            "**missed**",
        ),
        ("fast walk ≥ 1.2× the RwLock<Vec> page map", "1.25×", "met"),
        (
            "fast walk under an unmap storm ≥ 0.9× alone",
            "0.70×",
            "**missed**",
        ),
        (
            "fast walk under the storm ≥ 1.2× the page map under the same storm",
            "0.61×",
            "**missed**",
        ),
    ] {
        row(&md, &["walk", target, measured, verdict]);
    }
    row(&md, &["fast walk, cached path", "110.0"]);

    // Balloon.
    // pattern, size, pages, runs, release syscalls, inflate, deflate,
    // madvise/run, madvise/page.
    let r = row(
        &md,
        &[
            "contiguous",
            "512 MiB",
            "131072",
            "1",
            "1",
            "100",
            "10.0",
            "95.0",
            "400",
        ],
    );
    assert!(
        r.ends_with("| 0.95× | 4.00× | ≥ 0.9× madvise/run | met |"),
        "{r}"
    );
    let r = row(
        &md,
        &[
            "scattered",
            "512 MiB",
            "131072",
            "65536",
            "512",
            "50.0",
            "5.00",
        ],
    );
    assert!(
        r.ends_with(
            "| 1.20× | 6.00× | retired (≥ 5× madvise/page): kernel bound | retired: kernel bound |"
        ),
        "{r}"
    );
    let r = row(
        &md,
        &[
            "fragmented",
            "512 MiB",
            "131072",
            "3840",
            "30",
            "40.0",
            "4.00",
        ],
    );
    assert!(r.ends_with("| no issue target | — |"), "{r}");
    assert!(
        md.contains("*scattered* is every other page, shuffled: isolated single pages")
            && md.contains("*fragmented* is runs of 1 to 32 pages"),
        "{md}"
    );
    row(
        &md,
        &[
            "balloon",
            "contiguous PFNs: inflate rate ≥ 0.9× madvise per coalesced run",
            "0.95× madvise/run at 512 MiB",
            "met",
        ],
    );
    row(
        &md,
        &[
            "balloon",
            "scattered PFNs: inflate rate ≥ 5× madvise per page",
            "6.00× madvise/page at 512 MiB; against the kernel bound (one madvise per scattered run): 1.20×",
            "retired: kernel bound",
        ],
    );

    // Teardown: every ratio (1.06×, 1.06×, 1.2×) is above 1.0×, so
    // "missed"; the 6 ms destroy call too; QEMU: met at 1 GiB, missed at
    // 2 GiB. size, backing and leaf, destroy, reclaim (memory back), all
    // done, RSS before → at memory back, munmap, ratio.
    let r = row(
        &md,
        &[
            "1 GiB",
            "anon 2M",
            "0.800",
            "90.0",
            "92.0",
            "5 MiB → 6 MiB",
            "85.0",
            "1.06×",
        ],
    );
    assert!(
        r.ends_with("| 95.0 | 200 | **missed** | — | met | met |"),
        "{r}"
    );
    let r = row(
        &md,
        &[
            "2 GiB",
            "anon 2M",
            "0.900",
            "180",
            "182",
            "5 MiB → 6 MiB",
            "170",
            "1.06×",
        ],
    );
    assert!(
        r.ends_with("| 185 | 150 | **missed** | — | met | **missed** |"),
        "{r}"
    );
    // What limits a missed target is explained, from the figures, only
    // where it was missed: the teardown ratio (1.06× and 1.20×, all rows);
    // not the per-page unmap ratio (met) nor the scattered balloon (met).
    let why = md
        .lines()
        .find(|l| l.starts_with("**What limits \"≤ 1.0× munmap\".**"))
        .expect("the teardown miss is explained");
    assert!(
        why.contains("At 1 GiB (anon 2M)") && why.contains("4 GiB (anon 2M)"),
        "{why}"
    );
    // The retired targets say why, always (met or not).
    assert!(md.contains("**Retired: \"≥ 5× madvise/page\" for scattered PFNs.** The target is shown with its kernel bound instead of a verdict: a scattered balloon is bounded by one release per scattered run"), "{md}");
    assert!(md.contains("**Retired: \"≥ 10× per-page\".** The target is shown with its kernel bound instead of a verdict: per-page unmap is bounded by one madvise/munmap system call per page"), "{md}");
    let r = row(
        &md,
        &[
            "4 GiB",
            "anon 2M",
            "6.00",
            "420",
            "422",
            "5 MiB → 40 MiB",
            "350",
            "1.20×",
        ],
    );
    assert!(
        r.ends_with("| not measured | **missed** | — | **missed** | — |"),
        "{r}"
    );
    row(
        &md,
        &[
            "teardown",
            "memory back ≤ 1.0× bare munmap (every size, backing and leaf)",
            "worst 1.20× at 4 GiB",
            "**missed**",
        ],
    );
    row(
        &md,
        &[
            "teardown",
            "destroy call ≤ 1 ms (every row)",
            "worst 6.00 ms at 4 GiB",
            "**missed**",
        ],
    );
    let r = row(
        &md,
        &[
            "teardown",
            "vmm process exits sooner than QEMU after quit (where measured)",
        ],
    );
    assert_missed(r, "95.0 vs 200 ms at 1 GiB; 185 vs 150 ms at 2 GiB");

    assert!(
        md.contains("Warning: at 4 GiB the RSS did not come back near its level before launch"),
        "{md}"
    );
    assert!(
        md.contains("*all done* runs until `wait_reclaim` returned"),
        "{md}"
    );
    assert!(read(&dir.join("reclaim-teardown.svg")).contains("all done"));

    // Launch: min(25/s wall, 30 per CPU-second) = 25 ≥ 20.
    row(
        &md,
        &[
            "launch",
            "≥ 20 launch+teardown cycles/s per core",
            "25.0/s per core",
            "met",
        ],
    );
    row(
        &md,
        &[
            "25.0",
            "30.0",
            "33.3",
            "25.0",
            "not measured",
            "—",
            "—",
            "12 KiB (4 alive)",
            "met",
        ],
    );
    row(
        &md,
        &[
            "boot (`Vm::new` → first guest report)",
            "1.80",
            "2.70",
            "3.60",
        ],
    );

    // Stress: no guest errors, stale translations or use-after-free (met).
    row(
        &md,
        &[
            "stress-vm",
            "stress runs show 0 guest errors, 0 stale translations, 0 use-after-free",
            "0 guest errors, 0 stale translations, 0 use-after-free in 41 cycles (0 violations in all)",
            "met",
        ],
    );
    row(&md, &["stale translations", "0"]);
    row(&md, &["violations (total)", "0"]);
    row(&md, &["RSS min / max", "180 MiB / 262 MiB"]);

    // Balloon RSS: anon drops 512 MiB (met), memfd 467 MiB (missed).
    row(
        &md,
        &[
            "balloon-rss",
            "inflate of 512 MiB from a 1 GiB guest: RSS drops by ≥ 480 MiB, anon backing",
            "RSS dropped by 512 MiB (1.00 GiB → 515 MiB), 512 MiB inflated in 21.0 ms",
            "met",
        ],
    );
    row(
        &md,
        &[
            "balloon-rss",
            "inflate of 512 MiB from a 1 GiB guest: RSS drops by ≥ 480 MiB, memfd backing (Firecracker issue #6167)",
            "RSS dropped by 467 MiB (1.00 GiB → 560 MiB), 512 MiB inflated in 21.0 ms",
            "**missed**",
        ],
    );
    let r = row(
        &md,
        &["anon", "1 GiB", "512 MiB", "512 MiB", "21.0", "2.40"],
    );
    assert!(r.ends_with("| 512 MiB | 512 MiB | 0 | yes | met |"), "{r}");
    let r = row(&md, &["memfd", "1 GiB"]);
    assert!(
        r.ends_with("| 467 MiB | 512 MiB | 0 | yes | **missed** |"),
        "{r}"
    );
    // guest-memfd is judged on resident guest RAM, not on its flat RSS.
    row(
        &md,
        &[
            "balloon-rss",
            "inflate of 512 MiB from a 1 GiB guest: resident guest RAM drops by ≥ 480 MiB, guest-memfd backing (not in RSS: KVM maps the file's pages, the process does not)",
            "resident guest RAM dropped by 512 MiB (1 GiB → 512 MiB), 512 MiB inflated in 21.0 ms",
            "met",
        ],
    );
    let r = row(&md, &["guest-memfd", "1 GiB"]);
    assert!(
        r.contains("| 3 MiB | 3 MiB | 1 GiB → 512 MiB | 512 MiB | 512 MiB | 0 | yes | met |"),
        "{r}"
    );
    let s = read(&dir.join("balloon-rss.svg"));
    assert!(s.contains("Balloon inflate by the guest driver") && s.trim_end().ends_with("</svg>"));
    assert!(md.contains("](balloon-rss.svg)"), "{md}");
    assert!(!md.contains("--quick: 15/16"), "{md}");

    // No machine recorded without results.json; the reproduction commands.
    assert!(md.contains("## Machine\n\nnot recorded"), "{md}");
    assert!(md.contains("target/release/gmm bench teardown --matrix --reps 5 --json"));
    assert!(md.contains("target/release/gmm stress-vm --seconds 20 --mem 256M --vcpus 2 --json"));
    assert!(
        md.contains("target/release/vmm run --mem 1G --balloon-target 512M --backing memfd --json")
    );
    assert!(!md.contains("--quick"), "not a quick run: {md}");
}

#[test]
fn missing_field_is_a_clear_error_and_the_rest_is_still_reported() {
    let dir = scratch("missing");
    write_fixtures(&dir);
    let mut td = teardown_fixture();
    td["sizes"][1]
        .as_object_mut()
        .expect("object")
        .remove("reclaim_ms");
    write(&dir, "teardown.json", &td);
    let md_path = dir.join("B.md");
    let out = gmm(&[
        "bench",
        "report",
        "--from",
        dir.to_str().expect("utf-8"),
        "--markdown",
        md_path.to_str().expect("utf-8"),
    ]);
    assert!(
        !out.status.success(),
        "a missing field must fail: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let msg = "teardown.json: sizes[1]: missing field `reclaim_ms`";
    assert!(err.contains(msg), "stderr lacks {msg:?}: {}", text(&out));
    let md = read(&md_path);
    assert!(md.contains(&format!("not measured: {msg}")), "{md}");
    row(&md, &["teardown", "destroy call ≤ 1 ms (every row)", "—"]);
    // The other benches are still there.
    row(&md, &["1 GiB", "96.0", "80.0", "1.20×"]);
    assert!(dir.join("inflate.svg").exists());
}

/// `gmm bench report --from DIR --only ONLY`: its status and markdown.
fn report_from(dir: &Path, only: &str) -> (Output, String) {
    let md_path = dir.join("B.md");
    let out = gmm(&[
        "bench",
        "report",
        "--from",
        dir.to_str().expect("utf-8"),
        "--markdown",
        md_path.to_str().expect("utf-8"),
        "--only",
        only,
    ]);
    let md = read(&md_path);
    (out, md)
}

#[test]
fn stress_violations_and_balloon_rss_verdicts_flip() {
    let dir = scratch("stress-rss");
    // 3 stale translations and 1 use-after-free: missed (a result, not a
    // failure: the report still succeeds).
    write(&dir, "stress-vm.json", &stress_vm_fixture(0, 3, 1));
    // anon: 1027 → 557 MiB, 470 MiB (missed); memfd: 1027 → 527 MiB,
    // 500 MiB (met).
    write(
        &dir,
        "balloon-rss-anon.json",
        &balloon_rss_fixture("anon", 1027, 557),
    );
    write(
        &dir,
        "balloon-rss-memfd.json",
        &balloon_rss_fixture("memfd", 1027, 527),
    );
    // guest-memfd: resident 1024 → 554 MiB, 470 MiB (missed).
    write(
        &dir,
        "balloon-rss-guest-memfd.json",
        &guest_memfd_rss_fixture(1024, 554),
    );
    let (out, md) = report_from(&dir, "stress-vm,balloon-rss");
    assert!(out.status.success(), "{}", text(&out));
    row(
        &md,
        &[
            "stress-vm",
            "stress runs show 0 guest errors, 0 stale translations, 0 use-after-free",
            "0 guest errors, 3 stale translations, 1 use-after-free in 41 cycles (4 violations in all)",
            "**missed**",
        ],
    );
    row(&md, &["violations (total)", "4"]);
    row(
        &md,
        &[
            "max table-lock hold, wall clock / on the holder's CPU",
            "44.9 µs / 12.5 µs",
        ],
    );
    row(
        &md,
        &[
            "balloon-rss",
            "inflate of 512 MiB from a 1 GiB guest: RSS drops by ≥ 480 MiB, anon backing",
            "RSS dropped by 470 MiB (1.00 GiB → 557 MiB), 512 MiB inflated in 21.0 ms",
            "**missed**",
        ],
    );
    row(
        &md,
        &[
            "balloon-rss",
            "inflate of 512 MiB from a 1 GiB guest: RSS drops by ≥ 480 MiB, memfd backing (Firecracker issue #6167)",
            "RSS dropped by 500 MiB (1.00 GiB → 527 MiB), 512 MiB inflated in 21.0 ms",
            "met",
        ],
    );
    let r = row(
        &md,
        &[
            "balloon-rss",
            "inflate of 512 MiB from a 1 GiB guest: resident guest RAM drops by ≥ 480 MiB, guest-memfd backing (not in RSS: KVM maps the file's pages, the process does not)",
        ],
    );
    assert_missed(r, "resident guest RAM dropped by 470 MiB (1 GiB → 554 MiB)");
    // A guest-memfd run without the resident figures cannot be judged.
    let mut old = guest_memfd_rss_fixture(1024, 512);
    old.as_object_mut()
        .expect("object")
        .remove("guest_resident_after_inflate_bytes");
    write(&dir, "balloon-rss-guest-memfd.json", &old);
    let (out, md) = report_from(&dir, "balloon-rss");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        md.contains("missing `guest_resident_before_inflate_bytes`"),
        "{md}"
    );
    assert!(!md.contains("## Unmap"), "--only: {md}");

    // A guest error alone also misses the stress target. (A result saved
    // before holds were timed on the CPU says so.)
    let mut old = stress_vm_fixture(2, 0, 0);
    old.as_object_mut()
        .expect("object")
        .remove("max_lock_hold_cpu_us");
    write(&dir, "stress-vm.json", &old);
    let (out, md) = report_from(&dir, "stress-vm");
    assert!(out.status.success(), "{}", text(&out));
    row(
        &md,
        &[
            "max table-lock hold, wall clock / on the holder's CPU",
            "44.9 µs / not measured",
        ],
    );
    let r = row(
        &md,
        &[
            "stress-vm",
            "stress runs show 0 guest errors, 0 stale translations, 0 use-after-free",
        ],
    );
    assert_missed(r, "2 guest errors, 0 stale translations");
}

#[test]
fn quick_balloon_rss_threshold_is_scaled_and_a_missing_vmm_is_not_measured() {
    let dir = scratch("rss-quick");
    // FIXTURE: a --quick results.json: the anon run is there (256 MiB
    // guest, 128 MiB target; RSS 262 → 141 MiB, a drop of 121 MiB ≥ 120:
    // met), the memfd run could not start (no vmm binary).
    let mut anon = balloon_rss_fixture("anon", 262, 141);
    anon["mem_bytes"] = json!(256 * MIB);
    anon["balloon_target_bytes"] = json!(128 * MIB);
    anon["balloon_inflated_bytes"] = json!(128 * MIB);
    write(&dir, "balloon-rss-anon.json", &anon);
    write(
        &dir,
        "results.json",
        &json!({
            "tool": "bench-report", "quick": true, "machine": null,
            "steps": [{"name": "balloon-rss-memfd", "bench": "balloon-rss",
                       "command": ["vmm", "run", "--mem", "256M", "--balloon-target", "128M",
                                   "--backing", "memfd", "--json"],
                       "elapsed_s": null, "ok": false,
                       "error": "vmm binary missing (cargo build --release -p vmm)", "file": null}],
            "results": {}
        }),
    );
    let (out, md) = report_from(&dir, "balloon-rss");
    assert!(
        !out.status.success(),
        "a missing run is a problem: {}",
        text(&out)
    );
    let quick = "inflate of 128 MiB from a 256 MiB guest: RSS drops by ≥ 120 MiB (--quick: 15/16 of the target, as 480 of 512 MiB)";
    row(
        &md,
        &[
            "balloon-rss",
            &format!("{quick}, anon backing"),
            "RSS dropped by 121 MiB (262 MiB → 141 MiB), 128 MiB inflated in 21.0 ms",
            "met",
        ],
    );
    row(
        &md,
        &[
            "balloon-rss",
            &format!("{quick}, memfd backing (Firecracker issue #6167)"),
            "—",
            "not measured: vmm binary missing (cargo build --release -p vmm)",
        ],
    );
    assert!(
        md.contains("the threshold is scaled to 15/16 of that target (120 MiB)"),
        "{md}"
    );
    assert!(
        md.contains(
            "target/release/vmm run --mem 256M --balloon-target 128M --backing memfd --json"
        ),
        "{md}"
    );

    // 119 MiB is short of the scaled threshold.
    anon["rss_after_inflate_bytes"] = json!(143 * MIB);
    write(&dir, "balloon-rss-anon.json", &anon);
    let (_, md) = report_from(&dir, "balloon-rss");
    let r = row(&md, &["balloon-rss", &format!("{quick}, anon backing")]);
    assert_missed(r, "RSS dropped by 119 MiB");
}

#[test]
fn recorded_failure_and_missing_file_are_not_measured() {
    let dir = scratch("failed");
    // FIXTURE: a results.json whose launch step failed (no launch.json).
    write(
        &dir,
        "results.json",
        &json!({
            "tool": "bench-report", "quick": false,
            "machine": {"cpu_model": "Fixture CPU", "cores": 2, "memory_bytes": 4 * GIB,
                        "kernel": "6.0-fixture", "dev_kvm": true, "kvm_backend": "kvm_pvm",
                        "virtualized": true, "date_utc": "2026-01-01 00:00 UTC",
                        "git_commit": "abc1234", "gmm_version": "0.1.0",
                        "fences": "SeqCst (no membarrier)", "loadavg_at_start": "0.00 0.00 0.00",
                        "free_page_reporting_order": 9},
            "steps": [{"name": "launch", "bench": "launch",
                       "command": ["gmm", "bench", "launch", "--count", "20", "--json"],
                       "elapsed_s": 0.1, "ok": false, "error": "exited with exit status: 1: Error: no /dev/kvm (fixture)",
                       "file": null}],
            "results": {}
        }),
    );
    let md_path = dir.join("sub").join("B.md");
    let out = gmm(&[
        "bench",
        "report",
        "--from",
        dir.to_str().expect("utf-8"),
        "--markdown",
        md_path.to_str().expect("utf-8"),
        "--only",
        "launch,walk",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let md = read(&md_path);
    assert!(
        md.contains("not measured: exited with exit status: 1: Error: no /dev/kvm (fixture)"),
        "{md}"
    );
    assert!(md.contains("not measured: no "), "missing walk.json: {md}");
    row(&md, &["CPU", "Fixture CPU"]);
    row(&md, &["KVM", "/dev/kvm (kvm_pvm)"]);
    row(
        &md,
        &[
            "free page reporting",
            "on: free blocks of 2 MiB and larger (order 9) go back to the hypervisor, which refaults them at their next touch",
        ],
    );
    assert!(
        !md.contains("## Unmap"),
        "--only must leave unmap out: {md}"
    );
    // An order above the largest free block reports nothing; a result
    // saved without the order has no row.
    let mut r: Value = serde_json::from_str(&read(&dir.join("results.json"))).expect("json");
    r["machine"]["free_page_reporting_order"] = json!(11);
    write(&dir, "results.json", &r);
    let (_, md) = report_from(&dir, "launch");
    row(
        &md,
        &[
            "free page reporting",
            "off (order 11, above the largest free block)",
        ],
    );
    r["machine"]
        .as_object_mut()
        .expect("object")
        .remove("free_page_reporting_order");
    write(&dir, "results.json", &r);
    let (_, md) = report_from(&dir, "launch");
    assert!(md.contains("| CPU | Fixture CPU |"), "{md}");
    assert!(!md.contains("free page reporting"), "{md}");
}

#[test]
fn bad_arguments_fail_clearly() {
    let out = gmm(&["bench", "report", "--only", "nope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        text(&out)
    );
    let out = gmm(&["bench", "report", "--from", "/nonexistent/gmm-report-dir"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a directory"),
        "{}",
        text(&out)
    );
}

/// A real `--quick` run of the benches that need nothing but `/dev/kvm`,
/// plus balloon-rss when the `vmm` binary is next to `gmm` (teardown is
/// left out: it also needs QEMU to be complete): about 10 s.
#[test]
fn quick_run_smoke() {
    if !kvm_or_skip("quick_run_smoke") {
        return;
    }
    let dir = scratch("quick");
    let md_path = dir.join("B.md");
    // balloon-rss runs the vmm binary next to gmm: built by `cargo build
    // -p vmm` (or `--workspace`), not by `cargo test -p tools`.
    let vmm = Path::new(env!("CARGO_BIN_EXE_gmm")).with_file_name("vmm");
    let only = if vmm.is_file() {
        "unmap,walk,balloon,launch,stress-vm,balloon-rss"
    } else {
        loud(&format!(
            "SKIPPED (part): quick_run_smoke: balloon-rss: no {} (cargo build -p vmm into the same target dir)",
            vmm.display()
        ));
        "unmap,walk,balloon,launch,stress-vm"
    };
    let t = std::time::Instant::now();
    let out = gmm(&[
        "bench",
        "report",
        "--quick",
        "--only",
        only,
        "--out",
        dir.to_str().expect("utf-8"),
        "--markdown",
        md_path.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(out.status.success(), "quick report failed: {}", text(&out));
    eprintln!("quick report took {:.1} s", t.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}): {}", text(&out)));
    assert_eq!(last["errors"], json!([]), "{last}");
    let all: Value = serde_json::from_str(&read(&dir.join("results.json"))).expect("results.json");
    let steps = all["steps"].as_array().expect("steps");
    // balloon-rss: anon, memfd and guest-memfd.
    assert_eq!(steps.len(), if vmm.is_file() { 10 } else { 7 }, "{all}");
    for s in steps.iter().filter(|s| s["ok"] != json!(true)) {
        // Only a run this host's KVM cannot do may be left out (guest-memfd
        // without KVM_CAP_GUEST_MEMFD), and it says so.
        let e = s["error"].as_str().unwrap_or_default();
        assert!(
            s["absent"] == json!(true) && e.contains("this host cannot run it"),
            "{s}"
        );
        loud(&format!("SKIPPED on this host: {}: {e}", s["name"]));
    }
    for f in [
        "unmap.json",
        "walk.json",
        "balloon-contiguous.json",
        "launch.json",
        "stress-vm.json",
        "inflate.svg",
        "lock-hold.svg",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let md = read(&md_path);
    assert!(md.contains("This is a `--quick` run"), "{md}");
    assert!(md.contains("| CPU |"), "{md}");
    assert!(
        md.contains("## Stress: a real guest under balloon churn"),
        "{md}"
    );
    row(
        &md,
        &[
            "stress-vm",
            "stress runs show 0 guest errors, 0 stale translations, 0 use-after-free",
        ],
    );
    if vmm.is_file() {
        let skipped = |stem: &str| {
            steps
                .iter()
                .any(|s| s["name"] == json!(stem) && s["absent"] == json!(true))
        };
        for f in [
            "balloon-rss-anon.json",
            "balloon-rss-memfd.json",
            "balloon-rss-guest-memfd.json",
            "balloon-rss.svg",
        ] {
            let stem = f.trim_end_matches(".json");
            assert!(dir.join(f).exists() || skipped(stem), "{f} missing");
        }
        assert!(md.contains("--quick: 15/16 of the target"), "{md}");
    }
}

#[test]
fn service_and_linux_sections_and_their_verdicts() {
    let dir = scratch("service-linux");
    write(&dir, "service.json", &service_fixture(2.0));
    write(&dir, "linux.json", &linux_fixture(20.0));
    let (out, md) = report_from(&dir, "service,linux");
    assert!(out.status.success(), "{}", text(&out));
    assert_missed(
        row(&md, &["service", "an idle VM costs ≤ 1 % of a host core"]),
        "2.000 % (max of 4)",
    );
    let r = row(
        &md,
        &[
            "service",
            "InstanceStart → first guest instruction ≤ 5 ms (the monitor's share)",
        ],
    );
    assert!(r.contains("1.50 ms") && r.ends_with("| met |"), "{r}");
    assert_missed(
        row(
            &md,
            &[
                "linux",
                "Linux: InstanceStart → first guest instruction ≤ 5 ms (the monitor's share)",
            ],
        ),
        "20.00 ms",
    );
    let r = row(
        &md,
        &["linux", "Linux: an idle guest costs ≤ 1 % of a host core"],
    );
    assert!(r.contains("0.60 %") && r.ends_with("| met |"), "{r}");
    // Where the idle CPU went: the guest's vCPU threads, the rest.
    assert!(
        r.contains("(vCPU threads 0.50 %, the monitor's other threads 0.10 %)"),
        "{r}"
    );
    // The peers that ran are shown beside ours (QEMU did not run here).
    assert!(r.contains("(the same guest in this run: fc 0.70 %)"), "{r}");
    row(&md, &["ours", "27.0", "0.60", "0.50", "0.10", "8.90"]);
    row(&md, &["fc", "28.0", "0.70", "0.45", "0.25", "9.60"]);
    row(&md, &["qemu", "—", "—", "—", "—", "—"]);
    row(
        &md,
        &[
            "ours",
            "ctrl-alt-del",
            "1024 MiB",
            "true",
            "1 GiB",
            "9.00",
            "12.0",
        ],
    );
    assert!(md.contains("Skipped: qemu: not found"), "{md}");
    // Results saved before the backing was recorded were anonymous RAM.
    assert!(md.contains("2 vCPUs, 256 MiB, anon guest RAM)"), "{md}");
    let mut l = linux_fixture(20.0);
    l["backing"] = json!("memfd");
    write(&dir, "linux.json", &l);
    let (out, md) = report_from(&dir, "linux");
    assert!(out.status.success(), "{}", text(&out));
    assert!(md.contains("2 vCPUs, 256 MiB, memfd guest RAM)"), "{md}");
}

/// Idle figures counted side by side (every monitor's guest idling in the
/// same windows) say so, and show each monitor's spread of windows.
#[test]
fn linux_idle_side_by_side_shows_the_windows() {
    let dir = scratch("linux-side-by-side");
    let mut l = linux_fixture(3.0);
    l["idle_side_by_side"] = json!(true);
    l["idle_windows"] = json!([
        {"monitor": "ours", "seconds": 10.0, "cpu_pct": [0.5, 0.6, 0.8], "vcpu_cpu_pct": [0.4, 0.5, 0.7]},
        {"monitor": "fc", "seconds": 10.0, "cpu_pct": [0.7, 0.9, 0.65], "vcpu_cpu_pct": [0.45, 0.5, 0.4]},
    ]);
    write(&dir, "linux.json", &l);
    let (out, md) = report_from(&dir, "linux");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        md.contains("idling side by side, counted over the same 3 windows of 10 s"),
        "{md}"
    );
    row(&md, &["ours", "27.0", "0.60 (0.50 .. 0.80)", "0.50"]);
    row(&md, &["fc", "28.0", "0.70 (0.65 .. 0.90)", "0.45"]);
    let r = row(
        &md,
        &["linux", "Linux: an idle guest costs ≤ 1 % of a host core"],
    );
    assert!(
        r.contains("(the same guest idling beside ours in the same windows: fc 0.70 %)"),
        "{r}"
    );
    // Saved before: one monitor at a time, and said so.
    write(&dir, "linux.json", &linux_fixture(3.0));
    let (out, md) = report_from(&dir, "linux");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        md.contains("one monitor at a time, one window each"),
        "{md}"
    );
}

/// The Linux idle target is judged against the cheapest peer that ran the
/// same guest with the same statistics polling (the guest bound): retired
/// within the target's 1 % of it, missed above it or when the monitor's own
/// threads exceed 1 %; QEMU counts only where it was asked to poll too.
#[test]
fn linux_idle_is_judged_against_the_guest_bound() {
    const T: &str = "Linux: an idle guest costs ≤ 1 % of a host core";
    let dir = scratch("linux-guest-bound");
    let idle = |ours: f64, ours_vcpu: f64, qemu: f64, fc: f64, polled: bool| {
        let mut l = linux_fixture(3.0);
        l["ours_idle_cpu_pct"] = json!(ours);
        l["ours_idle_vcpu_cpu_pct"] = json!(ours_vcpu);
        l["qemu_idle_cpu_pct"] = json!(qemu);
        l["qemu_idle_vcpu_cpu_pct"] = json!(qemu);
        l["fc_idle_cpu_pct"] = json!(fc);
        l["fc_idle_vcpu_cpu_pct"] = json!(fc);
        if polled {
            l["idle_stats_polling_s"] = json!(1);
        }
        write(&dir, "linux.json", &l);
        let (out, md) = report_from(&dir, "linux");
        assert!(out.status.success(), "{}", text(&out));
        (row(&md, &["linux", T]).to_string(), md)
    };
    // Within 1 point of the cheapest peer (QEMU, which polled too).
    let (r, md) = idle(6.4, 6.4, 7.3, 7.8, true);
    assert!(
        r.contains("guest bound: qemu 7.30 %") && r.ends_with("| retired: guest bound |"),
        "{r}"
    );
    assert!(md.contains("**Retired: \"an idle guest costs"), "{md}");
    assert!(
        md.contains("every monitor asks for the balloon's statistics every 1 s"),
        "{md}"
    );
    // More than 1 point above it: what is above is ours.
    let (r, md) = idle(8.5, 8.5, 7.3, 7.8, true);
    assert_missed(&r, "guest bound: qemu 7.30 %");
    assert!(!md.contains("**Retired"), "{md}");
    // The monitor's own threads over 1 %: missed, however close the total.
    let (r, _) = idle(7.4, 6.0, 7.3, 7.8, true);
    assert_missed(&r, "guest bound: qemu 7.30 %");
    // Results from before QEMU polled: QEMU's lower figure did less guest
    // work and is no bound; Firecracker's is.
    let (r, md) = idle(7.39, 7.39, 4.19, 6.69, false);
    assert!(
        r.contains("guest bound: fc 6.69 %") && r.ends_with("| retired: guest bound |"),
        "{r}"
    );
    assert!(md.contains("QEMU does not"), "{md}");
    // Peers within the target: no bound, ours missed.
    let (r, _) = idle(2.0, 2.0, 0.8, 0.7, true);
    assert_missed(&r, "2.00 %");
    assert!(!r.contains("guest bound"), "{r}");
    // Ours within the target: met, whatever the peers.
    let (r, _) = idle(0.6, 0.5, 7.3, 7.8, true);
    assert!(r.ends_with("| met |") && !r.contains("guest bound"), "{r}");
}

/// The launch target against the guest's work alone: met at 20/s per
/// core; retired where the bound itself is below 20/s and the VMs keep
/// 0.9x of it; missed below that, or where the bound reaches 20/s.
#[test]
fn launch_is_judged_against_the_guest_work_bound() {
    const T: &str = "≥ 20 launch+teardown cycles/s per core";
    let dir = scratch("launch-bound");
    let launch = |wall: f64, cpu: f64, bound: Option<f64>| {
        let mut l = launch_fixture();
        l["launches_per_sec"] = json!(wall);
        l["launches_per_cpu_sec"] = json!(cpu);
        if let Some(b) = bound {
            l["bound"] = json!({
                "launches_per_sec": b, "launches_per_cpu_sec": b + 1.0, "per_core": b,
                "launches_per_sec_rounds": [b - 0.5, b, b + 0.5],
                "cpu_ms_per_launch": 1000.0 / b,
                "ratio_vs_bound": wall.min(cpu) / b,
                "monitor_cpu_ms_per_launch": 1000.0 / cpu - 1000.0 / b
            });
        }
        write(&dir, "launch.json", &l);
        let (out, md) = report_from(&dir, "launch");
        assert!(out.status.success(), "{}", text(&out));
        (row(&md, &["launch", T]).to_string(), md)
    };
    // Per core is the lower rate: 25/s wall but 19 per CPU-second.
    let (r, md) = launch(25.0, 19.0, Some(20.0));
    assert_missed(
        &r,
        "19.0/s per core; the guest's work alone 20.0/s (0.95× of it)",
    );
    assert!(md.contains("The bound: every cycle's guest writes"), "{md}");
    assert!(
        md.contains("The bound's rounds: 19.5 .. 20.5 cycles/s."),
        "{md}"
    );
    // The bound below 20/s and 0.9x of it kept: retired.
    let (r, md) = launch(15.0, 14.5, Some(16.0));
    assert!(
        r.contains("14.5/s per core; the guest's work alone 16.0/s (0.91× of it)")
            && r.ends_with("| retired: guest bound |"),
        "{r}"
    );
    assert!(md.contains("**Retired: \"≥ 20 launch+teardown"), "{md}");
    // Under 0.9x of it: the monitor's own cost, missed.
    let (r, md) = launch(14.0, 14.3, Some(16.0));
    assert_missed(&r, "(0.88× of it)");
    assert!(!md.contains("**Retired"), "{md}");
    // Met at 20/s, whatever the bound.
    let (r, _) = launch(21.0, 20.5, Some(16.0));
    assert!(r.ends_with("| met |"), "{r}");
    // No bound (an older result): judged on the rate alone.
    let (r, md) = launch(15.0, 14.5, None);
    assert_missed(&r, "14.5/s per core");
    assert!(
        !r.contains("guest's work") && !md.contains("The bound"),
        "{r}"
    );
}

/// The kernel baseline scenario (no VM) is shown beside the interference
/// targets as their bound, and judges nothing.
#[test]
fn interference_shows_the_kernel_baseline() {
    let dir = scratch("interference-baseline");
    let mut v = interference_fixture(2.0, 0.2);
    v["scenarios"] = json!([
        scenario_fixture("teardown", 2.0, 0.2, "missed"),
        scenario_fixture("munmap", 3.4, 0.25, "baseline"),
    ]);
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    assert_missed(
        row(
            &md,
            &[
                "interference",
                "a noisy neighbour raises a victim's fault p99 by ≤ 10 %",
            ],
        ),
        "+200.0 % (kernel baseline, no VM: +340.0 %)",
    );
    assert_missed(
        row(
            &md,
            &[
                "interference",
                "a noisy neighbour slows a victim's loop by ≤ 10 %",
            ],
        ),
        "+20.0 % (kernel baseline, no VM: +25.0 %)",
    );
    assert!(
        md.contains("*Kernel baseline* (`munmap`): the munmap event."),
        "{md}"
    );
    row(&md, &["munmap", "the munmap event", "+340.0 %"]);
}

/// The run-queue wait diagnostic shows in the scenario table with its
/// quiet and event means and its per-round change; a result saved before
/// it existed shows it as not measured, and it judges nothing.
#[test]
fn interference_shows_the_run_queue_wait_diagnostic() {
    let dir = scratch("interference-runq");
    let mut v = interference_fixture(0.05, 0.02);
    let mut teardown = scenario_fixture("teardown", 0.05, 0.02, "met");
    teardown["victim_runq_wait_increase"] = json!(3.0);
    teardown["victim_runq_wait_increase_rounds"] = json!({"median": 3.0, "min": 2.5, "max": 3.5});
    teardown["runq_wait_us_quiet"] = json!({"median": 3.0, "min": 2.9, "max": 3.1});
    teardown["runq_wait_us_event"] = json!({"median": 12.0, "min": 10.0, "max": 14.0});
    v["scenarios"] = json!([teardown, scenario_fixture("munmap", 3.4, 0.25, "baseline"),]);
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    let t = row(&md, &["teardown", "the teardown event"]);
    assert!(
        t.contains("| 3.0 → 12.0 µs, +300.0 % [+250.0 .. +350.0] |"),
        "{t}"
    );
    let m = row(&md, &["munmap", "the munmap event"]);
    assert!(m.contains("| not measured |"), "{m}");
    // A diagnostic: the fault target stays met on the fault figure alone.
    let f = row(
        &md,
        &[
            "interference",
            "a noisy neighbour raises a victim's fault p99 by ≤ 10 %",
        ],
    );
    assert!(!f.contains("missed"), "{f}");
}

/// The idle-priority release baseline (no VM: the teardown's release by a
/// plain process) bounds the teardown scenario: a figure it alone raised
/// by more than 10 % is retired for the teardown; the balloon's inflate,
/// a different release, keeps its verdict; a baseline under 10 % retires
/// nothing.
#[test]
fn interference_target_is_judged_against_the_idle_release_bound() {
    let dir = scratch("interference-idle-bound");
    let fault_row = "a noisy neighbour raises a victim's fault p99 by ≤ 10 %";
    let loop_row = "a noisy neighbour slows a victim's loop by ≤ 10 %";
    let mut v = interference_fixture(0.245, 0.2);
    v["scenarios"] = json!([
        scenario_fixture("teardown", 0.245, 0.2, "missed"),
        scenario_fixture("balloon", 0.08, 0.02, "met"),
        scenario_fixture("munmap", 3.4, 0.25, "baseline"),
        // Fault p99 +14.5 % with no VM: out of reach for the teardown;
        // the loop dropped 5 %: that target keeps its verdict.
        scenario_fixture("idle-release", 0.145, 0.05, "baseline"),
    ]);
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    row(
        &md,
        &[
            "interference",
            fault_row,
            "+24.5 % (kernel baselines, no VM: process killed +340.0 %, idle-priority release +14.5 %)",
            "retired: kernel bound",
        ],
    );
    assert_missed(
        row(&md, &["interference", loop_row]),
        "+20.0 % (kernel baselines, no VM: process killed +25.0 %, idle-priority release +5.0 %)",
    );
    assert!(
        md.contains("*Kernel baseline* (`munmap`): the munmap event.")
            && md.contains("*Idle-priority release* (`idle-release`): the idle-release event."),
        "{md}"
    );
    row(&md, &["idle-release", "the idle-release event", "+14.5 %"]);

    // The balloon missed too: the teardown's baseline does not bound it.
    v["victim_fault_p99_increase"] = json!(0.38);
    v["scenarios"][1] = scenario_fixture("balloon", 0.38, 0.02, "missed");
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    assert_missed(
        row(&md, &["interference", fault_row]),
        "+38.0 % (kernel baselines, no VM: process killed +340.0 %, idle-priority release +14.5 %)",
    );

    // The baseline under 10 %: the target was reachable, and is missed.
    v["victim_fault_p99_increase"] = json!(0.245);
    v["scenarios"][1] = scenario_fixture("balloon", 0.08, 0.02, "met");
    v["scenarios"][3] = scenario_fixture("idle-release", 0.08, 0.05, "baseline");
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    assert_missed(
        row(&md, &["interference", fault_row]),
        "+24.5 % (kernel baselines, no VM: process killed +340.0 %, idle-priority release +8.0 %)",
    );
}

/// The balloon-sized release baseline (no VM: the balloon device's
/// release by a plain process) bounds the balloon scenario as the
/// idle-priority release bounds the teardown: a balloon figure within 10
/// points of it is retired where it alone missed 10 %; one further above
/// it is VM A's own cost, and missed.
#[test]
fn interference_balloon_is_judged_against_its_own_release_bound() {
    let dir = scratch("interference-balloon-bound");
    let fault_row = "a noisy neighbour raises a victim's fault p99 by ≤ 10 %";
    let mut v = interference_fixture(0.28, 0.03);
    v["scenarios"] = json!([
        scenario_fixture("teardown", 0.08, 0.02, "met"),
        scenario_fixture("balloon", 0.28, 0.03, "missed"),
        scenario_fixture("munmap", 3.4, 0.25, "baseline"),
        scenario_fixture("balloon-release", 0.246, 0.02, "baseline"),
    ]);
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    row(
        &md,
        &[
            "interference",
            fault_row,
            "+28.0 % (kernel baselines, no VM: process killed +340.0 %, balloon-sized release at nice 19 +24.6 %)",
            "retired: kernel bound",
        ],
    );
    assert!(
        md.contains("*Balloon-sized release* (`balloon-release`): the balloon-release event."),
        "{md}"
    );
    row(
        &md,
        &["balloon-release", "the balloon-release event", "+24.6 %"],
    );

    // More than 10 points above its bound: the rest is VM A's, missed.
    v["victim_fault_p99_increase"] = json!(0.45);
    v["scenarios"][1] = scenario_fixture("balloon", 0.45, 0.03, "missed");
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    assert_missed(
        row(&md, &["interference", fault_row]),
        "+45.0 % (kernel baselines, no VM: process killed +340.0 %, balloon-sized release at nice 19 +24.6 %)",
    );

    // The teardown's bound does not retire the balloon's figure.
    v["victim_fault_p99_increase"] = json!(0.28);
    v["scenarios"][1] = scenario_fixture("balloon", 0.28, 0.03, "missed");
    v["scenarios"][3] = scenario_fixture("idle-release", 0.246, 0.02, "baseline");
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    assert_missed(
        row(&md, &["interference", fault_row]),
        "+28.0 % (kernel baselines, no VM: process killed +340.0 %, idle-priority release +24.6 %)",
    );
}

/// A scenario's figures are shown with the range of their rounds; a loop
/// rate drop is shown as a negative change, its range turned with it.
#[test]
fn interference_shows_the_rounds_range() {
    let dir = scratch("interference-rounds");
    let mut v = interference_fixture(0.2, 0.05);
    let mut sc = scenario_fixture("teardown", 0.2, 0.05, "missed");
    sc["victim_fault_p99_increase_rounds"] = json!({"median": 0.2, "min": 0.05, "max": 0.5});
    sc["victim_loop_rate_drop_rounds"] = json!({"median": 0.05, "min": 0.01, "max": 0.08});
    v["scenarios"] = json!([sc, scenario_fixture("balloon", 0.1, 0.0, "met")]);
    write(&dir, "interference.json", &v);
    let (out, md) = report_from(&dir, "interference");
    assert!(out.status.success(), "{}", text(&out));
    row(
        &md,
        &[
            "teardown",
            "the teardown event",
            "+20.0 % [+5.0 .. +50.0]",
            "+0.0 %",
            "-5.0 % [-8.0 .. -1.0]",
        ],
    );
    // A result saved before the ranges existed shows the figures alone.
    row(&md, &["balloon", "the balloon event", "+10.0 %", "+0.0 %"]);
}

#[test]
fn fault_and_interference_verdict_boundaries() {
    let dir = scratch("fault-interference");
    let fault_row = |md: &str| -> String {
        row(
            md,
            &["fault", "demand-fault p99 under an unmap storm ≤ 2× quiet"],
        )
        .to_string()
    };
    // Exactly 2× quiet is met; just above is missed.
    write(&dir, "fault.json", &fault_fixture(20.0, 40.0));
    write(&dir, "interference.json", &interference_fixture(0.10, 0.10));
    let (out, md) = report_from(&dir, "fault,interference");
    assert!(out.status.success(), "{}", text(&out));
    let r = fault_row(&md);
    assert!(
        r.contains("2.00× (40.0 µs storm / 20.0 µs quiet)") && r.ends_with("| met |"),
        "{r}"
    );
    row(&md, &["quiet", "5.0", "20.0", "60.0", "10000"]);
    row(&md, &["unmap storm", "10.0", "40.0", "120.0", "9000"]);
    for (t, m) in [
        (
            "a noisy neighbour raises a victim's fault p99 by ≤ 10 %",
            "+10.0 %",
        ),
        (
            "a noisy neighbour slows a victim's loop by ≤ 10 %",
            "+10.0 %",
        ),
    ] {
        row(&md, &["interference", t, m, "met"]);
    }
    write(&dir, "fault.json", &fault_fixture(20.0, 40.2));
    write(
        &dir,
        "interference.json",
        &interference_fixture(0.11, 0.105),
    );
    let (out, md) = report_from(&dir, "fault,interference");
    assert!(
        out.status.success(),
        "a missed target is a result: {}",
        text(&out)
    );
    assert_missed(&fault_row(&md), "2.01×");
    assert_missed(
        row(
            &md,
            &[
                "interference",
                "a noisy neighbour raises a victim's fault p99 by ≤ 10 %",
            ],
        ),
        "+11.0 %",
    );
    assert_missed(
        row(
            &md,
            &[
                "interference",
                "a noisy neighbour slows a victim's loop by ≤ 10 %",
            ],
        ),
        "+10.5 %",
    );
    // No quiet p99: no ratio, not measured (not a division by zero).
    write(&dir, "fault.json", &fault_fixture(0.0, 40.0));
    let (_, md) = report_from(&dir, "fault");
    assert!(
        fault_row(&md).contains("not measured: quiet p99 is 0 µs: no ratio"),
        "{md}"
    );
    // A renamed field fails loudly, naming it.
    let mut f = fault_fixture(20.0, 30.0);
    let p99 = f.as_object_mut().expect("object").remove("p99_us_storm");
    f["p99_storm_us"] = p99.expect("fixture field");
    write(&dir, "fault.json", &f);
    let (out, md) = report_from(&dir, "fault");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        md.contains("not measured: fault.json: missing field `p99_us_storm`"),
        "{md}"
    );
}

/// Where a plain storm (no monitor) alone raises the victim's p99 past the
/// target, the storm's ratio is judged against it: within 10 % of it
/// retired, above missed; a baseline under the target changes nothing.
#[test]
fn fault_target_is_judged_against_the_plain_storm_baseline() {
    const T: &str = "demand-fault p99 under an unmap storm ≤ 2× quiet";
    let dir = scratch("fault-baseline");
    let judge = |storm: f64, plain: Option<f64>| {
        let mut f = fault_fixture(10.0, storm);
        if let Some(p) = plain {
            f["p99_us_plain_storm"] = json!(p);
            f["p99_ratio_plain_storm"] = json!(p / 10.0);
            f["p99_us_plain_storm_spread"] = json!({"median": p, "min": p - 1.0, "max": p + 2.0});
        }
        write(&dir, "fault.json", &f);
        let (out, md) = report_from(&dir, "fault");
        assert!(out.status.success(), "{}", text(&out));
        (row(&md, &["fault", T]).to_string(), md)
    };
    // The baseline alone 2.20×: 2.42× (+10 %) is retired, 2.43× missed.
    let (r, md) = judge(24.2, Some(22.0));
    assert!(
        r.contains(
            "2.42× (24.2 µs storm / 10.0 µs quiet); baseline, a plain storm with no monitor: 2.20×"
        ) && r.ends_with("| retired: kernel bound |"),
        "{r}"
    );
    assert!(md.contains("**Retired: \"demand-fault p99"), "{md}");
    row(
        &md,
        &[
            "baseline: plain storm, no monitor",
            "—",
            "22.0 (21.0 .. 24.0 over rounds)",
        ],
    );
    let (r, md) = judge(24.3, Some(22.0));
    assert_missed(&r, "2.43×");
    assert!(!md.contains("**Retired"), "{md}");
    // A baseline within the target: the target stands as it is.
    let (r, _) = judge(21.0, Some(19.0));
    assert_missed(&r, "baseline, a plain storm with no monitor: 1.90×");
    let (r, _) = judge(19.0, Some(25.0));
    assert!(r.ends_with("| met |"), "{r}");
    // Results without the phase: judged as before.
    let (r, md) = judge(21.0, None);
    assert_missed(&r, "2.10× (21.0 µs storm / 10.0 µs quiet)");
    assert!(!md.contains("baseline: plain storm"), "{md}");
}

/// The storm target shows its bound, the lock-free page map's own share
/// under the same storm, beside the walk's. Where the bound itself keeps
/// less than 0.9×, the walk is judged against it: retired while it keeps
/// 0.9× of the bound's share, missed below; where the bound keeps 0.9× or
/// more, the target stands as it is.
#[test]
fn walk_storm_target_is_judged_against_the_page_map_bound() {
    let judge_rounds = |name: &str, alone: f64, bound: Option<f64>, per_round: Option<f64>| {
        let dir = scratch(name);
        let mut w = walk_fixture();
        w["under_unmap_ratio"] = json!(alone);
        if let Some(b) = bound {
            w["page_map_under_unmap_per_s"] = json!(180e6);
            w["page_map_under_unmap_ratio"] = json!(b);
        }
        if let Some(q) = per_round {
            w["under_unmap_vs_page_map_bound"] = json!(q);
        }
        write(&dir, "walk.json", &w);
        let (out, md) = report_from(&dir, "walk");
        assert!(out.status.success(), "{}", text(&out));
        md
    };
    let judge = |name: &str, alone: f64, bound: Option<f64>| judge_rounds(name, alone, bound, None);
    let target = "fast walk under an unmap storm ≥ 0.9× alone";
    let bound = |a: &str, b: &str| {
        format!("{a} (bound: a lock-free flat page map under the same storm keeps {b})")
    };
    // 0.70 >= 0.9 * 0.75: as close to the bound as the target asks.
    let md = judge("walk-bound-retired", 0.70, Some(0.75));
    row(
        &md,
        &[
            "walk",
            target,
            &bound("0.70×", "0.75×"),
            "retired: hardware bound",
        ],
    );
    assert!(
        md.contains("**Retired: \"fast walk under an unmap storm"),
        "{md}"
    );
    row(&md, &["page map, no lock, under storm", "180.0"]);
    // 0.60 < 0.9 * 0.75: the walk loses more than the bound explains.
    let md = judge("walk-bound-missed", 0.60, Some(0.75));
    row(
        &md,
        &["walk", target, &bound("0.60×", "0.75×"), "**missed**"],
    );
    assert!(!md.contains("**Retired"), "{md}");
    // A bound within the target: the target stands.
    let md = judge("walk-bound-high", 0.85, Some(0.95));
    row(
        &md,
        &["walk", target, &bound("0.85×", "0.95×"), "**missed**"],
    );
    let md = judge("walk-bound-met", 0.92, Some(0.75));
    row(&md, &["walk", target, &bound("0.92×", "0.75×"), "met"]);
    // Results saved before the bound was measured: judged as before.
    let md = judge("walk-bound-absent", 0.70, None);
    row(&md, &["walk", target, "0.70×", "**missed**"]);
    // With the per-round figure, it decides, not the medians' quotient:
    // 0.60 / 0.75 would miss, but round by round the walk kept 0.95x of
    // the bound's share; and the other way round.
    let per_round = |a: &str, b: &str, q: &str| {
        format!(
            "{}; the walk kept {q} of the bound's share, median of the rounds",
            bound(a, b)
        )
    };
    let md = judge_rounds("walk-rounds-retired", 0.60, Some(0.75), Some(0.95));
    row(
        &md,
        &[
            "walk",
            target,
            &per_round("0.60×", "0.75×", "0.95×"),
            "retired: hardware bound",
        ],
    );
    let md = judge_rounds("walk-rounds-missed", 0.70, Some(0.75), Some(0.85));
    row(
        &md,
        &[
            "walk",
            target,
            &per_round("0.70×", "0.75×", "0.85×"),
            "**missed**",
        ],
    );
}

/// The vm-memory view has goal 1's targets too. Against vm-memory's bare
/// lookup it is judged like for like where vm-memory's own `get_slices`
/// (no table) keeps less than 0.8× of that lookup: retired while the view
/// keeps 0.8× of vm-memory's own `get_slices`, missed below.
#[test]
fn walk_view_targets_are_judged_against_vm_memory_own_get_slices() {
    let judge = |name: &str, vs_vm: f64, slices: Option<(f64, f64)>| {
        let dir = scratch(name);
        let mut w = walk_fixture();
        w["guest_memory_view_vs_vm_memory"] = json!(vs_vm);
        w["guest_memory_view_vs_rwlock"] = json!(1.3);
        if let Some((bound, vs_slices)) = slices {
            w["vm_memory_slices_per_s"] = json!(110e6);
            w["vm_memory_slices_vs_vm_memory"] = json!(bound);
            w["guest_memory_view_vs_vm_memory_slices"] = json!(vs_slices);
        }
        write(&dir, "walk.json", &w);
        let (out, md) = report_from(&dir, "walk");
        assert!(out.status.success(), "{}", text(&out));
        md
    };
    let target =
        "vm-memory view (GuestMemory::get_slices) ≥ 0.8× vm-memory's get_host_address (one region)";
    let bound = |a: &str, b: &str, c: &str| {
        format!("{a} (bound: vm-memory's own get_slices keeps {b} of its get_host_address; the view {c} of vm-memory's get_slices)")
    };
    let md = judge("view-retired", 0.43, Some((0.49, 0.86)));
    row(
        &md,
        &[
            "walk",
            target,
            &bound("0.43×", "0.49×", "0.86×"),
            "retired: vm-memory bound",
        ],
    );
    assert!(md.contains("**Retired: \"vm-memory view"), "{md}");
    row(&md, &["vm-memory get_slices, one region", "110.0"]);
    row(
        &md,
        &[
            "walk",
            "vm-memory view ≥ 1.2× the RwLock<Vec> page map",
            "1.30×",
            "met",
        ],
    );
    // The view loses more than vm-memory's own call explains.
    let md = judge("view-missed", 0.43, Some((0.49, 0.70)));
    row(
        &md,
        &[
            "walk",
            target,
            &bound("0.43×", "0.49×", "0.70×"),
            "**missed**",
        ],
    );
    assert!(!md.contains("**Retired: \"vm-memory view"), "{md}");
    // A bound within the target: the target stands.
    let md = judge("view-bound-high", 0.75, Some((0.85, 0.88)));
    row(
        &md,
        &[
            "walk",
            target,
            &bound("0.75×", "0.85×", "0.88×"),
            "**missed**",
        ],
    );
    let md = judge("view-met", 0.82, Some((0.70, 1.17)));
    row(
        &md,
        &["walk", target, &bound("0.82×", "0.70×", "1.17×"), "met"],
    );
    // Results saved before vm-memory's own get_slices was measured.
    let md = judge("view-no-bound", 0.43, None);
    row(&md, &["walk", target, "0.43×", "**missed**"]);
}

#[test]
fn a_bench_missing_from_gmm_is_reported_as_absent_not_failed() {
    // --from a directory without fault.json / interference.json (results
    // saved before those benches existed).
    let dir = scratch("absent");
    write(&dir, "walk.json", &walk_fixture());
    let (out, md) = report_from(&dir, "walk,fault,interference");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        md.contains("not measured: `gmm bench fault` is not in this gmm binary"),
        "{md}"
    );
    row(
        &md,
        &[
            "interference",
            "a noisy neighbour slows a victim's loop by ≤ 10 %",
            "—",
            "not measured: `gmm bench interference` is not in this gmm binary (results saved by an older gmm); rerun the bench to measure",
        ],
    );
}

/// FIXTURE: a `gmm soak --json` line (figures typed in for the test).
fn soak_fixture(leaked_fds: u64) -> Value {
    let sample =
        |rss: u64, fds: u64| json!({"rss_bytes": rss, "fds": fds, "threads": 1, "table_pages": 0});
    json!({
        "tool": "soak", "minutes": 10.0, "elapsed_s": 600.4, "cycles": 900, "warmup_cycles": 6,
        "vcpus": 2, "sizes_bytes": [64 * MIB, 128 * MIB],
        "variants": ["anon-4K", "anon-THP", "memfd-4K"], "inject_leak": null,
        "baseline": sample(6 * MIB, 6), "end": sample(6 * MIB + 200 * 1024, 6 + leaked_fds),
        "excess_max": {"rss_bytes": 300 * 1024, "fds": leaked_fds, "threads": 0, "table_pages": 0},
        "rss_tolerance_bytes": 4 * MIB, "rss_excess_max_bytes": 300 * 1024,
        "leaked_rss_bytes": 0, "leaked_fds": leaked_fds, "leaked_threads": 0,
        "leaked_table_pages": 0, "cycles_leaking": leaked_fds, "first_leak_cycle": null,
        "settle_max_ms": 0.2, "cycle_ms": {"p50": 600.0, "p90": 800.0, "max": 1500.0},
        "demand_faults": 1000, "pages_inflated": 2000, "pages_deflated": 2000,
        "pages_reported": 1000, "error": null, "ok": leaked_fds == 0
    })
}

#[test]
fn soak_section_and_its_verdict() {
    let dir = scratch("soak");
    write(&dir, "soak.json", &soak_fixture(0));
    let (out, md) = report_from(&dir, "soak");
    assert!(out.status.success(), "{}", text(&out));
    let target = "soak: RSS, open fds, threads and table pages back to their baseline after every cycle (RSS within the tolerance)";
    row(
        &md,
        &[
            "soak",
            target,
            "900 cycles: leaked RSS 0 B, fds 0, threads 0, table pages 0",
            "met",
        ],
    );
    row(&md, &["open fds", "6", "6", "0", "0"]);
    assert!(
        md.contains("900 measured cycles after 6 warm-up cycles"),
        "{md}"
    );

    write(&dir, "soak.json", &soak_fixture(2));
    let (_, md) = report_from(&dir, "soak");
    assert_missed(
        row(&md, &["soak", target]),
        "900 cycles: leaked RSS 0 B, fds 2, threads 0, table pages 0",
    );

    // Results saved before the soak existed: not in this binary, no error.
    std::fs::remove_file(dir.join("soak.json")).expect("remove");
    let (out, md) = report_from(&dir, "soak");
    assert!(out.status.success(), "{}", text(&out));
    assert!(md.contains("`gmm soak` is not in this gmm binary"), "{md}");
}

/// One 4 KiB row of `gmm bench teardown` for the 0.6× target: the VM's
/// memory back at `ratio` × munmap (100 ms), its split baseline (two
/// plain threads, no VM) at `split` × munmap.
fn teardown_4k_size(size: u64, backing: &str, ratio: f64, split: Option<f64>) -> Value {
    let mut r = teardown_size(size, 0.1, 100.0 * ratio, 100.0, None);
    r["backing"] = json!(backing);
    r["page_size"] = json!("4K");
    r["memory_back_within_0_6x_munmap"] = json!(ratio <= 0.6);
    r["split_ms"] = json!(split.map(|s| 100.0 * s));
    r["split_threads"] = json!(split.map(|_| 2));
    r["split_ratio_vs_munmap"] = json!(split);
    r
}

/// The 0.6× target at 4 KiB leaves is judged row by row against its
/// kernel bound, the split baseline of the same row: a row whose split
/// itself took more than 0.6× munmap is retired, one whose split stayed
/// under it keeps its verdict, and one without a split is judged as is.
#[test]
fn teardown_4k_target_is_judged_against_its_split_bound() {
    let dir = scratch("teardown-bound");
    let mut td = teardown_fixture();
    td["sizes"] = json!([
        // The VM at 0.70×, the split at 0.65×: out of reach, retired.
        teardown_4k_size(GIB, "anon", 0.70, Some(0.65)),
        // The split at 0.55×: 0.6× was reachable; the VM at 0.72× missed.
        teardown_4k_size(2 * GIB, "anon", 0.72, Some(0.55)),
    ]);
    write(&dir, "teardown.json", &td);
    let (out, md) = report_from(&dir, "teardown");
    assert!(out.status.success(), "{}", text(&out));
    let r = row(&md, &["1 GiB", "anon 4K"]);
    assert!(
        r.contains("| 65.0 (2) | 0.65× |") && r.contains("| retired: kernel bound |"),
        "{r}"
    );
    let r = row(&md, &["2 GiB", "anon 4K"]);
    assert!(
        r.contains("| 55.0 (2) | 0.55× |") && r.contains("| **missed** | met |"),
        "{r}"
    );
    // Results saved before the split beside KVM existed show a dash.
    assert!(r.contains("| 0.55× | — |"), "{r}");
    // One missed row is enough for the target to be missed.
    row(
        &md,
        &[
            "teardown",
            "memory back ≤ 0.6× munmap at 4 KiB leaves from 1 GiB (2+ cores)",
            "worst 0.72× at 2 GiB anon; kernel bound (plain threads, no VM: *split*) 0.55× .. 0.65× at those rows",
            "**missed**",
        ],
    );
    assert!(
        md.contains("**\"≤ 0.6× munmap\" against its kernel bound.**")
            && md.contains("1 GiB anon: the VM 0.70×, the split 0.65×")
            && !md.contains("2 GiB anon: the VM"),
        "{md}"
    );

    // Every row's split above 0.6×: the target is retired, not missed.
    td["sizes"] = json!([
        teardown_4k_size(GIB, "anon", 0.70, Some(0.65)),
        teardown_4k_size(GIB, "memfd", 0.62, Some(0.61)),
    ]);
    write(&dir, "teardown.json", &td);
    let (out, md) = report_from(&dir, "teardown");
    assert!(out.status.success(), "{}", text(&out));
    row(
        &md,
        &[
            "teardown",
            "memory back ≤ 0.6× munmap at 4 KiB leaves from 1 GiB (2+ cores)",
            "worst 0.70× at 1 GiB anon; kernel bound (plain threads, no VM: *split*) 0.61× .. 0.65× at those rows",
            "retired: kernel bound",
        ],
    );

    // A VM within 0.6× is met whatever the split did; a row without a
    // split (one core) is judged on its own figure.
    td["sizes"] = json!([
        teardown_4k_size(GIB, "anon", 0.58, Some(0.65)),
        teardown_4k_size(2 * GIB, "anon", 0.66, None),
    ]);
    write(&dir, "teardown.json", &td);
    let (out, md) = report_from(&dir, "teardown");
    assert!(out.status.success(), "{}", text(&out));
    let r = row(&md, &["1 GiB", "anon 4K"]);
    assert!(r.contains("| met | met |"), "{r}");
    let r = row(&md, &["2 GiB", "anon 4K"]);
    assert!(
        r.contains("| — | — |") && r.contains("| **missed** | met |"),
        "{r}"
    );
    row(
        &md,
        &[
            "teardown",
            "memory back ≤ 0.6× munmap at 4 KiB leaves from 1 GiB (2+ cores)",
            "worst 0.66× at 2 GiB anon; kernel bound (plain threads, no VM: *split*) 0.65× .. 0.65× at those rows",
            "**missed**",
        ],
    );
}

/// One 2 MiB row whose reclaim took `ratio` × munmap (1 ms) and, if
/// given, whose release beside KVM (one plain thread) took `kvm` × munmap.
fn teardown_thp_size(size: u64, ratio: f64, kvm: Option<f64>) -> Value {
    let mut r = teardown_size(size, 0.03, ratio, 1.0, None);
    r["page_size"] = json!("2M");
    r["split_kvm_ms"] = json!(kvm);
    r["split_kvm_ratio_vs_munmap"] = json!(kvm);
    r["split_kvm_threads"] = json!(kvm.map(|_| 1));
    r
}

/// "≤ 1.0× munmap" is judged row by row against the release beside KVM:
/// where that alone took more than munmap and the VM kept within 1.1× of
/// it, the row is retired; a VM further above it, or a row whose release
/// beside KVM stayed under munmap, is missed; a VM within 1.0× is met.
#[test]
fn teardown_1x_target_is_judged_against_the_release_beside_kvm() {
    const T: &str = "memory back ≤ 1.0× bare munmap (every size, backing and leaf)";
    let dir = scratch("teardown-kvm-bound");
    let mut td = teardown_fixture();
    let judge = |td: &mut Value, sizes: Value| {
        td["sizes"] = sizes;
        write(&dir, "teardown.json", td);
        let (out, md) = report_from(&dir, "teardown");
        assert!(out.status.success(), "{}", text(&out));
        md
    };
    // 1.20× against 1.25× beside KVM: retired; 0.8× at 1 GiB: met.
    let md = judge(
        &mut td,
        json!([
            teardown_thp_size(256 * MIB, 1.20, Some(1.25)),
            teardown_thp_size(GIB, 0.80, Some(0.85)),
        ]),
    );
    let r = row(&md, &["256 MiB", "anon 2M"]);
    assert!(
        r.contains("| 1.25 (1.25×, 1 thr.) |") && r.contains("| retired: kernel bound | — |"),
        "{r}"
    );
    let r = row(&md, &["1 GiB", "anon 2M"]);
    assert!(r.contains("| met | — |"), "{r}");
    let t = row(&md, &["teardown", T]);
    assert!(
        t.contains("worst 1.20× at 256 MiB; retired (kernel bound) at 256 MiB anon 2M: the VM 1.20×, the release beside KVM 1.25×")
            && t.ends_with("| met |"),
        "{t}"
    );
    assert!(
        md.contains("**\"≤ 1.0× munmap\" against its kernel bound.**")
            && md.contains(
                "the same release by plain threads beside KVM took 1.25 ms (1.25× munmap)"
            ),
        "{md}"
    );
    // Every row retired: the target is retired.
    let md = judge(
        &mut td,
        json!([teardown_thp_size(256 * MIB, 1.10, Some(1.05))]),
    );
    assert!(
        row(&md, &["teardown", T]).ends_with("| retired: kernel bound |"),
        "{md}"
    );
    // The VM more than 1.1× the release beside KVM: the monitor's, missed.
    let md = judge(
        &mut td,
        json!([teardown_thp_size(256 * MIB, 1.30, Some(1.10))]),
    );
    let r = row(&md, &["256 MiB", "anon 2M"]);
    assert!(
        r.contains("| 1.30× |") && r.contains("| **missed** | — |"),
        "{r}"
    );
    assert_missed(row(&md, &["teardown", T]), "worst 1.30× at 256 MiB");
    assert!(!md.contains("against its kernel bound"), "{md}");
    // The release beside KVM under munmap: 1.0× was reachable, missed;
    // without one (older results) the row is judged on its own figure.
    let md = judge(
        &mut td,
        json!([
            teardown_thp_size(256 * MIB, 1.05, Some(0.95)),
            teardown_thp_size(GIB, 1.05, None),
        ]),
    );
    assert!(
        row(&md, &["256 MiB", "anon 2M"]).contains("| **missed** | — |"),
        "{md}"
    );
    assert!(
        row(&md, &["1 GiB", "anon 2M"]).contains("| **missed** | — |"),
        "{md}"
    );
}

/// The split beside KVM (a VM's own RAM released by plain threads while
/// its KVM VM exists) is shown beside the split, with its ratio to munmap,
/// and is a figure only: the 0.6× verdict stays judged against the split
/// without a VM.
#[test]
fn teardown_shows_the_split_beside_kvm() {
    let dir = scratch("teardown-split-kvm");
    let mut td = teardown_fixture();
    let mut one = teardown_4k_size(GIB, "anon", 0.72, Some(0.55));
    one["split_kvm_ms"] = json!(70.0);
    one["split_kvm_ratio_vs_munmap"] = json!(0.70);
    td["sizes"] = json!([one]);
    write(&dir, "teardown.json", &td);
    let (out, md) = report_from(&dir, "teardown");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        md.contains("| split ms (threads) | kernel bound: split / munmap | split beside KVM ms (/ munmap) |"),
        "{md}"
    );
    let r = row(&md, &["1 GiB", "anon 4K"]);
    assert!(
        r.contains("| 55.0 (2) | 0.55× | 70.0 (0.70×) |") && r.contains("| **missed** | met |"),
        "{r}"
    );
    // Every table row has as many cells as the header.
    let cells = |l: &str| l.matches('|').count();
    let table: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("| guest size |"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(table.len() >= 3, "{md}");
    assert!(
        table.iter().all(|l| cells(l) == cells(table[0])),
        "{table:#?}"
    );
    // The host-populated section keeps the naive and peer columns.
    for kept in [
        "naive ms",
        "vmm process exit ms",
        "QEMU quit→exit ms",
        "faster than QEMU",
    ] {
        assert!(table[0].contains(kept), "{}", table[0]);
    }
}

/// The guest-populated teardown (`teardown-guest`) is its own section with
/// its own plot and targets, without the QEMU target (no peers run there);
/// results saved before the step existed read as not measured in that
/// run, without failing the report.
#[test]
fn teardown_guest_is_its_own_section() {
    let dir = scratch("teardown-guest");
    let (out, md) = report_from(&dir, "teardown-guest");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        md.contains("## VM teardown after the guest wrote its RAM")
            && md.contains("not measured in that run"),
        "{md}"
    );

    let mut td = teardown_fixture();
    td["populate"] = json!("guest");
    td["page_size"] = json!("4K");
    td["qemu"] = json!(null);
    td["qemu_skipped"] = json!("--no-qemu");
    td["process_measured"] = json!(false);
    let mut one = teardown_4k_size(GIB, "anon", 0.72, Some(0.55));
    one["split_kvm_ms"] = json!(66.0);
    one["split_kvm_ratio_vs_munmap"] = json!(0.66);
    one["reclaim_cores"] = json!(1.21);
    one["split_cores"] = json!(1.9);
    one["split_kvm_cores"] = json!(1.85);
    // `--no-naive`, as the report runs this step.
    one["naive_ms"] = json!(0.0);
    one["naive_ms_all"] = json!([]);
    td["sizes"] = json!([one]);
    write(&dir, "teardown-guest.json", &td);
    let (out, md) = report_from(&dir, "teardown-guest");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        md.contains(
            "## VM teardown after the guest wrote its RAM (`gmm bench teardown --populate guest`)"
        ) && md.contains("RAM populated by the guest")
            && md.contains("its MMU notifier zaps those entries"),
        "{md}"
    );
    // No naive strategy and no peers ran: the section leaves their columns
    // and their sentences out, and every row has the header's cells.
    let r = row(&md, &["1 GiB", "anon 4K"]);
    assert!(
        r.ends_with(
            "| 55.0 (2) | 0.55× | 66.0 (0.66×) | 1.21 / 1.90 / 1.85 | met | **missed** | met |"
        ),
        "{r}"
    );
    let header = md
        .lines()
        .find(|l| l.starts_with("| guest size |"))
        .expect("the teardown table's header");
    for gone in ["naive", "vmm process exit", "QEMU"] {
        assert!(!header.contains(gone), "{header}");
    }
    assert_eq!(
        header.matches(" | ").count(),
        r.matches(" | ").count(),
        "{header}\n{r}"
    );
    assert!(!md.contains("*naive*") && !md.contains("Peers:"), "{md}");
    row(
        &md,
        &[
            "teardown-guest",
            "memory back ≤ 0.6× munmap at 4 KiB leaves from 1 GiB (2+ cores)",
            "worst 0.72× at 1 GiB anon; kernel bound (plain threads, no VM: *split*) 0.55× .. 0.55× at those rows",
            "**missed**",
        ],
    );
    assert!(
        !md.contains("| teardown-guest | vmm process exits sooner than QEMU")
            && !md.contains("QEMU: not measured"),
        "{md}"
    );
    let svg = read(&dir.join("reclaim-teardown-guest.svg"));
    assert!(svg.contains("<svg"), "{svg}");
}

/// The teardown and unmap sections split their timed repetitions by the
/// host's free page reporting during them, where the bench recorded it,
/// and say nothing where it did not (older results, or a kernel without
/// the counter).
#[test]
fn host_free_page_reporting_is_read_against_the_timed_sections() {
    let dir = scratch("host-reporting");
    let mut td = teardown_fixture();
    let mut one = teardown_size(GIB, 0.05, 90.0, 85.0, None);
    one["destroy_ms_all"] = json!([0.05, 0.6, 0.04]);
    one["host_reported_mib_all"] = json!([0.0, 512.0, 0.0]);
    let mut two = teardown_size(2 * GIB, 0.05, 180.0, 170.0, None);
    two["destroy_ms_all"] = json!([0.8, 0.06]);
    two["host_reported_mib_all"] = json!([512.0, 0.0]);
    td["sizes"] = json!([one, two]);
    td["host_reported_mib"] = json!(3584.0);
    write(&dir, "teardown.json", &td);
    let (out, md) = report_from(&dir, "teardown");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        md.contains("**The host's free page reporting.** While this bench ran, the host kernel reported 3.5 GiB of free memory to its hypervisor. In 2 of 5 VM teardowns (all rows) the host kernel reported free memory to its hypervisor (1.00 GiB in all): `destroy` took a median of 0.700 ms (max 0.800) in those, against a median of 0.050 ms (max 0.060) in the others."),
        "{md}"
    );

    let mut un = unmap_fixture();
    un["runs"][1]["max_lock_hold_us_all"] = json!([40.0, 240.0]);
    un["runs"][1]["host_reported_mib_all"] = json!([0.0, 2048.0]);
    un["runs"][0]["host_reported_mib"] = json!(512.0);
    un["runs"][1]["host_reported_mib"] = json!(4096.0);
    write(&dir, "unmap.json", &un);
    let (out, md) = report_from(&dir, "unmap");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        md.contains("reported 4.5 GiB of free memory to its hypervisor. In 1 of 2 timed gathers (all sizes) the host kernel reported free memory to its hypervisor (2.00 GiB in all): their longest lock hold was a median of 240.000 µs (max 240.000) in those, against a median of 40.000 µs (max 40.000) in the others."),
        "{md}"
    );

    // Results without the field: no paragraph.
    write(&dir, "teardown.json", &teardown_fixture());
    write(&dir, "unmap.json", &unmap_fixture());
    for only in ["teardown", "unmap"] {
        let (out, md) = report_from(&dir, only);
        assert!(out.status.success(), "{}", text(&out));
        assert!(!md.contains("free page reporting.**"), "{md}");
    }
}

/// A p99 taken from a power-of-two histogram can name a bucket bound above
/// the longest hold (few holds, the top two in one bucket): the report
/// caps it at the maximum, as the bench now does itself.
#[test]
fn unmap_p99_is_capped_at_the_longest_hold() {
    let dir = scratch("unmap-p99-cap");
    let mut un = unmap_fixture();
    un["runs"][0]["lock_hold_p99_us_upper"] = json!(131.072);
    write(&dir, "unmap.json", &un);
    let (out, md) = report_from(&dir, "unmap");
    assert!(out.status.success(), "{}", text(&out));
    let r = row(&md, &["256 MiB"]);
    assert!(r.contains("| 40.0 | 41.5 | 40.0 |"), "{r}");
}
