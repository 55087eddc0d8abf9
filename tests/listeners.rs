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
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use standin::{ListenerAction, StandIn, overlaps, timeline};
use support::*;
use tokio::net::{TcpListener, TcpStream};

const LEASE: Duration = Duration::from_secs(6);
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
