//! The cluster database against the test bed's real PostgreSQL: the
//! operator provisions a role, a database, schemas and its tables; other
//! clusters' roles are kept out; bad admin credentials are reported without
//! the secret; deletion keeps or drops per policy; removal waits for
//! guaranteed-delivery work and the locks of gone nodes are broken.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use integration_operator::api::{IntegrationCluster, IntegrationClusterStatus, NodeState, Phase};
use integration_operator::database::{self, Admin, Endpoint, Login};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

/// A generic cluster whose database is the test bed's PostgreSQL.
fn cluster(name: &str, secret: &str, replicas: i32, extra: &str) -> String {
    format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: {name}}}\n\
         spec:\n  profile: generic\n  mode: stateless\n  image: registry.example.com/srv:1\n  \
         replicas: {replicas}\n  database:\n    mode: external\n    \
         external: {{secretRef: {{name: {secret}, key: url}}}}\n    components: [Orders, Audit]\n{extra}"
    )
}

struct Bed {
    client: Client,
    ns: String,
    api: Api<IntegrationCluster>,
    _operator: Operator,
}

async fn bed(prefix: &str) -> Bed {
    let client = admin().await;
    let ns = namespace(&client, prefix).await;
    let operator = Operator::start(&ns);
    database_admin_secret(&client, &ns, "db-admin", &postgres_admin_url()).await;
    let api = Api::namespaced(client.clone(), &ns);
    Bed {
        client,
        ns,
        api,
        _operator: operator,
    }
}

fn condition<'a>(
    status: &'a IntegrationClusterStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

async fn provisioned(api: &Api<IntegrationCluster>, name: &str) -> IntegrationClusterStatus {
    status_when(api, name, "database provisioned and phase Ready", |s| {
        s.database.as_ref().is_some_and(|d| d.ready) && s.phase == Some(Phase::Ready)
    })
    .await
}

async fn admin_connection(database: &str) -> PgConnection {
    let options: PgConnectOptions = postgres_admin_url().parse().expect("admin URL");
    PgConnection::connect_with(&options.database(database))
        .await
        .expect("connect as admin")
}

fn secret_text(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default()
}

/// The credentials the operator generated for a cluster.
async fn credentials(client: &Client, ns: &str, cluster: &str) -> (Endpoint, Login) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets
        .get(&format!("{cluster}-database-credentials"))
        .await
        .expect("credentials Secret");
    (
        Endpoint {
            host: secret_text(&secret, "host"),
            port: secret_text(&secret, "port").parse().expect("port"),
            database: secret_text(&secret, "database"),
        },
        Login {
            username: secret_text(&secret, "username"),
            password: secret_text(&secret, "password"),
        },
    )
}

async fn role_connection(
    endpoint: &Endpoint,
    login: &Login,
    database: &str,
) -> Result<PgConnection, sqlx::Error> {
    let options = database::role_options(endpoint, login).database(database);
    PgConnection::connect_with(&options).await
}

async fn events(client: &Client, ns: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
}

async fn event_with(client: &Client, ns: &str, reason: &str, needle: &str) -> Event {
    wait_until(
        WAIT,
        &format!("a {reason} Event with {needle:?}"),
        || async {
            events(client, ns).await.into_iter().find(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.note.as_deref().is_some_and(|n| n.contains(needle))
            })
        },
    )
    .await
}

/// What provisioning writes, as the catalogs show it.
async fn catalog(database: &str) -> Vec<String> {
    let mut conn = admin_connection("postgres").await;
    let mut rows: Vec<String> = sqlx::query_scalar(
        "SELECT format('role %s super=%s createdb=%s createrole=%s comment=%s', rolname, rolsuper,
                       rolcreatedb, rolcreaterole, shobj_description(oid, 'pg_authid'))
           FROM pg_roles WHERE rolname = $1
         UNION ALL
         SELECT format('database %s owner=%s acl=%s comment=%s', datname, pg_get_userbyid(datdba),
                       datacl, shobj_description(oid, 'pg_database'))
           FROM pg_database WHERE datname = $1",
    )
    .bind(database)
    .fetch_all(&mut conn)
    .await
    .expect("catalog");
    let mut conn = admin_connection(database).await;
    let more: Vec<String> = sqlx::query_scalar(
        "SELECT format('schema %s owner=%s', nspname, pg_get_userbyid(nspowner))
           FROM pg_namespace WHERE nspname NOT LIKE 'pg_%' AND nspname <> 'information_schema'
         UNION ALL
         SELECT format('migration %s %s', version, encode(checksum, 'hex'))
           FROM integration_operator._sqlx_migrations
         UNION ALL
         SELECT format('table %s.%s', schemaname, tablename)
           FROM pg_tables WHERE schemaname = 'integration_operator'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("catalog of the cluster database");
    rows.extend(more);
    rows.sort();
    rows
}

