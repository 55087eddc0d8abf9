//! End to end on a real node: the operator runs in-cluster from its chart
//! and image, its agent runs beside stand-in servers in real containers
//! (`tests/standin/server.rs`, which log every call they get), the managed
//! PostgreSQL runs from its image. Each scenario asserts what a person would
//! check, from the servers' own logs, the Service's endpoints and the API.
//!
//! Needs the real node `real-0` (hack/control-plane/up starts it as root)
//! and the images of hack/images/build; `make e2e` does both. Without a
//! real node the scenarios fail, unless INTEGRATION_E2E=skip says to skip.

#[path = "../support/mod.rs"]
mod support;

mod bed;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bed::*;
use integration_operator::api::{IntegrationCluster, NodeState, Phase};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;

const SCHEDULING: &str = "scheduling:\n    nodeSelector: {type: real}\n    tolerations: [{key: test-bed/real-node, operator: Exists, effect: NoSchedule}]";

/// A webMethods-profile cluster of stand-ins: MSR's probe and quiesce
/// paths, the administrator's Basic auth, a package from the package
/// server, a managed PostgreSQL from the local image.
fn orders() -> String {
    format!(
        r#"apiVersion: integration.dev/v1alpha1
kind: IntegrationCluster
metadata: {{name: orders, namespace: {NS}}}
spec:
  profile: webmethods-is
  mode: stateless
  replicas: 2
  image: {STANDIN_IMAGE}
  imagePullPolicy: Never
  server:
    adminSecretRef: {{name: orders-admin}}
    configFrom: [{{secretRef: {{name: orders-admin}}}}]
  packages:
  - name: WmStandinDemo
    version: "1.0"
    source: {{url: "http://packages.{NS}.svc.cluster.local/files/WmStandinDemo.zip"}}
    sha256: {sha}
  database:
    mode: managed
    components: [ISInternal]
    managed: {{image: {POSTGRES_IMAGE}, storage: 1Gi}}
  rollout: {{progressDeadlineSeconds: 120}}
  nodes: {{drainTimeoutSeconds: 120}}
  {SCHEDULING}
"#,
        sha = package_sha256()
    )
}

/// A generic cluster of stand-ins with every hook, and a single-node
/// listener with short timings so fail-over is quick to watch.
fn catalog() -> String {
    format!(
        r#"apiVersion: integration.dev/v1alpha1
kind: IntegrationCluster
metadata: {{name: catalog, namespace: {NS}}}
spec:
  profile: generic
  mode: stateless
  replicas: 3
  image: {STANDIN_IMAGE}
  imagePullPolicy: Never
  server:
    ports: {{primary: 8080, diagnostic: 8081}}
    env: {{PRIMARY_PORT: "8080", DIAGNOSTIC_PORT: "8081", STANDIN_WORK_MS: "50"}}
    properties: {{threads: "32"}}
    health: {{readinessPath: /health/readiness, livenessPath: /health/liveness}}
    hooks:
      quiescePath: /quiesce
      resumePath: /resume
      inFlightPath: /inflight
      listenerEnablePath: /listener/enable
      listenerDisablePath: /listener/disable
      listenerRenewPath: /listener/renew
  listeners:
  - {{name: orders-in, mode: singleNode, leaseDurationSeconds: 6, renewDeadlineSeconds: 4, retryPeriodSeconds: 1}}
  rollout: {{maxUnavailable: 1, progressDeadlineSeconds: 120}}
  {SCHEDULING}
"#
    )
}

fn admin_secret() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: orders-admin, namespace: {NS}}}\n\
         stringData: {{username: Administrator, password: e2e-secret}}\n"
    )
}

async fn api(client: &Client) -> Api<IntegrationCluster> {
    Api::namespaced(client.clone(), NS)
}

/// Applies the cluster (unchanged if it exists) and waits until it is Ready.
async fn ensure(client: &Client, name: &str) -> IntegrationCluster {
    if name == "orders" {
        apply(&admin_secret());
        apply(&orders());
    } else {
        apply(&catalog());
    }
    let clusters = api(client).await;
    wait_until(
        Duration::from_secs(240),
        &format!("{name} Ready"),
        || async {
            let ic = clusters.get(name).await.ok()?;
            let status = ic.status.as_ref()?;
            (status.observed_generation == ic.metadata.generation
                && status.phase == Some(Phase::Ready))
            .then_some(ic)
        },
    )
    .await
}

