// SPDX-License-Identifier: GPL-2.0-or-later
//! The engine side of recording: the guest agent's ring in guest memory,
//! start/stop triggers, and what only the engine sees (interrupts,
//! exceptions, port/MMIO reads, RDTSC, DMA, console output), written to a
//! recording directory ([`super::recording`]).
//!
//! The machine owns one [`Recorder`] for a VM run (it lives in the
//! platform, which is the I/O bus the backends call). A VM run can hold
//! several recordings (start/stop triggers fire more than once): each is its
//! own self-contained directory `NAME`, `NAME-2`, `NAME-3`, ... with its own
//! start snapshot.
//!
//! # Determinism of the agent
//! The agent's branches read `control` and `tail`, which the engine writes
//! (see [`super::abi`]). The engine writes `control` only between two vCPU
//! runs (every vCPU stopped at an instruction boundary), and `tail` only in
//! the doorbell exit that asked for it, logging the value
//! ([`LogEvent::Doorbell`]), so replay can write the same value at the same
//! point. Between doorbells the engine *reads* the ring (at every flush) but
//! never frees space in it, so the agent's view does not depend on when the
//! engine happened to look.

use super::abi::{self, Doorbell, RingHeader};
use super::event::{GprSnapshot, InterruptKind, LogEvent, Position};
use super::memory_image::MemoryCopy;
use super::recording::{
    CpuSnapshot, FileDigest, RecordingEnd, RecordingHeader, RecordingWriter, RingInfo,
};
use krr_devices::console::ConsoleBuffer;
use krr_hypervisor::{DeliveredException, UserEntry};
use krr_machine::MachineConfig;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Default size of the ring region (header page + data area).
pub const DEFAULT_RING_SIZE: u64 = 8 << 20;

/// When a recording starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartTrigger {
    /// At the first instruction of the boot.
    Boot,
    /// When the guest console prints this text (then again after each stop).
    Marker(String),
    /// When the guest writes `start` to `/proc/krr_agent`.
    Guest,
}

/// When a recording stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopTrigger {
    /// When the VM run ends.
    End,
    /// When the guest console prints this text.
    Marker(String),
    /// When the guest writes `stop` to `/proc/krr_agent`.
    Guest,
    /// When the console since the start holds a whole kernel report that
    /// did not panic (a lockdep splat, a WARNING without `panic_on_warn`),
    /// at the end of its call trace; the run ends there too, since such a
    /// kernel may go on spinning with interrupts off.
    Report,
}

impl std::str::FromStr for StartTrigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "boot" => Ok(StartTrigger::Boot),
            "guest" => Ok(StartTrigger::Guest),
            _ => match s.strip_prefix("marker:") {
                Some(text) if !text.is_empty() => Ok(StartTrigger::Marker(text.to_string())),
                _ => Err(format!(
                    "start trigger {s:?}: expected `boot`, `guest` or `marker:TEXT`"
                )),
            },
        }
    }
}

impl std::str::FromStr for StopTrigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "end" => Ok(StopTrigger::End),
            "guest" => Ok(StopTrigger::Guest),
            "report" => Ok(StopTrigger::Report),
            _ => match s.strip_prefix("marker:") {
                Some(text) if !text.is_empty() => Ok(StopTrigger::Marker(text.to_string())),
                _ => Err(format!(
                    "stop trigger {s:?}: expected `end`, `guest`, `report` or `marker:TEXT`"
                )),
            },
        }
    }
}

impl std::fmt::Display for StartTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartTrigger::Boot => write!(f, "boot"),
            StartTrigger::Guest => write!(f, "guest"),
            StartTrigger::Marker(t) => write!(f, "marker:{t}"),
        }
    }
}

impl std::fmt::Display for StopTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopTrigger::End => write!(f, "end"),
            StopTrigger::Guest => write!(f, "guest"),
            StopTrigger::Report => write!(f, "report"),
            StopTrigger::Marker(t) => write!(f, "marker:{t}"),
        }
    }
}

