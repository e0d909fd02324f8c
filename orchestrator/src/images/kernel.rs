// SPDX-License-Identifier: GPL-2.0-or-later
//! Guest kernel builds from Debian's `linux-source-*` package.
//!
//! Steps: extract the source tarball from the verified `.deb` into the
//! recipe's fixed build directory, apply the patches in manifest order,
//! configure with `allnoconfig` + the concatenated fragments
//! (`KCONFIG_ALLCONFIG`) followed by `olddefconfig`, check that every option
//! the fragments set survived, compile, and copy out bzImage, vmlinux,
//! System.map and the final `.config`.
//!
//! Reproducibility: the build directory is `build/kernel-<recipe hash>`, the
//! same path for every build of one recipe, and KBUILD_BUILD_TIMESTAMP/USER/
//! HOST/VERSION and LOCALVERSION are fixed, so two builds of one recipe give
//! byte-identical output.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use indicatif::ProgressBar;

use super::debian::{self, DebianPackageRef};
use super::error::{io_err, DroppedOption, ImageError, Result};
use super::process::run_logged;
use super::BuildContext;

/// Fixed build identity baked into the kernel (`uname -v`, /proc/version).
pub const BUILD_TIMESTAMP: &str = "2024-01-01 00:00:00 UTC";
pub const BUILD_USER: &str = "krr";
pub const BUILD_HOST: &str = "krr-build";

/// What a kernel image is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBuild {
    /// `linux-source-6.1` at a pinned version and sha256.
    pub source: DebianPackageRef,
    /// The source tarball inside the package; `None` means
    /// `usr/src/<package>.tar.xz`, where Debian's linux-source packages put it.
    pub source_tarball: Option<String>,
    /// Config fragments, applied in order (later ones override earlier ones),
    /// paths relative to the repository root.
    pub fragments: Vec<PathBuf>,
    /// Patches (`-p1`, unified diff), applied in order.
    pub patches: Vec<PathBuf>,
    /// A kernel this one extends: `fragments` and `patches` come after the
    /// base's, and the build reuses the base's finished tree, so only what
    /// they touch recompiles (a bug kernel over its flavour).
    pub base: Option<Box<KernelBuild>>,
}

impl KernelBuild {
    /// Every fragment, the base's first.
    pub fn all_fragments(&self) -> Vec<PathBuf> {
        let mut all = self
            .base
            .as_ref()
            .map(|b| b.all_fragments())
            .unwrap_or_default();
        all.extend(self.fragments.iter().cloned());
        all
    }

    /// Every patch, the base's first.
    pub fn all_patches(&self) -> Vec<PathBuf> {
        let mut all = self
            .base
            .as_ref()
            .map(|b| b.all_patches())
            .unwrap_or_default();
        all.extend(self.patches.iter().cloned());
        all
    }
}

/// The files a kernel image consists of, by name inside the image directory.
pub const KERNEL_FILES: [&str; 4] = ["bzImage", "vmlinux", "System.map", "config"];

/// The kernel's gdb helpers (`lx-dmesg`, `lx-ps`, ...): `vmlinux-gdb.py`
/// beside `vmlinux`, which gdb auto-loads (from a safe path) and which
/// imports `scripts/gdb/linux/*.py` relative to itself.
pub const GDB_SCRIPT: &str = "vmlinux-gdb.py";
/// The directory entry of the image that holds the helpers' modules.
pub const GDB_SCRIPTS_DIR: &str = "scripts";

/// Builds the kernel into `out` (a fresh directory that becomes the image).
/// On failure the source and object trees are removed (they are large and
/// useless half-built); `build.log` stays for inspection.
pub(crate) fn build(
    ctx: &BuildContext<'_>,
    recipe: &KernelBuild,
    build_dir: &Path,
    out: &Path,
) -> Result<()> {
    let result = build_in(ctx, recipe, build_dir, out);
    if result.is_err() {
        for tree in ["src", "out"] {
            let _ = std::fs::remove_dir_all(build_dir.join(tree));
        }
    }
    result
}

