// SPDX-License-Identifier: GPL-2.0-or-later
//! Selftest-style guests on both CPU backends: KVM (here PVM: guest ring 0
//! emulated, ring 3 native, no PMU) and the software CPU. Each scenario runs
//! the same guest image on each backend and records what the machine model
//! saw (port and MMIO accesses) and the exits; the KVM and software
//! observations must be identical. Where `/dev/kvm` is absent, or cannot do
//! what a scenario needs (PVM, no PMU), the KVM half prints `SKIPPED:
//! <reason>` and only the software half is checked; under
//! `KRR_TEST_REQUIRE_KVM` (`cargo xtask hw-acceptance`) such a skip fails.

#[path = "common/selftest_guests.rs"]
mod selftest_guests;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use krr_engine::devices::lapic::{ApEvent, LocalApic};
use krr_engine::hypervisor::kvm::{self, AsyncPosition, KvmVm};
use krr_engine::hypervisor::{Injection, Vcpu, VmExit};
use selftest_guests::*;

const BACKENDS: [BackendKind; 2] = [BackendKind::Kvm, BackendKind::Software];

/// `/dev/kvm` works but is not hardware-backed (PVM).
fn on_pvm() -> bool {
    matches!(
        kvm::detect(),
        kvm::KvmAvailability::SoftwareHypervisor { .. }
    )
}

/// Runs `scenario` on each backend and checks the observations agree.
fn on_all_backends<T: std::fmt::Debug + PartialEq>(
    scenario: impl Fn(BackendKind) -> Option<T>,
) -> T {
    on_backends(&BACKENDS, scenario).expect("the software backend always runs")
}

/// Runs `scenario` on `kinds`; the observations of all that ran must agree.
/// `None` when none ran (KVM alone was asked for, and it is absent).
fn on_backends<T: std::fmt::Debug + PartialEq>(
    kinds: &[BackendKind],
    scenario: impl Fn(BackendKind) -> Option<T>,
) -> Option<T> {
    let mut seen: Vec<(BackendKind, T)> = Vec::new();
    for &kind in kinds {
        if let Some(obs) = scenario(kind) {
            eprintln!("{kind:?}: {obs:?}");
            seen.push((kind, obs));
        }
    }
    if seen.is_empty() {
        return None;
    }
    let (first_kind, first) = seen.remove(0);
    for (kind, obs) in &seen {
        assert_eq!(
            &first, obs,
            "{first_kind:?} and {kind:?} observed different guest behaviour"
        );
    }
    Some(first)
}

fn io_program() -> Program {
    assemble(64, PROGRAM, |a, l| {
        a.mov(eax, 0x1234_5678u32)?;
        a.out(i32::from(PORT_MARK), eax)?;
        a.in_(eax, i32::from(PORT_IN))?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.mov(rbx, MMIO_DEV)?;
        a.mov(dword_ptr(rbx), 0xa5a5u32)?;
        // One 8-byte MMIO read (one access on both backends).
        a.mov(rax, qword_ptr(rbx + 8))?;
        a.out(i32::from(PORT_VALUE), eax)?;
        // CPUID is the engine's: vendor word and APIC id.
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.mov(eax, ebx)?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.mov(eax, ebx)?;
        a.shr(eax, 24)?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.hlt()?;
        l.new_label(a, "after_hlt")?;
        a.nop()
    })
}

#[test]
fn port_io_and_mmio_reach_the_machine_model() {
    let prog = io_program();
    let (events, exit) = on_all_backends(|kind| {
        let mem = guest_memory();
        prog.load(&mem);
        let mut vm = make_vm(kind, &mem)?;
        let mut vcpu = vm.create_vcpu(0).unwrap();
        enter_long_mode(vcpu.as_mut(), PROGRAM, None);
        let mut bus = TestBus::default();
        let exit = run_to_exit(vcpu.as_mut(), &mut bus);
        Some((bus.events, Observed::ExitAt(exit, vcpu.regs().unwrap().rip)))
    });
    assert_eq!(
        events,
        vec![
            Event::PioWrite {
                vcpu: 0,
                port: PORT_MARK,
                value: 0x1234_5678
            },
            Event::PioRead {
                vcpu: 0,
                port: PORT_IN,
                value: 0xcafe_babe
            },
            Event::PioWrite {
                vcpu: 0,
                port: PORT_VALUE,
                value: 0xcafe_babe
            },
            Event::MmioWrite {
                vcpu: 0,
                addr: MMIO_DEV,
                value: 0xa5a5
            },
            Event::MmioRead {
                vcpu: 0,
                addr: MMIO_DEV + 8,
                value: 0x600d
            },
            Event::PioWrite {
                vcpu: 0,
                port: PORT_VALUE,
                value: 0x600d
            },
            Event::PioWrite {
                vcpu: 0,
                port: PORT_VALUE,
                value: 0x5352_524b
            },
            Event::PioWrite {
                vcpu: 0,
                port: PORT_VALUE,
                value: 0
            },
        ]
    );
    assert_eq!(exit, Observed::ExitAt(VmExit::Hlt, prog.at("after_hlt")));
}

