// SPDX-License-Identifier: GPL-2.0-or-later
//! A recorded run: the [`Recorder`] as the machine's [`RunObserver`], with
//! what recording adds between vCPU runs (start and stop triggers, the
//! agent check, slices, checkpoints, the start snapshot).
//!
//! Use: [`RecordingSession::prepare`] on the configuration (it reserves the
//! agent's ring), [`Machine::new`], [`RecordingSession::attach`], run, then
//! [`RecordingSession::take`] for the recordings written.

use super::checkpoint::KernelImage;
use super::event::InterruptKind;
use super::recorder::{
    header_for_machine, FinishedRecording, GuestRequest, RecordConfig, Recorder, StartTrigger,
    StopPoint, StopTrigger,
};
use super::recording::CpuSnapshot;
use krr_devices::console::ConsoleBuffer;
use krr_hypervisor::{DeliveredException, HypervisorError, Injection, Position, UserEntry};
use krr_machine::observer::{position, MachineView, RunObserver};
use krr_machine::{Backend, Machine, MachineConfig, MachineError, RunEnd};
use std::any::Any;

/// When the next checkpoint is due, and what it digests.
struct Checkpoints {
    image: KernelImage,
    every: u64,
    /// Total instructions (all vCPUs) at which the next one is due.
    next: u64,
}

/// The recorder of one run, watching it.
pub struct RecordingSession {
    recorder: Recorder,
    checkpoints: Option<Checkpoints>,
    /// Console position up to which the output was searched for a
    /// trigger marker.
    trigger_scan: u64,
    /// Recorded from boot: whether the agent was checked at /init.
    agent_checked: bool,
    /// Console position where the recording started: a crash report
    /// before that (a soft lockup while booting) is not the recording's.
    console_at_start: u64,
    /// The machine's virtual clock when the running recording started.
    virtual_at_start: u64,
}

/// A configuration prepared for recording: where the ring is.
pub struct Prepared {
    rc: RecordConfig,
    ring_phys: u64,
}

impl RecordingSession {
    /// Reserves the agent's ring at the top of the guest's RAM and tells
    /// the agent where it is (kernel command line). Call before
    /// [`Machine::new`].
    pub fn prepare(cfg: &mut MachineConfig, rc: RecordConfig) -> Result<Prepared, String> {
        let min = 4096 + super::abi::MIN_DATA_SIZE;
        if !rc.ring_size.is_multiple_of(4096)
            || rc.ring_size < min
            || rc.ring_size > cfg.mem_bytes / 4
        {
            return Err(format!(
                "ring size {} bytes: expected a multiple of 4096 between {min} bytes and a quarter of guest memory",
                rc.ring_size
            ));
        }
        let ring_phys = cfg.mem_bytes - rc.ring_size;
        cfg.reserved_top = rc.ring_size;
        cfg.cmdline.push(' ');
        cfg.cmdline
            .push_str(&super::abi::kernel_cmdline(ring_phys, rc.ring_size, false));
        Ok(Prepared { rc, ring_phys })
    }

    /// Makes the recorder of `machine` (built from the prepared
    /// configuration) and installs it as the machine's observer.
    pub fn attach(
        prepared: Prepared,
        machine: &mut Machine,
        backend: Backend,
    ) -> Result<(), String> {
        let Prepared { mut rc, ring_phys } = prepared;
        let cfg = machine.config();
        let checkpoints = if rc.checkpoint_every > 0 {
            let image = rc
                .vmlinux
                .as_deref()
                .and_then(krr_guest::symbols::Symbols::beside)
                .or_else(|| krr_guest::symbols::Symbols::beside(&cfg.kernel))
                .and_then(|s| KernelImage::from_symbols(&s))
                .ok_or_else(|| {
                    "--checkpoint-every: checkpoints digest the kernel's data and bss, found through a System.map (with _sdata, _edata, __bss_start, __bss_stop) beside --vmlinux or --kernel; there is none".to_string()
                })?;
            Some(Checkpoints {
                image,
                every: rc.checkpoint_every,
                next: rc.checkpoint_every,
            })
        } else {
            None
        };
        rc.engine_executes_cpu = backend == Backend::Tcg;
        let header = header_for_machine(cfg, &rc, backend.name(), ring_phys)
            .map_err(|e| format!("recording header: {e:#}"))?;
        let recorder = Recorder::new(rc, machine.memory().clone(), ring_phys, header)
            .map_err(|e| format!("recorder: {e}"))?;
        machine.set_observer(Box::new(RecordingSession {
            recorder,
            checkpoints,
            trigger_scan: 0,
            agent_checked: false,
            console_at_start: 0,
            virtual_at_start: 0,
        }));
        Ok(())
    }

