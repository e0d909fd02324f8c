// SPDX-License-Identifier: GPL-2.0-or-later
//! virtio block device over a backing image file that is never modified.
//!
//! The image is opened read-only. Guest writes go to an in-memory
//! copy-on-write overlay (a sector map, ordered so that anything derived
//! from it is deterministic); reads see the overlay first, then the file.
//! Requests: IN, OUT, FLUSH (nothing to persist: succeeds), GET_ID; any
//! other type completes with UNSUPP. Feature bits offered: VERSION_1,
//! RING_INDIRECT_DESC, BLK_SEG_MAX, BLK_BLK_SIZE, BLK_FLUSH, and BLK_RO when
//! the device is read-only (writes then fail with IOERR).
//!
//! Requests run synchronously inside [`VirtioDevice::process_queue`], which
//! the transport calls when the machine handles a QueueNotify (see
//! `virtio_mmio`), so the data a read DMAs into the guest, and when, is a
//! function of the guest's execution alone.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::{debug, trace, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::virtio_mmio::{push_range, GuestRange, QueueCompletion, VirtioDevice, VirtioMmioError};

/// virtio-blk sectors are always 512 bytes, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request: the ring size minus header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data transfer of one request; larger ones fail with IOERR rather
/// than allocating without bound.
const MAX_REQUEST_BYTES: u64 = 64 << 20;
const REQUEST_HEADER_SIZE: u64 = 16;
/// Bytes of the configuration space modelled (up to `num_queues`).
const CONFIG_SIZE: usize = 36;

#[derive(Debug, Error)]
pub enum BlockError {
    #[error("block image {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "block image {path}: size {size} bytes is not a multiple of {SECTOR_SIZE}-byte sectors"
    )]
    NotSectorMultiple { path: PathBuf, size: u64 },
    #[error("block image {path}: empty file; expected at least one {SECTOR_SIZE}-byte sector")]
    Empty { path: PathBuf },
    #[error(
        "block device serial {serial:?} is {len} bytes; at most {VIRTIO_BLK_ID_BYTES} allowed"
    )]
    SerialTooLong { serial: String, len: usize },
    #[error("block image {path}: reading sector {sector}: {source}")]
    Read {
        path: PathBuf,
        sector: u64,
        source: std::io::Error,
    },
    #[error("block device: sectors {first}..{end} are beyond the capacity of {capacity} sectors")]
    OutOfRange { first: u64, end: u64, capacity: u64 },
}

/// A request that could not be carried out; it completes with this status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestStatus {
    Ok,
    IoErr,
    Unsupported,
}

