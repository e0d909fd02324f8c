// SPDX-License-Identifier: GPL-2.0-or-later
//! virtio-mmio transport, version 2 ("modern", virtio 1.x), for devices that
//! implement [`VirtioDevice`]. The guest finds a device through the kernel
//! command line (`virtio_mmio.device=4K@0xd0000000:5`: a 4 KiB window at
//! 0xd0000000, interrupt on IRQ 5).
//!
//! # Determinism and DMA
//! The transport never runs on its own. A write to QueueNotify returns
//! [`WriteEffect::QueueNotify`]; the machine then calls
//! [`VirtioMmio::process_queue`] synchronously, before the vCPU resumes, so
//! device DMA happens at a deterministic point of the guest's execution.
//! `process_queue` returns every guest-physical range the device wrote
//! ([`QueueCompletion::dma_writes`], data buffers, status bytes and the used
//! ring), so the recorder can log the bytes (read them back from guest memory
//! right after the call) and a CPU backend can invalidate cached
//! translations of those pages.
//!
//! # Interrupts
//! When `QueueCompletion::raise_interrupt` is true the device has set bit 0
//! of InterruptStatus; the machine pulses the device's IO-APIC line
//! (`set_irq(line, true)` then `set_irq(line, false)`; the MP table declares
//! ISA lines edge-triggered). [`VirtioMmio::interrupt_pending`] tells whether
//! InterruptStatus is non-zero, for a machine that models the line as a
//! level instead.
//!
//! # Guest memory
//! All engine code uses vm-memory 0.18 (`GuestMemoryMmap` with the
//! `backend-mmap` feature): the version both virtio-queue 0.18 and
//! linux-loader 0.14 depend on.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, trace, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH, VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemory};

/// "virt" in little endian.
pub const VIRTIO_MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern transport.
pub const VIRTIO_MMIO_TRANSPORT_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("KRR" in little endian; any value is
/// valid, Linux only prints it).
pub const VIRTIO_MMIO_VENDOR: u32 = 0x0052_524b;
/// Size of one device's MMIO window.
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 0x1000;

/// A guest-physical range written by a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    pub addr: u64,
    pub len: u64,
}

/// Appends `range` to `ranges`, merging it with the last one when they are
/// contiguous (keeps logs short for scatter lists of adjacent pages).
pub(crate) fn push_range(ranges: &mut Vec<GuestRange>, addr: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = ranges.last_mut() {
        if last.addr + last.len == addr {
            last.len += len;
            return;
        }
    }
    ranges.push(GuestRange { addr, len });
}

/// What one `process_queue` call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCompletion {
    /// Descriptor chains completed (put in the used ring).
    pub chains: u32,
    /// Guest-physical ranges written, in the order they were written.
    pub dma_writes: Vec<GuestRange>,
    /// The machine must signal the device's interrupt line.
    pub raise_interrupt: bool,
}

/// Effect of a register write the machine must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEffect {
    None,
    /// The driver notified this queue: call [`VirtioMmio::process_queue`]
    /// before the vCPU continues.
    QueueNotify {
        queue: u32,
    },
}

