//! Exactly-once processing for multi-node listeners: before processing a
//! message, the server asks its agent (on the pod's loopback) to claim the
//! message id; the first claim across all nodes wins, in the cluster
//! database's ledger (`INSERT … ON CONFLICT DO NOTHING` on the primary key
//! (listener, message id)), so a redelivered message is processed once.
//!
//! `POST /claim?listener=<name>&id=<message id>` answers 200 `claimed`
//! (process it), 409 `duplicate` (another node has it, or had it), or 503
//! when the database cannot say (process nothing; the messaging system
//! redelivers).

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tracing::warn;

/// Claims `message_id` of `listener` for `node`; true when this call was
/// the first.
pub async fn claim(
    pool: &PgPool,
    listener: &str,
    message_id: &str,
    node: &str,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO integration_operator.listener_claims (listener, message_id, node)
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(listener.to_owned())
    .bind(message_id.to_owned())
    .bind(node.to_owned())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

fn answer(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response
}

fn query_param(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    pool: PgPool,
    node: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST || request.uri().path() != "/claim" {
        return Ok(answer(StatusCode::NOT_FOUND, "POST /claim?listener=…&id=…"));
    }
    let query = request.uri().query().unwrap_or_default();
    let (Some(listener), Some(id)) = (query_param(query, "listener"), query_param(query, "id"))
    else {
        return Ok(answer(
            StatusCode::BAD_REQUEST,
            "listener and id are required",
        ));
    };
    Ok(match claim(&pool, &listener, &id, &node).await {
        Ok(true) => answer(StatusCode::OK, "claimed"),
        Ok(false) => answer(StatusCode::CONFLICT, "duplicate"),
        Err(e) => {
            warn!(%listener, error = %e, "claim failed");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the cluster database did not answer",
            )
        }
    })
}

/// Serves claims on `address` (loopback in the pod) until the task is
/// dropped.
pub async fn serve(address: SocketAddr, pool: PgPool, node: String) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
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
}
