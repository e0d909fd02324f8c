// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask images`: build, list and clean guest images.

use crate::{repo_root, setup};
use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::MultiProgress;
use krr_orchestrator::images::{self, BuildContext, BuiltImage, ImageDirs};
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
    setup::ensure()?;
    let root = repo_root();
    let store = Store::open_default()?;
    let specs = images::specs_from_repo(&root)?;
    let chosen = images::select(&specs, names)?;
    let mut ctx = BuildContext::new(&root, &store, MultiProgress::new())?;
    ctx.force = force;
    let mut built = Vec::new();
    for spec in &chosen {
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
