// SPDX-License-Identifier: GPL-2.0-or-later
//! Unicorn's C callbacks: instruction counting and stops at block boundaries,
//! port/MMIO accesses to the bus (with I/O stops), exceptions delivered
//! through the guest IDT, SYSCALL, CPUID and RDTSC answered by the engine.

use super::*;

/// The hook state behind a hook's `user_data`.
///
/// # Safety
/// `ud` must be the `user_data` the hook was registered with, i.e. the
/// engine's `Engine.state` cell (live as long as the engine), and no other
/// reference to the hook state may be used while the returned one lives.
///
/// The hooks below meet this as follows: unicorn calls a hook on the thread
/// that called `uc_emu_start` and one at a time; the engine holds no
/// reference to the state across `uc_emu_start` (see `run_with_bus` and
/// `step`), and a hook's body takes one reference, at its start. (No hook
/// calls another, except `on_rdtscp`, which calls `on_rdtsc` and takes no
/// reference of its own; for MMIO callbacks nested inside unicorn calls
/// made while a reference is held, see `on_mmio_read`.)
pub(super) unsafe fn state<'a>(ud: *mut c_void) -> &'a mut HookState {
    // SAFETY: per the caller's obligations, `ud` points at the live hook
    // state (an `UnsafeCell<HookState>`, whose pointer is the state's) and
    // the reference is unique while it lives.
    unsafe { &mut *(ud as *mut HookState) }
}

pub(super) extern "C" fn on_block(_uc: *mut uc_engine, pc: u64, size: u32, ud: *mut c_void) {
    guarded(ud as *mut HookState, (), || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        st.exits_by_kind.hooked_blocks += 1;
        // A watched access in the last block: the run stops here, at a
        // block boundary (stopping inside the accessing instruction would
        // leave it half done, to be done again).
        if st.watch_pending && st.stepping.is_none() {
            st.watch_pending = false;
            st.stop(Stop::Watch);
            return;
        }
        if let Some(step) = &mut st.stepping {
            step.blocks += 1;
            if step.blocks > 1 {
                st.stop(Stop::Step);
                return;
            }
        } else {
            // IF only becomes 1 by an instruction that ends its block (STI,
            // POPF, IRET, SYSRET), and the STI/MOV SS shadow covers exactly the
            // next block (QEMU gives it one instruction), so checking here is
            // exact.
            if st.window_requested && st.window_open() {
                st.stop(Stop::Window);
                return;
            }
            // Before the budget: a budget that runs out exactly where the
            // kernel returns to user mode ends the run in user mode, which is
            // what replay needs to know.
            if st.stop_at_user && st.env.cpl() == 3 {
                st.stop(Stop::UserMode);
                return;
            }
            if st.counter.retired >= st.stop_at {
                st.stop(Stop::Budget);
                return;
            }
            // A small kernel block that ends in PAUSE (translated code tells).
            if st.yield_on_spin && st.counter.hook_wait_loop != 0 {
                if pc == st.spin_pc {
                    st.spin_repeats += 1;
                    if st.spin_repeats >= SPIN_REPEATS {
                        st.spin_repeats = 0;
                        st.stop(Stop::Spin);
                        return;
                    }
                } else {
                    st.spin_pc = pc;
                    st.spin_repeats = 0;
                }
            }
            st.recent.clear();
        }
        if st.watch_pc == Some(pc) {
            st.watch_hits += 1;
        }
        let n = u64::from(st.counter.hook_insns);
        st.counter.retired += n;
        let kernel = st.env.cpl() != 3;
        st.set_block(EnteredBlock {
            pc,
            size,
            insns: n,
            kernel,
        });
        if kernel {
            if let Some(t) = &mut st.block_trace {
                t.block(st.counter.kernel, pc);
            }
            st.counter.kernel += n;
        }
    })
}

/// A memory hook bounded to a watchpoint's physical range (unicorn calls it
/// before the access, RIP synchronised to the accessing instruction).
pub(super) extern "C" fn on_watch(
    _uc: *mut uc_engine,
    access: i32,
    address: u64,
    size: i32,
    _value: i64,
    ud: *mut c_void,
) {
    guarded(ud as *mut HookState, (), || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `Engine::set_watch_hooks`; see `state` for why this is the
        // only live reference to it.
        let st = unsafe { state(ud) };
        let write = access == unicorn_engine::unicorn_const::MemType::WRITE as i32;
        st.watched_access(address, size.max(1) as u64, write);
    })
}

