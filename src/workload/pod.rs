//! The server pod of one node, and what the operator reads back from one.
//!
//! [`pod`] assembles the pod from the parts below, in this order:
//! - metadata: labels and the digests the drift check compares (`pod_meta`);
//! - the server container (`server_container`): ports, environment, mounts
//!   and the startup, readiness and liveness probes, which differ by
//!   profile (`facts`);
//! - the agent: the `install-packages` init container and the sidecar
//!   (`install_packages_container`, `agent_container`), with the
//!   environment naming the server's hooks (`agent_hooks`);
//! - the volumes (`volumes`): rendered configuration, `configFrom`, the node
//!   claim, the package staging directory and its sources, and the agent's
//!   API access (`api_access_volume`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort, DownwardAPIProjection,
    DownwardAPIVolumeFile, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ImageVolumeSource, KeyToPath, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod,
    PodReadinessGate, PodSpec, Probe, ProjectedVolumeSource, ResourceRequirements,
    SecretKeySelector, SecretProjection, SecurityContext, ServiceAccountTokenProjection,
    TCPSocketAction, TopologySpreadConstraint, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::stateful::{self, container_port};
use super::{owned_meta, server_selector};
use crate::agent::init;
use crate::api::{HealthScheme, IntegrationCluster, ListenerMode, PackageSource, Profile};
use crate::naming::{self, labels};
use crate::protocol::{ONLINE_CONDITION, keys};
use crate::render::{self, CONFIG_DIR, Rendered, webmethods_is, wso2_carbon};
use crate::validation::Member;

/// The agent image when neither the spec nor the operator's `--agent-image`
/// names one: this release of the operator.
pub const AGENT_IMAGE: &str = concat!(
    "ghcr.io/integration-operator/integration-operator:",
    env!("CARGO_PKG_VERSION")
);

/// Where `configFrom` Secrets are mounted; MSR reads `$secret{KEY}` there.
const SECRETS_DIR: &str = "/etc/secrets";
/// Where `configFrom` ConfigMaps are mounted.
const CONFIG_FROM_DIR: &str = "/etc/integration/config-from";
const IS_HOME: &str = "/opt/softwareag/IntegrationServer";
const WSO2_CONFIG: &str = "/home/wso2carbon/wso2-config-volume/repository/conf/deployment.toml";
/// Where kube's (and client-go's) in-cluster configuration looks for the
/// ServiceAccount token, the API server's CA and the namespace.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const API_ACCESS_VOLUME: &str = "agent-api-access";

/// The agent image the cluster's pods run: the spec's, else the operator's
/// default (an operator upgrade brings a new one, and the pods roll).
pub fn agent_image<'a>(ic: &'a IntegrationCluster, default_agent_image: &'a str) -> &'a str {
    ic.spec
        .agent
        .as_ref()
        .and_then(|a| a.image.as_deref())
        .unwrap_or(default_agent_image)
}

/// The pod of `member`, stamped with its configuration and package digests.
/// The agent runs `default_agent_image` unless the spec names one.
pub fn pod(
    ic: &IntegrationCluster,
    rendered: &Rendered,
    member: &Member,
    default_agent_image: &str,
) -> Pod {
    let facts = facts(ic);
    let cluster = ic.metadata.name.clone().unwrap_or_default();
    let agent_image = agent_image(ic, default_agent_image).to_owned();
    let mut pod_spec = PodSpec {
        hostname: Some(member.name.clone()),
        subdomain: Some(naming::admin_service(&cluster)),
        readiness_gates: Some(vec![PodReadinessGate {
            condition_type: ONLINE_CONDITION.into(),
        }]),
        init_containers: Some(vec![install_packages_container(ic, agent_image.clone())]),
        containers: vec![
            server_container(ic, &facts, &cluster),
            agent_container(ic, &cluster, agent_image),
        ],
        service_account_name: Some(naming::agent_account(&cluster)),
        // The agent's containers mount the token themselves.
        automount_service_account_token: Some(false),
        volumes: Some(volumes(ic, member, &cluster)),
        security_context: Some(stateful::restricted_pod(facts.user)),
        topology_spread_constraints: Some(vec![spread_over_hosts(ic)]),
        termination_grace_period_seconds: Some(120),
        ..PodSpec::default()
    };
    stateful::schedule(ic, &mut pod_spec);
    Pod {
        metadata: pod_meta(ic, rendered, member),
        spec: Some(pod_spec),
        status: None,
    }
}

