// SPDX-License-Identifier: GPL-2.0-or-later
//! Exception and interrupt delivery of the software CPU, on tiny long-mode
//! guests assembled with iced-x86: page fault (error code, CR2), #GP, int3,
//! IST stacks, user-to-kernel transitions (RSP0), SYSCALL, a nested
//! interrupt, a double fault, and instruction budgets.

use iced_x86::code_asm::*;
use krr_engine::hypervisor::unicorn::UnicornVm;
use krr_engine::hypervisor::{Injection, IoBus, RunEvents, Segment, Vcpu, Vm, VmExit};
use krr_engine::machine::boot::long_mode_state;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GDT: u64 = 0x500;
const TSS: u64 = 0x1000;
const IDT: u64 = 0x2000;
const IST1_TOP: u64 = 0x6000;
const IST2_TOP: u64 = 0x5000;
const KSTACK_TOP: u64 = 0x7000;
const USTACK_TOP: u64 = 0x8000;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CODE: u64 = 0x10000;
const HANDLERS: u64 = 0x11000;
const UNMAPPED: u64 = 0x1_0000_0000;

/// No devices; the exceptions delivered, with their positions and
/// payloads (CR2 or DR6).
#[derive(Default)]
struct NullBus {
    exceptions: Vec<(u8, u64, Option<u64>)>,
}

impl IoBus for NullBus {
    fn pio_read(&mut self, _: usize, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&mut self, _: usize, _: u16, _: &[u8]) {}
    fn mmio_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _: usize, _: u64, _: &[u8]) {}
    fn cpuid(&mut self, _: usize, _: u32, _: u32) -> [u32; 4] {
        [0; 4]
    }
    fn rdtsc(&mut self, _: usize) -> u64 {
        0
    }
}

impl RunEvents for NullBus {
    fn exception(
        &mut self,
        _: usize,
        at: krr_engine::hypervisor::Position,
        e: &krr_engine::hypervisor::DeliveredException,
    ) {
        self.exceptions.push((e.vector, at.icount, e.cr2));
    }
}

fn handler(vector: u8) -> u64 {
    HANDLERS + vector as u64 * 16
}

struct Guest {
    mem: GuestMemoryMmap,
    // Declared after `mem` is irrelevant for drop order of the VM: the VM
    // and vCPU are dropped explicitly first in `Drop`.
    vm: Option<UnicornVm>,
    vcpu: Option<Box<dyn Vcpu>>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.vcpu.take();
        self.vm.take();
    }
}

