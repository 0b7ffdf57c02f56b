"""The decision point: what policy says of a step, outside the reasoning loop.

This module holds the decision values and the precedence that combines the
answers of several policies. `tether.yaml` rules (CEL) plug in here as one more
policy; a Python policy is any object with an `evaluate(request)` method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from tether.principal import Principal

__all__ = [
    "DEFAULT_POLICY_VERSION",
    "Decision",
    "DecisionRequest",
    "Policy",
    "PolicySet",
    "Verdict",
]

DEFAULT_POLICY_VERSION = "none"
"""The policy version recorded when no policy is configured."""


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


@dataclass(frozen=True, slots=True, kw_only=True)
class DecisionRequest:
    """The read-only view of a step that policies evaluate."""

    principal: Principal
    capability: str
    version: str
    effect: str
    scopes: tuple[str, ...]
    args: Mapping[str, Any]
    """The validated args, as JSON data (secrets masked)."""
    context: Mapping[str, Any] = field(default_factory=dict)
    """The run's context (environment, tenant, ...)."""
    steps_so_far: int = 0


@runtime_checkable
class Policy(Protocol):
    """A Python policy: return a `Decision`, or None to abstain."""

    id: str

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        """Decide `request`, or return None when this policy has no opinion."""
        ...


class PolicySet:
    """Every policy of an app, combined by precedence (the strictest verdict wins)."""

    __slots__ = ("_policies", "default", "version")

    def __init__(
        self, policies: Sequence[Policy] = (), *, version: str = DEFAULT_POLICY_VERSION
    ) -> None:
        self._policies = tuple(policies)
        self.version = version
        self.default = Decision(verdict=Verdict.ALLOW, policy_version=version)
        """The decision when every policy abstains (or there is none)."""

    def __bool__(self) -> bool:
        return bool(self._policies)

    def add(self, policy: Policy) -> PolicySet:
        """Return a new set with `policy` added last."""
        return PolicySet((*self._policies, policy), version=self.version)

    def decide(self, request: DecisionRequest) -> Decision:
        """Return the combined decision; allow by default when every policy abstains."""
        best: Decision | None = None
        ids: list[str] = []
        reasons: list[str] = []
        for policy in self._policies:
            got = policy.evaluate(request)
            if got is None:
                continue
            if best is None or got.verdict.rank > best.verdict.rank:
                best, ids, reasons = got, list(got.rule_ids), list(got.reasons)
            elif got.verdict is best.verdict:
                ids.extend(got.rule_ids)
                reasons.extend(got.reasons)
        if best is None:
            return self.default
        return Decision(
            verdict=best.verdict,
            rule_ids=tuple(ids),
            reasons=tuple(reasons),
            policy_version=self.version,
        )
