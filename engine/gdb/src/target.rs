// SPDX-License-Identifier: GPL-2.0-or-later
//! The replay as gdb sees it: vCPUs as threads, memory through the vCPU's
//! page tables, breakpoints that leave guest memory alone, execution
//! forwards (turns of the replay) and backwards (re-execution from the
//! recording's start to an exact point: deterministic replay makes the
//! past reachable again).

use crate::regs;
use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::reverse_exec::{
    ReplayLogPosition, ReverseCont, ReverseContOps, ReverseStep, ReverseStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind as GdbWatchKind,
};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::X86_64_SSE;
use krr_hypervisor::{FpuState, Regs, Sregs, WatchKind, Watchpoint};
use krr_replay::{
    DebugStop, ReplayEnd, ReplayError, ReplayOptions, ReplaySession, ReplaySnapshot, Replayer,
    StartImage, StopAt, Turn,
};
use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// What gdb is told when the replay stops.
pub type StopReason = MultiThreadStopReason<u64>;

/// The longest run of a vCPU in one turn while gdb waits: Ctrl-C is
/// noticed between turns.
const RUN_CHUNK: u64 = 2_000_000;
/// Kernel instructions of replay between two snapshots, by default (a
/// snapshot compares the guest's RAM with the start image: about 0.2 s
/// for 512 MiB here).
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100_000_000;

/// How long [`ReplayTarget::advance`] works before it lets the stub look
/// for Ctrl-C.
const POLL_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("{0}")]
    Other(String),
}

/// What gdb asked for and the replay still has to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Continue,
    Step(usize),
    ReverseStep(usize),
    ReverseContinue,
}

/// A breakpoint hit or watched access met on the way to a point
/// (reverse-continue): the point right before the instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hit {
    cpu: usize,
    count: u64,
    rip: u64,
    /// A watched access: how gdb is told.
    watch: Option<(GdbWatchKind, u64)>,
}

/// How gdb is told of a watched access.
fn watch_reason(hit: &krr_hypervisor::WatchHit) -> (GdbWatchKind, u64) {
    let kind = if hit.write {
        GdbWatchKind::Write
    } else {
        GdbWatchKind::Read
    };
    (kind, hit.watchpoint.addr)
}

/// A replay under gdb's control.
pub struct ReplayTarget {
    dir: PathBuf,
    /// The recording's start memory, shared by every restart.
    start: StartImage,
    /// Snapshots of the replay, by the sum of the vCPUs' kernel counts
    /// (which only grows as a replay goes on).
    snapshots: BTreeMap<u64, ReplaySnapshot>,
    /// Kernel instructions between two snapshots.
    snapshot_every: u64,
    /// Host memory the snapshots may take.
    snapshot_budget: usize,
    opts: ReplayOptions,
    replayer: Replayer,
    session: ReplaySession,
    /// Each vCPU's kernel count at the recording's start.
    start_counts: Vec<u64>,
    breakpoints: Vec<u64>,
    watchpoints: Vec<Watchpoint>,
    /// The vCPU gdb asked to step, while resume actions are collected.
    step_request: Option<usize>,
    pending: Option<Action>,
    ended: Option<ReplayEnd>,
    /// The vCPU of the last stop.
    current: usize,
    /// `monitor allow-writes`: gdb may write registers and memory.
    writes_allowed: bool,
    /// gdb wrote since the replay last (re)started: its state is no longer
    /// the recording's, so no snapshot is taken and checkpoints are not
    /// compared until going back restores the recorded past.
    written: bool,
}

pub(crate) fn tid(cpu: usize) -> Tid {
    NonZeroUsize::new(cpu + 1).expect("cpu + 1 is not zero")
}

fn cpu_of(tid: Tid) -> usize {
    tid.get() - 1
}

