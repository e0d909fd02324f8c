// SPDX-License-Identifier: GPL-2.0-or-later
//! Kernel symbols from `System.map`, to name RIPs (function+offset) in
//! divergence reports.

use std::path::Path;

/// Section markers kept besides the text symbols (checkpoints digest the
/// kernel's data and bss, [`krr_record::checkpoint`]).
const SECTION_MARKERS: &[&str] = &["_sdata", "_edata", "__bss_start", "__bss_stop"];

/// Text symbols sorted by address, and the section markers.
#[derive(Debug, Default)]
pub struct Symbols {
    entries: Vec<(u64, String)>,
    markers: Vec<(u64, String)>,
}

impl Symbols {
    /// Reads a `System.map` (`ADDRESS TYPE NAME` lines); only text symbols
    /// (`t`/`T`/`w`/`W`) are kept.
    pub fn from_system_map(path: &Path) -> std::io::Result<Symbols> {
        let text = std::fs::read_to_string(path)?;
        let mut entries = Vec::new();
        let mut markers = Vec::new();
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if matches!(kind, "t" | "T" | "w" | "W") {
                entries.push((addr, name.to_string()));
            } else if SECTION_MARKERS.contains(&name) {
                markers.push((addr, name.to_string()));
            }
        }
        entries.sort();
        Ok(Symbols { entries, markers })
    }

    /// The `System.map` beside a kernel image or vmlinux, if there is one.
    pub fn beside(image: &Path) -> Option<Symbols> {
        let map = image.parent()?.join("System.map");
        Symbols::from_system_map(&map).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The address of text symbol or section marker `name`.
    pub fn address(&self, name: &str) -> Option<u64> {
        self.entries
            .iter()
            .chain(&self.markers)
            .find(|(_, n)| n == name)
            .map(|e| e.0)
    }

    /// The text symbol `addr` lies in (the nearest one at or below it,
    /// within 1 MiB), if any.
    pub fn function_at(&self, addr: u64) -> Option<&str> {
        let i = self.entries.partition_point(|e| e.0 <= addr);
        let (base, name) = &self.entries[i.checked_sub(1)?];
        (addr - base < 1 << 20).then_some(name.as_str())
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
        assert_eq!(s.function_at(0xffff_ffff_8100_0250), Some("do_one"));
        assert_eq!(s.function_at(0xffff_ffff_8100_0300), Some("do_two"));
        assert_eq!(s.function_at(0x1000), None);
    }
}
