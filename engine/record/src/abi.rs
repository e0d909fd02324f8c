// SPDX-License-Identifier: GPL-2.0-or-later
//! The guest-agent ABI: the shared-memory ring between the `-krr` guest kernel's
//! agent (`images/kernel/krr-agent/0001-krr-agent.patch`, `kernel/krr_agent.c`)
//! and the engine's recorder.
//!
//! This module is the single definition of the ABI. The agent's C header
//! (`include/linux/krr_agent_abi.h` inside the patch) is generated from it by
//! [`c_header`]; `engine/tests/agent_abi.rs` compiles that header with gcc and
//! compares every `sizeof`/`offsetof` with Rust's, and checks that the copy
//! embedded in the patch equals [`c_header`] byte for byte.
//!
//! # Finding the ring
//! The engine reserves a guest-physical region that is *not* System RAM (a
//! reserved e820 entry, or `memmap=SIZE$PHYS` on the command line) and announces
//! it with `krr.ring=SIZE@PHYS` (sizes take the kernel's `memparse` suffixes;
//! `SIZE` is a multiple of 4 KiB). Before boot the engine writes a
//! [`RingHeader`] at `PHYS` ([`RingHeader::new`]); the data area follows at
//! `PHYS + header_size`. At `early_initcall` time the agent `memremap`s the
//! region, checks magic, ABI version and sizes, then sets `agent_state` to
//! [`AGENT_STATE_READY`] and rings the doorbell with [`DOORBELL_AGENT_READY`].
//! A kernel without `krr.ring=` (unpatched engine, QEMU) prints one line and the
//! agent stays off. An engine that finds `agent_state == 0` after boot knows the
//! guest has no agent ("agent not found").
//!
//! # Starting and stopping
//! Recording is on while bit [`CONTROL_RECORD`] of `control` is set. Only the
//! engine writes `control`, with all vCPUs paused (so the snapshot it takes at
//! that moment and the first event agree); the agent reads it on every hook, so
//! recording can start and stop any number of times in one VM run without any
//! guest-side action. A guest can ask for a start/stop by writing `start` or
//! `stop` to `/proc/krr_agent`, which rings the doorbell with
//! [`DOORBELL_GUEST_START`]/[`DOORBELL_GUEST_STOP`]; the engine decides.
//!
//! # The ring
//! One ring for all vCPUs; producers are serialised by a spinlock in the agent
//! (interrupts off), so `seq` is one global order of agent events. `head` and
//! `tail` are byte counters that only grow; the byte at counter `c` lives at
//! data offset `c % data_size` (`data_size` is a power of two). Records are
//! 8-byte aligned, start with an [`EventHeader`], and never wrap: when a record
//! does not fit before the end of the data area the agent writes a
//! [`EVENT_PAD`] record (whose header may be only 8 bytes: `type`, `cpu`,
//! `size`) up to the end. The agent publishes `head` after the record bytes
//! (release); the engine reads `head` (acquire), consumes records up to it and
//! then advances `tail`.
//!
//! Fast path: no VM exit per event. The agent executes `outl(reason,
//! doorbell_port)` ([`DOORBELL_PORT`]) only when the used space crosses
//! `high_water` ([`DOORBELL_HIGH_WATER`]) or a record does not fit
//! ([`DOORBELL_FULL`]); the engine drains the ring synchronously inside that
//! exit. If it still does not fit afterwards the event is dropped and counted
//! (`dropped_events`, `dropped_bytes`), and the next record that fits is
//! preceded by an [`EVENT_LOST`] record: a recording with losses is not
//! replayable, and says so.
//!
//! # Rules for the engine (determinism of the agent itself)
//! The agent's own code runs in the recorded kernel, and its reads of
//! engine-written fields (`control`, `tail`) steer its branches (record or not,
//! doorbell or not). So the engine writes them only at points replay can
//! reproduce: `control` with every vCPU stopped (and, to be exact about the
//! first/last record, with no vCPU inside `krr_emit`/`krr_write_locked`, which
//! it can tell from System.map), `tail` only inside a doorbell exit or with
//! every vCPU stopped, never asynchronously while vCPUs run.
//!
//! # What the agent records, and what not (yet)
//! Hooked:
//! - syscall entry (`do_syscall_64`, before anything else runs): the full user
//!   `pt_regs`, FS base, user GS base (`MSR_KERNEL_GS_BASE` while in the kernel),
//!   the kernel's GS base and CR3 ([`SyscallEvent`]); skipped while
//!   [`CONTROL_ENGINE_SYSCALLS`] is set (the software CPU's engine records the
//!   entry itself, cheaper and with its exact position).
//! - every `copy_from_user` flavour that goes through
//!   `instrument_copy_from_user_after()`: `_copy_from_user`, `__copy_from_user`,
//!   `__copy_from_user_inatomic`, iov_iter `copyin` (write/writev/sendmsg data),
//!   `copy_from_user_page` (access_remote_vm), `copy_from_user_nmi` is skipped
//!   (NMI context): the bytes the kernel received, in chunks of at most
//!   [`MAX_DATA_PER_EVENT`] ([`UserCopyEvent`]).
//! - `strncpy_from_user` (result and bytes) and `strnlen_user` (result)
//!   ([`UserStringEvent`]); the word reads they make internally are not
//!   recorded twice. Both read a word at a time, so the word holding the NUL
//!   brings the bytes after it into the kernel's registers (the copy has
//!   them masked out): the record carries them, from the NUL to the end of
//!   that word, as loaded (ABI 3); strncpy appends them to the string's last
//!   chunk (one record per string).
//! - `get_user`/`__get_user` (value and error) and `unsafe_get_user` (value;
//!   a faulting `unsafe_get_user` jumps to its error label and is not recorded)
//!   ([`GetUserEvent`]); the futex word's old value read by the x86 futex
//!   atomics (`arch_futex_atomic_op_inuser`, `futex_atomic_cmpxchg_inatomic`)
//!   is recorded the same way, as a 4-byte [`EVENT_GET_USER`].
//! - `rdtsc()`, `rdtsc_ordered()` in the kernel proper (not the vDSO, not the
//!   decompressor) ([`RdtscEvent`]); skipped while [`CONTROL_ENGINE_RDTSC`] is
//!   set (the software CPU's engine logs every RDTSC itself). With every
//!   kernel TSC read replayed, the CRNG (seeded from TSC/jiffies and
//!   interrupt timing) is deterministic too.
//! - `get_random_bytes()` and `get_random_u8/16/32/64()` output
//!   ([`RandomEvent`]; for validation of replay and for KRR's "random" class),
//!   `rdrand_long()`/`rdseed_long()` results ([`RdrandEvent`]; the engine's
//!   CPUID hides RDRAND/RDSEED, so normally none).
//!
//! - user page-table entries the kernel reads where their accessed/dirty bits
//!   (set by the CPU while user code runs) steer it ([`EVENT_PTE_READ`]):
//!   unmapping (`zap_pte_range`), fork (`copy_present_pte`), page faults on
//!   an existing entry (`handle_pte_fault`) and mprotect
//!   (`change_pte_range`). Other readers (smaps, reclaim's
//!   `ptep_test_and_clear_young`, GUP's `follow_page_pte`) are not hooked.
//!
//! Defined here but not emitted by the agent yet:
//! - [`EVENT_EXEC_LOCK`]: a kernel-wide execution lock (one vCPU in the kernel
//!   at a time, as KRR does) is not implemented; recordings of SMP guests give a
//!   global order of agent events only, not of kernel shared-memory races.
//! - io_uring shared ring reads (`READ_ONCE` on kernel-mapped user pages), faulting
//!   `unsafe_get_user`, reads in NMI context.

use std::fmt;
use std::mem::{offset_of, size_of};

