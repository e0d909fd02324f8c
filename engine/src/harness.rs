// SPDX-License-Identifier: GPL-2.0-or-later
//! One step of the harness's benchmarks and validations, as `krr`
//! subcommands.
//!
//! `cargo xtask bench record|replay` and `cargo xtask validate-replay` do not
//! link the engine (its software CPU needs host packages that `cargo xtask`
//! installs first); they run `krr bench-record` and `krr validate-replay-one`
//! once per step and read the JSON object each prints on stdout. Loops,
//! medians, tables and results files stay in xtask.

use crate::bench::{record_vs_plain, RecordBenchConfig};
use crate::machine::{Backend, MachineConfig, RunEnd, INIT_MARKER};
use crate::record::recorder::{RecordConfig, StartTrigger};
use crate::record::session::RecordingSession;
use crate::replay::{ReplayEnd, ReplayOptions, Replayer};
use anyhow::{bail, Context};
use clap::Parser;
use std::path::{Path, PathBuf};

/// The project's test command line (no `krr.run=`).
pub const TEST_CMDLINE: &str = "console=ttyS0 nokaslr noapic nolapic acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 rdinit=/init";

/// The command line of a root-filesystem guest (no `krr.run=`).
pub const ROOTFS_CMDLINE: &str = "console=ttyS0 nokaslr noapic nolapic acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 root=/dev/vda rw init=/init";

/// `cmdline` with the local APICs and I/O APIC on (without `noapic
/// nolapic`): what a guest with several vCPUs needs (the kernel disables
/// SMP without them), and what QEMU's microvm machine offers.
pub fn with_apics(cmdline: &str) -> String {
    cmdline.replace(" noapic nolapic", "")
}

/// A byte count with an optional K, M or G suffix (`512M`, `1G`), for
/// command-line sizes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n = num
        .parse::<u64>()
        .map_err(|_| format!("{s:?} is not a size (expected e.g. 512M, 1G or a byte count)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is more bytes than 64 bits count"))
}

/// `krr bench-record`: one plain and one recorded run of a workload on the
/// software CPU, then a replay of the recording.
#[derive(Debug, Parser)]
pub struct BenchRecordArgs {
    /// A `-krr` kernel (bzImage with the guest agent).
    #[arg(long)]
    pub kernel: PathBuf,
    /// initramfs (cpio, optionally compressed).
    #[arg(long)]
    pub initrd: PathBuf,
    /// Kernel command line, without `krr.run=`.
    #[arg(long, default_value = TEST_CMDLINE)]
    pub append: String,
    /// The guest command (`krr.run=`), e.g. "syscall-loop 20000".
    #[arg(long)]
    pub workload: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// Guest memory, e.g. 512M or 1G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub mem: u64,
    /// Where the recording goes (it is deleted once measured); default
    /// $KRR_RECORDINGS.
    #[arg(long)]
    pub recordings: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `krr bench-record`.
pub fn bench_record(a: BenchRecordArgs) -> anyhow::Result<()> {
    if a.vcpus == 0 {
        bail!("--vcpus must be at least 1");
    }
    let cfg = RecordBenchConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.append,
        workload: a.workload,
        vcpus: a.vcpus,
        mem_bytes: a.mem,
        recordings: a
            .recordings
            .unwrap_or_else(crate::record::recording::recordings_dir),
    };
    let r = record_vs_plain(&cfg).with_context(|| format!("workload `{}`", cfg.workload))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "`{}`, {} vCPU(s), from /init to the end:",
            r.workload, a.vcpus
        );
        println!("  plain      {:8.3} s", r.plain_seconds);
        println!(
            "  recorded   {:8.3} s  (ratio {:.3}; start snapshot {:.3} s, ratio without it {:.3})",
            r.recorded_seconds, r.ratio, r.snapshot_seconds, r.ratio_without_snapshot
        );
        println!(
            "  log        {} events, {} bytes ({:.1} bytes/event, {:.2} MB/s)",
            r.events,
            r.log_bytes,
            r.bytes_per_event,
            r.log_bytes_per_second / 1e6
        );
        println!(
            "  replay     {:8.3} s  ({})",
            r.replay_seconds, r.replay_end
        );
    }
    Ok(())
}

