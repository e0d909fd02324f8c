// SPDX-License-Identifier: GPL-2.0-or-later
//! The content-addressed artifact store.
//!
//! Layout under the store root (`$KRR_CACHE`, else `<user cache dir>/krr`):
//!
//! ```text
//! blobs/sha256/<hex>          verified content, read-only; appears only by rename after verification
//! tmp/<hex>.part              partial HTTP download, resumed with a Range request by a later fetch
//! tmp/apt-<hex>-*/            scratch directories of `apt-get download`
//! locks/<name>.lock           advisory file locks serialising fetches/unpacks of one artifact
//! unpacked/<hex>-<format>     unpacked tree (or single decompressed file), created by rename
//! <kind>/                     derived artifacts (built images, ...) from `Store::dir`
//! ```
//!
//! Every writer works on a private temporary name and publishes with an atomic
//! rename while holding the artifact's lock, so concurrent processes never see
//! (or verify against) half-written content.

mod debian;
mod error;
mod fetch;
mod snapshot;
mod unpack;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use error::{Looked, StoreError};
pub use unpack::safe_unpack_tar;

/// Names of the store's own top-level directories; `Store::dir` refuses them.
const RESERVED_DIRS: [&str; 4] = ["blobs", "tmp", "locks", "unpacked"];

/// A content-addressed cache of downloaded artifacts and their unpacked forms.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    debian: DebianSources,
}

/// The environment variable naming the base URL of Debian's snapshot
/// archive (or of a mirror that serves its `/mr/` API and `/file/`).
pub const DEBIAN_SNAPSHOT_URL_VAR: &str = "KRR_DEBIAN_SNAPSHOT_URL";

/// Where Debian's snapshot archive is unless `KRR_DEBIAN_SNAPSHOT_URL` says
/// otherwise.
pub const DEFAULT_DEBIAN_SNAPSHOT_URL: &str = "https://snapshot.debian.org";

/// Where `Store::fetch_debian` looks for a pinned package that is not in the
/// store yet, in this order.
#[derive(Debug, Clone)]
pub struct DebianSources {
    /// The `apt-get` program: `apt-get download` through the host's
    /// configured apt sources.
    pub apt_get: PathBuf,
    /// Base URL of Debian's snapshot archive, asked when apt cannot supply
    /// the package (a mirror dropped the version). `None` skips it.
    pub snapshot_url: Option<String>,
    /// The Debian architecture whose `.deb` is taken from the snapshot
    /// archive (besides `all`); apt takes the host's own.
    pub architecture: String,
    /// How snapshot archive requests and downloads behave.
    pub fetch: FetchOptions,
}

impl DebianSources {
    /// apt-get from `PATH`, then the snapshot archive at
    /// `$KRR_DEBIAN_SNAPSHOT_URL` (unset or empty: snapshot.debian.org).
    pub fn from_env() -> DebianSources {
        let snapshot_url = match std::env::var(DEBIAN_SNAPSHOT_URL_VAR) {
            Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
            _ => DEFAULT_DEBIAN_SNAPSHOT_URL.to_string(),
        };
        DebianSources {
            apt_get: PathBuf::from("apt-get"),
            snapshot_url: Some(snapshot_url),
            architecture: host_debian_architecture().to_string(),
            fetch: FetchOptions {
                // The image builder draws its own bar for each package, and
                // apt's download shows none either.
                progress: false,
                ..FetchOptions::default()
            },
        }
    }
}

/// The Debian name of the architecture this program runs on, which is what
/// `apt-get download` would fetch.
pub fn host_debian_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "i386",
        "aarch64" => "arm64",
        "arm" => "armhf",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64el",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64" if cfg!(target_endian = "little") => "mips64el",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// How `Store::fetch_url` talks to HTTP servers.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Limit for establishing the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest time without receiving a byte (response headers or body)
    /// before the attempt fails; a server that stops sending fails here
    /// instead of hanging the harness.
    pub stall_timeout: Duration,
    /// Further attempts after the first fails with a transient error
    /// (network error, stall, truncated body, HTTP 408/429/5xx). Each retry
    /// resumes the partial download with a Range request.
    pub retries: u32,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            connect_timeout: Duration::from_secs(15),
            stall_timeout: Duration::from_secs(30),
            retries: 4,
            progress: true,
        }
    }
}

