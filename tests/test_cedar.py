"""The optional Cedar backend: Cedar's answers in tether's terms and precedence."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether.policy import DecisionRequest, PolicySet, Verdict
from tether.record import OutcomeStatus
from tether.testing import FakeClock, temporary_app

pytest.importorskip("cedarpy")

from tether.policy import cedar as cedar_module  # after the skip
from tether.policy.cedar import CedarPolicy

POLICIES = """
@id("finance-may-refund")
permit(principal in Role::"finance", action == Action::"payments.refund", resource);

@id("big-refunds-need-a-human")
@reason("refunds over 500.00 need a second pair of eyes")
@decision("require_approval")
permit(principal, action == Action::"payments.refund", resource)
when { context.args has amount_cents && context.args.amount_cents > 50000 };

@id("no-prod-drops")
forbid(principal, action == Action::"db.drop", resource)
when { context has environment && context.environment == "prod" };

@id("suspended-tenant")
forbid(principal in Tenant::"suspended", action, resource);
"""

ALICE = tether.Principal("alice", roles=["finance"], tenant="acme")
BOB = tether.Principal("bob", roles=["agent"], tenant="acme")


def request(
    capability: str = "payments.refund",
    args: dict[str, Any] | None = None,
    *,
    principal: tether.Principal = ALICE,
    context: dict[str, Any] | None = None,
    effect: str = "write",
    at: datetime | None = None,
    cost: Decimal = Decimal(0),
    steps: int = 0,
) -> DecisionRequest:
    """Return a decision request as the gateway builds one."""
    return DecisionRequest(
        principal=principal,
        capability=capability,
        version="1",
        effect=effect,
        scopes=(),
        args=args if args is not None else {"order_id": "o-1", "amount_cents": 100},
        context=context or {},
        steps_so_far=steps,
        cost_so_far=cost,
        at=at,
    )


class TestVerdicts:
    def test_a_satisfied_permit_allows_naming_it(self) -> None:
        """A satisfied permit allows; the rule id is the policy id and Cedar's `@id`."""
        policy = CedarPolicy(POLICIES)

        got = policy.evaluate(request())

        assert got is not None
        assert got.verdict is Verdict.ALLOW
        assert got.rule_ids == ("cedar:finance-may-refund",)
        assert got.reasons == (
            "Cedar policy 'cedar:finance-may-refund' permits payments.refund",
        )

    def test_a_satisfied_forbid_denies_over_permits(self) -> None:
        """A satisfied forbid denies even where a permit is satisfied too."""
        policy = CedarPolicy(POLICIES)
        suspended = tether.Principal("carol", roles=["finance"], tenant="suspended")

        got = policy.evaluate(request(principal=suspended))

        assert got is not None
        assert (got.verdict, got.rule_ids) == (
            Verdict.DENY,
            ("cedar:suspended-tenant",),
        )

    def test_no_satisfied_policy_abstains(self) -> None:
        """Cedar's default deny (nothing permits) is an abstention by default."""
        policy = CedarPolicy(POLICIES)

        assert policy.evaluate(request(principal=BOB)) is None

    def test_no_permit_can_deny_instead(self) -> None:
        """With `no_permit="deny"` Cedar's default deny stands, under the policy's id."""
        policy = CedarPolicy(POLICIES, id="authz", no_permit="deny")

        got = policy.evaluate(request(principal=BOB))

        assert got is not None
        assert (got.verdict, got.rule_ids) == (Verdict.DENY, ("authz",))
        assert got.reasons == ("no Cedar policy permits payments.refund for 'bob'",)

    def test_a_decision_annotation_gives_its_verdict_with_its_reason(self) -> None:
        """`@decision("require_approval")` on a permit wins over a plain permit."""
        policy = CedarPolicy(POLICIES)

        got = policy.evaluate(request(args={"amount_cents": 60_000}))

        assert got is not None
        assert got.verdict is Verdict.REQUIRE_APPROVAL
        assert got.rule_ids == ("cedar:big-refunds-need-a-human",)
        assert got.reasons == ("refunds over 500.00 need a second pair of eyes",)

    def test_ids_without_annotations_are_cedars_own_in_file_order(self) -> None:
        """Unannotated policies are named `policyN`; several are listed in file order."""
        text = "\n".join(
            f"permit(principal, action, resource) when {{ context.args.n > {i} }};"
            for i in range(12)
        )
        policy = CedarPolicy(text, id="c")

        got = policy.evaluate(request(args={"n": 11}))

        assert got is not None
        assert got.rule_ids == tuple(f"c:policy{i}" for i in range(11))

    def test_it_is_a_policy(self) -> None:
        """A `CedarPolicy` satisfies the `tether.Policy` protocol."""
        assert isinstance(CedarPolicy(POLICIES), tether.Policy)


