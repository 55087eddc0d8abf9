//! The controller's side of the cluster database: where it is (admin
//! Secret or managed server), the role's credentials Secret, when to
//! provision again, the connection pool, and the guaranteed-delivery
//! bookkeeping around a reconcile (work of leaving nodes, lock breaking).
//! Provisioning runs when its inputs change, every resync otherwise,
//! and after a failure only once its backoff passed, so a database outage
//! costs one connection attempt per backoff step, not one per reconcile.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PostParams};
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::{Context, FIELD_MANAGER, Failure, RESYNC, apply, backoff, plan};
use crate::api::{DatabaseMode, DatabaseStatus, IntegrationCluster};
use crate::database::{
    self, Admin, DbError, Endpoint, ErrorClass, Login, Owner, Provisioned, RolePool, managed,
};
use crate::naming;
use crate::workload::data_meta;

/// Provisioning results and connection pools, per cluster. The locks are
/// held only to look up or record, never across an `.await`, so one
/// cluster's slow database never waits on or delays another's.
#[derive(Default)]
pub struct Databases {
    memos: Mutex<HashMap<String, Memo>>,
    pools: Mutex<HashMap<String, (String, RolePool)>>,
}

struct Memo {
    inputs: String,
    at: Instant,
    outcome: Result<Provisioned, DbError>,
    failures: u32,
}

/// What the reconcile needs to know about the database.
pub struct View {
    /// Where the servers connect, once known.
    pub endpoint: Option<Endpoint>,
    /// `credentials_secret` is set once the credentials Secret exists, so
    /// pods referencing it can start.
    pub status: DatabaseStatus,
    pub problem: Option<DbError>,
    /// What this reconcile's provisioning created or repaired.
    pub changes: Vec<String>,
    /// When to look again because of the database.
    pub retry_in: Option<Duration>,
    /// The role's pool, for guaranteed-delivery queries.
    pub pool: Option<RolePool>,
}

fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key).cloned())
        })
}

/// Whether finding the admin connection may create the managed admin
/// Secret: never during deletion, which must not create objects (in a
/// terminating namespace it could not anyway).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Creating {
    Allowed,
    Forbidden,
}

/// The admin connection and a token that changes when its Secret does.
async fn admin(
    secrets: &Api<Secret>,
    ic: &IntegrationCluster,
    creating: Creating,
) -> Result<Result<(Admin, String), DbError>, Failure> {
    let Some(spec) = &ic.spec.database else {
        return Ok(Err(DbError::new(ErrorClass::Other, "", "no database")));
    };
    let name = ic.name_any();
    match spec.mode {
        DatabaseMode::External => {
            let Some(reference) = spec.external.as_ref().map(|e| &e.secret_ref) else {
                return Ok(Err(DbError::new(
                    ErrorClass::AdminSecretInvalid,
                    "",
                    "spec.database.external.secretRef is missing",
                )));
            };
            let secret = read_secret(secrets, &reference.name).await?;
            let invalid = |detail: String| DbError::new(ErrorClass::AdminSecretInvalid, "", detail);
            let Some(secret) = secret else {
                return Ok(Err(invalid(format!(
                    "Secret {} (spec.database.external.secretRef) does not exist",
                    reference.name
                ))));
            };
            let Some(url) = secret_text(&secret, &reference.key) else {
                return Ok(Err(invalid(format!(
                    "Secret {} has no key {}",
                    reference.name, reference.key
                ))));
            };
            Ok(Admin::from_url(&url)
                .map(|admin| (admin, secret.resource_version().unwrap_or_default()))
                .map_err(|why| {
                    invalid(format!(
                        "key {} of Secret {}: {why}",
                        reference.key, reference.name
                    ))
                }))
        }
        DatabaseMode::Managed => {
            let secret_name = naming::database_admin_secret(&name);
            let secret = match creating {
                Creating::Allowed => {
                    ensure_secret(secrets, ic, &secret_name, |password| {
                        managed::admin_secret(ic, &password)
                    })
                    .await?
                }
                Creating::Forbidden => read_secret(secrets, &secret_name).await?,
            };
            let (Some(secret), Some(host)) = (secret, managed::admin_host(ic)) else {
                return Ok(Err(DbError::new(
                    ErrorClass::Other,
                    "",
                    format!("Secret {secret_name} could not be created or read"),
                )));
            };
            let login = Login {
                username: managed::ADMIN_USER.to_owned(),
                password: secret_text(&secret, managed::PASSWORD_KEY).unwrap_or_default(),
            };
            let port = u16::try_from(managed::PORT).unwrap_or(5432);
            Ok(Ok((
                Admin::new(&host, port, &login),
                secret.resource_version().unwrap_or_default(),
            )))
        }
    }
}

