//! The real node's test bed: the operator installed by its Helm chart from
//! the locally built image, the clusters the scenarios share, and what the
//! tests observe — server logs as the stand-ins wrote them, the client
//! Service's endpoints and pod deletions over time, and a client load loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, LogParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::support::*;

/// Where the scenarios' clusters live; the chart's operator watches only it,
/// so the other tests' operators and clusters are left alone.
pub const NS: &str = "e2e";
pub const OPERATOR_NS: &str = "e2e-operator";
pub const RELEASE: &str = "io";
pub const OPERATOR_IMAGE: &str = "localhost/integration-operator:dev";
pub const STANDIN_IMAGE: &str = "localhost/integration-standin:dev";
pub const POSTGRES_IMAGE: &str = "localhost/postgres:15-debian";
pub const NODE: &str = "real-0";
/// The Lease the chart's operator replicas elect a leader with.
pub const LEADER_LEASE: &str = "integration-operator";

/// One scenario at a time: they share the operator, and some kill it.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn images_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("IMAGES_DIR") {
        return dir.into();
    }
    let cache = std::env::var("INTEGRATION_OPERATOR_CACHE").map_or_else(
        |_| {
            let home = std::env::var("XDG_CACHE_HOME").unwrap_or_else(|_| {
                format!("{}/.cache", std::env::var("HOME").unwrap_or_default())
            });
            PathBuf::from(home).join("integration-operator")
        },
        PathBuf::from,
    );
    cache.join("images")
}

/// The sha256 of the package zip the package server serves.
pub fn package_sha256() -> String {
    let path = images_dir().join("packages.sha256");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; hack/images/build writes it", path.display()));
    text.split_whitespace()
        .nth(1)
        .expect("packages.sha256: `<file> <hex>`")
        .to_owned()
}

/// The real node is there (or the run says why the scenarios are skipped),
/// the operator runs in-cluster under its chart, and the namespace holds
/// the package server. Done once per test binary.
pub fn ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        if !real_node() {
            return false;
        }
        install();
        true
    })
}

/// The real node is Ready; false (the run says why) when
/// INTEGRATION_E2E=skip allows its absence.
pub fn real_node() -> bool {
    let node = kubectl_output(&[
        "get",
        "node",
        NODE,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    if String::from_utf8_lossy(&node.stdout) != "True" {
        let why = "no Ready real node real-0: hack/control-plane/up starts one as root";
        if std::env::var("INTEGRATION_E2E").as_deref() == Ok("skip") {
            eprintln!("SKIPPED (INTEGRATION_E2E=skip): {why}");
            return false;
        }
        panic!("{why} (INTEGRATION_E2E=skip skips these tests)");
    }
    true
}

fn install() {
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "crds/integrationcluster.yaml",
    ]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/integrationclusters.integration.dev",
    ]);
    // A fresh namespace: nothing a previous run left decides this one.
    kubectl(&[
        "delete",
        "namespace",
        NS,
        "--ignore-not-found",
        "--wait=true",
        "--timeout=120s",
    ]);
    kubectl(&["create", "namespace", NS]);
    apply(&package_server());
    let values = state_dir().join("e2e-values.yaml");
    let (repository, tag) = OPERATOR_IMAGE.rsplit_once(':').expect("image:tag");
    // The tag stays `dev` from build to build: the build's stamp in the pod
    // template makes an upgrade roll the operator onto a rebuilt image.
    let stamp = std::fs::read_to_string(images_dir().join("operator.stamp"))
        .unwrap_or_default()
        .trim()
        .chars()
        .take(16)
        .collect::<String>();
    std::fs::write(
        &values,
        format!(
            "image: {{repository: {repository}, tag: {tag}, pullPolicy: Never}}\n\
             watchNamespace: {NS}\n\
             logFormat: text\n\
             podAnnotations: {{e2e/image: \"{stamp}\"}}\n\
             nodeSelector: {{type: real}}\n\
             tolerations: [{{key: test-bed/real-node, operator: Exists, effect: NoSchedule}}]\n"
        ),
    )
    .expect("write values");
    helm(&[
        "upgrade",
        "--install",
        RELEASE,
        repo("charts/integration-operator")
            .to_str()
            .unwrap_or_default(),
        "--namespace",
        OPERATOR_NS,
        "--create-namespace",
        "--values",
        values.to_str().unwrap_or_default(),
    ]);
    let operator = format!("{RELEASE}-integration-operator");
    rolled_out(OPERATOR_NS, &operator, "180s").unwrap_or_else(|why| panic!("{why}"));
    // The package server is the test bed's, not the product's: one stuck
    // start is retried from scratch, and the run shows what the first saw.
    if let Err(why) = rolled_out(NS, "packages", "120s") {
        println!("RETRY the package server, once:\n{why}");
        kubectl(&["delete", "-n", NS, "deployment/packages", "--wait=true"]);
        apply(&package_server());
        rolled_out(NS, "packages", "120s").unwrap_or_else(|why| panic!("{why}"));
    }
}

