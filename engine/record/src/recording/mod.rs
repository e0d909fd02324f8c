// SPDX-License-Identifier: GPL-2.0-or-later
//! The recording directory: everything one recording needs to be replayed
//! and checked, self-described.
//!
//! ```text
//! $KRR_RECORDINGS/NAME/            (default parent: results/recordings)
//!   header.json        RecordingHeader, written first (atomically)
//!   snapshot/
//!     memory.zst       guest RAM at the start (layout below)
//!     cpus.json        Vec<CpuSnapshot>
//!     devices.json     the machine's device state (opaque JSON)
//!   events.krrlog      the event stream (super::log, kind "events")
//!   dma.krrlog         bytes devices wrote to guest memory (kind "dma")
//!   end.json           RecordingEnd, written last (atomically)
//! ```
//!
//! A directory without `end.json` is an unfinished recording: the engine
//! was killed or is still running. Its flushed prefix is still valid;
//! [`verify`] says where it ends.
//!
//! `snapshot/memory.zst` is one zstd frame (with zstd's content checksum)
//! of: the magic `"KRRMEM\0\0"`, u32 version (1), u32 region count, then
//! per region u64 guest-physical address and u64 length (little-endian),
//! then the regions' bytes in that order. The other snapshot files are
//! written to a temporary name and renamed, so a file under its final name
//! is complete.

mod load;
mod manifest;
mod stats;
mod verify;
mod writer;

#[cfg(test)]
pub(crate) use load::read_memory_image_at;
pub use load::{load_cpus, load_devices, load_end, load_header, load_memory_into};
pub use manifest::{
    CpuSnapshot, DigestCache, FileDigest, HostInfo, RecordingEnd, RecordingHeader, RingInfo,
};
pub use stats::{dump, stats, ClassStats, Stats};
pub use verify::{verify, VerifyReport, VerifyStatus};
pub use writer::RecordingWriter;

use crate::log::LogError;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Environment variable naming the directory recordings are kept in.
pub const RECORDINGS_ENV: &str = "KRR_RECORDINGS";
/// Default parent of recordings, relative to the current directory.
pub const DEFAULT_RECORDINGS_DIR: &str = "results/recordings";
/// File names inside a recording directory.
pub const HEADER_FILE: &str = "header.json";
pub const END_FILE: &str = "end.json";
pub const EVENTS_FILE: &str = "events.krrlog";
pub const DMA_FILE: &str = "dma.krrlog";
pub const SNAPSHOT_DIR: &str = "snapshot";
pub const MEMORY_FILE: &str = "memory.zst";
pub const CPUS_FILE: &str = "cpus.json";
pub const DEVICES_FILE: &str = "devices.json";
/// Magic and version of the memory image inside `memory.zst`.
pub(super) const MEMORY_MAGIC: [u8; 8] = *b"KRRMEM\0\0";
pub(super) const MEMORY_VERSION: u32 = 2;

/// Errors of the recording directory.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error(
        "{path} already exists and is not empty: refusing to overwrite a recording \
         (pick another name or remove it)"
    )]
    Exists { path: PathBuf },
    #[error(
        "no recording named {name} under {parent} (set {RECORDINGS_ENV}, or pass a path with a '/'){hint}"
    )]
    NotFound {
        name: String,
        parent: PathBuf,
        hint: String,
    },
    #[error("{path} is not a recording: it has no {HEADER_FILE}")]
    NotARecording { path: PathBuf },
    #[error(transparent)]
    Log(#[from] LogError),
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RecordingError + '_ {
    move |source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, problem: impl Into<String>) -> RecordingError {
    RecordingError::Invalid {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// The directory recordings are kept in: `$KRR_RECORDINGS`, else
/// `results/recordings` under the current directory.
pub fn recordings_dir() -> PathBuf {
    match std::env::var_os(RECORDINGS_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_RECORDINGS_DIR),
    }
}

/// The one rule for naming a recording (`krr replay`, `krr log`, the
/// harness): an argument with a `/` is a path (`./NAME`, `/abs/dir`); a
/// plain name, which is what `krr record --name` accepts, is a directory
/// under [`recordings_dir`], whatever the current directory holds.
pub fn resolve(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        recordings_dir().join(name_or_path)
    }
}

/// [`resolve`], checked: the directory exists and has a `header.json`.
pub fn find(name_or_path: &str) -> Result<PathBuf, RecordingError> {
    let dir = resolve(name_or_path);
    if !dir.exists() {
        let local = Path::new(name_or_path);
        let hint = if !name_or_path.contains('/') && local.join(HEADER_FILE).exists() {
            format!("; ./{name_or_path} is a recording: a path needs a '/', as in ./{name_or_path}")
        } else {
            String::new()
        };
        return Err(RecordingError::NotFound {
            name: name_or_path.to_string(),
            parent: recordings_dir(),
            hint,
        });
    }
    if !dir.join(HEADER_FILE).exists() {
        return Err(RecordingError::NotARecording { path: dir });
    }
    Ok(dir)
}

/// Writes `data` to `path` through a temporary file and a rename, so the
/// final name only ever holds a complete file.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), RecordingError> {
    let tmp = tmp_name(path);
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(data).map_err(io_err(&tmp))?;
    file.sync_data().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

pub(super) fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordingError> {
    let mut text = serde_json::to_vec_pretty(value)
        .map_err(|e| invalid(path, format!("cannot encode JSON: {e}")))?;
    text.push(b'\n');
    write_atomic(path, &text)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RecordingError> {
    let text = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|e| invalid(path, format!("invalid JSON: {e}")))
}