/// `magic` of a formatted ring: the bytes `"KRRRING\0"`.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"KRRRING\0");
/// ABI version; bumped on any incompatible change of this module.
pub const ABI_VERSION: u32 = 3;
/// Bytes from the start of the region to the data area (one page).
pub const RING_HEADER_SIZE: u32 = 4096;
/// The I/O port the agent writes a doorbell reason to (`outl`).
pub const DOORBELL_PORT: u16 = 0x5a0;
/// Alignment (and size granularity) of every record.
pub const EVENT_ALIGN: u32 = 8;
/// Largest data payload of one record; longer copies are split in chunks.
pub const MAX_DATA_PER_EVENT: u32 = 4096;
/// Smallest data area the agent accepts (room for many largest records).
pub const MIN_DATA_SIZE: u64 = 64 * 1024;

/// `control` bit: the agent records while set.
pub const CONTROL_RECORD: u32 = 1;
/// `control` bit: the engine records syscall entries itself (the software
/// CPU performs SYSCALL in the engine and sees the user registers, with an
/// exact position); the agent then emits no [`EVENT_SYSCALL`].
pub const CONTROL_ENGINE_SYSCALLS: u32 = 2;
/// `control` bit: the engine records every RDTSC/RDTSCP the guest executes
/// (the software CPU performs them in the engine, with exact positions); the
/// agent then emits no [`EVENT_RDTSC`] (the same value logged twice cost the
/// guest a ring record per read). Added in ABI 3 without a version change:
/// an agent that ignores it only logs the reads twice.
pub const CONTROL_ENGINE_RDTSC: u32 = 4;

/// `agent_state`: no agent has touched the ring (unpatched kernel, or not yet).
pub const AGENT_STATE_ABSENT: u32 = 0;
/// `agent_state`: the agent accepted the ring and its hooks are armed.
pub const AGENT_STATE_READY: u32 = 1;
/// `agent_state`: the agent found the ring but refused it (see the kernel log).
pub const AGENT_STATE_REFUSED: u32 = 2;

/// Doorbell reason: used space crossed `high_water`.
pub const DOORBELL_HIGH_WATER: u32 = 1;
/// Doorbell reason: a record does not fit; drain now or it is dropped.
pub const DOORBELL_FULL: u32 = 2;
/// Doorbell reason: the agent accepted the ring (`agent_state` is READY).
pub const DOORBELL_AGENT_READY: u32 = 3;
/// Doorbell reason: the agent refused the ring (`agent_state` is REFUSED).
pub const DOORBELL_AGENT_REFUSED: u32 = 4;
/// Doorbell reason: guest asks to start recording (`/proc/krr_agent`).
pub const DOORBELL_GUEST_START: u32 = 5;
/// Doorbell reason: guest asks to stop recording (`/proc/krr_agent`).
pub const DOORBELL_GUEST_STOP: u32 = 6;

/// Event type 0 is never valid (zeroed memory).
pub const EVENT_INVALID: u16 = 0;
/// Padding up to the end of the data area; only `type`, `cpu`, `size` valid.
pub const EVENT_PAD: u16 = 1;
/// [`SyscallEvent`].
pub const EVENT_SYSCALL: u16 = 2;
/// [`UserCopyEvent`] + data.
pub const EVENT_COPY_FROM_USER: u16 = 3;
/// [`UserStringEvent`] + data.
pub const EVENT_STRNCPY_FROM_USER: u16 = 4;
/// [`UserStringEvent`], no data.
pub const EVENT_STRNLEN_USER: u16 = 5;
/// [`GetUserEvent`].
pub const EVENT_GET_USER: u16 = 6;
/// [`RdtscEvent`].
pub const EVENT_RDTSC: u16 = 7;
/// [`RandomEvent`] + data.
pub const EVENT_RANDOM: u16 = 8;
/// [`RdrandEvent`].
pub const EVENT_RDRAND: u16 = 9;
/// [`PteReadEvent`].
pub const EVENT_PTE_READ: u16 = 10;
/// [`ExecLockEvent`] (not emitted yet).
pub const EVENT_EXEC_LOCK: u16 = 11;
/// [`LostEvent`]: events were dropped before this one.
pub const EVENT_LOST: u16 = 12;

/// Data-record flag: more chunks of the same copy follow.
pub const DATA_FLAG_MORE: u32 = 1;

/// [`RdtscEvent::insn`]: plain `rdtsc()`.
pub const TSC_RDTSC: u32 = 0;
/// [`RdtscEvent::insn`]: `rdtsc_ordered()` (lfence;rdtsc or rdtscp).
pub const TSC_RDTSC_ORDERED: u32 = 1;

/// [`RandomEvent::source`]: `get_random_bytes()`.
pub const RANDOM_GET_RANDOM_BYTES: u32 = 0;
/// [`RandomEvent::source`]: `get_random_u8()`.
pub const RANDOM_U8: u32 = 1;
/// [`RandomEvent::source`]: `get_random_u16()`.
pub const RANDOM_U16: u32 = 2;
/// [`RandomEvent::source`]: `get_random_u32()`.
pub const RANDOM_U32: u32 = 3;
/// [`RandomEvent::source`]: `get_random_u64()`.
pub const RANDOM_U64: u32 = 4;

/// [`RdrandEvent::insn`]: RDRAND.
pub const RDRAND_INSN_RDRAND: u32 = 0;
/// [`RdrandEvent::insn`]: RDSEED.
pub const RDRAND_INSN_RDSEED: u32 = 1;

/// C type of one ABI field, for the header generator and the layout test.
pub trait CType {
    /// The C type name (`uint64_t`, `struct krr_user_regs`).
    const C_NAME: &'static str;
    /// Element count for arrays, `None` for scalars.
    const ARRAY_LEN: Option<usize> = None;
}

macro_rules! scalar_ctype {
    ($($t:ty => $c:literal),* $(,)?) => {
        $(impl CType for $t { const C_NAME: &'static str = $c; })*
    };
}
scalar_ctype!(u8 => "uint8_t", u16 => "uint16_t", u32 => "uint32_t", u64 => "uint64_t",
              i32 => "int32_t", i64 => "int64_t");

impl<T: CType, const N: usize> CType for [T; N] {
    const C_NAME: &'static str = T::C_NAME;
    const ARRAY_LEN: Option<usize> = Some(N);
}

/// One field of an ABI struct as Rust lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLayout {
    pub name: &'static str,
    pub c_type: &'static str,
    pub array_len: Option<usize>,
    pub offset: usize,
    pub size: usize,
    pub doc: &'static str,
}

/// One ABI struct as Rust lays it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    /// C name without `struct` (`krr_ring_header`).
    pub c_name: &'static str,
    pub size: usize,
    pub align: usize,
    pub doc: &'static str,
    pub fields: Vec<FieldLayout>,
}

