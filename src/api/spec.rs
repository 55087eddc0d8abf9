//! The desired state of an `IntegrationCluster`.
//!
//! Every rule that the API server can check lives here, as OpenAPI bounds and
//! CEL `x-kubernetes-validations`, so that `kubectl apply` of a wrong spec is
//! refused with a message naming the field. What CEL cannot express (rules
//! that need derived names or other objects) is checked by
//! [`crate::validation`] and reported in status.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::IntegrationClusterStatus;

/// An IntegrationCluster runs a cluster of identical integration servers
/// (webMethods Integration Server / Microservices Runtime, WSO2 Carbon, or a
/// generic server) with the shared cache and database they need.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "integration.dev",
    version = "v1alpha1",
    kind = "IntegrationCluster",
    plural = "integrationclusters",
    shortname = "ic",
    category = "integration",
    doc = "An IntegrationCluster runs a cluster of identical integration servers with the cache and database they share.",
    namespaced,
    status = "IntegrationClusterStatus",
    // `kubectl scale ic` and autoscalers change spec.replicas; the label
    // selector lets an HPA find the server pods.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.readyReplicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profile"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Online","type":"integer","jsonPath":".status.onlineReplicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.size() <= 40 && !self.metadata.name.contains('.')").message("metadata.name must be at most 40 characters and contain no '.', so that node, Service and Lease names derived from it stay valid"),
    validation = Rule::new("!self.metadata.name.endsWith('-admin') && !self.metadata.name.endsWith('-cache') && !self.metadata.name.endsWith('-database')").message("metadata.name must not end in -admin, -cache or -database: the admin Service, managed cache and managed database of another cluster carry such names"),
    validation = Rule::new("!has(self.spec.nodes) || self.spec.nodes.offline.all(n, n.substring(0, n.lastIndexOf('-')) == self.metadata.name)").message("every entry must name a node of this cluster, <metadata.name>-<ordinal>").field_path(".spec.nodes.offline"),
    validation = Rule::new("!has(self.spec.nodes) || self.spec.nodes.remove.all(n, n.substring(0, n.lastIndexOf('-')) == self.metadata.name)").message("every entry must name a node of this cluster, <metadata.name>-<ordinal>").field_path(".spec.nodes.remove"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode != 'stateless' || !has(self.cache) || self.cache.mode == 'none'").message("a stateless cluster has no distributed cache; remove spec.cache or set mode: stateful").field_path(".cache"),
    validation = Rule::new("self.mode != 'stateless' || !self.server.sessionFailover").message("session failover needs the distributed cache of a stateful cluster").field_path(".server.sessionFailover"),
    validation = Rule::new("self.mode != 'stateless' || has(self.database) || !has(self.listeners) || self.listeners.all(l, l.mode != 'multiNode')").message("a multiNode listener in a stateless cluster needs spec.database for its exactly-once claim ledger").field_path(".listeners"),
    validation = Rule::new("self.mode != 'stateful' || self.profile == 'wso2-carbon' || (has(self.cache) && self.cache.mode != 'none')").message("a stateful cluster needs a distributed cache (cache.mode managed or external)").field_path(".cache"),
    validation = Rule::new("self.profile != 'wso2-carbon' || !has(self.cache) || self.cache.mode == 'none'").message("wso2-carbon clusters share state through Carbon's own Hazelcast membership; remove spec.cache").field_path(".cache"),
    validation = Rule::new("self.rollout.maxUnavailable <= self.replicas").message("cannot exceed spec.replicas").field_path(".rollout.maxUnavailable"),
    validation = Rule::new("self.profile != 'webmethods-is' || !has(self.database) || !has(self.database.components) || self.database.components.all(c, c in ['ISInternal', 'ISCoreAudit', 'ISDashboardStats', 'DocumentHistory', 'Xref', 'ProcessEngine', 'ProcessAudit', 'Archiving', 'CentralUsers'])").message("webmethods-is components are ISInternal, ISCoreAudit, ISDashboardStats, DocumentHistory, Xref, ProcessEngine, ProcessAudit, Archiving, CentralUsers").field_path(".database.components"),
)]
pub struct IntegrationClusterSpec {
    /// Which product this cluster runs; selects the rendered configuration,
    /// ports, probes and admin hooks. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("the profile cannot change after creation: create a new IntegrationCluster to change products"))]
    pub profile: Profile,

