//! The Helm chart: lints, renders what the plain manifests hold (the same
//! RBAC rules, leader election, the CRD), follows its values, and installs
//! into the control plane. Helm is built from its Go module by
//! `hack/install-helm` (there is no Debian package).

mod support;

use std::time::Duration;

use integration_operator::api::{IntegrationCluster, Phase};
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

fn manifests_rules() -> Value {
    let rbac: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/rbac.yaml"))
            .expect("rbac.yaml"),
    )
    .expect("parse rbac.yaml");
    rbac["rules"].clone()
}

#[test]
fn watching_one_namespace_the_chart_binds_roles_and_reads_only_nodes_cluster_wide() {
    let docs = render(&["--set", "watchNamespace=team-a"]);
    let cluster_roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "ClusterRole").collect();
    assert_eq!(cluster_roles.len(), 1, "{cluster_roles:#?}");
    assert_eq!(
        cluster_roles[0]["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]),
        "cluster-wide, the operator only reads Nodes"
    );
    let roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Role").collect();
    let watched = roles
        .iter()
        .find(|r| r["metadata"]["namespace"] == "team-a")
        .expect("a Role in the watched namespace");
    assert_eq!(
        watched["rules"],
        manifests_rules(),
        "the Role grants what manifests/rbac.yaml grants, in one namespace"
    );
    let leader = roles
        .iter()
        .find(|r| r["metadata"]["namespace"] == "ops")
        .expect("a Role for the leader Lease in the release namespace");
    let resources: Vec<&Value> = leader["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .flat_map(|r| r["resources"].as_array().into_iter().flatten())
        .collect();
    assert!(resources.iter().all(|r| *r == "leases"), "{leader}");
    for binding in docs.iter().filter(|d| d["kind"] == "RoleBinding") {
        assert_eq!(binding["subjects"][0]["namespace"], "ops", "{binding}");
    }
}

/// What `kubectl auth can-i` answers for `user`.
fn can_i(user: &str, verb: &str, resource: &str, namespace: &str) -> bool {
    let out = kubectl_output(&[
        "auth", "can-i", verb, resource, "-n", namespace, "--as", user,
    ]);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test]
async fn watching_one_namespace_the_operator_can_touch_only_that_namespace_and_reconciles_there() {
    let client = admin().await;
    let release_ns = namespace(&client, "chart-op").await;
    let watched = namespace(&client, "chart-watched").await;
    let other = namespace(&client, "chart-other").await;
    let release = unique("io");
    helm(&[
        "install",
        &release,
        CHART,
        "--namespace",
        &release_ns,
        "--set",
        &format!("watchNamespace={watched}"),
        // The operator runs below, from this build, as the chart's
        // ServiceAccount.
        "--set",
        "replicaCount=0",
        "--wait=false",
    ]);
    let account = format!("{release}-integration-operator");
    let user = format!("system:serviceaccount:{release_ns}:{account}");
    for (verb, resource) in [
        ("get", "secrets"),
        ("create", "pods"),
        ("patch", "pods"),
        ("update", "leases.coordination.k8s.io"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("list", "integrationclusters.integration.dev"),
    ] {
        assert!(
            can_i(&user, verb, resource, &watched),
            "{verb} {resource} in the watched namespace"
        );
        assert!(
            !can_i(&user, verb, resource, &other),
            "{verb} {resource} in another namespace"
        );
    }
    assert!(can_i(
        &user,
        "update",
        "leases.coordination.k8s.io/integration-operator",
        &release_ns
    ));
    assert!(!can_i(&user, "get", "secrets", &release_ns));

    let kubeconfig = service_account_kubeconfig(&release_ns, &account);
    let _operator = Operator::start_via(
        &watched,
        "chart-sa",
        &[
            "--leader-elect",
            "--leader-election-namespace",
            &release_ns,
            "--leader-election-identity",
            "chart-sa",
        ],
        &kubeconfig,
    );
    let yaml = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: c}\n\
                spec: {profile: generic, mode: stateless, image: srv:1, replicas: 2}\n";
    create_yaml(&client, &watched, yaml).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &watched);
    let status = status_when(&api, "c", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    assert_eq!(status.ready_replicas, Some(2));
    // Before the namespaces go: the cluster's finalizer needs the operator.
    api.delete("c", &Default::default()).await.expect("delete");
    wait_until(Duration::from_secs(60), "c deleted", || async {
        api.get_opt("c").await.ok()?.is_none().then_some(())
    })
    .await;
    helm(&["uninstall", &release, "--namespace", &release_ns]);
    for ns in [&release_ns, &watched, &other] {
        delete_namespace(&client, ns).await;
    }
}
