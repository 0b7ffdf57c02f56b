"""Decision values and the precedence that combines them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from tether import _canonical
from tether.principal import Principal

__all__ = [
    "DEFAULT_POLICY_VERSION",
    "Decision",
    "DecisionRequest",
    "Policy",
    "Verdict",
    "combine",
]

DEFAULT_POLICY_VERSION = "none"
"""The policy version recorded when no policy file is configured."""


class Verdict(StrEnum):
    """What policy says of a step; higher `rank` wins when policies disagree."""

    ALLOW = "allow"
    DRY_RUN_ONLY = "dry_run_only"
    REQUIRE_APPROVAL = "require_approval"
    DENY = "deny"

    @property
    def rank(self) -> int:
        """Precedence: deny > require_approval > dry_run_only > allow."""
        return _RANK[self]


_RANK = {
    Verdict.ALLOW: 0,
    Verdict.DRY_RUN_ONLY: 1,
    Verdict.REQUIRE_APPROVAL: 2,
    Verdict.DENY: 3,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Policy's answer for one step, with the rules that gave it."""

    verdict: Verdict
    """One of `allow`, `deny`, `require_approval`, `dry_run_only`."""
    rule_ids: tuple[str, ...] = ()
    """Rules that decided, in evaluation order; empty when the default decided."""
    reasons: tuple[str, ...] = ()
    """Each deciding rule's human reason, in the order of `rule_ids`."""
    policy_version: str = DEFAULT_POLICY_VERSION
    """Hash of the `tether.yaml` in force."""

    def __post_init__(self) -> None:
        # A Python policy may hand in "deny" or a list: normalise, or raise (and
        # PolicySet denies in the policy's name) rather than compare a string
        # with an enum member later and let the step through.
        object.__setattr__(self, "verdict", Verdict(self.verdict))
        for name in ("rule_ids", "reasons"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(
                    f"Decision.{name} must be a sequence of text, got {value!r}"
                )
            object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionRequest:
    """The read-only view of a step that policies evaluate.

    `args` is the policy's own copy of the validated args (secrets masked):
    changing it changes nothing, and a policy has no way to call a capability.
    """

    principal: Principal
    capability: str
    version: str
    effect: str
    """`read`, `write` or `destructive`."""
    scopes: tuple[str, ...]
    """Scopes the capability requires."""
    args: Mapping[str, Any]
    context: Mapping[str, Any] = field(default_factory=dict)
    """The run's context (environment, ...)."""
    steps_so_far: int = 0
    cost_so_far: Decimal = Decimal(0)
    """Sum of the run's executed step costs."""
    at: datetime | None = None
    """When the step is decided, aware UTC."""


@runtime_checkable
class Policy(Protocol):
    """A Python policy: return a `Decision`, or None to abstain.

    A policy may also have a `version` (any text that changes when what it
    decides changes): it is counted in the policy version every decision
    records (`tether.policy.combined_version`), so replay and approval grants can
    tell the policy changed. Without one, only its id counts.
    """

    id: str

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        """Decide `request`, or return None when this policy has no opinion."""
        ...


def content_hash(value: object) -> str:
    """Return the first 16 hex digits of the SHA-256 of `value`'s canonical JSON."""
    return hashlib.sha256(_canonical.dumps(value)).hexdigest()[:16]


def combine(
    answers: Iterable[tuple[Verdict, str, str]], *, policy_version: str = ""
) -> Decision:
    """Return the strictest verdict with every rule that gave it, in order.

    Args:
        answers: `(verdict, rule id, reason)` for each rule or policy that matched.
        policy_version: recorded with the decision.
    """
    best: Verdict | None = None
    ids: list[str] = []
    reasons: list[str] = []
    for verdict, rule_id, reason in answers:
        if best is None or verdict.rank > best.rank:
            best, ids, reasons = verdict, [rule_id], [reason]
        elif verdict is best:
            ids.append(rule_id)
            reasons.append(reason)
    assert best is not None, "combine() needs at least one answer"
    return Decision(
        verdict=best,
        rule_ids=tuple(ids),
        reasons=tuple(reasons),
        policy_version=policy_version,
    )
