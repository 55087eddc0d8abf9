-- Multi-node listener claims become leases, so the ledger is exactly-once
-- and not at-most-once: a claim is granted until claimed_until and
-- completed (completed_at) when the message was processed. An uncompleted
-- claim whose lease ran out (its node died mid-way) is granted again, to
-- any node, as the next attempt; a completed one is refused to everyone
-- until the agents prune it after the retention period.
ALTER TABLE integration_operator.listener_claims RENAME COLUMN node TO claimed_by;
ALTER TABLE integration_operator.listener_claims
    ADD COLUMN claimed_until timestamptz,
    ADD COLUMN completed_at  timestamptz,
    ADD COLUMN attempt       integer NOT NULL DEFAULT 1;
-- Before this migration a claim was final: such rows count as completed
-- (still refused, pruned after the retention like any completed row).
UPDATE integration_operator.listener_claims
   SET claimed_until = claimed_at, completed_at = claimed_at;
ALTER TABLE integration_operator.listener_claims
    ALTER COLUMN claimed_until SET NOT NULL;
-- Pruning finds old completed rows without reading the whole ledger.
CREATE INDEX listener_claims_completed
    ON integration_operator.listener_claims (completed_at)
    WHERE completed_at IS NOT NULL;