fn build_in(
    ctx: &BuildContext<'_>,
    recipe: &KernelBuild,
    build_dir: &Path,
    out: &Path,
) -> Result<()> {
    // Start from a clean tree: a previous failed build of this recipe may
    // have left half-applied patches or objects behind.
    if build_dir.exists() {
        std::fs::remove_dir_all(build_dir).map_err(io_err(build_dir, "remove stale build"))?;
    }
    let src = build_dir.join("src");
    let obj = build_dir.join("out");
    let log = build_dir.join("build.log");
    std::fs::create_dir_all(&obj).map_err(io_err(&obj, "create directory"))?;
    std::fs::create_dir_all(&src).map_err(io_err(&src, "create directory"))?;

    let bar = ctx.bytes_bar("download");
    let deb = debian::fetch(&recipe.source, ctx.store, &bar)?;
    ctx.finish(&bar, format!("{} verified", recipe.source.package));

    let bar = ctx.bytes_bar("extract");
    let member = recipe
        .source_tarball
        .clone()
        .unwrap_or_else(|| format!("usr/src/{}.tar.xz", recipe.source.package));
    extract_source(&deb, &recipe.source.package, &member, &src, None, &bar)?;
    ctx.finish(&bar, format!("{} extracted", recipe.source.package));

    let bar = ctx.spinner("patch");
    for patch in &recipe.patches {
        bar.set_message(patch.display().to_string());
        apply_patch(&ctx.root.join(patch), patch, &src, &log)?;
    }
    ctx.finish(&bar, format!("{} patch(es) applied", recipe.patches.len()));

    configure(ctx, &recipe.fragments, build_dir)?;
    compile(ctx, build_dir)?;
    copy_outputs(&obj, out)
}

/// Configures the tree in `build_dir` with `fragments` (`allnoconfig` over
/// their concatenation, then `olddefconfig`) and checks that every option
/// they set survived.
fn configure(ctx: &BuildContext<'_>, fragments: &[PathBuf], build_dir: &Path) -> Result<()> {
    let (src, obj, log) = tree(build_dir);
    let bar = ctx.spinner("configure");
    let merged = build_dir.join("fragments.config");
    let wanted = merge_fragments(ctx.root, fragments, &merged)?;
    let allconfig = format!("KCONFIG_ALLCONFIG={}", merged.display());
    run_logged(
        "kernel configure (allnoconfig)",
        make(&src, &obj, ctx.jobs)
            .arg(&allconfig)
            .arg("allnoconfig"),
        &log,
        &bar,
        |_, _| {},
    )?;
    run_logged(
        "kernel configure (olddefconfig)",
        make(&src, &obj, ctx.jobs).arg("olddefconfig"),
        &log,
        &bar,
        |_, _| {},
    )?;
    check_config(&wanted, &obj.join(".config"))?;
    ctx.finish(&bar, format!("{} options checked", wanted.len()));
    Ok(())
}

/// `make all` in the tree of `build_dir`, with progress.
fn compile(ctx: &BuildContext<'_>, build_dir: &Path) -> Result<()> {
    let (src, obj, log) = tree(build_dir);
    let bar = ctx.spinner("compile");
    let mut steps = 0u64;
    let mut next_note = 500u64;
    run_logged(
        "kernel compile",
        make(&src, &obj, ctx.jobs).arg("all"),
        &log,
        &bar,
        |line, bar| {
            // Kbuild's quiet output: "  CC      kernel/fork.o".
            if line.starts_with("  ") && line.as_bytes().get(2).is_some_and(u8::is_ascii_uppercase)
            {
                steps += 1;
                bar.set_message(format!("{steps} steps, {}", line.trim()));
                if steps >= next_note {
                    next_note += 500;
                    ctx.note("compile", &format!("{steps} steps, {}", line.trim()));
                }
            }
        },
    )?;
    ctx.finish(&bar, format!("compiled ({steps} steps)"));
    Ok(())
}

