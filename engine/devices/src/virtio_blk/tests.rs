// SPDX-License-Identifier: GPL-2.0-or-later
//! Unit tests of the block device, driven through the virtio-mmio transport.

use super::*;
use crate::virtio_mmio::{VirtioMmio, VirtioMmioState, WriteEffect};
use sha2::{Digest, Sha256};
use std::io::Write;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::virtio_mmio::{GuestRange, QueueCompletion, VirtioDevice};

const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const TEST_QUEUE_SIZE: u16 = 16;
const HEADER_ADDR: u64 = 0x10000;
const DATA_ADDR: u64 = 0x20000;
const STATUS_ADDR: u64 = 0x30000;

/// A 64-sector image whose sector n is filled with byte n.
fn image() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for sector in 0..64u8 {
        file.write_all(&[sector; SECTOR_SIZE as usize]).unwrap();
    }
    file.flush().unwrap();
    file
}

fn w32(dev: &mut VirtioMmio<VirtioBlk>, offset: u32, value: u32) -> WriteEffect {
    dev.write(u64::from(offset), &value.to_le_bytes()).unwrap()
}

fn r32(dev: &VirtioMmio<VirtioBlk>, offset: u32) -> u32 {
    let mut buf = [0u8; 4];
    dev.read(u64::from(offset), &mut buf).unwrap();
    u32::from_le_bytes(buf)
}

/// Brings the device up the way Linux's virtio_mmio + virtio_blk do.
fn driver_setup(dev: &mut VirtioMmio<VirtioBlk>) {
    assert_eq!(r32(dev, 0x000), 0x7472_6976);
    assert_eq!(r32(dev, 0x004), 2);
    assert_eq!(r32(dev, 0x008), VIRTIO_ID_BLOCK);
    w32(dev, 0x070, 0);
    w32(dev, 0x070, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    w32(
        dev,
        0x070,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w32(dev, 0x014, 0);
    let low = r32(dev, 0x010);
    w32(dev, 0x014, 1);
    let high = r32(dev, 0x010);
    w32(dev, 0x024, 0);
    w32(dev, 0x020, low);
    w32(dev, 0x024, 1);
    w32(dev, 0x020, high);
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    w32(dev, 0x070, s);
    assert_ne!(r32(dev, 0x070) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    w32(dev, 0x030, 0);
    assert_eq!(r32(dev, 0x044), 0);
    assert_eq!(r32(dev, 0x034), u32::from(QUEUE_SIZE));
    w32(dev, 0x038, u32::from(TEST_QUEUE_SIZE));
    w32(dev, 0x080, DESC_TABLE as u32);
    w32(dev, 0x084, 0);
    w32(dev, 0x090, AVAIL_RING as u32);
    w32(dev, 0x094, 0);
    w32(dev, 0x0a0, USED_RING as u32);
    w32(dev, 0x0a4, 0);
    w32(dev, 0x044, 1);
    w32(dev, 0x070, s | VIRTIO_CONFIG_S_DRIVER_OK);
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: VirtioMmio<VirtioBlk>,
    avail_idx: u16,
    image: tempfile::NamedTempFile,
}

impl Harness {
    fn new(read_only: bool) -> Self {
        let image = image();
        let blk = VirtioBlk::open(image.path(), read_only, "krr-test-disk").unwrap();
        let mut dev = VirtioMmio::new(blk);
        driver_setup(&mut dev);
        Harness {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            dev,
            avail_idx: 0,
            image,
        }
    }

    /// Places a chain of (addr, len, writable) buffers at descriptors
    /// 0.., makes it available, notifies and processes the queue.
    /// Writes a chain of (addr, len, writable) buffers into the
    /// descriptor table at `table`, starting at index `first`.
    fn write_chain(&self, table: u64, first: u16, buffers: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = first + i as u16;
            let mut flags: u16 = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = table + 16 * u64::from(index);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(index + 1, GuestAddress(d + 14)).unwrap();
        }
    }

    /// Puts descriptor `head` in the available ring.
    fn make_available(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % TEST_QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    fn notify(&mut self) -> QueueCompletion {
        assert_eq!(
            w32(&mut self.dev, 0x050, 0),
            WriteEffect::QueueNotify { queue: 0 }
        );
        self.dev.process_queue(0, &self.mem).unwrap()
    }

    /// Places a chain at descriptors 0.., makes it available, notifies
    /// and processes the queue.
    fn submit(&mut self, buffers: &[(u64, u32, bool)]) -> QueueCompletion {
        self.write_chain(DESC_TABLE, 0, buffers);
        self.make_available(0);
        self.notify()
    }

    fn header(&self, request_type: u32, sector: u64) {
        self.mem
            .write_obj(request_type, GuestAddress(HEADER_ADDR))
            .unwrap();
        self.mem
            .write_obj(0u32, GuestAddress(HEADER_ADDR + 4))
            .unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HEADER_ADDR + 8))
            .unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS_ADDR)).unwrap()
    }

    fn used(&self, index: u16) -> (u32, u32) {
        let e = USED_RING + 4 + 8 * u64::from(index % TEST_QUEUE_SIZE);
        (
            self.mem.read_obj(GuestAddress(e)).unwrap(),
            self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }

    fn read_request(&mut self, sector: u64, len: u32) -> QueueCompletion {
        self.mem
            .write_obj(0xeeu8, GuestAddress(STATUS_ADDR))
            .unwrap();
        self.header(VIRTIO_BLK_T_IN, sector);
        self.submit(&[
            (HEADER_ADDR, 16, false),
            (DATA_ADDR, len, true),
            (STATUS_ADDR, 1, true),
        ])
    }
}

