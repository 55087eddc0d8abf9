//! Carries out a plan against the API server. Shared objects are applied
//! with server-side apply only when the desired fields differ from what the
//! server holds, so a settled cluster costs no writes.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, ObjectReference, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::info;

use super::plan::{Action, Departure};
use super::{Context, FIELD_MANAGER, Failure, stores};
use crate::api::{DatabaseMode, DeletionPolicy, IntegrationCluster};
use crate::cache;
use crate::database::managed;
use crate::naming;
use crate::protocol::{self, ONLINE_CONDITION};
use crate::render::Rendered;
use crate::validation::ValidatedCluster;
use crate::workload;

/// Whether every field of `desired` has the same value in `observed`.
/// Fields only the server sets (defaults, status, metadata) are ignored.
pub fn is_subset(desired: &Value, observed: &Value) -> bool {
    match (desired, observed) {
        (Value::Object(d), Value::Object(o)) => d
            .iter()
            .all(|(k, v)| v.is_null() || o.get(k).is_some_and(|ov| is_subset(v, ov))),
        (Value::Array(d), Value::Array(o)) => {
            d.len() == o.len() && d.iter().zip(o).all(|(a, b)| is_subset(a, b))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => desired == observed,
    }
}

/// Applies `desired` unless the store (what the watch last saw) already
/// holds it: a settled cluster costs no reads and no writes. A store a
/// moment behind costs at most one write the server finds unchanged.
async fn ensure<K>(api: &Api<K>, store: &Store<K>, desired: &K) -> Result<bool, Failure>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let current = stores::stored(store, desired);
    ensure_over(api, store, desired, current.as_deref()).await
}

/// Applies `desired` unless `current` already holds it.
async fn ensure_over<K>(
    api: &Api<K>,
    store: &Store<K>,
    desired: &K,
    current: Option<&K>,
) -> Result<bool, Failure>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = desired.name_any();
    let write = |source| Failure::Write {
        kind: K::kind(&K::DynamicType::default()).into_owned(),
        what: format!("{} {name}", K::kind(&K::DynamicType::default())),
        source,
    };
    let mut wanted = serde_json::to_value(desired).map_err(Failure::Serialize)?;
    if let Value::Object(map) = &mut wanted {
        map.insert(
            "apiVersion".into(),
            K::api_version(&K::DynamicType::default()).into(),
        );
        map.insert("kind".into(), K::kind(&K::DynamicType::default()).into());
    }
    if let Some(current) = current {
        let current = serde_json::to_value(current).map_err(Failure::Serialize)?;
        if is_subset(&wanted, &current) {
            return Ok(false);
        }
    }
    let written = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&wanted),
        )
        .await
        .map_err(write)?;
    let before = current.and_then(|c| c.meta().resource_version.clone());
    let after = written.meta().resource_version.as_deref();
    stores::seen(store, &ObjectRef::from_obj(desired), before, after).await;
    Ok(true)
}

/// One shared object to ensure: what it is (for the log), and the write.
type Ensuring<'a> = futures::future::BoxFuture<'a, Result<Option<&'static str>, Failure>>;

fn ensuring<'a, K>(what: &'static str, api: Api<K>, store: &'a Store<K>, desired: K) -> Ensuring<'a>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    Box::pin(async move {
        let changed = ensure(&api, store, &desired).await?;
        Ok(changed.then_some(what))
    })
}