async fn read_secret(secrets: &Api<Secret>, name: &str) -> Result<Option<Secret>, Failure> {
    secrets.get_opt(name).await.map_err(|source| Failure::Read {
        kind: "Secret".into(),
        what: format!("Secret {name}"),
        source,
    })
}

/// Returns the Secret `name`, creating it from `build` (given a generated
/// password) when it does not exist. An existing Secret is never rewritten,
/// so the password stays what the database knows. None when `build` has
/// nothing to create.
async fn ensure_secret(
    secrets: &Api<Secret>,
    ic: &IntegrationCluster,
    name: &str,
    build: impl FnOnce(String) -> Option<Secret>,
) -> Result<Option<Secret>, Failure> {
    if let Some(secret) = read_secret(secrets, name).await? {
        return Ok(Some(secret));
    }
    let password = database::generate_password().map_err(|e| Failure::Random(e.to_string()))?;
    let Some(secret) = build(password) else {
        return Ok(None);
    };
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    match secrets.create(&params, &secret).await {
        Ok(created) => {
            info!(cluster = %ic.name_any(), secret = name, "created database Secret");
            Ok(Some(created))
        }
        // Another reconcile was first; its password wins.
        Err(kube::Error::Api(e)) if e.code == 409 => read_secret(secrets, name).await,
        Err(source) => Err(Failure::Write {
            kind: "Secret".into(),
            what: format!("Secret {name}"),
            source,
        }),
    }
}

/// Keeps the credentials Secret's connection keys in step with the
/// endpoint; the password is never changed. `existing` is the Secret as
/// just read, if it exists.
async fn ensure_credentials(
    secrets: &Api<Secret>,
    ic: &IntegrationCluster,
    endpoint: &Endpoint,
    existing: Option<Secret>,
) -> Result<(Secret, Login), Failure> {
    let name = naming::database_credentials(&ic.name_any());
    let connection = BTreeMap::from([
        ("username".to_owned(), endpoint.database.clone()),
        ("host".to_owned(), endpoint.host.clone()),
        ("port".to_owned(), endpoint.port.to_string()),
        ("database".to_owned(), endpoint.database.clone()),
    ]);
    let secret = match existing {
        Some(secret) => Some(secret),
        None => {
            ensure_secret(secrets, ic, &name, |password| {
                let mut data = connection.clone();
                data.insert("password".to_owned(), password);
                Some(Secret {
                    metadata: data_meta(ic, name.clone(), "database"),
                    string_data: Some(data),
                    type_: Some("Opaque".to_owned()),
                    ..Default::default()
                })
            })
            .await?
        }
    };
    let Some(mut secret) = secret else {
        return Err(Failure::Conflict(format!(
            "Secret {name} was deleted while it was being created; retrying"
        )));
    };
    let stale = connection
        .iter()
        .any(|(k, v)| secret_text(&secret, k).as_deref() != Some(v.as_str()));
    if stale {
        let patch = serde_json::json!({ "stringData": connection });
        secret = secrets
            .patch(&name, &super::merge_params(), &Patch::Merge(&patch))
            .await
            .map_err(|source| Failure::Write {
                kind: "Secret".into(),
                what: format!("Secret {name}"),
                source,
            })?;
    }
    let login = Login {
        username: secret_text(&secret, "username").unwrap_or_default(),
        password: secret_text(&secret, "password").unwrap_or_default(),
    };
    Ok((secret, login))
}

/// The name of the cluster's role and database: the one it already has —
/// recorded in status, or in its credentials Secret (status can be lost; a
/// cluster recreated after `Retain` finds its Secret) — so that a cluster
/// provisioned under an earlier naming scheme keeps its data, else the
/// name of the current scheme. A recorded name must look like one the
/// operator gives; whether the role and database are the cluster's is
/// still proven when provisioning.
fn database_name(ic: &IntegrationCluster, credentials: Option<&Secret>) -> String {
    let recorded = ic
        .status
        .as_ref()
        .and_then(|s| s.database.as_ref())
        .and_then(|d| d.database.clone())
        .or_else(|| credentials.and_then(|c| secret_text(c, "database")));
    match recorded {
        Some(name) if naming::is_database_name(&name) => name,
        _ => naming::database_role(&ic.namespace().unwrap_or_default(), &ic.name_any()),
    }
}

