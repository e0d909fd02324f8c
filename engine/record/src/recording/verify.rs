// SPDX-License-Identifier: GPL-2.0-or-later
//! [`verify`] (`krr log verify`): checks a recording directory and says
//! whether it is complete, a valid prefix or damaged.

use super::load::read_memory_image;
use super::{
    load_cpus, load_devices, load_end, load_header, RecordingEnd, RecordingError, RecordingHeader,
    CPUS_FILE, DEVICES_FILE, DMA_FILE, END_FILE, EVENTS_FILE, HEADER_FILE, MEMORY_FILE,
    SNAPSHOT_DIR,
};
use crate::abi;
use crate::event::LogEvent;
use crate::log::{self, EventLogReader, StreamEnd, StreamScan};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// Overall verdict of [`verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyStatus {
    /// Finished, every stream complete and intact.
    Ok,
    /// Unfinished or truncated, but what is there is valid.
    PrefixValid,
    /// Something failed a check.
    Damaged,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub status: VerifyStatus,
    pub header: Option<RecordingHeader>,
    pub end: Option<RecordingEnd>,
    /// Events in the valid prefix.
    pub events: u64,
    pub event_chunks: usize,
    /// Bytes of events.krrlog that are valid.
    pub event_valid_bytes: u64,
    pub event_file_bytes: u64,
    pub events_end: Option<StreamEnd>,
    /// DMA bytes in the valid prefix.
    pub dma_bytes: u64,
    pub dma_end: Option<StreamEnd>,
    /// Agent records and their first/last sequence numbers.
    pub agent_events: u64,
    pub agent_seq: Option<(u64, u64)>,
    /// Failed checks (each makes the recording DAMAGED).
    pub problems: Vec<String>,
    /// Why the recording is only a prefix, and warnings.
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// `krr log verify`'s exit code: 0 complete and intact, 1 a valid
    /// prefix (truncated or unfinished), 2 damaged.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            VerifyStatus::Ok => 0,
            VerifyStatus::PrefixValid => 1,
            VerifyStatus::Damaged => 2,
        }
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let summary = format!(
            "{} events in {} chunks ({} bytes)",
            self.events, self.event_chunks, self.event_valid_bytes
        );
        match self.status {
            VerifyStatus::Ok => write!(f, "OK: {summary}, complete")?,
            VerifyStatus::PrefixValid => write!(f, "PREFIX VALID: {summary}")?,
            VerifyStatus::Damaged => write!(f, "DAMAGED: {}", self.problems.join("; "))?,
        }
        if self.status == VerifyStatus::Damaged {
            write!(f, "\n  valid before the damage: {summary}")?;
        }
        if self.dma_bytes > 0
            || self
                .dma_end
                .as_ref()
                .is_some_and(|e| *e != StreamEnd::Complete)
        {
            write!(f, "\n  dma: {} bytes", self.dma_bytes)?;
        }
        if let Some((first, last)) = self.agent_seq {
            write!(
                f,
                "\n  agent: {} records, seq {first}..={last}",
                self.agent_events
            )?;
        }
        for note in &self.notes {
            write!(f, "\n  {note}")?;
        }
        Ok(())
    }
}

pub(super) fn describe_end(
    file: &str,
    end: &StreamEnd,
    items_before: u64,
    what: &str,
) -> Option<String> {
    match end {
        StreamEnd::Complete => None,
        StreamEnd::Truncated { offset, reason } => Some(format!(
            "the log ends at byte {offset} of {file} (truncated: {reason})"
        )),
        StreamEnd::Damaged {
            chunk_index,
            offset,
            what: problem,
        } => Some(format!(
            "chunk {chunk_index} at byte offset {offset} of {file}: {problem}; the {items_before} {what} before it are valid"
        )),
    }
}

