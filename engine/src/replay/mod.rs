// SPDX-License-Identifier: GPL-2.0-or-later
//! Replay of a recording's kernel alone, on the software CPU.
//!
//! The start snapshot (memory, registers) is loaded into a fresh software
//! CPU with no devices; only kernel code runs. The engine's events are
//! consumed strictly in their recorded order, each where the kernel meets
//! it, and each is checked against what the replay does:
//!
//! - port/MMIO reads and RDTSC get the recorded values (kind, port or
//!   address, size and position must match);
//! - interrupts are injected at their recorded position (kernel instruction
//!   count and RIP), after comparing every general-purpose register;
//! - exceptions the kernel raises itself must be the recorded ones, at the
//!   recorded position;
//! - agent doorbells get the recorded `tail` write, virtio notifications
//!   the recorded DMA bytes;
//! - when the kernel returns to user mode, the next event must be a kernel
//!   entry from user mode (a syscall with the user's registers, an
//!   exception or an interrupt taken in user mode): the user's registers
//!   are set and the entry is performed; user code never runs. Before the
//!   entry, the user memory the kernel is about to read (the agent's
//!   copy_from_user / strncpy_from_user / get_user records of this kernel
//!   stint) is written at its user addresses, so the kernel reads what it
//!   read when recorded.
//!
//! Engine events made in user mode (RDTSC in the vDSO) are skipped. Console
//! output is collected and compared with the recorded output.
//!
//! The first mismatch stops the replay with a [`Divergence`]: the event's
//! index, what was expected and found, the RIP symbolized from `System.map`,
//! and the last events before it. A log that ends early (no `end.json`, a
//! truncated or damaged chunk) makes the replay end as [`ReplayEnd::LogEnded`],
//! never as success.
//!
//! Several vCPUs: the software CPU records them one at a time, and the log
//! marks where each vCPU's turn ended (`LogEvent::Slice`, with its kernel
//! instruction count). Replay runs the same vCPUs for the same stretches in
//! the same order, so kernel code on different vCPUs interleaves exactly as
//! it did, shared memory included (see [`Replayer::run`]).
//!
//! Checkpoints (`krr record --checkpoint-every`) are stops at a recorded
//! kernel instruction where the registers and a digest of the kernel's data
//! and bss are compared ([`crate::record::checkpoint`]).

pub mod paging;
pub mod symbols;

use crate::devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE};
use crate::devices::lapic::{LAPIC_BASE, LAPIC_SIZE};
use crate::devices::serial::COM1_BASE;
use crate::devices::virtio_mmio::VIRTIO_MMIO_WINDOW_SIZE;
use crate::hypervisor::{
    unicorn::UnicornVm, DeliveredException, Injection, IoBus, Position, UserEntry, Vcpu, Vm, VmExit,
};
use crate::machine::cpuid::{cpuid, CpuidConfig};
use crate::machine::platform::VIRTIO_BASE;
use crate::record::abi::{self, EventBody};
use crate::record::checkpoint::KernelImage;
use crate::record::event::{GprSnapshot, InterruptKind, LogEvent};
use crate::record::log::{DmaLogReader, EventLogReader};
use crate::record::recording::{self, CpuSnapshot, RecordingHeader};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;
use symbols::Symbols;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// What `krr replay` asks for.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Stop after this many events of the log (`None`: all).
    pub until_event: Option<u64>,
    /// Print the guest's console output as the replay produces it.
    pub echo_console: bool,
    /// Verify the recording's checkpoints at most once per this many
    /// kernel instructions (`None`: every one).
    pub verify_every: Option<u64>,
    /// A replay that consumes no event for this long is reported as
    /// stalled (`None`: [`DEFAULT_STALL_SECONDS`]).
    pub stall_seconds: Option<u64>,
}

/// Wall seconds without a consumed event after which a replay is stalled.
/// The longest stretches between events (a timer tick's 4 ms of kernel
/// code, a few million instructions) replay in well under a second.
pub const DEFAULT_STALL_SECONDS: u64 = 300;

/// Consecutive vCPU runs that neither consume an event nor retire a kernel
/// instruction before a replay is stalled.
const STALL_RUNS: u32 = 1000;

/// The first point where the replay did not do what the recording says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Divergence {
    /// Index of the event in events.krrlog.
    pub event: u64,
    pub expected: String,
    pub found: String,
    pub rip: String,
    pub kernel_icount: u64,
    /// The last events consumed before it.
    pub recent: Vec<String>,
}

impl Divergence {
    /// The report under another verdict than DIVERGED (a stall).
    pub fn with_verdict(&self, verdict: &str) -> String {
        let text = self.to_string();
        text.replacen("DIVERGED", verdict, 1)
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "DIVERGED at event #{} (kernel instruction {}), rip {}",
            self.event, self.kernel_icount, self.rip
        )?;
        writeln!(f, "  expected: {}", self.expected)?;
        writeln!(f, "  found:    {}", self.found)?;
        writeln!(f, "  events before it:")?;
        for e in &self.recent {
            writeln!(f, "    {e}")?;
        }
        Ok(())
    }
}

/// How a replay ended.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplayEnd {
    /// Every event of a complete recording was replayed and matched, and
    /// the kernel's console output equals the recorded one.
    Matched,
    /// `--until-event` reached, everything matched so far.
    StoppedAt {
        event: u64,
    },
    Diverged(Divergence),
    /// The replay stopped making progress: no event consumed and no kernel
    /// instruction retired over many runs, or no event consumed for
    /// [`ReplayOptions::stall_seconds`]. `found` describes the state it is
    /// stuck in.
    Stalled(Divergence),
    /// The log ends before the recording's end (killed recorder, truncated
    /// or damaged chunk): everything up to there matched, but this is not a
    /// complete replay.
    LogEnded {
        events: u64,
        why: String,
    },
    /// The recording cannot be replayed by this replayer.
    Unsupported {
        why: String,
    },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayReport {
    pub recording: PathBuf,
    pub end: ReplayEnd,
    /// Events of the log consumed.
    pub events: u64,
    /// Kernel entries from user mode performed (syscalls, exceptions,
    /// interrupts).
    pub kernel_entries: u64,
    pub kernel_instructions: u64,
    pub vcpus: usize,
    /// Checkpoints of the recording compared (registers), of those with
    /// the kernel's data+bss digest too, and checkpoints passed over
    /// (`--verify-every`).
    pub checkpoints_verified: u64,
    pub checkpoints_memory_verified: u64,
    pub checkpoints_skipped: u64,
    pub wall_seconds: f64,
    /// The recording's own wall time (end.json), for the ratio.
    pub recorded_wall_seconds: Option<f64>,
    /// Bytes of user memory written before kernel entries, and bytes that
    /// could not be (page not present then).
    pub user_bytes_written: u64,
    pub user_bytes_unmapped: u64,
    pub console_matches: bool,
    #[serde(skip)]
    pub console: Vec<u8>,
}

