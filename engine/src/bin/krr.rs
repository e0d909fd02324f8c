// SPDX-License-Identifier: GPL-2.0-or-later
//! `krr`: run, record and replay a guest kernel.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use krr_engine::devices::serial::ConsoleSink;
use krr_engine::harness::parse_size;
use krr_engine::machine::{Backend, Machine, MachineConfig, RunEnd, RunReport};
use krr_engine::record::recorder::{RecordConfig, StartTrigger, StopTrigger};
use krr_engine::record::session::RecordingSession;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "krr",
    version,
    about = "Kernel record-replay engine",
    after_help = "Exit status of `krr run` and `krr record`: 0 the guest's command exited 0 (or the guest \
powered off); 1 krr failed (the message says why); 2 usage; 3 reset without an end marker; 4 kernel \
panic; 5 triple fault; 6 instruction budget spent; 7 backend error; 8 wall-time limit; 9 recording \
failed; 10 the guest's command exited non-zero (its status is printed, and `guest_status` in --json); \
11 (`krr record`) a recording is not replayable; 130 interrupted (Ctrl-C). `krr replay`: 0 matched, \
1 stopped early or the log ends first, 2 diverged or stalled, 3 unsupported."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BackendArg {
    /// Software CPU (unicorn/TCG): deterministic, exact instruction counts.
    Tcg,
    /// Hardware virtualization (/dev/kvm).
    Kvm,
    /// KVM when the host offers usable hardware virtualization, else tcg.
    Auto,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel and run it to its end; exits with the guest's status.
    Run(RunArgs),
    /// Run like `run` and record what enters the guest kernel (needs a
    /// `-krr` kernel with the guest agent) into a recording directory.
    Record(RecordArgs),
    /// Replay a recording's kernel alone on the software CPU, checking every
    /// event; exits 0 only when the whole recording matched.
    Replay(ReplayArgs),
    /// Inspect recordings: verify, stats, dump.
    Log {
        #[command(subcommand)]
        command: krr_engine::log_cli::LogCommand,
    },
    /// Boot benchmark: wall time to the first line of /init on the software
    /// CPU and on `qemu-system-x86_64 -accel tcg`, same kernel and initramfs.
    BenchBoot(BenchArgs),
    /// Workload benchmark: a guest command run to its end on the software
    /// CPU, on `qemu-system-x86_64 -accel tcg`, and on QEMU TCG with the
    /// engine's clock (`-icount shift=0,sleep=off`); same kernel, initramfs
    /// and command line.
    BenchWorkload(BenchWorkloadArgs),
    /// Recording benchmark, one run (software CPU): a workload plain, then
    /// recorded from /init on, then the recording replayed.
    BenchRecord(krr_engine::harness::BenchRecordArgs),
    /// Record one stress-ng stressor from /init on (software CPU) and replay
    /// the kernel alone: passed, diverged, unsupported or failed.
    ValidateReplayOne(krr_engine::harness::ValidateReplayOneArgs),
    /// The stressors a root filesystem's stress-ng offers, asked of it in
    /// a guest (software CPU, not recorded).
    StressNgStressors(krr_engine::harness::StressNgStressorsArgs),
    /// Which CPU backend `--backend` picks on this host, and why; with
    /// --json also what /dev/kvm is (`kvm.verdict`: hardware,
    /// software-hypervisor, absent) and how KVM would position asynchronous
    /// events (`kvm_async_events.mode`: pmu-counted, deterministic-points).
    Backend {
        #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
        backend: BackendArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Parser)]
struct BenchArgs {
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    /// Kernel command line. The guest must end by itself once /init has
    /// printed its first line (hence `krr.run=`): without a command the
    /// initramfs waits for a shell's input and the run lasts until the
    /// instruction budget.
    #[arg(
        long,
        default_value = "console=ttyS0 acpi=off tsc=reliable mitigations=off panic=-1 krr.run=\"echo hello\""
    )]
    append: String,
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    mem: u64,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU machine type (`pc` suits distribution kernels).
    #[arg(long, default_value = "microvm,acpi=off")]
    qemu_machine: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct BenchWorkloadArgs {
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: PathBuf,
    /// Kernel command line, without `krr.run=`.
    #[arg(
        long,
        default_value = "console=ttyS0 acpi=off tsc=reliable mitigations=off panic=-1"
    )]
    append: String,
    /// The guest command (`krr.run=`), e.g. "syscall-loop 20000".
    #[arg(long)]
    workload: String,
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    mem: u64,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU machine type (`pc` suits distribution kernels).
    #[arg(long, default_value = "microvm,acpi=off")]
    qemu_machine: String,
    /// Give up on any one run after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Parser)]
