//! `gmm bench fault`: userfaultfd demand-fault latency of a real VM's guest
//! RAM, quiet and under a concurrent unmap/balloon storm on other ranges
//! of the same VM (issue 12, goal 2).
//!
//! **What is timed.** A [`vmm::Vm`] is built in this process (KVM VM with
//! its memory slots, the stage-2 table, the userfaultfd handler with the
//! table's fault hook: everything `vmm run` has; its vCPUs are not run).
//! Before each phase the *victim* range is released through the monitor's
//! one release entry point ([`vmm::VmMemory::release`], `Discard`: armed,
//! one gather), so each of its 4 KiB pages is a *discarded* leaf. The
//! victim thread then reads one byte of each page, in a shuffled order,
//! through the host mapping that is registered with userfaultfd: exactly
//! the fault a vCPU's access raises (KVM's `get_user_pages` on the same
//! mapping), resolved by the same handler thread (message read, leaf-size
//! query, `UFFDIO_ZEROPAGE`, the table's `fault_in_range_if_unchanged`
//! commit, wake). One sample = the wall time of that read, as the faulting
//! thread sees it.
//!
//! **The storm** (storm phases only) runs on its own thread over the
//! *storm* range (the rest of RAM, disjoint from the victim's 2 MiB
//! windows): 1 MiB chunks in turn, alternately released `Discard` and
//! `Balloon` (the latter deflated right after, as a balloon driver giving
//! pages back), each through `VmMemory::release` (one gather each: table
//! lock holds, invalidation, grace period, `MADV_DONTNEED`). Then the
//! chunk is refilled so the next pass releases real memory again:
//! `--storm-refill touch` (default) writes each page through the host
//! mapping (demand faults through the same handler, as a guest reusing
//! its freed pages), `table` makes the entries present again in the table
//! only (`fault_in`; the memory stays unpopulated: a pure table-writer
//! storm whose releases are cheap for the kernel). `plain` is the
//! baseline without the monitor: the same release-and-rewrite loop on an
//! anonymous mapping of this process outside guest RAM (no table, no
//! handler), i.e. what the kernel (TLB shootdowns of the shared address
//! space, page faults) and the CPUs alone cost the victim.
//!
//! **Phases** of each round: `quiet` (victim alone), `storm`, the
//! *baseline* (unless `--no-baseline` or the storm is `plain` itself: the
//! victim beside a `plain` storm, no monitor, whose p99 is what such a
//! storm costs a faulting thread on this host through the kernel and the
//! CPUs: `p99_us_plain_storm`, `p99_ratio_plain_storm`), and `spin` (a
//! thread that only reads the clock, as long as the quiet phase took:
//! its longest gap is the environment's own stall, other helpers' load
//! and the hypervisor's included). Each phase goes first in turn; figures
//! are per-phase percentiles (nearest rank), and the JSON gives their
//! medians over rounds with the spread (min, max).
//!
//! **Placement.** The machine may have 2 cores; by default threads are
//! not pinned (the scheduler places the victim, the handler and the
//! storm). `--pin` puts the victim and the handler thread on CPU 0 and the
//! storm on CPU 1 (the placement is in the JSON), which isolates the
//! table-lock effect from CPU contention.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_mm::Gpa;
use serde::Serialize;
use vmm::guest::layout::WORKLOAD_START;
use vmm::{Backing, Console, MemSize, PageSize, ReleaseMode, Vm, VmConfig, VmMemory, Workload};

use crate::cpu::pin;
use crate::mem::AnonRegion;
use crate::rng::{median, round, Rng};
use crate::schema::{FaultResult, Spread};
use crate::units::human_bytes;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const SIZE_2M: u64 = 2 << 20;

