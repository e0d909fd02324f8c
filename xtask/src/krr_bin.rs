// SPDX-License-Identifier: GPL-2.0-or-later
//! The engine, reached as a program.
//!
//! xtask does not link `krr-engine`: the engine's software CPU (unicorn) is
//! built with cmake and libclang, host packages that `cargo xtask setup`
//! installs, so xtask must compile without them. Commands that need the
//! engine install the host packages, build the `krr` binary and run it once
//! per step, reading the one JSON object it prints on stdout. A step that
//! crashes takes only its own process down.

use crate::{repo_root, setup};
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Installs the host packages, builds `krr` (release) and returns its path.
pub fn build() -> Result<PathBuf> {
    setup::ensure()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let args = [
        "build",
        "--release",
        "-p",
        "krr-engine",
        "--bin",
        "krr",
        "--message-format=json-render-diagnostics",
    ];
    eprintln!("== cargo build --release -p krr-engine --bin krr");
    // Diagnostics and progress go to the terminal (stderr); stdout carries
    // cargo's JSON messages, which name the executable it produced.
    let out = Command::new(&cargo)
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`cargo build --release -p krr-engine --bin krr` failed ({})",
            out.status
        );
    }
    let from_cargo = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "krr")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from));
    let path = from_cargo.unwrap_or_else(|| target_dir().join("release/krr"));
    if !path.is_file() {
        bail!(
            "`cargo build` succeeded but {} does not exist",
            path.display()
        );
    }
    Ok(path)
}

/// The target directory: `$CARGO_TARGET_DIR` (relative to the repository
/// root, where cargo runs) or `target/`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => repo_root().join(dir),
        _ => repo_root().join("target"),
    }
}

/// A command line as a shell would take it (for messages).
fn command_line(program: &Path, args: &[&OsStr]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().copied())
        .map(|a| {
            let a = a.to_string_lossy();
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
            {
                a.into_owned()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `stderr` up to a backtrace (`RUST_BACKTRACE=1`: an error's from
/// anyhow, a panic's from std), whose frames would fill its tail.
fn without_backtrace(stderr: &[u8]) -> &[u8] {
    let mut at = 0;
    for line in stderr.split_inclusive(|&b| b == b'\n') {
        let t = line.trim_ascii();
        if t.eq_ignore_ascii_case(b"stack backtrace:") {
            return &stderr[..at];
        }
        at += line.len();
    }
    stderr
}

/// The last `n` non-empty lines of `text`.
fn last_lines(text: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].iter().map(|l| l.to_string()).collect()
}

/// The last `n` non-empty lines of `text`, each indented.
fn tail(text: &[u8], n: usize) -> String {
    last_lines(text, n)
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `krr` process that exited unsuccessfully (or was killed).
#[derive(Debug)]
pub struct KrrFailed {
    /// The command line, as a shell would take it.
    pub command: String,
    /// How it ended, e.g. "exit status: 1" or "signal: 6 (SIGABRT)".
    pub status: String,
    /// The last non-empty lines of its stderr.
    pub stderr_tail: Vec<String>,
}

impl std::fmt::Display for KrrFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` failed ({})", self.command, self.status)?;
        if self.stderr_tail.is_empty() {
            write!(f, ", printing nothing on stderr")
        } else {
            write!(f, "; the end of its stderr:")?;
            for line in &self.stderr_tail {
                write!(f, "\n  {line}")?;
            }
            Ok(())
        }
    }
}

impl std::error::Error for KrrFailed {}

/// Runs `krr ARGS` (stdin closed, stdout and stderr captured) and returns
/// the JSON object on the last line of its stdout. The error of a failed
/// run names the command line and ends with the tail of its stderr.
pub fn run_json<S: AsRef<OsStr>>(krr: &Path, args: &[S]) -> Result<serde_json::Value> {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    let shown = command_line(krr, &args);
    let out = Command::new(krr)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        return Err(KrrFailed {
            command: shown,
            status: out.status.to_string(),
            stderr_tail: last_lines(without_backtrace(&out.stderr), 15),
        }
        .into());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    match last.map(serde_json::from_str::<serde_json::Value>) {
        Some(Ok(v)) if v.is_object() => Ok(v),
        _ => bail!(
            "`{shown}` printed no JSON object on the last line of its stdout; its stdout ends:\n{}\nand its stderr:\n{}",
            tail(&out.stdout, 5),
            tail(&out.stderr, 10)
        ),
    }
}

/// A number in `krr`'s JSON output (`what` names the command, for the
/// error); `null` is NaN (what serde_json writes for a non-finite number).
pub fn number(v: &serde_json::Value, key: &str, what: &str) -> Result<f64> {
    match v.get(key) {
        Some(serde_json::Value::Null) => Ok(f64::NAN),
        Some(n) if n.is_number() => Ok(n.as_f64().unwrap_or(f64::NAN)),
        _ => bail!("`{what}` output has no number `{key}`: {v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SH: &str = "/bin/sh";

    #[test]
    fn json_on_the_last_line_of_stdout() {
        let v = run_json(
            Path::new(SH),
            &["-c", r#"echo noise; echo '{"ratio": 1.5}'; echo >&2 log"#],
        )
        .unwrap();
        assert_eq!(number(&v, "ratio", "sh").unwrap(), 1.5);
        assert!(number(&v, "missing", "sh").is_err());
        let v = run_json(Path::new(SH), &["-c", r#"echo '{"mips": null}'"#]).unwrap();
        assert!(number(&v, "mips", "sh").unwrap().is_nan());
    }

    #[test]
    fn failure_names_the_command_and_its_stderr_before_a_backtrace() {
        let script = "echo >&2 first; echo >&2 'Error: the reason'; \
                      echo >&2; echo >&2 'Stack backtrace:'; echo >&2 '   0: frame'; exit 3";
        let err = run_json(Path::new(SH), &["-c", script]).unwrap_err();
        let failed = err.downcast_ref::<KrrFailed>().expect("a KrrFailed");
        assert_eq!(failed.stderr_tail, ["first", "Error: the reason"]);
        let text = format!("{err:#}");
        assert!(text.starts_with("`/bin/sh -c 'echo >&2 first;"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.ends_with("\n  Error: the reason"), "{text}");
    }

    #[test]
    fn no_json_is_an_error() {
        let err = run_json(Path::new(SH), &["-c", "echo not json"]).unwrap_err();
        assert!(format!("{err:#}").contains("no JSON object"), "{err:#}");
    }
}
