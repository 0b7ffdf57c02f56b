-- Runs, their hash-chained events and idempotency keys.
-- Ids are COLLATE "C": a prefix lookup is a range scan of the unique index,
-- and runs sort by bytes, as on SQLite, whatever the database's locale.
CREATE TABLE runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- compact key for events
    run_id       text COLLATE "C" NOT NULL UNIQUE,
    status       text NOT NULL,
    tenant       text NOT NULL,
    principal_id text NOT NULL,
    request      text NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    epoch        bigint NOT NULL,    -- lease epoch: every write for the run checks it
    head_seq     bigint NOT NULL,    -- last event's seq (0: none yet)
    head_hash    bytea NOT NULL,     -- last event's hash
    head_sig     bytea,              -- HMAC of the head with the record key
    error_code   text
);
CREATE INDEX runs_by_created ON runs (created_at DESC, run_id DESC);
-- Workers look for parked and orphaned runs by status.
CREATE INDEX runs_by_status ON runs (status, created_at DESC);

CREATE TABLE events (
    run    bigint NOT NULL REFERENCES runs (id),
    seq    bigint NOT NULL,
    kind   text NOT NULL,
    step   integer,
    body   bytea NOT NULL,           -- canonical JSON
    hash   bytea NOT NULL,           -- sha256(previous hash, seq, body)
    PRIMARY KEY (run, seq)
);

CREATE TABLE idempotency_keys (
    tenant       text NOT NULL,
    principal_id text NOT NULL,
    capability   text NOT NULL,
    key          text NOT NULL,
    fingerprint  bytea NOT NULL,     -- keyed hash of the canonical args
    state        text NOT NULL,      -- in_progress | completed | failed | in_doubt
    run_id       text NOT NULL,
    step         integer NOT NULL,
    output       bytea,              -- canonical JSON of the result (completed only)
    claimed_at   bigint NOT NULL,    -- microseconds since 1970-01-01 UTC
    lease_until  bigint NOT NULL,    -- an in-progress claim older than this is stale
    completed_at bigint,
    PRIMARY KEY (tenant, principal_id, capability, key)
);

-- Turns a failed check into an error inside a pipelined batch: the server then
-- skips the rest of the batch, its COMMIT included, so a write whose fence or
-- claim failed costs no extra round trip and leaves nothing behind.
CREATE FUNCTION tether_require(ok boolean, what text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'tether: % failed', what USING ERRCODE = 'TT001', HINT = what;
    END IF;
    RETURN true;
END
$$;
