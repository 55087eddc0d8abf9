//! Checks the API server cannot make: rules that need derived names, the
//! cluster's history in status, or other IntegrationClusters.
//!
//! The CRD schema and its CEL rules already refused everything they can
//! express; this step turns an accepted spec into a [`ValidatedCluster`], the
//! only input later steps accept, or into a list of [`Problem`]s that status
//! and Events report with the field and the reason. It performs no I/O.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{CacheMode, IntegrationCluster, Mode, Profile};
use crate::naming;
use crate::render::webmethods_is;

/// A spec that passed every check, with the names derived from it.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedCluster {
    /// The normalised cluster name the servers use.
    pub cluster_name: String,
    /// Every member node, by ordinal.
    pub members: Vec<Member>,
}

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub name: String,
    pub ordinal: u32,
    pub logical_hostname: String,
}

/// Why a spec cannot be acted on. Each names the field a person must change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("spec.nodes.{list}: {node} is not a node of this cluster (members are {members})")]
    UnknownNode {
        list: &'static str,
        node: String,
        members: String,
    },
    #[error("spec.server.logicalHostnames: {node} is not a node of this cluster")]
    LogicalHostnameForUnknownNode { node: String },
    #[error("spec.server.logicalHostnames: {node}: a logical host name cannot contain ';'")]
    LogicalHostnameHasSemicolon { node: String },
    #[error(
        "spec.server.logicalHostnames: {first} and {second} would both use the scheduler logical host name {hostname}; each node needs its own"
    )]
    DuplicateLogicalHostname {
        first: String,
        second: String,
        hostname: String,
    },
    #[error(
        "spec.server.properties: {key} is set by the operator from the spec (cluster name, cache, session timeout, logical host names, database.lockBreakSeconds) and cannot be overridden"
    )]
    ReservedProperty { key: String },
    #[error(
        "spec.clusterName: normalises to {cluster_name}, which {other} already uses on the same cache ({urls}); the servers would join one cluster"
    )]
    ClusterNameConflict {
        cluster_name: String,
        other: String,
        urls: String,
    },
}

impl Problem {
    /// CamelCase reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::UnknownNode { .. } => "UnknownNode",
            Problem::LogicalHostnameForUnknownNode { .. } => "UnknownNode",
            Problem::LogicalHostnameHasSemicolon { .. } => "InvalidLogicalHostname",
            Problem::DuplicateLogicalHostname { .. } => "DuplicateLogicalHostname",
            Problem::ClusterNameConflict { .. } => "ClusterNameConflict",
            Problem::ReservedProperty { .. } => "ReservedProperty",
        }
    }
}

/// Validates `cluster` against the rules CEL cannot express. `others` are
/// the other IntegrationClusters the operator sees (any namespace); a
/// cluster is compared with them only where they could share a cache.
pub fn validate(
    cluster: &IntegrationCluster,
    others: &[&IntegrationCluster],
) -> Result<ValidatedCluster, Vec<Problem>> {
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    let namespace = cluster.metadata.namespace.as_deref().unwrap_or_default();
    let cluster_name = naming::cluster_name(cluster.spec.cluster_name.as_deref(), name, namespace);
    let known = KnownNodes::of(cluster);
    let members = members(cluster, &cluster_name);

    let mut problems = unknown_nodes(cluster, &known);
    problems.extend(logical_hostname_problems(cluster, &known));
    problems.extend(reserved_properties(cluster));
    problems.extend(duplicate_logical_hostnames(&members));
    problems.extend(cluster_name_conflict(cluster, &cluster_name, others));

    if problems.is_empty() {
        Ok(ValidatedCluster {
            cluster_name,
            members,
        })
    } else {
        Err(problems)
    }
}

/// The nodes a spec may name: the members 0..replicas plus any node status
/// still tracks (a leaving or removed node).
struct KnownNodes<'a> {
    cluster: &'a str,
    ordinals: BTreeSet<u32>,
}

impl<'a> KnownNodes<'a> {
    fn of(cluster: &'a IntegrationCluster) -> Self {
        let name = cluster.metadata.name.as_deref().unwrap_or_default();
        let replicas = u32::try_from(cluster.spec.replicas).unwrap_or(0);
        let mut ordinals: BTreeSet<u32> = (0..replicas).collect();
        if let Some(status) = &cluster.status {
            ordinals.extend(
                status
                    .nodes
                    .iter()
                    .filter_map(|n| naming::node_ordinal(name, &n.name)),
            );
        }
        KnownNodes {
            cluster: name,
            ordinals,
        }
    }

    fn contains(&self, node: &str) -> bool {
        naming::node_ordinal(self.cluster, node).is_some_and(|o| self.ordinals.contains(&o))
    }

