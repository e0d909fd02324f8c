// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask validate-replay`: stress-ng stressors (Debian's, in the
//! `rootfs-workloads` image), each recorded on the software CPU from the
//! start of /init and replayed (the kernel alone); a table of passed /
//! diverged / unsupported / failed per stressor, as KRR validated its replay
//! with LTP. Results, with the evals' conventions:
//! `results/validate-replay/<UTC time>/` (or `--out DIR`; `latest` points at
//! the newest): `stressors.jsonl` (one line per stressor as it finishes: the
//! journal `--resume DIR|latest` continues after Ctrl-C or a crash),
//! `plan.json`, `validate-replay.json` and `report.md` (the table, also on
//! stdout).
//!
//! Each stressor is one `krr validate-replay-one` process (see
//! [`crate::krr_bin`]): one that crashes or fails is reported as `failed`,
//! with the reason, and the others go on.

use crate::eval::journal::{self, Journal};
use crate::{images, krr_bin, repo_root};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

const JOURNAL_FILE: &str = "stressors.jsonl";
const PLAN_FILE: &str = "plan.json";

/// What a run was started with, for `--resume`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Plan {
    stressors: Vec<String>,
    seconds: u32,
    #[serde(default = "one_vcpu")]
    vcpus: u32,
    /// Guest instructions between two checkpoints of each recording (0:
    /// none).
    #[serde(default)]
    checkpoint_every: u64,
}

fn one_vcpu() -> u32 {
    1
}

/// `cargo xtask validate-replay`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Comma-separated stressor names (default: a list of ~85 classes).
    #[arg(long)]
    pub stressors: Option<String>,
    /// Guest seconds each stressor runs (stress-ng --timeout).
    #[arg(long, default_value_t = 1)]
    pub seconds: u32,
    /// vCPUs of the guest (stress-ng runs one instance per vCPU; default 1).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// A checkpoint every N guest instructions of each recording, all
    /// compared in replay, so a divergence is caught near its start
    /// (default 0: none).
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// Results directory (default: results/validate-replay/<UTC time>).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted run: its directory, or `latest`.
    #[arg(long, value_name = "DIR|latest")]
    pub resume: Option<String>,
}

/// Stressor classes tried by default: processes, memory, files, IPC,
/// signals, timers and pure CPU work. `--stressors a,b,c` picks others.
pub const DEFAULT_STRESSORS: &[&str] = &[
    "cpu",
    "fork",
    "vfork",
    "exec",
    "clone",
    "pthread",
    "pipe",
    "pipeherd",
    "fifo",
    "mmap",
    "mremap",
    "madvise",
    "mlock",
    "msync",
    "brk",
    "stack",
    "malloc",
    "vm",
    "vm-rw",
    "memcpy",
    "futex",
    "sem",
    "sem-sysv",
    "msg",
    "mq",
    "shm",
    "shm-sysv",
    // (No "select": Debian 12's stress-ng 0.15 has no such stressor; its
    // `poll` stressor exercises select(2) too.)
    "poll",
    "epoll",
    "eventfd",
    "open",
    "dir",
    "dentry",
    "link",
    "symlink",
    "rename",
    "chmod",
    "chown",
    "fstat",
    "getdent",
    "seek",
    "fallocate",
    "io",
    "lockf",
    "flock",
    "fcntl",
    "dup",
    "sendfile",
    "splice",
    "tee",
    "switch",
    "yield",
    "nice",
    "sigq",
    "kill",
    "sigpipe",
    "clock",
    "timer",
    "itimer",
    "nanosleep",
    "get",
    "getrandom",
    "sysinfo",
    "personality",
    "prctl",
    "rlimit",
    "null",
    "zero",
    "full",
    "urandom",
    "matrix",
    "qsort",
    "str",
    "hash",
    "crypt",
    "zlib",
    "bsearch",
    "hsearch",
    "tsearch",
    "lsearch",
    "sock",
    "udp",
];

/// The outcome of one stressor.
/// (What `krr validate-replay-one --json` prints.)
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StressorResult {
    pub stressor: String,
    /// passed, diverged, unsupported, failed
    pub outcome: String,
    pub detail: String,
    pub events: u64,
    pub kernel_entries: u64,
    pub record_seconds: f64,
    pub replay_seconds: f64,
}

