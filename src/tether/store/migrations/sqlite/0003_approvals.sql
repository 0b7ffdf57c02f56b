-- Approval requests: a step waits here for a person's decision, across restarts.
CREATE TABLE approvals (
    id             TEXT PRIMARY KEY,
    run_id         TEXT NOT NULL,
    step           INTEGER NOT NULL,
    tenant         TEXT NOT NULL,
    principal_id   TEXT NOT NULL,
    on_behalf_of   TEXT,
    capability     TEXT NOT NULL,
    version        TEXT NOT NULL,
    args           BLOB NOT NULL,    -- canonical JSON, secrets masked
    preview        BLOB,             -- canonical JSON of the dry run's output
    digest         BLOB NOT NULL,    -- what a grant is bound to
    policy_version TEXT NOT NULL,
    rule_ids       TEXT NOT NULL,    -- JSON list
    reasons        TEXT NOT NULL,    -- JSON list
    approvers      TEXT NOT NULL,    -- JSON list of roles
    status         TEXT NOT NULL,    -- pending | approved | denied | expired | used
    created_at     INTEGER NOT NULL, -- microseconds since 1970-01-01 UTC
    expires_at     INTEGER NOT NULL,
    decided_by     TEXT,
    decided_at     INTEGER,
    note           TEXT
) STRICT;
CREATE INDEX approvals_by_digest ON approvals (tenant, principal_id, digest, created_at);
CREATE INDEX approvals_by_status ON approvals (status, created_at);
CREATE INDEX approvals_by_run ON approvals (run_id, created_at);
