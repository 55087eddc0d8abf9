//! The operator's view of single-node listeners: who holds each Lease,
//! for status, hand-over Events, the rolling order (holders last) and the
//! offline workflow (a node hands its listeners over before it is Offline).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::api::{IntegrationCluster, ListenerMode, ListenerStatus};
use crate::listeners::{holder_node, lease_name};

/// How stale status may show a holder's last renewal before a reconcile
/// writes it again: renewals every few seconds must not become status
/// writes every few seconds.
const RENEW_TIME_RESOLUTION_SECONDS: i64 = 60;

/// The node holding the lease, if it is still valid at `now`. Holder
/// identities carry the pod UID; status, Events and the workflows speak
/// of nodes.
fn valid_holder(lease: &Lease, now: Timestamp) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    (now.as_second() < renewed.as_second() + duration).then(|| holder_node(holder).to_owned())
}

/// status.listeners: one entry per single-node listener, from its Lease.
pub fn statuses(ic: &IntegrationCluster, leases: &[Lease], now: Timestamp) -> Vec<ListenerStatus> {
    let cluster = ic.name_any();
    let by_name: BTreeMap<String, &Lease> = leases.iter().map(|l| (l.name_any(), l)).collect();
    let current = ic
        .status
        .as_ref()
        .map(|s| s.listeners.as_slice())
        .unwrap_or_default();
    ic.spec
        .listeners
        .iter()
        .filter(|l| l.mode == ListenerMode::SingleNode)
        .map(|l| {
            let lease = by_name.get(&lease_name(&cluster, &l.name));
            let holder = lease.and_then(|lease| valid_holder(lease, now));
            let spec = lease.and_then(|lease| lease.spec.as_ref());
            let transitions = spec.and_then(|s| s.lease_transitions);
            let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| Time(t.0));
            let before = current.iter().find(|c| c.name == l.name);
            let renew_time = match (before, &renewed) {
                (Some(b), Some(r))
                    if b.holder == holder
                        && b.transitions == transitions
                        && b.renew_time.as_ref().is_some_and(|t| {
                            r.0.as_second() - t.0.as_second() < RENEW_TIME_RESOLUTION_SECONDS
                        }) =>
                {
                    b.renew_time.clone()
                }
                _ => renewed,
            };
            ListenerStatus {
                name: l.name.clone(),
                holder,
                transitions,
                renew_time,
            }
        })
        .collect()
}

/// Hand-overs between the status before and after: the Event note and
/// the node it concerns (the new holder, else the old one).
pub fn handovers(before: &[ListenerStatus], after: &[ListenerStatus]) -> Vec<(String, String)> {
    after
        .iter()
        .filter_map(|a| {
            let b = before.iter().find(|b| b.name == a.name);
            let was = b.and_then(|b| b.holder.clone());
            if was == a.holder {
                return None;
            }
            let epoch = a.transitions.unwrap_or_default();
            Some(match (&was, &a.holder) {
                (Some(w), Some(n)) => (format!("{}: {w} → {n} (epoch {epoch})", a.name), n.clone()),
                (None, Some(n)) => (
                    format!("{}: held by {n} (epoch {epoch})", a.name),
                    n.clone(),
                ),
                (Some(w), None) => (
                    format!("{}: {w} let go; no node holds it now", a.name),
                    w.clone(),
                ),
                (None, None) => return None,
            })
        })
        .collect()
}

/// A new listener Lease that takes over from an earlier operator version's
/// Lease of the same listener: it starts from that record (holder, renew
/// time, epoch). The agents see a holder that never renews it and wait a
/// whole lease duration before they take it, so an agent of the earlier
/// version, which its Role no longer lets renew the old Lease, has passed
/// its renew deadline and stopped listening by then; epochs keep growing.
pub fn taking_over(mut new: Lease, old: &Lease) -> Lease {
    new.spec.clone_from(&old.spec);
    new
}

/// Nodes holding a valid listener lease now.
pub fn holders(leases: &[Lease], now: Timestamp) -> Vec<String> {
    leases.iter().filter_map(|l| valid_holder(l, now)).collect()
}

/// What of a Lease should wake the controller: a change of holder or epoch,
/// not every renewal.
pub fn holder_and_epoch(lease: &Lease) -> Option<u64> {
    let spec = lease.spec.as_ref();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        spec.and_then(|s| s.holder_identity.as_deref()),
        spec.and_then(|s| s.lease_transitions),
    )
        .hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed: Timestamp, transitions: i32) -> Lease {
        Lease {
            metadata: kube::api::ObjectMeta {
                name: Some("o-listener-in".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(15),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn an_expired_lease_has_no_holder() {
        let now = Timestamp::now();
        assert_eq!(valid_holder(&lease("o-1", now, 1), now), Some("o-1".into()));
        let old = Timestamp::from_second(now.as_second() - 16).expect("time");
        assert_eq!(valid_holder(&lease("o-1", old, 1), now), None);
        assert_eq!(valid_holder(&lease("", now, 1), now), None);
    }

    #[test]
    fn status_and_holders_name_the_node_of_a_holder_identity() {
        let now = Timestamp::now();
        let identity = crate::listeners::holder_identity("o-1", "5f0c");
        let held = lease(&identity, now, 2);
        assert_eq!(holders(std::slice::from_ref(&held), now), ["o-1"]);
        let spec = serde_saphyr::from_str(
            "profile: generic\nmode: stateless\nimage: s\nreplicas: 2\nlisteners: [{name: in, mode: singleNode}]\n",
        )
        .expect("spec");
        let ic = IntegrationCluster::new("o", spec);
        let mut held = held;
        held.metadata.name = Some(lease_name("o", "in"));
        let status = statuses(&ic, &[held], now);
        assert_eq!(status[0].holder.as_deref(), Some("o-1"));
    }

    #[test]
    fn a_lease_taking_over_from_an_earlier_versions_keeps_its_holder_and_epoch() {
        let now = Timestamp::now();
        let old = lease("o-1", now, 7);
        let mut new = lease("", now, 0);
        new.spec = None;
        new.metadata.name = Some(lease_name("o", "in"));
        let taken = taking_over(new, &old);
        assert_eq!(taken.metadata.name.as_deref(), Some("o.listener.in"));
        assert_eq!(holders(std::slice::from_ref(&taken), now), ["o-1"]);
        assert_eq!(taken.spec.and_then(|s| s.lease_transitions), Some(7));
    }

    #[test]
    fn handovers_name_both_nodes_and_the_epoch() {
        let s = |holder: Option<&str>, t| ListenerStatus {
            name: "in".into(),
            holder: holder.map(Into::into),
            transitions: Some(t),
            renew_time: None,
        };
        assert_eq!(
            handovers(&[s(Some("o-0"), 1)], &[s(Some("o-2"), 2)]),
            [("in: o-0 → o-2 (epoch 2)".to_owned(), "o-2".to_owned())]
        );
        assert!(handovers(&[s(Some("o-0"), 1)], &[s(Some("o-0"), 1)]).is_empty());
    }

    #[test]
    fn renewals_alone_do_not_change_the_watch_hash() {
        let now = Timestamp::now();
        let later = Timestamp::from_second(now.as_second() + 2).expect("time");
        assert_eq!(
            holder_and_epoch(&lease("o-1", now, 1)),
            holder_and_epoch(&lease("o-1", later, 1))
        );
        assert_ne!(
            holder_and_epoch(&lease("o-1", now, 1)),
            holder_and_epoch(&lease("o-2", now, 2))
        );
    }
}
