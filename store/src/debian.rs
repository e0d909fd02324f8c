// SPDX-License-Identifier: GPL-2.0-or-later
//! Debian packages pinned by version and sha256: first through the system's
//! apt (`apt-get download` picks the configured mirror, proxy and signature
//! checks of the host), then from Debian's snapshot archive, which keeps
//! every version a mirror has dropped. The manifest's sha256 is checked
//! whichever place supplies the .deb.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{
    sha256_file, snapshot, Looked, Store, StoreError, DEBIAN_SNAPSHOT_URL_VAR,
    DEFAULT_DEBIAN_SNAPSHOT_URL,
};

/// `apt-get update` runs at most once per process, and only when apt does
/// not know a requested package or version.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);

pub(super) fn fetch_debian(
    store: &Store,
    package: &str,
    version: &str,
    sha256: &str,
) -> Result<PathBuf, StoreError> {
    let apt_error = |message: String| StoreError::Apt {
        package: package.to_string(),
        version: version.to_string(),
        message,
    };
    // Debian policy 5.6.1 / 5.6.12 character sets; also keeps a manifest
    // value from being read as an apt-get option.
    let valid_package = package.len() >= 2
        && package.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && package
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if !valid_package {
        return Err(apt_error(format!(
            "invalid package name '{package}': expected lower-case letters, digits, '+', '-', '.' (at least 2, starting with a letter or digit)"
        )));
    }
    let valid_version = !version.is_empty()
        && version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c));
    if !valid_version {
        return Err(apt_error(format!(
            "invalid version '{version}': expected a Debian version starting with a digit (letters, digits, '.', '+', '~', ':', '-')"
        )));
    }

    let blob = store.blob_path(sha256);
    if blob.is_file() {
        return Ok(blob);
    }
    let _lock = store.lock(sha256)?;
    if blob.is_file() {
        return Ok(blob);
    }

    let sources = store.debian_sources();
    let mut looked = Vec::new();
    let place = format!(
        "apt-get download {package}={version} (the host's apt sources, {})",
        sources.apt_get.display()
    );
    match fetch_with_apt(store, &sources.apt_get, package, version, sha256) {
        Ok(blob) => return Ok(blob),
        Err(Miss::Fatal(e)) => return Err(e),
        Err(Miss::Absent(why)) => {
            tracing::info!(%package, %version, %why, "apt cannot supply the pinned package");
            looked.push(Looked { place, why });
        }
    }
    if let Some(base) = &sources.snapshot_url {
        let place = format!(
            "Debian's snapshot archive {base} (base URL from {DEBIAN_SNAPSHOT_URL_VAR}, default {DEFAULT_DEBIAN_SNAPSHOT_URL})"
        );
        match snapshot::fetch(store, base, package, version, sha256) {
            Ok(blob) => return Ok(blob),
            Err(Miss::Fatal(e)) => return Err(e),
            Err(Miss::Absent(why)) => looked.push(Looked { place, why }),
        }
    }
    Err(StoreError::DebianNotFound {
        package: package.to_string(),
        version: version.to_string(),
        sha256: sha256.to_string(),
        looked,
    })
}

/// Why one place did not supply a package.
pub(super) enum Miss {
    /// The place lacks it or cannot be reached: look in the next one.
    Absent(String),
    /// Looking further cannot help (the pin disagrees with the archive, or
    /// the store itself failed).
    Fatal(StoreError),
}

/// `apt-get download package=version` into a scratch directory, verified and
/// published as the blob for `sha256`; the caller holds its lock.
fn fetch_with_apt(
    store: &Store,
    apt_get: &Path,
    package: &str,
    version: &str,
    sha256: &str,
) -> Result<PathBuf, Miss> {
    let tmp = store.tmp_dir();
    let prefix = format!("apt-{sha256}-");
    super::remove_stale(&tmp, &prefix);
    let scratch = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(&tmp)
        .map_err(|e| {
            Miss::Fatal(StoreError::io(
                "cannot create temporary directory in",
                &tmp,
                e,
            ))
        })?;
    let spec = format!("{package}={version}");
    let mut output = apt_download(apt_get, &spec, scratch.path()).map_err(Miss::Absent)?;
    if !output.status.success()
        && apt_does_not_know(&output)
        && !APT_UPDATED.swap(true, Ordering::SeqCst)
    {
        tracing::info!(%spec, "apt does not know the package or version; running apt-get update");
        let update = run_apt(apt_get, &["update"], scratch.path()).map_err(Miss::Absent)?;
        if !update.status.success() {
            return Err(Miss::Absent(format!(
                "apt did not know it, and apt-get update failed (it needs root): {}",
                stderr_text(&update)
            )));
        }
        output = apt_download(apt_get, &spec, scratch.path()).map_err(Miss::Absent)?;
    }
    if !output.status.success() {
        return Err(Miss::Absent(stderr_text(&output)));
    }

    let debs: Vec<PathBuf> = std::fs::read_dir(scratch.path())
        .map_err(|e| Miss::Fatal(StoreError::io("cannot list", scratch.path(), e)))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .collect();
    let deb = match debs.as_slice() {
        [one] => one,
        _ => {
            return Err(Miss::Absent(format!(
                "expected exactly one .deb in {}, found {}",
                scratch.path().display(),
                debs.len()
            )))
        }
    };
    let got = sha256_file(deb).map_err(Miss::Fatal)?;
    if got != sha256 {
        // `scratch` and the .deb in it are removed when dropped.
        return Err(Miss::Fatal(StoreError::DebianHashMismatch {
            package: package.to_string(),
            version: version.to_string(),
            from: format!(
                "apt-get download (the host's apt sources, {})",
                apt_get.display()
            ),
            expected: sha256.to_string(),
            got,
        }));
    }
    store.publish_blob(deb, sha256).map_err(Miss::Fatal)
}

fn apt_download(apt_get: &Path, spec: &str, dir: &Path) -> Result<Output, String> {
    run_apt(apt_get, &["download", spec], dir)
}

fn run_apt(apt_get: &Path, args: &[&str], dir: &Path) -> Result<Output, String> {
    tracing::debug!(?args, dir = %dir.display(), "running apt-get");
    let output = Command::new(apt_get)
        .args(["-q", "-o", "Dpkg::Use-Pty=0"])
        .args(args)
        .current_dir(dir)
        // The messages are matched below; keep them untranslated.
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} (is this a Debian-based system?): {e}",
                apt_get.display()
            )
        })?;
    tracing::debug!(status = ?output.status, stderr = %String::from_utf8_lossy(&output.stderr), "apt-get finished");
    Ok(output)
}

/// Whether apt failed because its package lists lack the package or version.
fn apt_does_not_know(output: &Output) -> bool {
    let stderr = String::from_utf8_lossy(&output.stderr).to_ascii_lowercase();
    [
        "unable to locate package",
        "was not found",
        "can't select",
        "no installation candidate",
        "couldn't find any package",
    ]
    .iter()
    .any(|needle| stderr.contains(needle))
}

/// apt's error lines (E:), or all of stderr when there are none.
fn stderr_text(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("E:"))
        .collect();
    let text = if errors.is_empty() {
        stderr.trim().to_string()
    } else {
        errors.join("; ")
    };
    if text.is_empty() {
        format!("apt-get exited with {}", output.status)
    } else {
        text
    }
}
