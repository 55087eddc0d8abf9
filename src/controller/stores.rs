//! The controller's caches: the objects a cluster owns (pods, volume
//! claims, listener Leases), read from the watches that also wake the
//! controller instead of a LIST per reconcile; and which clusters a Secret
//! or ConfigMap matters to, so a rotated one is noticed within seconds.

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::runtime::reflector::store::WriterDropped;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::api::IntegrationCluster;
use crate::naming::{self, labels};
use crate::workload;

/// What the owned-object watches have seen (label managed-by=operator).
#[derive(Clone)]
pub struct Stores {
    pub pods: Store<Pod>,
    pub claims: Store<PersistentVolumeClaim>,
    pub leases: Store<Lease>,
}

impl Stores {
    /// Waits until every store holds its watch's first full list. Before
    /// that a store is empty, and a reconcile reading it would take pods
    /// that exist for missing (a restarted operator recreated every pod
    /// and rewrote every status). Errs only if a watch is gone for good.
    pub async fn ready(&self) -> Result<(), WriterDropped> {
        self.pods.wait_until_ready().await?;
        self.claims.wait_until_ready().await?;
        self.leases.wait_until_ready().await
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
