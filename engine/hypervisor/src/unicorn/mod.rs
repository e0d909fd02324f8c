// SPDX-License-Identifier: GPL-2.0-or-later
//! The software CPU backend (`tcg`): QEMU's TCG as packaged by unicorn 2.1.5.
//!
//! One unicorn instance per VM runs every vCPU: a vCPU's registers are a
//! saved unicorn context, switched in when that vCPU runs, so all vCPUs share
//! one translation cache and code one vCPU patches is seen by all.
//!
//! Instruction counting: a block hook adds each translation block's
//! instruction count (cached by address and size, refreshed whenever unicorn
//! translates the block again, so code patched in place is counted as it is
//! now) before the block runs, and stops the CPU before a block once the
//! budget is reached. Counts and stop points are therefore deterministic,
//! but not exact in two cases: a block cut short by a fault, a breakpoint
//! or an I/O stop is counted whole (an I/O stop adds one more for the step
//! that completes the interrupted instruction); and a budget ends at the
//! first block boundary at or after it (a block is at most a few dozen
//! instructions).
//!
//! Files: `hooks.rs` (the hook state and the C callbacks), `vcpu.rs` (a
//! vCPU's runs and registers), `delivery.rs` (exceptions and interrupts
//! through the guest IDT), `internals.rs` (QEMU's CPU state, checked at
//! start-up), this file (the engine shared by the vCPUs, and the VM).
//!
//! Exact stops:
//! - I/O stops ([`RunEvents::stop_requested`](crate::RunEvents::stop_requested) after an access) end right after
//!   the accessing instruction, and every access reaches the bus once: the
//!   CPU leaves the block at the start of that instruction (unicorn's exit
//!   check after an MMIO access; `internals::cpu_state` and port_hooks.c for
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
mod hooks;
pub(crate) mod internals;
mod state;
mod vcpu;

pub use super::ExitCounters;
use super::{
    DebugRegs, DeliveredException, DescriptorTable, FpuState, HypervisorError, Injection,
    PlacedWatchpoint, Position, Regs, Result, RunContext, Segment, Sregs, UserEntry, Vcpu, VmExit,
    WatchHit, WatchKind, Watchpoint,
};
use delivery::{deliver, has_error_code, EventKind};
use hooks::*;
use internals::{
    EnvLayout, Gpr, Seg, SegmentCache, DESC_A_MASK, DESC_B_MASK, DESC_CS_MASK, DESC_DPL_SHIFT,
    DESC_G_MASK, DESC_L_MASK, DESC_P_MASK, DESC_R_MASK, DESC_S_MASK, DESC_W_MASK,
};
use state::*;
use std::cell::{RefCell, UnsafeCell};
use std::ffi::c_void;
use std::rc::Rc;
use unicorn_engine::unicorn_const::{
    uc_close, uc_context, uc_context_alloc, uc_context_free, uc_context_restore, uc_context_save,
    uc_ctl, uc_emu_start, uc_emu_stop, uc_engine, uc_error, uc_hook, uc_hook_add, uc_hook_del,
    uc_mem_map_ptr, uc_mmio_map, uc_open, uc_reg_read, uc_reg_write, uc_vmem_read, uc_x86_mmr,
    uc_x86_msr, Arch, ControlType, HookType, Mode, Prot, RegisterX86, TranslationBlock, X86Insn,
};
use unicorn_engine::unicorn_const::{
    uc_krr_counter, uc_krr_patch_level, uc_krr_set_counter, uc_krr_switch_begin, uc_krr_switch_end,
};
pub use vcpu::UnicornVcpu;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const BACKEND: &str = "tcg";

/// The level of the project's unicorn patches (engine/unicorn-source) that
/// this backend is written for: its `UC_KRR_PATCH_LEVEL`.
const UNICORN_PATCH_LEVEL: u32 = 8;

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

