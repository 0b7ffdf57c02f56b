"""The limit, breaker and retry stages of the call path, as small pure helpers.

`gateway.step` calls these to build the store commands and the record events of
the limits, the breaker and the retry budget; the counting itself happens in
the store (`tether.store._limits`), inside the step's own writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from tether import record
from tether.capability import Capability, Effect, Idempotency
from tether.errors import BreakerOpen, LimitExceeded, TetherError
from tether.limits import LimitSet, Reserved
from tether.principal import Principal
from tether.resilience import Breaker, BreakerSet, RetryBudget
from tether.store._breakers import (
    BreakerBlocked,
    BreakerNote,
    BreakerSpec,
    BreakerState,
)
from tether.store._limits import Blocked, LimitBlocked, LimitKind, Reserve, Settle

__all__ = [
    "MICROSECOND",
    "FullCounters",
    "Guards",
    "after",
    "breaker_note",
    "breaker_refused",
    "busy_for",
    "refusal",
    "released",
    "reservations",
    "retry_refused",
    "retryable",
    "settlements",
    "window_start",
]


def window_start(at: int, length: timedelta) -> int:
    """Return the start (µs) of the fixed window of `length` that holds `at` (µs)."""
    size = length // MICROSECOND
    return at - at % size


MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Guards:
    """The limits, breakers and retry budget of one config version."""

    limits: LimitSet
    breakers: BreakerSet
    retry: RetryBudget | None

    def __bool__(self) -> bool:
        return bool(self.limits or self.breakers or self.retry)


class FullCounters:
    """Counters a read charged after it answered found full, in this process.

    A hint that picks a read's path, never a decision: a read under a counter
    found full takes its room before it runs, so it is refused before it
    reaches the upstream (a quota on a paid or rate-limited API guards the
    API's calls too), until a call fits again or the window turns. The store
    still checks every call. One per app: a replay's scratch app has its own,
    so a replay takes the paths the record's own steps led to.
    """

    __slots__ = ("_full",)

    def __init__(self) -> None:
        self._full: dict[tuple[str, str], int] = {}
        """`(limit_id, scope)` -> the window it was full in."""

    def found(self, reserved: Sequence[Reserved]) -> bool:
        """Tell whether one of `reserved` was found full in its window."""
        full = self._full
        return bool(full) and any(
            full.get((r.reserve.limit_id, r.reserve.scope), -1) == r.reserve.window
            for r in reserved
        )

    def note_full(self, blocked: Blocked, reserved: Sequence[Reserved]) -> None:
        """Remember that `blocked`'s counter had no room for a read charged after."""
        if not isinstance(blocked, LimitBlocked):
            return
        if len(self._full) >= _FULL_KEPT:  # per-run scopes come and go: a hint only
            self._full.clear()
        for r in reserved:
            res = r.reserve
            if (res.limit_id, res.scope) == (blocked.limit_id, blocked.scope):
                self._full[res.limit_id, res.scope] = res.window

    def note_room(self, reserved: Sequence[Reserved]) -> None:
        """Forget the counters a step just took room in: they are not full."""
        if self._full:
            for r in reserved:
                self._full.pop((r.reserve.limit_id, r.reserve.scope), None)


_FULL_KEPT = 4096
"""How many full counters `Guards.full` remembers before it starts over."""


def reservations(
    limits: LimitSet,
    cap: Capability[Any, Any],
    args: Mapping[str, Any],
    cost: Decimal,
    *,
    principal: Principal,
    run_id: str,
    context: Mapping[str, Any],
    now: datetime,
    retry: RetryBudget | None = None,
) -> list[Reserved]:
    """Return the room one step takes in the limits that apply to it.

    Raises:
        CelError: a limit's cost expression failed on these args.
    """
    return limits.reserve(
        capability=cap.name,
        effect=cap.effect,
        resource=cap.resource,
        timeout=busy_for(cap, retry),
        args=args,
        cost=cost,
        principal=principal,
        run_id=run_id,
        context=context,
        now=now,
    )


def busy_for(cap: Capability[Any, Any], retry: RetryBudget | None) -> timedelta | None:
    """Return how long a step may keep its upstream busy, retries and backoff included.

    Holds (leases, reservations) must not lapse before it: None when the
    capability has no timeout (then the limit's ttl alone bounds it).
    """
    if cap.timeout is None:
        return None
    if retry is None or not retryable(cap):
        return cap.timeout
    waits = sum(
        (
            min(retry.backoff * 2**i, retry.backoff_cap)
            for i in range(retry.max_attempts - 1)
        ),
        timedelta(0),
    )
    return cap.timeout * retry.max_attempts + waits


def retryable(cap: Capability[Any, Any]) -> bool:
    """Tell whether a failed call may run again: it has a key, or it only reads."""
    return cap.idempotency is not Idempotency.NONE or cap.effect is Effect.READ


def breaker_note(number: int) -> Callable[[BreakerNote], record.Event]:
    def note(n: BreakerNote) -> record.Event:
        if n.previous is None:
            return record.BreakerChecked(
                at=n.at,
                step=number,
                breaker=n.breaker_id,
                state=n.state,
                admitted=True,
                reason=n.reason,
            )
        return record.BreakerTransition(
            at=n.at,
            step=number,
            breaker=n.breaker_id,
            previous=n.previous,
            state=n.state,
            reason=n.reason,
        )

    return note


def breaker_refused(
    cap: Capability[Any, Any],
    blocked: BreakerBlocked,
    mode: str,
    events: list[record.Event],
    now: datetime,
    number: int,
) -> str:
    """Record that the breaker refused the step (`breaker_checked`); return why, in words."""
    state = (
        "open"
        if blocked.state is BreakerState.OPEN
        else "half-open with its trial calls taken"
    )
    why = f"breaker {blocked.breaker_id} of {cap.resource} is {state}"
    events.append(
        record.BreakerChecked(
            at=now,
            step=number,
            breaker=blocked.breaker_id,
            state=blocked.state.value,
            admitted=False,
            mode=mode,
            reason=why,
        )
    )
    return why


def retry_refused(
    cap: Capability[Any, Any],
    breaker_id: str,
    state: BreakerState,
    mode: str,
    now: datetime,
    number: int,
) -> record.BreakerChecked:
    """Record that a retry was not made: the breaker moved during its backoff."""
    return record.BreakerChecked(
        at=now,
        step=number,
        breaker=breaker_id,
        state=state.value,
        admitted=False,
        mode=mode,
        reason=(
            f"breaker {breaker_id} of {cap.resource} moved (now {state.value}) "
            "during the retry's backoff: the retry is not made"
        ),
    )


def refusal(
    cap: Capability[Any, Any],
    events: list[record.Event],
    now: datetime,
    number: int,
    blocked: Blocked,
    watch: tuple[Breaker, BreakerSpec] | None,
) -> tuple[str, TetherError]:
    """Add the event that says why a limit or the breaker refused the step.

    Returns:
        The stage that refused (`limits` or `breaker`) and the error for the caller.
    """
    if isinstance(blocked, BreakerBlocked):
        assert watch is not None
        mode = watch[0].on_open
        assert mode != "escalate", "an escalating breaker asks a person (gateway)"
        wait = blocked.retry_after_us / 1e6
        why = breaker_refused(cap, blocked, mode, events, now, number)
        then = (
            "the run is parked degraded with its remaining plan"
            if mode == "stash"
            else "only reads may run until it closes"
        )
        return "breaker", BreakerOpen(
            f"{cap.name}: {why}; {then} (retry {after(wait)})",
            breaker_id=blocked.breaker_id,
            mode=mode,
            retry_after=wait,
        )
    assert isinstance(blocked, LimitBlocked)
    left = blocked.left
    events.append(
        record.LimitRefused(
            at=now,
            step=number,
            limit=blocked.limit_id,
            limit_kind=blocked.kind.value,
            scope=blocked.scope,
            cap=blocked.cap,
            used=blocked.used,
            held=blocked.held,
            requested=blocked.requested,
            left=left,
            retry_after_us=blocked.retry_after_us,
        )
    )
    after_s = blocked.retry_after_us / 1e6 if blocked.retry_after_us else None
    budget = f"needs {blocked.requested}, {left} of {blocked.cap} left"
    if blocked.requested > blocked.cap:
        budget = (
            f"needs {blocked.requested}, more than the whole budget of "
            f"{blocked.cap}: it can never fit; raise `amount` or lower the call's cost"
        )
    what = {
        LimitKind.BUDGET: budget,
        LimitKind.QUOTA: f"{blocked.used} of {blocked.cap} calls used",
        LimitKind.CONCURRENCY: f"{blocked.used} of {blocked.cap} calls in flight",
        LimitKind.RATE: f"over {blocked.cap} at once at its rate",
    }.get(blocked.kind, f"{left} left")
    then = f"; retry {after(after_s)}" if after_s else ""
    error = LimitExceeded(
        f"{cap.name}: limit {blocked.limit_id!r} ({blocked.kind.value}, scope "
        f"{blocked.scope}) refused the call: {what}{then}",
        limit_id=blocked.limit_id,
        left=left,
        retry_after=after_s,
    )
    return "limits", error


def after(seconds: float) -> str:
    """Say when, in words, rounded up to two adjacent units: `in 30s`, `in 2h 6m`."""
    if seconds < 1:
        return f"in {min(max(math.ceil(seconds * 1000), 1), 999)}ms"
    whole = math.ceil(seconds)
    if whole < 60:
        return f"in {whole}s"
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"in {minutes}m {secs}s" if secs else f"in {minutes}m"
    hours, rest = divmod(whole, 3600)
    minutes = math.ceil(rest / 60)
    if minutes == 60:
        hours, minutes = hours + 1, 0
    return f"in {hours}h {minutes}m" if minutes else f"in {hours}h"


def charged_after(reserve: Reserve) -> bool:
    """Tell whether a read may be charged this limit after it answers.

    Counting limits may: a quota, a budget without a throttle. A concurrency
    cap and a rate limit bound calls while they happen, and a throttle slows
    a call before it starts: those are taken before.
    """
    return reserve.kind is LimitKind.QUOTA or (
        reserve.kind is LimitKind.BUDGET and not reserve.throttle_max_us
    )


def reserved_event(
    reserved: Sequence[Reserved], now: datetime, number: int, throttled_us: int = 0
) -> record.LimitReserved:
    """The `limit_reserved` event for a step's reservations."""
    return record.LimitReserved(
        at=now,
        step=number,
        limits=tuple(
            {
                "id": r.reserve.limit_id,
                "scope": r.reserve.scope,
                # text, as the record encodes a Decimal, without the encoder's
                # slow path
                "amount": str(r.reserve.amount),
            }
            for r in reserved
        ),
        throttled_us=throttled_us,
    )


def settlements(
    run_id: str,
    reserved: Sequence[Reserved],
    number: int,
    end: datetime,
    actual: Decimal | None,
    in_doubt: bool,
    *,
    keep_leases: bool = False,
) -> tuple[list[Settle], list[record.Event]]:
    """Return how each reservation settles, and the event that says so.

    A budget settles at the call's actual cost (its own cost expression's
    amount when it has one); a failed call releases it, but a call in doubt
    keeps its estimate charged, since the upstream may have acted. Leases are
    released either way, unless `keep_leases` (the call may still be acting:
    its lease stays until it lapses); quotas and rates have nothing to settle. The
    `limit_settled` event is written only when a budget settles at other
    than its reservation (another actual cost, or released) or the call is in
    doubt: otherwise the record's `limit_reserved` and `executed` say it.
    """
    if not reserved:  # most steps: nothing to settle, nothing to say
        return [], []
    return _settle(
        run_id,
        [(r.reserve, r.own_cost) for r in reserved],
        number,
        end,
        actual,
        in_doubt,
        keep_leases=keep_leases,
    )


def released(
    run_id: str, reserves: Sequence[Reserve], number: int, end: datetime
) -> tuple[list[Settle], list[record.Event]]:
    """Release a step's reservations as a failed call does (the step did not run)."""
    return _settle(
        run_id, [(r, False) for r in reserves], number, end, None, in_doubt=False
    )


def _settle(
    run_id: str,
    reserved: Sequence[tuple[Reserve, bool]],
    number: int,
    end: datetime,
    actual: Decimal | None,
    in_doubt: bool,
    *,
    keep_leases: bool = False,
) -> tuple[list[Settle], list[record.Event]]:
    settles: list[Settle] = []
    lines: list[dict[str, Any]] = []
    plain = not in_doubt  # every line settled as reserved: the record says so already
    for res, own_cost in reserved:
        if res.kind is LimitKind.BUDGET:
            if in_doubt:
                amount: Decimal | None = res.amount
            elif actual is None:
                amount = None
            else:
                amount = res.amount if own_cost else actual
        elif res.kind is LimitKind.CONCURRENCY and not keep_leases:
            amount = None
        else:
            continue
        settles.append(
            Settle(
                limit_id=res.limit_id,
                kind=res.kind,
                scope=res.scope,
                window=res.window,
                run_id=run_id,
                step=number,
                actual=amount,
                reserved=res.amount,
            )
        )
        if res.kind is LimitKind.BUDGET and amount != res.amount:
            plain = False
        lines.append(
            {
                "id": res.limit_id,
                "scope": res.scope,
                "reserved": str(res.amount),
                "actual": None if amount is None else str(amount),
            }
        )
    if plain or not lines:
        # Budgets settled at their reservation and leases given back at the end
        # of the step: `limit_reserved` and `executed` already say all of it.
        # (A step in doubt that reserved nothing has nothing to say either.)
        return settles, []
    return settles, [record.LimitSettled(at=end, step=number, limits=tuple(lines))]