/// Options of `gmm bench fault`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Guest RAM (a multiple of 2 MiB): the victim range plus the storm's.
    #[arg(long, default_value = "512M", value_parser = crate::units::parse_size)]
    pub mem: u64,
    /// Rounds (each: quiet, storm and spin phases); medians are reported.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// Demand faults timed per phase (one 4 KiB page each).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
    pub faults: u64,
    /// Bytes per storm release (a multiple of 4 KiB).
    #[arg(long, default_value = "1M", value_parser = crate::units::parse_size)]
    pub storm_chunk: u64,
    /// How the storm repopulates a chunk after releasing it.
    #[arg(long, value_enum, default_value_t = Refill::Touch)]
    pub storm_refill: Refill,
    /// Pin the victim and the fault handler to CPU 0, the storm to CPU 1.
    #[arg(long)]
    pub pin: bool,
    /// Leave out the baseline phase (a `plain` storm beside the victim,
    /// no monitor: what any such storm costs it on this host).
    #[arg(long)]
    pub no_baseline: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// How the storm refills a chunk it released.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refill {
    /// Write each page through the host mapping (demand faults through the
    /// handler, as a guest reusing its pages).
    Touch,
    /// Make the entries present in the table only (no memory touched).
    Table,
    /// Not the monitor: the same loop (`MADV_DONTNEED` of a chunk, then a
    /// write to each page) on an anonymous mapping of this process outside
    /// guest RAM, with no table and no handler: what the kernel and the
    /// CPUs alone cost the victim.
    Plain,
}

impl Refill {
    fn name(self) -> &'static str {
        match self {
            Refill::Touch => "touch",
            Refill::Table => "table",
            Refill::Plain => "plain",
        }
    }
}

/// p50 / p99 / max of a sample, µs.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub(crate) struct Pct {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

/// Nearest-rank percentiles of `v` (µs), which is sorted in place.
pub(crate) fn pct(v: &mut [f64]) -> Pct {
    if v.is_empty() {
        return Pct::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = (p * v.len() as f64).ceil().max(1.0) as usize;
        v[rank.min(v.len()) - 1]
    };
    Pct {
        n: v.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

/// The spread of latencies or rates over rounds, to 2 decimals.
pub(crate) fn spread(v: &[f64]) -> Spread {
    crate::rng::spread(v, 2)
}

/// The thread ids of this process's threads named `name`.
pub(crate) fn threads_named(name: &str) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == name)
            .then(|| e.file_name().to_str()?.parse().ok())
            .flatten()
    })
    .collect()
}

