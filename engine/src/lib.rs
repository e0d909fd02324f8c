// SPDX-License-Identifier: GPL-2.0-or-later
//! The kernel record-replay engine.
//!
//! A machine model (guest memory, boot, devices, interrupt controllers and a
//! virtual clock) is driven by interchangeable CPU backends behind one
//! [`hypervisor::Vcpu`] trait: the software CPU (unicorn, exact instruction
//! counts) and KVM (hardware speed).

pub mod bench;
pub mod devices;
pub mod guest;
pub mod harness;
pub mod hypervisor;
pub mod machine;
pub mod record;
pub mod replay;
