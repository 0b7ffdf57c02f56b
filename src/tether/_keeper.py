"""The heartbeat of a process's open runs: their leases are renewed while they live.

A run's lease says its writer is alive; a worker takes over a run whose
lease ran out (its process died). Every write renews it, but a step whose
handler runs, or a planner that thinks, for longer than the claim TTL writes
nothing meanwhile: without a heartbeat its run would look dead, and a worker
would take it over and run the same step again beside it. `LeaseKeeper`
renews the lease of every run this process holds open, and the key claim of
the step each one is running, every third of the TTL, on one daemon thread
per app. A process that dies stops renewing, which is what makes its runs
orphans: nothing else changes about how they are found and taken over.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from tether._run_writer import RunWriter
from tether.errors import TetherError

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("tether")

_MIN_PERIOD_S = 0.05
"""The shortest wait between heartbeats (a claim TTL of a fraction of a second)."""


class LeaseKeeper:
    """Renews the leases of the runs a process holds open, on one daemon thread.

    `hold` and `release` cost a dict operation under a lock: the thread starts
    at the first `hold`, and `close` stops it.
    """

    def __init__(self, ttl: Callable[[], timedelta]) -> None:
        self._ttl = ttl
        """The claim TTL in force (read at every beat: a reload may change it)."""
        self._writers: dict[int, RunWriter] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, writer: RunWriter) -> None:
        """Renew `writer`'s run from now on, until `release`."""
        with self._lock:
            self._writers[id(writer)] = writer
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._beat, name="tether-lease-keeper", daemon=True
                )
                self._thread.start()

    def release(self, writer: RunWriter) -> None:
        """Stop renewing `writer`'s run (it ended, parked, or the caller let it go)."""
        with self._lock:
            self._writers.pop(id(writer), None)

    def close(self) -> None:
        """Stop the thread; leases then run out as if the process had died."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def renew_all(self) -> None:
        """Renew every held run's lease once (the thread's beat; tests call it)."""
        with self._lock:
            writers = list(self._writers.values())
        for writer in writers:
            try:
                alive = writer.renew()
            except TetherError as exc:  # the store is away: the next beat tries again
                logger.warning(
                    "run.lease_not_renewed",
                    extra={"tether.run_id": writer.run_id, "tether.error": exc.message},
                )
                continue
            if not alive:  # taken over: its next write raises LeaseLost
                self.release(writer)

    def _beat(self) -> None:
        while not self._stop.wait(max(self._ttl().total_seconds() / 3, _MIN_PERIOD_S)):
            self.renew_all()
