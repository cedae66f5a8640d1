//! `gmm stress`: the guest-mm stress harness as a tool.
//!
//! A thin wrapper over [`guest_mm::stress::run`]: walker threads translate
//! and read through the fast walk while mutator threads map, unmap, fault
//! in and re-protect real anonymous memory. The report's violation counters
//! must all be zero; the process exits non-zero otherwise.

use std::time::Duration;

use anyhow::{bail, Result};
use guest_mm::stress::{run, StressConfig, StressReport};

use crate::schema::StressResult;
use crate::units::human_bytes;

/// Options of `gmm stress`.
#[derive(clap::Args, Debug)]
pub struct StressArgs {
    /// How long to run, in seconds (fractions allowed).
    #[arg(long, default_value = "2", value_parser = crate::units::parse_seconds)]
    pub seconds: f64,
    /// Walker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// Mutator (map/unmap) threads; default max(1, threads / 2).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub mutators: Option<u32>,
    /// Real memory to map and unmap (e.g. 64M, 256M); at least 2 MiB per mutator.
    #[arg(long, default_value = "64M", value_parser = crate::units::parse_size)]
    pub mem: u64,
    /// Make every N-th gather batch allocation fail (forces the on-stack fallback).
    #[arg(long, default_value_t = 0)]
    pub fail_batch_every: u64,
    /// Entries the table lock covers before it is dropped and retaken.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub yield_entries: u32,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

fn to_json(a: &StressArgs, mutators: u32, r: &StressReport) -> StressResult {
    StressResult {
        tool: "stress".into(),
        seconds: a.seconds,
        walkers: a.threads,
        mutators,
        mem_bytes: a.mem,
        membarrier: crate::membarrier(),
        fail_batch_every: a.fail_batch_every,
        walks: r.walks,
        walks_ok: r.walks_ok,
        walks_per_s: r.walks as f64 / a.seconds,
        maps: r.maps,
        unmaps: r.unmaps,
        faults: r.faults,
        protects: r.protects,
        flushes: r.flushes,
        fallback_batches: r.fallback_batches,
        grace_periods: r.grace_periods,
        splits: r.splits,
        released_bytes: r.released_bytes,
        max_lock_hold_us: r.max_lock_hold_us,
        use_after_free: r.use_after_free,
        stale_translations: r.stale_translations,
        not_released: r.not_released,
        oracle_mismatch: r.oracle_mismatch,
        op_errors: r.op_errors,
        thread_panics: r.thread_panics,
        first_violation: r.first_violation.clone(),
        cache_hits: r.cache_hits,
        shootdowns: r.shootdowns,
        churns: r.churns,
        scans: r.scans,
        view_reads: r.view_reads,
        view_reads_ok: r.view_reads_ok,
        view_stale_reads: r.view_stale_reads,
        violations: r.violations(),
        rss_start_bytes: r.rss_start_bytes,
        rss_peak_bytes: r.rss_peak_bytes,
        rss_end_bytes: r.rss_end_bytes,
        region_resident_end_bytes: r.region_resident_end_bytes,
        table_pages_end: r.table_pages_end,
        ok: r.violations() == 0,
    }
}

/// Run `gmm stress`.
pub fn cmd(a: &StressArgs) -> Result<()> {
    let mutators = a.mutators.unwrap_or((a.threads / 2).max(1));
    let cfg = StressConfig {
        duration: Duration::from_secs_f64(a.seconds),
        walkers: a.threads as usize,
        mutators: mutators as usize,
        mem_bytes: a.mem,
        yield_entries: a.yield_entries,
        fail_batch_every: a.fail_batch_every,
    };
    eprintln!(
        "stress: {} walkers, {} mutators, {} of real memory, {:.1} s{}",
        a.threads,
        mutators,
        human_bytes(a.mem),
        a.seconds,
        if a.fail_batch_every > 0 {
            format!(", every {}th batch allocation fails", a.fail_batch_every)
        } else {
            String::new()
        }
    );
    let r = run(&cfg)?;
    let j = to_json(a, mutators, &r);
    let mut h = String::new();
    h += &format!(
        "walks        {:>12} ({} ok, {:.2} M/s)\n",
        r.walks,
        r.walks_ok,
        j.walks_per_s / 1e6
    );
    h += &format!(
        "mutations    {:>12} maps, {} unmaps, {} fault-ins, {} protects\n",
        r.maps, r.unmaps, r.faults, r.protects
    );
    h += &format!(
        "gather       {:>12} flushes, {} fallback batches, {} grace periods, {} splits\n",
        r.flushes, r.fallback_batches, r.grace_periods, r.splits
    );
    h += &format!(
        "released     {:>12}; max table-lock hold {:.1} us\n",
        human_bytes(r.released_bytes),
        r.max_lock_hold_us
    );
    h += &format!(
        "rss          start {}, peak {}, end {}; region resident at end {}; table pages at end {}\n",
        human_bytes(r.rss_start_bytes),
        human_bytes(r.rss_peak_bytes),
        human_bytes(r.rss_end_bytes),
        human_bytes(r.region_resident_end_bytes),
        r.table_pages_end
    );
    h += &format!(
        "caches       {:>12} hits, {} shootdowns; {} leaf-table churns, {} scans\n",
        r.cache_hits, r.shootdowns, r.churns, r.scans
    );
    h += &format!(
        "view         {:>12} GuestMemory reads ({} ok, {} stale)\n",
        r.view_reads, r.view_reads_ok, r.view_stale_reads
    );
    h += &format!(
        "violations   {:>12} (use-after-free {}, stale {}, not released {}, oracle mismatch {}, \
         operation errors {}, thread panics {})\n",
        r.violations(),
        r.use_after_free,
        r.stale_translations,
        r.not_released,
        r.oracle_mismatch,
        r.op_errors,
        r.thread_panics
    );
    if let Some(v) = &r.first_violation {
        h += &format!("first        {v}\n");
    }
    crate::say(a.json, &h);
    crate::emit_json(a.json, &j)?;
    if r.violations() > 0 {
        bail!("{} violations", r.violations());
    }
    Ok(())
}
