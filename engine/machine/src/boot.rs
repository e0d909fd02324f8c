// SPDX-License-Identifier: GPL-2.0-or-later
//! Direct Linux boot (x86 boot protocol 2.x, 64-bit entry): the bzImage's
//! protected-mode kernel is loaded by linux-loader, boot_params with an e820
//! map, command line and initramfs are written, and the boot CPU starts in
//! long mode at the 64-bit entry point with identity-mapped page tables.

use krr_hypervisor::{DescriptorTable, Regs, Segment, Sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const GDT_ADDR: u64 = 0x500;
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the EBDA-like hole below 1 MiB (reserved in e820).
pub const LOWMEM_END: u64 = 0x9_fc00;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is not a loadable bzImage: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("command line {cmdline:?} is invalid: {reason}")]
    Cmdline { cmdline: String, reason: String },
    #[error("initramfs {path} ({size} bytes) does not fit below {limit:#x} in guest memory")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("writing {what} into guest memory failed: {reason}")]
    Memory { what: &'static str, reason: String },
}

/// Where the kernel landed and how the boot CPU starts.
#[derive(Debug, Clone)]
pub struct BootInfo {
    pub entry: u64,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
    pub regs: Regs,
    pub sregs: Sregs,
}

fn mem_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> BootError {
    move |e| BootError::Memory {
        what,
        reason: e.to_string(),
    }
}

/// The e820 map for `mem_size` bytes of RAM starting at 0, plus `reserved`
/// ranges (address, length) above it that the kernel must leave alone (the
/// recorder's ring).
pub fn e820_map(mem_size: u64, reserved: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, LOWMEM_END, E820_RAM),
        (LOWMEM_END, 0xa0000 - LOWMEM_END, E820_RESERVED),
        (0xf0000, 0x10000, E820_RESERVED),
        (HIMEM_START, mem_size - HIMEM_START, E820_RAM),
    ];
    map.extend(
        reserved
            .iter()
            .map(|&(addr, len)| (addr, len, E820_RESERVED)),
    );
    map
}

/// Writes identity-mapping page tables (4 GiB in 2 MiB pages) and a GDT with
/// the boot protocol's code (0x10) and data (0x18) segments.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let gdt: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err("GDT"))?;
    }
    mem.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR))
        .map_err(mem_err("page tables"))?;
    for i in 0..4u64 {
        mem.write_obj((PD_ADDR + i * 0x1000) | 3, GuestAddress(PDPT_ADDR + i * 8))
            .map_err(mem_err("page tables"))?;
    }
    for i in 0..2048u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
            .map_err(mem_err("page tables"))?;
    }
    Ok(())
}

