// SPDX-License-Identifier: GPL-2.0-or-later
//! Fetching URLs into the store: HTTP(S) with streaming verification, Range
//! resume, retries and stall detection; `file://` URLs and local paths by
//! verified copy.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::blocking::{Client, Response};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};

use super::{hash_reader, FetchOptions, Store, StoreError};

/// Where an artifact comes from.
enum Source {
    Http(Url),
    Local(PathBuf),
}

impl Source {
    fn parse(url: &str) -> Result<Source, StoreError> {
        let Some((scheme, _)) = url.split_once("://") else {
            if url.is_empty() {
                return Err(StoreError::UnsupportedUrl {
                    url: url.to_string(),
                });
            }
            return Ok(Source::Local(PathBuf::from(url)));
        };
        let parsed = || {
            Url::parse(url).map_err(|e| StoreError::InvalidUrl {
                url: url.to_string(),
                message: e.to_string(),
            })
        };
        match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => Ok(Source::Http(parsed()?)),
            "file" => {
                let path = parsed()?
                    .to_file_path()
                    .map_err(|()| StoreError::InvalidUrl {
                        url: url.to_string(),
                        message: "a file:// URL must name an absolute path on this machine (file:///path or file://localhost/path)".to_string(),
                    })?;
                Ok(Source::Local(path))
            }
            _ => Err(StoreError::UnsupportedUrl {
                url: url.to_string(),
            }),
        }
    }
}

pub(super) fn fetch_url(
    store: &Store,
    url: &str,
    sha256: &str,
    opts: &FetchOptions,
) -> Result<PathBuf, StoreError> {
    let blob = store.blob_path(sha256);
    if blob.is_file() {
        tracing::debug!(%url, blob = %blob.display(), "already in the store");
        return Ok(blob);
    }
    let source = Source::parse(url)?;
    let _lock = store.lock(sha256)?;
    // Another thread or process may have published it while we waited.
    if blob.is_file() {
        tracing::debug!(%url, blob = %blob.display(), "published by a concurrent fetch");
        return Ok(blob);
    }
    match source {
        Source::Local(path) => copy_local(store, url, &path, sha256, opts),
        Source::Http(parsed) => download_http(store, url, parsed, sha256, opts),
    }
}

/// Copies a local file into the store, hashing on the way; the copy is
/// published only if its digest matches.
fn copy_local(
    store: &Store,
    url: &str,
    path: &Path,
    sha256: &str,
    opts: &FetchOptions,
) -> Result<PathBuf, StoreError> {
    let mut src =
        File::open(path).map_err(|e| StoreError::io("cannot open source file", path, e))?;
    let len = src.metadata().map(|m| m.len()).ok();
    let tmp = store.tmp_dir();
    let prefix = format!("{sha256}.copy-");
    super::remove_stale(&tmp, &prefix);
    let mut out = tempfile::Builder::new()
        .prefix(&prefix)
        .tempfile_in(&tmp)
        .map_err(|e| StoreError::io("cannot create temporary file in", &tmp, e))?;
    let bar = progress_bar(opts, len, 0, url);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::io("cannot read source file", path, e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| StoreError::io("cannot write", out.path(), e))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        // `out` is deleted when dropped.
        return Err(StoreError::HashMismatch {
            url: url.to_string(),
            expected: sha256.to_string(),
            got,
        });
    }
    let verified = out.into_temp_path();
    let blob = store.publish_blob(&verified, sha256)?;
    // The temporary name no longer exists; stop it from being cleaned up.
    let _ = verified.keep();
    Ok(blob)
}

/// How one download attempt failed.
enum AttemptError {
    /// Worth another attempt (network trouble, stall, server overload).
    Transient(StoreError),
    /// Retrying cannot help (404, disk error, digest mismatch of a fresh download).
    Fatal(StoreError),
}

/// The HTTP client every store request uses; `url` only names the request
/// in the error.
pub(super) fn http_client(url: &str, opts: &FetchOptions) -> Result<Client, StoreError> {
    // In reqwest's blocking client `timeout` bounds the wait for the
    // response headers and, separately, every read of the body, so it acts
    // as a stall timeout and never cuts off a large download that is making
    // progress.
    Client::builder()
        .connect_timeout(opts.connect_timeout)
        .timeout(opts.stall_timeout)
        .user_agent(concat!("krr-orchestrator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| StoreError::Network {
            url: url.to_string(),
            message: format!("cannot create HTTP client: {}", error_chain(&e)),
        })
}

