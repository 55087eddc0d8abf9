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
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::PredicateConfig;
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::{IntegrationCluster, IntegrationClusterStatus, Phase, condition};
use crate::naming::labels;
use crate::{render, validation};

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

/// Errors of one reconcile; all are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status of {name}: {}", api_text(.source))]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading {what}: {}", api_text(.source))]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {}", api_text(.source))]
    Write {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("serialising an object: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("{0} has no namespace")]
    NotNamespaced(String),
    #[error(
        "the reconcile did not finish within {}s; the next attempt continues from what exists",
        .0.as_secs()
    )]
    Deadline(Duration),
    #[error("{0}")]
    Database(#[source] crate::database::DbError),
    #[error("generating a password: {0}")]
    Random(String),
    #[error("{0}")]
    Conflict(String),
}

impl Error {
    /// Short label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::WriteStatus { .. } => "write_status",
            Error::Read { .. } => "read",
            Error::Write { .. } => "write",
            Error::Serialize(_) => "serialize",
            Error::NotNamespaced(_) => "not_namespaced",
            Error::Deadline(_) => "deadline",
            Error::Database(_) => "database",
            Error::Random(_) => "random",
            Error::Conflict(_) => "conflict",
        }
    }
}

/// An API error as a person reads it: the server's message and reason.
/// kube's own Display appends the Rust Debug dump of the whole Status.
pub fn api_text(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => {
            if status.reason.is_empty() {
                status.message.clone()
            } else {
                format!("{} ({})", status.message, status.reason)
            }
        }
        other => other.to_string(),
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// Every IntegrationCluster the controller watches, for cross-cluster checks.
    pub store: Store<IntegrationCluster>,
    /// Consecutive failed reconciles per cluster, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Cluster databases: provisioning results and connection pools.
    pub databases: database::Databases,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The agent image for pods whose spec names none.
    pub agent_image: String,
    /// Every Kubernetes node, for the cordoned ones.
    pub nodes: Store<Node>,
    /// The objects the clusters own, as the watches see them.
    pub stores: stores::Stores,
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
    let clusters = watcher(api_for(watches.clone(), &scope), any())
        .default_backoff()
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
        databases: database::Databases::default(),
        metrics,
        agent_image: settings.agent_image,
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
        .run(reconcile, error_policy, ctx)
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
        .reflect(writer)
        .touched_objects()
        .predicate_filter(schedulable, PredicateConfig::default());
    (nodes, changes)
}

/// What the clusters own wakes its owner; pods, claims and Leases are
/// also kept in stores the reconciles read instead of listing.
fn owned_watches(
    controller: Controller<IntegrationCluster>,
    watches: &Client,
    scope: &Scope,
) -> (stores::Stores, Controller<IntegrationCluster>) {
    let owned = any().labels(&format!("{}={}", labels::MANAGED_BY, labels::OPERATOR));
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (claims, claim_writer) = reflector::store::<PersistentVolumeClaim>();
    let (leases, lease_writer) = reflector::store::<Lease>();
    let controller = controller
        .owns_stream(
            watcher(owned_api::<Pod>(watches, scope), owned.clone())
                .default_backoff()
                .reflect(pod_writer)
                .touched_objects(),
        )
        .owns_stream(
            watcher(
                owned_api::<PersistentVolumeClaim>(watches, scope),
                owned.clone(),
            )
            .default_backoff()
            .reflect(claim_writer)
            .touched_objects(),
        )
        // Listener Leases wake the controller on a new holder or epoch,
        // not on every renewal.
        .owns_stream(
            watcher(owned_api::<Lease>(watches, scope), owned.clone())
                .default_backoff()
                .reflect(lease_writer)
                .touched_objects()
                .predicate_filter(listeners::holder_and_epoch, PredicateConfig::default()),
        )
        .owns(owned_api::<Service>(watches, scope), owned.clone())
        .owns(owned_api::<ConfigMap>(watches, scope), owned.clone())
        .owns(
            owned_api::<PodDisruptionBudget>(watches, scope),
            owned.clone(),
        )
        .owns(owned_api::<ServiceAccount>(watches, scope), owned.clone())
        .owns(owned_api::<Role>(watches, scope), owned.clone())
        .owns(owned_api::<RoleBinding>(watches, scope), owned.clone())
        .owns(owned_api::<StatefulSet>(watches, scope), owned);
    let stores = stores::Stores {
        pods,
        claims,
        leases,
    };
    (stores, controller)
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

async fn reconcile(ic: Arc<IntegrationCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = ic.name_any();
    let namespace = ic
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(name.clone()))?;
    let api: Api<IntegrationCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(RECONCILE_DEADLINE, by_stage(&api, &ic, &ctx))
        .await
        .unwrap_or(Err(Error::Deadline(RECONCILE_DEADLINE)));
    record_outcome(&ctx, &ic, result.is_ok());
    ctx.metrics.reconciled(
        started.elapsed().as_secs_f64(),
        result.as_ref().err().map(Error::category),
    );
    if let Err(e) = &result {
        report_error(&ctx, &ic, e).await;
    }
    result
}

