//! The in-pod agent with the operator: agents run as local processes that
//! impersonate the kwok pods (POD_NAME/POD_NAMESPACE), each driving a
//! stand-in server whose in-flight work a test holds open.

#[path = "support/standin.rs"]
mod standin;
mod support;

use std::time::Duration;

use integration_operator::api::{IntegrationCluster, IntegrationClusterStatus, NodeState, Phase};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use standin::StandIn;
use support::*;

fn node<'a>(
    status: &'a IntegrationClusterStatus,
    name: &str,
) -> Option<&'a integration_operator::api::NodeStatus> {
    status.nodes.iter().find(|n| n.name == name)
}

fn in_state(status: &IntegrationClusterStatus, name: &str, state: NodeState) -> bool {
    node(status, name).is_some_and(|n| n.state == state)
}

/// A Ready 3-node cluster whose pods each have an agent and a stand-in.
struct Bed {
    client: Client,
    ns: String,
    api: Api<IntegrationCluster>,
    servers: Vec<StandIn>,
    _processes: Vec<Operator>,
}

async fn bed(prefix: &str, extra: &str) -> Bed {
    bed_with(prefix, extra, false).await
}

/// With `auth`, every stand-in demands Basic Administrator:manage on its
/// admin hooks and every agent gets those credentials.
async fn bed_with(prefix: &str, extra: &str, auth: bool) -> Bed {
    let client = admin().await;
    let ns = namespace(&client, prefix).await;
    let mut processes = vec![Operator::start(&ns)];
    let yaml = format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: c}}\n\
         spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: 3\n{extra}"
    );
    create_yaml(&client, &ns, &yaml).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "c", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    let mut servers = Vec::new();
    for i in 0..3 {
        let server = StandIn::start().await;
        let pod = format!("c-{i}");
        if auth {
            server.lock().authorization = Some("Basic QWRtaW5pc3RyYXRvcjptYW5hZ2U=".into());
            let credentials = ["--username", "Administrator", "--password", "manage"];
            processes.push(Operator::agent_with(
                &ns,
                &pod,
                &server.address,
                &credentials,
            ));
        } else {
            processes.push(Operator::agent(&ns, &pod, &server.address));
        }
        servers.push(server);
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    wait_until(Duration::from_secs(30), "agents reporting", || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        let reporting = list
            .items
            .iter()
            .filter(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.get("integration.dev/in-flight").is_some())
            })
            .count();
        (reporting == 3).then_some(())
    })
    .await;
    Bed {
        client,
        ns,
        api,
        servers,
        _processes: processes,
    }
}

async fn spec(api: &Api<IntegrationCluster>, spec: serde_json::Value) {
    api.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
    .expect("patch spec");
}

#[tokio::test]
async fn offline_quiesces_the_server_and_online_resumes_it() {
    // The hooks need the administrator's credentials, as MSR's do.
    let b = bed_with("agent-offline", "", true).await;
    spec(&b.api, json!({"nodes": {"offline": ["c-0"]}})).await;
    status_when(&b.api, "c", "c-0 Offline", |s| {
        in_state(s, "c-0", NodeState::Offline)
    })
    .await;
    assert!(
        b.servers[0].lock().quiesced,
        "the agent quiesced the server"
    );
    assert!(!b.servers[1].lock().quiesced);

    spec(&b.api, json!({"nodes": {"offline": []}})).await;
    status_when(&b.api, "c", "c-0 Online", |s| {
        in_state(s, "c-0", NodeState::Online)
    })
    .await;
    assert_eq!(b.servers[0].lock().calls, ["quiesce", "resume"]);
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn remove_waits_for_in_flight_work_and_completes_when_it_is_released() {
    let b = bed("agent-remove", "").await;
    b.servers[2].set_in_flight(2);
    spec(&b.api, json!({"nodes": {"remove": ["c-2"]}})).await;
    let waiting = status_when(&b.api, "c", "c-2 waits for its work", |s| {
        node(s, "c-2").is_some_and(|n| {
            n.message.as_deref() == Some("removing: waiting for 2 requests in flight")
        })
    })
    .await;
    assert_eq!(
        node(&waiting, "c-2").map(|n| n.state),
        Some(NodeState::Draining)
    );
    assert!(b.servers[2].lock().quiesced);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
    assert!(
        pods.get_opt("c-2").await.expect("get").is_some(),
        "not removed while work is in flight"
    );

    b.servers[2].set_in_flight(0);
    status_when(&b.api, "c", "c-2 Removed", |s| {
        in_state(s, "c-2", NodeState::Removed)
    })
    .await;
    assert!(pods.get_opt("c-2").await.expect("get").is_none());
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_drain_timeout_stalls_and_force_continues() {
    let b = bed("agent-timeout", "  nodes: {drainTimeoutSeconds: 2}\n").await;
    b.servers[1].set_in_flight(1);
    spec(&b.api, json!({"nodes": {"remove": ["c-1"]}})).await;
    let stalled = status_when(&b.api, "c", "Stalled on the drain timeout", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Stalled" && c.status == "True")
    })
    .await;
    let condition = stalled
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .expect("Stalled");
    assert!(
        condition
            .message
            .contains("c-1 has not drained within nodes.drainTimeoutSeconds (2s)"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("1 requests in flight"),
        "{}",
        condition.message
    );

    b.api
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"integration.dev/force": "c-1"}}})),
        )
        .await
        .expect("force");
    let done = status_when(&b.api, "c", "c-1 Removed", |s| {
        in_state(s, "c-1", NodeState::Removed)
    })
    .await;
    assert!(
        done.conditions
            .iter()
            .any(|c| c.type_ == "Stalled" && c.status == "False")
    );
    let events: Api<Event> = Api::namespaced(b.client.clone(), &b.ns);
    let forced = events.list(&ListParams::default()).await.expect("events");
    assert!(
        forced
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ForcedRemoval"))
    );
    delete_namespace(&b.client, &b.ns).await;
}

