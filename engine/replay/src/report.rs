// SPDX-License-Identifier: GPL-2.0-or-later
//! What a replay is asked for and what it reports: options, how it ended,
//! the first divergence, the checkpoints it verified.

use krr_record::recording;
use std::path::PathBuf;

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
    /// A kernel symbol whose address the replay must execute
    /// (`expect.reaches` of a bug with no crash); the first vCPU to get
    /// there is reported in [`ReplayReport::reached`].
    pub reaches: Option<String>,
    /// Recorded checkpoints are not compared (a debugger wrote to the
    /// replay's registers or memory, so they no longer hold); the events
    /// are still matched, since replay cannot place them otherwise.
    pub skip_checkpoints: bool,
}

/// Where the replay first executed the symbol of [`ReplayOptions::reaches`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reached {
    pub symbol: String,
    pub cpu: usize,
    /// The vCPU's kernel instruction count at the end of the run in which
    /// it got there.
    pub kernel_icount: u64,
}

/// Wall seconds without a consumed event after which a replay is stalled.
/// The longest stretches between events (a timer tick's 4 ms of kernel
/// code, a few million instructions) replay in well under a second.
pub const DEFAULT_STALL_SECONDS: u64 = 300;

/// Consecutive vCPU runs that neither consume an event nor retire a kernel
/// instruction before a replay is stalled.
pub(super) const STALL_RUNS: u32 = 1000;

/// Turns between two readings of the host clock by the [`Watchdog`]: a
/// reading cost about 2% of a timer-heavy replay when taken every turn.
const CLOCK_EVERY: u32 = 64;

/// Replay's progress watchdog: every turn consumes an event or runs kernel
/// code; one that keeps doing neither, or consumes nothing for a long
/// time, is stuck.
pub(crate) struct Watchdog {
    /// Events consumed and kernel instructions retired when it last looked.
    seen: u64,
    seen_retired: u64,
    idle_runs: u32,
    /// Since when (read every [`CLOCK_EVERY`] turns) nothing was consumed.
    since: std::time::Instant,
    turns: u32,
    progressed: bool,
}

impl Watchdog {
    pub(crate) fn new(consumed: u64) -> Watchdog {
        Watchdog {
            seen: consumed,
            seen_retired: 0,
            idle_runs: 0,
            since: std::time::Instant::now(),
            turns: 0,
            progressed: false,
        }
    }

    /// After a turn of vCPU `cpu`: why the replay is stuck, if it is.
    pub(crate) fn stalled(
        &mut self,
        consumed: u64,
        retired: u64,
        cpu: usize,
        stall_after: std::time::Duration,
    ) -> Option<String> {
        if consumed != self.seen {
            self.seen = consumed;
            self.progressed = true;
            self.idle_runs = 0;
        } else if retired == self.seen_retired {
            self.idle_runs += 1;
        } else {
            self.idle_runs = 0;
        }
        self.seen_retired = retired;
        if self.idle_runs >= STALL_RUNS {
            return Some(format!(
                "no progress: {STALL_RUNS} runs of vCPU {cpu} consumed no event and retired no kernel instruction"
            ));
        }
        self.turns = self.turns.wrapping_add(1);
        if !self.turns.is_multiple_of(CLOCK_EVERY) {
            return None;
        }
        if std::mem::take(&mut self.progressed) {
            self.since = std::time::Instant::now();
            None
        } else if self.since.elapsed() >= stall_after {
            Some(format!(
                "no progress: no event consumed for {} s",
                stall_after.as_secs()
            ))
        } else {
            None
        }
    }
}

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
    /// The report, headed by `verdict` (DIVERGED, or STALLED for a stall).
    pub fn report(&self, verdict: &str) -> String {
        let mut text = format!(
            "{verdict} at event #{} (kernel instruction {}), rip {}\n  expected: {}\n  found:    {}\n  events before it:\n",
            self.event, self.kernel_icount, self.rip, self.expected, self.found
        );
        for e in &self.recent {
            text.push_str(&format!("    {e}\n"));
        }
        text
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.report("DIVERGED"))
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
    /// Bytes of user memory (and of memory shared with user space, such as
    /// io_uring's rings, at kernel addresses) written before kernel entries,
    /// and bytes that could not be (page not present then).
    pub user_bytes_written: u64,
    pub user_bytes_unmapped: u64,
    /// Bytes not written because user mode may not write there (a kernel
    /// or read-only page), or shared bytes aimed outside the kernel's own
    /// pages: a damaged or hostile recording's.
    pub user_bytes_refused: u64,
    pub console_matches: bool,
    /// With [`ReplayOptions::reaches`]: where the symbol was executed
    /// (`None`: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached: Option<Reached>,
    /// Bytes of console output the replayed kernel printed, all of it.
    pub console_bytes: u64,
    /// The first bytes of that output [`Self::console`] does not hold (0
    /// unless the kernel printed more than its window).
    pub console_dropped_bytes: u64,
    /// The replayed console output, or its last
    /// [`CONSOLE_WINDOW_BYTES`](krr_devices::console::CONSOLE_WINDOW_BYTES)
    /// bytes at most.
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
    Log(#[from] krr_record::log::LogError),
    #[error("{0}")]
    Setup(String),
}

