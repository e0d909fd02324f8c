// SPDX-License-Identifier: GPL-2.0-or-later
//! Guest images: the kernel (from Debian's `linux-source-6.1`), initramfs
//! images (busybox-static + the project's static guest programs + `/init`)
//! and ext4 root filesystems (debootstrap'ed Debian), each built from a
//! recipe and cached under the hash of that recipe.
//!
//! Layout under the artifact store (`crate::store::Store`, `ImageDirs`):
//! - `images/<name>-<hash16>/`: a finished image: its files plus
//!   `manifest.json` (name, kind, full recipe hash, sha256 of each file). It is
//!   assembled in `images/.partial-*` and renamed into place only when
//!   complete, so a failed build never looks like a good one.
//! - `build/kernel-<hash16>/`: the kernel's source and object tree, kept after
//!   the build because vmlinux's debug info points into it (gdb sources).
//! - `.deb` downloads are the artifact store's verified blobs.
//!
//! The recipe hash covers everything that determines the output: package
//! versions and sha256s, the contents of fragments, patches, guest program
//! sources and `/init`, baked-in commands, the compiler's version and
//! [`BUILDER_VERSION`]. Building again with an unchanged recipe is a no-op.

pub mod debian;
pub mod error;
mod from_manifest;
pub mod initramfs;
pub mod kernel;
mod process;
pub mod rootfs;
pub mod smoke;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::Store;

pub use debian::DebianPackageRef;
pub use error::{DroppedOption, ImageError, Result};
pub use from_manifest::{spec_from_manifest, specs_from_manifests, specs_from_repo};
pub use initramfs::{build_adhoc_initramfs, parse_add, InitramfsBuild};
pub use kernel::KernelBuild;
pub use rootfs::RootfsBuild;
pub use smoke::{parse_end_marker, smoke_boot_qemu, SmokeBoot, SmokeResult};

use error::io_err;

/// Bumped whenever a builder changes what it produces from the same recipe,
/// so old cache entries stop matching.
pub const BUILDER_VERSION: u32 = 1;

/// What kind of image a spec builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Kernel,
    Initramfs,
    Rootfs,
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageKind::Kernel => "kernel",
            ImageKind::Initramfs => "initramfs",
            ImageKind::Rootfs => "rootfs",
        })
    }
}

/// How an image is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRecipe {
    Kernel(KernelBuild),
    Initramfs(InitramfsBuild),
    Rootfs(RootfsBuild),
}

impl ImageRecipe {
    pub fn kind(&self) -> ImageKind {
        match self {
            ImageRecipe::Kernel(_) => ImageKind::Kernel,
            ImageRecipe::Initramfs(_) => ImageKind::Initramfs,
            ImageRecipe::Rootfs(_) => ImageKind::Rootfs,
        }
    }
}

/// One image to build: a name (as in the manifest) and its recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub name: String,
    pub recipe: ImageRecipe,
}

/// Where finished images and build trees live in the artifact store.
#[derive(Debug, Clone)]
pub struct ImageDirs {
    /// `<store>/images`: finished images, `<name>-<hash16>/`.
    pub images: PathBuf,
    /// `<store>/build`: kernel source/object trees, rootfs staging.
    pub build: PathBuf,
}

impl ImageDirs {
    pub fn new(store: &Store) -> Result<Self> {
        Ok(ImageDirs {
            images: store.dir("images")?,
            build: store.dir("build")?,
        })
    }
}

/// Everything a build step needs besides its recipe.
#[derive(Debug, Clone)]
pub struct BuildContext<'a> {
    /// The repository root; recipe paths are relative to it.
    pub root: &'a Path,
    /// Where verified downloads (`.deb`s) come from.
    pub store: &'a Store,
    pub dirs: ImageDirs,
    /// Progress bars are added here; pass a hidden one in tests.
    pub progress: MultiProgress,
    /// Parallel jobs for make (defaults to the number of CPUs).
    pub jobs: usize,
    /// Rebuild even if a cached image with the same recipe hash exists.
    pub force: bool,
    /// Also print each step's start and end as plain lines on stderr. On by
    /// default when stderr is not a terminal (CI logs), where indicatif
    /// draws nothing.
    pub plain_progress: bool,
}

