// SPDX-License-Identifier: GPL-2.0-or-later
//! Two cascaded 8259A interrupt controllers (ports 0x20/0x21, 0xa0/0xa1 and
//! the edge/level control registers 0x4d0/0x4d1), as Linux's i8259 driver
//! programs them: ICW1-4, IMR, specific and non-specific EOI, IRR/ISR reads,
//! auto-EOI. Priorities are fixed (IRQ 0 highest); rotation is not modelled.
//!
//! The whole model is plain data (serde), so a recording's snapshot stores
//! it as it is.

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input line levels, for edge detection.
    lines: u8,
    elcr: u8,
    vector_base: u8,
    init_step: u8,
    expect_icw4: bool,
    auto_eoi: bool,
    read_isr: bool,
}

impl Chip {
    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << irq;
        if self.elcr & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Highest-priority requested, unmasked IRQ not blocked by one in
    /// service.
    fn pending(&self) -> Option<u8> {
        let req = self.irr & !self.imr;
        (0..8).find(|i| req & (1 << i) != 0).filter(|&i| {
            let higher_or_same = ((1u16 << (i + 1)) - 1) as u8;
            self.isr & higher_or_same == 0
        })
    }

    fn ack(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
        if !self.auto_eoi {
            self.isr |= bit;
        }
    }

    fn write(&mut self, port_offset: u8, value: u8) {
        if port_offset == 0 {
            if value & 0x10 != 0 {
                // ICW1: start initialisation.
                self.init_step = 1;
                self.expect_icw4 = value & 1 != 0;
                self.imr = 0;
                self.isr = 0;
                self.irr = 0;
                self.auto_eoi = false;
                self.read_isr = false;
            } else if value & 0x08 != 0 {
                // OCW3.
                if value & 0x02 != 0 {
                    self.read_isr = value & 0x01 != 0;
                }
            } else {
                // OCW2.
                match value >> 5 {
                    1 => {
                        // Non-specific EOI: the highest-priority in-service.
                        if let Some(i) = (0..8).find(|i| self.isr & (1 << i) != 0) {
                            self.isr &= !(1 << i);
                        }
                    }
                    3 => self.isr &= !(1 << (value & 7)),
                    _ => {}
                }
            }
        } else {
            match self.init_step {
                1 => {
                    self.vector_base = value & 0xf8;
                    self.init_step = 2;
                }
                2 => {
                    self.init_step = if self.expect_icw4 { 3 } else { 0 };
                }
                3 => {
                    self.auto_eoi = value & 0x02 != 0;
                    self.init_step = 0;
                }
                _ => self.imr = value,
            }
        }
    }

    fn read(&self, port_offset: u8) -> u8 {
        if port_offset == 0 {
            if self.read_isr {
                self.isr
            } else {
                self.irr
            }
        } else {
            self.imr
        }
    }
}

/// The master/slave pair; the slave cascades into the master's IRQ 2.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Pic {
    pub fn new() -> Pic {
        Pic::default()
    }

    /// Sets the level of ISA interrupt line `irq` (0-15).
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq < 8 {
            self.master.set_line(irq, level);
        } else {
            self.slave.set_line(irq - 8, level);
        }
        self.update_cascade();
    }

    /// A rising and falling edge on `irq`.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    fn update_cascade(&mut self) {
        let level = self.slave.pending().is_some();
        self.master.set_line(2, level);
    }

    /// Whether an interrupt is waiting for the CPU.
    pub fn has_interrupt(&self) -> bool {
        self.master.pending().is_some()
    }

    /// INTA cycle: the vector of the highest-priority pending interrupt.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let irq = self.master.pending()?;
        self.master.ack(irq);
        let vector = if irq == 2 {
            match self.slave.pending() {
                Some(s) => {
                    self.slave.ack(s);
                    self.slave.vector_base + s
                }
                // Spurious IRQ 15.
                None => self.slave.vector_base + 7,
            }
        } else {
            self.master.vector_base + irq
        };
        self.update_cascade();
        Some(vector)
    }

    pub fn pio_read(&mut self, port: u16) -> u8 {
        match port {
            0x20 | 0x21 => self.master.read((port & 1) as u8),
            0xa0 | 0xa1 => self.slave.read((port & 1) as u8),
            0x4d0 => self.master.elcr,
            0x4d1 => self.slave.elcr,
            _ => 0xff,
        }
    }

    pub fn pio_write(&mut self, port: u16, value: u8) {
        match port {
            0x20 | 0x21 => self.master.write((port & 1) as u8, value),
            0xa0 | 0xa1 => self.slave.write((port & 1) as u8, value),
            0x4d0 => self.master.elcr = value & 0xf8,
            0x4d1 => self.slave.elcr = value & 0xde,
            _ => {}
        }
        self.update_cascade();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(pic: &mut Pic) {
        for (p, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            pic.pio_write(p, v);
        }
    }

    #[test]
    fn delivers_by_priority_and_eoi() {
        let mut pic = Pic::new();
        init(&mut pic);
        pic.pulse_irq(4);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        // IRQ 4 waits for the EOI of IRQ 0.
        assert_eq!(pic.acknowledge(), None);
        pic.pio_write(0x20, 0x20);
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut pic = Pic::new();
        init(&mut pic);
        // Mask IRQ 3 and 5 on the master, IRQ 12 (slave 4); level-trigger
        // IRQ 11; IRQ 4 waiting.
        pic.pio_write(0x21, 0x28);
        pic.pio_write(0xa1, 0x10);
        pic.pio_write(0x4d1, 0x08);
        pic.pulse_irq(4);
        let json = serde_json::to_value(&pic).unwrap();
        assert_eq!(json["master"]["imr"], 0x28);
        assert_eq!(json["master"]["vector_base"], 0x30);
        assert_eq!(json["master"]["irr"], 0x10);
        assert_eq!(json["slave"]["imr"], 0x10);
        assert_eq!(json["slave"]["elcr"], 0x08);
        let mut back: Pic = serde_json::from_value(json).unwrap();
        assert_eq!(back, pic);
        assert_eq!(back.acknowledge(), Some(0x34));
    }

    #[test]
    fn slave_cascades_and_mask() {
        let mut pic = Pic::new();
        init(&mut pic);
        pic.pio_write(0xa1, 0x01);
        pic.pulse_irq(8);
        assert!(!pic.has_interrupt());
        pic.pio_write(0xa1, 0x00);
        pic.pulse_irq(8);
        assert_eq!(pic.acknowledge(), Some(0x38));
    }
}