impl RequestStatus {
    fn byte(self) -> u8 {
        (match self {
            RequestStatus::Ok => VIRTIO_BLK_S_OK,
            RequestStatus::IoErr => VIRTIO_BLK_S_IOERR,
            RequestStatus::Unsupported => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// The buffers of one half of a descriptor chain (device-readable or
/// device-writable), seen as one byte stream.
struct Segments(Vec<(GuestAddress, u32)>);

impl Segments {
    fn len(&self) -> u64 {
        self.0.iter().map(|&(_, len)| u64::from(len)).sum()
    }

    /// Splits `[offset, offset + len)` of the stream into guest ranges.
    fn ranges(&self, mut offset: u64, mut len: u64) -> Vec<(GuestAddress, usize)> {
        let mut out = Vec::new();
        for &(addr, seg_len) in &self.0 {
            let seg_len = u64::from(seg_len);
            if len == 0 {
                break;
            }
            if offset >= seg_len {
                offset -= seg_len;
                continue;
            }
            let n = (seg_len - offset).min(len);
            out.push((GuestAddress(addr.0 + offset), n as usize));
            len -= n;
            offset = 0;
        }
        out
    }

    fn read<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for (addr, n) in self.ranges(offset, buf.len() as u64) {
            mem.read_slice(&mut buf[done..done + n], addr)?;
            done += n;
        }
        Ok(())
    }

    fn write<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
        written: &mut Vec<GuestRange>,
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for (addr, n) in self.ranges(offset, buf.len() as u64) {
            mem.write_slice(&buf[done..done + n], addr)?;
            push_range(written, addr.0, n as u64);
            done += n;
        }
        Ok(())
    }
}

/// What a snapshot stores of the block device: its configuration and a
/// summary of the copy-on-write overlay. The overlay's data is NOT stored
/// (it can be as large as the disk); `overlay_sectors` and `overlay_sha256`
/// are for verification only: [`VirtioBlk::verify_state`] checks that a
/// device about to resume from the snapshot holds the same overlay. The
/// backing image file is not part of the state (the recording names it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    /// Capacity in 512-byte sectors (config space `capacity`).
    pub capacity_sectors: u64,
    /// Read-only for the guest (VIRTIO_BLK_F_RO offered).
    pub read_only: bool,
    /// What GET_ID returns.
    pub serial: String,
    /// Number of sectors in the copy-on-write overlay (verification only).
    pub overlay_sectors: u64,
    /// Hex SHA-256 over the overlay, sector by sector in ascending order,
    /// each as its number (u64 little endian) followed by its 512 bytes
    /// (verification only).
    pub overlay_sha256: String,
}

/// The block device model.
#[derive(Debug)]
pub struct VirtioBlk {
    path: PathBuf,
    image: File,
    capacity_sectors: u64,
    read_only: bool,
    serial: Vec<u8>,
    /// Copy-on-write overlay: sector number -> 512 bytes written by the guest.
    overlay: BTreeMap<u64, Box<[u8]>>,
}

impl VirtioBlk {
    /// Opens `image` (read-only on the host, always). `read_only` makes the
    /// device read-only for the guest too. `serial` is what GET_ID returns
    /// (at most 20 bytes; Linux shows it in /sys/block/vdX/serial).
    pub fn open(image: &Path, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        if serial.len() > VIRTIO_BLK_ID_BYTES as usize {
            return Err(BlockError::SerialTooLong {
                serial: serial.to_string(),
                len: serial.len(),
            });
        }
        let file = File::open(image).map_err(|source| BlockError::Open {
            path: image.to_path_buf(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: image.to_path_buf(),
                source,
            })?
            .len();
        if size == 0 {
            return Err(BlockError::Empty {
                path: image.to_path_buf(),
            });
        }
        if size & (SECTOR_SIZE - 1) != 0 {
            return Err(BlockError::NotSectorMultiple {
                path: image.to_path_buf(),
                size,
            });
        }
        debug!(image = %image.display(), sectors = size / SECTOR_SIZE, read_only, "block device opened");
        Ok(VirtioBlk {
            path: image.to_path_buf(),
            image: file,
            capacity_sectors: size / SECTOR_SIZE,
            read_only,
            serial: serial.as_bytes().to_vec(),
            overlay: BTreeMap::new(),
        })
    }

    pub fn image_path(&self) -> &Path {
        &self.path
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Sectors the guest has written, in ascending order, with their data.
    pub fn overlay_sectors(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.overlay.iter().map(|(&s, d)| (s, &d[..]))
    }

    /// Hex SHA-256 of the copy-on-write overlay, as defined for
    /// [`VirtioBlkState::overlay_sha256`].
    pub fn overlay_sha256(&self) -> String {
        let mut hasher = Sha256::new();
        for (sector, data) in &self.overlay {
            hasher.update(sector.to_le_bytes());
            hasher.update(data);
        }
        hex::encode(hasher.finalize())
    }

    pub fn state(&self) -> VirtioBlkState {
        VirtioBlkState {
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            serial: String::from_utf8_lossy(&self.serial).into_owned(),
            overlay_sectors: self.overlay.len() as u64,
            overlay_sha256: self.overlay_sha256(),
        }
    }

    /// Checks that this device matches a snapshot's block state: same
    /// configuration and the same overlay (count and digest). The overlay
    /// itself cannot be restored from the snapshot, only verified.
    pub fn verify_state(&self, state: &VirtioBlkState) -> Result<(), String> {
        let own = self.state();
        let mismatch =
            |field: &str, snapshot: &dyn std::fmt::Display, device: &dyn std::fmt::Display| {
                Err(format!(
                    "{field}: snapshot has {snapshot}, device {} has {device}",
                    self.path.display()
                ))
            };
        if own.capacity_sectors != state.capacity_sectors {
            return mismatch(
                "capacity_sectors",
                &state.capacity_sectors,
                &own.capacity_sectors,
            );
        }
        if own.read_only != state.read_only {
            return mismatch("read_only", &state.read_only, &own.read_only);
        }
        if own.serial != state.serial {
            return mismatch("serial", &state.serial, &own.serial);
        }
        if own.overlay_sectors != state.overlay_sectors {
            return mismatch(
                "overlay_sectors",
                &state.overlay_sectors,
                &own.overlay_sectors,
            );
        }
        if own.overlay_sha256 != state.overlay_sha256 {
            return mismatch("overlay_sha256", &state.overlay_sha256, &own.overlay_sha256);
        }
        Ok(())
    }

    /// Reads sectors as the guest sees them (overlay over image) into
    /// `buf`, whose length must be a multiple of [`SECTOR_SIZE`].
    pub fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let count = buf.len() as u64 / SECTOR_SIZE;
        let end = first.saturating_add(count);
        if end > self.capacity_sectors || buf.len() as u64 & (SECTOR_SIZE - 1) != 0 {
            return Err(BlockError::OutOfRange {
                first,
                end,
                capacity: self.capacity_sectors,
            });
        }
        // Runs of sectors not in the overlay are read with one call.
        let mut sector = first;
        while sector < end {
            let offset = ((sector - first) * SECTOR_SIZE) as usize;
            if let Some(data) = self.overlay.get(&sector) {
                buf[offset..offset + SECTOR_SIZE as usize].copy_from_slice(data);
                sector += 1;
                continue;
            }
            let run_end = self
                .overlay
                .range(sector..end)
                .next()
                .map_or(end, |(&s, _)| s);
            let run_bytes = ((run_end - sector) * SECTOR_SIZE) as usize;
            self.image
                .read_exact_at(&mut buf[offset..offset + run_bytes], sector * SECTOR_SIZE)
                .map_err(|source| BlockError::Read {
                    path: self.path.clone(),
                    sector,
                    source,
                })?;
            sector = run_end;
        }
        Ok(())
    }

    /// Stores guest data for sectors `first..` in the overlay.
    fn write_sectors(&mut self, first: u64, data: &[u8]) {
        for (i, chunk) in data.chunks_exact(SECTOR_SIZE as usize).enumerate() {
            self.overlay.insert(first + i as u64, chunk.into());
        }
    }

    fn check_range(&self, sector: u64, bytes: u64) -> bool {
        bytes & (SECTOR_SIZE - 1) == 0
            && bytes <= MAX_REQUEST_BYTES
            && sector
                .checked_add(bytes / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity_sectors)
    }

    fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        // size_max (8) not offered; seg_max at 12.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16) not offered; blk_size at 20.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // topology (24), writeback (32) not offered; num_queues at 34.
        config[34..36].copy_from_slice(&1u16.to_le_bytes());
        config
    }

