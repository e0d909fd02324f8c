// SPDX-License-Identifier: GPL-2.0-or-later
//! Manifest validation: every class of problem is reported with its message
//! and exact `line:column`, all problems of a load at once; valid manifests
//! load into the typed model; the repository's own manifests validate.
//!
//! Fixtures live in `tests/data/manifests/`, one broken file per class of
//! problem plus `multi-error.yaml` with one of each.

use std::path::{Path, PathBuf};

use krr_orchestrator::manifest::{
    self, Backend, Better, BuildRecipe, Diagnostic, Diagnostics, Fetch, Image, ImageKind,
    ImageSource, Manifests, Scheme, SuiteKind, UnpackFormat,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/manifests")
        .join(name)
}

/// Diagnostics of loading the given fixture files, as `name:line:col: message`
/// with `name` the fixture's file name.
fn problems(names: &[&str]) -> Vec<String> {
    let files: Vec<PathBuf> = names.iter().map(|name| fixture(name)).collect();
    let diagnostics =
        manifest::load_files(&repo_root(), &files, None).expect_err("fixture must not validate");
    render(diagnostics)
}

fn render(diagnostics: Diagnostics) -> Vec<String> {
    diagnostics
        .0
        .into_iter()
        .map(|d| {
            let name = d
                .file
                .strip_prefix(fixture(""))
                .unwrap_or(&d.file)
                .display()
                .to_string();
            format!("{name}:{}:{}: {}", d.line, d.column, d.message)
        })
        .collect()
}

fn assert_problems(actual: Vec<String>, expected: &[&str]) {
    let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    assert_eq!(actual, expected, "\nactual:\n{}\n", actual.join("\n"));
}

fn load_valid(name: &str) -> Manifests {
    manifest::load_files(&repo_root(), &[fixture(name)], None).unwrap_or_else(|d| panic!("{d}"))
}

#[test]
fn yaml_syntax_errors_are_reported_at_their_position() {
    assert_problems(
        problems(&["syntax.yaml"]),
        &["syntax.yaml:6:1: invalid YAML: found unexpected end of stream, while scanning a quoted scalar at line 4 column 10"],
    );
    assert_problems(
        problems(&["syntax-indent.yaml"]),
        &["syntax-indent.yaml:4:4: invalid YAML: did not find expected '-' indicator, while parsing a block collection at line 2 column 3"],
    );
}

#[test]
fn every_unknown_field_is_reported_at_its_key() {
    assert_problems(
        problems(&["unknown-field.yaml"]),
        &[
            "unknown-field.yaml:6:5: images[0].checksum: unknown field `checksum`, expected one of `name`, `kind`, `description`, `url`, `sha256`, `unpack`, `debian`, `build`, `path`, `vmlinux`",
            "unknown-field.yaml:7:5: images[0].colour: unknown field `colour`, expected one of `name`, `kind`, `description`, `url`, `sha256`, `unpack`, `debian`, `build`, `path`, `vmlinux`",
            "unknown-field.yaml:12:130: images[1].build.busybox.arch: unknown field `arch`, expected one of `package`, `version`, `sha256`",
            "unknown-field.yaml:19:62: workloads[0].metrics[0].scale: unknown field `scale`, expected one of `name`, `regex`, `unit`, `better`",
            "unknown-field.yaml:22:1: extras: unknown top-level key `extras`: expected one of `images`, `workloads`, `bugs`, `suites`",
        ],
    );
}

#[test]
fn missing_fields_are_reported_at_their_mapping() {
    assert_problems(
        problems(&["missing-field.yaml"]),
        &[
            "missing-field.yaml:2:5: images[0]: missing field `name`",
            "missing-field.yaml:6:5: workloads[0]: missing field `command`",
            // The image without a name defines nothing, so `k` dangles; `i`
            // was never declared.
            "missing-field.yaml:7:13: workloads[0].kernel: image `k` is not defined in any manifest (expected an image of kind `kernel`)",
            "missing-field.yaml:8:16: workloads[0].initramfs: image `i` is not defined in any manifest (expected an image of kind `initramfs`)",
        ],
    );
}

