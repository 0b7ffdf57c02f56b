"""Declarative rules from `tether.yaml`: their model, compiled form and index.

A rule matches on the capability (name or glob), its effect, the principal's
role and tenant, and the run's environment, then on an optional CEL condition;
its decision joins the precedence in `tether.policy`. Rules compile once per
policy version and are indexed by capability name and effect, so a step
evaluates only the rules that can match it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic

from tether.policy._decision import (
    Decision,
    DecisionRequest,
    Verdict,
    combine,
    content_hash,
)
from tether.policy.cel import CelError, Condition, Scope, compile_condition

__all__ = ["RESERVED_PREFIXES", "Defaults", "Match", "Rule", "RuleSet", "RulesConfig"]

EffectName = Literal["read", "write", "destructive"]
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_GLOB = re.compile(r"^[a-z0-9_.*?\[\]!-]+$")
RESERVED_PREFIXES = ("breaker:", "capability:", "tether:")
"""Rule ids tether gives its own decisions (an escalating breaker's, a capability
that always needs a person, missing scopes): a rule named so would share their
approval requests (a breaker's closing closes its requests by rule id)."""


def _as_tuple(value: object) -> object:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return value


OneOrMany = Annotated[tuple[str, ...], pydantic.BeforeValidator(_as_tuple)]


def _globs_are_valid(patterns: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in patterns:
        if not _GLOB.match(pattern) or pattern.count("[") != pattern.count("]"):
            raise ValueError(
                f"bad capability glob {pattern!r}: use lowercase names with * ? "
                "and balanced [...]"
            )
    return patterns


CapabilityGlobs = Annotated[OneOrMany, pydantic.AfterValidator(_globs_are_valid)]
"""Capability names or globs, checked: a name no capability can have matches none,
so a rule or limit written with one would never apply."""


def refuse_empty_lists(value: object, names: tuple[str, ...], left_out: str) -> object:
    """Refuse `name: []` in a raw mapping, for each of `names`; return `value`.

    Left out, such a field applies to every value; an empty list reads as "none"
    yet would mean "all", so neither is guessed.

    Raises:
        ValueError: one of `names` is an empty list (`left_out` says what
            leaving it out does).
    """
    if isinstance(value, Mapping):
        for name in names:
            given = value.get(name)
            if isinstance(given, (list, tuple)) and not given:
                raise ValueError(
                    f"`{name}: []` names no {name}; list at least one, or leave "
                    f"out `{name}` {left_out}"
                )
    return value


class Match(pydantic.BaseModel, extra="forbid", frozen=True):
    """What a rule applies to.

    Each field takes one value or a list; a field left out matches anything
    (a rule in a file may not give an empty list: see `Rule`).
    """

    capability: CapabilityGlobs = ()
    """Capability names or globs (`payments.*`, `deploy.roll?ack`)."""
    effect: Annotated[tuple[EffectName, ...], pydantic.BeforeValidator(_as_tuple)] = ()
    role: OneOrMany = ()
    """Matches when the principal holds any of these roles."""
    tenant: OneOrMany = ()
    environment: OneOrMany = ()
    """Matched against the run's `context["environment"]`."""


class Rule(pydantic.BaseModel, extra="forbid", frozen=True):
    """One rule of `tether.yaml`."""

    id: str
    """Unique in the file; recorded with every decision it takes part in."""
    match: Match = Match()
    when: str | None = None
    """A CEL condition over `args`, `principal`, `context`, `capability`, `run`."""
    decision: Verdict
    reason: str = pydantic.Field(min_length=1)
    """Why, in words for the person who reads the record or the refusal."""
    approvers: tuple[str, ...] = ()
    """Roles that may approve when the decision is `require_approval`."""

    @pydantic.field_validator("match", mode="before")
    @classmethod
    def _no_empty_lists(cls, value: object) -> object:
        # In a file, a list matches any of its values, so `role: []` reads as
        # "no role" and would match nothing, yet `Match` takes () for "any": a
        # rule meant for a few would apply to every step. Refuse it.
        return refuse_empty_lists(value, tuple(Match.model_fields), "to match any")

    @pydantic.model_validator(mode="after")
    def _approvers_ask(self) -> Rule:
        if self.approvers and self.decision is not Verdict.REQUIRE_APPROVAL:
            raise ValueError(
                f"approvers: a {self.decision.value} rule asks no one, so its "
                "approvers would never be asked; make the decision "
                "require_approval, or remove approvers"
            )
        return self

    @pydantic.field_validator("id")
    @classmethod
    def _id_is_valid(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(
                f"rule id {value!r} is invalid: use letters, digits and . _ : - "
                "(at most 128)"
            )
        if value.startswith(RESERVED_PREFIXES):
            raise ValueError(
                f"rule id {value!r} is tether's own kind of id (ids starting "
                f"with {', '.join(RESERVED_PREFIXES)} name a breaker, a "
                "capability or tether itself); name the rule otherwise"
            )
        return value

    @pydantic.field_validator("when")
    @classmethod
    def _when_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compile_condition(value)
            except CelError as exc:
                raise ValueError(f"condition does not compile: {exc}") from exc
        return value


class Defaults(pydantic.BaseModel, extra="forbid", frozen=True):
    """The decision per effect when no rule (and no Python policy) has an opinion."""

    read: Verdict = Verdict.ALLOW
    write: Verdict = Verdict.ALLOW
    destructive: Verdict = Verdict.REQUIRE_APPROVAL


class RulesConfig(pydantic.BaseModel, extra="forbid", frozen=True):
    """The policy part of `tether.yaml`."""

    rules: tuple[Rule, ...] = ()
    defaults: Defaults = Defaults()

    @pydantic.model_validator(mode="after")
    def _ids_are_unique(self) -> RulesConfig:
        seen: dict[str, int] = {}
        for index, rule in enumerate(self.rules):
            if rule.id in seen:
                raise ValueError(
                    f"rule id {rule.id!r} is used twice: rules[{seen[rule.id]}] and "
                    f"rules[{index}]; give each rule its own id"
                )
            seen[rule.id] = index
        return self


@dataclass(frozen=True, slots=True)
class _Compiled:
    index: int
    id: str
    verdict: Verdict
    reason: str
    effects: frozenset[str]
    roles: frozenset[str]
    tenants: frozenset[str]
    environments: frozenset[str]
    condition: Condition | None


class RuleSet:
    """The rules of one policy version, compiled and indexed; a `Policy`."""

    __slots__ = ("_any", "_exact", "_globs", "_memo", "id", "rules", "version")

    def __init__(
        self, rules: Sequence[Rule], *, id: str = "tether.yaml"
    ) -> None:  # the Policy protocol's field
        self.id = id
        self.rules = tuple(rules)
        self.version = "sha256:" + content_hash(
            [r.model_dump(mode="json") for r in self.rules]
        )
        """A hash of the rules: counted in the policy version when the set is
        added as a Python policy (the file's own rules count by the file's hash)."""
        self._exact: dict[str, list[_Compiled]] = {}
        self._globs: list[tuple[re.Pattern[str], _Compiled]] = []
        self._any: list[_Compiled] = []
        self._memo: dict[tuple[str, str], tuple[_Compiled, ...]] = {}
        for index, rule in enumerate(self.rules):
            m = rule.match
            compiled = _Compiled(
                index=index,
                id=rule.id,
                verdict=rule.decision,
                reason=rule.reason,
                effects=frozenset(m.effect),
                roles=frozenset(m.role),
                tenants=frozenset(m.tenant),
                environments=frozenset(m.environment),
                condition=None if rule.when is None else compile_condition(rule.when),
            )
            if not m.capability:
                self._any.append(compiled)
            for pattern in m.capability:
                if any(ch in pattern for ch in "*?["):
                    self._globs.append(
                        (re.compile(fnmatch.translate(pattern)), compiled)
                    )
                else:
                    self._exact.setdefault(pattern, []).append(compiled)

    def candidates(self, capability: str, effect: str) -> tuple[_Compiled, ...]:
        """Return the rules that can match a capability and effect, in file order."""
        key = (capability, effect)
        found = self._memo.get(key)
        if found is None:
            pool = {r.index: r for r in self._exact.get(capability, ())}
            pool.update((r.index, r) for r in self._any)
            pool.update((r.index, r) for rx, r in self._globs if rx.match(capability))
            found = tuple(
                r
                for _, r in sorted(pool.items())
                if not r.effects or effect in r.effects
            )
            # One entry per capability and effect: bounded by the registry's size.
            self._memo[key] = found
        return found

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        """Decide `request` by the matching rules, or None when none matches."""
        rules = self.candidates(request.capability, request.effect)
        if not rules:
            return None
        principal = request.principal
        environment = request.context.get("environment")
        scope: Scope | None = None
        matched: list[tuple[Verdict, str, str]] = []
        for rule in rules:
            if rule.roles and rule.roles.isdisjoint(principal.roles):
                continue
            if rule.tenants and principal.tenant not in rule.tenants:
                continue
            if rule.environments:
                if environment is not None and not isinstance(environment, str):
                    # Fail closed, as a condition that cannot be evaluated does: a
                    # list or a number is neither one of the names nor surely not.
                    matched.append(
                        (
                            Verdict.DENY,
                            rule.id,
                            f"rule {rule.id!r} could not be evaluated (the run's "
                            f"context environment is a {type(environment).__name__}, "
                            "not text); denied until it is text",
                        )
                    )
                    continue
                if environment not in rule.environments:
                    continue
            if rule.condition is not None:
                if scope is None:
                    scope = Scope(_variables(request))
                try:
                    if not scope.evaluate(rule.condition):
                        continue
                except CelError as exc:
                    # Fail closed, as Kubernetes admission does: a rule that cannot
                    # be evaluated denies (guard optional fields with has(...)).
                    matched.append(
                        (
                            Verdict.DENY,
                            rule.id,
                            f"rule {rule.id!r} could not be evaluated ({exc}); denied "
                            "until it can",
                        )
                    )
                    continue
            matched.append((rule.verdict, rule.id, rule.reason))
        return combine(matched) if matched else None


def _variables(request: DecisionRequest) -> Mapping[str, Any]:
    principal = request.principal
    return {
        "args": request.args,
        "principal": {
            "id": principal.id,
            "roles": list(principal.roles),
            "scopes": list(principal.scopes),
            "tenant": principal.tenant,
            "on_behalf_of": principal.on_behalf_of,
        },
        "context": {
            **request.context,
            "tenant": principal.tenant,
            "time": request.at,
        },
        "capability": {
            "name": request.capability,
            "version": request.version,
            "effect": request.effect,
            "scopes": list(request.scopes),
        },
        "run": {"steps": request.steps_so_far, "cost": request.cost_so_far},
    }
