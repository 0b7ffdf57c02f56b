"""The `Capability` type: one declared action, and what the call path asks of it.

A `Capability` holds a declaration (name, version, `Effect`, `Idempotency`,
handlers, preconditions, cost, scopes, timeout, resource) and answers the
gateway's questions on every call: `validate_args`, `dump_args`,
`estimate_cost`, `settled_cost`. Its constructor checks the declaration and
works out, once, what those answers need (the handlers' shapes, whether the
arguments need an exactness check, whether a model has secret fields), so the
call path does no introspection. `tool_schema` and `describe` give it as JSON
data. `@tether.capability(...)` in `tether.capability` makes one; import all of
these from there.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence, Set
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Generic, TypeAlias, TypeVar

import pydantic
from pydantic import BaseModel

from tether import _canonical
from tether._handler import Handler, HandlerFn, handler_shape
from tether.errors import InvalidKey, UsageError, ValidationFailed

__all__ = [
    "MAX_ARGS_BYTES",
    "MAX_KEY_LENGTH",
    "Capability",
    "Cost",
    "Effect",
    "Idempotency",
    "In",
    "Out",
    "Precondition",
    "check_key",
    "one_line_error",
]

In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)

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


Cost: TypeAlias = "int | Decimal | str | Callable[[Any], int | Decimal | str | float]"
"""A declared cost: a number >= 0, or a function of the args returning one."""
Precondition: TypeAlias = "Callable[[Any], bool | str | None]"
"""A check on the args: True or None when met, False or a reason string when not."""


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


class Capability(Generic[In, Out]):
    """One named, versioned action with typed input and output.

    Made by `@tether.capability(...)`; see that decorator for the fields.
    """

    __slots__ = (
        "_secret_paths",
        "_unordered",
        "actual_cost",
        "cost",
        "description",
        "dry_run_handler",
        "effect",
        "free_form",
        "free_form_output",
        "handler",
        "idempotency",
        "input_model",
        "name",
        "open_output",
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
        fn: HandlerFn,
        *,
        name: str,
        version: str,
        effect: Effect,
        idempotency: Idempotency,
        dry_run: HandlerFn | None,
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
        self.handler, self.input_model, self.output_model = handler_shape(  # type: ignore[assignment]  # the decorator's overloads bind In/Out to these models
            fn, name, "handler"
        )
        self.dry_run_handler: Handler | None = None
        if dry_run is not None:
            self.dry_run_handler, dry_in, dry_out = handler_shape(
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
        self._unordered = self.free_form or b'"uniqueItems":true' in _canonical.dumps(
            schema
        )
        """Whether args may hold sets, whose JSON order is put right in `dump_args`."""
        out_schema = _canonical.dumps(self.output_model.model_json_schema())
        self.free_form_output = _text_is_free_form(out_schema)
        """Whether outputs may hold floats (then checked for exactness)."""
        self.open_output = _text_is_open(out_schema)
        """Whether outputs have a field of any type or take extra keys: such a
        field may hold a `SecretStr` no schema declares, which JSON masks."""
        self.secret_output = _has_secrets(self.output_model)
        """True when the output has secret fields: a stored result cannot be replayed."""
        self._secret_paths = _has_secrets(self.input_model) or self.secret_output

    # -- what the gateway asks -------------------------------------------------

    @property
    def has_secrets(self) -> bool:
        """True when the input or output model has a secret field."""
        return self._secret_paths

    def inexact_output(self, output: BaseModel) -> str | None:
        """Say what in `output` a record could not keep exactly (NaN, say), or None."""
        return _canonical.inexact(output) if self.free_form_output else None

    def validate_args(self, raw: object, *, limit: int = MAX_ARGS_BYTES) -> In:
        """Validate `raw` (a mapping, a model or JSON text) against the input model.

        Raises:
            ValidationFailed: with one line naming the first bad field.
        """
        model = self.input_model
        try:
            text = False
            if type(raw) is dict:  # the common cases first: the call path is hot
                parsed: object = raw
            # The input model's own type first: isinstance against BaseModel's
            # ABC costs more.
            elif type(raw) is model or isinstance(raw, BaseModel):
                # Revalidated, own model included: model_construct() and attribute
                # assignment skip pydantic's checks. Python mode keeps secrets whole;
                # the serializer itself is a third of model_dump()'s cost.
                parsed = type(raw).__pydantic_serializer__.to_python(
                    raw, warnings=False
                )
            elif isinstance(raw, (str, bytes, bytearray)):
                text = True
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
            if not text and _json_over(parsed, limit):
                # Before validating and encoding: orjson reserves a dozen bytes
                # per character of a string it writes, so a 10 MB string would
                # cost 120 MB to be refused after encoding (RELIABILITY G.50).
                raise ValidationFailed(
                    f"{self.name}: arguments are over the {limit}-byte limit as "
                    "JSON; send less data"
                )
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
            if "depth" not in str(exc):  # an object, bytes that are not UTF-8, ...
                raise ValidationFailed(
                    f"{self.name}: arguments hold a value JSON cannot carry ({exc}); "
                    "send JSON data (text, numbers, lists, objects)"
                ) from exc
            raise ValidationFailed(
                f"{self.name}: arguments are nested too deeply; flatten them"
            ) from exc
        try:
            if self._unordered:
                # A set's JSON list comes in iteration order, which changes with
                # insertion order and the hash seed: sorted, one set has one form
                # (one fingerprint, one record) in every process.
                _order_sets(args, data, 0)
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

    def within(self, deadline: timedelta) -> Capability[In, Out]:
        """Return this capability for one call whose caller waits at most `deadline`.

        Its timeout is the shorter of its own and the caller's; itself when its
        own is as short. Everything else is shared: the copy is the same
        capability, called under a tighter limit.
        """
        if self.timeout is not None and self.timeout <= deadline:
            return self
        tighter = copy.copy(self)
        tighter.timeout = deadline
        return tighter

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


_JSON_SCALARS = frozenset({int, float, bool})


def _json_over(value: object, limit: int) -> bool:
    """Tell whether `value`'s JSON is surely over `limit` bytes, stopping once it is.

    A lower bound of the args' JSON as sent: a text counts its characters, a
    number or a literal one byte, a mapping its keys and two bytes per entry.
    (A secret counts at its clear length, though the record keeps only its
    mask: args over the limit as sent are refused either way.)
    Walked with a stack (no recursion: any depth), and only until the bound
    passes `limit`; args of a normal call are a few dozen items.
    """
    left = limit
    stack = [value]
    while stack:
        item = stack.pop()
        # Exact types first: an isinstance miss against an ABC (Mapping, Set)
        # costs a third of a microsecond, and most items are plain scalars.
        if item is None or type(item) in _JSON_SCALARS:
            left -= 1
        elif type(item) is str:
            left -= len(item) + 2
        elif type(item) is dict:
            left -= 2 + 2 * len(item)
            for key, inner in item.items():
                if type(key) is str:
                    left -= len(key)
                stack.append(inner)
        elif type(item) is list:
            left -= 2 + len(item)
            stack.extend(item)
        elif isinstance(item, str | bytes | bytearray):
            left -= len(item) + 2
        elif isinstance(item, Mapping):
            left -= 2 + 2 * len(item)
            for key, inner in item.items():
                if isinstance(key, str):
                    left -= len(key)
                stack.append(inner)
        elif isinstance(item, list | tuple | Set):
            left -= 2 + len(item)
            stack.extend(item)
        else:
            left -= 1
        if left < 0:
            return True
    return False


def one_line_error(name: str, what: str, exc: pydantic.ValidationError) -> str:
    """Return `exc` as one line: the capability, what broke, the first bad field."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(_loc_part(p) for p in first["loc"]) or "(root)"
    more = exc.error_count() - 1
    tail = f" (and {more} more)" if more else ""
    # A validator's own message may quote the input: its line breaks go too.
    msg = " ".join(str(first["msg"]).split())
    return f"{name}: {what}: {where}: {msg}{tail}"


