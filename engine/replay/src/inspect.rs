// SPDX-License-Identifier: GPL-2.0-or-later
//! What a debugger reads and sets on a replay: its recording, symbols,
//! vCPUs, memory and counts; breakpoints and watchpoints.

use super::*;
use krr_hypervisor::Regs;

impl Replayer {
    /// Symbolizes `rip`.
    pub fn symbolize(&self, rip: u64) -> String {
        symbolize(&self.symbols, rip)
    }

    /// The recording's header (kernel, vmlinux, vCPUs, memory).
    pub fn header(&self) -> &RecordingHeader {
        &self.header
    }

    /// The replaying vCPUs.
    pub fn vcpus(&self) -> &[Box<dyn Vcpu>] {
        &self.vcpus
    }

    /// The guest's memory as the replay has it.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Writes `data` at guest-physical `gpa`: a debugger's write, after
    /// which the replay is no longer the recording's. Code translated from
    /// those bytes is dropped.
    pub fn write_memory(&mut self, gpa: u64, data: &[u8]) -> Result<(), ReplayError> {
        let len = data.len() as u64;
        let inside = u32::try_from(len).is_ok_and(|n| bus::in_ram(&self.mem, gpa, n));
        if !inside {
            return Err(ReplayError::Setup(format!(
                "write of {len} bytes at guest-physical {gpa:#x}: outside guest RAM"
            )));
        }
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| ReplayError::Setup(format!("write at {gpa:#x}: {e}")))?;
        self.vm
            .invalidate_code(gpa, len)
            .map_err(|e| ReplayError::Setup(format!("write at {gpa:#x}: {e}")))
    }

    /// Sets vCPU `cpu`'s general registers, RIP and RFLAGS: a debugger's
    /// write, after which the replay is no longer the recording's.
    pub fn set_regs(&mut self, cpu: usize, regs: &Regs) -> Result<(), ReplayError> {
        self.vcpus
            .get_mut(cpu)
            .ok_or_else(|| ReplayError::Setup(format!("no vCPU {cpu}")))?
            .set_regs(regs)
            .map_err(|e| ReplayError::Setup(format!("setting vCPU {cpu}'s registers: {e}")))
    }

    /// Kernel instructions vCPU `cpu` has retired, as the recording counts
    /// them (from the recording's start, not the replay's).
    pub fn kernel_count(&self, session: &ReplaySession, cpu: usize) -> u64 {
        self.kernel_now(&session.progress, cpu)
    }

    /// Sets the watchpoints (guest-virtual ranges, translated through vCPU
    /// 0's page tables: kernel data is mapped alike in every address
    /// space): a turn whose vCPU accesses one stops at the end of that
    /// block ([`DebugStop::Watch`], with the exact point of the access).
    pub fn set_watchpoints(&mut self, watchpoints: &[Watchpoint]) -> Result<(), ReplayError> {
        let cr3 = self.vcpus[0]
            .sregs()
            .map_err(|e| ReplayError::Setup(format!("watchpoints: {e}")))?
            .cr3;
        let mut translated = Vec::new();
        for wp in watchpoints {
            let mut pieces = Vec::new();
            let end = wp.addr.saturating_add(wp.len.max(1));
            let mut va = wp.addr;
            while va < end {
                let piece = (end - va).min(0x1000 - (va & 0xfff));
                let pa = paging::translate(&self.mem, cr3, va).ok_or_else(|| {
                    ReplayError::Setup(format!("watchpoint: {va:#x} is not mapped"))
                })?;
                pieces.push((pa, pa + piece));
                va += piece;
            }
            translated.push((*wp, pieces));
        }
        self.vcpus[0]
            .set_watchpoints(&translated)
            .map_err(|e| ReplayError::Setup(format!("watchpoints: {e}")))
    }

    /// Sets the breakpoints of every vCPU (guest-virtual addresses): a
    /// turn whose vCPU gets to one stops there ([`DebugStop::Breakpoint`]).
    /// They leave guest memory alone, so the replay's checks stay valid.
    pub fn set_breakpoints(
        &mut self,
        session: &mut ReplaySession,
        addrs: &[u64],
    ) -> Result<(), ReplayError> {
        for v in &mut self.vcpus {
            v.set_breakpoints(addrs)
                .map_err(|e| ReplayError::Setup(format!("breakpoints: {e}")))?;
        }
        session.debug.breakpoints = addrs.to_vec();
        Ok(())
    }
}