struct RunArgs {
    /// bzImage to boot.
    #[arg(long)]
    kernel: PathBuf,
    /// initramfs (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Disk image for the virtio-mmio block device (never modified).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Kernel command line (default: the project's with the APICs on, as on
    /// QEMU's microvm, booting the initramfs's /init, or with --disk and no
    /// --initrd the disk's).
    #[arg(long)]
    append: Option<String>,
    /// Chaos mode (software CPU): vary the vCPUs' turn lengths from this
    /// seed, so races find other interleavings; one seed gives one run.
    #[arg(long, value_name = "SEED")]
    chaos: Option<u64>,
    /// Kernel parameters added to the command line (the default one, or
    /// --append), e.g. `panic_on_warn=1 kasan.fault=panic`.
    #[arg(long, value_name = "PARAMS")]
    kernel_args: Option<String>,
    /// The command the guest's /init runs, added to the command line as
    /// `krr.run="CMD"` (no double quotes inside CMD).
    #[arg(long, value_name = "CMD")]
    run: Option<String>,
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Guest memory, e.g. 512M or 1G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    mem: u64,
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Stop after this many instructions (the no-progress budget).
    #[arg(long, default_value_t = 50_000_000_000)]
    max_instructions: u64,
    /// Stop after this many seconds of host time (KVM runs count no
    /// instructions, so `--max-instructions` does not stop them).
    #[arg(long)]
    max_seconds: Option<f64>,
    /// Print one JSON object on stdout; the console goes to stderr.
    #[arg(long)]
    json: bool,
    /// Do not stream the console to the terminal.
    #[arg(long)]
    quiet: bool,
}

#[derive(Parser)]
struct ReplayArgs {
    /// Recording: a name (a directory under $KRR_RECORDINGS) or a path
    /// with a `/` (`./NAME`, `/abs/dir`).
    name: String,
    /// Stop after this many events of the log.
    #[arg(long)]
    until_event: Option<u64>,
    /// Verify the recording's checkpoints (`krr record --checkpoint-every`:
    /// registers and the kernel's data+bss digest) at most once per N
    /// kernel instructions; without it, every checkpoint is verified.
    #[arg(long, value_name = "N")]
    verify_every: Option<u64>,
    /// Report the replay as stalled when it consumes no event of the log
    /// for this many wall seconds (default 300).
    #[arg(long, value_name = "SECONDS")]
    stall_seconds: Option<u64>,
    /// Note where the replayed kernel first executes this symbol (a bug
    /// with no crash must reach its function): `reached` in the report.
    #[arg(long, value_name = "SYMBOL")]
    reaches: Option<String>,
    /// Print one JSON object on stdout (the console is not echoed).
    #[arg(long)]
    json: bool,
    /// Do not echo the kernel's console output.
    #[arg(long)]
    quiet: bool,
    /// Write the replayed kernel's console output to FILE (with --json
    /// too), e.g. to parse its crash report: its last 8 MiB where it
    /// printed more (`console_dropped_bytes` in the report).
    #[arg(long, value_name = "FILE")]
    console: Option<PathBuf>,
    /// Debug the replay in gdb: wait for gdb's `target remote` on ADDR
    /// (`:PORT`, `HOST:PORT`, or a unix socket path) and replay under its
    /// control: breakpoints, stepping, reverse-stepi, reverse-continue.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["json", "until_event"])]
    gdb: Option<String>,
    /// With --gdb: replay to the recording's end before gdb connects, so
    /// that a crash can be debugged backwards from where it happened.
    #[arg(long, requires = "gdb")]
    at_end: bool,
    /// With --gdb: keep a snapshot of the replay every N kernel
    /// instructions (in memory, at most the guest's RAM in all), so that
    /// going backwards replays from the nearest one; 0: none.
    #[arg(long, value_name = "N", requires = "gdb", default_value_t = krr_gdb::DEFAULT_SNAPSHOT_EVERY)]
    snapshot_every: u64,
}