impl ReplayReport {
    /// 0 matched, 1 log ended early / stopped on request, 2 diverged, 3 unsupported.
    pub fn exit_code(&self) -> i32 {
        match self.end {
            ReplayEnd::Matched => 0,
            ReplayEnd::StoppedAt { .. } | ReplayEnd::LogEnded { .. } => 1,
            ReplayEnd::Diverged(_) | ReplayEnd::Stalled(_) => 2,
            ReplayEnd::Unsupported { .. } => 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Recording(#[from] recording::RecordingError),
    #[error(transparent)]
    Log(#[from] crate::record::log::LogError),
    #[error("{0}")]
    Setup(String),
}

/// The engine events, read in order, with the agent's records kept apart
/// (indexed by their sequence number).
struct EventSource {
    reader: EventLogReader,
    /// Engine events read ahead, with their log index.
    engine: VecDeque<(u64, LogEvent)>,
    /// Agent records read ahead, in seq order.
    agent: VecDeque<abi::Event>,
    /// Console bytes recorded, in order.
    console: Vec<u8>,
    exhausted: bool,
    /// Why the log ended, if not cleanly.
    broken: Option<String>,
    /// The last events consumed, for divergence reports.
    recent: VecDeque<String>,
    consumed: u64,
    /// The last [`Self::next_stop`] answer and the log index of the event
    /// that decided it: still the answer while that event is queued (a
    /// syscall storm has tens of thousands of events between two
    /// interrupts, and each entry asks again).
    next_stop_seen: Option<(u64, Option<u64>)>,
    /// Per vCPU, the log index and agent seq of its next kernel entry from
    /// user mode as last found by [`Self::cpu_next_entry_seq`]: still the
    /// answer while that event is queued.
    entry_seen: Vec<Option<(u64, u64)>>,
}

/// How many engine events [`EventSource::cpu_next_entry_seq`] reads ahead
/// for a vCPU's next kernel entry before giving up. A vCPU that was cut in
/// the middle of a user read resumes within the other vCPUs' next slices;
/// one that is idle (halted in the kernel) may not enter for the rest of the
/// log, and reading the whole log into memory for it would be absurd.
const ENTRY_LOOKAHEAD_EVENTS: usize = 4096;

impl EventSource {
    /// Reads one more event; false at the end of the log.
    fn read_one(&mut self) -> bool {
        if self.exhausted {
            return false;
        }
        match self.reader.next_event() {
            Ok(Some(read)) => {
                match read.event {
                    LogEvent::Agent { .. } => match read.event.agent_event() {
                        Some(Ok(e)) => self.agent.push_back(e),
                        Some(Err(e)) => {
                            self.broken = Some(format!("agent record #{}: {e}", read.index));
                            self.exhausted = true;
                        }
                        None => {}
                    },
                    LogEvent::Console { bytes, .. } => self.console.extend_from_slice(&bytes),
                    // User-mode RDTSC (the vDSO): user code does not run.
                    LogEvent::Rdtsc { at, .. } if at.cpl == 3 => {}
                    other => self.engine.push_back((read.index, other)),
                }
                true
            }
            Ok(None) => {
                self.exhausted = true;
                if let Some(end) = self.reader.end() {
                    if !matches!(end, crate::record::log::StreamEnd::Complete) {
                        self.broken = Some(format!("{end:?}"));
                    }
                }
                false
            }
            Err(e) => {
                self.exhausted = true;
                self.broken = Some(e.to_string());
                false
            }
        }
    }

    /// The next engine event, reading ahead as needed.
    fn peek(&mut self) -> Option<&(u64, LogEvent)> {
        while self.engine.is_empty() && self.read_one() {}
        self.engine.front()
    }

    fn pop(&mut self) -> Option<(u64, LogEvent)> {
        self.peek()?;
        let (i, e) = self.engine.pop_front()?;
        self.consumed = i + 1;
        if self.recent.len() == 8 {
            self.recent.pop_front();
        }
        self.recent.push_back(format!("#{i} {e}"));
        Some((i, e))
    }

    /// Agent records with `seq` below `end`, reading ahead until one at or
    /// past `end` was read (or the log ends). `None` when the log is cut
    /// (or damaged) before all of them: the stint cannot be replayed.
    ///
    /// Also (copied, left queued) the records of vCPU `cpu` from `end` up to
    /// its next kernel entry from user mode: a slice can end between a read
    /// of user memory and the agent's record of it, and the read must find
    /// the bytes. Writing them early is harmless (user code does not run in
    /// replay); the next stretch writes them again, after any other vCPU's.
    fn agent_before(&mut self, end: u64, cpu: usize) -> Option<Vec<abi::Event>> {
        let ahead_end = self.cpu_next_entry_seq(cpu).unwrap_or(end).max(end);
        while self.agent.back().is_none_or(|e| e.seq < ahead_end) && self.read_one() {}
        if self.broken.is_some()
            && self
                .agent
                .back()
                .is_none_or(|e| e.seq.saturating_add(1) < end)
        {
            return None;
        }
        let mut out = Vec::new();
        while self.agent.front().is_some_and(|e| e.seq < end) {
            out.extend(self.agent.pop_front());
        }
        out.extend(
            self.agent
                .iter()
                .take_while(|e| e.seq < ahead_end)
                .filter(|e| usize::from(e.cpu) == cpu)
                .cloned(),
        );
        Some(out)
    }

    /// The `agent_seq` of vCPU `cpu`'s next kernel entry from user mode
    /// (reading ahead at most [`ENTRY_LOOKAHEAD_EVENTS`]); `None` when
    /// there is none that close.
    fn cpu_next_entry_seq(&mut self, cpu: usize) -> Option<u64> {
        if self.entry_seen.len() <= cpu {
            self.entry_seen.resize(cpu + 1, None);
        }
        if let (Some((index, seq)), Some((front, _))) = (self.entry_seen[cpu], self.engine.front())
        {
            if *front <= index {
                return Some(seq);
            }
        }
        for i in 0..ENTRY_LOOKAHEAD_EVENTS {
            let e = self.ahead(i)?;
            if usize::from(e.cpu()) == cpu {
                if let Some(seq) = entry_seq(e) {
                    self.entry_seen[cpu] = Some((self.engine[i].0, seq));
                    return Some(seq);
                }
            }
        }
        None
    }

    /// The `i`-th queued engine event, reading ahead as needed.
    fn ahead(&mut self, i: usize) -> Option<&LogEvent> {
        while i >= self.engine.len() {
            if !self.read_one() {
                return None;
            }
        }
        Some(&self.engine[i].1)
    }

    /// The kernel instruction count where the running vCPU must stop next
    /// (reading ahead): an interrupt taken in the kernel, a checkpoint, or
    /// the end of its slice in the kernel. `None` when its slice ends in
    /// user mode first (the run stops there by itself) or the log ends.
    /// Kernel entries from user mode on the way do not matter: a run stops
    /// when the kernel returns to user mode anyway, and some of them (a
    /// fault on fetching the first user instruction) happen inside the run,
    /// by themselves.
    fn next_stop(&mut self) -> Option<u64> {
        if let (Some((decided_by, stop)), Some((front, _))) =
            (self.next_stop_seen, self.engine.front())
        {
            if *front <= decided_by {
                return stop;
            }
        }
        let mut i = 0;
        loop {
            let stop = match self.ahead(i)? {
                LogEvent::Interrupt { at, .. } | LogEvent::Checkpoint { at, .. } if at.cpl != 3 => {
                    Some(at.kernel_icount)
                }
                LogEvent::Slice { at, .. } => (at.cpl != 3).then_some(at.kernel_icount),
                _ => {
                    i += 1;
                    continue;
                }
            };
            self.next_stop_seen = Some((self.engine[i].0, stop));
            return stop;
        }
    }

    /// The `agent_seq` at the end of the coming stretch of kernel execution
    /// on one vCPU (reading ahead): at the next kernel entry from user
    /// mode or the end of the vCPU's slice; `u64::MAX` at the end of the
    /// log.
    fn next_boundary_seq(&mut self) -> u64 {
        let mut i = 0;
        loop {
            match self.ahead(i) {
                None => return u64::MAX,
                Some(LogEvent::Slice { agent_seq, .. }) => return *agent_seq,
                Some(e) => {
                    if let Some(seq) = entry_seq(e) {
                        return seq;
                    }
                }
            }
            i += 1;
        }
    }
}

/// The agent sequence number of a kernel entry from user mode.
fn entry_seq(e: &LogEvent) -> Option<u64> {
    match e {
        LogEvent::Syscall { agent_seq, .. } => Some(*agent_seq),
        LogEvent::Exception {
            from_user: true,
            agent_seq,
            ..
        } => Some(*agent_seq),
        LogEvent::Interrupt { at, agent_seq, .. } if at.cpl == 3 => Some(*agent_seq),
        _ => None,
    }
}

/// The bus of a replay: no devices, the log answers.
struct ReplayBus<'a> {
    src: &'a mut EventSource,
    mem: GuestMemoryMmap,
    dma: Option<DmaLogReader>,
    cpuid: CpuidConfig,
    ring_phys: Option<u64>,
    /// The vCPU running and where it is.
    cpu: usize,
    at: Position,
    /// The first mismatch; the vCPU is stopped at the next access.
    divergence: Option<(u64, String, String)>,
    /// Every event of the log was consumed and the kernel asked for more:
    /// the replay is at the recording's end (the guest was stopped there,
    /// e.g. by its reset, which replay does not carry out).
    log_end: bool,
    /// Guest-physical ranges DMA wrote (translated code to drop).
    dma_ranges: Vec<(u64, u64)>,
    /// Console bytes the replayed kernel wrote.
    console: Vec<u8>,
    serial_lcr: u8,
    echo: bool,
}

impl ReplayBus<'_> {
    fn diverge(&mut self, index: u64, expected: String, found: String) {
        if self.divergence.is_none() {
            self.divergence = Some((index, expected, found));
        }
    }

    /// Checks that the next event is a read of this kind and returns its
    /// value.
    fn read_value(&mut self, what: &str, matches: impl Fn(&LogEvent) -> Option<u64>) -> u64 {
        if self.divergence.is_some() {
            return 0;
        }
        let at = self.at;
        match self.src.pop() {
            Some((i, e)) => match matches(&e) {
                Some(_) if usize::from(e.cpu()) != self.cpu => {
                    self.diverge(i, format!("{e}"), format!("{what} on vCPU {}", self.cpu));
                    0
                }
                Some(v) => {
                    if let Some(rec) = position_of(&e) {
                        if rec.kernel_icount != at.kernel_icount {
                            self.diverge(
                                i,
                                format!("{e}"),
                                format!("{what} at kernel instruction {}", at.kernel_icount),
                            );
                        }
                    }
                    v
                }
                None => {
                    self.diverge(i, format!("{e}"), format!("{what} at {at}"));
                    0
                }
            },
            None => {
                self.log_end = true;
                0
            }
        }
    }
}

/// The position of an engine event, where it has one.
fn position_of(e: &LogEvent) -> Option<Position> {
    match e {
        LogEvent::Interrupt { at, .. }
        | LogEvent::Exception { at, .. }
        | LogEvent::PioRead { at, .. }
        | LogEvent::MmioRead { at, .. }
        | LogEvent::Rdtsc { at, .. }
        | LogEvent::Dma { at, .. }
        | LogEvent::Doorbell { at, .. }
        | LogEvent::Checkpoint { at, .. }
        | LogEvent::Slice { at, .. }
        | LogEvent::Syscall { at, .. } => Some(*at),
        LogEvent::Agent { .. } | LogEvent::Console { .. } | LogEvent::Startup { .. } => None,
    }
}

impl IoBus for ReplayBus<'_> {
    fn pio_read(&mut self, _vcpu: usize, port: u16, data: &mut [u8]) {
        let size = data.len() as u8;
        let v = self.read_value(&format!("in{size} port {port:#x}"), |e| match e {
            LogEvent::PioRead {
                port: p,
                size: s,
                value,
                ..
            } if *p == port && *s == size => Some(u64::from(*value)),
            _ => None,
        });
        let bytes = v.to_le_bytes();
        let n = data.len();
        data.copy_from_slice(&bytes[..n]);
    }

    fn pio_write(&mut self, _vcpu: usize, port: u16, data: &[u8]) {
        // The console: COM1's transmit register (LCR bit 7 selects the
        // divisor latch instead).
        if port == COM1_BASE + 3 {
            self.serial_lcr = data[0];
        } else if port == COM1_BASE && self.serial_lcr & 0x80 == 0 {
            self.console.push(data[0]);
            if self.echo {
                use std::io::Write;
                let _ = std::io::stdout().write_all(&data[..1]);
                let _ = std::io::stdout().flush();
            }
        } else if port == abi::DOORBELL_PORT && data.len() == 4 {
            let reason = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            if abi::Doorbell::from_value(reason).is_some_and(|d| d.wants_drain()) {
                let at = self.at;
                match self.src.pop() {
                    Some((
                        _,
                        LogEvent::Doorbell {
                            reason: r, tail, ..
                        },
                    )) if r == reason => {
                        if let Some(ring) = self.ring_phys {
                            let _ = self
                                .mem
                                .write_obj(tail, GuestAddress(ring + abi::TAIL_OFFSET as u64));
                        }
                    }
                    Some((i, e)) => {
                        self.diverge(i, format!("{e}"), format!("doorbell {reason} at {at}"))
                    }
                    None => self.log_end = true,
                }
            }
        }
    }

    fn mmio_read(&mut self, _vcpu: usize, addr: u64, data: &mut [u8]) {
        let size = data.len() as u8;
        let v = self.read_value(&format!("mmio-read{size} {addr:#x}"), |e| match e {
            LogEvent::MmioRead {
                addr: a,
                size: s,
                value,
                ..
            } if *a == addr && *s == size => Some(*value),
            _ => None,
        });
        let bytes = v.to_le_bytes();
        let n = data.len();
        data.copy_from_slice(&bytes[..n]);
    }

    fn mmio_write(&mut self, _vcpu: usize, _addr: u64, _data: &[u8]) {
        // DMA the device made during this access (a queue notification).
        while let Some((_, LogEvent::Dma { at, .. })) = self.src.peek() {
            if at.kernel_icount != self.at.kernel_icount || at.rip != self.at.rip {
                break;
            }
            let Some((
                i,
                LogEvent::Dma {
                    gpa,
                    len,
                    dma_offset,
                    ..
                },
            )) = self.src.pop()
            else {
                break;
            };
            let bytes = self.dma.as_mut().map(|d| d.read(dma_offset, len as usize));
            match bytes {
                Some(Ok(bytes)) => {
                    let _ = self.mem.write_slice(&bytes, GuestAddress(gpa));
                    self.dma_ranges.push((gpa, u64::from(len)));
                }
                _ => self.diverge(
                    i,
                    format!("DMA data at offset {dma_offset} of dma.krrlog"),
                    "no such data in the DMA log".into(),
                ),
            }
        }
    }

    fn stop_requested(&self) -> bool {
        self.divergence.is_some() || self.log_end
    }

    fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid(&self.cpuid, vcpu, leaf, subleaf)
    }

