// SPDX-License-Identifier: GPL-2.0-or-later
//! Workloads: benchmarks run in the guest, and the metrics read from their output.

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::one;

/// Whether a bigger metric value is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
}

/// A number read from the guest's output.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a metric: a mapping with `name`, `regex`, `unit` and `better`"
)]
pub struct Metric {
    pub name: String,
    /// Matched against each line of guest output; the value is the named
    /// group `value` if there is one, else the only capture group.
    pub regex: String,
    pub unit: String,
    pub better: Better,
}

impl Metric {
    /// The compiled regex. Validated manifests always compile.
    pub fn compile(&self) -> Result<Regex, regex::Error> {
        Regex::new(&self.regex)
    }

    /// The metric's value in `output`: the last match (benchmarks print a
    /// final summary after progress lines), parsed as a number.
    pub fn extract(&self, output: &str) -> Option<f64> {
        let regex = self.compile().ok()?;
        let captures = regex.captures_iter(output).last()?;
        let value = captures.name("value").or_else(|| captures.get(1))?;
        value.as_str().trim().parse().ok()
    }
}

/// A benchmark run in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a workload: a mapping with `name`, `kernel`, `command`, `vcpus` and `timeout_s`"
)]
pub struct Workload {
    #[schemars(pattern(r"^[a-z0-9][a-z0-9.-]*$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Image of kind `kernel`.
    pub kernel: String,
    /// Image of kind `initramfs`.
    #[serde(default)]
    pub initramfs: Option<String>,
    /// Image of kind `rootfs`.
    #[serde(default)]
    pub rootfs: Option<String>,
    /// Extra images of kind `disk`, attached in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// Guest shell commands run, in order, before `command`; not measured.
    #[serde(default)]
    pub setup: Vec<String>,
    /// The guest shell command that is measured.
    pub command: String,
    #[serde(default)]
    pub metrics: Vec<Metric>,
    /// How many times each configuration runs.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub repetitions: u32,
    /// Run once per vCPU count.
    #[schemars(length(min = 1), inner(range(min = 1)))]
    pub vcpus: Vec<u32>,
    /// Guest memory; the runner's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub memory_mib: Option<u64>,
    /// Limit for one run, boot included.
    #[schemars(range(min = 1))]
    pub timeout_s: u64,
}
