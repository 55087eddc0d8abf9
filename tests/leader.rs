//! Several operator replicas: one leads (holds the Lease), the others
//! stand by; a killed leader is replaced once its lease expires, a
//! terminated one hands over at once, and the new leader reconciles.

mod support;

use std::time::{Duration, Instant};

use integration_operator::api::{IntegrationCluster, Phase};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use support::*;

const LEASE: &str = "op";

fn replica(ns: &str, identity: &str) -> Operator {
    Operator::start_with(
        ns,
        identity,
        &[
            "--leader-elect",
            "--leader-election-namespace",
            ns,
            "--leader-election-id",
            LEASE,
            "--leader-election-identity",
            identity,
            "--leader-election-lease-seconds",
            "4",
            "--leader-election-renew-deadline-seconds",
            "3",
            "--leader-election-retry-seconds",
            "1",
        ],
    )
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

async fn ready_with(api: &Api<IntegrationCluster>, replicas: i32) {
    status_when(api, "c", &format!("Ready with {replicas}"), |s| {
        s.phase == Some(Phase::Ready) && s.ready_replicas == Some(replicas)
    })
    .await;
}

#[tokio::test]
async fn one_replica_leads_and_a_standby_takes_over() {
    let client = admin().await;
    let ns = namespace(&client, "leader").await;
    let mut replicas: Vec<(String, Operator)> = ["op-a", "op-b"]
        .into_iter()
        .map(|id| (id.to_owned(), replica(&ns, id)))
        .collect();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let first = wait_until(Duration::from_secs(20), "a leader", || holder(&leases)).await;

    let yaml = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: c}\n\
                spec: {profile: generic, mode: stateless, image: srv:1, replicas: 2}\n";
    create_yaml(&client, &ns, yaml).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    ready_with(&api, 2).await;
    let standby = if first == "op-a" { "op-b" } else { "op-a" };
    let log = state_dir()
        .join("logs")
        .join(format!("operator-{ns}-{standby}.log"));
    let standby_log = wait_until(Duration::from_secs(10), "the standby says so", || async {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|text| text.contains("standing by"))
    })
    .await;
    assert!(
        !standby_log.contains("reconciled"),
        "a standby must not reconcile"
    );

    // SIGKILL: the standby leads once the lease (4 s) expired.
    let killed_at = Instant::now();
    let index = replicas
        .iter()
        .position(|(id, _)| *id == first)
        .expect("leader");
    let (_, mut leader) = replicas.remove(index);
    leader.signal("KILL");
    assert!(leader.wait_exit(Duration::from_secs(5)).await);
    let second = wait_until(Duration::from_secs(20), "a new leader", || async {
        holder(&leases).await.filter(|h| *h != first)
    })
    .await;
    assert!(
        killed_at.elapsed() <= Duration::from_secs(4 + 1 + 2),
        "took {:?}",
        killed_at.elapsed()
    );
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .expect("scale");
    ready_with(&api, 3).await;

    // SIGTERM: the leader releases at once; the restarted replica takes over
    // within about a retry period.
    replicas.push((first.clone(), replica(&ns, &first)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, current) = replicas
        .iter_mut()
        .find(|(id, _)| *id == second)
        .expect("second leader");
    let stopped_at = Instant::now();
    current.signal("TERM");
    assert!(
        current.wait_exit(Duration::from_secs(10)).await,
        "the leader exits on SIGTERM"
    );
    let third = wait_until(
        Duration::from_secs(10),
        "the restarted replica leads",
        || async { holder(&leases).await.filter(|h| *h == first) },
    )
    .await;
    assert_eq!(third, first);
    assert!(
        stopped_at.elapsed() <= Duration::from_secs(4),
        "hand-over took {:?}",
        stopped_at.elapsed()
    );
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .expect("scale");
    ready_with(&api, 1).await;
    delete_namespace(&client, &ns).await;
}

