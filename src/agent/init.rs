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
    #[error("package {name}: {what} exceeds the {limit} limit for {scope}")]
    TooLarge {
        name: String,
        what: String,
        limit: String,
        scope: &'static str,
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

/// What installing one package set may take. Archives and their unpacked
/// files are held in memory until the whole set is verified, so these
/// bound the init container's memory as well as the packages volume.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of one archive, downloaded or read from a file.
    pub archive_bytes: u64,
    /// Bytes of one unpacked file.
    pub entry_bytes: u64,
    /// Files in the whole set.
    pub entries: usize,
    /// Bytes the whole set stages: its archives and their unpacked files.
    pub staged_bytes: u64,
    /// Redirects one download follows.
    pub redirects: usize,
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The operator's limits (there is no spec field for them): far above the
/// packages webMethods and WSO2 ship, far below what fills a node.
pub const LIMITS: Limits = Limits {
    archive_bytes: 256 * MIB,
    entry_bytes: 256 * MIB,
    entries: 100_000,
    staged_bytes: GIB,
    redirects: 5,
};

/// The size limit of the packages volume: the staged set plus as much
/// again for what servers write into their package directories (IS keeps
/// package configuration there).
pub const PACKAGE_VOLUME_LIMIT: &str = "2Gi";

/// A byte count as a person reads a limit.
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= GIB && b % GIB == 0 => format!("{} GiB", b / GIB),
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= KIB && b % KIB == 0 => format!("{} KiB", b / KIB),
        b => format!("{b} bytes"),
    }
}

/// How long one package download may take, redirects included.
const DOWNLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// How much of an error answer's body is read, and shown.
const EXCERPT_BYTES: usize = 1024;
const EXCERPT_CHARS: usize = 200;

/// The secret parts of package URLs, which errors (the termination
/// message, the pod's Event, the log) must never show: user information
/// and query strings (presigned URLs carry their token there). Servers may
/// echo them in what they answer, so answers are scrubbed too.
#[derive(Default)]
struct Secrets(Vec<String>);

impl Secrets {
    fn learn(&mut self, url: &url::Url) {
        let mut found = Vec::new();
        if let Some(password) = url.password() {
            found.push(password.to_owned());
            found.push(decoded(password));
        }
        if !url.username().is_empty() {
            found.push(url.username().to_owned());
            found.push(decoded(url.username()));
            found.push(basic_credentials(url));
        }
        if let Some(query) = url.query() {
            found.push(query.to_owned());
            for (_, value) in url.query_pairs() {
                found.push(value.into_owned());
            }
            for pair in query.split('&') {
                if let Some((_, value)) = pair.split_once('=') {
                    found.push(value.to_owned());
                }
            }
        }
        // Very short values would blank out ordinary words.
        for secret in found {
            if secret.len() >= 4 && !self.0.contains(&secret) {
                self.0.push(secret);
            }
        }
        // Longest first: a secret that contains another goes whole.
        self.0.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    fn scrub(&self, text: &str) -> String {
        self.0.iter().fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), "<redacted>")
        })
    }
}

/// The Basic credentials of a URL's user information.
fn basic_credentials(url: &url::Url) -> String {
    crate::agent::hooks::basic_auth(
        &decoded(url.username()),
        &decoded(url.password().unwrap_or("")),
    )
}