/// The uid of pod `name`, if it exists and is not terminating.
async fn live_uid(pods: &Api<Pod>, name: &str) -> Option<String> {
    let pod = pods.get_opt(name).await.ok()??;
    pod.metadata
        .deletion_timestamp
        .is_none()
        .then_some(pod.metadata.uid)?
}

/// Waits until `node`'s pod was quiesced and still holds its work, checks
/// it is not deleted while that lasts, then lets the work finish and waits
/// for the pod to go.
async fn drains_before_deleted(b: &Bed, node: usize, old_uid: &str) {
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
    let name = format!("c-{node}");
    wait_until(Duration::from_secs(60), "quiesced", || async {
        b.servers[node].lock().quiesced.then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        live_uid(&pods, &name).await.as_deref(),
        Some(old_uid),
        "{name} deleted with a request in flight"
    );
    b.servers[node].set_in_flight(0);
    wait_until(Duration::from_secs(60), "deleted once drained", || async {
        (live_uid(&pods, &name).await.as_deref() != Some(old_uid)).then_some(())
    })
    .await;
}

/// In the API server's order, the operator took `pod` out of the client
/// Service before it deleted it.
fn out_of_service_before_deleted(ns: &str, pod: &str) {
    let writes = operator_writes(ns);
    let gate = writes
        .iter()
        .position(|w| *w == format!("patch pods/status {pod}"));
    let delete = writes
        .iter()
        .position(|w| *w == format!("delete pods/ {pod}"));
    assert!(
        matches!((gate, delete), (Some(g), Some(d)) if g < d),
        "{pod}: gate {gate:?}, delete {delete:?} in {writes:#?}"
    );
}

#[tokio::test]
async fn a_rolling_change_quiesces_and_drains_each_node_before_it_deletes_it() {
    let b = bed("agent-roll", "").await;
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
    let mut uids = Vec::new();
    for (i, server) in b.servers.iter().enumerate() {
        server.set_in_flight(1);
        uids.push(live_uid(&pods, &format!("c-{i}")).await.expect("uid"));
    }
    spec(
        &b.api,
        json!({"server": {"properties": {"watt.test.rolled": "1"}}}),
    )
    .await;
    let mut replaced = Vec::new();
    for _ in 0..3 {
        let node = wait_until(Duration::from_secs(90), "next node quiesced", || async {
            let quiesced: Vec<usize> = (0..3)
                .filter(|i| !replaced.contains(i) && b.servers[*i].lock().quiesced)
                .collect();
            quiesced.first().copied()
        })
        .await;
        // One node at a time (rollout.maxUnavailable 1): the others serve.
        for other in (0..3).filter(|i| *i != node) {
            assert!(
                !b.servers[other].lock().quiesced,
                "c-{other} quiesced beside c-{node}"
            );
        }
        drains_before_deleted(&b, node, &uids[node]).await;
        replaced.push(node);
    }
    status_when(&b.api, "c", "Ready on the new configuration", |s| {
        s.phase == Some(Phase::Ready) && s.nodes.iter().all(|n| n.state == NodeState::Online)
    })
    .await;
    for (i, server) in b.servers.iter().enumerate() {
        assert_eq!(server.lock().calls, ["quiesce", "resume"], "c-{i}");
        out_of_service_before_deleted(&b.ns, &format!("c-{i}"));
    }
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_scale_down_quiesces_and_drains_each_leaving_node_before_it_deletes_it() {
    let b = bed("agent-scaledown", "").await;
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
    let mut uids = Vec::new();
    for (i, server) in b.servers.iter().enumerate() {
        server.set_in_flight(1);
        uids.push(live_uid(&pods, &format!("c-{i}")).await.expect("uid"));
    }
    spec(&b.api, json!({"replicas": 1})).await;
    drains_before_deleted(&b, 2, &uids[2]).await;
    drains_before_deleted(&b, 1, &uids[1]).await;
    let done = status_when(&b.api, "c", "one node left", |s| {
        s.phase == Some(Phase::Ready) && s.nodes.len() == 1
    })
    .await;
    assert_eq!(done.nodes[0].name, "c-0");
    assert!(!b.servers[0].lock().quiesced, "the remaining node serves");
    assert_eq!(
        live_uid(&pods, "c-0").await.as_deref(),
        Some(uids[0].as_str())
    );
    for pod in ["c-1", "c-2"] {
        out_of_service_before_deleted(&b.ns, pod);
    }
    delete_namespace(&b.client, &b.ns).await;
}

/// SIGKILLs the operator (no chance to save anything beyond what status and
/// the objects hold) and starts a new one.
fn kill_and_restart(b: &mut Bed) {
    let operator = b._processes.remove(0);
    let pid = operator.pid().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    drop(operator);
    b._processes.insert(0, Operator::start(&b.ns));
}

#[tokio::test]
async fn an_operator_killed_at_each_workflow_step_finishes_the_workflow_after_a_restart() {
    let mut b = bed("agent-sigkill", "").await;
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);

    // offline, killed while the server drains its work
    b.servers[1].set_in_flight(1);
    spec(&b.api, json!({"nodes": {"offline": ["c-1"]}})).await;
    status_when(&b.api, "c", "c-1 draining", |s| {
        in_state(s, "c-1", NodeState::Draining)
    })
    .await;
    kill_and_restart(&mut b);
    b.servers[1].set_in_flight(0);
    status_when(&b.api, "c", "c-1 Offline", |s| {
        in_state(s, "c-1", NodeState::Offline)
    })
    .await;

    // remove, killed while draining
    b.servers[0].set_in_flight(1);
    spec(
        &b.api,
        json!({"nodes": {"offline": ["c-1"], "remove": ["c-0"]}}),
    )
    .await;
    status_when(&b.api, "c", "c-0 draining", |s| {
        in_state(s, "c-0", NodeState::Draining)
    })
    .await;
    kill_and_restart(&mut b);
    b.servers[0].set_in_flight(0);
    status_when(&b.api, "c", "c-0 Removed", |s| {
        in_state(s, "c-0", NodeState::Removed)
    })
    .await;
    assert!(pods.get_opt("c-0").await.expect("get").is_none());

    // online, killed right after asking: c-1 resumes and comes back
    spec(&b.api, json!({"nodes": {"offline": [], "remove": ["c-0"]}})).await;
    kill_and_restart(&mut b);
    let done = status_when(&b.api, "c", "c-1 Online", |s| {
        in_state(s, "c-1", NodeState::Online)
    })
    .await;
    assert_eq!(b.servers[1].lock().calls, ["quiesce", "resume"]);
    assert_eq!(done.phase, Some(Phase::Ready));
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_corrupt_package_stops_the_init_step_with_a_clear_message_and_an_event() {
    let client = admin().await;
    let ns = namespace(&client, "agent-init").await;
    let dir = std::env::temp_dir().join(unique("agent-init"));
    let sources = dir.join("configmaps").join("packages");
    std::fs::create_dir_all(&sources).expect("dirs");
    std::fs::write(
        sources.join("WmKafkaAdapter.zip"),
        b"not the archive the spec names",
    )
    .expect("write");
    let expected = "0".repeat(64);
    let list = json!([{
        "name": "WmKafkaAdapter", "version": "9.6",
        "source": {"configMap": {"name": "packages", "key": "WmKafkaAdapter.zip"}},
        "sha256": expected,
    }]);
    std::fs::write(dir.join("packages.json"), list.to_string()).expect("write list");
    let termination = dir.join("termination-log");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_integration-operator"))
        .args(["agent", "init"])
        .arg(format!(
            "--packages-file={}",
            dir.join("packages.json").display()
        ))
        .arg(format!(
            "--config-maps-dir={}",
            dir.join("configmaps").display()
        ))
        .arg(format!("--images-dir={}", dir.join("images").display()))
        .arg(format!("--target={}", dir.join("installed").display()))
        .arg(format!("--termination-log={}", termination.display()))
        .env("POD_NAME", "c-0")
        .env("POD_NAMESPACE", &ns)
        .env("KUBECONFIG", admin_kubeconfig())
        .output()
        .expect("run agent init");
    assert_eq!(output.status.code(), Some(1));
    let message = std::fs::read_to_string(&termination).expect("termination message");
    assert!(
        message.starts_with("package WmKafkaAdapter: sha256 is "),
        "{message}"
    );
    assert!(
        message.contains(&format!("the spec expects {expected}")),
        "{message}"
    );
    assert!(
        !dir.join("installed").join("WmKafkaAdapter.zip").exists(),
        "nothing installed"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let event = wait_until(
        Duration::from_secs(30),
        "PackageInstallFailed event",
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("PackageInstallFailed"))
        },
    )
    .await;
    assert_eq!(event.regarding.and_then(|r| r.name).as_deref(), Some("c-0"));
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn url_credentials_reach_neither_the_termination_message_nor_the_event() {
    let client = admin().await;
    let ns = namespace(&client, "agent-url").await;
    let dir = std::env::temp_dir().join(unique("agent-url"));
    std::fs::create_dir_all(&dir).expect("dir");
    // Nothing listens on port 1: the download fails and says where.
    let list = json!([{
        "name": "WmKafkaAdapter", "version": "9.6",
        "source": {"url": "https://installer:s3cr3t-pass@127.0.0.1:1/WmKafkaAdapter.zip?X-Amz-Signature=s3cr3t-sig"},
        "sha256": "0".repeat(64),
    }]);
    std::fs::write(dir.join("packages.json"), list.to_string()).expect("list");
    let termination = dir.join("termination-log");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_integration-operator"))
        .args(["agent", "init"])
        .arg(format!(
            "--packages-file={}",
            dir.join("packages.json").display()
        ))
        .arg(format!("--target={}", dir.join("installed").display()))
        .arg(format!("--termination-log={}", termination.display()))
        .env("POD_NAME", "c-0")
        .env("POD_NAMESPACE", &ns)
        .env("KUBECONFIG", admin_kubeconfig())
        .output()
        .await
        .expect("run agent init");
    assert_eq!(output.status.code(), Some(1));
    let message = std::fs::read_to_string(&termination).expect("termination message");
    assert!(
        message.contains("127.0.0.1:1/WmKafkaAdapter.zip"),
        "the message names the source: {message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let event = wait_until(
        Duration::from_secs(30),
        "PackageInstallFailed event",
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("PackageInstallFailed"))
        },
    )
    .await;
    let note = event.note.unwrap_or_default();
    let stderr = String::from_utf8_lossy(&output.stderr);
    for (what, text) in [
        ("termination message", message.as_str()),
        ("Event", note.as_str()),
        ("log", &stderr),
    ] {
        for secret in ["s3cr3t-pass", "s3cr3t-sig", "installer"] {
            assert!(!text.contains(secret), "{secret} in the {what}: {text}");
        }
    }
    delete_namespace(&client, &ns).await;
}

