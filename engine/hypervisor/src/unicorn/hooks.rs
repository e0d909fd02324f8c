// SPDX-License-Identifier: GPL-2.0-or-later
//! The hook state shared with unicorn's C callbacks, and the callbacks:
//! instruction counting and stops at block boundaries, port/MMIO accesses to
//! the bus (with I/O stops), exceptions delivered through the guest IDT,
//! SYSCALL, CPUID and RDTSC answered by the engine.

use super::*;

/// Why the hooks stopped the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stop {
    Budget,
    /// The bus asked for a stop during an access. The CPU stopped inside
    /// the accessing instruction, which is then completed by a step that
    /// replays its accesses (see [`HookState::access`]).
    Io,
    /// An interrupt window was requested and is open.
    Window,
    /// The instruction being stepped is done.
    Step,
    /// A breakpoint of the running vCPU, before its instruction.
    Breakpoint,
    /// The next block is user code (replay of the kernel alone).
    UserMode,
    /// The same kernel block ran [`SPIN_REPEATS`] times in a row: a wait
    /// loop, most likely for a lock another vCPU holds.
    Spin,
    Shutdown(String),
    /// A hook panicked ([`HookState::hook_panic`] says how).
    HookPanic,
}

/// See [`HookState::block_trace`].
pub(super) struct BlockTrace {
    pub(super) from: u64,
    pub(super) to: u64,
    pub(super) out: std::io::BufWriter<std::fs::File>,
}

impl BlockTrace {
    pub(super) fn from_env() -> Option<BlockTrace> {
        let spec = std::env::var("KRR_TRACE_KERNEL_BLOCKS").ok()?;
        let (range, file) = spec.split_once(':')?;
        let (from, to) = range.split_once('-')?;
        let out = std::fs::File::create(file).ok()?;
        Some(BlockTrace {
            from: from.parse().ok()?,
            to: to.parse().ok()?,
            out: std::io::BufWriter::new(out),
        })
    }

    pub(super) fn block(&mut self, count: u64, pc: u64) {
        if (self.from..self.to).contains(&count) {
            use std::io::Write;
            let _ = writeln!(self.out, "{count} {pc:#x}");
        }
    }
}

/// RFLAGS bits the backend looks at.
pub(super) const RFLAGS_TF: u64 = 1 << 8;
pub(super) const RFLAGS_IF: u64 = 1 << 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AccessKind {
    PioIn,
    PioOut,
    MmioRead,
    MmioWrite,
}

/// A port or MMIO access as the bus saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Access {
    pub(super) kind: AccessKind,
    pub(super) addr: u64,
    pub(super) size: u8,
    /// Value read, or written.
    pub(super) value: u64,
}

impl Access {
    pub(super) fn is_read(&self) -> bool {
        matches!(self.kind, AccessKind::PioIn | AccessKind::MmioRead)
    }
}

/// One instruction executed with TF set by the backend (a single-step, a
/// step over a breakpoint, or the completion of an instruction that an I/O
/// stop interrupted).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct StepState {
    /// The guest had TF set itself: its #DB is real and is delivered.
    pub(super) guest_tf: bool,
    /// The single-step trap arrived: the instruction retired.
    pub(super) trapped: bool,
    /// Blocks entered during the step; a second one means the instruction
    /// retired without a trap (SYSCALL masking TF), and the step ends there.
    pub(super) blocks: u32,
    /// An access made by the stepped instruction asked for a stop.
    pub(super) io_stop: bool,
}

/// Executions in a row of one small kernel block that make a spin: a
/// spinlock's wait loop (load, test, PAUSE, branch) is one block; 64 turns
/// of it are a few hundred instructions, far less than a quantum.
pub(super) const SPIN_REPEATS: u32 = 64;
/// The most bytes such a wait loop's block has (`mov; test; pause; jne` is
/// about 10): larger loops do work.
const SPIN_BLOCK_BYTES: u32 = 24;

