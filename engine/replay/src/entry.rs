// SPDX-License-Identifier: GPL-2.0-or-later
//! Kernel entries recreated from user mode (the user's registers and the
//! user memory the kernel reads), AP startups and checkpoint checks.

use super::*;

impl Replayer {
    /// Recreates the recorded kernel entry `event` from user mode on vCPU
    /// `cpu`: a SYSCALL from the user's registers, or an exception or
    /// interrupt delivered with the user's registers set (the delivery
    /// itself switches to the kernel).
    pub(crate) fn enter_kernel(&mut self, cpu: usize, event: &LogEvent) -> Result<(), String> {
        let vcpu = &mut self.vcpus[cpu];
        let err = |e: krr_hypervisor::HypervisorError| e.to_string();
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
    pub(crate) fn start_ap(&mut self, cpu: usize, vector: u8) -> Result<(), String> {
        let (regs, sregs) = krr_machine::boot::real_mode_state(vector, LAPIC_BASE | (1 << 11));
        let vcpu = &mut self.vcpus[cpu];
        vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
        vcpu.set_regs(&regs).map_err(|e| e.to_string())
    }

    /// Compares vCPU `cpu`, stopped at a recorded checkpoint, with it:
    /// registers, then the kernel image digest. `None`: they match.
    pub(crate) fn check_checkpoint(
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
    /// its child run and exit, reading the child's memory), and the shared
    /// memory it read through its own mapping at its kernel addresses.
    /// Records from `end` on were read ahead (see
    /// [`super::source::EventSource::agent_before`]): they write only bytes
    /// that no record of this stretch and no earlier one read ahead wrote.
    /// On several vCPUs user code on another vCPU rewrites memory between
    /// this vCPU's stretches (an io_uring buffer refilled), so a later read
    /// of the same bytes must not replace what this stretch reads.
    pub(crate) fn apply_user_reads(
        &mut self,
        cpu: usize,
        events: &[abi::Event],
        stint: StintBounds,
        user: &mut paging::UserWrite,
    ) {
        let end = stint.end;
        if events.is_empty() {
            return;
        }
        // Read only where a record names no address space: reading the
        // special registers costs more than a syscall storm's stint.
        let entry_cr3 = std::cell::OnceCell::new();
        let vcpu = &self.vcpus[cpu];
        let space = |cr3: u64| {
            if cr3 == 0 {
                *entry_cr3.get_or_init(|| vcpu.sregs().map_or(0, |s| s.cr3))
            } else {
                cr3
            }
        };
        // Accessed/dirty bits of user page-table entries, as the kernel
        // first found them in this stint (later reads see its own writes).
        let mut ptes_seen = std::collections::HashSet::new();
        for e in events {
            if let EventBody::PteRead(p) = &e.body {
                // Only where the entry maps the same page as the one the
                // kernel read (the read may concern another address space,
                // e.g. the new one of an execve) and only the first read of
                // an entry (later ones see the kernel's own writes).
                const PFN_PRESENT: u64 = 0x000f_ffff_ffff_f001;
                // The table of the address space the agent names (its mm's,
                // not the loaded CR3: an exiting task tears its mm down on a
                // borrowed one that can map the same page at the same
                // address, and so can any other address space after fork).
                // An entry that does not exist yet is made by the kernel in
                // this stint, with the bits the kernel gives it.
                let found = (|| {
                    let at = paging::pte_location(&self.mem, space(p.cr3), p.user_addr)?;
                    let cur = self.mem.read_obj::<u64>(GuestAddress(at)).ok()?;
                    // Present and a user page: a recording restores bits
                    // of user mappings only.
                    const USER_PRESENT: u64 = 0x5;
                    (cur & PFN_PRESENT == p.pte & PFN_PRESENT && cur & USER_PRESENT == USER_PRESENT)
                        .then_some((at, cur))
                })();
                let Some((at, cur)) = found else {
                    continue;
                };
                if ptes_seen.insert(at) {
                    if let Some(pte) = with_recorded_access_bits(cur, p.pte) {
                        let _ = self.mem.write_obj(pte, GuestAddress(at));
                    }
                }
                continue;
            }
        }
        // Only records read ahead need to know what was written: with one
        // vCPU none are, and the bookkeeping stays off the stint's path.
        let ahead = events.iter().any(|e| e.seq >= end);
        let mut written = CoveredBytes::default();
        for e in events {
            if let EventBody::StrnlenUser { info, .. } = &e.body {
                // The kernel only measured the string: where no copy of it
                // follows (a name too long, an error before the copy), the
                // bytes it scanned are nowhere in the log, and replay's
                // memory there must hold no NUL before the recorded one
                // either. A copy later in the stint writes the real bytes.
                // One read ahead (a later syscall's) only where nothing
                // this stretch read is: its NULs replaced there would move
                // the end of a string this stretch measures.
                if let Some(len) = strnlen_scanned_without_nul(info) {
                    let cr3 = space(info.cr3);
                    let whole = [(0, len as usize)];
                    let uncovered;
                    let pieces: &[(usize, usize)] = if e.seq < end {
                        &whole
                    } else {
                        uncovered = written.uncovered(cr3, info.user_addr, len as usize);
                        &uncovered
                    };
                    for &(from, to) in pieces {
                        *user += paging::fill_user_nuls(
                            &self.mem,
                            cr3,
                            info.user_addr.wrapping_add(from as u64),
                            (to - from) as u64,
                            0x01,
                        );
                    }
                }
            }
            let (cr3, addr, bytes): (u64, u64, Vec<u8>) = match &e.body {
                EventBody::CopyFromUser { info, data } => (
                    space(info.cr3),
                    info.user_addr.wrapping_add(info.offset),
                    data.clone(),
                ),
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
            let whole = [(0, bytes.len())];
            let uncovered;
            let pieces: &[(usize, usize)] = if e.seq < end {
                &whole
            } else {
                uncovered = written.uncovered(cr3, addr, bytes.len());
                &uncovered
            };
            if ahead {
                written.cover(cr3, addr, addr.saturating_add(bytes.len() as u64));
            }
            for &(from, to) in pieces {
                let at = addr.wrapping_add(from as u64);
                let done = paging::write_user(&self.mem, cr3, at, &bytes[from..to]);
                if done.written < (to - from) as u64 {
                    tracing::debug!(
                        "replay: of {} bytes at {at:#x}, {} not written (page not present) and {} refused (not a user page): agent #{}",
                        to - from,
                        done.not_present,
                        done.refused,
                        e.seq
                    );
                }
                *user += done;
            }
        }
        // Memory user space shares with the kernel (io_uring's rings and
        // SQEs): user stores there are not replayed, so the bytes go where
        // the kernel read them, through its own mapping.
        for (seq, info, data) in first_shared_reads(events, &stint) {
            let done = paging::write_kernel(&self.mem, space(info.cr3), info.kernel_addr, data);
            if done.written < data.len() as u64 {
                tracing::debug!(
                    "replay: of {} shared bytes at kernel {:#x}, {} not written (page not present) and {} refused (not a kernel page): agent #{seq}",
                    data.len(),
                    info.kernel_addr,
                    done.not_present,
                    done.refused,
                );
            }
            *user += done;
        }
    }
}

impl Replayer {
    /// Whether vCPU `cpu`'s coming stint, which ends (a slice end in the
    /// kernel) at `rip`, made a shared-memory load whose record the agent
    /// has not numbered yet. The agent makes the load and logs it under its
    /// ring's lock (`krr_agent_shared_load_word`): such a slice ends in the
    /// reservation of the record's slot, or on a straight path (conditional
    /// branches not taken) to the call of it. Kernels before that change
    /// made the load in the caller, which then calls `krr_agent_shared_read`
    /// out of line: a slice end on a straight path to that call counts too
    /// (one in the hook's lock wait is not found). False without the
    /// kernel's symbols.
    pub(crate) fn shared_read_unlogged_at(&self, cpu: usize, rip: Option<u64>) -> bool {
        let Some(rip) = rip else { return false };
        if self.symbols.function_at(rip) == Some("krr_reserve_locked") {
            return true;
        }
        // In the agent, the call to look for is the reservation's; in its
        // caller, the hook's.
        let target = match self.symbols.function_at(rip) {
            Some("krr_agent_shared_load_word" | "krr_agent_shared_read") => "krr_reserve_locked",
            _ => "krr_agent_shared_read",
        };
        let (Some(target), Ok(sregs)) = (self.symbols.address(target), self.vcpus[cpu].sregs())
        else {
            return false;
        };
        self.calls_next(sregs.cr3, rip, &[target])
    }

    /// Whether the kernel text at `from` (under `cr3`) calls one of
    /// `targets` straight away ([`calls_straight_away`]).
    fn calls_next(&self, cr3: u64, from: u64, targets: &[u64]) -> bool {
        paging::read_kernel(&self.mem, cr3, from, STRAIGHT_PATH_INSNS * 15)
            .is_some_and(|code| calls_straight_away(&code, from, targets))
    }

    /// At the end of vCPU `cpu`'s slice in the kernel (agent seq `boundary`):
    /// the seq of its next record when that is a shared-memory read whose
    /// load this slice already made. The agent logs such a load right after
    /// it, and a slice can end in between; meanwhile another vCPU's kernel
    /// may store there (a CQ tail it advances), which the next stint must
    /// not undo by writing the older value back. The load was made here when
    /// memory holds the recorded value now; a load made later that still
    /// found this value after another store changed it would need user
    /// space to have stored it back.
    pub(crate) fn shared_load_in_flight(
        &self,
        src: &mut EventSource,
        cpu: usize,
        boundary: u64,
    ) -> Option<u64> {
        let e = src.first_record_of(cpu, boundary)?;
        let EventBody::SharedRead { info, data } = &e.body else {
            return None;
        };
        let cr3 = if info.cr3 != 0 {
            info.cr3
        } else {
            self.vcpus[cpu].sregs().ok()?.cr3
        };
        let now = paging::read_kernel(&self.mem, cr3, info.kernel_addr, data.len())?;
        (now == *data).then_some(e.seq)
    }
}

/// How far [`calls_straight_away`] looks, in instructions.
const STRAIGHT_PATH_INSNS: usize = 16;

/// Whether the x86-64 `code` at `from` calls one of `targets` before any
/// jump, return or other call (within [`STRAIGHT_PATH_INSNS`]), conditional
/// branches taken as not taken.
fn calls_straight_away(code: &[u8], from: u64, targets: &[u64]) -> bool {
    let mut decoder = iced_x86::Decoder::with_ip(64, code, from, iced_x86::DecoderOptions::NONE);
    for insn in decoder.iter().take(STRAIGHT_PATH_INSNS) {
        use iced_x86::Mnemonic::{Call, Iretq, Jmp, Ret, Retf, Sysretq};
        if insn.is_invalid() {
            return false;
        }
        match insn.mnemonic() {
            // A direct call has its target; an indirect one has 0.
            Call => return targets.contains(&insn.near_branch_target()),
            Jmp | Ret | Retf | Iretq | Sysretq => return false,
            _ => {}
        }
    }
    false
}

/// Byte ranges written so far, per address space: disjoint, merged,
/// ordered by start.
#[derive(Default)]
struct CoveredBytes(std::collections::HashMap<u64, std::collections::BTreeMap<u64, u64>>);

impl CoveredBytes {
    /// The pieces of the `len` bytes at `addr` in address space `cr3` that
    /// nothing covers, as (from, to) offsets into those bytes.
    fn uncovered(&self, cr3: u64, addr: u64, len: usize) -> Vec<(usize, usize)> {
        let end = addr.saturating_add(len as u64);
        let mut pieces = Vec::new();
        let mut at = addr;
        if let Some(ranges) = self.0.get(&cr3) {
            // The range starting at or before `addr` may reach into it.
            let first = ranges.range(..=addr).next_back().map_or(addr, |(&s, _)| s);
            for (&s, &e) in ranges.range(first..end) {
                if e <= at {
                    continue;
                }
                if s > at {
                    pieces.push(((at - addr) as usize, (s - addr) as usize));
                }
                at = at.max(e);
                if at >= end {
                    break;
                }
            }
        }
        if at < end {
            pieces.push(((at - addr) as usize, len));
        }
        pieces
    }

    /// Marks `[start, end)` of address space `cr3` covered.
    fn cover(&mut self, cr3: u64, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let ranges = self.0.entry(cr3).or_default();
        let (mut lo, mut hi) = (start, end);
        // Every range touching [start, end) merges into it.
        let first = ranges
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        let touching: Vec<(u64, u64)> = ranges
            .range(first..=end)
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            ranges.remove(&s);
            lo = lo.min(s);
            hi = hi.max(e);
        }
        ranges.insert(lo, hi);
    }
}

/// What replay knows of a coming kernel stint when it writes the memory
/// the stint reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StintBounds {
    /// The agent seq at its end: records from here on were read ahead.
    pub(crate) end: u64,
    /// A record whose load the vCPU's previous stint made
    /// ([`Replayer::shared_load_in_flight`]).
    pub(crate) loaded_before: Option<u64>,
    /// The stint ends (a slice end) between a shared-memory load and the
    /// agent's numbering of its record
    /// ([`Replayer::shared_read_unlogged_at`]): that record is the vCPU's
    /// first one read ahead.
    pub(crate) ends_in_hook: bool,
}

/// The shared-memory reads of a stint to write before it, as the kernel
/// first read each address: a later read may see the kernel's own store
/// (a CQ tail it advanced), which must not overwrite what the first read
/// finds. The record whose load the previous stint made is left out.
///
/// Of the records read ahead, only the first can be a load of this stint
/// (a slice ends between one load and its record). It is written where
/// user space alone stores (an SQE, a provided buffer ring), and otherwise
/// only when the stint ends between that load and its record: a ring word
/// or CQE may be stored by another vCPU's kernel before a later load, and
/// that store must not be undone.
fn first_shared_reads<'e>(
    events: &'e [abi::Event],
    stint: &StintBounds,
) -> impl Iterator<Item = (u64, &'e abi::SharedReadEvent, &'e [u8])> {
    let StintBounds {
        end,
        loaded_before,
        ends_in_hook,
    } = *stint;
    let mut seen = std::collections::HashSet::new();
    let first_ahead = events.iter().find(|e| e.seq >= end).map(|e| e.seq);
    let in_flight = move |source: u32| {
        ends_in_hook
            || matches!(
                source,
                abi::SHARED_IO_URING_SQE | abi::SHARED_IO_URING_BUF_RING
            )
    };
    events.iter().filter_map(move |e| match &e.body {
        EventBody::SharedRead { .. } if Some(e.seq) == loaded_before => None,
        EventBody::SharedRead { info, .. }
            if e.seq >= end && (Some(e.seq) != first_ahead || !in_flight(info.source)) =>
        {
            None
        }
        EventBody::SharedRead { info, data } if seen.insert(info.kernel_addr) => {
            Some((e.seq, info, data.as_slice()))
        }
        _ => None,
    })
}

