// SPDX-License-Identifier: GPL-2.0-or-later
//! Agent events: their decoded form ([`Event`], [`EventBody`]) and the
//! decoding and encoding of one record.

use super::*;
use std::fmt;
use std::mem::size_of;

/// One decoded agent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    Syscall(SyscallEvent),
    CopyFromUser {
        info: UserCopyEvent,
        data: Vec<u8>,
    },
    StrncpyFromUser {
        info: UserStringEvent,
        data: Vec<u8>,
    },
    StrnlenUser {
        info: UserStringEvent,
        data: Vec<u8>,
    },
    GetUser(GetUserEvent),
    Rdtsc(RdtscEvent),
    Random {
        info: RandomEvent,
        data: Vec<u8>,
    },
    Rdrand(RdrandEvent),
    PteRead(PteReadEvent),
    SharedRead {
        info: SharedReadEvent,
        data: Vec<u8>,
    },
    ExecLock(ExecLockEvent),
    Lost(LostEvent),
}

impl EventBody {
    /// The EVENT_* code.
    pub fn event_type(&self) -> u16 {
        match self {
            EventBody::Syscall(_) => EVENT_SYSCALL,
            EventBody::CopyFromUser { .. } => EVENT_COPY_FROM_USER,
            EventBody::StrncpyFromUser { .. } => EVENT_STRNCPY_FROM_USER,
            EventBody::StrnlenUser { .. } => EVENT_STRNLEN_USER,
            EventBody::GetUser(_) => EVENT_GET_USER,
            EventBody::Rdtsc(_) => EVENT_RDTSC,
            EventBody::Random { .. } => EVENT_RANDOM,
            EventBody::Rdrand(_) => EVENT_RDRAND,
            EventBody::PteRead(_) => EVENT_PTE_READ,
            EventBody::SharedRead { .. } => EVENT_SHARED_READ,
            EventBody::ExecLock(_) => EVENT_EXEC_LOCK,
            EventBody::Lost(_) => EVENT_LOST,
        }
    }
}

/// Short name of an EVENT_* code, as `krr log stats` prints it.
pub fn event_type_name(event_type: u16) -> &'static str {
    match event_type {
        EVENT_PAD => "pad",
        EVENT_SYSCALL => "syscall",
        EVENT_COPY_FROM_USER => "copy_from_user",
        EVENT_STRNCPY_FROM_USER => "strncpy_from_user",
        EVENT_STRNLEN_USER => "strnlen_user",
        EVENT_GET_USER => "get_user",
        EVENT_RDTSC => "rdtsc",
        EVENT_RANDOM => "random",
        EVENT_RDRAND => "rdrand",
        EVENT_PTE_READ => "pte_read",
        EVENT_SHARED_READ => "shared_read",
        EVENT_EXEC_LOCK => "exec_lock",
        EVENT_LOST => "lost",
        _ => "unknown",
    }
}

