//! The IntegrationCluster controller.
//!
//! Each reconcile is a pipeline: observe → validate → (plan → apply, from the
//! workloads issue on) → update status. Steps that need no client are pure
//! functions in their own modules; this file wires them to the API server.
//! A reconcile that finds nothing new makes no API writes.

mod conditions;
mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::IntegrationCluster;
use crate::validation;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "integration-operator";

/// How often a settled cluster is looked at again even without a change,
/// so checks against other clusters (cluster-name conflicts) catch up.
const RESYNC: Duration = Duration::from_secs(300);
/// Retry delay after a failed reconcile.
const RETRY: Duration = Duration::from_secs(5);

/// Errors of one reconcile; all are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status of {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0} has no namespace")]
    NotNamespaced(String),
}

impl Error {
    /// Short label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::WriteStatus { .. } => "write_status",
            Error::NotNamespaced(_) => "not_namespaced",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// Every IntegrationCluster the controller watches, for cross-cluster checks.
    pub store: Store<IntegrationCluster>,
}

/// Where the controller looks for IntegrationClusters.
#[derive(Clone, Debug)]
pub enum Scope {
    AllNamespaces,
    Namespace(String),
}

/// Why the operator cannot start, in words that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot reach the Kubernetes API server: {0}; check KUBECONFIG and that the cluster is running"
    )]
    Unreachable(#[source] kube::Error),
    #[error(
        "the IntegrationCluster CRD is not installed: run `integration-operator crd | kubectl apply --server-side -f -`"
    )]
    CrdMissing,
    #[error(
        "the operator may not list IntegrationClusters: {0}; apply manifests/operator.yaml for its RBAC"
    )]
    Forbidden(#[source] kube::Error),
    #[error("listing IntegrationClusters failed: {0}")]
    List(#[source] kube::Error),
}

/// Checks that the API server answers and serves the CRD, so a broken setup
/// fails at once with one clear line instead of a retry loop in the logs.
pub async fn preflight(client: &Client, scope: &Scope) -> Result<(), StartError> {
    client
        .apiserver_version()
        .await
        .map_err(StartError::Unreachable)?;
    let api = api_for(client.clone(), scope);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(StartError::CrdMissing),
        Err(e @ kube::Error::Api(_)) if is_forbidden(&e) => Err(StartError::Forbidden(e)),
        Err(e) => Err(StartError::List(e)),
    }
}

fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403)
}

fn api_for(client: Client, scope: &Scope) -> Api<IntegrationCluster> {
    match scope {
        Scope::AllNamespaces => Api::all(client),
        Scope::Namespace(ns) => Api::namespaced(client, ns),
    }
}

/// Runs the controller until a shutdown signal.
pub async fn run(client: Client, scope: Scope) {
    let api = api_for(client.clone(), &scope);
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client, Reporter::from(FIELD_MANAGER)),
        store: controller.store(),
    });
    info!(?scope, "controller started");
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
    info!("controller stopped");
}

async fn reconcile(ic: Arc<IntegrationCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = ic.name_any();
    let namespace = ic
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(name.clone()))?;

    // observe
    let everyone = ctx.store.state();
    let others: Vec<&IntegrationCluster> = everyone.iter().map(Arc::as_ref).collect();

    // validate
    let validated = validation::validate(&ic, &others);

    // update status
    let current = ic.status.clone().unwrap_or_default();
    let desired = status::desired(&ic, &validated, Timestamp::now());
    if desired != current {
        let api: Api<IntegrationCluster> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": IntegrationCluster::api_version(&()),
            "kind": IntegrationCluster::kind(&()),
            "status": desired,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::WriteStatus {
            name: name.clone(),
            source,
        })?;
        if let Some(phase) = desired.phase {
            info!(%namespace, %name, ?phase, "status updated");
        }
    }

    if let Err(problems) = &validated
        && status::newly_invalid(&current, &desired)
    {
        publish_rejection(&ctx, &ic, problems).await;
    }

    Ok(Action::requeue(RESYNC))
}

/// A person looking at `kubectl describe` should see why the operator does
/// nothing; published once per new verdict, not on every reconcile.
async fn publish_rejection(
    ctx: &Context,
    ic: &IntegrationCluster,
    problems: &[validation::Problem],
) {
    let Some(first) = problems.first() else {
        return;
    };
    let note = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let event = Event {
        type_: EventType::Warning,
        reason: first.reason().to_owned(),
        note: Some(truncate(&note, 1000)),
        action: "Validate".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &ic.object_ref(&())).await {
        warn!(name = %ic.name_any(), error = %e, "publishing event failed");
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn error_policy(ic: Arc<IntegrationCluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(name = %ic.name_any(), category = error.category(), %error, "will retry");
    Action::requeue(RETRY)
}
