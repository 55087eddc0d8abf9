//! Node workflows on the real control plane, driven through the kubectl
//! plugin as a person would: offline, online, remove, add back.
//! (The in-pod agent's quiesce and in-flight drain come later; here
//! "drained" means the node gets no client traffic.)

mod support;

use std::process::Command;
use std::time::Duration;

use integration_operator::api::{IntegrationCluster, IntegrationClusterStatus, NodeState, Phase};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;

fn plugin(ns: &str, args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_kubectl-integration"))
        .args(args)
        .args(["-n", ns])
        .env("KUBECONFIG", admin_kubeconfig())
        .output()
        .expect("run kubectl-integration");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn state(status: &IntegrationClusterStatus, node: &str) -> Option<NodeState> {
    status
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.state)
}

/// Ready endpoints of `service`, by pod name.
async fn ready_endpoints(client: &Client, ns: &str, service: &str) -> Vec<String> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let mut names: Vec<String> = slices
        .list(&params)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .filter_map(|e| e.target_ref.as_ref().and_then(|t| t.name.clone()))
        .collect();
    names.sort();
    names
}

async fn endpoints_become(client: &Client, ns: &str, service: &str, expected: &[&str]) {
    wait_until(
        Duration::from_secs(60),
        &format!("{service} endpoints {expected:?}"),
        || async {
            let now = ready_endpoints(client, ns, service).await;
            (now == expected).then_some(())
        },
    )
    .await;
}

const CLUSTER: &str = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: c}\n\
    spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: 3\n  storage: {size: 1Gi}\n";

#[tokio::test]
async fn offline_online_remove_and_add_back() {
    let client = admin().await;
    let ns = namespace(&client, "workflows").await;
    let _operator = Operator::start(&ns);
    create_yaml(&client, &ns, CLUSTER).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "c", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    endpoints_become(&client, &ns, "c", &["c-0", "c-1", "c-2"]).await;

    // offline: out of the client Service, still on the admin Service.
    plugin(&ns, &["offline", "c", "c-1"]);
    let status = status_when(&api, "c", "c-1 Offline", |s| {
        state(s, "c-1") == Some(NodeState::Offline)
    })
    .await;
    assert_eq!(
        status.phase,
        Some(Phase::Ready),
        "an offline node the spec asks for is not a fault"
    );
    endpoints_become(&client, &ns, "c", &["c-0", "c-2"]).await;
    let admin_nodes = ready_endpoints(&client, &ns, "c-admin").await;
    assert!(admin_nodes.contains(&"c-1".to_owned()), "{admin_nodes:?}");

    // online: back in the client Service.
    plugin(&ns, &["online", "c", "c-1"]);
    status_when(&api, "c", "c-1 Online", |s| {
        state(s, "c-1") == Some(NodeState::Online)
    })
    .await;
    endpoints_become(&client, &ns, "c", &["c-0", "c-1", "c-2"]).await;

    // remove: offline first, then the pod goes; the claim stays (Retain).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let old = pods.get("c-2").await.expect("c-2").metadata.uid;
    plugin(&ns, &["remove", "c", "c-2"]);
    let removed = status_when(&api, "c", "c-2 Removed", |s| {
        state(s, "c-2") == Some(NodeState::Removed)
    })
    .await;
    assert_eq!(removed.phase, Some(Phase::Ready));
    assert!(pods.get_opt("c-2").await.expect("get").is_none());
    endpoints_become(&client, &ns, "c", &["c-0", "c-1"]).await;

    // add back: returns offline, with a new pod, then online on request.
    plugin(&ns, &["add-back", "c", "c-2"]);
    status_when(&api, "c", "c-2 back, Offline", |s| {
        state(s, "c-2") == Some(NodeState::Offline)
    })
    .await;
    // Status says Offline from the reconcile that creates the pod, so the
    // pod may appear a moment later.
    let back = wait_until(Duration::from_secs(30), "c-2's new pod", || async {
        pods.get_opt("c-2").await.ok().flatten()
    })
    .await;
    assert_ne!(back.metadata.uid, old);
    assert_eq!(ready_endpoints(&client, &ns, "c").await, ["c-0", "c-1"]);
    plugin(&ns, &["online", "c", "c-2"]);
    status_when(&api, "c", "c-2 Online", |s| {
        state(s, "c-2") == Some(NodeState::Online)
    })
    .await;
    endpoints_become(&client, &ns, "c", &["c-0", "c-1", "c-2"]).await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn the_last_online_node_needs_force() {
    let client = admin().await;
    let ns = namespace(&client, "lastnode").await;
    let _operator = Operator::start(&ns);
    let one = CLUSTER.replace("replicas: 3", "replicas: 1");
    create_yaml(&client, &ns, &one).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "c", "Ready", |s| s.phase == Some(Phase::Ready)).await;

    plugin(&ns, &["offline", "c", "c-0"]);
    let held = status_when(&api, "c", "Stalled on the last node", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Stalled" && c.status == "True")
    })
    .await;
    let stalled = held
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    assert!(
        stalled.message.contains("c-0 is the last online node"),
        "{}",
        stalled.message
    );
    assert_eq!(state(&held, "c-0"), Some(NodeState::Online));

    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"integration.dev/force": "c-0"}}})),
    )
    .await
    .expect("force");
    status_when(&api, "c", "c-0 Offline", |s| {
        state(s, "c-0") == Some(NodeState::Offline)
    })
    .await;
    let ic = api.get("c").await.expect("get");
    assert_eq!(
        ic.annotations()
            .get("integration.dev/force")
            .map(String::as_str),
        Some("c-0")
    );
    delete_namespace(&client, &ns).await;
}

