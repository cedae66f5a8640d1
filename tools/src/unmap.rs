//! `gmm bench unmap`: unmapping a large region through the gather against
//! three baselines measured in the same run, on the same memory.
//!
//! Strategies (each starts from a freshly re-touched, fully resident region):
//!
//! - **gather**: the region is registered as anonymous backing, mapped in a
//!   [`Stage2Table`] at 4 KiB (or 2 MiB) leaves, and unmapped through one
//!   [`guest_mm::Gather`]; the unmap and the gather's finish are timed.
//! - **limit**: one `madvise(MADV_DONTNEED)` over the whole region; no
//!   table work at all, so nothing can be faster.
//! - **per-page**: one `madvise` per 4 KiB page while holding a mutex
//!   (Cloud Hypervisor's pattern).
//! - **per-run**: the pages as a shuffled list of frame numbers, sorted,
//!   de-duplicated and merged into runs, one `madvise` per run, no batching
//!   (Firecracker's pattern); the sort and merge are timed too.
//!
//! Strategies are interleaved (rotated each repetition) and the median of
//! the repetitions is reported. Each strategy touches its region, waits
//! the same settle and releases it on one CPU ([`StayOnCpu`]): a release
//! on another CPU than the touch's is 5-25 % slower on a 2-core VM, and
//! which strategy woke where was chance (and the gather, which slept once
//! more, the likelier loser). After every strategy `mincore` must show
//! the region fully released.
//!
//! Table-lock holds are reported as maximum (wall and on CPU), p99 and
//! p99.9; beside them, the environment's own stalls measured in the same
//! run by a lock-free busy loop ([`env_stalls`]): its longest gap, and the
//! p99.9 and maximum of sections as long as a median hold.

use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use guest_mm::{
    BackingKind, BackingRegion, Gpa, Hva, PageSize, Perms, Stage2Table, TableConfig, UnmapMode,
};

use crate::cpu::StayOnCpu;
use crate::mem::{anon_huge_bytes, AnonRegion, PAGE};
use crate::reporting::{mib_since, Overlap, Reported};
use crate::rng::{median, ms, round, Rng};
use crate::schema::{UnmapMulti, UnmapResult, UnmapTargets};
use crate::units::human_bytes;

/// Options of `gmm bench unmap`.
#[derive(clap::Args, Debug)]
pub struct UnmapArgs {
    /// Bytes of real memory to populate and unmap (e.g. 256M, 1G, 4G).
    #[arg(long, default_value = "1G", value_parser = crate::units::parse_size)]
    pub size: u64,
    /// Run several sizes (e.g. 1G,4G) and compare their lock holds; overrides --size.
    #[arg(long, value_parser = crate::units::parse_size_list)]
    pub sizes: Option<crate::units::SizeList>,
    /// Leaf size: 4K (no THP) or 2M (THP-backed memory, 2 MiB leaves).
    #[arg(long, default_value = "4K", value_parser = crate::units::parse_leaf)]
    pub page_size: PageSize,
    /// Repetitions of each strategy (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: u32,
    /// Entries the table lock covers before it is dropped and retaken.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub yield_entries: u32,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug)]
enum Strategy {
    Gather,
    Limit,
    PerPage,
    PerRun,
}

const ORDER: [Strategy; 4] = [
    Strategy::Gather,
    Strategy::Limit,
    Strategy::PerPage,
    Strategy::PerRun,
];

#[derive(Default)]
struct GatherRun {
    ms: f64,
    map_ms: f64,
    lock_max_ns: u64,
    lock_cpu_max_ns: u64,
    lock_acq: u64,
    release_calls: u64,
    table_bytes: u64,
    flushes: u64,
    forced_flushes: u64,
    fallback_batches: u64,
    batch_allocs: u64,
    tables_retired: u64,
    hist: Vec<u64>,
    preempted: u64,
    /// MiB the host kernel reported to its hypervisor during the timed
    /// unmap (`None`: it has no counter).
    host_reported_mib: Option<f64>,
}

/// Upper bound (µs) of the histogram bucket holding the `q` quantile of
/// lock holds; bucket `i` counts holds in `[2^i, 2^(i+1))` ns.
fn hist_quantile_us(hist: &[u64], q: f64) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let want = (total as f64 * q).ceil() as u64;
    let mut seen = 0;
    for (i, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= want {
            return (1u64 << (i + 1)) as f64 / 1e3;
        }
    }
    (1u64 << hist.len()) as f64 / 1e3
}

