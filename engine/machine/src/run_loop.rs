// SPDX-License-Identifier: GPL-2.0-or-later
//! The machine's one run loop, for both backends. vCPUs take turns in index
//! order on one host thread; what differs between backends is how time
//! advances, which a [`Pacer`] decides:
//!
//! - [`InstructionPacer`] (the software CPU): rounds of instruction quanta,
//!   each vCPU running until its clock reaches the round's end (at most
//!   [`MachineConfig::quantum`](super::MachineConfig::quantum) instructions
//!   after the slowest vCPU, never past the next timer deadline), so the
//!   run is the same every time.
//! - [`HostTimePacer`] (KVM): each vCPU runs until it exits by itself or a
//!   [`SliceTimer`] kicks it at the end of its host-time slice or at the
//!   next timer deadline; when every vCPU sleeps the thread sleeps until
//!   that deadline.
//!
//! Everything else (interrupt injection, AP startup, recording between
//! runs, the console watch, how a run ends) is shared, so every event kind
//! is logged on both backends.

use super::clock::{HostClock, HostClockBus, SliceTimer};
use super::platform::PowerEvent;
use super::{ConsoleWatch, CpuState, ExitCounters, Machine, Pending, RunEnd, RunReport};
use krr_devices::lapic::ApEvent;
use krr_hypervisor::kvm::{HostFeatures, VcpuKicker};
use krr_hypervisor::{HypervisorError, VmExit};
use rand_core::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a run advances time; see the module's documentation.
pub(super) trait Pacer {
    /// The machine's virtual time (ns), for the console's markers.
    fn now_ns(&self, m: &Machine) -> u64;
    /// Brings the platform's clock of vCPU `id` up to date.
    fn sync(&self, m: &mut Machine, id: usize);
    /// Before a round of turns over `active` (the vCPUs running or halted):
    /// plans the round, or ends the run.
    fn start_round(&mut self, m: &Machine, active: &[usize]) -> Result<(), Stop>;
    /// Before vCPU `id`'s turn: ends the run when a budget is spent.
    fn before_turn(&self, m: &Machine) -> Result<(), RunEnd>;
    /// Whether vCPU `id` runs at all this round: an interrupt is injected
    /// only into a vCPU that runs right after (an injection the vCPU does
    /// not take before the next one replaces it is lost, and the recording
    /// would log a vector the guest never saw).
    fn has_turn(&self, _m: &Machine, _id: usize) -> bool {
        true
    }
    /// A halted vCPU with nothing to take skips its turn.
    fn skip_halted(&mut self, m: &mut Machine, id: usize);
    /// Runs vCPU `id` for its turn; `None` when its turn is already over.
    fn run_turn(
        &mut self,
        m: &mut Machine,
        id: usize,
        pending: Pending,
        stats: &mut ExitCounters,
    ) -> Option<Result<VmExit, HypervisorError>>;
    /// After a round: waits while every vCPU sleeps, or ends the run.
    fn end_round(&mut self, m: &Machine, start: Instant) -> Result<(), Stop>;
    /// Completes the run's report with what only this pacer knows.
    fn finish_report(&self, _report: &mut RunReport) {}
}

/// Why a pacer ends a run.
pub(super) enum Stop {
    /// Every vCPU is asleep for good or stopped: the guest is done.
    Idle,
    End(RunEnd),
}

/// The software CPU's pacing: instruction quanta.
pub(super) struct InstructionPacer {
    round_end: u64,
    /// The wall-time limit (`--max-seconds`), checked after every round.
    max_wall: Option<Duration>,
    /// Chaos mode's generator of quantum lengths
    /// ([`MachineConfig::chaos_seed`](super::MachineConfig::chaos_seed)).
    chaos: Option<Pcg64Mcg>,
}

impl InstructionPacer {
    pub(super) fn new(max_wall: Option<Duration>, chaos_seed: Option<u64>) -> InstructionPacer {
        InstructionPacer {
            round_end: 0,
            max_wall,
            chaos: chaos_seed.map(Pcg64Mcg::seed_from_u64),
        }
    }

    /// The next round's quantum: `quantum`, or in chaos mode a draw in
    /// [quantum / 2, 3 * quantum / 2). Shorter turns would make a vCPU
    /// that spins on a lock wait longer, in tiny turns, for a holder whose
    /// clock is ahead (a boot then ran 70 times the instructions).
    fn quantum(&mut self, quantum: u64) -> u64 {
        match &mut self.chaos {
            None => quantum,
            Some(rng) => quantum / 2 + rng.next_u64() % quantum.max(1),
        }
    }
}

