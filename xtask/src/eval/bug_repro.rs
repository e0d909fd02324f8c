// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask eval bug-repro`: per bug, boot its kernel, record from
//! just before the trigger, let the crash end the run (the recorder writes
//! the crash report's title, RIP and call trace into `end.json`), replay
//! the recording and compare: zero divergence, the same title, the same
//! faulting RIP and the same call trace. One verdict per bug, journaled in
//! `bugs.jsonl` as it is reached (`--resume` continues), then `report.md`
//! and `summary.csv`.
//!
//! A bug's kernel is its `kernel` image plus the bug's `patches` and
//! `fragments`, compiled in that image's build tree (only what they touch
//! recompiles); a trigger `program` is compiled into a copy of the bug's
//! initramfs; `cmdline` adds the parameters that make the bug end the run.
//!
//! A race (`nondeterministic`) records attempt k with chaos seed k. A bug
//! with no crash stops its recording at `expect.marker` and must reach
//! `expect.reaches` in replay.
//!
//! Not yet: ending a run on a report that does not panic (a lockdep splat
//! without `panic_on_warn`); such a bug gets `not-triggered` with the
//! reason.

use super::cell::{size_of, GuestImages, ECHO_WINDOW_BEGIN, WINDOW_BEGIN};
use super::journal::{self, Journal};
use super::process;
use super::shard::Shard;
use super::{ctrl_c_flag, output_dir, project_commit, recordings_dir, resume_dir, EvalArgs};
use crate::{images, krr_bin, manifests, repo_root, setup};
use anyhow::{bail, Context, Result};
use krr_orchestrator::manifest::{BugCase, Manifests, SuiteKind};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub const BUGS_FILE: &str = "bugs.jsonl";
/// The bugs a run started with and its `--manifests` paths, for `--resume`.
pub(crate) const PLAN_FILE: &str = "plan.json";

#[derive(Serialize, Deserialize)]
pub(crate) struct RunPlan {
    /// Every bug of the run, all shards' when it is one shard.
    pub bugs: Vec<String>,
    /// Absolute.
    #[serde(default)]
    pub manifests: Vec<PathBuf>,
    /// `--shard K/N`: this run reproduces only its slice of `bugs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
}

impl RunPlan {
    /// The bugs this run reproduces.
    pub fn own_bugs(&self) -> Vec<String> {
        match self.shard {
            Some(shard) => shard.slice(&self.bugs, String::clone),
            None => self.bugs.clone(),
        }
    }
}
const REPORT_FILE: &str = "report.md";
const SUMMARY_FILE: &str = "summary.csv";

/// How a bug's reproduction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Reproduced,
    NotTriggered,
    BuildFailed,
    RecordFailed,
    ReplayDiverged,
    ReplayTimeout,
    ReplayDifferentCrash,
    /// The case needs what the harness does not do yet.
    Unsupported,
}

impl Verdict {
    fn name(self) -> &'static str {
        match self {
            Verdict::Reproduced => "reproduced",
            Verdict::NotTriggered => "not-triggered",
            Verdict::BuildFailed => "build-failed",
            Verdict::RecordFailed => "record-failed",
            Verdict::ReplayDiverged => "replay-diverged",
            Verdict::ReplayTimeout => "replay-timeout",
            Verdict::ReplayDifferentCrash => "replay-different-crash",
            Verdict::Unsupported => "unsupported",
        }
    }
}

/// One line of `bugs.jsonl`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BugRecord {
    pub id: String,
    pub title: String,
    pub kind: String,
    pub vcpus: u32,
    pub nondeterministic: bool,
    pub verdict: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub kernel_sha256: Option<String>,
    pub attempts: u32,
    /// Chaos-mode seeds tried, in order (nondeterministic bugs: attempt k
    /// records with seed k); the last one is the one that fired when the
    /// bug was reproduced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chaos_seeds: Vec<u64>,
    pub record_seconds: Option<f64>,
    pub recording_bytes: Option<u64>,
    pub events: Option<u64>,
    pub replay_seconds: Option<f64>,
    pub title_expected: Option<String>,
    /// The crash of the recording (from its `end.json`).
    pub title_recorded: Option<String>,
    pub rip_recorded: Option<String>,
    pub call_trace_recorded: Vec<String>,
    /// The crash the replayed kernel printed.
    pub title_replayed: Option<String>,
    pub rip_replayed: Option<String>,
    pub call_trace_replayed: Vec<String>,
    /// Where the replay executed `expect.reaches`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached: Option<String>,
    /// The replay's end when it did not match (the divergence report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_console_lines: Vec<String>,
    pub project_commit: String,
    pub finished_at: String,
}