/// Shortest run of the environment's busy loop ([`env_stalls`]).
const ENV_MIN: std::time::Duration = std::time::Duration::from_millis(100);

/// Idle time before each timed section.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);

/// Involuntary context switches of the calling thread so far.
fn involuntary_switches() -> u64 {
    // SAFETY: rusage is plain data; getrusage fills it and reads nothing.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage owned by this frame.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ru.ru_nivcsw).unwrap_or(0)
}

/// A region mapped in a table of its own, ready for a timed gather.
struct MappedTable {
    table: std::sync::Arc<Stage2Table>,
    len: u64,
    map_ms: f64,
}

/// Registers `r` as anonymous backing of a new table and maps it at
/// `leaf` (untimed set-up, done before the settle every strategy waits).
fn map_table(r: &AnonRegion, leaf: PageSize, yield_entries: u32) -> Result<MappedTable> {
    let table = Stage2Table::new(TableConfig {
        yield_entries,
        ..TableConfig::default()
    })
    .context("creating the table")?;
    table
        .register_backing(BackingRegion {
            hva: Hva(r.base),
            len: r.len,
            kind: BackingKind::Anonymous,
        })
        .context("registering the region")?;
    let t = Instant::now();
    table
        .map(Gpa(0), Hva(r.base), r.len, Perms::RW, leaf)
        .context("mapping the region")?;
    Ok(MappedTable {
        table,
        len: r.len,
        map_ms: ms(t.elapsed()),
    })
}

/// Unmaps the whole of `m` through one gather, timed.
fn run_gather(m: MappedTable) -> Result<GatherRun> {
    let MappedTable { table, len, map_ms } = m;
    let table_bytes = table.table_bytes();
    table.reset_lock_stats();
    table.set_cpu_lock_stats(true);
    let before = table.stats();
    let switches = involuntary_switches();
    let reported = Reported::start();
    let t = Instant::now();
    let mut g = table.gather();
    table
        .unmap(&mut g, Gpa(0), len, UnmapMode::Remove)
        .context("unmapping the region")?;
    let gs = g.finish().context("releasing the region's backing")?;
    let gather_ms = ms(t.elapsed());
    let host_reported_mib = mib_since(reported);
    let preempted = involuntary_switches() - switches;
    let after = table.stats();
    table.rcu_barrier();
    Ok(GatherRun {
        ms: gather_ms,
        map_ms,
        lock_max_ns: after.lock_hold_max_ns,
        lock_cpu_max_ns: after.lock_hold_cpu_max_ns,
        lock_acq: after.lock_acquisitions - before.lock_acquisitions,
        release_calls: after.release_calls - before.release_calls,
        table_bytes,
        flushes: gs.flushes,
        forced_flushes: gs.forced_flushes,
        fallback_batches: gs.fallback_batches,
        batch_allocs: gs.batch_allocs,
        tables_retired: gs.tables_retired,
        hist: after.lock_hold_hist,
        preempted,
        host_reported_mib,
    })
}

/// What the environment does to a lock-free busy loop: see [`env_stalls`].
struct EnvStalls {
    /// Longest gap between two clock reads, µs.
    max_gap_us: f64,
    /// Gaps over 50 µs.
    gaps_over_50us: u64,
    /// Sections of `reads` clock reads: their wall times in the lock-hold
    /// histogram's buckets (`[2^i, 2^(i+1))` ns).
    hist: Vec<u64>,
    max_ns: u64,
    sections: u64,
    /// One section's time when nothing interrupts it, µs.
    work_us: f64,
}

/// Bucket of `ns` in a histogram of `len` power-of-two buckets.
fn bucket(ns: u64, len: usize) -> usize {
    (63 - ns.max(1).leading_zeros() as usize).min(len.saturating_sub(1))
}

