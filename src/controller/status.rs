//! The status a reconcile wants to see, as a pure function of the cluster
//! and the validation verdict.

use k8s_openapi::jiff::Timestamp;

use super::conditions::{self, Desired};
use crate::api::{IntegrationCluster, IntegrationClusterStatus, Phase, condition};
use crate::validation::{Problem, ValidatedCluster};

/// Reason of a passing validation.
const VALID: &str = "Valid";

/// The desired status: everything the current status holds, with the
/// verdict of this reconcile merged in.
pub fn desired(
    ic: &IntegrationCluster,
    validated: &Result<ValidatedCluster, Vec<Problem>>,
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
    let phase = match (validated, current.phase) {
        (Err(_), _) => Phase::Invalid,
        (Ok(_), None | Some(Phase::Invalid)) => Phase::Pending,
        (Ok(_), Some(phase)) => phase,
    };
    IntegrationClusterStatus {
        observed_generation: ic.metadata.generation,
        phase: Some(phase),
        conditions: conditions::merge(&current.conditions, &[verdict], ic.metadata.generation, now),
        cluster_name: match validated {
            Ok(v) => Some(v.cluster_name.clone()),
            Err(_) => current.cluster_name.clone(),
        },
        ..current
    }
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
        let status = desired(&ic, &validation::validate(&ic, &[]), at(1));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(status.phase, Some(Phase::Pending));
        assert_eq!(status.cluster_name.as_deref(), Some("orders_prod"));
        let c = conditions::find(&status.conditions, condition::VALIDATED).expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", VALID));
    }

    #[test]
    fn recomputing_a_settled_status_changes_nothing() {
        let mut ic = cluster(VALID_SPEC);
        let first = desired(&ic, &validation::validate(&ic, &[]), at(1));
        ic.status = Some(first.clone());
        assert_eq!(desired(&ic, &validation::validate(&ic, &[]), at(99)), first);
    }

    #[test]
    fn an_invalid_cluster_names_the_field_and_is_reported_once() {
        let ic = cluster(&format!("{VALID_SPEC}nodes: {{offline: [orders-9]}}\n"));
        let status = desired(&ic, &validation::validate(&ic, &[]), at(1));
        assert_eq!(status.phase, Some(Phase::Invalid));
        let c = conditions::find(&status.conditions, condition::VALIDATED).expect("condition");
        assert_eq!(c.reason, "UnknownNode");
        assert!(c.message.contains("spec.nodes.offline"), "{}", c.message);
        assert!(newly_invalid(&IntegrationClusterStatus::default(), &status));
        assert!(!newly_invalid(&status, &status));
    }
}