fn decoded(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A URL as errors show it: without user information and query.
fn shown(url: &url::Url) -> String {
    let mut bare = url.clone();
    let had_user = !bare.username().is_empty() || bare.password().is_some();
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let had_query = bare.query().is_some();
    bare.set_query(None);
    bare.set_fragment(None);
    let mut text = bare.to_string();
    if had_user {
        text = text.replacen("://", "://<redacted>@", 1);
    }
    if had_query {
        text.push_str("?<redacted>");
    }
    text
}

/// The error's chain on one line (hyper's own text is "client error
/// (Connect)"; the cause is in its sources).
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// Why a download failed: where it was (as shown) and what happened.
struct Failure {
    at: String,
    message: String,
}

/// Downloads a package archive over http or https (system trust roots),
/// following up to `limits.redirects` redirects. User information in the
/// URL is sent as Basic credentials, to the URL's own origin only.
async fn download(name: &str, url: &str, limits: &Limits) -> Result<Vec<u8>, InitError> {
    let mut secrets = Secrets::default();
    let failed = |secrets: &Secrets, failure: Failure| InitError::Download {
        name: name.to_owned(),
        url: failure.at,
        message: secrets.scrub(&failure.message),
    };
    let first = url::Url::parse(url).map_err(|e| InitError::Download {
        name: name.to_owned(),
        // Unparsable, so its secret parts cannot be told apart.
        url: "the package URL".to_owned(),
        message: format!("not a URL: {e}"),
    })?;
    secrets.learn(&first);
    let at = shown(&first);
    let result = tokio::time::timeout(DOWNLOAD_TIMEOUT, get(first, limits, &mut secrets)).await;
    match result {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(failure)) => Err(failed(&secrets, failure)),
        Err(_) => Err(failed(
            &secrets,
            Failure {
                at,
                message: format!("no complete answer within {DOWNLOAD_TIMEOUT:?}"),
            },
        )),
    }
}

async fn get(first: url::Url, limits: &Limits, secrets: &mut Secrets) -> Result<Vec<u8>, Failure> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper::header::{AUTHORIZATION, LOCATION};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| Failure {
            at: shown(&first),
            message: format!("loading trust roots: {e}"),
        })?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let authorization = (!first.username().is_empty()).then(|| basic_credentials(&first));
    let origin = first.origin();
    let mut current = first;
    for _ in 0..=limits.redirects {
        let at = shown(&current);
        let fail = |message: String| Failure {
            at: at.clone(),
            message,
        };
        let mut plain = current.clone();
        let _ = plain.set_username("");
        let _ = plain.set_password(None);
        plain.set_fragment(None);
        let uri: hyper::Uri = plain.as_str().parse().map_err(|e| fail(format!("{e}")))?;
        let mut request = hyper::Request::get(uri);
        if let Some(credentials) = &authorization
            && current.origin() == origin
        {
            request = request.header(AUTHORIZATION, credentials);
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| fail(e.to_string()))?;
        let response = client
            .request(request)
            .await
            .map_err(|e| fail(causes(&e)))?;
        let status = response.status();
        let location = response.headers().get(LOCATION);
        if status.is_redirection()
            && let Some(location) = location
        {
            let next = redirect_target(&current, status, location).map_err(fail)?;
            secrets.learn(&next);
            current = next;
            continue;
        }
        return archive(response, limits).await.map_err(fail);
    }
    Err(Failure {
        at: shown(&current),
        message: format!("more than {} redirects", limits.redirects),
    })
}

/// Where a redirect leads: `location` resolved against `current`; refused
/// when it is not text, not a URL, or leaves https (or http) for a scheme
/// the download must not follow.
fn redirect_target(
    current: &url::Url,
    status: hyper::StatusCode,
    location: &hyper::header::HeaderValue,
) -> Result<url::Url, String> {
    let location = location
        .to_str()
        .map_err(|_| format!("answered {status} with a Location that is not text"))?;
    let next = current
        .join(location)
        .map_err(|e| format!("answered {status} with an invalid Location: {e}"))?;
    match (current.scheme(), next.scheme()) {
        (_, "https") | ("http", "http") => Ok(next),
        ("https", "http") => Err(format!(
            "answered {status} with a redirect from https to http, which is refused"
        )),
        (_, other) => Err(format!(
            "answered {status} with a redirect to a {other} URL, which is refused"
        )),
    }
}