async fn node_state(client: &Client, cluster: &str, node: &str) -> Option<NodeState> {
    let ic = api(client).await.get(cluster).await.ok()?;
    ic.status?
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.state)
}

async fn wait_state(client: &Client, cluster: &str, node: &str, state: NodeState) {
    wait_until(
        Duration::from_secs(120),
        &format!("{node} {state:?}"),
        || async { (node_state(client, cluster, node).await == Some(state)).then_some(()) },
    )
    .await;
}

async fn patch_nodes(client: &Client, cluster: &str, nodes: serde_json::Value) {
    api(client)
        .await
        .patch(
            cluster,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": nodes}})),
        )
        .await
        .expect("patch spec.nodes");
}

/// Each node's configuration digest (per node: each has its own file).
fn node_digests(ic: &IntegrationCluster) -> BTreeMap<String, Option<String>> {
    ic.status
        .iter()
        .flat_map(|s| s.nodes.iter())
        .map(|n| (n.name.clone(), n.config_digest.clone()))
        .collect()
}

/// Waits until every node of `cluster` runs a configuration other than
/// in `before`, and the cluster is Ready without drift again.
async fn rolled(client: &Client, cluster: &str, before: &IntegrationCluster, timeout: Duration) {
    let old = node_digests(before);
    let clusters = api(client).await;
    wait_until(
        timeout,
        &format!("{cluster}: every node replaced"),
        || async {
            let ic = clusters.get(cluster).await.ok()?;
            let s = ic.status.as_ref()?;
            let drift = s
                .conditions
                .iter()
                .any(|c| c.type_ == "ConfigDrift" && c.status == "True");
            let now = node_digests(&ic);
            (s.observed_generation == ic.metadata.generation
                && s.phase == Some(Phase::Ready)
                && !drift
                && now.len() == old.len()
                && now.iter().all(|(n, d)| old.get(n) != Some(d)))
            .then_some(())
        },
    )
    .await;
}

async fn change_a_property(client: &Client, cluster: &str) {
    let threads = format!("{}", 100 + now_ms() % 900);
    api(client)
        .await
        .patch(
            cluster,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"server": {"properties": {"threads": threads}}}})),
        )
        .await
        .expect("change a property");
}