    /// Executes one request; returns the bytes written into the chain's
    /// writable buffers (the used-ring length).
    fn execute<M: GuestMemory>(
        &mut self,
        descriptors: &[Descriptor],
        mem: &M,
        dma: &mut Vec<GuestRange>,
    ) -> u32 {
        let first_writable = descriptors
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descriptors.len());
        if descriptors[first_writable..]
            .iter()
            .any(|d| !d.is_write_only())
        {
            warn!("virtio-blk: device-readable buffer after a writable one; request dropped");
            return 0;
        }
        let readable = Segments(
            descriptors[..first_writable]
                .iter()
                .map(|d| (d.addr(), d.len()))
                .collect(),
        );
        let writable = Segments(
            descriptors[first_writable..]
                .iter()
                .map(|d| (d.addr(), d.len()))
                .collect(),
        );
        let writable_len = writable.len();
        if writable_len == 0 {
            warn!("virtio-blk: request without a status byte; dropped");
            return 0;
        }
        let status_offset = writable_len - 1;

        let (status, data_len) = if readable.len() < REQUEST_HEADER_SIZE {
            warn!(
                len = readable.len(),
                "virtio-blk: request header shorter than 16 bytes"
            );
            (RequestStatus::IoErr, 0)
        } else {
            let mut header = [0u8; REQUEST_HEADER_SIZE as usize];
            match readable.read(mem, 0, &mut header) {
                Err(e) => {
                    warn!(error = %e, "virtio-blk: request header unreadable");
                    (RequestStatus::IoErr, 0)
                }
                Ok(()) => {
                    let request_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
                    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
                    self.execute_request(
                        request_type,
                        sector,
                        &readable,
                        &writable,
                        status_offset,
                        mem,
                        dma,
                    )
                }
            }
        };

        if let Err(e) = writable.write(mem, status_offset, &[status.byte()], dma) {
            warn!(error = %e, "virtio-blk: status byte not writable");
            return data_len;
        }
        data_len + 1
    }

