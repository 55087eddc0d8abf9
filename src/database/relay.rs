//! A loopback relay between sqlx and a database server the operator does
//! not trust (an external admin URL comes from a tenant's Secret).
//!
//! sqlx believes the length a server announces in a message header and
//! reserves that much before reading the body; over TLS it even zeroes the
//! whole reservation at once, so one 5-byte header announcing 4 GiB costs
//! 4 GiB of memory. sqlx has no option to bound this. So sqlx talks
//! plaintext to 127.0.0.1:<ephemeral port>, and this relay talks to the real
//! server, doing the TLS negotiation sqlx would have done (same `sslmode`
//! semantics, same certificates), and reads the server's messages itself: a
//! message, or all messages answering one request (up to ReadyForQuery),
//! larger than the limit, or a flood of parameter settings (sqlx keeps each
//! one), ends the connection with a PostgreSQL ErrorResponse that sqlx
//! reports like any server error. The relay holds at most one 16 KiB buffer
//! per connection. What goes from sqlx to the server is copied unread.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sqlx::postgres::PgSslMode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// The `routine` field of the relay's own ErrorResponses, so they are told
/// from the server's.
pub(super) const ROUTINE: &str = "integration_operator_relay";
/// SQLSTATE of a cut connection: program_limit_exceeded.
pub(super) const TOO_LARGE: &str = "54000";
/// SQLSTATE when the server cannot be reached or TLS fails:
/// sqlclient_unable_to_establish_sqlconnection.
const UNREACHABLE: &str = "08001";
/// SQLSTATE of a malformed message: protocol_violation.
const MALFORMED: &str = "08P01";
/// ParameterStatus messages one connection may send: a server sends about
/// fifteen at startup and one per changed setting.
const MAX_PARAMETER_STATUS: u32 = 1024;
/// Bytes read from the server at a time.
const CHUNK: usize = 16 * 1024;
/// How long the relay waits for sqlx to read its ErrorResponse and hang up.
const GOODBYE: Duration = Duration::from_secs(2);
/// SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// How the relay secures its side, following `sslmode` as sqlx does:
/// disable and allow never ask for TLS, prefer asks and accepts a refusal,
/// require and the verify modes insist.
#[derive(Clone)]
pub(super) enum Tls {
    Off,
    Prefer(Arc<ClientConfig>),
    Require(Arc<ClientConfig>),
}

/// Certificates named in the admin URL: a path or inline PEM, as sqlx
/// reads `sslrootcert`, `sslcert` and `sslkey`.
#[derive(Clone, Debug, Default)]
pub(super) struct Certificates {
    pub root: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

impl Tls {
    /// The TLS side for `mode`; the error names the setting, never its value.
    pub(super) fn new(mode: PgSslMode, certificates: &Certificates) -> Result<Self, String> {
        let verify = match mode {
            PgSslMode::Disable | PgSslMode::Allow => return Ok(Tls::Off),
            PgSslMode::Prefer | PgSslMode::Require => Verify::Nothing,
            PgSslMode::VerifyCa => Verify::Chain,
            PgSslMode::VerifyFull => Verify::ChainAndName,
        };
        let config = Arc::new(client_config(verify, certificates)?);
        Ok(if matches!(mode, PgSslMode::Prefer) {
            Tls::Prefer(config)
        } else {
            Tls::Require(config)
        })
    }
}

enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

fn client_config(verify: Verify, certificates: &Certificates) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match verify {
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider })),
        Verify::Chain | Verify::ChainAndName => {
            let mut roots =
                RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(root) = &certificates.root {
                let pem = pem_input(root, "sslrootcert")?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|_| "sslrootcert holds no valid PEM certificate")?;
                    roots.add(cert).map_err(|e| format!("sslrootcert: {e}"))?;
                }
            }
            let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS setup: {e}"))?;
            match verify {
                Verify::ChainAndName => builder.with_webpki_verifier(chain),
                _ => builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyName { chain })),
            }
        }
    };
    match (&certificates.client_cert, &certificates.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_slice_iter(&pem_input(cert, "sslcert")?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "sslcert holds no valid PEM certificate")?;
            let key = PrivateKeyDer::from_pem_slice(&pem_input(key, "sslkey")?)
                .map_err(|_| "sslkey holds no valid PEM private key")?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("sslcert and sslkey: {e}"))
        }
        _ => Err("sslcert and sslkey must be given together".to_owned()),
    }
}