/// Who the cluster's role and database belong to.
fn owner(ic: &IntegrationCluster) -> Owner {
    Owner {
        namespace: ic.namespace().unwrap_or_default(),
        cluster: ic.name_any(),
        uid: ic.uid().unwrap_or_default(),
    }
}

/// Provisions the cluster's database when due (role, database, schema
/// objects, credentials Secret) and says where it is.
pub async fn provision(
    client: &kube::Client,
    databases: &Databases,
    ic: &IntegrationCluster,
) -> Result<Option<View>, Failure> {
    let Some(spec) = &ic.spec.database else {
        return Ok(None);
    };
    let namespace = ic.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let credentials = read_secret(&secrets, &naming::database_credentials(&ic.name_any())).await?;
    let database_name = database_name(ic, credentials.as_ref());
    let previous = ic
        .status
        .as_ref()
        .and_then(|s| s.database.clone())
        .unwrap_or_default();

    let admin = admin(&secrets, ic, Creating::Allowed).await?;
    let endpoint = endpoint_of(&admin, &previous, &database_name);
    let mut view = View {
        endpoint: endpoint.clone(),
        status: DatabaseStatus {
            ready: false,
            schema_version: previous.schema_version,
            host: endpoint.as_ref().map(Endpoint::address),
            database: Some(database_name),
            credentials_secret: None,
        },
        problem: None,
        changes: Vec::new(),
        retry_in: None,
        pool: None,
    };
    let Some(endpoint) = endpoint else {
        view.problem = admin.err();
        view.retry_in = Some(RESYNC.min(Duration::from_secs(30)));
        return Ok(Some(view));
    };
    let (credentials, login) = ensure_credentials(&secrets, ic, &endpoint, credentials).await?;
    view.status.credentials_secret = Some(credentials.name_any());

    let (admin, admin_version) = match admin {
        Ok(found) => found,
        Err(problem) => {
            view.problem = Some(problem);
            view.retry_in = Some(Duration::from_secs(30));
            return Ok(Some(view));
        }
    };
    let inputs = format!(
        "{admin_version}/{}/{:?}/{}",
        credentials.resource_version().unwrap_or_default(),
        spec.components,
        endpoint.address()
    );
    let target = Target {
        admin: &admin,
        endpoint: &endpoint,
        login: &login,
        inputs: &inputs,
    };
    run_provisioning(databases, ic, &spec.components, &target, &mut view).await;
    Ok(Some(view))
}

/// Where the servers connect. Without a readable admin Secret they keep
/// the endpoint they were given (status remembers it), so nothing
/// restarts.
fn endpoint_of(
    admin: &Result<(Admin, String), DbError>,
    previous: &DatabaseStatus,
    database: &str,
) -> Option<Endpoint> {
    match admin {
        Ok((admin, _)) => Some(Endpoint {
            host: admin.host().to_owned(),
            port: admin.port(),
            database: database.to_owned(),
        }),
        Err(_) => previous.host.as_deref().and_then(|address| {
            let (host, port) = address.rsplit_once(':')?;
            Some(Endpoint {
                host: host.to_owned(),
                port: port.parse().ok()?,
                database: database.to_owned(),
            })
        }),
    }
}

/// What provisioning runs against; `inputs` says when it must run again.
struct Target<'a> {
    admin: &'a Admin,
    endpoint: &'a Endpoint,
    login: &'a Login,
    inputs: &'a str,
}

/// Provisions, unless the same inputs were provisioned recently, and
/// records the outcome, the role's pool and when to look again in `view`.
async fn run_provisioning(
    databases: &Databases,
    ic: &IntegrationCluster,
    components: &[String],
    target: &Target<'_>,
    view: &mut View,
) {
    let key = Context::key(ic);
    let (outcome, retry_in, fresh) = match recent(databases, &key, target.inputs) {
        Some((outcome, retry_in)) => (outcome, retry_in, false),
        None => {
            let outcome = database::provision(
                target.admin,
                target.endpoint,
                target.login,
                components,
                &owner(ic),
            )
            .await;
            let retry_in = remember(databases, &key, target.inputs, &outcome);
            (outcome, retry_in, true)
        }
    };
    let outcome = outcome.and_then(|provisioned| {
        let pool = pool(
            databases,
            &key,
            target.inputs,
            target.admin,
            target.endpoint,
            target.login,
        )?;
        Ok((provisioned, pool))
    });
    match outcome {
        Ok((provisioned, pool)) => {
            view.status.ready = true;
            view.status.schema_version = provisioned.schema_version;
            if fresh {
                view.changes = provisioned.changes;
            }
            view.pool = Some(pool);
        }
        Err(problem) => {
            if fresh {
                warn!(cluster = %key, reason = problem.class.reason(), error = %problem, "database provisioning failed");
            }
            view.problem = Some(problem);
        }
    }
    view.retry_in = Some(retry_in);
}

