// SPDX-License-Identifier: GPL-2.0-or-later
//! Selftest-style guests, after Linux's tools/testing/selftests/kvm: tiny
//! 64-bit programs assembled inside the test (iced-x86), with the page
//! tables, GDT, TSS and IDT a kernel would set up written by the harness.
//! The same image runs on every CPU backend; what the guest does is observed
//! only through the I/O bus and the exits, so observations compare across
//! backends.
//!
//! Guest-physical layout (one identity-mapped 2 MiB page, user-accessible so
//! ring-3 code can live next to the kernel code):
//!   0x1000 PML4, 0x2000 PDPT, 0x3000 PD (0-2 MiB), 0x7000 PD (3-4 GiB: MMIO)
//!   0x4000 GDT, 0x5000 IDT, 0x6000 TSS, 0x8000 AP real-mode trampoline
//!   0x9000 SMP flag, 0x9100 post-interrupt action pointer, 0xa000 PDPT
//!   for the kernel alias of the first 2 MiB at 0xffffffff80000000
//!   0xe000 interrupt stubs (32 bytes each), 0xf000 post-interrupt actions
//!   0x10000 program, 0x60000 user stack, 0x80000 kernel stack,
//!   0x90000 ring-0 stack for interrupts from ring 3 (TSS.RSP0)

#![allow(dead_code)]

#[path = "kvm_required.rs"]
mod kvm_required;
#[allow(unused_imports)] // not every test binary skips by hand
pub use kvm_required::{kvm_usable, skip_kvm};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use krr_engine::devices::lapic::{self, ApEvent, ApicOutput, LocalApic};
use krr_engine::hypervisor::{DescriptorTable, IoBus, Regs, RunEvents, Segment, Vcpu, Vm, VmExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 2 << 20;
pub const PML4: u64 = 0x1000;
pub const GDT: u64 = 0x4000;
pub const IDT: u64 = 0x5000;
pub const TSS: u64 = 0x6000;
pub const AP_TRAMPOLINE: u64 = 0x8000;
pub const SMP_FLAG: u64 = 0x9000;
pub const PDPT_HIGH: u64 = 0xa000;
/// The same 2 MiB again at the top of the address space, where a Linux
/// kernel lives. PVM only accepts SYSCALL entry points up there.
pub const KERNEL_ALIAS: u64 = 0xffff_ffff_8000_0000;
pub const POST_INTERRUPT_PTR: u64 = 0x9100;
pub const STUBS: u64 = 0xe000;
pub const STUB_SIZE: u64 = 32;
pub const POST_IRETQ: u64 = 0xf000;
pub const POST_HALT: u64 = 0xf010;
pub const PROGRAM: u64 = 0x10000;
pub const USER_STACK: u64 = 0x60000;
pub const KERNEL_STACK: u64 = 0x80000;
pub const RSP0: u64 = 0x90000;
/// MMIO test device, and the xAPIC page.
pub const MMIO_DEV: u64 = 0xd000_0000;
pub const APIC_BASE: u64 = 0xfee0_0000;

// Linux's x86-64 GDT layout (PVM expects Linux's selectors for SYSCALL).
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER32_CS: u16 = 0x20 | 3;
pub const USER_DS: u16 = 0x28 | 3;
pub const USER_CS: u16 = 0x30 | 3;
pub const TSS_SEL: u16 = 0x40;
const GDT_ENTRIES: u64 = 10;

/// Ports the guest programs report on.
pub const PORT_MARK: u16 = 0x10;
pub const PORT_VECTOR: u16 = 0x11;
pub const PORT_FRAME_CS: u16 = 0x12;
pub const PORT_VALUE: u16 = 0x13;
pub const PORT_IN: u16 = 0x14;
pub const PORT_AP: u16 = 0x15;
pub const PORT_TICK: u16 = 0x16;

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_SFMASK: u32 = 0xc000_0084;

/// Something the guest did that the bus saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    PioWrite { vcpu: usize, port: u16, value: u64 },
    PioRead { vcpu: usize, port: u16, value: u64 },
    MmioWrite { vcpu: usize, addr: u64, value: u64 },
    MmioRead { vcpu: usize, addr: u64, value: u64 },
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len()].copy_from_slice(data);
    u64::from_le_bytes(b)
}

/// AP start-up events `(vcpu, event)` raised by the local APICs, shared
/// between the vCPU threads.
pub type SharedApEvents = Arc<Mutex<Vec<(usize, ApEvent)>>>;

