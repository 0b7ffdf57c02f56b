"""Plans: the steps a planner proposes, admitted or refused as a whole.

A planner may propose several steps at once. Before the first one runs,
`admit` checks every step as the gateway would (the capability exists, its
args and idempotency key are valid, policy's decision for the run), and the
plan's estimated cost against what is left of the run's budget. The plan is
`admitted`, `needs_approval` (admitted, the steps a person must approve
marked) or `refused`, so an agent never half-executes a plan that could not
finish. Preconditions are left to each step: they read live state, which the
plan's earlier steps may change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypeAlias

from pydantic import BaseModel

from tether import record
from tether.capability import MAX_KEY_LENGTH, Capability, Effect, Registry, check_key
from tether.errors import (
    Denied,
    LimitExceeded,
    NotFound,
    UsageError,
    ValidationFailed,
)
from tether.policy import Decision, DecisionRequest, PolicySet, Verdict
from tether.principal import Principal

__all__ = [
    "MAX_KEY_LENGTH",
    "Admission",
    "AdmissionStatus",
    "PlanStep",
    "StepAdmission",
    "StepLike",
    "admit",
    "as_budget",
    "as_step",
    "as_steps",
    "check_token_count",
]

"""Longest idempotency key, in characters (the gateway's bound)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanStep:
    """One step of a plan: a capability, its args and why.

    `tether.agent.ProposedStep` is this class.

    Example:
        ```python
        PlanStep(
            capability="deploy.rollback",
            args={"service": "checkout", "reason": "bad deploy"},
            rationale="preview the rollback target",
            dry_run=True,
        )
        ```
    """

    capability: str
    """The capability's name, as in its tool schema."""
    args: Mapping[str, Any] = field(default_factory=dict)
    """The arguments, as JSON data; the gateway validates them."""
    rationale: str = ""
    """Why the planner wants this step; recorded with the plan."""
    idempotency_key: str | None = None
    """A key of the planner's own, so a retry of the step is deduplicated."""
    dry_run: bool = False
    """Ask for the capability's dry-run handler instead of the real one."""

    def __post_init__(self) -> None:
        # Checked at run time too: planners (LLM output above all) are not type-checked.
        name: object = self.capability
        args: object = self.args
        if not isinstance(name, str) or not name:
            raise UsageError(f"a proposed step needs a capability name, got {name!r}")
        if not isinstance(args, Mapping):
            raise UsageError(
                f"{self.capability}: proposed args must be a mapping, got "
                f"{type(self.args).__name__}"
            )
        rationale: object = self.rationale
        key: object = self.idempotency_key
        dry_run: object = self.dry_run
        if not isinstance(rationale, str):
            raise UsageError(
                f"{name}: a proposed step's rationale must be text, got {rationale!r:.80}"
            )
        if key is not None and not isinstance(key, str):
            raise UsageError(
                f"{name}: a proposed step's idempotency_key must be text or None, "
                f"got {key!r:.80}"
            )
        if not isinstance(dry_run, bool):
            raise UsageError(
                f"{name}: a proposed step's dry_run must be True or False, "
                f"got {dry_run!r:.40}"
            )
        # A read-only view, so a planner cannot change a step after it was recorded.
        object.__setattr__(self, "args", MappingProxyType(dict(self.args)))

    def describe(self) -> dict[str, Any]:
        """Return the step as JSON-ready data (as a `plan_proposed` event holds it)."""
        return {
            "capability": self.capability,
            "args": dict(self.args),
            "rationale": self.rationale,
            "idempotency_key": self.idempotency_key,
            "dry_run": self.dry_run,
        }


StepLike: TypeAlias = (
    PlanStep | tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], str]
)
"""A step as callers write it: `(capability, args)`, `(capability, args, rationale)`
or a `PlanStep` (for an idempotency key or a dry run)."""


