//! The status a reconcile wants to see, as a pure function of the cluster,
//! the validation verdict and the plan.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::conditions::{self, Desired};
use super::plan::Plan;
use crate::api::{
    CacheStatus, DatabaseStatus, IntegrationCluster, IntegrationClusterStatus, ListenerStatus,
    NodeState, NodeStatus, Phase, condition,
};
use crate::render::Rendered;
use crate::validation::{Problem, ValidatedCluster};

/// What a valid cluster's reconcile decided.
pub struct Progress<'a> {
    pub plan: &'a Plan,
    pub rendered: &'a Rendered,
    /// The database and cache as observed (None: the cluster has none).
    pub database: Option<DatabaseStatus>,
    pub cache: Option<CacheStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// What is wrong with the cache or database: a Degraded reason and
    /// message.
    pub shared_problem: Option<(&'static str, String)>,
}

/// Reason of a passing validation.
const VALID: &str = "Valid";

/// The desired status: everything the current status holds, with the
/// verdict of this reconcile merged in.
pub fn desired(
    ic: &IntegrationCluster,
    validated: &Result<ValidatedCluster, Vec<Problem>>,
    progress: Option<&Progress>,
    now: Timestamp,
) -> IntegrationClusterStatus {
    let current = ic.status.clone().unwrap_or_default();
    let verdict = match validated {
        Ok(_) => Desired::new(
            condition::VALIDATED,
            true,
            VALID,
            "the spec passed all checks",
        ),
        Err(problems) => Desired::new(
            condition::VALIDATED,
            false,
            problems.first().map_or("Invalid", Problem::reason),
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let mut decided = vec![verdict];
    let mut phase = match validated {
        Err(_) => Phase::Invalid,
        Ok(_) => Phase::Pending,
    };
    let mut status = IntegrationClusterStatus {
        observed_generation: ic.metadata.generation,
        cluster_name: match validated {
            Ok(v) => Some(v.cluster_name.clone()),
            Err(_) => current.cluster_name.clone(),
        },
        ..current.clone()
    };
    if let (Ok(_), Some(progress)) = (validated, progress) {
        let (workload_conditions, workload_phase) =
            workload_conditions(ic, progress.plan, progress.shared_problem.as_ref());
        decided.extend(workload_conditions);
        phase = workload_phase;
        status.config_digest = Some(progress.rendered.config_digest.clone());
        status.packages_digest = Some(progress.rendered.packages_digest.clone());
        status.ready_replicas = Some(progress.plan.ready);
        status.online_replicas = Some(progress.plan.online);
        status.selector = Some(
            crate::workload::server_selector(ic)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        status.nodes = node_statuses(&current, progress.plan, now);
        status.database = progress.database.clone();
        status.cache = progress.cache.clone();
        status.listeners = progress.listeners.clone();
    }
    status.phase = Some(phase);
    status.conditions =
        conditions::merge(&current.conditions, &decided, ic.metadata.generation, now);
    status
}

fn node_statuses(
    current: &IntegrationClusterStatus,
    plan: &Plan,
    now: Timestamp,
) -> Vec<NodeStatus> {
    plan.nodes
        .iter()
        .map(|view| {
            let before = current.nodes.iter().find(|n| n.name == view.name);
            let since = match before {
                Some(b) if b.state == view.state => b.since.clone(),
                _ => Some(Time(now)),
            };
            NodeStatus {
                name: view.name.clone(),
                state: view.state,
                ready: view.ready,
                config_digest: view.config_digest.clone(),
                packages_digest: view.packages_digest.clone(),
                logical_hostname: view.logical_hostname.clone(),
                since,
                message: view.message.clone(),
            }
        })
        .collect()
}

/// Ready, Progressing, Degraded, ConfigDrift and Stalled, and the phase
/// that sums them up.
fn workload_conditions(
    ic: &IntegrationCluster,
    plan: &Plan,
    shared_problem: Option<&(&'static str, String)>,
) -> (Vec<Desired>, Phase) {
    let spec = &ic.spec;
    let expected = plan.expected;
    let settled = settled(plan, spec.replicas);
    let counts = format!(
        "{}/{expected} nodes online, {}/{expected} ready",
        plan.online, plan.ready
    );
    let ready = if settled {
        Desired::new(condition::READY, true, "AllNodesOnline", counts.clone())
    } else {
        Desired::new(condition::READY, false, "NodesNotReady", counts.clone())
    };
    let progressing = progressing(ic, plan, settled, &counts);
    let minimum = expected - spec.rollout.max_unavailable;
    let degraded = if plan.ready < minimum {
        Desired::new(
            condition::DEGRADED,
            true,
            "BelowMinimumAvailable",
            format!(
                "{} nodes ready, the rollout budget needs at least {minimum}",
                plan.ready
            ),
        )
    } else if let Some((reason, message)) = shared_problem {
        Desired::new(condition::DEGRADED, true, *reason, message.clone())
    } else {
        Desired::new(condition::DEGRADED, false, "Available", counts)
    };
    let phase = if plan.stalled.is_some() {
        Phase::Stalled
    } else if settled && shared_problem.is_some() {
        Phase::Degraded
    } else if settled {
        Phase::Ready
    } else if plan.ready < minimum
        && plan.actions.is_empty()
        && plan.drifted.is_empty()
        && plan.starting == 0
    {
        Phase::Degraded
    } else {
        Phase::Progressing
    };
    let conditions = vec![ready, progressing, degraded, drift(plan), stalled(plan)];
    (conditions, phase)
}

/// Every node is where the spec wants it, on the desired configuration.
fn settled(plan: &Plan, replicas: i32) -> bool {
    plan.online == plan.expected
        && plan.ready >= plan.expected
        && plan.drifted.is_empty()
        && plan.nodes.len() == usize::try_from(replicas).unwrap_or_default()
        && plan.nodes.iter().all(|n| {
            matches!(
                n.state,
                NodeState::Online | NodeState::Offline | NodeState::Removed
            )
        })
}

fn progressing(ic: &IntegrationCluster, plan: &Plan, settled: bool, counts: &str) -> Desired {
    let (status, reason, message) = if settled {
        (false, "Settled", counts.to_owned())
    } else if ic.spec.paused {
        let why = "spec.paused is true: workload changes are held";
        (false, "Paused", why.to_owned())
    } else if plan.stalled.is_some() {
        let why = "the rollout waits for help, see Stalled";
        (false, "Stalled", why.to_owned())
    } else if let Some(why) = &plan.waiting {
        (true, "WaitingForDependencies", format!("{why}; {counts}"))
    } else if !plan.drifted.is_empty() {
        let why = format!("replacing drifted nodes one at a time; {counts}");
        (true, "RollingReplacement", why)
    } else {
        (true, "Reconciling", counts.to_owned())
    };
    Desired::new(condition::PROGRESSING, status, reason, message)
}

fn drift(plan: &Plan) -> Desired {
    if plan.drifted.is_empty() {
        let message = "every node runs the desired configuration";
        return Desired::new(condition::CONFIG_DRIFT, false, "InSync", message);
    }
    let message = plan
        .drifted
        .iter()
        .map(|(node, why)| format!("{node}: {why}"))
        .collect::<Vec<_>>()
        .join("; ");
    Desired::new(condition::CONFIG_DRIFT, true, "Drifted", message)
}

fn stalled(plan: &Plan) -> Desired {
    match &plan.stalled {
        Some(why) => Desired::new(condition::STALLED, true, "NodeNotReady", why.clone()),
        None => Desired::new(condition::STALLED, false, "NotStalled", ""),
    }
}

/// Whether `desired` reports `type_` True where `current` did not.
pub fn newly_true(
    current: &IntegrationClusterStatus,
    desired: &IntegrationClusterStatus,
    type_: &str,
) -> bool {
    let before = conditions::find(&current.conditions, type_);
    let after = conditions::find(&desired.conditions, type_);
    after.is_some_and(|a| {
        a.status == "True" && before.is_none_or(|b| b.status != "True" || b.message != a.message)
    })
}

/// Whether `desired` carries a rejection `current` did not already report.
pub fn newly_invalid(
    current: &IntegrationClusterStatus,
    desired: &IntegrationClusterStatus,
) -> bool {
    let before = conditions::find(&current.conditions, condition::VALIDATED);
    let after = conditions::find(&desired.conditions, condition::VALIDATED);
    match (before, after) {
        (_, None) => false,
        (None, Some(a)) => a.status == "False",
        (Some(b), Some(a)) => {
            a.status == "False" && (b.status != "False" || b.message != a.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation;

    fn cluster(yaml: &str) -> IntegrationCluster {
        let mut ic =
            IntegrationCluster::new("orders", serde_saphyr::from_str(yaml).expect("spec parses"));
        ic.metadata.namespace = Some("prod".into());
        ic.metadata.generation = Some(4);
        ic
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("valid timestamp")
    }

    const VALID_SPEC: &str =
        "profile: generic\nimage: srv\ncache: {mode: external, external: {urls: ['c:1']}}\n";

    #[test]
    fn a_valid_cluster_is_pending_with_validated_true() {
        let ic = cluster(VALID_SPEC);
        let status = desired(&ic, &validation::validate(&ic, &[]), None, at(1));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(status.phase, Some(Phase::Pending));
        assert_eq!(status.cluster_name.as_deref(), Some("orders_prod"));
        let c = conditions::find(&status.conditions, condition::VALIDATED).expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", VALID));
    }

    #[test]
    fn recomputing_a_settled_status_changes_nothing() {
        let mut ic = cluster(VALID_SPEC);
        let first = desired(&ic, &validation::validate(&ic, &[]), None, at(1));
        ic.status = Some(first.clone());
        assert_eq!(
            desired(&ic, &validation::validate(&ic, &[]), None, at(99)),
            first
        );
    }

    #[test]
    fn an_invalid_cluster_names_the_field_and_is_reported_once() {
        let ic = cluster(&format!("{VALID_SPEC}nodes: {{offline: [orders-9]}}\n"));
        let status = desired(&ic, &validation::validate(&ic, &[]), None, at(1));
        assert_eq!(status.phase, Some(Phase::Invalid));
        let c = conditions::find(&status.conditions, condition::VALIDATED).expect("condition");
        assert_eq!(c.reason, "UnknownNode");
        assert!(c.message.contains("spec.nodes.offline"), "{}", c.message);
        assert!(newly_invalid(&IntegrationClusterStatus::default(), &status));
        assert!(!newly_invalid(&status, &status));
    }
}
