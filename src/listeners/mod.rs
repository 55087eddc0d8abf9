//! Listener clustering in the agent.
//!
//! - singleNode: one Lease per listener ([`lease_name`]); the agents of
//!   online nodes contend for it with optimistic concurrency (every write
//!   carries the resourceVersion it read, a conflict means someone else
//!   wrote first), each as `<pod>/<pod uid>` ([`holder_identity`]). The
//!   holder enables the listener on its server with the fencing epoch (the
//!   Lease's `leaseTransitions`), renews every retry period, and disables it
//!   when it cannot renew within the renew deadline, when its node goes
//!   offline, or when it shuts down. It releases the Lease at once only when
//!   the server confirmed the disable; otherwise it keeps trying until its
//!   renew deadline and leaves the Lease to run out, so the next holder
//!   starts a whole lease duration after the last renewal, when the
//!   server's own `until` has long passed. Contenders watch their Lease: a
//!   release is taken over as soon as it is seen, another holder's Lease
//!   is tried again the moment it runs out on the contender's clock, and
//!   the retry period is only the fallback when the watch is away.
//! - multiNode: enabled on every online node; messages are claimed exactly
//!   once in the cluster database (see [`claims`]).

pub mod claims;
pub mod election;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::agent::hooks::{HookError, Hooks};
use crate::api::{ListenerMode, ListenerSpec};
use election::{AfterStepDown, Disable, Next, Record, Timings};

/// The server's listener hooks (paths on its admin port). `{listener}` in
/// a path is replaced by the listener's target; `epoch` and `until` are
/// added as query parameters.
#[derive(Clone, Debug, Default)]
pub struct ListenerHooks {
    pub enable: Option<String>,
    pub disable: Option<String>,
    /// Called after every renewal with the new `until`, so a server that
    /// supports it stops listening on its own if the agent stops renewing.
    pub renew: Option<String>,
}

/// What every listener task of one agent shares.
pub struct Listeners {
    leases: Api<Lease>,
    /// The same Leases through the client for watches.
    lease_watches: Api<Lease>,
    /// This agent's Lease holder identity (see [`holder_identity`]).
    me: String,
    /// The cluster's name (the IntegrationCluster's metadata.name).
    cluster: String,
    hooks: Hooks,
    paths: ListenerHooks,
    /// Each listener's fence as its task last left it: what the server may
    /// still be listening to. A task that dies (a panic, an abort) takes
    /// its own copy with it; from this one the agent steps its listener
    /// down anyway ([`step_down_left_over`]).
    fences: Mutex<BTreeMap<String, Fence>>,
}

impl Listeners {
    pub fn new(
        leases: Api<Lease>,
        lease_watches: Api<Lease>,
        me: String,
        cluster: String,
        hooks: Hooks,
        paths: ListenerHooks,
    ) -> Self {
        Listeners {
            leases,
            lease_watches,
            me,
            cluster,
            hooks,
            paths,
            fences: Mutex::default(),
        }
    }