/// Busy-reads the monotonic clock for `d`, with no lock and no table: the
/// environment's own stalls (interrupts, preemption, hypervisor steal),
/// measured in the same run as the lock holds. Records the longest gap
/// between two reads, and cuts the loop into sections of a fixed number
/// of reads calibrated to last `hold_ns` when nothing interrupts them (the
/// fastest of a few trial sections): a section's wall time above that is
/// the environment stretching a "hold" of that length, so their
/// distribution is the reference for the lock holds' p99.9 and maximum.
fn env_stalls(d: std::time::Duration, hold_ns: u64, hist_len: usize) -> EnvStalls {
    const TRIAL: u32 = 1000;
    let per_read_ns = (0..20)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..TRIAL {
                std::hint::black_box(Instant::now());
            }
            t.elapsed().as_nanos() as f64 / f64::from(TRIAL)
        })
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let reads = ((hold_ns as f64 / per_read_ns).round() as u64).max(1);
    let mut hist = vec![0u64; hist_len.max(1)];
    let start = Instant::now();
    let mut prev = start;
    let (mut max_gap, mut over, mut max_ns, mut sections) =
        (std::time::Duration::ZERO, 0u64, 0u64, 0u64);
    let mut best = u64::MAX;
    loop {
        let s0 = prev;
        for _ in 0..reads {
            let now = Instant::now();
            let gap = now - prev;
            if gap > max_gap {
                max_gap = gap;
            }
            if gap.as_micros() > 50 {
                over += 1;
            }
            prev = now;
        }
        let ns = u64::try_from((prev - s0).as_nanos()).unwrap_or(u64::MAX);
        let b = bucket(ns, hist.len());
        hist[b] += 1;
        max_ns = max_ns.max(ns);
        best = best.min(ns);
        sections += 1;
        if prev - start >= d {
            break;
        }
    }
    EnvStalls {
        max_gap_us: max_gap.as_secs_f64() * 1e6,
        gaps_over_50us: over,
        hist,
        max_ns,
        sections,
        work_us: best as f64 / 1e3,
    }
}