/// The machine model of the selftests: records every access, answers port
/// and MMIO reads from fixed values, CPUID from a small fixed table that
/// every host KVM supports, and routes the xAPIC page to the engine's local
/// APIC model so INIT/SIPI goes through it.
pub struct TestBus {
    pub events: Vec<Event>,
    pub pio_in: HashMap<u16, u32>,
    pub mmio_in: HashMap<u64, u64>,
    /// Ask the vCPU to stop after this port write (port, value).
    pub stop_after_write: Option<(u16, u64)>,
    /// Set by a test thread to request a stop (a "timer" that fired).
    pub stop_flag: Arc<AtomicBool>,
    pub apics: Option<Arc<Mutex<Vec<LocalApic>>>>,
    /// AP events the local APIC model produced, per target vCPU.
    pub ap_events: Option<SharedApEvents>,
    pub tsc: u64,
}

impl Default for TestBus {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            pio_in: HashMap::from([(PORT_IN, 0xcafe_babe)]),
            mmio_in: HashMap::from([(MMIO_DEV + 8, 0x600d)]),
            stop_after_write: None,
            stop_flag: Arc::default(),
            apics: None,
            ap_events: None,
            tsc: 0,
        }
    }
}

impl TestBus {
    pub fn writes_to(&self, port: u16) -> Vec<u64> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::PioWrite { port: p, value, .. } if *p == port => Some(*value),
                _ => None,
            })
            .collect()
    }
}

impl IoBus for TestBus {
    fn pio_read(&mut self, vcpu: usize, port: u16, data: &mut [u8]) {
        let v = self.pio_in.get(&port).copied().unwrap_or(0xffff_ffff);
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        self.events.push(Event::PioRead {
            vcpu,
            port,
            value: le(data),
        });
    }

    fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]) {
        let value = le(data);
        self.events.push(Event::PioWrite { vcpu, port, value });
    }

    fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8]) {
        if let (Some(apics), true) = (&self.apics, (APIC_BASE..APIC_BASE + 0x1000).contains(&addr))
        {
            let apics = apics.lock().unwrap();
            apics[vcpu]
                .read(addr - APIC_BASE, data, 0)
                .expect("guest APIC read");
        } else {
            let v = self.mmio_in.get(&addr).copied().unwrap_or(u64::MAX);
            data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        }
        self.events.push(Event::MmioRead {
            vcpu,
            addr,
            value: le(data),
        });
    }

    fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8]) {
        self.events.push(Event::MmioWrite {
            vcpu,
            addr,
            value: le(data),
        });
        if let (Some(apics), true) = (&self.apics, (APIC_BASE..APIC_BASE + 0x1000).contains(&addr))
        {
            let mut apics = apics.lock().unwrap();
            let out = apics[vcpu]
                .write(addr - APIC_BASE, data, 0)
                .expect("guest APIC write");
            if let Some(ApicOutput::Ipi(msg)) = out {
                for target in lapic::deliver(&mut apics, Some(vcpu), &msg) {
                    while let Some(ev) = apics[target].take_ap_event() {
                        if let Some(q) = &self.ap_events {
                            q.lock().unwrap().push((target, ev));
                        }
                    }
                }
            }
        }
    }

    fn cpuid(&mut self, vcpu: usize, leaf: u32, _subleaf: u32) -> [u32; 4] {
        // "KRRSelftest!" and a feature set every x86-64 KVM host gives:
        // FPU TSC MSR PAE CX8 APIC SEP PGE CMOV PAT FXSR SSE SSE2; no
        // x2APIC, no TSC-deadline (the APIC is in user space).
        match leaf {
            0 => [1, 0x5352_524b, 0x2174_7365, 0x6c65_7466],
            1 => [0x0006_0f00, (vcpu as u32) << 24, 0, 0x0701_a371],
            0x8000_0000 => [0x8000_0001, 0, 0, 0],
            // SYSCALL, NX, LM.
            0x8000_0001 => [0, 0, 0, 0x2010_0800],
            _ => [0; 4],
        }
    }

    fn rdtsc(&mut self, _vcpu: usize) -> u64 {
        self.tsc += 1000;
        self.tsc
    }
}

impl RunEvents for TestBus {
    fn stop_requested(&self) -> bool {
        let after_marked_write = matches!(
            (self.events.last(), self.stop_after_write),
            (Some(Event::PioWrite { port, value, .. }), Some(stop)) if (*port, *value) == stop
        );
        after_marked_write || self.stop_flag.load(Ordering::SeqCst)
    }
}

