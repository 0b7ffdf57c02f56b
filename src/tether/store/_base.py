"""The store interface: what the call path needs from durable state, and its values.

Two backends implement it (SQLite now, PostgreSQL later); one conformance suite
holds them to the same behaviour. Every write for a run is one `commit` of a
`Batch`, fenced by the run's lease epoch and its current chain head, so a stale
worker can never write and a chain can never fork.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from tether import _canonical
from tether._chain import StoredEvent
from tether.store._breakers import (
    BreakerAdmit,
    BreakerBlocked,
    BreakerOutcome,
    BreakerRow,
    breaker_view,
)
from tether.store._limits import (
    Admitted,
    Blocked,
    LimitTables,
    Reserve,
    RetryCharge,
    Settle,
    apply_admission,
    apply_results,
    charge_retry,
    to_us,
)

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
    "closed_reason",
    "may_replace",
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


class ApprovalStatus(StrEnum):
    """Where an approval request is."""

    PENDING = "pending"
    APPROVED = "approved"
    """Granted, not yet used: the step it was made for may run once."""
    DENIED = "denied"
    EXPIRED = "expired"
    USED = "used"
    """Granted and spent by the step it was made for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalRow:
    """An approval request: a step that waits for a person's decision."""

    id: str
    run_id: str
    step: int
    tenant: str
    principal_id: str
    on_behalf_of: str | None
    capability: str
    version: str
    args: bytes
    """The canonical args as the record holds them (secrets masked)."""
    preview: bytes | None
    """What the dry-run handler said the call would do (canonical JSON), if it has one."""
    digest: bytes
    """Binds a grant to the capability and version, the canonical args (secrets
    included, through an HMAC), the policy version and the preview."""
    policy_version: str
    rule_ids: tuple[str, ...]
    reasons: tuple[str, ...]
    approvers: tuple[str, ...]
    """Roles that may decide; empty: any named approver but the requester."""
    status: ApprovalStatus
    created_at: datetime
    expires_at: datetime
    decided_by: str | None = None
    decided_at: datetime | None = None
    note: str | None = None

    def describe(self) -> dict[str, Any]:
        """Return the request as JSON-ready data (`--json`, the webhook)."""

        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "id": self.id,
            "status": self.status.value,
            "run_id": self.run_id,
            "step": self.step,
            "tenant": self.tenant,
            "principal": self.principal_id,
            "on_behalf_of": self.on_behalf_of,
            "capability": self.capability,
            "version": self.version,
            "args": _canonical.loads(self.args),
            "preview": None if self.preview is None else _canonical.loads(self.preview),
            "rule_ids": list(self.rule_ids),
            "reasons": list(self.reasons),
            "approvers": list(self.approvers),
            "policy_version": self.policy_version,
            "digest": self.digest.hex(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "decided_by": self.decided_by,
            "decided_at": iso(self.decided_at),
            "note": self.note,
        }


class KeyState(StrEnum):
    """Where an idempotency key is."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    """The call raised; a `keyed` retry may run again under the key."""
    IN_DOUBT = "in_doubt"
    """The call started and its outcome is unknown; only a person may clear it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyId:
    """An idempotency key in its scope: the same client key of another principal is another key."""

    tenant: str
    principal_id: str
    capability: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    """What the store holds for a key."""

    state: KeyState
    fingerprint: bytes
    run_id: str
    step: int
    output: bytes | None
    claimed_at: datetime
    lease_until: datetime
    completed_at: datetime | None


@dataclass(slots=True, kw_only=True)
class Claim:
    """Take a key for a call that is about to start."""

    id: KeyId
    fingerprint: bytes
    run_id: str
    step: int
    now: datetime
    lease_until: datetime
    """Until when the claim holds while in progress."""
    retention: timedelta
    """How long a completed result answers retries."""
    take_over_stale: bool
    """Whether a stale in-progress claim may be taken (never for `none` capabilities)."""


@dataclass(slots=True, kw_only=True)
class KeyUpdate:
    """Settle a claimed key: completed with its output, failed, or in doubt."""

    id: KeyId
    run_id: str
    step: int
    state: KeyState
    output: bytes | None = None
    now: datetime


@dataclass(slots=True, kw_only=True)
class NewRun:
    """Create the run row together with the batch's events."""

    tenant: str
    principal_id: str
    request: str
    status: str
    created_at: datetime


