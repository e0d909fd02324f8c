// SPDX-License-Identifier: GPL-2.0-or-later
//! Manifest sources resolved through the artifact store: the glue between
//! [`crate::manifest`] (what an image or file is) and [`crate::store`] (how
//! bytes are fetched, verified and unpacked).

use crate::manifest::{Fetch, FileSource, Image, ImageSource};
use crate::store::{FetchOptions, Store, UnpackFormat};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Fetches (or finds in the cache) a url or Debian source, verifies it,
/// unpacks it when asked, and returns the file `path` names inside it (or the
/// fetched/unpacked artifact itself when `path` is `None`).
pub fn fetch(
    store: &Store,
    fetch: &Fetch,
    path: Option<&str>,
    opts: &FetchOptions,
) -> Result<PathBuf> {
    let (unpacked, what) = match fetch {
        Fetch::Url {
            url,
            sha256,
            unpack,
        } => {
            let blob = store.fetch_url(url, sha256, opts)?;
            let unpacked = match unpack {
                Some(format) => store.unpack(sha256, *format)?,
                None => blob,
            };
            (unpacked, url.clone())
        }
        Fetch::Debian(pkg) => {
            let deb = store.fetch_debian(&pkg.package, &pkg.version, &pkg.sha256)?;
            let what = format!("Debian package {}={}", pkg.package, pkg.version);
            match path {
                // A file inside the package: unpack its data archive once.
                Some(_) => (store.unpack(&pkg.sha256, UnpackFormat::Deb)?, what),
                None => (deb, what),
            }
        }
    };
    let Some(inner) = path else {
        return Ok(unpacked);
    };
    if !unpacked.is_dir() {
        bail!("`path: {inner}` names a file inside {what}, but that source is a single file, not an archive");
    }
    let file = unpacked.join(inner.trim_start_matches('/'));
    if !file.exists() {
        bail!("{what} has no `{inner}` (looked in {})", unpacked.display());
    }
    Ok(file)
}

/// Where an image's main file is after fetching; images built from a recipe
/// are not fetched (see [`crate::images`]).
pub fn fetch_image(store: &Store, image: &Image, opts: &FetchOptions) -> Result<PathBuf> {
    let source = match &image.source {
        ImageSource::Url { url, sha256, unpack } => Fetch::Url {
            url: url.clone(),
            sha256: sha256.clone(),
            unpack: *unpack,
        },
        ImageSource::Debian(pkg) => Fetch::Debian(pkg.clone()),
        ImageSource::Build(recipe) => bail!(
            "image `{}` is built by the `{}` recipe, not fetched: use `cargo xtask images build {}`",
            image.name,
            recipe.name(),
            image.name
        ),
    };
    fetch(store, &source, image.path.as_deref(), opts)
        .with_context(|| format!("fetching image `{}`", image.name))
}

/// Fetches a [`FileSource`] (a kernel's vmlinux, a source tarball).
pub fn fetch_file(store: &Store, file: &FileSource, opts: &FetchOptions) -> Result<PathBuf> {
    fetch(store, &file.fetch, file.path.as_deref(), opts)
}