/// What `krr record` asks of the machine.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    /// Name of the first recording; later ones get `-2`, `-3`, ...
    pub name: String,
    /// Directory the recordings are created in.
    pub parent: PathBuf,
    pub start: StartTrigger,
    pub stop: StopTrigger,
    /// Size of the ring region reserved at the top of guest RAM.
    pub ring_size: u64,
    /// The kernel's vmlinux (its sha256 goes in the header).
    pub vmlinux: Option<PathBuf>,
    /// Wall time between two flushes of the log (crash safety).
    pub flush_every: Duration,
    /// The backend executes the guest's SYSCALL and RDTSC in the engine (the
    /// software CPU), which logs both with exact positions: the agent logs
    /// neither (`abi::CONTROL_ENGINE_SYSCALLS | abi::CONTROL_ENGINE_RDTSC`).
    /// Set by the machine.
    pub engine_executes_cpu: bool,
    /// Guest instructions between two checkpoints (0: none); each is taken
    /// at the first vCPU stop in the kernel after that many.
    pub checkpoint_every: u64,
}

impl RecordConfig {
    /// The ring's `control` value while recording.
    pub fn recording_control(&self) -> u32 {
        if self.engine_executes_cpu {
            abi::CONTROL_RECORD | abi::CONTROL_ENGINE_SYSCALLS | abi::CONTROL_ENGINE_RDTSC
        } else {
            abi::CONTROL_RECORD
        }
    }

    pub fn new(name: String, parent: PathBuf) -> RecordConfig {
        RecordConfig {
            name,
            parent,
            start: StartTrigger::Boot,
            stop: StopTrigger::End,
            ring_size: DEFAULT_RING_SIZE,
            vmlinux: None,
            flush_every: Duration::from_millis(200),
            engine_executes_cpu: false,
            checkpoint_every: 0,
        }
    }
}

/// A start or stop the guest asked for through the doorbell, carried out
/// by the run loop once the vCPU has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    Start,
    Stop,
}

/// Where the guest agent stands, as its doorbells told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStatus {
    NotSeen,
    Ready,
    Refused,
}

/// One recording being written.
struct Active {
    writer: RecordingWriter,
    dir: PathBuf,
    started: Instant,
    events: u64,
    /// Console position up to which the output was logged.
    console_from: u64,
    agent_written_at_start: u64,
    snapshot_seconds: f64,
}

/// Summary of one finished recording, for `krr record`'s output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FinishedRecording {
    pub dir: PathBuf,
    pub events: u64,
    /// Seconds the guest stopped for the start snapshot.
    pub snapshot_seconds: f64,
    /// Seconds the memory image took on its background thread.
    pub snapshot_write_seconds: f64,
    pub reason: String,
    pub ok: bool,
}

/// Where the machine stands when a recording stops: what `end.json`
/// records of it.
#[derive(Debug, Default)]
pub struct StopPoint {
    /// Each vCPU's instructions retired, in all and in the kernel.
    pub instructions_per_vcpu: Vec<u64>,
    pub kernel_instructions_per_vcpu: Vec<u64>,
    /// The virtual clock then, and when the recording started.
    pub virtual_ns: u64,
    pub start_virtual_ns: u64,
    pub triple_fault_vcpu: Option<usize>,
    /// The kernel's crash report, when the run ended in a panic.
    pub crash: Option<krr_crash::CrashReport>,
}

/// The recorder of one VM run.
pub struct Recorder {
    cfg: RecordConfig,
    mem: GuestMemoryMmap,
    ring_phys: u64,
    data_size: u64,
    /// Ring byte counter up to which records were read (`head` at the last
    /// look); `tail` in guest memory lags behind until a doorbell.
    consumed: u64,
    active: Option<Active>,
    finished: Vec<FinishedRecording>,
    request: Option<GuestRequest>,
    agent: AgentStatus,
    /// The first failure (log I/O, a malformed ring): the run must stop.
    error: Option<String>,
    last_flush: Instant,
    /// Recordings started so far in this VM run.
    segments: u32,
    /// Header fields that come from the machine (the machine fills them).
    header_template: RecordingHeader,
}

