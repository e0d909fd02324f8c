// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask eval record-perf|bug-repro`.
//!
//! `record-perf` runs KRR's recording-overhead experiment: every workload
//! of the suite under every scheme (native, krr, whole-VM RR, QEMU TCG),
//! interleaved per repetition, each cell a separate guest process measured
//! between console markers. Cells are journaled as they finish
//! (`runs.jsonl`), so `--resume` continues an interrupted eval; the
//! summary, report and figures are rebuilt from the journal at the end.

mod bug_repro;
mod cell;
pub(crate) mod figures;
pub(crate) mod journal;
mod merge;
mod plan;
mod process;
mod report;
pub(crate) mod shard;
mod summary;

use crate::{images, krr_bin, manifests, repo_root, setup};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use journal::{CellRecord, Entry, Journal, Provenance, Status};
use krr_orchestrator::manifest::{Manifests, Workload};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, ValueEnum)]
pub enum Experiment {
    /// Recording overhead on workloads: native vs krr vs whole-VM RR.
    RecordPerf,
    /// Record a bug, replay it, confirm the same failure.
    BugRepro,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BackendArg {
    Auto,
    Tcg,
    Kvm,
}

/// `cargo xtask eval` options.
#[derive(clap::Args)]
pub struct EvalArgs {
    #[arg(value_enum)]
    pub experiment: Experiment,
    /// Workloads to run (default: the suite's).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Option<Vec<String>>,
    /// Bugs to reproduce (`bug-repro`; default: the suite's).
    #[arg(long, value_delimiter = ',')]
    pub bugs: Option<Vec<String>>,
    /// vCPU counts (default: 1 and 2 on the software CPU, each workload's
    /// own axis with hardware KVM or --full).
    #[arg(long, value_delimiter = ',')]
    pub vcpus: Option<Vec<u32>>,
    /// Schemes: native, krr, whole-vm-rr, qemu-tcg, krr-upstream (default:
    /// the suite's).
    #[arg(long, value_delimiter = ',')]
    pub schemes: Option<Vec<String>>,
    /// Repetitions of every configuration (default: each workload's).
    #[arg(long)]
    pub repetitions: Option<u32>,
    /// The suite's small workloads, 1 vCPU, 1 repetition, every scheme.
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// Every workload's whole vCPU axis (1, 2, 4, 8).
    #[arg(long)]
    pub full: bool,
    /// Results directory (default: results/record-perf/<UTC time>).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted eval: its directory, or `latest`.
    #[arg(long, value_name = "DIR|latest")]
    pub resume: Option<String>,
    /// CPU backend of the engine's schemes.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Extra manifest files or directories (repeatable): workloads or bug
    /// cases of your own, run after the suite's; paths inside them are
    /// relative to the file.
    #[arg(long, value_name = "PATH")]
    pub manifests: Vec<PathBuf>,
    /// Run shard K of N (1 <= K <= N): a deterministic slice for one of N
    /// hosts, every scheme of a (workload, vCPUs) pair (record-perf) or a
    /// whole bug (bug-repro) on one host; `cargo xtask results merge`
    /// joins the N results directories.
    #[arg(long, value_name = "K/N", conflicts_with = "resume")]
    pub shard: Option<shard::Shard>,
}

impl EvalArgs {
    /// `eval record-perf --quick --out OUT`.
    pub fn quick(out: PathBuf) -> EvalArgs {
        EvalArgs {
            experiment: Experiment::RecordPerf,
            workloads: None,
            bugs: None,
            vcpus: None,
            schemes: None,
            repetitions: None,
            quick: true,
            full: false,
            out: Some(out),
            resume: None,
            backend: BackendArg::Auto,
            manifests: Vec::new(),
            shard: None,
        }
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    match args.experiment {
        Experiment::RecordPerf => record_perf(&args),
        Experiment::BugRepro => bug_repro::run(&args),
    }
}

fn results_root() -> PathBuf {
    repo_root().join("results/record-perf")
}

fn backend_name(b: BackendArg) -> &'static str {
    match b {
        BackendArg::Auto => "auto",
        BackendArg::Tcg => "tcg",
        BackendArg::Kvm => "kvm",
    }
}

/// `--resume DIR|latest` (`latest` under `root`) as a directory holding
/// `journal_file`.
pub(crate) fn resume_dir(arg: &str, root: &Path, journal_file: &str) -> Result<PathBuf> {
    let dir = if arg == "latest" {
        let link = root.join("latest");
        std::fs::canonicalize(&link)
            .with_context(|| format!("--resume latest: {} does not exist", link.display()))?
    } else {
        PathBuf::from(arg)
    };
    if !dir.join(journal_file).is_file() {
        bail!("--resume {arg}: {} holds no {journal_file}", dir.display());
    }
    Ok(dir)
}

/// The results directory of a new eval: `--out DIR` (which must not hold
/// an eval already), or a new one under `root` named by the UTC time, with
/// `root/latest` pointing at it.
pub(crate) fn output_dir(out: Option<&Path>, root: &Path, journal_file: &str) -> Result<PathBuf> {
    if let Some(out) = out {
        if out.join(journal_file).exists() {
            bail!(
                "--out {}: it holds an eval already; continue it with --resume {}",
                out.display(),
                out.display()
            );
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        return Ok(out.to_path_buf());
    }
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let dir = root.join(&stamp);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let latest = root.join("latest");
    let _ = std::fs::remove_file(&latest);
    std::os::unix::fs::symlink(&stamp, &latest)
        .with_context(|| format!("linking {}", latest.display()))?;
    Ok(dir)
}

/// Set by Ctrl-C. The running guest process gets it forwarded to its
/// process group (a recording is closed properly; anything still running a
/// minute later is killed), and the eval stops with a resumable journal.
pub(crate) fn ctrl_c_flag() -> Result<Arc<AtomicBool>> {
    let interrupt = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupt.clone())
        .context("installing the SIGINT handler")?;
    Ok(interrupt)
}

/// `dir/recordings`, created.
fn recordings_dir(dir: &Path) -> Result<PathBuf> {
    let recordings = dir.join("recordings");
    std::fs::create_dir_all(&recordings)
        .with_context(|| format!("creating {}", recordings.display()))?;
    Ok(recordings)
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| format!("unknown ({program} failed)"))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn project_commit() -> String {
    let root = repo_root().display().to_string();
    let commit = command_output("git", &["-C", &root, "rev-parse", "HEAD"]);
    let dirty = !command_output("git", &["-C", &root, "status", "--porcelain"]).is_empty();
    if dirty {
        format!("{commit} (with uncommitted changes)")
    } else {
        commit
    }
}

const QEMU: &str = "qemu-system-x86_64";

/// Image name -> file name -> sha256.
type ImageDigests = BTreeMap<String, BTreeMap<String, String>>;

/// The files of every workload in the matrix, built or taken from the
/// cache, and their sha256 for the provenance.
fn workload_images(
    manifests: &Manifests,
    workloads: &[&Workload],
) -> Result<(BTreeMap<String, cell::GuestImages>, ImageDigests)> {
    let mut names: Vec<String> = Vec::new();
    for w in workloads {
        names.push(w.kernel.clone());
        names.extend(w.initramfs.clone());
        names.extend(w.rootfs.clone());
        if !w.disks.is_empty() {
            bail!(
                "workload `{}`: extra `disks` are not supported by the eval yet",
                w.name
            );
        }
    }
    names.sort();
    names.dedup();
    for n in &names {
        if manifests.image(n).is_none() {
            bail!("image `{n}` is not defined in the manifests");
        }
    }
    let built = images::build_from(manifests, &names, false)?;
    let mut out = BTreeMap::new();
    for w in workloads {
        let images = cell::GuestImages::from_built(
            &built,
            &w.kernel,
            w.initramfs.as_deref(),
            w.rootfs.as_deref(),
        )?;
        out.insert(w.name.clone(), images);
    }
    let shas = built
        .iter()
        .map(|b| {
            let files = b
                .files
                .iter()
                .filter(|(name, _)| name.as_str() != "config" && name.as_str() != "System.map")
                .map(|(name, f)| (name.clone(), f.sha256.clone()))
                .collect();
            (b.name.clone(), files)
        })
        .collect();
    Ok((out, shas))
}

/// `--manifests` paths made absolute, so a resumed eval finds them from
/// anywhere.
fn absolute_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    paths
        .iter()
        .map(|p| {
            p.canonicalize()
                .with_context(|| format!("--manifests {}", p.display()))
        })
        .collect()
}

