//! `agent init`: installs the spec's package set before the server starts,
//! all or nothing. Every archive is read from its source and checked
//! against its sha256 first; only when all of them match are they staged
//! (`<name>.zip`, which the agent checksums later) and unpacked
//! (`<name>/`, which the server mounts), so a missing or corrupt package
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
    #[error("package {name}: downloading {url}: {message}")]
    Download {
        name: String,
        url: String,
        message: String,
    },
    #[error("package {name}: not a readable zip archive: {message}")]
    Archive { name: String, message: String },
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
    Err(unsupported("no source: set one of configMap, image or url"))
}

/// How long one package download may take.
const DOWNLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Downloads a package archive over http or https (system trust roots).
async fn download(name: &str, url: &str) -> Result<Vec<u8>, InitError> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let failed = |message: String| InitError::Download {
        name: name.to_owned(),
        url: url.to_owned(),
        message,
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| failed(format!("loading trust roots: {e}")))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let uri: hyper::Uri = url.parse().map_err(|e| failed(format!("{e}")))?;
    let request = async {
        let response = client.get(uri).await.map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(failed(format!("answered {status}: {body}")));
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(DOWNLOAD_TIMEOUT, request)
        .await
        .map_err(|_| failed(format!("no complete answer within {DOWNLOAD_TIMEOUT:?}")))?
}

/// Reads every package archive from its source.
pub async fn fetch(packages: &[PackageSpec], sources: &Sources) -> Result<Vec<Vec<u8>>, InitError> {
    let mut archives = Vec::with_capacity(packages.len());
    for package in packages {
        if let Some(url) = &package.source.url {
            archives.push(download(&package.name, url).await?);
            continue;
        }
        let path = source_path(package, sources)?;
        let bytes = std::fs::read(&path).map_err(|source| InitError::Read {
            name: package.name.clone(),
            path: path.display().to_string(),
            source,
        })?;
        archives.push(bytes);
    }
    Ok(archives)
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

/// Verifies every fetched archive (in the order of `packages`), then
/// installs them all into `target`. Returns the installed names.
pub fn install(
    packages: &[PackageSpec],
    archives: Vec<Vec<u8>>,
    target: &Path,
) -> Result<Vec<String>, InitError> {
    let mut verified = Vec::with_capacity(packages.len());
    for (package, bytes) in packages.iter().zip(archives) {
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
    // Unpack everything before staging anything: a broken archive fails
    // the whole set.
    let mut unpacked = Vec::with_capacity(verified.len());
    for (name, bytes) in &verified {
        unpacked.push(unpack(name, bytes)?);
    }
    let mut installed = Vec::new();
    for ((name, bytes), files) in verified.into_iter().zip(unpacked) {
        let archive = target.join(format!("{name}.zip"));
        std::fs::write(&archive, &bytes).map_err(|e| write(&archive, e))?;
        let dir = target.join(&name);
        for (relative, content) in files {
            let path = dir.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| write(parent, e))?;
            }
            std::fs::write(&path, content).map_err(|e| write(&path, e))?;
        }
        installed.push(name);
    }
    Ok(installed)
}

/// The files of a package archive, by relative path. Entries that would
/// land outside the package directory ("../", absolute paths) are refused.
fn unpack(name: &str, bytes: &[u8]) -> Result<Vec<(PathBuf, Vec<u8>)>, InitError> {
    use std::io::Read;
    let archive_error = |message: String| InitError::Archive {
        name: name.to_owned(),
        message,
    };
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| archive_error(e.to_string()))?;
    let mut files = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| archive_error(e.to_string()))?;
        if entry.is_dir() {
            continue;
        }
        let Some(relative) = entry.enclosed_name() else {
            return Err(archive_error(format!(
                "entry {:?} points outside the package",
                entry.name()
            )));
        };
        let mut content = Vec::new();
        entry
            .read_to_end(&mut content)
            .map_err(|e| archive_error(e.to_string()))?;
        files.push((relative, content));
    }
    Ok(files)
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

    async fn fetch_and_install(
        packages: &[PackageSpec],
        sources: &Sources,
        target: &Path,
    ) -> Result<Vec<String>, InitError> {
        let archives = fetch(packages, sources).await?;
        install(packages, archives, target)
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    /// A package archive with one file, as IS packages carry manifest.v3.
    fn archive(text: &str) -> Vec<u8> {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("manifest.v3", options).expect("entry");
        zip.write_all(text.as_bytes()).expect("write");
        zip.finish().expect("finish").into_inner()
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

    #[tokio::test]
    async fn verified_packages_are_installed() {
        let (a, b) = (archive("a"), archive("b"));
        let (sources, target) = setup("ok", &[("A.zip", &a), ("B.zip", &b)]);
        let installed = fetch_and_install(&[package("A", &a), package("B", &b)], &sources, &target)
            .await
            .expect("installs");
        assert_eq!(installed, ["A", "B"]);
        assert_eq!(std::fs::read(target.join("B.zip")).expect("read"), b);
        let manifest = std::fs::read_to_string(target.join("B").join("manifest.v3"));
        assert_eq!(manifest.expect("unpacked"), "b");
    }

    #[tokio::test]
    async fn one_corrupt_package_installs_nothing() {
        let (sources, target) = setup("corrupt", &[("A.zip", b"a"), ("B.zip", b"tampered")]);
        let err = fetch_and_install(&[package("A", b"a"), package("B", b"b")], &sources, &target)
            .await
            .expect_err("corrupt");
        assert!(
            err.to_string().starts_with("package B: sha256 is "),
            "{err}"
        );
        assert!(!target.join("A.zip").exists(), "no partial package set");
    }

    #[tokio::test]
    async fn the_installed_digest_matches_the_operators_only_while_intact() {
        let a = archive("a");
        let (sources, target) = setup("digest", &[("A.zip", &a)]);
        let packages = [package("A", &a)];
        fetch_and_install(&packages, &sources, &target)
            .await
            .expect("installs");
        assert_eq!(
            installed_digest(&packages, &target),
            Some(crate::render::packages_digest(&packages))
        );
        std::fs::write(target.join("A.zip"), b"changed inside the pod").expect("tamper");
        assert_eq!(installed_digest(&packages, &target), None);
    }

    #[tokio::test]
    async fn an_archive_that_is_not_a_zip_installs_nothing() {
        let (sources, target) = setup("notzip", &[("A.zip", b"plain text")]);
        let err = fetch_and_install(&[package("A", b"plain text")], &sources, &target)
            .await
            .expect_err("not a zip");
        assert!(
            err.to_string()
                .starts_with("package A: not a readable zip archive"),
            "{err}"
        );
        assert!(!target.join("A.zip").exists());
    }

    #[tokio::test]
    async fn a_missing_package_is_named() {
        let (sources, target) = setup("missing", &[]);
        let err = fetch_and_install(&[package("A", b"a")], &sources, &target)
            .await
            .expect_err("missing");
        assert!(err.to_string().starts_with("package A: reading "), "{err}");
    }
}
