// SPDX-License-Identifier: GPL-2.0-or-later
//! Conversions between the backend-neutral register structs of
//! [`crate::hypervisor`] and the `kvm-bindings` ones. Kept field-by-field so a
//! field added on either side shows up as a compile error here, not as state
//! silently lost between backends.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use crate::{DescriptorTable, Regs, Segment, Sregs};

pub(crate) fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(crate) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        // Bit 1 of RFLAGS is architecturally always set; KVM rejects entry
        // without it on some hosts.
        rflags: r.rflags | 0x2,
    }
}

fn segment_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn dtable_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn dtable_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

pub(crate) fn sregs_from_kvm(s: &kvm_sregs) -> Sregs {
    Sregs {
        cs: segment_from_kvm(&s.cs),
        ds: segment_from_kvm(&s.ds),
        es: segment_from_kvm(&s.es),
        fs: segment_from_kvm(&s.fs),
        gs: segment_from_kvm(&s.gs),
        ss: segment_from_kvm(&s.ss),
        tr: segment_from_kvm(&s.tr),
        ldt: segment_from_kvm(&s.ldt),
        gdt: dtable_from_kvm(&s.gdt),
        idt: dtable_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// Writes `s` over `base`, keeping `base`'s pending-interrupt bitmap (KVM's
/// own bookkeeping, which has no place in the backend-neutral struct).
pub(crate) fn sregs_to_kvm(s: &Sregs, base: &kvm_sregs) -> kvm_sregs {
    kvm_sregs {
        cs: segment_to_kvm(&s.cs),
        ds: segment_to_kvm(&s.ds),
        es: segment_to_kvm(&s.es),
        fs: segment_to_kvm(&s.fs),
        gs: segment_to_kvm(&s.gs),
        ss: segment_to_kvm(&s.ss),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldt),
        gdt: dtable_to_kvm(&s.gdt),
        idt: dtable_to_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: base.interrupt_bitmap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_round_trip_sets_reserved_rflags_bit() {
        let regs = Regs {
            rax: 1,
            r15: 15,
            rip: 0x1000,
            rflags: 0x200,
            ..Regs::default()
        };
        let back = regs_from_kvm(&regs_to_kvm(&regs));
        assert_eq!(back.rax, 1);
        assert_eq!(back.r15, 15);
        assert_eq!(back.rip, 0x1000);
        assert_eq!(back.rflags, 0x202);
    }

    #[test]
    fn sregs_round_trip_keeps_interrupt_bitmap() {
        let base = kvm_sregs {
            interrupt_bitmap: [1, 2, 3, 4],
            ..Default::default()
        };
        let sregs = Sregs {
            cs: Segment {
                selector: 0x8,
                l: true,
                present: true,
                type_: 11,
                s: true,
                ..Segment::default()
            },
            cr0: 0x8000_0011,
            efer: 0x500,
            gdt: DescriptorTable {
                base: 0x4000,
                limit: 0x37,
            },
            ..Sregs::default()
        };
        let k = sregs_to_kvm(&sregs, &base);
        assert_eq!(k.interrupt_bitmap, [1, 2, 3, 4]);
        assert_eq!(sregs_from_kvm(&k), sregs);
    }
}