impl<'a> BuildContext<'a> {
    pub fn new(root: &'a Path, store: &'a Store, progress: MultiProgress) -> Result<Self> {
        Ok(BuildContext {
            root,
            store,
            dirs: ImageDirs::new(store)?,
            progress,
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
            force: false,
            plain_progress: !std::io::stderr().is_terminal(),
        })
    }

    pub(crate) fn spinner(&self, step: &str) -> ProgressBar {
        let bar = self.progress.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} {spinner} [{elapsed_precise}] {wide_msg}")
                .expect("valid template"),
        );
        bar.set_prefix(step.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        self.note(step, "started");
        bar
    }

    /// Ends a step's bar with `message` (and a plain line, see
    /// `plain_progress`).
    pub(crate) fn finish(&self, bar: &ProgressBar, message: impl Into<String>) {
        let message = message.into();
        self.note(&bar.prefix(), &message);
        bar.finish_with_message(message);
    }

    /// A plain progress line for logs that are not terminals.
    pub(crate) fn note(&self, step: &str, message: &str) {
        if self.plain_progress {
            eprintln!("images: {step}: {message}");
        }
    }

    pub(crate) fn bytes_bar(&self, step: &str) -> ProgressBar {
        let bar = self.progress.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(step.to_string());
        self.note(step, "started");
        bar
    }
}

/// One file of a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// A finished image in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuiltImage {
    pub name: String,
    pub kind: ImageKind,
    pub recipe_hash: String,
    pub dir: PathBuf,
    /// By file name: `bzImage`, `vmlinux`, `System.map`, `config`,
    /// `vmlinux-gdb.py` and the `scripts` directory (kernel);
    /// `initramfs.cpio.gz`; `rootfs.ext4`.
    pub files: BTreeMap<String, ImageFile>,
    /// Seconds the build took (0 when it came from the cache).
    #[serde(default)]
    pub build_seconds: f64,
}

impl BuiltImage {
    /// The path of one of the image's files, e.g. `image.file("bzImage")`.
    pub fn file(&self, name: &str) -> Option<&Path> {
        self.files.get(name).map(|f| f.path.as_path())
    }
}

/// What `images list` shows for one spec.
#[derive(Debug, Clone, Serialize)]
pub struct ImageStatus {
    pub name: String,
    pub kind: ImageKind,
    /// Empty when the recipe could not be hashed (see `problem`).
    pub recipe_hash: String,
    pub built: bool,
    pub dir: PathBuf,
    pub files: BTreeMap<String, ImageFile>,
    /// Why the recipe could not be hashed (e.g. a missing fragment).
    pub problem: Option<String>,
}

const MANIFEST: &str = "manifest.json";

fn validate(spec: &ImageSpec) -> Result<()> {
    let bad = |field, value: &str, expected: &str| ImageError::InvalidSpec {
        image: spec.name.clone(),
        field,
        value: value.to_string(),
        expected: expected.to_string(),
    };
    if spec.name.is_empty()
        || !spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        || spec.name.starts_with('.')
    {
        return Err(bad("name", &spec.name, "letters, digits, '.', '_', '-'"));
    }
    // Absolute paths come from manifests outside the repository.
    let relative = |field, paths: &[PathBuf]| -> Result<()> {
        for p in paths {
            if !p.is_absolute() && p.components().any(|c| c.as_os_str() == "..") {
                return Err(bad(
                    field,
                    &p.display().to_string(),
                    "a path relative to the repository root (without `..`) or an absolute path",
                ));
            }
        }
        Ok(())
    };
    match &spec.recipe {
        ImageRecipe::Kernel(k) => {
            k.source.validate(&spec.name)?;
            if k.fragments.is_empty() && k.base.is_none() {
                return Err(bad("fragments", "[]", "at least one config fragment"));
            }
            if let Some(base) = &k.base {
                if base.base.is_some() {
                    return Err(bad(
                        "base",
                        "a kernel that has a base itself",
                        "a kernel built from its source (one level of bases)",
                    ));
                }
                if base.source != k.source || base.source_tarball != k.source_tarball {
                    return Err(bad(
                        "base",
                        &base.source.package,
                        "a kernel built from the same source package",
                    ));
                }
            }
            relative("fragments", &k.fragments)?;
            relative("patches", &k.patches)?;
        }
        ImageRecipe::Initramfs(i) => {
            i.busybox.validate(&spec.name)?;
            relative("programs", &i.programs)?;
        }
        ImageRecipe::Rootfs(r) => {
            r.validate(&spec.name)?;
            relative("programs", &r.programs)?;
        }
    }
    Ok(())
}

