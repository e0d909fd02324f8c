// SPDX-License-Identifier: GPL-2.0-or-later
//! The recording's events as replay consumes them: engine events in order,
//! read ahead, with the agent's records kept apart by sequence number.

use super::console::ConsoleComparison;
use krr_hypervisor::Position;
use krr_record::abi;
use krr_record::event::LogEvent;
use krr_record::log::{EventLogReader, LogError};
use std::collections::VecDeque;
use std::path::Path;

/// The engine events, read in order, with the agent's records kept apart
/// (indexed by their sequence number).
pub(super) struct EventSource {
    pub(super) reader: EventLogReader,
    /// Engine events read ahead, with their log index.
    pub(super) engine: VecDeque<(u64, LogEvent)>,
    /// Agent records read ahead, in seq order.
    pub(super) agent: VecDeque<abi::Event>,
    /// The recorded console (its bytes come from here) compared with the
    /// replayed one (the bus adds those).
    pub(super) console: ConsoleComparison,
    pub(super) exhausted: bool,
    /// Why the log ended, if not cleanly.
    pub(super) broken: Option<String>,
    /// The recording did not finish (killed): the agent drains its ring in
    /// batches, so the records before an engine event may be missing.
    pub(super) unfinished: bool,
    /// The last events consumed, for divergence reports.
    pub(super) recent: VecDeque<(u64, LogEvent)>,
    pub(super) consumed: u64,
    /// The last [`Self::next_stop`] answer and the log index of the event
    /// that decided it: still the answer while that event is queued (a
    /// syscall storm has tens of thousands of events between two
    /// interrupts, and each entry asks again).
    pub(super) next_stop_seen: Option<(u64, Option<u64>)>,
    /// Per vCPU, the log index and agent seq of its next kernel entry from
    /// user mode as last found by [`Self::cpu_next_entry_seq`]: still the
    /// answer while that event is queued.
    pub(super) entry_seen: Vec<Option<(u64, u64)>>,
    /// The log index of the next event the reader returns.
    pub(super) read_next: u64,
}

/// How many engine events [`EventSource::cpu_next_entry_seq`] reads ahead
/// for a vCPU's next kernel entry before giving up. A vCPU that was cut in
/// the middle of a user read resumes within the other vCPUs' next slices;
/// one that is idle (halted in the kernel) may not enter for the rest of the
/// log, and reading the whole log into memory for it would be absurd.
pub(super) const ENTRY_LOOKAHEAD_EVENTS: usize = 4096;

impl EventSource {
    /// The events of the log at `path`, from its start; `unfinished`: the
    /// recording did not finish.
    pub(super) fn open(path: &Path, unfinished: bool) -> Result<EventSource, LogError> {
        Ok(EventSource {
            reader: EventLogReader::open(path)?,
            engine: VecDeque::new(),
            agent: VecDeque::new(),
            console: ConsoleComparison::default(),
            exhausted: false,
            broken: None,
            unfinished,
            recent: VecDeque::new(),
            consumed: 0,
            next_stop_seen: None,
            entry_seen: Vec::new(),
            read_next: 0,
        })
    }

    /// A copy standing where this one stands, with its own reader of the
    /// log at `path` (a snapshot of a replay keeps one, and each restore
    /// takes another).
    pub(super) fn duplicate(&self, path: &Path) -> Result<EventSource, LogError> {
        Ok(EventSource {
            reader: EventLogReader::open(path)?.seek(self.read_next),
            engine: self.engine.clone(),
            agent: self.agent.clone(),
            console: self.console.clone(),
            exhausted: self.exhausted,
            broken: self.broken.clone(),
            unfinished: self.unfinished,
            recent: self.recent.clone(),
            consumed: self.consumed,
            next_stop_seen: self.next_stop_seen,
            entry_seen: self.entry_seen.clone(),
            read_next: self.read_next,
        })
    }

