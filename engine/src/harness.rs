// SPDX-License-Identifier: GPL-2.0-or-later
//! One step of the harness's benchmarks and validations, as `krr`
//! subcommands.
//!
//! `cargo xtask bench record|replay` and `cargo xtask validate-replay` do not
//! link the engine (its software CPU needs host packages that `cargo xtask`
//! installs first); they run `krr bench-record` and `krr validate-replay-one`
//! once per step and read the JSON object each prints on stdout. Loops,
//! medians, tables and results files stay in xtask.

use crate::bench::{record_vs_plain, GuestCommand, RecordBenchConfig};
use crate::machine::{Backend, Machine, MachineConfig, RunEnd, INIT_MARKER};
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
    /// Run the recorded run first, then the plain one.
    #[arg(long)]
    pub recorded_first: bool,
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
        guest: GuestCommand {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.append,
            workload: a.workload,
            vcpus: a.vcpus,
            mem_bytes: a.mem,
        },
        recordings: a
            .recordings
            .unwrap_or_else(crate::record::recording::recordings_dir),
        recorded_first: a.recorded_first,
    };
    let r = record_vs_plain(&cfg).with_context(|| format!("workload `{}`", cfg.guest.workload))?;
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
    /// Stop recording after this many seconds of host time and replay what
    /// was recorded (outcome `cut` when that replay matches); 0: no limit.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub max_record_seconds: u64,
    /// Where the recording goes (it is deleted after a replay that
    /// matches); default $KRR_RECORDINGS.
    #[arg(long)]
    pub recordings: Option<PathBuf>,
    /// Keep the recording whatever its replay's end (its path is printed).
    #[arg(long)]
    pub keep: bool,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one stressor.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StressorResult {
    pub stressor: String,
    /// passed, cut (the recording stopped at its wall-time limit and its
    /// replay matched), diverged, unsupported, failed
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
            max_record_seconds: a.max_record_seconds,
            keep: a.keep,
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

/// Printed before stress-ng starts, so that its own messages can be told
/// from the boot's.
const STRESS_NG_BEGIN: &str = "krr-stress-ng-begin";
/// stress-ng's exit status when a stressor cannot get what it needs here
/// (memory, a device, a privilege)...
const EXIT_NO_RESOURCE: i32 = 3;
/// ...and when the kernel or the build lacks what it exercises.
const EXIT_NOT_IMPLEMENTED: i32 = 4;

/// What stress-ng said about its run, for a table cell: its skip, error
/// and failure lines (the `stress-ng: info: [pid]` prefixes dropped), or
/// its last lines when none of them is such a line.
pub fn stress_ng_says(console: &str) -> String {
    let own = stress_ng_output(console);
    let lines: Vec<&str> = own
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .filter(|l| l.starts_with("stress-ng:"))
        .collect();
    const TELLING: [&str; 8] = [
        "skipping",
        "skipped",
        "not implemented",
        "not supported",
        "no resource",
        "fail",
        "error",
        "cannot",
    ];
    let telling: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            TELLING.iter().any(|w| l.contains(w))
        })
        .collect();
    let chosen = if telling.is_empty() {
        &lines[lines.len().saturating_sub(2)..]
    } else {
        &telling[..]
    };
    let mut text = chosen
        .iter()
        .map(|l| strip_stress_ng_prefix(l))
        .collect::<Vec<_>>()
        .join(" / ");
    if text.is_empty() {
        text = "stress-ng printed nothing".into();
    }
    if text.len() > 300 {
        let mut cut = 300;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// The console after the line printed before stress-ng started (the
/// kernel's command line, echoed at boot, holds the marker too: the last
/// one is the guest's).
fn stress_ng_output(console: &str) -> &str {
    console
        .rsplit_once(STRESS_NG_BEGIN)
        .map_or(console, |(_, after)| after)
}

/// Whether stress-ng said it skipped the stressor (it may still exit 0).
pub fn stress_ng_skipped(console: &str) -> bool {
    let own = stress_ng_output(console);
    own.lines().any(|l| {
        l.starts_with("stress-ng:")
            && (l.contains("will be skipped")
                || l.contains("No stress workers invoked")
                || l.split_once("skipped:")
                    .and_then(|(_, n)| n.trim().split(':').next()?.trim().parse::<u32>().ok())
                    .is_some_and(|n| n > 0))
    })
}

/// `stress-ng: info:  [123] text` -> `text`; `stress-ng: fail: [123] text`
/// -> `fail: text` (a level other than info is kept).
fn strip_stress_ng_prefix(line: &str) -> String {
    let rest = line.trim_start_matches("stress-ng:").trim_start();
    let (level, rest) = match rest.split_once(':') {
        Some((l, r)) if ["info", "debug", "warn", "fail", "error"].contains(&l) => {
            (Some(l), r.trim_start())
        }
        _ => (None, rest),
    };
    let text = match rest.strip_prefix('[') {
        Some(r) => r.split_once(']').map_or(rest, |(_, t)| t.trim_start()),
        None => rest,
    };
    match level {
        Some("info") | None => text.to_string(),
        Some(l) => format!("{l}: {text}"),
    }
}

/// Stressors that stress-ng skips when run as root ("must not run as
/// root", "need to be running without root privilege").
const NON_ROOT_STRESSORS: &[&str] = &["exec", "bad-ioctl", "spawn"];

/// What runs `stress-ng` for stressor `name` in the guest: for the ones
/// that refuse root, `setpriv` as user and group nobody, from the
/// world-writable /tmp (stress-ng works in its current directory).
fn stress_ng_user(name: &str) -> &'static str {
    if NON_ROOT_STRESSORS.contains(&name) {
        "cd /tmp && setpriv --reuid=65534 --regid=65534 --clear-groups "
    } else {
        ""
    }
}

