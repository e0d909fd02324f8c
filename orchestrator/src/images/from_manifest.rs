// SPDX-License-Identifier: GPL-2.0-or-later
//! Turning the manifests' image entries (`crate::manifest::Image`) into the
//! builders' specs. Images whose source is a URL or a prebuilt Debian package
//! are fetched by the store, not built, and have no spec.

use std::path::Path;

use super::debian::DebianPackageRef;
use super::error::{ImageError, Result};
use super::{ImageRecipe, ImageSpec, InitramfsBuild, KernelBuild, RootfsBuild};
use crate::manifest::{self, BuildRecipe, DebianPackage, Fetch, ImageSource};

impl From<&DebianPackage> for DebianPackageRef {
    fn from(p: &DebianPackage) -> Self {
        DebianPackageRef {
            package: p.package.clone(),
            version: p.version.clone(),
            sha256: p.sha256.clone(),
        }
    }
}

/// The build spec of a manifest image, or `None` if the image is fetched
/// rather than built.
pub fn spec_from_manifest(image: &manifest::Image) -> Result<Option<ImageSpec>> {
    let ImageSource::Build(recipe) = &image.source else {
        return Ok(None);
    };
    let recipe = match recipe {
        BuildRecipe::Kernel(k) => {
            let Fetch::Debian(pkg) = &k.source.fetch else {
                return Err(ImageError::InvalidSpec {
                    image: image.name.clone(),
                    field: "build.source",
                    value: "url".into(),
                    expected:
                        "a Debian source package (source: {debian: {package, version, sha256}})"
                            .into(),
                });
            };
            ImageRecipe::Kernel(KernelBuild {
                source: pkg.into(),
                source_tarball: k.source.path.clone(),
                fragments: k.fragments.clone(),
                patches: k.patches.clone(),
                base: None,
            })
        }
        BuildRecipe::Initramfs(i) => ImageRecipe::Initramfs(InitramfsBuild {
            busybox: (&i.busybox).into(),
            programs: i.programs.clone(),
            command: i.command.clone(),
        }),
        BuildRecipe::Rootfs(r) => ImageRecipe::Rootfs(RootfsBuild {
            suite: r.suite.clone(),
            packages: r.packages.clone(),
            size_mib: r.size_mib,
            programs: r.programs.clone(),
            // The manifest schema has no rootfs `command` (yet): the command
            // comes from the kernel command line (`krr.run=`).
            command: None,
        }),
    };
    Ok(Some(ImageSpec {
        name: image.name.clone(),
        recipe,
    }))
}

/// Every buildable image of the manifests under `root/manifests`, in
/// manifest order. Manifest problems come back as one error listing them.
pub fn specs_from_repo(root: &Path) -> Result<Vec<ImageSpec>> {
    let manifests = manifest::load_dir(root, &root.join("manifests")).map_err(|diagnostics| {
        ImageError::InvalidSpec {
            image: "manifests".into(),
            field: "images",
            value: root.join("manifests").display().to_string(),
            expected: format!("valid manifests:\n{diagnostics}"),
        }
    })?;
    specs_from_manifests(&manifests)
}

/// Every buildable image of `manifests`, in manifest order.
pub fn specs_from_manifests(manifests: &manifest::Manifests) -> Result<Vec<ImageSpec>> {
    let mut specs = Vec::new();
    for image in &manifests.images {
        if let Some(spec) = spec_from_manifest(image)? {
            specs.push(spec);
        }
    }
    Ok(specs)
}
