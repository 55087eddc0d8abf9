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
