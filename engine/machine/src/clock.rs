// SPDX-License-Identifier: GPL-2.0-or-later
//! The virtual clock of KVM runs, and the time slicing that drives them.
//!
//! KVM does not count guest instructions, so the machine's usual clock
//! (instructions retired + halted time, 1 ns each) does not exist there.
//! A KVM run's clock is host monotonic time since the machine started, in
//! ns: the PIT, the local APIC timers, the RTC and the engine's RDTSC
//! answer all read it. KVM runs are therefore not instruction-deterministic
//! (two runs of the same guest differ in where timer interrupts land); what
//! replay needs is logged by the recorder, as in KRR. The software CPU keeps
//! its instruction clock and is not affected by anything here.
//!
//! Slicing: KVM runs a vCPU until it exits on its own (port/MMIO, HLT), so
//! a [`SliceTimer`] thread kicks the running vCPU out of `KVM_RUN` at the
//! end of its time slice or at the next timer deadline, whichever is first.

use super::platform::Platform;
use super::ExitCounters;
use krr_hypervisor::kvm::{HostFeatures, VcpuKicker};
use krr_hypervisor::{IoBus, RunEvents};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Host monotonic time since the machine started.
#[derive(Debug, Clone, Copy)]
pub struct HostClock {
    start: Instant,
}

impl HostClock {
    pub fn start() -> HostClock {
        HostClock {
            start: Instant::now(),
        }
    }

    /// Nanoseconds since [`HostClock::start`].
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The host instant at which this clock reads `ns`.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns)
    }

    /// Sets the platform's view of vCPU `vcpu`'s time to now. The platform
    /// reads a vCPU's time as `retired + idle_ns`; KVM runs never add idle
    /// time (a halted vCPU's clock keeps running with the host's), so the
    /// whole reading goes into `retired`.
    pub fn sync(&self, platform: &mut Platform, vcpu: usize) {
        let idle = platform.idle_ns[vcpu];
        platform.retired[vcpu] = self.now_ns().saturating_sub(idle);
    }
}

/// The [`IoBus`] a KVM vCPU runs against: the platform, with the host clock
/// brought up to date before every access, and a stop request when the
/// vCPU's time slice is over.
pub struct HostClockBus<'a> {
    pub platform: &'a mut Platform,
    pub clock: HostClock,
    /// Set by the [`SliceTimer`] (before it kicks) when the slice ends.
    pub slice_over: Arc<AtomicBool>,
    /// Exit counters of the run (KVM counts nothing itself).
    pub stats: &'a mut ExitCounters,
    /// The engine's CPU is shown without what the host's KVM lacks.
    pub features: &'a HostFeatures,
    /// The slice timer and the running vCPU's kicker: an access that
    /// programs a device timer earlier than the slice's end moves the end
    /// (a vCPU only returns to the run loop when something stops it).
    pub timer: &'a SliceTimer,
    pub kicker: &'a VcpuKicker,
    /// When the armed slice ends (host-clock ns), if one is armed.
    pub slice_end: Option<u64>,
}

impl HostClockBus<'_> {
    /// After an access: re-arms the slice timer when a device timer now
    /// falls due before the slice's end.
    fn follow_deadline(&mut self) {
        if let Some(d) = self.platform.next_deadline() {
            if self.slice_end.is_none_or(|end| d < end) {
                self.slice_end = Some(d);
                self.timer.arm_with(
                    self.clock.instant_at(d),
                    self.kicker.clone(),
                    self.slice_over.clone(),
                );
            }
        }
    }
}

