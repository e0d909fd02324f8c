// SPDX-License-Identifier: GPL-2.0-or-later
//! Writing stream files: [`ChunkWriter`] and its writer thread, and the
//! typed writers of `events.krrlog` and `dma.krrlog`.

use super::{
    io_err, LogError, StreamKind, CHUNK_HEADER_LEN, CHUNK_MAGIC, DEFAULT_CHUNK_TARGET,
    FILE_HEADER_LEN, FILE_MAGIC, FORMAT_VERSION, MAX_CHUNK_BYTES, ZSTD_LEVEL,
};
use crate::event::LogEvent;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Running totals of a stream writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamTotals {
    /// Items appended (events, or DMA bytes), flushed or not.
    pub items: u64,
    /// Raw bytes appended.
    pub raw_bytes: u64,
    /// Compressed payload bytes written (flushed chunks only).
    pub compressed_bytes: u64,
    /// File bytes written: file header, chunk headers and payloads.
    pub file_bytes: u64,
    /// Chunks written.
    pub chunks: u32,
}

/// A closed chunk on its way to the writer thread.
struct ChunkJob {
    index: u32,
    first: u64,
    count: u32,
    raw: Vec<u8>,
}

/// What the writer thread did with a [`ChunkJob`]: the raw buffer comes
/// back for reuse.
struct ChunkDone {
    raw: Vec<u8>,
    compressed: u64,
    file_bytes: u64,
}

/// Chunks in flight at most before [`ChunkWriter::close_chunk`] waits for
/// the writer thread (bounds memory when the disk is slower than the
/// guest).
const MAX_IN_FLIGHT: usize = 4;

/// Writes one stream file: items are gathered into a raw buffer; a closed
/// chunk is compressed and written by the stream's writer thread, so the
/// vCPU thread that records only encodes and copies.
///
/// [`ChunkWriter::flush_chunk`] waits until every closed chunk is in the
/// file; [`ChunkWriter::close_chunk`] (used when a chunk fills up) does not.
/// Chunks are written in the order they were closed.
pub struct ChunkWriter {
    path: PathBuf,
    /// For `fdatasync` (the writer thread owns the writing handle).
    file: File,
    kind: StreamKind,
    target: usize,
    raw: Vec<u8>,
    pending_items: u32,
    next_index: u32,
    next_first: u64,
    totals: StreamTotals,
    jobs: Option<mpsc::Sender<ChunkJob>>,
    done: mpsc::Receiver<Result<ChunkDone, LogError>>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: usize,
    spare: Vec<Vec<u8>>,
    /// The writer thread's first failure, kept for every later call.
    failed: Option<String>,
}

impl ChunkWriter {
    /// Creates `path` (which must not exist) and writes the file header.
    pub fn create(path: &Path, kind: StreamKind) -> Result<ChunkWriter, LogError> {
        Self::with_target(path, kind, DEFAULT_CHUNK_TARGET)
    }

    /// As [`ChunkWriter::create`], closing chunks at `target` raw bytes.
    pub fn with_target(
        path: &Path,
        kind: StreamKind,
        target: usize,
    ) -> Result<ChunkWriter, LogError> {
        Self::gated(path, kind, target, None)
    }