impl ReplayTarget {
    /// Opens the recording at `dir`, positioned at its start.
    pub fn open(dir: &Path, opts: ReplayOptions) -> Result<ReplayTarget, GdbError> {
        let start = StartImage::load(dir)?;
        let mut replayer = Replayer::open_from(dir, &start)?;
        let session = replayer.start(&opts)?;
        let start_counts = (0..replayer.vcpus().len())
            .map(|cpu| replayer.kernel_count(&session, cpu))
            .collect();
        let snapshot_budget = replayer.header().mem_bytes as usize;
        Ok(ReplayTarget {
            dir: dir.to_path_buf(),
            start,
            snapshots: BTreeMap::new(),
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            snapshot_budget,
            opts,
            replayer,
            session,
            start_counts,
            breakpoints: Vec::new(),
            watchpoints: Vec::new(),
            step_request: None,
            pending: None,
            ended: None,
            current: 0,
            writes_allowed: false,
            written: false,
        })
    }

    /// Takes a snapshot every `instructions` kernel instructions of
    /// replay (0: none).
    pub fn set_snapshot_interval(&mut self, instructions: u64) {
        self.snapshot_every = instructions;
    }

    /// Snapshots held, and the host memory they take.
    pub fn snapshot_usage(&self) -> (usize, usize) {
        let bytes = self.snapshots.values().map(ReplaySnapshot::bytes).sum();
        (self.snapshots.len(), bytes)
    }

    /// The sum of the vCPUs' kernel counts: where the replay stands.
    fn total(&self) -> u64 {
        (0..self.replayer.vcpus().len())
            .map(|c| self.count(c))
            .sum()
    }

    /// Takes a snapshot here if the last one before is far enough back and
    /// the replay is at a point one can be restored exactly; drops the
    /// oldest ones beyond the memory budget.
    fn maybe_snapshot(&mut self) -> Result<(), GdbError> {
        // A state gdb wrote is not the recording's: never a point to come
        // back to.
        if self.snapshot_every == 0 || self.written {
            return Ok(());
        }
        let total = self.total();
        // From the last snapshot before, or the recording's start.
        let start: u64 = self.start_counts.iter().sum();
        let since = self
            .snapshots
            .range(..=total)
            .next_back()
            .map_or(total - start, |(&at, _)| total - at);
        let until = self
            .snapshots
            .range(total..)
            .next()
            .map_or(u64::MAX, |(&at, _)| at - total);
        if since < self.snapshot_every || until < self.snapshot_every {
            return Ok(());
        }
        if let Some(snap) = self.replayer.snapshot(&self.session, &self.start)? {
            self.snapshots.insert(total, snap);
            while self.snapshot_usage().1 > self.snapshot_budget && self.snapshots.len() > 1 {
                self.snapshots.pop_first();
            }
        }
        Ok(())
    }

    /// The replayer (symbols, header, vCPUs).
    pub fn replayer(&self) -> &Replayer {
        &self.replayer
    }

    /// Runs forward to the replay's end (`--at-end`: start debugging a
    /// crash from where it happened, ready to go backwards).
    pub fn run_to_end(&mut self) -> Result<&ReplayEnd, GdbError> {
        self.session.debug.max_run = None;
        loop {
            match self.replayer.turn(&mut self.session, &self.opts)? {
                Turn::Ended(end) => {
                    self.current = self.busiest_cpu();
                    return Ok(self.ended.insert(end));
                }
                Turn::Continue => self.maybe_snapshot()?,
                Turn::Stopped(_) => {}
            }
        }
    }

    /// The vCPU of the last event consumed (where the replay stands).
    fn busiest_cpu(&self) -> usize {
        (0..self.replayer.vcpus().len())
            .max_by_key(|&c| self.count(c))
            .unwrap_or(0)
    }

    fn count(&self, cpu: usize) -> u64 {
        self.replayer.kernel_count(&self.session, cpu)
    }

    fn rip(&self, cpu: usize) -> u64 {
        self.replayer.vcpus()[cpu]
            .regs()
            .map(|r| r.rip)
            .unwrap_or(0)
    }

