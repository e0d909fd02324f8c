// SPDX-License-Identifier: GPL-2.0-or-later
//! Interrupt and exception delivery through the guest's 64-bit IDT.
//!
//! Unicorn reports exceptions to a hook instead of delivering them, and has
//! no notion of external interrupts, so the backend does what the processor
//! would: read the gate, pick the stack (RSP0 on a privilege change, IST when
//! the gate names one), push SS, RSP, RFLAGS, CS, RIP and the error code, and
//! load CS (with its hidden cache and the CPL) from the gate. A fault while
//! doing so becomes a double fault; a fault while delivering that is a
//! triple fault, which the caller turns into a machine shutdown.

use super::hooks::{read_reg, write_reg};
use super::internals::{
    EnvLayout, Gpr, Seg, SegmentCache, DESC_DPL_SHIFT, DESC_L_MASK, DESC_P_MASK,
};
use super::vcpu::mmr;
use std::ffi::c_void;
use unicorn_engine::unicorn_const::{
    uc_engine, uc_error, uc_vmem_read, uc_vmem_write, Prot, RegisterX86,
};

/// How the event arose, which decides the error code and the gate DPL check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A processor exception (fault or trap), with its error code if the
    /// vector has one.
    Exception { error_code: Option<u32> },
    /// INT n, INT3, INTO: RIP already points past the instruction and the
    /// gate's DPL must allow the current privilege level.
    Software,
    /// An external (hardware) interrupt or NMI.
    External,
}

/// Delivery failed in a way that the processor turns into another exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub error_code: u32,
}

/// The delivery could not complete even as a double fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TripleFault(pub String);

/// Whether this vector pushes an error code when raised as an exception.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;

// The helpers below take the engine's raw handle: every `uc` in this module
// comes from `deliver`, whose callers pass the open handle of the engine
// whose hook or vCPU is delivering.

fn vread(uc: *mut uc_engine, addr: u64, buf: &mut [u8]) -> bool {
    // SAFETY: `uc` is the engine's open handle (see above); `buf` is a live,
    // exclusively borrowed buffer of exactly the `buf.len()` bytes unicorn is
    // asked to copy into it.
    unsafe {
        uc_vmem_read(
            uc,
            addr,
            Prot::READ,
            buf.as_mut_ptr() as *mut c_void,
            buf.len(),
        ) == uc_error::OK
    }
}

fn vwrite(uc: *mut uc_engine, addr: u64, buf: &[u8]) -> bool {
    // SAFETY: `uc` is the engine's open handle (see above); `buf` is a live
    // buffer of exactly the `buf.len()` bytes passed, which uc_vmem_write
    // only reads (the `*mut` is its C prototype's missing `const`).
    unsafe {
        uc_vmem_write(
            uc,
            addr,
            Prot::WRITE,
            buf.as_ptr() as *mut c_void,
            buf.len(),
        ) == uc_error::OK
    }
}

fn read_u64(uc: *mut uc_engine, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    vread(uc, addr, &mut b).then(|| u64::from_le_bytes(b))
}

/// Delivers `vector` once; returns the fault that prevented it, if any.
///
/// Descriptor-table and TSS reads are supervisor accesses whatever the
/// CPL, and unicorn translates virtual addresses with the current CPL's
/// permissions, so the CPL is 0 while delivering; it is restored if the
/// delivery fails.
fn deliver_once(
    uc: *mut uc_engine,
    env: &EnvLayout,
    vector: u8,
    kind: EventKind,
) -> Result<(), Fault> {
    let hflags = env.hflags();
    let cpl = env.cpl();
    env.set_hflags(hflags & !super::internals::HF_CPL_MASK);
    let r = deliver_at_cpl(uc, env, vector, kind, cpl);
    if r.is_err() {
        env.set_hflags(hflags);
    }
    r
}

