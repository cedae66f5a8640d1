//! `gmm teardown`: not implemented yet (being built).

use anyhow::{bail, Result};

/// Options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn cmd(_a: &Args) -> Result<()> {
    bail!("gmm teardown is not implemented yet")
}