fn interrupt_program() -> Program {
    assemble(64, PROGRAM, |a, l| {
        a.mov(eax, 1u32)?;
        a.out(i32::from(PORT_MARK), eax)?;
        a.sti()?;
        a.hlt()?;
        a.mov(eax, 2u32)?;
        a.out(i32::from(PORT_MARK), eax)?;
        a.cli()?;
        a.mov(eax, 3u32)?;
        a.out(i32::from(PORT_MARK), eax)?;
        a.mov(ecx, 5u32)?;
        a.sti()?;
        a.nop()?;
        l.new_label(a, "window")?;
        a.mov(eax, 4u32)?;
        a.out(i32::from(PORT_MARK), eax)?;
        a.cli()?;
        a.hlt()?;
        l.new_label(a, "end")?;
        a.nop()
    })
}

#[test]
fn injected_interrupts_go_through_the_guest_idt() {
    injected_interrupts_on(&BACKENDS);
}

fn injected_interrupts_on(kinds: &[BackendKind]) {
    let prog = interrupt_program();
    let Some((events, exits)) = on_backends(kinds, |kind| {
        let mem = guest_memory();
        prog.load(&mem);
        let mut vm = make_vm(kind, &mem)?;
        let mut vcpu = vm.create_vcpu(0).unwrap();
        enter_long_mode(vcpu.as_mut(), PROGRAM, None);
        let mut bus = TestBus {
            stop_after_write: Some((PORT_MARK, 3)),
            ..TestBus::default()
        };
        let mut exits = Vec::new();
        let rip = |v: &dyn Vcpu| v.regs().unwrap().rip;
        // 1: HLT with IF=1: the window is open, inject directly.
        let e = run_to_exit(vcpu.as_mut(), &mut bus);
        exits.push(Observed::Exit(e));
        assert!(vcpu.interrupt_window_open().unwrap());
        vcpu.inject(Injection::Interrupt(0x30)).unwrap();
        // 2: the handler runs, then the guest stops after an OUT with IF=0:
        // injecting now must be refused; ask for a window instead.
        let e = run_to_exit(vcpu.as_mut(), &mut bus);
        exits.push(Observed::ExitAt(e, rip(vcpu.as_ref())));
        bus.stop_after_write = None;
        assert!(!vcpu.interrupt_window_open().unwrap());
        if kind == BackendKind::Kvm {
            assert!(vcpu.inject(Injection::Interrupt(0x31)).is_err());
        }
        vcpu.request_interrupt_window(true).unwrap();
        // 3: the window opens after `sti; nop` (the STI shadow).
        let e = run_to_exit(vcpu.as_mut(), &mut bus);
        exits.push(Observed::ExitAt(e, rip(vcpu.as_ref())));
        let r = vcpu.regs().unwrap();
        eprintln!(
            "{kind:?}: window exit {e:?} at {:#x}, rflags {:#x}, open {:?}",
            r.rip,
            r.rflags,
            vcpu.interrupt_window_open()
        );
        vcpu.request_interrupt_window(false).unwrap();
        vcpu.inject(Injection::Interrupt(0x31)).unwrap();
        let e = run_to_exit(vcpu.as_mut(), &mut bus);
        exits.push(Observed::ExitAt(e, rip(vcpu.as_ref())));
        Some((bus.events, exits))
    }) else {
        return;
    };
    let marks_and_vectors: Vec<(u16, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::PioWrite { port, value, .. } => Some((*port, *value)),
            _ => None,
        })
        .collect();
    assert_eq!(
        marks_and_vectors,
        vec![
            (PORT_MARK, 1),
            (PORT_VECTOR, 0x30),
            (PORT_FRAME_CS, u64::from(KERNEL_CS)),
            (PORT_MARK, 2),
            (PORT_MARK, 3),
            (PORT_VECTOR, 0x31),
            (PORT_FRAME_CS, u64::from(KERNEL_CS)),
            (PORT_MARK, 4),
        ]
    );
    assert_eq!(exits[0], Observed::Exit(VmExit::Hlt));
    assert!(matches!(exits[1], Observed::ExitAt(VmExit::IoStop, _)));
    assert_eq!(
        exits[2],
        Observed::ExitAt(VmExit::InterruptWindow, prog.at("window"))
    );
    assert_eq!(exits[3], Observed::ExitAt(VmExit::Hlt, prog.at("end")));
}

