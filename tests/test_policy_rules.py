"""The `tether.yaml` rules engine: matching, precedence, fail-closed, reload, CEL safety.

The precedence property checks `PolicySet.decide` against a small reference model
written here independently (its own glob matcher and a three-valued evaluator for
a tiny condition grammar). The rule-language safety properties (RELIABILITY.md
G.49) feed generated and junk CEL to the compiler and the evaluator.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pydantic
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import tether
from strategies import json_values
from tether.policy import (
    SCOPES_RULE,
    Decision,
    DecisionRequest,
    Defaults,
    Match,
    PolicySet,
    Rule,
    RulesConfig,
    RuleSet,
    Verdict,
)
from tether.policy.cel import MAX_EXPRESSION, CelError, Scope, compile_condition
from tether.record import OutcomeStatus
from tether.testing import FakeClock, temporary_app, write_config

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
VERDICTS = list(Verdict)
EFFECTS = ("read", "write", "destructive")


def request(
    capability: str = "payments.refund",
    args: Mapping[str, Any] | None = None,
    *,
    principal: tether.Principal | None = None,
    effect: str = "write",
    scopes: tuple[str, ...] = (),
    context: Mapping[str, Any] | None = None,
    steps: int = 0,
) -> DecisionRequest:
    """Return a decision request as the gateway builds one."""
    return DecisionRequest(
        principal=principal or tether.Principal("bot", roles=["agent"], tenant="acme"),
        capability=capability,
        version="1",
        effect=effect,
        scopes=scopes,
        args=dict(args or {}),
        context=dict(context or {}),
        steps_so_far=steps,
        cost_so_far=Decimal(0),
        at=datetime(2030, 1, 1, tzinfo=UTC),
    )


def rule(
    id: str,
    decision: str = "deny",
    *,
    when: str | None = None,
    reason: str | None = None,
    **match: Any,
) -> Rule:
    """Return a validated rule, as `tether.yaml` would give it."""
    return Rule.model_validate(
        {
            "id": id,
            "match": match,
            "when": when,
            "decision": decision,
            "reason": reason or f"because {id}",
        }
    )


def decide(rules: Sequence[Rule], req: DecisionRequest, **kwargs: Any) -> Decision:
    """Decide `req` by `rules` alone (a policy file's defaults unless given)."""
    kwargs.setdefault("defaults", Defaults())
    return PolicySet(rules=RuleSet(rules) if rules else None, **kwargs).decide(req)


# -- matching ---------------------------------------------------------------------


class TestGlobs:
    @pytest.mark.parametrize(
        ("pattern", "name", "matches"),
        [
            ("payments.*", "payments.refund", True),
            ("payments.*", "payments.refund.partial", True),
            ("payments.*", "paymentsx.y", False),
            ("payments.*", "payments", False),
            ("payments.*", "xpayments.refund", False),
            ("*.read", "crm.contact.read", True),
            ("deploy.roll?ack", "deploy.rollback", True),
            ("deploy.roll?ack", "deploy.rolllback", False),
            ("infra.db.[dr]*", "infra.db.drop", True),
            ("infra.db.[dr]*", "infra.db.backup", False),
            ("infra.db.[!d]*", "infra.db.backup", True),
            ("infra.db.[!d]*", "infra.db.drop", False),
            ("v[0-9].x", "v7.x", True),
            ("*", "anything.at_all", True),
        ],
    )
    def test_a_glob_matches_as_shell_patterns_do(
        self, pattern: str, name: str, matches: bool
    ) -> None:
        """Capability globs match whole names, `.` being an ordinary character."""
        rules = RuleSet([rule("r", capability=pattern)])

        got = rules.evaluate(request(name))

        assert (got is not None) is matches

    @pytest.mark.parametrize("pattern", ["Payments.*", "a b", "x[", "pay/ments"])
    def test_a_bad_glob_is_refused_naming_it(self, pattern: str) -> None:
        """A pattern with capitals, spaces, slashes or an open bracket is invalid."""
        with pytest.raises(pydantic.ValidationError, match="bad capability glob"):
            rule("r", capability=pattern)


class TestRuleModel:
    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"id": "bad id!"}, "rule id 'bad id!' is invalid"),
            ({"id": "x" * 129}, "is invalid"),
            ({"when": "args.amount >"}, "condition does not compile: syntax error"),
            ({"when": "request.amount > 1"}, "unknown name(s) 'request'"),
            ({"reason": ""}, "at least 1 character"),
            ({"match": {"capabilty": "x"}}, "Extra inputs are not permitted"),
        ],
    )
    def test_an_invalid_rule_is_refused_naming_the_problem(
        self, fields: dict[str, Any], message: str
    ) -> None:
        """Bad ids, conditions, reasons and match keys fail when the file loads."""
        given = {"id": "r", "decision": "deny", "reason": "why", **fields}

        with pytest.raises(pydantic.ValidationError) as caught:
            Rule.model_validate(given)

        assert message in str(caught.value)

    def test_rule_ids_are_unique_in_a_file(self) -> None:
        """Two rules with one id are an error naming both places."""
        with pytest.raises(
            pydantic.ValidationError, match=r"rules\[0\] and rules\[2\]"
        ):
            RulesConfig.model_validate(
                {
                    "rules": [
                        {"id": "a", "decision": "deny", "reason": "x"},
                        {"id": "b", "decision": "deny", "reason": "x"},
                        {"id": "a", "decision": "allow", "reason": "x"},
                    ]
                }
            )

    def test_match_fields_take_one_value_a_list_or_nothing(self) -> None:
        """A single value, a list and an explicit null are all accepted."""
        match = Match.model_validate(
            {"capability": "a.b", "role": ["x", "y"], "tenant": None}
        )

        assert (match.capability, match.role, match.tenant) == (
            ("a.b",),
            ("x", "y"),
            (),
        )


