// SPDX-License-Identifier: GPL-2.0-or-later
//! One vCPU of the software CPU: its run (budgets, steps, breakpoints,
//! injected events) and its register state through the unicorn API and
//! QEMU's CPU state.

use super::hooks::*;
use super::*;

/// One vCPU of a [`UnicornVm`].
pub struct UnicornVcpu {
    pub(super) id: usize,
    pub(super) engine: Rc<RefCell<Engine>>,
}

pub(super) fn seg_to_api(c: &SegmentCache) -> Segment {
    let f = c.flags;
    Segment {
        selector: c.selector,
        base: c.base,
        limit: c.limit,
        type_: ((f >> 8) & 0xf) as u8,
        present: f & DESC_P_MASK != 0,
        dpl: ((f >> DESC_DPL_SHIFT) & 3) as u8,
        db: f & DESC_B_MASK != 0,
        s: f & DESC_S_MASK != 0,
        l: f & DESC_L_MASK != 0,
        g: f & DESC_G_MASK != 0,
        avl: f & (1 << 20) != 0,
        unusable: f & DESC_P_MASK == 0,
    }
}

pub(super) fn seg_from_api(s: &Segment) -> SegmentCache {
    let mut f = ((s.type_ as u32) & 0xf) << 8 | ((s.dpl as u32) & 3) << DESC_DPL_SHIFT;
    if s.present && !s.unusable {
        f |= DESC_P_MASK;
    }
    if s.s {
        f |= DESC_S_MASK;
    }
    if s.db {
        f |= DESC_B_MASK;
    }
    if s.l {
        f |= DESC_L_MASK;
    }
    if s.g {
        f |= DESC_G_MASK;
    }
    if s.avl {
        f |= 1 << 20;
    }
    SegmentCache {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        flags: f,
    }
}

pub(super) fn mmr(uc: *mut uc_engine, reg: RegisterX86) -> uc_x86_mmr {
    let mut t = uc_x86_mmr {
        selector: 0,
        base: 0,
        limit: 0,
        flags: 0,
    };
    // SAFETY: `uc` is the engine's open handle and `t` a live uc_x86_mmr, the
    // type unicorn writes for GDTR, IDTR, TR and LDTR, the only registers
    // passed.
    unsafe { uc_reg_read(uc, reg as i32, &mut t as *mut uc_x86_mmr as *mut c_void) };
    t
}

pub(super) fn set_mmr(uc: *mut uc_engine, reg: RegisterX86, t: uc_x86_mmr) {
    // SAFETY: `uc` is the engine's open handle and `t` a live uc_x86_mmr, the
    // type unicorn reads for GDTR, IDTR, TR and LDTR, the only registers
    // passed.
    unsafe { uc_reg_write(uc, reg as i32, &t as *const uc_x86_mmr as *const c_void) };
}

pub(super) const GPRS: [RegisterX86; 18] = [
    RegisterX86::RAX,
    RegisterX86::RBX,
    RegisterX86::RCX,
    RegisterX86::RDX,
    RegisterX86::RSI,
    RegisterX86::RDI,
    RegisterX86::RSP,
    RegisterX86::RBP,
    RegisterX86::R8,
    RegisterX86::R9,
    RegisterX86::R10,
    RegisterX86::R11,
    RegisterX86::R12,
    RegisterX86::R13,
    RegisterX86::R14,
    RegisterX86::R15,
    RegisterX86::RIP,
    RegisterX86::RFLAGS,
];

/// How a step ended.
pub(super) enum StepEnd {
    /// The instruction retired (or raised an exception that was delivered);
    /// `io_stop`: one of its accesses asked for a stop.
    Retired { io_stop: bool },
    /// The step ends the run with this exit.
    Exit(VmExit),
}

/// CS base + RIP: the address unicorn translates, and exits compare with.
pub(super) fn linear_rip(env: &EnvLayout, rip: u64) -> u64 {
    env.segment(Seg::Cs).base.wrapping_add(rip)
}

pub(super) fn is_breakpoint(e: &Engine, id: usize, rip: u64) -> bool {
    let bps = &e.slots[id].breakpoints;
    !bps.is_empty() && bps.contains(&linear_rip(&e.st().env, rip))
}

