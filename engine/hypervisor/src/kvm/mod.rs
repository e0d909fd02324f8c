// SPDX-License-Identifier: GPL-2.0-or-later
//! The KVM CPU backend: the engine's machine model on `kvm-ioctls`, so a
//! recording runs at hardware speed without a patched host kernel.
//!
//! Interrupt delivery stays in the engine. No in-kernel irqchip is created:
//! the engine's local APIC and IO-APIC decide what to deliver, and this
//! backend injects it with `KVM_INTERRUPT` once the guest can take it
//! (`request_interrupt_window`), so every interrupt the guest sees passes
//! through the engine with the vCPU state at injection. Port I/O and MMIO
//! exits are forwarded to the engine's [`IoBus`](crate::IoBus) synchronously inside
//! [`Vcpu::run`]; CPUID is the engine's ([`IoBus::cpuid`](crate::IoBus::cpuid)), loaded with
//! `KVM_SET_CPUID2` before the first entry.
//!
//! Positions of asynchronous events ([`AsyncEventMode`]): with a PMU, a
//! guest-only conditional-branch counter per vCPU (see [`pmu`]); without one
//! (PVM, most clouds), the engine only gets control back for an interrupt at
//! deterministic points (after a port/MMIO access or HLT) or while the guest
//! is in user mode, which kernel-only replay does not re-execute. A kick that
//! finds the guest in kernel mode waits for the next such point; the added
//! latency is measured in [`AsyncDeliveryStats`].
//!
//! Limits, stated: KVM does not count instructions, so the `budget` of
//! [`Vcpu::run`] is not honoured (the engine slices time with a
//! [`VcpuKicker`] instead) and [`Vcpu::instructions_retired`] is `None`.
//! RDTSC executes natively in the guest (trapping it needs host changes);
//! for recording, the guest agent records TSC reads, as in KRR.

mod convert;
mod cpuid;
mod detect;
mod kick;
pub mod pmu;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_guest_debug, kvm_guest_debug_arch, kvm_interrupt, kvm_msr_entry,
    kvm_userspace_memory_region, kvm_xsave, Msrs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::{
    DebugRegs, FpuState, HypervisorError, Injection, Regs, Result, RunContext, Sregs, Vcpu, Vm,
    VmExit,
};
pub use cpuid::HostFeatures;
pub use detect::{detect, select_backend, AsyncEventMode, BackendChoice, KvmAvailability};
pub use kick::{kick_signal, VcpuKicker};
pub use pmu::{pmu_available, CountedEvent, GuestCounter, StopPlanner, StopStep};

// KVM_INTERRUPT (_IOW(KVMIO, 0x86, struct kvm_interrupt)); kvm-ioctls has no
// wrapper for it because rust-vmm VMMs always use the in-kernel irqchip.
ioctl_iow_nr!(KVM_INTERRUPT, 0xAE, 0x86, kvm_interrupt);

const BACKEND: &str = "kvm";

/// Where the TSS for VMX real-mode emulation lives: three pages just below
/// the BIOS area, as QEMU and Firecracker place it. Guest RAM never reaches
/// there in the machine model.
const VMX_TSS_ADDR: usize = 0xfffb_d000;

/// How long a kick that finds the guest in kernel mode waits for a
/// deterministic point before it is delivered where the guest is (and the
/// position marked imprecise). Linux kernel code without port/MMIO access or
/// HLT for this long is rare (a busy wait on jiffies during boot).
pub const MAX_DETERMINISTIC_WAIT: Duration = Duration::from_millis(50);

/// How often a vCPU that waits for a deterministic point is kicked again to
/// see whether it went to user mode.
pub const USER_MODE_POLL: Duration = Duration::from_micros(500);

/// Most hardware breakpoints x86 has (DR0-DR3).
const HW_BREAKPOINTS: usize = 4;
const INT3: u8 = 0xcc;
const DB_VECTOR: u32 = 1;
const BP_VECTOR: u32 = 3;
const RFLAGS_IF: u64 = 1 << 9;

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Backend {
        backend: BACKEND,
        op,
        reason: e.to_string(),
    }
}

