// SPDX-License-Identifier: GPL-2.0-or-later
//! Recording: the guest-agent ABI, the engine-side recorder and the log.
//!
//! [`abi`] is the shared-memory ring the `-krr` guest kernel's agent writes
//! (defined once here; the agent's C header is generated from it).

pub mod abi;
pub mod checkpoint;
pub mod event;
pub mod log;
pub mod memory_image;
pub mod recorder;
pub mod recording;
pub mod session;