#[test]
fn duplicate_and_malformed_names_are_reported() {
    let first = fixture("duplicate-name.yaml");
    assert_problems(
        problems(&["duplicate-name.yaml"]),
        &[
            &format!(
                "duplicate-name.yaml:6:11: images[1].name: duplicate image name `k`: already defined at {}:2:11",
                first.display()
            ),
            "duplicate-name.yaml:10:11: images[2].name: image name `Bad_Name` is invalid: expected lowercase letters, digits, `.` and `-`, starting with a letter or digit",
        ],
    );
}

#[test]
fn duplicate_names_across_files_of_a_directory_are_reported() {
    let dir = fixture("dup-dir");
    let diagnostics =
        manifest::load_dir(&repo_root(), &dir).expect_err("duplicate must be reported");
    assert_problems(
        render(diagnostics),
        &[&format!(
            "dup-dir/sub/b.yml:2:11: images[0].name: duplicate image name `shared`: already defined at {}:2:11",
            dir.join("a.yaml").display()
        )],
    );
}

#[test]
fn dangling_references_and_wrong_image_kinds_are_reported() {
    assert_problems(
        problems(&["dangling-ref.yaml"]),
        &[
            "dangling-ref.yaml:12:13: workloads[0].kernel: image `no-such-kernel` is not defined in any manifest (expected an image of kind `kernel`)",
            "dangling-ref.yaml:13:16: workloads[0].initramfs: image `k` is of kind `kernel`: expected kind `initramfs`",
            "dangling-ref.yaml:14:13: workloads[0].rootfs: image `d` is of kind `disk`: expected kind `rootfs`",
            "dangling-ref.yaml:15:16: workloads[0].disks[1]: image `gone` is not defined in any manifest (expected an image of kind `disk`)",
            "dangling-ref.yaml:23:13: bugs[0].kernel: image `d` is of kind `disk`: expected kind `kernel`",
            "dangling-ref.yaml:24:16: bugs[0].initramfs: image `missing-initramfs` is not defined in any manifest (expected an image of kind `initramfs`)",
            "dangling-ref.yaml:31:20: suites[0].workloads[1]: workload `nope` is not defined in any manifest",
            "dangling-ref.yaml:32:5: suites[0].bugs: a `record-perf` suite runs workloads, not bugs: remove `bugs`",
            "dangling-ref.yaml:36:12: suites[1].bugs[0]: bug `missing-bug` is not defined in any manifest",
            "dangling-ref.yaml:37:20: suites[1].schemes[1]: scheme `krr` is listed twice",
        ],
    );
}

#[test]
fn malformed_sha256_digests_are_reported() {
    assert_problems(
        problems(&["bad-sha256.yaml"]),
        &[
            "bad-sha256.yaml:5:13: images[0].sha256: sha256 `abc123` is malformed: expected 64 hexadecimal digits, got 6 characters",
            "bad-sha256.yaml:9:13: images[1].sha256: sha256 `ae95fe63d4c553f8d0e6c86cb1ab566f3894a43743eb19ab585cd97d82f2651g` is malformed: expected 64 hexadecimal digits, got 64 characters",
            "bad-sha256.yaml:14:64: images[2].build.busybox.sha256: sha256 `3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb10874400` is malformed: expected 64 hexadecimal digits, got 66 characters",
            // images[3] has an uppercase digest: valid.
        ],
    );
}

#[test]
fn invalid_regexes_and_wrong_capture_groups_are_reported() {
    assert_problems(
        problems(&["bad-regex.yaml"]),
        &[
            "bad-regex.yaml:15:33: workloads[0].metrics[0].regex: invalid regex `ops: ([0-9]+`: unclosed group",
            "bad-regex.yaml:16:33: workloads[0].metrics[1].regex: regex `ops: [0-9]+` has 0 capture groups: expected exactly one, or a group named `value`",
            "bad-regex.yaml:17:35: workloads[0].metrics[2].regex: regex `(\\w+): ([0-9]+)` has 2 capture groups: expected exactly one, or a group named `value`",
            // metrics[3] has two groups, one named `value`: valid.
            "bad-regex.yaml:28:23: bugs[0].expect.console: invalid regex `panic[`: unclosed character class",
        ],
    );
}

