// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask bench boot|workloads|record|replay|gdb|micro`: measurements
//! side by side in one run, on the project's own guest kernel and
//! initramfs (boot also on Debian's cloud kernel). Results go to `results/bench/NAME.json` with a figure
//! (`NAME.png`, `.svg`) and a Markdown table on stdout.
//!
//! Each run is one `krr bench-boot`, `bench-workload` or `bench-record`
//! process (see [`crate::krr_bin`]); its JSON object is kept as it is under
//! `runs`.

use crate::bench_figure::{self, Bar};
use crate::krr_bin::{self, number};
use crate::{images, repo_root};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::Value;
use std::ffi::OsStr;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum Benchmark {
    /// Boot to the first line of /init: krr (tcg) vs qemu-system-x86_64
    /// -accel tcg, on the project's kernel and on Debian's cloud kernel.
    Boot,
    /// Boot-only, CPU-bound and syscall-heavy guest commands run to their
    /// end: krr (tcg) vs QEMU TCG on the host's clock and on the engine's
    /// (`-icount shift=0,sleep=off`).
    Workloads,
    /// Recording slowdown on the software CPU: a syscall-heavy and a
    /// CPU-bound workload, plain vs recorded, plus log growth.
    Record,
    /// Replay of the kernel alone against the recording and against the
    /// plain run, same workloads as `record`.
    Replay,
    /// Debugging a replay in gdb: reverse-stepi, reverse-continue against
    /// continue, the stub's memory.
    Gdb,
    /// criterion micro-benchmarks of the hot pieces alone: the agent ring's
    /// decoding, the event log's append and read, chunk compression.
    Micro,
}

/// Same command line for both sides and both kernels: the project's kernel
/// has no ACPI and no PCI; `echo` gives /init's first line.
const BOOT_CMDLINE: &str =
    "console=ttyS0 acpi=off tsc=reliable mitigations=off panic=-1 krr.run=\"echo hello\"";

/// The software CPU's boot at most this many times QEMU TCG's (issue 17).
const BOOT_TARGET: f64 = 1.2;

/// Median of the runs' values.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(which: Benchmark, repetitions: usize) -> Result<()> {
    match which {
        Benchmark::Boot => boot(repetitions),
        Benchmark::Workloads => workloads(repetitions),
        Benchmark::Record => record(repetitions, false),
        Benchmark::Replay => record(repetitions, true),
        Benchmark::Gdb => crate::bench_gdb::run(repetitions),
        Benchmark::Micro => micro(),
    }
}

/// `cargo bench -p krr-record --bench hot_paths` (criterion keeps its
/// history and reports under target/criterion).
fn micro() -> Result<()> {
    crate::setup::ensure()?;
    let args = ["bench", "-p", "krr-record", "--bench", "hot_paths"];
    eprintln!("== cargo {}", args.join(" "));
    crate::test::cargo(&args, &[])
}

/// Checks `repetitions`, builds `krr` and the guest images both QEMU and
/// krr boot (the kernel without the agent, the base initramfs).
fn krr_and_plain_guest(repetitions: usize) -> Result<(PathBuf, PathBuf, PathBuf)> {
    if repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let krr_exe = krr_bin::build()?;
    let files = images::build_files(&[
        ("guest-6.1", "bzImage"),
        ("initramfs-base", "initramfs.cpio.gz"),
    ])?;
    Ok((krr_exe, files[0].clone(), files[1].clone()))
}

/// The kernels the boot benchmark boots, with the QEMU machine that suits
/// each: the project's (no ACPI, no PCI: microvm), and Debian's own cloud
/// kernel unmodified (a PC with its keyboard controller and PCI bus).
const BOOT_KERNELS: &[(&str, &str)] = &[
    ("guest-6.1", "microvm,acpi=off"),
    ("debian-6.1-cloud", "pc"),
];

