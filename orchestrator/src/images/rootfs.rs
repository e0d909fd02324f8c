// SPDX-License-Identifier: GPL-2.0-or-later
//! Root filesystems for heavy workloads: `debootstrap` a Debian suite with the
//! packages a workload names (plus busybox-static, which `/init` uses), add
//! `/init`, the guest programs and the baked-in command, and pack the tree
//! with `mkfs.ext4 -d` (no loop mount, no root-only mount needed).
//!
//! The mirror is the one this machine's apt sources use for the suite. The
//! recipe hash covers suite, package names, size, mirror, `/init` and the
//! programs; package versions float with the mirror, so a rootfs is cached by
//! recipe but not bit-for-bit reproducible.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{io_err, ImageError, Result};
use super::initramfs::{self, compile_program, program_name, PROGRAM_DIR};
use super::process::run_logged;
use super::BuildContext;

/// The image file's name inside the image directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";

/// What a root filesystem image is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsBuild {
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Extra packages (`rocksdb-tools`, `redis`, `stress-ng`, ...).
    pub packages: Vec<String>,
    /// Size of the ext4 image.
    pub size_mib: u64,
    /// C guest programs (repo-relative), built statically into /usr/local/bin.
    pub programs: Vec<PathBuf>,
    /// Default command baked into /etc/krr/command.
    pub command: Option<String>,
}

impl RootfsBuild {
    pub(crate) fn validate(&self, image: &str) -> Result<()> {
        let bad = |field, value: String, expected: &str| ImageError::InvalidSpec {
            image: image.to_string(),
            field,
            value,
            expected: expected.to_string(),
        };
        if self.suite.is_empty()
            || !self
                .suite
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad(
                "suite",
                self.suite.clone(),
                "a Debian suite name such as bookworm",
            ));
        }
        for p in &self.packages {
            if p.is_empty()
                || !p
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
            {
                return Err(bad(
                    "packages",
                    p.clone(),
                    "Debian package names ([a-z0-9+-.])",
                ));
            }
        }
        if !(64..=65536).contains(&self.size_mib) {
            return Err(bad("size_mib", self.size_mib.to_string(), "64 to 65536"));
        }
        Ok(())
    }
}

/// The mirror URL this machine's apt sources use for `suite`.
pub(crate) fn mirror(recipe: &RootfsBuild) -> Result<String> {
    let mut texts = Vec::new();
    for path in ["/etc/apt/sources.list"] {
        if let Ok(t) = std::fs::read_to_string(path) {
            texts.push((path.to_string(), t));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == "list" || ext == "sources" {
                if let Ok(t) = std::fs::read_to_string(&path) {
                    texts.push((path.display().to_string(), t));
                }
            }
        }
    }
    for (path, text) in &texts {
        if let Some(url) = find_mirror(path, text, &recipe.suite) {
            return Ok(url);
        }
    }
    Err(ImageError::InvalidSpec {
        image: "rootfs".into(),
        field: "suite",
        value: recipe.suite.clone(),
        expected: "a suite that this machine's apt sources (/etc/apt/sources.list*) list \
                   with a 'deb' line, whose mirror debootstrap can use"
            .into(),
    })
}

/// Finds the `deb` URI for `suite` in a one-line (`.list`) or deb822
/// (`.sources`) apt source file.
pub(crate) fn find_mirror(path: &str, text: &str, suite: &str) -> Option<String> {
    if path.ends_with(".sources") {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|r| r.strip_prefix(':'))
                        .map(|v| v.trim().to_string())
                })
            };
            let types = field("Types").unwrap_or_default();
            let suites = field("Suites").unwrap_or_default();
            if types.split_whitespace().any(|t| t == "deb")
                && suites.split_whitespace().any(|s| s == suite)
            {
                return field("URIs").and_then(|u| u.split_whitespace().next().map(str::to_string));
            }
        }
        None
    } else {
        text.lines().find_map(|l| {
            let words: Vec<&str> = l
                .split_whitespace()
                .filter(|w| !w.starts_with('['))
                .collect();
            (words.first() == Some(&"deb") && words.get(2) == Some(&suite))
                .then(|| words[1].to_string())
        })
    }
}

/// Builds the root filesystem into `out/rootfs.ext4`. On failure the
/// half-installed tree is removed; `build.log` stays for inspection.
pub(crate) fn build(
    ctx: &BuildContext<'_>,
    recipe: &RootfsBuild,
    build_dir: &Path,
    out: &Path,
) -> Result<()> {
    let result = build_in(ctx, recipe, build_dir, out);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(build_dir.join("root"));
    }
    result
}