fn syscall_program() -> Program {
    assemble(64, PROGRAM, |a, l| {
        let mut user = a.create_label();
        let mut lstar = a.create_label();
        emit_iretq_to_user(a, user)?;
        a.set_label(&mut user)?;
        // Ring 3: compute, note CS, return to ring 0 with SYSCALL.
        a.mov(eax, 0x1234u32)?;
        a.add(eax, 1)?;
        a.xor(edi, edi)?;
        a.mov(di, cs)?;
        a.syscall()?;
        l.new_label(a, "after_syscall")?;
        a.jmp(user)?;
        a.set_label(&mut lstar)?;
        l.name("lstar", lstar);
        a.out(i32::from(PORT_VALUE), eax)?;
        a.mov(eax, edi)?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.mov(rax, rcx)?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.mov(rax, r11)?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.xor(eax, eax)?;
        a.mov(ax, cs)?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.hlt()
    })
}

#[test]
fn ring3_code_runs_and_returns_with_syscall() {
    let prog = syscall_program();
    let lstar = KERNEL_ALIAS + prog.at("lstar");
    let values = on_all_backends(|kind| {
        let mem = guest_memory();
        prog.load(&mem);
        // A fault halts the guest, so its frame stays on the kernel stack.
        set_post_interrupt(&mem, POST_HALT);
        let mut vm = make_vm(kind, &mem)?;
        let mut vcpu = vm.create_vcpu(0).unwrap();
        // SYSCALL enters the kernel alias, as in Linux.
        enter_long_mode(vcpu.as_mut(), PROGRAM, Some(lstar));
        let mut bus = TestBus::default();
        let e = run_to_exit(vcpu.as_mut(), &mut bus);
        assert_eq!(e, VmExit::Hlt);
        if let Some(&vector) = bus.writes_to(PORT_VECTOR).first() {
            // The stub halted with RSP at the fault's frame (it popped what
            // it pushed): error code, RIP, CS, RFLAGS, RSP, SS.
            let frame_at = vcpu.regs().unwrap().rsp;
            let frame: Vec<u64> = (0..6)
                .map(|i| {
                    vm_memory::Bytes::read_obj(&mem, vm_memory::GuestAddress(frame_at + 8 * i))
                        .unwrap()
                })
                .collect();
            let evidence = format!(
                "vector {vector}, error code {:#x}, at RIP {:#x} with CS {:#x}, RSP {:#x}, SS {:#x}",
                frame[0], frame[1], frame[2], frame[4], frame[5]
            );
            // Found on this host's PVM: a ring-3 SYSCALL of a guest that
            // is not PVM-aware sets RIP (LSTAR), RCX and R11 but keeps CPL
            // 3, CS, SS and RSP, so the fetch at the supervisor-only LSTAR
            // page faults from user mode. No KVM API lets the VMM step in
            // (SYSCALL never exits), so the KVM half cannot pass here; on
            // any other host a fault fails the test.
            let pvm_keeps_ring3 = kind == BackendKind::Kvm
                && on_pvm()
                && vector == 14
                && frame[1] == lstar
                && frame[2] == u64::from(USER_CS)
                && frame[4] == USER_STACK;
            assert!(pvm_keeps_ring3, "{kind:?}: the guest faulted: {evidence}");
            skip_kvm(&format!(
                "(KVM half) this host's PVM does not switch to ring 0 on SYSCALL \
                 from ring 3: {evidence}; {}",
                kvm::detect().reason()
            ));
            return None;
        }
        Some(bus.writes_to(PORT_VALUE))
    });
    assert_eq!(values.len(), 5);
    assert_eq!(values[0], 0x1235, "the user-mode computation");
    assert_eq!(values[1], u64::from(USER_CS), "CS seen by ring-3 code");
    assert_eq!(values[2], prog.at("after_syscall"), "RCX: return address");
    assert_ne!(values[3] & 0x200, 0, "R11: user RFLAGS with IF");
    assert_eq!(values[4], u64::from(KERNEL_CS), "CS after SYSCALL");
}

fn straight_line_program() -> Program {
    assemble(64, PROGRAM, |a, l| {
        l.new_label(a, "l0")?;
        a.nop()?;
        l.new_label(a, "l1")?;
        a.mov(eax, 1u32)?;
        l.new_label(a, "l2")?;
        a.add(eax, 2)?;
        l.new_label(a, "l3")?;
        a.lea(ebx, dword_ptr(rax + 4))?;
        l.new_label(a, "l4")?;
        a.mov(eax, ebx)?;
        l.new_label(a, "l5")?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.hlt()
    })
}

