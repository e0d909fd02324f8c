// SPDX-License-Identifier: GPL-2.0-or-later
//! The state the software CPU's hooks share with the engine: instruction
//! counts and stop targets, stepping, accesses to replay, and why a run stopped.

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
    /// A watched range was accessed ([`HookState::watch_hit`]).
    Watch,
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
/// stop interrupted), or, for a REP string instruction, one block of it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct StepState {
    /// The guest had TF set itself: its #DB is real and is delivered.
    pub(super) guest_tf: bool,
    /// Stepped without TF (a REP string instruction, see `step`): no
    /// single-step trap comes, the next block ends the step.
    pub(super) no_trap: bool,
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
pub(super) const SPIN_BLOCK_BYTES: u32 = 24;

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
    /// The active vCPU's counts, kept by translated code itself (the
    /// project's unicorn patch, `uc_krr_set_counter`) and by the block hook
    /// when a block needs it: `retired`, the instructions of the blocks
    /// entered (a block counts whole on entry); `kernel`, of those, the
    /// ones at CPL 0-2 (kernel code, the decompressor and early boot
    /// included: the position replay of the kernel alone can reproduce);
    /// and the block entered last (`block_*`, see [`HookState::block`]).
    pub(super) counter: uc_krr_counter,
    /// The counts (all, kernel) events are positioned at while an
    /// instruction is stepped ([`HookState::position_step_as_block`]).
    pub(super) position_override: Option<(u64, u64)>,
    /// The physical pieces of the watchpoints.
    pub(super) watch_ranges: Vec<WatchRange>,
    /// The first watched access of the run.
    pub(super) watch_hit: Option<WatchHit>,
    /// A watched access was made: the run stops before the next block.
    pub(super) watch_pending: bool,
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
    /// `counter.retired` when `recent` was started: blocks counted inline
    /// do not clear it, a new count at an access does.
    pub(super) recent_at: u64,
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
    /// Debugging aid (`KRR_TRACE_KERNEL_BLOCKS=FROM-TO:FILE`): every kernel
    /// block entered while the kernel count is in [FROM, TO), as
    /// "count pc" lines, to compare a recording's run with its replay.
    pub(super) block_trace: Option<BlockTrace>,
    pub(super) exits_by_kind: ExitCounters,
    /// A hook's panic, caught before it reached unicorn ([`guarded`]).
    pub(super) hook_panic: Option<String>,
}

/// A physical piece `[start, end)` of a watchpoint.
#[derive(Debug, Clone, Copy)]
pub(super) struct WatchRange {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) watchpoint: Watchpoint,
}

