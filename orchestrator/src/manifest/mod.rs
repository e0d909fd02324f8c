// SPDX-License-Identifier: GPL-2.0-or-later
//! Typed YAML manifests and their validation.
//!
//! A manifest file is a mapping with any of the keys `images`, `workloads`,
//! `bugs` and `suites`, each a list (see [`Manifests`]). [`load_dir`] reads
//! every `*.yaml`/`*.yml` under a directory, [`load_files`] reads chosen
//! files. Both validate everything before anything runs and report every
//! problem at once, each with its file, line and column: YAML syntax,
//! unknown fields, missing or duplicate names, dangling references, malformed
//! SHA-256 digests, invalid regexes, impossible values, and referenced files
//! (patches, config fragments, guest programs) that do not exist. Those
//! paths are relative to the repository root in the repository's own
//! manifests, and relative to the manifest's directory in a file outside the
//! repository (returned as absolute paths).

mod check;
mod load;
mod model;
mod positions;

use std::fmt;
use std::path::{Path, PathBuf};

pub use model::{
    Backend, Better, BugCase, BugKind, BuildRecipe, BuildSpec, DebianPackage, Expect, Fetch,
    FileSource, FileSpec, Image, ImageKind, ImageSource, ImageSpec, InitramfsRecipe, KernelRecipe,
    Manifests, Metric, RecipeName, RootfsRecipe, Scheme, Suite, SuiteKind, Targets, Timeouts,
    Trigger, UnpackFormat, Workload,
};

/// One problem in a manifest file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found, sorted by file and position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Every `*.yaml`/`*.yml` file under `dir`, recursively, in a stable order.
/// Hidden files and directories are skipped (editor and VCS droppings).
fn manifest_files(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries = std::fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            manifest_files(&path, files)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
    Ok(())
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, Diagnostics> {
    let mut files = Vec::new();
    manifest_files(dir, &mut files).map_err(|error| {
        Diagnostics(vec![Diagnostic {
            file: dir.to_owned(),
            line: 1,
            column: 1,
            message: format!("cannot read manifest directory: {error}"),
        }])
    })?;
    Ok(files)
}

/// Loads `files` (reported) and `context` (only there so references
/// resolve), then validates.
fn load(root: &Path, files: &[PathBuf], context: &[PathBuf]) -> Result<Manifests, Diagnostics> {
    let files: Vec<(PathBuf, Option<PathBuf>)> = files
        .iter()
        .map(|f| (f.clone(), load::outside_base(root, f)))
        .collect();
    load_based(root, &files, context)
}

/// [`load`] with each reported file's base given (see
/// [`load::SourceFile::base`]).
fn load_based(
    root: &Path,
    files: &[(PathBuf, Option<PathBuf>)],
    context: &[PathBuf],
) -> Result<Manifests, Diagnostics> {
    let mut collector = load::Collector::default();
    let mut loaded = load::Loaded::default();
    for (file, base) in files {
        load::load_file(&mut collector, &mut loaded, base.clone(), file, true);
    }
    // Validated files come first so a duplicate name is reported in them
    // rather than in the context that is not reported on.
    let first_context_file = collector.files.len();
    for file in context {
        let base = load::outside_base(root, file);
        load::load_file(&mut collector, &mut loaded, base, file, false);
    }
    let mut manifests = check::check(root, &mut collector, &loaded);
    let mut diagnostics = collector.diagnostics;
    if !diagnostics.is_empty() {
        diagnostics.sort();
        diagnostics.dedup();
        return Err(Diagnostics(diagnostics));
    }
    if first_context_file < collector.files.len() {
        // Only what the given files declare is returned.
        fn given<T>(entries: &[load::Entry<T>], first_context_file: usize, name: &str) -> bool {
            entries.iter().any(|entry| {
                entry.file < first_context_file && entry.raw_name.as_deref() == Some(name)
            })
        }
        manifests
            .images
            .retain(|image| given(&loaded.images, first_context_file, &image.name));
        manifests
            .workloads
            .retain(|workload| given(&loaded.workloads, first_context_file, &workload.name));
        manifests
            .bugs
            .retain(|bug| given(&loaded.bugs, first_context_file, &bug.id));
        manifests
            .suites
            .retain(|suite| given(&loaded.suites, first_context_file, &suite.name));
    }
    Ok(manifests)
}

/// Loads and validates every manifest under `dir`. Paths inside manifests
/// (patches, fragments, programs) are relative to `root`, the repository
/// root, in files inside it, and to the file's own directory in files
/// outside it (returned made absolute).
pub fn load_dir(root: &Path, dir: &Path) -> Result<Manifests, Diagnostics> {
    let files = list_dir(dir)?;
    load(root, &files, &[])
}

/// Loads and validates every manifest under `dir` together with `extra`
/// manifest files or directories (a user's own), whose paths are relative
/// to their own file wherever it lies. Everything is reported and
/// returned.
pub fn load_dir_with(root: &Path, dir: &Path, extra: &[PathBuf]) -> Result<Manifests, Diagnostics> {
    let repository = list_dir(dir)?;
    let mut seen: Vec<PathBuf> = repository
        .iter()
        .filter_map(|f| f.canonicalize().ok())
        .collect();
    let mut files: Vec<(PathBuf, Option<PathBuf>)> = repository
        .into_iter()
        .map(|f| {
            let base = load::outside_base(root, &f);
            (f, base)
        })
        .collect();
    for path in extra {
        let listed = if path.is_dir() {
            list_dir(path)?
        } else {
            vec![path.clone()]
        };
        for file in listed {
            // A missing file is read (and reported) like any other.
            // Its own directory, even inside the repository (the example
            // under docs/ works where it is).
            let base = match file.canonicalize() {
                Ok(canonical) if seen.contains(&canonical) => continue,
                Ok(canonical) => {
                    seen.push(canonical.clone());
                    canonical.parent().map(Path::to_path_buf)
                }
                Err(_) => None,
            };
            files.push((file, base));
        }
    }
    load_based(root, &files, &[])
}

/// Loads and validates `files`. References may resolve against the
/// manifests under `context_dir` (a given file found there too is read only
/// once); problems are reported only for `files`, and only their items are
/// returned.
pub fn load_files(
    root: &Path,
    files: &[PathBuf],
    context_dir: Option<&Path>,
) -> Result<Manifests, Diagnostics> {
    let context = match context_dir {
        Some(dir) => {
            let given: Vec<PathBuf> = files
                .iter()
                .filter_map(|file| file.canonicalize().ok())
                .collect();
            list_dir(dir)?
                .into_iter()
                .filter(|file| {
                    file.canonicalize()
                        .map_or(true, |file| !given.contains(&file))
                })
                .collect()
        }
        None => Vec::new(),
    };
    load(root, files, &context)
}

/// The JSON schema of one manifest file, for editors.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(Manifests);
    serde_json::to_value(schema).expect("a JSON schema serializes to JSON")
}

/// Writes [`json_schema`] to `path`, pretty-printed (the repository keeps it
/// at `manifests/manifest.schema.json`, which the manifests name in their
/// `yaml-language-server` modeline).
pub fn write_json_schema(path: &Path) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(&json_schema()).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(path, text)
}