fn results_root() -> PathBuf {
    repo_root().join("results/bug-repro")
}

/// The bugs to run: `--bugs`, `--quick`'s, or the suite's followed by
/// those the `--manifests` files declare (`extra`).
fn chosen_bugs<'m>(
    manifests: &'m Manifests,
    args: &EvalArgs,
    extra: &[String],
) -> Result<Vec<&'m BugCase>> {
    let suite = manifests
        .suites
        .iter()
        .find(|s| s.kind == SuiteKind::BugRepro)
        .context("no suite of kind `bug-repro` in the manifests")?;
    let ids = match (&args.bugs, args.quick) {
        (Some(ids), _) => ids.clone(),
        (None, true) if suite.quick.is_empty() => {
            bail!("suite `{}` lists no `quick` bugs", suite.name)
        }
        (None, true) => suite.quick.clone(),
        (None, false) => {
            let mut ids = suite.bugs.clone();
            ids.extend(extra.iter().filter(|id| !suite.bugs.contains(id)).cloned());
            ids
        }
    };
    ids.iter()
        .map(|id| {
            manifests.bug(id).with_context(|| {
                let known: Vec<&str> = manifests.bugs.iter().map(|b| b.id.as_str()).collect();
                format!(
                    "--bugs: unknown bug `{id}` (the manifests define {})",
                    known.join(", ")
                )
            })
        })
        .collect()
}

