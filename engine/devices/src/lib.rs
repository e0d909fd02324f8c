// SPDX-License-Identifier: GPL-2.0-or-later
//! Device models. Each is deterministic: it never reads host time; virtual time
//! is passed in by the run loop.

pub mod cmos;
pub mod console;
pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod serial;
pub mod virtio_blk;
pub mod virtio_mmio;
