// SPDX-License-Identifier: GPL-2.0-or-later
//! CPU backends behind one trait, after cloud-hypervisor's `hypervisor` crate:
//! one [`Vcpu`] trait, one [`VmExit`] enum, a module per backend. The KVM
//! module also exports what only a KVM run needs (its vCPU kickers and the
//! host's features), which the machine's KVM pacing uses.
//!
//! Port I/O and MMIO are not exits here: a backend forwards each access to the
//! [`IoBus`] of the [`RunContext`] it was given for the run, synchronously,
//! the way the access
//! happens in the guest (inside a unicorn hook, or between two `KVM_RUN`s).
//! Exits report only what the run loop itself has to act on.

use thiserror::Error;

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest executed HLT and waits for an interrupt.
    Hlt,
    /// The instruction budget given to `run` is used up.
    BudgetExhausted,
    /// The guest can take an external interrupt now (IF=1, no interrupt
    /// shadow); returned only after [`Vcpu::request_interrupt_window`].
    InterruptWindow,
    /// Single-step completed, or a breakpoint was hit, at `rip`.
    Debug { rip: u64 },
    /// The I/O bus asked the vCPU to stop after the current access (power
    /// off, reset, a recording trigger).
    IoStop,
    /// Triple fault or another condition that resets the machine.
    Shutdown,
    /// The next instruction is user code, at `rip`; returned only after
    /// [`Vcpu::set_stop_at_user_mode`] (replay of the kernel alone).
    UserMode { rip: u64 },
    /// The vCPU spins in the kernel (the same block over and over, as a
    /// spinlock's wait loop does); returned only after
    /// [`Vcpu::set_yield_on_spin`], so that the lock's holder can run.
    Spin,
    /// The vCPU accessed a range of [`Vcpu::set_watchpoints`]; it stopped at
    /// the end of that block, and [`Vcpu::take_watch_hit`] says where the
    /// access was made.
    Watchpoint,
}

/// Which accesses a watchpoint catches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    Write,
    Read,
    /// Reads and writes.
    Access,
}

/// A watched range of guest memory, by guest-virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchpoint {
    pub addr: u64,
    pub len: u64,
    pub kind: WatchKind,
}

/// A watchpoint with the guest-physical pieces `[start, end)` of its range.
pub type PlacedWatchpoint = (Watchpoint, Vec<(u64, u64)>);

/// A watched access ([`VmExit::Watchpoint`]): the watchpoint, whether the
/// access wrote, the accessing instruction and the vCPU's counts right
/// before it (exact, as at a block boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchHit {
    pub watchpoint: Watchpoint,
    pub write: bool,
    pub rip: u64,
    pub icount: u64,
    pub kernel_icount: u64,
}

/// Width of a port or MMIO access, in bytes (1, 2, 4 or 8).
pub type AccessSize = u8;

/// Device I/O: what the guest's port and MMIO accesses, CPUID and RDTSC
/// reach. Implemented by the machine model; a backend calls it while the
/// guest executes, the way cloud-hypervisor's `VmOps` is called.
pub trait IoBus {
    fn pio_read(&mut self, vcpu: usize, port: u16, data: &mut [u8]);
    fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]);
    fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8]);
    fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8]);
    /// CPUID, answered by the engine so that every backend shows the guest
    /// the same CPU (a recording made on one backend replays on another).
    fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4];
    /// RDTSC/RDTSCP value; the engine's virtual clock.
    fn rdtsc(&mut self, vcpu: usize) -> u64;
}