#[derive(Parser)]
struct RecordArgs {
    #[command(flatten)]
    machine: RunArgs,
    /// Recording name: the directory under $KRR_RECORDINGS (default
    /// results/recordings); a second recording in the same run is NAME-2.
    #[arg(long)]
    name: Option<String>,
    /// When to start: `boot`, `marker:TEXT` (console output), or `guest`
    /// (`echo start > /proc/krr_agent` in the guest).
    #[arg(long, default_value = "boot")]
    start: StartTrigger,
    /// When to stop: `end` (of the run), `marker:TEXT`, `guest`
    /// (`echo stop > /proc/krr_agent`), or `report` (a kernel report that
    /// does not panic, such as a lockdep splat, at the end of its call
    /// trace; the run ends there too).
    #[arg(long, default_value = "end")]
    stop: StopTrigger,
    /// The kernel's vmlinux, for the header's sha256 (and later replay's
    /// symbols).
    #[arg(long)]
    vmlinux: Option<PathBuf>,
    /// Size of the agent's ring, e.g. 8M.
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    ring_size: u64,
    /// Every N guest instructions, log a checkpoint at the next vCPU stop
    /// in the kernel: its registers and a sha256 of the kernel's data and
    /// bss (needs the System.map beside --vmlinux or --kernel); replay
    /// compares both there (0: none).
    #[arg(long, value_name = "N", default_value_t = 0)]
    checkpoint_every: u64,
}

fn pick_backend(arg: BackendArg) -> anyhow::Result<Backend> {
    let (backend, reason) = choose_backend(arg)?;
    if let Some(reason) = reason {
        eprintln!("krr: {reason}");
    }
    Ok(backend)
}

/// The backend `--backend` resolves to, with the reason for `kvm` and `auto`.
fn choose_backend(arg: BackendArg) -> anyhow::Result<(Backend, Option<String>)> {
    match arg {
        BackendArg::Tcg => Ok((Backend::Tcg, None)),
        // `kvm` is honoured wherever /dev/kvm works (on PVM too, with its
        // note); `auto` picks KVM only when it is hardware-backed.
        BackendArg::Kvm | BackendArg::Auto => {
            let requested = if arg == BackendArg::Kvm {
                "kvm"
            } else {
                "auto"
            };
            let choice = krr_engine::hypervisor::kvm::select_backend(requested)
                .map_err(|reason| anyhow::anyhow!(reason))?;
            Ok((choice.backend, Some(choice.reason)))
        }
    }
}

fn print_summary(r: &RunReport) {
    eprintln!();
    eprintln!(
        "krr: run ended: {:?} (exit status {})",
        r.end, r.exit_status
    );
    if let Some(status) = r.guest_status.filter(|s| *s != 0) {
        eprintln!("krr: the guest's command exited with status {status}");
    }
    if r.instructions == 0 && r.virtual_ns > 0 {
        eprintln!(
            "krr: instructions not counted (KVM); host-clock time {:.3} s, wall {:.3} s",
            r.virtual_ns as f64 / 1e9,
            r.wall_seconds
        );
    } else {
        eprintln!(
            "krr: {} instructions, virtual time {:.3} s, wall {:.3} s, {:.1} MIPS",
            r.instructions,
            r.virtual_ns as f64 / 1e9,
            r.wall_seconds,
            r.mips
        );
    }
    match (r.instructions_to_init, r.wall_seconds_to_init) {
        (Some(i), Some(w)) => eprintln!("krr: /init started after {i} instructions, {w:.3} s wall"),
        (None, Some(w)) => eprintln!("krr: /init started after {w:.3} s wall"),
        _ => {}
    }
    if let Some(s) = r.virtual_seconds_of_command {
        eprintln!("krr: krr.run command: {s:.3} virtual s (KRR-START to KRR-END)");
    }
    if let Some(w) = r.window {
        eprintln!(
            "krr: measured window: {} instructions, {:.3} virtual s, {:.3} s wall (KRR-WINDOW-BEGIN to KRR-WINDOW-END)",
            w.instructions, w.virtual_seconds, w.wall_seconds
        );
    }
    if r.console_dropped_bytes > 0 {
        eprintln!(
            "krr: console: {} bytes (SHA-256 {}); the run's report keeps the last {}, the first {} were dropped",
            r.console_bytes,
            r.console_sha256,
            r.console.len(),
            r.console_dropped_bytes
        );
    }
    let e = &r.exits;
    eprintln!(
        "krr: exits: hlt {} budget {} io-stop {} irq-injected {} pio {} mmio {} exceptions {} syscalls {} cpuid {} rdtsc {} hooked-blocks {}",
        e.hlt, e.budget, e.io_stops, e.interrupts_injected, e.pio, e.mmio, e.exceptions, e.syscalls, e.cpuid, e.rdtsc, e.hooked_blocks
    );
}