/// Declares a `#[repr(C)]` ABI struct and its [`StructLayout`] in one place,
/// so the C header and the layout test cannot disagree with the Rust type.
macro_rules! abi_struct {
    (
        $(#[doc = $sdoc:literal])*
        $name:ident => $cname:literal {
            $( $(#[doc = $fdoc:literal])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[doc = $sdoc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct $name {
            $( $(#[doc = $fdoc])* pub $field: $ty, )*
        }

        impl CType for $name {
            const C_NAME: &'static str = concat!("struct ", $cname);
        }

        impl $name {
            /// This struct's layout for the C header and the layout test.
            pub fn layout() -> StructLayout {
                StructLayout {
                    c_name: $cname,
                    size: size_of::<$name>(),
                    align: std::mem::align_of::<$name>(),
                    doc: concat!($($sdoc, "\n"),*),
                    fields: vec![$(FieldLayout {
                        name: stringify!($field),
                        c_type: <$ty as CType>::C_NAME,
                        array_len: <$ty as CType>::ARRAY_LEN,
                        offset: offset_of!($name, $field),
                        size: size_of::<$ty>(),
                        doc: concat!($($fdoc, " "),*),
                    }),*],
                }
            }

            /// Reads the struct from the start of `bytes` (little-endian guest).
            pub fn read_from(bytes: &[u8]) -> Option<Self> {
                if bytes.len() < size_of::<$name>() {
                    return None;
                }
                // SAFETY: the struct is repr(C) made only of integers and
                // arrays of integers (every bit pattern is valid), the source
                // holds at least size_of bytes, and read_unaligned allows any
                // alignment.
                Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<$name>()) })
            }

            /// The struct's bytes as the guest sees them.
            pub fn to_bytes(&self) -> Vec<u8> {
                let mut out = vec![0u8; size_of::<$name>()];
                // SAFETY: out holds exactly size_of bytes; the struct has no
                // implicit padding (checked by `layouts_have_no_padding`), so
                // every byte copied is initialised.
                unsafe {
                    std::ptr::write_unaligned(out.as_mut_ptr().cast::<$name>(), *self);
                }
                out
            }
        }
    };
}

abi_struct! {
    /// Ring header at the start of the reserved region. Cache-line groups:
    /// engine-written configuration, agent-written producer state,
    /// engine-written consumer state.
    RingHeader => "krr_ring_header" {
        /// RING_MAGIC (engine).
        magic: u64,
        /// ABI_VERSION the engine speaks (engine).
        abi_version: u32,
        /// Offset of the data area from the region start (engine).
        header_size: u32,
        /// Size of the whole region in bytes (engine).
        region_size: u64,
        /// Size of the data area, a power of two (engine).
        data_size: u64,
        /// Used bytes at which the agent rings DOORBELL_HIGH_WATER (engine).
        high_water: u64,
        /// CONTROL_* bits (engine, with all vCPUs paused).
        control: u32,
        /// I/O port for doorbells, DOORBELL_PORT (engine).
        doorbell_port: u32,
        /// AGENT_STATE_* (agent).
        agent_state: u32,
        /// ABI_VERSION the agent was built with (agent).
        agent_abi_version: u32,
        /// Possible CPUs of the guest (agent).
        agent_nr_cpus: u32,
        /// Reserved, zero.
        reserved0: u32,
        /// Producer byte counter; published after the record bytes (agent).
        head: u64,
        /// Sequence number the next record gets (agent).
        next_seq: u64,
        /// Events dropped because the ring was full (agent).
        dropped_events: u64,
        /// Bytes of dropped events (agent).
        dropped_bytes: u64,
        /// Doorbells rung (agent).
        doorbells: u64,
        /// Events written (agent).
        events_written: u64,
        /// Reserved, zero.
        reserved1: [u64; 2],
        /// Consumer byte counter (engine).
        tail: u64,
        /// Reserved, zero.
        reserved2: [u64; 15],
    }
}

abi_struct! {
    /// Common header of every record. A PAD record may be only 8 bytes
    /// (type, cpu, size) when that is all that is left before the end.
    EventHeader => "krr_event_header" {
        /// EVENT_*.
        event_type: u16,
        /// CPU (vCPU index) the event happened on.
        cpu: u16,
        /// Record size in bytes including this header, a multiple of EVENT_ALIGN.
        size: u32,
        /// Global sequence number (all CPUs).
        seq: u64,
    }
}

abi_struct! {
    /// User registers at syscall entry, in `struct pt_regs` order.
    UserRegs => "krr_user_regs" {
        r15: u64, r14: u64, r13: u64, r12: u64, bp: u64, bx: u64,
        r11: u64, r10: u64, r9: u64, r8: u64, ax: u64, cx: u64,
        dx: u64, si: u64, di: u64,
        /// Syscall number.
        orig_ax: u64,
        ip: u64, cs: u64, flags: u64, sp: u64, ss: u64,
    }
}

abi_struct! {
    /// EVENT_SYSCALL payload.
    SyscallEvent => "krr_syscall_event" {
        regs: UserRegs,
        /// User FS base.
        fs_base: u64,
        /// User GS base (MSR_KERNEL_GS_BASE while in the kernel).
        user_gs_base: u64,
        /// GS base the kernel runs with (MSR_GS_BASE, per-CPU area).
        kernel_gs_base: u64,
        cr3: u64,
    }
}

abi_struct! {
    /// EVENT_COPY_FROM_USER payload, followed by `data_len` bytes (padded to 8):
    /// the bytes at `offset..offset+data_len` of the copy.
    UserCopyEvent => "krr_user_copy_event" {
        /// User source address of the whole copy.
        user_addr: u64,
        /// Kernel destination address of the whole copy.
        kernel_addr: u64,
        /// Bytes requested by the whole copy.
        requested: u64,
        /// Bytes not copied (fault) by the whole copy.
        not_copied: u64,
        /// Offset of this chunk's data within the copy.
        offset: u64,
        /// Data bytes following this payload.
        data_len: u32,
        /// DATA_FLAG_*.
        flags: u32,
        /// CR3 of the address space read (the reader may not be the task
        /// that entered the kernel: replay writes the bytes there).
        cr3: u64,
    }
}

abi_struct! {
    /// EVENT_STRNCPY_FROM_USER / EVENT_STRNLEN_USER payload, followed by
    /// `data_len` bytes (padded to 8): for strncpy the copied string without
    /// its NUL; for either, the bytes from the NUL to the end of the word the
    /// NUL was read in. strncpy carries those after the string's last bytes
    /// in its last chunk (they are contiguous in user memory), or in a chunk
    /// of their own at the NUL's offset where that chunk would exceed
    /// [`MAX_DATA_PER_EVENT`]; strnlen_user logs only them.
    UserStringEvent => "krr_user_string_event" {
        user_addr: u64,
        /// Kernel destination (0 for strnlen_user).
        kernel_addr: u64,
        /// The count/limit argument.
        limit: i64,
        /// Return value (length, or negative errno).
        result: i64,
        /// Offset of this chunk's data within the string.
        offset: u64,
        data_len: u32,
        /// DATA_FLAG_*.
        flags: u32,
        /// CR3 of the address space read.
        cr3: u64,
    }
}

abi_struct! {
    /// EVENT_GET_USER payload.
    GetUserEvent => "krr_get_user_event" {
        user_addr: u64,
        /// Value read, zero-extended.
        value: u64,
        /// Access size in bytes (1, 2, 4, 8).
        size: u32,
        /// 0 or -EFAULT.
        err: i32,
        /// CR3 of the address space read.
        cr3: u64,
    }
}

abi_struct! {
    /// EVENT_RDTSC payload.
    RdtscEvent => "krr_rdtsc_event" {
        value: u64,
        /// TSC_*.
        insn: u32,
        reserved: u32,
    }
}

abi_struct! {
    /// EVENT_RANDOM payload, followed by `data_len` bytes (padded to 8).
    RandomEvent => "krr_random_event" {
        /// RANDOM_*.
        source: u32,
        data_len: u32,
    }
}

abi_struct! {
    /// EVENT_RDRAND payload.
    RdrandEvent => "krr_rdrand_event" {
        value: u64,
        /// RDRAND_INSN_*.
        insn: u32,
        /// 1 if the instruction reported success (CF=1).
        ok: u32,
    }
}

abi_struct! {
    /// EVENT_PTE_READ payload: a user page-table entry the kernel read.
    PteReadEvent => "krr_pte_read_event" {
        user_addr: u64,
        pte: u64,
        /// Page-table level (1 = PTE, 2 = PMD, ...).
        level: u32,
        reserved: u32,
        /// CR3 of the address space whose table was read.
        cr3: u64,
    }
}

abi_struct! {
    /// EVENT_EXEC_LOCK payload (not emitted by the agent yet).
    ExecLockEvent => "krr_exec_lock_event" {
        /// Acquisition number of the kernel-wide execution lock.
        acquisition: u64,
        /// Why the CPU entered the kernel.
        reason: u32,
        /// CPU that held the lock before.
        previous_cpu: u32,
    }
}

abi_struct! {
    /// EVENT_LOST payload: events dropped since the previous record.
    LostEvent => "krr_lost_event" {
        events: u64,
        bytes: u64,
    }
}

/// Every ABI struct, in header order.
pub fn layouts() -> Vec<StructLayout> {
    vec![
        RingHeader::layout(),
        EventHeader::layout(),
        UserRegs::layout(),
        SyscallEvent::layout(),
        UserCopyEvent::layout(),
        UserStringEvent::layout(),
        GetUserEvent::layout(),
        RdtscEvent::layout(),
        RandomEvent::layout(),
        RdrandEvent::layout(),
        PteReadEvent::layout(),
        ExecLockEvent::layout(),
        LostEvent::layout(),
    ]
}

/// Every ABI constant as (C name, value, C type suffix), in header order.
pub fn constants() -> Vec<(&'static str, u64, &'static str)> {
    let c = |name, value: u64, suffix| (name, value, suffix);
    vec![
        c("KRR_RING_MAGIC", RING_MAGIC, "ULL"),
        c("KRR_ABI_VERSION", ABI_VERSION.into(), "U"),
        c("KRR_RING_HEADER_SIZE", RING_HEADER_SIZE.into(), "U"),
        c("KRR_DOORBELL_PORT", DOORBELL_PORT.into(), "U"),
        c("KRR_EVENT_ALIGN", EVENT_ALIGN.into(), "U"),
        c("KRR_MAX_DATA_PER_EVENT", MAX_DATA_PER_EVENT.into(), "U"),
        c("KRR_MIN_DATA_SIZE", MIN_DATA_SIZE, "ULL"),
        c("KRR_CONTROL_RECORD", CONTROL_RECORD.into(), "U"),
        c(
            "KRR_CONTROL_ENGINE_SYSCALLS",
            CONTROL_ENGINE_SYSCALLS.into(),
            "U",
        ),
        c("KRR_CONTROL_ENGINE_RDTSC", CONTROL_ENGINE_RDTSC.into(), "U"),
        c("KRR_AGENT_STATE_ABSENT", AGENT_STATE_ABSENT.into(), "U"),
        c("KRR_AGENT_STATE_READY", AGENT_STATE_READY.into(), "U"),
        c("KRR_AGENT_STATE_REFUSED", AGENT_STATE_REFUSED.into(), "U"),
        c("KRR_DOORBELL_HIGH_WATER", DOORBELL_HIGH_WATER.into(), "U"),
        c("KRR_DOORBELL_FULL", DOORBELL_FULL.into(), "U"),
        c("KRR_DOORBELL_AGENT_READY", DOORBELL_AGENT_READY.into(), "U"),
        c(
            "KRR_DOORBELL_AGENT_REFUSED",
            DOORBELL_AGENT_REFUSED.into(),
            "U",
        ),
        c("KRR_DOORBELL_GUEST_START", DOORBELL_GUEST_START.into(), "U"),
        c("KRR_DOORBELL_GUEST_STOP", DOORBELL_GUEST_STOP.into(), "U"),
        c("KRR_EVENT_INVALID", EVENT_INVALID.into(), "U"),
        c("KRR_EVENT_PAD", EVENT_PAD.into(), "U"),
        c("KRR_EVENT_SYSCALL", EVENT_SYSCALL.into(), "U"),
        c("KRR_EVENT_COPY_FROM_USER", EVENT_COPY_FROM_USER.into(), "U"),
        c(
            "KRR_EVENT_STRNCPY_FROM_USER",
            EVENT_STRNCPY_FROM_USER.into(),
            "U",
        ),
        c("KRR_EVENT_STRNLEN_USER", EVENT_STRNLEN_USER.into(), "U"),
        c("KRR_EVENT_GET_USER", EVENT_GET_USER.into(), "U"),
        c("KRR_EVENT_RDTSC", EVENT_RDTSC.into(), "U"),
        c("KRR_EVENT_RANDOM", EVENT_RANDOM.into(), "U"),
        c("KRR_EVENT_RDRAND", EVENT_RDRAND.into(), "U"),
        c("KRR_EVENT_PTE_READ", EVENT_PTE_READ.into(), "U"),
        c("KRR_EVENT_EXEC_LOCK", EVENT_EXEC_LOCK.into(), "U"),
        c("KRR_EVENT_LOST", EVENT_LOST.into(), "U"),
        c("KRR_DATA_FLAG_MORE", DATA_FLAG_MORE.into(), "U"),
        c("KRR_TSC_RDTSC", TSC_RDTSC.into(), "U"),
        c("KRR_TSC_RDTSC_ORDERED", TSC_RDTSC_ORDERED.into(), "U"),
        c(
            "KRR_RANDOM_GET_RANDOM_BYTES",
            RANDOM_GET_RANDOM_BYTES.into(),
            "U",
        ),
        c("KRR_RANDOM_U8", RANDOM_U8.into(), "U"),
        c("KRR_RANDOM_U16", RANDOM_U16.into(), "U"),
        c("KRR_RANDOM_U32", RANDOM_U32.into(), "U"),
        c("KRR_RANDOM_U64", RANDOM_U64.into(), "U"),
        c("KRR_RDRAND_INSN_RDRAND", RDRAND_INSN_RDRAND.into(), "U"),
        c("KRR_RDRAND_INSN_RDSEED", RDRAND_INSN_RDSEED.into(), "U"),
    ]
}

/// Writes `text` as a C comment in kernel style: one line if it fits in 80
/// columns (a tab counts 8), else a block comment wrapped at 80 columns.
fn c_comment(out: &mut String, indent: &str, text: &str) {
    const WIDTH: usize = 80;
    let indent_cols = indent
        .chars()
        .map(|c| if c == '\t' { 8 } else { 1 })
        .sum::<usize>();
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return;
    }
    let one_line = words.join(" ");
    if indent_cols + one_line.len() + 6 <= WIDTH {
        out.push_str(&format!("{indent}/* {one_line} */\n"));
        return;
    }
    out.push_str(&format!("{indent}/*\n"));
    let mut line = String::new();
    for word in words {
        if !line.is_empty() && indent_cols + 3 + line.len() + 1 + word.len() > WIDTH {
            out.push_str(&format!("{indent} * {line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&format!("{indent} * {line}\n{indent} */\n"));
}

/// The agent's C header `krr_agent_abi.h`, generated from this module.
/// Usable in the kernel (`linux/types.h`) and in user space (`stdint.h`).
pub fn c_header() -> String {
    let mut out = String::new();
    out.push_str("/* SPDX-License-Identifier: GPL-2.0-or-later */\n");
    out.push_str("/*\n * KRR guest-agent ABI: the shared-memory ring between the agent and the\n");
    out.push_str(" * engine. GENERATED from engine/src/record/abi.rs (krr_engine::record::abi::\n");
    out.push_str(" * c_header()); do not edit, regenerate. engine/tests/agent_abi.rs checks\n");
    out.push_str(" * that this copy and every size and offset agree with the Rust ABI.\n */\n");
    out.push_str("#ifndef _KRR_AGENT_ABI_H\n#define _KRR_AGENT_ABI_H\n\n");
    out.push_str(
        "#ifdef __KERNEL__\n#include <linux/types.h>\n#else\n#include <stdint.h>\n#endif\n\n",
    );
    for (name, value, suffix) in constants() {
        out.push_str(&format!("#define {name} 0x{value:x}{suffix}\n"));
    }
    for layout in layouts() {
        out.push('\n');
        c_comment(&mut out, "", layout.doc);
        out.push_str(&format!("struct {} {{\n", layout.c_name));
        for field in &layout.fields {
            c_comment(&mut out, "\t", field.doc);
            match field.array_len {
                Some(n) => out.push_str(&format!("\t{} {}[{}];\n", field.c_type, field.name, n)),
                None => out.push_str(&format!("\t{} {};\n", field.c_type, field.name)),
            }
        }
        out.push_str("};\n");
    }
    out.push_str("\n#endif /* _KRR_AGENT_ABI_H */\n");
    out
}

/// What is wrong with a ring image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    #[error("ring region is {len} bytes, smaller than its {need}-byte header")]
    TooSmall { len: usize, need: usize },
    #[error(
        "ring magic is {found:#018x}, expected {RING_MAGIC:#018x} (\"KRRRING\\0\"); not a KRR ring"
    )]
    BadMagic { found: u64 },
    #[error("ring abi_version is {found}, this engine speaks {ABI_VERSION}")]
    BadVersion { found: u32 },
    #[error("ring field {field} is {value}: {expected}")]
    BadField {
        field: &'static str,
        value: u64,
        expected: String,
    },
    #[error("ring head {head} is behind tail {tail}")]
    HeadBehindTail { head: u64, tail: u64 },
    #[error("ring holds {used} bytes between tail and head, more than data_size {data_size}")]
    Overrun { used: u64, data_size: u64 },
    #[error("record at ring byte {at} (data offset {offset}): {problem}")]
    BadRecord {
        at: u64,
        offset: u64,
        problem: String,
    },
    #[error(
        "KRR agent not found: the guest kernel never accepted the ring (agent_state 0); \
         boot a -krr kernel (CONFIG_KRR_AGENT=y, images/kernel/krr-agent) with krr.ring=SIZE@PHYS"
    )]
    AgentAbsent,
    #[error(
        "the guest's KRR agent refused the ring (agent ABI version {agent_abi_version}, engine {ABI_VERSION}); \
         its reason is in the guest kernel log (\"krr_agent: ring at ... refused: ...\")"
    )]
    AgentRefused { agent_abi_version: u32 },
    #[error("ring agent_state is {0}, not one of AGENT_STATE_ABSENT/READY/REFUSED")]
    BadAgentState(u32),
}

