//! Listener clustering in the agent.
//!
//! - singleNode: one Lease per listener (`<cluster>-listener-<name>`); the
//!   agents of online nodes contend for it with optimistic concurrency
//!   (every write carries the resourceVersion it read, a conflict means
//!   someone else wrote first). The holder enables the listener on its
//!   server with the fencing epoch (the Lease's `leaseTransitions`), renews
//!   every retry period, and disables it when it cannot renew within the
//!   renew deadline, when its node goes offline, or when it shuts down —
//!   then it releases the Lease at once so another node takes over within a
//!   retry period.
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
use tracing::{info, warn};

use crate::agent::hooks::Hooks;
use crate::api::{ListenerMode, ListenerSpec};
use election::{Next, Record, Timings};

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
    /// This node: the pod name, also the Lease holder identity.
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

    async fn call(
        &self,
        path: Option<&str>,
        spec: &ListenerSpec,
        epoch: i32,
        until: Option<SystemTime>,
    ) {
        let Some(template) = path else {
            return;
        };
        let target = spec.target.as_deref().unwrap_or(&spec.name);
        let encoded: String = form_urlencoded::byte_serialize(target.as_bytes()).collect();
        let mut path = if template.contains("{listener}") {
            template.replace("{listener}", &encoded)
        } else {
            let sep = if template.contains('?') { '&' } else { '?' };
            format!("{template}{sep}listener={encoded}")
        };
        path += &format!("&epoch={epoch}");
        if let Some(until) = until {
            path += &format!("&until={}", election::unix_millis(until));
        }
        if let Err(e) = self.hooks.post(&path).await {
            warn!(listener = %spec.name, error = %e, "listener hook failed");
        }
    }
}

/// The Lease name of a single-node listener.
pub fn lease_name(cluster: &str, listener: &str) -> String {
    format!("{cluster}-listener-{listener}")
}

struct Held {
    epoch: i32,
    /// When the last successful renewal (or the acquisition) started.
    last_renew: Instant,
}

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
            listeners.call(path.as_deref(), spec, 0, None).await;
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
    let mut held: Option<Held> = None;
    let mut seen: Option<(Record, Instant)> = None;
    loop {
        // Fencing comes first: a holder past its renew deadline stops
        // listening before anything else, also right after waking from a
        // freeze.
        if let Some(h) = &held
            && election::must_step_down(h.last_renew, Instant::now(), &timings)
        {
            warn!(listener = %spec.name, "renew deadline passed: disabling the listener");
            step_down(listeners, spec, &mut held).await;
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
                if !wanted {
                    if held.is_some() || record.holder.as_deref() == Some(me) {
                        step_down(listeners, spec, &mut held).await;
                        crate::lease::release(&listeners.leases, lease, &timings).await;
                    }
                } else {
                    match election::next(me, &record, observed_at, Instant::now()) {
                        Next::Wait => {
                            if held.is_some() {
                                info!(listener = %spec.name, holder = ?record.holder, "lost the lease");
                                step_down(listeners, spec, &mut held).await;
                            }
                        }
                        next => {
                            // Every time this agent starts listening is a
                            // new epoch, also when the Lease still names it
                            // (after a step-down or a restart).
                            let epoch = if next == Next::Acquire || held.is_none() {
                                record.transitions + 1
                            } else {
                                record.transitions
                            };
                            let started = Instant::now();
                            let wall = SystemTime::now();
                            let written =
                                crate::lease::write(&listeners.leases, lease, me, epoch, &timings)
                                    .await;
                            if written
                                && !election::must_step_down(started, Instant::now(), &timings)
                            {
                                let until = election::listen_until(wall, &timings);
                                if held.is_none() {
                                    listeners.set_holding(&spec.name, true);
                                    info!(listener = %spec.name, epoch, "holding the lease: enabling the listener");
                                    listeners
                                        .call(
                                            listeners.paths.enable.as_deref(),
                                            spec,
                                            epoch,
                                            Some(until),
                                        )
                                        .await;
                                } else {
                                    listeners
                                        .call(
                                            listeners.paths.renew.as_deref(),
                                            spec,
                                            epoch,
                                            Some(until),
                                        )
                                        .await;
                                }
                                held = Some(Held {
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
                if held.is_some() {
                    step_down(listeners, spec, &mut held).await;
                }
            }
            Ok(Err(e)) => warn!(listener = %spec.name, error = %e, "reading the lease failed"),
            Err(_) => warn!(listener = %spec.name, "reading the lease timed out"),
        }
        if stopping {
            // Whatever the API said, the server stops listening.
            step_down(listeners, spec, &mut held).await;
            return;
        }
        // Sleep a retry period, but never past the renew deadline, and wake
        // at once when the node's eligibility or shutdown changes.
        let mut wait = timings.retry;
        if let Some(h) = &held {
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

async fn step_down(listeners: &Listeners, spec: &ListenerSpec, held: &mut Option<Held>) {
    if let Some(h) = held.take() {
        listeners
            .call(listeners.paths.disable.as_deref(), spec, h.epoch, None)
            .await;
    }
    listeners.set_holding(&spec.name, false);
}

/// How long the agent waits for its listeners to release on shutdown.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
