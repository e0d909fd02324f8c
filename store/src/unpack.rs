// SPDX-License-Identifier: GPL-2.0-or-later
//! Unpacking verified blobs: tar archives (gz, xz, zst), single compressed
//! files and the data member of Debian packages, without letting any entry
//! land outside the target directory.
//!
//! Rules for archive entries (each violation is an error naming the entry):
//! - entry paths must be relative and free of `..`;
//! - no entry is written through a symlink (every existing ancestor of an
//!   entry must be a real directory), so links can never redirect writes;
//! - a relative symlink target may climb with leading `..` at most as many
//!   levels as the link is deep, and may not use `..` after a name (that
//!   could climb out of another link's target);
//! - an absolute symlink target is taken as rooted at the unpack directory
//!   (as it is inside the guest, and as Debian policy uses them between
//!   top-level directories) and rewritten as the equivalent relative link,
//!   so following it on the host never leaves the tree;
//! - a hard link must name an earlier entry by a relative, `..`-free path;
//! - device nodes and FIFOs are refused rather than silently turned into
//!   empty files.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::{Store, StoreError, UnpackFormat};

pub(super) fn unpack_blob(
    store: &Store,
    sha256: &str,
    format: UnpackFormat,
) -> Result<PathBuf, StoreError> {
    let blob = store.blob_path(sha256);
    if !blob.is_file() {
        return Err(StoreError::BlobMissing {
            sha256: sha256.to_string(),
            root: store.root().to_path_buf(),
        });
    }
    let unpacked_dir = store.root().join("unpacked");
    let target = unpacked_dir.join(format!("{sha256}-{format}"));
    if target.symlink_metadata().is_ok() {
        return Ok(target);
    }
    let _lock = store.lock(&format!("unpack-{sha256}-{format}"))?;
    if target.symlink_metadata().is_ok() {
        return Ok(target);
    }
    let scratch_prefix = format!(".tmp-{sha256}-{format}-");
    super::remove_stale(&unpacked_dir, &scratch_prefix);
    let archive_name = format!("{} ({format})", blob.display());
    tracing::debug!(blob = %blob.display(), %format, target = %target.display(), "unpacking");

    if format.is_archive() {
        let scratch = tempfile::Builder::new()
            .prefix(&scratch_prefix)
            .tempdir_in(&unpacked_dir)
            .map_err(|e| {
                StoreError::io("cannot create temporary directory in", &unpacked_dir, e)
            })?;
        let input = open_blob(&blob)?;
        match format {
            UnpackFormat::TarGz => unpack_tar(
                flate2::read::MultiGzDecoder::new(input),
                scratch.path(),
                &archive_name,
            )?,
            UnpackFormat::TarXz => unpack_tar(
                xz2::read::XzDecoder::new_multi_decoder(input),
                scratch.path(),
                &archive_name,
            )?,
            UnpackFormat::TarZst => unpack_tar(
                zstd_reader(input, &archive_name)?,
                scratch.path(),
                &archive_name,
            )?,
            UnpackFormat::Deb => unpack_deb(input, scratch.path(), &archive_name)?,
            UnpackFormat::Gz | UnpackFormat::Xz | UnpackFormat::Zst => unreachable!(),
        }
        // tempfile creates the directory private (0700); the tree is shared.
        fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| StoreError::io("cannot set permissions of", scratch.path(), e))?;
        fs::rename(scratch.path(), &target)
            .map_err(|e| StoreError::io("cannot move unpacked tree into place", &target, e))?;
        // The directory now lives under its final name.
        let _ = scratch.keep();
    } else {
        let mut out = tempfile::Builder::new()
            .prefix(&scratch_prefix)
            .tempfile_in(&unpacked_dir)
            .map_err(|e| StoreError::io("cannot create temporary file in", &unpacked_dir, e))?;
        let input = open_blob(&blob)?;
        let copied = match format {
            UnpackFormat::Gz => io::copy(&mut flate2::read::MultiGzDecoder::new(input), &mut out),
            UnpackFormat::Xz => io::copy(
                &mut xz2::read::XzDecoder::new_multi_decoder(input),
                &mut out,
            ),
            UnpackFormat::Zst => io::copy(&mut zstd_reader(input, &archive_name)?, &mut out),
            _ => unreachable!(),
        };
        copied
            .and_then(|_| out.flush())
            .map_err(|e| StoreError::BadArchive {
                archive: archive_name.clone(),
                message: format!("cannot decompress: {e}"),
            })?;
        fs::set_permissions(out.path(), fs::Permissions::from_mode(0o644))
            .map_err(|e| StoreError::io("cannot set permissions of", out.path(), e))?;
        out.persist(&target).map_err(|e| {
            StoreError::io("cannot move decompressed file into place", &target, e.error)
        })?;
    }
    tracing::debug!(target = %target.display(), "unpacked");
    Ok(target)
}

