//! Why a reconcile failed: the driver's step, and what failed in it with
//! the kind of object, so logs and the failures metric say both (a
//! `category` such as `apply/Pod` or `provision/database`).

use std::time::Duration;

/// The steps of the driver (see `reconcile_cluster`), and the two stages
/// around a deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reading what the cluster refers to; writes nothing.
    Dereference,
    /// The shared database (roles, databases, credentials Secret).
    Provision,
    /// Shared objects, ownership and the node actions.
    Apply,
    Status,
    Finalizer,
    Cleanup,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Dereference => "dereference",
            Step::Provision => "provision",
            Step::Apply => "apply",
            Step::Status => "status",
            Step::Finalizer => "finalizer",
            Step::Cleanup => "cleanup",
        }
    }
}

/// What failed, in any step.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("reading {what}: {}", api_text(.source))]
    Read {
        kind: String,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what}: {}", api_text(.source))]
    Write {
        kind: String,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("serialising an object: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("{0}")]
    Database(#[source] crate::database::DbError),
    #[error("generating a password: {0}")]
    Random(String),
    #[error("{0}")]
    Conflict(String),
    /// A watch the reconciles read from ended; only at shutdown.
    #[error("the operator's watches stopped")]
    WatchStopped,
}

impl Failure {
    /// The object kind, or what else failed.
    fn kind(&self) -> &str {
        match self {
            Failure::Read { kind, .. } | Failure::Write { kind, .. } => kind,
            Failure::Serialize(_) => "serialize",
            Failure::Database(_) => "database",
            Failure::Random(_) => "random",
            Failure::Conflict(_) => "conflict",
            Failure::WatchStopped => "watch",
        }
    }
}

/// Errors of one reconcile; all are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{failure}")]
    In {
        step: Step,
        #[source]
        failure: Failure,
    },
    #[error("{0} has no namespace")]
    NotNamespaced(String),
    #[error(
        "the reconcile did not finish within {}s; the next attempt continues from what exists",
        .0.as_secs()
    )]
    Deadline(Duration),
}

impl Error {
    /// Step and kind, for logs and metrics: `apply/Pod`.
    pub fn category(&self) -> String {
        match self {
            Error::In { step, failure } => format!("{}/{}", step.name(), failure.kind()),
            Error::NotNamespaced(_) => "not_namespaced".into(),
            Error::Deadline(_) => "deadline".into(),
        }
    }

    /// Another writer changed the object between our read and our write
    /// (a 409 on a write carrying the resourceVersion): the next attempt
    /// reads it again and goes through, so it is neither backed off nor
    /// reported.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Error::In {
                failure: Failure::Write {
                    source: kube::Error::Api(status),
                    ..
                },
                ..
            } if status.code == 409
        )
    }

    /// A write refused because the cluster's namespace is being deleted
    /// (the namespace controller deletes the pods, the operator would
    /// create them again). The cluster itself is deleted next; until then
    /// the attempt is neither retried soon nor reported as Degraded.
    pub fn is_namespace_terminating(&self) -> bool {
        matches!(
            self,
            Error::In {
                failure: Failure::Write {
                    source: kube::Error::Api(status),
                    ..
                },
                ..
            } if status.code == 403 && status.message.contains("because it is being terminated")
        )
    }

    pub fn step(&self) -> Option<Step> {
        match self {
            Error::In { step, .. } => Some(*step),
            _ => None,
        }
    }
}

/// Tags a failure with the step it happened in: `.map_err(at(Step::Apply))`.
pub fn at(step: Step) -> impl Fn(Failure) -> Error {
    move |failure| Error::In { step, failure }
}

/// An API error as a person reads it: the server's message and reason.
/// kube's own Display appends the Rust Debug dump of the whole Status.
pub fn api_text(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => {
            if status.reason.is_empty() {
                status.message.clone()
            } else {
                format!("{} ({})", status.message, status.reason)
            }
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_category_names_the_step_and_the_kind() {
        let failure = Failure::Conflict("taken".into());
        assert_eq!(
            at(Step::Provision)(failure).category(),
            "provision/conflict"
        );
        let forbidden = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            message: "pods \"q-0\" is forbidden".into(),
            reason: "Forbidden".into(),
            ..kube::core::Status::default()
        }));
        let write = Failure::Write {
            kind: "Pod".into(),
            what: "create pod q-0".into(),
            source: forbidden,
        };
        let error = at(Step::Apply)(write);
        assert_eq!(error.category(), "apply/Pod");
        assert_eq!(
            error.to_string(),
            "create pod q-0: pods \"q-0\" is forbidden (Forbidden)"
        );
        assert!(!error.is_namespace_terminating());
    }

    #[test]
    fn a_write_into_a_namespace_being_deleted_is_told_apart() {
        let refused = kube::Error::Api(Box::new(kube::core::Status {
            code: 403,
            message: "pods \"q-0\" is forbidden: unable to create new content in namespace \
                      n because it is being terminated"
                .into(),
            reason: "Forbidden".into(),
            ..kube::core::Status::default()
        }));
        let write = Failure::Write {
            kind: "Pod".into(),
            what: "create pod q-0".into(),
            source: refused,
        };
        assert!(at(Step::Apply)(write).is_namespace_terminating());
    }

    #[test]
    fn only_a_write_conflict_is_a_conflict() {
        let api = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..kube::core::Status::default()
            }))
        };
        let write = |code| Failure::Write {
            kind: "IntegrationCluster".into(),
            what: "remove the finalizer".into(),
            source: api(code),
        };
        assert!(at(Step::Finalizer)(write(409)).is_conflict());
        assert!(!at(Step::Finalizer)(write(403)).is_conflict());
        let read = Failure::Read {
            kind: "Secret".into(),
            what: "Secret s".into(),
            source: api(409),
        };
        assert!(!at(Step::Dereference)(read).is_conflict());
    }
}
