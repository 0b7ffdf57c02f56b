"""The memory store's limit and breaker tables: `LimitTables` in dicts.

`MemoryStore` keeps one `MemoryTables` and hands it to the limit rules under
its lock; a batch the rules refuse is undone by putting back the snapshot taken
before it, which is why no row is ever changed in place.
"""

from __future__ import annotations

from decimal import Decimal

from tether.store._breakers import BreakerRow
from tether.store._rows import LimitRow
from tether.store._time import from_us

__all__ = ["MemoryTables"]


class MemoryTables:
    """`LimitTables` in dicts (copied before a batch, restored if it is refused)."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str, int], Decimal] = {}
        self.holds_: dict[
            tuple[str, str, int, str, int], tuple[Decimal, int, bool]
        ] = {}
        self.rates: dict[tuple[str, str], int] = {}
        self.breakers: dict[str, BreakerRow] = {}

    def counter(self, limit_id: str, scope: str, window: int) -> Decimal:
        return self.counters.get((limit_id, scope, window), Decimal(0))

    def set_counter(
        self, limit_id: str, scope: str, window: int, value: Decimal, now: int
    ) -> None:
        self.counters[(limit_id, scope, window)] = value

    def add_to_counter(
        self, limit_id: str, scope: str, window: int, delta: Decimal, now: int
    ) -> None:
        key = (limit_id, scope, window)
        self.counters[key] = self.counters.get(key, Decimal(0)) + delta

    def snapshot(self) -> MemoryTables:
        """Return a copy to restore if a batch is refused (rows are never changed in place)."""
        copied = MemoryTables()
        copied.counters = dict(self.counters)
        copied.holds_ = dict(self.holds_)
        copied.rates = dict(self.rates)
        copied.breakers = dict(self.breakers)
        return copied

    def usage(
        self, limit_id: str, scope: str, window: int, now: int
    ) -> tuple[Decimal, Decimal, int]:
        total, count = Decimal(0), 0
        for key, (amount, until, charged) in list(self.holds_.items()):
            if key[:3] != (limit_id, scope, window):
                continue
            if until > now:
                total += amount
                count += 1
            else:
                del self.holds_[key]
                if charged:
                    self.add_to_counter(limit_id, scope, window, amount, now)
        return self.counter(limit_id, scope, window), total, count

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
        self.holds_[(limit_id, scope, window, run_id, step)] = (amount, until, charged)

    def drop_hold(
        self, limit_id: str, scope: str, window: int, run_id: str, step: int
    ) -> bool:
        return (
            self.holds_.pop((limit_id, scope, window, run_id, step), None) is not None
        )

    def tat(self, limit_id: str, scope: str) -> int | None:
        return self.rates.get((limit_id, scope))

    def set_tat(self, limit_id: str, scope: str, tat: int) -> None:
        self.rates[(limit_id, scope)] = tat

    def breaker(self, breaker_id: str) -> BreakerRow:
        row = self.breakers.get(breaker_id)
        return BreakerRow() if row is None else row.copy()

    def set_breaker(self, breaker_id: str, row: BreakerRow) -> None:
        self.breakers[breaker_id] = row.copy()

    def push_sample(
        self, breaker_id: str, code: str, window: int, min_calls: int, generation: int
    ) -> bool:
        row = self.breakers.get(breaker_id)
        if (
            row is None
            or row.generation != generation
            or row.state != "closed"
            or len(row.outcomes) == min_calls - 1
        ):
            return False
        row = row.copy()  # never in place: a snapshot may share the old row
        row.outcomes = (row.outcomes + code)[-window:]
        self.breakers[breaker_id] = row
        return True

    def limit_rows(self, at: int) -> list[LimitRow]:
        """Return every counter and live lease set at `at` (for `Store.limit_rows`)."""
        rows: dict[tuple[str, str, int], tuple[Decimal, Decimal, int]] = {
            k: (v, Decimal(0), 0) for k, v in self.counters.items()
        }
        for (lid, scope, window, _run, _step), (
            amount,
            until,
            charged,
        ) in self.holds_.items():
            if until <= at and charged:  # spent: folded in at the next reserve
                used, held, count = rows.get(
                    (lid, scope, window), (Decimal(0), Decimal(0), 0)
                )
                rows[(lid, scope, window)] = (used + amount, held, count)
            elif until > at:
                used, held, count = rows.get(
                    (lid, scope, window), (Decimal(0), Decimal(0), 0)
                )
                rows[(lid, scope, window)] = (used, held + amount, count + 1)
        return [
            LimitRow(
                limit_id=lid,
                scope=scope,
                window=from_us(window) if window else None,
                used=used,
                held=held,
                holds=count,
            )
            for (lid, scope, window), (used, held, count) in sorted(rows.items())
        ]
