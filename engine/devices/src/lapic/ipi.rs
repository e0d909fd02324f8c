// SPDX-License-Identifier: GPL-2.0-or-later
//! Interrupt messages on the APIC bus: their types, ICR decoding, routing
//! with [`deliver`], and the INIT/Startup IPI protocol.

use serde::{Deserialize, Serialize};
use tracing::{debug, trace, warn};

use super::{LocalApic, BROADCAST_DESTINATION, ESR_SEND_ILLEGAL_VECTOR};

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

impl LocalApic {
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

    /// Decodes the ICR into an interrupt message.
    pub(super) fn send_ipi(&mut self) -> Option<ApicOutput> {
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