/// Downloads `url` into the blob for `sha256`; the caller holds its lock.
pub(super) fn download_http(
    store: &Store,
    url: &str,
    parsed: Url,
    sha256: &str,
    opts: &FetchOptions,
) -> Result<PathBuf, StoreError> {
    let client = http_client(url, opts)?;
    let part = store.tmp_dir().join(format!("{sha256}.part"));
    let attempts = opts.retries.saturating_add(1);
    let mut last_error = None;
    for attempt in 1..=attempts {
        if attempt > 1 {
            let delay = backoff(attempt - 1);
            tracing::info!(%url, attempt, ?delay, "retrying download");
            std::thread::sleep(delay);
        }
        match download_attempt(&client, url, &parsed, &part, sha256, opts) {
            Ok(()) => return store.publish_blob(&part, sha256),
            Err(AttemptError::Fatal(e)) => return Err(e),
            Err(AttemptError::Transient(e)) => {
                tracing::warn!(%url, attempt, attempts, error = %e, "download attempt failed");
                last_error = Some(e);
            }
        }
    }
    let last = last_error.expect("at least one attempt ran");
    if attempts == 1 {
        Err(last)
    } else {
        Err(StoreError::GaveUp {
            url: url.to_string(),
            attempts,
            last: Box::new(last),
        })
    }
}

/// Exponential backoff: 0.5 s, 1 s, 2 s, ... capped at 10 s.
pub(super) fn backoff(retry: u32) -> Duration {
    let millis = 500u64.saturating_mul(1u64 << retry.saturating_sub(1).min(16));
    Duration::from_millis(millis.min(10_000))
}

/// One GET of `parsed` into the partial file `part`, resuming from its
/// current length. On success `part` holds the complete, verified content.
fn download_attempt(
    client: &Client,
    url: &str,
    parsed: &Url,
    part: &Path,
    sha256: &str,
    opts: &FetchOptions,
) -> Result<(), AttemptError> {
    use AttemptError::{Fatal, Transient};
    let io_err = |action, e| Fatal(StoreError::io(action, part, e));

    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
        .map_err(|e| io_err("cannot open partial download", e))?;
    // The digest covers the whole file, so the bytes kept from an earlier
    // attempt are hashed again before appending.
    let mut hasher = Sha256::new();
    let mut offset = hash_reader(&mut file, &mut hasher)
        .map_err(|e| io_err("cannot read partial download", e))?;
    let resumed_from = offset;

    let mut request = client.get(parsed.clone());
    if offset > 0 {
        tracing::info!(%url, offset, "resuming partial download");
        request = request.header(RANGE, format!("bytes={offset}-"));
    }
    let response = request.send().map_err(|e| {
        if e.is_connect() {
            // Includes connect timeouts, which are not stalls.
            Transient(network_error(url, &e))
        } else if e.is_timeout() {
            Transient(StoreError::Stalled {
                url: url.to_string(),
                timeout: opts.stall_timeout,
                received: offset,
            })
        } else if e.is_redirect() || e.is_builder() {
            Fatal(network_error(url, &e))
        } else {
            Transient(network_error(url, &e))
        }
    })?;

    let status = response.status();
    match status {
        StatusCode::PARTIAL_CONTENT if offset > 0 => {
            let content_range = header_str(&response, CONTENT_RANGE);
            if !content_range.starts_with(&format!("bytes {offset}-")) {
                discard(part);
                return Err(Transient(StoreError::BadContentRange {
                    url: url.to_string(),
                    offset,
                    content_range,
                }));
            }
        }
        StatusCode::OK => {
            if offset > 0 {
                tracing::info!(%url, offset, "server ignored the Range request; starting over");
                file.set_len(0)
                    .map_err(|e| io_err("cannot truncate partial download", e))?;
                hasher = Sha256::new();
                offset = 0;
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
            // The partial file may already hold everything.
            if hex::encode(hasher.clone().finalize()) == sha256 {
                tracing::info!(%url, "partial download was already complete");
                return file
                    .sync_all()
                    .map_err(|e| io_err("cannot flush partial download", e));
            }
            discard(part);
            return Err(Transient(StoreError::HttpStatus {
                url: url.to_string(),
                status: status.as_u16(),
            }));
        }
        _ => {
            let error = StoreError::HttpStatus {
                url: url.to_string(),
                status: status.as_u16(),
            };
            let transient = status.is_server_error()
                || status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS;
            return Err(if transient {
                Transient(error)
            } else {
                Fatal(error)
            });
        }
    }

    file.seek(SeekFrom::Start(offset))
        .map_err(|e| io_err("cannot seek in partial download", e))?;
    let body_len = response.content_length();
    let bar = progress_bar(opts, body_len.map(|n| n + offset), offset, url);
    let received = stream_body(
        response,
        &mut file,
        &mut hasher,
        &bar,
        url,
        opts,
        offset,
        part,
    );
    bar.finish_and_clear();
    let received = received?;
    if let Some(expected_len) = body_len {
        if received != expected_len {
            return Err(Transient(StoreError::Network {
                url: url.to_string(),
                message: format!(
                    "body ended after {received} of {expected_len} bytes (Content-Length)"
                ),
            }));
        }
    }

    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        discard(part);
        let error = StoreError::HashMismatch {
            url: url.to_string(),
            expected: sha256.to_string(),
            got,
        };
        // A resumed download may have glued a stale prefix onto new content;
        // one fresh download settles that. A fresh mismatch is final.
        return Err(if resumed_from > 0 {
            Transient(error)
        } else {
            Fatal(error)
        });
    }
    file.sync_all()
        .map_err(|e| io_err("cannot flush partial download", e))?;
    Ok(())
}

