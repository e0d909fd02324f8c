// SPDX-License-Identifier: GPL-2.0-or-later
//! A replay in progress, advanced turn by turn ([`crate::Replayer::turn`]),
//! and what a debugger asks of its turns.

use super::report::{CheckpointTally, Reached, ReplayEnd};
use super::source::EventSource;
use super::CpuProgress;
use krr_hypervisor::WatchHit;
use krr_record::log::DmaLogReader;
use std::time::{Duration, Instant};

/// The state of a replay between two turns.
pub struct ReplaySession {
    pub(crate) start: Instant,
    pub(crate) src: EventSource,
    pub(crate) progress: Vec<CpuProgress>,
    pub(crate) entries: u64,
    /// The recorded user memory written so far, and what was not.
    pub(crate) user: krr_guest::paging::UserWrite,
    pub(crate) dma_reader: Option<DmaLogReader>,
    /// The replayed kernel's console output (its most recent bytes).
    pub(crate) console: krr_devices::console::ConsoleBuffer,
    pub(crate) serial_lcr: u8,
    pub(crate) reached: Option<Reached>,
    /// The user memory read in a stretch of kernel execution that did not
    /// start with a kernel entry (the snapshot's, a resumed slice's) is
    /// still to be written.
    pub(crate) segment_reads_due: bool,
    pub(crate) checkpoints: CheckpointTally,
    pub(crate) stall_after: Duration,
    pub(crate) watchdog: crate::report::Watchdog,
    /// What a debugger asks of the coming turns.
    pub debug: DebugControl,
}

impl ReplaySession {
    /// Events of the log consumed so far.
    pub fn events_consumed(&self) -> u64 {
        self.src.consumed
    }

    /// Whether vCPU `cpu` is in user mode, waiting for its next recorded
    /// kernel entry (kernel-only replay runs no user code).
    pub fn in_user_mode(&self, cpu: usize) -> bool {
        self.progress.get(cpu).is_some_and(|p| p.in_user)
    }

    /// The recorded events just consumed, as the log prints them.
    pub fn recent_events(&self) -> Vec<String> {
        self.src.recent_lines()
    }
}

/// What a debugger asks of the coming turns; the default asks nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DebugControl {
    /// The longest run of a vCPU in one turn, in instructions, so that a
    /// debugger gets control back often (to notice Ctrl-C).
    pub max_run: Option<u64>,
    /// Execute one instruction on this vCPU, then stop
    /// ([`DebugStop::Stepped`]).
    pub step: Option<usize>,
    /// Stop at this point of one vCPU ([`DebugStop::AtCount`]).
    pub stop_at: Option<StopAt>,
    /// The breakpoints set on every vCPU ([`crate::Replayer::set_breakpoints`]).
    pub breakpoints: Vec<u64>,
    /// Stop once this many events of the log are consumed, before the next
    /// one ([`DebugStop::AtEvent`]); cleared when reached.
    pub stop_at_event: Option<u64>,
}

/// A point of a vCPU's execution: where it has retired `count` kernel
/// instructions (as the recording counts them) and, if `rip` is given, is
/// about to run the instruction at `rip` (an interrupt taken there moves
/// it without retiring an instruction). The first time the vCPU gets
/// there counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopAt {
    pub cpu: usize,
    pub count: u64,
    pub rip: Option<u64>,
}

/// What a turn did.
#[derive(Debug, Clone)]
pub enum Turn {
    /// An event was consumed or a vCPU ran; the replay goes on.
    Continue,
    /// A debugger's stop.
    Stopped(DebugStop),
    /// The replay is over.
    Ended(ReplayEnd),
}

/// Why a turn stopped for a debugger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugStop {
    /// vCPU `cpu` is at a breakpoint, before the instruction at `rip`.
    Breakpoint { cpu: usize, rip: u64 },
    /// vCPU `cpu` executed the instruction [`DebugControl::step`] asked for.
    Stepped { cpu: usize },
    /// vCPU `cpu` is at the point [`DebugControl::stop_at`] asked for.
    AtCount { cpu: usize },
    /// The events [`DebugControl::stop_at_event`] asked for are consumed;
    /// `cpu` is the next event's.
    AtEvent { cpu: usize },
    /// vCPU `cpu` accessed a watched range (it stopped at the end of that
    /// block); `before` is the exact point before the accessing
    /// instruction.
    Watch {
        cpu: usize,
        hit: WatchHit,
        before: StopAt,
    },
}