    /// Works on what gdb asked for, for about [`POLL_EVERY`] at most when
    /// going forwards; `Some` when the replay stopped.
    pub fn advance(&mut self) -> Result<Option<StopReason>, GdbError> {
        let stop = match self.pending {
            None => return Ok(None),
            Some(Action::Continue) => self.forward(None)?,
            Some(Action::Step(cpu)) => self.forward(Some(cpu))?,
            Some(Action::ReverseStep(cpu)) => {
                let stop = self.reverse_step(cpu);
                Some(self.or_stop_there(stop)?)
            }
            Some(Action::ReverseContinue) => {
                let stop = self.reverse_continue();
                Some(self.or_stop_there(stop)?)
            }
        };
        if stop.is_some() {
            self.pending = None;
        }
        Ok(stop)
    }

    /// A point that could not be reached (the replay ended or diverged on
    /// the way) stops the session where the replay got, with the reason on
    /// the terminal; the session goes on.
    fn or_stop_there(
        &mut self,
        stop: Result<StopReason, GdbError>,
    ) -> Result<StopReason, GdbError> {
        match stop {
            Err(GdbError::Other(why)) => {
                eprintln!("krr: {why}");
                Ok(MultiThreadStopReason::SignalWithThread {
                    tid: tid(self.current),
                    signal: Signal::SIGABRT,
                })
            }
            other => other,
        }
    }

    /// gdb interrupted (Ctrl-C): the replay stays where it is.
    pub fn interrupt(&mut self) -> StopReason {
        self.pending = None;
        self.session.debug.step = None;
        MultiThreadStopReason::SignalWithThread {
            tid: tid(self.current),
            signal: Signal::SIGINT,
        }
    }

    fn end_reason(&self) -> StopReason {
        match &self.ended {
            Some(ReplayEnd::Diverged(_)) | Some(ReplayEnd::Stalled(_)) => {
                MultiThreadStopReason::SignalWithThread {
                    tid: tid(self.current),
                    signal: Signal::SIGABRT,
                }
            }
            _ => MultiThreadStopReason::ReplayLog {
                tid: Some(tid(self.current)),
                pos: ReplayLogPosition::End,
            },
        }
    }

    fn forward(&mut self, step: Option<usize>) -> Result<Option<StopReason>, GdbError> {
        if self.ended.is_some() {
            return Ok(Some(self.end_reason()));
        }
        self.session.debug.step = step;
        self.session.debug.max_run = Some(RUN_CHUNK);
        let began = Instant::now();
        while began.elapsed() < POLL_EVERY {
            match self.replayer.turn(&mut self.session, &self.opts)? {
                Turn::Continue => self.maybe_snapshot()?,
                Turn::Stopped(DebugStop::Breakpoint { cpu, .. }) => {
                    self.current = cpu;
                    self.session.debug.step = None;
                    return Ok(Some(MultiThreadStopReason::SwBreak(tid(cpu))));
                }
                Turn::Stopped(DebugStop::Watch { cpu, hit, .. }) => {
                    self.current = cpu;
                    self.session.debug.step = None;
                    let (kind, addr) = watch_reason(&hit);
                    return Ok(Some(MultiThreadStopReason::Watch {
                        tid: tid(cpu),
                        kind,
                        addr,
                    }));
                }
                Turn::Stopped(DebugStop::Stepped { cpu })
                | Turn::Stopped(DebugStop::AtCount { cpu })
                | Turn::Stopped(DebugStop::AtEvent { cpu }) => {
                    self.current = cpu;
                    return Ok(Some(MultiThreadStopReason::SignalWithThread {
                        tid: tid(cpu),
                        signal: Signal::SIGTRAP,
                    }));
                }
                Turn::Ended(end) => {
                    self.session.debug.step = None;
                    eprintln!("krr: {}", describe_end(&end));
                    if self.written && matches!(end, ReplayEnd::Diverged(_)) {
                        eprintln!("krr: this follows gdb's writes to the replay: forward execution cannot follow the recording from here; reverse-stepi, reverse-continue or monitor goto-* go back to the recorded past (without the writes)");
                    }
                    self.ended = Some(end);
                    return Ok(Some(self.end_reason()));
                }
            }
        }
        Ok(None)
    }