/// The run's end when `max_wall` has passed since `start`.
fn wall_exhausted(max_wall: Option<Duration>, start: Instant) -> Option<RunEnd> {
    let limit = max_wall?;
    (start.elapsed() >= limit).then(|| RunEnd::WallTimeExhausted {
        millis: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
    })
}

impl Pacer for InstructionPacer {
    fn now_ns(&self, m: &Machine) -> u64 {
        m.virtual_now()
    }

    fn sync(&self, m: &mut Machine, id: usize) {
        // The platform's clock of a vCPU moves with its accesses; code that
        // makes none (a user loop) must still reach its timers' deadlines.
        m.platform.retired[id] = m.vcpus[id].instructions_retired().unwrap_or(0);
    }

    fn start_round(&mut self, m: &Machine, active: &[usize]) -> Result<(), Stop> {
        // The round ends one quantum after the slowest active vCPU, or at
        // the next timer deadline; when all sleep, at that deadline.
        let floor = active.iter().map(|&i| m.now(i)).min().unwrap_or(0);
        let deadline = m.platform.next_deadline();
        let all_halted = active
            .iter()
            .all(|&i| m.state[i] == CpuState::Halted && !m.deliverable(i));
        self.round_end = if all_halted {
            match deadline {
                Some(d) => d.max(floor + 1),
                None => return Err(Stop::Idle),
            }
        } else {
            let q = floor + self.quantum(m.cfg.quantum);
            match deadline {
                Some(d) if d > floor => q.min(d),
                _ => q,
            }
        };
        Ok(())
    }

    fn before_turn(&self, m: &Machine) -> Result<(), RunEnd> {
        let total = m.total_instructions();
        if total >= m.cfg.max_instructions {
            return Err(RunEnd::BudgetExhausted {
                instructions: total,
            });
        }
        Ok(())
    }

    fn has_turn(&self, m: &Machine, id: usize) -> bool {
        m.now(id) < self.round_end
    }

    fn skip_halted(&mut self, m: &mut Machine, id: usize) {
        let now = m.now(id);
        if self.round_end > now {
            m.platform.idle_ns[id] += self.round_end - now;
        }
    }

    fn run_turn(
        &mut self,
        m: &mut Machine,
        id: usize,
        _pending: Pending,
        _stats: &mut ExitCounters,
    ) -> Option<Result<VmExit, HypervisorError>> {
        let now = m.now(id);
        if now >= self.round_end {
            return None;
        }
        let total = m.total_instructions();
        let budget = (self.round_end - now).min(m.cfg.max_instructions - total);
        Some(m.vcpus[id].run(&mut m.platform, Some(budget)))
    }

    fn end_round(&mut self, _m: &Machine, start: Instant) -> Result<(), Stop> {
        match wall_exhausted(self.max_wall, start) {
            Some(end) => Err(Stop::End(end)),
            None => Ok(()),
        }
    }
}

/// KVM's pacing: host-time slices, kicked by a [`SliceTimer`].
pub(super) struct HostTimePacer {
    kickers: Vec<VcpuKicker>,
    clock: HostClock,
    features: HostFeatures,
    timer: SliceTimer,
    /// The wall-time limit on the host clock: a vCPU that never exits must
    /// still be stopped there.
    wall_end: Option<u64>,
    max_wall: Option<Duration>,
}

impl HostTimePacer {
    pub(super) fn new(
        kickers: Vec<VcpuKicker>,
        clock: HostClock,
        features: HostFeatures,
        max_wall: Option<Duration>,
    ) -> Result<HostTimePacer, RunEnd> {
        let timer = SliceTimer::spawn().map_err(|e| RunEnd::BackendError {
            reason: format!("cannot start the KVM slice timer thread: {e}"),
        })?;
        let wall_end = max_wall.map(|limit| {
            clock
                .now_ns()
                .saturating_add(u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX))
        });
        Ok(HostTimePacer {
            kickers,
            clock,
            features,
            timer,
            wall_end,
            max_wall,
        })
    }
}

impl Pacer for HostTimePacer {
    fn now_ns(&self, _m: &Machine) -> u64 {
        self.clock.now_ns()
    }

