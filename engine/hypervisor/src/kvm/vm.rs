// SPDX-License-Identifier: GPL-2.0-or-later
//! The KVM VM: opening `/dev/kvm`, registering guest memory, the host's
//! features for the guest, creating vCPUs; and the INIT/SIPI start state.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_cpuid_entry2, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::async_delivery::AsyncDeliveryStats;
use super::debug::SwBreakpoint;
use super::{backend_err, kvm_err, BACKEND};
use super::{detect, AsyncEventMode, HostFeatures, KvmAvailability, KvmVcpu, VcpuKicker};
use crate::{HypervisorError, Regs, Result, Sregs, Vcpu, Vm};

/// Where the TSS for VMX real-mode emulation lives: three pages just below
/// the BIOS area, as QEMU and Firecracker place it. Guest RAM never reaches
/// there in the machine model.
const VMX_TSS_ADDR: usize = 0xfffb_d000;

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

    /// Positions asynchronous events of vCPUs created from now on by
    /// deterministic points even where a PMU exists, so the no-PMU policy
    /// can be checked on any host.
    pub fn use_deterministic_points(&mut self) {
        self.mode = AsyncEventMode::DeterministicPoints;
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
