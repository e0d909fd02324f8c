// SPDX-License-Identifier: GPL-2.0-or-later
//! Pinned Debian packages from Debian's snapshot archive when apt cannot
//! supply them: a loopback server plays the archive's API (`/mr/binary/...`)
//! and file store (`/file/<sha1>`) for a synthetic package, and apt is a
//! program that does not exist, so it fails the same way on every host.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use krr_store::{DebianSources, Store, StoreError};
use serde_json::json;

const PACKAGE: &str = "krr-synthetic-tool";
/// An epoch and a `+` as in `busybox-static` 1:1.35.0-4+deb12u1+b1.
const VERSION: &str = "1:2.0-1+krr1";
const APT_GET: &str = "/nonexistent/krr-test/apt-get";

/// One `.deb` of the synthetic archive.
struct ArchiveFile {
    architecture: &'static str,
    sha1: &'static str,
    name: &'static str,
    bytes: Vec<u8>,
}

/// What the loopback server serves under `/snap`.
struct Archive {
    versions: Vec<&'static str>,
    files: Vec<ArchiveFile>,
}

fn deb_bytes(tag: &str) -> Vec<u8> {
    format!("!<arch>\nsynthetic .deb for {tag}\n").into_bytes()
}

/// The synthetic package at `VERSION` for amd64, and a decoy for arm64 that
/// must never be downloaded.
fn archive() -> Archive {
    Archive {
        versions: vec!["1:2.0-2", VERSION, "1:1.9-1"],
        files: vec![
            ArchiveFile {
                architecture: "arm64",
                sha1: "1111111111111111111111111111111111111111",
                name: "krr-synthetic-tool_2.0-1+krr1_arm64.deb",
                bytes: deb_bytes("arm64"),
            },
            ArchiveFile {
                architecture: "amd64",
                sha1: "2222222222222222222222222222222222222222",
                name: "krr-synthetic-tool_2.0-1+krr1_amd64.deb",
                bytes: deb_bytes("amd64"),
            },
        ],
    }
}

/// Plays the snapshot archive's machine-readable API and its `/file/`.
fn serve_archive(archive: Archive) -> TestServer {
    let archive = Arc::new(archive);
    TestServer::start(move |_, request, stream, _| {
        let list = format!("/snap/mr/binary/{PACKAGE}/");
        let files = format!("/snap/mr/binary/{PACKAGE}/{VERSION}/binfiles?fileinfo=1");
        let body = if request.path == list {
            let result: Vec<_> = archive
                .versions
                .iter()
                .map(|v| json!({"binary_version": v, "name": PACKAGE, "source": PACKAGE, "version": v}))
                .collect();
            json!({"_comment": "synthetic", "binary": PACKAGE, "result": result}).to_string()
        } else if request.path == files && archive.versions.contains(&VERSION) {
            let result: Vec<_> = archive
                .files
                .iter()
                .map(|f| json!({"architecture": f.architecture, "hash": f.sha1}))
                .collect();
            let fileinfo: serde_json::Map<_, _> = archive
                .files
                .iter()
                .map(|f| {
                    let info = json!([{"archive_name": "debian", "first_seen": "20260101T000000Z",
                        "name": f.name, "path": "/pool/main/k/krr-synthetic-tool", "size": f.bytes.len()}]);
                    (f.sha1.to_string(), info)
                })
                .collect();
            json!({"binary": PACKAGE, "binary_version": VERSION, "result": result, "fileinfo": fileinfo})
                .to_string()
        } else if let Some(file) = archive
            .files
            .iter()
            .find(|f| request.path == format!("/snap/file/{}", f.sha1))
        {
            return serve_full(stream, &file.bytes);
        } else {
            return write_head(
                stream,
                "404 Not Found",
                &[("Content-Length", "0".to_string())],
            );
        };
        serve_full(stream, body.as_bytes());
    })
}

/// A store whose apt always fails and whose snapshot archive is `server`.
fn snapshot_store(server: &TestServer) -> (tempfile::TempDir, Store) {
    let (dir, store) = new_store();
    let store = store.with_debian_sources(DebianSources {
        apt_get: PathBuf::from(APT_GET),
        snapshot_url: Some(server.url("/snap")),
        architecture: "amd64".to_string(),
        fetch: quiet(0),
    });
    (dir, store)
}

fn paths(server: &TestServer) -> Vec<String> {
    server.requests().into_iter().map(|r| r.path).collect()
}