    fn rdtsc(&mut self, _vcpu: usize) -> u64 {
        self.read_value("rdtsc", |e| match e {
            LogEvent::Rdtsc { value, .. } => Some(*value),
            _ => None,
        })
    }

    fn position(&mut self, vcpu: usize, at: Position) {
        self.cpu = vcpu;
        self.at = at;
    }

    fn exception(&mut self, _vcpu: usize, at: Position, e: &DeliveredException) {
        if self.divergence.is_some() {
            return;
        }
        let found = format!(
            "exception vector {} (cpl {}){}{} at kernel instruction {} rip {:#x}",
            e.vector,
            e.cpl,
            e.error_code
                .map(|c| format!(" error={c:#x}"))
                .unwrap_or_default(),
            e.cr2.map(|c| format!(" cr2={c:#x}")).unwrap_or_default(),
            at.kernel_icount,
            at.rip
        );
        // An exception at CPL 3 without user code having run: the kernel
        // returned to a user page that is not present, and fetching its
        // first instruction faults, as it did when recorded (a kernel entry
        // the CPU makes by itself).
        match self.src.pop() {
            Some((
                _,
                LogEvent::Exception {
                    vector,
                    at: rec,
                    from_user,
                    cr2,
                    ..
                },
            )) if vector == e.vector
                && from_user == (e.cpl == 3)
                && cr2 == e.cr2
                && rec.kernel_icount == at.kernel_icount
                && rec.rip == at.rip => {}
            Some((i, other)) => self.diverge(i, format!("{other}"), found),
            None => self.log_end = true,
        }
    }

