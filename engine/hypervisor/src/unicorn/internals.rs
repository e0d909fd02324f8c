// SPDX-License-Identifier: GPL-2.0-or-later
//! The only place that reaches into unicorn's (QEMU's) private CPU state.
//!
//! Unicorn's public API cannot do three things the backend needs: read the
//! error code and "came from INT n" flag of a pending exception, reset the
//! "exception in flight" marker after the platform delivered an exception,
//! and load a segment register's hidden descriptor cache (and with it the
//! CPL and the 64-bit code flags) in long mode. All of these live in QEMU's
//! `CPUX86State`, so this module locates that structure once per engine and
//! checks every assumption it makes against values written through the public
//! API ([`EnvLayout::locate`]). The layout is that of the pinned
//! `unicorn-engine =2.1.5`; when a different build breaks an assumption the
//! engine refuses to start with a message naming it.

use std::ffi::c_void;
use unicorn_engine::unicorn_const::{uc_engine, uc_reg_write, RegisterX86};

/// `offsetof(struct uc_struct, cpu)` in unicorn 2.1.5: 16 bytes of enums, two
/// 56-byte `AddressSpace`s, then 39 function pointers. `uc_struct` goes on
/// well past it, so every 8-byte read at or below this offset is inside it.
const UC_CPU_OFFSET: usize = 440;
/// `offsetof(struct uc_struct, address_space_memory.uc)` and
/// `address_space_io.uc`: both point back at the engine, which confirms the
/// size of `AddressSpace` and hence [`UC_CPU_OFFSET`].
const UC_AS_MEMORY_UC_OFFSET: usize = 64;
const UC_AS_IO_UC_OFFSET: usize = 120;

// Offsets inside CPUX86State (QEMU 5.0 as vendored by unicorn 2.1.5).
const ENV_REGS: usize = 0;
const ENV_EIP: usize = 128;
/// `eflags` holds IF, TF and the other system flags (the arithmetic flags
/// live in the lazy `cc_*` fields).
const ENV_EFLAGS: usize = 136;
const ENV_HFLAGS: usize = 176;
const ENV_SEGS: usize = 184;
const SEGMENT_CACHE_SIZE: usize = 24;
const ENV_CR: usize = 424;
/// cr[9], a20_mask, bnd_regs[4], bndcs_regs and msr_bndcfgs precede it.
const ENV_EFER: usize = 592;

/// QEMU's segment register indices.
/// A segment register, by its index in `CPUX86State.segs[]` (QEMU's
/// `Seg::Es`..`Seg::Gs`): only these six exist, so an index is always in bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Seg {
    Es = 0,
    Cs = 1,
    Ss = 2,
    Ds = 3,
    Fs = 4,
    Gs = 5,
}

/// A general-purpose register, by its index in `CPUX86State.regs[16]`
/// (QEMU's `R_EAX`..`R_R15` order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    /// All sixteen, in `regs[]` order.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];
}

// hflags bits (target/i386/cpu.h).
pub const HF_CPL_MASK: u32 = 3;
pub const HF_INHIBIT_IRQ_MASK: u32 = 1 << 3;
pub const HF_CS32_MASK: u32 = 1 << 4;
pub const HF_SS32_MASK: u32 = 1 << 5;
pub const HF_ADDSEG_MASK: u32 = 1 << 6;
pub const HF_LMA_MASK: u32 = 1 << 14;
pub const HF_CS64_MASK: u32 = 1 << 15;

// Segment cache flag bits (the descriptor's high dword layout).
pub const DESC_G_MASK: u32 = 1 << 23;
pub const DESC_B_MASK: u32 = 1 << 22;
pub const DESC_L_MASK: u32 = 1 << 21;
pub const DESC_P_MASK: u32 = 1 << 15;
pub const DESC_DPL_SHIFT: u32 = 13;
pub const DESC_S_MASK: u32 = 1 << 12;
pub const DESC_CS_MASK: u32 = 1 << 11;
pub const DESC_R_MASK: u32 = 1 << 9;
pub const DESC_W_MASK: u32 = 1 << 9;
pub const DESC_A_MASK: u32 = 1 << 8;

/// A hidden segment descriptor cache as QEMU keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentCache {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub flags: u32,
}

