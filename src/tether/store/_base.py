"""The store interface: what the call path needs from durable state, and its values.

Two backends implement it (SQLite now, PostgreSQL later); one conformance suite
holds them to the same behaviour. Every write for a run is one `commit` of a
`Batch`, fenced by the run's lease epoch and its current chain head, so a stale
worker can never write and a chain can never fork.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from tether._chain import StoredEvent

if TYPE_CHECKING:
    from tether.record import Event

__all__ = [
    "Batch",
    "Claim",
    "Committed",
    "KeyId",
    "KeyRecord",
    "KeyState",
    "KeyUpdate",
    "NewRun",
    "RunRow",
    "Store",
    "may_replace",
]


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


@dataclass(slots=True, kw_only=True)
class Committed:
    """The result of `Store.commit`."""

    head_seq: int
    head_hash: bytes
    conflict: KeyRecord | None = None
    """When the claim could not be taken: the key's record; nothing was written."""
    took_over: KeyRecord | None = None
    """When the claim replaced an expired or failed record: that record."""


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

    def close(self) -> None:  # noqa: B027  # optional for backends without resources
        """Release connections."""


def may_replace(existing: KeyRecord, claim: Claim) -> bool:
    """Tell whether a new claim may take a key that already has a record."""
    if existing.state is KeyState.COMPLETED:
        assert existing.completed_at is not None
        return existing.completed_at + claim.retention <= claim.now
    if existing.state is KeyState.IN_PROGRESS:
        return claim.take_over_stale and existing.lease_until <= claim.now
    if existing.state is KeyState.FAILED:
        return existing.fingerprint == claim.fingerprint
    return False  # in doubt: only a person clears it