/// Whether the instruction before `rip` is HLT (unicorn reports a halt only
/// by returning).
pub(super) fn halted_after(uc: *mut uc_engine, env: &EnvLayout, rip: u64) -> bool {
    let mut b = [0u8; 1];
    let at = linear_rip(env, rip).wrapping_sub(1);
    // SAFETY: `uc` is the engine's open handle (`Engine::uc`); `b` is a live
    // 1-byte buffer and the size passed is 1.
    let ok = unsafe { uc_vmem_read(uc, at, Prot::EXEC, b.as_mut_ptr() as *mut c_void, 1) }
        == uc_error::OK;
    ok && b[0] == 0xf4
}

/// Whether the instruction at `rip` is a string instruction with a REP,
/// REPE or REPNE prefix (QEMU translates all of these with its `gen_repz`).
pub(super) fn rep_string_at(uc: *mut uc_engine, env: &EnvLayout, rip: u64) -> bool {
    // Prefixes and opcode of the longest such instruction fit in 15 bytes.
    let mut code = [0u8; 15];
    let at = linear_rip(env, rip);
    // Read what is there, up to the end of the page (the next one may not
    // be mapped).
    let len = (0x1000 - (at & 0xfff) as usize).min(code.len());
    // SAFETY: `uc` is the engine's open handle (`Engine::uc`); `code` is a
    // live buffer of at least `len` bytes.
    let ok =
        unsafe { uc_vmem_read(uc, at, Prot::EXEC, code.as_mut_ptr().cast(), len) } == uc_error::OK;
    if !ok {
        return false;
    }
    let hflags = env.hflags();
    let bitness = if hflags & internals::HF_CS64_MASK != 0 {
        64
    } else if hflags & internals::HF_CS32_MASK != 0 {
        32
    } else {
        16
    };
    let mut decoder =
        iced_x86::Decoder::with_ip(bitness, &code[..len], rip, iced_x86::DecoderOptions::NONE);
    let insn = decoder.decode();
    use iced_x86::Code::*;
    let string = matches!(
        insn.code(),
        Insb_m8_DX
            | Insw_m16_DX
            | Insd_m32_DX
            | Outsb_DX_m8
            | Outsw_DX_m16
            | Outsd_DX_m32
            | Movsb_m8_m8
            | Movsw_m16_m16
            | Movsd_m32_m32
            | Movsq_m64_m64
            | Cmpsb_m8_m8
            | Cmpsw_m16_m16
            | Cmpsd_m32_m32
            | Cmpsq_m64_m64
            | Stosb_m8_AL
            | Stosw_m16_AX
            | Stosd_m32_EAX
            | Stosq_m64_RAX
            | Lodsb_AL_m8
            | Lodsw_AX_m16
            | Lodsd_EAX_m32
            | Lodsq_RAX_m64
            | Scasb_AL_m8
            | Scasw_AX_m16
            | Scasd_EAX_m32
            | Scasq_RAX_m64
    );
    string && (insn.has_rep_prefix() || insn.has_repne_prefix())
}

impl UnicornVcpu {
    /// Runs `f` with this vCPU's registers loaded in the engine.
    fn with<T>(&self, f: impl FnOnce(&mut Engine) -> Result<T>) -> Result<T> {
        let mut e = self.engine.borrow_mut();
        e.activate(self.id)?;
        f(&mut e)
    }

