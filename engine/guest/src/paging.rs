// SPDX-License-Identifier: GPL-2.0-or-later
//! x86-64 4-level page walks over guest memory: replay writes recorded user
//! data at user virtual addresses of the recorded address space, and shared
//! memory the kernel read (io_uring's rings) at the kernel's addresses.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
#[cfg(test)]
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Walks the tables rooted at `cr3` to `va`: its guest-physical address
/// and whether user mode may access it (x86 grants that only where every
/// level has the user bit).
fn walk(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<(u64, bool)> {
    let mut table = cr3 & ADDR_MASK;
    let mut rights = USER;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        rights &= entry;
        // 1 GiB and 2 MiB pages end the walk at levels 2 and 1.
        if (level == 2 || level == 1) && entry & PAGE_SIZE_BIT != 0 {
            let page_mask = (1u64 << shift) - 1;
            return Some((
                (entry & ADDR_MASK & !page_mask) | (va & page_mask),
                rights != 0,
            ));
        }
        table = entry & ADDR_MASK;
    }
    Some((table | (va & 0xfff), rights != 0))
}

/// The guest-physical address of virtual address `va` under page tables
/// rooted at `cr3`, or `None` where a level is not present (or the tables
/// lie outside guest memory).
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    walk(mem, cr3, va).map(|(gpa, _)| gpa)
}

/// The guest-physical address of the 4 KiB page-table entry that maps
/// user address `va` (the entry itself may be not present), or `None`
/// where an upper level is not present, maps a large page or is not
/// open to user mode (the entry would belong to the kernel's half).
pub fn pte_location(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    for level in (1..4).rev() {
        let shift = 12 + 9 * level;
        let entry: u64 = mem
            .read_obj(GuestAddress(table + ((va >> shift) & 0x1ff) * 8))
            .ok()?;
        if entry & (PRESENT | USER) != PRESENT | USER
            || ((level == 2 || level == 1) && entry & PAGE_SIZE_BIT != 0)
        {
            return None;
        }
        table = entry & ADDR_MASK;
    }
    Some(table + ((va >> 12) & 0x1ff) * 8)
}

/// What [`write_user`] did with each byte (or a sum of such writes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserWrite {
    pub written: u64,
    /// On pages not present (or outside guest memory).
    pub not_present: u64,
    /// On pages user mode may not access (the kernel's), or past the top
    /// of the address space.
    pub refused: u64,
}

impl std::ops::AddAssign for UserWrite {
    fn add_assign(&mut self, other: UserWrite) {
        self.written += other.written;
        self.not_present += other.not_present;
        self.refused += other.refused;
    }
}

/// Writes `data` at user virtual address `va`, page by page, on user
/// pages only (the user bit of every level honoured), so that a recording
/// cannot make replay write the kernel's memory. Read-only user pages are
/// written: the kernel reads them too (after fork every private page is
/// read-only until written, and execve's strings come from such pages),
/// and user stores made before they became read-only were not replayed.
pub fn write_user(mem: &GuestMemoryMmap, cr3: u64, va: u64, data: &[u8]) -> UserWrite {
    write_pages(mem, cr3, va, data, true)
}

/// Writes `data` at `va` page by page where the page's user bit is `user`;
/// a page with the other bit is refused, one not present skipped.
fn write_pages(mem: &GuestMemoryMmap, cr3: u64, va: u64, data: &[u8], user: bool) -> UserWrite {
    let mut out = UserWrite::default();
    if va.checked_add(data.len() as u64).is_none() {
        out.refused = data.len() as u64;
        return out;
    }
    let mut done = 0usize;
    while done < data.len() {
        let at = va + done as u64;
        let n = ((0x1000 - (at & 0xfff)) as usize).min(data.len() - done);
        let bytes = n as u64;
        match walk(mem, cr3, at) {
            Some((_, page_user)) if page_user != user => out.refused += bytes,
            Some((gpa, _))
                if mem
                    .write_slice(&data[done..done + n], GuestAddress(gpa))
                    .is_ok() =>
            {
                out.written += bytes
            }
            _ => out.not_present += bytes,
        }
        done += n;
    }
    out
}

/// Writes `data` at kernel virtual address `va` (memory the kernel read
/// through its own mapping of pages user space shares, such as io_uring's
/// rings), page by page: only in the kernel's half and on pages user mode
/// may not access, so a recording cannot aim it at user memory; a page not
/// present or outside guest memory is skipped. The caller trusts the
/// recording as far as it trusts its other kernel inputs.
pub fn write_kernel(mem: &GuestMemoryMmap, cr3: u64, va: u64, data: &[u8]) -> UserWrite {
    const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
    if va < KERNEL_HALF {
        return UserWrite {
            refused: data.len() as u64,
            ..UserWrite::default()
        };
    }
    write_pages(mem, cr3, va, data, false)
}

