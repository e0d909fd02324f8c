// SPDX-License-Identifier: GPL-2.0-or-later
//! Builds the patched unicorn (x86 only) and its bindings, and writes the
//! pristine crate's Rust API (its lib.rs without the module header that
//! src/lib.rs provides) to `$OUT_DIR/api.rs`.

use std::path::PathBuf;

fn main() {
    krr_unicorn_source::build();
    let lib = krr_unicorn_source::rust_lib_source();
    let text =
        std::fs::read_to_string(&lib).unwrap_or_else(|e| panic!("reading {}: {e}", lib.display()));
    // The header src/lib.rs replaces: an inner attribute and a `mod` item
    // that `include!` cannot take.
    let header = "#![allow(non_camel_case_types)]\n\nmod bindings;\npub use bindings::*;\n";
    let api = text.strip_prefix(header).unwrap_or_else(|| {
        panic!(
            "{} does not start with the expected header {header:?}: update engine/unicorn-sys",
            lib.display()
        )
    });
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("api.rs"), api).expect("writing api.rs");
}
