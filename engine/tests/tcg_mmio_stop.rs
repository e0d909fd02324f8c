// SPDX-License-Identifier: GPL-2.0-or-later
//! Exact stops of the software CPU. Stops requested by the bus from inside
//! an access: the vCPU must stop right after the accessing instruction, and
//! every access must reach the bus exactly once (an MMIO write repeated
//! after a stop re-sends an IPI or an EOI). Covered: plain MMIO stores and
//! loads, read-modify-write (a read then a write in one instruction), string
//! moves, port IN/OUT, 8-byte accesses, and a stop after every single access
//! of a program. Also: the interrupt window after POPF and IRETQ, and
//! resuming from a breakpoint on an MMIO store that asks for a stop.

#[path = "common/selftest_guests.rs"]
mod selftest_guests;

use iced_x86::code_asm::*;
use krr_engine::hypervisor::{IoBus, RunEvents, Vcpu, VmExit};
use selftest_guests::*;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    PioIn(u16, u64),
    PioOut(u16, u64),
    MmioRead(u64, u64),
    MmioWrite(u64, u64),
}

/// Records every access; asks for a stop after each access that `stop_on`
/// selects.
struct StopBus {
    seen: Vec<Seen>,
    stop_on: fn(&Seen) -> bool,
    stop_now: bool,
    next_read: u64,
}

impl StopBus {
    fn new(stop_on: fn(&Seen) -> bool) -> StopBus {
        StopBus {
            seen: Vec::new(),
            stop_on,
            stop_now: false,
            next_read: 0x1000,
        }
    }

    fn note(&mut self, s: Seen) {
        self.stop_now = (self.stop_on)(&s);
        self.seen.push(s);
    }

    /// Each read returns a new value, so a repeated read would show.
    fn read_value(&mut self) -> u64 {
        self.next_read += 1;
        self.next_read
    }
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len()].copy_from_slice(data);
    u64::from_le_bytes(b)
}

impl IoBus for StopBus {
    fn pio_read(&mut self, _: usize, port: u16, data: &mut [u8]) {
        let v = self.read_value();
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        self.note(Seen::PioIn(port, le(data)));
    }
    fn pio_write(&mut self, _: usize, port: u16, data: &[u8]) {
        self.note(Seen::PioOut(port, le(data)));
    }
    fn mmio_read(&mut self, _: usize, addr: u64, data: &mut [u8]) {
        let v = self.read_value();
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        self.note(Seen::MmioRead(addr, le(data)));
    }
    fn mmio_write(&mut self, _: usize, addr: u64, data: &[u8]) {
        self.note(Seen::MmioWrite(addr, le(data)));
    }
    fn cpuid(&mut self, _: usize, _: u32, _: u32) -> [u32; 4] {
        [0; 4]
    }
    fn rdtsc(&mut self, _: usize) -> u64 {
        0
    }
}

impl RunEvents for StopBus {
    fn stop_requested(&self) -> bool {
        self.stop_now
    }
}

/// What a program run shows: the exits with RIP, the bus, the vCPU (for
/// register checks) and the RAM dword at 0x9800.
type Outcome = (Vec<(VmExit, u64)>, StopBus, Box<dyn Vcpu>, u64);

/// Runs `prog` on the software CPU until HLT.
fn run_program(prog: &Program, stop_on: fn(&Seen) -> bool) -> Outcome {
    let mem = guest_memory();
    prog.load(&mem);
    let mut vm = make_vm(BackendKind::Software, &mem).expect("software VM");
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_long_mode(vcpu.as_mut(), PROGRAM, None);
    let mut regs = vcpu.regs().unwrap();
    regs.rsi = MMIO_DEV + 0x40;
    regs.rdi = 0x9800;
    vcpu.set_regs(&regs).unwrap();
    let mut bus = StopBus::new(stop_on);
    let mut exits = Vec::new();
    for _ in 0..100 {
        let e = vcpu.run(&mut bus, Some(1_000_000)).unwrap();
        if e == VmExit::BudgetExhausted {
            continue;
        }
        exits.push((e, vcpu.regs().unwrap().rip));
        if e != VmExit::IoStop {
            break;
        }
    }
    let mut ram = [0u8; 4];
    mem.read_slice(&mut ram, GuestAddress(0x9800)).unwrap();
    (exits, bus, vcpu, u32::from_le_bytes(ram) as u64)
}

fn mmio_program() -> Program {
    assemble(64, PROGRAM, |a, l| {
        a.mov(rbx, MMIO_DEV)?;
        a.mov(dword_ptr(rbx + 0x300), 0x4500u32)?;
        l.new_label(a, "after_w1")?;
        a.mov(dword_ptr(rbx + 0x300), 0x4608u32)?;
        l.new_label(a, "after_w2")?;
        a.inc(ecx)?;
        a.or(dword_ptr(rbx + 0x10), 0x80u32)?;
        l.new_label(a, "after_rmw")?;
        a.mov(eax, dword_ptr(rbx + 0x20))?;
        l.new_label(a, "after_r")?;
        a.mov(edx, eax)?;
        a.movsd()?;
        l.new_label(a, "after_movs")?;
        a.hlt()?;
        l.new_label(a, "end")?;
        a.nop()
    })
}

