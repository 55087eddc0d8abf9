//! The cluster database: provisioning (role, database, schemas, privileges,
//! migrations) with sqlx, the guaranteed-delivery queries of the remove
//! workflow, and the objects of a managed PostgreSQL.
//!
//! Errors carry a class (what a person should look at), the server's
//! host:port and a detail that never contains a password: they end up in
//! status conditions, Events and logs.
//!
//! The server may be a tenant's (an external admin URL comes from their
//! Secret), so every connection goes through a loopback relay that bounds
//! what the server can make the operator hold in memory (`relay.rs`), every
//! session runs with `statement_timeout` and `lock_timeout`, and every
//! operation has a deadline of its own ([`Limits`]).

pub mod gd;
pub mod managed;
mod provision;
mod relay;

pub use provision::{Provisioned, drop_cluster_database, latest_migration, provision};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgDatabaseError, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgPool};

/// How long reaching a server, TLS and logging in may take
/// (Limits::connect by default).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time and size limits on the operator's dealings with a database server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Reaching the server, TLS and logging in.
    pub connect: Duration,
    /// `statement_timeout` of every session: the server cancels a statement
    /// that runs longer (a well-behaved server; a hostile one is bounded by
    /// the deadlines below).
    pub statement: Duration,
    /// `lock_timeout` of every session: waiting for a lock held by someone
    /// else, which would otherwise wait for as long as they hold it.
    pub lock: Duration,
    /// A whole provisioning run or drop, connections included.
    pub operation: Duration,
    /// One guaranteed-delivery query, waiting for a pooled connection
    /// included.
    pub query: Duration,
    /// The largest message, and the largest answer to one request, the
    /// server may send. The operator's own answers are a few KiB.
    pub max_response: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect: CONNECT_TIMEOUT,
            statement: Duration::from_secs(30),
            lock: Duration::from_secs(10),
            operation: Duration::from_secs(60),
            query: Duration::from_secs(15),
            max_response: 8 << 20,
        }
    }
}

/// Which deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// Limits::connect, on the operator's clock.
    Connect,
    /// The session's statement_timeout, on the server.
    Statement,
    /// The session's lock_timeout, on the server.
    Lock,
    /// Limits::operation or Limits::query, on the operator's clock.
    Operation,
}

/// What went wrong, as a person would sort it; each is a condition reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The admin Secret is missing, lacks the key or holds no postgres:// URL.
    AdminSecretInvalid,
    /// No connection: DNS, refused, timeout, TLS.
    Unreachable,
    /// The server refused the credentials.
    AuthenticationFailed,
    /// The admin role may not create roles or databases.
    PermissionDenied,
    /// The database has migrations this operator does not know.
    NewerThanOperator,
    /// A migration failed.
    MigrationFailed,
    /// The server took longer than a deadline allows.
    DeadlineExceeded(Deadline),
    /// The server sent (or announced) more than the operator accepts.
    ResponseTooLarge,
    /// The role or database with the cluster's name was not created for
    /// this cluster; the operator leaves it alone.
    NotOwned,
    /// Anything else the server answered.
    Other,
}

impl ErrorClass {
    /// CamelCase reason for conditions and Events.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorClass::AdminSecretInvalid => "DatabaseAdminSecretInvalid",
            ErrorClass::Unreachable => "DatabaseUnreachable",
            ErrorClass::AuthenticationFailed => "DatabaseAuthenticationFailed",
            ErrorClass::PermissionDenied => "DatabasePermissionDenied",
            ErrorClass::NewerThanOperator => "DatabaseNewerThanOperator",
            ErrorClass::MigrationFailed => "DatabaseMigrationFailed",
            ErrorClass::DeadlineExceeded(_) => "DatabaseDeadlineExceeded",
            ErrorClass::ResponseTooLarge => "DatabaseResponseTooLarge",
            ErrorClass::NotOwned => "DatabaseNotOwned",
            ErrorClass::Other => "DatabaseError",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorClass::AdminSecretInvalid => "admin connection Secret unusable",
            ErrorClass::Unreachable => "server unreachable",
            ErrorClass::AuthenticationFailed => "authentication failed",
            ErrorClass::PermissionDenied => "permission denied",
            ErrorClass::NewerThanOperator => "database is newer than this operator",
            ErrorClass::MigrationFailed => "migration failed",
            ErrorClass::DeadlineExceeded(Deadline::Connect) => "connect deadline passed",
            ErrorClass::DeadlineExceeded(Deadline::Statement) => "statement_timeout passed",
            ErrorClass::DeadlineExceeded(Deadline::Lock) => "lock_timeout passed",
            ErrorClass::DeadlineExceeded(Deadline::Operation) => "deadline passed",
            ErrorClass::ResponseTooLarge => "answer too large",
            ErrorClass::NotOwned => "not this cluster's",
            ErrorClass::Other => "database error",
        }
    }
}