/// How many bytes from its start a recorded `strnlen_user` scanned without
/// finding a NUL: up to the NUL, or (a string longer than the limit: the
/// result is the limit plus one) the aligned words it read. `None` when the
/// result says nothing of the bytes (0: a fault or the end of the address
/// space; negative: an error).
fn strnlen_scanned_without_nul(info: &abi::UserStringEvent) -> Option<u64> {
    let (result, limit) = (
        u64::try_from(info.result).ok()?,
        u64::try_from(info.limit).ok()?,
    );
    if result == 0 {
        return None;
    }
    if result == limit.checked_add(1)? {
        // do_strnlen_user reads whole aligned words, to the one holding
        // the limit's last byte.
        let end = info
            .user_addr
            .checked_add(limit)?
            .checked_next_multiple_of(8)?;
        return Some(end - info.user_addr);
    }
    Some(result - 1)
}

/// The user page-table entry `cur` with the accessed/dirty bits of the
/// kernel's first recorded read of it in a stint, or `None` when that read
/// differs from `cur` in more than those bits: the kernel rewrote the entry
/// earlier in the stint (a write fault made it writable and dirty), so the
/// read's bits are the kernel's own, and setting them now would show an
/// earlier, unhooked reader (rmap's `page_vma_mkclean_one`) a dirty bit it
/// never saw.
fn with_recorded_access_bits(cur: u64, recorded: u64) -> Option<u64> {
    const AD: u64 = 0x60;
    ((cur ^ recorded) & !AD == 0).then_some((cur & !AD) | (recorded & AD))
}