fn backend_err(op: &'static str, reason: impl Into<String>) -> HypervisorError {
    HypervisorError::Backend {
        backend: BACKEND,
        op,
        reason: reason.into(),
    }
}

/// A VM on `/dev/kvm` with guest memory registered and no in-kernel irqchip.
pub struct KvmVm {
    vm: VmFd,
    mem: GuestMemoryMmap,
    supported_cpuid: Arc<Vec<kvm_cpuid_entry2>>,
    availability: KvmAvailability,
    mode: AsyncEventMode,
    /// Software breakpoints (int3 bytes written into guest memory) are shared
    /// by all vCPUs, like the memory they patch.
    sw_breakpoints: Arc<Mutex<Vec<SwBreakpoint>>>,
}

impl KvmVm {
    /// Opens `/dev/kvm`, creates a VM and registers every region of `mem`
    /// as a memory slot. `mem` stays mapped as long as the VM (the regions
    /// are reference-counted).
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self> {
        let availability = detect();
        if let KvmAvailability::Absent { reason } = &availability {
            return Err(HypervisorError::Unavailable {
                backend: BACKEND,
                reason: reason.clone(),
            });
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        for (cap, name) in [
            (Cap::SetGuestDebug, "KVM_CAP_SET_GUEST_DEBUG"),
            (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
            (Cap::Xsave, "KVM_CAP_XSAVE"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::Unavailable {
                    backend: BACKEND,
                    reason: format!("the host KVM lacks {name}"),
                });
            }
        }
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if let Err(e) = vm.set_tss_address(VMX_TSS_ADDR) {
            // Needed only by VMX without unrestricted guest; PVM refuses it.
            tracing::debug!(
                "KVM_SET_TSS_ADDR failed ({e}); real mode relies on unrestricted guest"
            );
        }
        for (slot, region) in mem.iter().enumerate() {
            let slot = u32::try_from(slot)
                .map_err(|_| backend_err("register guest memory", "too many regions"))?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes,
            // and `self.mem` keeps it alive as long as the VM exists.
            unsafe { vm.set_user_memory_region(desc) }.map_err(|e| {
                backend_err(
                    "KVM_SET_USER_MEMORY_REGION",
                    format!(
                        "slot {slot} at guest {:#x}, {:#x} bytes: {e}",
                        desc.guest_phys_addr, desc.memory_size
                    ),
                )
            })?;
        }
        let mode = AsyncEventMode::detect();
        tracing::info!("kvm: {}; {}", availability.reason(), mode.describe());
        Ok(Self {
            vm,
            mem: mem.clone(),
            supported_cpuid: Arc::new(supported.as_slice().to_vec()),
            availability,
            mode,
            sw_breakpoints: Arc::default(),
        })
    }

    pub fn availability(&self) -> &KvmAvailability {
        &self.availability
    }

    pub fn async_event_mode(&self) -> AsyncEventMode {
        self.mode
    }

    /// The CPU features this host's KVM can give a guest. On a software
    /// hypervisor (PVM) that is less than KVM_GET_SUPPORTED_CPUID says:
    /// PVM reports CMPXCHG16B, but its ring-0 emulator cannot execute it
    /// (found booting Linux 6.1: `lock cmpxchg16b` in SLUB ends KVM_RUN
    /// with an emulation failure), so CX16 is withheld there; likewise SMAP
    /// (its CLAC/STAC fail the same way).
    pub fn host_features(&self) -> HostFeatures {
        const CPUID1_ECX_CX16: u32 = 1 << 13;
        const CPUID7_EBX_SMAP: u32 = 1 << 20;
        let mut supported = self.supported_cpuid.as_ref().clone();
        if let KvmAvailability::SoftwareHypervisor { .. } = self.availability {
            for e in supported.iter_mut() {
                match (e.function, e.index) {
                    (1, _) => e.ecx &= !CPUID1_ECX_CX16,
                    (7, 0) => e.ebx &= !CPUID7_EBX_SMAP,
                    _ => {}
                }
            }
        }
        HostFeatures::new(Arc::new(supported))
    }

    /// Creates vCPU `id` (its KVM vCPU id, and the APIC id the engine's
    /// CPUID should report). The result is `Send`: SMP runs one host thread
    /// per vCPU. Without an in-kernel irqchip every KVM vCPU is runnable from
    /// creation; application processors are held back by the engine until
    /// its local APIC sees INIT/SIPI (see [`sipi_state`]).
    pub fn create_kvm_vcpu(&self, id: usize) -> Result<KvmVcpu> {
        let fd = self
            .vm
            .create_vcpu(id as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        Ok(KvmVcpu {
            id,
            fd,
            mem: self.mem.clone(),
            kicker: VcpuKicker::new()?,
            supported_cpuid: self.supported_cpuid.clone(),
            cpuid_loaded: false,
            mode: self.mode,
            counter: None,
            window_requested: false,
            window_by_single_step: !matches!(
                self.availability,
                KvmAvailability::HardwareBacked { .. }
            ),
            window_stepping: false,
            single_step: false,
            hw_breakpoints: Vec::new(),
            sw_breakpoints: self.sw_breakpoints.clone(),
            step_over: None,
            debug_dirty: true,
            waiting_since: None,
            poller: None,
            stats: AsyncDeliveryStats::default(),
            last_async_position: None,
            budget_noted: false,
        })
    }
}

impl Vm for KvmVm {
    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    fn create_vcpu(&mut self, id: usize) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_kvm_vcpu(id)?))
    }
}