    fn sync(&self, m: &mut Machine, id: usize) {
        self.clock.sync(&mut m.platform, id);
    }

    fn start_round(&mut self, _m: &Machine, _active: &[usize]) -> Result<(), Stop> {
        Ok(())
    }

    fn before_turn(&self, _m: &Machine) -> Result<(), RunEnd> {
        Ok(())
    }

    fn skip_halted(&mut self, _m: &mut Machine, _id: usize) {}

    fn run_turn(
        &mut self,
        m: &mut Machine,
        id: usize,
        pending: Pending,
        stats: &mut ExitCounters,
    ) -> Option<Result<VmExit, HypervisorError>> {
        // The slice ends when another vCPU needs the thread, or at the next
        // timer deadline; with neither, the vCPU runs until it exits by
        // itself (a kick would only make the backend look for a stopping
        // point for nothing).
        let now = self.clock.now_ns();
        let n = m.vcpus.len();
        let others_waiting = (0..n).any(|j| {
            j != id
                && match m.state[j] {
                    CpuState::Running => true,
                    CpuState::Halted => m.deliverable(j),
                    CpuState::WaitForSipi | CpuState::Stopped => false,
                }
        });
        let slice_ns = u64::try_from(m.cfg.kvm_slice.as_nanos()).unwrap_or(u64::MAX);
        let slice_end = others_waiting
            .then(|| now.saturating_add(slice_ns))
            .into_iter()
            .chain(m.platform.next_deadline().map(|d| d.max(now)))
            .chain(self.wall_end)
            .min();
        tracing::trace!(
            "kvm vcpu{id}: run at {now} ns until {slice_end:?} (timer {:?}, pending {pending:?})",
            m.platform.next_deadline()
        );
        let over = Arc::new(AtomicBool::new(false));
        let kicker = &self.kickers[id];
        if let Some(end) = slice_end {
            self.timer
                .arm_with(self.clock.instant_at(end), kicker.clone(), over.clone());
        }
        let exit = {
            let mut bus = HostClockBus {
                platform: &mut m.platform,
                clock: self.clock,
                slice_over: over,
                stats,
                features: &self.features,
                timer: &self.timer,
                kicker,
                slice_end,
            };
            m.vcpus[id].run(&mut bus, None)
        };
        self.timer.disarm();
        Some(exit)
    }