#[test]
fn impossible_values_are_reported() {
    assert_problems(
        problems(&["impossible-values.yaml"]),
        &[
            "impossible-values.yaml:14:18: workloads[0].repetitions: repetitions must be at least 1, got 0",
            "impossible-values.yaml:15:13: workloads[0].vcpus[0]: vCPU count must be at least 1, got 0",
            "impossible-values.yaml:15:19: workloads[0].vcpus[2]: vCPU count 2 is listed twice",
            "impossible-values.yaml:16:16: workloads[0].timeout_s: timeout_s must be at least 1, got 0",
            "impossible-values.yaml:21:12: workloads[1].vcpus: vcpus is empty: expected at least one vCPU count",
            "impossible-values.yaml:22:16: workloads[1].timeout_s: invalid value: integer `-5`, expected a whole number, 0 or more",
            "impossible-values.yaml:30:12: bugs[0].vcpus: vcpus must be at least 1, got 0",
            "impossible-values.yaml:31:15: bugs[0].attempts: attempts is 3 but the bug is not `nondeterministic`: a deterministic bug fails on the first attempt (set `nondeterministic: true` or `attempts: 1`)",
            "impossible-values.yaml:32:13: bugs[0].expect: expect needs a crash `title`, a `console` regex, or (a bug with no crash) a `marker`",
            "impossible-values.yaml:33:24: bugs[0].timeouts.boot_s: timeouts.boot_s must be at least 1, got 0",
            "impossible-values.yaml:33:51: bugs[0].timeouts.replay_s: invalid value: integer `-1`, expected a whole number, 0 or more",
        ],
    );
}

#[test]
fn referenced_files_must_exist_inside_the_repository() {
    assert_problems(
        problems(&["missing-files.yaml"]),
        &[
            "missing-files.yaml:7:46: images[0].build.fragments[1]: config fragment `images/kernel/no-such.config` does not exist (paths are relative to the repository root)",
            "missing-files.yaml:8:17: images[0].build.patches[0]: patch `/etc/passwd` must be relative to the repository root",
            "missing-files.yaml:8:30: images[0].build.patches[1]: patch `../outside.patch` must stay inside the repository (no `..`)",
            "missing-files.yaml:14:18: images[1].build.programs[0]: guest program source `images/guest/no-such-program.c` does not exist (paths are relative to the repository root)",
            "missing-files.yaml:20:15: bugs[0].patches[0]: patch `images/kernel/no-such-bug.patch` does not exist (paths are relative to the repository root)",
            "missing-files.yaml:20:48: bugs[0].patches[1]: patch `images/kernel` is a directory: expected a file",
            "missing-files.yaml:22:24: bugs[0].trigger.program: trigger program `images/guest/no-such-trigger.c` does not exist (paths are relative to the repository root)",
        ],
    );
}

#[test]
fn image_sources_recipes_and_value_types_are_checked() {
    assert_problems(
        problems(&["sources.yaml"]),
        &[
            "sources.yaml:2:5: images[0]: image has no source: expected exactly one of `url` (with `sha256`), `debian` or `build`",
            "sources.yaml:8:5: images[1].debian: image has several sources (url, debian): expected exactly one of `url` (with `sha256`), `debian` or `build`",
            "sources.yaml:11:5: images[2].url: a `url` source needs `sha256` (64 hex digits) to check the download",
            "sources.yaml:11:10: images[2].url: url `ftp://example.org/a` has scheme `ftp`: expected an http:// or https:// URL",
            "sources.yaml:17:17: images[3].build.size_mib: size_mib must be at least 1, got 0",
            "sources.yaml:18:7: images[3].build.fragments: field `fragments` does not apply to recipe `rootfs`: expected one of `suite`, `packages`, `size_mib`, `programs`, `command`",
            "sources.yaml:21:21: images[4].build.recipe: recipe `initramfs` builds images of kind `initramfs` but this image's kind is `disk`",
            "sources.yaml:25:5: images[5].unpack: `unpack` only applies to a `url` source",
            "sources.yaml:28:11: images[6].kind: unknown variant `firmware`, expected one of `kernel`, `initramfs`, `rootfs`, `disk`",
            "sources.yaml:35:18: images[7].description: invalid type: floating point `1.5`, expected a string (quote the value to make it a string)",
            "sources.yaml:41:5: images[8].path: `path` names a file inside an archive: a `url` source needs `unpack: tar.gz`, `tar.xz` or `tar.zst` for it",
            // images[9] picks files inside tar archives: valid.
            "sources.yaml:49:40: images[10].url: url `https://exa mple.org/x` is not a valid URL: invalid international domain name",
        ],
    );
}