/// Architectural register state of an application processor after INIT
/// and a Startup IPI with `vector`: real mode, CS selector `vector << 8`,
/// base `vector << 12`, IP 0. Backend-neutral: the engine applies it with
/// `set_regs`/`set_sregs` on the vCPU its local APIC started.
pub fn sipi_state(vector: u8, current: &Sregs) -> (Regs, Sregs) {
    let mut sregs = *current;
    let real_data = |selector: u16| crate::Segment {
        selector,
        base: u64::from(selector) << 4,
        limit: 0xffff,
        type_: 3,
        present: true,
        s: true,
        ..Default::default()
    };
    sregs.cs = crate::Segment {
        type_: 11,
        ..real_data(u16::from(vector) << 8)
    };
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *seg = real_data(0);
    }
    sregs.cr0 = 0x6000_0010; // CD, NW, ET: the INIT value.
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs.gdt = crate::DescriptorTable {
        base: 0,
        limit: 0xffff,
    };
    sregs.idt = sregs.gdt;
    let regs = Regs {
        rip: 0,
        rflags: 0x2,
        ..Regs::default()
    };
    (regs, sregs)
}

/// Where an asynchronous event was let in, for the recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncPosition {
    /// Right after a port or MMIO access (the access is the position).
    AfterIo,
    /// At HLT.
    Halt,
    /// At the first interrupt window after the previous position.
    InterruptWindow,
    /// While the guest ran in user mode: the kernel entry it causes is the
    /// position.
    UserMode,
    /// Guest PMU counter value at the stop (PMU mode).
    Counted { count: u64 },
    /// No deterministic point came within [`MAX_DETERMINISTIC_WAIT`]: the
    /// event went in where the guest was (replay must match by RIP and
    /// registers).
    Imprecise,
}

/// What the no-PMU delivery policy cost, per vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsyncDeliveryStats {
    /// Kicks that asked for a stop (the bus had `stop_requested`).
    pub requests: u64,
    /// Kicks with nothing requested (the engine changed its mind).
    pub spurious: u64,
    pub delivered_user_mode: u64,
    pub delivered_after_io: u64,
    pub delivered_at_halt: u64,
    pub delivered_at_window: u64,
    pub delivered_counted: u64,
    pub delivered_imprecise: u64,
    /// Kick to return, summed and worst case.
    pub total_latency: Duration,
    pub max_latency: Duration,
}

