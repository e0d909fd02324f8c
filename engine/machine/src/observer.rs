// SPDX-License-Identifier: GPL-2.0-or-later
//! What a run does, for whoever watches it. The run loop and the platform's
//! device bus report device reads, CPU events, DMA, interrupts, AP startups
//! and the points between vCPU runs to a [`RunObserver`]; the recorder is
//! one (`record::session`), `krr run` has none. The machine itself knows
//! nothing of recording.

use super::platform::Platform;
use super::{CpuState, MachineConfig, RunEnd};
use krr_hypervisor::{
    DeliveredException, HypervisorError, Injection, Position, UserEntry, Vcpu, Vm,
};
use std::any::Any;
use vm_memory::GuestMemoryMmap;

/// Watches a run. Every method has a default that does nothing.
pub trait RunObserver {
    // During a vCPU run, from the device bus, at the instruction that made
    // the access (`at`).

    /// A port read and the value the device returned.
    fn pio_read(&mut self, _cpu: usize, _at: Position, _port: u16, _data: &[u8]) {}
    /// A port write (the guest agent's doorbell is one).
    fn pio_write(&mut self, _cpu: usize, _at: Position, _port: u16, _data: &[u8]) {}
    /// An MMIO read and the value the device returned.
    fn mmio_read(&mut self, _cpu: usize, _at: Position, _addr: u64, _data: &[u8]) {}
    /// RDTSC/RDTSCP and the value the virtual clock gave.
    fn rdtsc(&mut self, _cpu: usize, _at: Position, _value: u64) {}
    /// An exception the backend is about to deliver through the guest IDT.
    fn exception(&mut self, _cpu: usize, _at: Position, _exception: &DeliveredException) {}
    /// A SYSCALL the backend performs, with the user's state.
    fn syscall(&mut self, _cpu: usize, _at: Position, _entry: &UserEntry) {}
    /// A device wrote guest memory in `[gpa, gpa + len)` (DMA).
    fn dma(&mut self, _cpu: usize, _at: Position, _gpa: u64, _len: u64) {}
    /// Asked after each access: end the vCPU's run now (an I/O stop)?
    fn wants_stop(&self) -> bool {
        false
    }

    // Between vCPU runs: every vCPU stopped at an instruction boundary.

    /// At the top of every round of turns; an error ends the run.
    fn round_start(&mut self, _m: &mut MachineView<'_>) -> Result<(), String> {
        Ok(())
    }
    /// `injection` is about to be made into vCPU `cpu`: its position is
    /// the instruction it will be taken before.
    fn interrupt(
        &mut self,
        _m: &MachineView<'_>,
        _cpu: usize,
        _injection: Injection,
    ) -> Result<(), HypervisorError> {
        Ok(())
    }
    /// A startup IPI started application processor `cpu`.
    fn startup(&mut self, _cpu: usize, _vector: u8) {}
    /// After a run of vCPU `cpu` that ended at a block boundary (not an I/O
    /// stop or the triple fault that ends a run).
    fn after_run(&mut self, _m: &MachineView<'_>, _cpu: usize) -> Result<(), HypervisorError> {
        Ok(())
    }
    /// After every run of vCPU `cpu`; returns the run's end when the run
    /// must stop.
    fn between_runs(&mut self, _m: &mut MachineView<'_>, _cpu: usize) -> Option<RunEnd> {
        None
    }
    /// The run ended.
    fn finished(&mut self, _m: &mut MachineView<'_>, _end: &RunEnd) {}

    /// For the observer's owner to take it back with its type
    /// ([`super::Machine::take_observer`]).
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// The machine as an observer sees it between runs.
pub struct MachineView<'a> {
    pub cfg: &'a MachineConfig,
    pub vcpus: &'a [Box<dyn Vcpu>],
    /// For backend caches that must restart where a recording starts.
    pub vm: &'a mut dyn Vm,
    pub platform: &'a Platform,
    pub mem: &'a GuestMemoryMmap,
    pub(super) states: &'a [CpuState],
    /// The kernel has started `/init` (its console line was seen).
    pub init_started: bool,
    /// The vCPU whose triple fault ended the run, if one did.
    pub triple_fault_vcpu: Option<usize>,
}

/// vCPU `id`'s virtual clock (ns): instructions retired plus time halted.
pub(super) fn vcpu_clock(vcpus: &[Box<dyn Vcpu>], platform: &Platform, id: usize) -> u64 {
    vcpus[id].instructions_retired().unwrap_or(0) + platform.idle_ns[id]
}

/// The machine's virtual time: its most advanced vCPU's clock.
pub(super) fn machine_clock(vcpus: &[Box<dyn Vcpu>], platform: &Platform) -> u64 {
    (0..vcpus.len())
        .map(|i| vcpu_clock(vcpus, platform, i))
        .max()
        .unwrap_or(0)
}

impl MachineView<'_> {
    /// The machine's virtual time: its most advanced vCPU's clock.
    pub fn virtual_now(&self) -> u64 {
        machine_clock(self.vcpus, self.platform)
    }

    /// vCPU `id`'s scheduling state: `wait-for-sipi`, `running`, `halted`
    /// or `stopped`.
    pub fn state_name(&self, id: usize) -> &'static str {
        match self.states[id] {
            CpuState::WaitForSipi => "wait-for-sipi",
            CpuState::Running => "running",
            CpuState::Halted => "halted",
            CpuState::Stopped => "stopped",
        }
    }

    /// The guest's console output so far (its most recent bytes held).
    pub fn console(&self) -> &krr_devices::console::ConsoleBuffer {
        self.platform.serial.output()
    }
}

/// Where `vcpu` stands (for events logged between runs), and its registers.
pub fn position(vcpu: &dyn Vcpu) -> Result<(Position, krr_hypervisor::Regs), HypervisorError> {
    let regs = vcpu.regs()?;
    let at = Position {
        icount: vcpu.instructions_retired().unwrap_or(0),
        kernel_icount: vcpu.kernel_instructions_retired().unwrap_or(0),
        rip: regs.rip,
        rcx: regs.rcx,
        cpl: vcpu.sregs()?.cs.dpl,
    };
    Ok((at, regs))
}