/// Inline PEM or a file, as sqlx decides; errors never repeat the value (it
/// may be a private key).
fn pem_input(value: &str, setting: &str) -> Result<Vec<u8>, String> {
    let trimmed = value.trim();
    if trimmed.starts_with("-----BEGIN") && trimmed.ends_with("-----") {
        return Ok(trimmed.as_bytes().to_vec());
    }
    std::fs::read(value).map_err(|e| format!("cannot read the file {setting} names: {}", e.kind()))
}

/// prefer and require: encrypted, but any certificate will do (libpq and
/// sqlx alike). Signatures are still checked, so the session is bound to
/// the key the server showed.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// verify-ca: the chain must lead to a trusted root; the name may differ.
#[derive(Debug)]
struct AnyName {
    chain: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The server behind a relay and the limits on what it may send.
pub(super) struct Upstream {
    pub host: String,
    pub port: u16,
    pub tls: Tls,
    /// Reaching the server and negotiating TLS.
    pub connect_timeout: Duration,
    /// Largest message, and largest answer to one request, in bytes.
    pub max_response: u32,
}

impl Upstream {
    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A listener on 127.0.0.1 that relays each connection to the upstream.
/// Dropping it stops accepting; relayed connections end with either side.
pub(super) struct Relay {
    address: SocketAddr,
    accept: tokio::task::AbortHandle,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Relay {
    pub(super) fn start(upstream: Upstream) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let address = listener.local_addr()?;
        let accept = tokio::spawn(accept(listener, Arc::new(upstream))).abort_handle();
        Ok(Relay { address, accept })
    }