/// The archive or compression format of a blob, chosen by the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum UnpackFormat {
    #[serde(rename = "tar.gz")]
    TarGz,
    #[serde(rename = "tar.xz")]
    TarXz,
    #[serde(rename = "tar.zst")]
    TarZst,
    /// A single gzip-compressed file.
    #[serde(rename = "gz")]
    Gz,
    /// A single xz-compressed file.
    #[serde(rename = "xz")]
    Xz,
    /// A single zstd-compressed file.
    #[serde(rename = "zst")]
    Zst,
    /// A Debian package: its `data.tar.*` member is unpacked.
    #[serde(rename = "deb")]
    Deb,
}

impl UnpackFormat {
    /// The manifest spelling, also used in the unpacked directory's name.
    pub fn as_str(self) -> &'static str {
        match self {
            UnpackFormat::TarGz => "tar.gz",
            UnpackFormat::TarXz => "tar.xz",
            UnpackFormat::TarZst => "tar.zst",
            UnpackFormat::Gz => "gz",
            UnpackFormat::Xz => "xz",
            UnpackFormat::Zst => "zst",
            UnpackFormat::Deb => "deb",
        }
    }

    /// Whether the result is a directory tree (archives) rather than one file.
    pub fn is_archive(self) -> bool {
        matches!(
            self,
            UnpackFormat::TarGz | UnpackFormat::TarXz | UnpackFormat::TarZst | UnpackFormat::Deb
        )
    }
}

impl std::fmt::Display for UnpackFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UnpackFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "tar.gz" | "tgz" => UnpackFormat::TarGz,
            "tar.xz" | "txz" => UnpackFormat::TarXz,
            "tar.zst" | "tzst" => UnpackFormat::TarZst,
            "gz" => UnpackFormat::Gz,
            "xz" => UnpackFormat::Xz,
            "zst" => UnpackFormat::Zst,
            "deb" => UnpackFormat::Deb,
            other => {
                return Err(format!(
                "unknown unpack format '{other}': expected one of tar.gz, tar.xz, tar.zst, gz, xz, zst, deb"
            ))
            }
        })
    }
}