/// One agent event with its common header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub cpu: u16,
    pub seq: u64,
    pub body: EventBody,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} cpu{} ", self.seq, self.cpu)?;
        match &self.body {
            EventBody::Syscall(s) => write!(
                f,
                "syscall nr={} rip={:#x} rsp={:#x} fs={:#x} cr3={:#x}",
                s.regs.orig_ax, s.regs.ip, s.regs.sp, s.fs_base, s.cr3
            ),
            EventBody::CopyFromUser { info, data } => write!(
                f,
                "copy_from_user {:#x} -> {:#x} len={} not_copied={} offset={} bytes={}",
                info.user_addr,
                info.kernel_addr,
                info.requested,
                info.not_copied,
                info.offset,
                data.len()
            ),
            EventBody::StrncpyFromUser { info, data } => write!(
                f,
                "strncpy_from_user {:#x} limit={} result={} {:?}",
                info.user_addr,
                info.limit,
                info.result,
                String::from_utf8_lossy(data)
            ),
            EventBody::StrnlenUser { info, data } => {
                write!(
                    f,
                    "strnlen_user {:#x} limit={} result={} {:?}",
                    info.user_addr,
                    info.limit,
                    info.result,
                    String::from_utf8_lossy(data)
                )
            }
            EventBody::GetUser(g) => write!(
                f,
                "get_user {:#x} size={} value={:#x} err={}",
                g.user_addr, g.size, g.value, g.err
            ),
            EventBody::Rdtsc(t) => write!(f, "rdtsc insn={} value={}", t.insn, t.value),
            EventBody::Random { info, data } => {
                write!(f, "random source={} bytes={}", info.source, data.len())
            }
            EventBody::Rdrand(r) => {
                write!(f, "rdrand insn={} ok={} value={:#x}", r.insn, r.ok, r.value)
            }
            EventBody::PteRead(p) => {
                write!(
                    f,
                    "pte_read {:#x} level={} pte={:#x}",
                    p.user_addr, p.level, p.pte
                )
            }
            EventBody::SharedRead { info, data } => {
                write!(
                    f,
                    "shared_read {:#x} source={} bytes={}",
                    info.kernel_addr,
                    info.source,
                    data.len()
                )?;
                // A ring word (the common case) is shown with its value.
                match <[u8; 4]>::try_from(data.as_slice()) {
                    Ok(word) => write!(f, " value={:#x}", u32::from_le_bytes(word)),
                    Err(_) => Ok(()),
                }
            }
            EventBody::ExecLock(l) => write!(
                f,
                "exec_lock #{} reason={} previous_cpu={}",
                l.acquisition, l.reason, l.previous_cpu
            ),
            EventBody::Lost(l) => write!(f, "LOST {} events ({} bytes)", l.events, l.bytes),
        }
    }
}

/// Decodes one record (as [`split_records`] returns it, or as a recording
/// stores it). Errors are [`AbiError::BadRecord`] at position 0.
pub fn decode_record(record: &[u8]) -> Result<Event, AbiError> {
    let bad = |problem: String| AbiError::BadRecord {
        at: 0,
        offset: 0,
        problem,
    };
    let header = EventHeader::read_from(record).ok_or_else(|| {
        bad(format!(
            "{} bytes are smaller than the event header",
            record.len()
        ))
    })?;
    if header.size as usize != record.len() {
        return Err(bad(format!(
            "header size {} but the record is {} bytes",
            header.size,
            record.len()
        )));
    }
    let body = decode_body(header.event_type, &record[size_of::<EventHeader>()..]).map_err(bad)?;
    Ok(Event {
        cpu: header.cpu,
        seq: header.seq,
        body,
    })
}

fn payload<T>(bytes: &[u8], read: fn(&[u8]) -> Option<T>, name: &str) -> Result<T, String> {
    read(bytes).ok_or_else(|| {
        format!(
            "{name} record has {} payload bytes, needs {}",
            bytes.len(),
            size_of::<T>()
        )
    })
}

fn trailing(bytes: &[u8], fixed: usize, data_len: u32, name: &str) -> Result<Vec<u8>, String> {
    let data_len = data_len as usize;
    if data_len > MAX_DATA_PER_EVENT as usize {
        return Err(format!(
            "{name} data_len {data_len} exceeds MAX_DATA_PER_EVENT {MAX_DATA_PER_EVENT}"
        ));
    }
    bytes
        .get(fixed..fixed + data_len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            format!(
                "{name} data_len {data_len} runs past the record ({} payload bytes)",
                bytes.len()
            )
        })
}

