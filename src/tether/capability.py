"""Capabilities: small typed actions, and the registry that holds them.

`@tether.capability(...)` only describes a function; an app's `register` makes it
callable through the gateway. Everything the gateway needs to know about a
handler (sync or async, wants a `CallContext`, its models) is worked out once
here, at definition time, so the call path does no introspection.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Generic, TypeAlias, TypeVar, get_type_hints, overload

import pydantic
from pydantic import BaseModel

from tether import _canonical
from tether.errors import InvalidKey, NotFound, UsageError, ValidationFailed

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

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)

_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$|^[a-z][a-z0-9_]*$")
MAX_ARGS_BYTES = 1 << 20
"""Largest accepted arguments, as canonical JSON bytes (1 MiB)."""
MAX_KEY_LENGTH = 255
"""Longest accepted idempotency key, in characters."""


def check_key(key: object) -> None:
    """Refuse an idempotency key that is empty, too long or not printable text.

    Raises:
        InvalidKey: with one line saying what a key may be.
    """
    if (
        not isinstance(key, str)
        or not 0 < len(key) <= MAX_KEY_LENGTH
        or not key.isprintable()
    ):
        raise InvalidKey(
            f"idempotency key {key!r:.80} is invalid; use 1 to {MAX_KEY_LENGTH} printable "
            "characters (no control characters)"
        )


class Effect(StrEnum):
    """What a capability does to the world."""

    READ = "read"
    WRITE = "write"
    DESTRUCTIVE = "destructive"


class Idempotency(StrEnum):
    """How a repeated call is made safe."""

    NATIVE = "native"
    """Safe to repeat as it is (reads, upserts)."""
    KEYED = "keyed"
    """tether deduplicates by idempotency key; a retry reuses the key."""
    NONE = "none"
    """Not safe to repeat: a call that started and failed is in doubt."""


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


Cost: TypeAlias = "int | Decimal | str | Callable[[Any], int | Decimal | str | float]"
Precondition: TypeAlias = "Callable[[Any], bool | str | None]"
_Handler: TypeAlias = "Callable[..., Any]"


def _to_decimal(value: object, what: str) -> Decimal:
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a number, got {value!r}")
    if isinstance(value, float):
        # A float cost would make budgets inexact; convert through its repr once.
        value = repr(value)
    try:
        result = Decimal(value)  # type: ignore[arg-type]  # validated by the except
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise UsageError(f"{what} must be a number, got {value!r}") from exc
    if not result.is_finite() or result < 0:
        raise UsageError(f"{what} must be a finite number >= 0, got {value!r}")
    return result


@dataclass(frozen=True, slots=True)
class Handler:
    """A handler function with what the gateway needs to know to call it."""

    fn: _Handler
    """The function itself."""
    is_async: bool
    """True for a coroutine function."""
    wants_ctx: bool
    """True when it takes a second `ctx: CallContext` parameter."""


def _shape(
    fn: _Handler, name: str, role: str
) -> tuple[Handler, type[BaseModel], type[BaseModel]]:
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


def _model(annotation: object, name: str, fn: _Handler, what: str) -> type[BaseModel]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    raise UsageError(
        f"capability {name!r}: {fn.__qualname__}'s {what} annotation must be "
        f"a pydantic BaseModel subclass, got {annotation!r}"
    )


class Capability(Generic[In, Out]):
    """One named, versioned action with typed input and output.

    Made by `@tether.capability(...)`; see that decorator for the fields.
    """

    __slots__ = (
        "_secret_paths",
        "actual_cost",
        "cost",
        "description",
        "dry_run_handler",
        "effect",
        "free_form",
        "handler",
        "idempotency",
        "input_model",
        "name",
        "output_model",
        "preconditions",
        "requires_approval",
        "resource",
        "scopes",
        "secret_output",
        "timeout",
        "version",
    )

    def __init__(
        self,
        fn: _Handler,
        *,
        name: str,
        version: str,
        effect: Effect,
        idempotency: Idempotency,
        dry_run: _Handler | None,
        preconditions: Sequence[Precondition],
        cost: Cost,
        scopes: Sequence[str],
        timeout: timedelta | None,
        resource: str | None,
        description: str | None,
        actual_cost: Callable[[Any], int | Decimal | str | float] | None = None,
        requires_approval: bool = False,
    ) -> None:
        self.name = name
        self.version = version
        self.effect = effect
        self.idempotency = idempotency
        self.input_model: type[In]
        self.output_model: type[Out]
        self.handler, self.input_model, self.output_model = _shape(  # type: ignore[assignment]  # the decorator's overloads bind In/Out to these models
            fn, name, "handler"
        )
        self.dry_run_handler: Handler | None = None
        if dry_run is not None:
            self.dry_run_handler, dry_in, dry_out = _shape(
                dry_run, name, "dry-run handler"
            )
            if dry_in is not self.input_model or dry_out is not self.output_model:
                raise UsageError(
                    f"capability {name!r}: the dry-run handler must take "
                    f"{self.input_model.__name__} and return "
                    f"{self.output_model.__name__}, like the handler"
                )
        elif effect is Effect.DESTRUCTIVE:
            raise UsageError(
                f"capability {name!r} is destructive and has no dry-run handler; "
                "pass dry_run=<function with the handler's signature>"
            )
        self.preconditions: tuple[Precondition, ...] = tuple(preconditions)
        self.cost = cost if callable(cost) else _to_decimal(cost, f"{name!r} cost")
        if actual_cost is not None and not callable(actual_cost):
            raise UsageError(
                f"capability {name!r}: actual_cost must be a function of the output"
            )
        self.actual_cost = actual_cost
        self.requires_approval = requires_approval
        self.scopes = tuple(sorted(set(scopes)))
        self.timeout = timeout
        self.resource = resource
        self.description = (description or inspect.getdoc(fn) or "").strip()
        schema = self.input_model.model_json_schema()
        self.free_form = _schema_is_free_form(schema)
        """Whether args may hold floats or free-form keys (then checked for exactness)."""
        self.secret_output = _has_secrets(self.output_model)
        """True when the output has secret fields: a stored result cannot be replayed."""
        self._secret_paths = _has_secrets(self.input_model) or self.secret_output

    # -- what the gateway asks -------------------------------------------------

    @property
    def has_secrets(self) -> bool:
        """True when the input or output model has a secret field."""
        return self._secret_paths

    def validate_args(self, raw: object, *, limit: int = MAX_ARGS_BYTES) -> In:
        """Validate `raw` (a mapping, a model or JSON text) against the input model.

        Raises:
            ValidationFailed: with one line naming the first bad field.
        """
        model = self.input_model
        try:
            if type(raw) is dict:  # the common case first: the call path is hot
                parsed: object = raw
            elif isinstance(raw, BaseModel):
                # Revalidated, own model included: model_construct() and attribute
                # assignment skip pydantic's checks. Python mode keeps secrets whole;
                # the serializer itself is a third of model_dump()'s cost.
                parsed = type(raw).__pydantic_serializer__.to_python(
                    raw, warnings=False
                )
            elif isinstance(raw, (str, bytes, bytearray)):
                if len(raw) > limit:
                    raise ValidationFailed(
                        f"{self.name}: arguments are {len(raw)} bytes, over the "
                        f"{limit}-byte limit; send less data"
                    )
                parsed = _canonical.loads_strict(
                    raw if isinstance(raw, str) else bytes(raw)
                )
            else:
                parsed = raw
            if self.free_form:
                problem = _canonical.inexact(parsed)
                if problem:
                    raise ValidationFailed(
                        f"{self.name}: arguments hold {problem}, which a record "
                        "cannot keep exactly; send finite numbers and valid text"
                    )
            # The validator itself: `model_validate`'s Python wrapper costs as much
            # again on a call path measured in microseconds.
            return model.__pydantic_validator__.validate_python(parsed)  # type: ignore[no-any-return]  # the model's own validator
        except pydantic.ValidationError as exc:
            raise ValidationFailed(one_line_error(self.name, "arguments", exc)) from exc
        except RecursionError as exc:
            raise ValidationFailed(
                f"{self.name}: arguments are nested too deeply; flatten them"
            ) from exc
        except ValueError as exc:
            if isinstance(exc, ValidationFailed):
                raise
            # orjson.JSONDecodeError: invalid JSON text or UTF-8.
            raise ValidationFailed(
                f"{self.name}: arguments are not JSON: {exc}"
            ) from exc

    def dump_args(
        self, args: BaseModel, *, limit: int = MAX_ARGS_BYTES
    ) -> tuple[dict[str, Any], bytes]:
        """Return validated args as JSON data (secrets masked) and canonical bytes.

        Raises:
            ValidationFailed: the args are over `limit` bytes as JSON, or hold a
                value JSON cannot carry exactly (an integer beyond 64 bits, say).
        """
        try:
            data: dict[str, Any] = type(args).__pydantic_serializer__.to_python(
                args, mode="json"
            )
        except ValueError as exc:  # pydantic: "Maximum serialization depth exceeded"
            raise ValidationFailed(
                f"{self.name}: arguments are nested too deeply; flatten them"
            ) from exc
        try:
            encoded = _canonical.dumps(data)
        except _canonical.CanonicalError as exc:
            raise ValidationFailed(
                f"{self.name}: arguments have no exact JSON form ({exc}); send "
                "smaller numbers or valid text"
            ) from exc
        if len(encoded) > limit:
            raise ValidationFailed(
                f"{self.name}: arguments are {len(encoded)} bytes as JSON, over the "
                f"{limit}-byte limit; send less data"
            )
        return data, encoded

    def settled_cost(self, output: BaseModel, estimate: Decimal) -> Decimal:
        """Return what the call cost, as its output reports it (else the estimate).

        Raises:
            UsageError: `actual_cost` raised or returned something that is not a number.
        """
        if self.actual_cost is None:
            return estimate
        try:
            value = self.actual_cost(output)
        except Exception as exc:  # a user function may raise anything
            raise UsageError(
                f"{self.name!r}: its actual_cost function raised {type(exc).__name__}: {exc}"
            ) from exc
        return _to_decimal(value, f"{self.name!r} actual_cost")

    def estimate_cost(self, args: BaseModel) -> Decimal:
        """Return the declared cost for these arguments.

        Raises:
            UsageError: the cost function returned something that is not a number.
        """
        cost = self.cost
        if isinstance(cost, Decimal):
            return cost
        return _to_decimal(cost(args), f"{self.name!r} cost({args!r})")

    def tool_schema(self, flavor: str = "mcp") -> dict[str, object]:
        """Return this capability as an LLM tool definition.

        Args:
            flavor: `"mcp"` (`name`, `description`, `inputSchema`, `outputSchema`)
                or `"openai"` (`{"type": "function", "function": {...}}`, with the
                dots of the name replaced by `__`, which that API requires).

        Raises:
            UsageError: an unknown flavor.
        """
        params = self.input_model.model_json_schema()
        if flavor == "mcp":
            return {
                "name": self.name,
                "description": self.description,
                "inputSchema": params,
                "outputSchema": self.output_model.model_json_schema(),
                "annotations": {
                    "readOnlyHint": self.effect is Effect.READ,
                    "destructiveHint": self.effect is Effect.DESTRUCTIVE,
                    "idempotentHint": self.idempotency is not Idempotency.NONE,
                },
            }
        if flavor == "openai":
            return {
                "type": "function",
                "function": {
                    "name": self.name.replace(".", "__"),
                    "description": self.description,
                    "parameters": params,
                },
            }
        raise UsageError(
            f"unknown tool schema flavor {flavor!r}; use 'mcp' or 'openai'"
        )

    def describe(self) -> dict[str, object]:
        """Return the capability's declaration as JSON-ready data (for records)."""
        return {
            "name": self.name,
            "version": self.version,
            "effect": self.effect.value,
            "idempotency": self.idempotency.value,
            "dry_run": self.dry_run_handler is not None,
            "scopes": list(self.scopes),
            "resource": self.resource,
            "timeout_ms": None
            if self.timeout is None
            else int(self.timeout.total_seconds() * 1000),
            "input_schema": self.input_model.model_json_schema(),
            "output_schema": self.output_model.model_json_schema(),
        }

    def __repr__(self) -> str:
        return f"<Capability {self.name}@{self.version} {self.effect.value}>"


