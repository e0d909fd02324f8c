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
//!   stint) is written at its user addresses, and the shared memory it is
//!   about to read through its own mapping (io_uring's rings and SQEs) at
//!   its kernel addresses, so the kernel reads what it read when recorded.
//!
//! Engine events made in user mode (RDTSC in the vDSO) are skipped. Console
//! output is compared with the recorded output as both grow, keeping only
//! what one side has printed and the other not yet: the first differing
//! byte ends the replay as a divergence that names its offset, and a
//! replay of the whole log must print all of it. The report keeps the
//! last [`CONSOLE_WINDOW_BYTES`](krr_devices::console::CONSOLE_WINDOW_BYTES)
//! of the replayed output.
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
//! and bss are compared ([`krr_record::checkpoint`]).

mod bus;
mod console;
mod entry;
mod inspect;
mod open;
mod report;
mod session;
mod snapshot;
mod source;

use bus::{run_rebased, ReplayBus};
use entry::StintBounds;
pub use open::StartImage;
use report::{CheckpointTally, Watchdog};
pub use report::{
    Divergence, Reached, ReplayEnd, ReplayError, ReplayOptions, ReplayReport, DEFAULT_STALL_SECONDS,
};
pub use session::{DebugControl, DebugStop, ReplaySession, StopAt, Turn};
pub use snapshot::ReplaySnapshot;
use source::{entry_seq, position_of, EventSource};

use console::ConsoleProblem;
use krr_devices::console::ConsoleBuffer;
use krr_devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE};
use krr_devices::lapic::{LAPIC_BASE, LAPIC_SIZE};
use krr_devices::virtio_mmio::VIRTIO_MMIO_WINDOW_SIZE;
use krr_guest::paging;
use krr_guest::symbols::Symbols;
use krr_hypervisor::{
    unicorn::UnicornVm, Injection, Position, UserEntry, Vcpu, Vm, VmExit, Watchpoint,
};
use krr_machine::cpuid::CpuidConfig;
use krr_machine::platform::VIRTIO_BASE;
use krr_record::abi::{self, EventBody};
use krr_record::checkpoint::KernelImage;
use krr_record::event::{GprSnapshot, InterruptKind, LogEvent};
use krr_record::log::DmaLogReader;
use krr_record::recording::{self, CpuSnapshot, RecordingHeader};
use std::path::{Path, PathBuf};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
#[derive(Clone)]
pub(crate) struct CpuProgress {
    /// In user mode: the kernel waits for the vCPU's next recorded entry.
    in_user: bool,
    /// The recording's kernel count at the snapshot (replay counts from 0).
    base_kernel: u64,
    /// An exception or interrupt from user mode was injected and is
    /// delivered by the vCPU's next run: until then it stands at the user
    /// instruction, not at the kernel's entry point.
    delivery_pending: bool,
    /// The agent seq of a shared-memory read whose load the vCPU made before
    /// its last slice ended in the kernel, between the load and the record
    /// (see [`Replayer::shared_load_in_flight`]): its next stint must not
    /// write it back.
    loaded_before_slice_end: Option<u64>,
}

