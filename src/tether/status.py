"""Where every limit, breaker and retry budget stands: what `tether status` shows.

`status(app)` reads the app's `tether.yaml` (its `limits:`, `breakers:` and
`retry_budget:`) and the store's counters, leases and breaker rows, and returns
one frozen `StatusReport`. It only reads: asking for the status never moves a
breaker or spends anything, even when time alone has moved one (an open breaker
past its cool-down is shown half-open, as the next call will find it).

What is shown is what is live: the current window of each counter, and the
counters of runs that have not finished. Counters whose limit id is no longer in
the config (after an edit of `tether.yaml`) are listed as unconfigured.

The report's types and their JSON form live in `tether._status_report`; they
are re-exported here, so `from tether.status import StatusReport` keeps working.

Example:
    ```python
    report = status(app)
    for limit in report.limits:
        print(limit.id, [(c.scope, c.left) for c in limit.counters])
    ```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from tether._status_report import (
    BreakerStatus,
    CapabilityRetries,
    Counter,
    LimitStatus,
    RetryCounter,
    RetryStatus,
    StatusReport,
    UnconfiguredBreaker,
    UnconfiguredCounter,
)
from tether.errors import NotFound
from tether.limits import Limit
from tether.resilience import (
    INCIDENT_RETRIES,
    RETRY_PREFIX,
    RUN_RETRIES,
    Breaker,
    RetryBudget,
)
from tether.run import FINAL_STATES, RunState
from tether.store._base import LimitRow
from tether.store._breakers import BreakerRow, BreakerState, breaker_view
from tether.store._limits import from_us, to_us

if TYPE_CHECKING:
    from tether.app import Tether

__all__ = [
    "BreakerStatus",
    "CapabilityRetries",
    "Counter",
    "LimitStatus",
    "RetryCounter",
    "RetryStatus",
    "StatusReport",
    "UnconfiguredBreaker",
    "UnconfiguredCounter",
    "status",
]

_PERIOD = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
}
_RUN_BUDGET = RUN_RETRIES
_INCIDENT_BUDGET = INCIDENT_RETRIES
_RETRY_PREFIX = RETRY_PREFIX
_CALLS_SUFFIX = ":calls"


def status(app: Tether, *, now: datetime | None = None) -> StatusReport:
    """Return where every limit, breaker and retry budget of `app` stands.

    `tether.yaml` is reloaded first if it changed, so the report shows what the
    next step will meet. Nothing is written.

    Args:
        app: the app whose config and store are read.
        now: the time to report as of (default: the app's clock).

    Raises:
        StoreError: the store could not be read.
    """
    app.current_policy()  # reloads a changed tether.yaml, as the next step would
    settings = app.settings
    at = app.clock.now() if now is None else now
    alive = _RunFilter(app)
    rows = app.store.limit_rows(at)
    limits = {lim.id: lim for lim in settings.limits}
    retry = settings.retry_budget

    by_limit: dict[str, list[LimitRow]] = {}
    retry_rows: list[LimitRow] = []
    leftover: list[LimitRow] = []
    for row in rows:
        if row.limit_id in limits:
            by_limit.setdefault(row.limit_id, []).append(row)
        elif retry is not None and _is_retry_row(row, retry):
            retry_rows.append(row)
        else:
            leftover.append(row)

    hidden = 0
    limit_report = []
    for lim in settings.limits:
        counters, skipped = _counters(lim, by_limit.get(lim.id, ()), at, alive)
        hidden += skipped
        limit_report.append(_limit_status(lim, counters))

    retry_report = None
    if retry is not None:
        retry_report, skipped = _retry_status(retry, retry_rows, at, alive)
        hidden += skipped

    unconfigured, skipped = _unconfigured(leftover)
    hidden += skipped

    stored = app.store.breaker_rows()
    breakers = tuple(
        _breaker_status(b, stored.get(b.id, BreakerRow()), at)
        for b in settings.breakers
    )
    known = {b.id for b in settings.breakers}
    gone = tuple(
        UnconfiguredBreaker(id=bid, state=row.state.value, since=_since(row.since))
        for bid, row in sorted(stored.items())
        if bid not in known
    )
    return StatusReport(
        at=at,
        config=None if app.config_path is None else str(app.config_path),
        limits=tuple(limit_report),
        breakers=breakers,
        retry_budget=retry_report,
        unconfigured=unconfigured,
        unconfigured_breakers=gone,
        hidden=hidden,
        clock_skew=app.clock_skew(),
    )


class _RunFilter:
    """Tell whether a run id names a run that has not finished (looked up once each)."""

    def __init__(self, app: Tether) -> None:
        self._get_run = app.store.get_run
        self._seen: dict[str, bool] = {}

    def __call__(self, run_id: str) -> bool:
        live = self._seen.get(run_id)
        if live is None:
            try:
                row = self._get_run(run_id)
            except NotFound:  # pragma: no cover  # counters follow their run's start
                live = True  # a counter we cannot explain is shown, not hidden
            else:
                live = row.run_id != run_id or RunState(row.status) not in FINAL_STATES
            self._seen[run_id] = live
        return live


def _is_retry_row(row: LimitRow, retry: RetryBudget) -> bool:
    if not row.limit_id.startswith(_RETRY_PREFIX):
        return False
    if row.limit_id == _RUN_BUDGET and row.window is None:
        return True
    if row.limit_id == _INCIDENT_BUDGET and row.window is None:
        return retry.per_incident is not None
    return row.window is not None  # a capability's retries, or its calls


def _current_window(length: timedelta | None, at: datetime) -> datetime | None:
    """Return the start of the window a limit of this `per` counts in at `at`.

    As the limits align it: on whole multiples of the length since the epoch.
    """
    if length is None:
        return None
    us, step = to_us(at), length // timedelta(microseconds=1)
    return from_us(us - us % step)


def _window_end(start: datetime | None, length: timedelta | None) -> datetime | None:
    if start is None or length is None:
        return None
    return start + length


def _counters(
    lim: Limit,
    rows: Iterable[LimitRow],
    at: datetime,
    alive: Callable[[str], bool],
) -> tuple[tuple[Counter, ...], int]:
    cap = _cap(lim) or Decimal(0)
    length = _PERIOD.get(lim.per or "")
    current = _current_window(length, at)
    out: list[Counter] = []
    skipped = 0
    for row in rows:
        end = _window_end(row.window, length)
        # Only the window the limit counts in now is live: an ended one, and
        # one of another shape (the limit's `per` or kind was edited, same id),
        # are counted by no call.
        if row.window != current or (lim.scope == "run" and not alive(row.scope)):
            skipped += 1
            continue
        out.append(
            Counter(
                scope=row.scope,
                window_start=row.window,
                window_end=end,
                used=row.used,
                held=row.held,
                holds=row.holds,
                cap=cap,
                left=max(cap - row.used - row.held, Decimal(0)),
            )
        )
    return tuple(sorted(out, key=lambda c: c.scope)), skipped


def _cap(lim: Limit) -> Decimal | None:
    if lim.kind == "budget":
        return lim.amount
    if lim.max is not None:
        return Decimal(lim.max)
    return None


def _limit_status(lim: Limit, counters: tuple[Counter, ...]) -> LimitStatus:
    is_rate = lim.kind == "rate"
    return LimitStatus(
        id=lim.id,
        kind=lim.kind,
        scope=lim.scope,
        per=lim.per,
        cap=_cap(lim),
        rate=lim.rate if is_rate else None,
        burst=lim.burst if is_rate else None,
        counters=counters,
    )


def _retry_status(
    retry: RetryBudget,
    rows: Iterable[LimitRow],
    at: datetime,
    alive: Callable[[str], bool],
) -> tuple[RetryStatus, int]:
    runs: list[RetryCounter] = []
    incidents: list[RetryCounter] = []
    windows: dict[tuple[str, datetime], dict[str, Decimal]] = {}
    current = _current_window(retry.window, at)
    skipped = 0
    for row in rows:
        if row.window is None:
            if row.limit_id == _RUN_BUDGET:
                if alive(row.scope):
                    runs.append(_retry_counter(row, retry.per_run))
                else:
                    skipped += 1
            else:  # `_is_retry_row` takes incident rows only with `per_incident`
                assert retry.per_incident is not None
                incidents.append(_retry_counter(row, retry.per_incident))
            continue
        if row.window != current:  # ended, or of a `window:` since edited
            skipped += 1
            continue
        name = row.limit_id.removeprefix(_RETRY_PREFIX)
        part = "retries"
        if name.endswith(_CALLS_SUFFIX):
            name, part = name.removesuffix(_CALLS_SUFFIX), "calls"
        windows.setdefault((name, row.window), {})[part] = row.used
    ratio = Decimal(str(retry.ratio))  # as the store compares it
    capabilities = []
    for (name, start), counts in sorted(windows.items()):
        retries = counts.get("retries", Decimal(0))
        calls = counts.get("calls", Decimal(0))
        allowed = max(ratio * calls, Decimal(retry.min_retries))
        capabilities.append(
            CapabilityRetries(
                capability=name,
                window_start=start,
                window_end=start + retry.window,
                retries=int(retries),
                calls=int(calls),
                allowed=allowed,
                # Whole retries: the store admits one while retries + 1 <= allowed.
                left=max(math.floor(allowed - retries), 0),
            )
        )
    report = RetryStatus(
        per_run=retry.per_run,
        per_incident=retry.per_incident,
        incident=retry.incident,
        max_attempts=retry.max_attempts,
        ratio=ratio,
        min_retries=retry.min_retries,
        window=retry.window,
        runs=tuple(sorted(runs, key=lambda r: r.scope)),
        incidents=tuple(sorted(incidents, key=lambda r: r.scope)),
        capabilities=tuple(capabilities),
    )
    return report, skipped


def _retry_counter(row: LimitRow, cap: int) -> RetryCounter:
    used = int(row.used)
    return RetryCounter(scope=row.scope, used=used, cap=cap, left=max(cap - used, 0))


def _unconfigured(
    rows: Iterable[LimitRow],
) -> tuple[tuple[UnconfiguredCounter, ...], int]:
    """Keep the latest window of each (limit, scope): the window lengths are unknown."""
    latest: dict[tuple[str, str], LimitRow] = {}
    skipped = 0
    for row in rows:
        key = (row.limit_id, row.scope)
        seen = latest.get(key)
        if seen is not None:
            skipped += 1
            latest[key] = max(seen, row, key=_start_us)
        else:
            latest[key] = row
    out = tuple(
        UnconfiguredCounter(
            limit_id=row.limit_id,
            scope=row.scope,
            window_start=row.window,
            used=row.used,
            held=row.held,
            holds=row.holds,
        )
        for _, row in sorted(latest.items())
    )
    return out, skipped


def _start_us(row: LimitRow) -> int:
    return 0 if row.window is None else to_us(row.window)


def _since(us: int) -> datetime | None:
    return from_us(us) if us else None


def _breaker_status(b: Breaker, row: BreakerRow, at: datetime) -> BreakerStatus:
    spec = b.spec()
    view, _ = breaker_view(row, spec, to_us(at))
    outcomes = view.outcomes
    n = len(outcomes)
    failed = sum(1 for c in outcomes if c in "13")
    slow = sum(1 for c in outcomes if c in "23")
    waiting = view.state is BreakerState.HALF_OPEN and view.probes > n
    return BreakerStatus(
        id=b.id,
        resource=b.resource,
        state=view.state.value,
        since=_since(view.since),
        calls=n,
        window=spec.window,
        failure_rate=failed / n if n else None,
        slow_rate=slow / n if n else None,
        threshold=spec.failure_rate,
        min_calls=spec.min_calls,
        probes=view.probes if view.state is BreakerState.HALF_OPEN else 0,
        half_open_calls=spec.probes,
        probe_deadline=from_us(view.probe_deadline) if waiting else None,
        retry_at=from_us(view.since + spec.open_us)
        if view.state is BreakerState.OPEN
        else None,
        on_open=b.on_open,
    )