/// Where the fields this backend touches are, for one engine.
///
/// Invariant relied on by the `unsafe` blocks below: `env` points at the
/// `CPUX86State` of an open engine (found by [`EnvLayout::locate`]); it lives
/// inside the `X86CPU` that unicorn allocated and zeroed at `uc_open` and
/// frees at `uc_close`. The backend keeps every `EnvLayout` inside (or
/// borrowed from) the `Engine` that owns that handle, so it is never used
/// after `uc_close`. `EnvLayout` holds a raw pointer and is neither `Send`
/// nor `Sync`: its reads and writes happen on the engine's thread, either
/// between runs or inside a hook, while unicorn's own code is paused.
///
/// Not `Clone`: the one layout lives in the engine's hook state, so it cannot
/// outlive the engine that owns the handle.
#[derive(Debug)]
pub struct EnvLayout {
    env: *mut u8,
    error_code: usize,
    exception_is_int: usize,
    old_exception: usize,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unicorn internals self-test failed ({0}); this engine supports unicorn-engine =2.1.5 only"
)]
pub struct SelfTestError(pub String);

/// Reads the 8 bytes at `p` as a native-endian u64; `p` need not be aligned.
///
/// # Safety
/// `p` must be valid for reads of 8 bytes, all of them initialised.
unsafe fn read_u64(p: *const u8) -> u64 {
    // SAFETY: the caller guarantees 8 readable, initialised bytes at `p`;
    // read_unaligned has no alignment requirement and every bit pattern is
    // a valid u64.
    unsafe { std::ptr::read_unaligned(p as *const u64) }
}

/// Writes a register through the public API, for the layout self-test.
/// Private to this module: its only callers are `locate` and `check`.
fn write_reg(uc: *mut uc_engine, reg: RegisterX86, value: u64) -> Result<(), SelfTestError> {
    // SAFETY: `uc` is the open engine that `locate`'s caller guarantees
    // (`locate` is an unsafe fn requiring it, and `check` is called only by
    // `locate` with that handle). `value` is a live
    // u64, and 64-bit mode's reg_write reads at most 8 bytes for every
    // register written here (GPRs, RIP, RFLAGS, DR0-DR3, CR2, GS_BASE: 8;
    // CS: 2).
    let err = unsafe { uc_reg_write(uc, reg as i32, &value as *const u64 as *const c_void) };
    if err != unicorn_engine::unicorn_const::uc_error::OK {
        return Err(SelfTestError(format!("writing {reg:?} failed: {err:?}")));
    }
    Ok(())
}