class TestRequest:
    def test_roles_and_tenant_are_parents_and_attributes(self) -> None:
        """Roles and tenant are the principal's parents and attributes, with its id."""
        policy = CedarPolicy(
            """
            @id("by-parent") permit(principal in Role::"sre", action, resource)
            when { principal in Tenant::"acme" };
            @id("by-attribute") permit(principal, action, resource)
            when { principal.roles.contains("sre") && principal.tenant == "acme"
                   && principal.id == "dave" && principal.scopes.contains("infra")
                   && principal.on_behalf_of == "erin" };
            """
        )
        dave = tether.Principal(
            "dave", roles=["sre"], tenant="acme", scopes=["infra"], on_behalf_of="erin"
        )

        got = policy.evaluate(request("infra.restart", {}, principal=dave))

        assert got is not None
        assert got.rule_ids == ("cedar:by-parent", "cedar:by-attribute")

    def test_a_role_hierarchy_comes_from_the_given_entities(self) -> None:
        """Entities passed in (a role inside another) take part in `in`."""
        policy = CedarPolicy(
            'permit(principal in Role::"staff", action, resource);',
            entities=[
                {
                    "uid": {"type": "Role", "id": "finance"},
                    "attrs": {},
                    "parents": [{"type": "Role", "id": "staff"}],
                }
            ],
        )

        allowed = policy.evaluate(request(principal=ALICE))
        other = policy.evaluate(request(principal=BOB))

        assert allowed is not None
        assert allowed.verdict is Verdict.ALLOW
        assert other is None

    def test_resource_and_context_carry_the_step(self) -> None:
        """The resource holds the capability; the context the run's facts and args."""
        policy = CedarPolicy(
            """
            @id("all") permit(principal, action == Action::"infra.restart", resource)
            when { resource.name == "infra.restart" && resource.version == "1"
                   && resource.effect == "destructive" && resource.scopes == []
                   && context.environment == "prod" && context.tenant == "acme"
                   && context.steps == 3 && context.cost == decimal("1.2501")
                   && context.time < datetime("2031-01-01")
                   && context.args.hosts.contains("h-2") && context.args.ratio == decimal("0.5")
                   && context.labels.team == "core" && context.args.when > datetime("2029-12-31")
                   && !(context.args has note) };
            """
        )

        got = policy.evaluate(
            request(
                "infra.restart",
                {
                    "hosts": ("h-1", "h-2"),
                    "ratio": 0.5,
                    "note": None,
                    "when": datetime(2030, 1, 1, tzinfo=UTC),
                },
                effect="destructive",
                context={"environment": "prod", "labels": {"team": "core"}},
                steps=3,
                cost=Decimal("1.25001"),  # rounded up to 4 places
                at=datetime(2030, 6, 1, 12, 0, 0, 123456, tzinfo=UTC),
            )
        )

        assert got is not None
        assert got.rule_ids == ("cedar:all",)

    def test_entities_are_made_once_per_principal_and_capability(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The per-step entities are cached, and the cache stays bounded."""
        monkeypatch.setattr(cedar_module, "_CACHE_SIZE", 2)
        policy = CedarPolicy(POLICIES)

        policy.evaluate(request())
        policy.evaluate(request(args={"amount_cents": 1}))
        sizes = [len(policy._cache)]
        policy.evaluate(request("db.drop"))
        policy.evaluate(request("net.ping"))
        sizes.append(len(policy._cache))

        assert sizes == [1, 1]


class TestFailClosed:
    def test_a_forbid_that_cannot_be_evaluated_denies_naming_it(self) -> None:
        """A forbid Cedar could not evaluate denies, where Cedar alone would skip it."""
        policy = CedarPolicy(
            """
            permit(principal, action, resource);
            @id("no-big") forbid(principal, action, resource) when { context.args.amount_cents > 10 };
            """
        )

        got = policy.evaluate(request(args={"order_id": "o-1"}))

        assert got is not None
        assert (got.verdict, got.rule_ids) == (Verdict.DENY, ("cedar:no-big",))
        assert "does not have the attribute `amount_cents`" in got.reasons[0]
        assert got.reasons[0].endswith("denied until it can")

    def test_a_permit_that_cannot_be_evaluated_is_not_satisfied(self) -> None:
        """A permit Cedar could not evaluate permits nothing, which only tightens."""
        policy = CedarPolicy(
            "permit(principal, action, resource) when { context.args.amount_cents > 10 };"
        )

        assert policy.evaluate(request(args={"order_id": "o-1"})) is None

    def test_a_tightening_permit_that_cannot_be_evaluated_denies(self) -> None:
        """A permit that asks approval denies when it cannot be evaluated: an agent
        cannot escape it by leaving out the field it reads."""
        policy = CedarPolicy(
            '@id("big-refunds") @decision("require_approval") '
            "permit(principal, action, resource) when { context.args.amount_cents > 10 };"
        )

        got = policy.evaluate(request(args={"amount": 10}))

        assert got is not None
        assert (got.verdict, got.rule_ids) == (Verdict.DENY, ("cedar:big-refunds",))

    @pytest.mark.parametrize(
        ("args", "context", "message"),
        [
            ({"ratio": 0.333333}, {}, "context.args.ratio: 0.333333 does not fit"),
            ({"n": float("nan")}, {}, "context.args.n: nan has no Cedar form"),
            ({"n": 2**63}, {}, "beyond Cedar's 64-bit longs"),
            ({"d": Decimal("1e30")}, {}, "context.args.d: 1E+30 does not fit"),
            ({"x": [object()]}, {}, "context.args.x[0]: a object has no Cedar form"),
            ({}, {1: "one"}, "context: key 1 is not text"),
            (
                {},
                {"at": datetime(2030, 1, 1)},
                "context.at: a naive datetime",
            ),  # naive: the error under test
            (
                {"owner": {"__entity": {"type": "Principal", "id": "root"}}},
                {},
                "context.args.owner: the key '__entity' is reserved by Cedar",
            ),
        ],
    )
    def test_a_value_cedar_cannot_carry_denies(
        self, args: dict[str, Any], context: dict[Any, Any], message: str
    ) -> None:
        """Args Cedar cannot hold exactly, or that would forge an entity, deny the step."""
        policy = CedarPolicy("permit(principal, action, resource);")

        got = policy.evaluate(request(args=args, context=context))

        assert got is not None
        assert (got.verdict, got.rule_ids) == (Verdict.DENY, ("cedar",))
        assert message in got.reasons[0]


def test_a_cost_beyond_cedars_decimal_denies() -> None:
    """A run cost too large for Cedar's decimal denies instead of wrapping."""
    policy = CedarPolicy("permit(principal, action, resource);")

    got = policy.evaluate(request(cost=Decimal("1e20")))

    assert got is not None
    assert got.verdict is Verdict.DENY
    assert got.reasons[0].startswith("context.cost: 1E+20 does not fit")


SCHEMA = """
entity Role, Tenant;
entity Principal in [Role, Tenant] {
  id: String, tenant: String, roles: Set<String>, scopes: Set<String>,
  on_behalf_of?: String,
};
entity Capability { name: String, version: String, effect: String, scopes: Set<String> };
action "payments.refund" appliesTo {
  principal: Principal,
  resource: Capability,
  context: {
    args: { order_id: String, amount_cents: Long },
    tenant: String, steps: Long, cost: decimal, time?: datetime, environment?: String,
  },
};
"""


class TestSchema:
    def test_requests_that_fit_the_schema_are_decided(self) -> None:
        """With a schema, a well-typed request is decided as without one."""
        policy = CedarPolicy(
            'forbid(principal, action == Action::"payments.refund", resource) '
            "when { context.args.amount_cents > 100 };",
            schema=SCHEMA,
        )

        big = policy.evaluate(request(args={"order_id": "o", "amount_cents": 500}))
        small = policy.evaluate(request(args={"order_id": "o", "amount_cents": 5}))

        assert big is not None
        assert big.verdict is Verdict.DENY
        assert small is None

    def test_a_request_that_breaks_the_schema_denies(self) -> None:
        """Args the schema does not allow deny the step with Cedar's reason."""
        policy = CedarPolicy("permit(principal, action, resource);", schema=SCHEMA)

        got = policy.evaluate(request(args={"order_id": "o"}))

        assert got is not None
        assert got.verdict is Verdict.DENY
        assert got.reasons[0].startswith(
            "Cedar could not decide: failed to build request"
        )

    def test_entities_that_break_the_schema_deny(self) -> None:
        """A principal the schema describes otherwise is denied with Cedar's reason."""
        schema = SCHEMA.replace(
            "scopes: Set<String>,\n", "scopes: Set<String>, badge: Long,\n"
        )
        policy = CedarPolicy("permit(principal, action, resource);", schema=schema)

        got = policy.evaluate(request(args={"order_id": "o", "amount_cents": 1}))

        assert got is not None
        assert got.verdict is Verdict.DENY
        assert got.reasons[0].startswith("Cedar rejected the request:")

    def test_a_json_schema_is_accepted(self) -> None:
        """A schema in Cedar's JSON form, as a mapping, works too."""
        schema = {
            "": {
                "entityTypes": {"Principal": {}, "Capability": {}},
                "actions": {
                    "net.ping": {
                        "appliesTo": {
                            "principalTypes": ["Principal"],
                            "resourceTypes": ["Capability"],
                        }
                    }
                },
            }
        }

        policy = CedarPolicy(
            'permit(principal, action == Action::"net.ping", resource);', schema=schema
        )

        assert policy.id == "cedar"

    def test_policies_that_break_the_schema_are_refused(self) -> None:
        """A policy the schema does not allow is a usage error at construction."""
        with pytest.raises(tether.UsageError, match="do not match the schema"):
            CedarPolicy(
                'forbid(principal, action == Action::"payments.refund", resource) '
                "when { context.args.nope > 1 };",
                schema=SCHEMA,
            )


class TestConstruction:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"policies": "permit(principal"}, "do not parse"),
            (
                {"policies": "permit(principal == ?principal, action, resource);"},
                "hold templates",
            ),
            (
                {"policies": '@id("a") permit(principal, action, resource);\n' * 2},
                "id 'a' is used by both policy0 and policy1",
            ),
            (
                {"policies": '@decision("maybe") permit(principal, action, resource);'},
                "@decision('maybe') is not one of",
            ),
            (
                {"policies": '@decision("allow") forbid(principal, action, resource);'},
                "a forbid always denies",
            ),
            ({"schema": "entity ;"}, "schema of 'cedar' does not parse"),
            ({"entities": "[{"}, "are not JSON"),
            (
                {
                    "entities": [
                        {
                            "uid": {"type": "Principal", "id": "x"},
                            "attrs": {},
                            "parents": [],
                        }
                    ]
                },
                "hold Principal::'x'",
            ),
            ({"entities": '[{"uid": 3}]'}, "entities of 'cedar' are invalid"),
            ({"no_permit": "allow"}, "no_permit must be"),
        ],
    )
    def test_invalid_input_is_a_usage_error(
        self, kwargs: dict[str, Any], message: str
    ) -> None:
        """Bad policies, schema, entities or options fail at once, in one line."""
        given = {"policies": "permit(principal, action, resource);", **kwargs}

        with pytest.raises(tether.UsageError) as caught:
            CedarPolicy(**given)

        assert message in caught.value.message
        assert "\n" not in caught.value.message

    def test_forbid_may_say_deny(self) -> None:
        """`@decision("deny")` on a forbid is redundant but allowed."""
        policy = CedarPolicy('@decision("deny") forbid(principal, action, resource);')

        got = policy.evaluate(request())

        assert got is not None
        assert got.verdict is Verdict.DENY

    def test_without_cedarpy_the_error_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without cedarpy installed, construction says how to install it."""
        monkeypatch.setitem(sys.modules, "cedarpy", None)

        with pytest.raises(tether.UsageError, match=r"pip install 'tether\[cedar\]'"):
            CedarPolicy("permit(principal, action, resource);")


# -- through the app ------------------------------------------------------------------


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


def _preview(args: DropIn) -> Done:
    return Done(ok=False)


@tether.capability("db.drop", effect="destructive", dry_run=_preview)
def drop(args: DropIn) -> Done:
    """Drop a table."""
    return Done(ok=True)


@contextlib.contextmanager
def _app(clock: FakeClock, config: Path | None = None) -> Iterator[tether.Tether]:
    """A throwaway app with the refund and drop capabilities."""
    with temporary_app(clock=clock, config=config) as app:
        app.register(refund, drop)
        yield app


@pytest.fixture
def cedar_app(clock: FakeClock) -> Iterator[tether.Tether]:
    """An app without a policy file, with the Cedar policies added."""
    with _app(clock) as app:
        app.add_policy(CedarPolicy(POLICIES))
        yield app


def decided(app: tether.Tether, run_id: str) -> list[dict[str, Any]]:
    """Return the run's `decided` events."""
    return [e.data() for e in app.store.events(run_id) if e.data()["kind"] == "decided"]


