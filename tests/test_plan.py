"""Plan admission: a whole plan is checked before its first step runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

import tether
from tether.agent import PlannerInput, Proposal, ProposedStep, run_agent
from tether.plan import Admission, AdmissionStatus, PlanStep
from tether.policy import Decision, DecisionRequest, Verdict
from tether.record import OutcomeStatus
from tether.testing import FakeClock, temporary_app

CALLS: Counter[str] = Counter()
"""Handler calls per capability, reset before each test."""

POLICY = """\
version: 1
rules:
  - id: prod-is-frozen
    match: {capability: infra.restart}
    when: "args.host == 'prod-1'"
    decision: deny
    reason: prod hosts are frozen
  - id: big-refunds-need-a-human
    match: {capability: payments.refund}
    when: "args.amount_cents > 50000"
    decision: require_approval
    reason: refunds over 500.00 need finance
  - id: previews-only
    match: {capability: [deploy.rollback, notes.wipe]}
    decision: dry_run_only
    reason: this environment only previews
defaults: {read: allow, write: allow, destructive: allow}
"""


class HostIn(BaseModel, extra="forbid"):
    host: str = Field(min_length=1)


class HostOut(BaseModel):
    host: str
    up: bool


class RefundIn(BaseModel, extra="forbid"):
    order_id: str
    amount_cents: int = Field(gt=0)


class RefundOut(BaseModel):
    order_id: str
    refunded_cents: int


class LoginIn(BaseModel, extra="forbid"):
    user: str
    password: tether.Secret


class LoginOut(BaseModel):
    ok: bool


@tether.capability("net.ping", effect="read")
def ping(args: HostIn) -> HostOut:
    """Tell whether a host answers."""
    CALLS["net.ping"] += 1
    return HostOut(host=args.host, up=True)


@tether.capability("infra.restart", effect="write", scopes=["infra:write"])
def restart(args: HostIn) -> HostOut:
    """Restart a host."""
    CALLS["infra.restart"] += 1
    return HostOut(host=args.host, up=True)


@tether.capability(
    "payments.refund",
    effect="write",
    idempotency="keyed",
    cost=lambda args: args.amount_cents,
)
def refund(args: RefundIn) -> RefundOut:
    """Refund an order (costs its amount)."""
    CALLS["payments.refund"] += 1
    return RefundOut(order_id=args.order_id, refunded_cents=args.amount_cents)


def _preview(args: HostIn) -> HostOut:
    return HostOut(host=args.host, up=False)


@tether.capability("deploy.rollback", effect="destructive", dry_run=_preview, cost=1000)
def rollback(args: HostIn) -> HostOut:
    """Roll a host back (destructive; has a dry run)."""
    CALLS["deploy.rollback"] += 1
    return HostOut(host=args.host, up=True)


@tether.capability("notes.wipe", effect="write")
def wipe(args: HostIn) -> HostOut:
    """Wipe notes (a write without a dry-run handler)."""
    CALLS["notes.wipe"] += 1
    return HostOut(host=args.host, up=False)


@tether.capability("auth.login", effect="read")
def login(args: LoginIn) -> LoginOut:
    """Check a password."""
    return LoginOut(ok=True)


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    CALLS.clear()


@pytest.fixture
def guarded(tmp_path: Path, clock: FakeClock) -> Iterator[tether.Tether]:
    """An app with the test capabilities and the policy above, in a file."""
    config = tmp_path / "tether.yaml"
    config.write_text(POLICY)
    with temporary_app(clock=clock, config=config) as app:
        app.register(ping, restart, refund, rollback, wipe, login)
        yield app


@pytest.fixture
def sre() -> tether.Principal:
    """An agent holding the scope that `infra.restart` requires."""
    return tether.Principal("ops-bot", roles=["agent"], scopes=["infra:write"])


def events(app: tether.Tether, run_id: str, kind: str | None = None) -> list[Any]:
    """Return a run's events as dicts (of one kind, if given), in order."""
    found = [e.data() for e in app.store.events(run_id)]
    return [e for e in found if kind is None or e["kind"] == kind]


def refund_step(order: str, cents: int) -> tuple[str, dict[str, Any]]:
    return ("payments.refund", {"order_id": order, "amount_cents": cents})


# -- statuses ------------------------------------------------------------------------


