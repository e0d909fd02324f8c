// SPDX-License-Identifier: GPL-2.0-or-later
//! Runs the `krr` binary of this build with recordings under a given
//! directory, echoing its output into the test's log.

use std::path::Path;
use std::process::{Command, Output};

/// The `krr` binary, with `KRR_RECORDINGS=recordings`.
pub fn krr_command(recordings: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_krr"));
    cmd.env("KRR_RECORDINGS", recordings);
    cmd
}

/// Runs `krr ARGS` to its end and prints what it said.
pub fn krr<S: AsRef<str>>(recordings: &Path, args: &[S]) -> Output {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = krr_command(recordings)
        .args(&args)
        .output()
        .expect("running krr");
    eprintln!(
        "krr {}: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `krr log stats NAME --json`.
#[allow(dead_code)] // not every test binary reads stats
pub fn stats_json(recordings: &Path, name: &str) -> serde_json::Value {
    let out = krr(recordings, &["log", "stats", name, "--json"]);
    assert!(out.status.success(), "krr log stats {name} failed");
    serde_json::from_slice(&out.stdout).expect("stats --json is JSON")
}

/// Count of one event class in `krr log stats --json` output.
#[allow(dead_code)]
pub fn count(stats: &serde_json::Value, class: &str) -> u64 {
    stats["classes"]
        .as_array()
        .and_then(|classes| classes.iter().find(|c| c["class"] == class))
        .and_then(|c| c["count"].as_u64())
        .unwrap_or(0)
}
