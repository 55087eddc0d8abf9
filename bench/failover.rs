//! `make bench`: listener failover of the operator's agents against a peer
//! built on client-go's `tools/leaderelection`, both with lease 15 s, renew
//! deadline 10 s and retry period 2 s, measured in the same run on the
//! local control plane (`hack/control-plane/up`).
//!
//! Every candidate (three agents, then three peers) drives the listener
//! hooks of its own in-process recorder:
//!
//! ```text
//! POST /listener/enable?listener=<l>&epoch=<leaseTransitions>&until=<unix ms>
//! POST /listener/disable?listener=<l>&epoch=<leaseTransitions>
//! ```
//!
//! A candidate's listener is enabled from an enable until the earlier of
//! its next disable and the last `until` it was given (each enable refreshes
//! `until`). Per trial the holder is killed (SIGKILL) and, once a single
//! holder is stable again, stopped (SIGTERM), each signal at a random point
//! of the retry period (see [`phase`]); the time to the first enable
//! by another candidate is the failover or hand-over time. Overlap is the
//! time two candidates were enabled at once.
//!
//! The default and documented run has 20 trials per system: the p95 is
//! nearest-rank, so with fewer than 20 it is simply the slowest trial,
//! which the table then says.
//!
//! Progress goes to stderr, the markdown table to stdout. The exit status is
//! non-zero only when the harness fails, never for a slow result.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "plane.rs"]
mod plane;
// Shared with bench/clusters.rs, whose tables use the cell formatting too.
#[allow(dead_code)]
#[path = "stats.rs"]
mod stats;

use plane::{
    SETUP_TIMEOUT, admin_kubeconfig, client_for, create_namespace, install_crd, operator_binary,
    state_dir, wait_for,
};
use stats::median_p95;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use integration_operator::api::{IntegrationCluster, Phase};
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use tokio::net::TcpListener;

/// The timings of both systems.
const LEASE: Duration = Duration::from_secs(15);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

const CANDIDATES: usize = 3;
const CLUSTER: &str = "bench";
const LISTENER: &str = "bench";
const PEER_LEASE: &str = "bench-peer";

/// A holder counts as stable once it alone has been enabled this long:
/// longer than a retry period, so it has refreshed at least once.
const STABLE_FOR: Duration = Duration::from_secs(5);
/// Waits that end the run when they expire (the harness cannot go on).
const STABLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Trials below which a nearest-rank p95 is the slowest trial.
const P95_TRIALS: u32 = 20;
/// Waits whose expiry is a result, reported in the notes.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Parser)]
#[command(about = "Listener failover of the agents against client-go leaderelection")]
struct Args {
    /// Trials per system; each kills the holder once and stops it once.
    #[arg(long, default_value_t = P95_TRIALS, value_parser = clap::value_parser!(u32).range(1..))]
    trials: u32,
    /// The client-go peer (hack/bench builds it).
    #[arg(long, env = "BENCH_PEER")]
    peer: Option<PathBuf>,
}

// ---------------------------------------------------------------- recorder

/// One listener hook call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// Enabled until `until` (None: until a disable).
    Enable {
        until: Option<Instant>,
    },
    Disable,
}

#[derive(Clone, Debug)]
struct Call {
    candidate: usize,
    at: Instant,
    hook: Hook,
    epoch: Option<i64>,
}

/// Every hook call of one system, in arrival order.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Call>>>);

impl Calls {
    fn push(&self, call: Call) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call);
    }

    fn snapshot(&self) -> Vec<Call> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Serves candidate `candidate`'s hooks on a free loopback port until the
/// process ends.
async fn recorder(candidate: usize, calls: Calls) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind a recorder on 127.0.0.1")?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let calls = calls.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let status = record(
                            &calls,
                            candidate,
                            Instant::now(),
                            request.method().as_str(),
                            request.uri().path(),
                            request.uri().query().unwrap_or(""),
                        );
                        async move {
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = status;
                            Ok::<_, Infallible>(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}

/// Records a listener hook call; anything else is answered 404.
fn record(
    calls: &Calls,
    candidate: usize,
    at: Instant,
    method: &str,
    path: &str,
    query: &str,
) -> StatusCode {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    };
    let hook = match (method, path) {
        ("POST", "/listener/enable") => {
            let until = match param("until").map(str::parse::<i64>) {
                None => None,
                Some(Ok(ms)) => Some(wall_to_instant(at, ms, unix_ms(SystemTime::now()))),
                Some(Err(_)) => return StatusCode::BAD_REQUEST,
            };
            Hook::Enable { until }
        }
        ("POST", "/listener/disable") => Hook::Disable,
        _ => return StatusCode::NOT_FOUND,
    };
    let epoch = match param("epoch").map(str::parse::<i64>) {
        None => None,
        Some(Ok(epoch)) => Some(epoch),
        Some(Err(_)) => return StatusCode::BAD_REQUEST,
    };
    calls.push(Call {
        candidate,
        at,
        hook,
        epoch,
    });
    StatusCode::OK
}

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The instant of wall-clock time `ms`, given that `at` is `now_ms`; a time
/// in the past becomes `at`.
fn wall_to_instant(at: Instant, ms: i64, now_ms: i64) -> Instant {
    let ahead = u64::try_from(ms.saturating_sub(now_ms)).unwrap_or(0);
    at + Duration::from_millis(ahead)
}