impl Recorder {
    /// A recorder for a ring at guest-physical `ring_phys` (already
    /// reserved in the e820 map, header not yet written).
    pub fn new(
        cfg: RecordConfig,
        mem: GuestMemoryMmap,
        ring_phys: u64,
        header_template: RecordingHeader,
    ) -> Result<Recorder, String> {
        let control = if cfg.start == StartTrigger::Boot {
            cfg.recording_control()
        } else {
            0
        };
        let header = RingHeader::new(cfg.ring_size, control).map_err(|e| e.to_string())?;
        mem.write_slice(&header.to_bytes(), GuestAddress(ring_phys))
            .map_err(|e| format!("writing the ring header at {ring_phys:#x}: {e}"))?;
        Ok(Recorder {
            data_size: header.data_size,
            cfg,
            mem,
            ring_phys,
            consumed: 0,
            active: None,
            finished: Vec::new(),
            request: None,
            agent: AgentStatus::NotSeen,
            error: None,
            last_flush: Instant::now(),
            segments: 0,
            header_template,
        })
    }

    pub fn config(&self) -> &RecordConfig {
        &self.cfg
    }

    pub fn is_recording(&self) -> bool {
        self.active.is_some()
    }

    pub fn agent_status(&self) -> AgentStatus {
        self.agent
    }

    /// The first error, if any (the run loop stops on it).
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn finished(&self) -> &[FinishedRecording] {
        &self.finished
    }

    /// Whether the vCPU must stop after its current access (a guest
    /// start/stop request or an error).
    pub fn wants_stop(&self) -> bool {
        self.request.is_some() || self.error.is_some()
    }

    pub fn take_request(&mut self) -> Option<GuestRequest> {
        self.request.take()
    }

    /// Notes the first error (the run stops at the end of its turn; the
    /// events of that turn fail the same way and are not reported again).
    fn fail(&mut self, what: String) {
        if self.error.is_none() {
            tracing::error!("recorder: {what}");
            self.error = Some(what);
        } else {
            tracing::debug!("recorder: {what}");
        }
    }

    fn log(&mut self, event: LogEvent) {
        let Some(active) = &mut self.active else {
            return;
        };
        match active.writer.event(&event) {
            Ok(_) => active.events += 1,
            Err(e) => {
                let msg = format!("writing {}: {e:#}", active.dir.display());
                self.fail(msg);
            }
        }
    }

    fn ring_u64(&self, offset: usize) -> u64 {
        self.mem
            .read_obj::<u64>(GuestAddress(self.ring_phys + offset as u64))
            .unwrap_or(0)
    }

    fn ring_header(&self) -> Option<RingHeader> {
        let mut bytes = vec![0u8; std::mem::size_of::<RingHeader>()];
        self.mem
            .read_slice(&mut bytes, GuestAddress(self.ring_phys))
            .ok()?;
        RingHeader::read_from(&bytes)
    }

    fn write_ring_u64(&mut self, offset: usize, value: u64) {
        if let Err(e) = self
            .mem
            .write_obj(value, GuestAddress(self.ring_phys + offset as u64))
        {
            self.fail(format!("writing the ring at {:#x}: {e}", self.ring_phys));
        }
    }

    fn set_control(&mut self, control: u32) {
        let at = GuestAddress(self.ring_phys + abi::CONTROL_OFFSET as u64);
        if let Err(e) = self.mem.write_obj(control, at) {
            self.fail(format!("writing ring control: {e}"));
        }
    }