/// The canonical description of a recipe whose sha256 is its hash.
#[derive(Serialize)]
struct RecipeInputs<'a> {
    builder: u32,
    kind: ImageKind,
    packages: Vec<&'a DebianPackageRef>,
    /// (role, path, sha256 of contents), in recipe order.
    files: Vec<(&'static str, String, String)>,
    settings: BTreeMap<&'static str, String>,
}

fn file_input(
    root: &Path,
    role: &'static str,
    path: &Path,
) -> Result<(&'static str, String, String)> {
    let full = root.join(path);
    if !full.is_file() {
        return Err(ImageError::Io {
            path: full,
            action: match role {
                "fragment" => "read config fragment",
                "patch" => "read patch",
                "program" => "read guest program source",
                _ => "read recipe input",
            },
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        });
    }
    Ok((
        role,
        path.display().to_string(),
        crate::store::sha256_file(&full)?,
    ))
}

/// The recipe hash (64 hex digits) of `spec`, read from the files it names.
pub fn recipe_hash(root: &Path, spec: &ImageSpec) -> Result<String> {
    validate(spec)?;
    let mut inputs = RecipeInputs {
        builder: BUILDER_VERSION,
        kind: spec.recipe.kind(),
        packages: Vec::new(),
        files: Vec::new(),
        settings: BTreeMap::new(),
    };
    match &spec.recipe {
        ImageRecipe::Kernel(k) => {
            inputs.packages.push(&k.source);
            if let Some(t) = &k.source_tarball {
                inputs.settings.insert("source_tarball", t.clone());
            }
            for f in &k.fragments {
                inputs.files.push(file_input(root, "fragment", f)?);
            }
            for p in &k.patches {
                inputs.files.push(file_input(root, "patch", p)?);
            }
            if let Some(base) = &k.base {
                inputs
                    .settings
                    .insert("base", recipe_hash(root, &base_spec(spec, base))?);
            }
            inputs.settings.insert("gcc", process::gcc_identity()?);
            inputs
                .settings
                .insert("timestamp", kernel::BUILD_TIMESTAMP.into());
            inputs.settings.insert("user", kernel::BUILD_USER.into());
            inputs.settings.insert("host", kernel::BUILD_HOST.into());
        }
        ImageRecipe::Initramfs(i) => {
            inputs.packages.push(&i.busybox);
            inputs
                .files
                .push(file_input(root, "init", Path::new(initramfs::INIT_SCRIPT))?);
            for p in &i.programs {
                inputs.files.push(file_input(root, "program", p)?);
            }
            if !i.programs.is_empty() {
                inputs.settings.insert("gcc", process::gcc_identity()?);
            }
            if let Some(c) = &i.command {
                inputs.settings.insert("command", c.clone());
            }
        }
        ImageRecipe::Rootfs(r) => {
            inputs
                .files
                .push(file_input(root, "init", Path::new(initramfs::INIT_SCRIPT))?);
            for p in &r.programs {
                inputs.files.push(file_input(root, "program", p)?);
            }
            if !r.programs.is_empty() {
                inputs.settings.insert("gcc", process::gcc_identity()?);
            }
            inputs.settings.insert("suite", r.suite.clone());
            inputs.settings.insert("packages", r.packages.join(","));
            inputs.settings.insert("size_mib", r.size_mib.to_string());
            inputs.settings.insert("mirror", rootfs::mirror(r)?);
            if let Some(c) = &r.command {
                inputs.settings.insert("command", c.clone());
            }
        }
    }
    let json = serde_json::to_vec(&inputs).expect("recipe inputs serialize");
    Ok(hex::encode(Sha256::digest(json)))
}

/// The spec of a derived kernel's base (its hash does not depend on the
/// name).
fn base_spec(spec: &ImageSpec, base: &KernelBuild) -> ImageSpec {
    ImageSpec {
        name: format!("{}-base", spec.name),
        recipe: ImageRecipe::Kernel(base.clone()),
    }
}

