// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask setup`: the Debian packages the project needs on the host.
//!
//! The list lives here, once; every other command that needs a host tool calls
//! [`ensure`] so a fresh machine installs what it needs on first use.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// A host package and why the project needs it (shown by `setup --check`).
pub struct HostPackage {
    pub name: &'static str,
    pub why: &'static str,
}

/// Every Debian package the project's commands use.
pub const PACKAGES: &[HostPackage] = &[
    HostPackage {
        name: "gcc",
        why: "guest-side programs, kernel build",
    },
    HostPackage {
        name: "libc6-dev",
        why: "static guest programs (gcc -static)",
    },
    HostPackage {
        name: "patch",
        why: "kernel patches (guest agent, bug reintroduction) and unicorn's (engine/unicorn-source/patches)",
    },
    HostPackage {
        name: "make",
        why: "kernel build",
    },
    HostPackage {
        name: "cmake",
        why: "unicorn-engine (software CPU) build",
    },
    HostPackage {
        name: "pkg-config",
        why: "build scripts of -sys crates",
    },
    HostPackage {
        name: "libclang-dev",
        why: "bindgen in -sys crates",
    },
    HostPackage {
        name: "flex",
        why: "kernel build",
    },
    HostPackage {
        name: "bison",
        why: "kernel build",
    },
    HostPackage {
        name: "bc",
        why: "kernel build",
    },
    HostPackage {
        name: "libelf-dev",
        why: "kernel build (objtool)",
    },
    HostPackage {
        name: "libssl-dev",
        why: "kernel build (sign-file, extract-cert)",
    },
    HostPackage {
        name: "dwarves",
        why: "kernel build (pahole for BTF)",
    },
    HostPackage {
        name: "xz-utils",
        why: "linux-source tarball",
    },
    HostPackage {
        name: "zstd",
        why: "compressed artifacts",
    },
    HostPackage {
        name: "cpio",
        why: "initramfs images",
    },
    HostPackage {
        name: "busybox-static",
        why: "initramfs userland",
    },
    HostPackage {
        name: "e2fsprogs",
        why: "ext4 root filesystems (mkfs.ext4 -d)",
    },
    HostPackage {
        name: "debootstrap",
        why: "Debian root filesystems for workloads",
    },
    HostPackage {
        name: "qemu-system-x86",
        why: "smoke boots and the whole-VM RR peer",
    },
    HostPackage {
        name: "shellcheck",
        why: "checks the CloudLab setup scripts (cloudlab/tests/run.sh)",
    },
    HostPackage {
        name: "python3-venv",
        why: "the CloudLab profile's test (geni-lib in a throwaway virtual environment)",
    },
    HostPackage {
        name: "gdb",
        why: "debugging replays",
    },
    HostPackage {
        name: "fonts-dejavu-core",
        why: "text in the eval's figures",
    },
];

/// Names of the packages in [`PACKAGES`] that dpkg does not report installed.
pub fn missing() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for pkg in PACKAGES {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg.name])
            .output()
            .context("running dpkg-query (is this a Debian or Ubuntu host?)")?;
        let status = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !status.contains("install ok installed") {
            missing.push(pkg.name);
        }
    }
    Ok(missing)
}

/// Installs whatever is missing (idempotent). `apt-get update` runs once, only
/// when something has to be installed.
pub fn ensure() -> Result<()> {
    let missing = missing()?;
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let sudo = !is_root();
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let status = cmd
            .status()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        if !status.success() {
            bail!("apt-get {} failed with {status}", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt(&args)?;
    let still = self::missing()?;
    if !still.is_empty() {
        bail!(
            "setup: still missing after apt-get install: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `cargo xtask setup [--check]`.
pub fn run(check: bool) -> Result<()> {
    let missing = missing()?;
    if check {
        for pkg in PACKAGES {
            let state = if missing.contains(&pkg.name) {
                "MISSING"
            } else {
                "ok"
            };
            println!("{state:8} {:18} {}", pkg.name, pkg.why);
        }
        if !missing.is_empty() {
            bail!(
                "{} package(s) missing: {} (run `cargo xtask setup`)",
                missing.len(),
                missing.join(" ")
            );
        }
        println!("all {} host packages present", PACKAGES.len());
        return Ok(());
    }
    ensure()?;
    println!("setup: all {} host packages present", PACKAGES.len());
    Ok(())
}