#[test]
fn wrong_document_shapes_are_reported() {
    assert_problems(
        problems(&["not-a-mapping.yaml"]),
        &["not-a-mapping.yaml:1:1: a manifest file must be a mapping with any of the keys `images`, `workloads`, `bugs`, `suites`, found a list"],
    );
    assert_problems(
        problems(&["wrong-shapes.yaml"]),
        &[
            "wrong-shapes.yaml:1:9: images: expected a list of images, found a mapping",
            "wrong-shapes.yaml:2:12: workloads: expected a list of workloads, found a number",
            "wrong-shapes.yaml:4:5: bugs[0]: invalid type: string \"just-a-string\", expected a bug case: a mapping with `id`, `title`, `kind`, `kernel`, `trigger`, `expect` and `timeouts`",
        ],
    );
}

#[test]
fn one_file_with_every_class_of_problem_reports_them_all_at_once() {
    let file = fixture("multi-error.yaml");
    assert_problems(
        problems(&["multi-error.yaml"]),
        &[
            "multi-error.yaml:7:82: images[0].build.source.debian.sha256: sha256 `abcd` is malformed: expected 64 hexadecimal digits, got 4 characters",
            "multi-error.yaml:8:46: images[0].build.fragments[1]: config fragment `images/kernel/missing.config` does not exist (paths are relative to the repository root)",
            &format!("multi-error.yaml:9:11: images[1].name: duplicate image name `guest`: already defined at {}:3:11", file.display()),
            "multi-error.yaml:19:16: workloads[0].initramfs: image `no-such-initramfs` is not defined in any manifest (expected an image of kind `initramfs`)",
            "multi-error.yaml:22:28: workloads[0].metrics[0].regex: invalid regex `ops/s: ([0-9.]+`: unclosed group",
            "multi-error.yaml:23:18: workloads[0].repetitions: repetitions must be at least 1, got 0",
            "multi-error.yaml:24:13: workloads[0].vcpus[0]: vCPU count must be at least 1, got 0",
            "multi-error.yaml:26:5: workloads[0].priority: unknown field `priority`, expected one of `name`, `description`, `kernel`, `initramfs`, `rootfs`, `disks`, `setup`, `command`, `metrics`, `repetitions`, `vcpus`, `memory_mib`, `timeout_s`",
            "multi-error.yaml:28:5: bugs[0]: missing field `id`",
            "multi-error.yaml:34:40: bugs[0].timeouts.trigger_s: timeouts.trigger_s must be at least 1, got 0",
            "multi-error.yaml:39:23: suites[0].schemes[1]: unknown variant `rr`, expected one of `native`, `krr`, `whole-vm-rr`, `qemu-tcg`, `krr-upstream`",
        ],
    );
}

#[test]
fn problems_in_several_files_are_reported_together_in_file_order() {
    let all = problems(&["syntax.yaml", "bad-sha256.yaml"]);
    assert_eq!(all.len(), 4, "{all:#?}");
    assert!(all[0].starts_with("bad-sha256.yaml:5:13: "), "{all:#?}");
    assert!(
        all[3].starts_with("syntax.yaml:6:1: invalid YAML"),
        "{all:#?}"
    );
}

#[test]
fn context_directory_resolves_references_without_reporting_its_problems() {
    let root = repo_root();
    let given = [fixture("uses-context.yaml")];
    let diagnostics = manifest::load_files(&root, &given, Some(&fixture("context")))
        .expect_err("ctx-missing dangles");
    // ctx-broken has a malformed digest in the context file: not reported,
    // and still counts as defined.
    assert_problems(
        render(diagnostics),
        &["uses-context.yaml:5:25: workloads[0].disks[1]: image `ctx-missing` is not defined in any manifest (expected an image of kind `disk`)"],
    );
    // Without the context, every reference dangles.
    assert_eq!(problems(&["uses-context.yaml"]).len(), 4);
}

