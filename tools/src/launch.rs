//! `gmm bench launch`: launch + teardown cycles of small microVMs in this
//! process, and the VMM's own memory per live VM.
//!
//! Each cycle: `Vm::new` (KVM VM, guest RAM, stage-2 table, fault handler,
//! vCPUs), `start`, wait until every vCPU has written and verified its
//! share of guest RAM (the default `Verify` workload) and check
//! `guest_ok`, then `destroy` and `wait_reclaim`. Reported per cycle:
//!
//! - `boot_ms`: `Vm::new` → the first guest report (a vCPU reached ring 3
//!   and said hello), the in-process analogue of `vmm run`'s `boot_ms`
//!   (which starts at the process's `main`);
//! - `ready_ms`: `Vm::new` → every vCPU verified its RAM (guest done);
//! - `teardown_ms`: the `Vm::destroy` call; `reclaim_ms`: from it until
//!   `wait_reclaim` returned (guest RAM back with the host);
//! - `launches_per_sec`: cycles / wall time (one VM at a time), and
//!   `launches_per_cpu_sec`: cycles / CPU time this process used for them
//!   (all threads, vCPUs included), the per-core figure. The cycles run in
//!   `--rounds` rounds; each figure is the median of its rounds' rates,
//!   with every round's rate and the rate over all cycles beside it
//!   (`launches_per_sec_overall`). On a host that is itself a VM one slow
//!   cycle can weigh as much as ten: here the kernel reports free memory
//!   to its hypervisor (virtio-balloon free page reporting), which takes
//!   it back, and a guest's first touch of such memory refaults it there:
//!   perf showed a 358 ms cycle (p50 23 ms) spending 93 % of its samples
//!   in the host kernel's `clear_page_erms` zeroing the VM's huge pages.
//!   Three runs of 100 cycles had maxima of 123-331 ms; with the reporting
//!   off (`page_reporting_order` 11, after a warm-up run), two runs had
//!   none over 33 ms.
//!
//! The bound (`bound`, skipped with `--no-bound`): after every cycle the
//! guest's own work alone, by one plain thread per vCPU on anonymous
//! memory mapped like guest RAM, no VM ([`crate::guest_work`]), timed the
//! same way (wall and process CPU per cycle, rates per round, medians).
//! The VM's cycles are timed on their own, so the bound's time is in
//! neither rate; `ratio_vs_bound` is the VMs' per-core rate over the
//! bound's, `monitor_cpu_ms_per_launch` what the monitor and KVM add.
//!
//! RSS overhead per VM: `--alive K` VMs are launched and kept alive at once
//! (each has verified all of its RAM); `(VmRSS with them − VmRSS before −
//! guest RAM resident (mincore)) / K` is what the VMM itself costs per VM
//! (stage-2 table pages, vCPU and helper thread stacks, kvm_run pages,
//! device state, allocator growth), guest memory excluded.

use std::time::{Duration, Instant};

use crate::schema::{Dist, LaunchBound, LaunchResult};
use anyhow::{bail, Context, Result};
use guest_mm::PageSize;
use vmm::{Console, MemSize, Vm, VmConfig, Workload};

use crate::rng::{median, ms, round};
use crate::units::human_bytes;

/// Options of `gmm bench launch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Launch + teardown cycles (the rate is cycles / wall time: with few
    /// cycles one slow cycle weighs much; the report runs 100).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub count: u32,
    /// Rounds the cycles are split into (at most `--count`): the rates
    /// are the median round's.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,
    /// Guest RAM of each VM (a multiple of 2M, at least 2M + 2M per vCPU).
    #[arg(long, default_value = "128M", value_parser = crate::units::parse_size)]
    pub mem: u64,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// VMs kept alive at once for the RSS-per-VM figure (0: skip it).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub alive: u32,
    /// Skip the bound (the guest's work by plain threads after every
    /// cycle, see `guest_work.rs`): half the time, no ratio to judge by.
    #[arg(long)]
    pub no_bound: bool,
    /// Give up on a guest after this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout_secs: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Nearest-rank percentiles of a non-empty sample.
