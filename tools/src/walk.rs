//! `gmm bench walk`: translations per second per thread through the
//! lockless fast walk, alone and under an unmap/remap storm, beside two
//! baselines measured in the same run:
//!
//! - an `RwLock<Vec<u64>>` page map read-locked per translation, with a
//!   writer storm paced to the guest-mm storm's measured rate (so both
//!   tables suffer the same number of unmap/remap operations per second);
//! - vm-memory's `GuestMemoryMmap` lookup (`get_host_address`) over a few
//!   regions; vm-memory has no unmap, so it is measured without a storm.
//!
//! Beside the direct fast walk, the same translations go through guest-mm's
//! vm-memory view of a read section (`WalkGuard::memory`, vm-memory's
//! `GuestMemory`): `get_slices(addr, 8, Permissions::Read)` taking the
//! first slice's host pointer (no memory is read, as in the other loops),
//! reported as `guest_memory_view_per_s` and its ratio to the direct walk.
//!
//! The stage-2 table is mapped at 4 KiB leaves over reserved anonymous
//! memory that is never touched (`MAP_NORESERVE`), registered as simulated
//! backing so that the storm releases nothing: a translation never
//! dereferences it, and the view's slices point at memory that exists.
//! Each walker pins once per batch of translations of pseudo-random
//! addresses (xorshift); a pin-per-translation figure is reported too.
//!
//! The machine may have few cores: the storm thread competes with the
//! walkers for them. The JSON reports the core count and whether the
//! threads oversubscribe it.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_mm::{
    Access, BackingKind, BackingRegion, Gpa, Hva, PageSize, Perms, Stage2Table, TableConfig,
    UnmapMode,
};
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions};

use crate::mem::{AnonRegion, HUGE, PAGE};
use crate::rng::{round, Rng};
use crate::units::human_bytes;

/// Where the `RwLock` baseline's page map pretends the backing lives
/// (never dereferenced).
const FAKE_HVA: u64 = 0x1000_0000_0000;

/// What one translation through the vm-memory view is, for the output.
const VIEW_OP: &str = "get_slices(addr, 8, Permissions::Read), first slice's pointer";

/// Options of `gmm bench walk`.
#[derive(clap::Args, Debug)]
pub struct WalkArgs {
    /// Walker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// Seconds per measurement phase (there are ten phases).
    #[arg(long, default_value = "1", value_parser = crate::units::parse_seconds)]
    pub seconds: f64,
    /// Guest memory mapped (at 4 KiB leaves); a multiple of 2 MiB.
    #[arg(long, default_value = "1G", value_parser = crate::units::parse_size)]
    pub mem: u64,
    /// Pace the guest-mm storm at this many unmap+remap operations per
    /// second (default: as fast as it goes).
    #[arg(long, value_parser = parse_rate)]
    pub storm_rate: Option<f64>,
    /// Translations per pin (read section).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch: u32,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "invalid storm rate {s:?}: expected operations per second above 0, e.g. 10000"
        )),
    }
}

