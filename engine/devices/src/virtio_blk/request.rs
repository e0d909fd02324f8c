// SPDX-License-Identifier: GPL-2.0-or-later
//! Execution of one request: the descriptor chain as header, data and
//! status, and the IN, OUT, FLUSH and GET_ID request types.

use tracing::{debug, trace, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::{VirtioBlk, REQUEST_HEADER_SIZE};
use crate::virtio_mmio::{push_range, GuestRange};

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

    /// Splits `[offset, offset + len)` of the stream into guest ranges;
    /// an error where a buffer's address plus the offset into it passes
    /// the top of the address space (the guest chose both).
    fn ranges(
        &self,
        mut offset: u64,
        mut len: u64,
    ) -> Result<Vec<(GuestAddress, usize)>, GuestMemoryError> {
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
            let at = addr
                .0
                .checked_add(offset)
                .ok_or(GuestMemoryError::InvalidGuestAddress(addr))?;
            out.push((GuestAddress(at), n as usize));
            len -= n;
            offset = 0;
        }
        Ok(out)
    }

    fn read<M: GuestMemory>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for (addr, n) in self.ranges(offset, buf.len() as u64)? {
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
        for (addr, n) in self.ranges(offset, buf.len() as u64)? {
            mem.write_slice(&buf[done..done + n], addr)?;
            push_range(written, addr.0, n as u64);
            done += n;
        }
        Ok(())
    }
}

impl VirtioBlk {
    /// Executes one request; returns the bytes written into the chain's
    /// writable buffers (the used-ring length).
    pub(super) fn execute<M: GuestMemory>(
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
