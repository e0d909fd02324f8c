// SPDX-License-Identifier: GPL-2.0-or-later
//! Fetcher tests against the small HTTP/1.1 server of `common`, here made
//! to misbehave on purpose (truncate, stall, ignore Range, redirect, fail).
//! Also local sources and concurrent fetches by threads and by processes.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use krr_store::{sha256_file, FetchOptions, Store, StoreError};
use sha2::{Digest, Sha256};

/// A well-behaved reply for `body`, honouring `Range: bytes=N-`.
fn serve_bytes(stream: &mut TcpStream, request: &Request, body: &[u8]) {
    let start = request
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    match start {
        Some(start) if start < body.len() => {
            write_head(
                stream,
                "206 Partial Content",
                &[
                    ("Content-Length", (body.len() - start).to_string()),
                    (
                        "Content-Range",
                        format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
                    ),
                ],
            );
            let _ = stream.write_all(&body[start..]);
        }
        Some(_) => write_head(
            stream,
            "416 Range Not Satisfiable",
            &[("Content-Length", "0".to_string())],
        ),
        None => serve_full(stream, body),
    }
}

/// Sends the headers for all of `body` but only `sent` bytes of it, then
/// closes the connection.
fn serve_truncated(stream: &mut TcpStream, body: &[u8], sent: usize) {
    write_head(
        stream,
        "200 OK",
        &[("Content-Length", body.len().to_string())],
    );
    let _ = stream.write_all(&body[..sent]);
}

/// Keeps the connection open without sending anything until the server stops
/// (bounded by the server's lifetime).
fn stall(stop: &AtomicBool) {
    let started = Instant::now();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < SERVER_LIFETIME {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic, non-repeating test content.
fn test_content(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest(counter.to_le_bytes()));
        counter += 1;
    }
    out.truncate(len);
    out
}

/// Files under `dir` (recursively) whose name contains `needle`.
fn files_named(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_named(&path, needle));
        } else if entry.file_name().to_string_lossy().contains(needle) {
            found.push(path);
        }
    }
    found
}

#[test]
fn http_fetch_verifies_and_caches() {
    let body = test_content(300_000);
    let sha = sha256_hex(&body);
    let served = body.clone();
    let server = TestServer::start(move |_, req, stream, _| serve_bytes(stream, req, &served));
    let (_dir, store) = new_store();
    let url = server.url("/linux-6.1.tar.xz");

    let blob = store.fetch_url(&url, &sha, &quiet(0)).unwrap();
    assert_eq!(blob, store.blob_path(&sha));
    assert_eq!(blob, store.root().join("blobs/sha256").join(&sha));
    assert_eq!(std::fs::read(&blob).unwrap(), body);
    assert!(store.has_blob(&sha));
    assert_eq!(sha256_file(&blob).unwrap(), sha);
    assert!(
        std::fs::metadata(&blob).unwrap().permissions().readonly(),
        "blobs are read-only"
    );

    // Cached: no second request, also with an upper-case digest.
    let again = store
        .fetch_url(&url, &sha.to_ascii_uppercase(), &quiet(0))
        .unwrap();
    assert_eq!(again, blob);
    assert_eq!(server.requests().len(), 1);
    assert!(files_named(&store.root().join("tmp"), &sha).is_empty());
}

