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

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, trace, warn};

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

/// How an interrupt message is delivered (ICR bits 10:8, LVT and IO-APIC
/// redirection entries use the same encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit field; `None` for the reserved encoding 0b011.
    pub fn from_bits(bits: u32) -> Option<Self> {
        Some(match bits & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            7 => Self::ExtInt,
            _ => return None,
        })
    }
}

/// Physical (APIC ID) or logical (LDR/DFR) destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestinationMode {
    Physical,
    Logical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerMode {
    Edge,
    Level,
}

/// ICR destination shorthand (bits 19:18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shorthand {
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// An interrupt message on the (virtual) APIC bus: an IPI written to an ICR,
/// or an IO-APIC redirection. Route it with [`deliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptMessage {
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    pub destination_mode: DestinationMode,
    pub trigger: TriggerMode,
    pub shorthand: Shorthand,
    /// APIC ID (physical) or logical destination (logical).
    pub destination: u8,
}

/// What a register write asks the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicOutput {
    /// An IPI was written to the ICR: route it with
    /// `deliver(apics, Some(sender_index), &msg)`.
    Ipi(InterruptMessage),
    /// EOI of a level-triggered interrupt: pass the vector to
    /// `IoApic::end_of_interrupt` (the EOI broadcast).
    EoiBroadcast { vector: u8 },
}

/// Power-on state of the processor this APIC belongs to (INIT/SIPI protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApState {
    /// Halted until a Startup IPI arrives (an AP after reset or INIT).
    WaitForSipi,
    /// Executing instructions.
    Running,
}

/// A change of processor state the machine must apply to the vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApEvent {
    /// INIT received: the vCPU stops and waits for a Startup IPI (its
    /// registers go to the INIT state when it is started).
    Init,
    /// Startup IPI received in the wait-for-SIPI state: start the vCPU in real
    /// mode at CS selector `vector << 8`, CS base `vector << 12`, IP 0
    /// (see [`startup_address`]).
    Startup { vector: u8 },
}

