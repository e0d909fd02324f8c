// SPDX-License-Identifier: GPL-2.0-or-later
//! Throughput of the recorder's and the replayer's hot pieces, each alone:
//! decoding the guest agent's ring, appending events to the log (postcard
//! and zstd included), reading them back, and the chunk compression by
//! itself. `cargo xtask bench micro` runs them; the README quotes them.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use krr_record::abi::{
    encode_event, parse_records, Event, EventBody, GetUserEvent, RdtscEvent, SyscallEvent,
    UserCopyEvent, UserRegs,
};
use krr_record::event::{GprSnapshot, LogEvent, Position};
use krr_record::log::{EventLogReader, EventLogWriter, DEFAULT_CHUNK_TARGET, ZSTD_LEVEL};

/// The agent's records of a syscall-heavy guest: each syscall's entry, a
/// 64-byte copy from user space, a get_user and an RDTSC.
fn agent_events(n: u64) -> Vec<Event> {
    (0..n)
        .map(|seq| {
            let body = match seq % 4 {
                0 => EventBody::Syscall(SyscallEvent {
                    regs: UserRegs {
                        orig_ax: seq % 300,
                        ip: 0x40_1000 + seq,
                        sp: 0x7ffc_0000,
                        ..UserRegs::default()
                    },
                    fs_base: 0x4c_0000,
                    cr3: 0x123_4000,
                    ..Default::default()
                }),
                1 => EventBody::CopyFromUser {
                    info: UserCopyEvent {
                        user_addr: 0x7ffc_1000 + seq,
                        kernel_addr: 0xffff_8880_0000_1000,
                        requested: 64,
                        data_len: 64,
                        ..Default::default()
                    },
                    data: (0..64).map(|b| (b ^ seq) as u8).collect(),
                },
                2 => EventBody::GetUser(GetUserEvent {
                    user_addr: 0x1000 + seq,
                    value: seq,
                    size: 8,
                    err: 0,
                    cr3: 0x123_4000,
                }),
                _ => EventBody::Rdtsc(RdtscEvent {
                    value: 1_000_000 + seq * 37,
                    ..Default::default()
                }),
            };
            Event {
                cpu: (seq % 2) as u16,
                seq,
                body,
            }
        })
        .collect()
}

/// The log's events for the same activity: the agent's records as drained,
/// and the engine's own entries between them (port reads, RDTSCs).
fn log_events(n: u64) -> Vec<LogEvent> {
    let records: Vec<Vec<u8>> = agent_events(n).iter().map(encode_event).collect();
    records
        .into_iter()
        .enumerate()
        .map(|(i, record)| {
            let i = i as u64;
            let at = Position {
                icount: i * 1000,
                kernel_icount: i * 900,
                rip: 0xffff_ffff_8100_0000 + i,
                rcx: i,
                cpl: 0,
            };
            match i % 3 {
                0 => LogEvent::Rdtsc {
                    cpu: 0,
                    at,
                    value: 1_000_000 + i * 37,
                },
                1 => LogEvent::PioRead {
                    cpu: 0,
                    at,
                    port: 0x3f8,
                    size: 1,
                    value: (i & 0xff) as u32,
                },
                _ => LogEvent::Agent { record },
            }
        })
        .collect()
}

fn agent_ring(c: &mut Criterion) {
    let data: Vec<u8> = agent_events(4096).iter().flat_map(encode_event).collect();
    let head = data.len() as u64;
    // A data area exactly as large as its records: no wrap, no padding.
    let mut g = c.benchmark_group("agent_ring");
    g.throughput(Throughput::Bytes(head));
    g.bench_function("parse_records", |b| {
        b.iter(|| parse_records(&data, 0, head).unwrap())
    });
    g.finish();
}

/// Appending `events` to a new log at `path` and flushing it.
fn bench_append(
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    name: &str,
    path: &std::path::Path,
    events: &[LogEvent],
) {
    g.bench_function(name, |b| {
        b.iter_batched(
            || {
                // (The writer creates its file: it must not exist.)
                let _ = std::fs::remove_file(path);
                EventLogWriter::create(path).unwrap()
            },
            |mut w| {
                for e in events {
                    w.append(e).unwrap();
                }
                w.flush().unwrap();
            },
            BatchSize::PerIteration,
        )
    });
}

fn event_log(c: &mut Criterion) {
    const N: u64 = 30_000;
    let events = log_events(N);
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("event_log");
    g.throughput(Throughput::Elements(N));
    g.sample_size(20);
    bench_append(&mut g, "append", &dir.path().join("append.krrlog"), &events);
    // A syscall storm's log: an entry with the user's registers per syscall.
    let syscalls: Vec<LogEvent> = (0..N)
        .map(|i| LogEvent::Syscall {
            cpu: 0,
            at: Position {
                icount: i * 1200,
                kernel_icount: i * 1000,
                rip: 0x7f12_3456_7000 + (i & 0xff),
                rcx: 0,
                cpl: 3,
            },
            regs: GprSnapshot {
                rax: 39,
                rbx: 0x5555_5555_9000,
                rcx: 0x7f12_3456_7000,
                rdx: i,
                rsi: 0x7ffd_1234_5678,
                rdi: 1,
                rsp: 0x7ffd_1234_5600 - (i & 0xf) * 8,
                rbp: 0x7ffd_1234_5700,
                r8: 0,
                r9: 0,
                r10: 8,
                r11: 0x246,
                r12: 0x5555_5555_a000,
                r13: 0,
                r14: 0,
                r15: 0,
                rip: 0x7f12_3456_7000 + (i & 0xff),
                rflags: 0x246,
            },
            fs_base: 0x7f12_3400_0740,
            gs_base: 0,
            agent_seq: i * 3,
        })
        .collect();
    bench_append(
        &mut g,
        "append_syscalls",
        &dir.path().join("syscalls.krrlog"),
        &syscalls,
    );
    let path = dir.path().join("read.krrlog");
    let mut w = EventLogWriter::create(&path).unwrap();
    for e in &events {
        w.append(e).unwrap();
    }
    w.flush().unwrap();
    g.bench_function("read", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for r in EventLogReader::open(&path).unwrap() {
                r.unwrap();
                n += 1;
            }
            assert_eq!(n, N);
        })
    });
    g.finish();
}

fn chunk_compression(c: &mut Criterion) {
    let mut raw = Vec::new();
    for e in log_events(20_000) {
        raw.extend(postcard::to_allocvec(&e).unwrap());
        if raw.len() >= DEFAULT_CHUNK_TARGET {
            break;
        }
    }
    let compressed = zstd::bulk::compress(&raw, ZSTD_LEVEL).unwrap();
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("zstd_compress", |b| {
        b.iter(|| zstd::bulk::compress(&raw, ZSTD_LEVEL).unwrap())
    });
    g.bench_function("zstd_decompress", |b| {
        b.iter(|| zstd::bulk::decompress(&compressed, raw.len()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, agent_ring, event_log, chunk_compression);
criterion_main!(benches);