/// The `len` bytes at kernel virtual address `va`, or `None` where a page
/// of them is not mapped (or not in guest memory).
pub fn read_kernel(mem: &GuestMemoryMmap, cr3: u64, va: u64, len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        let at = va.checked_add(done as u64)?;
        let n = ((0x1000 - (at & 0xfff)) as usize).min(len - done);
        let gpa = translate(mem, cr3, at)?;
        mem.read_slice(&mut out[done..done + n], GuestAddress(gpa))
            .ok()?;
        done += n;
    }
    Some(out)
}

/// Replaces the NUL bytes of `[va, va + len)` on user pages with `filler`
/// (other bytes stay as they are): what replay knows of a string the
/// kernel only measured (strnlen_user) is that it held no NUL there.
pub fn fill_user_nuls(mem: &GuestMemoryMmap, cr3: u64, va: u64, len: u64, filler: u8) -> UserWrite {
    let mut out = UserWrite::default();
    let Some(end) = va.checked_add(len) else {
        out.refused = len;
        return out;
    };
    let mut at = va;
    while at < end {
        let n = (0x1000 - (at & 0xfff)).min(end - at);
        match walk(mem, cr3, at) {
            Some((_, false)) => out.refused += n,
            Some((gpa, _)) => {
                let mut page = vec![0u8; n as usize];
                if mem.read_slice(&mut page, GuestAddress(gpa)).is_err() {
                    out.not_present += n;
                } else {
                    page.iter_mut()
                        .filter(|b| **b == 0)
                        .for_each(|b| *b = filler);
                    match mem.write_slice(&page, GuestAddress(gpa)) {
                        Ok(()) => out.written += n,
                        Err(_) => out.not_present += n,
                    }
                }
            }
            None => out.not_present += n,
        }
        at += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page tables at 0x1000.. mapping user va 0x40_0000 (4 KiB page) to
    /// 0x9000, va 0x40_1000 read-only to 0xa000, va 0x7f_ffe0_0000.. (a
    /// 2 MiB page) to 0x20_0000, and kernel va 0xffff_8880_0000_0000 (a
    /// supervisor 2 MiB page) to 0x40_0000.
    fn memory() -> (GuestMemoryMmap, u64) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let w = |addr: u64, v: u64| mem.write_obj(v, GuestAddress(addr)).unwrap();
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        let user_rw = PRESENT | WRITABLE | USER;
        w(pml4, pdpt | user_rw);
        w(pdpt, pd | user_rw);
        w(pd + 2 * 8, pt | user_rw); // 0x40_0000 >> 21 == 2
        w(pt, 0x9000 | user_rw);
        w(pt + 8, 0xa000 | PRESENT | USER);
        // va 0x7f_ffe0_0000: pml4 0 (as above), pdpt 0x1ff, pd 0x1ff
        w(pdpt + 0x1ff * 8, 0x5000 | user_rw);
        w(0x5000 + 0x1ff * 8, 0x20_0000 | user_rw | PAGE_SIZE_BIT);
        // The kernel's direct map: pml4 0x111, pdpt 0, pd 0.
        w(pml4 + 0x111 * 8, 0x6000 | PRESENT | WRITABLE);
        w(0x6000, 0x7000 | PRESENT | WRITABLE);
        w(0x7000, 0x40_0000 | PRESENT | WRITABLE | PAGE_SIZE_BIT);
        (mem, pml4)
    }

    const KERNEL_VA: u64 = 0xffff_8880_0000_0000;

    #[test]
    fn walks_4k_and_2m_pages() {
        let (mem, cr3) = memory();
        assert_eq!(translate(&mem, cr3, 0x40_0123), Some(0x9123));
        assert_eq!(translate(&mem, cr3, 0x7f_ffe1_2345), Some(0x21_2345));
        assert_eq!(translate(&mem, cr3, KERNEL_VA + 0x10), Some(0x40_0010));
        assert_eq!(translate(&mem, cr3, 0x40_2000), None);
        assert_eq!(translate(&mem, cr3, 0x8000_0000), None);
    }

    #[test]
    fn finds_the_entry_of_a_user_4k_page_only() {
        let (mem, cr3) = memory();
        assert_eq!(pte_location(&mem, cr3, 0x40_0123), Some(0x4000));
        assert_eq!(pte_location(&mem, cr3, 0x40_2000), Some(0x4010));
        // Mapped by a 2 MiB page: no 4 KiB entry.
        assert_eq!(pte_location(&mem, cr3, 0x7f_ffe1_2345), None);
        // The kernel's half is not user mode's to touch.
        assert_eq!(pte_location(&mem, cr3, KERNEL_VA + 0x1000), None);
    }

    #[test]
    fn writes_across_a_missing_page() {
        let (mem, cr3) = memory();
        let data = vec![0xabu8; 0x20];
        // The last 0x10 bytes fall past the 2 MiB page, where nothing is
        // mapped.
        let done = write_user(&mem, cr3, 0x7f_ffff_fff0, &data);
        assert_eq!((done.written, done.not_present), (0x10, 0x10));
        let mut back = [0u8; 0x10];
        mem.read_slice(&mut back, GuestAddress(0x3f_fff0)).unwrap();
        assert_eq!(back, [0xab; 0x10]);
    }

    /// A recording's user data aimed at kernel memory (a supervisor page,
    /// or an address that wraps past the top) is refused, and the memory
    /// behind it keeps its bytes; a read-only user page is written (see
    /// [`write_user`]).
    #[test]
    fn nuls_of_a_measured_string_are_filled_and_its_bytes_kept() {
        let (mem, cr3) = memory();
        // User va 0x40_0000 maps guest page 0x9000.
        mem.write_slice(b"ab\0d\0", GuestAddress(0x9100)).unwrap();
        let done = fill_user_nuls(&mem, cr3, 0x40_0100, 6, 1);
        assert_eq!(done.written, 6);
        let mut now = [0u8; 7];
        mem.read_slice(&mut now, GuestAddress(0x9100)).unwrap();
        assert_eq!(&now, b"ab\x01d\x01\x01\0");
        assert_eq!(fill_user_nuls(&mem, cr3, KERNEL_VA, 4, 1).refused, 4);
        assert_eq!(fill_user_nuls(&mem, cr3, u64::MAX - 1, 4, 1).refused, 4);
    }

    /// Shared memory the kernel read is written through the kernel's
    /// mapping only: never at a user address, on a user page, past the top
    /// of the address space, or outside guest memory.
    #[test]
    fn kernel_writes_stay_on_the_kernels_pages() {
        let (mem, cr3) = memory();
        let data = [0x5au8; 16];
        let done = write_kernel(&mem, cr3, KERNEL_VA + 0x1f8, &data);
        assert_eq!(done.written, 16);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x40_0200)).unwrap(),
            0x5a5a_5a5a_5a5a_5a5a
        );
        // A user address (mapped), and an address that wraps.
        assert_eq!(write_kernel(&mem, cr3, 0x40_0100, &data).refused, 16);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9100)).unwrap(), 0);
        assert_eq!(write_kernel(&mem, cr3, u64::MAX - 7, &data).refused, 16);
        // Not mapped in the kernel's half.
        assert_eq!(
            write_kernel(&mem, cr3, KERNEL_VA + (1 << 30), &data).not_present,
            16
        );
        // A kernel-half entry open to user mode is not the kernel's.
        let pml4_user = 0x1000 + 0x111 * 8;
        mem.write_obj(0x6000 | PRESENT | WRITABLE | USER, GuestAddress(pml4_user))
            .unwrap();
        mem.write_obj(0x7000 | PRESENT | WRITABLE | USER, GuestAddress(0x6000))
            .unwrap();
        mem.write_obj(
            0x40_0000 | PRESENT | WRITABLE | USER | PAGE_SIZE_BIT,
            GuestAddress(0x7000),
        )
        .unwrap();
        assert_eq!(
            write_kernel(&mem, cr3, KERNEL_VA + 0x300, &data).refused,
            16
        );
        // A mapping past the end of guest memory (8 MiB here).
        mem.write_obj(0x6000 | PRESENT | WRITABLE, GuestAddress(pml4_user))
            .unwrap();
        mem.write_obj(0x7000 | PRESENT | WRITABLE, GuestAddress(0x6000))
            .unwrap();
        mem.write_obj(
            (64 << 20) | PRESENT | WRITABLE | PAGE_SIZE_BIT,
            GuestAddress(0x7000),
        )
        .unwrap();
        let done = write_kernel(&mem, cr3, KERNEL_VA + 0x10, &data);
        assert_eq!((done.written, done.not_present), (0, 16));
    }

    #[test]
    fn user_writes_honour_the_user_bit() {
        let (mem, cr3) = memory();
        let data = [0xcdu8; 8];
        let refused = UserWrite {
            refused: 8,
            ..UserWrite::default()
        };
        let written = UserWrite {
            written: 8,
            ..UserWrite::default()
        };
        assert_eq!(write_user(&mem, cr3, KERNEL_VA + 0x100, &data), refused);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x40_0100)).unwrap(), 0);
        assert_eq!(write_user(&mem, cr3, u64::MAX - 3, &data), refused);
        // A user page whose upper level is the kernel's.
        mem.write_obj(0x2000 | PRESENT | WRITABLE, GuestAddress(cr3))
            .unwrap();
        assert_eq!(write_user(&mem, cr3, 0x40_0100, &data), refused);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9100)).unwrap(), 0);
        mem.write_obj(0x2000 | PRESENT | WRITABLE | USER, GuestAddress(cr3))
            .unwrap();
        assert_eq!(write_user(&mem, cr3, 0x40_0100, &data), written);
        assert_eq!(write_user(&mem, cr3, 0x40_1100, &data), written);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0xa100)).unwrap(),
            0xcdcd_cdcd_cdcd_cdcd
        );
    }
}