/// Copies the image's files out of the object tree `obj`.
fn copy_outputs(obj: &Path, out: &Path) -> Result<()> {
    for (from, to) in [
        (obj.join("arch/x86/boot/bzImage"), "bzImage"),
        (obj.join("vmlinux"), "vmlinux"),
        (obj.join("System.map"), "System.map"),
        (obj.join(".config"), "config"),
    ] {
        std::fs::copy(&from, out.join(to)).map_err(io_err(&from, "copy kernel output"))?;
    }
    copy_gdb_scripts(obj, out)
}

/// Copies the gdb helpers out of the object tree `obj` (CONFIG_GDB_SCRIPTS
/// links them to the source tree there, beside the generated
/// `constants.py`) into `out` as plain files.
pub(crate) fn copy_gdb_scripts(obj: &Path, out: &Path) -> Result<()> {
    let from = obj.join(GDB_SCRIPT);
    std::fs::copy(&from, out.join(GDB_SCRIPT)).map_err(io_err(
        &from,
        "copy the kernel's gdb scripts (is CONFIG_GDB_SCRIPTS set?)",
    ))?;
    let modules = obj.join("scripts/gdb/linux");
    let to = out.join(GDB_SCRIPTS_DIR).join("gdb/linux");
    std::fs::create_dir_all(&to).map_err(io_err(&to, "create directory"))?;
    for entry in std::fs::read_dir(&modules).map_err(io_err(&modules, "list"))? {
        let path = entry.map_err(io_err(&modules, "list"))?.path();
        if path.extension().is_some_and(|e| e == "py") {
            let name = path.file_name().expect("a listed file has a name");
            std::fs::copy(&path, to.join(name)).map_err(io_err(&path, "copy gdb script"))?;
        }
    }
    Ok(())
}

/// The source tree, object tree and build log of a build directory.
fn tree(build_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        build_dir.join("src"),
        build_dir.join("out"),
        build_dir.join("build.log"),
    )
}

/// Where a derived build keeps the patches it applied to its base's tree
/// (copies, so the tree can be restored even if the files change), with an
/// `applied` count: present only while the base's tree is not its own.
const DERIVED_STATE: &str = "derived";