/// `cargo xtask validate-replay [--stressors a,b] [--seconds N] [--vcpus N]
/// [--checkpoint-every N] [--out DIR | --resume DIR|latest]`.
pub fn run(opts: Options) -> Result<()> {
    let root = repo_root().join("results/validate-replay");
    let (dir, plan) = match &opts.resume {
        Some(arg) => {
            if opts.stressors.is_some() || opts.vcpus.is_some() || opts.checkpoint_every.is_some() {
                bail!("--resume continues the run's own plan: drop --stressors, --vcpus and --checkpoint-every");
            }
            let dir = crate::eval::resume_dir(arg, &root, JOURNAL_FILE)?;
            let path = dir.join(PLAN_FILE);
            let plan: Plan = serde_json::from_slice(
                &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("reading {}", path.display()))?;
            (dir, plan)
        }
        None => {
            let plan = Plan {
                stressors: stressor_list(opts.stressors)?,
                seconds: opts.seconds,
                vcpus: opts.vcpus.unwrap_or(1),
                checkpoint_every: opts.checkpoint_every.unwrap_or(0),
            };
            if plan.seconds == 0 {
                // stress-ng reads a timeout of 0 as "run forever".
                bail!("--seconds 0: expected at least 1");
            }
            if !(1..=8).contains(&plan.vcpus) {
                bail!("--vcpus {}: expected 1 to 8", plan.vcpus);
            }
            let dir = crate::eval::output_dir(opts.out.as_deref(), &root, JOURNAL_FILE)?;
            std::fs::write(dir.join(PLAN_FILE), serde_json::to_vec_pretty(&plan)?)
                .with_context(|| format!("writing {}", dir.join(PLAN_FILE).display()))?;
            (dir, plan)
        }
    };
    let journal_path = dir.join(JOURNAL_FILE);
    let mut results: Vec<StressorResult> = if journal_path.exists() {
        journal::read_lines(&journal_path)?
    } else {
        Vec::new()
    };
    let mut journal = Journal::open_file(&journal_path)?;
    let interrupt = crate::eval::ctrl_c_flag()?;
    let krr_exe = krr_bin::build()?;
    let files = images::build_files(&[
        ("guest-6.1-krr", "bzImage"),
        ("rootfs-workloads", "rootfs.ext4"),
    ])?;
    let (kernel, rootfs) = (files[0].clone(), files[1].clone());
    let scratch = tempfile::tempdir().context("creating a scratch directory for recordings")?;
    let todo: Vec<&String> = plan
        .stressors
        .iter()
        .filter(|name| !results.iter().any(|r| &r.stressor == *name))
        .collect();
    eprintln!(
        "validate-replay: {} stressor(s), {} to run, {} vCPU(s), {}, results in {}",
        plan.stressors.len(),
        todo.len(),
        plan.vcpus,
        checkpoints(plan.checkpoint_every),
        dir.display()
    );
    let bar = ProgressBar::new(plan.stressors.len() as u64);
    bar.set_position((plan.stressors.len() - todo.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("validate-replay [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template"),
    );
    for name in todo {
        bar.set_message(name.clone());
        let r = one(&krr_exe, &kernel, &rootfs, scratch.path(), name, &plan);
        if interrupt.load(Ordering::SeqCst) {
            // Ctrl-C reached the krr process too: its outcome says nothing.
            bar.finish_and_clear();
            eprintln!(
                "validate-replay: interrupted during {name}; continue with --resume {}",
                dir.display()
            );
            bail!("interrupted");
        }
        // (println on a hidden bar, when stderr is not a terminal, prints
        // nothing: suspend it instead.)
        bar.suspend(|| eprintln!("  {:<12} {:<11} {}", r.stressor, r.outcome, r.detail));
        journal.append(&r)?;
        results.push(r);
        bar.inc(1);
    }
    bar.finish_and_clear();
    // The plan's order, whatever order a resumed run finished them in.
    results.sort_by_key(|r| plan.stressors.iter().position(|s| *s == r.stressor));
    let count = |o: &str| results.iter().filter(|r| r.outcome == o).count();
    let mut table =
        String::from("| stressor | outcome | events | kernel entries | record (s) | replay (s) | detail |\n|---|---|---|---|---|---|---|\n");
    for r in &results {
        table += &format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} |\n",
            r.stressor,
            r.outcome,
            r.events,
            r.kernel_entries,
            r.record_seconds,
            r.replay_seconds,
            r.detail.replace('|', "\\|")
        );
    }
    table += &format!(
        "\npassed {}, diverged {}, unsupported {}, failed {} (of {})\n",
        count("passed"),
        count("diverged"),
        count("unsupported"),
        count("failed"),
        results.len()
    );
    print!("{table}");
    let report = format!(
        "# validate-replay: stress-ng stressors recorded and replayed\n\nKernel `{}`, rootfs `{}`, {} s per stressor, {} vCPU(s), {}.\n\n{table}",
        kernel.display(),
        rootfs.display(),
        plan.seconds,
        plan.vcpus,
        checkpoints(plan.checkpoint_every)
    );
    std::fs::write(dir.join("report.md"), report)
        .with_context(|| format!("writing {}", dir.join("report.md").display()))?;
    let json = dir.join("validate-replay.json");
    let doc = serde_json::json!({
        "kernel": kernel,
        "rootfs": rootfs,
        "seconds_per_stressor": plan.seconds,
        "vcpus": plan.vcpus,
        "checkpoint_every": plan.checkpoint_every,
        "results": results,
    });
    std::fs::write(&json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    eprintln!(
        "validate-replay: report {}",
        dir.join("report.md").display()
    );
    Ok(())
}

