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
        end: u64,
        user: &mut paging::UserWrite,
    ) {
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
                if let Some(len) = strnlen_scanned_without_nul(info) {
                    *user += paging::fill_user_nuls(
                        &self.mem,
                        space(info.cr3),
                        info.user_addr,
                        len,
                        0x01,
                    );
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
        for (seq, info, data) in first_shared_reads(events) {
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

/// The shared-memory reads of a stint to write before it, as the kernel
/// first read each address: a later read may see the kernel's own store
/// (a CQ tail it advanced), which must not overwrite what the first read
/// finds.
fn first_shared_reads(
    events: &[abi::Event],
) -> impl Iterator<Item = (u64, &abi::SharedReadEvent, &[u8])> {
    let mut seen = std::collections::HashSet::new();
    events.iter().filter_map(move |e| match &e.body {
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
    use super::{first_shared_reads, strnlen_scanned_without_nul, CoveredBytes};
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
        let got: Vec<(u64, u64, Vec<u8>)> = first_shared_reads(&events)
            .map(|(seq, info, data)| (seq, info.kernel_addr, data.to_vec()))
            .collect();
        assert_eq!(
            got,
            [
                (1, cq_tail, 7u32.to_le_bytes().to_vec()),
                (2, sq_tail, 3u32.to_le_bytes().to_vec())
            ]
        );
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