    /// The body of [`Vcpu::run`], with the bus installed.
    fn run_with_bus(&self, e: &mut Engine, budget: Option<u64>) -> Result<VmExit> {
        let uc = e.uc;
        let slot = &e.slots[self.id];
        let single_step = slot.single_step;
        let window_requested = slot.window_requested;
        let st = e.st();
        if window_requested && st.window_open() {
            return Ok(VmExit::InterruptWindow);
        }
        let rip = st.env.eip();
        // The budget counts from here, a step over a breakpoint included.
        let run_start = st.counter.retired;
        // A step, like a run, executes no user code when asked to stop
        // before it (replay of the kernel alone).
        if single_step && st.stop_at_user && st.env.cpl() == 3 {
            return Ok(VmExit::UserMode { rip });
        }
        let at_breakpoint = is_breakpoint(e, self.id, rip);
        if single_step || at_breakpoint {
            // Single-step, or resume from a breakpoint: execute the
            // instruction there without stopping at it (gdb semantics),
            // counted as a run from there would count it.
            e.st().position_step_as_block(rip);
            let step = self.step(e, Vec::new());
            e.st().position_override = None;
            let step = step?;
            let st = e.st();
            let rip = st.env.eip();
            match step {
                StepEnd::Exit(exit) => return Ok(exit),
                StepEnd::Retired { io_stop: true } => return Ok(VmExit::IoStop),
                StepEnd::Retired { io_stop: false } => {}
            }
            if single_step || is_breakpoint(e, self.id, rip) {
                return Ok(VmExit::Debug { rip });
            }
            if st.stop_at_user && st.env.cpl() == 3 {
                return Ok(VmExit::UserMode { rip });
            }
            if window_requested && e.st().window_open() {
                return Ok(VmExit::InterruptWindow);
            }
        }
        let st = e.st();
        st.window_requested = window_requested;
        st.stop = None;
        st.recent.clear();
        // A spin is counted within one run: where a run starts does not
        // depend on the runs of other vCPUs.
        st.spin_pc = u64::MAX;
        st.spin_repeats = 0;
        if st.stop_at_user {
            st.cr2_at_run_start = read_reg(uc, RegisterX86::CR2);
        }
        st.stop_at = match budget {
            Some(b) => run_start.saturating_add(b),
            None => u64::MAX,
        };
        st.sync_inline_limit();
        let rip = st.env.eip();
        // SAFETY: `uc` is this engine's live handle; the hooks reach the
        // hook state through their own pointer while it runs, so no
        // reference to it is held across the call (`st` is taken anew).
        let err = unsafe { uc_emu_start(uc, rip, 0, 0, 0) };
        let st = e.st();
        st.window_requested = false;
        if let Some(what) = st.hook_panic.take() {
            return Err(hook_panicked(what));
        }
        let stop = st.stop.take();
        let new_rip = st.env.eip();
        if let Some(Stop::Shutdown(msg)) = stop {
            tracing::warn!(vcpu = self.id, "{msg}");
            return Ok(VmExit::Shutdown);
        }
        if err != uc_error::OK {
            return Err(HypervisorError::Backend {
                backend: BACKEND,
                op: "emu_start",
                reason: format!("{err:?} at rip {new_rip:#x}"),
            });
        }
        match stop {
            Some(Stop::Budget) => return Ok(VmExit::BudgetExhausted),
            Some(Stop::Window) => return Ok(VmExit::InterruptWindow),
            Some(Stop::Io) => {
                // RIP is at the start of the instruction whose access asked
                // for the stop; finish it, replaying what it already did.
                // Its block was counted whole on entry: take back the
                // instructions from RIP on (the step counts this one).
                st.uncount_rest_of_block(new_rip)
                    .map_err(|reason| HypervisorError::Backend {
                        backend: BACKEND,
                        op: "I/O stop",
                        reason,
                    })?;
                let made = std::mem::take(&mut st.recent);
                st.exits_by_kind.io_stops += 1;
                return match self.step(e, made)? {
                    StepEnd::Exit(exit) => Ok(exit),
                    StepEnd::Retired { .. } => Ok(VmExit::IoStop),
                };
            }
            Some(Stop::Breakpoint) => {
                st.uncount_rest_of_block(new_rip)
                    .map_err(|reason| HypervisorError::Backend {
                        backend: BACKEND,
                        op: "breakpoint",
                        reason,
                    })?;
                return Ok(VmExit::Debug { rip: new_rip });
            }
            Some(Stop::UserMode) => return Ok(VmExit::UserMode { rip: new_rip }),
            Some(Stop::Watch) => return Ok(VmExit::Watchpoint),
            Some(Stop::Spin) => return Ok(VmExit::Spin),
            Some(Stop::Step) | Some(Stop::Shutdown(_)) | Some(Stop::HookPanic) | None => {}
        }
        // Otherwise emulation stopped on its own: HLT.
        if halted_after(uc, &e.st().env, new_rip) {
            return Ok(VmExit::Hlt);
        }
        Err(HypervisorError::Backend {
            backend: BACKEND,
            op: "emu_start",
            reason: format!("stopped without a reason at rip {new_rip:#x}"),
        })
    }