#[tokio::test]
async fn provisioning_creates_an_isolated_database_and_a_second_run_changes_nothing() {
    let b = bed("db-provision").await;
    create_yaml(&b.client, &b.ns, &cluster("alpha", "db-admin", 2, ""))
        .await
        .expect("alpha");
    create_yaml(&b.client, &b.ns, &cluster("beta", "db-admin", 1, ""))
        .await
        .expect("beta");
    let status = provisioned(&b.api, "alpha").await;
    let db = status.database.clone().expect("database status");
    let role = integration_operator::naming::database_role(&b.ns, "alpha");
    assert_eq!(db.schema_version, Some(database::latest_migration()));
    assert_eq!(db.database.as_deref(), Some(role.as_str()));
    assert_eq!(db.host, Some(postgres_address()));
    assert_eq!(
        db.credentials_secret.as_deref(),
        Some("alpha-database-credentials")
    );
    event_with(&b.client, &b.ns, "DatabaseProvisioned", "created database").await;
    provisioned(&b.api, "beta").await;

    // The role uses its own database: schemas per component and the tables.
    let (endpoint, login) = credentials(&b.client, &b.ns, "alpha").await;
    assert_eq!(login.username, role);
    let mut conn = role_connection(&endpoint, &login, &endpoint.database)
        .await
        .expect("alpha's role connects to its database");
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname IN ('orders', 'audit', 'integration_operator') ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .expect("schemas");
    assert_eq!(schemas, ["audit", "integration_operator", "orders"]);
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM integration_operator.gd_work")
        .fetch_one(&mut conn)
        .await
        .expect("the role reads its tables");
    assert_eq!(pending, 0);
    sqlx::query("CREATE TABLE orders.t (id int)")
        .execute(&mut conn)
        .await
        .expect("the role creates tables in its component schemas");

    // Another cluster's role is refused at the door.
    let (beta_endpoint, beta_login) = credentials(&b.client, &b.ns, "beta").await;
    let refused = role_connection(&beta_endpoint, &beta_login, &endpoint.database).await;
    let Err(sqlx::Error::Database(e)) = refused else {
        panic!("beta's role must not connect to alpha's database: {refused:?}");
    };
    assert_eq!(e.code().as_deref(), Some("42501"), "{e}");

    // Both carry the cluster's ownership marker.
    let uid = b.api.get("alpha").await.expect("alpha").uid().expect("uid");
    let marker = format!("integration-operator:{}/alpha:{uid}", b.ns);
    let before = catalog(&endpoint.database).await;
    for kind in ["role", "database"] {
        assert!(
            before
                .iter()
                .any(|row| row.starts_with(&format!("{kind} {role} "))
                    && row.ends_with(&format!("comment={marker}"))),
            "{kind} {role} is marked: {before:?}"
        );
    }

    // Provisioning again with the same inputs changes nothing.
    let admin = Admin::from_url(&postgres_admin_url()).expect("admin URL");
    let owner = database::Owner {
        namespace: b.ns.clone(),
        cluster: "alpha".into(),
        uid,
    };
    let again = database::provision(
        &admin,
        &endpoint,
        &login,
        &["Orders".into(), "Audit".into()],
        &owner,
    )
    .await
    .expect("second provisioning");
    assert!(again.changes.is_empty(), "{:?}", again.changes);
    assert_eq!(again.schema_version, Some(database::latest_migration()));
    assert_eq!(catalog(&endpoint.database).await, before);

    // The servers get where the database is, and the credentials by Secret.
    let cms: Api<ConfigMap> = Api::namespaced(b.client.clone(), &b.ns);
    let cm = cms.get("alpha-config").await.expect("config map");
    let properties = cm
        .data
        .unwrap_or_default()
        .remove("server.properties")
        .unwrap_or_default();
    assert!(
        properties.contains("database.host=127.0.0.1\n"),
        "{properties}"
    );
    assert!(
        properties.contains(&format!("database.name={role}\n")),
        "{properties}"
    );
    assert!(!properties.contains(&login.password));
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
    let pod = pods.get("alpha-0").await.expect("pod");
    let env = pod.spec.expect("spec").containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let password = env
        .iter()
        .find(|e| e.name == "DB_PASSWORD")
        .expect("DB_PASSWORD");
    assert!(password.value.is_none());
    let from = password
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("from a Secret");
    assert_eq!(from.name, "alpha-database-credentials");
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn bad_admin_settings_give_a_clear_condition_without_the_secret() {
    let b = bed("db-bad").await;
    let good = postgres_admin_url();
    let real_password = good
        .split_once("://postgres:")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(p, _)| p.to_owned())
        .expect("password in URL");
    let wrong_password = "Wr0ngPassw0rd-4e1f9c";
    let wrong = good.replace(&real_password, wrong_password);
    database_admin_secret(&b.client, &b.ns, "wrong", &wrong).await;
    database_admin_secret(
        &b.client,
        &b.ns,
        "closed",
        &format!("postgres://postgres:{wrong_password}@127.0.0.1:1/postgres"),
    )
    .await;
    database_admin_secret(
        &b.client,
        &b.ns,
        "garbage",
        &format!("host=db password={wrong_password}"),
    )
    .await;
    // An admin that may log in but not create roles or databases.
    let weak = format!("weak_{}", b.ns.replace('-', "_"));
    let mut conn = admin_connection("postgres").await;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE ROLE {weak} LOGIN PASSWORD '{wrong_password}'"
    )))
    .execute(&mut conn)
    .await
    .expect("weak role");
    let pg = postgres_address();
    let weak_url = format!("postgres://{weak}:{wrong_password}@{pg}/postgres");
    database_admin_secret(&b.client, &b.ns, "weak", &weak_url).await;
    for (name, secret) in [
        ("gamma", "wrong"),
        ("delta", "closed"),
        ("epsilon", "garbage"),
        ("zeta", "weak"),
    ] {
        create_yaml(&b.client, &b.ns, &cluster(name, secret, 1, ""))
            .await
            .expect("create");
    }
    for (name, reason, needle) in [
        (
            "gamma",
            "DatabaseAuthenticationFailed",
            format!("database {pg}: authentication failed"),
        ),
        (
            "delta",
            "DatabaseUnreachable",
            "database 127.0.0.1:1: server unreachable".to_owned(),
        ),
        (
            "epsilon",
            "DatabaseAdminSecretInvalid",
            "key url of Secret garbage: the value is not a postgres:// URL".to_owned(),
        ),
        (
            "zeta",
            "DatabasePermissionDenied",
            format!("database {pg}: permission denied: permission denied to create role"),
        ),
    ] {
        let status = status_when(&b.api, name, reason, |s| {
            condition(s, "Degraded").is_some_and(|c| c.status == "True" && c.reason == reason)
        })
        .await;
        let degraded = condition(&status, "Degraded").expect("Degraded");
        assert!(
            degraded.message.contains(&needle),
            "{name}: {}",
            degraded.message
        );
        assert!(!status.database.as_ref().is_some_and(|d| d.ready));
        event_with(&b.client, &b.ns, reason, &needle).await;
    }
    // An admin URL in a Secret gives the host; the servers start on it while
    // provisioning is retried.
    status_when(&b.api, "gamma", "the node running", |s| {
        s.nodes.iter().any(|n| n.ready)
    })
    .await;

    // No password anywhere a person looks: status, Events, the operator's log.
    let everything = format!(
        "{:?}{:?}",
        b.api
            .list(&ListParams::default())
            .await
            .expect("list")
            .items,
        events(&b.client, &b.ns).await
    );
    let log = std::fs::read_to_string(
        state_dir()
            .join("logs")
            .join(format!("operator-{}.log", b.ns)),
    )
    .expect("operator log");
    for secret in [wrong_password, real_password.as_str()] {
        assert!(
            !everything.contains(secret),
            "a password leaked into status or Events"
        );
        assert!(
            !log.contains(secret),
            "a password leaked into the operator's log"
        );
    }

    // Fixing the Secret heals the cluster without restarting its servers.
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
    let uid_before = pods.get("gamma-0").await.expect("pod").metadata.uid;
    let secrets: Api<Secret> = Api::namespaced(b.client.clone(), &b.ns);
    secrets
        .patch(
            "wrong",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"url": good}})),
        )
        .await
        .expect("fix the admin Secret");
    let healed = provisioned(&b.api, "gamma").await;
    assert_eq!(
        condition(&healed, "Degraded").map(|c| c.status.as_str()),
        Some("False")
    );
    assert_eq!(
        pods.get("gamma-0").await.expect("pod").metadata.uid,
        uid_before
    );
    delete_namespace(&b.client, &b.ns).await;
}

