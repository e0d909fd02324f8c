// SPDX-License-Identifier: GPL-2.0-or-later
//! The evaluation harness: typed YAML manifests and their validation
//! ([`manifest`]), the content-addressed artifact store ([`store`]), and guest
//! image recipes ([`images`]); [`artifacts`] resolves manifest sources through
//! the store.

pub mod artifacts;
pub mod images;
pub mod manifest;
pub use krr_store as store;