fn record_perf(args: &EvalArgs) -> Result<()> {
    setup::ensure()?;
    let resumed_journal = match &args.resume {
        Some(arg) => {
            let dir = resume_dir(arg, &results_root(), journal::JOURNAL_FILE)?;
            let entries = journal::read(&dir)?;
            let matrix = journal::first_provenance(&entries)
                .with_context(|| format!("{}: the journal has no provenance line", dir.display()))?
                .matrix
                .clone();
            Some((dir, matrix))
        }
        None => None,
    };
    let extra = match &resumed_journal {
        Some((_, matrix)) => matrix.manifests.clone(),
        None => absolute_paths(&args.manifests)?,
    };
    let manifests = manifests::load_with(&extra)?;
    let suite = plan::suite(&manifests)?.clone();
    let krr = krr_bin::build()?;
    let probe = krr_bin::run_json(
        &krr,
        &["backend", "--json", "--backend", backend_name(args.backend)],
    )?;
    let backend = probe["backend"].as_str().unwrap_or("unknown").to_string();
    let backend_reason = probe["reason"].as_str().unwrap_or("").to_string();

    let (dir, matrix, resumed) = match resumed_journal {
        Some((dir, matrix)) => {
            if args.workloads.is_some()
                || args.vcpus.is_some()
                || args.schemes.is_some()
                || args.repetitions.is_some()
                || args.quick
                || args.full
                || !args.manifests.is_empty()
            {
                bail!("--resume continues the eval's own matrix: drop --workloads, --vcpus, --schemes, --repetitions, --quick, --full and --manifests");
            }
            (dir, matrix, true)
        }
        None => {
            let (extra_workloads, _) = manifests::declared_by_extra(&manifests, &extra)?;
            let req = plan::Request {
                workloads: args.workloads.clone(),
                vcpus: args.vcpus.clone(),
                schemes: args.schemes.clone(),
                repetitions: args.repetitions,
                quick: args.quick,
                full: args.full,
                hardware_kvm: backend == "kvm",
                manifests: extra.clone(),
                extra_workloads,
                shard: args.shard,
            };
            let matrix = plan::plan(&manifests, &req)?;
            let dir = output_dir(args.out.as_deref(), &results_root(), journal::JOURNAL_FILE)?;
            (dir, matrix, false)
        }
    };

    let workloads: Vec<&Workload> = matrix
        .workloads
        .iter()
        .map(|p| {
            manifests
                .workload(&p.name)
                .with_context(|| format!("workload `{}` is no longer in the manifests", p.name))
        })
        .collect::<Result<_>>()?;
    for w in &workloads {
        cell::guest_command(w)?;
    }
    let (guest_images, image_shas) = workload_images(&manifests, &workloads)?;
    let qemu_version = command_output(QEMU, &["--version"])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let provenance = Provenance {
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        resumed,
        project_commit: project_commit(),
        host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu_model: cpu_model(),
        host_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        qemu_version,
        backend: backend.clone(),
        backend_reason,
        images: image_shas,
        matrix: matrix.clone(),
    };
    let mut journal = Journal::open(&dir)?;
    journal.append(&Entry::Provenance(Box::new(provenance.clone())))?;

    let cells = matrix.cells();
    let done: HashSet<String> = journal::cells(&journal::read(&dir)?)
        .into_iter()
        .map(|c| c.key)
        .collect();
    let todo: Vec<&plan::Cell> = cells.iter().filter(|c| !done.contains(&c.key())).collect();
    eprintln!(
        "record-perf: {} cell(s) planned{}, {} to run, results in {}",
        cells.len(),
        matrix
            .shard
            .map(|s| format!(" (shard {s} of {} in all)", matrix.all_cells().len()))
            .unwrap_or_default(),
        todo.len(),
        dir.display()
    );

    let interrupt = ctrl_c_flag()?;
    let recordings = recordings_dir(&dir)?;
    let ctx = cell::Harness {
        krr: krr.clone(),
        qemu: PathBuf::from(QEMU),
        backend: backend_name(args.backend).to_string(),
        recordings: recordings.clone(),
        interrupt: &interrupt,
    };
    let bar = ProgressBar::new(cells.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} cells  {msg}  [{elapsed_precise}, ETA {eta}]",
        )
        .expect("a valid template"),
    );
    bar.set_position((cells.len() - todo.len()) as u64);
    let mut failed_now = Vec::new();
    for c in todo {
        bar.set_message(c.key());
        let w = workloads
            .iter()
            .find(|w| w.name == c.workload)
            .expect("planned from these workloads");
        let rec = cell::run(&ctx, w, &guest_images[&c.workload], c)?;
        if interrupt.load(Ordering::SeqCst) {
            say(&bar, format!("{}: interrupted; not journaled", c.key()));
            break;
        }
        match rec.status {
            Some(Status::Ok) => say(
                &bar,
                format!(
                    "{}: {:.2} s{}",
                    rec.key,
                    rec.wall_seconds.unwrap_or(f64::NAN),
                    rec.replay_verdict
                        .as_ref()
                        .map(|v| format!(", replay {v}"))
                        .unwrap_or_default()
                ),
            ),
            Some(Status::Unsupported) => say(
                &bar,
                format!(
                    "{}: unsupported: {}",
                    rec.key,
                    rec.reason.as_deref().unwrap_or("")
                ),
            ),
            _ => {
                say(
                    &bar,
                    format!(
                        "{}: FAILED: {}",
                        rec.key,
                        rec.reason.as_deref().unwrap_or("")
                    ),
                );
                failed_now.push(rec.key.clone());
            }
        }
        journal.append(&Entry::Cell(Box::new(rec)))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir(&recordings);

    let all = journal::cells(&journal::read(&dir)?);
    let interrupted = interrupt.load(Ordering::SeqCst);
    let figures = write_results(&dir, &provenance, &[], &all, cells.len(), &suite)?;
    eprintln!(
        "record-perf: report {} (figures: {})",
        dir.join(report::REPORT_FILE).display(),
        figures.join(", ")
    );
    let failed: Vec<&CellRecord> = all
        .iter()
        .filter(|c| c.status == Some(Status::Failed))
        .collect();
    if interrupted {
        bail!(
            "interrupted: {} of {} cells done; continue with `cargo xtask eval record-perf --resume {}`",
            all.len(),
            cells.len(),
            dir.display()
        );
    }
    if !failed.is_empty() {
        let keys: Vec<&str> = failed.iter().map(|c| c.key.as_str()).collect();
        bail!(
            "{} cell(s) failed ({}); reasons in {}",
            failed.len(),
            keys.join(", "),
            dir.join(report::REPORT_FILE).display()
        );
    }
    Ok(())
}

