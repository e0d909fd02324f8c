// SPDX-License-Identifier: GPL-2.0-or-later
//! Reading stream files: [`scan`] (every chunk validated), the sequential
//! [`EventLogReader`] and the random-access [`DmaLogReader`].

use super::{
    io_err, LogError, StreamKind, CHUNK_HEADER_LEN, CHUNK_MAGIC, FILE_HEADER_LEN, FILE_MAGIC,
    FORMAT_VERSION, MAX_CHUNK_BYTES,
};
use crate::event::LogEvent;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

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
pub(super) struct ChunkReader {
    path: PathBuf,
    kind: StreamKind,
    file: BufReader<File>,
    file_len: u64,
    offset: u64,
    next_index: u32,
    next_first: u64,
    pub(super) payload: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
    pub(super) end: Option<StreamEnd>,
}

impl ChunkReader {
    pub(super) fn open(path: &Path, expect: Option<StreamKind>) -> Result<ChunkReader, LogError> {
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
    pub(super) fn next_chunk(&mut self, decompress: bool) -> Result<Option<ChunkInfo>, LogError> {
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
        // Decompression allocates the raw length up front: a length the
        // payload cannot expand to must not cost that allocation.
        let most_raw = most_raw_bytes(info.compressed_len);
        if u64::from(info.raw_len) > most_raw {
            self.end = Some(damaged(format!(
                "raw length {} is more than a {}-byte zstd payload can hold (at most {most_raw})",
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
        // Never allocate for more payload than the file holds: a damaged or
        // hostile length would otherwise cost up to MAX_CHUNK_BYTES.
        let payload_at = offset + CHUNK_HEADER_LEN as u64;
        if payload_at + u64::from(info.compressed_len) > self.file_len {
            // (The file may have grown since it was opened.)
            self.file_len = self
                .file
                .get_ref()
                .metadata()
                .map_err(io_err(&self.path))?
                .len();
        }
        let left = self.file_len.saturating_sub(payload_at);
        if u64::from(info.compressed_len) > left {
            self.end = Some(StreamEnd::Truncated {
                offset,
                reason: format!(
                    "the file ends {left} bytes into the {}-byte payload of chunk {index}",
                    info.compressed_len
                ),
            });
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

/// The most bytes a zstd payload of `compressed_len` bytes decompresses
/// to: every block of at most 128 KiB costs at least 4 bytes (an RLE
/// block: a 3-byte header and the repeated byte).
pub(super) fn most_raw_bytes(compressed_len: u32) -> u64 {
    u64::from(compressed_len).div_ceil(4) * (128 << 10)
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

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.chunks.path
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
            // The scan checked the chunk against the file; a file cut since
            // then must not make this allocate for bytes it no longer has.
            let file_len = self.file.metadata().map_err(io_err(&self.path))?.len();
            if info.end() > file_len {
                return Err(LogError::Damaged {
                    path: self.path.clone(),
                    chunk_index: info.index,
                    offset: info.offset,
                    what: format!(
                        "the chunk ends at byte {} but the file is now {file_len} bytes (cut since the scan?)",
                        info.end()
                    ),
                });
            }
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
