// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask images`: build, list and clean guest images.

use crate::{repo_root, setup};
use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::MultiProgress;
use krr_orchestrator::images::{
    self, BuildContext, BuiltImage, ImageDirs, ImageRecipe, ImageSpec, KernelBuild,
};
use krr_orchestrator::manifest::{BugCase, Manifests};
use krr_orchestrator::store::Store;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ImagesCommand {
    /// Build images named in manifests/ (all buildable ones if none given);
    /// a cached image with the same recipe hash is reused.
    Build {
        names: Vec<String>,
        /// Rebuild even when the cache holds this recipe.
        #[arg(long)]
        force: bool,
    },
    /// Name, kind, built or not, files with sha256, recipe hash.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove built images (all, or the named ones) from the cache.
    Clean { names: Vec<String> },
    /// Check that every bug case's patches apply over its kernel's, without
    /// building (what `cargo xtask test` checks).
    CheckPatches,
    /// Build a one-off initramfs around static binaries.
    Initramfs {
        /// SRC[:DEST] (DEST defaults to /usr/local/bin/<name of SRC>).
        #[arg(long = "add", value_name = "SRC[:DEST]")]
        adds: Vec<String>,
        /// The command /init runs.
        #[arg(long)]
        run: String,
        #[arg(short, long)]
        out: PathBuf,
    },
}

/// Builds (or takes from the cache) `(image, file)` pairs and returns the
/// files' paths, in order: what the benchmarks and validations boot.
pub fn build_files(wanted: &[(&str, &str)]) -> Result<Vec<PathBuf>> {
    let mut names: Vec<String> = wanted.iter().map(|(image, _)| image.to_string()).collect();
    names.sort();
    names.dedup();
    let built = build(&names, false)?;
    wanted
        .iter()
        .map(|&(image, file)| {
            built
                .iter()
                .find(|b| b.name == image)
                .and_then(|b| b.file(file))
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow::anyhow!("image `{image}` has no `{file}`"))
        })
        .collect()
}

/// Builds (or takes from the cache) the named images.
pub fn build(names: &[String], force: bool) -> Result<Vec<BuiltImage>> {
    build_from(&crate::manifests::load_repo()?, names, force)
}

/// Builds (or takes from the cache) the named images of `manifests`.
pub fn build_from(manifests: &Manifests, names: &[String], force: bool) -> Result<Vec<BuiltImage>> {
    setup::ensure()?;
    let specs = images::specs_from_manifests(manifests)?;
    let chosen = images::select(&specs, names)?;
    build_specs(&chosen, force)
}

/// The images a bug case boots: its kernel, or (with `patches` or
/// `fragments`) the bug's kernel over it, named `<kernel>-<bug id>`; its
/// initramfs, or (with a trigger `program`) the initramfs plus that
/// program, named `<initramfs>-<bug id>`; its rootfs. Returns them built,
/// in that order, with the names to boot them by.
pub fn build_bug_images(
    manifests: &Manifests,
    bug: &BugCase,
) -> Result<(Vec<BuiltImage>, BugImageNames)> {
    setup::ensure()?;
    let specs = images::specs_from_manifests(manifests)?;
    let mut wanted: Vec<String> = vec![bug.kernel.clone()];
    wanted.extend(bug.initramfs.clone());
    wanted.extend(bug.rootfs.clone());
    let mut chosen = images::select(&specs, &wanted)?;
    let mut names = BugImageNames {
        kernel: bug.kernel.clone(),
        initramfs: bug.initramfs.clone(),
        rootfs: bug.rootfs.clone(),
    };
    if let Some(spec) = bug_kernel_spec(&chosen[0], bug)? {
        names.kernel = spec.name.clone();
        chosen[0] = spec;
    }
    if let (Some(program), Some(initramfs)) = (&bug.trigger.program, &bug.initramfs) {
        let slot = chosen
            .iter_mut()
            .find(|s| &s.name == initramfs)
            .context("the bug's initramfs among the chosen images")?;
        let ImageRecipe::Initramfs(base) = &slot.recipe else {
            anyhow::bail!("bug `{}`: image `{initramfs}` is not an initramfs", bug.id);
        };
        let mut with_trigger = base.clone();
        with_trigger.programs.push(program.clone());
        names.initramfs = Some(format!("{initramfs}-{}", bug.id));
        *slot = ImageSpec {
            name: format!("{initramfs}-{}", bug.id),
            recipe: ImageRecipe::Initramfs(with_trigger),
        };
    }
    Ok((build_specs(&chosen, false)?, names))
}

