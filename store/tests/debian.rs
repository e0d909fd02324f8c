// SPDX-License-Identifier: GPL-2.0-or-later
//! Debian packages through the real system apt. The expected sha256 comes
//! from apt's own package index (`apt-cache show`), the same value a manifest
//! records. Needs a Debian-based host that reaches its Debian mirror; run as
//! root so that `apt-get update` can refresh empty package lists.

mod common;

use std::process::Command;
use std::sync::OnceLock;

use common::new_store;
use krr_store::{sha256_file, DebianSources, StoreError, UnpackFormat};

/// A small, long-lived package with a binary in /usr/bin.
const PACKAGE: &str = "hello";

/// (version, sha256) of the candidate version of `PACKAGE` in apt's index.
fn candidate() -> &'static (String, String) {
    static CANDIDATE: OnceLock<(String, String)> = OnceLock::new();
    CANDIDATE.get_or_init(|| {
        if let Some(found) = apt_cache_show() {
            return found;
        }
        let update = Command::new("apt-get")
            .args(["-q", "update"])
            .output()
            .expect("apt-get must be installed");
        assert!(
            update.status.success(),
            "apt-get update failed: {}",
            String::from_utf8_lossy(&update.stderr)
        );
        apt_cache_show().unwrap_or_else(|| panic!("apt knows no package '{PACKAGE}'"))
    })
}

fn apt_cache_show() -> Option<(String, String)> {
    let output = Command::new("apt-cache")
        .args(["show", "--no-all-versions", PACKAGE])
        .env("LC_ALL", "C")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_string())
    };
    Some((field("Version:")?, field("SHA256:")?))
}

#[test]
fn apt_package_is_downloaded_verified_and_unpacked() {
    let (version, sha) = candidate();
    let (_dir, store) = new_store();
    let blob = store.fetch_debian(PACKAGE, version, sha).unwrap();
    assert_eq!(blob, store.blob_path(sha));
    assert_eq!(&sha256_file(&blob).unwrap(), sha);
    // Cached now: same path again.
    assert_eq!(store.fetch_debian(PACKAGE, version, sha).unwrap(), blob);

    let tree = store.unpack(sha, UnpackFormat::Deb).unwrap();
    let binary = tree.join("usr/bin/hello");
    assert!(binary.is_file(), "{} missing", binary.display());
    let elf = std::fs::read(&binary).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let leftovers: Vec<_> = std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "apt scratch left behind: {leftovers:?}"
    );
}

#[test]
fn apt_package_with_wrong_sha256_is_discarded() {
    let (version, sha) = candidate();
    let (_dir, store) = new_store();
    let wrong = "0".repeat(64);
    let err = store.fetch_debian(PACKAGE, version, &wrong).unwrap_err();
    assert!(
        matches!(err, StoreError::DebianHashMismatch { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    for needle in [PACKAGE, version.as_str(), wrong.as_str(), sha.as_str()] {
        assert!(message.contains(needle), "'{needle}' not in: {message}");
    }
    assert!(!store.has_blob(&wrong) && !store.has_blob(sha));
    let leftovers: Vec<_> = std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "apt scratch left behind: {leftovers:?}"
    );
}

#[test]
fn unknown_version_is_a_clear_error() {
    let (_dir, store) = new_store();
    // apt alone: the snapshot archive has its own tests (tests/snapshot.rs).
    let store = store.with_debian_sources(DebianSources {
        snapshot_url: None,
        ..DebianSources::from_env()
    });
    let err = store
        .fetch_debian(PACKAGE, "0.0.0-krr-no-such-version", &"1".repeat(64))
        .unwrap_err();
    assert!(matches!(err, StoreError::DebianNotFound { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("hello=0.0.0-krr-no-such-version") && message.contains("not found"),
        "{message}"
    );
}

#[test]
fn malformed_package_names_never_reach_apt() {
    let (_dir, store) = new_store();
    let sha = "2".repeat(64);
    for (package, version) in [("-oFoo=1", "1.0"), ("Hello", "1.0"), ("hello", "--help")] {
        let err = store.fetch_debian(package, version, &sha).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StoreError::Apt { .. }), "{err:?}");
        assert!(message.contains("invalid"), "{message}");
    }
    let err = store.fetch_debian("hello", "1.0", "xyz").unwrap_err();
    assert!(matches!(err, StoreError::InvalidSha256 { .. }), "{err:?}");
}