/// The environment's own stall: a thread that only reads the clock for
/// `d`; returns (longest gap µs, gaps over 50 µs per second).
pub(crate) fn spin_gaps(d: Duration) -> (f64, f64) {
    let t0 = Instant::now();
    let mut last = t0;
    let mut max = Duration::ZERO;
    let mut over = 0u64;
    loop {
        let now = Instant::now();
        let gap = now - last;
        if gap > Duration::from_micros(50) {
            over += 1;
        }
        max = max.max(gap);
        last = now;
        if now - t0 >= d {
            break;
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let rate = over as f64 / d.as_secs_f64().max(1e-9);
    (max.as_secs_f64() * 1e6, rate)
}

/// Reads one byte at host address `addr` of guest RAM (a demand fault if
/// its page was released); returns the wall time in µs.
///
/// # Safety
/// `addr` must lie in a live guest RAM mapping that outlives the call.
pub(crate) unsafe fn touch_timed(addr: u64) -> f64 {
    let t = Instant::now();
    // SAFETY: the caller's promise: a live mapping; a read changes nothing.
    let _ = unsafe { std::ptr::read_volatile(addr as *const u8) };
    t.elapsed().as_secs_f64() * 1e6
}

/// Host address of `gpa` in `mem` (which holds it).
pub(crate) fn host_of(mem: &VmMemory, gpa: u64) -> Result<u64> {
    let r = mem
        .regions()
        .into_iter()
        .find(|r| r.contains(gpa, PAGE))
        .with_context(|| format!("GPA {gpa:#x} is not in guest RAM"))?;
    Ok(r.host_addr as u64 + (gpa - r.gpa.0))
}

/// What the storm did in one phase.
#[derive(Debug, Default, Clone, Copy)]
struct StormDone {
    releases: u64,
    bytes: u64,
    secs: f64,
}

/// The `plain` storm: release and rewrite chunks of `r` until `stop`.
fn plain_storm(r: &AnonRegion, chunk: u64, stop: &AtomicBool) -> Result<StormDone> {
    let t = Instant::now();
    let mut done = StormDone::default();
    let mut off = 0;
    while !stop.load(Ordering::Relaxed) {
        if off + chunk > r.len {
            off = 0;
        }
        r.dontneed(off, chunk)?;
        for p in (off..off + chunk).step_by(PAGE as usize) {
            // SAFETY: inside `r`, a private mapping only this thread uses.
            unsafe { ((r.base + p) as *mut u8).write_volatile(1) };
        }
        off += chunk;
        done.releases += 1;
        done.bytes += chunk;
    }
    done.secs = t.elapsed().as_secs_f64();
    Ok(done)
}

/// The storm: releases and refills chunks of `[lo, hi)` until `stop`.
fn storm(
    mem: &VmMemory,
    lo: u64,
    hi: u64,
    chunk: u64,
    refill: Refill,
    stop: &AtomicBool,
    cursor: &AtomicU64,
) -> Result<StormDone> {
    let t = Instant::now();
    let host_lo = host_of(mem, lo)?;
    let table = mem.stage2().table();
    let mut done = StormDone::default();
    let mut balloon = false;
    while !stop.load(Ordering::Relaxed) {
        let mut at = cursor.load(Ordering::Relaxed);
        if at + chunk > hi || at < lo {
            at = lo;
        }
        cursor.store(at + chunk, Ordering::Relaxed);
        let mode = if balloon {
            ReleaseMode::Balloon
        } else {
            ReleaseMode::Discard
        };
        balloon = !balloon;
        mem.release(&[(at, chunk)], mode)
            .with_context(|| format!("storm release [{at:#x}, +{chunk:#x})"))?;
        if mode == ReleaseMode::Balloon {
            table
                .deflate(Gpa(at), chunk)
                .with_context(|| format!("storm deflate [{at:#x}, +{chunk:#x})"))?;
        }
        done.releases += 1;
        done.bytes += chunk;
        match refill {
            Refill::Touch => {
                for off in (0..chunk).step_by(PAGE as usize) {
                    let p = (host_lo + (at - lo) + off) as *mut u8;
                    // SAFETY: inside guest RAM (the storm range), which
                    // outlives this thread; no vCPU runs, and the storm
                    // range is the storm's alone.
                    unsafe { p.write_volatile(1) };
                }
            }
            Refill::Plain => bail!("the plain storm does not touch guest RAM"),
            Refill::Table => {
                for off in (0..chunk).step_by(PAGE as usize) {
                    table
                        .fault_in(Gpa(at + off))
                        .with_context(|| format!("storm refill at {:#x}", at + off))?;
                }
            }
        }
    }
    done.secs = t.elapsed().as_secs_f64();
    Ok(done)
}

/// One phase's figures.
#[derive(Debug, Default, Clone, Copy)]
struct Phase {
    lat: Pct,
    retries: u64,
    storm: StormDone,
    /// Longest table-lock hold in the phase, µs.
    lock_hold_max_us: f64,
    /// Mean resolution time inside the handler (message read → wake) of
    /// every fault of the phase (the storm's refills included), µs.
    handler_mean_us: f64,
    secs: f64,
}

/// Everything a phase needs.
struct Setup<'a> {
    vm: &'a Vm,
    victim_lo: u64,
    victim_pages: u64,
    storm_lo: u64,
    storm_hi: u64,
    cursor: Arc<AtomicU64>,
    /// The `plain` storm's mapping (as large as the storm range).
    plain: Option<AnonRegion>,
}

/// What runs beside the victim in a phase.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Beside {
    /// Nothing: the quiet phase.
    Nothing,
    /// The storm `--storm-refill` asks for.
    Storm,
    /// The `plain` storm, no monitor: the kernel's and the CPUs' share
    /// of any storm (the baseline phase).
    Plain,
}

