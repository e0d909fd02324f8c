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
const CSV_FILE: &str = "stressors.csv";

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
    /// Host seconds each recording may take before it is cut and what it
    /// holds replayed (0: no limit; plans written before the limit had
    /// none).
    #[serde(default)]
    max_record_seconds: u64,
    /// The guest's `stress-ng --version` when the list was asked of it.
    #[serde(default)]
    stress_ng: Option<String>,
}

fn one_vcpu() -> u32 {
    1
}

/// `cargo xtask validate-replay`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// Comma-separated stressor names (default: every stressor the guest's
    /// stress-ng offers, asked of it in a guest first).
    #[arg(long)]
    pub stressors: Option<String>,
    /// Stressors recorded and replayed at once, each in its own `krr`
    /// process (outcomes do not depend on it; wall times do).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
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
    /// Host seconds a stressor's recording may take: past them it stops and
    /// what it holds is replayed (outcome `cut`), so that one stressor too
    /// slow here cannot hold up the table (0: no limit).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub max_record_seconds: u64,
    /// Results directory (default: results/validate-replay/<UTC time>).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted run: its directory, or `latest`.
    #[arg(long, value_name = "DIR|latest")]
    pub resume: Option<String>,
}

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
    if opts.jobs == 0 {
        bail!("--jobs 0: expected at least 1");
    }
    let root = repo_root().join("results/validate-replay");
    if opts.resume.is_some()
        && (opts.stressors.is_some() || opts.vcpus.is_some() || opts.checkpoint_every.is_some())
    {
        bail!("--resume continues the run's own plan: drop --stressors, --vcpus and --checkpoint-every");
    }
    let krr_exe = krr_bin::build()?;
    let files = images::build_files(&[
        ("guest-6.1-krr", "bzImage"),
        ("rootfs-workloads", "rootfs.ext4"),
    ])?;
    let (kernel, rootfs) = (files[0].clone(), files[1].clone());
    let (dir, plan) = match &opts.resume {
        Some(arg) => {
            let dir = crate::eval::resume_dir(arg, &root, JOURNAL_FILE)?;
            let path = dir.join(PLAN_FILE);
            let plan: Plan = serde_json::from_slice(
                &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("reading {}", path.display()))?;
            (dir, plan)
        }
        None => {
            let (stressors, stress_ng) = match opts.stressors {
                Some(list) => (stressor_list(&list)?, None),
                None => {
                    let g = guest_stressors(&krr_exe, &kernel, &rootfs)?;
                    (g.stressors, Some(g.version))
                }
            };
            let plan = Plan {
                stressors,
                seconds: opts.seconds,
                vcpus: opts.vcpus.unwrap_or(1),
                checkpoint_every: opts.checkpoint_every.unwrap_or(0),
                max_record_seconds: opts.max_record_seconds,
                stress_ng,
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
    let done: Vec<StressorResult> = if journal_path.exists() {
        journal::read_lines(&journal_path)?
    } else {
        Vec::new()
    };
    let journal = Journal::open_file(&journal_path)?;
    let interrupt = crate::eval::ctrl_c_flag()?;
    // `krr validate-replay-one` deletes the recordings that replay; those
    // that do not stay here, beside the report, for debugging.
    let scratch = dir.join("recordings");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let todo: Vec<&String> = plan
        .stressors
        .iter()
        .filter(|name| !done.iter().any(|r| &r.stressor == *name))
        .collect();
    eprintln!(
        "validate-replay: {} stressor(s){}, {} to run ({} at a time), {} vCPU(s), {}, results in {}",
        plan.stressors.len(),
        plan.stress_ng
            .as_ref()
            .map_or(String::new(), |v| format!(" ({v})")),
        todo.len(),
        opts.jobs,
        plan.vcpus,
        checkpoints(plan.checkpoint_every),
        dir.display()
    );
    let bar = ProgressBar::new(plan.stressors.len() as u64);
    bar.set_position((plan.stressors.len() - todo.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "validate-replay [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("valid template"),
    );
    let shared = std::sync::Mutex::new(Progress {
        journal,
        results: done,
        running: Vec::new(),
    });
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(name) = todo.get(i) else {
                return Ok(());
            };
            if interrupt.load(Ordering::SeqCst) {
                return Ok(());
            }
            {
                let mut g = shared.lock().expect("validate-replay state");
                g.running.push(name.to_string());
                bar.set_message(g.running.join(" "));
            }
            let r = one(&krr_exe, &kernel, &rootfs, &scratch, name, &plan);
            let mut g = shared.lock().expect("validate-replay state");
            g.running.retain(|n| n != *name);
            bar.set_message(g.running.join(" "));
            if interrupt.load(Ordering::SeqCst) {
                // Ctrl-C reached the krr process too: its outcome says nothing.
                return Ok(());
            }
            // (println on a hidden bar, when stderr is not a terminal, prints
            // nothing: suspend it instead.)
            bar.suspend(|| eprintln!("  {:<16} {:<11} {}", r.stressor, r.outcome, r.detail));
            g.journal.append(&r)?;
            g.results.push(r);
            bar.inc(1);
        }
    };
    let outcomes: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..opts.jobs.min(todo.len().max(1)))
            .map(|_| scope.spawn(worker))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a validate-replay worker panicked"))
            })
            .collect()
    });
    for o in outcomes {
        o?;
    }
    if interrupt.load(Ordering::SeqCst) {
        bar.finish_and_clear();
        eprintln!(
            "validate-replay: interrupted; continue with --resume {}",
            dir.display()
        );
        bail!("interrupted");
    }
    let mut results = shared.into_inner().expect("validate-replay state").results;
    bar.finish_and_clear();
    // The plan's order, whatever order a resumed run finished them in.
    results.sort_by_key(|r| plan.stressors.iter().position(|s| *s == r.stressor));
    let table = table(&results);
    print!("{table}");
    let report = format!(
        "# validate-replay: stress-ng stressors recorded and replayed\n\nKernel `{}`, rootfs `{}`{}, {} s per stressor, {} vCPU(s), {}.\n\n{table}",
        kernel.display(),
        rootfs.display(),
        plan.stress_ng
            .as_ref()
            .map_or(String::new(), |v| format!(" ({v})")),
        plan.seconds,
        plan.vcpus,
        checkpoints(plan.checkpoint_every)
    );
    std::fs::write(dir.join("report.md"), report)
        .with_context(|| format!("writing {}", dir.join("report.md").display()))?;
    std::fs::write(dir.join(CSV_FILE), csv(&results))
        .with_context(|| format!("writing {}", dir.join(CSV_FILE).display()))?;
    let json = dir.join("validate-replay.json");
    let doc = serde_json::json!({
        "kernel": kernel,
        "rootfs": rootfs,
        "seconds_per_stressor": plan.seconds,
        "vcpus": plan.vcpus,
        "checkpoint_every": plan.checkpoint_every,
        "max_record_seconds": plan.max_record_seconds,
        "stress_ng": plan.stress_ng,
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

/// What the workers share: the journal, the results so far and the
/// stressors being run (for the progress bar).
struct Progress {
    journal: Journal,
    results: Vec<StressorResult>,
    running: Vec<String>,
}

/// The summary line (the share passed is of the runnable stressors: all
/// but the unsupported ones), what did not pass, then every stressor.
fn table(results: &[StressorResult]) -> String {
    let count = |o: &str| results.iter().filter(|r| r.outcome == o).count();
    let runnable = results.len() - count("unsupported");
    // A cut stressor's recording (stopped at the wall-time limit) replayed
    // with zero divergence: it counts, and the line says how many were cut.
    let zero_divergence = count("passed") + count("cut");
    let mut out = format!(
        "passed {}, cut {}, diverged {}, failed {}, unsupported {} (of {}): {} of {} runnable stressors replay with zero divergence ({:.1}%){}\n",
        count("passed"),
        count("cut"),
        count("diverged"),
        count("failed"),
        count("unsupported"),
        results.len(),
        zero_divergence,
        runnable,
        if runnable == 0 {
            0.0
        } else {
            100.0 * zero_divergence as f64 / runnable as f64
        },
        match count("cut") {
            0 => String::new(),
            n => format!(", {n} of them recorded only up to the wall-time limit"),
        }
    );
    let row = |r: &StressorResult| {
        format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {} |\n",
            r.stressor,
            r.outcome,
            r.events,
            r.kernel_entries,
            r.record_seconds,
            r.replay_seconds,
            r.detail.replace('|', "\\|")
        )
    };
    const HEAD: &str = "| stressor | outcome | events | kernel entries | record (s) | replay (s) | detail |\n|---|---|---|---|---|---|---|\n";
    for (outcome, title) in [
        (
            "diverged",
            "Diverged (first divergent event, where, what was expected)",
        ),
        (
            "failed",
            "Failed (while recording, or the replay could not run)",
        ),
        (
            "cut",
            "Cut at the wall-time limit (stress-ng unfinished; what was recorded replayed with zero divergence)",
        ),
        ("unsupported", "Unsupported here (stress-ng's reason)"),
    ] {
        if count(outcome) > 0 {
            out += &format!("\n## {title}\n\n{HEAD}");
            for r in results.iter().filter(|r| r.outcome == outcome) {
                out += &row(r);
            }
        }
    }
    out += &format!("\n## Every stressor\n\n{HEAD}");
    for r in results {
        out += &row(r);
    }
    out
}

/// `stressors.csv`: one row per stressor, in the plan's order.
fn csv(results: &[StressorResult]) -> String {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = String::from(
        "stressor,outcome,events,kernel_entries,record_seconds,replay_seconds,detail\n",
    );
    for r in results {
        out += &format!(
            "{},{},{},{},{:.3},{:.3},{}\n",
            quote(&r.stressor),
            quote(&r.outcome),
            r.events,
            r.kernel_entries,
            r.record_seconds,
            r.replay_seconds,
            quote(&r.detail)
        );
    }
    out
}

/// How a run's checkpoints are described in its output.
fn checkpoints(every: u64) -> String {
    match every {
        0 => "no checkpoints".into(),
        n => format!("a checkpoint every {n} instructions, each compared in replay"),
    }
}

/// `--stressors a,b` or the default list, names checked.
fn stressor_list(stressors: &str) -> Result<Vec<String>> {
    let list: Vec<String> = stressors
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
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

/// What `krr stress-ng-stressors --json` prints.
#[derive(serde::Deserialize)]
struct GuestStressors {
    version: String,
    stressors: Vec<String>,
}

/// Every stressor the rootfs's stress-ng offers, asked of it in a guest.
fn guest_stressors(krr: &Path, kernel: &Path, rootfs: &Path) -> Result<GuestStressors> {
    eprintln!("validate-replay: asking the guest's stress-ng for its stressors");
    let args: &[&OsStr] = &[
        "stress-ng-stressors".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--rootfs".as_ref(),
        rootfs.as_os_str(),
        "--json".as_ref(),
    ];
    let v = krr_bin::run_json(krr, args)?;
    let g: GuestStressors = serde_json::from_value(v.clone())
        .with_context(|| format!("`krr stress-ng-stressors` printed no stressor list: {v}"))?;
    // The names go into guest command lines.
    stressor_list(&g.stressors.join(","))?;
    Ok(g)
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
    let max_record_arg = plan.max_record_seconds.to_string();
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
        "--max-record-seconds".as_ref(),
        max_record_arg.as_ref(),
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

#[cfg(test)]
mod tests {
    use super::{csv, stressor_list, table, StressorResult};

    fn result(stressor: &str, outcome: &str, detail: &str) -> StressorResult {
        StressorResult {
            stressor: stressor.into(),
            outcome: outcome.into(),
            detail: detail.into(),
            events: 10,
            kernel_entries: 5,
            record_seconds: 1.5,
            replay_seconds: 0.5,
        }
    }

    #[test]
    fn the_table_counts_the_share_passed_of_the_runnable_ones() {
        let results = [
            result("fork", "passed", "1 kernel instructions"),
            result("clone", "diverged", "event #3 at 0x1: expected a | b"),
            result(
                "fanotify",
                "unsupported",
                "stress-ng status 4: not supported",
            ),
            result("pipe", "passed", "x"),
            result("kcmp", "failed", "stress-ng exit status 2"),
        ];
        let t = table(&results);
        let first = t.lines().next().unwrap();
        assert_eq!(
            first,
            "passed 2, cut 0, diverged 1, failed 1, unsupported 1 (of 5): 2 of 4 runnable stressors replay with zero divergence (50.0%)"
        );
        let diverged = t.find("## Diverged").unwrap();
        let failed = t.find("## Failed").unwrap();
        let every = t.find("## Every stressor").unwrap();
        assert!(diverged < failed && failed < every);
        assert!(t[diverged..failed].contains("| clone | diverged |"));
        assert!(!t[diverged..failed].contains("| fork |"));
        assert!(t.contains("expected a \\| b"), "{t}");
        assert_eq!(t.matches("| fork | passed |").count(), 1);
    }

    /// A cut stressor replayed what it recorded with zero divergence: it
    /// counts toward the share, and the line says so.
    #[test]
    fn cut_stressors_count_and_are_named_as_cut() {
        let results = [
            result("fork", "passed", "x"),
            result(
                "far-branch",
                "cut",
                "recording stopped at its 600-s wall-time limit",
            ),
            result("clone", "diverged", "y"),
        ];
        let t = table(&results);
        assert_eq!(
            t.lines().next().unwrap(),
            "passed 1, cut 1, diverged 1, failed 0, unsupported 0 (of 3): 2 of 3 runnable stressors replay with zero divergence (66.7%), 1 of them recorded only up to the wall-time limit"
        );
        let cut = t.find("## Cut at the wall-time limit").unwrap();
        assert!(t[cut..].contains("| far-branch | cut |"));
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let c = csv(&[result("clone", "diverged", "event #3, \"rip\"")]);
        assert_eq!(
            c,
            "stressor,outcome,events,kernel_entries,record_seconds,replay_seconds,detail\n\
             clone,diverged,10,5,1.500,0.500,\"event #3, \"\"rip\"\"\"\n"
        );
    }

    #[test]
    fn stressor_names_are_checked_before_they_reach_a_guest_command_line() {
        assert_eq!(stressor_list("fork, pipe,").unwrap(), ["fork", "pipe"]);
        assert!(stressor_list("fork;reboot").is_err());
        assert!(stressor_list(" , ").is_err());
    }
}