#[test]
fn indirect_descriptor_table() {
    let mut h = Harness::new(false);
    const INDIRECT_TABLE: u64 = 0x4000;
    h.header(VIRTIO_BLK_T_IN, 7);
    h.write_chain(
        INDIRECT_TABLE,
        0,
        &[
            (HEADER_ADDR, 16, false),
            (DATA_ADDR, 512, true),
            (STATUS_ADDR, 1, true),
        ],
    );
    h.mem
        .write_obj(INDIRECT_TABLE, GuestAddress(DESC_TABLE))
        .unwrap();
    h.mem
        .write_obj(48u32, GuestAddress(DESC_TABLE + 8))
        .unwrap();
    h.mem
        .write_obj(VRING_DESC_F_INDIRECT as u16, GuestAddress(DESC_TABLE + 12))
        .unwrap();
    h.make_available(0);
    let completion = h.notify();
    assert_eq!(completion.chains, 1);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut data = [0u8; 512];
    h.mem
        .read_slice(&mut data, GuestAddress(DATA_ADDR))
        .unwrap();
    assert!(data.iter().all(|&b| b == 7));
    assert_eq!(h.used(0), (0, 513));
}

#[test]
fn batches_and_ring_wraparound() {
    let mut h = Harness::new(false);
    // Two chains made available before one notify: both complete.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    h.write_chain(
        DESC_TABLE,
        0,
        &[(HEADER_ADDR, 16, false), (STATUS_ADDR, 1, true)],
    );
    h.write_chain(
        DESC_TABLE,
        2,
        &[(HEADER_ADDR, 16, false), (STATUS_ADDR + 1, 1, true)],
    );
    h.make_available(0);
    h.make_available(2);
    let completion = h.notify();
    assert_eq!(completion.chains, 2);
    assert_eq!(h.used(0), (0, 1));
    assert_eq!(h.used(1), (2, 1));
    // A notify with nothing new completes nothing and raises nothing.
    let idle = h.notify();
    assert_eq!(idle.chains, 0);
    assert!(!idle.raise_interrupt);
    // 3 x the ring size more requests: indexes wrap, each lands in its slot.
    for i in 2u16..50 {
        let sector = u64::from(i % 64);
        let completion = h.read_request(sector, 512);
        assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8, "request {i}");
        assert_eq!(h.used(i), (0, 513), "request {i}");
        let slot = u64::from(i % TEST_QUEUE_SIZE);
        assert_eq!(
            completion.dma_writes[2],
            GuestRange {
                addr: USED_RING + 4 + 8 * slot,
                len: 8
            }
        );
        let data: [u8; 16] = h.mem.read_obj(GuestAddress(DATA_ADDR)).unwrap();
        assert_eq!(data, [sector as u8; 16]);
    }
    let used_idx: u16 = h.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    assert_eq!(used_idx, 50);
}

#[test]
fn feature_bits_and_config() {
    let h = Harness::new(false);
    let features = h.dev.device().device_features();
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(h.dev.driver_features(), features);
    let ro = Harness::new(true);
    assert_ne!(
        ro.dev.device().device_features() & (1 << VIRTIO_BLK_F_RO),
        0
    );
    // Capacity as two 32-bit halves and as one 8-byte read.
    assert_eq!(r32(&h.dev, 0x100), 64);
    assert_eq!(r32(&h.dev, 0x104), 0);
    let mut eight = [0u8; 8];
    h.dev.read(0x100, &mut eight).unwrap();
    assert_eq!(u64::from_le_bytes(eight), 64);
    assert_eq!(r32(&h.dev, 0x100 + 12), SEG_MAX);
    assert_eq!(r32(&h.dev, 0x100 + 20), 512);
    assert_eq!(r32(&h.dev, 0x100 + 200), 0);
    assert!(!h.dev.device().is_read_only());
}

