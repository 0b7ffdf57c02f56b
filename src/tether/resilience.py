"""Circuit breakers per resource, retry budgets and their backoff.

`tether.yaml` declares breakers under `breakers:` and the retry budget under
`retry_budget:`. A breaker's state lives in the store, shared by every process
(see `tether.store._limits` for its rules); here is what the config says and
what the call path asks of it.

Example (`tether.yaml`):
    ```yaml
    breakers:
      - {id: payments-api, resource: payments-api, failure_rate: 0.5, window: 20,
         open_for: 30s, on_open: escalate}
    retry_budget: {per_run: 5, max_attempts: 3, ratio: 0.1, min_retries: 3}
    ```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal

import pydantic

from tether._units import Duration
from tether.clock import Rng
from tether.store._breakers import BreakerSpec
from tether.store._limits import RetryCharge

__all__ = [
    "INCIDENT_RETRIES",
    "RETRY_PREFIX",
    "RUN_RETRIES",
    "Breaker",
    "BreakerSet",
    "DegradedMode",
    "RetryBudget",
    "SlowCall",
    "ratio_id",
]

DegradedMode = Literal["escalate", "stash", "read_only"]

# The retry budget keeps its counters beside the limits', under ids no limit can
# have (a limit id starts with a letter or a digit).
RETRY_PREFIX = ":retry:"
"""Every retry counter's id starts with this."""
RUN_RETRIES = RETRY_PREFIX + "run"
"""The counter of retries per run (scope: the run id)."""
INCIDENT_RETRIES = RETRY_PREFIX + "incident"
"""The counter of retries per incident (scope: the incident)."""
_US = timedelta(microseconds=1)


class SlowCall(pydantic.BaseModel, extra="forbid", frozen=True):
    """When calls count as slow, and what share of slow calls opens the breaker."""

    duration: Duration
    rate: float = pydantic.Field(default=1.0, gt=0, le=1)


class Breaker(
    pydantic.BaseModel,
    extra="forbid",
    frozen=True,
    json_schema_extra={"x-unique": ["resource"]},  # one breaker per resource
):
    """One entry of `breakers:` in `tether.yaml`: a circuit breaker over a resource."""

    id: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
    resource: str = pydantic.Field(min_length=1)
    """The upstream (a capability's `resource`) whose calls it watches."""
    failure_rate: float = pydantic.Field(default=0.5, gt=0, le=1)
    """Opens when this share of the window's calls failed..."""
    window: int = pydantic.Field(default=20, ge=1, le=1000)
    """...over this many most recent calls..."""
    min_calls: int | None = pydantic.Field(default=None, ge=1)
    """...once at least this many are in the window (default: the window)."""
    slow_call: SlowCall | None = None
    open_for: Duration = timedelta(seconds=30)
    """How long it refuses calls once open, before it lets trial calls through."""
    half_open_calls: int = pydantic.Field(default=1, ge=1, le=100)
    """Trial calls let through half-open; all answered, it closes or reopens."""
    probe_timeout: Duration = timedelta(seconds=60)
    """How long half-open waits for a trial call's answer before it reopens."""
    on_open: DegradedMode = "escalate"
    """What a call refused by the open breaker does instead: `escalate` (a person
    decides), `stash` (the run parks `degraded` with its remaining plan) or
    `read_only` (reads still go through, writes are refused)."""

    @pydantic.model_validator(mode="after")
    def _min_fits(self) -> Breaker:
        if self.min_calls is not None and self.min_calls > self.window:
            raise ValueError(
                f"min_calls {self.min_calls} is more than the window ({self.window}); "
                "the breaker could never open"
            )
        return self

    def spec(self) -> BreakerSpec:
        """Return the settings as the store applies them."""
        slow = self.slow_call
        return BreakerSpec(
            id=self.id,
            window=self.window,
            min_calls=self.min_calls or self.window,
            failure_rate=self.failure_rate,
            slow_rate=slow.rate if slow else 1.0,
            slow_us=slow.duration // _US if slow else 0,
            open_us=self.open_for // _US,
            probes=self.half_open_calls,
            probe_timeout_us=self.probe_timeout // _US,
        )


