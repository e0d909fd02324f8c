// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask validate-replay`: stress-ng stressors (Debian's, in the
//! `rootfs-workloads` image), each recorded on the software CPU from the
//! start of /init and replayed (the kernel alone); a table of passed /
//! diverged / unsupported / failed per stressor, as KRR validated its replay
//! with LTP. Results: `results/validate-replay.json` and a Markdown table on
//! stdout.

use crate::{images, repo_root};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use krr_engine::machine::{Backend, Machine, MachineConfig, RunEnd, INIT_MARKER};
use krr_engine::record::recorder::{RecordConfig, StartTrigger};
use krr_engine::replay::{ReplayEnd, ReplayOptions, Replayer};
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
    "poll",
    "select",
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

const CMDLINE: &str = "console=ttyS0 nokaslr noapic nolapic acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 root=/dev/vda rw init=/init";

/// The outcome of one stressor.
#[derive(Debug, Clone, serde::Serialize)]
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
        let r = one(&kernel, &rootfs, scratch.path(), name, seconds);
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

/// Records and replays one stressor.
fn one(kernel: &Path, rootfs: &Path, scratch: &Path, name: &str, seconds: u32) -> StressorResult {
    let mut r = StressorResult {
        stressor: name.to_string(),
        outcome: "failed".into(),
        detail: String::new(),
        events: 0,
        kernel_entries: 0,
        record_seconds: 0.0,
        replay_seconds: 0.0,
    };
    // --oom-avoid keeps stress-ng from sizing memory stressors to all of
    // the guest's RAM; exit status 3 is stress-ng's "not supported here".
    // The budget stops a stressor that ignores its timeout (guest time:
    // 1 ns per instruction).
    let cmd = format!(
        "stress-ng --{name} 1 --timeout {seconds}s --oom-avoid --quiet; echo stress-ng-status=$?"
    );
    let mut cfg = MachineConfig::new(
        kernel.to_path_buf(),
        None,
        format!("{CMDLINE} krr.run=\"{cmd}\""),
    );
    cfg.disk = Some(rootfs.to_path_buf());
    cfg.mem_bytes = 1 << 30;
    cfg.max_instructions = (u64::from(seconds) + 10) * 1_000_000_000;
    let mut rc = RecordConfig::new(name.to_string(), scratch.to_path_buf());
    rc.start = StartTrigger::Marker(INIT_MARKER.to_string());
    cfg.record = Some(rc);
    let mut machine = match Machine::new(cfg, Backend::Tcg) {
        Ok(m) => m,
        Err(e) => {
            r.detail = format!("machine: {e}");
            return r;
        }
    };
    let report = machine.run();
    r.record_seconds = report.wall_seconds;
    let console = String::from_utf8_lossy(&report.console).to_string();
    if report.end != (RunEnd::EndMarker { status: 0 }) {
        r.detail = format!("recorded run ended with {:?}", report.end);
        return r;
    }
    let status = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("stress-ng-status="))
        .next_back()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match status {
        Some(0) => {}
        Some(3) => {
            r.outcome = "unsupported".into();
            r.detail = "stress-ng: not supported by this kernel/system (status 3)".into();
            return r;
        }
        other => {
            r.detail = format!("stress-ng exit status {other:?} while recording");
            return r;
        }
    }
    let Some(rec) = machine.recordings().first().cloned() else {
        r.detail = "no recording was made".into();
        return r;
    };
    let replay = Replayer::open(&rec.dir).and_then(|mut p| p.run(&ReplayOptions::default()));
    let _ = std::fs::remove_dir_all(&rec.dir);
    match replay {
        Err(e) => r.detail = format!("replay could not run: {e}"),
        Ok(rep) => {
            r.events = rep.events;
            r.kernel_entries = rep.kernel_entries;
            r.replay_seconds = rep.wall_seconds;
            match rep.end {
                ReplayEnd::Matched => {
                    r.outcome = "passed".into();
                    r.detail = format!("{} kernel instructions", rep.kernel_instructions);
                }
                ReplayEnd::Diverged(d) => {
                    r.outcome = "diverged".into();
                    r.detail = format!("event #{} at {}: expected {}", d.event, d.rip, d.expected);
                }
                ReplayEnd::Unsupported { why } => {
                    r.outcome = "unsupported".into();
                    r.detail = format!("replay: {why}");
                }
                other => r.detail = format!("{other:?}"),
            }
        }
    }
    r
}
