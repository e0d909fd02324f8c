// SPDX-License-Identifier: GPL-2.0-or-later
//! Tests of the stream files: round trips, truncation and damage.

use super::reader::ChunkReader;
use super::*;
use crate::event::{LogEvent, Position};

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

/// A chunk header (crc intact) that claims far more payload than the file
/// holds ends the stream as truncated, and the reader never allocates for
/// the claim.
#[test]
fn a_payload_length_past_the_end_of_the_file_allocates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.krrlog");
    let chunks = write_events(&path, 200, 1024);
    let victim = *chunks.last().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    set_chunk_u32(&mut bytes, &victim, 24, MAX_CHUNK_BYTES);
    std::fs::write(&path, &bytes).unwrap();

    let mut reader = ChunkReader::open(&path, None).unwrap();
    while reader.next_chunk(true).unwrap().is_some() {}
    match reader.end.as_ref().unwrap() {
        StreamEnd::Truncated { offset, reason } => {
            assert_eq!(*offset, victim.offset);
            assert!(
                reason.contains(&format!("{MAX_CHUNK_BYTES}-byte payload")),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        reader.payload.capacity() < 1 << 20,
        "{} bytes allocated for the payload",
        reader.payload.capacity()
    );
    assert_eq!(scan(&path).unwrap().items(), victim.first);
}

/// A DMA file cut after its scan: reading a chunk that is gone is an error
/// that says so, not an allocation for bytes the file no longer has.
#[test]
fn a_dma_file_cut_after_its_scan_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dma.krrlog");
    let mut w = DmaLogWriter::with_target(&path, 1000).unwrap();
    for i in 0..20u32 {
        w.append(&vec![i as u8; 1500]).unwrap();
    }
    w.flush().unwrap();
    let mut r = DmaLogReader::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = r.read(r.len() - 10, 10).unwrap_err().to_string();
    assert!(e.contains("cut since the scan"), "{e}");
    assert_eq!(r.read(0, 10).unwrap(), vec![0u8; 10]);
}

/// Rewrites field `at` (a u32) of the chunk header at `chunk` and its
/// header crc, as a hostile file would.
fn set_chunk_u32(bytes: &mut [u8], chunk: &ChunkInfo, at: usize, value: u32) {
    let start = chunk.offset as usize;
    bytes[start + at..start + at + 4].copy_from_slice(&value.to_le_bytes());
    let crc = crc32fast::hash(&bytes[start..start + 32]);
    bytes[start + 32..start + 36].copy_from_slice(&crc.to_le_bytes());
}

/// A chunk that claims a raw length its few compressed bytes cannot
/// expand to is damaged before anything is decompressed (decompression
/// allocates the claimed length first), in both readers.
#[test]
fn a_raw_length_the_payload_cannot_hold_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.krrlog");
    let chunks = write_events(&path, 200, 1024);
    let victim = chunks[1];
    let mut bytes = std::fs::read(&path).unwrap();
    set_chunk_u32(&mut bytes, &victim, 20, MAX_CHUNK_BYTES);
    std::fs::write(&path, &bytes).unwrap();

    let s = scan(&path).unwrap();
    match &s.end {
        StreamEnd::Damaged {
            chunk_index, what, ..
        } => {
            assert_eq!(*chunk_index, 1);
            assert!(
                what.contains(&format!("raw length {MAX_CHUNK_BYTES} is more than")),
                "{what}"
            );
        }
        other => panic!("{other:?}"),
    }
    let e = EventLogReader::open(&path)
        .unwrap()
        .find_map(Result::err)
        .unwrap()
        .to_string();
    assert!(e.contains("chunk 1 ") && e.contains("raw length"), "{e}");

    // The same in the DMA stream: its random-access reader keeps only the
    // chunks before.
    let path = dir.path().join("dma.krrlog");
    let mut w = DmaLogWriter::with_target(&path, 1000).unwrap();
    for i in 0..4u8 {
        w.append(&[i; 1500]).unwrap();
    }
    w.flush().unwrap();
    let chunks = scan(&path).unwrap().chunks;
    let mut bytes = std::fs::read(&path).unwrap();
    // Raw length and byte count together, so only the ratio is wrong.
    set_chunk_u32(&mut bytes, &chunks[1], 16, MAX_CHUNK_BYTES);
    set_chunk_u32(&mut bytes, &chunks[1], 20, MAX_CHUNK_BYTES);
    std::fs::write(&path, &bytes).unwrap();
    let r = DmaLogReader::open(&path).unwrap();
    assert_eq!(r.len(), u64::from(chunks[0].count));
    assert!(
        matches!(r.end(), StreamEnd::Damaged { what, .. } if what.contains("raw length")),
        "{:?}",
        r.end()
    );
}

