//! The controller's caches: the objects a cluster owns, read from the
//! watches that also wake the controller instead of a GET or LIST per
//! reconcile (a settled cluster's reconcile reads nothing from the API
//! server); and which clusters a Secret or ConfigMap matters to, so a
//! rotated one is noticed within seconds.
//!
//! The stores keep slimmed objects (`slim`, `slim_pod`): at a thousand
//! clusters the managed fields and the pods' full specs were most of the
//! operator's memory, and no reconcile reads them.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::{self, BoxFuture};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolumeClaim, Pod, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::store::WriterDropped;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::api::IntegrationCluster;
use crate::naming::{self, labels};
use crate::workload;

/// What the owned-object watches have seen (label managed-by=operator).
#[derive(Clone)]
pub struct Stores {
    pub pods: Store<Pod>,
    pub claims: Store<PersistentVolumeClaim>,
    pub leases: Store<Lease>,
    pub shared: Shared,
}

/// The objects the servers of a cluster share, which `apply::ensure_shared`
/// compares with what it would apply.
#[derive(Clone)]
pub struct Shared {
    pub accounts: Store<ServiceAccount>,
    pub roles: Store<Role>,
    pub bindings: Store<RoleBinding>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    pub budgets: Store<PodDisruptionBudget>,
    pub sets: Store<StatefulSet>,
}

/// The stored object of `desired`'s kind, namespace and name.
pub fn stored<K>(store: &Store<K>, desired: &K) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::from_obj(desired))
}

/// Drops what no reconcile reads and what can be most of an object's
/// size: the managed fields and kubectl's copy of the last applied object.
pub fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A pod as the plan reads it: its metadata, its node, its containers'
/// names and images (drift), and its status; not volumes, environment,
/// probes or resources, which the plan compares through digests.
pub fn slim_pod(pod: &mut Pod) {
    slim(pod);
    if let Some(spec) = pod.spec.as_mut() {
        let containers = std::mem::take(&mut spec.containers)
            .into_iter()
            .map(|c| Container {
                name: c.name,
                image: c.image,
                ..Container::default()
            })
            .collect();
        *spec = PodSpec {
            node_name: spec.node_name.take(),
            containers,
            ..PodSpec::default()
        };
    }
}

/// Resolves once every store holds its watch's first full list: true, or
/// false if a watch is gone for good. Any number of reconciles may await
/// (clones of) it.
pub type Ready = future::Shared<BoxFuture<'static, bool>>;

impl Stores {
    /// Before the first full lists a store is empty, and a reconcile
    /// reading it would take pods that exist for missing (a restarted
    /// operator recreated every pod and rewrote every status). Reconciles
    /// wait on this one shared future, which alone waits on the stores:
    /// kube-runtime's `Store::wait_until_ready` wakes only the last of
    /// several waiters (one oneshot receiver, one waker), and after a
    /// restart all but one of the early reconciles sat out their deadline.
    pub fn ready(&self, nodes: Store<Node>) -> Ready {
        let stores = self.clone();
        async move { stores.listed().await.is_ok() && nodes.wait_until_ready().await.is_ok() }
            .boxed()
            .shared()
    }

    async fn listed(&self) -> Result<(), WriterDropped> {
        self.pods.wait_until_ready().await?;
        self.claims.wait_until_ready().await?;
        self.leases.wait_until_ready().await?;
        let shared = &self.shared;
        shared.accounts.wait_until_ready().await?;
        shared.roles.wait_until_ready().await?;
        shared.bindings.wait_until_ready().await?;
        shared.config_maps.wait_until_ready().await?;
        shared.services.wait_until_ready().await?;
        shared.budgets.wait_until_ready().await?;
        shared.sets.wait_until_ready().await
    }

    /// The cluster's server pods.
    pub fn pods(&self, ic: &IntegrationCluster) -> Vec<Pod> {
        of_cluster(&self.pods, ic, "server")
            .into_iter()
            .filter(|p| workload::is_owned_by(&p.metadata, ic))
            .collect()
    }

    /// The cluster's data claims. Retained claims are owned by nobody
    /// (`workload::data_meta`): they are the cluster's by their labels,
    /// also after it was deleted and created again under the same name.
    pub fn claims(&self, ic: &IntegrationCluster) -> Vec<PersistentVolumeClaim> {
        of_cluster(&self.claims, ic, "data")
    }

    /// The cluster's listener Leases.
    pub fn leases(&self, ic: &IntegrationCluster) -> Vec<Lease> {
        self.leases
            .state()
            .iter()
            .filter(|l| {
                l.namespace() == ic.namespace()
                    && label(l.as_ref(), labels::CLUSTER) == Some(&ic.name_any())
            })
            .map(|l| l.as_ref().clone())
            .collect()
    }
}

fn label<'a, K: ResourceExt>(object: &'a K, key: &str) -> Option<&'a String> {
    object.labels().get(key)
}

fn of_cluster<K>(store: &Store<K>, ic: &IntegrationCluster, component: &str) -> Vec<K>
where
    K: kube::Resource<DynamicType = ()> + ResourceExt + Clone + 'static,
{
    let name = ic.name_any();
    store
        .state()
        .iter()
        .filter(|o| {
            o.namespace() == ic.namespace()
                && label(o.as_ref(), labels::CLUSTER) == Some(&name)
                && label(o.as_ref(), labels::COMPONENT).map(String::as_str) == Some(component)
        })
        .map(|o| o.as_ref().clone())
        .collect()
}