#[test]
fn read_sector_zero_returns_image_bytes() {
    let mut h = Harness::new(false);
    let completion = h.read_request(0, 1024);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut data = [0u8; 1024];
    h.mem
        .read_slice(&mut data, GuestAddress(DATA_ADDR))
        .unwrap();
    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[512..].iter().all(|&b| b == 1));
    assert_eq!(h.used(0), (0, 1025));
    assert_eq!(completion.chains, 1);
    assert!(completion.raise_interrupt);
    assert_eq!(h.dev.interrupt_status(), 1);
    assert_eq!(
        completion.dma_writes,
        vec![
            GuestRange {
                addr: DATA_ADDR,
                len: 1024
            },
            GuestRange {
                addr: STATUS_ADDR,
                len: 1
            },
            GuestRange {
                addr: USED_RING + 4,
                len: 8
            },
            GuestRange {
                addr: USED_RING + 2,
                len: 2
            },
        ]
    );
    let used_idx: u16 = h.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    assert_eq!(used_idx, 1);
    // Driver acknowledges the interrupt.
    w32(&mut h.dev, 0x064, 1);
    assert!(!h.dev.interrupt_pending());
}

#[test]
fn data_split_across_descriptors() {
    let mut h = Harness::new(false);
    h.header(VIRTIO_BLK_T_IN, 5);
    // Header and data share nothing; data in two pieces of 300 + 212 bytes,
    // status in the same descriptor as the tail of the data.
    h.submit(&[
        (HEADER_ADDR, 16, false),
        (DATA_ADDR, 300, true),
        (DATA_ADDR + 0x1000, 213, true),
    ]);
    let mut a = [0u8; 300];
    let mut b = [0u8; 213];
    h.mem.read_slice(&mut a, GuestAddress(DATA_ADDR)).unwrap();
    h.mem
        .read_slice(&mut b, GuestAddress(DATA_ADDR + 0x1000))
        .unwrap();
    assert!(a.iter().all(|&x| x == 5));
    assert!(b[..212].iter().all(|&x| x == 5));
    assert_eq!(b[212], VIRTIO_BLK_S_OK as u8);
}

#[test]
fn write_goes_to_overlay_not_file() {
    let mut h = Harness::new(false);
    let original = std::fs::read(h.image.path()).unwrap();
    h.header(VIRTIO_BLK_T_OUT, 3);
    h.mem
        .write_slice(&[0xab; 512], GuestAddress(DATA_ADDR))
        .unwrap();
    let completion = h.submit(&[
        (HEADER_ADDR, 16, false),
        (DATA_ADDR, 512, false),
        (STATUS_ADDR, 1, true),
    ]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.used(0), (0, 1));
    // The data buffer was only read: not among the DMA writes.
    assert!(completion
        .dma_writes
        .iter()
        .all(|r| !(r.addr..r.addr + r.len).contains(&DATA_ADDR)));
    assert_eq!(std::fs::read(h.image.path()).unwrap(), original);
    let overlay: Vec<u64> = h.dev.device().overlay_sectors().map(|(s, _)| s).collect();
    assert_eq!(overlay, vec![3]);
    // Reading sectors 2..5 now sees the overlay in the middle.
    h.mem
        .write_slice(&[0u8; 1536], GuestAddress(DATA_ADDR))
        .unwrap();
    h.read_request(2, 1536);
    let mut data = [0u8; 1536];
    h.mem
        .read_slice(&mut data, GuestAddress(DATA_ADDR))
        .unwrap();
    assert!(data[..512].iter().all(|&b| b == 2));
    assert!(data[512..1024].iter().all(|&b| b == 0xab));
    assert!(data[1024..].iter().all(|&b| b == 4));
}

