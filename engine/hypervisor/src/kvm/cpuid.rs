// SPDX-License-Identifier: GPL-2.0-or-later
//! The guest's CPUID table for KVM, taken from the engine.
//!
//! The engine answers CPUID through [`IoBus::cpuid`] so that every backend
//! shows the guest the same CPU and a recording made on KVM replays on the
//! software CPU. KVM needs the whole table up front (`KVM_SET_CPUID2`), so the
//! leaves are enumerated here by asking the bus, following the architectural
//! rules for which leaves have sub-leaves.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};

use crate::{HypervisorError, IoBus, Result};

/// Upper bound of sub-leaves asked for per indexed leaf; real CPUs stay well
/// below it, and it keeps a buggy answer from looping forever.
const MAX_SUBLEAVES: u32 = 64;

/// How the sub-leaves of an indexed leaf end.
#[derive(Clone, Copy)]
enum Subleaves {
    /// Not indexed.
    None,
    /// Deterministic cache parameters (leaves 4, 0x8000_001d): until the
    /// cache type in EAX[4:0] is 0.
    UntilCacheTypeNull,
    /// Structured extended features (7), leaf 0x14, 0x17, 0x18, 0x1d, 0x20:
    /// sub-leaf 0's EAX is the highest sub-leaf.
    MaxInEax,
    /// Extended topology (0xb, 0x1f): until the level type in ECX[15:8] is 0.
    UntilLevelTypeNull,
    /// A fixed number of sub-leaves, kept when not all zero (XSAVE 0xd, RDT
    /// 0xf/0x10, SGX 0x12, 0x8000_0020).
    Fixed(u32),
}

fn subleaves_of(leaf: u32) -> Subleaves {
    match leaf {
        0x4 | 0x8000_001d => Subleaves::UntilCacheTypeNull,
        0x7 | 0x14 | 0x17 | 0x18 | 0x1d | 0x20 => Subleaves::MaxInEax,
        0xb | 0x1f => Subleaves::UntilLevelTypeNull,
        0xd => Subleaves::Fixed(MAX_SUBLEAVES),
        0xf | 0x10 | 0x12 | 0x8000_0020 => Subleaves::Fixed(4),
        _ => Subleaves::None,
    }
}

fn entry(function: u32, index: u32, flags: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax: r[0],
        ebx: r[1],
        ecx: r[2],
        edx: r[3],
        ..Default::default()
    }
}

fn push_leaf<B: IoBus + ?Sized>(
    out: &mut Vec<kvm_cpuid_entry2>,
    bus: &mut B,
    vcpu: usize,
    leaf: u32,
) {
    let first = bus.cpuid(vcpu, leaf, 0);
    let indexed = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    match subleaves_of(leaf) {
        Subleaves::None => out.push(entry(leaf, 0, 0, first)),
        Subleaves::MaxInEax => {
            let last = first[0].min(MAX_SUBLEAVES - 1);
            out.push(entry(leaf, 0, indexed, first));
            for sub in 1..=last {
                out.push(entry(leaf, sub, indexed, bus.cpuid(vcpu, leaf, sub)));
            }
        }
        Subleaves::UntilCacheTypeNull | Subleaves::UntilLevelTypeNull => {
            let mut r = first;
            for sub in 0..MAX_SUBLEAVES {
                if sub > 0 {
                    r = bus.cpuid(vcpu, leaf, sub);
                }
                out.push(entry(leaf, sub, indexed, r));
                let end = match subleaves_of(leaf) {
                    Subleaves::UntilCacheTypeNull => r[0] & 0x1f == 0,
                    _ => (r[2] >> 8) & 0xff == 0,
                };
                if end {
                    break;
                }
            }
        }
        Subleaves::Fixed(n) => {
            out.push(entry(leaf, 0, indexed, first));
            for sub in 1..n {
                let r = bus.cpuid(vcpu, leaf, sub);
                if r != [0; 4] {
                    out.push(entry(leaf, sub, indexed, r));
                }
            }
        }
    }
}

