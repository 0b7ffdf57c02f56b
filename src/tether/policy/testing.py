"""Policy unit tests written in YAML, so people who write policy can test it.

A test file (`tether.test.yaml`) names the policy file it tests and lists
cases; each case describes one step (capability, effect, scopes, args,
principal, context, run) and the decision it expects:

```yaml
policy: tether.yaml            # relative to this file
cases:
  - name: a big refund needs a human
    capability: payments.refund
    effect: write
    args: {order_id: o-1, amount_cents: 90000}
    principal: {id: support-bot, roles: [agent], tenant: acme}
    expect: {decision: require_approval, rules: [big-refunds]}
```

`run_cases` decides every case with a `PolicySet` and reports which passed.
Given an app's capabilities it decides each case as a real step: the
capability is looked up, the args validated and recorded as the gateway
records them (defaults filled in, a `Decimal` as text), and the effect, scopes
and version taken from the capability.
Reading the file is `tether.config`'s job (`load_policy_tests`), as for every
file tether reads; the `tether policy test` command joins the two.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic

from tether.errors import NotFound, ValidationFailed
from tether.policy import PolicySet
from tether.policy._decision import Decision, DecisionRequest, Verdict
from tether.principal import Principal

if TYPE_CHECKING:
    from tether.capability import Registry

__all__ = [
    "Case",
    "CaseResult",
    "Expect",
    "PolicyTestReport",
    "PolicyTests",
    "PrincipalSpec",
    "RunSpec",
    "run_cases",
]

_Text = Annotated[str, pydantic.Field(min_length=1)]


class PrincipalSpec(pydantic.BaseModel, extra="forbid", frozen=True):
    """Who acts in a case; the fields of `tether.Principal`."""

    id: _Text
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    tenant: _Text = "default"
    on_behalf_of: str | None = None

    def build(self) -> Principal:
        """Return the `Principal` this describes."""
        return Principal(
            self.id,
            roles=self.roles,
            scopes=self.scopes,
            tenant=self.tenant,
            on_behalf_of=self.on_behalf_of,
        )


class RunSpec(pydantic.BaseModel, extra="forbid", frozen=True):
    """How far the run has gone when the step is decided (CEL's `run`)."""

    steps: int = pydantic.Field(default=0, ge=0)
    """Steps taken before this one."""
    cost: Decimal = pydantic.Field(default=Decimal(0), ge=0)
    """Sum of the run's executed step costs."""


class Expect(pydantic.BaseModel, extra="forbid", frozen=True):
    """The decision a case expects."""

    decision: Verdict
    rules: tuple[str, ...] | None = None
    """The deciding rule ids, in order; `[]` means the default for the effect
    decided; left out, any rules will do."""


class Case(pydantic.BaseModel, extra="forbid", frozen=True):
    """One step to decide, and what policy should say of it."""

    name: _Text
    """Unique in the file; names the case in the report."""
    capability: _Text
    """The capability's name; it need not be registered anywhere, unless the
    cases are run against an app's capabilities."""
    version: _Text = "1"
    effect: Literal["read", "write", "destructive"]
    scopes: tuple[str, ...] = ()
    """Scopes the capability requires."""
    args: dict[str, Any] = {}
    """The step's arguments, as JSON (dates become ISO text, as the gateway gives them)."""
    principal: PrincipalSpec
    context: dict[str, Any] = {}
    """The run's context (`environment`, ...)."""
    run: RunSpec = RunSpec()
    at: pydantic.AwareDatetime | None = None
    """When the step is decided (CEL's `context.time`); give it when a rule reads
    the time."""
    expect: Expect

    def request(self) -> DecisionRequest:
        """Return the `DecisionRequest` the gateway would build for this step."""
        return DecisionRequest(
            principal=self.principal.build(),
            capability=self.capability,
            version=self.version,
            effect=self.effect,
            scopes=self.scopes,
            args=_as_json(self.args),
            context=dict(self.context),
            steps_so_far=self.run.steps,
            cost_so_far=self.run.cost,
            at=self.at,
        )


class PolicyTests(pydantic.BaseModel, extra="forbid", frozen=True):
    """A policy test file: the policy it tests and its cases."""

    version: Literal[1] = 1
    """Format version of the file."""
    policy: Path
    """The policy file (`tether.yaml`), relative to the test file."""
    cases: tuple[Case, ...] = pydantic.Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _names_are_unique(self) -> PolicyTests:
        seen: set[str] = set()
        for index, case in enumerate(self.cases):
            if case.name in seen:
                raise ValueError(
                    f"case name {case.name!r} is used twice (cases[{index}]); give "
                    "each case its own name"
                )
            seen.add(case.name)
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseResult:
    """One case's expected and actual decision."""

    case: Case
    decision: Decision | None
    """What the policy said; None when the case could not be decided."""
    problem: str | None = None
    """Why the case could not be decided as a real step (one line), if so."""

    @property
    def passed(self) -> bool:
        """True when the verdict (and the rules, if the case names them) match."""
        expect = self.case.expect
        if self.decision is None:
            return False
        if self.decision.verdict is not expect.decision:
            return False
        return expect.rules is None or expect.rules == self.decision.rule_ids


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyTestReport:
    """Every case of a test file, decided under one policy version."""

    policy_version: str
    results: tuple[CaseResult, ...]

    @property
    def passed(self) -> int:
        """How many cases passed."""
        return sum(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        """How many cases failed."""
        return len(self.results) - self.passed

    @property
    def ok(self) -> bool:
        """True when every case passed."""
        return self.failed == 0


def run_cases(
    policy: PolicySet, tests: PolicyTests, *, capabilities: Registry | None = None
) -> PolicyTestReport:
    """Decide every case of `tests` with `policy`, in file order.

    Args:
        policy: built as the app builds it (`Tether(config=...).policy`), so the
            cases see the rules, the defaults per effect and the scopes check.
        tests: the cases, from `tether.config.load_policy_tests`.
        capabilities: an app's registry; given, each case is decided as a real
            step of its capability would be (args validated, effect, scopes and
            version from the capability), and a case that cannot be (unknown
            capability, invalid args, another effect) fails with its problem.
            Left out, cases are taken as written.
    """
    return PolicyTestReport(
        policy_version=policy.version,
        results=tuple(_decide(policy, case, capabilities) for case in tests.cases),
    )


def _decide(policy: PolicySet, case: Case, capabilities: Registry | None) -> CaseResult:
    if capabilities is None:
        return CaseResult(case=case, decision=policy.decide(case.request()))
    request = _step_request(case, capabilities)
    if isinstance(request, str):
        return CaseResult(case=case, decision=None, problem=request)
    return CaseResult(case=case, decision=policy.decide(request))


def _step_request(case: Case, capabilities: Registry) -> DecisionRequest | str:
    """Return the request a real step of `case` would build, or why there is none.

    The capability is the version the case names, else the latest; the args are
    validated and dumped as the gateway records them; effect, scopes and
    version are the capability's, and a case stating others is a problem.
    """
    stated = case.model_fields_set
    try:
        cap = capabilities.get(
            case.capability, case.version if "version" in stated else None
        )
    except NotFound as exc:
        return exc.message
    if case.effect != cap.effect:
        return (
            f"effect: the case says {case.effect!r} but capability {cap.name!r} "
            f"is {cap.effect.value!r}; fix the case's effect"
        )
    if "scopes" in stated and tuple(sorted(set(case.scopes))) != cap.scopes:
        return (
            f"scopes: the case says {list(case.scopes)!r} but capability "
            f"{cap.name!r} requires {list(cap.scopes)!r}; fix or drop the case's "
            "scopes"
        )
    try:
        args, _ = cap.dump_args(cap.validate_args(_as_json(case.args)))
    except ValidationFailed as exc:
        return exc.message
    return DecisionRequest(
        principal=case.principal.build(),
        capability=cap.name,
        version=cap.version,
        effect=cap.effect,
        scopes=cap.scopes,
        args=args,
        context=dict(case.context),
        steps_so_far=case.run.steps,
        cost_so_far=case.run.cost,
        at=case.at,
    )


def _as_json(value: object) -> Any:
    """Return YAML data as the gateway's JSON args would hold it."""
    if isinstance(value, Mapping):
        return {str(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return value
