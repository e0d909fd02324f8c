// SPDX-License-Identifier: GPL-2.0-or-later
//! The typed manifests: images, workloads, bug cases and suites.
//!
//! Field names are a contract with the image builder and the runner. Every
//! struct denies unknown fields so a misspelt key is an error, not a silently
//! ignored setting. Images are written flat in YAML (`url:`/`debian:`/`build:`
//! beside `name:`) but used as one [`ImageSource`] enum, so they go through
//! the `*Spec` structs, which mirror the YAML, and a checked conversion.

use std::path::PathBuf;

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::positions::Seg;
pub use crate::store::UnpackFormat;

/// Everything the manifests declare, after validation.
///
/// Also the shape of one manifest file: each top-level key is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Manifests {
    /// Guest kernels, initramfs images, root filesystems and disks.
    pub images: Vec<Image>,
    /// Benchmarks run inside the guest.
    pub workloads: Vec<Workload>,
    /// Kernel bugs to record and replay.
    pub bugs: Vec<BugCase>,
    /// Experiments: which workloads or bugs to run, under which schemes.
    pub suites: Vec<Suite>,
}

impl Manifests {
    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.iter().find(|image| image.name == name)
    }

    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|workload| workload.name == name)
    }

    pub fn bug(&self, id: &str) -> Option<&BugCase> {
        self.bugs.iter().find(|bug| bug.id == id)
    }

    pub fn suite(&self, name: &str) -> Option<&Suite> {
        self.suites.iter().find(|suite| suite.name == name)
    }
}

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

/// Whether a bigger metric value is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
}

/// A number read from the guest's output.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a metric: a mapping with `name`, `regex`, `unit` and `better`"
)]
pub struct Metric {
    pub name: String,
    /// Matched against each line of guest output; the value is the named
    /// group `value` if there is one, else the only capture group.
    pub regex: String,
    pub unit: String,
    pub better: Better,
}

impl Metric {
    /// The compiled regex. Validated manifests always compile.
    pub fn compile(&self) -> Result<Regex, regex::Error> {
        Regex::new(&self.regex)
    }

    /// The metric's value in `output`: the last match (benchmarks print a
    /// final summary after progress lines), parsed as a number.
    pub fn extract(&self, output: &str) -> Option<f64> {
        let regex = self.compile().ok()?;
        let captures = regex.captures_iter(output).last()?;
        let value = captures.name("value").or_else(|| captures.get(1))?;
        value.as_str().trim().parse().ok()
    }
}

fn one() -> u32 {
    1
}

/// A benchmark run in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a workload: a mapping with `name`, `kernel`, `command`, `vcpus` and `timeout_s`"
)]
pub struct Workload {
    #[schemars(pattern(r"^[a-z0-9][a-z0-9.-]*$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Image of kind `kernel`.
    pub kernel: String,
    /// Image of kind `initramfs`.
    #[serde(default)]
    pub initramfs: Option<String>,
    /// Image of kind `rootfs`.
    #[serde(default)]
    pub rootfs: Option<String>,
    /// Extra images of kind `disk`, attached in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// Guest shell commands run, in order, before `command`; not measured.
    #[serde(default)]
    pub setup: Vec<String>,
    /// The guest shell command that is measured.
    pub command: String,
    #[serde(default)]
    pub metrics: Vec<Metric>,
    /// How many times each configuration runs.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub repetitions: u32,
    /// Run once per vCPU count.
    #[schemars(length(min = 1), inner(range(min = 1)))]
    pub vcpus: Vec<u32>,
    /// Guest memory; the runner's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub memory_mib: Option<u64>,
    /// Limit for one run, boot included.
    #[schemars(range(min = 1))]
    pub timeout_s: u64,
}

/// Where a bug comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BugKind {
    Syzbot,
    Cve,
    Synthetic,
}

/// What makes the bug happen: exactly one of `command` (a guest shell
/// command) or `program` (a C source compiled for the guest, run with `args`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a trigger: a mapping with `command`, or `program` and `args`"
)]
pub struct Trigger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Path from the repository root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// How the failure shows; at least one of the two.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "an expected failure: a mapping with `title`, `console`, `marker` and/or `reaches`"
)]
pub struct Expect {
    /// The crash title as syzkaller's pkg/report normalizes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// A regex over the guest console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// A bug with no crash: the console line (literal text) its trigger
    /// prints when the bug happened; the recording stops there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<String>,
    /// A kernel function the replay must execute (checked by counting the
    /// blocks entered at its address; no debugger needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reaches: Option<String>,
}