impl EnvLayout {
    /// Finds `CPUX86State` of a freshly opened 64-bit x86 engine and checks
    /// the layout. Clobbers general and debug registers (the caller sets up
    /// the CPU afterwards).
    ///
    /// # Safety
    ///
    /// `uc` must be an open 64-bit x86 unicorn engine of the pinned version,
    /// not closed while the returned layout is used.
    pub unsafe fn locate(uc: *mut uc_engine) -> Result<EnvLayout, SelfTestError> {
        // Unicorn initialises the engine lazily, on the first API call; the
        // register writes below are that call. CPUX86State is embedded in
        // X86CPU after CPUState; it is found by these distinctive values.
        let magic = [
            0x6b72_725f_6d61_6701u64,
            0x6b72_725f_6d61_6702,
            0x6b72_725f_6d61_6703,
            0x6b72_725f_6d61_6704,
        ];
        for (reg, value) in [
            RegisterX86::RAX,
            RegisterX86::RCX,
            RegisterX86::RDX,
            RegisterX86::RBX,
        ]
        .into_iter()
        .zip(magic)
        {
            write_reg(uc, reg, value)?;
        }
        let base = uc as *const u8;
        // SAFETY: `uc` points at the engine's `struct uc_struct` (see
        // `write_reg`), which uc_open allocated with calloc (all bytes initialised). In 2.1.5
        // offsets 64 and 120 are the `uc` fields of its two AddressSpaces
        // and 440 is its `cpu` field, so each 8-byte read is inside it.
        let (as_mem_uc, as_io_uc, cpu) = unsafe {
            (
                read_u64(base.add(UC_AS_MEMORY_UC_OFFSET)),
                read_u64(base.add(UC_AS_IO_UC_OFFSET)),
                read_u64(base.add(UC_CPU_OFFSET)),
            )
        };
        if as_mem_uc != uc as u64 || as_io_uc != uc as u64 {
            return Err(SelfTestError(
                "uc_struct.address_space_*.uc does not point back at the engine".into(),
            ));
        }
        if cpu == 0 || cpu % 8 != 0 {
            return Err(SelfTestError(format!("uc_struct.cpu is {cpu:#x}")));
        }
        let cpu = cpu as *mut u8;
        // SAFETY: `cpu` is uc_struct.cpu, which cpu_x86_init allocated with
        // qemu_memalign (posix_memalign in unicorn's build), a pointer
        // malloc_usable_size accepts.
        let cpu_size = unsafe { libc::malloc_usable_size(cpu as *mut c_void) };
        let mut env = None;
        for off in (0..cpu_size.saturating_sub(32)).step_by(8) {
            // SAFETY: `cpu` is the X86CPU that cpu_x86_init allocated and
            // zeroed (qemu_memalign + memset of sizeof(X86CPU)); every read
            // here ends inside the allocation (off + 32 <= its usable size).
            // X86CPU holds CPUState followed by CPUX86State, whose regs[0..4]
            // the writes above set to `magic`, and the scan stops at the
            // first match. (unverified) Only a build whose layout differs
            // would scan past sizeof(X86CPU) into the allocator's few bytes
            // of slack, which memset did not initialise.
            let hit = unsafe { (0..4).all(|i| read_u64(cpu.add(off + i * 8)) == magic[i]) };
            if hit {
                env = Some(off);
                break;
            }
        }
        let env_offset =
            env.ok_or_else(|| SelfTestError("CPUX86State not found after CPUState".into()))?;
        // SAFETY: `env_offset` + 32 <= `cpu_size`, inside the allocation.
        let env = unsafe { cpu.add(env_offset) };
        let env_size = cpu_size - env_offset;
        // Debug registers follow error_code, exception_is_int and
        // exception_next_eip directly; find them the same way.
        let dr_magic = [
            0x6b72_725f_6472_0000u64,
            0x6b72_725f_6472_0001,
            0x6b72_725f_6472_0002,
            0x6b72_725f_6472_0003,
        ];
        for (reg, value) in [
            RegisterX86::DR0,
            RegisterX86::DR1,
            RegisterX86::DR2,
            RegisterX86::DR3,
        ]
        .into_iter()
        .zip(dr_magic)
        {
            write_reg(uc, reg, value)?;
        }
        let mut dr = None;
        for off in (ENV_CR..env_size.saturating_sub(32)).step_by(8) {
            // SAFETY: `env` is the CPUX86State found above, inside the zeroed
            // X86CPU, and every read ends inside the allocation
            // (off + 32 <= env_size). The writes above put `dr_magic` in its
            // dr[0..4], which in 2.1.5 come after cr[] (ENV_CR); the scan
            // stops at the first match (see the scan above for a build
            // whose layout differs).
            let hit = unsafe { (0..4).all(|i| read_u64(env.add(off + i * 8)) == dr_magic[i]) };
            if hit {
                dr = Some(off);
                break;
            }
        }
        let dr = dr.ok_or_else(|| SelfTestError("CPUX86State.dr[] not found".into()))?;
        for reg in [
            RegisterX86::DR0,
            RegisterX86::DR1,
            RegisterX86::DR2,
            RegisterX86::DR3,
        ] {
            write_reg(uc, reg, 0)?;
        }
        let layout = EnvLayout {
            env,
            error_code: dr - 16,
            exception_is_int: dr - 12,
            // dr[8] (64 bytes) and the four breakpoint pointers (32 bytes).
            old_exception: dr + 96,
        };
        layout.check(uc)?;
        Ok(layout)
    }

