-- Limits and breakers, shared by every process on the file.
-- Amounts are decimal text (exact; never floats); times are microseconds since 1970-01-01 UTC.
CREATE TABLE limit_counters (        -- quotas, settled budget spend, retry budgets, call counts
    limit_id TEXT NOT NULL,
    scope    TEXT NOT NULL,          -- whose: a run id, tenant/principal, tenant, capability or *
    window   INTEGER NOT NULL,       -- the window's start; 0 for a run's lifetime
    value    TEXT NOT NULL,
    updated  INTEGER NOT NULL,
    PRIMARY KEY (limit_id, scope, window)
) STRICT, WITHOUT ROWID;

CREATE TABLE limit_holds (           -- budget reservations and concurrency leases, until settled or lapsed
    limit_id TEXT NOT NULL,
    scope    TEXT NOT NULL,
    window   INTEGER NOT NULL,
    run_id   TEXT NOT NULL,
    step     INTEGER NOT NULL,
    amount   TEXT NOT NULL,
    until    INTEGER NOT NULL,       -- a hold past this lapsed: its worker died or hung
    charged  INTEGER NOT NULL,       -- 1: a lapsed hold counts as spent (a budget's), 0: freed (a lease)
    PRIMARY KEY (limit_id, scope, window, run_id, step)
) STRICT, WITHOUT ROWID;

CREATE TABLE limit_rates (           -- GCRA state: the theoretical arrival time
    limit_id TEXT NOT NULL,
    scope    TEXT NOT NULL,
    tat      INTEGER NOT NULL,
    PRIMARY KEY (limit_id, scope)
) STRICT, WITHOUT ROWID;

CREATE TABLE breakers (
    id             TEXT PRIMARY KEY,
    state          TEXT NOT NULL,    -- closed | open | half_open
    since          INTEGER NOT NULL,
    generation     INTEGER NOT NULL,
    outcomes       TEXT NOT NULL,    -- recent calls (closed) or probe results (half-open)
    probes         INTEGER NOT NULL,
    probe_deadline INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