/// The server labels plus the node's, and the digests the pod was built
/// from: the drift check compares them with the spec's ([`digests_of`]).
fn pod_meta(ic: &IntegrationCluster, rendered: &Rendered, member: &Member) -> ObjectMeta {
    let mut meta = owned_meta(ic, member.name.clone(), "server");
    if let Some(l) = meta.labels.as_mut() {
        l.insert(labels::NODE.into(), member.name.clone());
        for (k, v) in &ic.spec.pod_labels {
            l.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    meta.annotations = Some(BTreeMap::from([
        (
            keys::CONFIG_DIGEST.to_owned(),
            rendered
                .node_digests
                .get(&member.name)
                .cloned()
                .unwrap_or_default(),
        ),
        (
            keys::PACKAGES_DIGEST.to_owned(),
            rendered.packages_digest.clone(),
        ),
    ]));
    meta
}

/// Server pods on different Kubernetes nodes where possible, so one node
/// failure takes as few servers as it can.
fn spread_over_hosts(ic: &IntegrationCluster) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(server_selector(ic)),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }
}

/// What differs between products in a pod.
struct ProfileFacts {
    /// The image's server user (sagadmin 1724, wso2carbon 802).
    user: Option<i64>,
    /// Where the node volume goes.
    data_dir: &'static str,
    readiness: ProbeKind,
    liveness: ProbeKind,
}

enum ProbeKind {
    Tcp,
    Http { path: String, https: bool },
}

fn facts(ic: &IntegrationCluster) -> ProfileFacts {
    match ic.spec.profile {
        Profile::WebmethodsIs => ProfileFacts {
            user: Some(1724),
            data_dir: "/opt/softwareag/IntegrationServer/db",
            readiness: ProbeKind::Http {
                path: "/health/readiness".into(),
                https: false,
            },
            liveness: ProbeKind::Http {
                path: "/health/liveness".into(),
                https: false,
            },
        },
        Profile::Wso2Carbon => ProfileFacts {
            user: Some(802),
            data_dir: "/home/wso2carbon/data",
            readiness: ProbeKind::Http {
                path: "/api/health-check/v1.0/health".into(),
                https: true,
            },
            liveness: ProbeKind::Tcp,
        },
        Profile::Generic => {
            let (readiness, liveness) = match &ic.spec.server.health {
                Some(h) => {
                    let https = h.scheme == Some(HealthScheme::Https);
                    (
                        ProbeKind::Http {
                            path: h.readiness_path.clone(),
                            https,
                        },
                        ProbeKind::Http {
                            path: h.liveness_path.clone(),
                            https,
                        },
                    )
                }
                None => (ProbeKind::Tcp, ProbeKind::Tcp),
            };
            ProfileFacts {
                user: None,
                data_dir: "/var/lib/integration",
                readiness,
                liveness,
            }
        }
    }
}

fn server_container(ic: &IntegrationCluster, facts: &ProfileFacts, cluster: &str) -> Container {
    let spec = &ic.spec;
    Container {
        name: "server".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        working_dir: (spec.profile == Profile::WebmethodsIs).then(|| IS_HOME.to_owned()),
        ports: Some(server_ports(ic)),
        env: Some(server_env(ic, cluster)),
        volume_mounts: Some(server_mounts(ic, facts)),
        resources: spec.resources.clone(),
        startup_probe: Some(startup_probe()),
        readiness_probe: Some(probe(&facts.readiness, 15, 3)),
        liveness_probe: Some(probe(&facts.liveness, 15, 4)),
        security_context: Some(stateful::restricted_container()),
        ..Container::default()
    }
}

fn server_ports(ic: &IntegrationCluster) -> Vec<ContainerPort> {
    let ports = &ic.spec.server.ports;
    let mut container_ports = vec![
        container_port("primary", ports.primary),
        container_port("diagnostic", ports.diagnostic),
    ];
    if ic.spec.profile == Profile::Wso2Carbon {
        container_ports.push(container_port("membership", wso2_carbon::MEMBER_PORT));
    }
    container_ports
}

/// Servers take minutes to start (MSR's chart allows 30 minutes); liveness
/// only counts once startup has passed.
fn startup_probe() -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("primary".into()),
            host: None,
        }),
        period_seconds: Some(10),
        failure_threshold: Some(180),
        ..Probe::default()
    }
}