    /// Executes exactly one instruction with TF set: QEMU then translates a
    /// block of that one instruction and raises the single-step trap after
    /// it, which the interrupt hook takes as the end of the step. Accesses
    /// in `replay` are handed back instead of reaching the bus again.
    /// A breakpoint at RIP is not hit.
    ///
    /// A REP string instruction is stepped without TF (unless the guest set
    /// it): one block, as a run executes it. A run executes each iteration
    /// as a block of its own and, after the last, enters the instruction's
    /// block once more to find (E/R)CX zero and leave; with TF, QEMU leaves
    /// right after the last iteration instead (its `repz_opt`). Counted by
    /// blocks, a step would then count one instruction less than a run for
    /// each such loop, and steps and runs would disagree about where a
    /// count is: a debugger's point, or a replay's end, reached by stepping
    /// would not be the one a run reaches.
    fn step(&self, e: &mut Engine, replay: Vec<Access>) -> Result<StepEnd> {
        let uc = e.uc;
        let rip = e.st().env.eip();
        let rflags = read_reg(uc, RegisterX86::RFLAGS);
        let guest_tf = rflags & RFLAGS_TF != 0;
        let dr6 = read_reg(uc, RegisterX86::DR6);
        e.st().lifted_breakpoint = Some(linear_rip(&e.st().env, rip));
        let as_run = !guest_tf && rep_string_at(uc, &e.st().env, rip);
        if !as_run {
            write_reg(uc, RegisterX86::RFLAGS, rflags | RFLAGS_TF);
        }
        let st = e.st();
        st.replay = replay;
        st.replay_next = None;
        st.replay_error = None;
        st.stepping = Some(StepState {
            guest_tf,
            no_trap: as_run,
            ..StepState::default()
        });
        st.stop = None;
        let stop_at = st.stop_at;
        st.stop_at = u64::MAX;
        st.sync_inline_limit();
        // SAFETY: as in `run_with_bus`: no reference to the hook state is
        // held across the call.
        let err = unsafe { uc_emu_start(uc, rip, 0, 0, 0) };
        let st = e.st();
        st.stop_at = stop_at;
        if let Some(what) = st.hook_panic.take() {
            st.stepping = None;
            st.replay.clear();
            st.lifted_breakpoint = None;
            return Err(hook_panicked(what));
        }
        let step = st.stepping.take().unwrap_or_default();
        st.replay.clear();
        let stop = st.stop.take();
        let replay_error = st.replay_error.take();
        let new_rip = st.env.eip();
        st.lifted_breakpoint = None;
        if !guest_tf {
            let now = read_reg(uc, RegisterX86::RFLAGS);
            write_reg(uc, RegisterX86::RFLAGS, now & !RFLAGS_TF);
            if step.trapped {
                write_reg(uc, RegisterX86::DR6, dr6);
            }
        }
        if let Some(Stop::Shutdown(msg)) = stop {
            tracing::warn!(vcpu = self.id, "{msg}");
            return Ok(StepEnd::Exit(VmExit::Shutdown));
        }
        if err != uc_error::OK {
            return Err(HypervisorError::Backend {
                backend: BACKEND,
                op: "step",
                reason: format!("{err:?} at rip {new_rip:#x}"),
            });
        }
        if let Some(reason) = replay_error {
            return Err(HypervisorError::Backend {
                backend: BACKEND,
                op: "complete the instruction at an I/O stop",
                reason: format!("at rip {rip:#x}: {reason}"),
            });
        }
        if stop.is_none() && !step.trapped {
            if halted_after(uc, &e.st().env, new_rip) {
                return Ok(StepEnd::Exit(VmExit::Hlt));
            }
            return Err(HypervisorError::Backend {
                backend: BACKEND,
                op: "step",
                reason: format!("step from {rip:#x} stopped without a reason at {new_rip:#x}"),
            });
        }
        Ok(StepEnd::Retired {
            io_stop: step.io_stop,
        })
    }

