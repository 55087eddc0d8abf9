//! What happens when a cluster is deleted, before its finalizer goes.
//!
//! Retain keeps the volume claims, the database and the Secrets that open
//! it. They are not owned by the cluster in the first place (see
//! `workload::data_meta`), so no deletion mode lets the garbage collector
//! take them; here objects an older operator version did own are released.
//!
//! Delete drops the cluster's database on an external server (a managed
//! server goes with its StatefulSet and volume). Cleanup never creates an
//! object and is bounded: a database that cannot be dropped within
//! [`DEADLINE`] of the deletion request, a missing or unusable admin
//! Secret, or the skip-cleanup annotation end it with a Warning Event that
//! names what was left behind. A namespace
//! being deleted therefore never waits on an unreachable database.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::warn;

use super::{Context, Failure, RETRY, apply, database};
use crate::api::{DatabaseMode, DeletionPolicy, IntegrationCluster, annotations};
use crate::database::ErrorClass;

/// How long after the deletion request the operator keeps trying to drop
/// a database it cannot reach.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub enum Outcome {
    /// The finalizer may go.
    Done,
    /// Try again in this long (the database could not be dropped yet).
    RetryIn(Duration),
}

pub async fn run(ic: &IntegrationCluster, ctx: &Context) -> Result<Outcome, Failure> {
    match ic.spec.deletion_policy {
        DeletionPolicy::Retain => retain(ic, ctx).await?,
        DeletionPolicy::Delete => {
            if let Some(delay) = drop_database(ic, ctx).await {
                return Ok(Outcome::RetryIn(delay));
            }
        }
    }
    database::forget(&ctx.databases, ic);
    Ok(Outcome::Done)
}

async fn retain(ic: &IntegrationCluster, ctx: &Context) -> Result<(), Failure> {
    let claims = apply::release_claims(ctx, ic).await?;
    if !claims.is_empty() {
        let note = format!(
            "deletionPolicy Retain: kept volume claims {} (not owned by the cluster; delete them by hand when the data is no longer needed)",
            claims.join(", ")
        );
        apply::publish(ctx, ic, EventType::Normal, "VolumesRetained", note).await;
    }
    if ic.spec.database.is_some() {
        let secrets = database::keep_secrets(&ctx.client, ic).await?;
        let note = format!(
            "deletionPolicy Retain: kept {}, and the Secrets {} (not owned by the cluster)",
            database::drop_target(ic),
            secrets.join(", ")
        );
        apply::publish(ctx, ic, EventType::Normal, "DatabaseRetained", note).await;
    }
    Ok(())
}

/// None when the database is dropped, needs no dropping, or is given up
/// on; otherwise when to try again.
async fn drop_database(ic: &IntegrationCluster, ctx: &Context) -> Option<Duration> {
    let spec = ic.spec.database.as_ref()?;
    if spec.mode == DatabaseMode::Managed {
        // The server and its volume are deleted with the cluster.
        return None;
    }
    let target = database::drop_target(ic);
    if annotations::cleanup_waived(ic) {
        let note = format!(
            "{}: the database cleanup was waived; {target} are left behind (drop them by hand when no longer needed)",
            annotations::SKIP_CLEANUP
        );
        apply::publish(ctx, ic, EventType::Warning, "CleanupWaived", note).await;
        return None;
    }
    let remaining = DEADLINE.saturating_sub(since_deletion(ic));
    let attempt = tokio::time::timeout(
        remaining.max(Duration::from_secs(1)),
        database::drop_database(&ctx.client, ic),
    )
    .await;
    let (why, hopeless) = match attempt {
        Ok(Ok(database::DropOutcome::Dropped(note))) => {
            apply::publish(ctx, ic, EventType::Normal, "DatabaseDropped", note).await;
            return None;
        }
        Ok(Ok(database::DropOutcome::Absent)) => return None,
        Ok(Ok(database::DropOutcome::NotOwned(note))) => {
            apply::publish(ctx, ic, EventType::Warning, "DatabaseNotOwned", note).await;
            return None;
        }
        // Without a usable admin Secret (deleted with the namespace, say)
        // no retry can succeed.
        Ok(Err(Failure::Database(e))) if e.class == ErrorClass::AdminSecretInvalid => {
            (e.to_string(), true)
        }
        Ok(Err(e)) => (e.to_string(), false),
        Err(_) => (format!("no answer within {}s", remaining.as_secs()), false),
    };
    let remaining = DEADLINE.saturating_sub(since_deletion(ic));
    if hopeless || remaining.is_zero() {
        let note = format!(
            "deletionPolicy Delete: could not drop {target} ({why}); they are left behind (drop them by hand)"
        );
        warn!(namespace = %ic.namespace().unwrap_or_default(), cluster = %ic.name_any(), %why, "database left behind");
        apply::publish(ctx, ic, EventType::Warning, "DatabaseLeftBehind", note).await;
        return None;
    }
    warn!(cluster = %ic.name_any(), %why, retry_in = ?remaining.min(RETRY), "dropping the database failed");
    Some(remaining.min(RETRY))
}

/// Time since the deletion request, on this operator's clock (a request
/// stamped in the future counts as just made).
fn since_deletion(ic: &IntegrationCluster) -> Duration {
    ic.metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| Duration::try_from(Timestamp::now().duration_since(t.0)).ok())
        .unwrap_or_default()
}