/// Measure one size.
pub fn measure(size: u64, leaf: PageSize, reps: u32, yield_entries: u32) -> Result<UnmapResult> {
    if !size.is_multiple_of(leaf.bytes()) {
        bail!(
            "size {} is not a multiple of the {leaf} page size",
            human_bytes(size)
        );
    }
    let run_reported = Reported::start();
    let npages = size / PAGE;
    let lock = Mutex::new(());
    let mut rng = Rng::new(0x5eed_0000 ^ size);
    let mut pfns: Vec<u64> = (0..npages).collect();
    rng.shuffle(&mut pfns);

    let mut gathers: Vec<GatherRun> = Vec::new();
    let (mut limit, mut per_page, mut per_run, mut sort, mut touch) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut per_page_hold = Vec::new();
    let mut runs = 0;
    let mut resid = [0u64; 4];
    let mut huge: Option<u64> = None;
    for rep in 0..reps as usize {
        for k in 0..ORDER.len() {
            let s = ORDER[(k + rep) % ORDER.len()];
            // A fresh mapping each time: a per-page release splits huge
            // pages and their page tables, which would slow whoever ran next.
            let region = AnonRegion::new(size, leaf)?;
            // Touch and release on one CPU, for every strategy alike.
            let _stay = StayOnCpu::here();
            let t = Instant::now();
            region.touch();
            touch.push(ms(t.elapsed()));
            let resident = region.resident();
            if resident != size {
                bail!(
                    "only {} of {} became resident after touching; is memory short?",
                    human_bytes(resident),
                    human_bytes(size)
                );
            }
            if leaf == PageSize::Size2M {
                if let Some(h) = anon_huge_bytes() {
                    huge = Some(huge.map_or(h, |x| x.min(h)));
                }
            }
            // The gather's table is built before the settle: every strategy
            // goes from the touch through the same sleep to its timed
            // release.
            let mapped = match s {
                Strategy::Gather => Some(map_table(&region, leaf, yield_entries)?),
                _ => None,
            };
            // Let the kernel finish deferred work of the previous strategy
            // (RCU callbacks freeing page tables after a large munmap run in
            // softirq on this CPU and would land inside the timed section).
            std::thread::sleep(SETTLE);
            let idx = match (s, mapped) {
                (Strategy::Gather, m) => {
                    let m = m.context("the gather's table was not mapped")?;
                    gathers.push(run_gather(m)?);
                    0
                }
                (Strategy::Limit, _) => {
                    let t = Instant::now();
                    region.release_whole()?;
                    limit.push(ms(t.elapsed()));
                    1
                }
                (Strategy::PerPage, _) => {
                    let t = Instant::now();
                    let held = region.release_per_page(&lock)?;
                    per_page.push(ms(t.elapsed()));
                    per_page_hold.push(held as f64 / 1e6);
                    2
                }
                (Strategy::PerRun, _) => {
                    let list = pfns.clone();
                    let t = Instant::now();
                    let (n, sort_ns) = region.release_per_run(list)?;
                    per_run.push(ms(t.elapsed()));
                    sort.push(sort_ns as f64 / 1e6);
                    runs = n;
                    3
                }
            };
            resid[idx] = resid[idx].max(region.resident());
        }
    }
    let g_ms: Vec<f64> = gathers.iter().map(|g| g.ms).collect();
    let gather_ms = median(&g_ms);
    let limit_ms = median(&limit);
    let per_page_ms = median(&per_page);
    let per_run_ms = median(&per_run);
    let last = gathers.last().context("no gather repetition ran")?;
    let lock_max_ns = gathers.iter().map(|g| g.lock_max_ns).max().unwrap_or(0);
    let rep_max: Vec<f64> = gathers.iter().map(|g| g.lock_max_ns as f64 / 1e3).collect();
    let max_lock_hold_us = lock_max_ns as f64 / 1e3;
    let mut hist = vec![0u64; last.hist.len()];
    for g in &gathers {
        for (h, n) in hist.iter_mut().zip(&g.hist) {
            *h += n;
        }
    }
    // The environment's reference, run right after the gathers for as
    // long as they took together (at least ENV_MIN, so that small sizes
    // still give a p99.9 of some thousand sections), in sections as long
    // as a median hold (the middle of its histogram bucket).
    let median_hold_ns = (hist_quantile_us(&hist, 0.5) * 1e3 * 0.75) as u64;
    let env = env_stalls(
        std::time::Duration::from_secs_f64(g_ms.iter().sum::<f64>() / 1e3).max(ENV_MIN),
        median_hold_ns.max(1000),
        hist.len(),
    );
    let overhead = last.table_bytes as f64 / size as f64 * 100.0;
    let ratio_vs_limit = gather_ms / limit_ms;
    let ratio_per_page = per_page_ms / gather_ms;
    let r3 = |x: f64| round(x, 3);
    let all = |v: &[f64]| v.iter().map(|&x| r3(x)).collect::<Vec<_>>();
    Ok(UnmapResult {
        tool: "bench-unmap".into(),
        size_bytes: size,
        page_size: leaf.to_string(),
        reps,
        membarrier: crate::membarrier(),
        gather_ms: r3(gather_ms),
        limit_ms: r3(limit_ms),
        per_page_ms: r3(per_page_ms),
        per_run_ms: r3(per_run_ms),
        per_run_sort_ms: r3(median(&sort)),
        per_run_runs: runs,
        ratio_vs_limit: r3(ratio_vs_limit),
        ratio_per_page_vs_gather: r3(ratio_per_page),
        ratio_per_run_vs_gather: r3(per_run_ms / gather_ms),
        max_lock_hold_us: r3(max_lock_hold_us),
        median_rep_max_lock_hold_us: r3(median(&rep_max)),
        env_max_stall_us: r3(env.max_gap_us),
        env_stalls_over_50us: env.gaps_over_50us,
        env_hold_p999_us_upper: Some(r3(
            hist_quantile_us(&env.hist, 0.999).min(env.max_ns as f64 / 1e3)
        )),
        env_hold_max_us: Some(r3(env.max_ns as f64 / 1e3)),
        env_hold_work_us: Some(r3(env.work_us)),
        env_holds: Some(env.sections),
        max_lock_hold_cpu_us: r3(gathers.iter().map(|g| g.lock_cpu_max_ns).max().unwrap_or(0)
            as f64
            / 1e3),
        lock_hold_p99_us_upper: r3(hist_quantile_us(&hist, 0.99).min(max_lock_hold_us)),
        lock_hold_p999_us_upper: Some(r3(hist_quantile_us(&hist, 0.999).min(max_lock_hold_us))),
        lock_hold_hist_us: hist
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| ((1u64 << (i + 1)) as f64 / 1e3, n))
            .collect(),
        lock_acquisitions: last.lock_acq,
        per_page_lock_hold_ms: r3(median(&per_page_hold)),
        release_calls: last.release_calls,
        flushes: last.flushes,
        forced_flushes: last.forced_flushes,
        fallback_batches: last.fallback_batches,
        batch_allocs: last.batch_allocs,
        tables_retired: last.tables_retired,
        table_bytes: last.table_bytes,
        table_overhead_pct: round(overhead, 4),
        map_ms: r3(median(
            &gathers.iter().map(|g| g.map_ms).collect::<Vec<_>>(),
        )),
        touch_ms: r3(median(&touch)),
        anon_huge_bytes_after_touch: huge,
        rss_after_gather: resid[0],
        rss_after_limit: resid[1],
        rss_after_per_page: resid[2],
        rss_after_per_run: resid[3],
        released_ok: resid.iter().all(|&r| r == 0),
        gather_ms_all: all(&g_ms),
        limit_ms_all: all(&limit),
        per_page_ms_all: all(&per_page),
        per_run_ms_all: all(&per_run),
        host_reported_mib: mib_since(run_reported),
        max_lock_hold_us_all: all(&rep_max),
        host_reported_mib_all: gathers.iter().filter_map(|g| g.host_reported_mib).collect(),
        preempted_during_unmap_all: gathers.iter().map(|g| g.preempted).collect(),
        targets: UnmapTargets {
            gather_within_1_10x_limit: ratio_vs_limit <= 1.10,
            at_least_10x_per_page: ratio_per_page >= 10.0,
            lock_hold_le_100us: max_lock_hold_us <= 100.0,
            lock_hold_cpu_le_100us: gathers.iter().all(|g| g.lock_cpu_max_ns <= 100_000),
            table_overhead_le_0_2pct: overhead <= 0.2,
        },
    })
}

