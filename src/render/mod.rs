//! Rendered configuration: what every server reads, as a pure function of
//! the validated cluster. One ConfigMap holds the cluster-wide files and one
//! file per node; the digests of this data and of the package set are
//! stamped on every pod, so any difference between a pod and the spec is
//! visible as a digest mismatch.
//!
//! Secrets never pass through here: `configFrom` Secrets are mounted, and
//! only their names are part of the digest.

mod generic;
pub mod webmethods_is;
pub mod wso2_carbon;

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::api::{IntegrationCluster, Profile};
use crate::database::Endpoint;
use crate::validation::ValidatedCluster;

/// Environment variables with the cluster role's credentials, from its
/// Secret; the rendered files refer to them.
pub const DB_USERNAME_ENV: &str = "DB_USERNAME";
pub const DB_PASSWORD_ENV: &str = "DB_PASSWORD";

/// The package list `agent init` installs.
pub const PACKAGES_FILE: &str = "packages.json";

/// Where the rendered ConfigMap is mounted in every server container.
pub const CONFIG_DIR: &str = "/etc/integration/config";

/// Where the agent finds the package list in its pod.
pub fn packages_path() -> std::path::PathBuf {
    std::path::Path::new(CONFIG_DIR).join(PACKAGES_FILE)
}

/// The rendered configuration of a cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// ConfigMap data: file name → content.
    pub data: BTreeMap<String, String>,
    /// Digest of the cluster-wide files and the pod-template fields of the
    /// spec: the same for every node (shown in status).
    pub config_digest: String,
    /// Per node: the cluster-wide digest combined with the node's own file,
    /// so that scaling (which adds node files) touches no running node.
    pub node_digests: BTreeMap<String, String>,
    /// Digest of the package set.
    pub packages_digest: String,
}

impl Rendered {
    /// The digest of the files `node` reads, as its agent computes it over
    /// the mounted ConfigMap.
    pub fn files_digest(&self, node: &str) -> String {
        files_digest(&self.data, node)
    }
}

/// Digest of the configuration files one node reads: every file but the
/// other nodes' own files, so that scaling (which adds node files) does not
/// change it for running nodes.
pub fn files_digest(data: &BTreeMap<String, String>, node: &str) -> String {
    let own = node_file(node);
    let files: BTreeMap<&String, &String> = data
        .iter()
        .filter(|(name, _)| {
            **name == own || !(name.starts_with("node-") && name.ends_with(".properties"))
        })
        .collect();
    digest(&files)
}

/// The file that holds one node's own settings.
pub fn node_file(node: &str) -> String {
    format!("node-{node}.properties")
}

/// Renders the configuration of `ic` for its profile.
/// What rendering needs besides the spec, read from the cluster by the
/// controller.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inputs<'a> {
    /// Where the cluster database is, once known; credentials stay in
    /// their Secret and reach the servers as the environment variables
    /// [`DB_USERNAME_ENV`] and [`DB_PASSWORD_ENV`].
    pub database: Option<&'a Endpoint>,
    /// Digest of the contents of the `configFrom` ConfigMaps and Secrets,
    /// so that changing one (a rotated Secret) rolls the servers.
    pub config_sources: Option<&'a str>,
}

