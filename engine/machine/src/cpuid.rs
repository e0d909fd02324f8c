// SPDX-License-Identifier: GPL-2.0-or-later
//! The CPU the guest sees, identical on every backend so that a recording
//! made on one replays on another.
//!
//! The feature set is QEMU's `qemu64` model (what unicorn's translator
//! implements; advertising more makes it raise #UD) with these masked: AVX
//! and XSAVE (not emulated), x2APIC and TSC-deadline (the local APIC model
//! has neither), RDRAND/RDSEED (non-deterministic), the hypervisor bit (no
//! paravirtual interfaces). Leaves 0x15/0x16 announce a 1 GHz TSC so that
//! Linux takes the TSC frequency from CPUID instead of calibrating it
//! against the PIT; 0x8000_0007 marks it invariant.

/// TSC frequency the guest is told, matching the virtual clock (1 ns per
/// retired instruction).
pub const TSC_HZ: u32 = 1_000_000_000;

#[derive(Debug, Clone, Copy)]
pub struct CpuidConfig {
    /// Advertise a local APIC (needed for SMP).
    pub apic: bool,
    pub vcpus: u32,
}

const EDX_FPU: u32 = 1 << 0;
const EDX_DE: u32 = 1 << 2;
const EDX_PSE: u32 = 1 << 3;
const EDX_TSC: u32 = 1 << 4;
const EDX_MSR: u32 = 1 << 5;
const EDX_PAE: u32 = 1 << 6;
const EDX_MCE: u32 = 1 << 7;
const EDX_CX8: u32 = 1 << 8;
const EDX_APIC: u32 = 1 << 9;
const EDX_SEP: u32 = 1 << 11;
const EDX_MTRR: u32 = 1 << 12;
const EDX_PGE: u32 = 1 << 13;
const EDX_CMOV: u32 = 1 << 15;
const EDX_PAT: u32 = 1 << 16;
const EDX_PSE36: u32 = 1 << 17;
const EDX_CLFLUSH: u32 = 1 << 19;
const EDX_MMX: u32 = 1 << 23;
const EDX_FXSR: u32 = 1 << 24;
const EDX_SSE: u32 = 1 << 25;
const EDX_SSE2: u32 = 1 << 26;
const EDX_HTT: u32 = 1 << 28;
const ECX_SSE3: u32 = 1 << 0;
const ECX_CX16: u32 = 1 << 13;

fn ascii4(s: &[u8]) -> u32 {
    u32::from_le_bytes([s[0], s[1], s[2], s[3]])
}

/// CPUID leaf `leaf`/`subleaf` as seen by vCPU `vcpu`.
pub fn cpuid(cfg: &CpuidConfig, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
    let _ = subleaf;
    match leaf {
        0 => [0x16, ascii4(b"Genu"), ascii4(b"ntel"), ascii4(b"ineI")],
        1 => {
            let mut edx = EDX_FPU
                | EDX_DE
                | EDX_PSE
                | EDX_TSC
                | EDX_MSR
                | EDX_PAE
                | EDX_MCE
                | EDX_CX8
                | EDX_SEP
                | EDX_MTRR
                | EDX_PGE
                | EDX_CMOV
                | EDX_PAT
                | EDX_PSE36
                | EDX_CLFLUSH
                | EDX_MMX
                | EDX_FXSR
                | EDX_SSE
                | EDX_SSE2;
            if cfg.apic {
                edx |= EDX_APIC;
            }
            if cfg.vcpus > 1 {
                edx |= EDX_HTT;
            }
            // Family 6 model 6 stepping 3 (qemu64); APIC ID, logical CPU
            // count and CLFLUSH line size (8 * 8 bytes) in EBX.
            let ebx = ((vcpu as u32) << 24) | (cfg.vcpus.min(255) << 16) | (8 << 8);
            [0x0000_0663, ebx, ECX_SSE3 | ECX_CX16, edx]
        }
        0x15 => [1, 1, TSC_HZ, 0],
        0x16 => [TSC_HZ / 1_000_000, TSC_HZ / 1_000_000, 100, 0],
        0x8000_0000 => [0x8000_0008, 0, 0, 0],
        // LAHF/SAHF in long mode; SYSCALL, NX, long mode.
        0x8000_0001 => [0, 0, 1, (1 << 11) | (1 << 20) | (1 << 29)],
        0x8000_0002..=0x8000_0004 => {
            const BRAND: &[u8; 48] = b"KRR virtual CPU (deterministic, 1 GHz TSC)\0\0\0\0\0\0";
            let i = ((leaf - 0x8000_0002) * 16) as usize;
            [
                ascii4(&BRAND[i..]),
                ascii4(&BRAND[i + 4..]),
                ascii4(&BRAND[i + 8..]),
                ascii4(&BRAND[i + 12..]),
            ]
        }
        // Invariant TSC.
        0x8000_0007 => [0, 0, 0, 1 << 8],
        // 40-bit physical, 48-bit virtual addresses.
        0x8000_0008 => [0x3028, 0, 0, 0],
        _ => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_nondeterministic_and_unemulated_features() {
        let cfg = CpuidConfig {
            apic: false,
            vcpus: 1,
        };
        let l1 = cpuid(&cfg, 0, 1, 0);
        // No RDRAND (30), AVX (28), XSAVE (26), x2APIC (21), TSC-deadline
        // (24), hypervisor (31).
        for bit in [30, 28, 26, 27, 21, 24, 31] {
            assert_eq!(l1[2] & (1 << bit), 0, "ecx bit {bit}");
        }
        assert_eq!(l1[3] & EDX_APIC, 0);
        assert_eq!(cpuid(&cfg, 0, 7, 0)[1] & (1 << 18), 0, "RDSEED");
        assert_eq!(cpuid(&cfg, 0, 0x15, 0), [1, 1, TSC_HZ, 0]);
        let smp = CpuidConfig {
            apic: true,
            vcpus: 2,
        };
        assert_eq!(cpuid(&smp, 1, 1, 0)[1] >> 24, 1);
        assert_ne!(cpuid(&smp, 1, 1, 0)[3] & EDX_APIC, 0);
    }
}