/// `krr stress-ng-stressors`: the stressors the root filesystem's stress-ng
/// offers, asked of it in a guest (software CPU, not recorded).
#[derive(Debug, Parser)]
pub struct StressNgStressorsArgs {
    /// A kernel that boots the root filesystem (bzImage).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Root filesystem with stress-ng (the `rootfs-workloads` image).
    #[arg(long)]
    pub rootfs: PathBuf,
    /// Print one JSON object on stdout: `{"version", "stressors"}`.
    #[arg(long)]
    pub json: bool,
}

/// What the guest's stress-ng offers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestStressors {
    /// `stress-ng --version`'s line.
    pub version: String,
    pub stressors: Vec<String>,
}

const LIST_BEGIN: &str = "krr-stressors-begin";
const LIST_END: &str = "krr-stressors-end";

/// Boots `kernel` on `rootfs` and asks its stress-ng for its stressors.
pub fn guest_stressors(kernel: &Path, rootfs: &Path) -> anyhow::Result<GuestStressors> {
    let cmd =
        format!("stress-ng --version; echo {LIST_BEGIN}; stress-ng --stressors; echo {LIST_END}");
    let mut cfg = MachineConfig::new(
        kernel.to_path_buf(),
        None,
        format!("{ROOTFS_CMDLINE} krr.run=\"{cmd}\""),
    );
    cfg.disk = Some(rootfs.to_path_buf());
    cfg.mem_bytes = 1 << 30;
    cfg.max_instructions = 20_000_000_000;
    let report = Machine::new(cfg, Backend::Tcg)
        .with_context(|| format!("cannot start a guest with kernel {}", kernel.display()))?
        .run();
    let console = String::from_utf8_lossy(&report.console).to_string();
    if report.end != (RunEnd::EndMarker { status: 0 }) {
        bail!(
            "asking {}'s stress-ng for its stressors: the guest ended with {:?}",
            rootfs.display(),
            report.end
        );
    }
    parse_stressor_list(&console).with_context(|| {
        format!(
            "asking {}'s stress-ng for its stressors (console ends: {:?})",
            rootfs.display(),
            &console[console.len().saturating_sub(300)..]
        )
    })
}

/// The version line and the names between the list's markers.
fn parse_stressor_list(console: &str) -> anyhow::Result<GuestStressors> {
    let version = console
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .find(|l| l.starts_with("stress-ng, version") || l.starts_with("stress-ng version"))
        .context("stress-ng printed no version line")?
        .to_string();
    // The markers as whole lines: the kernel's command line, echoed at
    // boot, holds them too.
    let mut inside = false;
    let mut stressors: Vec<String> = Vec::new();
    for line in console.lines().map(|l| l.trim_end_matches('\r').trim()) {
        match line {
            LIST_BEGIN => inside = true,
            LIST_END if inside => {
                if stressors.is_empty() {
                    bail!("stress-ng --stressors listed none");
                }
                if let Some(bad) = stressors.iter().find(|s| !is_stressor_name(s.as_str())) {
                    bail!("stress-ng --stressors listed {bad:?}, not a stressor name");
                }
                return Ok(GuestStressors { version, stressors });
            }
            _ if inside => stressors.extend(line.split_whitespace().map(str::to_string)),
            _ => {}
        }
    }
    bail!("the list's end marker never came")
}

/// Runs `krr stress-ng-stressors`.
pub fn stress_ng_stressors(a: StressNgStressorsArgs) -> anyhow::Result<()> {
    let g = guest_stressors(&a.kernel, &a.rootfs)?;
    if a.json {
        println!("{}", serde_json::to_string(&g)?);
    } else {
        println!("{} ({} stressors)", g.version, g.stressors.len());
        println!("{}", g.stressors.join(" "));
    }
    Ok(())
}