fn deliver_at_cpl(
    uc: *mut uc_engine,
    env: &EnvLayout,
    vector: u8,
    kind: EventKind,
    cpl: u8,
) -> Result<(), Fault> {
    let idt_fault = Fault {
        vector: 13,
        error_code: (vector as u32) * 8 + 2,
    };
    if env.hflags() & super::internals::HF_LMA_MASK == 0 {
        // The backend only models long mode; Linux enters it before it
        // enables interrupts.
        return Err(idt_fault);
    }
    let idt = mmr(uc, RegisterX86::IDTR);
    if (vector as u64) * 16 + 15 > idt.limit as u64 {
        return Err(idt_fault);
    }
    let mut gate = [0u8; 16];
    if !vread(uc, idt.base + (vector as u64) * 16, &mut gate) {
        return Err(Fault {
            vector: 14,
            error_code: 0,
        });
    }
    let offset = u16::from_le_bytes([gate[0], gate[1]]) as u64
        | (u16::from_le_bytes([gate[6], gate[7]]) as u64) << 16
        | (u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]) as u64) << 32;
    let selector = u16::from_le_bytes([gate[2], gate[3]]);
    let ist = gate[4] & 7;
    let gate_type = gate[5] & 0xf;
    let gate_dpl = (gate[5] >> 5) & 3;
    let present = gate[5] & 0x80 != 0;
    if gate_type != 0xe && gate_type != 0xf {
        return Err(idt_fault);
    }
    if kind == EventKind::Software && gate_dpl < cpl {
        return Err(idt_fault);
    }
    if !present {
        return Err(Fault {
            vector: 11,
            error_code: (vector as u32) * 8 + 2,
        });
    }
    // The target code segment's descriptor gives the new CPL.
    if selector & 0xfffc == 0 || selector & 4 != 0 {
        return Err(Fault {
            vector: 13,
            error_code: (selector & 0xfffc) as u32,
        });
    }
    let gdt = mmr(uc, RegisterX86::GDTR);
    let index = (selector & !7) as u64;
    if index + 7 > gdt.limit as u64 {
        return Err(Fault {
            vector: 13,
            error_code: (selector & 0xfffc) as u32,
        });
    }
    let desc = read_u64(uc, gdt.base + index).ok_or(Fault {
        vector: 14,
        error_code: 0,
    })?;
    let cs_flags = ((desc >> 32) as u32) & 0x00f0_ff00;
    let new_cpl = ((cs_flags >> DESC_DPL_SHIFT) & 3) as u8;
    if cs_flags & DESC_P_MASK == 0 || cs_flags & DESC_L_MASK == 0 || new_cpl > cpl {
        return Err(Fault {
            vector: 13,
            error_code: (selector & 0xfffc) as u32,
        });
    }

    let old_rip = env.eip();
    let old_rsp = env.reg(Gpr::Rsp);
    let old_rflags = read_reg(uc, RegisterX86::RFLAGS);
    let old_cs = env.segment(Seg::Cs);
    let old_ss = env.segment(Seg::Ss);

    let tss = mmr(uc, RegisterX86::TR);
    let tss_fault = Fault {
        vector: 10,
        error_code: (tss.selector & 0xfffc) as u32,
    };
    let mut rsp = if ist != 0 {
        read_u64(uc, tss.base.wrapping_add(0x24 + 8 * (ist as u64 - 1))).ok_or(tss_fault)?
    } else if new_cpl < cpl {
        read_u64(uc, tss.base.wrapping_add(4 + 8 * new_cpl as u64)).ok_or(tss_fault)?
    } else {
        old_rsp
    };
    rsp &= !0xf;

    let mut frame: Vec<u64> = Vec::with_capacity(6);
    let error_code = match kind {
        EventKind::Exception { error_code } => error_code,
        _ => None,
    };
    if let Some(code) = error_code {
        frame.push(code as u64);
    }
    frame.extend_from_slice(&[
        old_rip,
        old_cs.selector as u64,
        old_rflags,
        old_rsp,
        old_ss.selector as u64,
    ]);
    let bytes: Vec<u8> = frame.iter().flat_map(|v| v.to_le_bytes()).collect();
    // The guest's stack pointer: it wraps as on hardware, and the write
    // below faults where that leaves mapped memory.
    let new_rsp = rsp.wrapping_sub(bytes.len() as u64);

    // Switch the privilege level first: the stack is a supervisor page and
    // the write below translates with the current CPL.
    env.load_segment(
        Seg::Cs,
        SegmentCache {
            selector: (selector & 0xfffc) | new_cpl as u16,
            base: 0,
            limit: 0xffff_ffff,
            flags: cs_flags,
        },
    );
    if new_cpl != cpl {
        env.load_segment(
            Seg::Ss,
            SegmentCache {
                selector: new_cpl as u16,
                base: 0,
                limit: 0,
                flags: (new_cpl as u32) << DESC_DPL_SHIFT,
            },
        );
    }
    if !vwrite(uc, new_rsp, &bytes) {
        // Undo the segment switch so that the double fault starts from the
        // interrupted context.
        env.load_segment(Seg::Cs, old_cs);
        env.load_segment(Seg::Ss, old_ss);
        return Err(Fault {
            vector: if new_cpl != cpl { 10 } else { 14 },
            error_code: 0,
        });
    }
    env.set_reg(Gpr::Rsp, new_rsp);
    let mut rflags = old_rflags & !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if gate_type == 0xe {
        rflags &= !RFLAGS_IF;
    }
    write_reg(uc, RegisterX86::RFLAGS, rflags);
    env.set_eip(offset);
    env.set_hflags((env.hflags() & !super::internals::HF_CPL_MASK) | new_cpl as u32);
    env.clear_interrupt_shadow();
    Ok(())
}

/// Delivers an event, escalating to a double fault if delivery faults.
pub fn deliver(
    uc: *mut uc_engine,
    env: &EnvLayout,
    vector: u8,
    kind: EventKind,
) -> Result<(), TripleFault> {
    match deliver_once(uc, env, vector, kind) {
        Ok(()) => Ok(()),
        Err(first) if vector == 8 => Err(TripleFault(format!(
            "fault {} (error {:#x}) while delivering a double fault",
            first.vector, first.error_code
        ))),
        Err(first) => {
            // A contributory fault while delivering an event: x86 raises
            // the fault itself unless it happened while delivering an
            // exception, in which case it is a double fault.
            let escalate = matches!(kind, EventKind::Exception { .. })
                && matches!(vector, 0 | 10..=14)
                && matches!(first.vector, 0 | 10..=14);
            let (v, k) = if escalate {
                (
                    8,
                    EventKind::Exception {
                        error_code: Some(0),
                    },
                )
            } else {
                (
                    first.vector,
                    EventKind::Exception {
                        error_code: has_error_code(first.vector).then_some(first.error_code),
                    },
                )
            };
            match deliver_once(uc, env, v, k) {
                Ok(()) => Ok(()),
                Err(second) if v != 8 => deliver_once(
                    uc,
                    env,
                    8,
                    EventKind::Exception {
                        error_code: Some(0),
                    },
                )
                .map_err(|third| {
                    TripleFault(format!(
                        "vector {vector}: fault {} then {} then {} delivering the double fault",
                        first.vector, second.vector, third.vector
                    ))
                }),
                Err(second) => Err(TripleFault(format!(
                    "vector {vector}: fault {} then {} delivering the double fault",
                    first.vector, second.vector
                ))),
            }
        }
    }
}
