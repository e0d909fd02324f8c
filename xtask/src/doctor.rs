// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask doctor`: what this host offers the project (hardware KVM or
//! not and why, a PMU and its counters, SMT, cores, free disk, host packages,
//! the pinned Debian packages), which backend each command will use, and one
//! line of advice per problem. Facts come from sysfs and procfs under a root
//! directory, so the verdicts are tested on synthetic hosts; the backend
//! decision is the engine's own (`krr backend --json`).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How a finding weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works, but measurements or a feature suffer.
    Warn,
    /// Something a command needs is missing.
    Problem,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub topic: &'static str,
    pub level: Level,
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

fn finding(topic: &'static str, level: Level, what: String, advice: Option<&str>) -> Finding {
    Finding {
        topic,
        level,
        what,
        advice: advice.map(str::to_owned),
    }
}

/// Free space the images, builds and a full evaluation need (the kernels'
/// build trees are most of it).
const DISK_NEEDED_GIB: u64 = 40;

/// What the engine says about this host (`krr backend --json`): its
/// verdicts are the ones every command acts on, so doctor repeats them
/// rather than judging again.
#[derive(Debug, Clone)]
pub struct EngineView {
    pub backend: String,
    pub reason: String,
    /// `hardware`, `software-hypervisor` or `absent`.
    pub kvm_verdict: String,
    pub kvm_reason: String,
    /// How KVM would position asynchronous events: `pmu-counted` or
    /// `deterministic-points`, and the engine's description.
    pub async_events: String,
    pub async_events_detail: String,
}

impl EngineView {
    pub fn from_json(v: &serde_json::Value) -> Result<EngineView> {
        let field = |path: &[&str]| -> Result<String> {
            let mut at = v;
            for p in path {
                at = &at[*p];
            }
            at.as_str().map(str::to_owned).with_context(|| {
                format!(
                    "`krr backend --json` has no string `{}`: {v}",
                    path.join(".")
                )
            })
        };
        Ok(EngineView {
            backend: field(&["backend"])?,
            reason: field(&["reason"])?,
            kvm_verdict: field(&["kvm", "verdict"])?,
            kvm_reason: field(&["kvm", "reason"])?,
            async_events: field(&["kvm_async_events", "mode"])?,
            async_events_detail: field(&["kvm_async_events", "detail"])?,
        })
    }

    /// Asks the engine (built first if needed).
    pub fn ask() -> Result<EngineView> {
        let krr = crate::krr_bin::build()?;
        EngineView::from_json(&crate::krr_bin::run_json(&krr, &["backend", "--json"])?)
    }
}

/// The host facts under `root` (`/` for this host).
pub struct Host {
    root: PathBuf,
}

impl Host {
    pub fn at(root: impl Into<PathBuf>) -> Host {
        Host { root: root.into() }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.path(p))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// CPU model, logical CPUs and physical cores, and SMT.
    pub fn cpu(&self) -> Vec<Finding> {
        let info = self.read("proc/cpuinfo").unwrap_or_default();
        let model = info
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let logical = info.lines().filter(|l| l.starts_with("processor")).count();
        let mut cores = std::collections::BTreeSet::new();
        let mut package = String::new();
        for l in info.lines() {
            if let Some(v) = l.strip_prefix("physical id") {
                package = v.trim_start_matches([' ', '\t', ':']).to_owned();
            } else if let Some(v) = l.strip_prefix("core id") {
                cores.insert((
                    package.clone(),
                    v.trim_start_matches([' ', '\t', ':']).to_owned(),
                ));
            }
        }
        let physical = if cores.is_empty() {
            logical
        } else {
            cores.len()
        };
        let mut out = vec![finding(
            "cpu",
            if logical >= 2 { Level::Ok } else { Level::Warn },
            format!("{model}: {logical} logical CPUs, {physical} cores"),
            (logical < 2).then_some(
                "one CPU: recording's log writer and snapshot threads share it with the guest",
            ),
        )];
        let smt = self.read("sys/devices/system/cpu/smt/control");
        out.push(match smt.as_deref() {
            Some("on") => finding(
                "smt",
                Level::Warn,
                "SMT is on".into(),
                Some("KRR measured with SMT off: echo off | sudo tee /sys/devices/system/cpu/smt/control (the CloudLab setup's krr-host-tuning unit does it at every boot)"),
            ),
            Some(v) => finding("smt", Level::Ok, format!("SMT control: {v}"), None),
            None => finding("smt", Level::Ok, "no SMT control in sysfs".into(), None),
        });
        out
    }

