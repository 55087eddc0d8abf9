//! What the in-pod agents may do: read and annotate their own cluster's
//! server pods (by name), read and renew their listener Leases (by name)
//! and publish Events. Nothing else.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::owned_meta;
use crate::api::{IntegrationCluster, ListenerMode};
use crate::naming;
use crate::validation::ValidatedCluster;

fn name(ic: &IntegrationCluster) -> String {
    naming::agent_account(ic.metadata.name.as_deref().unwrap_or_default())
}

pub fn agent_account(ic: &IntegrationCluster) -> ServiceAccount {
    ServiceAccount {
        metadata: owned_meta(ic, name(ic), "agent"),
        ..ServiceAccount::default()
    }
}

pub fn agent_role(ic: &IntegrationCluster, cluster: &ValidatedCluster) -> Role {
    let pods: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).collect();
    Role {
        metadata: owned_meta(ic, name(ic), "agent"),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods".into()]),
                resource_names: Some(pods),
                verbs: vec!["get".into(), "patch".into()],
                ..PolicyRule::default()
            },
            // Single-node listener Leases, by name: the operator creates
            // them, the agents only read and replace them.
            PolicyRule {
                api_groups: Some(vec!["coordination.k8s.io".into()]),
                resources: Some(vec!["leases".into()]),
                resource_names: Some(listener_leases(ic)),
                verbs: vec!["get".into(), "update".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec!["events.k8s.io".into()]),
                resources: Some(vec!["events".into()]),
                verbs: vec!["create".into(), "patch".into()],
                ..PolicyRule::default()
            },
        ]),
    }
}

/// The Lease names of the cluster's single-node listeners.
pub fn listener_leases(ic: &IntegrationCluster) -> Vec<String> {
    let cluster = ic.metadata.name.as_deref().unwrap_or_default();
    ic.spec
        .listeners
        .iter()
        .filter(|l| l.mode == ListenerMode::SingleNode)
        .map(|l| crate::listeners::lease_name(cluster, &l.name))
        .collect()
}

/// An empty Lease for a single-node listener, owned by the cluster; the
/// agents fill in the holder.
pub fn listener_lease(ic: &IntegrationCluster, name: String) -> Lease {
    Lease {
        metadata: owned_meta(ic, name, "listener"),
        spec: None,
    }
}

pub fn agent_binding(ic: &IntegrationCluster) -> RoleBinding {
    RoleBinding {
        metadata: owned_meta(ic, name(ic), "agent"),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name(ic),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name(ic),
            namespace: ic.metadata.namespace.clone(),
            api_group: None,
        }]),
    }
}