/// The readiness or liveness probe of the profile ([`facts`]), on the
/// primary port.
fn probe(kind: &ProbeKind, period: i32, failures: i32) -> Probe {
    let port = IntOrString::String("primary".into());
    let (http_get, tcp_socket) = match kind {
        ProbeKind::Tcp => (None, Some(TCPSocketAction { port, host: None })),
        ProbeKind::Http { path, https } => (
            Some(HTTPGetAction {
                path: Some(path.clone()),
                port,
                scheme: Some(if *https { "HTTPS" } else { "HTTP" }.into()),
                ..HTTPGetAction::default()
            }),
            None,
        ),
    };
    Probe {
        http_get,
        tcp_socket,
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

/// The pod's identity, where the profile finds its rendered files, the
/// database credentials the files refer to, and the spec's own variables.
fn server_env(ic: &IntegrationCluster, cluster: &str) -> Vec<EnvVar> {
    let spec = &ic.spec;
    let mut env_vars = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("NODE_IP", "status.podIP"),
        env("INTEGRATION_CLUSTER_NAME", cluster),
    ];
    match spec.profile {
        Profile::WebmethodsIs => env_vars.push(env(
            "SAG_IS_CONFIG_PROPERTIES",
            format!(
                "{CONFIG_DIR}/{},{CONFIG_DIR}/node-$(POD_NAME).properties",
                webmethods_is::APPLICATION_PROPERTIES
            ),
        )),
        Profile::Wso2Carbon => {}
        Profile::Generic => env_vars.push(env(
            "NODE_CONFIG",
            format!("{CONFIG_DIR}/{}", render::node_file("$(POD_NAME)")),
        )),
    }
    if spec.database.is_some() {
        // The rendered files refer to these; the password never leaves
        // its Secret.
        let secret = naming::database_credentials(cluster);
        for (name, key) in [
            (render::DB_USERNAME_ENV, "username"),
            (render::DB_PASSWORD_ENV, "password"),
        ] {
            env_vars.push(secret_env(name, &secret, key));
        }
    }
    env_vars.extend(spec.server.env.iter().map(|(k, v)| env(k, v.clone())));
    env_vars
}

/// The rendered configuration where the profile reads it, `configFrom`,
/// the node claim, and the installed packages.
fn server_mounts(ic: &IntegrationCluster, facts: &ProfileFacts) -> Vec<VolumeMount> {
    let spec = &ic.spec;
    let mut mounts = vec![match spec.profile {
        Profile::Wso2Carbon => VolumeMount {
            sub_path: Some(wso2_carbon::DEPLOYMENT_TOML.into()),
            ..mount("config", WSO2_CONFIG)
        },
        Profile::WebmethodsIs | Profile::Generic => mount("config", CONFIG_DIR),
    }];
    mounts.extend(config_from_volumes(ic).into_iter().map(|(_, m)| m));
    if spec.storage.is_some() {
        mounts.push(mount("data", facts.data_dir));
    }
    if spec.profile == Profile::WebmethodsIs {
        // IS loads packages from <IS>/packages/<Pkg>: each unpacked package
        // is mounted there, beside the built-in ones (WmRoot, WmPublic, ...).
        for package in &spec.packages {
            mounts.push(VolumeMount {
                sub_path: Some(package.name.clone()),
                read_only: Some(false),
                ..mount("packages", &format!("{IS_HOME}/packages/{}", package.name))
            });
        }
    } else {
        mounts.push(VolumeMount {
            read_only: Some(true),
            ..mount("packages", init::STAGING_DIR)
        });
    }
    mounts
}

/// The agent's init container: installs the verified package set into the
/// volume the server mounts, before the server starts.
fn install_packages_container(ic: &IntegrationCluster, agent_image: String) -> Container {
    let mut mounts = vec![
        mount("config", CONFIG_DIR),
        VolumeMount {
            read_only: Some(false),
            ..mount("packages", init::STAGING_DIR)
        },
        // install-packages publishes an Event when it fails, so it needs
        // the token as the sidecar does.
        mount(API_ACCESS_VOLUME, SERVICE_ACCOUNT_DIR),
    ];
    mounts.extend(package_source_volumes(ic).into_iter().map(|(_, m)| m));
    Container {
        name: "install-packages".into(),
        image: Some(agent_image),
        args: Some(vec![
            "agent".into(),
            "init".into(),
            format!("--packages-file={}", render::packages_path().display()),
            format!("--target={}", init::STAGING_DIR),
        ]),
        env: Some(agent_pod_env()),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(agent_security_context()),
        ..Container::default()
    }
}

/// The agent's sidecar: quiesces the server, runs its listeners and
/// reports the node's state.
fn agent_container(ic: &IntegrationCluster, cluster: &str, agent_image: String) -> Container {
    Container {
        name: "agent".into(),
        image: Some(agent_image),
        args: Some(vec!["agent".into(), "watch".into()]),
        env: Some(agent_env(ic, cluster)),
        volume_mounts: Some(vec![
            mount("config", CONFIG_DIR),
            VolumeMount {
                read_only: Some(true),
                ..mount("packages", init::STAGING_DIR)
            },
            mount(API_ACCESS_VOLUME, SERVICE_ACCOUNT_DIR),
        ]),
        security_context: Some(agent_security_context()),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("32Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("64Mi".into()))])),
            ..Default::default()
        }),
        ..Container::default()
    }
}

/// The restricted context plus a read-only root: the agent writes only into
/// its volumes (the server images write into their own directories).
fn agent_security_context() -> SecurityContext {
    SecurityContext {
        read_only_root_filesystem: Some(true),
        ..stateful::restricted_container()
    }
}

