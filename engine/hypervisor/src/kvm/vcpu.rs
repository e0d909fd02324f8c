// SPDX-License-Identifier: GPL-2.0-or-later
//! The KVM vCPU: its state, its public accessors, and the [`Vcpu`] trait
//! (registers, MSRs, FPU, event injection, debug controls).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_cpuid_entry2, kvm_interrupt, kvm_msr_entry, kvm_xsave, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use super::async_delivery::{AsyncDeliveryStats, AsyncPosition, Poller};
use super::debug::{StepOver, SwBreakpoint, HW_BREAKPOINTS, INT3};
use super::{backend_err, convert, cpuid, kvm_err, AsyncEventMode, GuestCounter, VcpuKicker};
use crate::{DebugRegs, FpuState, Injection, Regs, Result, RunContext, Sregs, Vcpu, VmExit};

// KVM_INTERRUPT (_IOW(KVMIO, 0x86, struct kvm_interrupt)); kvm-ioctls has no
// wrapper for it because rust-vmm VMMs always use the in-kernel irqchip.
ioctl_iow_nr!(KVM_INTERRUPT, 0xAE, 0x86, kvm_interrupt);

const RFLAGS_IF: u64 = 1 << 9;

/// One KVM vCPU. `Send`: move it to its own host thread for SMP.
pub struct KvmVcpu {
    pub(super) id: usize,
    pub(super) fd: VcpuFd,
    pub(super) mem: GuestMemoryMmap,
    pub(super) kicker: VcpuKicker,
    pub(super) supported_cpuid: Arc<Vec<kvm_cpuid_entry2>>,
    pub(super) cpuid_loaded: bool,
    pub(super) mode: AsyncEventMode,
    pub(super) counter: Option<GuestCounter>,
    pub(super) window_requested: bool,
    /// PVM emulates guest ring 0 and does not exit when an emulated STI or
    /// POPF opens the interrupt window, so the window is found by single
    /// steps there (hardware KVM exits by itself, at the same instruction).
    pub(super) window_by_single_step: bool,
    pub(super) window_stepping: bool,
    pub(super) single_step: bool,
    pub(super) hw_breakpoints: Vec<u64>,
    pub(super) sw_breakpoints: Arc<Mutex<Vec<SwBreakpoint>>>,
    pub(super) step_over: Option<StepOver>,
    pub(super) debug_dirty: bool,
    /// Set while a stop request waits for a deterministic point.
    pub(super) waiting_since: Option<Instant>,
    pub(super) poller: Option<Poller>,
    pub(super) stats: AsyncDeliveryStats,
    pub(super) last_async_position: Option<AsyncPosition>,
    pub(super) budget_noted: bool,
}

impl KvmVcpu {
    pub fn id(&self) -> usize {
        self.id
    }

    /// A handle other threads use to force this vCPU back to the engine
    /// (timer expiry, device interrupt, recorder). Set the machine model's
    /// state that makes [`RunEvents::stop_requested`](crate::RunEvents::stop_requested) true first, then kick.
    pub fn kicker(&self) -> VcpuKicker {
        self.kicker.clone()
    }

    pub fn async_event_mode(&self) -> AsyncEventMode {
        self.mode
    }

    /// Sets the guest's TSC rate (`KVM_SET_TSC_KHZ`), so that RDTSC, which
    /// executes natively, ticks at the rate the engine's CPUID announces.
    /// Fails where the host cannot scale the TSC.
    pub fn set_tsc_khz(&self, khz: u32) -> Result<()> {
        self.fd.set_tsc_khz(khz).map_err(kvm_err("KVM_SET_TSC_KHZ"))
    }

    pub fn async_delivery_stats(&self) -> AsyncDeliveryStats {
        self.stats
    }

    /// Where the last stop for an asynchronous event happened.
    pub fn last_async_position(&self) -> Option<AsyncPosition> {
        self.last_async_position
    }

    /// The guest PMU counter's value (PMU mode, after the first run).
    pub fn guest_event_count(&mut self) -> Option<u64> {
        self.counter.as_mut().and_then(|c| c.read().ok())
    }

