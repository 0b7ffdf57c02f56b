"""Limits and breakers as the store keeps them: commands, and the rules applied to them.

The call path sends `Reserve`, `Settle`, `BreakerAdmit` and `BreakerOutcome`
commands inside a run's `Batch`; a backend applies them in the same transaction
as the batch's events, through `apply_admission` and `apply_results` here, so
the rules are written once and every backend (SQLite, memory, PostgreSQL)
shares them. A backend only says how to read and write its rows (`LimitTables`).

Every check reads first and writes only once every limit of the step fits:
a refused step changes nothing, which is what makes "refusals are free" true on
a backend without transactions (memory) too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tether.record import Event

__all__ = [
    "Admitted",
    "Blocked",
    "BreakerAdmit",
    "BreakerBlocked",
    "BreakerNote",
    "BreakerOutcome",
    "BreakerRow",
    "BreakerSpec",
    "BreakerState",
    "LimitBlocked",
    "LimitKind",
    "LimitTables",
    "Reserve",
    "RetryCharge",
    "Settle",
    "Throttled",
    "apply_admission",
    "apply_results",
    "breaker_view",
    "charge_retry",
    "from_us",
    "gcra",
    "to_us",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def to_us(value: datetime) -> int:
    """Return microseconds since 1970-01-01 UTC (how limit times are stored)."""
    return (value - _EPOCH) // _US


def from_us(value: int) -> datetime:
    """Return the aware UTC time of `to_us`'s integer."""
    return _EPOCH + timedelta(microseconds=value)


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


@dataclass(slots=True, kw_only=True)
class BreakerSpec:
    """A breaker's settings, as the store applies them."""

    id: str
    window: int
    """How many recent calls the failure and slow-call rates are taken over."""
    min_calls: int
    failure_rate: float
    slow_rate: float
    """1.0 and above: slow calls never open the breaker."""
    slow_us: int
    """A call that takes at least this long is slow (0: none is)."""
    open_us: int
    """How long an open breaker refuses before it lets probes through."""
    probes: int
    """How many trial calls half-open lets through before it decides."""
    probe_timeout_us: int
    """How long half-open waits for a probe's result before it reopens."""


