-- Runs, their hash-chained events and idempotency keys.
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,  -- compact key for events; run_id is the public id
    run_id       TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    principal_id TEXT NOT NULL,
    request      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    epoch        INTEGER NOT NULL,   -- lease epoch: every write for the run checks it
    head_seq     INTEGER NOT NULL,   -- last event's seq (0: none yet)
    head_hash    BLOB NOT NULL,      -- last event's hash
    head_sig     BLOB,               -- HMAC of the head with the record key
    error_code   TEXT
) STRICT;
CREATE INDEX runs_by_created ON runs (created_at DESC);

-- Keyed by the integer run key: a text key in every event row costs a third
-- more per commit (measured in benchmarks/call_path.py's setup notes).
CREATE TABLE events (
    run    INTEGER NOT NULL REFERENCES runs (id),
    seq    INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    step   INTEGER,
    body   BLOB NOT NULL,            -- canonical JSON
    hash   BLOB NOT NULL,            -- sha256(previous hash, seq, body)
    PRIMARY KEY (run, seq)
) STRICT, WITHOUT ROWID;

CREATE TABLE idempotency_keys (
    tenant       TEXT NOT NULL,
    principal_id TEXT NOT NULL,
    capability   TEXT NOT NULL,
    key          TEXT NOT NULL,
    fingerprint  BLOB NOT NULL,      -- keyed hash of the canonical args
    state        TEXT NOT NULL,      -- in_progress | completed | failed | in_doubt
    run_id       TEXT NOT NULL,
    step         INTEGER NOT NULL,
    output       BLOB,               -- canonical JSON of the result (completed only)
    claimed_at   INTEGER NOT NULL,   -- microseconds since 1970-01-01 UTC
    lease_until  INTEGER NOT NULL,   -- an in-progress claim older than this is stale
    completed_at INTEGER,
    PRIMARY KEY (tenant, principal_id, capability, key)
) STRICT, WITHOUT ROWID;
