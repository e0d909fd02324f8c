// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask hw-acceptance`: the ordered checks to run first on a host
//! with hardware virtualization (a CloudLab c6420 or c220g5), each with a
//! verdict and its reason, so the first hardware run shows exactly what the
//! KVM path does and what remains.
//!
//! Recording on KVM is known to be incomplete (exact positions need the PMU
//! work, parallel vCPUs the agent's kernel execution lock): those checks
//! run anyway and fail with their reason rather than being left out. On a
//! host without hardware-backed KVM the run says it cannot run, and why,
//! unless `--force` asks for the checks regardless.

use crate::doctor::EngineView;
use crate::eval::journal::{self, Status};
use crate::eval::{self, BackendArg, EvalArgs, Experiment};
use crate::repo_root;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    /// An earlier check's failure makes this one meaningless.
    NotRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub checks: &'static str,
    pub verdict: Verdict,
    pub reason: String,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

/// The checks, in the order they run.
pub const CHECKS: [(&str, &str); 7] = [
    (
        "hardware-kvm",
        "/dev/kvm is backed by VT-x or AMD-V (the engine's verdict, as `krr backend --json` gives it)",
    ),
    (
        "pmu",
        "the engine positions KVM's asynchronous events with a guest PMU counter (retired conditional branches)",
    ),
    (
        "kvm-selftests",
        "the KVM selftests (tests/selftest.rs, tests/kvm_linux.rs) pass with KRR_TEST_REQUIRE_KVM=1: nothing skipped",
    ),
    (
        "pmu-positions",
        "on a tiny guest, the guest PMU counts exactly the conditional branches the software CPU's exact instruction counts say ran",
    ),
    (
        "linux-boot-kvm",
        "Linux 6.1 boots and runs a workload on --backend kvm (eval record-perf: syscall-loop, native, 1 vCPU)",
    ),
    (
        "record-kvm-replay-1vcpu",
        "a recording made on KVM (1 vCPU) replays on the software CPU with zero divergence",
    ),
    (
        "record-kvm-replay-2vcpu",
        "the same with 2 vCPUs (needs the agent's kernel execution lock for parallel vCPUs)",
    ),
];

fn what(name: &str) -> &'static str {
    CHECKS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, w)| *w)
        .expect("a known check")
}

/// Whether this host can run the acceptance checks, from the engine's
/// view; the reason it cannot otherwise.
pub fn can_run_here(engine: &EngineView) -> Result<(), String> {
    if engine.kvm_verdict == "hardware" {
        return Ok(());
    }
    Err(format!(
        "hw-acceptance cannot run on this host: {} (engine verdict: {}). It checks the KVM path on \
         hardware virtualization (VT-x or AMD-V, ideally with a PMU: a CloudLab c6420 or c220g5, see \
         cloudlab/README.md); here guests run on the software CPU, which `cargo xtask test` covers. \
         --force runs the checks anyway (expect failures)",
        engine.kvm_reason, engine.kvm_verdict
    ))
}

