"""Limits as the store keeps them: commands, and the rules applied to them.

The call path sends `Reserve` and `Settle` commands (with a breaker's
`BreakerAdmit` and `BreakerOutcome`, see `tether.store._breakers`) inside a
run's `Batch`; a backend applies them in the same transaction as the batch's
events, through `apply_admission` and `apply_results` here, so the rules are
written once and every backend (SQLite, memory, PostgreSQL) shares them. A
backend only says how to read and write its rows (`LimitTables`).

Every check reads first and writes only once every limit of the step fits:
a refused step changes nothing, which is what makes "refusals are free" true on
a backend without transactions (memory) too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from tether.store._breakers import (
    BreakerAdmit,
    BreakerBlocked,
    BreakerOutcome,
    BreakerSpec,
    BreakerTables,
    admit_breaker,
    record_outcome,
)
from tether.store._time import from_us, to_us

if TYPE_CHECKING:
    from tether.record import Event

__all__ = [
    "Admitted",
    "Blocked",
    "LimitBlocked",
    "LimitKind",
    "LimitTables",
    "Reserve",
    "RetryCharge",
    "Settle",
    "Throttled",
    "apply_admission",
    "apply_results",
    "charge_retry",
    "from_us",
    "gcra",
    "to_us",
]


class LimitKind(StrEnum):
    """What a limit bounds."""

    QUOTA = "quota"
    """Calls per window."""
    BUDGET = "budget"
    """Cost per window: reserved before the call, settled after."""
    CONCURRENCY = "concurrency"
    """Calls in flight, as leases with a TTL."""
    RATE = "rate"
    """Calls per second, with a burst (GCRA)."""
    COUNT = "count"
    """Calls counted and never refused (what a retry ratio divides by)."""


# -- commands ----------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Reserve:
    """Take room in one limit for one step, or be refused with what is left."""

    limit_id: str
    kind: LimitKind
    scope: str
    """Whose counter: a run id, `tenant/principal`, a tenant, a capability, or `*`."""
    window: int = 0
    """The window's start, µs since the epoch; 0 for a run's lifetime (or no window)."""
    window_us: int = 0
    """The window's length in µs; 0 when it has none."""
    amount: Decimal = Decimal(1)
    """What the step takes: its estimated cost for a budget, 1 otherwise."""
    cap: Decimal = Decimal(0)
    """The limit: the budget's amount, the quota's or cap's max."""
    hold_until: int = 0
    """When a hold (budget reservation, concurrency lease) lapses by itself, µs."""
    interval_us: int = 0
    """Rate limits: µs between calls at the steady rate."""
    burst: int = 1
    """Rate limits: calls allowed at once."""
    throttle_max_us: int = 0
    """Budgets with a throttle: the longest delay a call may be given (0: none)."""
    throttle_min_cost: Decimal = Decimal(0)
    """Budgets with a throttle: calls cheaper than this are never slowed."""


@dataclass(slots=True, kw_only=True)
class Settle:
    """Settle one step's reservation: its actual cost, or released (None)."""

    limit_id: str
    kind: LimitKind
    scope: str
    window: int
    run_id: str
    step: int
    actual: Decimal | None
    """What the call cost; None releases the reservation (the call failed)."""
    reserved: Decimal = Decimal(0)
    """What was reserved: a budget hold that lapsed was charged this much already."""


@dataclass(slots=True, kw_only=True)
class RetryCharge:
    """Spend one retry from the run's (and incident's) budget and the capability's ratio."""

    counters: Sequence[tuple[str, str, Decimal]]
    """Retry budgets as (limit id, scope, max retries), e.g. the run's and the incident's."""
    ratio_id: str
    """The capability's retry counter (the calls counter is `ratio_id` + `:calls`)."""
    window: int
    ratio: Decimal
    floor: int
    """Retries per window always allowed, whatever the ratio (keeps quiet capabilities retryable)."""
    breaker: BreakerSpec | None = None
    generation: int | None = None
    """The breaker generation the call ran under: once it moved (this failure
    opened it, say), no retry is spent."""


# -- answers -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitBlocked:
    """A reservation did not fit; nothing of the batch was written."""

    limit_id: str
    kind: LimitKind
    scope: str
    cap: Decimal
    used: Decimal
    """Settled (budget) or counted (quota) in the window; in flight (concurrency)."""
    held: Decimal
    """Reserved by calls still running (budget)."""
    requested: Decimal
    retry_after_us: int = 0
    """When a call may fit again, if that is known (rates, windows)."""

    @property
    def left(self) -> Decimal:
        """What is left of the limit now."""
        return max(self.cap - self.used - self.held, Decimal(0))


@dataclass(frozen=True, slots=True, kw_only=True)
class Throttled:
    """A budget burns too fast: wait `delay_us`, then reserve again without throttling."""

    limit_id: str
    scope: str
    delay_us: int
    spent: Decimal
    cap: Decimal


