// SPDX-License-Identifier: GPL-2.0-or-later
//! [`RecordingWriter`]: writes one recording directory, from `header.json`
//! to `end.json`.

use super::{
    invalid, io_err, write_json, CpuSnapshot, RecordingEnd, RecordingError, RecordingHeader,
    CPUS_FILE, DEVICES_FILE, DMA_FILE, END_FILE, EVENTS_FILE, HEADER_FILE, MEMORY_FILE,
    SNAPSHOT_DIR,
};
use crate::event::LogEvent;
use crate::log::{self, DmaLogWriter, EventLogWriter, StreamTotals};
use crate::memory_image::MemoryCopy;
use std::fs;
use std::path::{Path, PathBuf};

/// Writes one recording directory.
pub struct RecordingWriter {
    dir: PathBuf,
    events: EventLogWriter,
    dma: DmaLogWriter,
    /// The start snapshot's memory image being written (seconds it took).
    memory_writer: Option<std::thread::JoinHandle<Result<f64, RecordingError>>>,
    /// Holds events back from the file until the snapshot's memory image is
    /// published: a recording killed at any moment after its first event
    /// reached the file has its whole start snapshot. The image's thread
    /// takes it and drops it when done; dropped here where no image is
    /// being written.
    snapshot_gate: Option<std::sync::mpsc::Sender<()>>,
}

impl RecordingWriter {
    /// Creates `dir` (and its parents; an existing non-empty `dir` is
    /// refused) and writes `header.json`, then opens the two streams.
    pub fn create(dir: &Path, header: &RecordingHeader) -> Result<RecordingWriter, RecordingError> {
        if dir.exists() {
            let mut entries = fs::read_dir(dir).map_err(io_err(dir))?;
            if entries.next().is_some() {
                return Err(RecordingError::Exists {
                    path: dir.to_path_buf(),
                });
            }
        }
        fs::create_dir_all(dir.join(SNAPSHOT_DIR)).map_err(io_err(dir))?;
        let mut header = header.clone();
        header.format_version = log::FORMAT_VERSION;
        write_json(&dir.join(HEADER_FILE), &header)?;
        let (gate, gate_rx) = std::sync::mpsc::channel();
        Ok(RecordingWriter {
            dir: dir.to_path_buf(),
            events: EventLogWriter::gated(&dir.join(EVENTS_FILE), gate_rx)?,
            dma: DmaLogWriter::create(&dir.join(DMA_FILE))?,
            memory_writer: None,
            snapshot_gate: Some(gate),
        })
    }

    /// The directory written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the start snapshot: the vCPUs and devices now, and guest RAM
    /// from `memory` on a background thread ([`RecordingWriter::finish`]
    /// waits for it).
    pub fn write_snapshot(
        &mut self,
        memory: MemoryCopy,
        cpus: &[CpuSnapshot],
        devices: serde_json::Value,
    ) -> Result<(), RecordingError> {
        let snap = self.dir.join(SNAPSHOT_DIR);
        write_json(&snap.join(CPUS_FILE), &cpus)?;
        write_json(&snap.join(DEVICES_FILE), &devices)?;
        let gate = self.snapshot_gate.take();
        self.memory_writer = Some(memory.write_in_background(snap.join(MEMORY_FILE), gate)?);
        Ok(())
    }

    /// Events wait for no image when none is being written.
    fn open_gate_without_snapshot(&mut self) {
        if self.memory_writer.is_none() {
            self.snapshot_gate = None;
        }
    }

    /// Waits for the start snapshot's memory image to be on disk; returns
    /// the seconds its background write took (0 if there was none).
    pub fn wait_for_snapshot(&mut self) -> Result<f64, RecordingError> {
        match self.memory_writer.take() {
            None => Ok(0.0),
            Some(handle) => handle.join().unwrap_or_else(|_| {
                Err(invalid(
                    &self.dir.join(SNAPSHOT_DIR).join(MEMORY_FILE),
                    "the snapshot writer thread panicked",
                ))
            }),
        }
    }

    /// Appends one event; returns its index. When the events chunk is full
    /// the DMA stream is flushed first, so a Dma event never reaches the
    /// file before its bytes do.
    pub fn event(&mut self, event: &LogEvent) -> Result<u64, RecordingError> {
        if self.events.is_full() {
            self.open_gate_without_snapshot();
            // Events may name DMA bytes of the pending DMA chunk: those are
            // in the file before the events chunk is handed off.
            self.dma.flush()?;
            self.events.close()?;
        }
        Ok(self.events.append_deferred(event)?)
    }

    /// Appends DMA bytes; returns their offset in the DMA stream (for the
    /// [`LogEvent::Dma`] that describes them).
    pub fn dma(&mut self, bytes: &[u8]) -> Result<u64, RecordingError> {
        Ok(self.dma.append(bytes)?)
    }

    /// Closes the current chunks (DMA first): everything so far survives
    /// the engine being killed.
    pub fn flush(&mut self) -> Result<(), RecordingError> {
        self.open_gate_without_snapshot();
        self.dma.flush()?;
        self.events.flush()?;
        Ok(())
    }

    /// Totals of the event stream so far.
    pub fn event_totals(&self) -> StreamTotals {
        self.events.totals()
    }

    /// Totals of the DMA stream so far.
    pub fn dma_totals(&self) -> StreamTotals {
        self.dma.totals()
    }

    /// Waits for the snapshot's memory image, flushes and syncs both
    /// streams and writes `end.json`, its stream totals taken from the
    /// writer's own counts; returns what it wrote.
    pub fn finish(mut self, mut end: RecordingEnd) -> Result<RecordingEnd, RecordingError> {
        self.open_gate_without_snapshot();
        end.snapshot_write_seconds = self.wait_for_snapshot()?;
        self.dma.sync()?;
        self.events.sync()?;
        let ev = self.events.totals();
        let dma = self.dma.totals();
        end.events = ev.items;
        end.event_chunks = ev.chunks;
        end.event_bytes_raw = ev.raw_bytes;
        end.event_bytes_compressed = ev.compressed_bytes;
        end.event_file_bytes = ev.file_bytes;
        end.dma_bytes = dma.items;
        end.dma_bytes_compressed = dma.compressed_bytes;
        if end.finished == 0 {
            end.finished = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
        }
        write_json(&self.dir.join(END_FILE), &end)?;
        Ok(end)
    }
}
