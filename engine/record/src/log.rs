// SPDX-License-Identifier: GPL-2.0-or-later
//! The chunked stream file behind `events.krrlog` and `dma.krrlog`.
//!
//! # Layout (all integers little-endian)
//! File header, [`FILE_HEADER_LEN`] bytes: magic `"KRRLOG\0\0"`, u32
//! [`FORMAT_VERSION`], u32 stream kind ([`StreamKind`]). Then chunks back to
//! back, each a [`CHUNK_HEADER_LEN`]-byte header followed by its payload:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 4 | magic `"KRCK"` |
//! | 4  | 4 | chunk index (0, 1, 2, ...) |
//! | 8  | 8 | first item: events: index of the chunk's first event; dma: byte offset of its first byte in the uncompressed DMA stream |
//! | 16 | 4 | item count: events in the chunk; dma: raw bytes |
//! | 20 | 4 | raw (uncompressed) payload length |
//! | 24 | 4 | compressed payload length |
//! | 28 | 4 | crc32 of the compressed payload |
//! | 32 | 4 | crc32 of header bytes 0..32 |
//!
//! The payload is one zstd frame of the raw bytes. For events the raw bytes
//! are the concatenated `postcard` encodings of [`LogEvent`]s.
//!
//! # Crash safety
//! A chunk is written (by the stream's writer thread, which also
//! compresses it) with one `write_all` of header and payload together,
//! and only whole chunks are ever written, so a file cut anywhere (engine
//! killed, guest gone) is a valid prefix followed by at most one partial
//! chunk. [`scan`] tells that apart from damage: EOF inside a chunk is
//! [`StreamEnd::Truncated`]; a checksum, magic, length or continuity error
//! is [`StreamEnd::Damaged`] with the chunk's byte offset.

use super::event::LogEvent;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Version of the stream container and of the [`LogEvent`] encoding.
pub const FORMAT_VERSION: u32 = 3;
/// Magic at the start of every stream file.
pub const FILE_MAGIC: [u8; 8] = *b"KRRLOG\0\0";
/// Bytes of the file header.
pub const FILE_HEADER_LEN: u64 = 16;
/// Magic at the start of every chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"KRCK";
/// Bytes of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 36;
/// Raw bytes at which a chunk is closed automatically.
pub const DEFAULT_CHUNK_TARGET: usize = 256 * 1024;
/// zstd level of chunk payloads: a few percent less log than level 1 for a
/// cost per event far below the recording's own (see docs/benchmarks.md).
pub const ZSTD_LEVEL: i32 = 3;
/// Largest raw or compressed chunk the reader accepts (a bound against a
/// corrupt length asking for gigabytes; the writer stays far below it).
const MAX_CHUNK_BYTES: u32 = 256 * 1024 * 1024;

/// What a stream file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// `events.krrlog`: postcard-encoded [`LogEvent`]s.
    Events = 1,
    /// `dma.krrlog`: the bytes devices wrote to guest memory, concatenated.
    Dma = 2,
}

impl StreamKind {
    fn from_u32(v: u32) -> Option<StreamKind> {
        match v {
            1 => Some(StreamKind::Events),
            2 => Some(StreamKind::Dma),
            _ => None,
        }
    }

    /// What one item of this stream is, for messages.
    pub fn item_name(self) -> &'static str {
        match self {
            StreamKind::Events => "events",
            StreamKind::Dma => "bytes",
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StreamKind::Events => "events",
            StreamKind::Dma => "dma",
        })
    }
}

