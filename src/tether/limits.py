"""Quotas, cost budgets, concurrency leases and rate limits over the store.

`tether.yaml` declares them under `limits:`; `LimitSet` compiles the list once
per config version and answers, for each step, which limits it takes room in
(`reserve`) and how each settles (`settle`). The counting itself happens in the
store, inside the step's own write (see `tether.store._limits`), so every
process sharing the database shares one truth and a refused step writes nothing.

Example (`tether.yaml`):
    ```yaml
    limits:
      - {id: refund-budget, kind: budget, scope: tenant, per: day, amount: 50000,
         capability: payments.refund, cost: "args.amount_cents"}
      - {id: restarts, kind: concurrency, capability: infra.restart, max: 2}
      - {id: refunds-per-hour, kind: quota, capability: payments.refund, per: hour, max: 20}
      - {id: k8s-api, kind: rate, resource: k8s, rate: 10/s, burst: 5}
    ```
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

import pydantic

from tether._units import Amount, Duration
from tether.policy.cel import CelError, Condition, Scope, compile_condition
from tether.policy.rules import (
    CapabilityGlobs,
    EffectName,
    OneOrMany,
    refuse_empty_lists,
)
from tether.principal import Principal
from tether.store._limits import LimitKind, Reserve, Settle, to_us

__all__ = [
    "LLM_CAPABILITY",
    "RUN_BUDGET",
    "Limit",
    "LimitSet",
    "ModelBudget",
    "Reserved",
    "Throttle",
    "scope_key",
]

LLM_CAPABILITY = "llm"
"""The capability name a planner's model usage is charged as (see `Run.charge_usage`)."""

RUN_BUDGET = "run budget"
"""What a refusal names the run's own budget (`Tether.run(budget=...)`) as: with
its space it is no valid limit id, so never a limit's of `tether.yaml`."""

Scope_ = Literal["run", "principal", "tenant", "capability", "global"]
Per = Literal["minute", "hour", "day", "run"]
_PERIOD = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?\s*$")
_PER_SECOND = {"s": 1, "m": 60, "h": 3600}


