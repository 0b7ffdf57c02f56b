"""Capabilities: `@tether.capability(...)`, which describes a function as one.

The decorator only describes: it checks the declaration (name, effect,
idempotency, timeout) and returns a `Capability`; an app's `register` makes it
callable through the gateway. Everything the gateway needs to know about a
handler (sync or async, wants a `CallContext`, its models) is worked out once,
at definition time, so the call path does no introspection.

The rest of the family lives in private modules and is re-exported here, so
`from tether.capability import Capability` keeps working: the `Capability` type
with `Effect`, `Idempotency` and idempotency-key checks (`tether._capability_spec`),
handler introspection with `Handler` and `CallContext` (`tether._handler`), and
the `Registry` (`tether._registry`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any, overload

# Not in __all__ (it never was), but still reachable here as before the split.
from tether._capability_spec import MAX_ARGS_BYTES as MAX_ARGS_BYTES
from tether._capability_spec import (
    MAX_KEY_LENGTH,
    Capability,
    Cost,
    Effect,
    Idempotency,
    In,
    Out,
    Precondition,
    check_key,
    one_line_error,
)
from tether._handler import CallContext, Handler, HandlerFn
from tether._registry import Registry
from tether._units import parse_duration
from tether.errors import UsageError

__all__ = [
    "MAX_KEY_LENGTH",
    "CallContext",
    "Capability",
    "Effect",
    "Handler",
    "Idempotency",
    "Registry",
    "capability",
    "check_key",
    "one_line_error",
]

_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$|^[a-z][a-z0-9_]*$")


_Sync1 = Callable[[In], Out]
_Sync2 = Callable[[In, CallContext], Out]
_Async1 = Callable[[In], Awaitable[Out]]
_Async2 = Callable[[In, CallContext], Awaitable[Out]]


class _Decorator:
    """The typed decorator `capability(...)` returns."""

    __slots__ = ("_kwargs",)

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self._kwargs = kwargs

    @overload
    def __call__(self, fn: _Sync1[In, Out]) -> Capability[In, Out]: ...
    @overload
    def __call__(self, fn: _Sync2[In, Out]) -> Capability[In, Out]: ...
    @overload
    def __call__(self, fn: _Async1[In, Out]) -> Capability[In, Out]: ...
    @overload
    def __call__(self, fn: _Async2[In, Out]) -> Capability[In, Out]: ...
    def __call__(self, fn: HandlerFn) -> Capability[Any, Any]:
        return Capability(fn, **self._kwargs)


def capability(
    name: str,
    *,
    version: str = "1",
    effect: Effect | str = Effect.READ,
    idempotency: Idempotency | str | None = None,
    dry_run: HandlerFn | None = None,
    preconditions: Sequence[Precondition] = (),
    cost: Cost = 0,
    scopes: Sequence[str] = (),
    timeout: timedelta | float | None = None,
    resource: str | None = None,
    description: str | None = None,
    actual_cost: Callable[[Any], int | Decimal | str | float] | None = None,
    requires_approval: bool = False,
) -> _Decorator:
    """Describe a function as a capability; register it with `Tether.register`.

    The input and output models come from the function's annotations: its first
    parameter and its return type are pydantic models. An optional second
    parameter `ctx: tether.CallContext` receives the run, step and key.

    Args:
        name: dotted lowercase name, e.g. `"infra.restart"`.
        version: the capability's version; part of every record.
        effect: `read`, `write` or `destructive`.
        idempotency: `native`, `keyed` or `none`; default `native` for reads and
            `none` otherwise.
        dry_run: a handler with the same signature that predicts the result
            without acting; required when `effect` is `destructive`.
        preconditions: checks on the validated args; each returns True (or
            None) when met, False or a reason string when not.
        cost: a number >= 0, or a function of the args returning one: the
            estimate that budgets reserve before the call.
        actual_cost: a function of the output returning what the call really
            cost (a payments API's fee, say); budgets settle at it. Default:
            the estimate.
        requires_approval: every call needs a person's approval (a durable
            request), whatever the policy allows; a deny still denies.
        scopes: scopes a principal needs to call it.
        timeout: seconds or a `timedelta`; None (the default) runs sync handlers
            inline without a deadline, since a worker thread per call costs more
            than the whole call path. A timed-out `none` step is in doubt.
        resource: the upstream the capability depends on (breakers key on it).
        description: for LLM tool schemas; default the function's docstring.

    Raises:
        UsageError: the declaration is invalid (bad name, missing dry-run for a
            destructive capability, annotations that are not models).

    Example:
        ```python
        class PingIn(BaseModel):
            host: str

        class PingOut(BaseModel):
            up: bool

        @tether.capability("net.ping", effect="read")
        def ping(args: PingIn) -> PingOut:
            return PingOut(up=True)
        ```
    """
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"capability name {name!r} is invalid; use dotted lowercase words "
            "like 'infra.restart'"
        )
    try:
        eff = Effect(effect)
        idem = (
            Idempotency(idempotency)
            if idempotency is not None
            else (Idempotency.NATIVE if eff is Effect.READ else Idempotency.NONE)
        )
    except ValueError as exc:
        raise UsageError(f"capability {name!r}: {exc}") from exc
    if timeout is not None:
        given = timeout
        try:
            timeout = parse_duration(timeout)
        except ValueError as exc:
            raise UsageError(
                f"capability {name!r}: timeout must be > 0 seconds or a timedelta, "
                f"got {given!r} ({exc}); leave it out for no deadline"
            ) from None
    return _Decorator(
        {
            "name": name,
            "version": str(version),
            "effect": eff,
            "idempotency": idem,
            "dry_run": dry_run,
            "preconditions": preconditions,
            "cost": cost,
            "scopes": scopes,
            "timeout": timeout,
            "resource": resource,
            "description": description,
            "actual_cost": actual_cost,
            "requires_approval": bool(requires_approval),
        }
    )
