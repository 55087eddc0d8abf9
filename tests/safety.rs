//! Failure and deletion on the real control plane: a persistent API error is
//! retried with backoff, not in a hot loop, and reported in words; deletion
//! finishes within a bounded time even when the database cannot be reached
//! or the namespace is going; retained data survives every deletion mode;
//! the operator writes its finalizer under its own name.

mod support;

use std::time::Duration;

use integration_operator::api::{IntegrationCluster, IntegrationClusterStatus};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, ResourceQuota, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn cluster(name: &str, replicas: i32, extra: &str) -> String {
    format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: {name}}}\n\
         spec:\n  profile: generic\n  mode: stateless\n  image: registry.example.com/srv:1\n  \
         replicas: {replicas}\n{extra}"
    )
}

/// A database whose admin Secret names a port nothing listens on.
const UNREACHABLE_URL: &str = "postgres://admin:secret@127.0.0.1:1/postgres";

fn external_database(secret: &str) -> String {
    format!(
        "  database:\n    mode: external\n    external: {{secretRef: {{name: {secret}, key: url}}}}\n"
    )
}

async fn events_with(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

fn degraded_message(status: &IntegrationClusterStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| c.message.as_str())
}

/// A ResourceQuota that forbids pods makes every pod create fail. The
/// operator must try once per backoff step (5 s doubling), not in a loop
/// woken by its own status write, and say what is wrong in words.
#[tokio::test]
async fn a_persistent_api_error_is_retried_with_backoff_and_reported_in_words() {
    let client = admin().await;
    let ns = namespace(&client, "quota").await;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }))
    .expect("quota");
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .expect("create quota");
    let _operator = Operator::start(&ns);
    create_yaml(&client, &ns, &cluster("q", 2, ""))
        .await
        .expect("create cluster");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    let status = status_when(&api, "q", "Degraded with the quota error", |s| {
        degraded_message(s).is_some_and(|m| m.contains("exceeded quota"))
    })
    .await;
    let before = operator_writes(&ns).len();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let writes: Vec<String> = operator_writes(&ns).into_iter().skip(before).collect();
    let creates = writes
        .iter()
        .filter(|w| w.starts_with("create pods/"))
        .count();
    let status_patches = writes
        .iter()
        .filter(|w| w.starts_with("patch integrationclusters/status"))
        .count();
    println!(
        "in 60 s of a persistent error: {creates} pod creates, {status_patches} status patches"
    );
    // 5 s doubling: within any 60 s at most 10 + 20 + 40 → 4 attempts.
    assert!(
        creates <= 4 && status_patches <= 1,
        "{creates} pod creates and {status_patches} status patches in 60 s: {writes:#?}"
    );
    assert!(creates >= 1, "the operator still retries: {writes:#?}");
    let message = degraded_message(&status).unwrap_or_default().to_owned();
    for debug_dump in ["ErrorResponse", "Status {", "ApiError", "code: 403"] {
        assert!(
            !message.contains(debug_dump),
            "the status message is for a person, not a Debug dump: {message}"
        );
    }

    delete_namespace(&client, &ns).await;
}

