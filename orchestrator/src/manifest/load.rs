// SPDX-License-Identifier: GPL-2.0-or-later
//! Reading manifest files: YAML syntax, the top-level layout, and each list
//! item deserialized on its own so that one bad item does not hide the rest.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_norway::Value;

use super::positions::{DisplayPath, PositionIndex, Seg, Target};
use super::Diagnostic;

/// The top-level keys a manifest file may have, in the order they are read.
pub(crate) const SECTIONS: [&str; 4] = ["images", "workloads", "bugs", "suites"];

/// One manifest file that was read.
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub index: PositionIndex,
    /// Problems are reported for this file (false for files only loaded so
    /// that references resolve).
    pub report: bool,
    /// Where the relative paths in this file start: `None` for the
    /// repository's own files (the repository root), the file's own
    /// directory for a user's (given as extra manifests, or lying outside
    /// the repository), kept with its files.
    pub base: Option<PathBuf>,
}

/// The directory relative paths in the manifest at `path` start from when
/// it lies outside the repository at `root` (see [`SourceFile::base`]);
/// `--manifests` files start from their own directory wherever they are.
pub(crate) fn outside_base(root: &Path, path: &Path) -> Option<PathBuf> {
    let file = path.canonicalize().ok()?;
    let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    if file.starts_with(&root) {
        return None;
    }
    file.parent().map(Path::to_path_buf)
}

/// One list item of a section, deserialized if it could be.
pub(crate) struct Entry<T> {
    pub file: usize,
    /// `[section, index]`: the item's path in its file.
    pub base: Vec<Seg>,
    /// `name` (or `id`) as written, even if the item failed to deserialize,
    /// so that references to it are not reported as dangling too.
    pub raw_name: Option<String>,
    /// `kind` as written.
    pub raw_kind: Option<String>,
    pub typed: Option<T>,
    /// Full paths of bad or missing fields that were given a placeholder
    /// value so the rest of the item could be checked; problems under them
    /// are not reported again.
    pub replaced: Vec<Vec<Seg>>,
}

impl<T> Entry<T> {
    pub fn path(&self, rest: &[Seg]) -> Vec<Seg> {
        let mut path = self.base.clone();
        path.extend_from_slice(rest);
        path
    }
}

