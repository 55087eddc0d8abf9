//! Guaranteed-delivery work in the cluster database, as the node workflows
//! see it: how much unfinished work a node owns (a node is not removed while
//! it owns any), breaking the locks of nodes that are gone once
//! `lockBreakSeconds` passed (seed 003's `watt.server.tx.cluster.lockBreakSecs`),
//! and taking orphaned work over, each transaction by exactly one node.

use std::collections::BTreeMap;

use sqlx::PgPool;

/// Unfinished transactions per node, for the nodes asked about (nodes with
/// none are absent).
pub async fn unfinished_by_node(
    pool: &PgPool,
    nodes: &[String],
) -> Result<BTreeMap<String, u64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT owner_node, count(*) FROM integration_operator.gd_work
          WHERE state IN ('pending', 'running') AND owner_node = ANY($1)
          GROUP BY owner_node",
    )
    .bind(nodes.to_vec())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(node, n)| (node, u64::try_from(n).unwrap_or_default()))
        .collect())
}

/// What breaking locks did and what is still waiting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockBreak {
    /// Transactions released per former owner.
    pub released: BTreeMap<String, u64>,
    /// Seconds until the next lock of a gone node may be broken.
    pub next_in_seconds: Option<u64>,
}

/// Releases the unfinished work of every owner that is not in `live` once
/// its lock is older than `lock_break_seconds`; the work of `forced` nodes
/// (removed with the force annotation) at once. Released work is pending
/// with no owner, so [`take_over`] hands it to exactly one node.
pub async fn break_locks(
    pool: &PgPool,
    live: &[String],
    forced: &[String],
    lock_break_seconds: i64,
) -> Result<LockBreak, sqlx::Error> {
    let released: Vec<(String, i64)> = sqlx::query_as(
        "WITH gone AS (
             SELECT transaction_id, owner_node FROM integration_operator.gd_work
              WHERE state IN ('pending', 'running')
                AND owner_node IS NOT NULL
                AND NOT (owner_node = ANY($1))
                AND (owner_node = ANY($2)
                     OR locked_at IS NULL
                     OR locked_at <= now() - make_interval(secs => $3))
                FOR UPDATE SKIP LOCKED
         ), broken AS (
             UPDATE integration_operator.gd_work g
                SET owner_node = NULL, state = 'pending', locked_at = NULL,
                    attempts = g.attempts + 1, updated_at = now()
               FROM gone
              WHERE g.transaction_id = gone.transaction_id
          RETURNING gone.owner_node)
         SELECT owner_node, count(*) FROM broken GROUP BY owner_node",
    )
    .bind(live.to_vec())
    .bind(forced.to_vec())
    .bind(lock_break_seconds as f64)
    .fetch_all(pool)
    .await?;
    let next: Option<i64> = sqlx::query_scalar(
        "SELECT ceil(extract(epoch FROM min(locked_at) + make_interval(secs => $2) - now()))::bigint
           FROM integration_operator.gd_work
          WHERE state IN ('pending', 'running')
            AND owner_node IS NOT NULL
            AND NOT (owner_node = ANY($1))
            AND locked_at IS NOT NULL",
    )
    .bind(live.to_vec())
    .bind(lock_break_seconds as f64)
    .fetch_one(pool)
    .await?;
    Ok(LockBreak {
        released: released
            .into_iter()
            .map(|(node, n)| (node, u64::try_from(n).unwrap_or_default()))
            .collect(),
        next_in_seconds: next.map(|s| u64::try_from(s.max(1)).unwrap_or(1)),
    })
}

/// Takes up to `limit` ownerless pending transactions for `node`. Rows
/// locked by a concurrent taker are skipped, so each transaction goes to
/// exactly one node.
pub async fn take_over(pool: &PgPool, node: &str, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE integration_operator.gd_work
            SET owner_node = $1, state = 'running', locked_at = now(), updated_at = now()
          WHERE transaction_id IN (
                SELECT transaction_id FROM integration_operator.gd_work
                 WHERE owner_node IS NULL AND state = 'pending'
                 ORDER BY created_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)
      RETURNING transaction_id",
    )
    .bind(node.to_owned())
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Records the members as status shows them; returns whether anything
/// changed. Nodes no longer listed are deleted.
pub async fn record_members(
    pool: &PgPool,
    members: &[(String, String, String)],
) -> Result<bool, sqlx::Error> {
    let nodes: Vec<String> = members.iter().map(|m| m.0.clone()).collect();
    let hostnames: Vec<String> = members.iter().map(|m| m.1.clone()).collect();
    let states: Vec<String> = members.iter().map(|m| m.2.clone()).collect();
    let upserted = sqlx::query(
        "INSERT INTO integration_operator.cluster_members (node, logical_hostname, state)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
         ON CONFLICT (node) DO UPDATE
            SET logical_hostname = EXCLUDED.logical_hostname, state = EXCLUDED.state,
                updated_at = now()
          WHERE cluster_members.logical_hostname IS DISTINCT FROM EXCLUDED.logical_hostname
             OR cluster_members.state IS DISTINCT FROM EXCLUDED.state",
    )
    .bind(nodes.clone())
    .bind(hostnames)
    .bind(states)
    .execute(pool)
    .await?
    .rows_affected();
    let deleted =
        sqlx::query("DELETE FROM integration_operator.cluster_members WHERE NOT (node = ANY($1))")
            .bind(nodes)
            .execute(pool)
            .await?
            .rows_affected();
    Ok(upserted + deleted > 0)
}
