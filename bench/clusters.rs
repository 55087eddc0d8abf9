//! `hack/bench --only clusters`: the operator against a bare StatefulSet
//! (podManagementPolicy Parallel) of the same pods, measured in the same run
//! on the local control plane with kwok nodes (issue 14).
//!
//! 1. Single cluster: apply one IntegrationCluster (generic, stateless, 3
//!    replicas) → phase Ready, against one StatefulSet → 3 pods Ready;
//!    trials alternate between the two, each polled every 20 ms.
//! 2. N clusters × 3 created by a concurrent client; from the last create to
//!    all Ready, against N StatefulSets created the same way.
//! 3. The operator's RSS (/proc/<pid>/status VmRSS) through the burst and
//!    after a restart, and the full resync: from the restarted operator's
//!    start to the moment its log has said "reconciled" for every cluster.
//! 4. The operator's writes from the API server's audit log (which logs
//!    writes only): per cluster created alone and in the burst, in a settled
//!    window, and during the resync.
//!
//! The operator is the release binary beside this example, run as its own
//! RBAC-limited user (`operator.kubeconfig`), as `make demo` does. Progress
//! goes to stderr, the markdown tables to stdout; the exit status is
//! non-zero only when the harness fails, never for a slow result.

#[path = "plane.rs"]
mod plane;
#[path = "stats.rs"]
mod stats;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use integration_operator::api::{IntegrationCluster, Phase};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use plane::{
    admin_kubeconfig, client_for, create_namespace, install_crd, operator_binary, state_dir,
    wait_for,
};
use stats::{duration_cell, median_p95_of, mib_cell, ratio_cell};

const REPLICAS: i32 = 3;
/// The operator's user in the audit log (hack/control-plane/operator-user-binding.yaml).
const OPERATOR_USER: &str = "integration-operator";
/// How often single-cluster trials look for Ready: both systems alike.
const TRIAL_POLL: Duration = Duration::from_millis(20);
const BULK_POLL: Duration = Duration::from_millis(250);
const RSS_EVERY: Duration = Duration::from_millis(200);
const TRIAL_TIMEOUT: Duration = Duration::from_secs(120);
/// After Ready, how long a single trial's writes are still counted.
const TRIAL_SETTLE: Duration = Duration::from_secs(2);
/// After a restart's resync, how long RSS is sampled for its steady value.
const RESTART_STEADY: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(about = "The operator against bare StatefulSets: latency, N clusters, RSS, writes")]
struct Args {
    /// Clusters (and StatefulSets) in the bulk run.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    clusters: u32,
    /// Single-cluster trials per system.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    trials: u32,
    /// Creates in flight at once in the bulk run.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,
    /// The settled window in which writes are counted (seconds).
    #[arg(long, default_value_t = 60)]
    settle_seconds: u64,
    /// The controller-manager's --kube-api-qps and --kube-api-burst, as
    /// hack/bench started it (printed in the table).
    #[arg(long, env = "KCM_API_QPS", default_value = "20")]
    kcm_qps: String,
    #[arg(long, env = "KCM_API_BURST", default_value = "30")]
    kcm_burst: String,
    /// kwok nodes' pod capacity, as hack/bench set it (printed in the table).
    #[arg(long, env = "KWOK_NODE_PODS", default_value = "110")]
    node_pods: String,
}

// ---------------------------------------------------------------- pure parts

/// Writes counted in the audit log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Writes {
    total: u32,
    /// Of which to an IntegrationCluster's status.
    status: u32,
    /// Of which to a pod's status (the readiness gate).
    gates: u32,
    /// Distinct other objects written (what the operator owns).
    objects: u32,
    /// Of which the API server refused (4xx, 5xx), e.g. a create of a pod
    /// that exists.
    refused: u32,
}