/// The pod's own name and namespace, which the agent's containers act on.
fn agent_pod_env() -> Vec<EnvVar> {
    vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ]
}

/// The sidecar's environment: where its server is, the server's hooks and
/// admin credentials, and the listeners it runs.
fn agent_env(ic: &IntegrationCluster, cluster: &str) -> Vec<EnvVar> {
    let spec = &ic.spec;
    let mut agent_env = agent_pod_env();
    agent_env.push(env(
        "SERVER_ADMIN_ADDRESS",
        format!("127.0.0.1:{}", spec.server.ports.diagnostic),
    ));
    for (name, value) in agent_hooks(ic) {
        agent_env.push(env(name, value));
    }
    if let Some(secret) = &spec.server.admin_secret_ref {
        for (name, key) in [
            ("SERVER_USERNAME", "username"),
            ("SERVER_PASSWORD", "password"),
        ] {
            agent_env.push(secret_env(name, &secret.name, key));
        }
    }
    agent_env.extend(listener_env(ic, cluster));
    agent_env
}

/// The listeners the agent runs and, when one of them claims messages
/// across nodes, the database its claim ledger is in.
fn listener_env(ic: &IntegrationCluster, cluster: &str) -> Vec<EnvVar> {
    let spec = &ic.spec;
    if spec.listeners.is_empty() {
        return Vec::new();
    }
    let mut listener_env = vec![env(
        "LISTENERS",
        serde_json::to_string(&spec.listeners).unwrap_or_default(),
    )];
    let multi = spec
        .listeners
        .iter()
        .any(|l| l.mode == ListenerMode::MultiNode);
    if multi && spec.database.is_some() {
        let secret = naming::database_credentials(cluster);
        for (name, key) in [
            ("DB_HOST", "host"),
            ("DB_PORT", "port"),
            ("DB_NAME", "database"),
            (render::DB_USERNAME_ENV, "username"),
            (render::DB_PASSWORD_ENV, "password"),
        ] {
            listener_env.push(secret_env(name, &secret, key));
        }
    }
    listener_env
}

/// Environment of the agent sidecar naming its server's hooks: the
/// profile's own, or the spec's for generic servers.
fn agent_hooks(ic: &IntegrationCluster) -> Vec<(&'static str, String)> {
    let mut hooks = Vec::new();
    match ic.spec.profile {
        // WmRoot's quiesce services (setQuiesceMode finishes running
        // requests before it returns, so there is no in-flight hook).
        Profile::WebmethodsIs => {
            hooks.push((
                "QUIESCE_PATH",
                "/invoke/wm.server.quiesce/setQuiesceMode?isQuiesceMode=true".to_owned(),
            ));
            hooks.push((
                "RESUME_PATH",
                "/invoke/wm.server.quiesce/setActiveMode".to_owned(),
            ));
            hooks.push(("HEALTH_PATH", "/health".to_owned()));
            // WmART's listener services (adapter listeners such as the
            // Kafka adapter's); they take the listener's name.
            hooks.push((
                "LISTENER_ENABLE_PATH",
                "/invoke/pub.art.listener/enableListener?listenerName={listener}".to_owned(),
            ));
            hooks.push((
                "LISTENER_DISABLE_PATH",
                "/invoke/pub.art.listener/disableListener?listenerName={listener}".to_owned(),
            ));
        }
        // Carbon has no quiesce API: offline stops client traffic only.
        Profile::Wso2Carbon => {}
        Profile::Generic => {
            let spec = &ic.spec.server;
            if let Some(h) = &spec.hooks {
                for (name, value) in [
                    ("QUIESCE_PATH", &h.quiesce_path),
                    ("RESUME_PATH", &h.resume_path),
                    ("IN_FLIGHT_PATH", &h.in_flight_path),
                    ("LISTENER_ENABLE_PATH", &h.listener_enable_path),
                    ("LISTENER_DISABLE_PATH", &h.listener_disable_path),
                    ("LISTENER_RENEW_PATH", &h.listener_renew_path),
                ] {
                    if let Some(v) = value {
                        hooks.push((name, v.clone()));
                    }
                }
            }
            if let Some(h) = &spec.health {
                hooks.push(("HEALTH_PATH", h.readiness_path.clone()));
            }
        }
    }
    hooks
}

/// Every volume of the pod; the containers' mounts name them.
fn volumes(ic: &IntegrationCluster, member: &Member, cluster: &str) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: naming::config_map(cluster),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    volumes.extend(config_from_volumes(ic).into_iter().map(|(v, _)| v));
    if ic.spec.storage.is_some() {
        volumes.push(Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: naming::data_claim(&member.name),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    // install-packages refuses sets past its own limits; this bounds what
    // the server writes into its package directories on top.
    volumes.push(Volume {
        name: "packages".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(init::PACKAGE_VOLUME_LIMIT.into())),
            medium: None,
        }),
        ..Volume::default()
    });
    volumes.push(api_access_volume());
    volumes.extend(package_source_volumes(ic).into_iter().map(|(v, _)| v));
    volumes
}

