//! `gmm bench walk`: translations per second per thread through the
//! lockless fast walk, alone and under an unmap/remap storm, beside
//! baselines measured in the same run:
//!
//! - vm-memory's `GuestMemoryMmap` lookup (`get_host_address`) over one
//!   region (a lookup with no table at all: `vm_memory_per_s`) and over
//!   four (`vm_memory_4_regions_per_s`); vm-memory has no unmap, so it is
//!   measured without a storm;
//! - an `RwLock<Vec<u64>>` page map read-locked per translation, with a
//!   writer storm paced to the guest-mm storm's measured rate (so both
//!   tables suffer the same number of unmap/remap operations per second);
//! - a lock-free page map of the same size (`page_map_unlocked_per_s`), one
//!   word per 4 KiB page read with one relaxed load: one random load from
//!   2 MiB per GiB, the footprint of the stage-2 leaf entries, so the
//!   memory bound of any page-granular translation. Under a storm paced
//!   to the guest-mm storm's rate, writing the same 4 KiB of entries per
//!   operation (cleared, then set again) with nothing else to do
//!   (`page_map_under_unmap_per_s`), it is the bound of the walk under
//!   the storm: the walker's loads of lines another core just wrote are
//!   served from that core's cache instead of a shared one, whatever the
//!   table's protocol;
//!
//! Beside the direct fast walk, the same translations go through guest-mm's
//! vm-memory view of a read section (`WalkGuard::memory`, vm-memory's
//! `GuestMemory`): `get_slices(addr, 8, Permissions::Read)` taking the
//! first slice's host pointer (no memory is read, as in the other loops),
//! reported as `guest_memory_view_per_s` and its ratio to the direct walk.
//! Its baseline is vm-memory's own `GuestMemoryMmap` over one region
//! through the same call for the same addresses (`vm_memory_slices_per_s`):
//! the `GuestMemory` path with no table, which costs more than the bare
//! `get_host_address` before any table takes part.
//!
//! **Trustworthy figures on a noisy machine.** Every phase runs once per
//! round, `--rounds` rounds (default 5). The phases a target compares run
//! back to back in one unit (the walk alone, under the storm, and the
//! page map under a storm paced to the same rate and alone; vm-memory's
//! lookups beside the walk; the `RwLock` map alone and under its storm),
//! and the order of the units is rotated every round, so a slow stretch
//! of the machine (other processes, frequency changes, the host under
//! this VM) lands on a different unit each time and on both sides of a
//! comparison alike. Each figure is the median of its rounds,
//! with the lowest and highest round beside it (`spread`); each ratio is
//! the median of the per-round ratios, with its spread too.
//!
//! The stage-2 table is mapped at 4 KiB leaves over reserved anonymous
//! memory that is never touched (`MAP_NORESERVE`), registered as simulated
//! backing so that the storm releases nothing: a translation never
//! dereferences it, and the view's slices point at memory that exists.
//! Each walker pins once per batch of translations of pseudo-random
//! addresses (xorshift), or of consecutive pages (`sequential`); a
//! pin-per-translation figure is reported too. A second table maps the same
//! memory at 2 MiB leaves (THP-backed guest RAM): its random cached walk is
//! `walk_2m_per_s`. A third maps the same memory at 4 KiB leaves but
//! opens its first GiB with a 2 MiB map first, so that the leaf arena's
//! part for that GiB keeps 4 KiB pages (guest-mm puts a GiB mapped whole
//! at 4 KiB leaves in one huge page: `LeafArena::prefer_huge`): its random
//! cached walk, `walk_small_arena_per_s`, is what the huge page wins
//! (`walk_vs_small_arena`), measured in the same rounds. With `--mem` past
//! 1 GiB only the first GiB differs.
//!
//! The machine may have few cores: the storm thread competes with the
//! walkers for them. The JSON reports the core count and whether the
//! threads oversubscribe it, and a busy-neighbour phase (a thread that
//! only spins) measures what sharing the machine costs by itself.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_mm::{
    Access, BackingKind, BackingRegion, Gpa, Hva, PageSize, Perms, Stage2Table, TableConfig,
    UnmapMode,
};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions};

use crate::mem::{AnonRegion, HUGE, PAGE};
use crate::rng::{median, round, Rng};
use crate::schema::{Spread, WalkResult, WalkTargets};
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
    /// Seconds per measurement phase (seventeen phases per round).
    #[arg(long, default_value = "0.5", value_parser = crate::units::parse_seconds)]
    pub seconds: f64,
    /// Rounds: every phase runs once per round, the units of phases that
    /// are compared in a rotated order; the median round is reported, with
    /// the spread.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
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