fn open_blob(blob: &Path) -> Result<BufReader<File>, StoreError> {
    File::open(blob)
        .map(BufReader::new)
        .map_err(|e| StoreError::io("cannot open blob", blob, e))
}

fn zstd_reader<R: io::BufRead>(
    input: R,
    archive: &str,
) -> Result<zstd::stream::read::Decoder<'static, R>, StoreError> {
    zstd::stream::read::Decoder::with_buffer(input).map_err(|e| StoreError::BadArchive {
        archive: archive.to_string(),
        message: format!("cannot start zstd decoder: {e}"),
    })
}

/// Unpacks the `data.tar[.gz|.xz|.zst]` member of a Debian package (an `ar`
/// archive) into `dest`.
fn unpack_deb<R: Read>(input: R, dest: &Path, archive: &str) -> Result<(), StoreError> {
    let bad = |message: String| StoreError::BadArchive {
        archive: archive.to_string(),
        message,
    };
    let mut deb = ar::Archive::new(input);
    let mut members = Vec::new();
    while let Some(member) = deb.next_entry() {
        let member = member.map_err(|e| bad(format!("not a valid ar archive (.deb): {e}")))?;
        let name = String::from_utf8_lossy(member.header().identifier())
            .trim_end_matches('/')
            .to_string();
        let data_name = format!("{archive}: {name}");
        match name.as_str() {
            "data.tar" => return unpack_tar(member, dest, &data_name),
            "data.tar.gz" => {
                return unpack_tar(flate2::read::MultiGzDecoder::new(member), dest, &data_name)
            }
            "data.tar.xz" => {
                return unpack_tar(xz2::read::XzDecoder::new_multi_decoder(member), dest, &data_name)
            }
            "data.tar.zst" => {
                return unpack_tar(
                    zstd_reader(BufReader::new(member), &data_name)?,
                    dest,
                    &data_name,
                )
            }
            other if other.starts_with("data.tar") => {
                return Err(bad(format!(
                    "member '{other}' uses an unsupported compression; expected data.tar, data.tar.gz, data.tar.xz or data.tar.zst"
                )))
            }
            _ => members.push(name),
        }
    }
    Err(bad(format!(
        "no data.tar member (expected data.tar, data.tar.gz, data.tar.xz or data.tar.zst); members: [{}]",
        members.join(", ")
    )))
}

/// Unpacks a tar stream into `dest` (created if missing), refusing every
/// entry that could end up outside `dest`: absolute paths, `..`, writes
/// through symlinks, and symlinks or hard links pointing outside.
pub fn safe_unpack_tar<R: Read>(reader: R, dest: &Path) -> Result<(), StoreError> {
    unpack_tar(reader, dest, &format!("tar stream for {}", dest.display()))
}

