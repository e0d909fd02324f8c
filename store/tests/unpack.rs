// SPDX-License-Identifier: GPL-2.0-or-later
//! Unpacking tests: well-formed tar.{gz,xz,zst}, single compressed files and
//! .deb packages (built with dpkg-deb), and hostile archives whose entries
//! try to leave the target directory.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use krr_store::{safe_unpack_tar, sha256_file, FetchOptions, Store, StoreError, UnpackFormat};
use tar::{EntryType, Header};

fn quiet() -> FetchOptions {
    FetchOptions {
        connect_timeout: Duration::from_secs(5),
        stall_timeout: Duration::from_secs(5),
        retries: 0,
        progress: false,
    }
}

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("cache")).unwrap();
    (dir, store)
}

/// Puts `bytes` into the store (through a local file) and returns its sha256.
fn add_blob(store: &Store, bytes: &[u8]) -> String {
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), bytes).unwrap();
    let sha = sha256_file(src.path()).unwrap();
    store
        .fetch_url(src.path().to_str().unwrap(), &sha, &quiet())
        .unwrap();
    sha
}

/// Appends an entry with exactly the given name and link name, bypassing the
/// path checks of `tar::Builder` so that hostile archives can be made.
fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    kind: EntryType,
    name: &str,
    link: &str,
    data: &[u8],
) {
    let mut header = Header::new_gnu();
    {
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_mode(if kind == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    header.set_size(data.len() as u64);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

fn archive(entries: &[(EntryType, &str, &str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (kind, name, link, data) in entries {
        raw_entry(&mut builder, *kind, name, link, data);
    }
    builder.into_inner().unwrap()
}

/// A well-formed tree with the kinds of entries real archives have.
fn good_tar() -> Vec<u8> {
    let long_name = format!("./usr/share/{}/deep.txt", "long-directory-name".repeat(8));
    let mut builder = tar::Builder::new(Vec::new());
    let mut entries: Vec<(EntryType, &str, &str, &[u8])> = vec![
        // As written first by `git archive` (e.g. kernel.org tarballs).
        (
            EntryType::XGlobalHeader,
            "pax_global_header",
            "",
            b"15 comment=abc\n",
        ),
        (EntryType::Directory, "./", "", b""),
        (EntryType::Directory, "./usr/", "", b""),
        (EntryType::Directory, "./usr/bin/", "", b""),
        (
            EntryType::Regular,
            "./usr/bin/tool",
            "",
            b"#!/bin/sh\necho tool\n",
        ),
        (EntryType::Symlink, "./usr/bin/alias", "tool", b""),
        (EntryType::Symlink, "./usr/lib/up", "../bin/tool", b""),
        (EntryType::Regular, "./etc/config", "", b"key=value\n"),
        (EntryType::Symlink, "./usr/bin/abs", "/etc/config", b""),
        (EntryType::Link, "./usr/bin/tool2", "./usr/bin/tool", b""),
    ];
    // A read-only directory followed by its content.
    let mut ro = Header::new_gnu();
    ro.set_path("ro/").unwrap();
    ro.set_entry_type(EntryType::Directory);
    ro.set_mode(0o555);
    ro.set_size(0);
    ro.set_cksum();
    for (kind, name, link, data) in entries.drain(..) {
        raw_entry(&mut builder, kind, name, link, data);
    }
    builder.append(&ro, &b""[..]).unwrap();
    raw_entry(
        &mut builder,
        EntryType::Regular,
        "ro/file",
        "",
        b"inside ro",
    );
    // Names longer than 100 bytes use GNU long-name records.
    let mut long = Header::new_gnu();
    long.set_mode(0o644);
    long.set_size(4);
    builder
        .append_data(&mut long, &long_name, &b"deep"[..])
        .unwrap();
    builder.into_inner().unwrap()
}

fn check_good_tree(root: &Path) {
    assert_eq!(
        std::fs::read(root.join("usr/bin/tool")).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );
    assert_eq!(
        std::fs::read_link(root.join("usr/bin/alias")).unwrap(),
        PathBuf::from("tool")
    );
    assert_eq!(
        std::fs::read(root.join("usr/lib/up")).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );
    // The absolute link is rooted at the unpack directory.
    assert_eq!(
        std::fs::read_link(root.join("usr/bin/abs")).unwrap(),
        PathBuf::from("../../etc/config")
    );
    assert_eq!(
        std::fs::read(root.join("usr/bin/abs")).unwrap(),
        b"key=value\n"
    );
    let canonical = std::fs::canonicalize(root.join("usr/bin/abs")).unwrap();
    assert!(canonical.starts_with(std::fs::canonicalize(root).unwrap()));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(root.join("usr/bin/tool2")).unwrap().ino(),
        std::fs::metadata(root.join("usr/bin/tool")).unwrap().ino()
    );
    assert_eq!(std::fs::read(root.join("ro/file")).unwrap(), b"inside ro");
    assert_eq!(
        std::fs::metadata(root.join("ro"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o555
    );
    assert!(!root.join("pax_global_header").exists());
    let long_dir = "long-directory-name".repeat(8);
    assert_eq!(
        std::fs::read(root.join("usr/share").join(long_dir).join("deep.txt")).unwrap(),
        b"deep"
    );
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 6);
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn zst(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

#[test]
fn tar_archives_unpack_once_in_every_compression() {
    let (_dir, store) = new_store();
    let tar = good_tar();
    for (format, compressed) in [
        (UnpackFormat::TarGz, gz(&tar)),
        (UnpackFormat::TarXz, xz(&tar)),
        (UnpackFormat::TarZst, zst(&tar)),
    ] {
        let sha = add_blob(&store, &compressed);
        let tree = store.unpack(&sha, format).unwrap();
        assert_eq!(
            tree,
            store
                .root()
                .join("unpacked")
                .join(format!("{sha}-{format}"))
        );
        check_good_tree(&tree);
        // A second unpack returns the existing tree without redoing it.
        std::fs::write(tree.join("marker"), b"kept").unwrap();
        assert_eq!(store.unpack(&sha, format).unwrap(), tree);
        assert_eq!(std::fs::read(tree.join("marker")).unwrap(), b"kept");
    }
    let leftovers: Vec<_> = std::fs::read_dir(store.root().join("unpacked"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left behind");
}

#[test]
fn single_file_formats_decompress_to_a_file() {
    let (_dir, store) = new_store();
    let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for (format, compressed) in [
        (UnpackFormat::Gz, gz(&content)),
        (UnpackFormat::Xz, xz(&content)),
        (UnpackFormat::Zst, zst(&content)),
    ] {
        let sha = add_blob(&store, &compressed);
        let file = store.unpack(&sha, format).unwrap();
        assert!(file.is_file(), "{format} did not give a file");
        assert_eq!(std::fs::read(&file).unwrap(), content);
    }
}

#[test]
fn unpack_errors_name_the_blob() {
    let (_dir, store) = new_store();
    let missing = "ab".repeat(32);
    let err = store.unpack(&missing, UnpackFormat::TarXz).unwrap_err();
    assert!(matches!(err, StoreError::BlobMissing { .. }), "{err:?}");
    assert!(err.to_string().contains(&missing));

    let sha = add_blob(&store, b"this is not xz data at all");
    let err = store.unpack(&sha, UnpackFormat::TarXz).unwrap_err();
    assert!(matches!(err, StoreError::BadArchive { .. }), "{err:?}");
    assert!(err.to_string().contains(&sha), "{err}");
    let err = store.unpack(&sha, UnpackFormat::Zst).unwrap_err();
    assert!(matches!(err, StoreError::BadArchive { .. }), "{err:?}");
    let unpacked: Vec<_> = std::fs::read_dir(store.root().join("unpacked"))
        .unwrap()
        .collect();
    assert!(unpacked.is_empty(), "failed unpacks left {unpacked:?}");
}

/// Unpacks `tar` into `<tmp>/dest` and expects it to be refused because of
/// `entry`; also returns the temporary directory to check for escapes.
fn expect_refused(tar: &[u8], entry: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    let err = safe_unpack_tar(tar, &dest).unwrap_err();
    match &err {
        StoreError::UnsafeEntry { entry: named, .. } => assert_eq!(named, entry, "{err}"),
        other => panic!("expected UnsafeEntry for '{entry}', got {other:?}"),
    }
    assert!(err.to_string().contains(entry), "{err}");
    dir
}

#[test]
fn traversal_and_absolute_paths_are_refused() {
    let dir = expect_refused(
        &archive(&[(EntryType::Regular, "../x", "", b"escaped")]),
        "../x",
    );
    assert!(!dir.path().join("x").exists());

    let dir = expect_refused(
        &archive(&[
            (EntryType::Directory, "a/", "", b""),
            (EntryType::Regular, "a/../../y", "", b"escaped"),
        ]),
        "a/../../y",
    );
    assert!(!dir.path().join("y").exists());

    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("abs-escape");
    let name = target.to_str().unwrap();
    expect_refused(
        &archive(&[(EntryType::Regular, name, "", b"escaped")]),
        name,
    );
    assert!(!target.exists());
}

#[test]
fn escaping_symlinks_are_refused() {
    let dir = expect_refused(
        &archive(&[(EntryType::Symlink, "link", "../outside", b"")]),
        "link",
    );
    assert!(std::fs::symlink_metadata(dir.path().join("dest/link")).is_err());

    expect_refused(
        &archive(&[(EntryType::Symlink, "usr/lib/x", "../../../etc/passwd", b"")]),
        "usr/lib/x",
    );
    // '..' after a name could climb out through another link.
    expect_refused(
        &archive(&[
            (EntryType::Symlink, "a/b/s", "../..", b""),
            (EntryType::Symlink, "a/b/x", "s/..", b""),
        ]),
        "a/b/x",
    );
}

#[test]
fn writing_through_symlinks_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    // Absolute: rewritten to stay inside, and still never written through.
    let dir = expect_refused(
        &archive(&[
            (
                EntryType::Symlink,
                "evil",
                outside.path().to_str().unwrap(),
                b"",
            ),
            (EntryType::Regular, "evil/pwned", "", b"escaped"),
        ]),
        "evil/pwned",
    );
    assert!(!outside.path().join("pwned").exists());
    let link = std::fs::read_link(dir.path().join("dest/evil")).unwrap();
    assert!(link.is_relative(), "absolute link kept: {}", link.display());

    // Even a link that points inside is not written through.
    expect_refused(
        &archive(&[
            (EntryType::Directory, "d/", "", b""),
            (EntryType::Symlink, "l", "d", b""),
            (EntryType::Regular, "l/f", "", b"x"),
        ]),
        "l/f",
    );
}

#[test]
fn escaping_hard_links_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"secret").unwrap();

    expect_refused(&archive(&[(EntryType::Link, "h", "../victim", b"")]), "h");
    expect_refused(
        &archive(&[(EntryType::Link, "h", victim.to_str().unwrap(), b"")]),
        "h",
    );
    // Through a symlink to a directory outside.
    expect_refused(
        &archive(&[
            (
                EntryType::Symlink,
                "l",
                outside.path().to_str().unwrap(),
                b"",
            ),
            (EntryType::Link, "h", "l/victim", b""),
        ]),
        "h",
    );
    // A link to nothing that was unpacked.
    expect_refused(&archive(&[(EntryType::Link, "h", "not/there", b"")]), "h");
    assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
}

#[test]
fn device_nodes_are_refused() {
    expect_refused(
        &archive(&[(EntryType::Char, "dev/null", "", b"")]),
        "dev/null",
    );
}

#[test]
fn hostile_archive_in_the_store_leaves_nothing_unpacked() {
    let (_dir, store) = new_store();
    let hostile = gz(&archive(&[
        (EntryType::Regular, "fine", "", b"fine"),
        (EntryType::Regular, "../../escape", "", b"escaped"),
    ]));
    let sha = add_blob(&store, &hostile);
    let err = store.unpack(&sha, UnpackFormat::TarGz).unwrap_err();
    assert!(err.to_string().contains("../../escape"), "{err}");
    let unpacked: Vec<_> = std::fs::read_dir(store.root().join("unpacked"))
        .unwrap()
        .collect();
    assert!(unpacked.is_empty(), "refused unpack left {unpacked:?}");
    assert!(!store.root().join("escape").exists());
    assert!(!store.root().parent().unwrap().join("escape").exists());
    assert!(store.has_blob(&sha), "the verified blob itself stays");
}

/// Builds a .deb with dpkg-deb from a small tree.
fn build_deb(compression: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/krr-test")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: krr-test\nVersion: 1.0-1\nArchitecture: all\nMaintainer: KRR tests <tests@example.invalid>\nDescription: store unpack test\n",
    )
    .unwrap();
    std::fs::write(
        root.join("usr/share/krr-test/hello.txt"),
        b"hello from a deb\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("/usr/share/krr-test/hello.txt", root.join("usr/bin/hello"))
        .unwrap();
    let deb = dir.path().join("krr-test.deb");
    let output = Command::new("dpkg-deb")
        .args([&format!("-Z{compression}"), "--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb)
        .output()
        .expect("dpkg-deb must be installed (Debian package dpkg)");
    assert!(
        output.status.success(),
        "dpkg-deb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(deb).unwrap()
}

#[test]
fn deb_data_member_is_unpacked() {
    let (_dir, store) = new_store();
    for compression in ["xz", "zstd", "gzip"] {
        let sha = add_blob(&store, &build_deb(compression));
        let tree = store.unpack(&sha, UnpackFormat::Deb).unwrap();
        assert_eq!(
            std::fs::read(tree.join("usr/share/krr-test/hello.txt")).unwrap(),
            b"hello from a deb\n",
            "data.tar compressed with {compression}"
        );
        assert_eq!(
            std::fs::read_link(tree.join("usr/bin/hello")).unwrap(),
            PathBuf::from("../../usr/share/krr-test/hello.txt")
        );
        assert!(!tree.join("DEBIAN").exists() && !tree.join("control").exists());
    }
}

#[test]
fn deb_without_data_member_is_refused() {
    let mut builder = ar::Builder::new(Vec::new());
    builder
        .append(
            &ar::Header::new(b"debian-binary".to_vec(), 4),
            &b"2.0\n"[..],
        )
        .unwrap();
    let control = gz(&archive(&[(
        EntryType::Regular,
        "./control",
        "",
        b"Package: x\n",
    )]));
    builder
        .append(
            &ar::Header::new(b"control.tar.gz".to_vec(), control.len() as u64),
            &control[..],
        )
        .unwrap();
    let deb = builder.into_inner().unwrap();
    let (_dir, store) = new_store();
    let sha = add_blob(&store, &deb);
    let err = store.unpack(&sha, UnpackFormat::Deb).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::BadArchive { .. }), "{err:?}");
    assert!(
        message.contains("data.tar") && message.contains("control.tar.gz"),
        "{message}"
    );
}

#[test]
fn formats_parse_from_manifest_spelling() {
    for format in [
        UnpackFormat::TarGz,
        UnpackFormat::TarXz,
        UnpackFormat::TarZst,
        UnpackFormat::Gz,
        UnpackFormat::Xz,
        UnpackFormat::Zst,
        UnpackFormat::Deb,
    ] {
        assert_eq!(format.as_str().parse::<UnpackFormat>(), Ok(format));
    }
    let err = "rar".parse::<UnpackFormat>().unwrap_err();
    assert!(err.contains("'rar'"), "{err}");
}

#[test]
fn krr_cache_selects_the_default_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("from-env");
    // Only this test in this binary reads KRR_CACHE.
    std::env::set_var("KRR_CACHE", &root);
    let store = Store::open_default().unwrap();
    std::env::remove_var("KRR_CACHE");
    assert_eq!(store.root(), root);
    assert!(root.join("blobs/sha256").is_dir());
}

#[test]
fn leftovers_of_killed_runs_are_cleared_under_the_lock() {
    let (_dir, store) = new_store();
    let sha = add_blob(&store, &gz(&good_tar()));
    // What a process killed mid-unpack would leave behind.
    let stale = store
        .root()
        .join("unpacked")
        .join(format!(".tmp-{sha}-tar.gz-killed"));
    std::fs::create_dir_all(stale.join("usr/bin")).unwrap();
    std::fs::write(stale.join("usr/bin/half"), b"half").unwrap();
    // Someone else's scratch (another digest) is left alone.
    let other = store
        .root()
        .join("unpacked")
        .join(format!(".tmp-{}-tar.gz-busy", "cd".repeat(32)));
    std::fs::create_dir_all(&other).unwrap();

    let tree = store.unpack(&sha, UnpackFormat::TarGz).unwrap();
    check_good_tree(&tree);
    assert!(!stale.exists(), "stale scratch directory kept");
    assert!(other.exists(), "another artifact's scratch removed");
}

#[test]
fn hostile_deb_data_member_is_refused() {
    let data = xz(&archive(&[
        (EntryType::Regular, "./usr/bin/ok", "", b"ok"),
        (
            EntryType::Symlink,
            "./usr/lib/escape",
            "../../../../root",
            b"",
        ),
    ]));
    let mut builder = ar::Builder::new(Vec::new());
    builder
        .append(
            &ar::Header::new(b"debian-binary".to_vec(), 4),
            &b"2.0\n"[..],
        )
        .unwrap();
    builder
        .append(
            &ar::Header::new(b"data.tar.xz".to_vec(), data.len() as u64),
            &data[..],
        )
        .unwrap();
    let (_dir, store) = new_store();
    let sha = add_blob(&store, &builder.into_inner().unwrap());
    let err = store.unpack(&sha, UnpackFormat::Deb).unwrap_err();
    assert!(
        matches!(&err, StoreError::UnsafeEntry { entry, .. } if entry == "./usr/lib/escape"),
        "{err:?}"
    );
    assert!(std::fs::read_dir(store.root().join("unpacked"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn default_fetch_options_match_the_documented_values() {
    let opts = FetchOptions::default();
    assert_eq!(opts.connect_timeout, Duration::from_secs(15));
    assert_eq!(opts.stall_timeout, Duration::from_secs(30));
    assert_eq!(opts.retries, 4);
    assert!(opts.progress);
}
