//! Listener clustering in the agent.
//!
//! - singleNode: one Lease per listener ([`lease_name`]); the agents of
//!   online nodes contend for it with optimistic concurrency (every write
//!   carries the resourceVersion it read, a conflict means someone else
//!   wrote first), each as `<pod>/<pod uid>` ([`holder_identity`]). The
//!   holder enables the listener on its server with the fencing epoch (the
//!   Lease's `leaseTransitions`), renews every retry period, and disables it
//!   when it cannot renew within the renew deadline, when its node goes
//!   offline, or when it shuts down. It releases the Lease at once (another
//!   node takes over within a retry period) only when the server confirmed
//!   the disable; otherwise it keeps trying until its renew deadline and
//!   leaves the Lease to run out, so the next holder starts a whole lease
//!   duration after the last renewal, when the server's own `until` has
//!   long passed.
//! - multiNode: enabled on every online node; messages are claimed exactly
//!   once in the cluster database (see [`claims`]).

pub mod claims;
pub mod election;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
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
    pub leases: Api<Lease>,
    /// This agent's Lease holder identity (see [`holder_identity`]).
    pub me: String,
    /// The cluster's name (the IntegrationCluster's metadata.name).
    pub cluster: String,
    pub hooks: Hooks,
    pub paths: ListenerHooks,
    /// Names of the single-node listeners this agent holds now.
    pub holding: Mutex<BTreeSet<String>>,
}

impl Listeners {
    fn set_holding(&self, listener: &str, holds: bool) {
        let mut holding = self
            .holding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if holds {
            holding.insert(listener.to_owned());
        } else {
            holding.remove(listener);
        }
    }

