// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask fuzz`: the fuzz targets of `engine/fuzz` (krr-fuzz) for a
//! time budget each; crashes under `results/fuzz/<UTC time>/`.

use crate::repo_root;
use crate::test::cargo;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds krr-fuzz and runs it; fails on any crash.
pub fn run(targets: &[String], seconds: f64, seed: u64, out: Option<PathBuf>) -> Result<PathBuf> {
    build()?;
    run_built(targets, seconds, seed, out)
}

/// With the workspace's features, like `cargo test --workspace`.
fn build() -> Result<()> {
    cargo(
        &[
            "build",
            "--release",
            "--quiet",
            "--workspace",
            "--bin",
            "krr-fuzz",
        ],
        &[],
    )
}

fn run_built(targets: &[String], seconds: f64, seed: u64, out: Option<PathBuf>) -> Result<PathBuf> {
    let out = out.unwrap_or_else(|| {
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        repo_root().join("results/fuzz").join(stamp)
    });
    let bin = repo_root().join("target/release/krr-fuzz");
    let mut cmd = Command::new(&bin);
    cmd.arg("run")
        .args(["--seconds", &seconds.to_string()])
        .args(["--seed", &seed.to_string()])
        .arg("--out")
        .arg(&out)
        .current_dir(repo_root());
    for t in targets {
        cmd.args(["--target", t]);
    }
    eprintln!(
        "   {} target(s), {seconds} s each, seed {seed}, results in {}",
        if targets.is_empty() {
            "every".to_string()
        } else {
            targets.join(", ")
        },
        out.display()
    );
    let status = cmd
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !status.success() {
        bail!(
            "fuzzing found crashes or stopped ({status}): see {} (crash-*/repro.txt; a work-* folder holds an input that aborted)",
            out.display()
        );
    }
    Ok(out)
}

/// The short run of `cargo xtask test`: every target from the committed
/// corpus with a fixed seed, so a failure reproduces. Runs the binary
/// `cargo test --workspace` just built (a build of its own, without the
/// test profile's dev-dependency features, would compile crates again).
pub fn quick(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    run_built(&[], QUICK_SECONDS, 1, Some(dir.to_path_buf())).map(drop)
}

/// Seconds per target in `cargo xtask test`.
pub const QUICK_SECONDS: f64 = 12.0;
