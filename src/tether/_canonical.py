"""The one canonical JSON encoding: hashes, fingerprints, records and exports use it.

Sorted keys, no whitespace, UTF-8, `Decimal` as a string, aware datetimes as
RFC 3339 in UTC. orjson does the work: it is several times faster than the
standard library on the call path and rejects what JSON cannot hold exactly
(integers beyond 64 bits, lone surrogates).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any

import orjson

__all__ = ["CanonicalError", "dumps", "dumps_fields", "has_non_finite", "loads"]

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


def has_non_finite(value: object, _depth: int = 0) -> bool:
    """Tell whether `value` holds a NaN or infinite float anywhere.

    orjson writes those as `null`, silently; a record must never change a value.
    """
    if isinstance(value, float):
        return not math.isfinite(value)
    if _depth > 256:
        return False  # deeper than any encoder accepts; the encoder refuses it
    if isinstance(value, Mapping):
        return any(has_non_finite(v, _depth + 1) for v in value.values())
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return any(has_non_finite(v, _depth + 1) for v in value)
    return False


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