/// The completed writes by `user` on objects in `ns` among audit log lines.
fn count_writes(text: &str, ns: &str, user: &str) -> Writes {
    // The log holds every namespace's writes: parse only lines that can be about `ns`.
    let marker = format!("\"namespace\":\"{ns}\"");
    let mut writes = Writes::default();
    let mut objects = BTreeSet::new();
    for entry in text
        .lines()
        .filter(|line| line.contains(&marker))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| {
            e["stage"] == "ResponseComplete"
                && e["objectRef"]["namespace"] == ns
                && e["user"]["username"] == user
        })
    {
        writes.total += 1;
        let object = &entry["objectRef"];
        let resource = object["resource"].as_str().unwrap_or_default();
        match (resource, object["subresource"].as_str()) {
            ("integrationclusters", Some("status")) => writes.status += 1,
            ("pods", Some("status")) => writes.gates += 1,
            ("integrationclusters" | "events", _) | (_, Some(_)) => {}
            (_, None) => {
                objects.insert((
                    resource.to_owned(),
                    object["name"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
        if entry["responseStatus"]["code"].as_u64().unwrap_or(0) >= 400 {
            writes.refused += 1;
        }
    }
    writes.objects = u32::try_from(objects.len()).unwrap_or(u32::MAX);
    writes
}

/// VmRSS in bytes from the text of /proc/<pid>/status.
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Peak and steady (median) RSS: the peak over `all`, the median of `steady`.
fn peak_and_steady(all: &[u64], steady: &[u64]) -> Option<(u64, u64)> {
    let peak = all.iter().chain(steady).copied().max()?;
    let mut sorted = steady.to_vec();
    sorted.sort_unstable();
    let median = *sorted.get(sorted.len().checked_sub(1)? / 2)?;
    Some((peak, median))
}

/// Names the operator's JSON log says it reconciled (the driver's
/// "reconciled" line, one per successful reconcile).
fn reconciled_names(log: &str) -> BTreeSet<String> {
    log.lines()
        .filter(|line| line.contains("\"reconciled\""))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["message"] == "reconciled")
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect()
}

/// Single-cluster trials.
#[derive(Debug, Default)]
struct Latency {
    statefulset: Vec<Duration>,
    operator: Vec<Duration>,
    /// The operator's writes per trial, from create to Ready + [`TRIAL_SETTLE`].
    writes: Vec<Writes>,
}

/// The bulk run.
#[derive(Debug, Default)]
struct Bulk {
    operator: Option<Duration>,
    statefulset: Option<Duration>,
    /// Peak and steady RSS through the burst and the settled window.
    rss_burst: Option<(u64, u64)>,
    /// Peak during the resync and steady after it.
    rss_restart: Option<(u64, u64)>,
    resync: Option<Duration>,
    writes_burst: Writes,
    writes_settled: Writes,
    writes_resync: Writes,
}

struct Settings {
    clusters: u32,
    trials: u32,
    concurrency: u32,
    settle: Duration,
    kcm_qps: String,
    kcm_burst: String,
    node_pods: String,
    nodes: usize,
}

fn median_writes(writes: &[Writes]) -> Option<Writes> {
    let pick = |f: fn(&Writes) -> u32| {
        let mut v: Vec<u32> = writes.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len().checked_sub(1)? / 2).copied()
    };
    Some(Writes {
        total: pick(|w| w.total)?,
        status: pick(|w| w.status)?,
        gates: pick(|w| w.gates)?,
        objects: pick(|w| w.objects)?,
        refused: pick(|w| w.refused)?,
    })
}

/// Writes (per cluster when `n` > 1) with what they were.
fn writes_cell(w: Writes, n: u32) -> String {
    let n = f64::from(n.max(1));
    let per = |x: u32| {
        let v = f64::from(x) / n;
        if v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    };
    let mut cell = format!(
        "{}: {} objects, {} cluster status, {} pod status (gate)",
        per(w.total),
        per(w.objects),
        per(w.status),
        per(w.gates)
    );
    if w.refused > 0 {
        cell.push_str(&format!(", {} refused", per(w.refused)));
    }
    cell
}

fn rss_cell(rss: Option<(u64, u64)>) -> String {
    rss.map_or_else(
        || "n/a".into(),
        |(peak, steady)| format!("{} / {}", mib_cell(peak), mib_cell(steady)),
    )
}

fn table(settings: &Settings, latency: &Result<Latency>, bulk: &Result<Bulk>) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Operator against bare StatefulSets (podManagementPolicy Parallel, same pod shape), \
         generic profile, stateless, {REPLICAS} replicas, on {} kwok nodes ({} pods each). \
         kube-controller-manager --kube-api-qps={} --kube-api-burst={}; \
         operator: release build, default settings (--max-concurrent-reconciles 8), \
         as its own RBAC-limited user.\n\n",
        settings.nodes, settings.node_pods, settings.kcm_qps, settings.kcm_burst
    ));
    out.push_str(&format!(
        "Single cluster, {} trials per system (alternating), apply → all Ready, polled every {} ms.\n\n",
        settings.trials,
        TRIAL_POLL.as_millis()
    ));
    out.push_str("| measure | StatefulSet median | StatefulSet p95 | operator median | operator p95 | operator / StatefulSet (median, p95) | target |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    match latency {
        Ok(l) => {
            let cells = |s: &[Duration]| median_p95_of(s);
            match (cells(&l.statefulset), cells(&l.operator)) {
                (Some((sm, sp)), Some((om, op))) => out.push_str(&format!(
                    "| one {REPLICAS}-node cluster, apply → all Ready | {} | {} | {} | {} | {}, {} | ≤ 1.10× |\n",
                    duration_cell(sm),
                    duration_cell(sp),
                    duration_cell(om),
                    duration_cell(op),
                    ratio_cell(om, sm),
                    ratio_cell(op, sp)
                )),
                _ => out.push_str(
                    "| one cluster, apply → all Ready | n/a | n/a | n/a | n/a | n/a | ≤ 1.10× |\n",
                ),
            }
            if let Some(w) = median_writes(&l.writes) {
                out.push_str(&format!(
                    "| operator writes to create one cluster (median of trials) | — | — | {} | | | ≤ objects + 2 |\n",
                    writes_cell(w, 1)
                ));
            }
        }
        Err(e) => out.push_str(&format!("\nharness failure: {e:#}\n")),
    }
    out.push('\n');
    let n = settings.clusters;
    out.push_str(&format!(
        "{n} clusters × {REPLICAS} (and {n} StatefulSets × {REPLICAS}), created by {} concurrent clients; \
         settled window {} s.\n\n",
        settings.concurrency,
        settings.settle.as_secs()
    ));
    out.push_str("| measure | StatefulSet (Parallel) | operator | target |\n");
    out.push_str("|---|---:|---:|---|\n");
    match bulk {
        Ok(b) => {
            let ours = match (b.operator, b.statefulset) {
                (Some(o), Some(s)) => format!("{} ({})", duration_cell(o), ratio_cell(o, s)),
                (Some(o), None) => duration_cell(o),
                (None, _) => "not all Ready".into(),
            };
            let theirs = b
                .statefulset
                .map_or_else(|| "not all Ready".into(), duration_cell);
            out.push_str(&format!(
                "| last create → all Ready | {theirs} | {ours} | ≤ 1.0× |\n"
            ));
            out.push_str(&format!(
                "| operator RSS through the burst and the settled window, peak / steady | — | {} | < 50 MiB |\n",
                rss_cell(b.rss_burst)
            ));
            out.push_str(&format!(
                "| operator RSS after a restart, peak (resync) / steady | — | {} | < 50 MiB |\n",
                rss_cell(b.rss_restart)
            ));
            out.push_str(&format!(
                "| full resync after a restart (start → every cluster reconciled once) | — | {} | ≤ 5 s |\n",
                b.resync
                    .map_or_else(|| "incomplete".into(), |d| format!("{:.2} s", d.as_secs_f64()))
            ));
            out.push_str(&format!(
                "| operator writes per cluster in the burst | — | {} | ≤ objects + 2 |\n",
                writes_cell(b.writes_burst, n)
            ));
            out.push_str(&format!(
                "| operator writes in the settled {} s | — | {} | 0 |\n",
                settings.settle.as_secs(),
                writes_cell(b.writes_settled, 1)
            ));
            out.push_str(&format!(
                "| operator writes from the restart to {} s after the resync | — | {} | 0 |\n",
                RESTART_STEADY.as_secs(),
                writes_cell(b.writes_resync, 1)
            ));
        }
        Err(e) => out.push_str(&format!("\nharness failure: {e:#}\n")),
    }
    out.push_str(
        "\nReady: the IntegrationCluster's phase Ready at its generation; a StatefulSet's \
         readyReplicas = replicas. RSS: VmRSS sampled every 200 ms; steady is the median over \
         the settled window (burst) or the 30 s after the resync (restart). Writes: the \
         operator user's completed writes in the run's namespace, from the audit log (which \
         logs writes only); objects: distinct objects other than the cluster (and Events) \
         it wrote, i.e. what it owns; refused: answered 4xx/5xx.\n",
    );
    out
}