/// Restarts the agent of c-1 with `args` (pointing it at altered files)
/// and checks that the operator sees drift with `why` and replaces c-1.
async fn inside_change_replaces_the_node(mut b: Bed, args: &[&str], why: &str) {
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
    let old = pods.get("c-1").await.expect("c-1").metadata.uid;
    drop(b._processes.remove(2));
    let agent = Operator::agent_with(&b.ns, "c-1", &b.servers[1].address, args);
    status_when(&b.api, "c", "drift on c-1", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "ConfigDrift" && c.status == "True" && c.message.contains(why))
    })
    .await;
    wait_until(Duration::from_secs(60), "c-1 replaced", || async {
        let pod = pods.get_opt("c-1").await.ok()??;
        (pod.metadata.uid != old && pod.metadata.deletion_timestamp.is_none()).then_some(())
    })
    .await;
    drop(agent);
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_package_changed_inside_a_running_pod_is_drift_and_the_node_is_replaced() {
    let b = bed("agent-pkgdrift", "").await;
    let dir = std::env::temp_dir().join(unique("pkgdrift"));
    std::fs::create_dir_all(dir.join("installed")).expect("dirs");
    let list = json!([{"name": "P", "version": "1", "source": {"configMap": {"name": "p", "key": "P.zip"}}, "sha256": "0".repeat(64)}]);
    std::fs::write(dir.join("packages.json"), list.to_string()).expect("list");
    std::fs::write(dir.join("installed").join("P.zip"), b"altered").expect("package");
    let packages_file = format!("--packages-file={}", dir.join("packages.json").display());
    let installed_dir = format!("--installed-dir={}", dir.join("installed").display());
    let why = "c-1: installed packages differ from the spec (the agent reports incomplete)";
    inside_change_replaces_the_node(b, &[&packages_file, &installed_dir], why).await;
}