/// What a backend reports about the run itself, apart from device I/O, and
/// the run-control questions it asks after an access. Every method has a
/// default, so a host that needs none of it (a test bus) implements it empty.
pub trait RunEvents {
    /// Asked by the backend after each access: stop the vCPU with
    /// [`VmExit::IoStop`] now?
    fn stop_requested(&self) -> bool {
        false
    }
    /// Asked by backends that count instructions after each write access:
    /// the vCPU's instruction count by which its run must end, because the
    /// write armed a device timer that falls due then, or made an interrupt
    /// pending for it. The run then ends at the first block boundary there.
    fn run_end(&self, _vcpu: usize) -> Option<u64> {
        None
    }
    /// Called by backends that count instructions, before each access of
    /// [`IoBus`] (port, MMIO, CPUID, RDTSC), with where vCPU `vcpu` stands:
    /// the instructions it has retired so far (the input of the virtual
    /// clock) and the instruction's landmarks (the recorder logs them).
    fn position(&mut self, _vcpu: usize, _at: Position) {}
    /// Called by backends that deliver exceptions themselves (the software
    /// CPU), right before the delivery through the guest IDT; the recorder
    /// logs the ones that enter the kernel from user mode.
    fn exception(&mut self, _vcpu: usize, _at: Position, _exception: &DeliveredException) {}
    /// Called by backends that perform SYSCALL themselves (the software
    /// CPU), before the kernel entry, with the user's state.
    fn syscall(&mut self, _vcpu: usize, _at: Position, _entry: &UserEntry) {}
}

/// What a vCPU's run reaches: device I/O and the run's events, usually one
/// object (the machine's platform, replay's log-answering bus).
pub trait RunContext: IoBus + RunEvents {}

impl<T: IoBus + RunEvents + ?Sized> RunContext for T {}

/// The user's state at a kernel entry the backend performs itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserEntry {
    /// At the entering instruction (`rip` is the SYSCALL's address).
    pub regs: Regs,
    pub fs_base: u64,
    pub gs_base: u64,
}

/// Where a vCPU stands when an event happens: its instruction counter as
/// the backend keeps it, plus RIP and RCX, which tell apart the iterations
/// of a loop inside one translation block (`rep movs`), as KRR's landmarks
/// do.
///
/// On the software CPU `icount` counts the instructions of every
/// translation block entered so far: exact at block boundaries (where runs
/// stop and interrupts are taken), the count at the block's end for an
/// access inside a block, and `rip` there is the one QEMU last synchronised
/// (the block's start or the accessing instruction). Both are deterministic:
/// the same run gives the same positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub icount: u64,
    /// The part of `icount` executed at CPL 0 (kernel code): where replay
    /// of the kernel alone finds the event.
    pub kernel_icount: u64,
    pub rip: u64,
    pub rcx: u64,
    /// The privilege level at the event (3: user mode).
    pub cpl: u8,
}

/// As logs print it: `@icount/kkernel_icount rip=... rcx=...`.
impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "@{}/k{} rip={:#x} rcx={:#x}",
            self.icount, self.kernel_icount, self.rip, self.rcx
        )
    }
}

/// An exception (or `INT n`) a backend is about to deliver by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveredException {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// The exception's payload, as KVM calls it: CR2 for page faults, DR6
    /// for debug exceptions.
    pub cr2: Option<u64>,
    /// `INT n`/`INT3`/`INTO` rather than a fault or trap.
    pub software: bool,
    /// The privilege level the CPU was at when the exception happened.
    pub cpl: u8,
    /// The registers at the exception when it came from user mode (a
    /// kernel entry replay must recreate).
    pub user_regs: Option<Regs>,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Access rights in VMX/KVM layout: type(4) s(1) dpl(2) p(1) avl(1) l(1) db(1) g(1).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// Descriptor table register (GDTR, IDTR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// General-purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Segment, control and descriptor-table registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// x87/SSE state in FXSAVE layout (512 bytes) plus any XSAVE extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FpuState {
    pub xsave: Vec<u8>,
}

/// Debug registers DR0-DR3, DR6, DR7.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// An event to inject into the guest before it executes its next instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// External (hardware) interrupt with this vector.
    Interrupt(u8),
    /// Non-maskable interrupt.
    Nmi,
    /// Exception with optional error code (and the payload: CR2 for page
    /// faults, DR6 for debug exceptions, set before delivery).
    Exception {
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
    },
    /// A software interrupt (`int n`, `int3`, `into`) as if the instruction
    /// just before RIP executed it: RIP already points past it, and the
    /// gate's DPL must allow the current privilege level. Replay recreates
    /// such kernel entries from user mode.
    SoftwareInterrupt(u8),
}