    /// A machine that records its run: [`Self::prepare`], [`Machine::new`],
    /// [`Self::attach`].
    pub fn machine(
        mut cfg: MachineConfig,
        rc: RecordConfig,
        backend: Backend,
    ) -> Result<Machine, MachineError> {
        let prepared = Self::prepare(&mut cfg, rc).map_err(MachineError::Config)?;
        let mut machine = Machine::new(cfg, backend)?;
        Self::attach(prepared, &mut machine, backend).map_err(MachineError::Config)?;
        Ok(machine)
    }

    /// The recordings `machine`'s run wrote, in order (the session is
    /// taken off the machine).
    pub fn take(machine: &mut Machine) -> Vec<FinishedRecording> {
        machine
            .take_observer()
            .and_then(|o| o.into_any().downcast::<RecordingSession>().ok())
            .map(|s| s.recorder.finished().to_vec())
            .unwrap_or_default()
    }

    /// Starts a recording now (every vCPU stopped).
    fn start(&mut self, m: &mut MachineView<'_>) -> Result<(), String> {
        let cpus = cpu_snapshots(m).map_err(|e| e.to_string())?;
        let devices = serde_json::to_value(m.platform.device_state())
            .map_err(|e| format!("device state: {e}"))?;
        self.console_at_start = m.console().end();
        self.virtual_at_start = m.virtual_now();
        self.recorder.start(&cpus, devices, self.console_at_start)?;
        Ok(())
    }

    /// Stops the running recording, if any (every vCPU stopped).
    fn stop(
        &mut self,
        m: &MachineView<'_>,
        reason: &str,
        ok: bool,
        crash: Option<krr_crash::CrashReport>,
    ) {
        if !self.recorder.is_recording() {
            return;
        }
        let at = StopPoint {
            instructions_per_vcpu: m
                .vcpus
                .iter()
                .map(|v| v.instructions_retired().unwrap_or(0))
                .collect(),
            kernel_instructions_per_vcpu: m
                .vcpus
                .iter()
                .map(|v| v.kernel_instructions_retired().unwrap_or(0))
                .collect(),
            virtual_ns: m.virtual_now(),
            start_virtual_ns: self.virtual_at_start,
            triple_fault_vcpu: m.triple_fault_vcpu,
            crash,
        };
        self.recorder.between_runs(m.platform.current, m.console());
        self.recorder.stop(reason, ok, at);
    }
}

/// The kernel report in the console output from position `since` once its
/// call trace has ended (`</TASK>`, or a WARNING's `---[ end trace`) in the
/// output after position `scan`, which moves past what was searched. A
/// report is parsed from what the console buffer still holds: one whose
/// beginning it dropped (the guest printed more than half its window since)
/// is parsed from its end part, if at all.
fn whole_report(
    console: &ConsoleBuffer,
    scan: &mut u64,
    since: u64,
) -> Option<krr_crash::CrashReport> {
    const TRACE_ENDS: [&[u8]; 2] = [b"</TASK>", b"---[ end trace"];
    let (from, new) = console.held_since(*scan);
    let longest = TRACE_ENDS.iter().map(|m| m.len()).max().unwrap_or(0);
    let ended = TRACE_ENDS
        .iter()
        .any(|m| new.windows(m.len()).any(|w| w == *m));
    // A marker cut by the end of the output is found on the next call.
    *scan = console
        .end()
        .saturating_sub(longest as u64 - 1)
        .max(from.min(console.end()));
    if !ended {
        return None;
    }
    krr_crash::parse(&String::from_utf8_lossy(console.held_since(since).1))
}

/// Whether `marker` is in the console output after position `scan`, which
/// moves past the marker, or past what was searched (less the marker's
/// length, so one cut by the end of the output is found on the next call).
fn marker_printed(console: &ConsoleBuffer, scan: &mut u64, marker: &str) -> bool {
    let (from, new) = console.held_since(*scan);
    match new
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
    {
        Some(i) => {
            *scan = from + (i + marker.len()) as u64;
            true
        }
        None => {
            *scan = console.end().saturating_sub(marker.len() as u64).max(*scan);
            false
        }
    }
}

