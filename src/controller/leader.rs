//! The operator's own leader election, for running more than one replica:
//! only the holder of a Lease in the operator's namespace reconciles. It
//! is the listeners' election (`crate::listeners::election`, Lease I/O in
//! `crate::lease`): a leader that cannot renew within the renew deadline
//! stops before its lease can expire for a standby, and a leader stopped by
//! a signal releases the Lease so a standby takes over within a retry
//! period.

use std::time::Instant;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::lease;
use crate::listeners::election::{self, Next, Record, Timings};

/// How a leader's term ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// Asked to stop (a signal).
    Stopped,
    /// Could not renew in time, or another process holds the Lease.
    Lost,
}

pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    me: String,
    timings: Timings,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, name: &str, me: &str, timings: Timings) -> Self {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            me: me.to_owned(),
            timings,
        }
    }

    /// The Lease as it is now, created empty when it does not exist.
    async fn read(&self) -> Option<Lease> {
        match tokio::time::timeout(self.timings.retry, self.api.get_opt(&self.name)).await {
            Ok(Ok(Some(lease))) => Some(lease),
            Ok(Ok(None)) => {
                let empty = Lease {
                    metadata: kube::api::ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: None,
                };
                match self
                    .api
                    .create(
                        &PostParams {
                            field_manager: Some(super::FIELD_MANAGER.to_owned()),
                            ..PostParams::default()
                        },
                        &empty,
                    )
                    .await
                {
                    Ok(created) => Some(created),
                    // Another replica created it first: read it next time.
                    Err(kube::Error::Api(e)) if e.code == 409 => None,
                    Err(e) => {
                        warn!(lease = %self.name, error = %e, "creating the leader lease failed");
                        None
                    }
                }
            }
            Ok(Err(e)) => {
                warn!(lease = %self.name, error = %e, "reading the leader lease failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Waits until this process leads; None when `stop` came first.
    pub async fn acquire(&self, stop: &mut watch::Receiver<bool>) -> Option<Instant> {
        let mut seen: Option<(Record, Instant)> = None;
        let mut announced = false;
        loop {
            if *stop.borrow() {
                return None;
            }
            if let Some(current) = self.read().await {
                let record = lease::record_of(&current);
                let observed_at = match &seen {
                    Some((r, at)) if *r == record => *at,
                    _ => Instant::now(),
                };
                seen = Some((record.clone(), observed_at));
                if election::next(&self.me, &record, observed_at, Instant::now()) != Next::Wait {
                    let started = Instant::now();
                    if lease::write(
                        &self.api,
                        current,
                        super::FIELD_MANAGER,
                        &self.me,
                        record.transitions + 1,
                        &self.timings,
                    )
                    .await
                    {
                        info!(lease = %self.name, identity = %self.me, "leading");
                        return Some(started);
                    }
                } else if !announced {
                    info!(lease = %self.name, holder = ?record.holder, "standing by: another replica leads");
                    announced = true;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timings.retry) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Renews every retry period until `stop` or until the term is lost.
    pub async fn keep(&self, mut last_renew: Instant, mut stop: watch::Receiver<bool>) -> TermEnd {
        loop {
            let deadline = last_renew + self.timings.renew_deadline;
            let wait = self
                .timings
                .retry
                .min(deadline.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return TermEnd::Stopped;
            }
            if election::must_step_down(last_renew, Instant::now(), &self.timings) {
                warn!(lease = %self.name, "could not renew within the renew deadline");
                return TermEnd::Lost;
            }
            let Some(current) = self.read().await else {
                continue;
            };
            let record = lease::record_of(&current);
            if record.holder.as_deref() != Some(self.me.as_str()) {
                warn!(lease = %self.name, holder = ?record.holder, "another replica took the lease");
                return TermEnd::Lost;
            }
            let started = Instant::now();
            if lease::write(
                &self.api,
                current,
                super::FIELD_MANAGER,
                &self.me,
                record.transitions,
                &self.timings,
            )
            .await
            {
                last_renew = started;
            }
        }
    }

    /// Gives the Lease up if this process still holds it.
    pub async fn release(&self) {
        if let Some(current) = self.read().await
            && lease::record_of(&current).holder.as_deref() == Some(self.me.as_str())
        {
            lease::release(&self.api, current, super::FIELD_MANAGER, &self.timings).await;
        }
    }
}