/// The phases of one round, in their unrotated order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Walk(Mode),
    /// The cached path over a second table of the same memory mapped at
    /// 2 MiB leaves (THP-backed guest RAM).
    Walk2M,
    /// The cached path over a third table at 4 KiB leaves whose first
    /// GiB's leaf arena part keeps 4 KiB pages.
    WalkSmallArena,
    View,
    Busy,
    Storm,
    RwLock,
    RwLockStorm,
    PageMap,
    PageMapStorm,
    VmMemory1,
    VmMemory4,
    /// vm-memory's own `GuestMemory` path over its one region: the view's
    /// call (`get_slices`) with no table at all.
    VmMemorySlices,
}

/// The phases of one round in units, in their unrotated order: a unit's
/// phases run back to back in the order given, and the units' order is
/// rotated every round. The figures a target compares share a unit, each
/// next to or near its counterpart, so that they meet the same stretch
/// of the machine: on this host what another core's writes cost a
/// reader swung from under a tenth to a half of its rate within a run
/// (the walker kept its CPU throughout), and the walk under the storm,
/// nine phases away from the walk alone when every phase rotated on its
/// own, read 0.41-1.01x of it while the page map's bound, measured back
/// to back, read 0.50-0.94x.
/// The storm comes before the baselines paced to its rate.
const UNITS: [&[Phase]; 10] = [
    &[
        Phase::VmMemorySlices,
        Phase::View,
        Phase::VmMemory1,
        Phase::Walk(Mode::Cached),
        Phase::Storm,
        Phase::PageMapStorm,
        Phase::PageMap,
    ],
    &[Phase::RwLock, Phase::RwLockStorm],
    &[Phase::Walk2M],
    &[Phase::WalkSmallArena],
    &[Phase::Walk(Mode::Uncached)],
    &[Phase::Walk(Mode::Hot)],
    &[Phase::Walk(Mode::Sequential)],
    &[Phase::Walk(Mode::PinEach)],
    &[Phase::Busy],
    &[Phase::VmMemory4],
];

/// Round `r`'s phases: the units rotated by `r`, each unit in its order.
fn round_phases(r: usize) -> impl Iterator<Item = Phase> {
    (0..UNITS.len()).flat_map(move |k| UNITS[(k + r) % UNITS.len()].iter().copied())
}

/// How many phases a round runs.
fn phase_count() -> usize {
    UNITS.iter().map(|u| u.len()).sum()
}

/// Which walk loop a phase runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Cached,
    Uncached,
    Hot,
    Sequential,
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

/// One walker thread of a `Walk` phase. Always inlined, so that each
/// phase's closure gets a loop compiled for its constant `mode`.
#[inline(always)]
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
    // Sequential: consecutive pages from a random one, wrapping.
    let mut next_page = addr(&mut rng, len) & !(PAGE - 1);
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
                        Mode::Sequential => {
                            let a = next_page;
                            next_page += PAGE;
                            if next_page >= len {
                                next_page = 0;
                            }
                            a
                        }
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
        slices_batch(&g.memory(), &mut rng, len, batch, &mut c, &mut sink);
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

/// A baseline page map's word for mapped page `p`: `hva | perms` (0 is
/// unmapped).
fn mapped_entry(p: u64) -> u64 {
    (FAKE_HVA + p * PAGE) | 3
}

/// The baseline page map: one word per 4 KiB page ([`mapped_entry`]).
struct RwTable {
    map: RwLock<Vec<u64>>,
}

impl RwTable {
    fn new(len: u64) -> RwTable {
        let v = (0..len / PAGE).map(mapped_entry).collect();
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
            m[p as usize] = if mapped { mapped_entry(p) } else { 0 };
        }
    }
}

/// The lock-free page map: one word per 4 KiB page, `hva | perms`, 0 =
/// unmapped, read and written with relaxed atomics (plain loads and
/// stores on x86-64).
struct FlatMap {
    map: Vec<AtomicU64>,
}

impl FlatMap {
    fn new(len: u64) -> FlatMap {
        let map = (0..len / PAGE)
            .map(|p| AtomicU64::new(mapped_entry(p)))
            .collect();
        FlatMap { map }
    }

    /// Clears, then sets again, the entries of `[gpa, gpa + len)`: the
    /// stores an unmap and a remap make to the leaf entries.
    fn cycle(&self, gpa: u64, len: u64) {
        let pages = gpa / PAGE..(gpa + len) / PAGE;
        for p in pages.clone() {
            self.map[p as usize].store(0, Ordering::Relaxed);
        }
        for p in pages {
            self.map[p as usize].store(mapped_entry(p), Ordering::Relaxed);
        }
    }
}

/// A baseline's storm: `op` on a random 2 MiB of `[0, len)`, paced at
/// `rate` operations per second (the guest-mm storm's sequence of ranges);
/// returns the operations done.
fn paced_storm(stop: &AtomicBool, len: u64, rate: f64, mut op: impl FnMut(u64)) -> u64 {
    let mut rng = Rng::new(0xfeed);
    let mut ops = 0u64;
    let pacer = Pacer::new(Some(rate));
    while !stop.load(Ordering::Relaxed) {
        if !pacer.due(ops) {
            continue;
        }
        op(rng.below(len / HUGE) * HUGE);
        ops += 1;
    }
    ops
}

