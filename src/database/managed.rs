//! A managed database: one PostgreSQL the operator runs for one cluster, in
//! a StatefulSet of one with a volume. The operator connects to it as the
//! superuser from [`admin_secret`] to provision the cluster's own role,
//! database and schemas; the servers never get these credentials.
//!
//! Pure builders like [`crate::workload`]: they take no client, so what the
//! operator would create is unit-tested here.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ExecAction, PodSpec, PodTemplateSpec, Probe, Secret,
    SecretKeySelector, Service, ServiceSpec, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::api::{DatabaseMode, IntegrationCluster};
use crate::naming::{self};
use crate::workload::stateful::{
    claim_retention, claim_template, component_labels, component_selector, container_port,
    restricted_container, restricted_pod, schedule, service_port,
};
use crate::workload::{data_meta, owned_meta};

/// The image when the spec names none.
pub const DEFAULT_IMAGE: &str = "postgres:17";
/// PostgreSQL's port.
pub const PORT: i32 = 5432;
/// Volume size when the spec names none.
pub const DEFAULT_STORAGE: &str = "10Gi";
/// The superuser the official image creates; the admin Secret's username.
pub const ADMIN_USER: &str = "postgres";
/// The admin Secret's key for the user name.
pub const USERNAME_KEY: &str = "username";
/// The admin Secret's key for the password.
pub const PASSWORD_KEY: &str = "password";

/// Where the volume is mounted.
const DATA_DIR: &str = "/var/lib/postgresql/data";
/// The data lives one level below the mount point: initdb refuses a
/// non-empty directory, and a fresh volume may hold lost+found.
const PGDATA: &str = "/var/lib/postgresql/data/pgdata";
/// The postgres user of the official (Debian) image: the server runs as it
/// from the start, without the entrypoint's switch from root.
const USER: i64 = 999;
/// The component label of everything the database consists of.
const COMPONENT: &str = "database";

/// What a managed database needs from the spec.
struct Managed<'a> {
    cluster: &'a str,
    namespace: &'a str,
    image: &'a str,
    storage: &'a str,
}

/// The managed database, or `None` when the database is external or absent.
/// Every field of `database.managed` has a default, so it may be omitted.
fn managed(ic: &IntegrationCluster) -> Option<Managed<'_>> {
    let database = ic.spec.database.as_ref()?;
    if database.mode != DatabaseMode::Managed {
        return None;
    }
    let spec = database.managed.as_ref();
    Some(Managed {
        cluster: ic.metadata.name.as_deref()?,
        namespace: ic.metadata.namespace.as_deref()?,
        image: spec
            .and_then(|m| m.image.as_deref())
            .unwrap_or(DEFAULT_IMAGE),
        storage: spec
            .and_then(|m| m.storage.as_deref())
            .unwrap_or(DEFAULT_STORAGE),
    })
}

/// The superuser's credentials. The caller generates `password` once and
/// keeps this Secret as its only copy: the image sets the password only
/// when it initialises an empty volume, so a new password would not work.
pub fn admin_secret(ic: &IntegrationCluster, password: &str) -> Option<Secret> {
    let m = managed(ic)?;
    Some(Secret {
        metadata: data_meta(ic, naming::database_admin_secret(m.cluster), COMPONENT),
        type_: Some("Opaque".to_owned()),
        string_data: Some(BTreeMap::from([
            (USERNAME_KEY.to_owned(), ADMIN_USER.to_owned()),
            (PASSWORD_KEY.to_owned(), password.to_owned()),
        ])),
        ..Secret::default()
    })
}

