// SPDX-License-Identifier: GPL-2.0-or-later
//! A vCPU's registers in gdb's x86-64 layout (`org.gnu.gdb.i386.core` and
//! `.sse`), from the backend's registers and its FXSAVE area.

use gdbstub_arch::x86::reg::{X86SegmentRegs, X86_64CoreRegs, X87FpuInternalRegs};
use krr_hypervisor::{FpuState, Regs, Sregs};

/// gdb's registers from the backend's.
pub fn to_gdb(regs: &Regs, sregs: &Sregs, fpu: &FpuState) -> X86_64CoreRegs {
    let mut out = X86_64CoreRegs {
        // gdb's order: rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15.
        regs: [
            regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp, regs.rsp,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ],
        eflags: regs.rflags as u32,
        rip: regs.rip,
        segments: X86SegmentRegs {
            cs: u32::from(sregs.cs.selector),
            ss: u32::from(sregs.ss.selector),
            ds: u32::from(sregs.ds.selector),
            es: u32::from(sregs.es.selector),
            fs: u32::from(sregs.fs.selector),
            gs: u32::from(sregs.gs.selector),
        },
        ..Default::default()
    };
    let x = &fpu.xsave;
    if x.len() >= 512 {
        let u16_at = |o: usize| u16::from_le_bytes([x[o], x[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([x[o], x[o + 1], x[o + 2], x[o + 3]]);
        // FXSAVE keeps an abridged tag (one bit per register: valid); gdb
        // shows the full tag word, where 3 is empty.
        let abridged = x[4];
        let ftag = (0..8).fold(0u32, |tag, i| {
            let empty = abridged & (1 << i) == 0;
            tag | (if empty { 3 } else { 0 }) << (2 * i)
        });
        out.fpu = X87FpuInternalRegs {
            fctrl: u32::from(u16_at(0)),
            fstat: u32::from(u16_at(2)),
            ftag,
            fiseg: 0,
            fioff: u32_at(8),
            foseg: 0,
            fooff: u32_at(16),
            fop: u32::from(u16_at(6)),
        };
        for (i, st) in out.st.iter_mut().enumerate() {
            st.copy_from_slice(&x[32 + 16 * i..32 + 16 * i + 10]);
        }
        for (i, xmm) in out.xmm.iter_mut().enumerate() {
            let o = 160 + 16 * i;
            *xmm = u128::from_le_bytes(x[o..o + 16].try_into().expect("16 bytes"));
        }
        out.mxcsr = u32_at(24);
    }
    out
}

/// The backend's registers with gdb's general registers, RIP and RFLAGS
/// applied to `current`; gdb's other registers (segments, x87, SSE) must
/// be as they are (the stub writes only these).
pub fn from_gdb(
    gdb: &X86_64CoreRegs,
    current: &Regs,
    sregs: &Sregs,
    fpu: &FpuState,
) -> Result<Regs, String> {
    let now = to_gdb(current, sregs, fpu);
    if gdb.segments != now.segments
        || gdb.fpu != now.fpu
        || gdb.st != now.st
        || gdb.xmm != now.xmm
        || gdb.mxcsr != now.mxcsr
    {
        return Err(
            "only the general registers, RIP and EFLAGS can be written, not segments, x87 or SSE"
                .into(),
        );
    }
    let [rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15] = gdb.regs;
    Ok(Regs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rbp,
        rsp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip: gdb.rip,
        // gdb's eflags is 32 bits; the upper half of RFLAGS is reserved.
        rflags: (current.rflags & !0xffff_ffff) | u64::from(gdb.eflags),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn general_registers_go_in_gdbs_order_and_sse_state_comes_from_fxsave() {
        let regs = Regs {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r15: 16,
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..Default::default()
        };
        let mut sregs = Sregs::default();
        sregs.cs.selector = 0x10;
        sregs.ss.selector = 0x18;
        let mut xsave = vec![0u8; 512];
        xsave[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        xsave[4] = 0b0000_0001;
        xsave[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        xsave[160 + 16..160 + 32].copy_from_slice(&7u128.to_le_bytes());
        let fpu = FpuState { xsave };
        let g = to_gdb(&regs, &sregs, &fpu);
        assert_eq!(&g.regs[..8], &[1, 2, 3, 4, 5, 6, 8, 7]);
        assert_eq!((g.regs[8], g.regs[15]), (9, 16));
        assert_eq!((g.rip, g.eflags), (0xffff_ffff_8100_0000, 0x246));
        assert_eq!((g.segments.cs, g.segments.ss), (0x10, 0x18));
        assert_eq!((g.fpu.fctrl, g.mxcsr, g.xmm[1]), (0x37f, 0x1f80, 7));
        assert_eq!(g.fpu.ftag, 0xfffc, "ST0 valid, the rest empty");

        let mut edited = g.clone();
        edited.regs[1] = 0x1234;
        edited.rip = 0xffff_ffff_8100_0010;
        let back = from_gdb(&edited, &regs, &sregs, &fpu).unwrap();
        assert_eq!(
            (back.rbx, back.rip, back.rax),
            (0x1234, 0xffff_ffff_8100_0010, 1)
        );
        assert_eq!(back.rflags, 0x246);
        edited.segments.cs = 0x33;
        assert!(from_gdb(&edited, &regs, &sregs, &fpu)
            .unwrap_err()
            .contains("only the general registers"));
    }
}