    /// As [`ChunkWriter::with_target`]; with a `gate`, no chunk reaches the
    /// file before the gate opens (a message, or its sender dropped).
    pub fn gated(
        path: &Path,
        kind: StreamKind,
        target: usize,
        gate: Option<mpsc::Receiver<()>>,
    ) -> Result<ChunkWriter, LogError> {
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut header = Vec::with_capacity(FILE_HEADER_LEN as usize);
        header.extend_from_slice(&FILE_MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&(kind as u32).to_le_bytes());
        file.write_all(&header).map_err(io_err(path))?;
        let compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(io_err(path))?;
        let sync_handle = file.try_clone().map_err(io_err(path))?;
        let (jobs, job_rx) = mpsc::channel::<ChunkJob>();
        let (done_tx, done) = mpsc::channel();
        let thread_path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name(format!("krr-log-{kind}"))
            .spawn(move || {
                chunk_writer_thread(thread_path, file, compressor, job_rx, done_tx, gate)
            })
            .map_err(io_err(path))?;
        Ok(ChunkWriter {
            path: path.to_path_buf(),
            file: sync_handle,
            kind,
            target: target.max(1),
            raw: Vec::with_capacity(target.max(1) + 4096),
            pending_items: 0,
            next_index: 0,
            next_first: 0,
            totals: StreamTotals {
                file_bytes: FILE_HEADER_LEN,
                ..StreamTotals::default()
            },
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: 0,
            spare: Vec::new(),
            failed: None,
        })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stream's kind.
    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Totals so far (compressed and file bytes count written chunks only;
    /// exact after [`ChunkWriter::flush_chunk`]).
    pub fn totals(&self) -> StreamTotals {
        self.totals
    }

    /// Raw bytes gathered for the next chunk.
    pub fn pending_raw(&self) -> usize {
        self.raw.len()
    }

    /// Whether the pending chunk reached its target size.
    pub fn is_full(&self) -> bool {
        self.raw.len() >= self.target
    }

    fn check_failed(&self) -> Result<(), LogError> {
        match &self.failed {
            Some(what) => Err(LogError::Encode {
                path: self.path.clone(),
                problem: format!("the log writer failed earlier: {what}"),
            }),
            None => Ok(()),
        }
    }

    /// Adds `items` items whose raw bytes are `bytes` to the pending chunk,
    /// without closing it. Returns the index of the first item added.
    pub fn append_raw(&mut self, bytes: &[u8], items: u32) -> Result<u64, LogError> {
        if self.raw.len() + bytes.len() > MAX_CHUNK_BYTES as usize / 2 {
            self.close_chunk()?;
        }
        if bytes.len() > MAX_CHUNK_BYTES as usize / 2 {
            return Err(LogError::Encode {
                path: self.path.clone(),
                problem: format!(
                    "an item of {} bytes is too large for one chunk",
                    bytes.len()
                ),
            });
        }
        let first = self.totals.items;
        self.raw.extend_from_slice(bytes);
        self.pending_items += items;
        self.totals.items += u64::from(items);
        self.totals.raw_bytes += bytes.len() as u64;
        Ok(first)
    }

    /// Adds one item and closes the chunk when it reached its target.
    pub fn append_item(&mut self, bytes: &[u8]) -> Result<u64, LogError> {
        let first = self.append_raw(bytes, 1)?;
        if self.is_full() {
            self.close_chunk()?;
        }
        Ok(first)
    }

    /// Takes one result of the writer thread (blocking or not).
    fn collect_one(&mut self, block: bool) -> Result<bool, LogError> {
        let result = if block {
            match self.done.recv() {
                Ok(r) => r,
                Err(_) => {
                    self.failed
                        .get_or_insert_with(|| "the writer thread ended".into());
                    self.in_flight = 0;
                    return self.check_failed().map(|_| false);
                }
            }
        } else {
            match self.done.try_recv() {
                Ok(r) => r,
                Err(_) => return Ok(false),
            }
        };
        self.in_flight -= 1;
        match result {
            Ok(done) => {
                self.totals.chunks += 1;
                self.totals.compressed_bytes += done.compressed;
                self.totals.file_bytes += done.file_bytes;
                let mut raw = done.raw;
                raw.clear();
                self.spare.push(raw);
                Ok(true)
            }
            Err(e) => {
                self.failed.get_or_insert_with(|| e.to_string());
                Err(e)
            }
        }
    }

    /// Hands the pending items to the writer thread as one chunk (nothing
    /// when none are pending), without waiting for it to be written.
    pub fn close_chunk(&mut self) -> Result<(), LogError> {
        self.check_failed()?;
        while self.collect_one(false)? {}
        if self.raw.is_empty() && self.pending_items == 0 {
            return Ok(());
        }
        while self.in_flight >= MAX_IN_FLIGHT {
            self.collect_one(true)?;
        }
        let fresh = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.target + 4096));
        let job = ChunkJob {
            index: self.next_index,
            first: self.next_first,
            count: self.pending_items,
            raw: std::mem::replace(&mut self.raw, fresh),
        };
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            // The thread stopped; its error (if any) is in `done`.
            while self.in_flight > 0 {
                self.collect_one(true)?;
            }
            self.failed
                .get_or_insert_with(|| "the writer thread ended".into());
            return self.check_failed();
        }
        self.in_flight += 1;
        self.next_index += 1;
        self.next_first += u64::from(self.pending_items);
        self.pending_items = 0;
        Ok(())
    }

    /// Closes the pending chunk and waits until every closed chunk is in
    /// the file (the kernel's page cache: it survives the engine being
    /// killed).
    pub fn flush_chunk(&mut self) -> Result<(), LogError> {
        self.close_chunk()?;
        while self.in_flight > 0 {
            self.collect_one(true)?;
        }
        Ok(())
    }

    /// Flushes and forces the file to disk (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.flush_chunk()?;
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