    /// Checks the fixed offsets against values written through the API.
    fn check(&self, uc: *mut uc_engine) -> Result<(), SelfTestError> {
        write_reg(uc, RegisterX86::RIP, 0x1234_5678)?;
        if self.eip() != 0x1234_5678 {
            return Err(SelfTestError("CPUX86State.eip offset".into()));
        }
        write_reg(uc, RegisterX86::RSP, 0x7777_0000)?;
        if self.reg(Gpr::Rsp) != 0x7777_0000 {
            return Err(SelfTestError("CPUX86State.regs offset".into()));
        }
        write_reg(uc, RegisterX86::CS, 0x33)?;
        write_reg(uc, RegisterX86::GS_BASE, 0xabcd_0000)?;
        if self.segment(Seg::Cs).selector != 0x33 || self.segment(Seg::Gs).base != 0xabcd_0000 {
            return Err(SelfTestError("CPUX86State.segs offset".into()));
        }
        write_reg(uc, RegisterX86::CS, 0)?;
        write_reg(uc, RegisterX86::GS_BASE, 0)?;
        write_reg(uc, RegisterX86::CR2, 0x5151_0000)?;
        // SAFETY: `self.env` is CPUX86State (`locate`); the dr[] block found
        // there starts at or after ENV_CR and is 32 bytes long, so the 8
        // bytes of cr[2] at ENV_CR + 16 lie inside it.
        if unsafe { read_u64(self.env.add(ENV_CR + 16)) } != 0x5151_0000 {
            return Err(SelfTestError("CPUX86State.cr offset".into()));
        }
        write_reg(uc, RegisterX86::CR2, 0)?;
        let efer = {
            let mut m = unicorn_engine::unicorn_const::uc_x86_msr {
                rid: 0xc000_0080,
                value: 0,
            };
            // SAFETY: `uc` is the open engine (see `write_reg`); `m` is a live
            // uc_x86_msr, the type unicorn reads `rid` from and writes
            // `value` to for UC_X86_REG_MSR. helper_rdmsr returns normally:
            // it only leaves by longjmp for an SVM intercept, and a fresh
            // engine is not in SVM guest mode.
            unsafe {
                unicorn_engine::unicorn_const::uc_reg_read(
                    uc,
                    RegisterX86::MSR as i32,
                    &mut m as *mut _ as *mut c_void,
                )
            };
            m.value
        };
        if efer == 0 || self.efer() != efer {
            return Err(SelfTestError(format!(
                "CPUX86State.efer offset (API {efer:#x}, state {:#x})",
                self.efer()
            )));
        }
        write_reg(uc, RegisterX86::RFLAGS, 0x202)?;
        let with_if = self.eflags();
        write_reg(uc, RegisterX86::RFLAGS, 0x2)?;
        if with_if & 0x200 == 0 || self.eflags() & 0x200 != 0 {
            return Err(SelfTestError("CPUX86State.eflags offset".into()));
        }
        // A fresh 64-bit engine runs in long mode with a 64-bit CS.
        let hflags = self.hflags();
        if hflags & (HF_LMA_MASK | HF_CS64_MASK) != (HF_LMA_MASK | HF_CS64_MASK) {
            return Err(SelfTestError(format!(
                "CPUX86State.hflags offset ({hflags:#x})"
            )));
        }
        // old_exception is -1 on a fresh CPU; exception_is_int is 0.
        if self.old_exception() != -1 || self.exception_is_int() {
            return Err(SelfTestError(
                "CPUX86State.old_exception/exception_is_int relative to dr[]".into(),
            ));
        }
        Ok(())
    }

    /// A pointer to the field at `off` of CPUX86State. Every `off` passed
    /// must name a field inside CPUX86State; that is not checked here.
    fn field<T>(&self, off: usize) -> *mut T {
        // SAFETY: `env + off` stays inside CPUX86State because every `off`
        // passed does: the fixed offsets (ENV_*) are 2.1.5's and checked by
        // `check`; error_code/exception_is_int/old_exception were located
        // next to dr[]; regs[] and segs[] are indexed by `Gpr` (< 16) and
        // `Seg` (< 6), whose values are in bounds by construction.
        unsafe { self.env.add(off) as *mut T }
    }

