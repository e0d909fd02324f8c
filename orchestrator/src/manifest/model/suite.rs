// SPDX-License-Identifier: GPL-2.0-or-later
//! Suites: experiments, the schemes and backend they run under, and their targets.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a suite measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SuiteKind {
    /// Recording overhead on workloads.
    RecordPerf,
    /// Record a bug, replay it, confirm the same failure.
    BugRepro,
}

/// How the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// No recording.
    Native,
    /// This project's kernel record/replay.
    Krr,
    /// Classic whole-VM record/replay (QEMU's `-icount rr=record`).
    WholeVmRr,
    /// QEMU without recording (`-accel tcg,thread=single`): the baseline of
    /// the whole-VM peer.
    QemuTcg,
    /// The KRR authors' artifact.
    KrrUpstream,
}

/// Which engine backend executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Tcg,
    Kvm,
    /// KVM when /dev/kvm is usable, else TCG.
    #[default]
    Auto,
}

/// An experiment.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a suite: a mapping with `name`, `kind`, `schemes` and `workloads` or `bugs`"
)]
pub struct Suite {
    #[schemars(pattern(r"^[a-z0-9][a-z0-9.-]*$"))]
    pub name: String,
    pub kind: SuiteKind,
    /// Workload names (`record-perf` only).
    #[serde(default)]
    pub workloads: Vec<String>,
    /// Bug ids (`bug-repro` only).
    #[serde(default)]
    pub bugs: Vec<String>,
    /// What `eval --quick` runs instead: small workloads, on one vCPU,
    /// once (`record-perf`), or bug ids (`bug-repro`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quick: Vec<String>,
    #[schemars(length(min = 1))]
    pub schemes: Vec<Scheme>,
    #[serde(default)]
    pub backend: Backend,
    /// Ratios the report checks the measured medians against.
    #[serde(default)]
    pub targets: Targets,
}

/// Wall-time ratios a `record-perf` report checks (medians of the measured
/// window); each is met when the measured ratio is at most the target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// `krr` over `native`: the cost of recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub krr_vs_native: Option<f64>,
    /// `krr` over `whole-vm-rr`: kernel-only against whole-VM recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub krr_vs_whole_vm_rr: Option<f64>,
}