    /// Reads the records the agent published since the last look and logs
    /// them (when recording). Does not free ring space.
    pub fn collect(&mut self) {
        let head = self.ring_u64(abi::HEAD_OFFSET);
        if head <= self.consumed {
            return;
        }
        if head - self.consumed > self.data_size {
            self.fail(format!(
                "ring head {head} is more than the data area ({} bytes) ahead of the engine's position {}: the agent overran the ring",
                self.data_size, self.consumed
            ));
            self.consumed = head;
            return;
        }
        let data_phys = GuestAddress(self.ring_phys + u64::from(abi::RING_HEADER_SIZE));
        let records: Result<Vec<Vec<u8>>, String> =
            match self.mem.get_slice(data_phys, self.data_size as usize) {
                Ok(slice) => {
                    // The data area is one contiguous host mapping; no vCPU runs
                    // while the engine is here (one host thread runs them all),
                    // so nothing writes it during the read.
                    let ptr = slice.ptr_guard().as_ptr();
                    // SAFETY: `ptr` is valid for `data_size` bytes (get_slice
                    // checked the range), and the memory is not written while
                    // this shared slice lives (see above).
                    let data = unsafe { std::slice::from_raw_parts(ptr, self.data_size as usize) };
                    abi::split_records(data, self.consumed, head)
                        .map(|v| v.into_iter().map(|(_, r)| r.to_vec()).collect())
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("ring data area: {e}")),
            };
        self.consumed = head;
        match records {
            Ok(records) => {
                if self.active.is_some() {
                    for record in records {
                        self.log(LogEvent::Agent { record });
                    }
                }
            }
            Err(e) => self.fail(format!("malformed guest agent ring: {e}")),
        }
    }

    /// The agent wrote `value` to the doorbell port at `at` on `cpu`.
    pub fn doorbell(&mut self, cpu: usize, at: Position, value: u32) {
        match Doorbell::from_value(value) {
            Some(d) if d.wants_drain() => {
                self.collect();
                let tail = self.consumed;
                self.write_ring_u64(abi::TAIL_OFFSET, tail);
                self.log(LogEvent::Doorbell {
                    cpu: cpu as u16,
                    at,
                    reason: value,
                    tail,
                });
            }
            Some(Doorbell::AgentReady) => {
                self.agent = AgentStatus::Ready;
                tracing::info!("recorder: the guest's KRR agent accepted the ring");
            }
            Some(Doorbell::AgentRefused) => {
                self.agent = AgentStatus::Refused;
                let e = self
                    .ring_header()
                    .map(|h| h.check_agent().err().map(|e| e.to_string()))
                    .unwrap_or_default()
                    .unwrap_or_else(|| "the guest's KRR agent refused the ring".into());
                self.fail(e);
            }
            Some(Doorbell::GuestStart) => self.request = Some(GuestRequest::Start),
            Some(Doorbell::GuestStop) => self.request = Some(GuestRequest::Stop),
            Some(Doorbell::HighWater | Doorbell::Full) => unreachable!("handled above"),
            None => tracing::warn!("recorder: unknown doorbell value {value} from vCPU {cpu}"),
        }
    }

    /// Why recording cannot start: the agent is absent or refused.
    pub fn check_agent(&self) -> Result<(), String> {
        match self.ring_header() {
            Some(h) => h.check_agent().map_err(|e| e.to_string()),
            None => Err("the ring header cannot be read".into()),
        }
    }

    /// Starts a recording with everything stopped: `cpus` and `devices` are
    /// the machine's state now. Sets `control` so the agent records.
    pub fn start(
        &mut self,
        cpus: &[CpuSnapshot],
        devices: serde_json::Value,
        console_at: u64,
    ) -> Result<PathBuf, String> {
        if self.active.is_some() {
            return Err("a recording is already running".into());
        }
        // Records published while not recording belong to no recording.
        self.collect();
        self.segments += 1;
        let name = if self.segments == 1 {
            self.cfg.name.clone()
        } else {
            format!("{}-{}", self.cfg.name, self.segments)
        };
        let dir = self.cfg.parent.join(&name);
        let mut header = self.header_template.clone();
        header.name = name;
        header.segment = self.segments;
        header.start_trigger = self.cfg.start.to_string();
        header.stop_trigger = self.cfg.stop.to_string();
        let mut writer = RecordingWriter::create(&dir, &header)
            .map_err(|e| format!("creating recording {}: {e:#}", dir.display()))?;
        let snapshot_started = Instant::now();
        let memory = MemoryCopy::take(&self.mem)
            .map_err(|e| format!("the start snapshot of {}: {e}", dir.display()))?;
        writer
            .write_snapshot(memory, cpus, devices)
            .map_err(|e| format!("writing the start snapshot of {}: {e:#}", dir.display()))?;
        let agent_written = self
            .ring_header()
            .map(|h| h.events_written)
            .unwrap_or_default();
        self.active = Some(Active {
            writer,
            dir: dir.clone(),
            started: Instant::now(),
            events: 0,
            console_from: console_at,
            agent_written_at_start: agent_written,
            snapshot_seconds: snapshot_started.elapsed().as_secs_f64(),
        });
        self.set_control(self.cfg.recording_control());
        self.last_flush = Instant::now();
        tracing::info!("recording to {}", dir.display());
        Ok(dir)
    }