fn build_in(
    ctx: &BuildContext<'_>,
    recipe: &RootfsBuild,
    build_dir: &Path,
    out: &Path,
) -> Result<()> {
    if build_dir.exists() {
        std::fs::remove_dir_all(build_dir).map_err(io_err(build_dir, "remove stale build"))?;
    }
    let target = build_dir.join("root");
    std::fs::create_dir_all(&target).map_err(io_err(&target, "create directory"))?;
    let log = build_dir.join("build.log");
    let mirror = mirror(recipe)?;

    let bar = ctx.spinner("debootstrap");
    let mut include = vec!["busybox-static".to_string()];
    for p in &recipe.packages {
        if !include.contains(p) {
            include.push(p.clone());
        }
    }
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase", "--components=main"])
        .arg(format!("--include={}", include.join(",")))
        .arg(&recipe.suite)
        .arg(&target)
        .arg(&mirror)
        .env("LC_ALL", "C");
    run_logged("debootstrap", &mut cmd, &log, &bar, |line, bar| {
        if let Some(rest) = line.strip_prefix("I: ") {
            bar.set_message(rest.to_string());
        }
    })
    .map_err(|e| match e {
        ImageError::CommandFailed {
            status, log, tail, ..
        } => {
            // debootstrap's own log has the real cause (a missing package,
            // an unreachable mirror).
            let detail = std::fs::read_to_string(target.join("debootstrap/debootstrap.log"))
                .map(|t| {
                    t.lines()
                        .rev()
                        .take(15)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            ImageError::CommandFailed {
                step: format!("debootstrap {} with {}", recipe.suite, include.join(",")),
                status,
                log,
                tail: format!("{tail}\n--- debootstrap.log ---\n{detail}"),
            }
        }
        other => other,
    })?;
    ctx.finish(&bar, format!("{} installed", recipe.suite));

    let bar = ctx.spinner("customise");
    // /init and guest programs, as in the initramfs.
    let init_src = ctx.root.join(initramfs::INIT_SCRIPT);
    let init_dst = target.join("init");
    std::fs::copy(&init_src, &init_dst).map_err(io_err(&init_src, "copy /init"))?;
    let bin_dir = target.join(PROGRAM_DIR);
    std::fs::create_dir_all(&bin_dir).map_err(io_err(&bin_dir, "create"))?;
    for program in &recipe.programs {
        let binary = compile_program(ctx.root, program, build_dir)?;
        let dst = bin_dir.join(program_name(program));
        std::fs::write(&dst, binary).map_err(io_err(&dst, "write guest program"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(&dst, "chmod"))?;
    }
    if let Some(command) = &recipe.command {
        let dst = target.join(initramfs::COMMAND_FILE);
        std::fs::create_dir_all(dst.parent().expect("has parent"))
            .map_err(io_err(&dst, "create"))?;
        std::fs::write(&dst, format!("{}\n", command.trim_end())).map_err(io_err(&dst, "write"))?;
    }
    // Downloaded packages and lists only take space in the image.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let d = target.join(dir);
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.filter_map(|e| e.ok()) {
                if e.path().is_file() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    ctx.finish(&bar, "init, programs, command");

    let bar = ctx.spinner("mkfs.ext4");
    let image = out.join(ROOTFS_FILE);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "krr-root", "-E", "root_owner=0:0", "-d"])
        .arg(&target)
        .arg(&image)
        .arg(format!("{}M", recipe.size_mib));
    run_logged("mkfs.ext4 -d", &mut cmd, &log, &bar, |_, _| {}).map_err(|e| match e {
        ImageError::CommandFailed {
            status, log, tail, ..
        } if tail.contains("Could not allocate") || tail.contains("No space") => {
            ImageError::CommandFailed {
                step: format!(
                    "mkfs.ext4: the tree does not fit in size_mib = {}",
                    recipe.size_mib
                ),
                status,
                log,
                tail,
            }
        }
        other => other,
    })?;
    ctx.finish(&bar, format!("{} MiB ext4", recipe.size_mib));
    // The tree is in the image now; the copy only takes space.
    let _ = std::fs::remove_dir_all(&target);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            find_mirror("x.sources", deb822, "bookworm").as_deref(),
            Some("http://deb.example/debian")
        );
        assert_eq!(find_mirror("x.sources", deb822, "trixie"), None);
        let list = "deb-src http://a/debian bookworm main\ndeb [arch=amd64] http://b/debian bookworm main\n";
        assert_eq!(
            find_mirror("x.list", list, "bookworm").as_deref(),
            Some("http://b/debian")
        );
    }
}