    /// Stateful clusters share session state in a distributed cache
    /// (Terracotta Server Array for webMethods IS); stateless clusters have no
    /// cache and lose failover, CSRF guard, OpenID Connect and "all nodes"
    /// scheduled jobs. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("the mode cannot change after creation: stateful and stateless clusters keep different shared state"))]
    pub mode: Mode,

    /// Cluster name the servers use to find each other in the cache. Defaults
    /// to "<name>_<namespace>". Periods become underscores and names longer
    /// than 32 characters become their first 20 characters plus a hash, as
    /// Integration Server does. Immutable: a new name starts a new cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("the cluster name cannot change after creation: servers with a new name would form a new, empty cluster"))]
    pub cluster_name: Option<String>,

    /// Number of server nodes.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: i32,

    /// Server container image; every node runs exactly this image.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Image pull policy for the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// The server: version, ports, session settings and properties.
    #[serde(default)]
    pub server: ServerSpec,

    /// Packages (adapters, connectors, applications) installed identically on
    /// every node before the server starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub packages: Vec<PackageSpec>,

    /// The distributed cache of a stateful cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,

    /// The shared database (ISInternal, ISCoreAudit, ... or the WSO2 shared
    /// databases) that every node uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSpec>,

    /// Listeners the operator coordinates across nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub listeners: Vec<ListenerSpec>,

    /// Node workflows: which nodes are taken offline or removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodesSpec>,

    /// How changes roll through the nodes.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Stop changing workloads; status, conditions and events still update.
    #[serde(default)]
    pub paused: bool,

    /// What happens to volumes, the database and cache data when the cluster
    /// is deleted or scaled down.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Compute resources of the server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,

    /// A volume per node for the server's local state (webMethods IS
    /// client-side queue and db directory). Without it nodes keep no state
    /// across replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,

    /// The in-pod agent (init container and sidecar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,

    /// Extra labels on every server pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub pod_labels: BTreeMap<String, String>,

    /// Where the cluster's pods may run: server pods and the managed cache
    /// and database alike. A change replaces the server pods one at a time,
    /// like any other change to what a pod is made of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,
}

/// Node selection for every pod of the cluster, as in a pod spec.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Labels a node must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 32))]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
}

/// The in-pod agent.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Image with the integration-operator binary; defaults to the
    /// operator's own release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

/// The per-node volume.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Volume size, e.g. "5Gi".
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// Storage class; the cluster default when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

fn default_replicas() -> i32 {
    3
}

/// The product a cluster runs: webmethods-is (Integration Server or
/// Microservices Runtime), wso2-carbon (Identity Server, API Manager, MI), or
/// generic (any server that clusters the same way; files, environment and
/// hooks come from the spec).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    WebmethodsIs,
    Wso2Carbon,
    Generic,
}

/// Whether the cluster shares state in a distributed cache.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    #[default]
    Stateful,
    Stateless,
}

/// Image pull policy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// As a container's `imagePullPolicy` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// What deletion keeps: Retain keeps volumes, the database and cache data
/// (only the servers go); Delete removes them with the cluster.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

/// Server settings shared by every node.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.ports.primary != self.ports.diagnostic").message("primary and diagnostic ports must differ").field_path(".ports"))]
pub struct ServerSpec {
    /// Product version the image carries, e.g. "10.15"; shown in status and
    /// part of the configuration digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub version: Option<String>,

    /// Ports the server listens on.
    #[serde(default)]
    pub ports: PortsSpec,

    /// Minutes an inactive session is kept (webMethods
    /// watt.server.cluster.SessTimeout). The same on every node.
    #[serde(default = "default_session_timeout")]
    #[schemars(range(min = 1, max = 1440))]
    pub session_timeout_minutes: i32,

    /// Keep sessions in the distributed cache so another node can continue
    /// them when one fails. Stateful clusters only.
    #[serde(default)]
    pub session_failover: bool,

    /// Server properties rendered into every node's configuration (for
    /// webMethods IS, extended settings such as watt.server.threadPool).
    /// Secrets do not belong here: use configFrom with a secretRef.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 512))]
    pub properties: BTreeMap<String, String>,