fn boot(repetitions: usize) -> Result<()> {
    let (krr_exe, project_kernel, initrd) = krr_and_plain_guest(repetitions)?;
    let store = krr_orchestrator::store::Store::open_default()?;
    let mut rows = Vec::new();
    for &(image, machine) in BOOT_KERNELS {
        let kernel = if image == "guest-6.1" {
            project_kernel.clone()
        } else {
            crate::manifests::fetch_image(&store, image)?
        };
        for vcpus in [1usize, 2] {
            let mut runs: Vec<BootRun> = Vec::new();
            for rep in 1..=repetitions {
                let vcpus_arg = vcpus.to_string();
                let args: &[&OsStr] = &[
                    "bench-boot".as_ref(),
                    "--kernel".as_ref(),
                    kernel.as_os_str(),
                    "--initrd".as_ref(),
                    initrd.as_os_str(),
                    "--append".as_ref(),
                    BOOT_CMDLINE.as_ref(),
                    "--vcpus".as_ref(),
                    vcpus_arg.as_ref(),
                    "--mem".as_ref(),
                    "512M".as_ref(),
                    "--qemu".as_ref(),
                    "qemu-system-x86_64".as_ref(),
                    "--qemu-machine".as_ref(),
                    machine.as_ref(),
                    "--json".as_ref(),
                ];
                let r = krr_bin::run_json(&krr_exe, args)
                    .and_then(BootRun::from_json)
                    .with_context(|| {
                        format!("boot benchmark, {image}, {vcpus} vCPU(s), run {rep}")
                    })?;
                eprintln!(
                    "  {image}, {vcpus} vCPU(s) run {rep}: krr {:.2} s ({:.0} MIPS), qemu {:.2} s, ratio {:.2}",
                    r.krr_wall_seconds, r.krr_mips, r.qemu_wall_seconds, r.ratio
                );
                runs.push(r);
            }
            let krr = median(runs.iter().map(|r| r.krr_wall_seconds).collect());
            let qemu = median(runs.iter().map(|r| r.qemu_wall_seconds).collect());
            let mips = median(runs.iter().map(|r| r.krr_mips).collect());
            let runs: Vec<Value> = runs.into_iter().map(|r| r.json).collect();
            rows.push(serde_json::json!({
                "kernel_image": image,
                "kernel": kernel,
                "qemu_machine": machine,
                "vcpus": vcpus,
                "krr_wall_seconds_median": krr,
                "qemu_wall_seconds_median": qemu,
                "ratio_of_medians": krr / qemu,
                "krr_mips_median": mips,
                "runs": runs,
            }));
        }
    }
    println!(
        "| kernel | vCPUs | krr tcg (s) | QEMU TCG (s) | ratio (target <= {BOOT_TARGET}) | krr MIPS |"
    );
    println!("|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.0} |",
            row["kernel_image"].as_str().unwrap_or("?"),
            row["vcpus"],
            row["krr_wall_seconds_median"].as_f64().unwrap_or(f64::NAN),
            row["qemu_wall_seconds_median"].as_f64().unwrap_or(f64::NAN),
            row["ratio_of_medians"].as_f64().unwrap_or(f64::NAN),
            row["krr_mips_median"].as_f64().unwrap_or(f64::NAN),
        );
    }
    let bars: Vec<Bar> = rows
        .iter()
        .map(|row| {
            Bar::new(
                format!(
                    "{}, {} vCPU",
                    row["kernel_image"].as_str().unwrap_or("?"),
                    row["vcpus"]
                ),
                row["ratio_of_medians"].as_f64().unwrap_or(f64::NAN),
                Some(BOOT_TARGET),
            )
        })
        .collect();
    let doc = serde_json::json!({
        "benchmark": "boot",
        "initrd": initrd,
        "cmdline": BOOT_CMDLINE,
        "repetitions": repetitions,
        "results": rows,
    });
    write_results(
        "boot",
        &doc,
        &format!(
            "krr boot / QEMU TCG boot to /init's first line, wall time, medians of {repetitions}"
        ),
        &bars,
    )
}

/// The workload benchmark's guest commands: boot only, CPU-bound,
/// syscall-heavy (the table).
const WORKLOADS: &[&str] = &["true", "cpu-loop 40", "syscall-loop 20000"];

/// Kernel command line of the workload benchmark (`krr.run=` is added).
const WORKLOAD_CMDLINE: &str = "console=ttyS0 acpi=off tsc=reliable mitigations=off panic=-1";

