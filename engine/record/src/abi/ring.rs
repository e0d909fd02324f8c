// SPDX-License-Identifier: GPL-2.0-or-later
//! The ring region: header checks, agent presence, doorbells, and parsing
//! and draining the records between `tail` and `head`.

use super::*;
use std::mem::{offset_of, size_of};

/// What is wrong with a ring image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    #[error("ring region is {len} bytes, smaller than its {need}-byte header")]
    TooSmall { len: usize, need: usize },
    #[error(
        "ring magic is {found:#018x}, expected {RING_MAGIC:#018x} (\"KRRRING\\0\"); not a KRR ring"
    )]
    BadMagic { found: u64 },
    #[error("ring abi_version is {found}, this engine speaks {ABI_VERSION}")]
    BadVersion { found: u32 },
    #[error("ring field {field} is {value}: {expected}")]
    BadField {
        field: &'static str,
        value: u64,
        expected: String,
    },
    #[error("ring head {head} is behind tail {tail}")]
    HeadBehindTail { head: u64, tail: u64 },
    #[error("ring holds {used} bytes between tail and head, more than data_size {data_size}")]
    Overrun { used: u64, data_size: u64 },
    #[error("record at ring byte {at} (data offset {offset}): {problem}")]
    BadRecord {
        at: u64,
        offset: u64,
        problem: String,
    },
    #[error(
        "KRR agent not found: the guest kernel never accepted the ring (agent_state 0); \
         boot a -krr kernel (CONFIG_KRR_AGENT=y, images/kernel/krr-agent) with krr.ring=SIZE@PHYS"
    )]
    AgentAbsent,
    #[error(
        "the guest's KRR agent refused the ring (agent ABI version {agent_abi_version}, engine {ABI_VERSION}); \
         its reason is in the guest kernel log (\"krr_agent: ring at ... refused: ...\")"
    )]
    AgentRefused { agent_abi_version: u32 },
    #[error("ring agent_state is {0}, not one of AGENT_STATE_ABSENT/READY/REFUSED")]
    BadAgentState(u32),
}

/// Why the agent rang the doorbell (the value of its `outl` to DOORBELL_PORT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doorbell {
    /// Used space crossed `high_water`: drain.
    HighWater,
    /// A record did not fit: drain now, or it is dropped.
    Full,
    /// The agent accepted the ring.
    AgentReady,
    /// The agent refused the ring (see `agent_state` and the kernel log).
    AgentRefused,
    /// `start` written to /proc/krr_agent.
    GuestStart,
    /// `stop` written to /proc/krr_agent.
    GuestStop,
}

impl Doorbell {
    /// Decodes the value written to DOORBELL_PORT; `None` for unknown values.
    pub fn from_value(value: u32) -> Option<Doorbell> {
        Some(match value {
            DOORBELL_HIGH_WATER => Doorbell::HighWater,
            DOORBELL_FULL => Doorbell::Full,
            DOORBELL_AGENT_READY => Doorbell::AgentReady,
            DOORBELL_AGENT_REFUSED => Doorbell::AgentRefused,
            DOORBELL_GUEST_START => Doorbell::GuestStart,
            DOORBELL_GUEST_STOP => Doorbell::GuestStop,
            _ => return None,
        })
    }

    /// Whether the engine should drain the ring before resuming the vCPU.
    pub fn wants_drain(self) -> bool {
        matches!(self, Doorbell::HighWater | Doorbell::Full)
    }
}

/// Byte offset of `control` in the region (the engine flips it to start/stop).
pub const CONTROL_OFFSET: usize = offset_of!(RingHeader, control);
/// Byte offset of `agent_state` (AGENT_STATE_*): how the engine tells whether
/// the guest kernel has an agent at all.
pub const AGENT_STATE_OFFSET: usize = offset_of!(RingHeader, agent_state);
/// Byte offset of `head` (agent-written, read with acquire).
pub const HEAD_OFFSET: usize = offset_of!(RingHeader, head);
/// Byte offset of `tail` (engine-written after consuming).
pub const TAIL_OFFSET: usize = offset_of!(RingHeader, tail);
/// Byte offset of `next_seq`: the engine stamps its kernel-entry events with
/// it, so replay knows which agent events belong to which entry.
pub const NEXT_SEQ_OFFSET: usize = offset_of!(RingHeader, next_seq);