pub fn run(args: &EvalArgs) -> Result<()> {
    if args.workloads.is_some() || args.schemes.is_some() || args.vcpus.is_some() {
        bail!("bug-repro takes --bugs, not --workloads, --schemes or --vcpus");
    }
    setup::ensure()?;
    let dir = match &args.resume {
        Some(arg) => resume_dir(arg, &results_root(), BUGS_FILE)?,
        None => output_dir(args.out.as_deref(), &results_root(), BUGS_FILE)?,
    };
    // A resumed run takes the bugs and manifest files its start chose.
    let plan_file = dir.join(PLAN_FILE);
    let saved: Option<RunPlan> = match std::fs::read(&plan_file) {
        Ok(bytes) if args.resume.is_some() => Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", plan_file.display()))?,
        ),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", plan_file.display())),
    };
    if saved.is_some() && (args.bugs.is_some() || args.quick || !args.manifests.is_empty()) {
        bail!("--resume continues the eval's own bug list: drop --bugs, --quick and --manifests");
    }
    let extra = match &saved {
        Some(plan) => plan.manifests.clone(),
        None => super::absolute_paths(&args.manifests)?,
    };
    let manifests = manifests::load_with(&extra)?;
    let plan = match saved {
        Some(plan) => plan,
        None => {
            let (_, extra_bugs) = manifests::declared_by_extra(&manifests, &extra)?;
            let plan = RunPlan {
                bugs: chosen_bugs(&manifests, args, &extra_bugs)?
                    .iter()
                    .map(|b| b.id.clone())
                    .collect(),
                manifests: extra.clone(),
                shard: args.shard,
            };
            if let Some(shard) = plan.shard {
                if plan.own_bugs().is_empty() {
                    bail!(
                        "--shard {shard}: this shard has no bugs (the run has {}, dealt one per shard in turn)",
                        plan.bugs.len()
                    );
                }
            }
            std::fs::write(&plan_file, serde_json::to_vec_pretty(&plan)?)
                .with_context(|| format!("writing {}", plan_file.display()))?;
            plan
        }
    };
    let bugs: Vec<&BugCase> = plan
        .own_bugs()
        .iter()
        .map(|id| {
            manifests
                .bug(id)
                .with_context(|| format!("bug `{id}` is no longer in the manifests"))
        })
        .collect::<Result<_>>()?;
    let krr = krr_bin::build()?;
    let done: HashSet<String> = if dir.join(BUGS_FILE).exists() {
        journal::read_lines::<BugRecord>(&dir.join(BUGS_FILE))?
            .into_iter()
            .map(|b| b.id)
            .collect()
    } else {
        HashSet::new()
    };
    let mut journal = Journal::open_file(&dir.join(BUGS_FILE))?;
    let interrupt = ctrl_c_flag()?;
    let recordings = recordings_dir(&dir)?;
    let commit = project_commit();
    eprintln!(
        "bug-repro: {} bug(s), {} to run, results in {}",
        bugs.len(),
        bugs.iter().filter(|b| !done.contains(&b.id)).count(),
        dir.display()
    );
    for bug in bugs.iter().filter(|b| !done.contains(&b.id)) {
        eprintln!("bug-repro: {} ({})", bug.id, bug.title);
        let mut rec = BugRecord {
            id: bug.id.clone(),
            title: bug.title.clone(),
            kind: format!("{:?}", bug.kind).to_lowercase(),
            vcpus: bug.vcpus,
            nondeterministic: bug.nondeterministic,
            title_expected: bug.expect.title.clone(),
            project_commit: commit.clone(),
            ..BugRecord::default()
        };
        let outcome = reproduce(&krr, &recordings, &manifests, bug, &mut rec, &interrupt);
        if interrupt.load(Ordering::SeqCst) {
            eprintln!("bug-repro: {}: interrupted; not journaled", bug.id);
            break;
        }
        match outcome {
            Ok(()) => {}
            Err(Failure { verdict, reason }) => {
                rec.verdict = Some(verdict);
                rec.reason = Some(reason);
            }
        }
        rec.finished_at =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        eprintln!(
            "bug-repro: {}: {}{}",
            rec.id,
            rec.verdict.map_or("?", Verdict::name),
            rec.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        journal.append(&rec)?;
    }
    let _ = std::fs::remove_dir(&recordings);
    let all = latest_per_bug(journal::read_lines::<BugRecord>(&dir.join(BUGS_FILE))?);
    write_results(&dir, &all)?;
    for b in &all {
        if let Some((stub, gdb)) = debug_commands(b) {
            eprintln!("bug-repro: debug {}: {stub}\n    then: {gdb}", b.id);
        }
    }
    eprintln!("bug-repro: report {}", dir.join(REPORT_FILE).display());
    if interrupt.load(Ordering::SeqCst) {
        bail!(
            "interrupted; continue with `cargo xtask eval bug-repro --resume {}`",
            dir.display()
        );
    }
    let failed: Vec<String> = all
        .iter()
        .filter(|b| b.verdict != Some(Verdict::Reproduced))
        .map(|b| format!("{} ({})", b.id, b.verdict.map_or("?", Verdict::name)))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} bug(s) not reproduced: {}; see {}",
            failed.len(),
            failed.join(", "),
            dir.join(REPORT_FILE).display()
        );
    }
    Ok(())
}

pub(super) fn latest_per_bug(records: Vec<BugRecord>) -> Vec<BugRecord> {
    let mut out: Vec<BugRecord> = Vec::new();
    for r in records {
        match out.iter_mut().find(|o| o.id == r.id) {
            Some(o) => *o = r,
            None => out.push(r),
        }
    }
    out
}

struct Failure {
    verdict: Verdict,
    reason: String,
}

fn fail(verdict: Verdict, reason: impl Into<String>) -> Failure {
    Failure {
        verdict,
        reason: reason.into(),
    }
}

fn images_of(
    manifests: &Manifests,
    bug: &BugCase,
    rec: &mut BugRecord,
) -> Result<GuestImages, Failure> {
    let (built, names) = images::build_bug_images(manifests, bug)
        .map_err(|e| fail(Verdict::BuildFailed, format!("{e:#}")))?;
    rec.kernel_sha256 = built
        .iter()
        .find(|b| b.name == names.kernel)
        .and_then(|b| b.files.get("bzImage"))
        .map(|f| f.sha256.clone());
    GuestImages::from_built(
        &built,
        &names.kernel,
        names.initramfs.as_deref(),
        names.rootfs.as_deref(),
    )
    .map_err(|e| fail(Verdict::BuildFailed, format!("{e:#}")))
}

