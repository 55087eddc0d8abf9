//! One reconcile of one cluster, in named steps:
//!
//! 1. **dereference**: read what the cluster refers to (the other clusters,
//!    its configuration sources, its pods, claims and Leases from the
//!    stores, the cache, cordoned nodes); writes nothing.
//! 2. **validate**: the spec against itself and the other clusters; an
//!    invalid spec is reported and nothing else happens.
//! 3. **provision**: the shared database (role, database, credentials
//!    Secret), which the servers' configuration points at.
//! 4. **build**: pure: the rendered configuration, the node plan, the
//!    status and the Events, as values.
//! 5. **apply**: in dependency order, shared objects, then ownership, then
//!    the node actions; a paused cluster gets none of them.
//! 6. **status**: written once the actions are done, then its Events.
//!
//! Each step's failure is tagged with the step (`error::Step`), so logs
//! and the failures metric say where a reconcile failed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::error::{Error, Failure, Step, at};
use super::{
    Context, FIELD_MANAGER, RECONCILE_DEADLINE, RECONCILE_ERROR, RESYNC, RETRY, apply, backoff,
    cache, cleanup, conditions, cordoned, database, finalizer, listeners, plan, sources, status,
    stores,
};
use crate::api::{IntegrationCluster, IntegrationClusterStatus, Phase, condition};
use crate::render::{self, Rendered};
use crate::validation::{self, ValidatedCluster};

pub async fn reconcile(ic: Arc<IntegrationCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = ic.name_any();
    let namespace = ic
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(name.clone()))?;
    let api: Api<IntegrationCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(RECONCILE_DEADLINE, by_stage(&api, &ic, &ctx))
        .await
        .unwrap_or(Err(Error::Deadline(RECONCILE_DEADLINE)));
    if let Err(e) = &result
        && e.is_namespace_terminating()
    {
        info!(name = %name, %namespace, "namespace is being deleted: waiting for the cluster's deletion");
        return Ok(Action::requeue(NAMESPACE_TERMINATING_RETRY));
    }
    let conflict = result.as_ref().is_err_and(Error::is_conflict);
    if !conflict {
        record_outcome(&ctx, &ic, result.is_ok());
    }
    let category = result.as_ref().err().map(Error::category);
    ctx.metrics
        .reconciled(started.elapsed().as_secs_f64(), category.as_deref());
    if let Err(e) = &result
        && !conflict
    {
        report_error(&ctx, &ic, e).await;
    }
    result
}

async fn by_stage(
    api: &Api<IntegrationCluster>,
    ic: &IntegrationCluster,
    ctx: &Context,
) -> Result<Action, Error> {
    let finalizer = at(Step::Finalizer);
    match finalizer::stage(ic) {
        // The first reconcile of a new cluster: protected, then built in
        // the same pass (waiting for the watch to bring the change back
        // cost a round trip before anything was created).
        finalizer::Stage::Unprotected => {
            let protected = finalizer::add(api, ic).await.map_err(finalizer)?;
            reconcile_cluster(&protected, ctx).await
        }
        finalizer::Stage::Live => reconcile_cluster(ic, ctx).await,
        finalizer::Stage::Deleting => {
            match cleanup::run(ic, ctx).await.map_err(at(Step::Cleanup))? {
                cleanup::Outcome::Done => finalizer::remove(api, ic)
                    .await
                    .map(|()| Action::await_change())
                    .map_err(finalizer),
                cleanup::Outcome::RetryIn(delay) => Ok(Action::requeue(delay)),
            }
        }
        finalizer::Stage::Released => Ok(Action::await_change()),
    }
}

/// dereference → validate → provision → build → apply → status.
async fn reconcile_cluster(ic: &IntegrationCluster, ctx: &Context) -> Result<Action, Error> {
    let refs = dereference(ic, ctx).await.map_err(at(Step::Dereference))?;
    let others: Vec<&IntegrationCluster> = refs.others.iter().map(Arc::as_ref).collect();
    let validated = validation::validate(ic, &others);
    let Ok(cluster) = &validated else {
        report_invalid(ctx, ic, &validated).await?;
        return Ok(Action::requeue(RESYNC));
    };
    let shared = provision(ctx, ic, &refs).await?;
    let Some(built) = build(ic, &validated, &refs, &shared, &ctx.agent_image) else {
        return Ok(Action::requeue(RESYNC));
    };
    apply(ctx, ic, cluster, &built, &refs).await?;
    let current = ic.status.clone().unwrap_or_default();
    let status_due = status_deferred(&current, &built.status, ctx.status_age(ic));
    if status_due.is_none() {
        write_status(ctx, ic, &current, &built.status).await?;
    }
    for note in built.notes.iter() {
        let Note {
            kind,
            reason,
            message,
            regarding,
        } = note;
        apply::publish_about(ctx, ic, *kind, reason, message.clone(), regarding.clone()).await;
    }
    info!(name = %ic.name_any(), actions = built.plan.actions.len(), "reconciled");
    let pool = shared.db.as_ref().and_then(|v| v.pool.as_ref());
    let lock_break_in = match pool {
        Some(pool) => {
            database::release_locks_and_record_members(ctx, ic, pool, &refs.pods, &built.plan).await
        }
        None => None,
    };
    let next = next_look(&built, &shared, lock_break_in);
    Ok(Action::requeue(
        status_due.map_or(next, |due| due.min(next)),
    ))
}