// ---------------------------------------------------------------- analysis

/// A time a candidate's listener was enabled; `end` None: not yet ended and
/// no `until` given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Interval {
    candidate: usize,
    start: Instant,
    end: Option<Instant>,
}

/// Enabled intervals of every candidate: from an enable until the earlier of
/// the next disable and the last `until` (enables refresh `until`; an enable
/// after `until` has passed starts a new interval).
fn intervals(calls: &[Call]) -> Vec<Interval> {
    let mut by_candidate: BTreeMap<usize, Vec<&Call>> = BTreeMap::new();
    for call in calls {
        by_candidate.entry(call.candidate).or_default().push(call);
    }
    let mut out = Vec::new();
    for (candidate, mut calls) in by_candidate {
        calls.sort_by_key(|c| c.at);
        let mut open: Option<(Instant, Option<Instant>)> = None;
        for call in calls {
            match call.hook {
                Hook::Enable { until } => {
                    open = match open {
                        Some((start, Some(end))) if call.at > end => {
                            out.push(Interval {
                                candidate,
                                start,
                                end: Some(end),
                            });
                            Some((call.at, until))
                        }
                        Some((start, _)) => Some((start, until)),
                        None => Some((call.at, until)),
                    }
                }
                Hook::Disable => {
                    if let Some((start, end)) = open.take() {
                        let end = end.map_or(call.at, |end| end.min(call.at));
                        out.push(Interval {
                            candidate,
                            start,
                            end: Some(end.max(start)),
                        });
                    }
                }
            }
        }
        if let Some((start, end)) = open {
            out.push(Interval {
                candidate,
                start,
                end,
            });
        }
    }
    out
}

/// Candidates enabled at `now`, counting only calls made by then.
fn enabled_at(calls: &[Call], now: Instant) -> Vec<usize> {
    let known: Vec<Call> = calls.iter().filter(|c| c.at <= now).cloned().collect();
    let mut enabled: Vec<usize> = intervals(&known)
        .iter()
        .filter(|i| i.start <= now && i.end.is_none_or(|end| end > now))
        .map(|i| i.candidate)
        .collect();
    enabled.sort_unstable();
    enabled.dedup();
    enabled
}

/// Total time within `[from, to]` in which two or more intervals intersect.
fn overlap(intervals: &[Interval], from: Instant, to: Instant) -> Duration {
    // (time, +1 start / -1 end); ends sort first so touching intervals do
    // not overlap.
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for interval in intervals {
        let start = interval.start.max(from);
        let end = interval.end.unwrap_or(to).min(to);
        if start < end {
            edges.push((start, 1));
            edges.push((end, -1));
        }
    }
    edges.sort();
    let mut total = Duration::ZERO;
    let mut active = 0;
    let mut since = from;
    for (at, delta) in edges {
        if active >= 2 {
            total += at - since;
        }
        active += delta;
        since = at;
    }
    total
}

/// The first enable at or after `t0` by a candidate other than `holder`.
fn first_takeover(calls: &[Call], holder: usize, t0: Instant) -> Option<&Call> {
    calls
        .iter()
        .filter(|c| c.candidate != holder && c.at >= t0)
        .filter(|c| matches!(c.hook, Hook::Enable { .. }))
        .min_by_key(|c| c.at)
}

/// The epoch of `holder`'s last enable before `t0`.
fn last_epoch(calls: &[Call], holder: usize, t0: Instant) -> Option<i64> {
    calls
        .iter()
        .filter(|c| c.candidate == holder && c.at < t0)
        .filter(|c| matches!(c.hook, Hook::Enable { .. }))
        .max_by_key(|c| c.at)
        .and_then(|c| c.epoch)
}

