// SPDX-License-Identifier: GPL-2.0-or-later
//! The I/O side of the PC: port and MMIO decoding to the device models,
//! CPUID and the virtual clock. Implements [`IoBus`] for the backends.

use super::cpuid::{cpuid, CpuidConfig};
use super::MachineConfig;
use crate::devices::cmos::{Cmos, DEFAULT_EPOCH};
use crate::devices::pic::Pic;
use crate::devices::pit::Pit;
use crate::devices::serial::{SerialConsole, COM1_BASE, COM1_IRQ};
use crate::hypervisor::IoBus;

/// A request from the guest to end the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    Reset,
    PowerOff,
}

pub struct Platform {
    pub pic: Pic,
    pub pit: Pit,
    pub cmos: Cmos,
    pub serial: SerialConsole,
    pub cpuid: CpuidConfig,
    /// Virtual time each vCPU spent halted, in ns.
    pub idle_ns: Vec<u64>,
    /// Instructions retired by each vCPU, as last reported by the backend.
    retired: Vec<u64>,
    pub power: Option<PowerEvent>,
    /// A device raised an interrupt during the current run: stop the vCPU
    /// after this access so the run loop can deliver it promptly.
    pub irq_raised: bool,
}

impl Platform {
    pub fn new(cfg: &MachineConfig) -> Platform {
        Platform {
            pic: Pic::new(),
            pit: Pit::new(),
            cmos: Cmos::new(DEFAULT_EPOCH, cfg.mem_bytes),
            serial: SerialConsole::new(cfg.console),
            cpuid: CpuidConfig {
                apic: cfg.vcpus > 1,
                vcpus: cfg.vcpus as u32,
            },
            idle_ns: vec![0; cfg.vcpus],
            retired: vec![0; cfg.vcpus],
            power: None,
            irq_raised: false,
        }
    }

    fn now(&self, vcpu: usize) -> u64 {
        self.retired[vcpu] + self.idle_ns[vcpu]
    }

    /// Brings timers up to `now` and raises their interrupts.
    pub fn advance(&mut self, now: u64) {
        for _ in 0..self.pit.tick(now) {
            self.pic.pulse_irq(0);
        }
        self.serial.take_irq();
        let level = self.serial.irq_level();
        self.pic.set_irq(COM1_IRQ, level);
    }

    /// Follows the UART's interrupt line after an access; notes a new
    /// interrupt so the vCPU stops and the run loop delivers it.
    fn update_serial_irq(&mut self) {
        self.serial.take_irq();
        let level = self.serial.irq_level();
        self.pic.set_irq(COM1_IRQ, level);
        if level && self.pic.has_interrupt() {
            self.irq_raised = true;
        }
    }

    /// The next virtual time a device needs the run loop.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pit.next_deadline()
    }
}

impl IoBus for Platform {
    fn instructions_retired(&mut self, vcpu: usize, count: u64) {
        self.retired[vcpu] = count;
    }

    fn pio_read(&mut self, vcpu: usize, port: u16, data: &mut [u8]) {
        let now = self.now(vcpu);
        let v = match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.pio_read(port),
            0x40..=0x43 | 0x61 => self.pit.pio_read(port, now),
            0x70 | 0x71 => self.cmos.pio_read(port, now),
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                let v = self.serial.pio_read(p);
                self.update_serial_irq();
                v
            }
            // No device: the bus floats high.
            _ => 0xff,
        };
        data.fill(0xff);
        data[0] = v;
    }

    fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]) {
        let now = self.now(vcpu);
        let v = data[0];

        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => {
                self.pic.pio_write(port, v);
                // An EOI or unmask can make a waiting interrupt deliverable.
                if self.pic.has_interrupt() {
                    self.irq_raised = true;
                }
            }
            0x40..=0x43 | 0x61 => self.pit.pio_write(port, v, now),
            0x70 | 0x71 => self.cmos.pio_write(port, v),
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                self.serial.pio_write(p, v);
                self.update_serial_irq();
            }
            // Keyboard controller "pulse reset line".
            0x64 if v == 0xfe => self.power = Some(PowerEvent::Reset),
            // PCI reset control register.
            0xcf9 if v & 0x04 != 0 => self.power = Some(PowerEvent::Reset),
            // QEMU's isa-debug-exit style port, for test guests.
            0x501 => self.power = Some(PowerEvent::PowerOff),
            _ => {}
        }
    }

    fn mmio_read(&mut self, _vcpu: usize, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn mmio_write(&mut self, _vcpu: usize, _addr: u64, _data: &[u8]) {}

    fn stop_requested(&self) -> bool {
        self.power.is_some() || (self.irq_raised && self.pic.has_interrupt())
    }

    fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid(&self.cpuid, vcpu, leaf, subleaf)
    }

    fn rdtsc(&mut self, vcpu: usize) -> u64 {
        self.now(vcpu)
    }
}