/// Two kwok nodes of this test's own (tainted, so no other test's pods
/// land there, and labelled, so this test's pods land only there).
async fn own_nodes(client: &Client, ns: &str) -> [String; 2] {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let names = [format!("{ns}-a"), format!("{ns}-b")];
    for (i, name) in names.iter().enumerate() {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "type": "kwok", "test-drain": ns}},
            "spec": {"taints": [{"key": "test-drain", "value": ns, "effect": "NoSchedule"}]},
            "status": {
                "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                "addresses": [{"type": "InternalIP", "address": format!("192.0.2.{}", 200 + i)}],
            },
        });
        nodes
            .patch(
                name,
                &PatchParams::apply("tests").force(),
                &Patch::Apply(&node),
            )
            .await
            .expect("create node");
    }
    names
}

/// `kubectl drain` of a Kubernetes node: the disruption budget refuses the
/// evictions, and the operator, seeing the node cordoned, moves each server
/// pod through the node workflow (out of the Service first, then deleted
/// and created again elsewhere); the drain then completes.
#[tokio::test]
async fn draining_a_kubernetes_node_moves_each_server_pod_through_the_workflow() {
    let client = admin().await;
    let ns = namespace(&client, "drain").await;
    let [a, b] = own_nodes(&client, &ns).await;
    let _operator = Operator::start(&ns);
    let spec = format!(
        "{}  scheduling:\n    nodeSelector: {{test-drain: {ns}}}\n    \
         tolerations: [{{key: test-drain, operator: Exists, effect: NoSchedule}}]\n",
        CLUSTER.replace("replicas: 3", "replicas: 2")
    );
    create_yaml(&client, &ns, &spec).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "c", "phase Ready", |s| s.phase == Some(Phase::Ready)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let host = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default()
    };
    let before = pods.list(&ListParams::default()).await.expect("pods").items;
    let drained = if before.iter().any(|p| host(p) == a) {
        &a
    } else {
        &b
    };
    let moving: Vec<String> = before
        .iter()
        .filter(|p| host(p) == *drained)
        .map(ResourceExt::name_any)
        .collect();
    assert!(!moving.is_empty());

    let node = drained.clone();
    let drain = tokio::task::spawn_blocking(move || {
        kubectl_output(&[
            "drain",
            &node,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=150s",
            "--pod-selector=integration.dev/cluster=c",
        ])
    });
    let output = drain.await.expect("drain finished");
    assert!(
        output.status.success(),
        "kubectl drain: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let after = status_when(&api, "c", "phase Ready again", |s| {
        s.phase == Some(Phase::Ready)
    })
    .await;
    assert_eq!(after.nodes.len(), 2);
    let now = pods.list(&ListParams::default()).await.expect("pods").items;
    assert!(
        now.iter().all(|p| host(p) != *drained),
        "no server pod is left on the drained node"
    );
    // In the API server's order: for each pod, the operator took it out
    // of the Service, then deleted it; an eviction went through only for a
    // pod the operator had already deleted (it was terminating or gone).
    let log: Vec<(String, String)> = audit_entries(&ns, 0)
        .iter()
        .filter(|e| e["objectRef"]["resource"] == "pods")
        .map(|e| {
            let who = e["user"]["username"].as_str().unwrap_or_default();
            let code = &e["responseStatus"]["code"];
            (who.to_owned(), format!("{} {code}", audit_request(e)))
        })
        .collect();
    let find = |who: &str, what: &str| {
        log.iter()
            .position(|(w, r)| w == who && r == what)
            .unwrap_or_else(|| panic!("no {who}: {what} in {log:#?}"))
    };
    for pod in &moving {
        let gate = find(
            "integration-operator",
            &format!("patch pods/status {pod} 200"),
        );
        let delete = find("integration-operator", &format!("delete pods/ {pod} 200"));
        assert!(gate < delete, "{pod}: out of the Service before deleted");
        let eviction = format!("create pods/eviction {pod} 201");
        if let Some(evicted) = log.iter().position(|(w, r)| w == "admin" && *r == eviction) {
            assert!(
                evicted > delete,
                "{pod} evicted before the operator deleted it: {log:#?}"
            );
        }
    }
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for name in [&a, &b] {
        let _ = nodes.delete(name, &Default::default()).await;
    }
    delete_namespace(&client, &ns).await;
}