#[cfg(test)]
mod tests {
    use super::{
        calls_straight_away, first_shared_reads, strnlen_scanned_without_nul, CoveredBytes,
        StintBounds,
    };
    use krr_record::abi::{self, EventBody, SharedReadEvent, UserStringEvent};

    fn shared(seq: u64, kernel_addr: u64, value: u32) -> abi::Event {
        abi::Event {
            cpu: 0,
            seq,
            body: EventBody::SharedRead {
                info: SharedReadEvent {
                    kernel_addr,
                    data_len: 4,
                    source: abi::SHARED_IO_URING_RING,
                    cr3: 0x1000,
                },
                data: value.to_le_bytes().to_vec(),
            },
        }
    }

    #[test]
    fn a_shared_word_gets_the_value_first_read() {
        let cq_tail = 0xffff_8880_0123_4040;
        let sq_tail = 0xffff_8880_0123_4004;
        let events = [
            shared(1, cq_tail, 7),
            shared(2, sq_tail, 3),
            // After the kernel advanced the CQ tail itself.
            shared(3, cq_tail, 9),
            abi::Event {
                cpu: 0,
                seq: 4,
                body: EventBody::Rdtsc(abi::RdtscEvent::default()),
            },
        ];
        let stint = StintBounds {
            end: 5,
            loaded_before: None,
            ends_in_hook: false,
        };
        assert_eq!(written(&events, &stint), [(1, cq_tail, 7), (2, sq_tail, 3)]);
    }