impl Replayer {
    /// The RIP of vCPU `cpu` (0 where it cannot be read), for reports.
    fn rip(&self, cpu: usize) -> u64 {
        self.vcpus[cpu].regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Replays to the end of the log (or `--until-event`).
    pub fn run(&mut self, opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
        let mut session = self.start(opts)?;
        loop {
            if let Turn::Ended(end) = self.turn(&mut session, opts)? {
                return Ok(self.finish(session, end));
            }
        }
    }

    /// Prepares a replay from the recording's start: the log opened, every
    /// vCPU where the snapshot left it. [`Replayer::turn`] then advances it.
    pub fn start(&mut self, opts: &ReplayOptions) -> Result<ReplaySession, ReplayError> {
        let start = Instant::now();
        let events_path = self.dir.join(recording::EVENTS_FILE);
        let dma_path = self.dir.join(recording::DMA_FILE);
        let src = EventSource::open(&events_path, !self.complete)?;
        let progress: Vec<CpuProgress> = self
            .cpus
            .iter()
            .map(|c| CpuProgress {
                in_user: c.sregs.cs.dpl == 3,
                base_kernel: c.kernel_icount,
                delivery_pending: false,
                loaded_before_slice_end: None,
            })
            .collect();
        let entries = 0u64;
        let user = paging::UserWrite::default();
        let dma_reader = DmaLogReader::open(&dma_path).ok();
        let console = ConsoleBuffer::new();
        let serial_lcr = 0u8;
        // `reaches`: blocks entered at the symbol are counted (a breakpoint
        // would split the blocks replay counts by); the first run after
        // which the count is non-zero is where the kernel got there.
        if let Some(symbol) = &opts.reaches {
            let addr = self.symbols.address(symbol).ok_or_else(|| {
                ReplayError::Setup(format!(
                    "--reaches {symbol}: no such symbol in the kernel's System.map"
                ))
            })?;
            self.vcpus[0]
                .watch_block(Some(addr))
                .map_err(|e| ReplayError::Setup(format!("watching {symbol}: {e}")))?;
        }
        let reached: Option<Reached> = None;
        // The user memory read in a stretch of kernel execution that did
        // not start with a kernel entry (the snapshot's, a resumed slice's)
        // is still to be written.
        let segment_reads_due = true;
        let checkpoints = CheckpointTally::default();
        let stall_after =
            std::time::Duration::from_secs(opts.stall_seconds.unwrap_or(DEFAULT_STALL_SECONDS));
        let watchdog = Watchdog::new(src.consumed);
        Ok(ReplaySession {
            start,
            src,
            progress,
            entries,
            user,
            dma_reader,
            console,
            serial_lcr,
            reached,
            segment_reads_due,
            checkpoints,
            stall_after,
            watchdog,
            debug: DebugControl::default(),
        })
    }

    /// One turn of the replay: the next event is consumed, or the vCPU it
    /// belongs to runs toward it. A debugger ([`ReplaySession::debug`]) can
    /// make a turn stop early, at a breakpoint, a watched access, after one
    /// instruction or at an exact point.
    ///
    /// Several vCPUs: the log's `Slice` events give the order in which the
    /// recording ran them (one at a time). The vCPU of the next engine
    /// event is the one to run; it runs to the end of its slice (a kernel
    /// instruction count, or its return to user mode), meeting its own
    /// events on the way, and then the next slice's vCPU takes over.
    pub fn turn(
        &mut self,
        session: &mut ReplaySession,
        opts: &ReplayOptions,
    ) -> Result<Turn, ReplayError> {
        let ReplaySession {
            src,
            progress,
            entries,
            user,
            dma_reader,
            console,
            serial_lcr,
            reached,
            segment_reads_due,
            checkpoints,
            stall_after,
            watchdog,
            debug,
            ..
        } = session;
        let until = opts.until_event.unwrap_or(u64::MAX);
        let end = 'turn: {
            if debug.stop_at_event.is_some_and(|n| src.consumed >= n) {
                debug.stop_at_event = None;
                let cpu = src.peek().map_or(0, |(_, e)| usize::from(e.cpu()));
                return Ok(Turn::Stopped(DebugStop::AtEvent { cpu }));
            }
            if src.consumed >= until {
                break 'turn ReplayEnd::StoppedAt {
                    event: src.consumed,
                };
            }
            // Console bytes the log gave since the last run, compared.
            if src.console.mismatch().is_some() {
                let cpu = src
                    .peek()
                    .map(|(_, e)| usize::from(e.cpu()))
                    .filter(|&c| c < self.vcpus.len())
                    .unwrap_or(0);
                let kernel_now = self.kernel_now(progress, cpu);
                let rip = self.symbolize(self.rip(cpu));
                if let Some(end) = console_end(src, console, false, kernel_now, rip) {
                    break 'turn end;
                }
            }
            let mut stand_in = false;
            let next = src.peek().cloned().or_else(|| {
                // The log is exhausted, but a debugger's point lies in a
                // vCPU's last stretch of kernel code (after its last event,
                // up to where the recording ended, which a debugger's
                // limits split into several runs): run on toward it. The
                // stand-in event is never consumed: none is left.
                let at = debug.stop_at?;
                let now = self.kernel_now(progress, at.cpu);
                let end = *self.recorded_end_icounts.get(at.cpu)?;
                let open = self.complete && src.broken.is_none() && !progress[at.cpu].in_user;
                // A run ends at a block boundary, up to a block past the
                // recorded end.
                (open && now < at.count && at.count <= end.saturating_add(MAX_BLOCK_INSNS)).then(
                    || {
                        let placeholder = LogEvent::Rdtsc {
                            cpu: at.cpu as u16,
                            at: Position::default(),
                            value: 0,
                        };
                        stand_in = true;
                        (src.consumed, placeholder)
                    },
                )
            });
            let Some((index, event)) = next else {
                break 'turn match (&src.broken, self.complete) {
                    (None, true) => ReplayEnd::Matched,
                    (Some(why), true) => ReplayEnd::LogEnded {
                        events: src.consumed,
                        why: why.clone(),
                    },
                    (Some(why), false) => ReplayEnd::LogEnded {
                        events: src.consumed,
                        why: format!("the recording did not finish (no end.json) and its log is cut: {why}"),
                    },
                    (None, false) => ReplayEnd::LogEnded {
                        events: src.consumed,
                        why: "the recording did not finish (no end.json): the recorder was killed or is still running".into(),
                    },
                };
            };
            let cpu = usize::from(event.cpu());
            if cpu >= self.vcpus.len() {
                break 'turn ReplayEnd::Diverged(Divergence {
                    event: index,
                    expected: format!("#{index} {event}"),
                    found: format!("a machine of {} vCPUs", self.vcpus.len()),
                    rip: String::new(),
                    kernel_icount: 0,
                    recent: src.recent_lines(),
                });
            }
            // The replay's kernel count on this vCPU, as the recording counts it.
            let kernel_now = self.kernel_now(progress, cpu);
            // Progress watchdog: every turn of this loop consumes an event
            // or runs kernel code; one that keeps doing neither is stuck.
            let stalled =
                watchdog.stalled(src.consumed, kernel_total(&self.vcpus), cpu, *stall_after);
            if let Some(why) = stalled {
                let rip = self.rip(cpu);
                let mode = if progress[cpu].in_user {
                    "user mode"
                } else {
                    "the kernel"
                };
                break 'turn ReplayEnd::Stalled(Divergence {
                    event: index,
                    expected: format!("#{index} {event}"),
                    found: format!(
                        "{why}; vCPU {cpu} in {mode} at kernel instruction {kernel_now}, next stop {:?}",
                        src.next_stop()
                    ),
                    rip: symbolize(&self.symbols, rip),
                    kernel_icount: kernel_now,
                    recent: src.recent_lines(),
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
                    recent: src.recent_lines(),
                })
            };
            if let LogEvent::Startup { vector, .. } = event {
                src.pop();
                if let Err(e) = self.start_ap(cpu, vector) {
                    return Err(ReplayError::Setup(format!("starting vCPU {cpu}: {e}")));
                }
                progress[cpu].in_user = false;
                return Ok(Turn::Continue);
            }
            if progress[cpu].in_user {
                // The kernel is not running on this vCPU: the next event
                // must enter it, or end the vCPU's slice in user mode.
                if let LogEvent::Slice { at, .. } = &event {
                    if at.cpl != 3 || at.kernel_icount != kernel_now {
                        break 'turn diverged(
                            &self.symbols,
                            src,
                            format!("#{index} {event}"),
                            format!("vCPU {cpu} in user mode at kernel instruction {kernel_now}"),
                            self.rip(cpu),
                        );
                    }
                    src.pop();
                    *segment_reads_due = true;
                    return Ok(Turn::Continue);
                }
                let Some(seq) = entry_seq(&event) else {
                    break 'turn diverged(
                        &self.symbols,
                        src,
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
                let end_rip = src.next_boundary_kernel_rip();
                let Some(reads) = src.agent_before(end_seq, cpu, end_rip.is_some()) else {
                    break 'turn agent_records_missing(
                        src,
                        format!("the kernel stint after event #{index} (from agent seq {seq})"),
                    );
                };
                let stint = StintBounds {
                    end: end_seq,
                    loaded_before: progress[cpu].loaded_before_slice_end.take(),
                    ends_in_hook: self.shared_read_unlogged_at(cpu, end_rip),
                };
                self.apply_user_reads(cpu, &reads, stint, user);
                *segment_reads_due = false;
                if let Err(e) = self.enter_kernel(cpu, &event) {
                    break 'turn diverged(
                        &self.symbols,
                        src,
                        format!("#{index} {event}"),
                        format!("cannot enter the kernel: {e}"),
                        0,
                    );
                }
                *entries += 1;
                progress[cpu].in_user = false;
                progress[cpu].delivery_pending = !matches!(event, LogEvent::Syscall { .. });
                return Ok(Turn::Continue);
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
                            break 'turn diverged(
                                &self.symbols,
                                src,
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
                    LogEvent::Slice { at, agent_seq, .. } => {
                        if now.rip != at.rip {
                            break 'turn diverged(
                                &self.symbols,
                                src,
                                format!("#{index} {event}"),
                                format!("vCPU {cpu} at rip {:#x}", now.rip),
                                now.rip,
                            );
                        }
                        src.pop();
                        progress[cpu].loaded_before_slice_end =
                            self.shared_load_in_flight(src, cpu, *agent_seq);
                        *segment_reads_due = true;
                    }
                    LogEvent::Checkpoint { regs, sha256, .. } => {
                        let total = kernel_total(&self.vcpus);
                        if !opts.skip_checkpoints && checkpoints.due(opts.verify_every, total) {
                            if let Some((expected, found)) =
                                self.check_checkpoint(cpu, regs, sha256)
                            {
                                break 'turn diverged(
                                    &self.symbols,
                                    src,
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
                return Ok(Turn::Continue);
            }
            if let Some(target) = target {
                if kernel_now > target {
                    break 'turn diverged(
                        &self.symbols,
                        src,
                        format!("#{index} {event}"),
                        format!("the replay is already at kernel instruction {kernel_now}"),
                        self.rip(cpu),
                    );
                }
            }
            if *segment_reads_due {
                *segment_reads_due = false;
                let end_seq = src.next_boundary_seq();
                let end_rip = src.next_boundary_kernel_rip();
                let Some(reads) = src.agent_before(end_seq, cpu, end_rip.is_some()) else {
                    break 'turn agent_records_missing(
                        src,
                        format!("the kernel stint before event #{index}"),
                    );
                };
                let stint = StintBounds {
                    end: end_seq,
                    loaded_before: progress[cpu].loaded_before_slice_end.take(),
                    ends_in_hook: self.shared_read_unlogged_at(cpu, end_rip),
                };
                self.apply_user_reads(cpu, &reads, stint, user);
            }
            // The stand-in of a debugger's point in the last stretch: that
            // point bounds the run (it may lie a block past the recorded
            // end, where the recording's last run stopped).
            let end_icount = match stand_in {
                false => self.recorded_end_icounts.get(cpu).copied(),
                true => None,
            };
            // The run toward the event stops at the first block boundary at
            // or past the recording's end: already there, no run can meet
            // the event within the recording.
            if let (None, Some(limit)) = (target, end_icount) {
                if kernel_now >= limit {
                    break 'turn diverged(
                        &self.symbols,
                        src,
                        format!("#{index} {event}"),
                        format!(
                            "vCPU {cpu} got to the recording's end ({limit} instructions) without meeting the event"
                        ),
                        self.rip(cpu),
                    );
                }
            }
            let mut budget = match (target, end_icount) {
                (Some(t), _) => Some(t - kernel_now),
                // Where the recording ended, if the log ends first (the
                // replay's end is then the recorded one, in every mode).
                (None, Some(limit)) => Some(limit - kernel_now),
                (None, None) => None,
            };
            // A debugger's goto-event: the run ends with the block of the
            // last event to consume (events inside a block are positioned
            // at its end), before it can consume the next one.
            if let Some(n) = debug.stop_at_event {
                let last = src
                    .engine
                    .iter()
                    .take_while(|(i, _)| *i < n)
                    .last()
                    .filter(|(_, e)| usize::from(e.cpu()) == cpu)
                    .and_then(|(_, e)| position_of(e));
                if let Some(at) = last.filter(|at| at.cpl != 3 && at.kernel_icount > kernel_now) {
                    let run = at.kernel_icount - kernel_now;
                    budget = Some(budget.map_or(run, |b| b.min(run)));
                }
            }
            // A debugger's limits on this run. A run stops at the first
            // block boundary at or past its budget, so a count is reached
            // exactly by running to within a block of it and stepping.
            let mut step_once = debug.step == Some(cpu);
            if let Some(at) = debug.stop_at.filter(|at| at.cpu == cpu) {
                if kernel_now >= at.count {
                    // Here, or past it without having been there exactly
                    // (then the debugger says the point was not found).
                    return Ok(Turn::Stopped(DebugStop::AtCount { cpu }));
                }
                let left = at.count - kernel_now;
                if left <= MAX_BLOCK_INSNS {
                    step_once = true;
                } else {
                    let run = left - MAX_BLOCK_INSNS;
                    budget = Some(budget.map_or(run, |b| b.min(run)));
                }
            }
            if let Some(most) = debug.max_run {
                budget = Some(budget.map_or(most, |b| b.min(most)));
            }
            if step_once {
                self.vcpus[cpu]
                    .set_single_step(true)
                    .map_err(|e| ReplayError::Setup(e.to_string()))?;
            }
            let ring_phys = self.header.ring.map(|r| r.phys);
            let mut bus = ReplayBus {
                src,
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
                console: std::mem::take(console),
                serial_lcr: *serial_lcr,
                echo: opts.echo_console,
                stepping: step_once,
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
            if step_once {
                self.vcpus[cpu]
                    .set_single_step(false)
                    .map_err(|e| ReplayError::Setup(e.to_string()))?;
            }
            *console = std::mem::take(&mut bus.console);
            *serial_lcr = bus.serial_lcr;
            *dma_reader = bus.dma.take();
            let ranges = std::mem::take(&mut bus.dma_ranges);
            let divergence = bus.divergence.take();
            let log_end = bus.log_end;
            drop(bus);
            for (gpa, len) in ranges {
                let _ = self.vm.invalidate_code(gpa, len);
            }
            let kernel_after = self.kernel_now(progress, cpu);
            // Where the recording ended on this vCPU, with nothing left to
            // replay: a triple fault or a halt there is the recorded end.
            let at_recorded_end = |src: &mut EventSource| {
                self.recorded_end_icounts.get(cpu) == Some(&kernel_after) && src.peek().is_none()
            };
            if let Some((i, expected, found)) = divergence {
                let rip = self.rip(cpu);
                break 'turn ReplayEnd::Diverged(Divergence {
                    event: i,
                    expected,
                    found,
                    rip: self.symbolize(rip),
                    kernel_icount: kernel_after,
                    recent: src.recent_lines(),
                });
            }
            if src.console.mismatch().is_some() {
                let rip = self.symbolize(self.rip(cpu));
                if let Some(end) = console_end(src, console, false, kernel_after, rip) {
                    break 'turn end;
                }
            }
            if let (None, Some(symbol)) = (&reached, &opts.reaches) {
                if self.vcpus[cpu].watch_hits().unwrap_or(0) > 0 {
                    *reached = Some(Reached {
                        symbol: symbol.clone(),
                        cpu,
                        kernel_icount: kernel_after,
                    });
                }
            }
            if log_end {
                // The loop's next look at the log ends the replay.
                return Ok(Turn::Continue);
            }
            match exit {
                Ok(VmExit::UserMode { .. }) => progress[cpu].in_user = true,
                Ok(VmExit::BudgetExhausted) | Ok(VmExit::Hlt) | Ok(VmExit::IoStop) => {}
                // Replay does not ask for spin stops: it follows the
                // recording's slices.
                Ok(VmExit::InterruptWindow)
                | Ok(VmExit::Debug { .. })
                | Ok(VmExit::Spin)
                | Ok(VmExit::Watchpoint) => {}
                Ok(VmExit::Shutdown) => {
                    // The recording's own end, if it ended with this
                    // vCPU's triple fault here.
                    if self.recorded_triple_fault == Some(cpu) && at_recorded_end(src) {
                        return Ok(Turn::Continue);
                    }
                    let (i, expected) = match src.peek().cloned() {
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
                    break 'turn ReplayEnd::Diverged(Divergence {
                        event: i,
                        expected,
                        found: format!(
                            "a triple fault on vCPU {cpu} at kernel instruction {kernel_after} ({recorded})"
                        ),
                        rip: self.symbolize(self.rip(cpu)),
                        kernel_icount: kernel_after,
                        recent: src.recent_lines(),
                    });
                }
                Err(e) => return Err(ReplayError::Setup(format!("the software CPU failed: {e}"))),
            }
            // A halted kernel with no interrupt to come would spin here,
            // unless that is how the recording ended (every vCPU halted
            // for good: a power-off without ACPI, `halt -f`).
            if matches!(exit, Ok(VmExit::Hlt)) && target.is_none() {
                if at_recorded_end(src) {
                    return Ok(Turn::Continue);
                }
                break 'turn diverged(
                    &self.symbols,
                    src,
                    format!("#{index} {event}"),
                    "the kernel halted waiting for an interrupt".into(),
                    self.rip(cpu),
                );
            }
            if let Some(at) = debug.stop_at.filter(|at| at.cpu == cpu) {
                let here = kernel_after == at.count && at.rip.is_none_or(|r| r == self.rip(cpu));
                if here || kernel_after > at.count {
                    return Ok(Turn::Stopped(DebugStop::AtCount { cpu }));
                }
            }
            // A watched access (a stepped instruction's too).
            if let Ok(VmExit::Watchpoint) | Ok(VmExit::Debug { .. }) = exit {
                if let Some(hit) = self.vcpus[cpu].take_watch_hit() {
                    let base = progress[cpu].base_kernel;
                    return Ok(Turn::Stopped(DebugStop::Watch {
                        cpu,
                        hit,
                        before: StopAt {
                            cpu,
                            count: base.saturating_add(hit.kernel_icount),
                            rip: Some(hit.rip),
                        },
                    }));
                }
            }
            if let Ok(VmExit::Debug { rip }) = exit {
                if debug.step == Some(cpu) {
                    debug.step = None;
                    return Ok(Turn::Stopped(DebugStop::Stepped { cpu }));
                }
                if !step_once || debug.breakpoints.contains(&rip) {
                    return Ok(Turn::Stopped(DebugStop::Breakpoint { cpu, rip }));
                }
            }
            return Ok(Turn::Continue);
        };
        Ok(Turn::Ended(end))
    }

    /// The report of a replay that ended with `end`: the console output is
    /// compared with the recorded one first.
    pub fn finish(&mut self, session: ReplaySession, end: ReplayEnd) -> ReplayReport {
        let ReplaySession {
            start,
            src,
            entries,
            user,
            console,
            reached,
            checkpoints,
            ..
        } = session;
        // The replay's console must reproduce the recorded one: all of it
        // when the whole log was replayed, else up to where the replay got.
        let at_end = matches!(end, ReplayEnd::Matched);
        let console_matches = match at_end {
            true => src.console.is_equal(),
            false => src.console.is_prefix(),
        };
        let kernel_instructions = kernel_total(&self.vcpus);
        let end = match end {
            ReplayEnd::Matched => {
                console_end(&src, &console, true, kernel_instructions, String::new())
                    .unwrap_or(ReplayEnd::Matched)
            }
            other => other,
        };
        ReplayReport {
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
            user_bytes_written: user.written,
            user_bytes_unmapped: user.not_present,
            user_bytes_refused: user.refused,
            console_matches,
            reached,
            console_bytes: console.end(),
            console_dropped_bytes: console.start(),
            console: console.held().to_vec(),
        }
    }
}