/// The archive in a final answer: refused when the answer is not a
/// success (with an excerpt of what it said) or when it announces or
/// sends more than one archive may hold.
async fn archive(
    response: hyper::Response<hyper::body::Incoming>,
    limits: &Limits,
) -> Result<Vec<u8>, String> {
    use hyper::header::CONTENT_LENGTH;

    let status = response.status();
    if !status.is_success() {
        let body = read_body(response.into_body(), EXCERPT_BYTES as u64)
            .await
            .ok()
            .map(|b| {
                String::from_utf8_lossy(&b.bytes)
                    .chars()
                    .take(EXCERPT_CHARS)
                    .collect::<String>()
            })
            .unwrap_or_default();
        return Err(format!("answered {status}: {}", body.trim()));
    }
    let announced = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let over = |what: String| {
        format!(
            "{what} exceeds the {} limit for one archive",
            size(limits.archive_bytes)
        )
    };
    if let Some(length) = announced
        && length > limits.archive_bytes
    {
        return Err(over(format!("the announced {length} bytes")));
    }
    let body = read_body(response.into_body(), limits.archive_bytes)
        .await
        .map_err(|e| causes(&e))?;
    if body.cut {
        return Err(over("the body".to_owned()));
    }
    Ok(body.bytes)
}

/// A body read up to a limit.
struct Body {
    bytes: Vec<u8>,
    /// The body went on past the limit; `bytes` holds only the first part.
    cut: bool,
}

async fn read_body(mut body: hyper::body::Incoming, limit: u64) -> Result<Body, hyper::Error> {
    use http_body_util::BodyExt;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if bytes.len().saturating_add(data.len()) > limit {
                return Ok(Body { bytes, cut: true });
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Body { bytes, cut: false })
}

/// Reads every package archive from its source.
pub async fn fetch(
    packages: &[PackageSpec],
    sources: &Sources,
    limits: &Limits,
) -> Result<Vec<Vec<u8>>, InitError> {
    let mut archives = Vec::with_capacity(packages.len());
    for package in packages {
        if let Some(url) = &package.source.url {
            archives.push(download(&package.name, url, limits).await?);
            continue;
        }
        let path = source_path(package, sources)?;
        archives.push(read_archive(&package.name, &path, limits)?);
    }
    Ok(archives)
}

