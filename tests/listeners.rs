//! Listener clustering with real agents (local processes impersonating the
//! kwok pods) and stand-in servers that record every enable, renew and
//! disable with its time and fencing epoch. Timings are shortened to
//! lease 6 s / renew deadline 4 s / retry 1 s so the tests stay quick; the
//! benchmark (`make bench`) uses the defaults 15/10/2.

#[path = "support/standin.rs"]
mod standin;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use integration_operator::api::{IntegrationCluster, NodeState, Phase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use standin::{ListenerAction, StandIn, overlaps, timeline};
use support::*;
use tokio::net::{TcpListener, TcpStream};

const LEASE: Duration = Duration::from_secs(6);
const RENEW_DEADLINE: Duration = Duration::from_secs(4);
const RETRY: Duration = Duration::from_secs(1);
const LISTENERS: &str = r#"[{"name":"orders-in","mode":"singleNode","target":"orders.kafka:ordersListener","leaseDurationSeconds":6,"renewDeadlineSeconds":4,"retryPeriodSeconds":1}]"#;
const HOOKS: [&str; 6] = [
    "--listener-enable-path",
    "/listener/enable",
    "--listener-renew-path",
    "/listener/renew",
    "--listener-disable-path",
    "/listener/disable",
];

struct Bed {
    client: Client,
    ns: String,
    api: Api<IntegrationCluster>,
    servers: Vec<StandIn>,
    agents: Vec<Option<Operator>>,
    _operator: Operator,
}

fn cluster_yaml(replicas: i32, extra: &str) -> String {
    format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: l}}\n\
         spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: {replicas}\n  \
         listeners:\n  - {{name: orders-in, mode: singleNode, target: 'orders.kafka:ordersListener', \
         leaseDurationSeconds: 6, renewDeadlineSeconds: 4, retryPeriodSeconds: 1}}\n{extra}"
    )
}

/// A Ready 3-node cluster with one single-node listener and an agent per
/// node; `kubeconfig` is what the agents use.
async fn bed(prefix: &str, kubeconfig: Option<PathBuf>) -> Bed {
    let client = admin().await;
    let ns = namespace(&client, prefix).await;
    let operator = Operator::start(&ns);
    create_yaml(&client, &ns, &cluster_yaml(3, ""))
        .await
        .expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "l", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    let mut servers = Vec::new();
    let mut agents = Vec::new();
    for i in 0..3 {
        let server = StandIn::start().await;
        let mut extra = vec!["--listeners", LISTENERS];
        extra.extend_from_slice(&HOOKS);
        let pod = format!("l-{i}");
        let agent = match &kubeconfig {
            Some(k) => Operator::agent_via(&ns, &pod, &server.address, &extra, k),
            None => Operator::agent_with(&ns, &pod, &server.address, &extra),
        };
        servers.push(server);
        agents.push(Some(agent));
    }
    Bed {
        client,
        ns,
        api,
        servers,
        agents,
        _operator: operator,
    }
}

impl Bed {
    fn refs(&self) -> Vec<&StandIn> {
        self.servers.iter().collect()
    }

    /// Servers listening now (per their recorded calls).
    fn listening_now(&self) -> Vec<usize> {
        let now = SystemTime::now();
        timeline(&self.refs(), now)
            .into_iter()
            .filter(|s| s.to >= now - Duration::from_millis(1))
            .map(|s| s.server)
            .collect()
    }

    /// Waits until exactly one server listens; returns it.
    async fn holder(&self) -> usize {
        wait_until(
            Duration::from_secs(30),
            "exactly one listening server",
            || async {
                let now = self.listening_now();
                (now.len() == 1).then(|| now[0])
            },
        )
        .await
    }

