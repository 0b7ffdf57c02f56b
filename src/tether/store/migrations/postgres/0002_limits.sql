-- Limits and breakers, shared by every worker on the database.
-- Amounts are exact numerics (never floats); times are microseconds since 1970-01-01 UTC.
--
-- One table holds every limit's counter, holds and rate state, as on SQLite. A
-- writer takes a transaction-scoped advisory lock on each (limit, scope,
-- window) it changes before it reads them, so the counter and its holds,
-- including rows that do not exist yet, change under one lock.
CREATE TABLE limit_state (
    limit_id text NOT NULL,
    scope    text NOT NULL,          -- whose: a run id, tenant/principal, tenant, capability or *
    "window" bigint NOT NULL,        -- the window's start; 0 for a run's lifetime (or no window)
    holder   text NOT NULL,          -- '' the counter; 'run_id/step' a hold; '~' a rate's state
    amount   numeric NOT NULL,       -- the counter's value, or the hold's amount
    until    bigint NOT NULL,        -- a hold: when it lapses (its worker died or hung),
                                     -- a rate: its theoretical arrival time (GCRA)
    charged  boolean NOT NULL,       -- a hold: counts as spent when it lapses (a budget's)
    PRIMARY KEY (limit_id, scope, "window", holder)
);

CREATE TABLE breakers (
    id             text PRIMARY KEY,
    state          text NOT NULL,    -- closed | open | half_open
    since          bigint NOT NULL,
    generation     bigint NOT NULL,
    outcomes       text NOT NULL,    -- recent calls (closed) or probe results (half-open)
    probes         integer NOT NULL,
    probe_deadline bigint NOT NULL
);
