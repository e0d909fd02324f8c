// SPDX-License-Identifier: GPL-2.0-or-later
//! Builds the software-CPU backend's C hooks (src/unicorn/port_hooks.c): the
//! port hooks leave translated code by siglongjmp, which must not skip Rust
//! frames.

fn main() {
    println!("cargo:rerun-if-changed=src/unicorn/port_hooks.c");
    cc::Build::new()
        .file("src/unicorn/port_hooks.c")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("krr_port_hooks");
}
