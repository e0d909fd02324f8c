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
