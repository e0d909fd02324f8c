// SPDX-License-Identifier: GPL-2.0-or-later
//! Timer interrupts reach the guest whatever it executes: a CPU-bound user
//! program is preempted and `timeout 1` kills it within 1.5 virtual seconds
//! on 1 and 2 vCPUs, under `krr run` and `krr record` (and the recording
//! replays with zero divergence); the kernel's timer interrupts per virtual
//! second stay within 10% of its HZ on a busy and an idle vCPU, with the
//! local APIC timer in one-shot and periodic mode and with the PIT alone.
//!
//! Images: `KRR_TEST_KERNEL` for plain runs, `KRR_AGENT_KERNEL` for
//! recordings, `KRR_TEST_INITRD` (see `common/guest_images.rs`).

#[path = "common/guest_images.rs"]
mod guest_images;
#[path = "common/krr_command.rs"]
mod krr_command;

use krr_command::krr;
use krr_engine::machine::{Backend, Machine, MachineConfig, RunEnd, RunReport};
use std::path::Path;

/// With the local APIC: its timer is the kernel's clock event device.
const APPEND: &str = "console=ttyS0 nokaslr acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 rdinit=/init";
/// `timeout 1` around a program that would compute for minutes.
const TIMEOUT_CMD: &str = "timeout 1 cpu-loop 100000; echo rc=$?";

fn run(kernel: &Path, initrd: &Path, append: &str, vcpus: usize) -> RunReport {
    let mut cfg = MachineConfig::new(
        kernel.to_path_buf(),
        Some(initrd.to_path_buf()),
        append.to_string(),
    );
    cfg.vcpus = vcpus;
    cfg.max_instructions = 6_000_000_000 * vcpus as u64;
    let mut m = Machine::new(cfg, Backend::Tcg).expect("machine");
    let r = m.run();
    println!(
        "{vcpus} vCPU(s), {append}: {:?}, command {:?} virtual s\n{}",
        r.end,
        r.virtual_seconds_of_command,
        String::from_utf8_lossy(&r.console)
    );
    r
}

/// `end`: the run's end as JSON (`{"kind": "end_marker", "status": 0}`).
fn assert_killed_in_time(end: &serde_json::Value, console: &str, command_seconds: Option<f64>) {
    assert_eq!(
        *end,
        serde_json::json!({"kind": "end_marker", "status": 0}),
        "{console}"
    );
    assert!(
        console.contains("rc=143"),
        "timeout did not kill: {console}"
    );
    let seconds = command_seconds.expect("KRR-START and KRR-END were printed");
    assert!(
        (1.0..=1.5).contains(&seconds),
        "the command took {seconds} virtual s"
    );
}

#[test]
fn timeout_stops_a_cpu_bound_program_under_krr_run() {
    let Some((kernel, initrd)) = guest_images::guest_images("KRR_TEST_KERNEL") else {
        return;
    };
    for vcpus in [1, 2] {
        let append = format!("{APPEND} krr.run=\"{TIMEOUT_CMD}\"");
        let r = run(&kernel, &initrd, &append, vcpus);
        let console = String::from_utf8_lossy(&r.console).into_owned();
        let end = serde_json::to_value(&r.end).unwrap();
        assert_killed_in_time(&end, &console, r.virtual_seconds_of_command);
    }
}

