// SPDX-License-Identifier: GPL-2.0-or-later
//! The run matrix of a `record-perf` eval: which workloads, schemes, vCPU
//! counts and repetitions, checked against the manifests before anything
//! runs, and the cells in the order they run.

use super::shard::Shard;
use anyhow::{bail, Result};
use krr_orchestrator::manifest::{Manifests, Scheme, Suite, SuiteKind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Every scheme the executor knows, in the order cells of one repetition
/// run (interleaved, so host drift falls on all of them alike).
pub const SCHEME_ORDER: [Scheme; 5] = [
    Scheme::Native,
    Scheme::Krr,
    Scheme::WholeVmRr,
    Scheme::QemuTcg,
    Scheme::KrrUpstream,
];

/// The manifest name of a scheme (`whole-vm-rr`).
pub fn scheme_name(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Native => "native",
        Scheme::Krr => "krr",
        Scheme::WholeVmRr => "whole-vm-rr",
        Scheme::QemuTcg => "qemu-tcg",
        Scheme::KrrUpstream => "krr-upstream",
    }
}

fn parse_scheme(name: &str) -> Result<Scheme> {
    SCHEME_ORDER
        .into_iter()
        .find(|&s| scheme_name(s) == name)
        .ok_or_else(|| {
            let known: Vec<_> = SCHEME_ORDER.into_iter().map(scheme_name).collect();
            anyhow::anyhow!(
                "--schemes: unknown scheme `{name}` (expected one of {})",
                known.join(", ")
            )
        })
}

/// What the user asked for on the command line.
#[derive(Debug, Default, Clone)]
pub struct Request {
    pub workloads: Option<Vec<String>>,
    pub vcpus: Option<Vec<u32>>,
    pub schemes: Option<Vec<String>>,
    pub repetitions: Option<u32>,
    pub quick: bool,
    pub full: bool,
    /// Whether the host runs guests on hardware virtualization (the
    /// default vCPU axis is cut to 1 and 2 on the software CPU).
    pub hardware_kvm: bool,
    /// `--manifests`: extra manifest files or directories (absolute).
    pub manifests: Vec<PathBuf>,
    /// The workloads those files declare: run by default after the
    /// suite's (not with `--quick`).
    pub extra_workloads: Vec<String>,
    /// `--shard K/N`: run only this host's slice.
    pub shard: Option<Shard>,
}

/// The planned matrix; kept in the journal so `--resume` runs the same one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    pub suite: String,
    /// Per workload, in run order: its vCPU counts and repetitions.
    pub workloads: Vec<WorkloadPlan>,
    pub schemes: Vec<Scheme>,
    /// `--manifests` files or directories the workloads may come from,
    /// loaded again by `--resume`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifests: Vec<PathBuf>,
    /// The slice of the matrix this run covers (`--shard K/N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadPlan {
    pub name: String,
    pub vcpus: Vec<u32>,
    pub repetitions: u32,
}

/// One run of one scheme: the unit the journal records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub workload: String,
    pub scheme: Scheme,
    pub vcpus: u32,
    pub repetition: u32,
}

impl Cell {
    /// A stable name, also used for the cell's recording.
    pub fn key(&self) -> String {
        format!(
            "{}-{}-{}vcpu-rep{}",
            self.workload,
            scheme_name(self.scheme),
            self.vcpus,
            self.repetition
        )
    }
}

/// vCPU counts run by default where guests run on the software CPU, which
/// executes every vCPU on one host thread (about two hours for the suite).
const SOFTWARE_CPU_VCPUS: [u32; 2] = [1, 2];

/// The suite of kind `record-perf` (the first, when there are several).
pub fn suite(manifests: &Manifests) -> Result<&Suite> {
    manifests
        .suites
        .iter()
        .find(|s| s.kind == SuiteKind::RecordPerf)
        .ok_or_else(|| anyhow::anyhow!("no suite of kind `record-perf` in the manifests"))
}