/// The shell command that runs the trigger: its `command`, or its
/// `program` (installed in the initramfs as `/usr/local/bin/<file stem>`)
/// with its `args`.
fn trigger_command(bug: &BugCase) -> Result<String, Failure> {
    let command = match (&bug.trigger.command, &bug.trigger.program) {
        (Some(command), _) => command.clone(),
        (None, Some(program)) => {
            if bug.initramfs.is_none() {
                return Err(fail(
                    Verdict::Unsupported,
                    "a trigger `program` is installed into the bug's initramfs; this case boots \
                     a rootfs only",
                ));
            }
            let stem = program
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::iter::once(stem)
                .chain(bug.trigger.args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ")
        }
        (None, None) => return Err(fail(Verdict::RecordFailed, "the trigger is empty")),
    };
    if command.contains('"') {
        return Err(fail(
            Verdict::RecordFailed,
            "the trigger may not contain double quotes (it goes into krr.run=\"...\")",
        ));
    }
    Ok(command)
}

fn reproduce(
    krr: &Path,
    recordings: &Path,
    manifests: &Manifests,
    bug: &BugCase,
    rec: &mut BugRecord,
    interrupt: &AtomicBool,
) -> Result<(), Failure> {
    let trigger = trigger_command(bug)?;
    let images = images_of(manifests, bug, rec)?;
    let expect_console = match &bug.expect.console {
        Some(re) => Some(
            Regex::new(re)
                .map_err(|e| fail(Verdict::RecordFailed, format!("expect.console `{re}`: {e}")))?,
        ),
        None => None,
    };
    let run_cmd = format!("{ECHO_WINDOW_BEGIN} && {trigger}");
    let record_limit = bug.timeouts.boot_s + bug.timeouts.trigger_s;
    for attempt in 1..=bug.attempts {
        rec.attempts = attempt;
        let name = format!("{}-attempt{attempt}", bug.id);
        let dir = recordings.join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        let mut cmd = Command::new(krr);
        cmd.env("KRR_RECORDINGS", recordings)
            .args(["record", "--json", "--name", &name])
            .arg("--kernel")
            .arg(&images.kernel)
            .arg("--vmlinux")
            .arg(&images.vmlinux);
        if let Some(i) = &images.initrd {
            cmd.arg("--initrd").arg(i);
        }
        if let Some(r) = &images.rootfs {
            cmd.arg("--disk").arg(r);
        }
        if let Some(params) = &bug.cmdline {
            cmd.args(["--kernel-args", params]);
        }
        // A race needs other interleavings than the default schedule's:
        // each attempt runs the software CPU with its own chaos seed.
        if bug.nondeterministic {
            let seed = u64::from(attempt);
            rec.chaos_seeds.push(seed);
            cmd.args(["--backend", "tcg", "--chaos", &seed.to_string()]);
        }
        cmd.args(["--vcpus", &bug.vcpus.to_string()])
            .args(["--max-seconds", &record_limit.to_string()])
            .arg(format!("--start=marker:{WINDOW_BEGIN}"));
        if let Some(marker) = &bug.expect.marker {
            cmd.arg(format!("--stop=marker:{marker}"));
        } else if bug.expect.without_panic {
            cmd.arg("--stop=report");
        }
        cmd.args(["--run", &run_cmd]);
        let f = process::run(cmd, Duration::from_secs(record_limit + 30), interrupt)
            .map_err(|e| fail(Verdict::RecordFailed, format!("{e:#}")))?;
        rec.record_seconds = Some(f.wall_seconds);
        rec.last_console_lines = f.last_lines(20);
        let console = f.text();
        let end: Option<serde_json::Value> = std::fs::read_to_string(dir.join("end.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let crash = end.as_ref().map(|e| &e["crash"]).filter(|c| c.is_object());
        // A bug with no crash happened when its trigger printed the marker
        // (the recording stopped there).
        let happened_without_crash = crash.is_none()
            && bug
                .expect
                .marker
                .as_ref()
                .is_some_and(|m| console.contains(m.as_str()));
        let no_crash = serde_json::Value::Null;
        let crash = match crash {
            Some(c) => c,
            None if happened_without_crash => &no_crash,
            None => {
                let report = f.json();
                let ended = report
                    .as_ref()
                    .map(|r| r["run"]["end"].to_string())
                    .unwrap_or_else(|| f.describe());
                if end.is_none() {
                    return Err(fail(
                        Verdict::RecordFailed,
                        format!("no recording was finished (run ended: {ended})"),
                    ));
                }
                let _ = std::fs::remove_dir_all(&dir);
                if attempt == bug.attempts {
                    return Err(fail(
                        Verdict::NotTriggered,
                        format!("no crash after {attempt} attempt(s) (last run ended: {ended})"),
                    ));
                }
                continue;
            }
        };
        let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
        let trace = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        rec.title_recorded = text(&crash["title"]);
        rec.rip_recorded = text(&crash["rip"]);
        rec.call_trace_recorded = trace(&crash["call_trace"]);
        rec.events = end.as_ref().and_then(|e| e["events"].as_u64());
        rec.recording_bytes = size_of(&dir, &|_| true);
        rec.recording = Some(dir.clone());
        if let Some(re) = &expect_console {
            if !re.is_match(&console) {
                return Err(fail(
                    Verdict::NotTriggered,
                    format!("the console never matched expect.console `{re}`"),
                ));
            }
        }
        if let (Some(want), Some(got)) = (&bug.expect.title, &rec.title_recorded) {
            if want != got {
                return Err(fail(
                    Verdict::NotTriggered,
                    format!("the kernel crashed with `{got}`, not the expected `{want}`"),
                ));
            }
        }
        if end.as_ref().and_then(|e| e["ok"].as_bool()) != Some(true) {
            return Err(fail(
                Verdict::RecordFailed,
                format!(
                    "the recording is not replayable: {}",
                    end.as_ref()
                        .map(|e| e["reason"].to_string())
                        .unwrap_or_default()
                ),
            ));
        }
        return replay_and_compare(krr, &dir, bug, rec, interrupt);
    }
    Err(fail(Verdict::NotTriggered, "no attempt was made"))
}

fn replay_and_compare(
    krr: &Path,
    dir: &Path,
    bug: &BugCase,
    rec: &mut BugRecord,
    interrupt: &AtomicBool,
) -> Result<(), Failure> {
    let console_file = dir.join("replay-console.txt");
    let mut cmd = Command::new(krr);
    cmd.args(["replay", "--json", "--console"])
        .arg(&console_file)
        .arg(dir);
    if let Some(symbol) = &bug.expect.reaches {
        cmd.args(["--reaches", symbol]);
    }
    let f = process::run(cmd, Duration::from_secs(bug.timeouts.replay_s), interrupt)
        .map_err(|e| fail(Verdict::ReplayDiverged, format!("{e:#}")))?;
    rec.replay_seconds = Some(f.wall_seconds);
    if f.timed_out {
        return Err(fail(
            Verdict::ReplayTimeout,
            format!(
                "replay ran past timeouts.replay_s = {} s",
                bug.timeouts.replay_s
            ),
        ));
    }
    let report = f.json();
    let end = report.as_ref().map(|r| r["end"].clone());
    if end.as_ref().map(|e| &e["kind"]) != Some(&serde_json::Value::from("matched")) {
        rec.replay_end = Some(
            end.map(|e| e.to_string())
                .unwrap_or_else(|| format!("no report ({})", f.describe())),
        );
        return Err(fail(
            Verdict::ReplayDiverged,
            "the replay did not match the recording (see replay_end)",
        ));
    }
    let replayed = std::fs::read(&console_file)
        .map(|b| String::from_utf8_lossy(&b).to_string())
        .unwrap_or_default();
    let crash = krr_crash::parse(&replayed);
    rec.title_replayed = crash.as_ref().map(|c| c.title.clone());
    rec.rip_replayed = crash.as_ref().and_then(|c| c.rip.clone());
    rec.call_trace_replayed = crash.map(|c| c.call_trace).unwrap_or_default();
    let same = rec.title_replayed == rec.title_recorded
        && rec.rip_replayed == rec.rip_recorded
        && rec.call_trace_replayed == rec.call_trace_recorded;
    if !same {
        return Err(fail(
            Verdict::ReplayDifferentCrash,
            format!(
                "the replay ended with {:?} at {:?}, the recording with {:?} at {:?}",
                rec.title_replayed, rec.rip_replayed, rec.title_recorded, rec.rip_recorded
            ),
        ));
    }
    if let Some(symbol) = &bug.expect.reaches {
        rec.reached = report.as_ref().and_then(|r| {
            r["reached"]["kernel_icount"].as_u64().map(|k| {
                format!(
                    "{symbol} on vCPU {} by kernel instruction {k}",
                    r["reached"]["cpu"]
                )
            })
        });
        if rec.reached.is_none() {
            return Err(fail(
                Verdict::ReplayDifferentCrash,
                format!("the replay matched but never executed {symbol} (expect.reaches)"),
            ));
        }
    }
    rec.verdict = Some(Verdict::Reproduced);
    Ok(())
}

/// The chaos seeds a bug was recorded with, joined by `sep`.
fn seeds(b: &BugRecord, sep: &str) -> String {
    b.chaos_seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

pub(super) fn write_results(dir: &Path, bugs: &[BugRecord]) -> Result<()> {
    let num = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_default();
    let mut csv = String::from(
        "bug,kind,vcpus,nondeterministic,attempts,chaos_seeds,record_s,replay_s,recording_bytes,events,verdict,title_expected,title_recorded,title_replayed\n",
    );
    for b in bugs {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{},\"{}\",\"{}\",\"{}\"",
            b.id,
            b.kind,
            b.vcpus,
            b.nondeterministic,
            b.attempts,
            seeds(b, ";"),
            num(b.record_seconds),
            num(b.replay_seconds),
            b.recording_bytes.map(|v| v.to_string()).unwrap_or_default(),
            b.events.map(|v| v.to_string()).unwrap_or_default(),
            b.verdict.map_or("", Verdict::name),
            b.title_expected.as_deref().unwrap_or(""),
            b.title_recorded.as_deref().unwrap_or(""),
            b.title_replayed.as_deref().unwrap_or(""),
        );
    }
    let path = dir.join(SUMMARY_FILE);
    std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;

    let mut md = String::from("# bug-repro: record a kernel bug, replay it to the same crash\n\n");
    let _ = writeln!(
        md,
        "{} of {} bug(s) reproduced. A bug is `reproduced` when its recording ends in the \
         expected crash and the replay of the kernel matches the recording with zero \
         divergence and reaches the same crash: same title, same faulting RIP, same call \
         trace.\n",
        bugs.iter()
            .filter(|b| b.verdict == Some(Verdict::Reproduced))
            .count(),
        bugs.len()
    );
    let _ = writeln!(
        md,
        "| bug | kind | vCPUs | deterministic? | attempts | record s | replay s | recording | verdict | title |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for b in bugs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            b.id,
            b.kind,
            b.vcpus,
            if b.nondeterministic { "no" } else { "yes" },
            if b.chaos_seeds.is_empty() {
                b.attempts.to_string()
            } else {
                format!("{} (chaos seeds {})", b.attempts, seeds(b, ", "))
            },
            num(b.record_seconds),
            num(b.replay_seconds),
            b.recording_bytes
                .map(|v| format!("{:.1} MB, {} events", v as f64 / 1e6, b.events.unwrap_or(0)))
                .unwrap_or_else(|| "-".into()),
            b.verdict.map_or("?", Verdict::name),
            b.title_recorded
                .as_deref()
                .or(b.title_expected.as_deref())
                .unwrap_or("-"),
        );
    }
    for b in bugs {
        let _ = writeln!(md, "\n## {}\n\n{}\n", b.id, b.title);
        let _ = writeln!(md, "- verdict: {}", b.verdict.map_or("?", Verdict::name));
        if let Some(r) = &b.reason {
            let _ = writeln!(md, "- reason: {r}");
        }
        let crash = |title: &Option<String>, rip: &Option<String>| match (title, rip) {
            (None, _) => "no crash report".to_string(),
            (Some(t), Some(r)) => format!("`{t}`, RIP {r}"),
            // KASAN and lockdep reports print no register dump.
            (Some(t), None) => format!("`{t}` (the report has no RIP line)"),
        };
        let _ = writeln!(
            md,
            "- expected: {}",
            b.title_expected.as_deref().map_or(
                "any crash matching expect.console".to_string(),
                |t| format!("`{t}`")
            )
        );
        let _ = writeln!(
            md,
            "- recorded: {}",
            crash(&b.title_recorded, &b.rip_recorded)
        );
        let _ = writeln!(
            md,
            "- replayed: {}",
            crash(&b.title_replayed, &b.rip_replayed)
        );
        if let Some(r) = &b.reached {
            let _ = writeln!(md, "- replay reached {r}");
        }
        if !b.call_trace_recorded.is_empty() {
            let _ = writeln!(md, "- call trace: {}", b.call_trace_recorded.join(" < "));
        }
        if let Some(e) = &b.replay_end {
            let _ = writeln!(md, "- replay ended: {e}");
        }
        if let Some(r) = &b.recording {
            let _ = writeln!(md, "- recording: `{}`", r.display());
        }
        if let Some((stub, gdb)) = debug_commands(b) {
            let _ = writeln!(md, "- debug it: `{stub}`, then `{gdb}`");
        }
        let _ = writeln!(
            md,
            "- kernel sha256: {}",
            b.kernel_sha256.as_deref().unwrap_or("-")
        );
        let _ = writeln!(md, "- commit: {}", b.project_commit);
        if b.verdict != Some(Verdict::Reproduced) && !b.last_console_lines.is_empty() {
            let _ = writeln!(md, "\n```");
            for l in &b.last_console_lines {
                let _ = writeln!(md, "{l}");
            }
            let _ = writeln!(md, "```");
        }
    }
    let path = dir.join(REPORT_FILE);
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))
}

