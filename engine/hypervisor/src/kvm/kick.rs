// SPDX-License-Identifier: GPL-2.0-or-later
//! Forcing a vCPU thread out of `KVM_RUN` from another thread.
//!
//! Without an in-kernel irqchip nothing inside KVM ever interrupts a guest
//! that loops without exiting, so the engine's timers and its recorder need a
//! way in. The usual VMM mechanism: a real-time signal sent to the vCPU thread
//! makes `KVM_RUN` return `EINTR`. The signal handler also sets
//! `kvm_run.immediate_exit`, which closes the race where the signal lands
//! after the run loop checked for pending kicks but before it entered
//! `KVM_RUN` (KVM then returns `EINTR` at once instead of running the guest).

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{HypervisorError, Result};

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread is running, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

/// Offset above SIGRTMIN of the signal used for kicks. SIGRTMIN itself is
/// left free because it is the one other VMM code conventionally takes.
const KICK_SIGNAL_OFFSET: c_int = 1;

/// The signal number that kicks vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    // Only async-signal-safe work here: a thread-local read and a volatile
    // byte store into the vCPU's mmap'ed kvm_run page.
    let p = IMMEDIATE_EXIT.with(|p| p.get());
    if !p.is_null() {
        // SAFETY: set by `RunGuard` to the kvm_run page of the vCPU that this
        // thread runs, which outlives the guard.
        unsafe { ptr::write_volatile(p, 1) };
    }
}

fn install_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|reason| HypervisorError::Backend {
            backend: "kvm",
            op: "install vCPU kick signal handler",
            reason,
        })
}

#[derive(Default)]
struct KickState {
    pending: AtomicBool,
    /// When the oldest kick not yet consumed was requested.
    since: Mutex<Option<Instant>>,
    /// The thread inside `KvmVcpu::run`, if any.
    thread: Mutex<Option<libc::pthread_t>>,
}

/// A handle that forces a running vCPU out of `KVM_RUN`. Cloneable and
/// `Send`, for the engine's timer and recorder threads.
#[derive(Clone, Default)]
pub struct VcpuKicker {
    state: Arc<KickState>,
}

impl VcpuKicker {
    pub(crate) fn new() -> Result<Self> {
        install_handler()?;
        Ok(Self::default())
    }

    /// Asks the vCPU to return to its run loop. What `run` then does depends
    /// on the async-event positioning mode (see [`super::AsyncEventMode`]).
    pub fn kick(&self) {
        {
            let mut since = self.state.since.lock().unwrap_or_else(|e| e.into_inner());
            since.get_or_insert_with(Instant::now);
        }
        self.state.pending.store(true, Ordering::SeqCst);
        self.signal();
    }

    /// Interrupts `KVM_RUN` without asking for a stop: the run loop only
    /// re-examines the guest (used to poll for user mode).
    pub(crate) fn nudge(&self) {
        self.signal();
    }

    fn signal(&self) {
        let thread = self.state.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is registered only while its thread is inside
            // `run` (the guard removes it under this lock before returning),
            // so it names a live thread.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Takes a pending kick: the time it was first requested.
    pub(crate) fn take(&self) -> Option<Instant> {
        if self.state.pending.swap(false, Ordering::SeqCst) {
            let mut since = self.state.since.lock().unwrap_or_else(|e| e.into_inner());
            Some(since.take().unwrap_or_else(Instant::now))
        } else {
            None
        }
    }

    /// Registers the calling thread as the one running the vCPU whose
    /// `immediate_exit` byte is `immediate_exit`, until the guard drops.
    pub(crate) fn enter_run(&self, immediate_exit: *mut u8) -> RunGuard<'_> {
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.state.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
        RunGuard { kicker: self }
    }
}

pub(crate) struct RunGuard<'a> {
    kicker: &'a VcpuKicker,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        *self
            .kicker
            .state
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        IMMEDIATE_EXIT.with(|p| p.set(ptr::null_mut()));
    }
}
