// SPDX-License-Identifier: GPL-2.0-or-later
//! The I/O side of the PC: port and MMIO decoding to the device models,
//! interrupt routing (8259 PIC and IO-APIC in parallel, as on a PC), CPUID
//! and the virtual clock. Implements [`IoBus`] for the backends.
//!
//! ISA interrupt wiring: PIT -> PIC input 0 and IO-APIC pin 2; COM1 -> PIC
//! input 4 and IO-APIC pin 4; the virtio-mmio disk -> IO-APIC pin
//! [`VIRTIO_IRQ`] (and PIC input [`VIRTIO_IRQ`]). The MP table announces the
//! same routing.

use super::cpuid::{cpuid, CpuidConfig};
use super::observer::RunObserver;
use super::MachineConfig;
use krr_devices::cmos::{Cmos, DEFAULT_EPOCH};
use krr_devices::i8042::{self, I8042Effect, I8042};
use krr_devices::ioapic::{IoApic, IOAPIC_BASE, IOAPIC_SIZE};
use krr_devices::lapic::{
    deliver, ApicOutput, InterruptMessage, LocalApic, LAPIC_BASE, LAPIC_SIZE,
};
use krr_devices::pic::Pic;
use krr_devices::pit::Pit;
use krr_devices::serial::{SerialConsole, COM1_BASE, COM1_IRQ};
use krr_devices::virtio_blk::VirtioBlk;
use krr_devices::virtio_mmio::{GuestRange, VirtioMmio, WriteEffect, VIRTIO_MMIO_WINDOW_SIZE};
use krr_hypervisor::{DeliveredException, IoBus, Position, RunEvents, UserEntry};
use vm_memory::GuestMemoryMmap;

/// Guest-physical base of the virtio-mmio block device window.
pub const VIRTIO_BASE: u64 = 0xd000_0000;
/// ISA IRQ (and IO-APIC pin) of the virtio-mmio block device.
pub const VIRTIO_IRQ: u8 = 5;
const PIT_IOAPIC_PIN: usize = 2;

/// A request from the guest to end the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    Reset,
    PowerOff,
}

pub struct Platform {
    mem: GuestMemoryMmap,
    pub pic: Pic,
    pub pit: Pit,
    pub cmos: Cmos,
    pub i8042: I8042,
    pub serial: SerialConsole,
    pub cpuid: CpuidConfig,
    pub apics: Vec<LocalApic>,
    pub ioapic: IoApic,
    pub disk: Option<VirtioMmio<VirtioBlk>>,
    /// Virtual time each vCPU spent halted, in ns.
    pub idle_ns: Vec<u64>,
    /// Instructions retired by each vCPU, as last reported by the backend.
    pub retired: Vec<u64>,
    pub power: Option<PowerEvent>,
    /// An interrupt became deliverable during the current run: stop the
    /// vCPU after this access so the run loop delivers it promptly.
    pub irq_raised: bool,
    /// An interrupt was already waiting when the run started (the run loop
    /// polls for it); then new ones do not stop the vCPU either, or a
    /// guest polling a device with interrupts off would stop at every
    /// access.
    pub irq_pending_at_start: bool,
    /// The vCPU being run.
    pub current: usize,
    serial_level: bool,
    /// Guest-physical ranges written by device DMA since the last call to
    /// [`Platform::take_dma`] (translated code there must be dropped).
    dma: Vec<GuestRange>,
    /// Device errors (bad register accesses, malformed queues): reported in
    /// the run summary, never fatal to the guest.
    pub device_errors: Vec<String>,
    /// Where each vCPU stood at its last bus access (see [`Position`]).
    pub at: Vec<Position>,
    /// Whoever watches the run (`krr record`'s recorder); see
    /// [`RunObserver`].
    pub observer: Option<Box<dyn RunObserver>>,
    /// Stop the running vCPU when an interrupt becomes deliverable during
    /// its run (KVM: host time runs on). The software CPU leaves this off:
    /// its run ends at the next block boundary instead ([`RunEvents::run_end`]),
    /// so that runs stop only at block boundaries and replay of the kernel
    /// alone meets the same blocks.
    pub stop_on_irq: bool,
}

impl Platform {
    pub fn new(
        cfg: &MachineConfig,
        mem: GuestMemoryMmap,
        ioapic_id: u8,
        disk: Option<VirtioMmio<VirtioBlk>>,
    ) -> Platform {
        let apics = (0..cfg.vcpus)
            .map(|i| {
                if i == 0 {
                    LocalApic::new(0)
                } else {
                    LocalApic::new_ap(i as u8)
                }
            })
            .collect();
        Platform {
            mem,
            pic: Pic::new(),
            pit: Pit::new(),
            cmos: Cmos::new(DEFAULT_EPOCH, cfg.mem_bytes),
            i8042: I8042::new(),
            serial: SerialConsole::new(cfg.console),
            cpuid: CpuidConfig {
                apic: true,
                vcpus: cfg.vcpus as u32,
            },
            apics,
            ioapic: IoApic::new(ioapic_id),
            disk,
            idle_ns: vec![0; cfg.vcpus],
            retired: vec![0; cfg.vcpus],
            power: None,
            irq_raised: false,
            irq_pending_at_start: false,
            current: 0,
            serial_level: false,
            dma: Vec::new(),
            device_errors: Vec::new(),
            at: vec![Position::default(); cfg.vcpus],
            observer: None,
            stop_on_irq: true,
        }
    }