/// A block as the block hook counted it on entry.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct EnteredBlock {
    pub(super) pc: u64,
    pub(super) size: u32,
    pub(super) insns: u64,
    pub(super) kernel: bool,
}

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
        let (icount, kernel_icount) = self
            .position_override
            .unwrap_or((self.counter.retired, self.counter.kernel));
        Position {
            icount,
            kernel_icount,
            rip: self.env.eip(),
            rcx: self.env.reg(Gpr::Rcx),
            cpl: self.env.cpl(),
        }
    }

    /// The stepped instruction raised an exception: the rest of the block a
    /// run would have executed never runs, but a run counts a block whole
    /// on entry (as recordings do), so the counts are those of its end.
    pub(super) fn exception_ends_block(&mut self) {
        if let Some((all, kernel)) = self.position_override {
            self.counter.retired = self.counter.retired.max(all);
            self.counter.kernel = self.counter.kernel.max(kernel);
        }
    }

    /// The block entered last, as counted then: its address, size and
    /// instructions, and whether they went to the kernel count too.
    pub(super) fn block(&self) -> EnteredBlock {
        EnteredBlock {
            pc: self.counter.block_pc,
            size: self.counter.block_size,
            insns: u64::from(self.counter.block_insns),
            kernel: self.counter.block_kernel != 0,
        }
    }

    pub(super) fn set_block(&mut self, b: EnteredBlock) {
        self.counter.block_pc = b.pc;
        self.counter.block_size = b.size;
        self.counter.block_insns = b.insns as u32;
        self.counter.block_kernel = u32::from(b.kernel);
    }

    /// Sets the counter's limits from what the run needs at every block:
    /// translated code counts a block itself (no hook) only while its
    /// count is below the limit for its privilege, so the hook runs where
    /// the budget ends, and at every block (limit 0) while a step, a
    /// watched access, an interrupt window, a traced or watched block, or
    /// (for user code) a stop at user mode needs it. Called before each
    /// run and wherever one of these changes during a run.
    pub(super) fn sync_inline_limit(&mut self) {
        let every_block = self.stepping.is_some()
            || self.watch_pending
            || self.window_requested
            || self.watch_pc.is_some()
            || self.block_trace.is_some();
        self.counter.limit = if every_block { 0 } else { self.stop_at };
        self.counter.user_limit = if every_block || self.stop_at_user {
            0
        } else {
            self.stop_at
        };
    }

    /// How many instructions of the block entered last come before `rip`
    /// (decoded from the block's code).
    fn instructions_before(&self, rip: u64) -> std::result::Result<u64, String> {
        let b = self.block();
        let before_len = rip.wrapping_sub(b.pc);
        if before_len >= u64::from(b.size) {
            return Err(format!(
                "{rip:#x} is outside the block entered last ({:#x}, {} bytes)",
                b.pc, b.size
            ));
        }
        let mut code = vec![0u8; before_len as usize];
        // SAFETY: `self.uc` is the open engine (see `HookState::uc`), idle
        // or inside a hook on the emulating thread; `code` has room for the
        // `code.len()` bytes read.
        let err = unsafe {
            uc_vmem_read(
                self.uc,
                b.pc,
                Prot::EXEC,
                code.as_mut_ptr().cast(),
                code.len(),
            )
        };
        if err != uc_error::OK {
            return Err(format!("reading the block at {:#x}: {err:?}", b.pc));
        }
        let mut decoder =
            iced_x86::Decoder::with_ip(64, &code, b.pc, iced_x86::DecoderOptions::NONE);
        let mut before = 0u64;
        while decoder.can_decode() {
            if decoder.decode().is_invalid() {
                break;
            }
            before += 1;
        }
        if decoder.ip() != rip || before >= b.insns {
            return Err(format!(
                "the block at {:#x} ({} instructions) does not decode to an instruction at {rip:#x}",
                b.pc, b.insns
            ));
        }
        Ok(before)
    }

    /// A breakpoint stopped the vCPU at `rip`, inside the block entered
    /// last, which was counted whole on entry: takes back the instructions
    /// from `rip` to the block's end (they run, and are counted, as a block
    /// of their own when the vCPU resumes), so that counts are as exact at a
    /// breakpoint as at a block boundary.
    pub(super) fn uncount_rest_of_block(&mut self, rip: u64) -> std::result::Result<(), String> {
        let before = self.instructions_before(rip)?;
        (self.counter.retired, self.counter.kernel) = self.counts_with(before);
        // Counted: a second breakpoint stop in the same block must not
        // take these back again.
        let mut b = self.block();
        b.insns = before;
        b.size = rip.wrapping_sub(b.pc) as u32;
        self.set_block(b);
        Ok(())
    }

    /// The counts (all, kernel) had the block entered last stopped after
    /// its first `before` instructions (it was counted whole on entry).
    fn counts_with(&self, before: u64) -> (u64, u64) {
        let b = self.block();
        let rest = b.insns - before.min(b.insns);
        let kernel_rest = if b.kernel { rest } else { 0 };
        (
            self.counter.retired - rest,
            self.counter.kernel - kernel_rest,
        )
    }

    /// A watched access of `size` bytes at physical `pa` by the instruction
    /// at RIP (synchronised by unicorn before the hook): notes the first
    /// one, with the counts right before that instruction; the run stops
    /// before the next block.
    pub(super) fn watched_access(&mut self, pa: u64, size: u64, write: bool) {
        let Some(r) = self
            .watch_ranges
            .iter()
            .find(|r| pa < r.end && pa + size.max(1) > r.start)
            .copied()
        else {
            return;
        };
        let caught = match r.watchpoint.kind {
            WatchKind::Write => write,
            WatchKind::Read => !write,
            WatchKind::Access => true,
        };
        if !caught || self.watch_hit.is_some() {
            return;
        }
        let rip = self.env.eip();
        // Inside a stepped instruction the block is that instruction.
        let before = self.instructions_before(rip).unwrap_or(0);
        let (icount, kernel_icount) = self.counts_with(before);
        self.watch_hit = Some(WatchHit {
            watchpoint: r.watchpoint,
            write,
            rip,
            icount,
            kernel_icount,
        });
        self.watch_pending = true;
        self.sync_inline_limit();
    }

    /// The block unicorn runs from `pc` with the CPU's current flags
    /// (translated now if it is not cached).
    pub(super) fn request_block(&mut self, pc: u64) -> Option<TranslationBlock> {
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
        (err == uc_error::OK && tb.pc == pc).then_some(tb)
    }

    /// Before stepping the instruction at `rip`: events it makes are
    /// positioned, and an exception it raises leaves the counts, where the
    /// block a run from `rip` would execute ends (a run counts a block whole
    /// when it enters it, and records and replays count that way).
    pub(super) fn position_step_as_block(&mut self, rip: u64) {
        self.position_override = self.request_block(rip).map(|tb| {
            let n = u64::from(tb.icount);
            let kernel = if self.env.cpl() != 3 { n } else { 0 };
            (self.counter.retired + n, self.counter.kernel + kernel)
        });
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
        if self.recent_at != self.counter.retired {
            self.recent.clear();
            self.recent_at = self.counter.retired;
        }
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
                self.sync_inline_limit();
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
