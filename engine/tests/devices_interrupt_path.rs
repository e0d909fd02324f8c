// SPDX-License-Identifier: GPL-2.0-or-later
//! The interrupt path the machine wires up, end to end through the public
//! device APIs: a virtio-blk completion pulses IO-APIC pin 5, the IO-APIC
//! message is routed to the local APIC of CPU 1, the CPU acknowledges and
//! EOIs. The IO-APIC gets the ID the MP table announces.

use std::io::Write;

use krr_engine::devices::ioapic::IoApic;
use krr_engine::devices::lapic::{deliver, LocalApic};
use krr_engine::devices::virtio_blk::VirtioBlk;
use krr_engine::devices::virtio_mmio::{VirtioMmio, WriteEffect};
use krr_engine::machine::mptable::write_mptable;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const VIRTIO_IRQ: usize = 5;
const VECTOR: u32 = 0x25;

fn mmio_w32<D: krr_engine::devices::virtio_mmio::VirtioDevice>(
    dev: &mut VirtioMmio<D>,
    offset: u64,
    value: u32,
) -> WriteEffect {
    dev.write(offset, &value.to_le_bytes()).unwrap()
}

fn ioapic_w32(ioapic: &mut IoApic, index: u32, value: u32) {
    assert!(ioapic.write(0x00, &index.to_le_bytes()).unwrap().is_empty());
    ioapic.write(0x10, &value.to_le_bytes()).unwrap();
}

#[test]
fn virtio_completion_reaches_the_cpu_and_eoi_completes() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let region = write_mptable(&mem, 2).unwrap();

    // Both CPUs' APICs enabled by the guest (SVR bit 8).
    let mut apics = vec![LocalApic::new(0), LocalApic::new_ap(1)];
    for apic in &mut apics {
        apic.write(0xf0, &0x1ffu32.to_le_bytes(), 0).unwrap();
    }
    // The guest routes pin 5 to CPU 1, edge, physical.
    let mut ioapic = IoApic::new(region.ioapic_id);
    ioapic_w32(&mut ioapic, 0x10 + 2 * VIRTIO_IRQ as u32 + 1, 1 << 24);
    ioapic_w32(&mut ioapic, 0x10 + 2 * VIRTIO_IRQ as u32, VECTOR);

    // A one-sector disk, driver brought up with a 4-entry queue.
    let mut image = tempfile::NamedTempFile::new().unwrap();
    image.write_all(&[0x5a; 512]).unwrap();
    image.flush().unwrap();
    let mut dev = VirtioMmio::new(VirtioBlk::open(image.path(), true, "path").unwrap());
    for (offset, value) in [
        (0x070, 1),
        (0x070, 3),
        (0x024, 1),
        (0x020, 1), // VIRTIO_F_VERSION_1 (bit 32)
        (0x070, 11),
        (0x030, 0),
        (0x038, 4),
        (0x080, 0x1000),
        (0x090, 0x2000),
        (0x0a0, 0x3000),
        (0x044, 1),
        (0x070, 15),
    ] {
        mmio_w32(&mut dev, offset, value);
    }
    // Read sector 0: header at 0x8000, data at 0x9000, status at 0xa000.
    mem.write_obj(0u32, GuestAddress(0x8000)).unwrap();
    mem.write_obj(0u64, GuestAddress(0x8008)).unwrap();
    for (i, (addr, len, flags)) in [(0x8000u64, 16u32, 1u16), (0x9000, 512, 3), (0xa000, 1, 2)]
        .into_iter()
        .enumerate()
    {
        let d = 0x1000 + 16 * i as u64;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(i as u16 + 1, GuestAddress(d + 14)).unwrap();
    }
    mem.write_obj(0u16, GuestAddress(0x2004)).unwrap();
    mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();

    let WriteEffect::QueueNotify { queue } = mmio_w32(&mut dev, 0x050, 0) else {
        panic!("QueueNotify expected")
    };
    let completion = dev.process_queue(queue, &mem).unwrap();
    assert!(completion.raise_interrupt);
    let data: [u8; 4] = mem.read_obj(GuestAddress(0x9000)).unwrap();
    assert_eq!(data, [0x5a; 4]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 0);

    // Edge pulse on the line, routed to CPU 1 only.
    let message = ioapic.set_irq(VIRTIO_IRQ, true).unwrap().unwrap();
    assert!(ioapic.set_irq(VIRTIO_IRQ, false).unwrap().is_none());
    assert_eq!(deliver(&mut apics, None, &message), vec![1]);
    assert_eq!(apics[0].pending_vector(), None);
    assert_eq!(apics[1].pending_vector(), Some(VECTOR as u8));
    assert_eq!(apics[1].acknowledge(), VECTOR as u8);
    // Driver's handler: read and ack InterruptStatus, then EOI.
    let mut status = [0u8; 4];
    dev.read(0x060, &mut status).unwrap();
    assert_eq!(u32::from_le_bytes(status), 1);
    mmio_w32(&mut dev, 0x064, 1);
    assert!(!dev.interrupt_pending());
    let eoi = apics[1].write(0xb0, &[0; 4], 0).unwrap();
    assert_eq!(eoi, None, "edge-triggered: no EOI broadcast");
    assert_eq!(apics[1].ppr(), 0);
}