    /// vCPU `vcpu`'s virtual time in ns.
    pub fn now(&self, vcpu: usize) -> u64 {
        self.retired[vcpu] + self.idle_ns[vcpu]
    }

    pub fn take_dma(&mut self) -> Vec<GuestRange> {
        std::mem::take(&mut self.dma)
    }

    /// Called after anything that may have made an interrupt pending: stops
    /// the running vCPU when it now has one to take. Other vCPUs get theirs
    /// on their next turn (within a quantum).
    fn raise(&mut self) {
        if self.irq_pending_at_start {
            return;
        }
        let vcpu = self.current;
        if self.apics[vcpu].pending_vector().is_some()
            || (vcpu == 0 && self.pic.has_interrupt() && self.pic_routed_to_cpu())
        {
            self.irq_raised = true;
        }
    }

    fn route(&mut self, message: Option<InterruptMessage>, sender: Option<usize>) {
        if let Some(message) = message {
            deliver(&mut self.apics, sender, &message);
            self.raise();
        }
    }

    fn ioapic_line(&mut self, pin: usize, level: bool) {
        match self.ioapic.set_irq(pin, level) {
            Ok(msg) => self.route(msg, None),
            Err(e) => self.device_errors.push(e.to_string()),
        }
    }

    /// An edge on ISA line `irq`: PIC input and IO-APIC pin.
    fn pulse_isa(&mut self, irq: u8, ioapic_pin: usize) {
        self.pic.pulse_irq(irq);
        self.ioapic_line(ioapic_pin, true);
        self.ioapic_line(ioapic_pin, false);
        self.raise();
    }

    /// Follows the UART's interrupt output (a level) on both controllers.
    fn update_serial_irq(&mut self) {
        self.serial.take_irq();
        let level = self.serial.irq_level();
        self.pic.set_irq(COM1_IRQ, level);
        if level != self.serial_level {
            self.serial_level = level;
            self.ioapic_line(COM1_IRQ as usize, level);
        }
        if level {
            self.raise();
        }
    }

    /// Brings the PIT up to `now` and vCPU `vcpu`'s APIC timer up to its
    /// clock, raising their interrupts.
    pub fn advance(&mut self, vcpu: usize) {
        let now = self.now(vcpu);
        for _ in 0..self.pit.tick(now) {
            self.pulse_isa(0, PIT_IOAPIC_PIN);
        }
        self.apics[vcpu].tick(now);
        self.update_serial_irq();
    }

    /// The earliest virtual time a timer needs the run loop: the PIT and
    /// every local APIC timer.
    pub fn next_deadline(&self) -> Option<u64> {
        self.apics
            .iter()
            .filter_map(|a| a.next_deadline())
            .chain(self.pit.next_deadline())
            .min()
    }

    /// Whether the 8259's INTR reaches vCPU 0: through LINT0 programmed as
    /// ExtINT (virtual wire), or directly while the local APIC is software
    /// disabled (firmware state; a kernel booted with `nolapic` leaves it so).
    pub fn pic_routed_to_cpu(&self) -> bool {
        let apic = &self.apics[0];
        if !apic.is_software_enabled() {
            return true;
        }
        let mut lvt0 = [0u8; 4];
        if apic.read(0x350, &mut lvt0, 0).is_err() {
            return false;
        }
        let lvt0 = u32::from_le_bytes(lvt0);
        lvt0 & (1 << 16) == 0 && (lvt0 >> 8) & 7 == 7
    }

    fn lapic_write(&mut self, vcpu: usize, offset: u64, data: &[u8], now: u64) {
        match self.apics[vcpu].write(offset, data, now) {
            Ok(Some(ApicOutput::Ipi(msg))) => self.route(Some(msg), Some(vcpu)),
            Ok(Some(ApicOutput::EoiBroadcast { vector })) => {
                for msg in self.ioapic.end_of_interrupt(vector) {
                    self.route(Some(msg), None);
                }
            }
            Ok(None) => {}
            Err(e) => self.device_errors.push(e.to_string()),
        }
        // Unmasking, TPR and timer writes can make an interrupt pending.
        self.raise();
    }

    fn disk_write(&mut self, offset: u64, data: &[u8]) {
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        match disk.write(offset, data) {
            Ok(WriteEffect::QueueNotify { queue }) => match disk.process_queue(queue, &self.mem) {
                Ok(done) => {
                    if let Some(r) = &mut self.observer {
                        let cpu = self.current;
                        for range in &done.dma_writes {
                            r.dma(cpu, self.at[cpu], range.addr, range.len);
                        }
                    }
                    self.dma.extend(done.dma_writes);
                    if done.raise_interrupt {
                        self.pulse_isa(VIRTIO_IRQ, VIRTIO_IRQ as usize);
                    }
                }
                Err(e) => self.device_errors.push(e.to_string()),
            },
            Ok(WriteEffect::None) => {}
            Err(e) => self.device_errors.push(e.to_string()),
        }
    }
}

