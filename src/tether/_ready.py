"""Which parked runs may go on: what `Tether.ready_runs` and `tether worker` look at.

A run parked in `awaiting_approval` is ready once none of the requests it made
or waits on is still pending; a `degraded` run once the breaker that stashed
it is no longer open; a run left `executing` or `planning` once its writer's
lease ran out (the process died).
"""

from __future__ import annotations

from datetime import datetime

from tether._approvals import as_of
from tether._guards import Guards
from tether.run import RunState
from tether.store import ApprovalStatus, RunRow, Store
from tether.store._breakers import BreakerState, breaker_view
from tether.store._limits import to_us

__all__ = ["ORPHANABLE_STATES", "PARKED_STATES", "ReadyRuns"]

PARKED_STATES = (RunState.AWAITING_APPROVAL.value, RunState.DEGRADED.value)
"""States a run parks in, to be resumed."""
ORPHANABLE_STATES = (RunState.EXECUTING.value, RunState.PLANNING.value)
"""States a run is left in when its process dies."""

_AWAITED_KEPT = 10_000
"""Parked runs whose awaited requests are kept between looks."""


class ReadyRuns:
    """Looks for runs that may go on, keeping what parked records say between looks."""

    def __init__(self) -> None:
        self._awaited_by_run: dict[str, tuple[tuple[int, bytes], frozenset[str]]] = {}

    def look(
        self, store: Store, now: datetime, guards: Guards | None, *, limit: int
    ) -> list[str]:
        """Return the parked runs of `store` that may go on, oldest first (see the module)."""
        ready = []
        for row in store.list_runs(
            status=RunState.AWAITING_APPROVAL.value, limit=limit
        ):
            asked = store.list_approvals(run_id=row.run_id, now=now, limit=1000)
            own = {a.id for a in asked}
            asked += [store.get_approval(i) for i in self._awaited(store, row) - own]
            if asked and not any(
                as_of(a, now).status is ApprovalStatus.PENDING for a in asked
            ):
                ready.append(row.run_id)
        ready.extend(
            row.run_id
            for row in store.list_runs(status=RunState.DEGRADED.value, limit=limit)
            if _stash_breaker_closed(store, row.run_id, now, guards)
        )
        for status in ORPHANABLE_STATES:  # their writer died: its lease ran out
            ready.extend(
                row.run_id
                for row in store.list_runs(status=status, limit=limit)
                if row.lease_until is None or row.lease_until <= now
            )
        return ready[::-1]

    def _awaited(self, store: Store, row: RunRow) -> frozenset[str]:
        """Return the approval requests a run's steps waited on, from its record.

        Kept by the record's head: a parked run's record does not grow while
        it waits, so a worker's looks read it once, not at every look.
        """
        seen = self._awaited_by_run.get(row.run_id)
        if seen is not None and seen[0] == (row.head_seq, row.head_hash):
            return seen[1]
        found = set()
        for ev in store.events(row.run_id):
            if b'"approval_id":"' not in ev.body:  # most events: no decoding
                continue
            data = ev.data()
            if data["kind"] == "failed":
                found.add(str(data["approval_id"]))
        if len(self._awaited_by_run) >= _AWAITED_KEPT:
            self._awaited_by_run.clear()  # parked runs come and go: start afresh
        self._awaited_by_run[row.run_id] = (
            (row.head_seq, row.head_hash),
            frozenset(found),
        )
        return frozenset(found)


def _stash_breaker_closed(
    store: Store, run_id: str, now: datetime, guards: Guards | None
) -> bool:
    """Tell whether the breaker that stashed a degraded run lets calls through again."""
    stashed = [
        data["breaker"]
        for data in (e.data() for e in store.events(run_id))
        if data["kind"] == "plan_stashed"
    ]
    if not stashed:
        return False
    found = None
    if guards is not None:
        found = next((b for b in guards.breakers.breakers if b.id == stashed[-1]), None)
    if found is None:
        return True  # the breaker is gone from the config: nothing holds the run
    row = store.breaker_row(found.id)
    view, _ = breaker_view(row, found.spec(), to_us(now))
    return view.state is not BreakerState.OPEN
