//! Services, the ConfigMap, the PodDisruptionBudget and volume claims.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, PersistentVolumeClaimSpec, Service, ServiceSpec,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::stateful::service_port;
use super::{data_meta, owned_meta, server_selector};
use crate::api::{IntegrationCluster, StorageSpec};
use crate::naming::{self, labels};
use crate::render::Rendered;

fn name(ic: &IntegrationCluster) -> &str {
    ic.metadata.name.as_deref().unwrap_or_default()
}

/// Client traffic: endpoints are ready only for pods that are Ready, and a
/// server pod is Ready only while its online gate is True.
pub fn client_service(ic: &IntegrationCluster) -> Service {
    Service {
        metadata: owned_meta(ic, naming::client_service(name(ic)), "client"),
        spec: Some(ServiceSpec {
            selector: Some(server_selector(ic)),
            ports: Some(vec![service_port("primary", ic.spec.server.ports.primary)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Administration: headless, publishing not-ready addresses, so every node
/// (offline ones too) has a stable DNS name `<node>.<cluster>-admin`.
pub fn admin_service(ic: &IntegrationCluster) -> Service {
    let ports = &ic.spec.server.ports;
    Service {
        metadata: owned_meta(ic, naming::admin_service(name(ic)), "admin"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(server_selector(ic)),
            ports: Some(vec![
                service_port("primary", ports.primary),
                service_port("diagnostic", ports.diagnostic),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The rendered configuration.
pub fn config_map(ic: &IntegrationCluster, rendered: &Rendered) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(ic, naming::config_map(name(ic)), "config"),
        data: Some(rendered.data.clone()),
        ..ConfigMap::default()
    }
}

/// Refuses every voluntary eviction of a server pod: `kubectl drain` and
/// other evictions wait while the operator moves the pods itself, through
/// the node workflow (quiesce, drain, then delete), once it sees the
/// Kubernetes node cordoned. The operator deletes pods rather than evicting
/// them, so the budget never blocks its own work. The disruption
/// controller reads the expected count through the cluster's scale
/// subresource.
pub fn disruption_budget(ic: &IntegrationCluster) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owned_meta(ic, name(ic).to_owned(), "server"),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(0)),
            selector: Some(LabelSelector {
                match_labels: Some(server_selector(ic)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The volume claim of one node.
pub fn data_claim(
    ic: &IntegrationCluster,
    node: &str,
    storage: &StorageSpec,
) -> PersistentVolumeClaim {
    let mut meta = data_meta(ic, naming::data_claim(node), "data");
    if let Some(labels) = meta.labels.as_mut() {
        labels.insert(labels::NODE.to_owned(), node.to_owned());
    }
    PersistentVolumeClaim {
        metadata: meta,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}