impl Drop for ChunkWriter {
    /// Writes what is pending and stops the thread (a writer dropped
    /// without [`ChunkWriter::flush_chunk`] still leaves whole chunks).
    fn drop(&mut self) {
        if self.failed.is_none() {
            let _ = self.close_chunk();
        }
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread of one stream: compresses each chunk and writes
/// header and payload with one `write_all`, in order; stops at the first
/// failure (reported back) so the file never gets a gap.
fn chunk_writer_thread(
    path: PathBuf,
    mut file: File,
    mut compressor: zstd::bulk::Compressor<'static>,
    jobs: mpsc::Receiver<ChunkJob>,
    done: mpsc::Sender<Result<ChunkDone, LogError>>,
    mut gate: Option<mpsc::Receiver<()>>,
) {
    let mut out = Vec::new();
    for job in jobs {
        if let Some(gate) = gate.take() {
            let _ = gate.recv();
        }
        let bound = zstd::zstd_safe::compress_bound(job.raw.len());
        out.clear();
        out.resize(CHUNK_HEADER_LEN + bound, 0);
        let result = compressor
            .compress_to_buffer(&job.raw, &mut out[CHUNK_HEADER_LEN..])
            .and_then(|n| {
                out.truncate(CHUNK_HEADER_LEN + n);
                let header = chunk_header(
                    job.index,
                    job.first,
                    job.count,
                    job.raw.len() as u32,
                    n as u32,
                    crc32fast::hash(&out[CHUNK_HEADER_LEN..]),
                );
                out[..CHUNK_HEADER_LEN].copy_from_slice(&header);
                file.write_all(&out)?;
                Ok(ChunkDone {
                    raw: job.raw,
                    compressed: n as u64,
                    file_bytes: out.len() as u64,
                })
            })
            .map_err(io_err(&path));
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            return;
        }
    }
}

fn chunk_header(
    index: u32,
    first: u64,
    count: u32,
    raw: u32,
    compressed: u32,
    payload_crc: u32,
) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[0..4].copy_from_slice(&CHUNK_MAGIC);
    h[4..8].copy_from_slice(&index.to_le_bytes());
    h[8..16].copy_from_slice(&first.to_le_bytes());
    h[16..20].copy_from_slice(&count.to_le_bytes());
    h[20..24].copy_from_slice(&raw.to_le_bytes());
    h[24..28].copy_from_slice(&compressed.to_le_bytes());
    h[28..32].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes `events.krrlog`.
pub struct EventLogWriter {
    chunks: ChunkWriter,
    scratch: Vec<u8>,
}

impl EventLogWriter {
    /// Creates the file (which must not exist).
    pub fn create(path: &Path) -> Result<EventLogWriter, LogError> {
        Self::with_target(path, DEFAULT_CHUNK_TARGET)
    }

