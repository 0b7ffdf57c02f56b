"""The decision point: what policy says of a step, outside the reasoning loop.

One `PolicySet` per policy version holds the `tether.yaml` rules (compiled and
indexed), the Python policies registered on the app and the defaults per
effect. For each step it checks the capability's scopes first (a principal
lacking one is denied before any rule), then asks every policy and keeps the
strictest verdict: deny > require_approval > dry_run_only > allow; when all
abstain, the default for the capability's effect decides.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from tether.policy._decision import (
    DEFAULT_POLICY_VERSION,
    Decision,
    DecisionRequest,
    Policy,
    Verdict,
    combine,
    content_hash,
)
from tether.policy.cedar import CedarPolicy
from tether.policy.rules import Defaults, Match, Rule, RulesConfig, RuleSet

__all__ = [
    "DEFAULT_POLICY_VERSION",
    "POLICIES_PART",
    "SCOPES_RULE",
    "CedarPolicy",
    "Decision",
    "DecisionRequest",
    "Defaults",
    "Match",
    "Policy",
    "PolicySet",
    "Rule",
    "RuleSet",
    "RulesConfig",
    "Verdict",
    "combined_version",
    "file_part",
]

SCOPES_RULE = "tether:scopes"
"""The rule id recorded when a principal lacks a capability's scopes."""


class _Keep:
    """Marks a `replace` argument left as it is (None means no rules)."""


_KEEP = _Keep()
_ALLOW_ALL = Defaults(
    read=Verdict.ALLOW, write=Verdict.ALLOW, destructive=Verdict.ALLOW
)


class PolicySet:
    """Every policy of an app at one policy version, combined by precedence.

    Args:
        policies: Python policies, asked after the rules, in order.
        rules: the compiled `tether.yaml` rules, if any.
        defaults: the decision per effect when every policy abstains; without a
            policy file everything is allowed.
        version: the policy file's version (`none` without one). The version
            recorded with each decision is this one when no Python policy is
            added, else a hash of it and each policy's id and version (see
            `combined_version`).
    """

    __slots__ = (
        "_defaults",
        "_file_version",
        "_policies",
        "_rules",
        "trivial",
        "version",
    )

    def __init__(
        self,
        policies: Sequence[Policy] = (),
        *,
        rules: RuleSet | None = None,
        defaults: Defaults = _ALLOW_ALL,
        version: str = DEFAULT_POLICY_VERSION,
    ) -> None:
        self._policies = tuple(policies)
        self._rules = rules
        self._file_version = version
        self.version = combined_version(version, self._policies)
        self._defaults = {
            effect: Decision(
                verdict=getattr(defaults, effect), policy_version=self.version
            )
            for effect in ("read", "write", "destructive")
        }
        self.trivial: frozenset[str] = frozenset(
            effect
            for effect, decision in self._defaults.items()
            if rules is None and not policies and decision.verdict is Verdict.ALLOW
        )
        """Effects for which there is nothing to ask: no policy, an allow default."""

    def add(self, policy: Policy) -> PolicySet:
        """Return a new set with `policy` added last."""
        return self.replace(policies=(*self._policies, policy))

    def replace(
        self,
        *,
        policies: Sequence[Policy] | None = None,
        rules: RuleSet | _Keep | None = _KEEP,
        defaults: Defaults | None = None,
        version: str | None = None,
    ) -> PolicySet:
        """Return a copy with the given parts replaced (a reload keeps Python policies)."""
        return PolicySet(
            self._policies if policies is None else policies,
            rules=self._rules if isinstance(rules, _Keep) else rules,
            defaults=self.defaults if defaults is None else defaults,
            version=self._file_version if version is None else version,
        )

    @property
    def defaults(self) -> Defaults:
        """The decision per effect when every policy abstains."""
        return Defaults(**{e: d.verdict for e, d in self._defaults.items()})

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The Python policies, in the order they are asked."""
        return self._policies

    @property
    def file_version(self) -> str:
        """The policy file's version (`none` without one); `version` adds the policies'."""
        return self._file_version

    @property
    def rules(self) -> RuleSet | None:
        """The compiled rules, when a policy file has any."""
        return self._rules

    def is_trivial(self, effect: str) -> bool:
        """True when no policy exists and `effect`'s default is allow (nothing to ask)."""
        return effect in self.trivial

    def default(self, effect: str) -> Decision:
        """The decision for `effect` when every policy abstains."""
        return self._defaults[effect]

    def approvers(self, rule_ids: tuple[str, ...]) -> tuple[str, ...]:
        """Return the approver roles the rules named by `rule_ids` give, sorted."""
        if self._rules is None or not rule_ids:
            return ()
        wanted = set(rule_ids)
        return tuple(
            sorted(
                {
                    r
                    for rule in self._rules.rules
                    if rule.id in wanted
                    for r in rule.approvers
                }
            )
        )

    def decide(self, request: DecisionRequest) -> Decision:
        """Return the combined decision for one step."""
        missing = sorted(set(request.scopes) - set(request.principal.scopes))
        if missing:
            return Decision(
                verdict=Verdict.DENY,
                rule_ids=(SCOPES_RULE,),
                reasons=(
                    f"principal {request.principal.id!r} lacks scope(s) "
                    f"{', '.join(missing)} that {request.capability} requires",
                ),
                policy_version=self.version,
            )
        answers: list[tuple[Verdict, str, str]] = []
        if self._rules is not None:
            got = self._rules.evaluate(request)
            if got is not None:
                answers.extend(_zip_answers(got, got.rule_ids))
        for policy in self._policies:
            # Each Python policy gets its own copy of the args, so none can change
            # what the next one, the record or the handler sees.
            view = DecisionRequest(
                principal=request.principal,
                capability=request.capability,
                version=request.version,
                effect=request.effect,
                scopes=request.scopes,
                args=copy.deepcopy(request.args),
                context=copy.deepcopy(request.context),
                steps_so_far=request.steps_so_far,
                cost_so_far=request.cost_so_far,
                at=request.at,
            )
            try:
                answer: object = policy.evaluate(view)  # user code: checked below
            except Exception as exc:  # noqa: BLE001  # a user policy may raise anything
                # Fail closed, in the policy's name, like a rule that cannot evaluate.
                answers.append(
                    (
                        Verdict.DENY,
                        policy.id,
                        f"policy {policy.id!r} failed ({type(exc).__name__}: {exc}); "
                        "denied until it works",
                    )
                )
                continue
            if answer is None:
                continue
            if not isinstance(answer, Decision):
                answers.append(
                    (
                        Verdict.DENY,
                        policy.id,
                        f"policy {policy.id!r} returned {answer!r:.60}, not a Decision; "
                        "denied until it returns one",
                    )
                )
                continue
            # A policy's ids are its own: it cannot speak as a tether.yaml rule.
            ids = tuple(
                i
                if i == policy.id or i.startswith(f"{policy.id}:")
                else f"{policy.id}:{i}"
                for i in answer.rule_ids
            )
            answers.extend(_zip_answers(answer, ids or (policy.id,)))
        if not answers:
            return self._defaults[request.effect]
        return combine(answers, policy_version=self.version)


