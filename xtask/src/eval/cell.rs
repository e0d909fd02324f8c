// SPDX-License-Identifier: GPL-2.0-or-later
//! Running one cell: the workload under one scheme, measured between the
//! console lines `KRR-WINDOW-BEGIN` and `KRR-WINDOW-END` that the guest
//! prints around the measured command (same kernel, same guest image, same
//! guest command under every scheme; only recording differs).

use super::journal::{CellRecord, Status};
use super::plan::{scheme_name, Cell};
use super::process::{self, Finished};
use anyhow::{bail, Result};
use krr_orchestrator::images::BuiltImage;
use krr_orchestrator::manifest::{Scheme, Workload};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub(super) const WINDOW_BEGIN: &str = "KRR-WINDOW-BEGIN";
/// The guest command that prints [`WINDOW_BEGIN`] (the `''` keeps the
/// marker itself out of the kernel's echo of its command line).
pub(super) const ECHO_WINDOW_BEGIN: &str = "echo KRR-WINDOW''-BEGIN";
const WINDOW_END: &str = "KRR-WINDOW-END";

/// The x86 kernel's command-line limit (COMMAND_LINE_SIZE), less room for
/// the rest of the line.
const MAX_GUEST_COMMAND: usize = 1500;

/// Guest memory when a workload names none.
const DEFAULT_MEMORY_MIB: u64 = 512;

/// QEMU's kernel command line (the engine's is `krr`'s default). The
/// microvm machine has a local APIC and an I/O APIC, and `reboot=t` ends the
/// run by a triple fault, which `-no-reboot` turns into QEMU's exit.
const QEMU_CMDLINE: &str =
    "console=ttyS0 nokaslr acpi=off tsc=reliable mitigations=off panic=-1 reboot=t";

/// The guest files of a workload.
#[derive(Debug, Clone)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub vmlinux: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
}

impl GuestImages {
    /// The files of a guest booting `kernel` with `initramfs` or `rootfs`,
    /// from the images `built`.
    pub fn from_built(
        built: &[BuiltImage],
        kernel: &str,
        initramfs: Option<&str>,
        rootfs: Option<&str>,
    ) -> Result<GuestImages> {
        let file = |image: &str, f: &str| -> Result<PathBuf> {
            built
                .iter()
                .find(|b| b.name == image)
                .and_then(|b| b.file(f))
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow::anyhow!("image `{image}` has no `{f}`"))
        };
        Ok(GuestImages {
            kernel: file(kernel, "bzImage")?,
            vmlinux: file(kernel, "vmlinux")?,
            initrd: initramfs
                .map(|i| file(i, "initramfs.cpio.gz"))
                .transpose()?,
            rootfs: rootfs.map(|r| file(r, "rootfs.ext4")).transpose()?,
        })
    }
}

/// What every cell of an eval shares.
pub struct Harness<'a> {
    pub krr: PathBuf,
    pub qemu: PathBuf,
    /// `--backend` for `krr run` and `krr record`.
    pub backend: String,
    /// Recordings of the eval (a cell's is removed once it replayed).
    pub recordings: PathBuf,
    pub interrupt: &'a AtomicBool,
}

/// The shell command the guest's /init runs: the setup commands, then the
/// measured command between the window lines. The lines are written with
/// `''` inside so that the kernel's echo of its command line (which holds
/// this command) does not contain them.
pub fn guest_command(w: &Workload) -> Result<String> {
    let mut parts: Vec<String> = w.setup.iter().map(|s| s.trim().to_string()).collect();
    parts.push(ECHO_WINDOW_BEGIN.into());
    let mut cmd = parts.join(" && ");
    cmd.push_str(&format!(
        " && {{ {}; }}; krr_status=$?; echo KRR-WINDOW''-END; exit $krr_status",
        w.command.trim()
    ));
    if cmd.contains('"') {
        bail!(
            "workload `{}`: `command` and `setup` may not contain double quotes (they go into \
             krr.run=\"...\" on the kernel command line); use single quotes",
            w.name
        );
    }
    if cmd.len() > MAX_GUEST_COMMAND {
        bail!(
            "workload `{}`: `setup` and `command` make a guest command of {} bytes; the kernel \
             command line allows about {MAX_GUEST_COMMAND}",
            w.name,
            cmd.len()
        );
    }
    Ok(cmd)
}

