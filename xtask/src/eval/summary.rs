// SPDX-License-Identifier: GPL-2.0-or-later
//! The journal's cells grouped per workload x scheme x vCPUs, with medians
//! and the ratios the report and figures show; written as `summary.csv`.

use super::journal::{CellRecord, Status};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

pub const SUMMARY_FILE: &str = "summary.csv";

/// One workload x scheme x vCPUs.
#[derive(Debug, Clone, Default)]
pub struct Group {
    pub workload: String,
    pub scheme: String,
    pub vcpus: u32,
    /// Window wall seconds of the cells that succeeded.
    pub walls: Vec<f64>,
    pub failed: usize,
    /// Why the scheme does not run this configuration, when it does not.
    pub unsupported: Option<String>,
    pub instructions: Vec<f64>,
    pub replay_seconds: Vec<f64>,
    pub snapshot_pause_seconds: Vec<f64>,
    pub log_bytes: Vec<f64>,
    pub metrics: BTreeMap<String, Vec<f64>>,
}

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Group {
    pub fn median_wall(&self) -> Option<f64> {
        median(&self.walls)
    }
    pub fn min_wall(&self) -> Option<f64> {
        self.walls.iter().copied().reduce(f64::min)
    }
    pub fn max_wall(&self) -> Option<f64> {
        self.walls.iter().copied().reduce(f64::max)
    }
}

/// All groups, keyed by (workload, vCPUs, scheme), in a stable order.
#[derive(Debug, Default)]
pub struct Summary {
    pub groups: BTreeMap<(String, u32, String), Group>,
}

impl Summary {
    pub fn of(cells: &[CellRecord]) -> Summary {
        let mut groups: BTreeMap<(String, u32, String), Group> = BTreeMap::new();
        for c in cells {
            let g = groups
                .entry((c.workload.clone(), c.vcpus, c.scheme.clone()))
                .or_insert_with(|| Group {
                    workload: c.workload.clone(),
                    scheme: c.scheme.clone(),
                    vcpus: c.vcpus,
                    ..Group::default()
                });
            match c.status {
                Some(Status::Ok) => {
                    if let Some(w) = c.wall_seconds {
                        g.walls.push(w);
                    }
                    if let Some(i) = c.guest_instructions {
                        g.instructions.push(i as f64);
                    }
                    if let Some(r) = c.replay_seconds {
                        g.replay_seconds.push(r);
                    }
                    if let Some(p) = c.snapshot_pause_seconds {
                        g.snapshot_pause_seconds.push(p);
                    }
                    if let Some(b) = c.log_bytes {
                        g.log_bytes.push(b as f64);
                    }
                    for (k, v) in &c.metrics {
                        g.metrics.entry(k.clone()).or_default().push(*v);
                    }
                }
                Some(Status::Unsupported) => {
                    g.unsupported = Some(c.reason.clone().unwrap_or_else(|| "unsupported".into()))
                }
                Some(Status::Failed) | None => g.failed += 1,
            }
        }
        Summary { groups }
    }

    pub fn get(&self, workload: &str, vcpus: u32, scheme: &str) -> Option<&Group> {
        self.groups
            .get(&(workload.to_string(), vcpus, scheme.to_string()))
    }

    /// Median wall of `scheme` over median wall of `base`, same workload
    /// and vCPUs.
    pub fn ratio(&self, workload: &str, vcpus: u32, scheme: &str, base: &str) -> Option<f64> {
        let a = self.get(workload, vcpus, scheme)?.median_wall()?;
        let b = self.get(workload, vcpus, base)?.median_wall()?;
        (b > 0.0).then(|| a / b)
    }

    /// Median guest instructions of `scheme` over `native`'s.
    pub fn instruction_ratio(&self, workload: &str, vcpus: u32, scheme: &str) -> Option<f64> {
        let a = median(&self.get(workload, vcpus, scheme)?.instructions)?;
        let b = median(&self.get(workload, vcpus, "native")?.instructions)?;
        (b > 0.0).then(|| a / b)
    }

    pub fn workloads(&self) -> Vec<String> {
        let mut w: Vec<String> = self.groups.keys().map(|k| k.0.clone()).collect();
        w.dedup();
        w
    }

    pub fn vcpus_of(&self, workload: &str) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .groups
            .keys()
            .filter(|k| k.0 == workload)
            .map(|k| k.1)
            .collect();
        v.dedup();
        v
    }

    pub fn csv(&self) -> String {
        let mut out = String::from(
            "workload,scheme,vcpus,runs_ok,runs_failed,unsupported,median_s,min_s,max_s,\
             slowdown_vs_native,slowdown_vs_qemu_tcg,guest_instructions_median,\
             instruction_ratio_vs_native,replay_median_s,log_bytes_median,metrics\n",
        );
        let num = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
        for g in self.groups.values() {
            let metrics: Vec<String> = g
                .metrics
                .iter()
                .filter_map(|(k, v)| Some(format!("{k}={}", median(v)?)))
                .collect();
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                g.workload,
                g.scheme,
                g.vcpus,
                g.walls.len(),
                g.failed,
                g.unsupported.is_some(),
                num(g.median_wall()),
                num(g.min_wall()),
                num(g.max_wall()),
                num(self.ratio(&g.workload, g.vcpus, &g.scheme, "native")),
                num(self.ratio(&g.workload, g.vcpus, &g.scheme, "qemu-tcg")),
                median(&g.instructions)
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_default(),
                num(self.instruction_ratio(&g.workload, g.vcpus, &g.scheme)),
                num(median(&g.replay_seconds)),
                median(&g.log_bytes)
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_default(),
                metrics.join(";"),
            );
        }
        out
    }

    pub fn write_csv(&self, dir: &Path) -> Result<()> {
        let path = dir.join(SUMMARY_FILE);
        std::fs::write(&path, self.csv()).with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(scheme: &str, wall: f64, status: Status) -> CellRecord {
        CellRecord {
            key: format!("w-{scheme}-{wall}"),
            workload: "w".into(),
            scheme: scheme.into(),
            vcpus: 1,
            status: Some(status),
            wall_seconds: Some(wall),
            ..CellRecord::default()
        }
    }

    #[test]
    fn medians_and_ratios_leave_failed_cells_out() {
        let s = Summary::of(&[
            cell("native", 10.0, Status::Ok),
            cell("native", 12.0, Status::Ok),
            cell("native", 99.0, Status::Failed),
            cell("krr", 13.0, Status::Ok),
            cell("whole-vm-rr", 0.0, Status::Unsupported),
        ]);
        let native = s.get("w", 1, "native").unwrap();
        assert_eq!((native.median_wall(), native.failed), (Some(11.0), 1));
        assert_eq!(s.ratio("w", 1, "krr", "native"), Some(13.0 / 11.0));
        assert_eq!(s.ratio("w", 1, "whole-vm-rr", "native"), None);
        let csv = s.csv();
        assert!(
            csv.lines()
                .any(|l| l
                    .starts_with("w,native,1,2,1,false,11.000000,10.000000,12.000000,1.000000,")),
            "{csv}"
        );
        assert!(
            csv.lines()
                .any(|l| l.starts_with("w,whole-vm-rr,1,0,0,true,")),
            "{csv}"
        );
    }
}