POLICIES_PART = "+policies:"
"""What joins a policy version's file part and its Python policies' hash."""


def combined_version(file_version: str, policies: Sequence[Policy]) -> str:
    """Return the policy version decisions record: the file's, and the Python policies'.

    With no Python policy it is the file's own (`sha256:` and 16 hex digits of
    `tether.yaml`, or `none`), as before policies were counted. With some, it
    is the file's, `+policies:` and 16 hex digits of a hash over the file's
    version and each policy's id and `version`, in order: adding, removing or
    reordering a policy, or a change to one that gives its version (a
    `RuleSet` and a `CedarPolicy` hash their content), is a new version, so a
    grant given under the old set no longer matches (its digest covers the
    version) and replay notes the change. The file's part stays readable
    (`file_part`): an export, made by a process without the app's Python
    policies, still tells the file is the one the run ran under. A policy
    without a `version` counts by its id only: a change to its code is not
    seen; give it a `version` to count it.
    """
    if not policies:
        return file_version
    parts = [file_version, *([p.id, _version_of(p)] for p in policies)]
    return f"{file_version}{POLICIES_PART}{content_hash(parts)}"


def file_part(version: str) -> str:
    """Return the policy file's part of a policy version (all of it without Python policies)."""
    return version.split(POLICIES_PART, 1)[0]


def _version_of(policy: Policy) -> str | None:
    """Return what a policy says its version is (None: it says nothing)."""
    version = getattr(policy, "version", None)
    return None if version is None else str(version)


def _zip_answers(
    decision: Decision, ids: Sequence[str]
) -> list[tuple[Verdict, str, str]]:
    """Pair each deciding id with its reason (an empty reason when none was given)."""
    reasons = (*decision.reasons, *([""] * len(ids)))
    return [(decision.verdict, rule_id, reasons[i]) for i, rule_id in enumerate(ids)]