# Batches, claims and key updates are commands on their way to the store, not
# facts: they are plain (unfrozen) slotted dataclasses, which are half the cost to
# build on the call path, and the run fills a batch's chain head when it writes it.


@dataclass(slots=True, kw_only=True)
class Batch:
    """One atomic write for a run: events, and optionally a key claim or update."""

    run_id: str
    events: Sequence[Event]
    at: datetime
    """When the write was made (the time of its last event)."""
    epoch: int = 0
    """The writer's lease epoch; the write fails if a newer epoch holds the run."""
    base_seq: int = 0
    """The chain head this batch extends; the write fails if the head moved."""
    base_hash: bytes = b""
    new_run: NewRun | None = None
    status: str | None = None
    error_code: str | None = None
    claim: Claim | None = None
    key_update: KeyUpdate | None = None
    reserve: Sequence[Reserve] = ()
    """Room to take in limits before the step acts; a refusal writes nothing."""
    breaker: BreakerAdmit | None = None
    """The breaker to pass before the step acts; a refusal writes nothing."""
    throttle: bool = True
    """False once the step waited out a throttle: reserve without slowing again."""
    settle: Sequence[Settle] = ()
    breaker_outcome: BreakerOutcome | None = None
    retry: RetryCharge | None = None
    """Spend a retry; when no budget is left, nothing is written."""
    step: int = 0
    """The step the limit and breaker commands belong to."""
    lease_until: datetime | None = None
    """Renew the run's lease until then (set by the run's writer on every write)."""
    approval: ApprovalRow | None = None
    """A new approval request to store with the batch; if a live pending one for
    the same call exists, nothing is written (`Committed.blocked` names it), and
    undecided ones past their expiry are marked expired."""
    use_grant: str | None = None
    """Spend this approved request (approved -> used); if it is no longer
    approved, nothing is written (`Committed.blocked` says so)."""
    return_grant: str | None = None
    """Give this spent request back (used -> approved): the step that spent it
    never ran. A request in any other state is left as it is."""

    @property
    def limited(self) -> bool:
        """Tell whether the batch carries limit or breaker commands."""
        return bool(
            self.reserve
            or self.breaker
            or self.settle
            or self.breaker_outcome
            or self.retry
        )


