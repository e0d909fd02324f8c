// SPDX-License-Identifier: GPL-2.0-or-later
//! Guest inspection, below the machine and above nothing but guest memory:
//! page-table walks and kernel symbols. Record (checkpoint digests), replay
//! (user memory written back, divergence reports) and the coming debugger
//! use it.

pub mod paging;
pub mod symbols;