/// The bound on raw lengths holds for what zstd makes of the most
/// compressible data (a reader must never refuse a writer's chunk).
#[test]
fn the_raw_length_bound_admits_the_most_compressible_payloads() {
    for len in [1usize, 4096, 128 << 10, (128 << 10) + 1, 8 << 20] {
        let compressed = zstd::bulk::compress(&vec![0u8; len], ZSTD_LEVEL).unwrap();
        let bound = super::reader::most_raw_bytes(compressed.len() as u32);
        assert!(
            len as u64 <= bound,
            "{len} zero bytes compress to {} bytes: bound {bound}",
            compressed.len()
        );
    }
}

/// Everything `reader` gives: the events' indices, then how it ended.
fn drain_prefetching(reader: &mut PrefetchingEventReader) -> (Vec<u64>, Option<String>) {
    let mut indices = Vec::new();
    loop {
        match reader.next_event() {
            Ok(Some(e)) => {
                assert_eq!(e.event, event(e.index), "event #{}", e.index);
                indices.push(e.index);
            }
            Ok(None) => return (indices, None),
            Err(e) => return (indices, Some(e.to_string())),
        }
    }
}

#[test]
fn the_prefetching_reader_reads_what_the_reader_reads_and_ends_as_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.krrlog");
    // Several batches of the reader thread, and a last one part full.
    let chunks = write_events(&path, 1300, 2048);
    let mut all = PrefetchingEventReader::new(EventLogReader::open(&path).unwrap());
    let (read, failed) = drain_prefetching(&mut all);
    assert_eq!(read, (0..1300).collect::<Vec<_>>());
    assert_eq!(failed, None);
    assert_eq!(all.end(), Some(&StreamEnd::Complete));
    // Again at the end: nothing more, no error.
    assert!(all.next_event().unwrap().is_none());

    // From an index, as a replay's snapshot reads.
    let mut from = PrefetchingEventReader::new(EventLogReader::open(&path).unwrap().seek(777));
    assert_eq!(
        drain_prefetching(&mut from).0,
        (777..1300).collect::<Vec<_>>()
    );

    // A cut log: the valid prefix, then the same end as the reader's.
    let full = std::fs::read(&path).unwrap();
    let last = *chunks.last().unwrap();
    std::fs::write(&path, &full[..last.offset as usize + 10]).unwrap();
    let mut cut = PrefetchingEventReader::new(EventLogReader::open(&path).unwrap());
    let (read, failed) = drain_prefetching(&mut cut);
    assert_eq!(read.len() as u64, last.first);
    assert_eq!(failed, None);
    assert!(
        matches!(cut.end(), Some(StreamEnd::Truncated { offset, .. }) if *offset == last.offset),
        "{:?}",
        cut.end()
    );

    // A damaged chunk: the events before it, then the reader's error.
    let victim = chunks[2];
    let mut bytes = full.clone();
    bytes[victim.offset as usize + CHUNK_HEADER_LEN + 3] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let mut plain = EventLogReader::open(&path).unwrap();
    let plain_ok = plain.by_ref().take_while(|r| r.is_ok()).count();
    let mut damaged = PrefetchingEventReader::new(EventLogReader::open(&path).unwrap());
    let (read, _) = drain_prefetching(&mut damaged);
    assert_eq!(read.len(), plain_ok);
    assert_eq!(read.len() as u64, victim.first);
    // Dropped part-way: its thread stops without anyone reading.
    let mut early = PrefetchingEventReader::new(EventLogReader::open(&path).unwrap());
    assert!(early.next_event().unwrap().is_some());
    drop(early);
}