    /// A fresh replay of the recording from its start, with no
    /// breakpoints applied.
    fn restart(&mut self) -> Result<(), GdbError> {
        self.restart_from(None)
    }

    /// A fresh replay from the snapshot at `origin` (a key of
    /// `snapshots`), or the recording's start, with no breakpoints applied.
    fn restart_from(&mut self, origin: Option<u64>) -> Result<(), GdbError> {
        let snap = origin.and_then(|key| self.snapshots.get(&key));
        let (replayer, session) = match snap {
            Some(snap) => Replayer::restore(&self.dir, &self.start, snap)?,
            None => {
                let mut replayer = Replayer::open_from(&self.dir, &self.start)?;
                let session = replayer.start(&self.opts)?;
                (replayer, session)
            }
        };
        self.replayer = replayer;
        self.session = session;
        self.ended = None;
        self.written = false;
        self.opts.skip_checkpoints = false;
        Ok(())
    }

    /// vCPU `cpu`'s registers, segment registers and FPU state, as gdb's
    /// register accesses need them.
    fn vcpu_state(&self, cpu: usize) -> Result<(Regs, Sregs, FpuState), TargetError<GdbError>> {
        let vcpu = self
            .replayer
            .vcpus()
            .get(cpu)
            .ok_or(TargetError::NonFatal)?;
        match (vcpu.regs(), vcpu.sregs(), vcpu.fpu()) {
            (Ok(r), Ok(s), Ok(f)) => Ok((r, s, f)),
            _ => Err(TargetError::NonFatal),
        }
    }

    /// Refuses gdb's write unless `monitor allow-writes` was given; marks
    /// the replay as written otherwise.
    fn may_write(&mut self, what: &str) -> bool {
        if !self.writes_allowed {
            eprintln!("krr: gdb asked to write {what}: refused (a replay must stay as recorded; 'monitor allow-writes' permits writes)");
            return false;
        }
        if !self.written {
            eprintln!("krr: writing {what}: the replay's state is no longer the recording's; checkpoints are not compared and no snapshot is taken until going back");
        }
        self.written = true;
        self.opts.skip_checkpoints = true;
        true
    }

    /// The last snapshot before `at`, going back from `before` (a key) if
    /// given.
    fn snapshot_before(&self, at: &StopAt, before: Option<u64>) -> Option<u64> {
        self.snapshots
            .range(..before.unwrap_or(u64::MAX))
            .rev()
            .find(|(_, s)| s.counts().get(at.cpu).is_some_and(|&c| c < at.count))
            .map(|(&key, _)| key)
    }

    fn apply_breakpoints(&mut self) -> Result<(), GdbError> {
        let bps = self.breakpoints.clone();
        self.replayer.set_breakpoints(&mut self.session, &bps)?;
        // A watched page not mapped at this point of the replay (going back
        // to before it was) leaves the watchpoints off; gdb is told so when
        // one is set.
        if let Err(e) = self.replayer.set_watchpoints(&self.watchpoints) {
            eprintln!("krr: watchpoints off here: {e}");
        }
        Ok(())
    }

    /// Replays to `at` from the last snapshot before it (or the start);
    /// with `collect`, with the breakpoints set, returning the hits on the
    /// way.
    fn goto(&mut self, at: StopAt, collect: bool) -> Result<Vec<Hit>, GdbError> {
        let origin = self.snapshot_before(&at, None);
        self.goto_from(origin, at, collect)
    }

