// SPDX-License-Identifier: GPL-2.0-or-later
//! The APIC timer: one-shot and periodic counting on the virtual clock,
//! its current count, deadline and expiry.

use tracing::trace;

use super::{LocalApic, LVT_MASKED, LVT_TIMER, LVT_TIMER_MODE_SHIFT};

/// Timer modes of the LVT timer register (bits 18:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

impl LocalApic {
    pub(super) fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// Nanoseconds per timer count: the divide configuration register's
    /// divisor (bits 3, 1:0; 0b111 = 1, otherwise 2^(value+1)).
    fn timer_divisor(&self) -> u64 {
        let value = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4);
        if value == 7 {
            1
        } else {
            2u64 << value
        }
    }

    fn timer_expiry(&self) -> u64 {
        self.timer
            .anchor_ns
            .saturating_add(self.timer.anchor_count * self.timer_divisor())
    }

    pub(super) fn timer_current_count(&self, now_ns: u64) -> u32 {
        if !self.timer.armed {
            return 0;
        }
        let divisor = self.timer_divisor();
        let expiry = self.timer_expiry();
        if now_ns < expiry {
            let elapsed = now_ns.saturating_sub(self.timer.anchor_ns) / divisor;
            return (self.timer.anchor_count - elapsed) as u32;
        }
        match self.timer_mode() {
            // A periodic timer whose expiries were not ticked (masked):
            // the count keeps cycling from the initial count.
            TimerMode::Periodic if self.timer_initial != 0 => {
                let period = u64::from(self.timer_initial) * divisor;
                let into_period = (now_ns - expiry) % period;
                (u64::from(self.timer_initial) - into_period / divisor) as u32
            }
            _ => 0,
        }
    }

    /// Virtual time at which the timer next raises an interrupt, if it is
    /// armed and its LVT entry is not masked. The run loop must call
    /// [`Self::tick`] once virtual time reaches it.
    pub fn next_deadline(&self) -> Option<u64> {
        (self.timer.armed && self.lvt[LVT_TIMER] & LVT_MASKED == 0).then(|| self.timer_expiry())
    }

    /// Advances the timer to `now_ns`: if it expired, sets the timer vector
    /// in the IRR (unless masked) and re-arms a periodic timer. Missed
    /// periods coalesce into one interrupt, like an IRR bit does.
    pub fn tick(&mut self, now_ns: u64) {
        if !self.timer.armed {
            return;
        }
        let expiry = self.timer_expiry();
        if now_ns < expiry {
            return;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            trace!(apic = self.id, vector = lvt as u8, now_ns, "timer fired");
            self.accept_interrupt_unchecked(lvt as u8);
        }
        if self.timer_mode() == TimerMode::Periodic && self.timer_initial != 0 {
            let period = u64::from(self.timer_initial) * self.timer_divisor();
            let missed = (now_ns - expiry) / period;
            self.timer.anchor_ns = expiry + missed * period;
            self.timer.anchor_count = u64::from(self.timer_initial);
        } else {
            self.timer.armed = false;
        }
    }
}
