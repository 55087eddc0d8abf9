//! The agent's long-running tasks and the set that supervises them. Each
//! runs until the agent stops it. One that ends on its own (an error, a
//! panic) ends the agent, after the listeners stepped down: a detached
//! task that died would leave a listener enabled that nobody renews or
//! steps down, or a node that cannot claim messages, while the pod looks
//! healthy (linkerd#15506). A restarted container starts them all again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinError, JoinSet};
use tracing::warn;

/// One of the agent's tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Task {
    /// Follows this agent's pod: the operator's desired state and gate.
    PodWatch,
    /// Holds (single-node) or follows (multi-node) one listener.
    Listener(String),
    /// Answers the server's multi-node claims on loopback.
    ClaimEndpoint,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Task::PodWatch => f.write_str("pod watch"),
            Task::Listener(name) => write!(f, "listener {name}"),
            Task::ClaimEndpoint => f.write_str("claim endpoint"),
        }
    }
}

/// Why a task ended before the agent stopped it.
#[derive(Debug, thiserror::Error)]
pub enum TaskEnd {
    #[error("the claim endpoint on {address} failed: {source}")]
    ClaimEndpoint {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("it returned, but must run until the agent stops")]
    Returned,
    #[error("it panicked: {0}")]
    Panicked(String),
    #[error("it was cancelled")]
    Cancelled,
}

impl From<JoinError> for TaskEnd {
    fn from(e: JoinError) -> Self {
        if !e.is_panic() {
            return TaskEnd::Cancelled;
        }
        let payload = e.into_panic();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        TaskEnd::Panicked(message)
    }
}

/// The agent's running tasks, by name.
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<Result<(), TaskEnd>>,
    names: HashMap<tokio::task::Id, (Task, AbortHandle)>,
}

impl Tasks {
    pub fn spawn<F>(&mut self, task: Task, future: F)
    where
        F: Future<Output = Result<(), TaskEnd>> + Send + 'static,
    {
        let handle = self.set.spawn(future);
        self.names.insert(handle.id(), (task, handle));
    }

    /// The next task to end, and why; pending while all run.
    pub async fn next_end(&mut self) -> Option<(Task, TaskEnd)> {
        loop {
            let (id, end) = match self.set.join_next_with_id().await? {
                Ok((id, Ok(()))) => (id, TaskEnd::Returned),
                Ok((id, Err(end))) => (id, end),
                Err(e) => (e.id(), TaskEnd::from(e)),
            };
            // Every task of the set was spawned through `spawn`.
            if let Some((task, _)) = self.names.remove(&id) {
                return Some((task, end));
            }
        }
    }

    /// Ends the tasks after the agent told them to stop: the others at
    /// once, the listeners (which disable and release on the way out)
    /// within `grace`, or aborted then.
    pub async fn wind_down(mut self, grace: Duration) {
        for (task, handle) in self.names.values() {
            if !matches!(task, Task::Listener(_)) {
                handle.abort();
            }
        }
        let ended = async {
            while let Some((task, end)) = self.next_end().await {
                if let TaskEnd::Panicked(_) = end {
                    warn!(%task, reason = %end, "task ended while stopping");
                }
            }
        };
        if tokio::time::timeout(grace, ended).await.is_err() {
            warn!(
                ?grace,
                "listeners did not step down in time: cancelling them"
            );
            self.set.shutdown().await;
        }
    }
}

/// What the pod watch saw last.
#[derive(Clone, Debug, Default)]
pub enum Seen {
    /// The watch has not answered yet.
    #[default]
    Nothing,
    Pod(Box<Pod>),
    /// No such pod (deleted, or not created yet).
    Absent,
}

/// Follows the agent's pod: every version the API server sends reaches the
/// agent's loop at once. On watch errors the watcher backs off as
/// client-go does, and the loop keeps the last pod it saw.
pub async fn watch_pod(
    pods: Api<Pod>,
    name: String,
    latest: watch::Sender<Seen>,
) -> Result<(), TaskEnd> {
    let changes = kube::runtime::watcher::watch_object(pods, &name).default_backoff();
    let mut changes = std::pin::pin!(changes);
    while let Some(change) = changes.next().await {
        match change {
            Ok(pod) => {
                latest.send_replace(pod.map_or(Seen::Absent, |p| Seen::Pod(Box::new(p))));
            }
            Err(e) => warn!(pod = %name, error = %e, "watching the pod failed; will retry"),
        }
    }
    Ok(())
}

/// The multi-node claim endpoint, on loopback.
pub async fn serve_claims(
    address: SocketAddr,
    options: sqlx::postgres::PgConnectOptions,
    node: String,
) -> Result<(), TaskEnd> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy_with(options);
    crate::listeners::claims::serve(address, pool, node)
        .await
        .map_err(|source| TaskEnd::ClaimEndpoint { address, source })
}
