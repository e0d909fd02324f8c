// SPDX-License-Identifier: GPL-2.0-or-later
//! Local APIC in xAPIC mode (MMIO page at [`LAPIC_BASE`]), one per vCPU.
//!
//! Interrupt delivery stays in the engine: devices and IPIs set bits in the
//! IRR through [`deliver`]/[`LocalApic::accept_interrupt`], and the run loop,
//! when the vCPU's interrupt window is open, asks [`LocalApic::pending_vector`]
//! and moves the vector to the ISR with [`LocalApic::acknowledge`] before it
//! injects it with `Vcpu::inject`. Every interrupt therefore passes through the
//! engine, where the recorder can see it.
//!
//! # Time
//! The model never reads host time. Every call that depends on time takes
//! `now_ns`, the engine's virtual clock in nanoseconds (1 guest instruction =
//! 1 ns, and the TSC runs at 1 GHz). The timer's input clock (the "bus
//! clock") is [`TIMER_FREQUENCY_HZ`] = 1 GHz, divided by the divide
//! configuration register, so one timer count lasts `divisor` ns. A guest that
//! reads CPUID leaf 0x15 can be told a 1 GHz crystal (core crystal clock =
//! APIC timer clock on Intel); otherwise Linux calibrates the timer against the
//! PIT, which on the same virtual clock gives the same figure.
//! [`LocalApic::next_deadline`] is the virtual time at which the timer fires;
//! the run loop stops the vCPU there and calls [`LocalApic::tick`].
//!
//! # Not modelled
//! x2APIC, TSC-deadline mode (CPUID must not advertise either), SMI, EOI
//! broadcast suppression, the thermal and performance-counter interrupts
//! (their LVT registers are storage only), remote read, focus processor
//! checking. Lowest-priority delivery goes to the first matching APIC in the
//! slice given to [`deliver`] (deterministic; real hardware arbitrates).

mod ipi;
mod irq;
mod mmio;
#[cfg(test)]
mod tests;
mod timer;

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use ipi::{
    deliver, startup_address, ApEvent, ApState, ApicOutput, DeliveryMode, DestinationMode,
    InterruptMessage, Shorthand, TriggerMode,
};

/// Guest-physical base of the local APIC page (the reset value of the
/// IA32_APIC_BASE MSR; relocation is not supported).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Size of the local APIC MMIO window.
pub const LAPIC_SIZE: u64 = 0x1000;
/// Version register: integrated APIC version 0x14, highest LVT entry 5
/// (timer, thermal, performance counters, LINT0, LINT1, error), no
/// EOI-broadcast suppression (bit 24 clear).
pub const LAPIC_VERSION: u32 = 0x0005_0014;
/// Frequency of the timer's input clock before the divider, in Hz. Equal to
/// the virtual TSC frequency so that both agree with the virtual clock.
pub const TIMER_FREQUENCY_HZ: u64 = 1_000_000_000;

const REG_ID: u64 = 0x020;
const REG_VERSION: u64 = 0x030;
const REG_TPR: u64 = 0x080;
const REG_APR: u64 = 0x090;
const REG_PPR: u64 = 0x0a0;
const REG_EOI: u64 = 0x0b0;
const REG_RRD: u64 = 0x0c0;
const REG_LDR: u64 = 0x0d0;
const REG_DFR: u64 = 0x0e0;
const REG_SVR: u64 = 0x0f0;
const REG_ISR: u64 = 0x100;
const REG_TMR: u64 = 0x180;
const REG_IRR: u64 = 0x200;
const REG_ESR: u64 = 0x280;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_LVT_THERMAL: u64 = 0x330;
const REG_LVT_PERF: u64 = 0x340;
const REG_LVT_LINT0: u64 = 0x350;
const REG_LVT_LINT1: u64 = 0x360;
const REG_LVT_ERROR: u64 = 0x370;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;

/// Indexes into `LocalApic::lvt`.
const LVT_TIMER: usize = 0;
const LVT_THERMAL: usize = 1;
const LVT_PERF: usize = 2;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;
/// Writable bits of each LVT register (vector, delivery mode, polarity,
/// trigger, mask, timer mode); delivery status and remote IRR are read-only.
const LVT_WRITE_MASK: [u32; LVT_COUNT] = [
    0x0007_00ff, // timer: vector, mask, mode (bits 18:17)
    0x0001_07ff, // thermal
    0x0001_07ff, // performance counters
    0x0001_a7ff, // LINT0: vector, mode, polarity, trigger, mask
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error
];
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE_SHIFT: u32 = 17;