/// How one stressor is run: guest seconds, vCPUs, the recording's
/// checkpoint interval in guest instructions (0: none) and its host-time
/// limit in seconds (0: none).
#[derive(Debug, Clone, Copy)]
pub struct StressorRun {
    pub seconds: u32,
    pub vcpus: usize,
    pub checkpoint_every: u64,
    pub max_record_seconds: u64,
    /// Keep the recording even when it replays (to profile its replay).
    pub keep: bool,
}

/// Records and replays one stressor; the recording (under `recordings`) is
/// deleted afterwards unless it does not replay or `keep` is set. Every checkpoint the recording holds is compared.
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
        max_record_seconds,
        keep,
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
    // the guest's RAM. --pathological lets the stressors that "may hang or
    // reboot the machine" run: the machine is a recorded VM. stress-ng's
    // own messages (not --quiet) say why a stressor is skipped. The budget stops a stressor that ignores its
    // timeout (guest time: 1 ns per instruction).
    let cmd = format!(
        "echo {STRESS_NG_BEGIN}; {}stress-ng --{name} {vcpus} --timeout {seconds}s --oom-avoid --pathological; echo stress-ng-status=$?",
        stress_ng_user(name)
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
    cfg.max_wall =
        (max_record_seconds > 0).then(|| std::time::Duration::from_secs(max_record_seconds));
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
    let mut recordings = ScratchRecordings(
        RecordingSession::take(&mut machine)
            .into_iter()
            .map(|rec| rec.dir)
            .collect(),
    );
    r.record_seconds = report.wall_seconds;
    r.virtual_seconds = report.virtual_seconds_of_command;
    let console = String::from_utf8_lossy(&report.console).to_string();
    // A stressor too slow to finish in the limit (far-branch translates
    // code without end on several vCPUs): what was recorded is replayed.
    let cut = matches!(report.end, RunEnd::WallTimeExhausted { .. });
    if report.end != (RunEnd::EndMarker { status: 0 }) && !cut {
        r.detail = format!("recorded run ended with {:?}", report.end);
        return r;
    }
    let status = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("stress-ng-status="))
        .next_back()
        .and_then(|s| s.trim().parse::<i32>().ok());
    // A cut run has no status: stress-ng was still running.
    if !cut {
        match status {
            // stress-ng may exit 0 (or 1) when it skipped every stressor it was
            // given ("No stress workers invoked"): nothing of the stressor ran.
            Some(_) if stress_ng_skipped(&console) => {
                r.outcome = "unsupported".into();
                r.detail = format!("stress-ng skipped it: {}", stress_ng_says(&console));
                return r;
            }
            Some(0) => {}
            Some(code @ (EXIT_NO_RESOURCE | EXIT_NOT_IMPLEMENTED)) => {
                r.outcome = "unsupported".into();
                r.detail = format!(
                    "stress-ng status {code} ({}): {}",
                    if code == EXIT_NO_RESOURCE {
                        "no resource"
                    } else {
                        "not implemented"
                    },
                    stress_ng_says(&console)
                );
                return r;
            }
            other => {
                r.detail = format!(
                    "stress-ng exit status {} while recording: {}",
                    other.map_or("unknown".to_string(), |c| c.to_string()),
                    stress_ng_says(&console)
                );
                return r;
            }
        }
    }
    let Some(dir) = recordings.0.first().cloned() else {
        r.detail = "no recording was made".into();
        return r;
    };
    let replay = Replayer::open(&dir).and_then(|mut p| p.run(&ReplayOptions::default()));
    // A recording that does not replay is what a developer debugs
    // (`krr replay DIR --gdb`): it stays.
    let replayed = matches!(&replay, Ok(rep) if matches!(rep.end, ReplayEnd::Matched));
    if keep || !replayed {
        recordings.0.retain(|d| d != &dir);
    }
    let kept = format!("; recording kept at {}", dir.display());
    match replay {
        Err(e) => r.detail = format!("replay could not run: {e}{kept}"),
        Ok(rep) => {
            r.events = rep.events;
            r.kernel_entries = rep.kernel_entries;
            r.replay_seconds = rep.wall_seconds;
            match rep.end {
                ReplayEnd::Matched => {
                    r.outcome = if cut { "cut" } else { "passed" }.into();
                    r.detail = format!(
                        "{}{} kernel instructions, {} checkpoint(s) compared{}",
                        if cut {
                            format!("recording stopped at its {max_record_seconds}-s wall-time limit, stress-ng unfinished; ")
                        } else {
                            String::new()
                        },
                        rep.kernel_instructions,
                        rep.checkpoints_verified,
                        if keep { kept.as_str() } else { "" }
                    );
                }
                ReplayEnd::Diverged(d) | ReplayEnd::Stalled(d) => {
                    r.outcome = "diverged".into();
                    r.detail = format!(
                        "event #{} at {}: expected {}; found {}{kept}",
                        d.event, d.rip, d.expected, d.found
                    );
                }
                ReplayEnd::Unsupported { why } => {
                    r.outcome = "unsupported".into();
                    r.detail = format!("replay: {why}{kept}");
                }
                other => r.detail = format!("{other:?}{kept}"),
            }
        }
    }
    r
}

