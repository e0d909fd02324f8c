// SPDX-License-Identifier: GPL-2.0-or-later
//! The machine model: guest memory, boot, device wiring and the run loop.
//!
//! Virtual time: each vCPU's clock is the number of instructions it retired
//! plus the time it spent halted, at 1 ns per instruction (the guest is told
//! its TSC runs at 1 GHz). RDTSC, the PIT and the RTC all read it, and HLT
//! skips ahead to the next timer deadline, so the same run is identical every
//! time, whatever the host's speed.
//!
//! KVM runs cannot count instructions: their clock is host monotonic time
//! (see [`clock`]), so they are not instruction-deterministic.

pub mod boot;
pub mod clock;
pub mod cpuid;
pub mod device_state;
pub mod mptable;
pub mod observer;
pub mod platform;
mod run_loop;

use clock::HostClock;
use krr_devices::console::ConsoleBuffer;
use krr_devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE};
use krr_devices::lapic::{LAPIC_BASE, LAPIC_SIZE};
use krr_devices::serial::ConsoleSink;
use krr_devices::virtio_blk::VirtioBlk;
use krr_devices::virtio_mmio::{VirtioMmio, VIRTIO_MMIO_WINDOW_SIZE};
use krr_hypervisor::kvm::{HostFeatures, KvmVm, VcpuKicker};
use krr_hypervisor::{HypervisorError, Injection, Vcpu, Vm};
use observer::{MachineView, RunObserver};
use platform::Platform;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use krr_hypervisor::Backend;

#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_bytes: u64,
    pub vcpus: usize,
    pub disk: Option<PathBuf>,
    pub console: ConsoleSink,
    /// Stop the run after this many instructions (all vCPUs together): the
    /// no-progress budget.
    pub max_instructions: u64,
    /// Instructions a vCPU runs before the next one gets its turn (SMP).
    pub quantum: u64,
    /// Chaos mode (software CPU): each round's quantum drawn from a PCG
    /// seeded with this, between 50% and 150% of `quantum`, so that the
    /// vCPUs' turns end at other points and races find other
    /// interleavings. One seed always gives the same run; replay needs no
    /// seed (the recording holds the slices).
    pub chaos_seed: Option<u64>,
    /// KVM runs: host time a vCPU runs before the next one gets its turn
    /// (and timers are looked at), at most.
    pub kvm_slice: Duration,
    /// Stop the run after this much host time (KVM runs have no
    /// instruction counts for `max_instructions`); `None`: no limit.
    pub max_wall: Option<Duration>,
    /// Bytes at the top of RAM kept from the kernel (a recorded run's
    /// agent ring; see `record::session`).
    pub reserved_top: u64,
    /// Set asynchronously (SIGINT) to end the run cleanly at the next
    /// point where every vCPU is stopped; a recording is finished first.
    pub interrupt: Option<Arc<AtomicBool>>,
}