fn image_dir(dirs: &ImageDirs, name: &str, hash: &str) -> PathBuf {
    dirs.images.join(format!("{name}-{}", &hash[..16]))
}

/// Reads a finished image's `manifest.json`; `None` if absent or if any of
/// its files is missing (then the entry does not count as built).
fn load_built(dir: &Path) -> Result<Option<BuiltImage>> {
    let manifest = dir.join(MANIFEST);
    if !manifest.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&manifest).map_err(io_err(&manifest, "read"))?;
    let mut image: BuiltImage =
        serde_json::from_str(&text).map_err(|e| ImageError::BadMetadata {
            path: manifest.clone(),
            detail: e.to_string(),
        })?;
    // The manifest records how long the build took; served from the cache,
    // this call built nothing.
    image.build_seconds = 0.0;
    if image.files.values().all(|f| f.path.exists()) {
        Ok(Some(image))
    } else {
        Ok(None)
    }
}

/// A kernel image cached before images kept the kernel's gdb scripts gets
/// them from its build tree when that tree still holds exactly this image's
/// vmlinux (no compile); otherwise `None`, and the image is built again.
fn with_gdb_scripts(image: BuiltImage, build_dir: &Path) -> Result<Option<BuiltImage>> {
    if image.files.contains_key(kernel::GDB_SCRIPT) {
        return Ok(Some(image));
    }
    let obj = build_dir.join("out");
    let (Some(vmlinux), true) = (
        image.files.get("vmlinux"),
        obj.join(kernel::GDB_SCRIPT).exists(),
    ) else {
        return Ok(None);
    };
    let tree_vmlinux = obj.join("vmlinux");
    if !tree_vmlinux.is_file() || crate::store::sha256_file(&tree_vmlinux)? != vmlinux.sha256 {
        return Ok(None);
    }
    kernel::copy_gdb_scripts(&obj, &image.dir)?;
    let image = BuiltImage {
        files: hash_entries(&image.dir, &image.dir)?,
        ..image
    };
    write_manifest(&image.dir, &image)?;
    Ok(Some(image))
}

/// Builds `spec` unless an image with the same recipe hash is cached, and
/// returns the finished image.
pub fn build(ctx: &BuildContext<'_>, spec: &ImageSpec) -> Result<BuiltImage> {
    let hash = recipe_hash(ctx.root, spec)?;
    let final_dir = image_dir(&ctx.dirs, &spec.name, &hash);
    // `upgrade` (under the recipe's lock only) may add the gdb scripts to a
    // kernel image cached without them.
    let cached = |upgrade: bool| -> Result<Option<BuiltImage>> {
        match (load_built(&final_dir)?, &spec.recipe) {
            (Some(image), ImageRecipe::Kernel(k)) => {
                let own_tree = ctx.dirs.build.join(format!("kernel-{}", &hash[..16]));
                match k.base {
                    None if upgrade => with_gdb_scripts(image, &own_tree),
                    // A derived kernel is built in the base's tree, which
                    // may hold another kernel now: without the scripts, it
                    // is built again.
                    _ => Ok(image
                        .files
                        .contains_key(kernel::GDB_SCRIPT)
                        .then_some(image)),
                }
            }
            (image, _) => Ok(image),
        }
    };
    if !ctx.force {
        if let Some(image) = cached(false)? {
            return Ok(image);
        }
    }
    // One build per recipe at a time (threads of one test run, or two
    // `cargo xtask` processes): the loser waits, then finds it cached.
    let _lock = ctx.store.lock(&format!("image-{}", &hash[..16]))?;
    if !ctx.force {
        if let Some(image) = cached(true)? {
            return Ok(image);
        }
    }
    std::fs::create_dir_all(&ctx.dirs.images).map_err(io_err(&ctx.dirs.images, "create"))?;
    // Leftovers of killed builds of this recipe (never counted as built).
    let stale_prefix = format!(".partial-{}-{}-", spec.name, &hash[..16]);
    if let Ok(entries) = std::fs::read_dir(&ctx.dirs.images) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&stale_prefix)
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let partial = ctx.dirs.images.join(format!(
        ".partial-{}-{}-{}",
        spec.name,
        &hash[..16],
        std::process::id()
    ));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_err(&partial, "remove stale partial"))?;
    }
    std::fs::create_dir_all(&partial).map_err(io_err(&partial, "create"))?;

    let started = Instant::now();
    let header = ctx.progress.add(ProgressBar::new_spinner());
    header.set_prefix(spec.name.clone());
    header.set_message(format!(
        "{} ({}, recipe {})",
        spec.name,
        spec.recipe.kind(),
        &hash[..16]
    ));
    header.tick();
    let built = match &spec.recipe {
        ImageRecipe::Kernel(k) => match &k.base {
            None => {
                let build_dir = ctx.dirs.build.join(format!("kernel-{}", &hash[..16]));
                kernel::build(ctx, k, &build_dir, &partial)
            }
            // Built in the base's tree, under the base's lock: a build of
            // the base itself would start that tree over.
            Some(base) => recipe_hash(ctx.root, &base_spec(spec, base)).and_then(|base_hash| {
                let _base_lock = ctx.store.lock(&format!("image-{}", &base_hash[..16]))?;
                let base_dir = ctx.dirs.build.join(format!("kernel-{}", &base_hash[..16]));
                kernel::build_derived(ctx, base, k, &base_dir, &partial)
            }),
        },
        ImageRecipe::Initramfs(i) => initramfs::build(ctx, i, &partial),
        ImageRecipe::Rootfs(r) => {
            let build_dir = ctx.dirs.build.join(format!("rootfs-{}", &hash[..16]));
            rootfs::build(ctx, r, &build_dir, &partial)
        }
    };
    let finished = built.and_then(|()| {
        finish_image(
            spec,
            &hash,
            &partial,
            &final_dir,
            started.elapsed().as_secs_f64(),
        )
    });
    if finished.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    ctx.finish(
        &header,
        format!(
            "{} {} in {:.0}s",
            spec.name,
            if finished.is_ok() { "built" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        ),
    );
    finished
}