/// How to open a reproduced bug's recording in gdb, stopped just before its
/// crash: `krr replay --gdb --at-end` starts at the recording's end, and
/// gdb goes back to the faulting instruction (its RIP), the KASAN report, or
/// the panic. `None` without a reproduced recording.
fn debug_commands(b: &BugRecord) -> Option<(String, String)> {
    if b.verdict != Some(Verdict::Reproduced) {
        return None;
    }
    let recording = b.recording.as_ref()?;
    let header: serde_json::Value =
        serde_json::from_slice(&std::fs::read(recording.join("header.json")).ok()?).ok()?;
    let vmlinux = header["vmlinux"]["path"].as_str().unwrap_or("VMLINUX");
    let stub = format!(
        "target/release/krr replay {} --gdb :1234 --at-end",
        recording.display()
    );
    // `rawv6_sendmsg+0x26b8/0x3540`: the faulting instruction.
    let rip = b.rip_recorded.as_deref().and_then(|r| r.split('/').next());
    let title = b.title_recorded.as_deref().unwrap_or("");
    let back = match (rip, title) {
        (Some(rip), _) => format!(" -ex 'break *({rip})' -ex reverse-continue"),
        (None, t) if t.starts_with("KASAN") => {
            " -ex 'break kasan_report' -ex reverse-continue".into()
        }
        // Lockdep's report does not panic: back to where it prints the stack.
        (None, t) if t.starts_with("possible deadlock") => {
            " -ex 'break dump_stack_lvl' -ex reverse-continue".into()
        }
        (None, t) if !t.is_empty() => " -ex 'break panic' -ex reverse-continue".into(),
        // A bug with no crash: its recording ends at the trigger's verdict.
        (None, _) => String::new(),
    };
    // The kernel's gdb helpers (lx-dmesg: the crash report) beside vmlinux.
    let helpers = Path::new(vmlinux)
        .parent()
        .filter(|d| d.join("vmlinux-gdb.py").is_file())
        .map(|d| format!(" -iex 'add-auto-load-safe-path {}'", d.display()))
        .unwrap_or_default();
    Some((
        stub,
        format!("gdb{helpers} -ex 'target remote :1234'{back} {vmlinux}"),
    ))
}

