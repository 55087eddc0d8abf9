//! Conditions are computed, not stamped: a condition keeps its
//! `lastTransitionTime` unless its status really changes, so a reconcile
//! that finds nothing new produces an identical status and no write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition as the reconcile decides it, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merges `desired` into `current`: conditions of other types are kept,
/// `lastTransitionTime` moves only when the status flips, and
/// `observedGeneration` records the generation the decision was made for.
pub fn merge(
    current: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut merged: Vec<Condition> = current
        .iter()
        .filter(|c| !desired.iter().any(|d| d.type_ == c.type_))
        .cloned()
        .collect();
    for d in desired {
        let status = if d.status { "True" } else { "False" };
        let previous = current.iter().find(|c| c.type_ == d.type_);
        let last_transition_time = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => Time(now),
        };
        merged.push(Condition {
            type_: d.type_.to_owned(),
            status: status.to_owned(),
            reason: d.reason.clone(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    merged.sort_by(|a, b| a.type_.cmp(&b.type_));
    merged
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merges one decision into `current` at `second` for `generation`.
    fn decide(
        current: &[Condition],
        desired: Desired,
        generation: i64,
        second: i64,
    ) -> Vec<Condition> {
        let now = Timestamp::from_second(second).expect("valid timestamp");
        merge(current, &[desired], Some(generation), now)
    }

    fn valid(message: &str) -> Desired {
        Desired::new("Validated", true, "Valid", message)
    }

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).expect("valid timestamp"))
    }

    #[test]
    fn a_new_condition_gets_the_current_time() {
        let merged = decide(&[], valid("ok"), 1, 10);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].status, "True");
        assert_eq!(merged[0].last_transition_time, at(10));
        assert_eq!(merged[0].observed_generation, Some(1));
    }

    #[test]
    fn an_unchanged_status_keeps_its_transition_time() {
        let first = decide(&[], valid("ok"), 1, 10);
        let second = decide(&first, valid("still ok"), 2, 20);
        assert_eq!(second[0].last_transition_time, at(10));
        assert_eq!(second[0].message, "still ok");
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn a_flip_moves_the_transition_time() {
        let first = decide(&[], valid("ok"), 1, 10);
        let invalid = Desired::new("Validated", false, "UnknownNode", "x");
        let second = decide(&first, invalid, 2, 20);
        assert_eq!(second[0].last_transition_time, at(20));
        assert_eq!(second[0].reason, "UnknownNode");
    }

    #[test]
    fn other_conditions_are_kept_and_order_is_stable() {
        let first = decide(&[], Desired::new("Ready", false, "Pending", ""), 1, 10);
        let second = decide(&first, valid("ok"), 1, 20);
        let types: Vec<_> = second.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Validated"]);
        assert_eq!(decide(&second, valid("ok"), 1, 30), second);
    }
}