class TestApp:
    def test_rule_ids_are_recorded_in_decided_events(
        self, cedar_app: tether.Tether
    ) -> None:
        """Cedar's deciding ids and reasons land in the record's `decided` events."""
        with cedar_app.run(
            principal=ALICE, request="refunds", context={"environment": "prod"}
        ) as run:
            done = run.step("payments.refund", {"order_id": "o-1", "amount_cents": 100})
            parked = run.step(
                "payments.refund", {"order_id": "o-2", "amount_cents": 90_000}
            )
            dropped = run.step("db.drop", {"table": "orders"})

        assert done.status is OutcomeStatus.EXECUTED
        assert isinstance(parked.error, tether.ApprovalRequired)
        assert isinstance(dropped.error, tether.Denied)
        assert dropped.error.rule_ids == ("cedar:no-prod-drops",)
        assert [(d["verdict"], d["rule_ids"]) for d in decided(cedar_app, run.id)] == [
            ("allow", ["cedar:finance-may-refund"]),
            ("require_approval", ["cedar:big-refunds-need-a-human"]),
            ("deny", ["cedar:no-prod-drops"]),
        ]

    def test_an_abstention_leaves_the_default(self, cedar_app: tether.Tether) -> None:
        """Where Cedar abstains the per-effect default decides (no file: allow)."""
        with cedar_app.run(principal=BOB, request="refund") as run:
            done = run.step("payments.refund", {"order_id": "o-1", "amount_cents": 100})

        assert done.status is OutcomeStatus.EXECUTED
        assert decided(cedar_app, run.id)[0]["rule_ids"] == []


