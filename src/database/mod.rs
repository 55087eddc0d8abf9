//! The cluster database: provisioning (role, database, schemas, privileges,
//! migrations) with sqlx, the guaranteed-delivery queries of the remove
//! workflow, and the objects of a managed PostgreSQL.
//!
//! Errors carry a class (what a person should look at), the server's
//! host:port and a detail that never contains a password: they end up in
//! status conditions, Events and logs.

pub mod gd;
pub mod managed;
mod provision;

pub use provision::{Provisioned, drop_cluster_database, latest_migration, provision};

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

/// How long a connection attempt may take before the server counts as
/// unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// states but not passwords; only database and I/O messages are kept.
    pub fn from_sqlx(host: &str, error: &sqlx::Error) -> Self {
        let (class, detail) = match error {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default().into_owned();
                let class = match code.as_str() {
                    "28P01" | "28000" => ErrorClass::AuthenticationFailed,
                    "42501" => ErrorClass::PermissionDenied,
                    c if c.starts_with("08") || c == "57P03" => ErrorClass::Unreachable,
                    _ => ErrorClass::Other,
                };
                (class, format!("{} (SQLSTATE {code})", db.message()))
            }
            sqlx::Error::Io(io) => (ErrorClass::Unreachable, io.to_string()),
            sqlx::Error::Tls(tls) => (ErrorClass::Unreachable, format!("TLS: {tls}")),
            sqlx::Error::PoolTimedOut => (
                ErrorClass::Unreachable,
                "no connection within the pool's timeout".to_owned(),
            ),
            sqlx::Error::Protocol(p) => (ErrorClass::Other, format!("protocol: {p}")),
            other => (ErrorClass::Other, kind_of(other).to_owned()),
        };
        DbError::new(class, host, detail)
    }
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

/// The admin connection: parsed from a URL (external) or built (managed).
/// Holds a password, so it is never logged.
#[derive(Clone)]
pub struct Admin {
    options: PgConnectOptions,
}

impl Admin {
    /// Parses an admin URL; the error never repeats the URL.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let url = url.trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("the value is not a postgres:// URL".to_owned());
        }
        url.parse::<PgConnectOptions>()
            .map(|options| Admin { options })
            .map_err(|_| "the postgres:// URL cannot be parsed".to_owned())
    }

    pub fn new(host: &str, port: u16, login: &Login) -> Self {
        Admin {
            options: PgConnectOptions::new_without_pgpass()
                .host(host)
                .port(port)
                .username(&login.username)
                .password(&login.password)
                .database("postgres"),
        }
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

async fn connect(options: &PgConnectOptions, address: &str) -> Result<PgConnection, DbError> {
    let options = options.clone().disable_statement_logging();
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(DbError::from_sqlx(address, &e)),
        Err(_) => Err(DbError::new(
            ErrorClass::Unreachable,
            address,
            format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        )),
    }
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