impl IoBus for HostClockBus<'_> {
    fn pio_read(&mut self, vcpu: usize, port: u16, data: &mut [u8]) {
        self.stats.pio += 1;
        self.clock.sync(self.platform, vcpu);
        self.platform.pio_read(vcpu, port, data);
        self.follow_deadline();
    }

    fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]) {
        self.stats.pio += 1;
        self.clock.sync(self.platform, vcpu);
        self.platform.pio_write(vcpu, port, data);
        self.follow_deadline();
    }

    fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8]) {
        self.stats.mmio += 1;
        self.clock.sync(self.platform, vcpu);
        self.platform.mmio_read(vcpu, addr, data);
        self.follow_deadline();
    }

    fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8]) {
        self.stats.mmio += 1;
        self.clock.sync(self.platform, vcpu);
        self.platform.mmio_write(vcpu, addr, data);
        self.follow_deadline();
    }

    fn cpuid(&mut self, vcpu: usize, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.stats.cpuid += 1;
        let full = self.platform.cpuid(vcpu, leaf, subleaf);
        self.features.restrict(leaf, subleaf, full)
    }

    fn rdtsc(&mut self, vcpu: usize) -> u64 {
        self.stats.rdtsc += 1;
        self.clock.sync(self.platform, vcpu);
        self.platform.rdtsc(vcpu)
    }
}

impl RunEvents for HostClockBus<'_> {
    fn stop_requested(&self) -> bool {
        self.platform.stop_requested()
            || self.slice_over.load(Ordering::SeqCst)
            // A device timer fell due: this access is the stopping point.
            || self
                .platform
                .next_deadline()
                .is_some_and(|d| d <= self.clock.now_ns())
    }
}

/// One armed slice: kick `kicker` at `at`, after setting `over`.
struct Slice {
    at: Instant,
    kicker: VcpuKicker,
    over: Arc<AtomicBool>,
}

#[derive(Default)]
struct TimerState {
    slice: Option<Slice>,
    quit: bool,
}

/// A host thread that ends time slices: [`SliceTimer::arm`] before a vCPU
/// runs, [`SliceTimer::disarm`] after. A slice disarmed in time never kicks;
/// a kick that races with the end of the run finds its own `over` flag
/// (never the next slice's), so a late kick is seen as spurious and ignored.
pub struct SliceTimer {
    shared: Arc<(Mutex<TimerState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl SliceTimer {
    pub fn spawn() -> std::io::Result<SliceTimer> {
        let shared: Arc<(Mutex<TimerState>, Condvar)> = Arc::default();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("krr-slice-timer".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if st.quit {
                        return;
                    }
                    let Some(at) = st.slice.as_ref().map(|sl| sl.at) else {
                        st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                        continue;
                    };
                    let now = Instant::now();
                    if now < at {
                        st = cv
                            .wait_timeout(st, at - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                        continue;
                    }
                    if let Some(sl) = st.slice.take() {
                        sl.over.store(true, Ordering::SeqCst);
                        sl.kicker.kick();
                    }
                }
            })?;
        Ok(SliceTimer {
            shared,
            thread: Some(thread),
        })
    }

    /// Kicks `kicker` at `at` unless disarmed first. Returns the flag the
    /// vCPU's bus must report as a stop request.
    pub fn arm(&self, at: Instant, kicker: VcpuKicker) -> Arc<AtomicBool> {
        let over = Arc::new(AtomicBool::new(false));
        self.arm_with(at, kicker, over.clone());
        over
    }

    /// Like [`SliceTimer::arm`], for the slice whose flag is `over`
    /// (moving its end).
    pub fn arm_with(&self, at: Instant, kicker: VcpuKicker, over: Arc<AtomicBool>) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).slice = Some(Slice { at, kicker, over });
        cv.notify_all();
    }

    pub fn disarm(&self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).slice = None;
        cv.notify_all();
    }
}

impl Drop for SliceTimer {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.shared;
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            st.quit = true;
            st.slice = None;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_clock_is_monotonic_and_starts_near_zero() {
        let c = HostClock::start();
        let a = c.now_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = c.now_ns();
        assert!(a < 1_000_000_000, "a fresh clock reads {a} ns");
        assert!(b >= a + 2_000_000, "{b} ns after {a} ns and a 2 ms sleep");
    }

    #[test]
    fn a_slice_sets_its_flag_when_it_ends_and_a_disarmed_one_never_does() {
        let t = SliceTimer::spawn().unwrap();
        let k = VcpuKicker::default();
        let over = t.arm(Instant::now() + Duration::from_millis(5), k.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !over.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the slice never ended");
            std::thread::sleep(Duration::from_millis(1));
        }
        let over2 = t.arm(Instant::now() + Duration::from_millis(50), k);
        t.disarm();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!over2.load(Ordering::SeqCst));
    }
}