/// The end of a replay whose console output does not match the recorded
/// one where it stands (`at_end`: the whole log was replayed, so it must
/// equal it); `None` when it matches.
fn console_end(
    src: &EventSource,
    console: &ConsoleBuffer,
    at_end: bool,
    kernel_icount: u64,
    rip: String,
) -> Option<ReplayEnd> {
    Some(match src.console.problem(at_end, console)? {
        ConsoleProblem::Diverged { expected, found } => ReplayEnd::Diverged(Divergence {
            event: src.consumed,
            expected,
            found,
            rip,
            kernel_icount,
            recent: src.recent_lines(),
        }),
        ConsoleProblem::Unsupported { why } => ReplayEnd::Unsupported { why },
    })
}

/// The end of a replay that reached `stint` without the agent records it
/// needs: the log is damaged, or the recording did not finish (killed; the
/// agent drains its ring in batches, so records of user memory the kernel
/// read can be missing before an entry or engine event that did reach the
/// log). Replaying the stint without them could diverge for want of them.
fn agent_records_missing(src: &EventSource, stint: String) -> ReplayEnd {
    let why = match (&src.broken, src.unfinished) {
        (Some(broken), true) => {
            format!("the recording did not finish (no end.json) and its log is cut: {broken}")
        }
        (Some(broken), false) => broken.clone(),
        (None, _) => "the recording did not finish (no end.json)".into(),
    };
    ReplayEnd::LogEnded {
        events: src.consumed,
        why: format!(
            "{why}; the agent records {stint} needs are not in the valid part of the log: replayed up to it"
        ),
    }
}

