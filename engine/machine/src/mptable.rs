// SPDX-License-Identifier: GPL-2.0-or-later
//! Intel MultiProcessor Specification 1.4 tables, the way a guest without
//! ACPI (CONFIG_X86_MPPARSE=y) finds its processors and interrupt routing.
//!
//! # Placement and e820
//! The floating pointer is written at [`MPTABLE_START`] = 0xf0000, in the
//! BIOS ROM area that Linux scans (`smp_scan_config(0xF0000, 0x10000)`), and
//! the configuration table follows it directly. The table occupies
//! `[MPTABLE_START, MPTABLE_START + MpTableRegion::len)`, at most
//! [`MPTABLE_MAX_SIZE`] bytes, all inside 0xf0000-0xfffff. The engine's e820
//! map must not report 0xa0000-0xfffff as usable RAM (report it reserved or
//! leave it out; Linux also reserves 0xa0000-0x100000 itself in
//! `trim_bios_range`), and guest memory must be backed at 0xf0000 so the
//! table can be written there.
//!
//! # Contents
//! * one processor entry per vCPU, APIC IDs 0..num_cpus, CPU 0 flagged BSP;
//! * one bus, ISA, ID 0;
//! * one IO-APIC at 0xfec00000 with ID `num_cpus` (see [`ioapic_id`]);
//! * I/O interrupt entries for ISA IRQs 0-15 except the cascade IRQ 2: IRQ n
//!   on IO-APIC pin n, except IRQ 0 (PIT) on pin 2 (the usual interrupt
//!   source override), all conforming to the ISA bus (edge, active high);
//! * local interrupt entries: ExtINT on LINT0 and NMI on LINT1 of all
//!   local APICs.
//!
//! Pins 16-23 get no entry: without ACPI, Linux only hands out IRQs for
//! pins that have an MP entry, and its comments reserve IRQ numbers above 15
//! for ACPI systems. virtio-mmio devices should therefore use ISA IRQs that no
//! other device of the machine uses (the PIT has 0, the UART 4, the CMOS RTC
//! 8, the FPU 13): 3, 5, 6, 7, 9, 10, 11, 12, 14, 15.

use thiserror::Error;
use tracing::debug;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use krr_devices::ioapic::{IOAPIC_BASE, IOAPIC_VERSION};
use krr_devices::lapic::{LAPIC_BASE, LAPIC_VERSION};

/// Guest-physical address of the MP floating pointer structure.
pub const MPTABLE_START: u64 = 0x000f_0000;
/// The tables never extend past the end of the BIOS area.
pub const MPTABLE_MAX_SIZE: u64 = 0x1_0000;
/// Largest vCPU count: APIC IDs 0..=253, 254 is the IO-APIC, 255 is the
/// broadcast ID.
pub const MAX_CPUS: u8 = 254;

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPU signature (family 6) and CPUID.1:EDX feature flags (FPU, APIC) for
/// the processor entries; Linux ignores both but the spec wants values.
const CPU_SIGNATURE: u32 = 0x0000_0600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_BUS_ID: u8 = 0;
const SPEC_REVISION: u8 = 4;
const OEM_ID: &[u8; 8] = b"KRR     ";
const PRODUCT_ID: &[u8; 12] = b"KRR-VM      ";