    fn end_round(&mut self, m: &Machine, start: Instant) -> Result<(), Stop> {
        if let Some(end) = wall_exhausted(self.max_wall, start) {
            return Err(Stop::End(end));
        }
        // Every vCPU halted with nothing to take: wait for the next timer
        // deadline in host time.
        let n = m.vcpus.len();
        let asleep = (0..n).all(|i| match m.state[i] {
            CpuState::Running => false,
            CpuState::Halted => !m.deliverable(i),
            CpuState::WaitForSipi | CpuState::Stopped => true,
        });
        if asleep && (0..n).any(|i| m.state[i] == CpuState::Halted) {
            let Some(d) = m.platform.next_deadline() else {
                return Err(Stop::Idle);
            };
            let now = self.clock.now_ns();
            if d > now {
                let mut wait = Duration::from_nanos(d - now);
                if let Some(limit) = self.max_wall {
                    wait = wait.min(limit.saturating_sub(start.elapsed()));
                }
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    fn finish_report(&self, report: &mut RunReport) {
        // KVM counts no instructions; its clock is the host's.
        report.instructions_to_init = None;
        report.virtual_ns = self.clock.now_ns();
    }
}

impl Machine {
    /// Runs the guest to its end (see [`RunEnd`]), on whichever backend
    /// the machine was built for.
    pub fn run(&mut self) -> RunReport {
        let start = Instant::now();
        let mut pacer: Box<dyn Pacer> = match &self.kvm {
            None => Box::new(InstructionPacer::new(
                self.cfg.max_wall,
                self.cfg.chaos_seed,
            )),
            Some(kvm) => {
                match HostTimePacer::new(
                    kvm.kickers.clone(),
                    kvm.clock,
                    kvm.features.clone(),
                    self.cfg.max_wall,
                ) {
                    Ok(p) => Box::new(p),
                    Err(end) => {
                        self.finish(&end);
                        return self.report(end, ExitCounters::default(), start.elapsed(), None);
                    }
                }
            }
        };
        self.run_with(pacer.as_mut(), start)
    }

    /// The run loop proper, paced by `pacer`.
    pub(super) fn run_with(&mut self, pacer: &mut dyn Pacer, start: Instant) -> RunReport {
        let mut stats = ExitCounters::default();
        let mut console = ConsoleWatch::default();
        let n = self.vcpus.len();
        let idle_end = |console: &ConsoleWatch| match console.end_status {
            Some(status) => RunEnd::EndMarker { status },
            None => RunEnd::PowerOff,
        };
        let end = 'run: loop {
            if let Some(end) = self.round_start() {
                break end;
            }
            let active: Vec<usize> = (0..n)
                .filter(|&i| matches!(self.state[i], CpuState::Running | CpuState::Halted))
                .collect();
            if active.is_empty() {
                break idle_end(&console);
            }
            match pacer.start_round(self, &active) {
                Ok(()) => {}
                Err(Stop::Idle) => break idle_end(&console),
                Err(Stop::End(end)) => break end,
            }
            for id in 0..n {
                if matches!(self.state[id], CpuState::WaitForSipi | CpuState::Stopped) {
                    continue;
                }
                if let Err(end) = pacer.before_turn(self) {
                    break 'run end;
                }
                if !pacer.has_turn(self, id) {
                    continue;
                }
                self.platform.current = id;
                pacer.sync(self, id);
                self.platform.advance(id);
                let pending = match self.inject_for(id, &mut stats) {
                    Ok(p) => p,
                    Err(e) => {
                        break 'run RunEnd::BackendError {
                            reason: format!("vCPU {id}: {e}"),
                        }
                    }
                };
                if self.state[id] == CpuState::Halted {
                    if pending == Pending::None {
                        pacer.skip_halted(self, id);
                        continue;
                    }
                    self.state[id] = CpuState::Running;
                }
                // A masked interrupt is taken at the block where the guest
                // enables interrupts (a block boundary, so replay stops
                // there too).
                if let Err(e) = self.vcpus[id].request_interrupt_window(pending == Pending::Masked)
                {
                    break 'run RunEnd::BackendError {
                        reason: format!("vCPU {id}: {e}"),
                    };
                }
                self.platform.irq_raised = false;
                self.platform.irq_pending_at_start = pending == Pending::Masked;
                self.platform.current = id;
                let Some(exit) = pacer.run_turn(self, id, pending, &mut stats) else {
                    continue;
                };
                pacer.sync(self, id);
                // An I/O stop ends a run in the middle of a translated block
                // (replay of the kernel alone cannot stop there); on the
                // software CPU only the run's end (reset, power-off) and
                // recording start/stop requests make one, and no slice is
                // needed after those, nor after the triple fault that ends
                // a run.
                if !matches!(exit, Ok(VmExit::IoStop) | Ok(VmExit::Shutdown)) {
                    if let Err(e) = self.after_run(id) {
                        break 'run RunEnd::BackendError {
                            reason: e.to_string(),
                        };
                    }
                }
                for range in self.platform.take_dma() {
                    if let Err(e) = self.vm.invalidate_code(range.addr, range.len) {
                        break 'run RunEnd::BackendError {
                            reason: e.to_string(),
                        };
                    }
                }
                // INIT and startup IPIs sent during the run.
                for ap in 1..n {
                    match self.platform.apics[ap].take_ap_event() {
                        Some(ApEvent::Init) => self.state[ap] = CpuState::WaitForSipi,
                        Some(ApEvent::Startup { vector })
                            if self.state[ap] == CpuState::WaitForSipi =>
                        {
                            let t = self.now(id);
                            if let Err(e) = self.start_ap(ap, vector, t) {
                                break 'run RunEnd::BackendError {
                                    reason: format!("starting vCPU {ap}: {e}"),
                                };
                            }
                        }
                        // A startup IPI to a running CPU is ignored.
                        Some(ApEvent::Startup { .. }) | None => {}
                    }
                }
                // Console checks: /init start, end marker, panic.
                let instructions = self.total_instructions();
                if let Some(panic) = console.scan(
                    self.platform.serial.output(),
                    instructions,
                    pacer.now_ns(self),
                    start.elapsed(),
                ) {
                    break 'run panic;
                }
                if let Some(end) = self.between_runs(id, &console) {
                    break 'run end;
                }
                match exit {
                    Ok(VmExit::Hlt) => {
                        stats.hlt += 1;
                        self.state[id] = self.state_after_hlt(id);
                    }
                    Ok(VmExit::BudgetExhausted) => stats.budget += 1,
                    // The spinner's turn ends here, its clock where its
                    // instructions put it: the vCPU holding the lock runs
                    // next, and no clock jumps ahead of the instructions
                    // that drive it.
                    Ok(VmExit::Spin) => stats.spins += 1,
                    Ok(VmExit::IoStop) => {
                        stats.io_stops += 1;
                        match self.platform.power.take() {
                            Some(PowerEvent::Reset) => {
                                break 'run match console.end_status {
                                    Some(status) => RunEnd::EndMarker { status },
                                    None => RunEnd::Reset,
                                }
                            }
                            Some(PowerEvent::PowerOff) => break 'run idle_end(&console),
                            None => {}
                        }
                    }
                    Ok(VmExit::Shutdown) => {
                        self.triple_fault_vcpu = Some(id);
                        break 'run match console.end_status {
                            // `reboot=t`: the guest ends its run with a
                            // triple fault after the marker.
                            Some(status) => RunEnd::EndMarker { status },
                            None => RunEnd::TripleFault {
                                reason: format!("vCPU {id} could not deliver a double fault"),
                            },
                        };
                    }
                    Ok(VmExit::InterruptWindow)
                    | Ok(VmExit::Debug { .. })
                    | Ok(VmExit::Watchpoint)
                    | Ok(VmExit::UserMode { .. }) => {}
                    Err(e) => {
                        break 'run RunEnd::BackendError {
                            reason: format!("vCPU {id}: {e}"),
                        }
                    }
                }
            }
            match pacer.end_round(self, start) {
                Ok(()) => {}
                Err(Stop::Idle) => break idle_end(&console),
                Err(Stop::End(end)) => break end,
            }
        };
        self.finish(&end);
        let mut report = self.report(end, stats, start.elapsed(), console.to_init);
        report.wall_seconds_to_first_init_line = console.first_init_line.map(|d| d.as_secs_f64());
        report.virtual_seconds_of_command = console.command_seconds();
        report.wall_seconds_to_end_marker = console.command_ended_wall.map(|d| d.as_secs_f64());
        report.window = console.window();
        pacer.finish_report(&mut report);
        report
    }
}

