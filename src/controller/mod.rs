//! The IntegrationCluster controller.
//!
//! Each reconcile is a pipeline: observe → validate → shared services
//! (`database.rs` provisions the cluster database when due, `cache.rs` looks
//! at the cache, `listeners.rs` at the listener Leases) → render → plan →
//! status → apply → database bookkeeping. Steps that need no client are
//! pure functions in their own modules (`plan.rs`, `status.rs`,
//! `crate::workflows`); this file wires them to the API server. A reconcile
//! that finds nothing new makes no API writes.

mod apply;
mod cache;
mod cleanup;
mod conditions;
mod database;
mod driver;
mod error;
mod finalizer;
pub mod leader;
mod listeners;
mod plan;
mod sources;
mod status;
mod stores;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::PredicateConfig;
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::IntegrationCluster;
use crate::naming::labels;
pub use error::{Error, Failure, Step, api_text};

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "integration-operator";

/// How often a settled cluster is looked at again even without a change,
/// so checks against other clusters (cluster-name conflicts) catch up.
const RESYNC: Duration = Duration::from_secs(300);
/// Retry delay after a failed reconcile.
const RETRY: Duration = Duration::from_secs(5);
/// The longest one reconcile may take. Every call in it has its own
/// deadline; this one bounds their sum, so a cluster whose dependencies are
/// slow gives up and retries later instead of holding on.
const RECONCILE_DEADLINE: Duration = Duration::from_secs(120);

/// Reason of the Degraded condition that reports a failed reconcile.
const RECONCILE_ERROR: &str = "ReconcileError";

/// Finalizer that lets the operator release retained volumes before the
/// garbage collector deletes what the cluster owns.
pub const FINALIZER: &str = "integration.dev/cleanup";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// Every IntegrationCluster the controller watches, for cross-cluster checks.
    pub store: Store<IntegrationCluster>,
    /// Consecutive failed reconciles per cluster, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// When the operator last wrote each cluster's status, for the recent
    /// ones (`driver::status_deferred`).
    pub status_writes: Mutex<HashMap<String, std::time::Instant>>,
    /// Cluster databases: provisioning results and connection pools.
    pub databases: database::Databases,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The agent image for pods whose spec names none.
    pub agent_image: String,
    /// Every Kubernetes node, for the cordoned ones.
    pub nodes: Store<Node>,
    /// The objects the clusters own, as the watches see them.
    pub stores: stores::Stores,
    /// Whether those stores (and `nodes`) hold their first full lists.
    pub ready: stores::Ready,
}

/// Kubernetes nodes marked unschedulable.
fn cordoned(nodes: &Store<Node>) -> BTreeSet<String> {
    nodes
        .state()
        .iter()
        .filter(|n| n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true))
        .map(|n| n.name_any())
        .collect()
}

/// What of a node wakes the controller: being cordoned or uncordoned.
fn schedulable(node: &Node) -> Option<u64> {
    let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    Some(u64::from(cordoned))
}

impl Context {
    fn key(ic: &IntegrationCluster) -> String {
        format!("{}/{}", ic.namespace().unwrap_or_default(), ic.name_any())
    }

    /// Time since this operator last wrote the cluster's status, if that
    /// was recent (older entries are dropped: only recent ones matter).
    fn status_age(&self, ic: &IntegrationCluster) -> Option<Duration> {
        let writes = self.status_writes.lock().ok()?;
        writes.get(&Self::key(ic)).map(std::time::Instant::elapsed)
    }

    fn status_written(&self, ic: &IntegrationCluster) {
        if let Ok(mut writes) = self.status_writes.lock() {
            writes.retain(|_, at| at.elapsed() < Duration::from_secs(10));
            writes.insert(Self::key(ic), std::time::Instant::now());
        }
    }
}

/// Parameters of the operator's merge and JSON patches, so the API server
/// records who wrote (without one it records "unknown").
pub fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

