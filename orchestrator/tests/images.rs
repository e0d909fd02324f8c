// SPDX-License-Identifier: GPL-2.0-or-later
//! Guest image builds against the real inputs: Debian's linux-source-6.1 and
//! busybox-static (fetched through the artifact store, `KRR_CACHE`), gcc, and
//! stock QEMU. The first run builds the kernel (about 10 minutes on 2 cores);
//! later runs reuse it from the cache by recipe hash.

use std::path::{Path, PathBuf};

use indicatif::{MultiProgress, ProgressDrawTarget};
use krr_orchestrator::images::{
    self, build, build_adhoc_initramfs, parse_add, smoke_boot_qemu, BuildContext, BuiltImage,
    ImageError, ImageRecipe, ImageSpec, KernelBuild, SmokeBoot,
};
use krr_orchestrator::store::Store;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("orchestrator/ is inside the repository")
        .to_path_buf()
}

fn hidden() -> MultiProgress {
    MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
}

fn spec(name: &str) -> ImageSpec {
    images::specs_from_repo(&repo_root())
        .expect("repository manifests load")
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("manifests define no buildable image {name}"))
}

fn built(name: &str) -> BuiltImage {
    let root = repo_root();
    let store = Store::open_default().expect("store opens");
    let ctx = BuildContext::new(&root, &store, hidden()).expect("image dirs");
    build(&ctx, &spec(name)).unwrap_or_else(|e| panic!("building {name}: {e}"))
}

/// The "done when": the base kernel and initramfs boot under QEMU
/// and the end marker carries the command's exit status.
#[test]
fn base_kernel_and_initramfs_boot_in_qemu() {
    let kernel = built("guest-6.1");
    let initramfs = built("initramfs-base");
    for file in ["bzImage", "vmlinux", "System.map", "config"] {
        assert!(
            kernel.file(file).is_some_and(Path::is_file),
            "{file} missing"
        );
    }
    let config = std::fs::read_to_string(kernel.file("config").unwrap()).unwrap();
    assert!(config.contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y"));
    assert!(!config.contains("CONFIG_RANDOMIZE_BASE=y"));
    assert!(!config.contains("CONFIG_ACPI=y") && !config.contains("CONFIG_PCI=y"));

    let mut boot = SmokeBoot::new(kernel.file("bzImage").unwrap());
    boot.initrd = Some(initramfs.file("initramfs.cpio.gz").unwrap().to_path_buf());
    boot.command = Some("syscall-loop 2000 && nproc".into());
    let result = smoke_boot_qemu(&boot).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result.exit_status, 0, "{}", result.console);
    assert!(result.console.contains("ops/s: "), "{}", result.console);
    assert!(
        result.console.contains("Linux version 6.1."),
        "{}",
        result.console
    );
    assert!(
        result.console.lines().any(|l| l.trim() == "2"),
        "nproc should see both vCPUs:\n{}",
        result.console
    );

    // The marker reports the command's status, not a constant.
    boot.command = Some("syscall-loop 10 && exit 7".into());
    let failing = smoke_boot_qemu(&boot).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(failing.exit_status, 7, "{}", failing.console);
    boot.command = Some("syscall-loop not-a-number".into());
    let usage = smoke_boot_qemu(&boot).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(usage.exit_status, 2, "{}", usage.console);
}