/// The `configFrom` Secrets projected into one volume and the ConfigMaps
/// into another, each with the server's mount; none for a kind the spec
/// does not use.
fn config_from_volumes(ic: &IntegrationCluster) -> Vec<(Volume, VolumeMount)> {
    let config_from = &ic.spec.server.config_from;
    let secrets: Vec<VolumeProjection> = config_from
        .iter()
        .filter_map(|c| c.secret_ref.as_ref())
        .map(|s| VolumeProjection {
            secret: Some(SecretProjection {
                name: s.name.clone(),
                ..SecretProjection::default()
            }),
            ..VolumeProjection::default()
        })
        .collect();
    let config_maps: Vec<VolumeProjection> = config_from
        .iter()
        .filter_map(|c| c.config_map_ref.as_ref())
        .map(|c| VolumeProjection {
            config_map: Some(ConfigMapProjection {
                name: c.name.clone(),
                ..ConfigMapProjection::default()
            }),
            ..VolumeProjection::default()
        })
        .collect();
    [
        ("secrets", secrets, SECRETS_DIR),
        ("config-from", config_maps, CONFIG_FROM_DIR),
    ]
    .into_iter()
    .filter(|(_, sources, _)| !sources.is_empty())
    .map(|(name, sources, dir)| {
        let volume = Volume {
            name: name.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(sources),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        };
        (volume, mount(name, dir))
    })
    .collect()
}

/// Where install-packages reads package archives: one volume per
/// ConfigMap and per image the packages name (shared by the packages of
/// one source), each with install-packages' mount.
fn package_source_volumes(ic: &IntegrationCluster) -> Vec<(Volume, VolumeMount)> {
    let mut sources: Vec<(Volume, VolumeMount)> = Vec::new();
    for package in &ic.spec.packages {
        for (volume, mount) in package_source_volume(&package.source) {
            // Two image references that agent::init maps to one directory
            // cannot both be mounted there; the first stays, and the
            // other's package fails its checksum at install time.
            if !sources
                .iter()
                .any(|(_, m)| m.mount_path == mount.mount_path)
            {
                sources.push((volume, mount));
            }
        }
    }
    sources
}

fn package_source_volume(source: &PackageSource) -> Vec<(Volume, VolumeMount)> {
    let mut volumes = Vec::new();
    if let Some(cm) = &source.config_map {
        let name = source_volume_name("pkg-cm", &cm.name, &cm.name);
        let volume = Volume {
            name: name.clone(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.name.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        };
        let path = format!("{}/{}", init::CONFIG_MAP_SOURCES, cm.name);
        volumes.push((volume, mount(&name, &path)));
    }
    if let Some(image) = &source.image {
        let reference = image.split_once("//").map_or(image.as_str(), |(r, _)| r);
        let dir = init::image_mount_name(reference);
        let name = source_volume_name("pkg-img", &dir, reference);
        let volume = Volume {
            name: name.clone(),
            image: Some(ImageVolumeSource {
                reference: Some(reference.to_owned()),
                pull_policy: Some("IfNotPresent".into()),
            }),
            ..Volume::default()
        };
        let path = format!("{}/{dir}", init::IMAGE_SOURCES);
        volumes.push((volume, mount(&name, &path)));
    }
    volumes
}

/// A volume name for the package source `key`: a DNS label, as the API
/// server requires, though ConfigMap names may hold dots and be 253
/// characters long; readable from its start and unique by its digest,
/// since cutting `readable` short can make two sources' names equal (two
/// tags of one image did).
fn source_volume_name(prefix: &str, readable: &str, key: &str) -> String {
    let readable: String = readable
        .chars()
        .take(30)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let digest = render::text_digest(key);
    format!(
        "{prefix}-{}-{}",
        readable.trim_matches('-'),
        &digest[..digest.len().min(10)]
    )
}

/// The volume the kubelet's automount would give every container, given
/// here to the agent's containers only: the server runs the user's image
/// and faces the network, and the agent's Role may patch pods.
fn api_access_volume() -> Volume {
    Volume {
        name: API_ACCESS_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o644),
            sources: Some(vec![
                VolumeProjection {
                    // 3607 s as the automount asks for: the kubelet renews
                    // the file well before expiry and kube rereads it.
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: Some(3607),
                        audience: None,
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".into(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".into(),
                            path: "ca.crt".into(),
                            mode: None,
                        }]),
                        optional: None,
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".into()),
                                field_path: "metadata.namespace".into(),
                            }),
                            ..DownwardAPIVolumeFile::default()
                        }]),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
        }),
        ..Volume::default()
    }
}

