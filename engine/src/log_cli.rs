// SPDX-License-Identifier: GPL-2.0-or-later
//! `krr log`: check, summarise and print a recording.

use crate::record::recording;
use clap::Subcommand;
use std::io::Write;

/// `krr log ...`
#[derive(Debug, Clone, Subcommand)]
pub enum LogCommand {
    /// Check a recording: every chunk's checksums, the snapshot, the DMA
    /// references and agent sequence numbers. Exit code 0: complete and
    /// intact; 1: a valid prefix (truncated, or the recorder did not
    /// finish); 2: damaged.
    Verify {
        /// Recording: a name (a directory under $KRR_RECORDINGS, default
        /// results/recordings) or a path with a `/`.
        name: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Event counts per type, bytes, duration and rate.
    Stats {
        /// Recording: a name, or a path with a `/`.
        name: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print events, one per line.
    Dump {
        /// Recording: a name, or a path with a `/`.
        name: String,
        /// Index of the first event.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// How many events (default: to the end).
        #[arg(long)]
        count: Option<u64>,
    },
}

/// Runs a `krr log` command; returns the process exit code.
pub fn run(cmd: LogCommand) -> anyhow::Result<i32> {
    match cmd {
        LogCommand::Verify { name, json } => {
            let dir = recording::find(&name)?;
            let report = recording::verify(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}: {report}", dir.display());
            }
            Ok(report.exit_code())
        }
        LogCommand::Stats { name, json } => {
            let dir = recording::find(&name)?;
            let stats = recording::stats(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{stats}");
            }
            Ok(0)
        }
        LogCommand::Dump { name, from, count } => {
            let dir = recording::find(&name)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let note = recording::dump(&dir, from, count, &mut out);
            // `krr log dump | head` closes the pipe early: not an error.
            let broken_pipe = |e: &std::io::Error| e.kind() == std::io::ErrorKind::BrokenPipe;
            let note = match note {
                Err(recording::RecordingError::Io { source, .. }) if broken_pipe(&source) => {
                    return Ok(0)
                }
                other => other,
            };
            match out.flush() {
                Err(e) if broken_pipe(&e) => return Ok(0),
                r => r?,
            }
            drop(out);
            match note? {
                Some(note) => {
                    eprintln!("{}: {note}", dir.display());
                    Ok(1)
                }
                None => Ok(0),
            }
        }
    }
}