#[derive(Debug, Error)]
pub enum MpTableError {
    #[error("MP table: num_cpus = {0}; expected 1 to {MAX_CPUS}")]
    BadCpuCount(u8),
    #[error("MP table: writing {len} bytes at guest address {addr:#x} failed (guest memory must cover 0xf0000-0xfffff): {source}")]
    GuestMemory {
        addr: u64,
        len: usize,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the tables were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MpTableRegion {
    /// Address of the floating pointer (= [`MPTABLE_START`]).
    pub start: u64,
    /// Bytes used from `start` (floating pointer + configuration table).
    pub len: u64,
    /// The IO-APIC ID announced; give the same ID to `IoApic::new`.
    pub ioapic_id: u8,
}

/// The IO-APIC ID the table announces for `num_cpus` processors: the first
/// ID after the local APICs'.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

fn checksum_fixup(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, &b| sum.wrapping_add(b))
        .wrapping_neg()
}

/// Builds the configuration table (header and entries) with its checksum.
fn build_config_table(num_cpus: u8) -> Vec<u8> {
    let ioapic = ioapic_id(num_cpus);
    let mut entries = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(LAPIC_VERSION as u8);
        entries.push(if cpu == 0 {
            CPU_ENABLED | CPU_BOOTSTRAP
        } else {
            CPU_ENABLED
        });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;

    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION as u8, 1]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    count += 1;

    for irq in 0u8..16 {
        if irq == 2 {
            continue; // cascade; pin 2 carries IRQ 0
        }
        let pin = if irq == 0 { 2 } else { irq };
        // flags 0: polarity and trigger conform to the bus (ISA: edge, high)
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic, pin]);
        count += 1;
    }

    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, int_type, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let length = (HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, fixed below
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_SIZE);
    table.extend_from_slice(&entries);
    table[7] = checksum_fixup(&table);
    table
}

fn build_floating_pointer(config_table_addr: u32) -> [u8; FLOATING_POINTER_SIZE] {
    let mut fp = [0u8; FLOATING_POINTER_SIZE];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&config_table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = SPEC_REVISION;
    // fp[11] = 0: a configuration table is present (no default config);
    // fp[12] bit 7 = 0: no IMCR, virtual wire mode.
    fp[10] = checksum_fixup(&fp);
    fp
}

