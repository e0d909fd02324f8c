// SPDX-License-Identifier: GPL-2.0-or-later
//! Errors of the image builders. Each variant names the input (file, option,
//! package, patch) that caused it, so the message alone tells what to fix.

use std::path::PathBuf;

/// Why an image could not be built, listed or booted.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid image spec '{image}': {field} = {value:?}: expected {expected}")]
    InvalidSpec {
        image: String,
        field: &'static str,
        value: String,
        expected: String,
    },

    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    #[error("Debian package {package}: {detail}")]
    PackageContents { package: String, detail: String },

    #[error(
        "kernel config: {} option(s) set by the fragments did not survive olddefconfig:\n{}",
        .0.len(),
        .0.iter().map(|d| format!("  {d}")).collect::<Vec<_>>().join("\n")
    )]
    ConfigOptionsDropped(Vec<DroppedOption>),

    #[error("kernel config fragment {path}, line {line}: {detail}")]
    BadFragment {
        path: PathBuf,
        line: usize,
        detail: String,
    },

    #[error("patch {patch} does not apply:\n{hunks}")]
    PatchFailed { patch: PathBuf, hunks: String },

    #[error("{step} failed ({status}); log: {log}\n--- last lines ---\n{tail}")]
    CommandFailed {
        step: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error("{step}: no space left on device (in {path}); free disk space and rebuild")]
    DiskFull { step: String, path: PathBuf },

    #[error("cannot run {program}: {source} (is it installed? `cargo xtask setup` installs it)")]
    MissingTool {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("guest program {source_path}: {detail}")]
    GuestProgram {
        source_path: PathBuf,
        detail: String,
    },

    #[error("smoke boot: {detail}\n--- console tail ---\n{console_tail}")]
    SmokeBoot {
        detail: String,
        console_tail: String,
    },

    #[error("{path}: corrupt image metadata: {detail}")]
    BadMetadata { path: PathBuf, detail: String },
}

/// One option a fragment sets whose value changed in the final `.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedOption {
    /// e.g. `CONFIG_VIRTIO_BLK`.
    pub option: String,
    /// The value the fragment asked for (`y`, `8`, `"str"`, or `n` for "is not set").
    pub wanted: String,
    /// The value in the final `.config` (`n` when absent or "is not set").
    pub got: String,
    /// The fragment (last one in order) that set the option.
    pub fragment: PathBuf,
}

impl std::fmt::Display for DroppedOption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} wants {}, final .config has {} (unmet dependency or invalid value)",
            self.option,
            self.fragment.display(),
            self.wanted,
            self.got
        )
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Shorthand for wrapping an `io::Error` with the path and what was being done.
pub(crate) fn io_err(
    path: impl Into<PathBuf>,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io {
        path,
        action,
        source,
    }
}
