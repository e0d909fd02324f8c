// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask validate-replay`: stress-ng stressors (Debian's, in the
//! `rootfs-workloads` image), each recorded on the software CPU from the
//! start of /init and replayed (the kernel alone); a table of passed /
//! diverged / unsupported / failed per stressor, as KRR validated its replay
//! with LTP. Results: `results/validate-replay.json` and a Markdown table on
//! stdout.
//!
//! Each stressor is one `krr validate-replay-one` process (see
//! [`crate::krr_bin`]): one that crashes or fails is reported as `failed`,
//! with the reason, and the others go on.

use crate::{images, krr_bin, repo_root};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::ffi::OsStr;
use std::path::Path;

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

pub fn run(stressors: Option<String>, seconds: u32) -> Result<()> {
    if seconds == 0 {
        // stress-ng reads a timeout of 0 as "run forever".
        bail!("--seconds 0: expected at least 1");
    }
    let list: Vec<String> = match stressors {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        None => DEFAULT_STRESSORS.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = list
        .iter()
        .find(|s| !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        bail!("--stressors: {bad:?} is not a stress-ng stressor name");
    }
    let krr_exe = krr_bin::build()?;
    let files = images::build_files(&[
        ("guest-6.1-krr", "bzImage"),
        ("rootfs-workloads", "rootfs.ext4"),
    ])?;
    let (kernel, rootfs) = (files[0].clone(), files[1].clone());
    let scratch = tempfile::tempdir().context("creating a scratch directory for recordings")?;
    let bar = ProgressBar::new(list.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("validate-replay [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut results = Vec::new();
    for name in &list {
        bar.set_message(name.clone());
        let r = one(&krr_exe, &kernel, &rootfs, scratch.path(), name, seconds);
        // (println on a hidden bar, when stderr is not a terminal, prints
        // nothing: suspend it instead.)
        bar.suspend(|| eprintln!("  {:<12} {:<11} {}", r.stressor, r.outcome, r.detail));
        results.push(r);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let count = |o: &str| results.iter().filter(|r| r.outcome == o).count();
    println!("| stressor | outcome | events | kernel entries | record (s) | replay (s) | detail |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} |",
            r.stressor,
            r.outcome,
            r.events,
            r.kernel_entries,
            r.record_seconds,
            r.replay_seconds,
            r.detail.replace('|', "\\|")
        );
    }
    println!(
        "\npassed {}, diverged {}, unsupported {}, failed {} (of {})",
        count("passed"),
        count("diverged"),
        count("unsupported"),
        count("failed"),
        results.len()
    );
    let out = repo_root().join("results/validate-replay.json");
    std::fs::create_dir_all(out.parent().expect("results/"))?;
    let doc = serde_json::json!({
        "kernel": kernel,
        "rootfs": rootfs,
        "seconds_per_stressor": seconds,
        "results": results,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Records and replays one stressor in its own `krr` process; a process
/// that fails (or prints no result) makes the outcome `failed`, with why.
fn one(
    krr: &Path,
    kernel: &Path,
    rootfs: &Path,
    scratch: &Path,
    name: &str,
    seconds: u32,
) -> StressorResult {
    let seconds_arg = seconds.to_string();
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
