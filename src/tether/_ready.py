"""Which parked runs may go on: what `Tether.ready_runs` and `tether worker` look at.

A run parked in `awaiting_approval` is ready once none of the requests it made
or waits on is still pending; a `degraded` run once the breaker that stashed
it is no longer open; a run left `executing` or `planning` once its writer's
lease ran out (the process died). A run no registered planner drives (opened
with `app.run` and stepped by its caller) is never offered: only its caller
can go on with it.

A look walks each state's runs oldest first, a page at a time (`Store.list_runs`
with a keyset cursor), and stops once it has found as many ready runs as it
was asked for: no read holds more than a page, and a worker working through a
backlog of ready runs reads only as far as its next batch, not every parked
row. A look that finds fewer still walks every page, since any parked run may
have become ready since the last one: an approval decided (a request of its
own, which moves its head, or another run's, which does not), a lease or a
breaker's cool-down run out. None of these moves the run's place in the
listing, so no cursor can tell which runs changed since the last look; what a
look keeps instead is each run's gist, so a page costs a read of rows, not of
records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from tether._approvals import as_of
from tether._guards import Guards
from tether.run import RunState
from tether.store import ApprovalStatus, RunRow, Store
from tether.store._breakers import BREAKER_RULE, BreakerState, breaker_view
from tether.store._limits import to_us

__all__ = ["ORPHANABLE_STATES", "PARKED_STATES", "ReadyRuns"]

PARKED_STATES = (RunState.AWAITING_APPROVAL.value, RunState.DEGRADED.value)
"""States a run parks in, to be resumed."""
ORPHANABLE_STATES = (RunState.EXECUTING.value, RunState.PLANNING.value)
"""States a run is left in when its process dies."""

_KEPT = 10_000
"""Parked runs whose records' gist is kept between looks."""

_PAGE = 500
"""Runs read per `Store.list_runs` call as a look walks a state."""


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
    asked_breaker: bool
    """One of its own pending requests is an escalating breaker's: the breaker's
    closing closes it without a word in this run's record (its head stays)."""


class ReadyRuns:
    """Looks for runs that may go on, keeping what parked records say between looks.

    Args:
        page: Runs read per `Store.list_runs` call (default 500).
    """

    def __init__(self, *, page: int = _PAGE) -> None:
        self._gists: dict[str, _Gist] = {}
        self._page = page

    def look(
        self, store: Store, now: datetime, guards: Guards | None, *, limit: int
    ) -> list[str]:
        """Return up to `limit` runs of `store` that may go on, oldest first (see the module).

        Orphaned runs come first (`planning`, then `executing`), then
        `degraded`, then `awaiting_approval` ones, each state oldest first.
        Every run in a parked or orphanable state is looked at, however many
        newer ones still wait, until `limit` are found; runs no planner
        drives (opened with `app.run` and driven by their caller) are never
        offered: no worker can go on with them.
        """
        pending: dict[str, bool] = {}  # an awaited request's answer, once a look
        closed: dict[str | None, bool] = {}  # a stashing breaker's, once a look

        def awaits_none(row: RunRow) -> bool:
            gist = self._gist(store, row, now)
            if not gist.planned or not gist.asked:
                return False
            if gist.own_pending_until is not None and gist.own_pending_until > now:
                # A breaker's closing closes its requests without moving this
                # run's head: only then is the gist read past, and only the
                # runs parked on such a request pay the read.
                still = not gist.asked_breaker or store.list_approvals(
                    run_id=row.run_id, status=ApprovalStatus.PENDING, now=now, limit=1
                )
                if still:
                    return False
            for i in gist.awaited:
                if i not in pending:
                    answer = as_of(store.get_approval(i), now)
                    pending[i] = answer.status is ApprovalStatus.PENDING
                if pending[i]:
                    return False
            return True

        def breaker_let_go(row: RunRow) -> bool:
            gist = self._gist(store, row, now)
            if not gist.planned:
                return False
            if gist.breaker not in closed:
                closed[gist.breaker] = _stash_breaker_closed(
                    store, gist.breaker, now, guards
                )
            return closed[gist.breaker]

        def orphaned(row: RunRow) -> bool:  # its writer died: its lease ran out
            return (row.lease_until is None or row.lease_until <= now) and self._gist(
                store, row, now
            ).planned

        checks: list[tuple[str, Callable[[RunRow], bool]]] = [
            *((status, orphaned) for status in reversed(ORPHANABLE_STATES)),
            (RunState.DEGRADED.value, breaker_let_go),
            (RunState.AWAITING_APPROVAL.value, awaits_none),
        ]
        ready: list[str] = []
        if limit <= 0:
            return ready
        for status, is_ready in checks:
            for row in self._oldest_first(store, status):
                if is_ready(row):
                    ready.append(row.run_id)
                    if len(ready) == limit:
                        return ready  # the rest wait for the next look: read no further
        return ready

    def _oldest_first(self, store: Store, status: str) -> Iterator[RunRow]:
        """Yield the runs in `status`, oldest first, reading a page only when needed."""
        after = None
        while True:
            page = store.list_runs(
                status=status, limit=self._page, after=after, oldest_first=True
            )
            yield from page
            if len(page) < self._page:
                return
            after = page[-1]

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
        still = [a for a in own if a.status is ApprovalStatus.PENDING]
        pending = [a.expires_at for a in still]
        awaited -= {a.id for a in own}
        gist = _Gist(
            head=head,
            planned=planner is not None,
            awaited=frozenset(awaited),
            asked=bool(own or awaited),
            own_pending_until=max(pending, default=None),
            breaker=breaker,
            asked_breaker=any(
                rule.startswith(BREAKER_RULE) for a in still for rule in a.rule_ids
            ),
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
