// SPDX-License-Identifier: GPL-2.0-or-later
//! Checks over the typed manifests: names, references between them, value
//! ranges, regexes and the files they point at.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use regex::Regex;

use super::load::{Collector, Entry, Loaded};
use super::positions::{Seg, Target};
use super::{BuildRecipe, Image, ImageKind, ImageSource, Manifests, SuiteKind};

/// Names of images, workloads, bugs and suites: lowercase, digits, dots and
/// dashes, so they are safe in file names and on command lines.
fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'))
}

fn key(name: &str) -> Seg {
    Seg::key(name)
}

struct Checker<'a> {
    root: &'a Path,
    collector: &'a mut Collector,
}

impl Checker<'_> {
    fn report<T>(
        &mut self,
        entry: &Entry<T>,
        rest: &[Seg],
        target: Target,
        message: impl AsRef<str>,
    ) {
        let path = entry.path(rest);
        if entry
            .replaced
            .iter()
            .any(|replaced| path.starts_with(replaced))
        {
            return;
        }
        self.collector.report(entry.file, &path, target, message);
    }

    /// Checks the names of one section: form and uniqueness across files.
    fn names<T>(&mut self, entries: &[Entry<T>], what: &str, name_key: &str) {
        let mut first: HashMap<&str, usize> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let Some(name) = entry.raw_name.as_deref() else {
                continue;
            };
            if !valid_name(name) {
                self.report(
                    entry,
                    &[key(name_key)],
                    Target::Value,
                    format!("{what} {name_key} `{name}` is invalid: expected lowercase letters, digits, `.` and `-`, starting with a letter or digit"),
                );
            }
            match first.get(name) {
                Some(&earlier) if !self.collector.files[entry.file].report => {
                    // The clash is with a context file, which is not
                    // reported on: report it at the validated file's entry.
                    let at = self.position_of(entry, name_key);
                    self.report(
                        &entries[earlier],
                        &[key(name_key)],
                        Target::Value,
                        format!("duplicate {what} {name_key} `{name}`: also defined at {at}"),
                    );
                }
                Some(&earlier) => {
                    let at = self.position_of(&entries[earlier], name_key);
                    self.report(
                        entry,
                        &[key(name_key)],
                        Target::Value,
                        format!("duplicate {what} {name_key} `{name}`: already defined at {at}"),
                    );
                }
                None => {
                    first.insert(name, i);
                }
            }
        }
    }

    fn position_of<T>(&self, entry: &Entry<T>, name_key: &str) -> String {
        let file = &self.collector.files[entry.file];
        let pos = file
            .index
            .locate(&entry.path(&[key(name_key)]), Target::Value);
        format!("{}:{}:{}", file.path.display(), pos.line, pos.column)
    }

    /// A path that must name an existing file: relative to the repository
    /// root in the repository's manifests, relative to the manifest's own
    /// directory (or absolute) in a file outside the repository.
    fn file<T>(&mut self, entry: &Entry<T>, rest: &[Seg], path: &Path, what: &str) {
        let shown = path.display();
        let base = self.collector.files[entry.file].base.clone();
        if path.as_os_str().is_empty() {
            self.report(entry, rest, Target::Value, format!("{what} path is empty"));
            return;
        }
        let (full, relative_to) = match &base {
            Some(dir) => (
                dir.join(path),
                format!("this manifest's directory {}", dir.display()),
            ),
            None if path.is_absolute() => {
                self.report(
                    entry,
                    rest,
                    Target::Value,
                    format!("{what} `{shown}` must be relative to the repository root"),
                );
                return;
            }
            None if path.components().any(|c| c == Component::ParentDir) => {
                self.report(
                    entry,
                    rest,
                    Target::Value,
                    format!("{what} `{shown}` must stay inside the repository (no `..`)"),
                );
                return;
            }
            None => (self.root.join(path), "the repository root".to_owned()),
        };
        if full.is_dir() {
            self.report(
                entry,
                rest,
                Target::Value,
                format!("{what} `{shown}` is a directory: expected a file"),
            );
        } else if !full.is_file() {
            self.report(
                entry,
                rest,
                Target::Value,
                format!("{what} `{shown}` does not exist (paths are relative to {relative_to})"),
            );
        }
    }

    /// `paths` as the builders take them: unchanged from a repository
    /// manifest, made absolute from a file outside the repository.
    fn resolve<T>(&self, entry: &Entry<T>, paths: &mut [PathBuf]) {
        if let Some(dir) = &self.collector.files[entry.file].base {
            for path in paths {
                let full = dir.join(&*path);
                *path = full.canonicalize().unwrap_or(full);
            }
        }
    }

    fn files<T>(&mut self, entry: &Entry<T>, rest: &[Seg], paths: &[PathBuf], what: &str) {
        for (i, path) in paths.iter().enumerate() {
            let mut at = rest.to_vec();
            at.push(Seg::Index(i));
            self.file(entry, &at, path, what);
        }
    }

    fn positive<T>(&mut self, entry: &Entry<T>, rest: &[Seg], value: u64, what: &str) {
        if value == 0 {
            self.report(
                entry,
                rest,
                Target::Value,
                format!("{what} must be at least 1, got 0"),
            );
        }
    }

    /// A regex that must compile; metrics also need one value group.
    fn regex<T>(&mut self, entry: &Entry<T>, rest: &[Seg], pattern: &str, needs_value: bool) {
        match Regex::new(pattern) {
            Err(error) => {
                // regex's message spans several lines to draw a caret; keep
                // the diagnostic on one line.
                let detail = error.to_string();
                let detail = detail
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .trim_start_matches("error: ");
                self.report(
                    entry,
                    rest,
                    Target::Value,
                    format!("invalid regex `{pattern}`: {detail}"),
                );
            }
            Ok(regex) if needs_value => {
                let groups = regex.captures_len() - 1;
                let named = regex.capture_names().flatten().any(|name| name == "value");
                if !named && groups != 1 {
                    self.report(
                        entry,
                        rest,
                        Target::Value,
                        format!("regex `{pattern}` has {groups} capture groups: expected exactly one, or a group named `value`"),
                    );
                }
            }
            Ok(_) => {}
        }
    }
}