async fn by_stage(
    api: &Api<IntegrationCluster>,
    ic: &IntegrationCluster,
    ctx: &Context,
) -> Result<Action, Error> {
    match finalizer::stage(ic) {
        // Adding the finalizer changes the object, which brings it back.
        finalizer::Stage::Unprotected => finalizer::add(api, ic)
            .await
            .map(|()| Action::await_change()),
        finalizer::Stage::Live => reconcile_cluster(ic, ctx).await,
        finalizer::Stage::Deleting => match cleanup::run(ic, ctx).await? {
            cleanup::Outcome::Done => finalizer::remove(api, ic)
                .await
                .map(|()| Action::await_change()),
            cleanup::Outcome::RetryIn(delay) => Ok(Action::requeue(delay)),
        },
        finalizer::Stage::Released => Ok(Action::await_change()),
    }
}

fn record_outcome(ctx: &Context, ic: &IntegrationCluster, ok: bool) {
    let mut failures = ctx
        .failures
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if ok {
        failures.remove(&Context::key(ic));
    } else {
        *failures.entry(Context::key(ic)).or_default() += 1;
    }
}

/// A failed reconcile is visible in status: Degraded=True with the error,
/// until a reconcile succeeds and computes Degraded again.
async fn report_error(ctx: &Context, ic: &IntegrationCluster, error: &Error) {
    let current = ic.status.clone().unwrap_or_default();
    let message = format!("{error}");
    let already = conditions::find(&current.conditions, condition::DEGRADED)
        .is_some_and(|c| c.reason == RECONCILE_ERROR && c.message == message);
    if already || matches!(error, Error::WriteStatus { .. }) {
        return;
    }
    let decided = conditions::Desired::new(condition::DEGRADED, true, RECONCILE_ERROR, message);
    let desired = IntegrationClusterStatus {
        conditions: conditions::merge(
            &current.conditions,
            &[decided],
            ic.metadata.generation,
            Timestamp::now(),
        ),
        ..current.clone()
    };
    if let Err(e) = write_status(ctx, ic, &current, &desired).await {
        warn!(name = %ic.name_any(), error = %e, "reporting the reconcile error in status failed");
    }
}

/// The status to write before the actions: `computed`, but with a
/// reported reconcile error kept until an attempt gets past the actions.
/// Otherwise every failing attempt would clear the error and report it
/// again: two status writes per attempt instead of none.
fn keep_reported_error(
    current: &IntegrationClusterStatus,
    computed: &IntegrationClusterStatus,
) -> IntegrationClusterStatus {
    let Some(reported) = conditions::find(&current.conditions, condition::DEGRADED)
        .filter(|c| c.reason == RECONCILE_ERROR && c.status == "True")
    else {
        return computed.clone();
    };
    let mut desired = computed.clone();
    match desired
        .conditions
        .iter_mut()
        .find(|c| c.type_ == condition::DEGRADED)
    {
        Some(degraded) => *degraded = reported.clone(),
        None => desired.conditions.push(reported.clone()),
    }
    desired
}