/// How a run's checkpoints are described in its output.
fn checkpoints(every: u64) -> String {
    match every {
        0 => "no checkpoints".into(),
        n => format!("a checkpoint every {n} instructions, each compared in replay"),
    }
}

/// `--stressors a,b` or the default list, names checked.
fn stressor_list(stressors: Option<String>) -> Result<Vec<String>> {
    let list: Vec<String> = match stressors {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        None => DEFAULT_STRESSORS.iter().map(|s| s.to_string()).collect(),
    };
    if list.is_empty() {
        bail!("--stressors: no stressor named");
    }
    if let Some(bad) = list
        .iter()
        .find(|s| !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        bail!("--stressors: {bad:?} is not a stress-ng stressor name");
    }
    Ok(list)
}

/// Records and replays one stressor in its own `krr` process; a process
/// that fails (or prints no result) makes the outcome `failed`, with why.
fn one(
    krr: &Path,
    kernel: &Path,
    rootfs: &Path,
    scratch: &Path,
    name: &str,
    plan: &Plan,
) -> StressorResult {
    let seconds_arg = plan.seconds.to_string();
    let vcpus_arg = plan.vcpus.to_string();
    let checkpoint_arg = plan.checkpoint_every.to_string();
    let args: &[&OsStr] = &[
        "validate-replay-one".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--rootfs".as_ref(),
        rootfs.as_os_str(),
        "--stressor".as_ref(),
        name.as_ref(),
        "--seconds".as_ref(),
        seconds_arg.as_ref(),
        "--vcpus".as_ref(),
        vcpus_arg.as_ref(),
        "--checkpoint-every".as_ref(),
        checkpoint_arg.as_ref(),
        "--recordings".as_ref(),
        scratch.as_os_str(),
        "--json".as_ref(),
    ];
    let result = krr_bin::run_json(krr, args).and_then(|v| {
        serde_json::from_value::<StressorResult>(v.clone())
            .with_context(|| format!("`krr validate-replay-one` printed no stressor result: {v}"))
    });
    result.unwrap_or_else(|e| StressorResult {
        stressor: name.to_string(),
        outcome: "failed".into(),
        detail: failure_detail(&e),
        events: 0,
        kernel_entries: 0,
        record_seconds: 0.0,
        replay_seconds: 0.0,
    })
}

/// One line for the table: how the `krr` process failed and the last lines
/// of its stderr (the whole command line is in the error otherwise).
fn failure_detail(e: &anyhow::Error) -> String {
    let text = match e.downcast_ref::<krr_bin::KrrFailed>() {
        Some(f) => {
            let start = f.stderr_tail.len().saturating_sub(3);
            let mut s = format!("krr validate-replay-one failed ({})", f.status);
            if start < f.stderr_tail.len() {
                s += ": ";
                s += &f.stderr_tail[start..].join(" / ");
            }
            s
        }
        None => format!("{e:#}"),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
}