/// The lock-free page map's storm: a random 2 MiB cleared and set again
/// per operation.
fn page_map_storm(t: &FlatMap, stop: &AtomicBool, len: u64, rate: f64) -> u64 {
    paced_storm(stop, len, rate, |r| t.cycle(r, HUGE))
}

/// One random relaxed load from a 2 MiB array per translation at 1 GiB,
/// the same footprint as the stage-2 leaf entries, so the bound of any
/// page-granular map on this machine (alone, and under its storm).
fn page_map_loop(t: &FlatMap, i: usize, stop: &AtomicBool, len: u64, batch: u32) -> Count {
    let map: &[AtomicU64] = &t.map;
    let mut rng = Rng::new(0x1234_5678 + i as u64 * 0x9e37_79b9);
    let mut c = Count::default();
    let mut sink = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..batch {
            let gpa = addr(&mut rng, len);
            match map
                .get((gpa / PAGE) as usize)
                .map(|e| e.load(Ordering::Relaxed))
            {
                Some(e) if e & 1 != 0 => sink ^= (e & !(PAGE - 1)) + (gpa & (PAGE - 1)),
                _ => c.failed += 1,
            }
        }
        c.n += u64::from(batch);
    }
    black_box(sink);
    c
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

/// The `RwLock` baseline's storm: a random 2 MiB unmapped and mapped
/// again per operation, each under the write lock.
fn rwlock_storm(t: &RwTable, stop: &AtomicBool, len: u64, rate: f64) -> u64 {
    paced_storm(stop, len, rate, |r| {
        t.set_range(r, HUGE, false);
        t.set_range(r, HUGE, true);
    })
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

/// vm-memory's own `GuestMemoryMmap` through the view's call: one
/// `get_slices(addr, 8, Read)` per address, keeping the first slice's host
/// pointer (as [`view_loop`] does through the table).
fn vm_memory_slices_loop(
    m: &GuestMemoryMmap,
    i: usize,
    stop: &AtomicBool,
    len: u64,
    batch: u32,
) -> Count {
    let mut rng = Rng::new(0x1234_5678 + i as u64 * 0x9e37_79b9);
    let mut c = Count::default();
    let mut sink = 0u64;
    while !stop.load(Ordering::Relaxed) {
        slices_batch(m, &mut rng, len, batch, &mut c, &mut sink);
    }
    black_box(sink);
    c
}

/// `batch` translations through `m`'s `GuestMemory::get_slices(addr, 8,
/// Read)` of random addresses, each keeping the first slice's host
/// pointer: the loop of [`view_loop`] and [`vm_memory_slices_loop`].
#[inline(always)]
fn slices_batch<M: GuestMemory>(
    m: &M,
    rng: &mut Rng,
    len: u64,
    batch: u32,
    c: &mut Count,
    sink: &mut u64,
) {
    for _ in 0..batch {
        let a = GuestAddress(addr(rng, len));
        match GuestMemory::get_slices(m, a, 8, Permissions::Read).map(|mut s| s.next()) {
            Ok(Some(Ok(s))) => *sink ^= s.ptr_guard().as_ptr() as u64,
            _ => c.failed += 1,
        }
    }
    c.n += u64::from(batch);
}

/// What one phase of one round measured (all walkers together).
#[derive(Default, Clone, Copy)]
struct Measured {
    /// Translations per second per walker thread.
    rate: f64,
    failed: u64,
    total: u64,
    shootdowns: u64,
    uaf: u64,
    /// The storm's operations per second (storm phases).
    storm_ops_per_s: f64,
}

/// What every phase needs.
struct Bench<'a> {
    table: &'a Arc<Stage2Table>,
    /// The same memory mapped at 2 MiB leaves.
    table_2m: &'a Arc<Stage2Table>,
    /// The same memory at 4 KiB leaves, the first GiB's arena part in
    /// 4 KiB pages.
    table_small_arena: &'a Arc<Stage2Table>,
    host: u64,
    len: u64,
    threads: u32,
    secs: f64,
    batch: u32,
    storm_rate: Option<f64>,
    rw: &'a RwTable,
    flat: &'a FlatMap,
    vm1: &'a GuestMemoryMmap,
    vm4: &'a GuestMemoryMmap,
}