/// Checks a recording directory: header, snapshot, both streams (every
/// chunk), the references of Dma events into the DMA stream, the agent's
/// sequence numbers, and whether it finished. Errors only when `dir` is
/// not a recording at all; everything else is in the report.
pub fn verify(dir: &Path) -> Result<VerifyReport, RecordingError> {
    if !dir.join(HEADER_FILE).exists() {
        return Err(RecordingError::NotARecording {
            path: dir.to_path_buf(),
        });
    }
    let mut r = VerifyReport {
        dir: dir.to_path_buf(),
        status: VerifyStatus::Ok,
        header: None,
        end: None,
        events: 0,
        event_chunks: 0,
        event_valid_bytes: 0,
        event_file_bytes: 0,
        events_end: None,
        dma_bytes: 0,
        dma_end: None,
        agent_events: 0,
        agent_seq: None,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let mut truncated = false;
    match load_header(dir) {
        Ok(h) => r.header = Some(h),
        Err(e) => r.problems.push(e.to_string()),
    }
    match load_end(dir) {
        Ok(end) => r.end = end,
        Err(e) => r.problems.push(e.to_string()),
    }
    let finished = r.end.is_some();

    // Snapshot.
    let snap = dir.join(SNAPSHOT_DIR);
    let mut snapshot_missing = Vec::new();
    for name in [MEMORY_FILE, CPUS_FILE, DEVICES_FILE] {
        if !snap.join(name).exists() {
            snapshot_missing.push(format!("{SNAPSHOT_DIR}/{name}"));
        }
    }
    if !snapshot_missing.is_empty() {
        let text = format!("the start snapshot lacks {}", snapshot_missing.join(", "));
        if finished {
            r.problems.push(text);
        } else {
            r.notes.push(text);
            truncated = true;
        }
    } else {
        match read_memory_image(dir, |_, _, _| Ok(())) {
            Ok(regions) => {
                let total: u64 = regions.iter().map(|r| r.1).sum();
                if let Some(h) = &r.header {
                    if total != h.mem_bytes {
                        r.problems.push(format!(
                            "{SNAPSHOT_DIR}/{MEMORY_FILE} holds {total} bytes of RAM in {} regions, header.json says mem_bytes {}",
                            regions.len(),
                            h.mem_bytes
                        ));
                    }
                }
            }
            Err(e) => r.problems.push(e.to_string()),
        }
        match load_cpus(dir) {
            Ok(cpus) => {
                if let Some(h) = &r.header {
                    if cpus.len() != h.vcpus {
                        r.problems.push(format!(
                            "{SNAPSHOT_DIR}/{CPUS_FILE} holds {} vCPUs, header.json says {}",
                            cpus.len(),
                            h.vcpus
                        ));
                    }
                }
            }
            Err(e) => r.problems.push(e.to_string()),
        }
        if let Err(e) = load_devices(dir) {
            r.problems.push(e.to_string());
        }
    }

    // Streams.
    let scan_stream = |name: &str| -> Result<Option<StreamScan>, String> {
        let path = dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        log::scan(&path).map(Some).map_err(|e| e.to_string())
    };
    let dma_scan = match scan_stream(DMA_FILE) {
        Ok(s) => s,
        Err(e) => {
            r.problems.push(e);
            None
        }
    };
    if let Some(s) = &dma_scan {
        r.dma_bytes = s.items();
        r.dma_end = Some(s.end.clone());
        match &s.end {
            StreamEnd::Complete => {}
            StreamEnd::Truncated { .. } => {
                truncated = true;
                r.notes
                    .extend(describe_end(DMA_FILE, &s.end, s.items(), "bytes"));
            }
            StreamEnd::Damaged { .. } => {
                r.problems
                    .extend(describe_end(DMA_FILE, &s.end, s.items(), "bytes"));
            }
        }
    } else if !dir.join(DMA_FILE).exists() {
        let text = format!("{DMA_FILE} is missing");
        if finished {
            r.problems.push(text);
        } else {
            r.notes.push(text);
        }
    }
    let events_scan = match scan_stream(EVENTS_FILE) {
        Ok(s) => s,
        Err(e) => {
            r.problems.push(e);
            None
        }
    };
    if let Some(s) = &events_scan {
        r.events = s.items();
        r.event_chunks = s.chunks.len();
        r.event_valid_bytes = s.valid_len();
        r.event_file_bytes = s.file_len;
        r.events_end = Some(s.end.clone());
        match &s.end {
            StreamEnd::Complete => {}
            StreamEnd::Truncated { .. } => {
                truncated = true;
                r.notes
                    .extend(describe_end(EVENTS_FILE, &s.end, s.items(), "events"));
            }
            StreamEnd::Damaged { .. } => {
                // The stream's damage leads the report.
                r.problems.insert(
                    0,
                    describe_end(EVENTS_FILE, &s.end, s.items(), "events").unwrap_or_default(),
                );
            }
        }
        check_events(dir, &mut r);
    } else if !dir.join(EVENTS_FILE).exists() {
        let text = format!("{EVENTS_FILE} is missing");
        if finished {
            r.problems.push(text);
        } else {
            r.notes.push(text);
        }
    }

    // The end record against the streams.
    if let Some(end) = &r.end {
        if truncated {
            r.problems.push(format!(
                "{END_FILE} says the recording finished, but its files are cut short"
            ));
        } else if events_scan
            .as_ref()
            .is_some_and(|s| s.end == StreamEnd::Complete)
        {
            if end.events != r.events {
                r.problems.push(format!(
                    "{END_FILE} counts {} events, {EVENTS_FILE} holds {}",
                    end.events, r.events
                ));
            }
            if dma_scan
                .as_ref()
                .is_some_and(|s| s.end == StreamEnd::Complete && end.dma_bytes != s.items())
            {
                r.problems.push(format!(
                    "{END_FILE} counts {} DMA bytes, {DMA_FILE} holds {}",
                    end.dma_bytes, r.dma_bytes
                ));
            }
        }
        if !end.ok {
            r.notes.push(format!(
                "the recorder marked it not replayable: {}",
                end.reason
            ));
        } else {
            r.notes.push(format!("ended: {}", end.reason));
        }
    } else {
        r.notes
            .push(format!("no {END_FILE}: the recorder did not finish"));
    }

    r.status = if !r.problems.is_empty() {
        VerifyStatus::Damaged
    } else if truncated || !finished {
        VerifyStatus::PrefixValid
    } else {
        VerifyStatus::Ok
    };
    Ok(r)
}

/// The per-event checks of [`verify`] over the valid prefix.
fn check_events(dir: &Path, r: &mut VerifyReport) {
    let vcpus = r.header.as_ref().map_or(0, |h| h.vcpus);
    let mut reader = match EventLogReader::open(&dir.join(EVENTS_FILE)) {
        Ok(reader) => reader,
        Err(e) => {
            r.problems.push(e.to_string());
            return;
        }
    };
    let mut last_seq: Option<u64> = None;
    let mut first_seq: Option<u64> = None;
    let mut dma_beyond = 0u64;
    let mut bad_cpu = 0u64;
    let mut lost_total = 0u64;
    let mut first_problem: Vec<String> = Vec::new();
    let note_first = |what: String, list: &mut Vec<String>| {
        if list.len() < 5 {
            list.push(what);
        }
    };
    // The stream's own damage was reported from the scan; stop there.
    while let Ok(Some(read)) = reader.next_event() {
        let i = read.index;
        let event = &read.event;
        if vcpus > 0 && usize::from(event.cpu()) >= vcpus {
            bad_cpu += 1;
            if bad_cpu == 1 {
                note_first(
                    format!(
                        "event #{i} belongs to cpu{}, the machine has {vcpus} vCPUs",
                        event.cpu()
                    ),
                    &mut first_problem,
                );
            }
        }
        match event {
            LogEvent::Dma {
                len, dma_offset, ..
            } => {
                let end = dma_offset.saturating_add(u64::from(*len));
                if end > r.dma_bytes {
                    dma_beyond += 1;
                    if dma_beyond == 1 {
                        note_first(
                            format!(
                                "event #{i}: its DMA bytes {dma_offset}..{end} lie past the {} valid bytes of {DMA_FILE}",
                                r.dma_bytes
                            ),
                            &mut first_problem,
                        );
                    }
                }
            }
            LogEvent::Agent { record } => {
                r.agent_events += 1;
                match abi::decode_record(record) {
                    Ok(agent) => {
                        if let Some(prev) = last_seq {
                            if agent.seq != prev.wrapping_add(1) {
                                note_first(
                                    format!(
                                        "event #{i}: agent seq {} follows seq {prev}: {} agent records are missing from the log",
                                        agent.seq,
                                        agent.seq.wrapping_sub(prev).wrapping_sub(1) as i64
                                    ),
                                    &mut first_problem,
                                );
                            }
                        }
                        if let abi::EventBody::Lost(l) = &agent.body {
                            lost_total += l.events;
                        }
                        first_seq.get_or_insert(agent.seq);
                        last_seq = Some(agent.seq);
                    }
                    Err(e) => note_first(
                        format!("event #{i}: agent record does not decode: {e}"),
                        &mut first_problem,
                    ),
                }
            }
            _ => {}
        }
    }
    if dma_beyond > 1 {
        first_problem.push(format!(
            "{dma_beyond} Dma events in all point past the DMA log"
        ));
    }
    if bad_cpu > 1 {
        first_problem.push(format!(
            "{bad_cpu} events in all name a vCPU that does not exist"
        ));
    }
    r.problems.extend(first_problem);
    if lost_total > 0 {
        r.notes.push(format!(
            "the agent dropped {lost_total} events (ring full; LOST records): not replayable"
        ));
    }
    r.agent_seq = first_seq.zip(last_seq);
}