/// Errors of the stream files that stop reading or writing altogether
/// (damage inside the chunk sequence is a [`StreamEnd`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a KRR log: {problem}")]
    BadFileHeader { path: PathBuf, problem: String },
    #[error("{path}: {problem}")]
    Encode { path: PathBuf, problem: String },
    #[error("{path}: chunk {chunk_index} at byte offset {offset} is damaged: {what}")]
    Damaged {
        path: PathBuf,
        chunk_index: u32,
        offset: u64,
        what: String,
    },
    #[error("{path}: {what}")]
    OutOfRange { path: PathBuf, what: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

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
            .spawn(move || chunk_writer_thread(thread_path, file, compressor, job_rx, done_tx))
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
) {
    let mut out = Vec::new();
    for job in jobs {
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
        Ok(EventLogWriter {
            chunks: ChunkWriter::with_target(path, StreamKind::Events, target)?,
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

/// One valid chunk as [`scan`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ChunkInfo {
    /// Byte offset of the chunk header in the file.
    pub offset: u64,
    pub index: u32,
    pub first: u64,
    pub count: u32,
    pub raw_len: u32,
    pub compressed_len: u32,
}

impl ChunkInfo {
    /// Byte offset just past the chunk.
    pub fn end(&self) -> u64 {
        self.offset + CHUNK_HEADER_LEN as u64 + u64::from(self.compressed_len)
    }
}

/// How a stream file ends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum StreamEnd {
    /// EOF exactly after the last chunk.
    Complete,
    /// EOF inside a chunk at `offset` (a killed writer): everything before
    /// `offset` is valid.
    Truncated { offset: u64, reason: String },
    /// The chunk at byte `offset` failed a check; everything before it is
    /// valid.
    Damaged {
        chunk_index: u32,
        offset: u64,
        what: String,
    },
}

/// What [`scan`] found in a stream file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamScan {
    pub path: PathBuf,
    pub kind: StreamKind,
    pub file_len: u64,
    /// The valid chunks, in order.
    pub chunks: Vec<ChunkInfo>,
    pub end: StreamEnd,
}

impl StreamScan {
    /// Items (events, or DMA bytes) in the valid prefix.
    pub fn items(&self) -> u64 {
        self.chunks
            .last()
            .map_or(0, |c| c.first + u64::from(c.count))
    }

    /// Raw bytes in the valid prefix.
    pub fn raw_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.raw_len)).sum()
    }

    /// Compressed payload bytes in the valid prefix.
    pub fn compressed_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .map(|c| u64::from(c.compressed_len))
            .sum()
    }

    /// File bytes of the valid prefix (headers included).
    pub fn valid_len(&self) -> u64 {
        self.chunks.last().map_or(FILE_HEADER_LEN, ChunkInfo::end)
    }
}

/// Sequential chunk reader shared by [`scan`] and the typed readers.
struct ChunkReader {
    path: PathBuf,
    kind: StreamKind,
    file: BufReader<File>,
    file_len: u64,
    offset: u64,
    next_index: u32,
    next_first: u64,
    payload: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
    end: Option<StreamEnd>,
}

