// SPDX-License-Identifier: GPL-2.0-or-later
//! Interrupt acceptance and priority: IRR/ISR/TMR bits, PPR and CR8,
//! acknowledge and EOI, the LINT pins, NMI/ExtINT requests, error interrupt.

use tracing::{debug, trace, warn};

use super::{
    ApicError, ApicOutput, DeliveryMode, LocalApic, TriggerMode, ESR_RECEIVE_ILLEGAL_VECTOR,
    LVT_ERROR, LVT_LINT0, LVT_LINT1, LVT_MASKED,
};

fn vector_bit(vector: u8) -> (usize, u32) {
    (usize::from(vector >> 5), 1u32 << (vector & 31))
}

fn highest_vector(bits: &[u32; 8]) -> Option<u8> {
    (0..8).rev().find_map(|word| {
        let w = bits[word];
        (w != 0).then(|| (word * 32 + 31 - w.leading_zeros() as usize) as u8)
    })
}

impl LocalApic {
    /// Takes a pending NMI (from an NMI IPI, IO-APIC NMI or LINT1); the run
    /// loop injects it with `Injection::Nmi`.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// Takes a pending ExtINT request; the run loop asks the 8259 PIC for
    /// the vector (INTA) and injects it without touching IRR/ISR.
    pub fn take_extint(&mut self) -> bool {
        std::mem::take(&mut self.extint_pending)
    }

    /// CR8 as the CPU sees it (TPR bits 7:4).
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// Mirrors a guest `mov cr8` into the TPR (CR8 bits 3:0 = TPR bits 7:4).
    pub fn set_cr8(&mut self, cr8: u64) {
        self.tpr = ((cr8 & 0xf) << 4) as u8;
    }

    /// Processor priority (SDM 11.8.3.1).
    pub fn ppr(&self) -> u8 {
        let isrv = highest_vector(&self.isr).unwrap_or(0);
        if self.tpr & 0xf0 >= isrv & 0xf0 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// Highest vector in the IRR whose priority class is above the PPR: the
    /// interrupt the CPU would take now if its interrupt window is open.
    pub fn pending_vector(&self) -> Option<u8> {
        let vector = highest_vector(&self.irr)?;
        (vector & 0xf0 > self.ppr() & 0xf0).then_some(vector)
    }

    /// The CPU's interrupt acknowledge: moves [`Self::pending_vector`] from
    /// the IRR to the ISR and returns it; returns the spurious vector (SVR
    /// bits 7:0) when nothing is deliverable, like the hardware does.
    pub fn acknowledge(&mut self) -> u8 {
        match self.pending_vector() {
            Some(vector) => {
                let (word, bit) = vector_bit(vector);
                self.irr[word] &= !bit;
                self.isr[word] |= bit;
                trace!(apic = self.id, vector, "interrupt acknowledged");
                vector
            }
            None => (self.svr & 0xff) as u8,
        }
    }

    /// Accepts a fixed interrupt into the IRR. Vectors 0-15 are illegal and
    /// set ESR bit 6; a software-disabled APIC drops fixed interrupts (as
    /// KVM does). A vector already pending in the IRR coalesces.
    pub fn accept_interrupt(&mut self, vector: u8, trigger: TriggerMode) {
        if vector < 16 {
            warn!(apic = self.id, vector, "illegal vector received");
            self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        if !self.is_software_enabled() {
            debug!(
                apic = self.id,
                vector, "APIC software-disabled, interrupt dropped"
            );
            return;
        }
        let (word, bit) = vector_bit(vector);
        self.irr[word] |= bit;
        match trigger {
            TriggerMode::Level => self.tmr[word] |= bit,
            TriggerMode::Edge => self.tmr[word] &= !bit,
        }
    }

    /// Signals LINT0 (`pin` 0) or LINT1 (`pin` 1) as configured in its LVT
    /// entry: fixed vector, NMI or ExtINT; nothing if masked.
    pub fn raise_lint(&mut self, pin: u8) -> Result<(), ApicError> {
        let index = match pin {
            0 => LVT_LINT0,
            1 => LVT_LINT1,
            _ => {
                return Err(ApicError::BadLintPin {
                    apic_id: self.id,
                    pin,
                })
            }
        };
        let entry = self.lvt[index];
        if entry & LVT_MASKED != 0 {
            return Ok(());
        }
        let trigger = if entry & (1 << 15) != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        match DeliveryMode::from_bits(entry >> 8) {
            Some(DeliveryMode::Fixed) => self.accept_interrupt(entry as u8, trigger),
            Some(DeliveryMode::Nmi) => self.nmi_pending = true,
            Some(DeliveryMode::ExtInt) => self.extint_pending = true,
            other => warn!(
                apic = self.id,
                pin,
                ?other,
                "unsupported LINT delivery mode"
            ),
        }
        Ok(())
    }

    pub(super) fn signal_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 {
            self.accept_interrupt_unchecked(lvt as u8);
        }
    }

    /// Sets an IRR bit for a locally generated edge interrupt (timer, error)
    /// whose vector may not be illegal-checked recursively.
    pub(super) fn accept_interrupt_unchecked(&mut self, vector: u8) {
        if vector < 16 {
            // An illegal vector in an LVT entry: record it, but do not raise
            // another error interrupt (which could loop).
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            return;
        }
        let (word, bit) = vector_bit(vector);
        self.irr[word] |= bit;
        self.tmr[word] &= !bit;
    }

    /// EOI: clears the highest ISR bit; a level-triggered vector is
    /// broadcast to the IO-APIC.
    pub(super) fn end_of_interrupt(&mut self) -> Option<ApicOutput> {
        let vector = highest_vector(&self.isr)?;
        let (word, bit) = vector_bit(vector);
        self.isr[word] &= !bit;
        trace!(apic = self.id, vector, "EOI");
        (self.tmr[word] & bit != 0).then_some(ApicOutput::EoiBroadcast { vector })
    }
}
