//! Idempotent provisioning of one cluster's role, database, schemas and
//! operator tables. Every step looks before it writes, so a second run on a
//! provisioned server changes nothing and reports no changes.

use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Executor};

use super::{Admin, DbError, Endpoint, ErrorClass, Login, close, connect, ident, literal};
use crate::naming;

/// The operator's migrations, embedded at build time.
static MIGRATIONS: Migrator = sqlx::migrate!();

/// The migrator with its bookkeeping table next to the tables it creates,
/// so the component schemas stay the servers' own.
fn migrator() -> Migrator {
    let mut migrator = Migrator::with_migrations(MIGRATIONS.migrations.to_vec());
    migrator.dangerous_set_table_name(format!("{}._sqlx_migrations", naming::OPERATOR_SCHEMA));
    migrator.create_schema(naming::OPERATOR_SCHEMA);
    migrator
}

/// The newest migration this operator knows.
pub fn latest_migration() -> i64 {
    MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

/// What a provisioning run found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provisioned {
    /// Newest applied migration.
    pub schema_version: Option<i64>,
    /// What this run created or repaired, for an Event; empty when all was
    /// in place.
    pub changes: Vec<String>,
}

/// Makes sure the cluster's role (with `login`'s password), database,
/// component schemas and operator tables exist, and that no other role may
/// connect to the database. Connects as admin, then as the role itself.
pub async fn provision(
    admin: &Admin,
    endpoint: &Endpoint,
    login: &Login,
    components: &[String],
) -> Result<Provisioned, DbError> {
    let address = admin.address();
    let mut changes = Vec::new();
    let mut conn = connect(&admin.options, &address).await?;
    let result = ensure_role_and_database(&mut conn, &address, endpoint, login, &mut changes).await;
    close(conn).await;
    result?;

    let as_role = admin.as_login(login, &endpoint.database);
    let mut conn = match connect(&as_role, &address).await {
        Err(e) if e.class == ErrorClass::AuthenticationFailed => {
            // The role exists with another password (its Secret was
            // recreated): the Secret is the truth.
            reset_password(admin, &address, login).await?;
            changes.push(format!("reset the password of role {}", login.username));
            connect(&as_role, &address).await?
        }
        other => other?,
    };
    let result = ensure_schemas_and_tables(&mut conn, &address, components, &mut changes).await;
    close(conn).await;
    let schema_version = result?;
    Ok(Provisioned {
        schema_version,
        changes,
    })
}

async fn ensure_role_and_database(
    conn: &mut PgConnection,
    address: &str,
    endpoint: &Endpoint,
    login: &Login,
    changes: &mut Vec<String>,
) -> Result<(), DbError> {
    let sqlx_error = |e: sqlx::Error| DbError::from_sqlx(address, &e);
    let role = &login.username;
    let role_exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role.to_owned())
            .fetch_one(&mut *conn)
            .await
            .map_err(sqlx_error)?;
    if !role_exists {
        let sql = format!(
            "CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION",
            ident(role),
            literal(&login.password)
        );
        conn.execute(sqlx::raw_sql(AssertSqlSafe(sql)))
            .await
            .map_err(sqlx_error)?;
        changes.push(format!("created role {role}"));
    }

    let database = &endpoint.database;
    let database_exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database.to_owned())
            .fetch_one(&mut *conn)
            .await
            .map_err(sqlx_error)?;
    if !database_exists {
        let sql = format!("CREATE DATABASE {} OWNER {}", ident(database), ident(role));
        conn.execute(sqlx::raw_sql(AssertSqlSafe(sql)))
            .await
            .map_err(sqlx_error)?;
        changes.push(format!("created database {database}"));
    }

    // PostgreSQL lets every role connect to a new database; only the
    // cluster's role may.
    let public_may_connect: bool = sqlx::query_scalar(
        "SELECT has_database_privilege('public', $1, 'CONNECT') OR has_database_privilege('public', $1, 'TEMPORARY')",
    )
    .bind(database.to_owned())
    .fetch_one(&mut *conn)
    .await
    .map_err(sqlx_error)?;
    if public_may_connect {
        let sql = format!("REVOKE ALL ON DATABASE {} FROM PUBLIC", ident(database));
        conn.execute(sqlx::raw_sql(AssertSqlSafe(sql)))
            .await
            .map_err(sqlx_error)?;
        changes.push(format!("revoked PUBLIC access to database {database}"));
    }
    Ok(())
}