fn assert_no_leftovers(store: &Store) {
    let leftovers: Vec<_> = std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn package_apt_cannot_get_comes_from_the_snapshot_archive_verified() {
    let archive = archive();
    let expected = archive.files[1].bytes.clone();
    let sha = sha256_hex(&expected);
    let server = serve_archive(archive);
    let (_dir, store) = snapshot_store(&server);

    let blob = store.fetch_debian(PACKAGE, VERSION, &sha).unwrap();
    assert_eq!(blob, store.blob_path(&sha));
    assert_eq!(std::fs::read(&blob).unwrap(), expected);
    assert_eq!(
        paths(&server),
        [
            format!("/snap/mr/binary/{PACKAGE}/"),
            format!("/snap/mr/binary/{PACKAGE}/{VERSION}/binfiles?fileinfo=1"),
            "/snap/file/2222222222222222222222222222222222222222".to_string(),
        ],
        "the amd64 file only, located by its sha1"
    );
    assert_no_leftovers(&store);

    // The store's cache comes before apt and the archive.
    assert_eq!(store.fetch_debian(PACKAGE, VERSION, &sha).unwrap(), blob);
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn architecture_all_is_taken_too() {
    let mut archive = archive();
    archive.files[1].architecture = "all";
    let sha = sha256_hex(&archive.files[1].bytes);
    let server = serve_archive(archive);
    let (_dir, store) = snapshot_store(&server);
    store.fetch_debian(PACKAGE, VERSION, &sha).unwrap();
    assert!(store.has_blob(&sha));
}

#[test]
fn snapshot_file_with_other_bytes_is_refused() {
    let archive = archive();
    let got = sha256_hex(&archive.files[1].bytes);
    let pinned = sha256_hex(b"the bytes the manifest was written for");
    let server = serve_archive(archive);
    let (_dir, store) = snapshot_store(&server);

    let err = store.fetch_debian(PACKAGE, VERSION, &pinned).unwrap_err();
    assert!(
        matches!(err, StoreError::DebianHashMismatch { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    let url = server.url("/snap/file/2222222222222222222222222222222222222222");
    for needle in [PACKAGE, VERSION, &pinned, &got, &url] {
        assert!(message.contains(needle), "'{needle}' not in: {message}");
    }
    assert!(!store.has_blob(&pinned) && !store.has_blob(&got));
    assert_no_leftovers(&store);
}

#[test]
fn version_the_archive_does_not_list_names_every_place_looked() {
    let mut archive = archive();
    archive.versions.retain(|v| *v != VERSION);
    let server = serve_archive(archive);
    let (_dir, store) = snapshot_store(&server);
    let sha = "3".repeat(64);

    let err = store.fetch_debian(PACKAGE, VERSION, &sha).unwrap_err();
    let StoreError::DebianNotFound { looked, .. } = &err else {
        panic!("expected DebianNotFound, got {err:?}");
    };
    assert_eq!(
        looked.len(),
        2,
        "apt, then the snapshot archive: {looked:?}"
    );
    let message = err.to_string();
    let list_url = server.url(&format!("/snap/mr/binary/{PACKAGE}/"));
    for needle in [
        PACKAGE,
        VERSION,
        // apt: its own message
        APT_GET,
        "cannot run",
        // the snapshot archive: where, and that it lists other versions
        &server.url("/snap"),
        &list_url,
        "not listed",
        "1:2.0-2",
    ] {
        assert!(message.contains(needle), "'{needle}' not in: {message}");
    }

    // A package the archive does not know: its 404 is named.
    let err = store
        .fetch_debian("krr-no-such-package", VERSION, &sha)
        .unwrap_err();
    let message = err.to_string();
    for needle in [
        "krr-no-such-package",
        APT_GET,
        "/snap/mr/binary/krr-no-such-package/",
        "HTTP 404",
    ] {
        assert!(message.contains(needle), "'{needle}' not in: {message}");
    }
    assert!(!store.has_blob(&sha));
    assert_no_leftovers(&store);
}

#[test]
fn unreachable_archive_is_named_with_the_cause() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (_dir, store) = new_store();
    let store = store.with_debian_sources(DebianSources {
        apt_get: PathBuf::from(APT_GET),
        snapshot_url: Some(url.clone()),
        architecture: "amd64".to_string(),
        fetch: quiet(0),
    });
    let err = store
        .fetch_debian(PACKAGE, VERSION, &"4".repeat(64))
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&url) && message.to_ascii_lowercase().contains("connect"),
        "{message}"
    );

    let sources = DebianSources {
        snapshot_url: Some("ftp://mirror.example".to_string()),
        ..store.debian_sources().clone()
    };
    let store = store.with_debian_sources(sources);
    let message = store
        .fetch_debian(PACKAGE, VERSION, &"4".repeat(64))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("KRR_DEBIAN_SNAPSHOT_URL") && message.contains("ftp://mirror.example"),
        "{message}"
    );
}
