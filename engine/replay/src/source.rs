// SPDX-License-Identifier: GPL-2.0-or-later
//! The recording's events as replay consumes them: engine events in order,
//! read ahead, with the agent's records kept apart by sequence number.

use super::console::ConsoleComparison;
use krr_hypervisor::Position;
use krr_record::abi::{self, EventBody};
use krr_record::event::LogEvent;
use krr_record::log::{EventLogReader, LogError, PrefetchingEventReader};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// The engine events, read in order, with the agent's records kept apart
/// (indexed by their sequence number).
pub(super) struct EventSource {
    pub(super) reader: PrefetchingEventReader,
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
    /// The log read.
    pub(super) path: PathBuf,
    /// The log indices of the last events consumed, for divergence
    /// reports.
    pub(super) recent: VecDeque<u64>,
    pub(super) consumed: u64,
    /// The last [`Self::next_stop`] answer and the log index of the event
    /// that decided it: still the answer while that event is queued (a
    /// syscall storm has tens of thousands of events between two
    /// interrupts, and each entry asks again).
    pub(super) next_stop_seen: Option<(u64, Option<u64>)>,
    /// Per vCPU, what [`Self::cpu_next_entry_seq`] last found: still the
    /// answer while that event is queued, or where a search goes on.
    pub(super) entry_seen: Vec<EntryScan>,
    /// Per vCPU, `(from, to)`: no agent record of it has a seq in
    /// `from..to` (how far [`Self::first_record_of`] got).
    pub(super) record_scan: Vec<(u64, u64)>,
    /// Per vCPU, `(from, to)`: no read of user memory among its records
    /// with a seq in `from..to` (how far [`Self::first_user_read_of`] got).
    pub(super) user_read_scan: Vec<(u64, u64)>,
    /// The log index of the next event the reader returns.
    pub(super) read_next: u64,
}

/// How many engine events [`EventSource::cpu_next_entry_seq`] reads ahead
/// for a vCPU's next kernel entry before giving up: a vCPU halted in the
/// kernel may not enter for the rest of the log.
pub(super) const ENTRY_LOOKAHEAD_EVENTS: usize = 4096;

/// How many of a vCPU's records before its next kernel entry a stint that
/// ends in the kernel writes ahead, besides its reads in flight: a fork's
/// storm of page-table reads would otherwise be written again at every
/// slice end (a 6-s recording of clone took 250 s to replay).
const NEARBY_RECORDS: usize = 64;

/// How far a search for a vCPU's next kernel entry from user mode got.
#[derive(Clone, Copy, Debug, Default)]
pub(super) enum EntryScan {
    #[default]
    NotLooked,
    /// The engine event at this log index, with this agent seq.
    Found { index: u64, seq: u64 },
    /// None among the engine events up to this log index.
    NoneThrough(u64),
}

/// How many of the last events consumed a divergence report shows.
const RECENT_EVENTS: usize = 8;

/// How many events (engine and agent) replay holds queued, at most, while
/// it looks for a vCPU's next agent record. The agent's ring is drained in
/// batches: a record reaches the log when the ring fills or the recorder
/// flushes, which behind another vCPU's burst of records (page-table
/// reads while it unmaps a process) was 24,000 events after its stint. A
/// vCPU with no records for the rest of the log (idle) keeps the queue at
/// this size and no more.
pub(super) const RECORD_LOOKAHEAD_EVENTS: usize = 1 << 17;

impl EventSource {
    /// The events of the log at `path`, from its start; `unfinished`: the
    /// recording did not finish.
    pub(super) fn open(path: &Path, unfinished: bool) -> Result<EventSource, LogError> {
        Ok(EventSource {
            reader: PrefetchingEventReader::new(EventLogReader::open(path)?),
            path: path.to_path_buf(),
            engine: VecDeque::new(),
            agent: VecDeque::new(),
            console: ConsoleComparison::default(),
            exhausted: false,
            broken: None,
            unfinished,
            recent: VecDeque::new(),
            consumed: 0,
            next_stop_seen: None,
            record_scan: Vec::new(),
            entry_seen: Vec::new(),
            user_read_scan: Vec::new(),
            read_next: 0,
        })
    }