/// Releases the victim range, then times a fault on each of its pages,
/// with `beside` running.
fn phase(a: &Args, s: &Setup<'_>, rng: &mut Rng, beside: Beside) -> Result<Phase> {
    let mem = s.vm.memory();
    mem.release(
        &[(s.victim_lo, s.victim_pages * PAGE)],
        ReleaseMode::Discard,
    )
    .context("releasing the victim range")?;
    let host = host_of(mem, s.victim_lo)?;
    let mut order: Vec<u64> = (0..s.victim_pages).collect();
    rng.shuffle(&mut order);
    let table = mem.stage2().table();
    let stop = AtomicBool::new(false);
    let fst = mem.fault_stats();
    let retries0 = fst.retries.load(Ordering::Relaxed);
    let (n0, ns0) = (
        fst.faults.load(Ordering::Acquire),
        fst.latency_ns_total.load(Ordering::Relaxed),
    );
    let r = std::thread::scope(|sc| -> Result<Phase> {
        let h = (beside != Beside::Nothing).then(|| {
            let stop = &stop;
            let cursor = &s.cursor;
            let pin_it = a.pin;
            std::thread::Builder::new()
                .name("storm".into())
                .spawn_scoped(sc, move || {
                    if pin_it {
                        pin(0, 1);
                    }
                    if beside == Beside::Plain || a.storm_refill == Refill::Plain {
                        let r = s.plain.as_ref().context("no mapping for the plain storm")?;
                        plain_storm(r, a.storm_chunk, stop)
                    } else {
                        storm(
                            mem,
                            s.storm_lo,
                            s.storm_hi,
                            a.storm_chunk,
                            a.storm_refill,
                            stop,
                            cursor,
                        )
                    }
                })
        });
        let h = h.transpose().context("spawning the storm thread")?;
        if h.is_some() {
            // Let the storm get going before the first sample.
            std::thread::sleep(Duration::from_millis(20));
        }
        table.reset_lock_stats();
        let t = Instant::now();
        let mut lat = Vec::with_capacity(order.len());
        for &i in &order {
            // SAFETY: inside the victim range of guest RAM, which outlives
            // this scope (the VM is borrowed by it).
            lat.push(unsafe { touch_timed(host + i * PAGE) });
        }
        let secs = t.elapsed().as_secs_f64();
        let lock_hold_max_us = table.stats().lock_hold_max_ns as f64 / 1e3;
        stop.store(true, Ordering::Relaxed);
        let storm = match h {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("the storm thread panicked"))??,
            None => StormDone::default(),
        };
        Ok(Phase {
            lat: pct(&mut lat),
            retries: 0,
            storm,
            lock_hold_max_us,
            handler_mean_us: 0.0,
            secs,
        })
    })?;
    let n = fst.faults.load(Ordering::Acquire) - n0;
    let ns = fst.latency_ns_total.load(Ordering::Relaxed) - ns0;
    Ok(Phase {
        retries: fst.retries.load(Ordering::Relaxed) - retries0,
        handler_mean_us: ns as f64 / 1e3 / n.max(1) as f64,
        ..r
    })
}