/// Guest-physical address at which an AP starts after a Startup IPI with
/// this vector.
pub fn startup_address(vector: u8) -> u64 {
    u64::from(vector) << 12
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

/// Timer modes of the LVT timer register (bits 18:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
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

fn vector_bit(vector: u8) -> (usize, u32) {
    (usize::from(vector >> 5), 1u32 << (vector & 31))
}

fn highest_vector(bits: &[u32; 8]) -> Option<u8> {
    (0..8).rev().find_map(|word| {
        let w = bits[word];
        (w != 0).then(|| (word * 32 + 31 - w.leading_zeros() as usize) as u8)
    })
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

    /// Takes a pending NMI (from an NMI IPI, IO-APIC NMI or LINT1); the run
    /// loop injects it with `Injection::Nmi`.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// Takes a pending ExtINT request; the run loop asks the 8259 PIC for
    /// the vector (INTA) and injects it without touching IRR/ISR.
    pub fn take_extint(&mut self) -> bool {
        std::mem::take(&mut self.extint_pending)
    }

    /// CR8 as the CPU sees it (TPR bits 7:4).
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// Mirrors a guest `mov cr8` into the TPR (CR8 bits 3:0 = TPR bits 7:4).
    pub fn set_cr8(&mut self, cr8: u64) {
        self.tpr = ((cr8 & 0xf) << 4) as u8;
    }

    /// Processor priority (SDM 11.8.3.1).
    pub fn ppr(&self) -> u8 {
        let isrv = highest_vector(&self.isr).unwrap_or(0);
        if self.tpr & 0xf0 >= isrv & 0xf0 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Highest vector in the IRR whose priority class is above the PPR: the
    /// interrupt the CPU would take now if its interrupt window is open.
    pub fn pending_vector(&self) -> Option<u8> {
        let vector = highest_vector(&self.irr)?;
        (vector & 0xf0 > self.ppr() & 0xf0).then_some(vector)
    }

    /// The CPU's interrupt acknowledge: moves [`Self::pending_vector`] from
    /// the IRR to the ISR and returns it; returns the spurious vector (SVR
    /// bits 7:0) when nothing is deliverable, like the hardware does.
    pub fn acknowledge(&mut self) -> u8 {
        match self.pending_vector() {
            Some(vector) => {
                let (word, bit) = vector_bit(vector);
                self.irr[word] &= !bit;
                self.isr[word] |= bit;
                trace!(apic = self.id, vector, "interrupt acknowledged");
                vector
            }
            None => (self.svr & 0xff) as u8,
        }
    }

    /// Accepts a fixed interrupt into the IRR. Vectors 0-15 are illegal and
    /// set ESR bit 6; a software-disabled APIC drops fixed interrupts (as
    /// KVM does). A vector already pending in the IRR coalesces.
    pub fn accept_interrupt(&mut self, vector: u8, trigger: TriggerMode) {
        if vector < 16 {
            warn!(apic = self.id, vector, "illegal vector received");
            self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        if !self.is_software_enabled() {
            debug!(
                apic = self.id,
                vector, "APIC software-disabled, interrupt dropped"
            );
            return;
        }
        let (word, bit) = vector_bit(vector);
        self.irr[word] |= bit;
        match trigger {
            TriggerMode::Level => self.tmr[word] |= bit,
            TriggerMode::Edge => self.tmr[word] &= !bit,
        }
    }

    /// Signals LINT0 (`pin` 0) or LINT1 (`pin` 1) as configured in its LVT
    /// entry: fixed vector, NMI or ExtINT; nothing if masked.
    pub fn raise_lint(&mut self, pin: u8) -> Result<(), ApicError> {
        let index = match pin {
            0 => LVT_LINT0,
            1 => LVT_LINT1,
            _ => {
                return Err(ApicError::BadLintPin {
                    apic_id: self.id,
                    pin,
                })
            }
        };
        let entry = self.lvt[index];
        if entry & LVT_MASKED != 0 {
            return Ok(());
        }
        let trigger = if entry & (1 << 15) != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        match DeliveryMode::from_bits(entry >> 8) {
            Some(DeliveryMode::Fixed) => self.accept_interrupt(entry as u8, trigger),
            Some(DeliveryMode::Nmi) => self.nmi_pending = true,
            Some(DeliveryMode::ExtInt) => self.extint_pending = true,
            other => warn!(
                apic = self.id,
                pin,
                ?other,
                "unsupported LINT delivery mode"
            ),
        }
        Ok(())
    }

    fn signal_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 {
            self.accept_interrupt_unchecked(lvt as u8);
        }
    }

    /// Sets an IRR bit for a locally generated edge interrupt (timer, error)
    /// whose vector may not be illegal-checked recursively.
    fn accept_interrupt_unchecked(&mut self, vector: u8) {
        if vector < 16 {
            // An illegal vector in an LVT entry: record it, but do not raise
            // another error interrupt (which could loop).
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            return;
        }
        let (word, bit) = vector_bit(vector);
        self.irr[word] |= bit;
        self.tmr[word] &= !bit;
    }

    /// INIT: registers to their INIT state, processor waits for a SIPI.
    fn receive_init(&mut self) {
        debug!(apic = self.id, "INIT received");
        self.reset_registers();
        self.ap_state = ApState::WaitForSipi;
        self.ap_events.push_back(ApEvent::Init);
    }

    /// Startup IPI: honoured only in the wait-for-SIPI state (the second
    /// SIPI of the INIT-SIPI-SIPI sequence is ignored by a running CPU).
    fn receive_sipi(&mut self, vector: u8) {
        if self.ap_state == ApState::WaitForSipi {
            debug!(apic = self.id, vector, "Startup IPI received");
            self.ap_state = ApState::Running;
            self.ap_events.push_back(ApEvent::Startup { vector });
        } else {
            trace!(apic = self.id, vector, "Startup IPI ignored: CPU running");
        }
    }

    /// Whether this APIC is addressed by `destination` in `mode`.
    pub fn matches_destination(&self, destination: u8, mode: DestinationMode) -> bool {
        match mode {
            DestinationMode::Physical => {
                destination == BROADCAST_DESTINATION || destination == self.id
            }
            DestinationMode::Logical => {
                let logical_id = (self.ldr >> 24) as u8;
                if destination == BROADCAST_DESTINATION {
                    return true;
                }
                if self.dfr >> 28 == 0xf {
                    // Flat model: bitmask of up to 8 processors.
                    logical_id & destination != 0
                } else {
                    // Cluster model: cluster in bits 7:4, members in 3:0.
                    logical_id >> 4 == destination >> 4 && logical_id & destination & 0xf != 0
                }
            }
        }
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// Nanoseconds per timer count: the divide configuration register's
    /// divisor (bits 3, 1:0; 0b111 = 1, otherwise 2^(value+1)).
    fn timer_divisor(&self) -> u64 {
        let value = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4);
        if value == 7 {
            1
        } else {
            2u64 << value
        }
    }

    fn timer_expiry(&self) -> u64 {
        self.timer
            .anchor_ns
            .saturating_add(self.timer.anchor_count * self.timer_divisor())
    }

    fn timer_current_count(&self, now_ns: u64) -> u32 {
        if !self.timer.armed {
            return 0;
        }
        let divisor = self.timer_divisor();
        let expiry = self.timer_expiry();
        if now_ns < expiry {
            let elapsed = now_ns.saturating_sub(self.timer.anchor_ns) / divisor;
            return (self.timer.anchor_count - elapsed) as u32;
        }
        match self.timer_mode() {
            // A periodic timer whose expiries were not ticked (masked):
            // the count keeps cycling from the initial count.
            TimerMode::Periodic if self.timer_initial != 0 => {
                let period = u64::from(self.timer_initial) * divisor;
                let into_period = (now_ns - expiry) % period;
                (u64::from(self.timer_initial) - into_period / divisor) as u32
            }
            _ => 0,
        }
    }

    /// Virtual time at which the timer next raises an interrupt, if it is
    /// armed and its LVT entry is not masked. The run loop must call
    /// [`Self::tick`] once virtual time reaches it.
    pub fn next_deadline(&self) -> Option<u64> {
        (self.timer.armed && self.lvt[LVT_TIMER] & LVT_MASKED == 0).then(|| self.timer_expiry())
    }

    /// Advances the timer to `now_ns`: if it expired, sets the timer vector
    /// in the IRR (unless masked) and re-arms a periodic timer. Missed
    /// periods coalesce into one interrupt, like an IRR bit does.
    pub fn tick(&mut self, now_ns: u64) {
        if !self.timer.armed {
            return;
        }
        let expiry = self.timer_expiry();
        if now_ns < expiry {
            return;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            trace!(apic = self.id, vector = lvt as u8, now_ns, "timer fired");
            self.accept_interrupt_unchecked(lvt as u8);
        }
        if self.timer_mode() == TimerMode::Periodic && self.timer_initial != 0 {
            let period = u64::from(self.timer_initial) * self.timer_divisor();
            let missed = (now_ns - expiry) / period;
            self.timer.anchor_ns = expiry + missed * period;
            self.timer.anchor_count = u64::from(self.timer_initial);
        } else {
            self.timer.armed = false;
        }
    }

    /// Guest read of `data.len()` bytes at `offset` in the APIC page.
    /// On error `data` is zero-filled.
    pub fn read(&self, offset: u64, data: &mut [u8], now_ns: u64) -> Result<(), ApicError> {
        data.fill(0);
        if data.len() != 4 || offset & 0xf != 0 {
            return Err(ApicError::BadAccess {
                apic_id: self.id,
                offset,
                len: data.len(),
            });
        }
        let value = self.read_register(offset, now_ns)?;
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    fn read_register(&self, offset: u64, now_ns: u64) -> Result<u32, ApicError> {
        Ok(match offset {
            REG_ID => u32::from(self.id) << 24,
            REG_VERSION => LAPIC_VERSION,
            REG_TPR => u32::from(self.tpr),
            REG_APR | REG_RRD | REG_EOI => 0,
            REG_PPR => u32::from(self.ppr()),
            REG_LDR => self.ldr,
            REG_DFR => self.dfr | 0x0fff_ffff,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr[((offset - REG_ISR) / 16) as usize],
            0x180..=0x1f0 => self.tmr[((offset - REG_TMR) / 16) as usize],
            0x200..=0x270 => self.irr[((offset - REG_IRR) / 16) as usize],
            REG_ESR => self.esr,
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH => self.icr_high,
            REG_LVT_TIMER => self.lvt[LVT_TIMER],
            REG_LVT_THERMAL => self.lvt[LVT_THERMAL],
            REG_LVT_PERF => self.lvt[LVT_PERF],
            REG_LVT_LINT0 => self.lvt[LVT_LINT0],
            REG_LVT_LINT1 => self.lvt[LVT_LINT1],
            REG_LVT_ERROR => self.lvt[LVT_ERROR],
            REG_TIMER_INITIAL => self.timer_initial,
            REG_TIMER_CURRENT => self.timer_current_count(now_ns),
            REG_TIMER_DIVIDE => self.timer_divide,
            _ => {
                return Err(ApicError::UnknownRegister {
                    apic_id: self.id,
                    offset,
                })
            }
        })
    }

    /// Guest write of `data` at `offset` in the APIC page. Returns what the
    /// machine must route (an IPI, or an EOI broadcast to the IO-APIC).
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        now_ns: u64,
    ) -> Result<Option<ApicOutput>, ApicError> {
        if data.len() != 4 || offset & 0xf != 0 {
            return Err(ApicError::BadAccess {
                apic_id: self.id,
                offset,
                len: data.len(),
            });
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        trace!(apic = self.id, offset, value, "write");
        // Anything that changes the timer's configuration first settles
        // expiries up to now under the old configuration.
        self.tick(now_ns);
        match offset {
            REG_ID => self.id = (value >> 24) as u8,
            REG_TPR => self.tpr = value as u8,
            REG_EOI => return Ok(self.end_of_interrupt()),
            REG_LDR => self.ldr = value & 0xff00_0000,
            REG_DFR => self.dfr = value | 0x0fff_ffff,
            REG_SVR => {
                self.svr = value & SVR_WRITE_MASK;
                if !self.is_software_enabled() {
                    // A software-disabled APIC masks all LVT entries.
                    for entry in &mut self.lvt {
                        *entry |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            REG_ICR_LOW => {
                self.icr_low = value & ICR_LOW_WRITE_MASK;
                return Ok(self.send_ipi());
            }
            REG_ICR_HIGH => self.icr_high = value & ICR_HIGH_WRITE_MASK,
            REG_LVT_TIMER => self.write_lvt(LVT_TIMER, value),
            REG_LVT_THERMAL => self.write_lvt(LVT_THERMAL, value),
            REG_LVT_PERF => self.write_lvt(LVT_PERF, value),
            REG_LVT_LINT0 => self.write_lvt(LVT_LINT0, value),
            REG_LVT_LINT1 => self.write_lvt(LVT_LINT1, value),
            REG_LVT_ERROR => self.write_lvt(LVT_ERROR, value),
            REG_TIMER_INITIAL => {
                if self.timer_mode() == TimerMode::TscDeadline {
                    warn!(
                        apic = self.id,
                        "TSC-deadline timer mode is not supported; initial count ignored"
                    );
                    return Ok(None);
                }
                self.timer_initial = value;
                self.timer = TimerState {
                    armed: value != 0,
                    anchor_ns: now_ns,
                    anchor_count: u64::from(value),
                };
            }
            REG_TIMER_DIVIDE => {
                // Keep counting from the current count at the new rate.
                let current = self.timer_current_count(now_ns);
                self.timer_divide = value & 0xb;
                if self.timer.armed {
                    self.timer.anchor_ns = now_ns;
                    self.timer.anchor_count = u64::from(current);
                }
            }
            REG_VERSION | REG_APR | REG_PPR | REG_RRD | REG_TIMER_CURRENT | 0x100..=0x270 => {
                return Err(ApicError::ReadOnly {
                    apic_id: self.id,
                    offset,
                    value,
                })
            }
            _ => {
                self.esr_pending |= ESR_ILLEGAL_REGISTER;
                return Err(ApicError::UnknownRegister {
                    apic_id: self.id,
                    offset,
                });
            }
        }
        Ok(None)
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let mut entry = value & LVT_WRITE_MASK[index];
        if !self.is_software_enabled() {
            entry |= LVT_MASKED;
        }
        // Remote IRR (LINT, bit 14) is kept from the current value.
        entry |= self.lvt[index] & !LVT_WRITE_MASK[index] & (1 << 14);
        self.lvt[index] = entry;
        if index == LVT_TIMER && self.timer_mode() == TimerMode::TscDeadline {
            warn!(apic = self.id, "guest selected TSC-deadline timer mode, which is not supported (CPUID does not advertise it)");
        }
    }

    /// EOI: clears the highest ISR bit; a level-triggered vector is
    /// broadcast to the IO-APIC.
    fn end_of_interrupt(&mut self) -> Option<ApicOutput> {
        let vector = highest_vector(&self.isr)?;
        let (word, bit) = vector_bit(vector);
        self.isr[word] &= !bit;
        trace!(apic = self.id, vector, "EOI");
        (self.tmr[word] & bit != 0).then_some(ApicOutput::EoiBroadcast { vector })
    }

    /// Decodes the ICR into an interrupt message.
    fn send_ipi(&mut self) -> Option<ApicOutput> {
        let low = self.icr_low;
        let vector = low as u8;
        let Some(delivery_mode) = DeliveryMode::from_bits(low >> 8) else {
            warn!(
                apic = self.id,
                icr = low,
                "IPI with reserved delivery mode dropped"
            );
            return None;
        };
        let destination_mode = if low & (1 << 11) != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        };
        let level_assert = low & (1 << 14) != 0;
        let trigger = if low & (1 << 15) != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        let shorthand = match (low >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        if delivery_mode == DeliveryMode::Init && trigger == TriggerMode::Level && !level_assert {
            // INIT level de-assert: no effect on anything since the P4.
            trace!(apic = self.id, "INIT level de-assert ignored");
            return None;
        }
        if matches!(
            delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) && vector < 16
        {
            warn!(apic = self.id, vector, "IPI with illegal vector not sent");
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
            return None;
        }
        let message = InterruptMessage {
            vector,
            delivery_mode,
            destination_mode,
            trigger,
            shorthand,
            destination: (self.icr_high >> 24) as u8,
        };
        debug!(apic = self.id, ?message, "IPI");
        Some(ApicOutput::Ipi(message))
    }

    /// Applies one message addressed to this APIC.
    fn receive(&mut self, message: &InterruptMessage) {
        match message.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_interrupt(message.vector, message.trigger)
            }
            DeliveryMode::Nmi => self.nmi_pending = true,
            DeliveryMode::ExtInt => self.extint_pending = true,
            DeliveryMode::Init => self.receive_init(),
            DeliveryMode::StartUp => self.receive_sipi(message.vector),
            DeliveryMode::Smi => warn!(apic = self.id, "SMI is not supported, dropped"),
        }
    }
}

/// Routes an interrupt message to the APICs it addresses. `sender` is the
/// index in `apics` of the APIC whose ICR was written (needed for the
/// self and all-excluding-self shorthands); `None` for IO-APIC messages.
/// Returns the indexes of the APICs that received it, in slice order.
pub fn deliver(
    apics: &mut [LocalApic],
    sender: Option<usize>,
    message: &InterruptMessage,
) -> Vec<usize> {
    let mut targets: Vec<usize> = (0..apics.len())
        .filter(|&i| match message.shorthand {
            Shorthand::None => {
                apics[i].matches_destination(message.destination, message.destination_mode)
            }
            Shorthand::SelfOnly => Some(i) == sender,
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => Some(i) != sender,
        })
        .collect();
    if message.delivery_mode == DeliveryMode::LowestPriority {
        targets.truncate(1);
    }
    if targets.is_empty() {
        debug!(?message, "interrupt message addressed no APIC");
    }
    for &i in &targets {
        apics[i].receive(message);
    }
    targets
}

#[cfg(test)]
mod tests {
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
        let Some(ApicOutput::Ipi(init)) = write32(&mut apics[0], REG_ICR_LOW, 0x0000_c500, 0)
        else {
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
}
