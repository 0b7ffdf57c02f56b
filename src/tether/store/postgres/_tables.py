"""A PostgreSQL batch's limit and breaker rows, and which ones it needs.

`limit_keys` names the rows a batch's limit rules read, so the locked path can
lock and read them all in one round trip; `Tables` is the `LimitTables` the
rules then run on, over those rows; `counter_charges` tells whether a batch
only charges counters, which the one statement does itself (`tether_charge`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from psycopg import errors as pg_errors

from tether.store._base import Batch
from tether.store._breakers import (
    BreakerRow,
    BreakerState,
    decode_admits,
    encode_admits,
)
from tether.store._limits import LimitKind, Reserve
from tether.store._sql import breaker_row, breaker_values
from tether.store.postgres._connection import lock_key
from tether.store.postgres._pipeline import Statement, Writer

__all__ = [
    "BREAKER_COLUMNS",
    "LIMIT_COLUMNS",
    "SELECT_BREAKER",
    "SELECT_GROUP",
    "OutOfOrder",
    "Tables",
    "counter_charges",
    "limit_keys",
]

BREAKER_COLUMNS = "id, state, since, generation, outcomes, probes, probe_deadline"
_RULE_COLUMNS = f"{BREAKER_COLUMNS}, probe_admits, closed_at"
"""What the rules read and write of a breaker: `BREAKER_COLUMNS`, its
unanswered trial calls and when it last closed (which a store's plain reads of
breakers leave out)."""
LIMIT_COLUMNS = 'limit_id, scope, "window", holder, amount, until, charged'

SELECT_GROUP = (
    f"SELECT {LIMIT_COLUMNS} FROM limit_state "  # noqa: S608  # constant column list
    'WHERE limit_id=%s AND scope=%s AND "window"=%s'
)
SELECT_BREAKER = f"SELECT {_RULE_COLUMNS} FROM breakers WHERE id=%s"  # noqa: S608  # constant column list
_UPSERT_LIMIT = (
    f"INSERT INTO limit_state ({LIMIT_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s) "  # noqa: S608  # constant column list
    'ON CONFLICT (limit_id, scope, "window", holder) DO UPDATE SET '
    "amount=EXCLUDED.amount, until=EXCLUDED.until, charged=EXCLUDED.charged"
)


class OutOfOrder(pg_errors.SerializationFailure):
    """A late lock sorted below one held was taken by another transaction.

    A serialization failure, so the store's write rolls back and tries again
    (`Connected._run`), as it does when the server reports one.
    """


def _rule_row(r: Sequence[Any]) -> BreakerRow:
    """Decode a row read by `SELECT_BREAKER` (its id first)."""
    row = breaker_row(r[1:-2])
    row.probe_admits = decode_admits(r[-2])
    row.closed_at = r[-1]
    return row


def counter_charges(batch: Batch) -> list[tuple[Reserve, Decimal]] | None:
    """Return each reservation and its counter's gain when counters are all the batch limits.

    That is a read charged after it answers (`tether._guards.charged_after`):
    quotas, and budgets without a throttle, each settled by the same step in
    the same batch, in distinct groups, with no breaker, retry, claim, grant,
    approval or new run. On such a batch `apply_limits` admits when every
    counter has room, adds no events, and leaves each quota's counter plus its
    amount and each budget's counter plus its actual cost (the hold it adds,
    the settle drops), lapsed holds gone (the charged ones counted as spent):
    what `tether_charge` does in the server. None: the batch needs the locks.
    """
    if (
        not batch.reserve
        or batch.breaker is not None
        or batch.breaker_outcome is not None
        or batch.retry is not None
        or batch.claim is not None
        or batch.use_grant is not None
        or batch.approval is not None
        or batch.new_run is not None
    ):
        return None
    settled: dict[tuple[str, str, int], Decimal] = {}
    for s in batch.settle:
        group = (s.limit_id, s.scope, s.window)
        if (
            s.kind is not LimitKind.BUDGET
            or (s.run_id, s.step) != (batch.run_id, batch.step)
            or group in settled
        ):
            return None
        settled[group] = s.actual or Decimal(0)  # None: released, nothing spent
    charges: list[tuple[Reserve, Decimal]] = []
    seen: set[tuple[str, str, int]] = set()
    for r in batch.reserve:
        group = (r.limit_id, r.scope, r.window)
        if group in seen:
            return None  # two reservations of one group read the same counter
        seen.add(group)
        if r.kind is LimitKind.QUOTA:
            charges.append((r, r.amount))
        elif r.kind is LimitKind.BUDGET and not r.throttle_max_us and group in settled:
            charges.append((r, settled.pop(group)))
        else:
            return None
    return None if settled else charges  # left: a hold this batch did not take


def limit_keys(batch: Batch) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Return the limit groups and breakers a batch reads, sorted."""
    groups: set[tuple[str, str, int]] = set()
    breakers: set[str] = set()
    for r in batch.reserve:
        groups.add((r.limit_id, r.scope, 0 if r.kind is LimitKind.RATE else r.window))
    for s in batch.settle:
        groups.add((s.limit_id, s.scope, s.window))
    retry = batch.retry
    if retry is not None:
        for limit_id, scope, _ in retry.counters:
            groups.add((limit_id, scope, 0))
        groups.add((retry.ratio_id, "*", retry.window))
        groups.add((retry.ratio_id + ":calls", "*", retry.window))
        if retry.breaker is not None:
            breakers.add(retry.breaker.id)
    if batch.breaker is not None:
        breakers.add(batch.breaker.spec.id)
    if batch.breaker_outcome is not None:
        breakers.add(batch.breaker_outcome.spec.id)
    return sorted(groups), sorted(breakers)