#[derive(Serialize)]
struct WalkJson {
    tool: &'static str,
    threads: u32,
    cores: usize,
    /// guest-mm pins with a compiler barrier and grace periods use membarrier.
    membarrier: bool,
    /// Walkers plus the storm thread outnumber the cores.
    storm_oversubscribed: bool,
    seconds_per_phase: f64,
    mem_bytes: u64,
    batch: u32,
    /// Cached path (`translate`), random addresses over the whole table.
    walk_per_s: f64,
    /// Uncached path (`translate_uncached`).
    walk_uncached_per_s: f64,
    /// Cached path over a 64-page working set (cache hits).
    walk_hot_per_s: f64,
    /// One pin per translation (cached path).
    walk_pin_each_per_s: f64,
    /// Cached path while a storm unmaps and remaps random 2 MiB ranges.
    walk_under_unmap_per_s: f64,
    /// Cached path while another thread only spins (no table work): what
    /// sharing the machine costs by itself, the fair reference for the storm.
    walk_busy_neighbour_per_s: f64,
    /// Share of translations under the storm that found the page unmapped.
    walk_under_unmap_unmapped_pct: f64,
    /// The requested storm pace (null: as fast as it goes).
    storm_rate_requested: Option<f64>,
    /// Unmap+remap operations per second the storm achieved.
    storm_ops_per_s: f64,
    /// Cache shootdowns a walker saw during the storm phase (all walkers).
    storm_shootdowns: u64,
    under_unmap_ratio: f64,
    /// `walk_under_unmap_per_s / walk_busy_neighbour_per_s`.
    under_unmap_vs_busy_ratio: f64,
    rwlock_per_s: f64,
    rwlock_under_unmap_per_s: f64,
    rwlock_storm_ops_per_s: f64,
    rwlock_under_unmap_ratio: f64,
    vm_memory_per_s: f64,
    vm_memory_regions: usize,
    walk_vs_rwlock: f64,
    walk_vs_vm_memory: f64,
    /// Translations through guest-mm's vm-memory view of a read section
    /// (`GuestMemory::get_slices`, see `guest_memory_view_op`), random
    /// addresses over the whole table, one pin per batch.
    guest_memory_view_per_s: f64,
    /// What one view translation is.
    guest_memory_view_op: &'static str,
    /// `guest_memory_view_per_s / walk_per_s` (target ≥ 0.8).
    guest_memory_view_vs_walk: f64,
    /// `guest_memory_view_per_s / vm_memory_per_s`.
    guest_memory_view_vs_vm_memory: f64,
    use_after_free: u64,
    targets: WalkTargets,
}

#[derive(Serialize)]
struct WalkTargets {
    walk_ge_50m_per_s: bool,
    under_unmap_ge_0_8x: bool,
}

/// Which walk loop a phase runs.
#[derive(Clone, Copy)]
enum Mode {
    Cached,
    Uncached,
    Hot,
    PinEach,
}

/// Per-thread result of a phase.
#[derive(Default, Clone, Copy)]
struct Count {
    n: u64,
    failed: u64,
    shootdowns: u64,
    uaf: u64,
}

/// Run `threads` copies of `work` (given its thread index and the stop
/// flag) for `secs`, with an optional storm thread; returns the counts,
/// the elapsed time and the storm's operation count.
fn phase<W, S>(threads: u32, secs: f64, work: W, storm: Option<S>) -> Result<(Vec<Count>, f64, u64)>
where
    W: Fn(usize, &AtomicBool) -> Count + Send + Sync,
    S: FnOnce(&AtomicBool) -> Result<u64> + Send,
{
    let stop = AtomicBool::new(false);
    let n = threads as usize;
    let start = Barrier::new(n + 1 + usize::from(storm.is_some()));
    std::thread::scope(|s| {
        let walkers: Vec<_> = (0..n)
            .map(|i| {
                let (work, stop, start) = (&work, &stop, &start);
                s.spawn(move || {
                    start.wait();
                    work(i, stop)
                })
            })
            .collect();
        let storm = storm.map(|f| {
            let (stop, start) = (&stop, &start);
            s.spawn(move || {
                start.wait();
                f(stop)
            })
        });
        start.wait();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let joined: Vec<_> = walkers.into_iter().map(|h| h.join()).collect();
        let elapsed = t.elapsed().as_secs_f64();
        let mut counts = Vec::with_capacity(joined.len());
        for j in joined {
            match j {
                Ok(c) => counts.push(c),
                Err(_) => bail!("a walker thread panicked"),
            }
        }
        let ops = match storm {
            Some(h) => match h.join() {
                Ok(r) => r?,
                Err(_) => bail!("the storm thread panicked"),
            },
            None => 0,
        };
        Ok((counts, elapsed, ops))
    })
}

fn per_thread(counts: &[Count], elapsed: f64) -> f64 {
    let total: u64 = counts.iter().map(|c| c.n).sum();
    total as f64 / counts.len().max(1) as f64 / elapsed
}