/// observe → validate → shared services → render → plan → status → apply.
async fn reconcile_cluster(ic: &IntegrationCluster, ctx: &Context) -> Result<Action, Error> {
    let name = ic.name_any();
    let namespace = ic.namespace().unwrap_or_default();

    // observe
    let everyone = ctx.store.state();
    let others: Vec<&IntegrationCluster> = everyone.iter().map(Arc::as_ref).collect();

    // validate
    let validated = validation::validate(ic, &others);
    let current = ic.status.clone().unwrap_or_default();
    let Ok(cluster) = &validated else {
        let desired = status::desired(ic, &validated, None, Timestamp::now());
        write_status(ctx, ic, &current, &desired).await?;
        if let Err(problems) = &validated
            && status::newly_invalid(&current, &desired)
        {
            let note = problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let reason = problems
                .first()
                .map_or("Invalid", validation::Problem::reason);
            apply::publish(ctx, ic, EventType::Warning, reason, note).await;
        }
        return Ok(Action::requeue(RESYNC));
    };

    // the shared database: where it is, provisioned when due
    let db = database::observe(&ctx.client, &ctx.databases, ic).await?;
    if let Some(view) = &db
        && !view.changes.is_empty()
    {
        let note = format!(
            "database {} on {}: {}",
            view.status.database.as_deref().unwrap_or_default(),
            view.status.host.as_deref().unwrap_or_default(),
            view.changes.join(", ")
        );
        apply::publish(ctx, ic, EventType::Normal, "DatabaseProvisioned", note).await;
    }

    // render and plan
    let endpoint = db.as_ref().and_then(|v| v.endpoint.as_ref());
    let config_sources = sources::digest(&ctx.client, ic).await?;
    let inputs = render::Inputs {
        database: endpoint,
        config_sources: config_sources.as_deref(),
    };
    let rendered = render::render(ic, cluster, &inputs);
    if !ic.spec.paused {
        apply::ensure_shared(ctx, ic, cluster, &rendered).await?;
    }
    let (pods, claims) = (ctx.stores.pods(ic), ctx.stores.claims(ic));
    if !ic.spec.paused {
        let changed = apply::follow_deletion_policy(ctx, ic, &claims).await?;
        if !changed.is_empty() {
            let policy = format!("{:?}", ic.spec.deletion_policy);
            info!(%namespace, %name, %policy, objects = ?changed, "ownership follows the deletion policy");
        }
    }
    let gd = database::unfinished_work(ic, db.as_ref(), &pods).await;
    let cache = cache::observe(&ctx.client, ic, !pods.is_empty()).await?;
    let leases = ctx.stores.leases(ic);
    let listener_holders = listeners::holders(&leases, Timestamp::now());
    let start_blocked = match (&db, &cache) {
        (Some(view), _) if view.status.credentials_secret.is_none() => {
            Some("waiting for the database endpoint before starting servers".to_owned())
        }
        (_, Some(view)) => view.blocks_start.clone(),
        _ => None,
    };
    let observed = plan::Observed {
        pods: &pods,
        claims: &claims,
        gd: gd.as_ref().map(|r| r.as_ref().map_err(|_| ())),
        start_blocked: start_blocked.as_deref(),
        listener_holders: &listener_holders,
        cordoned: &cordoned(&ctx.nodes),
        agent_image: &ctx.agent_image,
        now: Timestamp::now(),
    };
    let plan = plan::plan(ic, cluster, &rendered, &observed);

    // status first: it reports what was observed and why the actions follow
    let shared_problem = db
        .as_ref()
        .and_then(|v| v.problem.as_ref())
        .map(|p| (p.class.reason(), p.to_string()))
        .or_else(|| cache.as_ref().and_then(|v| v.problem.clone()));
    let progress = status::Progress {
        plan: &plan,
        rendered: &rendered,
        database: db.as_ref().map(|v| v.status.clone()),
        cache: cache.as_ref().map(|v| v.status.clone()),
        listeners: listeners::statuses(ic, &leases, Timestamp::now()),
        shared_problem,
    };
    let computed = status::desired(ic, &validated, Some(&progress), Timestamp::now());
    let desired = keep_reported_error(&current, &computed);
    write_status(ctx, ic, &current, &desired).await?;
    // Related to the node that now holds (or let go of) the listener.
    for (note, node) in listeners::handovers(&current.listeners, &desired.listeners) {
        let pod = apply::pod_ref(&namespace, &node);
        apply::publish_about(
            ctx,
            ic,
            EventType::Normal,
            "ListenerHandover",
            note,
            Some(pod),
        )
        .await;
    }
    if let Some((reason, message)) = &progress.shared_problem
        && status::newly_true(&current, &desired, condition::DEGRADED)
    {
        apply::publish(ctx, ic, EventType::Warning, reason, message.clone()).await;
    }
    if status::newly_true(&current, &desired, condition::CONFIG_DRIFT) {
        let note = format!("configuration drift: {}", drift_summary(&plan));
        apply::publish(ctx, ic, EventType::Normal, "ConfigDrift", note).await;
    }
    if let Some(why) = &plan.stalled
        && status::newly_true(&current, &desired, condition::STALLED)
    {
        apply::publish(ctx, ic, EventType::Warning, "RolloutStalled", why.clone()).await;
    }

    // apply
    for node in &plan.forced {
        let note = format!(
            "{node}: drain timeout overridden by the {} annotation",
            crate::api::annotations::FORCE
        );
        apply::publish(ctx, ic, EventType::Warning, "ForcedRemoval", note).await;
    }
    apply::execute(ctx, ic, &plan.actions).await?;
    // This attempt got past the actions: a reported error goes now.
    write_status(ctx, ic, &desired, &computed).await?;
    info!(%namespace, %name, actions = plan.actions.len(), "reconciled");
    let lock_break_in = match db.as_ref().and_then(|v| v.pool.as_ref()) {
        Some(pool) => database::after_apply(ctx, ic, pool, &pods, &plan).await,
        None => None,
    };

    // Nodes on their way somewhere are looked at again soon; pod events
    // usually come first, but the progress deadline is a matter of time.
    let settled = matches!(desired.phase, Some(Phase::Ready | Phase::Degraded))
        && plan.actions.is_empty()
        && plan.waiting.is_none();
    let mut next = if settled { RESYNC } else { RETRY };
    for due in [
        db.as_ref().and_then(|v| v.retry_in),
        lock_break_in,
        plan.recheck_in,
    ]
    .into_iter()
    .flatten()
    {
        next = next.min(due.max(Duration::from_secs(1)));
    }
    Ok(Action::requeue(next))
}