/// Builds `derived` (whose `base` is `base`) in the base's tree at
/// `base_dir`: applies the derived patches, configures with every fragment,
/// compiles what changed, copies the image into `out`, then puts the base's
/// sources and configuration back. The caller holds the base's build lock.
pub(crate) fn build_derived(
    ctx: &BuildContext<'_>,
    base: &KernelBuild,
    derived: &KernelBuild,
    base_dir: &Path,
    out: &Path,
) -> Result<()> {
    // An interrupted derived build left its patches in the tree.
    restore_base(ctx, base, base_dir)?;
    let (src, obj, log) = tree(base_dir);
    if !obj.join("vmlinux").is_file() || !src.join("Makefile").is_file() {
        ctx.note(
            "base",
            "the base kernel's build tree is gone: building it first",
        );
        let scratch = base_dir.with_extension("base-image");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(io_err(&scratch, "create directory"))?;
        let built = build(ctx, base, base_dir, &scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        built?;
    }
    let state = base_dir.join(DERIVED_STATE);
    std::fs::create_dir_all(&state).map_err(io_err(&state, "create directory"))?;
    let result = (|| {
        let bar = ctx.spinner("patch");
        for (i, patch) in derived.patches.iter().enumerate() {
            bar.set_message(patch.display().to_string());
            let copy = state.join(format!("{i:03}.patch"));
            let from = ctx.root.join(patch);
            std::fs::copy(&from, &copy).map_err(io_err(&from, "copy patch"))?;
            apply_patch(&copy, patch, &src, &log)?;
            let applied = state.join("applied");
            std::fs::write(&applied, (i + 1).to_string()).map_err(io_err(&applied, "write"))?;
        }
        ctx.finish(
            &bar,
            format!("{} patch(es) applied over the base", derived.patches.len()),
        );
        let mut fragments = base.all_fragments();
        fragments.extend(derived.fragments.iter().cloned());
        configure(ctx, &fragments, base_dir)?;
        compile(ctx, base_dir)?;
        copy_outputs(&obj, out)
    })();
    let restored = restore_base(ctx, base, base_dir);
    result.and(restored)
}

/// Puts the base's sources and configuration back after a derived build
/// (or one that was interrupted): reverses the patches it applied, newest
/// first, and configures with the base's fragments. Objects stay: the next
/// build recompiles what differs. A tree that cannot be restored is
/// removed, and the next derived build builds the base again.
fn restore_base(ctx: &BuildContext<'_>, base: &KernelBuild, base_dir: &Path) -> Result<()> {
    let state = base_dir.join(DERIVED_STATE);
    if !state.is_dir() {
        return Ok(());
    }
    let (src, _, log) = tree(base_dir);
    let applied: usize = std::fs::read_to_string(state.join("applied"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let mut reversed = true;
    for i in (0..applied).rev() {
        let copy = state.join(format!("{i:03}.patch"));
        let ok = Command::new("patch")
            .args(["-p1", "-R", "--batch", "--no-backup-if-mismatch", "-d"])
            .arg(&src)
            .arg("-i")
            .arg(&copy)
            .output()
            .is_ok_and(|o| o.status.success());
        reversed &= ok;
    }
    let configured = reversed && configure(ctx, &base.all_fragments(), base_dir).is_ok();
    if !configured {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(f, "restoring the base tree failed: removing it")
            });
        for t in ["src", "out"] {
            let _ = std::fs::remove_dir_all(base_dir.join(t));
        }
    }
    std::fs::remove_dir_all(&state).map_err(io_err(&state, "remove derived-build state"))
}

/// `make` with the fixed build identity, in `src` with objects in `obj`.
fn make(src: &Path, obj: &Path, jobs: usize) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(src)
        .arg(format!("O={}", obj.display()))
        .arg(format!("-j{jobs}"))
        .arg("ARCH=x86")
        // Without this, setlocalversion may append "+" when the cache lies
        // inside some git checkout, changing the release string.
        .arg("LOCALVERSION=")
        .env("KBUILD_BUILD_TIMESTAMP", BUILD_TIMESTAMP)
        .env("KBUILD_BUILD_USER", BUILD_USER)
        .env("KBUILD_BUILD_HOST", BUILD_HOST)
        .env("KBUILD_BUILD_VERSION", "1")
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .env_remove("CROSS_COMPILE")
        .env_remove("KCFLAGS")
        .env_remove("KCONFIG_CONFIG");
    cmd
}

/// Extracts the source tarball `member` of the `.deb` into `dest`, dropping
/// the tarball's top directory (`linux-source-6.1/`).
fn extract_source(
    deb: &Path,
    package: &str,
    member: &str,
    dest: &Path,
    only: Option<&std::collections::BTreeSet<PathBuf>>,
    bar: &ProgressBar,
) -> Result<()> {
    let member = member.trim_start_matches('/');
    let result = debian::stream_member(deb, member, bar, |tarball| {
        let mut archive = tar::Archive::new(xz2::read::XzDecoder::new(tarball));
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        for entry in archive
            .entries()
            .map_err(io_err(deb, "read source tarball"))?
        {
            let mut entry = entry.map_err(io_err(deb, "read source tarball entry"))?;
            let path = entry
                .path()
                .map_err(io_err(deb, "read source tarball path"))?
                .into_owned();
            let mut parts = path.components();
            parts.next(); // the top directory
            let rest: PathBuf = parts.collect();
            if rest.as_os_str().is_empty() || only.is_some_and(|o| !o.contains(&rest)) {
                continue;
            }
            if !rest.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(ImageError::PackageContents {
                    package: package.to_string(),
                    detail: format!("unsafe path in source tarball: {}", path.display()),
                });
            }
            let target = dest.join(&rest);
            if only.is_some() {
                // The tarball's directory entries were skipped.
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err(parent, "create directory"))?;
                }
            }
            entry
                .unpack(&target)
                .map_err(io_err(&target, "extract source file"))?;
        }
        Ok(())
    });
    match result {
        Err(ImageError::PackageContents { detail, .. }) if detail.starts_with("has no file") => {
            let tarballs: Vec<String> = debian::list_members(deb, bar)?
                .into_iter()
                .filter(|m| m.contains(".tar"))
                .collect();
            Err(ImageError::PackageContents {
                package: package.to_string(),
                detail: format!("has no {member}; its tarballs: {tarballs:?}"),
            })
        }
        other => other,
    }
}