/// Image names and kinds as written, including images that failed to load,
/// so that references to them are not also reported as dangling.
struct ImageKinds {
    kinds: HashMap<String, Option<String>>,
}

impl ImageKinds {
    fn new(images: &[Entry<super::ImageSpec>]) -> ImageKinds {
        let mut kinds = HashMap::new();
        for entry in images {
            if let Some(name) = &entry.raw_name {
                kinds
                    .entry(name.clone())
                    .or_insert_with(|| entry.raw_kind.clone());
            }
        }
        ImageKinds { kinds }
    }

    /// Checks that `name` is an image of kind `kind`.
    fn check<T>(
        &self,
        checker: &mut Checker,
        entry: &Entry<T>,
        rest: &[Seg],
        name: &str,
        kind: ImageKind,
    ) {
        match self.kinds.get(name) {
            None => checker.report(
                entry,
                rest,
                Target::Value,
                format!(
                    "image `{name}` is not defined in any manifest (expected an image of kind `{}`)",
                    kind.as_str()
                ),
            ),
            Some(Some(actual)) if actual != kind.as_str() => checker.report(
                entry,
                rest,
                Target::Value,
                format!(
                    "image `{name}` is of kind `{actual}`: expected kind `{}`",
                    kind.as_str()
                ),
            ),
            Some(_) => {}
        }
    }

    /// The images a workload or bug case boots: a kernel, and an initramfs
    /// or a rootfs (at least one) to run in.
    fn check_boot_images<T>(
        &self,
        checker: &mut Checker,
        entry: &Entry<T>,
        kernel: &str,
        initramfs: Option<&str>,
        rootfs: Option<&str>,
        neither: &str,
    ) {
        self.check(checker, entry, &[key("kernel")], kernel, ImageKind::Kernel);
        if let Some(initramfs) = initramfs {
            self.check(
                checker,
                entry,
                &[key("initramfs")],
                initramfs,
                ImageKind::Initramfs,
            );
        }
        if let Some(rootfs) = rootfs {
            self.check(checker, entry, &[key("rootfs")], rootfs, ImageKind::Rootfs);
        }
        if initramfs.is_none() && rootfs.is_none() {
            checker.report(entry, &[], Target::Value, neither);
        }
    }
}