    fn written(events: &[abi::Event], stint: &StintBounds) -> Vec<(u64, u64, u32)> {
        first_shared_reads(events, stint)
            .map(|(seq, info, data)| {
                let word = u32::from_le_bytes(data.try_into().unwrap());
                (seq, info.kernel_addr, word)
            })
            .collect()
    }

    #[test]
    fn a_shared_word_read_ahead_is_written_only_when_the_stint_ends_before_its_record() {
        let (cq_tail, cq_head) = (0xffff_8880_0123_40c0, 0xffff_8880_0123_4080);
        // Seq 1 is the stint's own; 2 and 3 were read ahead (the vCPU's
        // records up to its next kernel entry from user mode).
        let events = [
            shared(1, cq_tail, 7),
            shared(2, cq_head, 6),
            shared(3, cq_tail, 8),
        ];
        let mut stint = StintBounds {
            end: 2,
            loaded_before: None,
            ends_in_hook: false,
        };
        // The stint ends elsewhere: a later store (another vCPU's kernel
        // advancing the head) must not be undone by an early write.
        assert_eq!(written(&events, &stint), [(1, cq_tail, 7)]);
        // It ends between the load of seq 2 and its record: only that one.
        stint.ends_in_hook = true;
        assert_eq!(written(&events, &stint), [(1, cq_tail, 7), (2, cq_head, 6)]);
        // The next stint leaves out the record whose load this one made:
        // its first read of the head is a later one.
        let next = [
            shared(2, cq_head, 6),
            shared(3, cq_tail, 8),
            shared(4, cq_head, 9),
        ];
        let stint = StintBounds {
            end: 5,
            loaded_before: Some(2),
            ends_in_hook: false,
        };
        assert_eq!(written(&next, &stint), [(3, cq_tail, 8), (4, cq_head, 9)]);
    }

