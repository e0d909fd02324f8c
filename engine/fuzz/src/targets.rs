// SPDX-License-Identifier: GPL-2.0-or-later
//! The fuzz targets: each reads one input (a set of files, see
//! [`crate::Input`]) the way krr reads a recording, and returns `Err` for a
//! refusal. A refusal is the expected outcome of a damaged input; a panic,
//! a hang or an unbounded allocation is a crash.

use crate::{Input, RING_FILE};
use krr_record::abi;
use krr_record::event::LogEvent;
use krr_record::log::{self, DmaLogReader, EventLogReader};
use krr_record::recording::{self, DMA_FILE, EVENTS_FILE};
use std::path::Path;

/// What is fuzzed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Agent ring records: `abi::parse_ring` on a ring region image, then
    /// every record decoded as replay decodes a logged one.
    Ring,
    /// `events.krrlog` through `EventLogReader` (every event) and `log::scan`.
    Events,
    /// `dma.krrlog` through `DmaLogReader`: open, then reads.
    Dma,
    /// A recording through `krr log verify` (`recording::verify`), `krr log
    /// stats` and `krr log dump`.
    Verify,
    /// A recording through `Replayer::open`.
    Open,
}

pub const ALL: [Target; 5] = [
    Target::Ring,
    Target::Events,
    Target::Dma,
    Target::Verify,
    Target::Open,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Ring => "ring",
            Target::Events => "events",
            Target::Dma => "dma",
            Target::Verify => "verify",
            Target::Open => "open",
        }
    }

    /// The corpus folder (under `engine/fuzz/corpus/`) its seeds come from.
    pub fn corpus(self) -> &'static str {
        match self {
            Target::Ring => "ring",
            _ => "recording",
        }
    }

    /// The files of a corpus entry this target reads (`None`: all of them).
    pub fn files(self) -> Option<&'static str> {
        match self {
            Target::Ring => Some(RING_FILE),
            Target::Events => Some(EVENTS_FILE),
            Target::Dma => Some(DMA_FILE),
            Target::Verify | Target::Open => None,
        }
    }

    /// Runs the target on `input`, laid out as files in `dir` (empty).
    pub fn run(self, input: &Input, dir: &Path) -> Result<(), String> {
        // Every target's input is on disk, so a hang or an abort leaves it
        // in the run's work folder.
        input
            .write_to(dir)
            .map_err(|e| format!("writing the input: {e}"))?;
        match self {
            Target::Ring => ring(input.files.get(RING_FILE).map_or(&[][..], |v| v)),
            Target::Events => events(&dir.join(EVENTS_FILE)),
            Target::Dma => dma(&dir.join(DMA_FILE)),
            Target::Verify => verify(dir),
            Target::Open => open(dir),
        }
    }
}

fn ring(bytes: &[u8]) -> Result<(), String> {
    // The corpus keeps images without their trailing zeros.
    let least = (abi::RING_HEADER_SIZE as u64 + abi::MIN_DATA_SIZE) as usize;
    let mut region = bytes.to_vec();
    if region.len() < least {
        region.resize(least, 0);
    }
    let contents = abi::drain(&mut region).map_err(|e| e.to_string())?;
    // The data area as parse_ring saw it: split again and decode each
    // record the way replay decodes a logged `LogEvent::Agent`.
    let header = contents.header;
    let start = header.header_size as usize;
    let data = &region[start..start + header.data_size as usize];
    let records = abi::split_records(data, header.tail, header.head).map_err(|e| e.to_string())?;
    for (_, record) in records {
        let logged = LogEvent::Agent {
            record: record.to_vec(),
        };
        let _ = (logged.class(), logged.cpu());
        if let Some(decoded) = logged.agent_event() {
            decoded.map_err(|e| e.to_string())?;
        }
    }
    let _ = contents.counts();
    Ok(())
}

fn events(path: &Path) -> Result<(), String> {
    log::scan(path).map_err(|e| e.to_string())?;
    let mut reader = EventLogReader::open(path).map_err(|e| e.to_string())?;
    let mut count = 0u64;
    while let Some(read) = reader.next_event().map_err(|e| e.to_string())? {
        let event = &read.event;
        let _ = (event.class(), event.cpu(), event.to_string());
        if let Some(decoded) = event.agent_event() {
            let _ = decoded.map_err(|e| e.to_string())?;
        }
        count += 1;
    }
    // Seeking (chunks before the index skipped) reads the same tail.
    let reader = EventLogReader::open(path).map_err(|e| e.to_string())?;
    let tail = reader.seek(count / 2).count() as u64;
    if tail != count - count / 2 {
        return Err(format!(
            "seek to {} yielded {tail} events of {count}",
            count / 2
        ));
    }
    Ok(())
}

fn dma(path: &Path) -> Result<(), String> {
    let mut reader = DmaLogReader::open(path).map_err(|e| e.to_string())?;
    let len = reader.len();
    let _ = (format!("{:?}", reader.end()), reader.is_empty());
    // Whole stream, each half, a range across chunk boundaries, and ranges
    // past the end (refused).
    let half = len / 2;
    for (offset, n) in [
        (0, len),
        (0, half),
        (half, len - half),
        (len.saturating_sub(700), 700.min(len)),
        (len, 1),
        (u64::MAX, 2),
    ] {
        let got = reader.read(offset, n as usize);
        if offset.checked_add(n).is_some_and(|end| end <= len) {
            let bytes = got.map_err(|e| e.to_string())?;
            if bytes.len() as u64 != n {
                return Err(format!("read({offset}, {n}) gave {} bytes", bytes.len()));
            }
        } else if got.is_ok() {
            return Err(format!("read({offset}, {n}) past {len} bytes succeeded"));
        }
    }
    Ok(())
}

fn verify(dir: &Path) -> Result<(), String> {
    let report = recording::verify(dir).map_err(|e| e.to_string())?;
    let _ = (report.to_string(), report.exit_code());
    let stats = recording::stats(dir).map_err(|e| e.to_string())?;
    let _ = stats.to_string();
    let mut sink = Vec::new();
    recording::dump(dir, 0, Some(200), &mut sink).map_err(|e| e.to_string())?;
    Ok(())
}

fn open(dir: &Path) -> Result<(), String> {
    krr_replay::Replayer::open(dir)
        .map(drop)
        .map_err(|e| e.to_string())
}