class TestIndex:
    def test_candidates_merge_exact_glob_and_any_in_file_order(self) -> None:
        """The index returns every rule that can apply, in file order, once each."""
        rules = RuleSet(
            [
                rule("glob", capability="payments.*"),
                rule("other", capability="infra.restart"),
                rule("any"),
                rule("exact", capability=["payments.refund", "payments.*"]),
                rule("reads-only", capability="payments.refund", effect="read"),
                rule("near-miss", capability="payments"),
            ]
        )

        ids = [r.id for r in rules.candidates("payments.refund", "write")]
        again = [r.id for r in rules.candidates("payments.refund", "write")]
        read = [r.id for r in rules.candidates("payments.refund", "read")]
        other = [r.id for r in rules.candidates("paymentsx.y", "write")]

        assert ids == again == ["glob", "any", "exact"]
        assert read == ["glob", "any", "exact", "reads-only"]
        assert other == ["any"]

    def test_a_capability_no_rule_names_is_left_to_the_default(self) -> None:
        """With no candidate rule, the rules abstain and the default decides."""
        rules = [rule("r", capability="payments.*")]

        got = decide(rules, request("infra.db.drop", effect="destructive"))

        assert got == Decision(verdict=Verdict.REQUIRE_APPROVAL, policy_version="none")


class TestPrincipalAndRun:
    @pytest.mark.parametrize(
        ("match", "hits"),
        [
            ({"role": "sre"}, True),
            ({"role": ["finance", "sre"]}, True),
            ({"role": "finance"}, False),
            ({"tenant": "acme"}, True),
            ({"tenant": ["globex"]}, False),
            ({"environment": "prod"}, True),
            ({"environment": ["dev", "staging"]}, False),
            ({"role": "sre", "tenant": "acme", "environment": "prod"}, True),
            ({"role": "sre", "tenant": "globex", "environment": "prod"}, False),
            ({"effect": ["read", "destructive"]}, True),
            ({"effect": "write"}, False),
        ],
    )
    def test_every_match_field_must_hold(
        self, match: dict[str, Any], hits: bool
    ) -> None:
        """Role (any of), tenant, environment and effect must all match."""
        sre = tether.Principal("ops", roles=["agent", "sre"], tenant="acme")
        req = request(
            "infra.restart",
            principal=sre,
            effect="destructive",
            context={"environment": "prod"},
        )

        got = RuleSet([rule("r", **match)]).evaluate(req)

        assert (got is not None) is hits

    def test_a_run_without_environment_matches_no_environment_rule(self) -> None:
        """A rule naming environments never matches a run that names none."""
        got = RuleSet([rule("r", environment="prod")]).evaluate(request())

        assert got is None


class TestScopes:
    def test_missing_scopes_deny_before_any_rule(self) -> None:
        """A principal lacking a required scope is denied as `tether:scopes`."""
        bot = tether.Principal("bot", scopes=["payments:read"])
        rules = [rule("ok", "allow")]

        got = decide(
            rules,
            request(principal=bot, scopes=("payments:write", "audit", "payments:read")),
        )

        assert got.verdict is Verdict.DENY
        assert got.rule_ids == (SCOPES_RULE,)
        assert got.reasons == (
            "principal 'bot' lacks scope(s) audit, payments:write that "
            "payments.refund requires",
        )

    def test_held_scopes_pass_to_the_rules(self) -> None:
        """A principal holding every required scope is decided by the rules."""
        bot = tether.Principal("bot", scopes=["payments:write"])

        got = decide(
            [rule("ok", "allow")], request(principal=bot, scopes=("payments:write",))
        )

        assert got.rule_ids == ("ok",)

    def test_the_gateway_denies_a_step_missing_scopes(self, app: tether.Tether) -> None:
        """Through the app, a missing scope refuses the step and records the rule."""
        app.register(refund_with_scope)
        with app.run(principal=tether.Principal("bot"), request="refund") as run:
            outcome = run.step("payments.refund", {"order_id": "o", "amount_cents": 1})

        assert isinstance(outcome.error, tether.Denied)
        assert decided(app, run.id)[0]["rule_ids"] == [SCOPES_RULE]


# -- conditions -----------------------------------------------------------------


class TestConditions:
    def test_a_condition_reads_args_principal_context_capability_and_run(self) -> None:
        """Every variable a condition may read holds the step's facts."""
        when = (
            "args.amount_cents > 100 && principal.id == 'bot' && 'agent' in principal.roles"
            " && principal.tenant == 'acme' && context.environment == 'prod'"
            " && context.tenant == 'acme' && capability.name == 'payments.refund'"
            " && capability.effect == 'write' && run.steps == 2 && run.cost == 0"
        )
        req = request(
            args={"amount_cents": 101}, context={"environment": "prod"}, steps=2
        )

        got = RuleSet([rule("r", when=when)]).evaluate(req)

        assert got is not None
        assert got.rule_ids == ("r",)

    def test_a_missing_field_denies_naming_the_rule(self) -> None:
        """A condition that cannot be evaluated denies (fail closed), naming its rule."""
        rules = [rule("big", "require_approval", when="args.amount_cents > 100")]

        got = decide(rules, request(args={"order_id": "o-1"}))

        assert got.verdict is Verdict.DENY
        assert got.rule_ids == ("big",)
        assert got.reasons[0].startswith("rule 'big' could not be evaluated (")
        assert "amount_cents" in got.reasons[0]

    def test_a_non_boolean_condition_denies(self) -> None:
        """A condition giving a number, not a bool, denies naming its rule."""
        got = decide([rule("sum", "allow", when="args.n + 1")], request(args={"n": 1}))

        assert (got.verdict, got.rule_ids) == (Verdict.DENY, ("sum",))
        assert "not a bool" in got.reasons[0]

    def test_has_guards_an_optional_field(self) -> None:
        """`has(...)` tests an optional field without failing when it is absent."""
        rules = [
            rule(
                "big",
                "require_approval",
                when="has(args.amount_cents) && args.amount_cents > 100",
            )
        ]

        absent = decide(rules, request(args={"order_id": "o-1"}))
        big = decide(rules, request(args={"amount_cents": 500}))

        assert absent == Decision(verdict=Verdict.ALLOW, policy_version="none")
        assert (big.verdict, big.rule_ids) == (Verdict.REQUIRE_APPROVAL, ("big",))

    def test_a_failing_condition_does_not_hide_other_rules(self) -> None:
        """A rule that fails denies beside the other matching rules, in file order."""
        rules = [
            rule("d1", "deny", when="args.missing == 1"),
            rule("d2", "deny"),
            rule("a", "allow"),
        ]

        got = decide(rules, request())

        assert got.rule_ids == ("d1", "d2")
        assert got.reasons[1] == "because d2"


