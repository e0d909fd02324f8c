// SPDX-License-Identifier: GPL-2.0-or-later
//! The vCPU's run loop: one `KVM_RUN` after another, forwarding port/MMIO
//! exits to the bus, and turning the other exits into a [`VmExit`].

use kvm_ioctls::VcpuExit;

use super::async_delivery::AsyncPosition;
use super::debug::BP_VECTOR;
use super::{backend_err, kvm_err, KvmVcpu};
use crate::{HypervisorError, Injection, Result, RunContext, Vcpu, VmExit};

/// What one `KVM_RUN` ended with, once its borrowed exit data is consumed.
enum Step {
    Io,
    Halt,
    Window,
    Debug { exception: u32, pc: u64 },
    Shutdown,
    Interrupted,
}

impl KvmVcpu {
    /// Completes a port-in/MMIO-read (and any string I/O) whose data is in
    /// `kvm_run` but not yet in the guest's registers, without running guest
    /// code: `KVM_RUN` with `immediate_exit` set (the KVM API's documented
    /// way), so the engine sees consistent state.
    ///
    /// KVM finishes the pending access before it looks at `immediate_exit`,
    /// and finishing it can produce the next access without entering the
    /// guest (the rest of a string instruction; on PVM, which emulates guest
    /// ring 0, the next port access of the emulated code). Those accesses
    /// go to `bus` like any other, and completion is tried again. While
    /// single-stepping, completion can end with the step's debug exit
    /// instead; a gdb single-step stop is then reported as this I/O stop.
    fn complete_pending_io(&mut self, bus: &mut dyn RunContext) -> Result<()> {
        /// More follow-on accesses than any string instruction or emulated
        /// stretch produces: a loop past it is a bug, reported.
        const MAX_FOLLOW_ON: usize = 1 << 16;
        let id = self.id;
        self.fd.set_kvm_immediate_exit(1);
        let mut result = Err(backend_err(
            "complete pending I/O",
            format!("still not complete after {MAX_FOLLOW_ON} follow-on accesses"),
        ));
        for _ in 0..MAX_FOLLOW_ON {
            let exit = match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR => {
                    result = Ok(());
                    break;
                }
                Err(e) => {
                    result = Err(backend_err("complete pending I/O", e.to_string()));
                    break;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    bus.pio_read(id, port, data);
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    bus.pio_write(id, port, data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    bus.mmio_read(id, addr, data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    bus.mmio_write(id, addr, data);
                    continue;
                }
                Ok(VcpuExit::Debug(arch)) => {
                    // Single-stepping (towards an interrupt window, over a
                    // breakpoint, or for gdb) ends the completion after one
                    // more instruction: the state is consistent there too.
                    let (exception, pc) = (arch.exception, arch.pc);
                    self.fd.set_kvm_immediate_exit(0);
                    return self.on_debug(exception, pc).map(|_| ());
                }
                Ok(other) => format!("{other:?}"),
            };
            result = Err(backend_err(
                "complete pending I/O",
                format!("KVM_RUN with immediate_exit ran the guest to exit {exit}"),
            ));
            break;
        }
        self.fd.set_kvm_immediate_exit(0);
        result
    }
    pub(super) fn run_loop(&mut self, bus: &mut dyn RunContext) -> Result<VmExit> {
        let id = self.id;
        let mut interrupted = false;
        loop {
            let kick = self.kicker.take();
            if kick.is_some() || (interrupted && self.waiting_since.is_some()) {
                if let Some(exit) = self.on_async(bus, kick)? {
                    return Ok(exit);
                }
            }
            interrupted = false;
            if self.window_requested && self.window_by_single_step {
                if self.interrupt_window_open()? {
                    self.set_window_stepping(false);
                    self.deliver_point(AsyncPosition::InterruptWindow);
                    return Ok(VmExit::InterruptWindow);
                }
                self.set_window_stepping(true);
            } else {
                self.set_window_stepping(false);
            }
            if self.debug_dirty {
                self.apply_debug()?;
            }
            self.fd.get_kvm_run().request_interrupt_window = u8::from(self.window_requested);
            let step = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    bus.pio_read(id, port, data);
                    Step::Io
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    bus.pio_write(id, port, data);
                    Step::Io
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    bus.mmio_read(id, addr, data);
                    Step::Io
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    bus.mmio_write(id, addr, data);
                    Step::Io
                }
                Ok(VcpuExit::Hlt) => Step::Halt,
                Ok(VcpuExit::IrqWindowOpen) => Step::Window,
                Ok(VcpuExit::Debug(arch)) => Step::Debug {
                    exception: arch.exception,
                    pc: arch.pc,
                },
                Ok(VcpuExit::Shutdown) => Step::Shutdown,
                Ok(VcpuExit::Intr) => Step::Interrupted,
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return Err(backend_err(
                        "KVM_RUN",
                        format!("VM entry failed: hardware reason {reason:#x} on host cpu {cpu}"),
                    ))
                }
                Ok(VcpuExit::InternalError) => {
                    if self.guest_int3_failed()? {
                        continue;
                    }
                    return Err(self.internal_error());
                }
                Ok(other) => {
                    return Err(backend_err("KVM_RUN", format!("unexpected exit {other:?}")))
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Step::Interrupted
                }
                Err(e) => return Err(backend_err("KVM_RUN", e.to_string())),
            };
            match step {
                Step::Io => {
                    if bus.stop_requested() {
                        self.complete_pending_io(bus)?;
                        self.deliver_point(AsyncPosition::AfterIo);
                        return Ok(VmExit::IoStop);
                    }
                }
                Step::Halt => {
                    self.deliver_point(AsyncPosition::Halt);
                    return Ok(VmExit::Hlt);
                }
                Step::Window => {
                    self.deliver_point(AsyncPosition::InterruptWindow);
                    return Ok(VmExit::InterruptWindow);
                }
                Step::Shutdown => {
                    self.stop_waiting();
                    return Ok(VmExit::Shutdown);
                }
                Step::Interrupted => {
                    self.fd.set_kvm_immediate_exit(0);
                    interrupted = true;
                }
                Step::Debug { exception, pc } => {
                    if let Some(exit) = self.on_debug(exception, pc)? {
                        self.stop_waiting();
                        return Ok(exit);
                    }
                }
            }
        }
    }

    fn set_window_stepping(&mut self, on: bool) {
        if self.window_stepping != on {
            self.window_stepping = on;
            self.debug_dirty = true;
        }
    }

    /// PVM's ring-0 emulator fails on an `int3` the guest kernel executes
    /// itself (Linux runs one in `int3_selftest`, and uses int3 to patch
    /// live code). When the failed instruction is an int3 that is not one
    /// of the engine's breakpoints, this does what the CPU would: the #BP
    /// trap, with RIP after the instruction. Returns whether it did.
    fn guest_int3_failed(&mut self) -> Result<bool> {
        if !self.window_by_single_step {
            return Ok(false);
        }
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member the kernel filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        // Emulation failure with the instruction bytes (flags bit 0): data[1]
        // holds the length in its low byte, then the first bytes.
        let with_bytes = internal.suberror == 1 && internal.ndata >= 2 && internal.data[0] & 1 != 0;
        if !with_bytes || internal.data[1] & 0xff == 0 || (internal.data[1] >> 8) & 0xff != 0xcc {
            return Ok(false);
        }
        let mut regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let ours = self
            .sw_breakpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|b| b.gva == regs.rip);
        if ours {
            return Ok(false);
        }
        regs.rip += 1;
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        self.inject(Injection::Exception {
            vector: BP_VECTOR as u8,
            error_code: None,
            cr2: None,
        })?;
        Ok(true)
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR`: the suberror (1: emulation
    /// failure, the common one) and where the guest was.
    fn internal_error(&mut self) -> HypervisorError {
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the union member the kernel filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let cpl = self.current_cpl().unwrap_or(0);
        let n = (internal.ndata as usize).min(internal.data.len());
        backend_err(
            "KVM_RUN",
            format!(
                "KVM internal error, suberror {} ({}), at rip {rip:#x} cpl {cpl}, data {:x?}",
                internal.suberror,
                match internal.suberror {
                    1 => "instruction emulation failed",
                    2 => "event delivery failed (simultaneous exceptions)",
                    3 => "delivery of an exception caused a VM exit",
                    _ => "other",
                },
                &internal.data[..n]
            ),
        )
    }
}