    /// What `/dev/kvm` is, as the engine judged it (`krr backend --json`'s
    /// `kvm`), with advice from this host's CPU flags and modules.
    pub fn kvm(&self, engine: &EngineView) -> Finding {
        let module = |m: &str| self.path("sys/module").join(m).exists();
        let flags = self
            .read("proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default();
        let has = |f: &str| flags.iter().any(|x| x == f);
        let load_module = if has("vmx") {
            "the CPU has VT-x: sudo modprobe kvm_intel"
        } else if has("svm") {
            "the CPU has AMD-V: sudo modprobe kvm_amd"
        } else {
            "no VT-x/AMD-V on this CPU (a cloud VM without nested virtualization?): the software CPU runs everything"
        };
        let what = format!(
            "{} (engine verdict: {})",
            engine.kvm_reason, engine.kvm_verdict
        );
        match engine.kvm_verdict.as_str() {
            "hardware" => finding("kvm", Level::Ok, what, None),
            "absent" => finding("kvm", Level::Warn, what, Some(load_module)),
            _ if module("kvm_pvm") => finding(
                "kvm",
                Level::Warn,
                what,
                Some("PVM emulates guest ring 0 at about 1 M instructions/s and has no PMU: Linux guests run on the software CPU here; KVM numbers need a VT-x/AMD-V host (CloudLab c6420 or c220g5)"),
            ),
            _ => finding("kvm", Level::Warn, what, Some(load_module)),
        }
    }

    /// The CPU's PMU (KVM positions asynchronous events with it) and
    /// whether this user may open its counters.
    pub fn pmu(&self) -> Vec<Finding> {
        let devices = self.path("sys/bus/event_source/devices");
        let pmu = ["cpu", "cpu_core"]
            .into_iter()
            .map(|d| devices.join(d))
            .find(|d| d.exists());
        let mut out = Vec::new();
        match pmu {
            None => {
                let found: Vec<String> = std::fs::read_dir(&devices)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(finding(
                    "pmu",
                    Level::Warn,
                    format!(
                        "no CPU PMU (event sources: {})",
                        if found.is_empty() { "none".into() } else { found.join(", ") }
                    ),
                    Some("recording on KVM needs hardware counters for exact positions; the software CPU counts exactly without them"),
                ));
            }
            Some(dir) => {
                let mut events: Vec<String> = std::fs::read_dir(dir.join("events"))
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                events.sort();
                let branches = events.iter().any(|e| e == "branch-instructions");
                out.push(finding(
                    "pmu",
                    if branches { Level::Ok } else { Level::Warn },
                    format!(
                        "CPU PMU {}: {}",
                        dir.file_name().unwrap_or_default().to_string_lossy(),
                        if events.is_empty() { "no named events".into() } else { events.join(", ") }
                    ),
                    (!branches).then_some("no branch-instructions event: KVM positions count retired conditional branches (a raw event may still work)"),
                ));
            }
        }
        let paranoid = self
            .read("proc/sys/kernel/perf_event_paranoid")
            .and_then(|v| v.parse::<i32>().ok());
        out.push(match paranoid {
            Some(p) if p > 1 => finding(
                "perf",
                Level::Warn,
                format!("kernel.perf_event_paranoid = {p}"),
                Some("guest counters need <= 1 (KRR's hosts: -1): sudo sysctl kernel.perf_event_paranoid=-1"),
            ),
            Some(p) => finding("perf", Level::Ok, format!("kernel.perf_event_paranoid = {p}"), None),
            None => finding("perf", Level::Warn, "no kernel.perf_event_paranoid".into(), Some("a kernel without perf events: KVM recording cannot position events")),
        });
        out
    }
}

/// Free space where `path` (or its nearest existing parent) lies.
fn free_space(path: &Path, advice: &'static str) -> Finding {
    let mut at = path.to_path_buf();
    while !at.exists() {
        if !at.pop() {
            break;
        }
    }
    match nix::sys::statvfs::statvfs(&at) {
        Ok(s) => {
            let gib = (s.blocks_available() * s.fragment_size()) >> 30;
            let level = if gib >= DISK_NEEDED_GIB {
                Level::Ok
            } else {
                Level::Warn
            };
            finding(
                "disk",
                level,
                format!(
                    "{gib} GiB free at {} (for {})",
                    at.display(),
                    path.display()
                ),
                (level != Level::Ok).then_some(advice),
            )
        }
        Err(e) => finding(
            "disk",
            Level::Warn,
            format!("cannot stat {}: {e}", at.display()),
            None,
        ),
    }
}

/// The host packages `cargo xtask setup` installs.
fn host_packages() -> Finding {
    match crate::setup::missing() {
        Ok(m) if m.is_empty() => finding(
            "packages",
            Level::Ok,
            format!(
                "all {} host packages installed",
                crate::setup::PACKAGES.len()
            ),
            None,
        ),
        Ok(m) => finding(
            "packages",
            Level::Problem,
            format!("missing host packages: {}", m.join(" ")),
            Some("cargo xtask setup (installs them through apt-get; root or sudo)"),
        ),
        Err(e) => finding(
            "packages",
            Level::Problem,
            format!("{e:#}"),
            Some("the project needs a Debian or Ubuntu host with dpkg and apt"),
        ),
    }
}

/// Every pinned Debian package of the manifests (`debian: {package,
/// version}`): in the store already, or offered by apt at that version.
fn pinned_packages() -> Finding {
    let manifests = match crate::manifests::load_with(&[]) {
        Ok(m) => m,
        Err(e) => return finding("debian", Level::Problem, format!("manifests: {e:#}"), None),
    };
    let mut pinned = std::collections::BTreeSet::new();
    collect_pins(
        &serde_json::to_value(&manifests.images).unwrap_or_default(),
        &mut pinned,
    );
    let store = krr_orchestrator::store::Store::open_default().ok();
    let mut unavailable = Vec::new();
    for (package, version, sha256) in &pinned {
        if store.as_ref().is_some_and(|s| s.has_blob(sha256)) {
            continue;
        }
        let listed = Command::new("apt-cache")
            .args(["madison", package])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.split('|').nth(1).map(str::trim) == Some(version.as_str()))
            })
            .unwrap_or(false);
        if !listed {
            unavailable.push(format!("{package}={version}"));
        }
    }
    if unavailable.is_empty() {
        finding(
            "debian",
            Level::Ok,
            format!(
                "{} pinned Debian packages in the store or offered by apt",
                pinned.len()
            ),
            None,
        )
    } else {
        // The store falls back to snapshot.debian.org (needs the network).
        finding(
            "debian",
            Level::Warn,
            format!("pinned Debian packages neither in the store nor offered by apt: {} (the image build will fetch them from snapshot.debian.org)", unavailable.join(", ")),
            Some("sudo apt-get update; on a non-Debian host add a bookworm source pinned below 100 (the CloudLab setup does); without network access to snapshot.debian.org (KRR_DEBIAN_SNAPSHOT_URL names a mirror of it) the image build fails naming each place it looked"),
        )
    }
}