impl Bench<'_> {
    /// Run one phase; `rw_rate` paces the baselines' storms.
    fn run(&self, p: Phase, rw_rate: f64) -> Result<Measured> {
        let none = None::<fn(&AtomicBool) -> Result<u64>>;
        let (t, s, b, len) = (self.threads, self.secs, self.batch, self.len);
        let table = self.table;
        let (c, e, ops) = match p {
            // One closure per mode, so that each loop is compiled for its
            // mode (as the baselines' loops are) rather than testing it
            // per translation.
            Phase::Walk(Mode::Cached) => phase(
                t,
                s,
                |i, stop| walk_loop(table, i, stop, len, b, Mode::Cached),
                none,
            )?,
            Phase::Walk(Mode::Uncached) => phase(
                t,
                s,
                |i, stop| walk_loop(table, i, stop, len, b, Mode::Uncached),
                none,
            )?,
            Phase::Walk(Mode::Hot) => phase(
                t,
                s,
                |i, stop| walk_loop(table, i, stop, len, b, Mode::Hot),
                none,
            )?,
            Phase::Walk(Mode::Sequential) => phase(
                t,
                s,
                |i, stop| walk_loop(table, i, stop, len, b, Mode::Sequential),
                none,
            )?,
            Phase::Walk(Mode::PinEach) => phase(
                t,
                s,
                |i, stop| walk_loop(table, i, stop, len, b, Mode::PinEach),
                none,
            )?,
            Phase::Walk2M => phase(
                t,
                s,
                |i, stop| walk_loop(self.table_2m, i, stop, len, b, Mode::Cached),
                none,
            )?,
            Phase::WalkSmallArena => phase(
                t,
                s,
                |i, stop| walk_loop(self.table_small_arena, i, stop, len, b, Mode::Cached),
                none,
            )?,
            Phase::View => phase(t, s, |i, stop| view_loop(table, i, stop, len, b), none)?,
            Phase::Busy => phase(
                t,
                s,
                |i, stop| walk_loop(table, i, stop, len, b, Mode::Cached),
                Some(spin),
            )?,
            Phase::Storm => phase(
                t,
                s,
                |i, stop| walk_loop(table, i, stop, len, b, Mode::Cached),
                Some(|stop: &AtomicBool| storm(table, stop, self.host, len, self.storm_rate)),
            )?,
            Phase::RwLock => phase(t, s, |i, stop| rwlock_loop(self.rw, i, stop, len, b), none)?,
            Phase::RwLockStorm => phase(
                t,
                s,
                |i, stop| rwlock_loop(self.rw, i, stop, len, b),
                Some(|stop: &AtomicBool| Ok(rwlock_storm(self.rw, stop, len, rw_rate))),
            )?,
            Phase::PageMap => phase(
                t,
                s,
                |i, stop| page_map_loop(self.flat, i, stop, len, b),
                none,
            )?,
            Phase::PageMapStorm => phase(
                t,
                s,
                |i, stop| page_map_loop(self.flat, i, stop, len, b),
                Some(|stop: &AtomicBool| Ok(page_map_storm(self.flat, stop, len, rw_rate))),
            )?,
            Phase::VmMemory1 => phase(
                t,
                s,
                |i, stop| vm_memory_loop(self.vm1, i, stop, len, b),
                none,
            )?,
            Phase::VmMemory4 => phase(
                t,
                s,
                |i, stop| vm_memory_loop(self.vm4, i, stop, len, b),
                none,
            )?,
            Phase::VmMemorySlices => phase(
                t,
                s,
                |i, stop| vm_memory_slices_loop(self.vm1, i, stop, len, b),
                none,
            )?,
        };
        Ok(Measured {
            rate: per_thread(&c, e),
            failed: c.iter().map(|x| x.failed).sum(),
            total: c.iter().map(|x| x.n).sum(),
            shootdowns: c.iter().map(|x| x.shootdowns).sum(),
            uaf: c.iter().map(|x| x.uaf).sum(),
            storm_ops_per_s: ops as f64 / e,
        })
    }
}

/// The JSON name of a phase's rate.
fn rate_key(p: Phase) -> &'static str {
    match p {
        Phase::Walk(Mode::Cached) => "walk_per_s",
        Phase::Walk(Mode::Uncached) => "walk_uncached_per_s",
        Phase::Walk(Mode::Hot) => "walk_hot_per_s",
        Phase::Walk(Mode::Sequential) => "walk_sequential_per_s",
        Phase::Walk(Mode::PinEach) => "walk_pin_each_per_s",
        Phase::Walk2M => "walk_2m_per_s",
        Phase::WalkSmallArena => "walk_small_arena_per_s",
        Phase::View => "guest_memory_view_per_s",
        Phase::Busy => "walk_busy_neighbour_per_s",
        Phase::Storm => "walk_under_unmap_per_s",
        Phase::RwLock => "rwlock_per_s",
        Phase::RwLockStorm => "rwlock_under_unmap_per_s",
        Phase::PageMap => "page_map_unlocked_per_s",
        Phase::PageMapStorm => "page_map_under_unmap_per_s",
        Phase::VmMemory1 => "vm_memory_per_s",
        Phase::VmMemory4 => "vm_memory_4_regions_per_s",
        Phase::VmMemorySlices => "vm_memory_slices_per_s",
    }
}

