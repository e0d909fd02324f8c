// SPDX-License-Identifier: GPL-2.0-or-later
//! Kernel symbols from `System.map`, to name RIPs (function+offset) in
//! divergence reports.

use std::path::Path;

/// Text symbols sorted by address.
#[derive(Debug, Default)]
pub struct Symbols {
    entries: Vec<(u64, String)>,
}

impl Symbols {
    /// Reads a `System.map` (`ADDRESS TYPE NAME` lines); only text symbols
    /// (`t`/`T`/`w`/`W`) are kept.
    pub fn from_system_map(path: &Path) -> std::io::Result<Symbols> {
        let text = std::fs::read_to_string(path)?;
        let mut entries: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
            })
            .collect();
        entries.sort();
        Ok(Symbols { entries })
    }

    /// The `System.map` beside a kernel image or vmlinux, if there is one.
    pub fn beside(image: &Path) -> Option<Symbols> {
        let map = image.parent()?.join("System.map");
        Symbols::from_system_map(&map).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The address of symbol `name`.
    pub fn address(&self, name: &str) -> Option<u64> {
        self.entries.iter().find(|(_, n)| n == name).map(|e| e.0)
    }

    /// `function+0xoffset` for `addr`, or the bare address.
    pub fn name(&self, addr: u64) -> String {
        let i = self.entries.partition_point(|e| e.0 <= addr);
        match i.checked_sub(1).map(|i| &self.entries[i]) {
            // Past the last symbol by more than a page: not in the kernel text.
            Some((base, name)) if addr - base < 1 << 20 => {
                format!("{name}+{:#x} ({addr:#x})", addr - base)
            }
            _ => format!("{addr:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_by_the_preceding_text_symbol() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("System.map");
        std::fs::write(
            &map,
            "ffffffff81000000 T _stext\nffffffff81000100 t do_one\nffffffff81000200 D some_data\nffffffff81000300 T do_two\n",
        )
        .unwrap();
        let s = Symbols::from_system_map(&map).unwrap();
        assert_eq!(
            s.name(0xffff_ffff_8100_0123),
            "do_one+0x23 (0xffffffff81000123)"
        );
        // Data symbols are skipped: 0x250 is still in do_one.
        assert!(s.name(0xffff_ffff_8100_0250).starts_with("do_one+0x150"));
        assert_eq!(s.name(0x1000), "0x1000");
        assert_eq!(s.address("do_two"), Some(0xffff_ffff_8100_0300));
    }
}