#[test]
fn hash_mismatch_names_url_expected_and_got_and_leaves_nothing() {
    let body = test_content(50_000);
    let actual = sha256_hex(&body);
    let expected = sha256_hex(b"something else");
    let served = body.clone();
    let server = TestServer::start(move |_, req, stream, _| serve_bytes(stream, req, &served));
    let (_dir, store) = new_store();
    let url = server.url("/bzImage");

    let err = store.fetch_url(&url, &expected, &quiet(3)).unwrap_err();
    assert!(
        matches!(err, StoreError::HashMismatch { .. }),
        "expected HashMismatch, got {err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&url), "{message}");
    assert!(message.contains(&expected), "{message}");
    assert!(message.contains(&actual), "{message}");
    // A fresh download that mismatches is not retried.
    assert_eq!(server.requests().len(), 1);
    assert!(!store.has_blob(&expected));
    assert!(!store.blob_path(&expected).exists());
    assert!(!store.blob_path(&actual).exists());
    assert!(files_named(&store.root().join("tmp"), &expected).is_empty());
    assert!(files_named(&store.root().join("blobs"), "").is_empty());
}

#[test]
fn truncated_download_resumes_with_range_in_a_later_fetch() {
    let body = test_content(200_000);
    let sha = sha256_hex(&body);
    let cut = 70_000;
    let served = body.clone();
    let server = TestServer::start(move |index, req, stream, _| {
        if index == 0 {
            serve_truncated(stream, &served, cut)
        } else {
            serve_bytes(stream, req, &served)
        }
    });
    let (_dir, store) = new_store();
    let url = server.url("/rootfs.img.zst");

    let err = store.fetch_url(&url, &sha, &quiet(0)).unwrap_err();
    assert!(err.to_string().contains(&url), "{err}");
    assert!(!store.has_blob(&sha));
    let part = store.root().join("tmp").join(format!("{sha}.part"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut as u64);

    let blob = store.fetch_url(&url, &sha, &quiet(0)).unwrap();
    assert_eq!(std::fs::read(&blob).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].header("range"), None);
    assert_eq!(requests[1].header("range"), Some("bytes=70000-"));
    assert!(!part.exists());
}

#[test]
fn truncated_download_resumes_within_one_fetch_by_retrying() {
    let body = test_content(150_000);
    let sha = sha256_hex(&body);
    let served = body.clone();
    let server = TestServer::start(move |index, req, stream, _| match index {
        0 => serve_truncated(stream, &served, 40_000),
        1 => serve_bytes(stream, req, &served[..]),
        _ => write_head(stream, "500 Unexpected", &[]),
    });
    let (_dir, store) = new_store();
    let blob = store
        .fetch_url(&server.url("/a.tar.gz"), &sha, &quiet(2))
        .unwrap();
    assert_eq!(std::fs::read(blob).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].header("range"), Some("bytes=40000-"));
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let body = test_content(120_000);
    let sha = sha256_hex(&body);
    let served = body.clone();
    let server = TestServer::start(move |index, _, stream, _| {
        if index == 0 {
            serve_truncated(stream, &served, 30_000)
        } else {
            // Ignores Range and sends everything with 200.
            serve_full(stream, &served)
        }
    });
    let (_dir, store) = new_store();
    let url = server.url("/x");
    assert!(store.fetch_url(&url, &sha, &quiet(0)).is_err());
    let blob = store.fetch_url(&url, &sha, &quiet(0)).unwrap();
    assert_eq!(std::fs::read(blob).unwrap(), body);
    assert_eq!(server.requests()[1].header("range"), Some("bytes=30000-"));
}

#[test]
fn resumed_download_that_mismatches_is_retried_from_scratch() {
    // The first attempt got a prefix of an old version of the file; the
    // resumed content does not verify, so the store starts over once.
    let old = test_content(100_000);
    let new: Vec<u8> = old.iter().map(|b| b ^ 0x5a).collect();
    let sha = sha256_hex(&new);
    let (old_served, new_served) = (old.clone(), new.clone());
    let server = TestServer::start(move |index, req, stream, _| match index {
        0 => serve_truncated(stream, &old_served, 10_000),
        _ => serve_bytes(stream, req, &new_served),
    });
    let (_dir, store) = new_store();
    let blob = store.fetch_url(&server.url("/f"), &sha, &quiet(3)).unwrap();
    assert_eq!(std::fs::read(blob).unwrap(), new);
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[1].header("range"), Some("bytes=10000-"));
    assert_eq!(requests[2].header("range"), None);
}

#[test]
fn not_found_is_a_clear_error_and_not_retried() {
    let server = TestServer::start(|_, _, stream, _| {
        write_head(
            stream,
            "404 Not Found",
            &[("Content-Length", "0".to_string())],
        )
    });
    let (_dir, store) = new_store();
    let url = server.url("/missing.tar.xz");
    let sha = sha256_hex(b"missing");
    let err = store.fetch_url(&url, &sha, &quiet(3)).unwrap_err();
    assert!(
        matches!(err, StoreError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&url) && message.contains("404"),
        "{message}"
    );
    assert_eq!(server.requests().len(), 1);
    assert!(!store.has_blob(&sha));
}

#[test]
fn server_errors_are_retried() {
    let body = test_content(10_000);
    let sha = sha256_hex(&body);
    let served = body.clone();
    let server = TestServer::start(move |index, req, stream, _| {
        if index == 0 {
            write_head(
                stream,
                "503 Service Unavailable",
                &[("Content-Length", "0".to_string())],
            )
        } else {
            serve_bytes(stream, req, &served)
        }
    });
    let (_dir, store) = new_store();
    let blob = store.fetch_url(&server.url("/y"), &sha, &quiet(1)).unwrap();
    assert_eq!(std::fs::read(blob).unwrap(), body);
    assert_eq!(server.requests().len(), 2);

    // With retries exhausted the error says how many attempts were made.
    let always_503 = TestServer::start(|_, _, stream, _| {
        write_head(
            stream,
            "503 Service Unavailable",
            &[("Content-Length", "0".to_string())],
        )
    });
    let url = always_503.url("/z");
    let err = store
        .fetch_url(&url, &sha256_hex(b"z"), &quiet(1))
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, StoreError::GaveUp { attempts: 2, .. }),
        "{err:?}"
    );
    assert!(
        message.contains(&url) && message.contains("503"),
        "{message}"
    );
}