    fn try_deliver_pending(&self, e: &mut Engine) -> Option<String> {
        // SAFETY: `e.state` is the engine's live hook state; `e` is borrowed
        // exclusively, so no other engine code holds a reference to it, and
        // no hook runs (the engine is not inside uc_emu_start), except the
        // (unverified) MMIO nesting described in `on_mmio_read`.
        let st = unsafe { &mut *e.state.get() };
        let slot = &mut e.slots[self.id];
        if slot.pending.is_empty() {
            return None;
        }
        let ev = slot.pending[0];
        let (vector, kind) = match ev {
            Injection::Interrupt(v) => {
                let rflags = read_reg(e.uc, RegisterX86::RFLAGS);
                if rflags & (1 << 9) == 0 || st.env.interrupt_shadow() {
                    return None;
                }
                (v, EventKind::External)
            }
            Injection::Nmi => (2, EventKind::External),
            Injection::SoftwareInterrupt(vector) => (vector, EventKind::Software),
            Injection::Exception {
                vector,
                error_code,
                cr2,
            } => {
                match (vector, cr2) {
                    (1, Some(dr6)) => write_reg(e.uc, RegisterX86::DR6, dr6),
                    (_, Some(cr2)) => write_reg(e.uc, RegisterX86::CR2, cr2),
                    (_, None) => {}
                }
                (vector, EventKind::Exception { error_code })
            }
        };
        slot.pending.remove(0);
        st.exits_by_kind.interrupts += 1;
        deliver(e.uc, &st.env, vector, kind)
            .err()
            .map(|t| format!("triple fault: {}", t.0))
    }
}

