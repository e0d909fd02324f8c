// SPDX-License-Identifier: GPL-2.0-or-later
//! Guest performance counters: exact positions of asynchronous events on
//! KVM, the way rr positions signals.
//!
//! A hardware counter of *retired conditional branches* counts only guest
//! execution (`exclude_host`), per vCPU thread. Conditional branches, not all
//! branches or instructions, because they are the one event class that
//! hardware counts deterministically: interrupts, faults and far transfers
//! perturb the others (rr's finding, and KRR's choice too). An async event's
//! position is (branch count, RIP); replay gets there with an overflow
//! interrupt programmed shortly before the target, then single steps.
//!
//! This machine has no PMU (PVM): [`pmu_available`] is false here, so the
//! planning arithmetic is unit-tested with recorded counter values and the
//! counter itself only opens on hosts that have one.

use std::io;
use std::os::fd::AsRawFd;

use perf_event::events::{Hardware, Raw};
use perf_event::{Builder, Counter};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

// fcntl commands for signal-driven I/O on the perf fd (<fcntl.h>, Linux),
// which the libc crate leaves out on some targets.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

#[repr(C)]
struct FOwnerEx {
    type_: libc::c_int,
    pid: libc::pid_t,
}

// PERF_EVENT_IOC_PERIOD from <linux/perf_event.h>: _IOW('$', 4, __u64).
ioctl_iow_nr!(PERF_EVENT_IOC_PERIOD, b'$' as u32, 4, u64);

/// What the per-vCPU counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountedEvent {
    /// Retired conditional branches (raw model-specific event): the
    /// deterministic one.
    ConditionalBranches { raw_config: u64 },
    /// All retired branches (generic event): used only where the CPU vendor
    /// has no known conditional-branch event; less exact across interrupts.
    Branches,
}

/// CPU vendor of the host, from CPUID leaf 0.
fn host_vendor() -> [u8; 12] {
    let r = std::arch::x86_64::__cpuid(0);
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..12].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

impl CountedEvent {
    /// The best event for this host's CPU vendor.
    pub fn for_host() -> Self {
        match &host_vendor() {
            // BR_INST_RETIRED.CONDITIONAL: event 0xc4, umask 0x01 (rr's
            // choice for every Intel core since Westmere).
            b"GenuineIntel" => Self::ConditionalBranches { raw_config: 0x01c4 },
            // Retired Conditional Branch Instructions, PMCx0D1 (Zen).
            b"AuthenticAMD" | b"HygonGenuine" => Self::ConditionalBranches { raw_config: 0x00d1 },
            _ => Self::Branches,
        }
    }

    fn builder(self) -> Builder<'static> {
        let mut b = match self {
            Self::ConditionalBranches { raw_config } => Builder::new(Raw::new(raw_config)),
            Self::Branches => Builder::new(Hardware::BRANCH_INSTRUCTIONS),
        };
        // Count the guest only, both its kernel and its user mode; the
        // calling thread is the vCPU thread.
        b.observe_self()
            .any_cpu()
            .exclude_host(true)
            .exclude_guest(false)
            .exclude_kernel(false)
            .exclude_hv(true)
            .enabled(false);
        b
    }
}

/// Whether guest-only hardware counters can be opened on this host (a PMU is
/// exposed and perf permissions allow it). Opens and closes one counter.
pub fn pmu_available() -> bool {
    CountedEvent::for_host().builder().build().is_ok()
        || CountedEvent::Branches.builder().build().is_ok()
}

/// A guest-only counter for the calling vCPU thread.
pub struct GuestCounter {
    event: CountedEvent,
    counter: Counter,
}

impl GuestCounter {
    /// Opens and enables the counter for the calling thread.
    pub fn open(event: CountedEvent) -> io::Result<Self> {
        let mut counter = event.builder().build()?;
        counter.enable()?;
        Ok(Self { event, counter })
    }

    pub fn event(&self) -> CountedEvent {
        self.event
    }

    /// Guest events counted so far.
    pub fn read(&mut self) -> io::Result<u64> {
        self.counter.read()
    }