# -- Python policies, defaults, reload ------------------------------------------------


@dataclass
class Mutator:
    """A Python policy that tries to change what others see."""

    id: str = "mutator"

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        args = cast(dict[str, Any], request.args)  # the misuse under test
        args["amount_cents"] = 0
        args["nested"]["k"] = "changed"
        cast(dict[str, Any], request.context)["environment"] = "dev"
        return None


@dataclass
class Observer:
    """A Python policy that remembers what it saw."""

    id: str = "observer"
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        self.seen.append((dict(request.args), dict(request.context)))
        return None


class TestPythonPolicies:
    def test_a_policy_cannot_change_the_args_others_see(self) -> None:
        """Each Python policy gets its own deep copy of the args and context."""
        observer = Observer()
        args = {"amount_cents": 500, "nested": {"k": "v"}}
        req = request(args=args, context={"environment": "prod"})

        PolicySet([Mutator(), observer]).decide(req)

        assert observer.seen == [
            ({"amount_cents": 500, "nested": {"k": "v"}}, {"environment": "prod"})
        ]
        assert req.args == {"amount_cents": 500, "nested": {"k": "v"}}

    def test_the_handler_sees_the_args_the_agent_sent(self, app: tether.Tether) -> None:
        """Through the app, a mutating policy changes nothing the handler gets."""
        got: list[RefundIn] = []

        @tether.capability("payments.refund2", effect="write")
        def refund2(args: RefundIn) -> Done:
            got.append(args)
            return Done(ok=True)

        app.register(refund2)
        app.add_policy(AmountZeroer())
        with app.run(principal=tether.Principal("bot"), request="refund") as run:
            run.call("payments.refund2", {"order_id": "o", "amount_cents": 7})

        assert got == [RefundIn(order_id="o", amount_cents=7)]


@dataclass
class AmountZeroer:
    """Sets the amount to zero in its view of the args."""

    id: str = "zeroer"

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        cast(dict[str, Any], request.args)["amount_cents"] = 0  # the misuse under test
        return None


class RefundIn(BaseModel, extra="forbid"):
    order_id: str
    amount_cents: int


class DropIn(BaseModel, extra="forbid"):
    table: str


class Done(BaseModel):
    ok: bool


@tether.capability("payments.refund", effect="write")
def refund(args: RefundIn) -> Done:
    """Refund an order."""
    return Done(ok=True)


@tether.capability("payments.refund", effect="write", scopes=["payments:write"])
def refund_with_scope(args: RefundIn) -> Done:
    """Refund an order; needs a scope."""
    return Done(ok=True)


@tether.capability("net.lookup", effect="read")
def lookup(args: DropIn) -> Done:
    """Read something."""
    return Done(ok=True)


def _preview(args: DropIn) -> Done:
    return Done(ok=False)


@tether.capability("db.drop", effect="destructive", dry_run=_preview)
def drop(args: DropIn) -> Done:
    """Drop a table."""
    return Done(ok=True)


def decided(app: tether.Tether, run_id: str) -> list[dict[str, Any]]:
    """Return the run's `decided` events."""
    return [e.data() for e in app.store.events(run_id) if e.data()["kind"] == "decided"]


def _one_of_each(app: tether.Tether) -> list[tuple[str, list[str], str]]:
    app.register(refund, lookup, drop)
    with app.run(principal=tether.Principal("bot"), request="three") as run:
        run.step("net.lookup", {"table": "t"})
        run.step("payments.refund", {"order_id": "o", "amount_cents": 1})
        run.step("db.drop", {"table": "t"})
    return [
        (d["verdict"], d["rule_ids"], d["policy_version"]) for d in decided(app, run.id)
    ]


class TestDefaults:
    def test_without_a_policy_file_everything_is_allowed(
        self, clock: FakeClock
    ) -> None:
        """With no `tether.yaml`, every effect is allowed, at policy version `none`."""
        with temporary_app(clock=clock) as app:
            got = _one_of_each(app)

        assert got == [("allow", [], "none")] * 3

    def test_a_policy_file_sets_defaults_per_effect(
        self, clock: FakeClock, tmp_path: Path
    ) -> None:
        """With a file, destructive steps need approval unless it says otherwise."""
        config = tmp_path / "tether.yaml"
        config.write_text("version: 1\n")
        with temporary_app(clock=clock, config=config) as app:
            got = [verdict for verdict, ids, _ in _one_of_each(app) if ids == []]

        assert got == ["allow", "allow", "require_approval"]

    def test_the_file_can_change_the_defaults(
        self, clock: FakeClock, tmp_path: Path
    ) -> None:
        """`defaults:` in the file replaces the per-effect verdicts."""
        config = tmp_path / "tether.yaml"
        config.write_text(
            "defaults: {read: dry_run_only, write: deny, destructive: allow}\n"
        )
        with temporary_app(clock=clock, config=config) as app:
            got = [verdict for verdict, _, _ in _one_of_each(app)]

        assert got == ["dry_run_only", "deny", "allow"]


