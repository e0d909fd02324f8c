// SPDX-License-Identifier: GPL-2.0-or-later
//! Debugging on KVM: single-step, hardware breakpoints (DR0-DR3), software
//! (int3) breakpoints, and stepping over a breakpoint on resume.

use kvm_bindings::{
    kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use vm_memory::{Bytes, GuestAddress};

use super::{backend_err, kvm_err, KvmVcpu};
use crate::{Result, VmExit};

/// Most hardware breakpoints x86 has (DR0-DR3).
pub(super) const HW_BREAKPOINTS: usize = 4;
pub(super) const INT3: u8 = 0xcc;
const DB_VECTOR: u32 = 1;
pub(super) const BP_VECTOR: u32 = 3;

#[derive(Debug, Clone, Copy)]
pub(super) struct SwBreakpoint {
    pub(super) gva: u64,
    pub(super) gpa: u64,
    pub(super) original: u8,
}

/// A breakpoint being stepped over: the vCPU resumes at a breakpoint address
/// without stopping there again.
#[derive(Debug, Clone, Copy)]
pub(super) struct StepOver {
    /// An int3 byte to put back after the step.
    sw: Option<SwBreakpoint>,
}

impl KvmVcpu {
    pub(super) fn apply_debug(&mut self) -> Result<()> {
        let stepping_over = self.step_over.is_some();
        let sw = !self
            .sw_breakpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        let mut control = 0;
        let mut arch = kvm_guest_debug_arch::default();
        if self.single_step || stepping_over || self.window_stepping {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        if !self.hw_breakpoints.is_empty() && !stepping_over {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            let mut dr7 = 0u64;
            for (i, &addr) in self.hw_breakpoints.iter().enumerate() {
                arch.debugreg[i] = addr;
                // Local enable; R/W=00 (execute) and LEN=00 as required for
                // instruction breakpoints.
                dr7 |= 1 << (2 * i);
            }
            arch.debugreg[7] = dr7;
        }
        if sw {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        let dbg = kvm_guest_debug {
            control,
            pad: 0,
            arch,
        };
        self.fd
            .set_guest_debug(&dbg)
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        self.debug_dirty = false;
        Ok(())
    }

    pub(super) fn write_guest_byte(&self, gpa: u64, byte: u8) -> Result<()> {
        self.mem.write_obj(byte, GuestAddress(gpa)).map_err(|e| {
            backend_err(
                "patch software breakpoint",
                format!("guest physical {gpa:#x}: {e}"),
            )
        })
    }
    pub(super) fn on_debug(&mut self, exception: u32, pc: u64) -> Result<Option<VmExit>> {
        let rip = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rip;
        if let Some(over) = self.step_over.take() {
            // The step over a breakpoint is done: put its int3 back.
            if let Some(sw) = over.sw {
                self.write_guest_byte(sw.gpa, INT3)?;
            }
            self.debug_dirty = true;
            if exception == DB_VECTOR && !self.single_step {
                return Ok(None);
            }
            return Ok(Some(VmExit::Debug { rip }));
        }
        if exception == DB_VECTOR
            && self.window_stepping
            && !self.single_step
            && !self.hw_breakpoints.contains(&rip)
        {
            // A step towards the interrupt window: the loop checks it.
            return Ok(None);
        }
        match exception {
            DB_VECTOR | BP_VECTOR => Ok(Some(VmExit::Debug { rip })),
            other => Err(backend_err(
                "KVM_RUN",
                format!("debug exit for exception {other} at {pc:#x}"),
            )),
        }
    }

    /// Before resuming at an address that has a breakpoint, arrange to step
    /// over it (gdb semantics: continuing from a breakpoint does not hit it
    /// again).
    pub(super) fn prepare_step_over(&mut self) -> Result<()> {
        let sw = self
            .sw_breakpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if self.hw_breakpoints.is_empty() && sw.is_empty() {
            return Ok(());
        }
        let rip = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rip;
        let sw_here = sw.iter().find(|b| b.gva == rip).copied();
        if self.hw_breakpoints.contains(&rip) || sw_here.is_some() {
            if let Some(b) = sw_here {
                self.write_guest_byte(b.gpa, b.original)?;
            }
            self.step_over = Some(StepOver { sw: sw_here });
            self.debug_dirty = true;
        }
        Ok(())
    }

    pub(super) fn clear_sw_breakpoints(&mut self) -> Result<()> {
        let old = std::mem::take(
            &mut *self
                .sw_breakpoints
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for b in old {
            self.write_guest_byte(b.gpa, b.original)?;
        }
        Ok(())
    }
}