def as_step(raw: object, *, what: str = "plan step") -> PlanStep:
    """Return `raw` as a `PlanStep`.

    Args:
        raw: a `PlanStep`, or a `(capability, args[, rationale])` tuple.
        what: how the error names the step (`"scripted step"`, say).

    Raises:
        UsageError: `raw` is neither.
    """
    if isinstance(raw, PlanStep):
        return raw
    if isinstance(raw, tuple) and len(raw) in (2, 3):
        name, args, *rest = raw
        rationale = rest[0] if rest else ""
        if isinstance(name, str) and isinstance(args, Mapping):
            if not isinstance(rationale, str):
                raise UsageError(
                    f"{what} {name!r}: the rationale must be text, got {rationale!r}"
                )
            return PlanStep(capability=name, args=args, rationale=rationale)
    raise UsageError(
        f"a {what} is (capability, args[, rationale]) or a PlanStep "
        f"(tether.agent.ProposedStep), got {raw!r:.120}"
    )


def as_steps(steps: Sequence[StepLike]) -> tuple[PlanStep, ...]:
    """Return each of `steps` as a `PlanStep` (see `as_step`).

    Raises:
        UsageError: a step is malformed, or `steps` is a string or a mapping.
    """
    if isinstance(steps, (str, bytes, Mapping)):
        raise UsageError(
            f"a plan is a sequence of steps, got {type(steps).__name__}; pass a list"
        )
    return tuple(as_step(s) for s in steps)


def as_budget(budget: Decimal | int | None) -> Decimal | None:
    """Return a run's budget as a `Decimal` (None: no budget).

    Raises:
        UsageError: the budget is a float, a bool, negative or not finite.
    """
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, Decimal)):
        raise UsageError(
            f"budget must be an int or a Decimal (money is never a float), got "
            f"{budget!r}; write Decimal('{budget}')"
        )
    amount = Decimal(budget)
    if not amount.is_finite() or amount < 0:
        raise UsageError(f"budget must be a finite amount >= 0, got {budget!r}")
    return amount


_MAX_TOKENS = 2**63 - 1
"""The most tokens one usage report may count (a record holds 64-bit integers)."""


