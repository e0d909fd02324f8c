// SPDX-License-Identifier: GPL-2.0-or-later
//! The 8250/16550 console UART at 0x3f8 (vm-superio's model), with its output
//! captured for the run summary and optionally streamed to the terminal.

use std::cell::Cell;
use std::io::Write;
use std::rc::Rc;
use vm_superio::{Serial, Trigger};

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
    pub bytes: Vec<u8>,
    sink: ConsoleSink,
}

impl Write for ConsoleCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(buf);
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
                    bytes: Vec::new(),
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

    pub fn output(&self) -> &[u8] {
        &self.uart.writer().bytes
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
        assert_eq!(s.output(), b"hi");
        s.pio_write(0x3f9, 0x00);
        assert!(!s.irq_level(), "masked in IER");
    }
}
