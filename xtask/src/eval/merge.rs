// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask results merge DIR... --out DIR`: one report from the
//! results directories of the N shards of one eval (`--shard K/N` on N
//! hosts). The shards must be exactly 1/N..N/N of the same matrix (or bug
//! list) measuring the same images with the same backend; the merged
//! directory holds the union's journal, summary, figures and report, the
//! report naming the host of every shard.

use super::bug_repro::{self, BugRecord, RunPlan, BUGS_FILE, PLAN_FILE};
use super::journal::{self, CellRecord, Entry, Journal, Provenance, JOURNAL_FILE};
use super::shard::{self, Shard};
use crate::manifests;
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<()> {
    if dirs.is_empty() {
        bail!("results merge: name the shards' results directories");
    }
    let kind_of = |d: &PathBuf| {
        if d.join(JOURNAL_FILE).is_file() {
            Ok("record-perf")
        } else if d.join(BUGS_FILE).is_file() {
            Ok("bug-repro")
        } else {
            bail!(
                "{}: holds neither {JOURNAL_FILE} (record-perf) nor {BUGS_FILE} (bug-repro)",
                d.display()
            )
        }
    };
    let kind = kind_of(&dirs[0])?;
    for d in dirs {
        if kind_of(d)? != kind {
            bail!(
                "{}: a {} eval, but {} is a {kind} eval",
                d.display(),
                kind_of(d)?,
                dirs[0].display()
            );
        }
    }
    if out.join(JOURNAL_FILE).exists() || out.join(BUGS_FILE).exists() {
        bail!("--out {}: it holds an eval already", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    match kind {
        "record-perf" => merge_record_perf(dirs, out),
        _ => merge_bug_repro(dirs, out),
    }?;
    eprintln!(
        "results merge: {} shard(s) of {kind} merged into {} (report.md)",
        dirs.len(),
        out.display()
    );
    Ok(())
}

fn merge_record_perf(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let mut shards: Vec<(Provenance, Vec<CellRecord>)> = Vec::new();
    for d in dirs {
        let entries = journal::read(d)?;
        let p = journal::first_provenance(&entries)
            .with_context(|| format!("{}: the journal has no provenance line", d.display()))?
            .clone();
        shards.push((p, journal::cells(&entries)));
    }
    let named: Vec<(String, Option<Shard>)> = dirs
        .iter()
        .zip(&shards)
        .map(|(d, (p, _))| (d.display().to_string(), p.matrix.shard))
        .collect();
    shard::check_complete(&named)?;
    shards.sort_by_key(|(p, _)| p.matrix.shard.map(|s| s.index));

    let first = &shards[0].0;
    let whole = |p: &Provenance| {
        let mut m = p.matrix.clone();
        m.shard = None;
        m
    };
    for ((p, cells), (dir, _)) in shards.iter().zip(&named) {
        let what = if whole(p) != whole(first) {
            Some("a different matrix")
        } else if p.images != first.images {
            Some("different guest images")
        } else if p.backend != first.backend {
            Some("a different backend")
        } else {
            None
        };
        if let Some(what) = what {
            bail!(
                "{dir}: shard {} ran {what} than shard {}: not shards of one eval",
                p.matrix.shard.expect("checked complete"),
                first.matrix.shard.expect("checked complete")
            );
        }
        let own: HashSet<String> = p.matrix.cells().iter().map(|c| c.key()).collect();
        if let Some(stray) = cells.iter().find(|c| !own.contains(&c.key)) {
            bail!(
                "{dir}: cell {} is not in shard {}'s slice",
                stray.key,
                p.matrix.shard.expect("checked complete")
            );
        }
    }

    let matrix = whole(first);
    let order: Vec<String> = matrix.cells().iter().map(|c| c.key()).collect();
    let mut cells: Vec<CellRecord> = shards.iter().flat_map(|(_, c)| c.clone()).collect();
    cells.sort_by_key(|c| order.iter().position(|k| *k == c.key));
    let merged = Provenance {
        started_at: shards
            .iter()
            .map(|(p, _)| p.started_at.clone())
            .min()
            .expect("at least one shard"),
        resumed: false,
        matrix: matrix.clone(),
        ..first.clone()
    };
    let shard_provenances: Vec<Provenance> = shards.iter().map(|(p, _)| p.clone()).collect();

    let mut journal = Journal::open(out)?;
    journal.append(&Entry::Provenance(Box::new(merged.clone())))?;
    for c in &cells {
        journal.append(&Entry::Cell(Box::new(c.clone())))?;
    }
    let manifests = manifests::load_with(&matrix.manifests)?;
    let suite = super::plan::suite(&manifests)?;
    super::write_results(out, &merged, &shard_provenances, &cells, order.len(), suite)?;
    Ok(())
}

fn merge_bug_repro(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let mut plans: Vec<(RunPlan, Vec<BugRecord>)> = Vec::new();
    for d in dirs {
        let file = d.join(PLAN_FILE);
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let plan: RunPlan = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", file.display()))?;
        let bugs = bug_repro::latest_per_bug(journal::read_lines(&d.join(BUGS_FILE))?);
        plans.push((plan, bugs));
    }
    let named: Vec<(String, Option<Shard>)> = dirs
        .iter()
        .zip(&plans)
        .map(|(d, (p, _))| (d.display().to_string(), p.shard))
        .collect();
    shard::check_complete(&named)?;
    let first = &plans[0].0;
    for ((plan, bugs), (dir, _)) in plans.iter().zip(&named) {
        if plan.bugs != first.bugs || plan.manifests != first.manifests {
            bail!(
                "{dir}: its bug list differs from {}'s: not shards of one eval",
                named[0].0
            );
        }
        let own = plan.own_bugs();
        if let Some(stray) = bugs.iter().find(|b| !own.contains(&b.id)) {
            bail!(
                "{dir}: bug {} is not in shard {}'s slice",
                stray.id,
                plan.shard.expect("checked complete")
            );
        }
    }
    let mut bugs: Vec<BugRecord> = plans.iter().flat_map(|(_, b)| b.clone()).collect();
    bugs.sort_by_key(|b| first.bugs.iter().position(|id| *id == b.id));
    let plan = RunPlan {
        bugs: first.bugs.clone(),
        manifests: first.manifests.clone(),
        shard: None,
    };
    let plan_file = out.join(PLAN_FILE);
    std::fs::write(&plan_file, serde_json::to_vec_pretty(&plan)?)
        .with_context(|| format!("writing {}", plan_file.display()))?;
    let mut journal = Journal::open_file(&out.join(BUGS_FILE))?;
    for b in &bugs {
        journal.append(b)?;
    }
    bug_repro::write_results(out, &bugs)
}

#[cfg(test)]
mod tests {
    use super::super::journal::Status;
    use super::super::plan::{self, scheme_name, Request};
    use super::super::report::REPORT_FILE;
    use super::*;
    use std::collections::BTreeMap;

    fn provenance(shard: Option<Shard>, host: &str) -> Provenance {
        let m = manifests::load_repo().unwrap();
        let matrix = plan::plan(
            &m,
            &Request {
                workloads: Some(vec!["syscall-loop".into(), "make-project".into()]),
                repetitions: Some(2),
                shard,
                ..Request::default()
            },
        )
        .unwrap();
        Provenance {
            started_at: "2026-12-06T10:00:00Z".into(),
            resumed: false,
            project_commit: "abc".into(),
            host_kernel: "6.1.0".into(),
            cpu_model: host.into(),
            host_cpus: 32,
            qemu_version: "QEMU emulator version 7.2".into(),
            backend: "kvm".into(),
            backend_reason: "hardware".into(),
            images: BTreeMap::from([("k".into(), BTreeMap::from([("f".into(), "00".into())]))]),
            matrix,
        }
    }

    /// A finished cell with numbers that depend on its key only.
    fn cell(c: &plan::Cell) -> CellRecord {
        let n = c.key().bytes().map(u64::from).sum::<u64>() % 97 + 3;
        let krr = scheme_name(c.scheme) == "krr";
        CellRecord {
            key: c.key(),
            workload: c.workload.clone(),
            scheme: scheme_name(c.scheme).into(),
            vcpus: c.vcpus,
            repetition: c.repetition,
            status: Some(Status::Ok),
            wall_seconds: Some(n as f64 / 7.0),
            process_wall_seconds: Some(n as f64 / 5.0),
            guest_instructions: Some(n * 1_000_003),
            replay_seconds: krr.then_some(n as f64 / 11.0),
            replay_verdict: krr.then(|| "matched".into()),
            log_bytes: krr.then_some(n * 4096),
            ..CellRecord::default()
        }
    }

    fn write_journal(dir: &Path, p: &Provenance, cells: &[CellRecord]) {
        let mut j = Journal::open(dir).unwrap();
        j.append(&Entry::Provenance(Box::new(p.clone()))).unwrap();
        for c in cells {
            j.append(&Entry::Cell(Box::new(c.clone()))).unwrap();
        }
    }

    fn from_how(report: &str) -> &str {
        &report[report.find("## How").expect("a How section")..]
    }

    #[test]
    fn merged_shards_report_what_their_union_reports() {
        let tmp = tempfile::tempdir().unwrap();
        let whole = provenance(None, "host-1");
        let all: Vec<CellRecord> = whole.matrix.cells().iter().map(cell).collect();
        let union = tmp.path().join("union");
        std::fs::create_dir(&union).unwrap();
        write_journal(&union, &whole, &all);
        let m = manifests::load_repo().unwrap();
        super::super::write_results(
            &union,
            &whole,
            &[],
            &all,
            all.len(),
            plan::suite(&m).unwrap(),
        )
        .unwrap();

        let count = 3;
        let mut dirs = Vec::new();
        // Shards listed out of order, as a user's shell glob may.
        for index in [2, 3, 1] {
            let p = provenance(Some(Shard { index, count }), &format!("host-{index}"));
            let cells: Vec<CellRecord> = p.matrix.cells().iter().map(cell).collect();
            let dir = tmp.path().join(format!("shard-{index}"));
            std::fs::create_dir(&dir).unwrap();
            write_journal(&dir, &p, &cells);
            dirs.push(dir);
        }
        let out = tmp.path().join("merged");
        merge(&dirs, &out).unwrap();
        super::super::check_results(&out).unwrap();
        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        assert_eq!(read(&out, "summary.csv"), read(&union, "summary.csv"));
        let (merged, whole_report) = (read(&out, REPORT_FILE), read(&union, REPORT_FILE));
        assert_eq!(from_how(&merged), from_how(&whole_report));
        for index in 1..=count {
            assert!(
                merged.contains(&format!("  - shard {index}/3: host-{index} (32 CPUs)")),
                "{merged}"
            );
        }

        // A second merge into the same place, or without every shard, is refused.
        let err = format!("{:#}", merge(&dirs, &out).unwrap_err());
        assert!(err.contains("holds an eval already"), "{err}");
        let err = format!(
            "{:#}",
            merge(&dirs[..2], &tmp.path().join("partial")).unwrap_err()
        );
        assert!(err.contains("shard(s) 1/3 missing"), "{err}");
        // A shard of another matrix is not part of this eval.
        let mut other = provenance(Some(Shard { index: 1, count }), "host-1");
        other.matrix.workloads[0].repetitions = 5;
        let odd = tmp.path().join("odd");
        std::fs::create_dir(&odd).unwrap();
        write_journal(&odd, &other, &[]);
        let err = format!(
            "{:#}",
            merge(
                &[dirs[0].clone(), dirs[1].clone(), odd],
                &tmp.path().join("odd-merged")
            )
            .unwrap_err()
        );
        assert!(err.contains("a different matrix"), "{err}");
    }

    #[test]
    fn merged_bug_shards_hold_every_bug_in_plan_order() {
        let tmp = tempfile::tempdir().unwrap();
        let bugs: Vec<String> = ["b1", "b2", "b3", "b4", "b5"].map(String::from).into();
        let mut dirs = Vec::new();
        for index in [2, 1] {
            let plan = RunPlan {
                bugs: bugs.clone(),
                manifests: Vec::new(),
                shard: Some(Shard { index, count: 2 }),
            };
            let dir = tmp.path().join(format!("s{index}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join(PLAN_FILE), serde_json::to_vec(&plan).unwrap()).unwrap();
            let mut j = Journal::open_file(&dir.join(BUGS_FILE)).unwrap();
            for id in plan.own_bugs() {
                j.append(&BugRecord {
                    id: id.clone(),
                    title: format!("bug {id}"),
                    verdict: Some(bug_repro::Verdict::Reproduced),
                    ..BugRecord::default()
                })
                .unwrap();
            }
            dirs.push(dir);
        }
        let out = tmp.path().join("merged");
        merge(&dirs, &out).unwrap();
        let merged: Vec<String> = journal::read_lines::<BugRecord>(&out.join(BUGS_FILE))
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(merged, bugs);
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        for id in &bugs {
            assert!(report.contains(&format!("## {id}")), "{report}");
        }
    }
}