class TestReload:
    def test_a_changed_file_applies_at_the_next_step(
        self, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Rewriting `tether.yaml` changes the next decision and its version."""
        config = tmp_path / "tether.yaml"
        config.write_text(RULES_V1)
        with temporary_app(clock=clock, config=config) as app:
            app.register(refund)
            with app.run(principal=tether.Principal("bot"), request="two") as run:
                first = run.step(
                    "payments.refund", {"order_id": "o", "amount_cents": 5}
                )
                write_config(config, RULES_V2)
                second = run.step(
                    "payments.refund", {"order_id": "o", "amount_cents": 5}
                )
                write_config(config, "rules: [\n")  # broken: the last good policy stays
                third = run.step(
                    "payments.refund", {"order_id": "o", "amount_cents": 5}
                )
            events = decided(app, run.id)

        assert first.status is OutcomeStatus.EXECUTED
        assert isinstance(second.error, tether.Denied)
        assert isinstance(third.error, tether.Denied)
        assert [(e["verdict"], e["rule_ids"]) for e in events] == [
            ("allow", ["small-refunds"]),
            ("deny", ["refunds-frozen"]),
            ("deny", ["refunds-frozen"]),
        ]
        versions = [e["policy_version"] for e in events]
        assert versions[0] != versions[1] == versions[2]
        assert all(v.startswith("sha256:") for v in versions)


RULES_V1 = """
rules:
  - id: small-refunds
    match: {capability: payments.refund}
    when: "args.amount_cents < 100"
    decision: allow
    reason: small refunds are routine
"""
RULES_V2 = """
rules:
  - id: refunds-frozen
    match: {capability: "payments.*"}
    decision: deny
    reason: refunds are frozen during the audit
"""


# -- the precedence property, against a reference model -----------------------------

_NAMES = [
    "payments.refund",
    "payments.charge",
    "payments.refund.partial",
    "paymentsx.y",
    "payments",
    "infra.restart",
    "infra.db.drop",
    "infra.db.backup",
    "crm.contact.read",
]
_PATTERNS = [
    "payments.*",
    "*.read",
    "infra.db.[dr]*",
    "infra.db.[!d]*",
    "pay?ents.refund",
    "*",
    "infra.*.drop",
]
_ROLES = ["agent", "sre", "finance"]
_TENANTS = ["acme", "globex"]
_ENVS = ["prod", "dev"]
_SCOPES = ["payments:write", "infra:admin"]


def _glob(pattern: str, name: str) -> bool:
    """Match like a shell: `*` any run, `?` one character, `[..]` / `[!..]` a class."""
    if not pattern:
        return not name
    head = pattern[0]
    if head == "*":
        return any(_glob(pattern[1:], name[i:]) for i in range(len(name) + 1))
    if not name:
        return False
    if head == "?":
        return _glob(pattern[1:], name[1:])
    if head == "[":
        end = pattern.index("]", 2)
        body = pattern[1:end]
        negate = body.startswith("!")
        body = body.removeprefix("!")
        hit, i = False, 0
        while i < len(body):
            if i + 2 < len(body) and body[i + 1] == "-":
                hit = hit or body[i] <= name[0] <= body[i + 2]
                i += 3
            else:
                hit = hit or body[i] == name[0]
                i += 1
        return hit != negate and _glob(pattern[end + 1 :], name[1:])
    return head == name[0] and _glob(pattern[1:], name[1:])


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    """A name, a glob from the pool, or a name with a `?` or a `*` tail."""
    kind = draw(st.sampled_from(["name", "glob", "mutated"]))
    if kind == "name":
        return draw(st.sampled_from(_NAMES))
    if kind == "glob":
        return draw(st.sampled_from(_PATTERNS))
    name = draw(st.sampled_from(_NAMES))
    cut = draw(st.integers(0, len(name) - 1))
    if draw(st.booleans()):
        return name[:cut] + "*"
    return name[:cut] + "?" + name[cut + 1 :]


# A tiny condition grammar, each form with its Python meaning. ERR stands for a
# CEL evaluation error (a missing field); `&&` and `||` absorb errors as CEL does.
ERR = object()
Truth = Any  # True, False or ERR
Env = Mapping[str, Any]


@dataclass(frozen=True)
class Cond:
    """A condition in CEL source and as a Python function of the request."""

    source: str
    meaning: Callable[[Env], Truth]


def _field(name: str, test: Callable[[Any], bool]) -> Callable[[Env], Truth]:
    def meaning(env: Env) -> Truth:
        args = env["args"]
        return test(args[name]) if name in args else ERR

    return meaning


@st.composite
def _atoms(draw: st.DrawFn) -> Cond:
    k = draw(st.integers(-2, 2))
    word = draw(st.sampled_from(["a", "b"]))
    role = draw(st.sampled_from(_ROLES))
    env = draw(st.sampled_from(_ENVS))
    forms = [
        Cond(f"args.n > {k}", _field("n", lambda v: v > k)),
        Cond(f"args.n == {k}", _field("n", lambda v: v == k)),
        Cond(f"args.m <= {k}", _field("m", lambda v: v <= k)),
        Cond("has(args.n)", lambda e: "n" in e["args"]),
        Cond("has(args.s)", lambda e: "s" in e["args"]),
        Cond(f"args.s == '{word}'", _field("s", lambda v: v == word)),
        Cond(f"args.s.startsWith('{word}')", _field("s", lambda v: v.startswith(word))),
        Cond(f"'{role}' in principal.roles", lambda e: role in e["roles"]),
        Cond("principal.tenant == 'acme'", lambda e: e["tenant"] == "acme"),
        Cond(
            f"context.environment == '{env}'",
            lambda e: ERR if e["environment"] is None else e["environment"] == env,
        ),
        Cond(f"run.steps > {k}", lambda e: e["steps"] > k),
        Cond("capability.effect == 'write'", lambda e: e["effect"] == "write"),
    ]
    return draw(st.sampled_from(forms))


def _not(a: Cond) -> Cond:
    def meaning(env: Env) -> Truth:
        v = a.meaning(env)
        return ERR if v is ERR else not v

    return Cond(f"!({a.source})", meaning)


def _and(a: Cond, b: Cond) -> Cond:
    def meaning(env: Env) -> Truth:
        x, y = a.meaning(env), b.meaning(env)
        if x is False or y is False:
            return False
        return ERR if ERR in (x, y) else True

    return Cond(f"({a.source} && {b.source})", meaning)


def _or(a: Cond, b: Cond) -> Cond:
    def meaning(env: Env) -> Truth:
        x, y = a.meaning(env), b.meaning(env)
        if x is True or y is True:
            return True
        return ERR if ERR in (x, y) else False

    return Cond(f"({a.source} || {b.source})", meaning)


_CONDS = st.recursive(
    _atoms(),
    lambda inner: st.one_of(
        inner.map(_not),
        st.builds(_and, inner, inner),
        st.builds(_or, inner, inner),
    ),
    max_leaves=4,
)


@dataclass(frozen=True)
class Spec:
    """A generated rule and what the reference model needs of it."""

    rule: Rule
    patterns: tuple[str, ...]
    cond: Cond | None


def _subset(pool: Sequence[str]) -> st.SearchStrategy[list[str]]:
    # Empty (match anything) half the time, so that rules often apply.
    return st.just([]) | st.lists(st.sampled_from(pool), max_size=2, unique=True)


@st.composite
def _specs(draw: st.DrawFn) -> list[Spec]:
    specs = []
    for i in range(draw(st.integers(0, 8))):
        patterns = draw(st.lists(_patterns(), max_size=2, unique=True))
        cond = draw(st.none() | _CONDS)
        match = {
            "capability": patterns,
            "effect": draw(_subset(EFFECTS)),
            "role": draw(_subset(_ROLES)),
            "tenant": draw(_subset(_TENANTS)),
            "environment": draw(_subset(_ENVS)),
        }
        verdict = draw(st.sampled_from(VERDICTS))
        made = Rule(
            id=f"r{i}",
            match=Match.model_validate(match),
            when=None if cond is None else cond.source,
            decision=verdict,
            reason=f"reason {i}",
        )
        specs.append(Spec(made, tuple(patterns), cond))
    return specs


@st.composite
def _requests(draw: st.DrawFn) -> DecisionRequest:
    args: dict[str, Any] = {}
    if draw(st.booleans()):
        args["n"] = draw(st.integers(-3, 3))
    if draw(st.booleans()):
        args["m"] = draw(st.integers(-3, 3))
    if draw(st.booleans()):
        args["s"] = draw(st.sampled_from(["a", "ab", "b", ""]))
    environment = draw(st.none() | st.sampled_from(_ENVS))
    return DecisionRequest(
        principal=tether.Principal(
            "p",
            roles=draw(_subset(_ROLES)),
            tenant=draw(st.sampled_from(_TENANTS)),
            scopes=draw(_subset(_SCOPES)),
        ),
        capability=draw(st.sampled_from(_NAMES)),
        version="1",
        effect=draw(st.sampled_from(EFFECTS)),
        scopes=draw(st.sampled_from([(), (), (), ("payments:write",)])),
        args=args,
        context={} if environment is None else {"environment": environment},
        steps_so_far=draw(st.integers(0, 3)),
    )


def _expected(
    specs: Sequence[Spec], req: DecisionRequest, defaults: Defaults, version: str
) -> tuple[Verdict, tuple[str, ...], tuple[str | None, ...]]:
    """The reference model: (verdict, rule ids, reasons; None for a failure reason)."""
    missing = set(req.scopes) - set(req.principal.scopes)
    if missing:
        return Verdict.DENY, (SCOPES_RULE,), (None,)
    environment = req.context.get("environment")
    env = {
        "args": req.args,
        "roles": req.principal.roles,
        "tenant": req.principal.tenant,
        "environment": environment,
        "steps": req.steps_so_far,
        "effect": req.effect,
    }
    matched: list[tuple[Verdict, str, str | None]] = []
    for spec in specs:
        m = spec.rule.match
        if spec.patterns and not any(_glob(p, req.capability) for p in spec.patterns):
            continue
        if m.effect and req.effect not in m.effect:
            continue
        if m.role and not set(m.role) & set(req.principal.roles):
            continue
        if m.tenant and req.principal.tenant not in m.tenant:
            continue
        if m.environment and environment not in m.environment:
            continue
        truth = True if spec.cond is None else spec.cond.meaning(env)
        if truth is ERR:
            matched.append((Verdict.DENY, spec.rule.id, None))
        elif truth:
            matched.append((spec.rule.decision, spec.rule.id, spec.rule.reason))
    if not matched:
        return getattr(defaults, req.effect), (), ()
    best = max((m[0] for m in matched), key=lambda v: v.rank)
    winners = [m for m in matched if m[0] is best]
    return best, tuple(m[1] for m in winners), tuple(m[2] for m in winners)


class TestPrecedenceProperty:
    @PROPERTY
    @given(
        specs=_specs(),
        req=_requests(),
        defaults=st.builds(
            Defaults,
            read=st.sampled_from(VERDICTS),
            write=st.sampled_from(VERDICTS),
            destructive=st.sampled_from(VERDICTS),
        ),
    )
    def test_the_decision_follows_the_reference_model(
        self, specs: list[Spec], req: DecisionRequest, defaults: Defaults
    ) -> None:
        """Deny if any matching rule denies (or fails), else approval, dry run, allow;
        the default per effect when none matches; ids are the winners in file order."""
        rules = [s.rule for s in specs]
        policy = PolicySet(
            rules=RuleSet(rules) if rules else None, defaults=defaults, version="v9"
        )

        got = policy.decide(req)

        verdict, ids, reasons = _expected(specs, req, defaults, "v9")
        event(
            "scopes"
            if ids == (SCOPES_RULE,)
            else f"{len(ids)} winning rule(s)"
            + (", one failed" if None in reasons else "")
        )
        assert (got.verdict, got.rule_ids) == (verdict, ids)
        assert got.policy_version == "v9"
        assert len(got.reasons) == len(ids)
        for reason, want, rule_id in zip(got.reasons, reasons, ids, strict=True):
            if want is None:  # a failed condition, or missing scopes
                assert rule_id in reason or rule_id == SCOPES_RULE
            else:
                assert reason == want


def test_the_reference_glob_agrees_with_known_cases() -> None:
    """The test's own glob matcher gives the textbook answers."""
    assert _glob("payments.*", "payments.refund")
    assert not _glob("payments.*", "paymentsx.y")
    assert _glob("infra.db.[dr]*", "infra.db.drop")
    assert not _glob("infra.db.[!d]*", "infra.db.drop")
    assert _glob("pay?ents.refund", "payments.refund")
    assert _glob("v[0-9]", "v5")


# -- G.49: rule language safety -----------------------------------------------------

_IDENT = st.sampled_from(
    [
        "args",
        "args.a",
        "args.b",
        "args.a.b",
        "args.items",
        "args.text",
        "args['a']",
        'args["k"]',
        "principal",
        "principal.id",
        "principal.roles",
        "principal.on_behalf_of",
        "context",
        "context.environment",
        "context.time",
        "capability.name",
        "capability.scopes",
        "run.steps",
        "run.cost",
        "args.__class__",
        "args.__dict__",
        "principal.__class__",
        "foo",
        "__builtins__",
    ]
)
_LITERALS = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.integers(0, 2**64 - 1).map(lambda n: f"{n}u"),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(alphabet=string.printable, max_size=8).map(
        lambda s: (
            "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
        )
    ),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "[]",
            "[1, 2, 3]",
            "{'a': 1}",
            "b'abc'",
            "r'\\d+'",
            "'''tri'ple'''",
            "1.5e300",
            "-9223372036854775808",
            "18446744073709551615u",
            "'\\u00e9'",
        ]
    ),
)
_UNARY = ["!", "-"]
_BINARY = [
    "+",
    "-",
    "*",
    "/",
    "%",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "&&",
    "||",
    " in ",
]
_FUNCTIONS = [
    "size",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "type",
    "dyn",
    "timestamp",
    "duration",
    "has",
]
_METHODS = ["startsWith", "endsWith", "contains", "matches", "size"]
_MACROS = ["all", "exists", "exists_one", "map", "filter"]