/// Why the agent rang the doorbell (the value of its `outl` to DOORBELL_PORT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doorbell {
    /// Used space crossed `high_water`: drain.
    HighWater,
    /// A record did not fit: drain now, or it is dropped.
    Full,
    /// The agent accepted the ring.
    AgentReady,
    /// The agent refused the ring (see `agent_state` and the kernel log).
    AgentRefused,
    /// `start` written to /proc/krr_agent.
    GuestStart,
    /// `stop` written to /proc/krr_agent.
    GuestStop,
}

impl Doorbell {
    /// Decodes the value written to DOORBELL_PORT; `None` for unknown values.
    pub fn from_value(value: u32) -> Option<Doorbell> {
        Some(match value {
            DOORBELL_HIGH_WATER => Doorbell::HighWater,
            DOORBELL_FULL => Doorbell::Full,
            DOORBELL_AGENT_READY => Doorbell::AgentReady,
            DOORBELL_AGENT_REFUSED => Doorbell::AgentRefused,
            DOORBELL_GUEST_START => Doorbell::GuestStart,
            DOORBELL_GUEST_STOP => Doorbell::GuestStop,
            _ => return None,
        })
    }

    /// Whether the engine should drain the ring before resuming the vCPU.
    pub fn wants_drain(self) -> bool {
        matches!(self, Doorbell::HighWater | Doorbell::Full)
    }
}