/// Appends the response body to `file`, hashing it; returns the body bytes
/// received.
#[allow(clippy::too_many_arguments)]
fn stream_body(
    mut response: Response,
    file: &mut File,
    hasher: &mut Sha256,
    bar: &ProgressBar,
    url: &str,
    opts: &FetchOptions,
    offset: u64,
    part: &Path,
) -> Result<u64, AttemptError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let n = match response.read(&mut buf) {
            Ok(0) => return Ok(received),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                return Err(AttemptError::Transient(StoreError::Stalled {
                    url: url.to_string(),
                    timeout: opts.stall_timeout,
                    received: offset + received,
                }))
            }
            Err(e) => {
                return Err(AttemptError::Transient(StoreError::Network {
                    url: url.to_string(),
                    message: format!(
                        "connection broke after {} bytes: {}",
                        offset + received,
                        error_chain(&e)
                    ),
                }))
            }
        };
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| AttemptError::Fatal(StoreError::io("cannot write", part, e)))?;
        received += n as u64;
        bar.inc(n as u64);
    }
}

/// Whether a body read failed because reqwest's per-read timeout expired.
fn is_timeout(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::TimedOut {
        return true;
    }
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<reqwest::Error>())
        .is_some_and(reqwest::Error::is_timeout)
}

fn header_str(response: &Response, name: reqwest::header::HeaderName) -> String {
    response
        .headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

/// Removes a partial download that can no longer be resumed.
fn discard(part: &Path) {
    if let Err(e) = fs::remove_file(part) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(part = %part.display(), error = %e, "cannot remove partial download");
        }
    }
}

fn network_error(url: &str, e: &reqwest::Error) -> StoreError {
    StoreError::Network {
        url: url.to_string(),
        message: error_chain(e),
    }
}

/// An error and its causes, joined with ": " (reqwest's top-level message
/// alone hides the cause, e.g. "connection refused").
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

const BAR_TEMPLATE: &str = "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
const SPINNER_TEMPLATE: &str = "{spinner} {msg} {bytes} {bytes_per_sec}";

/// A byte progress bar on stderr; indicatif hides it when stderr is not a
/// terminal, and it is hidden outright when progress is off.
fn progress_bar(opts: &FetchOptions, total: Option<u64>, position: u64, url: &str) -> ProgressBar {
    if !opts.progress {
        return ProgressBar::hidden();
    }
    let name = url.rsplit('/').next().unwrap_or(url).to_string();
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        BAR_TEMPLATE
    } else {
        SPINNER_TEMPLATE
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(name);
    bar.set_position(position);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_millis(1000));
        assert_eq!(backoff(3), Duration::from_millis(2000));
        assert_eq!(backoff(30), Duration::from_secs(10));
    }

    #[test]
    fn progress_templates_are_valid() {
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(SPINNER_TEMPLATE).is_ok());
    }

    #[test]
    fn sources_are_classified() {
        assert!(matches!(
            Source::parse("https://example.org/a.tar.xz"),
            Ok(Source::Http(_))
        ));
        assert!(matches!(
            Source::parse("HTTP://example.org/a"),
            Ok(Source::Http(_))
        ));
        match Source::parse("file:///srv/a%20b.tar") {
            Ok(Source::Local(p)) => assert_eq!(p, PathBuf::from("/srv/a b.tar")),
            _ => panic!("file:// URL not parsed as a local path"),
        }
        match Source::parse("images/x.img") {
            Ok(Source::Local(p)) => assert_eq!(p, PathBuf::from("images/x.img")),
            _ => panic!("plain path not taken as a local path"),
        }
        let err = Source::parse("ftp://example.org/a")
            .err()
            .expect("ftp refused");
        assert!(err.to_string().contains("ftp://example.org/a"), "{err}");
        let err = Source::parse("file://remote-host/a")
            .err()
            .expect("remote file refused");
        assert!(err.to_string().contains("file://remote-host/a"), "{err}");
    }
}
