//! The operator binary against the real API server, running as its own
//! RBAC-limited user: it writes observedGeneration and a Validated
//! condition, and explains what CEL could not refuse in status and Events.

mod support;

use std::time::Duration;

use integration_operator::api::{IntegrationCluster, IntegrationClusterStatus, Phase};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

fn validated(status: &IntegrationClusterStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == "Validated")
}

#[tokio::test]
async fn a_valid_cluster_gets_observed_generation_and_validated_true() {
    let client = admin().await;
    let ns = namespace(&client, "valid").await;
    let _operator = Operator::start(&ns);
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/manifests/samples/webmethods-is-stateful.yaml"
    ))
    .expect("sample");
    create_yaml(&client, &ns, &sample).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);

    let status = status_when(&api, "orders", "status", |s| validated(s).is_some()).await;
    let condition = validated(&status).expect("Validated");
    assert_eq!(condition.status, "True", "{condition:?}");
    assert_eq!(condition.reason, "Valid");
    assert_eq!(condition.observed_generation, Some(1));
    assert_ne!(status.phase, Some(Phase::Invalid));
    assert_eq!(
        status.cluster_name.as_deref(),
        Some("orders_prod"),
        "seed 003: periods become underscores"
    );

    // A new generation is observed, and an unchanged verdict keeps its time.
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 4}})),
    )
    .await
    .expect("scale");
    let later = status_when(&api, "orders", "status", |s| {
        s.observed_generation == Some(2)
    })
    .await;
    let later_condition = validated(&later).expect("Validated");
    assert_eq!(later_condition.observed_generation, Some(2));
    assert_eq!(
        later_condition.last_transition_time,
        condition.last_transition_time
    );
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn what_cel_cannot_refuse_is_reported_with_a_reason_and_an_event() {
    let client = admin().await;
    let ns = namespace(&client, "unknown-node").await;
    let _operator = Operator::start(&ns);
    // orders-7 has this cluster's name, so CEL accepts it; with 3 replicas
    // there is no such node, which only the operator can tell.
    let yaml = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: orders}\n\
        spec:\n  profile: generic\n  mode: stateless\n  image: srv\n  replicas: 3\n  nodes: {offline: [orders-1, orders-7]}\n";
    create_yaml(&client, &ns, yaml)
        .await
        .expect("CEL accepts it");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);

    let status = status_when(&api, "orders", "status", |s| validated(s).is_some()).await;
    let condition = validated(&status).expect("Validated");
    assert_eq!(condition.status, "False");
    assert_eq!(condition.reason, "UnknownNode");
    assert!(
        condition
            .message
            .contains("spec.nodes.offline: orders-7 is not a node of this cluster"),
        "{}",
        condition.message
    );
    assert_eq!(status.phase, Some(Phase::Invalid));

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let event = wait_until(WAIT, "UnknownNode event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("UnknownNode"))
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("orders")
    );
    assert!(event.note.unwrap_or_default().contains("orders-7"));

    // Fixing the spec flips the condition back, with a new transition time
    // (timestamps have second precision, so let a second pass first).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 8}})),
    )
    .await
    .expect("scale up so orders-7 exists");
    let fixed = status_when(&api, "orders", "status", |s| {
        validated(s).is_some_and(|c| c.status == "True")
    })
    .await;
    let fixed_condition = validated(&fixed).expect("Validated");
    assert_ne!(
        fixed_condition.last_transition_time,
        condition.last_transition_time
    );
    assert_ne!(fixed.phase, Some(Phase::Invalid));
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_cluster_name_clash_on_a_shared_cache_refuses_the_newer_cluster() {
    let client = admin().await;
    let ns = namespace(&client, "clash").await;
    let _operator = Operator::start(&ns);
    let spec = |name: &str, cluster_name: &str| {
        format!(
            "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: {name}}}\n\
             spec:\n  profile: webmethods-is\n  image: msr\n  clusterName: {cluster_name}\n  \
             cache: {{mode: external, external: {{urls: ['tsa.shared:9510']}}}}\n"
        )
    };
    create_yaml(&client, &ns, &spec("first", "orders.prod"))
        .await
        .expect("first");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "first", "status", |s| {
        validated(s).is_some_and(|c| c.status == "True")
    })
    .await;
    // Different names for a person, the same name for Integration Server.
    create_yaml(&client, &ns, &spec("second", "orders_prod"))
        .await
        .expect("second");

    let status = status_when(&api, "second", "status", |s| validated(s).is_some()).await;
    let condition = validated(&status).expect("Validated");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "ClusterNameConflict")
    );
    assert!(
        condition.message.contains(&format!("{ns}/first")),
        "{}",
        condition.message
    );
    let first = api.get("first").await.expect("first");
    assert_eq!(
        first
            .status
            .as_ref()
            .and_then(validated)
            .map(|c| c.status.as_str()),
        Some("True"),
        "the existing cluster is left alone"
    );
    delete_namespace(&client, &ns).await;
}

/// GET on the operator's metrics address; None until it answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

#[tokio::test]
async fn the_operator_serves_metrics_and_health() {
    let client = admin().await;
    let ns = namespace(&client, "metrics").await;
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let _operator = Operator::start_with(&ns, "metrics", &["--metrics-address", &address]);
    let (status, _) = wait_until(WAIT, "healthz", || get(port, "/healthz")).await;
    assert_eq!(status, 200);
    let (ready, _) = wait_until(WAIT, "readyz 200", || async {
        get(port, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(ready, 200);

    let yaml = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: m}\n\
                spec: {profile: generic, mode: stateless, image: srv:1, replicas: 1}\n";
    create_yaml(&client, &ns, yaml).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "m", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    let (_, body) = wait_until(WAIT, "counted reconciles", || async {
        get(port, "/metrics")
            .await
            .filter(|(_, b)| b.contains("integration_operator_reconciles_total{result=\"ok\"}"))
    })
    .await;
    assert!(
        body.contains("integration_operator_reconcile_duration_seconds_bucket"),
        "{body}"
    );
    assert!(body.contains("integration_operator_leader 1"), "{body}");

    // A taken port stops the operator at once with one line.
    let taken = std::process::Command::new(env!("CARGO_BIN_EXE_integration-operator"))
        .args(["run", "--namespace", &ns, "--metrics-address", &address])
        .env("KUBECONFIG", operator_kubeconfig())
        .output()
        .expect("run");
    assert!(!taken.status.success());
    let stderr = String::from_utf8_lossy(&taken.stderr);
    assert!(
        stderr.contains(&format!("binding the metrics address {address}")),
        "{stderr}"
    );
    delete_namespace(&client, &ns).await;
}