#[test]
fn a_stop_from_an_mmio_write_resumes_after_the_write_once() {
    let prog = mmio_program();
    let (exits, bus, vcpu, ram) = run_program(&prog, |s| matches!(s, Seen::MmioWrite(..)));
    let w = |off: u64, v: u64| Seen::MmioWrite(MMIO_DEV + off, v);
    let r = |off: u64, v: u64| Seen::MmioRead(MMIO_DEV + off, v);
    assert_eq!(
        bus.seen,
        vec![
            w(0x300, 0x4500),
            w(0x300, 0x4608),
            r(0x10, 0x1001),
            w(0x10, 0x1081),
            r(0x20, 0x1002),
            r(0x40, 0x1003),
        ],
        "each access exactly once"
    );
    assert_eq!(
        exits,
        vec![
            (VmExit::IoStop, prog.at("after_w1")),
            (VmExit::IoStop, prog.at("after_w2")),
            (VmExit::IoStop, prog.at("after_rmw")),
            (VmExit::Hlt, prog.at("end")),
        ]
    );
    let regs = vcpu.regs().unwrap();
    assert_eq!(regs.rcx, 1, "the instruction between the writes ran once");
    assert_eq!(regs.rdx, 0x1002);
    assert_eq!(ram, 0x1003, "MOVSD stored what it read");
}

#[test]
fn a_stop_after_every_access_resumes_after_each_instruction_once() {
    let prog = mmio_program();
    let (exits, bus, vcpu, ram) = run_program(&prog, |_| true);
    assert_eq!(bus.seen.len(), 6, "{:?}", bus.seen);
    assert_eq!(
        exits,
        vec![
            (VmExit::IoStop, prog.at("after_w1")),
            (VmExit::IoStop, prog.at("after_w2")),
            // The read of the OR asks for the stop too: the instruction
            // still completes (its write is new, and made once).
            (VmExit::IoStop, prog.at("after_rmw")),
            (VmExit::IoStop, prog.at("after_r")),
            (VmExit::IoStop, prog.at("after_movs")),
            (VmExit::Hlt, prog.at("end")),
        ]
    );
    let regs = vcpu.regs().unwrap();
    assert_eq!((regs.rcx, regs.rdx), (1, 0x1002));
    assert_eq!(regs.rsi, MMIO_DEV + 0x44, "MOVSD advanced RSI once");
    assert_eq!(regs.rdi, 0x9804, "MOVSD advanced RDI once");
    assert_eq!(ram, 0x1003);
}

#[test]
fn a_stop_from_port_io_resumes_after_the_instruction_once() {
    let prog = assemble(64, PROGRAM, |a, l| {
        a.mov(eax, 7u32)?;
        a.out(i32::from(PORT_MARK), eax)?;
        l.new_label(a, "after_out")?;
        a.inc(ecx)?;
        a.mov(edx, u32::from(PORT_IN))?;
        a.in_(eax, dx)?;
        l.new_label(a, "after_in")?;
        a.mov(ebx, eax)?;
        a.inc(ecx)?;
        a.hlt()?;
        l.new_label(a, "end")?;
        a.nop()
    });
    let (exits, bus, vcpu, _) = run_program(&prog, |_| true);
    assert_eq!(
        bus.seen,
        vec![Seen::PioOut(PORT_MARK, 7), Seen::PioIn(PORT_IN, 0x1001)]
    );
    assert_eq!(
        exits,
        vec![
            (VmExit::IoStop, prog.at("after_out")),
            (VmExit::IoStop, prog.at("after_in")),
            (VmExit::Hlt, prog.at("end")),
        ]
    );
    let regs = vcpu.regs().unwrap();
    assert_eq!((regs.rbx, regs.rcx), (0x1001, 2));
}