impl ChunkReader {
    fn open(path: &Path, expect: Option<StreamKind>) -> Result<ChunkReader, LogError> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        let mut file = BufReader::with_capacity(1 << 20, file);
        let bad = |problem: String| LogError::BadFileHeader {
            path: path.to_path_buf(),
            problem,
        };
        let mut header = [0u8; FILE_HEADER_LEN as usize];
        let n = read_full(&mut file, &mut header).map_err(io_err(path))?;
        if n < header.len() {
            return Err(bad(format!(
                "the file is {n} bytes, shorter than the {FILE_HEADER_LEN}-byte file header"
            )));
        }
        if header[..8] != FILE_MAGIC {
            return Err(bad(format!(
                "magic is {:?}, expected \"KRRLOG\\0\\0\"",
                String::from_utf8_lossy(&header[..8])
            )));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this engine reads version {FORMAT_VERSION}"
            )));
        }
        let kind_value = u32::from_le_bytes(header[12..16].try_into().unwrap());
        let kind = StreamKind::from_u32(kind_value).ok_or_else(|| {
            bad(format!(
                "stream kind {kind_value}, expected 1 (events) or 2 (dma)"
            ))
        })?;
        if let Some(expect) = expect {
            if expect != kind {
                return Err(bad(format!(
                    "it holds the {kind} stream, expected the {expect} stream"
                )));
            }
        }
        Ok(ChunkReader {
            path: path.to_path_buf(),
            kind,
            file,
            file_len,
            offset: FILE_HEADER_LEN,
            next_index: 0,
            next_first: 0,
            payload: Vec::new(),
            decompressor: zstd::bulk::Decompressor::new().map_err(io_err(path))?,
            end: None,
        })
    }

    /// The next valid chunk, or `None` at the end of the valid prefix
    /// (then `self.end` says how the file ends). With `decompress` false
    /// the payload's crc is still checked but it is not decompressed (nor,
    /// for events, decoded).
    fn next_chunk(&mut self, decompress: bool) -> Result<Option<ChunkInfo>, LogError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let offset = self.offset;
        let index = self.next_index;
        let mut header = [0u8; CHUNK_HEADER_LEN];
        let n = read_full(&mut self.file, &mut header).map_err(io_err(&self.path))?;
        if n == 0 {
            self.end = Some(StreamEnd::Complete);
            return Ok(None);
        }
        if n < CHUNK_HEADER_LEN {
            self.end = Some(StreamEnd::Truncated {
                offset,
                reason: format!(
                    "the file ends {n} bytes into the {CHUNK_HEADER_LEN}-byte header of chunk {index}"
                ),
            });
            return Ok(None);
        }
        let damaged = |what: String| StreamEnd::Damaged {
            chunk_index: index,
            offset,
            what,
        };
        let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
        if header[..4] != CHUNK_MAGIC {
            self.end = Some(damaged(format!(
                "bad chunk magic {:02x?}, expected \"KRCK\"",
                &header[..4]
            )));
            return Ok(None);
        }
        let header_crc = crc32fast::hash(&header[..32]);
        if header_crc != u32_at(32) {
            self.end = Some(damaged(format!(
                "header crc32 mismatch (expected {:#010x}, found {header_crc:#010x})",
                u32_at(32)
            )));
            return Ok(None);
        }
        let info = ChunkInfo {
            offset,
            index: u32_at(4),
            first: u64::from_le_bytes(header[8..16].try_into().unwrap()),
            count: u32_at(16),
            raw_len: u32_at(20),
            compressed_len: u32_at(24),
        };
        let payload_crc = u32_at(28);
        if info.index != index {
            self.end = Some(damaged(format!(
                "chunk index {} where chunk {index} was expected",
                info.index
            )));
            return Ok(None);
        }
        if info.first != self.next_first {
            self.end = Some(damaged(format!(
                "first item {} but the previous chunks end at item {}",
                info.first, self.next_first
            )));
            return Ok(None);
        }
        if info.raw_len > MAX_CHUNK_BYTES || info.compressed_len > MAX_CHUNK_BYTES {
            self.end = Some(damaged(format!(
                "raw length {} / compressed length {} exceed the {MAX_CHUNK_BYTES}-byte limit",
                info.raw_len, info.compressed_len
            )));
            return Ok(None);
        }
        if self.kind == StreamKind::Dma && info.count != info.raw_len {
            self.end = Some(damaged(format!(
                "dma chunk counts {} bytes but holds {} raw bytes",
                info.count, info.raw_len
            )));
            return Ok(None);
        }
        self.payload.resize(info.compressed_len as usize, 0);
        let n = read_full(&mut self.file, &mut self.payload).map_err(io_err(&self.path))?;
        if n < self.payload.len() {
            self.end = Some(StreamEnd::Truncated {
                offset,
                reason: format!(
                    "the file ends {n} bytes into the {}-byte payload of chunk {index}",
                    info.compressed_len
                ),
            });
            return Ok(None);
        }
        let found = crc32fast::hash(&self.payload);
        if found != payload_crc {
            self.end = Some(damaged(format!(
                "payload crc32 mismatch (expected {payload_crc:#010x}, found {found:#010x})"
            )));
            return Ok(None);
        }
        if decompress {
            let raw = match self
                .decompressor
                .decompress(&self.payload, info.raw_len as usize)
            {
                Ok(raw) => raw,
                Err(e) => {
                    self.end = Some(damaged(format!("payload does not decompress: {e}")));
                    return Ok(None);
                }
            };
            if raw.len() != info.raw_len as usize {
                self.end = Some(damaged(format!(
                    "payload decompresses to {} bytes, header says {}",
                    raw.len(),
                    info.raw_len
                )));
                return Ok(None);
            }
            if self.kind == StreamKind::Events {
                if let Err(what) = check_events(&raw, info.count) {
                    self.end = Some(damaged(what));
                    return Ok(None);
                }
            }
        }
        self.offset = info.end();
        self.next_index += 1;
        self.next_first += u64::from(info.count);
        Ok(Some(info))
    }
}