/// Checks a finished `bug-repro` eval in `dir`: every bug journaled and
/// reproduced with the same title, RIP and call trace in recording and
/// replay. `cargo xtask test` runs it on `eval bug-repro --quick`.
pub fn check_results(dir: &Path) -> Result<()> {
    let bugs = latest_per_bug(journal::read_lines::<BugRecord>(&dir.join(BUGS_FILE))?);
    if bugs.is_empty() {
        bail!("{}: no bug in {BUGS_FILE}", dir.display());
    }
    let report = std::fs::read_to_string(dir.join(REPORT_FILE))
        .with_context(|| format!("reading {}", dir.join(REPORT_FILE).display()))?;
    for b in &bugs {
        if b.verdict != Some(Verdict::Reproduced) {
            bail!("{}: {:?}: {:?}", b.id, b.verdict, b.reason);
        }
        if b.title_recorded.is_none() || b.title_recorded != b.title_replayed {
            bail!(
                "{}: titles {:?} vs {:?}",
                b.id,
                b.title_recorded,
                b.title_replayed
            );
        }
        if b.call_trace_recorded.is_empty() {
            bail!("{}: no call trace in the recorded crash", b.id);
        }
        if !report.contains(&format!("## {}", b.id)) {
            bail!("{}: not in the report", b.id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reproduced(dir: &Path, title: &str, rip: Option<&str>) -> BugRecord {
        BugRecord {
            verdict: Some(Verdict::Reproduced),
            recording: Some(dir.to_path_buf()),
            title_recorded: Some(title.into()),
            rip_recorded: rip.map(String::from),
            ..BugRecord::default()
        }
    }

    #[test]
    fn debug_commands_go_back_to_the_faulting_instruction_or_report() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("kernel");
        std::fs::create_dir(&kernel).unwrap();
        std::fs::write(kernel.join("vmlinux-gdb.py"), "import linux").unwrap();
        std::fs::write(
            tmp.path().join("header.json"),
            format!(
                r#"{{"vmlinux": {{"path": "{}/vmlinux"}}}}"#,
                kernel.display()
            ),
        )
        .unwrap();
        let kasan = reproduced(tmp.path(), "KASAN: use-after-free Read in filp_close", None);
        let (_, gdb) = debug_commands(&kasan).unwrap();
        assert_eq!(
            gdb,
            format!(
                "gdb -iex 'add-auto-load-safe-path {k}' -ex 'target remote :1234' -ex 'break kasan_report' -ex reverse-continue {k}/vmlinux",
                k = kernel.display()
            ),
            "the kernel's gdb helpers are loaded where they are"
        );
        std::fs::write(
            tmp.path().join("header.json"),
            r#"{"vmlinux": {"path": "/k/vmlinux", "sha256": "00"}}"#,
        )
        .unwrap();
        let gp = reproduced(
            tmp.path(),
            "general protection fault in rawv6_sendmsg",
            Some("rawv6_sendmsg+0x26b8/0x3540"),
        );
        let (stub, gdb) = debug_commands(&gp).unwrap();
        assert!(stub.ends_with("--gdb :1234 --at-end"), "{stub}");
        assert_eq!(
            gdb,
            "gdb -ex 'target remote :1234' -ex 'break *(rawv6_sendmsg+0x26b8)' -ex reverse-continue /k/vmlinux"
        );
        let kasan = reproduced(tmp.path(), "KASAN: use-after-free Read in filp_close", None);
        assert!(debug_commands(&kasan)
            .unwrap()
            .1
            .contains("break kasan_report"));
        let panic = reproduced(tmp.path(), "kernel panic: sysrq triggered crash", None);
        assert!(debug_commands(&panic).unwrap().1.contains("break panic"));
        let lockdep = reproduced(tmp.path(), "possible deadlock in eventfd_signal_mask", None);
        assert!(debug_commands(&lockdep)
            .unwrap()
            .1
            .contains("break dump_stack_lvl"));
        let failed = BugRecord {
            verdict: Some(Verdict::ReplayDiverged),
            ..gp
        };
        assert!(debug_commands(&failed).is_none());
    }
}
