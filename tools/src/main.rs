//! `gmm`: stress and benchmark tools for guest-mm.
//!
//! - `gmm stress` runs the lockless-protocol stress harness on real memory
//!   and fails on any violation;
//! - `gmm bench unmap` times unmapping a large populated region through
//!   the gather against three release baselines measured in the same run;
//! - `gmm bench walk` times the lockless fast walk, alone and under an
//!   unmap storm, against an `RwLock` page map and vm-memory's lookup;
//! - `gmm bench fault` times userfaultfd demand faults of a real VM,
//!   quiet and under an unmap/balloon storm on other ranges of it;
//! - `gmm bench interference` times a running VM's demand faults, device
//!   walks and guest loop while another VM tears down or inflates;
//! - `gmm bench balloon` inflates a virtio-balloon through the real device
//!   path (host-side driver, no vCPU) against madvise baselines;
//! - `gmm bench linux` boots the Linux fixture under `vmm`, QEMU and
//!   Firecracker: time to init, balloon inflate rate, teardown;
//! - `gmm bench service` launches VMs through the API and measures what
//!   idle ones cost;
//! - `gmm soak` launches, balloons and tears down VMs in a loop and fails
//!   if RSS, open fds, threads or live table pages do not come back;
//! - `gmm mutation` breaks each protocol and device rule in turn (a build
//!   with the test-only `mutation` feature) and checks that its detectors fail.
//!
//! `--no-membarrier` (any command) makes guest-mm fall back from
//! membarrier-based asymmetric fences to a SeqCst fence on both sides, so
//! the two schemes can be compared on the same machine.
//!
//! Human output goes to stdout; with `--json` it goes to stderr and the
//! last line of stdout is one JSON object. Figures are always measured,
//! never assumed: every comparison is a ratio against a baseline of the
//! same run.

mod balloon;
mod cpu;
mod fault;
mod guest_work;
mod interference;
mod launch;
mod linux;
mod mem;
mod mutation;
mod peer;
mod plot;
mod progress;
mod report;
mod reporting;
mod rng;
mod schema;
mod service;
mod soak;
mod stress;
mod stress_vm;
mod teardown;
mod units;
mod unmap;
mod walk;

use std::io::Write;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde::Serialize;

/// Stress and benchmark tools for guest-mm.
#[derive(Parser, Debug)]
#[command(name = "gmm", version, about)]
struct Cli {
    /// Make guest-mm use a SeqCst fence per pin and per grace period
    /// instead of membarrier (sets GUEST_MM_NO_MEMBARRIER for this process).
    #[arg(long, global = true)]
    no_membarrier: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Walkers and mutators on real memory; exits non-zero on any violation.
    Stress(stress::StressArgs),
    /// A real microVM whose vCPUs write and verify memory while the balloon
    /// inflates and deflates; exits non-zero on any violation.
    StressVm(stress_vm::Args),
    /// VMs launched, ballooned and torn down in a loop; exits non-zero if
    /// RSS, open fds, threads or live table pages leak.
    Soak(soak::Args),
    /// Break each guest-mm/device rule in turn (test-only `mutation` build)
    /// and check that every detector claiming it fails; exits non-zero if not.
    Mutation(mutation::Args),
    /// Benchmarks against baselines measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
    /// A plain process that holds populated anonymous memory until it is
    /// killed (`bench interference`'s kernel baseline; not for users).
    #[command(hide = true)]
    Neighbour(interference::NeighbourArgs),
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Unmap a populated region through the gather vs. madvise baselines.
    Unmap(unmap::UnmapArgs),
    /// Fast-walk translations/s vs. an RwLock table and vm-memory.
    Walk(walk::WalkArgs),
    /// Inflate a virtio-balloon through the device vs. madvise baselines.
    Balloon(balloon::BalloonArgs),
    /// Demand-fault latency, quiet and under an unmap/balloon storm.
    Fault(fault::Args),
    /// A VM's faults, device walks and guest loop while another VM tears
    /// down or inflates its balloon.
    Interference(interference::Args),
    /// Destroy populated microVMs vs. munmap, a naive loop and QEMU.
    Teardown(teardown::Args),
    /// Launch+teardown cycles per second, boot time, RSS per VM.
    Launch(launch::Args),
    /// The Linux guest under vmm, QEMU and Firecracker: boot, balloon, teardown.
    Linux(linux::Args),
    /// vmm as a service: launches through the API, idle VMs' CPU.
    Service(service::Args),
    /// Run the suite, write JSON, SVG plots and BENCHMARKS.md.
    Report(report::Args),
}

/// Whether guest-mm's read sections use membarrier (asymmetric fences).
pub(crate) fn membarrier() -> bool {
    guest_mm::reclaim::asymmetric_fences()
}

/// Print a human report: to stdout, or to stderr when stdout carries JSON.
pub(crate) fn say(json: bool, s: &str) {
    if json {
        eprint!("{s}");
    } else {
        print!("{s}");
    }
}

/// With `--json`, print `v` as the last line of stdout.
pub(crate) fn emit_json(json: bool, v: &impl Serialize) -> Result<()> {
    if json {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(v)?)?;
        out.flush()?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.no_membarrier {
        // Still single-threaded here, and guest-mm reads the variable only
        // when its first table is created, below.
        std::env::set_var("GUEST_MM_NO_MEMBARRIER", "1");
    }
    match &cli.cmd {
        Cmd::Stress(a) => stress::cmd(a),
        Cmd::Bench(Bench::Unmap(a)) => unmap::cmd(a),
        Cmd::Bench(Bench::Walk(a)) => walk::cmd(a),
        Cmd::Bench(Bench::Balloon(a)) => balloon::cmd(a),
        Cmd::Bench(Bench::Fault(a)) => fault::cmd(a),
        Cmd::Bench(Bench::Interference(a)) => interference::cmd(a),
        Cmd::Bench(Bench::Teardown(a)) => teardown::cmd(a),
        Cmd::Bench(Bench::Launch(a)) => launch::cmd(a),
        Cmd::Bench(Bench::Linux(a)) => linux::cmd(a),
        Cmd::Bench(Bench::Service(a)) => service::cmd(a),
        Cmd::Bench(Bench::Report(a)) => report::cmd(a),
        Cmd::StressVm(a) => stress_vm::cmd(a),
        Cmd::Mutation(a) => mutation::cmd(a),
        Cmd::Soak(a) => soak::cmd(a),
        Cmd::Neighbour(a) => interference::neighbour(a),
    }
}