#[test]
fn single_step_advances_one_instruction() {
    let prog = straight_line_program();
    let steps = on_all_backends(|kind| {
        let mem = guest_memory();
        prog.load(&mem);
        let mut vm = make_vm(kind, &mem)?;
        let mut vcpu = vm.create_vcpu(0).unwrap();
        enter_long_mode(vcpu.as_mut(), PROGRAM, None);
        let mut bus = TestBus::default();
        vcpu.set_single_step(true).unwrap();
        let mut steps = Vec::new();
        for _ in 0..5 {
            let e = vcpu.run(&mut bus, None).unwrap();
            let r = vcpu.regs().unwrap();
            steps.push((e, r.rax, r.rbx));
        }
        vcpu.set_single_step(false).unwrap();
        assert_eq!(run_to_exit(vcpu.as_mut(), &mut bus), VmExit::Hlt);
        assert_eq!(bus.writes_to(PORT_VALUE), vec![7]);
        Some(steps)
    });
    let dbg = |l: &str| VmExit::Debug { rip: prog.at(l) };
    assert_eq!(
        steps,
        vec![
            (dbg("l1"), 0, 0),
            (dbg("l2"), 1, 0),
            (dbg("l3"), 3, 0),
            (dbg("l4"), 3, 7),
            (dbg("l5"), 7, 7),
        ]
    );
}

fn breakpoint_program() -> Program {
    assemble(64, PROGRAM, |a, l| {
        a.mov(eax, 1u32)?;
        l.new_label(a, "bp1")?;
        a.mov(eax, 2u32)?;
        a.mov(eax, 3u32)?;
        l.new_label(a, "bp2")?;
        a.mov(ebx, eax)?;
        a.mov(eax, ebx)?;
        a.out(i32::from(PORT_VALUE), eax)?;
        a.hlt()?;
        l.new_label(a, "never1")?;
        a.nop()?;
        l.new_label(a, "never2")?;
        a.nop()?;
        l.new_label(a, "never3")?;
        a.nop()
    })
}

#[test]
fn breakpoints_stop_at_their_address() {
    breakpoints_on(&BACKENDS);
}

fn breakpoints_on(kinds: &[BackendKind]) {
    let prog = breakpoint_program();
    let Some(stops) = on_backends(kinds, |kind| {
        let mem = guest_memory();
        prog.load(&mem);
        let mut vm = make_vm(kind, &mem)?;
        let mut vcpu = vm.create_vcpu(0).unwrap();
        enter_long_mode(vcpu.as_mut(), PROGRAM, None);
        let mut bus = TestBus::default();
        // Hardware breakpoints on KVM (DR0-DR3).
        let bps = ["bp1", "bp2"].map(|n| prog.at(n));
        vcpu.set_breakpoints(&bps).unwrap();
        let mut stops = Vec::new();
        for _ in 0..3 {
            let e = run_to_exit(vcpu.as_mut(), &mut bus);
            stops.push((e, vcpu.regs().unwrap().rax));
            eprintln!(
                "{kind:?} after {e:?}: rip {:#x} events {:?}",
                vcpu.regs().unwrap().rip,
                bus.events
            );
        }
        assert_eq!(bus.writes_to(PORT_VALUE), vec![3]);
        vcpu.set_breakpoints(&[]).unwrap();
        // The software breakpoint's byte is back.
        let mut byte = [0u8; 1];
        vm_memory::Bytes::read_slice(&mem, &mut byte, vm_memory::GuestAddress(prog.at("bp2")))
            .unwrap();
        assert_ne!(byte[0], 0xcc);
        Some(stops)
    }) else {
        return;
    };
    assert_eq!(
        stops,
        vec![
            (
                VmExit::Debug {
                    rip: prog.at("bp1")
                },
                1
            ),
            (
                VmExit::Debug {
                    rip: prog.at("bp2")
                },
                3
            ),
            (VmExit::Hlt, 3),
        ]
    );
}

fn smp_programs() -> (Program, Program) {
    let bsp = assemble(64, PROGRAM, |a, _| {
        a.mov(rbx, APIC_BASE)?;
        a.mov(dword_ptr(rbx + 0x310), 1u32 << 24)?;
        // INIT (level assert), then a Startup IPI with vector 8 (0x8000).
        a.mov(dword_ptr(rbx + 0x300), 0x4500u32)?;
        a.mov(
            dword_ptr(rbx + 0x300),
            0x4600u32 | (AP_TRAMPOLINE >> 12) as u32,
        )?;
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.cmp(byte_ptr(SMP_FLAG), 0xab)?;
        a.jne(wait)?;
        a.mov(eax, 0x600du32)?;
        a.out(i32::from(PORT_MARK), eax)?;
        a.hlt()
    });
    let ap = assemble(16, AP_TRAMPOLINE, |a, _| {
        // Real mode, CS base 0x8000, DS base 0.
        a.mov(byte_ptr(SMP_FLAG), 0xab)?;
        a.mov(al, 1)?;
        a.out(i32::from(PORT_AP), al)?;
        a.hlt()
    });
    (bsp, ap)
}

