"""Run records: the event kinds, their canonical bytes, the hash chain and redaction.

A run's record is an append-only list of events. Each stored event is the
canonical JSON of one dataclass below (without its sequence number, which the
store keeps beside it) and a SHA-256 hash over the previous hash, the sequence
number and those bytes. The chain's head (last sequence number and hash) is
signed with an HMAC key kept outside the database, so that rewriting the chain
or cutting its tail is caught by `verify`, not only editing a row in the middle.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeAlias
from urllib.parse import quote, quote_plus

import pydantic
from pydantic import BaseModel, SecretBytes, SecretStr

from tether import _canonical
from tether._chain import StoredEvent, chain_hash, genesis, sign_head
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

FORMAT = 1
"""Version of the record format; stored in every `run_started` event."""

SECRET_MASK = "**********"  # noqa: S105  # a mask, not a password
"""What a secret field becomes in a record (the same mask pydantic's `SecretStr` uses)."""


class _SecretMarker:
    __slots__ = ()

    def __repr__(self) -> str:
        return "tether.Secret"


_SECRET = _SecretMarker()


class _SecretText(str):
    """A secret's clear text for the handler, whose repr is the mask.

    Printing a model, or a traceback's locals, does not show the secret.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(SECRET_MASK)


Secret = Annotated[
    str,
    _SECRET,
    pydantic.AfterValidator(_SecretText),
    pydantic.PlainSerializer(lambda _v: SECRET_MASK, return_type=str, when_used="json"),
    pydantic.WithJsonSchema(
        {"type": "string", "writeOnly": True, "x-tether-secret": True}
    ),
]
"""A `str` field that tether never stores or prints in clear (like `SecretStr`, but
the handler gets a plain `str`)."""


# -- events -------------------------------------------------------------------

# Events are made on the hottest path, three or more per step. Frozen dataclasses
# set each field through object.__setattr__, which cost 1.6 us of a 12 us in-memory
# step (measured with benchmarks/call_path.py), so events are plain slotted
# dataclasses. Nothing mutates one after it is made: the gateway hands each to the
# store, which encodes it (the in-memory store keeps the objects but only ever
# returns their canonical bytes).
#
# Each event declares its fields in sorted order, `at` and `step` included: orjson
# writes a dataclass's fields in declaration order, natively and four times faster
# than through a dict, so sorted declarations are what make that output canonical.
# tests/test_conventions.py holds every event to it.


@dataclass(slots=True, kw_only=True)
class RunStarted:
    """The run began: who asked, for what, in which context."""

    at: datetime
    """When the stage ran, aware UTC."""
    context: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT
    """Record format version."""
    kind: Literal["run_started"] = "run_started"
    planner: str | None = None
    """The registered planner that drives the run (`Tether.start`), if one does."""
    principal: dict[str, Any]
    request: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class RunStatus:
    """A lifecycle transition."""

    at: datetime
    """When the stage ran, aware UTC."""
    kind: Literal["run_status"] = "run_status"
    previous: str
    status: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class RunFinished:
    """The run reached a final status."""

    at: datetime
    """When the stage ran, aware UTC."""
    error_code: str | None = None
    kind: Literal["run_finished"] = "run_finished"
    message: str | None = None
    status: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class PlanProposed:
    """A planner proposed the next steps (capability, args, rationale each)."""

    answer: str | None = None
    """The planner's final answer, when it finished."""
    at: datetime
    """When the stage ran, aware UTC."""
    finish: bool = False
    """True when the planner said the task is done."""
    kind: Literal["plan_proposed"] = "plan_proposed"
    planner: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    steps: tuple[dict[str, Any], ...]
    """Each proposed step: `{"capability", "args", "rationale"}`."""


@dataclass(slots=True, kw_only=True)
class PlanAdmitted:
    """A proposed plan was checked as a whole before its first step ran."""

    at: datetime
    """When the stage ran, aware UTC."""
    budget_left: Decimal | None = None
    """What was left of the run's budget; None when the run has none."""
    kind: Literal["plan_admitted"] = "plan_admitted"
    policy_version: str
    status: str
    """`admitted`, `needs_approval` or `refused`."""
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    steps: tuple[dict[str, Any], ...]
    """Each step's admission: `{"index", "capability", "version", "verdict",
    "rule_ids", "reasons", "cost", "dry_run", "error_code", "error_message"}`."""
    total_cost: Decimal = Decimal(0)
    """The plan's estimated cost."""


@dataclass(slots=True, kw_only=True)
class Validated:
    """The step's args matched the input schema (secrets masked)."""

    args: dict[str, Any]
    at: datetime
    """When the stage ran, aware UTC."""
    capability: str
    dry_run: bool = False
    """The caller asked for a dry run (a policy may still force one)."""
    effect: str
    """The capability's declared effect: `read`, `write` or `destructive`."""
    key: str | None = None
    """The caller's idempotency key, if it gave one (replay calls the step again with it)."""
    kind: Literal["validated"] = "validated"
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    version: str


@dataclass(slots=True, kw_only=True)
class PreconditionChecked:
    """The capability's preconditions were checked, in order."""

    at: datetime
    """When the stage ran, aware UTC."""
    checks: tuple[str, ...]
    """Names of the checks that ran."""
    failed: str | None = None
    """The first check that did not hold, if any."""
    kind: Literal["precondition_checked"] = "precondition_checked"
    reason: str | None = None
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class Decided:
    """Policy's decision for the step."""

    at: datetime
    """When the stage ran, aware UTC."""
    kind: Literal["decided"] = "decided"
    on_behalf_of: str | None = None
    policy_version: str
    principal: str
    reasons: tuple[str, ...] = ()
    rule_ids: tuple[str, ...] = ()
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    verdict: str


@dataclass(slots=True, kw_only=True)
class IdempotentHit:
    """A completed call under the same key answered; nothing ran, nothing was charged."""

    at: datetime
    """When the stage ran, aware UTC."""
    key: str
    kind: Literal["idempotent_hit"] = "idempotent_hit"
    original_run: str
    original_step: int
    output: dict[str, Any]
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class KeyExpired:
    """The key's stored result was past retention (or its claim stale); the call runs anew."""

    at: datetime
    """When the stage ran, aware UTC."""
    key: str
    kind: Literal["key_expired"] = "key_expired"
    previous_state: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class Intent:
    """The step is about to act; durable before the handler runs."""

    at: datetime
    """When the stage ran, aware UTC."""
    capability: str
    cost_estimate: Decimal = Decimal(0)
    key: str | None
    kind: Literal["intent"] = "intent"
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    version: str


@dataclass(slots=True, kw_only=True)
class Executed:
    """The handler returned a valid output."""

    at: datetime
    """When the stage ran, aware UTC."""
    cost: Decimal = Decimal(0)
    dry_run: bool = False
    duration_us: int
    kind: Literal["executed"] = "executed"
    output: dict[str, Any]
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class Failed:
    """The step failed or was refused at `stage`; what was wrong, by type and message."""

    approval_id: str | None = None
    """The approval request the step waits on (`approval_required` only): its
    own, or one another run made for the same call; the run is ready to
    resume once it is decided."""
    at: datetime
    """When the stage ran, aware UTC."""
    duration_us: int | None = None
    error_code: str
    error_type: str
    kind: Literal["failed"] = "failed"
    message: str
    stage: str
    """`resolve`, `validate`, `precondition`, `policy`, `idempotency`, `execute`,
    `output`; `intent` for a step whose intent landed unseen and never ran."""
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class InDoubtRecorded:
    """The step started and its outcome is unknown: it is never re-run automatically."""

    at: datetime
    """When the stage ran, aware UTC."""
    duration_us: int
    error_type: str
    kind: Literal["in_doubt"] = "in_doubt"
    message: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class LimitReserved:
    """The step took room in these limits before it acted."""

    at: datetime
    """When the stage ran, aware UTC."""
    kind: Literal["limit_reserved"] = "limit_reserved"
    limits: tuple[dict[str, Any], ...]
    """Each: `{"id", "scope", "amount"}`."""
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    throttled_us: int = 0
    """How long a budget's throttle held the step back first (0: not at all)."""


@dataclass(slots=True, kw_only=True)
class LimitRefused:
    """A limit had no room for the step: nothing ran, nothing was charged."""

    at: datetime
    """When the stage ran, aware UTC."""
    cap: Decimal
    """The limit: a budget's amount, a quota's or cap's max, a rate's burst."""
    held: Decimal = Decimal(0)
    """Reserved by calls still running."""
    kind: Literal["limit_refused"] = "limit_refused"
    left: Decimal
    limit: str
    limit_kind: str
    requested: Decimal
    retry_after_us: int = 0
    scope: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    used: Decimal


@dataclass(slots=True, kw_only=True)
class LimitSettled:
    """The step's reservations were settled at its actual cost, or released."""

    at: datetime
    """When the stage ran, aware UTC."""
    kind: Literal["limit_settled"] = "limit_settled"
    limits: tuple[dict[str, Any], ...]
    """Each: `{"id", "scope", "reserved", "actual"}`; `actual` is None when released."""
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class BreakerChecked:
    """A breaker that is not closed let the step through as a trial, or refused it."""

    admitted: bool
    at: datetime
    """When the stage ran, aware UTC."""
    breaker: str
    kind: Literal["breaker_checked"] = "breaker_checked"
    mode: str | None = None
    """When refused: the degraded mode that acts instead."""
    reason: str
    state: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class BreakerTransition:
    """A breaker changed state; recorded in the run whose step moved it."""

    at: datetime
    """When the transition took effect, aware UTC."""
    breaker: str
    kind: Literal["breaker_transition"] = "breaker_transition"
    previous: str
    reason: str
    state: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class RetryScheduled:
    """An attempt failed and the step is retried after `delay_us` (same key)."""

    at: datetime
    """When the stage ran, aware UTC."""
    attempt: int
    """The attempt that failed, from 1."""
    delay_us: int
    duration_us: int
    error_code: str
    kind: Literal["retry_scheduled"] = "retry_scheduled"
    message: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class PlanStashed:
    """A breaker in `stash` mode parked the run `degraded` with the steps it did not take."""

    at: datetime
    """When the stage ran, aware UTC."""
    breaker: str
    kind: Literal["plan_stashed"] = "plan_stashed"
    reason: str
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    steps: tuple[dict[str, Any], ...]
    """Each: `{"capability", "args", "idempotency_key"}`, in order."""


@dataclass(slots=True, kw_only=True)
class UsageCharged:
    """A planner's model usage, charged to the run's budgets as capability `llm`."""

    at: datetime
    """When the stage ran, aware UTC."""
    cost: Decimal
    input_tokens: int = 0
    kind: Literal["usage_charged"] = "usage_charged"
    limits: tuple[str, ...] = ()
    """The budgets charged."""
    model: str | None = None
    output_tokens: int = 0
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class ApprovalRequested:
    """The step needs a person's decision; a durable request was made for it."""

    approval_id: str
    approvers: tuple[str, ...] = ()
    """Roles that may decide; empty: any named approver but the requester."""
    args: dict[str, Any]
    at: datetime
    """When the stage ran, aware UTC."""
    capability: str
    digest: str
    """Hex digest the grant is bound to (capability, version, args, policy, preview)."""
    expires_at: datetime
    kind: Literal["approval_requested"] = "approval_requested"
    preview: dict[str, Any] | None = None
    """What the dry-run handler said the call would do, if it has one."""
    reasons: tuple[str, ...] = ()
    rule_ids: tuple[str, ...] = ()
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""
    version: str


@dataclass(slots=True, kw_only=True)
class ApprovalDecided:
    """A person decided an approval request, or tried to and was refused (recorded too)."""

    approval_id: str
    at: datetime
    """When the stage ran, aware UTC."""
    by: str
    """Who decided (or tried to); `tether` for an expiry."""
    kind: Literal["approval_decided"] = "approval_decided"
    note: str | None = None
    outcome: str
    """`approved`, `denied`, `expired`, or `refused` (the attempt was not allowed)."""
    reason: str | None = None
    """Why a `refused` attempt was refused."""
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


@dataclass(slots=True, kw_only=True)
class ApprovalUsed:
    """The step runs under an approved request, which is now spent."""

    approval_id: str
    at: datetime
    """When the stage ran, aware UTC."""
    decided_by: str
    kind: Literal["approval_used"] = "approval_used"
    step: int | None = None
    """The step's number in the run, from 1; None for run-level events."""


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


# -- the chain ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What `verify` found."""

    run_id: str
    ok: bool
    events: int
    """Events checked."""
    head: str
    """Hex hash of the last good event (the chain head)."""
    first_bad_seq: int | None = None
    """Sequence number of the first event that fails, if one does."""
    reason: str | None = None
    """One line on what failed."""

    def raise_for_failure(self) -> None:
        """Raise `IntegrityError` when the chain does not verify."""
        if not self.ok:
            from tether.errors import IntegrityError

            raise IntegrityError(f"run {self.run_id}: {self.reason}")

    def to_json(self) -> dict[str, object]:
        """Return the report as a JSON document."""
        return {
            "format": 1,
            "run_id": self.run_id,
            "ok": self.ok,
            "events": self.events,
            "head": self.head,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
        }


def verify(
    run_id: str,
    events: Sequence[StoredEvent],
    *,
    head_seq: int,
    head_hash: bytes,
    head_sig: bytes | None,
    key: bytes | None,
    expected_head: str | None = None,
) -> VerifyReport:
    """Recompute a run's chain and check its stored, signed and exported heads.

    Without a signature key (or an exported head) a consistent rewrite of the
    whole chain by someone with write access to the database cannot be told from
    the original: that is the unanchored case, and the report says so.
    """
    previous = genesis(run_id)
    expected_seq = 1
    finished = False
    for ev in events:
        # A finished run's record takes nothing more, but a person's decision
        # on one of its approval requests, which is recorded in it wherever
        # and whenever it is made.
        if finished and _kind(ev.body) != "approval_decided":
            return _bad(
                run_id,
                ev.seq,
                previous,
                expected_seq - 1,
                f"event {ev.seq} follows the run's run_finished event",
            )
        if ev.seq != expected_seq:
            return _bad(
                run_id,
                expected_seq,
                previous,
                expected_seq - 1,
                f"event {expected_seq} is missing (found {ev.seq} next)",
            )
        h = chain_hash(previous, ev.seq, ev.body)
        if not hmac.compare_digest(h, ev.hash):
            return _bad(
                run_id,
                ev.seq,
                previous,
                expected_seq - 1,
                f"event {ev.seq} does not match its hash (altered, moved or forged)",
            )
        previous = h
        expected_seq += 1
        finished = finished or _kind(ev.body) == "run_finished"
    count = expected_seq - 1
    if head_seq != count or not hmac.compare_digest(head_hash, previous):
        return _bad(
            run_id,
            min(head_seq, count) + 1,
            previous,
            count,
            f"the stored head is event {head_seq} but the chain ends at {count} "
            + (
                "(events removed from the end, or the head rewritten)"
                if head_seq > count
                else "(events appended after the head, or the head rewritten)"
            ),
        )
    if key is not None and head_sig is None:
        return _bad(
            run_id,
            None,
            previous,
            count,
            "the head is not signed although a record key is configured: the "
            "signature was removed, so the record may have been rewritten",
        )
    if key is not None and head_sig is not None:
        good = sign_head(key, run_id, head_seq, head_hash)
        if not hmac.compare_digest(good, head_sig):
            return _bad(
                run_id,
                None,
                previous,
                count,
                "the signed head does not match: the record was rewritten or "
                "truncated by someone without the record key",
            )
    if expected_head is not None and expected_head.lower() != previous.hex():
        return _bad(
            run_id,
            None,
            previous,
            count,
            f"the head {previous.hex()} differs from the exported head {expected_head}",
        )
    return VerifyReport(run_id=run_id, ok=True, events=count, head=previous.hex())


def _kind(body: bytes) -> object:
    try:
        data = _canonical.loads(body)
    except ValueError:
        return None
    return data.get("kind") if isinstance(data, dict) else None


def _bad(
    run_id: str, seq: int | None, head: bytes, count: int, reason: str
) -> VerifyReport:
    return VerifyReport(
        run_id=run_id,
        ok=False,
        events=count,
        head=head.hex(),
        first_bad_seq=seq,
        reason=reason,
    )


# -- redaction ----------------------------------------------------------------


def secret_values(model: BaseModel) -> list[str]:
    """Return the clear values of every secret field in `model`, nested included."""
    found: list[str] = []
    _collect(model, found, 0)
    # A tether.Secret inside Optional, list or dict carries no field metadata of
    # its own: whatever JSON mode masks is a secret.
    _masked(model.model_dump(), model.model_dump(mode="json"), found, 0)
    return [s for s in found if s]


def _masked(py: object, js: object, found: list[str], depth: int) -> None:
    if depth > 32:
        return
    if isinstance(py, str) and js == SECRET_MASK and py != SECRET_MASK:
        found.append(py)
    elif isinstance(py, Mapping) and isinstance(js, Mapping):
        for k, v in py.items():
            if k in js:
                _masked(v, js[k], found, depth + 1)
    elif isinstance(py, (list, tuple)) and isinstance(js, (list, tuple)):
        for a, b in zip(py, js, strict=False):
            _masked(a, b, found, depth + 1)


def _collect(value: object, found: list[str], depth: int) -> None:
    if depth > 32:
        return
    if isinstance(value, SecretStr):
        found.append(value.get_secret_value())
    elif isinstance(value, SecretBytes):
        found.append(value.get_secret_value().decode(errors="replace"))
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            item = getattr(value, name, None)
            if isinstance(item, str) and _SECRET in info.metadata:
                found.append(item)
            else:
                _collect(item, found, depth + 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            _collect(item, found, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, found, depth + 1)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """Replace each secret in `text`, also URL-encoded or base64, with the mask."""
    forms: set[str] = set()
    for secret in secrets:
        raw = secret.encode()
        forms.update(
            {
                secret,
                quote(secret, safe=""),
                quote(secret),
                quote_plus(secret),
                base64.b64encode(raw).decode(),
                base64.urlsafe_b64encode(raw).decode(),
                base64.b64encode(raw).decode().rstrip("="),
                base64.urlsafe_b64encode(raw).decode().rstrip("="),
            }
        )
    for form in sorted(forms - {""}, key=len, reverse=True):
        text = text.replace(form, SECRET_MASK)
    return text


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