#[test]
fn timeout_stops_a_cpu_bound_program_while_recorded_and_the_recording_replays() {
    let Some((kernel, initrd)) = guest_images::guest_images("KRR_AGENT_KERNEL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for vcpus in [1, 2] {
        let name = format!("timeout-{vcpus}");
        let append = format!("{APPEND} krr.run=\"{TIMEOUT_CMD}\"");
        let vcpus_arg = vcpus.to_string();
        let out = krr(
            dir.path(),
            &[
                "record",
                "--kernel",
                kernel.to_str().unwrap(),
                "--initrd",
                initrd.to_str().unwrap(),
                "--backend",
                "tcg",
                "--vcpus",
                &vcpus_arg,
                "--max-instructions",
                "12000000000",
                "--name",
                &name,
                "--start",
                "marker:Run /init as init process",
                "--json",
                "--append",
                &append,
            ],
        );
        assert!(out.status.success(), "krr record {name}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let console = v["run"]["last_console_lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let seconds = v["run"]["virtual_seconds_of_command"].as_f64();
        assert_killed_in_time(&v["run"]["end"], &console, seconds);
        let out = krr(dir.path(), &["replay", &name, "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["end"]["kind"], "matched", "{report:#}");
        assert_eq!(report["console_matches"], true);
        assert_eq!(out.status.code(), Some(0));
    }
}

/// `(uptime seconds, per-CPU count of the interrupt line starting with
/// `label`)` for each time the command below printed them.
fn samples(console: &str, label: &str) -> Vec<(f64, Vec<u64>)> {
    let mut out = Vec::new();
    let mut uptime = None;
    for line in console.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() == 2 && words.iter().all(|w| w.parse::<f64>().is_ok()) {
            uptime = words[0].parse::<f64>().ok();
        } else if let (Some(t), Some(rest)) = (uptime, line.strip_prefix(label)) {
            let counts = rest
                .split_whitespace()
                .map_while(|w| w.parse::<u64>().ok())
                .collect();
            out.push((t, counts));
            uptime = None;
        }
    }
    out
}

/// The kernel's HZ, from the config beside its bzImage.
fn kernel_hz(kernel: &Path) -> f64 {
    let config = std::fs::read_to_string(kernel.with_file_name("config")).unwrap_or_default();
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(250.0)
}

/// Runs `timeout 1 cpu-loop` between two readings of the uptime and of
/// the `label` line of /proc/interrupts; asserts every vCPU's rate.
fn assert_timer_rate(kernel: &Path, initrd: &Path, extra: &str, vcpus: usize, label: &str) {
    let hz = kernel_hz(kernel);
    let read = "cat /proc/uptime; grep -E '^ *(LOC|0):' /proc/interrupts";
    let append = format!("{APPEND} {extra} krr.run=\"{read}; {TIMEOUT_CMD}; {read}\"");
    let r = run(kernel, initrd, &append, vcpus);
    let console = String::from_utf8_lossy(&r.console).into_owned();
    assert_eq!(r.end, RunEnd::EndMarker { status: 0 }, "{console}");
    let s = samples(&console, label);
    assert_eq!(s.len(), 2, "two readings of {label}: {console}");
    let ((t0, before), (t1, after)) = (&s[0], &s[1]);
    assert_eq!(before.len(), vcpus, "{label} counts per CPU: {console}");
    assert!(t1 - t0 > 0.95, "uptime {t0} -> {t1}");
    for (cpu, (a, b)) in before.iter().zip(after).enumerate() {
        let rate = (b - a) as f64 / (t1 - t0);
        println!("{extra:?}: CPU {cpu}: {rate:.1} timer interrupts per virtual s (HZ {hz})");
        assert!(
            (rate - hz).abs() <= hz * 0.1,
            "{extra:?}: CPU {cpu} took {rate:.1} timer interrupts per virtual second, HZ is {hz}"
        );
    }
}

#[test]
fn timer_interrupts_arrive_at_hz_on_busy_and_idle_vcpus() {
    let Some((kernel, initrd)) = guest_images::guest_images("KRR_TEST_KERNEL") else {
        return;
    };
    // Local APIC timer, one-shot (high-resolution timers): one vCPU
    // computes, the other idles.
    assert_timer_rate(&kernel, &initrd, "", 2, "LOC:");
    // Local APIC timer, periodic.
    assert_timer_rate(&kernel, &initrd, "highres=off", 2, "LOC:");
    // The PIT alone (8259 PIC, uniprocessor).
    assert_timer_rate(&kernel, &initrd, "noapic nolapic", 1, "0:");
}

/// `--max-seconds` ends a software-CPU run that would compute for minutes
/// (it was checked only on KVM's host-time slices), and `--run` with the
/// window lines gives the window's instructions in the report.
#[test]
fn max_seconds_stops_a_software_cpu_run_and_the_window_is_reported() {
    let Some((kernel, initrd)) = guest_images::guest_images("KRR_TEST_KERNEL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (k, i) = (kernel.display().to_string(), initrd.display().to_string());
    let base = [
        "run",
        "--json",
        "--backend",
        "tcg",
        "--kernel",
        &k,
        "--initrd",
        &i,
    ];
    let out = krr(
        dir.path(),
        &[
            &base[..],
            &["--max-seconds", "2", "--run", "cpu-loop 100000"],
        ]
        .concat(),
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("a JSON report on stdout");
    assert_eq!(out.status.code(), Some(8), "{report}");
    assert_eq!(
        report["end"],
        serde_json::json!({"kind": "wall_time_exhausted", "millis": 2000})
    );
    let window = "echo KRR-WINDOW''-BEGIN; syscall-loop 1000; echo KRR-WINDOW''-END";
    let out = krr(dir.path(), &[&base[..], &["--run", window]].concat());
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("a JSON report on stdout");
    assert_eq!(out.status.code(), Some(0), "{report}");
    let instructions = report["window"]["instructions"].as_u64().unwrap_or(0);
    assert!(
        instructions > 1_000_000 && instructions < report["instructions"].as_u64().unwrap(),
        "{report}"
    );
}