/// Writes the MP floating pointer and configuration table for `num_cpus`
/// processors at [`MPTABLE_START`].
pub fn write_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<MpTableRegion, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::BadCpuCount(num_cpus));
    }
    let table_addr = MPTABLE_START + FLOATING_POINTER_SIZE as u64;
    let table = build_config_table(num_cpus);
    let fp = build_floating_pointer(table_addr as u32);
    let total = FLOATING_POINTER_SIZE + table.len();
    debug_assert!(total as u64 <= MPTABLE_MAX_SIZE);
    for (addr, bytes) in [(MPTABLE_START, &fp[..]), (table_addr, &table[..])] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| MpTableError::GuestMemory {
                addr,
                len: bytes.len(),
                source,
            })?;
    }
    debug!(
        num_cpus,
        start = MPTABLE_START,
        len = total,
        "MP table written"
    );
    Ok(MpTableRegion {
        start: MPTABLE_START,
        len: total as u64,
        ioapic_id: ioapic_id(num_cpus),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
    }

    /// What a guest parser sees, decoded independently of the writer.
    #[derive(Debug, Default)]
    struct Parsed {
        lapic_addr: u32,
        processors: Vec<(u8, u8)>, // (apic id, flags)
        buses: Vec<(u8, Vec<u8>)>,
        ioapics: Vec<(u8, u8, u32)>,
        io_interrupts: Vec<(u8, u16, u8, u8, u8, u8)>,
        local_interrupts: Vec<(u8, u8, u8)>,
        end: u64,
    }

    /// Scans for the floating pointer the way Linux's smp_scan_config does
    /// and parses the configuration table it points to.
    fn scan_and_parse(mem: &GuestMemoryMmap) -> Parsed {
        let mut found = None;
        for addr in (0xf0000u64..0x100000).step_by(16) {
            let mut fp = [0u8; 16];
            mem.read_slice(&mut fp, GuestAddress(addr)).unwrap();
            if &fp[0..4] == b"_MP_" && fp[8] == 1 && sum(&fp) == 0 && fp[9] == 4 {
                found = Some(fp);
                break;
            }
        }
        let fp = found.expect("floating pointer not found in 0xf0000-0xfffff");
        assert_eq!(fp[11], 0, "default configuration must not be selected");
        let table_addr = u64::from(u32::from_le_bytes(fp[4..8].try_into().unwrap()));
        let mut header = [0u8; 44];
        mem.read_slice(&mut header, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(&header[0..4], b"PCMP");
        let length = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut table = vec![0u8; length];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0, "configuration table checksum");
        assert_eq!(table[6], 4);
        let count = u16::from_le_bytes([table[34], table[35]]);
        let mut parsed = Parsed {
            lapic_addr: u32::from_le_bytes(table[36..40].try_into().unwrap()),
            end: table_addr + length as u64,
            ..Default::default()
        };
        let mut off = 44;
        for _ in 0..count {
            let e = &table[off..];
            match e[0] {
                0 => {
                    parsed.processors.push((e[1], e[3]));
                    off += 20;
                }
                1 => {
                    parsed.buses.push((e[1], e[2..8].to_vec()));
                    off += 8;
                }
                2 => {
                    assert_eq!(e[3] & 1, 1, "IO-APIC enabled");
                    parsed.ioapics.push((
                        e[1],
                        e[2],
                        u32::from_le_bytes(e[4..8].try_into().unwrap()),
                    ));
                    off += 8;
                }
                3 => {
                    parsed.io_interrupts.push((
                        e[1],
                        u16::from_le_bytes([e[2], e[3]]),
                        e[4],
                        e[5],
                        e[6],
                        e[7],
                    ));
                    off += 8;
                }
                4 => {
                    parsed.local_interrupts.push((e[1], e[6], e[7]));
                    off += 8;
                }
                t => panic!("unknown entry type {t} at offset {off}"),
            }
        }
        assert_eq!(off, length, "entry count and table length agree");
        parsed
    }

    #[test]
    fn tables_parse_back() {
        let mem = memory();
        let region = write_mptable(&mem, 4).unwrap();
        assert_eq!(region.start, 0xf0000);
        assert_eq!(region.ioapic_id, 4);
        let parsed = scan_and_parse(&mem);
        assert_eq!(parsed.end, region.start + region.len);
        assert_eq!(parsed.lapic_addr, 0xfee0_0000);
        assert_eq!(parsed.processors, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(parsed.buses, vec![(0, b"ISA   ".to_vec())]);
        assert_eq!(parsed.ioapics, vec![(4, 0x11, 0xfec0_0000)]);
        assert_eq!(parsed.io_interrupts.len(), 15);
        for &(int_type, flags, bus, irq, apic, pin) in &parsed.io_interrupts {
            assert_eq!((int_type, flags, bus, apic), (0, 0, 0, 4));
            assert_ne!(irq, 2, "cascade IRQ has no entry");
            assert_eq!(pin, if irq == 0 { 2 } else { irq }, "IRQ {irq}");
        }
        let irqs: Vec<u8> = parsed.io_interrupts.iter().map(|e| e.3).collect();
        assert_eq!(
            irqs,
            vec![0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
        );
        assert_eq!(parsed.local_interrupts, vec![(3, 0xff, 0), (1, 0xff, 1)]);
    }

    #[test]
    fn largest_table_fits_the_bios_area() {
        let mem = memory();
        let region = write_mptable(&mem, MAX_CPUS).unwrap();
        assert!(region.start + region.len <= 0x100000);
        let parsed = scan_and_parse(&mem);
        assert_eq!(parsed.processors.len(), usize::from(MAX_CPUS));
        assert_eq!(parsed.ioapics[0].0, 254);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mem = memory();
        assert!(matches!(
            write_mptable(&mem, 0),
            Err(MpTableError::BadCpuCount(0))
        ));
        assert!(matches!(
            write_mptable(&mem, 255),
            Err(MpTableError::BadCpuCount(255))
        ));
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xa0000)]).unwrap();
        let err = write_mptable(&small, 1).unwrap_err();
        assert!(err.to_string().contains("0xf0000"), "{err}");
    }
}