/// Kernel command-line parameters announcing a ring of `size` bytes at
/// guest-physical `phys`: `memmap=SIZE$PHYS` keeps the kernel off it (not
/// needed when the engine's e820 map already leaves it out of RAM) and
/// `krr.ring=SIZE@PHYS` tells the agent where it is.
pub fn kernel_cmdline(phys: u64, size: u64, reserve_with_memmap: bool) -> String {
    let ring = format!("krr.ring={size:#x}@{phys:#x}");
    if reserve_with_memmap {
        format!("memmap={size:#x}${phys:#x} {ring}")
    } else {
        ring
    }
}

/// Parses the pending records of `region` (a copy of, or exclusive access to,
/// the ring region) and marks them consumed by writing `tail = head`, as the
/// engine does when it drains the ring on a doorbell.
pub fn drain(region: &mut [u8]) -> Result<RingContents, AbiError> {
    let contents = parse_ring(region)?;
    region[TAIL_OFFSET..TAIL_OFFSET + 8].copy_from_slice(&contents.header.head.to_le_bytes());
    Ok(contents)
}

/// Validated geometry of a ring region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    pub header_size: u64,
    pub data_size: u64,
}

impl RingHeader {
    /// A fresh header for a region of `region_size` bytes, as the engine
    /// writes it before boot: data area = the largest power of two that fits
    /// after the header page, high-water mark at three quarters of it.
    pub fn new(region_size: u64, control: u32) -> Result<RingHeader, AbiError> {
        let header = u64::from(RING_HEADER_SIZE);
        if region_size < header + MIN_DATA_SIZE || region_size & 0xfff != 0 {
            return Err(AbiError::BadField {
                field: "region_size",
                value: region_size,
                expected: format!(
                    "a multiple of 4096 of at least {} bytes",
                    header + MIN_DATA_SIZE
                ),
            });
        }
        let data_size = 1u64 << (63 - (region_size - header).leading_zeros());
        Ok(RingHeader {
            magic: RING_MAGIC,
            abi_version: ABI_VERSION,
            header_size: RING_HEADER_SIZE,
            region_size,
            data_size,
            high_water: data_size / 4 * 3,
            control,
            doorbell_port: DOORBELL_PORT.into(),
            ..RingHeader::default()
        })
    }

    /// Whether the guest has a working agent on this ring: the engine calls
    /// this before it starts a recording (after boot, or on the READY
    /// doorbell), so an unpatched kernel fails with a clear message instead
    /// of recording nothing.
    pub fn check_agent(&self) -> Result<(), AbiError> {
        match self.agent_state {
            AGENT_STATE_READY => Ok(()),
            AGENT_STATE_ABSENT => Err(AbiError::AgentAbsent),
            AGENT_STATE_REFUSED => Err(AbiError::AgentRefused {
                agent_abi_version: self.agent_abi_version,
            }),
            other => Err(AbiError::BadAgentState(other)),
        }
    }

    /// Checks the engine-written fields against the region length.
    pub fn validate(&self, region_len: usize) -> Result<RingGeometry, AbiError> {
        if self.magic != RING_MAGIC {
            return Err(AbiError::BadMagic { found: self.magic });
        }
        if self.abi_version != ABI_VERSION {
            return Err(AbiError::BadVersion {
                found: self.abi_version,
            });
        }
        let bad = |field, value: u64, expected: &str| AbiError::BadField {
            field,
            value,
            expected: expected.to_string(),
        };
        let header_size = u64::from(self.header_size);
        if header_size < size_of::<RingHeader>() as u64 || header_size & 7 != 0 {
            return Err(bad(
                "header_size",
                header_size,
                "a multiple of 8 holding the header",
            ));
        }
        if !self.data_size.is_power_of_two() || self.data_size < MIN_DATA_SIZE {
            return Err(bad(
                "data_size",
                self.data_size,
                "a power of two of at least MIN_DATA_SIZE (64 KiB)",
            ));
        }
        if self.high_water > self.data_size {
            return Err(bad("high_water", self.high_water, "at most data_size"));
        }
        let end = header_size.checked_add(self.data_size);
        if end.is_none_or(|end| end > self.region_size || end > region_len as u64) {
            return Err(bad(
                "data_size",
                self.data_size,
                &format!("header_size + data_size within the {region_len}-byte region"),
            ));
        }
        Ok(RingGeometry {
            header_size,
            data_size: self.data_size,
        })
    }
}