/// Collects diagnostics, resolving paths to positions.
#[derive(Default)]
pub(crate) struct Collector {
    pub files: Vec<SourceFile>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Collector {
    /// Reports `message` about the node at `path` in file `file`, prefixed
    /// with the path so the reader knows which field is meant.
    pub fn report(&mut self, file: usize, path: &[Seg], target: Target, message: impl AsRef<str>) {
        let source = &self.files[file];
        if !source.report {
            return;
        }
        let pos = source.index.locate(path, target);
        let message = if path.is_empty() {
            message.as_ref().to_owned()
        } else {
            format!("{}: {}", DisplayPath(path), message.as_ref())
        };
        self.diagnostics.push(Diagnostic {
            file: source.path.clone(),
            line: pos.line,
            column: pos.column,
            message,
        });
    }

    /// Reports a problem at a known position (syntax errors, unreadable files).
    fn report_at(&mut self, path: &Path, line: usize, column: usize, message: String) {
        self.diagnostics.push(Diagnostic {
            file: path.to_owned(),
            line,
            column,
            message,
        });
    }
}

/// Every item of every file, grouped by section.
#[derive(Default)]
pub(crate) struct Loaded {
    pub images: Vec<Entry<super::ImageSpec>>,
    pub workloads: Vec<Entry<super::Workload>>,
    pub bugs: Vec<Entry<super::BugCase>>,
    pub suites: Vec<Entry<super::Suite>>,
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A syntax error's message without the " at line L column C" serde_norway
/// appends: the diagnostic already carries the position.
fn syntax_message(error: &serde_norway::Error) -> String {
    let mut message = error.to_string();
    if let Some(location) = error.location() {
        let suffix = format!(" at line {} column {}", location.line(), location.column());
        message = message.replacen(&suffix, "", 1);
    }
    message
}

/// Reads `path` and adds its items to `loaded`.
pub(crate) fn load_file(
    collector: &mut Collector,
    loaded: &mut Loaded,
    base: Option<PathBuf>,
    path: &Path,
    report: bool,
) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            if report {
                collector.report_at(path, 1, 1, format!("cannot read manifest file: {error}"));
            }
            return;
        }
    };
    let index = PositionIndex::new(&text);
    let parsed = serde_norway::from_str(&text).and_then(|mut document: Value| {
        document.apply_merge()?;
        Ok(document)
    });
    let document = match parsed {
        Ok(document) => document,
        Err(error)
            if report
                && error.to_string().contains("duplicate entry")
                && !index.duplicates().is_empty() =>
        {
            // serde_norway names only the first duplicate key and places it
            // at its mapping; the index has every one, at the repeated key.
            for duplicate in index.duplicates() {
                collector.report_at(
                    path,
                    duplicate.again.line,
                    duplicate.again.column,
                    format!(
                        "invalid YAML: duplicate key `{}` (first given at line {} column {})",
                        duplicate.key, duplicate.first.line, duplicate.first.column
                    ),
                );
            }
            tracing::debug!("{}: {error}", path.display());
            return;
        }
        Err(error) => {
            if report {
                let (line, column) = error
                    .location()
                    .map_or((1, 1), |location| (location.line(), location.column()));
                collector.report_at(
                    path,
                    line,
                    column,
                    format!("invalid YAML: {}", syntax_message(&error)),
                );
            }
            return;
        }
    };
    let file = collector.files.len();
    collector.files.push(SourceFile {
        path: path.to_owned(),
        index,
        report,
        base,
    });
    let mapping = match document {
        // An empty file declares nothing.
        Value::Null => return,
        Value::Mapping(mapping) => mapping,
        other => {
            collector.report(
                file,
                &[],
                Target::Value,
                format!(
                    "a manifest file must be a mapping with any of the keys `{}`, found {}",
                    SECTIONS.join("`, `"),
                    describe(&other)
                ),
            );
            return;
        }
    };
    for (key, value) in mapping {
        let Some(section) = key
            .as_str()
            .and_then(|key| SECTIONS.iter().find(|s| **s == key))
        else {
            let shown = match &key {
                Value::String(key) => key.clone(),
                other => serde_norway::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            };
            collector.report(
                file,
                &[Seg::Key(shown.clone())],
                Target::Key,
                format!(
                    "unknown top-level key `{shown}`: expected one of `{}`",
                    SECTIONS.join("`, `")
                ),
            );
            continue;
        };
        let items = match value {
            Value::Null => continue,
            Value::Sequence(items) => items,
            other => {
                collector.report(
                    file,
                    &[Seg::key(section)],
                    Target::Value,
                    format!("expected a list of {section}, found {}", describe(&other)),
                );
                continue;
            }
        };
        for (index, item) in items.into_iter().enumerate() {
            let base = vec![Seg::key(section), Seg::Index(index)];
            match *section {
                "images" => loaded
                    .images
                    .push(entry(collector, file, base, item, "name")),
                "workloads" => loaded
                    .workloads
                    .push(entry(collector, file, base, item, "name")),
                "bugs" => loaded.bugs.push(entry(collector, file, base, item, "id")),
                _ => loaded
                    .suites
                    .push(entry(collector, file, base, item, "name")),
            }
        }
    }
}

fn entry<T: DeserializeOwned>(
    collector: &mut Collector,
    file: usize,
    base: Vec<Seg>,
    item: Value,
    name_key: &str,
) -> Entry<T> {
    let raw_string = |key: &str| item.get(key).and_then(Value::as_str).map(str::to_owned);
    let raw_name = raw_string(name_key);
    let raw_kind = raw_string("kind");
    let (typed, replaced) = deserialize(collector, file, &base, item);
    Entry {
        file,
        base,
        raw_name,
        raw_kind,
        typed,
        replaced,
    }
}

fn segments(path: &serde_path_to_error::Path) -> Vec<Seg> {
    path.iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {
                None
            }
        })
        .collect()
}

/// The node at `path` in `value`.
fn node_mut<'v>(value: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    let mut node = value;
    for seg in path {
        node = match seg {
            Seg::Key(key) => node.get_mut(key.as_str())?,
            Seg::Index(index) => node.get_mut(*index)?,
        };
    }
    Some(node)
}