class BreakerState(StrEnum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True, kw_only=True)
class BreakerRow:
    """A breaker's stored state."""

    state: BreakerState = BreakerState.CLOSED
    since: int = 0
    """When it entered `state`, µs."""
    generation: int = 0
    """Incremented at every transition: outcomes of an older generation are ignored."""
    outcomes: str = ""
    """Closed: the recent calls, oldest first: 0 ok, 1 failed, 2 slow, 3 slow and failed.
    Half-open: the probes' results so far."""
    probes: int = 0
    """Half-open: trial calls let through so far."""
    probe_deadline: int = 0
    """Half-open: when the last admitted probe's time is up, µs."""

    def copy(self) -> BreakerRow:
        """Return a copy to change (`copy.copy` costs four times as much here)."""
        return BreakerRow(
            state=self.state,
            since=self.since,
            generation=self.generation,
            outcomes=self.outcomes,
            probes=self.probes,
            probe_deadline=self.probe_deadline,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerNote:
    """What a breaker did to a step, for its record: a transition, or a probe let through."""

    breaker_id: str
    at: datetime
    previous: str | None
    """The state before a transition; None for a note that is not one."""
    state: str
    reason: str


@dataclass(slots=True, kw_only=True)
class BreakerAdmit:
    """Ask the breaker to let a step through."""

    spec: BreakerSpec
    read_only_pass: bool = False
    """The breaker degrades to read-only and the step is a read: open lets it through."""
    note: Callable[[BreakerNote], Event]
    """Makes the record event for a transition or a probe (appended to the batch)."""


@dataclass(slots=True, kw_only=True)
class BreakerOutcome:
    """Tell the breaker how a call it let through went."""

    spec: BreakerSpec
    generation: int
    probe: bool
    failed: bool
    slow: bool
    note: Callable[[BreakerNote], Event]


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


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerBlocked:
    """The breaker refused the step; nothing of the batch was written."""

    breaker_id: str
    state: BreakerState
    retry_after_us: int


Blocked = LimitBlocked | Throttled | BreakerBlocked


@dataclass(slots=True, kw_only=True)
class Admitted:
    """What the admission part of a batch did, for the caller."""

    blocked: Blocked | None = None
    breaker_generation: int | None = None
    probe: bool = False
    events: list[Event] = field(default_factory=list)


# -- what a backend provides ---------------------------------------------------------


class LimitTables(Protocol):
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

    def breaker(self, breaker_id: str) -> BreakerRow:
        """Return a breaker's row (a closed one when it has none)."""
        ...

    def set_breaker(self, breaker_id: str, row: BreakerRow) -> None:
        """Store a breaker's row."""
        ...

    def push_sample(
        self, breaker_id: str, code: str, window: int, min_calls: int, generation: int
    ) -> bool:
        """Append a success to a closed breaker's window in one write, when it cannot trip it.

        A success lowers both rates once the window holds `min_calls`; the one
        that brings it to `min_calls` is the first to be checked, so it is not
        taken here.

        Returns:
            False when the breaker has no row, is not closed, is of another
            generation, or holds `min_calls - 1` outcomes: then nothing was written.
        """
        ...


# -- rules ---------------------------------------------------------------------------


def gcra(tat: int | None, now: int, interval: int, burst: int) -> tuple[int, int]:
    """Apply the generic cell rate algorithm (GCRA) to one call.

    Returns:
        `(new_tat, 0)` when the call conforms, or `(tat, wait)` with the µs until
        it would.
    """
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
        blocked = _admit_breaker(tables, breaker, now, admitted)
        if blocked is not None:
            return Admitted(blocked=blocked)
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
    retry = r.window + r.window_us - at if r.window_us else 0
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
    return _record_outcome(tables, outcome, now)


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


# -- breakers --------------------------------------------------------------------------


def breaker_view(
    row: BreakerRow, spec: BreakerSpec, now: int
) -> tuple[BreakerRow, list[tuple[BreakerState, BreakerState, int, str]]]:
    """Return the breaker as it stands at `now`, with the transitions time made.

    Time moves a breaker without any call: open becomes half-open once its
    cool-down is over, and half-open reopens when a probe's time is up without
    an answer (a hung probe must not keep it half-open). The row is not changed.
    """
    moves: list[tuple[BreakerState, BreakerState, int, str]] = []
    cur = BreakerRow(
        state=row.state,
        since=row.since,
        generation=row.generation,
        outcomes=row.outcomes,
        probes=row.probes,
        probe_deadline=row.probe_deadline,
    )
    for _ in range(4):  # at most open -> half-open -> open -> half-open in one look
        if cur.state is BreakerState.OPEN and now >= cur.since + spec.open_us:
            at = cur.since + spec.open_us
            moves.append((cur.state, BreakerState.HALF_OPEN, at, "cool-down over"))
            cur = BreakerRow(
                state=BreakerState.HALF_OPEN, since=at, generation=cur.generation + 1
            )
        elif (
            cur.state is BreakerState.HALF_OPEN
            and cur.probes > len(cur.outcomes)
            and now >= cur.probe_deadline
        ):
            at = cur.probe_deadline
            moves.append(
                (cur.state, BreakerState.OPEN, at, "a probe did not answer in time")
            )
            cur = BreakerRow(
                state=BreakerState.OPEN, since=at, generation=cur.generation + 1
            )
        else:
            break
    return cur, moves


def _notes(
    breaker_id: str,
    moves: Sequence[tuple[BreakerState, BreakerState, int, str]],
    note: Callable[[BreakerNote], Event],
) -> list[Event]:
    return [
        note(
            BreakerNote(
                breaker_id=breaker_id,
                at=from_us(at),
                previous=old.value,
                state=new.value,
                reason=why,
            )
        )
        for old, new, at, why in moves
    ]


def _admit_breaker(
    tables: LimitTables, admit: BreakerAdmit, now: datetime, admitted: Admitted
) -> BreakerBlocked | None:
    spec = admit.spec
    at = to_us(now)
    stored = tables.breaker(spec.id)
    row, moves = breaker_view(stored, spec, at)
    if row.state is BreakerState.CLOSED or admit.read_only_pass:
        # Closed; or a read under a read_only breaker: it goes through while the
        # breaker is open or half-open, and takes no trial call's slot.
        if moves:  # (closed is never reached by time alone; kept for safety)
            tables.set_breaker(spec.id, row)
            admitted.events.extend(_notes(spec.id, moves, admit.note))
        admitted.breaker_generation = (
            row.generation if row.state is BreakerState.CLOSED else None
        )
        return None
    if row.state is BreakerState.HALF_OPEN and row.probes < spec.probes:
        if row.probes == len(row.outcomes):
            # The deadline runs from the first unanswered trial call: a later one
            # must not keep a hung one's half-open state alive.
            row.probe_deadline = at + spec.probe_timeout_us
        row.probes += 1
        tables.set_breaker(spec.id, row)
        admitted.events.extend(_notes(spec.id, moves, admit.note))
        admitted.events.append(
            admit.note(
                BreakerNote(
                    breaker_id=spec.id,
                    at=now,
                    previous=None,
                    state=row.state.value,
                    reason=f"trial call {row.probes} of {spec.probes}",
                )
            )
        )
        admitted.breaker_generation = row.generation
        admitted.probe = True
        return None
    if row.state is BreakerState.OPEN:
        retry = row.since + spec.open_us - at
    else:
        retry = max(row.probe_deadline - at, 0)
    return BreakerBlocked(breaker_id=spec.id, state=row.state, retry_after_us=retry)


def _code(failed: bool, slow: bool) -> str:
    return "0123"[int(failed) + 2 * int(slow)]


def _rates(outcomes: str) -> tuple[float, float]:
    n = len(outcomes)
    failed = sum(1 for c in outcomes if c in "13")
    slow = sum(1 for c in outcomes if c in "23")
    return failed / n, slow / n


def _trips(spec: BreakerSpec, outcomes: str) -> str | None:
    failure, slow = _rates(outcomes)
    if failure >= spec.failure_rate:
        return f"failure rate {failure:.0%} of {len(outcomes)} calls >= {spec.failure_rate:.0%}"
    if spec.slow_us and slow >= spec.slow_rate:
        return f"slow-call rate {slow:.0%} of {len(outcomes)} calls >= {spec.slow_rate:.0%}"
    return None


def _record_outcome(
    tables: LimitTables, outcome: BreakerOutcome, now: datetime
) -> list[Event]:
    spec = outcome.spec
    code = _code(outcome.failed, outcome.slow)
    if (
        code == "0"
        and not outcome.probe
        and tables.push_sample(
            spec.id, code, spec.window, spec.min_calls, outcome.generation
        )
    ):
        return []  # a quick success in a closed breaker can trip nothing: one write
    at = to_us(now)
    stored = tables.breaker(spec.id)
    row, moves = breaker_view(stored, spec, at)
    changed = bool(moves)
    if row.generation != outcome.generation:
        pass  # the breaker moved on since the call was let through: not its sample
    elif row.state is BreakerState.CLOSED and not outcome.probe:
        row.outcomes = (row.outcomes + code)[-spec.window :]
        changed = True
        why = (
            _trips(spec, row.outcomes) if len(row.outcomes) >= spec.min_calls else None
        )
        if why is not None:
            moves.append((row.state, BreakerState.OPEN, at, why))
            row = BreakerRow(
                state=BreakerState.OPEN, since=at, generation=row.generation + 1
            )
    elif row.state is BreakerState.HALF_OPEN and outcome.probe:
        row.outcomes += code
        changed = True
        if len(row.outcomes) >= spec.probes:
            why = _trips(spec, row.outcomes)
            target = BreakerState.OPEN if why else BreakerState.CLOSED
            moves.append(
                (row.state, target, at, why or f"{spec.probes} trial calls succeeded")
            )
            row = BreakerRow(state=target, since=at, generation=row.generation + 1)
    if changed:
        tables.set_breaker(spec.id, row)
    return _notes(spec.id, moves, outcome.note)
