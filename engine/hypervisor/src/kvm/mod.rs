// SPDX-License-Identifier: GPL-2.0-or-later
//! The KVM CPU backend: the engine's machine model on `kvm-ioctls`, so a
//! recording runs at hardware speed without a patched host kernel.
//!
//! Interrupt delivery stays in the engine. No in-kernel irqchip is created:
//! the engine's local APIC and IO-APIC decide what to deliver, and this
//! backend injects it with `KVM_INTERRUPT` once the guest can take it
//! (`request_interrupt_window`), so every interrupt the guest sees passes
//! through the engine with the vCPU state at injection. Port I/O and MMIO
//! exits are forwarded to the engine's [`IoBus`](crate::IoBus) synchronously inside
//! [`Vcpu::run`](crate::Vcpu::run); CPUID is the engine's ([`IoBus::cpuid`](crate::IoBus::cpuid)), loaded with
//! `KVM_SET_CPUID2` before the first entry.
//!
//! Positions of asynchronous events ([`AsyncEventMode`]): with a PMU, a
//! guest-only conditional-branch counter per vCPU (see [`pmu`]); without one
//! (PVM, most clouds), the engine only gets control back for an interrupt at
//! deterministic points (after a port/MMIO access or HLT) or while the guest
//! is in user mode, which kernel-only replay does not re-execute. A kick that
//! finds the guest in kernel mode waits for the next such point; the added
//! latency is measured in [`AsyncDeliveryStats`].
//!
//! Limits, stated: KVM does not count instructions, so the `budget` of
//! [`Vcpu::run`](crate::Vcpu::run) is not honoured (the engine slices time with a
//! [`VcpuKicker`] instead) and [`Vcpu::instructions_retired`](crate::Vcpu::instructions_retired) is `None`.
//! RDTSC executes natively in the guest (trapping it needs host changes);
//! for recording, the guest agent records TSC reads, as in KRR.

mod async_delivery;
mod convert;
mod cpuid;
mod debug;
mod detect;
mod kick;
pub mod pmu;
mod run;
mod vcpu;
mod vm;

use crate::HypervisorError;
pub use async_delivery::{
    AsyncDeliveryStats, AsyncPosition, MAX_DETERMINISTIC_WAIT, USER_MODE_POLL,
};
pub use cpuid::HostFeatures;
pub use detect::{detect, select_backend, AsyncEventMode, BackendChoice, KvmAvailability};
pub use kick::{kick_signal, VcpuKicker};
pub use pmu::{pmu_available, CountedEvent, GuestCounter, StopPlanner, StopStep};
pub use vcpu::KvmVcpu;
pub use vm::{sipi_state, KvmVm};

const BACKEND: &str = "kvm";

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Backend {
        backend: BACKEND,
        op,
        reason: e.to_string(),
    }
}

fn backend_err(op: &'static str, reason: impl Into<String>) -> HypervisorError {
    HypervisorError::Backend {
        backend: BACKEND,
        op,
        reason: reason.into(),
    }
}
