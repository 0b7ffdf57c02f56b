-- A run's lease: every write for the run renews it. A run whose writer died
-- (its lease ran out while it was executing or planning) may be taken over by
-- a worker, which bumps the epoch so the dead writer, if it was only slow, is
-- refused.
ALTER TABLE runs ADD COLUMN lease_until bigint NOT NULL DEFAULT 0;
