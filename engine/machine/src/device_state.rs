// SPDX-License-Identifier: GPL-2.0-or-later
//! The device half of a recording's snapshot: every device model's state,
//! as plain serde data, taken from a [`Platform`] when recording starts.
//!
//! Device time anchors (PIT load times and deadlines, APIC timer deadlines)
//! are virtual-clock nanoseconds: each vCPU's clock is its retired
//! instruction count plus `idle_ns`. Both are stored so the anchors can be
//! interpreted; a machine resuming from the snapshot must bring its vCPU
//! clocks back to the same values.
//!
//! Not stored, on purpose: guest memory and vCPU registers (the rest of the
//! snapshot), the CPUID configuration (machine configuration), the console
//! output captured so far and the list of device errors (run results, not
//! state), pending DMA ranges and the run loop's interrupt flags (empty or
//! recomputed between runs), and the copy-on-write disk overlay's data
//! (only its size and digest, for verification).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::platform::Platform;
use krr_devices::cmos::{Cmos, CmosState};
use krr_devices::i8042::I8042;
use krr_devices::ioapic::{IoApic, IOAPIC_NUM_PINS};
use krr_devices::lapic::LocalApic;
use krr_devices::pic::Pic;
use krr_devices::pit::Pit;
use krr_devices::serial::SerialConsoleState;
use krr_devices::virtio_blk::VirtioBlkState;
use krr_devices::virtio_mmio::VirtioMmioState;

/// The virtio-mmio block device: transport registers and the device's own
/// state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkDeviceState {
    pub transport: VirtioMmioState,
    pub block: VirtioBlkState,
}

/// Every device's state at one point of a machine's execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Both 8259s.
    pub pic: Pic,
    /// The 8254 and the port 0x61 gate.
    pub pit: Pit,
    pub cmos: CmosState,
    /// The keyboard controller (absent from recordings made before it was
    /// modelled: a fresh one, as those machines' port 0x64 read 0).
    #[serde(default)]
    pub i8042: I8042,
    /// COM1's UART registers (not the console output).
    pub serial: SerialConsoleState,
    /// One local APIC per vCPU, in vCPU order.
    pub apics: Vec<LocalApic>,
    pub ioapic: IoApic,
    /// The disk, when the machine has one.
    pub virtio_blk: Option<VirtioBlkDeviceState>,
    /// Virtual time each vCPU spent halted, in ns.
    pub idle_ns: Vec<u64>,
    /// Instructions each vCPU had retired, as last reported by its backend:
    /// with `idle_ns`, the vCPU clocks the device time anchors refer to.
    pub retired: Vec<u64>,
}

/// A snapshot's device state that does not fit the machine.
#[derive(Debug, Error)]
pub enum DeviceStateError {
    #[error("device state: {field} has {found} entries, the machine has {expected} vCPUs")]
    VcpuCount {
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("device state: the snapshot has {} disk but the machine has {}",
        if *.snapshot { "a" } else { "no" },
        if *.snapshot { "none" } else { "one" })]
    DiskPresence { snapshot: bool },
    #[error("device state: {device}: {reason}")]
    Invalid {
        device: &'static str,
        reason: String,
    },
}

fn invalid(device: &'static str) -> impl FnOnce(String) -> DeviceStateError {
    move |reason| DeviceStateError::Invalid { device, reason }
}

impl Platform {
    /// Every device's state, for a snapshot.
    pub fn device_state(&self) -> DeviceState {
        DeviceState {
            pic: self.pic.clone(),
            pit: self.pit.clone(),
            cmos: self.cmos.state(),
            i8042: self.i8042.clone(),
            serial: self.serial.state(),
            apics: self.apics.clone(),
            ioapic: self.ioapic.clone(),
            virtio_blk: self.disk.as_ref().map(|disk| VirtioBlkDeviceState {
                transport: disk.transport_state(),
                block: disk.device().state(),
            }),
            idle_ns: self.idle_ns.clone(),
            retired: self.retired.clone(),
        }
    }