    /// Stops the running recording (everything stopped): reads what the
    /// agent published, clears `control` and writes the end record.
    pub fn stop(&mut self, reason: &str, ok: bool, at: StopPoint) {
        self.collect();
        self.set_control(0);
        let Some(active) = self.active.take() else {
            return;
        };
        let ring = self.ring_header().unwrap_or_default();
        let lost = ring.dropped_events;
        let ok = ok && self.error.is_none() && lost == 0;
        let reason = if lost > 0 {
            format!("{reason}; the agent dropped {lost} events (ring full): not replayable")
        } else {
            reason.to_string()
        };
        let end = RecordingEnd {
            reason: reason.clone(),
            ok,
            events: active.events,
            instructions_per_vcpu: at.instructions_per_vcpu,
            kernel_instructions_per_vcpu: at.kernel_instructions_per_vcpu,
            triple_fault_vcpu: at.triple_fault_vcpu,
            virtual_ns: at.virtual_ns,
            start_virtual_ns: Some(at.start_virtual_ns),
            wall_seconds: active.started.elapsed().as_secs_f64(),
            agent_events_written: ring
                .events_written
                .saturating_sub(active.agent_written_at_start),
            agent_dropped_events: lost,
            agent_doorbells: ring.doorbells,
            snapshot_seconds: active.snapshot_seconds,
            crash: at.crash,
            ..RecordingEnd::default()
        };
        let events = active.events;
        let mut snapshot_write_seconds = 0.0;
        match active.writer.finish(end) {
            Ok(end) => snapshot_write_seconds = end.snapshot_write_seconds,
            Err(e) => self.fail(format!("finishing {}: {e:#}", active.dir.display())),
        }
        tracing::info!(
            "recording {} stopped: {events} events ({reason})",
            active.dir.display()
        );
        self.finished.push(FinishedRecording {
            snapshot_seconds: active.snapshot_seconds,
            snapshot_write_seconds,
            dir: active.dir,
            events,
            reason,
            ok,
        });
    }

    /// Called between vCPU runs: logs the console output since the last
    /// call and, every `flush_every`, reads the ring and makes everything so
    /// far durable (a kill -9 keeps it). Output the console buffer dropped
    /// before it was logged (more than half its window in one vCPU run)
    /// fails the recording: replay compares the console byte for byte.
    pub fn between_runs(&mut self, cpu: usize, console: &ConsoleBuffer) {
        let Some(active) = &mut self.active else {
            return;
        };
        match console.since(active.console_from) {
            Ok([]) => {}
            Ok(new) => {
                let bytes = new.to_vec();
                active.console_from = console.end();
                self.log(LogEvent::Console {
                    cpu: cpu as u16,
                    bytes,
                });
            }
            Err(dropped) => {
                active.console_from = console.end();
                self.fail(format!(
                    "the guest printed more console output between two vCPU runs than is kept: {dropped}"
                ));
                return;
            }
        }
        if self.last_flush.elapsed() >= self.cfg.flush_every {
            self.flush();
        }
    }

