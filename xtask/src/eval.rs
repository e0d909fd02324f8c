// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask eval record-perf|bug-repro`.
//!
//! The manifests are validated and the run matrix is planned and printed;
//! executing it (recording with the engine, whole-VM RR with QEMU, results,
//! plots and the report) is the evaluation-harness work that follows the
//! recorder and replayer. Until then this command says so and fails: it never
//! reports numbers it did not measure.

use crate::manifests::load_repo;
use anyhow::{anyhow, bail, Result};
use clap::ValueEnum;
use krr_orchestrator::manifest::{Manifests, Scheme, SuiteKind};

#[derive(Clone, Copy, ValueEnum)]
pub enum Experiment {
    /// Recording overhead on workloads: native vs krr vs whole-VM RR.
    RecordPerf,
    /// Record a bug, replay it, confirm the same failure.
    BugRepro,
}

impl Experiment {
    fn suite_kind(self) -> SuiteKind {
        match self {
            Experiment::RecordPerf => SuiteKind::RecordPerf,
            Experiment::BugRepro => SuiteKind::BugRepro,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Experiment::RecordPerf => "record-perf",
            Experiment::BugRepro => "bug-repro",
        }
    }
}

/// One planned run: what would execute, and with which scheme.
struct PlannedRun {
    suite: String,
    subject: String,
    scheme: Scheme,
    vcpus: u32,
    repetition: u32,
}

fn plan(manifests: &Manifests, experiment: Experiment) -> Result<Vec<PlannedRun>> {
    let suites: Vec<_> = manifests
        .suites
        .iter()
        .filter(|s| s.kind == experiment.suite_kind())
        .collect();
    if suites.is_empty() {
        bail!("no suite of kind `{}` in manifests/", experiment.name());
    }
    let mut runs = Vec::new();
    for suite in suites {
        for &scheme in &suite.schemes {
            for name in &suite.workloads {
                let w = manifests.workload(name).ok_or_else(|| {
                    anyhow!("suite `{}` names unknown workload `{name}`", suite.name)
                })?;
                for &vcpus in &w.vcpus {
                    for repetition in 1..=w.repetitions {
                        runs.push(PlannedRun {
                            suite: suite.name.clone(),
                            subject: w.name.clone(),
                            scheme,
                            vcpus,
                            repetition,
                        });
                    }
                }
            }
            for id in &suite.bugs {
                let bug = manifests
                    .bug(id)
                    .ok_or_else(|| anyhow!("suite `{}` names unknown bug `{id}`", suite.name))?;
                for repetition in 1..=bug.attempts {
                    runs.push(PlannedRun {
                        suite: suite.name.clone(),
                        subject: bug.id.clone(),
                        scheme,
                        vcpus: bug.vcpus,
                        repetition,
                    });
                }
            }
        }
    }
    Ok(runs)
}

pub fn run(experiment: Experiment) -> Result<()> {
    let manifests = load_repo()?;
    let runs = plan(&manifests, experiment)?;
    println!("{}: {} planned run(s)", experiment.name(), runs.len());
    println!(
        "{:<14} {:<20} {:<12} {:>5} {:>4}",
        "suite", "subject", "scheme", "vcpus", "rep"
    );
    for r in &runs {
        println!(
            "{:<14} {:<20} {:<12} {:>5} {:>4}",
            r.suite,
            r.subject,
            format!("{:?}", r.scheme),
            r.vcpus,
            r.repetition
        );
    }
    bail!(
        "`eval {}` cannot execute these runs yet: the recorder (`krr record`), the replayer \
         (`krr replay`) and the run executor with its CSV/plots/report are not implemented; \
         nothing was measured",
        experiment.name()
    )
}