    fn syscall(&mut self, _vcpu: usize, at: Position, _entry: &UserEntry) {
        // The kernel itself never executes SYSCALL; user code does not run.
        self.diverge(
            self.src.consumed,
            "no SYSCALL executed in the replay".into(),
            format!("SYSCALL at {at}"),
        );
    }
}

/// A loaded recording, ready to replay.
pub struct Replayer {
    dir: PathBuf,
    header: RecordingHeader,
    cpus: Vec<CpuSnapshot>,
    // Field order matters for drop: vCPUs and VM before the memory.
    vcpus: Vec<Box<dyn Vcpu>>,
    vm: Box<dyn Vm>,
    mem: GuestMemoryMmap,
    symbols: Symbols,
    /// What checkpoints digest (`None`: no `System.map`, registers only).
    kernel_image: Option<KernelImage>,
    recorded_wall: Option<f64>,
    /// Kernel instructions each vCPU had retired when the recording ended
    /// (all instructions, for recordings made before end.json had kernel
    /// counts): no replayed kernel count can pass them, so a run without a
    /// stop target is bounded by them. A replay that goes astray ends as a
    /// divergence instead of running on, and the kernel's last stretch
    /// (after the last read it makes, e.g. a power-off delay loop polling
    /// the TSC) stops where the recording stopped.
    recorded_end_icounts: Vec<u64>,
    /// The vCPU whose triple fault ended the recording, if one did.
    recorded_triple_fault: Option<usize>,
    complete: bool,
}

/// Where each vCPU of a replay stands.
struct CpuProgress {
    /// In user mode: the kernel waits for the vCPU's next recorded entry.
    in_user: bool,
    /// The recording's kernel count at the snapshot (replay counts from 0).
    base_kernel: u64,
    /// An exception or interrupt from user mode was injected and is
    /// delivered by the vCPU's next run: until then it stands at the user
    /// instruction, not at the kernel's entry point.
    delivery_pending: bool,
}

impl Replayer {
    /// Loads the recording at `dir` (snapshot into a fresh software CPU).
    pub fn open(dir: &Path) -> Result<Replayer, ReplayError> {
        let header = recording::load_header(dir)?;
        let end = recording::load_end(dir)?;
        let cpus = recording::load_cpus(dir)?;
        if cpus.len() != header.vcpus || cpus.iter().enumerate().any(|(i, c)| c.id != i) {
            return Err(ReplayError::Setup(format!(
                "{}: the snapshot holds vCPUs {:?}; the header says {} vCPUs",
                dir.display(),
                cpus.iter().map(|c| c.id).collect::<Vec<_>>(),
                header.vcpus
            )));
        }
        let mem = crate::machine::create_memory(header.mem_bytes)
            .map_err(|e| ReplayError::Setup(e.to_string()))?;
        recording::load_memory_into(dir, &mem)?;
        let setup = |e: crate::hypervisor::HypervisorError| ReplayError::Setup(e.to_string());
        let mut vm: Box<dyn Vm> = Box::new(UnicornVm::new(&mem).map_err(setup)?);
        vm.add_mmio_region(LAPIC_BASE, LAPIC_SIZE).map_err(setup)?;
        vm.add_mmio_region(IOAPIC_BASE, IOAPIC_SIZE)
            .map_err(setup)?;
        if header.disk.is_some() {
            vm.add_mmio_region(VIRTIO_BASE, VIRTIO_MMIO_WINDOW_SIZE)
                .map_err(setup)?;
        }
        let mut vcpus = Vec::new();
        for cpu in &cpus {
            let mut vcpu = vm.create_vcpu(cpu.id).map_err(setup)?;
            vcpu.set_sregs(&cpu.sregs).map_err(setup)?;
            vcpu.set_regs(&cpu.regs).map_err(setup)?;
            vcpu.set_fpu(&crate::hypervisor::FpuState {
                xsave: cpu.fpu.clone(),
            })
            .map_err(setup)?;
            for &(msr, value) in &cpu.msrs {
                vcpu.set_msr(msr, value).map_err(setup)?;
            }
            vcpu.set_stop_at_user_mode(true).map_err(setup)?;
            vcpus.push(vcpu);
        }
        // The ring's control as it was while recording (the snapshot may
        // predate the engine setting it).
        if let (Some(ring), Some(control)) = (
            header.ring,
            header.machine.get("ring_control").and_then(|v| v.as_u64()),
        ) {
            mem.write_obj(
                control as u32,
                GuestAddress(ring.phys + abi::CONTROL_OFFSET as u64),
            )
            .map_err(|e| ReplayError::Setup(format!("ring control: {e}")))?;
        }
        let symbols = header
            .vmlinux
            .as_ref()
            .and_then(|v| Symbols::beside(Path::new(&v.path)))
            .or_else(|| Symbols::beside(Path::new(&header.kernel.path)))
            .unwrap_or_default();
        Ok(Replayer {
            dir: dir.to_path_buf(),
            complete: end.is_some(),
            recorded_wall: end.as_ref().map(|e| e.wall_seconds),
            // Recordings of log format 3 before the kernel counts were
            // added give only the total counts: a looser bound.
            recorded_end_icounts: end
                .as_ref()
                .map(|e| {
                    if e.kernel_instructions_per_vcpu.is_empty() {
                        e.instructions_per_vcpu.clone()
                    } else {
                        e.kernel_instructions_per_vcpu.clone()
                    }
                })
                .unwrap_or_default(),
            recorded_triple_fault: end.as_ref().and_then(|e| e.triple_fault_vcpu),
            kernel_image: KernelImage::from_symbols(&symbols),
            header,
            cpus,
            vcpus,
            vm,
            mem,
            symbols,
        })
    }

