// SPDX-License-Identifier: GPL-2.0-or-later
//! The registry's `unicorn-engine-sys` API over the patched library.
#![allow(non_camel_case_types, warnings, clippy::all)]

mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}
pub use bindings::*;

include!(concat!(env!("OUT_DIR"), "/api.rs"));