    /// As [`EventLogWriter::create`] with another chunk target size.
    pub fn with_target(path: &Path, target: usize) -> Result<EventLogWriter, LogError> {
        Self::new(path, target, None)
    }

    /// As [`EventLogWriter::create`]; no event reaches the file before
    /// `gate` opens ([`ChunkWriter::gated`]).
    pub fn gated(path: &Path, gate: mpsc::Receiver<()>) -> Result<EventLogWriter, LogError> {
        Self::new(path, DEFAULT_CHUNK_TARGET, Some(gate))
    }

    fn new(
        path: &Path,
        target: usize,
        gate: Option<mpsc::Receiver<()>>,
    ) -> Result<EventLogWriter, LogError> {
        Ok(EventLogWriter {
            chunks: ChunkWriter::gated(path, StreamKind::Events, target, gate)?,
            scratch: Vec::with_capacity(256),
        })
    }

    /// Appends one event; returns its index. Closes the chunk when full.
    pub fn append(&mut self, event: &LogEvent) -> Result<u64, LogError> {
        let index = self.append_deferred(event)?;
        if self.chunks.is_full() {
            self.chunks.close_chunk()?;
        }
        Ok(index)
    }

    /// Appends one event without closing a full chunk (the caller checks
    /// [`EventLogWriter::is_full`] and flushes, e.g. after the DMA stream).
    pub fn append_deferred(&mut self, event: &LogEvent) -> Result<u64, LogError> {
        self.scratch.clear();
        self.scratch =
            postcard::to_extend(event, std::mem::take(&mut self.scratch)).map_err(|e| {
                LogError::Encode {
                    path: self.chunks.path.clone(),
                    problem: format!("cannot encode event {event}: {e}"),
                }
            })?;
        self.chunks.append_raw(&self.scratch, 1)
    }

    /// Whether the pending chunk reached its target size.
    pub fn is_full(&self) -> bool {
        self.chunks.is_full()
    }

    /// Hands the pending events to the writer thread as a chunk, without
    /// waiting for it to be written.
    pub fn close(&mut self) -> Result<(), LogError> {
        self.chunks.close_chunk()
    }

    /// Writes the pending events as a chunk and waits until every chunk
    /// is in the file.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.chunks.flush_chunk()
    }

    /// Flushes and `fdatasync`s.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.chunks.sync()
    }

    /// Totals so far (items are events).
    pub fn totals(&self) -> StreamTotals {
        self.chunks.totals()
    }
}

/// Writes `dma.krrlog`: one byte stream, cut into chunks at the target size.
pub struct DmaLogWriter {
    chunks: ChunkWriter,
}

impl DmaLogWriter {
    /// Creates the file (which must not exist).
    pub fn create(path: &Path) -> Result<DmaLogWriter, LogError> {
        Self::with_target(path, DEFAULT_CHUNK_TARGET)
    }

    /// As [`DmaLogWriter::create`] with another chunk target size.
    pub fn with_target(path: &Path, target: usize) -> Result<DmaLogWriter, LogError> {
        Ok(DmaLogWriter {
            chunks: ChunkWriter::with_target(path, StreamKind::Dma, target)?,
        })
    }

    /// Appends `bytes`; returns their offset in the DMA stream.
    pub fn append(&mut self, mut bytes: &[u8]) -> Result<u64, LogError> {
        let offset = self.chunks.totals.items;
        while !bytes.is_empty() {
            let room = self
                .chunks
                .target
                .saturating_sub(self.chunks.raw.len())
                .max(1);
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.chunks.append_raw(now, now.len() as u32)?;
            if self.chunks.is_full() {
                self.chunks.close_chunk()?;
            }
            bytes = rest;
        }
        Ok(offset)
    }

    /// Writes the pending bytes as a chunk and waits until every chunk is
    /// in the file.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.chunks.flush_chunk()
    }

    /// Flushes and `fdatasync`s.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.chunks.sync()
    }

    /// Totals so far (items are bytes).
    pub fn totals(&self) -> StreamTotals {
        self.chunks.totals()
    }
}
