// SPDX-License-Identifier: GPL-2.0-or-later
//! Bug cases: kernel bugs to reproduce, record and replay.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::one;

/// Where a bug comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BugKind {
    Syzbot,
    Cve,
    Synthetic,
}

/// What makes the bug happen: exactly one of `command` (a guest shell
/// command) or `program` (a C source compiled for the guest, run with `args`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a trigger: a mapping with `command`, or `program` and `args`"
)]
pub struct Trigger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Path from the repository root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// How the failure shows; at least one of the two.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "an expected failure: a mapping with `title`, `console`, `marker`, `reaches` and/or `without_panic`"
)]
pub struct Expect {
    /// The crash title as syzkaller's pkg/report normalizes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// A regex over the guest console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// A bug with no crash: the console line (literal text) its trigger
    /// prints when the bug happened; the recording stops there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    /// A kernel function the replay must execute (checked by counting the
    /// blocks entered at its address; no debugger needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reaches: Option<String>,
    /// The report does not panic the kernel (a lockdep splat, a WARNING
    /// without `panic_on_warn`): the recording and the run end at the end
    /// of its call trace (`krr record --stop=report`), since such a kernel
    /// may spin with interrupts off and never end by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_panic: bool,
}

/// Limits for each phase of a bug reproduction, in seconds.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "timeouts: a mapping with `boot_s`, `trigger_s` and `replay_s`"
)]
pub struct Timeouts {
    #[schemars(range(min = 1))]
    pub boot_s: u64,
    #[schemars(range(min = 1))]
    pub trigger_s: u64,
    #[schemars(range(min = 1))]
    pub replay_s: u64,
}

/// A kernel bug to reproduce, record and replay.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a bug case: a mapping with `id`, `title`, `kind`, `kernel`, `trigger`, `expect` and `timeouts`"
)]
pub struct BugCase {
    /// Unique across all manifests; `[a-z0-9][a-z0-9.-]*`.
    #[schemars(pattern(r"^[a-z0-9][a-z0-9.-]*$"))]
    pub id: String,
    pub title: String,
    pub kind: BugKind,
    /// Where the bug is described (syzbot report, CVE record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Image of kind `kernel`.
    pub kernel: String,
    /// Patches applied over `kernel`'s sources to reintroduce the bug: the
    /// bug's kernel is `kernel` plus these and `fragments`, compiled in
    /// `kernel`'s build tree.
    #[serde(default)]
    pub patches: Vec<PathBuf>,
    /// Config fragments the bug's path needs, applied after `kernel`'s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fragments: Vec<PathBuf>,
    /// Kernel parameters added to the default command line, e.g.
    /// `kasan.fault=panic panic_on_warn=1` so that the bug ends the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    pub trigger: Trigger,
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub vcpus: u32,
    #[serde(default)]
    pub nondeterministic: bool,
    /// How many times the trigger is tried; more than 1 only when
    /// `nondeterministic`.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub attempts: u32,
    pub expect: Expect,
    pub timeouts: Timeouts,
}