/// Each workload on 1 and 2 vCPUs, `repetitions` times: one `krr
/// bench-workload` process per run, which runs krr, QEMU TCG and QEMU TCG
/// on the engine's clock one after the other.
fn workloads(repetitions: usize) -> Result<()> {
    let (krr_exe, kernel, initrd) = krr_and_plain_guest(repetitions)?;
    let mut rows = Vec::new();
    for &workload in WORKLOADS {
        for vcpus in [1usize, 2] {
            let mut runs: Vec<Value> = Vec::new();
            for rep in 1..=repetitions {
                let vcpus_arg = vcpus.to_string();
                let args: &[&OsStr] = &[
                    "bench-workload".as_ref(),
                    "--kernel".as_ref(),
                    kernel.as_os_str(),
                    "--initrd".as_ref(),
                    initrd.as_os_str(),
                    "--append".as_ref(),
                    WORKLOAD_CMDLINE.as_ref(),
                    "--workload".as_ref(),
                    workload.as_ref(),
                    "--vcpus".as_ref(),
                    vcpus_arg.as_ref(),
                    "--json".as_ref(),
                ];
                let what = format!("workload benchmark, `{workload}`, {vcpus} vCPU(s), run {rep}");
                let r = krr_bin::run_json(&krr_exe, args).with_context(|| what.clone())?;
                let t = |side: &str, key: &str| number(&r[side], key, "krr bench-workload");
                let same_clock = r["qemu_same_clock"]["from_init_seconds"]
                    .as_f64()
                    .map_or(String::new(), |s| {
                        format!(", qemu on the engine's clock {s:.2} s from /init")
                    });
                eprintln!(
                    "  `{workload}` {vcpus} vCPU(s) run {rep}: krr {:.2} s ({:.2} from /init), qemu {:.2} s ({:.2}){same_clock}",
                    t("krr", "whole_seconds").with_context(|| what.clone())?,
                    t("krr", "from_init_seconds")?,
                    t("qemu", "whole_seconds")?,
                    t("qemu", "from_init_seconds")?,
                );
                runs.push(r);
            }
            let med = |side: &str, key: &str| -> Result<f64> {
                Ok(median(
                    runs.iter()
                        .map(|r| number(&r[side], key, "krr bench-workload"))
                        .collect::<Result<_>>()?,
                ))
            };
            let krr = med("krr", "whole_seconds")?;
            let krr_init = med("krr", "from_init_seconds")?;
            let qemu = med("qemu", "whole_seconds")?;
            let qemu_init = med("qemu", "from_init_seconds")?;
            // QEMU on the engine's clock runs with one vCPU only.
            let same_init = if vcpus == 1 {
                Some(med("qemu_same_clock", "from_init_seconds")?)
            } else {
                None
            };
            rows.push(serde_json::json!({
                "workload": workload,
                "vcpus": vcpus,
                "krr_seconds_median": krr,
                "krr_from_init_seconds_median": krr_init,
                "qemu_seconds_median": qemu,
                "qemu_from_init_seconds_median": qemu_init,
                "qemu_same_clock_from_init_seconds_median": same_init,
                "ratio_of_medians": krr / qemu,
                "ratio_from_init_of_medians": krr_init / qemu_init,
                "ratio_same_clock_from_init_of_medians": same_init.map(|s| krr_init / s),
                "target": BOOT_TARGET,
                "runs": runs,
            }));
        }
    }
    println!("| workload | vCPUs | krr (s) | QEMU TCG (s) | krr / QEMU (target <= {BOOT_TARGET}) | from /init: krr (s) | QEMU TCG (s) | krr / QEMU | QEMU on the engine's clock (s) | krr / that |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut bars = Vec::new();
    for row in &rows {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        let name = format!(
            "{}, {} vCPU",
            row["workload"].as_str().unwrap_or("?"),
            row["vcpus"]
        );
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            row["workload"].as_str().unwrap_or("?"),
            row["vcpus"],
            f("krr_seconds_median"),
            f("qemu_seconds_median"),
            f("ratio_of_medians"),
            f("krr_from_init_seconds_median"),
            f("qemu_from_init_seconds_median"),
            f("ratio_from_init_of_medians"),
            dash(f("qemu_same_clock_from_init_seconds_median")),
            dash(f("ratio_same_clock_from_init_of_medians")),
        );
        bars.push(Bar::new(
            format!("{name}: whole run"),
            f("ratio_of_medians"),
            Some(BOOT_TARGET),
        ));
        bars.push(Bar::new(
            format!("{name}: from /init"),
            f("ratio_from_init_of_medians"),
            Some(BOOT_TARGET),
        ));
        bars.push(Bar::new(
            format!("{name}: from /init, same clock"),
            f("ratio_same_clock_from_init_of_medians"),
            None,
        ));
    }
    let doc = serde_json::json!({
        "benchmark": "workloads",
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": WORKLOAD_CMDLINE,
        "repetitions": repetitions,
        "results": rows,
    });
    write_results(
        "workloads",
        &doc,
        &format!("krr run / QEMU TCG, wall time, medians of {repetitions}"),
        &bars,
    )
}