/// A code hook bounded to the breakpoint addresses of all vCPUs: unicorn
/// checks for a stop right after it, before the instruction executes.
pub(super) extern "C" fn on_breakpoint(
    _uc: *mut uc_engine,
    addr: u64,
    _size: u32,
    ud: *mut c_void,
) {
    guarded(ud as *mut HookState, (), || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `Engine::sync_breakpoint_hooks`; see `state` for why this
        // is the only live reference to it.
        let st = unsafe { state(ud) };
        if st.lifted_breakpoint != Some(addr) && st.breakpoints.contains(&addr) {
            st.stop(Stop::Breakpoint);
        }
    })
}

/// During a step, an exception of the stepped instruction: the TF the
/// backend set must not reach the guest's saved flags.
pub(super) fn drop_step_tf(uc: *mut uc_engine, st: &HookState) {
    if let Some(step) = st.stepping {
        if !step.guest_tf {
            let rflags = read_reg(uc, RegisterX86::RFLAGS);
            write_reg(uc, RegisterX86::RFLAGS, rflags & !RFLAGS_TF);
        }
    }
}

pub(super) extern "C" fn on_intr(uc: *mut uc_engine, intno: u32, ud: *mut c_void) {
    guarded(ud as *mut HookState, (), || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        if let Some(step) = st.stepping {
            if intno == 1 && !step.no_trap && !st.env.exception_is_int() && !step.trapped {
                // The single-step trap: the instruction retired.
                st.env.reset_old_exception();
                if let Some(s) = &mut st.stepping {
                    s.trapped = true;
                }
                if step.guest_tf {
                    st.exits_by_kind.exceptions += 1;
                    if let Err(e) =
                        deliver(uc, &st.env, 1, EventKind::Exception { error_code: None })
                    {
                        st.stop(Stop::Shutdown(format!("triple fault: {}", e.0)));
                    }
                    st.env.reset_old_exception();
                }
                st.stop(Stop::Step);
                return;
            }
            drop_step_tf(uc, st);
        }
        let software = st.env.exception_is_int();
        if st.stop_at_user && st.env.cpl() == 3 && !software {
            // Replay of the kernel alone reached user code, and fetching it
            // faulted (the block after the kernel's return spans a user
            // page replay never had): that is the stop at user mode, not
            // an exception of the guest. CR2 keeps the kernel's value.
            write_reg(uc, RegisterX86::CR2, st.cr2_at_run_start);
            st.env.reset_old_exception();
            st.stop(Stop::UserMode);
            return;
        }
        st.exits_by_kind.exceptions += 1;
        let vector = intno as u8;
        let kind = if software {
            EventKind::Software
        } else {
            EventKind::Exception {
                error_code: has_error_code(vector).then(|| st.env.error_code()),
            }
        };
        let error_code = match kind {
            EventKind::Exception { error_code } => error_code,
            _ => None,
        };
        let cpl = st.env.cpl();
        let delivered = DeliveredException {
            vector,
            error_code,
            cr2: match vector {
                _ if software => None,
                14 => Some(read_reg(uc, RegisterX86::CR2)),
                // The kernel's #DB handler branches on DR6 (single step,
                // ICEBP, breakpoints): replay must find the same value.
                1 => Some(read_reg(uc, RegisterX86::DR6)),
                _ => None,
            },
            software,
            cpl,
            user_regs: (cpl == 3)
                .then(|| env_regs(&st.env, st.env.eip(), read_reg(uc, RegisterX86::RFLAGS))),
        };
        let (vcpu, at) = (st.vcpu, st.position());
        st.bus().exception(vcpu, at, &delivered);
        if let Err(e) = deliver(uc, &st.env, vector, kind) {
            st.stop(Stop::Shutdown(format!("triple fault: {}", e.0)));
        }
        st.env.reset_old_exception();
        if st.stepping.is_some() {
            // The stepped instruction ended in an exception: the step is over.
            st.exception_ends_block();
            st.stop(Stop::Step);
        }
    })
}

pub(super) extern "C" fn on_invalid(uc: *mut uc_engine, ud: *mut c_void) -> bool {
    guarded(ud as *mut HookState, true, || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        st.exits_by_kind.exceptions += 1;
        drop_step_tf(uc, st);
        let cpl = st.env.cpl();
        let delivered = DeliveredException {
            vector: 6,
            error_code: None,
            cr2: None,
            software: false,
            cpl,
            user_regs: (cpl == 3)
                .then(|| env_regs(&st.env, st.env.eip(), read_reg(uc, RegisterX86::RFLAGS))),
        };
        let (vcpu, at) = (st.vcpu, st.position());
        st.bus().exception(vcpu, at, &delivered);
        if let Err(e) = deliver(uc, &st.env, 6, EventKind::Exception { error_code: None }) {
            st.stop(Stop::Shutdown(format!("triple fault: {}", e.0)));
        }
        st.env.reset_old_exception();
        if st.stepping.is_some() {
            st.exception_ends_block();
            st.stop(Stop::Step);
        }
        true
    })
}