class BreakerSet:
    """The `breakers:` of one config version, by resource."""

    def __init__(self, breakers: Sequence[Breaker]) -> None:
        self.breakers = tuple(breakers)
        self._by_resource: dict[str, tuple[Breaker, BreakerSpec]] = {
            b.resource: (b, b.spec()) for b in self.breakers
        }

    def __bool__(self) -> bool:
        return bool(self.breakers)

    def for_resource(self, resource: str | None) -> tuple[Breaker, BreakerSpec] | None:
        """Return the breaker watching `resource`, if any."""
        if resource is None:
            return None
        return self._by_resource.get(resource)


class RetryBudget(pydantic.BaseModel, extra="forbid", frozen=True):
    """`retry_budget:` in `tether.yaml`: how many failed calls tether retries, and how.

    Only calls that are safe to repeat are retried: `keyed` and `native`
    capabilities (under the same idempotency key) and reads. A retry is spent
    only when every bound allows it; otherwise the failure goes back to the
    caller (or the planner) at once.
    """

    per_run: int = pydantic.Field(default=5, ge=0)
    """Retries one run may spend across all its steps."""
    per_incident: int | None = pydantic.Field(default=None, ge=0)
    """Retries all runs of one incident may spend together (needs `incident`)."""
    incident: str | None = None
    """The run context field naming the incident (e.g. `ticket`)."""
    max_attempts: int = pydantic.Field(default=3, ge=1, le=10)
    """Attempts per call, the first included."""
    ratio: float = pydantic.Field(default=0.1, ge=0, le=1)
    """Retries per capability may be at most this share of its calls in a window..."""
    min_retries: int = pydantic.Field(default=3, ge=0)
    """...but this many per window are always allowed (quiet capabilities stay retryable)."""
    window: Duration = timedelta(minutes=1)
    backoff: Duration = timedelta(milliseconds=100)
    """The first retry waits up to this long; each next one up to twice as long..."""
    backoff_cap: Duration = timedelta(seconds=10)
    """...never more than this. Each wait is drawn at random below its bound (full jitter)."""

    @pydantic.model_validator(mode="after")
    def _incident_named(self) -> RetryBudget:
        if (self.per_incident is None) != (self.incident is None):
            raise ValueError(
                "per_incident and incident go together: name the context field"
            )
        if self.backoff > self.backoff_cap:
            raise ValueError(
                f"backoff ({self.backoff}) is longer than backoff_cap "
                f"({self.backoff_cap}); the cap bounds every wait"
            )
        return self

    def delay(self, attempt: int, rng: Rng) -> timedelta:
        """Return the wait before retry number `attempt` (from 1): full jitter."""
        bound = min(self.backoff * 2 ** (attempt - 1), self.backoff_cap)
        return timedelta(microseconds=int(rng.uniform(0, bound / _US)))

    def charge(
        self,
        *,
        capability: str,
        run_id: str,
        context: Mapping[str, Any],
        window: int,
        breaker: BreakerSpec | None = None,
        generation: int | None = None,
    ) -> RetryCharge:
        """Return the store command that spends one retry."""
        counters = [(RUN_RETRIES, run_id, Decimal(self.per_run))]
        if self.incident is not None and self.per_incident is not None:
            incident = context.get(self.incident)
            if incident is not None:
                counters.append(
                    (INCIDENT_RETRIES, str(incident), Decimal(self.per_incident))
                )
        return RetryCharge(
            counters=counters,
            ratio_id=ratio_id(capability),
            window=window,
            ratio=Decimal(str(self.ratio)),
            floor=self.min_retries,
            breaker=breaker,
            generation=generation,
        )


def ratio_id(capability: str) -> str:
    """Return the counter id of a capability's retries (its calls: + `:calls`)."""
    return f"{RETRY_PREFIX}{capability}"
