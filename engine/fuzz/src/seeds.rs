// SPDX-License-Identifier: GPL-2.0-or-later
//! The seed corpus, written by the project's own writers (`krr-fuzz seed`):
//! ring images built from `abi::encode_event`, and small recordings from
//! `RecordingWriter` with one event of every kind. Committed under
//! `engine/fuzz/corpus/`, so a format change shows up as a diff there.

use anyhow::{Context, Result};
use krr_hypervisor::{Regs, Sregs};
use krr_record::abi::{self, Event, EventBody, RingHeader};
use krr_record::event::{InterruptKind, LogEvent, Position};
use krr_record::memory_image::MemoryCopy;
use krr_record::recording::{CpuSnapshot, RecordingEnd, RecordingHeader, RecordingWriter};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM of the seed recordings: the least `Replayer::open` accepts.
const MEM_BYTES: u64 = 64 << 20;

/// Writes the whole corpus under `out` (`ring/`, `recording/`).
pub fn write_corpus(out: &Path) -> Result<()> {
    for (name, region) in [
        ("fresh", ring_image(&agent_events(0), 0)),
        // Starts near the end of the data area: a pad record, then a wrap.
        (
            "wrapped",
            ring_image(&agent_events(100), abi::MIN_DATA_SIZE - 200),
        ),
    ] {
        let dir = out.join("ring").join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(crate::RING_FILE), trim_zeros(region))?;
    }
    recording(&out.join("recording/finished"), 2, true)?;
    recording(&out.join("recording/unfinished"), 1, false)?;
    Ok(())
}

/// The image without its trailing zero bytes (the ring target pads them
/// back), so the committed file stays small.
fn trim_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes.truncate(used.max(abi::RING_HEADER_SIZE as usize));
    bytes
}

/// How many records [`agent_events`] writes: one of each kind.
fn agent_kinds() -> u64 {
    agent_events(0).len() as u64
}

/// One agent record of every kind, sequence numbers from `seq`.
fn agent_events(seq: u64) -> Vec<Event> {
    let regs = abi::UserRegs {
        orig_ax: 0,
        ip: 0x40_1000,
        sp: 0x7ffc_0000,
        cx: 0x40_1000,
        ..Default::default()
    };
    let data = b"/etc/hostname\0".to_vec();
    let bodies = vec![
        EventBody::Syscall(abi::SyscallEvent {
            regs,
            fs_base: 0x4c_0000,
            cr3: 0x123_4000,
            ..Default::default()
        }),
        EventBody::CopyFromUser {
            info: abi::UserCopyEvent {
                user_addr: 0x7ffc_1000,
                kernel_addr: 0xffff_8880_0000_1000,
                requested: data.len() as u64,
                data_len: data.len() as u32,
                ..Default::default()
            },
            data: data.clone(),
        },
        EventBody::StrncpyFromUser {
            info: abi::UserStringEvent {
                user_addr: 0x7ffc_2000,
                data_len: data.len() as u32,
                ..Default::default()
            },
            data,
        },
        EventBody::GetUser(abi::GetUserEvent {
            user_addr: 0x7ffc_3000,
            value: 7,
            size: 4,
            err: 0,
            cr3: 0x123_4000,
        }),
        EventBody::Rdtsc(abi::RdtscEvent {
            value: 123_456_789,
            ..Default::default()
        }),
        EventBody::Random {
            info: abi::RandomEvent {
                data_len: 8,
                ..Default::default()
            },
            data: vec![0x5a; 8],
        },
        EventBody::Rdrand(abi::RdrandEvent::default()),
        EventBody::PteRead(abi::PteReadEvent::default()),
        EventBody::SharedRead {
            info: abi::SharedReadEvent {
                kernel_addr: 0xffff_8880_0123_4000,
                data_len: 4,
                source: abi::SHARED_IO_URING_RING,
                cr3: 0x123_4000,
            },
            data: 7u32.to_le_bytes().to_vec(),
        },
        EventBody::Lost(abi::LostEvent::default()),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Event {
            cpu: (i % 2) as u16,
            seq: seq + i as u64,
            body,
        })
        .collect()
}

/// A ring region (header page and a 64 KiB data area) holding `events`
/// from byte counter `start` on, with a pad record where one would not fit
/// before the end of the data area.
fn ring_image(events: &[Event], start: u64) -> Vec<u8> {
    let data_size = abi::MIN_DATA_SIZE;
    let header_size = u64::from(abi::RING_HEADER_SIZE);
    let mut header = RingHeader::new(header_size + data_size, abi::CONTROL_RECORD)
        .expect("a ring of the least size");
    header.agent_state = abi::AGENT_STATE_READY;
    header.agent_abi_version = abi::ABI_VERSION;
    let mut region = vec![0u8; (header_size + data_size) as usize];
    let mut at = start;
    let mut put = |at: u64, bytes: &[u8]| {
        let base = (header_size + at % data_size) as usize;
        region[base..base + bytes.len()].copy_from_slice(bytes);
    };
    for event in events {
        let record = abi::encode_event(event);
        let left = data_size - at % data_size;
        if (record.len() as u64) > left {
            let mut pad = abi::EventHeader {
                event_type: abi::EVENT_PAD,
                size: left as u32,
                ..Default::default()
            }
            .to_bytes();
            pad.truncate(8);
            put(at, &pad);
            at += left;
        }
        put(at, &record);
        at += record.len() as u64;
    }
    header.tail = start;
    header.head = at;
    header.next_seq = events.last().map_or(0, |e| e.seq + 1);
    let bytes = header.to_bytes();
    region[..bytes.len()].copy_from_slice(&bytes);
    region
}