/// The pause before a signal, from a random number: somewhere in a retry
/// period. Holders renew every retry period, and a holder counts as stable
/// a fixed time after its first enable, so without it every trial would
/// signal at the same point after a renewal (and after the contenders'
/// retries) and measure that one case over and over.
fn phase(random: u32) -> Duration {
    let period = u32::try_from(RETRY_PERIOD.as_millis()).unwrap_or(u32::MAX);
    Duration::from_millis(u64::from(random % period.max(1)))
}

async fn at_random_phase() -> Result<()> {
    let random = getrandom::u32().map_err(|e| anyhow!("no random number: {e}"))?;
    tokio::time::sleep(phase(random)).await;
    Ok(())
}

// ---------------------------------------------------------------- processes

/// How to start one candidate (again).
struct Launch {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
}

impl Launch {
    fn spawn(&self) -> Result<Proc> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {} ({})", self.name, self.program.display()))?;
        Ok(Proc {
            name: self.name.clone(),
            log: self.log.clone(),
            child,
        })
    }
}

/// A child process, killed when dropped.
struct Proc {
    name: String,
    log: PathBuf,
    child: Child,
}

impl Proc {
    /// An error naming the log if the process has ended.
    fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(anyhow!(
                "{} exited unexpectedly ({status}); see {}",
                self.name,
                self.log.display()
            )),
            Err(e) => Err(anyhow!("{}: {e}", self.name)),
        }
    }

    fn sigkill(&mut self) -> Result<()> {
        self.child
            .kill()
            .with_context(|| format!("SIGKILL {}", self.name))
    }

    fn sigterm(&self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("run kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} ({}) failed", self.child.id(), self.name);
        }
        Ok(())
    }

    /// Waits for the process to end; false if it had not after `timeout`.
    async fn exited_within(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- trials

/// Three candidates of one system and the calls they made.
struct System {
    label: &'static str,
    calls: Calls,
    launches: Vec<Launch>,
    running: Vec<Option<Proc>>,
}

/// What the trials of one system measured.
#[derive(Default)]
struct Samples {
    kill: Vec<Option<Duration>>,
    graceful: Vec<Option<Duration>>,
    overlap: Vec<Duration>,
    total_overlap: Duration,
    notes: Vec<String>,
}

impl System {
    fn start_all(&mut self) -> Result<()> {
        self.running = self
            .launches
            .iter()
            .map(|l| l.spawn().map(Some))
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        self.running[i] = Some(self.launches[i].spawn()?);
        Ok(())
    }

    fn proc(&mut self, i: usize) -> Result<&mut Proc> {
        self.running[i]
            .as_mut()
            .ok_or_else(|| anyhow!("{} is not running", self.launches[i].name))
    }

    fn check_running(&mut self, except: Option<usize>) -> Result<()> {
        for (i, proc) in self.running.iter_mut().enumerate() {
            if Some(i) != except {
                match proc {
                    Some(proc) => proc.check_running()?,
                    None => bail!("{} is not running", self.launches[i].name),
                }
            }
        }
        Ok(())
    }

    /// Waits until exactly one candidate has been enabled for `STABLE_FOR`,
    /// with every candidate running; returns it.
    async fn stable_holder(&mut self) -> Result<usize> {
        let deadline = Instant::now() + STABLE_TIMEOUT;
        let mut current: Option<(usize, Instant)> = None;
        loop {
            self.check_running(None)?;
            let now = Instant::now();
            let enabled = enabled_at(&self.calls.snapshot(), now);
            current = match (enabled.as_slice(), current) {
                ([one], Some((holder, since))) if *one == holder => {
                    if now - since >= STABLE_FOR {
                        return Ok(holder);
                    }
                    Some((holder, since))
                }
                ([one], _) => Some((*one, now)),
                _ => None,
            };
            if now >= deadline {
                bail!(
                    "{}: no single stable listener holder after {STABLE_TIMEOUT:?} \
                     (enabled now: {}); see the candidates' logs, e.g. {}",
                    self.label,
                    self.names(&enabled),
                    self.launches[0].log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn names(&self, candidates: &[usize]) -> String {
        if candidates.is_empty() {
            return "none".into();
        }
        candidates
            .iter()
            .map(|&i| self.launches[i].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Waits for an enable by a candidate other than `holder` at or after
    /// `t0`; None after `TAKEOVER_TIMEOUT` (a result, not a failure).
    async fn takeover(&mut self, holder: usize, t0: Instant) -> Result<Option<Call>> {
        loop {
            if let Some(call) = first_takeover(&self.calls.snapshot(), holder, t0) {
                return Ok(Some(call.clone()));
            }
            self.check_running(Some(holder))?;
            if Instant::now() - t0 >= TAKEOVER_TIMEOUT {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Notes a takeover whose epoch did not rise above the old holder's.
    fn check_epoch(
        &self,
        what: &str,
        trial: u32,
        holder: usize,
        t0: Instant,
        call: &Call,
    ) -> Option<String> {
        let old = last_epoch(&self.calls.snapshot(), holder, t0);
        match (old, call.epoch) {
            (Some(old), Some(new)) if new <= old => Some(format!(
                "{} trial {trial} {what}: epoch went from {old} ({}) to {new} ({}), not up",
                self.label, self.launches[holder].name, self.launches[call.candidate].name
            )),
            (_, None) => Some(format!(
                "{} trial {trial} {what}: the new holder's enable carried no epoch",
                self.label
            )),
            _ => None,
        }
    }

    /// Prints a takeover (or its absence), notes an epoch that did not go
    /// up, and returns the takeover time.
    fn report(
        &self,
        what: &str,
        trial: u32,
        holder: usize,
        t0: Instant,
        took: Option<&Call>,
        notes: &mut Vec<String>,
    ) -> Option<Duration> {
        let Some(call) = took else {
            notes.push(format!(
                "{} trial {trial} {what}: no takeover within {} s",
                self.label,
                TAKEOVER_TIMEOUT.as_secs()
            ));
            return None;
        };
        eprintln!(
            "[bench]   {} took over after {:.2} s",
            self.launches[call.candidate].name,
            (call.at - t0).as_secs_f64()
        );
        notes.extend(self.check_epoch(what, trial, holder, t0, call));
        Some(call.at - t0)
    }

    async fn run_trials(&mut self, trials: u32) -> Result<Samples> {
        let mut samples = Samples::default();
        let began = self
            .calls
            .snapshot()
            .first()
            .map_or_else(Instant::now, |c| c.at)
            .min(Instant::now());
        let mut window_start = began;
        eprintln!("[bench] {}: waiting for a stable holder", self.label);
        let mut holder = self.stable_holder().await?;
        for trial in 1..=trials {
            // (a) SIGKILL the holder.
            at_random_phase().await?;
            let name = self.launches[holder].name.clone();
            eprintln!(
                "[bench] {} trial {trial}/{trials}: SIGKILL {name}",
                self.label
            );
            let t0 = Instant::now();
            self.proc(holder)?.sigkill()?;
            let took = self.takeover(holder, t0).await?;
            self.running[holder] = None; // reaped by Drop
            let took = self.report("kill", trial, holder, t0, took.as_ref(), &mut samples.notes);
            samples.kill.push(took);
            self.restart(holder)?;
            holder = self.stable_holder().await?;

            // (b) SIGTERM the holder: it should hand over at once.
            at_random_phase().await?;
            let name = self.launches[holder].name.clone();
            eprintln!(
                "[bench] {} trial {trial}/{trials}: SIGTERM {name}",
                self.label
            );
            let t0 = Instant::now();
            self.proc(holder)?.sigterm()?;
            let took = self.takeover(holder, t0).await?;
            let took = self.report(
                "SIGTERM",
                trial,
                holder,
                t0,
                took.as_ref(),
                &mut samples.notes,
            );
            samples.graceful.push(took);
            let waited = t0.elapsed();
            let rest = EXIT_TIMEOUT.saturating_sub(waited);
            if !self.proc(holder)?.exited_within(rest).await? {
                samples.notes.push(format!(
                    "{} trial {trial}: {name} had not exited {} s after SIGTERM; killed",
                    self.label,
                    EXIT_TIMEOUT.as_secs()
                ));
            }
            self.running[holder] = None;
            self.restart(holder)?;
            holder = self.stable_holder().await?;

            let now = Instant::now();
            let o = overlap(&intervals(&self.calls.snapshot()), window_start, now);
            samples.overlap.push(o);
            window_start = now;
        }
        samples.total_overlap = overlap(&intervals(&self.calls.snapshot()), began, Instant::now());
        Ok(samples)
    }
}

// ---------------------------------------------------------------- cluster

/// Creates the bench IntegrationCluster, waits for phase Ready and returns
/// its `spec.listeners` as JSON (what the agent gets in a pod).
async fn ready_cluster(client: &Client, ns: &str) -> Result<String> {
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), ns);
    let ic: IntegrationCluster = serde_json::from_value(serde_json::json!({
        "apiVersion": "integration.dev/v1alpha1",
        "kind": "IntegrationCluster",
        "metadata": {"name": CLUSTER},
        "spec": {
            "profile": "generic",
            "mode": "stateless",
            "replicas": CANDIDATES,
            "image": "registry.example.com/srv:1",
            "listeners": [{
                "name": LISTENER,
                "mode": "singleNode",
                "leaseDurationSeconds": LEASE.as_secs(),
                "renewDeadlineSeconds": RENEW_DEADLINE.as_secs(),
                "retryPeriodSeconds": RETRY_PERIOD.as_secs(),
            }],
        },
    }))?;
    api.create(&PostParams::default(), &ic)
        .await
        .context("create the IntegrationCluster")?;
    let ic = wait_for(
        SETUP_TIMEOUT,
        "the IntegrationCluster to be Ready",
        || async {
            let ic = api.get(CLUSTER).await.ok()?;
            let status = ic.status.as_ref()?;
            (status.observed_generation == ic.metadata.generation
                && status.phase == Some(Phase::Ready))
            .then_some(ic)
        },
    )
    .await?;
    Ok(serde_json::to_string(&ic.spec.listeners)?)
}

// ---------------------------------------------------------------- main

struct Bench {
    trials: u32,
    state: PathBuf,
    operator_bin: PathBuf,
    peer_bin: PathBuf,
    client: Client,
    ns: String,
}

impl Bench {
    fn log(&self, name: &str) -> Result<PathBuf> {
        let dir = self.state.join("logs");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("bench-{name}.log"));
        File::create(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(path)
    }

    async fn ours(&self) -> Result<Samples> {
        let operator = Launch {
            name: "operator".into(),
            program: self.operator_bin.clone(),
            args: vec!["run".into(), "--namespace".into(), self.ns.clone()],
            kubeconfig: self.state.join("operator.kubeconfig"),
            log: self.log("operator")?,
        };
        eprintln!(
            "[bench] ours: starting the operator (log {})",
            operator.log.display()
        );
        let mut operator = operator.spawn()?;
        let listeners = ready_cluster(&self.client, &self.ns).await?;
        operator.check_running()?;

        let calls = Calls::default();
        let mut launches = Vec::new();
        for i in 0..CANDIDATES {
            let address = recorder(i, calls.clone()).await?;
            let pod = format!("{CLUSTER}-{i}");
            launches.push(Launch {
                name: format!("agent {pod}"),
                program: self.operator_bin.clone(),
                args: [
                    "agent",
                    "watch",
                    "--pod-name",
                    &pod,
                    "--pod-namespace",
                    &self.ns,
                    "--server",
                    &address.to_string(),
                    "--listener-enable-path",
                    "/listener/enable",
                    // Renewals refresh `until` the way the peer's periodic
                    // enables do, so both sides are recorded alike.
                    "--listener-renew-path",
                    "/listener/enable",
                    "--listener-disable-path",
                    "/listener/disable",
                    "--listeners",
                    &listeners,
                    "--interval-ms",
                    "200",
                ]
                .map(String::from)
                .to_vec(),
                kubeconfig: self.state.join("kubeconfig"),
                log: self.log(&format!("agent-{pod}"))?,
            });
        }
        let mut system = System {
            label: "ours",
            calls,
            launches,
            running: Vec::new(),
        };
        eprintln!(
            "[bench] ours: starting {CANDIDATES} agents (logs {})",
            system.launches[0].log.display()
        );
        system.start_all()?;
        let samples = system.run_trials(self.trials).await?;
        operator.check_running()?;
        Ok(samples)
    }

    async fn peer(&self) -> Result<Samples> {
        let calls = Calls::default();
        let mut launches = Vec::new();
        for i in 0..CANDIDATES {
            let address = recorder(i, calls.clone()).await?;
            let identity = format!("peer-{i}");
            launches.push(Launch {
                name: identity.clone(),
                program: self.peer_bin.clone(),
                args: [
                    "--kubeconfig",
                    &self.state.join("kubeconfig").to_string_lossy(),
                    "--namespace",
                    &self.ns,
                    "--lease",
                    PEER_LEASE,
                    "--identity",
                    &identity,
                    "--hook",
                    &format!("http://{address}"),
                    "--listener",
                    LISTENER,
                ]
                .map(String::from)
                .to_vec(),
                kubeconfig: self.state.join("kubeconfig"),
                log: self.log(&identity)?,
            });
        }
        let mut system = System {
            label: "peer",
            calls,
            launches,
            running: Vec::new(),
        };
        eprintln!(
            "[bench] peer: starting {CANDIDATES} peers (logs {})",
            system.launches[0].log.display()
        );
        system.start_all()?;
        system.run_trials(self.trials).await
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(
        || format!("> {} s", TAKEOVER_TIMEOUT.as_secs()),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

/// The samples of one table row.
type Pick = fn(&Samples) -> Vec<Option<Duration>>;

fn cells(samples: &Result<Samples>, pick: Pick) -> [String; 2] {
    match samples.as_ref().ok().map(|s| median_p95(&pick(s))) {
        Some(Some((median, p95))) => [secs(median), secs(p95)],
        _ => ["n/a".into(), "n/a".into()],
    }
}

fn table(trials: u32, ours: &Result<Samples>, peer: &Result<Samples>) -> String {
    let rows: [(&str, Pick, String); 3] = [
        (
            "failover (SIGKILL)",
            |s| s.kill.clone(),
            format!(
                "≤ lease + 1 s = {} s",
                (LEASE + Duration::from_secs(1)).as_secs()
            ),
        ),
        (
            "graceful handover (SIGTERM)",
            |s| s.graceful.clone(),
            "≤ 0.3 s".into(),
        ),
        (
            "overlap",
            |s| s.overlap.iter().copied().map(Some).collect(),
            "0".into(),
        ),
    ];
    let mut out = String::new();
    out.push_str(&format!(
        "Listener failover, N = {trials} trials per system; both with lease {} s, renew deadline {} s, retry {} s.\n\
         ours: `integration-operator agent watch` ({CANDIDATES} agents); \
         peer: client-go {} `tools/leaderelection` ({CANDIDATES} processes, `bench/peer`).\n",
        LEASE.as_secs(),
        RENEW_DEADLINE.as_secs(),
        RETRY_PERIOD.as_secs(),
        client_go_version(),
    ));
    if trials < P95_TRIALS {
        out.push_str(&format!(
            "Fewer than {P95_TRIALS} trials: each p95 (nearest rank) is the slowest trial.\n"
        ));
    }
    out.push('\n');
    out.push_str("| measure | ours median | ours p95 | peer median | peer p95 | goal |\n");
    out.push_str("|---|---:|---:|---:|---:|---|\n");
    for (label, pick, goal) in rows {
        let [om, op] = cells(ours, pick);
        let [pm, pp] = cells(peer, pick);
        out.push_str(&format!(
            "| {label} | {om} | {op} | {pm} | {pp} | {goal} |\n"
        ));
    }
    out.push('\n');
    out.push_str(
        "Failover and hand-over: from the signal to the first enable by another candidate. \
         Overlap: per trial, time two candidates had their listener enabled at once.\n",
    );
    for (label, samples) in [("ours", ours), ("peer", peer)] {
        match samples {
            Ok(s) => {
                out.push_str(&format!(
                    "- {label}: total overlap {:.3} s over the run\n",
                    s.total_overlap.as_secs_f64()
                ));
                for note in &s.notes {
                    out.push_str(&format!("- {note}\n"));
                }
            }
            Err(e) => out.push_str(&format!("- {label}: harness failure: {e:#}\n")),
        }
    }
    out
}

/// The client-go release the peer pins, from bench/peer/go.mod.
fn client_go_version() -> &'static str {
    include_str!("peer/go.mod")
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/client-go "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("(version unknown)")
}

/// The peer binary: --peer, $BENCH_PEER, or where hack/bench builds it.
fn peer_path(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = arg {
        return Ok(path);
    }
    let cache = match std::env::var_os("INTEGRATION_OPERATOR_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
            .ok_or_else(|| anyhow!("neither XDG_CACHE_HOME nor HOME is set; pass --peer"))?
            .join("integration-operator"),
    };
    Ok(cache.join("bench").join("bench-peer"))
}

async fn setup(args: Args) -> Result<Bench> {
    let state = state_dir()?;
    let kubeconfig = admin_kubeconfig(&state)?;
    let operator_bin = operator_binary("failover")?;
    let peer_bin = peer_path(args.peer)?;
    if !peer_bin.exists() {
        bail!(
            "{} is missing: hack/bench builds it from bench/peer",
            peer_bin.display()
        );
    }
    let client = client_for(&kubeconfig).await?;
    install_crd(&client, &state).await?;
    let ns = create_namespace(&client, "bench").await?;
    eprintln!("[bench] namespace {ns}");
    Ok(Bench {
        trials: args.trials,
        state,
        operator_bin,
        peer_bin,
        client,
        ns,
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let bench = tokio::select! {
        bench = setup(args) => bench,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let bench = match bench {
        Ok(bench) => bench,
        Err(e) => {
            eprintln!("[bench] error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // One system at a time, so neither competes with the other for the CPU.
    let (ours, peer) = tokio::select! {
        ours = bench.ours() => {
            if let Err(e) = &ours {
                eprintln!("[bench] ours failed: {e:#}");
            }
            tokio::select! {
                peer = bench.peer() => (ours, peer),
                _ = tokio::signal::ctrl_c() => (ours, Err(anyhow!("interrupted"))),
            }
        }
        _ = tokio::signal::ctrl_c() => (Err(anyhow!("interrupted")), Err(anyhow!("interrupted"))),
    };
    if let Err(e) = &peer {
        eprintln!("[bench] peer failed: {e:#}");
    }
    // Children were killed when their guards dropped; the Leases go with
    // the namespace.
    let _ = Api::<Namespace>::all(bench.client.clone())
        .delete(&bench.ns, &DeleteParams::background())
        .await;
    print!("{}", table(bench.trials, &ours, &peer));
    if ours.is_err() || peer.is_err() {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enable(candidate: usize, base: Instant, at_ms: u64, until_ms: Option<u64>) -> Call {
        Call {
            candidate,
            at: base + Duration::from_millis(at_ms),
            hook: Hook::Enable {
                until: until_ms.map(|ms| base + Duration::from_millis(ms)),
            },
            epoch: Some(1),
        }
    }

    fn disable(candidate: usize, base: Instant, at_ms: u64) -> Call {
        Call {
            candidate,
            at: base + Duration::from_millis(at_ms),
            hook: Hook::Disable,
            epoch: Some(1),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn enables_refresh_until_and_disable_ends_early() {
        let t = Instant::now();
        let calls = [
            enable(0, t, 0, Some(10_000)),
            enable(0, t, 2_000, Some(12_000)),
            disable(0, t, 5_000),
        ];
        assert_eq!(
            intervals(&calls),
            [Interval {
                candidate: 0,
                start: t,
                end: Some(t + ms(5_000))
            }]
        );
    }

    #[test]
    fn an_interval_ends_at_the_last_until_without_a_disable() {
        let t = Instant::now();
        let calls = [
            enable(1, t, 0, Some(10_000)),
            enable(1, t, 2_000, Some(12_000)),
            // After `until` passed: a new interval.
            enable(1, t, 20_000, Some(30_000)),
        ];
        assert_eq!(
            intervals(&calls),
            [
                Interval {
                    candidate: 1,
                    start: t,
                    end: Some(t + ms(12_000))
                },
                Interval {
                    candidate: 1,
                    start: t + ms(20_000),
                    end: Some(t + ms(30_000))
                },
            ]
        );
        assert_eq!(enabled_at(&calls, t + ms(11_000)), [1]);
        assert!(enabled_at(&calls, t + ms(15_000)).is_empty());
        // Calls after `now` are not known yet.
        assert!(enabled_at(&calls, t + ms(19_000)).is_empty());
    }

    #[test]
    fn a_disable_after_until_does_not_extend_the_interval() {
        let t = Instant::now();
        let calls = [enable(0, t, 0, Some(1_000)), disable(0, t, 3_000)];
        assert_eq!(intervals(&calls)[0].end, Some(t + ms(1_000)));
    }

    #[test]
    fn overlap_counts_only_time_two_candidates_are_enabled() {
        let t = Instant::now();
        let calls = [
            enable(0, t, 0, Some(10_000)),
            disable(0, t, 4_000),
            // Overlaps candidate 0 from 3 s to 4 s.
            enable(1, t, 3_000, Some(13_000)),
            // Touches candidate 1's end: no overlap.
            enable(2, t, 13_000, None),
        ];
        let all = intervals(&calls);
        assert_eq!(overlap(&all, t, t + ms(20_000)), ms(1_000));
        assert_eq!(overlap(&all, t + ms(3_500), t + ms(20_000)), ms(500));
        assert_eq!(overlap(&all, t + ms(5_000), t + ms(20_000)), Duration::ZERO);
        // Three at once still counts once.
        let triple = [
            enable(0, t, 0, Some(3_000)),
            enable(1, t, 1_000, Some(3_000)),
            enable(2, t, 2_000, Some(3_000)),
        ];
        assert_eq!(overlap(&intervals(&triple), t, t + ms(5_000)), ms(2_000));
    }

    #[test]
    fn takeover_is_the_first_enable_by_another_candidate() {
        let t = Instant::now();
        let calls = [
            enable(0, t, 0, Some(10_000)),
            enable(0, t, 2_000, Some(12_000)),
            disable(1, t, 2_500),
            enable(2, t, 16_000, Some(26_000)),
            enable(1, t, 17_000, Some(27_000)),
        ];
        let call = first_takeover(&calls, 0, t + ms(3_000)).map(|c| c.candidate);
        assert_eq!(call, Some(2));
        assert!(first_takeover(&calls, 0, t + ms(18_000)).is_none());
        assert_eq!(last_epoch(&calls, 0, t + ms(3_000)), Some(1));
    }

    #[test]
    fn record_parses_the_hook_calls() {
        let calls = Calls::default();
        let at = Instant::now();
        let now_ms = unix_ms(SystemTime::now());
        let until = now_ms + 10_000;
        let query = format!("listener=bench&epoch=3&until={until}");
        assert_eq!(
            record(&calls, 2, at, "POST", "/listener/enable", &query),
            StatusCode::OK
        );
        assert_eq!(
            record(
                &calls,
                2,
                at,
                "POST",
                "/listener/disable",
                "listener=bench&epoch=3"
            ),
            StatusCode::OK
        );
        assert_eq!(
            record(&calls, 2, at, "POST", "/listener/enable", "until=soon"),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            record(&calls, 2, at, "GET", "/health", ""),
            StatusCode::NOT_FOUND
        );
        let recorded = calls.snapshot();
        assert_eq!(recorded.len(), 2);
        assert_eq!(recorded[0].epoch, Some(3));
        let Hook::Enable { until: Some(until) } = recorded[0].hook else {
            panic!("an enable with until: {:?}", recorded[0].hook);
        };
        // Within the milliseconds between the two clock readings.
        let ahead = until - at;
        assert!(ahead <= ms(10_000) && ahead > ms(9_000), "{ahead:?}");
        assert_eq!(recorded[1].hook, Hook::Disable);
    }

    #[test]
    fn signals_land_anywhere_in_a_retry_period_and_only_there() {
        assert_eq!(phase(0), Duration::ZERO);
        assert_eq!(phase(1_999), ms(1_999));
        assert_eq!(phase(2_000), Duration::ZERO);
        assert_eq!(phase(2_001), ms(1));
        assert!(phase(u32::MAX) < RETRY_PERIOD);
    }

    #[test]
    fn a_past_until_is_the_call_itself() {
        let at = Instant::now();
        assert_eq!(wall_to_instant(at, 1_000, 5_000), at);
        assert_eq!(wall_to_instant(at, 6_000, 5_000), at + ms(1_000));
    }

    #[test]
    fn the_table_has_the_three_rows_and_the_goals() {
        let samples = Samples {
            kill: vec![Some(ms(15_500)), Some(ms(16_250))],
            graceful: vec![Some(ms(300)), None],
            overlap: vec![Duration::ZERO, Duration::ZERO],
            ..Samples::default()
        };
        let text = table(2, &Ok(samples), &Err(anyhow!("no peer")));
        assert!(
            text.contains(
                "| failover (SIGKILL) | 15.88 s | 16.25 s | n/a | n/a | ≤ lease + 1 s = 16 s |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| graceful handover (SIGTERM) | > 60 s | > 60 s | n/a | n/a | ≤ 0.3 s |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| overlap | 0.00 s | 0.00 s | n/a | n/a | 0 |"),
            "{text}"
        );
        assert!(text.contains("peer: harness failure: no peer"), "{text}");
        assert!(text.contains("client-go v0.36."), "{text}");
        assert!(text.contains("N = 2 trials per system"), "{text}");
        assert!(
            text.contains("Fewer than 20 trials: each p95 (nearest rank) is the slowest trial."),
            "{text}"
        );
        let full = table(20, &Err(anyhow!("no run")), &Err(anyhow!("no peer")));
        assert!(full.contains("N = 20 trials per system"), "{full}");
        assert!(!full.contains("Fewer than"), "{full}");
    }

    #[test]
    fn the_default_run_has_enough_trials_for_a_p95() {
        let args = Args::try_parse_from(["failover"]).expect("defaults");
        assert!(
            args.trials >= 20,
            "the default run has {} trials",
            args.trials
        );
        // With 20, the nearest-rank p95 is no longer the slowest trial.
        let samples: Vec<Option<Duration>> =
            (1..=u64::from(args.trials)).map(|i| Some(ms(i))).collect();
        let (_, p95) = median_p95(&samples).expect("samples");
        assert!(p95 < Some(ms(u64::from(args.trials))), "{p95:?}");
    }
}