def _expressions(*, macros: bool) -> st.SearchStrategy[str]:
    base = st.one_of(_IDENT, _LITERALS)

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        forms = [
            st.builds(lambda op, a: f"{op}{a}", st.sampled_from(_UNARY), inner),
            st.builds(
                lambda a, op, b: f"{a} {op} {b}", inner, st.sampled_from(_BINARY), inner
            ),
            st.builds(lambda a: f"({a})", inner),
            st.builds(lambda c, a, b: f"{c} ? {a} : {b}", inner, inner, inner),
            st.builds(lambda f, a: f"{f}({a})", st.sampled_from(_FUNCTIONS), inner),
            st.builds(
                lambda a, m, b: f"{a}.{m}({b})", inner, st.sampled_from(_METHODS), inner
            ),
            st.builds(lambda a, b: f"{a}[{b}]", inner, inner),
            st.builds(lambda a, b: f"[{a}, {b}]", inner, inner),
            st.builds(lambda a, b: f"{{{a}: {b}}}", inner, inner),
        ]
        return st.one_of(forms)

    plain = st.recursive(base, extend, max_leaves=8)
    if not macros:
        return plain
    body = st.builds(
        lambda a, op, b: f"x {op} {b}" if a else f"{b} {op} x",
        st.booleans(),
        st.sampled_from(_BINARY),
        plain,
    )
    macro = st.builds(
        lambda target, m, b: f"{target}.{m}(x, {b})",
        _IDENT,
        st.sampled_from(_MACROS),
        body,
    )
    return st.one_of(
        plain,
        macro,
        st.builds(
            lambda a, op, b: f"{a} {op} {b}",
            macro,
            st.sampled_from(["&&", "||"]),
            plain,
        ),
    )