// ---------------------------------------------------------------- the operator

/// RSS samples of one process, taken in the background.
#[derive(Clone, Default)]
struct Rss(Arc<Mutex<Vec<(Instant, u64)>>>);

impl Rss {
    fn sample(&self, pid: u32) -> tokio::task::JoinHandle<()> {
        let samples = self.clone();
        tokio::spawn(async move {
            let path = format!("/proc/{pid}/status");
            while let Some(rss) = std::fs::read_to_string(&path)
                .ok()
                .as_deref()
                .and_then(vm_rss)
            {
                samples
                    .0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((Instant::now(), rss));
                tokio::time::sleep(RSS_EVERY).await;
            }
        })
    }

    fn between(&self, from: Instant, to: Instant) -> Vec<u64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|(_, rss)| *rss)
            .collect()
    }
}

struct Operator {
    child: Child,
    log: PathBuf,
    started: Instant,
    rss: Rss,
    sampler: tokio::task::JoinHandle<()>,
}

impl Operator {
    fn start(bin: &Path, state: &Path, log: PathBuf) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let started = Instant::now();
        let child = Command::new(bin)
            .args(["run", "--log-format", "json"])
            .env("KUBECONFIG", state.join("operator.kubeconfig"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let rss = Rss::default();
        let sampler = rss.sample(child.id());
        eprintln!(
            "[bench] operator pid {} (log {})",
            child.id(),
            log.display()
        );
        Ok(Self {
            child,
            log,
            started,
            rss,
            sampler,
        })
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the operator exited ({status}); see {}", self.log.display());
        }
        Ok(())
    }