_LOC_SHOWN = 80
"""Characters of one part of a bad field's location the message quotes."""


def _loc_part(part: object) -> str:
    """One part of a bad field's location: a caller's key is shown escaped and cut.

    An extra or free-form key is the caller's text: a line break or a control
    character in it must not break the message's one line, nor a 1 MiB key
    make a 1 MiB message.
    """
    text = str(part)
    if text.isprintable() and len(text) <= _LOC_SHOWN:
        return text
    shown = repr(text[:_LOC_SHOWN])
    return shown if len(text) <= _LOC_SHOWN else f"{shown}..."


def _schema_is_free_form(schema: Mapping[str, object]) -> bool:
    return _text_is_free_form(_canonical.dumps(schema))


def _text_is_free_form(text: bytes) -> bool:
    # "number" anywhere may carry NaN; a property with no type at all (Any) or
    # open additional properties may carry NaN or keys of any text.
    return b'"number"' in text or _text_is_open(text)


def _text_is_open(text: bytes) -> bool:
    return b"{}" in text or b'"additionalProperties":true' in text


def _order_sets(value: object, js: object, depth: int) -> None:
    """Sort, in place, the JSON lists in `js` that `value` holds as sets."""
    if depth > 256:
        return
    if isinstance(value, BaseModel):
        if not isinstance(js, dict):
            return
        for name, info in type(value).model_fields.items():
            key = name if name in js else info.serialization_alias or info.alias
            if key in js:
                _order_sets(getattr(value, name, None), js[key], depth + 1)
        for k, v in (value.__pydantic_extra__ or {}).items():
            if k in js:
                _order_sets(v, js[k], depth + 1)
    elif isinstance(value, Mapping) and isinstance(js, dict):
        for k, v in value.items():
            key = k if isinstance(k, str) else str(getattr(k, "value", k))
            if key in js:
                _order_sets(v, js[key], depth + 1)
    elif isinstance(value, (list, tuple, Set)) and isinstance(js, list):
        for item, item_js in zip(value, js, strict=False):
            _order_sets(item, item_js, depth + 1)
        if isinstance(value, Set):
            js.sort(key=_canonical.dumps)


def _has_secrets(model: type[BaseModel]) -> bool:
    text = _canonical.dumps(model.model_json_schema(mode="serialization"))
    return b'"writeOnly":true' in text or b'"x-tether-secret":true' in text