@dataclass(slots=True, kw_only=True)
class Committed:
    """The result of `Store.commit`."""

    head_seq: int
    head_hash: bytes
    conflict: KeyRecord | None = None
    """When the claim could not be taken: the key's record; nothing was written."""
    took_over: KeyRecord | None = None
    """When the claim replaced an expired or failed record: that record."""
    blocked: Blocked | GrantGone | PendingExists | None = None
    """When a limit, a throttle, a retry budget or the breaker said no: why;
    nothing was written."""
    breaker_generation: int | None = None
    """The breaker generation that let the step through (for its outcome)."""
    probe: bool = False
    """The step is a half-open breaker's trial call."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingExists:
    """A live pending request for the same call exists: the new one was not stored."""

    approval_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantGone:
    """The grant a batch meant to spend is no longer approved (spent, expired)."""

    approval_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitRow:
    """One limit counter or lease set, as `tether status` shows it."""

    limit_id: str
    scope: str
    window: datetime | None
    """The window's start; None for a run's lifetime or a limit without windows."""
    used: Decimal
    held: Decimal
    holds: int
    """Live reservations or leases."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRow:
    """A run as `runs list` shows it."""

    run_id: str
    status: str
    tenant: str
    principal_id: str
    request: str
    created_at: datetime
    updated_at: datetime
    epoch: int
    head_seq: int
    head_hash: bytes
    head_sig: bytes | None
    error_code: str | None
    lease_until: datetime | None = None
    """Until when the run's writer holds it; renewed by every write."""


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

    @abc.abstractmethod
    def breaker_rows(self) -> dict[str, BreakerRow]:
        """Return every breaker's stored row, by id."""

    @abc.abstractmethod
    def breaker_row(self, breaker_id: str) -> BreakerRow:
        """Return one breaker's stored row (a closed one when it has none)."""

    @abc.abstractmethod
    def take_over(
        self,
        run_id: str,
        *,
        parked: Sequence[str],
        orphaned: Sequence[str] = (),
        now: datetime | None = None,
    ) -> RunRow:
        """Hold a run for a new writer: bump its lease epoch, atomically.

        The run must be in one of the `parked` states, or in one of the
        `orphaned` states with its lease run out by `now` (its writer died);
        every writer holding an older epoch is refused from then on (`LeaseLost`).

        Raises:
            NotFound: no such run.
            UsageError: the run is not parked (it ended, or another process runs it).
        """

    @abc.abstractmethod
    def latest_approval(
        self, tenant: str, principal_id: str, digest: bytes
    ) -> ApprovalRow | None:
        """Return the newest approval request for this digest, if any."""

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
    ) -> ApprovalRow:
        """Decide a pending request and append an event to its run's record, atomically.

        `event(row, refused)` makes the event: `refused` is None when the decision
        applied, else why it did not. With `status` None nothing changes but the
        event is appended (an attempt refused before the store, recorded). The
        decision applies only to a pending request that has not expired: of two
        deciders racing, exactly one wins.

        Raises:
            NotFound: no such request.
            ApprovalClosed: the request is decided, used or expired (the event is
                still recorded).
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
    def list_runs(self, *, limit: int = 50, status: str | None = None) -> list[RunRow]:
        """Return the newest runs first."""

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


def closed_reason(row: ApprovalRow, now: datetime) -> str:
    """Say why a request can no longer be decided, in one line."""
    if row.status is ApprovalStatus.PENDING and row.expires_at <= now:
        return (
            f"approval request {row.id} expired at {row.expires_at.isoformat()}; "
            "the step asks again when it is retried"
        )
    who = f" by {row.decided_by}" if row.decided_by else ""
    return f"approval request {row.id} is {row.status.value}{who}; a decision is final"


def apply_limits(tables: LimitTables, batch: Batch) -> tuple[list[Event], Admitted]:
    """Apply a batch's limit and breaker commands to a backend's rows.

    Returns:
        The batch's events with the ones the breaker adds, and what was
        admitted. When `Admitted.blocked` is set the caller must write nothing
        of the batch (roll back what this wrote).
    """
    retry = batch.retry
    if retry is not None:  # the failed attempt's outcome first: it may open the breaker
        events = [*batch.events]
        events += apply_results(
            tables, batch.settle, batch.breaker_outcome, now=batch.at
        )
        if retry.breaker is not None and retry.generation is not None:
            view, _ = breaker_view(
                tables.breaker(retry.breaker.id), retry.breaker, to_us(batch.at)
            )
            if view.generation != retry.generation:
                return [], Admitted(
                    blocked=BreakerBlocked(
                        breaker_id=retry.breaker.id, state=view.state, retry_after_us=0
                    )
                )
        refused = charge_retry(tables, retry, now=batch.at)
        if refused is not None:
            return [], Admitted(blocked=refused)
        return events, Admitted()
    admitted = apply_admission(
        tables,
        batch.reserve,
        batch.breaker,
        run_id=batch.run_id,
        step=batch.step,
        now=batch.at,
        throttle=batch.throttle,
    )
    if admitted.blocked is not None:
        return [], admitted
    events = [*batch.events, *admitted.events]
    events += apply_results(tables, batch.settle, batch.breaker_outcome, now=batch.at)
    return events, admitted


def may_replace(existing: KeyRecord, claim: Claim) -> bool:
    """Tell whether a new claim may take a key that already has a record.

    An in-progress claim of the same run and step is the step's own, left by
    a writer that died or was fenced off when the run was taken over: its new
    writer retries it under the key, as a `keyed` retry does.
    """
    if (
        existing.state is KeyState.IN_PROGRESS
        and claim.take_over_stale
        and (existing.run_id, existing.step) == (claim.run_id, claim.step)
    ):
        return existing.fingerprint == claim.fingerprint
    if existing.state is KeyState.COMPLETED:
        assert existing.completed_at is not None
        return existing.completed_at + claim.retention <= claim.now
    if existing.state is KeyState.IN_PROGRESS:
        return claim.take_over_stale and existing.lease_until <= claim.now
    if existing.state is KeyState.FAILED:
        return existing.fingerprint == claim.fingerprint
    return False  # in doubt: only a person clears it