#[cfg(test)]
mod tests {
    //! The shared loop under KVM's pacing, with fake vCPUs (no KVM needed):
    //! a startup IPI and the slices of a 2-vCPU recorded run are logged as
    //! on the software CPU.

    use super::super::observer::{MachineView, RunObserver};
    use super::super::{platform::Platform, KvmDrive, Machine, MachineConfig, RunEnd};
    use super::CpuState;
    use crate::clock::HostClock;
    use krr_devices::lapic::LAPIC_BASE;
    use krr_hypervisor::kvm::{HostFeatures, VcpuKicker};
    use krr_hypervisor::{
        DebugRegs, FpuState, Injection, Regs, Result, RunContext, Sregs, Vcpu, Vm, VmExit,
    };
    use std::sync::Arc;

    /// vCPU 0 sends INIT and a startup IPI to vCPU 1 in its first run and
    /// powers the machine off in its third; vCPU 1 only runs.
    struct FakeVcpu {
        id: usize,
        runs: usize,
        regs: Regs,
        sregs: Sregs,
    }

    impl Vcpu for FakeVcpu {
        fn run(&mut self, bus: &mut dyn RunContext, _budget: Option<u64>) -> Result<VmExit> {
            self.runs += 1;
            let icr = |bus: &mut dyn RunContext, low: u32| {
                bus.mmio_write(0, LAPIC_BASE + 0x310, &(1u32 << 24).to_le_bytes());
                bus.mmio_write(0, LAPIC_BASE + 0x300, &low.to_le_bytes());
            };
            match (self.id, self.runs) {
                (0, 1) => {
                    icr(bus, 0x4500); // INIT
                    icr(bus, 0x4610); // startup IPI, vector 0x10
                    Ok(VmExit::BudgetExhausted)
                }
                (0, 3) => {
                    bus.pio_write(0, 0x501, &[0]);
                    Ok(VmExit::IoStop)
                }
                _ => Ok(VmExit::BudgetExhausted),
            }
        }
        fn regs(&self) -> Result<Regs> {
            Ok(self.regs)
        }
        fn set_regs(&mut self, regs: &Regs) -> Result<()> {
            self.regs = *regs;
            Ok(())
        }
        fn sregs(&self) -> Result<Sregs> {
            Ok(self.sregs)
        }
        fn set_sregs(&mut self, sregs: &Sregs) -> Result<()> {
            self.sregs = *sregs;
            Ok(())
        }
        fn fpu(&self) -> Result<FpuState> {
            Ok(FpuState {
                xsave: vec![0; 512],
            })
        }
        fn set_fpu(&mut self, _fpu: &FpuState) -> Result<()> {
            Ok(())
        }
        fn msr(&self, _index: u32) -> Result<u64> {
            Ok(0)
        }
        fn set_msr(&mut self, _index: u32, _value: u64) -> Result<()> {
            Ok(())
        }
        fn debug_regs(&self) -> Result<DebugRegs> {
            Ok(DebugRegs::default())
        }
        fn set_debug_regs(&mut self, _regs: &DebugRegs) -> Result<()> {
            Ok(())
        }
        fn inject(&mut self, _event: Injection) -> Result<()> {
            Ok(())
        }
        fn interrupt_window_open(&self) -> Result<bool> {
            Ok(true)
        }
        fn request_interrupt_window(&mut self, _enable: bool) -> Result<()> {
            Ok(())
        }
        fn set_single_step(&mut self, _enable: bool) -> Result<()> {
            Ok(())
        }
        fn set_breakpoints(&mut self, _addrs: &[u64]) -> Result<()> {
            Ok(())
        }
        fn instructions_retired(&self) -> Option<u64> {
            None
        }
    }