    /// Reads the ring and closes the current log chunks.
    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        self.collect();
        if let Some(active) = &mut self.active {
            if let Err(e) = active.writer.flush() {
                let msg = format!("flushing {}: {e:#}", active.dir.display());
                self.fail(msg);
            }
        }
    }

    pub fn interrupt(
        &mut self,
        cpu: usize,
        at: Position,
        kind: InterruptKind,
        vector: u8,
        regs: GprSnapshot,
    ) {
        if self.active.is_some() {
            let agent_seq = self.agent_seq();
            self.log(LogEvent::Interrupt {
                cpu: cpu as u16,
                at,
                kind,
                vector,
                regs,
                agent_seq,
            });
        }
    }

    pub fn exception(&mut self, cpu: usize, at: Position, e: &DeliveredException) {
        if self.active.is_some() {
            let agent_seq = self.agent_seq();
            self.log(LogEvent::Exception {
                cpu: cpu as u16,
                at,
                vector: e.vector,
                error_code: e.error_code,
                cr2: e.cr2,
                software: e.software,
                from_user: e.cpl == 3,
                regs: e.user_regs,
                agent_seq,
            });
        }
    }

    pub fn syscall(&mut self, cpu: usize, at: Position, entry: &UserEntry) {
        if self.active.is_some() {
            let agent_seq = self.agent_seq();
            self.log(LogEvent::Syscall {
                cpu: cpu as u16,
                at,
                regs: entry.regs,
                fs_base: entry.fs_base,
                gs_base: entry.gs_base,
                agent_seq,
            });
        }
    }

    /// vCPU `cpu` stopped at `at` at the end of its turn (machines of
    /// several vCPUs).
    pub fn slice(&mut self, cpu: usize, at: Position) {
        if self.active.is_some() {
            let agent_seq = self.agent_seq();
            self.log(LogEvent::Slice {
                cpu: cpu as u16,
                at,
                agent_seq,
            });
        }
    }

    /// A startup IPI started vCPU `cpu`.
    pub fn startup(&mut self, cpu: usize, vector: u8) {
        if self.active.is_some() {
            self.log(LogEvent::Startup {
                cpu: cpu as u16,
                vector,
            });
        }
    }

    /// A checkpoint of vCPU `cpu`, stopped in the kernel at `at`.
    pub fn checkpoint(&mut self, cpu: usize, at: Position, regs: GprSnapshot, sha256: [u8; 32]) {
        if self.active.is_some() {
            self.log(LogEvent::Checkpoint {
                cpu: cpu as u16,
                at,
                regs,
                sha256,
            });
        }
    }

    /// The sequence number the agent's next record gets.
    fn agent_seq(&self) -> u64 {
        self.ring_u64(abi::NEXT_SEQ_OFFSET)
    }

    pub fn pio_read(&mut self, cpu: usize, at: Position, port: u16, data: &[u8]) {
        if self.active.is_some() {
            let mut v = [0u8; 4];
            let n = data.len().min(4);
            v[..n].copy_from_slice(&data[..n]);
            self.log(LogEvent::PioRead {
                cpu: cpu as u16,
                at,
                port,
                size: data.len() as u8,
                value: u32::from_le_bytes(v),
            });
        }
    }

    pub fn mmio_read(&mut self, cpu: usize, at: Position, addr: u64, data: &[u8]) {
        if self.active.is_some() {
            let mut v = [0u8; 8];
            let n = data.len().min(8);
            v[..n].copy_from_slice(&data[..n]);
            self.log(LogEvent::MmioRead {
                cpu: cpu as u16,
                at,
                addr,
                size: data.len() as u8,
                value: u64::from_le_bytes(v),
            });
        }
    }

    pub fn rdtsc(&mut self, cpu: usize, at: Position, value: u64) {
        if self.active.is_some() {
            self.log(LogEvent::Rdtsc {
                cpu: cpu as u16,
                at,
                value,
            });
        }
    }

    /// A device wrote `[gpa, gpa + len)` of guest memory (already done):
    /// the bytes go to the DMA log.
    pub fn dma(&mut self, cpu: usize, at: Position, gpa: u64, len: u64) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mut bytes = vec![0u8; len as usize];
        if let Err(e) = self.mem.read_slice(&mut bytes, GuestAddress(gpa)) {
            self.fail(format!("reading DMA data at {gpa:#x}+{len}: {e}"));
            return;
        }
        match active.writer.dma(&bytes) {
            Ok(dma_offset) => self.log(LogEvent::Dma {
                cpu: cpu as u16,
                at,
                gpa,
                len: len as u32,
                dma_offset,
            }),
            Err(e) => {
                let msg = format!("writing DMA data to {}: {e:#}", active.dir.display());
                self.fail(msg);
            }
        }
    }

    /// The recording directory being written, if any.
    pub fn active_dir(&self) -> Option<&Path> {
        self.active.as_ref().map(|a| a.dir.as_path())
    }
}

