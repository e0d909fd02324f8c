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
//! are the concatenated `postcard` encodings of [`LogEvent`](crate::event::LogEvent)s.
//!
//! # Crash safety
//! A chunk is written (by the stream's writer thread, which also
//! compresses it) with one `write_all` of header and payload together,
//! and only whole chunks are ever written, so a file cut anywhere (engine
//! killed, guest gone) is a valid prefix followed by at most one partial
//! chunk. [`scan`] tells that apart from damage: EOF inside a chunk is
//! [`StreamEnd::Truncated`]; a checksum, magic, length or continuity error
//! is [`StreamEnd::Damaged`] with the chunk's byte offset.

mod prefetch;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

pub use prefetch::PrefetchingEventReader;
pub use reader::{scan, ChunkInfo, DmaLogReader, EventLogReader, ReadEvent, StreamEnd, StreamScan};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
pub use writer::{ChunkWriter, DmaLogWriter, EventLogWriter, StreamTotals};

/// Version of the stream container and of the [`LogEvent`](crate::event::LogEvent) encoding.
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
    /// `events.krrlog`: postcard-encoded [`LogEvent`](crate::event::LogEvent)s.
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