#[derive(Debug, Error)]
pub enum VirtioMmioError {
    #[error("virtio-mmio {device}: {len}-byte access at offset {offset:#x}; registers below 0x100 take aligned 4-byte accesses")]
    BadAccess {
        device: &'static str,
        offset: u64,
        len: usize,
    },
    #[error("virtio-mmio {device}: no register at offset {offset:#x}")]
    UnknownRegister { device: &'static str, offset: u64 },
    #[error("virtio-mmio {device}: register at offset {offset:#x} is read-only, write of {value:#x} dropped")]
    ReadOnly {
        device: &'static str,
        offset: u64,
        value: u32,
    },
    #[error("virtio-mmio {device}: queue {queue} does not exist (device has {num_queues})")]
    NoSuchQueue {
        device: &'static str,
        queue: u32,
        num_queues: usize,
    },
    #[error("virtio-mmio {device}: QueueNum {size} for queue {queue}; expected a power of two from 1 to {max}")]
    BadQueueSize {
        device: &'static str,
        queue: u32,
        size: u32,
        max: u16,
    },
    #[error("virtio-mmio {device}: {register} of queue {queue} = {addr:#x} rejected: {source}")]
    BadQueueAddress {
        device: &'static str,
        queue: u32,
        register: &'static str,
        addr: u64,
        source: virtio_queue::Error,
    },
    #[error("virtio-mmio {device}: {len}-byte write to config space offset {offset:#x}; the device's configuration is read-only")]
    ConfigWrite {
        device: &'static str,
        offset: u64,
        len: usize,
    },
    #[error("virtio-mmio {device}: queue {queue}: {source}")]
    Queue {
        device: &'static str,
        queue: u32,
        source: virtio_queue::Error,
    },
}

/// One virtqueue as a snapshot stores it: virtio-queue's [`QueueState`]
/// (no serde impl of its own) field for field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// QueueNumMax: the largest size the device offers.
    pub max_size: u16,
    /// QueueNum: the size the driver selected.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc: guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// QueueDriver: guest-physical address of the available ring.
    pub avail_ring: u64,
    /// QueueDevice: guest-physical address of the used ring.
    pub used_ring: u64,
    /// The device's position in the available ring (last avail idx).
    pub next_avail: u16,
    /// The device's position in the used ring (last used idx).
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for VirtqueueState {
    fn from(q: QueueState) -> Self {
        VirtqueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<VirtqueueState> for QueueState {
    fn from(q: VirtqueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's registers as a snapshot stores them. The device behind
/// it keeps its own state (see the device's module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// Device status register (ACKNOWLEDGE, DRIVER, FEATURES_OK, ...).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver selected (both 32-bit halves).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Every queue of the device, in index order.
    pub queues: Vec<VirtqueueState>,
    /// InterruptStatus (bit 0: used buffer, bit 1: config change).
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
}

/// A virtio device behind the transport.
pub trait VirtioDevice {
    /// Name for errors and logs ("block").
    fn name(&self) -> &'static str;
    /// Virtio device ID (2 = block).
    fn device_type(&self) -> u32;
    /// Feature bits offered, including `VIRTIO_F_VERSION_1`.
    fn device_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads the device-specific configuration space; bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space. Devices without writable fields keep
    /// this default, which rejects the write.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), VirtioMmioError> {
        Err(VirtioMmioError::ConfigWrite {
            device: self.name(),
            offset,
            len: data.len(),
        })
    }
    /// The driver set DRIVER_OK with these negotiated features.
    fn activate(&mut self, _driver_features: u64) {}
    /// The driver reset the device (status 0).
    fn reset(&mut self) {}
    /// Consumes every available descriptor chain of queue `index`.
    fn process_queue<M: GuestMemory>(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueCompletion, VirtioMmioError>;
}

/// The virtio-mmio register block of one device.
#[derive(Debug)]
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    interrupt_status: u32,
    status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|max| Queue::new(max).expect("device queue maximum sizes are powers of two"))
            .collect();
        VirtioMmio {
            device,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            status: 0,
            config_generation: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Device status register (ACKNOWLEDGE, DRIVER, FEATURES_OK, ...).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// InterruptStatus register (bit 0: used buffer, bit 1: config change).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Whether the device's interrupt is asserted (InterruptStatus != 0).
    pub fn interrupt_pending(&self) -> bool {
        self.interrupt_status != 0
    }

    /// The transport's registers and queues, for a snapshot.
    pub fn transport_state(&self) -> VirtioMmioState {
        VirtioMmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
        }
    }

    /// Loads the transport's registers and queues from a snapshot. The
    /// queue count and maximum sizes must be the device's own; each queue
    /// is validated as virtio-queue validates one (sizes powers of two,
    /// ring addresses aligned). On error nothing changes. The device is not
    /// re-activated: a device with activation side effects would need it
    /// (the block device has none).
    pub fn restore_transport_state(&mut self, state: &VirtioMmioState) -> Result<(), String> {
        let max_sizes = self.device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(format!(
                "{} queues, expected {} for the {} device",
                state.queues.len(),
                max_sizes.len(),
                self.device.name()
            ));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (i, (q, max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                return Err(format!(
                    "queue {i}: max_size {}, expected {max}",
                    q.max_size
                ));
            }
            let queue =
                Queue::try_from(QueueState::from(*q)).map_err(|e| format!("queue {i}: {e}"))?;
            queues.push(queue);
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = queues;
        self.interrupt_status = state.interrupt_status;
        self.config_generation = state.config_generation;
        Ok(())
    }

    fn reset(&mut self) {
        debug!(device = self.device.name(), "device reset by driver");
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.status = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device.reset();
    }

    fn selected_queue(&mut self) -> Result<&mut Queue, VirtioMmioError> {
        let num_queues = self.queues.len();
        let queue = self.queue_sel;
        self.queues
            .get_mut(queue as usize)
            .ok_or(VirtioMmioError::NoSuchQueue {
                device: self.device.name(),
                queue,
                num_queues,
            })
    }

    fn check_register_access(&self, offset: u64, len: usize) -> Result<(), VirtioMmioError> {
        if len != 4 || offset & 3 != 0 {
            return Err(VirtioMmioError::BadAccess {
                device: self.device.name(),
                offset,
                len,
            });
        }
        Ok(())
    }

    /// Guest read at `offset` in the window. On error `data` is zero-filled.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), VirtioMmioError> {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return Ok(());
        }
        self.check_register_access(offset, data.len())?;
        let queue = self.queues.get(self.queue_sel as usize);
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => VIRTIO_MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => VIRTIO_MMIO_TRANSPORT_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VIRTIO_MMIO_VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table() as u32),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.map_or(0, |q| q.avail_ring() as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.map_or(0, |q| q.used_ring() as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.map_or(0, |q| (q.used_ring() >> 32) as u32),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: length (and base) all ones.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // Write-only registers read as zero.
            VIRTIO_MMIO_DEVICE_FEATURES_SEL
            | VIRTIO_MMIO_DRIVER_FEATURES
            | VIRTIO_MMIO_DRIVER_FEATURES_SEL
            | VIRTIO_MMIO_QUEUE_SEL
            | VIRTIO_MMIO_QUEUE_NOTIFY
            | VIRTIO_MMIO_INTERRUPT_ACK
            | VIRTIO_MMIO_SHM_SEL => 0,
            _ => {
                return Err(VirtioMmioError::UnknownRegister {
                    device: self.device.name(),
                    offset,
                })
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    /// Guest write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<WriteEffect, VirtioMmioError> {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data)?;
            return Ok(WriteEffect::None);
        }
        self.check_register_access(offset, data.len())?;
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let device = self.device.name();
        trace!(device, offset, value, "virtio-mmio write");
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    warn!(
                        device,
                        value, "driver features written after FEATURES_OK, ignored"
                    );
                } else {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        sel => {
                            if value != 0 {
                                warn!(device, sel, value, "driver features beyond bit 63 ignored")
                            }
                        }
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                let queue_index = self.queue_sel;
                let queue = self.selected_queue()?;
                let max = queue.max_size();
                if value == 0 || value > u32::from(max) || !value.is_power_of_two() {
                    return Err(VirtioMmioError::BadQueueSize {
                        device,
                        queue: queue_index,
                        size: value,
                        max,
                    });
                }
                queue.set_size(value as u16);
            }
            VIRTIO_MMIO_QUEUE_READY => {
                let queue = self.selected_queue()?;
                queue.set_ready(value == 1);
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_address(offset as u32, value)?,
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                return Ok(WriteEffect::QueueNotify {
                    queue: value & 0xffff,
                })
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            VIRTIO_MMIO_MAGIC_VALUE
            | VIRTIO_MMIO_VERSION
            | VIRTIO_MMIO_DEVICE_ID
            | VIRTIO_MMIO_VENDOR_ID
            | VIRTIO_MMIO_DEVICE_FEATURES
            | VIRTIO_MMIO_QUEUE_NUM_MAX
            | VIRTIO_MMIO_INTERRUPT_STATUS
            | VIRTIO_MMIO_CONFIG_GENERATION
            | VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => {
                return Err(VirtioMmioError::ReadOnly {
                    device,
                    offset,
                    value,
                })
            }
            _ => return Err(VirtioMmioError::UnknownRegister { device, offset }),
        }
        Ok(WriteEffect::None)
    }

    fn write_queue_address(&mut self, register: u32, value: u32) -> Result<(), VirtioMmioError> {
        let device = self.device.name();
        let queue_index = self.queue_sel;
        let queue = self.selected_queue()?;
        let (current, name) = match register {
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                (queue.desc_table(), "QueueDesc")
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                (queue.avail_ring(), "QueueDriver")
            }
            _ => (queue.used_ring(), "QueueDevice"),
        };
        let high = matches!(
            register,
            VIRTIO_MMIO_QUEUE_DESC_HIGH
                | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
                | VIRTIO_MMIO_QUEUE_USED_HIGH
        );
        let addr = if high {
            (current & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (current & !0xffff_ffff) | u64::from(value)
        };
        let result = match name {
            "QueueDesc" => queue.try_set_desc_table_address(GuestAddress(addr)),
            "QueueDriver" => queue.try_set_avail_ring_address(GuestAddress(addr)),
            _ => queue.try_set_used_ring_address(GuestAddress(addr)),
        };
        result.map_err(|source| VirtioMmioError::BadQueueAddress {
            device,
            queue: queue_index,
            register: name,
            addr,
            source,
        })
    }

    fn write_status(&mut self, value: u32) {
        let device = self.device.name();
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if self.status & !value != 0 {
            warn!(
                device,
                old = self.status,
                new = value,
                "driver cleared device status bits without a reset"
            );
        }
        let newly_set = value & !self.status;
        if newly_set & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.device_features();
            let unknown = self.driver_features & !offered;
            if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Leaving FEATURES_OK clear tells the driver the feature set
                // is refused (virtio 1.x, 3.1.1).
                warn!(
                    device,
                    driver_features = self.driver_features,
                    offered,
                    "feature set refused: must include VIRTIO_F_VERSION_1 and only offered bits"
                );
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly_set & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            debug!(device, features = self.driver_features, "driver ready");
            self.device.activate(self.driver_features);
        }
        if newly_set & VIRTIO_CONFIG_S_FAILED != 0 {
            warn!(device, "driver gave up on the device (FAILED)");
        }
        self.status = value;
    }

    /// Processes queue `queue` after a QueueNotify: the device consumes all
    /// available chains, writes guest memory and the used ring, and sets
    /// InterruptStatus bit 0 when the driver is to be interrupted. A notify
    /// before DRIVER_OK or for a queue that is not ready does nothing.
    pub fn process_queue<M: GuestMemory>(
        &mut self,
        queue: u32,
        mem: &M,
    ) -> Result<QueueCompletion, VirtioMmioError> {
        let device = self.device.name();
        let num_queues = self.queues.len();
        let Some(q) = self.queues.get_mut(queue as usize) else {
            return Err(VirtioMmioError::NoSuchQueue {
                device,
                queue,
                num_queues,
            });
        };
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 || !q.ready() {
            warn!(
                device,
                queue,
                status = self.status,
                "notify of a queue that is not live, ignored"
            );
            return Ok(QueueCompletion::default());
        }
        let completion = self.device.process_queue(queue as usize, q, mem)?;
        if completion.raise_interrupt {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        }
        Ok(completion)
    }
}
