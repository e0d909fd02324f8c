// SPDX-License-Identifier: GPL-2.0-or-later
//! 8254 programmable interval timer (ports 0x40-0x43) and the port 0x61
//! speaker gate, on the engine's virtual clock (nanoseconds passed in by the
//! run loop). Channel 0 drives ISA IRQ 0 in modes 0 (one-shot) and 2/3
//! (periodic); counters can be latched and read back.
//!
//! The model is plain data (serde) for recording snapshots. Its time anchors
//! (`loaded_at`, `next_fire`) are virtual-clock nanoseconds, so a restored
//! PIT is only meaningful together with the vCPU clocks it was saved with.

use serde::{Deserialize, Serialize};

/// Input clock of the 8254, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

fn ticks_to_ns(ticks: u64) -> u64 {
    ((ticks as u128 * 1_000_000_000u128) / PIT_HZ as u128) as u64
}

fn ns_to_ticks(ns: u64) -> u64 {
    ((ns as u128 * PIT_HZ as u128) / 1_000_000_000u128) as u64
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Channel {
    mode: u8,
    access: u8,
    reload: u16,
    /// Virtual time the count was loaded.
    loaded_at: u64,
    armed: bool,
    /// Next IRQ edge (channel 0) in ns.
    next_fire: Option<u64>,
    latch: Option<u16>,
    read_high: bool,
    write_high: bool,
    write_low: u8,
    gate: bool,
}

impl Channel {
    fn period_ticks(&self) -> u64 {
        if self.reload == 0 {
            0x10000
        } else {
            self.reload as u64
        }
    }

    fn count(&self, now: u64) -> u16 {
        if !self.armed {
            return self.reload;
        }
        let elapsed = ns_to_ticks(now.saturating_sub(self.loaded_at));
        let period = self.period_ticks();
        match self.mode {
            2 | 3 => (period - elapsed % period) as u16,
            _ => period.saturating_sub(elapsed) as u16,
        }
    }

    fn load(&mut self, now: u64) {
        self.loaded_at = now;
        self.armed = true;
        self.next_fire = Some(now + ticks_to_ns(self.period_ticks()));
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0 (gate 2) and 1 (speaker).
    port61: u8,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    pub fn new() -> Pit {
        Pit {
            channels: Default::default(),
            port61: 0,
        }
    }

    /// Checks a deserialized PIT (a snapshot) for values the guest cannot
    /// program: a mode above 5 or an access mode above 3.
    pub fn validate(&self) -> Result<(), String> {
        for (i, ch) in self.channels.iter().enumerate() {
            if ch.mode > 5 {
                return Err(format!("channel {i}: mode {} (expected 0-5)", ch.mode));
            }
            if ch.access > 3 {
                return Err(format!("channel {i}: access {} (expected 0-3)", ch.access));
            }
        }
        if self.port61 & !0x0f != 0 {
            return Err(format!(
                "port61 {:#x} (expected only bits 0-3)",
                self.port61
            ));
        }
        Ok(())
    }

    /// The next virtual time at which channel 0 raises IRQ 0.
    pub fn next_deadline(&self) -> Option<u64> {
        self.channels[0].next_fire
    }

    /// Advances to `now`; returns how many IRQ 0 edges fell due.
    pub fn tick(&mut self, now: u64) -> u32 {
        let ch = &mut self.channels[0];
        let mut fired = 0;
        while let Some(t) = ch.next_fire {
            if t > now {
                break;
            }
            fired += 1;
            ch.next_fire = match ch.mode {
                2 | 3 => Some(t + ticks_to_ns(ch.period_ticks())),
                _ => None,
            };
            // Catching up after a long stall: one edge is enough.
            if fired > 1 {
                if let Some(n) = ch.next_fire {
                    if n <= now {
                        let period = ticks_to_ns(ch.period_ticks()).max(1);
                        ch.next_fire = Some(now - (now - n) % period + period);
                    }
                }
            }
        }
        fired
    }

    pub fn pio_read(&mut self, port: u16, now: u64) -> u8 {
        match port {
            0x40..=0x42 => {
                let ch = &mut self.channels[(port - 0x40) as usize];
                let value = ch.latch.unwrap_or_else(|| ch.count(now));
                match ch.access {
                    1 => {
                        ch.latch = None;
                        value as u8
                    }
                    2 => {
                        ch.latch = None;
                        (value >> 8) as u8
                    }
                    _ => {
                        let b = if ch.read_high {
                            (value >> 8) as u8
                        } else {
                            value as u8
                        };
                        ch.read_high = !ch.read_high;
                        if !ch.read_high {
                            ch.latch = None;
                        }
                        b
                    }
                }
            }
            0x61 => {
                // Bit 5: channel 2 output; toggled by time so that polling
                // loops make progress deterministically.
                let ch2 = &self.channels[2];
                let out = if ch2.armed && ch2.count(now) < ch2.period_ticks() as u16 / 2 {
                    0x20
                } else {
                    0
                };
                let refresh = ((now / 15_000) & 1) as u8 * 0x10;
                self.port61 & 0x0f | out | refresh
            }
            _ => 0xff,
        }
    }

    pub fn pio_write(&mut self, port: u16, value: u8, now: u64) {
        match port {
            0x40..=0x42 => {
                let ch = &mut self.channels[(port - 0x40) as usize];
                match ch.access {
                    1 => {
                        ch.reload = (ch.reload & 0xff00) | value as u16;
                        ch.load(now);
                    }
                    2 => {
                        ch.reload = (ch.reload & 0x00ff) | (value as u16) << 8;
                        ch.load(now);
                    }
                    _ => {
                        if ch.write_high {
                            ch.reload = ch.write_low as u16 | (value as u16) << 8;
                            ch.write_high = false;
                            ch.load(now);
                        } else {
                            ch.write_low = value;
                            ch.write_high = true;
                        }
                    }
                }
            }
            0x43 => {
                let sel = (value >> 6) as usize;
                if sel == 3 {
                    // Read-back: latch counts of the selected channels.
                    for i in 0..3 {
                        if value & (2 << i) != 0 && value & 0x20 == 0 {
                            let c = self.channels[i].count(now);
                            self.channels[i].latch = Some(c);
                        }
                    }
                    return;
                }
                let ch = &mut self.channels[sel];
                let access = (value >> 4) & 3;
                if access == 0 {
                    ch.latch = Some(ch.count(now));
                    ch.read_high = false;
                    return;
                }
                ch.access = access;
                ch.mode = (value >> 1) & 7;
                if ch.mode > 5 {
                    ch.mode -= 4;
                }
                ch.armed = false;
                ch.next_fire = None;
                ch.read_high = false;
                ch.write_high = false;
            }
            0x61 => {
                self.port61 = value & 0x0f;
                self.channels[2].gate = value & 1 != 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_channel0_fires_every_period() {
        let mut pit = Pit::new();
        pit.pio_write(0x43, 0x34, 0);
        // 1193 ticks ~ 1 ms.
        pit.pio_write(0x40, 0xa9, 0);
        pit.pio_write(0x40, 0x04, 0);
        let d = pit.next_deadline().unwrap();
        assert!((999_000..1_001_000).contains(&d), "{d}");
        assert_eq!(pit.tick(d - 1), 0);
        assert_eq!(pit.tick(d), 1);
        assert!(pit.next_deadline().unwrap() > d);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut pit = Pit::new();
        // Channel 0: lo/hi access, mode 2 (rate generator), reload 0x04a9.
        pit.pio_write(0x43, 0x34, 0);
        pit.pio_write(0x40, 0xa9, 500);
        pit.pio_write(0x40, 0x04, 500);
        // Channel 2 gate on, and a latched count on channel 2.
        pit.pio_write(0x61, 0x01, 600);
        pit.pio_write(0x43, 0x80, 700);
        let json = serde_json::to_value(&pit).unwrap();
        assert_eq!(json["channels"][0]["reload"], 0x04a9);
        assert_eq!(json["channels"][0]["mode"], 2);
        assert_eq!(json["channels"][0]["loaded_at"], 500);
        assert_eq!(json["channels"][2]["gate"], true);
        let back: Pit = serde_json::from_value(json).unwrap();
        assert_eq!(back, pit);
        back.validate().unwrap();
        assert_eq!(back.next_deadline(), pit.next_deadline());
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut json = serde_json::to_value(Pit::new()).unwrap();
        json["channels"][1]["mode"] = 7.into();
        let pit: Pit = serde_json::from_value(json).unwrap();
        let err = pit.validate().unwrap_err();
        assert!(err.contains("channel 1: mode 7"), "{err}");
    }

    #[test]
    fn oneshot_fires_once_and_counts_down() {
        let mut pit = Pit::new();
        pit.pio_write(0x43, 0x30, 0);
        pit.pio_write(0x40, 0x00, 100);
        pit.pio_write(0x40, 0x10, 100);
        pit.pio_write(0x43, 0x00, 100 + ticks_to_ns(0x100) + 400);
        let lo = pit.pio_read(0x40, 0) as u16;
        let hi = pit.pio_read(0x40, 0) as u16;
        assert_eq!(lo | hi << 8, 0x1000 - 0x100);
        let d = pit.next_deadline().unwrap();
        assert_eq!(pit.tick(d + 10_000_000), 1);
        assert_eq!(pit.next_deadline(), None);
    }
}