/// Bus for one vCPU of the SMP scenario, sharing the local APICs.
fn smp_bus(
    apics: &Arc<Mutex<Vec<LocalApic>>>,
    ap_events: &Arc<Mutex<Vec<(usize, ApEvent)>>>,
) -> TestBus {
    TestBus {
        apics: Some(apics.clone()),
        ap_events: Some(ap_events.clone()),
        ..TestBus::default()
    }
}

fn take_startup(ap_events: &Mutex<Vec<(usize, ApEvent)>>) -> Option<u8> {
    let q = ap_events.lock().unwrap();
    // The AP starts at the Startup IPI that follows an INIT.
    let init = q.iter().position(|(t, e)| *t == 1 && *e == ApEvent::Init)?;
    q[init..].iter().find_map(|(t, e)| match e {
        ApEvent::Startup { vector } if *t == 1 => Some(*vector),
        _ => None,
    })
}

#[test]
fn two_vcpus_start_through_init_sipi() {
    let (bsp_prog, ap_prog) = smp_programs();
    let observed = on_all_backends(|kind| {
        let mem = guest_memory();
        bsp_prog.load(&mem);
        ap_prog.load(&mem);
        let apics = Arc::new(Mutex::new(vec![LocalApic::new(0), LocalApic::new_ap(1)]));
        let ap_events = Arc::new(Mutex::new(Vec::new()));
        match kind {
            BackendKind::Kvm => {
                if !kvm_usable() {
                    return None;
                }
                // One host thread per vCPU.
                let vm = KvmVm::new(&mem).unwrap();
                let mut bsp = vm.create_kvm_vcpu(0).unwrap();
                let mut ap = vm.create_kvm_vcpu(1).unwrap();
                enter_long_mode(&mut bsp, PROGRAM, None);
                std::thread::scope(|s| {
                    let ap_thread = s.spawn(|| {
                        let deadline = Instant::now() + Duration::from_secs(20);
                        let vector = loop {
                            if let Some(v) = take_startup(&ap_events) {
                                break v;
                            }
                            assert!(Instant::now() < deadline, "no INIT/SIPI reached the AP");
                            std::thread::sleep(Duration::from_millis(1));
                        };
                        let (regs, sregs) = kvm::sipi_state(vector, &ap.sregs().unwrap());
                        ap.set_sregs(&sregs).unwrap();
                        ap.set_regs(&regs).unwrap();
                        let mut bus = smp_bus(&apics, &ap_events);
                        let e = run_to_exit(&mut ap, &mut bus);
                        (bus.events, e)
                    });
                    let mut bus = smp_bus(&apics, &ap_events);
                    let e = run_to_exit(&mut bsp, &mut bus);
                    let (ap_events_seen, ap_exit) = ap_thread.join().unwrap();
                    Some((bus.events, e, ap_events_seen, ap_exit))
                })
            }
            BackendKind::Software => {
                // One software CPU runs both vCPUs in turn.
                let mut vm = make_vm(kind, &mem)?;
                let mut bsp = vm.create_vcpu(0).unwrap();
                let mut ap = vm.create_vcpu(1).unwrap();
                enter_long_mode(bsp.as_mut(), PROGRAM, None);
                let mut bsp_bus = smp_bus(&apics, &ap_events);
                let mut ap_bus = smp_bus(&apics, &ap_events);
                let (mut bsp_exit, mut ap_exit) = (None, None);
                let mut ap_started = false;
                for _ in 0..1000 {
                    if bsp_exit.is_none() {
                        match bsp.run(&mut bsp_bus, Some(20_000)).unwrap() {
                            VmExit::BudgetExhausted => {}
                            e => bsp_exit = Some(e),
                        }
                    }
                    if ap_exit.is_none() {
                        if !ap_started {
                            if let Some(vector) = take_startup(&ap_events) {
                                let (regs, sregs) = kvm::sipi_state(vector, &ap.sregs().unwrap());
                                ap.set_sregs(&sregs).unwrap();
                                ap.set_regs(&regs).unwrap();
                                ap_started = true;
                            }
                        }
                        if ap_started {
                            match ap.run(&mut ap_bus, Some(20_000)).unwrap() {
                                VmExit::BudgetExhausted => {}
                                e => ap_exit = Some(e),
                            }
                        }
                    }
                    if bsp_exit.is_some() && ap_exit.is_some() {
                        break;
                    }
                }
                Some((bsp_bus.events, bsp_exit?, ap_bus.events, ap_exit?))
            }
        }
    });
    let (bsp_events, bsp_exit, ap_events, ap_exit) = observed;
    assert_eq!(
        bsp_events,
        vec![
            Event::MmioWrite {
                vcpu: 0,
                addr: APIC_BASE + 0x310,
                value: 1 << 24
            },
            Event::MmioWrite {
                vcpu: 0,
                addr: APIC_BASE + 0x300,
                value: 0x4500
            },
            Event::MmioWrite {
                vcpu: 0,
                addr: APIC_BASE + 0x300,
                value: 0x4608
            },
            Event::PioWrite {
                vcpu: 0,
                port: PORT_MARK,
                value: 0x600d
            },
        ]
    );
    assert_eq!(
        ap_events,
        vec![Event::PioWrite {
            vcpu: 1,
            port: PORT_AP,
            value: 1
        }]
    );
    assert_eq!((bsp_exit, ap_exit), (VmExit::Hlt, VmExit::Hlt));
}