impl MachineConfig {
    pub fn new(kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String) -> MachineConfig {
        MachineConfig {
            kernel,
            initrd,
            cmdline,
            mem_bytes: 512 << 20,
            vcpus: 1,
            disk: None,
            console: ConsoleSink::None,
            max_instructions: 50_000_000_000,
            quantum: 200_000,
            chaos_seed: None,
            kvm_slice: Duration::from_millis(2),
            max_wall: None,
            reserved_top: 0,
            interrupt: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("invalid machine configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("guest memory of {bytes} bytes could not be created: {reason}")]
    Memory { bytes: u64, reason: String },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunEnd {
    /// The guest printed `KRR-END status=N` and then stopped.
    EndMarker { status: i32 },
    /// The guest powered off or halted for good without an end marker.
    PowerOff,
    /// The guest asked for a reset (keyboard controller, port 0xcf9).
    Reset,
    /// The kernel panicked; the panic line.
    Panic { line: String },
    /// Triple fault.
    TripleFault { reason: String },
    /// The instruction budget ran out first.
    BudgetExhausted { instructions: u64 },
    /// The wall-time limit ([`MachineConfig::max_wall`]) ran out first.
    WallTimeExhausted { millis: u64 },
    /// The backend failed.
    BackendError { reason: String },
    /// The recorder failed (log I/O, no guest agent, a malformed ring).
    RecordingFailed { reason: String },
    /// SIGINT: the run was ended on request.
    Interrupted,
    /// A recording stopped at a kernel report that did not panic
    /// (`krr record --stop=report`); its title.
    Report { title: String },
}

/// `krr run`/`krr record` exit status when the guest's command exited
/// non-zero (its own status is in the report, apart from the engine's
/// codes, which it could otherwise be taken for).
pub const EXIT_GUEST_FAILED: i32 = 10;
/// `krr record` exit status when a recording is not replayable.
pub const EXIT_NOT_REPLAYABLE: i32 = 11;
/// `krr record --stop=report` exit status when a kernel report ended the run.
pub const EXIT_KERNEL_REPORT: i32 = 12;

impl RunEnd {
    /// Process exit status for `krr run`: 0 when the guest's command
    /// exited 0 (or the guest powered off), [`EXIT_GUEST_FAILED`] when it
    /// exited non-zero, otherwise a distinct value per kind of end.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunEnd::EndMarker { status: 0 } => 0,
            RunEnd::EndMarker { .. } => EXIT_GUEST_FAILED,
            RunEnd::PowerOff => 0,
            RunEnd::Reset => 3,
            RunEnd::Panic { .. } => 4,
            RunEnd::TripleFault { .. } => 5,
            RunEnd::BudgetExhausted { .. } => 6,
            RunEnd::BackendError { .. } => 7,
            RunEnd::WallTimeExhausted { .. } => 8,
            RunEnd::RecordingFailed { .. } => 9,
            RunEnd::Interrupted => 130,
            RunEnd::Report { .. } => EXIT_KERNEL_REPORT,
        }
    }
}

pub use krr_hypervisor::ExitCounters;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub end: RunEnd,
    pub exit_status: i32,
    /// The exit status of the guest's `krr.run` command (`KRR-END
    /// status=N`), when it printed one.
    pub guest_status: Option<i32>,
    pub instructions: u64,
    pub instructions_per_vcpu: Vec<u64>,
    /// The chaos-mode seed the run was scheduled with, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos_seed: Option<u64>,
    pub virtual_ns: u64,
    /// Virtual seconds from `/init`'s `KRR-START` line to its `KRR-END`
    /// line (the `krr.run` command), when both were printed.
    pub virtual_seconds_of_command: Option<f64>,
    /// The measured window between the `KRR-WINDOW-BEGIN` and
    /// `KRR-WINDOW-END` console lines, when the guest printed both.
    pub window: Option<MeasuredWindow>,
    pub wall_seconds: f64,
    pub mips: f64,
    pub exits: ExitCounters,
    /// Instructions retired when `/init` was started (the kernel's
    /// "Run /init as init process" line), if seen.
    pub instructions_to_init: Option<u64>,
    pub wall_seconds_to_init: Option<f64>,
    /// Wall time until the first complete console line after that one
    /// (the first line `/init` prints): the boot benchmark's end point.
    pub wall_seconds_to_first_init_line: Option<f64>,
    /// Wall time until the console scan found the `KRR-END` line (the
    /// guest's shutdown after it is not counted).
    pub wall_seconds_to_end_marker: Option<f64>,
    /// Bytes of console output, all of it.
    pub console_bytes: u64,
    /// SHA-256 of the whole console output (determinism checks).
    pub console_sha256: String,
    /// The first bytes of the console output that [`Self::console`] does
    /// not hold (0 unless the guest printed more than its window).
    pub console_dropped_bytes: u64,
    /// The console output, or its last
    /// [`CONSOLE_WINDOW_BYTES`](krr_devices::console::CONSOLE_WINDOW_BYTES)
    /// bytes at most (see [`Self::console_dropped_bytes`]).
    #[serde(skip)]
    pub console: Vec<u8>,
    pub last_console_lines: Vec<String>,
    /// Device model errors (bad register accesses and the like).
    pub device_errors: Vec<String>,
}

/// What a run spent between the guest's `KRR-WINDOW-BEGIN` and
/// `KRR-WINDOW-END` lines (the harness prints them around the command it
/// measures). Taken where the run loop scans the console, so at the end of
/// the vCPU run that printed the line.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MeasuredWindow {
    /// Guest instructions of every vCPU (0 where the backend does not
    /// count them).
    pub instructions: u64,
    pub virtual_seconds: f64,
    pub wall_seconds: f64,
}

