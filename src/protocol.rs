//! What the operator and the in-pod agent say to each other, and nothing
//! else: they talk only through the server pod. The operator writes the
//! online gate (a pod condition) and the desired state; the agent writes
//! its [`Report`]. Both sides use these types, so no other module spells an
//! annotation or its values.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// Annotation keys on server pods.
pub mod keys {
    /// Operator: digest of the configuration the pod was made from.
    pub const CONFIG_DIGEST: &str = "integration.dev/config-digest";
    /// Operator: digest of the package set the pod was made with.
    pub const PACKAGES_DIGEST: &str = "integration.dev/packages-digest";
    /// Operator → agent: [`super::Desired`].
    pub const DESIRED_STATE: &str = "integration.dev/desired-state";
    /// Agent → operator: `online` or `quiesced`.
    pub const SERVER_STATE: &str = "integration.dev/server-state";
    /// Agent → operator: requests the server is still working on.
    pub const IN_FLIGHT: &str = "integration.dev/in-flight";
    /// Agent → operator: digest of the package set found installed, or
    /// `incomplete`.
    pub const INSTALLED_PACKAGES: &str = "integration.dev/installed-packages";
    /// Agent → operator: digest of the configuration files the node reads,
    /// as mounted in the pod.
    pub const CONFIG_FILES: &str = "integration.dev/config-files";
    /// Agent → operator: `true` when the server's health endpoint answers.
    pub const SERVER_HEALTHY: &str = "integration.dev/server-healthy";
}

/// Pod condition the operator owns: True means the node is online and may
/// get client traffic (a readiness gate on every server pod).
pub const ONLINE_CONDITION: &str = "integration.dev/online";

/// What the operator asks of a node's server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    /// Serve (resume a quiesced server).
    Online,
    /// Quiesce: finish the work in flight, take no new work.
    Offline,
}

impl std::fmt::Display for Desired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Desired {
    fn as_str(self) -> &'static str {
        match self {
            Desired::Online => "online",
            Desired::Offline => "offline",
        }
    }

    /// What the operator asked of the pod's server; online until it asks
    /// otherwise.
    pub fn of(pod: &Pod) -> Desired {
        let offline = annotation(pod, keys::DESIRED_STATE) == Some(Desired::Offline.as_str());
        if offline {
            Desired::Offline
        } else {
            Desired::Online
        }
    }

    /// The merge patch that asks for this state.
    pub fn patch(self) -> serde_json::Value {
        serde_json::json!({"metadata": {"annotations": {keys::DESIRED_STATE: self.as_str()}}})
    }
}

/// What the agent reports about its server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub quiesced: bool,
    pub in_flight: Option<u64>,
    pub healthy: bool,
    /// Digest of the package set installed, `incomplete` when a package is
    /// missing or altered, None when the agent has no package list.
    pub installed_packages: Option<String>,
    /// Digest of the configuration files mounted in the pod.
    pub config_files: Option<String>,
}

const QUIESCED: &str = "quiesced";
const SERVING: &str = "online";

impl Report {
    /// The annotations that carry the report.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let state = if self.quiesced { QUIESCED } else { SERVING };
        let mut map = BTreeMap::from([
            (keys::SERVER_STATE.to_owned(), state.to_owned()),
            (keys::SERVER_HEALTHY.to_owned(), self.healthy.to_string()),
        ]);
        if let Some(n) = self.in_flight {
            map.insert(keys::IN_FLIGHT.to_owned(), n.to_string());
        }
        if let Some(digest) = &self.installed_packages {
            map.insert(keys::INSTALLED_PACKAGES.to_owned(), digest.clone());
        }
        if let Some(digest) = &self.config_files {
            map.insert(keys::CONFIG_FILES.to_owned(), digest.clone());
        }
        map
    }

    /// The report a pod carries, if its agent wrote one.
    pub fn of(pod: &Pod) -> Option<Report> {
        let state = annotation(pod, keys::SERVER_STATE)?;
        Some(Report {
            quiesced: state == QUIESCED,
            in_flight: annotation(pod, keys::IN_FLIGHT).and_then(|n| n.parse().ok()),
            healthy: annotation(pod, keys::SERVER_HEALTHY) == Some("true"),
            installed_packages: annotation(pod, keys::INSTALLED_PACKAGES).map(str::to_owned),
            config_files: annotation(pod, keys::CONFIG_FILES).map(str::to_owned),
        })
    }
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_with(annotations: BTreeMap<String, String>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.annotations = Some(annotations);
        pod
    }

    #[test]
    fn a_report_reads_back_as_written() {
        let report = Report {
            quiesced: true,
            in_flight: Some(3),
            healthy: true,
            installed_packages: Some("sha256:1".into()),
            config_files: None,
        };
        assert_eq!(Report::of(&pod_with(report.annotations())), Some(report));
        assert_eq!(Report::of(&Pod::default()), None);
    }

    #[test]
    fn the_desired_state_reads_back_as_patched() {
        for desired in [Desired::Online, Desired::Offline] {
            let patch = desired.patch();
            let annotations: BTreeMap<String, String> =
                serde_json::from_value(patch["metadata"]["annotations"].clone()).expect("map");
            assert_eq!(Desired::of(&pod_with(annotations)), desired);
        }
        assert_eq!(Desired::of(&Pod::default()), Desired::Online);
    }
}
