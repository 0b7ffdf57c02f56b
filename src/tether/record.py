"""Run records: the event kinds and their canonical bytes; the chain and redaction re-exported.

A run's record is an append-only list of events. Each stored event is the
canonical JSON of one event dataclass (without its sequence number, which the
store keeps beside it) and a SHA-256 hash over the previous hash, the sequence
number and those bytes. The chain's head (last sequence number and hash) is
signed with an HMAC key kept outside the database, so that rewriting the chain
or cutting its tail is caught by `verify`, not only editing a row in the middle.

This module is the record's one import: the events are declared in `_events`
(slotted and unfrozen for speed: see there), verification in `_verify`,
secrets and redaction in `_redact`, the chain's primitives in `_chain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, TypeAlias

import pydantic
from pydantic import BaseModel

from tether import _canonical
from tether._chain import StoredEvent, chain_hash, genesis, sign_head
from tether._events import (
    FORMAT,
    ApprovalDecided,
    ApprovalRequested,
    ApprovalUsed,
    BreakerChecked,
    BreakerTransition,
    Decided,
    Executed,
    Failed,
    IdempotentHit,
    InDoubtRecorded,
    InDoubtResolved,
    Intent,
    KeyExpired,
    LimitRefused,
    LimitReserved,
    LimitSettled,
    PlanAdmitted,
    PlanProposed,
    PlanStashed,
    PreconditionChecked,
    RetryScheduled,
    RunFinished,
    RunStarted,
    RunStatus,
    UsageCharged,
    Validated,
)
from tether._redact import SECRET_MASK, Secret, redact_text, secret_values
from tether._verify import VerifyReport, verify
from tether.errors import TetherError

__all__ = [
    "FORMAT",
    "SECRET_MASK",
    "ApprovalDecided",
    "ApprovalRequested",
    "ApprovalUsed",
    "BreakerChecked",
    "BreakerTransition",
    "Decided",
    "Event",
    "Executed",
    "Failed",
    "IdempotentHit",
    "InDoubtRecorded",
    "InDoubtResolved",
    "Intent",
    "KeyExpired",
    "LimitRefused",
    "LimitReserved",
    "LimitSettled",
    "Outcome",
    "OutcomeStatus",
    "PlanAdmitted",
    "PlanProposed",
    "PlanStashed",
    "PreconditionChecked",
    "RetryScheduled",
    "RunFinished",
    "RunStarted",
    "RunStatus",
    "Secret",
    "StoredEvent",
    "UsageCharged",
    "Validated",
    "VerifyReport",
    "chain_hash",
    "decode",
    "encode",
    "genesis",
    "redact_text",
    "secret_values",
    "sign_head",
    "verify",
]

Event: TypeAlias = (
    RunStarted
    | RunStatus
    | RunFinished
    | PlanProposed
    | PlanAdmitted
    | Validated
    | PreconditionChecked
    | Decided
    | IdempotentHit
    | KeyExpired
    | Intent
    | Executed
    | Failed
    | InDoubtRecorded
    | InDoubtResolved
    | LimitReserved
    | LimitRefused
    | LimitSettled
    | BreakerChecked
    | BreakerTransition
    | RetryScheduled
    | PlanStashed
    | UsageCharged
    | ApprovalRequested
    | ApprovalDecided
    | ApprovalUsed
)

_ADAPTER: pydantic.TypeAdapter[Event] = pydantic.TypeAdapter(
    Annotated[Event, pydantic.Field(discriminator="kind")]
)


def encode(event: Event) -> bytes:
    """Return the canonical bytes of `event`."""
    return _canonical.dumps_fields(event)


def decode(body: bytes | str) -> Event:
    """Read an event back from its canonical bytes.

    Raises:
        pydantic.ValidationError: the bytes are not an event of this format.
    """
    return _ADAPTER.validate_json(body)


# -- outcomes -----------------------------------------------------------------


class OutcomeStatus(StrEnum):
    """How a step ended."""

    EXECUTED = "executed"
    DRY_RUN = "dry_run"
    IDEMPOTENT_HIT = "idempotent_hit"
    REFUSED = "refused"
    INVALID = "invalid"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """The gateway's answer for one step; `Run.call` returns its output or raises its error."""

    status: OutcomeStatus
    step: int
    """The step's number in the run."""
    capability: str
    output: BaseModel | None = None
    """The validated output (also for dry runs and idempotent hits)."""
    error: TetherError | None = None
    """The error `call` raises, for every status but executed, dry_run and idempotent_hit."""
    idempotency_key: str | None = None
    """The key the step ran under (given, or derived for a `keyed` capability);
    retry a failed keyed call by passing it again."""

    @property
    def dry_run(self) -> bool:
        """True when the dry-run handler produced the output."""
        return self.status is OutcomeStatus.DRY_RUN

    def unwrap(self) -> BaseModel:
        """Return the output, or raise the step's error."""
        if self.error is not None:
            raise self.error
        assert self.output is not None
        return self.output
