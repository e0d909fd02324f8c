// SPDX-License-Identifier: GPL-2.0-or-later
//! [`stats`] (`krr log stats`, counts per event class) and [`dump`]
//! (`krr log dump`, events as text).

use super::verify::describe_end;
use super::{load_end, load_header, RecordingError, DMA_FILE, END_FILE, EVENTS_FILE};
use crate::event::{LogEvent, ENGINE_CLASSES};
use crate::log::{self, EventLogReader, StreamEnd};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// One row of [`Stats`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassStats {
    pub class: String,
    pub count: u64,
    /// Raw (postcard) bytes of these events.
    pub bytes: u64,
}

/// `krr log stats`: counts per event class, like KRR's "Event Stats".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub dir: PathBuf,
    pub name: String,
    pub classes: Vec<ClassStats>,
    /// Exceptions taken at CPL 3 (a subset of "exception").
    pub exceptions_from_user: u64,
    pub events: u64,
    pub raw_bytes: u64,
    /// Bytes of events.krrlog (valid prefix, headers included).
    pub file_bytes: u64,
    pub bytes_per_event: f64,
    pub dma_bytes: u64,
    /// Guest (virtual) time the recording covers.
    pub virtual_ns: Option<u64>,
    pub wall_seconds: Option<f64>,
    /// Events per second of recording wall time.
    pub events_per_second: Option<f64>,
    /// How the event stream ends, when not complete.
    pub incomplete: Option<String>,
    pub finished: bool,
}

const AGENT_CLASSES: &[&str] = &[
    "syscall",
    "copy_from_user",
    "strncpy_from_user",
    "strnlen_user",
    "get_user",
    "rdtsc",
    "random",
    "rdrand",
    "pte_read",
    "shared_read",
    "exec_lock",
    "lost",
];

/// Counts the events of the valid prefix per class.
pub fn stats(dir: &Path) -> Result<Stats, RecordingError> {
    let header = load_header(dir)?;
    let end = load_end(dir)?;
    let events_path = dir.join(EVENTS_FILE);
    let mut reader = EventLogReader::open(&events_path)?;
    let mut counts: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
    let mut from_user = 0u64;
    let mut events = 0u64;
    let mut raw = 0u64;
    let mut incomplete = None;
    loop {
        match reader.next_event() {
            Ok(Some(read)) => {
                let class = read.event.class();
                let c = counts.entry(class).or_default();
                c.0 += 1;
                c.1 += read.encoded_len as u64;
                if let LogEvent::Exception {
                    from_user: true, ..
                } = read.event
                {
                    from_user += 1;
                }
                events += 1;
                raw += read.encoded_len as u64;
            }
            Ok(None) => break,
            Err(e) => {
                incomplete = Some(format!("damaged: {e}"));
                break;
            }
        }
    }
    if incomplete.is_none() {
        incomplete = reader
            .end()
            .and_then(|end| describe_end(EVENTS_FILE, end, events, "events"));
    }
    let scanned_len = fs::metadata(&events_path).map_or(0, |m| m.len());
    let file_bytes = match reader.end() {
        Some(StreamEnd::Truncated { offset, .. }) | Some(StreamEnd::Damaged { offset, .. }) => {
            *offset
        }
        _ => scanned_len,
    };
    let mut classes: Vec<ClassStats> = AGENT_CLASSES
        .iter()
        .chain(ENGINE_CLASSES)
        .map(|&class| {
            let (count, bytes) = counts.remove(class).unwrap_or_default();
            ClassStats {
                class: class.to_string(),
                count,
                bytes,
            }
        })
        .collect();
    classes.extend(
        counts
            .into_iter()
            .map(|(class, (count, bytes))| ClassStats {
                class: class.to_string(),
                count,
                bytes,
            }),
    );
    let dma_bytes = log::scan(&dir.join(DMA_FILE)).map_or(0, |s| s.items());
    let wall = end.as_ref().map(|e| e.wall_seconds);
    Ok(Stats {
        dir: dir.to_path_buf(),
        name: header.name,
        classes,
        exceptions_from_user: from_user,
        events,
        raw_bytes: raw,
        file_bytes,
        bytes_per_event: if events > 0 {
            file_bytes as f64 / events as f64
        } else {
            0.0
        },
        dma_bytes,
        virtual_ns: end.as_ref().map(|e| e.covered_virtual_ns()),
        wall_seconds: wall,
        events_per_second: wall.filter(|w| *w > 0.0).map(|w| events as f64 / w),
        incomplete,
        finished: end.is_some(),
    })
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Event Stats of {} ({})", self.name, self.dir.display())?;
        writeln!(f, "{:<20} {:>12} {:>14}", "event", "count", "raw bytes")?;
        for c in &self.classes {
            writeln!(f, "{:<20} {:>12} {:>14}", c.class, c.count, c.bytes)?;
            if c.class == "exception" && self.exceptions_from_user > 0 {
                writeln!(
                    f,
                    "{:<20} {:>12}",
                    "  (from user)", self.exceptions_from_user
                )?;
            }
        }
        writeln!(
            f,
            "{:<20} {:>12} {:>14}",
            "total", self.events, self.raw_bytes
        )?;
        writeln!(
            f,
            "log: {} bytes ({:.1} bytes/event), dma: {} bytes",
            self.file_bytes, self.bytes_per_event, self.dma_bytes
        )?;
        match (self.virtual_ns, self.wall_seconds) {
            (Some(ns), Some(wall)) => {
                write!(
                    f,
                    "duration: {:.3} s guest time, {:.3} s wall",
                    ns as f64 / 1e9,
                    wall
                )?;
                if let Some(rate) = self.events_per_second {
                    write!(f, ", {rate:.0} events/s")?;
                }
                writeln!(f)?;
            }
            _ => writeln!(
                f,
                "duration: unknown (no {END_FILE}: the recorder did not finish)"
            )?,
        }
        if let Some(why) = &self.incomplete {
            writeln!(f, "note: only a prefix: {why}")?;
        }
        Ok(())
    }
}

/// Writes events `from..from+count` (all from `from` when `count` is
/// `None`) as `#index <event>` lines. Returns a note when the log ends
/// early (truncated or damaged).
pub fn dump(
    dir: &Path,
    from: u64,
    count: Option<u64>,
    out: &mut dyn Write,
) -> Result<Option<String>, RecordingError> {
    let path = dir.join(EVENTS_FILE);
    let mut reader = EventLogReader::open(&path)?.seek(from);
    let mut written = 0u64;
    let wr = |e: io::Error| RecordingError::Io {
        path: PathBuf::from("<output>"),
        source: e,
    };
    while count.is_none_or(|c| written < c) {
        match reader.next_event() {
            Ok(Some(read)) => {
                writeln!(out, "#{} {}", read.index, read.event).map_err(wr)?;
                written += 1;
            }
            Ok(None) => break,
            Err(e) => return Ok(Some(format!("the log is damaged here: {e}"))),
        }
    }
    Ok(reader
        .end()
        .and_then(|end| describe_end(EVENTS_FILE, end, 0, "events"))
        .map(|d| format!("end of the valid prefix: {d}")))
}
