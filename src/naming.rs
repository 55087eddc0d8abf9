//! Names derived from an `IntegrationCluster`: the cluster name the servers
//! use, node names and scheduler logical host names.
//!
//! The cluster-name rules are Integration Server's own (clustering guide):
//! periods become underscores, and a name longer than 32 characters becomes
//! its first 20 characters followed by a hash. Every node must compute the
//! same name, so this is a pure function of the spec.

use sha2::{Digest, Sha256};

/// Longest cluster name Integration Server keeps as given.
pub const MAX_CLUSTER_NAME: usize = 32;
/// Characters kept from a name that is too long.
const KEPT_PREFIX: usize = 20;

/// The cluster name every server uses, normalised as Integration Server
/// normalises it. `requested` is `spec.clusterName`; without it the name is
/// "<name>_<namespace>", so two clusters of the same name in different
/// namespaces never share cache managers.
pub fn cluster_name(requested: Option<&str>, name: &str, namespace: &str) -> String {
    let raw = match requested {
        Some(requested) => requested.to_owned(),
        None => format!("{name}_{namespace}"),
    };
    normalise_cluster_name(&raw)
}

/// Periods become underscores; longer than 32 characters → the first 20
/// characters plus the first 12 hex digits of the SHA-256 of the whole name
/// (32 characters in all, and distinct names keep distinct results).
pub fn normalise_cluster_name(raw: &str) -> String {
    let name = raw.replace('.', "_");
    if name.chars().count() <= MAX_CLUSTER_NAME {
        return name;
    }
    let prefix: String = name.chars().take(KEPT_PREFIX).collect();
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest
        .iter()
        .take((MAX_CLUSTER_NAME - KEPT_PREFIX) / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{prefix}{hash}")
}

/// The node (and pod) name of an ordinal.
pub fn node_name(cluster: &str, ordinal: u32) -> String {
    format!("{cluster}-{ordinal}")
}

/// The ordinal of a node name of this cluster, or `None` when the name does
/// not belong to it.
pub fn node_ordinal(cluster: &str, node: &str) -> Option<u32> {
    let suffix = node.strip_prefix(cluster)?.strip_prefix('-')?;
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // "01" would name the same pod as "1" only by accident of parsing.
    if suffix.len() > 1 && suffix.starts_with('0') {
        return None;
    }
    suffix.parse().ok()
}

/// The default scheduler logical host name of a node: unique within the
/// cluster and free of ';' because the cluster name is.
pub fn default_logical_hostname(cluster_name: &str, ordinal: u32) -> String {
    format!("{cluster_name}-{ordinal}")
}

/// Label keys and values the operator puts on everything it creates.
pub mod labels {
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const CLUSTER: &str = "integration.dev/cluster";
    pub const NODE: &str = "integration.dev/node";
    pub const OPERATOR: &str = "integration-operator";
}

/// The client Service: ready and online nodes only.
pub fn client_service(cluster: &str) -> String {
    cluster.to_owned()
}

/// The headless admin Service: every node, online or not.
pub fn admin_service(cluster: &str) -> String {
    format!("{cluster}-admin")
}

/// The ConfigMap of rendered configuration.
pub fn config_map(cluster: &str) -> String {
    format!("{cluster}-config")
}

/// The ServiceAccount of a cluster's agents.
pub fn agent_account(cluster: &str) -> String {
    format!("{cluster}-agent")
}

/// The per-node volume claim.
pub fn data_claim(node: &str) -> String {
    format!("data-{node}")
}

/// The managed cache's StatefulSet and its headless Service: one name, so
/// that the pods' DNS names are `<pod>.<cluster>-cache`.
pub fn cache_service(cluster: &str) -> String {
    format!("{cluster}-cache")
}

/// A managed cache server: its pod name, which is also its server name in
/// tc-config.xml (the server is started with `-n <pod name>`).
pub fn cache_server(cluster: &str, ordinal: u32) -> String {
    format!("{}-{ordinal}", cache_service(cluster))
}

/// The stable DNS name of a managed cache server. The servers' cache URLs
/// and the TSA's own configuration both use it, so they name the same hosts.
pub fn cache_host(cluster: &str, namespace: &str, ordinal: u32) -> String {
    format!(
        "{}.{}.{namespace}.svc",
        cache_server(cluster, ordinal),
        cache_service(cluster)
    )
}

/// The ConfigMap holding the managed cache's tc-config.xml.
pub fn cache_config_map(cluster: &str) -> String {
    format!("{}-config", cache_service(cluster))
}

/// The managed database's Service, and its StatefulSet.
pub fn database_service(cluster: &str) -> String {
    format!("{cluster}-database")
}

/// The Secret with the managed database's superuser credentials.
pub fn database_admin_secret(cluster: &str) -> String {
    format!("{}-admin", database_service(cluster))
}

/// The Secret with the credentials of the cluster's database role; the
/// servers read it, the operator creates it once and keeps its password.
pub fn database_credentials(cluster: &str) -> String {
    format!("{cluster}-database-credentials")
}

/// PostgreSQL identifiers are at most 63 bytes.
const PG_IDENTIFIER_MAX: usize = 63;
/// Hex digits of the SHA-256 of `<namespace>/<cluster>` that end every
/// database name: 64 bits, so a collision among even a million clusters on
/// one server has a chance of about 3 in 10^8.
const DATABASE_HASH_HEX: usize = 16;
/// Every database name starts with this. Names of the first scheme
/// (`ic_<namespace>_<cluster>`, which let `a-b`/`c` and `a`/`b-c` share a
/// database) all start with `ic_`, so no new name is ever an old one.
const DATABASE_PREFIX: &str = "icn_";

/// The role and the database of a cluster on a (possibly shared) database
/// server: `icn_<namespace>_<cluster>_<hash>`. The readable middle (lower
/// case, anything but letters and digits as `_`, cut to fit 63 bytes) is
/// for people; the hash of the exact pair `<namespace>/<cluster>` (a
/// namespace has no `/`) tells pairs apart. No mapping of every namespace
/// and cluster name into 63 bytes can be injective (there are more pairs
/// than identifiers), so distinctness rests on SHA-256, and the ownership
/// marker on each role and database (`database::Owner`) stops the operator
/// from touching one it did not make should two ever meet.
pub fn database_role(namespace: &str, cluster: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}/{cluster}").as_bytes());
    let hash: String = digest
        .iter()
        .take(DATABASE_HASH_HEX / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    let room = PG_IDENTIFIER_MAX - DATABASE_PREFIX.len() - 1 - DATABASE_HASH_HEX;
    let readable: String = format!("{namespace}_{cluster}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(room)
        .collect();
    format!("{DATABASE_PREFIX}{readable}_{hash}")
}

/// Whether `name` could be a cluster database this operator named, under
/// this scheme or the first one: only such a name recorded in status or
/// the credentials Secret is kept.
pub fn is_database_name(name: &str) -> bool {
    name.len() <= PG_IDENTIFIER_MAX
        && (name.starts_with(DATABASE_PREFIX) || name.starts_with("ic_"))
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The schema of one database component (ISInternal → isinternal).
pub fn component_schema(component: &str) -> String {
    component.to_ascii_lowercase()
}

/// The schema of the operator's and agents' own tables in every cluster
/// database.
pub const OPERATOR_SCHEMA: &str = "integration_operator";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_names_are_kept_only_when_they_are_ours() {
        assert!(is_database_name(&database_role("prod", "orders")));
        assert!(is_database_name("ic_prod_orders"));
        for foreign in [
            "postgres",
            "template1",
            "ic_x;drop",
            "IC_X",
            &"ic_x".repeat(20),
        ] {
            assert!(!is_database_name(foreign), "{foreign}");
        }
    }

    /// Namespaces, cluster names and pairs that stress the readable part:
    /// dashes and periods in every position, lengths around the point where
    /// the readable part is cut, and the longest names Kubernetes allows
    /// (namespace 63, cluster 253).
    fn name_pairs() -> Vec<(String, String)> {
        let short = [
            "a", "b", "c", "ab", "bc", "a-b", "b-c", "a-b-c", "ab-c", "a-bc", "a.b", "b.c",
            "a.b-c", "a-b.c", "a_b", "0", "1-0", "x", "x-y", "xy",
        ];
        let mut names: Vec<String> = short.iter().map(|s| (*s).to_owned()).collect();
        for n in [20, 38, 39, 40, 41, 42, 43, 44, 58, 59, 60, 61, 62, 63] {
            names.push("n".repeat(n));
            names.push(format!("{}-x", "n".repeat(n)));
            names.push(format!("{}x", "n".repeat(n)));
            names.push(format!("{}.x", "n".repeat(n)));
        }
        names.push("c".repeat(253));
        names.push(format!("{}d", "c".repeat(252)));
        let mut pairs = Vec::new();
        for namespace in &names {
            // A namespace is a DNS label: no periods, at most 63 characters.
            if namespace.contains('.') || namespace.len() > 63 {
                continue;
            }
            for cluster in &names {
                pairs.push((namespace.clone(), cluster.clone()));
            }
        }
        pairs
    }

    #[test]
    fn database_names_are_injective_and_bounded() {
        assert_ne!(
            database_role("a-b", "c"),
            database_role("a", "b-c"),
            "a-b/c and a/b-c must not share a database"
        );
        let pairs = name_pairs();
        let mut seen: std::collections::HashMap<String, (String, String)> =
            std::collections::HashMap::new();
        for (namespace, cluster) in &pairs {
            let name = database_role(namespace, cluster);
            assert!(name.len() <= PG_IDENTIFIER_MAX, "{name} is too long");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name} needs quoting"
            );
            // The old scheme's names all start with ic_: a new name never
            // lands on a database an older operator made for someone else.
            assert!(name.starts_with("icn_"), "{name}");
            if let Some(other) = seen.insert(name.clone(), (namespace.clone(), cluster.clone())) {
                panic!(
                    "{namespace}/{cluster} and {}/{} both get {name}",
                    other.0, other.1
                );
            }
        }
        assert_eq!(seen.len(), pairs.len());
        assert!(pairs.len() > 3000, "{} pairs", pairs.len());
    }

    #[test]
    fn database_names_stay_readable() {
        let name = database_role("prod", "orders");
        assert!(name.starts_with("icn_prod_orders_"), "{name}");
        assert_eq!(name, database_role("prod", "orders"), "stable");
        let long = database_role(&"n".repeat(63), &"c".repeat(253));
        assert_eq!(long.len(), PG_IDENTIFIER_MAX);
        assert!(long.starts_with("icn_nnnn"), "{long}");
    }

    #[test]
    fn periods_become_underscores() {
        assert_eq!(normalise_cluster_name("orders.prod"), "orders_prod");
    }

    #[test]
    fn names_up_to_32_characters_are_kept() {
        let name = "a".repeat(32);
        assert_eq!(normalise_cluster_name(&name), name);
    }

    #[test]
    fn long_names_keep_20_characters_plus_a_hash() {
        let long = "integration.cluster.for.orders.production";
        let got = normalise_cluster_name(long);
        assert_eq!(got.len(), 32);
        assert!(got.starts_with("integration_cluster_"), "{got}");
        assert!(got[20..].bytes().all(|b| b.is_ascii_hexdigit()), "{got}");
        assert!(!got.contains('.'));
    }

    #[test]
    fn long_names_with_the_same_prefix_stay_distinct() {
        let a = normalise_cluster_name("integration_cluster_for_orders_eu_west");
        let b = normalise_cluster_name("integration_cluster_for_orders_us_east");
        assert_ne!(a, b);
        assert_eq!(&a[..20], &b[..20]);
    }

    #[test]
    fn normalisation_is_stable() {
        let long = "x".repeat(50);
        assert_eq!(normalise_cluster_name(&long), normalise_cluster_name(&long));
    }

    #[test]
    fn default_cluster_name_includes_the_namespace() {
        assert_eq!(cluster_name(None, "orders", "prod"), "orders_prod");
        assert_eq!(cluster_name(Some("a.b"), "orders", "prod"), "a_b");
    }

    #[test]
    fn node_names_round_trip() {
        assert_eq!(node_name("orders", 3), "orders-3");
        assert_eq!(node_ordinal("orders", "orders-3"), Some(3));
        assert_eq!(node_ordinal("orders", "orders-12"), Some(12));
    }

    #[test]
    fn managed_cache_names() {
        assert_eq!(cache_service("orders"), "orders-cache");
        assert_eq!(cache_server("orders", 1), "orders-cache-1");
        assert_eq!(
            cache_host("orders", "prod", 1),
            "orders-cache-1.orders-cache.prod.svc"
        );
        assert_eq!(cache_config_map("orders"), "orders-cache-config");
    }

    #[test]
    fn managed_database_names() {
        assert_eq!(database_service("orders"), "orders-database");
        assert_eq!(database_admin_secret("orders"), "orders-database-admin");
    }

    #[test]
    fn foreign_or_malformed_node_names_have_no_ordinal() {
        assert_eq!(node_ordinal("orders", "billing-1"), None);
        assert_eq!(node_ordinal("orders", "orders-"), None);
        assert_eq!(node_ordinal("orders", "orders-x"), None);
        assert_eq!(node_ordinal("orders", "orders-01"), None);
        assert_eq!(node_ordinal("orders", "orders1"), None);
        assert_eq!(node_ordinal("orders", "orders-eu-1"), None);
    }
}