def test_a_plan_of_allowed_steps_is_admitted(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """Steps that exist, validate and are allowed make an admitted plan, costed."""
    with guarded.run(principal=sre, request="fix db-1") as run:
        admission = run.admit(
            [
                ("net.ping", {"host": "db-1"}),
                ("infra.restart", {"host": "db-1"}, "clear the pool"),
                refund_step("o-1", 250),
            ]
        )

    assert admission.status is AdmissionStatus.ADMITTED
    assert admission.admitted
    assert [(s.index, s.capability, s.verdict) for s in admission.steps] == [
        (1, "net.ping", Verdict.ALLOW),
        (2, "infra.restart", Verdict.ALLOW),
        (3, "payments.refund", Verdict.ALLOW),
    ]
    assert [s.cost for s in admission.steps] == [0, 0, 250]
    assert (admission.total_cost, admission.budget_left) == (Decimal(250), None)
    assert sum(CALLS.values()) == 0


def test_a_step_needing_approval_is_marked_and_the_plan_admitted(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """A `require_approval` step makes the plan `needs_approval`, with that step marked."""
    with guarded.run(principal=sre, request="refund") as run:
        admission = run.admit([refund_step("o-1", 100), refund_step("o-2", 90_000)])

    assert admission.status is AdmissionStatus.NEEDS_APPROVAL
    assert admission.admitted
    assert [s.needs_approval for s in admission.steps] == [False, True]
    marked = admission.steps[1]
    assert marked.rule_ids == ("big-refunds-need-a-human",)
    assert marked.reasons == ("refunds over 500.00 need finance",)
    assert not marked.refused
    assert "step 2 (payments.refund" in admission.message


def test_an_unknown_capability_refuses_the_plan(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """A step naming no capability refuses the plan; the other steps are still checked."""
    with guarded.run(principal=sre, request="ping") as run:
        admission = run.admit(
            [("net.pong", {"host": "a"}), ("net.ping", {"host": "a"})]
        )

    assert admission.status is AdmissionStatus.REFUSED
    unknown, known = admission.steps
    assert (unknown.error_code, unknown.version, unknown.verdict) == (
        "not_found",
        None,
        None,
    )
    assert "unknown capability 'net.pong'" in (unknown.error_message or "")
    assert (known.refused, known.verdict) == (False, Verdict.ALLOW)


def test_invalid_args_refuse_the_plan_naming_the_field(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """Args that break the input schema refuse the plan; the message names the field."""
    with guarded.run(principal=sre, request="refund") as run:
        admission = run.admit([("net.ping", {"host": "a"}), refund_step("o-1", -5)])

    assert admission.status is AdmissionStatus.REFUSED
    bad = admission.steps[1]
    assert bad.error_code == "invalid_arguments"
    assert "amount_cents" in (bad.error_message or "")
    assert bad.verdict is None
    assert admission.message.startswith("plan refused: step 2: payments.refund:")


def test_an_invalid_idempotency_key_refuses_the_plan(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """A key the gateway would refuse refuses the plan before any step runs."""
    step = ProposedStep(
        capability="payments.refund",
        args={"order_id": "o-1", "amount_cents": 5},
        idempotency_key="bad\nkey",
    )
    with guarded.run(principal=sre, request="refund") as run:
        admission = run.admit([step])

    assert admission.steps[0].error_code == "invalid_idempotency_key"


def test_a_missing_scope_refuses_the_plan(
    guarded: tether.Tether, principal: tether.Principal
) -> None:
    """A principal without a capability's scope is denied at admission, by the scopes rule."""
    with guarded.run(principal=principal, request="restart") as run:
        admission = run.admit([("infra.restart", {"host": "db-1"})])

    assert admission.status is AdmissionStatus.REFUSED
    (step,) = admission.steps
    assert (step.verdict, step.rule_ids, step.error_code) == (
        Verdict.DENY,
        ("tether:scopes",),
        "policy_denied",
    )
    assert "infra:write" in step.reasons[0]


def test_a_deny_rule_refuses_the_plan(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """A step a rule denies refuses the whole plan, with the rule's id and reason."""
    with guarded.run(principal=sre, request="restart") as run:
        admission = run.admit(
            [("net.ping", {"host": "prod-1"}), ("infra.restart", {"host": "prod-1"})]
        )

    assert admission.status is AdmissionStatus.REFUSED
    assert [s.refused for s in admission.steps] == [False, True]
    denied = admission.steps[1]
    assert denied.rule_ids == ("prod-is-frozen",)
    assert denied.error_message == (
        "infra.restart: denied by prod-is-frozen: prod hosts are frozen"
    )
    assert denied.cost == 0


def test_a_plan_costing_more_than_the_budget_left_is_refused(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """The plan's total is held to the budget minus what the run spent; the step passing it is marked."""
    with guarded.run(principal=sre, request="refunds", budget=1000) as run:
        run.call("payments.refund", {"order_id": "o-0", "amount_cents": 400})
        over = run.admit(
            [
                refund_step("o-1", 300),
                refund_step("o-2", 200),
                refund_step("o-3", 101),
                refund_step("o-4", 5),
            ]
        )
        exact = run.admit([refund_step("o-1", 300), refund_step("o-2", 300)])

    assert run.cost == 400
    assert (over.status, over.total_cost, over.budget_left) == (
        AdmissionStatus.REFUSED,
        Decimal(606),
        Decimal(600),
    )
    assert [s.error_code for s in over.steps] == [None, None, "limit_exceeded", None]
    assert "reaches 601 at this step, over the 600 left" in (
        over.steps[2].error_message or ""
    )
    assert (exact.status, exact.total_cost) == (AdmissionStatus.ADMITTED, Decimal(600))
    assert CALLS["payments.refund"] == 1


def test_dry_run_only_steps_are_admitted_and_cost_nothing(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """A `dry_run_only` step is admitted as a dry run, at no cost against the budget."""
    with guarded.run(principal=sre, request="roll back", budget=0) as run:
        admission = run.admit([("deploy.rollback", {"host": "web-1"})])

    assert admission.status is AdmissionStatus.ADMITTED
    (step,) = admission.steps
    assert (step.verdict, step.dry_run, step.cost) == (
        Verdict.DRY_RUN_ONLY,
        True,
        Decimal(0),
    )
    assert step.rule_ids == ("previews-only",)


def test_a_dry_run_nothing_can_serve_refuses_the_plan(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """A write that must run dry but has no dry-run handler is refused, as the gateway would."""
    with guarded.run(principal=sre, request="wipe") as run:
        admission = run.admit([("notes.wipe", {"host": "a"})])
        outcome = run.step("notes.wipe", {"host": "a"})

    assert admission.steps[0].error_code == "policy_denied"
    assert "no dry-run handler" in (admission.steps[0].error_message or "")
    assert outcome.status is OutcomeStatus.REFUSED


class Seen:
    """A Python policy that keeps every request it is asked, and abstains."""

    id = "seen"

    def __init__(self) -> None:
        self.requests: list[DecisionRequest] = []

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        self.requests.append(request)
        return None


def test_each_step_is_decided_as_the_gateway_will_decide_it(
    guarded: tether.Tether, sre: tether.Principal, clock: FakeClock
) -> None:
    """Admission asks policy what the gateway asks when the step runs: steps and cost so far grow."""
    seen = Seen()
    guarded.add_policy(seen)
    plan = [refund_step("o-1", 100), ("net.ping", {"host": "a"}), refund_step("o-2", 7)]
    with guarded.run(principal=sre, request="x", context={"ticket": "T-1"}) as run:
        run.call("payments.refund", {"order_id": "o-0", "amount_cents": 20})
        run.admit(plan)
        admitted = list(seen.requests[1:])
        for name, args in plan:
            run.call(name, args)
        taken = seen.requests[4:]

    assert [(r.steps_so_far, r.cost_so_far) for r in admitted] == [
        (1, Decimal(20)),
        (2, Decimal(120)),
        (3, Decimal(120)),
    ]
    assert admitted == taken


# -- the record ----------------------------------------------------------------------


def test_plan_admitted_event_holds_verdicts_rules_and_totals(
    guarded: tether.Tether, sre: tether.Principal, clock: FakeClock
) -> None:
    """One `plan_admitted` event per admission records status, each step and the totals."""
    with guarded.run(principal=sre, request="x", budget=Decimal("10000")) as run:
        run.admit([refund_step("o-1", 90_000), ("infra.restart", {"host": "prod-1"})])

    (event,) = events(guarded, run.id, "plan_admitted")
    assert event["status"] == "refused"
    assert event["policy_version"] == guarded.policy.version
    assert (event["total_cost"], event["budget_left"]) == ("90000", "10000")
    assert event["step"] is None
    assert event["steps"] == [
        {
            "index": 1,
            "capability": "payments.refund",
            "version": "1",
            "verdict": "require_approval",
            "rule_ids": ["big-refunds-need-a-human"],
            "reasons": ["refunds over 500.00 need finance"],
            "cost": "90000",
            "dry_run": False,
            "error_code": "limit_exceeded",
            "error_message": "payments.refund: the plan's estimated cost reaches "
            "90000 at this step, over the 10000 left of the run's budget; propose "
            "fewer or cheaper steps",
        },
        {
            "index": 2,
            "capability": "infra.restart",
            "version": "1",
            "verdict": "deny",
            "rule_ids": ["prod-is-frozen"],
            "reasons": ["prod hosts are frozen"],
            "cost": "0",
            "dry_run": False,
            "error_code": "policy_denied",
            "error_message": "infra.restart: denied by prod-is-frozen: prod hosts "
            "are frozen",
        },
    ]
    assert guarded.verify(run.id).ok


def test_admission_records_no_args_so_secrets_stay_out(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """The `plan_admitted` event holds no args, so a secret in a plan is not recorded."""
    with guarded.run(principal=sre, request="log in") as run:
        run.admit([("auth.login", {"user": "u", "password": "hunter2-secret"})])
        run.admit([("auth.login", {"user": "u", "password": 7})])

    bodies = b"".join(e.body for e in guarded.store.events(run.id))
    assert b"hunter2" not in bodies


def test_admission_is_deterministic(
    tmp_path: Path, sre: tether.Principal, clock: FakeClock
) -> None:
    """The same plan in the same state gives the same `plan_admitted` bytes, in any app."""
    config = tmp_path / "tether.yaml"
    config.write_text(POLICY)
    plan = [
        ("net.ping", {"host": "a"}),
        refund_step("o-1", 90_000),
        ("infra.restart", {"host": "prod-1"}),
        ("nope.nothing", {}),
    ]
    bodies = []
    for _ in range(2):
        with temporary_app(clock=clock, config=config) as app:
            app.register(ping, restart, refund, rollback, wipe, login)
            with app.run(principal=sre, request="x", budget=50) as run:
                first = run.admit(plan)
                second = run.admit(plan)
            found = [
                e.body
                for e in app.store.events(run.id)
                if e.data()["kind"] == "plan_admitted"
            ]
            bodies.append(found)

    assert first == second
    assert bodies[0] == bodies[1]
    assert bodies[0][0] == bodies[0][1]


def test_admit_needs_an_open_run(guarded: tether.Tether, sre: tether.Principal) -> None:
    """A plan is admitted inside `with app.run(...)`, not before or after."""
    run = guarded.run(principal=sre, request="x")
    with pytest.raises(tether.UsageError, match="pending"):
        run.admit([("net.ping", {"host": "a"})])
    with run:
        pass
    with pytest.raises(tether.UsageError, match="succeeded"):
        run.admit([("net.ping", {"host": "a"})])
    with guarded.run(principal=sre, request="y") as open_run:
        with pytest.raises(tether.UsageError, match="plan step"):
            open_run.admit(["net.ping"])  # type: ignore[list-item]  # under test
        with pytest.raises(tether.UsageError, match="sequence of steps"):
            open_run.admit("net.ping")  # type: ignore[arg-type]  # under test


@pytest.mark.parametrize("budget", [1.5, -1, Decimal("NaN"), True])
def test_a_budget_is_an_exact_amount(
    guarded: tether.Tether, sre: tether.Principal, budget: Any
) -> None:
    """A float, a negative, a NaN or a bool budget is a usage error (money is exact)."""
    with pytest.raises(tether.UsageError, match="budget"):
        guarded.run(principal=sre, request="x", budget=budget)


# -- run_agent -----------------------------------------------------------------------


class Plans:
    """A planner that proposes whole plans, one per turn, and keeps what it saw."""

    def __init__(self, *plans: list[tuple[str, dict[str, Any]]]) -> None:
        self.plans = plans
        self.inputs: list[PlannerInput] = []

    def propose(self, state: PlannerInput) -> Proposal:
        self.inputs.append(state)
        turn = len(self.inputs) - 1
        if turn < len(self.plans):
            return Proposal(
                steps=tuple(PlanStep(capability=c, args=a) for c, a in self.plans[turn])
            )
        return Proposal(finish=True, answer="done")


def test_run_agent_runs_no_step_of_a_refused_plan(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """A refused plan runs nothing; the planner sees one `refused` observation with every reason."""
    planner = Plans(
        [
            ("net.ping", {"host": "prod-1"}),
            ("infra.restart", {"host": "prod-1"}),
            refund_step("o-1", -1),
        ],
        [("net.ping", {"host": "db-1"})],
    )

    run = run_agent(guarded, planner, principal=sre, request="fix prod")

    assert sum(CALLS.values()) == 1  # the second plan's ping only
    (refusal, ping_seen) = planner.inputs[-1].observations
    assert (refusal.status, refusal.step, refusal.capability) == (
        OutcomeStatus.REFUSED,
        0,
        "infra.restart",
    )
    assert refusal.error_code == "policy_denied"
    assert refusal.error_message is not None
    assert "step 2: infra.restart: denied by prod-is-frozen" in refusal.error_message
    assert "step 3: payments.refund: arguments: amount_cents" in refusal.error_message
    assert isinstance(refusal.admission, Admission)
    assert [s.refused for s in refusal.admission.steps] == [False, True, True]
    assert (ping_seen.step, ping_seen.status) == (1, OutcomeStatus.EXECUTED)
    kinds = [e["kind"] for e in events(guarded, run.id)]
    first_plan = kinds[: kinds.index("plan_admitted") + 1]
    assert "validated" not in first_plan
    assert [e["status"] for e in events(guarded, run.id, "plan_admitted")] == [
        "refused",
        "admitted",
    ]
    assert run.status is tether.RunState.SUCCEEDED


def test_a_refused_plan_that_meant_to_finish_is_asked_again(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """Steps plus `finish` end the run only if the steps were admitted."""

    class StepsThenFinish:
        def __init__(self) -> None:
            self.turns = 0

        def propose(self, state: PlannerInput) -> Proposal:
            self.turns += 1
            host = "prod-1" if self.turns == 1 else "db-1"
            step = ProposedStep(capability="infra.restart", args={"host": host})
            return Proposal(steps=(step,), finish=True, answer=f"restarted {host}")

    planner = StepsThenFinish()

    run = run_agent(guarded, planner, principal=sre, request="restart")

    assert planner.turns == 2
    assert CALLS["infra.restart"] == 1
    assert run.status is tether.RunState.SUCCEEDED


def test_a_needs_approval_plan_runs_until_the_step_needing_approval(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """Steps before the marked one run; it is refused `approval_required`; none after it runs."""
    planner = Plans(
        [
            ("net.ping", {"host": "a"}),
            refund_step("o-1", 90_000),
            ("infra.restart", {"host": "a"}),
        ]
    )

    run = run_agent(guarded, planner, principal=sre, request="refund")

    seen = planner.inputs[-1].observations
    assert [(o.capability, o.status, o.error_code) for o in seen] == [
        ("net.ping", OutcomeStatus.EXECUTED, None),
        ("payments.refund", OutcomeStatus.REFUSED, "approval_required"),
    ]
    assert dict(CALLS) == {"net.ping": 1}
    (admitted,) = events(guarded, run.id, "plan_admitted")
    assert admitted["status"] == "needs_approval"


def test_run_agent_holds_plans_to_the_run_budget(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """`run_agent(budget=...)` refuses the plan that would overspend, and runs the next."""
    planner = Plans(
        [refund_step("o-1", 300), refund_step("o-2", 300)],
        [refund_step("o-3", 50)],
        [refund_step("o-1", 300), refund_step("o-2", 300)],
    )

    run = run_agent(guarded, planner, principal=sre, request="refunds", budget=500)

    seen = planner.inputs[-1].observations
    assert [(o.status, o.error_code) for o in seen] == [
        (OutcomeStatus.REFUSED, "limit_exceeded"),
        (OutcomeStatus.EXECUTED, None),
        (OutcomeStatus.REFUSED, "limit_exceeded"),
    ]
    assert run.cost == 50
    assert CALLS["payments.refund"] == 1


def test_stop_on_error_gives_up_on_a_refused_plan(
    guarded: tether.Tether, sre: tether.Principal
) -> None:
    """A scripted planner that stops on errors gives up naming the refused plan."""
    planner = tether.ScriptedPlanner(
        [("infra.restart", {"host": "prod-1"})], stop_on_error=True
    )

    run = run_agent(guarded, planner, principal=sre, request="restart prod")

    (finished,) = events(guarded, run.id, "run_finished")
    assert run.status is tether.RunState.FAILED
    assert finished["error_code"] == "planner_gave_up"
    assert (finished["message"] or "").startswith(
        "the plan was refused: policy_denied: plan refused: step 1: infra.restart"
    )
