//! Time limits on every call to the Kubernetes API.
//!
//! kube leaves the read timeout unset (a watch is silent for as long as
//! nothing changes), so a server that accepts a request and never answers
//! would hold the call, and the reconcile or the startup waiting on it,
//! forever. Requests and watches therefore get clients of their own:
//! requests a short read timeout, watches one just past the server-side
//! watch timeout, which a healthy watch never reaches.

use std::time::Duration;

use kube::{Client, Config};

/// Connecting, TLS included: the API server is near.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Sending a request.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence while waiting for or reading an answer to a request. The
/// operator's requests read or write the objects of one cluster, which a
/// healthy API server answers in well under a second.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence on a watch connection. The API server ends every watch after
/// its timeoutSeconds (kube asks for 290 s) and sends bookmarks before, so
/// a healthy watch is never cut; this bounds the watcher's initial list
/// and a watch whose server went silent (kube's old default, for the same
/// reason).
pub const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(295);

fn bounded(mut config: Config, read: Duration) -> Config {
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.write_timeout = Some(WRITE_TIMEOUT);
    config.read_timeout = Some(read);
    // Count the read timeout from the request, not from when the pooled
    // connection went idle.
    config.reset_reader_on_write = true;
    config
}

/// `config` for requests (get, list, create, patch, delete).
pub fn for_requests(config: Config) -> Config {
    bounded(config, REQUEST_READ_TIMEOUT)
}

/// `config` for watches.
pub fn for_watches(config: Config) -> Config {
    bounded(config, WATCH_READ_TIMEOUT)
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no Kubernetes configuration found: {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Build(#[from] kube::Error),
}

/// A client for requests from the inferred configuration (KUBECONFIG, or
/// the pod's ServiceAccount).
pub async fn for_requests_inferred() -> Result<Client, ClientError> {
    let config = Config::infer().await?;
    Ok(Client::try_from(for_requests(config))?)
}

/// A client for watches from the inferred configuration.
pub async fn for_watches_inferred() -> Result<Client, ClientError> {
    let config = Config::infer().await?;
    Ok(Client::try_from(for_watches(config))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_watch_outlasts_its_server_side_timeout_before_the_read_timeout() {
        let server_side = Duration::from_secs(u64::from(
            kube::api::WatchParams::default().timeout.unwrap_or(290),
        ));
        assert!(WATCH_READ_TIMEOUT > server_side);
        let config = for_watches(Config::new("https://127.0.0.1:6443".parse().expect("uri")));
        assert_eq!(config.read_timeout, Some(WATCH_READ_TIMEOUT));
        assert!(config.reset_reader_on_write);
    }
}