    /// Logical host names per node for the scheduler (webMethods
    /// watt.server.scheduler.logical.hostname), keyed by node name. Nodes not
    /// listed get "<clusterName>-<ordinal>". Must be unique and contain no ';'.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "minLength": 1, "maxLength": 253}))]
    #[x_kube(validation = Rule::new("self.all(k, !self[k].contains(';') && self[k] != '')").message("a logical host name must be non-empty and cannot contain ';'"))]
    pub logical_hostnames: BTreeMap<String, String>,

    /// ConfigMaps and Secrets whose keys are added to the server
    /// configuration; Secrets stay Secrets and are mounted, never copied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub config_from: Vec<ConfigSource>,

    /// Environment variables of the server container (JAVA_MAX_MEM, ...).
    /// Secrets belong in configFrom, not here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 128))]
    pub env: BTreeMap<String, String>,

    /// Extra configuration files, by file name, rendered next to the
    /// profile's own files (the generic profile's whole configuration).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub files: BTreeMap<String, String>,

    /// HTTP health endpoints for the generic profile; without them the
    /// probes check that the primary port accepts connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,

    /// Secret with keys `username` and `password` of the server's
    /// administrator, which the agent uses for the admin hooks (MSR's
    /// quiesce services need it). Mounted into the agent as environment,
    /// never copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_secret_ref: Option<LocalObjectRef>,

    /// Admin hooks the agent calls on the diagnostic port (generic profile;
    /// the other profiles have their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<HooksSpec>,
}

/// Admin hooks of a generic server, as paths on its diagnostic port.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HooksSpec {
    /// POST: stop taking new work, finish what runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub quiesce_path: Option<String>,
    /// POST: take work again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub resume_path: Option<String>,
    /// GET: the number of requests in flight, as plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub in_flight_path: Option<String>,
    /// POST: start a listener. `{listener}` in the path is replaced by the
    /// listener's target; the agent adds `epoch` (the fencing epoch) and,
    /// for single-node listeners, `until` (Unix milliseconds after which
    /// the server should stop listening unless renewed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub listener_enable_path: Option<String>,
    /// POST: stop a listener (same parameters, without `until`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub listener_disable_path: Option<String>,
    /// POST: a single-node listener's lease was renewed; carries the new
    /// `until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub listener_renew_path: Option<String>,
}

/// HTTP health endpoints of a generic server.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthSpec {
    /// Path answering 200 when the server can take traffic.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub readiness_path: String,
    /// Path answering 200 while the server is alive.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/"))]
    pub liveness_path: String,
    /// HTTP or HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<HealthScheme>,
}

/// URI scheme of a health endpoint.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthScheme {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
}

impl Default for ServerSpec {
    fn default() -> Self {
        Self {
            version: None,
            ports: PortsSpec::default(),
            session_timeout_minutes: default_session_timeout(),
            session_failover: false,
            properties: BTreeMap::new(),
            logical_hostnames: BTreeMap::new(),
            config_from: Vec::new(),
            env: BTreeMap::new(),
            files: BTreeMap::new(),
            health: None,
            admin_secret_ref: None,
            hooks: None,
        }
    }
}

fn default_session_timeout() -> i32 {
    60
}

/// Ports of the server.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortsSpec {
    /// Client port (webMethods IS primary port, WSO2 HTTPS port).
    #[serde(default = "default_primary_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub primary: i32,
    /// Administration port that stays open while a node is offline or
    /// quiesced (webMethods IS diagnostic port).
    #[serde(default = "default_diagnostic_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub diagnostic: i32,
}

impl Default for PortsSpec {
    fn default() -> Self {
        Self {
            primary: default_primary_port(),
            diagnostic: default_diagnostic_port(),
        }
    }
}

fn default_primary_port() -> i32 {
    5555
}

fn default_diagnostic_port() -> i32 {
    9999
}

/// A ConfigMap or Secret whose keys become server configuration.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.configMapRef) != has(self.secretRef)").message("set exactly one of configMapRef or secretRef"))]
pub struct ConfigSource {
    /// A ConfigMap in the cluster's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<LocalObjectRef>,
    /// A Secret in the cluster's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectRef>,
}

/// A reference to an object in the same namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct LocalObjectRef {
    /// Object name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// A key in a Secret of the same namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A package installed on every node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PackageSpec {
    /// Package name as the server knows it, e.g. WmKafkaAdapter.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z][A-Za-z0-9_.-]*$")
    )]
    pub name: String,
    /// Package version, part of the packages digest.
    #[schemars(length(min = 1, max = 64))]
    pub version: String,
    /// Where the package archive comes from.
    pub source: PackageSource,
    /// SHA-256 of the package archive, lower-case hex; a package whose
    /// content differs is refused at install time.
    #[schemars(regex(pattern = r"^[a-f0-9]{64}$"))]
    pub sha256: String,
}