/// The checkpoints a replay verified, and which (`--verify-every`).
#[derive(Default, Clone)]
pub(super) struct CheckpointTally {
    /// Registers compared.
    pub(super) registers: u64,
    /// Kernel data+bss digests compared too.
    pub(super) memory: u64,
    pub(super) skipped: u64,
    /// Total kernel instructions at the last one verified.
    pub(super) last: Option<u64>,
}

impl CheckpointTally {
    /// Whether the checkpoint at `total` kernel instructions is verified:
    /// all of them without `--verify-every`, else at most one per `every`.
    pub(super) fn due(&self, every: Option<u64>, total: u64) -> bool {
        match (every, self.last) {
            (None, _) | (Some(_), None) => true,
            (Some(n), Some(last)) => total >= last.saturating_add(n),
        }
    }

    pub(super) fn verified(&mut self, total: u64, memory: bool) {
        self.registers += 1;
        self.memory += u64::from(memory);
        self.last = Some(total);
    }
}

#[cfg(test)]
mod watchdog_tests {
    use super::{Watchdog, CLOCK_EVERY, STALL_RUNS};
    use std::time::Duration;

    #[test]
    fn runs_that_do_nothing_stall_at_once() {
        let mut w = Watchdog::new(5);
        // (The first run retires instructions; the next ones nothing.)
        for _ in 0..STALL_RUNS {
            assert_eq!(w.stalled(5, 100, 0, Duration::from_secs(60)), None);
        }
        let why = w.stalled(5, 100, 1, Duration::from_secs(60)).unwrap();
        assert!(why.contains("runs of vCPU 1"), "{why}");
    }

    /// Kernel code that runs without consuming an event stalls once the
    /// time is up, seen within CLOCK_EVERY turns; consuming events never
    /// stalls.
    #[test]
    fn a_replay_that_consumes_nothing_stalls_when_its_time_is_up() {
        let mut w = Watchdog::new(0);
        let mut retired = 0;
        let mut stalled_at = None;
        for turn in 1..=2 * CLOCK_EVERY {
            retired += 10;
            if let Some(why) = w.stalled(0, retired, 0, Duration::ZERO) {
                assert!(why.contains("no event consumed"), "{why}");
                stalled_at = Some(turn);
                break;
            }
        }
        assert_eq!(stalled_at, Some(CLOCK_EVERY));
        let mut w = Watchdog::new(0);
        for turn in 1..=4 * u64::from(CLOCK_EVERY) {
            assert_eq!(w.stalled(turn, turn, 0, Duration::ZERO), None);
        }
    }
}
