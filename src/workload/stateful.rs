//! What the objects of the managed cache and database share with each
//! other and with the server pods: labels and selectors by component, the
//! restricted security contexts, named TCP ports, the volume claim
//! template with its retention, and where the pods may run.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSetPersistentVolumeClaimRetentionPolicy;
use k8s_openapi::api::core::v1::{
    Capabilities, ContainerPort, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodSecurityContext, PodSpec, SeccompProfile, SecurityContext, ServicePort,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::cluster_labels;
use crate::api::{DeletionPolicy, IntegrationCluster};
use crate::naming::labels;

/// The cluster's labels plus the component's.
pub fn component_labels(ic: &IntegrationCluster, component: &str) -> BTreeMap<String, String> {
    let mut labels = cluster_labels(ic);
    labels.insert(labels::COMPONENT.to_owned(), component.to_owned());
    labels
}

/// The selector of one component's pods: only labels that never change,
/// since a StatefulSet's selector is immutable.
pub fn component_selector(ic: &IntegrationCluster, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            labels::CLUSTER.to_owned(),
            ic.metadata.name.clone().unwrap_or_default(),
        ),
        (labels::COMPONENT.to_owned(), component.to_owned()),
    ])
}

/// The restricted Pod Security Standard for a container.
pub fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

/// The restricted Pod Security Standard for a pod running as the image's
/// own `user`, so that non-root is verifiable and volumes are writable.
pub fn restricted_pod(user: Option<i64>) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: user,
        fs_group: user,
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// The `data` claim template of a StatefulSet. It carries the component's
/// labels but no owner reference: the controller treats claims the cluster
/// owns as server node claims (and deletes those of departed nodes); these
/// follow [`claim_retention`] instead.
pub fn claim_template(
    ic: &IntegrationCluster,
    component: &str,
    size: &str,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".to_owned()),
            labels: Some(component_labels(ic, component)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(size.to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// Claims follow `deletionPolicy` through the StatefulSet controller
/// (Delete removes them with the StatefulSet, which goes with the cluster);
/// a scale-down keeps them, so a server that comes back finds its data.
pub fn claim_retention(ic: &IntegrationCluster) -> StatefulSetPersistentVolumeClaimRetentionPolicy {
    let when_deleted = match ic.spec.deletion_policy {
        DeletionPolicy::Retain => "Retain",
        DeletionPolicy::Delete => "Delete",
    };
    StatefulSetPersistentVolumeClaimRetentionPolicy {
        when_deleted: Some(when_deleted.to_owned()),
        when_scaled: Some("Retain".to_owned()),
    }
}

/// A named TCP port of a container.
pub fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

/// A Service port that targets the container port of the same name.
pub fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// Places a pod of `ic` where `spec.scheduling` says.
pub fn schedule(ic: &IntegrationCluster, pod: &mut PodSpec) {
    let Some(scheduling) = &ic.spec.scheduling else {
        return;
    };
    if !scheduling.node_selector.is_empty() {
        pod.node_selector = Some(scheduling.node_selector.clone());
    }
    if !scheduling.tolerations.is_empty() {
        pod.tolerations = Some(scheduling.tolerations.clone());
    }
    pod.affinity.clone_from(&scheduling.affinity);
}
