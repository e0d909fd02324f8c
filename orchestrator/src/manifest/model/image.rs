// SPDX-License-Identifier: GPL-2.0-or-later
//! Images: their kinds, sources and build recipes, and the `*Spec` structs
//! that mirror how an image is written in YAML.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::UnpackFormat;

/// What an image is used as when the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    /// A bzImage, with its vmlinux for symbols.
    Kernel,
    /// A cpio archive unpacked into the guest's root.
    Initramfs,
    /// A root filesystem image attached as the root disk.
    Rootfs,
    /// Any other disk image attached to the guest.
    Disk,
}

impl ImageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Kernel => "kernel",
            ImageKind::Initramfs => "initramfs",
            ImageKind::Rootfs => "rootfs",
            ImageKind::Disk => "disk",
        }
    }
}

/// A Debian binary package, pinned by version and by the SHA-256 of its .deb.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a Debian package: a mapping with `package`, `version` and `sha256`"
)]
pub struct DebianPackage {
    pub package: String,
    pub version: String,
    /// SHA-256 of the .deb (the `SHA256:` field of `apt-cache show`), 64 hex
    /// digits; stored in lowercase.
    #[schemars(pattern(r"^[0-9a-fA-F]{64}$"))]
    pub sha256: String,
}

/// Where an image's bytes come from.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// Downloaded, checked against `sha256` (lowercase hex), optionally unpacked.
    Url {
        url: String,
        sha256: String,
        unpack: Option<UnpackFormat>,
    },
    /// Taken from a Debian package.
    Debian(DebianPackage),
    /// Built from a recipe under `images/`.
    Build(BuildRecipe),
}

/// Where a downloaded file comes from.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fetch {
    /// Downloaded, checked against `sha256` (lowercase hex), optionally unpacked.
    Url {
        url: String,
        sha256: String,
        unpack: Option<UnpackFormat>,
    },
    /// Taken from a Debian package.
    Debian(DebianPackage),
}

impl From<Fetch> for ImageSource {
    fn from(fetch: Fetch) -> ImageSource {
        match fetch {
            Fetch::Url {
                url,
                sha256,
                unpack,
            } => ImageSource::Url {
                url,
                sha256,
                unpack,
            },
            Fetch::Debian(package) => ImageSource::Debian(package),
        }
    }
}

/// A file fetched from a URL or a Debian package (a kernel's vmlinux, a
/// kernel source tarball).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "FileSpec", into = "FileSpec")]
#[schemars(with = "FileSpec")]
pub struct FileSource {
    pub fetch: Fetch,
    /// The file inside the unpacked archive or package; `None` when the
    /// download is the file itself.
    pub path: Option<String>,
}

/// How a recipe under `images/<recipe>/` builds an image.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "recipe", rename_all = "snake_case")]
pub enum BuildRecipe {
    Kernel(KernelRecipe),
    Initramfs(InitramfsRecipe),
    Rootfs(RootfsRecipe),
}

impl BuildRecipe {
    pub fn name(&self) -> &'static str {
        match self {
            BuildRecipe::Kernel(_) => "kernel",
            BuildRecipe::Initramfs(_) => "initramfs",
            BuildRecipe::Rootfs(_) => "rootfs",
        }
    }
}

/// A Linux kernel built from source; yields a bzImage and its vmlinux.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "a kernel recipe")]
pub struct KernelRecipe {
    /// The kernel source (e.g. Debian's `linux-source-6.1`).
    pub source: FileSource,
    /// Config fragments merged in order over the defconfig (paths from the
    /// repository root).
    #[serde(default)]
    pub fragments: Vec<PathBuf>,
    /// Patches applied in order (paths from the repository root).
    #[serde(default)]
    pub patches: Vec<PathBuf>,
}

/// An initramfs with busybox and statically linked guest programs.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "an initramfs recipe")]
pub struct InitramfsRecipe {
    pub busybox: DebianPackage,
    /// C sources compiled statically with gcc and put in `/bin` (paths from
    /// the repository root).
    #[serde(default)]
    pub programs: Vec<PathBuf>,
    /// The command init runs when none is given at boot.
    #[serde(default)]
    pub command: Option<String>,
}

/// A Debian root filesystem built with debootstrap.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, expecting = "a rootfs recipe")]
pub struct RootfsRecipe {
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    #[serde(default)]
    pub packages: Vec<String>,
    #[schemars(range(min = 1))]
    pub size_mib: u64,
    /// C sources compiled with gcc and put in `/usr/local/bin`.
    #[serde(default)]
    pub programs: Vec<PathBuf>,
    /// The command init runs when none is given at boot.
    #[serde(default)]
    pub command: Option<String>,
}

/// A guest image: kernel, initramfs, root filesystem or disk.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "ImageSpec", into = "ImageSpec")]
#[schemars(with = "ImageSpec")]
pub struct Image {
    pub name: String,
    pub kind: ImageKind,
    pub description: Option<String>,
    pub source: ImageSource,
    /// The file inside the unpacked archive or package (url and debian
    /// sources only).
    pub path: Option<String>,
    /// Where a url or debian kernel's vmlinux comes from (kernels built by
    /// the `kernel` recipe produce their own).
    pub vmlinux: Option<FileSource>,
}

/// An image as written in YAML: exactly one of `url` (with `sha256`),
/// `debian` or `build`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "an image: a mapping with `name`, `kind` and one of `url`, `debian` or `build`"
)]
pub struct ImageSpec {
    /// Unique across all manifests; `[a-z0-9][a-z0-9.-]*`.
    #[schemars(pattern(r"^[a-z0-9][a-z0-9.-]*$"))]
    pub name: String,
    pub kind: ImageKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// SHA-256 of the downloaded file (with `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpack: Option<UnpackFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debian: Option<DebianPackage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
    /// File inside the unpacked archive or package.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmlinux: Option<FileSpec>,
}

/// A [`FileSource`] as written: `url` + `sha256` (+ `unpack`) or `debian`,
/// with an optional `path` inside.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a file source: a mapping with `url` and `sha256`, or `debian`"
)]
pub struct FileSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpack: Option<UnpackFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debian: Option<DebianPackage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Which recipe builds an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecipeName {
    Kernel,
    Initramfs,
    Rootfs,
}

/// A [`BuildRecipe`] as written: `recipe` plus the fields of that recipe.
/// Kept flat so that a field given to the wrong recipe is reported at its own
/// line rather than at `build:`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a build: a mapping with `recipe` and its fields"
)]
pub struct BuildSpec {
    pub recipe: RecipeName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<FileSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fragments: Option<Vec<PathBuf>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patches: Option<Vec<PathBuf>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busybox: Option<DebianPackage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programs: Option<Vec<PathBuf>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
}

// Editors get the precise per-recipe schema, tagged by `recipe`.
impl JsonSchema for BuildSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        BuildRecipe::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        BuildRecipe::json_schema(generator)
    }
}
