// SPDX-License-Identifier: GPL-2.0-or-later
//! `cargo xtask validate`, `schema` and `fetch`: manifests and artifacts.

use crate::repo_root;
use anyhow::{anyhow, bail, Context, Result};
use krr_orchestrator::artifacts;
use krr_orchestrator::manifest::{self, Manifests};
use krr_orchestrator::store::{FetchOptions, Store};
use std::path::{Path, PathBuf};

/// The repository's manifests directory.
pub fn manifests_dir() -> PathBuf {
    repo_root().join("manifests")
}

/// Loads and validates the repository's manifests; every problem is printed
/// as `file:line:col: message` before failing.
pub fn load_repo() -> Result<Manifests> {
    load_with(&[])
}

/// Loads and validates the repository's manifests and `extra` manifest
/// files or directories (`--manifests`: a user's own workloads and bug
/// cases, whose paths are relative to their own file).
pub fn load_with(extra: &[PathBuf]) -> Result<Manifests> {
    let root = repo_root();
    for path in extra {
        if !path.exists() {
            bail!("--manifests {}: no such file or directory", path.display());
        }
    }
    manifest::load_dir_with(&root, &manifests_dir(), extra).map_err(|diagnostics| {
        eprintln!("{diagnostics}");
        let mut places = vec![manifests_dir().display().to_string()];
        places.extend(extra.iter().map(|p| p.display().to_string()));
        anyhow!(
            "{} problem(s) in {}",
            diagnostics.0.len(),
            places.join(", ")
        )
    })
}

/// The workloads and bug cases `all` has beyond the repository's own: what
/// `extra` manifest files declared (none, with no extra files).
pub fn declared_by_extra(all: &Manifests, extra: &[PathBuf]) -> Result<(Vec<String>, Vec<String>)> {
    if extra.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let repo = load_repo()?;
    let workloads = all
        .workloads
        .iter()
        .filter(|w| repo.workload(&w.name).is_none())
        .map(|w| w.name.clone())
        .collect();
    let bugs = all
        .bugs
        .iter()
        .filter(|b| repo.bug(&b.id).is_none())
        .map(|b| b.id.clone())
        .collect();
    Ok((workloads, bugs))
}

/// `cargo xtask validate [PATH..]`.
pub fn validate(paths: &[PathBuf]) -> Result<()> {
    let root = repo_root();
    let result = if paths.is_empty() {
        manifest::load_dir(&root, &manifests_dir())
    } else {
        for path in paths {
            if !path.exists() {
                bail!("{}: no such file", path.display());
            }
        }
        manifest::load_files(&root, paths, Some(&manifests_dir()))
    };
    match result {
        Ok(m) => {
            println!(
                "ok: {} image(s), {} workload(s), {} bug case(s), {} suite(s)",
                m.images.len(),
                m.workloads.len(),
                m.bugs.len(),
                m.suites.len()
            );
            Ok(())
        }
        Err(diagnostics) => {
            println!("{diagnostics}");
            bail!("{} problem(s) found", diagnostics.0.len())
        }
    }
}

/// `cargo xtask schema [-o FILE]`.
pub fn schema(out: Option<&Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(&manifest::json_schema())? + "\n";
    match out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// The main file of the repository's fetched (not built) image `name`,
/// downloaded and verified through the store when not there yet.
pub fn fetch_image(store: &Store, name: &str) -> Result<PathBuf> {
    let manifests = load_repo()?;
    let image = manifests.image(name).ok_or_else(|| {
        let names: Vec<&str> = manifests.images.iter().map(|i| i.name.as_str()).collect();
        anyhow!(
            "no image named `{name}` in {} (known: {})",
            manifests_dir().display(),
            names.join(", ")
        )
    })?;
    artifacts::fetch_image(store, image, &FetchOptions::default())
}

/// `cargo xtask fetch NAME` or `cargo xtask fetch --url URL --sha256 HEX`.
pub fn fetch(name: Option<&str>, url: Option<&str>, sha256: Option<&str>) -> Result<()> {
    let store = Store::open_default()?;
    let opts = FetchOptions::default();
    let path = match (name, url, sha256) {
        (Some(name), None, None) => fetch_image(&store, name)?,
        (None, Some(url), Some(sha256)) => store.fetch_url(url, sha256, &opts)?,
        (None, Some(_), None) => {
            bail!("--url needs --sha256 HEX (the expected SHA-256 of the file)")
        }
        _ => bail!("give either an image NAME or --url URL --sha256 HEX"),
    };
    println!("{}", path.display());
    Ok(())
}