fn assemble(ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

impl Guest {
    /// A 16 MiB guest with GDT, TSS (RSP0, IST1, IST2), an IDT whose every
    /// vector points at a `hlt` stub, identity page tables (user
    /// accessible) and `code` at [`CODE`], started at CPL `cpl`.
    fn new(code: &[u8], cpl: u8) -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let gdt: [u64; 10] = [
            0,
            0,
            0x00af_9b00_0000_ffff, // 0x10 kernel code
            0x00cf_9300_0000_ffff, // 0x18 kernel data
            0,
            0x00cf_f300_0000_ffff, // 0x28 user data
            0x00af_fb00_0000_ffff, // 0x30 user code
            0,
            0x0000_8900_0000_0067 | (TSS & 0xff_ffff) << 16, // 0x40 TSS
            0,
        ];
        for (i, d) in gdt.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)).unwrap();
        }
        mem.write_obj(KSTACK_TOP, GuestAddress(TSS + 4)).unwrap();
        mem.write_obj(IST1_TOP, GuestAddress(TSS + 0x24)).unwrap();
        mem.write_obj(IST2_TOP, GuestAddress(TSS + 0x2c)).unwrap();
        // IST3: an unmapped stack, for the double-fault test.
        mem.write_obj(UNMAPPED + 0x1000, GuestAddress(TSS + 0x34))
            .unwrap();
        let g = Guest {
            mem,
            vm: None,
            vcpu: None,
        };
        for v in 0..=255u8 {
            g.set_gate(v, 0, 0, 0xe);
            g.mem
                .write_slice(&[0xf4, 0xeb, 0xfd], GuestAddress(handler(v)))
                .unwrap();
        }
        g.mem.write_obj(PDPT | 7, GuestAddress(PML4)).unwrap();
        for i in 0..4u64 {
            g.mem
                .write_obj((PD + i * 0x1000) | 7, GuestAddress(PDPT + i * 8))
                .unwrap();
        }
        for i in 0..2048u64 {
            g.mem
                .write_obj((i << 21) | 0x87, GuestAddress(PD + i * 8))
                .unwrap();
        }
        g.mem.write_slice(code, GuestAddress(CODE)).unwrap();
        let mut g = g;
        let mut vm = UnicornVm::new(&g.mem).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let (mut regs, mut sregs) = long_mode_state(CODE, 0);
        sregs.cr3 = PML4;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.idt.base = IDT;
        sregs.idt.limit = 0xfff;
        sregs.tr = Segment {
            selector: 0x40,
            base: TSS,
            limit: 0x67,
            type_: 0xb,
            present: true,
            ..Default::default()
        };
        regs.rsp = KSTACK_TOP;
        if cpl == 3 {
            sregs.cs.selector = 0x33;
            sregs.cs.dpl = 3;
            for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
                s.selector = 0x2b;
                s.dpl = 3;
            }
            regs.rsp = USTACK_TOP;
        }
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&regs).unwrap();
        g.vm = Some(vm);
        g.vcpu = Some(vcpu);
        g
    }

    fn set_gate(&self, vector: u8, dpl: u8, ist: u8, ty: u8) {
        let h = handler(vector);
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(h as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        gate[4] = ist;
        gate[5] = 0x80 | (dpl << 5) | ty;
        gate[6..8].copy_from_slice(&((h >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((h >> 32) as u32).to_le_bytes());
        self.mem
            .write_slice(&gate, GuestAddress(IDT + vector as u64 * 16))
            .unwrap();
    }

    fn vcpu(&mut self) -> &mut Box<dyn Vcpu> {
        self.vcpu.as_mut().unwrap()
    }

    fn run(&mut self, budget: u64) -> VmExit {
        self.vcpu()
            .run(&mut NullBus::default(), Some(budget))
            .unwrap()
    }

    /// Runs to the `hlt` of a handler; returns its vector.
    fn run_to_handler(&mut self) -> u8 {
        let exit = self.run(1_000_000);
        assert_eq!(exit, VmExit::Hlt);
        let rip = self.vcpu().regs().unwrap().rip;
        assert!(rip > HANDLERS && rip <= HANDLERS + 256 * 16, "rip {rip:#x}");
        ((rip - 1 - HANDLERS) / 16) as u8
    }

    fn stack(&self, n: usize) -> Vec<u64> {
        let stack_ptr = self.vcpu.as_ref().unwrap().regs().unwrap().rsp;
        (0..n)
            .map(|i| {
                self.mem
                    .read_obj(GuestAddress(stack_ptr + 8 * i as u64))
                    .unwrap()
            })
            .collect()
    }
}

#[test]
fn page_fault_pushes_error_code_and_sets_cr2() {
    let code = assemble(CODE, |a| {
        a.mov(rax, qword_ptr(UNMAPPED))?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 0);
    assert_eq!(g.run_to_handler(), 14);
    let sregs = g.vcpu().sregs().unwrap();
    assert_eq!(sregs.cr2, UNMAPPED);
    let f = g.stack(6);
    assert_eq!(f[0], 0, "error code: not present, read, supervisor");
    assert_eq!(f[1], CODE, "faulting RIP");
    assert_eq!(f[2], 0x10);
    assert_eq!(f[4], KSTACK_TOP);
    assert_eq!(f[5], 0x18);
    assert_eq!(g.vcpu().regs().unwrap().rsp, KSTACK_TOP - 48);

    let code = assemble(CODE, |a| {
        a.mov(qword_ptr(UNMAPPED + 8), rax)?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 0);
    assert_eq!(g.run_to_handler(), 14);
    assert_eq!(g.stack(1)[0], 2, "error code: write");
    assert_eq!(g.vcpu().sregs().unwrap().cr2, UNMAPPED + 8);
}

#[test]
fn a_debug_exception_carries_dr6_and_its_injection_sets_it() {
    // User code sets TF: the instruction after POPF traps with DR6.BS. The
    // kernel's #DB handler branches on DR6, so a recording logs it and
    // replay's injection restores it.
    let code = assemble(CODE, |a| {
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        a.nop()?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 3);
    let mut bus = NullBus::default();
    let exit = g.vcpu().run(&mut bus, Some(1_000)).unwrap();
    assert_eq!(exit, VmExit::Hlt);
    let debug: Vec<_> = bus.exceptions.iter().filter(|e| e.0 == 1).collect();
    assert_eq!(debug.len(), 1, "{:?}", bus.exceptions);
    let recorded = debug[0].2.expect("a #DB's DR6");
    assert_ne!(
        recorded & 0x4000,
        0,
        "DR6.BS after a single step: {recorded:#x}"
    );
    assert_eq!(recorded, g.vcpu().debug_regs().unwrap().dr6);

    let spin = assemble(CODE, |a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.jmp(spin)
    });
    let mut g = Guest::new(&spin, 0);
    assert_eq!(g.run(100), VmExit::BudgetExhausted);
    g.vcpu()
        .inject(Injection::Exception {
            vector: 1,
            error_code: None,
            cr2: Some(0xffff_4ff1),
        })
        .unwrap();
    assert_eq!(g.run_to_handler(), 1);
    assert_eq!(g.vcpu().debug_regs().unwrap().dr6, 0xffff_4ff1);
    assert_ne!(g.vcpu().sregs().unwrap().cr2, 0xffff_4ff1);
}

#[test]
fn general_protection_on_non_canonical_address() {
    let code = assemble(CODE, |a| {
        a.mov(rax, 0x8000_0000_0000_0000u64)?;
        a.mov(rbx, qword_ptr(rax))?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 0);
    assert_eq!(g.run_to_handler(), 13);
    let f = g.stack(2);
    assert_eq!(f[0], 0);
    assert_eq!(f[1], CODE + 10, "RIP of the faulting load");
}

#[test]
fn int3_is_a_trap_without_error_code() {
    let code = assemble(CODE, |a| {
        a.nop()?;
        a.int3()?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 0);
    assert_eq!(g.run_to_handler(), 3);
    let f = g.stack(5);
    assert_eq!(f[0], CODE + 2, "RIP after int3");
    assert_eq!(f[1], 0x10);
    assert_eq!(f[3], KSTACK_TOP);
    assert_eq!(g.vcpu().regs().unwrap().rsp, KSTACK_TOP - 40);
}

#[test]
fn ist_gate_switches_stack() {
    let code = assemble(CODE, |a| a.int3());
    let g = Guest::new(&code, 0);
    g.set_gate(3, 0, 1, 0xe);
    let mut g = g;
    assert_eq!(g.run_to_handler(), 3);
    assert_eq!(g.vcpu().regs().unwrap().rsp, IST1_TOP - 40);
    assert_eq!(g.stack(4)[3], KSTACK_TOP, "interrupted RSP");
}

#[test]
fn user_to_kernel_uses_rsp0_and_checks_gate_dpl() {
    let code = assemble(CODE, |a| {
        a.int(0x80)?;
        a.hlt()
    });
    let g = Guest::new(&code, 3);
    g.set_gate(0x80, 3, 0, 0xf);
    let mut g = g;
    assert_eq!(g.run_to_handler(), 0x80);
    let s = g.vcpu().sregs().unwrap();
    assert_eq!(s.cs.selector, 0x10);
    assert_eq!(s.cs.dpl, 0);
    assert_eq!(s.ss.dpl, 0, "CPL 0 after the transition");
    assert_eq!(g.vcpu().regs().unwrap().rsp, KSTACK_TOP - 40);
    let f = g.stack(5);
    assert_eq!(f, vec![CODE + 2, 0x33, f[2], USTACK_TOP, 0x2b]);

    // The same from a gate with DPL 0: #GP with the IDT error code.
    let code = assemble(CODE, |a| a.int(0x81));
    let mut g = Guest::new(&code, 3);
    assert_eq!(g.run_to_handler(), 13);
    assert_eq!(g.stack(1)[0], 0x81 * 8 + 2);
}

#[test]
fn syscall_enters_kernel_from_star_lstar() {
    let code = assemble(CODE, |a| {
        a.syscall()?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 3);
    let v = g.vcpu();
    v.set_msr(0xc000_0080, 0x501).unwrap(); // EFER: SCE | LME | LMA
    v.set_msr(0xc000_0081, 0x10u64 << 32).unwrap();
    v.set_msr(0xc000_0082, handler(0xf0)).unwrap();
    v.set_msr(0xc000_0084, 0x200).unwrap();
    let mut r = v.regs().unwrap();
    r.rflags = 0x202;
    v.set_regs(&r).unwrap();
    assert_eq!(g.run_to_handler(), 0xf0);
    let r = g.vcpu().regs().unwrap();
    assert_eq!(r.rcx, CODE + 2);
    assert_eq!(r.r11 & 0x200, 0x200, "saved RFLAGS");
    assert_eq!(r.rflags & 0x200, 0, "IF masked by FMASK");
    let s = g.vcpu().sregs().unwrap();
    assert_eq!((s.cs.selector, s.cs.dpl, s.ss.selector), (0x10, 0, 0x18));
}

#[test]
fn nested_external_interrupt_and_exception() {
    let code = assemble(CODE, |a| {
        let mut spin = a.create_label();
        a.sti()?;
        a.set_label(&mut spin)?;
        a.jmp(spin)
    });
    let mut g = Guest::new(&code, 0);
    // Handler 0x40 raises int3 before halting.
    let h40 = assemble(handler(0x40), |a| {
        a.int3()?;
        a.hlt()
    });
    g.mem
        .write_slice(&h40, GuestAddress(handler(0x40)))
        .unwrap();
    assert_eq!(g.run(10_000), VmExit::BudgetExhausted);
    assert!(g.vcpu().interrupt_window_open().unwrap());
    g.vcpu().inject(Injection::Interrupt(0x40)).unwrap();
    assert_eq!(g.run_to_handler(), 3);
    let f = g.stack(10);
    assert_eq!(
        f[0],
        handler(0x40) + 1,
        "int3 frame: RIP in the 0x40 handler"
    );
    assert_eq!(f[2] & 0x200, 0, "interrupt gate cleared IF");
    // The int3 frame starts 16-byte aligned: one padding word in between.
    assert_eq!(
        f[3],
        KSTACK_TOP - 40,
        "int3 frame: RSP inside the 0x40 handler"
    );
    assert_eq!(f[6], CODE + 1, "interrupt frame: RIP of the spin loop");
    assert_eq!(f[8] & 0x200, 0x200, "IF was set when interrupted");
}

#[test]
fn fault_while_delivering_becomes_double_fault() {
    let code = assemble(CODE, |a| a.mov(rax, qword_ptr(UNMAPPED)));
    let g = Guest::new(&code, 0);
    // #PF on an unmapped IST stack; #DF on a good one.
    g.set_gate(14, 0, 3, 0xe);
    g.set_gate(8, 0, 2, 0xe);
    let mut g = g;
    assert_eq!(g.run_to_handler(), 8);
    assert_eq!(g.vcpu().regs().unwrap().rsp, IST2_TOP - 48);
    assert_eq!(g.stack(1)[0], 0, "double fault error code");
}

#[test]
fn triple_fault_shuts_down() {
    let code = assemble(CODE, |a| a.mov(rax, qword_ptr(UNMAPPED)));
    let g = Guest::new(&code, 0);
    g.set_gate(14, 0, 3, 0xe);
    g.set_gate(8, 0, 3, 0xe);
    let mut g = g;
    assert_eq!(g.run(1_000_000), VmExit::Shutdown);
}

#[test]
fn budget_stops_a_spinning_guest_deterministically() {
    let code = assemble(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.inc(rbx)?;
        a.jmp(top)
    });
    let counts: Vec<(u64, u64)> = (0..2)
        .map(|_| {
            let mut g = Guest::new(&code, 0);
            assert_eq!(g.run(100_000), VmExit::BudgetExhausted);
            let n = g.vcpu().instructions_retired().unwrap();
            (n, g.vcpu().regs().unwrap().rax)
        })
        .collect();
    assert_eq!(counts[0], counts[1]);
    let (n, incs) = counts[0];
    // The stop lands on a block boundary at or after the budget.
    assert!((100_000..100_000 + 64).contains(&n), "{n}");
    // Three instructions per iteration, two of them increment RAX/RBX.
    assert!(incs * 3 <= n && n <= incs * 3 + 3, "rax {incs} n {n}");
}

/// A spinlock's wait loop: load a flag nobody sets, PAUSE, test, loop.
fn pause_loop() -> Vec<u8> {
    assemble(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(eax, dword_ptr(0x12000u64))?;
        a.pause()?;
        a.test(eax, eax)?;
        a.jz(top)
    })
}

#[test]
fn a_kernel_pause_loop_yields_the_turn_when_asked() {
    let runs: Vec<(VmExit, u64)> = (0..2)
        .map(|_| {
            let mut g = Guest::new(&pause_loop(), 0);
            g.vcpu().set_yield_on_spin(true).unwrap();
            let exit = g.run(1_000_000);
            (exit, g.vcpu().instructions_retired().unwrap())
        })
        .collect();
    assert_eq!(runs[0], runs[1], "the spin stop is deterministic");
    let (exit, n) = runs[0];
    assert_eq!(exit, VmExit::Spin);
    // 64 turns of the loop's one block (4 instructions), not the budget.
    assert!((4 * 60..=4 * 70).contains(&n), "{n} instructions");
    // The next run goes on spinning from where the last one stopped.
    let mut g = Guest::new(&pause_loop(), 0);
    g.vcpu().set_yield_on_spin(true).unwrap();
    assert_eq!(g.run(1_000_000), VmExit::Spin);
    assert_eq!(g.run(1_000_000), VmExit::Spin);
    let n2 = g.vcpu().instructions_retired().unwrap();
    assert!(n2 > n, "{n2} after two runs, {n} after one");
}

#[test]
fn a_pause_loop_runs_its_budget_without_yield_or_in_user_mode() {
    let mut g = Guest::new(&pause_loop(), 0);
    assert_eq!(g.run(100_000), VmExit::BudgetExhausted);
    // User code is preempted by the timer, not by the spin stop.
    let mut g = Guest::new(&pause_loop(), 3);
    g.vcpu().set_yield_on_spin(true).unwrap();
    assert_eq!(g.run(100_000), VmExit::BudgetExhausted);
    // A kernel loop without PAUSE does work: no stop either.
    let busy = assemble(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.jmp(top)
    });
    let mut g = Guest::new(&busy, 0);
    g.vcpu().set_yield_on_spin(true).unwrap();
    assert_eq!(g.run(100_000), VmExit::BudgetExhausted);
}

/// Without the spin stop (one vCPU) a kernel wait loop's block counts its
/// instructions inline like any other; with it, every turn of the loop
/// runs the block hook, which counts the repeats.
#[test]
fn a_kernel_pause_loop_runs_the_block_hook_only_when_spins_stop_the_turn() {
    let hooked = |yield_on_spin: bool| {
        let mut g = Guest::new(&pause_loop(), 0);
        if yield_on_spin {
            g.vcpu().set_yield_on_spin(true).unwrap();
        }
        let exit = g.run(100_000);
        let n = g.vm.as_ref().unwrap().exit_counters().hooked_blocks;
        (exit, n)
    };
    let (exit, n) = hooked(false);
    assert_eq!(exit, VmExit::BudgetExhausted);
    assert!(
        n < 100,
        "{n} hooked blocks in 100,000 instructions of a wait loop"
    );
    let (exit, n) = hooked(true);
    assert_eq!(exit, VmExit::Spin);
    assert!(n >= 60, "{n} hooked blocks before the spin stop");
}

/// A watched block address counts each entry of a block there, and the
/// run is the same as without the watch (replay's `--reaches`).
#[test]
fn a_watched_block_is_counted_without_changing_the_run() {
    let code = assemble(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.jmp(top)
    });
    let mut plain = Guest::new(&code, 0);
    assert_eq!(plain.run(10_000), VmExit::BudgetExhausted);
    let mut watched = Guest::new(&code, 0);
    watched.vcpu().watch_block(Some(CODE)).unwrap();
    assert_eq!(watched.run(10_000), VmExit::BudgetExhausted);
    let increments = watched.vcpu().regs().unwrap().rax;
    assert_eq!(increments, plain.vcpu().regs().unwrap().rax);
    assert_eq!(
        watched.vcpu().instructions_retired().unwrap(),
        plain.vcpu().instructions_retired().unwrap()
    );
    assert_eq!(
        watched.vcpu().watch_hits().unwrap(),
        increments,
        "one entry per iteration"
    );
    watched.vcpu().watch_block(Some(CODE + 0x100)).unwrap();
    watched.run(10_000);
    assert_eq!(
        watched.vcpu().watch_hits().unwrap(),
        0,
        "nothing runs there"
    );
}

/// A breakpoint in the middle of a block stops the vCPU with the exact
/// count of the instructions before it (the block was counted whole when
/// entered), and the run resumed from there ends with the count and state
/// of a run without breakpoints.
#[test]
fn a_breakpoint_inside_a_block_stops_at_an_exact_count() {
    const LOOPS: u64 = 5;
    let mut at = [0u64; 2];
    let code = assemble(CODE, |a| {
        let mut top = a.create_label();
        let mut mid = a.create_label();
        a.mov(ecx, LOOPS as u32)?;
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.add(rbx, 3)?;
        a.set_label(&mut mid)?;
        a.inc(rdx)?;
        a.xor(rsi, rdx)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    // The offsets of `top` and `mid`: mov ecx (5 bytes), inc rax (3), add
    // rbx (4).
    at[0] = CODE + 5;
    at[1] = CODE + 5 + 3 + 4;
    let mut plain = Guest::new(&code, 0);
    assert_eq!(plain.run(1_000), VmExit::Hlt);
    let total = plain.vcpu().instructions_retired().unwrap();
    assert_eq!(total, 1 + LOOPS * 6 + 1, "mov, 6 per loop, hlt");

    let mut g = Guest::new(&code, 0);
    g.vcpu().set_breakpoints(&[at[1]]).unwrap();
    for pass in 0..LOOPS {
        assert_eq!(g.run(1_000), VmExit::Debug { rip: at[1] }, "pass {pass}");
        // mov, then `pass` whole loops and the two instructions before `mid`.
        assert_eq!(
            g.vcpu().instructions_retired().unwrap(),
            1 + pass * 6 + 2,
            "pass {pass}"
        );
    }
    assert_eq!(g.run(1_000), VmExit::Hlt);
    assert_eq!(g.vcpu().instructions_retired().unwrap(), total);
    let (a, b) = (g.vcpu().regs().unwrap(), plain.vcpu().regs().unwrap());
    assert_eq!(
        (a.rax, a.rbx, a.rdx, a.rsi, a.rip),
        (b.rax, b.rbx, b.rdx, b.rsi, b.rip)
    );

    // A budget counts from where the run starts, the step over the
    // breakpoint included: 3 + 4 is the end of the first loop's block.
    let mut g = Guest::new(&code, 0);
    g.vcpu().set_breakpoints(&[at[1]]).unwrap();
    assert_eq!(g.run(1_000), VmExit::Debug { rip: at[1] });
    assert_eq!(g.run(4), VmExit::BudgetExhausted);
    assert_eq!(g.vcpu().instructions_retired().unwrap(), 1 + 6);
    g.vcpu().set_breakpoints(&[]).unwrap();
    assert_eq!(g.run(1_000), VmExit::Hlt);
    assert_eq!(g.vcpu().instructions_retired().unwrap(), total);
    let (a, b) = (g.vcpu().regs().unwrap(), plain.vcpu().regs().unwrap());
    assert_eq!(
        (a.rax, a.rbx, a.rdx, a.rsi, a.rip),
        (b.rax, b.rbx, b.rdx, b.rsi, b.rip)
    );
}

/// An exception raised by an instruction a breakpoint stopped at, or one
/// executed by single steps, is delivered at the instruction count a plain
/// run gives it, and the count goes on as in a plain run (replay compares
/// exception positions and every later count).
#[test]
fn an_exception_after_a_breakpoint_or_steps_has_the_position_of_a_plain_run() {
    let code = assemble(CODE, |a| {
        a.mov(rcx, 1u64)?;
        a.mov(rax, 0x8000_0000_0000_0000u64)?;
        a.mov(rbx, qword_ptr(rax))?;
        a.inc(rdx)?;
        a.hlt()
    });
    // mov rcx (10 bytes), mov rax (10): the faulting load.
    let load = CODE + 20;
    #[derive(PartialEq)]
    enum Stop {
        None,
        Breakpoint,
        Steps,
    }
    let exception_at = |stop: Stop| -> Vec<(u8, u64, Option<u64>)> {
        let mut g = Guest::new(&code, 0);
        let mut bus = NullBus::default();
        if stop == Stop::Breakpoint {
            g.vcpu().set_breakpoints(&[load]).unwrap();
            let exit = g.vcpu().run(&mut bus, Some(1_000)).unwrap();
            assert_eq!(exit, VmExit::Debug { rip: load });
            assert_eq!(g.vcpu().instructions_retired().unwrap(), 2);
        }
        if stop == Stop::Steps {
            // Both movs, then the load, which faults into the handler.
            g.vcpu().set_single_step(true).unwrap();
            for _ in 0..3 {
                let exit = g.vcpu().run(&mut bus, Some(1_000)).unwrap();
                assert!(matches!(exit, VmExit::Debug { .. }), "{exit:?}");
            }
            g.vcpu().set_single_step(false).unwrap();
        }
        let exit = g.vcpu().run(&mut bus, Some(1_000)).unwrap();
        assert_eq!(exit, VmExit::Hlt);
        bus.exceptions
            .push((0, g.vcpu().instructions_retired().unwrap(), None));
        bus.exceptions
    };
    // The exception's position, then the count at the handler's HLT.
    let plain = exception_at(Stop::None);
    assert_eq!(plain.len(), 2, "{plain:?}");
    assert_eq!(exception_at(Stop::Breakpoint), plain, "from a breakpoint");
    assert_eq!(exception_at(Stop::Steps), plain, "single steps");
}

/// A REP string instruction is stepped as a run executes it: an iteration
/// a step, and after the last one a step that finds RCX zero and leaves
/// (with TF, QEMU would leave right after the last iteration), so steps
/// count what a run counts and land where its blocks begin.
#[test]
fn a_rep_string_instruction_steps_as_a_run_counts_it() {
    const BUF: u64 = 0x30000;
    let code = assemble(CODE, |a| {
        a.mov(rdi, BUF)?;
        a.mov(rcx, 3u64)?;
        a.mov(al, 0x5au32)?;
        a.rep().stosb()?;
        a.inc(rdx)?;
        a.hlt()
    });
    // mov rdi (10 bytes), mov rcx (10), mov al (2): the REP STOSB.
    let rep = CODE + 22;
    let mut plain = Guest::new(&code, 0);
    assert_eq!(plain.run(1_000), VmExit::Hlt);
    let total = plain.vcpu().instructions_retired().unwrap();

    let mut g = Guest::new(&code, 0);
    let mut bus = NullBus::default();
    g.vcpu().set_single_step(true).unwrap();
    let mut at_rep = Vec::new();
    loop {
        let rip = g.vcpu().regs().unwrap().rip;
        if rip == rep {
            at_rep.push(g.vcpu().regs().unwrap().rcx);
        }
        match g.vcpu().run(&mut bus, Some(1_000)).unwrap() {
            VmExit::Debug { .. } => {}
            VmExit::Hlt => break,
            other => panic!("{other:?}"),
        }
        assert!(at_rep.len() < 10, "stepping does not leave the REP STOSB");
    }
    // Three iterations, then RCX found zero.
    assert_eq!(at_rep, [3, 2, 1, 0]);
    assert_eq!(g.vcpu().instructions_retired().unwrap(), total);
    let mut stored = [0u8; 4];
    g.mem.read_slice(&mut stored, GuestAddress(BUF)).unwrap();
    assert_eq!(stored, [0x5a, 0x5a, 0x5a, 0]);
}

/// A write to a watched range stops the run at the end of its block, with
/// the writing instruction and the exact count before it (a read does
/// not), and the run resumed from there ends as a plain run does.
#[test]
fn a_watched_write_is_caught_with_its_instruction_and_count() {
    use krr_engine::hypervisor::{WatchKind, Watchpoint};
    const VAR: u64 = 0x30000;
    let code = assemble(CODE, |a| {
        let mut next = a.create_label();
        a.mov(rax, VAR)?;
        a.mov(rcx, qword_ptr(rax))?;
        a.inc(rbx)?;
        a.mov(qword_ptr(rax), rbx)?;
        a.jmp(next)?;
        a.set_label(&mut next)?;
        a.inc(rdx)?;
        a.hlt()
    });
    // mov rax (10 bytes), the load (3), inc rbx (3): the store.
    let store = CODE + 16;
    let mut plain = Guest::new(&code, 0);
    assert_eq!(plain.run(1_000), VmExit::Hlt);
    let total = plain.vcpu().instructions_retired().unwrap();

    let mut g = Guest::new(&code, 0);
    let wp = Watchpoint {
        addr: VAR,
        len: 8,
        kind: WatchKind::Write,
    };
    // Identity-mapped: the physical piece is the virtual range.
    g.vcpu()
        .set_watchpoints(&[(wp, vec![(VAR, VAR + 8)])])
        .unwrap();
    assert_eq!(g.run(1_000), VmExit::Watchpoint);
    let hit = g.vcpu().take_watch_hit().expect("a hit");
    assert_eq!((hit.rip, hit.write, hit.watchpoint), (store, true, wp));
    assert_eq!(hit.icount, 3, "mov, load, inc before the store");
    // Stopped at the end of the store's block, the write done once.
    assert_eq!(g.vcpu().instructions_retired().unwrap(), 5);
    assert_eq!(
        g.mem.read_obj::<u64>(GuestAddress(VAR)).unwrap(),
        1,
        "written"
    );
    assert_eq!(g.run(1_000), VmExit::Hlt);
    assert_eq!(g.vcpu().instructions_retired().unwrap(), total);
    assert!(g.vcpu().take_watch_hit().is_none());
}

/// A block patched in place with code of the same length but fewer
/// instructions (as the kernel's alternatives and static keys do) is
/// counted as it is now: the per-block count cache follows retranslation.
#[test]
fn a_block_patched_in_place_is_counted_as_patched() {
    const PATCH: u64 = 0x14000;
    // Four one-byte NOPs, or `lea eax, [rax]` (3 bytes) and a NOP.
    const FOUR_NOPS: u32 = 0x9090_9090;
    const LEA_NOP: u32 = 0x9000_408d;
    let run = |second: u32| -> u64 {
        let code = assemble(CODE, |a| {
            let mut again = a.create_label();
            let mut back = a.create_label();
            a.mov(ecx, 2)?;
            a.set_label(&mut again)?;
            a.mov(rax, PATCH)?;
            a.jmp(rax)?;
            a.set_label(&mut back)?;
            // The second pass runs what this stores.
            a.mov(dword_ptr(PATCH), second as i32)?;
            a.dec(ecx)?;
            a.jnz(again)?;
            a.hlt()
        });
        let back = CODE + 5 + 10 + 2;
        let patch = assemble(PATCH, |a| {
            a.db(&FOUR_NOPS.to_le_bytes())?;
            a.mov(rdx, back)?;
            a.jmp(rdx)
        });
        let mut g = Guest::new(&code, 0);
        g.mem.write_slice(&patch, GuestAddress(PATCH)).unwrap();
        assert_eq!(g.run(1_000_000), VmExit::Hlt);
        g.vcpu().instructions_retired().unwrap()
    };
    let unchanged = run(FOUR_NOPS);
    let patched = run(LEA_NOP);
    // The second pass ran two instructions where it had run four.
    assert_eq!(
        unchanged - patched,
        2,
        "unchanged {unchanged}, patched {patched}"
    );
}

/// A device model that panics inside a hook ends the run with a backend
/// error naming the panic; the process (and a recording in progress) is not
/// aborted by a panic unwinding into unicorn's C frames.
#[test]
fn a_panic_in_a_hook_ends_the_run_with_an_error() {
    struct PanickingBus;
    impl IoBus for PanickingBus {
        fn pio_read(&mut self, _: usize, port: u16, _: &mut [u8]) {
            panic!("device model bug at port {port:#x}");
        }
        fn pio_write(&mut self, _: usize, _: u16, _: &[u8]) {}
        fn mmio_read(&mut self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn mmio_write(&mut self, _: usize, _: u64, _: &[u8]) {}
        fn cpuid(&mut self, _: usize, _: u32, _: u32) -> [u32; 4] {
            [0; 4]
        }
        fn rdtsc(&mut self, _: usize) -> u64 {
            0
        }
    }

    impl RunEvents for PanickingBus {}
    let code = assemble(CODE, |a| {
        a.in_(al, 0x80)?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 0);
    let err = g
        .vcpu()
        .run(&mut PanickingBus, Some(1_000_000))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("panicked") && err.contains("device model bug at port 0x80"),
        "{err}"
    );
}

/// Translated code counts a block itself (the project's unicorn patch)
/// unless the run needs the block hook at every block; both ways must give
/// the same counts and stop at the same block boundaries. Budgets of every
/// size from 1 walk a loop of several blocks at CPL 0 and at CPL 3: once
/// counted inline, once with every block through the hook (a watched block
/// that never runs forces that).
#[test]
fn inline_counting_and_the_block_hook_stop_at_the_same_counts() {
    const LOOPS: u32 = 7;
    let code = assemble(CODE, |a| {
        let mut top = a.create_label();
        let mut odd = a.create_label();
        let mut join = a.create_label();
        a.mov(ecx, LOOPS)?;
        a.set_label(&mut top)?;
        a.inc(rax)?;
        a.test(ecx, 1)?;
        a.jnz(odd)?;
        a.add(rbx, 3)?;
        a.add(rbx, 5)?;
        a.jmp(join)?;
        a.set_label(&mut odd)?;
        a.xor(rsi, rax)?;
        a.set_label(&mut join)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    for cpl in [0u8, 3] {
        let walk = |force_hook: bool| {
            let mut g = Guest::new(&code, cpl);
            if force_hook {
                g.vcpu().watch_block(Some(CODE + 0x800)).unwrap();
            }
            let mut steps = Vec::new();
            for i in 0u64.. {
                let exit = g.run(1 + i % 3);
                let v = g.vcpu();
                steps.push((
                    exit,
                    v.instructions_retired().unwrap(),
                    v.kernel_instructions_retired().unwrap(),
                    v.regs().unwrap().rip,
                ));
                if exit != VmExit::BudgetExhausted {
                    break;
                }
                assert!(i < 1_000, "cpl {cpl}: the loop does not end");
            }
            steps
        };
        let inline = walk(false);
        let hooked = walk(true);
        assert_eq!(inline, hooked, "cpl {cpl}");
        let last = inline.last().unwrap();
        eprintln!("cpl {cpl}: {} runs, last {last:?}", inline.len());
        // mov, 8 per pass with ECX even, 6 with ECX odd; then hlt.
        let body = 1 + u64::from(LOOPS / 2) * 8 + u64::from(LOOPS.div_ceil(2)) * 6;
        if cpl == 0 {
            assert_eq!(last.0, VmExit::Hlt);
            assert_eq!((last.1, last.2), (body + 1, body + 1));
        } else {
            assert!(last.1 > body && last.2 < last.1 - body, "{last:?}");
        }
    }
}

/// Code rewritten through another virtual address of its page (an alias,
/// as the kernel's direct map is of user pages) runs as rewritten, every
/// time: translated code is dropped whichever mapping the store goes
/// through, also after the page got new translated code (unicorn protected
/// a page only at the virtual address its new code was fetched from).
#[test]
fn code_rewritten_through_an_alias_runs_as_rewritten() {
    const FUNC: u64 = 0x20000;
    const ALIAS: u64 = 100 << 21; // a 2 MiB page mapping physical 0
    const PASSES: u32 = 4;
    let code = assemble(CODE, |a| {
        let mut top = a.create_label();
        a.mov(ecx, PASSES)?;
        a.mov(rdi, ALIAS + FUNC + 1)?; // the immediate of FUNC's `mov eax`
        a.set_label(&mut top)?;
        a.call(FUNC)?;
        a.add(rbx, rax)?;
        a.inc(byte_ptr(rdi))?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let func = assemble(FUNC, |a| {
        a.mov(eax, 1)?;
        a.ret()
    });
    let mut g = Guest::new(&code, 0);
    g.mem.write_slice(&func, GuestAddress(FUNC)).unwrap();
    g.mem
        .write_obj(0x87u64, GuestAddress(PD + (ALIAS >> 21) * 8))
        .unwrap();
    assert_eq!(g.run(10_000), VmExit::Hlt);
    // FUNC returns 1, 2, 3, 4 as its immediate is incremented.
    assert_eq!(g.vcpu().regs().unwrap().rbx, 1 + 2 + 3 + 4);
}

#[test]
fn user_mode_port_io_without_permission_takes_gp() {
    // Unicorn skipped the I/O permission check (patch 0004 restores it): a
    // user process's IN read the port.
    let code = assemble(CODE, |a| {
        a.mov(edx, 0x80)?;
        a.mov(eax, 0x1234_5678)?;
        a.in_(al, dx)?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 3);
    assert_eq!(g.run_to_handler(), 13);
    assert_eq!(g.stack(2), vec![0, CODE + 10], "#GP(0) at the IN");
    assert_eq!(g.vcpu().regs().unwrap().rax, 0x1234_5678, "no port read");

    // With IOPL 3 the same IN reads the port (the bus answers 0xff).
    let mut g = Guest::new(&code, 3);
    let mut r = g.vcpu().regs().unwrap();
    r.rflags |= 3 << 12;
    g.vcpu().set_regs(&r).unwrap();
    assert_eq!(g.run(100), VmExit::Hlt);
    assert_eq!(g.vcpu().regs().unwrap().rax, 0x1234_56ff);

    // And at CPL 0 whatever IOPL is.
    let mut g = Guest::new(&code, 0);
    assert_eq!(g.run(100), VmExit::Hlt);
    assert_eq!(g.vcpu().regs().unwrap().rax, 0x1234_56ff);
}

#[test]
fn mxcsr_keeps_sse_exception_flags() {
    // Unicorn's QEMU 5.0 never set them (patch 0005): fetestexcept saw none.
    const SAVED: u64 = 0x3000;
    let code = assemble(CODE, |a| {
        a.ldmxcsr(dword_ptr(SAVED + 4))?; // the power-on value
        a.mov(rax, 0x3ff0_0000_0000_0000u64)?; // 1.0
        a.movq(xmm0, rax)?;
        a.xor(eax, eax)?;
        a.movq(xmm1, rax)?;
        a.divsd(xmm0, xmm1)?; // 1.0 / 0.0: divide-by-zero, exact
        a.stmxcsr(dword_ptr(SAVED))?;
        a.ldmxcsr(dword_ptr(SAVED + 4))?;
        a.stmxcsr(dword_ptr(SAVED + 8))?;
        a.sqrtsd(xmm2, xmm1)?; // sqrt(0.0): no exception
        a.mov(rax, 0xbff0_0000_0000_0000u64)?; // -1.0
        a.movq(xmm3, rax)?;
        a.sqrtsd(xmm2, xmm3)?; // sqrt(-1.0): invalid
        a.stmxcsr(dword_ptr(SAVED + 12))?;
        a.hlt()
    });
    let mut g = Guest::new(&code, 0);
    g.mem.write_obj(0x1f80u32, GuestAddress(SAVED + 4)).unwrap();
    let mut s = g.vcpu().sregs().unwrap();
    s.cr4 |= 0x600; // OSFXSR, OSXMMEXCPT
    g.vcpu().set_sregs(&s).unwrap();
    assert_eq!(g.run(100), VmExit::Hlt);
    let saved = |off: u64| g.mem.read_obj::<u32>(GuestAddress(SAVED + off)).unwrap();
    assert_eq!(saved(0), 0x1f80 | 0x4, "ZE after 1/0");
    assert_eq!(saved(8), 0x1f80, "LDMXCSR cleared the flags");
    assert_eq!(saved(12), 0x1f80 | 0x1, "IE after sqrt(-1), nothing else");
}