/// `kubectl rollout status` of a Deployment; when it times out, the error
/// carries what a person would look at next: the workloads, the pods and
/// the namespace's events (a failed pod create shows only there).
fn rolled_out(ns: &str, deployment: &str, timeout: &str) -> Result<(), String> {
    let status = kubectl_output(&[
        "rollout",
        "status",
        "-n",
        ns,
        &format!("deployment/{deployment}"),
        &format!("--timeout={timeout}"),
    ]);
    if status.status.success() {
        return Ok(());
    }
    let show = |args: &[&str]| {
        let out = kubectl_output(args);
        format!(
            "$ kubectl {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    Err(format!(
        "deployment {ns}/{deployment} not rolled out within {timeout}: {}\n{}\n{}\n{}",
        String::from_utf8_lossy(&status.stderr),
        show(&[
            "get",
            "deployments,replicasets,pods",
            "-n",
            ns,
            "-o",
            "wide"
        ]),
        show(&["get", "events", "-n", ns, "--sort-by=.lastTimestamp"]),
        show(&["describe", "pods", "-n", ns]),
    ))
}

/// The stand-in image in file-server mode: the init containers download
/// the package zip from it by its Service's cluster DNS name. It runs under
/// its own ServiceAccount, applied with it: the namespace's `default` one
/// comes from the controller-manager some time after the namespace, a pod
/// created before it is refused, and the ReplicaSet retries on a doubling
/// backoff. That is one way the rollout can time out, as it once did in CI
/// with nothing more said; `rolled_out` now says what happened.
fn package_server() -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: packages, namespace: {NS}}}
automountServiceAccountToken: false
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: packages, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: packages}}}}
  template:
    metadata: {{labels: {{app: packages}}}}
    spec:
      nodeSelector: {{type: real}}
      tolerations: [{{key: test-bed/real-node, operator: Exists, effect: NoSchedule}}]
      serviceAccountName: packages
      automountServiceAccountToken: false
      securityContext: {{runAsNonRoot: true, runAsUser: 65532}}
      containers:
      - name: server
        image: {STANDIN_IMAGE}
        imagePullPolicy: Never
        env: [{{name: PRIMARY_PORT, value: "8080"}}, {{name: DIAGNOSTIC_PORT, value: "8081"}}]
        readinessProbe: {{httpGet: {{path: /health/readiness, port: 8080}}, periodSeconds: 1}}
        securityContext: {{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: packages, namespace: {NS}}}
spec:
  selector: {{app: packages}}
  ports: [{{port: 80, targetPort: 8080}}]
"#
    )
}

/// kubectl apply of `yaml`, server-side, as a person would.
pub fn apply(yaml: &str) {
    let path = state_dir().join(format!("e2e-{}.yaml", unique("apply")));
    std::fs::write(&path, yaml).expect("write manifest");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        path.to_str().unwrap_or_default(),
    ]);
    let _ = std::fs::remove_file(path);
}

/// Pods of the cluster's server, by name, on the real node.
pub async fn server_pods(client: &Client, cluster: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let params = kube::api::ListParams::default().labels(&format!(
        "integration.dev/cluster={cluster},app.kubernetes.io/component=server"
    ));
    let mut list = pods
        .list(&params)
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    list.sort_by_key(ResourceExt::name_any);
    list
}