/// What a ring image holds between `tail` and `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingContents {
    pub header: RingHeader,
    pub events: Vec<Event>,
    /// Ring bytes consumed, including padding (`head - tail`).
    pub bytes: u64,
}

impl RingContents {
    /// Event counts by EVENT_* code, in code order.
    pub fn counts(&self) -> std::collections::BTreeMap<u16, u64> {
        let mut counts = std::collections::BTreeMap::new();
        for event in &self.events {
            *counts.entry(event.body.event_type()).or_insert(0) += 1;
        }
        counts
    }
}

/// Parses the records between `tail` and `head` of a ring region image (the
/// whole reserved region, header first), e.g. dumped from guest memory. The
/// recorder calls this on a consistent copy and then advances `tail` to
/// `head`. Every malformed record is an error naming its position.
pub fn parse_ring(region: &[u8]) -> Result<RingContents, AbiError> {
    let need = size_of::<RingHeader>();
    let header = RingHeader::read_from(region).ok_or(AbiError::TooSmall {
        len: region.len(),
        need,
    })?;
    let geometry = header.validate(region.len())?;
    if header.head < header.tail {
        return Err(AbiError::HeadBehindTail {
            head: header.head,
            tail: header.tail,
        });
    }
    let used = header.head - header.tail;
    if used > geometry.data_size {
        return Err(AbiError::Overrun {
            used,
            data_size: geometry.data_size,
        });
    }
    let data = &region
        [geometry.header_size as usize..(geometry.header_size + geometry.data_size) as usize];
    let events = parse_records(data, header.tail, header.head)?;
    Ok(RingContents {
        header,
        events,
        bytes: used,
    })
}

/// Parses the records of a data area between byte counters `tail` and `head`.
pub fn parse_records(data: &[u8], tail: u64, head: u64) -> Result<Vec<Event>, AbiError> {
    let mut events = Vec::new();
    for (at, record) in split_records(data, tail, head)? {
        events.push(decode_record(record).map_err(|e| match e {
            AbiError::BadRecord { problem, .. } => AbiError::BadRecord {
                at,
                offset: at % data.len() as u64,
                problem,
            },
            other => other,
        })?);
    }
    Ok(events)
}