extern "C" {
    /// The IN hook unicorn calls (port_hooks.c, a `uc_cb_insn_in_t`): it
    /// calls [`krr_port_in`] and leaves translated code when asked to.
    pub(super) fn krr_on_in(uc: *mut uc_engine, port: u32, size: i32, ud: *mut c_void) -> u32;
    /// The OUT hook unicorn calls (port_hooks.c, a `uc_cb_insn_out_t`).
    pub(super) fn krr_on_out(uc: *mut uc_engine, port: u32, size: i32, value: u32, ud: *mut c_void);
}

/// An IN instruction's access, for port_hooks.c: stores the value read in
/// `*value` and returns the CPU to leave translated code through when the
/// bus asked the vCPU to stop (null otherwise). The C caller does the
/// siglongjmp, so it never skips this Rust frame.
///
/// # Safety
/// Called only by `krr_on_in`, with unicorn's arguments of an IN hook whose
/// `ud` is the engine's hook state, and `value` a live `u32`.
#[no_mangle]
pub unsafe extern "C" fn krr_port_in(
    uc: *mut uc_engine,
    port: u32,
    size: i32,
    ud: *mut c_void,
    value: *mut u32,
) -> *mut c_void {
    let (read, stop) = guarded(ud as *mut HookState, (u64::MAX, false), || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        st.exits_by_kind.pio += 1;
        let n = (size as usize).clamp(1, 4);
        let (value, stop) = st.access(AccessKind::PioIn, port as u64, n, 0);
        if stop {
            st.io_stop();
        }
        (value, stop)
    });
    // SAFETY: `value` is the C caller's live u32 (caller's obligation).
    unsafe { value.write(read as u32) };
    leave_if(uc, stop)
}

/// An OUT instruction's access, for port_hooks.c: returns the CPU to leave
/// translated code through when the bus asked the vCPU to stop.
///
/// # Safety
/// Called only by `krr_on_out`, with unicorn's arguments of an OUT hook
/// whose `ud` is the engine's hook state.
#[no_mangle]
pub unsafe extern "C" fn krr_port_out(
    uc: *mut uc_engine,
    port: u32,
    size: i32,
    value: u32,
    ud: *mut c_void,
) -> *mut c_void {
    let stop = guarded(ud as *mut HookState, false, || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        st.exits_by_kind.pio += 1;
        let n = (size as usize).clamp(1, 4);
        let (_, stop) = st.access(AccessKind::PioOut, port as u64, n, value as u64);
        if stop {
            st.io_stop();
        }
        stop
    });
    leave_if(uc, stop)
}

fn leave_if(uc: *mut uc_engine, stop: bool) -> *mut c_void {
    if stop {
        // SAFETY: `uc` is the running engine unicorn passed to the hook.
        unsafe { internals::cpu_state(uc) }
    } else {
        std::ptr::null_mut()
    }
}

// Register helpers. Every caller passes as `uc` the engine's open handle:
// `Engine::uc`, `HookState::uc`, or the handle unicorn passed to the hook.
// Only registers whose 64-bit-mode value is at most 8 bytes are passed to
// `read_reg`/`write_reg`: GPRs, RIP, RFLAGS, CR0-CR4, CR8, DR0-DR7 (8 bytes),
// MXCSR (4), FPCW and FPSW (2).

pub(super) fn write_reg(uc: *mut uc_engine, reg: RegisterX86, v: u64) {
    // SAFETY: `uc` is the engine's open handle and `v` is a live u64, at
    // least the size unicorn reads for each register passed (see above).
    unsafe { uc_reg_write(uc, reg as i32, &v as *const u64 as *const c_void) };
}

pub(super) fn read_reg(uc: *mut uc_engine, reg: RegisterX86) -> u64 {
    let mut v = 0u64;
    // SAFETY: `uc` is the engine's open handle and `v` is a live u64, at
    // least the size unicorn writes for each register passed (see above).
    unsafe { uc_reg_read(uc, reg as i32, &mut v as *mut u64 as *mut c_void) };
    v
}