pub(crate) fn dist(v: &[f64]) -> Dist {
    if v.is_empty() {
        return Dist::default();
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let rank = (p * s.len() as f64).ceil().max(1.0) as usize;
        round(s[rank.min(s.len()) - 1], 3)
    };
    Dist {
        p50: at(0.5),
        p90: at(0.9),
        max: round(s[s.len() - 1], 3),
    }
}

/// `count` cycles split into at most `rounds` rounds as evenly as
/// possible (the first rounds take the remainder); no round is empty.
fn round_sizes(count: u32, rounds: u32) -> Vec<u32> {
    let rounds = rounds.clamp(1, count.max(1));
    (0..rounds)
        .map(|i| count / rounds + u32::from(i < count % rounds))
        .filter(|&n| n > 0)
        .collect()
}

/// Wall and CPU time (the whole process's) spent in a set of cycles.
#[derive(Default, Clone, Copy)]
struct Spent {
    wall: Duration,
    cpu: Duration,
}

/// The start of one timed cycle.
#[derive(Clone, Copy)]
struct Started {
    at: Instant,
    cpu: Duration,
}

impl Spent {
    fn start() -> Started {
        Started {
            at: Instant::now(),
            cpu: crate::cpu::process_cpu_time(),
        }
    }

    /// Adds the time since `s`.
    fn add(&mut self, s: Started) {
        self.wall += s.at.elapsed();
        self.cpu += crate::cpu::process_cpu_time().saturating_sub(s.cpu);
    }
}

/// `n` events in `d`, per second (0 for no time at all).
fn per_sec(n: u32, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        f64::from(n) / s
    } else {
        0.0
    }
}

fn config(a: &Args) -> Result<VmConfig> {
    let mut c = VmConfig::new(MemSize::from_bytes(a.mem).context("--mem")?);
    c.vcpus = a.vcpus;
    c.workload = Workload::Verify;
    c.console = Console::Null;
    Ok(c)
}

/// Launches one VM and waits for its guest to verify its RAM:
/// (vm, boot ms, ready ms).
fn launch(a: &Args) -> Result<(Vm, f64, f64)> {
    let t0 = Instant::now();
    let mut vm = Vm::new(config(a)?).context("creating the microVM (is /dev/kvm usable?)")?;
    vm.start().context("starting the vCPUs")?;
    let done = vm.wait(Duration::from_secs(a.timeout_secs));
    let ready = ms(t0.elapsed());
    if !done || !vm.guest_ok() {
        bail!(
            "the guest did not verify its RAM within {} s (outcomes {:?})",
            a.timeout_secs,
            vm.outcomes()
        );
    }
    let (hello, _, _) = vm.reports();
    let boot = hello.map_or(ready, |h| ms(h.saturating_duration_since(t0)));
    Ok((vm, boot, ready))
}