/// Enumerates the engine's CPUID for `vcpu` into KVM's table format.
pub(crate) fn table_from_bus<B: IoBus + ?Sized>(
    bus: &mut B,
    vcpu: usize,
) -> Result<Vec<kvm_cpuid_entry2>> {
    let mut out = Vec::new();
    for base in [0u32, 0x4000_0000, 0x8000_0000] {
        let max = bus.cpuid(vcpu, base, 0)[0];
        // A range the engine does not implement answers with a max leaf
        // outside the range (often 0): skip it. 0x100 leaves per range is far
        // above any real CPU.
        if base != 0 && !(base..base + 0x100).contains(&max) {
            continue;
        }
        let max = max.min(base + 0xff);
        for leaf in base..=max {
            push_leaf(&mut out, bus, vcpu, leaf);
        }
    }
    if out.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(HypervisorError::Backend {
            backend: "kvm",
            op: "build CPUID table",
            reason: format!(
                "the engine's CPUID has {} entries; KVM takes at most {KVM_MAX_CPUID_ENTRIES}",
                out.len()
            ),
        });
    }
    Ok(out)
}

/// Feature-flag registers checked against what the host KVM can give a
/// guest: (leaf, sub-leaf, register index in EAX..EDX, name, bits that
/// reflect guest control-register state rather than a capability).
const FEATURE_REGISTERS: &[(u32, u32, usize, &str, u32)] = &[
    (1, 0, 2, "CPUID.1:ECX", 1 << 27), // OSXSAVE mirrors CR4.OSXSAVE
    (1, 0, 3, "CPUID.1:EDX", 0),
    (7, 0, 1, "CPUID.7.0:EBX", 0),
    (7, 0, 2, "CPUID.7.0:ECX", 1 << 4), // OSPKE mirrors CR4.PKE
    (7, 0, 3, "CPUID.7.0:EDX", 0),
    (0x8000_0001, 0, 2, "CPUID.80000001h:ECX", 0),
    (0x8000_0001, 0, 3, "CPUID.80000001h:EDX", 0),
];

/// The feature bits the host's KVM can give a guest, for a machine model
/// that shows the guest only those (a KVM run on a host whose KVM lacks a
/// feature the engine's CPU has: PVM offers no SSE3, for one). Such a run's
/// CPUID differs from the software CPU's; the recorder logs CPUID.
#[derive(Clone)]
pub struct HostFeatures {
    supported: std::sync::Arc<Vec<kvm_cpuid_entry2>>,
}

impl HostFeatures {
    /// The features of a KVM whose supported CPUID is `supported`.
    pub fn new(supported: std::sync::Arc<Vec<kvm_cpuid_entry2>>) -> Self {
        Self { supported }
    }

    /// `regs`, the answer to CPUID `leaf`/`subleaf`, with the feature bits
    /// the host's KVM cannot provide cleared (bits that mirror guest
    /// control-register state are kept).
    pub fn restrict(&self, leaf: u32, subleaf: u32, mut regs: [u32; 4]) -> [u32; 4] {
        for &(l, sub, r, _, dynamic) in FEATURE_REGISTERS {
            if l != leaf || sub != subleaf {
                continue;
            }
            let have = self
                .supported
                .iter()
                .find(|e| {
                    e.function == l
                        && (e.index == sub || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
                })
                .map(|e| reg(e, r))
                .unwrap_or(0);
            regs[r] &= have | dynamic;
        }
        regs
    }

    /// What [`HostFeatures::restrict`] removes from the CPU `cpuid`
    /// describes, as human-readable lines (empty: nothing).
    pub fn removed(&self, mut cpuid: impl FnMut(u32, u32) -> [u32; 4]) -> Vec<String> {
        let mut out = Vec::new();
        for &(l, sub, r, name, _) in FEATURE_REGISTERS {
            let full = cpuid(l, sub);
            let gone = full[r] & !self.restrict(l, sub, full)[r];
            if gone != 0 {
                out.push(format!("{name} mask {gone:#010x}"));
            }
        }
        out
    }
}

fn reg(e: &kvm_cpuid_entry2, i: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][i]
}

