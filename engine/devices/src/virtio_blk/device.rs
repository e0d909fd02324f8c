// SPDX-License-Identifier: GPL-2.0-or-later
//! The device side of the virtio-mmio transport: feature bits, the
//! configuration space, and processing of the request queue.

use tracing::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::{VirtioBlk, CONFIG_SIZE, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX};
use crate::virtio_mmio::{push_range, QueueCompletion, VirtioDevice, VirtioMmioError};

impl VirtioBlk {
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