async fn reset_password(admin: &Admin, address: &str, login: &Login) -> Result<(), DbError> {
    let mut conn = connect(&admin.options, address).await?;
    let sql = format!(
        "ALTER ROLE {} WITH PASSWORD {}",
        ident(&login.username),
        literal(&login.password)
    );
    let result = conn.execute(sqlx::raw_sql(AssertSqlSafe(sql))).await;
    close(conn).await;
    result
        .map(|_| ())
        .map_err(|e| DbError::from_sqlx(address, &e))
}

/// Component schemas and the operator's tables; returns the schema version.
async fn ensure_schemas_and_tables(
    conn: &mut PgConnection,
    address: &str,
    components: &[String],
    changes: &mut Vec<String>,
) -> Result<Option<i64>, DbError> {
    let sqlx_error = |e: sqlx::Error| DbError::from_sqlx(address, &e);
    let mut schemas: Vec<String> = components
        .iter()
        .map(|c| naming::component_schema(c))
        .collect();
    schemas.push(naming::OPERATOR_SCHEMA.to_owned());
    for schema in &schemas {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema.to_owned())
                .fetch_one(&mut *conn)
                .await
                .map_err(sqlx_error)?;
        if !exists {
            let sql = format!("CREATE SCHEMA {}", ident(schema));
            conn.execute(sqlx::raw_sql(AssertSqlSafe(sql)))
                .await
                .map_err(sqlx_error)?;
            changes.push(format!("created schema {schema}"));
        }
    }

    let applied = applied_version(conn, address).await?;
    let known = latest_migration();
    if let Some(version) = applied
        && version > known
    {
        return Err(DbError::new(
            ErrorClass::NewerThanOperator,
            address,
            format!(
                "migration {version} is applied but this operator knows migrations up to {known}; upgrade the operator (the database is never downgraded)"
            ),
        ));
    }
    if applied.is_none_or(|v| v < known) {
        // run_direct, not run: run's `Acquire<'a>` bound makes the
        // reconcile future fail the controller's `Send` requirement
        // (sqlx documents run_direct as the way around it).
        migrator()
            .run_direct(None, &mut *conn, false)
            .await
            .map_err(|e| {
                let detail = match &e {
                    sqlx::migrate::MigrateError::Execute(inner)
                    | sqlx::migrate::MigrateError::ExecuteMigration(inner, _) => {
                        DbError::from_sqlx(address, inner).detail
                    }
                    other => other.to_string(),
                };
                DbError::new(ErrorClass::MigrationFailed, address, detail)
            })?;
        changes.push(format!("applied migrations up to {known}"));
    }
    applied_version(conn, address).await
}

async fn applied_version(conn: &mut PgConnection, address: &str) -> Result<Option<i64>, DbError> {
    let table = format!("{}._sqlx_migrations", naming::OPERATOR_SCHEMA);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table.clone())
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| DbError::from_sqlx(address, &e))?;
    if !exists {
        return Ok(None);
    }
    let sql = format!("SELECT max(version) FROM {table} WHERE success");
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| DbError::from_sqlx(address, &e))
}

/// `deletionPolicy: Delete`: drops the cluster's database (closing its
/// sessions) and role. Returns what was dropped.
pub async fn drop_cluster_database(
    admin: &Admin,
    endpoint: &Endpoint,
    role: &str,
) -> Result<Vec<String>, DbError> {
    let address = admin.address();
    let mut conn = connect(&admin.options, &address).await?;
    let result = async {
        let sqlx_error = |e: sqlx::Error| DbError::from_sqlx(&address, &e);
        let mut dropped = Vec::new();
        let database_exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(endpoint.database.clone())
                .fetch_one(&mut conn)
                .await
                .map_err(sqlx_error)?;
        if database_exists {
            let sql = format!("DROP DATABASE {} WITH (FORCE)", ident(&endpoint.database));
            conn.execute(sqlx::raw_sql(AssertSqlSafe(sql)))
                .await
                .map_err(sqlx_error)?;
            dropped.push(format!("database {}", endpoint.database));
        }
        let role_exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(role.to_owned())
                .fetch_one(&mut conn)
                .await
                .map_err(sqlx_error)?;
        if role_exists {
            let sql = format!("DROP ROLE {}", ident(role));
            conn.execute(sqlx::raw_sql(AssertSqlSafe(sql)))
                .await
                .map_err(sqlx_error)?;
            dropped.push(format!("role {role}"));
        }
        Ok(dropped)
    }
    .await;
    close(conn).await;
    result
}
