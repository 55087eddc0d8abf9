//! The managed cache: a Terracotta BigMemory Max 4.x Server Array, the
//! distributed cache webMethods Integration Server clusters share, run as
//! one StatefulSet forming one mirror group (active plus mirrors).
//!
//! The layout follows IBM's Helm chart for the TSA (tc-config.xml and the
//! licence in one directory, a volume for data and logs, a headless Service
//! publishing not-ready addresses) with the names the servers' cache URLs
//! already use ([`crate::render::cache_urls`]). Pure builders like
//! [`crate::workload`]: they take no client, so what the operator would
//! create is unit-tested here.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, Container, EnvVar, EnvVarSource, KeyToPath,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SecretProjection,
    Service, ServiceSpec, TCPSocketAction, TopologySpreadConstraint, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::api::{CacheMode, IntegrationCluster, Mode, SecretKeyRef};
use crate::naming;
use crate::protocol::keys;
use crate::render;
use crate::workload::owned_meta;
use crate::workload::stateful::{
    claim_retention, claim_template, component_labels, component_selector, container_port,
    restricted_container, restricted_pod, schedule, service_port,
};

/// Client port; the servers' cache URLs point at it.
pub const TSA_PORT: i32 = render::TSA_PORT as i32;
/// JMX port (the TSA's own tools).
pub const JMX_PORT: i32 = 9520;
/// Port the servers of a mirror group talk to each other on.
pub const TSA_GROUP_PORT: i32 = 9530;
/// REST management port (Terracotta Management Console).
pub const MANAGEMENT_PORT: i32 = 9540;

/// The configuration file's key in the ConfigMap and its name in the pod.
pub const CONFIG_FILE: &str = "tc-config.xml";
/// The licence's file name in the pod, where the image looks for it.
pub const LICENSE_FILE: &str = "license.key";
/// Where tc-config.xml and the licence are mounted (as in IBM's chart).
pub const CONFIG_DIR: &str = "/opt/terracotta/config";
/// Where each server's volume is mounted; data and logs live under it.
pub const RUN_DIR: &str = "/opt/terracotta/run";
/// Volume size of a cache server when the spec names none.
pub const DEFAULT_STORAGE: &str = "10Gi";

/// Off-heap memory per server. The spec has no memory setting (its storage
/// is the volume, not memory), so this is fixed at the minimum the
/// BigMemory Max 4.3+ documentation gives for webMethods clustering in
/// hybrid mode: session and cluster caches are small, and more would only
/// raise every cache pod's memory need. The JVM's direct memory must cover
/// it; that is left to the image's start script.
pub const OFFHEAP_SIZE: &str = "2g";
/// Data per server, off-heap plus what hybrid mode keeps on the volume.
/// The licence webMethods ships requires BigMemory Hybrid, and only with
/// hybrid may this exceed the off-heap size. It stays well below the
/// default volume so that logs and the restartable store fit beside it; a
/// volume much smaller than the default can fill up.
pub const DATA_STORAGE_SIZE: &str = "4g";

/// The TSA start script, expected on the image's PATH.
const START_SCRIPT: &str = "start-tc-server.sh";
/// The component label of everything the cache consists of.
const COMPONENT: &str = "cache";
/// The user of IBM/Software AG images (sagadmin), as for the servers; the
/// volume is made writable for its group.
const USER: i64 = 1724;

/// What a managed cache needs from the spec.
struct Managed<'a> {
    cluster: &'a str,
    namespace: &'a str,
    replicas: u32,
    image: &'a str,
    license: &'a SecretKeyRef,
    storage: &'a str,
}

/// The managed cache of a stateful cluster, or `None`. The API refuses a
/// managed cache without image or licence (CEL); a spec that lacks them
/// anyway gets no cache objects at all rather than a TSA that cannot start.
fn managed(ic: &IntegrationCluster) -> Option<Managed<'_>> {
    if ic.spec.mode != Mode::Stateful {
        return None;
    }
    let cache = ic.spec.cache.as_ref()?;
    if cache.mode != CacheMode::Managed {
        return None;
    }
    let spec = cache.managed.as_ref()?;
    Some(Managed {
        cluster: ic.metadata.name.as_deref()?,
        namespace: ic.metadata.namespace.as_deref()?,
        replicas: u32::try_from(spec.replicas).ok().filter(|r| *r > 0)?,
        image: spec.image.as_deref()?,
        license: spec.license_secret_ref.as_ref()?,
        storage: spec.storage.as_deref().unwrap_or(DEFAULT_STORAGE),
    })
}