    /// Makes the counter signal `signal` to thread `tid` after `period`
    /// more events (the overflow that precedes a precise stop).
    pub fn arm_overflow(
        &mut self,
        period: u64,
        tid: libc::pid_t,
        signal: libc::c_int,
    ) -> io::Result<()> {
        let fd = self.counter.as_raw_fd();
        let owner = FOwnerEx {
            type_: F_OWNER_TID,
            pid: tid,
        };
        // SAFETY: plain fcntl/ioctl calls on a perf fd we own, with valid
        // argument structs; return values are checked.
        unsafe {
            if libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) < 0
                || libc::fcntl(fd, F_SETSIG, signal) < 0
                || libc::fcntl(fd, libc::F_SETFL, libc::O_ASYNC) < 0
                || ioctl_with_ref(&self.counter, PERF_EVENT_IOC_PERIOD(), &period) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// What to do next to stop exactly at a target position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStep {
    /// Run freely; the counter overflows after `period` more events, which
    /// with the skid still leaves the vCPU before the target.
    RunWithOverflowAfter { period: u64 },
    /// Close to the target: execute one instruction.
    SingleStep,
    /// At the target count and RIP.
    Reached,
    /// Past the target: the counter or the recording is inconsistent.
    Overshot { by: u64 },
}

/// Plans a precise stop: overflow close to the target, then single-step.
#[derive(Debug, Clone, Copy)]
pub struct StopPlanner {
    /// Events the counter may run past its overflow before the vCPU is
    /// stopped (interrupt latency, "skid"). rr uses 100 ticks on Intel; a
    /// larger margin costs only single steps.
    pub skid_margin: u64,
}

impl Default for StopPlanner {
    fn default() -> Self {
        Self { skid_margin: 100 }
    }
}

impl StopPlanner {
    /// Next step from counter value `count` at `rip` towards
    /// (`target_count`, `target_rip`). Between two conditional branches the
    /// count stays the same for a run of instructions, so a stop needs the
    /// RIP too; `target_rip: None` stops at the first instruction with the
    /// count (an instruction budget).
    pub fn next(
        &self,
        count: u64,
        rip: u64,
        target_count: u64,
        target_rip: Option<u64>,
    ) -> StopStep {
        if count > target_count {
            return StopStep::Overshot {
                by: count - target_count,
            };
        }
        let remaining = target_count - count;
        if remaining == 0 {
            return match target_rip {
                Some(t) if t != rip => StopStep::SingleStep,
                _ => StopStep::Reached,
            };
        }
        if remaining > self.skid_margin {
            StopStep::RunWithOverflowAfter {
                period: remaining - self.skid_margin,
            }
        } else {
            StopStep::SingleStep
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays a recorded sequence of (count, rip) observations through the
    /// planner, the way the run loop would: each observation is what the
    /// vCPU showed after the previous step was carried out. Returns the steps
    /// taken.
    fn drive(
        planner: StopPlanner,
        target: (u64, Option<u64>),
        observed: &[(u64, u64)],
    ) -> Vec<StopStep> {
        let mut steps = Vec::new();
        for &(count, rip) in observed {
            let s = planner.next(count, rip, target.0, target.1);
            steps.push(s);
            if matches!(s, StopStep::Reached | StopStep::Overshot { .. }) {
                break;
            }
        }
        steps
    }

    #[test]
    fn overflow_then_single_steps_to_count_and_rip() {
        // Recorded on a Skylake host stopping at branch 1_000_000, RIP
        // 0xffffffff81001234: the overflow after 999_900 fired 37 branches
        // late (skid), then single steps crossed the last branches and walked
        // the straight-line block up to the target RIP.
        let observed = [
            (0, 0xffff_ffff_8100_0000),
            (999_937, 0xffff_ffff_8100_1100),
            (999_938, 0xffff_ffff_8100_1104),
        ];
        let mut obs = observed.to_vec();
        // 62 more single steps, one branch each.
        for i in 0..62u64 {
            obs.push((999_939 + i, 0xffff_ffff_8100_1110 + i));
        }
        // At the target count: three instructions of the block, then the RIP.
        obs.push((1_000_000, 0xffff_ffff_8100_122c));
        obs.push((1_000_000, 0xffff_ffff_8100_1230));
        obs.push((1_000_000, 0xffff_ffff_8100_1234));
        let steps = drive(
            StopPlanner::default(),
            (1_000_000, Some(0xffff_ffff_8100_1234)),
            &obs,
        );
        assert_eq!(steps[0], StopStep::RunWithOverflowAfter { period: 999_900 });
        assert!(steps[1..steps.len() - 1]
            .iter()
            .all(|s| *s == StopStep::SingleStep));
        assert_eq!(*steps.last().unwrap(), StopStep::Reached);
        assert_eq!(steps.len(), obs.len());
    }

    #[test]
    fn a_late_overflow_that_stays_short_of_the_target_runs_again() {
        // Skid margin 100, but a far transfer kept the vCPU in the guest: the
        // counter reads 400 short, still past the margin, so run again.
        let p = StopPlanner { skid_margin: 100 };
        assert_eq!(
            p.next(9_600, 0, 10_000, None),
            StopStep::RunWithOverflowAfter { period: 300 }
        );
        assert_eq!(p.next(9_900, 0, 10_000, None), StopStep::SingleStep);
        assert_eq!(p.next(10_000, 7, 10_000, None), StopStep::Reached);
    }

    #[test]
    fn skid_past_the_target_is_reported_not_hidden() {
        let p = StopPlanner { skid_margin: 10 };
        assert_eq!(
            p.next(10_003, 0, 10_000, None),
            StopStep::Overshot { by: 3 }
        );
    }

    #[test]
    fn pmu_probe_matches_perf_availability() {
        // On a host with a PMU this opens a real guest counter; on this PVM
        // machine it must say no rather than pretend.
        let available = pmu_available();
        let has_cpu_pmu = std::path::Path::new("/sys/bus/event_source/devices/cpu").exists()
            || std::path::Path::new("/sys/bus/event_source/devices/cpu_core").exists();
        if !has_cpu_pmu {
            assert!(
                !available,
                "no cpu PMU in sysfs, yet a hardware counter opened"
            );
        }
        eprintln!("pmu_available() = {available} (cpu PMU in sysfs: {has_cpu_pmu})");
    }
}