    struct FakeVm;

    impl Vm for FakeVm {
        fn backend_name(&self) -> &'static str {
            "kvm"
        }
        fn create_vcpu(&mut self, id: usize) -> Result<Box<dyn Vcpu>> {
            Ok(Box::new(FakeVcpu {
                id,
                runs: 0,
                regs: Regs::default(),
                sregs: Sregs::default(),
            }))
        }
    }

    /// Notes what the loop reports, as the recorder would log it.
    #[derive(Default)]
    struct Notes(std::rc::Rc<std::cell::RefCell<Vec<String>>>);

    impl RunObserver for Notes {
        fn startup(&mut self, cpu: usize, vector: u8) {
            self.0
                .borrow_mut()
                .push(format!("startup {cpu} {vector:#x}"));
        }
        fn after_run(&mut self, _m: &MachineView<'_>, cpu: usize) -> Result<()> {
            // Where the recorder logs the end of the vCPU's slice.
            self.0.borrow_mut().push(format!("slice {cpu}"));
            Ok(())
        }
        fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
            self
        }
    }

    #[test]
    fn kvm_pacing_reports_startup_and_slices_in_the_shared_loop() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, b"not a kernel: the fake vCPUs run nothing").unwrap();
        let mut cfg = MachineConfig::new(kernel, None, String::new());
        cfg.vcpus = 2;
        cfg.mem_bytes = 64 << 20;
        let mem = super::super::create_memory(cfg.mem_bytes).unwrap();
        let mut vm = FakeVm;
        let vcpus: Vec<Box<dyn Vcpu>> = (0..2).map(|id| vm.create_vcpu(id).unwrap()).collect();
        let mut platform = Platform::new(&cfg, mem.clone(), 2, None);
        platform.stop_on_irq = true;
        let mut m = Machine {
            cfg,
            vcpus,
            vm: Box::new(vm),
            kvm: Some(KvmDrive {
                kickers: vec![VcpuKicker::default(), VcpuKicker::default()],
                features: HostFeatures::new(Arc::new(Vec::new())),
                clock: HostClock::start(),
            }),
            platform,
            state: vec![CpuState::Running, CpuState::WaitForSipi],
            triple_fault_vcpu: None,
            init_started: false,
            mem,
        };
        let notes = Notes::default();
        let seen = notes.0.clone();
        m.set_observer(Box::new(notes));
        let report = m.run();
        assert_eq!(report.end, RunEnd::PowerOff, "{report:?}");
        // vCPU 0's first run sends INIT, its second the startup IPI is
        // taken (one AP event per turn); vCPU 1 then runs in the same
        // round; the power-off run ends mid-instruction, with no slice.
        assert_eq!(
            *seen.borrow(),
            ["slice 0", "slice 0", "startup 1 0x10", "slice 1"]
        );
    }
}