    /// Reads one more event; false at the end of the log.
    pub(super) fn read_one(&mut self) -> bool {
        if self.exhausted {
            return false;
        }
        match self.reader.next_event() {
            Ok(Some(read)) => {
                self.read_next = read.index + 1;
                match read.event {
                    LogEvent::Agent { .. } => match read.event.agent_event() {
                        Some(Ok(e)) => self.agent.push_back(e),
                        Some(Err(e)) => {
                            self.broken = Some(format!("agent record #{}: {e}", read.index));
                            self.exhausted = true;
                        }
                        None => {}
                    },
                    LogEvent::Console { bytes, .. } => self.console.recorded(&bytes),
                    // User-mode RDTSC (the vDSO): user code does not run.
                    LogEvent::Rdtsc { at, .. } if at.cpl == 3 => {}
                    other => self.engine.push_back((read.index, other)),
                }
                true
            }
            Ok(None) => {
                self.exhausted = true;
                if let Some(end) = self.reader.end() {
                    if !matches!(end, krr_record::log::StreamEnd::Complete) {
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
    pub(super) fn peek(&mut self) -> Option<&(u64, LogEvent)> {
        while self.engine.is_empty() && self.read_one() {}
        self.engine.front()
    }

    pub(super) fn pop(&mut self) -> Option<(u64, LogEvent)> {
        self.peek()?;
        let (i, e) = self.engine.pop_front()?;
        self.consumed = i + 1;
        if self.recent.len() == 8 {
            self.recent.pop_front();
        }
        // Formatted only when a report needs them: formatting every event
        // took about 7% of a timer-heavy replay.
        self.recent.push_back((i, e.clone()));
        Some((i, e))
    }

    /// The last events taken, as a divergence report shows them.
    pub(super) fn recent_lines(&self) -> Vec<String> {
        self.recent
            .iter()
            .map(|(i, e)| format!("#{i} {e}"))
            .collect()
    }

    /// Agent records with `seq` below `end`, reading ahead until one at or
    /// past `end` was read (or the log ends). `None` when the log is cut
    /// (or damaged) before all of them, or the recording did not finish and
    /// nothing shows they are all there (`end` is `u64::MAX` when no
    /// boundary is ahead): the stint cannot be replayed.
    ///
    /// Also (copied, left queued) the records of vCPU `cpu` from `end` up to
    /// its next kernel entry from user mode: a slice can end between a read
    /// of user memory and the agent's record of it, and the read must find
    /// the bytes. Writing them early is harmless (user code does not run in
    /// replay); the next stretch writes them again, after any other vCPU's.
    pub(super) fn agent_before(&mut self, end: u64, cpu: usize) -> Option<Vec<abi::Event>> {
        let ahead_end = self.cpu_next_entry_seq(cpu).unwrap_or(end).max(end);
        while self.agent.back().is_none_or(|e| e.seq < ahead_end) && self.read_one() {}
        if (self.broken.is_some() || self.unfinished)
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

    /// The first agent record of vCPU `cpu` with `seq` at or past `from`,
    /// reading ahead at most [`ENTRY_LOOKAHEAD_EVENTS`] more events for it
    /// (the agent's ring is drained in batches); `None` when none is that
    /// close.
    pub(super) fn first_record_of(&mut self, cpu: usize, from: u64) -> Option<&abi::Event> {
        let mine = |e: &abi::Event| e.seq >= from && usize::from(e.cpu) == cpu;
        // Only the records a read adds are looked at again.
        let mut seen = 0;
        let mut budget = ENTRY_LOOKAHEAD_EVENTS;
        loop {
            if let Some(i) = self.agent.iter().skip(seen).position(mine) {
                return self.agent.get(seen + i);
            }
            seen = self.agent.len();
            if budget == 0 || !self.read_one() {
                return None;
            }
            budget -= 1;
        }
    }

    /// The `agent_seq` of vCPU `cpu`'s next kernel entry from user mode
    /// (reading ahead at most [`ENTRY_LOOKAHEAD_EVENTS`]); `None` when
    /// there is none that close.
    pub(super) fn cpu_next_entry_seq(&mut self, cpu: usize) -> Option<u64> {
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
    pub(super) fn ahead(&mut self, i: usize) -> Option<&LogEvent> {
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
    pub(super) fn next_stop(&mut self) -> Option<u64> {
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

    /// Where the coming stint ends when it ends in the kernel: the RIP of
    /// the next boundary when that is a slice end in kernel mode.
    pub(super) fn next_boundary_kernel_rip(&mut self) -> Option<u64> {
        let mut i = 0;
        loop {
            match self.ahead(i)? {
                LogEvent::Slice { at, .. } => return (at.cpl != 3).then_some(at.rip),
                e if entry_seq(e).is_some() => return None,
                _ => i += 1,
            }
        }
    }

    /// The `agent_seq` at the end of the coming stretch of kernel execution
    /// on one vCPU (reading ahead): at the next kernel entry from user
    /// mode or the end of the vCPU's slice; `u64::MAX` at the end of the
    /// log.
    pub(super) fn next_boundary_seq(&mut self) -> u64 {
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
pub(super) fn entry_seq(e: &LogEvent) -> Option<u64> {
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

/// The position of an engine event, where it has one.
pub(super) fn position_of(e: &LogEvent) -> Option<Position> {
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