    fn reconciled(&self) -> BTreeSet<String> {
        std::fs::read_to_string(&self.log)
            .map(|text| reconciled_names(&text))
            .unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s.
    async fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                self.child.kill()?;
                self.child.wait()?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.sampler.abort();
        Ok(())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.sampler.abort();
    }
}

// ---------------------------------------------------------------- audit log

struct Audit(PathBuf);

impl Audit {
    fn end(&self) -> u64 {
        std::fs::metadata(&self.0).map_or(0, |m| m.len())
    }

    fn writes(&self, from: u64, ns: &str) -> Result<Writes> {
        let mut file = File::open(&self.0).with_context(|| format!("open {}", self.0.display()))?;
        file.seek(std::io::SeekFrom::Start(from))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(count_writes(&text, ns, OPERATOR_USER))
    }
}

// ---------------------------------------------------------------- objects

fn cluster(name: &str) -> Result<IntegrationCluster> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "integration.dev/v1alpha1",
        "kind": "IntegrationCluster",
        "metadata": {"name": name},
        "spec": {
            "profile": "generic",
            "mode": "stateless",
            "replicas": REPLICAS,
            "image": "registry.example.com/srv:1",
        },
    }))?)
}

/// The operator's pod with what only the operator can satisfy taken out:
/// its readiness gate, volumes (ConfigMaps and Secrets it owns), its
/// service account, and placement by node name or affinity to its own
/// pods. The containers (images, ports, resources, env) stay.
fn baseline_pod_spec(pod: &Pod) -> Result<Value> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| anyhow!("the operator's pod has no spec"))?;
    let mut spec: PodSpec = spec.clone();
    spec.readiness_gates = None;
    spec.volumes = None;
    spec.service_account_name = None;
    spec.service_account = None;
    spec.node_name = None;
    spec.hostname = None;
    spec.subdomain = None;
    spec.affinity = None;
    spec.topology_spread_constraints = None;
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        c.volume_mounts = None;
    }
    Ok(serde_json::to_value(spec)?)
}

fn statefulset(name: &str, pod_spec: &Value) -> Result<StatefulSet> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": REPLICAS,
            "podManagementPolicy": "Parallel",
            "serviceName": name,
            "selector": {"matchLabels": {"bench": name}},
            "template": {"metadata": {"labels": {"bench": name}}, "spec": pod_spec},
        },
    }))?)
}

fn cluster_ready(ic: &IntegrationCluster) -> bool {
    ic.status.as_ref().is_some_and(|s| {
        s.observed_generation == ic.metadata.generation && s.phase == Some(Phase::Ready)
    })
}

fn statefulset_ready(sts: &StatefulSet) -> bool {
    sts.status.as_ref().is_some_and(|s| {
        s.observed_generation == sts.metadata.generation && s.ready_replicas == Some(REPLICAS)
    })
}

async fn no_pods(client: &Client, ns: &str, timeout: Duration) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for(timeout, "the pods to be gone", || async {
        pods.list(&ListParams::default())
            .await
            .ok()
            .filter(|l| l.items.is_empty())
            .map(|_| ())
    })
    .await
}

// ---------------------------------------------------------------- runs

struct Bench {
    args: Args,
    state: PathBuf,
    operator_bin: PathBuf,
    client: Client,
    audit: Audit,
}