/// How long a cluster in a namespace being deleted waits before it looks
/// again, unless its own deletion wakes it first.
const NAMESPACE_TERMINATING_RETRY: Duration = Duration::from_secs(30);

/// A cluster's status is rewritten at most once per this while it only
/// counts progress (a new phase or generation is written at once): while a
/// cluster starts, every pod event changed a count, and each was a write.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// When a status that differs only in progress within the same phase is
/// written: None for now, else after how long. `age` is the time since the
/// operator last wrote this cluster's status, if it remembers.
fn status_deferred(
    current: &IntegrationClusterStatus,
    desired: &IntegrationClusterStatus,
    age: Option<Duration>,
) -> Option<Duration> {
    let same_phase = desired.phase == current.phase
        && desired.observed_generation == current.observed_generation;
    match age {
        Some(age) if same_phase && desired != current && age < STATUS_EVERY => {
            Some(STATUS_EVERY - age)
        }
        _ => None,
    }
}

/// What the cluster refers to, as read at the start of the reconcile.
struct Refs {
    others: Vec<Arc<IntegrationCluster>>,
    /// Digest of the `configFrom` sources' contents.
    config_sources: Option<String>,
    pods: Vec<Pod>,
    claims: Vec<PersistentVolumeClaim>,
    leases: Vec<Lease>,
    cache: Option<cache::View>,
    cordoned: BTreeSet<String>,
    now: Timestamp,
}

/// Reads only: the stores, and GETs of what no store holds.
async fn dereference(ic: &IntegrationCluster, ctx: &Context) -> Result<Refs, Failure> {
    // Only right after a start: the reconcile's deadline bounds the wait.
    if !ctx.ready.clone().await {
        return Err(Failure::WatchStopped);
    }
    let pods = ctx.stores.pods(ic);
    Ok(Refs {
        others: ctx.store.state(),
        config_sources: sources::digest(&ctx.client, ic).await?,
        cache: cache::observe(&ctx.stores.shared.sets, ic, !pods.is_empty()),
        pods,
        claims: ctx.stores.claims(ic),
        leases: ctx.stores.leases(ic),
        cordoned: cordoned(&ctx.nodes),
        now: Timestamp::now(),
    })
}

/// An invalid spec: status and a Warning Event say why; nothing else.
async fn report_invalid(
    ctx: &Context,
    ic: &IntegrationCluster,
    validated: &Result<ValidatedCluster, Vec<validation::Problem>>,
) -> Result<(), Error> {
    let current = ic.status.clone().unwrap_or_default();
    let desired = status::desired(ic, validated, None, Timestamp::now());
    write_status(ctx, ic, &current, &desired).await?;
    if let Err(problems) = validated
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
    Ok(())
}

/// The shared database as provisioned, and the guaranteed-delivery work
/// its nodes still own.
struct Shared {
    db: Option<database::View>,
    gd: Option<Result<std::collections::BTreeMap<String, u64>, ()>>,
}

async fn provision(ctx: &Context, ic: &IntegrationCluster, refs: &Refs) -> Result<Shared, Error> {
    let db = database::provision(&ctx.client, &ctx.databases, ic)
        .await
        .map_err(at(Step::Provision))?;
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
    let gd = database::unfinished_work(ic, db.as_ref(), &refs.pods).await;
    Ok(Shared { db, gd })
}

/// An Event the reconcile decided on.
struct Note {
    kind: EventType,
    reason: &'static str,
    message: String,
    regarding: Option<ObjectReference>,
}

impl Note {
    fn new(kind: EventType, reason: &'static str, message: String) -> Self {
        Note {
            kind,
            reason,
            message,
            regarding: None,
        }
    }
}