/// Checks that `raw` is exactly `count` postcard events.
fn check_events(raw: &[u8], count: u32) -> Result<(), String> {
    let mut rest = raw;
    for i in 0..count {
        match postcard::take_from_bytes::<LogEvent>(rest) {
            Ok((_, r)) => rest = r,
            Err(e) => {
                return Err(format!(
                    "event {i} of {count} in the payload does not decode at raw byte {}: {e}",
                    raw.len() - rest.len()
                ))
            }
        }
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} raw bytes follow the chunk's {count} events",
            rest.len()
        ));
    }
    Ok(())
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads a whole stream file, validating every chunk (header and payload
/// checksums, decompressed length, index continuity and, for events, that
/// the payload is exactly `count` events).
pub fn scan(path: &Path) -> Result<StreamScan, LogError> {
    let mut reader = ChunkReader::open(path, None)?;
    let mut chunks = Vec::new();
    while let Some(info) = reader.next_chunk(true)? {
        chunks.push(info);
    }
    Ok(StreamScan {
        path: path.to_path_buf(),
        kind: reader.kind,
        file_len: reader.file_len,
        chunks,
        end: reader.end.unwrap_or(StreamEnd::Complete),
    })
}

/// Iterates the events of the valid prefix of `events.krrlog`.
pub struct EventLogReader {
    chunks: ChunkReader,
    raw: Vec<u8>,
    pos: usize,
    next: u64,
    left_in_chunk: u32,
    skip_to: u64,
    failed: bool,
    current: ChunkInfo,
}

/// One event as read, with the size of its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEvent {
    pub index: u64,
    /// Bytes of its postcard encoding.
    pub encoded_len: usize,
    pub event: LogEvent,
}

impl EventLogReader {
    /// Opens `events.krrlog` (checking its file header).
    pub fn open(path: &Path) -> Result<EventLogReader, LogError> {
        Ok(EventLogReader {
            chunks: ChunkReader::open(path, Some(StreamKind::Events))?,
            raw: Vec::new(),
            pos: 0,
            next: 0,
            left_in_chunk: 0,
            skip_to: 0,
            failed: false,
            current: ChunkInfo {
                offset: FILE_HEADER_LEN,
                index: 0,
                first: 0,
                count: 0,
                raw_len: 0,
                compressed_len: 0,
            },
        })
    }

    /// Starts iteration at event `index`: whole chunks before it are
    /// checked (crc) but not decompressed.
    pub fn seek(mut self, index: u64) -> EventLogReader {
        self.skip_to = index;
        self
    }

    /// How the file ends; `None` until the iteration reached the end.
    pub fn end(&self) -> Option<&StreamEnd> {
        self.chunks.end.as_ref()
    }

    /// Marks the reader failed and names the current chunk.
    fn damaged(&mut self, what: String) -> LogError {
        self.failed = true;
        LogError::Damaged {
            path: self.chunks.path.clone(),
            chunk_index: self.current.index,
            offset: self.current.offset,
            what,
        }
    }