/// State shared with the C hooks through a stable pointer.
pub(super) struct HookState {
    /// The engine's handle: opened by `UnicornVm::new`, closed by `Engine`'s
    /// `Drop`. `Engine` owns this state too, so the handle is open whenever
    /// the state can be reached.
    pub(super) uc: *mut uc_engine,
    pub(super) env: EnvLayout,
    /// The bus of the run in progress; only valid during `run`.
    pub(super) bus: Option<*mut dyn RunContext>,
    pub(super) vcpu: usize,
    /// Instructions retired by the active vCPU.
    pub(super) retired: u64,
    /// Of those, instructions retired at CPL 0-2 (kernel code, the
    /// decompressor and early boot included): the position replay of the
    /// kernel alone can reproduce.
    pub(super) kernel_retired: u64,
    /// Stop before the first block of user code (replay).
    pub(super) stop_at_user: bool,
    /// CR2 when the run started: restored when a fault fetching user code
    /// is the stop at user mode.
    pub(super) cr2_at_run_start: u64,
    /// Stop when the vCPU spins in the kernel ([`Stop::Spin`]).
    pub(super) yield_on_spin: bool,
    /// A block address counted in `watch_hits` ([`Vcpu::watch_block`]).
    ///
    /// [`Vcpu::watch_block`]: crate::Vcpu::watch_block
    pub(super) watch_pc: Option<u64>,
    pub(super) watch_hits: u64,
    /// The last kernel block entered and how many times in a row.
    pub(super) spin_pc: u64,
    pub(super) spin_repeats: u32,
    pub(super) stop_at: u64,
    pub(super) stop: Option<Stop>,
    /// Stop before a block once IF=1 and there is no interrupt shadow.
    pub(super) window_requested: bool,
    /// Port and MMIO accesses since the current block started: when an I/O
    /// stop interrupts an instruction, the accesses it already made are the
    /// last of these.
    pub(super) recent: Vec<Access>,
    /// While an interrupted instruction is completed: its accesses so far,
    /// handed back instead of being made again.
    pub(super) replay: Vec<Access>,
    /// Next entry of `replay`; `None` until the first replayed access.
    pub(super) replay_next: Option<usize>,
    pub(super) replay_error: Option<String>,
    pub(super) stepping: Option<StepState>,
    /// Breakpoints (linear addresses) of the running vCPU.
    pub(super) breakpoints: Vec<u64>,
    /// The breakpoint being stepped over, not hit.
    pub(super) lifted_breakpoint: Option<u64>,
    /// Direct-mapped cache: (block pc, block size) -> instruction count.
    pub(super) icounts: Vec<(u64, u32, u32)>,
    /// Per small kernel block (same slots as `icounts`): whether its code
    /// holds a PAUSE, i.e. it is a wait loop.
    pub(super) pause_blocks: Vec<(u64, u32, bool)>,
    /// Debugging aid (`KRR_TRACE_KERNEL_BLOCKS=FROM-TO:FILE`): every kernel
    /// block entered while the kernel count is in [FROM, TO), as
    /// "count pc" lines, to compare a recording's run with its replay.
    pub(super) block_trace: Option<BlockTrace>,
    pub(super) exits_by_kind: ExitCounters,
    /// A hook's panic, caught before it reached unicorn ([`guarded`]).
    pub(super) hook_panic: Option<String>,
}

pub(super) const ICOUNT_CACHE: usize = 1 << 14;

impl HookState {
    /// The run's bus, told first where the vCPU stands (every access,
    /// CPUID, RDTSC, exception and SYSCALL goes through here).
    pub(super) fn bus(&mut self) -> &mut dyn RunContext {
        let at = self.position();
        let vcpu = self.vcpu;
        let bus = self.positioned_bus();
        bus.position(vcpu, at);
        bus
    }

    /// The run's bus without a new position: for the questions asked right
    /// after an access, which [`Self::bus`] already positioned.
    fn positioned_bus(&mut self) -> &mut dyn RunContext {
        // SAFETY: (unverified, see `Vcpu::run` about unwinding) `self.bus`
        // is `Some` only while `Vcpu::run` runs `run_with_bus`: `run` set it
        // from its live `&mut dyn RunContext`, does not use that reference
        // itself meanwhile, and clears it afterwards. Outside that window
        // `expect` panics instead.
        unsafe { &mut *self.bus.expect("I/O hook outside a run") }
    }

    pub(super) fn position(&self) -> Position {
        Position {
            icount: self.retired,
            kernel_icount: self.kernel_retired,
            rip: self.env.eip(),
            rcx: self.env.reg(Gpr::Rcx),
            cpl: self.env.cpl(),
        }
    }

    pub(super) fn icount_slot(pc: u64, size: u32) -> usize {
        ((pc ^ (pc >> 13) ^ ((size as u64) << 7)) as usize) & (ICOUNT_CACHE - 1)
    }

    /// A block was (re)translated: its cached count, if any, describes the
    /// code it was translated from before and is replaced.
    pub(super) fn block_translated(&mut self, pc: u64, size: u32, icount: u32) {
        let slot = Self::icount_slot(pc, size);
        self.icounts[slot] = (pc, size, icount);
        self.pause_blocks[slot] = (u64::MAX, 0, false);
    }

