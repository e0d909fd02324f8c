// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask doctor`: what this host offers the project (hardware KVM or
//! not and why, a PMU and its counters, SMT, cores, free disk, host packages,
//! the pinned Debian packages), which backend each command will use, and one
//! line of advice per problem. Facts come from sysfs and procfs under a root
//! directory, so the verdicts are tested on synthetic hosts; the backend
//! decision is the engine's own (`krr backend --json`).

use anyhow::{bail, Result};
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

    /// `/dev/kvm` and the vendor modules behind it (the facts; the decision
    /// is `krr backend`'s).
    pub fn kvm(&self) -> Finding {
        let module = |m: &str| self.path("sys/module").join(m).exists();
        let dev = self.path("dev/kvm").exists();
        let flags = self
            .read("proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default();
        let has = |f: &str| flags.iter().any(|x| x == f);
        if !dev {
            let advice = if has("vmx") {
                "the CPU has VT-x: sudo modprobe kvm_intel"
            } else if has("svm") {
                "the CPU has AMD-V: sudo modprobe kvm_amd"
            } else {
                "no VT-x/AMD-V on this CPU (a cloud VM without nested virtualization?): the software CPU runs everything"
            };
            return finding("kvm", Level::Warn, "no /dev/kvm".into(), Some(advice));
        }
        if module("kvm_pvm") {
            return finding(
                "kvm",
                Level::Warn,
                "/dev/kvm is PVM (module kvm_pvm), a software hypervisor: guest ring 0 is emulated, about 1 M instructions/s, and there is no PMU".into(),
                Some("Linux guests run on the software CPU here; KVM numbers need a VT-x/AMD-V host (CloudLab c6420 or c220g5)"),
            );
        }
        match (
            module("kvm_intel") && has("vmx"),
            module("kvm_amd") && has("svm"),
        ) {
            (true, _) => finding(
                "kvm",
                Level::Ok,
                "/dev/kvm is hardware-backed (Intel VT-x, kvm_intel)".into(),
                None,
            ),
            (_, true) => finding(
                "kvm",
                Level::Ok,
                "/dev/kvm is hardware-backed (AMD-V, kvm_amd)".into(),
                None,
            ),
            _ => finding(
                "kvm",
                Level::Warn,
                "/dev/kvm has no hardware vendor module behind it".into(),
                Some("load kvm_intel or kvm_amd, or use the software CPU (--backend tcg)"),
            ),
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
        finding(
            "debian",
            Level::Problem,
            format!("pinned Debian packages neither in the store nor offered by apt: {}", unavailable.join(", ")),
            Some("sudo apt-get update; on a non-Debian host add a bookworm source pinned below 100 (the CloudLab setup does); a version the mirror dropped is on snapshot.debian.org"),
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
fn backends() -> Vec<Finding> {
    let decision = crate::krr_bin::build()
        .and_then(|krr| crate::krr_bin::run_json(&krr, &["backend", "--json"]));
    match decision {
        Ok(v) => {
            let backend = v["backend"].as_str().unwrap_or("?").to_owned();
            let reason = v["reason"].as_str().unwrap_or("?").to_owned();
            vec![
                finding("backend", Level::Ok, format!("krr run/record --backend auto: {backend} ({reason})"), None),
                finding("backend", Level::Ok, "krr replay: the software CPU (exact instruction counts), on every host".into(), None),
                finding(
                    "backend",
                    Level::Ok,
                    format!("eval record-perf and bug-repro: krr cells on {backend}; the whole-VM RR and TCG peers on QEMU TCG"),
                    None,
                ),
            ]
        }
        Err(e) => vec![finding(
            "backend",
            Level::Problem,
            format!("cannot ask the engine which backend it picks: {e:#}"),
            Some("cargo xtask setup, then cargo build --release"),
        )],
    }
}

pub fn run(json: bool) -> Result<()> {
    let host = Host::at("/");
    let mut all = host.cpu();
    all.push(host.kvm());
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
    all.extend(backends());
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
        let kvm = host.kvm();
        assert_eq!(kvm.level, Level::Warn);
        assert!(kvm.what.contains("PVM"), "{kvm:?}");
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
        assert_eq!(host.kvm().level, Level::Ok);
        assert!(host.kvm().what.contains("VT-x"));
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
        let kvm = Host::at(root.path()).kvm();
        assert!(kvm.advice.unwrap().contains("modprobe kvm_intel"));
    }

    /// This development host is PVM without a PMU: doctor must say so.
    #[test]
    fn this_pvm_host_is_reported_as_pvm_without_a_pmu() {
        if !Path::new("/sys/module/kvm_pvm").exists() {
            eprintln!("not a PVM host: nothing to check here");
            return;
        }
        let host = Host::at("/");
        assert!(host.kvm().what.contains("PVM"));
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
