// SPDX-License-Identifier: GPL-2.0-or-later
//! The recording's event stream: what the engine writes to `events.krrlog`
//! (see [`super::log`] for the chunk container and [`super::recording`] for
//! the directory around it).
//!
//! One [`LogEvent`] per input that enters the guest kernel, in the order the
//! engine saw it. Agent events are kept as the agent wrote them (its ring
//! record, [`super::abi`]), so the ABI stays the one definition of their
//! layout; engine events carry the [`Position`] at which they happened on
//! their vCPU.
//!
//! Encoding: each event is one `postcard` value (varint integers), events
//! are concatenated inside a chunk's payload. Appending variants at the end
//! of [`LogEvent`] keeps old logs readable; anything else bumps
//! [`super::log::FORMAT_VERSION`].

use super::abi;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where on its vCPU an engine event happened (see the type's documentation
/// for what the count means on each backend).
pub use krr_hypervisor::Position;

/// The general-purpose registers at an event (the machine model's
/// register set), for replay's checks.
pub use krr_hypervisor::Regs as GprSnapshot;

/// An external interrupt's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InterruptKind {
    /// A maskable interrupt from the LAPIC or the PIC with this vector.
    External,
    /// NMI (vector 2).
    Nmi,
}

/// One entry of the event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEvent {
    /// A record of the guest agent's ring, byte for byte (header included),
    /// as drained; decode with [`abi::parse_records`]-style parsing via
    /// [`LogEvent::agent_event`].
    Agent { record: Vec<u8> },
    /// The engine injected an external interrupt or NMI before the
    /// instruction at `at`; `regs` are the registers just before delivery.
    Interrupt {
        cpu: u16,
        at: Position,
        kind: InterruptKind,
        vector: u8,
        regs: GprSnapshot,
        /// The agent's `next_seq` then: agent events from here on happened
        /// after this entry.
        agent_seq: u64,
    },
    /// The CPU raised an exception (or executed INT n) at `at` and
    /// delivered it through the guest IDT. `from_user`: taken at CPL 3 (a
    /// kernel entry replay must recreate).
    Exception {
        cpu: u16,
        at: Position,
        vector: u8,
        error_code: Option<u32>,
        /// The exception's payload: CR2 for page faults, DR6 for debug
        /// exceptions (recordings before December 2026 have none for #DB).
        cr2: Option<u64>,
        software: bool,
        from_user: bool,
        /// The registers at the exception, for exceptions from user mode.
        regs: Option<GprSnapshot>,
        agent_seq: u64,
    },
    /// A port read (`in`) and the value the device returned.
    PioRead {
        cpu: u16,
        at: Position,
        port: u16,
        size: u8,
        value: u32,
    },
    /// An MMIO read and the value the device returned.
    MmioRead {
        cpu: u16,
        at: Position,
        addr: u64,
        size: u8,
        value: u64,
    },
    /// RDTSC/RDTSCP executed by the guest (kernel or user) and its value.
    Rdtsc { cpu: u16, at: Position, value: u64 },
    /// A device wrote guest memory (virtio DMA) during the access at `at`;
    /// the bytes are in `dma.krrlog` at byte offset `dma_offset`.
    Dma {
        cpu: u16,
        at: Position,
        gpa: u64,
        len: u32,
        dma_offset: u64,
    },
    /// The agent rang the doorbell at `at` with `reason` (a
    /// `abi::DOORBELL_*` value); the engine then set the ring's `tail` to
    /// `tail` (replay reproduces that write at the same point).
    Doorbell {
        cpu: u16,
        at: Position,
        reason: u32,
        tail: u64,
    },
    /// A checkpoint taken between two vCPU runs (every vCPU stopped) with
    /// vCPU `cpu` stopped in the kernel at `at` (`krr record
    /// --checkpoint-every`): its registers and the sha256 of the kernel
    /// kernel's data and bss, read through the vCPU's page tables (see
    /// [`crate::checkpoint::KernelImage::digest`]), for replay's
    /// divergence checks between events.
    Checkpoint {
        cpu: u16,
        at: Position,
        regs: GprSnapshot,
        sha256: [u8; 32],
    },
    /// Console bytes the guest wrote (serial THR), in the order written.
    Console { cpu: u16, bytes: Vec<u8> },
    /// A syscall entry recorded by the engine (the software CPU performs
    /// SYSCALL itself): the user's registers at the SYSCALL instruction
    /// (`regs.rip` is its address) and segment bases. With these the agent
    /// records no syscall event (`abi::CONTROL_ENGINE_SYSCALLS`).
    Syscall {
        cpu: u16,
        at: Position,
        regs: GprSnapshot,
        fs_base: u64,
        gs_base: u64,
        agent_seq: u64,
    },
    /// On machines of several vCPUs: vCPU `cpu` ran from its previous
    /// position to `at` and stopped there (the end of its turn in the
    /// engine's round-robin; the software CPU runs one vCPU at a time).
    /// Every event between the previous `Slice` and this one happened on
    /// `cpu`, so the slices are the global order in which the vCPUs
    /// executed, and replay runs the same slices in the same order.
    /// `agent_seq`: the agent's next sequence number then.
    Slice {
        cpu: u16,
        at: Position,
        agent_seq: u64,
    },
    /// vCPU `cpu` left wait-for-SIPI: a startup IPI with `vector` started it
    /// in real mode at `vector * 4096`.
    Startup { cpu: u16, vector: u8 },
}

/// Stable names of the event classes, as `krr log stats` prints them
/// (agent events by their ABI type name).
pub const ENGINE_CLASSES: &[&str] = &[
    "interrupt",
    "exception",
    "pio_read",
    "mmio_read",
    "rdtsc_engine",
    "dma",
    "doorbell",
    "checkpoint",
    "console",
    "slice",
    "startup",
];