/// Removes the node at `path` from `value`; false if there is none.
fn remove(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    match (last, node_mut(value, parents)) {
        (Seg::Key(key), Some(Value::Mapping(mapping))) => mapping.remove(key.as_str()).is_some(),
        (Seg::Index(index), Some(Value::Sequence(items))) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

/// Sets the node at `path` (creating a missing last key); false if its
/// parent does not exist.
fn set(value: &mut Value, path: &[Seg], new: Value) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    match (last, node_mut(value, parents)) {
        (Seg::Key(key), Some(Value::Mapping(mapping))) => {
            mapping.insert(Value::String(key.clone()), new);
            true
        }
        (Seg::Index(index), Some(Value::Sequence(items))) if *index < items.len() => {
            items[*index] = new;
            true
        }
        _ => false,
    }
}

/// The first back-quoted word after "expected" in a serde message: the
/// first valid variant of an enum ("unknown variant `x`, expected one of
/// `a`, `b`").
fn expected_variant(message: &str) -> Option<String> {
    let rest = &message[message.find("expected")?..];
    let start = rest.find('`')? + 1;
    let end = start + rest[start..].find('`')?;
    Some(rest[start..end].to_owned())
}

/// Values tried in place of a bad or missing field so that the rest of the
/// item can still be checked: a valid variant when serde names one, else
/// one value of each YAML type.
fn placeholders(message: &str) -> Vec<Value> {
    let mut values: Vec<Value> = expected_variant(message)
        .map(Value::String)
        .into_iter()
        .collect();
    values.extend([
        Value::Number(1.into()),
        Value::String(String::new()),
        Value::Bool(false),
        Value::Sequence(Vec::new()),
        Value::Mapping(Default::default()),
    ]);
    values
}

/// serde's wording names Rust types and does not say how to fix a YAML
/// value; these rewrites say it in the manifest's terms.
fn explain(message: String) -> String {
    let unquoted = [
        "invalid type: integer",
        "invalid type: floating point",
        "invalid type: boolean",
    ];
    if message.ends_with("expected a string") && unquoted.iter().any(|p| message.starts_with(p)) {
        return format!("{message} (quote the value to make it a string)");
    }
    for unsigned in ["expected u64", "expected u32"] {
        if let Some(start) = message.strip_suffix(unsigned) {
            return format!("{start}expected a whole number, 0 or more");
        }
    }
    message
}

/// Deserializes one item, reporting every problem in it. serde stops at the
/// first error, so after each one the item is repaired and tried again: an
/// unknown field is removed; a bad or missing field is replaced by a
/// placeholder of a type that fits. Paths given a placeholder are returned
/// so later checks do not report on the placeholder. An item with errors
/// still returns its typed value, so the semantic checks see the rest of it
/// (the load fails anyway).
fn deserialize<T: DeserializeOwned>(
    collector: &mut Collector,
    file: usize,
    base: &[Seg],
    item: Value,
) -> (Option<T>, Vec<Vec<Seg>>) {
    let mut item = item;
    let mut replaced: Vec<Vec<Seg>> = Vec::new();
    // The path being given placeholders and the ones still to try.
    let mut repairing: Option<(Vec<Seg>, Vec<Value>)> = None;
    // Each round fixes one node or tries one placeholder; this bounds the
    // work on a huge or pathological item.
    for _ in 0..256 {
        let error = match serde_path_to_error::deserialize::<_, T>(item.clone()) {
            Ok(typed) => return (Some(typed), replaced),
            Err(error) => error,
        };
        let mut path = segments(error.path());
        let message = error.inner().to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned);
        let mut field_path = path.clone();
        if let Some(field) = &missing {
            field_path.push(Seg::Key(field.clone()));
        }
        // Still failing at the node being repaired: try its next placeholder.
        if let Some((at, candidates)) = &mut repairing {
            if *at == field_path {
                let Some(candidate) = candidates.pop() else {
                    return (None, replaced);
                };
                if set(&mut item, &field_path, candidate) {
                    continue;
                }
                return (None, replaced);
            }
        }
        let mut full = base.to_vec();
        full.extend_from_slice(&path);
        // Problems inside a placeholder (a `{}` standing in for a bad value
        // lacks the fields it needs) are consequences of the problem
        // already reported.
        let consequence = replaced.iter().any(|at| full.starts_with(at));
        if message.starts_with("unknown field") {
            if !consequence {
                collector.report(file, &full, Target::Key, explain(message));
            }
            if !remove(&mut item, &path) {
                return (None, replaced);
            }
            repairing = None;
            continue;
        }
        if !consequence {
            collector.report(file, &full, Target::Value, explain(message.clone()));
        }
        if missing.is_some() {
            path = field_path;
        } else if path.is_empty() {
            // The item itself has the wrong type: nothing to repair.
            return (None, replaced);
        }
        let mut candidates = placeholders(&message);
        candidates.reverse();
        let first = candidates.pop().expect("placeholders are never empty");
        if !set(&mut item, &path, first) {
            return (None, replaced);
        }
        let mut full = base.to_vec();
        full.extend_from_slice(&path);
        replaced.push(full);
        repairing = Some((path, candidates));
    }
    (None, replaced)
}