/// Successful writes of the operator's user among `events` that the API
/// server received after `after` (its own timestamps: RFC 3339 with
/// microseconds, which compare as text), as "verb resource/subresource".
fn operator_writes_after(events: &[serde_json::Value], after: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| {
            e["user"]["username"] == "integration-operator"
                && e["responseStatus"]["code"]
                    .as_i64()
                    .is_some_and(|c| c < 400)
                && e["requestReceivedTimestamp"]
                    .as_str()
                    .is_some_and(|t| t > after)
        })
        .map(audit_request)
        .collect()
}

/// A leader whose Lease another holder takes (here an admin hands it
/// over) while a reconcile is in flight, waiting on a database that never
/// answers, stops at once: nothing it writes lands after the loss, and it
/// exits non-zero so that its Deployment restarts it as a standby.
#[tokio::test]
async fn a_leader_that_loses_its_lease_stops_writing_at_once() {
    let client = admin().await;
    let ns = namespace(&client, "lost").await;
    let audit_from = audit_end();
    // The cluster's database: accepts connections and never answers.
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = tarpit.local_addr().expect("address").port();
    let (connected, mut waiting) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = tarpit.accept().await {
            held.push(stream);
            let _ = connected.send(true);
        }
    });
    database_admin_secret(
        &client,
        &ns,
        "db-admin",
        &format!("postgres://admin:pw@127.0.0.1:{port}/postgres"),
    )
    .await;
    let mut leader = replica(&ns, "op-a");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    wait_until(Duration::from_secs(20), "op-a leads", || async {
        holder(&leases).await.filter(|h| h == "op-a")
    })
    .await;
    let yaml = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: c}\n\
                spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: 1\n  \
                database: {mode: external, external: {secretRef: {name: db-admin, key: url}}, components: [Orders]}\n";
    create_yaml(&client, &ns, yaml).await.expect("create");
    tokio::time::timeout(Duration::from_secs(30), waiting.wait_for(|c| *c))
        .await
        .expect("the reconcile connects to the database")
        .expect("tarpit");

    // The loss: another holder, freshly renewed.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    leases
        .patch(
            LEASE,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "holderIdentity": "usurper",
                "acquireTime": now,
                "renewTime": now,
                "leaseDurationSeconds": 60,
            }})),
        )
        .await
        .expect("hand the Lease over");
    let lost = Instant::now();

    // Long enough for the waiting reconcile to give up on the database
    // (10 s) and report.
    let exited = leader.wait_exit(Duration::from_secs(15)).await;
    let exit_after = lost.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = audit_entries(&ns, audit_from);
    let handed_over = events
        .iter()
        .filter(|e| {
            e["objectRef"]["resource"] == "leases"
                && e["verb"] == "patch"
                && e["user"]["username"] != "integration-operator"
        })
        .filter_map(|e| e["stageTimestamp"].as_str())
        .max()
        .expect("the hand-over in the audit log");
    let late = operator_writes_after(&events, handed_over);
    assert!(
        late.is_empty(),
        "writes of the old leader after it lost the Lease: {late:?}"
    );
    assert!(
        exited,
        "the old leader still runs {exit_after:?} after the loss"
    );
    assert!(
        exit_after <= Duration::from_secs(3),
        "the old leader exited {exit_after:?} after the loss"
    );
    assert_eq!(leader.exit_code(), Some(1), "a lost Lease is a failure");
    assert_eq!(holder(&leases).await.as_deref(), Some("usurper"));
    // No operator is left to remove its finalizer; the namespace could
    // not go otherwise.
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("drop the finalizer");
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn the_operator_manifests_are_valid_kubernetes_objects() {
    let _client = admin().await;
    let out = kubectl(&[
        "apply",
        "--dry-run=client",
        "--validate=strict",
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/rbac.yaml"),
        "-f",
        concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/operator.yaml"),
    ]);
    assert!(
        out.contains("deployment.apps/integration-operator"),
        "{out}"
    );
}