    /// A copy standing where this one stands, with its own reader of the
    /// log at `path` (a snapshot of a replay keeps one, and each restore
    /// takes another).
    pub(super) fn duplicate(&self, path: &Path) -> Result<EventSource, LogError> {
        Ok(EventSource {
            reader: PrefetchingEventReader::new(EventLogReader::open(path)?.seek(self.read_next)),
            path: path.to_path_buf(),
            engine: self.engine.clone(),
            agent: self.agent.clone(),
            console: self.console.clone(),
            exhausted: self.exhausted,
            broken: self.broken.clone(),
            unfinished: self.unfinished,
            recent: self.recent.clone(),
            consumed: self.consumed,
            next_stop_seen: self.next_stop_seen,
            record_scan: self.record_scan.clone(),
            entry_seen: self.entry_seen.clone(),
            user_read_scan: self.user_read_scan.clone(),
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
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        // Only their indices: a report reads them again from the log
        // (formatting every event took about 7% of a timer-heavy replay,
        // and a copy of each a few per cent more).
        self.recent.push_back(i);
        Some((i, e))
    }

    /// The last events taken, as a divergence report shows them (read
    /// again from the log).
    pub(super) fn recent_lines(&self) -> Vec<String> {
        let (Some(&first), Some(&last)) = (self.recent.front(), self.recent.back()) else {
            return Vec::new();
        };
        let mut lines = Vec::with_capacity(self.recent.len());
        let mut reader = match EventLogReader::open(&self.path) {
            Ok(r) => r.seek(first),
            Err(e) => return vec![format!("(the last events cannot be read again: {e})")],
        };
        loop {
            match reader.next_event() {
                Ok(Some(read)) if read.index > last => break,
                Ok(Some(read)) => {
                    if self.recent.contains(&read.index) {
                        lines.push(format!("#{} {}", read.index, read.event));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    lines.push(format!("(the log cannot be read again here: {e})"));
                    break;
                }
            }
        }
        lines
    }

    /// Agent records with `seq` below `end`, reading ahead until one at or
    /// past `end` was read (or the log ends). `None` when the log is cut
    /// (or damaged) before all of them, or the recording did not finish and
    /// nothing shows they are all there (`end` is `u64::MAX` when no
    /// boundary is ahead): the stint cannot be replayed.
    ///
    /// Also (copied, left queued), when the stint ends in the kernel
    /// (`ends_in_kernel`), the records of vCPU `cpu` whose reads may have
    /// been made before the stint's end but numbered after it (see
    /// [`Self::reads_in_flight`]): the reads must find the bytes. Writing
    /// a record early is harmless otherwise (user code does not run in
    /// replay); the stint it belongs to writes it again, after any other
    /// vCPU's.
    pub(super) fn agent_before(
        &mut self,
        end: u64,
        cpu: usize,
        ends_in_kernel: bool,
    ) -> Option<Vec<abi::Event>> {
        let (ahead, entry) = match ends_in_kernel {
            true => (self.reads_in_flight(cpu, end), self.cpu_next_entry_seq(cpu)),
            false => (Vec::new(), None),
        };
        let ahead_end = ahead
            .iter()
            .max()
            .map_or(end, |s| s + 1)
            .max(end)
            .max(entry.unwrap_or(0));
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
        // The first records up to the vCPU's next kernel entry too, where
        // that is close: the reads of the syscall it is in.
        let nearby: Vec<u64> = self
            .agent
            .iter()
            .take_while(|e| entry.is_some_and(|entry| e.seq < entry))
            .filter(|e| usize::from(e.cpu) == cpu)
            .take(NEARBY_RECORDS)
            .map(|e| e.seq)
            .collect();
        let mut seqs: Vec<u64> = ahead.into_iter().chain(nearby).collect();
        seqs.sort_unstable();
        seqs.dedup();
        for seq in seqs {
            out.extend(self.queued_record(seq).cloned());
        }
        Some(out)
    }

    /// The seqs of vCPU `cpu`'s records, numbered at or past `from`, whose
    /// reads may have been made before `from`: a slice can end between a
    /// read and the agent's record of it (the vCPU may even spin on the
    /// agent's ring lock, held by a vCPU the recorder preempted, for
    /// hundreds of slices in between). Reads are sequential, so that is
    /// the vCPU's first read (a page-table entry or user memory), and,
    /// when that is a page-table entry, its first read of user memory
    /// after it: a copy that faulted part-way has loaded bytes before the
    /// fault, whose handler's records come first. A copy's chunks count
    /// as one read, each but the last saying more follow; a measured
    /// string, with the copy of it that follows. Other records
    /// on the way (an interrupt's random bytes) are passed over. Searched
    /// within [`RECORD_LOOKAHEAD_EVENTS`].
    fn reads_in_flight(&mut self, cpu: usize, from: u64) -> Vec<u64> {
        let mut seqs = Vec::new();
        let Some((first, kind)) = self.next_read_of(cpu, from) else {
            return seqs;
        };
        seqs.push(first);
        let (user_read, more) = match kind {
            Some(more) => (first, more),
            None => match self.first_user_read_of(cpu, first + 1) {
                Some((seq, more)) => {
                    seqs.push(seq);
                    (seq, more)
                }
                None => return seqs,
            },
        };
        let last = self.chunks_after(cpu, user_read, more, &mut seqs);
        // A string measured (strnlen_user) is logged by its NUL's word
        // alone: its other bytes come with the copy that follows it
        // (strndup_user), and the measuring loads them too.
        let measured = self
            .queued_record(user_read)
            .is_some_and(|e| matches!(e.body, EventBody::StrnlenUser { .. }));
        if measured {
            if let Some((copy, more)) = self.first_user_read_of(cpu, last + 1) {
                seqs.push(copy);
                self.chunks_after(cpu, copy, more, &mut seqs);
            }
        }
        seqs
    }

    /// Adds to `seqs` the further chunks of vCPU `cpu`'s read whose record
    /// `seq` says whether `more` follow; the last chunk's seq.
    fn chunks_after(&mut self, cpu: usize, seq: u64, more: bool, seqs: &mut Vec<u64>) -> u64 {
        let (mut at, mut more) = (seq, more);
        while more {
            match self.next_read_of(cpu, at + 1) {
                Some((next, kind)) => {
                    seqs.push(next);
                    (at, more) = (next, kind.unwrap_or(false));
                }
                None => break,
            }
        }
        at
    }

    /// The queued agent record `seq`.
    fn queued_record(&self, seq: u64) -> Option<&abi::Event> {
        let i = self.agent.partition_point(|e| e.seq < seq);
        self.agent.get(i).filter(|e| e.seq == seq)
    }

    /// vCPU `cpu`'s first read record at or past `from`: its seq, and for
    /// a read of user memory whether more chunks of it follow (`None` for
    /// a page-table entry).
    fn next_read_of(&mut self, cpu: usize, from: u64) -> Option<(u64, Option<bool>)> {
        let mut at = from;
        loop {
            let e = self.first_record_of(cpu, at)?;
            match read_kind(&e.body) {
                Some(kind) => return Some((e.seq, kind)),
                None => at = e.seq + 1,
            }
        }
    }

    /// vCPU `cpu`'s first read of user memory at or past `from` (as
    /// [`Self::next_read_of`]), passing over page-table reads. A search
    /// goes on where the last one stopped: a stint that ends in a storm of
    /// page-table reads (a fork copying them) asks at each slice end.
    fn first_user_read_of(&mut self, cpu: usize, from: u64) -> Option<(u64, bool)> {
        let mut at = resume_at(&mut self.user_read_scan, cpu, from);
        loop {
            let Some((seq, kind)) = self.next_read_of(cpu, at) else {
                // None up to what is queued (the window is full, or the
                // log ended).
                let queued = self.agent.back().map_or(at, |e| e.seq + 1).max(at);
                self.user_read_scan[cpu] = (from, queued);
                return None;
            };
            if let Some(more) = kind {
                self.user_read_scan[cpu] = (from, seq);
                return Some((seq, more));
            }
            at = seq + 1;
        }
    }

    /// The first agent record of vCPU `cpu` with `seq` at or past `from`,
    /// reading ahead while fewer than [`RECORD_LOOKAHEAD_EVENTS`] events
    /// are queued; `None` when none is that close. A search goes on where
    /// the last one for the same `from` stopped: this is asked at every
    /// slice end, and an idle vCPU may have no record for a long time.
    pub(super) fn first_record_of(&mut self, cpu: usize, from: u64) -> Option<&abi::Event> {
        let mut start = resume_at(&mut self.record_scan, cpu, from);
        loop {
            let first = self.agent.partition_point(|e| e.seq < start);
            if let Some(i) = self
                .agent
                .range(first..)
                .position(|e| usize::from(e.cpu) == cpu)
            {
                let seq = self.agent[first + i].seq;
                self.record_scan[cpu] = (from, seq);
                return self.agent.get(first + i);
            }
            start = self.agent.back().map_or(start, |e| e.seq + 1).max(start);
            self.record_scan[cpu] = (from, start);
            // Read up to the next agent record.
            let queued = self.agent.len();
            while self.agent.len() == queued {
                if self.engine.len() + self.agent.len() >= RECORD_LOOKAHEAD_EVENTS
                    || !self.read_one()
                {
                    return None;
                }
            }
        }
    }

    /// The `agent_seq` of vCPU `cpu`'s next kernel entry from user mode
    /// (reading ahead at most [`ENTRY_LOOKAHEAD_EVENTS`]); `None` when
    /// there is none that close.
    pub(super) fn cpu_next_entry_seq(&mut self, cpu: usize) -> Option<u64> {
        if self.entry_seen.len() <= cpu {
            self.entry_seen.resize(cpu + 1, EntryScan::NotLooked);
        }
        let front = self.engine.front().map(|(i, _)| *i);
        // Where the last search left off, while its events are queued.
        let mut i = match (self.entry_seen[cpu], front) {
            (EntryScan::Found { index, seq }, Some(front)) if front <= index => return Some(seq),
            (EntryScan::NoneThrough(index), Some(front)) if front <= index => {
                self.engine.partition_point(|(i, _)| *i <= index)
            }
            _ => 0,
        };
        while i < ENTRY_LOOKAHEAD_EVENTS {
            let Some(e) = self.ahead(i) else { break };
            if usize::from(e.cpu()) == cpu {
                if let Some(seq) = entry_seq(e) {
                    self.entry_seen[cpu] = EntryScan::Found {
                        index: self.engine[i].0,
                        seq,
                    };
                    return Some(seq);
                }
            }
            i += 1;
        }
        if let Some(last) = i.checked_sub(1).and_then(|i| self.engine.get(i)) {
            self.entry_seen[cpu] = EntryScan::NoneThrough(last.0);
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

/// Where a search of vCPU `cpu`'s records from seq `from` starts, given
/// `scans` (per vCPU, `(from, to)`: nothing sought in `from..to`): past
/// what the last search found empty.
fn resume_at(scans: &mut Vec<(u64, u64)>, cpu: usize, from: u64) -> u64 {
    if scans.len() <= cpu {
        scans.resize(cpu + 1, (0, 0));
    }
    match scans[cpu] {
        (scan_from, scan_to) if scan_from <= from && from < scan_to => scan_to,
        _ => from,
    }
}

/// Whether an agent record is a read of memory user space writes: `None`
/// when not; `Some(None)` for a page-table entry; `Some(Some(more))` for
/// user memory (or a ring shared with user space), `more` when further
/// chunks of the same read follow.
fn read_kind(body: &EventBody) -> Option<Option<bool>> {
    let more = |flags: u32| Some(Some(flags & abi::DATA_FLAG_MORE != 0));
    match body {
        EventBody::PteRead(_) => Some(None),
        EventBody::CopyFromUser { info, .. } => more(info.flags),
        EventBody::StrncpyFromUser { info, .. } | EventBody::StrnlenUser { info, .. } => {
            more(info.flags)
        }
        EventBody::GetUser(_) | EventBody::SharedRead { .. } => Some(Some(false)),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::EventSource;
    use krr_hypervisor::Position;
    use krr_record::abi::{self, EventBody, GetUserEvent, UserCopyEvent};
    use krr_record::event::LogEvent;
    use krr_record::log::EventLogWriter;

    fn record(cpu: u16, seq: u64, body: EventBody) -> LogEvent {
        LogEvent::Agent {
            record: abi::encode_event(&abi::Event { cpu, seq, body }),
        }
    }

    fn copy_chunk(more: bool) -> EventBody {
        EventBody::CopyFromUser {
            info: UserCopyEvent {
                user_addr: 0x7000,
                data_len: 8,
                flags: if more { abi::DATA_FLAG_MORE } else { 0 },
                ..Default::default()
            },
            data: vec![1; 8],
        }
    }

    /// vCPU 1 read user memory and its slice ended before the agent
    /// numbered the record: it then spins on the ring lock for 5,000
    /// slices (beyond any look-ahead by engine events alone), and the
    /// records reach the log after that, behind vCPU 0's.
    #[test]
    fn the_first_read_in_flight_is_read_ahead_however_far_its_records_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.krrlog");
        let mut w = EventLogWriter::create(&path).unwrap();
        let kernel_slice = |n: u64| LogEvent::Slice {
            cpu: 1,
            at: Position {
                kernel_icount: n,
                rip: 0xffff_ffff_8100_0000,
                ..Default::default()
            },
            agent_seq: 10,
        };
        for n in 0..5000 {
            w.append(&kernel_slice(n)).unwrap();
        }
        let get_user = EventBody::GetUser(GetUserEvent {
            user_addr: 0x7008,
            size: 8,
            ..Default::default()
        });
        let random = EventBody::Random {
            info: abi::RandomEvent {
                source: 3,
                data_len: 4,
            },
            data: vec![0; 4],
        };
        for e in [
            record(0, 9, get_user.clone()),
            // An interrupt's on the way: not a read.
            record(1, 10, random),
            record(1, 11, copy_chunk(true)),
            record(0, 12, get_user.clone()),
            record(1, 13, copy_chunk(false)),
            // The vCPU's next read, after the one in flight.
            record(1, 14, get_user),
        ] {
            w.append(&e).unwrap();
        }
        w.flush().unwrap();

        let mut src = EventSource::open(&path, false).unwrap();
        let seqs = |v: Vec<abi::Event>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        // A stint that ends in the kernel: seq 9 is its own, then the
        // copy in flight (its two chunks), not the interrupt's record.
        assert_eq!(seqs(src.agent_before(10, 1, true).unwrap()), [9, 11, 13]);
        // Asked again (the next spin slice): the same, from the queue.
        assert_eq!(seqs(src.agent_before(10, 1, true).unwrap()), [11, 13]);
        // A stint that ends in user mode has no read in flight.
        assert_eq!(
            seqs(src.agent_before(10, 1, false).unwrap()),
            Vec::<u64>::new()
        );
        // vCPU 0 has no record from 13 on: nothing to read ahead.
        assert_eq!(seqs(src.agent_before(13, 0, true).unwrap()), [10, 11, 12]);
    }

    fn pte(seq: u64) -> LogEvent {
        record(
            0,
            seq,
            EventBody::PteRead(abi::PteReadEvent {
                user_addr: 0x7000,
                ..Default::default()
            }),
        )
    }

    /// A copy that faulted part-way (the fault handler's page-table reads
    /// come first) and a measured string (its bytes come with the copy
    /// that follows): both are in flight, not only the first record.
    #[test]
    fn a_copy_that_faulted_and_a_measured_string_are_read_ahead_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.krrlog");
        let mut w = EventLogWriter::create(&path).unwrap();
        let strnlen = EventBody::StrnlenUser {
            info: abi::UserStringEvent {
                user_addr: 0x7000,
                limit: 250,
                result: 11,
                ..Default::default()
            },
            data: vec![0; 6],
        };
        // No kernel entry of vCPU 0 in the log: no records "nearby".
        let events = [
            pte(1),
            pte(2),
            record(0, 3, copy_chunk(false)),
            pte(4),
            record(0, 5, strnlen),
            pte(6),
            record(0, 7, copy_chunk(false)),
            record(0, 8, copy_chunk(false)),
        ];
        for e in &events {
            w.append(e).unwrap();
        }
        w.flush().unwrap();
        let mut src = EventSource::open(&path, false).unwrap();
        let seqs = |v: Vec<abi::Event>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        // The first read (a page-table entry) and the first read of user
        // memory after it.
        assert_eq!(seqs(src.agent_before(1, 0, true).unwrap()), [1, 3]);
        // The string measured, then copied; not the copy after that.
        assert_eq!(
            seqs(src.agent_before(5, 0, true).unwrap()),
            [1, 2, 3, 4, 5, 7]
        );
    }
}
