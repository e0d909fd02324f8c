// SPDX-License-Identifier: GPL-2.0-or-later
//! Initramfs images: busybox-static from its pinned `.deb`, the project's
//! guest programs compiled statically with gcc, the shared `/init`
//! (`images/initramfs/init`) and optionally a baked-in `/etc/krr/command`.
//!
//! The archive is reproducible: entries sorted by path, inode numbers given
//! in that order, mtime 0, uid/gid 0, and gzip without a timestamp.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::{Compression, GzBuilder};

use super::debian::{self, DebianPackageRef};
use super::error::{io_err, ImageError, Result};
use super::BuildContext;

/// The `/init` shared by initramfs and rootfs images, relative to the repo root.
pub const INIT_SCRIPT: &str = "images/initramfs/init";
/// Where baked-in commands live inside an image.
pub const COMMAND_FILE: &str = "etc/krr/command";
/// Where guest programs are installed (on the guest's PATH).
pub const PROGRAM_DIR: &str = "usr/local/bin";
/// The image file's name inside the image directory.
pub const INITRAMFS_FILE: &str = "initramfs.cpio.gz";

/// What an initramfs image is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsBuild {
    pub busybox: DebianPackageRef,
    /// C sources (repo-relative), each built with `gcc -static -O2` into
    /// `/usr/local/bin/<file stem>`.
    pub programs: Vec<PathBuf>,
    /// Default command baked into `/etc/krr/command` (a `krr.run=` on the
    /// kernel command line overrides it).
    pub command: Option<String>,
}

/// One entry of the archive.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// An in-memory file tree written out as a newc cpio archive.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    /// Inserts `node` at `path` (no leading slash), creating parent dirs.
    pub(crate) fn insert(&mut self, path: &str, node: Node) {
        let path = path.trim_matches('/');
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.nodes.entry(parent.clone()).or_insert(Node::Dir);
        }
        self.nodes.insert(path.to_string(), node);
    }

    pub(crate) fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path.trim_matches('/'))
    }

    /// The directory skeleton, `/init`, busybox with its applet links,
    /// `/dev/console` (the kernel opens it before /init can mount devtmpfs)
    /// and minimal passwd/group files.
    pub(crate) fn base(busybox: Vec<u8>, applets: &[String], init: Vec<u8>) -> Tree {
        let mut tree = Tree::default();
        for dir in [
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            PROGRAM_DIR,
            "etc/krr",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "root",
            "mnt",
            "var/tmp",
        ] {
            tree.insert(dir, Node::Dir);
        }
        tree.insert(
            "init",
            Node::File {
                data: init,
                mode: 0o755,
            },
        );
        tree.insert(
            "bin/busybox",
            Node::File {
                data: busybox,
                mode: 0o755,
            },
        );
        for applet in applets {
            let applet = applet.trim_start_matches('/');
            if applet.is_empty() || tree.contains(applet) {
                continue;
            }
            let depth = applet.matches('/').count();
            let target = format!("{}bin/busybox", "../".repeat(depth));
            tree.insert(applet, Node::Symlink(target));
        }
        tree.insert("dev/console", Node::CharDev { major: 5, minor: 1 });
        tree.insert(
            "etc/passwd",
            Node::File {
                data: b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
                mode: 0o644,
            },
        );
        tree.insert(
            "etc/group",
            Node::File {
                data: b"root:x:0:\n".to_vec(),
                mode: 0o644,
            },
        );
        tree
    }

    /// Writes the tree as a gzip-compressed newc archive.
    pub(crate) fn write_cpio_gz(&self, out: impl Write) -> std::io::Result<()> {
        // GzBuilder leaves the header mtime at 0 and records no file name.
        let mut gz = GzBuilder::new().write(out, Compression::best());
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let builder = cpio::newc::Builder::new(path)
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0)
                .mtime(0);
            let (builder, data): (_, &[u8]) = match node {
                Node::Dir => (builder.mode(0o040755).nlink(2), &[]),
                Node::File { data, mode } => (builder.mode(0o100000 | mode), data),
                Node::Symlink(target) => (builder.mode(0o120777), target.as_bytes()),
                Node::CharDev { major, minor } => (
                    builder.mode(0o020600).rdev_major(*major).rdev_minor(*minor),
                    &[],
                ),
            };
            let size = u32::try_from(data.len()).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{path}: larger than 4 GiB, too big for newc cpio"),
                )
            })?;
            let mut writer = builder.write(&mut gz, size);
            writer.write_all(data)?;
            writer.finish()?;
        }
        cpio::newc::trailer(&mut gz)?;
        gz.finish()?.flush()
    }
}