    /// [`Self::goto`] from the snapshot `origin` (or the start).
    fn goto_from(
        &mut self,
        origin: Option<u64>,
        at: StopAt,
        collect: bool,
    ) -> Result<Vec<Hit>, GdbError> {
        self.restart_from(origin)?;
        if collect {
            self.apply_breakpoints()?;
        }
        self.session.debug.stop_at = Some(at);
        let mut hits = Vec::new();
        let outcome = loop {
            match self.replayer.turn(&mut self.session, &self.opts) {
                Ok(Turn::Continue) => self.maybe_snapshot()?,
                Ok(Turn::Stopped(DebugStop::Stepped { .. }))
                | Ok(Turn::Stopped(DebugStop::AtEvent { .. })) => {}
                Ok(Turn::Stopped(DebugStop::Breakpoint { cpu, rip })) => hits.push(Hit {
                    cpu,
                    count: self.count(cpu),
                    rip,
                    watch: None,
                }),
                Ok(Turn::Stopped(DebugStop::Watch { hit, before, .. })) => hits.push(Hit {
                    cpu: before.cpu,
                    count: before.count,
                    rip: hit.rip,
                    watch: Some(watch_reason(&hit)),
                }),
                Ok(Turn::Stopped(DebugStop::AtCount { .. })) => break Ok(()),
                Ok(Turn::Ended(end)) => {
                    let why = format!(
                        "the replay ended before vCPU {} got to kernel instruction {}: {}",
                        at.cpu,
                        at.count,
                        describe_end(&end)
                    );
                    self.ended = Some(end);
                    break Err(GdbError::Other(why));
                }
                Err(e) => break Err(e.into()),
            }
        };
        self.session.debug.stop_at = None;
        self.apply_breakpoints()?;
        self.current = at.cpu;
        outcome.map(|()| hits)
    }

    /// Replays from the start until `events` events of the log are
    /// consumed (`monitor goto-event`).
    fn goto_event(&mut self, events: u64) -> Result<(), GdbError> {
        self.restart()?;
        self.session.debug.stop_at_event = Some(events);
        let outcome = loop {
            match self.replayer.turn(&mut self.session, &self.opts) {
                Ok(Turn::Stopped(DebugStop::AtEvent { cpu })) => {
                    self.current = cpu;
                    break Ok(());
                }
                Ok(Turn::Ended(end)) => {
                    let why = format!(
                        "the replay ended before event {events}: {}",
                        describe_end(&end)
                    );
                    self.ended = Some(end);
                    break Err(GdbError::Other(why));
                }
                Ok(_) => {}
                Err(e) => break Err(e.into()),
            }
        };
        self.session.debug.stop_at_event = None;
        self.apply_breakpoints()?;
        outcome
    }

    fn at_start(&self, cpu: usize) -> bool {
        self.count(cpu) <= self.start_counts[cpu]
    }

    fn reverse_step(&mut self, cpu: usize) -> Result<StopReason, GdbError> {
        if self.at_start(cpu) {
            return Ok(MultiThreadStopReason::ReplayLog {
                tid: Some(tid(cpu)),
                pos: ReplayLogPosition::Begin,
            });
        }
        let count = self.count(cpu) - 1;
        self.goto(
            StopAt {
                cpu,
                count,
                rip: None,
            },
            false,
        )?;
        Ok(MultiThreadStopReason::SignalWithThread {
            tid: tid(cpu),
            signal: Signal::SIGTRAP,
        })
    }

    fn reverse_continue(&mut self) -> Result<StopReason, GdbError> {
        let cpu = self.current;
        let now = StopAt {
            cpu,
            count: self.count(cpu),
            rip: Some(self.rip(cpu)),
        };
        // The last hit before now: from the last snapshot before now, then
        // from earlier ones while none is found.
        let here = (cpu, now.count, now.rip.unwrap_or(0));
        let mut origin = self.snapshot_before(&now, None);
        let last = loop {
            let hits = self.goto_from(origin, now, true)?;
            if let Some(h) = hits.into_iter().rfind(|h| (h.cpu, h.count, h.rip) != here) {
                break Some(h);
            }
            match origin {
                Some(key) => origin = self.snapshot_before(&now, Some(key)),
                None => break None,
            }
        };
        match last {
            Some(h) => {
                self.goto(
                    StopAt {
                        cpu: h.cpu,
                        count: h.count,
                        rip: Some(h.rip),
                    },
                    false,
                )?;
                Ok(match h.watch {
                    Some((kind, addr)) => MultiThreadStopReason::Watch {
                        tid: tid(h.cpu),
                        kind,
                        addr,
                    },
                    None => MultiThreadStopReason::SwBreak(tid(h.cpu)),
                })
            }
            None => {
                self.restart()?;
                self.apply_breakpoints()?;
                Ok(MultiThreadStopReason::ReplayLog {
                    tid: Some(tid(cpu)),
                    pos: ReplayLogPosition::Begin,
                })
            }
        }
    }