#[test]
fn a_file_inside_the_context_directory_is_read_once() {
    let root = repo_root();
    let context = fixture("dup-dir");
    // a.yaml is also in the context: its image must not clash with itself;
    // sub/b.yml in the context still clashes with it.
    let diagnostics =
        manifest::load_files(&root, &[context.join("a.yaml")], Some(&context)).expect_err("clash");
    assert_eq!(diagnostics.0.len(), 1, "{diagnostics}");
    assert!(
        diagnostics.0[0]
            .message
            .contains("duplicate image name `shared`"),
        "{diagnostics}"
    );
}

#[test]
fn a_valid_file_loads_into_the_typed_model() {
    let manifests = load_valid("valid.yaml");
    assert_eq!(manifests.images.len(), 3);
    let kernel = manifests.image("cloud-kernel").unwrap();
    assert_eq!(kernel.kind, ImageKind::Kernel);
    let ImageSource::Debian(package) = &kernel.source else {
        panic!("{:?}", kernel.source)
    };
    assert_eq!(package.package, "linux-image-6.1.0-28-cloud-amd64");
    // Uppercase digests are accepted and normalized.
    assert_eq!(
        package.sha256,
        "ae95fe63d4c553f8d0e6c86cb1ab566f3894a43743eb19ab585cd97d82f26514"
    );
    assert_eq!(
        kernel.path.as_deref(),
        Some("boot/vmlinuz-6.1.0-28-cloud-amd64")
    );
    let vmlinux = kernel.vmlinux.as_ref().unwrap();
    assert!(matches!(&vmlinux.fetch, Fetch::Debian(p) if p.package.ends_with("-dbg")));
    assert_eq!(
        vmlinux.path.as_deref(),
        Some("usr/lib/debug/boot/vmlinux-6.1.0-28-cloud-amd64")
    );

    let initramfs = manifests.image("rd").unwrap();
    let ImageSource::Build(BuildRecipe::Initramfs(recipe)) = &initramfs.source else {
        panic!("{:?}", initramfs.source)
    };
    assert_eq!(
        recipe.programs,
        vec![PathBuf::from("images/guest/syscall-loop.c")]
    );
    assert_eq!(recipe.command, None);
    let disk = manifests.image("scratch.disk").unwrap();
    assert!(matches!(
        disk.source,
        ImageSource::Url {
            unpack: Some(UnpackFormat::Zst),
            ..
        }
    ));

    let workload = manifests.workload("loop").unwrap();
    assert_eq!(workload.repetitions, 1, "repetitions defaults to 1");
    assert_eq!(workload.vcpus, vec![1, 2]);
    assert_eq!(workload.disks, vec!["scratch.disk".to_owned()]);
    let metric = &workload.metrics[0];
    assert_eq!(metric.better, Better::Higher);
    assert_eq!(
        metric.extract("iterations: 1000\nops/s: 10.5\nops/s: 1234.5\n"),
        Some(1234.5),
        "the last match wins"
    );
    assert_eq!(metric.extract("no numbers here"), None);

    let bug = manifests.bug("crash").unwrap();
    assert!(bug.nondeterministic);
    assert_eq!((bug.vcpus, bug.attempts), (1, 3));
    assert_eq!(
        bug.trigger.command.as_deref(),
        Some("echo c > /proc/sysrq-trigger")
    );

    let perf = manifests.suite("perf").unwrap();
    assert_eq!(perf.kind, SuiteKind::RecordPerf);
    assert_eq!(perf.backend, Backend::Auto, "backend defaults to auto");
    assert_eq!(
        perf.schemes,
        vec![
            Scheme::Native,
            Scheme::Krr,
            Scheme::WholeVmRr,
            Scheme::KrrUpstream
        ]
    );
    assert_eq!(manifests.suite("repro").unwrap().backend, Backend::Tcg);
    assert!(manifests.image("nope").is_none());
}