    /// Loads the engine's CPUID into KVM, refusing features the host lacks.
    fn load_cpuid(&mut self, bus: &mut dyn RunContext) -> Result<()> {
        let table = cpuid::table_from_bus(bus, self.id)?;
        let missing = cpuid::unsupported_features(&table, &self.supported_cpuid);
        if !missing.is_empty() {
            return Err(backend_err(
                "KVM_SET_CPUID2",
                format!(
                    "the engine's CPUID advertises features this host's KVM cannot give a guest: {}",
                    missing.join("; ")
                ),
            ));
        }
        self.fd
            .set_cpuid2(&cpuid::to_kvm(&table)?)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        self.cpuid_loaded = true;
        Ok(())
    }
    pub(super) fn current_cpl(&self) -> Result<u8> {
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(if sregs.cr0 & 1 == 0 {
            0
        } else {
            (sregs.cs.selector & 3) as u8
        })
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.poller.take();
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self, bus: &mut dyn RunContext, budget: Option<u64>) -> Result<VmExit> {
        if !self.cpuid_loaded {
            self.load_cpuid(bus)?;
        }
        if budget.is_some() && !self.budget_noted {
            self.budget_noted = true;
            tracing::info!(
                "kvm vcpu{}: instruction budgets are not counted on KVM; runs end at exits and kicks",
                self.id
            );
        }
        self.ensure_counter();
        self.prepare_step_over()?;
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        let kicker = self.kicker.clone();
        let _guard = kicker.enter_run(immediate_exit);
        let r = self.run_loop(bus);
        if r.is_err() {
            self.stop_waiting();
        }
        r
    }