def one_line_error(name: str, what: str, exc: pydantic.ValidationError) -> str:
    """Return `exc` as one line: the capability, what broke, the first bad field."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = exc.error_count() - 1
    tail = f" (and {more} more)" if more else ""
    return f"{name}: {what}: {where}: {first['msg']}{tail}"


def _schema_is_free_form(schema: Mapping[str, object]) -> bool:
    text = _canonical.dumps(schema)
    # "number" anywhere may carry NaN; a property with no type at all (Any) or
    # open additional properties may carry NaN or keys of any text.
    return (
        b'"number"' in text or b"{}" in text or b'"additionalProperties":true' in text
    )


def _has_secrets(model: type[BaseModel]) -> bool:
    text = _canonical.dumps(model.model_json_schema(mode="serialization"))
    return b'"writeOnly":true' in text or b'"x-tether-secret":true' in text


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
    def __call__(self, fn: _Handler) -> Capability[Any, Any]:
        return Capability(fn, **self._kwargs)


def capability(
    name: str,
    *,
    version: str = "1",
    effect: Effect | str = Effect.READ,
    idempotency: Idempotency | str | None = None,
    dry_run: _Handler | None = None,
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
        if isinstance(timeout, bool) or not isinstance(
            timeout, (int, float, timedelta)
        ):
            raise UsageError(
                f"capability {name!r}: timeout must be seconds or a timedelta, "
                f"got {timeout!r}"
            )
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=timeout)
        if timeout <= timedelta(0):
            raise UsageError(
                f"capability {name!r}: timeout must be > 0, got {timeout!r}; leave it "
                "out for no deadline"
            )
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


class Registry:
    """The capabilities one app can call, by name and version."""

    __slots__ = ("_by_name", "_latest", "_schemas")

    def __init__(self) -> None:
        self._by_name: dict[str, dict[str, Capability[Any, Any]]] = {}
        self._latest: dict[str, Capability[Any, Any]] = {}
        self._schemas: dict[str, list[dict[str, object]]] = {}
        """Tool schemas per flavor, built once: a planner asks for them every turn."""

    def add(self, cap: Capability[Any, Any]) -> None:
        """Add `cap`; the version registered last is the one `get(name)` returns.

        Raises:
            UsageError: `cap` is not a capability, or that name and version is taken
                by another one.
        """
        if not isinstance(cap, Capability):
            raise UsageError(
                f"{cap!r} is not a capability; decorate it with @tether.capability(...)"
            )
        versions = self._by_name.setdefault(cap.name, {})
        existing = versions.get(cap.version)
        if existing is not None and existing is not cap:
            raise UsageError(
                f"capability {cap.name!r} version {cap.version!r} is already "
                "registered; bump the version"
            )
        versions.pop(cap.version, None)
        versions[cap.version] = cap
        self._latest[cap.name] = cap
        self._schemas.clear()

    def get(self, name: str, version: str | None = None) -> Capability[Any, Any]:
        """Return the capability `name` (its latest version unless `version`).

        Raises:
            NotFound: no such capability or version.
        """
        if version is None:
            latest = self._latest.get(name)
            if latest is not None:
                return latest
        versions = self._by_name.get(name)
        if not versions:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise NotFound(f"unknown capability {name!r}; registered: {known}")
        assert version is not None  # a registered name always has a latest version
        try:
            return versions[version]
        except KeyError:
            raise NotFound(
                f"capability {name!r} has no version {version!r}; "
                f"registered: {', '.join(versions)}"
            ) from None

    def __iter__(self) -> Any:
        return (next(reversed(v.values())) for _, v in sorted(self._by_name.items()))

    def __len__(self) -> int:
        return len(self._by_name)

    def tool_schemas(self, flavor: str = "mcp") -> list[dict[str, object]]:
        """Return every capability's tool schema, sorted by name (a fresh list)."""
        cached = self._schemas.get(flavor)
        if cached is None:
            cached = self._schemas[flavor] = [cap.tool_schema(flavor) for cap in self]
        return copy.deepcopy(cached)