/// Every vCPU's state for a recording's start snapshot.
fn cpu_snapshots(m: &MachineView<'_>) -> Result<Vec<CpuSnapshot>, HypervisorError> {
    // The MSRs a 64-bit Linux kernel programs and replay must restore.
    const MSRS: &[u32] = &[
        0x1b,        // IA32_APIC_BASE
        0x174,       // SYSENTER_CS
        0x175,       // SYSENTER_ESP
        0x176,       // SYSENTER_EIP
        0x277,       // PAT
        0xc000_0080, // EFER
        0xc000_0081, // STAR
        0xc000_0082, // LSTAR
        0xc000_0083, // CSTAR
        0xc000_0084, // FMASK
        0xc000_0100, // FS_BASE
        0xc000_0101, // GS_BASE
        0xc000_0102, // KERNEL_GS_BASE
        0xc000_0103, // TSC_AUX
    ];
    m.vcpus
        .iter()
        .enumerate()
        .map(|(id, vcpu)| {
            Ok(CpuSnapshot {
                id,
                state: m.state_name(id).to_string(),
                icount: vcpu.instructions_retired().unwrap_or(0),
                kernel_icount: vcpu.kernel_instructions_retired().unwrap_or(0),
                regs: vcpu.regs()?,
                sregs: vcpu.sregs()?,
                fpu: vcpu.fpu()?.xsave,
                msrs: MSRS
                    .iter()
                    .filter_map(|&msr| vcpu.msr(msr).ok().map(|v| (msr, v)))
                    .collect(),
                debug: vcpu.debug_regs()?,
            })
        })
        .collect()
}

impl RunObserver for RecordingSession {
    fn pio_read(&mut self, cpu: usize, at: Position, port: u16, data: &[u8]) {
        self.recorder.pio_read(cpu, at, port, data);
    }

    fn pio_write(&mut self, cpu: usize, at: Position, port: u16, data: &[u8]) {
        if let (super::abi::DOORBELL_PORT, &[a, b, c, d]) = (port, data) {
            self.recorder
                .doorbell(cpu, at, u32::from_le_bytes([a, b, c, d]));
        }
    }

    fn mmio_read(&mut self, cpu: usize, at: Position, addr: u64, data: &[u8]) {
        self.recorder.mmio_read(cpu, at, addr, data);
    }

    fn rdtsc(&mut self, cpu: usize, at: Position, value: u64) {
        self.recorder.rdtsc(cpu, at, value);
    }

    fn exception(&mut self, cpu: usize, at: Position, exception: &DeliveredException) {
        self.recorder.exception(cpu, at, exception);
    }

    fn syscall(&mut self, cpu: usize, at: Position, entry: &UserEntry) {
        self.recorder.syscall(cpu, at, entry);
    }

    fn dma(&mut self, cpu: usize, at: Position, gpa: u64, len: u64) {
        self.recorder.dma(cpu, at, gpa, len);
    }

    fn wants_stop(&self) -> bool {
        self.recorder.wants_stop()
    }

    /// A run recorded from boot starts recording before its first
    /// instruction (acts once).
    fn round_start(&mut self, m: &mut MachineView<'_>) -> Result<(), String> {
        if self.recorder.config().start != StartTrigger::Boot
            || self.recorder.is_recording()
            || !self.recorder.finished().is_empty()
        {
            return Ok(());
        }
        self.start(m)
    }

    fn interrupt(
        &mut self,
        m: &MachineView<'_>,
        cpu: usize,
        injection: Injection,
    ) -> Result<(), HypervisorError> {
        if !self.recorder.is_recording() {
            return Ok(());
        }
        let (kind, vector) = match injection {
            Injection::Nmi => (InterruptKind::Nmi, 2),
            Injection::Interrupt(vector) => (InterruptKind::External, vector),
            // The machine injects only interrupts and NMIs.
            Injection::Exception { .. } | Injection::SoftwareInterrupt(_) => return Ok(()),
        };
        let (at, regs) = position(m.vcpus[cpu].as_ref())?;
        self.recorder.interrupt(cpu, at, kind, vector, regs);
        Ok(())
    }