fn record(a: RecordArgs) -> anyhow::Result<i32> {
    let name = match a.name {
        Some(n) => {
            if n.is_empty() || n.contains('/') || n.starts_with('.') {
                bail!(
                    "--name {n:?}: expected a plain directory name (no '/', not starting with '.')"
                );
            }
            n
        }
        None => format!(
            "rec-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
    };
    let mut rc = RecordConfig::new(name, krr_engine::record::recording::recordings_dir());
    rc.start = a.start;
    rc.stop = a.stop;
    rc.vmlinux = a.vmlinux;
    rc.ring_size = a.ring_size;
    rc.checkpoint_every = a.checkpoint_every;
    let json = a.machine.json;
    let (report, recordings) = run_machine(&a.machine, Some(rc))?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "run": report, "recordings": recordings })
        );
    } else {
        print_summary(&report);
        if recordings.is_empty() {
            eprintln!("krr: no recording was made");
        }
        let failed = matches!(report.end, RunEnd::RecordingFailed { .. });
        for r in &recordings {
            eprintln!(
                "krr: recording {}: {} events, {} ({})",
                r.dir.display(),
                r.events,
                match (r.ok, failed) {
                    (true, _) => "complete",
                    // The log is a verifiable prefix up to the failure.
                    (false, true) => "NOT complete: `krr log verify` shows the prefix that replays",
                    (false, false) => "NOT replayable",
                },
                r.reason
            );
        }
    }
    if let RunEnd::RecordingFailed { reason } = &report.end {
        eprintln!("krr: recording failed: {reason}");
        return Ok(report.exit_status);
    }
    if recordings.iter().any(|r| !r.ok) {
        return Ok(krr_engine::machine::EXIT_NOT_REPLAYABLE);
    }
    Ok(report.exit_status)
}