async fn database_exists(name: &str) -> (bool, bool) {
    let mut conn = admin_connection("postgres").await;
    let database: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .expect("query");
    let role: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .expect("query");
    (database, role)
}

#[tokio::test]
async fn retain_keeps_the_database_and_delete_drops_it() {
    let b = bed("db-delete").await;
    create_yaml(&b.client, &b.ns, &cluster("keep", "db-admin", 1, ""))
        .await
        .expect("keep");
    create_yaml(
        &b.client,
        &b.ns,
        &cluster("drop", "db-admin", 1, "  deletionPolicy: Delete\n"),
    )
    .await
    .expect("drop");
    let keep = provisioned(&b.api, "keep")
        .await
        .database
        .and_then(|d| d.database)
        .expect("name");
    let drop = provisioned(&b.api, "drop")
        .await
        .database
        .and_then(|d| d.database)
        .expect("name");
    assert_eq!(database_exists(&drop).await, (true, true));
    for name in ["keep", "drop"] {
        b.api
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    for name in ["keep", "drop"] {
        gone(&b.api, name, WAIT).await;
    }
    assert_eq!(
        database_exists(&keep).await,
        (true, true),
        "Retain keeps database and role"
    );
    assert_eq!(
        database_exists(&drop).await,
        (false, false),
        "Delete drops database and role"
    );
    event_with(
        &b.client,
        &b.ns,
        "DatabaseRetained",
        &format!("kept database {keep}"),
    )
    .await;
    event_with(
        &b.client,
        &b.ns,
        "DatabaseDropped",
        &format!("dropped database {drop} and role {drop}"),
    )
    .await;
    // The kept database stays reachable: its credentials outlive the cluster.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let secrets: Api<Secret> = Api::namespaced(b.client.clone(), &b.ns);
    let kept = secrets
        .get("keep-database-credentials")
        .await
        .expect("credentials kept");
    assert!(kept.owner_references().is_empty());
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_database_newer_than_the_operator_is_reported_and_never_downgraded() {
    let b = bed("db-newer").await;
    create_yaml(&b.client, &b.ns, &cluster("future", "db-admin", 1, ""))
        .await
        .expect("create");
    let name = provisioned(&b.api, "future")
        .await
        .database
        .and_then(|d| d.database)
        .expect("name");
    let mut conn = admin_connection(&name).await;
    sqlx::query(
        "INSERT INTO integration_operator._sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from a newer operator', true, '\\x00', 0)",
    )
    .execute(&mut conn)
    .await
    .expect("a newer operator's migration");
    // A spec change makes the operator provision again at once.
    b.api
        .patch(
            "future",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"database": {"components": ["Orders", "Audit", "Extra"]}}}),
            ),
        )
        .await
        .expect("patch");
    let status = status_when(&b.api, "future", "DatabaseNewerThanOperator", |s| {
        condition(s, "Degraded").is_some_and(|c| c.reason == "DatabaseNewerThanOperator")
    })
    .await;
    let message = &condition(&status, "Degraded").expect("Degraded").message;
    assert!(message.contains("migration 9999 is applied"), "{message}");
    let versions: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(
        "SELECT version FROM integration_operator._sqlx_migrations ORDER BY version".to_owned(),
    ))
    .fetch_all(&mut conn)
    .await
    .expect("versions");
    let expected: Vec<i64> = (1..=database::latest_migration()).chain([9999]).collect();
    assert_eq!(versions, expected, "nothing was rolled back");
    delete_namespace(&b.client, &b.ns).await;
}

async fn role_pool(client: &Client, ns: &str, cluster: &str) -> sqlx::PgPool {
    let (endpoint, login) = credentials(client, ns, cluster).await;
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(database::role_options(&endpoint, &login))
        .await
        .expect("pool")
}

async fn own(pool: &sqlx::PgPool, node: &str, ids: &[String]) {
    sqlx::query(
        "INSERT INTO integration_operator.gd_work (transaction_id, owner_node, state, locked_at)
         SELECT id, $1, 'running', now() FROM unnest($2::text[]) AS id",
    )
    .bind(node)
    .bind(ids)
    .execute(pool)
    .await
    .expect("insert work");
}

fn node_status<'a>(
    status: &'a IntegrationClusterStatus,
    node: &str,
) -> Option<&'a integration_operator::api::NodeStatus> {
    status.nodes.iter().find(|n| n.name == node)
}