/// Run the command.
pub fn cmd(a: &Args) -> Result<()> {
    vmm::guest::check_config(a.mem, a.vcpus).context("--mem / --vcpus")?;
    MemSize::from_bytes(a.mem).context("--mem")?;
    crate::say(
        a.json,
        &format!(
            "bench launch: {} cycles of a {} VM with {} vCPU(s) (launch, guest verifies its RAM, destroy, reclaim), then {} VMs alive for RSS\n",
            a.count,
            human_bytes(a.mem),
            a.vcpus,
            a.alive
        ),
    );
    let pb = crate::progress::bar(u64::from(a.count) + u64::from(a.alive), "launch");
    let (mut boot, mut ready, mut td, mut rec) = (vec![], vec![], vec![], vec![]);
    let (mut rates, mut cpu_rates) = (vec![], vec![]);
    let leaf = match config(a)?.page_size {
        vmm::memory::PageSize::Size4K => PageSize::Size4K,
        vmm::memory::PageSize::Size2M => PageSize::Size2M,
    };
    let (mut bound_rates, mut bound_cpu_rates) = (vec![], vec![]);
    let (mut cpu, mut bound_cpu, mut vm_wall) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let t_all = Instant::now();
    for cycles in round_sizes(a.count, a.rounds) {
        let mut vm_side = Spent::default();
        let mut bound_side = Spent::default();
        for _ in 0..cycles {
            let s = Spent::start();
            let (vm, b, r) = launch(a)?;
            let t = Instant::now();
            let mut teardown = vm.destroy();
            td.push(ms(t.elapsed()));
            teardown.wait_reclaim();
            rec.push(ms(t.elapsed()));
            vm_side.add(s);
            boot.push(b);
            ready.push(r);
            if !a.no_bound {
                // The guest's work alone, right after the VM that did it
                // (the host's slow and fast phases hit both alike).
                let s = Spent::start();
                crate::guest_work::cycle(a.mem, a.vcpus, leaf)
                    .context("the bound: the guest's work by plain threads")?;
                bound_side.add(s);
            }
            pb.inc(1);
        }
        rates.push(per_sec(cycles, vm_side.wall));
        cpu_rates.push(per_sec(cycles, vm_side.cpu));
        cpu += vm_side.cpu;
        vm_wall += vm_side.wall;
        if !a.no_bound {
            bound_rates.push(per_sec(cycles, bound_side.wall));
            bound_cpu_rates.push(per_sec(cycles, bound_side.cpu));
            bound_cpu += bound_side.cpu;
        }
    }
    let wall = t_all.elapsed();
    let launches_per_sec = median(&rates);
    let launches_per_cpu_sec = median(&cpu_rates);
    let cpu_ms_per_launch = ms(cpu) / f64::from(a.count);
    // RSS per live VM.
    std::thread::sleep(Duration::from_millis(50));
    let rss_base = vmm::proc_stats::rss().rss;
    let mut live = Vec::new();
    for _ in 0..a.alive {
        live.push(launch(a)?.0);
        pb.inc(1);
    }
    let rss_alive = vmm::proc_stats::rss().rss;
    let guest_resident: u64 = live
        .iter()
        .flat_map(|vm| vm.memory().regions())
        .map(|r| guest_mm::stress::resident_bytes(r.host_addr as u64, r.len))
        .sum();
    let table: u64 = live
        .iter()
        .map(|vm| vm.stage2().table().table_bytes())
        .sum();
    for vm in live {
        vm.destroy().wait_reclaim();
    }
    let rss_after = vmm::proc_stats::rss().rss;
    pb.finish_and_clear();
    let overhead = (a.alive > 0).then(|| {
        rss_alive
            .saturating_sub(rss_base)
            .saturating_sub(guest_resident)
            / u64::from(a.alive)
    });
    let r = LaunchResult {
        tool: "bench-launch".into(),
        count: a.count,
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kvm_modules: crate::peer::kvm_modules(),
        rounds: rates.len() as u32,
        launches_per_sec: round(launches_per_sec, 2),
        launches_per_cpu_sec: round(launches_per_cpu_sec, 2),
        launches_per_sec_rounds: rates.iter().map(|x| round(*x, 2)).collect(),
        launches_per_cpu_sec_rounds: cpu_rates.iter().map(|x| round(*x, 2)).collect(),
        launches_per_sec_overall: round(per_sec(a.count, vm_wall), 2),
        cpu_ms_per_launch: round(cpu_ms_per_launch, 3),
        wall_s: round(wall.as_secs_f64(), 3),
        boot_ms_is: "Vm::new -> first guest report (a vCPU reached ring 3); ready_ms: -> every vCPU verified its RAM".into(),
        boot_ms: dist(&boot),
        ready_ms: dist(&ready),
        teardown_ms: dist(&td),
        reclaim_ms: dist(&rec),
        alive_vms: a.alive,
        rss_base_bytes: rss_base,
        rss_alive_bytes: rss_alive,
        guest_resident_bytes: guest_resident,
        stage2_table_bytes: table,
        rss_overhead_per_vm_bytes: overhead,
        rss_after_bytes: rss_after,
        meets_20_per_sec: launches_per_sec >= 20.0,
        bound: (!a.no_bound).then(|| {
            let per_sec = median(&bound_rates);
            let per_cpu_sec = median(&bound_cpu_rates);
            let per_core = per_sec.min(per_cpu_sec);
            let vm_per_core = launches_per_sec.min(launches_per_cpu_sec);
            let bound_cpu_ms = ms(bound_cpu) / f64::from(a.count);
            LaunchBound {
                launches_per_sec: round(per_sec, 2),
                launches_per_cpu_sec: round(per_cpu_sec, 2),
                per_core: round(per_core, 2),
                launches_per_sec_rounds: bound_rates.iter().map(|x| round(*x, 2)).collect(),
                cpu_ms_per_launch: round(bound_cpu_ms, 3),
                ratio_vs_bound: if per_core > 0.0 {
                    round(vm_per_core / per_core, 3)
                } else {
                    0.0
                },
                monitor_cpu_ms_per_launch: round(cpu_ms_per_launch - bound_cpu_ms, 3),
            }
        }),
        boot_ms_all: boot.iter().map(|x| round(*x, 3)).collect(),
        ready_ms_all: ready.iter().map(|x| round(*x, 3)).collect(),
    };
    let d = |x: &Dist| format!("p50 {:.3}  p90 {:.3}  max {:.3} ms", x.p50, x.p90, x.max);
    let rounds = crate::fault::spread(&r.launches_per_sec_rounds);
    crate::say(
        a.json,
        &format!(
            "  launches/s {:.2} (wall, one at a time, median of {} rounds [{:.2} .. {:.2}], {:.2} over all cycles; target 20: {}), {:.2} per CPU-second ({:.1} ms CPU per launch)\n  \
             boot     {}  (Vm::new -> first guest report)\n  \
             ready    {}  (Vm::new -> guest verified its RAM)\n  \
             teardown {}  (destroy call)\n  \
             reclaim  {}  (destroy -> RAM back)\n  \
             RSS: base {}, {} VMs alive {} (guest RAM resident {}, stage-2 tables {}), after {}; VMM overhead per VM {}\n",
            r.launches_per_sec,
            r.rounds,
            rounds.min,
            rounds.max,
            r.launches_per_sec_overall,
            r.meets_20_per_sec,
            r.launches_per_cpu_sec,
            r.cpu_ms_per_launch,
            d(&r.boot_ms),
            d(&r.ready_ms),
            d(&r.teardown_ms),
            d(&r.reclaim_ms),
            human_bytes(rss_base),
            a.alive,
            human_bytes(rss_alive),
            human_bytes(guest_resident),
            human_bytes(table),
            human_bytes(rss_after),
            overhead.map_or("n/a".to_string(), human_bytes),
        ),
    );
    if let Some(b) = &r.bound {
        crate::say(
            a.json,
            &format!(
                "  bound (the guest's work by plain threads, no VM): {:.2}/s, {:.2} per CPU-second ({:.1} ms CPU); the VMs keep {:.2}x of it per core, the monitor and KVM add {:.1} ms CPU per launch\n",
                b.launches_per_sec,
                b.launches_per_cpu_sec,
                b.cpu_ms_per_launch,
                b.ratio_vs_bound,
                b.monitor_cpu_ms_per_launch
            ),
        );
    }
    crate::emit_json(a.json, &r)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_cover_every_cycle_and_none_is_empty() {
        for count in 1..40 {
            for rounds in 1..12 {
                let r = round_sizes(count, rounds);
                assert_eq!(r.iter().sum::<u32>(), count, "{count} in {rounds}");
                assert_eq!(r.len() as u32, rounds.min(count));
                let (lo, hi) = (r.iter().min().unwrap(), r.iter().max().unwrap());
                assert!(hi - lo <= 1, "{r:?}");
            }
        }
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        // One slow round does not move it.
        assert_eq!(median(&[30.0, 31.0, 5.0, 29.0, 32.0]), 30.0);
    }
}