/// Runs every check and returns the manifests built from the items that
/// loaded (complete only when no problem was reported).
pub(crate) fn check(root: &Path, collector: &mut Collector, loaded: &Loaded) -> Manifests {
    let mut checker = Checker { root, collector };
    let mut manifests = Manifests::default();

    checker.names(&loaded.images, "image", "name");
    checker.names(&loaded.workloads, "workload", "name");
    checker.names(&loaded.bugs, "bug", "id");
    checker.names(&loaded.suites, "suite", "name");
    let kinds = ImageKinds::new(&loaded.images);

    for entry in &loaded.images {
        let Some(spec) = &entry.typed else { continue };
        let mut problems = Vec::new();
        let image = spec.convert(&mut problems);
        for problem in problems {
            let target = if problem.at_key {
                Target::Key
            } else {
                Target::Value
            };
            checker.report(entry, &problem.path, target, problem.message);
        }
        if let Some(mut image) = image {
            check_image_files(&mut checker, entry, &image);
            if let ImageSource::Build(recipe) = &mut image.source {
                match recipe {
                    BuildRecipe::Kernel(kernel) => {
                        checker.resolve(entry, &mut kernel.fragments);
                        checker.resolve(entry, &mut kernel.patches);
                    }
                    BuildRecipe::Initramfs(initramfs) => {
                        checker.resolve(entry, &mut initramfs.programs)
                    }
                    BuildRecipe::Rootfs(rootfs) => checker.resolve(entry, &mut rootfs.programs),
                }
            }
            manifests.images.push(image);
        }
    }

    for entry in &loaded.workloads {
        let Some(workload) = &entry.typed else {
            continue;
        };
        kinds.check_boot_images(
            &mut checker,
            entry,
            &workload.kernel,
            workload.initramfs.as_deref(),
            workload.rootfs.as_deref(),
            "workload needs an `initramfs` or a `rootfs` image to run its command in",
        );
        for (i, disk) in workload.disks.iter().enumerate() {
            kinds.check(
                &mut checker,
                entry,
                &[key("disks"), Seg::Index(i)],
                disk,
                ImageKind::Disk,
            );
        }
        if workload.command.trim().is_empty() {
            checker.report(entry, &[key("command")], Target::Value, "command is empty");
        }
        checker.positive(
            entry,
            &[key("repetitions")],
            workload.repetitions.into(),
            "repetitions",
        );
        checker.positive(entry, &[key("timeout_s")], workload.timeout_s, "timeout_s");
        if let Some(memory) = workload.memory_mib {
            checker.positive(entry, &[key("memory_mib")], memory, "memory_mib");
        }
        if workload.vcpus.is_empty() {
            checker.report(
                entry,
                &[key("vcpus")],
                Target::Value,
                "vcpus is empty: expected at least one vCPU count",
            );
        }
        let mut seen = HashSet::new();
        for (i, &vcpus) in workload.vcpus.iter().enumerate() {
            let at = [key("vcpus"), Seg::Index(i)];
            checker.positive(entry, &at, vcpus.into(), "vCPU count");
            if !seen.insert(vcpus) {
                checker.report(
                    entry,
                    &at,
                    Target::Value,
                    format!("vCPU count {vcpus} is listed twice"),
                );
            }
        }
        let mut metric_names = HashSet::new();
        for (i, metric) in workload.metrics.iter().enumerate() {
            let at = [key("metrics"), Seg::Index(i)];
            if !metric_names.insert(metric.name.as_str()) {
                checker.report(
                    entry,
                    &[key("metrics"), Seg::Index(i), key("name")],
                    Target::Value,
                    format!("duplicate metric name `{}` in this workload", metric.name),
                );
            }
            if metric.name.is_empty() {
                checker.report(entry, &at, Target::Value, "metric name is empty");
            }
            checker.regex(
                entry,
                &[key("metrics"), Seg::Index(i), key("regex")],
                &metric.regex,
                true,
            );
        }
        manifests.workloads.push(workload.clone());
    }

    for entry in &loaded.bugs {
        let Some(bug) = &entry.typed else { continue };
        kinds.check_boot_images(
            &mut checker,
            entry,
            &bug.kernel,
            bug.initramfs.as_deref(),
            bug.rootfs.as_deref(),
            "bug case needs an `initramfs` or a `rootfs` image to run its trigger in",
        );
        checker.files(entry, &[key("patches")], &bug.patches, "patch");
        checker.files(
            entry,
            &[key("fragments")],
            &bug.fragments,
            "config fragment",
        );
        if let Some(cmdline) = &bug.cmdline {
            if cmdline.contains('"') {
                checker.report(
                    entry,
                    &[key("cmdline")],
                    Target::Value,
                    "cmdline may not contain double quotes (the run's command is quoted on the same line)",
                );
            }
        }
        match (&bug.trigger.command, &bug.trigger.program) {
            (Some(_), Some(_)) => checker.report(
                entry,
                &[key("trigger"), key("program")],
                Target::Key,
                "trigger has both `command` and `program`: expected exactly one",
            ),
            (None, None) => checker.report(
                entry,
                &[key("trigger")],
                Target::Value,
                "trigger has neither `command` nor `program`: expected exactly one",
            ),
            (Some(command), None) => {
                if command.trim().is_empty() {
                    checker.report(
                        entry,
                        &[key("trigger"), key("command")],
                        Target::Value,
                        "trigger command is empty",
                    );
                }
                if !bug.trigger.args.is_empty() {
                    checker.report(
                        entry,
                        &[key("trigger"), key("args")],
                        Target::Key,
                        "`args` only applies to a trigger `program`; put arguments in the `command`",
                    );
                }
            }
            (None, Some(program)) => {
                checker.file(
                    entry,
                    &[key("trigger"), key("program")],
                    program,
                    "trigger program",
                );
            }
        }
        checker.positive(entry, &[key("vcpus")], bug.vcpus.into(), "vcpus");
        checker.positive(entry, &[key("attempts")], bug.attempts.into(), "attempts");
        if bug.attempts > 1 && !bug.nondeterministic {
            checker.report(
                entry,
                &[key("attempts")],
                Target::Value,
                format!(
                    "attempts is {} but the bug is not `nondeterministic`: a deterministic bug fails on the first attempt (set `nondeterministic: true` or `attempts: 1`)",
                    bug.attempts
                ),
            );
        }
        match (&bug.expect.title, &bug.expect.console) {
            (None, None) if bug.expect.marker.is_none() => checker.report(
                entry,
                &[key("expect")],
                Target::Value,
                "expect needs a crash `title`, a `console` regex, or (a bug with no crash) a `marker`",
            ),
            (title, console) => {
                if title
                    .as_deref()
                    .is_some_and(|title| title.trim().is_empty())
                {
                    checker.report(
                        entry,
                        &[key("expect"), key("title")],
                        Target::Value,
                        "expected crash title is empty",
                    );
                }
                if let Some(console) = console {
                    checker.regex(entry, &[key("expect"), key("console")], console, false);
                }
            }
        }
        if bug.expect.without_panic && bug.expect.marker.is_some() {
            checker.report(
                entry,
                &[key("expect"), key("without_panic")],
                Target::Key,
                "`without_panic` ends the recording at a report and `marker` at a line of a bug with no report: expected one of them",
            );
        }
        let timeouts = &bug.timeouts;
        for (name, value) in [
            ("boot_s", timeouts.boot_s),
            ("trigger_s", timeouts.trigger_s),
            ("replay_s", timeouts.replay_s),
        ] {
            checker.positive(
                entry,
                &[key("timeouts"), key(name)],
                value,
                &format!("timeouts.{name}"),
            );
        }
        let mut bug = bug.clone();
        checker.resolve(entry, &mut bug.patches);
        checker.resolve(entry, &mut bug.fragments);
        if let Some(program) = &mut bug.trigger.program {
            checker.resolve(entry, std::slice::from_mut(program));
        }
        manifests.bugs.push(bug);
    }

    let workloads: HashSet<&str> = loaded
        .workloads
        .iter()
        .filter_map(|e| e.raw_name.as_deref())
        .collect();
    let bugs: HashSet<&str> = loaded
        .bugs
        .iter()
        .filter_map(|e| e.raw_name.as_deref())
        .collect();
    for entry in &loaded.suites {
        let Some(suite) = &entry.typed else { continue };
        let (wanted, unwanted, names, kind) = match suite.kind {
            SuiteKind::RecordPerf => ("workloads", "bugs", &suite.workloads, "record-perf"),
            SuiteKind::BugRepro => ("bugs", "workloads", &suite.bugs, "bug-repro"),
        };
        if names.is_empty() {
            checker.report(
                entry,
                &[key(wanted)],
                Target::Value,
                format!("a `{kind}` suite needs at least one entry in `{wanted}`"),
            );
        }
        let other = if wanted == "workloads" {
            &suite.bugs
        } else {
            &suite.workloads
        };
        if !other.is_empty() {
            checker.report(
                entry,
                &[key(unwanted)],
                Target::Key,
                format!("a `{kind}` suite runs {wanted}, not {unwanted}: remove `{unwanted}`"),
            );
        }
        for (i, name) in suite.workloads.iter().enumerate() {
            if !workloads.contains(name.as_str()) {
                checker.report(
                    entry,
                    &[key("workloads"), Seg::Index(i)],
                    Target::Value,
                    format!("workload `{name}` is not defined in any manifest"),
                );
            }
        }
        for (i, name) in suite.quick.iter().enumerate() {
            let (known, what) = match suite.kind {
                SuiteKind::RecordPerf => (workloads.contains(name.as_str()), "workload"),
                SuiteKind::BugRepro => (bugs.contains(name.as_str()), "bug"),
            };
            if !known {
                checker.report(
                    entry,
                    &[key("quick"), Seg::Index(i)],
                    Target::Value,
                    format!("{what} `{name}` is not defined in any manifest"),
                );
            }
        }
        for (i, id) in suite.bugs.iter().enumerate() {
            if !bugs.contains(id.as_str()) {
                checker.report(
                    entry,
                    &[key("bugs"), Seg::Index(i)],
                    Target::Value,
                    format!("bug `{id}` is not defined in any manifest"),
                );
            }
        }
        if suite.schemes.is_empty() {
            checker.report(
                entry,
                &[key("schemes")],
                Target::Value,
                "schemes is empty: expected at least one scheme",
            );
        }
        let mut seen = HashSet::new();
        for (i, scheme) in suite.schemes.iter().enumerate() {
            if !seen.insert(scheme) {
                checker.report(
                    entry,
                    &[key("schemes"), Seg::Index(i)],
                    Target::Value,
                    format!(
                        "scheme `{}` is listed twice",
                        serde_norway::to_string(scheme).unwrap_or_default().trim()
                    ),
                );
            }
        }
        manifests.suites.push(suite.clone());
    }
    manifests
}

fn check_image_files(checker: &mut Checker, entry: &Entry<super::ImageSpec>, image: &Image) {
    let ImageSource::Build(recipe) = &image.source else {
        return;
    };
    match recipe {
        BuildRecipe::Kernel(kernel) => {
            checker.files(
                entry,
                &[key("build"), key("fragments")],
                &kernel.fragments,
                "config fragment",
            );
            checker.files(
                entry,
                &[key("build"), key("patches")],
                &kernel.patches,
                "patch",
            );
        }
        BuildRecipe::Initramfs(initramfs) => {
            checker.files(
                entry,
                &[key("build"), key("programs")],
                &initramfs.programs,
                "guest program source",
            );
        }
        BuildRecipe::Rootfs(rootfs) => {
            checker.files(
                entry,
                &[key("build"), key("programs")],
                &rootfs.programs,
                "guest program source",
            );
            checker.positive(
                entry,
                &[key("build"), key("size_mib")],
                rootfs.size_mib,
                "size_mib",
            );
            if rootfs.suite.trim().is_empty() {
                checker.report(
                    entry,
                    &[key("build"), key("suite")],
                    Target::Value,
                    "Debian suite is empty",
                );
            }
        }
    }
}