/// (package, version, sha256) of every `{package, version, sha256}` object.
fn collect_pins(
    v: &serde_json::Value,
    out: &mut std::collections::BTreeSet<(String, String, String)>,
) {
    match v {
        serde_json::Value::Object(m) => {
            if let (Some(p), Some(ver), Some(sha)) = (
                m.get("package").and_then(|x| x.as_str()),
                m.get("version").and_then(|x| x.as_str()),
                m.get("sha256").and_then(|x| x.as_str()),
            ) {
                out.insert((p.into(), ver.into(), sha.into()));
            }
            m.values().for_each(|x| collect_pins(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_pins(x, out)),
        _ => {}
    }
}

/// QEMU, the whole-VM record/replay peer.
fn qemu() -> Finding {
    match Command::new("qemu-system-x86_64").arg("--version").output() {
        Ok(o) if o.status.success() => finding(
            "qemu",
            Level::Ok,
            format!(
                "{} (its record/replay refuses -smp above 1)",
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("?")
            ),
            None,
        ),
        _ => finding(
            "qemu",
            Level::Problem,
            "no qemu-system-x86_64".into(),
            Some(
                "cargo xtask setup installs qemu-system-x86 (the eval's whole-VM RR and TCG peers)",
            ),
        ),
    }
}

/// The engine's backend decision and what it means for each command.
fn backends(engine: &EngineView) -> Vec<Finding> {
    let backend = &engine.backend;
    vec![
        finding("backend", Level::Ok, format!("krr run/record --backend auto: {backend} ({})", engine.reason), None),
        finding("backend", Level::Ok, "krr replay: the software CPU (exact instruction counts), on every host".into(), None),
        finding(
            "backend",
            Level::Ok,
            format!("eval record-perf and bug-repro: krr cells on {backend}; the whole-VM RR and TCG peers on QEMU TCG"),
            None,
        ),
        finding(
            "backend",
            Level::Ok,
            format!("KVM would position interrupts by {}: {}", engine.async_events, engine.async_events_detail),
            None,
        ),
    ]
}

/// Every finding about this host, in the order doctor prints them, with
/// `engine`'s answer (or why there is none) for KVM and the backends.
pub fn findings(engine: &Result<EngineView>) -> Vec<Finding> {
    let host = Host::at("/");
    let mut all = host.cpu();
    match engine {
        Ok(engine) => all.push(host.kvm(engine)),
        Err(e) => all.push(finding(
            "kvm",
            Level::Problem,
            format!("cannot ask the engine what /dev/kvm is: {e:#}"),
            Some("cargo xtask setup, then cargo build --release"),
        )),
    }
    all.extend(host.pmu());
    let cache = std::env::var_os("KRR_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/krr")))
        .unwrap_or_else(|| PathBuf::from("."));
    all.push(free_space(
        &cache,
        "images and kernel builds need about 40 GiB: set KRR_CACHE to a larger disk",
    ));
    all.push(free_space(
        &crate::repo_root().join("results"),
        "an evaluation's recordings and results go under the repository: clone it to a larger disk",
    ));
    all.push(host_packages());
    all.push(pinned_packages());
    all.push(qemu());
    if let Ok(engine) = engine {
        all.extend(backends(engine));
    }
    all
}