    fn fences(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Fence>> {
        self.fences
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `fence` as `listener`'s; a listener its server is known not
    /// to listen to is dropped from the record.
    fn record(&self, listener: &str, fence: &Fence) {
        let mut fences = self.fences();
        if fence.held.is_none() && fence.unconfirmed.is_none() {
            fences.remove(listener);
        } else {
            fences.insert(listener.to_owned(), fence.clone());
        }
    }

    /// Whether this agent holds any single-node listener.
    pub fn holds_any(&self) -> bool {
        self.fences().values().any(|f| f.held.is_some())
    }

    /// Calls a listener hook; a listener without that hook has nothing
    /// to call, which counts as done.
    async fn call(
        &self,
        path: Option<&str>,
        spec: &ListenerSpec,
        epoch: i32,
        until: Option<SystemTime>,
    ) -> Result<(), HookError> {
        let Some(template) = path else {
            return Ok(());
        };
        self.hooks
            .post(&hook_path(template, spec, epoch, until))
            .await
    }
}

/// A hook's path and query: `{listener}` replaced by the listener's target
/// (else a `listener` parameter), plus `epoch` and `until`.
fn hook_path(template: &str, spec: &ListenerSpec, epoch: i32, until: Option<SystemTime>) -> String {
    let target = spec.target.as_deref().unwrap_or(&spec.name);
    let encoded: String = form_urlencoded::byte_serialize(target.as_bytes()).collect();
    let mut path = if template.contains("{listener}") {
        template.replace("{listener}", &encoded)
    } else {
        let sep = if template.contains('?') { '&' } else { '?' };
        format!("{template}{sep}listener={encoded}")
    };
    // `{listener}` may sit in the path itself, with no query yet.
    path.push(if path.contains('?') { '&' } else { '?' });
    path += &format!("epoch={epoch}");
    if let Some(until) = until {
        path += &format!("&until={}", election::unix_millis(until));
    }
    path
}

/// The Lease name of a single-node listener: `<cluster>.listener.<name>`.
/// Neither name can contain a '.' (the CRD refuses a cluster name with
/// one, and listener names are DNS labels), so a Lease name splits back
/// into exactly one pair: two clusters of a namespace never share a Lease
/// (and so never a Role rule), as they did when a '-' joined names that
/// contain '-' themselves. Readable, and a DNS subdomain of at most
/// 40 + 10 + 63 characters. The operator creates the Lease and the agents
/// hold it, both through this function.
pub fn lease_name(cluster: &str, listener: &str) -> String {
    format!("{cluster}.listener.{listener}")
}

/// The Lease name operator versions before [`lease_name`] used; the
/// operator retires such a Lease when it creates the new one.
pub fn legacy_lease_name(cluster: &str, listener: &str) -> String {
    format!("{cluster}-listener-{listener}")
}

/// An agent's Lease holder identity: its pod's name and UID, so a pod
/// recreated under the same name (whose predecessor may still be running
/// somewhere) is another holder and waits for the lease to run out.
pub fn holder_identity(pod: &str, uid: &str) -> String {
    format!("{pod}/{uid}")
}

/// The node (pod name) a holder identity names; pod names contain no '/',
/// and identities written before the UID was added are the pod name alone.
pub fn holder_node(identity: &str) -> &str {
    identity.split_once('/').map_or(identity, |(node, _)| node)
}

#[derive(Clone, Debug)]
struct Held {
    epoch: i32,
    /// When the last successful renewal (or the acquisition) started.
    last_renew: Instant,
}

/// Where this agent's server stands with a listener, across turns of its
/// loop.
#[derive(Clone, Debug, Default)]
struct Fence {
    /// Holding the Lease, listening under this epoch.
    held: Option<Held>,
    /// Not holding, but a disable under this epoch was never confirmed:
    /// the server may still listen, so the Lease must not be released.
    /// A multi-node listener's enable is such an epoch (0) until disabled.
    unconfirmed: Option<i32>,
}

/// Pause between disable attempts within the renew deadline.
const DISABLE_RETRY: Duration = Duration::from_millis(250);

fn timings(spec: &ListenerSpec) -> Timings {
    Timings::from_seconds(
        spec.lease_duration_seconds,
        spec.renew_deadline_seconds,
        spec.retry_period_seconds,
    )
}

/// Runs one listener of this agent until `shutdown` turns true; a
/// single-node listener releases its Lease before this returns.
pub async fn listen(
    listeners: Arc<Listeners>,
    spec: ListenerSpec,
    eligible: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) {
    match spec.mode {
        ListenerMode::SingleNode => single(&listeners, &spec, eligible, shutdown).await,
        ListenerMode::MultiNode => multi(&listeners, &spec, eligible, shutdown).await,
    }
}

/// A multi-node listener: enabled while the node is online.
async fn multi(
    listeners: &Listeners,
    spec: &ListenerSpec,
    mut eligible: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut enabled = false;
    loop {
        let want = *eligible.borrow() && !*shutdown.borrow();
        if want != enabled {
            let path = if want {
                // Recorded before the call: the server may listen from
                // the moment it is asked.
                let listening = Fence {
                    held: None,
                    unconfirmed: Some(0),
                };
                listeners.record(&spec.name, &listening);
                &listeners.paths.enable
            } else {
                &listeners.paths.disable
            };
            match listeners.call(path.as_deref(), spec, 0, None).await {
                Ok(()) if !want => listeners.record(&spec.name, &Fence::default()),
                Ok(()) => {}
                Err(e) => warn!(listener = %spec.name, error = %e, "listener hook failed"),
            }
            enabled = want;
            info!(listener = %spec.name, enabled, "multi-node listener");
        }
        if *shutdown.borrow() {
            return;
        }
        tokio::select! {
            _ = eligible.changed() => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// A single-node listener's election loop.
async fn single(
    listeners: &Listeners,
    spec: &ListenerSpec,
    mut eligible: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut election = Election {
        listeners,
        spec,
        lease: lease_name(&listeners.cluster, &spec.name),
        timings: timings(spec),
        fence: Fence::default(),
        seen: None,
    };
    // The Lease as the API server changes it: a release reaches the
    // contenders at once instead of at their next retry. A watch that
    // breaks backs off and resumes; the retries go on meanwhile.
    let changes =
        kube::runtime::watcher::watch_object(listeners.lease_watches.clone(), &election.lease)
            .default_backoff()
            .fuse();
    let mut changes = std::pin::pin!(changes);
    // A Lease seen on the watch that the next turn acts on without
    // reading it again.
    let mut sighted: Option<Lease> = None;
    loop {
        // Fencing comes first: a holder past its renew deadline stops
        // listening before anything else, also right after waking from a
        // freeze.
        if let Some(h) = &election.fence.held
            && election::must_step_down(h.last_renew, Instant::now(), &election.timings)
        {
            warn!(listener = %spec.name, "renew deadline passed: disabling the listener");
            election.step_down().await;
        }
        let stopping = *shutdown.borrow();
        election
            .turn(*eligible.borrow() && !stopping, sighted.take())
            .await;
        if stopping {
            // Whatever the API said, the server stops listening.
            election.step_down().await;
            return;
        }
        let retry_at = Instant::now() + election.pause();
        loop {
            let wake = election.wake(retry_at, *eligible.borrow());
            tokio::select! {
                () = tokio::time::sleep_until(wake.into()) => break,
                _ = eligible.changed() => break,
                _ = shutdown.changed() => break,
                Some(change) = changes.next() => match change {
                    Ok(Some(lease)) => {
                        if election.sight(&lease, *eligible.borrow()) {
                            sighted = Some(lease);
                            break;
                        }
                    }
                    // Gone: the next turn finds out and steps down.
                    Ok(None) => {}
                    Err(e) => warn!(listener = %spec.name, error = %e,
                        "watching the lease failed; retrying meanwhile"),
                },
            }
        }
    }
}

/// One single-node listener's election, between turns.
struct Election<'a> {
    listeners: &'a Listeners,
    spec: &'a ListenerSpec,
    lease: String,
    timings: Timings,
    fence: Fence,
    /// The Lease record last read, and when this agent first saw it so:
    /// expiry is judged on this clock (see [`election`]).
    seen: Option<(Record, Instant)>,
}

impl Election<'_> {
    /// Reads the Lease (unless the watch just showed it) and acts on it;
    /// `wanted` says whether this node contends at all.
    async fn turn(&mut self, wanted: bool, sighted: Option<Lease>) {
        if let Some(lease) = sighted {
            // As current as a read, and every write carries its
            // resourceVersion: a Lease that changed since is a conflict.
            self.decide(lease, wanted).await;
            return;
        }
        let read = self.listeners.leases.get_opt(&self.lease);
        match tokio::time::timeout(self.timings.retry, read).await {
            Ok(Ok(Some(lease))) => self.decide(lease, wanted).await,
            Ok(Ok(None)) => {
                // The operator creates the Lease; nothing to hold yet.
                self.step_down().await;
            }
            Ok(Err(e)) => {
                warn!(listener = %self.spec.name, error = %e, "reading the lease failed");
                self.retry_unconfirmed().await;
            }
            Err(_) => {
                warn!(listener = %self.spec.name, "reading the lease timed out");
                self.retry_unconfirmed().await;
            }
        }
    }

    /// Notes `record` as seen now, unless it is what was seen before;
    /// returns when it was first seen so.
    fn observe(&mut self, record: &Record) -> Instant {
        let observed_at = match &self.seen {
            Some((r, at)) if r == record => *at,
            _ => Instant::now(),
        };
        self.seen = Some((record.clone(), observed_at));
        observed_at
    }

    /// Takes in a Lease seen on the watch; true when the election should
    /// act on it now. Seeing another holder's renewals as they happen
    /// only moves its expiry later than a read would, never earlier: each
    /// is seen after it was written.
    fn sight(&mut self, lease: &Lease, wanted: bool) -> bool {
        let record = crate::lease::record_of(lease);
        self.observe(&record);
        election::take_on_sight(&record, wanted, self.fence.held.is_some())
    }

    /// When to take the next turn: at `retry_at`, or, for a contender,
    /// when another holder's Lease last seen runs out if that is sooner.
    /// An expiry already past (the turn at it did not win) counts no
    /// more: the retries go on as before.
    fn wake(&self, retry_at: Instant, wanted: bool) -> Instant {
        let now = Instant::now();
        self.seen
            .as_ref()
            .filter(|_| wanted)
            .and_then(|(record, at)| election::expires_at(&self.listeners.me, record, *at))
            .filter(|expiry| *expiry > now)
            .map_or(retry_at, |expiry| expiry.min(retry_at))
    }

    async fn decide(&mut self, lease: Lease, wanted: bool) {
        let record = crate::lease::record_of(&lease);
        let observed_at = self.observe(&record);
        let me = self.listeners.me.as_str();
        let mine = record.holder.as_deref() == Some(me);
        if mine && self.fence.held.is_none() && self.fence.unconfirmed.is_none() {
            // The Lease names this agent but this process does not hold
            // it (the agent restarted, or a release failed): the server
            // may still listen from before.
            self.fence.unconfirmed = Some(record.transitions);
            self.listeners.record(&self.spec.name, &self.fence);
        }
        if !wanted {
            let disabled = self.step_down().await;
            if mine && election::after_step_down(disabled) == AfterStepDown::Release {
                crate::lease::release(
                    &self.listeners.leases,
                    lease,
                    crate::agent::FIELD_MANAGER,
                    &self.timings,
                )
                .await;
            }
            return;
        }
        match election::next(me, &record, observed_at, Instant::now()) {
            Next::Wait => {
                if self.fence.held.is_some() {
                    info!(listener = %self.spec.name, holder = ?record.holder, "lost the lease");
                }
                self.step_down().await;
            }
            next => self.hold(lease, &record, next).await,
        }
    }

    /// Takes or renews the Lease and, once written in time, tells the
    /// server to listen (or that it may go on listening).
    async fn hold(&mut self, lease: Lease, record: &Record, next: Next) {
        // Every time this agent starts listening is a new epoch, also
        // when the Lease still names it (after a step-down or a restart).
        let newly = self.fence.held.is_none();
        let epoch = if next == Next::Acquire || newly {
            record.transitions + 1
        } else {
            record.transitions
        };
        let started = Instant::now();
        let wall = SystemTime::now();
        let written = crate::lease::write(
            &self.listeners.leases,
            lease,
            crate::agent::FIELD_MANAGER,
            &self.listeners.me,
            epoch,
            &self.timings,
        )
        .await;
        if !written || election::must_step_down(started, Instant::now(), &self.timings) {
            return;
        }
        let until = election::listen_until(wall, &self.timings);
        // Listening under the new epoch supersedes an unconfirmed
        // disable. Recorded before the call: the server may listen from
        // the moment it is asked.
        self.fence.unconfirmed = None;
        self.fence.held = Some(Held {
            epoch,
            last_renew: started,
        });
        self.listeners.record(&self.spec.name, &self.fence);
        let (path, hook) = if newly {
            info!(listener = %self.spec.name, epoch, "holding the lease: enabling the listener");
            (&self.listeners.paths.enable, "enable")
        } else {
            (&self.listeners.paths.renew, "renew")
        };
        if let Err(e) = self
            .listeners
            .call(path.as_deref(), self.spec, epoch, Some(until))
            .await
        {
            warn!(listener = %self.spec.name, hook, error = %e, "listener hook failed");
        }
    }

    async fn step_down(&mut self) -> Disable {
        step_down(self.listeners, self.spec, &mut self.fence, &self.timings).await
    }

    /// While the API is away, an unconfirmed disable is still tried each
    /// turn.
    async fn retry_unconfirmed(&mut self) {
        if self.fence.held.is_none() && self.fence.unconfirmed.is_some() {
            self.step_down().await;
        }
    }

    /// A retry period, but never past the renew deadline.
    fn pause(&self) -> Duration {
        let mut wait = self.timings.retry;
        if let Some(h) = &self.fence.held {
            let deadline = h.last_renew + self.timings.renew_deadline;
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        wait
    }
}

/// Stops the server listening. A holder disables its listener and tries
/// again until its renew deadline (when the `until` it gave the server
/// passes); a disable left unconfirmed earlier gets one more attempt.
/// Whether the server confirmed decides if the Lease may be released.
async fn step_down(
    listeners: &Listeners,
    spec: &ListenerSpec,
    fence: &mut Fence,
    timings: &Timings,
) -> Disable {
    let (epoch, deadline, holder) = match (fence.held.take(), fence.unconfirmed) {
        (Some(h), _) => (h.epoch, h.last_renew + timings.renew_deadline, true),
        (None, Some(epoch)) => (epoch, Instant::now(), false),
        (None, None) => return Disable::Confirmed,
    };
    // No longer holding, and unconfirmed until the server answers.
    fence.unconfirmed = Some(epoch);
    listeners.record(&spec.name, fence);
    loop {
        let result = listeners
            .call(listeners.paths.disable.as_deref(), spec, epoch, None)
            .await;
        let Err(e) = result else {
            fence.unconfirmed = None;
            listeners.record(&spec.name, fence);
            return Disable::Confirmed;
        };
        if let Some(pause) = election::retry_disable(Instant::now(), deadline, DISABLE_RETRY) {
            debug!(listener = %spec.name, epoch, error = %e, "disabling failed; trying again");
            tokio::time::sleep(pause).await;
            continue;
        }
        if holder {
            warn!(listener = %spec.name, epoch, error = %e,
                "the server did not confirm the disable: keeping the lease until it runs out");
        } else {
            debug!(listener = %spec.name, epoch, error = %e, "disabling failed again");
        }
        return Disable::Unconfirmed;
    }
}

/// Steps down every listener the record says the server may still listen
/// to: those of tasks that ended without stepping down (a panic, an
/// abort), and disables never confirmed. As a task stepping down does, it
/// disables the listener and, once the server confirmed, releases a Lease
/// that still names this agent. The agent calls this after its listener
/// tasks ended, whatever ended them.
pub async fn step_down_left_over(listeners: &Listeners, specs: &[ListenerSpec]) {
    let left = std::mem::take(&mut *listeners.fences());
    for (name, mut fence) in left {
        let Some(spec) = specs.iter().find(|s| s.name == name) else {
            continue;
        };
        warn!(listener = %name, epoch = ?fence.held.as_ref().map(|h| h.epoch).or(fence.unconfirmed),
            "the listener was not stepped down: disabling it");
        let timings = timings(spec);
        let disabled = step_down(listeners, spec, &mut fence, &timings).await;
        if spec.mode == ListenerMode::SingleNode
            && election::after_step_down(disabled) == AfterStepDown::Release
        {
            release_if_mine(listeners, spec, &timings).await;
        }
    }
}

async fn release_if_mine(listeners: &Listeners, spec: &ListenerSpec, timings: &Timings) {
    let name = lease_name(&listeners.cluster, &spec.name);
    match tokio::time::timeout(timings.retry, listeners.leases.get_opt(&name)).await {
        Ok(Ok(Some(lease)))
            if crate::lease::record_of(&lease).holder.as_deref() == Some(&listeners.me) =>
        {
            crate::lease::release(
                &listeners.leases,
                lease,
                crate::agent::FIELD_MANAGER,
                timings,
            )
            .await;
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(lease = %name, error = %e, "reading the lease failed"),
        Err(_) => warn!(lease = %name, "reading the lease timed out"),
    }
}

/// How long the agent waits for its listeners to release on shutdown.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn lease_names_of_distinct_cluster_and_listener_pairs_are_distinct() {
        assert_ne!(
            lease_name("orders", "listener-in"),
            lease_name("orders-listener", "in")
        );
        // Every way of cutting dashed words into a cluster and a listener
        // name: the places a separator could hide.
        let words = ["a", "listener", "in", "0", "x-y"];
        let mut names = vec![String::new()];
        for _ in 0..3 {
            let longer: Vec<String> = names
                .iter()
                .flat_map(|n| {
                    words.iter().map(move |w| {
                        if n.is_empty() {
                            (*w).to_owned()
                        } else {
                            format!("{n}-{w}")
                        }
                    })
                })
                .collect();
            names.extend(longer);
        }
        names.retain(|n| !n.is_empty());
        names.sort();
        names.dedup();
        let mut seen: BTreeMap<String, (&str, &str)> = BTreeMap::new();
        for cluster in &names {
            for listener in &names {
                let name = lease_name(cluster, listener);
                if let Some(before) = seen.insert(name.clone(), (cluster, listener)) {
                    panic!(
                        "{before:?} and {:?} share Lease {name}",
                        (cluster, listener)
                    );
                }
            }
        }
        assert!(seen.len() > 20_000);
        // What makes it so: neither name can contain the '.' that joins
        // them, which the CRD enforces.
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(crate::api::IntegrationCluster::crd()).expect("crd");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let rules = schema["x-kubernetes-validations"].to_string();
        assert!(
            rules.contains("!self.metadata.name.contains('.')"),
            "{rules}"
        );
        let pattern = &schema["properties"]["spec"]["properties"]["listeners"]["items"]["properties"]
            ["name"]["pattern"];
        assert_eq!(pattern, "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$");
    }

    #[test]
    fn hooks_carry_the_epoch_and_until_in_a_query_whatever_the_template() {
        let spec: ListenerSpec = serde_json::from_value(serde_json::json!({
            "name": "orders-in", "mode": "singleNode", "target": "orders.kafka:ordersListener"
        }))
        .expect("spec");
        let until = Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        // webMethods (WmART): the target in a query parameter.
        assert_eq!(
            hook_path(
                "/invoke/pub.art.listener/enableListener?listenerName={listener}",
                &spec,
                3,
                until
            ),
            "/invoke/pub.art.listener/enableListener?listenerName=orders.kafka%3AordersListener&epoch=3&until=1700000000123"
        );
        // The stand-in's and a generic server's plain paths.
        assert_eq!(
            hook_path("/listener/renew", &spec, 3, until),
            "/listener/renew?listener=orders.kafka%3AordersListener&epoch=3&until=1700000000123"
        );
        assert_eq!(
            hook_path("/listener/disable", &spec, 3, None),
            "/listener/disable?listener=orders.kafka%3AordersListener&epoch=3"
        );
        // The target in the path itself.
        assert_eq!(
            hook_path("/listeners/{listener}/enable", &spec, 4, until),
            "/listeners/orders.kafka%3AordersListener/enable?epoch=4&until=1700000000123"
        );
    }

    #[test]
    fn lease_names_are_valid_for_the_longest_names_the_crd_allows() {
        // A DNS subdomain, as Kubernetes checks object names.
        let name = lease_name(&"c".repeat(40), &"l".repeat(63));
        assert!(name.len() <= 253, "{name}");
        assert!(name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        }));
    }

    #[test]
    fn a_recreated_pod_is_another_holder_than_its_predecessor() {
        let old = holder_identity("l-0", "8d1c");
        let new = holder_identity("l-0", "f00d");
        assert_ne!(old, new);
        assert_eq!(holder_node(&old), "l-0");
        assert_eq!(holder_node(&new), "l-0");
        // Identities written before the UID was part of them.
        assert_eq!(holder_node("l-0"), "l-0");
    }
}
