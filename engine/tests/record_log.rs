// SPDX-License-Identifier: GPL-2.0-or-later
//! The recording log without a guest: recordings built from synthetic
//! events with `RecordingWriter`, then checked, damaged, cut and killed.

use krr_engine::hypervisor::{DebugRegs, Regs, Sregs};
use krr_engine::log_cli::{self as cli, LogCommand};
use krr_engine::record::abi::{self, Event, EventBody};
use krr_engine::record::event::{GprSnapshot, InterruptKind, LogEvent, Position};
use krr_engine::record::log::{self, StreamEnd, CHUNK_HEADER_LEN, FILE_HEADER_LEN};
use krr_engine::record::memory_image::MemoryCopy;
use krr_engine::record::recording::{
    self, CpuSnapshot, RecordingEnd, RecordingHeader, RecordingWriter, VerifyStatus,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_BYTES: u64 = 1 << 20;
const VCPUS: usize = 2;
/// Env var that turns `writer_child_process` into the killed writer.
const CHILD_ENV: &str = "KRR_RECORD_LOG_TEST_CHILD_DIR";

/// A small deterministic generator (the test needs varied, repeatable
/// values, not randomness).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
}

/// Produces a plausible event stream: per iteration a syscall with user
/// registers, a 64-byte copy_from_user, a get_user and three kernel
/// rdtsc; now and then a timer interrupt, a user page fault, a port read
/// and a DMA write.
struct Mix {
    rng: Lcg,
    seq: u64,
    tsc: u64,
    icount: u64,
    dma_written: u64,
    i: u64,
}

impl Mix {
    fn new() -> Mix {
        Mix {
            rng: Lcg(42),
            seq: 1000,
            tsc: 5_000_000_000,
            icount: 10_000_000,
            dma_written: 0,
            i: 0,
        }
    }

    fn at(&mut self) -> Position {
        self.icount += 1000 + self.rng.next() % 5000;
        Position {
            icount: self.icount,
            kernel_icount: self.icount / 2,
            rip: 0xffff_ffff_8100_0000 + (self.rng.next() % 0x80_0000),
            rcx: self.rng.next() % 64,
            cpl: 0,
        }
    }

