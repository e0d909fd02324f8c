// SPDX-License-Identifier: GPL-2.0-or-later
//! Running the external build tools (make, gcc, patch, debootstrap, mkfs):
//! their output goes to a log file, feeds a progress bar line by line, and a
//! failure becomes an error that carries the log's last lines.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use indicatif::ProgressBar;

use super::error::{io_err, ImageError, Result};

/// How many of the last output lines a failure message shows.
const TAIL_LINES: usize = 40;

/// Runs `cmd` to completion, appending its stdout and stderr to `log` and
/// calling `on_line` for every line (to drive a progress bar).
///
/// `step` names the work in errors ("kernel compile", "debootstrap", ...).
pub(crate) fn run_logged(
    step: &str,
    cmd: &mut Command,
    log: &Path,
    bar: &ProgressBar,
    mut on_line: impl FnMut(&str, &ProgressBar),
) -> Result<()> {
    let mut log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(log, "open build log"))?;
    writeln!(log_file, "$ {cmd:?}").map_err(io_err(log, "write build log"))?;

    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::MissingTool {
            program: program.clone(),
            source,
        })?;

    // Two reader threads (stdout, stderr) funnel lines into one channel so the
    // log keeps them in roughly the order they were printed.
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let stdout = child.stdout.take().expect("stdout was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    for stream in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut disk_full = false;
    for line in rx {
        let _ = writeln!(log_file, "{line}");
        if line.contains("No space left on device") {
            disk_full = true;
        }
        on_line(&line, bar);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child.wait().map_err(io_err(log, "wait for build step"))?;
    if status.success() {
        return Ok(());
    }
    if disk_full {
        return Err(ImageError::DiskFull {
            step: step.to_string(),
            path: log.parent().unwrap_or(log).to_path_buf(),
        });
    }
    Err(ImageError::CommandFailed {
        step: step.to_string(),
        status: status.to_string(),
        log: log.to_path_buf(),
        tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
    })
}

/// Runs a short command and returns its stdout, for tool version queries.
pub(crate) fn capture(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::MissingTool {
            program: program.to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImageError::CommandFailed {
            step: format!("{program} {}", args.join(" ")),
            status: output.status.to_string(),
            log: PathBuf::from("-"),
            tail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The first line of `gcc --version`: part of every recipe that compiles C,
/// since another compiler produces other bytes.
pub(crate) fn gcc_identity() -> Result<String> {
    Ok(capture("gcc", &["--version"])?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}
