// SPDX-License-Identifier: GPL-2.0-or-later
//! Layout tables of the ABI structs and constants ([`StructLayout`],
//! [`layouts`], [`constants`]): what the C header and the layout test read.

use super::*;

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
        SharedReadEvent::layout(),
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
        c("KRR_EVENT_SHARED_READ", EVENT_SHARED_READ.into(), "U"),
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
        c("KRR_SHARED_IO_URING_RING", SHARED_IO_URING_RING.into(), "U"),
        c("KRR_SHARED_IO_URING_SQE", SHARED_IO_URING_SQE.into(), "U"),
        c("KRR_SHARED_IO_URING_CQE", SHARED_IO_URING_CQE.into(), "U"),
        c(
            "KRR_SHARED_IO_URING_BUF_RING",
            SHARED_IO_URING_BUF_RING.into(),
            "U",
        ),
        c("KRR_RDRAND_INSN_RDRAND", RDRAND_INSN_RDRAND.into(), "U"),
        c("KRR_RDRAND_INSN_RDSEED", RDRAND_INSN_RDSEED.into(), "U"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

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
}