    /// The next iteration's events; DMA bytes go through `dma` (returns
    /// the DMA stream offset).
    fn iteration(&mut self, mut dma: impl FnMut(&[u8]) -> u64) -> Vec<LogEvent> {
        let cpu = (self.i % VCPUS as u64) as u16;
        let mut out = Vec::new();
        let nrs = [0u64, 1, 202, 232, 228, 7, 3];
        let nr = nrs[(self.rng.next() % nrs.len() as u64) as usize];
        let buf = 0x7f3a_5c00_0000 + (self.rng.next() % 0x10_0000) * 16;
        let regs = abi::UserRegs {
            ax: nr,
            orig_ax: nr,
            di: self.rng.next() % 16,
            si: buf,
            dx: 64,
            ip: 0x7f3a_5d12_3456 + (self.rng.next() % 64) * 4,
            cx: 0x7f3a_5d12_3456,
            sp: 0x7ffc_8a00_0000 + (self.rng.next() % 0x1000) * 8,
            bp: 0x7ffc_8a00_1000,
            r11: 0x246,
            flags: 0x246,
            cs: 0x33,
            ss: 0x2b,
            ..Default::default()
        };
        out.push(agent(
            &mut self.seq,
            cpu,
            EventBody::Syscall(abi::SyscallEvent {
                regs,
                fs_base: 0x7f3a_5c9f_0740,
                user_gs_base: 0,
                kernel_gs_base: 0xffff_8880_3fc0_0000 + u64::from(cpu) * 0x4_0000,
                cr3: 0x1_0a2b_3000 + (self.rng.next() % 4) * 0x1000,
            }),
        ));
        let data: Vec<u8> = format!("key{:08}=value{:040}\n", self.i, self.rng.next())
            .into_bytes()
            .into_iter()
            .chain(std::iter::repeat(0))
            .take(64)
            .collect();
        out.push(agent(
            &mut self.seq,
            cpu,
            EventBody::CopyFromUser {
                info: abi::UserCopyEvent {
                    user_addr: buf,
                    kernel_addr: 0xffff_8880_0412_0000 + (self.rng.next() % 4096) * 64,
                    requested: 64,
                    not_copied: 0,
                    offset: 0,
                    data_len: 64,
                    flags: 0,
                    cr3: 0x100_0000,
                },
                data,
            },
        ));
        out.push(agent(
            &mut self.seq,
            cpu,
            EventBody::GetUser(abi::GetUserEvent {
                user_addr: buf + 64,
                value: self.rng.next() % 1000,
                size: 4,
                err: 0,
                cr3: 0x100_0000,
            }),
        ));
        for _ in 0..3 {
            self.tsc += 2000 + self.rng.next() % 30_000;
            let value = self.tsc;
            out.push(agent(
                &mut self.seq,
                cpu,
                EventBody::Rdtsc(abi::RdtscEvent {
                    value,
                    insn: abi::TSC_RDTSC_ORDERED,
                    reserved: 0,
                }),
            ));
        }
        if self.i.is_multiple_of(10) {
            let at = self.at();
            out.push(LogEvent::Interrupt {
                cpu,
                at,
                kind: InterruptKind::External,
                vector: 0xec,
                regs: GprSnapshot {
                    rip: at.rip,
                    rcx: at.rcx,
                    rsp: 0xffff_c900_0001_3e80,
                    rflags: 0x246,
                    ..Default::default()
                },
                agent_seq: self.seq,
            });
        }
        if self.i % 20 == 5 {
            let at = self.at();
            out.push(LogEvent::Exception {
                cpu,
                at,
                vector: 14,
                error_code: Some(6),
                cr2: Some(buf + 4096),
                software: false,
                from_user: true,
                regs: Some(GprSnapshot {
                    rip: 0x40_1000,
                    rsp: 0x7ffd_0000_1000,
                    rflags: 0x246,
                    ..Default::default()
                }),
                agent_seq: self.seq,
            });
        }
        if self.i % 25 == 7 {
            let at = self.at();
            out.push(LogEvent::PioRead {
                cpu,
                at,
                port: 0x3fd,
                size: 1,
                value: 0x60,
            });
        }
        if self.i % 50 == 13 {
            let bytes: Vec<u8> = (0..512u32).map(|b| (b as u64 ^ self.i) as u8).collect();
            let dma_offset = dma(&bytes);
            self.dma_written += bytes.len() as u64;
            let at = self.at();
            out.push(LogEvent::Dma {
                cpu,
                at,
                gpa: 0x20_0000 + (self.i % 64) * 4096,
                len: bytes.len() as u32,
                dma_offset,
            });
        }
        self.i += 1;
        out
    }
}

/// An agent record with the next sequence number.
fn agent(seq: &mut u64, cpu: u16, body: EventBody) -> LogEvent {
    let record = abi::encode_event(&Event {
        cpu,
        seq: *seq,
        body,
    });
    *seq += 1;
    LogEvent::Agent { record }
}

/// Writes the start snapshot and waits for its memory image (written in the
/// background): these tests look at the event streams.
fn write_snapshot(w: &mut RecordingWriter, devices: serde_json::Value) {
    w.write_snapshot(MemoryCopy::take(&memory()).unwrap(), &cpus(), devices)
        .unwrap();
    w.wait_for_snapshot().unwrap();
}

fn memory() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap();
    for page in 0..(MEM_BYTES / 4096) {
        let text = format!("page {page:05} of the start snapshot");
        mem.write_slice(text.as_bytes(), GuestAddress(page * 4096))
            .unwrap();
    }
    mem
}

fn cpus() -> Vec<CpuSnapshot> {
    (0..VCPUS)
        .map(|id| CpuSnapshot {
            id,
            state: if id == 0 { "running" } else { "halted" }.to_string(),
            icount: 12_345 + id as u64,
            kernel_icount: 10_000 + id as u64,
            regs: Regs {
                rip: 0xffff_ffff_8100_0000 + id as u64,
                rsp: 0xffff_c900_0000_0000,
                rflags: 0x2,
                ..Default::default()
            },
            sregs: Sregs {
                cr0: 0x8005_0033,
                cr3: 0x1_0000,
                cr4: 0x3406f0,
                efer: 0xd01,
                ..Default::default()
            },
            fpu: (0..512).map(|b| (b % 251) as u8).collect(),
            msrs: vec![(0xc000_0080, 0xd01), (0x10, 123_456)],
            debug: DebugRegs {
                dr6: 0xffff_0ff0,
                dr7: 0x400,
                ..Default::default()
            },
        })
        .collect()
}