#[test]
fn typed_manifests_round_trip_through_yaml() {
    let manifests = load_valid("valid.yaml");
    let text = serde_norway::to_string(&manifests).unwrap();
    let again: Manifests = serde_norway::from_str(&text).unwrap();
    assert_eq!(serde_norway::to_string(&again).unwrap(), text);
    // Deserializing an image directly still enforces one source.
    let two_sources = "name: x\nkind: disk\nurl: https://e.org/a\nsha256: 0000000000000000000000000000000000000000000000000000000000000000\ndebian: {package: p, version: '1', sha256: 0000000000000000000000000000000000000000000000000000000000000000}\n";
    let error = serde_norway::from_str::<Image>(two_sources)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("image has several sources (url, debian)"),
        "{error}"
    );
}

#[test]
fn an_empty_file_declares_nothing() {
    let manifests = load_valid("empty.yaml");
    assert!(manifests.images.is_empty() && manifests.suites.is_empty());
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let dir = fixture("no-such-dir");
    let diagnostics = manifest::load_dir(&repo_root(), &dir).unwrap_err();
    assert_eq!(diagnostics.0.len(), 1);
    assert_eq!(diagnostics.0[0].file, dir);
    assert!(diagnostics.0[0]
        .message
        .starts_with("cannot read manifest directory: "));
}

#[test]
fn diagnostics_display_as_file_line_column_message() {
    let diagnostics = Diagnostics(vec![
        Diagnostic {
            file: "manifests/a.yaml".into(),
            line: 3,
            column: 7,
            message: "first".into(),
        },
        Diagnostic {
            file: "manifests/b.yaml".into(),
            line: 1,
            column: 1,
            message: "second".into(),
        },
    ]);
    assert_eq!(
        diagnostics.to_string(),
        "manifests/a.yaml:3:7: first\nmanifests/b.yaml:1:1: second"
    );
    let error: &dyn std::error::Error = &diagnostics;
    assert!(error.to_string().contains("a.yaml:3:7"));
}

#[test]
fn json_schema_describes_one_manifest_file() {
    let schema = manifest::json_schema();
    let properties = schema["properties"].as_object().unwrap();
    let mut keys: Vec<&str> = properties.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["bugs", "images", "suites", "workloads"]);
    assert_eq!(schema["additionalProperties"], false);
    let defs = &schema["$defs"];
    // Images are written flat, as ImageSpec.
    let image = &defs["Image"];
    assert_eq!(image["additionalProperties"], false);
    assert_eq!(
        image["properties"]["sha256"]["pattern"],
        "^[0-9a-fA-F]{64}$"
    );
    assert!(image["properties"]["build"].is_object());
    // Builds are tagged by `recipe`, each with its own fields.
    let recipes: Vec<&str> = defs["BuildRecipe"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|variant| variant["properties"]["recipe"]["const"].as_str().unwrap())
        .collect();
    assert_eq!(recipes, ["kernel", "initramfs", "rootfs"]);
    assert_eq!(defs["Workload"]["properties"]["timeout_s"]["minimum"], 1);
    assert_eq!(
        defs["Workload"]["properties"]["vcpus"]["items"]["minimum"],
        1
    );
}

#[test]
fn repository_manifests_validate() {
    let root = repo_root();
    let manifests =
        manifest::load_dir(&root, &root.join("manifests")).unwrap_or_else(|d| panic!("{d}"));
    for name in [
        "guest-6.1",
        "guest-6.1-kasan",
        "initramfs-base",
        "rootfs-workloads",
    ] {
        assert!(manifests.image(name).is_some(), "image {name}");
    }
    let perf = manifests.suite("record-perf").unwrap();
    assert!(perf.workloads.len() >= 5);
    assert!(manifests
        .suite("bug-repro")
        .unwrap()
        .bugs
        .contains(&"sysrq-crash".to_owned()));
}

#[test]
fn every_duplicate_key_is_reported_at_the_repeated_key() {
    assert_problems(
        problems(&["duplicate-key.yaml"]),
        &[
            "duplicate-key.yaml:6:5: invalid YAML: duplicate key `kind` (first given at line 3 column 5)",
            "duplicate-key.yaml:8:1: invalid YAML: duplicate key `images` (first given at line 1 column 1)",
        ],
    );
}

