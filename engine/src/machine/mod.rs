// SPDX-License-Identifier: GPL-2.0-or-later
//! The machine model: guest memory, boot, device wiring and the run loop.

pub mod mptable;
