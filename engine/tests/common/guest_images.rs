// SPDX-License-Identifier: GPL-2.0-or-later
//! Where the Linux-booting tests find their guest images.
//!
//! `cargo xtask test` builds the project's images (or takes them from the
//! cache) and passes them in `KRR_TEST_KERNEL` (bzImage) and
//! `KRR_TEST_INITRD` (the initramfs that runs `krr.run="CMD"` and prints
//! `KRR-END status=N`), with `KRR_TEST_REQUIRE_IMAGES=1`. Run directly by
//! cargo without them, a test prints `SKIPPED: <reason>` and returns; with
//! `KRR_TEST_REQUIRE_IMAGES` set, a missing image fails the test instead, so
//! CI can never pass by skipping.

use std::path::PathBuf;

/// The kernel and initramfs named by `kernel_var` and `KRR_TEST_INITRD`, or
/// `None` after printing why the test is skipped.
#[allow(dead_code)] // not every test binary uses both helpers
pub fn guest_images(kernel_var: &str) -> Option<(PathBuf, PathBuf)> {
    let [kernel, initrd] = image_files([kernel_var, "KRR_TEST_INITRD"])?;
    Some((kernel, initrd))
}

/// The files named by the environment variables `vars`, or `None` after
/// printing why the test is skipped (a failure under
/// `KRR_TEST_REQUIRE_IMAGES`).
pub fn image_files<const N: usize>(vars: [&str; N]) -> Option<[PathBuf; N]> {
    let files = vars.map(|v| std::env::var_os(v).map(PathBuf::from));
    if files
        .iter()
        .all(|f| f.as_ref().is_some_and(|f| f.is_file()))
    {
        return Some(files.map(|f| f.unwrap_or_default()));
    }
    let problem = vars
        .iter()
        .zip(&files)
        .map(|(v, f)| match f {
            Some(f) => format!("{v}={}", f.display()),
            None => format!("{v} unset"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let problem = format!("{problem}: each must name a file (cargo xtask test sets them)");
    if std::env::var_os("KRR_TEST_REQUIRE_IMAGES").is_some() {
        panic!("guest images required (KRR_TEST_REQUIRE_IMAGES is set): {problem}");
    }
    println!("SKIPPED: no guest images: {problem}");
    None
}
