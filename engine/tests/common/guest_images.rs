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
pub fn guest_images(kernel_var: &str) -> Option<(PathBuf, PathBuf)> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let problem = match (var(kernel_var), var("KRR_TEST_INITRD")) {
        (Some(kernel), Some(initrd)) if kernel.is_file() && initrd.is_file() => {
            return Some((kernel, initrd))
        }
        (Some(kernel), Some(initrd)) => format!(
            "{kernel_var}={} or KRR_TEST_INITRD={} is not a file",
            kernel.display(),
            initrd.display()
        ),
        _ => format!(
            "{kernel_var} and KRR_TEST_INITRD are not both set (cargo xtask test sets them)"
        ),
    };
    if std::env::var_os("KRR_TEST_REQUIRE_IMAGES").is_some() {
        panic!("guest images required (KRR_TEST_REQUIRE_IMAGES is set): {problem}");
    }
    println!("SKIPPED: no guest images: {problem}");
    None
}