/// A recent provisioning result for the same inputs, and when it expires.
fn recent(
    databases: &Databases,
    key: &str,
    inputs: &str,
) -> Option<(Result<Provisioned, DbError>, Duration)> {
    let memos = databases.memos.lock().ok()?;
    let memo = memos.get(key)?;
    let wait = match &memo.outcome {
        Ok(_) => RESYNC,
        Err(_) => backoff(memo.failures),
    };
    let age = memo.at.elapsed();
    (memo.inputs == inputs && age < wait).then(|| (memo.outcome.clone(), wait - age))
}

/// Records a provisioning result; returns when to provision again.
fn remember(
    databases: &Databases,
    key: &str,
    inputs: &str,
    outcome: &Result<Provisioned, DbError>,
) -> Duration {
    let mut memos = databases
        .memos
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let failures = match (outcome, memos.get(key)) {
        (Ok(_), _) => 0,
        (Err(_), Some(memo)) => memo.failures + 1,
        (Err(_), None) => 1,
    };
    memos.insert(
        key.to_owned(),
        Memo {
            inputs: inputs.to_owned(),
            at: Instant::now(),
            outcome: outcome.clone(),
            failures,
        },
    );
    if outcome.is_ok() {
        RESYNC
    } else {
        backoff(failures)
    }
}

/// The cluster role's pool, made again when the credentials change.
/// Connections open lazily and close when idle.
fn pool(
    databases: &Databases,
    key: &str,
    inputs: &str,
    admin: &Admin,
    endpoint: &Endpoint,
    login: &Login,
) -> Result<RolePool, DbError> {
    let mut pools = databases
        .pools
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((made_for, pool)) = pools.get(key)
        && made_for == inputs
    {
        return Ok(pool.clone());
    }
    let pool = RolePool::new(admin, endpoint, login)?;
    pools.insert(key.to_owned(), (inputs.to_owned(), pool.clone()));
    Ok(pool)
}

/// Forgets a deleted cluster's pool and memo.
pub fn forget(databases: &Databases, ic: &IntegrationCluster) {
    let key = Context::key(ic);
    if let Ok(mut memos) = databases.memos.lock() {
        memos.remove(&key);
    }
    if let Ok(mut pools) = databases.pools.lock() {
        pools.remove(&key);
    }
}

/// What deletion with `deletionPolicy: Delete` drops: the cluster's
/// database and role on an external server, as a person names them.
pub fn drop_target(ic: &IntegrationCluster) -> String {
    let role = database_name(ic, None);
    let host = ic
        .status
        .as_ref()
        .and_then(|s| s.database.as_ref())
        .and_then(|d| d.host.clone())
        .unwrap_or_else(|| "its server".to_owned());
    format!("database {role} and role {role} on {host}")
}

/// Drops the cluster's database and role (deletionPolicy Delete, external
/// server). Creates nothing: the admin Secret is only read.
pub async fn drop_database(
    client: &kube::Client,
    ic: &IntegrationCluster,
) -> Result<DropOutcome, Failure> {
    let namespace = ic.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let role = database_name(ic, None);
    let (admin, _) = admin(&secrets, ic, Creating::Forbidden)
        .await?
        .map_err(Failure::Database)?;
    let endpoint = Endpoint {
        host: admin.host().to_owned(),
        port: admin.port(),
        database: role.clone(),
    };
    match database::drop_cluster_database(&admin, &endpoint, &owner(ic)).await {
        Ok(dropped) if dropped.is_empty() => Ok(DropOutcome::Absent),
        Ok(dropped) => Ok(DropOutcome::Dropped(format!(
            "deletionPolicy Delete: dropped {} on {}",
            dropped.join(" and "),
            endpoint.address()
        ))),
        // Not the cluster's: nothing of it to drop, nothing to retry.
        Err(e) if e.class == ErrorClass::NotOwned => Ok(DropOutcome::NotOwned(format!(
            "deletionPolicy Delete: left database and role {role} on {} untouched: {}",
            endpoint.address(),
            e.detail
        ))),
        Err(e) => Err(Failure::Database(e)),
    }
}