/// Byte offset of `control` in the region (the engine flips it to start/stop).
pub const CONTROL_OFFSET: usize = offset_of!(RingHeader, control);
/// Byte offset of `agent_state` (AGENT_STATE_*): how the engine tells whether
/// the guest kernel has an agent at all.
pub const AGENT_STATE_OFFSET: usize = offset_of!(RingHeader, agent_state);
/// Byte offset of `head` (agent-written, read with acquire).
pub const HEAD_OFFSET: usize = offset_of!(RingHeader, head);
/// Byte offset of `tail` (engine-written after consuming).
pub const TAIL_OFFSET: usize = offset_of!(RingHeader, tail);
/// Byte offset of `next_seq`: the engine stamps its kernel-entry events with
/// it, so replay knows which agent events belong to which entry.
pub const NEXT_SEQ_OFFSET: usize = offset_of!(RingHeader, next_seq);

/// Kernel command-line parameters announcing a ring of `size` bytes at
/// guest-physical `phys`: `memmap=SIZE$PHYS` keeps the kernel off it (not
/// needed when the engine's e820 map already leaves it out of RAM) and
/// `krr.ring=SIZE@PHYS` tells the agent where it is.
pub fn kernel_cmdline(phys: u64, size: u64, reserve_with_memmap: bool) -> String {
    let ring = format!("krr.ring={size:#x}@{phys:#x}");
    if reserve_with_memmap {
        format!("memmap={size:#x}${phys:#x} {ring}")
    } else {
        ring
    }
}

/// Parses the pending records of `region` (a copy of, or exclusive access to,
/// the ring region) and marks them consumed by writing `tail = head`, as the
/// engine does when it drains the ring on a doorbell.
pub fn drain(region: &mut [u8]) -> Result<RingContents, AbiError> {
    let contents = parse_ring(region)?;
    region[TAIL_OFFSET..TAIL_OFFSET + 8].copy_from_slice(&contents.header.head.to_le_bytes());
    Ok(contents)
}

/// Validated geometry of a ring region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    pub header_size: u64,
    pub data_size: u64,
}

impl RingHeader {
    /// A fresh header for a region of `region_size` bytes, as the engine
    /// writes it before boot: data area = the largest power of two that fits
    /// after the header page, high-water mark at three quarters of it.
    pub fn new(region_size: u64, control: u32) -> Result<RingHeader, AbiError> {
        let header = u64::from(RING_HEADER_SIZE);
        if region_size < header + MIN_DATA_SIZE || region_size & 0xfff != 0 {
            return Err(AbiError::BadField {
                field: "region_size",
                value: region_size,
                expected: format!(
                    "a multiple of 4096 of at least {} bytes",
                    header + MIN_DATA_SIZE
                ),
            });
        }
        let data_size = 1u64 << (63 - (region_size - header).leading_zeros());
        Ok(RingHeader {
            magic: RING_MAGIC,
            abi_version: ABI_VERSION,
            header_size: RING_HEADER_SIZE,
            region_size,
            data_size,
            high_water: data_size / 4 * 3,
            control,
            doorbell_port: DOORBELL_PORT.into(),
            ..RingHeader::default()
        })
    }

    /// Whether the guest has a working agent on this ring: the engine calls
    /// this before it starts a recording (after boot, or on the READY
    /// doorbell), so an unpatched kernel fails with a clear message instead
    /// of recording nothing.
    pub fn check_agent(&self) -> Result<(), AbiError> {
        match self.agent_state {
            AGENT_STATE_READY => Ok(()),
            AGENT_STATE_ABSENT => Err(AbiError::AgentAbsent),
            AGENT_STATE_REFUSED => Err(AbiError::AgentRefused {
                agent_abi_version: self.agent_abi_version,
            }),
            other => Err(AbiError::BadAgentState(other)),
        }
    }

