-- Tables the operator and the in-pod agents share in each cluster's
-- database, in the schema integration_operator (the servers' own tables live
-- in the per-component schemas).

-- The cluster's members as the operator last recorded them.
CREATE TABLE integration_operator.cluster_members (
    node             text PRIMARY KEY,
    logical_hostname text        NOT NULL,
    state            text        NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Guaranteed-delivery work and the node that owns it. A node holds a lock
-- on a transaction while it works on it (locked_at is refreshed); a node
-- being removed is not deleted while it owns unfinished work, and the locks
-- of a node that is gone are broken after lockBreakSeconds so that another
-- node takes the work over.
CREATE TABLE integration_operator.gd_work (
    transaction_id text PRIMARY KEY,
    owner_node     text,
    state          text        NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'running', 'done', 'failed')),
    locked_at      timestamptz,
    attempts       integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gd_work_unfinished_by_owner
    ON integration_operator.gd_work (owner_node)
    WHERE state IN ('pending', 'running');

-- Exactly-once claims of multi-node listeners: the first node to insert a
-- (listener, message id) pair processes the message; redeliveries find it.
CREATE TABLE integration_operator.listener_claims (
    listener   text        NOT NULL,
    message_id text        NOT NULL,
    node       text        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (listener, message_id)
);
