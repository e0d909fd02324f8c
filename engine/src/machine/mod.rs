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
pub mod platform;
mod run_loop;

use crate::devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE};
use crate::devices::lapic::{LAPIC_BASE, LAPIC_SIZE};
use crate::devices::serial::ConsoleSink;
use crate::devices::virtio_blk::VirtioBlk;
use crate::devices::virtio_mmio::{VirtioMmio, VIRTIO_MMIO_WINDOW_SIZE};
use crate::hypervisor::kvm::{HostFeatures, KvmVm, VcpuKicker};
use crate::hypervisor::{self, HypervisorError, Injection, Position, Vcpu, Vm};
use crate::record::checkpoint::KernelImage;
use crate::record::event::InterruptKind;
use crate::record::recorder::{GuestRequest, RecordConfig, Recorder, StartTrigger, StopTrigger};
use crate::record::recording::CpuSnapshot;
use clock::HostClock;
use platform::Platform;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Which CPU backend runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The software CPU (unicorn/TCG): deterministic, exact counts.
    Tcg,
    /// Hardware virtualization.
    Kvm,
}

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
    /// KVM runs: host time a vCPU runs before the next one gets its turn
    /// (and timers are looked at), at most.
    pub kvm_slice: Duration,
    /// Stop the run after this much host time (KVM runs have no
    /// instruction counts for `max_instructions`); `None`: no limit.
    pub max_wall: Option<Duration>,
    /// Record the run (`krr record`): reserves the agent's ring and logs.
    pub record: Option<RecordConfig>,
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
            kvm_slice: Duration::from_millis(2),
            max_wall: None,
            record: None,
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
}

/// `krr run`/`krr record` exit status when the guest's command exited
/// non-zero (its own status is in the report, apart from the engine's
/// codes, which it could otherwise be taken for).
pub const EXIT_GUEST_FAILED: i32 = 10;
/// `krr record` exit status when a recording is not replayable.
pub const EXIT_NOT_REPLAYABLE: i32 = 11;

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
        }
    }
}

/// Counts of run-loop and backend events, for the summary.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ExitStats {
    pub hlt: u64,
    pub budget: u64,
    pub io_stop: u64,
    pub interrupts_injected: u64,
    pub pio: u64,
    pub mmio: u64,
    pub exceptions: u64,
    pub syscalls: u64,
    pub cpuid: u64,
    pub rdtsc: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub end: RunEnd,
    pub exit_status: i32,
    /// The exit status of the guest's `krr.run` command (`KRR-END
    /// status=N`), when it printed one.
    pub guest_status: Option<i32>,
    pub instructions: u64,
    pub instructions_per_vcpu: Vec<u64>,
    pub virtual_ns: u64,
    /// Virtual seconds from `/init`'s `KRR-START` line to its `KRR-END`
    /// line (the `krr.run` command), when both were printed.
    pub virtual_seconds_of_command: Option<f64>,
    pub wall_seconds: f64,
    pub mips: f64,
    pub exits: ExitStats,
    /// Instructions retired when `/init` was started (the kernel's
    /// "Run /init as init process" line), if seen.
    pub instructions_to_init: Option<u64>,
    pub wall_seconds_to_init: Option<f64>,
    /// Wall time until the first complete console line after that one
    /// (the first line `/init` prints): the boot benchmark's end point.
    pub wall_seconds_to_first_init_line: Option<f64>,
    pub console_bytes: usize,
    /// SHA-256 of the whole console output (determinism checks).
    pub console_sha256: String,
    #[serde(skip)]
    pub console: Vec<u8>,
    pub last_console_lines: Vec<String>,
    /// Device model errors (bad register accesses and the like).
    pub device_errors: Vec<String>,
}