/// Retry delay after `failures` consecutive failures: 5 s doubling to 5 min.
pub fn backoff(failures: u32) -> Duration {
    let seconds = RETRY
        .as_secs()
        .saturating_mul(1 << failures.saturating_sub(1).min(6));
    Duration::from_secs(seconds.min(300))
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

/// How the controller runs, from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub scope: Scope,
    /// The agent image for pods whose spec names none.
    pub agent_image: String,
    /// Clusters reconciled at once, at most; others wait their turn, so
    /// a thousand clusters changing together cannot swamp the API server.
    pub concurrency: u16,
}

/// Runs the controller until `stop` completes (a signal), letting running
/// reconciles finish; dropping the future aborts them instead (a lost
/// leadership, in main). Reconciles call the API through `client`; the
/// watches go through `watches`, whose read timeout suits them (see
/// `crate::kube_client`).
pub async fn run(
    client: Client,
    watches: Client,
    settings: Settings,
    metrics: Arc<crate::metrics::Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let scope = settings.scope.clone();
    // The operator's own status writes must not wake it: a reconcile that
    // fails and reports the failure in status would otherwise run again at
    // once, and the error backoff would never apply. What a person changes
    // (spec, annotations, labels, finalizers, deletion) still does.
    let (store, writer) = reflector::store();
    let clusters = watcher(api_for(watches.clone(), &scope), paged())
        .default_backoff()
        .modify(stores::slim)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation
                .combine(predicates::annotations)
                .combine(predicates::labels)
                .combine(predicates::finalizers),
            PredicateConfig::default(),
        );
    let (nodes, node_changes) = node_watch(&watches);
    // A cordoned node's server pods are moved by the operator, through the
    // node workflow; every cluster looks at its pods when a node's
    // schedulability changes (rare, and a reconcile that finds nothing
    // to do writes nothing).
    let everyone = store.clone();
    let controller =
        Controller::for_stream(clusters, store.clone()).watches_stream(node_changes, move |_| {
            everyone
                .state()
                .iter()
                .map(|ic| ObjectRef::from_obj(ic.as_ref()))
                .collect::<Vec<_>>()
        });
    let (stores, controller) = owned_watches(controller, &watches, &scope);
    let controller = referenced_watches(controller, &watches, &scope, &store);
    let ctx = Arc::new(Context {
        client,
        store: controller.store(),
        failures: Mutex::default(),
        status_writes: Mutex::default(),
        databases: database::Databases::default(),
        metrics,
        agent_image: settings.agent_image,
        ready: stores.ready(nodes.clone()),
        nodes,
        stores,
    });
    info!(
        ?scope,
        concurrency = settings.concurrency,
        "controller started"
    );
    controller
        .with_config(kube::runtime::controller::Config::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(stop)
        .run(driver::reconcile, driver::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
    info!("controller stopped");
}

fn any() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

/// For the watches whose lists grow with the number of clusters (the
/// clusters, the pods and the rest of what they own): paged lists. A list
/// at "any" resourceVersion is served from the API server's cache in one
/// piece whatever the page size, and a restarted operator held all of it
/// at once, unslimmed, before the stores kept their slim copies.
fn paged() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE)
}

/// Objects per page of a paged list.
const LIST_PAGE: u32 = 100;

/// Every Kubernetes node, and the changes of their schedulability.
fn node_watch(
    watches: &Client,
) -> (
    Store<Node>,
    impl futures::Stream<Item = Result<Node, watcher::Error>> + Send + 'static,
) {
    let (nodes, writer) = reflector::store::<Node>();
    let changes = watcher(Api::<Node>::all(watches.clone()), any())
        .default_backoff()
        .modify(stores::slim)
        .reflect(writer)
        .touched_objects()
        .predicate_filter(schedulable, PredicateConfig::default());
    (nodes, changes)
}

