"""`LimitTables` on SQLite: the limit and breaker rows, inside a write's transaction.

The transaction's file lock is the only lock the rules need: each method reads
or writes its rows directly, and whole-number counters are added by SQLite in
one statement.
"""

from __future__ import annotations

import sqlite3
from decimal import Decimal

from tether.store._breakers import BreakerRow, decode_admits, encode_admits
from tether.store._sql import breaker_row, breaker_values

__all__ = ["Tables"]

_EXACT_INT = 10**17
"""Below this, integer sums stay exact in SQLite's 64-bit integers."""


class Tables:
    """`LimitTables` over a connection inside the caller's transaction."""

    __slots__ = ("con",)

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def counter(self, limit_id: str, scope: str, window: int) -> Decimal:
        row = self.con.execute(
            "SELECT amount FROM limit_state WHERE limit_id=? AND scope=? AND window=? "
            "AND holder=''",
            (limit_id, scope, window),
        ).fetchone()
        return Decimal(0) if row is None else Decimal(row[0])

    def set_counter(
        self, limit_id: str, scope: str, window: int, value: Decimal, now: int
    ) -> None:
        self.con.execute(
            "INSERT INTO limit_state (limit_id, scope, window, holder, amount, until, "
            "charged) VALUES (?,?,?,'',?,0,0) ON CONFLICT DO UPDATE "
            "SET amount=excluded.amount",
            (limit_id, scope, window, str(value)),
        )

    def add_to_counter(
        self, limit_id: str, scope: str, window: int, delta: Decimal, now: int
    ) -> None:
        # Whole amounts (cents, counts: the common case) are added by SQLite in
        # one statement, exactly in 64-bit integers; a decimal anywhere (in the
        # delta or the stored value) is added by Python, read then written.
        if delta == delta.to_integral_value() and 0 <= delta < _EXACT_INT:
            cur = self.con.execute(
                "INSERT INTO limit_state (limit_id, scope, window, holder, amount, "
                "until, charged) VALUES (?,?,?,'',?,0,0) ON CONFLICT DO UPDATE SET "
                "amount=CAST(CAST(amount AS INTEGER) + CAST(excluded.amount AS INTEGER) "
                "AS TEXT) WHERE amount GLOB '[0-9]*' AND NOT amount GLOB '*[^0-9]*' "
                "AND length(amount) < 18",
                (limit_id, scope, window, str(int(delta))),
            )
            if cur.rowcount == 1:
                return
        value = self.counter(limit_id, scope, window) + delta
        self.set_counter(limit_id, scope, window, value, now)

    def usage(
        self, limit_id: str, scope: str, window: int, now: int
    ) -> tuple[Decimal, Decimal, int]:
        # One statement, one page: the counter and its holds sit side by side.
        rows = self.con.execute(
            "SELECT holder, amount, until, charged FROM limit_state "
            "WHERE limit_id=? AND scope=? AND window=?",
            (limit_id, scope, window),
        ).fetchall()
        used, total, count, lapsed = Decimal(0), Decimal(0), 0, None
        for holder, amount, until, charged in rows:
            if holder == "":
                used = Decimal(amount)
            elif until > now:
                total += Decimal(amount)
                count += 1
            else:
                lapsed = (lapsed or Decimal(0)) + (Decimal(amount) if charged else 0)
        if lapsed is not None:  # a crashed or hung worker's hold comes back by itself
            self.con.execute(
                "DELETE FROM limit_state WHERE limit_id=? AND scope=? AND window=? "
                "AND holder NOT IN ('', '~') AND until <= ?",
                (limit_id, scope, window, now),
            )
            if lapsed:
                used += lapsed
                self.set_counter(limit_id, scope, window, used, now)
        return used, total, count

    def add_hold(
        self,
        limit_id: str,
        scope: str,
        window: int,
        run_id: str,
        step: int,
        amount: Decimal,
        until: int,
        *,
        charged: bool,
    ) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO limit_state (limit_id, scope, window, holder, "
            "amount, until, charged) VALUES (?,?,?,?,?,?,?)",
            (
                limit_id,
                scope,
                window,
                f"{run_id}/{step}",
                str(amount),
                until,
                int(charged),
            ),
        )

    def drop_hold(
        self, limit_id: str, scope: str, window: int, run_id: str, step: int
    ) -> bool:
        cur = self.con.execute(
            "DELETE FROM limit_state WHERE limit_id=? AND scope=? AND window=? "
            "AND holder=?",
            (limit_id, scope, window, f"{run_id}/{step}"),
        )
        return cur.rowcount == 1

    def tat(self, limit_id: str, scope: str) -> int | None:
        row = self.con.execute(
            "SELECT until FROM limit_state WHERE limit_id=? AND scope=? AND window=0 "
            "AND holder='~'",
            (limit_id, scope),
        ).fetchone()
        return None if row is None else int(row[0])

    def set_tat(self, limit_id: str, scope: str, tat: int) -> None:
        self.con.execute(
            "INSERT INTO limit_state (limit_id, scope, window, holder, amount, until, "
            "charged) VALUES (?,?,0,'~','',?,0) ON CONFLICT DO UPDATE "
            "SET until=excluded.until",
            (limit_id, scope, tat),
        )

    def breaker(self, breaker_id: str) -> BreakerRow:
        row = self.con.execute(
            "SELECT state, since, generation, outcomes, probes, probe_deadline, "
            "probe_admits, closed_at FROM breakers WHERE id=?",
            (breaker_id,),
        ).fetchone()
        if row is None:
            return BreakerRow()
        found = breaker_row(row[:-2])
        found.probe_admits = decode_admits(row[-2])
        found.closed_at = row[-1]
        return found

    def set_breaker(self, breaker_id: str, row: BreakerRow) -> None:
        self.con.execute(
            "INSERT OR REPLACE INTO breakers (id, state, since, generation, outcomes, "
            "probes, probe_deadline, probe_admits, closed_at) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (
                *breaker_values(breaker_id, row),
                encode_admits(row.probe_admits),
                row.closed_at,
            ),
        )

    def push_sample(
        self, breaker_id: str, code: str, window: int, min_calls: int, generation: int
    ) -> bool:
        row = self.con.execute(
            "SELECT state, generation, outcomes FROM breakers WHERE id=?",
            (breaker_id,),
        ).fetchone()
        if row is None or row[0] != "closed" or row[1] != generation:
            return False
        outcomes: str = row[2]
        if len(outcomes) == min_calls - 1:
            return False
        pushed = (outcomes + code)[-window:]
        # A full window of successes stays the same: a healthy upstream's
        # breaker is read, never written.
        if pushed != outcomes:
            self.con.execute(
                "UPDATE breakers SET outcomes=? WHERE id=?", (pushed, breaker_id)
            )
        return True