fn header(name: &str) -> RecordingHeader {
    let mut h = RecordingHeader::new(name);
    h.cmdline = "console=ttyS0".to_string();
    h.vcpus = VCPUS;
    h.mem_bytes = MEM_BYTES;
    h.backend = "tcg".to_string();
    h.start_trigger = "boot".to_string();
    h.stop_trigger = "end".to_string();
    h
}

/// What a built recording should hold.
struct Built {
    events: Vec<LogEvent>,
    counts: BTreeMap<&'static str, u64>,
}

/// Writes a recording of `iterations` mix iterations, flushing every
/// `flush_every` events (the recorder's periodic flush); finishes it when
/// `finish`.
fn build(dir: &Path, iterations: u64, flush_every: usize, finish: bool) -> Built {
    let mut w = RecordingWriter::create(dir, &header("synthetic")).unwrap();
    write_snapshot(&mut w, serde_json::json!({"serial": {"ier": 0}}));
    let mut mix = Mix::new();
    let mut events = Vec::new();
    let mut counts = BTreeMap::new();
    for _ in 0..iterations {
        let mut dma_bytes: Vec<Vec<u8>> = Vec::new();
        let mut next_dma = w.dma_totals().items;
        let batch = mix.iteration(|bytes| {
            dma_bytes.push(bytes.to_vec());
            let at = next_dma;
            next_dma += bytes.len() as u64;
            at
        });
        for bytes in dma_bytes {
            w.dma(&bytes).unwrap();
        }
        for e in batch {
            assert_eq!(w.event(&e).unwrap(), events.len() as u64);
            *counts.entry(e.class()).or_insert(0) += 1;
            events.push(e);
            if events.len() % flush_every == 0 {
                w.flush().unwrap();
            }
        }
    }
    if finish {
        w.finish(RecordingEnd {
            reason: "run ended: test".to_string(),
            ok: true,
            instructions_per_vcpu: vec![mix.icount, mix.icount / 2],
            virtual_ns: 2_000_000_000,
            wall_seconds: 1.5,
            ..RecordingEnd::default()
        })
        .unwrap();
    } else {
        w.flush().unwrap();
    }
    Built { events, counts }
}

/// (byte offset, first event) of each chunk of a stream file, read
/// straight from the chunk headers (independently of the reader under
/// test).
fn chunk_offsets(path: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(path).unwrap();
    let mut chunks = Vec::new();
    let mut at = FILE_HEADER_LEN as usize;
    let mut next_first = 0;
    while at < bytes.len() {
        let first = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        let count = u32::from_le_bytes(bytes[at + 16..at + 20].try_into().unwrap());
        let len = u32::from_le_bytes(bytes[at + 24..at + 28].try_into().unwrap()) as usize;
        assert_eq!(first, next_first);
        next_first = first + u64::from(count);
        chunks.push((at as u64, first));
        at += CHUNK_HEADER_LEN + len;
    }
    chunks
}