/// Limits for each phase of a bug reproduction, in seconds.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "timeouts: a mapping with `boot_s`, `trigger_s` and `replay_s`"
)]
pub struct Timeouts {
    #[schemars(range(min = 1))]
    pub boot_s: u64,
    #[schemars(range(min = 1))]
    pub trigger_s: u64,
    #[schemars(range(min = 1))]
    pub replay_s: u64,
}

/// A kernel bug to reproduce, record and replay.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a bug case: a mapping with `id`, `title`, `kind`, `kernel`, `trigger`, `expect` and `timeouts`"
)]
pub struct BugCase {
    /// Unique across all manifests; `[a-z0-9][a-z0-9.-]*`.
    #[schemars(pattern(r"^[a-z0-9][a-z0-9.-]*$"))]
    pub id: String,
    pub title: String,
    pub kind: BugKind,
    /// Where the bug is described (syzbot report, CVE record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Image of kind `kernel`.
    pub kernel: String,
    /// Patches applied over `kernel`'s sources to reintroduce the bug: the
    /// bug's kernel is `kernel` plus these and `fragments`, compiled in
    /// `kernel`'s build tree.
    #[serde(default)]
    pub patches: Vec<PathBuf>,
    /// Config fragments the bug's path needs, applied after `kernel`'s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fragments: Vec<PathBuf>,
    /// Kernel parameters added to the default command line, e.g.
    /// `kasan.fault=panic panic_on_warn=1` so that the bug ends the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    pub trigger: Trigger,
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub vcpus: u32,
    #[serde(default)]
    pub nondeterministic: bool,
    /// How many times the trigger is tried; more than 1 only when
    /// `nondeterministic`.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub attempts: u32,
    pub expect: Expect,
    pub timeouts: Timeouts,
}

/// What a suite measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SuiteKind {
    /// Recording overhead on workloads.
    RecordPerf,
    /// Record a bug, replay it, confirm the same failure.
    BugRepro,
}

/// How the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// No recording.
    Native,
    /// This project's kernel record/replay.
    Krr,
    /// Classic whole-VM record/replay (QEMU's `-icount rr=record`).
    WholeVmRr,
    /// QEMU without recording (`-accel tcg,thread=single`): the baseline of
    /// the whole-VM peer.
    QemuTcg,
    /// The KRR authors' artifact.
    KrrUpstream,
}

/// Which engine backend executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Tcg,
    Kvm,
    /// KVM when /dev/kvm is usable, else TCG.
    #[default]
    Auto,
}

/// An experiment.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    deny_unknown_fields,
    expecting = "a suite: a mapping with `name`, `kind`, `schemes` and `workloads` or `bugs`"
)]
pub struct Suite {
    #[schemars(pattern(r"^[a-z0-9][a-z0-9.-]*$"))]
    pub name: String,
    pub kind: SuiteKind,
    /// Workload names (`record-perf` only).
    #[serde(default)]
    pub workloads: Vec<String>,
    /// Bug ids (`bug-repro` only).
    #[serde(default)]
    pub bugs: Vec<String>,
    /// What `eval --quick` runs instead: small workloads, on one vCPU,
    /// once (`record-perf`), or bug ids (`bug-repro`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quick: Vec<String>,
    #[schemars(length(min = 1))]
    pub schemes: Vec<Scheme>,
    #[serde(default)]
    pub backend: Backend,
    /// Ratios the report checks the measured medians against.
    #[serde(default)]
    pub targets: Targets,
}

/// Wall-time ratios a `record-perf` report checks (medians of the measured
/// window); each is met when the measured ratio is at most the target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// `krr` over `native`: the cost of recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub krr_vs_native: Option<f64>,
    /// `krr` over `whole-vm-rr`: kernel-only against whole-VM recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub krr_vs_whole_vm_rr: Option<f64>,
}

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
                format!("{}: {}", super::positions::DisplayPath(&p.path), p.message)
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