/// A pseudo-random 8-byte aligned address below `len` (multiply-high, no division).
#[inline(always)]
fn addr(rng: &mut Rng, len: u64) -> u64 {
    (((rng.next() as u128 * len as u128) >> 64) as u64) & !7
}

fn walk_loop(
    table: &Arc<Stage2Table>,
    i: usize,
    stop: &AtomicBool,
    len: u64,
    batch: u32,
    mode: Mode,
) -> Count {
    let mut w = table.walker();
    let mut rng = Rng::new(0x1234_5678 + i as u64 * 0x9e37_79b9);
    let mut c = Count::default();
    let mut sink = 0u64;
    let hot_base = addr(&mut rng, len) & !(HUGE - 1);
    while !stop.load(Ordering::Relaxed) {
        match mode {
            Mode::PinEach => {
                for _ in 0..batch {
                    let g = w.pin();
                    match g.translate(Gpa(addr(&mut rng, len)), Access::Read) {
                        Ok(t) => sink ^= t.hva.0,
                        Err(_) => c.failed += 1,
                    }
                }
            }
            _ => {
                let g = w.pin();
                for _ in 0..batch {
                    let gpa = match mode {
                        Mode::Hot => hot_base + (addr(&mut rng, 64 * PAGE)),
                        _ => addr(&mut rng, len),
                    };
                    let r = match mode {
                        Mode::Uncached => g.translate_uncached(Gpa(gpa), Access::Read),
                        _ => g.translate(Gpa(gpa), Access::Read),
                    };
                    match r {
                        Ok(t) => sink ^= t.hva.0,
                        Err(_) => c.failed += 1,
                    }
                }
            }
        }
        c.n += u64::from(batch);
    }
    black_box(sink);
    let s = w.stats();
    c.shootdowns = s.shootdowns;
    c.uaf = s.use_after_free;
    c
}

/// Translations through the vm-memory view of each read section: one
/// `get_slices(addr, 8, Read)` per address, keeping the first slice's host
/// pointer (as [`walk_loop`] keeps the translation's).
fn view_loop(table: &Arc<Stage2Table>, i: usize, stop: &AtomicBool, len: u64, batch: u32) -> Count {
    let mut w = table.walker();
    let mut rng = Rng::new(0x1234_5678 + i as u64 * 0x9e37_79b9);
    let mut c = Count::default();
    let mut sink = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let g = w.pin();
        let mem = g.memory();
        for _ in 0..batch {
            let a = GuestAddress(addr(&mut rng, len));
            match mem
                .get_slices(a, 8, Permissions::Read)
                .map(|mut s| s.next())
            {
                Ok(Some(Ok(s))) => sink ^= s.ptr_guard().as_ptr() as u64,
                _ => c.failed += 1,
            }
        }
        c.n += u64::from(batch);
    }
    black_box(sink);
    let s = w.stats();
    c.shootdowns = s.shootdowns;
    c.uaf = s.use_after_free;
    c
}

/// The guest-mm storm: unmap a random 2 MiB range and map it back, as
/// fast as it goes.
fn storm(
    table: &Stage2Table,
    stop: &AtomicBool,
    host: u64,
    len: u64,
    rate: Option<f64>,
) -> Result<u64> {
    let mut rng = Rng::new(0xfeed);
    let mut ops = 0u64;
    let pacer = Pacer::new(rate);
    while !stop.load(Ordering::Relaxed) {
        if !pacer.due(ops) {
            continue;
        }
        let r = rng.below(len / HUGE) * HUGE;
        let mut g = table.gather();
        table
            .unmap(&mut g, Gpa(r), HUGE, UnmapMode::Remove)
            .context("storm unmap")?;
        g.finish().context("storm flush")?;
        table
            .map(Gpa(r), Hva(host + r), HUGE, Perms::RW, PageSize::Size4K)
            .context("storm remap")?;
        ops += 1;
    }
    Ok(ops)
}