#[test]
fn a_finished_recording_verifies_and_its_stats_match() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    let built = build(&dir, 3000, 4000, true);
    let report = recording::verify(&dir).unwrap();
    assert_eq!(report.status, VerifyStatus::Ok, "{report}");
    assert_eq!(report.exit_code(), 0);
    assert_eq!(report.events, built.events.len() as u64);
    let text = report.to_string();
    assert!(
        text.starts_with(&format!(
            "OK: {} events in {} chunks",
            built.events.len(),
            report.event_chunks
        )),
        "{text}"
    );
    assert!(report.event_chunks >= 4, "{text}");

    let stats = recording::stats(&dir).unwrap();
    assert_eq!(stats.events, built.events.len() as u64);
    for row in &stats.classes {
        let expected = built.counts.get(row.class.as_str()).copied().unwrap_or(0);
        assert_eq!(row.count, expected, "class {}", row.class);
    }
    for class in built.counts.keys() {
        assert!(stats.classes.iter().any(|r| r.class == *class), "{class}");
    }
    assert_eq!(stats.exceptions_from_user, built.counts["exception"]);
    assert_eq!(stats.wall_seconds, Some(1.5));
    let table = stats.to_string();
    assert!(
        table.contains("syscall") && table.contains("bytes/event"),
        "{table}"
    );
    println!("{table}");

    // Dump prints the events' own Display.
    let mut out = Vec::new();
    let note = recording::dump(&dir, 5, Some(20), &mut out).unwrap();
    assert_eq!(note, None);
    let lines: Vec<String> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 20);
    for (k, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("#{} {}", 5 + k, built.events[5 + k]));
    }

    // The snapshot reads back as written.
    let mut expected = vec![0u8; MEM_BYTES as usize];
    memory().read_slice(&mut expected, GuestAddress(0)).unwrap();
    let into =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap();
    recording::load_memory_into(&dir, &into).unwrap();
    let mut back = vec![0u8; MEM_BYTES as usize];
    into.read_slice(&mut back, GuestAddress(0)).unwrap();
    assert!(back == expected);
    assert_eq!(recording::load_cpus(&dir).unwrap(), cpus());
    let end = recording::load_end(&dir).unwrap().unwrap();
    assert_eq!(end.events, built.events.len() as u64);

    // Every Dma event's bytes are where it says.
    let mut dma = log::DmaLogReader::open(&dir.join(recording::DMA_FILE)).unwrap();
    let mut seen = 0;
    for e in &built.events {
        if let LogEvent::Dma {
            len, dma_offset, ..
        } = e
        {
            let bytes = dma.read(*dma_offset, *len as usize).unwrap();
            assert_eq!(bytes.len(), *len as usize);
            seen += 1;
        }
    }
    assert!(seen > 10);

    // Through the CLI entry point, by path.
    let code = cli::run(LogCommand::Verify {
        name: dir.display().to_string(),
        json: true,
    })
    .unwrap();
    assert_eq!(code, 0);
}

#[test]
fn a_flipped_byte_in_chunk_3_is_reported_with_its_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    build(&dir, 2000, 1500, true);
    let path = dir.join(recording::EVENTS_FILE);
    let offsets = chunk_offsets(&path);
    assert!(offsets.len() > 5, "{} chunks", offsets.len());
    let (chunk3, events_before) = offsets[3];
    let pristine = std::fs::read(&path).unwrap();

    // A byte in the payload.
    let mut bytes = pristine.clone();
    bytes[chunk3 as usize + CHUNK_HEADER_LEN + 100] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let report = recording::verify(&dir).unwrap();
    assert_eq!(report.status, VerifyStatus::Damaged);
    assert_eq!(report.exit_code(), 2);
    assert_eq!(report.events, events_before);
    let text = report.to_string();
    let expected = format!(
        "DAMAGED: chunk 3 at byte offset {chunk3} of events.krrlog: payload crc32 mismatch"
    );
    assert!(text.starts_with(&expected), "{text}");
    assert!(
        text.contains(&format!("the {events_before} events before it are valid")),
        "{text}"
    );
    match report.events_end {
        Some(StreamEnd::Damaged {
            chunk_index,
            offset,
            ..
        }) => assert_eq!((chunk_index, offset), (3, chunk3)),
        other => panic!("{other:?}"),
    }

    // A byte in the header (the item count).
    let mut bytes = pristine.clone();
    bytes[chunk3 as usize + 17] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let text = recording::verify(&dir).unwrap().to_string();
    assert!(
        text.starts_with(&format!(
            "DAMAGED: chunk 3 at byte offset {chunk3} of events.krrlog: header crc32 mismatch"
        )),
        "{text}"
    );

    // Stats and dump stop at the damage and say so.
    let stats = recording::stats(&dir).unwrap();
    assert_eq!(stats.events, events_before);
    assert!(stats.incomplete.as_deref().unwrap().contains("damaged"));
    let mut out = Vec::new();
    let note = recording::dump(&dir, 0, None, &mut out).unwrap().unwrap();
    assert!(note.contains(&format!("byte offset {chunk3}")), "{note}");
    assert_eq!(
        String::from_utf8(out).unwrap().lines().count() as u64,
        events_before
    );
}

