// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask test`: the one test command (CI runs exactly this).

use crate::{images, repo_root, setup};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Runs a cargo subcommand in the repository root and fails with its name.
pub(crate) fn cargo(args: &[&str], envs: &[(String, String)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .current_dir(repo_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn run(extra: &[String]) -> Result<()> {
    eprintln!("== host packages (cargo xtask setup)");
    setup::ensure()?;
    setup::run(true)?;
    eprintln!("== cargo fmt --check");
    cargo(&["fmt", "--all", "--check"], &[])?;
    eprintln!("== cargo clippy");
    cargo(
        &[
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // Tests that boot Linux find the guest images through these variables;
    // with KRR_TEST_REQUIRE_IMAGES set they fail instead of skipping.
    eprintln!("== guest images for the tests");
    let vars = [
        ("KRR_TEST_KERNEL", ("guest-6.1", "bzImage")),
        ("KRR_TEST_VMLINUX", ("guest-6.1", "vmlinux")),
        ("KRR_TEST_INITRD", ("initramfs-base", "initramfs.cpio.gz")),
        ("KRR_AGENT_KERNEL", ("guest-6.1-krr", "bzImage")),
        // stress-ng and the other Debian workloads.
        ("KRR_TEST_ROOTFS", ("rootfs-workloads", "rootfs.ext4")),
    ];
    let files = images::build_files(&vars.map(|(_, file)| file))?;
    let mut envs: Vec<(String, String)> = vars
        .iter()
        .zip(&files)
        .map(|((var, _), path)| (var.to_string(), path.display().to_string()))
        .collect();
    envs.extend([("KRR_TEST_REQUIRE_IMAGES".to_string(), "1".to_string())]);
    for (k, v) in &envs {
        eprintln!("   {k}={v}");
    }
    // Early: it needs no build, and a broken profile should not wait for
    // the engine's tests.
    eprintln!("== CloudLab profile and setup (cloudlab/tests/run.sh)");
    let status = std::process::Command::new("bash")
        .arg("cloudlab/tests/run.sh")
        .current_dir(repo_root())
        .status()
        .context("running bash cloudlab/tests/run.sh")?;
    if !status.success() {
        bail!("cloudlab/tests/run.sh failed ({status}): see the FAIL lines above");
    }
    eprintln!("== bug patches apply over their kernels (patch, no build)");
    let manifests = crate::manifests::load_repo()?;
    let checked = images::check_bug_patches(&manifests, &manifests.bugs)?;
    eprintln!("   {checked} bug kernel(s): every patch applies");
    eprintln!("== cargo test");
    let mut args = vec!["test", "--release", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args, &envs)?;
    if extra.is_empty() {
        // Hostile recordings: a fixed-seed fuzz run of every reader.
        eprintln!(
            "== cargo xtask fuzz (short: {} s per target)",
            crate::fuzz::QUICK_SECONDS
        );
        crate::fuzz::quick(&repo_root().join("target/fuzz-quick"))?;
        host_verdicts()?;
        // The main job, end to end on its smallest matrix: every scheme.
        eprintln!("== cargo xtask eval record-perf --quick");
        let out = repo_root().join("target/eval-quick");
        let _ = std::fs::remove_dir_all(&out);
        crate::eval::run(crate::eval::EvalArgs::quick(out.clone()))?;
        crate::eval::check_results(&out)?;
        eprintln!("   {}: every cell ran and checks out", out.display());
        eprintln!("== cargo xtask eval bug-repro --quick");
        let out = repo_root().join("target/eval-bug-quick");
        let _ = std::fs::remove_dir_all(&out);
        let mut args = crate::eval::EvalArgs::quick(out.clone());
        args.experiment = crate::eval::Experiment::BugRepro;
        crate::eval::run(args)?;
        crate::eval::check_bug_results(&out)?;
        eprintln!("   {}: every bug reproduced", out.display());
        user_manifests()?;

        // The guest agent's tests boot the -krr kernel under QEMU; they are
        // `#[ignore]`d for plain `cargo test` (they need the images above).
        eprintln!("== guest agent in a real guest (QEMU)");
        cargo(
            &[
                "test",
                "--release",
                // The workspace, as in the main run: the same features, so
                // its build is reused instead of redone for one package.
                "--workspace",
                "--test",
                "agent_abi",
                "--",
                "--ignored",
            ],
            &envs,
        )?;
    }
    Ok(())
}

/// `doctor` and `hw-acceptance` on this host, with the engine's own
/// verdict: a host without hardware KVM (this project's PVM machine) is
/// reported as such, and hw-acceptance says plainly that it cannot run.
fn host_verdicts() -> Result<()> {
    eprintln!("== cargo xtask doctor, hw-acceptance: this host's verdicts");
    let engine = crate::doctor::EngineView::ask();
    let findings = crate::doctor::findings(&engine);
    let engine = engine?;
    let kvm = findings
        .iter()
        .find(|f| f.topic == "kvm")
        .context("doctor reported nothing about KVM")?;
    eprintln!("   doctor: {}", kvm.what);
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if pvm && !(kvm.what.contains("PVM") && engine.kvm_verdict == "software-hypervisor") {
        bail!("doctor on this PVM host says: {} ({:?})", kvm.what, engine);
    }
    if !Path::new("/sys/bus/event_source/devices/cpu").exists() {
        let pmu = findings.iter().find(|f| f.topic == "pmu");
        if !pmu.is_some_and(|f| f.what.contains("no CPU PMU")) {
            bail!("doctor on a host without a CPU PMU says: {pmu:?}");
        }
    }
    match crate::hw_acceptance::can_run_here(&engine) {
        Ok(()) => eprintln!("   hw-acceptance would run here (hardware KVM): run it by hand"),
        Err(reason) if engine.kvm_verdict != "hardware" => eprintln!("   {reason}"),
        Err(reason) => bail!("hw-acceptance refuses a hardware KVM host: {reason}"),
    }
    Ok(())
}

/// A user's workload and bug case from a manifest outside the repository
/// (`docs/examples/user-manifests`, copied out), each run by its eval like
/// the built-in ones: its own guest program and trigger program compiled
/// from paths relative to that file.
fn user_manifests() -> Result<()> {
    eprintln!("== cargo xtask eval record-perf | bug-repro --manifests (outside the repository)");
    let example = repo_root().join("docs/examples/user-manifests");
    let outside = tempfile::Builder::new()
        .prefix("krr-user-manifests-")
        .tempdir()?;
    copy_dir(&example, outside.path())?;
    let manifest = outside.path().join("mine.yaml");

    let out = repo_root().join("target/eval-user-workload");
    let _ = std::fs::remove_dir_all(&out);
    let mut args = crate::eval::EvalArgs::quick(out.clone());
    args.quick = false;
    args.workloads = Some(vec!["prime-count".into()]);
    args.schemes = Some(vec!["native".into(), "krr".into()]);
    args.manifests = vec![manifest.clone()];
    crate::eval::run(args)?;
    crate::eval::check_results(&out)?;
    eprintln!(
        "   {}: the user's workload ran and checks out",
        out.display()
    );

    let out = repo_root().join("target/eval-user-bug");
    let _ = std::fs::remove_dir_all(&out);
    let mut args = crate::eval::EvalArgs::quick(out.clone());
    args.experiment = crate::eval::Experiment::BugRepro;
    args.quick = false;
    args.bugs = Some(vec!["my-sysrq-crash".into()]);
    args.manifests = vec![manifest];
    crate::eval::run(args)?;
    crate::eval::check_bug_results(&out)?;
    eprintln!("   {}: the user's bug reproduced", out.display());
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