/// Only the node's own volume is writable by default.
fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(name != "data"),
        ..VolumeMount::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The digests a pod was created with, and its server image now (a hand
/// edit of the image is drift too).
pub fn digests_of(pod: &Pod) -> (Option<&str>, Option<&str>, Option<&str>) {
    let annotation = |key: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let image = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "server"))
        .and_then(|c| c.image.as_deref());
    (
        annotation(keys::CONFIG_DIGEST),
        annotation(keys::PACKAGES_DIGEST),
        image,
    )
}

fn condition_true(pod: &Pod, type_: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// The pod is Ready (its containers are and its online gate is True).
pub fn is_ready(pod: &Pod) -> bool {
    condition_true(pod, "Ready")
}

/// The operator has set the node online.
pub fn is_online(pod: &Pod) -> bool {
    condition_true(pod, ONLINE_CONDITION)
}

/// The server containers run and pass readiness: the node could go online.
pub fn containers_ready(pod: &Pod) -> bool {
    condition_true(pod, "ContainersReady")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation;

    fn sample(file: &str) -> IntegrationCluster {
        let path = format!("{}/manifests/samples/{file}", env!("CARGO_MANIFEST_DIR"));
        let mut ic: IntegrationCluster =
            serde_saphyr::from_str(&std::fs::read_to_string(path).expect("sample"))
                .expect("parses");
        ic.metadata.namespace = Some("prod".into());
        ic.metadata.uid = Some("uid-1".into());
        ic
    }

    fn first_pod(file: &str) -> Pod {
        let ic = sample(file);
        let cluster = validation::validate(&ic, &[]).expect("valid");
        let rendered = render::render(&ic, &cluster, &Default::default());
        pod(&ic, &rendered, &cluster.members[0], AGENT_IMAGE)
    }

    #[test]
    fn a_server_pod_is_gated_owned_labelled_and_stamped() {
        let pod = first_pod("webmethods-is-stateful.yaml");
        assert_eq!(pod.metadata.name.as_deref(), Some("orders-0"));
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(
            spec.readiness_gates.as_ref().expect("gates")[0].condition_type,
            ONLINE_CONDITION
        );
        let owner = &pod.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("IntegrationCluster", Some(true))
        );
        let labels = pod.metadata.labels.as_ref().expect("labels");
        assert_eq!(
            labels.get(labels::NODE).map(String::as_str),
            Some("orders-0")
        );
        assert_eq!(
            labels.get(labels::MANAGED_BY).map(String::as_str),
            Some("integration-operator")
        );
        let (config, packages, image) = digests_of(&pod);
        assert_eq!(config.map(str::len), Some(16));
        assert_eq!(packages.map(str::len), Some(16));
        assert_eq!(image, Some("registry.example.com/webmethods/msr:10.15"));
    }

    #[test]
    fn webmethods_reads_its_cluster_and_node_files() {
        let pod = first_pod("webmethods-is-stateful.yaml");
        let c = &pod.spec.as_ref().expect("spec").containers[0];
        let env = c.env.as_ref().expect("env");
        let props = env
            .iter()
            .find(|e| e.name == "SAG_IS_CONFIG_PROPERTIES")
            .and_then(|e| e.value.as_deref());
        assert_eq!(
            props,
            Some(
                "/etc/integration/config/application.properties,/etc/integration/config/node-$(POD_NAME).properties"
            )
        );
        let readiness = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
        assert_eq!(
            readiness.and_then(|h| h.path.as_deref()),
            Some("/health/readiness")
        );
    }

    #[test]
    fn the_pod_runs_restricted() {
        let pod = first_pod("wso2-carbon.yaml");
        let spec = pod.spec.as_ref().expect("spec");
        let psc = spec.security_context.as_ref().expect("pod security");
        assert_eq!(psc.run_as_non_root, Some(true));
        let csc = spec.containers[0]
            .security_context
            .as_ref()
            .expect("container security");
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(spec.subdomain.as_deref(), Some("identity-admin"));
    }

    #[test]
    fn the_agent_installs_packages_first_and_watches_beside_the_server() {
        let pod = first_pod("webmethods-is-stateful.yaml");
        let spec = pod.spec.as_ref().expect("spec");
        let init = &spec.init_containers.as_ref().expect("init containers")[0];
        assert_eq!(init.name, "install-packages");
        assert_eq!(
            init.args.as_ref().expect("args")[..2],
            ["agent".to_owned(), "init".to_owned()]
        );
        let image = spec
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.image.as_ref())
            .and_then(|i| i.reference.as_deref());
        assert_eq!(
            image,
            Some("registry.example.com/webmethods/packages:10.15")
        );
        let agent = spec
            .containers
            .iter()
            .find(|c| c.name == "agent")
            .expect("sidecar");
        let env: BTreeMap<_, _> = agent
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
            .collect();
        assert_eq!(env.get("SERVER_ADMIN_ADDRESS"), Some(&"127.0.0.1:9999"));
        assert!(
            env.get("QUIESCE_PATH")
                .is_some_and(|p| p.contains("setQuiesceMode"))
        );
        assert_eq!(spec.service_account_name.as_deref(), Some("orders-agent"));
        let server = &spec.containers[0];
        let kafka = server
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.sub_path.as_deref() == Some("WmKafkaAdapter"))
            .map(|m| m.mount_path.as_str());
        assert_eq!(
            kafka,
            Some("/opt/softwareag/IntegrationServer/packages/WmKafkaAdapter")
        );
    }

    #[test]
    fn only_the_agent_containers_get_the_service_account_token() {
        const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
        let pod = first_pod("webmethods-is-stateful.yaml");
        let spec = pod.spec.as_ref().expect("spec");
        // Without this the API server's admission mounts the token into
        // every container, the server's too.
        assert_eq!(spec.automount_service_account_token, Some(false));
        let token_volume = |c: &Container| {
            c.volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == TOKEN_DIR)
                .map(|m| (m.name.clone(), m.read_only))
        };
        let server = spec
            .containers
            .iter()
            .find(|c| c.name == "server")
            .expect("server");
        assert_eq!(
            token_volume(server),
            None,
            "the server runs the user's image"
        );
        let agent = spec
            .containers
            .iter()
            .find(|c| c.name == "agent")
            .expect("sidecar");
        let install = &spec.init_containers.as_ref().expect("init")[0];
        let (name, read_only) = token_volume(agent).expect("the agent calls the API");
        assert_eq!(read_only, Some(true));
        assert_eq!(
            token_volume(install),
            Some((name.clone(), Some(true))),
            "install-packages publishes an Event when it fails"
        );
        // What the kubelet's automount projects, so kube's in-cluster
        // configuration finds token, ca.crt and namespace.
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.projected.as_ref())
            .expect("a projected volume");
        let sources = volume.sources.as_ref().expect("sources");
        let token = sources
            .iter()
            .find_map(|s| s.service_account_token.as_ref())
            .expect("token");
        assert_eq!(token.path, "token");
        let ca = sources
            .iter()
            .find_map(|s| s.config_map.as_ref())
            .expect("ca");
        assert_eq!(ca.name, "kube-root-ca.crt");
        assert_eq!(
            ca.items
                .as_ref()
                .map(|i| (i[0].key.as_str(), i[0].path.as_str())),
            Some(("ca.crt", "ca.crt"))
        );
        let namespace = sources
            .iter()
            .find_map(|s| s.downward_api.as_ref())
            .and_then(|d| d.items.as_ref())
            .expect("namespace");
        assert_eq!(namespace[0].path, "namespace");
        assert_eq!(
            namespace[0]
                .field_ref
                .as_ref()
                .map(|f| f.field_path.as_str()),
            Some("metadata.namespace")
        );
    }

    #[test]
    fn the_packages_volume_is_bounded() {
        let pod = first_pod("webmethods-is-stateful.yaml");
        let limit = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .find(|v| v.name == "packages")
            .and_then(|v| v.empty_dir.as_ref())
            .and_then(|e| e.size_limit.clone());
        assert_eq!(limit, Some(Quantity("2Gi".into())));
    }

    #[test]
    fn the_agent_gets_the_admin_credentials_from_the_secret_never_as_values() {
        let mut ic = sample("webmethods-is-stateful.yaml");
        ic.spec.server.admin_secret_ref = Some(crate::api::LocalObjectRef {
            name: "orders-admin".into(),
        });
        let cluster = validation::validate(&ic, &[]).expect("valid");
        let pod = pod(
            &ic,
            &render::render(&ic, &cluster, &Default::default()),
            &cluster.members[0],
            AGENT_IMAGE,
        );
        let spec = pod.spec.expect("spec");
        let agent = spec
            .containers
            .iter()
            .find(|c| c.name == "agent")
            .expect("sidecar");
        let password = agent
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "SERVER_PASSWORD")
            .expect("password env");
        assert_eq!(password.value, None);
        let from = password
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref());
        assert_eq!(
            from.map(|r| (r.name.as_str(), r.key.as_str())),
            Some(("orders-admin", "password"))
        );
    }

    #[test]
    fn scheduling_places_the_pod_and_joins_the_digest() {
        let mut ic = sample("generic.yaml");
        let unscheduled = {
            let cluster = validation::validate(&ic, &[]).expect("valid");
            render::render(&ic, &cluster, &Default::default())
        };
        ic.spec.scheduling = Some(crate::api::SchedulingSpec {
            node_selector: BTreeMap::from([("type".to_owned(), "real".to_owned())]),
            tolerations: vec![k8s_openapi::api::core::v1::Toleration {
                key: Some("test-bed/real-node".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }],
            affinity: None,
        });
        let cluster = validation::validate(&ic, &[]).expect("valid");
        let rendered = render::render(&ic, &cluster, &Default::default());
        let spec = pod(&ic, &rendered, &cluster.members[0], "agent:1")
            .spec
            .expect("spec");
        assert_eq!(
            spec.node_selector
                .as_ref()
                .and_then(|s| s.get("type"))
                .map(String::as_str),
            Some("real")
        );
        assert_eq!(spec.tolerations.map(|t| t.len()), Some(1));
        assert_eq!(
            spec.init_containers.expect("init")[0].image.as_deref(),
            Some("agent:1"),
            "the agent runs the operator's --agent-image when the spec names none"
        );
        assert_ne!(
            rendered.node_digests, unscheduled.node_digests,
            "moving the pods elsewhere replaces them"
        );
    }

    /// Every package source is mounted where install-packages reads it
    /// (`agent::init`), under a volume name the API server accepts (a DNS
    /// label), one volume per source.
    #[test]
    fn every_package_source_is_mounted_where_install_packages_reads_it() {
        let mut ic = sample("webmethods-is-stateful.yaml");
        let package = |name: &str, source: crate::api::PackageSource| crate::api::PackageSpec {
            name: name.into(),
            version: "1".into(),
            source,
            sha256: "0".repeat(64),
        };
        let image = |reference: &str| crate::api::PackageSource {
            image: Some(reference.into()),
            url: None,
            config_map: None,
        };
        let config_map = |name: &str| crate::api::PackageSource {
            image: None,
            url: None,
            config_map: Some(crate::api::ConfigMapKeyRef {
                name: name.into(),
                key: "p.zip".into(),
            }),
        };
        // Two tags of one repository, and ConfigMap names that are DNS
        // subdomains (dots, up to 253 characters), not labels.
        let long = format!("packages.{}", "x".repeat(80));
        ic.spec.packages = vec![
            package(
                "A",
                image("registry.example.com/webmethods/packages:10.15//A.zip"),
            ),
            package(
                "B",
                image("registry.example.com/webmethods/packages:10.16//B.zip"),
            ),
            package(
                "C",
                image("registry.example.com/webmethods/packages:10.16//C.zip"),
            ),
            package("D", config_map("packages.v1")),
            package("E", config_map(&long)),
        ];
        let cluster = validation::validate(&ic, &[]).expect("valid");
        let rendered = render::render(&ic, &cluster, &Default::default());
        let spec = pod(&ic, &rendered, &cluster.members[0], AGENT_IMAGE)
            .spec
            .expect("spec");
        let volumes = spec.volumes.clone().unwrap_or_default();
        let install = &spec.init_containers.as_ref().expect("init")[0];
        let mounted = |path: String| {
            let mount = install
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == path)
                .unwrap_or_else(|| panic!("nothing mounted at {path}"));
            volumes
                .iter()
                .find(|v| v.name == mount.name)
                .unwrap_or_else(|| panic!("no volume {}", mount.name))
                .clone()
        };
        for reference in [
            "registry.example.com/webmethods/packages:10.15",
            "registry.example.com/webmethods/packages:10.16",
        ] {
            let path = format!(
                "{}/{}",
                init::IMAGE_SOURCES,
                init::image_mount_name(reference)
            );
            let volume = mounted(path);
            assert_eq!(
                volume.image.and_then(|i| i.reference).as_deref(),
                Some(reference)
            );
        }
        for name in ["packages.v1", long.as_str()] {
            let volume = mounted(format!("{}/{name}", init::CONFIG_MAP_SOURCES));
            assert_eq!(volume.config_map.map(|c| c.name).as_deref(), Some(name));
        }
        let sources: Vec<&str> = install
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| {
                m.mount_path.starts_with(init::IMAGE_SOURCES)
                    || m.mount_path.starts_with(init::CONFIG_MAP_SOURCES)
            })
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(sources.len(), 4, "one volume per source: {sources:?}");
        assert_eq!(
            sources
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            4,
            "{sources:?}"
        );
        for name in sources {
            let label = name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            assert!(label, "{name} is not a DNS label");
        }
    }

    #[test]
    fn storage_mounts_the_node_claim() {
        let pod = first_pod("generic.yaml");
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .expect("volumes");
        let claim = volumes
            .iter()
            .find_map(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.as_str());
        assert_eq!(claim, Some("data-catalog-0"));
    }
}