def check_token_count(count: object, name: str) -> None:
    """Raise unless `count` is a token count a record can hold: an int from 0.

    Raises:
        UsageError: it is not an int (a bool is not), or is out of range.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise UsageError(f"usage {name} must be an int, got {count!r:.80}")
    if not 0 <= count <= _MAX_TOKENS:
        raise UsageError(f"usage {name} must be from 0 to {_MAX_TOKENS}, got {count}")


class AdmissionStatus(StrEnum):
    """What admission says of a whole plan."""

    ADMITTED = "admitted"
    """Every step may run as proposed."""
    NEEDS_APPROVAL = "needs_approval"
    """Admitted; the marked steps wait for a person when their turn comes."""
    REFUSED = "refused"
    """A step is unknown, invalid or denied, or the plan costs more than is left."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepAdmission:
    """What admission found for one step of a plan."""

    index: int
    """The step's place in the plan, from 1."""
    capability: str
    """The capability's name as proposed."""
    version: str | None = None
    """The version that would run; None when the capability is unknown."""
    verdict: Verdict | None = None
    """Policy's verdict; None when the step is unknown or invalid (not decided)."""
    rule_ids: tuple[str, ...] = ()
    """The rules that decided, as the `decided` event would record them."""
    reasons: tuple[str, ...] = ()
    """Each deciding rule's reason, in the order of `rule_ids`."""
    cost: Decimal = Decimal(0)
    """Estimated cost; 0 for a dry run and for a step that cannot run."""
    dry_run: bool = False
    """True when the step will run as a dry run (asked for, or `dry_run_only`)."""
    error_code: str | None = None
    """Why the step cannot run (`not_found`, `invalid_arguments`,
    `policy_denied`, `limit_exceeded`, ...); None when it can."""
    error_message: str | None = None
    """The one-line message that goes with `error_code`."""

    @property
    def refused(self) -> bool:
        """True when this step cannot run, which refuses the whole plan."""
        return self.error_code is not None

    @property
    def needs_approval(self) -> bool:
        """True when policy requires a person's approval for this step."""
        return self.verdict is Verdict.REQUIRE_APPROVAL

    def describe(self) -> dict[str, Any]:
        """Return the step's admission as JSON-ready data (as `plan_admitted` holds it)."""
        return {
            "index": self.index,
            "capability": self.capability,
            "version": self.version,
            "verdict": None if self.verdict is None else self.verdict.value,
            "rule_ids": list(self.rule_ids),
            "reasons": list(self.reasons),
            "cost": str(self.cost),
            "dry_run": self.dry_run,
            "error_code": self.error_code,
            "error_message": self.error_message,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """Admission's answer for a whole plan, with what it found for each step."""

    status: AdmissionStatus
    """`admitted`, `needs_approval` or `refused`."""
    steps: tuple[StepAdmission, ...]
    """One entry per proposed step, in plan order."""
    total_cost: Decimal
    """The plan's estimated cost: the sum of its steps' `cost`."""
    budget_left: Decimal | None
    """What was left of the run's budget (never below 0); None: no budget."""
    policy_version: str
    """The policy version that decided."""
    at: datetime
    """When the plan was admitted, aware UTC."""

    @property
    def admitted(self) -> bool:
        """True unless the plan was refused (`needs_approval` is admitted)."""
        return self.status is not AdmissionStatus.REFUSED

    @property
    def message(self) -> str:
        """Say in one line what admission decided and, for each marked step, why."""
        if self.status is AdmissionStatus.REFUSED:
            marked = [s for s in self.steps if s.refused]
            why = "; ".join(f"step {s.index}: {s.error_message}" for s in marked)
            return f"plan refused: {why}"
        if self.status is AdmissionStatus.NEEDS_APPROVAL:
            marked = [s for s in self.steps if s.needs_approval]
            why = "; ".join(
                f"step {s.index} ({s.capability}: {', '.join(s.reasons) or 'the default'})"
                for s in marked
            )
            return f"plan admitted; needs approval at {why}"
        return f"plan admitted: {len(self.steps)} step(s)"

    def to_event(self) -> record.PlanAdmitted:
        """Return the `plan_admitted` event that records this admission."""
        return record.PlanAdmitted(
            at=self.at,
            budget_left=self.budget_left,
            policy_version=self.policy_version,
            status=self.status.value,
            steps=tuple(s.describe() for s in self.steps),
            total_cost=self.total_cost,
        )


def admit(
    steps: Sequence[PlanStep],
    *,
    capabilities: Registry,
    policy: PolicySet,
    principal: Principal,
    context: Mapping[str, Any],
    steps_taken: int,
    cost: Decimal,
    budget: Decimal | None,
    at: datetime,
) -> Admission:
    """Check every step of a plan, and its cost, before the first step runs.

    Each step is decided with the `DecisionRequest` the gateway would build
    when its turn came: `steps_so_far` counts the run's steps and the plan's
    earlier ones, `cost_so_far` adds the earlier steps' estimated costs to
    the run's executed cost. Nothing runs and nothing is recorded here; see
    `Run.admit`.

    Args:
        steps: the plan, in order.
        capabilities: where the steps' capabilities are looked up.
        policy: the policy in force.
        principal: who the run acts as.
        context: the run's context, as policies see it.
        steps_taken: the number of the run's last step (0 before the first).
        cost: the run's executed cost so far.
        budget: the run's budget; None for no budget.
        at: the time of the decisions, aware UTC.

    Raises:
        UsageError: a capability's cost function returned something that is
            not an amount (a bug in its declaration, as at step time).
    """
    budget_left = None if budget is None else max(budget - cost, Decimal(0))
    planned = Decimal(0)
    found: list[StepAdmission] = []
    for index, proposed in enumerate(steps, 1):
        resolved = _resolve(index, proposed, capabilities)
        if isinstance(resolved, StepAdmission):
            found.append(resolved)
            continue
        cap, args, args_json = resolved
        if not cap.scopes and policy.is_trivial(cap.effect):
            decision = policy.default(cap.effect)  # as gateway.step: nothing to ask
        else:
            decision = policy.decide(
                DecisionRequest(
                    principal=principal,
                    capability=cap.name,
                    version=cap.version,
                    effect=cap.effect,
                    scopes=cap.scopes,
                    args=args_json,
                    context=context,
                    steps_so_far=steps_taken + index - 1,
                    cost_so_far=cost + planned,
                    at=at,
                )
            )
        checked = _judge(index, proposed, cap, args, decision)
        over = budget_left is not None and planned > budget_left
        planned += checked.cost
        # Only the step that passes what is left is marked: the ones after it are
        # over budget because of it, not of themselves.
        if budget_left is not None and not over and planned > budget_left:
            checked = dataclasses.replace(
                checked,
                error_code=LimitExceeded.code,
                error_message=(
                    f"{checked.capability}: the plan's estimated cost reaches "
                    f"{planned} at this step, over the {budget_left} left of the "
                    "run's budget; propose fewer or cheaper steps"
                ),
            )
        found.append(checked)
    if any(s.refused for s in found):
        status = AdmissionStatus.REFUSED
    elif any(s.needs_approval for s in found):
        status = AdmissionStatus.NEEDS_APPROVAL
    else:
        status = AdmissionStatus.ADMITTED
    return Admission(
        status=status,
        steps=tuple(found),
        total_cost=planned,
        budget_left=budget_left,
        policy_version=policy.version,
        at=at,
    )


def _resolve(
    index: int, proposed: PlanStep, capabilities: Registry
) -> StepAdmission | tuple[Capability[Any, Any], BaseModel, dict[str, Any]]:
    """Look the capability up and validate the step's key and args, as the gateway would.

    Returns the capability with the validated args and their JSON form, or the
    step's refusal.
    """
    name = proposed.capability
    try:
        cap = capabilities.get(name)
    except NotFound as exc:
        return StepAdmission(
            index=index, capability=name, error_code=exc.code, error_message=exc.message
        )
    try:
        if proposed.idempotency_key is not None:
            check_key(proposed.idempotency_key)
        args = cap.validate_args(dict(proposed.args))
        args_json, _ = cap.dump_args(args)
    except ValidationFailed as exc:
        return StepAdmission(
            index=index,
            capability=name,
            version=cap.version,
            error_code=exc.code,
            error_message=exc.message,
        )
    return cap, args, args_json


def _judge(
    index: int,
    proposed: PlanStep,
    cap: Capability[Any, Any],
    args: BaseModel,
    decision: Decision,
) -> StepAdmission:
    """Say whether a decided step can run, as a dry run or for real, and at what cost."""
    name = cap.name
    verdict = decision.verdict
    dry_run = proposed.dry_run or verdict is Verdict.DRY_RUN_ONLY
    error: Denied | None = None
    if verdict is Verdict.DENY:
        why = "; ".join(decision.reasons) or "no reason given"
        rules = ", ".join(decision.rule_ids) or "the default"
        error = Denied(f"{name}: denied by {rules}: {why}")
    elif (
        dry_run
        and verdict is not Verdict.REQUIRE_APPROVAL
        and cap.dry_run_handler is None
        and cap.effect is not Effect.READ
    ):
        # The gateway refuses such a step at its policy stage: refuse the plan now.
        error = Denied(
            f"{name}: a dry run was required but the capability has no dry-run "
            "handler; add dry_run=... to its declaration"
        )
    runs_for_real = error is None and not dry_run
    return StepAdmission(
        index=index,
        capability=name,
        version=cap.version,
        verdict=verdict,
        rule_ids=decision.rule_ids,
        reasons=decision.reasons,
        cost=cap.estimate_cost(args) if runs_for_real else Decimal(0),
        dry_run=dry_run,
        error_code=None if error is None else error.code,
        error_message=None if error is None else error.message,
    )
