// SPDX-License-Identifier: GPL-2.0-or-later
//! Benchmarks the engine runs itself.
//!
//! Boot: the software CPU against `qemu-system-x86_64 -accel tcg`,
//! booting the same kernel and initramfs with the same command line, side by
//! side in one run. The end point for both is the first console line that
//! `/init` prints (the first complete line after the kernel's
//! "Run /init as init process").
//!
//! Recording: a workload run plainly and recorded on the same backend
//! ([`record_vs_plain`]); the window is /init to the end of the run.

use crate::machine::{
    first_line_after, parse_marker, Backend, Machine, MachineConfig, RunEnd, END_MARKER,
    INIT_MARKER,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BootBenchConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub vcpus: usize,
    pub mem_bytes: u64,
    /// QEMU binary to compare against.
    pub qemu: PathBuf,
    /// QEMU machine type: `microvm,acpi=off` for the project's kernel (no
    /// PCI, no ACPI), `pc` for a distribution kernel.
    pub qemu_machine: String,
    /// Give up on either side after this long.
    pub timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BootBench {
    pub vcpus: usize,
    /// Software CPU: wall seconds to the first line of /init.
    pub krr_wall_seconds: f64,
    /// Guest instructions retired by then (all vCPUs).
    pub krr_instructions_to_init: Option<u64>,
    pub krr_mips: f64,
    /// How the krr run ended (it runs the guest to its end).
    pub krr_end: RunEnd,
    /// QEMU TCG: wall seconds to the first line of /init.
    pub qemu_wall_seconds: f64,
    /// krr / QEMU (target: at most 2).
    pub ratio: f64,
    pub qemu_command: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Machine(#[from] crate::machine::MachineError),
    #[error("krr never printed a line from /init (run ended: {0:?})")]
    KrrNoInitLine(RunEnd),
    #[error("cannot start {qemu}: {source}")]
    QemuSpawn {
        qemu: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU printed no line from /init within {0:?}; last output: {1}")]
    QemuNoInitLine(Duration, String),
    #[error("{0}")]
    Workload(String),
}

/// Boots with krr (software CPU), then with QEMU TCG, and compares.
pub fn boot_vs_qemu(cfg: &BootBenchConfig) -> Result<BootBench, BenchError> {
    let mut mc = MachineConfig::new(
        cfg.kernel.clone(),
        Some(cfg.initrd.clone()),
        cfg.cmdline.clone(),
    );
    mc.vcpus = cfg.vcpus;
    mc.mem_bytes = cfg.mem_bytes;
    let mut m = Machine::new(mc, Backend::Tcg)?;
    let r = m.run();
    let krr_wall = r
        .wall_seconds_to_first_init_line
        .ok_or_else(|| BenchError::KrrNoInitLine(r.end.clone()))?;
    let krr_instr = r.instructions_to_init;
    let krr_mips = r.mips;
    drop(m);

    let args = qemu_args(
        &cfg.qemu_machine,
        &cfg.kernel,
        &cfg.initrd,
        &cfg.cmdline,
        cfg.vcpus,
        cfg.mem_bytes,
        QemuClock::Host,
    );
    let qemu_command = format!("{} {}", cfg.qemu.display(), args.join(" "));
    let mut qemu_wall = None;
    let out = run_qemu(&cfg.qemu, &args, cfg.timeout, |out, t| {
        if first_line_after(out, INIT_MARKER) {
            qemu_wall = Some(t);
        }
        qemu_wall.is_some()
    })?;
    let qemu_wall = qemu_wall.ok_or_else(|| BenchError::QemuNoInitLine(cfg.timeout, tail(&out)))?;
    Ok(BootBench {
        vcpus: cfg.vcpus,
        krr_wall_seconds: krr_wall,
        krr_instructions_to_init: krr_instr,
        krr_mips,
        krr_end: r.end,
        qemu_wall_seconds: qemu_wall,
        ratio: krr_wall / qemu_wall,
        qemu_command,
    })
}

/// How QEMU keeps its guest's time in a comparison run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QemuClock {
    /// Plain TCG: the guest's clock is the host's, so a guest that waits
    /// on time (timers, time slices, benchmarks that sample the clock)
    /// does other work than on the engine.
    Host,
    /// `-icount shift=0,sleep=off`: one nanosecond of guest time per
    /// instruction, as on the engine's software CPU, so both guests see the
    /// same clock and do the same work.
    Instructions,
}

/// QEMU's arguments for the project's kernel and initramfs (console on
/// stdout, no reboot, no display).
fn qemu_args(
    machine: &str,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    vcpus: usize,
    mem_bytes: u64,
    clock: QemuClock,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        "-M".into(),
        machine.into(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-smp".into(),
        vcpus.to_string(),
        "-m".into(),
        format!("{}M", mem_bytes >> 20),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        cmdline.into(),
    ];
    if clock == QemuClock::Instructions {
        args.extend(["-icount".into(), "shift=0,sleep=off".into()]);
    }
    args
}

/// Runs QEMU and hands its console output so far, with the seconds since
/// its start, to `watch` at every read, until `watch` says done, QEMU
/// ends or `timeout` passes; QEMU is killed then either way. Returns the
/// console output.
fn run_qemu(
    qemu: &Path,
    args: &[String],
    timeout: Duration,
    mut watch: impl FnMut(&[u8], f64) -> bool,
) -> Result<Vec<u8>, BenchError> {
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| BenchError::QemuSpawn {
            qemu: qemu.to_path_buf(),
            source,
        })?;
    // A reader thread forwards QEMU's console output, so that a guest that
    // prints nothing cannot block the timeout.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    while let Some(left) = timeout.checked_sub(start.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(chunk) => {
                out.extend_from_slice(&chunk);
                if watch(&out, start.elapsed().as_secs_f64()) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(rx);
    let _ = reader.join();
    Ok(out)
}

/// The last three lines of a console output, for messages.
fn tail(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    text.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
}

/// A guest command on the project's kernel and initramfs: what the
/// workload and record benchmarks run.
#[derive(Debug, Clone)]
pub struct GuestCommand {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line without `krr.run=`.
    pub cmdline: String,
    /// The guest command (`krr.run=`), e.g. "syscall-loop 20000".
    pub workload: String,
    pub vcpus: usize,
    pub mem_bytes: u64,
}

impl GuestCommand {
    /// The kernel command line with the command as `krr.run=`.
    fn full_cmdline(&self) -> String {
        format!("{} krr.run=\"{}\"", self.cmdline, self.workload)
    }

    fn machine_config(&self) -> MachineConfig {
        let mut m = MachineConfig::new(
            self.kernel.clone(),
            Some(self.initrd.clone()),
            self.full_cmdline(),
        );
        m.vcpus = self.vcpus;
        m.mem_bytes = self.mem_bytes;
        m
    }
}

/// The workload benchmark: a guest command run to its end on the software
/// CPU and on QEMU TCG (both clocks).
#[derive(Debug, Clone)]
pub struct WorkloadBenchConfig {
    pub guest: GuestCommand,
    pub qemu: PathBuf,
    pub qemu_machine: String,
    /// Give up on any one run after this long.
    pub timeout: Duration,
}

/// Wall seconds of one run: from its start to the `KRR-END` line, and
/// from the kernel starting /init to that line (the command and /init's
/// own work, without the boot).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct WorkloadTimes {
    pub whole_seconds: f64,
    pub from_init_seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadBench {
    pub workload: String,
    pub vcpus: usize,
    pub krr: WorkloadTimes,
    /// Guest instructions of the krr run (all vCPUs), and its guest
    /// seconds of the command (`KRR-START` to `KRR-END`).
    pub krr_instructions: u64,
    pub krr_virtual_seconds_of_command: Option<f64>,
    /// QEMU TCG on the host's clock.
    pub qemu: WorkloadTimes,
    /// QEMU TCG on the engine's clock (`-icount shift=0,sleep=off`); one
    /// vCPU only: with `-smp 2` QEMU's guest did not reach /init in ten
    /// minutes.
    pub qemu_same_clock: Option<WorkloadTimes>,
    /// krr / QEMU, whole runs (target: at most 1.2).
    pub ratio: f64,
    /// krr / QEMU from /init on.
    pub ratio_from_init: f64,
    /// krr / QEMU on the same clock from /init on (QEMU's boot on that
    /// clock is slow for reasons of its own: about 10 s here).
    pub ratio_same_clock_from_init: Option<f64>,
    pub qemu_command: String,
    pub qemu_same_clock_command: Option<String>,
}

/// The seconds at which QEMU's console completed the "Run /init" line and
/// the `KRR-END status=0` line; an error naming what went wrong otherwise.
fn qemu_workload_times(
    cfg: &WorkloadBenchConfig,
    args: &[String],
) -> Result<WorkloadTimes, BenchError> {
    let (mut init, mut end) = (None, None);
    let out = run_qemu(&cfg.qemu, args, cfg.timeout, |out, t| {
        let text = String::from_utf8_lossy(out);
        if init.is_none() && parse_marker(&text, INIT_MARKER).is_some() {
            init = Some(t);
        }
        if parse_marker(&text, END_MARKER).is_some() {
            end = Some(t);
        }
        end.is_some()
    })?;
    let workload = &cfg.guest.workload;
    match (init, end, end_status(&out)) {
        (Some(init), Some(end), Some(0)) => Ok(WorkloadTimes {
            whole_seconds: end,
            from_init_seconds: end - init,
        }),
        (_, Some(_), status) => Err(BenchError::Workload(format!(
            "`{workload}` on QEMU ended with status {}; last output: {}",
            status.map_or("?".to_string(), |s| s.to_string()),
            tail(&out)
        ))),
        _ => Err(BenchError::Workload(format!(
            "`{workload}` on QEMU printed no `{END_MARKER}` line within {:?}; last output: {}",
            cfg.timeout,
            tail(&out)
        ))),
    }
}

/// The status of the first complete `KRR-END status=N` line.
fn end_status(out: &[u8]) -> Option<i32> {
    parse_marker(&String::from_utf8_lossy(out), END_MARKER)?
        .trim()
        .parse()
        .ok()
}

/// Runs the workload on the software CPU, then on QEMU TCG with the
/// host's clock, then (one vCPU) with the engine's clock, and compares.
pub fn workload_vs_qemu(cfg: &WorkloadBenchConfig) -> Result<WorkloadBench, BenchError> {
    let g = &cfg.guest;
    let r = Machine::new(g.machine_config(), Backend::Tcg)?.run();
    // Ended by the command with status 0 (the error says how otherwise).
    workload_window(&r, "krr")?;
    let (Some(init), Some(end)) = (r.wall_seconds_to_init, r.wall_seconds_to_end_marker) else {
        return Err(BenchError::Workload(format!(
            "the krr run of `{}` lacks the /init or the `{END_MARKER}` line",
            g.workload
        )));
    };
    let krr = WorkloadTimes {
        whole_seconds: end,
        from_init_seconds: end - init,
    };
    let args_of = |clock| {
        qemu_args(
            &cfg.qemu_machine,
            &g.kernel,
            &g.initrd,
            &g.full_cmdline(),
            g.vcpus,
            g.mem_bytes,
            clock,
        )
    };
    let (host_args, same_args) = (args_of(QemuClock::Host), args_of(QemuClock::Instructions));
    let qemu = qemu_workload_times(cfg, &host_args)?;
    let qemu_same_clock = if g.vcpus == 1 {
        Some(qemu_workload_times(cfg, &same_args)?)
    } else {
        None
    };
    let command = |args: &[String]| format!("{} {}", cfg.qemu.display(), args.join(" "));
    Ok(WorkloadBench {
        workload: g.workload.clone(),
        vcpus: g.vcpus,
        krr,
        krr_instructions: r.instructions,
        krr_virtual_seconds_of_command: r.virtual_seconds_of_command,
        qemu,
        qemu_same_clock,
        ratio: krr.whole_seconds / qemu.whole_seconds,
        ratio_from_init: krr.from_init_seconds / qemu.from_init_seconds,
        ratio_same_clock_from_init: qemu_same_clock
            .map(|q| krr.from_init_seconds / q.from_init_seconds),
        qemu_command: command(&host_args),
        qemu_same_clock_command: qemu_same_clock.map(|_| command(&same_args)),
    })
}

/// Recording benchmark: the same workload on the same backend and kernel,
/// run plainly and recorded, side by side.
#[derive(Debug, Clone)]
pub struct RecordBenchConfig {
    /// Its kernel is a `-krr` one (the agent records only when the ring
    /// is announced).
    pub guest: GuestCommand,
    /// Where the recording goes (a scratch directory; it is deleted after
    /// its statistics are read).
    pub recordings: PathBuf,
    /// Run the recorded run before the plain one.
    pub recorded_first: bool,
}

/// One plain run and one recorded run of a workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordBench {
    pub workload: String,
    pub recorded_first: bool,
    /// Wall seconds from the kernel starting /init to the end of the run,
    /// without recording.
    pub plain_seconds: f64,
    /// The same window, recorded (the recording starts at that point, so
    /// its start snapshot is inside the window).
    pub recorded_seconds: f64,
    /// recorded / plain (target on the software CPU: at most 1.10).
    pub ratio: f64,
    /// Of `recorded_seconds`, the start snapshot with the guest stopped
    /// (RAM pages copied, vCPU and device state written): a one-time cost
    /// per recording.
    pub snapshot_seconds: f64,
    /// Seconds the memory image took to compress and sync on a background
    /// thread while the guest ran on.
    pub snapshot_write_seconds: f64,
    /// (recorded - snapshot) / plain: the cost of recording while it runs.
    pub ratio_without_snapshot: f64,
    pub plain_instructions: u64,
    /// More than plain: the agent's own code runs in the guest.
    pub recorded_instructions: u64,
    /// Guest instructions retired when the recording started (the same
    /// point of the plain run: execution up to there is identical).
    pub window_start_instructions: u64,
    /// Guest instructions over the window, recorded / plain: what the
    /// agent adds in the guest. Exact and repeatable, unlike wall time.
    pub instruction_ratio: f64,
    pub events: u64,
    /// Bytes of the event log on disk (zstd chunks with headers).
    pub log_bytes: u64,
    pub bytes_per_event: f64,
    /// Log bytes per second of recorded wall time.
    pub log_bytes_per_second: f64,
    /// Events per class, as `krr log stats` counts them.
    pub classes: Vec<(String, u64)>,
    /// Log bytes per second of the recording's guest (virtual) time, the
    /// measure KRR quotes (about 160 KB/s); `None` when that time is
    /// unknown or zero.
    pub log_bytes_per_guest_second: Option<f64>,
    /// Wall seconds to replay the recording's kernel alone (from its
    /// snapshot to its end).
    pub replay_seconds: f64,
    /// The replay's peak resident memory (the process's, from opening the
    /// recording to the replay's end), and the guest's RAM for comparison.
    pub replay_peak_rss_bytes: Option<u64>,
    pub guest_mem_bytes: u64,
    /// How the replay ended (`matched` unless something is wrong).
    pub replay_end: String,
}

