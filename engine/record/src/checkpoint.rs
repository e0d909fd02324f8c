// SPDX-License-Identifier: GPL-2.0-or-later
//! Checkpoints (`krr record --checkpoint-every N`): at a vCPU stop in the
//! kernel, the vCPU's registers and a sha256 of the kernel image's writable
//! memory, its data and bss sections. Replay stops at the same kernel
//! instruction and compares both, so a divergence shows up where it
//! happens, not at the next input the kernel reads.
//!
//! Why data and bss: they hold the kernel's global state (jiffies, the
//! scheduler's, the allocators' and the agent's variables), which kernel-only
//! replay reproduces exactly. Most other RAM is not comparable: user pages
//! are written by user code, which replay does not run.
//!
//! The sections are read through the vCPU's page tables (its CR3), so the
//! digest does not depend on where the kernel was loaded (KASLR).

use krr_guest::paging;
use krr_guest::symbols::Symbols;
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The kernel's data and bss, as virtual address ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImage {
    ranges: Vec<(u64, u64)>,
}

impl KernelImage {
    /// The ranges `[_sdata, _edata)` and `[__bss_start, __bss_stop)` from
    /// the kernel's `System.map`; `None` when a marker is missing.
    pub fn from_symbols(symbols: &Symbols) -> Option<KernelImage> {
        let range = |from: &str, to: &str| {
            let (a, b) = (symbols.address(from)?, symbols.address(to)?);
            (a < b).then_some((a, b))
        };
        Some(KernelImage {
            ranges: vec![
                range("_sdata", "_edata")?,
                range("__bss_start", "__bss_stop")?,
            ],
        })
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// sha256 of the ranges read through the page tables at `cr3`, page by
    /// page; a page that is not mapped contributes its address and a
    /// marker instead of its bytes (so "not mapped" differs from zeros).
    pub fn digest(&self, mem: &GuestMemoryMmap, cr3: u64) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut page = vec![0u8; 4096];
        for &(start, end) in &self.ranges {
            let mut va = start;
            while va < end {
                let n = ((0x1000 - (va & 0xfff)).min(end - va)) as usize;
                let read = paging::translate(mem, cr3, va)
                    .and_then(|pa| mem.read_slice(&mut page[..n], GuestAddress(pa)).ok());
                match read {
                    Some(()) => h.update(&page[..n]),
                    None => {
                        h.update(b"unmapped");
                        h.update(va.to_le_bytes());
                    }
                }
                va += n as u64;
            }
        }
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identity-mapped 2 MiB pages for the first 1 GiB at CR3 0x1000.
    fn identity_tables(mem: &GuestMemoryMmap) -> u64 {
        mem.write_obj(0x2000u64 | 3, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3000u64 | 3, GuestAddress(0x2000)).unwrap();
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(0x3000 + i * 8))
                .unwrap();
        }
        0x1000
    }

    #[test]
    fn digest_covers_data_and_bss_and_nothing_else() {
        let mem = krr_machine::create_memory(64 << 20).unwrap();
        let cr3 = identity_tables(&mem);
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("System.map");
        std::fs::write(
            &map,
            "0000000000400000 D _sdata\n0000000000401800 D _edata\n0000000000500000 B __bss_start\n0000000000500100 B __bss_stop\n0000000000100000 T _stext\n",
        )
        .unwrap();
        let image = KernelImage::from_symbols(&Symbols::from_system_map(&map).unwrap()).unwrap();
        assert_eq!(image.len(), 0x1800 + 0x100);
        let before = image.digest(&mem, cr3);
        // Outside the ranges: same digest.
        mem.write_obj(0xffu8, GuestAddress(0x401800)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x100000)).unwrap();
        assert_eq!(image.digest(&mem, cr3), before);
        // In data (second page) and in bss: different digests.
        mem.write_obj(1u8, GuestAddress(0x4017ff)).unwrap();
        let data_changed = image.digest(&mem, cr3);
        assert_ne!(data_changed, before);
        mem.write_obj(1u8, GuestAddress(0x5000ff)).unwrap();
        assert_ne!(image.digest(&mem, cr3), data_changed);
    }

    #[test]
    fn missing_markers_give_no_image() {
        let dir = tempfile::tempdir().unwrap();
        let map = dir.path().join("System.map");
        std::fs::write(&map, "0000000000400000 D _sdata\n").unwrap();
        assert!(KernelImage::from_symbols(&Symbols::from_system_map(&map).unwrap()).is_none());
    }
}
