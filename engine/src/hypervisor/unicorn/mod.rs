// SPDX-License-Identifier: GPL-2.0-or-later
//! The software CPU backend (`tcg`): QEMU's TCG as packaged by unicorn 2.1.5.
//!
//! One unicorn instance per VM runs every vCPU: a vCPU's registers are a
//! saved unicorn context, switched in when that vCPU runs, so all vCPUs share
//! one translation cache and code one vCPU patches is seen by all.
//!
//! Instruction counting: a block hook adds each translation block's
//! instruction count (asked once per block from unicorn and cached by
//! address and size) before the block runs, and stops the CPU before a block
//! once the budget is reached. Counts and stop points are therefore
//! deterministic, but not exact in four cases: a block cut short by a fault,
//! a breakpoint or an I/O stop is counted whole (an I/O stop adds one more
//! for the step that completes the interrupted instruction); a budget ends
//! at the first block boundary at or after it (a block is at most a few
//! dozen instructions); and after the guest rewrites code in place
//! (alternatives, static keys), a cached count can belong to the old code
//! when the new block has the same address and size.
//!
//! Exact stops:
//! - I/O stops ([`IoBus::stop_requested`] after an access) end right after
//!   the accessing instruction, and every access reaches the bus once: the
//!   CPU leaves the block at the start of that instruction (unicorn's exit
//!   check after an MMIO access; [`internals::leave_translated_code`] for
//!   port I/O), then the instruction is stepped again with its earlier
//!   accesses replayed to it instead of sent to the bus.
//! - Steps (single-step, stepping over a breakpoint, completing an
//!   instruction) set TF: QEMU then translates a one-instruction block and
//!   raises the single-step trap after it, which the interrupt hook takes
//!   as the end of the step (TF and DR6 are put back; a guest that set TF
//!   itself gets its #DB).
//! - Breakpoints are code hooks bounded to their address: unicorn checks
//!   for a stop after the hook, before the instruction.
//! - The interrupt window is checked before each block: IF only becomes 1
//!   through an instruction that ends its block, and QEMU gives the
//!   STI/MOV SS shadow a block of its own.
//!
//! MMIO accessed from inside a QEMU helper (descriptor-table loads, IRET,
//! FXSAVE areas in MMIO) has no exit check right after it; a stop requested
//! there takes effect at the next check instead. Guests do not do this.

mod delivery;
pub(crate) mod internals;

pub use super::ExitCounters;
use super::{
    DebugRegs, DeliveredException, DescriptorTable, FpuState, HypervisorError, Injection, IoBus,
    Position, Regs, Result, Segment, Sregs, UserEntry, Vcpu, VmExit,
};
use delivery::{deliver, has_error_code, EventKind};
use internals::{
    EnvLayout, SegmentCache, DESC_A_MASK, DESC_B_MASK, DESC_CS_MASK, DESC_DPL_SHIFT, DESC_G_MASK,
    DESC_L_MASK, DESC_P_MASK, DESC_R_MASK, DESC_S_MASK, DESC_W_MASK, R_CS, R_DS, R_ES, R_FS, R_GS,
    R_SS,
};
use std::cell::{RefCell, UnsafeCell};
use std::ffi::c_void;
use std::rc::Rc;
use unicorn_engine::unicorn_const::{
    uc_close, uc_context, uc_context_alloc, uc_context_free, uc_context_restore, uc_context_save,
    uc_ctl, uc_emu_start, uc_emu_stop, uc_engine, uc_error, uc_hook, uc_hook_add, uc_hook_del,
    uc_mem_map_ptr, uc_mmio_map, uc_open, uc_reg_read, uc_reg_write, uc_vmem_read, uc_x86_mmr,
    uc_x86_msr, Arch, ControlType, HookType, Mode, Prot, RegisterX86, TranslationBlock, X86Insn,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const BACKEND: &str = "tcg";

fn backend_err(op: &'static str, e: uc_error) -> HypervisorError {
    HypervisorError::Backend {
        backend: BACKEND,
        op,
        reason: format!("{e:?}"),
    }
}

fn check(op: &'static str, e: uc_error) -> Result<()> {
    if e == uc_error::OK {
        Ok(())
    } else {
        Err(backend_err(op, e))
    }
}

/// Why the hooks stopped the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
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
    Shutdown(String),
    /// A hook panicked ([`HookState::hook_panic`] says how).
    HookPanic,
}

/// See [`HookState::block_trace`].
struct BlockTrace {
    from: u64,
    to: u64,
    out: std::io::BufWriter<std::fs::File>,
}

impl BlockTrace {
    fn from_env() -> Option<BlockTrace> {
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

    fn block(&mut self, count: u64, pc: u64) {
        if (self.from..self.to).contains(&count) {
            use std::io::Write;
            let _ = writeln!(self.out, "{count} {pc:#x}");
        }
    }
}

/// RFLAGS bits the backend looks at.
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AccessKind {
    PioIn,
    PioOut,
    MmioRead,
    MmioWrite,
}

/// A port or MMIO access as the bus saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Access {
    kind: AccessKind,
    addr: u64,
    size: u8,
    /// Value read, or written.
    value: u64,
}

impl Access {
    fn is_read(&self) -> bool {
        matches!(self.kind, AccessKind::PioIn | AccessKind::MmioRead)
    }
}