pub(super) fn read_msr(uc: *mut uc_engine, index: u32) -> u64 {
    let mut m = uc_x86_msr {
        rid: index,
        value: 0,
    };
    // SAFETY: (unverified) `uc` is the engine's open handle (see above) and
    // `m` a live uc_x86_msr, the type UC_X86_REG_MSR reads `rid` from and
    // writes `value` to. helper_rdmsr returns normally unless an SVM MSR
    // intercept is active; otherwise it longjmps (cpu_vmexit) out of this
    // call. That needs SVM guest mode, which only VMRUN enters, and VMRUN
    // needs EFER.SVME loaded through cpu_load_efer: the emulated CPU model
    // has no SVM, so a guest WRMSR cannot set it, but it keeps an SVME bit
    // that a state loaded by `set_sregs` (raw `set_efer`) already had. This
    // assumes loaded states never have EFER.SVME set.
    unsafe { uc_reg_read(uc, RegisterX86::MSR as i32, &mut m as *mut _ as *mut c_void) };
    m.value
}

pub(super) extern "C" fn on_cpuid(uc: *mut uc_engine, ud: *mut c_void) -> i32 {
    guarded(ud as *mut HookState, 1, || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        st.exits_by_kind.cpuid += 1;
        let leaf = read_reg(uc, RegisterX86::RAX) as u32;
        let subleaf = read_reg(uc, RegisterX86::RCX) as u32;
        let vcpu = st.vcpu;
        let r = st.bus().cpuid(vcpu, leaf, subleaf);
        write_reg(uc, RegisterX86::RAX, r[0] as u64);
        write_reg(uc, RegisterX86::RBX, r[1] as u64);
        write_reg(uc, RegisterX86::RCX, r[2] as u64);
        write_reg(uc, RegisterX86::RDX, r[3] as u64);
        1
    })
}

pub(super) extern "C" fn on_rdtsc(uc: *mut uc_engine, ud: *mut c_void) -> i32 {
    guarded(ud as *mut HookState, 1, || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        st.exits_by_kind.rdtsc += 1;
        let vcpu = st.vcpu;
        let t = st.bus().rdtsc(vcpu);
        write_reg(uc, RegisterX86::RAX, t & 0xffff_ffff);
        write_reg(uc, RegisterX86::RDX, t >> 32);
        1
    })
}

pub(super) extern "C" fn on_rdtscp(uc: *mut uc_engine, ud: *mut c_void) -> i32 {
    guarded(ud as *mut HookState, 1, || {
        on_rdtsc(uc, ud);
        // IA32_TSC_AUX: Linux stores the CPU number there.
        write_reg(
            uc,
            RegisterX86::RCX,
            read_msr(uc, 0xc000_0103) & 0xffff_ffff,
        );
        1
    })
}

/// The general-purpose registers straight from QEMU's CPU state (cheaper
/// than 16 register reads through the API), with `rip` and `rflags` given.
pub(super) fn env_regs(env: &EnvLayout, rip: u64, rflags: u64) -> Regs {
    Regs {
        rax: env.reg(Gpr::Rax),
        rcx: env.reg(Gpr::Rcx),
        rdx: env.reg(Gpr::Rdx),
        rbx: env.reg(Gpr::Rbx),
        rsp: env.reg(Gpr::Rsp),
        rbp: env.reg(Gpr::Rbp),
        rsi: env.reg(Gpr::Rsi),
        rdi: env.reg(Gpr::Rdi),
        r8: env.reg(Gpr::R8),
        r9: env.reg(Gpr::R9),
        r10: env.reg(Gpr::R10),
        r11: env.reg(Gpr::R11),
        r12: env.reg(Gpr::R12),
        r13: env.reg(Gpr::R13),
        r14: env.reg(Gpr::R14),
        r15: env.reg(Gpr::R15),
        rip,
        rflags,
    }
}

/// SYSCALL: unicorn only calls the hook; perform the instruction here.
/// Unicorn adds the instruction length to RIP after the hook returns.
pub(super) extern "C" fn on_syscall(uc: *mut uc_engine, ud: *mut c_void) {
    guarded(ud as *mut HookState, (), || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        st.exits_by_kind.syscalls += 1;
        let env = &st.env;
        let rip = env.eip();
        let rflags = read_reg(uc, RegisterX86::RFLAGS);
        let entry = UserEntry {
            regs: env_regs(env, rip, rflags),
            fs_base: env.segment(Seg::Fs).base,
            gs_base: env.segment(Seg::Gs).base,
        };
        let (vcpu, at) = (st.vcpu, st.position());
        st.bus().syscall(vcpu, at, &entry);
        let env = &st.env;
        perform_syscall(uc, env, rip, rflags);
        // Unicorn adds the SYSCALL's length to RIP when the hook returns.
        env.set_eip(env.eip().wrapping_sub(2));
    })
}

