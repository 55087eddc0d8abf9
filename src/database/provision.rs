//! Idempotent provisioning of one cluster's role, database, schemas and
//! operator tables. Every step looks before it writes, so a second run on a
//! provisioned server changes nothing and reports no changes.
//!
//! Nothing is altered or dropped that is not provably the cluster's: a
//! role or database carrying its ownership marker ([`Owner`]), or one
//! without a marker (made before markers existed) or made for an earlier
//! cluster of the same name, whose password the cluster's credentials
//! Secret holds — whoever holds the password can do as much as the operator
//! would. Anything else is reported as `NotOwned` and left alone.

use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Executor};

use super::{
    Admin, Claim, DbError, Endpoint, ErrorClass, Login, Owner, close, connect, ident, literal,
    within,
};
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
/// Ends within the admin's Limits::operation.
pub async fn provision(
    admin: &Admin,
    endpoint: &Endpoint,
    login: &Login,
    components: &[String],
    owner: &Owner,
) -> Result<Provisioned, DbError> {
    within(
        admin,
        "provisioning",
        provision_now(admin, endpoint, login, components, owner),
    )
    .await
}

async fn provision_now(
    admin: &Admin,
    endpoint: &Endpoint,
    login: &Login,
    components: &[String],
    owner: &Owner,
) -> Result<Provisioned, DbError> {
    let address = admin.address();
    let mut changes = Vec::new();
    let mut conn = connect(admin, &admin.options).await?;
    let result =
        ensure_role_and_database(&mut conn, admin, endpoint, login, owner, &mut changes).await;
    close(conn).await;
    result?;

    let as_role = admin.as_login(login, &endpoint.database);
    let mut conn = match connect(admin, &as_role).await {
        Err(e) if e.class == ErrorClass::AuthenticationFailed => {
            // The role carries this cluster's marker (checked above) but
            // has another password: its Secret was recreated, and the
            // Secret is the truth.
            reset_password(admin, login).await?;
            changes.push(format!("reset the password of role {}", login.username));
            connect(admin, &as_role).await?
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

/// A role or database as the catalog shows it.
struct Found {
    claim: Claim,
    /// The owning role (databases only).
    owner: Option<String>,
}

/// The role `name` and the database `name`, when they exist.
async fn inspect(
    conn: &mut PgConnection,
    address: &str,
    owner: &Owner,
    name: &str,
) -> Result<(Option<Found>, Option<Found>), DbError> {
    let sqlx_error = |e: sqlx::Error| DbError::from_sqlx(address, &e);
    let role: Option<Option<String>> = sqlx::query_scalar(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
    )
    .bind(name.to_owned())
    .fetch_optional(&mut *conn)
    .await
    .map_err(sqlx_error)?;
    let database: Option<(Option<String>, String)> = sqlx::query_as(
        "SELECT shobj_description(oid, 'pg_database'), pg_get_userbyid(datdba)::text
           FROM pg_database WHERE datname = $1",
    )
    .bind(name.to_owned())
    .fetch_optional(&mut *conn)
    .await
    .map_err(sqlx_error)?;
    Ok((
        role.map(|comment| Found {
            claim: owner.claim(comment.as_deref()),
            owner: None,
        }),
        database.map(|(comment, by)| Found {
            claim: owner.claim(comment.as_deref()),
            owner: Some(by),
        }),
    ))
}

/// Why `kind` `name` is not the cluster's, for a person.
fn not_owned(kind: &str, name: &str, claim: Claim, proof_failed: bool) -> String {
    let why = match claim {
        Claim::OtherCluster => "carries another cluster's ownership marker".to_owned(),
        Claim::Foreign => {
            "has a comment that is not the operator's ownership marker: it was not created by integration-operator".to_owned()
        }
        Claim::Predecessor => "was created for an earlier cluster of the same name".to_owned(),
        Claim::Unmarked | Claim::Ours => {
            "exists without the operator's ownership marker: it was not created for this cluster".to_owned()
        }
    };
    let proof = if proof_failed {
        ", and this cluster's credentials do not open it"
    } else {
        ""
    };
    format!("{kind} {name} {why}{proof}")
}

fn not_owned_error(address: &str, reasons: &[String]) -> DbError {
    DbError::new(
        ErrorClass::NotOwned,
        address,
        format!(
            "{}; the operator does not alter or drop it (drop or rename it, or give this cluster another name)",
            reasons.join("; ")
        ),
    )
}

/// Whether `login` opens `database` as its role: the proof that the
/// cluster's credentials Secret holds the role's password.
async fn credentials_open(admin: &Admin, login: &Login, database: &str) -> Result<bool, DbError> {
    match connect(admin, &admin.as_login(login, database)).await {
        Ok(conn) => {
            close(conn).await;
            Ok(true)
        }
        Err(e)
            if matches!(
                e.class,
                ErrorClass::AuthenticationFailed | ErrorClass::PermissionDenied
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

async fn execute(conn: &mut PgConnection, address: &str, sql: String) -> Result<(), DbError> {
    conn.execute(sqlx::raw_sql(AssertSqlSafe(sql)))
        .await
        .map(|_| ())
        .map_err(|e| DbError::from_sqlx(address, &e))
}

/// The cluster's role and database, created, or adopted when they are
/// provably the cluster's, and closed to every other role.
async fn ensure_role_and_database(
    conn: &mut PgConnection,
    admin: &Admin,
    endpoint: &Endpoint,
    login: &Login,
    owner: &Owner,
    changes: &mut Vec<String>,
) -> Result<(), DbError> {
    let address = admin.address();
    let address = address.as_str();
    let role = &login.username;
    let database = &endpoint.database;
    let marker = literal(&owner.marker());
    let (found_role, found_database) = inspect(conn, address, owner, database).await?;
    refuse_foreign_markers(address, database, &found_role, &found_database)?;

    // Whether the role exists and is the cluster's, by its marker or now
    // by proof.
    let mut role_ours = false;
    if let Some(found) = &found_role {
        if found.claim != Claim::Ours {
            let opens = if found_database.is_some() {
                database.as_str()
            } else {
                "postgres"
            };
            adopt_role(conn, admin, login, found, opens, &marker).await?;
            changes.push(format!("marked role {role} as this cluster's"));
        }
        role_ours = true;
    }
    if let Some(found) = &found_database
        && found.claim != Claim::Ours
    {
        let our_role = role_ours.then_some(role.as_str());
        adopt_database(conn, address, database, found, our_role, &marker).await?;
        changes.push(format!("marked database {database} as this cluster's"));
    }

    if found_role.is_none() {
        create_role(conn, address, login, &marker).await?;
        changes.push(format!("created role {role}"));
    }
    if found_database.is_none() {
        // CREATE DATABASE runs outside any transaction; an interruption
        // before the comment leaves a database owned by the cluster's role,
        // which the next run marks (`adopt_database`).
        execute(
            conn,
            address,
            format!("CREATE DATABASE {} OWNER {}", ident(database), ident(role)),
        )
        .await?;
        mark_database(conn, address, database, &marker).await?;
        changes.push(format!("created database {database}"));
    }
    if revoke_public_access(conn, address, database).await? {
        changes.push(format!("revoked PUBLIC access to database {database}"));
    }
    Ok(())
}

/// Foreign markers are never overruled.
fn refuse_foreign_markers(
    address: &str,
    name: &str,
    role: &Option<Found>,
    database: &Option<Found>,
) -> Result<(), DbError> {
    let mut refused = Vec::new();
    for (kind, found) in [("role", role), ("database", database)] {
        if let Some(Found {
            claim: claim @ (Claim::OtherCluster | Claim::Foreign),
            ..
        }) = found
        {
            refused.push(not_owned(kind, name, *claim, false));
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(not_owned_error(address, &refused))
    }
}

/// An unmarked or inherited role is adopted only on proof: `login` opens
/// the database `opens` as the role. Then it gets the cluster's marker.
async fn adopt_role(
    conn: &mut PgConnection,
    admin: &Admin,
    login: &Login,
    found: &Found,
    opens: &str,
    marker: &str,
) -> Result<(), DbError> {
    let address = admin.address();
    let role = &login.username;
    if !credentials_open(admin, login, opens).await? {
        return Err(not_owned_error(
            &address,
            &[not_owned("role", role, found.claim, true)],
        ));
    }
    execute(
        conn,
        &address,
        format!("COMMENT ON ROLE {} IS {marker}", ident(role)),
    )
    .await
}

/// A database owned by the cluster's role (`our_role`) was made for it: the
/// role cannot create databases, and only an administrator could have given
/// it one (the operator itself, interrupted before its mark). Such a
/// database gets the cluster's marker; any other is refused.
async fn adopt_database(
    conn: &mut PgConnection,
    address: &str,
    database: &str,
    found: &Found,
    our_role: Option<&str>,
    marker: &str,
) -> Result<(), DbError> {
    let owned_by_role = our_role.is_some_and(|role| found.owner.as_deref() == Some(role));
    if !owned_by_role {
        return Err(not_owned_error(
            address,
            &[not_owned("database", database, found.claim, false)],
        ));
    }
    mark_database(conn, address, database, marker).await
}

/// One transaction: the role never exists without its marker.
async fn create_role(
    conn: &mut PgConnection,
    address: &str,
    login: &Login,
    marker: &str,
) -> Result<(), DbError> {
    let sql = format!(
        "BEGIN; CREATE ROLE {role_ident} LOGIN PASSWORD {} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION; COMMENT ON ROLE {role_ident} IS {marker}; COMMIT",
        literal(&login.password),
        role_ident = ident(&login.username),
    );
    execute(conn, address, sql).await
}

async fn mark_database(
    conn: &mut PgConnection,
    address: &str,
    database: &str,
    marker: &str,
) -> Result<(), DbError> {
    execute(
        conn,
        address,
        format!("COMMENT ON DATABASE {} IS {marker}", ident(database)),
    )
    .await
}

/// PostgreSQL lets every role connect to a new database; only the cluster's
/// role may. Returns whether anything was revoked.
async fn revoke_public_access(
    conn: &mut PgConnection,
    address: &str,
    database: &str,
) -> Result<bool, DbError> {
    let public_may_connect: bool = sqlx::query_scalar(
        "SELECT has_database_privilege('public', $1, 'CONNECT') OR has_database_privilege('public', $1, 'TEMPORARY')",
    )
    .bind(database.to_owned())
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| DbError::from_sqlx(address, &e))?;
    if public_may_connect {
        execute(
            conn,
            address,
            format!("REVOKE ALL ON DATABASE {} FROM PUBLIC", ident(database)),
        )
        .await?;
    }
    Ok(public_may_connect)
}

async fn reset_password(admin: &Admin, login: &Login) -> Result<(), DbError> {
    let address = admin.address();
    let mut conn = connect(admin, &admin.options).await?;
    let sql = format!(
        "ALTER ROLE {} WITH PASSWORD {}",
        ident(&login.username),
        literal(&login.password)
    );
    let result = execute(&mut conn, &address, sql).await;
    close(conn).await;
    result
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
/// sessions) and role, `endpoint.database` both, when they carry the
/// owner's marker (a database without one but owned by the marked role
/// too). Drops nothing and answers `NotOwned` when either exists without
/// being provably the cluster's. Returns what was dropped; ends within the
/// admin's Limits::operation.
pub async fn drop_cluster_database(
    admin: &Admin,
    endpoint: &Endpoint,
    owner: &Owner,
) -> Result<Vec<String>, DbError> {
    within(admin, "dropping the database", async {
        let address = admin.address();
        let mut conn = connect(admin, &admin.options).await?;
        let result = drop_owned(&mut conn, &address, &endpoint.database, owner).await;
        close(conn).await;
        result
    })
    .await
}

async fn drop_owned(
    conn: &mut PgConnection,
    address: &str,
    name: &str,
    owner: &Owner,
) -> Result<Vec<String>, DbError> {
    let (role, database) = inspect(conn, address, owner, name).await?;
    let role_ours = role.as_ref().is_some_and(|r| r.claim == Claim::Ours);
    let mut refused = Vec::new();
    if let Some(found) = &role
        && !role_ours
    {
        refused.push(not_owned("role", name, found.claim, false));
    }
    if let Some(found) = &database {
        let owned_by_role = matches!(found.claim, Claim::Unmarked)
            && role_ours
            && found.owner.as_deref() == Some(name);
        if found.claim != Claim::Ours && !owned_by_role {
            refused.push(not_owned("database", name, found.claim, false));
        }
    }
    if !refused.is_empty() {
        return Err(not_owned_error(address, &refused));
    }
    let mut dropped = Vec::new();
    if database.is_some() {
        execute(
            conn,
            address,
            format!("DROP DATABASE {} WITH (FORCE)", ident(name)),
        )
        .await?;
        dropped.push(format!("database {name}"));
    }
    if role.is_some() {
        execute(conn, address, format!("DROP ROLE {}", ident(name))).await?;
        dropped.push(format!("role {name}"));
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            namespace: "team-a".into(),
            cluster: "orders".into(),
            uid: "1111".into(),
        }
    }

    #[test]
    fn only_the_exact_marker_is_ours() {
        let me = owner();
        assert_eq!(me.marker(), "integration-operator:team-a/orders:1111");
        assert_eq!(me.claim(Some(&me.marker())), Claim::Ours);
        assert_eq!(me.claim(None), Claim::Unmarked);
        assert_eq!(me.claim(Some("")), Claim::Unmarked);
        assert_eq!(
            me.claim(Some("integration-operator:team-a/orders:2222")),
            Claim::Predecessor
        );
        for other in [
            "integration-operator:team-a/orders-x:1111",
            "integration-operator:team/a-orders:1111",
            "integration-operator:team-a/order:1111",
        ] {
            assert_eq!(me.claim(Some(other)), Claim::OtherCluster, "{other}");
        }
        assert_eq!(me.claim(Some("billing database, ask Jo")), Claim::Foreign);
    }

    #[test]
    fn refusals_say_what_and_why() {
        let text = not_owned("role", "icn_x", Claim::Unmarked, true);
        assert_eq!(
            text,
            "role icn_x exists without the operator's ownership marker: it was not created for this cluster, and this cluster's credentials do not open it"
        );
        let e = not_owned_error("db:5432", &[text]);
        assert_eq!(e.class.reason(), "DatabaseNotOwned");
        assert!(
            e.to_string()
                .starts_with("database db:5432: not this cluster's: role icn_x")
        );
    }
}
