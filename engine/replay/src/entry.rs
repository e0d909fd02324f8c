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
    /// its child run and exit, reading the child's memory).
    pub(crate) fn apply_user_reads(
        &mut self,
        cpu: usize,
        events: &[abi::Event],
        user: &mut paging::UserWrite,
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
                    let _ = self
                        .mem
                        .write_obj((cur & !AD) | (p.pte & AD), GuestAddress(at));
                }
                continue;
            }
        }
        for e in events {
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
            let done = paging::write_user(&self.mem, cr3, addr, &bytes);
            if done.written < bytes.len() as u64 {
                tracing::debug!(
                    "replay: of {} bytes at {addr:#x}, {} not written (page not present) and {} refused (not a user page): agent #{}",
                    bytes.len(),
                    done.not_present,
                    done.refused,
                    e.seq
                );
            }
            *user += done;
        }
    }
}