#[tokio::test]
async fn removal_waits_until_the_node_owns_no_guaranteed_delivery_work() {
    let b = bed("db-gd").await;
    create_yaml(&b.client, &b.ns, &cluster("gd", "db-admin", 3, ""))
        .await
        .expect("create");
    provisioned(&b.api, "gd").await;
    let pool = role_pool(&b.client, &b.ns, "gd").await;
    let ids: Vec<String> = (0..3).map(|i| format!("tx-{i}")).collect();
    own(&pool, "gd-2", &ids).await;

    b.api
        .patch(
            "gd",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": {"remove": ["gd-2"]}}})),
        )
        .await
        .expect("remove gd-2");
    status_when(&b.api, "gd", "gd-2 waiting for its work", |s| {
        node_status(s, "gd-2").is_some_and(|n| {
            n.message
                .as_deref()
                .is_some_and(|m| m.contains("3 unfinished guaranteed-delivery transactions"))
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
    assert!(
        pods.get_opt("gd-2").await.expect("get").is_some(),
        "the pod must stay while it owns work"
    );

    sqlx::query(
        "UPDATE integration_operator.gd_work SET state = 'done' WHERE transaction_id = ANY($1)",
    )
    .bind(&ids[..2])
    .execute(&pool)
    .await
    .expect("two done");
    status_when(&b.api, "gd", "one transaction left", |s| {
        node_status(s, "gd-2").is_some_and(|n| {
            n.message
                .as_deref()
                .is_some_and(|m| m.contains("1 unfinished guaranteed-delivery"))
        })
    })
    .await;
    sqlx::query("UPDATE integration_operator.gd_work SET state = 'done'")
        .execute(&pool)
        .await
        .expect("all done");
    status_when(&b.api, "gd", "gd-2 removed", |s| {
        node_status(s, "gd-2").is_some_and(|n| n.state == NodeState::Removed)
    })
    .await;
    assert!(
        pods.get_opt("gd-2")
            .await
            .expect("get")
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
    );
    // The member list in the database follows status (it is written after
    // the reconcile's actions, so a moment after status).
    wait_until(WAIT, "the member row of gd-2 says Removed", || async {
        let state: String = sqlx::query_scalar(
            "SELECT state FROM integration_operator.cluster_members WHERE node = 'gd-2'",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (state == "Removed").then_some(())
    })
    .await;
    delete_namespace(&b.client, &b.ns).await;
}

async fn owners(pool: &sqlx::PgPool, ids: &[String]) -> Vec<Option<String>> {
    sqlx::query_scalar("SELECT owner_node FROM integration_operator.gd_work WHERE transaction_id = ANY($1) ORDER BY transaction_id")
        .bind(ids)
        .fetch_all(pool)
        .await
        .expect("owners")
}

#[tokio::test]
async fn locks_of_a_gone_node_are_broken_after_lock_break_seconds_and_taken_over_once() {
    let b = bed("db-locks").await;
    create_yaml(
        &b.client,
        &b.ns,
        &cluster("lb", "db-admin", 2, "    lockBreakSeconds: 4\n"),
    )
    .await
    .expect("create");
    provisioned(&b.api, "lb").await;
    let pool = role_pool(&b.client, &b.ns, "lb").await;
    // lb-7 is gone (no pod); lb-0 is alive.
    let orphaned: Vec<String> = (0..10).map(|i| format!("gone-{i:02}")).collect();
    let alive: Vec<String> = (0..2).map(|i| format!("alive-{i}")).collect();
    let started = Instant::now();
    own(&pool, "lb-7", &orphaned).await;
    own(&pool, "lb-0", &alive).await;
    // Any reconcile looks at the locks; make one happen now.
    b.api
        .patch(
            "lb",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
        )
        .await
        .expect("poke");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        owners(&pool, &orphaned)
            .await
            .iter()
            .all(|o| o.as_deref() == Some("lb-7")),
        "locks held before lockBreakSeconds"
    );
    wait_until(WAIT, "lb-7's locks broken", || async {
        owners(&pool, &orphaned)
            .await
            .iter()
            .all(Option::is_none)
            .then_some(())
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "broken too early: {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "broken too late: {:?}",
        started.elapsed()
    );
    assert!(
        owners(&pool, &alive)
            .await
            .iter()
            .all(|o| o.as_deref() == Some("lb-0"))
    );
    event_with(
        &b.client,
        &b.ns,
        "LocksBroken",
        "released 10 guaranteed-delivery transactions of lb-7",
    )
    .await;

    // Two nodes take the released work over concurrently: each transaction
    // goes to exactly one of them.
    let takers = ["lb-0", "lb-1"].map(|node| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut taken = Vec::new();
            loop {
                let batch = database::gd::take_over(&pool, node, 2)
                    .await
                    .expect("take over");
                if batch.is_empty() {
                    return taken;
                }
                taken.extend(batch.into_iter().map(|id| (id, node)));
            }
        })
    });
    let mut all = Vec::new();
    for taker in takers {
        all.extend(taker.await.expect("taker"));
    }
    let ids: BTreeSet<&String> = all.iter().map(|(id, _)| id).collect();
    assert_eq!(all.len(), 10, "each transaction taken once: {all:?}");
    assert_eq!(ids, orphaned.iter().collect::<BTreeSet<_>>());
    for (id, node) in &all {
        let owner = owners(&pool, std::slice::from_ref(id)).await;
        assert_eq!(owner, [Some((*node).to_owned())]);
    }
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_forced_removal_releases_the_nodes_locks_at_once() {
    let b = bed("db-force").await;
    let extra = "    lockBreakSeconds: 3600\n  nodes: {drainTimeoutSeconds: 1}\n";
    create_yaml(&b.client, &b.ns, &cluster("fz", "db-admin", 2, extra))
        .await
        .expect("create");
    provisioned(&b.api, "fz").await;
    let pool = role_pool(&b.client, &b.ns, "fz").await;
    let ids: Vec<String> = (0..4).map(|i| format!("held-{i}")).collect();
    own(&pool, "fz-1", &ids).await;
    b.api
        .patch(
            "fz",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": {"remove": ["fz-1"]}}})),
        )
        .await
        .expect("remove");
    let stalled = status_when(&b.api, "fz", "Stalled on the work", |s| {
        condition(s, "Stalled").is_some_and(|c| c.status == "True")
    })
    .await;
    let why = &condition(&stalled, "Stalled").expect("Stalled").message;
    assert!(
        why.contains("4 unfinished guaranteed-delivery transactions"),
        "{why}"
    );
    b.api
        .patch(
            "fz",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"integration.dev/force": "fz-1"}}})),
        )
        .await
        .expect("force");
    status_when(&b.api, "fz", "fz-1 removed", |s| {
        node_status(s, "fz-1").is_some_and(|n| n.state == NodeState::Removed)
    })
    .await;
    wait_until(Duration::from_secs(20), "fz-1's locks released", || async {
        owners(&pool, &ids)
            .await
            .iter()
            .all(Option::is_none)
            .then_some(())
    })
    .await;
    event_with(
        &b.client,
        &b.ns,
        "LocksBroken",
        "removed with the force annotation",
    )
    .await;
    delete_namespace(&b.client, &b.ns).await;
}

fn managed(name: &str, cache_servers: i32) -> String {
    format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: {name}}}\n\
         spec:\n  profile: webmethods-is\n  mode: stateful\n  image: registry.example.com/msr:10.15\n  replicas: 2\n  \
         cache:\n    mode: managed\n    managed:\n      replicas: {cache_servers}\n      \
         image: registry.example.com/bigmemorymax-server:4.5.0\n      \
         licenseSecretRef: {{name: tc-license, key: license.key}}\n  \
         database:\n    mode: managed\n    components: [ISInternal]\n"
    )
}