    /// What `monitor where` prints.
    fn describe_position(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "recording {}: {} events of the log consumed",
            self.dir.display(),
            self.session.events_consumed()
        )];
        for cpu in 0..self.replayer.vcpus().len() {
            let mode = if self.session.in_user_mode(cpu) {
                "in user mode (not replayed)"
            } else {
                "in the kernel"
            };
            let rip = self.rip(cpu);
            lines.push(format!(
                "{} vCPU {cpu} (thread {}): kernel instruction {}, {mode}, rip {rip:#x} {}",
                if cpu == self.current { "*" } else { " " },
                cpu + 1,
                self.count(cpu),
                self.replayer.symbolize(rip)
            ));
        }
        if self.written {
            lines.push("gdb wrote to this replay: its state is not the recording's (going back restores it)".into());
        }
        if let Some(end) = &self.ended {
            lines.push(format!("the replay has ended: {}", describe_end(end)));
        }
        lines
    }
}

/// One line on how a replay ended.
pub fn describe_end(end: &ReplayEnd) -> String {
    match end {
        ReplayEnd::Matched => "replay MATCHED to the recording's end".into(),
        ReplayEnd::StoppedAt { event } => format!("stopped at event {event} as asked"),
        ReplayEnd::Diverged(d) => d.report("DIVERGED").trim_end().to_string(),
        ReplayEnd::Stalled(d) => d.report("STALLED").trim_end().to_string(),
        ReplayEnd::LogEnded { events, why } => {
            format!("the log ends after {events} events, before the recording's end ({why})")
        }
        ReplayEnd::Unsupported { why } => format!("cannot replay: {why}"),
    }
}