/// tc-config.xml of a managed cache: one mirror group of `replicas`
/// servers, each named after its pod and reachable at the host its cache
/// URL names, so the servers and the TSA agree on the array.
pub fn tc_config(ic: &IntegrationCluster) -> Option<String> {
    let m = managed(ic)?;
    let group = naming::cache_service(m.cluster);
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    xml += &format!(
        "<!-- Rendered by integration-operator for {}/{}; edits are replaced. -->\n",
        m.namespace, m.cluster
    );
    xml += "<tc:tc-config xmlns:tc=\"http://www.terracotta.org/config\">\n";
    xml += "  <servers>\n";
    // Every value below is a Kubernetes name or a constant: nothing needs
    // XML escaping.
    xml += &format!("    <mirror-group group-name=\"{group}\">\n");
    for ordinal in 0..m.replicas {
        let server = naming::cache_server(m.cluster, ordinal);
        let host = naming::cache_host(m.cluster, m.namespace, ordinal);
        // bind 0.0.0.0: a server starts before its own DNS name resolves
        // (the name appears once the pod has an address).
        xml += &format!("      <server host=\"{host}\" name=\"{server}\" bind=\"0.0.0.0\">\n");
        xml += &format!("        <data>{RUN_DIR}/{server}/data</data>\n");
        xml += &format!("        <logs>{RUN_DIR}/{server}/logs</logs>\n");
        xml += &format!("        <tsa-port>{TSA_PORT}</tsa-port>\n");
        xml += &format!("        <jmx-port>{JMX_PORT}</jmx-port>\n");
        xml += &format!("        <tsa-group-port>{TSA_GROUP_PORT}</tsa-group-port>\n");
        xml += &format!("        <management-port>{MANAGEMENT_PORT}</management-port>\n");
        xml += &format!("        <dataStorage size=\"{DATA_STORAGE_SIZE}\">\n");
        xml += &format!("          <offheap size=\"{OFFHEAP_SIZE}\"/>\n");
        xml += "          <hybrid/>\n";
        xml += "        </dataStorage>\n";
        xml += "      </server>\n";
    }
    xml += "    </mirror-group>\n";
    // Restartable: a server that restarts (a rolling update) reloads its
    // data from the volume instead of waiting for a full copy.
    xml += "    <restartable enabled=\"true\"/>\n";
    xml += "  </servers>\n";
    xml += "</tc:tc-config>\n";
    Some(xml)
}

/// The ConfigMap with tc-config.xml.
pub fn config_map(ic: &IntegrationCluster) -> Option<ConfigMap> {
    let m = managed(ic)?;
    let config = tc_config(ic)?;
    Some(ConfigMap {
        metadata: owned_meta(ic, naming::cache_config_map(m.cluster), COMPONENT),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_owned(), config)])),
        ..ConfigMap::default()
    })
}

