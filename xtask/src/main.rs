// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask`: the project's front door.
//!
//! Every command installs or builds what it needs on first use (host packages
//! through `setup`, guest images through the image cache), so a fresh clone
//! needs nothing but Rust.

mod setup;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Kernel record-replay: setup, images, evaluation, tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the Debian packages the project needs (idempotent).
    Setup {
        /// Only report what is missing; install nothing.
        #[arg(long)]
        check: bool,
    },
    /// Run every test: formatting, lints, unit and integration tests, with
    /// the guest images they need built (or taken from the cache) first.
    Test {
        /// Arguments passed through to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

/// The repository root (the workspace that holds this xtask).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
        .to_path_buf()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup { check } => setup::run(check),
        Command::Test { cargo_args } => test::run(&cargo_args),
    }
}