impl Bench {
    /// The trials, and the pod spec the StatefulSets run.
    async fn latency(&self, operator: &mut Operator) -> Result<(Latency, Value)> {
        let ns = create_namespace(&self.client, "bench-one").await?;
        eprintln!("[bench] single-cluster trials in namespace {ns}");
        let result = self.latency_in(&ns, operator).await;
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&ns, &DeleteParams::background())
            .await;
        result
    }

    async fn latency_in(&self, ns: &str, operator: &mut Operator) -> Result<(Latency, Value)> {
        let ics: Api<IntegrationCluster> = Api::namespaced(self.client.clone(), ns);
        let stss: Api<StatefulSet> = Api::namespaced(self.client.clone(), ns);
        let mut latency = Latency::default();
        let mut pod_spec = None;
        for trial in 0..self.args.trials {
            operator.check_running()?;
            let name = format!("one-{trial}");
            let from = self.audit.end();
            let t0 = Instant::now();
            ics.create(&PostParams::default(), &cluster(&name)?).await?;
            wait_for_fast(&format!("cluster {name} Ready"), || async {
                ics.get(&name).await.ok().filter(cluster_ready).map(|_| ())
            })
            .await?;
            let took = t0.elapsed();
            latency.operator.push(took);
            tokio::time::sleep(TRIAL_SETTLE).await;
            let writes = self.audit.writes(from, ns)?;
            eprintln!(
                "[bench] trial {trial}: operator {} ms, {} writes ({} status)",
                took.as_millis(),
                writes.total,
                writes.status
            );
            latency.writes.push(writes);
            if pod_spec.is_none() {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
                let pod = pods
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .find(|p| p.owner_references().iter().any(|o| o.name == name))
                    .ok_or_else(|| anyhow!("no pod of cluster {name}"))?;
                pod_spec = Some(baseline_pod_spec(&pod)?);
            }
            ics.delete(&name, &DeleteParams::default()).await?;
            wait_for(TRIAL_TIMEOUT, "the cluster to be gone", || async {
                ics.get_opt(&name)
                    .await
                    .ok()
                    .and_then(|o| o.is_none().then_some(()))
            })
            .await?;
            no_pods(&self.client, ns, TRIAL_TIMEOUT).await?;

            let spec = pod_spec
                .as_ref()
                .ok_or_else(|| anyhow!("no pod spec for the StatefulSet"))?;
            let name = format!("sts-{trial}");
            let t0 = Instant::now();
            stss.create(&PostParams::default(), &statefulset(&name, spec)?)
                .await?;
            wait_for_fast(&format!("StatefulSet {name} Ready"), || async {
                stss.get(&name)
                    .await
                    .ok()
                    .filter(statefulset_ready)
                    .map(|_| ())
            })
            .await?;
            let took = t0.elapsed();
            eprintln!("[bench] trial {trial}: StatefulSet {} ms", took.as_millis());
            latency.statefulset.push(took);
            stss.delete(&name, &DeleteParams::background()).await?;
            no_pods(&self.client, ns, TRIAL_TIMEOUT).await?;
        }
        let spec = pod_spec.ok_or_else(|| anyhow!("no trial ran"))?;
        Ok((latency, spec))
    }

    /// Creates `n` objects with `make(i)` through `create`, `concurrency`
    /// in flight; returns when the last create has been answered.
    async fn create_all<F, Fut>(&self, n: u32, create: F) -> Result<Instant>
    where
        F: Fn(u32) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        futures::stream::iter(0..n)
            .map(create)
            .buffer_unordered(self.args.concurrency as usize)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(Instant::now())
    }

    fn bulk_timeout(&self) -> Duration {
        Duration::from_secs(300 + 2 * u64::from(self.args.clusters))
    }

    async fn bulk(&self, operator: Operator, bulk: &mut Bulk) -> Result<()> {
        let ns = create_namespace(&self.client, "bench-n").await?;
        eprintln!("[bench] {} clusters in namespace {ns}", self.args.clusters);
        let result = self.bulk_in(&ns, operator, bulk).await;
        if result.is_err() {
            // Without the operator its finalizers stay: the namespace is
            // left terminating for the next operator to finish.
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(&ns, &DeleteParams::background())
                .await;
        }
        result
    }

    async fn bulk_in(&self, ns: &str, mut operator: Operator, bulk: &mut Bulk) -> Result<()> {
        let n = self.args.clusters;
        let ics: Api<IntegrationCluster> = Api::namespaced(self.client.clone(), ns);
        let from = self.audit.end();
        let burst_start = Instant::now();
        let last = self
            .create_all(n, |i| {
                let ics = ics.clone();
                async move {
                    ics.create(&PostParams::default(), &cluster(&format!("c-{i:05}"))?)
                        .await?;
                    Ok(())
                }
            })
            .await?;
        eprintln!(
            "[bench] {n} clusters created in {:.1} s",
            burst_start.elapsed().as_secs_f64()
        );
        wait_for_slow(self.bulk_timeout(), "every cluster Ready", || async {
            let list = ics.list(&ListParams::default()).await.ok()?;
            let ready = list.items.iter().filter(|ic| cluster_ready(ic)).count();
            (ready == n as usize).then_some(())
        })
        .await?;
        bulk.operator = Some(last.elapsed());
        eprintln!(
            "[bench] all Ready {:.1} s after the last create",
            last.elapsed().as_secs_f64()
        );
        operator.check_running()?;
        // A few seconds for the last status writes, then the settled window.
        tokio::time::sleep(Duration::from_secs(5)).await;
        bulk.writes_burst = self.audit.writes(from, ns)?;
        let settled_from = self.audit.end();
        let window_start = Instant::now();
        tokio::time::sleep(Duration::from_secs(self.args.settle_seconds)).await;
        bulk.writes_settled = self.audit.writes(settled_from, ns)?;
        let now = Instant::now();
        bulk.rss_burst = peak_and_steady(
            &operator.rss.between(burst_start, now),
            &operator.rss.between(window_start, now),
        );
        operator.check_running()?;

        eprintln!("[bench] restarting the operator");
        let log = operator.log.with_file_name("bench-operator-restart.log");
        operator.stop().await?;
        let resync_from = self.audit.end();
        let mut operator = Operator::start(&self.operator_bin, &self.state, log)?;
        let names: BTreeSet<String> = (0..n).map(|i| format!("c-{i:05}")).collect();
        let resynced = wait_for(self.bulk_timeout(), "every cluster reconciled", || {
            let done = operator.reconciled().is_superset(&names);
            async move { done.then(Instant::now) }
        })
        .await;
        match resynced {
            Ok(at) => {
                bulk.resync = Some(at - operator.started);
                eprintln!(
                    "[bench] resync {:.2} s",
                    (at - operator.started).as_secs_f64()
                );
                tokio::time::sleep(RESTART_STEADY).await;
                let now = Instant::now();
                bulk.rss_restart = peak_and_steady(
                    &operator.rss.between(operator.started, now),
                    &operator.rss.between(at, now),
                );
            }
            Err(e) => eprintln!("[bench] {e:#}"),
        }
        bulk.writes_resync = self.audit.writes(resync_from, ns)?;
        operator.check_running()?;
        // The operator keeps running while the namespace goes (finalizers);
        // the caller's wait ends before it is dropped.
        self.keep_until_gone(ns, operator).await
    }

    async fn keep_until_gone(&self, ns: &str, operator: Operator) -> Result<()> {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(ns, &DeleteParams::background())
            .await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        wait_for(self.bulk_timeout(), "the namespace to be gone", || async {
            namespaces
                .get_opt(ns)
                .await
                .ok()
                .and_then(|o| o.is_none().then_some(()))
        })
        .await?;
        operator.stop().await
    }

    async fn bulk_statefulsets(&self, pod_spec: &Value) -> Result<Duration> {
        let n = self.args.clusters;
        let ns = create_namespace(&self.client, "bench-sts").await?;
        eprintln!("[bench] {n} StatefulSets in namespace {ns}");
        let stss: Api<StatefulSet> = Api::namespaced(self.client.clone(), &ns);
        let result = async {
            let last = self
                .create_all(n, |i| {
                    let stss = stss.clone();
                    async move {
                        stss.create(
                            &PostParams::default(),
                            &statefulset(&format!("s-{i:05}"), pod_spec)?,
                        )
                        .await?;
                        Ok(())
                    }
                })
                .await?;
            wait_for_slow(self.bulk_timeout(), "every StatefulSet Ready", || async {
                let list = stss.list(&ListParams::default()).await.ok()?;
                let ready = list.items.iter().filter(|s| statefulset_ready(s)).count();
                (ready == n as usize).then_some(())
            })
            .await?;
            Ok(last.elapsed())
        }
        .await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
        wait_for(self.bulk_timeout(), "the namespace to be gone", || async {
            namespaces
                .get_opt(&ns)
                .await
                .ok()
                .and_then(|o| o.is_none().then_some(()))
        })
        .await?;
        result
    }
}

