-- Runs are listed, and walked page by page, in (created_at, run_id) order:
-- a page starts at the last row of the one before (keyset paging), so both
-- indexes end in run_id, which makes the order unique. Workers walk the runs
-- of each parked or orphanable state (`Tether.ready_runs`): by status first.
DROP INDEX runs_by_created;
CREATE INDEX runs_by_created ON runs (created_at DESC, run_id DESC);
CREATE INDEX runs_by_status ON runs (status, created_at DESC, run_id DESC);