/// What the agents may do and hold: their Role, its binding, and the
/// single-node listener Leases. In this order: the API server checks that
/// the operator holds every permission a bound Role grants, and a Role it
/// does not find yet fails the binding; a Lease comes after the Role that
/// no longer grants an earlier version's names. The pods do not wait for
/// any of it (their agents start seconds later and retry a refused call),
/// and the RBAC checks made these writes the slowest of a new cluster's.
pub async fn ensure_agent_access(
    ctx: &Context,
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
) -> Result<(), Failure> {
    let ns = ic.namespace().unwrap_or_default();
    let shared = &ctx.stores.shared;
    let mut changed = Vec::new();
    let roles = Api::namespaced(ctx.client.clone(), &ns);
    if ensure(&roles, &shared.roles, &workload::agent_role(ic, cluster)).await? {
        changed.push("agent Role");
    }
    let bindings = Api::namespaced(ctx.client.clone(), &ns);
    if ensure(&bindings, &shared.bindings, &workload::agent_binding(ic)).await? {
        changed.push("agent RoleBinding");
    }
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    for listener in workload::single_node_listeners(ic) {
        if ensure_listener_lease(&leases, &ctx.stores.leases, ic, listener).await? {
            changed.push("listener Lease");
        }
    }
    if !changed.is_empty() {
        info!(cluster = %ic.name_any(), ?changed, "applied the agents' access");
    }
    Ok(())
}

/// Runs every write to the end (a write given up half way may or may not
/// have happened), then reports the first failure, if any.
async fn all_of<T>(
    writes: impl IntoIterator<Item = impl std::future::Future<Output = Result<T, Failure>>>,
) -> Result<Vec<T>, Failure> {
    futures::future::join_all(writes)
        .await
        .into_iter()
        .collect()
}

/// The objects the servers share: the agent's ServiceAccount, the
/// ConfigMap, Services, PodDisruptionBudget, and the managed cache and
/// database when the spec asks for them. They do not depend on each other,
/// so they are applied at once; the pods that need them come after.
pub async fn ensure_shared(
    ctx: &Context,
    ic: &IntegrationCluster,
    rendered: &Rendered,
) -> Result<(), Failure> {
    let ns = ic.namespace().unwrap_or_default();
    let client = &ctx.client;
    let stores = &ctx.stores.shared;
    let services = || Api::<Service>::namespaced(client.clone(), &ns);
    let cms = || Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let sets = || Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let mut writes: Vec<Ensuring> = vec![
        ensuring(
            "agent ServiceAccount",
            Api::namespaced(client.clone(), &ns),
            &stores.accounts,
            workload::agent_account(ic),
        ),
        ensuring(
            "ConfigMap",
            cms(),
            &stores.config_maps,
            workload::config_map(ic, rendered),
        ),
        ensuring(
            "admin Service",
            services(),
            &stores.services,
            workload::admin_service(ic),
        ),
        ensuring(
            "client Service",
            services(),
            &stores.services,
            workload::client_service(ic),
        ),
        ensuring(
            "PodDisruptionBudget",
            Api::namespaced(client.clone(), &ns),
            &stores.budgets,
            workload::disruption_budget(ic),
        ),
    ];
    if let Some(cm) = cache::config_map(ic) {
        writes.push(ensuring("cache ConfigMap", cms(), &stores.config_maps, cm));
    }
    for (what, service) in [
        ("cache Service", cache::service(ic)),
        ("database Service", managed::service(ic)),
    ] {
        if let Some(service) = service {
            writes.push(ensuring(what, services(), &stores.services, service));
        }
    }
    for (what, set) in [
        ("cache StatefulSet", cache::stateful_set(ic)),
        ("database StatefulSet", managed::stateful_set(ic)),
    ] {
        if let Some(set) = set {
            writes.push(ensuring(what, sets(), &stores.sets, set));
        }
    }
    let changed: Vec<&str> = all_of(writes).await?.into_iter().flatten().collect();
    if !changed.is_empty() {
        info!(cluster = %ic.name_any(), ?changed, "applied shared objects");
    }
    Ok(())
}