/// The header of the recordings of a machine: what it boots and how (the
/// recorder fills in name, segment and triggers per recording).
pub fn header_for_machine(
    cfg: &MachineConfig,
    rc: &RecordConfig,
    backend: &str,
    ring_phys: u64,
) -> Result<RecordingHeader, String> {
    let digest = |p: &Path| FileDigest::of(p).map_err(|e| e.to_string());
    let mut h = RecordingHeader::new(&rc.name);
    h.kernel = digest(&cfg.kernel)?;
    h.vmlinux = rc.vmlinux.as_deref().map(digest).transpose()?;
    h.initrd = cfg.initrd.as_deref().map(digest).transpose()?;
    h.disk = cfg.disk.as_deref().map(digest).transpose()?;
    h.cmdline = cfg.cmdline.clone();
    h.vcpus = cfg.vcpus;
    h.mem_bytes = cfg.mem_bytes;
    h.backend = backend.to_string();
    h.ring = Some(RingInfo {
        phys: ring_phys,
        size: rc.ring_size,
    });
    h.machine = serde_json::json!({
        "quantum": cfg.quantum,
        "max_instructions": cfg.max_instructions,
        // The ring's `control` while recording: replay puts it back.
        "ring_control": rc.recording_control(),
    });
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::EventLogReader;

    /// A recorder of a 1 MiB guest whose ring is its top 128 KiB, with a
    /// recording started at console position `console_at`.
    fn recording(parent: &Path, console_at: u64) -> Recorder {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut rc = RecordConfig::new("console".into(), parent.to_path_buf());
        rc.ring_size = 128 << 10;
        let ring_phys = (1 << 20) - rc.ring_size;
        let mut recorder =
            Recorder::new(rc, mem, ring_phys, RecordingHeader::new("console")).unwrap();
        recorder
            .start(&[], serde_json::json!({}), console_at)
            .unwrap();
        recorder
    }

    fn console_logged(dir: &Path) -> Vec<u8> {
        let mut reader = EventLogReader::open(&dir.join(crate::recording::EVENTS_FILE)).unwrap();
        let mut logged = Vec::new();
        while let Some(read) = reader.next_event().unwrap() {
            if let LogEvent::Console { bytes, .. } = read.event {
                logged.extend_from_slice(&bytes);
            }
        }
        logged
    }

    /// The console output since the recording's start is logged whole
    /// while the buffer drops older output; output dropped before it was
    /// logged fails the recording instead of leaving a hole in it.
    #[test]
    fn console_output_is_logged_by_absolute_position() {
        let parent = tempfile::tempdir().unwrap();
        let mut console = ConsoleBuffer::with_window(4096);
        console.push(&[b'b'; 3000]);
        let mut recorder = recording(parent.path(), console.end());
        let mut printed = Vec::new();
        for i in 0..500 {
            let line = format!("line {i}\n");
            console.push(line.as_bytes());
            printed.extend_from_slice(line.as_bytes());
            recorder.between_runs(0, &console);
        }
        assert!(console.start() > 3000, "the buffer dropped output");
        assert_eq!(recorder.error(), None);
        recorder.stop("test", true, StopPoint::default());
        assert_eq!(console_logged(&parent.path().join("console")), printed);

        let parent = tempfile::tempdir().unwrap();
        let mut recorder = recording(parent.path(), console.end());
        console.push(&[b'x'; 5000]);
        recorder.between_runs(0, &console);
        let error = recorder.error().expect("a failed recording");
        assert!(error.contains("no longer held"), "{error}");
    }
}