impl AsyncDeliveryStats {
    fn delivered(&mut self, at: AsyncPosition, since: Instant) {
        let latency = since.elapsed();
        self.total_latency += latency;
        self.max_latency = self.max_latency.max(latency);
        match at {
            AsyncPosition::AfterIo => self.delivered_after_io += 1,
            AsyncPosition::Halt => self.delivered_at_halt += 1,
            AsyncPosition::InterruptWindow => self.delivered_at_window += 1,
            AsyncPosition::UserMode => self.delivered_user_mode += 1,
            AsyncPosition::Counted { .. } => self.delivered_counted += 1,
            AsyncPosition::Imprecise => self.delivered_imprecise += 1,
        }
    }

    pub fn delivered_total(&self) -> u64 {
        self.delivered_user_mode
            + self.delivered_after_io
            + self.delivered_at_halt
            + self.delivered_at_window
            + self.delivered_counted
            + self.delivered_imprecise
    }
}

#[derive(Debug, Clone, Copy)]
struct SwBreakpoint {
    gva: u64,
    gpa: u64,
    original: u8,
}

/// A breakpoint being stepped over: the vCPU resumes at a breakpoint address
/// without stopping there again.
#[derive(Debug, Clone, Copy)]
struct StepOver {
    /// An int3 byte to put back after the step.
    sw: Option<SwBreakpoint>,
}

/// Re-kicks a vCPU every [`USER_MODE_POLL`] while armed, so a kick that
/// found the guest in kernel mode notices when it reaches user mode.
struct Poller {
    shared: Arc<(Mutex<bool>, Condvar)>,
    quit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    fn spawn(kicker: VcpuKicker, id: usize) -> Result<Self> {
        let shared = Arc::new((Mutex::new(false), Condvar::new()));
        let quit = Arc::new(AtomicBool::new(false));
        let (s, q) = (shared.clone(), quit.clone());
        let thread = std::thread::Builder::new()
            .name(format!("kvm-vcpu{id}-poll"))
            .spawn(move || loop {
                {
                    let (armed, cv) = &*s;
                    let mut a = armed.lock().unwrap_or_else(|e| e.into_inner());
                    while !*a && !q.load(Ordering::SeqCst) {
                        a = cv.wait(a).unwrap_or_else(|e| e.into_inner());
                    }
                }
                if q.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(USER_MODE_POLL);
                kicker.nudge();
            })
            .map_err(|e| backend_err("spawn vCPU poll thread", e.to_string()))?;
        Ok(Self {
            shared,
            quit,
            thread: Some(thread),
        })
    }