/// A single-node listener's Lease. When it is missing but an earlier
/// operator version's Lease of the listener is there (named by
/// `listeners::legacy_lease_name`, a name two clusters could share), the
/// new Lease starts from the old one's record (`listeners::taking_over`).
/// The old one stays until the cluster is deleted (it owns it; the
/// operator may not delete Leases), and no agent Role grants it any more.
async fn ensure_listener_lease(
    api: &Api<Lease>,
    store: &Store<Lease>,
    ic: &IntegrationCluster,
    listener: &str,
) -> Result<bool, Failure> {
    let cluster = ic.name_any();
    let name = crate::listeners::lease_name(&cluster, listener);
    let desired = workload::listener_lease(ic, name.clone());
    let read = |what: &str| {
        let what = format!("Lease {what}");
        move |source| Failure::Read {
            kind: "Lease".into(),
            what,
            source,
        }
    };
    if let Some(current) = stores::stored(store, &desired) {
        return ensure_over(api, store, &desired, Some(&current)).await;
    }
    let old_name = crate::listeners::legacy_lease_name(&cluster, listener);
    let Some(old) = api.get_opt(&old_name).await.map_err(read(&old_name))? else {
        return ensure_over(api, store, &desired, None).await;
    };
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    match api
        .create(&params, &super::listeners::taking_over(desired, &old))
        .await
    {
        Ok(_) => {}
        // Another reconcile created it meanwhile.
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(source) => {
            return Err(Failure::Write {
                kind: "Lease".into(),
                what: format!("Lease {name}"),
                source,
            });
        }
    }
    info!(cluster = %cluster, lease = %name, earlier = %old_name,
        "took over an earlier version's listener Lease");
    Ok(true)
}

/// Says why a node's pod went: in the log, and in an Event about the pod.
async fn deleted(ctx: &Context, ic: &IntegrationCluster, node: &str, departure: &Departure) {
    let note = departure.note(node);
    info!(cluster = %ic.name_any(), %node, %note, "deleted pod");
    let pod = pod_ref(&ic.namespace().unwrap_or_default(), node);
    let reason = departure.event_reason();
    publish_about(ctx, ic, EventType::Normal, reason, note, Some(pod)).await;
}

/// Carries out `actions` in order. Creations and online gates that follow
/// each other are independent and go out at once (a new cluster's pods are
/// created in one round trip, not three); a failure stops the actions
/// after its batch, and the next reconcile plans again from what exists.
pub async fn execute(
    ctx: &Context,
    ic: &IntegrationCluster,
    actions: &[Action],
) -> Result<(), Failure> {
    for batch in actions.chunk_by(at_once) {
        all_of(batch.iter().map(|a| carry_out(ctx, ic, a))).await?;
    }
    Ok(())
}

/// Whether two neighbouring actions may run at the same time: creations of
/// claims or pods, and online gates; never a step of a node leaving.
fn at_once(a: &Action, b: &Action) -> bool {
    matches!(
        (a, b),
        (Action::CreateClaim(_), Action::CreateClaim(_))
            | (Action::CreatePod(_), Action::CreatePod(_))
            | (Action::SetOnline { .. }, Action::SetOnline { .. })
    )
}

