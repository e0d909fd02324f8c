// SPDX-License-Identifier: GPL-2.0-or-later
//! Unit tests of the local APIC model.

use super::*;

fn write32(apic: &mut LocalApic, offset: u64, value: u32, now: u64) -> Option<ApicOutput> {
    apic.write(offset, &value.to_le_bytes(), now).unwrap()
}

fn read32(apic: &LocalApic, offset: u64, now: u64) -> u32 {
    let mut buf = [0u8; 4];
    apic.read(offset, &mut buf, now).unwrap();
    u32::from_le_bytes(buf)
}

fn enabled_apic(id: u8) -> LocalApic {
    let mut apic = LocalApic::new(id);
    write32(&mut apic, REG_SVR, SVR_ENABLE | 0xff, 0);
    apic
}

#[test]
fn reset_values() {
    let apic = LocalApic::new(3);
    assert_eq!(read32(&apic, REG_ID, 0), 3 << 24);
    assert_eq!(read32(&apic, REG_VERSION, 0), LAPIC_VERSION);
    assert_eq!(read32(&apic, REG_SVR, 0), 0xff);
    assert_eq!(read32(&apic, REG_DFR, 0), 0xffff_ffff);
    assert_eq!(read32(&apic, REG_LVT_TIMER, 0), LVT_MASKED);
    assert_eq!(read32(&apic, REG_LVT_LINT0, 0), LVT_MASKED);
    assert!(!apic.is_software_enabled());
    assert_eq!(apic.ap_state(), ApState::Running);
    assert_eq!(LocalApic::new_ap(1).ap_state(), ApState::WaitForSipi);
}

#[test]
fn bad_accesses_are_errors() {
    let mut apic = LocalApic::new(0);
    let mut two = [0u8; 2];
    assert!(matches!(
        apic.read(REG_TPR, &mut two, 0),
        Err(ApicError::BadAccess {
            offset: 0x80,
            len: 2,
            ..
        })
    ));
    let mut four = [0xaau8; 4];
    assert!(matches!(
        apic.read(0x3f0, &mut four, 0),
        Err(ApicError::UnknownRegister { offset: 0x3f0, .. })
    ));
    assert_eq!(four, [0; 4]);
    assert!(matches!(
        apic.write(REG_VERSION, &[1, 2, 3, 4], 0),
        Err(ApicError::ReadOnly { offset: 0x30, .. })
    ));
    assert!(apic.raise_lint(2).is_err());
}

#[test]
fn priority_and_acknowledge() {
    let mut apic = enabled_apic(0);
    assert_eq!(apic.pending_vector(), None);
    apic.accept_interrupt(0x31, TriggerMode::Edge);
    apic.accept_interrupt(0x52, TriggerMode::Edge);
    assert_eq!(apic.pending_vector(), Some(0x52));
    assert_eq!(read32(&apic, REG_IRR + 0x20, 0), 1 << (0x52 - 0x40));
    assert_eq!(apic.acknowledge(), 0x52);
    assert_eq!(read32(&apic, REG_ISR + 0x20, 0), 1 << (0x52 - 0x40));
    assert_eq!(apic.ppr(), 0x50);
    // 0x31 is in a lower class than the in-service 0x52.
    assert_eq!(apic.pending_vector(), None);
    // A higher-class vector preempts.
    apic.accept_interrupt(0x61, TriggerMode::Edge);
    assert_eq!(apic.pending_vector(), Some(0x61));
    assert_eq!(apic.acknowledge(), 0x61);
    assert_eq!(write32(&mut apic, REG_EOI, 0, 0), None);
    assert_eq!(apic.ppr(), 0x50);
    write32(&mut apic, REG_EOI, 0, 0);
    assert_eq!(apic.ppr(), 0);
    assert_eq!(apic.pending_vector(), Some(0x31));
    // TPR masks the class.
    write32(&mut apic, REG_TPR, 0x30, 0);
    assert_eq!(apic.pending_vector(), None);
    assert_eq!(
        apic.acknowledge(),
        0xff,
        "spurious vector when nothing deliverable"
    );
    apic.set_cr8(2);
    assert_eq!(read32(&apic, REG_TPR, 0), 0x20);
    assert_eq!(apic.cr8(), 2);
    assert_eq!(apic.pending_vector(), Some(0x31));
}

#[test]
fn level_interrupt_eoi_is_broadcast() {
    let mut apic = enabled_apic(0);
    apic.accept_interrupt(0x40, TriggerMode::Level);
    assert_eq!(read32(&apic, REG_TMR + 0x20, 0), 1);
    assert_eq!(apic.acknowledge(), 0x40);
    assert_eq!(
        write32(&mut apic, REG_EOI, 0, 0),
        Some(ApicOutput::EoiBroadcast { vector: 0x40 })
    );
}

