//! The Helm chart: lints, renders what the plain manifests hold (the same
//! RBAC rules, leader election, the CRD), follows its values, and installs
//! into the control plane. Helm is built from its Go module by
//! `hack/install-helm` (there is no Debian package).

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::Api;
use serde_json::Value;
use support::*;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/integration-operator");

/// The rendered documents, by kind.
fn render(extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        "t",
        CHART,
        "--namespace",
        "ops",
        "--kube-version",
        "1.36.3",
    ];
    args.extend_from_slice(extra);
    let text = helm(&args);
    text.split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
        .filter(|v| v.is_object())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn args(docs: &[Value]) -> Vec<String> {
    of_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_chart_lints_and_renders_the_manifests_rbac_and_leader_election() {
    helm(&["lint", "--strict", CHART, "--kube-version", "1.36.3"]);
    let docs = render(&[]);
    let rbac: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/rbac.yaml"))
            .expect("rbac.yaml"),
    )
    .expect("parse rbac.yaml");
    assert_eq!(
        of_kind(&docs, "ClusterRole")["rules"],
        rbac["rules"],
        "the chart's ClusterRole must grant exactly what manifests/rbac.yaml grants"
    );
    let deployment = of_kind(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/integration-operator/integration-operator:0.1.0"
    );
    let a = args(&docs);
    assert!(a.contains(&"--leader-elect".to_owned()), "{a:?}");
    assert!(!a.iter().any(|x| x.starts_with("--namespace")), "{a:?}");
    assert!(
        a.contains(
            &"--agent-image=ghcr.io/integration-operator/integration-operator:0.1.0".to_owned()
        ),
        "the agent runs the operator's own image: {a:?}"
    );
    assert_eq!(
        of_kind(&docs, "ClusterRoleBinding")["subjects"][0]["namespace"],
        "ops"
    );

    let one = render(&[
        "--set",
        "watchNamespace=team-a",
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "replicaCount=1",
        "--set",
        "image.tag=0.2.0",
    ]);
    let a = args(&one);
    assert!(a.contains(&"--namespace=team-a".to_owned()), "{a:?}");
    assert!(!a.contains(&"--leader-elect".to_owned()), "{a:?}");
    assert!(
        a.contains(
            &"--agent-image=ghcr.io/integration-operator/integration-operator:0.2.0".to_owned()
        ),
        "{a:?}"
    );
    assert_eq!(of_kind(&one, "Deployment")["spec"]["replicas"], 1);
    assert_eq!(
        of_kind(&one, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/integration-operator/integration-operator:0.2.0"
    );
}

#[tokio::test]
async fn the_chart_installs_and_uninstalls() {
    let client = admin().await;
    let ns = namespace(&client, "chart").await;
    let release = unique("io");
    helm(&[
        "install",
        &release,
        CHART,
        "--namespace",
        &ns,
        "--wait=false",
    ]);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let name = format!("{release}-integration-operator");
    let deployment = deployments.get(&name).await.expect("Deployment installed");
    assert_eq!(deployment.spec.and_then(|s| s.replicas), Some(2));
    let roles: Api<ClusterRole> = Api::all(client.clone());
    roles.get(&name).await.expect("ClusterRole installed");
    helm(&["uninstall", &release, "--namespace", &ns]);
    assert!(
        roles.get_opt(&name).await.expect("get").is_none(),
        "uninstall removes the ClusterRole"
    );
    // The CRD stays (Helm never deletes CRDs from crds/): clusters outlive
    // the operator.
    delete_namespace(&client, &ns).await;
}