/// The injection of a recorded external interrupt or NMI.
fn interrupt_injection(kind: InterruptKind, vector: u8) -> Injection {
    match kind {
        InterruptKind::Nmi => Injection::Nmi,
        InterruptKind::External => Injection::Interrupt(vector),
    }
}

/// The most instructions the software CPU puts in one block (QEMU's
/// `TCG_MAX_INSNS`): a run with a budget stops at most this far past it.
const MAX_BLOCK_INSNS: u64 = 512;

impl Replayer {
    /// vCPU `cpu`'s kernel instruction count as the recording counts it
    /// (from the recording's start: the replay's vCPUs count from 0).
    fn kernel_now(&self, progress: &[CpuProgress], cpu: usize) -> u64 {
        // (The base comes from the recording: saturating, a hostile one
        // makes the replay diverge rather than overflow.)
        progress[cpu]
            .base_kernel
            .saturating_add(self.vcpus[cpu].kernel_instructions_retired().unwrap_or(0))
    }
}

/// Kernel instructions retired by all vCPUs.
fn kernel_total(vcpus: &[Box<dyn Vcpu>]) -> u64 {
    vcpus
        .iter()
        .map(|v| v.kernel_instructions_retired().unwrap_or(0))
        .sum()
}

fn symbolize(symbols: &Symbols, rip: u64) -> String {
    if symbols.is_empty() {
        format!("{rip:#x}")
    } else {
        symbols.name(rip)
    }
}