/// Per-vCPU state kept while another vCPU owns the engine.
struct VcpuSlot {
    context: *mut uc_context,
    retired: u64,
    kernel_retired: u64,
    stop_at_user: bool,
    /// Whether the vCPU takes interrupts (IF set, no STI/MOV SS shadow),
    /// as of its last turn: its registers change only while it owns the
    /// engine, so asking an idle vCPU needs no context swap (each swap
    /// drops the TLB's non-global entries).
    window_open: bool,
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
    /// Guest-physical address just past the last byte of RAM.
    ram_end: u64,
    /// Everything a fresh vCPU starts from (a reset x86-64 CPU).
    reset_context: *mut uc_context,
    /// One code hook per breakpoint address of any vCPU.
    breakpoint_hooks: Vec<(u64, uc_hook)>,
    /// One memory hook per physical range of a watchpoint.
    watch_hooks: Vec<uc_hook>,
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
        self.flush_translations()
    }

    fn flush_translations(&mut self) -> Result<()> {
        let ctl = ControlType(ControlType::TB_FLUSH.0 | ControlType::IO_WRITE.0);
        // SAFETY: `self.uc` is the open, idle engine; a write of TB_FLUSH
        // takes no variadic arguments.
        check("tb_flush", unsafe { uc_ctl(self.uc, ctl) })
    }

    /// Turns the spin stop on or off. Small kernel blocks that end in PAUSE
    /// run the block hook only while it is on (translation decides, so a
    /// change flushes translated code): with one vCPU nothing can release a
    /// spinner sooner, and a boot's TSC wait loops would hook each turn.
    fn set_yield_on_spin(&mut self, enable: bool) -> Result<()> {
        let bytes = if enable { SPIN_BLOCK_BYTES } else { 0 };
        let st = self.st();
        st.yield_on_spin = enable;
        if st.counter.spin_block_bytes != bytes {
            st.counter.spin_block_bytes = bytes;
            self.flush_translations()?;
        }
        Ok(())
    }

    /// Replaces the watchpoints with memory hooks on their physical pieces
    /// (unicorn bounds memory hooks by physical address).
    fn set_watch_hooks(&mut self, watchpoints: &[PlacedWatchpoint]) -> Result<()> {
        for h in self.watch_hooks.drain(..) {
            // SAFETY: `self.uc` is the open engine, idle (under the engine's
            // `RefCell` borrow); `h` is a handle uc_hook_add returned on
            // it, deleted once as it is drained.
            check("hook_del", unsafe { uc_hook_del(self.uc, h) })?;
        }
        let ranges: Vec<WatchRange> = watchpoints
            .iter()
            .flat_map(|(wp, pieces)| {
                pieces.iter().map(|&(start, end)| WatchRange {
                    start,
                    end,
                    watchpoint: *wp,
                })
            })
            .collect();
        let ud = self.state.get() as *mut c_void;
        for r in &ranges {
            let types = match r.watchpoint.kind {
                WatchKind::Write => HookType::MEM_WRITE.0,
                WatchKind::Read => HookType::MEM_READ.0,
                WatchKind::Access => HookType::MEM_WRITE.0 | HookType::MEM_READ.0,
            };
            let mut h: uc_hook = 0;
            // SAFETY: `self.uc` is the open, idle engine; `h` is a live
            // out-parameter; `on_watch` has the uc_cb_hookmem_t signature
            // MEM_READ/MEM_WRITE hooks are called with; `ud` is the
            // engine's hook state, a box freed only after uc_close (see
            // `Drop`). Memory hooks take no variadic arguments after
            // begin/end (inclusive, physical in unicorn 2.1.5).
            check("hook_add", unsafe {
                uc_hook_add(
                    self.uc,
                    &mut h,
                    types as i32,
                    on_watch as *mut c_void,
                    ud,
                    r.start,
                    r.end - 1,
                )
            })?;
            self.watch_hooks.push(h);
        }
        self.st().watch_ranges = ranges;
        Ok(())
    }

    /// Makes `id` the vCPU whose registers are in the CPU.
    fn activate(&mut self, id: usize) -> Result<()> {
        if self.active == Some(id) {
            return Ok(());
        }
        if let Some(prev) = self.active {
            // SAFETY: `self.uc` is the open, idle engine, the outgoing
            // vCPU's registers still in its CPU.
            check("krr_switch_begin", unsafe { uc_krr_switch_begin(self.uc) })?;
            // SAFETY: `self.uc` is the open, idle engine; the slot's context
            // was allocated by uc_context_alloc on it (`create_vcpu`), so it
            // has room for what uc_context_save writes.
            check("context_save", unsafe {
                uc_context_save(self.uc, self.slots[prev].context)
            })?;
            self.slots[prev].retired = self.st().counter.retired;
            self.slots[prev].kernel_retired = self.st().counter.kernel;
            self.slots[prev].stop_at_user = self.st().stop_at_user;
            self.slots[prev].window_open = self.st().window_open();
        }
        // SAFETY: `self.uc` is the open, idle engine; the slot's context was
        // allocated by uc_context_alloc on it and filled by uc_context_save
        // or copied from `reset_context` (`create_vcpu`).
        check("context_restore", unsafe {
            uc_context_restore(self.uc, self.slots[id].context)
        })?;
        let st = self.st();
        st.counter.retired = self.slots[id].retired;
        st.counter.kernel = self.slots[id].kernel_retired;
        st.stop_at_user = self.slots[id].stop_at_user;
        st.vcpu = id;
        self.active = Some(id);
        // Translations are shared; cached address translations are not,
        // except those of global pages when both vCPUs page alike (the
        // guest kernel's, the same on every CPU; patch 0009).
        // SAFETY: `self.uc` is the open, idle engine, the next vCPU's
        // registers restored.
        check("krr_switch_end", unsafe { uc_krr_switch_end(self.uc) })?;
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
        // SAFETY: takes nothing and returns a constant of the library.
        let patch_level = unsafe { uc_krr_patch_level() };
        if patch_level != UNICORN_PATCH_LEVEL {
            return Err(HypervisorError::Unavailable {
                backend: BACKEND,
                reason: format!(
                    "the linked unicorn carries the project's patches at level {patch_level}, this engine needs level {UNICORN_PATCH_LEVEL} (engine/unicorn-source/patches; a clean build rebuilds it)"
                ),
            });
        }
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
            counter: uc_krr_counter {
                retired: 0,
                kernel: 0,
                limit: 0,
                user_limit: 0,
                block_pc: 0,
                block_size: 0,
                block_insns: 0,
                block_kernel: 0,
                // Until the spin stop is asked for (`set_yield_on_spin`).
                spin_block_bytes: 0,
                hook_insns: 0,
                hook_wait_loop: 0,
            },
            stop_at_user: false,
            yield_on_spin: false,
            watch_pc: None,
            watch_hits: 0,
            cr2_at_run_start: 0,
            spin_pc: u64::MAX,
            spin_repeats: 0,
            stop_at: u64::MAX,
            stop: None,
            window_requested: false,
            recent: Vec::new(),
            recent_at: 0,
            replay: Vec::new(),
            replay_next: None,
            replay_error: None,
            stepping: None,
            breakpoints: Vec::new(),
            lifted_breakpoint: None,
            position_override: None,
            watch_ranges: Vec::new(),
            watch_hit: None,
            watch_pending: false,
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
            ram_end: mem.last_addr().0.saturating_add(1),
            reset_context,
            breakpoint_hooks: Vec::new(),
            watch_hooks: Vec::new(),
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
        // SAFETY: `uc` is open; the counter lives in the hook state box,
        // which the engine owns and frees only after uc_close, so
        // translated code never writes it after it is gone.
        check("krr_set_counter", unsafe {
            uc_krr_set_counter(uc, &mut (*engine.state.get()).counter)
        })?;
        add(HookType::INTR, on_intr as *mut c_void, None)?;
        add(HookType::INSN_INVALID, on_invalid as *mut c_void, None)?;
        add(HookType::INSN, krr_on_in as *mut c_void, Some(X86Insn::IN))?;
        add(
            HookType::INSN,
            krr_on_out as *mut c_void,
            Some(X86Insn::OUT),
        )?;
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
            retired: 0,
            kernel_retired: 0,
            stop_at_user: false,
            // A reset CPU has IF clear.
            window_open: false,
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
        // The range comes from DMA, a guest's or a recording's: QEMU walks
        // it page by page, so one past RAM (or wrapping) must not reach it.
        let end = gpa.checked_add(len).filter(|&end| end <= e.ram_end);
        let Some(end) = end else {
            return Err(HypervisorError::Backend {
                backend: BACKEND,
                op: "invalidate_code",
                reason: format!(
                    "guest-physical {gpa:#x}..+{len:#x} is not inside guest RAM (0..{:#x})",
                    e.ram_end
                ),
            });
        };
        // SAFETY: `e.uc` is the open engine and idle: this runs under the
        // engine's `RefCell` borrow, which `run` holds while emulating. RAM
        // is one block at GPA 0 (checked above).
        unsafe { internals::invalidate_physical(e.uc, gpa, end) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Vm;
    use vm_memory::GuestAddress;

    /// Code invalidation takes ranges of guest RAM only: one past its end
    /// or wrapping past the top of the address space is an error naming
    /// it (QEMU would walk it page by page).
    #[test]
    fn code_invalidation_stays_inside_guest_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut vm = UnicornVm::new(&mem).unwrap();
        vm.invalidate_code(0x1000, 0x2000).unwrap();
        vm.invalidate_code(0, 1 << 20).unwrap();
        for (gpa, len) in [
            (0xf_f000, 0x2000),
            (1 << 40, 1 << 60),
            (u64::MAX - 0xf, 0x100),
        ] {
            let e = vm.invalidate_code(gpa, len).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "{gpa:#x}..+{len:#x} is not inside guest RAM (0..0x100000)"
                )),
                "{e}"
            );
        }
    }
}
