"""The status report's types and their JSON form: what `tether.status.status` returns.

A `StatusReport` holds, as of one instant, every configured limit with its live
counters (`LimitStatus`, `Counter`), every configured breaker (`BreakerStatus`),
the retry budget and what has been spent of it (`RetryStatus`, `RetryCounter`,
`CapabilityRetries`), and what the store still holds for limits and breakers no
longer in `tether.yaml` (`UnconfiguredCounter`, `UnconfiguredBreaker`).
`StatusReport.to_json` gives the one JSON document `tether status --json` prints.
The values are plain frozen data: building them from a store is `tether.status`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

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
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Counter:
    """One live counter of a limit: one scope, in its current window."""

    scope: str
    """Whose counter: a run id, `tenant/principal`, a tenant, a capability, or `*`."""
    window_start: datetime | None
    """When the window began; None for a run's lifetime or a limit without windows."""
    window_end: datetime | None
    """When the window ends and the counter starts again from 0; None when it never does."""
    used: Decimal
    """Settled cost (budgets) or calls counted (quotas) in the window; 0 for caps."""
    held: Decimal
    """Reserved by calls still running: estimated costs (budgets), leases (caps)."""
    holds: int
    """Live reservations or leases: calls in flight now."""
    cap: Decimal
    """The limit: a budget's `amount`, a quota's or a cap's `max`."""
    left: Decimal
    """`cap - used - held`, never below 0: what the next calls may take."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitStatus:
    """One entry of `limits:` and its live counters."""

    id: str
    kind: str
    """`quota`, `budget`, `concurrency` or `rate`."""
    scope: str
    """Whose counters: `run`, `principal`, `tenant`, `capability` or `global`."""
    per: str | None
    """The window: `minute`, `hour`, `day`, `run`; None for caps and rates."""
    cap: Decimal | None
    """A budget's `amount`, a quota's or a cap's `max`; None for rates."""
    rate: float | None
    """Rate limits: calls per second; None otherwise."""
    burst: int | None
    """Rate limits: calls allowed at once; None otherwise."""
    counters: tuple[Counter, ...]
    """The live counters, by scope. Rate limits have none here: their state
    (a theoretical arrival time) is not a count."""

    @property
    def unused(self) -> bool:
        """Tell whether nothing counts against the limit now (never for rates: unknown)."""
        return not self.counters and self.kind != "rate"


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStatus:
    """One entry of `breakers:`, as it stands now."""

    id: str
    resource: str
    state: str
    """`closed`, `open` or `half_open`, as of the report's time."""
    since: datetime | None
    """When it entered `state`; None for a breaker that never moved."""
    calls: int
    """Closed: the calls in its outcomes window. Half-open: trial calls answered."""
    window: int
    """How many recent calls the rates are taken over (`window`)."""
    failure_rate: float | None
    """The share of `calls` that failed; None without calls."""
    slow_rate: float | None
    """The share of `calls` that were slow; None without calls."""
    threshold: float
    """The failure rate that opens it (`failure_rate` in `tether.yaml`)."""
    min_calls: int
    """The calls needed in the window before it may open."""
    probes: int
    """Half-open: trial calls let through so far."""
    half_open_calls: int
    """How many trial calls half-open lets through."""
    probe_deadline: datetime | None
    """Half-open with a trial call out: when it reopens if that call does not answer."""
    retry_at: datetime | None
    """Open: when its cool-down ends and trial calls go through."""
    on_open: str
    """What a refused call does instead: `escalate`, `stash` or `read_only`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryCounter:
    """Retries one run (or one incident) has spent, against its budget."""

    scope: str
    """The run id, or the incident (the value of the context field `incident`)."""
    used: int
    cap: int
    left: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CapabilityRetries:
    """A capability's retries in the current window, against its share of its calls."""

    capability: str
    window_start: datetime
    window_end: datetime
    retries: int
    calls: int
    """Calls that ended in the window (the retries' denominator)."""
    allowed: Decimal
    """`max(ratio * calls, min_retries)`: the retries the window allows."""
    left: int
    """The whole retries the window still admits: `allowed - retries`, rounded
    down (a retry needs `retries + 1 <= allowed`), never below 0."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryStatus:
    """`retry_budget:` and what has been spent of it."""

    per_run: int
    per_incident: int | None
    incident: str | None
    max_attempts: int
    ratio: Decimal
    min_retries: int
    window: timedelta
    runs: tuple[RetryCounter, ...]
    """Runs that have retried and have not finished."""
    incidents: tuple[RetryCounter, ...]
    capabilities: tuple[CapabilityRetries, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class UnconfiguredCounter:
    """A counter of a limit id no longer in `tether.yaml` (its latest window)."""

    limit_id: str
    scope: str
    window_start: datetime | None
    used: Decimal
    held: Decimal
    holds: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnconfiguredBreaker:
    """A stored breaker no longer in `tether.yaml`, as it was last stored."""

    id: str
    state: str
    since: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReport:
    """Every limit, breaker and retry budget of an app, as of `at`."""

    at: datetime
    """The time the report describes, aware UTC."""
    config: str | None
    """The `tether.yaml` read; None when the app has none."""
    limits: tuple[LimitStatus, ...]
    """Every configured limit, in file order."""
    breakers: tuple[BreakerStatus, ...]
    """Every configured breaker, in file order."""
    retry_budget: RetryStatus | None
    """None when `tether.yaml` has no `retry_budget:` (tether then never retries)."""
    unconfigured: tuple[UnconfiguredCounter, ...]
    unconfigured_breakers: tuple[UnconfiguredBreaker, ...]
    hidden: int
    """Counters not shown: their window has ended, or their run has finished."""
    clock_skew: timedelta | None = None
    """How far the app's clock is ahead of the store's; None when the store has
    no clock of its own (SQLite, memory)."""

    @property
    def configured(self) -> bool:
        """Tell whether `tether.yaml` declares any limit, breaker or retry budget."""
        return bool(self.limits or self.breakers or self.retry_budget)

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict: Decimals as text, times ISO 8601."""
        retry = self.retry_budget
        return {
            "at": self.at.isoformat(),
            "config": self.config,
            "clock_skew_s": None
            if self.clock_skew is None
            else round(self.clock_skew.total_seconds(), 6),
            "limits": [
                {
                    "id": lim.id,
                    "kind": lim.kind,
                    "scope": lim.scope,
                    "per": lim.per,
                    "cap": _text(lim.cap),
                    "rate": lim.rate,
                    "burst": lim.burst,
                    "unused": lim.unused,
                    "counters": [
                        {
                            "scope": c.scope,
                            "window_start": _iso(c.window_start),
                            "window_end": _iso(c.window_end),
                            "used": str(c.used),
                            "held": str(c.held),
                            "holds": c.holds,
                            "cap": str(c.cap),
                            "left": str(c.left),
                        }
                        for c in lim.counters
                    ],
                }
                for lim in self.limits
            ],
            "breakers": [
                {
                    "id": b.id,
                    "resource": b.resource,
                    "state": b.state,
                    "since": _iso(b.since),
                    "calls": b.calls,
                    "window": b.window,
                    "failure_rate": b.failure_rate,
                    "slow_rate": b.slow_rate,
                    "threshold": b.threshold,
                    "min_calls": b.min_calls,
                    "probes": b.probes,
                    "half_open_calls": b.half_open_calls,
                    "probe_deadline": _iso(b.probe_deadline),
                    "retry_at": _iso(b.retry_at),
                    "on_open": b.on_open,
                }
                for b in self.breakers
            ],
            "retry_budget": None
            if retry is None
            else {
                "per_run": retry.per_run,
                "per_incident": retry.per_incident,
                "incident": retry.incident,
                "max_attempts": retry.max_attempts,
                "ratio": str(retry.ratio),
                "min_retries": retry.min_retries,
                "window_s": retry.window.total_seconds(),
                "runs": [_retry_json(r) for r in retry.runs],
                "incidents": [_retry_json(r) for r in retry.incidents],
                "capabilities": [
                    {
                        "capability": c.capability,
                        "window_start": c.window_start.isoformat(),
                        "window_end": c.window_end.isoformat(),
                        "retries": c.retries,
                        "calls": c.calls,
                        "allowed": str(c.allowed),
                        "left": str(c.left),
                    }
                    for c in retry.capabilities
                ],
            },
            "unconfigured": {
                "counters": [
                    {
                        "limit_id": u.limit_id,
                        "scope": u.scope,
                        "window_start": _iso(u.window_start),
                        "used": str(u.used),
                        "held": str(u.held),
                        "holds": u.holds,
                    }
                    for u in self.unconfigured
                ],
                "breakers": [
                    {"id": b.id, "state": b.state, "since": _iso(b.since)}
                    for b in self.unconfigured_breakers
                ],
            },
            "hidden": self.hidden,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def _retry_json(r: RetryCounter) -> dict[str, Any]:
    return {"scope": r.scope, "used": r.used, "cap": r.cap, "left": r.left}