/// One instruction executed with TF set by the backend (a single-step, a
/// step over a breakpoint, or the completion of an instruction that an I/O
/// stop interrupted).
#[derive(Debug, Clone, Copy, Default)]
struct StepState {
    /// The guest had TF set itself: its #DB is real and is delivered.
    guest_tf: bool,
    /// The single-step trap arrived: the instruction retired.
    trapped: bool,
    /// Blocks entered during the step; a second one means the instruction
    /// retired without a trap (SYSCALL masking TF), and the step ends there.
    blocks: u32,
    /// An access made by the stepped instruction asked for a stop.
    io_stop: bool,
}

/// State shared with the C hooks through a stable pointer.
struct HookState {
    /// The engine's handle: opened by `UnicornVm::new`, closed by `Engine`'s
    /// `Drop`. `Engine` owns this state too, so the handle is open whenever
    /// the state can be reached.
    uc: *mut uc_engine,
    env: EnvLayout,
    /// The bus of the run in progress; only valid during `run`.
    bus: Option<*mut dyn IoBus>,
    vcpu: usize,
    /// Instructions executed by the active vCPU.
    executed: u64,
    /// Of those, instructions executed at CPL 0-2 (kernel code, the
    /// decompressor and early boot included): the position replay of the
    /// kernel alone can reproduce.
    kernel_executed: u64,
    /// Stop before the first block of user code (replay).
    stop_at_user: bool,
    stop_at: u64,
    stop: Option<Stop>,
    /// Stop before a block once IF=1 and there is no interrupt shadow.
    window_requested: bool,
    /// Port and MMIO accesses since the current block started: when an I/O
    /// stop interrupts an instruction, the accesses it already made are the
    /// last of these.
    recent: Vec<Access>,
    /// While an interrupted instruction is completed: its accesses so far,
    /// handed back instead of being made again.
    replay: Vec<Access>,
    /// Next entry of `replay`; `None` until the first replayed access.
    replay_next: Option<usize>,
    replay_error: Option<String>,
    stepping: Option<StepState>,
    /// Breakpoints (linear addresses) of the running vCPU.
    breakpoints: Vec<u64>,
    /// The breakpoint being stepped over, not hit.
    lifted_breakpoint: Option<u64>,
    /// Direct-mapped cache: (block pc, block size) -> instruction count.
    icounts: Vec<(u64, u32, u32)>,
    /// Debugging aid (`KRR_TRACE_KERNEL_BLOCKS=FROM-TO:FILE`): every kernel
    /// block entered while the kernel count is in [FROM, TO), as
    /// "count pc" lines, to compare a recording's run with its replay.
    block_trace: Option<BlockTrace>,
    exits_by_kind: ExitCounters,
    /// A hook's panic, caught before it reached unicorn ([`guarded`]).
    hook_panic: Option<String>,
}

const ICOUNT_CACHE: usize = 1 << 14;

impl HookState {
    fn bus(&mut self) -> &mut dyn IoBus {
        // SAFETY: (unverified, see `Vcpu::run` about unwinding) `self.bus`
        // is `Some` only while `Vcpu::run` runs `run_with_bus`: `run` set it
        // from its live `&mut dyn IoBus`, does not use that reference
        // itself meanwhile, and clears it afterwards. Outside that window
        // `expect` panics instead.
        let bus = unsafe { &mut *self.bus.expect("I/O hook outside a run") };
        bus.position(self.vcpu, self.position());
        bus
    }

    fn position(&self) -> Position {
        Position {
            icount: self.executed,
            kernel_icount: self.kernel_executed,
            rip: self.env.eip(),
            rcx: self.env.reg(1),
            cpl: self.env.cpl(),
        }
    }

    fn icount_slot(pc: u64, size: u32) -> usize {
        ((pc ^ (pc >> 13) ^ ((size as u64) << 7)) as usize) & (ICOUNT_CACHE - 1)
    }

    /// A block was (re)translated: its cached count, if any, describes the
    /// code it was translated from before and is replaced.
    fn block_translated(&mut self, pc: u64, size: u32, icount: u32) {
        self.icounts[Self::icount_slot(pc, size)] = (pc, size, icount);
    }

