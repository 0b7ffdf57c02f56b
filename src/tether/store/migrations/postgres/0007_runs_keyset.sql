-- Runs are listed, and walked page by page, in (created_at, run_id) order:
-- a page starts at the last row of the one before (keyset paging). Workers
-- walk the runs of each parked or orphanable state (`Tether.ready_runs`), so
-- the status index ends in run_id too, as runs_by_created does: each page is
-- one range of it, with no sort.
DROP INDEX runs_by_status;
CREATE INDEX runs_by_status ON runs (status, created_at DESC, run_id DESC);
