// SPDX-License-Identifier: GPL-2.0-or-later
//! MC146818 CMOS real-time clock (ports 0x70/0x71). Time is a fixed epoch
//! plus the virtual clock, so a run reads the same wall time every time.

use serde::{Deserialize, Serialize};

/// 2026-01-01 00:00:00 UTC.
pub const DEFAULT_EPOCH: u64 = 1_767_225_600;

/// Bytes of CMOS RAM (the clock registers 0x00-0x0d included).
pub const CMOS_RAM_SIZE: usize = 128;

/// The CMOS/RTC state a snapshot stores: the register file, the selected
/// index and the time base. Separate from [`Cmos`] because serde has no
/// impl for a 128-byte array; the RAM travels as a byte list and
/// [`Cmos::from_state`] checks its length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// Register selected through port 0x70 (0-0x7f).
    pub index: u8,
    /// All 128 bytes of CMOS RAM. The clock registers 0x00-0x09 are not
    /// read from here (they are computed from `epoch` and the virtual
    /// clock) but are stored as they are.
    pub ram: Vec<u8>,
    /// Wall-clock seconds since 1970 at virtual time 0.
    pub epoch: u64,
}

#[derive(Debug, Clone)]
pub struct Cmos {
    index: u8,
    ram: [u8; CMOS_RAM_SIZE],
    epoch: u64,
}

fn bcd(v: u64) -> u8 {
    ((v / 10) << 4 | (v % 10)) as u8
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Cmos {
    pub fn new(epoch: u64, mem_bytes: u64) -> Cmos {
        let mut ram = [0u8; CMOS_RAM_SIZE];
        ram[0x0a] = 0x26;
        ram[0x0b] = 0x02; // 24-hour, BCD
        ram[0x0d] = 0x80; // battery good
                          // Extended memory above 1 MiB (KiB, max 64 MiB) and above 16 MiB
                          // (64 KiB units), as firmware reports it.
        let ext_k = (mem_bytes.saturating_sub(1 << 20) >> 10).min(0xffff);
        ram[0x17] = ext_k as u8;
        ram[0x18] = (ext_k >> 8) as u8;
        ram[0x30] = ext_k as u8;
        ram[0x31] = (ext_k >> 8) as u8;
        let above16 = (mem_bytes.saturating_sub(16 << 20) >> 16).min(0xffff);
        ram[0x34] = above16 as u8;
        ram[0x35] = (above16 >> 8) as u8;
        Cmos {
            index: 0,
            ram,
            epoch,
        }
    }

    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
            epoch: self.epoch,
        }
    }

    /// Rebuilds the device from a snapshot's state; fails when the RAM is
    /// not 128 bytes or the index is beyond it.
    pub fn from_state(state: &CmosState) -> Result<Cmos, String> {
        let ram: [u8; CMOS_RAM_SIZE] =
            state.ram.as_slice().try_into().map_err(|_| {
                format!("ram is {} bytes, expected {CMOS_RAM_SIZE}", state.ram.len())
            })?;
        if state.index as usize >= CMOS_RAM_SIZE {
            return Err(format!(
                "index {:#x}, expected below {CMOS_RAM_SIZE:#x}",
                state.index
            ));
        }
        Ok(Cmos {
            index: state.index,
            ram,
            epoch: state.epoch,
        })
    }

    pub fn pio_write(&mut self, port: u16, value: u8) {
        match port {
            0x70 => self.index = value & 0x7f,
            0x71 => {
                let i = self.index as usize;
                if i >= 0x0a {
                    self.ram[i] = value;
                }
            }
            _ => {}
        }
    }

    pub fn pio_read(&mut self, port: u16, now_ns: u64) -> u8 {
        if port != 0x71 {
            return 0xff;
        }
        let t = self.epoch + now_ns / 1_000_000_000;
        let secs = t % 86_400;
        let (y, m, d) = civil_from_days((t / 86_400) as i64);
        match self.index {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd(((t / 86_400 + 4) % 7) + 1),
            0x07 => bcd(d as u64),
            0x08 => bcd(m as u64),
            0x09 => bcd((y % 100) as u64),
            0x32 => bcd((y / 100) as u64),
            // Update-in-progress never set: reads are always consistent.
            0x0a => self.ram[0x0a] & 0x7f,
            0x0c => 0,
            i => self.ram[i as usize],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fixed_epoch_plus_virtual_time() {
        let mut c = Cmos::new(DEFAULT_EPOCH, 512 << 20);
        let mut rd = |i: u8, now| {
            c.pio_write(0x70, i);
            c.pio_read(0x71, now)
        };
        assert_eq!(rd(0x09, 0), 0x26);
        assert_eq!(rd(0x08, 0), 0x01);
        assert_eq!(rd(0x07, 0), 0x01);
        assert_eq!(rd(0x00, 61_000_000_000), 0x01);
        assert_eq!(rd(0x02, 61_000_000_000), 0x01);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut c = Cmos::new(DEFAULT_EPOCH, 512 << 20);
        // Status register B: binary mode, 24-hour; then select register 0x40.
        c.pio_write(0x70, 0x0b);
        c.pio_write(0x71, 0x06);
        c.pio_write(0x70, 0x40);
        c.pio_write(0x71, 0x5a);
        let state = c.state();
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["index"], 0x40);
        assert_eq!(json["ram"][0x0b], 0x06);
        assert_eq!(json["ram"][0x40], 0x5a);
        assert_eq!(json["epoch"], DEFAULT_EPOCH);
        let back: CmosState = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);
        let mut restored = Cmos::from_state(&back).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(restored.pio_read(0x71, 0), 0x5a);
        restored.pio_write(0x70, 0x09);
        c.pio_write(0x70, 0x09);
        assert_eq!(
            restored.pio_read(0x71, 7_000_000_000),
            c.pio_read(0x71, 7_000_000_000)
        );
    }

    #[test]
    fn from_state_rejects_short_ram() {
        let mut state = Cmos::new(DEFAULT_EPOCH, 0).state();
        state.ram.truncate(64);
        let err = Cmos::from_state(&state).unwrap_err();
        assert!(err.contains("ram is 64 bytes, expected 128"), "{err}");
    }
}