fn replay(a: ReplayArgs) -> anyhow::Result<i32> {
    use krr_engine::replay::{ReplayEnd, ReplayOptions, Replayer};
    let dir = krr_engine::record::recording::find(&a.name)?;
    let mut replayer =
        Replayer::open(&dir).with_context(|| format!("cannot replay {}", dir.display()))?;
    let opts = ReplayOptions {
        until_event: a.until_event,
        echo_console: !a.json && !a.quiet,
        verify_every: a.verify_every,
        stall_seconds: a.stall_seconds,
        reaches: a.reaches.clone(),
        skip_checkpoints: false,
    };
    if let Some(listen) = &a.gdb {
        drop(replayer);
        return debug_replay(&dir, opts, listen, a.at_end, a.snapshot_every);
    }
    let report = replayer.run(&opts)?;
    if let Some(path) = &a.console {
        std::fs::write(path, &report.console)
            .with_context(|| format!("writing the replayed console to {}", path.display()))?;
        if report.console_dropped_bytes > 0 {
            eprintln!(
                "krr: {} holds the last {} bytes of the replayed console; the first {} were dropped",
                path.display(),
                report.console.len(),
                report.console_dropped_bytes
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(report.exit_code());
    }
    eprintln!();
    match &report.end {
        ReplayEnd::Matched => eprintln!(
            "krr: replay MATCHED: {} events, {} kernel entries, console identical ({} bytes)",
            report.events,
            report.kernel_entries,
            report.console_bytes
        ),
        ReplayEnd::StoppedAt { event } => {
            eprintln!("krr: replay stopped at event {event} as asked; everything matched so far")
        }
        ReplayEnd::Diverged(d) => eprint!("krr: replay {d}"),
        ReplayEnd::Stalled(d) => eprint!("krr: replay {}", d.report("STALLED")),
        ReplayEnd::LogEnded { events, why } => eprintln!(
            "krr: the log ends after {events} events, before the recording's end ({why}): NOT a complete replay"
        ),
        ReplayEnd::Unsupported { why } => eprintln!("krr: cannot replay this recording: {why}"),
    }
    eprintln!(
        "krr: replay {:.2} s wall for {} kernel instructions; user and shared memory written {} bytes ({} on pages not present, {} refused: user data off user pages, shared data off kernel pages)",
        report.wall_seconds,
        report.kernel_instructions,
        report.user_bytes_written,
        report.user_bytes_unmapped,
        report.user_bytes_refused
    );
    if report.checkpoints_verified + report.checkpoints_skipped > 0 {
        eprintln!(
            "krr: checkpoints verified: {} (kernel data+bss digest compared at {}), passed over: {}",
            report.checkpoints_verified,
            report.checkpoints_memory_verified,
            report.checkpoints_skipped
        );
    } else if a.verify_every.is_some() {
        eprintln!("krr: --verify-every: this recording has no checkpoints (record it with --checkpoint-every N)");
    }
    if let Some(rec) = report.recorded_wall_seconds {
        eprintln!(
            "krr: recording took {rec:.2} s wall: replay/record {:.2}",
            report.wall_seconds / rec.max(1e-9)
        );
    }
    Ok(report.exit_code())
}

/// `krr replay --gdb`: the replay under gdb's control.
fn debug_replay(
    dir: &std::path::Path,
    opts: krr_engine::replay::ReplayOptions,
    listen: &str,
    at_end: bool,
    snapshot_every: u64,
) -> anyhow::Result<i32> {
    use krr_gdb::{describe_end, Listen, ReplayTarget};
    let mut target = ReplayTarget::open(dir, opts)
        .with_context(|| format!("cannot replay {}", dir.display()))?;
    target.set_snapshot_interval(snapshot_every);
    if at_end {
        eprintln!(
            "krr: replaying {} to its end before gdb connects",
            dir.display()
        );
        let end = target.run_to_end()?;
        eprintln!("krr: {}", describe_end(end));
    }
    let header = target.replayer().header();
    let vmlinux = header
        .vmlinux
        .as_ref()
        .map(|v| v.path.clone())
        .filter(|p| std::path::Path::new(p).exists());
    let listen = Listen::parse(listen);
    let outcome = krr_gdb::serve(&mut target, &listen, |addr| {
        eprintln!("krr: waiting for gdb on {addr}; connect with:");
        match &vmlinux {
            Some(v) => eprintln!("  {}", krr_gdb::gdb_command_line(addr, Path::new(v))),
            None => eprintln!(
                "  gdb -ex '{}' -ex 'target remote {addr}' VMLINUX\n(the recording names no vmlinux that exists here: use the kernel build's vmlinux for symbols)",
                krr_gdb::REMOTE_TIMEOUT
            ),
        }
        if let Some(note) = vmlinux
            .as_ref()
            .and_then(|v| krr_gdb::missing_kernel_scripts(Path::new(v)))
        {
            eprintln!("krr: {note}");
        }
        eprintln!("krr: vCPUs are gdb threads; breakpoints, stepi, continue, reverse-stepi, reverse-continue and 'monitor help' work; writes to memory and registers are refused unless 'monitor allow-writes'");
    })?;
    let (snapshots, bytes) = target.snapshot_usage();
    eprintln!(
        "krr: {outcome} ({snapshots} snapshot(s) of the replay held, {:.1} MiB)",
        bytes as f64 / (1 << 20) as f64
    );
    Ok(0)
}

fn run(a: RunArgs) -> anyhow::Result<i32> {
    let json = a.json;
    let (report, _) = run_machine(&a, None)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(report.exit_status)
}

/// The kernel command line of a run: `--append` or the project's default
/// for the guest's root (initramfs, or the disk), plus `--run`.
fn command_line(a: &RunArgs) -> anyhow::Result<String> {
    use krr_engine::harness::{with_apics, ROOTFS_CMDLINE, TEST_CMDLINE};
    let mut base = match (&a.append, &a.initrd, &a.disk) {
        (Some(append), _, _) => append.clone(),
        (None, None, Some(_)) => with_apics(ROOTFS_CMDLINE),
        (None, _, _) => with_apics(TEST_CMDLINE),
    };
    if let Some(extra) = &a.kernel_args {
        if extra.contains('"') {
            bail!(
                "--kernel-args {extra:?}: no double quotes (use --append for a whole command line)"
            );
        }
        base = format!("{base} {}", extra.trim());
    }
    match &a.run {
        None => Ok(base),
        Some(cmd) if cmd.contains('"') => bail!(
            "--run {cmd:?}: the command may not contain double quotes (it goes into krr.run=\"...\" on the kernel command line); use single quotes"
        ),
        Some(cmd) => Ok(format!("{base} krr.run=\"{cmd}\"")),
    }
}

fn run_machine(
    a: &RunArgs,
    record: Option<RecordConfig>,
) -> anyhow::Result<(
    RunReport,
    Vec<krr_engine::record::recorder::FinishedRecording>,
)> {
    if a.vcpus == 0 {
        bail!("--vcpus must be at least 1");
    }
    let backend = pick_backend(a.backend)?;
    let mut cfg = MachineConfig::new(a.kernel.clone(), a.initrd.clone(), command_line(a)?);
    cfg.mem_bytes = a.mem;
    cfg.vcpus = a.vcpus;
    cfg.disk = a.disk.clone();
    cfg.max_instructions = a.max_instructions;
    if let Some(s) = a.max_seconds {
        if !(s.is_finite() && s > 0.0) {
            bail!("--max-seconds {s}: expected a positive number of seconds");
        }
        cfg.max_wall = Some(std::time::Duration::from_secs_f64(s));
    }
    if let Some(seed) = a.chaos {
        if backend != Backend::Tcg {
            bail!("--chaos {seed}: chaos mode varies the software CPU's turns; add --backend tcg");
        }
        cfg.chaos_seed = Some(seed);
    }
    cfg.console = match (a.quiet, a.json) {
        (true, _) => ConsoleSink::None,
        (false, true) => ConsoleSink::Stderr,
        (false, false) => ConsoleSink::Stdout,
    };
    // Ctrl-C ends the run at the next point where every vCPU is stopped,
    // so that a recording is finished, not cut.
    let interrupt = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupt.clone())
        .context("installing the SIGINT handler")?;
    cfg.interrupt = Some(interrupt);
    let mut machine = match record {
        Some(rc) => RecordingSession::machine(cfg, rc, backend),
        None => Machine::new(cfg, backend),
    }
    .with_context(|| format!("cannot start the machine for kernel {}", a.kernel.display()))?;
    let report = machine.run();
    let recordings = RecordingSession::take(&mut machine);
    Ok((report, recordings))
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let cfg = krr_engine::bench::BootBenchConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.append,
        vcpus: a.vcpus,
        mem_bytes: a.mem,
        qemu: a.qemu,
        qemu_machine: a.qemu_machine,
        timeout: std::time::Duration::from_secs(300),
    };
    let b = krr_engine::bench::boot_vs_qemu(&cfg)?;
    if a.json {
        println!("{}", serde_json::to_string(&b)?);
    } else {
        println!("boot to the first line of /init, {} vCPU(s):", b.vcpus);
        println!(
            "  krr tcg    {:8.3} s  ({} instructions, {:.1} MIPS over the whole run)",
            b.krr_wall_seconds,
            b.krr_instructions_to_init
                .map_or("?".to_string(), |i| i.to_string()),
            b.krr_mips
        );
        println!("  qemu tcg   {:8.3} s", b.qemu_wall_seconds);
        println!("  ratio      {:8.2} x (target: at most 2)", b.ratio);
    }
    Ok(())
}