/// Extracts busybox from its `.deb` and asks it for its applet paths.
pub(crate) fn busybox_and_applets(
    ctx: &BuildContext<'_>,
    pkg: &DebianPackageRef,
) -> Result<(Vec<u8>, Vec<String>)> {
    let bar = ctx.bytes_bar("busybox");
    let deb = debian::fetch(pkg, ctx.store, &bar)?;
    let busybox = debian::read_member(&deb, "bin/busybox", &bar)?;
    ctx.finish(&bar, format!("{}={} verified", pkg.package, pkg.version));

    // busybox-static runs on the build host too (both x86-64 Linux): let it
    // list its own applets, so the links match exactly this binary.
    let scratch = tempfile::tempdir().map_err(io_err("/tmp", "create temp dir"))?;
    let exe = scratch.path().join("busybox");
    std::fs::write(&exe, &busybox).map_err(io_err(&exe, "write"))?;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(&exe, "chmod"))?;
    let output = Command::new(&exe)
        .arg("--list-full")
        .output()
        .map_err(io_err(&exe, "run busybox --list-full"))?;
    if !output.status.success() {
        return Err(ImageError::PackageContents {
            package: pkg.package.clone(),
            detail: "bin/busybox --list-full failed".into(),
        });
    }
    let applets = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    Ok((busybox, applets))
}