    /// For a person: the node names, comma-separated.
    fn list(&self) -> String {
        self.ordinals
            .iter()
            .map(|o| naming::node_name(self.cluster, *o))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The members 0..replicas, each with its logical host name: the spec's
/// override or the one derived from the cluster name.
fn members(cluster: &IntegrationCluster, cluster_name: &str) -> Vec<Member> {
    let name = cluster.metadata.name.as_deref().unwrap_or_default();
    let spec = &cluster.spec;
    let replicas = u32::try_from(spec.replicas).unwrap_or(0);
    (0..replicas)
        .map(|ordinal| {
            let node = naming::node_name(name, ordinal);
            let logical_hostname = spec
                .server
                .logical_hostnames
                .get(&node)
                .cloned()
                .unwrap_or_else(|| naming::default_logical_hostname(cluster_name, ordinal));
            Member {
                name: node,
                ordinal,
                logical_hostname,
            }
        })
        .collect()
}

/// `spec.nodes` may take only nodes of this cluster offline or remove them.
fn unknown_nodes(cluster: &IntegrationCluster, known: &KnownNodes) -> Vec<Problem> {
    let Some(nodes) = &cluster.spec.nodes else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    for (list, entries) in [("offline", &nodes.offline), ("remove", &nodes.remove)] {
        for node in entries.iter().filter(|n| !known.contains(n)) {
            problems.push(Problem::UnknownNode {
                list,
                node: node.clone(),
                members: known.list(),
            });
        }
    }
    problems
}

/// Overrides name nodes of this cluster, and the product's scheduler does
/// not accept `;` in a logical host name.
fn logical_hostname_problems(cluster: &IntegrationCluster, known: &KnownNodes) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (node, hostname) in &cluster.spec.server.logical_hostnames {
        if !known.contains(node) {
            problems.push(Problem::LogicalHostnameForUnknownNode { node: node.clone() });
        }
        if hostname.contains(';') {
            problems.push(Problem::LogicalHostnameHasSemicolon { node: node.clone() });
        }
    }
    problems
}

/// webMethods settings the operator derives from the spec.
fn reserved_properties(cluster: &IntegrationCluster) -> Vec<Problem> {
    let spec = &cluster.spec;
    if spec.profile != Profile::WebmethodsIs {
        return Vec::new();
    }
    spec.server
        .properties
        .keys()
        .filter(|key| {
            let setting = key.strip_prefix("settings.").unwrap_or(key);
            webmethods_is::RESERVED.contains(&setting)
        })
        .map(|key| Problem::ReservedProperty { key: key.clone() })
        .collect()
}

/// The scheduler needs a logical host name of its own on every server.
fn duplicate_logical_hostnames(members: &[Member]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
    for member in members {
        if let Some(first) = owners.insert(&member.logical_hostname, &member.name) {
            problems.push(Problem::DuplicateLogicalHostname {
                first: first.to_owned(),
                second: member.name.clone(),
                hostname: member.logical_hostname.clone(),
            });
        }
    }
    problems
}

/// External cache URLs of a stateful cluster, the only way two clusters can
/// end up in one cache: managed caches belong to one cluster each.
fn shared_cache_urls(cluster: &IntegrationCluster) -> Option<BTreeSet<&str>> {
    if cluster.spec.mode != Mode::Stateful {
        return None;
    }
    let cache = cluster.spec.cache.as_ref()?;
    if cache.mode != CacheMode::External {
        return None;
    }
    let external = cache.external.as_ref()?;
    Some(external.urls.iter().map(|u| u.0.as_str()).collect())
}

/// Two clusters whose normalised names are equal and whose external caches
/// overlap would silently merge. The older cluster keeps the name; the newer
/// one is refused, so an existing cluster is never disturbed by a new one.
fn cluster_name_conflict(
    cluster: &IntegrationCluster,
    cluster_name: &str,
    others: &[&IntegrationCluster],
) -> Option<Problem> {
    let urls = shared_cache_urls(cluster)?;
    let age_key = |c: &IntegrationCluster| {
        (
            c.metadata.creation_timestamp.clone().map(|t| t.0),
            c.metadata.namespace.clone(),
            c.metadata.name.clone(),
        )
    };
    others
        .iter()
        .filter(|o| o.metadata.uid != cluster.metadata.uid)
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .filter(|o| age_key(o) < age_key(cluster))
        .find_map(|other| {
            let other_urls = shared_cache_urls(other)?;
            let other_name = naming::cluster_name(
                other.spec.cluster_name.as_deref(),
                other.metadata.name.as_deref().unwrap_or_default(),
                other.metadata.namespace.as_deref().unwrap_or_default(),
            );
            let shared: Vec<&str> = urls.intersection(&other_urls).copied().collect();
            (other_name == cluster_name && !shared.is_empty()).then(|| {
                Problem::ClusterNameConflict {
                    cluster_name: cluster_name.to_owned(),
                    other: format!(
                        "{}/{}",
                        other.metadata.namespace.as_deref().unwrap_or_default(),
                        other.metadata.name.as_deref().unwrap_or_default()
                    ),
                    urls: shared.join(","),
                }
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, yaml: &str) -> IntegrationCluster {
        let spec = serde_saphyr::from_str(yaml).expect("test spec parses");
        let mut ic = IntegrationCluster::new(name, spec);
        ic.metadata.namespace = Some("prod".into());
        ic.metadata.uid = Some(format!("uid-{name}"));
        ic
    }

    const BASE: &str = "profile: webmethods-is\nimage: msr:10.15\nreplicas: 3\n\
        cache: {mode: external, external: {urls: ['tsa-0:9510', 'tsa-1:9510']}}\n";

    #[test]
    fn a_plain_cluster_is_valid_and_gets_unique_hostnames() {
        let ic = cluster("orders", BASE);
        let v = validate(&ic, &[]).expect("valid");
        assert_eq!(v.cluster_name, "orders_prod");
        let hosts: Vec<_> = v
            .members
            .iter()
            .map(|m| m.logical_hostname.as_str())
            .collect();
        assert_eq!(hosts, ["orders_prod-0", "orders_prod-1", "orders_prod-2"]);
    }

    #[test]
    fn offline_and_remove_must_name_members() {
        let ic = cluster(
            "orders",
            &format!("{BASE}nodes: {{offline: [orders-1, orders-7], remove: [orders-9]}}\n"),
        );
        let problems = validate(&ic, &[]).expect_err("unknown nodes");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|p| p.reason() == "UnknownNode"));
        assert!(
            problems[0]
                .to_string()
                .starts_with("spec.nodes.offline: orders-7")
        );
        assert!(
            problems[1]
                .to_string()
                .starts_with("spec.nodes.remove: orders-9")
        );
    }

    #[test]
    fn a_node_known_from_status_stays_a_member() {
        let mut ic = cluster("orders", &format!("{BASE}nodes: {{remove: [orders-5]}}\n"));
        ic.status = Some(crate::api::IntegrationClusterStatus {
            nodes: vec![crate::api::NodeStatus {
                name: "orders-5".into(),
                state: crate::api::NodeState::Removed,
                ready: false,
                config_digest: None,
                packages_digest: None,
                logical_hostname: None,
                since: None,
                message: None,
            }],
            ..Default::default()
        });
        assert!(validate(&ic, &[]).is_ok());
    }

    #[test]
    fn an_override_that_collides_with_a_derived_hostname_is_refused() {
        let ic = cluster(
            "orders",
            &format!("{BASE}server: {{logicalHostnames: {{orders-2: orders_prod-0}}}}\n"),
        );
        let problems = validate(&ic, &[]).expect_err("duplicate");
        assert_eq!(
            problems,
            vec![Problem::DuplicateLogicalHostname {
                first: "orders-0".into(),
                second: "orders-2".into(),
                hostname: "orders_prod-0".into(),
            }]
        );
    }

    #[test]
    fn hostnames_for_strangers_and_semicolons_are_refused() {
        let ic = cluster(
            "orders",
            &format!("{BASE}server: {{logicalHostnames: {{orders-8: a, orders-1: 'b;c'}}}}\n"),
        );
        let reasons: Vec<_> = validate(&ic, &[])
            .expect_err("bad hostnames")
            .iter()
            .map(Problem::reason)
            .collect();
        assert_eq!(reasons, ["InvalidLogicalHostname", "UnknownNode"]);
    }

    #[test]
    fn the_newer_of_two_clusters_normalising_to_one_name_on_one_cache_is_refused() {
        let mut old = cluster("a", &format!("{BASE}clusterName: orders.prod\n"));
        old.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1).expect("timestamp"),
            ));
        let mut new = cluster("b", &format!("{BASE}clusterName: orders_prod\n"));
        new.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(2).expect("timestamp"),
            ));
        let problems = validate(&new, &[&old, &new]).expect_err("conflict");
        assert_eq!(problems[0].reason(), "ClusterNameConflict");
        assert!(
            problems[0].to_string().contains("prod/a"),
            "{}",
            problems[0]
        );
        assert!(
            validate(&old, &[&old, &new]).is_ok(),
            "the older cluster keeps its name"
        );
    }

    #[test]
    fn cluster_settings_cannot_be_overridden_by_properties() {
        let ic = cluster(
            "orders",
            &format!(
                "{BASE}server: {{properties: {{settings.watt.server.cluster.name: x, watt.server.threadPool: '75'}}}}\n"
            ),
        );
        let problems = validate(&ic, &[]).expect_err("reserved");
        assert_eq!(
            problems,
            vec![Problem::ReservedProperty {
                key: "settings.watt.server.cluster.name".into()
            }]
        );
    }

    #[test]
    fn same_name_on_different_caches_is_fine() {
        let a = cluster("a", &format!("{BASE}clusterName: orders\n"));
        let b = cluster(
            "b",
            "profile: webmethods-is\nimage: msr\nclusterName: orders\n\
             cache: {mode: external, external: {urls: ['other:9510']}}\n",
        );
        assert!(validate(&b, &[&a]).is_ok());
        assert!(validate(&a, &[&b]).is_ok());
    }
}