impl Store {
    /// Opens the store at `$KRR_CACHE` if set (and not empty), else at
    /// `<user cache dir>/krr` (e.g. `~/.cache/krr`).
    pub fn open_default() -> Result<Store, StoreError> {
        match std::env::var_os("KRR_CACHE") {
            Some(dir) if !dir.is_empty() => Store::open(PathBuf::from(dir)),
            _ => {
                let cache = dirs::cache_dir().ok_or(StoreError::NoCacheDir)?;
                Store::open(cache.join("krr"))
            }
        }
    }

    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        for sub in ["blobs/sha256", "tmp", "locks", "unpacked"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir)
                .map_err(|e| StoreError::io("cannot create store directory", &dir, e))?;
        }
        Ok(Store {
            root,
            debian: DebianSources::from_env(),
        })
    }

    /// The same store, looking for Debian packages in `sources` instead of
    /// the ones `DebianSources::from_env` gives.
    pub fn with_debian_sources(mut self, sources: DebianSources) -> Store {
        self.debian = sources;
        self
    }

    pub fn debian_sources(&self) -> &DebianSources {
        &self.debian
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the verified blob for `sha256` lives (whether or not it exists):
    /// `<root>/blobs/sha256/<hex>`, lower-cased. A malformed digest maps to
    /// `<root>/blobs/invalid-sha256`, a name the store never creates, so no
    /// input can point this outside the store (the fetch and unpack
    /// functions report malformed digests as errors).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        match normalize_sha256(sha256) {
            Ok(hex) => self.root.join("blobs").join("sha256").join(hex),
            Err(_) => self.root.join("blobs").join("invalid-sha256"),
        }
    }

    /// Whether a verified blob for `sha256` is present.
    pub fn has_blob(&self, sha256: &str) -> bool {
        normalize_sha256(sha256).is_ok() && self.blob_path(sha256).is_file()
    }

    /// Fetches `url` (http, https, file:// or a local path) unless the blob is
    /// already cached, verifies its sha256 and returns the blob path.
    pub fn fetch_url(
        &self,
        url: &str,
        sha256: &str,
        opts: &FetchOptions,
    ) -> Result<PathBuf, StoreError> {
        let sha256 = normalize_sha256(sha256)?;
        fetch::fetch_url(self, url, &sha256, opts)
    }

    /// Finds Debian package `package` at exactly `version`, verifies it
    /// against `sha256` and returns the blob path of the .deb. Looks in the
    /// store, then the system's apt (`apt-get download`), then Debian's
    /// snapshot archive (see [`DebianSources`]); the error of a package
    /// found nowhere names every place and why it failed there.
    pub fn fetch_debian(
        &self,
        package: &str,
        version: &str,
        sha256: &str,
    ) -> Result<PathBuf, StoreError> {
        let sha256 = normalize_sha256(sha256)?;
        debian::fetch_debian(self, package, version, &sha256)
    }

    /// Unpacks the verified blob `sha256` as `format` into
    /// `<root>/unpacked/<sha256>-<format>` (once; later calls return the
    /// existing result). Archives give a directory, single-file formats a file.
    pub fn unpack(&self, sha256: &str, format: UnpackFormat) -> Result<PathBuf, StoreError> {
        let sha256 = normalize_sha256(sha256)?;
        unpack::unpack_blob(self, &sha256, format)
    }

    /// A directory for derived artifacts of one kind (`<root>/<kind>/`),
    /// created if needed.
    pub fn dir(&self, kind: &str) -> Result<PathBuf, StoreError> {
        let plain = !kind.is_empty()
            && kind != "."
            && kind != ".."
            && kind
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !plain || RESERVED_DIRS.contains(&kind) {
            return Err(StoreError::InvalidKind {
                kind: kind.to_string(),
            });
        }
        let dir = self.root.join(kind);
        fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io("cannot create store directory", &dir, e))?;
        Ok(dir)
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Takes the exclusive advisory lock `<root>/locks/<name>.lock`, waiting
    /// for another thread or process that holds it. Released on drop.
    pub fn lock(&self, name: &str) -> Result<ArtifactLock, StoreError> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("cannot open lock file", &path, e))?;
        tracing::debug!(lock = %path.display(), "waiting for lock");
        fs4::FileExt::lock(&file).map_err(|e| StoreError::io("cannot lock", &path, e))?;
        Ok(ArtifactLock { _file: file })
    }

    /// Publishes a fully written, verified file as the blob for `sha256`:
    /// flushes it to disk, makes it read-only and renames it into place.
    pub(crate) fn publish_blob(
        &self,
        verified: &Path,
        sha256: &str,
    ) -> Result<PathBuf, StoreError> {
        let blob = self.blob_path(sha256);
        let file = File::open(verified).map_err(|e| StoreError::io("cannot open", verified, e))?;
        file.sync_all()
            .map_err(|e| StoreError::io("cannot flush", verified, e))?;
        let mut perms = file
            .metadata()
            .map_err(|e| StoreError::io("cannot stat", verified, e))?
            .permissions();
        perms.set_readonly(true);
        fs::set_permissions(verified, perms)
            .map_err(|e| StoreError::io("cannot make read-only", verified, e))?;
        fs::rename(verified, &blob)
            .map_err(|e| StoreError::io("cannot move into place", &blob, e))?;
        tracing::debug!(blob = %blob.display(), "published verified blob");
        Ok(blob)
    }
}

/// Removes leftovers named `<prefix>*` in `dir` from a process that died
/// while holding the same artifact lock (tempfile cleans up on every other
/// exit). Only call with that lock held. Failures are logged, not fatal:
/// a leftover wastes space but cannot be mistaken for a result.
pub(crate) fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(kind) if kind.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed leftover of an interrupted run")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover of an interrupted run")
            }
        }
    }
}

/// Holds an artifact's lock file locked; dropping closes the file, which
/// releases the lock.
pub struct ArtifactLock {
    _file: File,
}

/// Checks that `value` is a sha256 in hex and returns it lower-cased.
fn normalize_sha256(value: &str) -> Result<String, StoreError> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(StoreError::InvalidSha256 {
            value: value.to_string(),
        })
    }
}

/// The sha256 of a file's content, as 64 lower-case hex digits.
pub fn sha256_file(path: &Path) -> Result<String, StoreError> {
    let mut file = File::open(path).map_err(|e| StoreError::io("cannot open", path, e))?;
    let mut hasher = Sha256::new();
    hash_reader(&mut file, &mut hasher).map_err(|e| StoreError::io("cannot read", path, e))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Feeds everything `reader` yields into `hasher`; returns the byte count.
fn hash_reader(reader: &mut impl Read, hasher: &mut Sha256) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}