    pub fn reg(&self, reg: Gpr) -> u64 {
        // SAFETY: regs[reg] (a `Gpr` is < 16) is a u64 inside the live,
        // initialised CPUX86State (the invariant on `EnvLayout`);
        // read_unaligned needs no alignment.
        unsafe {
            self.field::<u64>(ENV_REGS + reg as usize * 8)
                .read_unaligned()
        }
    }
    pub fn set_reg(&self, reg: Gpr, value: u64) {
        // SAFETY: regs[reg] (a `Gpr` is < 16) is a u64 inside the live
        // CPUX86State, which unicorn is not using while this runs (the
        // invariant on `EnvLayout`).
        unsafe {
            self.field::<u64>(ENV_REGS + reg as usize * 8)
                .write_unaligned(value)
        }
    }
    pub fn eip(&self) -> u64 {
        // SAFETY: `eip` (ENV_EIP, checked by `check`) is a u64 inside the
        // live, initialised CPUX86State (the invariant on `EnvLayout`).
        unsafe { self.field::<u64>(ENV_EIP).read_unaligned() }
    }
    /// Sets RIP without the public API's side effect (a forced exit from
    /// the translation loop), for use inside hooks.
    pub fn set_eip(&self, value: u64) {
        // SAFETY: `eip` (ENV_EIP, checked by `check`) is a u64 inside the
        // live CPUX86State, not in use by unicorn while this runs.
        unsafe { self.field::<u64>(ENV_EIP).write_unaligned(value) }
    }
    /// The system part of RFLAGS (IF, TF, ...), readable inside hooks
    /// without recomputing the arithmetic flags.
    pub fn eflags(&self) -> u64 {
        // SAFETY: `eflags` (ENV_EFLAGS, checked by `check`) is a u64 inside
        // the live, initialised CPUX86State.
        unsafe { self.field::<u64>(ENV_EFLAGS).read_unaligned() }
    }
    pub fn hflags(&self) -> u32 {
        // SAFETY: `hflags` (ENV_HFLAGS, checked by `check`) is a u32 inside
        // the live, initialised CPUX86State.
        unsafe { self.field::<u32>(ENV_HFLAGS).read_unaligned() }
    }
    pub fn set_hflags(&self, value: u32) {
        // SAFETY: `hflags` (ENV_HFLAGS, checked by `check`) is a u32 inside
        // the live CPUX86State, not in use by unicorn while this runs.
        unsafe { self.field::<u32>(ENV_HFLAGS).write_unaligned(value) }
    }
    pub fn efer(&self) -> u64 {
        // SAFETY: `efer` (ENV_EFER, checked by `check`) is a u64 inside the
        // live, initialised CPUX86State.
        unsafe { self.field::<u64>(ENV_EFER).read_unaligned() }
    }
    pub fn cr0(&self) -> u64 {
        // SAFETY: cr[0] (ENV_CR, cr[2] checked by `check`) is a u64 inside
        // the live, initialised CPUX86State.
        unsafe { self.field::<u64>(ENV_CR).read_unaligned() }
    }
    /// Sets EFER with its derived long-mode flag. WRMSR cannot clear LMA
    /// (the processor owns it), but loading a saved or reset state must.
    pub fn set_efer(&self, value: u64) {
        // SAFETY: `efer` (ENV_EFER, checked by `check`) is a u64 inside the
        // live CPUX86State, not in use by unicorn while this runs.
        unsafe { self.field::<u64>(ENV_EFER).write_unaligned(value) };
        let mut hflags = self.hflags() & !HF_LMA_MASK;
        if value & (1 << 10) != 0 {
            hflags |= HF_LMA_MASK;
        } else {
            hflags &= !HF_CS64_MASK;
        }
        self.set_hflags(hflags);
    }
    pub fn cpl(&self) -> u8 {
        (self.hflags() & HF_CPL_MASK) as u8
    }
    pub fn interrupt_shadow(&self) -> bool {
        self.hflags() & HF_INHIBIT_IRQ_MASK != 0
    }
    pub fn clear_interrupt_shadow(&self) {
        self.set_hflags(self.hflags() & !HF_INHIBIT_IRQ_MASK);
    }
    pub fn error_code(&self) -> u32 {
        // SAFETY: `error_code` (the int 16 bytes before dr[], located by
        // `locate`) is 4 bytes inside the live, initialised CPUX86State.
        unsafe { self.field::<u32>(self.error_code).read_unaligned() }
    }
    pub fn exception_is_int(&self) -> bool {
        // SAFETY: `exception_is_int` (the int 12 bytes before dr[], located
        // by `locate`) is 4 bytes inside the live, initialised CPUX86State.
        unsafe { self.field::<i32>(self.exception_is_int).read_unaligned() != 0 }
    }
    pub fn old_exception(&self) -> i32 {
        // SAFETY: `old_exception` (the int after dr[8] and the four
        // breakpoint pointers, located by `locate`) is 4 bytes inside the
        // live, initialised CPUX86State.
        unsafe { self.field::<i32>(self.old_exception).read_unaligned() }
    }
    /// Marks the pending exception as delivered, as QEMU's own delivery
    /// does; otherwise the next fault is promoted to a double fault.
    pub fn reset_old_exception(&self) {
        // SAFETY: `old_exception` is 4 bytes inside the live CPUX86State
        // (see `old_exception`), not in use by unicorn while this runs.
        unsafe { self.field::<i32>(self.old_exception).write_unaligned(-1) }
    }