#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error("backend {backend} is not available on this host: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("{backend}: {op} failed: {reason}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        reason: String,
    },
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// What a run did, by kind, for its summary: the run loop counts its own
/// (HLT exits, budget stops, I/O stops, injections), and a backend that
/// handles exits itself counts the rest (the machine counts them at its bus
/// where the backend does not).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ExitCounters {
    pub hlt: u64,
    /// Runs that ended at their instruction budget (or time slice).
    pub budget: u64,
    /// Runs that ended in [`VmExit::IoStop`] (each completed the
    /// interrupted instruction with a step).
    pub io_stops: u64,
    /// Interrupts and NMIs the machine injected.
    pub interrupts_injected: u64,
    /// Interrupts and exceptions the backend delivered from its queue.
    pub interrupts: u64,
    pub pio: u64,
    pub mmio: u64,
    pub exceptions: u64,
    pub syscalls: u64,
    pub cpuid: u64,
    pub rdtsc: u64,
    /// Runs that ended in [`VmExit::Spin`].
    pub spins: u64,
    /// Translated blocks that ran the block hook (software CPU): where a
    /// run's budget ends, and every block while a step, a watchpoint, an
    /// interrupt window or a stop at user mode needs it; the others count
    /// themselves.
    pub hooked_blocks: u64,
}

/// A virtual machine of one backend: guest memory is registered with it, and
/// vCPUs are created from it. Backends are constructed in their own module
/// (e.g. `unicorn::UnicornVm::new(..)`, `kvm::KvmVm::new(..)`) from the
/// machine model's guest memory.
///
/// Guest memory is `vm_memory::GuestMemoryMmap<()>` (host-mmap'd regions at
/// their guest-physical addresses, created by `machine::memory`); it is
/// owned by the machine and must outlive the VM. The software CPU maps the
/// same host pages into unicorn (`uc_mem_map_ptr`); KVM registers them as
/// memory slots. `unicorn::UnicornVm::new(&GuestMemoryMmap)` is the software
/// backend's constructor.
pub trait Vm {
    /// The backend's name as the CLI spells it (`tcg`, `kvm`).
    fn backend_name(&self) -> &'static str;
    /// Exits the backend handled internally, by kind, for run summaries;
    /// `None` where the backend does not count them (the machine counts at
    /// its bus instead).
    fn exit_counters(&self) -> Option<ExitCounters> {
        None
    }
    /// Creates vCPU `id` (0 is the bootstrap processor).
    fn create_vcpu(&mut self, id: usize) -> Result<Box<dyn Vcpu>>;
    /// Declares a guest-physical range with no RAM behind it whose accesses
    /// go to [`IoBus::mmio_read`]/[`IoBus::mmio_write`]. KVM needs nothing
    /// (unbacked memory exits by itself); the software CPU must map it.
    fn add_mmio_region(&mut self, _base: u64, _size: u64) -> Result<()> {
        Ok(())
    }
    /// Tells the backend that the host wrote guest memory in
    /// `[gpa, gpa + len)` (device DMA, a loader): translated code of that
    /// range must be dropped. KVM needs nothing.
    fn invalidate_code(&mut self, _gpa: u64, _len: u64) -> Result<()> {
        Ok(())
    }
}

/// One virtual CPU. A backend implements this for its vCPU type.
pub trait Vcpu {
    /// Runs the guest until an exit, or until `budget` instructions have
    /// executed where the backend counts instructions exactly (`None`: no
    /// budget). Port and MMIO accesses go to `bus` while it runs.
    fn run(&mut self, bus: &mut dyn RunContext, budget: Option<u64>) -> Result<VmExit>;

    fn regs(&self) -> Result<Regs>;
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    fn sregs(&self) -> Result<Sregs>;
    fn set_sregs(&mut self, sregs: &Sregs) -> Result<()>;
    fn fpu(&self) -> Result<FpuState>;
    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()>;
    fn msr(&self, index: u32) -> Result<u64>;
    fn set_msr(&mut self, index: u32, value: u64) -> Result<()>;
    fn debug_regs(&self) -> Result<DebugRegs>;
    fn set_debug_regs(&mut self, regs: &DebugRegs) -> Result<()>;