fn human(r: &UnmapResult) -> String {
    let mut s = String::new();
    let size = human_bytes(r.size_bytes);
    s += &format!(
        "unmap {size} at {} leaves, median of {} (strategies interleaved, each touched and released on one CPU):\n",
        r.page_size, r.reps
    );
    s += &format!(
        "  gather    {:>10.2} ms  ({:.3}x the limit; {} release calls, {} flushes)\n",
        r.gather_ms, r.ratio_vs_limit, r.release_calls, r.flushes
    );
    s += &format!("  limit     {:>10.2} ms  (one madvise)\n", r.limit_ms);
    s += &format!(
        "  per-page  {:>10.2} ms  ({:.1}x the gather; mutex held {:.1} ms)\n",
        r.per_page_ms, r.ratio_per_page_vs_gather, r.per_page_lock_hold_ms
    );
    s += &format!(
        "  per-run   {:>10.2} ms  ({:.2}x the gather; {} runs, sort+merge {:.2} ms)\n",
        r.per_run_ms, r.ratio_per_run_vs_gather, r.per_run_runs, r.per_run_sort_ms
    );
    s += &format!(
        "  table lock: max hold {:.1} us ({:.1} us on CPU; p99 <= {:.1} us, p99.9 <= {:.1} us) over {} acquisitions; table {} = {:.3}% of mapped memory\n  environment: a lock-free busy loop as long as the gathers stalled up to {:.1} us ({} gaps > 50 us); its {} sections of {:.1} us of work took p99.9 <= {:.1} us, max {:.1} us\n",
        r.max_lock_hold_us,
        r.max_lock_hold_cpu_us,
        r.lock_hold_p99_us_upper,
        r.lock_hold_p999_us_upper.unwrap_or(0.0),
        r.lock_acquisitions,
        human_bytes(r.table_bytes),
        r.table_overhead_pct,
        r.env_max_stall_us,
        r.env_stalls_over_50us,
        r.env_holds.unwrap_or(0),
        r.env_hold_work_us.unwrap_or(0.0),
        r.env_hold_p999_us_upper.unwrap_or(0.0),
        r.env_hold_max_us.unwrap_or(0.0),
    );
    if let Some(o) = Overlap::split(&r.max_lock_hold_us_all, &r.host_reported_mib_all) {
        s += &format!(
            "  host: {}\n",
            o.text("gathers", "their longest lock hold was", "us")
        );
    }
    if let Some(h) = r.anon_huge_bytes_after_touch {
        s += &format!("  THP after touch (lowest): {}\n", human_bytes(h));
        if h < r.size_bytes / 2 {
            s += "  warning: less than half the region was THP-backed; the 2M figures measure 4 KiB pages\n";
        }
    }
    s += &format!(
        "  released: {} (resident after gather/limit/per-page/per-run: {}/{}/{}/{})\n",
        if r.released_ok { "all" } else { "NOT ALL" },
        r.rss_after_gather,
        r.rss_after_limit,
        r.rss_after_per_page,
        r.rss_after_per_run
    );
    s
}

