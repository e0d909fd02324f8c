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
pub(crate) fn load_file(collector: &mut Collector, loaded: &mut Loaded, path: &Path, report: bool) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            if report {
                collector.report_at(path, 1, 1, format!("cannot read manifest file: {error}"));
            }
            return;
        }
    };
    let document: Value = match serde_norway::from_str(&text) {
        Ok(document) => document,
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
        index: PositionIndex::new(&text),
        report,
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
    let typed = deserialize(collector, file, &base, item);
    Entry {
        file,
        base,
        raw_name,
        raw_kind,
        typed,
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

/// Removes the node at `path` from `value`; false if there is none.
fn remove(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        let next = match seg {
            Seg::Key(key) => node.get_mut(key.as_str()),
            Seg::Index(index) => node.get_mut(*index),
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match (last, node) {
        (Seg::Key(key), Value::Mapping(mapping)) => mapping.remove(key.as_str()).is_some(),
        (Seg::Index(index), Value::Sequence(items)) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

/// serde's wording for a number or boolean where a string is expected does
/// not say how to fix it; YAML users need to be told to quote.
fn explain(message: String) -> String {
    let unquoted = [
        "invalid type: integer",
        "invalid type: floating point",
        "invalid type: boolean",
    ];
    if message.ends_with("expected a string") && unquoted.iter().any(|p| message.starts_with(p)) {
        format!("{message} (quote the value to make it a string)")
    } else {
        message
    }
}

/// Deserializes one item. serde stops at the first error, so after each
/// error the offending field is removed and the item tried again; that finds
/// every unknown field and every bad optional field. An item with errors
/// still returns its typed value when the rest deserializes, so the semantic
/// checks can look at it too (the load fails anyway).
fn deserialize<T: DeserializeOwned>(
    collector: &mut Collector,
    file: usize,
    base: &[Seg],
    item: Value,
) -> Option<T> {
    let mut item = item;
    let mut removed: Option<Vec<Seg>> = None;
    // Each round removes one node, so this bounds the work on a huge item.
    for _ in 0..64 {
        let error = match serde_path_to_error::deserialize::<_, T>(item.clone()) {
            Ok(typed) => return Some(typed),
            Err(error) => error,
        };
        let path = segments(error.path());
        let message = error.inner().to_string();
        // A removed required field now reads as missing: already reported.
        if let Some(removed) = &removed {
            if message.starts_with("missing field") {
                if let Some((Seg::Key(key), parent)) = removed.split_last() {
                    if parent == path.as_slice()
                        && message.starts_with(&format!("missing field `{key}`"))
                    {
                        return None;
                    }
                }
            }
        }
        let target = if message.starts_with("unknown field") {
            Target::Key
        } else {
            Target::Value
        };
        let mut full = base.to_vec();
        full.extend_from_slice(&path);
        collector.report(file, &full, target, explain(message));
        if !remove(&mut item, &path) {
            return None;
        }
        removed = Some(path);
    }
    None
}
