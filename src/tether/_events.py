"""The record's schema: one slotted dataclass per event kind a run's record holds.

`tether.record` re-exports every event with the `Event` union and its canonical
bytes (`encode`, `decode`); nothing here knows about the store or the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

__all__ = [
    "FORMAT",
    "PEOPLES_KINDS",
    "ApprovalDecided",
    "ApprovalRequested",
    "ApprovalUsed",
    "BreakerChecked",
    "BreakerTransition",
    "Decided",
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
    "PlanAdmitted",
    "PlanProposed",
    "PlanStashed",
    "PreconditionChecked",
    "RetryScheduled",
    "RunFinished",
    "RunStarted",
    "RunStatus",
    "UsageCharged",
    "Validated",
]

FORMAT = 1
"""Version of the record format; stored in every `run_started` event."""

PEOPLES_KINDS = frozenset({"approval_decided", "in_doubt_resolved"})
"""Kinds a person's answer appends to a run from any process, whoever holds it,
also after its `run_finished`: a decision on one of its approval requests, an
answer to one of its steps in doubt."""


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
    budget: Decimal | None = None
    """The most the run's plans may cost; None: no budget (and records older
    than the field). A resumed run keeps it."""
    context: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT
    """Record format version."""
    kind: Literal["run_started"] = "run_started"
    max_steps: int | None = None
    """The most steps its planner may take (`Tether.start`); None when no
    planner drives it (or the record is older than the field: 50 on resume)."""
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
    by: str | None = None
    """Who moved the run, when a person did (`aborted` by `Tether.abort`); None
    when the run's own writer did (and in records older than the field)."""
    kind: Literal["run_status"] = "run_status"
    previous: str
    reason: str | None = None
    """Why the person moved it; None when `by` is."""
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
    timeout: float | None = None
    """The caller's deadline for the call, in seconds, if it gave one (`Run.call`'s
    `timeout`): the handler gets the shorter of it and the capability's own."""
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
class InDoubtResolved:
    """A person checked the upstream and said whether a step in doubt acted.

    Written by `Tether.resolve_in_doubt` (`tether runs resolve`), from any
    process, after the step's `in_doubt` event, also in a run that has ended.
    """

    acted: bool
    """The person found the call acted upstream (True) or did not (False)."""
    at: datetime
    """When the resolution was recorded, aware UTC."""
    by: str
    """Who resolved it."""
    key: str | None = None
    """The step's idempotency key, if it had one."""
    key_state: str | None = None
    """What the key became (`completed`, `failed`); None: no key of this step's
    was left to settle (it had none, or a later call had taken it over)."""
    kind: Literal["in_doubt_resolved"] = "in_doubt_resolved"
    output: dict[str, Any] | None = None
    """The call's result, as the person gave it (with `acted`)."""
    reason: str
    """What the person found, in their words."""
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
    """Each: `{"capability", "args", "idempotency_key"}`, in order, args as a step
    records them (secrets masked); `"secrets": true` marks a step whose args
    hold secrets, which a resume leaves to the planner."""


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
