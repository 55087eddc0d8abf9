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
use standin::{Claims, ListenerAction, StandIn, overlaps, timeline};
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
    assert_eq!(
        agent.exit_code(),
        Some(0),
        "an asked-for stop is no failure"
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

/// A [`Bed`] whose agents run with their ServiceAccount's rights, as in a
/// pod, so whatever they need must be in the Role the operator gives them;
/// the listener has the given (lease, renew deadline, retry) seconds.
struct AccountBed {
    b: Bed,
    extra: Vec<String>,
    kubeconfig: PathBuf,
}

impl AccountBed {
    async fn start(prefix: &str, timings: (i32, i32, i32)) -> Self {
        let client = admin().await;
        let ns = namespace(&client, prefix).await;
        let operator = Operator::start(&ns);
        let (yaml, json) = single_listener("l", 3, "orders-in", timings);
        create_yaml(&client, &ns, &yaml).await.expect("create");
        let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
        status_when(&api, "l", "Ready", |s| s.phase == Some(Phase::Ready)).await;
        let kubeconfig =
            service_account_kubeconfig(&ns, &integration_operator::naming::agent_account("l"));
        let mut extra = vec!["--listeners".to_owned(), json];
        extra.extend(HOOKS.iter().map(|h| (*h).to_owned()));
        let mut servers = Vec::new();
        for _ in 0..3 {
            servers.push(StandIn::start().await);
        }
        let mut bed = AccountBed {
            b: Bed {
                client,
                ns,
                api,
                servers,
                agents: Vec::new(),
                _operator: operator,
            },
            extra,
            kubeconfig,
        };
        for i in 0..3 {
            let agent = bed.agent(i);
            bed.b.agents.push(Some(agent));
        }
        bed
    }

    fn agent(&self, i: usize) -> Operator {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        Operator::agent_via(
            &self.b.ns,
            &format!("l-{i}"),
            &self.b.servers[i].address,
            &extra,
            &self.kubeconfig,
        )
    }

    /// Starts node `i`'s agent again (same pod, so the same holder).
    fn restart(&mut self, i: usize) {
        self.b.agents[i] = Some(self.agent(i));
    }
}

/// A holder that stops releases its Lease, and the contenders act on the
/// release itself rather than on their next retry: with a retry period of
/// 30 s, every hand-over, from the old server's disable (the release
/// follows it) to the new server's enable, takes under 3 s (tens of
/// milliseconds unless the API server is busy). Retrying, the first of
/// two contenders would come within 3 s of the release in one trial in
/// five, so four such trials in a row happen by chance about once in 800.
#[tokio::test]
async fn a_released_lease_is_taken_over_at_once_not_on_the_next_retry() {
    const TRIALS: usize = 4;
    const PROMPT: Duration = Duration::from_secs(3);
    let mut bed = AccountBed::start("lsn-release", (45, 40, 30)).await;
    let mut took = Vec::new();
    for trial in 0..TRIALS {
        let b = &mut bed.b;
        let old = b.holder().await;
        // Every contender is up and following the Lease.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stopped = SystemTime::now();
        let agent = b.agents[old].as_mut().expect("agent");
        agent.signal("TERM");
        assert!(agent.wait_exit(Duration::from_secs(10)).await);
        let disabled = b.servers[old]
            .lock()
            .listener
            .iter()
            .find(|c| c.action == ListenerAction::Disable && c.at >= stopped)
            .map(|c| c.at)
            .expect("a terminating holder disables its listener");
        let (new, at, _) = b.next_enable(old, stopped, Duration::from_secs(60)).await;
        eprintln!(
            "trial {trial}: l-{old} → l-{new} in {:?}",
            elapsed(disabled, at)
        );
        took.push(elapsed(disabled, at));
        bed.restart(old);
    }
    bed.b.assert_never_two();
    assert!(
        took.iter().all(|t| *t < PROMPT),
        "hand-overs after the release took {took:?}; the retry period is 30 s"
    );
    delete_namespace(&bed.b.client, &bed.b.ns).await;
}

/// A killed holder releases nothing; its Lease is taken over the moment
/// it runs out on a contender's clock, counted from the renewal the
/// contender saw (on the watch, as it was written), not at the next retry
/// after that: with lease 10 s and retry 8 s, within 3 s of lease from the
/// last renewal's hook call (API latency on a busy machine included).
/// Retrying, it would take 16 s at least: the first turn a lease after the
/// one that saw the renewal is two retry periods later. Never earlier than the lease allows: the new server
/// starts at least lease − renew deadline after the `until` the old one
/// was last given.
#[tokio::test]
async fn a_killed_holders_lease_is_taken_the_moment_it_runs_out() {
    const TRIALS: usize = 2;
    const LONG_LEASE: Duration = Duration::from_secs(10);
    const LONG_RENEW: Duration = Duration::from_secs(9);
    let mut bed = AccountBed::start("lsn-expiry", (10, 9, 8)).await;
    let mut took = Vec::new();
    for trial in 0..TRIALS {
        let b = &mut bed.b;
        let old = b.holder().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let killed = SystemTime::now();
        let agent = b.agents[old].as_mut().expect("agent");
        agent.signal("KILL");
        assert!(agent.wait_exit(Duration::from_secs(5)).await);
        let (renewed, until) = b.servers[old]
            .lock()
            .listener
            .iter()
            .filter(|c| c.action != ListenerAction::Disable && c.at < killed)
            .map(|c| (c.at, c.until))
            .max()
            .expect("the holder's renewals");
        let until = until.expect("renewals carry until");
        let (new, at, _) = b.next_enable(old, killed, Duration::from_secs(45)).await;
        eprintln!(
            "trial {trial}: l-{old} → l-{new} {:?} after the last renewal, {:?} after its until",
            elapsed(renewed, at),
            elapsed(until, at)
        );
        assert!(
            at >= until + (LONG_LEASE - LONG_RENEW),
            "l-{new} listened {:?} after l-{old}'s until",
            elapsed(until, at)
        );
        took.push(elapsed(renewed, at));
        bed.restart(old);
    }
    bed.b.assert_never_two();
    assert!(
        took.iter()
            .all(|t| *t <= LONG_LEASE + Duration::from_secs(3)),
        "takeovers {took:?} after the last renewal; the lease is {LONG_LEASE:?}, the retry 8 s"
    );
    delete_namespace(&bed.b.client, &bed.b.ns).await;
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
            for verb in ["get", "list", "watch", "update"] {
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

/// A cluster `m` with a multi-node listener `invoices`, its database on
/// the test bed's PostgreSQL, and an agent with a stand-in per node.
struct MultiBed {
    client: Client,
    ns: String,
    servers: Vec<StandIn>,
    agents: Vec<Option<Operator>>,
    claims: Vec<Claims>,
    /// Each node's agent arguments, to start it again.
    args: Vec<Vec<String>>,
    _operator: Operator,
}

async fn multi_bed(prefix: &str, nodes: usize) -> MultiBed {
    let client = admin().await;
    let ns = namespace(&client, prefix).await;
    let operator = Operator::start(&ns);
    database_admin_secret(&client, &ns, "db-admin", &postgres_admin_url()).await;
    let yaml = format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {{name: m}}\n\
         spec:\n  profile: generic\n  mode: stateless\n  image: srv:1\n  replicas: {nodes}\n  \
         database: {{mode: external, external: {{secretRef: {{name: db-admin, key: url}}}}}}\n  \
         listeners: [{{name: invoices, mode: multiNode}}]\n"
    );
    create_yaml(&client, &ns, &yaml).await.expect("create");
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
    let mut b = MultiBed {
        client,
        ns,
        servers: Vec::new(),
        agents: Vec::new(),
        claims: Vec::new(),
        args: Vec::new(),
        _operator: operator,
    };
    for _ in 0..nodes {
        let claim = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = [
            "--listeners",
            listeners,
            "--claim-address",
            &claim,
            "--database-host",
            &text("host"),
            "--database-port",
            &text("port"),
            "--database-name",
            &text("database"),
            "--database-username",
            &text("username"),
            "--database-password",
            &text("password"),
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(HOOKS.map(str::to_owned));
        b.servers.push(StandIn::start().await);
        b.claims.push(Claims::new(&claim));
        b.args.push(args);
        b.agents.push(None);
    }
    for i in 0..nodes {
        b.start_agent(i);
    }
    // Every online node listens.
    for server in &b.servers {
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
    b
}

impl MultiBed {
    fn start_agent(&mut self, node: usize) {
        let args: Vec<&str> = self.args[node].iter().map(String::as_str).collect();
        self.agents[node] = Some(Operator::agent_with(
            &self.ns,
            &format!("m-{node}"),
            &self.servers[node].address,
            &args,
        ));
    }

    /// The cluster database, as the cluster's role.
    async fn database(&self) -> sqlx::PgPool {
        let arg = |flag: &str| {
            let args = &self.args[0];
            let at = args.iter().position(|a| a == flag).expect("flag");
            args[at + 1].clone()
        };
        let url = format!(
            "postgres://{}:{}@{}:{}/{}",
            arg("--database-username"),
            arg("--database-password"),
            arg("--database-host"),
            arg("--database-port"),
            arg("--database-name"),
        );
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("connect")
    }
}

#[tokio::test]
async fn multi_node_claims_process_each_message_exactly_once() {
    let b = multi_bed("lsn-multi", 4).await;
    // Four nodes are delivered the same 10,000 messages at once, each in
    // its own order (as redeliveries arrive anywhere); each server claims,
    // processes and completes what it wins.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, (server, claims)) in b.servers.iter().zip(&b.claims).enumerate() {
        let server = StandIn {
            address: server.address.clone(),
            state: server.state.clone(),
        };
        let claims = claims.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids: Vec<u32> = (0..10_000).collect();
            ids.rotate_left(n * 2500);
            if n % 2 == 1 {
                ids.reverse();
            }
            for chunk in ids.chunks(32) {
                let calls = chunk.iter().map(|id| {
                    let (server, claims) = (&server, &claims);
                    async move {
                        let id = format!("msg-{id}");
                        let answer = server.deliver(claims, "invoices", &id).await;
                        (id, answer)
                    }
                });
                for (id, answer) in futures::future::join_all(calls).await {
                    // 409: processed elsewhere; 423: being processed elsewhere.
                    assert!(
                        [200, 409, 423].contains(&answer.status),
                        "claim of {id}: {answer:?}"
                    );
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("server");
    }
    let took = started.elapsed();
    let mut processed: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_node = Vec::new();
    for server in &b.servers {
        let done = server.lock().processed.clone();
        per_node.push(done.len());
        for id in done {
            *processed.entry(id).or_default() += 1;
        }
    }
    assert_eq!(processed.len(), 10_000, "every message was processed");
    let twice: BTreeSet<_> = processed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");
    assert!(
        per_node.iter().all(|n| *n > 0),
        "every node won some: {per_node:?}"
    );
    eprintln!("40,000 deliveries in {took:?}, processed per node {per_node:?}");
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_claim_of_a_node_killed_mid_way_is_granted_again_after_its_lease_and_completed_once() {
    let mut b = multi_bed("lsn-claimkill", 2).await;
    // m-0 claims a message for 2 s and dies before it completes it.
    let first = b.claims[0].claim("invoices", "order-7", Some(2)).await;
    assert_eq!(first.status, 200, "{first:?}");
    let claimed = Instant::now();
    if let Some(agent) = b.agents[0].as_mut() {
        agent.signal("KILL");
        assert!(agent.wait_exit(Duration::from_secs(5)).await);
    }
    // While the claim lasts, nobody else may process the message, and
    // nobody may report it done either.
    let early = b.claims[1].claim("invoices", "order-7", None).await;
    assert_ne!(early.status, 200, "granted twice while claimed: {early:?}");
    let reprocessed = b.claims[1].complete("invoices", "order-7", 1).await;
    assert_ne!(
        reprocessed.status, 200,
        "another node completed m-0's claim: {reprocessed:?}"
    );
    // After the lease the redelivery to m-1 is granted, as a new attempt.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(claimed.elapsed())).await;
    let again = wait_until(Duration::from_secs(5), "the redelivery granted", || async {
        let answer = b.claims[1].claim("invoices", "order-7", None).await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert!(
        claimed.elapsed() >= Duration::from_secs(2),
        "granted before the first claim's lease ran out"
    );
    let attempt = again.field("attempt").and_then(|a| a.as_i64());
    assert_eq!(attempt, Some(2), "{again:?}");
    let done = b.claims[1].complete("invoices", "order-7", 2).await;
    assert_eq!(done.status, 200, "{done:?}");
    // Completed: refused to everyone from now on, m-0 restarted too, and
    // a stale completion of the first attempt is refused.
    b.start_agent(0);
    for (node, claims) in b.claims.iter().enumerate() {
        let answer = wait_until(Duration::from_secs(20), "claim endpoint", || async {
            let answer = claims.claim("invoices", "order-7", None).await;
            (![0, 503].contains(&answer.status)).then_some(answer)
        })
        .await;
        assert_eq!(answer.status, 409, "m-{node}: {answer:?}");
    }
    let stale = b.claims[0].complete("invoices", "order-7", 1).await;
    assert_eq!(stale.status, 409, "{stale:?}");

    // Pruning: completed rows older than the retention go, unfinished
    // claims and recent completions stay. An agent prunes when it starts.
    let db = b.database().await;
    sqlx::query(
        "UPDATE integration_operator.listener_claims
            SET completed_at = now() - interval '8 days' WHERE message_id = 'order-7'",
    )
    .execute(&db)
    .await
    .expect("age the completed claim");
    for (id, complete) in [("order-8", true), ("order-9", false)] {
        let answer = b.claims[1].claim("invoices", id, Some(1)).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        if complete {
            let done = b.claims[1].complete("invoices", id, 1).await;
            assert_eq!(done.status, 200, "{done:?}");
        }
    }
    sqlx::query(
        "UPDATE integration_operator.listener_claims
            SET claimed_at = now() - interval '30 days', claimed_until = now() - interval '30 days'
          WHERE message_id = 'order-9'",
    )
    .execute(&db)
    .await
    .expect("age the unfinished claim");
    if let Some(mut agent) = b.agents[0].take() {
        agent.signal("TERM");
        agent.wait_exit(Duration::from_secs(10)).await;
    }
    b.start_agent(0);
    let left: Vec<String> = wait_until(Duration::from_secs(20), "pruned", || async {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT message_id FROM integration_operator.listener_claims ORDER BY 1",
        )
        .fetch_all(&db)
        .await
        .ok()?;
        (!ids.iter().any(|id| id == "order-7")).then_some(ids)
    })
    .await;
    assert_eq!(left, ["order-8", "order-9"]);
    delete_namespace(&b.client, &b.ns).await;
}

#[tokio::test]
async fn a_listener_whose_task_died_holding_it_is_disabled_and_its_lease_released() {
    use integration_operator::agent::hooks::Hooks;
    use integration_operator::api::ListenerSpec;
    use integration_operator::listeners::{
        ListenerHooks, Listeners, holder_identity, lease_name, listen, step_down_left_over,
    };
    let client = admin().await;
    let ns = namespace(&client, "lsn-died").await;
    // The Lease as the operator creates it.
    let name = lease_name("l", "orders-in");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": name}})).expect("lease");
    leases
        .create(&Default::default(), &lease)
        .await
        .expect("create the lease");
    let server = StandIn::start().await;
    let hook = |p: &str| Some(format!("/listener/{p}"));
    let listeners = Arc::new(Listeners::new(
        leases.clone(),
        leases,
        holder_identity("l-0", "a1"),
        "l".into(),
        Hooks {
            address: server.address.clone(),
            quiesce: None,
            resume: None,
            in_flight: None,
            health: None,
            authorization: None,
        },
        ListenerHooks {
            enable: hook("enable"),
            disable: hook("disable"),
            renew: hook("renew"),
        },
    ));
    let specs: Vec<ListenerSpec> = serde_json::from_str(LISTENERS).expect("specs");
    let (_eligible, online) = tokio::sync::watch::channel(true);
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(listen(
        listeners.clone(),
        specs[0].clone(),
        online,
        stopping,
    ));
    let epoch = wait_until(Duration::from_secs(10), "the listener enabled", || async {
        server
            .lock()
            .listener
            .iter()
            .find(|c| c.action == ListenerAction::Enable)
            .map(|c| c.epoch)
    })
    .await;
    assert!(lease_holder(&client, &ns, &name).await.is_some());

    // The task dies holding the listener (as in a panic, nothing of it
    // runs any more); what the agent does after any task ended:
    task.abort();
    assert!(task.await.is_err_and(|e| e.is_cancelled()));
    let died = SystemTime::now();
    step_down_left_over(&listeners, &specs).await;
    let calls = server.lock().listener.clone();
    let after: Vec<_> = calls.iter().filter(|c| c.at >= died).collect();
    assert!(
        after
            .iter()
            .any(|c| c.action == ListenerAction::Disable && c.epoch == epoch),
        "disabled under its epoch {epoch}: {calls:#?}"
    );
    assert_eq!(
        lease_holder(&client, &ns, &name).await,
        None,
        "the Lease is free for the next node at once"
    );
    // Nothing renews it any more.
    tokio::time::sleep(RETRY * 2).await;
    let renewed = server
        .lock()
        .listener
        .iter()
        .any(|c| c.at >= died && c.action != ListenerAction::Disable);
    assert!(!renewed, "a dead task's listener was renewed");
    delete_namespace(&client, &ns).await;
}