    fn startup(&mut self, cpu: usize, vector: u8) {
        self.recorder.startup(cpu, vector);
    }

    /// On machines of several vCPUs the end of the vCPU's slice (the
    /// global order of the vCPUs' execution, which replay follows), and a
    /// checkpoint when one is due and the vCPU stopped in the kernel.
    fn after_run(&mut self, m: &MachineView<'_>, cpu: usize) -> Result<(), HypervisorError> {
        // One vCPU and no checkpoints: nothing to log (spare the register
        // reads after every run).
        if !self.recorder.is_recording() || (m.vcpus.len() == 1 && self.checkpoints.is_none()) {
            return Ok(());
        }
        let (at, regs) = position(m.vcpus[cpu].as_ref())?;
        if m.vcpus.len() > 1 {
            self.recorder.slice(cpu, at);
        }
        if let Some(c) = &mut self.checkpoints {
            let total: u64 = m
                .vcpus
                .iter()
                .map(|v| v.instructions_retired().unwrap_or(0))
                .sum();
            if total >= c.next && at.cpl == 0 {
                let cr3 = m.vcpus[cpu].sregs()?.cr3;
                self.recorder
                    .checkpoint(cpu, at, regs, c.image.digest(m.mem, cr3));
                c.next = total + c.every;
            }
        }
        Ok(())
    }

    /// Guest start/stop requests, console triggers, the agent check, the
    /// periodic flush.
    fn between_runs(&mut self, m: &mut MachineView<'_>, cpu: usize) -> Option<RunEnd> {
        if let Some(e) = self.recorder.error() {
            return Some(RunEnd::RecordingFailed {
                reason: e.to_string(),
            });
        }
        let (start, stop) = (
            self.recorder.config().start.clone(),
            self.recorder.config().stop.clone(),
        );
        let recording = self.recorder.is_recording();
        let request = self.recorder.take_request();
        // With recording on from boot, the agent must have come up by the
        // time the kernel starts /init, or nothing of user space's kernel
        // entries gets recorded.
        if start == StartTrigger::Boot && m.init_started && !self.agent_checked {
            self.agent_checked = true;
            if let Err(e) = self.recorder.check_agent() {
                return Some(RunEnd::RecordingFailed { reason: e });
            }
        }
        let out = m.console();
        let mut do_start = false;
        let mut do_stop = None;
        let mut report = None;
        if recording {
            match (&stop, request) {
                (StopTrigger::Guest, Some(GuestRequest::Stop)) => {
                    do_stop = Some("stopped by the guest (/proc/krr_agent)".to_string())
                }
                (StopTrigger::Marker(marker), _)
                    if marker_printed(out, &mut self.trigger_scan, marker) =>
                {
                    do_stop = Some(format!("console marker {marker:?}"))
                }
                (StopTrigger::Report, _) => {
                    report = whole_report(out, &mut self.trigger_scan, self.console_at_start);
                    if let Some(r) = &report {
                        do_stop = Some(format!("kernel report on the console: {}", r.title));
                    }
                }
                _ => {}
            }
        } else {
            match (&start, request) {
                (StartTrigger::Guest, Some(GuestRequest::Start)) => do_start = true,
                (StartTrigger::Marker(marker), _)
                    if marker_printed(out, &mut self.trigger_scan, marker) =>
                {
                    do_start = true
                }
                _ => {}
            }
        }
        if let Some(reason) = do_stop {
            let title = report.as_ref().map(|r| r.title.clone());
            self.stop(m, &reason, true, report);
            if let Some(title) = title {
                return Some(RunEnd::Report { title });
            }
        } else if do_start {
            if let Err(e) = self.recorder.check_agent().and_then(|()| self.start(m)) {
                return Some(RunEnd::RecordingFailed { reason: e });
            }
        }
        self.recorder.between_runs(cpu, m.console());
        self.recorder.error().map(|e| RunEnd::RecordingFailed {
            reason: e.to_string(),
        })
    }