#[test]
fn merge_keys_apply_and_merged_problems_point_at_the_anchor() {
    assert_problems(
        problems(&["merge-keys.yaml"]),
        &[
            // Defined in w1 and merged into w2: reported for both, at the
            // anchor's line.
            "merge-keys.yaml:18:16: workloads[0].vcpus[1]: vCPU count must be at least 1, got 0",
            "merge-keys.yaml:18:16: workloads[1].vcpus[1]: vCPU count must be at least 1, got 0",
            // w2 overrides timeout_s: reported at its own key.
            "merge-keys.yaml:23:16: workloads[1].timeout_s: timeout_s must be at least 1, got 0",
        ],
    );
}

#[test]
fn several_documents_in_one_file_are_rejected() {
    assert_problems(
        problems(&["multi-document.yaml"]),
        &["multi-document.yaml:1:1: invalid YAML: deserializing from YAML containing more than one document is not supported"],
    );
}

#[test]
fn committed_json_schema_is_current() {
    let path = repo_root().join("manifests/manifest.schema.json");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        committed == manifest::json_schema(),
        "{} is stale: regenerate it with `cargo xtask schema --out manifests/manifest.schema.json`",
        path.display()
    );
}

#[test]
fn values_of_the_wrong_type_are_each_reported_once() {
    assert_problems(
        problems(&["wrong-types.yaml"]),
        &[
            "wrong-types.yaml:12:14: bugs[0].trigger: invalid type: string \"echo c > /proc/sysrq-trigger\", expected a trigger: a mapping with `command`, or `program` and `args`",
            "wrong-types.yaml:13:12: bugs[0].vcpus: invalid type: string \"two\", expected a whole number, 0 or more",
            "wrong-types.yaml:14:23: bugs[0].nondeterministic: invalid type: string \"yes\", expected a boolean",
            "wrong-types.yaml:16:15: bugs[0].timeouts: invalid type: integer `300`, expected timeouts: a mapping with `boot_s`, `trigger_s` and `replay_s`",
            "wrong-types.yaml:20:11: suites[0].bugs: invalid type: string \"b\", expected a sequence",
            "wrong-types.yaml:22:14: suites[0].backend: unknown variant `hvf`, expected one of `tcg`, `kvm`, `auto`",
        ],
    );
}

#[test]
fn an_unreadable_file_is_reported_by_name() {
    assert_problems(
        problems(&["no-such-file.yaml"]),
        &["no-such-file.yaml:1:1: cannot read manifest file: No such file or directory (os error 2)"],
    );
}

/// The repository's metric regexes against real output of the programs,
/// captured on Debian bookworm with the packages the rootfs installs
/// (`tests/data/manifests/outputs/<workload>.txt`, short runs).
#[test]
fn repository_metrics_match_real_benchmark_output() {
    let root = repo_root();
    let manifests =
        manifest::load_dir(&root, &root.join("manifests")).unwrap_or_else(|d| panic!("{d}"));
    let expected: &[(&str, &str, f64)] = &[
        ("syscall-loop", "syscalls_per_sec", 473789.5),
        ("syscall-loop-quick", "syscalls_per_sec", 473789.5),
        ("stress-ng-fork-pipe", "fork_bogo_ops_per_sec", 251.44),
        ("stress-ng-fork-pipe", "pipe_bogo_ops_per_sec", 456654.26),
        ("rocksdb-db-bench", "fillrandom_ops_per_sec", 33287.0),
        ("rocksdb-db-bench", "readrandom_ops_per_sec", 175423.0),
        ("redis-benchmark", "set_requests_per_sec", 3056.23),
        ("redis-benchmark", "get_requests_per_sec", 2950.72),
        ("nginx-wrk", "requests_per_sec", 19525.14),
        ("make-project", "build_seconds", 2.33),
    ];
    let mut checked = 0;
    for workload in &manifests.workloads {
        let output = std::fs::read_to_string(fixture(&format!("outputs/{}.txt", workload.name)))
            .unwrap_or_else(|e| panic!("no captured output for workload {}: {e}", workload.name));
        for metric in &workload.metrics {
            let want = expected
                .iter()
                .find(|(w, m, _)| *w == workload.name && *m == metric.name)
                .unwrap_or_else(|| {
                    panic!("no expected value for {}/{}", workload.name, metric.name)
                })
                .2;
            assert_eq!(
                metric.extract(&output),
                Some(want),
                "{}/{}",
                workload.name,
                metric.name
            );
            checked += 1;
        }
    }
    assert_eq!(checked, expected.len());
}