/// What the clusters own wakes its owner, and is kept (slimmed) in the
/// stores the reconciles read instead of the API server.
fn owned_watches(
    controller: Controller<IntegrationCluster>,
    watches: &Client,
    scope: &Scope,
) -> (stores::Stores, Controller<IntegrationCluster>) {
    let owned = paged().labels(&format!("{}={}", labels::MANAGED_BY, labels::OPERATOR));
    let watch = |c: &watcher::Config| (watches, scope, c.clone());
    let (pods, pod_changes) = cached::<Pod>(watch(&owned), stores::slim_pod);
    let (claims, claim_changes) = cached::<PersistentVolumeClaim>(watch(&owned), stores::slim);
    let (leases, lease_changes) = cached::<Lease>(watch(&owned), stores::slim);
    let (accounts, account_changes) = cached::<ServiceAccount>(watch(&owned), stores::slim);
    let (roles, role_changes) = cached::<Role>(watch(&owned), stores::slim);
    let (bindings, binding_changes) = cached::<RoleBinding>(watch(&owned), stores::slim);
    let (config_maps, config_map_changes) = cached::<ConfigMap>(watch(&owned), stores::slim);
    let (services, service_changes) = cached::<Service>(watch(&owned), stores::slim);
    let (budgets, budget_changes) = cached::<PodDisruptionBudget>(watch(&owned), stores::slim);
    let (sets, set_changes) = cached::<StatefulSet>(watch(&owned), stores::slim);
    let controller = controller
        .owns_stream(pod_changes)
        .owns_stream(claim_changes)
        // Listener Leases wake the controller on a new holder or epoch,
        // not on every renewal.
        .owns_stream(
            lease_changes.predicate_filter(listeners::holder_and_epoch, PredicateConfig::default()),
        )
        .owns_stream(account_changes)
        .owns_stream(role_changes)
        .owns_stream(binding_changes)
        .owns_stream(config_map_changes)
        .owns_stream(service_changes)
        .owns_stream(budget_changes)
        .owns_stream(set_changes);
    let stores = stores::Stores {
        pods,
        claims,
        leases,
        shared: stores::Shared {
            accounts,
            roles,
            bindings,
            config_maps,
            services,
            budgets,
            sets,
        },
    };
    (stores, controller)
}

/// A watch of `K` in the scope, its objects slimmed and kept in a store.
fn cached<K>(
    (client, scope, config): (&Client, &Scope, watcher::Config),
    slim: fn(&mut K),
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let changes = watcher(owned_api::<K>(client, scope), config)
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .touched_objects();
    (store, changes)
}

/// A Secret or ConfigMap a cluster refers to wakes that cluster when it
/// changes, so a rotated Secret rolls the servers within seconds instead
/// of at the next resync. Metadata only: the contents are read when a
/// reconcile needs them, not kept in the operator's memory.
fn referenced_watches(
    controller: Controller<IntegrationCluster>,
    watches: &Client,
    scope: &Scope,
    clusters: &Store<IntegrationCluster>,
) -> Controller<IntegrationCluster> {
    let (for_secrets, for_config_maps) = (clusters.clone(), clusters.clone());
    controller
        .watches_stream(
            watcher(
                owned_api::<PartialObjectMeta<Secret>>(watches, scope),
                any(),
            )
            .default_backoff()
            .touched_objects(),
            move |secret| {
                stores::clusters_using(&for_secrets.state(), &secret.metadata, stores::secrets_of)
            },
        )
        .watches_stream(
            watcher(
                owned_api::<PartialObjectMeta<ConfigMap>>(watches, scope),
                any(),
            )
            .default_backoff()
            .touched_objects(),
            move |map| {
                stores::clusters_using(
                    &for_config_maps.state(),
                    &map.metadata,
                    stores::config_maps_of,
                )
            },
        )
}

fn owned_api<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Scope::AllNamespaces => Api::all(client.clone()),
        Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_five_minutes() {
        let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
