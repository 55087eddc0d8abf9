//! Server pods on the real control plane, with kwok playing the kubelet (a
//! pod is Ready only when its containers are and its online gate is True).
//! Each test runs its own operator, as the RBAC-limited operator user, in a
//! namespace of its own.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use integration_operator::api::{IntegrationCluster, IntegrationClusterStatus, Phase};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const ONLINE: &str = "integration.dev/online";

fn generic(name: &str, replicas: i32, extra: &str) -> String {
    format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: {name}}}\n\
         spec:\n  profile: generic\n  mode: stateless\n  image: registry.example.com/srv:1\n  \
         replicas: {replicas}\n  storage: {{size: 1Gi}}\n{extra}"
    )
}

fn condition<'a>(status: &'a IntegrationClusterStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

async fn ready(api: &Api<IntegrationCluster>, name: &str) -> IntegrationClusterStatus {
    status_when(api, name, "phase Ready", |s| s.phase == Some(Phase::Ready)).await
}

async fn patch_spec(api: &Api<IntegrationCluster>, name: &str, spec: serde_json::Value) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
    .expect("patch spec");
}

fn is_true(pod: &Pod, type_: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

async fn server_pods(client: &Client, ns: &str, cluster: &str) -> BTreeMap<String, Pod> {
    live_pods(client, ns, cluster, "server").await
}

async fn events(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

struct Setup {
    client: Client,
    ns: String,
    api: Api<IntegrationCluster>,
    _operator: Operator,
}

impl Setup {
    async fn create(&self, yaml: &str) {
        create_yaml(&self.client, &self.ns, yaml)
            .await
            .expect("create cluster");
    }
}

async fn setup(prefix: &str) -> Setup {
    let client = admin().await;
    let ns = namespace(&client, prefix).await;
    let operator = Operator::start(&ns);
    let api = Api::namespaced(client.clone(), &ns);
    Setup {
        client,
        ns,
        api,
        _operator: operator,
    }
}

#[tokio::test]
async fn each_profile_comes_up_ready_with_all_its_objects() {
    let s = setup("profiles").await;
    for secret in ["orders-db-admin", "identity-db-admin"] {
        database_admin_secret(&s.client, &s.ns, secret, &postgres_admin_url()).await;
    }
    for sample in ["webmethods-is-stateful", "wso2-carbon", "generic"] {
        let path = format!(
            "{}/manifests/samples/{sample}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let yaml = std::fs::read_to_string(path).expect("sample");
        create_yaml(&s.client, &s.ns, &yaml)
            .await
            .expect("create sample");
    }
    for (name, replicas, claims, config_key) in [
        ("orders", 3, false, "application.properties"),
        ("identity", 3, false, "deployment.toml"),
        ("catalog", 3, true, "server.properties"),
    ] {
        let status = ready(&s.api, name).await;
        assert_eq!(status.ready_replicas, Some(replicas));
        assert_eq!(status.online_replicas, Some(replicas));
        assert_eq!(
            status.nodes.len(),
            usize::try_from(replicas).unwrap_or_default()
        );
        assert!(
            status
                .nodes
                .iter()
                .all(|n| n.config_digest.is_some() && n.ready)
        );
        assert_eq!(condition(&status, "Ready"), Some("True"));
        assert_eq!(condition(&status, "ConfigDrift"), Some("False"));

        let pods = server_pods(&s.client, &s.ns, name).await;
        let expected: BTreeSet<String> = (0..replicas).map(|i| format!("{name}-{i}")).collect();
        assert_eq!(pods.keys().cloned().collect::<BTreeSet<_>>(), expected);
        for pod in pods.values() {
            assert!(
                is_true(pod, "Ready") && is_true(pod, ONLINE),
                "{}",
                pod.name_any()
            );
            let gates = pod
                .spec
                .as_ref()
                .and_then(|s| s.readiness_gates.clone())
                .unwrap_or_default();
            assert_eq!(gates[0].condition_type, ONLINE);
            assert_eq!(pod.owner_references()[0].kind, "IntegrationCluster");
        }

        let services: Api<Service> = Api::namespaced(s.client.clone(), &s.ns);
        let admin = services
            .get(&format!("{name}-admin"))
            .await
            .expect("admin service");
        let admin_spec = admin.spec.expect("spec");
        assert_eq!(admin_spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(admin_spec.publish_not_ready_addresses, Some(true));
        services.get(name).await.expect("client service");
        let cms: Api<ConfigMap> = Api::namespaced(s.client.clone(), &s.ns);
        let cm = cms
            .get(&format!("{name}-config"))
            .await
            .expect("config map");
        assert!(cm.data.unwrap_or_default().contains_key(config_key));
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(s.client.clone(), &s.ns);
        pdbs.get(name).await.expect("disruption budget");
        let roles: Api<Role> = Api::namespaced(s.client.clone(), &s.ns);
        let role = roles
            .get(&format!("{name}-agent"))
            .await
            .expect("agent role");
        let pod_rule = &role.rules.expect("rules")[0];
        assert_eq!(pod_rule.verbs, ["get", "list", "watch", "patch"]);
        assert_eq!(
            pod_rule.resource_names.as_ref().map(Vec::len),
            Some(usize::try_from(replicas).unwrap_or_default())
        );
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &s.ns);
        let has_claim = pvcs
            .get_opt(&format!("data-{name}-0"))
            .await
            .expect("get claim")
            .is_some();
        assert_eq!(has_claim, claims, "{name}");

        // Client traffic reaches every online node.
        let slices: Api<EndpointSlice> = Api::namespaced(s.client.clone(), &s.ns);
        let ready_endpoints = wait_until(WAIT, "client endpoints", || async {
            let list = slices
                .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
                .await
                .ok()?;
            let n = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .count();
            (n == usize::try_from(replicas).unwrap_or_default()).then_some(n)
        })
        .await;
        assert_eq!(
            ready_endpoints,
            usize::try_from(replicas).unwrap_or_default()
        );
    }
    delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test]
async fn a_property_change_rolls_one_node_at_a_time() {
    let s = setup("rolling").await;
    s.create(&generic("c", 3, "")).await;
    let before = ready(&s.api, "c").await;
    let old_uids = uids(&server_pods(&s.client, &s.ns, "c").await);

    // Watch the online count while the rollout runs.
    let lowest = Arc::new(AtomicI32::new(i32::MAX));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (client, ns, lowest, done) =
            (s.client.clone(), s.ns.clone(), lowest.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let pods = server_pods(&client, &ns, "c").await;
                let online = pods.values().filter(|p| is_true(p, "Ready")).count();
                lowest.fetch_min(i32::try_from(online).unwrap_or_default(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    patch_spec(
        &s.api,
        "c",
        json!({"server": {"properties": {"threads": "64"}}}),
    )
    .await;
    let drifted = status_when(&s.api, "c", "drift seen", |st| {
        condition(st, "ConfigDrift") == Some("True")
    })
    .await;
    assert_eq!(condition(&drifted, "Progressing"), Some("True"));
    let after = status_when(&s.api, "c", "rolled and Ready", |st| {
        st.phase == Some(Phase::Ready) && st.config_digest != before.config_digest
    })
    .await;
    done.store(true, Ordering::Relaxed);
    watcher.await.expect("watcher");

    let new_uids = uids(&server_pods(&s.client, &s.ns, "c").await);
    for (node, uid) in &old_uids {
        assert_ne!(new_uids.get(node), Some(uid), "{node} was replaced");
    }
    assert!(
        lowest.load(Ordering::Relaxed) >= 2,
        "online nodes dropped to {} (replicas 3, maxUnavailable 1)",
        lowest.load(Ordering::Relaxed)
    );
    assert_eq!(condition(&after, "ConfigDrift"), Some("False"));
    assert_eq!(events(&s.client, &s.ns, "Replacing").await.len(), 3);
    delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test]
async fn a_hand_edited_pod_is_detected_and_replaced() {
    let s = setup("handedit").await;
    s.create(&generic("c", 3, "")).await;
    ready(&s.api, "c").await;
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let old = pods.get("c-1").await.expect("pod");
    pods.patch(
        "c-1",
        &PatchParams::default(),
        &Patch::Strategic(json!({"spec": {"containers": [{"name": "server", "image": "registry.example.com/srv:hacked"}]}})),
    )
    .await
    .expect("edit the image by hand");

    let drift = status_when(&s.api, "c", "drift on c-1", |st| {
        st.conditions
            .iter()
            .any(|c| c.type_ == "ConfigDrift" && c.status == "True" && c.message.contains("c-1"))
    })
    .await;
    assert!(
        drift
            .conditions
            .iter()
            .any(|c| c.message.contains("srv:hacked"))
    );
    status_when(&s.api, "c", "healed", |st| {
        st.phase == Some(Phase::Ready) && condition(st, "ConfigDrift") == Some("False")
    })
    .await;
    let new = pods.get("c-1").await.expect("pod");
    assert_ne!(new.metadata.uid, old.metadata.uid);
    assert!(!events(&s.client, &s.ns, "ConfigDrift").await.is_empty());
    delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test]
async fn a_node_that_never_becomes_ready_stalls_the_rollout() {
    let s = setup("stall").await;
    s.create(&generic(
        "c",
        3,
        "  rollout: {progressDeadlineSeconds: 5}\n",
    ))
    .await;
    ready(&s.api, "c").await;
    let old_uids = uids(&server_pods(&s.client, &s.ns, "c").await);
    // kwok never makes pods labelled sim=broken Ready: a bad image, in effect.
    patch_spec(
        &s.api,
        "c",
        json!({"podLabels": {"integration.dev/sim": "broken"}}),
    )
    .await;
    let stalled = status_when(&s.api, "c", "Stalled", |st| {
        condition(st, "Stalled") == Some("True")
    })
    .await;
    assert_eq!(stalled.phase, Some(Phase::Stalled));
    let reason = stalled
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    assert_eq!(reason.reason, "NodeNotReady");
    assert!(
        reason.message.contains("has not been Ready since"),
        "{}",
        reason.message
    );

    // Hold for a while: nothing else is touched.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = uids(&server_pods(&s.client, &s.ns, "c").await);
    let replaced: Vec<_> = old_uids
        .iter()
        .filter(|(n, u)| now.get(*n) != Some(*u))
        .collect();
    assert_eq!(
        replaced.len(),
        1,
        "exactly one node was replaced: {replaced:?}"
    );
    assert!(!events(&s.client, &s.ns, "RolloutStalled").await.is_empty());

    // Reverting the spec replaces the broken node and the cluster recovers.
    patch_spec(&s.api, "c", json!({"podLabels": null})).await;
    let recovered = ready(&s.api, "c").await;
    assert_eq!(condition(&recovered, "Stalled"), Some("False"));
    delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test]
async fn pause_holds_workload_changes_but_reports_them() {
    let s = setup("pause").await;
    s.create(&generic("c", 3, "")).await;
    ready(&s.api, "c").await;
    let old_uids = uids(&server_pods(&s.client, &s.ns, "c").await);
    patch_spec(
        &s.api,
        "c",
        json!({"paused": true, "server": {"properties": {"threads": "8"}}}),
    )
    .await;
    let held = status_when(&s.api, "c", "drift reported while paused", |st| {
        condition(st, "ConfigDrift") == Some("True")
    })
    .await;
    let progressing = held
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .expect("Progressing");
    assert_eq!(progressing.reason, "Paused");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        uids(&server_pods(&s.client, &s.ns, "c").await),
        old_uids,
        "no pod touched"
    );

    patch_spec(&s.api, "c", json!({"paused": false})).await;
    status_when(&s.api, "c", "rolled after unpause", |st| {
        st.phase == Some(Phase::Ready) && condition(st, "ConfigDrift") == Some("False")
    })
    .await;
    delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test]
async fn scaling_three_to_five_to_two() {
    let s = setup("scale").await;
    s.create(&generic("c", 3, "")).await;
    ready(&s.api, "c").await;
    patch_spec(&s.api, "c", json!({"replicas": 5})).await;
    let five = ready(&s.api, "c").await;
    assert_eq!(five.online_replicas, Some(5));
    let names: Vec<String> = server_pods(&s.client, &s.ns, "c")
        .await
        .into_keys()
        .collect();
    assert_eq!(names, ["c-0", "c-1", "c-2", "c-3", "c-4"]);

    // Down through the scale subresource, as `kubectl scale` (and an HPA) do.
    kubectl(&["scale", "ic", "c", "-n", &s.ns, "--replicas=2"]);
    let two = ready(&s.api, "c").await;
    assert_eq!(two.online_replicas, Some(2));
    assert_eq!(two.nodes.len(), 2);
    let names: Vec<String> = server_pods(&s.client, &s.ns, "c")
        .await
        .into_keys()
        .collect();
    assert_eq!(names, ["c-0", "c-1"]);
    let scale = kubectl(&[
        "get",
        "ic",
        "c",
        "-n",
        &s.ns,
        "--subresource=scale",
        "-o",
        "jsonpath={.spec.replicas} {.status.replicas} {.status.selector}",
    ]);
    assert_eq!(
        scale.trim(),
        "2 2 app.kubernetes.io/component=server,integration.dev/cluster=c"
    );
    // deletionPolicy defaults to Retain: the removed nodes' volumes stay.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &s.ns);
    for node in ["c-2", "c-3", "c-4"] {
        assert!(
            pvcs.get_opt(&format!("data-{node}"))
                .await
                .expect("get")
                .is_some(),
            "{node}"
        );
    }
    delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test]
async fn deletion_keeps_volumes_with_retain_and_removes_them_with_delete() {
    let s = setup("delete").await;
    s.create(&generic("keep", 2, "  deletionPolicy: Retain\n"))
        .await;
    s.create(&generic("drop", 2, "  deletionPolicy: Delete\n"))
        .await;
    ready(&s.api, "keep").await;
    ready(&s.api, "drop").await;
    for name in ["keep", "drop"] {
        s.api
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    wait_until(WAIT, "clusters gone", || async {
        let list = s.api.list(&ListParams::default()).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(s.client.clone(), &s.ns);
    wait_until(
        WAIT,
        "pods and Delete volumes garbage collected",
        || async {
            let pods = server_pods(&s.client, &s.ns, "keep").await.len()
                + server_pods(&s.client, &s.ns, "drop").await.len();
            let dropped = pvcs
                .get_opt("data-drop-0")
                .await
                .ok()?
                .is_none_or(|c| c.metadata.deletion_timestamp.is_some());
            (pods == 0 && dropped).then_some(())
        },
    )
    .await;
    for node in ["keep-0", "keep-1"] {
        let claim = pvcs
            .get(&format!("data-{node}"))
            .await
            .expect("retained claim");
        assert!(
            claim.owner_references().is_empty(),
            "{node} is no longer owned"
        );
        assert!(claim.metadata.deletion_timestamp.is_none());
    }
    let retained = events(&s.client, &s.ns, "VolumesRetained").await;
    assert!(retained.iter().any(|e| {
        e.note
            .as_deref()
            .unwrap_or_default()
            .contains("data-keep-0")
    }));
    delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test]
async fn a_settled_cluster_costs_no_writes() {
    let s = setup("steady").await;
    s.create(&generic("c", 3, "")).await;
    ready(&s.api, "c").await;
    // Let the last watch events of the settling cluster arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = operator_writes(&s.ns);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = operator_writes(&s.ns);
    let new: Vec<_> = after.iter().skip(before.len()).collect();
    assert!(
        new.is_empty(),
        "writes by the operator in a steady 30 s: {new:#?}"
    );
    assert!(
        !before.is_empty(),
        "the audit log shows the operator's earlier writes"
    );
    delete_namespace(&s.client, &s.ns).await;
}

/// A restarted operator reconciles what it finds as it is: its caches are
/// filled before the first reconcile, so it neither recreates pods that
/// exist nor rewrites a settled cluster's status.
#[tokio::test]
async fn a_restarted_operator_writes_nothing_to_a_settled_cluster() {
    let mut s = setup("restart").await;
    s.create(&generic("c", 3, "")).await;
    ready(&s.api, "c").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = operator_writes(&s.ns).len();
    s._operator = Operator::start(&s.ns);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after: Vec<String> = operator_writes(&s.ns).into_iter().skip(before).collect();
    assert!(
        after.is_empty(),
        "writes by a restarted operator to a settled cluster: {after:#?}"
    );
    delete_namespace(&s.client, &s.ns).await;
}

#[tokio::test]
async fn a_changed_config_source_rolls_the_nodes() {
    let s = setup("sources").await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "creds"},
        "stringData": {"token": "v1"},
    }))
    .expect("secret");
    secrets
        .create(&Default::default(), &secret)
        .await
        .expect("create secret");
    s.create(&generic(
        "src",
        2,
        "  server:\n    configFrom: [{secretRef: {name: creds}}]\n",
    ))
    .await;
    let before = ready(&s.api, "src").await;
    let pods_before = uids(&server_pods(&s.client, &s.ns, "src").await);

    // Rotate the Secret: the operator watches what the cluster refers to,
    // so it sees the change within seconds, not at its 5-minute resync.
    secrets
        .patch(
            "creds",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"token": "v2"}})),
        )
        .await
        .expect("rotate");
    let rotated = std::time::Instant::now();
    wait_until(Duration::from_secs(15), "the rotation noticed", || async {
        let status = s.api.get_status("src").await.ok()?.status?;
        (status.config_digest != before.config_digest).then_some(())
    })
    .await;
    eprintln!(
        "REPORT rotated Secret noticed after {:?}",
        rotated.elapsed()
    );
    let after = status_when(&s.api, "src", "rolled onto the new source", |st| {
        st.config_digest != before.config_digest && st.phase == Some(Phase::Ready)
    })
    .await;
    assert_ne!(after.config_digest, before.config_digest);
    let pods_after = uids(&server_pods(&s.client, &s.ns, "src").await);
    for (name, uid) in &pods_before {
        assert_ne!(pods_after.get(name), Some(uid), "{name} was not replaced");
    }
    assert!(
        !events(&s.client, &s.ns, "ConfigDrift").await.is_empty(),
        "the change is reported as drift"
    );
    delete_namespace(&s.client, &s.ns).await;
}