impl Target for ReplayTarget {
    type Arch = X86_64_SSE;
    type Error = GdbError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for ReplayTarget {
    fn read_registers(
        &mut self,
        out: &mut gdbstub_arch::x86::reg::X86_64CoreRegs,
        tid: Tid,
    ) -> TargetResult<(), Self> {
        let (r, s, f) = self.vcpu_state(cpu_of(tid))?;
        *out = regs::to_gdb(&r, &s, &f);
        Ok(())
    }

    fn write_registers(
        &mut self,
        regs: &gdbstub_arch::x86::reg::X86_64CoreRegs,
        tid: Tid,
    ) -> TargetResult<(), Self> {
        let cpu = cpu_of(tid);
        let (r, s, f) = self.vcpu_state(cpu)?;
        let new = match regs::from_gdb(regs, &r, &s, &f) {
            Ok(new) => new,
            Err(why) => {
                eprintln!("krr: gdb asked to write registers of vCPU {cpu}: refused: {why}");
                return Err(TargetError::NonFatal);
            }
        };
        if new == r {
            return Ok(());
        }
        if !self.may_write(&format!("registers of vCPU {cpu}")) {
            return Err(TargetError::NonFatal);
        }
        self.replayer
            .set_regs(cpu, &new)
            .map_err(|e| TargetError::Fatal(e.into()))
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let cpu = cpu_of(tid).min(self.replayer.vcpus().len() - 1);
        let cr3 = self.replayer.vcpus()[cpu]
            .sregs()
            .map_err(|_| TargetError::NonFatal)?
            .cr3;
        let mem = self.replayer.memory();
        let mut done = 0;
        while done < data.len() {
            let va = start.wrapping_add(done as u64);
            let Some(gpa) = krr_guest::paging::translate(mem, cr3, va) else {
                break;
            };
            let n = (data.len() - done).min(0x1000 - (va & 0xfff) as usize);
            if mem
                .read_slice(&mut data[done..done + n], GuestAddress(gpa))
                .is_err()
            {
                break;
            }
            done += n;
        }
        if done == 0 {
            // EFAULT: gdb says "Cannot access memory at address ...".
            return Err(TargetError::Errno(14));
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        if !self.may_write(&format!("memory at {start:#x}")) {
            return Err(TargetError::NonFatal);
        }
        let cpu = cpu_of(tid).min(self.replayer.vcpus().len() - 1);
        let cr3 = self.replayer.vcpus()[cpu]
            .sregs()
            .map_err(|_| TargetError::NonFatal)?
            .cr3;
        // Every page first, so that a write is done whole or not at all.
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < data.len() {
            let va = start.wrapping_add(done as u64);
            let Some(gpa) = krr_guest::paging::translate(self.replayer.memory(), cr3, va) else {
                eprintln!("krr: memory write at {va:#x}: not mapped; nothing written");
                return Err(TargetError::Errno(14));
            };
            let n = (data.len() - done).min(0x1000 - (va & 0xfff) as usize);
            pieces.push((gpa, done..done + n));
            done += n;
        }
        for (gpa, range) in pieces {
            self.replayer
                .write_memory(gpa, &data[range])
                .map_err(|e| TargetError::Fatal(e.into()))?;
        }
        Ok(())
    }

    fn list_active_threads(
        &mut self,
        thread_is_active: &mut dyn FnMut(Tid),
    ) -> Result<(), Self::Error> {
        for cpu in 0..self.replayer.vcpus().len() {
            thread_is_active(tid(cpu));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for ReplayTarget {
    fn resume(&mut self) -> Result<(), Self::Error> {
        self.pending = Some(match self.step_request.take() {
            Some(cpu) => Action::Step(cpu),
            None => Action::Continue,
        });
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.step_request = None;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        _tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_reverse_step(&mut self) -> Option<ReverseStepOps<'_, Tid, Self>> {
        Some(self)
    }

    fn support_reverse_cont(&mut self) -> Option<ReverseContOps<'_, Tid, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

// gdb asks for the other threads to stay put while one steps. Replay runs
// the vCPUs in their recorded order: a step of one vCPU runs the others
// only where the recording ran them before that vCPU's next instruction.
impl MultiThreadSchedulerLocking for ReplayTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl MultiThreadSingleStep for ReplayTarget {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        self.step_request = Some(cpu_of(tid));
        Ok(())
    }
}

impl ReverseStep<Tid> for ReplayTarget {
    fn reverse_step(&mut self, tid: Tid) -> Result<(), Self::Error> {
        self.pending = Some(Action::ReverseStep(cpu_of(tid)));
        Ok(())
    }
}

impl ReverseCont<Tid> for ReplayTarget {
    fn reverse_cont(&mut self) -> Result<(), Self::Error> {
        self.pending = Some(Action::ReverseContinue);
        Ok(())
    }
}

impl Breakpoints for ReplayTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

// Watchpoints are the backend's memory hooks: a watched access stops the
// vCPU at the end of its block going forwards, and exactly before the
// accessing instruction going backwards (the point was noted on the way).
impl HwWatchpoint for ReplayTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let kind = match kind {
            GdbWatchKind::Write => WatchKind::Write,
            GdbWatchKind::Read => WatchKind::Read,
            GdbWatchKind::ReadWrite => WatchKind::Access,
        };
        self.watchpoints.push(Watchpoint { addr, len, kind });
        if let Err(e) = self.replayer.set_watchpoints(&self.watchpoints) {
            self.watchpoints.pop();
            eprintln!("krr: watchpoint at {addr:#x}: {e}");
            return Ok(false);
        }
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        _kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let before = self.watchpoints.len();
        self.watchpoints.retain(|w| (w.addr, w.len) != (addr, len));
        if self.watchpoints.len() == before {
            return Ok(false);
        }
        self.apply_breakpoints().map_err(TargetError::Fatal)?;
        Ok(true)
    }
}

impl ReplayTarget {
    fn add_breakpoint(&mut self, addr: u64) -> TargetResult<bool, Self> {
        if !self.breakpoints.contains(&addr) {
            self.breakpoints.push(addr);
            self.apply_breakpoints().map_err(TargetError::Fatal)?;
        }
        Ok(true)
    }

    fn remove_breakpoint(&mut self, addr: u64) -> TargetResult<bool, Self> {
        let before = self.breakpoints.len();
        self.breakpoints.retain(|&a| a != addr);
        if self.breakpoints.len() == before {
            return Ok(false);
        }
        self.apply_breakpoints().map_err(TargetError::Fatal)?;
        Ok(true)
    }
}

// Both kinds are the backend's breakpoints: they stop the vCPU before the
// instruction and leave guest memory alone (an INT3 written into the
// kernel would make the replay diverge).
impl SwBreakpoint for ReplayTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.add_breakpoint(addr)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.remove_breakpoint(addr)
    }
}

impl HwBreakpoint for ReplayTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.add_breakpoint(addr)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.remove_breakpoint(addr)
    }
}