pub fn run(json: bool) -> Result<()> {
    let all = findings(&EngineView::ask());
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for f in &all {
            let tag = match f.level {
                Level::Ok => "ok     ",
                Level::Warn => "warn   ",
                Level::Problem => "PROBLEM",
            };
            println!("{tag} {:<9} {}", f.topic, f.what);
            if let Some(a) = &f.advice {
                println!("        {:<9} -> {a}", "");
            }
        }
    }
    let problems = all.iter().filter(|f| f.level == Level::Problem).count();
    if problems > 0 {
        bail!("{problems} problem(s) that a command needs fixed (the -> lines)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_host(files: &[(&str, &str)], dirs: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (p, text) in files {
            let path = root.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        for d in dirs {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        root
    }

    /// The engine's answer for a host whose /dev/kvm is `verdict`.
    fn engine(verdict: &str, reason: &str) -> EngineView {
        EngineView::from_json(&serde_json::json!({
            "backend": "tcg",
            "reason": "auto: software CPU",
            "kvm": {"verdict": verdict, "reason": reason},
            "kvm_async_events": {"mode": "deterministic-points", "detail": "no PMU"},
        }))
        .unwrap()
    }

    const AMD_PVM_CPUINFO: &str = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2\n";

    #[test]
    fn a_pvm_host_without_a_pmu_is_told_so_with_advice() {
        let root = fake_host(
            &[
                ("proc/cpuinfo", AMD_PVM_CPUINFO),
                ("sys/devices/system/cpu/smt/control", "notsupported\n"),
                ("proc/sys/kernel/perf_event_paranoid", "2\n"),
                ("dev/kvm", ""),
            ],
            &[
                "sys/module/kvm",
                "sys/module/kvm_pvm",
                "sys/bus/event_source/devices/software",
            ],
        );
        let host = Host::at(root.path());
        let kvm = host.kvm(&engine(
            "software-hypervisor",
            "/dev/kvm is PVM (module kvm_pvm loaded)",
        ));
        assert_eq!(kvm.level, Level::Warn);
        assert!(kvm.what.contains("PVM"), "{kvm:?}");
        assert!(kvm.advice.unwrap().contains("VT-x/AMD-V host"));
        let pmu = host.pmu();
        assert!(
            pmu[0].what.contains("no CPU PMU") && pmu[0].what.contains("software"),
            "{pmu:?}"
        );
        assert!(
            pmu[1].what.contains("= 2") && pmu[1].advice.is_some(),
            "{pmu:?}"
        );
        let cpu = host.cpu();
        assert!(cpu[0].what.contains("2 logical CPUs"), "{cpu:?}");
        assert_eq!(cpu[1].level, Level::Ok);
    }

    #[test]
    fn a_vtx_host_with_a_pmu_and_smt_on_is_advised_to_turn_smt_off() {
        let cpuinfo = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6142\nphysical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu vmx\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6142\nphysical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu vmx\n";
        let root = fake_host(
            &[
                ("proc/cpuinfo", cpuinfo),
                ("sys/devices/system/cpu/smt/control", "on\n"),
                ("proc/sys/kernel/perf_event_paranoid", "-1\n"),
                ("dev/kvm", ""),
                (
                    "sys/bus/event_source/devices/cpu/events/branch-instructions",
                    "event=0xc4\n",
                ),
                (
                    "sys/bus/event_source/devices/cpu/events/instructions",
                    "event=0xc0\n",
                ),
            ],
            &["sys/module/kvm", "sys/module/kvm_intel"],
        );
        let host = Host::at(root.path());
        let kvm = host.kvm(&engine(
            "hardware",
            "/dev/kvm is hardware-backed (Intel VT-x, module kvm_intel)",
        ));
        assert_eq!(kvm.level, Level::Ok);
        assert!(kvm.what.contains("VT-x") && kvm.advice.is_none(), "{kvm:?}");
        let pmu = host.pmu();
        assert_eq!(
            (pmu[0].level, pmu[1].level),
            (Level::Ok, Level::Ok),
            "{pmu:?}"
        );
        assert!(
            pmu[0].what.contains("branch-instructions, instructions"),
            "{pmu:?}"
        );
        let cpu = host.cpu();
        assert!(cpu[0].what.contains("2 logical CPUs, 1 cores"), "{cpu:?}");
        assert_eq!(cpu[1].level, Level::Warn);
        assert!(cpu[1].advice.as_deref().unwrap().contains("smt/control"));
    }

    #[test]
    fn no_dev_kvm_on_a_vtx_cpu_advises_loading_the_module() {
        let root = fake_host(&[("proc/cpuinfo", "processor\t: 0\nflags\t\t: vmx\n")], &[]);
        let kvm = Host::at(root.path()).kvm(&engine("absent", "/dev/kvm cannot be opened"));
        assert!(kvm.advice.unwrap().contains("modprobe kvm_intel"));
        // A vendor module missing behind a working /dev/kvm: the same advice.
        let kvm = Host::at(root.path()).kvm(&engine(
            "software-hypervisor",
            "/dev/kvm has no hardware vendor module behind it",
        ));
        assert!(kvm.advice.unwrap().contains("modprobe kvm_intel"));
        let err = EngineView::from_json(&serde_json::json!({"backend": "tcg"})).unwrap_err();
        assert!(format!("{err:#}").contains("no string `reason`"), "{err:#}");
    }

    /// This development host has no CPU PMU: doctor must say so (its PVM
    /// verdict comes from the engine; `cargo xtask test` checks it whole).
    #[test]
    fn this_pvm_host_is_reported_without_a_pmu() {
        if !Path::new("/sys/module/kvm_pvm").exists() {
            eprintln!("not a PVM host: nothing to check here");
            return;
        }
        let host = Host::at("/");
        if !Path::new("/sys/bus/event_source/devices/cpu").exists() {
            assert!(host.pmu()[0].what.contains("no CPU PMU"));
        }
    }

    #[test]
    fn pins_are_found_anywhere_in_the_manifests() {
        let v = serde_json::json!([{"build": {"source": {"debian": {"package": "a", "version": "1", "sha256": "x"}}}},
            {"busybox": {"package": "b", "version": "2", "sha256": "y"}}]);
        let mut out = std::collections::BTreeSet::new();
        collect_pins(&v, &mut out);
        assert_eq!(out.len(), 2);
    }
}