#[tokio::test]
async fn a_configuration_file_changed_inside_a_running_pod_is_drift_and_the_node_is_replaced() {
    let b = bed("agent-cfgdrift", "").await;
    let dir = std::env::temp_dir().join(unique("cfgdrift"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("server.properties"), "threads=999\n").expect("file");
    let config_dir = format!("--config-dir={}", dir.display());
    let why = "c-1: configuration files in the pod differ from the ConfigMap";
    inside_change_replaces_the_node(b, &[&config_dir], why).await;
}

#[tokio::test]
async fn url_packages_are_downloaded_verified_and_unpacked() {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("manifest.v3", stored).expect("entry");
    zip.write_all(b"version=9.6").expect("write");
    let archive = zip.finish().expect("zip").into_inner();
    let sha256: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&archive)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let server = StandIn::start().await;
    server
        .lock()
        .files
        .insert("/WmKafkaAdapter-9.6.zip".into(), archive);
    let dir = std::env::temp_dir().join(unique("url-package"));
    std::fs::create_dir_all(&dir).expect("dir");
    let list = json!([{
        "name": "WmKafkaAdapter", "version": "9.6",
        "source": {"url": format!("http://{}/WmKafkaAdapter-9.6.zip", server.address)},
        "sha256": sha256,
    }]);
    std::fs::write(dir.join("packages.json"), list.to_string()).expect("list");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_integration-operator"))
        .args(["agent", "init"])
        .arg(format!(
            "--packages-file={}",
            dir.join("packages.json").display()
        ))
        .arg(format!("--target={}", dir.join("installed").display()))
        .arg(format!(
            "--termination-log={}",
            dir.join("termination-log").display()
        ))
        .output()
        .await
        .expect("run agent init");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let manifest = std::fs::read_to_string(
        dir.join("installed")
            .join("WmKafkaAdapter")
            .join("manifest.v3"),
    );
    assert_eq!(manifest.expect("unpacked"), "version=9.6");
}