/// Renders the cluster's files and digests.
pub fn render(ic: &IntegrationCluster, cluster: &ValidatedCluster, inputs: &Inputs) -> Rendered {
    let database = inputs.database;
    let mut data = match ic.spec.profile {
        Profile::WebmethodsIs => webmethods_is::render(ic, cluster, database),
        Profile::Wso2Carbon => wso2_carbon::render(ic, cluster, database),
        Profile::Generic => generic::render(ic, cluster, database),
    };
    // The package list for the agent's init step (no secrets in it).
    data.insert(
        PACKAGES_FILE.to_owned(),
        serde_json::to_string_pretty(&ic.spec.packages).unwrap_or_default() + "\n",
    );
    for (name, content) in &ic.spec.server.files {
        data.entry(name.clone()).or_insert_with(|| content.clone());
    }
    let node_files: BTreeMap<&str, String> = cluster
        .members
        .iter()
        .map(|m| (m.name.as_str(), node_file(&m.name)))
        .collect();
    let shared: BTreeMap<String, String> = data
        .iter()
        .filter(|(k, _)| !node_files.values().any(|f| f == *k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let config_digest = config_digest(ic, &shared, inputs.config_sources);
    let node_digests = node_files
        .iter()
        .map(|(node, file)| {
            let own = data.get(file).map(String::as_str).unwrap_or_default();
            (node.to_string(), digest(&(&config_digest, own)))
        })
        .collect();
    let packages_digest = packages_digest(&ic.spec.packages);
    Rendered {
        data,
        config_digest,
        node_digests,
        packages_digest,
    }
}

/// The spec fields that end up in a pod besides the rendered files. A
/// change to any of them must replace the pods, so they share the digest.
#[derive(Serialize)]
struct PodInputs<'a> {
    data: &'a BTreeMap<String, String>,
    image: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_pull_policy: &'a Option<crate::api::PullPolicy>,
    ports: &'a crate::api::PortsSpec,
    env: &'a BTreeMap<String, String>,
    config_from: &'a [crate::api::ConfigSource],
    /// Absent without configFrom, so clusters without it keep their digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    config_sources: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: &'a Option<crate::api::HealthSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: &'a Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    #[serde(skip_serializing_if = "Option::is_none")]
    storage: &'a Option<crate::api::StorageSpec>,
    pod_labels: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: &'a Option<crate::api::AgentSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hooks: &'a Option<crate::api::HooksSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_secret: &'a Option<crate::api::LocalObjectRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduling: &'a Option<crate::api::SchedulingSpec>,
}

fn config_digest(
    ic: &IntegrationCluster,
    data: &BTreeMap<String, String>,
    config_sources: Option<&str>,
) -> String {
    let spec = &ic.spec;
    digest(&PodInputs {
        data,
        config_sources,
        image: &spec.image,
        image_pull_policy: &spec.image_pull_policy,
        ports: &spec.server.ports,
        env: &spec.server.env,
        config_from: &spec.server.config_from,
        health: &spec.server.health,
        resources: &spec.resources,
        storage: &spec.storage,
        pod_labels: &spec.pod_labels,
        agent: &spec.agent,
        hooks: &spec.server.hooks,
        admin_secret: &spec.server.admin_secret_ref,
        scheduling: &spec.scheduling,
    })
}

/// The digest of a package set; the agent computes the same over what it
/// finds installed, so both sides agree without talking.
pub fn packages_digest(packages: &[crate::api::PackageSpec]) -> String {
    digest(packages)
}

/// The digest of one rendered file, in the same form as the other digests,
/// for objects whose configuration is a single file (the managed cache's
/// tc-config.xml): stamped on their pod template so a change rolls them.
pub fn text_digest(text: &str) -> String {
    digest(text)
}

/// First 16 hex digits of the SHA-256 of the JSON form: stable because
/// every map involved is a BTreeMap.
fn digest<T: Serialize + ?Sized>(value: &T) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    Sha256::digest(&json)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A `key=value` line of a Java properties file, escaped so that any value
/// reads back as written.
fn property(key: &str, value: &str) -> String {
    let escape = |s: &str, is_key: bool| {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '=' | ':' | ' ' | '#' | '!' if is_key => {
                    out.push('\\');
                    out.push(c);
                }
                _ => out.push(c),
            }
        }
        out
    };
    format!("{}={}\n", escape(key, true), escape(value, false))
}

/// The header every rendered file starts with.
fn header(ic: &IntegrationCluster, comment: &str) -> String {
    format!(
        "{comment} Rendered by integration-operator for {}/{}; edits are replaced.\n",
        ic.metadata.namespace.as_deref().unwrap_or_default(),
        ic.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Terracotta BigMemory Max client port (IS/MSR TSA URLs use it).
pub const TSA_PORT: u16 = 9510;

/// The cache URLs the servers connect to: the managed Terracotta servers'
/// stable DNS names, or the external URLs as given.
pub fn cache_urls(ic: &IntegrationCluster) -> Vec<String> {
    use crate::api::CacheMode;
    let Some(cache) = &ic.spec.cache else {
        return Vec::new();
    };
    match cache.mode {
        CacheMode::None => Vec::new(),
        CacheMode::External => cache
            .external
            .iter()
            .flat_map(|e| e.urls.iter().map(|u| u.0.clone()))
            .collect(),
        CacheMode::Managed => {
            let name = ic.metadata.name.as_deref().unwrap_or_default();
            let ns = ic.metadata.namespace.as_deref().unwrap_or_default();
            let replicas = cache.managed.as_ref().map_or(2, |m| m.replicas);
            (0..u32::try_from(replicas).unwrap_or(0))
                .map(|i| format!("{}:{TSA_PORT}", crate::naming::cache_host(name, ns, i)))
                .collect()
        }
    }
}

#[cfg(test)]
pub(crate) mod golden;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_escaped() {
        assert_eq!(property("a b", "x=y\\z\n"), "a\\ b=x=y\\\\z\\n\n");
    }

    #[test]
    fn digests_are_stable_and_sensitive() {
        let a = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let b = BTreeMap::from([("k".to_owned(), "w".to_owned())]);
        assert_eq!(digest(&a), digest(&a.clone()));
        assert_ne!(digest(&a), digest(&b));
        assert_eq!(digest(&a).len(), 16);
    }
}