_TYPED = st.recursive(
    st.one_of(
        st.builds(
            lambda path, op, n: f"{path} {op} {n}",
            st.sampled_from(["run.steps", "size(principal.roles)", "size(args)"]),
            st.sampled_from(["==", "!=", "<", "<=", ">", ">="]),
            st.integers(-2, 3),
        ),
        st.builds(
            lambda path, word: f"{path} == '{word}'",
            st.sampled_from(["principal.id", "context.environment", "capability.name"]),
            st.sampled_from(["p", "prod", "x.y", "dev"]),
        ),
        st.builds(
            lambda m, word: f"principal.roles.{m}(r, r == '{word}')",
            st.sampled_from(["all", "exists", "exists_one"]),
            st.sampled_from(["agent", "sre"]),
        ),
        st.sampled_from(["has(args.a)", "'agent' in principal.roles", "true", "false"]),
    ),
    lambda inner: st.one_of(
        inner.map(lambda a: f"!({a})"),
        st.builds(lambda a, b: f"({a} && {b})", inner, inner),
        st.builds(lambda a, b: f"({a} || {b})", inner, inner),
        st.builds(lambda c, a, b: f"({c} ? {a} : {b})", inner, inner, inner),
    ),
    max_leaves=6,
)
"""Conditions that are well typed over the variables, so they evaluate to a bool."""

