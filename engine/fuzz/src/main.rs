// SPDX-License-Identifier: GPL-2.0-or-later
//! `krr-fuzz`: run the fuzz targets (`cargo xtask fuzz` starts it),
//! regenerate the seed corpus, replay one saved input.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use krr_fuzz::runner::{self, Config, Outcome};
use krr_fuzz::{crate_dir, targets, Input, LimitAlloc, Target};
use std::path::PathBuf;
use std::time::Duration;

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

#[derive(Parser)]
#[command(about = "Structured mutation fuzzing of krr's recording readers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fuzz the targets one after another; exit 1 if any crashed.
    Run {
        /// Only these targets (default: all).
        #[arg(long, value_enum)]
        target: Vec<Target>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Seed of the mutations (with the iteration, it names a mutant).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The seed corpus.
        #[arg(long, default_value_os_t = crate_dir().join("corpus"))]
        corpus: PathBuf,
        /// Where crashes and the summary go.
        #[arg(long)]
        out: PathBuf,
        /// Seconds one input may run before it counts as a hang.
        #[arg(long, default_value_t = 20)]
        input_timeout: u64,
    },
    /// Regenerate the seed corpus from the project's writers.
    Seed {
        #[arg(long, default_value_os_t = crate_dir().join("corpus"))]
        out: PathBuf,
    },
    /// Run one saved input (a crash folder) and print its outcome.
    Repro {
        #[arg(long, value_enum)]
        target: Target,
        input: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run {
            target,
            seconds,
            seed,
            corpus,
            out,
            input_timeout,
        } => {
            let targets = if target.is_empty() {
                targets::ALL.to_vec()
            } else {
                target
            };
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let mut crashed = Vec::new();
            let mut summaries = Vec::new();
            for target in targets {
                let s = runner::run(&Config {
                    target,
                    seconds,
                    seed,
                    corpus: corpus.clone(),
                    out: out.clone(),
                    input_timeout: Duration::from_secs(input_timeout),
                })?;
                eprintln!(
                    "fuzz {}: {:.1} s, {} inputs ({} accepted, {} refused, {} distinct errors), {} crashes",
                    s.target, s.seconds, s.inputs, s.accepted, s.refused, s.distinct_errors, s.crashes
                );
                if s.crashes > 0 {
                    crashed.push(s.target.clone());
                }
                summaries.push(s);
            }
            let path = out.join("summary.json");
            std::fs::write(&path, serde_json::to_vec_pretty(&summaries)?)
                .with_context(|| format!("writing {}", path.display()))?;
            if !crashed.is_empty() {
                bail!(
                    "crashes in {}: inputs saved under {}",
                    crashed.join(", "),
                    out.display()
                );
            }
            Ok(())
        }
        Cmd::Seed { out } => {
            let _ = std::fs::remove_dir_all(&out);
            krr_fuzz::seeds::write_corpus(&out)?;
            eprintln!("corpus written to {}", out.display());
            Ok(())
        }
        Cmd::Repro { target, input } => {
            let loaded = Input::load(&input, target.files())
                .with_context(|| format!("reading {}", input.display()))?;
            let work = tempfile::tempdir()?;
            runner::quiet_panics();
            match runner::check(target, &loaded, work.path()) {
                Outcome::Crash(what) => bail!("{}: crash: {what}", input.display()),
                Outcome::Refused(e) => println!("refused: {e}"),
                Outcome::Accepted => println!("accepted"),
            }
            Ok(())
        }
    }
}
