-- When a breaker last closed after an outage (µs; 0: never, or before this
-- column): a grant its escalation made before then, given back after, comes
-- back expired even if the breaker has opened again since.
ALTER TABLE breakers ADD COLUMN closed_at INTEGER NOT NULL DEFAULT 0;
