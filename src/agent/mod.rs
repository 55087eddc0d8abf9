//! The in-pod agent. It talks only to the Kubernetes API (its own pod) and
//! to its own server on loopback: the operator writes the desired state as
//! a pod annotation, the agent quiesces or resumes the server through the
//! profile's hooks and reports what the server does as pod annotations.

pub mod hooks;
pub mod init;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::naming::annotations;
use hooks::Hooks;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading pod {pod}: {source}")]
    ReadPod {
        pod: String,
        #[source]
        source: kube::Error,
    },
}

/// What the agent reports, as it appears in the pod's annotations.
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

impl Report {
    fn annotations(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::from([
            (
                annotations::SERVER_STATE.to_owned(),
                if self.quiesced { "quiesced" } else { "online" }.to_owned(),
            ),
            (
                annotations::SERVER_HEALTHY.to_owned(),
                self.healthy.to_string(),
            ),
        ]);
        if let Some(n) = self.in_flight {
            map.insert(annotations::IN_FLIGHT.to_owned(), n.to_string());
        }
        if let Some(digest) = &self.installed_packages {
            map.insert(annotations::INSTALLED_PACKAGES.to_owned(), digest.clone());
        }
        if let Some(digest) = &self.config_files {
            map.insert(annotations::CONFIG_FILES.to_owned(), digest.clone());
        }
        map
    }

    /// The report a pod carries, if its agent wrote one.
    pub fn of(pod: &Pod) -> Option<Report> {
        let a = pod.metadata.annotations.as_ref()?;
        let state = a.get(annotations::SERVER_STATE)?;
        Some(Report {
            quiesced: state == "quiesced",
            in_flight: a.get(annotations::IN_FLIGHT).and_then(|n| n.parse().ok()),
            healthy: a
                .get(annotations::SERVER_HEALTHY)
                .is_some_and(|h| h == "true"),
            installed_packages: a.get(annotations::INSTALLED_PACKAGES).cloned(),
            config_files: a.get(annotations::CONFIG_FILES).cloned(),
        })
    }
}

/// Publishes a Warning Event about this pod; best effort, since the agent
/// may lack a working client exactly when something went wrong.
pub async fn publish_pod_event(pod: &str, namespace: &str, reason: &str, note: &str) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let Ok(client) = Client::try_default().await else {
        return;
    };
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(pod.into()),
        namespace: Some(namespace.into()),
        ..Default::default()
    };
    let recorder = Recorder::new(client, Reporter::from("integration-operator-agent"));
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "InstallPackages".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        warn!(pod, error = %e, "publishing the event failed");
    }
}

/// Where the agent finds the package list and the installed packages.
#[derive(Clone, Debug)]
pub struct Packages {
    pub list: std::path::PathBuf,
    pub installed: std::path::PathBuf,
    /// The mounted configuration directory (the operator's ConfigMap).
    pub config_dir: std::path::PathBuf,
}

/// The configuration files in a mounted ConfigMap directory, by name.
/// The kubelet's own entries (`..data`, `..<timestamp>`) are skipped.
fn config_files(dir: &std::path::Path) -> Option<BTreeMap<String, String>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut files = BTreeMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            continue;
        }
        let Ok(content) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        files.insert(name, content);
    }
    Some(files)
}

/// How often the installed packages are checksummed again.
const PACKAGE_CHECK: Duration = Duration::from_secs(30);

/// Runs the sidecar loop until the process is stopped.
pub async fn watch(
    client: Client,
    namespace: &str,
    pod_name: &str,
    hooks: Hooks,
    packages: Packages,
    interval: Duration,
) -> Result<(), AgentError> {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let mut quiesced = false;
    let mut first = true;
    let mut installed: Option<String> = None;
    let mut files: Option<String> = None;
    let mut checked: Option<tokio::time::Instant> = None;
    info!(pod = pod_name, server = %hooks.address, "agent watching");
    loop {
        let pod = pods
            .get(pod_name)
            .await
            .map_err(|source| AgentError::ReadPod {
                pod: pod_name.to_owned(),
                source,
            })?;
        if first {
            quiesced = Report::of(&pod).is_some_and(|r| r.quiesced);
            first = false;
        }
        let want_offline = pod
            .annotations()
            .get(annotations::DESIRED_STATE)
            .is_some_and(|s| s == "offline");
        if want_offline && !quiesced {
            match hooks.quiesce().await {
                Ok(()) => {
                    quiesced = true;
                    info!(pod = pod_name, "server quiesced");
                }
                Err(e) => warn!(pod = pod_name, error = %e, "quiesce failed"),
            }
        } else if !want_offline && quiesced {
            match hooks.resume().await {
                Ok(()) => {
                    quiesced = false;
                    info!(pod = pod_name, "server resumed");
                }
                Err(e) => warn!(pod = pod_name, error = %e, "resume failed"),
            }
        }
        let in_flight = match hooks.in_flight().await {
            Ok(n) => Some(n),
            Err(e) => {
                warn!(pod = pod_name, error = %e, "reading in-flight work failed");
                None
            }
        };
        if checked.is_none_or(|t| t.elapsed() > PACKAGE_CHECK) {
            installed = init::read_list(&packages.list).ok().map(|list| {
                init::installed_digest(&list, &packages.installed)
                    .unwrap_or_else(|| "incomplete".to_owned())
            });
            files = config_files(&packages.config_dir)
                .map(|data| crate::render::files_digest(&data, pod_name));
            checked = Some(tokio::time::Instant::now());
        }
        let report = Report {
            quiesced,
            in_flight,
            healthy: hooks.healthy().await,
            installed_packages: installed.clone(),
            config_files: files.clone(),
        };
        if Report::of(&pod).as_ref() != Some(&report) {
            let patch = serde_json::json!({"metadata": {"annotations": report.annotations()}});
            if let Err(e) = pods
                .patch(pod_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                warn!(pod = pod_name, error = %e, "reporting failed");
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IntegrationCluster;

    #[test]
    fn the_agent_computes_the_operators_files_digest_from_a_mounted_configmap() {
        let path = format!(
            "{}/manifests/samples/generic.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut ic: IntegrationCluster =
            serde_saphyr::from_str(&std::fs::read_to_string(path).expect("sample"))
                .expect("parses");
        ic.metadata.namespace = Some("prod".into());
        let cluster = crate::validation::validate(&ic, &[]).expect("valid");
        let rendered = crate::render::render(&ic, &cluster, None);
        // What the kubelet mounts: one file per key, plus its own entries.
        let dir = std::env::temp_dir().join(format!("agent-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..2026_11_23_00_00_00.1")).expect("dir");
        for (name, content) in &rendered.data {
            std::fs::write(dir.join(name), content).expect("write");
        }
        let mounted = config_files(&dir).expect("readable");
        assert_eq!(
            crate::render::files_digest(&mounted, "catalog-1"),
            rendered.files_digest("catalog-1")
        );
    }
}