/// The most vCPUs a machine has (the MP table's and the APICs' layout).
pub const MAX_VCPUS: usize = 8;
/// Guest RAM sizes a machine takes: one region below the 32-bit MMIO hole.
pub const MEMORY_BYTES: std::ops::RangeInclusive<u64> = 64 << 20..=3 << 30;

/// Creates guest RAM: one region from 0 (at most 3 GiB, below the 32-bit
/// MMIO hole).
pub fn create_memory(bytes: u64) -> Result<GuestMemoryMmap, MachineError> {
    if !MEMORY_BYTES.contains(&bytes) {
        return Err(MachineError::Config(format!(
            "memory size {bytes} bytes: expected 64 MiB to 3 GiB"
        )));
    }
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)]).map_err(|e| {
        MachineError::Memory {
            bytes,
            reason: e.to_string(),
        }
    })
}

const PANIC_MARKER: &str = "Kernel panic - not syncing";
pub const END_MARKER: &str = "KRR-END status=";
/// What `/init` prints right before it runs `krr.run`.
const START_MARKER: &str = "KRR-START";
/// The lines a harness prints around the command it measures (a guest
/// writes them so that the kernel's echo of its command line does not
/// contain them, e.g. `echo KRR-WINDOW''-BEGIN`).
pub const WINDOW_BEGIN_MARKER: &str = "KRR-WINDOW-BEGIN";
pub const WINDOW_END_MARKER: &str = "KRR-WINDOW-END";
/// The kernel's last line before it starts `/init`.
pub const INIT_MARKER: &str = "Run /init as init process";

/// What [`Machine::inject_for`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    Injected,
    /// An interrupt waits for the guest to enable interrupts.
    Masked,
}

/// Scheduling state of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuState {
    /// An application processor before its startup IPI.
    WaitForSipi,
    Running,
    /// Executed HLT with interrupts enabled: sleeps until an interrupt.
    Halted,
    /// Executed HLT with interrupts disabled: stopped for good.
    Stopped,
}

/// A machine ready to run: memory loaded, vCPUs created.
pub struct Machine {
    cfg: MachineConfig,
    // Field order matters for drop: vCPUs and VM before the memory they map.
    vcpus: Vec<Box<dyn Vcpu>>,
    vm: Box<dyn Vm>,
    /// Set for KVM runs: what drives them (see [`run_loop::HostTimePacer`]).
    kvm: Option<KvmDrive>,
    platform: Platform,
    state: Vec<CpuState>,
    /// The vCPU whose triple fault ended the run, if one did.
    triple_fault_vcpu: Option<usize>,
    /// The kernel has started `/init` (the console watch saw its line).
    init_started: bool,
    mem: GuestMemoryMmap,
}

/// What a KVM run needs beside the vCPUs.
struct KvmDrive {
    kickers: Vec<VcpuKicker>,
    features: HostFeatures,
    clock: HostClock,
}

/// Guest-physical address of the local APICs and the IA32_APIC_BASE value
/// of the bootstrap processor (enabled, BSP).
const APIC_BASE_BSP: u64 = LAPIC_BASE | (1 << 11) | (1 << 8);