/// The entries of the image directory `dir` (to be found at `final_dir`):
/// a file by its sha256, a directory (the kernel's gdb scripts) by the
/// sha256 of its files' relative paths and sha256s, in order.
fn hash_entries(dir: &Path, final_dir: &Path) -> Result<BTreeMap<String, ImageFile>> {
    let mut files = BTreeMap::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_err(dir, "list"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST)
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let (sha256, size) = hash_tree(&path, Path::new(""))?;
        files.insert(
            name.clone(),
            ImageFile {
                path: final_dir.join(&name),
                sha256,
                size,
            },
        );
    }
    Ok(files)
}

/// (sha256, bytes) of a file, or of a directory's files as described at
/// [`hash_entries`]; `rel` is `path`'s place inside the tree.
fn hash_tree(path: &Path, rel: &Path) -> Result<(String, u64)> {
    let meta = std::fs::metadata(path).map_err(io_err(path, "stat"))?;
    if !meta.is_dir() {
        return Ok((crate::store::sha256_file(path)?, meta.len()));
    }
    let mut names: Vec<_> = std::fs::read_dir(path)
        .map_err(io_err(path, "list"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    let mut hasher = Sha256::new();
    let mut total = 0;
    for name in names {
        let (sha, size) = hash_tree(&path.join(&name), &rel.join(&name))?;
        hasher.update(format!("{} {sha}\n", rel.join(&name).display()));
        total += size;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Writes `image`'s `manifest.json` into `dir`.
fn write_manifest(dir: &Path, image: &BuiltImage) -> Result<()> {
    let manifest = dir.join(MANIFEST);
    let json = serde_json::to_string_pretty(image).expect("image serializes");
    std::fs::write(&manifest, json).map_err(io_err(&manifest, "write"))
}

/// Hashes the files in `partial`, writes `manifest.json` and renames the
/// directory to its final name.
fn finish_image(
    spec: &ImageSpec,
    hash: &str,
    partial: &Path,
    final_dir: &Path,
    build_seconds: f64,
) -> Result<BuiltImage> {
    let files = hash_entries(partial, final_dir)?;
    let image = BuiltImage {
        name: spec.name.clone(),
        kind: spec.recipe.kind(),
        recipe_hash: hash.to_string(),
        dir: final_dir.to_path_buf(),
        files,
        build_seconds,
    };
    write_manifest(partial, &image)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir).map_err(io_err(final_dir, "replace old image"))?;
    }
    std::fs::rename(partial, final_dir).map_err(io_err(final_dir, "rename into place"))?;
    Ok(image)
}

/// The status of each spec: built or not, where, file hashes, recipe hash.
pub fn list(root: &Path, dirs: &ImageDirs, specs: &[ImageSpec]) -> Vec<ImageStatus> {
    specs
        .iter()
        .map(|spec| {
            let mut status = ImageStatus {
                name: spec.name.clone(),
                kind: spec.recipe.kind(),
                recipe_hash: String::new(),
                built: false,
                dir: PathBuf::new(),
                files: BTreeMap::new(),
                problem: None,
            };
            match recipe_hash(root, spec) {
                Ok(hash) => {
                    status.dir = image_dir(dirs, &spec.name, &hash);
                    match load_built(&status.dir) {
                        Ok(Some(image)) => {
                            if spec.recipe.kind() == ImageKind::Kernel
                                && !image.files.contains_key(kernel::GDB_SCRIPT)
                            {
                                status.problem = Some("cached without the kernel's gdb scripts: the next `images build` adds them (from its build tree) or builds it again".into());
                            } else {
                                status.built = true;
                            }
                            status.files = image.files;
                        }
                        Ok(None) => {}
                        Err(e) => status.problem = Some(e.to_string()),
                    }
                    status.recipe_hash = hash;
                }
                Err(e) => status.problem = Some(e.to_string()),
            }
            status
        })
        .collect()
}

/// Removes built images (and their build trees and partial leftovers).
/// With `names` empty, removes every image and build tree; the verified
/// downloads are kept. Returns the removed paths.
pub fn clean(dirs: &ImageDirs, names: &[String]) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut remove = |path: PathBuf| -> Result<()> {
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io_err(&path, "remove"))?;
        } else if path.exists() {
            std::fs::remove_file(&path).map_err(io_err(&path, "remove"))?;
        }
        removed.push(path);
        Ok(())
    };
    let entries = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    if names.is_empty() {
        for path in entries(&dirs.images)
            .into_iter()
            .chain(entries(&dirs.build))
        {
            remove(path)?;
        }
        return Ok(removed);
    }
    for path in entries(&dirs.images) {
        let file_name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let file_name = file_name.trim_start_matches(".partial-");
        let matches = names.iter().any(|n| {
            file_name
                .strip_prefix(n.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|rest| {
                    rest.len() >= 16 && rest[..16].chars().all(|c| c.is_ascii_hexdigit())
                })
        });
        if !matches {
            continue;
        }
        if let Ok(Some(image)) = load_built(&path) {
            for build_dir in entries(&dirs.build) {
                let bn = build_dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if bn.ends_with(&image.recipe_hash[..16]) {
                    remove(build_dir)?;
                }
            }
        }
        remove(path)?;
    }
    Ok(removed)
}