/// A line above the progress bar, or on stderr where the bar is hidden (no
/// terminal: CI logs).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// Writes summary.csv, the figures and report.md from the journal's cells;
/// returns the figure files' names.
fn write_results(
    dir: &Path,
    provenance: &Provenance,
    shards: &[Provenance],
    cells: &[CellRecord],
    planned: usize,
    suite: &krr_orchestrator::manifest::Suite,
) -> Result<Vec<String>> {
    let summary = summary::Summary::of(cells);
    summary.write_csv(dir)?;
    let figures = match figures::write(dir, &summary, suite.targets.krr_vs_native) {
        Ok(files) => files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect(),
        Err(e) => {
            eprintln!("record-perf: no figures: {e:#}");
            Vec::new()
        }
    };
    let shown: Vec<String> = figures
        .iter()
        .filter(|f| f.ends_with(".png"))
        .cloned()
        .collect();
    report::write(
        dir,
        provenance,
        shards,
        cells,
        planned,
        &suite.targets,
        &shown,
    )?;
    Ok(figures)
}

pub use bug_repro::check_results as check_bug_results;
pub use merge::merge;

/// Checks the files of a finished `record-perf` eval in `dir`: the journal
/// parses and holds every planned cell, each succeeded (or its scheme
/// refused it, with a reason) with positive numbers, every `krr` recording
/// replayed matched, the report names every cell, and the figures are
/// non-empty. `cargo xtask test` runs it on `eval record-perf --quick`.
pub fn check_results(dir: &Path) -> Result<()> {
    let entries = journal::read(dir)?;
    let provenance = journal::first_provenance(&entries)
        .with_context(|| format!("{}: no provenance line", dir.display()))?;
    let cells = journal::cells(&entries);
    let report = std::fs::read_to_string(dir.join(report::REPORT_FILE))
        .with_context(|| format!("reading {}", dir.join(report::REPORT_FILE).display()))?;
    let mut problems = Vec::new();
    for planned in provenance.matrix.cells() {
        let key = planned.key();
        let Some(c) = cells.iter().find(|c| c.key == key) else {
            problems.push(format!("{key}: not in the journal"));
            continue;
        };
        if !report.contains(&format!("| {key} |")) {
            problems.push(format!("{key}: not named in the report"));
        }
        match c.status {
            Some(Status::Ok) => {}
            Some(Status::Unsupported) if c.reason.is_some() => continue,
            _ => {
                problems.push(format!("{key}: {:?}: {:?}", c.status, c.reason));
                continue;
            }
        }
        let positive = |name: &str, v: Option<f64>| match v {
            Some(v) if v > 0.0 && v.is_finite() => None,
            other => Some(format!(
                "{key}: {name} is {other:?}, expected a positive number"
            )),
        };
        problems.extend(positive("wall_seconds", c.wall_seconds));
        problems.extend(positive("process_wall_seconds", c.process_wall_seconds));
        for (name, v) in &c.metrics {
            problems.extend(positive(name, Some(*v)));
        }
        if matches!(
            planned.scheme,
            krr_orchestrator::manifest::Scheme::Native | krr_orchestrator::manifest::Scheme::Krr
        ) && provenance.backend == "tcg"
        {
            problems.extend(positive(
                "guest_instructions",
                c.guest_instructions.map(|i| i as f64),
            ));
        }
        if planned.scheme == krr_orchestrator::manifest::Scheme::Krr {
            problems.extend(positive("replay_seconds", c.replay_seconds));
            problems.extend(positive("log_bytes", c.log_bytes.map(|b| b as f64)));
            if c.replay_verdict.as_deref() != Some("matched") {
                problems.push(format!("{key}: replay {:?}", c.replay_verdict));
            }
        }
    }
    for name in [
        "summary.csv",
        "slowdown.png",
        "slowdown.svg",
        "throughput.png",
        "throughput.svg",
    ] {
        match std::fs::metadata(dir.join(name)) {
            Ok(m) if m.len() > 0 => {}
            _ => problems.push(format!("{name}: missing or empty")),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}: {} problem(s):\n  {}",
            dir.display(),
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok(())
}