/// A KVM VM of `mem` and its vCPU 0 in long mode at `PROGRAM` (the VM is
/// kept alive beside it), or `None` where `/dev/kvm` is not usable.
fn kvm_vcpu_in_long_mode(mem: &vm_memory::GuestMemoryMmap) -> Option<(KvmVm, kvm::KvmVcpu)> {
    if !kvm_usable() {
        return None;
    }
    let vm = KvmVm::new(mem).unwrap();
    let mut vcpu = vm.create_kvm_vcpu(0).unwrap();
    enter_long_mode(&mut vcpu, PROGRAM, None);
    Some((vm, vcpu))
}

fn user_busy_loop_program() -> Program {
    assemble(64, PROGRAM, |a, _| {
        let mut user = a.create_label();
        emit_iretq_to_user(a, user)?;
        a.set_label(&mut user)?;
        a.inc(rbx)?;
        a.jmp(user)
    })
}

/// The no-PMU policy: a timer that fires while the guest spins in ring 3
/// gets the vCPU back at once (user mode is not replayed, so its position
/// needs no count), and the interrupt reaches the handler from ring 3.
#[test]
fn timer_interrupt_reaches_a_ring3_busy_loop() {
    let prog = user_busy_loop_program();
    let events = on_all_backends(|kind| {
        let mem = guest_memory();
        prog.load(&mem);
        set_post_interrupt(&mem, POST_HALT);
        let mut bus = TestBus::default();
        match kind {
            BackendKind::Kvm => {
                let (_vm, mut vcpu) = kvm_vcpu_in_long_mode(&mem)?;
                let kicker = vcpu.kicker();
                let flag = bus.stop_flag.clone();
                let timer = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(30));
                    flag.store(true, Ordering::SeqCst);
                    kicker.kick();
                });
                let e = vcpu.run(&mut bus, None).unwrap();
                timer.join().unwrap();
                assert_eq!(e, VmExit::IoStop);
                if vcpu.async_event_mode() == kvm::AsyncEventMode::DeterministicPoints {
                    assert_eq!(vcpu.last_async_position(), Some(AsyncPosition::UserMode));
                }
                let stats = vcpu.async_delivery_stats();
                eprintln!(
                    "kvm: {}; timer kick to return: {:?}",
                    vcpu.async_event_mode().describe(),
                    stats.max_latency
                );
                assert_eq!(vcpu.sregs().unwrap().cs.selector & 3, 3);
                assert!(vcpu.regs().unwrap().rbx > 0, "the ring-3 loop ran");
                bus.stop_flag.store(false, Ordering::SeqCst);
                vcpu.inject(Injection::Interrupt(0x20)).unwrap();
                assert_eq!(vcpu.run(&mut bus, None).unwrap(), VmExit::Hlt);
            }
            BackendKind::Software => {
                let mut vm = make_vm(kind, &mem)?;
                let mut vcpu = vm.create_vcpu(0).unwrap();
                enter_long_mode(vcpu.as_mut(), PROGRAM, None);
                // The software CPU's timer is its instruction budget.
                assert_eq!(
                    vcpu.run(&mut bus, Some(100_000)).unwrap(),
                    VmExit::BudgetExhausted
                );
                assert_eq!(vcpu.sregs().unwrap().cs.selector & 3, 3);
                assert!(vcpu.interrupt_window_open().unwrap());
                vcpu.inject(Injection::Interrupt(0x20)).unwrap();
                assert_eq!(run_to_exit(vcpu.as_mut(), &mut bus), VmExit::Hlt);
            }
        }
        Some(bus.events)
    });
    assert_eq!(
        events,
        vec![
            Event::PioWrite {
                vcpu: 0,
                port: PORT_VECTOR,
                value: 0x20
            },
            Event::PioWrite {
                vcpu: 0,
                port: PORT_FRAME_CS,
                value: u64::from(USER_CS)
            },
        ]
    );
}