@dataclass(slots=True)
class _Row:
    amount: Decimal
    until: int
    charged: bool


_Key = tuple[str, str, int, str]


class Tables:
    """`LimitTables` over rows read under the batch's locks; writes are queued.

    The batch's advisory locks make these rows this transaction's own until it
    ends, so the copies read once stay true: every change lands in the copy and
    in a queue of final row states, written with the batch.
    """

    __slots__ = (
        "breakers",
        "dirty",
        "dirty_breakers",
        "groups",
        "schema",
        "top",
        "w",
    )

    def __init__(self, schema: str, w: Writer) -> None:
        self.schema = schema
        """The store's schema, which its advisory lock keys name."""
        self.w = w
        self.groups: dict[tuple[str, str, int], dict[str, _Row]] = {}
        self.breakers: dict[str, BreakerRow | None] = {}
        self.dirty: dict[_Key, _Row | None] = {}
        """Rows to write (None: to delete), by key."""
        self.dirty_breakers: set[str] = set()
        self.top: int | None = None
        """The highest advisory lock key the transaction holds, once known
        (None: not yet; taken to be the highest of the foreseen groups' and
        breakers' keys)."""

    def load_limits(self, rows: Iterable[Sequence[Any]]) -> None:
        """Keep `limit_state` rows read in `LIMIT_COLUMNS` order."""
        for lid, scope, window, holder, amount, until, charged in rows:
            self.groups.setdefault((lid, scope, window), {})[holder] = _Row(
                amount, until, charged
            )

    def load_breakers(self, rows: Iterable[Sequence[Any]]) -> None:
        """Keep `breakers` rows read by `SELECT_BREAKER`."""
        for r in rows:
            self.breakers[r[0]] = _rule_row(r)

    def _group(self, limit_id: str, scope: str, window: int) -> dict[str, _Row]:
        key = (limit_id, scope, window)
        group = self.groups.get(key)
        if group is None:
            # Not foreseen by limit_keys: lock and read it now (a round trip).
            self._lock(lock_key(self.schema, "limit", limit_id, scope, str(window)))
            group = self.groups[key] = {}
            self.load_limits(self.w.conn.execute(SELECT_GROUP, key).fetchall())
        return group

    def _lock(self, key: int) -> None:
        """Take the advisory lock `key` late, in the locked path's global order.

        The batch's locks were taken sorted; a lock taken now is waited for
        only when it sorts above every lock held, so no two transactions wait
        for each other. One below is only tried: if another transaction holds
        it, waiting could close a cycle, so this transaction gives way instead
        (a serialization failure: its write rolls back and is tried again).
        """
        top = self.top
        if top is None:
            top = max(
                [
                    *(
                        lock_key(self.schema, "limit", *map(str, g))
                        for g in self.groups
                    ),
                    *(lock_key(self.schema, "breaker", b) for b in self.breakers),
                ],
                default=None,
            )
        conn = self.w.conn
        if top is None or key > top:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            self.top = key
            return
        row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()
        if row is None or not row[0]:
            raise OutOfOrder(
                "a limit or breaker lock the batch did not foresee is held by "
                "another transaction; rolled back rather than wait out of order"
            )
        self.top = top

    def _put(self, key: tuple[str, str, int], holder: str, row: _Row | None) -> None:
        group = self._group(*key)
        if row is None:
            group.pop(holder, None)
        else:
            group[holder] = row
        self.dirty[(*key, holder)] = row

    def flush(self, q: Statement) -> None:
        """Add the final state of every changed row to the batch's statement."""
        for i, ((limit_id, scope, window, holder), r) in enumerate(self.dirty.items()):
            if r is None:
                q.add(
                    f"l{i}",
                    "DELETE FROM limit_state WHERE limit_id=%s AND scope=%s "
                    'AND "window"=%s AND holder=%s',
                    (limit_id, scope, window, holder),
                )
            else:
                q.add(
                    f"l{i}",
                    _UPSERT_LIMIT,
                    (limit_id, scope, window, holder, r.amount, r.until, r.charged),
                )
        for i, breaker_id in enumerate(sorted(self.dirty_breakers)):
            row = self.breakers[breaker_id]
            assert row is not None
            q.add(
                f"b{i}",
                f"INSERT INTO breakers ({_RULE_COLUMNS}) VALUES "  # noqa: S608  # constant column list
                "(%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE SET "
                "state=EXCLUDED.state, since=EXCLUDED.since, "
                "generation=EXCLUDED.generation, outcomes=EXCLUDED.outcomes, "
                "probes=EXCLUDED.probes, probe_deadline=EXCLUDED.probe_deadline, "
                "probe_admits=EXCLUDED.probe_admits, closed_at=EXCLUDED.closed_at",
                (
                    *breaker_values(breaker_id, row),
                    encode_admits(row.probe_admits),
                    row.closed_at,
                ),
            )

    # -- LimitTables ----------------------------------------------------------------

    def counter(self, limit_id: str, scope: str, window: int) -> Decimal:
        row = self._group(limit_id, scope, window).get("")
        return Decimal(0) if row is None else row.amount

    def set_counter(
        self, limit_id: str, scope: str, window: int, value: Decimal, now: int
    ) -> None:
        self._put((limit_id, scope, window), "", _Row(value, 0, False))

    def add_to_counter(
        self, limit_id: str, scope: str, window: int, delta: Decimal, now: int
    ) -> None:
        # Exact: the batch's lock holds the row, so read-then-write is safe.
        value = self.counter(limit_id, scope, window) + delta
        self.set_counter(limit_id, scope, window, value, now)

    def usage(
        self, limit_id: str, scope: str, window: int, now: int
    ) -> tuple[Decimal, Decimal, int]:
        group = self._group(limit_id, scope, window)
        used, total, count, lapsed = Decimal(0), Decimal(0), 0, None
        gone = []
        for holder, row in group.items():
            if holder == "":
                used = row.amount
            elif row.until > now:
                total += row.amount
                count += 1
            else:
                lapsed = (lapsed or Decimal(0)) + (row.amount if row.charged else 0)
                if holder != "~":
                    gone.append(holder)
        if lapsed is not None:  # a crashed or hung worker's hold comes back by itself
            for holder in gone:
                self._put((limit_id, scope, window), holder, None)
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
        self._put(
            (limit_id, scope, window), f"{run_id}/{step}", _Row(amount, until, charged)
        )

    def drop_hold(
        self, limit_id: str, scope: str, window: int, run_id: str, step: int
    ) -> bool:
        holder = f"{run_id}/{step}"
        if holder not in self._group(limit_id, scope, window):
            return False
        self._put((limit_id, scope, window), holder, None)
        return True

    def tat(self, limit_id: str, scope: str) -> int | None:
        row = self._group(limit_id, scope, 0).get("~")
        return None if row is None else row.until

    def set_tat(self, limit_id: str, scope: str, tat: int) -> None:
        self._put((limit_id, scope, 0), "~", _Row(Decimal(0), tat, False))

    def _breaker(self, breaker_id: str) -> BreakerRow | None:
        if breaker_id not in self.breakers:
            # Not foreseen by limit_keys: lock and read it now (a round trip).
            self._lock(lock_key(self.schema, "breaker", breaker_id))
            found = self.w.conn.execute(SELECT_BREAKER, (breaker_id,)).fetchone()
            self.breakers[breaker_id] = None if found is None else _rule_row(found)
        return self.breakers[breaker_id]

    def breaker(self, breaker_id: str) -> BreakerRow:
        row = self._breaker(breaker_id)
        # A copy: the rules change the rows they are given.
        return BreakerRow() if row is None else replace(row)

    def set_breaker(self, breaker_id: str, row: BreakerRow) -> None:
        self.breakers[breaker_id] = replace(row)
        self.dirty_breakers.add(breaker_id)

    def push_sample(
        self, breaker_id: str, code: str, window: int, min_calls: int, generation: int
    ) -> bool:
        row = self._breaker(breaker_id)
        if (
            row is None
            or row.state is not BreakerState.CLOSED
            or row.generation != generation
        ):
            return False
        if len(row.outcomes) == min_calls - 1:
            return False
        pushed = (row.outcomes + code)[-window:]
        # A full window of successes stays the same: a healthy upstream's
        # breaker is read, never written.
        if pushed != row.outcomes:
            self.set_breaker(breaker_id, replace(row, outcomes=pushed))
        return True
