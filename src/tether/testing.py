"""What users need to test their own agents and capabilities against tether.

`FakeClock` moves only when told; `temporary_app()` gives a `Tether` on a
throwaway SQLite file; `ScriptedPlanner` proposes steps from a list;
`write_config()` rewrites a `tether.yaml` that a running app takes at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tether.agent import ScriptedPlanner
from tether.app import Tether
from tether.config import SETTLE_NS

__all__ = ["FakeClock", "ScriptedPlanner", "temporary_app", "write_config"]


def write_config(path: str | os.PathLike[str], text: str) -> Path:
    """Write a `tether.yaml` that a running app takes at its next step.

    A hot reload takes a changed file only once it has gone unwritten for a
    moment (`tether.config.SETTLE_NS`: it may be half-written until then).
    This writes the file whole and dates it that moment back, so a test need
    not wait.

    Example:
        ```python
        write_config("tether.yaml", "defaults: {write: deny}")
        ```
    """
    path = Path(path)
    path.write_text(text)
    written = path.stat()
    back = written.st_mtime_ns - 2 * SETTLE_NS
    os.utime(path, ns=(written.st_atime_ns, back))
    return path


class FakeClock:
    """A clock that stands still until `advance` moves it.

    Example:
        ```python
        clock = FakeClock()
        clock.advance(timedelta(hours=1))
        ```
    """

    __slots__ = ("_mono", "_now", "tick")

    def __init__(
        self, start: datetime | None = None, *, tick: timedelta = timedelta(0)
    ) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._mono = 0.0
        self.tick = tick
        """How far each `now()` call moves the clock (default: not at all)."""

    def now(self) -> datetime:
        """Return the fake time (then move it by `tick`)."""
        current = self._now
        if self.tick:
            self.advance(self.tick)
        return current

    def monotonic(self) -> float:
        """Return seconds since the clock was made, in fake time."""
        return self._mono

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by `delta`."""
        self._now += delta
        self._mono += delta.total_seconds()

    def sleep(self, seconds: float) -> None:
        """Move the clock forward by `seconds`, at once (a throttle or a backoff waits here)."""
        self.advance(timedelta(seconds=seconds))


@contextmanager
def temporary_app(
    *, synchronous: str = "normal", env: Mapping[str, str] | None = None, **kwargs: Any
) -> Iterator[Tether]:
    """Yield a `Tether` on a fresh SQLite file in a temporary folder, closed after.

    Args:
        synchronous: `"normal"` by default (fast; tests need no power-loss safety).
        env: the environment the app reads (default: none of the caller's).
        **kwargs: passed on to `Tether` (`clock=`, `config=`, ...).
    """
    with tempfile.TemporaryDirectory(prefix="tether-") as folder:
        db = f"sqlite:///{Path(folder) / 'tether.db'}?synchronous={synchronous}"
        app = Tether(db=db, env=dict(env or {}), **kwargs)
        try:
            yield app
        finally:
            app.close()
