//! Lease I/O shared by the agents' listener elections and the operator's
//! own leader election: read a Lease's record, take or renew it with the
//! resourceVersion read (optimistic concurrency), give it up.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use crate::listeners::election::{Record, Timings};

/// The parts of a Lease an election reads.
pub fn record_of(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity,
        transitions: spec.lease_transitions.unwrap_or(0),
        duration_seconds: spec.lease_duration_seconds.unwrap_or(15),
        renew_time: spec.renew_time.map(|t| t.0.to_string()),
    }
}

/// Writes name their writer (the operator or an agent): without a field
/// manager the API server records "unknown".
fn params(manager: &str) -> PostParams {
    PostParams {
        field_manager: Some(manager.to_owned()),
        ..PostParams::default()
    }
}

/// Renews or acquires `lease` (as read, with its resourceVersion) for `me`
/// with `transitions`; false when another writer came first or the API did
/// not answer within a retry period.
pub async fn write(
    api: &Api<Lease>,
    mut lease: Lease,
    manager: &str,
    me: &str,
    transitions: i32,
    timings: &Timings,
) -> bool {
    let now = MicroTime(Timestamp::now());
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        spec.acquire_time = Some(now.clone());
    }
    spec.holder_identity = Some(me.to_owned());
    spec.lease_transitions = Some(transitions);
    spec.lease_duration_seconds = Some(i32::try_from(timings.lease.as_secs()).unwrap_or(15));
    spec.renew_time = Some(now);
    let name = lease.metadata.name.clone().unwrap_or_default();
    match tokio::time::timeout(timings.retry, api.replace(&name, &params(manager), &lease)).await {
        Ok(Ok(_)) => true,
        Ok(Err(kube::Error::Api(e))) if e.code == 409 => false,
        Ok(Err(e)) => {
            warn!(lease = %name, error = %e, "writing the lease failed");
            false
        }
        Err(_) => {
            warn!(lease = %name, "writing the lease timed out");
            false
        }
    }
}

/// Gives the Lease up at once (no holder), so the next contender takes it
/// as soon as it sees the release (listener contenders watch their Lease)
/// or on its next retry, instead of waiting for expiry.
pub async fn release(api: &Api<Lease>, mut lease: Lease, manager: &str, timings: &Timings) {
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    let name = lease.metadata.name.clone().unwrap_or_default();
    match tokio::time::timeout(timings.retry, api.replace(&name, &params(manager), &lease)).await {
        Ok(Ok(_)) => info!(lease = %name, "released"),
        Ok(Err(e)) => warn!(lease = %name, error = %e, "releasing the lease failed"),
        Err(_) => warn!(lease = %name, "releasing the lease timed out"),
    }
}
