-- Limits and breakers, shared by every process on the file.
-- Amounts are decimal text (exact; never floats); times are microseconds since 1970-01-01 UTC.
--
-- One table holds every limit's counter, holds and rate state, keyed so that a
-- counter and its holds sit side by side: a step's reservation and its
-- settlement then dirty one page, not one per table (each page is a WAL frame
-- written at every commit; benchmarks/limits.py measures it).
CREATE TABLE limit_state (
    limit_id TEXT NOT NULL,
    scope    TEXT NOT NULL,          -- whose: a run id, tenant/principal, tenant, capability or *
    window   INTEGER NOT NULL,       -- the window's start; 0 for a run's lifetime (or no window)
    holder   TEXT NOT NULL,          -- '' the counter; 'run_id/step' a hold; '~' a rate's state
    amount   TEXT NOT NULL,          -- the counter's value, or the hold's amount
    until    INTEGER NOT NULL,       -- a hold: when it lapses (its worker died or hung),
                                     -- a rate: its theoretical arrival time (GCRA)
    charged  INTEGER NOT NULL,       -- a hold: 1 if it counts as spent when it lapses (a budget's)
    PRIMARY KEY (limit_id, scope, window, holder)
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
