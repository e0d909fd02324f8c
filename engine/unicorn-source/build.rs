// SPDX-License-Identifier: GPL-2.0-or-later
//! Prepares the patched unicorn source under `$OUT_DIR/unicorn`: the
//! pristine `unicorn-engine-sys` crate, fetched once by URL and sha256
//! through the project's artifact store, with `patches/*.patch` applied in
//! name order. Files whose patched content did not change keep their
//! modification time, so the C build that follows rebuilds only what a
//! patch touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use krr_store::{FetchOptions, Store, UnpackFormat};

/// The crate Cargo.lock pins (its `checksum` is this sha256).
const CRATE: &str = "unicorn-engine-sys-2.1.5";
const CRATE_URL: &str =
    "https://static.crates.io/crates/unicorn-engine-sys/unicorn-engine-sys-2.1.5.crate";
const CRATE_SHA256: &str = "685282714d35a6fbfed0ae14d81bb11c91838bc7a165cac778321679a7bb91d8";

fn main() {
    println!("cargo:rerun-if-changed=patches");
    println!("cargo:rerun-if-env-changed=KRR_CACHE");
    if let Err(e) = prepare() {
        // A build script reports failure by panicking; the message is
        // what cargo shows.
        panic!("preparing the patched unicorn source: {e}");
    }
}

fn prepare() -> Result<(), String> {
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let store = Store::open_default().map_err(|e| e.to_string())?;
    let options = FetchOptions {
        progress: false,
        ..FetchOptions::default()
    };
    store
        .fetch_url(CRATE_URL, CRATE_SHA256, &options)
        .map_err(|e| format!("fetching {CRATE_URL}: {e}"))?;
    let unpacked = store
        .unpack(CRATE_SHA256, UnpackFormat::TarGz)
        .map_err(|e| format!("unpacking {CRATE}.crate: {e}"))?
        .join(CRATE);

    let scratch = out.join("unicorn.patching");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    }
    copy_tree(&unpacked, &scratch)?;
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for patch in patches(&manifest_dir.join("patches"))? {
        let status = Command::new("patch")
            .args(["-p1", "--batch", "--forward", "--quiet", "-d"])
            .arg(&scratch)
            .arg("-i")
            .arg(&patch)
            .status()
            .map_err(|e| {
                format!("running `patch` (GNU patch; `cargo xtask setup` installs it): {e}")
            })?;
        if !status.success() {
            return Err(format!(
                "{} does not apply to {CRATE} ({status})",
                patch.display()
            ));
        }
    }
    let dest = out.join("unicorn");
    sync_tree(&scratch, &dest)?;
    fs::remove_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    Ok(())
}

fn patches(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.extension().is_some_and(|x| x == "patch") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for entry in fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| format!("{}: {e}", from.display()))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry
            .file_type()
            .map_err(|e| format!("{}: {e}", src.display()))?
            .is_dir()
        {
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)
                .map_err(|e| format!("{} -> {}: {e}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Makes `to` hold exactly `from`'s files, rewriting only those whose
/// content differs.
fn sync_tree(from: &Path, to: &Path) -> Result<(), String> {
    fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let mut wanted = std::collections::HashSet::new();
    for entry in fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let entry = entry.map_err(|e| format!("{}: {e}", from.display()))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        wanted.insert(entry.file_name());
        if entry
            .file_type()
            .map_err(|e| format!("{}: {e}", src.display()))?
            .is_dir()
        {
            if dst.is_file() {
                fs::remove_file(&dst).map_err(|e| format!("{}: {e}", dst.display()))?;
            }
            sync_tree(&src, &dst)?;
        } else {
            let new = fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
            if fs::read(&dst).ok().as_deref() != Some(&new[..]) {
                if dst.is_dir() {
                    fs::remove_dir_all(&dst).map_err(|e| format!("{}: {e}", dst.display()))?;
                }
                fs::write(&dst, &new).map_err(|e| format!("{}: {e}", dst.display()))?;
            }
        }
    }
    for entry in fs::read_dir(to).map_err(|e| format!("{}: {e}", to.display()))? {
        let entry = entry.map_err(|e| format!("{}: {e}", to.display()))?;
        if !wanted.contains(&entry.file_name()) {
            let path = entry.path();
            let gone = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            gone.map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}
