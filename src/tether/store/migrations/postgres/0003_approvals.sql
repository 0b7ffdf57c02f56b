-- Approval requests: a step waits here for a person's decision, across restarts.
CREATE TABLE approvals (
    id             text COLLATE "C" PRIMARY KEY,
    run_id         text NOT NULL,
    step           integer NOT NULL,
    tenant         text NOT NULL,
    principal_id   text NOT NULL,
    on_behalf_of   text,
    capability     text NOT NULL,
    version        text NOT NULL,
    args           bytea NOT NULL,   -- canonical JSON, secrets masked
    preview        bytea,            -- canonical JSON of the dry run's output
    digest         bytea NOT NULL,   -- what a grant is bound to
    policy_version text NOT NULL,
    rule_ids       text NOT NULL,    -- JSON list
    reasons        text NOT NULL,    -- JSON list
    approvers      text NOT NULL,    -- JSON list of roles
    status         text NOT NULL,    -- pending | approved | denied | expired | used
    created_at     bigint NOT NULL,  -- microseconds since 1970-01-01 UTC
    expires_at     bigint NOT NULL,
    decided_by     text,
    decided_at     bigint,
    note           text
);
CREATE INDEX approvals_by_digest ON approvals (tenant, principal_id, digest, created_at);
CREATE INDEX approvals_by_status ON approvals (status, created_at);
CREATE INDEX approvals_by_run ON approvals (run_id, created_at);