/// `krr validate-replay-one`: records one stress-ng stressor (from the
/// start of /init) on the software CPU and replays the kernel alone.
#[derive(Debug, Parser)]
pub struct ValidateReplayOneArgs {
    /// A `-krr` kernel (bzImage with the guest agent).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Root filesystem with stress-ng (the `rootfs-workloads` image); it is
    /// never modified.
    #[arg(long)]
    pub rootfs: PathBuf,
    /// stress-ng stressor name, e.g. `fork`.
    #[arg(long)]
    pub stressor: String,
    /// Guest seconds the stressor runs (stress-ng --timeout).
    #[arg(long, default_value_t = 1)]
    pub seconds: u32,
    /// vCPUs of the guest; stress-ng runs one instance of the stressor
    /// per vCPU.
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// A checkpoint (registers and memory hash) every N guest instructions
    /// of the recording, all compared in replay, so a divergence is caught
    /// near where it starts (0: none).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Where the recording goes (it is deleted after the replay); default
    /// $KRR_RECORDINGS.
    #[arg(long)]
    pub recordings: Option<PathBuf>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one stressor.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StressorResult {
    pub stressor: String,
    /// passed, diverged, unsupported, failed
    pub outcome: String,
    pub detail: String,
    pub events: u64,
    pub kernel_entries: u64,
    pub record_seconds: f64,
    pub replay_seconds: f64,
    /// Guest (virtual) seconds the stress-ng command took while recorded.
    #[serde(default)]
    pub virtual_seconds: Option<f64>,
}

/// Whether `name` can be a stress-ng stressor (it goes into a guest shell
/// command).
pub fn is_stressor_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Runs `krr validate-replay-one`; the outcome (passed, diverged,
/// unsupported, failed) is in the result, not in the exit status.
pub fn validate_replay_one(a: ValidateReplayOneArgs) -> anyhow::Result<()> {
    if a.seconds == 0 {
        // stress-ng reads a timeout of 0 as "run forever".
        bail!("--seconds 0: expected at least 1");
    }
    if !is_stressor_name(&a.stressor) {
        bail!(
            "--stressor {:?} is not a stress-ng stressor name",
            a.stressor
        );
    }
    let recordings = a
        .recordings
        .unwrap_or_else(crate::record::recording::recordings_dir);
    if !(1..=8).contains(&a.vcpus) {
        bail!("--vcpus {}: expected 1 to 8", a.vcpus);
    }
    let r = validate_stressor(
        &a.kernel,
        &a.rootfs,
        &recordings,
        &a.stressor,
        StressorRun {
            seconds: a.seconds,
            vcpus: a.vcpus,
            checkpoint_every: a.checkpoint_every,
        },
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: {} ({}); {} events, {} kernel entries, record {:.1} s, replay {:.1} s, command {} virtual s",
            r.stressor,
            r.outcome,
            r.detail,
            r.events,
            r.kernel_entries,
            r.record_seconds,
            r.replay_seconds,
            r.virtual_seconds
                .map_or("?".to_string(), |v| format!("{v:.3}"))
        );
    }
    Ok(())
}

/// How one stressor is run: guest seconds, vCPUs, and the recording's
/// checkpoint interval in guest instructions (0: none).
#[derive(Debug, Clone, Copy)]
pub struct StressorRun {
    pub seconds: u32,
    pub vcpus: usize,
    pub checkpoint_every: u64,
}

/// Records and replays one stressor; the recording (under `recordings`) is
/// deleted afterwards. Every checkpoint the recording holds is compared.
pub fn validate_stressor(
    kernel: &Path,
    rootfs: &Path,
    recordings: &Path,
    name: &str,
    run: StressorRun,
) -> StressorResult {
    let StressorRun {
        seconds,
        vcpus,
        checkpoint_every,
    } = run;
    let mut r = StressorResult {
        stressor: name.to_string(),
        outcome: "failed".into(),
        detail: String::new(),
        events: 0,
        kernel_entries: 0,
        record_seconds: 0.0,
        replay_seconds: 0.0,
        virtual_seconds: None,
    };
    // --oom-avoid keeps stress-ng from sizing memory stressors to all of
    // the guest's RAM; exit status 3 is stress-ng's "not supported here".
    // The budget stops a stressor that ignores its timeout (guest time:
    // 1 ns per instruction).
    let cmd = format!(
        "stress-ng --{name} {vcpus} --timeout {seconds}s --oom-avoid --quiet; echo stress-ng-status=$?"
    );
    let mut cfg = MachineConfig::new(
        kernel.to_path_buf(),
        None,
        // Several vCPUs need the APICs (SMP is disabled without them).
        match vcpus {
            1 => format!("{ROOTFS_CMDLINE} krr.run=\"{cmd}\""),
            _ => format!("{} krr.run=\"{cmd}\"", with_apics(ROOTFS_CMDLINE)),
        },
    );
    cfg.disk = Some(rootfs.to_path_buf());
    cfg.vcpus = vcpus;
    cfg.mem_bytes = 1 << 30;
    cfg.max_instructions = (u64::from(seconds) + 10) * 1_000_000_000 * vcpus as u64;
    let mut rc = RecordConfig::new(name.to_string(), recordings.to_path_buf());
    rc.start = StartTrigger::Marker(INIT_MARKER.to_string());
    rc.checkpoint_every = checkpoint_every;
    let mut machine = match RecordingSession::machine(cfg, rc, Backend::Tcg) {
        Ok(m) => m,
        Err(e) => {
            r.detail = format!("machine: {e}");
            return r;
        }
    };
    let report = machine.run();
    r.record_seconds = report.wall_seconds;
    r.virtual_seconds = report.virtual_seconds_of_command;
    let console = String::from_utf8_lossy(&report.console).to_string();
    if report.end != (RunEnd::EndMarker { status: 0 }) {
        r.detail = format!("recorded run ended with {:?}", report.end);
        return r;
    }
    let status = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("stress-ng-status="))
        .next_back()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match status {
        Some(0) => {}
        Some(3) => {
            r.outcome = "unsupported".into();
            r.detail = "stress-ng: not supported by this kernel/system (status 3)".into();
            return r;
        }
        other => {
            r.detail = format!("stress-ng exit status {other:?} while recording");
            return r;
        }
    }
    let Some(rec) = RecordingSession::take(&mut machine).first().cloned() else {
        r.detail = "no recording was made".into();
        return r;
    };
    let replay = Replayer::open(&rec.dir).and_then(|mut p| p.run(&ReplayOptions::default()));
    let _ = std::fs::remove_dir_all(&rec.dir);
    match replay {
        Err(e) => r.detail = format!("replay could not run: {e}"),
        Ok(rep) => {
            r.events = rep.events;
            r.kernel_entries = rep.kernel_entries;
            r.replay_seconds = rep.wall_seconds;
            match rep.end {
                ReplayEnd::Matched => {
                    r.outcome = "passed".into();
                    r.detail = format!(
                        "{} kernel instructions, {} checkpoint(s) compared",
                        rep.kernel_instructions, rep.checkpoints_verified
                    );
                }
                ReplayEnd::Diverged(d) | ReplayEnd::Stalled(d) => {
                    r.outcome = "diverged".into();
                    r.detail = format!("event #{} at {}: expected {}", d.event, d.rip, d.expected);
                }
                ReplayEnd::Unsupported { why } => {
                    r.outcome = "unsupported".into();
                    r.detail = format!("replay: {why}");
                }
                other => r.detail = format!("{other:?}"),
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_and_an_overflowing_one_is_an_error() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("3g"), Ok(3 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        let e = parse_size("99999999999G").unwrap_err();
        assert_eq!(e, "\"99999999999G\" is more bytes than 64 bits count");
        assert!(parse_size("12X").unwrap_err().contains("not a size"));
    }
}