/// A database failure, safe to show: no password in any field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("database {host}: {}: {detail}", class.describe())]
pub struct DbError {
    pub class: ErrorClass,
    /// host:port as the operator reaches it.
    pub host: String,
    pub detail: String,
}

impl DbError {
    pub fn new(class: ErrorClass, host: impl Into<String>, detail: impl Into<String>) -> Self {
        DbError {
            class,
            host: host.into(),
            detail: detail.into(),
        }
    }

    /// Sorts a sqlx error. sqlx's own messages name hosts, users and SQL
    /// states but not passwords; only database and I/O messages are kept,
    /// cut to a length that fits a condition (the server may be hostile).
    pub fn from_sqlx(host: &str, error: &sqlx::Error) -> Self {
        let (class, detail) = match error {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default().into_owned();
                let relayed = db
                    .try_downcast_ref::<PgDatabaseError>()
                    .is_some_and(|pg| pg.routine() == Some(relay::ROUTINE));
                if relayed {
                    // The relay's verdict, not the server's words.
                    let class = if code == relay::TOO_LARGE {
                        ErrorClass::ResponseTooLarge
                    } else {
                        ErrorClass::Unreachable
                    };
                    return DbError::new(class, host, bounded(db.message()));
                }
                let class = match code.as_str() {
                    "28P01" | "28000" => ErrorClass::AuthenticationFailed,
                    "42501" => ErrorClass::PermissionDenied,
                    "57014" => ErrorClass::DeadlineExceeded(Deadline::Statement),
                    "55P03" => ErrorClass::DeadlineExceeded(Deadline::Lock),
                    c if c.starts_with("08") || c == "57P03" => ErrorClass::Unreachable,
                    _ => ErrorClass::Other,
                };
                (
                    class,
                    format!("{} (SQLSTATE {})", bounded(db.message()), bounded(&code)),
                )
            }
            sqlx::Error::Io(io) => (ErrorClass::Unreachable, io.to_string()),
            sqlx::Error::Tls(tls) => (ErrorClass::Unreachable, format!("TLS: {tls}")),
            sqlx::Error::PoolTimedOut => (
                ErrorClass::Unreachable,
                "no connection within the pool's timeout".to_owned(),
            ),
            sqlx::Error::Protocol(p) => (ErrorClass::Other, format!("protocol: {}", bounded(p))),
            other => (ErrorClass::Other, kind_of(other).to_owned()),
        };
        DbError::new(class, host, detail)
    }

    fn deadline(deadline: Deadline, host: &str, detail: String) -> Self {
        DbError::new(ErrorClass::DeadlineExceeded(deadline), host, detail)
    }
}

/// The longest text from a server kept in an error.
const MAX_SERVER_TEXT: usize = 300;

fn bounded(text: &str) -> String {
    if text.len() <= MAX_SERVER_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_SERVER_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A short name for errors whose message might echo configuration.
fn kind_of(error: &sqlx::Error) -> &'static str {
    match error {
        sqlx::Error::Configuration(_) => "connection settings rejected",
        sqlx::Error::RowNotFound => "row not found",
        sqlx::Error::ColumnNotFound(_) | sqlx::Error::ColumnDecode { .. } => {
            "unexpected result shape"
        }
        _ => "unexpected error",
    }
}

/// Where a cluster's database is, as the servers and the operator reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// The cluster's database (also its role's name).
    pub database: String,
}

impl Endpoint {
    /// host:port for messages and status.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Credentials of a role; Debug hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Who a cluster's role and database belong to. The operator writes the
/// marker as their comment when it creates them and alters or drops only
/// what carries it (or what it can prove is the cluster's: see
/// `provision`). Comments on roles and databases live in the server's
/// shared catalog and only their owner or an administrator can change them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub cluster: String,
    /// The IntegrationCluster's uid: a cluster recreated under the same name
    /// (perhaps by someone else, in a namespace deleted and created again) is
    /// not the one the database was made for.
    pub uid: String,
}

const MARKER: &str = "integration-operator:";