/// The records (header, payload, padding; PAD records left out) of a data
/// area between byte counters `tail` and `head`, each with its ring byte
/// counter, checked for framing (alignment, size) but not decoded.
pub fn split_records(data: &[u8], tail: u64, head: u64) -> Result<Vec<(u64, &[u8])>, AbiError> {
    let data_size = data.len() as u64;
    let mut records = Vec::new();
    let mut at = tail;
    while at < head {
        let offset = at % data_size;
        let record_at = at;
        let bad = move |problem: String| AbiError::BadRecord {
            at: record_at,
            offset,
            problem,
        };
        if at & u64::from(EVENT_ALIGN - 1) != 0 {
            return Err(bad(format!("not {EVENT_ALIGN}-byte aligned")));
        }
        let room = (data_size - offset).min(head - at);
        if room < 8 {
            return Err(bad(format!("only {room} bytes left for a record header")));
        }
        let bytes = &data[offset as usize..(offset + room) as usize];
        let event_type = u16::from_le_bytes([bytes[0], bytes[1]]);
        let size = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if size < 8 || size & (EVENT_ALIGN - 1) != 0 || u64::from(size) > room {
            return Err(bad(format!(
                "size {size} (type {event_type}) is not a multiple of {EVENT_ALIGN} between 8 and the {room} bytes left"
            )));
        }
        at += u64::from(size);
        if event_type == EVENT_PAD {
            if offset + u64::from(size) != data_size {
                return Err(bad(format!(
                    "pad of {size} bytes does not end at the end of the data area"
                )));
            }
            continue;
        }
        records.push((record_at, &bytes[..size as usize]));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_events() -> Vec<Event> {
        let mut regs = UserRegs {
            orig_ax: 39,
            ip: 0x401000,
            sp: 0x7ffc_0000,
            ..UserRegs::default()
        };
        regs.cx = regs.ip;
        vec![
            Event {
                cpu: 0,
                seq: 0,
                body: EventBody::Syscall(SyscallEvent {
                    regs,
                    fs_base: 0x4c_0000,
                    cr3: 0x1234000,
                    ..Default::default()
                }),
            },
            Event {
                cpu: 1,
                seq: 1,
                body: EventBody::CopyFromUser {
                    info: UserCopyEvent {
                        user_addr: 0x7ffc_1000,
                        kernel_addr: 0xffff_8880_0000_1000,
                        requested: 5,
                        data_len: 5,
                        ..Default::default()
                    },
                    data: b"hello".to_vec(),
                },
            },
            Event {
                cpu: 0,
                seq: 2,
                body: EventBody::Rdtsc(RdtscEvent {
                    value: 123_456_789,
                    ..Default::default()
                }),
            },
            Event {
                cpu: 0,
                seq: 3,
                body: EventBody::GetUser(GetUserEvent {
                    user_addr: 0x1000,
                    value: 7,
                    size: 4,
                    err: 0,
                    cr3: 0x100_0000,
                }),
            },
            Event {
                cpu: 0,
                seq: 4,
                body: EventBody::SharedRead {
                    info: SharedReadEvent {
                        kernel_addr: 0xffff_8880_0123_4000,
                        data_len: 64,
                        source: SHARED_IO_URING_SQE,
                        cr3: 0x100_0000,
                    },
                    data: (0..64).collect(),
                },
            },
        ]
    }

    /// Builds a ring region holding `events` starting at byte counter `start`.
    fn ring_with(events: &[Event], data_size: u64, start: u64) -> Vec<u8> {
        let mut header =
            RingHeader::new(u64::from(RING_HEADER_SIZE) + data_size, CONTROL_RECORD).unwrap();
        assert_eq!(header.data_size, data_size);
        let mut region = vec![0u8; (u64::from(RING_HEADER_SIZE) + data_size) as usize];
        let mut at = start;
        for event in events {
            let bytes = encode_event(event);
            let offset = at % data_size;
            if offset + bytes.len() as u64 > data_size {
                let pad = (data_size - offset) as u32;
                let base = (u64::from(RING_HEADER_SIZE) + offset) as usize;
                region[base..base + 2].copy_from_slice(&EVENT_PAD.to_le_bytes());
                region[base + 4..base + 8].copy_from_slice(&pad.to_le_bytes());
                at += u64::from(pad);
            }
            let base = (u64::from(RING_HEADER_SIZE) + at % data_size) as usize;
            region[base..base + bytes.len()].copy_from_slice(&bytes);
            at += bytes.len() as u64;
        }
        header.tail = start;
        header.head = at;
        region[..size_of::<RingHeader>()].copy_from_slice(&header.to_bytes());
        region
    }

    #[test]
    fn round_trip_with_wrap_and_pad() {
        let events = sample_events();
        // Start near the end of the data area so a record must be preceded
        // by a pad and the next ones wrap to offset 0.
        let region = ring_with(&events, MIN_DATA_SIZE, MIN_DATA_SIZE * 3 - 112);
        let contents = parse_ring(&region).unwrap();
        assert_eq!(contents.events, events);
        assert_eq!(contents.counts().get(&EVENT_SYSCALL), Some(&1));
    }

    #[test]
    fn bad_magic_version_and_overrun_are_named() {
        let events = sample_events();
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        region[0] ^= 0xff;
        assert!(matches!(
            parse_ring(&region),
            Err(AbiError::BadMagic { .. })
        ));
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        region[8] = 9;
        assert_eq!(parse_ring(&region), Err(AbiError::BadVersion { found: 9 }));
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        let mut header = RingHeader::read_from(&region).unwrap();
        header.head = header.tail + MIN_DATA_SIZE + 8;
        region[..256].copy_from_slice(&header.to_bytes());
        assert_eq!(
            parse_ring(&region),
            Err(AbiError::Overrun {
                used: MIN_DATA_SIZE + 8,
                data_size: MIN_DATA_SIZE
            })
        );
    }

    #[test]
    fn corrupt_record_is_reported_with_position() {
        let events = sample_events();
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        let second = encode_event(&events[0]).len();
        // Break the second record's size field.
        let base = RING_HEADER_SIZE as usize + second + 4;
        region[base..base + 4].copy_from_slice(&3u32.to_le_bytes());
        match parse_ring(&region) {
            Err(AbiError::BadRecord {
                at,
                offset,
                problem,
            }) => {
                assert_eq!(at, second as u64);
                assert_eq!(offset, second as u64);
                assert!(problem.contains("size 3"), "{problem}");
            }
            other => panic!("expected BadRecord, got {other:?}"),
        }
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        region[RING_HEADER_SIZE as usize] = 0x77;
        let err = parse_ring(&region).unwrap_err().to_string();
        assert!(err.contains("unknown event type 119"), "{err}");
    }

    /// A shared read whose data runs past its record, or claims more than
    /// one record may hold, is an error that says so, not a short write.
    #[test]
    fn a_truncated_shared_read_is_named() {
        let event = sample_events().pop().unwrap();
        let mut record = encode_event(&event);
        assert_eq!(decode_record(&record), Ok(event));
        let header = size_of::<EventHeader>();
        let data_len = header + offset_of!(SharedReadEvent, data_len);
        record[data_len..data_len + 4].copy_from_slice(&72u32.to_le_bytes());
        let err = decode_record(&record).unwrap_err().to_string();
        assert!(err.contains("shared_read data_len 72 runs past"), "{err}");
        record[data_len..data_len + 4].copy_from_slice(&(MAX_DATA_PER_EVENT + 8).to_le_bytes());
        let err = decode_record(&record).unwrap_err().to_string();
        assert!(err.contains("exceeds MAX_DATA_PER_EVENT"), "{err}");
        // Shorter than its fixed payload: the header's size says so first,
        // then the payload check.
        let short = header + size_of::<SharedReadEvent>() - 8;
        let mut cut = record[..short].to_vec();
        cut[4..8].copy_from_slice(&(short as u32).to_le_bytes());
        let err = decode_record(&cut).unwrap_err().to_string();
        assert!(err.contains("shared_read record has"), "{err}");
    }

    #[test]
    fn drain_consumes_then_finds_nothing() {
        let events = sample_events();
        let mut region = ring_with(&events, MIN_DATA_SIZE, 40);
        assert_eq!(drain(&mut region).unwrap().events, events);
        let again = drain(&mut region).unwrap();
        assert!(again.events.is_empty());
        assert_eq!(again.header.tail, again.header.head);
        assert_eq!(
            kernel_cmdline(0x1c00_0000, 0x10_1000, true),
            "memmap=0x101000$0x1c000000 krr.ring=0x101000@0x1c000000"
        );
    }

    #[test]
    fn agent_presence_and_doorbells() {
        let mut h = RingHeader::new(1 << 20, 0).unwrap();
        let absent = h.check_agent().unwrap_err().to_string();
        assert!(absent.contains("KRR agent not found"), "{absent}");
        h.agent_state = AGENT_STATE_REFUSED;
        h.agent_abi_version = 7;
        assert_eq!(
            h.check_agent(),
            Err(AbiError::AgentRefused {
                agent_abi_version: 7
            })
        );
        h.agent_state = AGENT_STATE_READY;
        assert_eq!(h.check_agent(), Ok(()));
        assert_eq!(Doorbell::from_value(DOORBELL_FULL), Some(Doorbell::Full));
        assert!(Doorbell::from_value(DOORBELL_HIGH_WATER)
            .unwrap()
            .wants_drain());
        assert!(!Doorbell::from_value(DOORBELL_GUEST_START)
            .unwrap()
            .wants_drain());
        assert_eq!(Doorbell::from_value(0), None);
    }

    #[test]
    fn header_new_rejects_bad_sizes() {
        assert!(
            RingHeader::new(4096 + MIN_DATA_SIZE - 4096, 0).is_err(),
            "data area too small"
        );
        assert!(
            RingHeader::new(4096 + MIN_DATA_SIZE + 1, 0).is_err(),
            "not page aligned"
        );
        let h = RingHeader::new(1 << 20, 0).unwrap();
        assert_eq!(
            h.data_size,
            1 << 19,
            "largest power of two after the header page"
        );
        assert_eq!(h.high_water, 3 << 17);
        assert_eq!(h.validate(1 << 20).unwrap().header_size, 4096);
        assert!(
            h.validate(4096 + 1000).is_err(),
            "region shorter than header + data"
        );
    }
}