Blocked = LimitBlocked | Throttled | BreakerBlocked


@dataclass(slots=True, kw_only=True)
class Admitted:
    """What the admission part of a batch did, for the caller."""

    blocked: Blocked | None = None
    breaker_generation: int | None = None
    probe: bool = False
    probe_at: int = 0
    """A trial call: when it was let through, µs (`BreakerPass.probe_at`)."""
    events: list[Event] = field(default_factory=list)


# -- what a backend provides ---------------------------------------------------------


class LimitTables(BreakerTables, Protocol):
    """Rows of limits and breakers, read and written inside the caller's transaction."""

    def counter(self, limit_id: str, scope: str, window: int) -> Decimal:
        """Return the counter's value (0 when it has no row)."""
        ...

    def set_counter(
        self, limit_id: str, scope: str, window: int, value: Decimal, now: int
    ) -> None:
        """Store the counter's value."""
        ...

    def add_to_counter(
        self, limit_id: str, scope: str, window: int, delta: Decimal, now: int
    ) -> None:
        """Add `delta` to the counter (creating it), exactly."""
        ...

    def usage(
        self, limit_id: str, scope: str, window: int, now: int
    ) -> tuple[Decimal, Decimal, int]:
        """Return the counter's value, and the sum and number of live holds.

        One read. Lapsed holds are dropped; a charged one (a budget's: the call
        whose worker died may have acted upstream, as for a call in doubt) is
        added to the counter first.
        """
        ...

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
        """Store a hold: a budget's reservation (`charged`: spent if it lapses) or a lease."""
        ...

    def drop_hold(
        self, limit_id: str, scope: str, window: int, run_id: str, step: int
    ) -> bool:
        """Remove a hold; tell whether it was still there (not lapsed and dropped)."""
        ...

    def tat(self, limit_id: str, scope: str) -> int | None:
        """Return a rate limit's theoretical arrival time, µs."""
        ...

    def set_tat(self, limit_id: str, scope: str, tat: int) -> None:
        """Store a rate limit's theoretical arrival time."""
        ...


# -- rules ---------------------------------------------------------------------------


def gcra(tat: int | None, now: int, interval: int, burst: int) -> tuple[int, int]:
    """Apply the generic cell rate algorithm (GCRA) to one call.

    Returns:
        `(new_tat, 0)` when the call conforms, or `(tat, wait)` with the µs until
        it would.
    """
    if tat is not None and tat > now + interval * burst:
        # No conforming call leaves an arrival time this far ahead: the wall
        # clock stepped back. Count the burst as spent but one call, so this
        # call goes through and its write repairs the row; a time that depended
        # on `now` but was never written would refuse every call until the
        # clock caught up again.
        tat = now + interval * (burst - 1)
    base = now if tat is None or tat < now else tat
    new_tat = base + interval
    allowed_at = new_tat - interval * burst
    if allowed_at > now:
        return tat or now, allowed_at - now
    return new_tat, 0


def _throttle_delay(r: Reserve, spent: Decimal, now: int) -> int:
    """Return how long to slow a call so the budget lasts its window (0: not at all).

    The pace is even spending over the window: a call that would put spending
    ahead of the pace waits until the pace catches up, at most `throttle_max_us`.
    """
    if not r.throttle_max_us or not r.window_us or r.amount < r.throttle_min_cost:
        return 0
    after = spent + r.amount
    if after > r.cap or r.cap <= 0 or not spent:
        return 0  # does not fit (refused, not slowed), or the window's first spend
    due = r.window + int(Decimal(r.window_us) * after / r.cap)
    return min(max(due - now, 0), r.throttle_max_us)


def apply_admission(
    tables: LimitTables,
    reserves: Sequence[Reserve],
    breaker: BreakerAdmit | None,
    *,
    run_id: str,
    step: int,
    now: datetime,
    throttle: bool,
) -> Admitted:
    """Check every reservation and the breaker; write them only if all pass."""
    at = to_us(now)
    writes: list[Callable[[], None]] = []
    for r in reserves:
        blocked = _check(tables, r, at, writes, run_id, step, throttle)
        if blocked is not None:
            return Admitted(blocked=blocked)
    admitted = Admitted()
    if breaker is not None:
        passed = admit_breaker(tables, breaker, now)
        if isinstance(passed, BreakerBlocked):
            return Admitted(blocked=passed)
        admitted = Admitted(
            breaker_generation=passed.generation,
            probe=passed.probe,
            probe_at=passed.probe_at,
            events=passed.events,
        )
    for write in writes:
        write()
    return admitted


