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

mod device;
mod disk;
mod request;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::debug;
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

pub use state::VirtioBlkState;

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
}
