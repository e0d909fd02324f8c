// SPDX-License-Identifier: GPL-2.0-or-later
//! Errors of the artifact store. Every message names the URL, path, package or
//! archive entry involved and says what was expected, so a failed `cargo xtask`
//! run can be acted on without reading the source.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    /// A filesystem operation on a store or source path failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Neither `KRR_CACHE` nor a user cache directory is available.
    #[error("cannot locate the artifact cache: KRR_CACHE is not set and the user's cache directory (XDG_CACHE_HOME or $HOME/.cache) is unknown; set KRR_CACHE to a writable directory")]
    NoCacheDir,

    /// A sha256 given by a caller or manifest is malformed.
    #[error("invalid sha256 '{value}': expected 64 hexadecimal digits")]
    InvalidSha256 { value: String },

    /// `Store::dir` was given a kind that is not a plain directory name.
    #[error("invalid store directory kind '{kind}': expected one plain name (letters, digits, '-', '_', '.'), not a path and not one of the store's own directories (blobs, tmp, locks, unpacked)")]
    InvalidKind { kind: String },

    /// The URL scheme is not one the store can fetch.
    #[error(
        "unsupported source '{url}': expected an http://, https:// or file:// URL or a local path"
    )]
    UnsupportedUrl { url: String },

    /// The URL has a supported scheme but cannot be parsed or used.
    #[error("invalid URL '{url}': {message}")]
    InvalidUrl { url: String, message: String },

    /// The downloaded or copied content does not have the expected digest.
    /// Nothing is left in the cache for `expected`.
    #[error(
        "sha256 mismatch for {url}: expected {expected}, got {got}; the download was discarded"
    )]
    HashMismatch {
        url: String,
        expected: String,
        got: String,
    },

    /// The server answered with a status other than 200/206.
    #[error("GET {url}: server answered HTTP {status}, expected 200 OK (or 206 Partial Content when resuming)")]
    HttpStatus { url: String, status: u16 },

    /// A 206 answer covers a different range than the one asked for.
    #[error(
        "GET {url}: asked for bytes {offset}- but the server sent Content-Range '{content_range}'"
    )]
    BadContentRange {
        url: String,
        offset: u64,
        content_range: String,
    },

    /// Connecting, sending or receiving failed (not a timeout).
    #[error("GET {url}: {message}")]
    Network { url: String, message: String },

    /// The server stopped sending for longer than the stall timeout.
    #[error("GET {url}: no data for {timeout:?} (stall timeout) after {received} bytes")]
    Stalled {
        url: String,
        timeout: Duration,
        received: u64,
    },

    /// Every attempt of a download failed; `last` is the final attempt's error.
    #[error("giving up on {url} after {attempts} attempts; last error: {last}")]
    GaveUp {
        url: String,
        attempts: u32,
        #[source]
        last: Box<StoreError>,
    },

    /// A package name or version that is not Debian's and so is never
    /// passed to apt-get or put into a URL.
    #[error("apt-get download {package}={version} failed: {message}")]
    Apt {
        package: String,
        version: String,
        message: String,
    },

    /// The .deb obtained (through apt, or from the URL in `from`) does not
    /// have the manifest's digest. A place that has the package at that
    /// version but other bytes means the pin is wrong, so no further place is
    /// tried.
    #[error("sha256 mismatch for Debian package {package}={version} from {from}: expected {expected}, got {got}; the .deb was discarded")]
    DebianHashMismatch {
        package: String,
        version: String,
        from: String,
        expected: String,
        got: String,
    },

    /// No place had the pinned package; `looked` says where the store looked,
    /// in order, and why each place failed.
    #[error(
        "Debian package {package}={version} (sha256 {sha256}) was found nowhere; looked in {}",
        looked_list(looked)
    )]
    DebianNotFound {
        package: String,
        version: String,
        sha256: String,
        looked: Vec<Looked>,
    },

    /// `unpack` was asked for a blob that has not been fetched and verified.
    #[error("no verified blob sha256:{sha256} in {}: fetch it before unpacking", root.display())]
    BlobMissing { sha256: String, root: PathBuf },

    /// An archive entry would land outside the target directory or could not
    /// be checked to stay inside it.
    #[error("refusing archive entry '{entry}' (unpacking into {}): {reason}", dest.display())]
    UnsafeEntry {
        entry: String,
        dest: PathBuf,
        reason: String,
    },

    /// The archive itself is malformed (bad compression, bad tar or ar header,
    /// missing member).
    #[error("malformed archive {archive}: {message}")]
    BadArchive { archive: String, message: String },
}

/// One place `Store::fetch_debian` looked for a package, and why it did not
/// get it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Looked {
    pub place: String,
    pub why: String,
}

impl std::fmt::Display for Looked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.place, self.why)
    }
}

fn looked_list(looked: &[Looked]) -> String {
    let items: Vec<String> = looked
        .iter()
        .enumerate()
        .map(|(i, l)| format!("({}) {l}", i + 1))
        .collect();
    items.join("; ")
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
