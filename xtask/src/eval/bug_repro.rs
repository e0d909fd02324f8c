// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask eval bug-repro`: the planned runs only. Recording a bug's
//! trigger, replaying to the crash and comparing the failures is not built
//! yet; the command says so and fails rather than report anything.

use crate::manifests::load_repo;
use anyhow::{anyhow, bail, Result};
use krr_orchestrator::manifest::SuiteKind;

pub fn run() -> Result<()> {
    let manifests = load_repo()?;
    let suites: Vec<_> = manifests
        .suites
        .iter()
        .filter(|s| s.kind == SuiteKind::BugRepro)
        .collect();
    if suites.is_empty() {
        bail!("no suite of kind `bug-repro` in manifests/");
    }
    println!(
        "{:<14} {:<20} {:>5} {:>8}",
        "suite", "bug", "vcpus", "attempts"
    );
    for suite in suites {
        for id in &suite.bugs {
            let bug = manifests
                .bug(id)
                .ok_or_else(|| anyhow!("suite `{}` names unknown bug `{id}`", suite.name))?;
            println!(
                "{:<14} {:<20} {:>5} {:>8}",
                suite.name, bug.id, bug.vcpus, bug.attempts
            );
        }
    }
    bail!(
        "`eval bug-repro` cannot execute these runs yet: recording a bug's trigger, replaying \
         to the crash and comparing the two failures are not implemented; nothing was measured"
    )
}