/// What the reconcile decided, before any of it is written.
struct Built {
    rendered: Rendered,
    plan: plan::Plan,
    status: IntegrationClusterStatus,
    notes: Vec<Note>,
}

/// Pure: from what was read, what the cluster should be.
fn build(
    ic: &IntegrationCluster,
    validated: &Result<ValidatedCluster, Vec<validation::Problem>>,
    refs: &Refs,
    shared: &Shared,
    agent_image: &str,
) -> Option<Built> {
    let cluster = validated.as_ref().ok()?;
    let db = shared.db.as_ref();
    let inputs = render::Inputs {
        database: db.and_then(|v| v.endpoint.as_ref()),
        config_sources: refs.config_sources.as_deref(),
    };
    let rendered = render::render(ic, cluster, &inputs);
    let listener_holders = listeners::holders(&refs.leases, refs.now);
    let start_blocked = match (db, &refs.cache) {
        (Some(view), _) if view.status.credentials_secret.is_none() => {
            Some("waiting for the database endpoint before starting servers".to_owned())
        }
        (_, Some(view)) => view.blocks_start.clone(),
        _ => None,
    };
    let observed = plan::Observed {
        pods: &refs.pods,
        claims: &refs.claims,
        gd: shared.gd.as_ref().map(|r| r.as_ref().map_err(|_| ())),
        start_blocked: start_blocked.as_deref(),
        listener_holders: &listener_holders,
        cordoned: &refs.cordoned,
        agent_image,
        now: refs.now,
    };
    let plan = plan::plan(ic, cluster, &rendered, &observed);
    let shared_problem = db
        .and_then(|v| v.problem.as_ref())
        .map(|p| (p.class.reason(), p.to_string()))
        .or_else(|| refs.cache.as_ref().and_then(|v| v.problem.clone()));
    let progress = status::Progress {
        plan: &plan,
        rendered: &rendered,
        database: db.map(|v| v.status.clone()),
        cache: refs.cache.as_ref().map(|v| v.status.clone()),
        listeners: listeners::statuses(ic, &refs.leases, refs.now),
        shared_problem,
    };
    let status = status::desired(ic, validated, Some(&progress), refs.now);
    let notes = notes(ic, &plan, &progress, &status);
    Some(Built {
        rendered,
        plan,
        status,
        notes,
    })
}

/// The Events a person should see about this reconcile: what newly went
/// wrong, drift, stalls, forced removals and listener hand-overs.
fn notes(
    ic: &IntegrationCluster,
    plan: &plan::Plan,
    progress: &status::Progress,
    desired: &IntegrationClusterStatus,
) -> Vec<Note> {
    let current = ic.status.clone().unwrap_or_default();
    let namespace = ic.namespace().unwrap_or_default();
    let mut notes = Vec::new();
    // Related to the node that now holds (or let go of) the listener.
    for (message, node) in listeners::handovers(&current.listeners, &desired.listeners) {
        notes.push(Note {
            regarding: Some(apply::pod_ref(&namespace, &node)),
            ..Note::new(EventType::Normal, "ListenerHandover", message)
        });
    }
    if let Some((reason, message)) = &progress.shared_problem
        && status::newly_true(&current, desired, condition::DEGRADED)
    {
        notes.push(Note::new(EventType::Warning, reason, message.clone()));
    }
    if status::newly_true(&current, desired, condition::CONFIG_DRIFT) {
        let message = format!("configuration drift: {}", drift_summary(plan));
        notes.push(Note::new(EventType::Normal, "ConfigDrift", message));
    }
    if let Some(why) = &plan.stalled
        && status::newly_true(&current, desired, condition::STALLED)
    {
        notes.push(Note::new(EventType::Warning, "RolloutStalled", why.clone()));
    }
    for node in &plan.forced {
        let message = format!(
            "{node}: drain timeout overridden by the {} annotation",
            crate::api::annotations::FORCE
        );
        notes.push(Note::new(EventType::Warning, "ForcedRemoval", message));
    }
    notes
}