#[tokio::test]
async fn managed_cache_and_database_get_their_servers_and_stateless_gets_none() {
    let b = bed("db-managed").await;
    for (name, servers) in [("one", 1), ("three", 3)] {
        create_yaml(&b.client, &b.ns, &managed(name, servers))
            .await
            .expect("create");
    }
    let stateless = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: plain}\n\
                     spec: {profile: webmethods-is, mode: stateless, image: is, replicas: 1}\n";
    create_yaml(&b.client, &b.ns, stateless)
        .await
        .expect("stateless");
    let sets: Api<StatefulSet> = Api::namespaced(b.client.clone(), &b.ns);
    let cms: Api<ConfigMap> = Api::namespaced(b.client.clone(), &b.ns);
    let services: Api<Service> = Api::namespaced(b.client.clone(), &b.ns);
    for (name, servers) in [("one", 1), ("three", 3)] {
        // The cache comes up first; the servers start once it is ready.
        let status = status_when(&b.api, name, "cache ready and nodes running", |s| {
            s.cache
                .as_ref()
                .is_some_and(|c| c.ready_servers == Some(servers))
                && s.nodes.iter().all(|n| n.ready)
                && s.nodes.len() == 2
        })
        .await;
        let cache = status.cache.expect("cache status");
        assert!(cache.ready);
        assert_eq!(
            cache.urls.len(),
            usize::try_from(servers).unwrap_or_default()
        );
        assert_eq!(
            cache.urls[0],
            format!("{name}-cache-0.{name}-cache.{}.svc:9510", b.ns)
        );
        let set = sets
            .get(&format!("{name}-cache"))
            .await
            .expect("cache StatefulSet");
        assert_eq!(set.spec.as_ref().and_then(|s| s.replicas), Some(servers));
        let tc = cms
            .get(&format!("{name}-cache-config"))
            .await
            .expect("tc-config");
        let xml = tc
            .data
            .unwrap_or_default()
            .remove("tc-config.xml")
            .unwrap_or_default();
        assert_eq!(
            xml.matches("<server host=").count(),
            usize::try_from(servers).unwrap_or_default(),
            "{xml}"
        );
        let headless = services
            .get(&format!("{name}-cache"))
            .await
            .expect("cache Service");
        assert_eq!(
            headless.spec.and_then(|s| s.cluster_ip).as_deref(),
            Some("None")
        );

        // The managed PostgreSQL: objects in place; the test bed cannot run
        // it (kwok pods are simulated), so the operator reports where it
        // failed to connect, by name.
        sets.get(&format!("{name}-database"))
            .await
            .expect("database StatefulSet");
        services
            .get(&format!("{name}-database"))
            .await
            .expect("database Service");
        let secrets: Api<Secret> = Api::namespaced(b.client.clone(), &b.ns);
        let admin = secrets
            .get(&format!("{name}-database-admin"))
            .await
            .expect("admin Secret");
        assert_eq!(secret_text(&admin, "password").len(), 32);
        let host = format!("{name}-database.{}.svc:5432", b.ns);
        let status = status_when(&b.api, name, "database unreachable", |s| {
            condition(s, "Degraded").is_some_and(|c| c.reason == "DatabaseUnreachable")
        })
        .await;
        assert!(
            condition(&status, "Degraded")
                .expect("Degraded")
                .message
                .contains(&host)
        );
        assert_eq!(
            status.database.and_then(|d| d.host).as_deref(),
            Some(host.as_str())
        );
    }
    status_when(&b.api, "plain", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    let plain = sets
        .list(&ListParams::default().labels("integration.dev/cluster=plain"))
        .await
        .expect("list");
    assert!(
        plain.items.is_empty(),
        "a stateless cluster without a database runs no StatefulSet"
    );
    delete_namespace(&b.client, &b.ns).await;
}

// ---------------------------------------------------------------------------
// Tenant isolation: names that used to collide, objects the operator did not
// create.

/// The namespaces `<x>-b` and `<x>`, each with its own operator and admin
/// Secret: cluster `c` in the first and `b-c` in the second are the pair
/// whose database names used to collide (`ic_<x>_b_c`).
#[tokio::test]
async fn clusters_whose_names_used_to_collide_get_databases_of_their_own() {
    let client = admin().await;
    let short = namespace(&client, "dbcol").await;
    let long = format!("{short}-b");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": long}})).expect("namespace"),
        )
        .await
        .expect("create namespace");
    let _operators = [Operator::start(&short), Operator::start(&long)];
    for ns in [&short, &long] {
        database_admin_secret(&client, ns, "db-admin", &postgres_admin_url()).await;
    }
    create_yaml(&client, &long, &cluster("c", "db-admin", 1, ""))
        .await
        .expect("c");
    let first_api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &long);
    provisioned(&first_api, "c").await;
    // The second cluster comes once the first is provisioned, as a tenant
    // creating it later would.
    create_yaml(&client, &short, &cluster("b-c", "db-admin", 1, ""))
        .await
        .expect("b-c");
    let second_api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &short);
    let second = provisioned(&second_api, "b-c").await;
    let first = provisioned(&first_api, "c").await;
    let first_db = first.database.and_then(|d| d.database).expect("name");
    let second_db = second.database.and_then(|d| d.database).expect("name");
    assert_ne!(
        first_db, second_db,
        "{long}/c and {short}/b-c share a database"
    );

    // Both keep working, each in its own database.
    for (ns, name, table) in [(&long, "c", "first"), (&short, "b-c", "second")] {
        let (endpoint, login) = credentials(&client, ns, name).await;
        let mut conn = role_connection(&endpoint, &login, &endpoint.database)
            .await
            .unwrap_or_else(|e| panic!("{ns}/{name}'s credentials open its database: {e}"));
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE orders.{table} (id int)"
        )))
        .execute(&mut conn)
        .await
        .expect("create a table");
    }
    let mut conn = admin_connection(&first_db).await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'orders' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .expect("tables");
    assert_eq!(tables, ["first"]);
    delete_namespace(&client, &short).await;
    delete_namespace(&client, &long).await;
}