    /// Checks the engine-written fields against the region length.
    pub fn validate(&self, region_len: usize) -> Result<RingGeometry, AbiError> {
        if self.magic != RING_MAGIC {
            return Err(AbiError::BadMagic { found: self.magic });
        }
        if self.abi_version != ABI_VERSION {
            return Err(AbiError::BadVersion {
                found: self.abi_version,
            });
        }
        let bad = |field, value: u64, expected: &str| AbiError::BadField {
            field,
            value,
            expected: expected.to_string(),
        };
        let header_size = u64::from(self.header_size);
        if header_size < size_of::<RingHeader>() as u64 || header_size & 7 != 0 {
            return Err(bad(
                "header_size",
                header_size,
                "a multiple of 8 holding the header",
            ));
        }
        if !self.data_size.is_power_of_two() || self.data_size < MIN_DATA_SIZE {
            return Err(bad(
                "data_size",
                self.data_size,
                "a power of two of at least MIN_DATA_SIZE (64 KiB)",
            ));
        }
        if self.high_water > self.data_size {
            return Err(bad("high_water", self.high_water, "at most data_size"));
        }
        let end = header_size.checked_add(self.data_size);
        if end.is_none_or(|end| end > self.region_size || end > region_len as u64) {
            return Err(bad(
                "data_size",
                self.data_size,
                &format!("header_size + data_size within the {region_len}-byte region"),
            ));
        }
        Ok(RingGeometry {
            header_size,
            data_size: self.data_size,
        })
    }
}

/// One decoded agent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    Syscall(SyscallEvent),
    CopyFromUser {
        info: UserCopyEvent,
        data: Vec<u8>,
    },
    StrncpyFromUser {
        info: UserStringEvent,
        data: Vec<u8>,
    },
    StrnlenUser {
        info: UserStringEvent,
        data: Vec<u8>,
    },
    GetUser(GetUserEvent),
    Rdtsc(RdtscEvent),
    Random {
        info: RandomEvent,
        data: Vec<u8>,
    },
    Rdrand(RdrandEvent),
    PteRead(PteReadEvent),
    ExecLock(ExecLockEvent),
    Lost(LostEvent),
}

impl EventBody {
    /// The EVENT_* code.
    pub fn event_type(&self) -> u16 {
        match self {
            EventBody::Syscall(_) => EVENT_SYSCALL,
            EventBody::CopyFromUser { .. } => EVENT_COPY_FROM_USER,
            EventBody::StrncpyFromUser { .. } => EVENT_STRNCPY_FROM_USER,
            EventBody::StrnlenUser { .. } => EVENT_STRNLEN_USER,
            EventBody::GetUser(_) => EVENT_GET_USER,
            EventBody::Rdtsc(_) => EVENT_RDTSC,
            EventBody::Random { .. } => EVENT_RANDOM,
            EventBody::Rdrand(_) => EVENT_RDRAND,
            EventBody::PteRead(_) => EVENT_PTE_READ,
            EventBody::ExecLock(_) => EVENT_EXEC_LOCK,
            EventBody::Lost(_) => EVENT_LOST,
        }
    }
}

/// Short name of an EVENT_* code, as `krr log stats` prints it.
pub fn event_type_name(event_type: u16) -> &'static str {
    match event_type {
        EVENT_PAD => "pad",
        EVENT_SYSCALL => "syscall",
        EVENT_COPY_FROM_USER => "copy_from_user",
        EVENT_STRNCPY_FROM_USER => "strncpy_from_user",
        EVENT_STRNLEN_USER => "strnlen_user",
        EVENT_GET_USER => "get_user",
        EVENT_RDTSC => "rdtsc",
        EVENT_RANDOM => "random",
        EVENT_RDRAND => "rdrand",
        EVENT_PTE_READ => "pte_read",
        EVENT_EXEC_LOCK => "exec_lock",
        EVENT_LOST => "lost",
        _ => "unknown",
    }
}

/// One agent event with its common header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub cpu: u16,
    pub seq: u64,
    pub body: EventBody,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} cpu{} ", self.seq, self.cpu)?;
        match &self.body {
            EventBody::Syscall(s) => write!(
                f,
                "syscall nr={} rip={:#x} rsp={:#x} fs={:#x} cr3={:#x}",
                s.regs.orig_ax, s.regs.ip, s.regs.sp, s.fs_base, s.cr3
            ),
            EventBody::CopyFromUser { info, data } => write!(
                f,
                "copy_from_user {:#x} -> {:#x} len={} not_copied={} offset={} bytes={}",
                info.user_addr,
                info.kernel_addr,
                info.requested,
                info.not_copied,
                info.offset,
                data.len()
            ),
            EventBody::StrncpyFromUser { info, data } => write!(
                f,
                "strncpy_from_user {:#x} limit={} result={} {:?}",
                info.user_addr,
                info.limit,
                info.result,
                String::from_utf8_lossy(data)
            ),
            EventBody::StrnlenUser { info, data } => {
                write!(
                    f,
                    "strnlen_user {:#x} limit={} result={} {:?}",
                    info.user_addr,
                    info.limit,
                    info.result,
                    String::from_utf8_lossy(data)
                )
            }
            EventBody::GetUser(g) => write!(
                f,
                "get_user {:#x} size={} value={:#x} err={}",
                g.user_addr, g.size, g.value, g.err
            ),
            EventBody::Rdtsc(t) => write!(f, "rdtsc insn={} value={}", t.insn, t.value),
            EventBody::Random { info, data } => {
                write!(f, "random source={} bytes={}", info.source, data.len())
            }
            EventBody::Rdrand(r) => {
                write!(f, "rdrand insn={} ok={} value={:#x}", r.insn, r.ok, r.value)
            }
            EventBody::PteRead(p) => {
                write!(
                    f,
                    "pte_read {:#x} level={} pte={:#x}",
                    p.user_addr, p.level, p.pte
                )
            }
            EventBody::ExecLock(l) => write!(
                f,
                "exec_lock #{} reason={} previous_cpu={}",
                l.acquisition, l.reason, l.previous_cpu
            ),
            EventBody::Lost(l) => write!(f, "LOST {} events ({} bytes)", l.events, l.bytes),
        }
    }
}

/// What a ring image holds between `tail` and `head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingContents {
    pub header: RingHeader,
    pub events: Vec<Event>,
    /// Ring bytes consumed, including padding (`head - tail`).
    pub bytes: u64,
}

impl RingContents {
    /// Event counts by EVENT_* code, in code order.
    pub fn counts(&self) -> std::collections::BTreeMap<u16, u64> {
        let mut counts = std::collections::BTreeMap::new();
        for event in &self.events {
            *counts.entry(event.body.event_type()).or_insert(0) += 1;
        }
        counts
    }
}

/// Parses the records between `tail` and `head` of a ring region image (the
/// whole reserved region, header first), e.g. dumped from guest memory. The
/// recorder calls this on a consistent copy and then advances `tail` to
/// `head`. Every malformed record is an error naming its position.
pub fn parse_ring(region: &[u8]) -> Result<RingContents, AbiError> {
    let need = size_of::<RingHeader>();
    let header = RingHeader::read_from(region).ok_or(AbiError::TooSmall {
        len: region.len(),
        need,
    })?;
    let geometry = header.validate(region.len())?;
    if header.head < header.tail {
        return Err(AbiError::HeadBehindTail {
            head: header.head,
            tail: header.tail,
        });
    }
    let used = header.head - header.tail;
    if used > geometry.data_size {
        return Err(AbiError::Overrun {
            used,
            data_size: geometry.data_size,
        });
    }
    let data = &region
        [geometry.header_size as usize..(geometry.header_size + geometry.data_size) as usize];
    let events = parse_records(data, header.tail, header.head)?;
    Ok(RingContents {
        header,
        events,
        bytes: used,
    })
}

/// Parses the records of a data area between byte counters `tail` and `head`.
pub fn parse_records(data: &[u8], tail: u64, head: u64) -> Result<Vec<Event>, AbiError> {
    let mut events = Vec::new();
    for (at, record) in split_records(data, tail, head)? {
        events.push(decode_record(record).map_err(|e| match e {
            AbiError::BadRecord { problem, .. } => AbiError::BadRecord {
                at,
                offset: at % data.len() as u64,
                problem,
            },
            other => other,
        })?);
    }
    Ok(events)
}

