//! Exactly-once processing for multi-node listeners. Before processing a
//! message, the server asks its agent (on the pod's loopback) to claim the
//! message id; claims live in the cluster database's ledger
//! (`integration_operator.listener_claims`, one row per listener and
//! message id), so every node sees the same answer.
//!
//! A claim is a lease: granted to one node until `claimed_until`, then the
//! server processes the message and reports it complete. A node that dies
//! in between loses nothing: once its claim's lease has run out, the
//! redelivered message is granted again (to any node, as the next
//! attempt). A completed message is refused to everyone, and completed
//! rows are pruned after [`RETENTION`], which must exceed how long the
//! messaging system may redeliver a message.
//!
//! - `POST /claim?listener=<name>&id=<message id>[&leaseSeconds=<n>]`
//!   (default [`DEFAULT_LEASE`], at most [`MAX_LEASE`]):
//!   - 200 `{"result":"claimed","attempt":n,"claimedUntil":<unix ms>}`:
//!     process it, then complete attempt n before the lease runs out;
//!   - 409 `{"result":"completed"}`: processed already; acknowledge it,
//!     do not process it;
//!   - 423 `{"result":"claimed","claimedUntil":<unix ms>}` with
//!     `Retry-After`: another claim is in progress; neither process nor
//!     acknowledge it, so that it is redelivered;
//!   - 503: the database did not answer; process nothing.
//! - `POST /complete?listener=<name>&id=<message id>&attempt=<n>`:
//!   - 200 `{"result":"completed"}`;
//!   - 409 `{"result":"not-claimed"}`: the claim is no longer this node's
//!     attempt n (its lease ran out and another node took it over, or it
//!     was completed already): undo the processing if the server can.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// How long a claim lasts when the server does not say.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The longest claim a server may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// How long completed claims are kept (and redeliveries refused).
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often an agent prunes completed claims (and once when it starts).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Rows deleted per pruning statement, so no transaction grows large.
const PRUNE_BATCH: i64 = 10_000;

/// The answer to a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This node may process the message, as attempt `attempt`, until
    /// `until` (Unix milliseconds).
    Granted { attempt: i32, until: i64 },
    /// Processed already.
    Completed,
    /// Another claim lasts until `until` (None: one made this instant).
    InProgress { until: Option<i64> },
}

/// Claims `message_id` of `listener` for `node` for `lease`.
pub async fn claim(
    pool: &PgPool,
    listener: &str,
    message_id: &str,
    node: &str,
    lease: Duration,
) -> Result<Claim, sqlx::Error> {
    // A duplicate (completed, or validly claimed) is answered from the row
    // as read, without writing or locking anything: most claims of a
    // message that several nodes receive are such. Otherwise the row is
    // inserted, or taken over if it is neither completed nor validly
    // claimed: PostgreSQL locks a conflicting row and checks the WHERE on
    // its latest version, so of two nodes claiming an expired claim at
    // once only one succeeds.
    let row: Option<(bool, bool, i32, i64)> = sqlx::query_as(
        "WITH current AS (
             SELECT completed_at IS NOT NULL AS completed, claimed_until > now() AS held,
                    attempt, (extract(epoch FROM claimed_until) * 1000)::bigint AS until
               FROM integration_operator.listener_claims
              WHERE listener = $1 AND message_id = $2),
         granted AS (
             INSERT INTO integration_operator.listener_claims AS c
                    (listener, message_id, claimed_by, claimed_until)
             SELECT $1, $2, $3, now() + make_interval(secs => $4)
              WHERE NOT EXISTS (SELECT 1 FROM current WHERE completed OR held)
             ON CONFLICT (listener, message_id) DO UPDATE
                SET claimed_by = EXCLUDED.claimed_by, claimed_at = now(),
                    claimed_until = EXCLUDED.claimed_until, attempt = c.attempt + 1
              WHERE c.completed_at IS NULL AND c.claimed_until <= now()
             RETURNING c.attempt, (extract(epoch FROM c.claimed_until) * 1000)::bigint AS until)
         SELECT true, false, attempt, until FROM granted
         UNION ALL
         SELECT false, completed, attempt, until FROM current
          WHERE NOT EXISTS (SELECT 1 FROM granted)",
    )
    .bind(listener.to_owned())
    .bind(message_id.to_owned())
    .bind(node.to_owned())
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((true, _, attempt, until)) => Claim::Granted { attempt, until },
        Some((false, true, _, _)) => Claim::Completed,
        Some((false, false, _, until)) => Claim::InProgress { until: Some(until) },
        // Claimed by a transaction that committed after this statement
        // began.
        None => Claim::InProgress { until: None },
    })
}

/// Marks `node`'s claim `attempt` of `message_id` completed; false when
/// the claim is not that attempt's any more, or was completed already.
pub async fn complete(
    pool: &PgPool,
    listener: &str,
    message_id: &str,
    node: &str,
    attempt: i32,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE integration_operator.listener_claims SET completed_at = now()
          WHERE listener = $1 AND message_id = $2 AND claimed_by = $3 AND attempt = $4
            AND completed_at IS NULL",
    )
    .bind(listener.to_owned())
    .bind(message_id.to_owned())
    .bind(node.to_owned())
    .bind(attempt)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(done == 1)
}