    /// Whether the block at `pc` (`size` bytes, at most
    /// [`SPIN_BLOCK_BYTES`]) holds a PAUSE (`f3 90`), read from guest
    /// memory once per translation.
    fn has_pause(&mut self, pc: u64, size: u32) -> bool {
        let slot = Self::icount_slot(pc, size);
        let e = self.pause_blocks[slot];
        if e.0 == pc && e.1 == size {
            return e.2;
        }
        let mut code = [0u8; SPIN_BLOCK_BYTES as usize];
        let len = (size as usize).min(code.len());
        // SAFETY: `self.uc` is the open engine (see `HookState::uc`), called
        // from a block hook on the emulating thread; `code` has room for
        // `len` bytes.
        let err = unsafe { uc_vmem_read(self.uc, pc, Prot::EXEC, code.as_mut_ptr().cast(), len) };
        let pause = err == uc_error::OK && code[..len].windows(2).any(|w| w == [0xf3, 0x90]);
        self.pause_blocks[slot] = (pc, size, pause);
        pause
    }

    pub(super) fn icount(&mut self, pc: u64, size: u32) -> u64 {
        let slot = Self::icount_slot(pc, size);
        let e = self.icounts[slot];
        if e.0 == pc && e.1 == size {
            return e.2 as u64;
        }
        let mut tb = TranslationBlock {
            pc: 0,
            icount: 0,
            size: 0,
        };
        let ctl = ControlType(
            ControlType::TB_REQUEST_CACHE.0 | ControlType::IO_READ.0 | ControlType::IO_WRITE.0,
        );
        // SAFETY: `self.uc` is the open engine (see `HookState::uc`). A
        // READ_WRITE TB_REQUEST_CACHE takes a uint64_t address and a `uc_tb *`
        // as variadic arguments: `pc` is a u64 and `tb` a live
        // TranslationBlock (bindgen's uc_tb), which unicorn fills in.
        let err = unsafe { uc_ctl(self.uc, ctl, pc, &mut tb as *mut TranslationBlock) };
        let n = if err == uc_error::OK && tb.pc == pc && tb.size as u32 == size {
            tb.icount as u32
        } else {
            // Should not happen (the block is being executed); count by size
            // so that counting stays deterministic.
            size.max(1)
        };
        self.icounts[slot] = (pc, size, n);
        n as u64
    }

    pub(super) fn stop(&mut self, why: Stop) {
        if self.stop.is_none() {
            self.stop = Some(why);
        }
        // SAFETY: `self.uc` is the open engine (see `HookState::uc`);
        // uc_emu_stop takes nothing else and may be called from a hook or
        // while the engine is idle (the request it then records is cleared
        // by the next uc_emu_start).
        unsafe { uc_emu_stop(self.uc) };
    }

    /// One port or MMIO access of `size` bytes (`write`: the value written).
    /// Returns the value read (or written) and whether the bus asked for a
    /// stop.
    ///
    /// A stop cannot end the instruction that made the access: unicorn
    /// leaves the translated code right after an MMIO access with RIP at
    /// the start of that instruction (its restart point after a fault), and
    /// the port hooks leave the same way ([`internals::cpu_state`]).
    /// The instruction is then stepped once more, and the accesses it
    /// already made are replayed from `recent` rather than repeated, so the
    /// bus sees each access exactly once and the vCPU stops after the
    /// instruction.
    pub(super) fn access(
        &mut self,
        kind: AccessKind,
        addr: u64,
        size: usize,
        write: u64,
    ) -> (u64, bool) {
        if self.stepping.is_some() {
            if let Some(value) = self.replayed(kind, addr, size, write) {
                return (value, false);
            }
        }
        let vcpu = self.vcpu;
        let mut data = [0u8; 8];
        let value = match kind {
            AccessKind::PioIn => {
                self.bus().pio_read(vcpu, addr as u16, &mut data[..size]);
                u64::from_le_bytes(data)
            }
            AccessKind::MmioRead => {
                self.bus().mmio_read(vcpu, addr, &mut data[..size]);
                u64::from_le_bytes(data)
            }
            AccessKind::PioOut => {
                self.bus()
                    .pio_write(vcpu, addr as u16, &write.to_le_bytes()[..size]);
                write
            }
            AccessKind::MmioWrite => {
                self.bus()
                    .mmio_write(vcpu, addr, &write.to_le_bytes()[..size]);
                write
            }
        };
        self.recent.push(Access {
            kind,
            addr,
            size: size as u8,
            value,
        });
        let stop = self.positioned_bus().stop_requested();
        if matches!(kind, AccessKind::PioOut | AccessKind::MmioWrite) {
            if let Some(end) = self.positioned_bus().run_end(vcpu) {
                self.stop_at = self.stop_at.min(end);
            }
        }
        if stop {
            if let Some(step) = &mut self.stepping {
                // The step ends after this instruction anyway.
                step.io_stop = true;
                return (value, false);
            }
        }
        (value, stop)
    }

