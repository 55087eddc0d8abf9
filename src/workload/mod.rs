//! Builders of the Kubernetes objects a cluster consists of. Pure functions
//! of the validated cluster and its rendered configuration: they take no
//! client, so what the operator would create is unit-tested here.

mod agent_access;
mod pod;
mod services;
pub mod stateful;

pub use agent_access::{
    agent_account, agent_binding, agent_role, listener_lease, listener_leases,
    single_node_listeners,
};
pub use pod::{AGENT_IMAGE, agent_image, containers_ready, digests_of, is_online, is_ready, pod};
pub use services::{admin_service, client_service, config_map, data_claim, disruption_budget};

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::api::{DeletionPolicy, IntegrationCluster, Profile};
use crate::naming::labels;

/// Labels on every object of a cluster; the cluster label alone selects them.
pub fn cluster_labels(ic: &IntegrationCluster) -> BTreeMap<String, String> {
    let name = ic.metadata.name.clone().unwrap_or_default();
    let product = match ic.spec.profile {
        Profile::WebmethodsIs => "webmethods-is",
        Profile::Wso2Carbon => "wso2-carbon",
        Profile::Generic => "integration-server",
    };
    BTreeMap::from([
        (labels::NAME.to_owned(), product.to_owned()),
        (labels::INSTANCE.to_owned(), name.clone()),
        (labels::MANAGED_BY.to_owned(), labels::OPERATOR.to_owned()),
        (labels::CLUSTER.to_owned(), name),
    ])
}

/// The selector of a cluster's server pods.
pub fn server_selector(ic: &IntegrationCluster) -> BTreeMap<String, String> {
    stateful::component_selector(ic, "server")
}

/// Metadata of an object owned by the cluster, so it is garbage collected
/// with it.
pub fn owned_meta(ic: &IntegrationCluster, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ic.metadata.namespace.clone(),
        labels: Some(stateful::component_labels(ic, component)),
        owner_references: owner_reference(ic).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Metadata of an object that holds data (a volume claim, a database
/// Secret): owned by the cluster only under `deletionPolicy: Delete`. Under
/// Retain nothing owns it, so no deletion mode (foreground, background, a
/// namespace going) lets the garbage collector take it.
pub fn data_meta(ic: &IntegrationCluster, name: String, component: &str) -> ObjectMeta {
    let mut meta = owned_meta(ic, name, component);
    if ic.spec.deletion_policy != DeletionPolicy::Delete {
        meta.owner_references = None;
    }
    meta
}

/// Whether `meta` names the cluster (this incarnation, by UID) as an owner.
pub fn is_owned_by(meta: &ObjectMeta, ic: &IntegrationCluster) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| Some(&o.uid) == ic.metadata.uid.as_ref())
}

/// The controller owner reference to the cluster.
pub fn owner_reference(ic: &IntegrationCluster) -> Option<OwnerReference> {
    ic.controller_owner_ref(&())
}