impl Owner {
    /// `integration-operator:<namespace>/<cluster>:<uid>`.
    pub fn marker(&self) -> String {
        format!("{MARKER}{}/{}:{}", self.namespace, self.cluster, self.uid)
    }

    fn claim(&self, comment: Option<&str>) -> Claim {
        let Some(comment) = comment.filter(|c| !c.is_empty()) else {
            return Claim::Unmarked;
        };
        if comment == self.marker() {
            return Claim::Ours;
        }
        let same_name = format!("{MARKER}{}/{}:", self.namespace, self.cluster);
        if comment.starts_with(&same_name) {
            Claim::Predecessor
        } else if comment.starts_with(MARKER) {
            Claim::OtherCluster
        } else {
            Claim::Foreign
        }
    }
}

/// What a role's or database's comment says about who it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Claim {
    /// This cluster's marker.
    Ours,
    /// No comment: made by hand, or by an operator before markers.
    Unmarked,
    /// A cluster of the same namespace and name, but another uid.
    Predecessor,
    /// Another cluster's marker.
    OtherCluster,
    /// A comment that is no marker.
    Foreign,
}

/// The admin connection: parsed from a URL (external) or built (managed).
/// Holds a password, so it is never logged.
#[derive(Clone)]
pub struct Admin {
    options: PgConnectOptions,
    tls: relay::Tls,
    limits: Limits,
}

impl Admin {
    /// Parses an admin URL; the error never repeats the URL.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let url = url.trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("the value is not a postgres:// URL".to_owned());
        }
        let options = url
            .parse::<PgConnectOptions>()
            .map_err(|_| "the postgres:// URL cannot be parsed".to_owned())?;
        if options.get_socket().is_some() {
            return Err(
                "the URL names a Unix-domain socket; only host:port is supported".to_owned(),
            );
        }
        // sqlx keeps the certificate settings to itself; the relay needs them.
        let mut certificates = relay::Certificates::default();
        let query = url.split_once('?').map_or("", |(_, q)| q);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "sslrootcert" | "ssl-root-cert" | "ssl-ca" => {
                    certificates.root = Some(value.into_owned());
                }
                "sslcert" | "ssl-cert" => certificates.client_cert = Some(value.into_owned()),
                "sslkey" | "ssl-key" => certificates.client_key = Some(value.into_owned()),
                _ => {}
            }
        }
        let tls = relay::Tls::new(options.get_ssl_mode(), &certificates)?;
        Ok(Admin {
            options,
            tls,
            limits: Limits::default(),
        })
    }

    pub fn new(host: &str, port: u16, login: &Login) -> Self {
        let options = PgConnectOptions::new_without_pgpass()
            .host(host)
            .port(port)
            .username(&login.username)
            .password(&login.password)
            .database("postgres");
        // Without certificates, prefer needs nothing that can fail.
        let tls = relay::Tls::new(options.get_ssl_mode(), &relay::Certificates::default())
            .unwrap_or(relay::Tls::Off);
        Admin {
            options,
            tls,
            limits: Limits::default(),
        }
    }

    /// The same server with other limits.
    pub fn with_limits(self, limits: Limits) -> Self {
        Admin { limits, ..self }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn host(&self) -> &str {
        self.options.get_host()
    }

    pub fn port(&self) -> u16 {
        self.options.get_port()
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host(), self.port())
    }

    /// The same server, as another role, in another database.
    fn as_login(&self, login: &Login, database: &str) -> PgConnectOptions {
        self.options
            .clone()
            .username(&login.username)
            .password(&login.password)
            .database(database)
    }

    /// A relay to this server, and `options` redirected through it with the
    /// session limits.
    fn relayed(
        &self,
        options: &PgConnectOptions,
    ) -> Result<(relay::Relay, PgConnectOptions), DbError> {
        let relay = relay::Relay::start(relay::Upstream {
            host: self.host().to_owned(),
            port: self.port(),
            tls: self.tls.clone(),
            connect_timeout: self.limits.connect,
            max_response: self.limits.max_response,
        })
        .map_err(|e| {
            DbError::new(
                ErrorClass::Other,
                self.address(),
                format!("cannot open the loopback relay: {e}"),
            )
        })?;
        let options = options
            .clone()
            .host(&std::net::Ipv4Addr::LOCALHOST.to_string())
            .port(relay.port())
            // The relay negotiates TLS with the server; loopback is plaintext.
            .ssl_mode(PgSslMode::Disable)
            .disable_statement_logging()
            .options([
                ("statement_timeout", millis(self.limits.statement)),
                ("lock_timeout", millis(self.limits.lock)),
            ]);
        Ok((relay, options))
    }
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// A pool of the cluster role's connections, through a relay that lives as
/// long as any clone of the pool.
#[derive(Clone)]
pub struct RolePool {
    pool: PgPool,
    _relay: Arc<relay::Relay>,
    address: String,
    limits: Limits,
}