/// A connection as the squatter's own role.
async fn squatter_connection(name: &str, password: &str) -> Result<PgConnection, sqlx::Error> {
    let options: PgConnectOptions =
        format!("postgres://{name}:{password}@{}/{name}", postgres_address())
            .parse()
            .expect("squatter URL");
    PgConnection::connect_with(&options).await
}

/// A role and database with the name the operator would choose, made by
/// someone else (no ownership marker), with data in it.
async fn squat(name: &str, password: &str) {
    let mut conn = admin_connection("postgres").await;
    for sql in [
        format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"),
        format!("CREATE DATABASE {name} OWNER {name}"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .expect("squat");
    }
    let mut conn = squatter_connection(name, password)
        .await
        .expect("the squatter logs in");
    sqlx::raw_sql("CREATE TABLE precious (v text); INSERT INTO precious VALUES ('mine')")
        .execute(&mut conn)
        .await
        .expect("data");
}

/// What the squatter still has: its password opens the database and the
/// data is there; no marker was added.
async fn squatter_intact(name: &str, password: &str) {
    let mut conn = squatter_connection(name, password)
        .await
        .unwrap_or_else(|e| panic!("the squatter's password no longer opens {name}: {e}"));
    let data: Vec<String> = sqlx::query_scalar("SELECT v FROM precious")
        .fetch_all(&mut conn)
        .await
        .expect("the squatter's data");
    assert_eq!(data, ["mine"]);
    assert_eq!(
        markers(name).await,
        (None, None),
        "the operator marked {name}"
    );
}

#[tokio::test]
async fn a_database_the_operator_did_not_create_is_never_altered_or_dropped() {
    let b = bed("db-squat").await;
    let name = integration_operator::naming::database_role(&b.ns, "squat");
    let password = "Squatters-0wn-Passw0rd";
    squat(&name, password).await;
    create_yaml(
        &b.client,
        &b.ns,
        &cluster("squat", "db-admin", 1, "  deletionPolicy: Delete\n"),
    )
    .await
    .expect("create");
    // Whatever the operator decides, it has decided once status names the
    // database and says whether it is ready or degraded.
    let status = status_when(&b.api, "squat", "a database verdict", |s| {
        s.database.as_ref().is_some_and(|d| d.ready)
            || condition(s, "Degraded").is_some_and(|c| c.status == "True")
    })
    .await;
    squatter_intact(&name, password).await;
    let degraded = condition(&status, "Degraded").expect("Degraded");
    assert_eq!(degraded.reason, "DatabaseNotOwned", "{}", degraded.message);
    assert!(
        degraded.message.contains(&name),
        "the message names the database: {}",
        degraded.message
    );
    assert!(!status.database.as_ref().is_some_and(|d| d.ready));
    event_with(&b.client, &b.ns, "DatabaseNotOwned", &name).await;

    // deletionPolicy Delete drops only what the cluster owns: nothing here.
    delete_until_gone(&b.api, "squat", &DeleteParams::default(), WAIT).await;
    assert_eq!(database_exists(&name).await, (true, true));
    squatter_intact(&name, password).await;
    let left = events(&b.client, &b.ns)
        .await
        .into_iter()
        .find(|e| {
            e.note
                .as_deref()
                .is_some_and(|n| n.contains("deletionPolicy Delete") && n.contains(&name))
        })
        .expect("an Event saying what deletion left alone");
    assert!(
        left.note
            .as_deref()
            .is_some_and(|n| n.contains("not created")),
        "{:?}",
        left.note
    );
    delete_namespace(&b.client, &b.ns).await;
    let mut conn = admin_connection("postgres").await;
    for sql in [
        format!("DROP DATABASE {name} WITH (FORCE)"),
        format!("DROP ROLE {name}"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .expect("clean up the squatter");
    }
}

async fn markers(name: &str) -> (Option<String>, Option<String>) {
    let mut conn = admin_connection("postgres").await;
    sqlx::query_as(
        "SELECT (SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1),
                (SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1)",
    )
    .bind(name)
    .fetch_one(&mut conn)
    .await
    .expect("comments")
}

/// A cluster provisioned by an operator before ownership markers (name of
/// the first scheme, no marker), and a cluster deleted with Retain and
/// created again: both get their own database back, data and all, because
/// their credentials Secret opens it.
#[tokio::test]
async fn a_cluster_keeps_the_database_it_already_has() {
    let b = bed("db-keep").await;
    // As the earlier operator left it: role, database, credentials Secret.
    let legacy = format!("ic_{}_legacy", b.ns.replace('-', "_"));
    let password = "0ld-0perator-Passw0rd";
    squat(&legacy, password).await;
    let secrets: Api<Secret> = Api::namespaced(b.client.clone(), &b.ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "legacy-database-credentials"},
        "stringData": {"username": legacy, "password": password, "database": legacy,
                       "host": "127.0.0.1", "port": postgres_address().rsplit_once(':').map(|p| p.1)},
    }))
    .expect("secret");
    secrets
        .create(&Default::default(), &secret)
        .await
        .expect("credentials Secret");
    create_yaml(&b.client, &b.ns, &cluster("legacy", "db-admin", 1, ""))
        .await
        .expect("legacy");
    let status = provisioned(&b.api, "legacy").await;
    assert_eq!(
        status.database.and_then(|d| d.database).as_deref(),
        Some(legacy.as_str())
    );
    let uid = b
        .api
        .get("legacy")
        .await
        .expect("legacy")
        .uid()
        .expect("uid");
    let marker = format!("integration-operator:{}/legacy:{uid}", b.ns);
    assert_eq!(markers(&legacy).await, (Some(marker.clone()), Some(marker)));
    let mut conn = squatter_connection(&legacy, password)
        .await
        .expect("the password is unchanged");
    let data: Vec<String> = sqlx::query_scalar("SELECT v FROM precious")
        .fetch_all(&mut conn)
        .await
        .expect("the data is there");
    assert_eq!(data, ["mine"]);

    // Retain, then the same cluster again: same database, marked anew.
    create_yaml(&b.client, &b.ns, &cluster("again", "db-admin", 1, ""))
        .await
        .expect("again");
    let first = provisioned(&b.api, "again").await;
    let name = first.database.and_then(|d| d.database).expect("name");
    delete_until_gone(&b.api, "again", &DeleteParams::default(), WAIT).await;
    create_yaml(&b.client, &b.ns, &cluster("again", "db-admin", 1, ""))
        .await
        .expect("again, again");
    let second = provisioned(&b.api, "again").await;
    assert_eq!(second.database.and_then(|d| d.database), Some(name.clone()));
    let uid = b.api.get("again").await.expect("again").uid().expect("uid");
    let marker = format!("integration-operator:{}/again:{uid}", b.ns);
    assert_eq!(markers(&name).await, (Some(marker.clone()), Some(marker)));
    delete_namespace(&b.client, &b.ns).await;
}

