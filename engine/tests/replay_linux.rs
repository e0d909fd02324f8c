// SPDX-License-Identifier: GPL-2.0-or-later
//! Record with `krr record`, then replay the kernel alone with `krr replay`
//! on the software CPU: boot to the end of /init, a syscall-heavy program
//! and a multi-process shell workload replay to the end with zero
//! divergence and the recorded console output; a changed console byte is
//! caught at its offset; a corrupted event is caught
//! at its index; a truncated log is reported as such; a 2-vCPU run from boot
//! (the second vCPU's startup included) with user-space threads on both
//! vCPUs replays in its recorded order; checkpoints are verified, and a
//! changed one is caught at its index; every way a run ends (reset through
//! the i8042, triple fault, power-off, panic, budget, Ctrl-C) replays to
//! its end on 1 and 2 vCPUs; a 2-vCPU recording of a single-threaded
//! program replays to its end.
//!
//! Needs `KRR_AGENT_KERNEL` (the `-krr` bzImage) and `KRR_TEST_INITRD` (set
//! by `cargo xtask test`).

#[path = "common/guest_images.rs"]
mod guest_images;
#[path = "common/krr_command.rs"]
mod krr_command;

use krr_command::krr;
use krr_engine::record::event::LogEvent;
use krr_engine::record::log::{EventLogReader, EventLogWriter};
use std::path::{Path, PathBuf};

const APPEND: &str = "console=ttyS0 nokaslr noapic nolapic acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 rdinit=/init";
/// With the local APIC and IO-APIC: what a machine of several vCPUs needs.
const APPEND_SMP: &str = "console=ttyS0 nokaslr acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 rdinit=/init";
const FROM_INIT: &str = "marker:Run /init as init process";

fn images() -> Option<(PathBuf, PathBuf)> {
    guest_images::guest_images("KRR_AGENT_KERNEL")
}

/// Records `run` (from boot, or from `start`) as `name`.
fn record(dir: &Path, name: &str, run: &str, start: Option<&str>, vcpus: usize) {
    record_with(dir, name, run, start, vcpus, APPEND, &[]);
}

/// [`record`] with another command line and more `krr record` arguments.
fn record_with(
    dir: &Path,
    name: &str,
    run: &str,
    start: Option<&str>,
    vcpus: usize,
    append: &str,
    extra: &[&str],
) {
    let out = krr(dir, &record_args(name, run, start, vcpus, append, extra));
    assert!(out.status.success(), "krr record {name} failed");
}

/// The `krr record` arguments of [`record_with`].
fn record_args(
    name: &str,
    run: &str,
    start: Option<&str>,
    vcpus: usize,
    append: &str,
    extra: &[&str],
) -> Vec<String> {
    let (kernel, initrd) = images().expect("images checked by the caller");
    let vmlinux = kernel.with_file_name("vmlinux");
    let append = format!("{append} krr.run=\"{run}\"");
    let vcpus = vcpus.to_string();
    let mut args = vec![
        "record",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--backend",
        "tcg",
        "--quiet",
        "--name",
        name,
        "--vcpus",
        &vcpus,
        "--append",
        &append,
    ];
    if vmlinux.is_file() {
        args.extend(["--vmlinux", vmlinux.to_str().unwrap()]);
    }
    if let Some(start) = start {
        args.extend(["--start", start]);
    }
    args.extend(extra);
    args.into_iter().map(String::from).collect()
}

/// `krr replay NAME --json`: (exit code, report).
fn replay(dir: &Path, name: &str) -> (i32, serde_json::Value) {
    let out = krr(dir, &["replay", name, "--json"]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), report)
}

fn assert_matched(dir: &Path, name: &str) -> serde_json::Value {
    let (code, report) = replay(dir, name);
    assert_eq!(report["end"]["kind"], "matched", "{report:#}");
    assert_eq!(code, 0);
    assert_eq!(report["console_matches"], true);
    assert!(report["kernel_entries"].as_u64().unwrap() > 0);
    report
}

