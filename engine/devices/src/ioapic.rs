// SPDX-License-Identifier: GPL-2.0-or-later
//! I/O APIC (82093AA-style, version 0x11) with 24 redirection entries,
//! IOREGSEL at [`IOAPIC_BASE`] + 0x00 and IOWIN at + 0x10.
//!
//! Devices drive input lines with [`IoApic::set_irq`]; an unmasked entry
//! turns an assertion into an [`InterruptMessage`] that the machine routes to
//! the local APICs with `lapic::deliver(apics, None, &msg)`.
//!
//! * Edge-triggered entries deliver on each rising edge of the line. An edge
//!   on a masked entry is lost (as the 82093AA datasheet specifies).
//! * Level-triggered entries deliver while the line is asserted and the
//!   remote IRR bit is clear, and set remote IRR. The local APIC's EOI of a
//!   level-triggered vector (its `ApicOutput::EoiBroadcast`) must be passed
//!   to [`IoApic::end_of_interrupt`], which clears remote IRR and re-delivers
//!   if the line is still asserted.
//!
//! `level` in `set_irq` is the logical state (true = asserted); the entry's
//! polarity bit is stored for the guest but not applied, because the
//! machine's devices report assertion, not electrical levels.
//!
//! Wiring the machine is expected to use, matching the MP table written by
//! `machine::mptable`: ISA IRQ n on pin n, except the PIT (IRQ 0) on pin 2;
//! UART (IRQ 4) on pin 4; virtio-mmio devices on pins 5 and up
//! (`virtio_mmio.device=4K@0xd0000000:5`). The pins are edge-triggered,
//! active-high (ISA conforming) unless the guest reprograms them.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, trace, warn};

use super::lapic::{DeliveryMode, DestinationMode, InterruptMessage, Shorthand, TriggerMode};

/// Guest-physical base of the IO-APIC registers.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the MMIO window (only the first 0x20 bytes hold registers).
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of input pins / redirection entries.
pub const IOAPIC_NUM_PINS: usize = 24;
/// Version register: version 0x11, maximum redirection entry 23.
pub const IOAPIC_VERSION: u32 = ((IOAPIC_NUM_PINS as u32 - 1) << 16) | 0x11;

/// An interrupt message produced by a redirection entry (shorthand is always
/// [`Shorthand::None`]).
pub type Delivery = InterruptMessage;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION_BASE: u8 = 0x10;

const RTE_MASKED: u64 = 1 << 16;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_DEST_LOGICAL: u64 = 1 << 11;
/// Guest-writable bits: vector, delivery mode, destination mode, polarity,
/// trigger mode, mask, destination. Delivery status (12) and remote IRR (14)
/// are read-only.
const RTE_WRITE_MASK: u64 = 0xff00_0000_0001_afff;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IoApicError {
    #[error("IO-APIC: {len}-byte access at offset {offset:#x}; expected a 4-byte access to IOREGSEL (0x0) or IOWIN (0x10)")]
    BadAccess { offset: u64, len: usize },
    #[error("IO-APIC: IOWIN access to register index {index:#x} selected in IOREGSEL; expected 0x0-0x2 or 0x10-{last:#x}", last = 0x10 + 2 * IOAPIC_NUM_PINS - 1)]
    UnknownRegister { index: u8 },
    #[error("IO-APIC: register index {index:#x} is read-only, write of {value:#x} dropped")]
    ReadOnly { index: u8, value: u32 },
    #[error("IO-APIC: input line {line} does not exist (expected 0-{max})", max = IOAPIC_NUM_PINS - 1)]
    BadLine { line: usize },
}

/// The IO-APIC. Plain data (serde) so a snapshot can store it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApic {
    id: u8,
    ioregsel: u8,
    redirection: Vec<u64>,
    /// Current (logical) state of each input line, bit per pin.
    line_asserted: u32,
}

