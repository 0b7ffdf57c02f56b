"""The store's rows: what it holds and answers with, as frozen facts.

An approval request (`ApprovalRow`) and its status, an idempotency key
(`KeyId`) and its record, a run (`RunRow`) and a limit counter (`LimitRow`),
as every backend reads them back. The commands that write them travel in a
`Batch` (`tether.store._batch`); `tether.store` re-exports both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from tether import _canonical

__all__ = [
    "ApprovalRow",
    "ApprovalStatus",
    "KeyId",
    "KeyRecord",
    "KeyState",
    "LimitRow",
    "RunRow",
]


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