    /// Symbolizes `rip`.
    pub fn symbolize(&self, rip: u64) -> String {
        symbolize(&self.symbols, rip)
    }

    /// The RIP of vCPU `cpu` (0 where it cannot be read), for reports.
    fn rip(&self, cpu: usize) -> u64 {
        self.vcpus[cpu].regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Recreates the recorded kernel entry `event` from user mode on vCPU
    /// `cpu`: a SYSCALL from the user's registers, or an exception or
    /// interrupt delivered with the user's registers set (the delivery
    /// itself switches to the kernel).
    fn enter_kernel(&mut self, cpu: usize, event: &LogEvent) -> Result<(), String> {
        let vcpu = &mut self.vcpus[cpu];
        let err = |e: crate::hypervisor::HypervisorError| e.to_string();
        match event {
            LogEvent::Syscall {
                regs,
                fs_base,
                gs_base,
                ..
            } => vcpu
                .enter_syscall(&UserEntry {
                    regs: *regs,
                    fs_base: *fs_base,
                    gs_base: *gs_base,
                })
                .map_err(err),
            LogEvent::Exception {
                vector,
                error_code,
                cr2,
                software,
                regs,
                ..
            } => {
                let regs = regs.ok_or("the exception event has no user registers")?;
                vcpu.set_regs(&regs).map_err(err)?;
                // INT n: the registers are those after the instruction.
                let injection = if *software {
                    Injection::SoftwareInterrupt(*vector)
                } else {
                    Injection::Exception {
                        vector: *vector,
                        error_code: *error_code,
                        cr2: *cr2,
                    }
                };
                vcpu.inject(injection).map_err(err)
            }
            LogEvent::Interrupt {
                kind, vector, regs, ..
            } => {
                vcpu.set_regs(regs).map_err(err)?;
                vcpu.inject(interrupt_injection(*kind, *vector))
                    .map_err(err)
            }
            other => Err(format!("{other} is not a kernel entry from user mode")),
        }
    }

    /// Starts vCPU `cpu` as a startup IPI with `vector` did when recorded.
    fn start_ap(&mut self, cpu: usize, vector: u8) -> Result<(), String> {
        let (regs, sregs) = crate::machine::boot::real_mode_state(vector, LAPIC_BASE | (1 << 11));
        let vcpu = &mut self.vcpus[cpu];
        vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
        vcpu.set_regs(&regs).map_err(|e| e.to_string())
    }

    /// Compares vCPU `cpu`, stopped at a recorded checkpoint, with it:
    /// registers, then the kernel image digest. `None`: they match.
    fn check_checkpoint(
        &self,
        cpu: usize,
        regs: &GprSnapshot,
        sha256: &[u8; 32],
    ) -> Option<(String, String)> {
        let now = match self.vcpus[cpu].regs() {
            Ok(r) => r,
            Err(e) => return Some(("registers".into(), e.to_string())),
        };
        if now != *regs {
            return Some((
                format!("registers {regs:x?}"),
                format!("registers {now:x?}"),
            ));
        }
        let image = self.kernel_image.as_ref()?;
        let cr3 = match self.vcpus[cpu].sregs() {
            Ok(s) => s.cr3,
            Err(e) => return Some(("CR3".into(), e.to_string())),
        };
        let found = image.digest(&self.mem, cr3);
        (found != *sha256).then(|| {
            (
                format!("kernel data+bss sha256 {}", hex::encode(sha256)),
                format!("kernel data+bss sha256 {}", hex::encode(found)),
            )
        })
    }

    /// Writes the user memory the kernel read during the coming kernel
    /// stint (agent records), at its user addresses, in the address space
    /// each was read from (a stint can switch tasks: a parent's wait lets
    /// its child run and exit, reading the child's memory).
    fn apply_user_reads(
        &mut self,
        cpu: usize,
        events: &[abi::Event],
        written: &mut u64,
        unmapped: &mut u64,
    ) {
        let entry_cr3 = match self.vcpus[cpu].sregs() {
            Ok(s) => s.cr3,
            Err(_) => return,
        };
        let space = |cr3: u64| if cr3 == 0 { entry_cr3 } else { cr3 };
        // Accessed/dirty bits of user page-table entries, as the kernel
        // first found them in this stint (later reads see its own writes).
        let mut ptes_seen = std::collections::HashSet::new();
        for e in events {
            if let EventBody::PteRead(p) = &e.body {
                // Only where the entry maps the same page as the one the
                // kernel read (the read may concern another address space,
                // e.g. the new one of an execve) and only the first read of
                // an entry (later ones see the kernel's own writes).
                const AD: u64 = 0x60;
                const PFN_PRESENT: u64 = 0x000f_ffff_ffff_f001;
                // The agent's CR3 is the running address space, which is not
                // always the one whose table is read (execve tears down the
                // old one after switching): try it, then the entry's.
                let found = [space(p.cr3), entry_cr3].into_iter().find_map(|cr3| {
                    let at = paging::pte_location(&self.mem, cr3, p.user_addr)?;
                    let cur = self.mem.read_obj::<u64>(GuestAddress(at)).ok()?;
                    (cur & PFN_PRESENT == p.pte & PFN_PRESENT && cur & 1 != 0).then_some((at, cur))
                });
                let Some((at, cur)) = found else {
                    continue;
                };
                if ptes_seen.insert(at) {
                    let _ = self
                        .mem
                        .write_obj((cur & !AD) | (p.pte & AD), GuestAddress(at));
                }
                continue;
            }
        }
        for e in events {
            let (cr3, addr, bytes): (u64, u64, Vec<u8>) = match &e.body {
                EventBody::CopyFromUser { info, data } => {
                    (space(info.cr3), info.user_addr + info.offset, data.clone())
                }
                EventBody::StrncpyFromUser { info, data } => {
                    let mut d = data.clone();
                    // The string ended inside the limit: its NUL was read
                    // too. Written with the string's last chunk even where
                    // the agent logs the NUL's word in a chunk of its own
                    // (which rewrites it): that chunk may fall into the next
                    // stretch when a vCPU's slice ended between the two.
                    let whole = info.result >= 0 && info.result < info.limit;
                    let ends_at_result =
                        info.offset.wrapping_add(data.len() as u64) == info.result as u64;
                    if whole && ends_at_result {
                        d.push(0);
                    }
                    (space(info.cr3), info.user_addr.wrapping_add(info.offset), d)
                }
                // The word the NUL was found in (the string itself comes
                // with the copy that follows a strnlen_user).
                EventBody::StrnlenUser { info, data } if !data.is_empty() => (
                    space(info.cr3),
                    info.user_addr.wrapping_add(info.offset),
                    data.clone(),
                ),
                EventBody::GetUser(g) if g.err == 0 => (
                    space(g.cr3),
                    g.user_addr,
                    g.value.to_le_bytes()[..(g.size as usize).min(8)].to_vec(),
                ),
                _ => continue,
            };
            let missed = paging::write_virtual(&self.mem, cr3, addr, &bytes);
            if missed > 0 {
                tracing::debug!(
                    "replay: {missed} of {} bytes at {addr:#x} not written (page not present): agent #{}",
                    bytes.len(),
                    e.seq
                );
            }
            *written += (bytes.len() - missed) as u64;
            *unmapped += missed as u64;
        }
    }

    /// Replays to the end of the log (or `--until-event`).
    ///
    /// Several vCPUs: the log's `Slice` events give the order in which the
    /// recording ran them (one at a time). The vCPU of the next engine
    /// event is the one to run; it runs to the end of its slice (a kernel
    /// instruction count, or its return to user mode), meeting its own
    /// events on the way, and then the next slice's vCPU takes over.
    pub fn run(&mut self, opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
        let start = Instant::now();
        let events_path = self.dir.join(recording::EVENTS_FILE);
        let dma_path = self.dir.join(recording::DMA_FILE);
        let mut src = EventSource {
            reader: EventLogReader::open(&events_path)?,
            engine: VecDeque::new(),
            agent: VecDeque::new(),
            console: Vec::new(),
            exhausted: false,
            broken: None,
            recent: VecDeque::new(),
            consumed: 0,
            next_stop_seen: None,
            entry_seen: Vec::new(),
        };
        let dma = DmaLogReader::open(&dma_path).ok();
        let mut progress: Vec<CpuProgress> = self
            .cpus
            .iter()
            .map(|c| CpuProgress {
                in_user: c.sregs.cs.dpl == 3,
                base_kernel: c.kernel_icount,
                delivery_pending: false,
            })
            .collect();
        let mut entries = 0u64;
        let (mut written, mut unmapped) = (0u64, 0u64);
        let mut dma_reader = dma;
        let mut console = Vec::new();
        let mut serial_lcr = 0u8;
        let until = opts.until_event.unwrap_or(u64::MAX);
        // The user memory read in a stretch of kernel execution that did
        // not start with a kernel entry (the snapshot's, a resumed slice's)
        // is still to be written.
        let mut segment_reads_due = true;
        let mut checkpoints = CheckpointTally::default();
        let kernel_total = |vcpus: &[Box<dyn Vcpu>]| -> u64 {
            vcpus
                .iter()
                .map(|v| v.kernel_instructions_retired().unwrap_or(0))
                .sum()
        };
        let stall_after =
            std::time::Duration::from_secs(opts.stall_seconds.unwrap_or(DEFAULT_STALL_SECONDS));
        let mut watchdog = (src.consumed, 0u64, 0u32, Instant::now());
        let end = loop {
            if src.consumed >= until {
                break ReplayEnd::StoppedAt {
                    event: src.consumed,
                };
            }
            let next = src.peek().cloned();
            let Some((index, event)) = next else {
                break match (&src.broken, self.complete) {
                    (None, true) => ReplayEnd::Matched,
                    (Some(why), _) => ReplayEnd::LogEnded {
                        events: src.consumed,
                        why: why.clone(),
                    },
                    (None, false) => ReplayEnd::LogEnded {
                        events: src.consumed,
                        why: "the recording did not finish (no end.json): the recorder was killed or is still running".into(),
                    },
                };
            };
            let cpu = usize::from(event.cpu());
            if cpu >= self.vcpus.len() {
                break ReplayEnd::Diverged(Divergence {
                    event: index,
                    expected: format!("#{index} {event}"),
                    found: format!("a machine of {} vCPUs", self.vcpus.len()),
                    rip: String::new(),
                    kernel_icount: 0,
                    recent: src.recent.iter().cloned().collect(),
                });
            }
            // The replay's kernel count on this vCPU, as the recording counts it.
            let kernel_now = progress[cpu].base_kernel
                + self.vcpus[cpu].kernel_instructions_retired().unwrap_or(0);
            // Progress watchdog: every turn of this loop consumes an event
            // or runs kernel code; one that keeps doing neither is stuck.
            let retired = kernel_total(&self.vcpus);
            let (seen, seen_retired, idle_runs, since) = &mut watchdog;
            if src.consumed != *seen {
                *seen = src.consumed;
                *since = Instant::now();
                *idle_runs = 0;
            } else if retired == *seen_retired {
                *idle_runs += 1;
            } else {
                *idle_runs = 0;
            }
            *seen_retired = retired;
            let stalled = if *idle_runs >= STALL_RUNS {
                Some(format!(
                    "no progress: {STALL_RUNS} runs of vCPU {cpu} consumed no event and retired no kernel instruction"
                ))
            } else if since.elapsed() >= stall_after {
                Some(format!(
                    "no progress: no event consumed for {} s",
                    stall_after.as_secs()
                ))
            } else {
                None
            };
            if let Some(why) = stalled {
                let rip = self.rip(cpu);
                let mode = if progress[cpu].in_user {
                    "user mode"
                } else {
                    "the kernel"
                };
                break ReplayEnd::Stalled(Divergence {
                    event: index,
                    expected: format!("#{index} {event}"),
                    found: format!(
                        "{why}; vCPU {cpu} in {mode} at kernel instruction {kernel_now}, next stop {:?}",
                        src.next_stop()
                    ),
                    rip: symbolize(&self.symbols, rip),
                    kernel_icount: kernel_now,
                    recent: src.recent.iter().cloned().collect(),
                });
            }
            let diverged = |symbols: &Symbols,
                            src: &EventSource,
                            expected: String,
                            found: String,
                            rip: u64| {
                ReplayEnd::Diverged(Divergence {
                    event: index,
                    expected,
                    found,
                    rip: symbolize(symbols, rip),
                    kernel_icount: kernel_now,
                    recent: src.recent.iter().cloned().collect(),
                })
            };
            if let LogEvent::Startup { vector, .. } = event {
                src.pop();
                if let Err(e) = self.start_ap(cpu, vector) {
                    return Err(ReplayError::Setup(format!("starting vCPU {cpu}: {e}")));
                }
                progress[cpu].in_user = false;
                continue;
            }
            if progress[cpu].in_user {
                // The kernel is not running on this vCPU: the next event
                // must enter it, or end the vCPU's slice in user mode.
                if let LogEvent::Slice { at, .. } = &event {
                    if at.cpl != 3 || at.kernel_icount != kernel_now {
                        break diverged(
                            &self.symbols,
                            &src,
                            format!("#{index} {event}"),
                            format!("vCPU {cpu} in user mode at kernel instruction {kernel_now}"),
                            self.rip(cpu),
                        );
                    }
                    src.pop();
                    segment_reads_due = true;
                    continue;
                }
                let Some(seq) = entry_seq(&event) else {
                    break diverged(
                        &self.symbols,
                        &src,
                        format!("#{index} {event}"),
                        "a kernel entry from user mode (the kernel returned to user mode)".into(),
                        self.rip(cpu),
                    );
                };
                src.pop();
                tracing::debug!(
                    "replay: entry #{index} at kernel instruction {kernel_now} (recorded {})",
                    position_of(&event).map_or(0, |p| p.kernel_icount)
                );
                let end_seq = src.next_boundary_seq();
                let Some(reads) = src.agent_before(end_seq, cpu) else {
                    break ReplayEnd::LogEnded {
                        events: src.consumed,
                        why: format!(
                            "{}; the agent records the kernel stint after event #{index} needs (from seq {seq}) are not in the valid part of the log",
                            src.broken.clone().unwrap_or_default()
                        ),
                    };
                };
                self.apply_user_reads(cpu, &reads, &mut written, &mut unmapped);
                segment_reads_due = false;
                if let Err(e) = self.enter_kernel(cpu, &event) {
                    break diverged(
                        &self.symbols,
                        &src,
                        format!("#{index} {event}"),
                        format!("cannot enter the kernel: {e}"),
                        0,
                    );
                }
                entries += 1;
                progress[cpu].in_user = false;
                progress[cpu].delivery_pending = !matches!(event, LogEvent::Syscall { .. });
                continue;
            }
            // In the kernel: interrupts, slice ends and checkpoints are the
            // events the replay must stop for; everything else the kernel
            // meets by itself.
            let stop_here = match &event {
                LogEvent::Interrupt { at, .. }
                | LogEvent::Slice { at, .. }
                | LogEvent::Checkpoint { at, .. }
                    if at.cpl != 3 =>
                {
                    Some(at.kernel_icount)
                }
                _ => None,
            };
            let target = stop_here.or_else(|| src.next_stop());
            // A stop right at a kernel entry's first instruction: the entry
            // is delivered first, by a run of no instruction.
            if stop_here == Some(kernel_now) && !progress[cpu].delivery_pending {
                let now = match self.vcpus[cpu].regs() {
                    Ok(r) => r,
                    Err(e) => return Err(ReplayError::Setup(e.to_string())),
                };
                match &event {
                    LogEvent::Interrupt {
                        at,
                        kind,
                        vector,
                        regs,
                        ..
                    } => {
                        if now != *regs || now.rip != at.rip {
                            break diverged(
                                &self.symbols,
                                &src,
                                format!("#{index} {event}; registers {regs:x?}"),
                                format!("registers {now:x?}"),
                                now.rip,
                            );
                        }
                        src.pop();
                        if let Err(e) = self.vcpus[cpu].inject(interrupt_injection(*kind, *vector))
                        {
                            return Err(ReplayError::Setup(e.to_string()));
                        }
                    }
                    LogEvent::Slice { at, .. } => {
                        if now.rip != at.rip {
                            break diverged(
                                &self.symbols,
                                &src,
                                format!("#{index} {event}"),
                                format!("vCPU {cpu} at rip {:#x}", now.rip),
                                now.rip,
                            );
                        }
                        src.pop();
                        segment_reads_due = true;
                    }
                    LogEvent::Checkpoint { regs, sha256, .. } => {
                        let total = kernel_total(&self.vcpus);
                        if checkpoints.due(opts.verify_every, total) {
                            if let Some((expected, found)) =
                                self.check_checkpoint(cpu, regs, sha256)
                            {
                                break diverged(
                                    &self.symbols,
                                    &src,
                                    format!("#{index} {event}: {expected}"),
                                    found,
                                    now.rip,
                                );
                            }
                            checkpoints.verified(total, self.kernel_image.is_some());
                        } else {
                            checkpoints.skipped += 1;
                        }
                        src.pop();
                    }
                    _ => unreachable!("stop_here is set for these events only"),
                }
                continue;
            }
            if let Some(target) = target {
                if kernel_now > target {
                    break diverged(
                        &self.symbols,
                        &src,
                        format!("#{index} {event}"),
                        format!("the replay is already at kernel instruction {kernel_now}"),
                        self.rip(cpu),
                    );
                }
            }
            if segment_reads_due {
                segment_reads_due = false;
                let end_seq = src.next_boundary_seq();
                if let Some(reads) = src.agent_before(end_seq, cpu) {
                    self.apply_user_reads(cpu, &reads, &mut written, &mut unmapped);
                }
            }
            let end_icount = self.recorded_end_icounts.get(cpu).copied();
            if let (None, Some(limit)) = (target, end_icount) {
                if kernel_now > limit {
                    break diverged(
                        &self.symbols,
                        &src,
                        format!("#{index} {event}"),
                        format!(
                            "vCPU {cpu} ran past the recording's end ({limit} instructions) without meeting the event"
                        ),
                        self.rip(cpu),
                    );
                }
            }
            let budget = match (target, end_icount) {
                (Some(t), _) => Some(t - kernel_now),
                (None, Some(limit)) => Some(limit - kernel_now + 1),
                (None, None) => None,
            };
            let ring_phys = self.header.ring.map(|r| r.phys);
            let mut bus = ReplayBus {
                src: &mut src,
                mem: self.mem.clone(),
                dma: dma_reader.take(),
                cpuid: CpuidConfig {
                    apic: true,
                    vcpus: self.header.vcpus as u32,
                },
                ring_phys,
                cpu,
                at: Position::default(),
                divergence: None,
                log_end: false,
                dma_ranges: Vec::new(),
                console: std::mem::take(&mut console),
                serial_lcr,
                echo: opts.echo_console,
            };
            // Positions the bus sees count from this VM's start: rebase the
            // recorded ones by comparing with the rebased count.
            let exit = run_rebased(
                self.vcpus[cpu].as_mut(),
                &mut bus,
                budget,
                progress[cpu].base_kernel,
            );
            progress[cpu].delivery_pending = false;
            console = std::mem::take(&mut bus.console);
            serial_lcr = bus.serial_lcr;
            dma_reader = bus.dma.take();
            let ranges = std::mem::take(&mut bus.dma_ranges);
            let divergence = bus.divergence.take();
            let log_end = bus.log_end;
            drop(bus);
            for (gpa, len) in ranges {
                let _ = self.vm.invalidate_code(gpa, len);
            }
            if let Some((i, expected, found)) = divergence {
                let rip = self.rip(cpu);
                break ReplayEnd::Diverged(Divergence {
                    event: i,
                    expected,
                    found,
                    rip: self.symbolize(rip),
                    kernel_icount: progress[cpu].base_kernel
                        + self.vcpus[cpu].kernel_instructions_retired().unwrap_or(0),
                    recent: src.recent.iter().cloned().collect(),
                });
            }
            if log_end {
                // The loop's next look at the log ends the replay.
                continue;
            }
            match exit {
                Ok(VmExit::UserMode { .. }) => progress[cpu].in_user = true,
                Ok(VmExit::BudgetExhausted) | Ok(VmExit::Hlt) | Ok(VmExit::IoStop) => {}
                Ok(VmExit::InterruptWindow) | Ok(VmExit::Debug { .. }) => {}
                Ok(VmExit::Shutdown) => {
                    // The recording's own end, if it ended with this
                    // vCPU's triple fault at this count with nothing left.
                    let at = progress[cpu].base_kernel
                        + self.vcpus[cpu].kernel_instructions_retired().unwrap_or(0);
                    let recorded_end = self.recorded_end_icounts.get(cpu) == Some(&at);
                    let remaining = src.peek().cloned();
                    if self.recorded_triple_fault == Some(cpu) && recorded_end {
                        if let Some((i, e)) = remaining {
                            break diverged(
                                &self.symbols,
                                &src,
                                format!("#{i} {e}"),
                                "the recording's ending triple fault, before this event".into(),
                                self.rip(cpu),
                            );
                        }
                        continue;
                    }
                    let (i, expected) = match remaining {
                        Some((i, e)) => (i, format!("#{i} {e}")),
                        None => (src.consumed, "the recording's end".into()),
                    };
                    let recorded = match self.recorded_triple_fault {
                        Some(c) => format!(
                            "the recording ended with vCPU {c}'s triple fault at kernel instruction {}",
                            self.recorded_end_icounts.get(c).copied().unwrap_or(0)
                        ),
                        None => "the recording has no triple fault".into(),
                    };
                    break ReplayEnd::Diverged(Divergence {
                        event: i,
                        expected,
                        found: format!(
                            "a triple fault on vCPU {cpu} at kernel instruction {at} ({recorded})"
                        ),
                        rip: self.symbolize(self.rip(cpu)),
                        kernel_icount: at,
                        recent: src.recent.iter().cloned().collect(),
                    });
                }
                Err(e) => return Err(ReplayError::Setup(format!("the software CPU failed: {e}"))),
            }
            // A halted kernel with no interrupt to come would spin here,
            // unless that is how the recording ended (every vCPU halted
            // for good: a power-off without ACPI, `halt -f`).
            if matches!(exit, Ok(VmExit::Hlt)) && target.is_none() {
                let at = progress[cpu].base_kernel
                    + self.vcpus[cpu].kernel_instructions_retired().unwrap_or(0);
                if src.peek().is_none() && self.recorded_end_icounts.get(cpu) == Some(&at) {
                    continue;
                }
                break diverged(
                    &self.symbols,
                    &src,
                    format!("#{index} {event}"),
                    "the kernel halted waiting for an interrupt".into(),
                    self.rip(cpu),
                );
            }
        };
        // The replay's console must reproduce the recorded one (up to where
        // the replay got).
        let console_matches = console.len() <= src.console.len()
            && src.console[..console.len()] == console[..]
            && (!matches!(end, ReplayEnd::Matched) || console.len() == src.console.len());
        let kernel_instructions = kernel_total(&self.vcpus);
        let end = match end {
            ReplayEnd::Matched if !console_matches => ReplayEnd::Diverged(Divergence {
                event: src.consumed,
                expected: format!("the recorded console output ({} bytes)", src.console.len()),
                found: format!("{} bytes of console output that differ", console.len()),
                rip: String::new(),
                kernel_icount: kernel_instructions,
                recent: src.recent.iter().cloned().collect(),
            }),
            other => other,
        };
        Ok(ReplayReport {
            recording: self.dir.clone(),
            end,
            events: src.consumed,
            kernel_entries: entries,
            kernel_instructions,
            vcpus: self.vcpus.len(),
            checkpoints_verified: checkpoints.registers,
            checkpoints_memory_verified: checkpoints.memory,
            checkpoints_skipped: checkpoints.skipped,
            wall_seconds: start.elapsed().as_secs_f64(),
            recorded_wall_seconds: self.recorded_wall,
            user_bytes_written: written,
            user_bytes_unmapped: unmapped,
            console_matches,
            console,
        })
    }
}

/// The checkpoints a replay verified, and which (`--verify-every`).
#[derive(Default)]
struct CheckpointTally {
    /// Registers compared.
    registers: u64,
    /// Kernel data+bss digests compared too.
    memory: u64,
    skipped: u64,
    /// Total kernel instructions at the last one verified.
    last: Option<u64>,
}

impl CheckpointTally {
    /// Whether the checkpoint at `total` kernel instructions is verified:
    /// all of them without `--verify-every`, else at most one per `every`.
    fn due(&self, every: Option<u64>, total: u64) -> bool {
        match (every, self.last) {
            (None, _) | (Some(_), None) => true,
            (Some(n), Some(last)) => total >= last.saturating_add(n),
        }
    }