/// KVM only: a kick that finds the guest in kernel mode waits for the next
/// port access (a deterministic point) instead of stopping at an arbitrary
/// instruction; the added latency is measured.
#[test]
fn kernel_mode_kick_waits_for_the_next_io_exit() {
    let prog = assemble(64, PROGRAM, |a, l| {
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.inc(ebx)?;
        a.test(ebx, 0xff)?;
        a.jnz(spin)?;
        a.out(i32::from(PORT_TICK), eax)?;
        l.new_label(a, "after_out")?;
        a.jmp(spin)
    });
    if !kvm_usable() {
        return;
    }
    let mem = guest_memory();
    prog.load(&mem);
    let mut vm = KvmVm::new(&mem).unwrap();
    // The policy a host without a PMU uses, checked on every host.
    vm.use_deterministic_points();
    let mut vcpu = vm.create_kvm_vcpu(0).unwrap();
    enter_long_mode(&mut vcpu, PROGRAM, None);
    assert_eq!(
        vcpu.async_event_mode(),
        kvm::AsyncEventMode::DeterministicPoints
    );
    let mut bus = TestBus::default();
    let rounds = 5;
    for _ in 0..rounds {
        let kicker = vcpu.kicker();
        let flag = bus.stop_flag.clone();
        let timer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            flag.store(true, Ordering::SeqCst);
            kicker.kick();
        });
        let e = vcpu.run(&mut bus, None).unwrap();
        timer.join().unwrap();
        bus.stop_flag.store(false, Ordering::SeqCst);
        assert_eq!(e, VmExit::IoStop);
        let pos = vcpu.last_async_position();
        let rip = vcpu.regs().unwrap().rip;
        // Right after the OUT, by the kick (AfterIo) or, when the OUT came
        // between the flag and the kick, by the flag alone (no position).
        assert!(
            matches!(pos, Some(AsyncPosition::AfterIo) | None) && rip == prog.at("after_out"),
            "stopped at {pos:?}, rip {rip:#x}; expected right after the OUT at {:#x}",
            prog.at("after_out")
        );
    }
    let stats = vcpu.async_delivery_stats();
    // Each round stopped right after the OUT (checked above). A round whose
    // OUT comes between the flag and the kick stops on the flag alone, and
    // its kick finds the run over: it is not counted as delivered, so the
    // count may fall short of the rounds, but no kick may stop the guest
    // anywhere else.
    assert!(
        (1..=rounds).contains(&stats.delivered_after_io),
        "{} kicks delivered after I/O in {rounds} rounds",
        stats.delivered_after_io
    );
    assert_eq!(
        stats.delivered_total(),
        stats.delivered_after_io,
        "{stats:?}"
    );
    println!(
        "deterministic-point delivery: {} kicks, mean added latency {:?}, max {:?}",
        stats.requests,
        stats.total_latency / stats.requests as u32,
        stats.max_latency
    );
}

/// Loops of known lengths, an OUT after each: one conditional branch per
/// iteration, nothing else that branches conditionally.
fn counted_loops_program(loops: &[u32]) -> Program {
    let loops = loops.to_vec();
    assemble(64, PROGRAM, move |a, _| {
        for (i, &n) in loops.iter().enumerate() {
            let mut again = a.create_label();
            a.mov(ecx, n)?;
            a.set_label(&mut again)?;
            a.dec(ecx)?;
            a.jnz(again)?;
            a.mov(eax, i as u32)?;
            a.out(i32::from(PORT_TICK), eax)?;
        }
        a.hlt()
    })
}