/// Feature bits the engine advertises that the host's KVM cannot provide,
/// as human-readable lines. A guest told it has a feature the hardware lacks
/// faults (#UD) at a point no recording explains, so the caller refuses.
pub(crate) fn unsupported_features(
    wanted: &[kvm_cpuid_entry2],
    supported: &[kvm_cpuid_entry2],
) -> Vec<String> {
    let find = |t: &[kvm_cpuid_entry2], f: u32, i: u32| {
        t.iter()
            .find(|e| {
                e.function == f && (e.index == i || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
            })
            .copied()
    };
    let mut missing = Vec::new();
    for &(leaf, sub, r, name, dynamic) in FEATURE_REGISTERS {
        let Some(w) = find(wanted, leaf, sub) else {
            continue;
        };
        let have = find(supported, leaf, sub).map(|e| reg(&e, r)).unwrap_or(0);
        let extra = reg(&w, r) & !have & !dynamic;
        if extra != 0 {
            let bits: Vec<String> = (0..32)
                .filter(|b| extra & (1 << b) != 0)
                .map(|b| b.to_string())
                .collect();
            missing.push(format!(
                "{name} bits {} (mask {extra:#010x})",
                bits.join(",")
            ));
        }
    }
    missing
}

pub(crate) fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId> {
    CpuId::from_entries(entries).map_err(|e| HypervisorError::Backend {
        backend: "kvm",
        op: "build CPUID table",
        reason: format!("{e:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bus answering CPUID from a fixed table, like a recorded CPU.
    struct TableBus(Vec<(u32, u32, [u32; 4])>);

    impl IoBus for TableBus {
        fn pio_read(&mut self, _: usize, _: u16, _: &mut [u8]) {}
        fn pio_write(&mut self, _: usize, _: u16, _: &[u8]) {}
        fn mmio_read(&mut self, _: usize, _: u64, _: &mut [u8]) {}
        fn mmio_write(&mut self, _: usize, _: u64, _: &[u8]) {}
        fn cpuid(&mut self, _: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
            self.0
                .iter()
                .find(|(l, s, _)| *l == leaf && *s == subleaf)
                .map(|e| e.2)
                .unwrap_or([0; 4])
        }
        fn rdtsc(&mut self, _: usize) -> u64 {
            0
        }
    }

    #[test]
    fn enumerates_basic_indexed_and_extended_leaves() {
        let mut bus = TableBus(vec![
            (0, 0, [0xb, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            (1, 0, [0x306a9, 0, 0x8000_0001, 0x0789_fbff]),
            (4, 0, [0x121, 0, 0, 0]),
            (4, 1, [0x122, 0, 0, 0]),
            (7, 0, [1, 0x9, 0, 0]),
            (7, 1, [0, 0, 0, 0x10]),
            (0xb, 0, [0, 1, 0x100, 0]),
            (0xb, 1, [0, 1, 0x201, 0]),
            (0x8000_0000, 0, [0x8000_0001, 0, 0, 0]),
            (0x8000_0001, 0, [0, 0, 1, 0x2010_0800]),
        ]);
        let t = table_from_bus(&mut bus, 0).unwrap();
        let has = |f: u32, i: u32| t.iter().any(|e| e.function == f && e.index == i);
        assert!(has(0, 0) && has(1, 0) && has(0xb, 0) && has(0x8000_0001, 0));
        // Leaf 4 ends with the first null cache type (sub-leaf 2).
        assert!(has(4, 0) && has(4, 1) && has(4, 2) && !has(4, 3));
        assert!(has(7, 0) && has(7, 1) && !has(7, 2));
        // Leaf 0xb ends at the first null level type (sub-leaf 2).
        assert!(has(0xb, 2) && !has(0xb, 3));
        // The hypervisor range answers max leaf 0 here: skipped.
        assert!(!t.iter().any(|e| e.function == 0x4000_0000));
        assert!(t
            .iter()
            .filter(|e| e.function == 7)
            .all(|e| e.flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX));
        // Leaves 0..=0xb: one entry each, plus the extra sub-leaves of 4 (2), 7 (1), 0xb (2).
        assert_eq!(
            t.iter().filter(|e| e.function <= 0xb).count(),
            12 + 2 + 1 + 2
        );
    }

    #[test]
    fn reports_features_the_host_lacks_but_not_dynamic_bits() {
        let wanted = vec![
            entry(1, 0, 0, [0, 0, (1 << 27) | (1 << 28) | 1, 0]),
            entry(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, [0, 1 << 5, 0, 0]),
        ];
        let supported = vec![
            entry(1, 0, 0, [0, 0, 1, 0]),
            entry(7, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, [0, 1 << 5, 0, 0]),
        ];
        let missing = unsupported_features(&wanted, &supported);
        assert_eq!(
            missing,
            vec!["CPUID.1:ECX bits 28 (mask 0x10000000)".to_string()]
        );
    }
}