    pub fn segment(&self, seg: Seg) -> SegmentCache {
        let p = ENV_SEGS + seg as usize * SEGMENT_CACHE_SIZE;
        // SAFETY: segs[seg] (a `Seg` is < 6) is a 24-byte QEMU
        // SegmentCache {u32 selector; u64 base; u32 limit; u32 flags} at
        // ENV_SEGS (checked by `check`), inside the live, initialised
        // CPUX86State; read_unaligned needs no alignment.
        unsafe {
            SegmentCache {
                selector: self.field::<u32>(p).read_unaligned() as u16,
                base: self.field::<u64>(p + 8).read_unaligned(),
                limit: self.field::<u32>(p + 16).read_unaligned(),
                flags: self.field::<u32>(p + 20).read_unaligned(),
            }
        }
    }

    /// Loads a segment register with its hidden cache and updates the
    /// derived hflags the way QEMU's `cpu_x86_load_seg_cache` does for long
    /// mode (CS: 64-bit code flags; SS: the CPL).
    pub fn load_segment(&self, seg: Seg, cache: SegmentCache) {
        let p = ENV_SEGS + seg as usize * SEGMENT_CACHE_SIZE;
        // SAFETY: segs[seg] (a `Seg` is < 6) is a 24-byte QEMU
        // SegmentCache inside the live CPUX86State (see `segment` for the
        // field offsets), not in use by unicorn while this runs.
        unsafe {
            self.field::<u32>(p).write_unaligned(cache.selector as u32);
            self.field::<u64>(p + 8).write_unaligned(cache.base);
            self.field::<u32>(p + 16).write_unaligned(cache.limit);
            self.field::<u32>(p + 20).write_unaligned(cache.flags);
        }
        let mut hflags = self.hflags();
        if seg == Seg::Cs {
            if hflags & HF_LMA_MASK != 0 && cache.flags & DESC_L_MASK != 0 {
                hflags |= HF_CS32_MASK | HF_SS32_MASK | HF_CS64_MASK;
                hflags &= !HF_ADDSEG_MASK;
            } else {
                let cs32 = if cache.flags & DESC_B_MASK != 0 {
                    HF_CS32_MASK
                } else {
                    0
                };
                hflags = (hflags & !(HF_CS32_MASK | HF_CS64_MASK)) | cs32;
            }
        }
        if seg == Seg::Ss {
            let cpl = (cache.flags >> DESC_DPL_SHIFT) & 3;
            hflags = (hflags & !HF_CPL_MASK) | cpl;
        }
        if hflags & HF_CS64_MASK == 0 {
            let ss32 = if self.segment(Seg::Ss).flags & DESC_B_MASK != 0 {
                HF_SS32_MASK
            } else {
                0
            };
            hflags = (hflags & !HF_SS32_MASK) | ss32;
            // Real mode and 16-bit code add segment bases explicitly;
            // 32-bit protected mode only when a data/stack base is nonzero.
            let addseg = self.cr0() & 1 == 0
                || hflags & HF_CS32_MASK == 0
                || (self.segment(Seg::Ds).base
                    | self.segment(Seg::Es).base
                    | self.segment(Seg::Ss).base)
                    != 0;
            if addseg {
                hflags |= HF_ADDSEG_MASK;
            } else {
                hflags &= !HF_ADDSEG_MASK;
            }
        }
        self.set_hflags(hflags);
    }
}

extern "C" {
    /// QEMU's `tb_invalidate_phys_range` (RAM offsets, end exclusive).
    fn tb_invalidate_phys_range_x86_64(uc: *mut uc_engine, start: u64, end: u64);
}

