// SPDX-License-Identifier: GPL-2.0-or-later
//! Debian's snapshot archive (snapshot.debian.org) as a source of pinned
//! packages that the configured mirrors dropped. Its machine-readable API
//! lists a binary package's versions and the sha1 of each version's files;
//! `/file/<sha1>` serves the bytes. The sha1 only locates the file: what is
//! verified is the manifest's sha256.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use reqwest::blocking::Client;
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::debian::Miss;
use super::fetch::{backoff, download_http, error_chain, http_client};
use super::{
    FetchOptions, Store, StoreError, DEBIAN_SNAPSHOT_URL_VAR, DEFAULT_DEBIAN_SNAPSHOT_URL,
};

/// Largest API answer read; a package's version list is far smaller, and a
/// server that sends more is not the archive.
const MAX_ANSWER: u64 = 16 << 20;

/// `/mr/binary/<package>/`
#[derive(Deserialize)]
struct Versions {
    result: Vec<ListedVersion>,
}

#[derive(Deserialize)]
struct ListedVersion {
    binary_version: String,
}

/// `/mr/binary/<package>/<version>/binfiles?fileinfo=1`
#[derive(Deserialize)]
struct BinFiles {
    result: Vec<BinFile>,
    #[serde(default)]
    fileinfo: HashMap<String, Vec<FileInfo>>,
}

#[derive(Deserialize)]
struct BinFile {
    hash: String,
    /// Absent in some answers; the file name says it then.
    #[serde(default)]
    architecture: Option<String>,
}

#[derive(Deserialize)]
struct FileInfo {
    name: String,
    #[serde(default)]
    archive_name: String,
    #[serde(default)]
    first_seen: String,
    #[serde(default)]
    path: String,
}

/// Finds `package`=`version` in the snapshot archive at `base`, downloads
/// the `.deb` for the configured architecture (or `all`) and publishes it as
/// the blob for `sha256` if it has that digest; the caller holds its lock.
pub(super) fn fetch(
    store: &Store,
    base: &str,
    package: &str,
    version: &str,
    sha256: &str,
) -> Result<PathBuf, Miss> {
    let sources = store.debian_sources();
    let opts = &sources.fetch;
    let base = parse_base(base).map_err(Miss::Absent)?;
    let client = http_client(base.as_str(), opts).map_err(|e| Miss::Absent(e.to_string()))?;

    let list_url = api_url(&base, &["mr", "binary", package, ""]);
    let versions: Versions = get_json(&client, &list_url, opts, "the archive has no such package")?;
    if !versions.result.iter().any(|v| v.binary_version == version) {
        let listed: Vec<&str> = versions
            .result
            .iter()
            .map(|v| v.binary_version.as_str())
            .collect();
        return Err(Miss::Absent(format!(
            "GET {list_url}: version {version} not listed (it lists {})",
            some_of(&listed)
        )));
    }

    let mut files_url = api_url(&base, &["mr", "binary", package, version, "binfiles"]);
    files_url.set_query(Some("fileinfo=1"));
    let files: BinFiles = get_json(
        &client,
        &files_url,
        opts,
        "the archive lists the version but has no files for it",
    )?;
    let wanted = sources.architecture.as_str();
    let mut candidates = Vec::new();
    let mut others = Vec::new();
    for file in &files.result {
        let infos = files
            .fileinfo
            .get(&file.hash)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let architecture = file
            .architecture
            .clone()
            .or_else(|| infos.iter().find_map(|i| architecture_of(&i.name)))
            .unwrap_or_else(|| "unknown".to_string());
        let is_sha1 = file.hash.len() == 40 && file.hash.bytes().all(|b| b.is_ascii_hexdigit());
        if !(architecture == wanted || architecture == "all") {
            others.push(architecture);
        } else if !is_sha1 {
            // It becomes part of a URL: only a sha1 may.
            others.push(format!(
                "{architecture} (hash '{}' is not a sha1)",
                file.hash
            ));
        } else {
            candidates.push((file.hash.to_ascii_lowercase(), infos.first()));
        }
    }
    if candidates.is_empty() {
        return Err(Miss::Absent(format!(
            "GET {files_url}: no file for architecture {wanted} or all (files listed: {})",
            some_of(&others)
        )));
    }

    let mut failures = Vec::new();
    let mut mismatch = None;
    for (sha1, info) in candidates {
        let file_url = api_url(&base, &["file", &sha1]);
        if let Some(info) = info {
            tracing::info!(url = %file_url, name = %info.name, archive = %info.archive_name,
                first_seen = %info.first_seen, path = %info.path,
                "fetching a pinned package from Debian's snapshot archive");
        }
        match download_http(store, file_url.as_str(), file_url.clone(), sha256, opts) {
            Ok(blob) => return Ok(blob),
            Err(StoreError::HashMismatch { url, expected, got }) => {
                mismatch.get_or_insert(StoreError::DebianHashMismatch {
                    package: package.to_string(),
                    version: version.to_string(),
                    from: url,
                    expected,
                    got,
                });
            }
            Err(e @ StoreError::Io { .. }) => return Err(Miss::Fatal(e)),
            Err(e) => failures.push(e.to_string()),
        }
    }
    match mismatch {
        Some(e) => Err(Miss::Fatal(e)),
        None => Err(Miss::Absent(failures.join("; "))),
    }
}