/// Exactly one source of a package archive.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.image), has(self.url), has(self.configMap)].filter(x, x).size() == 1").message("set exactly one of image, url or configMap"))]
pub struct PackageSource {
    /// A path inside an image: "<image>:<tag>//<path>".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// An http(s) URL of the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: Option<String>,
    /// A key of a ConfigMap in the cluster's namespace holding the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKeyRef>,
}

/// A key in a ConfigMap of the same namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key within the ConfigMap.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The distributed cache of a stateful cluster.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode != 'external' || has(self.external)").message("required when cache.mode is external").field_path(".external"),
    validation = Rule::new("self.mode == 'external' || !has(self.external)").message("only allowed when cache.mode is external").field_path(".external"),
    validation = Rule::new("self.mode == 'managed' || !has(self.managed)").message("only allowed when cache.mode is managed").field_path(".managed"),
    validation = Rule::new("self.mode != 'managed' || (has(self.managed) && has(self.managed.image) && has(self.managed.licenseSecretRef))").message("a managed cache needs managed.image and managed.licenseSecretRef: BigMemory Max images and licences are the customer's own").field_path(".managed"),
)]
pub struct CacheSpec {
    /// managed: the operator runs a Terracotta Server Array; external: the
    /// servers use the given URLs; none: no cache (stateless clusters).
    pub mode: CacheMode,
    /// Settings of a managed cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedCacheSpec>,
    /// An existing cache the servers connect to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalCacheSpec>,
    /// Seconds a server waits for the cache at start before its startup-error
    /// action (webMethods watt.server.cachemanager.connectTimeout).
    #[serde(default = "default_cache_connect_timeout")]
    #[schemars(range(min = 1, max = 600))]
    pub connect_timeout_seconds: i32,
}

fn default_cache_connect_timeout() -> i32 {
    30
}

/// How the cache is provided.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum CacheMode {
    Managed,
    External,
    None,
}

/// A cache the operator runs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManagedCacheSpec {
    /// Cache servers in the mirror group (1 = no mirror, 2 = active/mirror).
    #[serde(default = "default_cache_replicas")]
    #[schemars(range(min = 1, max = 4))]
    pub replicas: i32,
    /// Cache server image (Terracotta BigMemory Max 4.x for webMethods IS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Volume size of each cache server, e.g. "10Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub storage: Option<String>,
    /// Secret key holding the Terracotta licence (license.key); mounted
    /// into the cache servers, never read by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license_secret_ref: Option<SecretKeyRef>,
}

fn default_cache_replicas() -> i32 {
    2
}

/// An existing cache.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct ExternalCacheSpec {
    /// Cache server URLs as host:port (Terracotta BigMemory client port 9510).
    #[schemars(length(min = 1, max = 16))]
    pub urls: Vec<CacheUrl>,
}

/// host:port of a cache server.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[schemars(transparent)]
pub struct CacheUrl(
    #[schemars(
        length(min = 3, max = 261),
        regex(
            pattern = r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
        )
    )]
    pub String,
);

/// The shared database.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode != 'external' || has(self.external)").message("required when database.mode is external").field_path(".external"),
    validation = Rule::new("self.mode == 'external' || !has(self.external)").message("only allowed when database.mode is external").field_path(".external"),
    validation = Rule::new("self.mode == 'managed' || !has(self.managed)").message("only allowed when database.mode is managed").field_path(".managed"),
)]
pub struct DatabaseSpec {
    /// managed: the operator runs PostgreSQL; external: an existing server
    /// reached through an admin connection URL in a Secret.
    pub mode: DatabaseMode,
    /// Settings of a managed database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedDatabaseSpec>,
    /// An existing database server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalDatabaseSpec>,
    /// Components that get a schema each (for webMethods IS the JDBC
    /// functions: ISInternal, ISCoreAudit, DocumentHistory, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 48), regex(pattern = r"^[A-Za-z][A-Za-z0-9_]*$"))
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub components: Vec<String>,
    /// Seconds after which the guaranteed-delivery locks of a node that is
    /// gone are broken so that other nodes take its work over
    /// (webMethods watt.server.tx.cluster.lockBreakSecs).
    #[serde(default = "default_lock_break")]
    #[schemars(range(min = 1, max = 86400))]
    pub lock_break_seconds: i32,
    /// Connections each server's pool may open per component.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_connections: i32,
}