#[test]
fn illegal_and_disabled() {
    let mut apic = LocalApic::new(0);
    apic.accept_interrupt(0x40, TriggerMode::Edge);
    assert_eq!(apic.pending_vector(), None, "software-disabled APIC drops");
    let mut apic = enabled_apic(0);
    apic.accept_interrupt(5, TriggerMode::Edge);
    assert_eq!(read32(&apic, REG_ESR, 0), 0, "ESR latched only on write");
    write32(&mut apic, REG_ESR, 0, 0);
    assert_eq!(read32(&apic, REG_ESR, 0), ESR_RECEIVE_ILLEGAL_VECTOR);
    write32(&mut apic, REG_ESR, 0, 0);
    assert_eq!(read32(&apic, REG_ESR, 0), 0);
    // Error LVT raises its vector.
    write32(&mut apic, REG_LVT_ERROR, 0xfe, 0);
    write32(&mut apic, REG_ICR_LOW, 0x0000_0003, 0);
    assert_eq!(apic.pending_vector(), Some(0xfe));
    write32(&mut apic, REG_ESR, 0, 0);
    assert_eq!(read32(&apic, REG_ESR, 0), ESR_SEND_ILLEGAL_VECTOR);
    // Disabling masks every LVT.
    write32(&mut apic, REG_SVR, 0xff, 0);
    assert_eq!(read32(&apic, REG_LVT_ERROR, 0), 0xfe | LVT_MASKED);
    write32(&mut apic, REG_LVT_ERROR, 0xfe, 0);
    assert_eq!(read32(&apic, REG_LVT_ERROR, 0), 0xfe | LVT_MASKED);
}

#[test]
fn one_shot_timer() {
    let mut apic = enabled_apic(0);
    write32(&mut apic, REG_TIMER_DIVIDE, 0x3, 0); // divide by 16
    write32(&mut apic, REG_LVT_TIMER, 0xec, 0);
    write32(&mut apic, REG_TIMER_INITIAL, 1000, 100);
    assert_eq!(apic.next_deadline(), Some(100 + 16_000));
    assert_eq!(read32(&apic, REG_TIMER_CURRENT, 100), 1000);
    assert_eq!(read32(&apic, REG_TIMER_CURRENT, 100 + 16 * 250 + 15), 750);
    apic.tick(16_099);
    assert_eq!(apic.pending_vector(), None);
    apic.tick(16_100);
    assert_eq!(apic.pending_vector(), Some(0xec));
    assert_eq!(apic.next_deadline(), None);
    assert_eq!(read32(&apic, REG_TIMER_CURRENT, 20_000), 0);
    // Writing 0 stops an armed timer.
    write32(&mut apic, REG_TIMER_INITIAL, 10, 30_000);
    write32(&mut apic, REG_TIMER_INITIAL, 0, 30_010);
    assert_eq!(apic.next_deadline(), None);
}

#[test]
fn periodic_timer_and_divide_change() {
    let mut apic = enabled_apic(0);
    write32(&mut apic, REG_TIMER_DIVIDE, 0xb, 0); // divide by 1
    write32(&mut apic, REG_LVT_TIMER, (1 << 17) | 0xef, 0);
    write32(&mut apic, REG_TIMER_INITIAL, 1_000_000, 0);
    assert_eq!(apic.next_deadline(), Some(1_000_000));
    apic.tick(1_000_000);
    assert_eq!(apic.acknowledge(), 0xef);
    write32(&mut apic, REG_EOI, 0, 1_000_001);
    assert_eq!(apic.next_deadline(), Some(2_000_000));
    assert_eq!(read32(&apic, REG_TIMER_CURRENT, 1_500_000), 500_000);
    // Late tick: missed periods coalesce, next deadline stays on the grid.
    apic.tick(4_200_000);
    assert_eq!(apic.pending_vector(), Some(0xef));
    assert_eq!(apic.next_deadline(), Some(5_000_000));
    // Divide by 2 from here: the remaining 800_000 counts take twice as long.
    write32(&mut apic, REG_TIMER_DIVIDE, 0x0, 4_200_000);
    assert_eq!(read32(&apic, REG_TIMER_CURRENT, 4_200_000), 800_000);
    assert_eq!(apic.next_deadline(), Some(4_200_000 + 1_600_000));
}

#[test]
fn masked_timer_has_no_deadline_and_does_not_fire() {
    let mut apic = enabled_apic(0);
    write32(&mut apic, REG_LVT_TIMER, LVT_MASKED | 0xec, 0);
    write32(&mut apic, REG_TIMER_INITIAL, 100, 0);
    assert_eq!(apic.next_deadline(), None);
    // Unmasking after the masked expiry does not deliver it late.
    write32(&mut apic, REG_LVT_TIMER, 0xec, 1000);
    assert_eq!(apic.pending_vector(), None);
    assert_eq!(apic.next_deadline(), None);
}