    /// The next event with its encoded size.
    pub fn next_event(&mut self) -> Result<Option<ReadEvent>, LogError> {
        loop {
            if self.failed {
                return Ok(None);
            }
            if self.left_in_chunk == 0 {
                let chunk = loop {
                    match self.chunks.next_chunk(false)? {
                        None => break None,
                        Some(c) if c.first + u64::from(c.count) <= self.skip_to => continue,
                        Some(c) => break Some(c),
                    }
                };
                let Some(info) = chunk else {
                    if let Some(StreamEnd::Damaged {
                        chunk_index,
                        offset,
                        what,
                    }) = &self.chunks.end
                    {
                        self.failed = true;
                        return Err(LogError::Damaged {
                            path: self.chunks.path.clone(),
                            chunk_index: *chunk_index,
                            offset: *offset,
                            what: what.clone(),
                        });
                    }
                    return Ok(None);
                };
                // next_chunk checked the payload's crc; decompress the
                // payload it kept.
                self.current = info;
                let raw = match self
                    .chunks
                    .decompressor
                    .decompress(&self.chunks.payload, info.raw_len as usize)
                {
                    Ok(raw) if raw.len() == info.raw_len as usize => raw,
                    Ok(raw) => {
                        return Err(self.damaged(format!(
                            "payload decompresses to {} bytes, header says {}",
                            raw.len(),
                            info.raw_len
                        )))
                    }
                    Err(e) => return Err(self.damaged(format!("payload does not decompress: {e}"))),
                };
                self.raw = raw;
                self.pos = 0;
                self.next = info.first;
                self.left_in_chunk = info.count;
                if info.count == 0 && !self.raw.is_empty() {
                    return Err(self.damaged(format!(
                        "{} raw bytes in a chunk of 0 events",
                        self.raw.len()
                    )));
                }
                continue;
            }
            let rest = &self.raw[self.pos..];
            let (event, after) = match postcard::take_from_bytes::<LogEvent>(rest) {
                Ok(v) => v,
                Err(e) => {
                    return Err(self.damaged(format!("event {} does not decode: {e}", self.next)))
                }
            };
            let encoded_len = rest.len() - after.len();
            self.pos += encoded_len;
            self.left_in_chunk -= 1;
            let index = self.next;
            self.next += 1;
            if self.left_in_chunk == 0 && self.pos != self.raw.len() {
                let extra = self.raw.len() - self.pos;
                return Err(
                    self.damaged(format!("{extra} raw bytes follow the chunk's last event"))
                );
            }
            if index < self.skip_to {
                continue;
            }
            return Ok(Some(ReadEvent {
                index,
                encoded_len,
                event,
            }));
        }
    }
}

impl Iterator for EventLogReader {
    type Item = Result<(u64, LogEvent), LogError>;

    /// Events of the valid prefix; a damaged chunk yields one error and
    /// ends the iteration; a truncated tail ends it quietly (see
    /// [`EventLogReader::end`]).
    fn next(&mut self) -> Option<Self::Item> {
        self.next_event()
            .transpose()
            .map(|r| r.map(|e| (e.index, e.event)))
    }
}

/// Random access to the valid prefix of `dma.krrlog`.
pub struct DmaLogReader {
    path: PathBuf,
    file: File,
    chunks: Vec<ChunkInfo>,
    end: StreamEnd,
    cached: Option<(u32, Vec<u8>)>,
}

impl DmaLogReader {
    /// Scans the file (every chunk validated) and keeps its chunk index.
    pub fn open(path: &Path) -> Result<DmaLogReader, LogError> {
        let scanned = scan(path)?;
        if scanned.kind != StreamKind::Dma {
            return Err(LogError::BadFileHeader {
                path: path.to_path_buf(),
                problem: format!(
                    "it holds the {} stream, expected the dma stream",
                    scanned.kind
                ),
            });
        }
        Ok(DmaLogReader {
            path: path.to_path_buf(),
            file: File::open(path).map_err(io_err(path))?,
            chunks: scanned.chunks,
            end: scanned.end,
            cached: None,
        })
    }

    /// Bytes of the valid prefix.
    pub fn len(&self) -> u64 {
        self.chunks
            .last()
            .map_or(0, |c| c.first + u64::from(c.count))
    }

    /// Whether the valid prefix holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How the file ends.
    pub fn end(&self) -> &StreamEnd {
        &self.end
    }

