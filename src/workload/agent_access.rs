//! What the in-pod agents may do: read, watch and annotate their own
//! cluster's server pods (by name), read, watch and renew their listener
//! Leases (by name) and publish Events. Nothing else.

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
    let by_name = |group: &str, resource: &str, names: Vec<String>, verbs: &[&str]| {
        // RBAC reads an empty resourceNames as "every object": a rule
        // with no names to grant is left out instead.
        (!names.is_empty()).then(|| PolicyRule {
            api_groups: Some(vec![group.to_owned()]),
            resources: Some(vec![resource.to_owned()]),
            resource_names: Some(names),
            verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
            ..PolicyRule::default()
        })
    };
    let rules = [
        // An agent watches its own pod. RBAC grants a list or watch by
        // name only to a request that selects metadata.name=<that name>,
        // so an agent can never list the namespace's pods.
        by_name("", "pods", pods, &["get", "list", "watch", "patch"]),
        // Single-node listener Leases, by name: the operator creates them,
        // the agents only read, watch (to see a release at once) and
        // replace them. As with pods, a list or watch is granted only to
        // a request that selects one of these names.
        by_name(
            "coordination.k8s.io",
            "leases",
            listener_leases(ic),
            &["get", "list", "watch", "update"],
        ),
        Some(PolicyRule {
            api_groups: Some(vec!["events.k8s.io".into()]),
            resources: Some(vec!["events".into()]),
            verbs: vec!["create".into(), "patch".into()],
            ..PolicyRule::default()
        }),
    ];
    Role {
        metadata: owned_meta(ic, name(ic), "agent"),
        rules: Some(rules.into_iter().flatten().collect()),
    }
}

/// The names of the cluster's single-node listeners.
pub fn single_node_listeners(ic: &IntegrationCluster) -> impl Iterator<Item = &str> {
    ic.spec
        .listeners
        .iter()
        .filter(|l| l.mode == ListenerMode::SingleNode)
        .map(|l| l.name.as_str())
}

/// The Lease names of the cluster's single-node listeners.
pub fn listener_leases(ic: &IntegrationCluster) -> Vec<String> {
    let cluster = ic.metadata.name.as_deref().unwrap_or_default();
    single_node_listeners(ic)
        .map(|l| crate::listeners::lease_name(cluster, l))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn role(yaml: &str) -> Role {
        let spec = serde_saphyr::from_str(yaml).expect("spec");
        let mut ic = IntegrationCluster::new("c", spec);
        ic.metadata.namespace = Some("ns".into());
        let cluster = crate::validation::validate(&ic, &[]).expect("valid");
        agent_role(&ic, &cluster)
    }

    #[test]
    fn agents_get_only_named_objects_never_a_whole_resource() {
        let with = role(
            "profile: generic\nmode: stateless\nimage: s\nreplicas: 2\nlisteners: [{name: in, mode: singleNode}]\n",
        );
        let rules = with.rules.expect("rules");
        assert_eq!(rules.len(), 3);
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["c-0".to_owned(), "c-1".to_owned()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch", "patch"]);
        assert_eq!(
            rules[1].resource_names.as_deref(),
            Some(&["c.listener.in".to_owned()][..])
        );
        assert_eq!(rules[1].verbs, ["get", "list", "watch", "update"]);
        // No listeners and no nodes: no pod or lease rule at all (an empty
        // resourceNames would grant every object).
        let none = role("profile: generic\nmode: stateless\nimage: s\nreplicas: 0\n");
        let rules = none.rules.expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["events".to_owned()][..])
        );
    }
}
