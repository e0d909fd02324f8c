// SPDX-License-Identifier: GPL-2.0-or-later
//! The kernel record-replay engine, one name for its crates.
//!
//! A machine model (guest memory, boot, devices, interrupt controllers and a
//! virtual clock; `krr-machine`) is driven by interchangeable CPU backends
//! behind one [`hypervisor::Vcpu`] trait (`krr-hypervisor`): the software
//! CPU (unicorn, exact instruction counts) and KVM (hardware speed). The
//! recorder (`krr-record`) observes a machine's run; the replayer
//! (`krr-replay`) runs the recorded kernel alone. Dependencies point one
//! way: hypervisor, devices <- machine <- record <- replay <- this crate
//! (the `krr` binary, its benchmarks and validation harness); guest
//! inspection (`krr-guest`) serves record and replay.

pub use krr_devices as devices;
pub use krr_guest as guest;
pub use krr_hypervisor as hypervisor;
pub use krr_machine as machine;
pub use krr_record as record;
pub use krr_replay as replay;

pub mod bench;
pub mod harness;
pub mod log_cli;