    /// Loads every device's state from a snapshot into this machine (built
    /// with the same configuration). Everything is checked before the
    /// machine changes, so on error it is as it was. The disk's overlay
    /// cannot be loaded (the snapshot has only its digest): the machine's
    /// disk must already hold the same overlay, which is verified.
    ///
    /// Not restored: the level of COM1's line last sent to the IO-APIC
    /// (private to the platform; it starts low as on a fresh machine and
    /// follows the UART from its next update), and the run loop's flags.
    pub fn restore_device_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let vcpus = self.apics.len();
        for (field, found) in [
            ("apics", state.apics.len()),
            ("idle_ns", state.idle_ns.len()),
            ("retired", state.retired.len()),
        ] {
            if found != vcpus {
                return Err(DeviceStateError::VcpuCount {
                    field,
                    found,
                    expected: vcpus,
                });
            }
        }
        for (vcpu, (saved, own)) in state.apics.iter().zip(&self.apics).enumerate() {
            if saved.apic_id() != own.apic_id() {
                return Err(DeviceStateError::Invalid {
                    device: "local APIC",
                    reason: format!(
                        "vCPU {vcpu}: APIC ID {} in the snapshot, {} in the machine",
                        saved.apic_id(),
                        own.apic_id()
                    ),
                });
            }
        }
        if state.ioapic.id() != self.ioapic.id()
            || state
                .ioapic
                .redirection_entry(IOAPIC_NUM_PINS - 1)
                .is_none()
            || state.ioapic.redirection_entry(IOAPIC_NUM_PINS).is_some()
        {
            return Err(DeviceStateError::Invalid {
                device: "IO-APIC",
                reason: format!(
                    "expected ID {} and {IOAPIC_NUM_PINS} redirection entries (snapshot has ID {})",
                    self.ioapic.id(),
                    state.ioapic.id()
                ),
            });
        }
        state.pit.validate().map_err(invalid("PIT"))?;
        let cmos = Cmos::from_state(&state.cmos).map_err(invalid("CMOS"))?;
        match (&state.virtio_blk, &self.disk) {
            (Some(saved), Some(disk)) => disk
                .device()
                .verify_state(&saved.block)
                .map_err(invalid("virtio-blk"))?,
            (None, None) => {}
            (saved, _) => {
                return Err(DeviceStateError::DiskPresence {
                    snapshot: saved.is_some(),
                })
            }
        }

        // The two loads that can still fail, each of which changes nothing
        // when it does; the UART is put back if the disk's fails.
        let own_serial = self.serial.state();
        self.serial
            .restore(&state.serial)
            .map_err(invalid("serial"))?;
        if let (Some(saved), Some(disk)) = (&state.virtio_blk, self.disk.as_mut()) {
            if let Err(reason) = disk.restore_transport_state(&saved.transport) {
                self.serial
                    .restore(&own_serial)
                    .expect("the UART's own state loads back");
                return Err(DeviceStateError::Invalid {
                    device: "virtio-mmio",
                    reason,
                });
            }
        }
        self.pic = state.pic.clone();
        self.pit = state.pit.clone();
        self.cmos = cmos;
        self.i8042 = state.i8042.clone();
        self.apics = state.apics.clone();
        self.ioapic = state.ioapic.clone();
        self.idle_ns = state.idle_ns.clone();
        self.retired = state.retired.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::VIRTIO_BASE;
    use crate::MachineConfig;
    use krr_devices::ioapic::IOAPIC_BASE;
    use krr_devices::lapic::LAPIC_BASE;
    use krr_devices::virtio_blk::{VirtioBlk, SECTOR_SIZE};
    use krr_devices::virtio_mmio::VirtioMmio;
    use krr_hypervisor::IoBus;
    use std::io::Write;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const VCPUS: usize = 2;