/// Creates guest RAM: one region from 0 (at most 3 GiB, below the 32-bit
/// MMIO hole).
pub fn create_memory(bytes: u64) -> Result<GuestMemoryMmap, MachineError> {
    if !(64 << 20..=3 << 30).contains(&bytes) {
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
const END_MARKER: &str = "KRR-END status=";
/// What `/init` prints right before it runs `krr.run`.
const START_MARKER: &str = "KRR-START";
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
    /// Recorded runs: console bytes already searched for a trigger marker.
    trigger_scan: usize,
    /// Recorded runs from boot: whether the agent was checked at /init.
    agent_checked: bool,
    /// The vCPU whose triple fault ended the run, if one did.
    triple_fault_vcpu: Option<usize>,
    /// Recorded runs with `checkpoint_every`: what they digest and when.
    checkpoints: Option<Checkpoints>,
    mem: GuestMemoryMmap,
}

/// When the next checkpoint of a recorded run is due, and what it digests.
struct Checkpoints {
    image: KernelImage,
    every: u64,
    /// Total instructions (all vCPUs) at which the next one is due.
    next: u64,
}

/// What a KVM run needs beside the vCPUs.
struct KvmDrive {
    kickers: Vec<VcpuKicker>,
    features: HostFeatures,
    clock: HostClock,
}

/// The backend's name as the CLI and recording headers spell it.
pub fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Tcg => "tcg",
        Backend::Kvm => "kvm",
    }
}

/// Guest-physical address of the local APICs and the IA32_APIC_BASE value
/// of the bootstrap processor (enabled, BSP).
const APIC_BASE_BSP: u64 = LAPIC_BASE | (1 << 11) | (1 << 8);