#[test]
fn a_file_cut_mid_chunk_is_a_valid_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    build(&dir, 2000, 1500, false);
    let path = dir.join(recording::EVENTS_FILE);
    let offsets = chunk_offsets(&path);
    let (chunk5, events_before) = offsets[5];
    let full = std::fs::read(&path).unwrap();
    std::fs::write(&path, &full[..chunk5 as usize + 500]).unwrap();
    let report = recording::verify(&dir).unwrap();
    assert_eq!(report.status, VerifyStatus::PrefixValid, "{report}");
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.events, events_before);
    let text = report.to_string();
    assert!(
        text.starts_with(&format!(
            "PREFIX VALID: {events_before} events in 5 chunks ({chunk5} bytes)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("the log ends at byte {chunk5} of events.krrlog (truncated: the file ends 464 bytes into the")),
        "{text}"
    );
    assert!(
        text.contains("no end.json: the recorder did not finish"),
        "{text}"
    );

    // A finished recording whose log is cut short is damage, not a prefix.
    let tmp2 = tempfile::tempdir().unwrap();
    let dir2 = tmp2.path().join("rec");
    build(&dir2, 500, 1000, true);
    let path2 = dir2.join(recording::EVENTS_FILE);
    let len = std::fs::metadata(&path2).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path2)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let report = recording::verify(&dir2).unwrap();
    assert_eq!(report.status, VerifyStatus::Damaged, "{report}");
    assert!(report.to_string().contains("cut short"), "{report}");
}

#[test]
fn semantic_checks_catch_a_seq_gap_and_dma_past_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    let mut w = RecordingWriter::create(&dir, &header("gaps")).unwrap();
    write_snapshot(&mut w, serde_json::Value::Null);
    let rdtsc = |seq| LogEvent::Agent {
        record: abi::encode_event(&Event {
            cpu: 0,
            seq,
            body: EventBody::Rdtsc(abi::RdtscEvent {
                value: seq * 10,
                insn: 0,
                reserved: 0,
            }),
        }),
    };
    for seq in [7, 8, 9, 12, 13] {
        w.event(&rdtsc(seq)).unwrap();
    }
    let off = w.dma(&[1, 2, 3, 4]).unwrap();
    w.event(&LogEvent::Dma {
        cpu: 1,
        at: Position::default(),
        gpa: 0x1000,
        len: 8,
        dma_offset: off,
    })
    .unwrap();
    w.finish(RecordingEnd {
        reason: "test".into(),
        ok: true,
        ..RecordingEnd::default()
    })
    .unwrap();
    let report = recording::verify(&dir).unwrap();
    assert_eq!(report.status, VerifyStatus::Damaged);
    let text = report.to_string();
    assert!(
        text.contains("event #3: agent seq 12 follows seq 9: 2 agent records are missing"),
        "{text}"
    );
    assert!(
        text.contains("event #5: its DMA bytes 0..8 lie past the 4 valid bytes of dma.krrlog"),
        "{text}"
    );
}

#[test]
fn refusals_and_lookups_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    build(&dir, 10, 100, true);
    let err = RecordingWriter::create(&dir, &header("again"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("refusing to overwrite"), "{err}");
    let err = recording::find("no-such-recording-7f3a")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no recording named no-such-recording-7f3a under")
            && err.contains("KRR_RECORDINGS"),
        "{err}"
    );
    // One rule for names and paths: a '/' makes a path, a plain name is
    // looked up under the recordings directory only.
    let path = dir.display().to_string();
    assert_eq!(recording::find(&path).unwrap(), dir);
    assert_eq!(
        recording::resolve("rec"),
        recording::recordings_dir().join("rec")
    );
    assert_eq!(
        recording::resolve("./rec"),
        std::path::PathBuf::from("./rec")
    );
    let err = recording::verify(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("has no header.json"), "{err}");
    // An unknown format version in the header is damage, named.
    let hpath = dir.join(recording::HEADER_FILE);
    let text = std::fs::read_to_string(&hpath).unwrap();
    std::fs::write(
        &hpath,
        text.replace(
            &format!(
                "\"format_version\": {}",
                krr_engine::record::log::FORMAT_VERSION
            ),
            "\"format_version\": 99",
        ),
    )
    .unwrap();
    let report = recording::verify(&dir).unwrap();
    assert_eq!(report.status, VerifyStatus::Damaged);
    assert!(report.to_string().contains("format_version 99"), "{report}");
}

