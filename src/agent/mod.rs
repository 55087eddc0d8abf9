//! The in-pod agent. It talks only to the Kubernetes API (its own pod and
//! its listeners' Leases) and to its own server on loopback: the operator
//! writes the desired state as a pod annotation, the agent (watching its
//! pod) quiesces or resumes the server through the profile's hooks and
//! reports what the server does as pod annotations. Its tasks run in a set
//! it supervises ([`tasks`]): when one ends, the agent steps its listeners
//! down and exits.

pub mod hooks;
pub mod init;
mod node;
pub mod tasks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PatchParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::api::ListenerSpec;
use crate::listeners::{ListenerHooks, Listeners};
use crate::protocol::Desired;
use hooks::Hooks;
use node::Node;
use tasks::{Seen, Task, TaskEnd, Tasks};

/// Field manager of the agent's writes (its pod's report, listener Leases).
pub const FIELD_MANAGER: &str = "integration-agent";

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

/// Why the agent stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the {task} task ended: {end}")]
    TaskEnded {
        task: Task,
        #[source]
        end: TaskEnd,
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

/// The sidecar: what it talks to and how often it looks at its server.
pub struct Agent {
    /// Client for requests (reports, Leases).
    pub requests: Client,
    /// Client for the watch on the agent's pod (see [`crate::kube_client`]).
    pub watches: Client,
    pub namespace: String,
    pub pod: String,
    pub hooks: Hooks,
    pub packages: Packages,
    /// How often the server's in-flight work and health are read again;
    /// changes of the pod are acted on as they come.
    pub interval: Duration,
    pub listeners: ListenerSetup,
}

impl Agent {
    /// Runs until `shutdown` turns true, or until one of its tasks ends on
    /// its own (an error: the container should be restarted). Either way
    /// the listeners are disabled and their Leases released first.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let (stop, stopping) = watch::channel(false);
        let (latest_tx, latest) = watch::channel(Seen::Nothing);
        let mut tasks = Tasks::default();
        let pods = Api::namespaced(self.watches.clone(), &self.namespace);
        tasks.spawn(
            Task::PodWatch,
            tasks::watch_pod(pods, self.pod.clone(), latest_tx),
        );
        // The claim endpoint needs nothing from the pod: it starts at
        // once, so a port it cannot have ends the agent at once.
        if let Some((address, options)) = self.listeners.claims.clone() {
            tasks.spawn(
                Task::ClaimEndpoint,
                tasks::serve_claims(address, options, self.pod.clone()),
            );
        }
        info!(pod = %self.pod, server = %self.hooks.address, "agent watching");
        let mut running = Running {
            agent: &self,
            tasks,
            node: None,
            listeners: None,
            eligible: watch::channel(false).0,
            stopping,
            gone: false,
        };
        let ended = running.follow(latest, shutdown).await;
        if let Some((task, end)) = &ended {
            error!(%task, reason = %end, "a task ended: stepping listeners down, then exiting");
        }
        let Running {
            tasks, listeners, ..
        } = running;
        let _ = stop.send(true);
        tasks.wind_down(crate::listeners::RELEASE_TIMEOUT).await;
        if let Some(listeners) = listeners {
            crate::listeners::step_down_left_over(&listeners, &self.listeners.specs).await;
        }
        match ended {
            None => Ok(()),
            Some((task, end)) => Err(AgentError::TaskEnded { task, end }),
        }
    }
}

/// The agent while it runs.
struct Running<'a> {
    agent: &'a Agent,
    tasks: Tasks,
    /// Known from the first pod seen.
    node: Option<Node>,
    listeners: Option<Arc<Listeners>>,
    /// Whether this node contends for listeners: online, and still the
    /// pod this agent started in.
    eligible: watch::Sender<bool>,
    /// Turns true when the agent stops; the listener tasks step down.
    stopping: watch::Receiver<bool>,
    /// The pod was not found at the last look.
    gone: bool,
}

impl Running<'_> {
    /// Looks at the pod and the server at each change of the pod and
    /// every interval, until `shutdown` turns true (None) or a task ends
    /// (which one, and why).
    async fn follow(
        &mut self,
        mut latest: watch::Receiver<Seen>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<(Task, TaskEnd)> {
        let mut tick = tokio::time::interval(self.agent.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                return None;
            }
            tokio::select! {
                biased;
                Ok(()) = shutdown.changed() => continue,
                Some(ended) = self.tasks.next_end() => return Some(ended),
                Ok(()) = latest.changed() => {}
                _ = tick.tick() => {}
            }
            let seen = latest.borrow_and_update().clone();
            match seen {
                Seen::Pod(pod) => self.look(&pod).await,
                Seen::Absent => self.pod_gone(),
                Seen::Nothing => {}
            }
        }
    }

    async fn look(&mut self, pod: &Pod) {
        if self.gone {
            info!(pod = %self.agent.pod, "pod found");
            self.gone = false;
        }
        if self.node.is_none() {
            self.start(pod);
        }
        let Some(node) = self.node.as_mut() else {
            return;
        };
        let now = online(pod) && pod.metadata.uid == node.uid;
        self.eligible.send_if_modified(|was| {
            let changed = *was != now;
            *was = now;
            changed
        });
        let handing_over = self.listeners.as_ref().is_some_and(|l| l.holds_any());
        node.follow(pod, handing_over).await;
        node.report(pod).await;
    }

    /// The pod is deleted (or not created yet): a node without a pod is
    /// not online.
    fn pod_gone(&mut self) {
        if !self.gone {
            warn!(pod = %self.agent.pod, "pod not found");
            self.gone = true;
        }
        self.eligible
            .send_if_modified(|was| std::mem::replace(was, false));
    }

    /// Starts following the node the first pod seen shows, and its
    /// listeners.
    fn start(&mut self, first: &Pod) {
        let agent = self.agent;
        let pods = Api::namespaced(agent.requests.clone(), &agent.namespace);
        let node = Node::new(
            pods,
            agent.pod.clone(),
            first,
            agent.hooks.clone(),
            agent.packages.clone(),
        );
        let cluster = first.labels().get(crate::naming::labels::CLUSTER).cloned();
        if let (Some(cluster), false) = (cluster, agent.listeners.specs.is_empty()) {
            let me = crate::listeners::holder_identity(
                &agent.pod,
                node.uid.as_deref().unwrap_or_default(),
            );
            let listeners = Arc::new(Listeners::new(
                Api::namespaced(agent.requests.clone(), &agent.namespace),
                Api::namespaced(agent.watches.clone(), &agent.namespace),
                me,
                cluster,
                agent.hooks.clone(),
                agent.listeners.paths.clone(),
            ));
            for spec in &agent.listeners.specs {
                let task = crate::listeners::listen(
                    listeners.clone(),
                    spec.clone(),
                    self.eligible.subscribe(),
                    self.stopping.clone(),
                );
                self.tasks
                    .spawn(Task::Listener(spec.name.clone()), async move {
                        task.await;
                        Ok(())
                    });
            }
            self.listeners = Some(listeners);
        }
        self.node = Some(node);
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
