// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask test`: the one test command (CI runs exactly this).

use crate::{repo_root, setup};
use anyhow::{bail, Context, Result};
use std::process::Command;

/// Runs a cargo subcommand in the repository root and fails with its name.
fn cargo(args: &[&str], envs: &[(String, String)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .current_dir(repo_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn run(extra: &[String]) -> Result<()> {
    setup::ensure()?;
    eprintln!("== cargo fmt --check");
    cargo(&["fmt", "--all", "--check"], &[])?;
    eprintln!("== cargo clippy");
    cargo(
        &[
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    let envs = Vec::new();
    eprintln!("== cargo test");
    let mut args = vec!["test", "--release", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args, &envs)
}