/// Ratios computed within each round: (JSON name, numerator, denominator).
const RATIOS: [(&str, &str, &str); 16] = [
    ("walk_vs_vm_memory", "walk_per_s", "vm_memory_per_s"),
    (
        "walk_vs_small_arena",
        "walk_per_s",
        "walk_small_arena_per_s",
    ),
    (
        "walk_vs_vm_memory_4_regions",
        "walk_per_s",
        "vm_memory_4_regions_per_s",
    ),
    ("walk_vs_rwlock", "walk_per_s", "rwlock_per_s"),
    ("under_unmap_ratio", "walk_under_unmap_per_s", "walk_per_s"),
    (
        "under_unmap_vs_busy_ratio",
        "walk_under_unmap_per_s",
        "walk_busy_neighbour_per_s",
    ),
    (
        "under_unmap_vs_rwlock_under_unmap",
        "walk_under_unmap_per_s",
        "rwlock_under_unmap_per_s",
    ),
    (
        "rwlock_under_unmap_ratio",
        "rwlock_under_unmap_per_s",
        "rwlock_per_s",
    ),
    (
        "guest_memory_view_vs_walk",
        "guest_memory_view_per_s",
        "walk_per_s",
    ),
    (
        "guest_memory_view_vs_vm_memory",
        "guest_memory_view_per_s",
        "vm_memory_per_s",
    ),
    (
        "guest_memory_view_vs_vm_memory_slices",
        "guest_memory_view_per_s",
        "vm_memory_slices_per_s",
    ),
    (
        "guest_memory_view_vs_rwlock",
        "guest_memory_view_per_s",
        "rwlock_per_s",
    ),
    (
        "vm_memory_slices_vs_vm_memory",
        "vm_memory_slices_per_s",
        "vm_memory_per_s",
    ),
    ("walk_vs_walk_uncached", "walk_per_s", "walk_uncached_per_s"),
    (
        "walk_vs_page_map_unlocked",
        "walk_per_s",
        "page_map_unlocked_per_s",
    ),
    (
        "page_map_under_unmap_ratio",
        "page_map_under_unmap_per_s",
        "page_map_unlocked_per_s",
    ),
];

/// The per-round ratio of the walk's share under the storm to the page
/// map's (`under_unmap_ratio / page_map_under_unmap_ratio`, round by round).
const VS_BOUND: &str = "under_unmap_vs_page_map_bound";

/// A table over `len` bytes of simulated backing at `host`, all of it
/// mapped at `leaf` leaves.
fn simulated_table(host: u64, len: u64, leaf: PageSize) -> Result<Arc<Stage2Table>> {
    simulated_table_in(host, len, leaf, &[(0, len)])
}

/// [`simulated_table`] at 4 KiB leaves, mapped in two steps (the first
/// 2 MiB, then the rest), so that no map covers the first GiB whole and
/// its leaf arena part keeps 4 KiB pages.
fn small_arena_table(host: u64, len: u64) -> Result<Arc<Stage2Table>> {
    let first = HUGE.min(len);
    simulated_table_in(
        host,
        len,
        PageSize::Size4K,
        &[(0, first), (first, len - first)],
    )
}

/// A table over `len` bytes of simulated backing at `host`, mapped at
/// `leaf` leaves by one map per `(offset, length)` step (empty ones
/// skipped).
fn simulated_table_in(
    host: u64,
    len: u64,
    leaf: PageSize,
    steps: &[(u64, u64)],
) -> Result<Arc<Stage2Table>> {
    let table = Stage2Table::new(TableConfig::default())
        .with_context(|| format!("creating the table ({leaf} leaves)"))?;
    table
        .register_backing(BackingRegion {
            hva: Hva(host),
            len,
            kind: BackingKind::Simulated { hook: None },
        })
        .with_context(|| format!("registering simulated backing ({leaf} leaves)"))?;
    for &(at, n) in steps.iter().filter(|s| s.1 > 0) {
        table
            .map(Gpa(at), Hva(host + at), n, Perms::RW, leaf)
            .with_context(|| format!("mapping the table at {leaf} leaves"))?;
    }
    Ok(table)
}