/// A bare pod named `name` for an agent to impersonate, without an
/// operator: the agent needs only its pod.
async fn lone_pod(client: &Client, ns: &str, name: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"automountServiceAccountToken": false, "containers": [{"name": "server", "image": "srv:1"}]},
    }))
    .expect("pod");
    // A new namespace gets its default ServiceAccount a moment later, and
    // pods are refused until then.
    wait_until(Duration::from_secs(30), "pod created", || async {
        pods.create(&Default::default(), &pod).await.ok()
    })
    .await
}

/// Waits until the agent of `pod` reported on it once.
async fn reported(pods: &Api<Pod>, pod: &str) {
    wait_until(Duration::from_secs(30), "the agent reporting", || async {
        let pod = pods.get(pod).await.ok()?;
        integration_operator::protocol::Report::of(&pod).map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn an_agent_whose_claim_endpoint_cannot_bind_exits_and_says_why() {
    let client = admin().await;
    let ns = namespace(&client, "agent-claimbind").await;
    lone_pod(&client, &ns, "c-0").await;
    let server = StandIn::start().await;
    // Something else in the pod holds the claim port.
    let port = free_port();
    let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).expect("take the port");
    let claim = format!("127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let mut agent = Operator::agent_with(
        &ns,
        "c-0",
        &server.address,
        &[
            "--listeners",
            r#"[{"name":"invoices","mode":"multiNode"}]"#,
            "--claim-address",
            &claim,
            "--database-host",
            "127.0.0.1",
            "--database-name",
            "unused",
        ],
    );
    let exited = agent.wait_exit(Duration::from_secs(10)).await;
    let log = std::fs::read_to_string(Operator::agent_log(&ns, "c-0")).unwrap_or_default();
    assert!(
        exited,
        "the agent still runs without its claim endpoint after {:?}:\n{log}",
        started.elapsed()
    );
    assert_eq!(agent.exit_code(), Some(1), "{log}");
    assert!(
        log.contains("claim endpoint") && log.contains(&claim) && log.contains("in use"),
        "the log says which task ended and why:\n{log}"
    );
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_desired_state_change_reaches_the_server_well_within_the_interval() {
    use integration_operator::protocol::Desired;
    let client = admin().await;
    let ns = namespace(&client, "agent-react").await;
    lone_pod(&client, &ns, "c-0").await;
    let server = StandIn::start().await;
    // The agent's default interval: it looked at its pod this often
    // before it watched it.
    let _agent = Operator::agent_every(
        &ns,
        "c-0",
        &server.address,
        "1000",
        &STANDIN_HOOKS,
        &admin_kubeconfig(),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    reported(&pods, "c-0").await;
    let mut latencies = Vec::new();
    for i in 0..20 {
        let desired = if i % 2 == 0 {
            Desired::Offline
        } else {
            Desired::Online
        };
        // From the request: the agent may act before the answer is back.
        let asked = std::time::Instant::now();
        pods.patch(
            "c-0",
            &PatchParams::default(),
            &Patch::Merge(desired.patch()),
        )
        .await
        .expect("patch the desired state");
        let quiesced = desired == Desired::Offline;
        while server.lock().quiesced != quiesced {
            assert!(
                asked.elapsed() < Duration::from_secs(5),
                "{desired} did not reach the server"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(asked.elapsed());
    }
    assert_eq!(server.lock().calls.len(), 20, "one hook call per change");
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    eprintln!("median {median:?}, all {latencies:?}");
    assert!(
        median < Duration::from_millis(200),
        "median {median:?} from a changed desired state to the server: {latencies:?}"
    );
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn an_agent_with_its_service_accounts_rights_watches_its_pod_and_lists_no_other() {
    use kube::api::PostParams;
    let client = admin().await;
    let ns = namespace(&client, "agent-rbac").await;
    let _operator = Operator::start(&ns);
    let yaml = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: c}\n\
                spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: 2\n";
    create_yaml(&client, &ns, yaml).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "c", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    // A pod of the namespace that is not the cluster's.
    lone_pod(&client, &ns, "other").await;

    let account = integration_operator::naming::agent_account("c");
    let kubeconfig = service_account_kubeconfig(&ns, &account);
    let server = StandIn::start().await;
    let _agent = Operator::agent_via(&ns, "c-0", &server.address, &STANDIN_HOOKS, &kubeconfig);
    spec(&api, json!({"nodes": {"offline": ["c-0"]}})).await;
    status_when(&api, "c", "c-0 Offline", |s| {
        in_state(s, "c-0", NodeState::Offline)
    })
    .await;
    assert!(server.lock().quiesced, "the agent quiesced its server");

    // What the agent's rights allow: its cluster's pods by name, a list
    // or watch only with a metadata.name field selector.
    let agent = client_for(&kubeconfig).await;
    let pods: Api<Pod> = Api::namespaced(agent, &ns);
    let forbidden =
        |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    assert!(
        forbidden(pods.list(&ListParams::default()).await.map(|_| ())),
        "the agent lists every pod"
    );
    let own = pods
        .list(&ListParams::default().fields("metadata.name=c-0"))
        .await
        .expect("the agent lists its own pod by name");
    assert_eq!(own.items.len(), 1);
    let others = pods
        .list(&ListParams::default().fields("metadata.name=other"))
        .await
        .map(|_| ());
    assert!(forbidden(others), "the agent lists another pod by name");
    assert!(
        forbidden(
            pods.patch(
                "other",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}}))
            )
            .await
            .map(|_| ())
        ),
        "the agent patches another pod"
    );
    assert!(
        forbidden(
            pods.create(&PostParams::default(), &Pod::default())
                .await
                .map(|_| ())
        ),
        "the agent creates pods"
    );
    delete_namespace(&client, &ns).await;
}
