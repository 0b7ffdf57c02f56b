"""Durations and amounts as `tether.yaml` writes them, for every section's models."""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated

import pydantic

__all__ = ["Amount", "Duration", "parse_amount", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """Parse `"30s"`, `"5m"`, `"24h"`, `"7d"`, `"250ms"` or a number of seconds.

    Raises:
        ValueError: the value is not a positive duration.
    """
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = _seconds(value, value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(
                f"{value!r} is not a duration; write e.g. '30s', '5m', '24h'"
            )
        result = _seconds(float(m.group(1)) * _UNITS[m.group(2)], value)
    if result <= timedelta(0):
        raise ValueError(f"{value!r} is not a positive duration; write e.g. '30s'")
    return result


def _seconds(seconds: float, given: object) -> timedelta:
    """`timedelta(seconds=...)`, or a `ValueError` naming `given` (NaN, or too long)."""
    try:
        return timedelta(seconds=seconds)
    except (OverflowError, ValueError) as exc:  # past ~2.7 million years; NaN
        raise ValueError(
            f"{given!r} is not a duration tether can hold; write e.g. '30s', '5m', "
            "'24h'"
        ) from exc


def parse_amount(value: object) -> Decimal:
    """Parse an amount: an integer, a Decimal or decimal text, >= 0; never a float.

    Raises:
        ValueError: a float, a negative or non-finite number, or not a number.
    """
    if isinstance(value, bool):
        raise ValueError(  # noqa: TRY004  # pydantic reports ValueError, not TypeError
            f"{value!r} is not an amount; write e.g. 5000 or '12.50'"
        )
    if isinstance(value, float):
        raise ValueError(  # noqa: TRY004  # pydantic reports ValueError, not TypeError
            f"{value!r} is a float, which budgets cannot add exactly; write an "
            "integer in the smallest unit (cents) or quote a decimal: '12.50'"
        )
    try:
        result = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise ValueError(
            f"{value!r} is not an amount; write e.g. 5000 or '12.50'"
        ) from None
    if not result.is_finite() or result < 0:
        raise ValueError(f"{value!r} is not an amount >= 0")
    return result


Duration = Annotated[timedelta, pydantic.BeforeValidator(parse_duration)]
"""A positive duration, written `"30s"`, `"5m"`, `"24h"` or in seconds."""
Amount = Annotated[Decimal, pydantic.BeforeValidator(parse_amount)]
"""An exact amount >= 0, written as an integer or quoted decimal text."""