async fn carry_out(ctx: &Context, ic: &IntegrationCluster, action: &Action) -> Result<(), Failure> {
    let ns = ic.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let create = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let write = |kind: &str, what: String| {
        let kind = kind.to_owned();
        move |source| Failure::Write { kind, what, source }
    };
    let pod_store = &ctx.stores.pods;
    let pod_key = |node: &str| ObjectRef::<Pod>::new(node).within(&ns);
    match action {
        Action::CreateClaim(claim) => {
            let created = ignore_conflict(claims.create(&create, claim).await).map_err(write(
                "PersistentVolumeClaim",
                format!("create claim {}", claim.name_any()),
            ))?;
            if let Some(created) = created {
                let after = created.resource_version();
                let key = ObjectRef::from_obj(claim.as_ref());
                stores::seen(&ctx.stores.claims, &key, None, after.as_deref()).await;
            }
        }
        Action::CreatePod(pod) => {
            let created = ignore_conflict(pods.create(&create, pod).await)
                .map_err(write("Pod", format!("create pod {}", pod.name_any())))?;
            info!(cluster = %ic.name_any(), node = %pod.name_any(), "created pod");
            if let Some(created) = created {
                let after = created.resource_version();
                stores::seen(pod_store, &pod_key(&pod.name_any()), None, after.as_deref()).await;
            }
        }
        Action::SetOnline { node, online } => {
            let before = stores::version(pod_store, &pod_key(node));
            let written = set_online(&pods, node, *online)
                .await
                .map_err(write("Pod", format!("set {node} online={online}")))?;
            info!(cluster = %ic.name_any(), %node, online, "set online gate");
            let after = written.resource_version();
            stores::seen(pod_store, &pod_key(node), before, after.as_deref()).await;
        }
        Action::AskOffline { node, offline } => {
            let desired = if *offline {
                protocol::Desired::Offline
            } else {
                protocol::Desired::Online
            };
            let patch = desired.patch();
            let before = stores::version(pod_store, &pod_key(node));
            let written = pods
                .patch(node, &super::merge_params(), &Patch::Merge(&patch))
                .await
                .map_err(write("Pod", format!("ask {node} to go {desired}")))?;
            info!(cluster = %ic.name_any(), %node, %desired, "asked the agent");
            let after = written.resource_version();
            stores::seen(pod_store, &pod_key(node), before, after.as_deref()).await;
        }
        Action::DeletePod { node, departure } => {
            let before = stores::version(pod_store, &pod_key(node));
            ignore_missing(
                pods.delete(node, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            )
            .map_err(write("Pod", format!("delete pod {node}")))?;
            deleted(ctx, ic, node, departure).await;
            stores::seen(pod_store, &pod_key(node), before, None).await;
        }
        Action::DeleteClaim { name } => {
            ignore_missing(
                claims
                    .delete(name, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            )
            .map_err(write(
                "PersistentVolumeClaim",
                format!("delete claim {name}"),
            ))?;
            publish(
                ctx,
                ic,
                EventType::Normal,
                "VolumeDeleted",
                format!("Deleted {name} (deletionPolicy: Delete)"),
            )
            .await;
        }
    }
    Ok(())
}

async fn set_online(pods: &Api<Pod>, node: &str, online: bool) -> Result<Pod, kube::Error> {
    let (status, reason, message) = if online {
        ("True", "NodeOnline", "the operator put the node online")
    } else {
        ("False", "NodeOffline", "the operator took the node offline")
    };
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": node},
        "status": {"conditions": [{
            "type": ONLINE_CONDITION,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": Timestamp::now().to_string(),
        }]},
    });
    pods.patch_status(
        node,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// The created object; None when it already existed.
fn ignore_conflict<T>(result: Result<T, kube::Error>) -> Result<Option<T>, kube::Error> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        other => other.map(Some),
    }
}

fn ignore_missing(result: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other,
    }
}

/// Publishes an Event about the cluster; a failure is logged, not fatal.
pub async fn publish(
    ctx: &Context,
    ic: &IntegrationCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_about(ctx, ic, type_, reason, note, None).await;
}

/// A reference to a pod, as an Event's related object.
pub fn pod_ref(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        ..ObjectReference::default()
    }
}

/// Publishes an Event about the cluster and a related object.
///
/// Each Event gets a recorder of its own: kube's `Recorder` folds Events
/// with the same reason, type and objects into one series that keeps the
/// *first* note, so a second drift, a second forced node or a later
/// database error would show the old text. The operator publishes only when
/// something changed, so there is nothing worth folding.
pub async fn publish_about(
    ctx: &Context,
    ic: &IntegrationCluster,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<ObjectReference>,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(&note, 1000)),
        action: "Reconcile".into(),
        secondary: related,
    };
    let recorder = Recorder::new(ctx.client.clone(), Reporter::from(FIELD_MANAGER));
    if let Err(e) = recorder.publish(&event, &ic.object_ref(&())).await {
        tracing::warn!(cluster = %ic.name_any(), error = %e, "publishing event failed");
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// On deletion with `deletionPolicy: Retain`: the claims kept. Any still
/// owned by the cluster lose that owner reference first.
pub async fn release_claims(
    ctx: &Context,
    ic: &IntegrationCluster,
) -> Result<Vec<String>, Failure> {
    let claims = ctx.stores.claims(ic);
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &ic.namespace().unwrap_or_default());
    let mut kept = Vec::new();
    for claim in claims {
        release(&api, ic, &claim).await?;
        kept.push(claim.name_any());
    }
    Ok(kept)
}