    /// Queues an event for delivery through the guest IDT before the next
    /// instruction.
    fn inject(&mut self, event: Injection) -> Result<()>;
    /// Whether an event queued by [`Vcpu::inject`] waits for the next run
    /// (state the registers do not show).
    fn has_pending_injection(&self) -> Result<bool> {
        Err(HypervisorError::Unsupported(
            "asking for pending injections",
        ))
    }
    /// Whether an external interrupt could be delivered right now.
    fn interrupt_window_open(&self) -> Result<bool>;
    /// Makes the next `run` return [`VmExit::InterruptWindow`] as soon as an
    /// external interrupt can be delivered.
    fn request_interrupt_window(&mut self, enable: bool) -> Result<()>;

    /// Single-step mode: each `run` executes one instruction and returns
    /// [`VmExit::Debug`].
    fn set_single_step(&mut self, enable: bool) -> Result<()>;
    /// Sets the guest-virtual addresses at which `run` stops with
    /// [`VmExit::Debug`] (replaces the previous set).
    fn set_breakpoints(&mut self, addrs: &[u64]) -> Result<()>;

    /// Exact number of guest instructions retired so far, where the backend
    /// knows it (the software CPU does; KVM without a PMU does not).
    fn instructions_retired(&self) -> Option<u64>;
    /// Of [`Vcpu::instructions_retired`], those of kernel code.
    fn kernel_instructions_retired(&self) -> Option<u64> {
        None
    }
    /// Sets both counts (restoring a snapshot of a replay), where the
    /// backend counts instructions.
    fn set_instructions_retired(&mut self, _all: u64, _kernel: u64) -> Result<()> {
        Err(HypervisorError::Unsupported("setting instruction counts"))
    }
    /// Performs SYSCALL from the user state `entry` (the instruction at
    /// `entry.regs.rip`): replay recreates recorded syscall entries so.
    fn enter_syscall(&mut self, _entry: &UserEntry) -> Result<()> {
        Err(HypervisorError::Unsupported(
            "entering a syscall from a given user state",
        ))
    }
    /// Makes `run` return [`VmExit::UserMode`] before the first instruction
    /// of user code (replay of the kernel alone).
    fn set_stop_at_user_mode(&mut self, _enable: bool) -> Result<()> {
        Err(HypervisorError::Unsupported("stopping at user mode"))
    }
    /// Sets the watched ranges, each with its guest-physical pieces
    /// `[start, end)` (replaces the previous set): an access to one ends
    /// the run with [`VmExit::Watchpoint`]. The caller walks the page
    /// tables: a backend's own translation would check the vCPU's
    /// privilege, and a vCPU in user mode may not read the kernel's pages.
    fn set_watchpoints(&mut self, _watchpoints: &[PlacedWatchpoint]) -> Result<()> {
        Err(HypervisorError::Unsupported("watchpoints"))
    }
    /// The access that ended the last run with [`VmExit::Watchpoint`].
    fn take_watch_hit(&mut self) -> Option<WatchHit> {
        None
    }
    /// Counts the kernel blocks that start at `pc` (`None`: stops
    /// counting), without stopping there: replay notes that the kernel
    /// reached a function without changing how it runs (a breakpoint
    /// splits the translated blocks replay counts by).
    fn watch_block(&mut self, _pc: Option<u64>) -> Result<()> {
        Err(HypervisorError::Unsupported("watching a block address"))
    }
    /// How many times a block at the [`Vcpu::watch_block`] address ran.
    fn watch_hits(&self) -> Result<u64> {
        Err(HypervisorError::Unsupported("watching a block address"))
    }
    /// Makes `run` return [`VmExit::Spin`] when the vCPU spins in the
    /// kernel: vCPUs that take turns on one thread must hand the turn to
    /// the others, one of which holds the lock. The software CPU detects
    /// PAUSE loops; KVM does not (its pause-loop exits stay in the host
    /// kernel), so there a spinner spins to the end of its slice.
    fn set_yield_on_spin(&mut self, _enable: bool) -> Result<()> {
        Ok(())
    }
}

#[cfg(target_os = "linux")]
pub mod kvm;
pub mod unicorn;

/// Which CPU backend runs a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The software CPU (unicorn/TCG): deterministic, exact instruction
    /// counts; named `tcg` on the command line.
    Tcg,
    /// Hardware virtualization (`/dev/kvm`).
    Kvm,
}

impl Backend {
    /// The name the CLI and recording headers use.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tcg => "tcg",
            Backend::Kvm => "kvm",
        }
    }
}