    /// The first enable by a server other than `old` after `since`.
    async fn next_enable(
        &self,
        old: usize,
        since: SystemTime,
        timeout: Duration,
    ) -> (usize, SystemTime, i64) {
        wait_until(timeout, "another server enabled", || async {
            self.servers
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != old)
                .find_map(|(i, s)| {
                    s.lock()
                        .listener
                        .iter()
                        .find(|c| c.action == ListenerAction::Enable && c.at >= since)
                        .map(|c| (i, c.at, c.epoch))
                })
        })
        .await
    }

    fn assert_never_two(&self) {
        let spans = timeline(&self.refs(), SystemTime::now());
        let found = overlaps(&spans);
        assert!(
            found.is_empty(),
            "two servers listened at once: {found:#?}\nall: {spans:#?}"
        );
        // Every enable carries a higher epoch than the one before it.
        let mut enables: Vec<(SystemTime, i64)> = self
            .servers
            .iter()
            .flat_map(|s| {
                s.lock()
                    .listener
                    .iter()
                    .filter(|c| c.action == ListenerAction::Enable)
                    .map(|c| (c.at, c.epoch))
                    .collect::<Vec<_>>()
            })
            .collect();
        enables.sort();
        assert!(
            enables.windows(2).all(|w| w[0].1 < w[1].1),
            "epochs must grow with every enable: {enables:?}"
        );
        assert!(enables.iter().all(|(_, e)| *e >= 1));
    }
}

fn elapsed(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or_default()
}