/// The recordings of one validation run, deleted when it ends (whatever
/// way it ends) unless taken out of the list.
struct ScratchRecordings(Vec<PathBuf>);

impl Drop for ScratchRecordings {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        parse_size, parse_stressor_list, stress_ng_says, stress_ng_skipped, stress_ng_user,
    };

    #[test]
    fn stressors_that_refuse_root_run_as_nobody_and_the_rest_as_root() {
        for name in ["exec", "bad-ioctl", "spawn"] {
            let user = stress_ng_user(name);
            assert!(
                user.contains("setpriv --reuid=65534 --regid=65534"),
                "{name}: {user}"
            );
            assert!(user.starts_with("cd /tmp && "), "{name}: {user}");
        }
        assert_eq!(stress_ng_user("fork"), "");
        assert_eq!(stress_ng_user("execve"), "");
    }

    #[test]
    fn the_guest_stressor_list_is_read_between_its_markers() {
        let console =
            "Command line: ... krr.run=\"stress-ng --version; echo krr-stressors-begin; ...\"\r\n\
            stress-ng, version 0.15.06 (gcc 12.2, x86_64 Linux 6.1.0) \u{1f4bb}\r\n\
            krr-stressors-begin\r\n\
            access af-alg affinity aio\r\nzlib zombie\r\n\
            krr-stressors-end\r\n";
        let g = parse_stressor_list(console).unwrap();
        assert!(g.version.starts_with("stress-ng, version 0.15.06"));
        assert_eq!(
            g.stressors,
            ["access", "af-alg", "affinity", "aio", "zlib", "zombie"]
        );
        let cut = console.replace("krr-stressors-end", "");
        assert!(parse_stressor_list(&cut).is_err());
        let hostile = console.replace("zlib", "zlib;reboot");
        assert!(format!("{:#}", parse_stressor_list(&hostile).unwrap_err()).contains("zlib;reboot"));
    }

    #[test]
    fn stress_ng_says_why_it_skipped_and_not_what_the_boot_said() {
        let console = "[    0.1] Run /init as init process\r\nkrr-stress-ng-begin\r\n\
            stress-ng: info:  [93] setting to a 1 second run per stressor\r\n\
            stress-ng: info:  [93] dispatching hogs: 1 fanotify\r\n\
            stress-ng: info:  [94] fanotify: stressor will be skipped, fanotify_init not supported\r\n\
            stress-ng: info:  [93] skipped: 1: fanotify (1)\r\nstress-ng-status=4\r\n";
        assert_eq!(
            stress_ng_says(console),
            "fanotify: stressor will be skipped, fanotify_init not supported / skipped: 1: fanotify (1)"
        );
        let failing = "krr-stress-ng-begin\nstress-ng: info:  [9] dispatching hogs: 1 x\n\
            stress-ng: fail:  [10] x: read failed, errno=5\nstress-ng-status=2\n";
        assert_eq!(stress_ng_says(failing), "fail: x: read failed, errno=5");
        assert!(stress_ng_skipped(console));
        let apparmor =
            "krr.run=\"echo krr-stress-ng-begin; stress-ng --apparmor 1\"\nkrr-stress-ng-begin\n\
            stress-ng: info:  [53] apparmor stressor will be skipped, AppArmor is not enabled\n\
            stress-ng: info:  [53] setting to a 1 second run per stressor\n\
            stress-ng: error: [53] No stress workers invoked (one or more were unsupported)\n\
            stress-ng-status=0\n";
        assert!(stress_ng_skipped(apparmor));
        assert_eq!(
            stress_ng_says(apparmor),
            "apparmor stressor will be skipped, AppArmor is not enabled / error: No stress workers invoked (one or more were unsupported)"
        );
        let ran = "krr-stress-ng-begin\nstress-ng: info:  [51] dispatching hogs: 1 af-alg\n\
            stress-ng: info:  [52] af-alg: 1 cryptographic algorithms found in /proc/crypto\n\
            stress-ng: info:  [51] skipped: 0\n\
            stress-ng: info:  [51] successful run completed in 1.00s\nstress-ng-status=0\n";
        assert!(!stress_ng_skipped(ran));
        let quiet = "boot\nkrr-stress-ng-begin\nstress-ng-status=1\n";
        assert_eq!(stress_ng_says(quiet), "stress-ng printed nothing");
    }

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