/// Paces a storm at a rate of operations per second (`None`: flat out;
/// `Some(0)`: never).
struct Pacer {
    start: Instant,
    interval: Option<f64>,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Pacer {
        Pacer {
            start: Instant::now(),
            interval: rate.map(|r| if r > 0.0 { 1.0 / r } else { f64::INFINITY }),
        }
    }

    /// Whether operation number `ops` may start now; if not, sleeps a
    /// little (at most 10 ms, so the caller sees its stop flag).
    fn due(&self, ops: u64) -> bool {
        let Some(interval) = self.interval else {
            return true;
        };
        let due = (ops as f64 * interval).min(3600.0);
        let now = self.start.elapsed().as_secs_f64();
        if now >= due {
            return true;
        }
        std::thread::sleep(Duration::from_secs_f64((due - now).min(0.01)));
        false
    }
}

/// A neighbour that keeps a core busy without touching any table.
fn spin(stop: &AtomicBool) -> Result<u64> {
    let mut rng = Rng::new(7);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..1024 {
            black_box(rng.next());
        }
        n += 1;
    }
    Ok(n)
}

/// The baseline page map: one word per 4 KiB page, `hva | perms`, 0 = unmapped.
struct RwTable {
    map: RwLock<Vec<u64>>,
}

impl RwTable {
    fn new(len: u64) -> RwTable {
        let v = (0..len / PAGE).map(|p| (FAKE_HVA + p * PAGE) | 3).collect();
        RwTable {
            map: RwLock::new(v),
        }
    }

    #[inline(always)]
    fn translate(&self, gpa: u64) -> Option<u64> {
        let m = self.map.read().unwrap_or_else(|e| e.into_inner());
        let e = *m.get((gpa / PAGE) as usize)?;
        (e & 1 != 0).then_some((e & !(PAGE - 1)) + (gpa & (PAGE - 1)))
    }

    fn set_range(&self, gpa: u64, len: u64, mapped: bool) {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        for p in gpa / PAGE..(gpa + len) / PAGE {
            m[p as usize] = if mapped { (FAKE_HVA + p * PAGE) | 3 } else { 0 };
        }
    }
}

fn rwlock_loop(t: &RwTable, i: usize, stop: &AtomicBool, len: u64, batch: u32) -> Count {
    let mut rng = Rng::new(0x1234_5678 + i as u64 * 0x9e37_79b9);
    let mut c = Count::default();
    let mut sink = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..batch {
            match t.translate(addr(&mut rng, len)) {
                Some(h) => sink ^= h,
                None => c.failed += 1,
            }
        }
        c.n += u64::from(batch);
    }
    black_box(sink);
    c
}

/// The baseline storm, paced at `rate` unmap+remap operations per second.
fn rwlock_storm(t: &RwTable, stop: &AtomicBool, len: u64, rate: f64) -> u64 {
    let mut rng = Rng::new(0xfeed);
    let mut ops = 0u64;
    let pacer = Pacer::new(Some(rate));
    while !stop.load(Ordering::Relaxed) {
        if !pacer.due(ops) {
            continue;
        }
        let r = rng.below(len / HUGE) * HUGE;
        t.set_range(r, HUGE, false);
        t.set_range(r, HUGE, true);
        ops += 1;
    }
    ops
}

fn vm_memory_loop(m: &GuestMemoryMmap, i: usize, stop: &AtomicBool, len: u64, batch: u32) -> Count {
    let mut rng = Rng::new(0x1234_5678 + i as u64 * 0x9e37_79b9);
    let mut c = Count::default();
    let mut sink = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..batch {
            match m.get_host_address(GuestAddress(addr(&mut rng, len))) {
                Ok(p) => sink ^= p as u64,
                Err(_) => c.failed += 1,
            }
        }
        c.n += u64::from(batch);
    }
    black_box(sink);
    c
}