    /// Finishes a recording still running when the run ends.
    fn finished(&mut self, m: &mut MachineView<'_>, end: &RunEnd) {
        let ok = !matches!(
            end,
            RunEnd::BackendError { .. } | RunEnd::RecordingFailed { .. }
        );
        let reason = match end {
            RunEnd::Interrupted => "interrupted (SIGINT)".to_string(),
            other => format!(
                "run ended: {}",
                serde_json::to_string(other).unwrap_or_default()
            ),
        };
        // A panic's report goes into end.json (title, RIP, call trace), so
        // that a replay can be checked against the failure it recorded.
        let crash = match end {
            RunEnd::Panic { .. } => {
                let since_start = m.console().held_since(self.console_at_start).1;
                krr_crash::parse(&String::from_utf8_lossy(since_start))
            }
            _ => None,
        };
        self.stop(m, &reason, ok, crash);
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::{marker_printed, whole_report};
    use krr_devices::console::ConsoleBuffer;

    fn testdata(name: &str) -> Vec<u8> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crash/testdata/");
        std::fs::read(format!("{path}{name}")).unwrap()
    }

    fn console_of(bytes: &[u8]) -> ConsoleBuffer {
        let mut console = ConsoleBuffer::new();
        console.push(bytes);
        console
    }

    /// Fed as a console grows, in pieces cut anywhere: no report before its
    /// call trace ends, the report (lockdep's, which never panics) once it
    /// has, and none from output before the recording started.
    #[test]
    fn a_report_is_taken_once_its_call_trace_ends() {
        let log = testdata("09-recursive-locking.txt");
        let trace_end = log.windows(7).position(|w| w == b"</TASK>").unwrap() + 7;
        for piece in [1, 5, 64, 4096] {
            let mut console = ConsoleBuffer::new();
            let mut scan = 0;
            let mut found = None;
            let mut at = 0;
            while at < log.len() && found.is_none() {
                let next = (at + piece).min(log.len());
                console.push(&log[at..next]);
                at = next;
                found = whole_report(&console, &mut scan, 0).map(|r| (at, r));
            }
            let (at, report) = found.expect("the report");
            assert_eq!(report.title, "possible deadlock in rfkill_send_events");
            assert!(
                at >= trace_end && at < trace_end + piece,
                "piece {piece}: at {at}"
            );
        }
        let mut scan = 0;
        let console = console_of(&log);
        assert!(whole_report(&console, &mut scan, log.len() as u64).is_none());
        assert_eq!(scan, log.len() as u64 - 13);
    }

    #[test]
    fn a_warning_that_does_not_panic_is_a_report_too() {
        let log = testdata("07-warning.txt");
        let mut scan = 0;
        let report = whole_report(&console_of(&log), &mut scan, 0).expect("the warning");
        assert_eq!(report.title, "WARNING in packet_release");
    }

    /// After chatter the buffer dropped, positions are still
    /// right: the report that follows is found once its trace ends, and a
    /// report before the recording's start is still not the recording's.
    #[test]
    fn a_report_after_dropped_output_is_found() {
        let log = testdata("09-recursive-locking.txt");
        let mut console = ConsoleBuffer::with_window(64 << 10);
        let mut scan = 0;
        for i in 0..20_000 {
            console.push(format!("[ {i}.0] chatter that ends no trace\n").as_bytes());
            assert!(whole_report(&console, &mut scan, 0).is_none());
        }
        assert!(console.start() > 0);
        let since = console.end();
        console.push(&log);
        let report = whole_report(&console, &mut scan, since).expect("the report");
        assert_eq!(report.title, "possible deadlock in rfkill_send_events");
        let mut scan = 0;
        assert!(whole_report(&console, &mut scan, console.end()).is_none());
    }

    /// A trigger marker is found once, wherever the output is cut, also
    /// after the buffer dropped output (positions are absolute).
    #[test]
    fn a_marker_is_found_once_across_cuts_and_trims() {
        let mut console = ConsoleBuffer::with_window(1024);
        let mut scan = 0;
        for i in 0..1_000 {
            console.push(format!("line {i}\n").as_bytes());
            assert!(!marker_printed(&console, &mut scan, "KRR-GO"));
        }
        console.push(b"xx KRR-");
        assert!(!marker_printed(&console, &mut scan, "KRR-GO"));
        console.push(b"GO yy");
        assert!(marker_printed(&console, &mut scan, "KRR-GO"));
        assert_eq!(scan, console.end() - 3);
        assert!(!marker_printed(&console, &mut scan, "KRR-GO"), "once");
        console.push(b"KRR-GO\n");
        assert!(marker_printed(&console, &mut scan, "KRR-GO"));
    }
}