/// Run `gmm bench walk`.
pub fn cmd(a: &WalkArgs) -> Result<()> {
    let len = a.mem;
    if !len.is_multiple_of(HUGE) {
        bail!("--mem {} is not a multiple of 2 MiB", human_bytes(len));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Reserved, never touched: no RSS, nothing released (simulated).
    // 2 MiB-aligned, so that the second table can map it at 2 MiB leaves.
    let backing = AnonRegion::new(len, PageSize::Size2M).context("reserving the backing")?;
    let host = backing.base;
    let table = simulated_table(host, len, PageSize::Size4K)?;
    let table_2m = simulated_table(host, len, PageSize::Size2M)?;
    let table_small_arena = small_arena_table(host, len)?;
    {
        let mut w = table_2m.walker();
        let g = w.pin();
        let leaf = g.translate(Gpa(0), Access::Read).map(|t| t.size);
        if leaf != Ok(PageSize::Size2M) {
            bail!("the 2 MiB table translates guest address 0 as {leaf:?}, not a 2 MiB leaf");
        }
    }
    let rw = RwTable::new(len);
    let flat = FlatMap::new(len);
    let vm_regions = |n: u64| -> Result<GuestMemoryMmap> {
        let rlen = len / n;
        let ranges: Vec<(GuestAddress, usize)> = (0..n)
            .map(|i| (GuestAddress(i * rlen), rlen as usize))
            .collect();
        GuestMemoryMmap::<()>::from_ranges(&ranges)
            .map_err(|e| anyhow::anyhow!("vm-memory could not map its {n} region(s): {e:?}"))
    };
    let vm1 = vm_regions(1)?;
    // A multiple of 2 MiB splits into four page-aligned regions.
    let vm4 = vm_regions(4)?;
    let bench = Bench {
        table: &table,
        table_2m: &table_2m,
        table_small_arena: &table_small_arena,
        host,
        len,
        threads: a.threads,
        secs: a.seconds,
        batch: a.batch,
        storm_rate: a.storm_rate,
        rw: &rw,
        flat: &flat,
        vm1: &vm1,
        vm4: &vm4,
    };
    let (t, s, b) = (a.threads, a.seconds, a.batch);
    let mut log = format!(
        "walk: {} walker thread(s) on {cores} cores, {} at 4 KiB leaves, {} rounds of {} phases of {s} s (units of phases that are compared run back to back; the units' order rotated each round), {b} translations per pin, {}\n",
        t,
        human_bytes(len),
        a.rounds,
        phase_count(),
        if crate::membarrier() { "membarrier fences" } else { "SeqCst fences (no membarrier)" }
    );
    let mut per: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut storm_rates: Vec<f64> = Vec::new();
    let mut rw_rates: Vec<f64> = Vec::new();
    let mut flat_rates: Vec<f64> = Vec::new();
    let (mut uaf, mut storm_failed, mut storm_total, mut shootdowns) = (0u64, 0u64, 0u64, 0u64);
    for r in 0..a.rounds as usize {
        let mut round_rates: BTreeMap<&'static str, f64> = BTreeMap::new();
        let mut this_storm: Option<f64> = None;
        for p in round_phases(r) {
            // The baselines' storms are paced at the guest-mm storm's rate:
            // this round's if measured already, else the median so far
            // (round 0 runs the units unrotated, the guest-mm storm first).
            let rw_rate = a
                .storm_rate
                .or(this_storm)
                .unwrap_or_else(|| median(&storm_rates));
            let m = bench.run(p, rw_rate)?;
            uaf += m.uaf;
            match p {
                Phase::Storm => {
                    this_storm = Some(m.storm_ops_per_s);
                    storm_rates.push(m.storm_ops_per_s);
                    storm_failed += m.failed;
                    storm_total += m.total;
                    shootdowns += m.shootdowns;
                }
                Phase::RwLockStorm => rw_rates.push(m.storm_ops_per_s),
                Phase::PageMapStorm => flat_rates.push(m.storm_ops_per_s),
                _ => {}
            }
            round_rates.insert(rate_key(p), m.rate);
        }
        let mut round_ratios: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (name, num, den) in RATIOS {
            let (n, d) = (round_rates[num], round_rates[den]);
            round_ratios.insert(name, n / d.max(1.0));
        }
        // The storm target against its bound, per round: the share the
        // walk kept over the share the page map kept, both measured in the
        // same unit.
        let bound = round_ratios["page_map_under_unmap_ratio"].max(f64::MIN_POSITIVE);
        round_ratios.insert(VS_BOUND, round_ratios["under_unmap_ratio"] / bound);
        for (k, v) in round_ratios {
            per.entry(k).or_default().push(v);
        }
        for (k, v) in round_rates {
            per.entry(k).or_default().push(v);
        }
    }
    uaf += table.stats().use_after_free;
    drop(vm1);
    drop(vm4);

    let mut spread: BTreeMap<&'static str, Spread> = BTreeMap::new();
    for (k, v) in &per {
        let digits = if k.ends_with("_per_s") { 0 } else { 3 };
        spread.insert(k, crate::rng::spread(v, digits));
    }
    let med = |k: &str| spread.get(k).map_or(0.0, |s| s.median);
    let m = |x: f64| x / 1e6;
    let line = |name: &str, k: &str| -> String {
        let sp = spread.get(k).copied().unwrap_or(Spread {
            min: 0.0,
            median: 0.0,
            max: 0.0,
        });
        format!(
            "  {name:<34}{:>8.1} M/s  [{:.1} .. {:.1}]\n",
            m(sp.median),
            m(sp.min),
            m(sp.max)
        )
    };
    let rline = |name: &str, k: &str| -> String {
        let sp = spread.get(k).copied().unwrap_or(Spread {
            min: 0.0,
            median: 0.0,
            max: 0.0,
        });
        format!(
            "  {name:<34}{:>8.2}x     [{:.2} .. {:.2}]\n",
            sp.median, sp.min, sp.max
        )
    };
    log += "  per walker thread, median round [lowest .. highest round]\n";
    const RATES: [(&str, &str); 17] = [
        ("fast walk, cached path", "walk_per_s"),
        ("fast walk, arena in 4 KiB pages", "walk_small_arena_per_s"),
        ("fast walk, uncached", "walk_uncached_per_s"),
        ("fast walk, hot (64 pages)", "walk_hot_per_s"),
        ("fast walk, sequential pages", "walk_sequential_per_s"),
        ("fast walk, 2 MiB leaves", "walk_2m_per_s"),
        ("fast walk, pin each", "walk_pin_each_per_s"),
        ("vm-memory view of the walk", "guest_memory_view_per_s"),
        ("fast walk, busy neighbour", "walk_busy_neighbour_per_s"),
        ("fast walk, under storm", "walk_under_unmap_per_s"),
        ("RwLock<Vec>", "rwlock_per_s"),
        ("RwLock<Vec>, under storm", "rwlock_under_unmap_per_s"),
        ("page map, no lock (load bound)", "page_map_unlocked_per_s"),
        (
            "page map, no lock, under storm",
            "page_map_under_unmap_per_s",
        ),
        ("vm-memory get_host_address (1)", "vm_memory_per_s"),
        (
            "vm-memory get_host_address (4)",
            "vm_memory_4_regions_per_s",
        ),
        ("vm-memory get_slices (1)", "vm_memory_slices_per_s"),
    ];
    const RATIO_LINES: [(&str, &str); 16] = [
        ("walk / vm-memory (1 region)", "walk_vs_vm_memory"),
        ("walk / arena in 4 KiB pages", "walk_vs_small_arena"),
        (
            "walk / vm-memory (4 regions)",
            "walk_vs_vm_memory_4_regions",
        ),
        ("walk / RwLock", "walk_vs_rwlock"),
        ("walk / page map, no lock", "walk_vs_page_map_unlocked"),
        ("under storm / alone", "under_unmap_ratio"),
        ("under storm / busy neighbour", "under_unmap_vs_busy_ratio"),
        (
            "under storm / RwLock under storm",
            "under_unmap_vs_rwlock_under_unmap",
        ),
        ("RwLock under storm / alone", "rwlock_under_unmap_ratio"),
        (
            "page map storm / alone (bound)",
            "page_map_under_unmap_ratio",
        ),
        ("walk's storm share / bound's", VS_BOUND),
        ("view / walk", "guest_memory_view_vs_walk"),
        (
            "view / vm-memory (1 region)",
            "guest_memory_view_vs_vm_memory",
        ),
        (
            "view / vm-memory get_slices (1)",
            "guest_memory_view_vs_vm_memory_slices",
        ),
        ("view / RwLock", "guest_memory_view_vs_rwlock"),
        (
            "vm-memory slices / host_addr",
            "vm_memory_slices_vs_vm_memory",
        ),
    ];
    for (name, k) in RATES {
        log += &line(name, k);
    }
    log += "  ratios, median of the rounds' ratios [lowest .. highest]\n";
    for (name, k) in RATIO_LINES {
        log += &rline(name, k);
    }
    let storm_rate = median(&storm_rates);
    let rw_rate = median(&rw_rates);
    let flat_rate = median(&flat_rates);
    let unmapped_pct = storm_failed as f64 * 100.0 / storm_total.max(1) as f64;
    log += &format!(
        "  storm: {storm_rate:.0} unmap+remap/s (median round), {unmapped_pct:.2}% unmapped hits, {shootdowns} shootdowns; RwLock storm paced at {rw_rate:.0}/s, page map storm at {flat_rate:.0}/s\n",
    );
    log += &format!("  view op: {VIEW_OP}\n");
    if t as usize + 1 > cores {
        log += &format!(
            "  note: {t} walker(s) + 1 storm thread on {cores} cores: the storm phases share cores\n"
        );
    }
    log += &format!("  use-after-free reads: {uaf}\n");
    crate::say(a.json, &log);
    let walk = med("walk_per_s");
    let under = med("walk_under_unmap_per_s");
    let j = WalkResult {
        tool: "bench-walk".into(),
        threads: t,
        cores,
        membarrier: crate::membarrier(),
        storm_oversubscribed: t as usize + 1 > cores,
        seconds_per_phase: s,
        rounds: a.rounds,
        mem_bytes: len,
        batch: b,
        walk_per_s: walk,
        walk_uncached_per_s: med("walk_uncached_per_s"),
        walk_hot_per_s: med("walk_hot_per_s"),
        walk_sequential_per_s: med("walk_sequential_per_s"),
        walk_2m_per_s: med("walk_2m_per_s"),
        walk_small_arena_per_s: med("walk_small_arena_per_s"),
        walk_vs_small_arena: med("walk_vs_small_arena"),
        walk_pin_each_per_s: med("walk_pin_each_per_s"),
        walk_under_unmap_per_s: under,
        walk_busy_neighbour_per_s: med("walk_busy_neighbour_per_s"),
        walk_under_unmap_unmapped_pct: round(unmapped_pct, 3),
        storm_rate_requested: a.storm_rate,
        storm_ops_per_s: round(storm_rate, 1),
        storm_shootdowns: shootdowns,
        under_unmap_ratio: med("under_unmap_ratio"),
        under_unmap_vs_busy_ratio: med("under_unmap_vs_busy_ratio"),
        rwlock_per_s: med("rwlock_per_s"),
        rwlock_under_unmap_per_s: med("rwlock_under_unmap_per_s"),
        rwlock_storm_ops_per_s: round(rw_rate, 1),
        rwlock_under_unmap_ratio: med("rwlock_under_unmap_ratio"),
        vm_memory_per_s: med("vm_memory_per_s"),
        vm_memory_regions: 1,
        vm_memory_4_regions_per_s: med("vm_memory_4_regions_per_s"),
        page_map_unlocked_per_s: med("page_map_unlocked_per_s"),
        page_map_under_unmap_per_s: med("page_map_under_unmap_per_s"),
        page_map_storm_ops_per_s: round(flat_rate, 1),
        page_map_under_unmap_ratio: med("page_map_under_unmap_ratio"),
        under_unmap_vs_page_map_bound: med(VS_BOUND),
        walk_vs_rwlock: med("walk_vs_rwlock"),
        walk_vs_page_map_unlocked: med("walk_vs_page_map_unlocked"),
        walk_vs_vm_memory: med("walk_vs_vm_memory"),
        walk_vs_vm_memory_4_regions: med("walk_vs_vm_memory_4_regions"),
        under_unmap_vs_rwlock_under_unmap: med("under_unmap_vs_rwlock_under_unmap"),
        guest_memory_view_per_s: med("guest_memory_view_per_s"),
        guest_memory_view_op: VIEW_OP.into(),
        guest_memory_view_vs_walk: med("guest_memory_view_vs_walk"),
        guest_memory_view_vs_vm_memory: med("guest_memory_view_vs_vm_memory"),
        vm_memory_slices_per_s: med("vm_memory_slices_per_s"),
        guest_memory_view_vs_vm_memory_slices: med("guest_memory_view_vs_vm_memory_slices"),
        guest_memory_view_vs_rwlock: med("guest_memory_view_vs_rwlock"),
        vm_memory_slices_vs_vm_memory: med("vm_memory_slices_vs_vm_memory"),
        use_after_free: uaf,
        targets: WalkTargets {
            walk_ge_50m_per_s: walk >= 50e6,
            under_unmap_ge_0_8x: med("under_unmap_ratio") >= 0.8,
            walk_ge_0_8x_vm_memory: med("walk_vs_vm_memory") >= 0.8,
            walk_ge_1_2x_rwlock: med("walk_vs_rwlock") >= 1.2,
            under_unmap_ge_0_9x: med("under_unmap_ratio") >= 0.9,
            under_unmap_ge_1_2x_rwlock_under_unmap: med("under_unmap_vs_rwlock_under_unmap") >= 1.2,
        },
        spread: spread.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    };
    crate::emit_json(a.json, &j)?;
    if uaf > 0 {
        bail!("{uaf} walks read a freed table page");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every round runs every phase once, the storm before the baselines
    /// paced to its rate, and the four figures of the storm target back to
    /// back, whatever the rotation.
    #[test]
    fn every_round_runs_each_phase_once_with_the_storm_target_back_to_back() {
        let all: Vec<&str> = round_phases(0).map(rate_key).collect();
        assert_eq!(all.len(), phase_count());
        let mut keys = all.clone();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), all.len(), "a phase runs twice: {all:?}");
        for (_, num, den) in RATIOS {
            assert!(keys.contains(&num) && keys.contains(&den), "{num} / {den}");
        }
        for r in 0..2 * UNITS.len() {
            let order: Vec<&str> = round_phases(r).map(rate_key).collect();
            let at = |k: &str| order.iter().position(|&o| o == k).unwrap();
            let storm = at("walk_under_unmap_per_s");
            assert_eq!(at("walk_per_s") + 1, storm, "round {r}: {order:?}");
            assert_eq!(at("page_map_under_unmap_per_s"), storm + 1);
            assert_eq!(at("page_map_unlocked_per_s"), storm + 2);
            assert_eq!(at("vm_memory_per_s") + 2, storm);
            assert_eq!(at("rwlock_per_s") + 1, at("rwlock_under_unmap_per_s"));
            if r == 0 {
                assert!(storm < at("rwlock_under_unmap_per_s"));
            }
        }
    }
}