/// The holder of a Lease, if any.
pub async fn lease_holder(client: &Client, ns: &str, name: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// SIGKILLs every container of `pod` on the real node through its
/// containerd, as a crashing process would end: no signal handler runs.
pub fn kill_containers(pod: &Pod) {
    let socket = state_dir().join("real-node/run/containerd.sock");
    let ids: Vec<String> = pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .filter_map(|c| c.container_id.clone())
        .map(|id| id.trim_start_matches("containerd://").to_owned())
        .collect();
    assert!(
        !ids.is_empty(),
        "{} has no running containers",
        pod.name_any()
    );
    for id in ids {
        let status = Command::new("ctr")
            .args(["--address", socket.to_str().unwrap_or_default()])
            .args(["-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", &id])
            .status()
            .expect("run ctr");
        assert!(status.success(), "ctr tasks kill {id}");
    }
}

/// One line a stand-in server logged, with the pod that logged it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub pod: String,
    pub at: i64,
    pub event: String,
    pub line: Value,
}

impl Logged {
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.line.get(key)
    }
}

/// Every line the server containers of the namespace's pods log, collected
/// from the moment of `start`; pods that appear later are followed too, and
/// a restarted container's log is read again from its start.
pub struct ServerLogs {
    lines: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerLogs {
    pub fn start(client: &Client, selector: &str) -> Self {
        let lines: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let config = watcher::Config::default().labels(selector);
        let sink = lines.clone();
        let task = tokio::spawn(async move {
            // One follower per container instance (pod uid + restart count).
            let mut following: BTreeSet<String> = BTreeSet::new();
            let mut stream = watcher(pods.clone(), config).applied_objects().boxed();
            while let Ok(Some(pod)) = stream.try_next().await {
                let Some(status) = pod.status.as_ref() else {
                    continue;
                };
                let server = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .find(|c| c.name == "server");
                let Some(server) = server else { continue };
                if server
                    .state
                    .as_ref()
                    .and_then(|s| s.running.as_ref())
                    .is_none()
                {
                    continue;
                }
                let key = format!("{}/{}", pod.uid().unwrap_or_default(), server.restart_count);
                if !following.insert(key) {
                    continue;
                }
                let (pods, sink, name) = (pods.clone(), sink.clone(), pod.name_any());
                tokio::spawn(async move { follow(pods, name, sink).await });
            }
        });
        Self { lines, task }
    }

    /// Everything logged so far, in time order.
    pub fn all(&self) -> Vec<Logged> {
        let lines = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<Logged> = lines
            .iter()
            .flat_map(|(pod, set)| {
                set.iter().filter_map(|l| {
                    let line: Value = serde_json::from_str(l).ok()?;
                    Some(Logged {
                        pod: pod.clone(),
                        at: line.get("unix_ms")?.as_i64()?,
                        event: line.get("event")?.as_str()?.to_owned(),
                        line,
                    })
                })
            })
            .collect();
        all.sort_by_key(|l| l.at);
        all
    }

    /// The lines of one pod's server with one of `events`.
    pub fn of(&self, pod: &str, events: &[&str]) -> Vec<Logged> {
        self.all()
            .into_iter()
            .filter(|l| l.pod == pod && events.contains(&l.event.as_str()))
            .collect()
    }

    /// Waits until `pod` logged `event` at or after `since`; its time.
    pub async fn when(&self, pod: &str, event: &str, since: i64, timeout: Duration) -> i64 {
        wait_until(timeout, &format!("{pod} logs {event}"), || async {
            self.of(pod, &[event])
                .into_iter()
                .find(|l| l.at >= since)
                .map(|l| l.at)
        })
        .await
    }
}

impl Drop for ServerLogs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(
    pods: Api<Pod>,
    name: String,
    sink: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
) {
    let params = LogParams {
        container: Some("server".into()),
        follow: true,
        ..LogParams::default()
    };
    let Ok(stream) = pods.log_stream(&name, &params).await else {
        return;
    };
    let mut lines = stream.lines();
    while let Some(Ok(line)) = lines.next().await {
        if line.starts_with('{') {
            sink.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(name.clone())
                .or_default()
                .insert(line);
        }
    }
}

/// Ready endpoint pod names at each change, with the time of the change.
type Timeline = Arc<Mutex<Vec<(i64, BTreeSet<String>)>>>;

/// The ready endpoints of a Service over time, and when pods began to be
/// deleted: what a client would have been routed to.
pub struct Observer {
    /// (time, ready endpoint pod names) at every change.
    pub endpoints: Timeline,
    /// Pod name → first time it was seen with a deletion timestamp.
    pub deleted: Arc<Mutex<BTreeMap<String, i64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Observer {
    pub fn start(client: &Client, service: &str, cluster: &str) -> Self {
        let endpoints: Timeline = Arc::default();
        let deleted: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
        let config =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let sink = endpoints.clone();
        let a = tokio::spawn(async move {
            let mut stream = watcher(slices, config).applied_objects().boxed();
            while let Ok(Some(slice)) = stream.try_next().await {
                let ready: BTreeSet<String> = slice
                    .endpoints
                    .iter()
                    .flatten()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .filter_map(|e| e.target_ref.as_ref().and_then(|t| t.name.clone()))
                    .collect();
                let mut seen = sink
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if seen.last().map(|(_, s)| s) != Some(&ready) {
                    seen.push((now_ms(), ready));
                }
            }
        });
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let config = watcher::Config::default().labels(&format!(
            "integration.dev/cluster={cluster},app.kubernetes.io/component=server"
        ));
        let sink = deleted.clone();
        let b = tokio::spawn(async move {
            let mut stream = watcher(pods, config).applied_objects().boxed();
            while let Ok(Some(pod)) = stream.try_next().await {
                if pod.metadata.deletion_timestamp.is_some() {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(pod.name_any())
                        .or_insert_with(now_ms);
                }
            }
        });
        Self {
            endpoints,
            deleted,
            tasks: vec![a, b],
        }
    }

    /// The first time after `since` that `pod` was not a ready endpoint.
    pub fn left(&self, pod: &str, since: i64) -> Option<i64> {
        self.first_change(since, |ready| !ready.contains(pod))
    }

    /// The first time after `since` that `pod` was a ready endpoint.
    pub fn joined(&self, pod: &str, since: i64) -> Option<i64> {
        self.first_change(since, |ready| ready.contains(pod))
    }

    fn first_change(&self, since: i64, is: impl Fn(&BTreeSet<String>) -> bool) -> Option<i64> {
        let seen = self
            .endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.iter()
            .find(|(at, ready)| *at >= since && is(ready))
            .map(|(at, _)| *at)
    }

    /// The fewest ready endpoints seen after `since`.
    pub fn min_ready(&self, since: i64) -> usize {
        let seen = self
            .endpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The state in force at `since` counts too.
        let before = seen
            .iter()
            .rev()
            .find(|(at, _)| *at < since)
            .map(|(_, s)| s.len());
        seen.iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, s)| s.len())
            .chain(before)
            .min()
            .unwrap_or(0)
    }