pub fn run(force: bool, only: Option<Vec<String>>, out: Option<PathBuf>) -> Result<()> {
    if let Some(only) = &only {
        for name in only {
            if !CHECKS.iter().any(|(n, _)| n == name) {
                let known: Vec<&str> = CHECKS.iter().map(|(n, _)| *n).collect();
                bail!(
                    "--only: unknown check `{name}` (the checks are {})",
                    known.join(", ")
                );
            }
        }
    }
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name));
    let engine = EngineView::ask()?;
    let hardware = can_run_here(&engine);
    if let Err(reason) = &hardware {
        if !force {
            bail!("{reason}");
        }
        eprintln!("hw-acceptance: --force: {reason}");
    }
    crate::setup::ensure()?;
    let dir = eval::output_dir(
        out.as_deref(),
        &repo_root().join("results/hw-acceptance"),
        "checks.json",
    )?;
    eprintln!("hw-acceptance: results in {}", dir.display());
    let mut results: Vec<CheckResult> = Vec::new();
    let record = |r: CheckResult, results: &mut Vec<CheckResult>| -> Result<()> {
        if !wanted(r.name) {
            return Ok(());
        }
        eprintln!(
            "hw-acceptance: {:<24} {:<8} {}",
            r.name,
            match r.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::NotRun => "not run",
            },
            r.reason.lines().next().unwrap_or("")
        );
        results.push(r);
        write_results(&dir, &engine, results)
    };

    record(
        simple(
            "hardware-kvm",
            hardware.is_ok(),
            format!(
                "{} (engine verdict: {})",
                engine.kvm_reason, engine.kvm_verdict
            ),
        ),
        &mut results,
    )?;
    record(
        simple(
            "pmu",
            engine.async_events == "pmu-counted",
            engine.async_events_detail.clone(),
        ),
        &mut results,
    )?;
    let kvm_usable = engine.kvm_verdict != "absent";
    let tests = |name: &'static str, args: &[&str]| -> CheckResult {
        if !wanted(name) {
            return not_run(name, "not asked for (--only)");
        }
        if !kvm_usable {
            return not_run(name, "no usable /dev/kvm");
        }
        cargo_test(name, &dir, args)
    };
    let selftests = tests(
        "kvm-selftests",
        &[
            "--test",
            "selftest",
            "--test",
            "kvm_linux",
            "--",
            "--skip",
            PMU_TEST,
        ],
    );
    record(selftests, &mut results)?;
    record(
        tests(
            "pmu-positions",
            &["--test", "selftest", "--", "--exact", PMU_TEST],
        ),
        &mut results,
    )?;
    for (name, schemes, vcpus) in [
        ("linux-boot-kvm", "native", 1),
        ("record-kvm-replay-1vcpu", "krr", 1),
        ("record-kvm-replay-2vcpu", "krr", 2),
    ] {
        let r = if !wanted(name) {
            not_run(name, "not asked for (--only)")
        } else if !kvm_usable {
            not_run(name, "no usable /dev/kvm")
        } else if name != "linux-boot-kvm"
            && results
                .iter()
                .any(|r| r.name == "linux-boot-kvm" && r.verdict == Verdict::Fail)
        {
            not_run(name, "Linux does not boot on KVM here (linux-boot-kvm)")
        } else {
            kvm_eval(name, &dir, schemes, vcpus)
        };
        record(r, &mut results)?;
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.verdict != Verdict::Pass)
        .map(|r| r.name)
        .collect();
    eprintln!("hw-acceptance: report {}", dir.join("report.md").display());
    if !failed.is_empty() {
        bail!(
            "{} of {} checks did not pass ({}); reasons in {}",
            failed.len(),
            results.len(),
            failed.join(", "),
            dir.join("report.md").display()
        );
    }
    Ok(())
}

const PMU_TEST: &str = "the_guest_branch_counter_agrees_with_the_software_cpu";

impl CheckResult {
    fn new(name: &'static str, verdict: Verdict, reason: String) -> CheckResult {
        CheckResult {
            name,
            checks: what(name),
            verdict,
            reason,
            seconds: 0.0,
            log: None,
        }
    }

    /// Timed from `started`, its details in `log`.
    fn ran(mut self, started: Instant, log: PathBuf) -> CheckResult {
        self.seconds = started.elapsed().as_secs_f64();
        self.log = Some(log);
        self
    }
}

fn simple(name: &'static str, pass: bool, reason: String) -> CheckResult {
    let verdict = if pass { Verdict::Pass } else { Verdict::Fail };
    CheckResult::new(name, verdict, reason)
}

fn not_run(name: &'static str, why: &str) -> CheckResult {
    CheckResult::new(name, Verdict::NotRun, why.into())
}

/// `cargo test --release -p krr-engine ARGS` with `KRR_TEST_REQUIRE_KVM=1`,
/// its output in `dir/NAME.log`.
fn cargo_test(name: &'static str, dir: &Path, args: &[&str]) -> CheckResult {
    let log = dir.join(format!("{name}.log"));
    let started = Instant::now();
    let outcome = (|| -> Result<(bool, String)> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["test", "--release", "-p", "krr-engine"])
            .args(args)
            .env("KRR_TEST_REQUIRE_KVM", "1")
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .context("running cargo test")?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok((status.success(), test_failures(&text)))
    })();
    let (verdict, reason) = match outcome {
        Ok((true, _)) => (Verdict::Pass, "every test passed".to_string()),
        Ok((false, failures)) => (Verdict::Fail, failures),
        Err(e) => (Verdict::Fail, format!("{e:#}")),
    };
    CheckResult::new(name, verdict, reason).ran(started, log)
}

/// The failed tests of a `cargo test` output, each with its panic message.
pub fn test_failures(output: &str) -> String {
    let mut failed = Vec::new();
    let lines: Vec<&str> = output.lines().collect();
    for l in &lines {
        if let Some(test) = l
            .strip_prefix("test ")
            .and_then(|r| r.strip_suffix(" ... FAILED"))
        {
            // The panic line of its `---- NAME stdout ----` section.
            let header = format!("---- {test} stdout ----");
            let message = lines
                .iter()
                .skip_while(|x| **x != header)
                .skip(1)
                .skip_while(|x| !x.contains("panicked at"))
                .nth(1)
                .map(|m| m.trim().to_string())
                .unwrap_or_default();
            failed.push(if message.is_empty() {
                test.to_string()
            } else {
                format!("{test}: {message}")
            });
        }
    }
    if failed.is_empty() {
        "cargo test failed before running the tests (see the log)".into()
    } else {
        format!("{} failed: {}", failed.len(), failed.join("; "))
    }
}