/// The pod dies as on a machine that fails: its processes are SIGKILLed,
/// so they release nothing, and the pod is deleted at once, so the kubelet
/// does not restart them under the same identity.
async fn crash(pods: &Api<Pod>, name: &str) {
    let pod = pods.get(name).await.expect("the pod");
    kill_containers(&pod);
    pods.delete(
        name,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .expect("delete the pod");
}

async fn setup() -> Option<(Client, tokio::sync::MutexGuard<'static, ()>)> {
    let guard = SERIAL.lock().await;
    if !tokio::task::spawn_blocking(ready).await.expect("setup") {
        return None;
    }
    Some((client_for(&admin_kubeconfig()).await, guard))
}

#[tokio::test]
async fn the_operator_runs_in_cluster_and_a_killed_leader_hands_over() {
    let Some((client, _serial)) = setup().await else {
        return;
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
    let replicas = pods
        .list(
            &kube::api::ListParams::default().labels("app.kubernetes.io/name=integration-operator"),
        )
        .await
        .expect("operator pods")
        .items;
    assert_eq!(replicas.len(), 2, "the chart runs two replicas");
    for pod in &replicas {
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(NODE),
            "{} runs in a real container",
            pod.name_any()
        );
    }
    let leader = wait_until(Duration::from_secs(60), "a leader", || {
        lease_holder(&client, OPERATOR_NS, LEADER_LEASE)
    })
    .await;
    // The leader's pod dies without a chance to release the Lease. (A
    // SIGKILL of its container alone hands nothing over: the kubelet
    // restarts it at once under the same identity, which holds the Lease.)
    let killed = Instant::now();
    crash(&pods, &leader).await;
    let next = wait_until(Duration::from_secs(90), "another leader", || async {
        lease_holder(&client, OPERATOR_NS, LEADER_LEASE)
            .await
            .filter(|h| *h != leader)
    })
    .await;
    println!(
        "REPORT leader pod crashed -> {next} holds the Lease after {} ms",
        bed::ms_since(killed)
    );
    // And it reconciles: a change made now rolls out.
    let before = ensure(&client, "catalog").await;
    change_a_property(&client, "catalog").await;
    rolled(&client, "catalog", &before, Duration::from_secs(180)).await;
}

#[tokio::test]
async fn clusters_start_on_the_real_node_with_packages_agents_and_a_managed_database() {
    let Some((client, _serial)) = setup().await else {
        return;
    };
    let started = Instant::now();
    let orders = ensure(&client, "orders").await;
    let catalog = ensure(&client, "catalog").await;
    println!(
        "REPORT orders and catalog applied -> Ready in {} ms",
        bed::ms_since(started)
    );
    for ic in [&orders, &catalog] {
        let name = ic.name_any();
        let status = ic.status.as_ref().expect("status");
        let pods = server_pods(&client, &name).await;
        assert_eq!(pods.len(), usize::try_from(ic.spec.replicas).unwrap_or(0));
        for pod in &pods {
            let spec = pod.spec.as_ref().expect("spec");
            assert_eq!(spec.node_name.as_deref(), Some(NODE));
            let status_of = pod.status.as_ref().expect("pod status");
            // The init container really ran and installed the package set.
            let init = status_of
                .init_container_statuses
                .iter()
                .flatten()
                .find(|c| c.name == "install-packages")
                .expect("install-packages ran");
            assert_eq!(
                init.state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .map(|t| t.exit_code),
                Some(0),
                "{}: {init:?}",
                pod.name_any()
            );
            // Ready through the readiness gate, with real containers.
            assert!(workload_ready(pod), "{} Ready", pod.name_any());
            assert!(
                status_of
                    .container_statuses
                    .iter()
                    .flatten()
                    .all(|c| c.ready && c.container_id.is_some()),
                "{}",
                pod.name_any()
            );
        }
        // The agent reports what is installed: the digests the spec asks for.
        for node in &status.nodes {
            assert_eq!(
                node.packages_digest.as_deref(),
                status.packages_digest.as_deref(),
                "{}: the agent's digest of the installed packages",
                node.name
            );
        }
    }

    // The managed PostgreSQL runs in a real container, and the operator
    // provisioned the cluster's database through it.
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let db = sets
        .get("orders-database")
        .await
        .expect("database StatefulSet");
    assert_eq!(db.status.and_then(|s| s.ready_replicas), Some(1));
    let database = orders
        .status
        .as_ref()
        .and_then(|s| s.database.clone())
        .expect("status.database");
    assert!(database.ready, "{database:?}");
    assert_eq!(
        database.host.as_deref(),
        Some(format!("orders-database.{NS}.svc:5432").as_str())
    );
    assert!(database.schema_version.is_some(), "{database:?}");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    secrets
        .get("orders-database-credentials")
        .await
        .expect("the cluster's own credentials");
    // What PostgreSQL holds, asked inside its container.
    let tables = psql(
        database.database.as_deref().unwrap_or_default(),
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'integration_operator' ORDER BY 1",
    );
    assert!(tables.contains("gd_work"), "{tables}");
}

/// Runs `sql` as the superuser in the cluster database `database`, inside
/// the managed PostgreSQL's container; what psql printed.
fn psql(database: &str, sql: &str) -> String {
    let command = format!(
        "PGPASSWORD=\"$POSTGRES_PASSWORD\" psql -U postgres -h 127.0.0.1 -At -v ON_ERROR_STOP=1 -d {database} -c \"{sql}\""
    );
    kubectl(&[
        "exec",
        "-n",
        NS,
        "orders-database-0",
        "--",
        "sh",
        "-c",
        &command,
    ])
}

fn workload_ready(pod: &Pod) -> bool {
    integration_operator::workload::is_ready(pod) && integration_operator::workload::is_online(pod)
}

#[tokio::test]
async fn node_workflows_quiesce_a_real_server_out_of_traffic_and_resume_it_before_it_returns() {
    let Some((client, _serial)) = setup().await else {
        return;
    };
    ensure(&client, "orders").await;
    let logs = ServerLogs::start(&client, "integration.dev/cluster=orders");
    let seen = Observer::start(&client, "orders", "orders");
    tokio::time::sleep(Duration::from_secs(2)).await; // watches listed
    let node = "orders-1";

    // offline: out of the client Service, then quiesced (MSR's service,
    // with the administrator's credentials: the stand-in refuses others).
    let t0 = now_ms();
    patch_nodes(&client, "orders", json!({"offline": [node]})).await;
    wait_state(&client, "orders", node, NodeState::Offline).await;
    let quiesced = logs
        .when(node, "quiesce", t0, Duration::from_secs(30))
        .await;
    let left = seen.left(node, t0).expect("left the endpoints");
    assert!(
        left <= quiesced,
        "the node left the client Service ({left}) before it was quiesced ({quiesced})"
    );
    assert!(
        logs.of(node, &["unauthorized"]).is_empty(),
        "the agent presents the admin Secret's credentials"
    );

    // online: resumed, then back in the client Service.
    let t1 = now_ms();
    patch_nodes(&client, "orders", json!({"offline": []})).await;
    wait_state(&client, "orders", node, NodeState::Online).await;
    let resumed = logs.when(node, "resume", t1, Duration::from_secs(30)).await;
    let joined = wait_until(Duration::from_secs(30), "back in the endpoints", || async {
        seen.joined(node, t1)
    })
    .await;
    assert!(
        resumed <= joined,
        "resumed ({resumed}) before it returned to the client Service ({joined})"
    );

    // remove: out of traffic, quiesced, its guaranteed-delivery work in
    // the managed database finished, then deleted.
    let db = &integration_operator::naming::database_role("e2e", "orders");
    psql(
        db,
        &format!(
            "INSERT INTO integration_operator.gd_work (transaction_id, owner_node, state) \
             VALUES ('e2e-{t}', '{node}', 'running')",
            t = now_ms()
        ),
    );
    let t2 = now_ms();
    patch_nodes(&client, "orders", json!({"remove": [node]})).await;
    wait_until(
        Duration::from_secs(60),
        "removal waiting for guaranteed-delivery work",
        || async {
            let ic = api(&client).await.get("orders").await.ok()?;
            ic.status?
                .nodes
                .iter()
                .find(|n| n.name == node)?
                .message
                .as_deref()?
                .contains("1 unfinished guaranteed-delivery")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(seen.deleted_at(node), None, "deleted with work unfinished");
    psql(
        db,
        &format!(
            "UPDATE integration_operator.gd_work SET state = 'done' WHERE owner_node = '{node}'"
        ),
    );
    wait_state(&client, "orders", node, NodeState::Removed).await;
    let quiesced = logs
        .when(node, "quiesce", t2, Duration::from_secs(30))
        .await;
    let left = seen.left(node, t2).expect("left the endpoints");
    let deleted = seen.deleted_at(node).expect("the pod was deleted");
    assert!(
        left <= quiesced && quiesced <= deleted,
        "left {left} <= quiesced {quiesced} <= deleted {deleted}"
    );
    // The server shut down as a server does: on SIGTERM, after the quiesce.
    let exit = logs
        .when(node, "sigterm", t2, Duration::from_secs(30))
        .await;
    assert!(quiesced <= exit);

    // add back: returns offline (seed 003), online on request.
    let t3 = now_ms();
    patch_nodes(&client, "orders", json!({"remove": [], "offline": [node]})).await;
    wait_state(&client, "orders", node, NodeState::Offline).await;
    logs.when(node, "start", t3, Duration::from_secs(60)).await;
    assert_eq!(
        seen.joined(node, t3),
        None,
        "an added-back node stays out of traffic"
    );
    let t4 = now_ms();
    patch_nodes(&client, "orders", json!({"offline": []})).await;
    wait_state(&client, "orders", node, NodeState::Online).await;
    let joined = wait_until(Duration::from_secs(30), "back in the endpoints", || async {
        seen.joined(node, t4)
    })
    .await;
    println!(
        "REPORT offline/online/remove/add-back of {node}: quiesce {} ms after leaving the endpoints; back in them {} ms after the request",
        quiesced - left,
        joined - t4
    );
    ensure(&client, "orders").await;
}

#[tokio::test]
async fn a_rolling_change_under_client_load() {
    let Some((client, _serial)) = setup().await else {
        return;
    };
    let before = ensure(&client, "catalog").await;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let ip = services
        .get("catalog")
        .await
        .expect("client Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("ClusterIP");
    let seen = Observer::start(&client, "catalog", "catalog");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(format!("{ip}:8080"), 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = now_ms();
    let started = Instant::now();
    change_a_property(&client, "catalog").await;
    rolled(&client, "catalog", &before, Duration::from_secs(300)).await;
    let took = bed::ms_since(started);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let load = clients.await.expect("load loop");
    let min_ready = seen.min_ready(t0);
    println!(
        "REPORT rolling change of 3 nodes under 4 clients: {took} ms, {} requests ok, {} failed, fewest ready endpoints {min_ready}; failures: {:?}",
        load.ok, load.failed, load.failures
    );
    let deleted = seen.deleted.lock().map(|d| d.len()).unwrap_or_default();
    assert_eq!(deleted, 3, "every node was replaced");
    assert!(load.ok > 100, "the loop ran: {load:?}");
    assert!(
        min_ready >= 2,
        "never fewer than replicas - maxUnavailable ready"
    );
    assert_eq!(
        load.failed, 0,
        "no client request failed: {:?}",
        load.failures
    );
}

#[tokio::test]
async fn a_single_node_listener_moves_when_its_holder_dies_or_is_deleted() {
    let Some((client, _serial)) = setup().await else {
        return;
    };
    ensure(&client, "catalog").await;
    let logs = ServerLogs::start(&client, "integration.dev/cluster=catalog");
    let lease = &integration_operator::listeners::lease_name("catalog", "orders-in");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for how in ["SIGKILL of its containers", "deletion of its pod"] {
        // The holder identity is `<pod>/<pod uid>`.
        let holder = wait_until(Duration::from_secs(60), "a holder", || async {
            lease_holder(&client, NS, lease)
                .await
                .map(|h| integration_operator::listeners::holder_node(&h).to_owned())
        })
        .await;
        logs.when(&holder, "listener-enable", 0, Duration::from_secs(30))
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pod = pods.get(&holder).await.expect("holder pod");
        let t0 = now_ms();
        if how.starts_with("SIGKILL") {
            kill_containers(&pod);
        } else {
            pods.delete(&holder, &DeleteParams::default())
                .await
                .expect("delete the holder");
        }
        // A killed holder's containers restart under the same identity and
        // may win again; a deleted one releases, and another node takes over.
        let (next, enabled) = wait_until(Duration::from_secs(60), "a new enable", || async {
            logs.all()
                .into_iter()
                .find(|l| l.at > t0 && l.event == "listener-enable")
                .map(|l| (l.pod, l.at))
        })
        .await;
        if how.starts_with("deletion") {
            assert_ne!(next, holder, "a deleted pod does not listen again");
        }
        // When the old holder stopped: at its disable, at the kill, at the
        // exit of its server process, or at the `until` of its last enable
        // or renewal, whichever came first. (A deleted pod's server may exit
        // before its agent's disable reaches it: a server that is gone does
        // not listen.)
        let last = logs
            .of(
                &holder,
                &["listener-enable", "listener-renew", "listener-disable"],
            )
            .into_iter()
            .rfind(|l| l.at < enabled);
        let mut stopped = match &last {
            Some(l) if l.event == "listener-disable" => l.at,
            Some(l) => l
                .field("until")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(i64::MAX),
            None => t0,
        };
        if how.starts_with("SIGKILL") {
            stopped = stopped.min(t0);
        }
        if let Some(exit) = logs.of(&holder, &["exit"]).into_iter().find(|l| l.at >= t0) {
            stopped = stopped.min(exit.at);
        }
        let overlap = (stopped - enabled).max(0);
        println!(
            "REPORT listener after {how} of {holder}: {next} enabled it after {} ms, overlap {overlap} ms",
            enabled - t0
        );
        assert_eq!(overlap, 0, "two servers listened at once");
        ensure(&client, "catalog").await;
    }
}

#[tokio::test]
async fn an_operator_killed_mid_rolling_change_is_finished_by_the_other_replica() {
    let Some((client, _serial)) = setup().await else {
        return;
    };
    let before = ensure(&client, "catalog").await;
    change_a_property(&client, "catalog").await;
    // Once the first node was replaced, the leader's pod dies.
    let old = node_digests(&before);
    let clusters = api(&client).await;
    wait_until(
        Duration::from_secs(120),
        "a first node replaced",
        || async {
            let ic = clusters.get("catalog").await.ok()?;
            node_digests(&ic)
                .iter()
                .any(|(n, d)| old.get(n).is_some_and(|o| o != d))
                .then_some(())
        },
    )
    .await;
    let leader = lease_holder(&client, OPERATOR_NS, LEADER_LEASE)
        .await
        .expect("a leader");
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
    crash(&pods, &leader).await;
    let killed = Instant::now();
    rolled(&client, "catalog", &before, Duration::from_secs(300)).await;
    let finisher = lease_holder(&client, OPERATOR_NS, LEADER_LEASE)
        .await
        .expect("a leader");
    assert_ne!(finisher, leader, "the other replica took over");
    println!(
        "REPORT leader {leader} crashed mid-rollout; {finisher} finished it {} ms later",
        bed::ms_since(killed)
    );
}

/// The server container runs the user's image and faces the network, and
/// the agent's Role may patch pods: the ServiceAccount token reaches only
/// the agent's containers, which still report. The pods come from this
/// build's operator, a local process watching a namespace of its own, so
/// the scenario needs no rebuilt operator image and leaves the chart's
/// namespaces to the other scenarios.
#[tokio::test]
async fn only_the_agent_gets_the_service_account_token_in_a_real_pod() {
    if !tokio::task::spawn_blocking(real_node)
        .await
        .expect("node check")
    {
        return;
    }
    let client = admin().await;
    let ns = namespace(&client, "token").await;
    let _operator = Operator::start_with(&ns, "token", &["--agent-image", OPERATOR_IMAGE]);
    // The stand-in's start line says whether its files directory exists:
    // pointed at the token's directory, it tells what the server sees.
    let yaml = format!(
        r#"apiVersion: integration.dev/v1alpha1
kind: IntegrationCluster
metadata: {{name: tok}}
spec:
  profile: generic
  mode: stateless
  replicas: 1
  image: {STANDIN_IMAGE}
  imagePullPolicy: Never
  server:
    ports: {{primary: 8080, diagnostic: 8081}}
    env: {{PRIMARY_PORT: "8080", DIAGNOSTIC_PORT: "8081", STANDIN_FILES_DIR: /var/run/secrets/kubernetes.io/serviceaccount}}
    health: {{readinessPath: /health/readiness, livenessPath: /health/liveness}}
  {SCHEDULING}
"#
    );
    create_yaml(&client, &ns, &yaml).await.expect("create");
    let clusters: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    wait_until(Duration::from_secs(240), "tok Ready", || async {
        let ic = clusters.get("tok").await.ok()?;
        let status = ic.status?;
        (status.phase == Some(Phase::Ready)).then_some(())
    })
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods.get("tok-0").await.expect("tok-0");
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("integration.dev/server-healthy")
            .map(String::as_str),
        Some("true"),
        "the agent reports through the API with its token: {annotations:?}"
    );
    let log = kubectl(&["logs", "-n", &ns, "tok-0", "-c", "server"]);
    let start = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["event"] == "start")
        .unwrap_or_else(|| panic!("no start line in the server's log: {log}"));
    assert_eq!(
        start["files"], false,
        "the server container sees /var/run/secrets/kubernetes.io/serviceaccount: {start}"
    );
    let spec = pod.spec.as_ref().expect("spec");
    let token_mounted = |name: &str| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("container {name}"))
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount")
    };
    assert!(!token_mounted("server"), "as admitted: {spec:?}");
    assert!(token_mounted("agent"));
    assert!(token_mounted("install-packages"));
    // While the operator runs to remove its finalizer.
    clusters
        .delete("tok", &DeleteParams::default())
        .await
        .expect("delete");
    wait_until(Duration::from_secs(60), "tok deleted", || async {
        clusters.get_opt("tok").await.ok()?.is_none().then_some(())
    })
    .await;
    delete_namespace(&client, &ns).await;
}