/// The operator's sessions carry statement_timeout and lock_timeout, and a
/// passed deadline says which one it was.
#[tokio::test]
async fn operator_sessions_are_bounded_by_statement_and_lock_timeouts() {
    let limits = database::Limits {
        statement: Duration::from_secs(2),
        lock: Duration::from_secs(1),
        query: Duration::from_secs(4),
        ..Default::default()
    };
    let admin = Admin::from_url(&postgres_admin_url())
        .expect("admin URL")
        .with_limits(limits);
    let url = postgres_admin_url();
    let options: PgConnectOptions = url.parse().expect("admin URL");
    let (host, port) = postgres_address()
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.parse().expect("port")))
        .expect("address");
    let endpoint = Endpoint {
        host,
        port,
        database: "postgres".into(),
    };
    let login = Login {
        username: options.get_username().to_owned(),
        password: url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(auth, _)| auth.split_once(':'))
            .map(|(_, p)| p.to_owned())
            .expect("password"),
    };
    let pool = database::RolePool::new(&admin, &endpoint, &login).expect("pool");
    let settings: (String, String) = pool
        .bounded(
            "reading settings",
            sqlx::query_as(
                "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')",
            )
            .fetch_one(pool.pool()),
        )
        .await
        .expect("settings");
    assert_eq!(settings, ("2s".to_owned(), "1s".to_owned()));

    let slow = pool
        .bounded(
            "sleeping",
            sqlx::query("SELECT pg_sleep(3)").execute(pool.pool()),
        )
        .await
        .expect_err("statement_timeout cancels it");
    assert_eq!(
        slow.class,
        database::ErrorClass::DeadlineExceeded(database::Deadline::Statement),
        "{slow}"
    );
    assert!(
        slow.to_string().contains("statement_timeout passed"),
        "{slow}"
    );

    let table = format!("lock_probe_{}", std::process::id());
    let mut holder = admin_connection("postgres").await;
    sqlx::query(AssertSqlSafe(format!("CREATE TABLE {table} (id int)")))
        .execute(&mut holder)
        .await
        .expect("table");
    sqlx::raw_sql(AssertSqlSafe(format!("BEGIN; LOCK TABLE {table}")))
        .execute(&mut holder)
        .await
        .expect("hold the lock");
    let blocked = pool
        .bounded(
            "locking",
            sqlx::query(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .execute(pool.pool()),
        )
        .await
        .expect_err("lock_timeout gives up");
    assert_eq!(
        blocked.class,
        database::ErrorClass::DeadlineExceeded(database::Deadline::Lock),
        "{blocked}"
    );
    sqlx::raw_sql(AssertSqlSafe(format!("ROLLBACK; DROP TABLE {table}")))
        .execute(&mut holder)
        .await
        .expect("release");
}

// ---------------------------------------------------------------------------
// Hostile database endpoints: fake PostgreSQL servers on loopback.

/// How a fake server treats a connection.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// Accepts and never sends a byte.
    Silent,
    /// Answers the startup with a message header announcing 1 GiB, then
    /// sends `send` bytes of it as fast as it can and waits.
    Huge { tls: bool, send: usize },
    /// Completes the startup, then never answers a query.
    MuteAfterStartup,
}

const ANNOUNCED: u32 = 1 << 30;