impl IoBus for Platform {
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
            i8042::DATA_PORT | i8042::COMMAND_PORT => self.i8042.pio_read(port),
            // No device: the bus floats high.
            _ => 0xff,
        };
        data.fill(0xff);
        data[0] = v;
        if let Some(r) = &mut self.observer {
            r.pio_read(vcpu, self.at[vcpu], port, data);
        }
    }

    fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]) {
        let now = self.now(vcpu);
        let v = data[0];
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => {
                self.pic.pio_write(port, v);
                // An EOI or unmask can make a waiting interrupt deliverable.
                self.raise();
            }
            0x40..=0x43 | 0x61 => self.pit.pio_write(port, v, now),
            0x70 | 0x71 => self.cmos.pio_write(port, v),
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                self.serial.pio_write(p, v);
                self.update_serial_irq();
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => match self.i8042.pio_write(port, v) {
                I8042Effect::Reset => self.power = Some(PowerEvent::Reset),
                I8042Effect::Irq(irq) => self.pulse_isa(irq, irq as usize),
                I8042Effect::None => {}
            },
            // PCI reset control register.
            0xcf9 if v & 0x04 != 0 => self.power = Some(PowerEvent::Reset),
            // QEMU's isa-debug-exit style port, for test guests.
            0x501 => self.power = Some(PowerEvent::PowerOff),
            _ => {}
        }
        if let Some(o) = &mut self.observer {
            o.pio_write(vcpu, self.at[vcpu], port, data);
        }
    }

    fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8]) {
        let now = self.now(vcpu);
        let r = if (LAPIC_BASE..LAPIC_BASE + LAPIC_SIZE).contains(&addr) {
            self.apics[vcpu]
                .read(addr - LAPIC_BASE, data, now)
                .map_err(|e| e.to_string())
        } else if (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&addr) {
            self.ioapic
                .read(addr - IOAPIC_BASE, data)
                .map_err(|e| e.to_string())
        } else if let (true, Some(disk)) = (
            (VIRTIO_BASE..VIRTIO_BASE + VIRTIO_MMIO_WINDOW_SIZE).contains(&addr),
            self.disk.as_ref(),
        ) {
            disk.read(addr - VIRTIO_BASE, data)
                .map_err(|e| e.to_string())
        } else {
            data.fill(0xff);
            Ok(())
        };
        if let Err(e) = r {
            self.device_errors.push(e);
        }
        if let Some(r) = &mut self.observer {
            r.mmio_read(vcpu, self.at[vcpu], addr, data);
        }
    }

    fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8]) {
        let now = self.now(vcpu);
        if (LAPIC_BASE..LAPIC_BASE + LAPIC_SIZE).contains(&addr) {
            self.lapic_write(vcpu, addr - LAPIC_BASE, data, now);
        } else if (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(&addr) {
            match self.ioapic.write(addr - IOAPIC_BASE, data) {
                Ok(messages) => {
                    for msg in messages {
                        self.route(Some(msg), None);
                    }
                }
                Err(e) => self.device_errors.push(e.to_string()),
            }
        } else if (VIRTIO_BASE..VIRTIO_BASE + VIRTIO_MMIO_WINDOW_SIZE).contains(&addr) {
            self.disk_write(addr - VIRTIO_BASE, data);
        }
    }

    fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid(&self.cpuid, vcpu, leaf, subleaf)
    }

    fn rdtsc(&mut self, vcpu: usize) -> u64 {
        let value = self.now(vcpu);
        if let Some(r) = &mut self.observer {
            r.rdtsc(vcpu, self.at[vcpu], value);
        }
        value
    }
}

impl RunEvents for Platform {
    fn position(&mut self, vcpu: usize, at: Position) {
        self.retired[vcpu] = at.icount;
        self.at[vcpu] = at;
    }

    fn stop_requested(&self) -> bool {
        self.power.is_some()
            || (self.irq_raised && self.stop_on_irq)
            || self.observer.as_ref().is_some_and(|o| o.wants_stop())
    }

    fn run_end(&self, vcpu: usize) -> Option<u64> {
        // Clocks read `retired + idle_ns`; the run ends in retired units.
        let idle = self.idle_ns[vcpu];
        let timer = self.next_deadline().map(|d| d.saturating_sub(idle));
        let raised = self.irq_raised.then_some(self.retired[vcpu]);
        timer.into_iter().chain(raised).min()
    }

    fn exception(&mut self, vcpu: usize, at: Position, exception: &DeliveredException) {
        if let Some(r) = &mut self.observer {
            r.exception(vcpu, at, exception);
        }
    }

    fn syscall(&mut self, vcpu: usize, at: Position, entry: &UserEntry) {
        if let Some(r) = &mut self.observer {
            r.syscall(vcpu, at, entry);
        }
    }
}
