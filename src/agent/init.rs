//! `agent init`: installs the spec's package set before the server starts,
//! all or nothing. Every archive is read from its source and checked
//! against its sha256 first; only when all of them match are they copied
//! into the server's package directory, so a missing or corrupt package
//! never leaves the server with a partial set.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::api::PackageSpec;

/// Where the sources of packages are mounted in the pod.
#[derive(Clone, Debug)]
pub struct Sources {
    /// ConfigMap sources: `<dir>/<configmap>/<key>`.
    pub config_maps: PathBuf,
    /// Image sources (an image volume): `<dir>/<path>`.
    pub images: PathBuf,
}

/// Why the package set cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("package {name}: reading {path}: {source}")]
    Read {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("package {name}: sha256 is {actual}, the spec expects {expected}")]
    Checksum {
        name: String,
        actual: String,
        expected: String,
    },
    #[error("package {name}: {reason}")]
    Unsupported { name: String, reason: String },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the package list {path}: {message}")]
    List { path: String, message: String },
}

/// Reads the package list the operator rendered (JSON array of packages).
pub fn read_list(path: &Path) -> Result<Vec<PackageSpec>, InitError> {
    let list = |message: String| InitError::List {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| list(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| list(e.to_string()))
}

fn source_path(package: &PackageSpec, sources: &Sources) -> Result<PathBuf, InitError> {
    let unsupported = |reason: &str| InitError::Unsupported {
        name: package.name.clone(),
        reason: reason.to_owned(),
    };
    if let Some(cm) = &package.source.config_map {
        return Ok(sources.config_maps.join(&cm.name).join(&cm.key));
    }
    if let Some(image) = &package.source.image {
        // "<image>//<path>": the image is mounted as a volume; the path is inside it.
        let path = image
            .split_once("//")
            .map(|(_, p)| p)
            .ok_or_else(|| unsupported("an image source must be <image>//<path>"))?;
        let (reference, _) = image.split_once("//").unwrap_or((image, ""));
        return Ok(sources
            .images
            .join(image_mount_name(reference))
            .join(path.trim_start_matches('/')));
    }
    Err(unsupported(
        "url sources are fetched by the operator's image puller, not yet by agent init; use a configMap or image source",
    ))
}

/// The directory (and volume name suffix) an image source is mounted at:
/// the reference with everything but letters and digits turned into '-'.
pub fn image_mount_name(reference: &str) -> String {
    let name: String = reference
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.trim_matches('-').chars().take(50).collect()
}

/// Where the verified packages are staged for the server.
pub const STAGING_DIR: &str = "/opt/integration/packages";
/// Where package sources are mounted in the init container.
pub const CONFIG_MAP_SOURCES: &str = "/etc/integration/package-sources/configmaps";
pub const IMAGE_SOURCES: &str = "/etc/integration/package-sources/images";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Verifies every package, then installs them all into `target` as
/// `<name>.zip`. Returns the installed names.
pub fn install(
    packages: &[PackageSpec],
    sources: &Sources,
    target: &Path,
) -> Result<Vec<String>, InitError> {
    let mut verified = Vec::with_capacity(packages.len());
    for package in packages {
        let path = source_path(package, sources)?;
        let bytes = std::fs::read(&path).map_err(|source| InitError::Read {
            name: package.name.clone(),
            path: path.display().to_string(),
            source,
        })?;
        let actual = sha256_hex(&bytes);
        if actual != package.sha256 {
            return Err(InitError::Checksum {
                name: package.name.clone(),
                actual,
                expected: package.sha256.clone(),
            });
        }
        verified.push((package.name.clone(), bytes));
    }
    let write = |path: &Path, source| InitError::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(target).map_err(|e| write(target, e))?;
    let mut installed = Vec::new();
    for (name, bytes) in verified {
        let path = target.join(format!("{name}.zip"));
        std::fs::write(&path, bytes).map_err(|e| write(&path, e))?;
        installed.push(name);
    }
    Ok(installed)
}

/// The digest of the package set installed in `dir`, if every package of
/// the list is there with its checksum; `None` when something is missing
/// or altered.
pub fn installed_digest(packages: &[PackageSpec], dir: &Path) -> Option<String> {
    let intact = packages.iter().all(|p| {
        std::fs::read(dir.join(format!("{}.zip", p.name)))
            .is_ok_and(|bytes| sha256_hex(&bytes) == p.sha256)
    });
    intact.then(|| crate::render::packages_digest(packages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConfigMapKeyRef, PackageSource};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn package(name: &str, content: &[u8]) -> PackageSpec {
        PackageSpec {
            name: name.into(),
            version: "1".into(),
            source: PackageSource {
                image: None,
                url: None,
                config_map: Some(ConfigMapKeyRef {
                    name: "pkgs".into(),
                    key: format!("{name}.zip"),
                }),
            },
            sha256: sha256_hex(content),
        }
    }

    fn setup(name: &str, files: &[(&str, &[u8])]) -> (Sources, PathBuf) {
        let root = dir(name);
        let cms = root.join("cm");
        std::fs::create_dir_all(cms.join("pkgs")).expect("dir");
        for (file, content) in files {
            std::fs::write(cms.join("pkgs").join(file), content).expect("write");
        }
        (
            Sources {
                config_maps: cms,
                images: root.join("img"),
            },
            root.join("packages"),
        )
    }

    #[test]
    fn verified_packages_are_installed() {
        let (sources, target) = setup("ok", &[("A.zip", b"a"), ("B.zip", b"b")]);
        let installed = install(&[package("A", b"a"), package("B", b"b")], &sources, &target)
            .expect("installs");
        assert_eq!(installed, ["A", "B"]);
        assert_eq!(std::fs::read(target.join("B.zip")).expect("read"), b"b");
    }

    #[test]
    fn one_corrupt_package_installs_nothing() {
        let (sources, target) = setup("corrupt", &[("A.zip", b"a"), ("B.zip", b"tampered")]);
        let err = install(&[package("A", b"a"), package("B", b"b")], &sources, &target)
            .expect_err("corrupt");
        assert!(
            err.to_string().starts_with("package B: sha256 is "),
            "{err}"
        );
        assert!(!target.join("A.zip").exists(), "no partial package set");
    }

    #[test]
    fn the_installed_digest_matches_the_operators_only_while_intact() {
        let (sources, target) = setup("digest", &[("A.zip", b"a")]);
        let packages = [package("A", b"a")];
        install(&packages, &sources, &target).expect("installs");
        assert_eq!(
            installed_digest(&packages, &target),
            Some(crate::render::packages_digest(&packages))
        );
        std::fs::write(target.join("A.zip"), b"changed inside the pod").expect("tamper");
        assert_eq!(installed_digest(&packages, &target), None);
    }

    #[test]
    fn a_missing_package_is_named() {
        let (sources, target) = setup("missing", &[]);
        let err = install(&[package("A", b"a")], &sources, &target).expect_err("missing");
        assert!(err.to_string().starts_with("package A: reading "), "{err}");
    }
}
