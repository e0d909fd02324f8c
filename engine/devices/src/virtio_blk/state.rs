// SPDX-License-Identifier: GPL-2.0-or-later
//! Snapshot state of the block device: [`VirtioBlkState`], the overlay
//! digest, and verification of a device against a snapshot.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::VirtioBlk;

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

impl VirtioBlk {
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
}