/// The records (header, payload, padding; PAD records left out) of a data
/// area between byte counters `tail` and `head`, each with its ring byte
/// counter, checked for framing (alignment, size) but not decoded.
pub fn split_records(data: &[u8], tail: u64, head: u64) -> Result<Vec<(u64, &[u8])>, AbiError> {
    let data_size = data.len() as u64;
    let mut records = Vec::new();
    let mut at = tail;
    while at < head {
        let offset = at % data_size;
        let record_at = at;
        let bad = move |problem: String| AbiError::BadRecord {
            at: record_at,
            offset,
            problem,
        };
        if at & u64::from(EVENT_ALIGN - 1) != 0 {
            return Err(bad(format!("not {EVENT_ALIGN}-byte aligned")));
        }
        let room = (data_size - offset).min(head - at);
        if room < 8 {
            return Err(bad(format!("only {room} bytes left for a record header")));
        }
        let bytes = &data[offset as usize..(offset + room) as usize];
        let event_type = u16::from_le_bytes([bytes[0], bytes[1]]);
        let size = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if size < 8 || size & (EVENT_ALIGN - 1) != 0 || u64::from(size) > room {
            return Err(bad(format!(
                "size {size} (type {event_type}) is not a multiple of {EVENT_ALIGN} between 8 and the {room} bytes left"
            )));
        }
        at += u64::from(size);
        if event_type == EVENT_PAD {
            if offset + u64::from(size) != data_size {
                return Err(bad(format!(
                    "pad of {size} bytes does not end at the end of the data area"
                )));
            }
            continue;
        }
        records.push((record_at, &bytes[..size as usize]));
    }
    Ok(records)
}

/// Decodes one record (as [`split_records`] returns it, or as a recording
/// stores it). Errors are [`AbiError::BadRecord`] at position 0.
pub fn decode_record(record: &[u8]) -> Result<Event, AbiError> {
    let bad = |problem: String| AbiError::BadRecord {
        at: 0,
        offset: 0,
        problem,
    };
    let header = EventHeader::read_from(record).ok_or_else(|| {
        bad(format!(
            "{} bytes are smaller than the event header",
            record.len()
        ))
    })?;
    if header.size as usize != record.len() {
        return Err(bad(format!(
            "header size {} but the record is {} bytes",
            header.size,
            record.len()
        )));
    }
    let body = decode_body(header.event_type, &record[size_of::<EventHeader>()..]).map_err(bad)?;
    Ok(Event {
        cpu: header.cpu,
        seq: header.seq,
        body,
    })
}

fn payload<T>(bytes: &[u8], read: fn(&[u8]) -> Option<T>, name: &str) -> Result<T, String> {
    read(bytes).ok_or_else(|| {
        format!(
            "{name} record has {} payload bytes, needs {}",
            bytes.len(),
            size_of::<T>()
        )
    })
}

fn trailing(bytes: &[u8], fixed: usize, data_len: u32, name: &str) -> Result<Vec<u8>, String> {
    let data_len = data_len as usize;
    if data_len > MAX_DATA_PER_EVENT as usize {
        return Err(format!(
            "{name} data_len {data_len} exceeds MAX_DATA_PER_EVENT {MAX_DATA_PER_EVENT}"
        ));
    }
    bytes
        .get(fixed..fixed + data_len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            format!(
                "{name} data_len {data_len} runs past the record ({} payload bytes)",
                bytes.len()
            )
        })
}

fn decode_body(event_type: u16, bytes: &[u8]) -> Result<EventBody, String> {
    Ok(match event_type {
        EVENT_SYSCALL => EventBody::Syscall(payload(bytes, SyscallEvent::read_from, "syscall")?),
        EVENT_COPY_FROM_USER => {
            let info = payload(bytes, UserCopyEvent::read_from, "copy_from_user")?;
            let data = trailing(
                bytes,
                size_of::<UserCopyEvent>(),
                info.data_len,
                "copy_from_user",
            )?;
            EventBody::CopyFromUser { info, data }
        }
        EVENT_STRNCPY_FROM_USER => {
            let info = payload(bytes, UserStringEvent::read_from, "strncpy_from_user")?;
            let data = trailing(
                bytes,
                size_of::<UserStringEvent>(),
                info.data_len,
                "strncpy_from_user",
            )?;
            EventBody::StrncpyFromUser { info, data }
        }
        EVENT_STRNLEN_USER => {
            let info = payload(bytes, UserStringEvent::read_from, "strnlen_user")?;
            let data = trailing(
                bytes,
                size_of::<UserStringEvent>(),
                info.data_len,
                "strnlen_user",
            )?;
            EventBody::StrnlenUser { info, data }
        }
        EVENT_GET_USER => EventBody::GetUser(payload(bytes, GetUserEvent::read_from, "get_user")?),
        EVENT_RDTSC => EventBody::Rdtsc(payload(bytes, RdtscEvent::read_from, "rdtsc")?),
        EVENT_RANDOM => {
            let info = payload(bytes, RandomEvent::read_from, "random")?;
            let data = trailing(bytes, size_of::<RandomEvent>(), info.data_len, "random")?;
            EventBody::Random { info, data }
        }
        EVENT_RDRAND => EventBody::Rdrand(payload(bytes, RdrandEvent::read_from, "rdrand")?),
        EVENT_PTE_READ => EventBody::PteRead(payload(bytes, PteReadEvent::read_from, "pte_read")?),
        EVENT_EXEC_LOCK => {
            EventBody::ExecLock(payload(bytes, ExecLockEvent::read_from, "exec_lock")?)
        }
        EVENT_LOST => EventBody::Lost(payload(bytes, LostEvent::read_from, "lost")?),
        other => return Err(format!("unknown event type {other}")),
    })
}