/// A user's manifest outside the repository: its paths start at its own
/// directory and come back absolute; a missing one is reported with the
/// directory it was looked for in; the repository's manifests still load
/// beside it and its items reference theirs.
#[test]
fn manifests_outside_the_repository_resolve_paths_from_their_directory() {
    let root = repo_root();
    let user = tempfile::tempdir().unwrap();
    std::fs::create_dir(user.path().join("mine")).unwrap();
    std::fs::write(user.path().join("mine/fix.patch"), "--- a\n+++ b\n").unwrap();
    std::fs::write(
        user.path().join("mine/trigger.c"),
        "int main(void){return 0;}\n",
    )
    .unwrap();
    std::fs::write(
        user.path().join("mine/load.c"),
        "int main(void){return 0;}\n",
    )
    .unwrap();
    let text = r#"
images:
  - name: initramfs-mine
    kind: initramfs
    build:
      recipe: initramfs
      busybox:
        package: busybox-static
        version: "1:1.35.0-4+deb12u1+b1"
        sha256: 3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744
      programs: [mine/load.c]
workloads:
  - name: my-load
    kernel: guest-6.1-krr
    initramfs: initramfs-mine
    command: load
    vcpus: [1]
    repetitions: 1
    timeout_s: 60
bugs:
  - id: my-bug
    title: a bug of my own
    kind: synthetic
    kernel: guest-6.1-krr
    patches: [mine/fix.patch]
    initramfs: initramfs-base
    trigger:
      program: mine/trigger.c
    vcpus: 1
    nondeterministic: false
    attempts: 1
    expect:
      title: "kernel panic: mine"
    timeouts: {boot_s: 60, trigger_s: 60, replay_s: 60}
"#;
    let file = user.path().join("mine.yaml");
    std::fs::write(&file, text).unwrap();
    let manifests =
        manifest::load_dir_with(&root, &root.join("manifests"), std::slice::from_ref(&file))
            .unwrap_or_else(|d| panic!("{d}"));
    let dir = user.path().canonicalize().unwrap();
    let bug = manifests.bug("my-bug").expect("the user's bug case");
    assert_eq!(bug.patches, [dir.join("mine/fix.patch")]);
    assert_eq!(bug.trigger.program, Some(dir.join("mine/trigger.c")));
    let Some(ImageSource::Build(BuildRecipe::Initramfs(initramfs))) =
        manifests.image("initramfs-mine").map(|image| &image.source)
    else {
        panic!("the user's initramfs");
    };
    assert_eq!(initramfs.programs, [dir.join("mine/load.c")]);
    assert!(manifests.workload("my-load").is_some());
    assert!(
        manifests.bug("sysrq-crash").is_some(),
        "the repository's own"
    );
    // The repository's manifests keep their paths relative to the root.
    let repo_bug = manifests.bug("cve-2022-0185").unwrap();
    assert!(repo_bug.patches[0].is_relative());

    std::fs::remove_file(user.path().join("mine/trigger.c")).unwrap();
    let problems = render(
        manifest::load_dir_with(&root, &root.join("manifests"), std::slice::from_ref(&file))
            .unwrap_err(),
    );
    assert_eq!(
        problems,
        [format!(
            "{}:28:16: bugs[0].trigger.program: trigger program `mine/trigger.c` does not exist (paths are relative to this manifest's directory {})",
            file.display(),
            dir.display()
        )]
    );
}

/// `--manifests` files start their paths from their own directory even
/// inside the repository: the example under docs/ works where it is.
#[test]
fn extra_manifests_inside_the_repository_keep_paths_from_their_directory() {
    let root = repo_root();
    let example = root.join("docs/examples/user-manifests/mine.yaml");
    let manifests = manifest::load_dir_with(
        &root,
        &root.join("manifests"),
        std::slice::from_ref(&example),
    )
    .unwrap_or_else(|d| panic!("{d}"));
    let dir = example.parent().unwrap().canonicalize().unwrap();
    let bug = manifests.bug("my-sysrq-crash").unwrap();
    assert_eq!(
        bug.trigger.program,
        Some(dir.join("programs/sysrq-crash.c"))
    );
    assert!(manifests.workload("prime-count").is_some());
}