/// Runs `cell` of workload `w` and returns its record (failures are
/// records too, with the reason; only an error of the harness itself is an
/// `Err`).
pub fn run(ctx: &Harness, w: &Workload, images: &GuestImages, cell: &Cell) -> Result<CellRecord> {
    let mut rec = CellRecord {
        key: cell.key(),
        workload: cell.workload.clone(),
        scheme: scheme_name(cell.scheme).into(),
        vcpus: cell.vcpus,
        repetition: cell.repetition,
        ..CellRecord::default()
    };
    let command = guest_command(w)?;
    let mem_mib = w.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    let outcome = match cell.scheme {
        Scheme::Native => {
            let cmd = krr_machine(ctx, "run", images, &command, cell.vcpus, mem_mib, w);
            run_process(cmd, krr_timeout(w), ctx)
                .and_then(|f| engine_run(&mut rec, &f, w).map(|_| f))
        }
        Scheme::Krr => record_and_replay(ctx, &mut rec, w, images, &command, cell, mem_mib),
        Scheme::WholeVmRr | Scheme::QemuTcg => {
            let rr_file = ctx.recordings.join(format!("{}.rr", cell.key()));
            let record = cell.scheme == Scheme::WholeVmRr;
            let cmd = qemu(
                ctx,
                images,
                &command,
                cell.vcpus,
                mem_mib,
                record.then_some(&rr_file),
            );
            let r = run_process(cmd, Duration::from_secs(w.timeout_s), ctx)
                .and_then(|f| qemu_run(&mut rec, &f, w).map(|()| f));
            if record {
                rec.log_bytes = std::fs::metadata(&rr_file).ok().map(|m| m.len());
                let _ = std::fs::remove_file(&rr_file);
            }
            r
        }
        Scheme::KrrUpstream => Err(Outcome::Unsupported(
            "KRR's own artifact needs its patched host kernel with hardware KVM; the harness \
             does not install it (see the CloudLab setup)"
                .into(),
        )),
    };
    match outcome {
        Ok(_) => rec.status = Some(Status::Ok),
        Err(Outcome::Failed(reason, lines)) => {
            rec.status = Some(Status::Failed);
            rec.reason = Some(reason);
            rec.last_console_lines = lines;
        }
        Err(Outcome::Unsupported(reason)) => {
            rec.status = Some(Status::Unsupported);
            rec.reason = Some(reason);
        }
    }
    rec.finished_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    Ok(rec)
}

/// Why a cell did not produce a measurement.
enum Outcome {
    /// The reason and the last console lines.
    Failed(String, Vec<String>),
    Unsupported(String),
}

fn failed(reason: impl Into<String>, f: &Finished) -> Outcome {
    Outcome::Failed(reason.into(), f.last_lines(15))
}

/// Time for a `krr` process: its own `--max-seconds` (the workload's
/// timeout) ends the run first, writing its report and finishing its
/// recording, which stays replayable up to there; the harness kills only
/// a process that does not.
fn krr_timeout(w: &Workload) -> Duration {
    Duration::from_secs(w.timeout_s + 60)
}

/// `krr run|record` with the machine arguments of a cell.
fn krr_machine(
    ctx: &Harness,
    subcommand: &str,
    images: &GuestImages,
    command: &str,
    vcpus: u32,
    mem_mib: u64,
    w: &Workload,
) -> Command {
    let mut cmd = Command::new(&ctx.krr);
    cmd.arg(subcommand)
        .arg("--json")
        .arg("--kernel")
        .arg(&images.kernel);
    if let Some(initrd) = &images.initrd {
        cmd.arg("--initrd").arg(initrd);
    }
    if let Some(rootfs) = &images.rootfs {
        cmd.arg("--disk").arg(rootfs);
    }
    cmd.args(["--vcpus", &vcpus.to_string()])
        .args(["--mem", &format!("{mem_mib}M")])
        .args(["--backend", &ctx.backend])
        .args(["--max-seconds", &w.timeout_s.to_string()])
        .args(["--run", command]);
    cmd
}

/// The window's wall time from the stamped console lines.
fn window(f: &Finished) -> Result<f64, Outcome> {
    match (f.marker_at(WINDOW_BEGIN), f.marker_at(WINDOW_END)) {
        (Some(b), Some(e)) => Ok(e - b),
        (None, _) => Err(failed(
            format!(
                "the guest printed no {WINDOW_BEGIN} line (a setup command failed, or the guest \
                 did not reach its command); process: {}",
                f.describe()
            ),
            f,
        )),
        (Some(_), None) => Err(failed(
            format!(
                "the guest printed no {WINDOW_END} line; process: {}",
                f.describe()
            ),
            f,
        )),
    }
}