fn drift_summary(plan: &plan::Plan) -> String {
    plan.drifted
        .iter()
        .map(|(node, why)| format!("{node} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes in dependency order: the shared objects the pods need, the
/// ownership the deletion policy asks for, then the node actions. The
/// one place a pause holds writes (the plan of a paused cluster has no
/// actions either).
async fn apply(
    ctx: &Context,
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
    built: &Built,
    refs: &Refs,
) -> Result<(), Error> {
    if ic.spec.paused {
        return Ok(());
    }
    let failed = at(Step::Apply);
    apply::ensure_shared(ctx, ic, &built.rendered)
        .await
        .map_err(&failed)?;
    let changed = apply::follow_deletion_policy(ctx, ic, &refs.claims)
        .await
        .map_err(&failed)?;
    if !changed.is_empty() {
        let policy = format!("{:?}", ic.spec.deletion_policy);
        info!(name = %ic.name_any(), %policy, objects = ?changed, "ownership follows the deletion policy");
    }
    let (access, actions) = futures::join!(
        apply::ensure_agent_access(ctx, ic, cluster),
        apply::execute(ctx, ic, &built.plan.actions)
    );
    access.and(actions).map_err(&failed)
}

/// When to look again: soon while nodes are on their way somewhere (pod
/// events usually come first, but the progress deadline is a matter of
/// time), at the resync once settled, sooner when the database or the
/// clock says so.
fn next_look(built: &Built, shared: &Shared, lock_break_in: Option<Duration>) -> Duration {
    let settled = matches!(built.status.phase, Some(Phase::Ready | Phase::Degraded))
        && built.plan.actions.is_empty()
        && built.plan.waiting.is_none();
    let mut next = if settled { RESYNC } else { RETRY };
    let db_retry = shared.db.as_ref().and_then(|v| v.retry_in);
    for due in [db_retry, lock_break_in, built.plan.recheck_in]
        .into_iter()
        .flatten()
    {
        next = next.min(due.max(Duration::from_secs(1)));
    }
    next
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
    let key = ObjectRef::from_obj(ic);
    let before = stores::version(&ctx.store, &key);
    let written = api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Failure::Write {
            kind: "IntegrationCluster".into(),
            what: format!("writing status of {name}"),
            source,
        })
        .map_err(at(Step::Status))?;
    stores::seen(
        &ctx.store,
        &key,
        before,
        written.resource_version().as_deref(),
    )
    .await;
    ctx.status_written(ic);
    if let Some(phase) = desired.phase {
        info!(namespace = %ic.namespace().unwrap_or_default(), %name, ?phase, "status updated");
    }
    Ok(())
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
/// until a reconcile gets past its actions and writes status again.
async fn report_error(ctx: &Context, ic: &IntegrationCluster, error: &Error) {
    let current = ic.status.clone().unwrap_or_default();
    let message = format!("{error}");
    let already = conditions::find(&current.conditions, condition::DEGRADED)
        .is_some_and(|c| c.reason == RECONCILE_ERROR && c.message == message);
    if already || error.step() == Some(Step::Status) {
        return;
    }
    let decided = conditions::Desired::new(condition::DEGRADED, true, RECONCILE_ERROR, message);
    // The operator has seen this generation, and says it failed on it.
    let desired = IntegrationClusterStatus {
        conditions: conditions::merge(
            &current.conditions,
            &[decided],
            ic.metadata.generation,
            Timestamp::now(),
        ),
        observed_generation: ic.metadata.generation,
        ..current.clone()
    };
    if let Err(e) = write_status(ctx, ic, &current, &desired).await {
        warn!(name = %ic.name_any(), error = %e, "reporting the reconcile error in status failed");
    }
}

pub fn error_policy(ic: Arc<IntegrationCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        return Action::requeue(Duration::from_secs(1));
    }
    let failures = ctx
        .failures
        .lock()
        .map_or(1, |f| f.get(&Context::key(&ic)).copied().unwrap_or(1));
    let delay = backoff(failures);
    warn!(name = %ic.name_any(), category = %error.category(), %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: Phase, ready: i32) -> IntegrationClusterStatus {
        IntegrationClusterStatus {
            phase: Some(phase),
            observed_generation: Some(1),
            ready_replicas: Some(ready),
            ..IntegrationClusterStatus::default()
        }
    }

    #[test]
    fn progress_is_written_at_most_once_a_second_a_new_phase_at_once() {
        let progressing = status(Phase::Progressing, 1);
        let more = status(Phase::Progressing, 2);
        let ready = status(Phase::Ready, 3);
        let just = Some(Duration::from_millis(300));
        assert_eq!(
            status_deferred(&progressing, &more, just),
            Some(Duration::from_millis(700))
        );
        assert_eq!(
            status_deferred(&progressing, &more, Some(STATUS_EVERY)),
            None
        );
        // Not written recently (or by another operator process): at once.
        assert_eq!(status_deferred(&progressing, &more, None), None);
        assert_eq!(status_deferred(&progressing, &ready, just), None);
        let newer = IntegrationClusterStatus {
            observed_generation: Some(2),
            ..more.clone()
        };
        assert_eq!(status_deferred(&progressing, &newer, just), None);
    }
}