YAML = """
rules:
  - id: refunds-are-fine
    match: {capability: payments.refund}
    decision: allow
    reason: refunds are routine
  - id: refunds-over-100-dry-run
    match: {capability: payments.*}
    when: "args.amount_cents > 10000"
    decision: dry_run_only
    reason: rehearse big refunds first
  - id: drops-need-approval
    match: {capability: db.drop}
    decision: require_approval
    reason: drops need a human
  - id: acme-never-drops-audit
    match: {capability: db.drop, tenant: acme}
    when: "args.table == 'audit'"
    decision: deny
    reason: the audit table stays
"""


class TestPrecedenceWithRules:
    @pytest.fixture
    def both(self, clock: FakeClock, tmp_path: Path) -> Iterator[tether.Tether]:
        """An app with the tether.yaml rules above and the Cedar policies."""
        config = tmp_path / "tether.yaml"
        config.write_text(YAML)
        with _app(clock, config) as app:
            app.add_policy(CedarPolicy(POLICIES))
            yield app

    @pytest.mark.parametrize(
        ("principal", "capability", "args", "context", "verdict", "rule_ids"),
        [
            # yaml allow + Cedar allow: both named, rules first
            (
                ALICE,
                "payments.refund",
                {"order_id": "o", "amount_cents": 1},
                {},
                "allow",
                ["refunds-are-fine", "cedar:finance-may-refund"],
            ),
            # Cedar abstains: the yaml rule alone
            (
                BOB,
                "payments.refund",
                {"order_id": "o", "amount_cents": 1},
                {},
                "allow",
                ["refunds-are-fine"],
            ),
            # yaml dry_run_only beats Cedar's allow
            (
                ALICE,
                "payments.refund",
                {"order_id": "o", "amount_cents": 20_000},
                {},
                "dry_run_only",
                ["refunds-over-100-dry-run"],
            ),
            # Cedar's require_approval beats yaml's dry_run_only
            (
                ALICE,
                "payments.refund",
                {"order_id": "o", "amount_cents": 90_000},
                {},
                "require_approval",
                ["cedar:big-refunds-need-a-human"],
            ),
            # Cedar's forbid beats yaml's require_approval
            (
                BOB,
                "db.drop",
                {"table": "orders"},
                {"environment": "prod"},
                "deny",
                ["cedar:no-prod-drops"],
            ),
            # yaml deny beats nothing-from-Cedar; both denials are named when both deny
            (
                BOB,
                "db.drop",
                {"table": "audit"},
                {"environment": "dev"},
                "deny",
                ["acme-never-drops-audit"],
            ),
            (
                BOB,
                "db.drop",
                {"table": "audit"},
                {"environment": "prod"},
                "deny",
                ["acme-never-drops-audit", "cedar:no-prod-drops"],
            ),
        ],
    )
    def test_the_strictest_verdict_wins_across_rules_and_cedar(
        self,
        both: tether.Tether,
        principal: tether.Principal,
        capability: str,
        args: dict[str, Any],
        context: dict[str, Any],
        verdict: str,
        rule_ids: list[str],
    ) -> None:
        """deny > require_approval > dry_run_only > allow, whichever backend says it."""
        with both.run(principal=principal, request="step", context=context) as run:
            run.step(capability, args)

        [event] = decided(both, run.id)
        assert (event["verdict"], event["rule_ids"]) == (verdict, rule_ids)
        assert event["policy_version"] == both.policy.version


def test_policy_set_combines_cedar_with_python_policies() -> None:
    """Two Cedar policies under different ids are told apart in the rule ids."""
    policies = PolicySet(
        [
            CedarPolicy("permit(principal, action, resource);", id="team-a"),
            CedarPolicy("permit(principal, action, resource);", id="team-b"),
        ]
    )

    got = policies.decide(request())

    assert got.rule_ids == ("team-a:policy0", "team-b:policy0")
