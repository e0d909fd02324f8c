// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask`: the project's front door.
//!
//! Every command installs or builds what it needs on first use (host packages
//! through `setup`, guest images through the image cache), so a fresh clone
//! needs nothing but Rust.

mod bench;
mod bench_figure;
mod bench_gdb;
mod doctor;
mod eval;
mod fuzz;
mod hw_acceptance;
mod images;
mod krr_bin;
mod manifests;
mod setup;
mod test;
mod validate_replay;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    /// What this host offers (hardware KVM, PMU, SMT, cores, disk, packages)
    /// and which backend each command uses, with advice per problem.
    Doctor {
        /// One JSON array of findings instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The ordered checks of the KVM path on a VT-x/AMD-V host (CloudLab),
    /// each with a verdict: hardware KVM, PMU, the KVM selftests with
    /// nothing skipped, PMU counts against the software CPU, Linux on KVM,
    /// recordings on KVM replayed on the software CPU (1 and 2 vCPUs).
    HwAcceptance {
        /// Run the checks even where /dev/kvm is not hardware-backed.
        #[arg(long)]
        force: bool,
        /// Only these checks (comma-separated names, as the report lists them).
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
        /// Results directory (default: results/hw-acceptance/<UTC time>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Install the Debian packages the project needs (idempotent).
    Setup {
        /// Only report what is missing; install nothing.
        #[arg(long)]
        check: bool,
    },
    /// Check manifests (the repository's, or the given files): every problem,
    /// each as file:line:col.
    Validate { paths: Vec<PathBuf> },
    /// Write the JSON schema of a manifest file (for editors).
    Schema {
        /// Output file (default: standard output).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
    /// Fetch and verify an image named in manifests/, or any file by URL;
    /// prints where it landed in the cache.
    Fetch {
        /// Image name from manifests/.
        name: Option<String>,
        #[arg(long, conflicts_with = "name")]
        url: Option<String>,
        /// Expected SHA-256 of the file at --url (64 hex digits).
        #[arg(long, requires = "url")]
        sha256: Option<String>,
    },
    /// Run an experiment from manifests/suites (record-perf is the main job).
    Eval(eval::EvalArgs),
    /// Benchmarks, measured side by side in one run.
    Bench {
        #[arg(value_enum)]
        benchmark: bench::Benchmark,
        /// Runs per configuration (the median is reported).
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
    },
    /// Record and replay stress-ng stressors (rootfs-workloads image) on the
    /// software CPU: a table of passed / diverged / unsupported per stressor.
    ValidateReplay(validate_replay::Options),
    /// Results of evals: merge the shards of one eval run on several hosts.
    Results {
        #[command(subcommand)]
        command: ResultsCommand,
    },
    /// Guest images: build, list, clean, ad-hoc initramfs.
    Images {
        #[command(subcommand)]
        command: images::ImagesCommand,
    },
    /// Fuzz what krr reads from a recording (agent ring records, the event
    /// and DMA logs, `krr log verify`, `Replayer::open`) with mutants of
    /// engine/fuzz/corpus; crashes under results/fuzz/<UTC time>/.
    Fuzz {
        /// Only this target (ring, events, dma, verify, open); repeatable.
        #[arg(long)]
        target: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Seed of the mutations (a crash's repro.txt names it).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Results directory (default: results/fuzz/<UTC time>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run every test: formatting, lints, unit and integration tests, with
    /// the guest images they need built (or taken from the cache) first.
    Test {
        /// Arguments passed through to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ResultsCommand {
    /// One report from the results directories of every shard of one eval
    /// (`cargo xtask eval ... --shard K/N` on N hosts).
    Merge {
        /// The shards' results directories (each holding runs.jsonl or
        /// bugs.jsonl), in any order.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where the merged results go (a new directory).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The repository root (the workspace that holds this xtask).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
        .to_path_buf()
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole cause chain on one line; no backtrace,
            // which would bury the message a user needs.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Doctor { json } => doctor::run(json),
        Command::HwAcceptance { force, only, out } => hw_acceptance::run(force, only, out),
        Command::Setup { check } => setup::run(check),
        Command::Validate { paths } => manifests::validate(&paths),
        Command::Schema { out } => manifests::schema(out.as_deref()),
        Command::Fetch { name, url, sha256 } => {
            manifests::fetch(name.as_deref(), url.as_deref(), sha256.as_deref())
        }
        Command::Eval(args) => eval::run(args),
        Command::ValidateReplay(opts) => validate_replay::run(opts),
        Command::Bench {
            benchmark,
            repetitions,
        } => bench::run(benchmark, repetitions),
        Command::Results {
            command: ResultsCommand::Merge { dirs, out },
        } => eval::merge(&dirs, &out),
        Command::Images { command } => images::run(command),
        Command::Fuzz {
            target,
            seconds,
            seed,
            out,
        } => fuzz::run(&target, seconds, seed, out).map(drop),
        Command::Test { cargo_args } => test::run(&cargo_args),
    }
}