impl IoApic {
    /// An IO-APIC with this ID (use the ID the MP table announces) and all
    /// entries masked, as after reset.
    pub fn new(id: u8) -> Self {
        IoApic {
            id,
            ioregsel: 0,
            redirection: vec![RTE_MASKED; IOAPIC_NUM_PINS],
            line_asserted: 0,
        }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Redirection entry of `pin` as the guest programmed it.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// Guest read of the MMIO window. On error `data` is zero-filled.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), IoApicError> {
        data.fill(0);
        if data.len() != 4 {
            return Err(IoApicError::BadAccess {
                offset,
                len: data.len(),
            });
        }
        let value = match offset {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_register(self.ioregsel)?,
            // 0x40 is the EOI register of version 0x20 IO-APICs only.
            _ => {
                return Err(IoApicError::BadAccess {
                    offset,
                    len: data.len(),
                })
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    fn read_register(&self, index: u8) -> Result<u32, IoApicError> {
        Ok(match index {
            REG_ID => u32::from(self.id) << 24,
            REG_VERSION => IOAPIC_VERSION,
            REG_ARBITRATION => u32::from(self.id & 0xf) << 24,
            _ => {
                let (pin, high) = Self::redirection_index(index)?;
                let entry = self.redirection[pin];
                if high {
                    (entry >> 32) as u32
                } else {
                    entry as u32
                }
            }
        })
    }

    fn redirection_index(index: u8) -> Result<(usize, bool), IoApicError> {
        let rel = usize::from(index.wrapping_sub(REG_REDIRECTION_BASE));
        if index < REG_REDIRECTION_BASE || rel >= 2 * IOAPIC_NUM_PINS {
            return Err(IoApicError::UnknownRegister { index });
        }
        Ok((rel / 2, rel % 2 == 1))
    }

    /// Guest write of the MMIO window. Unmasking a level-triggered entry
    /// whose line is asserted delivers at once: the returned messages must
    /// be routed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<Vec<Delivery>, IoApicError> {
        if data.len() != 4 {
            return Err(IoApicError::BadAccess {
                offset,
                len: data.len(),
            });
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            IOREGSEL => {
                self.ioregsel = value as u8;
                Ok(Vec::new())
            }
            IOWIN => self.write_register(self.ioregsel, value),
            _ => Err(IoApicError::BadAccess {
                offset,
                len: data.len(),
            }),
        }
    }

    fn write_register(&mut self, index: u8, value: u32) -> Result<Vec<Delivery>, IoApicError> {
        match index {
            REG_ID => {
                self.id = (value >> 24) as u8;
                Ok(Vec::new())
            }
            REG_VERSION | REG_ARBITRATION => Err(IoApicError::ReadOnly { index, value }),
            _ => {
                let (pin, high) = Self::redirection_index(index)?;
                let old = self.redirection[pin];
                let new_bits = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                let mut entry = (new_bits & RTE_WRITE_MASK) | (old & RTE_REMOTE_IRR);
                if entry & RTE_LEVEL == 0 {
                    entry &= !RTE_REMOTE_IRR;
                }
                self.redirection[pin] = entry;
                trace!(pin, entry, "IO-APIC redirection entry written");
                Ok(self.service_level(pin).into_iter().collect())
            }
        }
    }

    /// Drives input `line` to `level` (true = asserted). Returns the message
    /// to route, if the change produces one.
    pub fn set_irq(&mut self, line: usize, level: bool) -> Result<Option<Delivery>, IoApicError> {
        if line >= IOAPIC_NUM_PINS {
            return Err(IoApicError::BadLine { line });
        }
        let bit = 1u32 << line;
        let was_asserted = self.line_asserted & bit != 0;
        if level {
            self.line_asserted |= bit;
        } else {
            self.line_asserted &= !bit;
        }
        let entry = self.redirection[line];
        if entry & RTE_LEVEL != 0 {
            return Ok(self.service_level(line));
        }
        if level && !was_asserted {
            if entry & RTE_MASKED != 0 {
                trace!(line, "edge on masked IO-APIC pin dropped");
                return Ok(None);
            }
            return Ok(Some(Self::message(entry)));
        }
        Ok(None)
    }

    /// EOI broadcast from a local APIC for `vector`: clears remote IRR of
    /// the level-triggered entries with that vector and re-delivers those
    /// whose line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) -> Vec<Delivery> {
        let mut deliveries = Vec::new();
        for pin in 0..IOAPIC_NUM_PINS {
            let entry = self.redirection[pin];
            if entry as u8 == vector && entry & RTE_LEVEL != 0 && entry & RTE_REMOTE_IRR != 0 {
                self.redirection[pin] &= !RTE_REMOTE_IRR;
                debug!(pin, vector, "IO-APIC EOI");
                deliveries.extend(self.service_level(pin));
            }
        }
        deliveries
    }

    /// Delivers a level-triggered pin if asserted, unmasked and not already
    /// in service (remote IRR clear).
    fn service_level(&mut self, pin: usize) -> Option<Delivery> {
        let entry = self.redirection[pin];
        let asserted = self.line_asserted & (1 << pin) != 0;
        if entry & RTE_LEVEL == 0
            || !asserted
            || entry & RTE_MASKED != 0
            || entry & RTE_REMOTE_IRR != 0
        {
            return None;
        }
        self.redirection[pin] |= RTE_REMOTE_IRR;
        Some(Self::message(entry))
    }

    fn message(entry: u64) -> Delivery {
        let delivery_mode = DeliveryMode::from_bits((entry >> 8) as u32).unwrap_or_else(|| {
            warn!(
                entry,
                "IO-APIC entry with reserved delivery mode, delivered as fixed"
            );
            DeliveryMode::Fixed
        });
        InterruptMessage {
            vector: entry as u8,
            delivery_mode,
            destination_mode: if entry & RTE_DEST_LOGICAL != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            trigger: if entry & RTE_LEVEL != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            shorthand: Shorthand::None,
            destination: (entry >> 56) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lapic::{deliver, ApicOutput, LocalApic};

    fn select_write(ioapic: &mut IoApic, index: u8, value: u32) -> Vec<Delivery> {
        ioapic
            .write(IOREGSEL, &u32::from(index).to_le_bytes())
            .unwrap();
        ioapic.write(IOWIN, &value.to_le_bytes()).unwrap()
    }

    fn select_read(ioapic: &mut IoApic, index: u8) -> u32 {
        ioapic
            .write(IOREGSEL, &u32::from(index).to_le_bytes())
            .unwrap();
        let mut buf = [0u8; 4];
        ioapic.read(IOWIN, &mut buf).unwrap();
        u32::from_le_bytes(buf)
    }

    #[test]
    fn identification_registers() {
        let mut ioapic = IoApic::new(4);
        assert_eq!(select_read(&mut ioapic, REG_ID), 4 << 24);
        assert_eq!(select_read(&mut ioapic, REG_VERSION), 0x0017_0011);
        assert_eq!(select_read(&mut ioapic, 0x10), RTE_MASKED as u32);
        assert_eq!(select_read(&mut ioapic, 0x3f), 0);
        ioapic.write(IOREGSEL, &0x40u32.to_le_bytes()).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(
            ioapic.read(IOWIN, &mut buf),
            Err(IoApicError::UnknownRegister { index: 0x40 })
        );
        assert!(ioapic.read(0x20, &mut buf).is_err());
        assert!(ioapic.write(IOWIN, &[0; 2]).is_err());
        assert_eq!(
            ioapic.set_irq(24, true),
            Err(IoApicError::BadLine { line: 24 })
        );
    }

    #[test]
    fn edge_delivery_and_mask() {
        let mut ioapic = IoApic::new(0);
        // Masked: nothing.
        assert_eq!(ioapic.set_irq(4, true).unwrap(), None);
        ioapic.set_irq(4, false).unwrap();
        // Pin 4 -> vector 0x24, physical destination 1.
        select_write(&mut ioapic, 0x10 + 2 * 4 + 1, 1 << 24);
        select_write(&mut ioapic, 0x10 + 2 * 4, 0x24);
        let msg = ioapic.set_irq(4, true).unwrap().unwrap();
        assert_eq!(msg.vector, 0x24);
        assert_eq!(msg.destination, 1);
        assert_eq!(msg.trigger, TriggerMode::Edge);
        assert_eq!(msg.destination_mode, DestinationMode::Physical);
        // Staying high is no new edge.
        assert_eq!(ioapic.set_irq(4, true).unwrap(), None);
        ioapic.set_irq(4, false).unwrap();
        assert!(ioapic.set_irq(4, true).unwrap().is_some());
    }

    #[test]
    fn level_remote_irr_and_eoi() {
        let mut apics = vec![LocalApic::new(0)];
        apics[0].write(0xf0, &0x1ffu32.to_le_bytes(), 0).unwrap();
        let mut ioapic = IoApic::new(1);
        // Pin 5: vector 0x35, level, masked for now, logical destination 0x01.
        select_write(&mut ioapic, 0x10 + 2 * 5 + 1, 0x01 << 24);
        select_write(
            &mut ioapic,
            0x10 + 2 * 5,
            0x35 | (1 << 15) | (1 << 16) | (1 << 11),
        );
        apics[0]
            .write(0xd0, &(1u32 << 24).to_le_bytes(), 0)
            .unwrap();
        assert_eq!(ioapic.set_irq(5, true).unwrap(), None);
        // Unmasking with the line asserted delivers.
        let msgs = select_write(&mut ioapic, 0x10 + 2 * 5, 0x35 | (1 << 15) | (1 << 11));
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].trigger, TriggerMode::Level);
        assert_ne!(
            select_read(&mut ioapic, 0x10 + 2 * 5) & (1 << 14),
            0,
            "remote IRR set"
        );
        assert_eq!(deliver(&mut apics, None, &msgs[0]), vec![0]);
        assert_eq!(apics[0].acknowledge(), 0x35);
        // Still asserted but in service: no new delivery.
        assert_eq!(ioapic.set_irq(5, true).unwrap(), None);
        // EOI from the LAPIC is broadcast; the line is still high: re-delivery.
        let out = apics[0].write(0xb0, &[0; 4], 0).unwrap();
        assert_eq!(out, Some(ApicOutput::EoiBroadcast { vector: 0x35 }));
        let again = ioapic.end_of_interrupt(0x35);
        assert_eq!(again.len(), 1);
        // Device deasserts; EOI clears remote IRR without re-delivery.
        ioapic.set_irq(5, false).unwrap();
        assert!(ioapic.end_of_interrupt(0x35).is_empty());
        assert_eq!(select_read(&mut ioapic, 0x10 + 2 * 5) & (1 << 14), 0);
        // Read-only bits cannot be set by the guest.
        select_write(
            &mut ioapic,
            0x10 + 2 * 5,
            0x35 | (1 << 15) | (1 << 14) | (1 << 12),
        );
        assert_eq!(
            select_read(&mut ioapic, 0x10 + 2 * 5) & ((1 << 14) | (1 << 12)),
            0
        );
    }
}