def _check(
    tables: LimitTables,
    r: Reserve,
    at: int,
    writes: list[Callable[[], None]],
    run_id: str,
    step: int,
    throttle: bool,
) -> Blocked | None:
    kind = r.kind
    if kind is LimitKind.RATE:
        tat, wait = gcra(tables.tat(r.limit_id, r.scope), at, r.interval_us, r.burst)
        if wait:
            return LimitBlocked(
                limit_id=r.limit_id,
                kind=kind,
                scope=r.scope,
                cap=Decimal(r.burst),
                used=Decimal(r.burst),
                held=Decimal(0),
                requested=r.amount,
                retry_after_us=wait,
            )
        writes.append(lambda: tables.set_tat(r.limit_id, r.scope, tat))
        return None
    if kind is LimitKind.QUOTA or kind is LimitKind.COUNT:
        used = tables.counter(r.limit_id, r.scope, r.window)
        if kind is LimitKind.QUOTA and used + r.amount > r.cap:
            return _blocked(r, used, Decimal(0), at)
        writes.append(
            lambda: tables.set_counter(
                r.limit_id, r.scope, r.window, used + r.amount, at
            )
        )
        return None
    # budgets and concurrency caps hold their room until the step settles
    used, held, count = tables.usage(r.limit_id, r.scope, r.window, at)
    if kind is LimitKind.CONCURRENCY:
        if count + 1 > r.cap:
            return _blocked(r, Decimal(count), Decimal(0), at)
    else:
        if used + held + r.amount > r.cap:
            return _blocked(r, used, held, at)
        if throttle:
            delay = _throttle_delay(r, used + held, at)
            if delay:
                return Throttled(
                    limit_id=r.limit_id,
                    scope=r.scope,
                    delay_us=delay,
                    spent=used + held,
                    cap=r.cap,
                )
    writes.append(
        lambda: tables.add_hold(
            r.limit_id,
            r.scope,
            r.window,
            run_id,
            step,
            r.amount,
            r.hold_until,
            charged=kind is LimitKind.BUDGET,
        )
    )
    return None


def _blocked(r: Reserve, used: Decimal, held: Decimal, at: int) -> LimitBlocked:
    # A call that needs more than the whole cap never fits: no time to wait for.
    never = r.kind is LimitKind.BUDGET and r.amount > r.cap
    retry = r.window + r.window_us - at if r.window_us and not never else 0
    return LimitBlocked(
        limit_id=r.limit_id,
        kind=r.kind,
        scope=r.scope,
        cap=r.cap,
        used=used,
        held=held,
        requested=r.amount,
        retry_after_us=max(retry, 0),
    )


def apply_results(
    tables: LimitTables,
    settles: Sequence[Settle],
    outcome: BreakerOutcome | None,
    *,
    now: datetime,
) -> list[Event]:
    """Settle reservations and record a call's outcome in its breaker.

    Returns:
        The events the breaker's transitions add to the batch.
    """
    at = to_us(now)
    for s in settles:
        delta = s.actual or Decimal(0)
        if s.kind is LimitKind.BUDGET or s.kind is LimitKind.CONCURRENCY:
            held = tables.drop_hold(s.limit_id, s.scope, s.window, s.run_id, s.step)
            if not held and s.kind is LimitKind.BUDGET:
                # It lapsed while the call ran and was charged as spent: the
                # call's own answer replaces that charge.
                delta -= s.reserved
        if (s.kind is LimitKind.BUDGET or s.kind is LimitKind.COUNT) and delta:
            tables.add_to_counter(s.limit_id, s.scope, s.window, delta, at)
    if outcome is None:
        return []
    return record_outcome(tables, outcome, now)


def charge_retry(
    tables: LimitTables, charge: RetryCharge, *, now: datetime
) -> LimitBlocked | None:
    """Spend one retry, or say which budget or ratio forbids it (nothing written)."""
    at = to_us(now)
    used: list[tuple[str, str, Decimal]] = []
    for limit_id, scope, most in charge.counters:
        spent = tables.counter(limit_id, scope, 0)
        if spent + 1 > most:
            return LimitBlocked(
                limit_id=limit_id,
                kind=LimitKind.QUOTA,
                scope=scope,
                cap=most,
                used=spent,
                held=Decimal(0),
                requested=Decimal(1),
            )
        used.append((limit_id, scope, spent))
    retries = tables.counter(charge.ratio_id, "*", charge.window)
    calls = tables.counter(charge.ratio_id + ":calls", "*", charge.window)
    allowed = max(charge.ratio * calls, Decimal(charge.floor))
    if retries + 1 > allowed:
        return LimitBlocked(
            limit_id=charge.ratio_id,
            kind=LimitKind.QUOTA,
            scope="*",
            cap=allowed,
            used=retries,
            held=Decimal(0),
            requested=Decimal(1),
        )
    for limit_id, scope, spent in used:
        tables.set_counter(limit_id, scope, 0, spent + 1, at)
    tables.set_counter(charge.ratio_id, "*", charge.window, retries + 1, at)
    return None
