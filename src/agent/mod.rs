//! The in-pod agent. It talks only to the Kubernetes API (its own pod) and
//! to its own server on loopback: the operator writes the desired state as
//! a pod annotation, the agent quiesces or resumes the server through the
//! profile's hooks and reports what the server does as pod annotations.

pub mod hooks;
pub mod init;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::api::ListenerSpec;
use crate::listeners::{ListenerHooks, Listeners};
use crate::protocol::{Desired, Report};
use hooks::Hooks;

/// Field manager of the agent's writes (its pod's report, listener Leases).
pub const FIELD_MANAGER: &str = "integration-agent";

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

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

/// Publishes a Warning Event about this pod; best effort, since the agent
/// may lack a working client exactly when something went wrong.
pub async fn publish_pod_event(pod: &str, namespace: &str, reason: &str, note: &str) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let Ok(client) = crate::kube_client::for_requests_inferred().await else {
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

/// The listeners an agent runs and how it reaches the database for
/// multi-node claims.
#[derive(Clone, Debug, Default)]
pub struct ListenerSetup {
    pub specs: Vec<ListenerSpec>,
    pub paths: ListenerHooks,
    /// Loopback address of the claim endpoint and the cluster role's
    /// connection, for multi-node listeners.
    pub claims: Option<(std::net::SocketAddr, sqlx::postgres::PgConnectOptions)>,
}

/// Whether the operator has this node online: its gate is True, it is not
/// asked to go offline and not being deleted. Only online nodes contend
/// for listeners.
fn online(pod: &Pod) -> bool {
    let gate = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == crate::protocol::ONLINE_CONDITION && c.status == "True")
        });
    let offline = Desired::of(pod) == Desired::Offline;
    gate && !offline && pod.metadata.deletion_timestamp.is_none()
}

/// Runs the sidecar loop until `shutdown` turns true; listeners are
/// disabled and their Leases released before it returns.
#[allow(clippy::too_many_arguments)]
pub async fn watch(
    client: Client,
    namespace: &str,
    pod_name: &str,
    hooks: Hooks,
    packages: Packages,
    interval: Duration,
    setup: ListenerSetup,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut quiesced = false;
    let mut first = true;
    let mut installed: Option<String> = None;
    let mut files: Option<String> = None;
    let mut checked: Option<tokio::time::Instant> = None;
    let (eligible_tx, eligible_rx) = tokio::sync::watch::channel(false);
    let mut listeners: Option<(Arc<Listeners>, tokio::task::JoinHandle<()>)> = None;
    let mut claims: Option<tokio::task::JoinHandle<()>> = None;
    // The UID of the pod this agent started in: a pod of the same name with
    // another UID is a successor, and this agent no longer contends.
    let mut uid: Option<String> = None;
    info!(pod = pod_name, server = %hooks.address, "agent watching");
    loop {
        if *shutdown.borrow() {
            break;
        }
        // The API may be away for a while; the listeners' own deadlines
        // keep them safe, so the agent waits instead of exiting.
        let pod = match pods.get(pod_name).await {
            Ok(pod) => pod,
            Err(source) => {
                warn!(error = %AgentError::ReadPod { pod: pod_name.to_owned(), source }, "will retry");
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        if first {
            quiesced = Report::of(&pod).is_some_and(|r| r.quiesced);
            first = false;
            uid = pod.metadata.uid.clone();
            let cluster = pod.labels().get(crate::naming::labels::CLUSTER).cloned();
            if let (Some(cluster), false) = (cluster, setup.specs.is_empty()) {
                let shared = Arc::new(Listeners {
                    leases: Api::namespaced(client.clone(), namespace),
                    me: crate::listeners::holder_identity(
                        pod_name,
                        uid.as_deref().unwrap_or_default(),
                    ),
                    cluster,
                    hooks: hooks.clone(),
                    paths: setup.paths.clone(),
                    holding: Default::default(),
                });
                let task = tokio::spawn(crate::listeners::run(
                    shared.clone(),
                    setup.specs.clone(),
                    eligible_rx.clone(),
                    shutdown.clone(),
                ));
                listeners = Some((shared, task));
            }
            if let Some((address, options)) = setup.claims.clone() {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .connect_lazy_with(options);
                let node = pod_name.to_owned();
                claims = Some(tokio::spawn(async move {
                    if let Err(e) = crate::listeners::claims::serve(address, pool, node).await {
                        warn!(%address, error = %e, "claim endpoint stopped");
                    }
                }));
            }
        }
        eligible_tx.send_if_modified(|was| {
            let now = online(&pod) && pod.metadata.uid == uid;
            let changed = *was != now;
            *was = now;
            changed
        });
        let want_offline = Desired::of(&pod) == Desired::Offline;
        // A node going offline hands its listeners over first.
        let handing_over = listeners.as_ref().is_some_and(|(l, _)| l.holds_any());
        if want_offline && !quiesced && handing_over {
            info!(pod = pod_name, "handing listeners over before quiescing");
        } else if want_offline && !quiesced {
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
                .patch(pod_name, &patch_params(), &Patch::Merge(&patch))
                .await
            {
                warn!(pod = pod_name, error = %e, "reporting failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
    }
    if let Some(claims) = claims {
        claims.abort();
    }
    if let Some((_, task)) = listeners {
        // The listener tasks saw the shutdown too: they disable and release.
        if tokio::time::timeout(crate::listeners::RELEASE_TIMEOUT, task)
            .await
            .is_err()
        {
            warn!(pod = pod_name, "listeners did not release in time");
        }
    }
    Ok(())
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
        let rendered = crate::render::render(&ic, &cluster, &Default::default());
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
