//! The observed state of an `IntegrationCluster`, written only by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator observed and did.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationClusterStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One-word summary: Pending, Invalid, Progressing, Ready, Degraded, Stalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Validated, Ready, Progressing, Degraded, ConfigDrift, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The cluster name the servers use, after the seed's normalisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Digest of the rendered configuration every node must run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Digest of the package set every node must run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages_digest: Option<String>,
    /// Nodes that are Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Nodes that are online (receiving client traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online_replicas: Option<i32>,
    /// Label selector of the server pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Per-node state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub nodes: Vec<NodeStatus>,
    /// Per-listener holder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub listeners: Vec<ListenerStatus>,
    /// The distributed cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,
    /// The shared database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseStatus>,
}

/// One-word summary of the cluster.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Invalid,
    Progressing,
    Ready,
    Degraded,
    Stalled,
}

/// The state of one node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Node (and pod) name, <cluster>-<ordinal>.
    pub name: String,
    /// Workflow state of the node.
    pub state: NodeState,
    /// Whether the server pod is Ready.
    #[serde(default)]
    pub ready: bool,
    /// Configuration digest the node runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Packages digest the node runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages_digest: Option<String>,
    /// Unique scheduler logical host name of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_hostname: Option<String>,
    /// When the node entered its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// Why the node is in its state, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Workflow state of a node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Pending,
    Online,
    Draining,
    Offline,
    Removing,
    Removed,
    /// Leaving to be created again from the current spec (drift); it
    /// keeps its name.
    Replacing,
    /// Leaving its cordoned Kubernetes node, to be created again on
    /// another one under its name.
    Relocating,
}

/// As status spells it (the serde name), also in the cluster database's
/// member table.
impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Pending => "Pending",
            NodeState::Online => "Online",
            NodeState::Draining => "Draining",
            NodeState::Offline => "Offline",
            NodeState::Removing => "Removing",
            NodeState::Removed => "Removed",
            NodeState::Replacing => "Replacing",
            NodeState::Relocating => "Relocating",
        })
    }
}

/// Who holds a single-node listener.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    /// Listener name.
    pub name: String,
    /// Node holding the listener's Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Hand-overs so far (the fencing epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transitions: Option<i32>,
    /// Last renewal by the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<Time>,
}

/// The distributed cache as observed.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    /// Whether the cache accepts connections.
    #[serde(default)]
    pub ready: bool,
    /// URLs the servers connect to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Ready servers of a managed cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_servers: Option<i32>,
}

/// The shared database as observed.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseStatus {
    /// Whether roles, database and schemas are provisioned.
    #[serde(default)]
    pub ready: bool,
    /// Latest applied migration version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i64>,
    /// host:port of the database server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The cluster's database on that server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Secret with the cluster role's credentials (username, password,
    /// host, port, database).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_states_display_as_status_spells_them() {
        for state in [
            NodeState::Pending,
            NodeState::Online,
            NodeState::Draining,
            NodeState::Offline,
            NodeState::Removing,
            NodeState::Removed,
            NodeState::Replacing,
            NodeState::Relocating,
        ] {
            let serialized = serde_json::to_value(state).expect("serialize");
            assert_eq!(serialized, state.to_string());
        }
    }
}
