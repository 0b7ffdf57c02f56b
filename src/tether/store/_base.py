"""The store interface: what the call path needs from durable state.

Three backends implement it (SQLite, PostgreSQL, memory); one conformance suite
holds them to the same behaviour. Every write for a run is one `commit` of a
`Batch`, fenced by the run's lease epoch and its current chain head, so a stale
worker can never write and a chain can never fork.

The values the interface is made of live beside it and are re-exported here:
the rows a store holds (`tether.store._rows`), a batch and its answer
(`tether.store._batch`), and the rules every backend applies alike
(`tether.store._rules`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from tether._chain import StoredEvent
from tether.errors import UsageError
from tether.store._batch import (
    Batch,
    Claim,
    Committed,
    GrantGone,
    KeyUpdate,
    NewRun,
    PendingExists,
)
from tether.store._breakers import BreakerRow
from tether.store._rows import (
    ApprovalRow,
    ApprovalStatus,
    KeyId,
    KeyRecord,
    KeyState,
    LimitRow,
    RunRow,
)
from tether.store._rules import apply_limits, closed_reason, may_replace
from tether.store._time import from_us

if TYPE_CHECKING:
    from tether.record import Event

__all__ = [
    "CLOCK_SKEW_WARN",
    "ApprovalRow",
    "ApprovalStatus",
    "Batch",
    "Claim",
    "Committed",
    "GrantGone",
    "KeyId",
    "KeyRecord",
    "KeyState",
    "KeyUpdate",
    "LimitRow",
    "NewRun",
    "PendingExists",
    "RunRow",
    "Store",
    "apply_limits",
    "check_withdrawal",
    "closed_reason",
    "decision_refused",
    "may_replace",
    "not_abortable",
    "resolved_meanwhile",
    "skew_problem",
]

CLOCK_SKEW_WARN = timedelta(seconds=1)
"""How far a host's clock may be from a shared store's before tether warns."""


def skew_problem(skew: timedelta | None) -> str | None:
    """Say in one line how far a host's clock is off, and what to do (None: close enough).

    Close enough is within `CLOCK_SKEW_WARN` (see `Store.clock_skew`).
    """
    if skew is None or abs(skew) <= CLOCK_SKEW_WARN:
        return None
    way = "ahead of" if skew > timedelta(0) else "behind"
    return (
        f"this host's clock is {abs(skew).total_seconds():.3f} s {way} the database "
        "server's; leases, limit windows, rate limits and approval expiry are "
        "reckoned by each host's clock: keep every host's clock in sync (NTP)"
    )


def decision_refused(
    row: ApprovalRow,
    now: datetime,
    status: ApprovalStatus | None,
    *,
    withdraw: bool,
) -> str | None:
    """Say why `Store.decide_approval` leaves `row` as it is (None: the decision applies).

    A decision applies to a pending request that has not expired; a
    withdrawal, to an approved one (spent, it is `used`). With `status` None
    nothing applies, and nothing is refused.
    """
    if status is None:
        return None
    if withdraw:
        if row.status is ApprovalStatus.APPROVED:
            return None
        who = f" by {row.decided_by}" if row.decided_by else ""
        return (
            f"approval request {row.id} is {row.status.value}{who}; only an "
            "approved request no step has spent can be withdrawn"
        )
    if row.status is ApprovalStatus.PENDING and row.expires_at > now:
        return None
    return closed_reason(row, now)


def check_withdrawal(status: ApprovalStatus | None, *, withdraw: bool) -> None:
    """Refuse a withdrawal that would close a grant other than `expired`.

    Raises:
        ValueError: `withdraw` with a `status` other than `expired` (or None).
    """
    if withdraw and status not in (None, ApprovalStatus.EXPIRED):
        raise ValueError(f"a withdrawn approval is closed expired, not {status}")


def not_abortable(row: RunRow) -> UsageError:
    """Say that `Store.abort_run` found the run past aborting (it ended)."""
    return UsageError(f"run {row.run_id} already ended {row.status}; nothing to abort")


def resolved_meanwhile(run_id: str, step: int) -> UsageError:
    """Say that another answer to a step in doubt landed since the caller read the run."""
    return UsageError(
        f"run {run_id} step {step} was resolved already, meanwhile; "
        f"`tether runs show {run_id}` shows the answer"
    )


class Store(abc.ABC):
    """Durable state for runs, records and idempotency keys."""

    url: str
    """Where the store lives, without secrets."""
    record_key: bytes | None
    """The key that signs chain heads, when the backend signs them."""
    signs_heads: bool = True
    """Whether the backend keeps signed chain heads (the in-memory one does not)."""

    @abc.abstractmethod
    def commit(self, batch: Batch) -> Committed:
        """Write `batch` atomically.

        Raises:
            LeaseLost: a newer epoch holds the run.
            StoreError: the write failed, or the chain head moved; nothing was written.
        """

    def clock_skew(self, now: Callable[[], datetime]) -> timedelta | None:
        """Return how far the clock `now` is ahead of the store's (None: no clock of its own).

        Leases, claim TTLs, limit windows, rate limits, breaker cool-downs and
        approval expiry are all reckoned by each process's own clock, so on a
        store shared by several hosts their clocks must agree. A store on
        this host (SQLite, memory) has no other clock to compare with.

        Raises:
            StoreError: the store could not be read.
        """
        return None

    @abc.abstractmethod
    def limit_rows(self, now: datetime) -> list[LimitRow]:
        """Return every limit counter and live lease set (for `tether status`)."""

    def limit_row(
        self, limit_id: str, scope: str, window: int, now: datetime
    ) -> LimitRow | None:
        """Return one limit counter (`window`: its start, µs; 0 for none), if it has one.

        A read outside any write, for a check that cannot reserve (a planner
        turn's: its cost is known only after it). SQL backends read one key.
        """
        start = from_us(window) if window else None
        for row in self.limit_rows(now):
            if row.limit_id == limit_id and row.scope == scope and row.window == start:
                return row
        return None

    @abc.abstractmethod
    def breaker_rows(self) -> dict[str, BreakerRow]:
        """Return every breaker's stored row, by id."""

    @abc.abstractmethod
    def breaker_row(self, breaker_id: str) -> BreakerRow:
        """Return one breaker's stored row (a closed one when it has none)."""

    @abc.abstractmethod
    def renew_lease(
        self,
        run_id: str,
        *,
        epoch: int,
        until: datetime,
        claim: tuple[KeyId, int] | None = None,
    ) -> bool:
        """Extend a live run's lease, and its running step's key claim, to `until`.

        The heartbeat of a process that holds runs open: a step that runs, or
        a planner that thinks, for longer than the claim TTL is not taken for
        a dead writer's. `claim` is the key and step number of a step whose
        intent is written and whose result is not: its claim is extended
        only while it is still that step's and in progress. Leases never
        shrink.

        Returns:
            False if the run's epoch moved (another writer took it over):
            nothing was written.
        """

    @abc.abstractmethod
    def take_over(
        self,
        run_id: str,
        *,
        parked: Sequence[str],
        orphaned: Sequence[str] = (),
        now: datetime | None = None,
        lease_until: datetime | None = None,
    ) -> RunRow:
        """Hold a run for a new writer: bump its lease epoch, atomically.

        The run must be in one of the `parked` states, or in one of the
        `orphaned` states with its lease run out by `now` (its writer died;
        without `now`, no lease has run out); every writer holding an older
        epoch is refused from then on (`LeaseLost`). `lease_until` is the new
        writer's lease, set in the same write (never moved back): until it
        runs out the run is not orphaned, so a second take-over racing this
        one is refused, not let in before the new writer's first write.

        Raises:
            NotFound: no such run.
            UsageError: the run is not parked (it ended, or another process runs it).
        """

    @abc.abstractmethod
    def latest_approval(
        self,
        tenant: str,
        principal_id: str,
        digest: bytes,
        rule_ids: tuple[str, ...],
        *,
        on_behalf_of: str | None,
    ) -> ApprovalRow | None:
        """Return the newest approval request for this call asked by these rules, if any.

        The call is the principal's (`tenant`, `principal_id`), made for
        `on_behalf_of` (None matches only requests made for nobody), with this
        `digest`: the same call made for another person is another call, with
        requests and grants of its own.
        """

    @abc.abstractmethod
    def get_approval(self, approval_id: str) -> ApprovalRow:
        """Return one approval request (a unique prefix of 6+ characters works too).

        Raises:
            NotFound: no such request.
        """

    @abc.abstractmethod
    def list_approvals(
        self,
        *,
        status: ApprovalStatus | None = None,
        limit: int = 50,
        now: datetime | None = None,
        run_id: str | None = None,
    ) -> list[ApprovalRow]:
        """Return approval requests, newest first.

        With `now`, a pending request past its expiry counts as expired: the
        `pending` filter leaves it out and the `expired` filter takes it in.
        `run_id` keeps one run's requests.
        """

    @abc.abstractmethod
    def expire_approval(self, approval_id: str, now: datetime) -> bool:
        """Mark a pending request past its expiry `expired`; tell whether this call did."""

    @abc.abstractmethod
    def decide_approval(
        self,
        approval_id: str,
        *,
        status: ApprovalStatus | None,
        by: str,
        note: str | None,
        now: datetime,
        event: Callable[[ApprovalRow, str | None], Event],
        withdraw: bool = False,
    ) -> ApprovalRow:
        """Decide a pending request and append an event to its run's record, atomically.

        `event(row, refused)` makes the event: `refused` is None when the decision
        applied, else why it did not. With `status` None nothing changes but the
        event is appended (an attempt refused before the store, recorded). The
        decision applies only to a pending request that has not expired: of two
        deciders racing, exactly one wins.

        With `withdraw`, the call closes an approved request no step has spent
        instead (approved -> `status`, which must be `expired`; `by`, `now` and
        `note` say who withdrew it, when and why): nothing runs under it after.
        It applies only to a request still `approved`, so of a step spending
        the grant (approved -> used) and the withdrawal racing, exactly one
        wins; a pending, used, denied or expired request is left as it is.

        Raises:
            NotFound: no such request.
            ApprovalClosed: the request is decided, used or expired; with
                `withdraw`, it is not approved (the event is still recorded).
            ValueError: `withdraw` with a `status` other than `expired`.
        """

    @abc.abstractmethod
    def abort_run(
        self,
        run_id: str,
        *,
        abortable: Sequence[str],
        end: Callable[[RunRow, list[StoredEvent]], list[Event]],
        at: datetime,
    ) -> RunRow:
        """Take a run from whoever holds it and end it `aborted`, in one transaction.

        The run must be in one of the `abortable` states. Its lease epoch goes
        up, so every writer holding an older one is refused from then on
        (`LeaseLost`); `end(row, record)` makes the events that end it from the
        run as it is (its row and its stored record), and they are appended at
        its head, with status `aborted` and error code `aborted`. Nothing comes
        between the two: a writer refused by the new epoch finds the run
        already aborted, and no worker can take the run over in between.

        Returns:
            The run's row, now aborted.

        Raises:
            NotFound: no such run (`run_id` is a whole id, not a prefix).
            UsageError: the run is not in an abortable state (it ended).
        """

    @abc.abstractmethod
    def resolve_step(
        self,
        run_id: str,
        *,
        step: int,
        seen_seq: int,
        key: KeyUpdate | None,
        event: Callable[[bool], Event],
        at: datetime,
    ) -> int:
        """Settle a step in doubt and record a person's answer, in one transaction.

        `key`, if given, is settled only while it is still this step's and
        open (`in_doubt`, or `in_progress`: claimed); `event(settled)` makes the
        answer's event, told whether the key was, and it is appended at the
        run's head, whoever holds the run (a live writer takes it up). Of two
        answers racing, one wins: an `in_doubt_resolved` event for `step` after
        `seen_seq` (the last event the caller read) refuses the other.

        Returns:
            The appended event's seq.

        Raises:
            NotFound: no such run.
            UsageError: the step was resolved since `seen_seq`.
        """

    @abc.abstractmethod
    def lookup_key(self, key: KeyId) -> KeyRecord | None:
        """Return the record of `key`, if any."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRow:
        """Return one run.

        Raises:
            NotFound: no run with that id (a unique prefix of 6+ characters works too).
        """

    @abc.abstractmethod
    def list_runs(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        after: RunRow | None = None,
        oldest_first: bool = False,
    ) -> list[RunRow]:
        """Return up to `limit` runs, newest first (oldest first with `oldest_first`).

        Runs are in `(created_at, run_id)` order, which no two runs share, so
        a listing is walked page by page: pass the last row of one page as
        `after` for the runs that come after it, in the same order (keyset
        paging: each page is one range of an index, however deep it starts).
        The cursor is the row's place, not its membership: a run that left
        `status` since it was listed still marks where the next page begins.

        Args:
            limit: The most runs returned.
            status: Only runs in this status (None: every run).
            after: The last row of the previous page (None: from the start).
            oldest_first: Oldest first instead of newest first.
        """

    @abc.abstractmethod
    def events(self, run_id: str) -> list[StoredEvent]:
        """Return a run's events in order."""

    def wait_for_news(self, seconds: float, sleep: Callable[[float], None]) -> None:
        """Wait up to `seconds`, less when news may have made a parked run ready.

        News is a decided approval request. A backend that cannot hear of it
        (another process's write to a SQLite file) just sleeps with `sleep`:
        its waiter polls.
        """
        sleep(seconds)

    def close(self) -> None:  # noqa: B027  # optional for backends without resources
        """Release connections."""