/// An archive from a mounted source, refused past the limit for one.
fn read_archive(name: &str, path: &Path, limits: &Limits) -> Result<Vec<u8>, InitError> {
    use std::io::Read;
    let read = |source| InitError::Read {
        name: name.to_owned(),
        path: path.display().to_string(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(limits.archive_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > limits.archive_bytes {
        return Err(InitError::TooLarge {
            name: name.to_owned(),
            what: path.display().to_string(),
            limit: size(limits.archive_bytes),
            scope: "one archive",
        });
    }
    Ok(bytes)
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
    limits: &Limits,
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
    // Unpack everything before staging anything: a broken or oversized
    // archive fails the whole set.
    let mut staged = Staged {
        limits,
        bytes: verified.iter().map(|(_, b)| b.len() as u64).sum(),
        files: 0,
    };
    let mut unpacked = Vec::with_capacity(verified.len());
    for (name, bytes) in &verified {
        staged.check(name)?;
        unpacked.push(unpack(name, bytes, &mut staged)?);
    }
    std::fs::create_dir_all(target).map_err(|e| write(target, e))?;
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

/// What the package set stages so far, against its limits.
struct Staged<'a> {
    limits: &'a Limits,
    /// The archives' bytes and the files unpacked so far.
    bytes: u64,
    files: usize,
}

impl Staged<'_> {
    fn check(&self, name: &str) -> Result<(), InitError> {
        let over = |limit: String| InitError::TooLarge {
            name: name.to_owned(),
            what: "unpacking".to_owned(),
            limit,
            scope: "the package set (archives and files)",
        };
        if self.bytes > self.limits.staged_bytes {
            return Err(over(size(self.limits.staged_bytes)));
        }
        if self.files > self.limits.entries {
            return Err(over(format!("{}-file", self.limits.entries)));
        }
        Ok(())
    }
}

/// The files of a package archive, by relative path. Entries that would
/// land outside the package directory ("../", absolute paths) are refused,
/// and so are files past the limits: an entry's size is read, not
/// trusted from its header.
fn unpack(
    name: &str,
    bytes: &[u8],
    staged: &mut Staged,
) -> Result<Vec<(PathBuf, Vec<u8>)>, InitError> {
    use std::io::Read;
    let archive_error = |message: String| InitError::Archive {
        name: name.to_owned(),
        message,
    };
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| archive_error(e.to_string()))?;
    let limits = *staged.limits;
    let mut files = Vec::new();
    for i in 0..archive.len() {
        let entry = archive
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
        let too_large = || InitError::TooLarge {
            name: name.to_owned(),
            what: format!("entry {}", relative.display()),
            limit: size(limits.entry_bytes),
            scope: "one file",
        };
        if entry.size() > limits.entry_bytes {
            return Err(too_large());
        }
        staged.files += 1;
        let room = limits
            .entry_bytes
            .min(limits.staged_bytes.saturating_sub(staged.bytes));
        let mut content = Vec::new();
        entry
            .take(room.saturating_add(1))
            .read_to_end(&mut content)
            .map_err(|e| archive_error(e.to_string()))?;
        if content.len() as u64 > limits.entry_bytes {
            return Err(too_large());
        }
        staged.bytes += content.len() as u64;
        staged.check(name)?;
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
        let archives = fetch(packages, sources, &LIMITS).await?;
        install(packages, archives, target, &LIMITS)
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
    /// Small limits, so that the tests stay small.
    const TEST_LIMITS: Limits = Limits {
        archive_bytes: 64 * 1024,
        entry_bytes: 64 * 1024,
        entries: 100,
        staged_bytes: 256 * 1024,
        redirects: 5,
    };

    /// What the loopback server answers to one request.
    struct Reply {
        bytes: Vec<u8>,
        /// Keep the connection open after the reply, sending nothing more.
        hang: bool,
    }

    fn reply(status: &str, headers: &[(&str, String)], body: &[u8]) -> Reply {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (name, value) in headers {
            head += &format!("{name}: {value}\r\n");
        }
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            && !headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        {
            head += &format!("Content-Length: {}\r\n", body.len());
        }
        let mut bytes = format!("{head}\r\n").into_bytes();
        bytes.extend_from_slice(body);
        Reply { bytes, hang: false }
    }

    /// A body in chunked transfer encoding, `chunk` bytes a chunk.
    fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in body.chunks(chunk) {
            out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    /// An HTTP/1.1 server on loopback that answers every request with
    /// `answer(request head)`; its base URL.
    async fn serve(answer: impl Fn(&str) -> Reply + Send + Sync + 'static) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let answer = std::sync::Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = answer(&String::from_utf8_lossy(&head));
                    let _ = stream.write_all(&reply.bytes).await;
                    if reply.hang {
                        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                    }
                });
            }
        });
        format!("http://{address}")
    }

    fn url_package(name: &str, url: &str, content: &[u8]) -> PackageSpec {
        PackageSpec {
            source: PackageSource {
                image: None,
                url: Some(url.to_owned()),
                config_map: None,
            },
            ..package(name, content)
        }
    }

    async fn fetch_url(url: &str) -> Result<Vec<Vec<u8>>, InitError> {
        let (sources, _) = setup(&unique_dir_name(), &[]);
        let packages = [url_package("A", url, b"")];
        let fetched = fetch(&packages, &sources, &TEST_LIMITS);
        tokio::time::timeout(std::time::Duration::from_secs(10), fetched)
            .await
            .expect("an answer within 10 s")
    }

    /// The error of a fetch that must fail (a success is reported by size).
    fn refused(result: Result<Vec<Vec<u8>>, InitError>) -> InitError {
        match result {
            Ok(archives) => panic!(
                "fetched {:?} bytes",
                archives.iter().map(Vec::len).collect::<Vec<_>>()
            ),
            Err(e) => e,
        }
    }

    fn unique_dir_name() -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        format!(
            "url-{}",
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    #[tokio::test]
    async fn an_announced_oversized_download_is_refused_without_reading_it() {
        let base = serve(|_| Reply {
            hang: true,
            ..reply("200 OK", &[("Content-Length", "1000000".into())], b"PK")
        })
        .await;
        let err = refused(fetch_url(&format!("{base}/big.zip")).await);
        let text = err.to_string();
        assert!(text.contains("1000000 bytes"), "{text}");
        assert!(text.contains("64 KiB limit"), "{text}");
    }

    #[tokio::test]
    async fn a_chunked_download_past_the_limit_is_cut_off() {
        let body = vec![7u8; 1024 * 1024];
        let base = serve(move |_| {
            reply(
                "200 OK",
                &[("Transfer-Encoding", "chunked".into())],
                &chunked(&body, 16 * 1024),
            )
        })
        .await;
        let err = refused(fetch_url(&format!("{base}/big.zip")).await);
        assert!(err.to_string().contains("64 KiB limit"), "{err}");
    }

    /// A zip with `files` entries of `size` zero bytes each, deflated to
    /// almost nothing.
    fn bomb(files: usize, size: usize) -> Vec<u8> {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let zeros = vec![0u8; size];
        for i in 0..files {
            zip.start_file(format!("f{i}"), options).expect("entry");
            zip.write_all(&zeros).expect("write");
        }
        zip.finish().expect("finish").into_inner()
    }

    #[tokio::test]
    async fn a_zip_bomb_installs_nothing() {
        // One file far past the limit for a file.
        let one = bomb(1, 4 * 1024 * 1024);
        assert!(one.len() < 64 * 1024, "the archive itself is small");
        let target = dir("bomb-one").join("packages");
        let err =
            install(&[package("A", &one)], vec![one], &target, &TEST_LIMITS).expect_err("a bomb");
        assert!(
            err.to_string().contains("64 KiB limit for one file"),
            "{err}"
        );
        assert!(!target.join("A.zip").exists());
        // Files each within the limit, together past the set's.
        let many = bomb(8, 60 * 1024);
        let target = dir("bomb-many").join("packages");
        let err =
            install(&[package("A", &many)], vec![many], &target, &TEST_LIMITS).expect_err("a bomb");
        assert!(
            err.to_string()
                .contains("256 KiB limit for the package set"),
            "{err}"
        );
        assert!(!target.join("A.zip").exists());
    }

    #[tokio::test]
    async fn an_entry_outside_the_package_directory_installs_nothing() {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        zip.start_file("../../etc/evil", zip::write::SimpleFileOptions::default())
            .expect("entry");
        zip.write_all(b"x").expect("write");
        let evil = zip.finish().expect("finish").into_inner();
        let root = dir("traversal");
        let err = install(
            &[package("A", &evil)],
            vec![evil],
            &root.join("a").join("packages"),
            &TEST_LIMITS,
        )
        .expect_err("traversal");
        assert!(
            err.to_string().contains("points outside the package"),
            "{err}"
        );
        assert!(!root.join("etc").exists());
    }

    /// A server with a chain of `hops` redirects before /p.zip; the URL of
    /// the first.
    async fn redirects(hops: usize, content: Vec<u8>) -> String {
        serve(move |head| {
            let path = head
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            match path
                .strip_prefix("/r/")
                .and_then(|n| n.parse::<usize>().ok())
            {
                // Relative and absolute-path Locations, and each 3xx kind.
                Some(n) if n + 1 < hops => {
                    let status = [
                        "301 Moved Permanently",
                        "302 Found",
                        "303 See Other",
                        "307 Temporary Redirect",
                        "308 Permanent Redirect",
                    ][n % 5];
                    let location = if n % 2 == 0 {
                        format!("{}", n + 1)
                    } else {
                        format!("/r/{}", n + 1)
                    };
                    reply(status, &[("Location", location)], b"")
                }
                Some(_) => reply("302 Found", &[("Location", "/p.zip".into())], b""),
                None if path == "/p.zip" => reply("200 OK", &[], &content),
                None => reply("404 Not Found", &[], b""),
            }
        })
        .await
    }

    #[test]
    fn a_redirect_may_not_leave_https_or_go_to_another_scheme() {
        let url = |u: &str| url::Url::parse(u).expect("url");
        let found = hyper::StatusCode::FOUND;
        let to = |from: &str, location: &[u8]| {
            let location = hyper::header::HeaderValue::from_bytes(location).expect("header");
            redirect_target(&url(from), found, &location)
        };
        assert_eq!(
            to("http://a/p/x.zip", b"y.zip").expect("relative"),
            url("http://a/p/y.zip")
        );
        assert_eq!(
            to("http://a/x.zip", b"https://b/x.zip").expect("up to https"),
            url("https://b/x.zip")
        );
        let refused = to("https://a/x.zip", b"http://a/x.zip").expect_err("down to http");
        assert!(
            refused.contains("from https to http, which is refused"),
            "{refused}"
        );
        let refused = to("http://a/x.zip", b"file:///etc/passwd").expect_err("file");
        assert!(
            refused.contains("to a file URL, which is refused"),
            "{refused}"
        );
        let refused = to("http://a/x.zip", b"\xff").expect_err("not text");
        assert!(refused.contains("Location that is not text"), "{refused}");
    }

    #[tokio::test]
    async fn redirects_are_followed_up_to_the_limit() {
        let a = archive("a");
        let base = redirects(5, a.clone()).await;
        let fetched = fetch_url(&format!("{base}/r/0"))
            .await
            .expect("5 redirects");
        assert_eq!(fetched, std::slice::from_ref(&a));
        let base = redirects(6, a).await;
        let err = refused(fetch_url(&format!("{base}/r/0")).await);
        assert!(err.to_string().contains("more than 5 redirects"), "{err}");
    }

    #[tokio::test]
    async fn url_credentials_never_reach_the_error() {
        // An unreachable server: the error names the URL.
        let err = refused(fetch_url("https://user:pass@127.0.0.1:1/p.zip?token=x").await);
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:1/p.zip"), "{text}");
        assert!(
            !text.contains("pass") && !text.contains("token=x"),
            "{text}"
        );
        // A server that echoes the request (path, query, Authorization).
        let base = serve(|head| reply("403 Forbidden", &[], head.as_bytes())).await;
        let url = base.replace("http://", "http://user:pass@") + "/p.zip?token=x";
        let text = refused(fetch_url(&url).await).to_string();
        assert!(text.contains("403"), "{text}");
        for secret in ["pass", "token=x", "dXNlcjpwYXNz"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }

    /// The value of header `name` in a request head.
    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn url_credentials_are_sent_as_basic_auth_to_their_origin_only() {
        let a = archive("a");
        let served = a.clone();
        // Another origin (port), which must not see the credentials.
        let elsewhere = serve(move |head| match header(head, "authorization") {
            None => reply("200 OK", &[], &served),
            Some(_) => reply("400 Bad Request", &[], b"credentials leaked"),
        })
        .await;
        let base = serve(move |head| {
            let redirect = head.starts_with("GET /go ");
            match header(head, "authorization") {
                Some("Basic dXNlcjpwYXNz") if redirect => reply(
                    "302 Found",
                    &[("Location", format!("{elsewhere}/p.zip"))],
                    b"",
                ),
                Some("Basic dXNlcjpwYXNz") => reply("200 OK", &[], b"direct"),
                _ => reply("401 Unauthorized", &[], b""),
            }
        })
        .await;
        let with_user = base.replace("http://", "http://user:pass@");
        let direct = fetch_url(&format!("{with_user}/p.zip")).await;
        assert_eq!(direct.expect("authorized"), [b"direct".to_vec()]);
        let redirected = fetch_url(&format!("{with_user}/go")).await;
        assert_eq!(redirected.expect("redirected"), [a]);
    }
}