/// The Secrets whose contents a cluster depends on: the configuration
/// sources, the server's admin credentials, the cache licence, the
/// external database's admin URL and the cluster's database credentials.
pub fn secrets_of(ic: &IntegrationCluster) -> Vec<String> {
    let spec = &ic.spec;
    let mut names: Vec<String> = spec
        .server
        .config_from
        .iter()
        .filter_map(|s| s.secret_ref.as_ref().map(|r| r.name.clone()))
        .collect();
    names.extend(
        spec.server
            .admin_secret_ref
            .as_ref()
            .map(|r| r.name.clone()),
    );
    names.extend(
        spec.cache
            .as_ref()
            .and_then(|c| c.managed.as_ref()?.license_secret_ref.as_ref())
            .map(|r| r.name.clone()),
    );
    names.extend(
        spec.database
            .as_ref()
            .and_then(|d| d.external.as_ref())
            .map(|e| e.secret_ref.name.clone()),
    );
    if spec.database.is_some() {
        names.push(naming::database_credentials(&ic.name_any()));
    }
    names
}

/// The ConfigMaps a cluster's configuration is made from.
pub fn config_maps_of(ic: &IntegrationCluster) -> Vec<String> {
    ic.spec
        .server
        .config_from
        .iter()
        .filter_map(|s| s.config_map_ref.as_ref().map(|r| r.name.clone()))
        .collect()
}

/// The clusters in `clusters` that a change of `object` (a Secret or a
/// ConfigMap, as `names_of` reads a cluster) matters to.
pub fn clusters_using(
    clusters: &[Arc<IntegrationCluster>],
    object: &ObjectMeta,
    names_of: fn(&IntegrationCluster) -> Vec<String>,
) -> Vec<ObjectRef<IntegrationCluster>> {
    let Some(name) = &object.name else {
        return Vec::new();
    };
    clusters
        .iter()
        .filter(|ic| ic.namespace() == object.namespace && names_of(ic).contains(name))
        .map(|ic| ObjectRef::from_obj(ic.as_ref()))
        .collect()
}

/// How long a reconcile waits for the watch to bring back its own write.
const SEEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The object's resourceVersion in the store, None when it holds none.
pub fn version<K>(store: &Store<K>, key: &ObjectRef<K>) -> Option<String>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .get(key)
        .and_then(|o| o.meta().resource_version.clone())
}

/// Waits, at most `SEEN_WITHIN`, until the store no longer holds version
/// `before` of the object the reconcile just wrote (`after` is what the
/// write returned: the same version when the server changed nothing).
/// Reconciles of one cluster never overlap, so the next one then starts
/// from a store that holds this one's writes: it does not write the same
/// status again or create a pod that exists (each a wasted write, the
/// second refused).
pub async fn seen<K>(
    store: &Store<K>,
    key: &ObjectRef<K>,
    before: Option<String>,
    after: Option<&str>,
) where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    if before.as_deref() == after {
        return;
    }
    let deadline = tokio::time::Instant::now() + SEEN_WITHIN;
    while version(store, key) == before && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::runtime::reflector::{self, store::Writer};
    use kube::runtime::watcher;

    use super::*;

    fn listed<K>(mut writer: Writer<K>) -> Writer<K>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        writer
    }

    #[tokio::test]
    async fn every_waiting_reconcile_goes_on_once_the_lists_are_in() {
        let (pods, w1) = reflector::store::<Pod>();
        let (claims, w2) = reflector::store::<PersistentVolumeClaim>();
        let (leases, w3) = reflector::store::<Lease>();
        let (accounts, w4) = reflector::store::<ServiceAccount>();
        let (roles, w5) = reflector::store::<Role>();
        let (bindings, w6) = reflector::store::<RoleBinding>();
        let (config_maps, w7) = reflector::store::<ConfigMap>();
        let (services, w8) = reflector::store::<Service>();
        let (budgets, w9) = reflector::store::<PodDisruptionBudget>();
        let (sets, w10) = reflector::store::<StatefulSet>();
        let (nodes, w11) = reflector::store::<Node>();
        let stores = Stores {
            pods,
            claims,
            leases,
            shared: Shared {
                accounts,
                roles,
                bindings,
                config_maps,
                services,
                budgets,
                sets,
            },
        };
        let ready = stores.ready(nodes);
        // Eight reconciles (the default concurrency) start before the lists.
        let waiting: Vec<_> = (0..8).map(|_| tokio::spawn(ready.clone())).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _writers = (
            listed(w1),
            listed(w2),
            listed(w3),
            listed(w4),
            listed(w5),
            listed(w6),
            listed(w7),
            listed(w8),
            listed(w9),
            listed(w10),
            listed(w11),
        );
        for (n, reconcile) in waiting.into_iter().enumerate() {
            let went_on = tokio::time::timeout(Duration::from_secs(2), reconcile).await;
            assert!(
                matches!(went_on, Ok(Ok(true))),
                "reconcile {n} still waits for stores that hold their lists"
            );
        }
    }
}
