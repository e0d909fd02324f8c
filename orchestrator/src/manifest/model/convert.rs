// SPDX-License-Identifier: GPL-2.0-or-later
//! Checked conversion between the YAML-shaped `*Spec` structs and the typed
//! images, reporting every problem at its path, and back.

use std::path::PathBuf;

use super::super::positions::{DisplayPath, Seg};
use super::{
    BuildRecipe, BuildSpec, DebianPackage, Fetch, FileSource, FileSpec, Image, ImageKind,
    ImageSource, ImageSpec, InitramfsRecipe, KernelRecipe, RecipeName, RootfsRecipe, UnpackFormat,
};

/// A problem found while converting a spec, at a path relative to the spec.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub path: Vec<Seg>,
    pub at_key: bool,
    pub message: String,
}

impl Problem {
    fn value(path: Vec<Seg>, message: String) -> Problem {
        Problem {
            path,
            at_key: false,
            message,
        }
    }

    fn key(path: Vec<Seg>, message: String) -> Problem {
        Problem {
            path,
            at_key: true,
            message,
        }
    }
}

/// `path` with one more key.
fn join(path: &[Seg], key: &str) -> Vec<Seg> {
    let mut joined = path.to_vec();
    joined.push(Seg::key(key));
    joined
}

/// Checks a SHA-256 and returns it in lowercase.
pub(crate) fn check_sha256(path: Vec<Seg>, sha256: &str, problems: &mut Vec<Problem>) -> String {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        problems.push(Problem::value(
            path,
            format!(
                "sha256 `{sha256}` is malformed: expected 64 hexadecimal digits, got {} characters",
                sha256.chars().count()
            ),
        ));
    }
    sha256.to_ascii_lowercase()
}

fn check_debian(
    path: &[Seg],
    package: &DebianPackage,
    problems: &mut Vec<Problem>,
) -> DebianPackage {
    if package.package.is_empty() {
        problems.push(Problem::value(
            join(path, "package"),
            "debian package name is empty".into(),
        ));
    }
    if package.version.is_empty() {
        problems.push(Problem::value(
            join(path, "version"),
            "debian package version is empty: pin the exact version".into(),
        ));
    }
    DebianPackage {
        package: package.package.clone(),
        version: package.version.clone(),
        sha256: check_sha256(join(path, "sha256"), &package.sha256, problems),
    }
}

/// The url/debian source shared by images and [`FileSpec`]s. `build` says
/// whether a `build:` was also given (only images may have one).
struct FlatSource<'a> {
    url: Option<&'a String>,
    sha256: Option<&'a String>,
    unpack: Option<UnpackFormat>,
    debian: Option<&'a DebianPackage>,
    build: bool,
    /// Whether `path` (a file inside the download) was given.
    path: bool,
}