fn unpack_tar<R: Read>(reader: R, dest: &Path, archive_name: &str) -> Result<(), StoreError> {
    fs::create_dir_all(dest).map_err(|e| StoreError::io("cannot create directory", dest, e))?;
    let bad = |message: String| StoreError::BadArchive {
        archive: archive_name.to_string(),
        message,
    };
    let mut archive = tar::Archive::new(reader);
    // Directory modes are applied at the end so that a read-only directory
    // does not block the entries that follow it.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("cannot read tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("cannot read tar entry: {e}")))?;
        let kind = entry.header().entry_type();
        // Metadata records (e.g. the pax global header of `git archive`
        // tarballs) are not files; their names need not be paths.
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason: String| StoreError::UnsafeEntry {
            entry: name.clone(),
            dest: dest.to_path_buf(),
            reason,
        };
        let raw_path = entry
            .path()
            .map_err(|e| bad(format!("entry '{name}' has an unusable path: {e}")))?
            .into_owned();
        let rel = contained_path(&raw_path).map_err(refuse)?;
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                continue; // "./" itself
            }
            return Err(refuse("the entry has an empty path".to_string()));
        }
        check_real_ancestors(dest, &rel).map_err(refuse)?;
        let out = dest.join(&rel);

        if kind.is_dir() {
            if let Ok(meta) = out.symlink_metadata() {
                if !meta.is_dir() {
                    return Err(refuse(
                        "a non-directory of that name was unpacked earlier".to_string(),
                    ));
                }
            }
            fs::create_dir_all(&out)
                .map_err(|e| StoreError::io("cannot create directory", &out, e))?;
            let mode = entry.header().mode().unwrap_or(0o755);
            dir_modes.push((out, mode & 0o1777));
            continue;
        }

        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            return Err(refuse(
                "device nodes and FIFOs are not unpacked into the artifact store".to_string(),
            ));
        }

        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| StoreError::io("cannot create directory", parent, e))?;
        }
        if kind.is_symlink() || kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(|e| bad(format!("entry '{name}' has an unusable link target: {e}")))?
                .map(|l| l.into_owned())
                .unwrap_or_default();
            if link.as_os_str().is_empty() {
                return Err(refuse("the link has an empty target".to_string()));
            }
            replace_leaf(&out).map_err(refuse)?;
            if kind.is_symlink() {
                let target = contained_symlink_target(&rel, &link).map_err(refuse)?;
                std::os::unix::fs::symlink(&target, &out)
                    .map_err(|e| StoreError::io("cannot create symlink", &out, e))?;
            } else {
                let source_rel = contained_path(&link)
                    .map_err(|reason| refuse(format!("hard link target: {reason}")))?;
                check_real_ancestors(dest, &source_rel)
                    .map_err(|reason| refuse(format!("hard link target: {reason}")))?;
                let source = dest.join(&source_rel);
                match source.symlink_metadata() {
                    Ok(meta) if meta.is_dir() => {
                        return Err(refuse(format!(
                            "hard link target '{}' is a directory",
                            link.display()
                        )))
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(refuse(format!(
                            "hard link target '{}' is not an earlier entry of the archive",
                            link.display()
                        )))
                    }
                }
                fs::hard_link(&source, &out)
                    .map_err(|e| StoreError::io("cannot create hard link", &out, e))?;
            }
            continue;
        }

        // Regular files (and GNU sparse/contiguous files, which tar writes as
        // files): tar replaces an existing leaf instead of writing through it.
        entry
            .unpack(&out)
            .map_err(|e| bad(format!("cannot unpack entry '{name}': {e}")))?;
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
            .map_err(|e| StoreError::io("cannot set permissions of", &dir, e))?;
    }
    Ok(())
}

/// The normal components of an archive path, or why it is refused.
fn contained_path(path: &Path) -> Result<PathBuf, String> {
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "absolute path '{}'; expected a path relative to the archive root",
                    path.display()
                ))
            }
            Component::ParentDir => {
                return Err(format!(
                    "path '{}' contains '..', which could leave the target directory",
                    path.display()
                ))
            }
        }
    }
    Ok(rel)
}