/// `images initramfs --add SRC --run CMD`: a static binary built here runs in
/// the guest and its exit status appears in the end marker.
#[test]
fn adhoc_initramfs_wraps_a_static_binary() {
    let kernel = built("guest-6.1");
    let root = repo_root();
    let store = Store::open_default().unwrap();
    let ctx = BuildContext::new(&root, &store, hidden()).unwrap();
    let busybox = match spec("initramfs-base").recipe {
        ImageRecipe::Initramfs(i) => i.busybox,
        other => panic!("initramfs-base is {other:?}"),
    };

    let scratch = tempfile::tempdir().unwrap();
    let src = scratch.path().join("answer.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(int c, char **v) { printf(\"answer from %s\\n\", v[0]); return 42; }\n",
    )
    .unwrap();
    let bin = scratch.path().join("answer");
    let status = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success());

    let add = parse_add(&format!("{}:/opt/answer", bin.display())).unwrap();
    let out = scratch.path().join("out/adhoc.cpio.gz");
    build_adhoc_initramfs(&ctx, &busybox, &[add], "/opt/answer", &out).unwrap();

    let mut boot = SmokeBoot::new(kernel.file("bzImage").unwrap());
    boot.initrd = Some(out.clone());
    let result = smoke_boot_qemu(&boot).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result.exit_status, 42, "{}", result.console);
    assert!(result.console.contains("answer from /opt/answer"));

    // A dynamically linked binary cannot run there: refused, naming it.
    let dynamic = scratch.path().join("dynamic");
    let status = std::process::Command::new("gcc")
        .arg("-o")
        .arg(&dynamic)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success());
    let err = build_adhoc_initramfs(
        &ctx,
        &busybox,
        &[parse_add(&dynamic.display().to_string()).unwrap()],
        "dynamic",
        &scratch.path().join("bad.cpio.gz"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("statically linked") && err.contains("dynamic"),
        "{err}"
    );
    assert!(!scratch.path().join("bad.cpio.gz").exists());
}

/// Two builds of one initramfs recipe give the same bytes, and a cached
/// build is returned without rebuilding.
#[test]
fn initramfs_build_is_reproducible_and_cached() {
    let root = repo_root();
    let store = Store::open_default().unwrap();
    let mut ctx = BuildContext::new(&root, &store, hidden()).unwrap();
    // Own name: the forced rebuild must not replace initramfs-base while
    // another test boots it.
    let mut spec = spec("initramfs-base");
    spec.name = "initramfs-repro-check".into();
    let first = build(&ctx, &spec).unwrap();
    ctx.force = true;
    let second = build(&ctx, &spec).unwrap();
    assert_eq!(
        first.files["initramfs.cpio.gz"].sha256,
        second.files["initramfs.cpio.gz"].sha256
    );
    assert_eq!(first.recipe_hash, second.recipe_hash);
    ctx.force = false;
    let cached = build(&ctx, &spec).unwrap();
    assert!(second.build_seconds > 0.0);
    assert_eq!(cached.build_seconds, 0.0, "served from the cache");
    assert_eq!(cached.files, second.files);

    let listed = images::list(&root, &ctx.dirs, std::slice::from_ref(&spec));
    assert!(listed[0].built, "{listed:?}");
    assert_eq!(listed[0].recipe_hash, first.recipe_hash);
}

/// A wrong pinned sha256 stops the build, names the package, and leaves no
/// image behind.
#[test]
fn wrong_package_hash_is_refused() {
    let root = repo_root();
    let store = Store::open_default().unwrap();
    let ctx = BuildContext::new(&root, &store, hidden()).unwrap();
    let mut spec = spec("initramfs-base");
    spec.name = "initramfs-wrong-hash".into();
    if let ImageRecipe::Initramfs(i) = &mut spec.recipe {
        i.busybox.sha256 = "0".repeat(64);
    }
    let err = build(&ctx, &spec).unwrap_err().to_string();
    assert!(
        err.contains("busybox-static") && err.contains(&"0".repeat(64)),
        "{err}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&ctx.dirs.images)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("initramfs-wrong-hash")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An option that olddefconfig drops, and a patch that does not apply, each
/// stop the kernel build with a message naming the cause. Runs the real
/// extraction and Kconfig (no compile), in a scratch repository root.
#[test]
fn kernel_recipe_errors_name_the_cause() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    std::fs::create_dir_all(root.join("images/kernel")).unwrap();
    let base = std::fs::read_to_string(repo_root().join("images/kernel/base.config")).unwrap();
    std::fs::write(root.join("images/kernel/base.config"), base).unwrap();
    // PCI is off in base.config, so PCI_MSI cannot survive.
    std::fs::write(root.join("images/kernel/bad.config"), "CONFIG_PCI_MSI=y\n").unwrap();
    std::fs::write(
        root.join("images/kernel/bad.patch"),
        "--- a/Makefile\n+++ b/Makefile\n@@ -1,3 +1,3 @@\n-# not the first line\n+# changed\n VERSION = 6\n PATCHLEVEL = 1\n",
    )
    .unwrap();
    let store = Store::open_default().unwrap();
    let ctx = BuildContext::new(root, &store, hidden()).unwrap();
    let source = match spec("guest-6.1").recipe {
        ImageRecipe::Kernel(k) => k,
        other => panic!("guest-6.1 is {other:?}"),
    };

    let dropped = ImageSpec {
        name: "kernel-bad-option".into(),
        recipe: ImageRecipe::Kernel(KernelBuild {
            fragments: vec![
                "images/kernel/base.config".into(),
                "images/kernel/bad.config".into(),
            ],
            patches: vec![],
            ..source.clone()
        }),
    };
    match build(&ctx, &dropped) {
        Err(ImageError::ConfigOptionsDropped(options)) => {
            assert_eq!(options.len(), 1, "{options:?}");
            assert_eq!(options[0].option, "CONFIG_PCI_MSI");
            assert_eq!(
                options[0].fragment,
                PathBuf::from("images/kernel/bad.config")
            );
        }
        other => panic!("expected a dropped option, got {other:?}"),
    }

    let bad_patch = ImageSpec {
        name: "kernel-bad-patch".into(),
        recipe: ImageRecipe::Kernel(KernelBuild {
            patches: vec!["images/kernel/bad.patch".into()],
            ..source
        }),
    };
    let err = build(&ctx, &bad_patch).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ImageError::PatchFailed { .. }), "{text}");
    assert!(text.contains("images/kernel/bad.patch"), "{text}");
    assert!(text.contains("Makefile: Hunk #1 FAILED"), "{text}");

    // Neither failure left an image that `list` would call built.
    let listed = images::list(root, &ctx.dirs, &[dropped, bad_patch]);
    assert!(listed.iter().all(|s| !s.built), "{listed:?}");
}