    #[test]
    fn a_straight_path_to_the_hook_is_found_in_real_kernel_code() {
        let hook = 0xffff_ffff_810a_c560;
        // io_submit_sqes+1477 (the agent kernel of December 2026): the
        // agent's control bit test, then the hook's arguments and call.
        let at_call_block = [
            0x8b, 0x09, 0x83, 0xe1, 0x01, 0x0f, 0x84, 0x5e, 0xfa, 0xff, 0xff, 0x48, 0x8d, 0x7a,
            0x40, 0x31, 0xc9, 0x48, 0x8d, 0x74, 0x24, 0x1c, 0xba, 0x04, 0x00, 0x00, 0x00, 0xe8,
            0x7b, 0xf7, 0xe7, 0xff, 0x8b, 0x44, 0x24, 0x1c,
        ];
        let from = 0xffff_ffff_8122_cdc5;
        assert!(calls_straight_away(&at_call_block, from, &[hook]));
        assert!(!calls_straight_away(&at_call_block, from, &[hook + 1]));
        // io_cqring_wait+823, before the load: the hook is called only on
        // a taken branch.
        let before_load = [
            0x4c, 0x8b, 0x4c, 0x24, 0x60, 0x49, 0x8b, 0x51, 0x10, 0x8b, 0x82, 0xc0, 0x00, 0x00,
            0x00, 0x48, 0x8b, 0x0d, 0xd3, 0x01, 0x88, 0x00, 0x89, 0x44, 0x24, 0x28, 0x48, 0x85,
            0xc9, 0x0f, 0x85, 0x53, 0x01, 0x00, 0x00, 0xeb, 0x10,
        ];
        assert!(!calls_straight_away(
            &before_load,
            0xffff_ffff_8122_d227,
            &[hook]
        ));
        // A return first.
        assert!(!calls_straight_away(
            &[0xc3, 0xe8, 0, 0, 0, 0],
            0x1000,
            &[0x1006]
        ));
        assert!(calls_straight_away(
            &[0x90, 0xe8, 0, 0, 0, 0],
            0x1000,
            &[0x1006]
        ));
    }

