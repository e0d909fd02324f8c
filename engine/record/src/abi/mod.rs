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
//!   an existing entry (`handle_pte_fault`), mprotect (`change_pte_range`),
//!   /proc's smaps and numa_maps, `MADV_COLD`/`PAGEOUT`/`FREE`, every
//!   `ptep_test_and_clear_young` (reclaim, clear_refs), GUP's
//!   `follow_page_pte` and lockless `gup_pte_range`, rmap's
//!   `page_vma_mkclean_one`, `try_to_unmap_one` and `try_to_migrate_one`,
//!   and mincore (`mincore_pte_range`). Those that only test presence still
//!   hold the whole entry in a register, where an interrupt's registers or a
//!   checkpoint see the bits. Not hooked: khugepaged's scans (the guest
//!   kernels have no transparent huge pages).
//!
//! - io_uring's shared memory (ABI 4, [`EVENT_SHARED_READ`]): user space maps
//!   the rings and the SQE array and may write them at any time, and the
//!   kernel reads them with plain loads through its own mapping. Logged at
//!   their kernel addresses: every load of a ring word (SQ and CQ heads and
//!   tails, `cq_flags`, `cq_overflow`, `sq_dropped`, an SQ index array slot),
//!   with the value loaded ([`SHARED_IO_URING_RING`]); each SQE as
//!   `io_get_sqe` hands it out, 64 or 128 bytes, before any field of it is
//!   read ([`SHARED_IO_URING_SQE`]; prep and issue read it in the same
//!   kernel stint); fdinfo's CQEs ([`SHARED_IO_URING_CQE`]); a provided
//!   buffer ring's tail and the entry taken ([`SHARED_IO_URING_BUF_RING`]).
//!   The agent makes each ring-word load itself, under its ring's lock with
//!   interrupts off, and logs it there (`krr_agent_shared_load_word`): a
//!   vCPU's slice can end between a load and its record only inside the
//!   agent, where replay recognises it (the record is then written before
//!   the stint that made the load, and not again after; other records read
//!   ahead are not written early, since another vCPU's kernel may store to
//!   the word first). Not covered: fixed (registered) buffers and other pinned user pages the
//!   kernel reads through kmap, like DMA.
//!
//! Defined here but not emitted by the agent yet:
//! - [`EVENT_EXEC_LOCK`]: a kernel-wide execution lock (one vCPU in the kernel
//!   at a time, as KRR does) is not implemented; recordings of SMP guests give a
//!   global order of agent events only, not of kernel shared-memory races.
//! - faulting `unsafe_get_user`, reads in NMI context.

mod event;
mod header;
mod layout;
mod ring;

pub use event::{decode_record, encode_event, event_type_name, Event, EventBody};
pub use header::c_header;
pub use layout::{constants, layouts, CType, FieldLayout, StructLayout};
pub use ring::{
    drain, kernel_cmdline, parse_records, parse_ring, split_records, AbiError, Doorbell,
    RingContents, RingGeometry, AGENT_STATE_OFFSET, CONTROL_OFFSET, HEAD_OFFSET, NEXT_SEQ_OFFSET,
    TAIL_OFFSET,
};
use std::mem::{offset_of, size_of};

/// `magic` of a formatted ring: the bytes `"KRRRING\0"`.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"KRRRING\0");
/// ABI version; bumped on any incompatible change of this module.
pub const ABI_VERSION: u32 = 4;
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
/// [`SharedReadEvent`] + data (ABI 4).
pub const EVENT_SHARED_READ: u16 = 13;

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

/// [`SharedReadEvent::source`]: a word of io_uring's rings (a head, a tail,
/// a flags or counter word, an SQ index array slot), as loaded.
pub const SHARED_IO_URING_RING: u32 = 0;
/// [`SharedReadEvent::source`]: an SQE (64 bytes, 128 with SQE128).
pub const SHARED_IO_URING_SQE: u32 = 1;
/// [`SharedReadEvent::source`]: a CQE (fdinfo shows them).
pub const SHARED_IO_URING_CQE: u32 = 2;
/// [`SharedReadEvent::source`]: a provided buffer ring's tail or entry.
pub const SHARED_IO_URING_BUF_RING: u32 = 3;

/// [`RdrandEvent::insn`]: RDRAND.
pub const RDRAND_INSN_RDRAND: u32 = 0;
/// [`RdrandEvent::insn`]: RDSEED.
pub const RDRAND_INSN_RDSEED: u32 = 1;

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
    /// EVENT_SHARED_READ payload, followed by `data_len` bytes (padded to 8):
    /// memory user space shares with the kernel (it maps the same pages and
    /// may write them at any time) that the kernel read through its own
    /// mapping, at `kernel_addr`: the bytes as they were read.
    SharedReadEvent => "krr_shared_read_event" {
        /// Kernel virtual address read (direct map or vmalloc).
        kernel_addr: u64,
        /// Bytes following this payload (at most MAX_DATA_PER_EVENT).
        data_len: u32,
        /// SHARED_*: what was read.
        source: u32,
        /// CR3 the kernel ran on (its half maps kernel_addr).
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