    fn set_armed(&self, on: bool) {
        let (armed, cv) = &*self.shared;
        *armed.lock().unwrap_or_else(|e| e.into_inner()) = on;
        cv.notify_all();
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
        self.set_armed(false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one `KVM_RUN` ended with, once its borrowed exit data is consumed.
enum Step {
    Io,
    Halt,
    Window,
    Debug { exception: u32, pc: u64 },
    Shutdown,
    Interrupted,
}

/// One KVM vCPU. `Send`: move it to its own host thread for SMP.
pub struct KvmVcpu {
    id: usize,
    fd: VcpuFd,
    mem: GuestMemoryMmap,
    kicker: VcpuKicker,
    supported_cpuid: Arc<Vec<kvm_cpuid_entry2>>,
    cpuid_loaded: bool,
    mode: AsyncEventMode,
    counter: Option<GuestCounter>,
    window_requested: bool,
    /// PVM emulates guest ring 0 and does not exit when an emulated STI or
    /// POPF opens the interrupt window, so the window is found by single
    /// steps there (hardware KVM exits by itself, at the same instruction).
    window_by_single_step: bool,
    window_stepping: bool,
    single_step: bool,
    hw_breakpoints: Vec<u64>,
    sw_breakpoints: Arc<Mutex<Vec<SwBreakpoint>>>,
    step_over: Option<StepOver>,
    debug_dirty: bool,
    /// Set while a stop request waits for a deterministic point.
    waiting_since: Option<Instant>,
    poller: Option<Poller>,
    stats: AsyncDeliveryStats,
    last_async_position: Option<AsyncPosition>,
    budget_noted: bool,
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

    fn apply_debug(&mut self) -> Result<()> {
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

    fn write_guest_byte(&self, gpa: u64, byte: u8) -> Result<()> {
        self.mem.write_obj(byte, GuestAddress(gpa)).map_err(|e| {
            backend_err(
                "patch software breakpoint",
                format!("guest physical {gpa:#x}: {e}"),
            )
        })
    }

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

    fn current_cpl(&self) -> Result<u8> {
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(if sregs.cr0 & 1 == 0 {
            0
        } else {
            (sregs.cs.selector & 3) as u8
        })
    }

    fn stop_waiting(&mut self) {
        self.waiting_since = None;
        if let Some(p) = &self.poller {
            p.set_armed(false);
        }
    }

    /// Records a return to the engine at `at` if a stop request was waiting.
    fn deliver_point(&mut self, at: AsyncPosition) {
        if let Some(since) = self.waiting_since {
            self.stats.delivered(at, since);
            self.last_async_position = Some(at);
        }
        self.stop_waiting();
    }

    /// A kick arrived (`since`: when it was asked for), or a poll tick while
    /// one waits. Returns the exit to give the engine, if it is time.
    fn on_async(
        &mut self,
        bus: &mut dyn RunContext,
        new_kick: Option<Instant>,
    ) -> Result<Option<VmExit>> {
        if let Some(since) = new_kick {
            if !bus.stop_requested() {
                self.stats.spurious += 1;
                return Ok(None);
            }
            self.stats.requests += 1;
            self.waiting_since.get_or_insert(since);
        }
        let Some(since) = self.waiting_since else {
            return Ok(None);
        };
        if let AsyncEventMode::PmuCounted(_) = self.mode {
            let count = self.guest_event_count().unwrap_or(0);
            let at = AsyncPosition::Counted { count };
            self.stats.delivered(at, since);
            self.last_async_position = Some(at);
            self.stop_waiting();
            return Ok(Some(VmExit::IoStop));
        }
        if self.current_cpl()? == 3 {
            self.deliver_point(AsyncPosition::UserMode);
            return Ok(Some(VmExit::IoStop));
        }
        if since.elapsed() >= MAX_DETERMINISTIC_WAIT {
            tracing::warn!(
                "kvm vcpu{}: no deterministic point within {:?}; stopping where the guest is",
                self.id,
                MAX_DETERMINISTIC_WAIT
            );
            self.deliver_point(AsyncPosition::Imprecise);
            return Ok(Some(VmExit::IoStop));
        }
        if self.poller.is_none() {
            self.poller = Some(Poller::spawn(self.kicker.clone(), self.id)?);
        }
        if let Some(p) = &self.poller {
            p.set_armed(true);
        }
        Ok(None)
    }

    fn ensure_counter(&mut self) {
        if let (AsyncEventMode::PmuCounted(event), None) = (self.mode, &self.counter) {
            match GuestCounter::open(event) {
                Ok(c) => self.counter = Some(c),
                Err(e) => {
                    tracing::warn!("kvm vcpu{}: guest PMU counter failed to open ({e}); using deterministic points", self.id);
                    self.mode = AsyncEventMode::DeterministicPoints;
                }
            }
        }
    }

    fn run_loop(&mut self, bus: &mut dyn RunContext) -> Result<VmExit> {
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

    fn on_debug(&mut self, exception: u32, pc: u64) -> Result<Option<VmExit>> {
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
    fn prepare_step_over(&mut self) -> Result<()> {
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

    fn clear_sw_breakpoints(&mut self) -> Result<()> {
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
                if let Some(cr2) = cr2 {
                    let mut s = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                    s.cr2 = cr2;
                    self.fd.set_sregs(&s).map_err(kvm_err("KVM_SET_SREGS"))?;
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