#[test]
fn state_round_trips_through_json() {
    let mut h = Harness::new(false);
    let empty = h.dev.device().state();
    assert_eq!(empty.overlay_sectors, 0);
    // SHA-256 of no bytes.
    assert_eq!(
        empty.overlay_sha256,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    h.header(VIRTIO_BLK_T_OUT, 5);
    h.mem
        .write_slice(&[0xcd; 1024], GuestAddress(DATA_ADDR))
        .unwrap();
    h.submit(&[
        (HEADER_ADDR, 16, false),
        (DATA_ADDR, 1024, false),
        (STATUS_ADDR, 1, true),
    ]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);

    let block = h.dev.device().state();
    let json = serde_json::to_value(&block).unwrap();
    assert_eq!(json["capacity_sectors"], 64);
    assert_eq!(json["serial"], "krr-test-disk");
    assert_eq!(json["overlay_sectors"], 2);
    let mut expected = Sha256::new();
    for sector in [5u64, 6] {
        expected.update(sector.to_le_bytes());
        expected.update([0xcd; 512]);
    }
    assert_eq!(json["overlay_sha256"], hex::encode(expected.finalize()));
    let back: VirtioBlkState = serde_json::from_value(json).unwrap();
    assert_eq!(back, block);
    h.dev.device().verify_state(&back).unwrap();
    // A device without the writes fails verification, naming the field.
    let other = VirtioBlk::open(h.image.path(), false, "krr-test-disk").unwrap();
    let err = other.verify_state(&back).unwrap_err();
    assert!(err.starts_with("overlay_sectors: snapshot has 2"), "{err}");

    let transport = h.dev.transport_state();
    let json = serde_json::to_value(&transport).unwrap();
    assert_eq!(json["queues"][0]["size"], TEST_QUEUE_SIZE);
    assert_eq!(json["queues"][0]["desc_table"], DESC_TABLE);
    assert_eq!(json["queues"][0]["avail_ring"], AVAIL_RING);
    assert_eq!(json["queues"][0]["used_ring"], USED_RING);
    assert_eq!(json["queues"][0]["ready"], true);
    assert_eq!(json["queues"][0]["next_avail"], 1);
    assert_eq!(json["queues"][0]["next_used"], 1);
    assert_eq!(json["interrupt_status"], 1);
    let back: VirtioMmioState = serde_json::from_value(json).unwrap();
    assert_eq!(back, transport);

    // A freshly opened transport takes the state over and reads back the
    // same registers.
    let mut fresh = VirtioMmio::new(other);
    fresh.restore_transport_state(&back).unwrap();
    assert_eq!(fresh.transport_state(), transport);
    assert_eq!(r32(&fresh, 0x070), r32(&h.dev, 0x070));
    assert_eq!(r32(&fresh, 0x080), DESC_TABLE as u32);
    assert_eq!(r32(&fresh, 0x060), 1);
}

#[test]
fn restore_transport_state_rejects_bad_queues() {
    let h = Harness::new(false);
    let good = h.dev.transport_state();
    let blk = VirtioBlk::open(h.image.path(), false, "").unwrap();
    let mut dev = VirtioMmio::new(blk);
    let before = dev.transport_state();

    let mut bad = good.clone();
    bad.queues.push(bad.queues[0]);
    let err = dev.restore_transport_state(&bad).unwrap_err();
    assert!(err.contains("2 queues, expected 1"), "{err}");

    let mut bad = good.clone();
    bad.queues[0].size = 12;
    let err = dev.restore_transport_state(&bad).unwrap_err();
    assert!(err.starts_with("queue 0:"), "{err}");

    let mut bad = good;
    bad.queues[0].used_ring = 0x3001;
    assert!(dev.restore_transport_state(&bad).is_err());
    assert_eq!(
        dev.transport_state(),
        before,
        "a failed restore changes nothing"
    );
}

#[test]
fn out_of_range_read_is_ioerr() {
    let mut h = Harness::new(false);
    h.mem
        .write_slice(&[0x55; 1024], GuestAddress(DATA_ADDR))
        .unwrap();
    let completion = h.read_request(63, 1024);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.used(0), (0, 1));
    let mut data = [0u8; 1024];
    h.mem
        .read_slice(&mut data, GuestAddress(DATA_ADDR))
        .unwrap();
    assert!(data.iter().all(|&b| b == 0x55), "no data written on error");
    assert_eq!(
        completion.dma_writes[0],
        GuestRange {
            addr: STATUS_ADDR,
            len: 1
        }
    );
    // Not a whole number of sectors.
    h.read_request(0, 100);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    // Last sector is fine.
    h.read_request(63, 512);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn read_only_rejects_writes() {
    let mut h = Harness::new(true);
    h.header(VIRTIO_BLK_T_OUT, 0);
    h.submit(&[
        (HEADER_ADDR, 16, false),
        (DATA_ADDR, 512, false),
        (STATUS_ADDR, 1, true),
    ]);
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.dev.device().overlay_sectors().count(), 0);
    h.read_request(1, 512);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn flush_get_id_and_unsupported() {
    let mut h = Harness::new(false);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    h.submit(&[(HEADER_ADDR, 16, false), (STATUS_ADDR, 1, true)]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    h.submit(&[
        (HEADER_ADDR, 16, false),
        (DATA_ADDR, 20, true),
        (STATUS_ADDR, 1, true),
    ]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA_ADDR)).unwrap();
    assert_eq!(&id[..13], b"krr-test-disk");
    assert!(id[13..].iter().all(|&b| b == 0));
    assert_eq!(h.used(1), (0, 21));
    h.header(11, 0); // DISCARD, not offered
    h.submit(&[(HEADER_ADDR, 16, false), (STATUS_ADDR, 1, true)]);
    assert_eq!(h.status(), VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn transport_rejects_bad_input() {
    let image = image();
    let mut dev = VirtioMmio::new(VirtioBlk::open(image.path(), false, "x").unwrap());
    // Feature negotiation without VERSION_1 is refused.
    w32(
        &mut dev,
        0x070,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w32(&mut dev, 0x024, 0);
    w32(&mut dev, 0x020, 1 << VIRTIO_BLK_F_FLUSH);
    w32(
        &mut dev,
        0x070,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(r32(&dev, 0x070) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // Bad sizes and accesses name what was wrong.
    let err = dev.write(0x038, &300u32.to_le_bytes()).unwrap_err();
    assert!(err.to_string().contains("QueueNum 300"), "{err}");
    let err = dev.write(0x080, &0x1001u32.to_le_bytes()).unwrap_err();
    assert!(err.to_string().contains("QueueDesc"), "{err}");
    let mut two = [0u8; 2];
    assert!(dev.read(0x070, &mut two).is_err());
    assert!(
        dev.write(0x100, &[0; 4]).is_err(),
        "config space is read-only"
    );
    assert!(dev.write(0x000, &[0; 4]).is_err());
    w32(&mut dev, 0x030, 1);
    assert_eq!(r32(&dev, 0x034), 0, "queue 1 does not exist");
    assert!(dev.write(0x038, &16u32.to_le_bytes()).is_err());
    // Notify before DRIVER_OK does nothing.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
    assert_eq!(
        dev.process_queue(0, &mem).unwrap(),
        QueueCompletion::default()
    );
    // Reset clears status.
    w32(&mut dev, 0x070, 0);
    assert_eq!(r32(&dev, 0x070), 0);
}

#[test]
fn bad_images_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let err = VirtioBlk::open(&missing, false, "x").unwrap_err();
    assert!(err.to_string().contains("missing.img"), "{err}");
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, [0u8; 700]).unwrap();
    let err = VirtioBlk::open(&odd, false, "x").unwrap_err();
    assert!(err.to_string().contains("700"), "{err}");
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, []).unwrap();
    assert!(matches!(
        VirtioBlk::open(&empty, false, "x"),
        Err(BlockError::Empty { .. })
    ));
    let image = image();
    assert!(matches!(
        VirtioBlk::open(image.path(), false, "a-serial-longer-than-20"),
        Err(BlockError::SerialTooLong { .. })
    ));
}

/// A writable buffer at the top of the address space whose status byte
/// lies past it: the device must not wrap around and write guest memory
/// at the bottom (nor panic); the request completes with nothing written.
#[test]
fn a_buffer_wrapping_past_the_top_of_memory_writes_nothing() {
    let mut h = Harness::new(false);
    let top = u64::MAX - 0xff;
    // Where the status byte lands if the address wraps.
    let wrapped = top.wrapping_add(512);
    assert_eq!(wrapped, 0x100);
    h.mem.write_obj(0xaau8, GuestAddress(wrapped)).unwrap();
    h.header(VIRTIO_BLK_T_IN, 0);
    let completion = h.submit(&[(HEADER_ADDR, 16, false), (top, 513, true)]);
    assert_eq!(h.mem.read_obj::<u8>(GuestAddress(wrapped)).unwrap(), 0xaa);
    // Only the used ring is written.
    assert!(
        completion
            .dma_writes
            .iter()
            .all(|r| r.addr >= USED_RING && r.addr + r.len <= USED_RING + 0x1000),
        "{:?}",
        completion.dma_writes
    );
    assert_eq!(h.used(0), (0, 0));
}