/// Run `gmm bench walk`.
pub fn cmd(a: &WalkArgs) -> Result<()> {
    let len = a.mem;
    if !len.is_multiple_of(HUGE) {
        bail!("--mem {} is not a multiple of 2 MiB", human_bytes(len));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Reserved, never touched: no RSS, nothing released (simulated).
    let backing = AnonRegion::new(len, PageSize::Size4K).context("reserving the backing")?;
    let host = backing.base;
    let table = Stage2Table::new(TableConfig::default()).context("creating the table")?;
    table
        .register_backing(BackingRegion {
            hva: Hva(host),
            len,
            kind: BackingKind::Simulated { hook: None },
        })
        .context("registering simulated backing")?;
    table
        .map(Gpa(0), Hva(host), len, Perms::RW, PageSize::Size4K)
        .context("mapping the table")?;
    let (t, s, b) = (a.threads, a.seconds, a.batch);
    let none = None::<fn(&AtomicBool) -> Result<u64>>;
    let mut log = format!(
        "walk: {} walker thread(s) on {cores} cores, {} at 4 KiB leaves, {s} s per phase, {b} translations per pin, {}\n",
        t,
        human_bytes(len),
        if crate::membarrier() { "membarrier fences" } else { "SeqCst fences (no membarrier)" }
    );
    let mut uaf = 0u64;
    let mut run_mode = |m: Mode| -> Result<f64> {
        let (c, e, _) = phase(t, s, |i, stop| walk_loop(&table, i, stop, len, b, m), none)?;
        uaf += c.iter().map(|x| x.uaf).sum::<u64>();
        Ok(per_thread(&c, e))
    };
    let walk = run_mode(Mode::Cached)?;
    // Right after the cached path it is compared with, so that the two
    // share the machine's conditions as far as possible.
    let (c, e, _) = phase(t, s, |i, stop| view_loop(&table, i, stop, len, b), none)?;
    let view_uaf: u64 = c.iter().map(|x| x.uaf).sum();
    let view = per_thread(&c, e);
    let uncached = run_mode(Mode::Uncached)?;
    let hot = run_mode(Mode::Hot)?;
    let pin_each = run_mode(Mode::PinEach)?;
    uaf += view_uaf;
    let (c, e, _) = phase(
        t,
        s,
        |i, stop| walk_loop(&table, i, stop, len, b, Mode::Cached),
        Some(spin),
    )?;
    let busy = per_thread(&c, e);
    let (c, e, ops) = phase(
        t,
        s,
        |i, stop| walk_loop(&table, i, stop, len, b, Mode::Cached),
        Some(|stop: &AtomicBool| storm(&table, stop, host, len, a.storm_rate)),
    )?;
    uaf += c.iter().map(|x| x.uaf).sum::<u64>();
    let under = per_thread(&c, e);
    let total: u64 = c.iter().map(|x| x.n).sum();
    let failed: u64 = c.iter().map(|x| x.failed).sum();
    let shootdowns: u64 = c.iter().map(|x| x.shootdowns).sum();
    let storm_rate = ops as f64 / e;
    uaf += table.stats().use_after_free;

    let rw = RwTable::new(len);
    let (c, e, _) = phase(t, s, |i, stop| rwlock_loop(&rw, i, stop, len, b), none)?;
    let rwlock = per_thread(&c, e);
    let (c, e, rw_ops) = phase(
        t,
        s,
        |i, stop| rwlock_loop(&rw, i, stop, len, b),
        Some(|stop: &AtomicBool| Ok(rwlock_storm(&rw, stop, len, storm_rate))),
    )?;
    let rwlock_under = per_thread(&c, e);
    let rw_rate = rw_ops as f64 / e;

    let nregions = 4u64;
    let rlen = len / nregions;
    let ranges: Vec<(GuestAddress, usize)> = (0..nregions)
        .map(|i| (GuestAddress(i * rlen), rlen as usize))
        .collect();
    let vmm = GuestMemoryMmap::<()>::from_ranges(&ranges)
        .map_err(|e| anyhow::anyhow!("vm-memory could not map its regions: {e:?}"))?;
    let (c, e, _) = phase(t, s, |i, stop| vm_memory_loop(&vmm, i, stop, len, b), none)?;
    let vm_memory = per_thread(&c, e);
    drop(vmm);

    let m = |x: f64| x / 1e6;
    log += &format!(
        "  fast walk, cached path     {:>8.1} M/s per thread\n",
        m(walk)
    );
    log += &format!("  fast walk, uncached        {:>8.1} M/s\n", m(uncached));
    log += &format!("  fast walk, hot (64 pages)  {:>8.1} M/s\n", m(hot));
    log += &format!("  fast walk, pin each        {:>8.1} M/s\n", m(pin_each));
    log += &format!(
        "  vm-memory view of the walk {:>8.1} M/s ({:.2}x the cached path; {VIEW_OP})\n",
        m(view),
        view / walk
    );
    log += &format!("  fast walk, busy neighbour  {:>8.1} M/s\n", m(busy));
    log += &format!(
        "  fast walk, under storm     {:>8.1} M/s ({:.2}x; storm {:.0} unmap+remap/s, {:.2}% unmapped hits, {} shootdowns)\n",
        m(under),
        under / walk,
        storm_rate,
        failed as f64 * 100.0 / total.max(1) as f64,
        shootdowns
    );
    log += &format!("  RwLock<Vec>                {:>8.1} M/s\n", m(rwlock));
    log += &format!(
        "  RwLock<Vec>, under storm   {:>8.1} M/s ({:.2}x; storm paced at {:.0}/s)\n",
        m(rwlock_under),
        rwlock_under / rwlock,
        rw_rate
    );
    log += &format!(
        "  vm-memory get_host_address{:>8.1} M/s ({nregions} regions)\n",
        m(vm_memory)
    );
    if t as usize + 1 > cores {
        log += &format!(
            "  note: {t} walker(s) + 1 storm thread on {cores} cores: the storm phases share cores\n"
        );
    }
    log += &format!("  use-after-free reads: {uaf}\n");
    crate::say(a.json, &log);
    let j = WalkJson {
        tool: "bench-walk",
        threads: t,
        cores,
        membarrier: crate::membarrier(),
        storm_oversubscribed: t as usize + 1 > cores,
        seconds_per_phase: s,
        mem_bytes: len,
        batch: b,
        walk_per_s: walk.round(),
        walk_uncached_per_s: uncached.round(),
        walk_hot_per_s: hot.round(),
        walk_pin_each_per_s: pin_each.round(),
        walk_under_unmap_per_s: under.round(),
        walk_under_unmap_unmapped_pct: round(failed as f64 * 100.0 / total.max(1) as f64, 3),
        storm_rate_requested: a.storm_rate,
        storm_ops_per_s: round(storm_rate, 1),
        storm_shootdowns: shootdowns,
        under_unmap_ratio: round(under / walk, 3),
        walk_busy_neighbour_per_s: busy.round(),
        under_unmap_vs_busy_ratio: round(under / busy, 3),
        rwlock_per_s: rwlock.round(),
        rwlock_under_unmap_per_s: rwlock_under.round(),
        rwlock_storm_ops_per_s: round(rw_rate, 1),
        rwlock_under_unmap_ratio: round(rwlock_under / rwlock, 3),
        vm_memory_per_s: vm_memory.round(),
        vm_memory_regions: nregions as usize,
        walk_vs_rwlock: round(walk / rwlock, 3),
        walk_vs_vm_memory: round(walk / vm_memory, 3),
        guest_memory_view_per_s: view.round(),
        guest_memory_view_op: VIEW_OP,
        guest_memory_view_vs_walk: round(view / walk, 3),
        guest_memory_view_vs_vm_memory: round(view / vm_memory, 3),
        use_after_free: uaf,
        targets: WalkTargets {
            walk_ge_50m_per_s: walk >= 50e6,
            under_unmap_ge_0_8x: under >= 0.8 * walk,
        },
    };
    crate::emit_json(a.json, &j)?;
    if uaf > 0 {
        bail!("{uaf} walks read a freed table page");
    }
    Ok(())
}