/// The workload's metrics from the console; one that matches nothing fails
/// the cell.
fn metrics(rec: &mut CellRecord, f: &Finished, w: &Workload) -> Result<(), Outcome> {
    let text = f.text();
    for m in &w.metrics {
        match m.extract(&text) {
            Some(v) => {
                rec.metrics.insert(m.name.clone(), v);
            }
            None => {
                return Err(failed(
                    format!(
                        "metric `{}`: regex `{}` matched nothing in the console output",
                        m.name, m.regex
                    ),
                    f,
                ))
            }
        }
    }
    Ok(())
}

/// Common checks of a guest process: not interrupted, not timed out, the
/// window and metrics present, the guest command exited 0.
fn guest_finished(rec: &mut CellRecord, f: &Finished, w: &Workload) -> Result<(), Outcome> {
    rec.process_wall_seconds = Some(f.wall_seconds);
    rec.exit_status = f.status.and_then(|s| s.code());
    if f.interrupted {
        return Err(failed("interrupted (Ctrl-C)", f));
    }
    // krr's exit status 8: its --max-seconds (the workload's timeout) ran
    // out.
    if f.timed_out || rec.exit_status == Some(8) {
        return Err(failed(
            format!(
                "timed out after {} s (the workload's timeout_s)",
                w.timeout_s
            ),
            f,
        ));
    }
    let status = f
        .lines()
        .iter()
        .find_map(|l| l.text.trim().strip_prefix("KRR-END status="))
        .and_then(|s| s.trim().parse::<i32>().ok());
    rec.guest_status = status;
    let wall = window(f)?;
    rec.wall_seconds = Some(wall);
    match status {
        Some(0) => {}
        Some(s) => {
            return Err(failed(
                format!("the workload's command exited with status {s}"),
                f,
            ))
        }
        None => {
            return Err(failed(
                format!(
                    "the guest printed no KRR-END line (crash or reset?); process: {}",
                    f.describe()
                ),
                f,
            ))
        }
    }
    metrics(rec, f, w)
}

/// A `krr run` or `krr record` process: its checks and numbers.
fn engine_run(rec: &mut CellRecord, f: &Finished, w: &Workload) -> Result<Value, Outcome> {
    guest_finished(rec, f, w)?;
    let json = f.json().ok_or_else(|| {
        failed(
            format!("krr printed no JSON report; process: {}", f.describe()),
            f,
        )
    })?;
    let run = json.get("run").unwrap_or(&json);
    if let Some(window) = run.get("window").filter(|w| w.is_object()) {
        rec.guest_instructions = window["instructions"].as_u64().filter(|&n| n > 0);
        rec.virtual_seconds = window["virtual_seconds"].as_f64();
    }
    match rec.exit_status {
        Some(0) => Ok(json),
        other => Err(failed(
            format!(
                "krr exited with {other:?}: {}",
                run["end"].to_string().chars().take(300).collect::<String>()
            ),
            f,
        )),
    }
}

fn qemu_run(rec: &mut CellRecord, f: &Finished, w: &Workload) -> Result<(), Outcome> {
    if let Some(line) = f
        .stderr
        .iter()
        .find(|l| l.text.contains("not supported for 'smp'"))
    {
        rec.exit_status = f.status.and_then(|s| s.code());
        return Err(Outcome::Unsupported(format!(
            "QEMU refuses: {}",
            line.text.trim()
        )));
    }
    guest_finished(rec, f, w)
}

/// The `qemu-system-x86_64` command of a cell: the same kernel, guest image
/// and guest command, on QEMU's microvm machine with one host thread for
/// the guest's CPUs; `rr_file` records (icount at one instruction per
/// nanosecond, the engine's rule; disks through blkreplay).
fn qemu(
    ctx: &Harness,
    images: &GuestImages,
    command: &str,
    vcpus: u32,
    mem_mib: u64,
    rr_file: Option<&PathBuf>,
) -> Command {
    let mut cmd = Command::new(&ctx.qemu);
    cmd.args(["-M", "microvm,acpi=off", "-accel", "tcg,thread=single"])
        .args(["-m", &format!("{mem_mib}M"), "-smp", &vcpus.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&images.kernel);
    if let Some(rr) = rr_file {
        cmd.arg("-icount")
            .arg(format!("shift=0,rr=record,rrfile={}", rr.display()));
    }
    let root = match (&images.initrd, &images.rootfs) {
        (Some(initrd), _) => {
            cmd.arg("-initrd").arg(initrd);
            "rdinit=/init"
        }
        (None, Some(rootfs)) => {
            let drive = format!(
                "file={},if=none,id=root,snapshot=on,format=raw",
                rootfs.display()
            );
            cmd.args(["-drive", &drive]);
            let device = if rr_file.is_some() {
                cmd.args(["-drive", "driver=blkreplay,if=none,image=root,id=root-rr"]);
                "virtio-blk-device,drive=root-rr"
            } else {
                "virtio-blk-device,drive=root"
            };
            cmd.args(["-device", device]);
            "root=/dev/vda rw init=/init"
        }
        (None, None) => "",
    };
    cmd.arg("-append")
        .arg(format!("{QEMU_CMDLINE} {root} krr.run=\"{command}\""));
    cmd
}

/// Total size of the entries of `dir` whose names pass `keep` (a
/// directory with all it holds).
pub(super) fn size_of(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Option<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            if keep(&name) {
                total += size_of(&e.path(), &|_| true).unwrap_or(0);
            }
        } else if keep(&name) {
            total += meta.len();
        }
    }
    Some(total)
}