/// A value with two decimals, or `-` for one not measured.
fn dash(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "-".into()
    }
}

/// Writes `results/bench/NAME.json` and its figure `NAME.png` (and `.svg`).
fn write_results(name: &str, doc: &Value, title: &str, bars: &[Bar]) -> Result<()> {
    let dir = repo_root().join("results/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join(format!("{name}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    for f in bench_figure::write(&dir.join(name), title, bars)? {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

/// One `krr bench-boot --json` run: the numbers used here, and the whole
/// object for the results file.
struct BootRun {
    krr_wall_seconds: f64,
    krr_mips: f64,
    qemu_wall_seconds: f64,
    ratio: f64,
    json: Value,
}

impl BootRun {
    fn from_json(json: Value) -> Result<BootRun> {
        let n = |key| number(&json, key, "krr bench-boot");
        Ok(BootRun {
            krr_wall_seconds: n("krr_wall_seconds")?,
            krr_mips: n("krr_mips")?,
            qemu_wall_seconds: n("qemu_wall_seconds")?,
            ratio: n("ratio")?,
            json,
        })
    }
}

/// One `krr bench-record --json` run: the numbers used here, and the whole
/// object for the results file.
struct RecordRun {
    plain_seconds: f64,
    recorded_seconds: f64,
    ratio: f64,
    ratio_without_snapshot: f64,
    instruction_ratio: f64,
    snapshot_seconds: f64,
    replay_seconds: f64,
    bytes_per_event: f64,
    events: u64,
    log_bytes: u64,
    log_bytes_per_second: f64,
    log_bytes_per_guest_second: Option<f64>,
    replay_peak_rss_bytes: Option<u64>,
    guest_mem_bytes: u64,
    replay_end: String,
    json: Value,
}

impl RecordRun {
    fn from_json(json: Value) -> Result<RecordRun> {
        const WHAT: &str = "krr bench-record";
        let n = |key| number(&json, key, WHAT);
        let u = |key: &str| {
            json[key]
                .as_u64()
                .with_context(|| format!("`{WHAT}` output has no count `{key}`: {json}"))
        };
        Ok(RecordRun {
            plain_seconds: n("plain_seconds")?,
            recorded_seconds: n("recorded_seconds")?,
            ratio: n("ratio")?,
            ratio_without_snapshot: n("ratio_without_snapshot")?,
            instruction_ratio: n("instruction_ratio")?,
            snapshot_seconds: n("snapshot_seconds")?,
            replay_seconds: n("replay_seconds")?,
            bytes_per_event: n("bytes_per_event")?,
            events: u("events")?,
            log_bytes: u("log_bytes")?,
            log_bytes_per_second: n("log_bytes_per_second")?,
            log_bytes_per_guest_second: json["log_bytes_per_guest_second"].as_f64(),
            replay_peak_rss_bytes: json["replay_peak_rss_bytes"].as_u64(),
            guest_mem_bytes: u("guest_mem_bytes")?,
            replay_end: json["replay_end"]
                .as_str()
                .with_context(|| format!("`{WHAT}` output has no `replay_end`: {json}"))?
                .to_string(),
            json,
        })
    }
}

/// The recording benchmark's workloads, syscall-heavy and CPU-bound, each
/// with its targets (issue 17): recorded / plain at most the first; replay
/// / recorded at most the second (replay never slower than its recording;
/// a CPU-bound one, whose user code replay skips, 5x faster).
/// `cpu-loop 40` is mostly /init's and the program's start and exit
/// (kernel work replay does); `cpu-loop 400` is mostly user code.
const RECORD_WORKLOADS: &[(&str, f64, f64)] = &[
    ("syscall-loop 20000", 1.05, 1.0),
    ("cpu-loop 40", 1.02, 0.2),
    ("cpu-loop 400", 1.02, 0.2),
];

/// The log's growth per second of guest time at most KRR's (its paper
/// quotes about 160 KB/s), and replay's resident memory at most the
/// guest's RAM plus 10% (issue 17).
const LOG_TARGET_BYTES_PER_GUEST_SECOND: f64 = 160e3;
const REPLAY_RSS_TARGET: f64 = 1.10;

/// The median of the values present; `None` when none is.
fn median_of_some(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

/// The project's test command line (no `krr.run=`).
const RECORD_CMDLINE: &str = "console=ttyS0 nokaslr noapic nolapic acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 rdinit=/init";

/// Runs the record/replay workloads; `replay` picks the table printed and
/// the results file (`record.json` or `replay.json`).
fn record(repetitions: usize, replay: bool) -> Result<()> {
    if repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let krr_exe = krr_bin::build()?;
    let files = images::build_files(&[
        ("guest-6.1-krr", "bzImage"),
        ("initramfs-base", "initramfs.cpio.gz"),
    ])?;
    let (kernel, initrd) = (files[0].clone(), files[1].clone());
    let scratch = tempfile::tempdir().context("creating a scratch directory for recordings")?;
    let mut rows = Vec::new();
    for &(workload, record_target, replay_target) in RECORD_WORKLOADS {
        let mut runs: Vec<RecordRun> = Vec::new();
        for rep in 1..=repetitions {
            let args: &[&OsStr] = &[
                "bench-record".as_ref(),
                "--kernel".as_ref(),
                kernel.as_os_str(),
                "--initrd".as_ref(),
                initrd.as_os_str(),
                "--append".as_ref(),
                RECORD_CMDLINE.as_ref(),
                "--workload".as_ref(),
                workload.as_ref(),
                "--vcpus".as_ref(),
                "1".as_ref(),
                "--mem".as_ref(),
                "512M".as_ref(),
                "--recordings".as_ref(),
                scratch.path().as_os_str(),
                "--json".as_ref(),
            ];
            // Every other run records first (see `krr bench-record --recorded-first`).
            let mut args = args.to_vec();
            if rep % 2 == 0 {
                args.push("--recorded-first".as_ref());
            }
            let r = krr_bin::run_json(&krr_exe, &args)
                .and_then(RecordRun::from_json)
                .with_context(|| format!("record benchmark, `{workload}`, run {rep}"))?;
            eprintln!(
                "  {workload} run {rep}: plain {:.2} s, recorded {:.2} s, ratio {:.3}, {} events, {:.1} bytes/event; replay {:.2} s ({})",
                r.plain_seconds, r.recorded_seconds, r.ratio, r.events, r.bytes_per_event, r.replay_seconds, r.replay_end
            );
            runs.push(r);
        }
        let plain = median(runs.iter().map(|r| r.plain_seconds).collect());
        let recorded = median(runs.iter().map(|r| r.recorded_seconds).collect());
        let ratio = median(runs.iter().map(|r| r.ratio).collect());
        let ratio_steady = median(runs.iter().map(|r| r.ratio_without_snapshot).collect());
        let ratio_min = runs.iter().map(|r| r.ratio).fold(f64::INFINITY, f64::min);
        let ratio_max = runs
            .iter()
            .map(|r| r.ratio)
            .fold(f64::NEG_INFINITY, f64::max);
        // Deterministic: the same in every run.
        let instruction_ratio = median(runs.iter().map(|r| r.instruction_ratio).collect());
        let snapshot = median(runs.iter().map(|r| r.snapshot_seconds).collect());
        let replay_s = median(runs.iter().map(|r| r.replay_seconds).collect());
        let last = runs.last().expect("at least one run");
        let (events, log_bytes, bytes_per_event, log_bytes_per_second) = (
            last.events,
            last.log_bytes,
            last.bytes_per_event,
            last.log_bytes_per_second,
        );
        let log_per_guest_second =
            median_of_some(runs.iter().map(|r| r.log_bytes_per_guest_second));
        let replay_rss = median_of_some(
            runs.iter()
                .map(|r| r.replay_peak_rss_bytes.map(|b| b as f64)),
        );
        let guest_mem = last.guest_mem_bytes as f64;
        let replays_matched = runs.iter().filter(|r| r.replay_end == "matched").count();
        let runs: Vec<Value> = runs.into_iter().map(|r| r.json).collect();
        rows.push(serde_json::json!({
            "workload": workload,
            "record_target": record_target,
            "replay_target": replay_target,
            "plain_seconds_median": plain,
            "recorded_seconds_median": recorded,
            "ratio_median": ratio,
            "ratio_without_snapshot_median": ratio_steady,
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
            "instruction_ratio": instruction_ratio,
            "snapshot_seconds_median": snapshot,
            "events": events,
            "log_bytes": log_bytes,
            "bytes_per_event": bytes_per_event,
            "log_bytes_per_second": log_bytes_per_second,
            "log_bytes_per_guest_second_median": log_per_guest_second,
            "log_target_bytes_per_guest_second": LOG_TARGET_BYTES_PER_GUEST_SECOND,
            "replay_peak_rss_bytes_median": replay_rss,
            "guest_mem_bytes": guest_mem,
            "replay_rss_over_guest_mem": replay_rss.map(|r| r / guest_mem),
            "replay_rss_target": REPLAY_RSS_TARGET,
            "replay_seconds_median": replay_s,
            "replay_over_recorded": replay_s / recorded,
            "replay_over_plain": replay_s / plain,
            "replays_matched": replays_matched,
            "runs": runs,
        }));
    }
    if replay {
        println!("| workload | plain (s) | recorded (s) | replay (s) | replay/record | target | replay/plain | replay peak RSS (MiB) | RSS / guest RAM | target | replays matched |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for row in &rows {
            let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {} | {:.2} | {:.2} | {:.2} | {:.2} | <= {} | {:.2} | {:.0} | {:.2} | <= {} | {}/{} |",
                row["workload"].as_str().unwrap_or("?"),
                f("plain_seconds_median"),
                f("recorded_seconds_median"),
                f("replay_seconds_median"),
                f("replay_over_recorded"),
                f("replay_target"),
                f("replay_over_plain"),
                f("replay_peak_rss_bytes_median") / (1u64 << 20) as f64,
                f("replay_rss_over_guest_mem"),
                REPLAY_RSS_TARGET,
                row["replays_matched"],
                repetitions,
            );
        }
    } else {
        println!("| workload | plain (s) | recorded (s) | ratio | target | ratio range | snapshot, guest stopped (s) | ratio without snapshot | guest instructions, recorded/plain | events | log bytes | bytes/event | log MB/s | log KB per guest s | target |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for row in rows.iter().filter(|_| !replay) {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {:.2} | {:.2} | {:.3} | <= {} | {:.3}-{:.3} | {:.2} | {:.3} | {:.3} | {} | {} | {:.1} | {:.2} | {:.0} | <= {:.0} |",
            row["workload"].as_str().unwrap_or("?"),
            f("plain_seconds_median"),
            f("recorded_seconds_median"),
            f("ratio_median"),
            f("record_target"),
            f("ratio_min"),
            f("ratio_max"),
            f("snapshot_seconds_median"),
            f("ratio_without_snapshot_median"),
            f("instruction_ratio"),
            row["events"],
            row["log_bytes"],
            f("bytes_per_event"),
            f("log_bytes_per_second") / 1e6,
            f("log_bytes_per_guest_second_median") / 1e3,
            LOG_TARGET_BYTES_PER_GUEST_SECOND / 1e3,
        );
    }
    let mut bars = Vec::new();
    for row in &rows {
        let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
        let w = row["workload"].as_str().unwrap_or("?");
        if replay {
            bars.push(Bar::new(
                format!("{w}: replay / recorded"),
                f("replay_over_recorded"),
                Some(f("replay_target")),
            ));
            bars.push(Bar::new(
                format!("{w}: replay RSS / guest RAM"),
                f("replay_rss_over_guest_mem"),
                Some(REPLAY_RSS_TARGET),
            ));
        } else {
            bars.push(Bar::new(
                format!("{w}: recorded / plain"),
                f("ratio_median"),
                Some(f("record_target")),
            ));
            bars.push(Bar::new(
                format!("{w}: guest instructions"),
                f("instruction_ratio"),
                None,
            ));
            bars.push(Bar::new(
                format!("{w}: log / KRR's 160 KB per guest s"),
                f("log_bytes_per_guest_second_median") / LOG_TARGET_BYTES_PER_GUEST_SECOND,
                Some(1.0),
            ));
        }
    }
    let name = if replay { "replay" } else { "record" };
    let doc = serde_json::json!({
        "benchmark": name,
        "backend": "tcg",
        "kernel": kernel,
        "initrd": initrd,
        "cmdline": RECORD_CMDLINE,
        "window": "from the kernel starting /init to the end of the run; the recorded run starts recording there",
        "repetitions": repetitions,
        "results": rows,
    });
    write_results(
        name,
        &doc,
        &format!("{name} benchmark (software CPU), medians of {repetitions}"),
        &bars,
    )
}