fn bench_workload(a: BenchWorkloadArgs) -> anyhow::Result<()> {
    if !(1..=krr_engine::machine::MAX_VCPUS).contains(&a.vcpus) {
        bail!(
            "--vcpus {}: expected 1 to {}",
            a.vcpus,
            krr_engine::machine::MAX_VCPUS
        );
    }
    if a.workload.contains('"') {
        bail!(
            "--workload {:?}: no double quotes (it goes into the kernel command line inside them)",
            a.workload
        );
    }
    let cfg = krr_engine::bench::WorkloadBenchConfig {
        guest: krr_engine::bench::GuestCommand {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.append,
            workload: a.workload,
            vcpus: a.vcpus,
            mem_bytes: a.mem,
        },
        qemu: a.qemu,
        qemu_machine: a.qemu_machine,
        timeout: std::time::Duration::from_secs(a.timeout),
    };
    let b = krr_engine::bench::workload_vs_qemu(&cfg)
        .with_context(|| format!("workload `{}`", cfg.guest.workload))?;
    if a.json {
        println!("{}", serde_json::to_string(&b)?);
    } else {
        println!(
            "`{}`, {} vCPU(s), wall seconds to its end (from /init in brackets):",
            b.workload, b.vcpus
        );
        let line = |name: &str, t: &krr_engine::bench::WorkloadTimes| {
            println!(
                "  {name:<26} {:8.3} s  ({:.3} s)",
                t.whole_seconds, t.from_init_seconds
            )
        };
        line("krr tcg", &b.krr);
        line("qemu tcg", &b.qemu);
        if let Some(q) = &b.qemu_same_clock {
            line("qemu tcg, engine's clock", q);
        }
        println!(
            "  krr / QEMU TCG {:.2} x ({:.2} x from /init; target: at most 1.2)",
            b.ratio, b.ratio_from_init
        );
        match b.ratio_same_clock_from_init {
            Some(r) => println!("  krr / QEMU TCG on the engine's clock, from /init: {r:.2} x"),
            None => println!("  QEMU on the engine's clock: not run (one vCPU only)"),
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Like other command-line tools, die quietly when the reader of stdout
    // goes away (`krr log dump NAME | head`) instead of panicking in print!.
    // SAFETY: restoring the default disposition of SIGPIPE at startup,
    // before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            let code = run(a)?;
            std::process::exit(code);
        }
        Command::Record(a) => {
            let code = record(a)?;
            std::process::exit(code);
        }
        Command::Replay(a) => {
            let code = replay(a)?;
            std::process::exit(code);
        }
        Command::Log { command } => {
            let code = krr_engine::log_cli::run(command)?;
            std::process::exit(code);
        }
        Command::BenchBoot(a) => bench(a),
        Command::BenchWorkload(a) => bench_workload(a),
        Command::BenchRecord(a) => krr_engine::harness::bench_record(a),
        Command::ValidateReplayOne(a) => krr_engine::harness::validate_replay_one(a),
        Command::StressNgStressors(a) => krr_engine::harness::stress_ng_stressors(a),
        Command::Backend { backend, json } => {
            let (chosen, reason) = choose_backend(backend)?;
            let reason = reason.unwrap_or_else(|| "requested with --backend tcg".into());
            let name = chosen.name();
            if json {
                // The facts behind the choice, so that `cargo xtask doctor`
                // and `hw-acceptance` judge the host exactly as the engine does.
                let kvm = krr_engine::hypervisor::kvm::detect();
                let events = krr_engine::hypervisor::kvm::AsyncEventMode::detect();
                println!(
                    "{}",
                    serde_json::json!({
                        "backend": name,
                        "reason": reason,
                        "kvm": { "verdict": kvm.verdict(), "reason": kvm.reason() },
                        "kvm_async_events": { "mode": events.name(), "detail": events.describe() },
                    })
                );
            } else {
                println!("{name}: {reason}");
            }
            Ok(())
        }
    }
}
