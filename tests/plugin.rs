//! `kubectl integration` against the real control plane, run as kubectl
//! runs a plugin: a binary on PATH with the user's kubeconfig.

mod support;

use std::process::{Command, Output};

use integration_operator::api::{IntegrationCluster, Phase};
use kube::api::{Api, Patch, PatchParams};
use support::*;

fn plugin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-integration"))
        .args(args)
        .env("KUBECONFIG", admin_kubeconfig())
        .output()
        .expect("run kubectl-integration")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn cluster(name: &str) -> String {
    format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: {name}}}\n\
         spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: 3\n"
    )
}

#[test]
fn help_shows_examples() {
    let help = stdout(&plugin(&["--help"]));
    for text in [
        "status",
        "offline",
        "add-back",
        "Examples:",
        "kubectl integration status orders",
    ] {
        assert!(help.contains(text), "{text}: {help}");
    }
}

#[tokio::test]
async fn status_shows_every_node_as_a_table_or_json() {
    let client = admin().await;
    let ns = namespace(&client, "plugin-status").await;
    let _operator = Operator::start(&ns);
    create_yaml(&client, &ns, &cluster("orders"))
        .await
        .expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "orders", "Ready", |s| s.phase == Some(Phase::Ready)).await;

    let table = stdout(&plugin(&["status", "orders", "-n", &ns]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("Ready, 3/3 nodes online, 3 ready"),
        "{table}"
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NODE",
            "STATE",
            "READY",
            "IN",
            "SYNC",
            "LISTENERS",
            "MESSAGE"
        ]
    );
    for (line, node) in lines[2..].iter().zip(["orders-0", "orders-1", "orders-2"]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[..5], [node, "Online", "true", "yes", "-"], "{table}");
    }

    let json: serde_json::Value = serde_json::from_str(&stdout(&plugin(&[
        "status", "orders", "-n", &ns, "-o", "json",
    ])))
    .expect("json output");
    assert_eq!(json["status"]["onlineReplicas"], 3);

    let missing = plugin(&["status", "nope", "-n", &ns]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("IntegrationCluster nope not found"));
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn node_commands_edit_the_spec_with_their_own_field_manager() {
    let client = admin().await;
    let ns = namespace(&client, "plugin-edit").await;
    create_yaml(&client, &ns, &cluster("orders"))
        .await
        .expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    let nodes = |ic: IntegrationCluster| ic.spec.nodes.unwrap_or_default();

    stdout(&plugin(&["offline", "orders", "orders-1", "-n", &ns]));
    stdout(&plugin(&["remove", "orders", "orders-2", "-n", &ns]));
    let ic = api.get("orders").await.expect("get");
    let managers: Vec<String> = ic
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "kubectl-integration"),
        "{managers:?}"
    );
    let n = nodes(ic);
    assert_eq!(
        (n.offline, n.remove),
        (vec!["orders-1".to_owned()], vec!["orders-2".to_owned()])
    );

    // add-back: out of remove, and offline until brought online.
    stdout(&plugin(&["add-back", "orders", "orders-2", "-n", &ns]));
    let n = nodes(api.get("orders").await.expect("get"));
    assert!(n.remove.is_empty());
    assert_eq!(n.offline, ["orders-1", "orders-2"]);
    stdout(&plugin(&["online", "orders", "orders-1", "-n", &ns]));
    stdout(&plugin(&["online", "orders", "orders-2", "-n", &ns]));
    assert!(
        nodes(api.get("orders").await.expect("get"))
            .offline
            .is_empty()
    );

    // A name the API server refuses is reported, not swallowed.
    let bad = plugin(&["offline", "orders", "billing-1", "-n", &ns]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("every entry must name a node of this cluster")
    );
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn gitops_managed_entries_are_left_to_their_owner() {
    let client = admin().await;
    let ns = namespace(&client, "plugin-gitops").await;
    create_yaml(&client, &ns, &cluster("orders"))
        .await
        .expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    // What Argo CD would do: apply the manifest with its own field manager.
    let argo = serde_json::json!({
        "apiVersion": "integration.dev/v1alpha1",
        "kind": "IntegrationCluster",
        "metadata": {"name": "orders", "annotations": {"argocd.argoproj.io/tracking-id": "app:integration.dev/IntegrationCluster:x/orders"}},
        "spec": {"profile": "generic", "mode": "stateless", "image": "srv:1", "replicas": 3, "nodes": {"offline": ["orders-0"]}},
    });
    api.patch(
        "orders",
        &PatchParams::apply("argocd-controller"),
        &Patch::Apply(&argo),
    )
    .await
    .expect("argo apply");

    let offline = plugin(&["offline", "orders", "orders-1", "-n", &ns]);
    stdout(&offline);
    assert!(String::from_utf8_lossy(&offline.stderr).contains("looks managed by Argo CD"));

    let refused = plugin(&["online", "orders", "orders-0", "-n", &ns]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("argocd-controller put it there"));
    let offline_now = api
        .get("orders")
        .await
        .expect("get")
        .spec
        .nodes
        .unwrap_or_default()
        .offline;
    assert_eq!(offline_now, ["orders-0", "orders-1"]);
    delete_namespace(&client, &ns).await;
}