/// The workload root filesystem (debootstrap + mkfs.ext4 -d) boots as the
/// root device with the same /init convention. Ignored by default: it
/// downloads a few hundred MB of Debian packages. Run with
/// `cargo test --release -p krr-orchestrator --test images -- --ignored rootfs`.
#[test]
#[ignore = "downloads and debootstraps a Debian rootfs (several minutes)"]
fn rootfs_workloads_boots_in_qemu() {
    let kernel = built("guest-6.1");
    let rootfs = built("rootfs-workloads");
    let image = rootfs.file("rootfs.ext4").expect("rootfs.ext4");
    let mut boot = SmokeBoot::new(kernel.file("bzImage").unwrap());
    boot.rootfs = Some(image.to_path_buf());
    boot.command = Some(
        "syscall-loop 1000 && stress-ng --version && redis-server --version && cat /etc/debian_version".into(),
    );
    let result = smoke_boot_qemu(&boot).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result.exit_status, 0, "{}", result.console);
    assert!(result.console.contains("ops/s: "), "{}", result.console);
    assert!(
        result.console.contains("stress-ng, version"),
        "{}",
        result.console
    );
}

/// Two builds of the base kernel recipe give byte-identical bzImage and
/// vmlinux. Ignored by default: it rebuilds the kernel (about 10 minutes).
#[test]
#[ignore = "rebuilds the kernel from scratch (about 10 minutes)"]
fn kernel_build_is_reproducible() {
    let root = repo_root();
    let store = Store::open_default().unwrap();
    let mut ctx = BuildContext::new(&root, &store, hidden()).unwrap();
    let spec = spec("guest-6.1");
    let first = build(&ctx, &spec).unwrap();
    ctx.force = true;
    let second = build(&ctx, &spec).unwrap();
    for file in ["bzImage", "vmlinux", "System.map", "config"] {
        assert_eq!(
            first.files[file].sha256, second.files[file].sha256,
            "{file} differs between two builds of one recipe"
        );
    }
}

