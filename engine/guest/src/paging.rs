// SPDX-License-Identifier: GPL-2.0-or-later
//! x86-64 4-level page walks over guest memory: replay writes recorded user
//! data at user virtual addresses of the recorded address space.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The guest-physical address of virtual address `va` under page tables
/// rooted at `cr3`, or `None` where a level is not present (or the tables
/// lie outside guest memory).
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        // 1 GiB and 2 MiB pages end the walk at levels 2 and 1.
        if (level == 2 || level == 1) && entry & PAGE_SIZE_BIT != 0 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    Some(table | (va & 0xfff))
}

/// The guest-physical address of the 4 KiB page-table entry that maps
/// `va` (the entry itself may be not present), or `None` where an upper
/// level is not present or maps a large page.
pub fn pte_location(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    for level in (1..4).rev() {
        let shift = 12 + 9 * level;
        let entry: u64 = mem
            .read_obj(GuestAddress(table + ((va >> shift) & 0x1ff) * 8))
            .ok()?;
        if entry & PRESENT == 0 || ((level == 2 || level == 1) && entry & PAGE_SIZE_BIT != 0) {
            return None;
        }
        table = entry & ADDR_MASK;
    }
    Some(table + ((va >> 12) & 0x1ff) * 8)
}

/// Writes `data` at virtual address `va`, page by page. Returns the bytes
/// that could not be written (pages not present).
pub fn write_virtual(mem: &GuestMemoryMmap, cr3: u64, va: u64, data: &[u8]) -> usize {
    let mut missed = 0;
    let mut done = 0usize;
    while done < data.len() {
        let at = va.wrapping_add(done as u64);
        let in_page = (0x1000 - (at & 0xfff)) as usize;
        let n = in_page.min(data.len() - done);
        match translate(mem, cr3, at) {
            Some(gpa)
                if mem
                    .write_slice(&data[done..done + n], GuestAddress(gpa))
                    .is_ok() => {}
            _ => missed += n,
        }
        done += n;
    }
    missed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page tables at 0x1000.. mapping va 0x40_0000 (4 KiB page) to 0x9000
    /// and va 0x7f_ffe0_0000.. (a 2 MiB page) to 0x20_0000.
    fn memory() -> (GuestMemoryMmap, u64) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let w = |addr: u64, v: u64| mem.write_obj(v, GuestAddress(addr)).unwrap();
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        w(pml4, pdpt | 3);
        w(pdpt, pd | 3);
        w(pd + 2 * 8, pt | 3); // 0x40_0000 >> 21 == 2
        w(pt, 0x9000 | 3);
        // va 0x7f_ffe0_0000: pml4 0 (as above), pdpt 0x1ff, pd 0x1ff
        w(pdpt + 0x1ff * 8, 0x5000 | 3);
        w(0x5000 + 0x1ff * 8, 0x20_0000 | 3 | PAGE_SIZE_BIT);
        (mem, pml4)
    }

    #[test]
    fn walks_4k_and_2m_pages() {
        let (mem, cr3) = memory();
        assert_eq!(translate(&mem, cr3, 0x40_0123), Some(0x9123));
        assert_eq!(translate(&mem, cr3, 0x7f_ffe1_2345), Some(0x21_2345));
        assert_eq!(translate(&mem, cr3, 0x40_1000), None);
        assert_eq!(translate(&mem, cr3, 0x8000_0000), None);
    }

    #[test]
    fn finds_the_entry_of_a_4k_page_only() {
        let (mem, cr3) = memory();
        assert_eq!(pte_location(&mem, cr3, 0x40_0123), Some(0x4000));
        assert_eq!(pte_location(&mem, cr3, 0x40_1000), Some(0x4008));
        // Mapped by a 2 MiB page: no 4 KiB entry.
        assert_eq!(pte_location(&mem, cr3, 0x7f_ffe1_2345), None);
    }

    #[test]
    fn writes_across_a_missing_page() {
        let (mem, cr3) = memory();
        let data = vec![0xabu8; 0x20];
        // The last 0x10 bytes fall on the unmapped page after 0x40_0000.
        assert_eq!(write_virtual(&mem, cr3, 0x40_0ff0, &data), 0x10);
        let mut back = [0u8; 0x10];
        mem.read_slice(&mut back, GuestAddress(0x9ff0)).unwrap();
        assert_eq!(back, [0xab; 0x10]);
    }
}
