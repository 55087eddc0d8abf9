//! The local server's admin hooks, called over plain HTTP on the pod's
//! loopback: quiesce, resume, in-flight work and health. hyper's low-level
//! HTTP/1 client is enough for one request at a time to 127.0.0.1.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where the hooks are.
#[derive(Clone, Debug)]
pub struct Hooks {
    /// host:port of the server's admin (diagnostic) port, e.g. 127.0.0.1:9999.
    pub address: String,
    /// Without quiesce and resume hooks the server cannot be quiesced:
    /// going offline only stops client traffic.
    pub quiesce: Option<String>,
    pub resume: Option<String>,
    pub in_flight: Option<String>,
    pub health: Option<String>,
    /// `Authorization` header value for the admin hooks, if the server
    /// needs one.
    pub authorization: Option<String>,
}

/// A Basic authorization header value.
pub fn basic_auth(username: &str, password: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    format!("Basic {token}")
}

/// A hook call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("connecting to {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}: {source}")]
    Http {
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{method} {path}: answered {status}")]
    Status {
        method: Method,
        path: String,
        status: u16,
    },
    #[error("{path}: {message}")]
    Body { path: String, message: String },
    #[error("{method} {path}: no answer within {timeout:?}")]
    Timeout {
        method: Method,
        path: String,
        timeout: Duration,
    },
}

const TIMEOUT: Duration = Duration::from_secs(5);

impl Hooks {
    async fn call(&self, method: Method, path: &str) -> Result<String, HookError> {
        let call = self.call_once(method.clone(), path);
        tokio::time::timeout(TIMEOUT, call)
            .await
            .map_err(|_| HookError::Timeout {
                method,
                path: path.to_owned(),
                timeout: TIMEOUT,
            })?
    }

    async fn call_once(&self, method: Method, path: &str) -> Result<String, HookError> {
        let http = |source| HookError::Http {
            method: method.clone(),
            path: path.to_owned(),
            source,
        };
        let stream =
            TcpStream::connect(&self.address)
                .await
                .map_err(|source| HookError::Connect {
                    address: self.address.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let connection = tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", &self.address);
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| HookError::Body {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        connection.abort();
        if !status.is_success() {
            return Err(HookError::Status {
                method,
                path: path.to_owned(),
                status: status.as_u16(),
            });
        }
        Ok(String::from_utf8_lossy(&body).trim().to_owned())
    }

    /// POSTs to `path` (path and query) on the server's admin port.
    pub async fn post(&self, path: &str) -> Result<(), HookError> {
        self.call(Method::POST, path).await.map(|_| ())
    }

    pub async fn quiesce(&self) -> Result<(), HookError> {
        match &self.quiesce {
            Some(path) => self.call(Method::POST, path).await.map(|_| ()),
            None => Ok(()),
        }
    }

    pub async fn resume(&self) -> Result<(), HookError> {
        match &self.resume {
            Some(path) => self.call(Method::POST, path).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Requests in flight; servers without such a hook report none.
    pub async fn in_flight(&self) -> Result<u64, HookError> {
        let Some(path) = &self.in_flight else {
            return Ok(0);
        };
        let body = self.call(Method::GET, path).await?;
        body.parse().map_err(|_| HookError::Body {
            path: path.clone(),
            message: format!("expected a number of requests, got {body:?}"),
        })
    }

    /// Whether the health endpoint answers with success.
    pub async fn healthy(&self) -> bool {
        match &self.health {
            Some(path) => self.call(Method::GET, path).await.is_ok(),
            None => TcpStream::connect(&self.address).await.is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_is_base64_of_user_colon_password() {
        assert_eq!(
            basic_auth("Administrator", "manage"),
            "Basic QWRtaW5pc3RyYXRvcjptYW5hZ2U="
        );
    }
}