/// Picks the specs named in `names` (all of them when `names` is empty), in
/// the order given; an unknown name is an error that lists the known ones.
pub fn select(specs: &[ImageSpec], names: &[String]) -> Result<Vec<ImageSpec>> {
    if names.is_empty() {
        return Ok(specs.to_vec());
    }
    names
        .iter()
        .map(|name| {
            specs
                .iter()
                .find(|s| &s.name == name)
                .cloned()
                .ok_or_else(|| ImageError::InvalidSpec {
                    image: name.clone(),
                    field: "name",
                    value: name.clone(),
                    expected: format!(
                        "one of the buildable images in manifests/: {}",
                        specs
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
        })
        .collect()
}

/// `images list` as a human-readable table: one line per image, then one
/// indented line per file with its sha256.
pub fn format_list(statuses: &[ImageStatus]) -> String {
    let mut out = String::new();
    for s in statuses {
        let state = if s.built { "built" } else { "not built" };
        let hash = if s.recipe_hash.is_empty() {
            "-"
        } else {
            &s.recipe_hash[..16]
        };
        out.push_str(&format!(
            "{:<24} {:<10} {:<10} recipe {}  {}\n",
            s.name,
            s.kind.to_string(),
            state,
            hash,
            s.dir.display()
        ));
        if let Some(problem) = &s.problem {
            out.push_str(&format!("    problem: {problem}\n"));
        }
        for (name, file) in &s.files {
            out.push_str(&format!(
                "    {:<18} {}  {:>11} bytes  {}\n",
                name,
                file.sha256,
                file.size,
                file.path.display()
            ));
        }
    }
    out
}

/// The busybox package an ad-hoc initramfs uses: the one pinned by the
/// `initramfs-base` image, else by the first initramfs image.
pub fn default_busybox(specs: &[ImageSpec]) -> Result<DebianPackageRef> {
    let initramfs = |s: &ImageSpec| match &s.recipe {
        ImageRecipe::Initramfs(i) => Some(i.busybox.clone()),
        _ => None,
    };
    specs
        .iter()
        .filter(|s| s.name == "initramfs-base")
        .chain(specs.iter())
        .find_map(initramfs)
        .ok_or_else(|| ImageError::InvalidSpec {
            image: "ad-hoc initramfs".into(),
            field: "busybox",
            value: "none".into(),
            expected: "an initramfs image in manifests/ that pins busybox-static".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A kernel image cached before the gdb scripts, and its build tree.
    fn old_image(root: &Path, tree_vmlinux: &str) -> (BuiltImage, PathBuf) {
        let dir = root.join("images/guest-0123456789abcdef");
        write(&dir.join("vmlinux"), "ELF vmlinux");
        write(&dir.join("bzImage"), "bzImage");
        let image = BuiltImage {
            name: "guest".into(),
            kind: ImageKind::Kernel,
            recipe_hash: "0123456789abcdef".repeat(4),
            dir: dir.clone(),
            files: hash_entries(&dir, &dir).unwrap(),
            build_seconds: 1.0,
        };
        let tree = root.join("build/kernel-0123456789abcdef");
        let obj = tree.join("out");
        write(&obj.join("vmlinux"), tree_vmlinux);
        write(&obj.join(kernel::GDB_SCRIPT), "import linux.dmesg");
        write(&obj.join("scripts/gdb/linux/dmesg.py"), "lx-dmesg");
        write(&obj.join("scripts/gdb/linux/constants.py"), "LX_X = 1");
        write(&obj.join("scripts/gdb/linux/.dmesg.py.cmd"), "not copied");
        (image, tree)
    }

    #[test]
    fn a_cached_kernel_gets_its_gdb_scripts_from_its_own_build_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let (image, tree) = old_image(tmp.path(), "ELF vmlinux");
        let upgraded = with_gdb_scripts(image, &tree).unwrap().expect("upgraded");
        let dir = upgraded.dir.clone();
        assert!(upgraded.files.contains_key(kernel::GDB_SCRIPT));
        assert_eq!(
            std::fs::read_to_string(dir.join("scripts/gdb/linux/dmesg.py")).unwrap(),
            "lx-dmesg"
        );
        assert!(!dir.join("scripts/gdb/linux/.dmesg.py.cmd").exists());
        // The scripts directory is one entry, hashed over its files.
        let scripts = &upgraded.files[kernel::GDB_SCRIPTS_DIR];
        assert_eq!(
            scripts.size,
            "lx-dmesg".len() as u64 + "LX_X = 1".len() as u64
        );
        let again = load_built(&dir)
            .unwrap()
            .expect("the manifest was rewritten");
        assert_eq!(again.files[kernel::GDB_SCRIPTS_DIR].sha256, scripts.sha256);
        write(&dir.join("scripts/gdb/linux/dmesg.py"), "changed");
        assert_ne!(
            hash_entries(&dir, &dir).unwrap()[kernel::GDB_SCRIPTS_DIR].sha256,
            scripts.sha256
        );
    }

    #[test]
    fn a_build_tree_holding_another_kernel_does_not_lend_its_scripts() {
        let tmp = tempfile::tempdir().unwrap();
        let (image, tree) = old_image(tmp.path(), "ELF of a derived kernel");
        assert!(with_gdb_scripts(image.clone(), &tree).unwrap().is_none());
        std::fs::remove_dir_all(&tree).unwrap();
        assert!(with_gdb_scripts(image, &tree).unwrap().is_none());
    }
}