    /// The value of an access the instruction being completed made before
    /// it was interrupted, or `None` for a new access.
    pub(super) fn replayed(
        &mut self,
        kind: AccessKind,
        addr: u64,
        size: usize,
        write: u64,
    ) -> Option<u64> {
        if self.replay.is_empty() {
            return None;
        }
        let same = |a: &Access| {
            a.kind == kind
                && a.addr == addr
                && a.size as usize == size
                && (a.is_read() || a.value == write)
        };
        let next = match self.replay_next {
            Some(i) => i,
            // The interrupted instruction's accesses are the last ones made;
            // its first access is the latest match of this one.
            None => match self.replay.iter().rposition(same) {
                Some(i) => i,
                None => {
                    self.replay_error = Some(format!(
                        "the restarted instruction made a {kind:?} access to {addr:#x} ({size} bytes) that it had not made before; made: {:?}",
                        self.replay
                    ));
                    self.replay_next = Some(self.replay.len());
                    return None;
                }
            },
        };
        let a = *self.replay.get(next)?;
        if !same(&a) {
            self.replay_error = Some(format!(
                "the restarted instruction made a {kind:?} access to {addr:#x} ({size} bytes) where {a:?} was expected"
            ));
            self.replay_next = Some(self.replay.len());
            return None;
        }
        self.replay_next = Some(next + 1);
        Some(a.value)
    }

    /// An access asked for a stop outside a step.
    pub(super) fn io_stop(&mut self) {
        self.stop(Stop::Io);
    }

    pub(super) fn window_open(&self) -> bool {
        self.env.eflags() & RFLAGS_IF != 0 && !self.env.interrupt_shadow()
    }
}

/// Runs the body of a hook. A panic must not unwind into unicorn's C
/// frames (the process would abort, and a recording in progress with it):
/// it is caught here, the run is stopped, and `run` fails with its message.
pub(super) fn guarded<R>(st: *mut HookState, fallback: R, body: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            // SAFETY: `st` is the hook state this hook was registered with;
            // the body's reference to it ended with the unwinding.
            let st = unsafe { &mut *st };
            st.hook_panic.get_or_insert(what);
            st.stop(Stop::HookPanic);
            fallback
        }
    }
}

/// The error of a run whose hook panicked.
pub(super) fn hook_panicked(what: String) -> HypervisorError {
    HypervisorError::Backend {
        backend: BACKEND,
        op: "hook",
        reason: format!("a hook of the software CPU panicked: {what}"),
    }
}

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
            if st.retired >= st.stop_at {
                st.stop(Stop::Budget);
                return;
            }
            if st.yield_on_spin
                && size <= SPIN_BLOCK_BYTES
                && st.env.cpl() != 3
                && st.has_pause(pc, size)
            {
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
        let n = st.icount(pc, size);
        st.retired += n;
        if st.env.cpl() != 3 {
            if let Some(t) = &mut st.block_trace {
                t.block(st.kernel_retired, pc);
            }
            st.kernel_retired += n;
        }
    })
}

/// Called when unicorn translates a block, before it first runs: guest
/// code patched in place (alternatives, static keys, text_poke) is
/// retranslated, and the block's count must follow, or a recording and its
/// replay (whose caches see different blocks) could count it differently.
pub(super) extern "C" fn on_block_translated(
    _uc: *mut uc_engine,
    cur: *const TranslationBlock,
    _prev: *const TranslationBlock,
    ud: *mut c_void,
) {
    guarded(ud as *mut HookState, (), || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        // SAFETY: unicorn passes a pointer to its copy of the new block's
        // description, valid for the duration of the call.
        let tb = unsafe { &*cur };
        st.block_translated(tb.pc, u32::from(tb.size), u32::from(tb.icount));
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
            if intno == 1 && !st.env.exception_is_int() && !step.trapped {
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
            cr2: (vector == 14 && !software).then(|| read_reg(uc, RegisterX86::CR2)),
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
