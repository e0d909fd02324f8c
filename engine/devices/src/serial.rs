// SPDX-License-Identifier: GPL-2.0-or-later
//! The 8250/16550 console UART at 0x3f8 (vm-superio's model), with its output
//! captured for the run summary (a [`ConsoleBuffer`]: counted and hashed
//! whole, its most recent bytes held) and optionally streamed to the
//! terminal.

use crate::console::ConsoleBuffer;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::io::Write;
use std::rc::Rc;
use vm_superio::{Serial, SerialState, Trigger};

/// Where streamed console output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleSink {
    None,
    Stdout,
    Stderr,
}

/// Captures every byte the guest writes to the console.
#[derive(Debug)]
pub struct ConsoleCapture {
    pub buffer: ConsoleBuffer,
    sink: ConsoleSink,
}

impl Write for ConsoleCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer.push(buf);
        // The terminal is a convenience: a closed pipe must not stop the guest.
        let _ = match self.sink {
            ConsoleSink::None => Ok(()),
            ConsoleSink::Stdout => std::io::stdout().write_all(buf),
            ConsoleSink::Stderr => std::io::stderr().write_all(buf),
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = match self.sink {
            ConsoleSink::None => Ok(()),
            ConsoleSink::Stdout => std::io::stdout().flush(),
            ConsoleSink::Stderr => std::io::stderr().flush(),
        };
        Ok(())
    }
}

/// Records that the UART raised its interrupt; the machine turns it into an
/// edge on ISA IRQ 4.
#[derive(Debug, Clone, Default)]
pub struct IrqFlag(pub Rc<Cell<bool>>);

impl Trigger for IrqFlag {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(true);
        Ok(())
    }
}

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u8 = 4;

/// The UART state a snapshot stores: vm-superio's [`SerialState`] (which
/// has no serde impl, so its fields are mirrored here) plus the interrupt
/// the UART raised and the machine has not yet taken. The captured console
/// output is not device state and is not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// Divisor latch, low byte (DLL).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub baud_divisor_high: u8,
    /// Interrupt enable register (IER).
    pub interrupt_enable: u8,
    /// Interrupt identification register (IIR).
    pub interrupt_identification: u8,
    /// Line control register (LCR; bit 7 selects the divisor latch).
    pub line_control: u8,
    /// Line status register (LSR).
    pub line_status: u8,
    /// Modem control register (MCR).
    pub modem_control: u8,
    /// Modem status register (MSR).
    pub modem_status: u8,
    /// Scratch register (SCR).
    pub scratch: u8,
    /// Received bytes the guest has not read yet (the receive FIFO).
    pub in_buffer: Vec<u8>,
    /// The UART's trigger fired and [`SerialConsole::take_irq`] has not
    /// consumed it yet.
    pub irq_raised: bool,
}

impl SerialConsoleState {
    fn to_superio(&self) -> SerialState {
        SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
    }
}

pub struct SerialConsole {
    uart: Serial<IrqFlag, vm_superio::serial::NoEvents, ConsoleCapture>,
    irq: IrqFlag,
}

impl SerialConsole {
    pub fn new(sink: ConsoleSink) -> SerialConsole {
        let irq = IrqFlag::default();
        SerialConsole {
            uart: Serial::new(
                irq.clone(),
                ConsoleCapture {
                    buffer: ConsoleBuffer::new(),
                    sink,
                },
            ),
            irq,
        }
    }

    pub fn pio_read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    pub fn pio_write(&mut self, port: u16, value: u8) {
        // Infallible trigger; output errors are swallowed by the capture.
        let _ = self.uart.write((port - COM1_BASE) as u8, value);
    }

    /// Whether the UART raised its interrupt since the last call.
    pub fn take_irq(&mut self) -> bool {
        self.irq.0.replace(false)
    }

    /// The level of the UART's interrupt output: an identified interrupt
    /// whose source is enabled in IER. A 16550's INTR pin is a level, and
    /// the 8250 driver depends on it: it turns THRE interrupts off and on
    /// again without reading IIR in between, expecting a new edge, which
    /// vm-superio's trigger (fired only when the IIR bit was clear) does
    /// not give.
    pub fn irq_level(&self) -> bool {
        let st = self.uart.state();
        let iir = st.interrupt_identification;
        let ier = st.interrupt_enable;
        iir & 0x01 == 0
            && ((iir & 0x02 != 0 && ier & 0x02 != 0) || (iir & 0x04 != 0 && ier & 0x01 != 0))
    }