/// Encodes one event as the agent writes it (header, payload, data, zero
/// padding to EVENT_ALIGN). The agent is the real producer; this is for tests
/// and for tools that build rings.
pub fn encode_event(event: &Event) -> Vec<u8> {
    let (payload, data): (Vec<u8>, &[u8]) = match &event.body {
        EventBody::Syscall(p) => (p.to_bytes(), &[]),
        EventBody::CopyFromUser { info, data } => (info.to_bytes(), data),
        EventBody::StrncpyFromUser { info, data } => (info.to_bytes(), data),
        EventBody::StrnlenUser { info, data } => (info.to_bytes(), data),
        EventBody::GetUser(p) => (p.to_bytes(), &[]),
        EventBody::Rdtsc(p) => (p.to_bytes(), &[]),
        EventBody::Random { info, data } => (info.to_bytes(), data),
        EventBody::Rdrand(p) => (p.to_bytes(), &[]),
        EventBody::PteRead(p) => (p.to_bytes(), &[]),
        EventBody::ExecLock(p) => (p.to_bytes(), &[]),
        EventBody::Lost(p) => (p.to_bytes(), &[]),
    };
    let unpadded = size_of::<EventHeader>() + payload.len() + data.len();
    let size = unpadded.next_multiple_of(EVENT_ALIGN as usize);
    let header = EventHeader {
        event_type: event.body.event_type(),
        cpu: event.cpu,
        size: size as u32,
        seq: event.seq,
    };
    let mut out = header.to_bytes();
    out.extend_from_slice(&payload);
    out.extend_from_slice(data);
    out.resize(size, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_events() -> Vec<Event> {
        let mut regs = UserRegs {
            orig_ax: 39,
            ip: 0x401000,
            sp: 0x7ffc_0000,
            ..UserRegs::default()
        };
        regs.cx = regs.ip;
        vec![
            Event {
                cpu: 0,
                seq: 0,
                body: EventBody::Syscall(SyscallEvent {
                    regs,
                    fs_base: 0x4c_0000,
                    cr3: 0x1234000,
                    ..Default::default()
                }),
            },
            Event {
                cpu: 1,
                seq: 1,
                body: EventBody::CopyFromUser {
                    info: UserCopyEvent {
                        user_addr: 0x7ffc_1000,
                        kernel_addr: 0xffff_8880_0000_1000,
                        requested: 5,
                        data_len: 5,
                        ..Default::default()
                    },
                    data: b"hello".to_vec(),
                },
            },
            Event {
                cpu: 0,
                seq: 2,
                body: EventBody::Rdtsc(RdtscEvent {
                    value: 123_456_789,
                    ..Default::default()
                }),
            },
            Event {
                cpu: 0,
                seq: 3,
                body: EventBody::GetUser(GetUserEvent {
                    user_addr: 0x1000,
                    value: 7,
                    size: 4,
                    err: 0,
                    cr3: 0x100_0000,
                }),
            },
        ]
    }

    /// Builds a ring region holding `events` starting at byte counter `start`.
    fn ring_with(events: &[Event], data_size: u64, start: u64) -> Vec<u8> {
        let mut header =
            RingHeader::new(u64::from(RING_HEADER_SIZE) + data_size, CONTROL_RECORD).unwrap();
        assert_eq!(header.data_size, data_size);
        let mut region = vec![0u8; (u64::from(RING_HEADER_SIZE) + data_size) as usize];
        let mut at = start;
        for event in events {
            let bytes = encode_event(event);
            let offset = at % data_size;
            if offset + bytes.len() as u64 > data_size {
                let pad = (data_size - offset) as u32;
                let base = (u64::from(RING_HEADER_SIZE) + offset) as usize;
                region[base..base + 2].copy_from_slice(&EVENT_PAD.to_le_bytes());
                region[base + 4..base + 8].copy_from_slice(&pad.to_le_bytes());
                at += u64::from(pad);
            }
            let base = (u64::from(RING_HEADER_SIZE) + at % data_size) as usize;
            region[base..base + bytes.len()].copy_from_slice(&bytes);
            at += bytes.len() as u64;
        }
        header.tail = start;
        header.head = at;
        region[..size_of::<RingHeader>()].copy_from_slice(&header.to_bytes());
        region
    }

    #[test]
    fn layouts_have_no_padding() {
        for layout in layouts() {
            let sum: usize = layout.fields.iter().map(|f| f.size).sum();
            assert_eq!(sum, layout.size, "{} has implicit padding", layout.c_name);
            assert_eq!(
                layout.size % 8,
                0,
                "{} size is not a multiple of 8",
                layout.c_name
            );
        }
        assert_eq!(size_of::<UserRegs>(), 21 * 8, "pt_regs has 21 registers");
        assert_eq!(size_of::<EventHeader>(), 16);
        assert_eq!(
            offset_of!(RingHeader, head),
            64,
            "producer state starts a cache line"
        );
        assert_eq!(
            offset_of!(RingHeader, tail),
            128,
            "consumer state starts a cache line"
        );
        assert_eq!(size_of::<RingHeader>(), 256);
    }

    #[test]
    fn round_trip_with_wrap_and_pad() {
        let events = sample_events();
        // Start near the end of the data area so a record must be preceded
        // by a pad and the next ones wrap to offset 0.
        let region = ring_with(&events, MIN_DATA_SIZE, MIN_DATA_SIZE * 3 - 112);
        let contents = parse_ring(&region).unwrap();
        assert_eq!(contents.events, events);
        assert_eq!(contents.counts().get(&EVENT_SYSCALL), Some(&1));
    }

    #[test]
    fn bad_magic_version_and_overrun_are_named() {
        let events = sample_events();
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        region[0] ^= 0xff;
        assert!(matches!(
            parse_ring(&region),
            Err(AbiError::BadMagic { .. })
        ));
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        region[8] = 9;
        assert_eq!(parse_ring(&region), Err(AbiError::BadVersion { found: 9 }));
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        let mut header = RingHeader::read_from(&region).unwrap();
        header.head = header.tail + MIN_DATA_SIZE + 8;
        region[..256].copy_from_slice(&header.to_bytes());
        assert_eq!(
            parse_ring(&region),
            Err(AbiError::Overrun {
                used: MIN_DATA_SIZE + 8,
                data_size: MIN_DATA_SIZE
            })
        );
    }

    #[test]
    fn corrupt_record_is_reported_with_position() {
        let events = sample_events();
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        let second = encode_event(&events[0]).len();
        // Break the second record's size field.
        let base = RING_HEADER_SIZE as usize + second + 4;
        region[base..base + 4].copy_from_slice(&3u32.to_le_bytes());
        match parse_ring(&region) {
            Err(AbiError::BadRecord {
                at,
                offset,
                problem,
            }) => {
                assert_eq!(at, second as u64);
                assert_eq!(offset, second as u64);
                assert!(problem.contains("size 3"), "{problem}");
            }
            other => panic!("expected BadRecord, got {other:?}"),
        }
        let mut region = ring_with(&events, MIN_DATA_SIZE, 0);
        region[RING_HEADER_SIZE as usize] = 0x77;
        let err = parse_ring(&region).unwrap_err().to_string();
        assert!(err.contains("unknown event type 119"), "{err}");
    }

    #[test]
    fn drain_consumes_then_finds_nothing() {
        let events = sample_events();
        let mut region = ring_with(&events, MIN_DATA_SIZE, 40);
        assert_eq!(drain(&mut region).unwrap().events, events);
        let again = drain(&mut region).unwrap();
        assert!(again.events.is_empty());
        assert_eq!(again.header.tail, again.header.head);
        assert_eq!(
            kernel_cmdline(0x1c00_0000, 0x10_1000, true),
            "memmap=0x101000$0x1c000000 krr.ring=0x101000@0x1c000000"
        );
    }

    #[test]
    fn agent_presence_and_doorbells() {
        let mut h = RingHeader::new(1 << 20, 0).unwrap();
        let absent = h.check_agent().unwrap_err().to_string();
        assert!(absent.contains("KRR agent not found"), "{absent}");
        h.agent_state = AGENT_STATE_REFUSED;
        h.agent_abi_version = 7;
        assert_eq!(
            h.check_agent(),
            Err(AbiError::AgentRefused {
                agent_abi_version: 7
            })
        );
        h.agent_state = AGENT_STATE_READY;
        assert_eq!(h.check_agent(), Ok(()));
        assert_eq!(Doorbell::from_value(DOORBELL_FULL), Some(Doorbell::Full));
        assert!(Doorbell::from_value(DOORBELL_HIGH_WATER)
            .unwrap()
            .wants_drain());
        assert!(!Doorbell::from_value(DOORBELL_GUEST_START)
            .unwrap()
            .wants_drain());
        assert_eq!(Doorbell::from_value(0), None);
    }

    #[test]
    fn header_new_rejects_bad_sizes() {
        assert!(
            RingHeader::new(4096 + MIN_DATA_SIZE - 4096, 0).is_err(),
            "data area too small"
        );
        assert!(
            RingHeader::new(4096 + MIN_DATA_SIZE + 1, 0).is_err(),
            "not page aligned"
        );
        let h = RingHeader::new(1 << 20, 0).unwrap();
        assert_eq!(
            h.data_size,
            1 << 19,
            "largest power of two after the header page"
        );
        assert_eq!(h.high_water, 3 << 17);
        assert_eq!(h.validate(1 << 20).unwrap().header_size, 4096);
        assert!(
            h.validate(4096 + 1000).is_err(),
            "region shorter than header + data"
        );
    }

    #[test]
    fn header_lists_every_struct_and_constant() {
        let header = c_header();
        for layout in layouts() {
            assert!(header.contains(&format!("struct {} {{", layout.c_name)));
        }
        for (name, _, _) in constants() {
            assert!(header.contains(&format!("#define {name} ")), "{name}");
        }
        assert!(header.contains("uint64_t reserved2[15];"));
        for (n, line) in header.lines().enumerate() {
            let cols: usize = line.chars().map(|c| if c == '\t' { 8 } else { 1 }).sum();
            assert!(
                cols <= 80,
                "header line {} has {cols} columns: {line}",
                n + 1
            );
        }
    }
}