    pub fn deleted_at(&self, pod: &str) -> Option<i64> {
        self.deleted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(pod)
            .copied()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a client loop saw.
#[derive(Debug, Default)]
pub struct Load {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, with what went wrong.
    pub failures: Vec<String>,
}

/// `workers` clients sending requests one after another to `address`
/// (host:port, the Service's ClusterIP: kube-proxy routes it on this host)
/// until `stop` is set; each request is bounded by 5 s.
pub fn load(
    address: String,
    workers: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Load> {
    tokio::spawn(async move {
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (address, stop) = (address.clone(), stop.clone());
            handles.push(tokio::spawn(async move {
                let mut load = Load::default();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_secs(5), request(&address)).await {
                        Ok(Ok(())) => load.ok += 1,
                        Ok(Err(e)) => fail(&mut load, e),
                        Err(_) => fail(&mut load, "no answer within 5 s".into()),
                    }
                }
                load
            }));
        }
        let mut total = Load::default();
        for h in handles {
            if let Ok(l) = h.await {
                total.ok += l.ok;
                total.failed += l.failed;
                total.failures.extend(l.failures);
            }
        }
        total
    })
}

fn fail(load: &mut Load, why: String) {
    load.failed += 1;
    if load.failures.len() < 10 {
        load.failures.push(format!("{}: {why}", now_ms()));
    }
}

/// One client request on a new connection, as a load balancer's client
/// would open it: GET /work, answered after the stand-in's work time.
async fn request(address: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::get("/work?ms=50")
        .header("host", address)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    conn.abort();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

/// Time since `start`, in milliseconds, for the report lines.
pub fn ms_since(start: Instant) -> u128 {
    start.elapsed().as_millis()
}