/// The headless Service that gives every cache server its stable DNS name.
/// Not-ready addresses are published because the servers of a mirror group
/// must find each other before any of them is ready.
pub fn service(ic: &IntegrationCluster) -> Option<Service> {
    let m = managed(ic)?;
    Some(Service {
        metadata: owned_meta(ic, naming::cache_service(m.cluster), COMPONENT),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(component_selector(ic, COMPONENT)),
            ports: Some(vec![
                service_port("tsa", TSA_PORT),
                service_port("tsa-group", TSA_GROUP_PORT),
                service_port("management", MANAGEMENT_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The cache servers. The pod template carries the digest of tc-config.xml,
/// so a change of the server list (scaling the mirror group) rolls every
/// server onto the new list.
pub fn stateful_set(ic: &IntegrationCluster) -> Option<StatefulSet> {
    let m = managed(ic)?;
    let config = tc_config(ic)?;
    let name = naming::cache_service(m.cluster);
    Some(StatefulSet {
        metadata: owned_meta(ic, name.clone(), COMPONENT),
        spec: Some(StatefulSetSpec {
            replicas: i32::try_from(m.replicas).ok(),
            selector: LabelSelector {
                match_labels: Some(component_selector(ic, COMPONENT)),
                ..LabelSelector::default()
            },
            service_name: Some(name),
            // All servers start together: a mirror group elects its active
            // among the servers that are up, and none is ready before that.
            pod_management_policy: Some("Parallel".to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: None,
            }),
            persistent_volume_claim_retention_policy: Some(claim_retention(ic)),
            template: pod_template(ic, &m, &config),
            volume_claim_templates: Some(vec![claim_template(ic, COMPONENT, m.storage)]),
            ..StatefulSetSpec::default()
        }),
        status: None,
    })
}

/// The cache server pod, stamped with the digest of `config`.
fn pod_template(ic: &IntegrationCluster, m: &Managed, config: &str) -> PodTemplateSpec {
    let mut pod = PodSpec {
        containers: vec![server_container(m)],
        volumes: Some(vec![config_volume(m)]),
        // The TSA never talks to the Kubernetes API.
        automount_service_account_token: Some(false),
        security_context: Some(restricted_pod(Some(USER))),
        // Active and mirror on different nodes where possible, so one
        // node failure does not take the whole array.
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".to_owned(),
            when_unsatisfiable: "ScheduleAnyway".to_owned(),
            label_selector: Some(LabelSelector {
                match_labels: Some(component_selector(ic, COMPONENT)),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        }]),
        ..PodSpec::default()
    };
    schedule(ic, &mut pod);
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(component_labels(ic, COMPONENT)),
            annotations: Some(BTreeMap::from([(
                keys::CONFIG_DIGEST.to_owned(),
                render::text_digest(config),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(pod),
    }
}

/// One Terracotta server, named after its pod in tc-config.xml.
fn server_container(m: &Managed) -> Container {
    Container {
        name: "terracotta".to_owned(),
        image: Some(m.image.to_owned()),
        command: Some(vec![
            START_SCRIPT.to_owned(),
            "-f".to_owned(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
            "-n".to_owned(),
            "$(POD_NAME)".to_owned(),
        ]),
        env: Some(vec![EnvVar {
            name: "POD_NAME".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_owned(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        }]),
        ports: Some(vec![
            container_port("tsa", TSA_PORT),
            container_port("jmx", JMX_PORT),
            container_port("tsa-group", TSA_GROUP_PORT),
            container_port("management", MANAGEMENT_PORT),
        ]),
        readiness_probe: Some(readiness_probe()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".to_owned(),
                mount_path: CONFIG_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "data".to_owned(),
                mount_path: RUN_DIR.to_owned(),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(restricted_container()),
        ..Container::default()
    }
}

/// The group port, not the client port: a mirror takes no clients until it
/// becomes active, yet it is as ready as the active.
fn readiness_probe() -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("tsa-group".to_owned()),
            host: None,
        }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

/// One directory holding both files, as the image expects; the licence
/// stays in its Secret and is never read by the operator.
fn config_volume(m: &Managed) -> Volume {
    Volume {
        name: "config".to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: naming::cache_config_map(m.cluster),
                        items: Some(vec![KeyToPath {
                            key: CONFIG_FILE.to_owned(),
                            path: CONFIG_FILE.to_owned(),
                            mode: None,
                        }]),
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: m.license.name.clone(),
                        items: Some(vec![KeyToPath {
                            key: m.license.key.clone(),
                            path: LICENSE_FILE.to_owned(),
                            mode: None,
                        }]),
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
            default_mode: None,
        }),
        ..Volume::default()
    }
}

#[cfg(test)]
mod golden;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{CacheSpec, DeletionPolicy, ExternalCacheSpec};
    use crate::naming::labels;

    /// The stateful sample: a managed cache of two servers in `prod`.
    pub(crate) fn sample() -> IntegrationCluster {
        let path = format!(
            "{}/manifests/samples/webmethods-is-stateful.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut ic: IntegrationCluster =
            serde_saphyr::from_str(&std::fs::read_to_string(path).expect("sample"))
                .expect("parses");
        ic.metadata.namespace = Some("prod".into());
        ic.metadata.uid = Some("uid-1".into());
        ic
    }

    fn managed_spec(ic: &mut IntegrationCluster) -> &mut crate::api::ManagedCacheSpec {
        ic.spec
            .cache
            .as_mut()
            .and_then(|c| c.managed.as_mut())
            .expect("managed cache")
    }

    fn pod_spec(set: &StatefulSet) -> &PodSpec {
        set.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    #[test]
    fn the_stateful_set_runs_the_spec_replicas_and_image() {
        let set = stateful_set(&sample()).expect("managed cache");
        assert_eq!(set.metadata.name.as_deref(), Some("orders-cache"));
        let spec = set.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(spec.service_name.as_deref(), Some("orders-cache"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        let container = &pod_spec(&set).containers[0];
        assert_eq!(container.name, "terracotta");
        assert_eq!(
            container.image.as_deref(),
            Some("registry.example.com/webmethods/bigmemorymax-server:4.5.0")
        );
        assert_eq!(
            container.command.as_ref().expect("command").join(" "),
            "start-tc-server.sh -f /opt/terracotta/config/tc-config.xml -n $(POD_NAME)"
        );
    }

    #[test]
    fn the_licence_and_config_share_the_config_directory() {
        let set = stateful_set(&sample()).expect("managed cache");
        let pod = pod_spec(&set);
        let volume = &pod.volumes.as_ref().expect("volumes")[0];
        let sources = volume
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .expect("projected");
        let config = sources[0].config_map.as_ref().expect("config map");
        assert_eq!(config.name, "orders-cache-config");
        let licence = sources[1].secret.as_ref().expect("secret");
        assert_eq!(licence.name, "terracotta-license");
        let item = &licence.items.as_ref().expect("items")[0];
        assert_eq!(
            (item.key.as_str(), item.path.as_str()),
            ("license.key", "license.key")
        );
        let mount = pod.containers[0]
            .volume_mounts
            .as_ref()
            .expect("mounts")
            .iter()
            .find(|m| m.name == volume.name)
            .expect("config mount");
        assert_eq!(mount.mount_path, "/opt/terracotta/config");
    }

    #[test]
    fn the_claim_has_the_spec_size_or_the_default() {
        let size = |ic: &IntegrationCluster| {
            let set = stateful_set(ic).expect("managed cache");
            let claims = set
                .spec
                .and_then(|s| s.volume_claim_templates)
                .expect("claims");
            assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
            assert!(claims[0].metadata.owner_references.is_none());
            claims[0]
                .spec
                .as_ref()
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .map(|q| q.0.clone())
        };
        let mut ic = sample();
        assert_eq!(size(&ic).as_deref(), Some("10Gi"));
        managed_spec(&mut ic).storage = Some("3Gi".into());
        assert_eq!(size(&ic).as_deref(), Some("3Gi"));
        managed_spec(&mut ic).storage = None;
        assert_eq!(size(&ic).as_deref(), Some(DEFAULT_STORAGE));
    }

    #[test]
    fn every_object_is_owned_and_labelled() {
        let ic = sample();
        let set = stateful_set(&ic).expect("set");
        let service = service(&ic).expect("service");
        let config = config_map(&ic).expect("config map");
        for meta in [&set.metadata, &service.metadata, &config.metadata] {
            let owner = &meta.owner_references.as_ref().expect("owner")[0];
            assert_eq!(
                (owner.kind.as_str(), owner.controller),
                ("IntegrationCluster", Some(true))
            );
            let labels = meta.labels.as_ref().expect("labels");
            assert_eq!(
                labels.get(labels::MANAGED_BY).map(String::as_str),
                Some("integration-operator")
            );
            assert_eq!(
                labels.get(labels::CLUSTER).map(String::as_str),
                Some("orders")
            );
            assert_eq!(
                labels.get(labels::COMPONENT).map(String::as_str),
                Some("cache")
            );
        }
        let template = set
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.as_ref())
            .expect("pod labels");
        let selector = service
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .expect("selector");
        assert!(selector.iter().all(|(k, v)| template.get(k) == Some(v)));
    }

    #[test]
    fn the_service_is_headless_and_publishes_not_ready_servers() {
        let service = service(&sample()).expect("service");
        let spec = service.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports: Vec<(String, i32)> = spec
            .ports
            .expect("ports")
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("tsa".to_owned(), 9510),
                ("tsa-group".to_owned(), 9530),
                ("management".to_owned(), 9540)
            ]
        );
    }

    #[test]
    fn the_pods_run_restricted() {
        let set = stateful_set(&sample()).expect("set");
        let pod = pod_spec(&set);
        let psc = pod.security_context.as_ref().expect("pod security");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let csc = pod.containers[0]
            .security_context
            .as_ref()
            .expect("container");
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(
            csc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
    }

    #[test]
    fn the_server_hosts_are_the_hosts_of_the_cache_urls() {
        let ic = sample();
        let config = tc_config(&ic).expect("config");
        let urls = render::cache_urls(&ic);
        assert_eq!(urls.len(), 2);
        for url in urls {
            let (host, port) = url.rsplit_once(':').expect("host:port");
            assert_eq!(port, TSA_PORT.to_string());
            assert!(config.contains(&format!("host=\"{host}\"")), "{host}");
        }
        assert_eq!(config.matches("<server ").count(), 2);
    }

    #[test]
    fn a_changed_server_list_changes_the_pod_template() {
        let digest = |ic: &IntegrationCluster| {
            stateful_set(ic)
                .and_then(|s| s.spec)
                .and_then(|s| s.template.metadata)
                .and_then(|m| m.annotations)
                .and_then(|a| a.get(keys::CONFIG_DIGEST).cloned())
                .expect("digest")
        };
        let mut ic = sample();
        let before = digest(&ic);
        assert_eq!(before, digest(&ic.clone()));
        managed_spec(&mut ic).replicas = 3;
        assert_ne!(before, digest(&ic));
    }

    #[test]
    fn claims_follow_the_deletion_policy() {
        let mut ic = sample();
        let policy = |ic: &IntegrationCluster| claim_retention(ic).when_deleted;
        assert_eq!(policy(&ic).as_deref(), Some("Retain"));
        ic.spec.deletion_policy = DeletionPolicy::Delete;
        assert_eq!(policy(&ic).as_deref(), Some("Delete"));
        assert_eq!(claim_retention(&ic).when_scaled.as_deref(), Some("Retain"));
    }

    fn assert_none(ic: &IntegrationCluster) {
        assert!(tc_config(ic).is_none());
        assert!(config_map(ic).is_none());
        assert!(service(ic).is_none());
        assert!(stateful_set(ic).is_none());
    }

    #[test]
    fn stateless_clusters_have_no_cache() {
        let mut ic = sample();
        ic.spec.mode = Mode::Stateless;
        assert_none(&ic);
        ic.spec.cache = None;
        assert_none(&ic);
    }

    #[test]
    fn external_and_absent_caches_are_not_managed() {
        let mut ic = sample();
        ic.spec.cache = Some(CacheSpec {
            mode: CacheMode::External,
            managed: None,
            external: Some(ExternalCacheSpec {
                urls: vec![crate::api::CacheUrl("tsa-0:9510".into())],
            }),
            connect_timeout_seconds: 30,
        });
        assert_none(&ic);
        if let Some(cache) = ic.spec.cache.as_mut() {
            cache.mode = CacheMode::None;
            cache.external = None;
        }
        assert_none(&ic);
    }

    #[test]
    fn a_managed_cache_without_licence_gets_no_objects() {
        let mut ic = sample();
        managed_spec(&mut ic).license_secret_ref = None;
        assert_none(&ic);
    }
}