/// Wall seconds of a run from /init to its end; an error unless it ended
/// with the end marker and status 0.
fn workload_window(report: &crate::machine::RunReport, what: &str) -> Result<f64, BenchError> {
    if report.end != (RunEnd::EndMarker { status: 0 }) {
        return Err(BenchError::Workload(format!(
            "{what} run ended with {:?}; last console lines: {:?}",
            report.end, report.last_console_lines
        )));
    }
    let to_init = report
        .wall_seconds_to_init
        .ok_or_else(|| BenchError::Workload(format!("{what} run never started /init")))?;
    Ok(report.wall_seconds - to_init)
}

/// Runs `cfg.guest`'s workload plainly and then recorded (from /init on).
pub fn record_vs_plain(cfg: &RecordBenchConfig) -> Result<RecordBench, BenchError> {
    use crate::record::recorder::{RecordConfig, StartTrigger};
    use crate::record::session::RecordingSession;
    let run_plain = || -> Result<_, BenchError> {
        let plain = Machine::new(cfg.guest.machine_config(), Backend::Tcg)?.run();
        let seconds = workload_window(&plain, "plain")?;
        Ok((plain, seconds))
    };
    let run_recorded = || -> Result<_, BenchError> {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!(
            "bench-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut rc = RecordConfig::new(name, cfg.recordings.clone());
        rc.start = StartTrigger::Marker(INIT_MARKER.to_string());
        let mut machine = RecordingSession::machine(cfg.guest.machine_config(), rc, Backend::Tcg)?;
        let recorded = machine.run();
        let seconds = workload_window(&recorded, "recorded")?;
        let rec = RecordingSession::take(&mut machine)
            .first()
            .cloned()
            .ok_or_else(|| BenchError::Workload("the recorded run made no recording".into()))?;
        Ok((recorded, seconds, rec))
    };
    // Which run goes first alternates between calls (`recorded_first`), so
    // that what the second run of a process meets (a warm allocator, the
    // first machine's freed memory) does not always fall on one side.
    let ((plain, plain_seconds), (recorded, recorded_seconds, rec)) = if cfg.recorded_first {
        let r = run_recorded()?;
        (run_plain()?, r)
    } else {
        let p = run_plain()?;
        (p, run_recorded()?)
    };
    if !rec.ok {
        return Err(BenchError::Workload(format!(
            "the recording {} is not complete: {}",
            rec.dir.display(),
            rec.reason
        )));
    }
    let window_start: u64 = crate::record::recording::load_cpus(&rec.dir)
        .map_err(|e| BenchError::Workload(format!("the snapshot of {}: {e}", rec.dir.display())))?
        .iter()
        .map(|c| c.icount)
        .sum();
    let stats = crate::record::recording::stats(&rec.dir)
        .map_err(|e| BenchError::Workload(format!("statistics of {}: {e}", rec.dir.display())))?;
    // The plain and recorded machines are gone; the peak starts again here.
    let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let replay = crate::replay::Replayer::open(&rec.dir)
        .and_then(|mut r| r.run(&crate::replay::ReplayOptions::default()))
        .map_err(|e| BenchError::Workload(format!("replay of {}: {e}", rec.dir.display())))?;
    let replay_peak_rss_bytes = peak_reset.then(peak_rss_bytes).flatten();
    let replay_end = match &replay.end {
        crate::replay::ReplayEnd::Matched => "matched".to_string(),
        other => serde_json::to_string(other).unwrap_or_default(),
    };
    let _ = std::fs::remove_dir_all(&rec.dir);
    Ok(RecordBench {
        workload: cfg.guest.workload.clone(),
        recorded_first: cfg.recorded_first,
        plain_seconds,
        recorded_seconds,
        ratio: recorded_seconds / plain_seconds.max(1e-9),
        snapshot_seconds: rec.snapshot_seconds,
        snapshot_write_seconds: rec.snapshot_write_seconds,
        ratio_without_snapshot: (recorded_seconds - rec.snapshot_seconds) / plain_seconds.max(1e-9),
        plain_instructions: plain.instructions,
        recorded_instructions: recorded.instructions,
        window_start_instructions: window_start,
        instruction_ratio: recorded.instructions.saturating_sub(window_start) as f64
            / plain.instructions.saturating_sub(window_start).max(1) as f64,
        events: stats.events,
        log_bytes: stats.file_bytes,
        bytes_per_event: stats.bytes_per_event,
        log_bytes_per_second: stats.file_bytes as f64 / recorded_seconds.max(1e-9),
        classes: stats
            .classes
            .iter()
            .filter(|c| c.count > 0)
            .map(|c| (c.class.clone(), c.count))
            .collect(),
        // Over the recording's own guest time: the log also holds /init's
        // work before and after the command.
        log_bytes_per_guest_second: stats
            .virtual_ns
            .filter(|&ns| ns > 0)
            .map(|ns| stats.file_bytes as f64 / (ns as f64 / 1e9)),
        replay_seconds: replay.wall_seconds,
        replay_peak_rss_bytes,
        guest_mem_bytes: cfg.guest.mem_bytes,
        replay_end,
    })
}

/// This process's peak resident memory since it started or since the
/// peak was last reset (`VmHWM` of /proc/self/status).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_line_counts_only_once_complete_and_gives_its_status() {
        assert_eq!(end_status(b"KRR-START\r\nKRR-END status=0"), None);
        let out = b"KRR-START\r\nKRR-END status=3\r\n[ 1.0] reboot\r\n";
        assert_eq!(end_status(out), Some(3));
        assert_eq!(end_status(b"KRR-END status=x\r\n"), None);
    }

    #[test]
    fn qemu_runs_on_the_engines_clock_only_when_asked() {
        let args = |clock| {
            qemu_args(
                "microvm,acpi=off",
                Path::new("bzImage"),
                Path::new("initrd"),
                "console=ttyS0",
                2,
                512 << 20,
                clock,
            )
        };
        let host = args(QemuClock::Host);
        assert!(!host.iter().any(|a| a == "-icount"));
        assert!(host.windows(2).any(|w| w == ["-smp", "2"]));
        assert!(host.windows(2).any(|w| w == ["-m", "512M"]));
        let same = args(QemuClock::Instructions);
        assert!(same
            .windows(2)
            .any(|w| w == ["-icount", "shift=0,sleep=off"]));
    }
}