_CONDITIONS = st.one_of(
    _TYPED,
    _expressions(macros=True),
    _expressions(macros=True),
    st.text(max_size=60),  # junk
    st.text(
        alphabet="()[]{}.,!?:&|=<>+-*/%'\"\\ \n\tabx019_", max_size=60
    ),  # near-CEL junk
)


def _variables(args: Any) -> dict[str, Any]:
    return {
        "args": args,
        "principal": {
            "id": "p",
            "roles": ["agent"],
            "scopes": [],
            "tenant": "acme",
            "on_behalf_of": None,
        },
        "context": {
            "environment": "prod",
            "tenant": "acme",
            "time": datetime(2030, 1, 1, tzinfo=UTC),
        },
        "capability": {"name": "x.y", "version": "1", "effect": "write", "scopes": []},
        "run": {"steps": 1, "cost": Decimal("1.5")},
    }


_ARGS = st.dictionaries(
    st.sampled_from(["a", "b", "k", "items", "text", "__class__"]),
    json_values(max_leaves=8),
    max_size=4,
)


def _one_line(error: BaseException) -> None:
    text = str(error)
    assert text
    assert "\n" not in text, repr(text)
    for leak in ("<class ", "<built-in", "<module", " object at 0x", "Traceback"):
        assert leak not in text, text


def _compile_and_evaluate(source: str, args: dict[str, Any]) -> bool:
    return Scope(_variables(args)).evaluate(compile_condition(source))