    /// Returns the status and the number of data bytes written to the
    /// guest.
    #[allow(clippy::too_many_arguments)]
    fn execute_request<M: GuestMemory>(
        &mut self,
        request_type: u32,
        sector: u64,
        readable: &Segments,
        writable: &Segments,
        data_len_in: u64,
        mem: &M,
        dma: &mut Vec<GuestRange>,
    ) -> (RequestStatus, u32) {
        match request_type {
            VIRTIO_BLK_T_IN => {
                if !self.check_range(sector, data_len_in) {
                    warn!(
                        sector,
                        bytes = data_len_in,
                        capacity = self.capacity_sectors,
                        "virtio-blk: read out of range or not whole sectors"
                    );
                    return (RequestStatus::IoErr, 0);
                }
                let mut buf = vec![0u8; data_len_in as usize];
                if let Err(e) = self.read_sectors(sector, &mut buf) {
                    warn!(error = %e, "virtio-blk: read failed");
                    return (RequestStatus::IoErr, 0);
                }
                if let Err(e) = writable.write(mem, 0, &buf, dma) {
                    warn!(error = %e, "virtio-blk: read buffer not writable");
                    return (RequestStatus::IoErr, 0);
                }
                trace!(sector, bytes = data_len_in, "virtio-blk: read");
                (RequestStatus::Ok, data_len_in as u32)
            }
            VIRTIO_BLK_T_OUT => {
                let bytes = readable.len() - REQUEST_HEADER_SIZE;
                if self.read_only {
                    debug!(sector, "virtio-blk: write to read-only device");
                    return (RequestStatus::IoErr, 0);
                }
                if !self.check_range(sector, bytes) {
                    warn!(
                        sector,
                        bytes,
                        capacity = self.capacity_sectors,
                        "virtio-blk: write out of range or not whole sectors"
                    );
                    return (RequestStatus::IoErr, 0);
                }
                let mut buf = vec![0u8; bytes as usize];
                if let Err(e) = readable.read(mem, REQUEST_HEADER_SIZE, &mut buf) {
                    warn!(error = %e, "virtio-blk: write buffer unreadable");
                    return (RequestStatus::IoErr, 0);
                }
                self.write_sectors(sector, &buf);
                trace!(sector, bytes, "virtio-blk: write (overlay)");
                (RequestStatus::Ok, 0)
            }
            VIRTIO_BLK_T_FLUSH => (RequestStatus::Ok, 0),
            VIRTIO_BLK_T_GET_ID => {
                let n = (VIRTIO_BLK_ID_BYTES as u64).min(data_len_in) as usize;
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..self.serial.len()].copy_from_slice(&self.serial);
                if let Err(e) = writable.write(mem, 0, &id[..n], dma) {
                    warn!(error = %e, "virtio-blk: ID buffer not writable");
                    return (RequestStatus::IoErr, 0);
                }
                (RequestStatus::Ok, n as u32)
            }
            other => {
                debug!(request_type = other, "virtio-blk: unsupported request");
                (RequestStatus::Unsupported, 0)
            }
        }
    }
}

impl VirtioDevice for VirtioBlk {
    fn name(&self) -> &'static str {
        "block"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process_queue<M: GuestMemory>(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueCompletion, VirtioMmioError> {
        let mut completion = QueueCompletion::default();
        if index != 0 {
            return Err(VirtioMmioError::NoSuchQueue {
                device: self.name(),
                queue: index as u32,
                num_queues: 1,
            });
        }
        let queue_error = |source| VirtioMmioError::Queue {
            device: "block",
            queue: 0,
            source,
        };
        // Fail loudly on a broken avail ring instead of silently doing
        // nothing (pop_descriptor_chain would only log it).
        queue.iter(mem).map_err(queue_error)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.collect();
            let used_len = if descriptors.is_empty() {
                warn!(head, "virtio-blk: empty or invalid descriptor chain");
                0
            } else {
                self.execute(&descriptors, mem, &mut completion.dma_writes)
            };
            // The used element and the used index are device writes too.
            let used_ring = queue.used_ring();
            let slot = u64::from(queue.next_used() % queue.size());
            queue.add_used(mem, head, used_len).map_err(queue_error)?;
            push_range(&mut completion.dma_writes, used_ring + 4 + 8 * slot, 8);
            push_range(&mut completion.dma_writes, used_ring + 2, 2);
            completion.chains += 1;
        }
        if completion.chains > 0 {
            completion.raise_interrupt = queue.needs_notification(mem).map_err(queue_error)?;
        }
        Ok(completion)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio_mmio::{VirtioMmio, VirtioMmioState, WriteEffect};
    use std::io::Write;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestMemoryMmap;

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
}