/// [`wait_for`] at the single trials' poll interval.
async fn wait_for_fast<F, Fut>(what: &str, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = Instant::now() + TRIAL_TIMEOUT;
    loop {
        if probe().await.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {TRIAL_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(TRIAL_POLL).await;
    }
}

/// [`wait_for`] at the bulk run's poll interval (a list of N per poll).
async fn wait_for_slow<F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if probe().await.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(BULK_POLL).await;
    }
}

async fn kwok_nodes(client: &Client) -> usize {
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .list(&ListParams::default().labels("type=kwok"))
        .await
        .map_or(0, |l| l.items.len())
}

async fn run(args: Args) -> Result<(Settings, Result<Latency>, Result<Bulk>)> {
    let state = state_dir()?;
    let kubeconfig = admin_kubeconfig(&state)?;
    let operator_bin = operator_binary("clusters")?;
    // Another operator (make demo's) would reconcile the same clusters.
    if let Ok(pid) = std::fs::read_to_string(state.join("pids/operator.pid"))
        && Path::new(&format!("/proc/{}", pid.trim())).exists()
    {
        bail!(
            "an operator is already running (pid {}, make demo's): stop it first",
            pid.trim()
        );
    }
    let client = client_for(&kubeconfig).await?;
    install_crd(&client, &state).await?;
    let settings = Settings {
        clusters: args.clusters,
        trials: args.trials,
        concurrency: args.concurrency,
        settle: Duration::from_secs(args.settle_seconds),
        kcm_qps: args.kcm_qps.clone(),
        kcm_burst: args.kcm_burst.clone(),
        node_pods: args.node_pods.clone(),
        nodes: kwok_nodes(&client).await,
    };
    let logs = state.join("logs");
    std::fs::create_dir_all(&logs)?;
    let bench = Bench {
        audit: Audit(state.join("audit.log")),
        args,
        state,
        operator_bin,
        client,
    };
    let mut operator = Operator::start(
        &bench.operator_bin,
        &bench.state,
        logs.join("bench-operator.log"),
    )?;
    let (latency, pod_spec) = match bench.latency(&mut operator).await {
        Ok((latency, spec)) => (Ok(latency), Ok(spec)),
        Err(e) => {
            eprintln!("[bench] single-cluster trials failed: {e:#}");
            let no_spec = anyhow!("no pod spec: {e:#}");
            (Err(e), Err(no_spec))
        }
    };
    let mut bulk = Bulk::default();
    let bulk_result = match pod_spec {
        Ok(spec) => {
            let ours = bench.bulk(operator, &mut bulk).await;
            if let Err(e) = &ours {
                eprintln!("[bench] bulk run of the operator failed: {e:#}");
            }
            let theirs = bench.bulk_statefulsets(&spec).await;
            match &theirs {
                Ok(d) => bulk.statefulset = Some(*d),
                Err(e) => eprintln!("[bench] bulk run of the StatefulSets failed: {e:#}"),
            }
            ours.and(theirs).map(|_| bulk)
        }
        Err(e) => Err(e),
    };
    Ok((settings, latency, bulk_result))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let outcome = tokio::select! {
        outcome = run(args) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match outcome {
        Ok((settings, latency, bulk)) => {
            print!("{}", table(&settings, &latency, &bulk));
            if latency.is_ok() && bulk.is_ok() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("[bench] error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn entry(
        ns: &str,
        user: &str,
        verb: &str,
        object: (&str, &str, Option<&str>),
        code: u16,
    ) -> String {
        let (resource, name, subresource) = object;
        let mut object = json!({"resource": resource, "namespace": ns, "name": name});
        if let Some(s) = subresource {
            object["subresource"] = json!(s);
        }
        json!({"stage": "ResponseComplete", "verb": verb, "user": {"username": user},
               "objectRef": object, "responseStatus": {"code": code}})
        .to_string()
    }

    #[test]
    fn writes_are_counted_per_user_and_namespace_by_what_they_wrote() {
        let op = OPERATOR_USER;
        let text = [
            entry("a", op, "patch", ("integrationclusters", "c", None), 200),
            entry("a", op, "patch", ("services", "c", None), 201),
            entry("a", op, "patch", ("services", "c", None), 200),
            entry("a", op, "create", ("pods", "c-0", None), 201),
            entry("a", op, "create", ("pods", "c-1", None), 409),
            entry("a", op, "patch", ("pods", "c-0", Some("status")), 200),
            entry(
                "a",
                op,
                "patch",
                ("integrationclusters", "c", Some("status")),
                200,
            ),
            entry("a", op, "create", ("events", "c.1", None), 201),
            entry("a", "admin", "create", ("pods", "x", None), 201),
            entry("b", op, "create", ("pods", "x", None), 201),
            "not json \"namespace\":\"a\"".into(),
        ]
        .join("\n");
        assert_eq!(
            count_writes(&text, "a", op),
            Writes {
                total: 8,
                status: 1,
                gates: 1,
                objects: 3,
                refused: 1,
            }
        );
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        let status = "Name:\tintegration-op\nVmPeak:\t  99 kB\nVmRSS:\t   65536 kB\nThreads: 4\n";
        assert_eq!(vm_rss(status), Some(64 * 1024 * 1024));
        assert_eq!(vm_rss("Name: x\n"), None);
    }

    #[test]
    fn peak_covers_everything_and_steady_is_the_window_median() {
        assert_eq!(peak_and_steady(&[5, 90, 7], &[10, 30, 20]), Some((90, 20)));
        assert_eq!(peak_and_steady(&[5], &[]), None);
    }

    #[test]
    fn reconciled_names_come_from_the_drivers_log_line() {
        let log = [
            r#"{"timestamp":"t","level":"INFO","message":"reconciled","name":"c-00001","actions":3}"#,
            r#"{"timestamp":"t","level":"WARN","message":"reconcile failed","name":"c-00002"}"#,
            r#"{"timestamp":"t","level":"INFO","message":"reconciled","name":"c-00001","actions":0}"#,
            "garbage \"reconciled\"",
        ]
        .join("\n");
        assert_eq!(
            reconciled_names(&log),
            BTreeSet::from(["c-00001".to_owned()])
        );
    }

    fn w(total: u32, status: u32, gates: u32, objects: u32, refused: u32) -> Writes {
        Writes {
            total,
            status,
            gates,
            objects,
            refused,
        }
    }

    fn settings() -> Settings {
        Settings {
            clusters: 200,
            trials: 10,
            concurrency: 16,
            settle: Duration::from_secs(60),
            kcm_qps: "200".into(),
            kcm_burst: "400".into(),
            node_pods: "310".into(),
            nodes: 3,
        }
    }

    #[test]
    fn the_tables_carry_the_baseline_the_settings_and_the_targets() {
        let latency = Latency {
            statefulset: vec![ms(300), ms(250), ms(280)],
            operator: vec![ms(900), ms(1000), ms(920)],
            writes: vec![w(19, 5, 3, 10, 0), w(20, 6, 3, 10, 0), w(19, 5, 3, 10, 0)],
        };
        let bulk = Bulk {
            operator: Some(ms(101_000)),
            statefulset: Some(ms(69_000)),
            rss_burst: Some((76 << 20, 60 << 20)),
            rss_restart: Some((126 << 20, 100 << 20)),
            resync: Some(ms(19_500)),
            writes_burst: w(3_800, 1_740, 600, 2_000, 0),
            writes_settled: Writes::default(),
            writes_resync: w(39, 15, 0, 24, 24),
        };
        let text = table(&settings(), &Ok(latency), &Ok(bulk));
        for line in [
            "kube-controller-manager --kube-api-qps=200 --kube-api-burst=400",
            "on 3 kwok nodes (310 pods each)",
            "| one 3-node cluster, apply → all Ready | 280 ms | 300 ms | 920 ms | 1000 ms | 3.29×, 3.33× | ≤ 1.10× |",
            "| operator writes to create one cluster (median of trials) | — | — | 19: 10 objects, 5 cluster status, 3 pod status (gate) | | | ≤ objects + 2 |",
            "200 clusters × 3 (and 200 StatefulSets × 3), created by 16 concurrent clients",
            "| last create → all Ready | 69.0 s | 101.0 s (1.46×) | ≤ 1.0× |",
            "| operator RSS through the burst and the settled window, peak / steady | — | 76.0 MiB / 60.0 MiB | < 50 MiB |",
            "| operator RSS after a restart, peak (resync) / steady | — | 126.0 MiB / 100.0 MiB | < 50 MiB |",
            "| full resync after a restart (start → every cluster reconciled once) | — | 19.50 s | ≤ 5 s |",
            "| operator writes per cluster in the burst | — | 19: 10 objects, 8.7 cluster status, 3 pod status (gate) | ≤ objects + 2 |",
            "| operator writes in the settled 60 s | — | 0: 0 objects, 0 cluster status, 0 pod status (gate) | 0 |",
            "| operator writes from the restart to 30 s after the resync | — | 39: 24 objects, 15 cluster status, 0 pod status (gate), 24 refused | 0 |",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn a_failed_run_says_so_and_keeps_the_other_table() {
        let bulk = Bulk {
            operator: None,
            statefulset: Some(ms(69_000)),
            ..Bulk::default()
        };
        let text = table(&settings(), &Err(anyhow!("no plane")), &Ok(bulk));
        assert!(text.contains("harness failure: no plane"), "{text}");
        assert!(
            text.contains("| last create → all Ready | 69.0 s | not all Ready | ≤ 1.0× |"),
            "{text}"
        );
        assert!(text.contains("| full resync after a restart (start → every cluster reconciled once) | — | incomplete | ≤ 5 s |"), "{text}");
    }
}