#[test]
fn redirect_is_followed() {
    let body = test_content(20_000);
    let sha = sha256_hex(&body);
    let served = body.clone();
    let server = TestServer::start(move |_, req, stream, _| {
        if req.path == "/old/kernel.tar.xz" {
            write_head(
                stream,
                "302 Found",
                &[
                    ("Location", "/new/kernel.tar.xz".to_string()),
                    ("Content-Length", "0".to_string()),
                ],
            )
        } else if req.path == "/new/kernel.tar.xz" {
            serve_bytes(stream, req, &served)
        } else {
            write_head(
                stream,
                "404 Not Found",
                &[("Content-Length", "0".to_string())],
            )
        }
    });
    let (_dir, store) = new_store();
    let blob = store
        .fetch_url(&server.url("/old/kernel.tar.xz"), &sha, &quiet(0))
        .unwrap();
    assert_eq!(std::fs::read(blob).unwrap(), body);
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/old/kernel.tar.xz", "/new/kernel.tar.xz"]);
}

#[test]
fn stalled_body_fails_within_the_stall_timeout() {
    let body = test_content(100_000);
    let sha = sha256_hex(&body);
    let served = body.clone();
    let server = TestServer::start(move |_, _, stream, stop| {
        write_head(
            stream,
            "200 OK",
            &[("Content-Length", served.len().to_string())],
        );
        let _ = stream.write_all(&served[..1_000]);
        let _ = stream.flush();
        stall(stop);
    });
    let (_dir, store) = new_store();
    let url = server.url("/stalls");
    let opts = FetchOptions {
        stall_timeout: Duration::from_secs(1),
        ..quiet(0)
    };
    let started = Instant::now();
    let err = store.fetch_url(&url, &sha, &opts).unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            err,
            StoreError::Stalled {
                received: 1_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(&url), "{err}");
    // Fails at the stall timeout, not at some later, larger limit.
    assert!(
        elapsed < Duration::from_secs(10),
        "stall detected only after {elapsed:?}"
    );
    assert!(!store.has_blob(&sha));
}