/// The kernel of a bug case with `patches` or `fragments`: `kernel` (the
/// spec of the bug's `kernel` image) extended by them.
fn bug_kernel_spec(kernel: &ImageSpec, bug: &BugCase) -> Result<Option<ImageSpec>> {
    if bug.patches.is_empty() && bug.fragments.is_empty() {
        return Ok(None);
    }
    let ImageRecipe::Kernel(base) = &kernel.recipe else {
        anyhow::bail!("bug `{}`: image `{}` is not a kernel", bug.id, bug.kernel);
    };
    Ok(Some(ImageSpec {
        name: format!("{}-{}", bug.kernel, bug.id),
        recipe: ImageRecipe::Kernel(KernelBuild {
            fragments: bug.fragments.clone(),
            patches: bug.patches.clone(),
            base: Some(Box::new(base.clone())),
            ..base.clone()
        }),
    }))
}

/// Checks that every bug case's patches apply over its kernel's (without
/// building): the source moves on, and a patch that stopped applying
/// should fail the tests, not the eval an hour in.
pub fn check_bug_patches(manifests: &Manifests, bugs: &[BugCase]) -> Result<usize> {
    setup::ensure()?;
    let specs = images::specs_from_manifests(manifests)?;
    let mut kernels = Vec::new();
    for bug in bugs {
        let base = images::select(&specs, std::slice::from_ref(&bug.kernel))?;
        if let Some(spec) = bug_kernel_spec(&base[0], bug)? {
            kernels.push(spec);
        }
    }
    let recipes: Vec<(&str, &KernelBuild)> = kernels
        .iter()
        .filter_map(|s| match &s.recipe {
            ImageRecipe::Kernel(k) => Some((s.name.as_str(), k)),
            _ => None,
        })
        .collect();
    let root = repo_root();
    let store = Store::open_default()?;
    let ctx = BuildContext::new(&root, &store, MultiProgress::new())?;
    let results = krr_orchestrator::images::kernel::check_patches(&ctx, &recipes)?;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e}")))
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("bug patches that do not apply:\n{}", failed.join("\n"));
    }
    Ok(results.len())
}

/// The names [`build_bug_images`] built a bug's images under.
pub struct BugImageNames {
    pub kernel: String,
    pub initramfs: Option<String>,
    pub rootfs: Option<String>,
}

fn build_specs(chosen: &[ImageSpec], force: bool) -> Result<Vec<BuiltImage>> {
    let root = repo_root();
    let store = Store::open_default()?;
    let mut ctx = BuildContext::new(&root, &store, MultiProgress::new())?;
    ctx.force = force;
    let mut built = Vec::new();
    for spec in chosen {
        let image =
            images::build(&ctx, spec).with_context(|| format!("building image `{}`", spec.name))?;
        if image.build_seconds > 0.0 {
            eprintln!(
                "built {} in {:.0} s: {}",
                image.name,
                image.build_seconds,
                image.dir.display()
            );
        } else {
            eprintln!("cached {}: {}", image.name, image.dir.display());
        }
        built.push(image);
    }
    Ok(built)
}

pub fn run(command: ImagesCommand) -> Result<()> {
    let root = repo_root();
    match command {
        ImagesCommand::Build { names, force } => {
            build(&names, force)?;
        }
        ImagesCommand::CheckPatches => {
            let manifests = crate::manifests::load_repo()?;
            let n = check_bug_patches(&manifests, &manifests.bugs)?;
            println!("{n} bug kernel(s): every patch applies");
        }
        ImagesCommand::List { json } => {
            let store = Store::open_default()?;
            let specs = images::specs_from_repo(&root)?;
            let statuses = images::list(&root, &ImageDirs::new(&store)?, &specs);
            if json {
                println!("{}", serde_json::to_string_pretty(&statuses)?);
            } else {
                print!("{}", images::format_list(&statuses));
            }
        }
        ImagesCommand::Clean { names } => {
            let store = Store::open_default()?;
            for removed in images::clean(&ImageDirs::new(&store)?, &names)? {
                println!("removed {}", removed.display());
            }
        }
        ImagesCommand::Initramfs { adds, run, out } => {
            setup::ensure()?;
            let store = Store::open_default()?;
            let specs = images::specs_from_repo(&root)?;
            let busybox = images::default_busybox(&specs)?;
            let adds = adds
                .iter()
                .map(|arg| images::parse_add(arg))
                .collect::<Result<Vec<_>, _>>()?;
            let ctx = BuildContext::new(&root, &store, MultiProgress::new())?;
            let path = images::build_adhoc_initramfs(&ctx, &busybox, &adds, &run, &out)?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
