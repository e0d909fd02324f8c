// SPDX-License-Identifier: GPL-2.0-or-later
//! Debian packages as build inputs: download a pinned version with
//! `apt-get download`, verify its sha256 against the manifest, and read files
//! out of its data archive without installing it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use super::error::{io_err, ImageError, Result};
use crate::store::Store;

/// A Debian binary package pinned by version and by the sha256 of its `.deb`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebianPackageRef {
    pub package: String,
    pub version: String,
    pub sha256: String,
}

impl DebianPackageRef {
    /// Checks the fields' shapes so a typo is reported before any download.
    pub fn validate(&self, image: &str) -> Result<()> {
        let bad = |field, value: &str, expected: &str| ImageError::InvalidSpec {
            image: image.to_string(),
            field,
            value: value.to_string(),
            expected: expected.to_string(),
        };
        if self.package.is_empty()
            || !self
                .package
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        {
            return Err(bad(
                "package",
                &self.package,
                "a Debian package name ([a-z0-9+-.])",
            ));
        }
        if self.version.is_empty() || self.version.contains(char::is_whitespace) {
            return Err(bad(
                "version",
                &self.version,
                "a Debian version such as 6.1.192-2",
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("sha256", &self.sha256, "64 hex digits"));
        }
        Ok(())
    }
}

/// Returns the path of the verified `.deb` for `pkg` in the artifact store,
/// downloading it (`apt-get download`) unless already there.
pub fn fetch(pkg: &DebianPackageRef, store: &Store, bar: &ProgressBar) -> Result<PathBuf> {
    bar.set_message(format!("{}={}", pkg.package, pkg.version));
    Ok(store.fetch_debian(&pkg.package, &pkg.version, &pkg.sha256)?)
}

/// Streams the `.deb`'s data archive (`data.tar.{xz,zst,gz}`) to `visit`,
/// reporting compressed bytes read on `bar`.
fn with_data_tar<T>(
    deb: &Path,
    bar: &ProgressBar,
    visit: impl FnOnce(&mut tar::Archive<Box<dyn Read + '_>>) -> Result<T>,
) -> Result<T> {
    let file = File::open(deb).map_err(io_err(deb, "open package"))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    bar.set_length(size);
    bar.set_position(0);
    let mut archive = ar::Archive::new(bar.wrap_read(file));
    while let Some(entry) = archive.next_entry() {
        let entry = entry.map_err(io_err(deb, "read .deb (ar) member"))?;
        let name = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        if !name.starts_with("data.tar") {
            continue;
        }
        let decoder: Box<dyn Read> = if name.ends_with(".xz") {
            Box::new(xz2::read::XzDecoder::new(entry))
        } else if name.ends_with(".zst") {
            Box::new(zstd::stream::read::Decoder::new(entry).map_err(io_err(deb, "open zstd"))?)
        } else if name.ends_with(".gz") {
            Box::new(flate2::read::GzDecoder::new(entry))
        } else if name == "data.tar" {
            Box::new(entry)
        } else {
            return Err(ImageError::PackageContents {
                package: deb.display().to_string(),
                detail: format!("unsupported data member compression: {name}"),
            });
        };
        return visit(&mut tar::Archive::new(decoder));
    }
    Err(ImageError::PackageContents {
        package: deb.display().to_string(),
        detail: "no data.tar member; not a Debian binary package".into(),
    })
}

/// Normalises a tar member path (`./usr/src/x` -> `usr/src/x`).
fn member_name(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches("./").to_string()
}

/// Reads one file (e.g. `bin/busybox`) out of a `.deb` into memory.
pub fn read_member(deb: &Path, member: &str, bar: &ProgressBar) -> Result<Vec<u8>> {
    with_data_tar(deb, bar, |archive| {
        for entry in archive.entries().map_err(io_err(deb, "read data.tar"))? {
            let mut entry = entry.map_err(io_err(deb, "read data.tar entry"))?;
            let path = entry.path().map_err(io_err(deb, "read data.tar path"))?;
            if member_name(&path) == member {
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .map_err(io_err(deb, "read data.tar member"))?;
                return Ok(data);
            }
        }
        Err(ImageError::PackageContents {
            package: deb.display().to_string(),
            detail: format!("has no file {member}"),
        })
    })
}

/// Streams one file of a `.deb` (e.g. `usr/src/linux-source-6.1.tar.xz`)
/// into `sink` without buffering it whole.
pub fn stream_member(
    deb: &Path,
    member: &str,
    bar: &ProgressBar,
    sink: impl FnOnce(&mut dyn Read) -> Result<()>,
) -> Result<()> {
    with_data_tar(deb, bar, |archive| {
        for entry in archive.entries().map_err(io_err(deb, "read data.tar"))? {
            let mut entry = entry.map_err(io_err(deb, "read data.tar entry"))?;
            let path = entry.path().map_err(io_err(deb, "read data.tar path"))?;
            if member_name(&path) == member {
                return sink(&mut entry);
            }
        }
        Err(ImageError::PackageContents {
            package: deb.display().to_string(),
            detail: format!("has no file {member}"),
        })
    })
}

/// Lists the regular files in a `.deb`, for error messages and for finding
/// the source tarball of a `linux-source-*` package.
pub fn list_members(deb: &Path, bar: &ProgressBar) -> Result<Vec<String>> {
    with_data_tar(deb, bar, |archive| {
        let mut names = Vec::new();
        for entry in archive.entries().map_err(io_err(deb, "read data.tar"))? {
            let entry = entry.map_err(io_err(deb, "read data.tar entry"))?;
            if entry.header().entry_type().is_file() {
                let path = entry.path().map_err(io_err(deb, "read data.tar path"))?;
                names.push(member_name(&path));
            }
        }
        Ok(names)
    })
}