/// The engine's `CPUState`, which QEMU's `cpu_loop_exit_noexc` takes: the
/// port hooks (port_hooks.c) leave the translated block being executed
/// through it and return to unicorn's CPU loop, which then honours a
/// pending `uc_emu_stop`. Unicorn itself only checks for a stop request
/// at the next block (or right after an MMIO access that asked for it:
/// the project's patch), so without this the instructions after an IN/OUT
/// would run before the stop. Unicorn has
/// synced RIP to the start of the I/O instruction before calling the hook,
/// so the CPU stops there, with that instruction not retired.
///
/// # Safety
/// `uc` must be an open engine.
pub unsafe fn cpu_state(uc: *mut uc_engine) -> *mut c_void {
    // SAFETY: `uc` is an open engine (caller); UC_CPU_OFFSET is its
    // uc_struct's `cpu` field, 8 initialised bytes inside the struct.
    unsafe { read_u64((uc as *const u8).add(UC_CPU_OFFSET)) as *mut c_void }
}

/// Drops translated code of guest-physical `[start, end)`.
///
/// # Safety
/// `uc` must be a live engine that is not emulating, with guest RAM mapped
/// as a single block at GPA 0 (so RAM offsets equal guest-physical
/// addresses).
pub unsafe fn invalidate_physical(uc: *mut uc_engine, start: u64, end: u64) {
    // SAFETY: the caller guarantees a live engine that is not emulating
    // (no translated code of the range is running) and RAM offsets equal to
    // guest-physical addresses, so `[start, end)` is the ram_addr_t range
    // tb_invalidate_phys_range(uc, start, end) expects; pages in it that
    // hold no code are skipped.
    unsafe { tb_invalidate_phys_range_x86_64(uc, start, end) }
}

extern "C" {
    /// QEMU/unicorn's `memory_map_io`, the implementation behind the
    /// `uc_struct.memory_map_io` hook that `uc_mmio_map` calls.
    fn memory_map_io_x86_64(
        uc: *mut uc_engine,
        begin: u64,
        size: usize,
        read_cb: *mut c_void,
        write_cb: *mut c_void,
        user_data_read: *mut c_void,
        user_data_write: *mut c_void,
    ) -> *mut u8;
}