/// What SYSCALL does, from user state with the instruction at `rip`:
/// RCX/R11 saved, RFLAGS masked, CS/SS from STAR, RIP from LSTAR.
pub(super) fn perform_syscall(uc: *mut uc_engine, env: &EnvLayout, rip: u64, rflags: u64) {
    let star = read_msr(uc, 0xc000_0081);
    let lstar = read_msr(uc, 0xc000_0082);
    let fmask = read_msr(uc, 0xc000_0084);
    env.set_reg(Gpr::Rcx, rip + 2);
    env.set_reg(Gpr::R11, rflags & !(1 << 16));
    write_reg(uc, RegisterX86::RFLAGS, rflags & !(fmask | (1 << 16)));
    let selector = ((star >> 32) & 0xffff) as u16;
    env.load_segment(
        Seg::Cs,
        SegmentCache {
            selector: selector & 0xfffc,
            base: 0,
            limit: 0xffff_ffff,
            flags: DESC_G_MASK
                | DESC_P_MASK
                | DESC_S_MASK
                | DESC_CS_MASK
                | DESC_R_MASK
                | DESC_A_MASK
                | DESC_L_MASK,
        },
    );
    env.load_segment(
        Seg::Ss,
        SegmentCache {
            selector: selector.wrapping_add(8) & 0xfffc,
            base: 0,
            limit: 0xffff_ffff,
            flags: DESC_G_MASK
                | DESC_B_MASK
                | DESC_P_MASK
                | DESC_S_MASK
                | DESC_W_MASK
                | DESC_A_MASK,
        },
    );
    env.set_eip(lstar);
}

pub(super) extern "C" fn on_mmio_read(
    _uc: *mut uc_engine,
    offset: u64,
    size: u32,
    ud: *mut c_void,
) -> u64 {
    guarded(
        // SAFETY: `ud` is the `MmioRegion` box registered with this region
        // in `add_mmio_region`, kept in `Engine::mmio` for the engine's life
        // (see the (unverified) note there) and never mutated.
        unsafe { (*(ud as *const MmioRegion)).state },
        u64::MAX,
        || {
            // SAFETY: as above: `ud` is the live, immutable `MmioRegion`.
            let region = unsafe { &*(ud as *const MmioRegion) };
            // SAFETY: (unverified) `region.state` is the engine's live hook
            // state. Guest MMIO accesses reach this callback from inside
            // `uc_emu_start`, where no other reference to the state is live
            // (see `state`). But unicorn also runs MMIO callbacks for the
            // guest-physical accesses of its own API calls: page-table walks
            // (uc_vmem_read/write, uc_ctl TB_REQUEST_CACHE) and
            // uc_vmem_write's store. A guest whose page tables, or whose
            // interrupt stack for `delivery::deliver`'s uc_vmem_write, lie in
            // an MMIO region would get this callback while `on_intr`,
            // `on_invalid`, `on_block`, `try_deliver_pending` or
            // `halted_after`'s caller holds a reference to the state: two
            // live `&mut HookState`. No guest this engine runs does that.
            let st = unsafe { &mut *region.state };
            st.exits_by_kind.mmio += 1;
            let n = (size as usize).clamp(1, 8);
            let (value, stop) = st.access(AccessKind::MmioRead, region.base + offset, n, 0);
            if stop {
                // Unicorn leaves the block right after this access, at the start
                // of the accessing instruction.
                st.io_stop();
            }
            value
        },
    )
}

pub(super) extern "C" fn on_mmio_write(
    _uc: *mut uc_engine,
    offset: u64,
    size: u32,
    value: u64,
    ud: *mut c_void,
) {
    // SAFETY: `ud` is the `MmioRegion` box registered with this region in
    // `add_mmio_region`, kept in `Engine::mmio` for the engine's life (see
    // the (unverified) note there) and never mutated.
    guarded(unsafe { (*(ud as *const MmioRegion)).state }, (), || {
        // SAFETY: as above: `ud` is the live, immutable `MmioRegion`.
        let region = unsafe { &*(ud as *const MmioRegion) };
        // SAFETY: (unverified) `region.state` is the engine's live hook
        // state; the reference is unique except in the nesting described in
        // `on_mmio_read` (an MMIO callback run by a unicorn call that a
        // holder of the state makes).
        let st = unsafe { &mut *region.state };
        st.exits_by_kind.mmio += 1;
        let n = (size as usize).clamp(1, 8);
        let (_, stop) = st.access(AccessKind::MmioWrite, region.base + offset, n, value);
        if stop {
            st.io_stop();
        }
    })
}

pub(super) struct MmioRegion {
    pub(super) base: u64,
    pub(super) state: *mut HookState,
}