#[test]
fn replays_boot_to_the_end_of_init() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    record(dir.path(), "boot", "echo hello from init", None, 1);
    let report = assert_matched(dir.path(), "boot");
    // The whole boot ran in the kernel: hundreds of millions of instructions.
    assert!(report["kernel_instructions"].as_u64().unwrap() > 100_000_000);
    assert!(
        report["console_bytes"].as_u64().unwrap() > 1_000,
        "{report:#}"
    );
    assert_eq!(report["console_dropped_bytes"], 0);

    // One recorded console byte changed, in the middle of the boot: the
    // replay diverges at that byte, naming its offset.
    let mut offset = 0u64;
    let mut events = 0;
    rewrite(&dir.path().join("boot"), |_, e| match e {
        LogEvent::Console { bytes, .. } => {
            events += 1;
            if events < 20 {
                offset += bytes.len() as u64;
                return false;
            }
            bytes[0] ^= 0x20;
            true
        }
        _ => false,
    });
    let (code, report) = replay(dir.path(), "boot");
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(report["end"]["kind"], "diverged", "{report:#}");
    assert_eq!(report["console_matches"], false);
    let expected = report["end"]["expected"].as_str().unwrap();
    assert!(
        expected.contains(&format!("byte {offset} is")),
        "{report:#}"
    );
    assert!(report["console_bytes"].as_u64().unwrap() > offset);
}

#[test]
fn replays_a_syscall_heavy_program() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    record(dir.path(), "loop", "syscall-loop 2000", Some(FROM_INIT), 1);
    let report = assert_matched(dir.path(), "loop");
    // 12 syscalls per iteration, each a kernel entry from user mode.
    assert!(report["kernel_entries"].as_u64().unwrap() >= 24_000);
}

#[test]
fn replays_a_multi_process_workload() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // fork/exec/pipe/wait, mmap of files, /proc reads, a CPU-bound child.
    let run = "for i in 1 2 3 4 5; do echo $i | cat | wc -c > /dev/null; done; \
               ls -l /bin /usr/local/bin > /dev/null; cat /proc/meminfo | grep -c Mem; \
               syscall-loop 200 & cpu-loop 2; wait; sort /proc/cpuinfo | md5sum";
    record(dir.path(), "procs", run, Some(FROM_INIT), 1);
    assert_matched(dir.path(), "procs");
}

/// Rewrites a recording's event log with `change` applied to event `index`.
fn rewrite(dir: &Path, mut change: impl FnMut(u64, &mut LogEvent) -> bool) -> u64 {
    let path = dir.join("events.krrlog");
    let events: Vec<(u64, LogEvent)> = EventLogReader::open(&path)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let tmp = dir.join("events.krrlog.new");
    let mut w = EventLogWriter::create(&tmp).unwrap();
    let mut changed = None;
    for (i, mut e) in events {
        if changed.is_none() && change(i, &mut e) {
            changed = Some(i);
        }
        w.append(&e).unwrap();
    }
    w.close().unwrap();
    w.sync().unwrap();
    drop(w);
    std::fs::rename(&tmp, &path).unwrap();
    changed.expect("an event to change")
}

#[test]
fn a_corrupted_event_is_caught_at_its_index_and_a_truncated_log_is_reported() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    record(dir.path(), "bad", "syscall-loop 300", Some(FROM_INIT), 1);
    let rec = dir.path().join("bad");
    // The 500th kernel-mode RDTSC now claims a position 3 instructions later.
    let mut seen = 0;
    let index = rewrite(&rec, |_, e| match e {
        LogEvent::Rdtsc { at, .. } if at.cpl == 0 => {
            seen += 1;
            if seen == 500 {
                at.kernel_icount += 3;
                true
            } else {
                false
            }
        }
        _ => false,
    });
    let (code, report) = replay(dir.path(), "bad");
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(report["end"]["kind"], "diverged");
    assert_eq!(report["end"]["event"], index, "{report:#}");
    // The last events consumed, read again from the log for the report:
    // the last is the corrupted one (consumed when the kernel met it).
    let recent = report["end"]["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 8, "{report:#}");
    let expected = report["end"]["expected"].as_str().unwrap();
    assert!(
        recent
            .last()
            .and_then(|e| e.as_str())
            .is_some_and(|e| e.starts_with('#') && e.ends_with(&format!(" {expected}"))),
        "{report:#}"
    );

    // Cut the log in the middle of its last chunk: no end, no success.
    let trunc = tempfile::tempdir().unwrap();
    record(trunc.path(), "cut", "syscall-loop 300", Some(FROM_INIT), 1);
    let events = trunc.path().join("cut/events.krrlog");
    let len = std::fs::metadata(&events).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&events)
        .unwrap();
    f.set_len(len - 100).unwrap();
    let (code, report) = replay(trunc.path(), "cut");
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["end"]["kind"], "log_ended", "{report:#}");
}