    /// The console output so far.
    pub fn output(&self) -> &ConsoleBuffer {
        &self.uart.writer().buffer
    }

    pub fn state(&self) -> SerialConsoleState {
        let st = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer,
            irq_raised: self.irq.0.get(),
        }
    }

    /// Loads the UART registers from a snapshot. The console output
    /// captured so far, and where it streams, stay as they are. On error
    /// (a receive FIFO over vm-superio's 64 bytes) nothing changes.
    pub fn restore(&mut self, state: &SerialConsoleState) -> Result<(), String> {
        let sink = self.uart.writer().sink;
        let mut uart = Serial::from_state(
            &state.to_superio(),
            self.irq.clone(),
            vm_superio::serial::NoEvents,
            ConsoleCapture {
                buffer: ConsoleBuffer::new(),
                sink,
            },
        )
        .map_err(|e| format!("in_buffer of {} bytes: {e}", state.in_buffer.len()))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        // from_state may have fired the trigger; the saved flag is the truth.
        self.irq.0.set(state.irq_raised);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_raises_thre_interrupt() {
        let mut s = SerialConsole::new(ConsoleSink::None);
        assert!(!s.irq_level());
        s.pio_write(0x3f9, 0x02); // IER: THR empty
        assert!(s.irq_level());
        // Reading IIR acknowledges the THRE interrupt.
        assert_eq!(s.pio_read(0x3fa) & 0x0f, 0x02);
        assert!(!s.irq_level());
        s.pio_write(0x3f8, b'h');
        assert!(s.irq_level(), "a transmitted byte raises THRE again");
        s.pio_write(0x3f8, b'i');
        assert_eq!(s.output().held(), b"hi");
        s.pio_write(0x3f9, 0x00);
        assert!(!s.irq_level(), "masked in IER");
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = SerialConsole::new(ConsoleSink::None);
        // 115200 8N1 as Linux's 8250 driver sets it: DLAB, divisor 1, LCR 3.
        s.pio_write(0x3fb, 0x80);
        s.pio_write(0x3f8, 0x01);
        s.pio_write(0x3f9, 0x00);
        s.pio_write(0x3fb, 0x03);
        s.pio_write(0x3fc, 0x0b); // MCR: DTR, RTS, OUT2
        s.pio_write(0x3ff, 0xa5); // scratch
        s.pio_write(0x3f9, 0x02); // IER: THR empty
        s.pio_write(0x3f8, b'x');
        let state = s.state();
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["line_control"], 0x03);
        assert_eq!(json["baud_divisor_low"], 0x01);
        assert_eq!(json["interrupt_enable"], 0x02);
        assert_eq!(json["modem_control"], 0x0b);
        assert_eq!(json["scratch"], 0xa5);
        assert_eq!(json["irq_raised"], true);
        assert!(json.get("bytes").is_none(), "console output is not state");
        let back: SerialConsoleState = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);

        let mut fresh = SerialConsole::new(ConsoleSink::None);
        fresh.pio_write(0x3f8, b'o');
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.state(), state);
        assert_eq!(fresh.irq_level(), s.irq_level());
        assert_eq!(
            fresh.output().held(),
            b"o",
            "restore keeps this run's output"
        );
        assert_eq!(fresh.pio_read(0x3ff), 0xa5);
    }

    #[test]
    fn restore_rejects_overfull_fifo_and_changes_nothing() {
        let mut s = SerialConsole::new(ConsoleSink::None);
        s.pio_write(0x3ff, 0x11);
        let mut state = s.state();
        state.scratch = 0x22;
        state.in_buffer = vec![0; 65];
        let err = s.restore(&state).unwrap_err();
        assert!(err.contains("in_buffer of 65 bytes"), "{err}");
        assert_eq!(s.pio_read(0x3ff), 0x11);
    }
}