/// Deletes claims completed more than `retention` ago; returns how many.
/// Claims that were never completed stay: their message may still come.
pub async fn prune(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    let mut pruned = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM integration_operator.listener_claims
              WHERE ctid IN (SELECT ctid FROM integration_operator.listener_claims
                              WHERE completed_at < now() - make_interval(secs => $1)
                              LIMIT $2)",
        )
        .bind(retention.as_secs_f64())
        .bind(PRUNE_BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        pruned += deleted;
        if deleted < u64::try_from(PRUNE_BATCH).unwrap_or(u64::MAX) {
            return Ok(pruned);
        }
    }
}

fn answer(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    answer(status, &json!({"result": "error", "message": message}))
}

fn query_param(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The claim lease a request asks for; None when it is not a number of
/// seconds within bounds.
fn requested_lease(query: &str) -> Option<Duration> {
    let Some(seconds) = query_param(query, "leaseSeconds") else {
        return Some(DEFAULT_LEASE);
    };
    let lease = Duration::from_secs(seconds.parse().ok()?);
    (!lease.is_zero() && lease <= MAX_LEASE).then_some(lease)
}

/// The claim's answer as the server gets it.
fn claim_answer(claim: Claim) -> Response<Full<Bytes>> {
    match claim {
        Claim::Granted { attempt, until } => answer(
            StatusCode::OK,
            &json!({"result": "claimed", "attempt": attempt, "claimedUntil": until}),
        ),
        Claim::Completed => answer(StatusCode::CONFLICT, &json!({"result": "completed"})),
        Claim::InProgress { until } => {
            let now = crate::listeners::election::unix_millis(std::time::SystemTime::now());
            let wait_ms = until.map_or(1000, |u| {
                u128::try_from(u).unwrap_or_default().saturating_sub(now)
            });
            let mut response = answer(
                StatusCode::LOCKED,
                &json!({"result": "claimed", "claimedUntil": until}),
            );
            response.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(
                    u64::try_from(wait_ms.div_ceil(1000).max(1)).unwrap_or(u64::MAX),
                ),
            );
            response
        }
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    pool: PgPool,
    node: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    if request.method() != Method::POST || !["/claim", "/complete"].contains(&path) {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "POST /claim?listener=…&id=… or /complete?listener=…&id=…&attempt=…",
        ));
    }
    let query = request.uri().query().unwrap_or_default();
    let (Some(listener), Some(id)) = (query_param(query, "listener"), query_param(query, "id"))
    else {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "listener and id are required",
        ));
    };
    let unavailable = |e: sqlx::Error| {
        warn!(%listener, error = %e, "the claim ledger did not answer");
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cluster database did not answer",
        )
    };
    if path == "/claim" {
        let Some(lease) = requested_lease(query) else {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "leaseSeconds must be a whole number of seconds from 1 to 3600",
            ));
        };
        return Ok(match claim(&pool, &listener, &id, &node, lease).await {
            Ok(claim) => claim_answer(claim),
            Err(e) => unavailable(e),
        });
    }
    let Some(attempt) = query_param(query, "attempt").and_then(|a| a.parse().ok()) else {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "attempt (from the claim's answer) is required",
        ));
    };
    Ok(
        match complete(&pool, &listener, &id, &node, attempt).await {
            Ok(true) => answer(StatusCode::OK, &json!({"result": "completed"})),
            Ok(false) => answer(StatusCode::CONFLICT, &json!({"result": "not-claimed"})),
            Err(e) => unavailable(e),
        },
    )
}

/// Prunes completed claims now and every [`PRUNE_EVERY`].
async fn prune_forever(pool: PgPool) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    loop {
        every.tick().await;
        match prune(&pool, RETENTION).await {
            Ok(0) => {}
            Ok(pruned) => info!(pruned, "pruned completed listener claims"),
            Err(e) => warn!(error = %e, "pruning listener claims failed"),
        }
    }
}

/// Serves claims on `address` (loopback in the pod) and prunes the
/// ledger, until the task is dropped.
pub async fn serve(address: SocketAddr, pool: PgPool, node: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    let accept = async {
        loop {
            let (stream, _) = listener.accept().await?;
            let pool = pool.clone();
            let node = node.clone();
            tokio::spawn(async move {
                let service = service_fn(move |r| handle(r, pool.clone(), node.clone()));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    warn!(error = %e, "claim connection failed");
                }
            });
        }
    };
    tokio::select! {
        result = accept => result,
        () = prune_forever(pool.clone()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_lease_is_whole_seconds_within_bounds() {
        assert_eq!(requested_lease("listener=a&id=1"), Some(DEFAULT_LEASE));
        assert_eq!(
            requested_lease("leaseSeconds=2"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(requested_lease("leaseSeconds=3600"), Some(MAX_LEASE));
        for bad in ["0", "3601", "-1", "1.5", "x"] {
            assert_eq!(
                requested_lease(&format!("leaseSeconds={bad}")),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn only_a_completed_message_is_a_conflict_one_in_progress_is_locked() {
        let granted = claim_answer(Claim::Granted {
            attempt: 2,
            until: 5,
        });
        assert_eq!(granted.status(), StatusCode::OK);
        assert_eq!(
            claim_answer(Claim::Completed).status(),
            StatusCode::CONFLICT
        );
        let busy = claim_answer(Claim::InProgress { until: None });
        assert_eq!(busy.status(), StatusCode::LOCKED);
        assert_eq!(
            busy.headers().get(hyper::header::RETRY_AFTER),
            Some(&hyper::header::HeaderValue::from(1u64))
        );
    }
}
