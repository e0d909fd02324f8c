// SPDX-License-Identifier: GPL-2.0-or-later
//! Guest accesses to the local APIC page: decoding of register reads and
//! writes (the register map itself is in the parent module).

use tracing::{trace, warn};

use super::timer::TimerMode;
use super::{
    ApicError, ApicOutput, LocalApic, TimerState, ESR_ILLEGAL_REGISTER, ICR_HIGH_WRITE_MASK,
    ICR_LOW_WRITE_MASK, LAPIC_VERSION, LVT_ERROR, LVT_LINT0, LVT_LINT1, LVT_MASKED, LVT_PERF,
    LVT_THERMAL, LVT_TIMER, LVT_WRITE_MASK, REG_APR, REG_DFR, REG_EOI, REG_ESR, REG_ICR_HIGH,
    REG_ICR_LOW, REG_ID, REG_IRR, REG_ISR, REG_LDR, REG_LVT_ERROR, REG_LVT_LINT0, REG_LVT_LINT1,
    REG_LVT_PERF, REG_LVT_THERMAL, REG_LVT_TIMER, REG_PPR, REG_RRD, REG_SVR, REG_TIMER_CURRENT,
    REG_TIMER_DIVIDE, REG_TIMER_INITIAL, REG_TMR, REG_TPR, REG_VERSION, SVR_WRITE_MASK,
};

impl LocalApic {
    /// Guest read of `data.len()` bytes at `offset` in the APIC page.
    /// On error `data` is zero-filled.
    pub fn read(&self, offset: u64, data: &mut [u8], now_ns: u64) -> Result<(), ApicError> {
        data.fill(0);
        if data.len() != 4 || offset & 0xf != 0 {
            return Err(ApicError::BadAccess {
                apic_id: self.id,
                offset,
                len: data.len(),
            });
        }
        let value = self.read_register(offset, now_ns)?;
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    fn read_register(&self, offset: u64, now_ns: u64) -> Result<u32, ApicError> {
        Ok(match offset {
            REG_ID => u32::from(self.id) << 24,
            REG_VERSION => LAPIC_VERSION,
            REG_TPR => u32::from(self.tpr),
            REG_APR | REG_RRD | REG_EOI => 0,
            REG_PPR => u32::from(self.ppr()),
            REG_LDR => self.ldr,
            REG_DFR => self.dfr | 0x0fff_ffff,
            REG_SVR => self.svr,
            0x100..=0x170 => self.isr[((offset - REG_ISR) / 16) as usize],
            0x180..=0x1f0 => self.tmr[((offset - REG_TMR) / 16) as usize],
            0x200..=0x270 => self.irr[((offset - REG_IRR) / 16) as usize],
            REG_ESR => self.esr,
            REG_ICR_LOW => self.icr_low,
            REG_ICR_HIGH => self.icr_high,
            REG_LVT_TIMER => self.lvt[LVT_TIMER],
            REG_LVT_THERMAL => self.lvt[LVT_THERMAL],
            REG_LVT_PERF => self.lvt[LVT_PERF],
            REG_LVT_LINT0 => self.lvt[LVT_LINT0],
            REG_LVT_LINT1 => self.lvt[LVT_LINT1],
            REG_LVT_ERROR => self.lvt[LVT_ERROR],
            REG_TIMER_INITIAL => self.timer_initial,
            REG_TIMER_CURRENT => self.timer_current_count(now_ns),
            REG_TIMER_DIVIDE => self.timer_divide,
            _ => {
                return Err(ApicError::UnknownRegister {
                    apic_id: self.id,
                    offset,
                })
            }
        })
    }

    /// Guest write of `data` at `offset` in the APIC page. Returns what the
    /// machine must route (an IPI, or an EOI broadcast to the IO-APIC).
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        now_ns: u64,
    ) -> Result<Option<ApicOutput>, ApicError> {
        if data.len() != 4 || offset & 0xf != 0 {
            return Err(ApicError::BadAccess {
                apic_id: self.id,
                offset,
                len: data.len(),
            });
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        trace!(apic = self.id, offset, value, "write");
        // Anything that changes the timer's configuration first settles
        // expiries up to now under the old configuration.
        self.tick(now_ns);
        match offset {
            REG_ID => self.id = (value >> 24) as u8,
            REG_TPR => self.tpr = value as u8,
            REG_EOI => return Ok(self.end_of_interrupt()),
            REG_LDR => self.ldr = value & 0xff00_0000,
            REG_DFR => self.dfr = value | 0x0fff_ffff,
            REG_SVR => {
                self.svr = value & SVR_WRITE_MASK;
                if !self.is_software_enabled() {
                    // A software-disabled APIC masks all LVT entries.
                    for entry in &mut self.lvt {
                        *entry |= LVT_MASKED;
                    }
                }
            }
            REG_ESR => {
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            REG_ICR_LOW => {
                self.icr_low = value & ICR_LOW_WRITE_MASK;
                return Ok(self.send_ipi());
            }
            REG_ICR_HIGH => self.icr_high = value & ICR_HIGH_WRITE_MASK,
            REG_LVT_TIMER => self.write_lvt(LVT_TIMER, value),
            REG_LVT_THERMAL => self.write_lvt(LVT_THERMAL, value),
            REG_LVT_PERF => self.write_lvt(LVT_PERF, value),
            REG_LVT_LINT0 => self.write_lvt(LVT_LINT0, value),
            REG_LVT_LINT1 => self.write_lvt(LVT_LINT1, value),
            REG_LVT_ERROR => self.write_lvt(LVT_ERROR, value),
            REG_TIMER_INITIAL => {
                if self.timer_mode() == TimerMode::TscDeadline {
                    warn!(
                        apic = self.id,
                        "TSC-deadline timer mode is not supported; initial count ignored"
                    );
                    return Ok(None);
                }
                self.timer_initial = value;
                self.timer = TimerState {
                    armed: value != 0,
                    anchor_ns: now_ns,
                    anchor_count: u64::from(value),
                };
            }
            REG_TIMER_DIVIDE => {
                // Keep counting from the current count at the new rate.
                let current = self.timer_current_count(now_ns);
                self.timer_divide = value & 0xb;
                if self.timer.armed {
                    self.timer.anchor_ns = now_ns;
                    self.timer.anchor_count = u64::from(current);
                }
            }
            REG_VERSION | REG_APR | REG_PPR | REG_RRD | REG_TIMER_CURRENT | 0x100..=0x270 => {
                return Err(ApicError::ReadOnly {
                    apic_id: self.id,
                    offset,
                    value,
                })
            }
            _ => {
                self.esr_pending |= ESR_ILLEGAL_REGISTER;
                return Err(ApicError::UnknownRegister {
                    apic_id: self.id,
                    offset,
                });
            }
        }
        Ok(None)
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let mut entry = value & LVT_WRITE_MASK[index];
        if !self.is_software_enabled() {
            entry |= LVT_MASKED;
        }
        // Remote IRR (LINT, bit 14) is kept from the current value.
        entry |= self.lvt[index] & !LVT_WRITE_MASK[index] & (1 << 14);
        self.lvt[index] = entry;
        if index == LVT_TIMER && self.timer_mode() == TimerMode::TscDeadline {
            warn!(apic = self.id, "guest selected TSC-deadline timer mode, which is not supported (CPUID does not advertise it)");
        }
    }
}