fn parse_base(base: &str) -> Result<Url, String> {
    let expected = || {
        format!(
            "{DEBIAN_SNAPSHOT_URL_VAR} is '{base}': expected an http:// or https:// URL such as {DEFAULT_DEBIAN_SNAPSHOT_URL}"
        )
    };
    let url = Url::parse(base).map_err(|e| format!("{}: {e}", expected()))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(expected());
    }
    Ok(url)
}

/// `base` with `segments` appended to its path, each percent-encoded, so a
/// version's `:` or `+` and a base with a path prefix both come out right.
fn api_url(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// The first few of `items` for a message: `a, b, c and 12 more`, or `none`.
fn some_of(items: &[impl AsRef<str>]) -> String {
    const SHOWN: usize = 8;
    if items.is_empty() {
        return "none".to_string();
    }
    let shown: Vec<&str> = items.iter().take(SHOWN).map(AsRef::as_ref).collect();
    let mut text = shown.join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

/// The architecture in a `.deb` file name (`name_version_arch.deb`).
fn architecture_of(file_name: &str) -> Option<String> {
    let stem = file_name.strip_suffix(".deb")?;
    Some(stem.rsplit_once('_')?.1.to_string())
}

/// GETs `url` and parses its JSON answer, retrying what may pass (network
/// trouble, HTTP 5xx, 408, 429) as the store's downloads do. `not_found` says
/// what a 404 means for this request.
fn get_json<T: DeserializeOwned>(
    client: &Client,
    url: &Url,
    opts: &FetchOptions,
    not_found: &str,
) -> Result<T, Miss> {
    let attempts = opts.retries.saturating_add(1);
    let mut last = String::new();
    for attempt in 1..=attempts {
        if attempt > 1 {
            std::thread::sleep(backoff(attempt - 1));
        }
        match get_once(client, url, not_found) {
            Ok(body) => {
                return serde_json::from_slice(&body).map_err(|e| {
                    Miss::Absent(format!(
                        "GET {url}: the answer is not the snapshot archive's JSON: {e}"
                    ))
                })
            }
            Err((false, why)) => return Err(Miss::Absent(why)),
            Err((true, why)) => {
                tracing::warn!(%url, attempt, attempts, %why, "snapshot archive request failed");
                last = why;
            }
        }
    }
    if attempts > 1 {
        last.push_str(&format!(" (gave up after {attempts} attempts)"));
    }
    Err(Miss::Absent(last))
}

/// One GET; the error says whether another attempt may succeed.
fn get_once(client: &Client, url: &Url, not_found: &str) -> Result<Vec<u8>, (bool, String)> {
    let response = client.get(url.clone()).send().map_err(|e| {
        let transient = !(e.is_builder() || e.is_redirect());
        (transient, format!("GET {url}: {}", error_chain(&e)))
    })?;
    let status = response.status();
    if status == StatusCode::NOT_FOUND {
        return Err((false, format!("GET {url}: HTTP {status} ({not_found})")));
    }
    if status != StatusCode::OK {
        let transient = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS;
        return Err((
            transient,
            format!("GET {url}: HTTP {status}, expected 200 OK"),
        ));
    }
    let mut body = Vec::new();
    response
        .take(MAX_ANSWER + 1)
        .read_to_end(&mut body)
        .map_err(|e| {
            (
                true,
                format!("GET {url}: reading the answer failed: {}", error_chain(&e)),
            )
        })?;
    if body.len() as u64 > MAX_ANSWER {
        return Err((
            false,
            format!(
                "GET {url}: answer longer than {MAX_ANSWER} bytes; not the snapshot archive's API"
            ),
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_keep_a_base_path_and_encode_segments() {
        let base = parse_base("http://127.0.0.1:8080/snap/").unwrap();
        assert_eq!(
            api_url(&base, &["mr", "binary", "busybox-static", ""]).as_str(),
            "http://127.0.0.1:8080/snap/mr/binary/busybox-static/"
        );
        let url = api_url(&base, &["file", "a/b"]);
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/snap/file/a%2Fb");
        let bare = parse_base("https://snapshot.debian.org").unwrap();
        assert_eq!(
            api_url(&bare, &["mr", "binary", "x", "1:2.0-1+b1", "binfiles"]).as_str(),
            "https://snapshot.debian.org/mr/binary/x/1:2.0-1+b1/binfiles"
        );
    }

    #[test]
    fn bad_base_urls_name_the_variable() {
        for base in ["ftp://example.org", "snapshot.debian.org", "mailto:x@y"] {
            let err = parse_base(base).unwrap_err();
            assert!(
                err.contains(DEBIAN_SNAPSHOT_URL_VAR) && err.contains(base),
                "{err}"
            );
        }
    }

    #[test]
    fn architecture_from_file_name() {
        assert_eq!(
            architecture_of("hello_2.10-3_amd64.deb").as_deref(),
            Some("amd64")
        );
        assert_eq!(
            architecture_of("linux-source-6.1_6.1.192-2_all.deb").as_deref(),
            Some("all")
        );
        assert_eq!(architecture_of("hello.dsc"), None);
    }

    #[test]
    fn long_lists_are_cut_in_messages() {
        let none: [&str; 0] = [];
        assert_eq!(some_of(&none), "none");
        assert_eq!(some_of(&["a", "b"]), "a, b");
        let many: Vec<String> = (0..11).map(|i| i.to_string()).collect();
        assert_eq!(some_of(&many), "0, 1, 2, 3, 4, 5, 6, 7 and 3 more");
    }
}