#[tokio::test]
async fn a_killed_holder_is_replaced_within_lease_plus_retry() {
    let mut b = bed("lsn-kill", None).await;
    let old = b.holder().await;
    // The operator shows the holder and records the hand-over.
    let shown = status_when(&b.api, "l", "holder in status", |s| {
        s.listeners.first().and_then(|l| l.holder.clone()) == Some(format!("l-{old}"))
    })
    .await;
    assert!(shown.listeners[0].transitions.unwrap_or_default() >= 1);

    let killed = SystemTime::now();
    if let Some(agent) = b.agents[old].as_mut() {
        agent.signal("KILL");
    }
    let (new, at, _) = b.next_enable(old, killed, Duration::from_secs(30)).await;
    let failover = elapsed(killed, at);
    assert!(
        failover <= LEASE + RETRY + Duration::from_secs(1),
        "failover took {failover:?}"
    );
    b.assert_never_two();
    status_when(&b.api, "l", "new holder in status", |s| {
        s.listeners.first().and_then(|l| l.holder.clone()) == Some(format!("l-{new}"))
    })
    .await;
    let events: Api<Event> = Api::namespaced(b.client.clone(), &b.ns);
    wait_until(
        Duration::from_secs(20),
        "ListenerHandover event",
        || async {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("ListenerHandover")
                        && e.note.as_deref().is_some_and(|n| {
                            n.contains(&format!("→ l-{new}"))
                                || n.contains(&format!("held by l-{new}"))
                        })
                })
        },
    )
    .await;
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_terminated_holder_hands_over_within_a_retry_period() {
    let mut b = bed("lsn-term", None).await;
    let old = b.holder().await;
    let stopped = SystemTime::now();
    let agent = b.agents[old].as_mut().expect("agent");
    agent.signal("TERM");
    assert!(
        agent.wait_exit(Duration::from_secs(10)).await,
        "the agent exits on SIGTERM"
    );
    let disabled = b.servers[old]
        .lock()
        .listener
        .iter()
        .any(|c| c.action == ListenerAction::Disable && c.at >= stopped);
    assert!(disabled, "a terminating holder disables its listener");
    let (_, at, _) = b.next_enable(old, stopped, Duration::from_secs(10)).await;
    let handover = elapsed(stopped, at);
    assert!(
        handover <= RETRY + Duration::from_millis(1500),
        "hand-over took {handover:?}"
    );
    b.assert_never_two();
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_frozen_holder_never_listens_beside_its_successor() {
    let b = bed("lsn-stop", None).await;
    let old = b.holder().await;
    let frozen = SystemTime::now();
    let agent = b.agents[old].as_ref().expect("agent");
    agent.signal("STOP");
    let (_, taken, _) = b.next_enable(old, frozen, Duration::from_secs(30)).await;
    tokio::time::sleep(LEASE - elapsed(frozen, taken).min(LEASE) + Duration::from_secs(3)).await;
    let woke = SystemTime::now();
    agent.signal("CONT");
    // Woken after losing the lease, it disables instead of resuming.
    wait_until(
        Duration::from_secs(10),
        "the woken holder disables",
        || async {
            b.servers[old]
                .lock()
                .listener
                .iter()
                .any(|c| c.action == ListenerAction::Disable && c.at >= woke)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(3 * RETRY).await;
    let renewed_after_wake = b.servers[old]
        .lock()
        .listener
        .iter()
        .any(|c| c.action != ListenerAction::Disable && c.at >= woke);
    assert!(!renewed_after_wake, "the woken holder must not resume");
    b.assert_never_two();
    assert_eq!(b.listening_now().len(), 1);
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_node_taken_offline_hands_its_listener_over_before_it_is_offline() {
    let b = bed("lsn-offline", None).await;
    let old = b.holder().await;
    let node = format!("l-{old}");
    let asked = SystemTime::now();
    b.api
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": {"offline": [node]}}})),
        )
        .await
        .expect("offline");
    let offline = status_when(&b.api, "l", "node Offline", |s| {
        s.nodes
            .iter()
            .any(|n| n.name == node && n.state == NodeState::Offline)
    })
    .await;
    let offline_seen = SystemTime::now();
    let disabled = b.servers[old]
        .lock()
        .listener
        .iter()
        .find(|c| c.action == ListenerAction::Disable && c.at >= asked)
        .map(|c| c.at)
        .expect("the offline node disabled its listener");
    assert!(disabled <= offline_seen);
    let (_, enabled, _) = b.next_enable(old, asked, Duration::from_secs(10)).await;
    assert!(
        elapsed(asked, enabled) <= RETRY + Duration::from_secs(2),
        "hand-over took {:?}",
        elapsed(asked, enabled)
    );
    assert_ne!(
        offline.listeners.first().and_then(|l| l.holder.clone()),
        Some(node.clone()),
        "an Offline node holds no listener"
    );
    b.assert_never_two();
    delete_namespace(&b.client, &b.ns).await;
}

/// The node a Lease holder identity names (`<pod>` or `<pod>/<uid>`).
fn node_of(holder: &str) -> &str {
    holder.split('/').next().unwrap_or(holder)
}

async fn lease_holder(client: &Client, ns: &str, name: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases
        .get_opt(name)
        .await
        .expect("read lease")
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// A cluster with one single-node listener and the agent's --listeners.
fn single_listener(
    cluster: &str,
    replicas: i32,
    listener: &str,
    (lease, renew, retry): (i32, i32, i32),
) -> (String, String) {
    let yaml = format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: {cluster}}}\n\
         spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: {replicas}\n  \
         listeners:\n  - {{name: {listener}, mode: singleNode, leaseDurationSeconds: {lease}, \
         renewDeadlineSeconds: {renew}, retryPeriodSeconds: {retry}}}\n"
    );
    let json = format!(
        r#"[{{"name":"{listener}","mode":"singleNode","leaseDurationSeconds":{lease},"renewDeadlineSeconds":{renew},"retryPeriodSeconds":{retry}}}]"#
    );
    (yaml, json)
}

#[tokio::test]
async fn clusters_whose_lease_names_once_collided_get_a_lease_each_and_cannot_touch_the_other() {
    let client = admin().await;
    let ns = namespace(&client, "lsn-names").await;
    let _operator = Operator::start(&ns);
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    // Before: both were "orders-listener-listener-in".
    let pairs = [("orders", "listener-in"), ("orders-listener", "in")];
    let mut agents = Vec::new();
    let mut servers = Vec::new();
    for (cluster, listener) in pairs {
        let (yaml, json) = single_listener(cluster, 1, listener, (6, 4, 1));
        create_yaml(&client, &ns, &yaml).await.expect("create");
        status_when(&api, cluster, "Ready", |s| s.phase == Some(Phase::Ready)).await;
        let server = StandIn::start().await;
        let mut extra = vec!["--listeners", json.as_str()];
        extra.extend_from_slice(&HOOKS);
        agents.push(Operator::agent_with(
            &ns,
            &format!("{cluster}-0"),
            &server.address,
            &extra,
        ));
        servers.push(server);
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let names: BTreeSet<String> = leases
        .list(&ListParams::default())
        .await
        .expect("leases")
        .items
        .iter()
        .map(kube::ResourceExt::name_any)
        .collect();
    let expected: BTreeSet<String> = pairs
        .iter()
        .map(|(c, l)| integration_operator::listeners::lease_name(c, l))
        .collect();
    assert_eq!(
        names.len(),
        2,
        "each cluster has a Lease of its own: {names:?}"
    );
    assert_eq!(names, expected);
    // Each cluster's agent holds its own Lease and its server listens.
    for ((cluster, listener), server) in pairs.iter().zip(&servers) {
        let name = integration_operator::listeners::lease_name(cluster, listener);
        let node = format!("{cluster}-0");
        wait_until(
            Duration::from_secs(20),
            "each agent holds its Lease",
            || async {
                lease_holder(&client, &ns, &name)
                    .await
                    .filter(|h| node_of(h) == node)
            },
        )
        .await;
        wait_until(Duration::from_secs(10), "its server listens", || async {
            server
                .lock()
                .listener
                .iter()
                .any(|c| c.action == ListenerAction::Enable)
                .then_some(())
        })
        .await;
    }
    // An agent's Role grants its own Lease only.
    for (i, (cluster, listener)) in pairs.iter().enumerate() {
        let account = format!("system:serviceaccount:{ns}:{cluster}-agent");
        let (other, other_listener) = pairs[1 - i];
        for (lease, expected) in [
            (
                integration_operator::listeners::lease_name(cluster, listener),
                "yes",
            ),
            (
                integration_operator::listeners::lease_name(other, other_listener),
                "no",
            ),
        ] {
            for verb in ["get", "update"] {
                let out = kubectl_output(&[
                    "auth",
                    "can-i",
                    verb,
                    &format!("leases.coordination.k8s.io/{lease}"),
                    "-n",
                    &ns,
                    "--as",
                    &account,
                ]);
                let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                assert_eq!(answer, expected, "{account} {verb} lease {lease}");
            }
        }
    }
    drop(agents);
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_holder_whose_server_refuses_to_disable_keeps_the_lease_until_it_runs_out() {
    let b = bed("lsn-refuse", None).await;
    let old = b.holder().await;
    let node = format!("l-{old}");
    let lease = integration_operator::listeners::lease_name("l", "orders-in");
    b.servers[old].lock().refuse_disable = true;
    let asked = SystemTime::now();
    b.api
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodes": {"offline": [node]}}})),
        )
        .await
        .expect("offline");
    let refused = |i: usize| {
        b.servers[i]
            .lock()
            .listener
            .iter()
            .filter(|c| c.refused)
            .map(|c| c.at)
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(10), "a disable attempt", || async {
        refused(old).first().copied()
    })
    .await;
    let first_refusal = refused(old)[0];
    let last_renew = b.servers[old]
        .lock()
        .listener
        .iter()
        .filter(|c| c.action != ListenerAction::Disable && c.at <= first_refusal)
        .map(|c| c.at)
        .max()
        .expect("enabled before");
    // Not released: the Lease names the node until it runs out.
    while SystemTime::now() < last_renew + LEASE - Duration::from_millis(1500) {
        let holder = lease_holder(&b.client, &b.ns, &lease).await;
        assert_eq!(
            holder.as_deref().map(node_of),
            Some(node.as_str()),
            "{:?} after the offline request",
            elapsed(asked, SystemTime::now())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Another node starts only once the lease ran out.
    let (_, enabled, _) = b.next_enable(old, asked, Duration::from_secs(20)).await;
    assert!(
        elapsed(last_renew, enabled) >= LEASE - Duration::from_millis(500),
        "another node listened {:?} after the last renewal, the lease is {LEASE:?}",
        elapsed(last_renew, enabled)
    );
    b.assert_never_two();
    // The agent tried again within its renew deadline.
    let attempts = refused(old);
    let in_time = attempts
        .iter()
        .filter(|at| elapsed(last_renew, **at) <= RENEW_DEADLINE)
        .count();
    assert!(in_time >= 2, "{in_time} disable attempts: {attempts:?}");
    // The node is Offline once another holds the listener.
    status_when(&b.api, "l", "node Offline", |s| {
        s.nodes
            .iter()
            .any(|n| n.name == node && n.state == NodeState::Offline)
    })
    .await;
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_recreated_pod_of_the_same_name_waits_for_its_predecessors_lease() {
    const LONG: Duration = Duration::from_secs(20);
    let client = admin().await;
    let ns = namespace(&client, "lsn-uid").await;
    let _operator = Operator::start(&ns);
    let (yaml, json) = single_listener("r", 1, "orders-in", (20, 15, 1));
    create_yaml(&client, &ns, &yaml).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "r", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    let mut extra = vec!["--listeners", json.as_str()];
    extra.extend_from_slice(&HOOKS);
    let first = StandIn::start().await;
    let mut agent = Operator::agent_with(&ns, "r-0", &first.address, &extra);
    wait_until(Duration::from_secs(20), "r-0 listens", || async {
        first
            .lock()
            .listener
            .iter()
            .any(|c| c.action == ListenerAction::Enable)
            .then_some(())
    })
    .await;
    // The pod dies with its agent (no release) and is recreated under the
    // same name.
    agent.signal("KILL");
    assert!(agent.wait_exit(Duration::from_secs(5)).await);
    let killed = SystemTime::now();
    let before = uids(&live_pods(&client, &ns, "r", "server").await);
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    pods.delete("r-0", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .expect("delete r-0");
    wait_until(Duration::from_secs(30), "r-0 recreated", || async {
        let now = uids(&live_pods(&client, &ns, "r", "server").await);
        (now.contains_key("r-0") && now.get("r-0") != before.get("r-0")).then_some(())
    })
    .await;
    let second = StandIn::start().await;
    let _agent = Operator::agent_with(&ns, "r-0", &second.address, &extra);
    let enabled = wait_until(Duration::from_secs(60), "the new r-0 listens", || async {
        second
            .lock()
            .listener
            .iter()
            .find(|c| c.action == ListenerAction::Enable)
            .map(|c| c.at)
    })
    .await;
    assert!(
        elapsed(killed, enabled) >= LONG,
        "the new pod listened {:?} after its predecessor died, the lease is {LONG:?}",
        elapsed(killed, enabled)
    );
    let spans = timeline(&[&first, &second], SystemTime::now());
    assert!(overlaps(&spans).is_empty(), "{spans:#?}");
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn an_earlier_versions_lease_is_taken_over_with_its_holder_and_epoch() {
    use integration_operator::listeners::{holder_node, lease_name, legacy_lease_name};
    let client = admin().await;
    let ns = namespace(&client, "lsn-upgrade").await;
    let _operator = Operator::start(&ns);
    // A paused cluster gets no Leases yet; then the Lease an earlier
    // operator version made and its agents held.
    create_yaml(&client, &ns, &cluster_yaml(3, "  paused: true\n"))
        .await
        .expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    let uid = api.get("l").await.expect("cluster").metadata.uid;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let old_name = legacy_lease_name("l", "orders-in");
    let old: Lease = serde_json::from_value(json!({
        "metadata": {
            "name": old_name,
            "labels": {"integration.dev/cluster": "l", "app.kubernetes.io/component": "listener"},
            "ownerReferences": [{
                "apiVersion": "integration.dev/v1alpha1", "kind": "IntegrationCluster",
                "name": "l", "uid": uid, "controller": true,
            }],
        },
        "spec": {
            "holderIdentity": "l-1",
            "leaseDurationSeconds": 6,
            "leaseTransitions": 4,
            "renewTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        },
    }))
    .expect("lease");
    leases
        .create(&kube::api::PostParams::default(), &old)
        .await
        .expect("earlier lease");
    unpause(&api).await;
    let name = lease_name("l", "orders-in");
    let new = wait_until(Duration::from_secs(30), "the new Lease", || async {
        leases.get_opt(&name).await.ok().flatten()
    })
    .await;
    let seen = SystemTime::now();
    let spec = new.spec.clone().expect("taken over record");
    assert_eq!(
        spec.holder_identity.as_deref().map(holder_node),
        Some("l-1")
    );
    assert_eq!(spec.lease_transitions, Some(4));
    // Agents of the earlier version cannot renew the earlier Lease any more.
    let account = format!("system:serviceaccount:{ns}:l-agent");
    for (lease, expected) in [(&old_name, "no"), (&name, "yes")] {
        let out = kubectl_output(&[
            "auth",
            "can-i",
            "update",
            &format!("leases.coordination.k8s.io/{lease}"),
            "-n",
            &ns,
            "--as",
            &account,
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected,
            "{lease}"
        );
    }
    // The agents wait for the earlier holder's lease to run out, then the
    // epoch goes on from it.
    status_when(&api, "l", "Ready", |s| s.phase == Some(Phase::Ready)).await;
    let mut servers = Vec::new();
    let mut agents = Vec::new();
    for i in 0..3 {
        let server = StandIn::start().await;
        let mut extra = vec!["--listeners", LISTENERS];
        extra.extend_from_slice(&HOOKS);
        agents.push(Operator::agent_with(
            &ns,
            &format!("l-{i}"),
            &server.address,
            &extra,
        ));
        servers.push(server);
    }
    let (at, epoch) = wait_until(Duration::from_secs(30), "a node listens", || async {
        servers.iter().find_map(|s| {
            s.lock()
                .listener
                .iter()
                .find(|c| c.action == ListenerAction::Enable)
                .map(|c| (c.at, c.epoch))
        })
    })
    .await;
    assert!(
        elapsed(seen, at) >= LEASE,
        "a node listened {:?} after the Lease was taken over",
        elapsed(seen, at)
    );
    assert_eq!(epoch, 5);
    drop(agents);
    delete_namespace(&client, &ns).await;
}

async fn unpause(api: &Api<IntegrationCluster>) {
    api.patch(
        "l",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": false}})),
    )
    .await
    .expect("unpause");
}

/// A TCP proxy to the API server that a test can cut.
struct Proxy {
    port: u16,
    open: Arc<AtomicBool>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("address").port();
        let open = Arc::new(AtomicBool::new(true));
        let gate = open.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !gate.load(Ordering::SeqCst) {
                    continue; // dropped: the API server is "down"
                }
                let gate = gate.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(api_server_address()).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    tokio::pin!(copy);
                    // Cutting the proxy also cuts open connections.
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                                if !gate.load(Ordering::SeqCst) {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Proxy { port, open }
    }

    /// The admin kubeconfig, through this proxy.
    fn kubeconfig(&self) -> PathBuf {
        let text = std::fs::read_to_string(admin_kubeconfig()).expect("kubeconfig");
        let path = state_dir().join(format!("kubeconfig-proxy-{}", self.port));
        std::fs::write(
            &path,
            text.replace(&api_server_address(), &format!("127.0.0.1:{}", self.port)),
        )
        .expect("write kubeconfig");
        path
    }
}

#[tokio::test]
async fn an_api_outage_makes_the_holder_disable_before_expiry_then_they_elect_again() {
    let proxy = Proxy::start().await;
    let b = bed("lsn-outage", Some(proxy.kubeconfig())).await;
    let old = b.holder().await;
    let last_renew = |i: usize| {
        b.servers[i]
            .lock()
            .listener
            .iter()
            .filter(|c| c.action != ListenerAction::Disable)
            .map(|c| c.at)
            .max()
    };
    proxy.open.store(false, Ordering::SeqCst);
    let cut = SystemTime::now();
    let disabled = wait_until(Duration::from_secs(15), "the holder disables", || async {
        b.servers[old]
            .lock()
            .listener
            .iter()
            .find(|c| c.action == ListenerAction::Disable && c.at >= cut)
            .map(|c| c.at)
    })
    .await;
    let renewed = last_renew(old).expect("renewals before the outage");
    assert!(
        elapsed(renewed, disabled) < LEASE,
        "disabled {:?} after its last renewal, the lease is {LEASE:?}",
        elapsed(renewed, disabled)
    );
    // Nobody can win the lease while the API is away.
    tokio::time::sleep(LEASE).await;
    assert!(
        b.listening_now().is_empty(),
        "no one listens without the API"
    );
    proxy.open.store(true, Ordering::SeqCst);
    let restored = SystemTime::now();
    let (_, again, _) = b
        .next_enable(usize::MAX, restored, Duration::from_secs(30))
        .await;
    assert!(elapsed(restored, again) <= LEASE + 2 * RETRY + Duration::from_secs(2));
    b.holder().await;
    b.assert_never_two();
    delete_namespace(&b.client, &b.ns).await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test]
async fn multi_node_claims_process_each_message_exactly_once() {
    let client = admin().await;
    let ns = namespace(&client, "lsn-multi").await;
    let _operator = Operator::start(&ns);
    database_admin_secret(&client, &ns, "db-admin", &postgres_admin_url()).await;
    let yaml = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: m}\n\
                spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: 4\n  \
                database: {mode: external, external: {secretRef: {name: db-admin, key: url}}}\n  \
                listeners: [{name: invoices, mode: multiNode}]\n";
    create_yaml(&client, &ns, yaml).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "m", "Ready with its database", |s| {
        s.phase == Some(Phase::Ready) && s.database.as_ref().is_some_and(|d| d.ready)
    })
    .await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let credentials = secrets
        .get("m-database-credentials")
        .await
        .expect("credentials");
    let text = |k: &str| {
        credentials
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .expect("key")
    };
    let listeners = r#"[{"name":"invoices","mode":"multiNode"}]"#;
    let mut servers = Vec::new();
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for i in 0..4 {
        let server = StandIn::start().await;
        let port = free_port();
        let claim = format!("127.0.0.1:{port}");
        let (host, db_port, name, user, password) = (
            text("host"),
            text("port"),
            text("database"),
            text("username"),
            text("password"),
        );
        let mut extra = vec![
            "--listeners",
            listeners,
            "--claim-address",
            &claim,
            "--database-host",
            &host,
            "--database-port",
            &db_port,
            "--database-name",
            &name,
            "--database-username",
            &user,
            "--database-password",
            &password,
        ];
        extra.extend_from_slice(&HOOKS);
        agents.push(Operator::agent_with(
            &ns,
            &format!("m-{i}"),
            &server.address,
            &extra,
        ));
        servers.push(server);
        ports.push(port);
    }
    // Every online node listens.
    for server in &servers {
        wait_until(
            Duration::from_secs(20),
            "multi-node listener enabled",
            || async {
                server
                    .lock()
                    .listener
                    .iter()
                    .any(|c| c.action == ListenerAction::Enable && c.listener == "invoices")
                    .then_some(())
            },
        )
        .await;
    }
    // Four nodes claim the same 10,000 message ids at once, each in its own
    // order (as redeliveries arrive anywhere).
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, port) in ports.iter().copied().enumerate() {
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids: Vec<u32> = (0..10_000).collect();
            ids.rotate_left(n * 2500);
            if n % 2 == 1 {
                ids.reverse();
            }
            let mut won = Vec::new();
            for chunk in ids.chunks(32) {
                let calls = chunk.iter().map(|id| {
                    let http = http.clone();
                    async move {
                        let uri: hyper::Uri =
                            format!("http://127.0.0.1:{port}/claim?listener=invoices&id=msg-{id}")
                                .parse()
                                .expect("uri");
                        let request = hyper::Request::post(uri)
                            .body(http_body_util::Empty::new())
                            .expect("request");
                        let status = http
                            .request(request)
                            .await
                            .expect("claim answered")
                            .status();
                        (*id, status.as_u16())
                    }
                });
                for (id, status) in futures::future::join_all(calls).await {
                    assert!(
                        status == 200 || status == 409,
                        "claim of msg-{id} answered {status}"
                    );
                    if status == 200 {
                        won.push(id);
                    }
                }
            }
            won
        }));
    }
    let mut claimed: BTreeMap<u32, usize> = BTreeMap::new();
    let mut per_node = Vec::new();
    for task in tasks {
        let won = task.await.expect("claimer");
        per_node.push(won.len());
        for id in won {
            *claimed.entry(id).or_default() += 1;
        }
    }
    let took = started.elapsed();
    assert_eq!(claimed.len(), 10_000, "every message was claimed");
    let twice: BTreeSet<_> = claimed
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    assert!(twice.is_empty(), "claimed more than once: {twice:?}");
    assert!(
        per_node.iter().all(|n| *n > 0),
        "every node won some: {per_node:?}"
    );
    eprintln!("40,000 claims in {took:?}, won per node {per_node:?}");
    drop(agents);
    delete_namespace(&client, &ns).await;
}
