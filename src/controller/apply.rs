//! Carries out a plan against the API server. Shared objects are applied
//! with server-side apply only when the desired fields differ from what the
//! server holds, so a settled cluster costs no writes.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::core::v1::{
    ConfigMap, ObjectReference, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::info;

use super::plan::{Action, Departure};
use super::{Context, FIELD_MANAGER, Failure};
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

/// Applies `desired` unless the server already holds it.
async fn ensure<K>(api: &Api<K>, desired: &K) -> Result<bool, Failure>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = desired.name_any();
    let current = api.get_opt(&name).await.map_err(|source| Failure::Read {
        kind: K::kind(&K::DynamicType::default()).into_owned(),
        what: format!("{} {name}", K::kind(&K::DynamicType::default())),
        source,
    })?;
    ensure_over(api, desired, current).await
}

/// Applies `desired` unless `current` (as just read) already holds it.
async fn ensure_over<K>(api: &Api<K>, desired: &K, current: Option<K>) -> Result<bool, Failure>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
    K::DynamicType: Default,
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
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&wanted),
    )
    .await
    .map_err(write)?;
    Ok(true)
}

/// ConfigMap, Services and PodDisruptionBudget, in dependency order.
pub async fn ensure_shared(
    ctx: &Context,
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
    rendered: &Rendered,
) -> Result<(), Failure> {
    let ns = ic.namespace().unwrap_or_default();
    let client = ctx.client.clone();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let mut changed = Vec::new();
    if ensure(&accounts, &workload::agent_account(ic)).await? {
        changed.push("agent ServiceAccount");
    }
    if ensure(&roles, &workload::agent_role(ic, cluster)).await? {
        changed.push("agent Role");
    }
    if ensure(&bindings, &workload::agent_binding(ic)).await? {
        changed.push("agent RoleBinding");
    }
    if ensure(&cms, &workload::config_map(ic, rendered)).await? {
        changed.push("ConfigMap");
    }
    if ensure(&services, &workload::admin_service(ic)).await? {
        changed.push("admin Service");
    }
    if ensure(&services, &workload::client_service(ic)).await? {
        changed.push("client Service");
    }
    if ensure(&pdbs, &workload::disruption_budget(ic)).await? {
        changed.push("PodDisruptionBudget");
    }
    // Single-node listener Leases (empty until an agent holds them), after
    // the agent Role: it no longer grants an earlier version's names.
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    for listener in workload::single_node_listeners(ic) {
        if ensure_listener_lease(&leases, ic, listener).await? {
            changed.push("listener Lease");
        }
    }
    // The managed cache and database, when the spec asks for them.
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(cm) = cache::config_map(ic)
        && ensure(&cms, &cm).await?
    {
        changed.push("cache ConfigMap");
    }
    for (what, service) in [
        ("cache Service", cache::service(ic)),
        ("database Service", managed::service(ic)),
    ] {
        if let Some(service) = service
            && ensure(&services, &service).await?
        {
            changed.push(what);
        }
    }
    for (what, set) in [
        ("cache StatefulSet", cache::stateful_set(ic)),
        ("database StatefulSet", managed::stateful_set(ic)),
    ] {
        if let Some(set) = set
            && ensure(&sets, &set).await?
        {
            changed.push(what);
        }
    }
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
    let current = api.get_opt(&name).await.map_err(read(&name))?;
    if current.is_some() {
        return ensure_over(api, &desired, current).await;
    }
    let old_name = crate::listeners::legacy_lease_name(&cluster, listener);
    let Some(old) = api.get_opt(&old_name).await.map_err(read(&old_name))? else {
        return ensure_over(api, &desired, None).await;
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

/// Carries out `actions` in order; the first failure stops the rest (the
/// next reconcile plans again from what then exists).
pub async fn execute(
    ctx: &Context,
    ic: &IntegrationCluster,
    actions: &[Action],
) -> Result<(), Failure> {
    let ns = ic.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let create = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    for action in actions {
        let write = |kind: &str, what: String| {
            let kind = kind.to_owned();
            move |source| Failure::Write { kind, what, source }
        };
        match action {
            Action::CreateClaim(claim) => {
                ignore_conflict(claims.create(&create, claim).await).map_err(write(
                    "PersistentVolumeClaim",
                    format!("create claim {}", claim.name_any()),
                ))?;
            }
            Action::CreatePod(pod) => {
                ignore_conflict(pods.create(&create, pod).await)
                    .map_err(write("Pod", format!("create pod {}", pod.name_any())))?;
                info!(cluster = %ic.name_any(), node = %pod.name_any(), "created pod");
            }
            Action::SetOnline { node, online } => {
                set_online(&pods, node, *online)
                    .await
                    .map_err(write("Pod", format!("set {node} online={online}")))?;
                info!(cluster = %ic.name_any(), %node, online, "set online gate");
            }
            Action::AskOffline { node, offline } => {
                let desired = if *offline {
                    protocol::Desired::Offline
                } else {
                    protocol::Desired::Online
                };
                let patch = desired.patch();
                pods.patch(node, &super::merge_params(), &Patch::Merge(&patch))
                    .await
                    .map_err(write("Pod", format!("ask {node} to go {desired}")))?;
                info!(cluster = %ic.name_any(), %node, %desired, "asked the agent");
            }
            Action::DeletePod { node, departure } => {
                ignore_missing(
                    pods.delete(node, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                )
                .map_err(write("Pod", format!("delete pod {node}")))?;
                deleted(ctx, ic, node, departure).await;
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
    }
    Ok(())
}

async fn set_online(pods: &Api<Pod>, node: &str, online: bool) -> Result<(), kube::Error> {
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
    .map(|_| ())
}

fn ignore_conflict<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        other => other.map(|_| ()),
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