impl LogEvent {
    /// The class name for statistics: agent events by their ABI type
    /// (`syscall`, `copy_from_user`, ...), engine events by variant.
    pub fn class(&self) -> &'static str {
        match self {
            LogEvent::Agent { record } => {
                let t = record
                    .get(0..2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .unwrap_or(abi::EVENT_INVALID);
                abi::event_type_name(t)
            }
            LogEvent::Interrupt { .. } => "interrupt",
            LogEvent::Exception { .. } => "exception",
            LogEvent::PioRead { .. } => "pio_read",
            LogEvent::MmioRead { .. } => "mmio_read",
            LogEvent::Rdtsc { .. } => "rdtsc_engine",
            LogEvent::Dma { .. } => "dma",
            LogEvent::Doorbell { .. } => "doorbell",
            LogEvent::Checkpoint { .. } => "checkpoint",
            LogEvent::Console { .. } => "console",
            LogEvent::Syscall { .. } => "syscall",
            LogEvent::Slice { .. } => "slice",
            LogEvent::Startup { .. } => "startup",
        }
    }

    /// The vCPU the event belongs to.
    pub fn cpu(&self) -> u16 {
        match self {
            LogEvent::Agent { record } => record
                .get(2..4)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .unwrap_or(0),
            LogEvent::Interrupt { cpu, .. }
            | LogEvent::Exception { cpu, .. }
            | LogEvent::PioRead { cpu, .. }
            | LogEvent::MmioRead { cpu, .. }
            | LogEvent::Rdtsc { cpu, .. }
            | LogEvent::Dma { cpu, .. }
            | LogEvent::Doorbell { cpu, .. }
            | LogEvent::Checkpoint { cpu, .. }
            | LogEvent::Console { cpu, .. }
            | LogEvent::Syscall { cpu, .. }
            | LogEvent::Slice { cpu, .. }
            | LogEvent::Startup { cpu, .. } => *cpu,
        }
    }

    /// The decoded agent event of an [`LogEvent::Agent`] record.
    pub fn agent_event(&self) -> Option<Result<abi::Event, abi::AbiError>> {
        match self {
            LogEvent::Agent { record } => Some(abi::decode_record(record)),
            _ => None,
        }
    }
}

impl fmt::Display for LogEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogEvent::Agent { record } => match abi::decode_record(record) {
                Ok(e) => write!(f, "agent {e}"),
                Err(e) => write!(f, "agent <undecodable record: {e}>"),
            },
            LogEvent::Interrupt {
                cpu,
                at,
                kind,
                vector,
                regs,
                ..
            } => write!(
                f,
                "cpu{cpu} {at} interrupt {kind:?} vector={vector:#x} rflags={:#x} rsp={:#x}",
                regs.rflags, regs.rsp
            ),
            LogEvent::Exception {
                cpu,
                at,
                vector,
                error_code,
                cr2,
                software,
                from_user,
                ..
            } => {
                write!(
                    f,
                    "cpu{cpu} {at} exception vector={vector}{}{}{}{}",
                    error_code
                        .map(|e| format!(" error={e:#x}"))
                        .unwrap_or_default(),
                    cr2.map(|c| {
                        let name = if *vector == 1 { "dr6" } else { "cr2" };
                        format!(" {name}={c:#x}")
                    })
                    .unwrap_or_default(),
                    if *software { " software" } else { "" },
                    if *from_user { " from-user" } else { "" }
                )
            }
            LogEvent::PioRead {
                cpu,
                at,
                port,
                size,
                value,
            } => write!(f, "cpu{cpu} {at} in{size} port={port:#x} -> {value:#x}"),
            LogEvent::MmioRead {
                cpu,
                at,
                addr,
                size,
                value,
            } => write!(f, "cpu{cpu} {at} mmio-read{size} {addr:#x} -> {value:#x}"),
            LogEvent::Rdtsc { cpu, at, value } => write!(f, "cpu{cpu} {at} rdtsc -> {value}"),
            LogEvent::Dma {
                cpu,
                at,
                gpa,
                len,
                dma_offset,
            } => write!(
                f,
                "cpu{cpu} {at} dma {len} bytes -> {gpa:#x} (dma log offset {dma_offset})"
            ),
            LogEvent::Doorbell {
                cpu,
                at,
                reason,
                tail,
            } => {
                let name = abi::Doorbell::from_value(*reason)
                    .map(|d| format!("{d:?}"))
                    .unwrap_or_else(|| format!("unknown({reason})"));
                write!(f, "cpu{cpu} {at} doorbell {name} tail={tail}")
            }
            LogEvent::Checkpoint {
                cpu,
                at,
                regs,
                sha256,
            } => {
                write!(f, "cpu{cpu} {at} checkpoint rsp={:#x} kernel-image-sha256=", regs.rsp)?;
                sha256.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            LogEvent::Slice { cpu, at, agent_seq } => {
                write!(f, "cpu{cpu} {at} cpl={} end of slice agent-seq={agent_seq}", at.cpl)
            }
            LogEvent::Startup { cpu, vector } => {
                write!(f, "cpu{cpu} startup IPI vector={vector:#x}")
            }
            LogEvent::Syscall {
                cpu,
                at,
                regs,
                fs_base,
                agent_seq,
                ..
            } => write!(
                f,
                "cpu{cpu} {at} syscall nr={} rdi={:#x} rsi={:#x} rdx={:#x} rsp={:#x} fs={fs_base:#x} agent-seq={agent_seq}",
                regs.rax, regs.rdi, regs.rsi, regs.rdx, regs.rsp
            ),
            LogEvent::Console { cpu, bytes } => {
                write!(f, "cpu{cpu} console {:?}", String::from_utf8_lossy(bytes))
            }
        }
    }
}
