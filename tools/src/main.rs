//! `gmm`: stress and benchmark tools for guest-mm.
//!
//! - `gmm stress` runs the lockless-protocol stress harness on real memory
//!   and fails on any violation;
//! - `gmm bench unmap` times unmapping a large populated region through
//!   the gather against three release baselines measured in the same run;
//! - `gmm bench walk` times the lockless fast walk, alone and under an
//!   unmap storm, against an `RwLock` page map and vm-memory's lookup.
//!
//! Human output goes to stdout; with `--json` it goes to stderr and the
//! last line of stdout is one JSON object. Figures are always measured,
//! never assumed: every comparison is a ratio against a baseline of the
//! same run.

mod mem;
mod rng;
mod stress;
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
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Walkers and mutators on real memory; exits non-zero on any violation.
    Stress(stress::StressArgs),
    /// Benchmarks against baselines measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Unmap a populated region through the gather vs. madvise baselines.
    Unmap(unmap::UnmapArgs),
    /// Fast-walk translations/s vs. an RwLock table and vm-memory.
    Walk(walk::WalkArgs),
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
    match &cli.cmd {
        Cmd::Stress(a) => stress::cmd(a),
        Cmd::Bench(Bench::Unmap(a)) => unmap::cmd(a),
        Cmd::Bench(Bench::Walk(a)) => walk::cmd(a),
    }
}
