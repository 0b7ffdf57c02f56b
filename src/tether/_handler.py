"""Handler introspection: how to call a capability's function, worked out once.

A handler takes its validated arguments (a pydantic model) and, optionally, a
`CallContext` as its second parameter, and returns a pydantic model; it may be
sync or async. `handler_shape` reads all of that from the function's signature
and annotations when the capability is declared, so the call path does no
introspection: the gateway reads the resulting `Handler`'s flags.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, get_type_hints

from pydantic import BaseModel

from tether.errors import UsageError

__all__ = ["CallContext", "Handler", "HandlerFn", "handler_shape"]

HandlerFn: TypeAlias = "Callable[..., Any]"
"""A function a capability wraps, before `handler_shape` has checked it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallContext:
    """What a handler may know about the call it serves (its optional 2nd parameter)."""

    run_id: str
    """The run this step belongs to."""
    step: int
    """The step's number in the run, from 1."""
    capability: str
    """The capability's name."""
    idempotency_key: str | None
    """The key to pass on to an upstream that deduplicates (a payments API, say)."""
    dry_run: bool
    """True when the dry-run handler is serving the call."""


@dataclass(frozen=True, slots=True)
class Handler:
    """A handler function with what the gateway needs to know to call it."""

    fn: HandlerFn
    """The function itself."""
    is_async: bool
    """True for a coroutine function."""
    wants_ctx: bool
    """True when it takes a second `ctx: CallContext` parameter."""


def handler_shape(
    fn: HandlerFn, name: str, role: str
) -> tuple[Handler, type[BaseModel], type[BaseModel]]:
    """Return `fn` as a `Handler`, with its input and output models.

    Args:
        fn: the function to inspect.
        name: the capability's name, for messages.
        role: what `fn` is to the capability (`"handler"`, `"dry-run handler"`).

    Raises:
        UsageError: `fn` is not callable, takes neither (args) nor (args, ctx), or
            its argument or return annotation is not a pydantic model.
    """
    if not callable(fn):
        raise UsageError(f"capability {name!r}: {role} {fn!r} is not callable")
    params = list(inspect.signature(fn).parameters.values())
    if not 1 <= len(params) <= 2:
        raise UsageError(
            f"capability {name!r}: {role} {fn.__qualname__} must take (args) or "
            f"(args, ctx: tether.CallContext), got {len(params)} parameters"
        )
    try:
        hints = get_type_hints(fn)
    except NameError as exc:
        raise UsageError(
            f"capability {name!r}: cannot resolve the annotations of "
            f"{fn.__qualname__} ({exc}); define the models at module level"
        ) from exc
    in_model = _model(hints.get(params[0].name), name, fn, "argument")
    out_model = _model(hints.get("return"), name, fn, "return")
    shape = Handler(
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        wants_ctx=len(params) == 2,
    )
    return shape, in_model, out_model


def _model(annotation: object, name: str, fn: HandlerFn, what: str) -> type[BaseModel]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    raise UsageError(
        f"capability {name!r}: {fn.__qualname__}'s {what} annotation must be "
        f"a pydantic BaseModel subclass, got {annotation!r}"
    )