/// What deletion did to the cluster's database.
pub enum DropOutcome {
    /// Dropped; what a person should read in an Event.
    Dropped(String),
    /// Nothing was there.
    Absent,
    /// What is there carries no marker of this cluster: left alone.
    NotOwned(String),
}

/// The Secrets that open a retained database (deletionPolicy Retain): the
/// credentials and, for a managed server, its admin Secret. Those still
/// owned by the cluster (made by an operator version that owned them) are
/// released first. Returns the names kept.
pub async fn keep_secrets(
    client: &kube::Client,
    ic: &IntegrationCluster,
) -> Result<Vec<String>, Failure> {
    let Some(spec) = &ic.spec.database else {
        return Ok(Vec::new());
    };
    let name = ic.name_any();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ic.namespace().unwrap_or_default());
    let mut names = vec![naming::database_credentials(&name)];
    if spec.mode == DatabaseMode::Managed {
        names.push(naming::database_admin_secret(&name));
    }
    let mut kept = Vec::new();
    for secret_name in names {
        let Some(secret) = read_secret(&secrets, &secret_name).await? else {
            continue;
        };
        apply::release(&secrets, ic, &secret).await?;
        kept.push(secret_name);
    }
    Ok(kept)
}

/// Unfinished guaranteed-delivery work of the nodes being removed: None
/// without a database, Err when it could not be read.
pub async fn unfinished_work(
    ic: &IntegrationCluster,
    db: Option<&View>,
    pods: &[Pod],
) -> Option<Result<std::collections::BTreeMap<String, u64>, ()>> {
    let db = db?;
    let removing: Vec<String> = ic
        .spec
        .nodes
        .iter()
        .flat_map(|n| n.remove.iter())
        .filter(|node| pods.iter().any(|p| p.name_any() == **node))
        .cloned()
        .collect();
    if removing.is_empty() {
        return Some(Ok(Default::default()));
    }
    let Some(pool) = &db.pool else {
        return Some(Err(()));
    };
    Some(
        pool.bounded(
            "reading guaranteed-delivery work",
            database::gd::unfinished_by_node(pool.pool(), &removing),
        )
        .await
        .map_err(|e| {
            warn!(cluster = %ic.name_any(), error = %e, "reading guaranteed-delivery work failed");
        }),
    )
}

/// Database bookkeeping after the actions: break the locks of nodes that
/// are gone (at once for forced ones) and record the members. Returns when
/// the next lock may be broken.
pub async fn release_locks_and_record_members(
    ctx: &Context,
    ic: &IntegrationCluster,
    pool: &RolePool,
    pods: &[Pod],
    plan: &plan::Plan,
) -> Option<Duration> {
    let live: Vec<String> = pods.iter().map(ResourceExt::name_any).collect();
    let forced: Vec<String> = crate::api::annotations::forced(ic).into_iter().collect();
    let lock_break = ic
        .spec
        .database
        .as_ref()
        .map_or(120, |d| i64::from(d.lock_break_seconds));
    let mut next = None;
    let breaking = database::gd::break_locks(pool.pool(), &live, &forced, lock_break);
    match pool
        .bounded("breaking guaranteed-delivery locks", breaking)
        .await
    {
        Ok(broken) => {
            for (node, count) in &broken.released {
                let why = if forced.contains(node) {
                    "removed with the force annotation".to_owned()
                } else {
                    format!("gone for more than lockBreakSeconds ({lock_break}s)")
                };
                let note = format!(
                    "released {count} guaranteed-delivery transactions of {node} ({why}); the other nodes take them over"
                );
                apply::publish(ctx, ic, EventType::Warning, "LocksBroken", note).await;
            }
            next = broken.next_in_seconds.map(Duration::from_secs);
        }
        Err(e) => {
            warn!(cluster = %ic.name_any(), error = %e, "breaking guaranteed-delivery locks failed")
        }
    }
    let members: Vec<(String, String, String)> = plan
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.logical_hostname.clone().unwrap_or_default(),
                n.state.to_string(),
            )
        })
        .collect();
    let recording = database::gd::record_members(pool.pool(), &members);
    if let Err(e) = pool.bounded("recording members", recording).await {
        warn!(cluster = %ic.name_any(), error = %e, "recording members failed");
    }
    next
}