    /// The `len` bytes at stream offset `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, LogError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.len()) {
            return Err(LogError::OutOfRange {
                path: self.path.clone(),
                what: format!(
                    "dma bytes {offset}..+{len} lie past the {} valid bytes of the stream",
                    self.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(len);
        let mut at = offset;
        while out.len() < len {
            let i = self
                .chunks
                .partition_point(|c| c.first + u64::from(c.count) <= at);
            let info = self.chunks[i];
            let raw = self.chunk_bytes(info)?;
            let from = (at - info.first) as usize;
            let take = (len - out.len()).min(raw.len() - from);
            out.extend_from_slice(&raw[from..from + take]);
            at += take as u64;
        }
        Ok(out)
    }

    fn chunk_bytes(&mut self, info: ChunkInfo) -> Result<&[u8], LogError> {
        use std::io::{Seek, SeekFrom};
        if self.cached.as_ref().is_none_or(|(i, _)| *i != info.index) {
            let mut payload = vec![0u8; info.compressed_len as usize];
            self.file
                .seek(SeekFrom::Start(info.offset + CHUNK_HEADER_LEN as u64))
                .map_err(io_err(&self.path))?;
            self.file
                .read_exact(&mut payload)
                .map_err(io_err(&self.path))?;
            let raw = zstd::bulk::decompress(&payload, info.raw_len as usize).map_err(|e| {
                LogError::Damaged {
                    path: self.path.clone(),
                    chunk_index: info.index,
                    offset: info.offset,
                    what: format!("payload does not decompress (changed since the scan?): {e}"),
                }
            })?;
            self.cached = Some((info.index, raw));
        }
        Ok(&self.cached.as_ref().unwrap().1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;

    fn event(i: u64) -> LogEvent {
        match i % 3 {
            0 => LogEvent::Rdtsc {
                cpu: (i % 2) as u16,
                at: Position {
                    icount: i * 1000,
                    kernel_icount: i * 900,
                    rip: 0xffff_ffff_8100_0000 + i,
                    rcx: i,
                    cpl: 0,
                },
                value: 1_000_000 + i * 37,
            },
            1 => LogEvent::PioRead {
                cpu: 0,
                at: Position {
                    icount: i * 1000 + 5,
                    kernel_icount: i * 900 + 5,
                    rip: 0xffff_ffff_8100_1000,
                    rcx: 0,
                    cpl: 0,
                },
                port: 0x3f8 + (i % 8) as u16,
                size: 1,
                value: (i & 0xff) as u32,
            },
            _ => LogEvent::Console {
                cpu: 0,
                bytes: format!("line {i}\n").into_bytes(),
            },
        }
    }

    fn write_events(path: &Path, n: u64, target: usize) -> Vec<ChunkInfo> {
        let mut w = EventLogWriter::with_target(path, target).unwrap();
        for i in 0..n {
            assert_eq!(w.append(&event(i)).unwrap(), i);
        }
        w.flush().unwrap();
        let totals = w.totals();
        assert_eq!(totals.items, n);
        let s = scan(path).unwrap();
        assert_eq!(s.end, StreamEnd::Complete);
        assert_eq!(s.items(), n);
        assert_eq!(s.chunks.len() as u32, totals.chunks);
        assert_eq!(s.valid_len(), totals.file_bytes);
        assert_eq!(s.file_len, totals.file_bytes);
        s.chunks
    }

    #[test]
    fn round_trip_many_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.krrlog");
        let chunks = write_events(&path, 5000, 4096);
        assert!(chunks.len() > 10, "{} chunks", chunks.len());
        let read: Vec<_> = EventLogReader::open(&path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(read.len(), 5000);
        for (i, (index, e)) in read.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert_eq!(*e, event(i as u64));
        }
        let from: Vec<_> = EventLogReader::open(&path)
            .unwrap()
            .seek(4321)
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(from, (4321..5000).collect::<Vec<_>>());
    }

    #[test]
    fn truncation_anywhere_in_the_last_chunk_keeps_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.krrlog");
        let chunks = write_events(&path, 600, 2048);
        let full = std::fs::read(&path).unwrap();
        let last = *chunks.last().unwrap();
        let prefix_events = last.first;
        for cut in last.offset + 1..last.end() {
            std::fs::write(&path, &full[..cut as usize]).unwrap();
            let s = scan(&path).unwrap();
            match &s.end {
                StreamEnd::Truncated { offset, .. } => assert_eq!(*offset, last.offset),
                other => panic!("cut at {cut}: {other:?}"),
            }
            assert_eq!(s.items(), prefix_events, "cut at {cut}");
            let read: Vec<_> = EventLogReader::open(&path)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(read.len() as u64, prefix_events);
        }
        // Cut exactly at a chunk boundary: a complete, shorter stream.
        std::fs::write(&path, &full[..last.offset as usize]).unwrap();
        assert_eq!(scan(&path).unwrap().end, StreamEnd::Complete);
    }

    #[test]
    fn a_flipped_byte_names_its_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.krrlog");
        let chunks = write_events(&path, 400, 1024);
        let full = std::fs::read(&path).unwrap();
        let victim = chunks[3];
        for at in victim.offset..victim.end() {
            let mut bytes = full.clone();
            bytes[at as usize] ^= 0x40;
            std::fs::write(&path, &bytes).unwrap();
            let s = scan(&path).unwrap();
            match &s.end {
                StreamEnd::Damaged {
                    chunk_index,
                    offset,
                    what,
                } => {
                    assert_eq!(*chunk_index, 3, "flip at {at}");
                    assert_eq!(*offset, victim.offset, "flip at {at}: {what}");
                    if at >= victim.offset + CHUNK_HEADER_LEN as u64 {
                        assert!(what.contains("payload crc32"), "{what}");
                    }
                }
                other => panic!("flip at {at}: {other:?}"),
            }
            assert_eq!(s.items(), victim.first);
            let mut reader = EventLogReader::open(&path).unwrap();
            let ok = reader.by_ref().take_while(|r| r.is_ok()).count() as u64;
            assert_eq!(ok, victim.first);
        }
    }

    #[test]
    fn bad_file_headers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.krrlog");
        write_events(&path, 10, 1024);
        let full = std::fs::read(&path).unwrap();
        let mut bytes = full.clone();
        bytes[0] = b'X';
        std::fs::write(&path, &bytes).unwrap();
        let e = scan(&path).unwrap_err().to_string();
        assert!(e.contains("events.krrlog") && e.contains("magic"), "{e}");
        let mut bytes = full.clone();
        bytes[8] = 7;
        std::fs::write(&path, &bytes).unwrap();
        let e = scan(&path).unwrap_err().to_string();
        assert!(e.contains("format version 7"), "{e}");
        std::fs::write(&path, &full[..10]).unwrap();
        let e = scan(&path).unwrap_err().to_string();
        assert!(e.contains("shorter than the 16-byte"), "{e}");
        std::fs::write(&path, &full).unwrap();
        let e = DmaLogReader::open(&path).err().unwrap().to_string();
        assert!(e.contains("expected the dma stream"), "{e}");
    }

    #[test]
    fn dma_stream_random_access() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dma.krrlog");
        let mut w = DmaLogWriter::with_target(&path, 1000).unwrap();
        let mut all = Vec::new();
        let mut offsets = Vec::new();
        for i in 0..50u32 {
            let buf: Vec<u8> = (0..(i * 97 % 3000)).map(|b| (b ^ i) as u8).collect();
            offsets.push((w.append(&buf).unwrap(), buf.len()));
            all.extend_from_slice(&buf);
        }
        w.flush().unwrap();
        let mut r = DmaLogReader::open(&path).unwrap();
        assert_eq!(r.len(), all.len() as u64);
        for (off, len) in offsets {
            let got = r.read(off, len).unwrap();
            assert_eq!(got, &all[off as usize..off as usize + len]);
        }
        let e = r.read(all.len() as u64 - 2, 3).unwrap_err().to_string();
        assert!(e.contains("past the"), "{e}");
    }
}