/// deletionPolicy Delete with a database that cannot be reached: deleting
/// the namespace finishes within a minute, and the operator creates nothing
/// in the terminating namespace (external and managed database).
#[tokio::test]
async fn deleting_a_namespace_finishes_when_the_database_is_unreachable() {
    let client = admin().await;
    let ns = namespace(&client, "nsdel").await;
    let _operator = Operator::start(&ns);
    database_admin_secret(&client, &ns, "db-admin", UNREACHABLE_URL).await;
    let external = external_database("db-admin");
    create_yaml(
        &client,
        &ns,
        &cluster("ext", 1, &format!("  deletionPolicy: Delete\n{external}")),
    )
    .await
    .expect("create external");
    create_yaml(
        &client,
        &ns,
        &cluster(
            "man",
            1,
            "  deletionPolicy: Delete\n  database: {mode: managed}\n",
        ),
    )
    .await
    .expect("create managed");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    for name in ["ext", "man"] {
        status_when(&api, name, "the finalizer and a status", |_| true).await;
        wait_until(WAIT, "the finalizer", || async {
            let ic = api.get(name).await.ok()?;
            (!ic.finalizers().is_empty()).then_some(())
        })
        .await;
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    wait_until(WAIT, "the managed admin Secret", || async {
        secrets.get_opt("man-database-admin").await.ok().flatten()
    })
    .await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let took = delete_until_gone(&namespaces, &ns, &DeleteParams::background(), WAIT).await;
    // From the moment the namespace controller deleted the clusters, their
    // cleanup runs: it must not try to create anything (before that, a
    // live cluster's reconcile may still try, and is refused).
    let log = audit_entries(&ns, 0);
    let clusters_deleted = log
        .iter()
        .filter(|e| {
            e["objectRef"]["resource"] == "integrationclusters"
                && (e["verb"] == "delete" || e["verb"] == "deletecollection")
        })
        .filter_map(|e| e["stageTimestamp"].as_str())
        .min()
        .expect("the audit log shows the clusters' deletion")
        .to_owned();
    let created: Vec<String> = log
        .iter()
        .filter(|e| e["user"]["username"] == "integration-operator" && e["verb"] == "create")
        .filter(|e| e["objectRef"]["resource"] != "events")
        .filter(|e| e["requestReceivedTimestamp"].as_str() > Some(clusters_deleted.as_str()))
        .map(|e| format!("{} {}", e["objectRef"]["resource"], e["objectRef"]["name"]))
        .collect();
    assert!(
        created.is_empty(),
        "cleanup tried to create objects in the terminating namespace: {created:?}"
    );
    println!("namespace deleted in {took:?}");
}

/// Deleting a cluster whose database stays unreachable finishes within a
/// bounded time and an Event says what was left behind; the waiver
/// annotation skips the database cleanup at once.
#[tokio::test]
async fn deleting_a_cluster_with_an_unreachable_database_is_bounded_or_waived() {
    let client = admin().await;
    let ns = namespace(&client, "cldel").await;
    let _operator = Operator::start(&ns);
    database_admin_secret(&client, &ns, "db-admin", UNREACHABLE_URL).await;
    let external = external_database("db-admin");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    for name in ["bounded", "waived"] {
        create_yaml(
            &client,
            &ns,
            &cluster(name, 1, &format!("  deletionPolicy: Delete\n{external}")),
        )
        .await
        .expect("create cluster");
        wait_until(WAIT, "the finalizer", || async {
            let ic = api.get(name).await.ok()?;
            (!ic.finalizers().is_empty()).then_some(())
        })
        .await;
    }
    api.patch(
        "waived",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"integration.dev/skip-cleanup": "true"}}}),
        ),
    )
    .await
    .expect("annotate");
    for name in ["bounded", "waived"] {
        api.delete(name, &DeleteParams::default())
            .await
            .expect("delete cluster");
    }
    let waived = gone(&api, "waived", Duration::from_secs(15)).await;
    let bounded = gone(&api, "bounded", Duration::from_secs(90)).await;
    println!("waived cleanup finished in {waived:?}, unreachable database in {bounded:?}");
    for (reason, cluster) in [
        ("CleanupWaived", "waived"),
        ("DatabaseLeftBehind", "bounded"),
    ] {
        let events = events_with(&client, &ns, reason).await;
        assert!(
            events
                .iter()
                .any(
                    |e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(cluster)
                        && e.note
                            .as_deref()
                            .unwrap_or_default()
                            .contains("left behind")
                ),
            "a {reason} Event about {cluster} says what was left behind: {events:#?}"
        );
    }
    delete_namespace(&client, &ns).await;
}

/// deletionPolicy Retain: the volume claims and the database credentials
/// Secret stay when the cluster is deleted in the foreground, where the
/// garbage collector deletes what the cluster owns before the finalizer
/// has run.
#[tokio::test]
async fn retained_data_survives_foreground_deletion() {
    let client = admin().await;
    let ns = namespace(&client, "fg").await;
    let _operator = Operator::start(&ns);
    database_admin_secret(&client, &ns, "db-admin", &postgres_admin_url()).await;
    create_yaml(
        &client,
        &ns,
        &cluster(
            "keep",
            2,
            &format!(
                "  deletionPolicy: Retain\n  storage: {{size: 1Gi}}\n{}",
                external_database("db-admin")
            ),
        ),
    )
    .await
    .expect("create cluster");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "keep", "phase Ready", |s| {
        s.phase == Some(integration_operator::api::Phase::Ready)
    })
    .await;
    delete_until_gone(&api, "keep", &DeleteParams::foreground(), WAIT).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    for claim in ["data-keep-0", "data-keep-1"] {
        let claim = claims
            .get_opt(claim)
            .await
            .expect("read claim")
            .unwrap_or_else(|| panic!("retained claim {claim} was deleted"));
        assert!(
            claim.metadata.deletion_timestamp.is_none(),
            "retained claim {} is being deleted",
            claim.name_any()
        );
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let credentials = secrets
        .get_opt("keep-database-credentials")
        .await
        .expect("read secret")
        .expect("the retained database's credentials Secret exists");
    assert!(credentials.metadata.deletion_timestamp.is_none());
    delete_namespace(&client, &ns).await;
}

/// Every write names its writer: the finalizer too.
#[tokio::test]
async fn the_finalizer_is_written_under_the_operators_field_manager() {
    let client = admin().await;
    let ns = namespace(&client, "fin").await;
    let _operator = Operator::start(&ns);
    create_yaml(&client, &ns, &cluster("f", 1, ""))
        .await
        .expect("create cluster");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    let ic = wait_until(WAIT, "the finalizer", || async {
        let ic = api.get("f").await.ok()?;
        (!ic.finalizers().is_empty()).then_some(ic)
    })
    .await;
    let managers: Vec<String> = ic
        .managed_fields()
        .iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:finalizers"))
        })
        .map(|m| m.manager.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        managers,
        ["integration-operator"],
        "managers of metadata.finalizers"
    );
    delete_namespace(&client, &ns).await;
}