/// Long-mode register state for an entry at `rip` with `rsi` = boot_params.
pub fn long_mode_state(rip: u64, rsi: u64) -> (Regs, Sregs) {
    let code = Segment {
        selector: 0x10,
        base: 0,
        limit: 0xffff_ffff,
        type_: 0xb,
        present: true,
        dpl: 0,
        db: false,
        s: true,
        l: true,
        g: true,
        avl: false,
        unusable: false,
    };
    let data = Segment {
        selector: 0x18,
        type_: 0x3,
        db: true,
        l: false,
        ..code
    };
    let tss = Segment {
        selector: 0,
        type_: 0xb,
        s: false,
        l: false,
        g: false,
        limit: 0x67,
        ..code
    };
    let ldt = Segment {
        selector: 0,
        type_: 0x2,
        s: false,
        l: false,
        g: false,
        present: false,
        unusable: true,
        limit: 0,
        ..code
    };
    let regs = Regs {
        rip,
        rsi,
        rsp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    let sregs = Sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt,
        gdt: DescriptorTable {
            base: GDT_ADDR,
            limit: 31,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: 0x8000_0011,
        cr2: 0,
        cr3: PML4_ADDR,
        cr4: 0x20,
        cr8: 0,
        efer: 0x500,
        apic_base: 0,
    };
    (regs, sregs)
}

/// Loads `kernel` (bzImage), `initrd` and `cmdline` into `mem` (RAM from 0
/// to `mem_size`, then the `reserved` ranges the e820 map marks reserved)
/// and returns the boot CPU's initial state.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    reserved: &[(u64, u64)],
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let mut kfile = std::fs::File::open(kernel).map_err(|source| BootError::Read {
        what: "kernel",
        path: kernel.into(),
        source,
    })?;
    let loaded =
        BzImage::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            BootError::Kernel {
                path: kernel.into(),
                reason: e.to_string(),
            }
        })?;
    let hdr = loaded.setup_header.ok_or_else(|| BootError::Kernel {
        path: kernel.into(),
        reason: "no setup header".into(),
    })?;
    let version = hdr.version;
    if version < 0x020c {
        return Err(BootError::Kernel {
            path: kernel.into(),
            reason: format!(
                "boot protocol {version:#x} has no 64-bit entry (2.12 or newer needed)"
            ),
        });
    }
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline {
        cmdline: cmdline.into(),
        reason: e.to_string(),
    })?;
    cl.insert_str(cmdline).map_err(|e| BootError::Cmdline {
        cmdline: cmdline.into(),
        reason: e.to_string(),
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(|e| BootError::Cmdline {
        cmdline: cmdline.into(),
        reason: e.to_string(),
    })?;

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    // CAN_USE_HEAP | LOADED_HIGH
    params.hdr.loadflags |= 0x81;
    params.hdr.heap_end_ptr = 0xfe00;

    let mut initrd_range = None;
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|source| BootError::Read {
            what: "initramfs",
            path: path.into(),
            source,
        })?;
        let initrd_addr_max = hdr.initrd_addr_max;
        let max = if initrd_addr_max != 0 {
            (initrd_addr_max as u64 + 1).min(mem_size)
        } else {
            mem_size.min(0x3800_0000)
        };
        let size = data.len() as u64;
        let start = max
            .checked_sub(size)
            .map(|s| s & !0xfff)
            .filter(|&s| s >= loaded.kernel_end.max(HIMEM_START));
        let start = start.ok_or(BootError::InitrdTooBig {
            path: path.into(),
            size,
            limit: max,
        })?;
        mem.write_slice(&data, GuestAddress(start))
            .map_err(mem_err("initramfs"))?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
        initrd_range = Some((start, size));
    }
    let map = e820_map(mem_size, reserved);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(BOOT_PARAMS_ADDR)),
        mem,
    )
    .map_err(|e| BootError::Memory {
        what: "boot_params",
        reason: e.to_string(),
    })?;
    write_boot_tables(mem)?;

    // The 64-bit entry is 0x200 past the protected-mode kernel's start.
    let entry = loaded.kernel_load.raw_value() + 0x200;
    let (regs, sregs) = long_mode_state(entry, BOOT_PARAMS_ADDR);
    Ok(BootInfo {
        entry,
        kernel_end: loaded.kernel_end,
        initrd: initrd_range,
        regs,
        sregs,
    })
}

/// Register state of an application processor after INIT and a startup
/// IPI with `vector`: real mode at `vector << 12`.
pub fn real_mode_state(vector: u8, apic_base: u64) -> (Regs, Sregs) {
    let code = Segment {
        selector: (vector as u16) << 8,
        base: (vector as u64) << 12,
        limit: 0xffff,
        type_: 0xb,
        present: true,
        dpl: 0,
        db: false,
        s: true,
        l: false,
        g: false,
        avl: false,
        unusable: false,
    };
    let data = Segment {
        selector: 0,
        base: 0,
        type_: 0x3,
        ..code
    };
    let sys = |type_| Segment {
        selector: 0,
        base: 0,
        type_,
        s: false,
        ..code
    };
    let regs = Regs {
        rip: 0,
        rflags: 0x2,
        // Processor signature (family 6), as after RESET.
        rdx: 0x663,
        ..Default::default()
    };
    let sregs = Sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: sys(0xb),
        ldt: sys(0x2),
        gdt: DescriptorTable {
            base: 0,
            limit: 0xffff,
        },
        idt: DescriptorTable {
            base: 0,
            limit: 0xffff,
        },
        cr0: 0x6000_0010,
        cr2: 0,
        cr3: 0,
        cr4: 0,
        cr8: 0,
        efer: 0,
        apic_base,
    };
    (regs, sregs)
}