/// Compiles one C guest program statically; returns the binary's bytes.
pub(crate) fn compile_program(root: &Path, source: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let full = root.join(source);
    if !full.is_file() {
        return Err(ImageError::GuestProgram {
            source_path: source.to_path_buf(),
            detail: "file not found".into(),
        });
    }
    if full.extension().is_none_or(|e| e != "c") {
        return Err(ImageError::GuestProgram {
            source_path: source.to_path_buf(),
            detail: "expected a C source file ending in .c".into(),
        });
    }
    let out = scratch.join(program_name(source));
    // Relative source path and fixed working directory keep the root's
    // location out of the binary.
    let output = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&out)
        .arg(source)
        .current_dir(root)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| ImageError::MissingTool {
            program: "gcc".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImageError::GuestProgram {
            source_path: source.to_path_buf(),
            detail: format!(
                "gcc -static failed (is libc6-dev installed?):\n{}",
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    std::fs::read(&out).map_err(io_err(&out, "read compiled program"))
}

/// `images/guest/syscall-loop.c` -> `syscall-loop`.
pub fn program_name(source: &Path) -> String {
    source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Builds the image into `out` (a fresh directory that becomes the image).
pub(crate) fn build(ctx: &BuildContext<'_>, recipe: &InitramfsBuild, out: &Path) -> Result<()> {
    let (busybox, applets) = busybox_and_applets(ctx, &recipe.busybox)?;
    let init_path = ctx.root.join(INIT_SCRIPT);
    let init = std::fs::read(&init_path).map_err(io_err(&init_path, "read /init script"))?;
    let mut tree = Tree::base(busybox, &applets, init);

    let bar = ctx.spinner("compile");
    for program in &recipe.programs {
        bar.set_message(program.display().to_string());
        let binary = compile_program(ctx.root, program, out)?;
        std::fs::remove_file(out.join(program_name(program)))
            .map_err(io_err(out, "remove scratch binary"))?;
        tree.insert(
            &format!("{PROGRAM_DIR}/{}", program_name(program)),
            Node::File {
                data: binary,
                mode: 0o755,
            },
        );
    }
    ctx.finish(&bar, format!("{} guest program(s)", recipe.programs.len()));
    if let Some(command) = &recipe.command {
        tree.insert(COMMAND_FILE, command_file(command));
    }

    let path = out.join(INITRAMFS_FILE);
    let file = std::fs::File::create(&path).map_err(io_err(&path, "create"))?;
    tree.write_cpio_gz(std::io::BufWriter::new(file))
        .map_err(io_err(&path, "write initramfs"))
}

pub(crate) fn command_file(command: &str) -> Node {
    Node::File {
        data: format!("{}\n", command.trim_end()).into_bytes(),
        mode: 0o644,
    }
}

/// Parses an `--add SRC[:DEST]` argument. DEST defaults to
/// `/usr/local/bin/<file name of SRC>`; a DEST ending in `/` is a directory.
pub fn parse_add(arg: &str) -> Result<(PathBuf, String)> {
    let (src, dest) = match arg.split_once(':') {
        Some((s, d)) => (s, Some(d)),
        None => (arg, None),
    };
    let bad = |expected: &str| ImageError::InvalidSpec {
        image: "ad-hoc initramfs".into(),
        field: "--add",
        value: arg.to_string(),
        expected: expected.to_string(),
    };
    if src.is_empty() {
        return Err(bad("SRC[:DEST] with a non-empty SRC"));
    }
    let src = PathBuf::from(src);
    let file_name = src
        .file_name()
        .ok_or_else(|| bad("SRC naming a file"))?
        .to_string_lossy()
        .into_owned();
    let dest = match dest {
        None => format!("/{PROGRAM_DIR}/{file_name}"),
        Some(d) if d.ends_with('/') => format!("{d}{file_name}"),
        Some(d) => d.to_string(),
    };
    if !dest.starts_with('/') || dest.split('/').any(|p| p == "..") || dest == "/init" {
        return Err(bad(
            "an absolute DEST without '..' components, other than /init",
        ));
    }
    Ok((src, dest))
}

/// Builds a one-off initramfs around existing binaries: busybox, `/init`,
/// each `(SRC, DEST)` copied in with SRC's permissions, and `run` baked in as
/// `/etc/krr/command`. The archive appears at `out` only once complete.
///
/// The binaries must be static (the image has no C library); a dynamically
/// linked ELF is refused with its path named.
pub fn build_adhoc_initramfs(
    ctx: &BuildContext<'_>,
    busybox: &DebianPackageRef,
    adds: &[(PathBuf, String)],
    run: &str,
    out: &Path,
) -> Result<PathBuf> {
    busybox.validate("ad-hoc initramfs")?;
    if run.trim().is_empty() {
        return Err(ImageError::InvalidSpec {
            image: "ad-hoc initramfs".into(),
            field: "--run",
            value: run.to_string(),
            expected: "a non-empty shell command".into(),
        });
    }
    let (bb, applets) = busybox_and_applets(ctx, busybox)?;
    let init_path = ctx.root.join(INIT_SCRIPT);
    let init = std::fs::read(&init_path).map_err(io_err(&init_path, "read /init script"))?;
    let mut tree = Tree::base(bb, &applets, init);
    for (src, dest) in adds {
        let data = std::fs::read(src).map_err(io_err(src, "read --add file"))?;
        if is_dynamic_elf(&data) {
            return Err(ImageError::InvalidSpec {
                image: "ad-hoc initramfs".into(),
                field: "--add",
                value: src.display().to_string(),
                expected: "a statically linked binary (this ELF needs a dynamic loader, \
                           which the initramfs does not have)"
                    .into(),
            });
        }
        let mode = std::fs::metadata(src)
            .map_err(io_err(src, "stat --add file"))?
            .permissions()
            .mode()
            & 0o7777;
        tree.insert(dest, Node::File { data, mode });
    }
    tree.insert(COMMAND_FILE, command_file(run));

    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io_err(&dir, "create output directory"))?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(&dir).map_err(io_err(&dir, "create temp file"))?;
    tree.write_cpio_gz(std::io::BufWriter::new(tmp.as_file_mut()))
        .map_err(io_err(out, "write initramfs"))?;
    // Temp files are created 0600; an image is meant to be read by others
    // (QEMU under another user, the engine).
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(io_err(tmp.path(), "chmod"))?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .map_err(io_err(out, "rename into place"))?;
    Ok(out.to_path_buf())
}

/// True for an x86-64 ELF (64-bit, little-endian) with a PT_INTERP header,
/// i.e. one that needs a dynamic loader.
fn is_dynamic_elf(data: &[u8]) -> bool {
    let Ok(elf) = goblin::elf::Elf::parse(data) else {
        return false;
    };
    elf.interpreter.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_argument_forms() {
        let (src, dest) = parse_add("target/x/prog").unwrap();
        assert_eq!(src, PathBuf::from("target/x/prog"));
        assert_eq!(dest, "/usr/local/bin/prog");
        assert_eq!(parse_add("a/prog:/bin/").unwrap().1, "/bin/prog");
        assert_eq!(parse_add("a/prog:/opt/t").unwrap().1, "/opt/t");
        let err = parse_add("a/prog:rel/path").unwrap_err().to_string();
        assert!(
            err.contains("--add") && err.contains("absolute DEST"),
            "{err}"
        );
        assert!(parse_add("x:/init").is_err());
        assert!(parse_add(":/bin/x").is_err());
    }

    #[test]
    fn tree_archive_is_sorted_and_reproducible() {
        let build = || {
            let mut tree = Tree::base(
                b"BB".to_vec(),
                &["/bin/sh".into(), "/usr/bin/awk".into()],
                b"#!/bin/sh\n".to_vec(),
            );
            tree.insert(
                "usr/local/bin/x",
                Node::File {
                    data: vec![1, 2, 3],
                    mode: 0o755,
                },
            );
            let mut out = Vec::new();
            tree.write_cpio_gz(&mut out).unwrap();
            out
        };
        let a = build();
        assert_eq!(a, build());
        // Decompress and walk the archive: names sorted, parents first, links right.
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&a[..]), &mut raw).unwrap();
        let mut cursor = std::io::Cursor::new(raw);
        let mut names = Vec::new();
        loop {
            let reader = cpio::newc::Reader::new(&mut cursor).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let entry = reader.entry();
            assert_eq!((entry.uid(), entry.gid(), entry.mtime()), (0, 0, 0));
            names.push(entry.name().to_string());
            if entry.name() == "usr/bin/awk" {
                assert_eq!(entry.mode() & 0o170000, 0o120000);
            }
            if entry.name() == "dev/console" {
                assert_eq!((entry.rdev_major(), entry.rdev_minor()), (5, 1));
            }
            reader.finish().unwrap();
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for must in [
            "init",
            "bin/busybox",
            "bin/sh",
            "usr/bin/awk",
            "usr/local/bin/x",
            "dev/console",
        ] {
            assert!(names.iter().any(|n| n == must), "missing {must}: {names:?}");
        }
    }
}