/// Checks that the patches of each recipe (a base's, then its own) apply
/// to the pristine source, without building: only the files the patches
/// touch are extracted, once for all recipes (which share one source).
/// Returns each recipe's name with its result.
pub fn check_patches<'r>(
    ctx: &BuildContext<'_>,
    recipes: &[(&'r str, &KernelBuild)],
) -> Result<Vec<(&'r str, Result<()>)>> {
    let Some((_, first)) = recipes.first() else {
        return Ok(Vec::new());
    };
    let mut touched = std::collections::BTreeSet::new();
    for (_, recipe) in recipes {
        for patch in recipe.all_patches() {
            let path = ctx.root.join(&patch);
            let text = std::fs::read_to_string(&path).map_err(io_err(&path, "read patch"))?;
            touched.extend(patched_files(&text));
        }
    }
    let scratch = ctx
        .dirs
        .build
        .join(format!("patch-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let pristine = scratch.join("pristine");
    std::fs::create_dir_all(&pristine).map_err(io_err(&pristine, "create directory"))?;
    let result = (|| {
        let bar = ctx.bytes_bar("extract");
        let deb = debian::fetch(&first.source, ctx.store, &bar)?;
        let member = first
            .source_tarball
            .clone()
            .unwrap_or_else(|| format!("usr/src/{}.tar.xz", first.source.package));
        extract_source(
            &deb,
            &first.source.package,
            &member,
            &pristine,
            Some(&touched),
            &bar,
        )?;
        ctx.finish(
            &bar,
            format!("{} file(s) patched by the recipes", touched.len()),
        );
        let mut results = Vec::new();
        for (i, (name, recipe)) in recipes.iter().enumerate() {
            let work = scratch.join(format!("{i}"));
            let copied = Command::new("cp")
                .arg("-a")
                .arg(&pristine)
                .arg(&work)
                .status()
                .map_err(|source| ImageError::MissingTool {
                    program: "cp".into(),
                    source,
                })?;
            if !copied.success() {
                return Err(io_err(&work, "copy pristine files")(std::io::Error::other(
                    "cp -a failed",
                )));
            }
            let log = scratch.join(format!("{i}.log"));
            let applied = recipe
                .all_patches()
                .iter()
                .try_for_each(|p| apply_patch(&ctx.root.join(p), p, &work, &log));
            results.push((*name, applied));
        }
        Ok(results)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// The files a unified diff changes (paths after `+++ b/`).
fn patched_files(patch: &str) -> Vec<PathBuf> {
    patch
        .lines()
        .filter_map(|l| l.strip_prefix("+++ "))
        .filter_map(|p| p.split_whitespace().next())
        .filter_map(|p| p.split_once('/').map(|(_, rest)| PathBuf::from(rest)))
        .collect()
}

/// Applies one `-p1` patch; on failure names the patch and the hunks that
/// failed (from `patch`'s own report).
fn apply_patch(path: &Path, shown: &Path, src: &Path, log: &Path) -> Result<()> {
    if !path.is_file() {
        return Err(ImageError::PatchFailed {
            patch: shown.to_path_buf(),
            hunks: "  file not found".into(),
        });
    }
    let output = Command::new("patch")
        .args([
            "-p1",
            "--batch",
            "--forward",
            "--no-backup-if-mismatch",
            "-d",
        ])
        .arg(src)
        .arg("-i")
        .arg(path)
        .output()
        .map_err(|source| ImageError::MissingTool {
            program: "patch".into(),
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| {
            use std::io::Write;
            writeln!(f, "$ patch -p1 -i {}\n{text}", path.display())
        });
    if output.status.success() {
        return Ok(());
    }
    Err(ImageError::PatchFailed {
        patch: shown.to_path_buf(),
        hunks: describe_patch_failure(&text),
    })
}

/// Keeps the lines of `patch` output that say which file and hunk failed.
fn describe_patch_failure(output: &str) -> String {
    let mut current_file = String::new();
    let mut lines = Vec::new();
    for line in output.lines() {
        if let Some(file) = line.strip_prefix("patching file ") {
            current_file = file.to_string();
        } else if line.starts_with("Hunk #") && line.contains("FAILED") {
            lines.push(format!("  {current_file}: {line}"));
        } else if line.contains("can't find file")
            || line.contains("malformed patch")
            || line.contains("Only garbage")
            || line.contains("Reversed (or previously applied)")
            || line.contains("No file to patch")
        {
            lines.push(format!("  {line}"));
        }
    }
    if lines.is_empty() {
        output
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        lines.join("\n")
    }
}

/// What the fragments ask for: option -> (value, fragment that set it last).
/// `n` stands for "# CONFIG_X is not set".
pub(crate) type WantedOptions = BTreeMap<String, (String, PathBuf)>;

/// Parses the fragments in order, writes their concatenation to `merged`
/// (for `KCONFIG_ALLCONFIG`) and returns the effective wanted values.
pub(crate) fn merge_fragments(
    root: &Path,
    fragments: &[PathBuf],
    merged: &Path,
) -> Result<WantedOptions> {
    let mut wanted = WantedOptions::new();
    let mut text = String::new();
    for fragment in fragments {
        let path = root.join(fragment);
        let content =
            std::fs::read_to_string(&path).map_err(io_err(&path, "read config fragment"))?;
        for (option, value) in parse_fragment(&content, fragment)? {
            wanted.insert(option, (value, fragment.clone()));
        }
        text.push_str(&format!("# --- {}\n", fragment.display()));
        text.push_str(&content);
        text.push('\n');
    }
    std::fs::write(merged, text).map_err(io_err(merged, "write merged fragments"))?;
    Ok(wanted)
}

/// Parses one fragment into (option, value) pairs in file order.
pub(crate) fn parse_fragment(content: &str, shown: &Path) -> Result<Vec<(String, String)>> {
    let mut options = Vec::new();
    for (index, raw) in content.lines().enumerate() {
        let line = raw.trim();
        let bad = |detail: String| ImageError::BadFragment {
            path: shown.to_path_buf(),
            line: index + 1,
            detail,
        };
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim();
            if let Some(option) = comment.strip_suffix(" is not set") {
                if option.starts_with("CONFIG_") && !option.contains(' ') {
                    options.push((option.to_string(), "n".to_string()));
                }
            }
            continue;
        }
        let Some((option, value)) = line.split_once('=') else {
            return Err(bad(format!(
                "expected CONFIG_NAME=value or '# CONFIG_NAME is not set', got {line:?}"
            )));
        };
        if !option.starts_with("CONFIG_")
            || !option[7..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || option.len() == 7
        {
            return Err(bad(format!("{option:?} is not a CONFIG_ option name")));
        }
        if value.is_empty() {
            return Err(bad(format!("{option} has an empty value")));
        }
        options.push((option.to_string(), value.to_string()));
    }
    Ok(options)
}

/// Parses a `.config` into option -> value (options "not set" are absent).
pub(crate) fn parse_config(content: &str) -> HashMap<String, String> {
    content
        .lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Fails, naming each option, if the final `.config` differs from what the
/// fragments asked for.
pub(crate) fn check_config(wanted: &WantedOptions, config: &Path) -> Result<()> {
    let content = std::fs::read_to_string(config).map_err(io_err(config, "read .config"))?;
    let actual = parse_config(&content);
    let dropped = compare_config(wanted, &actual);
    if dropped.is_empty() {
        Ok(())
    } else {
        Err(ImageError::ConfigOptionsDropped(dropped))
    }
}

/// The options whose final value is not the one the fragments set.
pub(crate) fn compare_config(
    wanted: &WantedOptions,
    actual: &HashMap<String, String>,
) -> Vec<DroppedOption> {
    let mut dropped = Vec::new();
    for (option, (value, fragment)) in wanted {
        let got = actual.get(option).map(String::as_str).unwrap_or("n");
        if got != value {
            dropped.push(DroppedOption {
                option: option.clone(),
                wanted: value.clone(),
                got: got.to_string(),
                fragment: fragment.clone(),
            });
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patched_files_are_read_from_the_new_file_headers() {
        let patch =
            "header text\n--- a/fs/fs_context.c\n+++ b/fs/fs_context.c\t2024-01-01\n@@ -1 +1 @@\n\
                     -x\n+y\n--- /dev/null\n+++ b/kernel/krr/agent.c\n@@ -0,0 +1 @@\n+z\n";
        assert_eq!(
            patched_files(patch),
            vec![
                PathBuf::from("fs/fs_context.c"),
                PathBuf::from("kernel/krr/agent.c")
            ]
        );
    }

    #[test]
    fn fragment_parsing_and_override_order() {
        let a = "# comment\nCONFIG_SMP=y\n# CONFIG_ACPI is not set\nCONFIG_NR_CPUS=8\n";
        let parsed = parse_fragment(a, Path::new("a.config")).unwrap();
        assert_eq!(
            parsed,
            vec![
                ("CONFIG_SMP".into(), "y".into()),
                ("CONFIG_ACPI".into(), "n".into()),
                ("CONFIG_NR_CPUS".into(), "8".into()),
            ]
        );
        let bad = parse_fragment("CONFIG_SMP=y\nSMP=y\n", Path::new("b.config")).unwrap_err();
        let msg = bad.to_string();
        assert!(msg.contains("b.config, line 2"), "{msg}");
        assert!(msg.contains("\"SMP\""), "{msg}");
        let empty = parse_fragment("CONFIG_X=\n", Path::new("c.config")).unwrap_err();
        assert!(empty.to_string().contains("CONFIG_X has an empty value"));
    }

    #[test]
    fn dropped_options_are_named() {
        let mut wanted = WantedOptions::new();
        wanted.insert("CONFIG_SMP".into(), ("y".into(), "base.config".into()));
        wanted.insert("CONFIG_ACPI".into(), ("n".into(), "base.config".into()));
        wanted.insert("CONFIG_KASAN".into(), ("y".into(), "kasan.config".into()));
        wanted.insert("CONFIG_NR_CPUS".into(), ("8".into(), "base.config".into()));
        let actual = parse_config(
            "CONFIG_SMP=y\n# CONFIG_ACPI is not set\n# CONFIG_KASAN is not set\nCONFIG_NR_CPUS=64\n",
        );
        let dropped = compare_config(&wanted, &actual);
        let names: Vec<_> = dropped.iter().map(|d| d.option.as_str()).collect();
        assert_eq!(names, ["CONFIG_KASAN", "CONFIG_NR_CPUS"]);
        let err = ImageError::ConfigOptionsDropped(dropped).to_string();
        assert!(err.contains("CONFIG_KASAN: kasan.config wants y, final .config has n"));
        assert!(err.contains("CONFIG_NR_CPUS: base.config wants 8, final .config has 64"));
    }

    #[test]
    fn patch_failure_names_file_and_hunk() {
        let out = "patching file mm/slub.c\nHunk #1 succeeded at 10.\n\
                   Hunk #2 FAILED at 200.\n1 out of 2 hunks FAILED -- saving rejects\n";
        let text = describe_patch_failure(out);
        assert_eq!(text, "  mm/slub.c: Hunk #2 FAILED at 200.");
    }
}
