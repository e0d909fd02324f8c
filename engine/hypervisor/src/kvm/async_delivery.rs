// SPDX-License-Identifier: GPL-2.0-or-later
//! Positions of asynchronous events without a PMU: where a kick is let in
//! (deterministic points, user mode, or late and imprecise), and what that cost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::backend_err;
use super::{AsyncEventMode, GuestCounter, KvmVcpu, VcpuKicker};
use crate::{Result, RunContext, VmExit};

/// How long a kick that finds the guest in kernel mode waits for a
/// deterministic point before it is delivered where the guest is (and the
/// position marked imprecise). Linux kernel code without port/MMIO access or
/// HLT for this long is rare (a busy wait on jiffies during boot).
pub const MAX_DETERMINISTIC_WAIT: Duration = Duration::from_millis(50);

/// How often a vCPU that waits for a deterministic point is kicked again to
/// see whether it went to user mode.
pub const USER_MODE_POLL: Duration = Duration::from_micros(500);

/// Where an asynchronous event was let in, for the recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncPosition {
    /// Right after a port or MMIO access (the access is the position).
    AfterIo,
    /// At HLT.
    Halt,
    /// At the first interrupt window after the previous position.
    InterruptWindow,
    /// While the guest ran in user mode: the kernel entry it causes is the
    /// position.
    UserMode,
    /// Guest PMU counter value at the stop (PMU mode).
    Counted { count: u64 },
    /// No deterministic point came within [`MAX_DETERMINISTIC_WAIT`]: the
    /// event went in where the guest was (replay must match by RIP and
    /// registers).
    Imprecise,
}

/// What the no-PMU delivery policy cost, per vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsyncDeliveryStats {
    /// Kicks that asked for a stop (the bus had `stop_requested`).
    pub requests: u64,
    /// Kicks with nothing requested (the engine changed its mind).
    pub spurious: u64,
    pub delivered_user_mode: u64,
    pub delivered_after_io: u64,
    pub delivered_at_halt: u64,
    pub delivered_at_window: u64,
    pub delivered_counted: u64,
    pub delivered_imprecise: u64,
    /// Kick to return, summed and worst case.
    pub total_latency: Duration,
    pub max_latency: Duration,
}

impl AsyncDeliveryStats {
    fn delivered(&mut self, at: AsyncPosition, since: Instant) {
        let latency = since.elapsed();
        self.total_latency += latency;
        self.max_latency = self.max_latency.max(latency);
        match at {
            AsyncPosition::AfterIo => self.delivered_after_io += 1,
            AsyncPosition::Halt => self.delivered_at_halt += 1,
            AsyncPosition::InterruptWindow => self.delivered_at_window += 1,
            AsyncPosition::UserMode => self.delivered_user_mode += 1,
            AsyncPosition::Counted { .. } => self.delivered_counted += 1,
            AsyncPosition::Imprecise => self.delivered_imprecise += 1,
        }
    }

    pub fn delivered_total(&self) -> u64 {
        self.delivered_user_mode
            + self.delivered_after_io
            + self.delivered_at_halt
            + self.delivered_at_window
            + self.delivered_counted
            + self.delivered_imprecise
    }
}

/// Re-kicks a vCPU every [`USER_MODE_POLL`] while armed, so a kick that
/// found the guest in kernel mode notices when it reaches user mode.
pub(super) struct Poller {
    shared: Arc<(Mutex<bool>, Condvar)>,
    quit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Poller {
    fn spawn(kicker: VcpuKicker, id: usize) -> Result<Self> {
        let shared = Arc::new((Mutex::new(false), Condvar::new()));
        let quit = Arc::new(AtomicBool::new(false));
        let (s, q) = (shared.clone(), quit.clone());
        let thread = std::thread::Builder::new()
            .name(format!("kvm-vcpu{id}-poll"))
            .spawn(move || loop {
                {
                    let (armed, cv) = &*s;
                    let mut a = armed.lock().unwrap_or_else(|e| e.into_inner());
                    while !*a && !q.load(Ordering::SeqCst) {
                        a = cv.wait(a).unwrap_or_else(|e| e.into_inner());
                    }
                }
                if q.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(USER_MODE_POLL);
                kicker.nudge();
            })
            .map_err(|e| backend_err("spawn vCPU poll thread", e.to_string()))?;
        Ok(Self {
            shared,
            quit,
            thread: Some(thread),
        })
    }

    fn set_armed(&self, on: bool) {
        let (armed, cv) = &*self.shared;
        *armed.lock().unwrap_or_else(|e| e.into_inner()) = on;
        cv.notify_all();
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
        self.set_armed(false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl KvmVcpu {
    pub(super) fn stop_waiting(&mut self) {
        self.waiting_since = None;
        if let Some(p) = &self.poller {
            p.set_armed(false);
        }
    }

    /// Records a return to the engine at `at` if a stop request was waiting.
    pub(super) fn deliver_point(&mut self, at: AsyncPosition) {
        if let Some(since) = self.waiting_since {
            self.stats.delivered(at, since);
            self.last_async_position = Some(at);
        }
        self.stop_waiting();
    }

    /// A kick arrived (`since`: when it was asked for), or a poll tick while
    /// one waits. Returns the exit to give the engine, if it is time.
    pub(super) fn on_async(
        &mut self,
        bus: &mut dyn RunContext,
        new_kick: Option<Instant>,
    ) -> Result<Option<VmExit>> {
        if let Some(since) = new_kick {
            if !bus.stop_requested() {
                self.stats.spurious += 1;
                return Ok(None);
            }
            self.stats.requests += 1;
            self.waiting_since.get_or_insert(since);
        }
        let Some(since) = self.waiting_since else {
            return Ok(None);
        };
        if let AsyncEventMode::PmuCounted(_) = self.mode {
            let count = self.guest_event_count().unwrap_or(0);
            let at = AsyncPosition::Counted { count };
            self.stats.delivered(at, since);
            self.last_async_position = Some(at);
            self.stop_waiting();
            return Ok(Some(VmExit::IoStop));
        }
        if self.current_cpl()? == 3 {
            self.deliver_point(AsyncPosition::UserMode);
            return Ok(Some(VmExit::IoStop));
        }
        if since.elapsed() >= MAX_DETERMINISTIC_WAIT {
            tracing::warn!(
                "kvm vcpu{}: no deterministic point within {:?}; stopping where the guest is",
                self.id,
                MAX_DETERMINISTIC_WAIT
            );
            self.deliver_point(AsyncPosition::Imprecise);
            return Ok(Some(VmExit::IoStop));
        }
        if self.poller.is_none() {
            self.poller = Some(Poller::spawn(self.kicker.clone(), self.id)?);
        }
        if let Some(p) = &self.poller {
            p.set_armed(true);
        }
        Ok(None)
    }

    pub(super) fn ensure_counter(&mut self) {
        if let (AsyncEventMode::PmuCounted(event), None) = (self.mode, &self.counter) {
            match GuestCounter::open(event) {
                Ok(c) => self.counter = Some(c),
                Err(e) => {
                    tracing::warn!("kvm vcpu{}: guest PMU counter failed to open ({e}); using deterministic points", self.id);
                    self.mode = AsyncEventMode::DeterministicPoints;
                }
            }
        }
    }
}