/// Removes the cluster's owner reference from `object`, if it has one, so
/// the garbage collector keeps it when the cluster goes.
pub async fn release<K>(api: &Api<K>, ic: &IntegrationCluster, object: &K) -> Result<(), Failure>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    set_owned(api, ic, object, false).await.map(|_| ())
}

/// Claims and database Secrets are owned by the cluster exactly when its
/// deletion policy is Delete (`workload::data_meta`); a changed policy is
/// carried over to the ones that exist. Returns the names changed.
pub async fn follow_deletion_policy(
    ctx: &Context,
    ic: &IntegrationCluster,
    claims: &[PersistentVolumeClaim],
) -> Result<Vec<String>, Failure> {
    let owned = ic.spec.deletion_policy == DeletionPolicy::Delete;
    let ns = ic.namespace().unwrap_or_default();
    let mut changed = Vec::new();
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    for claim in claims {
        if set_owned(&claims_api, ic, claim, owned).await? {
            changed.push(claim.name_any());
        }
    }
    let Some(database) = &ic.spec.database else {
        return Ok(changed);
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut names = vec![naming::database_credentials(&ic.name_any())];
    if database.mode == DatabaseMode::Managed {
        names.push(naming::database_admin_secret(&ic.name_any()));
    }
    for name in names {
        let secret = secrets
            .get_opt(&name)
            .await
            .map_err(|source| Failure::Read {
                kind: "Secret".into(),
                what: format!("Secret {name}"),
                source,
            })?;
        if let Some(secret) = secret
            && set_owned(&secrets, ic, &secret, owned).await?
        {
            changed.push(name);
        }
    }
    Ok(changed)
}

/// Adds or removes the cluster's controller reference on `object`; false
/// when it already was as wanted (no write).
async fn set_owned<K>(
    api: &Api<K>,
    ic: &IntegrationCluster,
    object: &K,
    owned: bool,
) -> Result<bool, Failure>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    if workload::is_owned_by(object.meta(), ic) == owned {
        return Ok(false);
    }
    let mut references: Vec<_> = object
        .owner_references()
        .iter()
        .filter(|o| Some(&o.uid) != ic.metadata.uid.as_ref())
        .cloned()
        .collect();
    if owned {
        references.extend(workload::owner_reference(ic));
    }
    let name = object.name_any();
    let patch = serde_json::json!({"metadata": {"ownerReferences": references}});
    api.patch(&name, &super::merge_params(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Failure::Write {
            kind: K::kind(&K::DynamicType::default()).into_owned(),
            what: format!(
                "{} the owner reference of {} {name}",
                if owned { "add" } else { "remove" },
                K::kind(&K::DynamicType::default())
            ),
            source,
        })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[test]
    fn server_defaults_do_not_count_as_differences() {
        let desired = json!({"spec": {"ports": [{"name": "primary", "port": 5555}]}});
        let observed = json!({"spec": {"ports": [{"name": "primary", "port": 5555, "protocol": "TCP"}], "clusterIP": "10.96.0.9"}});
        assert!(is_subset(&desired, &observed));
    }

    #[test]
    fn a_changed_or_missing_field_does() {
        let desired = json!({"data": {"a": "1", "b": "2"}});
        assert!(!is_subset(&desired, &json!({"data": {"a": "1", "b": "3"}})));
        assert!(!is_subset(&desired, &json!({"data": {"a": "1"}})));
        assert!(!is_subset(&json!({"l": [1, 2]}), &json!({"l": [1]})));
    }

    #[test]
    fn maps_compare_by_key() {
        let a: BTreeMap<&str, i32> = BTreeMap::from([("x", 1)]);
        assert!(is_subset(&json!(a), &json!({"x": 1.0, "y": 2})));
    }
}