def _parse_rate(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(  # noqa: TRY004  # pydantic reports ValueError, not TypeError
            f"{value!r} is not a rate; write e.g. 10 or '600/m'"
        )
    m = _RATE.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(
            f"{value!r} is not a rate; write calls per second (10) or '600/m'"
        )
    rate = float(m.group(1)) / _PER_SECOND[m.group(2) or "s"]
    if rate > 1e6:
        # Intervals are whole microseconds: a faster rate would be no limit at all.
        raise ValueError(
            f"{value!r} is more than 1000000 calls per second, the finest rate "
            "tether counts; drop the limit if it should never refuse"
        )
    return rate


class Throttle(pydantic.BaseModel, extra="forbid", frozen=True):
    """Slow calls down instead of refusing them while a budget burns too fast."""

    max_delay: Duration
    """The longest a call is held back: the floor of the pace (one call per max_delay)."""
    min_cost: Amount = Decimal(0)
    """Calls whose estimated cost is below this are never slowed."""


class Limit(pydantic.BaseModel, extra="forbid", frozen=True):
    """One entry of `limits:` in `tether.yaml`."""

    id: str = pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
    kind: Literal["quota", "budget", "concurrency", "rate"]
    scope: Scope_ = "global"
    """Whose counter: one per run, principal, tenant or capability, or one for all."""
    per: Per | None = None
    """The window quotas and budgets count over; `run` is the run's lifetime."""
    capability: CapabilityGlobs = ()
    """Capability names or globs it applies to (empty: all)."""
    resource: OneOrMany = ()
    """Upstream resources it applies to (empty: all)."""
    effect: Annotated[
        tuple[EffectName, ...],
        pydantic.BeforeValidator(lambda v: (v,) if isinstance(v, str) else v),
    ] = ()
    max: int | None = pydantic.Field(default=None, ge=1)
    """Quotas: calls per window. Concurrency caps: calls in flight."""
    amount: Amount | None = None
    """Budgets: what the window may cost, in the capabilities' cost unit."""
    cost: str | None = None
    """Budgets: a CEL expression for a call's cost (overrides the capability's)."""
    rate: Annotated[float, pydantic.BeforeValidator(_parse_rate)] | None = None
    """Rate limits: calls per second (`10`), or `'600/m'`, `'3600/h'`."""
    burst: int = pydantic.Field(default=1, ge=1)
    """Rate limits: calls allowed at once above the steady rate."""
    ttl: Duration | None = None
    """How long a reservation or lease holds if its worker dies (default: the key claim TTL)."""
    throttle: Throttle | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _no_empty_lists(cls, value: object) -> object:
        return refuse_empty_lists(
            value, ("capability", "resource", "effect"), "to apply to all"
        )

    @pydantic.model_validator(mode="after")
    def _fits_its_kind(self) -> Limit:
        kind = self.kind
        needs = {
            "quota": "max",
            "concurrency": "max",
            "budget": "amount",
            "rate": "rate",
        }
        if getattr(self, needs[kind]) is None:
            raise ValueError(f"a {kind} limit needs `{needs[kind]}`")
        allowed = {
            "quota": {"max"},
            "concurrency": {"max", "ttl"},
            "budget": {"amount", "cost", "throttle", "ttl"},
            "rate": {"rate", "burst"},
        }[kind]
        for name in ("max", "amount", "rate", "cost", "throttle", "ttl"):
            if getattr(self, name) is not None and name not in allowed:
                raise ValueError(f"a {kind} limit takes no `{name}`")
        if "burst" in self.model_fields_set and "burst" not in allowed:
            raise ValueError(f"a {kind} limit takes no `burst`")
        if kind in ("quota", "budget"):
            if self.per is None:
                raise ValueError(
                    f"a {kind} limit needs `per`: minute, hour, day or run"
                )
            if self.per == "run" and self.scope != "run":
                raise ValueError(
                    "`per: run` counts over one run's lifetime: use `scope: run`"
                )
        elif self.per is not None:
            raise ValueError(f"a {kind} limit takes no `per`")
        if LLM_CAPABILITY in self.capability and (
            kind != "budget" or self.cost is not None
        ):
            # `charges` skips these: the limit would load and never count usage.
            raise ValueError(
                f"model usage (`capability: {LLM_CAPABILITY}`) is charged to "
                "budgets only, at the cost the planner reports: use a budget "
                "without `cost`"
            )
        if self.throttle is not None and self.per not in _PERIOD:
            raise ValueError("a throttle paces a window: use per minute, hour or day")
        if self.cost is not None:
            try:
                compile_condition(self.cost)
            except CelError as exc:
                raise ValueError(f"cost does not compile: {exc}") from exc
        return self


_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a limit's reservations share, worked out once per config version."""

    kind: LimitKind
    cap: Decimal
    window_us: int
    ttl_us: int
    interval_us: int
    throttle_max_us: int
    throttle_min_cost: Decimal

    @classmethod
    def of(cls, lim: Limit, default_ttl: timedelta) -> _Plan:
        throttle = lim.throttle
        period = _PERIOD.get(lim.per or "")
        return cls(
            kind=LimitKind(lim.kind),
            cap=Decimal(lim.max) if lim.max is not None else (lim.amount or Decimal(0)),
            window_us=0 if period is None else period // _MICROSECOND,
            ttl_us=(lim.ttl or default_ttl) // _MICROSECOND,
            interval_us=int(1e6 / lim.rate) if lim.rate else 0,
            throttle_max_us=0
            if throttle is None
            else throttle.max_delay // _MICROSECOND,
            throttle_min_cost=Decimal(0) if throttle is None else throttle.min_cost,
        )


@dataclass(frozen=True, slots=True)
class Reserved:
    """One limit a step took room in, to settle when it ends."""

    limit: Limit
    reserve: Reserve
    own_cost: bool
    """The limit's `cost` expression set the amount (the capability's actual cost does not apply)."""


def scope_key(scope: str, *, run_id: str, principal: Principal, capability: str) -> str:
    """Return whose counter a limit of `scope` uses for this call."""
    if scope == "run":
        return run_id
    if scope == "principal":
        return f"{principal.tenant}/{principal.id}"
    if scope == "tenant":
        return principal.tenant
    if scope == "capability":
        return capability
    return "*"


class LimitSet:
    """The `limits:` of one config version, indexed by what a step is."""

    def __init__(self, limits: Sequence[Limit], *, default_ttl: timedelta) -> None:
        self.limits = tuple(limits)
        self.default_ttl = default_ttl
        self._costs: dict[str, Condition] = {
            lim.id: compile_condition(lim.cost) for lim in self.limits if lim.cost
        }
        self._index: dict[tuple[str, str, str | None], tuple[Limit, ...]] = {}
        self._plans: dict[str, _Plan] = {}

    def __bool__(self) -> bool:
        return bool(self.limits)

    def applying(
        self, capability: str, effect: str | None, resource: str | None
    ) -> tuple[Limit, ...]:
        """Return the limits a call of this capability takes room in (cached)."""
        key = (capability, effect or "", resource)
        found = self._index.get(key)
        if found is None:
            found = self._index[key] = tuple(
                lim
                for lim in self.limits
                if _matches(lim, capability, effect, resource)
            )
        return found

    def reserve(
        self,
        *,
        capability: str,
        effect: str,
        resource: str | None,
        timeout: timedelta | None,
        args: Mapping[str, Any],
        cost: Decimal,
        principal: Principal,
        run_id: str,
        context: Mapping[str, Any],
        now: datetime,
    ) -> list[Reserved]:
        """Return the reservations one step makes.

        Raises:
            CelError: a limit's cost expression failed on these args.
        """
        found = self.applying(capability, effect, resource)
        if not found:
            return []
        at = to_us(now)
        out: list[Reserved] = []
        for lim in found:
            plan = self._plans.get(lim.id)
            if plan is None:
                plan = self._plans[lim.id] = _Plan.of(lim, self.default_ttl)
            amount, own = Decimal(1), False
            if plan.kind is LimitKind.BUDGET:
                condition = self._costs.get(lim.id)
                if condition is not None:
                    amount, own = _cost(condition, args, principal, context), True
                else:
                    amount = cost
            ttl_us = plan.ttl_us
            if timeout is not None:
                # a lease must not lapse while its call may still run
                ttl_us = max(ttl_us, timeout // _MICROSECOND)
            reserve = Reserve(
                limit_id=lim.id,
                kind=plan.kind,
                scope=scope_key(
                    lim.scope, run_id=run_id, principal=principal, capability=capability
                ),
                window=at - at % plan.window_us if plan.window_us else 0,
                window_us=plan.window_us,
                amount=amount,
                cap=plan.cap,
                hold_until=at + ttl_us,
                interval_us=plan.interval_us,
                burst=lim.burst,
                throttle_max_us=plan.throttle_max_us,
                throttle_min_cost=plan.throttle_min_cost,
            )
            out.append(Reserved(limit=lim, reserve=reserve, own_cost=own))
        return out

    def model_budgets(
        self, *, principal: Principal, run_id: str, now: datetime
    ) -> list[ModelBudget]:
        """Return the budgets a planner's model usage is charged to (capability `llm`).

        Budgets with a `cost` expression are left out: it reads a step's args.
        """
        at = to_us(now)
        out = []
        for lim in self.applying(LLM_CAPABILITY, None, None):
            if lim.kind != "budget" or lim.cost is not None:
                continue
            window = length = 0
            if lim.per in _PERIOD:
                length = _PERIOD[lim.per] // timedelta(microseconds=1)
                window = at - at % length
            scope = scope_key(
                lim.scope, run_id=run_id, principal=principal, capability=LLM_CAPABILITY
            )
            out.append(
                ModelBudget(limit=lim, scope=scope, window=window, length_us=length)
            )
        return out

    def charges(
        self,
        *,
        principal: Principal,
        run_id: str,
        cost: Decimal,
        now: datetime,
    ) -> list[Settle]:
        """Return the budget charges for a planner's model usage (capability `llm`).

        Usage has happened when it is reported, so it is charged, never refused:
        a budget it overruns refuses the run's next reservation, and the run's
        next planner turn (`Run.check_turn_room`).
        """
        return [
            Settle(
                limit_id=b.limit.id,
                kind=LimitKind.BUDGET,
                scope=b.scope,
                window=b.window,
                run_id=run_id,
                step=0,
                actual=cost,
            )
            for b in self.model_budgets(principal=principal, run_id=run_id, now=now)
        ]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelBudget:
    """A budget that a planner's model usage is charged to, in its current counter."""

    limit: Limit
    scope: str
    """Whose counter (see `scope_key`)."""
    window: int
    """The window's start, µs since the epoch; 0 for a run's lifetime."""
    length_us: int
    """The window's length in µs; 0 when it has none."""


def _matches(
    lim: Limit, capability: str, effect: str | None, resource: str | None
) -> bool:
    if lim.capability and not any(
        fnmatch.fnmatchcase(capability, g) for g in lim.capability
    ):
        return False
    if lim.effect and effect not in lim.effect:
        return False
    return not lim.resource or resource in lim.resource


def _cost(
    condition: Condition,
    args: Mapping[str, Any],
    principal: Principal,
    context: Mapping[str, Any],
) -> Decimal:
    value = Scope(
        {
            "args": args,
            "principal": {
                "id": principal.id,
                "roles": list(principal.roles),
                "tenant": principal.tenant,
            },
            "context": dict(context),
        }
    ).value(condition)
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise CelError(f"the cost expression gave {value!r:.40}, not a number")
    result = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not result.is_finite() or result < 0:
        raise CelError(f"the cost expression gave {value!r:.40}, not an amount >= 0")
    return result