fn position(n: u64) -> Position {
    Position {
        icount: 1_000_000 + n * 1000,
        kernel_icount: 900_000 + n * 900,
        rip: 0xffff_ffff_8100_0000 + n * 16,
        rcx: n,
        cpl: 0,
    }
}

/// A recording of `vcpus` vCPUs with every kind of engine event and the
/// agent records, in a few chunks; `finish`: with `end.json`.
fn recording(dir: &Path, vcpus: usize, finish: bool) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let mut header = RecordingHeader::new("fuzz-seed");
    // Fixed, so that regenerating the corpus changes nothing.
    header.created = 1_767_225_600;
    header.host = Default::default();
    header.vcpus = vcpus;
    header.mem_bytes = MEM_BYTES;
    header.cmdline = "console=ttyS0".into();
    header.backend = "tcg".into();
    header.start_trigger = "boot".into();
    header.stop_trigger = "end".into();
    let mut w = RecordingWriter::create(dir, &header)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)])
        .context("seed guest memory")?;
    mem.write_slice(b"start snapshot of a fuzz seed", GuestAddress(0x10_0000))?;
    let cpus: Vec<CpuSnapshot> = (0..vcpus)
        .map(|id| CpuSnapshot {
            id,
            state: if id == 0 { "running" } else { "halted" }.into(),
            icount: 1_000_000,
            kernel_icount: 900_000,
            regs: Regs {
                rip: 0xffff_ffff_8100_0000,
                rflags: 0x2,
                ..Default::default()
            },
            sregs: Sregs {
                cr0: 0x8005_0033,
                cr4: 0x3406f0,
                efer: 0xd01,
                ..Default::default()
            },
            fpu: vec![0; 512],
            msrs: vec![(0xc000_0080, 0xd01)],
            debug: Default::default(),
        })
        .collect();
    let memory = MemoryCopy::take(&mem).map_err(anyhow::Error::msg)?;
    w.write_snapshot(memory, &cpus, serde_json::json!({"serial": {"ier": 0}}))?;
    w.wait_for_snapshot()?;
    let regs = Regs {
        rip: 0x40_1000,
        rsp: 0x7ffc_0000,
        ..Default::default()
    };
    let mut n = 0;
    for round in 0..3u64 {
        let cpu = (round % vcpus as u64) as u16;
        let dma_offset = w.dma(&[round as u8 + 1; 512])?;
        let mut events = vec![
            LogEvent::Interrupt {
                cpu,
                at: position(n),
                kind: InterruptKind::External,
                vector: 0xec,
                regs,
                agent_seq: round * agent_kinds(),
            },
            LogEvent::Exception {
                cpu,
                at: position(n + 1),
                vector: 14,
                error_code: Some(4),
                cr2: Some(0x7ffc_0ff8),
                software: false,
                from_user: true,
                regs: Some(regs),
                agent_seq: round * agent_kinds(),
            },
            LogEvent::Syscall {
                cpu,
                at: position(n + 2),
                regs,
                fs_base: 0x4c_0000,
                gs_base: 0,
                agent_seq: round * agent_kinds(),
            },
            LogEvent::PioRead {
                cpu,
                at: position(n + 3),
                port: 0x3fd,
                size: 1,
                value: 0x60,
            },
            LogEvent::MmioRead {
                cpu,
                at: position(n + 4),
                addr: 0xfee0_0390,
                size: 4,
                value: 1234,
            },
            LogEvent::Rdtsc {
                cpu,
                at: position(n + 5),
                value: 5_000_000_000 + round,
            },
            LogEvent::Dma {
                cpu,
                at: position(n + 6),
                gpa: 0x20_0000,
                len: 512,
                dma_offset,
            },
            LogEvent::Doorbell {
                cpu,
                at: position(n + 7),
                reason: abi::DOORBELL_HIGH_WATER,
                tail: round * 512,
            },
            LogEvent::Checkpoint {
                cpu,
                at: position(n + 8),
                regs,
                sha256: [round as u8; 32],
            },
            LogEvent::Console {
                cpu,
                bytes: b"Linux version 6.1\n".to_vec(),
            },
            LogEvent::Slice {
                cpu,
                at: position(n + 9),
                agent_seq: (round + 1) * agent_kinds(),
            },
        ];
        if round == 0 && vcpus > 1 {
            events.push(LogEvent::Startup { cpu: 1, vector: 9 });
        }
        events.extend(
            agent_events(round * agent_kinds())
                .iter()
                .map(|e| LogEvent::Agent {
                    record: abi::encode_event(e),
                }),
        );
        for event in &events {
            w.event(event)?;
        }
        n += 10;
        // A chunk per round: readers and verify walk several.
        w.flush()?;
    }
    if finish {
        w.finish(RecordingEnd {
            reason: "run ended: fuzz seed".into(),
            ok: true,
            instructions_per_vcpu: vec![2_000_000; vcpus],
            kernel_instructions_per_vcpu: vec![1_800_000; vcpus],
            virtual_ns: 1_000_000_000,
            wall_seconds: 1.0,
            ..RecordingEnd::default()
        })?;
        // `finished` is the clock's: fixed, so regenerating changes nothing.
        let path = dir.join(krr_record::recording::END_FILE);
        let mut end: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        end["finished"] = serde_json::Value::from(1_767_225_601u64);
        std::fs::write(&path, serde_json::to_vec_pretty(&end)?)?;
    } else {
        w.flush()?;
        drop(w);
    }
    Ok(())
}