/// Run `gmm bench unmap`.
pub fn cmd(a: &UnmapArgs) -> Result<()> {
    let sizes = a.sizes.clone().map_or_else(|| vec![a.size], |l| l.0);
    let mut results = Vec::new();
    for &size in &sizes {
        let r = measure(size, a.page_size, a.reps, a.yield_entries)?;
        crate::say(a.json, &human(&r));
        results.push(r);
    }
    if !results.iter().all(|r| r.released_ok) {
        bail!("some strategy left memory resident; see the rss_after_* figures");
    }
    if a.sizes.is_none() {
        if let Some(r) = results.pop() {
            crate::emit_json(a.json, &r)?;
        }
        return Ok(());
    }
    results.sort_by_key(|r| r.size_bytes);
    let pick = |f: fn(&UnmapResult) -> f64| -> Vec<(u64, f64)> {
        results.iter().map(|r| (r.size_bytes, f(r))).collect()
    };
    let by_size = pick(|r| r.max_lock_hold_us);
    let by_size_median = pick(|r| r.median_rep_max_lock_hold_us);
    let by_size_p99 = pick(|r| r.lock_hold_p99_us_upper);
    let by_size_p999 = pick(|r| r.lock_hold_p999_us_upper.unwrap_or(0.0));
    let no_larger = |v: &[(u64, f64)]| match (v.first(), v.last()) {
        (Some(a), Some(b)) => b.1 <= a.1,
        _ => true,
    };
    let not_larger = no_larger(&by_size);
    let median_not_larger = no_larger(&by_size_median);
    let mut s = String::from("max table-lock hold by size:\n");
    for ((size, us), (_, med)) in by_size.iter().zip(&by_size_median) {
        s += &format!(
            "  {:>10}  max {us:.1} us, median of repetitions' max {med:.1} us\n",
            human_bytes(*size)
        );
    }
    s += &format!(
        "  largest size's hold no larger than smallest's: {}\n",
        if not_larger { "yes" } else { "no" }
    );
    crate::say(a.json, &s);
    crate::emit_json(
        a.json,
        &UnmapMulti {
            tool: "bench-unmap".into(),
            page_size: a.page_size.to_string(),
            sizes,
            max_lock_hold_us_by_size: by_size,
            median_rep_max_lock_hold_us_by_size: by_size_median,
            lock_hold_p99_us_upper_by_size: by_size_p99,
            lock_hold_p999_us_upper_by_size: by_size_p999,
            lock_hold_not_larger_at_largest: not_larger,
            median_rep_max_not_larger_at_largest: median_not_larger,
            runs: results,
        },
    )
}