struct FakePostgres {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakePostgres {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePostgres {
    async fn start(kind: Hostile) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                sessions.spawn(hostile_session(socket, kind));
            }
        });
        FakePostgres {
            port,
            accepted,
            task,
        }
    }

    /// An admin URL that leads the operator here.
    fn url(&self, sslmode: &str) -> String {
        format!(
            "postgres://postgres:not-a-secret@127.0.0.1:{}/postgres?sslmode={sslmode}",
            self.port
        )
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata");
    let certs = CertificateDer::pem_file_iter(dir.join("hostile-postgres.crt"))
        .expect("certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_file(dir.join("hostile-postgres.key")).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

async fn hostile_session(mut socket: tokio::net::TcpStream, kind: Hostile) {
    use tokio::io::AsyncReadExt;
    if matches!(kind, Hostile::Silent) {
        drain(socket).await;
        return;
    }
    // SSLRequest first (when the client asks for TLS), then the startup.
    loop {
        let Ok(length) = socket.read_u32().await else {
            return;
        };
        let mut body = vec![0u8; length.saturating_sub(4) as usize];
        if socket.read_exact(&mut body).await.is_err() {
            return;
        }
        if length != 8 || body != [0x04, 0xd2, 0x16, 0x2f] {
            break;
        }
        let tls = matches!(kind, Hostile::Huge { tls: true, .. });
        if write(&mut socket, if tls { b"S" } else { b"N" })
            .await
            .is_err()
        {
            return;
        }
        if tls {
            let Ok(mut stream) = tls_acceptor().accept(socket).await else {
                return;
            };
            // The startup message, now inside TLS.
            let Ok(length) = stream.read_u32().await else {
                return;
            };
            let mut body = vec![0u8; length.saturating_sub(4) as usize];
            if stream.read_exact(&mut body).await.is_err() {
                return;
            }
            answer(stream, kind).await;
            return;
        }
    }
    answer(socket, kind).await;
}

async fn write(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    bytes: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads and discards until the client goes away.
async fn drain(mut stream: impl tokio::io::AsyncRead + Unpin) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

async fn answer(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    kind: Hostile,
) {
    match kind {
        Hostile::Silent => {}
        Hostile::Huge { send, .. } => {
            // An authentication request of 1 GiB, then its body.
            let mut header = vec![b'R'];
            header.extend_from_slice(&(ANNOUNCED + 4).to_be_bytes());
            if write(&mut stream, &header).await.is_err() {
                return;
            }
            let chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < send {
                if write(&mut stream, &chunk).await.is_err() {
                    return;
                }
                sent += chunk.len();
            }
        }
        Hostile::MuteAfterStartup => {
            // AuthenticationOk, ReadyForQuery (idle).
            let hello = [
                b'R', 0, 0, 0, 8, 0, 0, 0, 0, //
                b'Z', 0, 0, 0, 5, b'I',
            ];
            if write(&mut stream, &hello).await.is_err() {
                return;
            }
        }
    }
    drain(stream).await;
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The highest VmRSS of `pid` while it runs, sampled every 5 ms: a buffer
/// that is freed again after the error still shows.
struct PeakRss {
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    fn watch(pid: String) -> Self {
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_kib(&pid)));
        let seen = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                seen.fetch_max(rss_kib(&pid), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        PeakRss { peak, task }
    }

    fn peak_mib(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::SeqCst) / 1024
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn some_endpoint(port: u16) -> (Endpoint, Login) {
    (
        Endpoint {
            host: "127.0.0.1".into(),
            port,
            database: "icn_hostile".into(),
        },
        Login {
            username: "icn_hostile".into(),
            password: "not-a-secret".into(),
        },
    )
}

/// Provisioning against a fake server: the error, how long it took and how
/// far this process's memory grew meanwhile.
async fn provision_against(
    url: &str,
    port: u16,
    limits: database::Limits,
) -> (database::DbError, Duration, u64) {
    let admin = Admin::from_url(url).expect("admin URL").with_limits(limits);
    let owner = database::Owner {
        namespace: "hostile".into(),
        cluster: "hostile".into(),
        uid: "0".into(),
    };
    let (endpoint, login) = some_endpoint(port);
    let rss = PeakRss::watch("self".into());
    let before = rss.peak_mib();
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(120),
        database::provision(&admin, &endpoint, &login, &["Orders".into()], &owner),
    )
    .await
    .expect("provisioning against a hostile server must end on its own");
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let grew = rss.peak_mib().saturating_sub(before);
    let Err(error) = outcome else {
        panic!("provisioning against a hostile server succeeded");
    };
    (error, took, grew)
}

#[tokio::test]
async fn a_huge_message_from_a_database_is_refused_without_buffering_it() {
    for tls in [false, true] {
        let fake = FakePostgres::start(Hostile::Huge {
            tls,
            send: 512 << 20,
        })
        .await;
        let url = fake.url(if tls { "require" } else { "prefer" });
        let (error, took, grew) = provision_against(&url, fake.port, Default::default()).await;
        eprintln!("tls={tls}: {error} after {took:?}, memory grew {grew} MiB");
        assert!(grew < 64, "tls={tls}: memory grew by {grew} MiB: {error}");
        assert_eq!(
            error.class.reason(),
            "DatabaseResponseTooLarge",
            "tls={tls}: {error}"
        );
        assert!(
            error.to_string().contains(&format!("{ANNOUNCED}")),
            "the error says what was announced: {error}"
        );
        assert!(took < Duration::from_secs(5), "tls={tls}: took {took:?}");
    }
}

#[tokio::test]
async fn a_database_that_never_answers_is_bounded_by_deadlines() {
    let silent = FakePostgres::start(Hostile::Silent).await;
    let (error, took, _) =
        provision_against(&silent.url("prefer"), silent.port, Default::default()).await;
    assert_eq!(error.class.reason(), "DatabaseDeadlineExceeded", "{error}");
    assert!(error.to_string().contains("connect"), "{error}");
    assert!(took < Duration::from_secs(15), "took {took:?}");

    // A server that logs in and then never answers: the operation
    // deadline (shortened here from its 60 s) ends provisioning.
    let mute = FakePostgres::start(Hostile::MuteAfterStartup).await;
    let limits = database::Limits {
        operation: Duration::from_secs(5),
        ..Default::default()
    };
    let (error, took, _) = provision_against(&mute.url("disable"), mute.port, limits).await;
    assert_eq!(error.class.reason(), "DatabaseDeadlineExceeded", "{error}");
    assert!(
        error
            .to_string()
            .contains("provisioning did not finish within 5s"),
        "{error}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

/// One operator, three clusters in one namespace: one whose database
/// announces a huge message, one whose database never answers, and one on
/// the real PostgreSQL.
#[tokio::test]
async fn a_hostile_database_does_not_hold_up_other_clusters() {
    let huge = FakePostgres::start(Hostile::Huge {
        tls: false,
        send: 512 << 20,
    })
    .await;
    let silent = FakePostgres::start(Hostile::Silent).await;
    let b = bed("db-hostile").await;
    let operator = PeakRss::watch(b._operator.pid().to_string());
    // The operator's own working set, once it is up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = rss_kib(&b._operator.pid().to_string()) / 1024;
    database_admin_secret(&b.client, &b.ns, "huge", &huge.url("prefer")).await;
    database_admin_secret(&b.client, &b.ns, "silent", &silent.url("prefer")).await;
    let started = Instant::now();
    for (name, secret) in [("huge", "huge"), ("silent", "silent"), ("fine", "db-admin")] {
        create_yaml(&b.client, &b.ns, &cluster(name, secret, 1, ""))
            .await
            .expect("create");
    }
    provisioned(&b.api, "fine").await;
    let fine_after = started.elapsed();
    wait_until(WAIT, "a connection to the hostile server", || async {
        (huge.accepted() > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grew = operator.peak_mib().saturating_sub(baseline);
    assert!(grew < 100, "the operator's memory grew by {grew} MiB");
    for (name, reason, needle) in [
        ("huge", "DatabaseResponseTooLarge", format!("{ANNOUNCED}")),
        ("silent", "DatabaseDeadlineExceeded", "connect".to_owned()),
    ] {
        let status = status_when(&b.api, name, reason, |s| {
            condition(s, "Degraded").is_some_and(|c| c.status == "True" && c.reason == reason)
        })
        .await;
        let message = &condition(&status, "Degraded").expect("Degraded").message;
        assert!(message.contains(&needle), "{name}: {message}");
    }
    assert!(
        fine_after < Duration::from_secs(30),
        "the good cluster took {fine_after:?}"
    );
    // Retried with backoff (5 s, 10 s, 20 s, …), not in a hot loop.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let attempts = huge.accepted();
    let window = started.elapsed();
    assert!(
        (2..=8).contains(&attempts),
        "{attempts} connections to the hostile server in {window:?}"
    );
    delete_namespace(&b.client, &b.ns).await;
}