    fn regs(&self) -> Result<Regs> {
        let r = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        Ok(convert::regs_from_kvm(&r))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(kvm_err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<Sregs> {
        let s = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(convert::sregs_from_kvm(&s))
    }

    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()> {
        let base = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&convert::sregs_to_kvm(sregs, &base))
            .map_err(kvm_err("KVM_SET_SREGS"))
    }

    fn fpu(&self) -> Result<FpuState> {
        let x = self.fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        let xsave = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        Ok(FpuState { xsave })
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        let mut x = kvm_xsave::default();
        let max = x.region.len() * 4;
        if fpu.xsave.len() < 512 || fpu.xsave.len() > max {
            return Err(backend_err(
                "KVM_SET_XSAVE",
                format!(
                    "FPU state is {} bytes; expected the 512-byte FXSAVE area, optionally followed by XSAVE state, at most {max} bytes",
                    fpu.xsave.len()
                ),
            ));
        }
        for (i, chunk) in fpu.xsave.chunks(4).enumerate() {
            let mut w = [0u8; 4];
            w[..chunk.len()].copy_from_slice(chunk);
            x.region[i] = u32::from_le_bytes(w);
        }
        // SAFETY: `x` is a full kvm_xsave of the legacy 4 KiB size. KVM
        // reads the vCPU's uabi XSAVE size from it, which exceeds 4 KiB only
        // when dynamically enabled XSTATE features (AMX) were granted with
        // arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM); this process never asks for
        // them, so every byte read is inside `x`.
        unsafe { self.fd.set_xsave(&x) }.map_err(kvm_err("KVM_SET_XSAVE"))
    }

    fn msr(&self, index: u32) -> Result<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| backend_err("KVM_GET_MSRS", format!("{e:?}")))?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS"))?;
        if n != 1 {
            return Err(backend_err(
                "KVM_GET_MSRS",
                format!("MSR {index:#x} is not readable on this host"),
            ));
        }
        Ok(msrs.as_slice()[0].data)
    }

    fn set_msr(&mut self, index: u32, value: u64) -> Result<()> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data: value,
            ..Default::default()
        }])
        .map_err(|e| backend_err("KVM_SET_MSRS", format!("{e:?}")))?;
        let n = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != 1 {
            return Err(backend_err(
                "KVM_SET_MSRS",
                format!("MSR {index:#x} = {value:#x} was refused by KVM"),
            ));
        }
        Ok(())
    }

    fn debug_regs(&self) -> Result<DebugRegs> {
        let d = self
            .fd
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        Ok(DebugRegs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
        })
    }

    fn set_debug_regs(&mut self, regs: &DebugRegs) -> Result<()> {
        let mut d = self
            .fd
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        d.db = regs.db;
        d.dr6 = regs.dr6;
        d.dr7 = regs.dr7;
        self.fd
            .set_debug_regs(&d)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))
    }

    fn inject(&mut self, event: Injection) -> Result<()> {
        match event {
            Injection::Interrupt(vector) => {
                if !self.interrupt_window_open()? {
                    return Err(backend_err(
                        "KVM_INTERRUPT",
                        format!(
                            "vector {vector:#x}: the guest cannot take an interrupt now (IF=0, interrupt shadow or an event already queued); request an interrupt window first"
                        ),
                    ));
                }
                let irq = kvm_interrupt {
                    irq: u32::from(vector),
                };
                // SAFETY: KVM_INTERRUPT on our vCPU fd with a valid struct.
                let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
                if ret != 0 {
                    return Err(backend_err(
                        "KVM_INTERRUPT",
                        format!("vector {vector:#x}: {}", std::io::Error::last_os_error()),
                    ));
                }
                self.window_requested = false;
                Ok(())
            }
            Injection::Nmi => self.fd.nmi().map_err(kvm_err("KVM_NMI")),
            // Only replay makes these, and replay runs on the software CPU.
            Injection::SoftwareInterrupt(vector) => Err(backend_err(
                "KVM_SET_VCPU_EVENTS",
                format!("software interrupt {vector:#x}: injected by replay only, which runs on the software CPU"),
            )),
            Injection::Exception {
                vector,
                error_code,
                cr2,
            } => {
                if vector >= 32 {
                    return Err(backend_err(
                        "KVM_SET_VCPU_EVENTS",
                        format!("exception vector {vector} is not an exception (expected 0..=31)"),
                    ));
                }
                match (vector, cr2) {
                    (1, Some(dr6)) => {
                        let mut d = self
                            .fd
                            .get_debug_regs()
                            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
                        d.dr6 = dr6;
                        self.fd
                            .set_debug_regs(&d)
                            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
                    }
                    (_, Some(cr2)) => {
                        let mut s = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                        s.cr2 = cr2;
                        self.fd.set_sregs(&s).map_err(kvm_err("KVM_SET_SREGS"))?;
                    }
                    (_, None) => {}
                }
                let mut ev = self
                    .fd
                    .get_vcpu_events()
                    .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
                ev.exception.injected = 1;
                ev.exception.pending = 0;
                ev.exception.nr = vector;
                ev.exception.has_error_code = u8::from(error_code.is_some());
                ev.exception.error_code = error_code.unwrap_or(0);
                ev.flags = 0;
                self.fd
                    .set_vcpu_events(&ev)
                    .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))
            }
        }
    }

    fn interrupt_window_open(&self) -> Result<bool> {
        let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let ev = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(regs.rflags & RFLAGS_IF != 0
            && ev.interrupt.shadow == 0
            && ev.interrupt.injected == 0
            && ev.exception.injected == 0
            && ev.nmi.injected == 0)
    }

    fn request_interrupt_window(&mut self, enable: bool) -> Result<()> {
        self.window_requested = enable;
        Ok(())
    }

    fn set_single_step(&mut self, enable: bool) -> Result<()> {
        self.single_step = enable;
        self.debug_dirty = true;
        Ok(())
    }

    /// The first four addresses become hardware breakpoints (DR0-DR3); any
    /// further ones are software breakpoints (int3 written into guest
    /// memory, shared by all vCPUs of the VM, at the guest-physical address
    /// the current page tables give).
    fn set_breakpoints(&mut self, addrs: &[u64]) -> Result<()> {
        self.clear_sw_breakpoints()?;
        let (hw, sw) = addrs.split_at(addrs.len().min(HW_BREAKPOINTS));
        if !sw.is_empty() && self.window_by_single_step {
            // Found on PVM: an int3 in guest ring 0 ends KVM_RUN with an
            // emulation failure instead of a #BP debug exit.
            return Err(backend_err(
                "set software breakpoint",
                format!(
                    "{} breakpoints asked for; this /dev/kvm is not hardware-backed and cannot stop at int3 in guest kernel mode, so at most {HW_BREAKPOINTS} (hardware) are available",
                    addrs.len()
                ),
            ));
        }
        self.hw_breakpoints = hw.to_vec();
        let mut placed = Vec::new();
        for &gva in sw {
            let t = self
                .fd
                .translate_gva(gva)
                .map_err(kvm_err("KVM_TRANSLATE"))?;
            if t.valid == 0 {
                return Err(backend_err(
                    "set software breakpoint",
                    format!("guest virtual address {gva:#x} is not mapped"),
                ));
            }
            let gpa = t.physical_address;
            let original: u8 = self.mem.read_obj(GuestAddress(gpa)).map_err(|e| {
                backend_err(
                    "set software breakpoint",
                    format!("guest physical {gpa:#x}: {e}"),
                )
            })?;
            self.write_guest_byte(gpa, INT3)?;
            placed.push(SwBreakpoint { gva, gpa, original });
        }
        *self
            .sw_breakpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = placed;
        self.debug_dirty = true;
        Ok(())
    }

    fn instructions_retired(&self) -> Option<u64> {
        None
    }
}