const MONITOR_HELP: &str = "krr monitor commands:
  where                      where the replay stands: events consumed, each vCPU's kernel instruction count and RIP
  events                     the last events of the log consumed
  goto-instruction N [CPU]   replay from the start to where vCPU CPU (default: the current one) has retired N kernel instructions (then 'flushregs')
  goto-event N               replay from the start until N events of the log are consumed (then 'flushregs')
  allow-writes               let gdb write registers and memory: the replay's state is then no longer the
                             recording's (checkpoints are not compared; a divergence stops forward execution);
                             going back restores the recorded past, without the writes";

impl MonitorCmd for ReplayTarget {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        let cmd = String::from_utf8_lossy(cmd);
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match words.as_slice() {
            ["where"] | ["when"] => {
                for line in self.describe_position() {
                    outputln!(out, "{line}");
                }
            }
            ["allow-writes"] => {
                self.writes_allowed = true;
                outputln!(out, "krr: WARNING: writes to registers and memory are now permitted. The replay's state will no longer be the recording's: checkpoints are not compared, no snapshot is taken, and a divergence stops forward execution. reverse-stepi, reverse-continue and goto-* restore the recorded past, without the writes.");
            }
            ["events"] => {
                let recent = self.session.recent_events();
                if recent.is_empty() {
                    outputln!(out, "no event consumed yet");
                }
                for e in recent {
                    outputln!(out, "{e}");
                }
            }
            ["goto-event", n] => match n.parse::<u64>() {
                Ok(events) => match self.goto_event(events) {
                    Ok(()) => {
                        for line in self.describe_position() {
                            outputln!(out, "{line}");
                        }
                        outputln!(out, "(type 'flushregs' for gdb to read the new state)");
                    }
                    Err(e) => outputln!(out, "goto-event: {e}"),
                },
                Err(_) => outputln!(out, "goto-event: expected a number of events, got {n:?}"),
            },
            ["goto-instruction", n, rest @ ..] if rest.len() <= 1 => {
                let parsed = (
                    n.parse::<u64>(),
                    rest.first()
                        .map_or(Ok(self.current), |c| c.parse::<usize>()),
                );
                match parsed {
                    (Ok(count), Ok(cpu)) if cpu < self.replayer.vcpus().len() => {
                        let at = StopAt {
                            cpu,
                            count,
                            rip: None,
                        };
                        match self.goto(at, false) {
                            Ok(_) => {
                                for line in self.describe_position() {
                                    outputln!(out, "{line}");
                                }
                                outputln!(out, "(type 'flushregs' for gdb to read the new state)");
                            }
                            Err(e) => outputln!(out, "goto-instruction: {e}"),
                        }
                    }
                    _ => outputln!(
                        out,
                        "goto-instruction: expected a kernel instruction count and an optional vCPU number below {}",
                        self.replayer.vcpus().len()
                    ),
                }
            }
            _ => outputln!(out, "{MONITOR_HELP}"),
        }
        Ok(())
    }
}