/// The Service the operator and the servers connect to.
pub fn service(ic: &IntegrationCluster) -> Option<Service> {
    let m = managed(ic)?;
    Some(Service {
        metadata: owned_meta(ic, naming::database_service(m.cluster), COMPONENT),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(component_selector(ic, COMPONENT)),
            ports: Some(vec![service_port("postgres", PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The host the operator connects to as the superuser: the Service's name
/// within the cluster, so it does not depend on the cluster's DNS domain.
pub fn admin_host(ic: &IntegrationCluster) -> Option<String> {
    let m = managed(ic)?;
    Some(format!(
        "{}.{}.svc",
        naming::database_service(m.cluster),
        m.namespace
    ))
}

/// The database server: one replica, since PostgreSQL has a single primary
/// and the servers' pools reconnect after it restarts.
pub fn stateful_set(ic: &IntegrationCluster) -> Option<StatefulSet> {
    let m = managed(ic)?;
    let name = naming::database_service(m.cluster);
    let mut pod = PodSpec {
        containers: vec![postgres_container(&m)],
        // PostgreSQL never talks to the Kubernetes API.
        automount_service_account_token: Some(false),
        security_context: Some(restricted_pod(Some(USER))),
        ..PodSpec::default()
    };
    schedule(ic, &mut pod);
    Some(StatefulSet {
        metadata: owned_meta(ic, name.clone(), COMPONENT),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(component_selector(ic, COMPONENT)),
                ..LabelSelector::default()
            },
            service_name: Some(name),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: None,
            }),
            persistent_volume_claim_retention_policy: Some(claim_retention(ic)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(component_labels(ic, COMPONENT)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![claim_template(ic, COMPONENT, m.storage)]),
            ..StatefulSetSpec::default()
        }),
        status: None,
    })
}

/// The server, with the superuser's password from the admin Secret.
fn postgres_container(m: &Managed) -> Container {
    Container {
        name: "postgres".to_owned(),
        image: Some(m.image.to_owned()),
        env: Some(vec![
            EnvVar {
                name: "POSTGRES_PASSWORD".to_owned(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: naming::database_admin_secret(m.cluster),
                        key: PASSWORD_KEY.to_owned(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            },
            EnvVar {
                name: "PGDATA".to_owned(),
                value: Some(PGDATA.to_owned()),
                value_from: None,
            },
        ]),
        ports: Some(vec![container_port("postgres", PORT)]),
        readiness_probe: Some(readiness_probe()),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".to_owned(),
            mount_path: DATA_DIR.to_owned(),
            ..VolumeMount::default()
        }]),
        security_context: Some(restricted_container()),
        ..Container::default()
    }
}

/// Over TCP: during initialisation the image runs a temporary server on the
/// Unix socket only, which must not count as ready.
fn readiness_probe() -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(
                ["pg_isready", "-U", ADMIN_USER, "-h", "127.0.0.1"]
                    .map(str::to_owned)
                    .to_vec(),
            ),
        }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DeletionPolicy, ExternalDatabaseSpec, ManagedDatabaseSpec, SecretKeyRef};
    use crate::naming::labels;

    /// The stateful sample with its database switched to managed.
    fn sample(managed: Option<ManagedDatabaseSpec>) -> IntegrationCluster {
        let path = format!(
            "{}/manifests/samples/webmethods-is-stateful.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut ic: IntegrationCluster =
            serde_saphyr::from_str(&std::fs::read_to_string(path).expect("sample"))
                .expect("parses");
        ic.metadata.namespace = Some("prod".into());
        ic.metadata.uid = Some("uid-1".into());
        let database = ic.spec.database.as_mut().expect("sample has a database");
        database.mode = DatabaseMode::Managed;
        database.external = None;
        database.managed = managed;
        ic
    }

    fn container(set: &StatefulSet) -> &Container {
        &set.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
            .containers[0]
    }

    #[test]
    fn objects_exist_only_for_a_managed_database() {
        let mut ic = sample(None);
        assert!(admin_secret(&ic, "pw").is_some());
        assert!(service(&ic).is_some());
        assert!(stateful_set(&ic).is_some());
        assert_eq!(admin_host(&ic).as_deref(), Some("orders-database.prod.svc"));

        if let Some(database) = ic.spec.database.as_mut() {
            database.mode = DatabaseMode::External;
            database.external = Some(ExternalDatabaseSpec {
                secret_ref: SecretKeyRef {
                    name: "orders-db-admin".into(),
                    key: "url".into(),
                },
            });
        }
        let none = |ic: &IntegrationCluster| {
            admin_secret(ic, "pw").is_none()
                && service(ic).is_none()
                && stateful_set(ic).is_none()
                && admin_host(ic).is_none()
        };
        assert!(none(&ic));
        ic.spec.database = None;
        assert!(none(&ic));
    }

    #[test]
    fn the_password_comes_from_the_admin_secret() {
        let ic = sample(None);
        let secret = admin_secret(&ic, "s3cret").expect("secret");
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some("orders-database-admin")
        );
        let data = secret.string_data.as_ref().expect("string data");
        assert_eq!(data.get(USERNAME_KEY).map(String::as_str), Some("postgres"));
        assert!(data.get(PASSWORD_KEY).is_some_and(|p| p == "s3cret"));

        let set = stateful_set(&ic).expect("set");
        let env = container(&set).env.as_ref().expect("env");
        let password = env
            .iter()
            .find(|e| e.name == "POSTGRES_PASSWORD")
            .expect("POSTGRES_PASSWORD");
        assert!(password.value.is_none());
        let key_ref = password
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("secret key ref");
        assert_eq!(Some(&key_ref.name), secret.metadata.name.as_ref());
        assert!(data.contains_key(&key_ref.key));
    }

    #[test]
    fn the_image_defaults_and_can_be_overridden() {
        let image = |ic: &IntegrationCluster| {
            container(&stateful_set(ic).expect("set"))
                .image
                .clone()
                .expect("image")
        };
        assert_eq!(image(&sample(None)), DEFAULT_IMAGE);
        let custom = sample(Some(ManagedDatabaseSpec {
            image: Some("registry.example.com/postgres:16".into()),
            storage: None,
        }));
        assert_eq!(image(&custom), "registry.example.com/postgres:16");
    }

    #[test]
    fn the_claim_has_the_spec_size_or_the_default() {
        let size = |ic: &IntegrationCluster| {
            let claims = stateful_set(ic)
                .and_then(|s| s.spec)
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
                .expect("storage request")
        };
        assert_eq!(size(&sample(None)), "10Gi");
        let big = sample(Some(ManagedDatabaseSpec {
            image: None,
            storage: Some("50Gi".into()),
        }));
        assert_eq!(size(&big), "50Gi");
    }

    #[test]
    fn claims_follow_the_deletion_policy() {
        let mut ic = sample(None);
        assert_eq!(claim_retention(&ic).when_deleted.as_deref(), Some("Retain"));
        ic.spec.deletion_policy = DeletionPolicy::Delete;
        assert_eq!(claim_retention(&ic).when_deleted.as_deref(), Some("Delete"));
    }

    #[test]
    fn the_service_selects_the_database_pod() {
        let ic = sample(None);
        let service = service(&ic).expect("service");
        let set = stateful_set(&ic).expect("set");
        let spec = service.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        let port = &spec.ports.as_ref().expect("ports")[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("postgres"), 5432));
        let labels = set
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.as_ref())
            .expect("pod labels");
        let selector = spec.selector.as_ref().expect("selector");
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        assert_eq!(set.metadata.name, service.metadata.name);
    }

    #[test]
    fn the_admin_secret_is_owned_only_under_delete() {
        let mut ic = sample(None);
        ic.spec.deletion_policy = DeletionPolicy::Retain;
        let secret = admin_secret(&ic, "pw").expect("secret");
        assert!(secret.metadata.owner_references.is_none());
        ic.spec.deletion_policy = DeletionPolicy::Delete;
        let secret = admin_secret(&ic, "pw").expect("secret");
        assert!(secret.metadata.owner_references.is_some());
    }

    #[test]
    fn every_object_is_owned_and_labelled() {
        let mut ic = sample(None);
        ic.spec.deletion_policy = DeletionPolicy::Delete;
        let secret = admin_secret(&ic, "pw").expect("secret");
        let service = service(&ic).expect("service");
        let set = stateful_set(&ic).expect("set");
        for meta in [&secret.metadata, &service.metadata, &set.metadata] {
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
                Some("database")
            );
        }
    }

    #[test]
    fn the_server_runs_restricted_as_postgres() {
        let set = stateful_set(&sample(None)).expect("set");
        let pod = set
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod");
        let psc = pod.security_context.as_ref().expect("pod security");
        assert_eq!(
            (psc.run_as_non_root, psc.run_as_user, psc.fs_group),
            (Some(true), Some(999), Some(999))
        );
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let csc = container(&set)
            .security_context
            .as_ref()
            .expect("container");
        assert_eq!(csc.allow_privilege_escalation, Some(false));
        assert_eq!(
            csc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        let probe = container(&set)
            .readiness_probe
            .as_ref()
            .and_then(|p| p.exec.as_ref())
            .and_then(|e| e.command.as_ref())
            .expect("probe");
        assert_eq!(probe.join(" "), "pg_isready -U postgres -h 127.0.0.1");
    }
}