    fn icount(&mut self, pc: u64, size: u32) -> u64 {
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

    fn stop(&mut self, why: Stop) {
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
    /// the port hooks leave the same way ([`internals::leave_translated_code`]).
    /// The instruction is then stepped once more, and the accesses it
    /// already made are replayed from `recent` rather than repeated, so the
    /// bus sees each access exactly once and the vCPU stops after the
    /// instruction.
    fn access(&mut self, kind: AccessKind, addr: u64, size: usize, write: u64) -> (u64, bool) {
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
        let stop = self.bus().stop_requested();
        if matches!(kind, AccessKind::PioOut | AccessKind::MmioWrite) {
            if let Some(end) = self.bus().run_end(vcpu) {
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
    fn replayed(&mut self, kind: AccessKind, addr: u64, size: usize, write: u64) -> Option<u64> {
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
    fn io_stop(&mut self) {
        self.stop(Stop::Io);
    }

    fn window_open(&self) -> bool {
        self.env.eflags() & RFLAGS_IF != 0 && !self.env.interrupt_shadow()
    }
}

/// Runs the body of a hook. A panic must not unwind into unicorn's C
/// frames (the process would abort, and a recording in progress with it):
/// it is caught here, the run is stopped, and `run` fails with its message.
fn guarded<R>(st: *mut HookState, fallback: R, body: impl FnOnce() -> R) -> R {
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
fn hook_panicked(what: String) -> HypervisorError {
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
unsafe fn state<'a>(ud: *mut c_void) -> &'a mut HookState {
    // SAFETY: per the caller's obligations, `ud` points at the live hook
    // state (an `UnsafeCell<HookState>`, whose pointer is the state's) and
    // the reference is unique while it lives.
    unsafe { &mut *(ud as *mut HookState) }
}

extern "C" fn on_block(_uc: *mut uc_engine, pc: u64, size: u32, ud: *mut c_void) {
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
            if st.executed >= st.stop_at {
                st.stop(Stop::Budget);
                return;
            }
            st.recent.clear();
        }
        let n = st.icount(pc, size);
        st.executed += n;
        if st.env.cpl() != 3 {
            if let Some(t) = &mut st.block_trace {
                t.block(st.kernel_executed, pc);
            }
            st.kernel_executed += n;
        }
    })
}

/// Called when unicorn translates a block, before it first runs: guest
/// code patched in place (alternatives, static keys, text_poke) is
/// retranslated, and the block's count must follow, or a recording and its
/// replay (whose caches see different blocks) could count it differently.
extern "C" fn on_block_translated(
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
extern "C" fn on_breakpoint(_uc: *mut uc_engine, addr: u64, _size: u32, ud: *mut c_void) {
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
fn drop_step_tf(uc: *mut uc_engine, st: &HookState) {
    if let Some(step) = st.stepping {
        if !step.guest_tf {
            let rflags = read_reg(uc, RegisterX86::RFLAGS);
            write_reg(uc, RegisterX86::RFLAGS, rflags & !RFLAGS_TF);
        }
    }
}

extern "C" fn on_intr(uc: *mut uc_engine, intno: u32, ud: *mut c_void) {
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
        st.exits_by_kind.exceptions += 1;
        let vector = intno as u8;
        let software = st.env.exception_is_int();
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

extern "C" fn on_invalid(uc: *mut uc_engine, ud: *mut c_void) -> bool {
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

extern "C" fn on_in(uc: *mut uc_engine, port: u32, size: i32, ud: *mut c_void) -> u32 {
    let (value, stop) = guarded(ud as *mut HookState, (u64::MAX, false), || {
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
    if stop {
        // SAFETY: an IN hook, nothing left to drop in this frame (the
        // guarded body has returned).
        unsafe { internals::leave_translated_code(uc) }
    }
    value as u32
}

extern "C" fn on_out(uc: *mut uc_engine, port: u32, size: i32, value: u32, ud: *mut c_void) {
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
    if stop {
        // SAFETY: an OUT hook, nothing left to drop in this frame (the
        // guarded body has returned).
        unsafe { internals::leave_translated_code(uc) }
    }
}

// Register helpers. Every caller passes as `uc` the engine's open handle:
// `Engine::uc`, `HookState::uc`, or the handle unicorn passed to the hook.
// Only registers whose 64-bit-mode value is at most 8 bytes are passed to
// `read_reg`/`write_reg`: GPRs, RIP, RFLAGS, CR0-CR4, CR8, DR0-DR7 (8 bytes),
// MXCSR (4), FPCW and FPSW (2).

fn write_reg(uc: *mut uc_engine, reg: RegisterX86, v: u64) {
    // SAFETY: `uc` is the engine's open handle and `v` is a live u64, at
    // least the size unicorn reads for each register passed (see above).
    unsafe { uc_reg_write(uc, reg as i32, &v as *const u64 as *const c_void) };
}

fn read_reg(uc: *mut uc_engine, reg: RegisterX86) -> u64 {
    let mut v = 0u64;
    // SAFETY: `uc` is the engine's open handle and `v` is a live u64, at
    // least the size unicorn writes for each register passed (see above).
    unsafe { uc_reg_read(uc, reg as i32, &mut v as *mut u64 as *mut c_void) };
    v
}

fn read_msr(uc: *mut uc_engine, index: u32) -> u64 {
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

extern "C" fn on_cpuid(uc: *mut uc_engine, ud: *mut c_void) -> i32 {
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

extern "C" fn on_rdtsc(uc: *mut uc_engine, ud: *mut c_void) -> i32 {
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

extern "C" fn on_rdtscp(uc: *mut uc_engine, ud: *mut c_void) -> i32 {
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
fn env_regs(env: &EnvLayout, rip: u64, rflags: u64) -> Regs {
    Regs {
        rax: env.reg(0),
        rcx: env.reg(1),
        rdx: env.reg(2),
        rbx: env.reg(3),
        rsp: env.reg(4),
        rbp: env.reg(5),
        rsi: env.reg(6),
        rdi: env.reg(7),
        r8: env.reg(8),
        r9: env.reg(9),
        r10: env.reg(10),
        r11: env.reg(11),
        r12: env.reg(12),
        r13: env.reg(13),
        r14: env.reg(14),
        r15: env.reg(15),
        rip,
        rflags,
    }
}

/// SYSCALL: unicorn only calls the hook; perform the instruction here.
/// Unicorn adds the instruction length to RIP after the hook returns.
extern "C" fn on_syscall(uc: *mut uc_engine, ud: *mut c_void) {
    guarded(ud as *mut HookState, (), || {
        // SAFETY: `ud` is the engine's hook state, registered with this
        // hook in `UnicornVm::new`; see `state` for why this is the only
        // live reference to it.
        let st = unsafe { state(ud) };
        st.exits_by_kind.syscalls += 1;
        let env = st.env;
        let rip = env.eip();
        let rflags = read_reg(uc, RegisterX86::RFLAGS);
        let entry = UserEntry {
            regs: env_regs(&env, rip, rflags),
            fs_base: env.segment(R_FS).base,
            gs_base: env.segment(R_GS).base,
        };
        let (vcpu, at) = (st.vcpu, st.position());
        st.bus().syscall(vcpu, at, &entry);
        perform_syscall(uc, &env, rip, rflags);
        // Unicorn adds the SYSCALL's length to RIP when the hook returns.
        env.set_eip(env.eip().wrapping_sub(2));
    })
}

/// What SYSCALL does, from user state with the instruction at `rip`:
/// RCX/R11 saved, RFLAGS masked, CS/SS from STAR, RIP from LSTAR.
fn perform_syscall(uc: *mut uc_engine, env: &EnvLayout, rip: u64, rflags: u64) {
    let star = read_msr(uc, 0xc000_0081);
    let lstar = read_msr(uc, 0xc000_0082);
    let fmask = read_msr(uc, 0xc000_0084);
    env.set_reg(1, rip + 2);
    env.set_reg(11, rflags & !(1 << 16));
    write_reg(uc, RegisterX86::RFLAGS, rflags & !(fmask | (1 << 16)));
    let selector = ((star >> 32) & 0xffff) as u16;
    env.load_segment(
        R_CS,
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
        R_SS,
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

extern "C" fn on_mmio_read(_uc: *mut uc_engine, offset: u64, size: u32, ud: *mut c_void) -> u64 {
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

extern "C" fn on_mmio_write(
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

struct MmioRegion {
    base: u64,
    state: *mut HookState,
}

/// Per-vCPU state kept while another vCPU owns the engine.
struct VcpuSlot {
    context: *mut uc_context,
    executed: u64,
    kernel_executed: u64,
    stop_at_user: bool,
    pending: Vec<Injection>,
    window_requested: bool,
    single_step: bool,
    breakpoints: Vec<u64>,
}

struct Engine {
    uc: *mut uc_engine,
    state: Box<UnsafeCell<HookState>>,
    slots: Vec<VcpuSlot>,
    active: Option<usize>,
    // Boxed: unicorn keeps a pointer to each region for its callbacks, so
    // they must not move when the vector grows.
    #[allow(clippy::vec_box)]
    mmio: Vec<Box<MmioRegion>>,
    /// Guest RAM is one region at GPA 0, so QEMU's RAM offsets equal
    /// guest-physical addresses.
    ram_at_zero: bool,
    /// Everything a fresh vCPU starts from (a reset x86-64 CPU).
    reset_context: *mut uc_context,
    /// One code hook per breakpoint address of any vCPU.
    breakpoint_hooks: Vec<(u64, uc_hook)>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: every slot's context and `reset_context` were allocated by
        // uc_context_alloc on this engine and are freed exactly once, here
        // (Drop runs once; nothing else frees them; with CPU-only context
        // content their `fv` is NULL, so uc_context_free is a plain free).
        // `uc` is open and is closed once, last; the hook state and MMIO
        // regions its hooks point to are dropped after this body, when no
        // hook can run any more.
        unsafe {
            for s in &self.slots {
                uc_context_free(s.context);
            }
            uc_context_free(self.reset_context);
            uc_close(self.uc);
        }
    }
}

impl Engine {
    // The hook state is shared with C callbacks through a raw pointer; it is
    // an UnsafeCell for that reason, and this accessor is the one place
    // Rust code reaches it.
    #[allow(clippy::mut_from_ref)]
    fn st(&self) -> &mut HookState {
        // SAFETY: `self.state` is a live box. `Engine` is neither `Send`
        // nor `Sync` (raw pointers), so this runs on the engine's thread,
        // and hooks run only inside unicorn calls on that thread. Callers
        // use each returned reference briefly and do not hold one across
        // `uc_emu_start` (where hooks take their own; see `state`), nor
        // across another `st()` call they still use it after; see
        // `on_mmio_read` for the (unverified) MMIO nesting exception.
        unsafe { &mut *self.state.get() }
    }

    /// One code hook per address that any vCPU has a breakpoint at. Code
    /// hooks are compiled into translated blocks, so when the set changes
    /// the translation cache is flushed (a debugger operation, rare).
    fn sync_breakpoint_hooks(&mut self) -> Result<()> {
        let mut wanted: Vec<u64> = self
            .slots
            .iter()
            .flat_map(|s| s.breakpoints.iter().copied())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let have: Vec<u64> = self.breakpoint_hooks.iter().map(|(a, _)| *a).collect();
        if have == wanted {
            return Ok(());
        }
        for (_, h) in self.breakpoint_hooks.drain(..) {
            // SAFETY: `self.uc` is the open engine, idle (this runs under
            // the engine's `RefCell` borrow, which `run` holds while
            // emulating); `h` is a handle uc_hook_add returned on it,
            // deleted once as it is drained.
            check("hook_del", unsafe { uc_hook_del(self.uc, h) })?;
        }
        let ud = self.state.get() as *mut c_void;
        for addr in wanted {
            let mut h: uc_hook = 0;
            // SAFETY: `self.uc` is the open, idle engine; `h` is a live
            // out-parameter; `on_breakpoint` has the uc_cb_hookcode_t
            // signature CODE hooks are called with; `ud` is the engine's
            // hook state, a box freed only after uc_close (see `Drop`).
            // CODE hooks take no variadic arguments after begin/end.
            check("hook_add", unsafe {
                uc_hook_add(
                    self.uc,
                    &mut h,
                    HookType::CODE.0 as i32,
                    on_breakpoint as *mut c_void,
                    ud,
                    addr,
                    addr,
                )
            })?;
            self.breakpoint_hooks.push((addr, h));
        }
        let ctl = ControlType(ControlType::TB_FLUSH.0 | ControlType::IO_WRITE.0);
        // SAFETY: `self.uc` is the open, idle engine; a write of TB_FLUSH
        // takes no variadic arguments.
        check("tb_flush", unsafe { uc_ctl(self.uc, ctl) })
    }

    /// Makes `id` the vCPU whose registers are in the CPU.
    fn activate(&mut self, id: usize) -> Result<()> {
        if self.active == Some(id) {
            return Ok(());
        }
        if let Some(prev) = self.active {
            // SAFETY: `self.uc` is the open, idle engine; the slot's context
            // was allocated by uc_context_alloc on it (`create_vcpu`), so it
            // has room for what uc_context_save writes.
            check("context_save", unsafe {
                uc_context_save(self.uc, self.slots[prev].context)
            })?;
            self.slots[prev].executed = self.st().executed;
            self.slots[prev].kernel_executed = self.st().kernel_executed;
            self.slots[prev].stop_at_user = self.st().stop_at_user;
        }
        // SAFETY: `self.uc` is the open, idle engine; the slot's context was
        // allocated by uc_context_alloc on it and filled by uc_context_save
        // or copied from `reset_context` (`create_vcpu`).
        check("context_restore", unsafe {
            uc_context_restore(self.uc, self.slots[id].context)
        })?;
        let st = self.st();
        st.executed = self.slots[id].executed;
        st.kernel_executed = self.slots[id].kernel_executed;
        st.stop_at_user = self.slots[id].stop_at_user;
        st.vcpu = id;
        self.active = Some(id);
        // Translations are shared; cached address translations are not.
        let ctl = ControlType(ControlType::TLB_FLUSH.0 | ControlType::IO_WRITE.0);
        // SAFETY: `self.uc` is the open, idle engine; a write of TLB_FLUSH
        // takes no variadic arguments.
        check("tlb_flush", unsafe { uc_ctl(self.uc, ctl) })?;
        Ok(())
    }
}

/// The software-CPU VM. Guest memory stays owned by the caller's
/// [`GuestMemoryMmap`], which must outlive the VM; unicorn maps the same host
/// pages (`uc_mem_map_ptr`), so device DMA through `vm-memory` is seen by the
/// guest without copies.
pub struct UnicornVm {
    engine: Rc<RefCell<Engine>>,
}

impl UnicornVm {
    /// Opens a 64-bit x86 engine, runs the internals self-test and maps all
    /// regions of `mem` at their guest-physical addresses.
    pub fn new(mem: &GuestMemoryMmap) -> Result<UnicornVm> {
        let mut uc: *mut uc_engine = std::ptr::null_mut();
        // SAFETY: `uc` is a live out-parameter that uc_open fills in; the
        // arch and mode are valid constants.
        check("uc_open", unsafe {
            uc_open(Arch::X86, Mode::MODE_64, &mut uc)
        })?;
        // SAFETY: `uc` was just opened as a 64-bit x86 engine; the engine
        // that owns the layout from here on closes it last.
        let env = match unsafe { EnvLayout::locate(uc) } {
            Ok(env) => env,
            Err(e) => {
                // SAFETY: `uc` was opened above, nothing else refers to it
                // (no `Engine` owns it yet), and it is not used again.
                unsafe { uc_close(uc) };
                return Err(HypervisorError::Unavailable {
                    backend: BACKEND,
                    reason: e.to_string(),
                });
            }
        };
        let state = Box::new(UnsafeCell::new(HookState {
            uc,
            env,
            bus: None,
            vcpu: 0,
            executed: 0,
            kernel_executed: 0,
            stop_at_user: false,
            stop_at: u64::MAX,
            stop: None,
            window_requested: false,
            recent: Vec::new(),
            replay: Vec::new(),
            replay_next: None,
            replay_error: None,
            stepping: None,
            breakpoints: Vec::new(),
            lifted_breakpoint: None,
            icounts: vec![(u64::MAX, 0, 0); ICOUNT_CACHE],
            block_trace: BlockTrace::from_env(),
            exits_by_kind: ExitCounters::default(),
            hook_panic: None,
        }));
        let mut reset_context = std::ptr::null_mut();
        // SAFETY: `uc` is open; `reset_context` is a live out-parameter.
        check("context_alloc", unsafe {
            uc_context_alloc(uc, &mut reset_context)
        })?;
        let engine = Engine {
            uc,
            state,
            slots: Vec::new(),
            active: None,
            mmio: Vec::new(),
            ram_at_zero: mem.num_regions() == 1
                && mem.iter().next().map(|r| r.start_addr().0) == Some(0),
            reset_context,
            breakpoint_hooks: Vec::new(),
        };
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| HypervisorError::Backend {
                    backend: BACKEND,
                    op: "guest memory",
                    reason: e.to_string(),
                })?;
            // SAFETY: (unverified) `uc` is open and `host` is the start of
            // vm-memory's mapping of `region`, `region.len()` bytes long
            // (unicorn checks the size and alignment). Unicorn keeps using
            // those pages until uc_close, but this engine does not keep
            // `mem` (or a clone) alive: that `mem` outlives the VM is a
            // documented obligation of the caller of this safe function,
            // not enforced. `Machine` and `Replayer` meet it by field order.
            check("mem_map_ptr", unsafe {
                uc_mem_map_ptr(
                    uc,
                    region.start_addr().0,
                    region.len(),
                    Prot::ALL.0,
                    host as *mut c_void,
                )
            })?;
        }
        // Exits mechanism on (with no exits): avoids the phantom translation
        // of the `until` address after every run.
        let ctl = ControlType(ControlType::UC_USE_EXITS.0 | ControlType::IO_WRITE.0);
        // SAFETY: `uc` is open; a write of UC_USE_EXITS takes one variadic
        // `int`, passed as an i32.
        check("use_exits", unsafe { uc_ctl(uc, ctl, 1i32) })?;
        let ud = engine.state.get() as *mut c_void;
        let add = |ty: HookType, cb: *mut c_void, insn: Option<X86Insn>| -> Result<()> {
            let mut h: uc_hook = 0;
            // SAFETY: `uc` is open; `h` is a live out-parameter. Each `cb`
            // passed below has the C signature of its hook type (BLOCK:
            // uc_cb_hookcode_t; EDGE_GENERATED: uc_hook_edge_gen_t; INTR:
            // uc_cb_hookintr_t; INSN_INVALID: uc_cb_hookinsn_invalid_t; IN,
            // OUT: uc_cb_insn_in_t, uc_cb_insn_out_t; CPUID, RDTSC, RDTSCP:
            // uc_cb_insn_cpuid_t; SYSCALL: uc_cb_insn_syscall_t), and INSN
            // hooks get their instruction id as the variadic `int`. `ud` is
            // the hook state box that the engine owns and frees only after
            // uc_close (see `Drop for Engine`).
            let err = unsafe {
                match insn {
                    Some(i) => uc_hook_add(uc, &mut h, ty.0 as i32, cb, ud, 1, 0, i as i32),
                    None => uc_hook_add(uc, &mut h, ty.0 as i32, cb, ud, 1, 0),
                }
            };
            check("hook_add", err)
        };
        add(HookType::BLOCK, on_block as *mut c_void, None)?;
        add(
            HookType::EDGE_GENERATED,
            on_block_translated as *mut c_void,
            None,
        )?;
        add(HookType::INTR, on_intr as *mut c_void, None)?;
        add(HookType::INSN_INVALID, on_invalid as *mut c_void, None)?;
        add(HookType::INSN, on_in as *mut c_void, Some(X86Insn::IN))?;
        add(HookType::INSN, on_out as *mut c_void, Some(X86Insn::OUT))?;
        add(
            HookType::INSN,
            on_cpuid as *mut c_void,
            Some(X86Insn::CPUID),
        )?;
        add(
            HookType::INSN,
            on_rdtsc as *mut c_void,
            Some(X86Insn::RDTSC),
        )?;
        add(
            HookType::INSN,
            on_rdtscp as *mut c_void,
            Some(X86Insn::RDTSCP),
        )?;
        add(
            HookType::INSN,
            on_syscall as *mut c_void,
            Some(X86Insn::SYSCALL),
        )?;
        // SAFETY: `uc` is open and idle; `reset_context` was allocated by
        // uc_context_alloc on it above.
        check("context_save", unsafe {
            uc_context_save(uc, engine.reset_context)
        })?;
        Ok(UnicornVm {
            engine: Rc::new(RefCell::new(engine)),
        })
    }

    /// Exits taken by the backend so far (all vCPUs).
    pub fn exit_counters(&self) -> ExitCounters {
        self.engine.borrow().st().exits_by_kind
    }
}

impl super::Vm for UnicornVm {
    fn exit_counters(&self) -> Option<ExitCounters> {
        Some(UnicornVm::exit_counters(self))
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    fn create_vcpu(&mut self, id: usize) -> Result<Box<dyn Vcpu>> {
        let mut e = self.engine.borrow_mut();
        if id != e.slots.len() {
            return Err(HypervisorError::Backend {
                backend: BACKEND,
                op: "create_vcpu",
                reason: format!(
                    "vCPUs must be created in order; expected id {}",
                    e.slots.len()
                ),
            });
        }
        let mut context = std::ptr::null_mut();
        // SAFETY: `e.uc` is the open, idle engine; `context` is a live
        // out-parameter.
        check("context_alloc", unsafe {
            uc_context_alloc(e.uc, &mut context)
        })?;
        // A new vCPU starts from the reset state saved at creation.
        // SAFETY: `e.uc` is the open engine.
        let size = unsafe { unicorn_engine::unicorn_const::uc_context_size(e.uc) };
        // SAFETY: both contexts were allocated by uc_context_alloc on this
        // engine, i.e. with uc_context_size(e.uc) bytes each, and are
        // distinct allocations. The copy duplicates only plain data: with
        // CPU-only context content (never changed here) the header's `fv`
        // pointer is NULL in both, so nothing is owned twice.
        unsafe {
            std::ptr::copy_nonoverlapping(e.reset_context as *const u8, context as *mut u8, size)
        };
        e.slots.push(VcpuSlot {
            context,
            executed: 0,
            kernel_executed: 0,
            stop_at_user: false,
            pending: Vec::new(),
            window_requested: false,
            single_step: false,
            breakpoints: Vec::new(),
        });
        if e.active.is_none() {
            e.activate(id)?;
        }
        Ok(Box::new(UnicornVcpu {
            id,
            engine: self.engine.clone(),
        }))
    }

    fn add_mmio_region(&mut self, base: u64, size: u64) -> Result<()> {
        let mut e = self.engine.borrow_mut();
        let region = Box::new(MmioRegion {
            base,
            state: e.state.get(),
        });
        let ud = &*region as *const MmioRegion as *mut c_void;
        let uc = e.uc;
        // SAFETY: (unverified) `uc` is the open engine, idle: this runs under
        // the engine's `RefCell` borrow, which `run` holds while emulating.
        // The callbacks have the uc_cb_mmio_read_t/uc_cb_mmio_write_t
        // signatures, and `ud` (the region box) is pushed onto `e.mmio`
        // below, which keeps it as long as the engine. But if uc_mmio_map
        // succeeds and the layout check after it fails, this returns an
        // error and drops the box while unicorn keeps the region and `ud`:
        // a later guest access to it would use freed memory. The callers in
        // this crate (`Machine`, `Replayer`) drop the VM on that error.
        unsafe {
            internals::mmio_map_with_8_byte_accesses(
                uc,
                on_mmio_read as *const c_void,
                on_mmio_write as *const c_void,
                ud,
                || {
                    uc_mmio_map(
                        uc,
                        base,
                        size,
                        Some(on_mmio_read),
                        ud,
                        Some(on_mmio_write),
                        ud,
                    )
                },
            )
        }
        .map_err(|reason| HypervisorError::Backend {
            backend: BACKEND,
            op: "mmio_map",
            reason,
        })?;
        e.mmio.push(region);
        Ok(())
    }

    fn invalidate_code(&mut self, gpa: u64, len: u64) -> Result<()> {
        // unicorn's TB_REMOVE_CACHE takes virtual addresses (and faults on
        // unmapped ones); DMA targets are physical.
        let e = self.engine.borrow();
        if !e.ram_at_zero {
            return Err(HypervisorError::Unsupported(
                "code invalidation with guest RAM not in one region at 0",
            ));
        }
        // SAFETY: `e.uc` is the open engine and idle: this runs under the
        // engine's `RefCell` borrow, which `run` holds while emulating. RAM
        // is one block at GPA 0 (checked above).
        unsafe { internals::invalidate_physical(e.uc, gpa, gpa + len) };
        Ok(())
    }

    fn forget_block_counts(&mut self) {
        // The per-block instruction counts are cached by (pc, byte size);
        // guest code patched in place with the same length but another
        // instruction count (boot-time alternatives: `rdtsc; nop; nop; nop`
        // becomes `lfence; rdtsc`) would keep its old count while it stays
        // cached. Starting a recording, and its replay, from an empty cache
        // makes both count the same code the same way.
        let e = self.engine.borrow();
        e.st().icounts.fill((u64::MAX, 0, 0));
    }
}

/// One vCPU of a [`UnicornVm`].
pub struct UnicornVcpu {
    id: usize,
    engine: Rc<RefCell<Engine>>,
}

fn seg_to_api(c: &SegmentCache) -> Segment {
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

fn seg_from_api(s: &Segment) -> SegmentCache {
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

fn mmr(uc: *mut uc_engine, reg: RegisterX86) -> uc_x86_mmr {
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

fn set_mmr(uc: *mut uc_engine, reg: RegisterX86, t: uc_x86_mmr) {
    // SAFETY: `uc` is the engine's open handle and `t` a live uc_x86_mmr, the
    // type unicorn reads for GDTR, IDTR, TR and LDTR, the only registers
    // passed.
    unsafe { uc_reg_write(uc, reg as i32, &t as *const uc_x86_mmr as *const c_void) };
}

const GPRS: [RegisterX86; 18] = [
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
enum StepEnd {
    /// The instruction retired (or raised an exception that was delivered);
    /// `io_stop`: one of its accesses asked for a stop.
    Retired { io_stop: bool },
    /// The step ends the run with this exit.
    Exit(VmExit),
}

/// CS base + RIP: the address unicorn translates, and exits compare with.
fn linear_rip(env: &EnvLayout, rip: u64) -> u64 {
    env.segment(R_CS).base.wrapping_add(rip)
}

fn is_breakpoint(e: &Engine, id: usize, rip: u64) -> bool {
    let bps = &e.slots[id].breakpoints;
    !bps.is_empty() && bps.contains(&linear_rip(&e.st().env, rip))
}

/// Whether the instruction before `rip` is HLT (unicorn reports a halt only
/// by returning).
fn halted_after(uc: *mut uc_engine, env: &EnvLayout, rip: u64) -> bool {
    let mut b = [0u8; 1];
    let at = linear_rip(env, rip).wrapping_sub(1);
    // SAFETY: `uc` is the engine's open handle (`Engine::uc`); `b` is a live
    // 1-byte buffer and the size passed is 1.
    let ok = unsafe { uc_vmem_read(uc, at, Prot::EXEC, b.as_mut_ptr() as *mut c_void, 1) }
        == uc_error::OK;
    ok && b[0] == 0xf4
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
        let at_breakpoint = is_breakpoint(e, self.id, rip);
        if single_step || at_breakpoint {
            // Single-step, or resume from a breakpoint: execute the
            // instruction there without stopping at it (gdb semantics).
            let step = self.step(e, Vec::new())?;
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
            if window_requested && e.st().window_open() {
                return Ok(VmExit::InterruptWindow);
            }
        }
        let st = e.st();
        st.window_requested = window_requested;
        st.stop = None;
        st.recent.clear();
        st.stop_at = match budget {
            Some(b) => st.executed.saturating_add(b),
            None => u64::MAX,
        };
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
                let made = std::mem::take(&mut st.recent);
                st.exits_by_kind.io_stops += 1;
                return match self.step(e, made)? {
                    StepEnd::Exit(exit) => Ok(exit),
                    StepEnd::Retired { .. } => Ok(VmExit::IoStop),
                };
            }
            Some(Stop::Breakpoint) => return Ok(VmExit::Debug { rip: new_rip }),
            Some(Stop::UserMode) => return Ok(VmExit::UserMode { rip: new_rip }),
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
    fn step(&self, e: &mut Engine, replay: Vec<Access>) -> Result<StepEnd> {
        let uc = e.uc;
        let rip = e.st().env.eip();
        let rflags = read_reg(uc, RegisterX86::RFLAGS);
        let guest_tf = rflags & RFLAGS_TF != 0;
        let dr6 = read_reg(uc, RegisterX86::DR6);
        e.st().lifted_breakpoint = Some(linear_rip(&e.st().env, rip));
        write_reg(uc, RegisterX86::RFLAGS, rflags | RFLAGS_TF);
        let st = e.st();
        st.replay = replay;
        st.replay_next = None;
        st.replay_error = None;
        st.stepping = Some(StepState {
            guest_tf,
            ..StepState::default()
        });
        st.stop = None;
        let stop_at = st.stop_at;
        st.stop_at = u64::MAX;
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
                if let Some(cr2) = cr2 {
                    write_reg(e.uc, RegisterX86::CR2, cr2);
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
    fn run(&mut self, bus: &mut dyn IoBus, budget: Option<u64>) -> Result<VmExit> {
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
        let bus_ptr: *mut (dyn IoBus + '_) = bus;
        // SAFETY: (unverified) the transmute changes only the trait object's
        // lifetime bound (same pointer, same vtable). The pointer is used
        // only by hooks, through `HookState::bus`, during `run_with_bus`
        // below, while `bus` is borrowed by this call and not otherwise
        // used, and is cleared right after. If `run_with_bus` unwound, it
        // would stay set; a later `run` replaces it before emulating, but an
        // MMIO callback during that run's `try_deliver_pending` (see
        // `on_mmio_read`) could still see the stale pointer.
        st.bus =
            Some(unsafe { std::mem::transmute::<*mut (dyn IoBus + '_), *mut dyn IoBus>(bus_ptr) });
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
            let env = e.st().env;
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
                cs: seg_to_api(&env.segment(R_CS)),
                ds: seg_to_api(&env.segment(R_DS)),
                es: seg_to_api(&env.segment(R_ES)),
                fs: seg_to_api(&env.segment(R_FS)),
                gs: seg_to_api(&env.segment(R_GS)),
                ss: seg_to_api(&env.segment(R_SS)),
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
            let env = e.st().env;
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
                (R_SS, &s.ss),
                (R_CS, &s.cs),
                (R_DS, &s.ds),
                (R_ES, &s.es),
                (R_FS, &s.fs),
                (R_GS, &s.gs),
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

    fn interrupt_window_open(&self) -> Result<bool> {
        self.with(|e| {
            let rflags = read_reg(e.uc, RegisterX86::RFLAGS);
            Ok(rflags & (1 << 9) != 0 && !e.st().env.interrupt_shadow())
        })
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

    fn instructions_retired(&self) -> Option<u64> {
        let e = self.engine.borrow();
        if e.active == Some(self.id) {
            Some(e.st().executed)
        } else {
            Some(e.slots[self.id].executed)
        }
    }

    fn kernel_instructions_retired(&self) -> Option<u64> {
        let e = self.engine.borrow();
        if e.active == Some(self.id) {
            Some(e.st().kernel_executed)
        } else {
            Some(e.slots[self.id].kernel_executed)
        }
    }

    fn enter_syscall(&mut self, entry: &UserEntry) -> Result<()> {
        self.with(|e| {
            let env = e.st().env;
            let r = &entry.regs;
            let v = [
                r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ];
            for (i, val) in v.into_iter().enumerate() {
                env.set_reg(i, val);
            }
            for (seg, base) in [(R_FS, entry.fs_base), (R_GS, entry.gs_base)] {
                let mut cache = env.segment(seg);
                cache.base = base;
                env.load_segment(seg, cache);
            }
            perform_syscall(e.uc, &env, r.rip, r.rflags);
            Ok(())
        })
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