    fn image() -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0x5a; 64 * SECTOR_SIZE as usize]).unwrap();
        file.flush().unwrap();
        file
    }

    fn platform(vcpus: usize, image: Option<&tempfile::NamedTempFile>) -> Platform {
        let mut cfg = MachineConfig::new("bzImage".into(), None, String::new());
        cfg.vcpus = vcpus;
        cfg.mem_bytes = 1 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let disk =
            image.map(|f| VirtioMmio::new(VirtioBlk::open(f.path(), false, "snap-disk").unwrap()));
        Platform::new(&cfg, mem, vcpus as u8, disk)
    }

    fn mmio32(p: &mut Platform, vcpu: usize, addr: u64, value: u32) {
        p.mmio_write(vcpu, addr, &value.to_le_bytes());
    }

    /// Puts every device in a state no fresh machine has, through the
    /// guest-visible registers.
    fn program(p: &mut Platform) {
        // The clocks as a backend would have reported them (set directly:
        // the backend-facing IoBus call is not what is under test).
        p.retired = vec![2_000_000, 1_500_000];
        p.idle_ns[1] = 250_000;
        // PIC: Linux's initialisation (vectors 0x30/0x38), then mask IRQ 1
        // and 3 on the master and IRQ 12 on the slave.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x0a),
            (0xa1, 0x10),
        ] {
            p.pio_write(0, port, &[v]);
        }
        // PIT channel 0: mode 2, lo/hi, reload 11932 (100 Hz).
        p.pio_write(0, 0x43, &[0x34]);
        p.pio_write(0, 0x40, &[0x9c]);
        p.pio_write(0, 0x40, &[0x2e]);
        // CMOS: register 0x42 of the RAM, and leave index 0x0b selected.
        p.pio_write(0, 0x70, &[0x42]);
        p.pio_write(0, 0x71, &[0x77]);
        p.pio_write(0, 0x70, &[0x0b]);
        // UART: 115200 8N1, OUT2, THRE interrupt enabled.
        for (port, v) in [(0x3fb, 0x80), (0x3f8, 0x01), (0x3fb, 0x03), (0x3fc, 0x08)] {
            p.pio_write(0, port, &[v]);
        }
        p.pio_write(0, 0x3f9, &[0x02]);
        // vCPU 1's local APIC: enabled, TPR 0x20, periodic timer.
        mmio32(p, 1, LAPIC_BASE + 0xf0, 0x1ff);
        mmio32(p, 1, LAPIC_BASE + 0x80, 0x20);
        mmio32(p, 1, LAPIC_BASE + 0x320, 0x2_00ec);
        mmio32(p, 1, LAPIC_BASE + 0x380, 100_000);
        // IO-APIC pin 4: vector 0x34, unmasked.
        mmio32(p, 0, IOAPIC_BASE, 0x18);
        mmio32(p, 0, IOAPIC_BASE + 0x10, 0x34);
        // virtio-mmio: ACKNOWLEDGE | DRIVER, queue 0 of 128 entries set up.
        for (offset, v) in [
            (0x070, 1),
            (0x070, 3),
            (0x030, 0),
            (0x038, 128),
            (0x080, 0x1_0000),
            (0x090, 0x1_1000),
            (0x0a0, 0x1_2000),
            (0x044, 1),
        ] {
            mmio32(p, 0, VIRTIO_BASE + offset, v);
        }
        assert!(p.device_errors.is_empty(), "{:?}", p.device_errors);
    }

    #[test]
    fn device_state_round_trips_through_json_and_restores() {
        let image = image();
        let mut p = platform(VCPUS, Some(&image));
        program(&mut p);
        let state = p.device_state();
        let text = serde_json::to_string(&state).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["pit"]["channels"][0]["reload"], 11932);
        assert_eq!(json["pit"]["channels"][0]["mode"], 2);
        assert_eq!(json["pic"]["master"]["imr"], 0x0a);
        assert_eq!(json["pic"]["slave"]["vector_base"], 0x38);
        assert_eq!(json["cmos"]["index"], 0x0b);
        assert_eq!(json["cmos"]["ram"][0x42], 0x77);
        assert_eq!(json["serial"]["line_control"], 0x03);
        assert_eq!(json["serial"]["interrupt_enable"], 0x02);
        assert_eq!(json["serial"]["modem_control"], 0x08);
        assert_eq!(json["apics"].as_array().unwrap().len(), VCPUS);
        assert_eq!(json["apics"][1]["tpr"], 0x20);
        assert_eq!(json["apics"][1]["timer_initial"], 100_000);
        let disk = &json["virtio_blk"];
        assert_eq!(disk["transport"]["status"], 3);
        assert_eq!(disk["transport"]["queues"][0]["size"], 128);
        assert_eq!(disk["transport"]["queues"][0]["used_ring"], 0x1_2000);
        assert_eq!(disk["block"]["serial"], "snap-disk");
        assert_eq!(disk["block"]["overlay_sectors"], 0);
        assert_eq!(json["idle_ns"], serde_json::json!([0, 250_000]));
        assert_eq!(json["retired"], serde_json::json!([2_000_000, 1_500_000]));
        let back: DeviceState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);

        // A fresh machine of the same configuration takes the state and
        // then behaves like the original at the guest's registers.
        let mut fresh = platform(VCPUS, Some(&image));
        fresh.restore_device_state(&back).unwrap();
        assert_eq!(fresh.device_state(), state);
        assert_eq!(fresh.next_deadline(), p.next_deadline());
        assert_eq!(fresh.now(1), p.now(1));
        for port in [0x21, 0xa1, 0x40, 0x71, 0x3fb, 0x3fc, 0x3f9] {
            let (mut a, mut b) = ([0u8], [0u8]);
            p.pio_read(0, port, &mut a);
            fresh.pio_read(0, port, &mut b);
            assert_eq!(a, b, "port {port:#x}");
        }
        for (vcpu, addr) in [
            (1, LAPIC_BASE + 0x80),
            (1, LAPIC_BASE + 0x390),
            (0, VIRTIO_BASE + 0x070),
            (0, VIRTIO_BASE + 0x038),
            (0, IOAPIC_BASE + 0x10),
        ] {
            let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
            p.mmio_read(vcpu, addr, &mut a);
            fresh.mmio_read(vcpu, addr, &mut b);
            assert_eq!(a, b, "vCPU {vcpu} address {addr:#x}");
        }
        assert!(p.device_errors.is_empty() && fresh.device_errors.is_empty());
    }

    #[test]
    fn machine_without_disk_has_none() {
        let p = platform(1, None);
        let json = serde_json::to_value(p.device_state()).unwrap();
        assert!(json["virtio_blk"].is_null());
        assert_eq!(json["ioapic"]["id"], 1);
    }

    #[test]
    fn restore_rejects_a_different_machine_and_changes_nothing() {
        let image = image();
        let mut p = platform(VCPUS, Some(&image));
        program(&mut p);
        let state = p.device_state();

        let mut one_cpu = platform(1, Some(&image));
        let err = one_cpu.restore_device_state(&state).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device state: apics has 2 entries, the machine has 1 vCPUs"
        );

        let mut no_disk = platform(VCPUS, None);
        let err = no_disk.restore_device_state(&state).unwrap_err();
        assert!(
            err.to_string()
                .contains("has a disk but the machine has none"),
            "{err}"
        );

        let mut bad = state.clone();
        bad.virtio_blk.as_mut().unwrap().block.overlay_sha256 = "00".into();
        let mut fresh = platform(VCPUS, Some(&image));
        let before = fresh.device_state();
        let err = fresh.restore_device_state(&bad).unwrap_err();
        assert!(
            err.to_string().contains("virtio-blk: overlay_sha256"),
            "{err}"
        );

        // The transport is loaded after the UART: its failure must put the
        // UART back too.
        let mut bad = state.clone();
        bad.virtio_blk.as_mut().unwrap().transport.queues[0].size = 100;
        let err = fresh.restore_device_state(&bad).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("device state: virtio-mmio: queue 0"),
            "{err}"
        );

        let mut bad = state.clone();
        bad.cmos.ram.pop();
        let err = fresh.restore_device_state(&bad).unwrap_err();
        assert!(err.to_string().contains("CMOS: ram is 127 bytes"), "{err}");
        assert_eq!(fresh.device_state(), before);
    }
}