    pub(super) fn port(&self) -> u16 {
        self.address.port()
    }
}

async fn accept(listener: TcpListener, upstream: Arc<Upstream>) {
    loop {
        match listener.accept().await {
            // Each connection's task ends when either side closes, when the
            // server cannot be reached within the connect timeout, or when
            // the server breaks a limit; nothing waits for it.
            Ok((client, _)) => drop(tokio::spawn(serve(client, upstream.clone()))),
            Err(e) => {
                // Out of file descriptors, say: try again, not in a hot loop.
                warn!(error = %e, "database relay: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Anything the relay can read from and write to: a TCP or TLS stream.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

async fn serve(client: TcpStream, upstream: Arc<Upstream>) {
    // Headers and bodies go out as they come; without this, Nagle's
    // algorithm and delayed ACKs add 40 ms to many answers.
    let _ = client.set_nodelay(true);
    // A second longer than the caller's own connect deadline, so that the
    // caller reports the deadline and this task still ends.
    let limit = upstream.connect_timeout + Duration::from_secs(1);
    let server = match tokio::time::timeout(limit, open(&upstream)).await {
        Ok(Ok(server)) => server,
        Ok(Err(why)) => return refuse(client, UNREACHABLE, &why).await,
        Err(_) => return,
    };
    let (mut from_server, mut to_server) = tokio::io::split(server);
    let (mut from_client, mut to_client) = client.into_split();
    let upstream_copy = async {
        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
        let _ = to_server.shutdown().await;
    };
    let cut = tokio::select! {
        () = upstream_copy => None,
        verdict = frames(&mut from_server, &mut to_client, &upstream) => verdict.err(),
    };
    if let Some((code, why)) = cut {
        warn!(server = %upstream.address(), %why, "database relay: connection cut");
        let _ = to_client.write_all(&error_response(code, &why)).await;
        let _ = to_client.shutdown().await;
        let _ = tokio::time::timeout(GOODBYE, drain(&mut from_client)).await;
    }
}

/// Connects to the server and secures the connection as `sslmode` says.
async fn open(upstream: &Upstream) -> Result<Box<dyn Duplex>, String> {
    let address = upstream.address();
    let host = upstream.host.trim_start_matches('[').trim_end_matches(']');
    let mut tcp = TcpStream::connect((host, upstream.port))
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (config, required) = match &upstream.tls {
        Tls::Off => return Ok(Box::new(tcp)),
        Tls::Prefer(config) => (config, false),
        Tls::Require(config) => (config, true),
    };
    let lost =
        |e: std::io::Error| format!("{address} closed the connection during the TLS request: {e}");
    tcp.write_all(&SSL_REQUEST).await.map_err(lost)?;
    // One byte, nothing more: bytes a server sends before the handshake are
    // not trusted as part of the session.
    let answer = tcp.read_u8().await.map_err(lost)?;
    match answer {
        b'S' => {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|_| format!("{host} is not a valid TLS server name"))?;
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {address}: {e}"))?;
            Ok(Box::new(stream))
        }
        b'N' if !required => Ok(Box::new(tcp)),
        b'N' => Err(format!(
            "{address} does not offer TLS, which the URL's sslmode requires"
        )),
        other => Err(format!(
            "{address} answered the TLS request with {} instead of S or N",
            describe_type(other)
        )),
    }
}

/// Copies the server's messages to sqlx one by one, checking each header
/// before anything of it is passed on; returns the SQLSTATE and reason when
/// the server broke a limit, Ok when either side closed.
async fn frames(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    upstream: &Upstream,
) -> Result<(), (&'static str, String)> {
    let max = u64::from(upstream.max_response);
    let mut buffer = vec![0u8; CHUNK];
    // Bytes since the last ReadyForQuery: the answer to one request, which
    // sqlx may hold in memory as a whole (fetch_all).
    let mut answer: u64 = 0;
    let mut parameters: u32 = 0;
    loop {
        let mut header = [0u8; 5];
        if from.read_exact(&mut header).await.is_err() {
            return Ok(());
        }
        let kind = header[0];
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let Some(body) = length.checked_sub(4) else {
            return Err((
                MALFORMED,
                format!(
                    "the server sent a malformed message header (type {}, length {length})",
                    describe_type(kind)
                ),
            ));
        };
        answer += 1 + u64::from(length);
        if u64::from(body) > max {
            return Err((
                TOO_LARGE,
                format!(
                    "the server announced a message of {body} bytes (type {}), more than the {max} bytes the operator accepts; connection cut",
                    describe_type(kind)
                ),
            ));
        }
        if answer > max {
            return Err((
                TOO_LARGE,
                format!(
                    "the server sent more than the {max} bytes the operator accepts in answer to one request; connection cut"
                ),
            ));
        }
        if kind == b'S' {
            parameters += 1;
            if parameters > MAX_PARAMETER_STATUS {
                return Err((
                    TOO_LARGE,
                    format!(
                        "the server sent more than {MAX_PARAMETER_STATUS} parameter settings; connection cut"
                    ),
                ));
            }
        }
        // Small messages (nearly all) go out in one write with their header.
        let mut left = body as usize;
        let first = left.min(CHUNK - header.len());
        buffer[..header.len()].copy_from_slice(&header);
        let end = header.len() + first;
        if from
            .read_exact(&mut buffer[header.len()..end])
            .await
            .is_err()
            || to.write_all(&buffer[..end]).await.is_err()
        {
            return Ok(());
        }
        left -= first;
        while left > 0 {
            let n = left.min(CHUNK);
            if from.read_exact(&mut buffer[..n]).await.is_err()
                || to.write_all(&buffer[..n]).await.is_err()
            {
                return Ok(());
            }
            left -= n;
        }
        if kind == b'Z' {
            answer = 0;
        }
    }
}

fn describe_type(kind: u8) -> String {
    if kind.is_ascii_graphic() {
        format!("'{}'", char::from(kind))
    } else {
        format!("0x{kind:02x}")
    }
}

/// Tells sqlx why there is no server, then waits for it to hang up.
async fn refuse(mut client: TcpStream, code: &str, why: &str) {
    let _ = client.write_all(&error_response(code, why)).await;
    let _ = client.shutdown().await;
    // Closing with sqlx's startup message unread would reset the
    // connection, and sqlx might never see the ErrorResponse.
    let _ = tokio::time::timeout(GOODBYE, drain(&mut client)).await;
}

async fn drain(from: &mut (impl AsyncRead + Unpin)) {
    let mut sink = [0u8; 1024];
    while matches!(from.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// A FATAL ErrorResponse: severity, SQLSTATE, message and the relay's
/// routine marker.
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
        (b'R', ROUTINE),
    ] {
        body.push(field);
        body.extend(value.bytes().filter(|b| *b != 0));
        body.push(0);
    }
    body.push(0);
    let length = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    let mut message = vec![b'E'];
    message.extend_from_slice(&length.to_be_bytes());
    message.extend(body);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(max: u32) -> Upstream {
        Upstream {
            host: "db".into(),
            port: 5432,
            tls: Tls::Off,
            connect_timeout: Duration::from_secs(1),
            max_response: max,
        }
    }

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(u32::try_from(body.len()).expect("small") + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    async fn relayed(input: Vec<u8>, max: u32) -> (Vec<u8>, Result<(), (&'static str, String)>) {
        let mut out = Vec::new();
        let verdict = frames(&mut input.as_slice(), &mut out, &upstream(max)).await;
        (out, verdict)
    }

    #[tokio::test]
    async fn messages_within_the_limit_pass_unchanged() {
        let mut input = message(b'R', &[0, 0, 0, 0]);
        input.extend(message(b'D', &vec![7u8; 40_000]));
        input.extend(message(b'Z', b"I"));
        input.extend(message(b'D', &vec![7u8; 40_000]));
        let (out, verdict) = relayed(input.clone(), 50_000).await;
        assert_eq!(verdict, Ok(()));
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn an_oversized_header_is_never_passed_on() {
        let mut input = message(b'Z', b"I");
        input.extend_from_slice(&[b'D', 0x40, 0, 0, 4]);
        let (out, verdict) = relayed(input, 1 << 20).await;
        assert_eq!(out, message(b'Z', b"I"), "only the message before it");
        let (code, why) = verdict.expect_err("cut");
        assert_eq!(code, TOO_LARGE);
        assert!(why.contains("1073741824 bytes (type 'D')"), "{why}");
    }

    #[tokio::test]
    async fn an_answer_is_bounded_as_a_whole_until_ready_for_query() {
        let row = message(b'D', &[1u8; 100]);
        let mut input = Vec::new();
        for _ in 0..20 {
            input.extend_from_slice(&row);
        }
        let (_, verdict) = relayed(input.clone(), 1000).await;
        assert_eq!(verdict.expect_err("cut").0, TOO_LARGE);
        // ReadyForQuery in between: each answer is small.
        let mut answered = Vec::new();
        for _ in 0..20 {
            answered.extend_from_slice(&row);
            answered.extend(message(b'Z', b"I"));
        }
        let (out, verdict) = relayed(answered.clone(), 1000).await;
        assert_eq!(verdict, Ok(()));
        assert_eq!(out, answered);
    }

    #[tokio::test]
    async fn malformed_lengths_and_parameter_floods_are_cut() {
        let (_, verdict) = relayed(vec![b'D', 0, 0, 0, 3], 1000).await;
        assert_eq!(verdict.expect_err("cut").0, MALFORMED);
        let mut input = Vec::new();
        for i in 0..=MAX_PARAMETER_STATUS {
            input.extend(message(b'S', format!("p{i}\0v\0").as_bytes()));
            if i % 10 == 0 {
                input.extend(message(b'Z', b"I"));
            }
        }
        let (_, verdict) = relayed(input, 1 << 20).await;
        let (code, why) = verdict.expect_err("cut");
        assert_eq!(code, TOO_LARGE);
        assert!(why.contains("parameter settings"), "{why}");
    }

    #[test]
    fn error_responses_are_well_formed() {
        let e = error_response(TOO_LARGE, "too\0big");
        assert_eq!(e[0], b'E');
        let length = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(length + 1, e.len());
        assert!(e.ends_with(b"\0\0"));
        assert!(!e[5..e.len() - 1].windows(7).any(|w| w == b"too\0big"));
    }

    #[test]
    fn certificate_errors_never_repeat_the_value() {
        let key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleQ==\n-----END PRIVATE KEY";
        let certificates = Certificates {
            root: None,
            client_cert: Some("/nonexistent/cert.pem".into()),
            client_key: Some(key.into()),
        };
        let Err(e) = Tls::new(PgSslMode::Require, &certificates) else {
            panic!("an unreadable certificate must be refused");
        };
        assert!(!e.contains("c2VjcmV0"), "{e}");
        assert!(!e.contains("nonexistent"), "{e}");
    }
}
