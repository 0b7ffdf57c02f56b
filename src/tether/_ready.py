"""Which parked runs may go on: what `Tether.ready_runs` and `tether worker` look at.

A run parked in `awaiting_approval` is ready once none of the requests it made
or waits on is still pending; a `degraded` run once the breaker that stashed
it is no longer open; a run left `executing` or `planning` once its writer's
lease ran out (the process died). A run no registered planner drives (opened
with `app.run` and stepped by its caller) is never offered: only its caller
can go on with it.
"""

from __future__ import annotations

from dataclasses import dataclass
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

_KEPT = 10_000
"""Parked runs whose records' gist is kept between looks."""

_EVERY = 1 << 62
"""Ask `Store.list_runs` for every row of a state: it pages by no cursor, and
a run behind `limit` newer ones must not wait for ever (its rows are small)."""


@dataclass(frozen=True, slots=True)
class _Gist:
    """What a parked run's record says, as of its head (which does not move while it waits)."""

    head: tuple[int, bytes]
    planned: bool
    """A registered planner drives the run: a worker can continue it."""
    awaited: frozenset[str]
    """Approval requests its steps waited on (another run's, for the same call)."""
    asked: bool
    """It made or waited on a request at all."""
    own_pending_until: datetime | None
    """The latest expiry of its own requests still pending (None: none pending).
    A decision on one is recorded in this run, which moves its head."""
    breaker: str | None
    """The breaker that stashed it last (`plan_stashed`), if one did."""


class ReadyRuns:
    """Looks for runs that may go on, keeping what parked records say between looks."""

    def __init__(self) -> None:
        self._gists: dict[str, _Gist] = {}

    def look(
        self, store: Store, now: datetime, guards: Guards | None, *, limit: int
    ) -> list[str]:
        """Return up to `limit` runs of `store` that may go on, oldest first (see the module).

        Every run in a parked or orphanable state is looked at, however many
        newer ones still wait; runs no planner drives (opened with `app.run`
        and driven by their caller) are never offered: no worker can go on
        with them.
        """
        ready = []
        for row in store.list_runs(
            status=RunState.AWAITING_APPROVAL.value, limit=_EVERY
        ):
            gist = self._gist(store, row, now)
            if not gist.planned or not gist.asked:
                continue
            if gist.own_pending_until is not None and gist.own_pending_until > now:
                continue
            if not any(
                as_of(store.get_approval(i), now).status is ApprovalStatus.PENDING
                for i in gist.awaited
            ):
                ready.append(row.run_id)
        for row in store.list_runs(status=RunState.DEGRADED.value, limit=_EVERY):
            gist = self._gist(store, row, now)
            if gist.planned and _stash_breaker_closed(store, gist.breaker, now, guards):
                ready.append(row.run_id)
        for status in ORPHANABLE_STATES:  # their writer died: its lease ran out
            ready.extend(
                row.run_id
                for row in store.list_runs(status=status, limit=_EVERY)
                if (row.lease_until is None or row.lease_until <= now)
                and self._gist(store, row, now).planned
            )
        return ready[::-1][:limit]

    def _gist(self, store: Store, row: RunRow, now: datetime) -> _Gist:
        """Return what a run's record says, read once per head, not at every look."""
        head = (row.head_seq, row.head_hash)
        seen = self._gists.get(row.run_id)
        if seen is not None and seen.head == head:
            return seen
        planner = None
        breaker = None
        awaited = set()
        for ev in store.events(row.run_id):  # most events: no decoding
            if b'"approval_id":"' in ev.body:
                data = ev.data()
                if data["kind"] == "failed":
                    awaited.add(str(data["approval_id"]))
            elif b'"planner":"' in ev.body or b'"kind":"plan_stashed"' in ev.body:
                data = ev.data()
                if data["kind"] in ("run_started", "plan_proposed"):
                    planner = data.get("planner") or planner
                elif data["kind"] == "plan_stashed":
                    breaker = str(data["breaker"])
        own = store.list_approvals(run_id=row.run_id, now=now, limit=1000)
        pending = [a.expires_at for a in own if a.status is ApprovalStatus.PENDING]
        awaited -= {a.id for a in own}
        gist = _Gist(
            head=head,
            planned=planner is not None,
            awaited=frozenset(awaited),
            asked=bool(own or awaited),
            own_pending_until=max(pending, default=None),
            breaker=breaker,
        )
        if len(self._gists) >= _KEPT:
            self._gists.clear()  # parked runs come and go: start afresh
        self._gists[row.run_id] = gist
        return gist


def _stash_breaker_closed(
    store: Store, stashed: str | None, now: datetime, guards: Guards | None
) -> bool:
    """Tell whether the breaker that stashed a degraded run lets calls through again."""
    if stashed is None:
        return False
    found = None
    if guards is not None:
        found = next((b for b in guards.breakers.breakers if b.id == stashed), None)
    if found is None:
        return True  # the breaker is gone from the config: nothing holds the run
    row = store.breaker_row(found.id)
    view, _ = breaker_view(row, found.spec(), to_us(now))
    return view.state is not BreakerState.OPEN