pub fn plan(manifests: &Manifests, req: &Request) -> Result<Matrix> {
    let suite = suite(manifests)?;
    let names: Vec<String> = match (&req.workloads, req.quick) {
        (Some(names), _) => names.clone(),
        (None, true) if suite.quick.is_empty() => {
            bail!("suite `{}` lists no `quick` workloads", suite.name)
        }
        (None, true) => suite.quick.clone(),
        (None, false) => {
            let mut names = suite.workloads.clone();
            names.extend(
                req.extra_workloads
                    .iter()
                    .filter(|w| !names.contains(w))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
            names
        }
    };
    if names.is_empty() {
        bail!("--workloads: no workload named");
    }
    let mut workloads = Vec::new();
    for name in &names {
        let Some(w) = manifests.workload(name) else {
            let known: Vec<_> = manifests
                .workloads
                .iter()
                .map(|w| w.name.as_str())
                .collect();
            bail!(
                "--workloads: unknown workload `{name}` (the manifests define {})",
                known.join(", ")
            );
        };
        let vcpus: Vec<u32> = match &req.vcpus {
            Some(wanted) => {
                for v in wanted {
                    if !w.vcpus.contains(v) {
                        bail!(
                            "--vcpus: workload `{}` does not run on {v} vCPU(s) (its `vcpus` are {:?})",
                            w.name,
                            w.vcpus
                        );
                    }
                }
                wanted.clone()
            }
            None if req.quick => w.vcpus[..1].to_vec(),
            None if req.full || req.hardware_kvm => w.vcpus.clone(),
            None => w
                .vcpus
                .iter()
                .copied()
                .filter(|v| SOFTWARE_CPU_VCPUS.contains(v))
                .collect(),
        };
        if vcpus.is_empty() {
            bail!(
                "workload `{}` has no vCPU count to run here (its `vcpus` are {:?}; pass --vcpus or --full)",
                w.name,
                w.vcpus
            );
        }
        let repetitions = match (req.repetitions, req.quick) {
            (Some(0), _) => bail!("--repetitions: expected at least 1"),
            (Some(n), _) => n,
            (None, true) => 1,
            (None, false) => w.repetitions,
        };
        workloads.push(WorkloadPlan {
            name: w.name.clone(),
            vcpus,
            repetitions,
        });
    }
    let schemes = match &req.schemes {
        Some(names) => {
            let mut schemes = Vec::new();
            for name in names {
                let s = parse_scheme(name)?;
                if !schemes.contains(&s) {
                    schemes.push(s);
                }
            }
            schemes
        }
        None => suite.schemes.clone(),
    };
    if schemes.is_empty() {
        bail!("--schemes: no scheme named");
    }
    // Run order, whatever order they were named in.
    let schemes = SCHEME_ORDER
        .into_iter()
        .filter(|s| schemes.contains(s))
        .collect();
    let matrix = Matrix {
        suite: suite.name.clone(),
        workloads,
        schemes,
        manifests: req.manifests.clone(),
        shard: req.shard,
    };
    if let Some(shard) = req.shard {
        if matrix.cells().is_empty() {
            let pairs: usize = matrix.workloads.iter().map(|w| w.vcpus.len()).sum();
            bail!(
                "--shard {shard}: this shard has no cells (the matrix has {pairs} (workload, vCPUs) pair(s), dealt one per shard in turn)"
            );
        }
    }
    Ok(matrix)
}

impl Matrix {
    /// The cells this run covers, in run order: the whole matrix, or the
    /// shard's (workload, vCPUs) pairs.
    pub fn cells(&self) -> Vec<Cell> {
        let all = self.all_cells();
        match self.shard {
            Some(shard) => shard.slice(&all, |c| (c.workload.clone(), c.vcpus)),
            None => all,
        }
    }

    /// The whole matrix in run order: per workload and vCPU count,
    /// repetition by repetition, every scheme within a repetition.
    pub fn all_cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for w in &self.workloads {
            for &vcpus in &w.vcpus {
                for repetition in 1..=w.repetitions {
                    for &scheme in &self.schemes {
                        cells.push(Cell {
                            workload: w.name.clone(),
                            scheme,
                            vcpus,
                            repetition,
                        });
                    }
                }
            }
        }
        cells
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifests() -> Manifests {
        crate::manifests::load_repo().expect("the repository's manifests load")
    }

    #[test]
    fn the_default_matrix_fits_a_software_cpu_host() {
        let m = plan(&manifests(), &Request::default()).unwrap();
        assert!(m.workloads.len() >= 5);
        for w in &m.workloads {
            assert_eq!(w.vcpus, [1, 2], "{}", w.name);
        }
        let full = plan(
            &manifests(),
            &Request {
                full: true,
                ..Request::default()
            },
        )
        .unwrap();
        assert!(full.workloads.iter().any(|w| w.vcpus.contains(&8)));
    }

    #[test]
    fn quick_is_one_small_run_of_every_scheme() {
        let m = plan(
            &manifests(),
            &Request {
                quick: true,
                ..Request::default()
            },
        )
        .unwrap();
        let cells = m.cells();
        assert_eq!(cells.len(), m.schemes.len());
        assert!(cells.iter().all(|c| c.vcpus == 1 && c.repetition == 1));
        for s in [
            Scheme::Native,
            Scheme::Krr,
            Scheme::WholeVmRr,
            Scheme::QemuTcg,
        ] {
            assert!(m.schemes.contains(&s), "{}", scheme_name(s));
        }
    }

    #[test]
    fn schemes_are_interleaved_within_a_repetition() {
        let m = plan(
            &manifests(),
            &Request {
                workloads: Some(vec!["syscall-loop".into()]),
                vcpus: Some(vec![1]),
                schemes: Some(vec!["krr".into(), "native".into()]),
                repetitions: Some(2),
                ..Request::default()
            },
        )
        .unwrap();
        let keys: Vec<String> = m.cells().iter().map(Cell::key).collect();
        assert_eq!(
            keys,
            [
                "syscall-loop-native-1vcpu-rep1",
                "syscall-loop-krr-1vcpu-rep1",
                "syscall-loop-native-1vcpu-rep2",
                "syscall-loop-krr-1vcpu-rep2"
            ]
        );
    }

    #[test]
    fn shards_cover_the_matrix_once_with_each_pair_on_one_shard() {
        let m = manifests();
        let whole = plan(&m, &Request::default()).unwrap();
        let pairs: usize = whole.workloads.iter().map(|w| w.vcpus.len()).sum();
        for count in [1, 2, 3, pairs as u32] {
            let mut union: Vec<String> = Vec::new();
            let mut owner = std::collections::BTreeMap::new();
            for index in 1..=count {
                let shard = Shard { index, count };
                let part = plan(
                    &m,
                    &Request {
                        shard: Some(shard),
                        ..Request::default()
                    },
                )
                .unwrap();
                for c in part.cells() {
                    let previous = owner.insert((c.workload.clone(), c.vcpus), index);
                    assert!(
                        previous.is_none_or(|p| p == index),
                        "{} on {} vCPUs split between shards {previous:?} and {index} of {count}",
                        c.workload,
                        c.vcpus
                    );
                    union.push(c.key());
                }
            }
            let mut all: Vec<String> = whole.cells().iter().map(Cell::key).collect();
            all.sort();
            union.sort();
            assert_eq!(union, all, "{count} shards");
        }
        let too_many = Shard {
            index: pairs as u32 + 1,
            count: pairs as u32 + 1,
        };
        let err = plan(
            &m,
            &Request {
                shard: Some(too_many),
                ..Request::default()
            },
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("has no cells"), "{err:#}");
    }

    #[test]
    fn unknown_names_are_errors_that_name_them() {
        let m = manifests();
        let err = |req: Request| format!("{:#}", plan(&m, &req).unwrap_err());
        let e = err(Request {
            workloads: Some(vec!["no-such".into()]),
            ..Request::default()
        });
        assert!(e.contains("unknown workload `no-such`"), "{e}");
        let e = err(Request {
            schemes: Some(vec!["qemu".into()]),
            ..Request::default()
        });
        assert!(e.contains("unknown scheme `qemu`"), "{e}");
        let e = err(Request {
            vcpus: Some(vec![3]),
            ..Request::default()
        });
        assert!(e.contains("does not run on 3 vCPU(s)"), "{e}");
        let e = err(Request {
            repetitions: Some(0),
            ..Request::default()
        });
        assert!(e.contains("--repetitions"), "{e}");
    }
}