#[test]
fn server_that_never_answers_fails_within_the_stall_timeout() {
    let server = TestServer::start(|_, _, _, stop| stall(stop));
    let (_dir, store) = new_store();
    let opts = FetchOptions {
        stall_timeout: Duration::from_secs(1),
        ..quiet(0)
    };
    let started = Instant::now();
    let err = store
        .fetch_url(&server.url("/silent"), &sha256_hex(b"s"), &opts)
        .unwrap_err();
    assert!(matches!(err, StoreError::Stalled { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn connection_refused_is_a_clear_error() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (_dir, store) = new_store();
    let url = format!("http://127.0.0.1:{port}/nothing-listens");
    let err = store
        .fetch_url(&url, &sha256_hex(b"n"), &quiet(0))
        .unwrap_err();
    assert!(matches!(err, StoreError::Network { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
}

#[test]
fn local_paths_and_file_urls() {
    let body = test_content(64_000);
    let sha = sha256_hex(&body);
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("busybox with space.tar.zst");
    std::fs::write(&src, &body).unwrap();

    let (_dir, store) = new_store();
    let blob = store
        .fetch_url(src.to_str().unwrap(), &sha, &quiet(0))
        .unwrap();
    assert_eq!(std::fs::read(&blob).unwrap(), body);

    let (_dir2, store2) = new_store();
    let url = reqwest::Url::from_file_path(&src).unwrap().to_string();
    assert!(url.starts_with("file:///") && url.contains("%20"), "{url}");
    let blob2 = store2.fetch_url(&url, &sha, &quiet(0)).unwrap();
    assert_eq!(std::fs::read(&blob2).unwrap(), body);

    // A mismatching local file leaves nothing behind.
    let (_dir3, store3) = new_store();
    let wrong = sha256_hex(b"wrong");
    let err = store3
        .fetch_url(src.to_str().unwrap(), &wrong, &quiet(0))
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(src.to_str().unwrap())
            && message.contains(&wrong)
            && message.contains(&sha),
        "{message}"
    );
    for sub in ["blobs", "tmp", "unpacked"] {
        let left = files_named(&store3.root().join(sub), "");
        assert!(left.is_empty(), "{sub}/ holds {left:?} after a mismatch");
    }

    // A missing local file names the path.
    let missing = src_dir.path().join("missing.img");
    let err = store3
        .fetch_url(missing.to_str().unwrap(), &sha, &quiet(0))
        .unwrap_err();
    assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
}

#[test]
fn bad_inputs_are_refused_with_the_value_named() {
    let (_dir, store) = new_store();
    let err = store.fetch_url("/tmp/x", "abc123", &quiet(0)).unwrap_err();
    assert!(matches!(err, StoreError::InvalidSha256 { .. }), "{err:?}");
    assert!(err.to_string().contains("abc123"));
    // No digest, however malformed, names a path outside the store.
    for hostile in ["../../etc/passwd", "/etc/passwd", ""] {
        assert!(store
            .blob_path(hostile)
            .starts_with(store.root().join("blobs")));
        assert!(!store.has_blob(hostile));
    }
    let sha = sha256_hex(b"x");
    let err = store
        .fetch_url("ftp://mirror.example/x.tar", &sha, &quiet(0))
        .unwrap_err();
    assert!(
        err.to_string().contains("ftp://mirror.example/x.tar"),
        "{err}"
    );

    assert_eq!(store.dir("images").unwrap(), store.root().join("images"));
    assert!(store.root().join("images").is_dir());
    for kind in ["", "..", "a/b", "blobs", "tmp", "/abs"] {
        let err = store.dir(kind).unwrap_err();
        assert!(err.to_string().contains(&format!("'{kind}'")), "{err}");
    }
}

#[test]
fn concurrent_thread_fetches_download_once() {
    let body = test_content(400_000);
    let sha = sha256_hex(&body);
    let served = body.clone();
    // Slow enough that the fetches overlap.
    let server = TestServer::start(move |_, _, stream, _| {
        write_head(
            stream,
            "200 OK",
            &[("Content-Length", served.len().to_string())],
        );
        for chunk in served.chunks(40_000) {
            let _ = stream.write_all(chunk);
            thread::sleep(Duration::from_millis(30));
        }
    });
    let (_dir, store) = new_store();
    let url = server.url("/shared.tar.xz");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (store, url, sha) = (store.clone(), url.clone(), sha.clone());
            thread::spawn(move || store.fetch_url(&url, &sha, &quiet(0)))
        })
        .collect();
    for handle in handles {
        let blob = handle.join().unwrap().unwrap();
        assert_eq!(blob, store.blob_path(&sha));
    }
    assert_eq!(std::fs::read(store.blob_path(&sha)).unwrap(), body);
    assert_eq!(server.requests().len(), 1, "one download for four fetches");
    assert!(files_named(&store.root().join("tmp"), &sha).is_empty());
}

/// Not a test of its own: the body of each child process of
/// `concurrent_process_fetches_download_once`, which runs this binary with
/// `--ignored --exact` and the parameters in the environment.
#[test]
#[ignore = "helper run as a child process by concurrent_process_fetches_download_once"]
fn child_process_fetch() {
    let root = std::env::var("KRR_TEST_CHILD_ROOT").expect("run by the parent test");
    let url = std::env::var("KRR_TEST_CHILD_URL").unwrap();
    let sha = std::env::var("KRR_TEST_CHILD_SHA").unwrap();
    let store = Store::open(root).unwrap();
    let blob = store.fetch_url(&url, &sha, &quiet(0)).unwrap();
    assert_eq!(sha256_file(&blob).unwrap(), sha);
}

#[test]
fn concurrent_process_fetches_download_once() {
    let body = test_content(600_000);
    let sha = sha256_hex(&body);
    let served = body.clone();
    let server = TestServer::start(move |_, _, stream, _| {
        write_head(
            stream,
            "200 OK",
            &[("Content-Length", served.len().to_string())],
        );
        for chunk in served.chunks(50_000) {
            let _ = stream.write_all(chunk);
            thread::sleep(Duration::from_millis(50));
        }
    });
    let (_dir, store) = new_store();
    let exe = std::env::current_exe().unwrap();
    // Both children start before either is waited for, so they overlap.
    let running: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["child_process_fetch", "--exact", "--ignored", "--nocapture"])
                .env("KRR_TEST_CHILD_ROOT", store.root())
                .env("KRR_TEST_CHILD_URL", server.url("/two-processes.img"))
                .env("KRR_TEST_CHILD_SHA", &sha)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in running {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "child failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("1 passed"),
            "child ran no fetch: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    assert_eq!(std::fs::read(store.blob_path(&sha)).unwrap(), body);
    assert_eq!(server.requests().len(), 1, "one download for two processes");
}