#[test]
fn replays_two_vcpus_from_boot_with_threads_on_both() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // From the first instruction: the second vCPU's startup IPI is in the
    // log, then both run kernel and user code in turns.
    record_with(
        dir.path(),
        "smp",
        "thread-loop 2 300",
        None,
        2,
        APPEND_SMP,
        &[],
    );
    let rec = dir.path().join("smp");
    let events: Vec<LogEvent> = EventLogReader::open(&rec.join("events.krrlog"))
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect();
    let console: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            LogEvent::Console { bytes, .. } => Some(bytes.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    let console = String::from_utf8_lossy(&console);
    assert!(console.contains("cpus used: 2"), "{console}");
    assert!(console.contains("shared counter: 600"), "{console}");
    let startups = events
        .iter()
        .filter(|e| matches!(e, LogEvent::Startup { cpu: 1, .. }))
        .count();
    assert_eq!(startups, 1);
    // Both vCPUs entered the kernel from user mode (the threads' syscalls).
    for cpu in [0u16, 1] {
        let syscalls = events
            .iter()
            .filter(|e| matches!(e, LogEvent::Syscall { cpu: c, .. } if *c == cpu))
            .count();
        assert!(syscalls > 300, "vCPU {cpu}: {syscalls} syscalls");
    }
    let report = assert_matched(dir.path(), "smp");
    assert_eq!(report["vcpus"], 2);
}

#[test]
fn checkpoints_are_verified_and_a_changed_one_is_caught() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    record_with(
        dir.path(),
        "ck",
        "syscall-loop 300",
        Some(FROM_INIT),
        1,
        APPEND,
        &["--checkpoint-every", "2000000"],
    );
    let report = assert_matched(dir.path(), "ck");
    let verified = report["checkpoints_verified"].as_u64().unwrap();
    assert!(verified >= 3, "{report:#}");
    assert_eq!(report["checkpoints_memory_verified"], verified);
    // --verify-every passes over the ones closer than N to the last.
    let out = krr(
        dir.path(),
        &["replay", "ck", "--json", "--verify-every", "1000000000000"],
    );
    let thinned: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(thinned["end"]["kind"], "matched", "{thinned:#}");
    assert_eq!(thinned["checkpoints_verified"], 1);
    assert_eq!(thinned["checkpoints_skipped"], verified - 1);
    // A checkpoint whose digest differs is a divergence at its index.
    let mut seen = 0;
    let index = rewrite(&dir.path().join("ck"), |_, e| match e {
        LogEvent::Checkpoint { sha256, .. } => {
            seen += 1;
            if seen == 2 {
                sha256[0] ^= 1;
                true
            } else {
                false
            }
        }
        _ => false,
    });
    let (code, report) = replay(dir.path(), "ck");
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(report["end"]["event"], index, "{report:#}");
    assert!(
        report["end"]["expected"]
            .as_str()
            .unwrap()
            .contains("data+bss"),
        "{report:#}"
    );
}