/// A 2 MiB guest with the page tables, GDT, TSS, IDT and interrupt stubs.
pub fn guest_memory() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let w64 = |addr: u64, v: u64| mem.write_obj(v, GuestAddress(addr)).unwrap();
    // Page tables: 0-2 MiB as one user-accessible large page; the MMIO
    // device and the APIC page as uncached supervisor large pages.
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    const PCD_PWT: u64 = 0x18;
    w64(PML4, 0x2000 | P_RW_US);
    w64(0x2000, 0x3000 | P_RW_US);
    w64(0x2000 + 3 * 8, 0x7000 | P_RW_US);
    w64(PML4 + 511 * 8, PDPT_HIGH | 0x3);
    w64(PDPT_HIGH + 510 * 8, 0x3000 | 0x3);
    w64(0x3000, PS | P_RW_US);
    for base in [MMIO_DEV, APIC_BASE] {
        let index = (base - 0xc000_0000) >> 21;
        w64(0x7000 + index * 8, (base & !0x1f_ffff) | PS | PCD_PWT | 0x3);
    }
    // GDT.
    let tss_low = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
    for (i, d) in [
        0u64,
        0x00cf_9b00_0000_ffff, // 0x08 kernel code, 32-bit
        0x00af_9b00_0000_ffff, // 0x10 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x18 kernel data
        0x00cf_fb00_0000_ffff, // 0x20 user code, 32-bit (SYSRET base)
        0x00cf_f300_0000_ffff, // 0x28 user data
        0x00af_fb00_0000_ffff, // 0x30 user code, 64-bit
        0,                     // 0x38
        tss_low,               // 0x40 TSS (16 bytes)
        TSS >> 32,
    ]
    .iter()
    .enumerate()
    {
        w64(GDT + 8 * i as u64, *d);
    }
    // TSS: RSP0, and the I/O bitmap offset past the limit (no bitmap).
    w64(TSS + 4, RSP0);
    mem.write_obj(104u16, GuestAddress(TSS + 0x66)).unwrap();
    // IDT: every vector to its stub, 64-bit interrupt gates.
    for v in 0..256u64 {
        let handler = STUBS + v * STUB_SIZE;
        let low = (handler & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (0x8e << 40)
            | (((handler >> 16) & 0xffff) << 48);
        w64(IDT + v * 16, low);
        w64(IDT + v * 16 + 8, handler >> 32);
        let stub = assemble(64, handler, |a, _| {
            // Report the vector and the interrupted CS, then the action the
            // program chose (return, or halt for good).
            a.push(rax)?;
            a.mov(eax, v as u32)?;
            a.out(i32::from(PORT_VECTOR), eax)?;
            a.mov(rax, qword_ptr(rsp + 16))?;
            a.out(i32::from(PORT_FRAME_CS), eax)?;
            a.pop(rax)?;
            a.jmp(qword_ptr(POST_INTERRUPT_PTR))?;
            Ok(())
        });
        assert!(
            stub.code.len() as u64 <= STUB_SIZE,
            "interrupt stub too long"
        );
        mem.write_slice(&stub.code, GuestAddress(handler)).unwrap();
    }
    let iret = assemble(64, POST_IRETQ, |a, _| a.iretq());
    mem.write_slice(&iret.code, GuestAddress(POST_IRETQ))
        .unwrap();
    let halt = assemble(64, POST_HALT, |a, _| {
        a.cli()?;
        let mut again = a.create_label();
        a.set_label(&mut again)?;
        a.hlt()?;
        a.jmp(again)
    });
    mem.write_slice(&halt.code, GuestAddress(POST_HALT))
        .unwrap();
    set_post_interrupt(&mem, POST_IRETQ);
    mem
}

/// What the interrupt stubs do after reporting: `POST_IRETQ` or `POST_HALT`.
pub fn set_post_interrupt(mem: &GuestMemoryMmap, action: u64) {
    mem.write_obj(action, GuestAddress(POST_INTERRUPT_PTR))
        .unwrap();
}

/// Labels of an assembled program, by name.
#[derive(Default)]
pub struct Labels {
    pending: Vec<(&'static str, CodeLabel)>,
}

impl Labels {
    /// Creates a label and places it at the current position.
    pub fn new_label(
        &mut self,
        a: &mut CodeAssembler,
        name: &'static str,
    ) -> Result<CodeLabel, iced_x86::IcedError> {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        self.pending.push((name, l));
        Ok(l)
    }

    /// Names a label created and placed by the program itself.
    pub fn name(&mut self, name: &'static str, label: CodeLabel) {
        self.pending.push((name, label));
    }
}

pub struct Program {
    pub code: Vec<u8>,
    pub base: u64,
    pub labels: HashMap<&'static str, u64>,
}

impl Program {
    pub fn at(&self, name: &str) -> u64 {
        *self
            .labels
            .get(name)
            .unwrap_or_else(|| panic!("no label {name}"))
    }

