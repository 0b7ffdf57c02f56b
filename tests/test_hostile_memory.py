"""Hostile inputs keep memory bounded (G.50): what `run.step` allocates, and keeps.

For each input `test_hostile.py` expects rejected, on a memory:// app and on a
SQLite file app, the same input is sent five times. The first four run untraced
(they warm the caches, and run as fast as they can); `tracemalloc` follows the
fifth only, from after the input was built, so the input's own size never counts:

- the peak it allocates stays under a small multiple of the input's own size, or
  a fixed allowance for the deep inputs, which are small but which naive handling
  (a copy, a traceback per level) would blow up;
- nothing it allocates outlives it beyond a small margin, and after all five the
  input itself is no more referenced than before: no rejection keeps its input,
  a copy of it, or an error quoting it.
"""

from __future__ import annotations

import functools
import gc
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

import tether
from test_hostile import CASES, sink
from tether.testing import FakeClock, temporary_app

MB = 1 << 20
KB = 1 << 10

SIZE_FACTOR = 3
"""Peak allowed per byte of the input's own memory (sys.getsizeof over all it holds).

A sane rejection needs the validated copy (its containers: the strings are
shared), the args as JSON data, and their JSON text. Measured with orjson's
buffer counted at the JSON's size: 1.4x for 200k keys (93 MB - 63 MB + 3 MB, for
23 MB of input); 1.0x for a 1 MB key; ~0 for 10 MB of JSON text or bytes (refused
on length before parsing). 3x is twice the worst, far above noise (KB), and still
fails a copy per field, a second encoding, or a buffer reserved for the worst
case: encoding a 10 MB string whole before the size check peaked at 12.7x
(orjson reserves ~12 bytes a character), 200k keys at 4.0x, until mappings
were sized before they are validated or encoded.
"""

FIXED_ALLOWANCE = 1 * MB
"""Peak allowed on top, whatever the input: small inputs' incidental allocations.

Also the whole bound for the deep inputs. Measured: at most 0.09 MB (300-deep
JSON text); a naive copy of the 10 000-deep dicts alone would be ~1.8 MB.
"""

RETAINED_MARGIN = 64 * KB
"""What one rejection may keep: its events (measured at most 1.3 KB a rejection,
either store); far below a copy of any big input (>= 1 MB)."""

BACKENDS = ["memory", "sqlite"]
REJECTED = [name for name, case in CASES.items() if case.exact is None]
DEEP = {name for name in REJECTED if "deep" in name}
REPEATS = 5


@dataclass(frozen=True)
class Measure:
    """What the fifth rejection of one input allocated and kept, in bytes."""

    size: int
    """The input's own memory (sys.getsizeof over everything it holds)."""
    peak: int
    retained: int
    refs_before: int
    refs_after: int
    """The input's reference count before the first rejection and after the fifth."""


@contextmanager
def _app(backend: str) -> Iterator[tether.Tether]:
    if backend == "memory":
        app = tether.Tether(db="memory://", env={}, clock=FakeClock())
        try:
            yield app
        finally:
            app.close()
    else:
        with temporary_app(clock=FakeClock()) as app:
            yield app


@functools.cache
def _measure(name: str, backend: str) -> Measure:
    """Send CASES[name] five times; trace the fifth (cached: two tests read it)."""
    args = CASES[name].args
    principal = tether.Principal("ops-bot", roles=["agent"], tenant="acme")
    refs_before = sys.getrefcount(args)
    with _app(backend) as app:
        app.register(sink)
        with app.run(principal=principal, request="hostile") as run:
            for _ in range(REPEATS - 1):
                _rejected(run.step("hostile.sink", args))  # type: ignore[arg-type]
            gc.collect()
            tracemalloc.start(1)
            try:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                outcome = run.step("hostile.sink", args)  # type: ignore[arg-type]
                peak = tracemalloc.get_traced_memory()[1] - base
                _rejected(outcome)
                del outcome
                gc.collect()
                retained = tracemalloc.get_traced_memory()[0] - base
            finally:
                tracemalloc.stop()
            refs_after = sys.getrefcount(args)
    return Measure(_footprint(args), peak, retained, refs_before, refs_after)


def _rejected(outcome: tether.Outcome) -> None:
    assert outcome.status is tether.OutcomeStatus.INVALID, outcome
    assert type(outcome.error) is tether.ValidationFailed


def _footprint(value: object) -> int:
    """Return sys.getsizeof summed over `value` and all it holds (iteratively: the
    deep inputs are 10 000 levels deep)."""
    total, todo = 0, [value]
    seen: set[int] = set()
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return total


def _params() -> list[object]:
    return [
        pytest.param(
            name,
            backend,
            id=f"{name}-{backend}",
        )
        for name in REJECTED
        for backend in BACKENDS
    ]


@pytest.fixture(autouse=True)
def _own_trace() -> None:
    if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC, -X tracemalloc: not measurable
        pytest.fail("tracemalloc is already on; run these tests without it")


@pytest.mark.parametrize(("name", "backend"), _params())
def test_rejecting_a_hostile_input_peaks_within_a_bound(
    name: str, backend: str
) -> None:
    """The peak a rejection allocates is a small multiple of the input's own size,
    or, for the deep inputs, under a fixed allowance."""
    m = _measure(name, backend)

    bound = FIXED_ALLOWANCE if name in DEEP else SIZE_FACTOR * m.size + FIXED_ALLOWANCE
    assert m.peak < bound, (
        f"peak {m.peak / MB:.2f} MB for an input of {m.size / MB:.2f} MB; "
        f"bound {bound / MB:.2f} MB"
    )


@pytest.mark.parametrize(
    ("name", "backend"),
    [(name, backend) for name in REJECTED for backend in BACKENDS],
    ids=[f"{name}-{backend}" for name in REJECTED for backend in BACKENDS],
)
def test_repeated_rejections_keep_nothing(name: str, backend: str) -> None:
    """After five rejections of one input, the fifth kept next to nothing, and no
    rejection still holds the input."""
    m = _measure(name, backend)

    assert m.retained < RETAINED_MARGIN, f"the fifth rejection kept {m.retained} bytes"
    assert m.refs_after == m.refs_before, "a rejection still holds the input"