fn drift_summary(plan: &plan::Plan) -> String {
    plan.drifted
        .iter()
        .map(|(node, why)| format!("{node} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn write_status(
    ctx: &Context,
    ic: &IntegrationCluster,
    current: &IntegrationClusterStatus,
    desired: &IntegrationClusterStatus,
) -> Result<(), Error> {
    if desired == current {
        return Ok(());
    }
    let name = ic.name_any();
    let api: Api<IntegrationCluster> =
        Api::namespaced(ctx.client.clone(), &ic.namespace().unwrap_or_default());
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
        info!(namespace = %ic.namespace().unwrap_or_default(), %name, ?phase, "status updated");
    }
    Ok(())
}

fn error_policy(ic: Arc<IntegrationCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx
        .failures
        .lock()
        .map_or(1, |f| f.get(&Context::key(&ic)).copied().unwrap_or(1));
    let delay = backoff(failures);
    warn!(name = %ic.name_any(), category = error.category(), %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn degraded(reason: &str, message: &str) -> IntegrationClusterStatus {
        IntegrationClusterStatus {
            conditions: conditions::merge(
                &[],
                &[conditions::Desired::new(
                    condition::DEGRADED,
                    reason == RECONCILE_ERROR,
                    reason,
                    message,
                )],
                Some(1),
                Timestamp::UNIX_EPOCH,
            ),
            ..IntegrationClusterStatus::default()
        }
    }

    #[test]
    fn a_reported_error_stays_until_an_attempt_gets_past_the_actions() {
        let reported = degraded(RECONCILE_ERROR, "create pod q-0: forbidden");
        let computed = degraded("AllNodesReady", "");
        assert_eq!(keep_reported_error(&reported, &computed), reported);
        assert_eq!(keep_reported_error(&computed, &computed), computed);
    }

    #[test]
    fn retries_back_off_to_five_minutes() {
        let delays: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }
}