    pub fn load(&self, mem: &GuestMemoryMmap) {
        mem.write_slice(&self.code, GuestAddress(self.base))
            .unwrap();
    }
}

/// Assembles `body` for `bits`-bit mode at `base`.
pub fn assemble(
    bits: u32,
    base: u64,
    body: impl FnOnce(&mut CodeAssembler, &mut Labels) -> Result<(), iced_x86::IcedError>,
) -> Program {
    let mut a = CodeAssembler::new(bits).unwrap();
    let mut labels = Labels::default();
    body(&mut a, &mut labels).unwrap();
    let r = a
        .assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let labels = labels
        .pending
        .iter()
        .map(|(n, l)| (*n, r.label_ip(l).unwrap()))
        .collect();
    Program {
        code: r.inner.code_buffer,
        base,
        labels,
    }
}

fn code64(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_: 11,
        present: true,
        dpl,
        db: false,
        s: true,
        l: true,
        g: true,
        avl: false,
        unusable: false,
    }
}

fn data(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_: 3,
        present: true,
        dpl,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// 64-bit ring-0 state at `entry`, with syscall MSRs pointing at `lstar`.
pub fn enter_long_mode(vcpu: &mut dyn Vcpu, entry: u64, lstar: Option<u64>) {
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs = code64(KERNEL_CS, 0);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = data(KERNEL_DS, 0);
    }
    sregs.tr = Segment {
        selector: TSS_SEL,
        base: TSS,
        limit: 0x67,
        type_: 11,
        present: true,
        ..Segment::default()
    };
    sregs.ldt = Segment {
        type_: 2,
        unusable: true,
        ..Segment::default()
    };
    sregs.gdt = DescriptorTable {
        base: GDT,
        limit: (GDT_ENTRIES * 8 - 1) as u16,
    };
    sregs.idt = DescriptorTable {
        base: IDT,
        limit: 256 * 16 - 1,
    };
    // PE MP ET NE WP PG; PAE OSFXSR OSXMMEXCPT; LME LMA SCE.
    sregs.cr0 = 0x8005_0033;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x620;
    sregs.efer = 0x501;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&Regs {
        rip: entry,
        rsp: KERNEL_STACK,
        rflags: 0x2,
        ..Regs::default()
    })
    .unwrap();
    if let Some(lstar) = lstar {
        vcpu.set_msr(
            MSR_STAR,
            (u64::from(USER32_CS) << 48) | (u64::from(KERNEL_CS) << 32),
        )
        .unwrap();
        vcpu.set_msr(MSR_LSTAR, lstar).unwrap();
        vcpu.set_msr(MSR_SFMASK, 0x200).unwrap();
    }
}

/// Emits the ring-0 to ring-3 transfer: an `iretq` frame for `user_entry`
/// with interrupts enabled.
pub fn emit_iretq_to_user(
    a: &mut CodeAssembler,
    user_entry: CodeLabel,
) -> Result<(), iced_x86::IcedError> {
    a.push(i32::from(USER_DS))?;
    a.push(USER_STACK as i32)?;
    a.push(0x202i32)?;
    a.push(i32::from(USER_CS))?;
    a.lea(rax, ptr(user_entry))?;
    a.push(rax)?;
    a.iretq()
}

/// Which CPU backend a selftest runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Kvm,
    Software,
}

/// The VM for `kind`, or `None` (with the SKIPPED line, or a failure
/// under `KRR_TEST_REQUIRE_KVM`) where `/dev/kvm` is absent. PVM is used: it is a real KVM API, only slow in ring 0.
pub fn make_vm(kind: BackendKind, mem: &GuestMemoryMmap) -> Option<Box<dyn Vm>> {
    let mut vm: Box<dyn Vm> = match kind {
        BackendKind::Kvm => {
            if !kvm_usable() {
                return None;
            }
            Box::new(krr_engine::hypervisor::kvm::KvmVm::new(mem).expect("KVM VM"))
        }
        BackendKind::Software => {
            Box::new(krr_engine::hypervisor::unicorn::UnicornVm::new(mem).expect("software VM"))
        }
    };
    vm.add_mmio_region(MMIO_DEV, 0x1000).unwrap();
    vm.add_mmio_region(APIC_BASE, 0x1000).unwrap();
    Some(vm)
}

/// An exit as observed: the kind, and RIP where it matters for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Exit(VmExit),
    ExitAt(VmExit, u64),
}

/// Runs until an exit that is not a budget slice (the software CPU returns
/// `BudgetExhausted` when given a budget; KVM never does).
pub fn run_to_exit(vcpu: &mut dyn Vcpu, bus: &mut TestBus) -> VmExit {
    loop {
        match vcpu.run(bus, Some(1_000_000)).expect("vcpu run") {
            VmExit::BudgetExhausted => continue,
            e => return e,
        }
    }
}