#[test]
fn bytes_per_event_of_a_realistic_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    // The recorder flushes every ~200 ms; at ~50k events/s that is a
    // flush every ~10k events.
    let started = Instant::now();
    let built = build(&dir, 20_000, 10_000, true);
    let write_time = started.elapsed();
    let stats = recording::stats(&dir).unwrap();
    let per_event = stats.bytes_per_event;
    println!(
        "{} events: {} raw bytes ({:.1}/event), {} file bytes ({per_event:.1}/event, KRR: ~38), written in {:?} ({:.0} events/s)",
        stats.events,
        stats.raw_bytes,
        stats.raw_bytes as f64 / stats.events as f64,
        stats.file_bytes,
        write_time,
        stats.events as f64 / write_time.as_secs_f64()
    );
    assert_eq!(stats.events, built.events.len() as u64);
    assert!(
        per_event > 0.0 && per_event < 200.0,
        "{per_event} bytes/event"
    );

    // zstd level 1 vs 3 on the same raw chunks (informational).
    let mut raw = Vec::new();
    for e in &built.events[..20_000] {
        raw.extend_from_slice(&postcard::to_allocvec(e).unwrap());
    }
    for level in [1, 3] {
        let t = Instant::now();
        let mut total = 0;
        for chunk in raw.chunks(256 * 1024) {
            total += zstd::bulk::compress(chunk, level).unwrap().len();
        }
        println!(
            "zstd level {level}: {:.1} bytes/event, {:?} for 20000 events",
            total as f64 / 20_000.0,
            t.elapsed()
        );
    }
}

/// The killed writer: runs only as the child of
/// `kill_9_leaves_a_verifiable_prefix` (which sets CHILD_ENV); writes
/// and flushes until killed.
#[test]
#[ignore = "helper process for kill_9_leaves_a_verifiable_prefix"]
fn writer_child_process() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        panic!("run only by kill_9_leaves_a_verifiable_prefix ({CHILD_ENV} unset)");
    };
    let dir = Path::new(&dir);
    let mut w = RecordingWriter::create(dir, &header("killed")).unwrap();
    write_snapshot(&mut w, serde_json::Value::Null);
    let mut mix = Mix::new();
    let started = Instant::now();
    let mut n = 0u64;
    // Bounded, so that a parent that failed to kill it does not leave it
    // running forever.
    while started.elapsed() < Duration::from_secs(60) {
        let mut pending: Vec<Vec<u8>> = Vec::new();
        let mut next = w.dma_totals().items;
        let batch = mix.iteration(|b| {
            pending.push(b.to_vec());
            let at = next;
            next += b.len() as u64;
            at
        });
        for b in pending {
            w.dma(&b).unwrap();
        }
        for e in batch {
            w.event(&e).unwrap();
            n += 1;
            if n.is_multiple_of(300) {
                w.flush().unwrap();
            }
        }
    }
}

#[test]
fn kill_9_leaves_a_verifiable_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "writer_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .spawn()
        .unwrap();
    let events = dir.join(recording::EVENTS_FILE);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&events).map_or(0, |m| m.len()) < 4096 {
        assert!(
            Instant::now() < deadline,
            "the writer produced no chunk in 30 s"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the writer exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!dir.join(recording::END_FILE).exists());
    let report = recording::verify(&dir).unwrap();
    println!("{report}");
    assert_eq!(report.status, VerifyStatus::PrefixValid, "{report}");
    assert_eq!(report.exit_code(), 1);
    assert!(report.events > 0);
    assert!(report
        .to_string()
        .contains("no end.json: the recorder did not finish"));
    let stats = recording::stats(&dir).unwrap();
    assert_eq!(stats.events, report.events);
    assert!(!stats.finished);
}
