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
        "SELECT format('role %s super=%s createdb=%s createrole=%s', rolname, rolsuper, rolcreatedb, rolcreaterole)
           FROM pg_roles WHERE rolname = $1
         UNION ALL
         SELECT format('database %s owner=%s acl=%s', datname, pg_get_userbyid(datdba), datacl)
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
    let role = format!("ic_{}_alpha", b.ns.replace('-', "_"));
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

    // Provisioning again with the same inputs changes nothing.
    let before = catalog(&endpoint.database).await;
    let admin = Admin::from_url(&postgres_admin_url()).expect("admin URL");
    let again = database::provision(
        &admin,
        &endpoint,
        &login,
        &["Orders".into(), "Audit".into()],
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
        wait_until(WAIT, &format!("{name} gone"), || async {
            b.api
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .is_none()
                .then_some(())
        })
        .await;
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
    // The member list in the database follows status.
    let state: String = sqlx::query_scalar(
        "SELECT state FROM integration_operator.cluster_members WHERE node = 'gd-2'",
    )
    .fetch_one(&pool)
    .await
    .expect("member row");
    assert_eq!(state, "Removed");
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