/// Every ancestor of `rel` that already exists under `dest` must be a real
/// directory: writing through a symlink could leave `dest`.
fn check_real_ancestors(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut prefix = PathBuf::new();
    let mut components = rel.components().peekable();
    while let Some(component) = components.next() {
        if components.peek().is_none() {
            break; // the entry itself
        }
        prefix.push(component);
        match dest.join(&prefix).symlink_metadata() {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "'{}' is a symlink, and writing through links is refused",
                    prefix.display()
                ))
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(format!("'{}' is not a directory", prefix.display()))
            }
            Ok(_) => {}
            Err(_) => break, // nothing deeper exists yet
        }
    }
    Ok(())
}

/// Removes a file or link that a later archive entry replaces; refuses to
/// replace a directory.
fn replace_leaf(out: &Path) -> Result<(), String> {
    match out.symlink_metadata() {
        Ok(meta) if meta.is_dir() => {
            Err("a directory of that name was unpacked earlier".to_string())
        }
        Ok(_) => fs::remove_file(out).map_err(|e| format!("cannot replace the earlier entry: {e}")),
        Err(_) => Ok(()),
    }
}

/// The target to store for symlink `link_rel` -> `target`, or why it could
/// point outside the unpack directory (see the module comment).
fn contained_symlink_target(link_rel: &Path, target: &Path) -> Result<PathBuf, String> {
    // Directories between the unpack root and the link.
    let depth = link_rel.components().count().saturating_sub(1);
    let mut absolute = false;
    let mut ups = 0usize;
    let mut rest = PathBuf::new();
    for component in target.components() {
        match component {
            Component::RootDir => absolute = true,
            Component::Prefix(_) => {
                return Err(format!(
                    "symlink target '{}' is not a Unix path",
                    target.display()
                ))
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if absolute || !rest.as_os_str().is_empty() {
                    return Err(format!(
                        "symlink target '{}' uses '..' after a directory name, which can climb out through another link; expected leading '..' only",
                        target.display()
                    ));
                }
                ups += 1;
            }
            Component::Normal(part) => rest.push(part),
        }
    }
    if absolute {
        let mut rewritten = PathBuf::new();
        for _ in 0..depth {
            rewritten.push("..");
        }
        rewritten.push(&rest);
        if rewritten.as_os_str().is_empty() {
            rewritten.push(".");
        }
        tracing::debug!(link = %link_rel.display(), target = %target.display(), rewritten = %rewritten.display(), "absolute symlink made relative to the unpack root");
        return Ok(rewritten);
    }
    if ups > depth {
        return Err(format!(
            "symlink target '{}' climbs {ups} levels from a link {depth} levels below the target directory, i.e. outside it",
            target.display()
        ));
    }
    Ok(target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets() {
        let ok = |link: &str, target: &str| {
            contained_symlink_target(Path::new(link), Path::new(target))
                .unwrap_or_else(|e| panic!("{link} -> {target} refused: {e}"))
        };
        assert_eq!(ok("usr/bin/x", "../lib/x"), PathBuf::from("../lib/x"));
        assert_eq!(ok("usr/bin/x", "../../etc/x"), PathBuf::from("../../etc/x"));
        assert_eq!(
            ok("usr/bin/x", "/etc/alternatives/x"),
            PathBuf::from("../../etc/alternatives/x")
        );
        assert_eq!(ok("x", "/etc/passwd"), PathBuf::from("etc/passwd"));
        assert_eq!(ok("x", "/"), PathBuf::from("."));
        assert_eq!(ok("a/x", "/"), PathBuf::from(".."));
        let refused = |link: &str, target: &str| {
            contained_symlink_target(Path::new(link), Path::new(target)).is_err()
        };
        assert!(refused("usr/bin/x", "../../../etc/passwd"));
        assert!(refused("x", ".."));
        assert!(refused("a/b/x", "s/../.."));
        assert!(refused("a/x", "/../etc"));
    }

    #[test]
    fn entry_paths() {
        assert_eq!(
            contained_path(Path::new("./usr/bin/")).unwrap(),
            PathBuf::from("usr/bin")
        );
        assert!(contained_path(Path::new("/etc/passwd")).is_err());
        assert!(contained_path(Path::new("a/../../x")).is_err());
    }
}