/// One cell of `eval record-perf` on `--backend kvm`, in `dir/NAME/`.
fn kvm_eval(name: &'static str, dir: &Path, scheme: &str, vcpus: u32) -> CheckResult {
    let out = dir.join(name);
    let started = Instant::now();
    let mut args = EvalArgs::quick(out.clone());
    args.experiment = Experiment::RecordPerf;
    args.quick = false;
    args.workloads = Some(vec!["syscall-loop".into()]);
    args.schemes = Some(vec![scheme.into()]);
    args.vcpus = Some(vec![vcpus]);
    args.repetitions = Some(1);
    args.backend = BackendArg::Kvm;
    let ran = eval::run(args);
    let cells = journal::read(&out)
        .map(|e| journal::cells(&e))
        .unwrap_or_default();
    let (verdict, reason) = match (cells.first(), ran) {
        (Some(c), Ok(())) if c.status == Some(Status::Ok) => (
            Verdict::Pass,
            match &c.replay_verdict {
                Some(v) => format!(
                    "window {:.2} s on KVM, replay on the software CPU: {v}",
                    c.wall_seconds.unwrap_or(f64::NAN)
                ),
                None => format!("window {:.2} s on KVM", c.wall_seconds.unwrap_or(f64::NAN)),
            },
        ),
        (Some(c), _) => (
            Verdict::Fail,
            c.reason
                .clone()
                .unwrap_or_else(|| "no reason recorded".into()),
        ),
        (None, Err(e)) => (Verdict::Fail, format!("{e:#}")),
        (None, Ok(())) => (Verdict::Fail, "the eval journaled no cell".into()),
    };
    CheckResult::new(name, verdict, reason).ran(started, out.join("report.md"))
}

fn write_results(dir: &Path, engine: &EngineView, results: &[CheckResult]) -> Result<()> {
    let json = dir.join("checks.json");
    std::fs::write(&json, serde_json::to_vec_pretty(results)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let mut md = String::from("# hw-acceptance: the KVM path on this host\n\n");
    let _ = writeln!(
        md,
        "- /dev/kvm: {} ({})\n- asynchronous events on KVM: {} ({})\n- backend `auto` picks: {} ({})\n",
        engine.kvm_verdict,
        engine.kvm_reason,
        engine.async_events,
        engine.async_events_detail,
        engine.backend,
        engine.reason
    );
    let _ = writeln!(md, "| # | check | verdict | s | what it checks | reason |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (i, r) in results.iter().enumerate() {
        let verdict = match r.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail => "**FAIL**",
            Verdict::NotRun => "not run",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {verdict} | {:.0} | {} | {}{} |",
            i + 1,
            r.name,
            r.seconds,
            r.checks,
            r.reason.replace('|', "\\|").replace('\n', " "),
            r.log
                .as_ref()
                .map(|l| format!(" (log: `{}`)", l.display()))
                .unwrap_or_default()
        );
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(verdict: &str, reason: &str) -> EngineView {
        EngineView::from_json(&serde_json::json!({
            "backend": "tcg", "reason": "auto",
            "kvm": {"verdict": verdict, "reason": reason},
            "kvm_async_events": {"mode": "deterministic-points", "detail": "no PMU"},
        }))
        .unwrap()
    }

    #[test]
    fn a_host_without_hardware_kvm_is_told_plainly_why_not() {
        let err = can_run_here(&engine("software-hypervisor", "/dev/kvm is PVM")).unwrap_err();
        assert!(
            err.contains("cannot run on this host: /dev/kvm is PVM"),
            "{err}"
        );
        assert!(err.contains("--force"), "{err}");
        let err = can_run_here(&engine("absent", "/dev/kvm cannot be opened")).unwrap_err();
        assert!(err.contains("cannot be opened"), "{err}");
        assert!(can_run_here(&engine("hardware", "VT-x")).is_ok());
    }

    #[test]
    fn failed_tests_are_named_with_their_panic() {
        let out = "running 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... FAILED\n\nfailures:\n\n\
                   ---- b stdout ----\nSKIPPED: x\n\nthread 'b' (1) panicked at engine/tests/selftest.rs:9:5:\n\
                   KVM required (KRR_TEST_REQUIRE_KVM is set): /dev/kvm absent\nstack backtrace:\n\n\
                   ---- c stdout ----\nthread 'c' panicked at x.rs:1:1:\nboom\n";
        assert_eq!(
            test_failures(out),
            "2 failed: b: KVM required (KRR_TEST_REQUIRE_KVM is set): /dev/kvm absent; c: boom"
        );
        assert!(test_failures("error[E0432]: unresolved import").contains("before running"));
    }

    #[test]
    fn every_check_is_described() {
        for (name, text) in CHECKS {
            assert_eq!(what(name), text);
            assert!(!text.is_empty());
        }
    }
}
