// SPDX-License-Identifier: GPL-2.0-or-later
//! The disk as the guest sees it: the copy-on-write overlay over the
//! read-only image, sector reads and writes, and range checks.

use std::os::unix::fs::FileExt;

use super::{BlockError, VirtioBlk, MAX_REQUEST_BYTES, SECTOR_SIZE};

impl VirtioBlk {
    /// Sectors the guest has written, in ascending order, with their data.
    pub fn overlay_sectors(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.overlay.iter().map(|(&s, d)| (s, &d[..]))
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
    pub(super) fn write_sectors(&mut self, first: u64, data: &[u8]) {
        for (i, chunk) in data.chunks_exact(SECTOR_SIZE as usize).enumerate() {
            self.overlay.insert(first + i as u64, chunk.into());
        }
    }

    pub(super) fn check_range(&self, sector: u64, bytes: u64) -> bool {
        bytes & (SECTOR_SIZE - 1) == 0
            && bytes <= MAX_REQUEST_BYTES
            && sector
                .checked_add(bytes / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity_sectors)
    }
}