class TestRuleLanguageSafety:
    @settings(PROPERTY, max_examples=600)
    @given(source=_CONDITIONS, args=_ARGS)
    def test_any_condition_compiles_or_fails_in_one_line_and_decides(
        self, source: str, args: dict[str, Any]
    ) -> None:
        """Compiling gives a condition or a one-line `CelError`; evaluating gives a
        bool or a one-line `CelError`; a rule gives a decision, never an exception."""
        try:
            condition = compile_condition(source)
        except CelError as exc:
            event("compile error")
            _one_line(exc)
            return

        try:
            value = Scope(_variables(args)).evaluate(condition)
        except CelError as exc:
            event("evaluation error")
            _one_line(exc)
        else:
            event(f"evaluated to {value}")
            assert value is True or value is False
        got = RuleSet([rule("r", "allow", when=source)]).evaluate(request(args=args))
        assert got is None or got.verdict in (Verdict.ALLOW, Verdict.DENY)
        if got is not None and got.verdict is Verdict.DENY:
            assert got.reasons[0].startswith("rule 'r' could not be evaluated (")

    @pytest.mark.parametrize(
        "source",
        [
            "args.__class__",
            "args.__class__ == args.__class__",
            "__import__('os')",
            "__import__('os').system('true') == 0",
            "args.x.__dict__",
            "args.__dict__.size() > 0",
            "args.__class__.__mro__",
            "args.__class__.__subclasses__()",
            "type(args).__name__ == 'dict'",
            "args.keys()",
            "args.get('a') == 1",
            "getattr(args, 'a') == 1",
            "eval('1') == 1",
            "exec('x=1')",
            "open('/etc/passwd').read() != ''",
            "globals()",
            "locals().size() > 0",
            "__builtins__.open",
            "principal.__init__",
            "args.a.__len__() > 0",
            "args['__class__'] == 1",
            "dyn(args).__class__",
            "''.__class__.__base__",
            "args.a.format('x')",
        ],
    )
    def test_python_attributes_and_builtins_are_unreachable(self, source: str) -> None:
        """Python attributes and builtins fail to compile or evaluate; nothing leaks."""
        args = {"a": "secret-value", "x": {"y": 1}}

        with pytest.raises(CelError) as caught:
            _compile_and_evaluate(source, args)

        _one_line(caught.value)
        assert "secret-value" not in str(caught.value)

    @settings(PROPERTY, max_examples=200)
    @given(
        outer=st.sampled_from(_MACROS),
        inner=st.sampled_from(_MACROS),
        target=st.sampled_from(["args.items", "[1, 2]", "principal.roles"]),
        gap=st.sampled_from(["", " ", "\n", "\t ", "  \n  "]),
        before=st.sampled_from(
            ["", "x == ')' || ", "x == '(' || ", "(x == 1) || ", "size(x) > 0 && "]
        ),
        wrap=st.sampled_from(["{}", "({})", "[{}].size() > 0", "!{}"]),
    )
    def test_nested_comprehensions_are_refused_at_compile_time(
        self, outer: str, inner: str, target: str, gap: str, before: str, wrap: str
    ) -> None:
        """A comprehension inside another, however spaced or wrapped, does not compile."""
        nested = f"[x]{gap}.{gap}{inner}{gap}({gap}y, y == x)"
        source = f"{target}.{outer}(x,{gap}{before}{wrap.format(nested)})"

        # map and filter are refused on their own (quadratic), before any nesting.
        with pytest.raises(CelError, match=r"nests inside another|quadratic time"):
            compile_condition(source)

    @settings(PROPERTY, max_examples=50)
    @given(base=_expressions(macros=False), extra=st.integers(1, 200))
    def test_expressions_over_4_kib_are_refused(self, base: str, extra: int) -> None:
        """Anything longer than 4096 characters is refused before parsing."""
        source = base + " || false" * ((MAX_EXPRESSION - len(base)) // 9 + extra)

        with pytest.raises(CelError, match=f"over {MAX_EXPRESSION}"):
            compile_condition(source)

    def test_an_expression_of_exactly_4_kib_compiles(self) -> None:
        """The bound is inclusive: 4096 characters still compile."""
        source = "true" + " " * (MAX_EXPRESSION - 4)

        assert compile_condition(source).source == source

    def test_a_comment_cannot_hide_a_nested_comprehension(self) -> None:
        """A `)` inside a `//` comment does not close the outer comprehension."""
        with pytest.raises(CelError, match="nests inside another"):
            compile_condition("args.items.all(x, // )\n [x].exists(y, y == x))")

    def test_a_raw_string_cannot_hide_a_nested_comprehension(self) -> None:
        """A raw string ending in a backslash does not swallow the code after it."""
        with pytest.raises(CelError, match="nests inside another"):
            compile_condition(
                'args.items.all(x, r"\\" == x || [x].exists(x, x == 1) || x == "a")'
            )

    @pytest.mark.parametrize("macro", ["map(x, x)", "filter(x, x > 0)"])
    def test_quadratic_macros_are_refused(self, macro: str) -> None:
        """`map` and `filter`, quadratic in the runtime, do not compile."""
        with pytest.raises(CelError):
            compile_condition(f"args.items.{macro}.size() > 0")

    def test_a_comprehension_body_cannot_scan_the_args_again(self) -> None:
        """A body that reads `args` (an O(n) scan per element) does not compile."""
        with pytest.raises(CelError):
            compile_condition("args.items.all(x, x in args.items)")

    def test_a_context_value_cel_cannot_carry_denies(self) -> None:
        """A run context holding a set denies the rule that reads it (fail closed)."""
        rules = [rule("prod", "allow", when="context.environment == 'prod'")]

        got = decide(rules, request(context={"environment": "prod", "tags": {"a"}}))

        assert (got.verdict, got.rule_ids) == (Verdict.DENY, ("prod",))


@pytest.fixture
def app_with_rules(clock: FakeClock, tmp_path: Path) -> Iterator[tether.Tether]:
    """An app whose `tether.yaml` holds RULES_V1."""
    config = tmp_path / "tether.yaml"
    config.write_text(RULES_V1)
    with temporary_app(clock=clock, config=config) as app:
        app.register(refund)
        yield app


def test_rule_ids_and_version_are_recorded(app_with_rules: tether.Tether) -> None:
    """The `decided` event names the rule and the file's version."""
    with app_with_rules.run(principal=tether.Principal("bot"), request="r") as run:
        run.call("payments.refund", {"order_id": "o", "amount_cents": 1})

    [event] = decided(app_with_rules, run.id)
    assert event["rule_ids"] == ["small-refunds"]
    assert event["reasons"] == ["small refunds are routine"]
    assert event["policy_version"] == app_with_rules.policy.version


class TestReviewedFailOpenPaths:
    def test_a_policy_returning_a_text_verdict_still_denies(
        self, tmp_path: Path
    ) -> None:
        """A Python policy giving `Decision(verdict="deny")` denies like the enum would."""

        class Textual:
            id = "textual"

            def evaluate(self, request: DecisionRequest) -> Decision | None:
                return Decision(verdict="deny", reasons=("no",))  # type: ignore[arg-type]

        got = PolicySet([Textual()]).decide(request())

        assert got.verdict is Verdict.DENY
        assert got.rule_ids == ("textual",)

    def test_a_policy_returning_something_else_denies_in_its_name(self) -> None:
        """A policy that returns a bare verdict instead of a Decision fails closed."""

        class Sloppy:
            id = "sloppy"

            def evaluate(self, request: DecisionRequest) -> Decision | None:
                return Verdict.ALLOW  # type: ignore[return-value]

        got = PolicySet([Sloppy()]).decide(request())

        assert (got.verdict, got.rule_ids) == (Verdict.DENY, ("sloppy",))

    def test_a_policy_cannot_speak_as_a_yaml_rule(self) -> None:
        """A Python policy's rule ids are recorded under its own id."""

        class Impostor:
            id = "impostor"

            def evaluate(self, request: DecisionRequest) -> Decision | None:
                return Decision(verdict=Verdict.ALLOW, rule_ids=("tether:scopes",))

        got = PolicySet([Impostor()]).decide(request())

        assert got.rule_ids == ("impostor:tether:scopes",)

    @pytest.mark.parametrize("call", ["args.s.lowerAscii() == 'x'", "max(1, 2) > 1"])
    def test_unknown_functions_are_refused_at_compile_time(self, call: str) -> None:
        """A function the CEL runtime lacks is an error when the file loads, not a
        silent deny at every step."""
        with pytest.raises(CelError, match="unknown function"):
            compile_condition(call)


class SlowIn(BaseModel):
    n: int


class SlowOut(BaseModel):
    n: int


@tether.capability("ops.slow", effect="read", timeout=240)
def _slow(args: SlowIn) -> SlowOut:
    return SlowOut(n=args.n)


def test_a_reload_that_would_shorten_the_claim_below_a_timeout_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload whose claim_ttl is shorter than a registered timeout keeps the last
    good settings, so a retry can never take over a key while its call still runs."""
    config = tmp_path / "tether.yaml"
    config.write_text("idempotency: {claim_ttl: 5m}\n")
    with temporary_app(config=config) as app:
        app.register(_slow)
        before = app.current_policy().version
        write_config(config, "idempotency: {claim_ttl: 1m}\n")

        after = app.current_policy().version

        assert after == before
        assert app.settings.idempotency.claim_ttl.total_seconds() == 300
        assert any(r.getMessage() == "policy.reload_failed" for r in caplog.records)
