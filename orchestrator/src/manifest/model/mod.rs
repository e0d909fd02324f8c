// SPDX-License-Identifier: GPL-2.0-or-later
//! The typed manifests: images, workloads, bug cases and suites.
//!
//! Field names are a contract with the image builder and the runner. Every
//! struct denies unknown fields so a misspelt key is an error, not a silently
//! ignored setting. Images are written flat in YAML (`url:`/`debian:`/`build:`
//! beside `name:`) but used as one [`ImageSource`] enum, so they go through
//! the `*Spec` structs, which mirror the YAML, and a checked conversion.

mod bug;
mod convert;
mod image;
mod suite;
mod workload;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use bug::{BugCase, BugKind, Expect, Timeouts, Trigger};
pub use image::{
    BuildRecipe, BuildSpec, DebianPackage, Fetch, FileSource, FileSpec, Image, ImageKind,
    ImageSource, ImageSpec, InitramfsRecipe, KernelRecipe, RecipeName, RootfsRecipe,
};
pub use suite::{Backend, Scheme, Suite, SuiteKind, Targets};
pub use workload::{Better, Metric, Workload};

pub use crate::store::UnpackFormat;

/// Everything the manifests declare, after validation.
///
/// Also the shape of one manifest file: each top-level key is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Manifests {
    /// Guest kernels, initramfs images, root filesystems and disks.
    pub images: Vec<Image>,
    /// Benchmarks run inside the guest.
    pub workloads: Vec<Workload>,
    /// Kernel bugs to record and replay.
    pub bugs: Vec<BugCase>,
    /// Experiments: which workloads or bugs to run, under which schemes.
    pub suites: Vec<Suite>,
}

impl Manifests {
    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.iter().find(|image| image.name == name)
    }

    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|workload| workload.name == name)
    }

    pub fn bug(&self, id: &str) -> Option<&BugCase> {
        self.bugs.iter().find(|bug| bug.id == id)
    }

    pub fn suite(&self, name: &str) -> Option<&Suite> {
        self.suites.iter().find(|suite| suite.name == name)
    }
}

fn one() -> u32 {
    1
}
