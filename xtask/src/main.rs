// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask`: the project's front door.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("xtask: not implemented yet")
}
