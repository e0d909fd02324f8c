// SPDX-License-Identifier: GPL-2.0-or-later
//! The 8042 keyboard controller (data port 0x60, status and command port
//! 0x64) with no keyboard and no mouse plugged in.
//!
//! vm-superio's `I8042Device` (Firecracker's) answers only the reset
//! command and reads 0 everywhere. An unmodified distribution kernel then
//! waits for the answer to "read the command byte" until its 500 ms probe
//! timeout, in a udelay loop: on the software CPU that was 0.5 G
//! instructions of Debian's cloud kernel's 2 G-instruction boot. This model
//! answers every controller command Linux's i8042 driver and its reboot
//! path send, as a PS/2 controller does: the command byte, self and
//! interface tests, the AUX loopback (with IRQ 12, which the driver tests),
//! port enable and disable, the output port, the CPU reset pulse. A byte
//! sent to the keyboard or the mouse finds no device: the controller
//! answers 0xfe with its time-out bit, and the PS/2 drivers give up at once.
//!
//! Plain data (serde), so a recording's snapshot stores it as it is.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;
/// The keyboard's ISA interrupt.
pub const KBD_IRQ: u8 = 1;
/// The mouse's (AUX port's) ISA interrupt.
pub const AUX_IRQ: u8 = 12;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Keyboard not inhibited (the keylock is open).
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;
const STATUS_TIMEOUT: u8 = 0x40;

// Command byte (CTR) bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;

/// As firmware leaves it: translation on, keyboard interrupt on, POST passed.
const INITIAL_CTR: u8 = CTR_TRANSLATE | CTR_SYSTEM | CTR_KBD_INT;
/// Output port: A20 enabled, reset line not asserted.
const INITIAL_OUTPUT_PORT: u8 = 0x03;
/// Linux's I8042_BUFFER_SIZE; a real controller holds one byte, but the
/// answers of one command are taken out before the next is sent.
const OUTPUT_CAPACITY: usize = 16;
/// What the controller answers for a device that does not respond.
const NO_DEVICE: u8 = 0xfe;

/// One byte waiting in the output buffer, with the status bits it is read
/// with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct OutputByte {
    value: u8,
    aux: bool,
    timeout: bool,
}

/// What a write asks of the machine (a write puts at most one byte in the
/// output buffer, so raises at most one interrupt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Effect {
    None,
    /// The CPU reset line was pulsed (command 0xfe, or output port bit 0
    /// cleared).
    Reset,
    /// An answer is in the output buffer with its port's interrupt enabled:
    /// this ISA IRQ is raised.
    Irq(u8),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042 {
    ctr: u8,
    output_port: u8,
    output: VecDeque<OutputByte>,
    /// A command waiting for its parameter byte on the data port.
    pending: Option<u8>,
    last_was_command: bool,
    /// The last byte read from the data port (what it reads when empty).
    last_read: u8,
}

impl Default for I8042 {
    fn default() -> Self {
        I8042::new()
    }
}

impl I8042 {
    pub fn new() -> I8042 {
        I8042 {
            ctr: INITIAL_CTR,
            output_port: INITIAL_OUTPUT_PORT,
            output: VecDeque::new(),
            pending: None,
            last_was_command: true,
            last_read: 0,
        }
    }