impl RolePool {
    /// Connections open lazily and close when idle.
    pub fn new(admin: &Admin, endpoint: &Endpoint, login: &Login) -> Result<Self, DbError> {
        let (relay, options) = admin.relayed(&admin.as_login(login, &endpoint.database))?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(admin.limits.connect)
            .idle_timeout(Some(Duration::from_secs(60)))
            .connect_lazy_with(options);
        Ok(RolePool {
            pool,
            _relay: Arc::new(relay),
            address: admin.address(),
            limits: admin.limits,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs one query within Limits::query; `what` says what it does.
    pub async fn bounded<T>(
        &self,
        what: &str,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(self.limits.query, query).await {
            Ok(result) => result.map_err(|e| DbError::from_sqlx(&self.address, &e)),
            Err(_) => Err(DbError::deadline(
                Deadline::Operation,
                &self.address,
                format!("{what} took longer than {}s", self.limits.query.as_secs()),
            )),
        }
    }
}

/// Options for a cluster role's connections to its own database.
pub fn role_options(endpoint: &Endpoint, login: &Login) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host(&endpoint.host)
        .port(endpoint.port)
        .username(&login.username)
        .password(&login.password)
        .database(&endpoint.database)
        .disable_statement_logging()
}

/// Opens one session to the admin's server as `options` say, through a
/// relay of its own (which stops accepting once the session is open).
async fn connect(admin: &Admin, options: &PgConnectOptions) -> Result<PgConnection, DbError> {
    let address = admin.address();
    let (_relay, options) = admin.relayed(options)?;
    let limit = admin.limits.connect;
    match tokio::time::timeout(limit, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(DbError::from_sqlx(&address, &e)),
        Err(_) => Err(DbError::deadline(
            Deadline::Connect,
            &address,
            format!("no answer within {}s", limit.as_secs()),
        )),
    }
}

/// Runs a whole operation within Limits::operation.
async fn within<T>(
    admin: &Admin,
    what: &str,
    operation: impl Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    let limit = admin.limits.operation;
    tokio::time::timeout(limit, operation)
        .await
        .unwrap_or_else(|_| {
            Err(DbError::deadline(
                Deadline::Operation,
                &admin.address(),
                format!("{what} did not finish within {}s", limit.as_secs()),
            ))
        })
}

async fn close(conn: PgConnection) {
    // A failed goodbye changes nothing: the server drops the session anyway.
    let _ = conn.close().await;
}

/// A random password: 32 hex characters from the OS generator, so it needs
/// no quoting in SQL or URLs.
pub fn generate_password() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Quotes an SQL identifier (names come from our naming rules, but quoting
/// keeps any future name safe).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (DDL takes no bind parameters).
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_url_errors_never_echo_the_url() {
        let secret = "postgres://admin:s3cret@db.example.com:notaport/postgres";
        let Err(e) = Admin::from_url(secret) else {
            panic!("a bad port must be refused");
        };
        assert!(!e.contains("s3cret"), "{e}");
        let Err(e) = Admin::from_url("mysql://admin:s3cret@db/x") else {
            panic!("a non-postgres URL must be refused");
        };
        assert!(!e.contains("s3cret"), "{e}");
        let admin = Admin::from_url("postgres://admin:s3cret@db.example.com:6543/postgres")
            .expect("valid URL");
        assert_eq!(admin.address(), "db.example.com:6543");
    }

    #[test]
    fn passwords_are_random_hex() {
        let a = generate_password().expect("random");
        let b = generate_password().expect("random");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("ic_a\"b"), "\"ic_a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn login_debug_hides_the_password() {
        let login = Login {
            username: "ic_prod_orders".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{login:?}").contains("s3cret"));
    }

    #[test]
    fn error_display_names_host_and_class() {
        let e = DbError::new(
            ErrorClass::AuthenticationFailed,
            "db:5432",
            "password authentication failed for user \"admin\"",
        );
        assert_eq!(
            e.to_string(),
            "database db:5432: authentication failed: password authentication failed for user \"admin\""
        );
        assert_eq!(e.class.reason(), "DatabaseAuthenticationFailed");
    }
}
