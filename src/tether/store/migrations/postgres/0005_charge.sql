-- A read whose limits only count (quotas, and budgets without a throttle) is
-- charged after it answers, in the write that records it. That write is one
-- statement: it calls this function first (the run's fence depends on its
-- answer), which does in the server what the limit rules (tether.store._limits)
-- do to such a batch, and raises TT002 when a counter has no room. Nothing of
-- the statement is then written, and the caller takes the locked path, which
-- says exactly what is left.
--
-- It takes the locked path's advisory locks, in the same sorted order, before
-- it reads. Being VOLATILE, each statement in it takes a new snapshot at READ
-- COMMITTED, so its reads see every write committed before the locks were
-- granted (the calling statement's own snapshot, taken before, would not).
CREATE FUNCTION tether_charge(
    locks       bigint[],   -- the groups' advisory lock keys, sorted
    limit_ids   text[],     -- a group per element: (limit_id, scope, "window")
    scopes      text[],
    windows     bigint[],
    budgets     boolean[],  -- a budget; else a quota
    amounts     numeric[],  -- what the step takes (checked against the cap)
    caps        numeric[],
    deltas      numeric[],  -- what the counter gains: a quota's amount, a budget's actual cost
    step_holder text,       -- the step's own hold, 'run_id/step': a budget adds then drops it
    now_us      bigint
) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    k      bigint;
    i      integer;
    used   numeric;  -- the counter
    held   numeric;  -- live holds
    lapsed numeric;  -- lapsed holds that were charged: spent
    stale  boolean;  -- a hold to delete: a lapsed one, or the step's own
BEGIN
    FOREACH k IN ARRAY locks LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
    FOR i IN 1 .. cardinality(limit_ids) LOOP
        SELECT coalesce(sum(amount) FILTER (WHERE holder = ''), 0),
               coalesce(sum(amount) FILTER (WHERE holder <> '' AND until > now_us), 0),
               coalesce(sum(amount) FILTER (
                   WHERE holder <> '' AND until <= now_us AND charged), 0),
               coalesce(bool_or(holder NOT IN ('', '~')
                                AND (until <= now_us OR holder = step_holder)), false)
          INTO used, held, lapsed, stale
          FROM limit_state
         WHERE limit_id = limit_ids[i] AND scope = scopes[i] AND "window" = windows[i];
        IF NOT budgets[i] THEN  -- a quota reads its counter only
            held := 0;
            lapsed := 0;
            stale := false;
        END IF;
        IF used + lapsed + held + amounts[i] > caps[i] THEN
            RAISE EXCEPTION 'tether: limit % has no room', limit_ids[i]
                USING ERRCODE = 'TT002', HINT = limit_ids[i];
        END IF;
        IF stale THEN
            DELETE FROM limit_state
             WHERE limit_id = limit_ids[i] AND scope = scopes[i] AND "window" = windows[i]
               AND holder NOT IN ('', '~') AND (until <= now_us OR holder = step_holder);
        END IF;
        IF NOT budgets[i] OR lapsed <> 0 OR deltas[i] <> 0 THEN
            INSERT INTO limit_state (limit_id, scope, "window", holder, amount, until, charged)
            VALUES (limit_ids[i], scopes[i], windows[i], '', used + lapsed + deltas[i], 0, false)
            ON CONFLICT (limit_id, scope, "window", holder) DO UPDATE SET
                amount = EXCLUDED.amount, until = EXCLUDED.until, charged = EXCLUDED.charged;
        END IF;
    END LOOP;
    RETURN true;
END
$$;