    pub fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if self.ctr & CTR_SYSTEM != 0 {
            s |= STATUS_SYSTEM;
        }
        if self.last_was_command {
            s |= STATUS_LAST_WAS_COMMAND;
        }
        if let Some(b) = self.output.front() {
            s |= STATUS_OUTPUT_FULL;
            if b.aux {
                s |= STATUS_AUX_DATA;
            }
            if b.timeout {
                s |= STATUS_TIMEOUT;
            }
        }
        s
    }

    pub fn pio_read(&mut self, port: u16) -> u8 {
        match port {
            DATA_PORT => {
                if let Some(b) = self.output.pop_front() {
                    self.last_read = b.value;
                }
                self.last_read
            }
            COMMAND_PORT => self.status(),
            _ => 0xff,
        }
    }

    pub fn pio_write(&mut self, port: u16, value: u8) -> I8042Effect {
        match port {
            DATA_PORT => {
                self.last_was_command = false;
                self.data(value)
            }
            COMMAND_PORT => {
                self.last_was_command = true;
                self.pending = None;
                self.command(value)
            }
            _ => I8042Effect::None,
        }
    }

    fn push(&mut self, value: u8, aux: bool, timeout: bool) -> I8042Effect {
        if self.output.len() >= OUTPUT_CAPACITY {
            return I8042Effect::None;
        }
        self.output.push_back(OutputByte {
            value,
            aux,
            timeout,
        });
        let (enabled, irq) = if aux {
            (self.ctr & CTR_AUX_INT != 0, AUX_IRQ)
        } else {
            (self.ctr & CTR_KBD_INT != 0, KBD_IRQ)
        };
        if enabled {
            I8042Effect::Irq(irq)
        } else {
            I8042Effect::None
        }
    }

    fn command(&mut self, command: u8) -> I8042Effect {
        match command {
            0x20 => return self.push(self.ctr, false, false),
            // Parameter follows: write CTR, write output port, write the
            // keyboard's or the AUX port's output buffer, send to the mouse.
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(command),
            0xa7 => self.ctr |= CTR_AUX_DISABLE,
            0xa8 => self.ctr &= !CTR_AUX_DISABLE,
            // AUX and keyboard interface tests: no error.
            0xa9 | 0xab => return self.push(0x00, false, false),
            0xaa => {
                self.ctr |= CTR_SYSTEM;
                return self.push(0x55, false, false);
            }
            0xad => self.ctr |= CTR_KBD_DISABLE,
            0xae => self.ctr &= !CTR_KBD_DISABLE,
            0xd0 => return self.push(self.output_port, false, false),
            // Pulse output lines 0-3 low; bit 0 is the CPU reset line.
            0xf0..=0xff if command & 0x01 == 0 => return I8042Effect::Reset,
            _ => {}
        }
        I8042Effect::None
    }

    fn data(&mut self, value: u8) -> I8042Effect {
        match self.pending.take() {
            Some(0x60) => self.ctr = value,
            Some(0xd1) => {
                self.output_port = value;
                if value & 0x01 == 0 {
                    return I8042Effect::Reset;
                }
            }
            Some(0xd2) => return self.push(value, false, false),
            Some(0xd3) => return self.push(value, true, false),
            Some(0xd4) => return self.push(NO_DEVICE, true, true),
            // A byte for the keyboard.
            _ => return self.push(NO_DEVICE, false, true),
        }
        I8042Effect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's `__i8042_command`: the command, its parameters, then its
    /// answers, each answer only once the status says the buffer is full.
    /// The interrupts the writes raised go to `irqs`.
    fn command_irqs(
        kbc: &mut I8042,
        command: u8,
        params: &[u8],
        answers: usize,
        irqs: &mut Vec<u8>,
    ) -> Vec<u8> {
        let mut effects = vec![kbc.pio_write(COMMAND_PORT, command)];
        for &p in params {
            effects.push(kbc.pio_write(DATA_PORT, p));
        }
        for e in effects {
            match e {
                I8042Effect::Irq(irq) => irqs.push(irq),
                I8042Effect::None => {}
                I8042Effect::Reset => panic!("command {command:#x} reset the machine"),
            }
        }
        (0..answers)
            .map(|_| {
                assert_ne!(kbc.pio_read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
                kbc.pio_read(DATA_PORT)
            })
            .collect()
    }

    /// As [`command_irqs`], checking that no interrupt was raised.
    fn command(kbc: &mut I8042, command: u8, params: &[u8], answers: usize) -> Vec<u8> {
        let mut irqs = Vec::new();
        let answers = command_irqs(kbc, command, params, answers, &mut irqs);
        assert!(irqs.is_empty(), "command {command:#x} raised {irqs:?}");
        answers
    }

    #[test]
    fn linux_probe_reads_and_writes_the_command_byte_and_finds_the_aux_port() {
        let mut kbc = I8042::new();
        // Nothing to flush, keyboard not locked, never busy.
        assert_eq!(kbc.pio_read(COMMAND_PORT) & (STATUS_OUTPUT_FULL | 0x02), 0);
        assert_ne!(kbc.pio_read(COMMAND_PORT) & STATUS_UNLOCKED, 0);
        // Answers raise IRQ 1 while firmware's command byte enables it.
        let mut irqs = Vec::new();
        assert_eq!(command_irqs(&mut kbc, 0xaa, &[], 1, &mut irqs), [0x55]);
        assert_eq!(
            command_irqs(&mut kbc, 0x20, &[], 1, &mut irqs),
            [INITIAL_CTR]
        );
        assert_eq!(irqs, [KBD_IRQ, KBD_IRQ]);
        let ctr = (INITIAL_CTR | CTR_KBD_DISABLE) & !CTR_KBD_INT;
        command(&mut kbc, 0x60, &[ctr], 0);
        assert_eq!(command(&mut kbc, 0x20, &[], 1), [ctr]);
        // AUX loopback comes back marked as AUX data.
        command(&mut kbc, 0xd3, &[0x5a], 0);
        assert_eq!(
            kbc.pio_read(COMMAND_PORT) & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            STATUS_OUTPUT_FULL | STATUS_AUX_DATA
        );
        assert_eq!(kbc.pio_read(DATA_PORT), 0x5a);
        // i8042_toggle_aux checks the disable bit through the command byte.
        command(&mut kbc, 0xa7, &[], 0);
        assert_ne!(command(&mut kbc, 0x20, &[], 1)[0] & CTR_AUX_DISABLE, 0);
        command(&mut kbc, 0xa8, &[], 0);
        assert_eq!(command(&mut kbc, 0x20, &[], 1)[0] & CTR_AUX_DISABLE, 0);
    }

    #[test]
    fn the_aux_irq_test_gets_its_interrupt() {
        let mut kbc = I8042::new();
        command(&mut kbc, 0x60, &[CTR_AUX_INT], 0);
        let mut irqs = Vec::new();
        command_irqs(&mut kbc, 0xd3, &[0xa5], 0, &mut irqs);
        assert_eq!(irqs, [AUX_IRQ]);
        assert_eq!(kbc.pio_read(DATA_PORT), 0xa5);
    }

    #[test]
    fn bytes_for_absent_devices_time_out_with_a_nak() {
        let mut kbc = I8042::new();
        command(&mut kbc, 0x60, &[CTR_KBD_INT | CTR_AUX_INT], 0);
        // atkbd's GET ID, straight to the data port.
        assert_eq!(kbc.pio_write(DATA_PORT, 0xf2), I8042Effect::Irq(KBD_IRQ));
        let status = kbc.pio_read(COMMAND_PORT);
        assert_eq!(status & (STATUS_TIMEOUT | STATUS_AUX_DATA), STATUS_TIMEOUT);
        assert_eq!(kbc.pio_read(DATA_PORT), NO_DEVICE);
        // psmouse's reset, through "write to the AUX device".
        let mut irqs = Vec::new();
        command_irqs(&mut kbc, 0xd4, &[0xff], 0, &mut irqs);
        assert_eq!(irqs, [AUX_IRQ]);
        let status = kbc.pio_read(COMMAND_PORT);
        assert_eq!(
            status & (STATUS_TIMEOUT | STATUS_AUX_DATA),
            STATUS_TIMEOUT | STATUS_AUX_DATA
        );
        assert_eq!(kbc.pio_read(DATA_PORT), NO_DEVICE);
        assert_eq!(kbc.pio_read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        // An empty buffer reads its last byte again.
        assert_eq!(kbc.pio_read(DATA_PORT), NO_DEVICE);
    }

    #[test]
    fn reset_by_pulse_or_by_output_port() {
        let mut kbc = I8042::new();
        assert_eq!(kbc.pio_write(COMMAND_PORT, 0xfe), I8042Effect::Reset);
        assert_eq!(kbc.pio_write(COMMAND_PORT, 0xff), I8042Effect::None);
        let mut irqs = Vec::new();
        assert_eq!(
            command_irqs(&mut kbc, 0xd0, &[], 1, &mut irqs),
            [INITIAL_OUTPUT_PORT]
        );
        assert_eq!(irqs, [KBD_IRQ]);
        kbc.pio_write(COMMAND_PORT, 0xd1);
        assert_eq!(kbc.pio_write(DATA_PORT, 0x02), I8042Effect::Reset);
        // A command in between cancels a pending parameter: the byte goes
        // to the (absent) keyboard instead of resetting.
        kbc.pio_write(COMMAND_PORT, 0xd1);
        kbc.pio_write(COMMAND_PORT, 0xad);
        assert_eq!(kbc.pio_write(DATA_PORT, 0x00), I8042Effect::Irq(KBD_IRQ));
    }

    #[test]
    fn the_output_buffer_is_bounded() {
        let mut kbc = I8042::new();
        for _ in 0..100 {
            kbc.pio_write(DATA_PORT, 0xf4);
        }
        let mut n = 0;
        while kbc.pio_read(COMMAND_PORT) & STATUS_OUTPUT_FULL != 0 {
            kbc.pio_read(DATA_PORT);
            n += 1;
        }
        assert_eq!(n, OUTPUT_CAPACITY);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut kbc = I8042::new();
        kbc.pio_write(COMMAND_PORT, 0x20);
        kbc.pio_write(COMMAND_PORT, 0xd3);
        let json = serde_json::to_string(&kbc).unwrap();
        let back: I8042 = serde_json::from_str(&json).unwrap();
        assert_eq!(back, kbc);
    }
}