fn decode_body(event_type: u16, bytes: &[u8]) -> Result<EventBody, String> {
    Ok(match event_type {
        EVENT_SYSCALL => EventBody::Syscall(payload(bytes, SyscallEvent::read_from, "syscall")?),
        EVENT_COPY_FROM_USER => {
            let info = payload(bytes, UserCopyEvent::read_from, "copy_from_user")?;
            let data = trailing(
                bytes,
                size_of::<UserCopyEvent>(),
                info.data_len,
                "copy_from_user",
            )?;
            EventBody::CopyFromUser { info, data }
        }
        EVENT_STRNCPY_FROM_USER => {
            let info = payload(bytes, UserStringEvent::read_from, "strncpy_from_user")?;
            let data = trailing(
                bytes,
                size_of::<UserStringEvent>(),
                info.data_len,
                "strncpy_from_user",
            )?;
            EventBody::StrncpyFromUser { info, data }
        }
        EVENT_STRNLEN_USER => {
            let info = payload(bytes, UserStringEvent::read_from, "strnlen_user")?;
            let data = trailing(
                bytes,
                size_of::<UserStringEvent>(),
                info.data_len,
                "strnlen_user",
            )?;
            EventBody::StrnlenUser { info, data }
        }
        EVENT_GET_USER => EventBody::GetUser(payload(bytes, GetUserEvent::read_from, "get_user")?),
        EVENT_RDTSC => EventBody::Rdtsc(payload(bytes, RdtscEvent::read_from, "rdtsc")?),
        EVENT_RANDOM => {
            let info = payload(bytes, RandomEvent::read_from, "random")?;
            let data = trailing(bytes, size_of::<RandomEvent>(), info.data_len, "random")?;
            EventBody::Random { info, data }
        }
        EVENT_RDRAND => EventBody::Rdrand(payload(bytes, RdrandEvent::read_from, "rdrand")?),
        EVENT_PTE_READ => EventBody::PteRead(payload(bytes, PteReadEvent::read_from, "pte_read")?),
        EVENT_SHARED_READ => {
            let info = payload(bytes, SharedReadEvent::read_from, "shared_read")?;
            let data = trailing(
                bytes,
                size_of::<SharedReadEvent>(),
                info.data_len,
                "shared_read",
            )?;
            EventBody::SharedRead { info, data }
        }
        EVENT_EXEC_LOCK => {
            EventBody::ExecLock(payload(bytes, ExecLockEvent::read_from, "exec_lock")?)
        }
        EVENT_LOST => EventBody::Lost(payload(bytes, LostEvent::read_from, "lost")?),
        other => return Err(format!("unknown event type {other}")),
    })
}

/// Encodes one event as the agent writes it (header, payload, data, zero
/// padding to EVENT_ALIGN). The agent is the real producer; this is for tests
/// and for tools that build rings.
pub fn encode_event(event: &Event) -> Vec<u8> {
    let (payload, data): (Vec<u8>, &[u8]) = match &event.body {
        EventBody::Syscall(p) => (p.to_bytes(), &[]),
        EventBody::CopyFromUser { info, data } => (info.to_bytes(), data),
        EventBody::StrncpyFromUser { info, data } => (info.to_bytes(), data),
        EventBody::StrnlenUser { info, data } => (info.to_bytes(), data),
        EventBody::GetUser(p) => (p.to_bytes(), &[]),
        EventBody::Rdtsc(p) => (p.to_bytes(), &[]),
        EventBody::Random { info, data } => (info.to_bytes(), data),
        EventBody::Rdrand(p) => (p.to_bytes(), &[]),
        EventBody::PteRead(p) => (p.to_bytes(), &[]),
        EventBody::SharedRead { info, data } => (info.to_bytes(), data),
        EventBody::ExecLock(p) => (p.to_bytes(), &[]),
        EventBody::Lost(p) => (p.to_bytes(), &[]),
    };
    let unpadded = size_of::<EventHeader>() + payload.len() + data.len();
    let size = unpadded.next_multiple_of(EVENT_ALIGN as usize);
    let header = EventHeader {
        event_type: event.body.event_type(),
        cpu: event.cpu,
        size: size as u32,
        seq: event.seq,
    };
    let mut out = header.to_bytes();
    out.extend_from_slice(&payload);
    out.extend_from_slice(data);
    out.resize(size, 0);
    out
}