impl Vcpu for UnicornVcpu {
    fn run(&mut self, bus: &mut dyn RunContext, budget: Option<u64>) -> Result<VmExit> {
        let mut e = self.engine.borrow_mut();
        e.activate(self.id)?;
        if let Some(msg) = self.try_deliver_pending(&mut e) {
            tracing::warn!(vcpu = self.id, "{msg}");
            return Ok(VmExit::Shutdown);
        }
        let breakpoints = e.slots[self.id].breakpoints.clone();
        let st = e.st();
        st.breakpoints = breakpoints;
        // The lifetime is erased for storage in the hook state.
        let bus_ptr: *mut (dyn RunContext + '_) = bus;
        // SAFETY: (unverified) the transmute changes only the trait object's
        // lifetime bound (same pointer, same vtable). The pointer is used
        // only by hooks, through `HookState::bus`, during `run_with_bus`
        // below, while `bus` is borrowed by this call and not otherwise
        // used, and is cleared right after. If `run_with_bus` unwound, it
        // would stay set; a later `run` replaces it before emulating, but an
        // MMIO callback during that run's `try_deliver_pending` (see
        // `on_mmio_read`) could still see the stale pointer.
        st.bus = Some(unsafe {
            std::mem::transmute::<*mut (dyn RunContext + '_), *mut dyn RunContext>(bus_ptr)
        });
        let result = self.run_with_bus(&mut e, budget);
        let st = e.st();
        st.bus = None;
        st.stepping = None;
        st.replay.clear();
        st.recent.clear();
        result
    }

    fn regs(&self) -> Result<Regs> {
        self.with(|e| {
            let v: Vec<u64> = GPRS.iter().map(|r| read_reg(e.uc, *r)).collect();
            Ok(Regs {
                rax: v[0],
                rbx: v[1],
                rcx: v[2],
                rdx: v[3],
                rsi: v[4],
                rdi: v[5],
                rsp: v[6],
                rbp: v[7],
                r8: v[8],
                r9: v[9],
                r10: v[10],
                r11: v[11],
                r12: v[12],
                r13: v[13],
                r14: v[14],
                r15: v[15],
                rip: v[16],
                rflags: v[17],
            })
        })
    }

    fn set_regs(&mut self, r: &Regs) -> Result<()> {
        self.with(|e| {
            let v = [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ];
            for (reg, val) in GPRS.iter().zip(v) {
                write_reg(e.uc, *reg, val);
            }
            write_reg(e.uc, RegisterX86::RFLAGS, r.rflags);
            e.st().env.set_eip(r.rip);
            Ok(())
        })
    }

    fn sregs(&self) -> Result<Sregs> {
        self.with(|e| {
            let env = &e.st().env;
            let gdt = mmr(e.uc, RegisterX86::GDTR);
            let idt = mmr(e.uc, RegisterX86::IDTR);
            let tr = mmr(e.uc, RegisterX86::TR);
            let ldt = mmr(e.uc, RegisterX86::LDTR);
            let tr_cache = SegmentCache {
                selector: tr.selector,
                base: tr.base,
                limit: tr.limit,
                flags: tr.flags,
            };
            let ldt_cache = SegmentCache {
                selector: ldt.selector,
                base: ldt.base,
                limit: ldt.limit,
                flags: ldt.flags,
            };
            Ok(Sregs {
                cs: seg_to_api(&env.segment(Seg::Cs)),
                ds: seg_to_api(&env.segment(Seg::Ds)),
                es: seg_to_api(&env.segment(Seg::Es)),
                fs: seg_to_api(&env.segment(Seg::Fs)),
                gs: seg_to_api(&env.segment(Seg::Gs)),
                ss: seg_to_api(&env.segment(Seg::Ss)),
                tr: seg_to_api(&tr_cache),
                ldt: seg_to_api(&ldt_cache),
                gdt: DescriptorTable {
                    base: gdt.base,
                    limit: gdt.limit as u16,
                },
                idt: DescriptorTable {
                    base: idt.base,
                    limit: idt.limit as u16,
                },
                cr0: read_reg(e.uc, RegisterX86::CR0),
                cr2: read_reg(e.uc, RegisterX86::CR2),
                cr3: read_reg(e.uc, RegisterX86::CR3),
                cr4: read_reg(e.uc, RegisterX86::CR4),
                cr8: read_reg(e.uc, RegisterX86::CR8),
                efer: read_msr(e.uc, 0xc000_0080),
                apic_base: read_msr(e.uc, 0x1b),
            })
        })
    }

    fn set_sregs(&mut self, s: &Sregs) -> Result<()> {
        self.with(|e| {
            let uc = e.uc;
            // Order matters: paging and long mode first, so that the CS load
            // below sees LMA and sets the 64-bit code flags.
            write_reg(uc, RegisterX86::CR4, s.cr4);
            let env = &e.st().env;
            // WRMSR cannot clear EFER.LMA; loading a state must.
            env.set_efer(s.efer);
            write_reg(uc, RegisterX86::CR3, s.cr3);
            write_reg(uc, RegisterX86::CR0, s.cr0);
            env.set_efer(s.efer);
            write_reg(uc, RegisterX86::CR2, s.cr2);
            write_reg(uc, RegisterX86::CR8, s.cr8);
            set_mmr(
                uc,
                RegisterX86::GDTR,
                uc_x86_mmr {
                    selector: 0,
                    base: s.gdt.base,
                    limit: s.gdt.limit as u32,
                    flags: 0,
                },
            );
            set_mmr(
                uc,
                RegisterX86::IDTR,
                uc_x86_mmr {
                    selector: 0,
                    base: s.idt.base,
                    limit: s.idt.limit as u32,
                    flags: 0,
                },
            );
            let tr = seg_from_api(&s.tr);
            set_mmr(
                uc,
                RegisterX86::TR,
                uc_x86_mmr {
                    selector: tr.selector,
                    base: tr.base,
                    limit: tr.limit,
                    flags: tr.flags,
                },
            );
            let ldt = seg_from_api(&s.ldt);
            set_mmr(
                uc,
                RegisterX86::LDTR,
                uc_x86_mmr {
                    selector: ldt.selector,
                    base: ldt.base,
                    limit: ldt.limit,
                    flags: ldt.flags,
                },
            );
            for (idx, seg) in [
                (Seg::Ss, &s.ss),
                (Seg::Cs, &s.cs),
                (Seg::Ds, &s.ds),
                (Seg::Es, &s.es),
                (Seg::Fs, &s.fs),
                (Seg::Gs, &s.gs),
            ] {
                env.load_segment(idx, seg_from_api(seg));
            }
            if s.apic_base != 0 {
                let msr = uc_x86_msr {
                    rid: 0x1b,
                    value: s.apic_base,
                };
                // SAFETY: (unverified) `uc` is the open, idle engine and
                // `msr` a live uc_x86_msr, the type UC_X86_REG_MSR reads.
                // helper_wrmsr returns normally outside SVM guest mode, which
                // this assumes as `read_msr` explains.
                unsafe {
                    uc_reg_write(
                        uc,
                        RegisterX86::MSR as i32,
                        &msr as *const _ as *const c_void,
                    )
                };
            }
            Ok(())
        })
    }

    fn fpu(&self) -> Result<FpuState> {
        self.with(|e| {
            // FXSAVE layout: FCW, FSW, FTW(abridged), ..., MXCSR at 24,
            // ST0-7 at 32, XMM0-15 at 160.
            let mut x = vec![0u8; 512];
            let fcw = read_reg(e.uc, RegisterX86::FPCW) as u16;
            let fsw = read_reg(e.uc, RegisterX86::FPSW) as u16;
            x[0..2].copy_from_slice(&fcw.to_le_bytes());
            x[2..4].copy_from_slice(&fsw.to_le_bytes());
            let mxcsr = read_reg(e.uc, RegisterX86::MXCSR) as u32;
            x[24..28].copy_from_slice(&mxcsr.to_le_bytes());
            for i in 0..16 {
                let reg = RegisterX86::XMM0 as i32 + i as i32;
                let mut v = [0u8; 16];
                // SAFETY: (unverified) `e.uc` is the open engine and `v` is
                // a live 16-byte buffer, the size unicorn writes for XMM0-15
                // (uint64_t[2]). Unicorn stores it through a `uint64_t *`,
                // but `v` is only byte-aligned: this relies on the C side's
                // unaligned stores being harmless on the x86-64 host.
                unsafe { uc_reg_read(e.uc, reg, v.as_mut_ptr() as *mut c_void) };
                x[160 + i * 16..176 + i * 16].copy_from_slice(&v);
            }
            Ok(FpuState { xsave: x })
        })
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> Result<()> {
        if fpu.xsave.len() < 512 {
            return Err(HypervisorError::Backend {
                backend: BACKEND,
                op: "set_fpu",
                reason: format!("FXSAVE area is {} bytes, expected 512", fpu.xsave.len()),
            });
        }
        self.with(|e| {
            let x = &fpu.xsave;
            write_reg(
                e.uc,
                RegisterX86::FPCW,
                u16::from_le_bytes([x[0], x[1]]) as u64,
            );
            write_reg(
                e.uc,
                RegisterX86::FPSW,
                u16::from_le_bytes([x[2], x[3]]) as u64,
            );
            write_reg(
                e.uc,
                RegisterX86::MXCSR,
                u32::from_le_bytes([x[24], x[25], x[26], x[27]]) as u64,
            );
            for i in 0..16 {
                let reg = RegisterX86::XMM0 as i32 + i as i32;
                // SAFETY: (unverified) `e.uc` is the open engine, and
                // `x[160 + i * 16..]` holds at least the 16 bytes unicorn
                // reads for XMM0-15 (i < 16 and `x` has at least 512 bytes,
                // checked above). Unicorn loads them through a
                // `const uint64_t *`, but the slice is only byte-aligned:
                // this relies on the C side's unaligned loads being harmless
                // on the x86-64 host.
                unsafe { uc_reg_write(e.uc, reg, x[160 + i * 16..].as_ptr() as *const c_void) };
            }
            Ok(())
        })
    }

    fn msr(&self, index: u32) -> Result<u64> {
        self.with(|e| Ok(read_msr(e.uc, index)))
    }

    fn set_msr(&mut self, index: u32, value: u64) -> Result<()> {
        self.with(|e| {
            let msr = uc_x86_msr { rid: index, value };
            // SAFETY: (unverified) `e.uc` is the open, idle engine and `msr`
            // a live uc_x86_msr, the type UC_X86_REG_MSR reads. helper_wrmsr
            // returns normally outside SVM guest mode, which this assumes as
            // `read_msr` explains.
            check("msr write", unsafe {
                uc_reg_write(
                    e.uc,
                    RegisterX86::MSR as i32,
                    &msr as *const _ as *const c_void,
                )
            })
        })
    }

    fn debug_regs(&self) -> Result<DebugRegs> {
        self.with(|e| {
            Ok(DebugRegs {
                db: [
                    read_reg(e.uc, RegisterX86::DR0),
                    read_reg(e.uc, RegisterX86::DR1),
                    read_reg(e.uc, RegisterX86::DR2),
                    read_reg(e.uc, RegisterX86::DR3),
                ],
                dr6: read_reg(e.uc, RegisterX86::DR6),
                dr7: read_reg(e.uc, RegisterX86::DR7),
            })
        })
    }

    fn set_debug_regs(&mut self, r: &DebugRegs) -> Result<()> {
        self.with(|e| {
            for (reg, v) in [
                (RegisterX86::DR0, r.db[0]),
                (RegisterX86::DR1, r.db[1]),
                (RegisterX86::DR2, r.db[2]),
                (RegisterX86::DR3, r.db[3]),
                (RegisterX86::DR6, r.dr6),
                (RegisterX86::DR7, r.dr7),
            ] {
                write_reg(e.uc, reg, v);
            }
            Ok(())
        })
    }

    fn inject(&mut self, event: Injection) -> Result<()> {
        self.engine.borrow_mut().slots[self.id].pending.push(event);
        Ok(())
    }

    fn has_pending_injection(&self) -> Result<bool> {
        Ok(!self.engine.borrow().slots[self.id].pending.is_empty())
    }

    fn interrupt_window_open(&self) -> Result<bool> {
        let e = self.engine.borrow();
        if e.active == Some(self.id) {
            Ok(e.st().window_open())
        } else {
            Ok(e.slots[self.id].window_open)
        }
    }

    fn request_interrupt_window(&mut self, enable: bool) -> Result<()> {
        self.engine.borrow_mut().slots[self.id].window_requested = enable;
        Ok(())
    }

    fn set_single_step(&mut self, enable: bool) -> Result<()> {
        self.engine.borrow_mut().slots[self.id].single_step = enable;
        Ok(())
    }

    fn set_breakpoints(&mut self, addrs: &[u64]) -> Result<()> {
        self.with(|e| {
            e.slots[self.id].breakpoints = addrs.to_vec();
            e.sync_breakpoint_hooks()
        })
    }

    fn set_instructions_retired(&mut self, all: u64, kernel: u64) -> Result<()> {
        let mut e = self.engine.borrow_mut();
        if e.active == Some(self.id) {
            let st = e.st();
            st.counter.retired = all;
            st.counter.kernel = kernel;
        } else {
            e.slots[self.id].retired = all;
            e.slots[self.id].kernel_retired = kernel;
        }
        Ok(())
    }

    fn set_watchpoints(&mut self, watchpoints: &[PlacedWatchpoint]) -> Result<()> {
        self.with(|e| e.set_watch_hooks(watchpoints))
    }

    fn take_watch_hit(&mut self) -> Option<WatchHit> {
        self.with(|e| {
            let st = e.st();
            st.watch_pending = false;
            Ok(st.watch_hit.take())
        })
        .ok()
        .flatten()
    }

    fn instructions_retired(&self) -> Option<u64> {
        let e = self.engine.borrow();
        if e.active == Some(self.id) {
            Some(e.st().counter.retired)
        } else {
            Some(e.slots[self.id].retired)
        }
    }

    fn kernel_instructions_retired(&self) -> Option<u64> {
        let e = self.engine.borrow();
        if e.active == Some(self.id) {
            Some(e.st().counter.kernel)
        } else {
            Some(e.slots[self.id].kernel_retired)
        }
    }

    fn enter_syscall(&mut self, entry: &UserEntry) -> Result<()> {
        self.with(|e| {
            let env = &e.st().env;
            let r = &entry.regs;
            let v = [
                r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ];
            for (reg, val) in Gpr::ALL.into_iter().zip(v) {
                env.set_reg(reg, val);
            }
            for (seg, base) in [(Seg::Fs, entry.fs_base), (Seg::Gs, entry.gs_base)] {
                let mut cache = env.segment(seg);
                cache.base = base;
                env.load_segment(seg, cache);
            }
            perform_syscall(e.uc, env, r.rip, r.rflags);
            Ok(())
        })
    }

    fn watch_block(&mut self, pc: Option<u64>) -> Result<()> {
        // One watch for the engine, as for the spin stop.
        self.with(|e| {
            let st = e.st();
            st.watch_pc = pc;
            st.watch_hits = 0;
            Ok(())
        })
    }

    fn watch_hits(&self) -> Result<u64> {
        self.with(|e| Ok(e.st().watch_hits))
    }

    fn set_yield_on_spin(&mut self, enable: bool) -> Result<()> {
        // One setting for the engine: every vCPU of a machine yields, or none.
        self.with(|e| e.set_yield_on_spin(enable))
    }

    fn set_stop_at_user_mode(&mut self, enable: bool) -> Result<()> {
        self.with(|e| {
            if e.active == Some(self.id) {
                e.st().stop_at_user = enable;
            } else {
                e.slots[self.id].stop_at_user = enable;
            }
            Ok(())
        })
    }
}
