// SPDX-License-Identifier: GPL-2.0-or-later
//! `krr`: run, record and replay a guest kernel.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("krr: no subcommand is implemented yet")
}