impl Machine {
    pub fn new(cfg: MachineConfig, backend: Backend) -> Result<Machine, MachineError> {
        if cfg.vcpus == 0 || cfg.vcpus > 8 {
            return Err(MachineError::Config(format!(
                "--vcpus {}: expected 1 to 8",
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
        // A recorded run reserves the agent's ring at the top of RAM and
        // tells the agent where it is.
        let ring = match &cfg.record {
            Some(r) => {
                if r.ring_size % 4096 != 0
                    || r.ring_size < 4096 + crate::record::abi::MIN_DATA_SIZE
                    || r.ring_size > cfg.mem_bytes / 4
                {
                    return Err(MachineError::Config(format!(
                        "ring size {} bytes: expected a multiple of 4096 between {} bytes and a quarter of guest memory",
                        r.ring_size,
                        4096 + crate::record::abi::MIN_DATA_SIZE
                    )));
                }
                let phys = cfg.mem_bytes - r.ring_size;
                cfg.cmdline.push(' ');
                cfg.cmdline.push_str(&crate::record::abi::kernel_cmdline(
                    phys,
                    r.ring_size,
                    false,
                ));
                Some((phys, r.ring_size))
            }
            None => None,
        };
        let info = boot::load_linux(
            &mem,
            ring.map_or(cfg.mem_bytes, |(phys, _)| phys),
            &ring.into_iter().collect::<Vec<_>>(),
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
            Backend::Tcg => Box::new(hypervisor::unicorn::UnicornVm::new(&mem)?),
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
        }
        let mut sregs = info.sregs;
        sregs.apic_base = APIC_BASE_BSP;
        vcpus[0].set_sregs(&sregs)?;
        vcpus[0].set_regs(&info.regs)?;
        let mut state = vec![CpuState::WaitForSipi; cfg.vcpus];
        state[0] = CpuState::Running;
        let mut platform = Platform::new(&cfg, mem.clone(), mp.ioapic_id, disk);
        platform.stop_on_irq = backend == Backend::Kvm;
        let mut checkpoints = None;
        if let (Some(rc), Some((phys, _))) = (&cfg.record, ring) {
            if rc.checkpoint_every > 0 {
                let image = rc
                    .vmlinux
                    .as_deref()
                    .and_then(crate::replay::symbols::Symbols::beside)
                    .or_else(|| crate::replay::symbols::Symbols::beside(&cfg.kernel))
                    .and_then(|s| KernelImage::from_symbols(&s))
                    .ok_or_else(|| {
                        MachineError::Config(
                            "--checkpoint-every: checkpoints digest the kernel's data and bss, found through a System.map (with _sdata, _edata, __bss_start, __bss_stop) beside --vmlinux or --kernel; there is none".into(),
                        )
                    })?;
                checkpoints = Some(Checkpoints {
                    image,
                    every: rc.checkpoint_every,
                    next: rc.checkpoint_every,
                });
            }
            let mut rc = rc.clone();
            rc.engine_executes_cpu = backend == Backend::Tcg;
            let header =
                crate::record::recorder::header_for_machine(&cfg, &rc, backend_name(backend), phys)
                    .map_err(|e| MachineError::Config(format!("recording header: {e:#}")))?;
            let recorder = Recorder::new(rc, mem.clone(), phys, header)
                .map_err(|e| MachineError::Config(format!("recorder: {e}")))?;
            platform.recorder = Some(recorder);
        }
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
            trigger_scan: 0,
            agent_checked: false,
            triple_fault_vcpu: None,
            checkpoints,
            mem,
        })
    }

    fn now(&self, vcpu: usize) -> u64 {
        self.vcpus[vcpu].instructions_retired().unwrap_or(0) + self.platform.idle_ns[vcpu]
    }

    /// The machine's virtual time: its most advanced vCPU's clock.
    fn virtual_now(&self) -> u64 {
        (0..self.vcpus.len())
            .map(|i| self.now(i))
            .max()
            .unwrap_or(0)
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
        if let Some(recorder) = &mut self.platform.recorder {
            recorder.startup(id, vector);
        }
        Ok(())
    }

    /// Delivers what vCPU `id` can take now.
    fn inject_for(&mut self, id: usize, stats: &mut ExitStats) -> Result<Pending, HypervisorError> {
        if self.platform.apics[id].take_nmi() {
            self.log_interrupt(id, InterruptKind::Nmi, 2)?;
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
            self.log_interrupt(id, InterruptKind::External, vector)?;
            self.vcpus[id].inject(Injection::Interrupt(vector))?;
            stats.interrupts_injected += 1;
            return Ok(Pending::Injected);
        }
        if id == 0 && self.platform.pic.has_interrupt() && self.platform.pic_routed_to_cpu() {
            if !window {
                return Ok(Pending::Masked);
            }
            if let Some(vector) = self.platform.pic.acknowledge() {
                self.log_interrupt(id, InterruptKind::External, vector)?;
                self.vcpus[id].inject(Injection::Interrupt(vector))?;
                stats.interrupts_injected += 1;
                return Ok(Pending::Injected);
            }
        }
        Ok(Pending::None)
    }

    /// Logs an interrupt about to be injected into vCPU `id` (recorded
    /// runs): its position is the instruction it will be taken before.
    fn log_interrupt(
        &mut self,
        id: usize,
        kind: InterruptKind,
        vector: u8,
    ) -> Result<(), HypervisorError> {
        let Some(recorder) = &mut self.platform.recorder else {
            return Ok(());
        };
        if !recorder.is_recording() {
            return Ok(());
        }
        let (at, regs) = position(self.vcpus[id].as_ref())?;
        recorder.interrupt(id, at, kind, vector, regs);
        Ok(())
    }

    /// Recorded runs, after each run of vCPU `id` (every vCPU stopped): on
    /// machines of several vCPUs the end of its slice (the global order of
    /// the vCPUs' execution, which replay follows), and a checkpoint when
    /// one is due and the vCPU stopped in the kernel.
    fn record_after_run(&mut self, id: usize) -> Result<(), HypervisorError> {
        let Some(recorder) = &mut self.platform.recorder else {
            return Ok(());
        };
        // One vCPU and no checkpoints: nothing to log (spare the register
        // reads after every run).
        if !recorder.is_recording() || (self.vcpus.len() == 1 && self.checkpoints.is_none()) {
            return Ok(());
        }
        let (at, regs) = position(self.vcpus[id].as_ref())?;
        if self.vcpus.len() > 1 {
            recorder.slice(id, at);
        }
        if let Some(c) = &mut self.checkpoints {
            let total: u64 = self
                .vcpus
                .iter()
                .map(|v| v.instructions_retired().unwrap_or(0))
                .sum();
            if total >= c.next && at.cpl == 0 {
                let cr3 = self.vcpus[id].sregs()?.cr3;
                recorder.checkpoint(id, at, regs, c.image.digest(&self.mem, cr3));
                c.next = total + c.every;
            }
        }
        Ok(())
    }

    /// Every vCPU's state for a recording's start snapshot.
    fn cpu_snapshots(&self) -> Result<Vec<CpuSnapshot>, HypervisorError> {
        // The MSRs a 64-bit Linux kernel programs and replay must restore.
        const MSRS: &[u32] = &[
            0x1b,        // IA32_APIC_BASE
            0x174,       // SYSENTER_CS
            0x175,       // SYSENTER_ESP
            0x176,       // SYSENTER_EIP
            0x277,       // PAT
            0xc000_0080, // EFER
            0xc000_0081, // STAR
            0xc000_0082, // LSTAR
            0xc000_0083, // CSTAR
            0xc000_0084, // FMASK
            0xc000_0100, // FS_BASE
            0xc000_0101, // GS_BASE
            0xc000_0102, // KERNEL_GS_BASE
            0xc000_0103, // TSC_AUX
        ];
        self.vcpus
            .iter()
            .enumerate()
            .map(|(id, vcpu)| {
                Ok(CpuSnapshot {
                    id,
                    state: match self.state[id] {
                        CpuState::WaitForSipi => "wait-for-sipi",
                        CpuState::Running => "running",
                        CpuState::Halted => "halted",
                        CpuState::Stopped => "stopped",
                    }
                    .to_string(),
                    icount: vcpu.instructions_retired().unwrap_or(0),
                    kernel_icount: vcpu.kernel_instructions_retired().unwrap_or(0),
                    regs: vcpu.regs()?,
                    sregs: vcpu.sregs()?,
                    fpu: vcpu.fpu()?.xsave,
                    msrs: MSRS
                        .iter()
                        .filter_map(|&m| vcpu.msr(m).ok().map(|v| (m, v)))
                        .collect(),
                    debug: vcpu.debug_regs()?,
                })
            })
            .collect()
    }

    /// Starts a recording now (every vCPU stopped).
    fn record_start(&mut self) -> Result<(), String> {
        let cpus = self.cpu_snapshots().map_err(|e| e.to_string())?;
        let devices = serde_json::to_value(self.platform.device_state())
            .map_err(|e| format!("device state: {e}"))?;
        let console_len = self.platform.serial.output().len();
        let Some(recorder) = &mut self.platform.recorder else {
            return Ok(());
        };
        recorder.start(&cpus, devices, console_len)?;
        self.vm.forget_block_counts();
        Ok(())
    }

    /// Stops the running recording, if any (every vCPU stopped).
    fn record_stop(&mut self, reason: &str, ok: bool) {
        let icounts: Vec<u64> = self
            .vcpus
            .iter()
            .map(|v| v.instructions_retired().unwrap_or(0))
            .collect();
        let kernel_icounts: Vec<u64> = self
            .vcpus
            .iter()
            .map(|v| v.kernel_instructions_retired().unwrap_or(0))
            .collect();
        let virtual_ns = (0..self.vcpus.len())
            .map(|i| self.now(i))
            .max()
            .unwrap_or(0);
        let console = self.platform.serial.output().to_vec();
        if let Some(recorder) = &mut self.platform.recorder {
            if recorder.is_recording() {
                recorder.between_runs(self.platform.current, &console);
                recorder.stop(
                    reason,
                    ok,
                    icounts,
                    kernel_icounts,
                    virtual_ns,
                    self.triple_fault_vcpu,
                );
            }
        }
    }

    /// Recorder work between two vCPU runs (every vCPU stopped at an
    /// instruction boundary): SIGINT, guest start/stop requests, console
    /// triggers, the agent check, the periodic flush. Returns the run's end
    /// when the run must stop.
    fn between_runs(&mut self, id: usize, console: &ConsoleWatch) -> Option<RunEnd> {
        if self
            .cfg
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
        {
            return Some(RunEnd::Interrupted);
        }
        let recorder = self.platform.recorder.as_mut()?;
        if let Some(e) = recorder.error() {
            return Some(RunEnd::RecordingFailed {
                reason: e.to_string(),
            });
        }
        let (start, stop) = (
            recorder.config().start.clone(),
            recorder.config().stop.clone(),
        );
        let recording = recorder.is_recording();
        let request = recorder.take_request();
        // With recording on from boot, the agent must have come up by the
        // time the kernel starts /init, or nothing of user space's kernel
        // entries gets recorded.
        if start == StartTrigger::Boot && console.to_init.is_some() && !self.agent_checked {
            self.agent_checked = true;
            if let Err(e) = recorder.check_agent() {
                return Some(RunEnd::RecordingFailed { reason: e });
            }
        }
        let out = self.platform.serial.output();
        let new_output = |scan: &mut usize, marker: &str| -> bool {
            let from = (*scan).min(out.len());
            let hit = out[from..]
                .windows(marker.len())
                .position(|w| w == marker.as_bytes());
            match hit {
                Some(i) => {
                    *scan = from + i + marker.len();
                    true
                }
                None => {
                    *scan = out.len().saturating_sub(marker.len());
                    false
                }
            }
        };
        let mut do_start = false;
        let mut do_stop = None;
        if recording {
            match (&stop, request) {
                (StopTrigger::Guest, Some(GuestRequest::Stop)) => {
                    do_stop = Some("stopped by the guest (/proc/krr_agent)".to_string())
                }
                (StopTrigger::Marker(m), _) if new_output(&mut self.trigger_scan, m) => {
                    do_stop = Some(format!("console marker {m:?}"))
                }
                _ => {}
            }
        } else {
            match (&start, request) {
                (StartTrigger::Guest, Some(GuestRequest::Start)) => do_start = true,
                (StartTrigger::Marker(m), _) if new_output(&mut self.trigger_scan, m) => {
                    do_start = true
                }
                _ => {}
            }
        }
        if let Some(reason) = do_stop {
            self.record_stop(&reason, true);
        } else if do_start {
            let agent = self
                .platform
                .recorder
                .as_ref()
                .map(|r| r.check_agent())
                .unwrap_or(Ok(()));
            if let Err(e) = agent.and_then(|()| self.record_start()) {
                return Some(RunEnd::RecordingFailed { reason: e });
            }
        }
        let console_out = self.platform.serial.output().to_vec();
        let recorder = self.platform.recorder.as_mut()?;
        recorder.between_runs(id, &console_out);
        recorder.error().map(|e| RunEnd::RecordingFailed {
            reason: e.to_string(),
        })
    }

    /// Starts the recording of a run recorded from boot, before its first
    /// instruction (called at the top of every round; acts once).
    fn record_from_boot(&mut self) -> Option<RunEnd> {
        let recorder = self.platform.recorder.as_ref()?;
        if recorder.config().start != StartTrigger::Boot
            || recorder.is_recording()
            || !recorder.finished().is_empty()
        {
            return None;
        }
        self.record_start()
            .err()
            .map(|reason| RunEnd::RecordingFailed { reason })
    }

    /// The recordings this run wrote, in order.
    pub fn recordings(&self) -> &[crate::record::recorder::FinishedRecording] {
        self.platform
            .recorder
            .as_ref()
            .map(|r| r.finished())
            .unwrap_or(&[])
    }

    /// Finishes a recording still running when the run ends.
    fn record_finish(&mut self, end: &RunEnd) {
        let ok = !matches!(
            end,
            RunEnd::BackendError { .. } | RunEnd::RecordingFailed { .. }
        );
        let reason = match end {
            RunEnd::Interrupted => "interrupted (SIGINT)".to_string(),
            other => format!(
                "run ended: {}",
                serde_json::to_string(other).unwrap_or_default()
            ),
        };
        self.record_stop(&reason, ok);
    }

    fn deliverable(&self, id: usize) -> bool {
        self.platform.apics[id].pending_vector().is_some()
            || (id == 0 && self.platform.pic.has_interrupt() && self.platform.pic_routed_to_cpu())
    }

    fn report(
        &mut self,
        end: RunEnd,
        mut stats: ExitStats,
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
        }
        let per_vcpu: Vec<u64> = self
            .vcpus
            .iter()
            .map(|v| v.instructions_retired().unwrap_or(0))
            .collect();
        let instructions: u64 = per_vcpu.iter().sum();
        let console = self.platform.serial.output().to_vec();
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
            virtual_ns: self.virtual_now(),
            virtual_seconds_of_command: None,
            wall_seconds: wall.as_secs_f64(),
            mips: instructions as f64 / wall.as_secs_f64().max(1e-9) / 1e6,
            exits: stats,
            instructions_to_init: to_init.map(|t| t.0),
            wall_seconds_to_init: to_init.map(|t| t.1.as_secs_f64()),
            wall_seconds_to_first_init_line: None,
            console_bytes: console.len(),
            console_sha256: {
                use sha2::Digest;
                sha2::Sha256::digest(&console)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            },
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
    /// Bytes of console output already scanned.
    scanned: usize,
    /// Instructions (0 where the backend does not count) and wall time when
    /// the kernel started /init.
    to_init: Option<(u64, Duration)>,
    first_init_line: Option<Duration>,
    end_status: Option<i32>,
    /// Virtual time (ns) when `/init` printed its start and end markers.
    command_started_ns: Option<u64>,
    command_ended_ns: Option<u64>,
}

impl ConsoleWatch {
    fn command_seconds(&self) -> Option<f64> {
        let (from, to) = (self.command_started_ns?, self.command_ended_ns?);
        Some(to.saturating_sub(from) as f64 / 1e9)
    }

    /// Scans the output added since the last call (with some overlap, so a
    /// marker split across two calls is found); returns the run's end when
    /// the kernel panicked.
    fn scan(
        &mut self,
        out: &[u8],
        instructions: u64,
        virtual_ns: u64,
        elapsed: Duration,
    ) -> Option<RunEnd> {
        if out.len() <= self.scanned {
            return None;
        }
        let from = self.scanned.saturating_sub(200);
        let text = String::from_utf8_lossy(&out[from..]);
        self.scanned = out.len();
        if self.to_init.is_none() && text.contains(INIT_MARKER) {
            self.to_init = Some((instructions, elapsed));
        }
        if self.to_init.is_some()
            && self.first_init_line.is_none()
            && first_line_after(out, INIT_MARKER)
        {
            self.first_init_line = Some(elapsed);
        }
        if self.command_started_ns.is_none() && parse_marker(&text, START_MARKER).is_some() {
            self.command_started_ns = Some(virtual_ns);
        }
        if self.end_status.is_none() {
            if let Some(s) = parse_marker(&text, END_MARKER) {
                self.end_status = s.trim().parse().ok();
                self.command_ended_ns = Some(virtual_ns);
            }
        }
        parse_marker(&text, PANIC_MARKER).map(|line| RunEnd::Panic {
            line: format!("{PANIC_MARKER}{line}"),
        })
    }
}

/// Where `vcpu` stands (for events logged between runs), and its registers.
fn position(vcpu: &dyn Vcpu) -> Result<(Position, hypervisor::Regs), HypervisorError> {
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

/// Whether `out` holds a complete line after the line containing `marker`.
pub fn first_line_after(out: &[u8], marker: &str) -> bool {
    let m = marker.as_bytes();
    let Some(i) = out.windows(m.len()).position(|w| w == m) else {
        return false;
    };
    let rest = &out[i..];
    match rest.iter().position(|&b| b == b'\n') {
        Some(nl) => rest[nl + 1..].contains(&b'\n'),
        None => false,
    }
}

/// The rest of the first complete line containing `marker`, after it.
fn parse_marker(text: &str, marker: &str) -> Option<String> {
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
    fn memory_size_is_checked() {
        assert!(create_memory(1 << 20).is_err());
        assert!(create_memory(64 << 20).is_ok());
    }
}