    fn verified(&mut self, total: u64, memory: bool) {
        self.registers += 1;
        self.memory += u64::from(memory);
        self.last = Some(total);
    }
}

/// The injection of a recorded external interrupt or NMI.
fn interrupt_injection(kind: InterruptKind, vector: u8) -> Injection {
    match kind {
        InterruptKind::Nmi => Injection::Nmi,
        InterruptKind::External => Injection::Interrupt(vector),
    }
}

fn symbolize(symbols: &Symbols, rip: u64) -> String {
    if symbols.is_empty() {
        format!("{rip:#x}")
    } else {
        symbols.name(rip)
    }
}

/// Runs the vCPU with positions rebased to the recording's counts: the
/// bus sees `kernel_icount` as the recording counted it.
fn run_rebased(
    vcpu: &mut dyn Vcpu,
    bus: &mut ReplayBus<'_>,
    budget: Option<u64>,
    base_kernel: u64,
) -> crate::hypervisor::Result<VmExit> {
    struct Rebased<'b, 'c> {
        inner: &'b mut ReplayBus<'c>,
        base: u64,
    }
    impl Rebased<'_, '_> {
        fn rebase(&self, mut at: Position) -> Position {
            at.kernel_icount += self.base;
            at
        }
    }
    impl IoBus for Rebased<'_, '_> {
        fn pio_read(&mut self, vcpu: usize, port: u16, data: &mut [u8]) {
            self.inner.pio_read(vcpu, port, data)
        }
        fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]) {
            self.inner.pio_write(vcpu, port, data)
        }
        fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8]) {
            self.inner.mmio_read(vcpu, addr, data)
        }
        fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8]) {
            self.inner.mmio_write(vcpu, addr, data)
        }
        fn stop_requested(&self) -> bool {
            self.inner.stop_requested()
        }
        fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
            self.inner.cpuid(vcpu, leaf, subleaf)
        }
        fn rdtsc(&mut self, vcpu: usize) -> u64 {
            self.inner.rdtsc(vcpu)
        }
        fn position(&mut self, vcpu: usize, at: Position) {
            let at = self.rebase(at);
            self.inner.position(vcpu, at)
        }
        fn exception(&mut self, vcpu: usize, at: Position, e: &DeliveredException) {
            let at = self.rebase(at);
            self.inner.exception(vcpu, at, e)
        }
        fn syscall(&mut self, vcpu: usize, at: Position, entry: &UserEntry) {
            let at = self.rebase(at);
            self.inner.syscall(vcpu, at, entry)
        }
    }
    let mut rebased = Rebased {
        inner: bus,
        base: base_kernel,
    };
    vcpu.run(&mut rebased, budget)
}
