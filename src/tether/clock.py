"""Time, ids and randomness, handed in so that replay and tests are exact.

Core code never reads the wall clock or makes ids itself: it asks the `Clock`
and `Ids` it was given. This is the only module allowed to touch the real ones.
"""

from __future__ import annotations

import functools
import os
import random
import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "Ids", "RandomIds", "Rng", "SystemClock", "system_rng"]


@runtime_checkable
class Clock(Protocol):
    """Where tether reads time."""

    def now(self) -> datetime:
        """Return the current time, aware, in UTC."""
        ...

    def monotonic(self) -> float:
        """Return seconds from an arbitrary origin that never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` (a fake clock moves instead)."""
        ...


class SystemClock:
    """The real clock.

    Its methods are the library functions themselves (no Python frame in
    between): the call path reads the clock several times per step.
    """

    __slots__ = ()

    now = staticmethod(functools.partial(datetime.now, UTC))
    """Return the wall-clock time in UTC."""
    monotonic = staticmethod(time.perf_counter)
    """Return `time.perf_counter()`."""
    sleep = staticmethod(time.sleep)
    """Wait, with `time.sleep`."""


@runtime_checkable
class Ids(Protocol):
    """Where tether gets new identifiers."""

    def new_id(self, prefix: str) -> str:
        """Return a new unique id starting with `prefix`."""
        ...


class RandomIds:
    """Time-ordered ids: 48 bits of milliseconds, then 80 random bits, in hex."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()

    def new_id(self, prefix: str) -> str:
        """Return `prefix` + 32 hex digits that sort by creation time."""
        ms = int(self._clock.now().timestamp() * 1000) & 0xFFFFFFFFFFFF
        return f"{prefix}{ms:012x}{os.urandom(10).hex()}"


@runtime_checkable
class Rng(Protocol):
    """Where tether draws random numbers (retry jitter); `random.Random` is one."""

    def uniform(self, a: float, b: float) -> float:
        """Return a number between `a` and `b`."""
        ...


def system_rng(seed: int | None = None) -> Rng:
    """Return a fresh random source (seeded, for tests that need the same draws)."""
    return random.Random(seed)  # noqa: S311  # jitter, not cryptography