    /// Whether this agent holds any single-node listener.
    pub fn holds_any(&self) -> bool {
        self.holding.lock().map_or(true, |h| !h.is_empty())
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

struct Held {
    epoch: i32,
    /// When the last successful renewal (or the acquisition) started.
    last_renew: Instant,
}

/// Where this agent's server stands with a single-node listener, across
/// turns of the election loop.
#[derive(Default)]
struct Fence {
    /// Holding the Lease, listening under this epoch.
    held: Option<Held>,
    /// Not holding, but a disable under this epoch was never confirmed:
    /// the server may still listen, so the Lease must not be released.
    unconfirmed: Option<i32>,
}

/// Pause between disable attempts within the renew deadline.
const DISABLE_RETRY: Duration = Duration::from_millis(250);

/// Runs every listener of `specs` until `shutdown` turns true; single-node
/// listeners release their Leases before this returns.
pub async fn run(
    listeners: Arc<Listeners>,
    specs: Vec<ListenerSpec>,
    eligible: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) {
    let tasks: Vec<_> = specs
        .into_iter()
        .map(|spec| {
            let listeners = listeners.clone();
            let eligible = eligible.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                match spec.mode {
                    ListenerMode::SingleNode => single(&listeners, &spec, eligible, shutdown).await,
                    ListenerMode::MultiNode => multi(&listeners, &spec, eligible, shutdown).await,
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
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
                &listeners.paths.enable
            } else {
                &listeners.paths.disable
            };
            if let Err(e) = listeners.call(path.as_deref(), spec, 0, None).await {
                warn!(listener = %spec.name, error = %e, "listener hook failed");
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
    let name = lease_name(&listeners.cluster, &spec.name);
    let timings = Timings::from_seconds(
        spec.lease_duration_seconds,
        spec.renew_deadline_seconds,
        spec.retry_period_seconds,
    );
    let me = listeners.me.as_str();
    let mut fence = Fence::default();
    let mut seen: Option<(Record, Instant)> = None;
    loop {
        // Fencing comes first: a holder past its renew deadline stops
        // listening before anything else, also right after waking from a
        // freeze.
        if let Some(h) = &fence.held
            && election::must_step_down(h.last_renew, Instant::now(), &timings)
        {
            warn!(listener = %spec.name, "renew deadline passed: disabling the listener");
            step_down(listeners, spec, &mut fence, &timings).await;
        }
        let stopping = *shutdown.borrow();
        let wanted = *eligible.borrow() && !stopping;

        match tokio::time::timeout(timings.retry, listeners.leases.get_opt(&name)).await {
            Ok(Ok(Some(lease))) => {
                let record = crate::lease::record_of(&lease);
                let observed_at = match &seen {
                    Some((r, at)) if *r == record => *at,
                    _ => Instant::now(),
                };
                seen = Some((record.clone(), observed_at));
                let mine = record.holder.as_deref() == Some(me);
                if mine && fence.held.is_none() && fence.unconfirmed.is_none() {
                    // The Lease names this agent but this process does not
                    // hold it (the agent restarted, or a release failed):
                    // the server may still listen from before.
                    fence.unconfirmed = Some(record.transitions);
                }
                if !wanted {
                    let disabled = step_down(listeners, spec, &mut fence, &timings).await;
                    if mine && election::after_step_down(disabled) == AfterStepDown::Release {
                        crate::lease::release(
                            &listeners.leases,
                            lease,
                            crate::agent::FIELD_MANAGER,
                            &timings,
                        )
                        .await;
                    }
                } else {
                    match election::next(me, &record, observed_at, Instant::now()) {
                        Next::Wait => {
                            if fence.held.is_some() {
                                info!(listener = %spec.name, holder = ?record.holder, "lost the lease");
                            }
                            step_down(listeners, spec, &mut fence, &timings).await;
                        }
                        next => {
                            // Every time this agent starts listening is a
                            // new epoch, also when the Lease still names it
                            // (after a step-down or a restart).
                            let epoch = if next == Next::Acquire || fence.held.is_none() {
                                record.transitions + 1
                            } else {
                                record.transitions
                            };
                            let started = Instant::now();
                            let wall = SystemTime::now();
                            let written = crate::lease::write(
                                &listeners.leases,
                                lease,
                                crate::agent::FIELD_MANAGER,
                                me,
                                epoch,
                                &timings,
                            )
                            .await;
                            if written
                                && !election::must_step_down(started, Instant::now(), &timings)
                            {
                                let until = election::listen_until(wall, &timings);
                                let (path, hook) = if fence.held.is_none() {
                                    listeners.set_holding(&spec.name, true);
                                    info!(listener = %spec.name, epoch, "holding the lease: enabling the listener");
                                    (&listeners.paths.enable, "enable")
                                } else {
                                    (&listeners.paths.renew, "renew")
                                };
                                if let Err(e) = listeners
                                    .call(path.as_deref(), spec, epoch, Some(until))
                                    .await
                                {
                                    warn!(listener = %spec.name, hook, error = %e, "listener hook failed");
                                }
                                // Listening under the new epoch supersedes
                                // an unconfirmed disable.
                                fence.unconfirmed = None;
                                fence.held = Some(Held {
                                    epoch,
                                    last_renew: started,
                                });
                            }
                        }
                    }
                }
            }
            Ok(Ok(None)) => {
                // The operator creates the Lease; nothing to hold yet.
                step_down(listeners, spec, &mut fence, &timings).await;
            }
            Ok(Err(e)) => {
                warn!(listener = %spec.name, error = %e, "reading the lease failed");
                retry_unconfirmed(listeners, spec, &mut fence, &timings).await;
            }
            Err(_) => {
                warn!(listener = %spec.name, "reading the lease timed out");
                retry_unconfirmed(listeners, spec, &mut fence, &timings).await;
            }
        }
        if stopping {
            // Whatever the API said, the server stops listening.
            step_down(listeners, spec, &mut fence, &timings).await;
            return;
        }
        // Sleep a retry period, but never past the renew deadline, and wake
        // at once when the node's eligibility or shutdown changes.
        let mut wait = timings.retry;
        if let Some(h) = &fence.held {
            let deadline = h.last_renew + timings.renew_deadline;
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = eligible.changed() => {}
            _ = shutdown.changed() => {}
        }
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
    listeners.set_holding(&spec.name, false);
    let (epoch, deadline, holder) = match (fence.held.take(), fence.unconfirmed) {
        (Some(h), _) => (h.epoch, h.last_renew + timings.renew_deadline, true),
        (None, Some(epoch)) => (epoch, Instant::now(), false),
        (None, None) => return Disable::Confirmed,
    };
    loop {
        let result = listeners
            .call(listeners.paths.disable.as_deref(), spec, epoch, None)
            .await;
        let Err(e) = result else {
            fence.unconfirmed = None;
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
        fence.unconfirmed = Some(epoch);
        return Disable::Unconfirmed;
    }
}

/// While the API is away, an unconfirmed disable is still tried each turn.
async fn retry_unconfirmed(
    listeners: &Listeners,
    spec: &ListenerSpec,
    fence: &mut Fence,
    timings: &Timings,
) {
    if fence.held.is_none() && fence.unconfirmed.is_some() {
        step_down(listeners, spec, fence, timings).await;
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