/// `krr record` of the window, then `krr replay` of the recording; the
/// replay's verdict is part of the cell (a divergence fails it).
fn record_and_replay(
    ctx: &Harness,
    rec: &mut CellRecord,
    w: &Workload,
    images: &GuestImages,
    command: &str,
    cell: &Cell,
    mem_mib: u64,
) -> Result<Finished, Outcome> {
    let dir = ctx.recordings.join(cell.key());
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = krr_machine(ctx, "record", images, command, cell.vcpus, mem_mib, w);
    cmd.env("KRR_RECORDINGS", &ctx.recordings)
        .args(["--name", &cell.key()])
        .arg(format!("--start=marker:{WINDOW_BEGIN}"))
        .arg(format!("--stop=marker:{WINDOW_END}"))
        .arg("--vmlinux")
        .arg(&images.vmlinux);
    let f = run_process(cmd, krr_timeout(w), ctx)?;
    let keep = |rec: &mut CellRecord| rec.kept_recording = dir.exists().then(|| dir.clone());
    let json = match engine_run(rec, &f, w) {
        Ok(json) => json,
        Err(e) => {
            keep(rec);
            return Err(e);
        }
    };
    let recording = json["recordings"]
        .as_array()
        .and_then(|r| r.first())
        .cloned()
        .unwrap_or(Value::Null);
    if recording.is_null() {
        return Err(failed(
            "krr record made no recording (did the guest agent start?)",
            &f,
        ));
    }
    rec.log_events = recording["events"].as_u64();
    rec.snapshot_pause_seconds = recording["snapshot_seconds"].as_f64();
    rec.log_bytes = size_of(&dir, &|n| n.ends_with(".krrlog"));
    rec.snapshot_bytes = size_of(&dir, &|n| n == "snapshot");
    if recording["ok"].as_bool() != Some(true) {
        keep(rec);
        return Err(failed(
            format!(
                "the recording is not replayable: {}",
                recording["reason"].as_str().unwrap_or("no reason given")
            ),
            &f,
        ));
    }
    let mut replay = Command::new(&ctx.krr);
    replay.arg("replay").arg("--json").arg(&dir);
    let r = run_process(replay, krr_timeout(w), ctx)?;
    rec.replay_seconds = Some(r.wall_seconds);
    let report = r.json();
    // `end` is `{"kind": "matched"}` or the kind with its details.
    let verdict = match report.as_ref().map(|j| &j["end"]) {
        Some(end) if end["kind"] == "matched" => "matched".to_string(),
        Some(end @ Value::Object(_)) => end.to_string().chars().take(400).collect(),
        _ if r.timed_out => format!("timed out after {} s", w.timeout_s),
        _ => format!("no report ({})", r.describe()),
    };
    rec.replay_verdict = Some(verdict.clone());
    if let Some(s) = report.as_ref().and_then(|j| j["wall_seconds"].as_f64()) {
        rec.replay_seconds = Some(s);
    }
    if verdict != "matched" {
        keep(rec);
        return Err(failed(format!("replay did not match: {verdict}"), &r));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(f)
}

/// Runs a guest process of a cell; one that cannot start (a missing QEMU)
/// fails the cell, and the eval goes on.
fn run_process(cmd: Command, timeout: Duration, ctx: &Harness) -> Result<Finished, Outcome> {
    process::run(cmd, timeout, ctx.interrupt)
        .map_err(|e| Outcome::Failed(format!("{e:#}"), Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(setup: &[&str], command: &str) -> Workload {
        Workload {
            name: "w".into(),
            description: None,
            kernel: "k".into(),
            initramfs: Some("i".into()),
            rootfs: None,
            disks: Vec::new(),
            setup: setup.iter().map(|s| s.to_string()).collect(),
            command: command.into(),
            metrics: Vec::new(),
            repetitions: 1,
            vcpus: vec![1],
            memory_mib: None,
            timeout_s: 10,
        }
    }

    fn finished(console: &[&str], timed_out: bool) -> Finished {
        use std::os::unix::process::ExitStatusExt;
        Finished {
            status: (!timed_out).then(|| std::process::ExitStatus::from_raw(0)),
            timed_out,
            interrupted: false,
            wall_seconds: 9.0,
            stdout: console
                .iter()
                .enumerate()
                .map(|(i, t)| process::Line {
                    at: i as f64,
                    text: t.to_string(),
                })
                .collect(),
            stderr: Vec::new(),
        }
    }

    fn reason(r: Result<(), Outcome>) -> String {
        match r {
            Err(Outcome::Failed(reason, _)) => reason,
            Err(Outcome::Unsupported(reason)) => format!("unsupported: {reason}"),
            Ok(()) => "ok".into(),
        }
    }

    #[test]
    fn a_cell_fails_with_the_reason() {
        let mut w = workload(&[], "bench");
        w.metrics.push(krr_orchestrator::manifest::Metric {
            name: "ops".into(),
            regex: r"ops/s: ([0-9.]+)".into(),
            unit: "ops/s".into(),
            better: krr_orchestrator::manifest::Better::Higher,
        });
        let check = |lines: &[&str], timed_out| {
            let mut rec = CellRecord::default();
            let r = reason(guest_finished(&mut rec, &finished(lines, timed_out), &w));
            (r, rec)
        };
        let (r, rec) = check(
            &[
                "boot",
                "KRR-WINDOW-BEGIN",
                "ops/s: 12.5",
                "KRR-WINDOW-END\r",
                "KRR-END status=0",
            ],
            false,
        );
        assert_eq!(r, "ok");
        assert_eq!((rec.wall_seconds, rec.metrics["ops"]), (Some(2.0), 12.5));
        let (r, _) = check(
            &[
                "KRR-WINDOW-BEGIN",
                "ops: none",
                "KRR-WINDOW-END",
                "KRR-END status=0",
            ],
            false,
        );
        assert!(
            r.contains("metric `ops`") && r.contains("matched nothing"),
            "{r}"
        );
        let (r, _) = check(&["boot", "Kernel panic - not syncing"], false);
        assert!(r.contains("no KRR-WINDOW-BEGIN"), "{r}");
        let (r, _) = check(
            &["KRR-WINDOW-BEGIN", "KRR-WINDOW-END", "KRR-END status=3"],
            false,
        );
        assert_eq!(r, "the workload's command exited with status 3");
        let (r, _) = check(&["KRR-WINDOW-BEGIN"], true);
        assert!(r.starts_with("timed out after 10 s"), "{r}");
    }

    #[test]
    fn qemu_refusing_smp_record_is_unsupported() {
        let w = workload(&[], "bench");
        let mut f = finished(&[], false);
        f.stderr.push(process::Line {
            at: 0.1,
            text: "qemu-system-x86_64: Record/replay feature is not supported for 'smp'".into(),
        });
        let r = reason(qemu_run(&mut CellRecord::default(), &f, &w));
        assert!(r.starts_with("unsupported: QEMU refuses: "), "{r}");
    }

    #[test]
    fn every_repository_workload_makes_a_guest_command() {
        let m = crate::manifests::load_repo().unwrap();
        for w in &m.workloads {
            let cmd = guest_command(w).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(cmd.contains(w.command.trim()), "{}", w.name);
        }
    }

    #[test]
    fn the_guest_command_brackets_the_measured_command() {
        let w = workload(&["rm -rf /tmp/x", "mkdir /tmp/x"], "run a; run b");
        assert_eq!(
            guest_command(&w).unwrap(),
            "rm -rf /tmp/x && mkdir /tmp/x && echo KRR-WINDOW''-BEGIN && { run a; run b; }; \
             krr_status=$?; echo KRR-WINDOW''-END; exit $krr_status"
        );
        let w = workload(&[], "echo \"quoted\"");
        let e = format!("{:#}", guest_command(&w).unwrap_err());
        assert!(
            e.contains("workload `w`") && e.contains("double quotes"),
            "{e}"
        );
    }
}