/// Converts the flat source fields at `path` into one source, reporting
/// none or several. Returns `None` for a `build:` source or on error.
fn flat_source(
    path: &[Seg],
    flat: &FlatSource,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Option<Fetch> {
    let given: Vec<&str> = [
        ("url", flat.url.is_some()),
        ("debian", flat.debian.is_some()),
        ("build", flat.build),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    let allowed = if what == "image" {
        "`url` (with `sha256`), `debian` or `build`"
    } else {
        "`url` (with `sha256`) or `debian`"
    };
    match given.len() {
        0 => {
            problems.push(Problem::value(
                path.to_vec(),
                format!("{what} has no source: expected exactly one of {allowed}"),
            ));
            return None;
        }
        1 => {}
        _ => {
            // Reported at the second source's key: that is the one to remove.
            problems.push(Problem::key(
                join(path, given[1]),
                format!(
                    "{what} has several sources ({}): expected exactly one of {allowed}",
                    given.join(", ")
                ),
            ));
            return None;
        }
    }
    if flat.url.is_none() {
        if flat.sha256.is_some() {
            problems.push(Problem::key(
                join(path, "sha256"),
                "`sha256` at this level belongs to a `url` source; a debian package carries its own `sha256`".into(),
            ));
        }
        if flat.unpack.is_some() {
            problems.push(Problem::key(
                join(path, "unpack"),
                "`unpack` only applies to a `url` source".into(),
            ));
        }
    }
    if let Some(url) = flat.url {
        match url::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => {}
            Ok(parsed) => problems.push(Problem::value(
                join(path, "url"),
                format!(
                    "url `{url}` has scheme `{}`: expected an http:// or https:// URL",
                    parsed.scheme()
                ),
            )),
            Err(error) => problems.push(Problem::value(
                join(path, "url"),
                format!("url `{url}` is not a valid URL: {error}"),
            )),
        }
        let Some(sha256) = flat.sha256 else {
            problems.push(Problem::key(
                join(path, "url"),
                "a `url` source needs `sha256` (64 hex digits) to check the download".into(),
            ));
            return None;
        };
        if flat.path && !flat.unpack.is_some_and(UnpackFormat::is_archive) {
            problems.push(Problem::key(
                join(path, "path"),
                "`path` names a file inside an archive: a `url` source needs `unpack: tar.gz`, `tar.xz` or `tar.zst` for it".into(),
            ));
        }
        let sha256 = check_sha256(join(path, "sha256"), sha256, problems);
        return Some(Fetch::Url {
            url: url.clone(),
            sha256,
            unpack: flat.unpack,
        });
    }
    flat.debian
        .map(|package| Fetch::Debian(check_debian(&join(path, "debian"), package, problems)))
}

impl FileSpec {
    pub(crate) fn convert(&self, path: &[Seg], problems: &mut Vec<Problem>) -> Option<FileSource> {
        let flat = FlatSource {
            url: self.url.as_ref(),
            sha256: self.sha256.as_ref(),
            unpack: self.unpack,
            debian: self.debian.as_ref(),
            build: false,
            path: self.path.is_some(),
        };
        let fetch = flat_source(path, &flat, "file source", problems)?;
        Some(FileSource {
            fetch,
            path: self.path.clone(),
        })
    }
}

impl BuildSpec {
    pub(crate) fn convert(&self, path: &[Seg], problems: &mut Vec<Problem>) -> Option<BuildRecipe> {
        let recipe = match self.recipe {
            RecipeName::Kernel => "kernel",
            RecipeName::Initramfs => "initramfs",
            RecipeName::Rootfs => "rootfs",
        };
        let fields: [(&str, bool); 9] = [
            ("source", self.source.is_some()),
            ("fragments", self.fragments.is_some()),
            ("patches", self.patches.is_some()),
            ("busybox", self.busybox.is_some()),
            ("programs", self.programs.is_some()),
            ("command", self.command.is_some()),
            ("suite", self.suite.is_some()),
            ("packages", self.packages.is_some()),
            ("size_mib", self.size_mib.is_some()),
        ];
        let (allowed, required): (&[&str], &[&str]) = match self.recipe {
            RecipeName::Kernel => (&["source", "fragments", "patches"], &["source"]),
            RecipeName::Initramfs => (&["busybox", "programs", "command"], &["busybox"]),
            RecipeName::Rootfs => (
                &["suite", "packages", "size_mib", "programs", "command"],
                &["suite", "size_mib"],
            ),
        };
        for (field, present) in fields {
            if present && !allowed.contains(&field) {
                problems.push(Problem::key(
                    join(path, field),
                    format!(
                        "field `{field}` does not apply to recipe `{recipe}`: expected one of `{}`",
                        allowed.join("`, `")
                    ),
                ));
            }
        }
        for field in required {
            if !fields
                .iter()
                .any(|(name, present)| name == field && *present)
            {
                problems.push(Problem::value(
                    path.to_vec(),
                    format!("recipe `{recipe}` needs field `{field}`"),
                ));
            }
        }
        // A missing required field leaves nothing to build (the `?`s below).
        let list = |list: &Option<Vec<PathBuf>>| list.clone().unwrap_or_default();
        Some(match self.recipe {
            RecipeName::Kernel => BuildRecipe::Kernel(KernelRecipe {
                source: self
                    .source
                    .as_ref()?
                    .convert(&join(path, "source"), problems)?,
                fragments: list(&self.fragments),
                patches: list(&self.patches),
            }),
            RecipeName::Initramfs => BuildRecipe::Initramfs(InitramfsRecipe {
                busybox: check_debian(&join(path, "busybox"), self.busybox.as_ref()?, problems),
                programs: list(&self.programs),
                command: self.command.clone(),
            }),
            RecipeName::Rootfs => BuildRecipe::Rootfs(RootfsRecipe {
                suite: self.suite.clone()?,
                packages: self.packages.clone().unwrap_or_default(),
                size_mib: self.size_mib?,
                programs: list(&self.programs),
                command: self.command.clone(),
            }),
        })
    }
}

impl ImageSpec {
    /// The image this spec describes, or every problem with it (paths
    /// relative to the spec).
    ///
    /// The image is returned whenever it can be built, even with problems,
    /// so that later checks can look at it; it is valid only if no problem
    /// was added.
    pub(crate) fn convert(&self, problems: &mut Vec<Problem>) -> Option<Image> {
        let flat = FlatSource {
            url: self.url.as_ref(),
            sha256: self.sha256.as_ref(),
            unpack: self.unpack,
            debian: self.debian.as_ref(),
            build: self.build.is_some(),
            path: self.path.is_some(),
        };
        let mut source = flat_source(&[], &flat, "image", problems).map(ImageSource::from);
        if let Some(build) = &self.build {
            if let Some(recipe) = build.convert(&[Seg::key("build")], problems) {
                let expected = match recipe {
                    BuildRecipe::Kernel(_) => ImageKind::Kernel,
                    BuildRecipe::Initramfs(_) => ImageKind::Initramfs,
                    BuildRecipe::Rootfs(_) => ImageKind::Rootfs,
                };
                if expected != self.kind {
                    problems.push(Problem::value(
                        vec![Seg::key("build"), Seg::key("recipe")],
                        format!(
                            "recipe `{}` builds images of kind `{}` but this image's kind is `{}`",
                            recipe.name(),
                            expected.as_str(),
                            self.kind.as_str()
                        ),
                    ));
                }
                if source.is_none() && flat.url.is_none() && flat.debian.is_none() {
                    source = Some(ImageSource::Build(recipe));
                }
            }
            for field in ["path", "vmlinux"] {
                let present = match field {
                    "path" => self.path.is_some(),
                    _ => self.vmlinux.is_some(),
                };
                if present {
                    problems.push(Problem::key(
                        vec![Seg::key(field)],
                        format!("`{field}` applies to url and debian sources, not to a built image (the recipe produces it)"),
                    ));
                }
            }
        }
        let vmlinux = match &self.vmlinux {
            Some(_) if self.kind != ImageKind::Kernel => {
                problems.push(Problem::key(
                    vec![Seg::key("vmlinux")],
                    format!(
                        "`vmlinux` only applies to kernel images, this one is `{}`",
                        self.kind.as_str()
                    ),
                ));
                None
            }
            Some(spec) => spec.convert(&[Seg::key("vmlinux")], problems),
            None => None,
        };
        Some(Image {
            name: self.name.clone(),
            kind: self.kind,
            description: self.description.clone(),
            source: source?,
            path: self.path.clone(),
            vmlinux,
        })
    }
}

/// Joins problems for the plain `TryFrom` conversions, which have no file.
fn joined(problems: Vec<Problem>) -> String {
    problems
        .into_iter()
        .map(|p| {
            if p.path.is_empty() {
                p.message
            } else {
                format!("{}: {}", DisplayPath(&p.path), p.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl TryFrom<ImageSpec> for Image {
    type Error = String;

    fn try_from(spec: ImageSpec) -> Result<Image, String> {
        let mut problems = Vec::new();
        match spec.convert(&mut problems) {
            Some(image) if problems.is_empty() => Ok(image),
            _ => Err(joined(problems)),
        }
    }
}

impl TryFrom<FileSpec> for FileSource {
    type Error = String;

    fn try_from(spec: FileSpec) -> Result<FileSource, String> {
        let mut problems = Vec::new();
        match spec.convert(&[], &mut problems) {
            Some(source) if problems.is_empty() => Ok(source),
            _ => Err(joined(problems)),
        }
    }
}

fn file_spec(source: &ImageSource, path: Option<String>) -> FileSpec {
    // Only url and debian sources have a flat form; a build is written by
    // the caller under `build:`.
    let mut spec = FileSpec {
        url: None,
        sha256: None,
        unpack: None,
        debian: None,
        path,
    };
    match source {
        ImageSource::Url {
            url,
            sha256,
            unpack,
        } => {
            spec.url = Some(url.clone());
            spec.sha256 = Some(sha256.clone());
            spec.unpack = *unpack;
        }
        ImageSource::Debian(package) => spec.debian = Some(package.clone()),
        ImageSource::Build(_) => {}
    }
    spec
}

impl From<FileSource> for FileSpec {
    fn from(source: FileSource) -> FileSpec {
        file_spec(&source.fetch.into(), source.path)
    }
}

impl From<BuildRecipe> for BuildSpec {
    fn from(recipe: BuildRecipe) -> BuildSpec {
        let mut spec = BuildSpec {
            recipe: RecipeName::Kernel,
            source: None,
            fragments: None,
            patches: None,
            busybox: None,
            programs: None,
            command: None,
            suite: None,
            packages: None,
            size_mib: None,
        };
        match recipe {
            BuildRecipe::Kernel(kernel) => {
                spec.source = Some(kernel.source.into());
                spec.fragments = Some(kernel.fragments);
                spec.patches = Some(kernel.patches);
            }
            BuildRecipe::Initramfs(initramfs) => {
                spec.recipe = RecipeName::Initramfs;
                spec.busybox = Some(initramfs.busybox);
                spec.programs = Some(initramfs.programs);
                spec.command = initramfs.command;
            }
            BuildRecipe::Rootfs(rootfs) => {
                spec.recipe = RecipeName::Rootfs;
                spec.suite = Some(rootfs.suite);
                spec.packages = Some(rootfs.packages);
                spec.size_mib = Some(rootfs.size_mib);
                spec.programs = Some(rootfs.programs);
                spec.command = rootfs.command;
            }
        }
        spec
    }
}

impl From<Image> for ImageSpec {
    fn from(image: Image) -> ImageSpec {
        let flat = file_spec(&image.source, image.path);
        ImageSpec {
            name: image.name,
            kind: image.kind,
            description: image.description,
            url: flat.url,
            sha256: flat.sha256,
            unpack: flat.unpack,
            debian: flat.debian,
            build: match image.source {
                ImageSource::Build(recipe) => Some(recipe.into()),
                _ => None,
            },
            path: flat.path,
            vmlinux: image.vmlinux.map(FileSpec::from),
        }
    }
}