/// The guest PMU counter KVM positions events with, against the software
/// CPU's exact count on the same tiny guest: between two OUTs the software
/// CPU retires `2n + 3` instructions (so the loop ran `n` times) and the
/// counter must count exactly `n` retired conditional branches. A host
/// without a PMU skips (and fails under `KRR_TEST_REQUIRE_KVM`).
#[test]
fn the_guest_branch_counter_agrees_with_the_software_cpu() {
    let loops = [1u32, 7, 1000, 123_457];
    let prog = counted_loops_program(&loops);
    let per_out = |kind: BackendKind| -> Option<Vec<u64>> {
        let mem = guest_memory();
        prog.load(&mem);
        let mut bus = TestBus::default();
        let mut counts = Vec::new();
        match kind {
            BackendKind::Software => {
                let mut vm = make_vm(kind, &mem)?;
                let mut vcpu = vm.create_vcpu(0).unwrap();
                enter_long_mode(vcpu.as_mut(), PROGRAM, None);
                for i in 0..loops.len() {
                    bus.stop_after_write = Some((PORT_TICK, i as u64));
                    assert_eq!(run_to_exit(vcpu.as_mut(), &mut bus), VmExit::IoStop);
                    counts.push(vcpu.instructions_retired().expect("exact counts"));
                }
            }
            BackendKind::Kvm => {
                let (_vm, mut vcpu) = kvm_vcpu_in_long_mode(&mem)?;
                let kvm::AsyncEventMode::PmuCounted(event) = vcpu.async_event_mode() else {
                    skip_kvm(&format!(
                        "(KVM half) no guest PMU counter on this host: {}",
                        vcpu.async_event_mode().describe()
                    ));
                    return None;
                };
                eprintln!("counting {event:?}");
                for i in 0..loops.len() {
                    bus.stop_after_write = Some((PORT_TICK, i as u64));
                    assert_eq!(run_to_exit(&mut vcpu, &mut bus), VmExit::IoStop);
                    counts.push(vcpu.guest_event_count().expect("the counter is open"));
                }
            }
        }
        Some(counts.windows(2).map(|w| w[1] - w[0]).collect())
    };
    let instructions = per_out(BackendKind::Software).unwrap();
    let iterations: Vec<u64> = instructions.iter().map(|i| (i - 3) / 2).collect();
    assert_eq!(
        iterations,
        loops[1..].iter().map(|&n| u64::from(n)).collect::<Vec<_>>(),
        "the software CPU ran the loops as written ({instructions:?} instructions between OUTs)"
    );
    if let Some(branches) = per_out(BackendKind::Kvm) {
        assert_eq!(
            branches, iterations,
            "retired conditional branches counted by the guest PMU vs the loops the software CPU ran"
        );
    }
}

#[test]
fn auto_backend_choice_has_a_reason() {
    let choice = kvm::select_backend("auto").unwrap();
    println!("--backend auto: {:?}: {}", choice.backend, choice.reason);
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(choice.backend, krr_engine::hypervisor::Backend::Tcg);
    }
}

/// More than four breakpoints: on KVM the fifth is a software breakpoint
/// (int3 written into guest memory). PVM cannot stop at an int3 in guest
/// kernel mode, so there the backend must refuse with a reason.
#[test]
fn software_breakpoints_beyond_the_four_hardware_ones() {
    software_breakpoints_on(&BACKENDS);
}

fn software_breakpoints_on(kinds: &[BackendKind]) {
    let prog = breakpoint_program();
    let Some(stops) = on_backends(kinds, |kind| {
        let mem = guest_memory();
        prog.load(&mem);
        let mut vm = make_vm(kind, &mem)?;
        let mut vcpu = vm.create_vcpu(0).unwrap();
        enter_long_mode(vcpu.as_mut(), PROGRAM, None);
        let bps = ["bp1", "never1", "never2", "never3", "bp2"].map(|n| prog.at(n));
        if kind == BackendKind::Kvm && on_pvm() {
            let err = vcpu.set_breakpoints(&bps).unwrap_err().to_string();
            assert!(err.contains("not hardware-backed"), "{err}");
            skip_kvm(&format!("(KVM half) {err}"));
            return None;
        }
        vcpu.set_breakpoints(&bps).unwrap();
        let mut bus = TestBus::default();
        let mut stops = Vec::new();
        for _ in 0..3 {
            let e = run_to_exit(vcpu.as_mut(), &mut bus);
            stops.push((e, vcpu.regs().unwrap().rax));
        }
        vcpu.set_breakpoints(&[]).unwrap();
        let mut byte = [0u8; 1];
        vm_memory::Bytes::read_slice(&mem, &mut byte, vm_memory::GuestAddress(prog.at("bp2")))
            .unwrap();
        assert_ne!(byte[0], 0xcc, "the int3 byte was put back");
        Some(stops)
    }) else {
        return;
    };
    assert_eq!(
        stops,
        vec![
            (
                VmExit::Debug {
                    rip: prog.at("bp1")
                },
                1
            ),
            (
                VmExit::Debug {
                    rip: prog.at("bp2")
                },
                3
            ),
            (VmExit::Hlt, 3),
        ]
    );
}