/// Run `gmm bench fault`.
pub fn cmd(a: &Args) -> Result<()> {
    if a.storm_chunk == 0 || !a.storm_chunk.is_multiple_of(PAGE) {
        bail!("--storm-chunk must be a positive multiple of 4 KiB");
    }
    let victim_bytes = (a.faults * PAGE).next_multiple_of(SIZE_2M);
    let victim_lo = WORKLOAD_START;
    // A 2 MiB gap: the releases arm whole 2 MiB windows.
    let storm_lo = victim_lo + victim_bytes + SIZE_2M;
    let storm_need = a.storm_chunk.max(SIZE_2M) * 4;
    if a.mem < storm_lo + storm_need {
        bail!(
            "--mem {} is too small: {} faults need {} of victim range, and the storm \
             at least {} more: raise --mem to {} or lower --faults",
            human_bytes(a.mem),
            a.faults,
            human_bytes(victim_bytes),
            human_bytes(storm_need),
            human_bytes(storm_lo + storm_need)
        );
    }
    let size = MemSize::from_bytes(a.mem).with_context(|| format!("--mem {}", a.mem))?;
    let storm_hi = a.mem - (a.mem - storm_lo) % a.storm_chunk;
    let mut c = VmConfig::new(size);
    c.backing = Backing::Anon;
    c.page_size = PageSize::Size4K;
    c.workload = Workload::Verify;
    c.console = Console::Null;
    let vm = Vm::new(c).context("creating the VM (is /dev/kvm usable?)")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut placement =
        "unpinned: victim, fault handler and storm threads placed by the scheduler".to_string();
    if a.pin {
        // A thread names itself once it runs: give the handler a moment.
        let mut h = threads_named("uffd");
        let t = Instant::now();
        while h.is_empty() && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
            h = threads_named("uffd");
        }
        let ok = cores >= 2 && h.len() == 1 && pin(h[0], 0) && pin(0, 0);
        if !ok {
            bail!(
                "--pin needs 2 CPUs and one fault handler thread (found {cores} CPUs, {} handler threads)",
                h.len()
            );
        }
        placement = "pinned: victim and fault handler on CPU 0, storm on CPU 1".into();
    }
    crate::say(
        a.json,
        &format!(
            "bench fault: {} anon 4K RAM, {} faults/phase, storm over {} in {} chunks \
             (refill: {}), {} rounds, {cores} cores, {placement}\n",
            human_bytes(a.mem),
            a.faults,
            human_bytes(storm_hi - storm_lo),
            human_bytes(a.storm_chunk),
            a.storm_refill.name(),
            a.rounds
        ),
    );
    // Everything resident, and every storm window armed once, before any
    // timing: registration takes the mm's lock for writing.
    vm.memory().populate().context("populating guest RAM")?;
    vm.memory()
        .release(&[(storm_lo, storm_hi - storm_lo)], ReleaseMode::Discard)
        .context("arming the storm range")?;
    vm.memory()
        .populate()
        .context("repopulating the storm range")?;
    let s = Setup {
        vm: &vm,
        victim_lo,
        victim_pages: a.faults,
        storm_lo,
        storm_hi,
        cursor: Arc::new(AtomicU64::new(storm_lo)),
        // The plain storm's mapping: for `--storm-refill plain`, and for
        // the baseline phase beside any other storm.
        plain: if a.storm_refill == Refill::Plain || !a.no_baseline {
            let r = AnonRegion::new(storm_hi - storm_lo, guest_mm::PageSize::Size4K)?;
            r.touch();
            Some(r)
        } else {
            None
        },
    };
    let load0 = vmm::proc_stats::loadavg().unwrap_or_default();
    let mut rng = Rng::new(0xfa17_0012);
    // The baseline phase is the storm itself when the storm is plain.
    let baseline = a.storm_refill != Refill::Plain && !a.no_baseline;
    let mut kinds = vec![Beside::Nothing, Beside::Storm];
    if baseline {
        kinds.push(Beside::Plain);
    }
    let (mut quiet, mut stormy, mut plain, mut spins) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..a.rounds {
        // Each phase goes first in turn.
        let mut got = Vec::new();
        for i in 0..kinds.len() {
            let k = kinds[(i + r as usize) % kinds.len()];
            got.push((k, phase(a, &s, &mut rng, k)?));
        }
        let of = |k: Beside| got.iter().find(|(x, _)| *x == k).map(|(_, p)| *p);
        let (q, st) = (
            of(Beside::Nothing).unwrap_or_default(),
            of(Beside::Storm).unwrap_or_default(),
        );
        let pl = of(Beside::Plain);
        let spin = spin_gaps(Duration::from_secs_f64(q.secs.max(0.05)));
        crate::say(
            a.json,
            &format!(
                "round {r}: quiet p50 {:.1} p99 {:.1} max {:.0} µs | storm p50 {:.1} p99 {:.1} \
                 max {:.0} µs ({} releases, {:.0} MiB/s, {} retries, lock hold max {:.0} µs, \
                 in handler {:.1} vs {:.1} µs){} | spin max gap {:.0} µs\n",
                q.lat.p50,
                q.lat.p99,
                q.lat.max,
                st.lat.p50,
                st.lat.p99,
                st.lat.max,
                st.storm.releases,
                st.storm.bytes as f64 / MIB as f64 / st.storm.secs.max(1e-9),
                st.retries,
                st.lock_hold_max_us,
                q.handler_mean_us,
                st.handler_mean_us,
                pl.map_or_else(String::new, |p| format!(
                    " | plain storm p99 {:.1} µs",
                    p.lat.p99
                )),
                spin.0
            ),
        );
        quiet.push(q);
        stormy.push(st);
        plain.extend(pl);
        spins.push(spin);
    }
    let fs = vm.fault_stats().summary();
    drop(vm);
    let col = |v: &[Phase], f: fn(&Phase) -> f64| v.iter().map(f).collect::<Vec<f64>>();
    let med = |v: &[Phase], f: fn(&Phase) -> f64| round(median(&col(v, f)), 2);
    let p99_q = med(&quiet, |p| p.lat.p99);
    let p99_s = med(&stormy, |p| p.lat.p99);
    let ratio = if p99_q > 0.0 {
        round(p99_s / p99_q, 3)
    } else {
        0.0
    };
    let p99_plain = (!plain.is_empty()).then(|| med(&plain, |p| p.lat.p99));
    let gaps: Vec<f64> = spins.iter().map(|s| s.0).collect();
    let res = FaultResult {
        tool: "bench-fault".into(),
        mem_bytes: a.mem,
        cores,
        kvm_modules: crate::peer::kvm_modules(),
        placement,
        rounds: a.rounds,
        samples_per_phase: a.faults,
        samples_quiet: quiet.iter().map(|p| p.lat.n).sum(),
        samples_storm: stormy.iter().map(|p| p.lat.n).sum(),
        storm_chunk_bytes: a.storm_chunk,
        storm_refill: a.storm_refill.name().into(),
        storm_range_bytes: storm_hi - storm_lo,
        p50_us_quiet: med(&quiet, |p| p.lat.p50),
        p99_us_quiet: p99_q,
        max_us_quiet: med(&quiet, |p| p.lat.max),
        p50_us_storm: med(&stormy, |p| p.lat.p50),
        p99_us_storm: p99_s,
        max_us_storm: med(&stormy, |p| p.lat.max),
        p99_ratio: ratio,
        p99_us_plain_storm: p99_plain,
        p99_ratio_plain_storm: p99_plain
            .filter(|_| p99_q > 0.0)
            .map(|p| round(p / p99_q, 3)),
        p99_us_plain_storm_spread: (!plain.is_empty()).then(|| spread(&col(&plain, |p| p.lat.p99))),
        target: "p99 under the storm <= 2x p99 without".into(),
        verdict: if ratio > 0.0 && ratio <= 2.0 {
            "met".into()
        } else {
            "missed".into()
        },
        p99_us_quiet_spread: spread(&col(&quiet, |p| p.lat.p99)),
        p99_us_storm_spread: spread(&col(&stormy, |p| p.lat.p99)),
        max_us_quiet_spread: spread(&col(&quiet, |p| p.lat.max)),
        max_us_storm_spread: spread(&col(&stormy, |p| p.lat.max)),
        storm_releases_per_sec: med(&stormy, |p| {
            p.storm.releases as f64 / p.storm.secs.max(1e-9)
        }),
        storm_mib_per_sec: med(&stormy, |p| {
            p.storm.bytes as f64 / MIB as f64 / p.storm.secs.max(1e-9)
        }),
        retries_quiet: med(&quiet, |p| p.retries as f64),
        retries_storm: med(&stormy, |p| p.retries as f64),
        lock_hold_max_us_quiet: med(&quiet, |p| p.lock_hold_max_us),
        lock_hold_max_us_storm: med(&stormy, |p| p.lock_hold_max_us),
        handler_mean_us_quiet: med(&quiet, |p| p.handler_mean_us),
        handler_mean_us_storm: med(&stormy, |p| p.handler_mean_us),
        env_spin_max_gap_us: round(median(&gaps), 1),
        env_spin_max_gap_us_worst: round(gaps.iter().copied().fold(0.0, f64::max), 1),
        env_spin_gaps_over_50us_per_sec: round(
            median(&spins.iter().map(|s| s.1).collect::<Vec<_>>()),
            1,
        ),
        handler_faults: fs.faults,
        handler_errors: fs.errors,
        loadavg: [load0, vmm::proc_stats::loadavg().unwrap_or_default()],
    };
    crate::say(
        a.json,
        &format!(
            "fault latency (medians over {} rounds): quiet p50 {:.1} p99 {:.1} max {:.0} µs; \
             storm p50 {:.1} p99 {:.1} max {:.0} µs; p99 ratio {:.2} (target <= 2): {}{}\n\
             environment: a clock-reading thread's longest gap {:.0} µs (worst {:.0})\n",
            a.rounds,
            res.p50_us_quiet,
            res.p99_us_quiet,
            res.max_us_quiet,
            res.p50_us_storm,
            res.p99_us_storm,
            res.max_us_storm,
            res.p99_ratio,
            res.verdict,
            match (res.p99_us_plain_storm, res.p99_ratio_plain_storm) {
                (Some(p), Some(r)) => format!(
                    "\nbaseline, a plain storm with no monitor: p99 {p:.1} µs, ratio {r:.2}"
                ),
                _ => String::new(),
            },
            res.env_spin_max_gap_us,
            res.env_spin_max_gap_us_worst
        ),
    );
    if fs.errors != 0 {
        bail!("the fault handler failed {} installs", fs.errors);
    }
    crate::emit_json(a.json, &res)
}