/// Every way a guest's run can end, recorded from /init on 1 and 2 vCPUs:
/// the recording replays to its end with zero divergence.
#[test]
fn every_way_a_guest_ends_records_and_replays_to_its_end() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    struct Ending {
        name: &'static str,
        vcpus: usize,
        /// Extra kernel command-line words.
        words: &'static str,
        run: &'static str,
        /// Extra `krr record` arguments.
        extra: &'static [&'static str],
        /// How the run ends (`RunEnd`'s kind).
        ends: &'static str,
    }
    let ending = |name, vcpus, words, run, extra, ends| Ending {
        name,
        vcpus,
        words,
        run,
        extra,
        ends,
    };
    let budget_1: &[&str] = &["--max-instructions", "600000000"];
    let budget_2: &[&str] = &["--max-instructions", "1200000000"];
    let panic = "echo c > /proc/sysrq-trigger";
    let cases = [
        // `reboot -f` after the end marker: the i8042 reset line.
        ending("i8042-reset", 1, "", "echo bye", &[], "end_marker"),
        ending("i8042-reset-2", 2, "", "echo bye", &[], "end_marker"),
        // `reboot=t`: straight to a triple fault.
        ending("triple-fault", 1, "reboot=t", "echo bye", &[], "end_marker"),
        ending(
            "triple-fault-2",
            2,
            "reboot=t",
            "echo bye",
            &[],
            "end_marker",
        ),
        // Without ACPI, halting every vCPU for good is the power-off.
        ending("power-off", 1, "", "echo bye; halt -f", &[], "power_off"),
        ending("power-off-2", 2, "", "echo bye; halt -f", &[], "power_off"),
        ending("panic", 1, "", panic, &[], "panic"),
        ending("panic-2", 2, "", panic, &[], "panic"),
        ending(
            "budget",
            1,
            "",
            "while :; do :; done",
            budget_1,
            "budget_exhausted",
        ),
        ending(
            "budget-2",
            2,
            "",
            "while :; do :; done",
            budget_2,
            "budget_exhausted",
        ),
    ];
    for Ending {
        name,
        vcpus,
        words,
        run,
        extra,
        ends,
    } in &cases
    {
        let append = format!("{APPEND_SMP} {words}");
        let mut args = record_args(name, run, Some(FROM_INIT), *vcpus, &append, extra);
        args.push("--json".into());
        let out = krr(dir.path(), &args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["run"]["end"]["kind"], *ends, "{name}: {v:#}");
        assert_eq!(v["recordings"][0]["ok"], true, "{name}: {v:#}");
        let end: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(name).join("end.json")).unwrap())
                .unwrap();
        if words.contains("reboot=t") {
            assert_eq!(end["triple_fault_vcpu"], 0, "{name}: {end:#}");
        } else {
            assert!(end["triple_fault_vcpu"].is_null(), "{name}: {end:#}");
        }
        let report = assert_matched(dir.path(), name);
        assert_eq!(report["vcpus"], *vcpus, "{name}");
    }
}

#[test]
fn a_recording_stopped_by_ctrl_c_replays_to_its_end() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = record_args(
        "sigint",
        "syscall-loop 10000000",
        Some(FROM_INIT),
        1,
        APPEND_SMP,
        &["--json"],
    );
    let child = krr_command::krr_command(dir.path())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the recording has run a while.
    let header = dir.path().join("sigint").join("header.json");
    let started = std::time::Instant::now();
    while !header.exists() && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(header.exists(), "the recording never started");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["run"]["end"]["kind"], "interrupted", "{v:#}");
    assert_eq!(out.status.code(), Some(130));
    assert_eq!(v["recordings"][0]["ok"], true, "{v:#}");
    let report = assert_matched(dir.path(), "sigint");
    assert!(report["kernel_entries"].as_u64().unwrap() > 1000);
}

#[test]
fn a_two_vcpu_recording_of_a_single_threaded_program_replays_to_its_end() {
    if images().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // One vCPU busy with syscalls, the other mostly idle: a slice often
    // ends right where the kernel returns to user mode.
    record_with(
        dir.path(),
        "single",
        "syscall-loop 20000",
        None,
        2,
        APPEND_SMP,
        &[],
    );
    let report = assert_matched(dir.path(), "single");
    assert!(report["kernel_entries"].as_u64().unwrap() >= 240_000);
}