const SVR_ENABLE: u32 = 1 << 8;
/// Vector 0-7, software enable (8) and focus checking (9) are writable.
const SVR_WRITE_MASK: u32 = 0x3ff;

/// ESR bits (Intel SDM vol. 3, 11.5.3).
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// ICR low: vector, delivery mode, destination mode, level, trigger,
/// shorthand. Delivery status (bit 12) always reads 0 because an IPI is
/// delivered before the write returns.
const ICR_LOW_WRITE_MASK: u32 = 0x000c_cfff;
const ICR_HIGH_WRITE_MASK: u32 = 0xff00_0000;

/// Destination 0xff: broadcast (physical) or all processors (logical).
pub const BROADCAST_DESTINATION: u8 = 0xff;

/// Errors of a guest access to the local APIC page. The access itself is
/// harmless (reads return 0, writes are dropped); the machine logs them.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ApicError {
    #[error("local APIC {apic_id}: no register at offset {offset:#x} (expected one of the xAPIC registers between 0x20 and 0x3e0)")]
    UnknownRegister { apic_id: u8, offset: u64 },
    #[error("local APIC {apic_id}: {len}-byte access at offset {offset:#x}; expected a 4-byte access at a 16-byte-aligned register offset")]
    BadAccess {
        apic_id: u8,
        offset: u64,
        len: usize,
    },
    #[error("local APIC {apic_id}: register at offset {offset:#x} is read-only, write of {value:#x} dropped")]
    ReadOnly {
        apic_id: u8,
        offset: u64,
        value: u32,
    },
    #[error("local APIC {apic_id}: LINT pin {pin} does not exist (expected 0 or 1)")]
    BadLintPin { apic_id: u8, pin: u8 },
}

/// The timer's counting state. The count is not stored per tick: it is
/// derived from the anchor (virtual time and count value at the last
/// (re)start), so reads and deadlines are exact at any virtual time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
struct TimerState {
    armed: bool,
    anchor_ns: u64,
    anchor_count: u64,
}

/// One local APIC. State is plain data (serde) so a snapshot can store it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalApic {
    id: u8,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// Value the guest reads from the ESR (latched by the last ESR write).
    esr: u32,
    /// Errors seen since the last ESR write.
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; LVT_COUNT],
    timer_divide: u32,
    timer_initial: u32,
    timer: TimerState,
    nmi_pending: bool,
    extint_pending: bool,
    ap_state: ApState,
    ap_events: VecDeque<ApEvent>,
}

impl LocalApic {
    /// The bootstrap processor's APIC: running, registers in their reset
    /// state.
    pub fn new(apic_id: u8) -> Self {
        let mut apic = LocalApic {
            id: apic_id,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [0; LVT_COUNT],
            timer_divide: 0,
            timer_initial: 0,
            timer: TimerState::default(),
            nmi_pending: false,
            extint_pending: false,
            ap_state: ApState::Running,
            ap_events: VecDeque::new(),
        };
        apic.reset_registers();
        apic
    }

    /// An application processor's APIC: waits for INIT/Startup IPIs.
    pub fn new_ap(apic_id: u8) -> Self {
        LocalApic {
            ap_state: ApState::WaitForSipi,
            ..Self::new(apic_id)
        }
    }

    /// Register state after power-on or INIT (SDM 11.4.7.1); the APIC ID
    /// is kept.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; LVT_COUNT];
        self.timer_divide = 0;
        self.timer_initial = 0;
        self.timer = TimerState::default();
        self.nmi_pending = false;
        self.extint_pending = false;
    }

    pub fn apic_id(&self) -> u8 {
        self.id
    }

    /// SVR bit 8: the guest has enabled the APIC.
    pub fn is_software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    pub fn ap_state(&self) -> ApState {
        self.ap_state
    }

    /// Next INIT/Startup event for the machine to apply, oldest first.
    pub fn take_ap_event(&mut self) -> Option<ApEvent> {
        self.ap_events.pop_front()
    }
}
