// SPDX-License-Identifier: GPL-2.0-or-later
//! Recording: the guest-agent ABI, the engine-side recorder and the log.
