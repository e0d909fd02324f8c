// SPDX-License-Identifier: GPL-2.0-or-later
//! Unicorn's patched source and the pristine crate's build logic, for
//! `engine/unicorn-sys` (the `unicorn-engine-sys` that the workspace's
//! `[patch.crates-io]` puts in place of the registry's).
//!
//! The repository holds no unicorn source: build.rs fetches the pristine
//! crate by sha256 and applies `patches/`. The pristine crate's own build
//! script (its CMake build and its bindgen renaming, which the
//! `unicorn-engine` crate's API depends on) is compiled here as a module,
//! made callable by the first patch, and run from unicorn-sys's build
//! script, where `OUT_DIR` and the `arch_*` features are that crate's.

/// The patched source tree.
pub const SOURCE_DIR: &str = concat!(env!("OUT_DIR"), "/unicorn");

#[allow(warnings, clippy::all, clippy::pedantic, clippy::nursery)]
mod pristine_build {
    use super::SOURCE_DIR;
    include!(concat!(env!("OUT_DIR"), "/unicorn/build.rs"));
}

/// Builds the patched library (static, CMake) and writes `bindings.rs` into
/// the calling build script's `OUT_DIR`; prints the link directives.
pub fn build() {
    pristine_build::main();
}

/// The pristine crate's `lib.rs` (the bindings' Rust API around
/// `bindings.rs`).
pub fn rust_lib_source() -> std::path::PathBuf {
    std::path::Path::new(SOURCE_DIR).join("bindings/rust/sys/src/lib.rs")
}
