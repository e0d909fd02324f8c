// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask bench gdb`: what debugging a replay in gdb costs, against
//! the targets of the gdb issue: one `reverse-stepi` at most 1 s,
//! `reverse-continue` over a stretch at most 2x `continue` over the same
//! stretch, the stub's memory at most 2x the guest's RAM. A syscall-heavy
//! workload is recorded once; each repetition opens it in `krr replay --gdb`
//! and times gdb's commands with gdb's own clock, without snapshots of the
//! replay and with them. Results go to `results/bench/gdb.json` and a
//! table on stdout.

use crate::bench::median;
use crate::{images, krr_bin, repo_root};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CMDLINE: &str = "console=ttyS0 nokaslr noapic nolapic acpi=off tsc=reliable no_timer_check mitigations=off pci=off panic=-1 rdinit=/init";
const WORKLOAD: &str = "syscall-loop 2000";
/// Called on every iteration of the workload's loop.
const HANDLER: &str = "__x64_sys_getpid";
const GUEST_MEM: &str = "512M";
const GUEST_MEM_BYTES: u64 = 512 << 20;

pub fn run(repetitions: usize) -> Result<()> {
    if repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    let krr = krr_bin::build()?;
    let files = images::build_files(&[
        ("guest-6.1-krr", "bzImage"),
        ("initramfs-base", "initramfs.cpio.gz"),
    ])?;
    let (kernel, initrd) = (files[0].clone(), files[1].clone());
    let vmlinux = kernel.with_file_name("vmlinux");
    if !vmlinux.is_file() {
        bail!(
            "{}: missing (the kernel image keeps its vmlinux)",
            vmlinux.display()
        );
    }
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let append = format!("{CMDLINE} krr.run=\"echo KRR-BENCH''-BEGIN; {WORKLOAD}\"");
    eprintln!("bench gdb: recording `{WORKLOAD}`");
    let status = Command::new(&krr)
        .env("KRR_RECORDINGS", scratch.path())
        .args(["record", "--backend", "tcg", "--quiet", "--name", "gdb"])
        .args(["--start", "marker:KRR-BENCH-BEGIN", "--mem", GUEST_MEM])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--vmlinux")
        .arg(&vmlinux)
        .args(["--append", &append])
        .status()
        .context("running krr record")?;
    if !status.success() {
        bail!("krr record of `{WORKLOAD}` failed ({status})");
    }
    let instructions = recorded_kernel_instructions(&scratch.path().join("gdb"))?;
    // Without snapshots every reverse operation replays from the start;
    // with them, from the nearest one (5 M instructions: about 8 here).
    let configs = [("no snapshots", 0u64), ("a snapshot every 5 M", 5_000_000)];
    let mut results = Vec::new();
    println!(
        "| `{WORKLOAD}`, {instructions} kernel instructions replayed, median of {repetitions} | {} | {} | target |",
        configs[0].0, configs[1].0
    );
    println!("| --- | --- | --- | --- |");
    let mut rows: Vec<(String, Vec<f64>, Option<f64>)> = Vec::new();
    for (name, every) in configs {
        let mut runs = Vec::new();
        for rep in 1..=repetitions {
            let r = one_session(&krr, scratch.path(), &vmlinux, every)
                .with_context(|| format!("gdb session {rep}, {name}"))?;
            eprintln!("  {name}, run {rep}: {r}");
            runs.push(r);
        }
        let m = |k: &str| {
            median(
                runs.iter()
                    .map(|r| r[k].as_f64().unwrap_or(f64::NAN))
                    .collect(),
            )
        };
        let (forward, rstep, rcont, span, peak) = (
            m("forward_to_end_s"),
            m("reverse_stepi_s"),
            m("reverse_continue_s"),
            m("continue_same_span_s"),
            m("stub_peak_rss_bytes"),
        );
        let values = [
            ("continue from the start to the end (s)", forward, None),
            ("one reverse-stepi at the end (s)", rstep, Some(1.0)),
            (
                "reverse-continue / continue over the same stretch",
                rcont / span,
                Some(2.0),
            ),
            (
                "stub peak memory / guest RAM",
                peak / GUEST_MEM_BYTES as f64,
                Some(2.0),
            ),
        ];
        for (i, (what, value, target)) in values.into_iter().enumerate() {
            if rows.len() <= i {
                rows.push((what.to_string(), Vec::new(), target));
            }
            rows[i].1.push(value);
        }
        results.push(json!({
            "config": name,
            "snapshot_every": every,
            "median": {
                "forward_to_end_s": forward,
                "reverse_stepi_s": rstep,
                "reverse_continue_s": rcont,
                "continue_same_span_s": span,
                "reverse_continue_ratio": rcont / span,
                "stub_peak_rss_bytes": peak,
            },
            "runs": runs,
        }));
    }
    for (what, values, target) in rows {
        let shown = |v: f64| match target {
            Some(t) if v <= t => format!("{v:.2} (met)"),
            Some(_) => format!("{v:.2} (missed)"),
            None => format!("{v:.2}"),
        };
        let target = target.map_or(String::new(), |t| format!("<= {t}"));
        println!(
            "| {what} | {} | {} | {target} |",
            shown(values[0]),
            shown(values[1])
        );
    }
    let dir = repo_root().join("results/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join("gdb.json");
    let doc = json!({
        "benchmark": "gdb",
        "workload": WORKLOAD,
        "kernel_instructions_replayed": instructions,
        "guest_mem_bytes": GUEST_MEM_BYTES,
        "repetitions": repetitions,
        "targets": {"reverse_stepi_s": 1.0, "reverse_continue_ratio": 2.0, "memory_ratio": 2.0},
        "results": results,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The kernel instructions between the recording's start and its end.
fn recorded_kernel_instructions(recording: &Path) -> Result<u64> {
    let read = |name: &str| -> Result<Value> {
        let path = recording.join(name);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let end = read("end.json")?;
    let cpus = read("snapshot/cpus.json")?;
    let at_end = end["kernel_instructions_per_vcpu"][0].as_u64().unwrap_or(0);
    let at_start = cpus[0]["kernel_icount"].as_u64().unwrap_or(0);
    Ok(at_end.saturating_sub(at_start))
}

/// One gdb session: continue to the end, one reverse-stepi, reverse-continue
/// to the last syscall, continue from there to the end again.
fn one_session(
    krr: &Path,
    recordings: &Path,
    vmlinux: &Path,
    snapshot_every: u64,
) -> Result<Value> {
    let socket = recordings.join("gdb.sock");
    let _ = std::fs::remove_file(&socket);
    let mut stub = Command::new(krr)
        .env("KRR_RECORDINGS", recordings)
        .args(["replay", "gdb", "--quiet", "--snapshot-every"])
        .arg(snapshot_every.to_string())
        .arg("--gdb")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting krr replay --gdb")?;
    let began = Instant::now();
    while !socket.exists() {
        if began.elapsed() > Duration::from_secs(120) {
            let _ = stub.kill();
            bail!("krr replay --gdb made no socket in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let time = |name: &str| format!("python print('KRR-TIME {name}', time.time() - t)");
    let start = "python t = time.time()";
    let commands = [
        "set pagination off".to_string(),
        format!("target remote {}", socket.display()),
        "python import time".into(),
        start.into(),
        "continue".into(),
        time("forward_to_end_s"),
        start.into(),
        "reverse-stepi".into(),
        time("reverse_stepi_s"),
        format!("break {HANDLER}"),
        start.into(),
        "reverse-continue".into(),
        time("reverse_continue_s"),
        "delete".into(),
        start.into(),
        "continue".into(),
        time("continue_same_span_s"),
        format!("shell grep VmHWM /proc/{}/status", stub.id()),
    ];
    let mut gdb = Command::new("gdb");
    gdb.args(["-batch", "-nx"]);
    for c in &commands {
        gdb.args(["-ex", c]);
    }
    let out = gdb.arg(vmlinux).output().context("running gdb")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let _ = stub.wait();
    let mut r = serde_json::Map::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("KRR-TIME"), Some(name), Some(secs)) => {
                let secs: f64 = secs.parse().context("a time gdb printed")?;
                r.insert(name.into(), json!(secs));
            }
            (Some("VmHWM:"), Some(kb), Some("kB")) => {
                let kb: u64 = kb.parse().context("VmHWM")?;
                r.insert("stub_peak_rss_bytes".into(), json!(kb * 1024));
            }
            _ => {}
        }
    }
    for key in [
        "forward_to_end_s",
        "reverse_stepi_s",
        "reverse_continue_s",
        "continue_same_span_s",
        "stub_peak_rss_bytes",
    ] {
        if !r.contains_key(key) {
            bail!("gdb's output has no {key}:\n{text}");
        }
    }
    Ok(Value::Object(r))
}