    fn strnlen(user_addr: u64, limit: i64, result: i64) -> UserStringEvent {
        UserStringEvent {
            user_addr,
            limit,
            result,
            ..Default::default()
        }
    }

    #[test]
    fn bytes_read_ahead_are_written_only_where_nothing_was() {
        let mut written = CoveredBytes::default();
        written.cover(1, 0x1000, 0x1008);
        written.cover(1, 0x1008, 0x1010); // merges with the first
        written.cover(1, 0x1020, 0x1030);
        assert_eq!(written.0[&1].len(), 2);
        assert_eq!(written.uncovered(1, 0x1000, 16), []);
        assert_eq!(written.uncovered(1, 0x0ff8, 16), [(0, 8)]);
        assert_eq!(written.uncovered(1, 0x1008, 16), [(8, 16)]);
        assert_eq!(
            written.uncovered(1, 0x0ff0, 0x48),
            [(0, 0x10), (0x20, 0x30), (0x40, 0x48)]
        );
        // Another address space, or bytes nothing wrote.
        assert_eq!(written.uncovered(2, 0x1000, 16), [(0, 16)]);
        assert_eq!(written.uncovered(1, 0x2000, 4), [(0, 4)]);
        assert_eq!(written.uncovered(1, 0x0ff0, 16), [(0, 16)]);
        assert_eq!(written.uncovered(1, u64::MAX - 3, 4), [(0, 4)]);
        // A range spanning both merges them.
        written.cover(1, 0x100c, 0x1024);
        assert_eq!(
            written.0[&1].iter().collect::<Vec<_>>(),
            [(&0x1000, &0x1030)]
        );
        assert_eq!(written.uncovered(1, 0x0ffc, 0x38), [(0, 4), (0x34, 0x38)]);
    }

    #[test]
    fn access_bits_come_from_a_read_of_the_same_entry_only() {
        use super::with_recorded_access_bits as bits;
        // User A/D bits set by the CPU before the stint: taken, set or clear.
        assert_eq!(
            bits(0x8000_0000_0351_b005, 0x8000_0000_0351_b065),
            Some(0x8000_0000_0351_b065)
        );
        assert_eq!(
            bits(0x8000_0000_0351_b067, 0x8000_0000_0351_b027),
            Some(0x8000_0000_0351_b027)
        );
        // The rmap divergence: a read-only entry (…025) that a write fault
        // made writable and dirty (…067) before the first recorded read.
        assert_eq!(bits(0x8000_0000_0351_b025, 0x8000_0000_0351_b067), None);
        // Any other bit the kernel changed (NX, a software bit).
        assert_eq!(bits(0x8000_0000_0351_b025, 0x0000_0000_0351_b025), None);
        assert_eq!(bits(0x0351_b025, 0x0351_b825), None);
    }

    #[test]
    fn a_measured_string_held_no_nul_before_its_end() {
        // "abc\0": 3 bytes before the NUL.
        assert_eq!(
            strnlen_scanned_without_nul(&strnlen(0x1000, 250, 4)),
            Some(3)
        );
        // Longer than the limit: every word read, to the aligned end.
        assert_eq!(
            strnlen_scanned_without_nul(&strnlen(0x1003, 250, 251)),
            Some(253)
        );
        assert_eq!(
            strnlen_scanned_without_nul(&strnlen(0x1000, 256, 257)),
            Some(256)
        );
        // A fault (0) or an error says nothing.
        assert_eq!(strnlen_scanned_without_nul(&strnlen(0x1000, 250, 0)), None);
        assert_eq!(
            strnlen_scanned_without_nul(&strnlen(0x1000, 250, -14)),
            None
        );
        assert_eq!(
            strnlen_scanned_without_nul(&strnlen(u64::MAX - 2, 250, 251)),
            None
        );
    }
}