fn default_lock_break() -> i32 {
    120
}

fn default_max_connections() -> i32 {
    10
}

/// How the database is provided.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum DatabaseMode {
    Managed,
    External,
}

/// A PostgreSQL the operator runs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManagedDatabaseSpec {
    /// PostgreSQL image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Volume size, e.g. "20Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub storage: Option<String>,
}

/// An existing database server.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalDatabaseSpec {
    /// Secret key holding an admin connection URL
    /// (postgres://user:password@host:port/db).
    pub secret_ref: SecretKeyRef,
}

/// A listener coordinated across the cluster.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.leaseDurationSeconds > self.renewDeadlineSeconds && self.renewDeadlineSeconds > self.retryPeriodSeconds").message("leaseDurationSeconds must be greater than renewDeadlineSeconds, which must be greater than retryPeriodSeconds"))]
pub struct ListenerSpec {
    /// Listener name, unique in the cluster; names the Lease
    /// "<cluster>.listener.<name>".
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// singleNode: exactly one node listens at a time, chosen by a Lease;
    /// multiNode: every online node listens and each message is processed once.
    pub mode: ListenerMode,
    /// The listener as the server knows it (adapter listener, CloudStreams
    /// listener alias, notification name); defaults to name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub target: Option<String>,
    /// Seconds a Lease is valid without renewal.
    #[serde(default = "default_lease_duration")]
    #[schemars(range(min = 2, max = 600))]
    pub lease_duration_seconds: i32,
    /// Seconds the holder keeps trying to renew before it disables its
    /// listener; must be shorter than the lease duration.
    #[serde(default = "default_renew_deadline")]
    #[schemars(range(min = 1, max = 599))]
    pub renew_deadline_seconds: i32,
    /// Seconds between attempts to acquire or renew.
    #[serde(default = "default_retry_period")]
    #[schemars(range(min = 1, max = 598))]
    pub retry_period_seconds: i32,
}

fn default_lease_duration() -> i32 {
    15
}

fn default_renew_deadline() -> i32 {
    10
}

fn default_retry_period() -> i32 {
    2
}

/// How a listener is spread over the nodes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ListenerMode {
    SingleNode,
    MultiNode,
}

/// Node workflows requested by the user.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodesSpec {
    /// Nodes to keep offline: running, reachable on the admin Service, but
    /// getting no client traffic.
    #[serde(default)]
    #[schemars(
        length(max = 64),
        inner(
            length(min = 3, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-(0|[1-9][0-9]*)$")
        )
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub offline: Vec<String>,
    /// Nodes to remove once their in-flight and guaranteed-delivery work has
    /// drained. Drop a node from this list to add it back (it returns offline).
    #[serde(default)]
    #[schemars(
        length(max = 64),
        inner(
            length(min = 3, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-(0|[1-9][0-9]*)$")
        )
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub remove: Vec<String>,
    /// Seconds a removal waits for work to drain before it stops with
    /// Stalled=True, counted from 5 s after the node left the client
    /// Service (the time proxies and load balancers need to stop sending it
    /// requests, during which the server is not yet quiesced).
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 0, max = 86400))]
    pub drain_timeout_seconds: i32,
}

fn default_drain_timeout() -> i32 {
    600
}

// By hand: a derived Default would give a drain timeout of 0 s to every
// cluster that does not set `spec.nodes`, not the 600 s the API defaults.
impl Default for NodesSpec {
    fn default() -> Self {
        NodesSpec {
            offline: Vec::new(),
            remove: Vec::new(),
            drain_timeout_seconds: default_drain_timeout(),
        }
    }
}

/// How changes roll through the nodes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Nodes that may be unavailable at once during a rolling replacement or
    /// removal.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = 64))]
    pub max_unavailable: i32,
    /// Seconds a replaced or new node may take to become Ready before the
    /// rollout stops with Stalled=True instead of touching the next node.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 5, max = 86400))]
    pub progress_deadline_seconds: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

fn default_progress_deadline() -> i32 {
    600
}

fn default_max_unavailable() -> i32 {
    1
}
