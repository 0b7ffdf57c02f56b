"""Times as the store keeps them: integer microseconds since 1970-01-01 UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["from_us", "to_us"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def to_us(value: datetime) -> int:
    """Return microseconds since 1970-01-01 UTC (how limit times are stored)."""
    return (value - _EPOCH) // _US


def from_us(value: int) -> datetime:
    """Return the aware UTC time of `to_us`'s integer."""
    return _EPOCH + timedelta(microseconds=value)