/// A stop inside a loop of APIC-style writes (the INIT IPI case): the loop
/// body runs the expected number of times, and instruction counts of two
/// identical runs agree.
#[test]
fn repeated_stops_in_a_loop_are_deterministic() {
    let prog = assemble(64, PROGRAM, |a, _| {
        a.mov(rbx, MMIO_DEV)?;
        a.mov(ecx, 50u32)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(dword_ptr(rbx + 0x300), ecx)?;
        a.add(dword_ptr(0x9800), 1)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let once = || {
        let (exits, bus, vcpu, ram) = run_program(&prog, |s| matches!(s, Seen::MmioWrite(..)));
        (exits.len(), bus.seen, ram, vcpu.instructions_retired())
    };
    let (n_exits, seen, ram, count) = once();
    assert_eq!(n_exits, 51, "one stop per write, then HLT");
    assert_eq!(
        seen,
        (1..=50u64)
            .rev()
            .map(|v| Seen::MmioWrite(MMIO_DEV + 0x300, v))
            .collect::<Vec<_>>()
    );
    assert_eq!(ram, 50, "the RAM increment after each write ran once");
    let again = once();
    assert_eq!(again.3, count, "instruction count of a second run");
    eprintln!("instructions retired: {count:?}");
}

/// 64-bit MMIO loads and stores reach the bus as one 8-byte access each.
#[test]
fn eight_byte_mmio_accesses_are_single_accesses() {
    let prog = assemble(64, PROGRAM, |a, l| {
        a.mov(rbx, MMIO_DEV)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(qword_ptr(rbx + 0x18), rax)?;
        l.new_label(a, "after_store")?;
        a.mov(rdx, qword_ptr(rbx + 0x28))?;
        a.hlt()?;
        l.new_label(a, "end")?;
        a.nop()
    });
    let (exits, bus, vcpu, _) = run_program(&prog, |s| matches!(s, Seen::MmioWrite(..)));
    assert_eq!(
        bus.seen,
        vec![
            Seen::MmioWrite(MMIO_DEV + 0x18, 0x1122_3344_5566_7788),
            Seen::MmioRead(MMIO_DEV + 0x28, 0x1001),
        ]
    );
    assert_eq!(
        exits,
        vec![
            (VmExit::IoStop, prog.at("after_store")),
            (VmExit::Hlt, prog.at("end")),
        ]
    );
    assert_eq!(vcpu.regs().unwrap().rdx, 0x1001);
}

#[test]
fn the_interrupt_window_opens_after_popf_and_iretq() {
    let prog = assemble(64, PROGRAM, |a, l| {
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x200)?;
        a.popfq()?;
        l.new_label(a, "after_popf")?;
        a.cli()?;
        let mut target = a.create_label();
        a.mov(eax, 0x18u32)?;
        a.push(rax)?;
        a.lea(rax, qword_ptr(rsp + 8))?;
        a.push(rax)?;
        a.push(0x202)?;
        a.push(0x10)?;
        a.lea(rax, ptr(target))?;
        a.push(rax)?;
        a.iretq()?;
        a.set_label(&mut target)?;
        l.name("after_iretq", target);
        a.cli()?;
        a.hlt()?;
        l.new_label(a, "end")?;
        a.nop()
    });
    let mem = guest_memory();
    prog.load(&mem);
    let mut vm = make_vm(BackendKind::Software, &mem).expect("software VM");
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_long_mode(vcpu.as_mut(), PROGRAM, None);
    let mut bus = StopBus::new(|_| false);
    vcpu.request_interrupt_window(true).unwrap();
    let mut exits = Vec::new();
    for _ in 0..3 {
        let e = vcpu.run(&mut bus, None).unwrap();
        let rip = vcpu.regs().unwrap().rip;
        exits.push((e, rip));
        if e == VmExit::InterruptWindow {
            // Step past the open window: the next run must find it closed
            // again (CLI) before reporting the next one.
            vcpu.request_interrupt_window(false).unwrap();
            vcpu.set_single_step(true).unwrap();
            vcpu.run(&mut bus, None).unwrap();
            vcpu.set_single_step(false).unwrap();
            vcpu.request_interrupt_window(true).unwrap();
        }
    }
    assert_eq!(
        exits,
        vec![
            (VmExit::InterruptWindow, prog.at("after_popf")),
            (VmExit::InterruptWindow, prog.at("after_iretq")),
            (VmExit::Hlt, prog.at("end")),
        ]
    );
}

#[test]
fn resuming_from_a_breakpoint_on_an_mmio_store_that_stops() {
    let prog = assemble(64, PROGRAM, |a, l| {
        a.mov(rbx, MMIO_DEV)?;
        l.new_label(a, "store")?;
        a.mov(dword_ptr(rbx + 0x300), 0x4500u32)?;
        l.new_label(a, "after_store")?;
        a.inc(ecx)?;
        a.hlt()?;
        l.new_label(a, "end")?;
        a.nop()
    });
    let mem = guest_memory();
    prog.load(&mem);
    let mut vm = make_vm(BackendKind::Software, &mem).expect("software VM");
    let mut vcpu = vm.create_vcpu(0).unwrap();
    enter_long_mode(vcpu.as_mut(), PROGRAM, None);
    vcpu.set_breakpoints(&[prog.at("store")]).unwrap();
    let mut bus = StopBus::new(|s| matches!(s, Seen::MmioWrite(..)));
    let mut exits = Vec::new();
    for _ in 0..3 {
        let e = vcpu.run(&mut bus, None).unwrap();
        exits.push((e, vcpu.regs().unwrap().rip));
    }
    assert_eq!(
        exits,
        vec![
            (
                VmExit::Debug {
                    rip: prog.at("store")
                },
                prog.at("store")
            ),
            (VmExit::IoStop, prog.at("after_store")),
            (VmExit::Hlt, prog.at("end")),
        ]
    );
    assert_eq!(bus.seen, vec![Seen::MmioWrite(MMIO_DEV + 0x300, 0x4500)]);
    assert_eq!(vcpu.regs().unwrap().rcx, 1);
}