impl Machine {
    pub fn new(cfg: MachineConfig, backend: Backend) -> Result<Machine, MachineError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(MachineError::Config(format!(
                "--vcpus {}: expected 1 to {MAX_VCPUS}",
                cfg.vcpus
            )));
        }
        let mut cfg = cfg;
        let disk = match &cfg.disk {
            Some(path) => {
                let blk = VirtioBlk::open(path, false, "krr-disk")
                    .map_err(|e| MachineError::Config(format!("--disk {}: {e}", path.display())))?;
                // Linux finds virtio-mmio devices on the command line.
                cfg.cmdline.push_str(&format!(
                    " virtio_mmio.device=4K@{:#x}:{}",
                    platform::VIRTIO_BASE,
                    platform::VIRTIO_IRQ
                ));
                Some(VirtioMmio::new(blk))
            }
            None => None,
        };
        let mem = create_memory(cfg.mem_bytes)?;
        // RAM kept from the kernel at the top (a recorded run's agent ring).
        if !cfg.reserved_top.is_multiple_of(4096) || cfg.reserved_top > cfg.mem_bytes / 4 {
            return Err(MachineError::Config(format!(
                "{} bytes reserved at the top of RAM: expected a multiple of 4096, at most a quarter of guest memory",
                cfg.reserved_top
            )));
        }
        let reserved =
            (cfg.reserved_top > 0).then(|| (cfg.mem_bytes - cfg.reserved_top, cfg.reserved_top));
        let info = boot::load_linux(
            &mem,
            reserved.map_or(cfg.mem_bytes, |(phys, _)| phys),
            &reserved.into_iter().collect::<Vec<_>>(),
            &cfg.kernel,
            cfg.initrd.as_deref(),
            &cfg.cmdline,
        )?;
        let mp = mptable::write_mptable(&mem, cfg.vcpus as u8)
            .map_err(|e| MachineError::Config(format!("MP table: {e}")))?;
        let mut vcpus: Vec<Box<dyn Vcpu>> = Vec::new();
        let mut kickers = Vec::new();
        let mut host_features = None;
        let mut vm: Box<dyn Vm> = match backend {
            Backend::Tcg => Box::new(krr_hypervisor::unicorn::UnicornVm::new(&mem)?),
            Backend::Kvm => {
                // KVM vCPUs are created here, where the VM's type is
                // known: the run loop needs their kickers.
                let vm = KvmVm::new(&mem)?;
                host_features = Some(vm.host_features());
                for id in 0..cfg.vcpus {
                    let vcpu = vm.create_kvm_vcpu(id)?;
                    if let Err(e) = vcpu.set_tsc_khz(cpuid::TSC_HZ / 1000) {
                        if id == 0 {
                            tracing::warn!(
                                    "kvm: the guest's TSC runs at the host's rate, not the {} MHz the engine's CPUID announces: {e}",
                                    cpuid::TSC_HZ / 1_000_000
                                );
                        }
                    }
                    kickers.push(vcpu.kicker());
                    vcpus.push(Box::new(vcpu));
                }
                Box::new(vm)
            }
        };
        vm.add_mmio_region(LAPIC_BASE, LAPIC_SIZE)?;
        vm.add_mmio_region(IOAPIC_BASE, IOAPIC_SIZE)?;
        if disk.is_some() {
            vm.add_mmio_region(platform::VIRTIO_BASE, VIRTIO_MMIO_WINDOW_SIZE)?;
        }
        if backend == Backend::Tcg {
            for id in 0..cfg.vcpus {
                vcpus.push(vm.create_vcpu(id)?);
            }
            // vCPUs take turns on one thread: one that spins on a lock held
            // by another would spin through its whole quantum.
            if cfg.vcpus > 1 {
                vcpus[0].set_yield_on_spin(true)?;
            }
        }
        let mut sregs = info.sregs;
        sregs.apic_base = APIC_BASE_BSP;
        vcpus[0].set_sregs(&sregs)?;
        vcpus[0].set_regs(&info.regs)?;
        let mut state = vec![CpuState::WaitForSipi; cfg.vcpus];
        state[0] = CpuState::Running;
        let mut platform = Platform::new(&cfg, mem.clone(), mp.ioapic_id, disk);
        platform.stop_on_irq = backend == Backend::Kvm;
        let kvm = host_features.map(|features| {
            let removed = features.removed(|l, s| cpuid::cpuid(&platform.cpuid, 0, l, s));
            if !removed.is_empty() {
                tracing::warn!(
                    "kvm: this host's KVM cannot give the guest every feature of the engine's CPU; the guest sees it without: {}",
                    removed.join(", ")
                );
            }
            KvmDrive {
                kickers,
                features,
                clock: HostClock::start(),
            }
        });
        Ok(Machine {
            cfg,
            vcpus,
            vm,
            kvm,
            platform,
            state,
            triple_fault_vcpu: None,
            init_started: false,
            mem,
        })
    }

    fn now(&self, vcpu: usize) -> u64 {
        observer::vcpu_clock(&self.vcpus, &self.platform, vcpu)
    }

    /// The machine's virtual time: its most advanced vCPU's clock.
    fn virtual_now(&self) -> u64 {
        observer::machine_clock(&self.vcpus, &self.platform)
    }

    /// Starts application processor `id` in real mode at the SIPI vector's
    /// page, with its clock set to the sender's.
    fn start_ap(&mut self, id: usize, vector: u8, now: u64) -> Result<(), HypervisorError> {
        let (regs, sregs) = boot::real_mode_state(vector, LAPIC_BASE | (1 << 11));
        self.vcpus[id].set_sregs(&sregs)?;
        self.vcpus[id].set_regs(&regs)?;
        let own = self.now(id);
        if now > own {
            self.platform.idle_ns[id] += now - own;
        }
        self.state[id] = CpuState::Running;
        if let Some(o) = &mut self.platform.observer {
            o.startup(id, vector);
        }
        Ok(())
    }

    /// Delivers what vCPU `id` can take now.
    fn inject_for(
        &mut self,
        id: usize,
        stats: &mut ExitCounters,
    ) -> Result<Pending, HypervisorError> {
        if self.platform.apics[id].take_nmi() {
            self.observe_injection(id, Injection::Nmi)?;
            self.vcpus[id].inject(Injection::Nmi)?;
            stats.interrupts_injected += 1;
            return Ok(Pending::Injected);
        }
        let window = self.vcpus[id].interrupt_window_open()?;
        if self.platform.apics[id].pending_vector().is_some() {
            if !window {
                return Ok(Pending::Masked);
            }
            let vector = self.platform.apics[id].acknowledge();
            self.observe_injection(id, Injection::Interrupt(vector))?;
            self.vcpus[id].inject(Injection::Interrupt(vector))?;
            stats.interrupts_injected += 1;
            return Ok(Pending::Injected);
        }
        if id == 0 && self.platform.pic.has_interrupt() && self.platform.pic_routed_to_cpu() {
            if !window {
                return Ok(Pending::Masked);
            }
            if let Some(vector) = self.platform.pic.acknowledge() {
                self.observe_injection(id, Injection::Interrupt(vector))?;
                self.vcpus[id].inject(Injection::Interrupt(vector))?;
                stats.interrupts_injected += 1;
                return Ok(Pending::Injected);
            }
        }
        Ok(Pending::None)
    }

    /// Runs `f` with the observer, if there is one, and a view of the
    /// machine (every vCPU stopped).
    fn observe<R>(
        &mut self,
        f: impl FnOnce(&mut dyn RunObserver, &mut MachineView<'_>) -> R,
    ) -> Option<R> {
        let mut observer = self.platform.observer.take()?;
        let mut view = MachineView {
            cfg: &self.cfg,
            vcpus: &self.vcpus,
            vm: self.vm.as_mut(),
            platform: &self.platform,
            mem: &self.mem,
            states: &self.state,
            init_started: self.init_started,
            triple_fault_vcpu: self.triple_fault_vcpu,
        };
        let r = f(observer.as_mut(), &mut view);
        self.platform.observer = Some(observer);
        Some(r)
    }

    /// Tells the observer that `injection` is about to be made into vCPU
    /// `id`.
    fn observe_injection(
        &mut self,
        id: usize,
        injection: Injection,
    ) -> Result<(), HypervisorError> {
        self.observe(|o, m| o.interrupt(m, id, injection))
            .unwrap_or(Ok(()))
    }

    /// After a run of vCPU `id` that ended at a block boundary.
    fn after_run(&mut self, id: usize) -> Result<(), HypervisorError> {
        self.observe(|o, m| o.after_run(m, id)).unwrap_or(Ok(()))
    }

    /// Between two vCPU runs (every vCPU stopped at an instruction
    /// boundary): SIGINT, then the observer. Returns the run's end when the
    /// run must stop.
    fn between_runs(&mut self, id: usize, console: &ConsoleWatch) -> Option<RunEnd> {
        if self
            .cfg
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
        {
            return Some(RunEnd::Interrupted);
        }
        self.init_started = console.to_init.is_some();
        self.observe(|o, m| o.between_runs(m, id)).flatten()
    }

    /// At the top of every round of turns.
    fn round_start(&mut self) -> Option<RunEnd> {
        self.observe(|o, m| o.round_start(m))?
            .err()
            .map(|reason| RunEnd::RecordingFailed { reason })
    }

    /// The run ended: the observer finishes its work.
    fn finish(&mut self, end: &RunEnd) {
        self.observe(|o, m| o.finished(m, end));
    }

    /// Installs the run's observer (before [`Machine::run`]).
    pub fn set_observer(&mut self, observer: Box<dyn RunObserver>) {
        self.platform.observer = Some(observer);
    }

    /// Takes the observer back (after the run), to read what it gathered.
    pub fn take_observer(&mut self) -> Option<Box<dyn RunObserver>> {
        self.platform.observer.take()
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The configuration the machine was built from (its command line
    /// completed with what the machine added).
    pub fn config(&self) -> &MachineConfig {
        &self.cfg
    }

    fn deliverable(&self, id: usize) -> bool {
        self.platform.apics[id].pending_vector().is_some()
            || (id == 0 && self.platform.pic.has_interrupt() && self.platform.pic_routed_to_cpu())
    }

    fn report(
        &mut self,
        end: RunEnd,
        mut stats: ExitCounters,
        wall: Duration,
        to_init: Option<(u64, Duration)>,
    ) -> RunReport {
        // KVM counts nothing itself: its pacer counted at the bus.
        if let Some(c) = self.vm.exit_counters() {
            stats.pio = c.pio;
            stats.mmio = c.mmio;
            stats.exceptions = c.exceptions;
            stats.syscalls = c.syscalls;
            stats.cpuid = c.cpuid;
            stats.rdtsc = c.rdtsc;
            stats.hooked_blocks = c.hooked_blocks;
        }
        let per_vcpu: Vec<u64> = self
            .vcpus
            .iter()
            .map(|v| v.instructions_retired().unwrap_or(0))
            .collect();
        let instructions: u64 = per_vcpu.iter().sum();
        let output = self.platform.serial.output();
        let console = output.held().to_vec();
        let text = String::from_utf8_lossy(&console);
        let lines: Vec<&str> = text.lines().collect();
        let last = lines[lines.len().saturating_sub(10)..]
            .iter()
            .map(|s| s.to_string())
            .collect();
        RunReport {
            exit_status: end.exit_code(),
            guest_status: match end {
                RunEnd::EndMarker { status } => Some(status),
                _ => None,
            },
            end,
            instructions,
            instructions_per_vcpu: per_vcpu,
            chaos_seed: self.cfg.chaos_seed,
            virtual_ns: self.virtual_now(),
            virtual_seconds_of_command: None,
            window: None,
            wall_seconds: wall.as_secs_f64(),
            mips: instructions as f64 / wall.as_secs_f64().max(1e-9) / 1e6,
            exits: stats,
            instructions_to_init: to_init.map(|t| t.0),
            wall_seconds_to_init: to_init.map(|t| t.1.as_secs_f64()),
            wall_seconds_to_first_init_line: None,
            wall_seconds_to_end_marker: None,
            console_bytes: output.end(),
            console_sha256: output.sha256_hex(),
            console_dropped_bytes: output.start(),
            console,
            last_console_lines: last,
            device_errors: self.platform.device_errors.clone(),
        }
    }

    /// Where vCPU `id` stands after HLT: waiting for an interrupt (IF=1),
    /// woken by a pending NMI (which wakes even a CPU halted with IF=0), or
    /// stopped for good.
    fn state_after_hlt(&mut self, id: usize) -> CpuState {
        if self.vcpus[id].interrupt_window_open().unwrap_or(false) {
            CpuState::Halted
        } else if self.platform.apics[id].take_nmi() {
            let _ = self.vcpus[id].inject(Injection::Nmi);
            CpuState::Running
        } else {
            CpuState::Stopped
        }
    }

    fn total_instructions(&self) -> u64 {
        self.vcpus
            .iter()
            .map(|v| v.instructions_retired().unwrap_or(0))
            .sum()
    }
}

/// What the run loops watch for on the console: /init starting, its first
/// line, the end marker and a panic. One scanner for every backend, so a run
/// ends the same way whichever CPU executes it.
#[derive(Default)]
struct ConsoleWatch {
    /// Console position up to which the output was scanned.
    scanned: u64,
    /// Instructions (0 where the backend does not count) and wall time when
    /// the kernel started /init.
    to_init: Option<(u64, Duration)>,
    first_init_line: Option<Duration>,
    /// After /init's start: the console position where the search for the
    /// end of its first line goes on (output before it was searched), and
    /// the newlines seen since the marker (its own line's, then the first
    /// line's).
    init_search: u64,
    init_newlines: u8,
    end_status: Option<i32>,
    /// Virtual time (ns) when `/init` printed its start and end markers.
    command_started_ns: Option<u64>,
    command_ended_ns: Option<u64>,
    command_ended_wall: Option<Duration>,
    /// Instructions, virtual time (ns) and wall time at the window's
    /// begin and end lines.
    window_begin: Option<(u64, u64, Duration)>,
    window_end: Option<(u64, u64, Duration)>,
}

impl ConsoleWatch {
    fn command_seconds(&self) -> Option<f64> {
        let (from, to) = (self.command_started_ns?, self.command_ended_ns?);
        Some(to.saturating_sub(from) as f64 / 1e9)
    }

    fn window(&self) -> Option<MeasuredWindow> {
        let (i0, v0, w0) = self.window_begin?;
        let (i1, v1, w1) = self.window_end?;
        Some(MeasuredWindow {
            instructions: i1.saturating_sub(i0),
            virtual_seconds: v1.saturating_sub(v0) as f64 / 1e9,
            wall_seconds: w1.saturating_sub(w0).as_secs_f64(),
        })
    }

    /// Scans the output added since the last call (with some overlap, so a
    /// marker split across two calls is found); returns the run's end when
    /// the kernel panicked. Positions are absolute: output the buffer has
    /// dropped since was never scanned only if more than half its window
    /// was printed since the last call (a vCPU's run prints far less).
    fn scan(
        &mut self,
        out: &ConsoleBuffer,
        instructions: u64,
        virtual_ns: u64,
        elapsed: Duration,
    ) -> Option<RunEnd> {
        if out.end() <= self.scanned {
            return None;
        }
        let (from, new) = out.held_since(self.scanned.saturating_sub(200));
        let text = String::from_utf8_lossy(new);
        self.scanned = out.end();
        if self.to_init.is_none() {
            if let Some(at) = find(new, INIT_MARKER.as_bytes()) {
                self.to_init = Some((instructions, elapsed));
                self.init_search = from + at as u64;
            }
        }
        // Only the new output is searched: a chatty guest that prints no
        // line after the marker must not make every scan read it all.
        if self.to_init.is_some() && self.first_init_line.is_none() {
            for &b in out.held_since(self.init_search).1 {
                self.init_newlines += u8::from(b == b'\n');
                if self.init_newlines == 2 {
                    self.first_init_line = Some(elapsed);
                    break;
                }
            }
            self.init_search = out.end();
        }
        if self.command_started_ns.is_none() && parse_marker(&text, START_MARKER).is_some() {
            self.command_started_ns = Some(virtual_ns);
        }
        let at = Some((instructions, virtual_ns, elapsed));
        if self.window_begin.is_none() && parse_marker(&text, WINDOW_BEGIN_MARKER).is_some() {
            self.window_begin = at;
        }
        if self.window_begin.is_some()
            && self.window_end.is_none()
            && parse_marker(&text, WINDOW_END_MARKER).is_some()
        {
            self.window_end = at;
        }
        if self.end_status.is_none() {
            if let Some(s) = parse_marker(&text, END_MARKER) {
                self.end_status = s.trim().parse().ok();
                self.command_ended_ns = Some(virtual_ns);
                self.command_ended_wall = Some(elapsed);
            }
        }
        parse_marker(&text, PANIC_MARKER).map(|line| RunEnd::Panic {
            line: format!("{PANIC_MARKER}{line}"),
        })
    }
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether `out` holds a complete line after the line containing `marker`.
pub fn first_line_after(out: &[u8], marker: &str) -> bool {
    let Some(i) = find(out, marker.as_bytes()) else {
        return false;
    };
    let rest = &out[i..];
    match rest.iter().position(|&b| b == b'\n') {
        Some(nl) => rest[nl + 1..].contains(&b'\n'),
        None => false,
    }
}

/// The rest of the first complete line containing `marker`, after it.
pub fn parse_marker(text: &str, marker: &str) -> Option<String> {
    let i = text.find(marker)?;
    let rest = &text[i + marker.len()..];
    let end = rest.find('\n')?;
    Some(rest[..end].trim_end_matches('\r').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_need_a_complete_line() {
        assert_eq!(
            parse_marker("x KRR-END status=3\r\n", END_MARKER),
            Some("3".into())
        );
        assert_eq!(parse_marker("x KRR-END status=3", END_MARKER), None);
        assert_eq!(
            parse_marker("[ 1.0] Kernel panic - not syncing: VFS\n", PANIC_MARKER),
            Some(": VFS".into())
        );
    }

    #[test]
    fn the_window_is_taken_between_its_two_lines() {
        let mut watch = ConsoleWatch::default();
        let mut out = ConsoleBuffer::new();
        out.push(b"Command line: krr.run=\"echo KRR-WINDOW''-BEGIN; w\"\n");
        watch.scan(&out, 10, 1_000, Duration::from_secs(1));
        assert_eq!(
            watch.window_begin, None,
            "the command line's echo is not the line"
        );
        out.push(b"KRR-WINDOW-BEGIN\n");
        watch.scan(&out, 100, 2_000_000_000, Duration::from_secs(2));
        out.push(b"work\nKRR-WINDOW-");
        watch.scan(&out, 500, 2_500_000_000, Duration::from_secs(3));
        assert_eq!(watch.window(), None, "no end before its line is complete");
        out.push(b"END\n");
        watch.scan(&out, 1_100, 3_500_000_000, Duration::from_secs(7));
        assert_eq!(
            watch.window(),
            Some(MeasuredWindow {
                instructions: 1_000,
                virtual_seconds: 1.5,
                wall_seconds: 5.0
            })
        );
    }

    /// /init's first line is found whichever scans its bytes arrive in,
    /// and a chatty guest's output is searched once, not again at every
    /// scan (that was quadratic in the output), while the buffer drops
    /// what it no longer holds.
    #[test]
    fn the_first_init_line_is_searched_in_new_output_only() {
        let t = |s| Duration::from_secs(s);
        let mut watch = ConsoleWatch::default();
        let mut out = ConsoleBuffer::with_window(64 << 10);
        out.push(b"boot\n[ 0.13] Run /init as");
        watch.scan(&out, 1, 0, t(1));
        out.push(b" init process\nKRR-START");
        watch.scan(&out, 2, 0, t(2));
        assert_eq!(watch.to_init, Some((2, t(2))));
        assert_eq!(watch.first_init_line, None, "its line is not complete");
        // Megabytes without a newline, a scan after every kilobyte.
        let start = std::time::Instant::now();
        for _ in 0..5_000 {
            out.push(&[b'x'; 1024]);
            watch.scan(&out, 3, 0, t(3));
        }
        assert!(
            start.elapsed() < t(2),
            "5,000 scans of 1 KiB each took {:?}",
            start.elapsed()
        );
        assert!(out.start() > 0, "the marker's line was dropped");
        assert_eq!(watch.first_init_line, None);
        out.push(b"\n");
        watch.scan(&out, 4, 0, t(4));
        assert_eq!(watch.first_init_line, Some(t(4)));
    }

    /// Markers printed after the buffer dropped output are found, once,
    /// and the report counts and hashes everything while holding the
    /// window.
    #[test]
    fn markers_are_found_after_output_was_dropped() {
        let mut watch = ConsoleWatch::default();
        let mut out = ConsoleBuffer::with_window(4096);
        let mut whole = Vec::new();
        fn print(out: &mut ConsoleBuffer, whole: &mut Vec<u8>, bytes: &[u8]) {
            out.push(bytes);
            whole.extend_from_slice(bytes);
        }
        for i in 0..1_000 {
            print(
                &mut out,
                &mut whole,
                format!("line {i} of a chatty guest\n").as_bytes(),
            );
            watch.scan(&out, i, 0, Duration::ZERO);
        }
        print(&mut out, &mut whole, b"KRR-START\nKRR-END stat");
        watch.scan(&out, 1_000, 5, Duration::ZERO);
        assert_eq!(watch.end_status, None);
        print(&mut out, &mut whole, b"us=7\n");
        watch.scan(&out, 1_001, 9, Duration::ZERO);
        assert_eq!(watch.end_status, Some(7));
        assert_eq!(watch.command_seconds(), Some(4e-9));
        assert!(out.start() > 0);
        assert_eq!(out.end(), whole.len() as u64);
        let mut unbounded = ConsoleBuffer::new();
        unbounded.push(&whole);
        assert_eq!(unbounded.start(), 0);
        assert_eq!(out.sha256_hex(), unbounded.sha256_hex());
        let panic = b"[ 9.9] Kernel panic - not syncing: Attempted to kill init!\n";
        print(&mut out, &mut whole, panic);
        let end = watch.scan(&out, 1_002, 10, Duration::ZERO);
        assert!(
            matches!(&end, Some(RunEnd::Panic { line }) if line.contains("kill init")),
            "{end:?}"
        );
    }

    #[test]
    fn memory_size_is_checked() {
        assert!(create_memory(1 << 20).is_err());
        assert!(create_memory(64 << 20).is_ok());
    }
}
