//! The operator's Prometheus metrics and health endpoints, served on
//! `--metrics-address`: `/metrics` (reconciles by result, their duration,
//! failures by category, whether this replica leads), `/healthz` (the
//! process answers) and `/readyz` (the controller or the standby loop
//! runs).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::warn;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabel {
    category: String,
}

/// What the operator counts.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabel, Counter>,
    failures: Family<CategoryLabel, Counter>,
    duration: Histogram,
    leader: Gauge,
    /// The controller (or the standby loop) is running.
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("integration_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of IntegrationClusters, by result",
            reconciles.clone(),
        );
        let failures = Family::<CategoryLabel, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed reconciles, by error category",
            failures.clone(),
        );
        // 5 ms to about 20 s.
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease (or runs without leader election)",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records one reconcile; `failure` is the error's category.
    pub fn reconciled(&self, seconds: f64, failure: Option<&str>) {
        let result = if failure.is_some() { "error" } else { "ok" };
        self.reconciles
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
        if let Some(category) = failure {
            self.failures
                .get_or_create(&CategoryLabel {
                    category: category.to_owned(),
                })
                .inc();
        }
        self.duration.observe(seconds);
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!(error = %e, "encoding metrics failed");
        }
        text
    }
}

fn answer(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => (StatusCode::OK, metrics.encode()),
        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "/metrics, /healthz, /readyz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Serves the endpoints on `listener` (bound by the caller, so a taken
/// port fails at start) until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let response = answer(&metrics, request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(error = %e, "metrics connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_result_and_failure_category() {
        let m = Metrics::default();
        m.reconciled(0.01, None);
        m.reconciled(0.02, Some("write"));
        m.set_leader(true);
        let text = m.encode();
        assert!(
            text.contains("integration_operator_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("integration_operator_reconciles_total{result=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("integration_operator_reconcile_failures_total{category=\"write\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("integration_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("integration_operator_leader 1"), "{text}");
    }

    #[test]
    fn readiness_follows_the_flag() {
        let m = Metrics::default();
        assert_eq!(
            answer(&m, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        m.ready.store(true, Ordering::Relaxed);
        assert_eq!(answer(&m, "/readyz").status(), StatusCode::OK);
        assert_eq!(answer(&m, "/healthz").status(), StatusCode::OK);
    }
}
