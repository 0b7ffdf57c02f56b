"""A batch and its answer: the one atomic write for a run, and what the store says back.

The call path sends a `Batch` (events, with a new run, a key claim or update,
limit and breaker commands, an approval request or grant) to `Store.commit`,
which writes all of it or nothing, and answers with `Committed`: the new chain
head, or why nothing was written (`PendingExists`, `GrantGone`, a limit's or
breaker's refusal, a key's conflicting record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from tether.store._breakers import BreakerAdmit, BreakerOutcome
from tether.store._limits import Blocked, Reserve, RetryCharge, Settle
from tether.store._rows import ApprovalRow, KeyId, KeyRecord, KeyState

if TYPE_CHECKING:
    from tether.record import Event

__all__ = [
    "Batch",
    "Claim",
    "Committed",
    "GrantGone",
    "KeyUpdate",
    "NewRun",
    "PendingExists",
]

# Batches, claims and key updates are commands on their way to the store, not
# facts: they are plain (unfrozen) slotted dataclasses, which are half the cost to
# build on the call path, and the run fills a batch's chain head when it writes it.


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
    ends_claim: bool = False
    """The call is known to have stopped (it returned or raised): the key's
    claim ends at `now`. Left False while it may still be in the call (a
    timed-out thread), so the claim holds until it lapses. A person saying a
    step in doubt did not act waits out a live claim (`Tether.resolve_in_doubt`)."""


@dataclass(slots=True, kw_only=True)
class NewRun:
    """Create the run row together with the batch's events."""

    tenant: str
    principal_id: str
    request: str
    status: str
    created_at: datetime


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
    never ran. A request in any other state is left as it is; one whose run
    was aborted meanwhile becomes `expired` (the abort withdraws its run's
    grants)."""

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
    probe_at: int = 0
    """A trial call: when the breaker let it through, µs (its outcome names it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingExists:
    """A live pending request for the same call exists: the new one was not stored."""

    approval_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantGone:
    """The grant a batch meant to spend is no longer approved (spent, expired)."""

    approval_id: str
