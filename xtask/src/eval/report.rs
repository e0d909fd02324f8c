// SPDX-License-Identifier: GPL-2.0-or-later
//! `report.md`: what was measured where, the targets beside the measured
//! ratios, a table per workload, the figures, and every failed or
//! unsupported cell with its reason.

use super::journal::{CellRecord, Provenance, Status};
use super::plan::{scheme_name, SCHEME_ORDER};
use super::summary::{median, Summary};
use anyhow::{Context, Result};
use krr_orchestrator::manifest::Targets;
use std::fmt::Write as _;
use std::path::Path;

pub const REPORT_FILE: &str = "report.md";

fn secs(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}

fn ratio(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into())
}

fn verdict(measured: Option<f64>, target: Option<f64>) -> &'static str {
    match (measured, target) {
        (Some(m), Some(t)) if m <= t => "met",
        (Some(_), Some(_)) => "**missed**",
        (None, Some(_)) => "not measured",
        (_, None) => "no target",
    }
}

/// `shards`: the provenance of each shard a merged report was built from
/// (empty for one host's run).
pub fn write(
    dir: &Path,
    provenance: &Provenance,
    shards: &[Provenance],
    cells: &[CellRecord],
    planned: usize,
    targets: &Targets,
    figures: &[String],
) -> Result<()> {
    let text = render(provenance, shards, cells, planned, targets, figures);
    let path = dir.join(REPORT_FILE);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn render(
    p: &Provenance,
    shards: &[Provenance],
    cells: &[CellRecord],
    planned: usize,
    targets: &Targets,
    figures: &[String],
) -> String {
    let s = Summary::of(cells);
    let mut out = String::new();
    let count = |st: Status| cells.iter().filter(|c| c.status == Some(st)).count();
    let _ = writeln!(out, "# record-perf: recording overhead\n");
    let _ = writeln!(
        out,
        "{} of {planned} planned cells ran: {} ok, {} failed, {} unsupported by their scheme.\n",
        cells.len(),
        count(Status::Ok),
        count(Status::Failed),
        count(Status::Unsupported)
    );
    let _ = writeln!(out, "## Where\n");
    let _ = writeln!(
        out,
        "- started {} (commit {})",
        p.started_at, p.project_commit
    );
    let _ = writeln!(
        out,
        "- host: {} ({} CPUs), Linux {}",
        p.cpu_model, p.host_cpus, p.host_kernel
    );
    let _ = writeln!(
        out,
        "- engine backend: {} ({})",
        p.backend, p.backend_reason
    );
    let _ = writeln!(out, "- peer: {}", p.qemu_version);
    if !shards.is_empty() {
        let _ =
            writeln!(
            out,
            "- merged from {} shards (`cargo xtask results merge`); the host above is shard {}'s:",
            shards.len(),
            shards[0].matrix.shard.map(|s| s.to_string()).unwrap_or_default()
        );
        for s in shards {
            let _ = writeln!(
                out,
                "  - shard {}: {} ({} CPUs), Linux {}, backend {}, commit {}, started {}",
                s.matrix.shard.map(|s| s.to_string()).unwrap_or_default(),
                s.cpu_model,
                s.host_cpus,
                s.host_kernel,
                s.backend,
                s.project_commit,
                s.started_at
            );
        }
    }
    for (image, files) in &p.images {
        for (file, sha) in files {
            let _ = writeln!(out, "- image {image}/{file}: sha256 {sha}");
        }
    }
    let _ = writeln!(
        out,
        "\n## How\n\n\
         Every scheme boots the same kernel and guest image and runs the same guest command; \
         each cell is the host wall time between the guest's `KRR-WINDOW-BEGIN` and \
         `KRR-WINDOW-END` console lines around the workload's command (stamped as they \
         arrive), so boot and setup are not measured. Schemes run interleaved within each \
         repetition. `native`: `krr run`. `krr`: `krr record` of the window, then `krr replay` \
         of the recording (its verdict is part of the cell). `whole-vm-rr`: \
         `qemu-system-x86_64 -M microvm -accel tcg,thread=single -icount shift=0,rr=record` \
         (one instruction per virtual nanosecond, the engine's clock rule; disks through \
         blkreplay; it records from boot, so its log holds the boot too). `qemu-tcg`: the same \
         QEMU without -icount and recording. The `krr` window includes the pause for the \
         recording's start snapshot (its own column). Workload metrics are on the guest's \
         clock; guest instructions are the engine's exact counts over the window.\n"
    );

    let _ = writeln!(out, "## Targets\n");
    let _ = writeln!(
        out,
        "| workload | vCPUs | krr / native | target | | krr / whole-vm-rr | target | |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for w in s.workloads() {
        for v in s.vcpus_of(&w) {
            let overhead = s.ratio(&w, v, "krr", "native");
            let vs_peer = s.ratio(&w, v, "krr", "whole-vm-rr");
            let peer_note = match s
                .get(&w, v, "whole-vm-rr")
                .and_then(|g| g.unsupported.as_ref())
            {
                Some(_) => "peer unsupported",
                None => verdict(vs_peer, targets.krr_vs_whole_vm_rr),
            };
            let _ = writeln!(
                out,
                "| {w} | {v} | {} | {} | {} | {} | {} | {peer_note} |",
                ratio(overhead),
                ratio(targets.krr_vs_native),
                verdict(overhead, targets.krr_vs_native),
                ratio(vs_peer),
                ratio(targets.krr_vs_whole_vm_rr),
            );
        }
    }

    let _ = writeln!(out, "\n## Results\n");
    for w in s.workloads() {
        let _ = writeln!(out, "### {w}\n");
        let _ = writeln!(
            out,
            "| scheme | vCPUs | ok/failed | median s (min-max) | vs native | vs qemu-tcg | guest instructions (vs native) | metrics (median) | snapshot pause s | replay s | log bytes |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
        for v in s.vcpus_of(&w) {
            let groups = SCHEME_ORDER
                .iter()
                .filter_map(|&scheme| s.get(&w, v, scheme_name(scheme)));
            for g in groups {
                if g.unsupported.is_some() {
                    let _ = writeln!(
                        out,
                        "| {} | {v} | unsupported | - | - | - | - | - | - | - | - |",
                        g.scheme
                    );
                    continue;
                }
                let instr = match (
                    median(&g.instructions),
                    s.instruction_ratio(&w, v, &g.scheme),
                ) {
                    (Some(i), Some(r)) => format!("{i:.0} ({r:.4}x)"),
                    (Some(i), None) => format!("{i:.0}"),
                    _ => "-".into(),
                };
                let metrics: Vec<String> = g
                    .metrics
                    .iter()
                    .filter_map(|(k, vals)| Some(format!("{k} {:.1}", median(vals)?)))
                    .collect();
                let _ = writeln!(
                    out,
                    "| {} | {v} | {}/{} | {} ({}-{}) | {} | {} | {instr} | {} | {} | {} | {} |",
                    g.scheme,
                    g.walls.len(),
                    g.failed,
                    secs(g.median_wall()),
                    secs(g.min_wall()),
                    secs(g.max_wall()),
                    ratio(s.ratio(&w, v, &g.scheme, "native")),
                    ratio(s.ratio(&w, v, &g.scheme, "qemu-tcg")),
                    if metrics.is_empty() {
                        "-".into()
                    } else {
                        metrics.join(", ")
                    },
                    secs(median(&g.snapshot_pause_seconds)),
                    secs(median(&g.replay_seconds)),
                    median(&g.log_bytes)
                        .map(|b| format!("{b:.0}"))
                        .unwrap_or_else(|| "-".into()),
                );
            }
        }
        let _ = writeln!(out);
    }

    if !figures.is_empty() {
        let _ = writeln!(out, "## Figures\n");
        for f in figures {
            let _ = writeln!(out, "![{f}]({f})\n");
        }
    }

    let _ = writeln!(out, "## Cells\n");
    let _ = writeln!(
        out,
        "| cell | status | window s | process s | guest instructions | replay |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for c in cells {
        let status = match c.status {
            Some(Status::Ok) => "ok",
            Some(Status::Unsupported) => "unsupported",
            _ => "FAILED",
        };
        let _ = writeln!(
            out,
            "| {} | {status} | {} | {} | {} | {} |",
            c.key,
            secs(c.wall_seconds),
            secs(c.process_wall_seconds),
            c.guest_instructions
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            c.replay_verdict.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(out);

    let problems: Vec<&CellRecord> = cells
        .iter()
        .filter(|c| c.status != Some(Status::Ok))
        .collect();
    let _ = writeln!(out, "## Failed and unsupported cells\n");
    if problems.is_empty() {
        let _ = writeln!(out, "None.");
    }
    for c in problems {
        let what = match c.status {
            Some(Status::Unsupported) => "unsupported",
            _ => "FAILED",
        };
        let _ = writeln!(
            out,
            "- `{}` {what}: {}",
            c.key,
            c.reason.as_deref().unwrap_or("no reason recorded")
        );
        if let Some(kept) = &c.kept_recording {
            let _ = writeln!(out, "  (recording kept at `{}`)", kept.display());
        }
        if !c.last_console_lines.is_empty() {
            let _ = writeln!(out, "\n  ```");
            for l in &c.last_console_lines {
                let _ = writeln!(out, "  {l}");
            }
            let _ = writeln!(out, "  ```");
        }
    }
    out
}