#[test]
fn ipi_decoding_and_routing() {
    let mut apics = vec![enabled_apic(0), enabled_apic(1), enabled_apic(2)];
    // Fixed IPI, physical destination 2.
    write32(&mut apics[0], REG_ICR_HIGH, 2 << 24, 0);
    let out = write32(&mut apics[0], REG_ICR_LOW, 0x0000_4041, 0).unwrap();
    let ApicOutput::Ipi(msg) = out else {
        panic!("expected IPI, got {out:?}")
    };
    assert_eq!(msg.destination, 2);
    assert_eq!(msg.delivery_mode, DeliveryMode::Fixed);
    assert_eq!(deliver(&mut apics, Some(0), &msg), vec![2]);
    assert_eq!(apics[2].pending_vector(), Some(0x41));
    assert_eq!(read32(&apics[0], REG_ICR_LOW, 0) & (1 << 12), 0);
    // All excluding self.
    let out = write32(&mut apics[1], REG_ICR_LOW, 0x000c_0042, 0).unwrap();
    let ApicOutput::Ipi(msg) = out else { panic!() };
    assert_eq!(deliver(&mut apics, Some(1), &msg), vec![0, 2]);
    // Self.
    let out = write32(&mut apics[1], REG_ICR_LOW, 0x0004_0043, 0).unwrap();
    let ApicOutput::Ipi(msg) = out else { panic!() };
    assert_eq!(deliver(&mut apics, Some(1), &msg), vec![1]);
    // Logical flat: LDR bits select CPUs 0 and 2.
    for (i, apic) in apics.iter_mut().enumerate() {
        write32(apic, REG_LDR, (1u32 << i) << 24, 0);
    }
    write32(&mut apics[1], REG_ICR_HIGH, 0x05 << 24, 0);
    let out = write32(&mut apics[1], REG_ICR_LOW, 0x0000_0844, 0).unwrap();
    let ApicOutput::Ipi(msg) = out else { panic!() };
    assert_eq!(deliver(&mut apics, Some(1), &msg), vec![0, 2]);
    // Lowest priority goes to one APIC only.
    let out = write32(&mut apics[1], REG_ICR_LOW, 0x0000_0945, 0).unwrap();
    let ApicOutput::Ipi(msg) = out else { panic!() };
    assert_eq!(deliver(&mut apics, Some(1), &msg), vec![0]);
    // NMI.
    write32(&mut apics[0], REG_ICR_HIGH, 1 << 24, 0);
    let out = write32(&mut apics[0], REG_ICR_LOW, 0x0000_0400, 0).unwrap();
    let ApicOutput::Ipi(msg) = out else { panic!() };
    deliver(&mut apics, Some(0), &msg);
    assert!(apics[1].take_nmi());
    assert!(!apics[1].take_nmi());
    // Logical cluster model.
    let mut apic = enabled_apic(9);
    write32(&mut apic, REG_DFR, 0x0fff_ffff, 0);
    write32(&mut apic, REG_LDR, 0x32 << 24, 0);
    assert!(apic.matches_destination(0x36, DestinationMode::Logical));
    assert!(!apic.matches_destination(0x26, DestinationMode::Logical));
    assert!(!apic.matches_destination(0x31, DestinationMode::Logical));
}

#[test]
fn init_sipi_starts_an_ap() {
    let mut apics = vec![enabled_apic(0), LocalApic::new_ap(1)];
    write32(&mut apics[0], REG_ICR_HIGH, 1 << 24, 0);
    // INIT assert (level, assert).
    let Some(ApicOutput::Ipi(init)) = write32(&mut apics[0], REG_ICR_LOW, 0x0000_c500, 0) else {
        panic!()
    };
    deliver(&mut apics, Some(0), &init);
    assert_eq!(apics[1].take_ap_event(), Some(ApEvent::Init));
    // INIT de-assert produces nothing.
    assert_eq!(write32(&mut apics[0], REG_ICR_LOW, 0x0000_8500, 0), None);
    // Two SIPIs with vector 0x9a: only the first starts the CPU.
    for _ in 0..2 {
        let Some(ApicOutput::Ipi(sipi)) = write32(&mut apics[0], REG_ICR_LOW, 0x0000_069a, 0)
        else {
            panic!()
        };
        deliver(&mut apics, Some(0), &sipi);
    }
    assert_eq!(
        apics[1].take_ap_event(),
        Some(ApEvent::Startup { vector: 0x9a })
    );
    assert_eq!(apics[1].take_ap_event(), None);
    assert_eq!(apics[1].ap_state(), ApState::Running);
    assert_eq!(startup_address(0x9a), 0x9a000);
}

#[test]
fn lint_delivery() {
    let mut apic = enabled_apic(0);
    write32(&mut apic, REG_LVT_LINT0, 0x700, 0); // ExtINT
    write32(&mut apic, REG_LVT_LINT1, 0x400, 0); // NMI
    apic.raise_lint(0).unwrap();
    apic.raise_lint(1).unwrap();
    assert!(apic.take_extint());
    assert!(apic.take_nmi());
    write32(&mut apic, REG_LVT_LINT0, LVT_MASKED | 0x700, 0);
    apic.raise_lint(0).unwrap();
    assert!(!apic.take_extint());
}
