-- A half-open breaker keeps when each unanswered trial call was let through
-- (µs, space-separated, in that order), so that when one answers the probe
-- deadline moves on to the oldest one still out (RELIABILITY D.27).
ALTER TABLE breakers ADD COLUMN probe_admits text NOT NULL DEFAULT '';