/// A debootstrap failure (here: a package the suite does not have) stops
/// the rootfs build with debootstrap's own message naming the package, and
/// leaves neither an image nor the half-installed tree.
#[test]
fn rootfs_with_unknown_package_fails_naming_it() {
    let root = repo_root();
    let store = Store::open_default().unwrap();
    let ctx = BuildContext::new(&root, &store, hidden()).unwrap();
    let spec = ImageSpec {
        name: "rootfs-unknown-package".into(),
        recipe: ImageRecipe::Rootfs(images::RootfsBuild {
            suite: "bookworm".into(),
            packages: vec!["no-such-package-krr".into()],
            size_mib: 256,
            programs: vec![],
            command: None,
        }),
    };
    let err = build(&ctx, &spec).unwrap_err().to_string();
    assert!(err.contains("debootstrap"), "{err}");
    assert!(
        err.contains("Couldn't find these debs: no-such-package-krr"),
        "{err}"
    );
    let listed = images::list(&root, &ctx.dirs, std::slice::from_ref(&spec));
    assert!(!listed[0].built);
    let hash = &listed[0].recipe_hash[..16];
    assert!(!ctx.dirs.build.join(format!("rootfs-{hash}/root")).exists());
}

/// The KASAN variant boots and runs the workload with KASAN active.
/// Ignored by default: building it takes 15-25 minutes.
#[test]
#[ignore = "builds the KASAN kernel (15-25 minutes)"]
fn kasan_kernel_boots_in_qemu() {
    let kernel = built("guest-6.1-kasan");
    let initramfs = built("initramfs-base");
    let config = std::fs::read_to_string(kernel.file("config").unwrap()).unwrap();
    assert!(config.contains("CONFIG_KASAN=y") && config.contains("CONFIG_PROVE_LOCKING=y"));
    let mut boot = SmokeBoot::new(kernel.file("bzImage").unwrap());
    boot.initrd = Some(initramfs.file("initramfs.cpio.gz").unwrap().to_path_buf());
    boot.memory_mib = 1024;
    boot.command = Some("syscall-loop 500".into());
    let result = smoke_boot_qemu(&boot).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result.exit_status, 0, "{}", result.console);
    assert!(
        result
            .console
            .contains("KernelAddressSanitizer initialized"),
        "{}",
        result.console
    );
    assert!(!result.console.contains("BUG: KASAN"), "{}", result.console);
}

/// A kernel that extends another (a bug kernel over its flavour) is built
/// in the base's tree: the bug's patch applies over the base's sources,
/// kbuild recompiles what it touches, and afterwards the base's sources
/// and configuration are back as they were, with no derived-build state
/// left. Rebuilds on every run (`force`): about a minute (one file and the
/// link).
#[test]
fn a_derived_kernel_is_built_in_its_base_tree_and_the_base_is_put_back() {
    let base_image = built("guest-6.1");
    let ImageRecipe::Kernel(base) = spec("guest-6.1").recipe else {
        panic!("guest-6.1 is not a kernel");
    };
    let root = repo_root();
    let store = Store::open_default().unwrap();
    let mut ctx = BuildContext::new(&root, &store, hidden()).unwrap();
    ctx.force = true;
    let derived = ImageSpec {
        name: "guest-6.1-derived-test".into(),
        recipe: ImageRecipe::Kernel(KernelBuild {
            fragments: vec![],
            patches: vec!["images/bugs/cve-2022-0185/revert-fix.patch".into()],
            base: Some(Box::new(base.clone())),
            ..base
        }),
    };
    let image = build(&ctx, &derived).unwrap_or_else(|e| panic!("derived build: {e}"));
    let vmlinux = |i: &BuiltImage| i.files["vmlinux"].sha256.clone();
    assert_ne!(
        vmlinux(&image),
        vmlinux(&base_image),
        "the patch changed nothing"
    );
    assert_eq!(
        image.files["config"].sha256, base_image.files["config"].sha256,
        "no fragment: the same configuration"
    );

    let hash = images::recipe_hash(&root, &spec("guest-6.1")).unwrap();
    let tree = ctx.dirs.build.join(format!("kernel-{}", &hash[..16]));
    let source = std::fs::read_to_string(tree.join("src/fs/fs_context.c")).unwrap();
    assert!(
        source.contains("if (size + len + 2 > PAGE_SIZE)")
            && !source.contains("PAGE_SIZE - 2 - size"),
        "the base's source is not back"
    );
    assert!(
        !tree.join("derived").exists(),
        "derived-build state left behind"
    );
    let config = std::fs::read(tree.join("out/.config")).unwrap();
    assert_eq!(
        config,
        std::fs::read(&base_image.files["config"].path).unwrap()
    );
    images::clean(&ctx.dirs, &["guest-6.1-derived-test".to_string()]).unwrap();
}
