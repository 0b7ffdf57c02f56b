"""The one canonical JSON encoding: hashes, fingerprints, records and exports use it.

Sorted keys, no whitespace, UTF-8, `Decimal` as a string, aware datetimes as
RFC 3339 in UTC. orjson does the work: it is several times faster than the
standard library on the call path and rejects what JSON cannot hold exactly
(integers beyond 64 bits, lone surrogates).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence, Set
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any

import orjson
from pydantic import BaseModel

__all__ = [
    "CanonicalError",
    "dumps",
    "dumps_fields",
    "inexact",
    "loads",
    "loads_strict",
]

_NATIVE = orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC
# Every dataclass goes through `_default`, which sorts its fields like a mapping's.
_OPTIONS = _NATIVE | orjson.OPT_PASSTHROUGH_DATACLASS


class CanonicalError(ValueError):
    """A value has no canonical JSON form (non-finite float, huge int, bad text)."""


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise CanonicalError(f"non-finite decimal {value!r} has no JSON form")
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # orjson writes dataclass fields in declaration order; a dict is sorted.
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: object) -> bytes:
    """Encode `value` canonically.

    Raises:
        CanonicalError: the value holds something JSON cannot represent exactly.
    """
    if isinstance(value, datetime) and value.tzinfo is None:
        raise CanonicalError("naive datetime has no canonical form; use UTC")
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise CanonicalError(str(exc)) from exc


def loads(data: bytes | str) -> Any:
    """Decode JSON written by `dumps` (or any JSON text)."""
    return orjson.loads(data)


def inexact(value: object, _depth: int = 0) -> str | None:
    """Say what in `value` a record could not keep exactly, or None.

    orjson writes NaN and infinities as `null`, and pydantic's JSON mode rewrites
    a mapping key holding a lone surrogate (and writes NaN as `null`, inside
    sets and model instances too, which an `Any` field keeps as given); a record
    must never change a value.
    """
    if isinstance(value, float):
        return None if math.isfinite(value) else "NaN or Infinity"
    if _depth > 256:
        return None  # deeper than any encoder accepts; the encoder refuses it
    if isinstance(value, BaseModel):
        extra = value.__pydantic_extra__ or {}
        value = [*value.__dict__.values(), *extra.values()]
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str) and not k.isascii() and _has_surrogate(k):
                return "a key that is not valid UTF-8 (a lone surrogate)"
            found = inexact(v, _depth + 1)
            if found:
                return found
    elif isinstance(value, (Sequence, Set)) and not isinstance(
        value, (str, bytes, bytearray)
    ):
        for v in value:
            found = inexact(v, _depth + 1)
            if found:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def loads_strict(text: str | bytes) -> Any:
    """Parse JSON text that a record can keep exactly, or raise `CanonicalError`.

    Refuses duplicate keys (no reading of them is exact), integers beyond 64 bits
    (orjson would make them floats) and NaN/Infinity. The standard library's
    parser is used for its hooks; only text input takes this path.
    """

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise CanonicalError(f"duplicate key {k!r:.40}")
            out[k] = v
        return out

    def integer(digits: str) -> int:
        n = int(digits)
        if not -(2**63) <= n < 2**64:
            raise CanonicalError(f"integer {digits:.30} is beyond 64 bits")
        return n

    def constant(name: str) -> Any:
        raise CanonicalError(f"{name} is not JSON")

    try:
        return json.loads(
            text, object_pairs_hook=pairs, parse_int=integer, parse_constant=constant
        )
    except RecursionError as exc:
        raise CanonicalError("nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, CanonicalError):
            raise
        raise CanonicalError(f"not JSON: {exc}") from exc


_SORTED: dict[type, bool] = {}


def dumps_fields(obj: object) -> bytes:
    """Encode a dataclass instance canonically (its fields sorted, like a mapping's).

    A dataclass that declares its fields in sorted order (record events do) is
    written by orjson natively, several times faster than through a dict.
    """
    cls = type(obj)
    is_sorted = _SORTED.get(cls)
    if is_sorted is None:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]  # a dataclass by contract
        is_sorted = _SORTED[cls] = names == sorted(names)
    if not is_sorted:
        return dumps(obj)
    try:
        return orjson.dumps(obj, default=_default, option=_NATIVE)
    except orjson.JSONEncodeError as exc:
        raise CanonicalError(str(exc)) from exc