thread_local! {
    /// The MemoryRegion created by the `uc_mmio_map` in progress on this
    /// thread.
    static MAPPED_IO_REGION: std::cell::Cell<*mut u8> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

extern "C" fn memory_map_io_capturing(
    uc: *mut uc_engine,
    begin: u64,
    size: usize,
    read_cb: *mut c_void,
    write_cb: *mut c_void,
    user_data_read: *mut c_void,
    user_data_write: *mut c_void,
) -> *mut u8 {
    // SAFETY: unicorn calls this through uc_struct.memory_map_io (installed
    // only for one uc_mmio_map call by `mmio_map_with_8_byte_accesses`),
    // with the arguments of uc_memory_map_io_t; they are passed on unchanged
    // to the function that slot held, memory_map_io_x86_64, which has the
    // same C signature.
    let mr = unsafe {
        memory_map_io_x86_64(
            uc,
            begin,
            size,
            read_cb,
            write_cb,
            user_data_read,
            user_data_write,
        )
    };
    MAPPED_IO_REGION.with(|c| c.set(mr));
    mr
}

// Layout of the pieces touched below (unicorn 2.1.5, x86-64 host):
// MemoryRegion.ops at 16 and .opaque at 24; the opaque of an MMIO region is
// unicorn's `mmio_cbs` {read, user_data_read, write, user_data_write,
// MemoryRegionOps ops} with ops at 32; in MemoryRegionOps, after four
// function pointers: endianness (32), valid {min, max, unaligned, accepts}
// (40..64), impl {min_access_size (64), max_access_size (68), unaligned}.
const MR_OPS: usize = 16;
const MR_OPAQUE: usize = 24;
const CBS_OPS: usize = 32;
const OPS_TAIL: std::ops::Range<usize> = 32..80;
const OPS_IMPL_MAX_ACCESS_SIZE: usize = 68;

/// `uc_mmio_map`, but 8-byte accesses reach the callbacks as one access.
///
/// Unicorn leaves `impl.max_access_size` of its MMIO regions at 0, which
/// QEMU reads as 4: a 64-bit MMIO load or store becomes two 4-byte
/// callbacks, which a device model cannot tell from two instructions. The
/// region is created through `uc_mmio_map` as usual, with the engine's
/// `memory_map_io` hook wrapped for that call to learn the new
/// MemoryRegion; its ops (zeroed by unicorn, then checked here field by
/// field against the callbacks and user data just passed) get
/// `impl.max_access_size = 8`.
///
/// # Safety
/// `uc` must be a live engine that is not emulating; the callbacks and
/// user data must stay valid for the engine's life.
pub unsafe fn mmio_map_with_8_byte_accesses(
    uc: *mut uc_engine,
    read_cb: *const c_void,
    write_cb: *const c_void,
    user_data: *const c_void,
    uc_mmio_map: impl FnOnce() -> unicorn_engine::unicorn_const::uc_error,
) -> Result<(), String> {
    let engine = uc as *mut u8;
    let original = memory_map_io_x86_64 as *const () as u64;
    // The hook sits among uc_struct's function pointers, before `cpu`.
    let slots: Vec<usize> = (0..UC_CPU_OFFSET)
        .step_by(8)
        // SAFETY: `uc` is a live engine (caller); its uc_struct is calloc'd
        // (initialised) and extends past UC_CPU_OFFSET, so each 8-byte read
        // below that offset is inside it.
        .filter(|&off| unsafe { read_u64(engine.add(off)) } == original)
        .collect();
    let [slot] = slots[..] else {
        return Err(format!(
            "uc_struct.memory_map_io not found (candidates at {slots:?}); this engine supports unicorn-engine =2.1.5 only"
        ));
    };
    // SAFETY: `slot` < UC_CPU_OFFSET, inside uc_struct (above).
    let hook = unsafe { engine.add(slot) } as *mut u64;
    MAPPED_IO_REGION.with(|c| c.set(std::ptr::null_mut()));
    // SAFETY: `hook` is the one function-pointer slot of uc_struct that
    // holds memory_map_io_x86_64, i.e. `memory_map_io`; the engine is not
    // emulating (caller), so nothing calls through the slot concurrently,
    // and the replacement has the same C signature (uc_memory_map_io_t)
    // and forwards to the original.
    unsafe { hook.write_unaligned(memory_map_io_capturing as *const () as u64) };
    let err = uc_mmio_map();
    // SAFETY: as above; this puts the original function back.
    unsafe { hook.write_unaligned(original) };
    if err != unicorn_engine::unicorn_const::uc_error::OK {
        return Err(format!("uc_mmio_map failed: {err:?}"));
    }
    let mr = MAPPED_IO_REGION.with(|c| c.replace(std::ptr::null_mut()));
    if mr.is_null() {
        return Err("uc_mmio_map did not go through uc_struct.memory_map_io".into());
    }
    // SAFETY: `mr` is the MemoryRegion memory_map_io just returned (a
    // live g_new allocation owned by the engine); in 2.1.5's MemoryRegion
    // (exec/memory.h) `ops` is the pointer at 16 and `opaque` the one at
    // 24, both set by memory_region_init_io.
    let (opaque, ops) = unsafe {
        (
            read_u64(mr.add(MR_OPAQUE)) as *mut u8,
            read_u64(mr.add(MR_OPS)) as *mut u8,
        )
    };
    // SAFETY: in 2.1.5 memory_map_io allocates `opaque` as an mmio_cbs
    // (read, user_data_read, write, user_data_write at 0..32, then the
    // 80-byte MemoryRegionOps at 32, memset to 0 before its pointers are
    // set), so `opaque + CBS_OPS` and every read below are inside that
    // allocation and initialised. `&&` stops at the first mismatch.
    let layout_ok = unsafe {
        !opaque.is_null()
            && ops == opaque.add(CBS_OPS)
            && read_u64(opaque) == read_cb as u64
            && read_u64(opaque.add(8)) == user_data as u64
            && read_u64(opaque.add(16)) == write_cb as u64
            && read_u64(opaque.add(24)) == user_data as u64
            && OPS_TAIL.clone().all(|i| *ops.add(i) == 0)
    };
    if !layout_ok {
        return Err(
            "the new MMIO region's MemoryRegion/mmio_cbs layout is not unicorn 2.1.5's".into(),
        );
    }
    // SAFETY: `ops` is the region's MemoryRegionOps inside its mmio_cbs
    // (layout checked just above); impl.max_access_size is the u32 at 68.
    // The engine is not emulating (caller), so nothing reads it meanwhile.
    unsafe { (ops.add(OPS_IMPL_MAX_ACCESS_SIZE) as *mut u32).write_unaligned(8) };
    Ok(())
}
