"""The agent loop: planners propose, the gateway acts, outcomes come back as observations."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

import tether
from tether.agent import (
    Observation,
    PlannerInput,
    Proposal,
    ProposedStep,
    ScriptedPlanner,
    run_agent,
)
from tether.policy import Decision, DecisionRequest, Verdict
from tether.record import OutcomeStatus
from tether.testing import FakeClock, temporary_app


class HostIn(BaseModel, extra="forbid"):
    host: str = Field(min_length=1)


class HostOut(BaseModel):
    host: str
    up: bool


class LoginIn(BaseModel, extra="forbid"):
    user: str
    password: tether.Secret


class LoginOut(BaseModel):
    ok: bool


@tether.capability("net.ping", effect="read")
def ping(args: HostIn) -> HostOut:
    """Tell whether a host answers."""
    return HostOut(host=args.host, up=True)


def _known_host(args: HostIn) -> bool | str:
    return args.host != "ghost" or "no such host"


@tether.capability(
    "infra.restart", effect="write", idempotency="keyed", preconditions=[_known_host]
)
def restart(args: HostIn) -> HostOut:
    """Restart a host."""
    return HostOut(host=args.host, up=True)


@tether.capability("infra.flaky", effect="write", idempotency="keyed")
def flaky(args: HostIn) -> HostOut:
    """Fail every time."""
    raise ConnectionError(f"{args.host} did not answer")


@tether.capability("auth.login", effect="read")
def login(args: LoginIn) -> LoginOut:
    """Check a password."""
    return LoginOut(ok=True)


class DenyHost:
    """Deny every step on one host."""

    id = "deny-host"

    def __init__(self, host: str) -> None:
        self.host = host

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        if request.args.get("host") == self.host:
            return Decision(
                verdict=Verdict.DENY, rule_ids=(self.id,), reasons=("host is frozen",)
            )
        return None


class Recording:
    """Wraps a planner and keeps every input it was given."""

    def __init__(self, inner: tether.agent.Planner) -> None:
        self.inner = inner
        self.inputs: list[PlannerInput] = []

    def propose(self, state: PlannerInput) -> Proposal:
        self.inputs.append(state)
        return self.inner.propose(state)


class Forever:
    """Never finishes: pings the same host every turn."""

    def propose(self, state: PlannerInput) -> Proposal:
        return Proposal(
            steps=(ProposedStep(capability="net.ping", args={"host": "a"}),)
        )


@pytest.fixture
def ops(app: tether.Tether) -> tether.Tether:
    """The app with the test capabilities registered."""
    app.register(ping, restart, flaky, login)
    return app


def events(app: tether.Tether, run_id: str) -> list[dict[str, Any]]:
    """Return a run's events as dicts, in order."""
    return [e.data() for e in app.store.events(run_id)]


def finished(app: tether.Tether, run_id: str) -> Mapping[str, Any]:
    """Return the run's `run_finished` event."""
    return next(e for e in events(app, run_id) if e["kind"] == "run_finished")


def test_scripted_planner_takes_each_step_then_succeeds(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """A scripted run takes its steps in order and ends succeeded with the answer."""
    planner = ScriptedPlanner(
        [("net.ping", {"host": "a"}), ("infra.restart", {"host": "a"}, "it hung")],
        answer="a restarted",
    )

    run = run_agent(ops, planner, principal=principal, request="fix a")

    assert run.status is tether.RunState.SUCCEEDED
    evs = events(ops, run.id)
    assert [e["output"] for e in evs if e["kind"] == "executed"] == [
        {"host": "a", "up": True},
        {"host": "a", "up": True},
    ]
    plans = [e for e in evs if e["kind"] == "plan_proposed"]
    assert [p["finish"] for p in plans] == [False, False, True]
    assert plans[1]["steps"][0]["rationale"] == "it hung"
    assert plans[-1]["answer"] == "a restarted"
    assert finished(ops, run.id)["status"] == "succeeded"


def test_run_status_events_pass_through_planning_between_steps(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """The record shows pending, executing, then planning before every turn, then succeeded."""
    planner = ScriptedPlanner(
        [("net.ping", {"host": "a"}), ("net.ping", {"host": "b"})]
    )

    run = run_agent(ops, planner, principal=principal, request="ping")

    moves = [
        (e["previous"], e["status"])
        for e in events(ops, run.id)
        if e["kind"] == "run_status"
    ]
    assert moves == [
        ("pending", "executing"),
        ("executing", "planning"),
        ("planning", "executing"),
        ("executing", "planning"),
        ("planning", "executing"),
        ("executing", "planning"),
        ("planning", "succeeded"),
    ]


def test_refusals_and_failures_are_observations_the_planner_sees(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """A denied, a precondition-refused and a failed step come back as observations."""
    ops.add_policy(DenyHost("frozen"))
    planner = Recording(
        ScriptedPlanner(
            [
                ("infra.restart", {"host": "frozen"}),
                ("infra.restart", {"host": "ghost"}),
                ("infra.flaky", {"host": "a"}),
                ("net.ping", {"host": "a"}),
            ]
        )
    )

    run = run_agent(ops, planner, principal=principal, request="try things")

    seen = planner.inputs[-1].observations
    assert [(o.status, o.error_code) for o in seen] == [
        (OutcomeStatus.REFUSED, "policy_denied"),
        (OutcomeStatus.REFUSED, "precondition_failed"),
        (OutcomeStatus.FAILED, "capability_failed"),
        (OutcomeStatus.EXECUTED, None),
    ]
    assert "host is frozen" in (seen[0].error_message or "")
    assert seen[3].output == {"host": "a", "up": True}
    assert [o.ok for o in seen] == [False, False, False, True]
    assert run.status is tether.RunState.SUCCEEDED


def test_planner_is_told_tools_request_context_and_steps_left(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """Each turn the planner gets the tool schemas, the request, the context and its budget."""
    planner = Recording(ScriptedPlanner([("net.ping", {"host": "a"})]))

    run_agent(
        ops,
        planner,
        principal=principal,
        request="ping a",
        context={"ticket": "INC-1"},
        max_steps=5,
    )

    first, second = planner.inputs
    assert [t["name"] for t in first.tools] == [
        "auth.login",
        "infra.flaky",
        "infra.restart",
        "net.ping",
    ]
    assert first.request == "ping a"
    assert first.context == {"ticket": "INC-1"}
    assert (first.steps_left, second.steps_left) == (5, 4)
    assert first.observations == ()
    assert isinstance(second.observations[0], Observation)


def test_unknown_capability_refuses_its_plan_and_is_observed_not_raised(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """A step naming no registered capability refuses its plan at admission; the planner sees why."""
    planner = Recording(
        ScriptedPlanner([("net.pong", {"host": "a"}), ("net.ping", {"host": "a"})])
    )

    run = run_agent(ops, planner, principal=principal, request="ping")

    seen = planner.inputs[-1].observations
    assert (seen[0].status, seen[0].error_code, seen[0].step) == (
        OutcomeStatus.REFUSED,
        "not_found",
        0,
    )
    assert seen[0].admission is not None
    assert seen[1].step == 1
    recorded = events(ops, run.id)
    admitted = [e["status"] for e in recorded if e["kind"] == "plan_admitted"]
    assert admitted == ["refused", "admitted"]
    assert [e for e in recorded if e["kind"] == "failed"] == []
    assert run.status is tether.RunState.SUCCEEDED


def test_max_steps_ends_the_run_failed(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """A planner that never finishes is stopped after `max_steps` and the run fails."""
    run = run_agent(ops, Forever(), principal=principal, request="loop", max_steps=3)

    assert run.status is tether.RunState.FAILED
    evs = events(ops, run.id)
    assert sum(e["kind"] == "executed" for e in evs) == 3
    end = finished(ops, run.id)
    assert end["error_code"] == "max_steps_exceeded"
    assert "max_steps=3" in end["message"]
    assert evs[-2] == {**evs[-2], "previous": "planning", "status": "failed"}


def test_a_planner_may_finish_on_its_last_allowed_turn(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """Finishing after exactly `max_steps` steps succeeds: the limit counts steps, not turns."""
    planner = ScriptedPlanner(
        [("net.ping", {"host": "a"}), ("net.ping", {"host": "b"})]
    )

    run = run_agent(ops, planner, principal=principal, request="ping", max_steps=2)

    assert run.status is tether.RunState.SUCCEEDED


def test_stop_on_error_gives_up_and_fails_the_run(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """With `stop_on_error`, the first refused step ends the run failed, naming it."""
    planner = ScriptedPlanner(
        [("infra.restart", {"host": "ghost"}), ("net.ping", {"host": "a"})],
        stop_on_error=True,
    )

    run = run_agent(ops, planner, principal=principal, request="restart ghost")

    assert run.status is tether.RunState.FAILED
    end = finished(ops, run.id)
    assert end["error_code"] == "planner_gave_up"
    assert "precondition_failed" in end["message"]
    assert not any(e["kind"] == "executed" for e in events(ops, run.id))


def test_planner_key_and_dry_run_reach_the_gateway(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """A proposed step's idempotency key deduplicates a repeat; its dry-run flag is kept."""
    again = ProposedStep(
        capability="infra.restart", args={"host": "a"}, idempotency_key="inc-7"
    )
    planner = Recording(ScriptedPlanner([again, again]))

    run_agent(ops, planner, principal=principal, request="restart a once")

    statuses = [o.status for o in planner.inputs[-1].observations]
    assert statuses == [OutcomeStatus.EXECUTED, OutcomeStatus.IDEMPOTENT_HIT]


def test_secret_args_are_masked_in_the_recorded_plan(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """A secret the planner passes is masked in `plan_proposed`, as in `validated`."""
    planner = ScriptedPlanner([("auth.login", {"user": "u", "password": "hunter2"})])

    run = run_agent(ops, planner, principal=principal, request="log in")

    bodies = b"".join(e.body for e in ops.store.events(run.id))
    assert b"hunter2" not in bodies
    plan = next(e for e in events(ops, run.id) if e["kind"] == "plan_proposed")
    assert plan["steps"][0]["args"] == {"user": "u", "password": "**********"}


def test_one_scripted_planner_drives_several_runs_alike(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """The scripted planner keeps no state of its own, so each run starts from step one."""
    planner = ScriptedPlanner([("net.ping", {"host": "a"})])

    first = run_agent(ops, planner, principal=principal, request="one")
    second = run_agent(ops, planner, principal=principal, request="two")

    kinds = [[e["kind"] for e in events(ops, r.id)] for r in (first, second)]
    assert kinds[0] == kinds[1]


def test_a_planner_returning_no_proposal_fails_the_run_and_raises(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """A planner bug raises `UsageError` and the run is recorded as failed."""

    class Broken:
        def propose(self, state: PlannerInput) -> Proposal:
            return "ping a"  # type: ignore[return-value]  # the bug under test

    with pytest.raises(tether.UsageError, match="Proposal"):
        run_agent(ops, Broken(), principal=principal, request="x")

    (row,) = ops.store.list_runs()
    assert (row.status, row.error_code) == ("failed", "usage_error")


@pytest.mark.parametrize(
    "steps",
    [
        [("net.ping",)],
        [("net.ping", "host=a")],
        [("net.ping", {"host": "a"}, 3)],
        ["net.ping"],
    ],
    ids=["no-args", "args-not-mapping", "rationale-not-text", "bare-name"],
)
def test_scripted_planner_rejects_malformed_steps(steps: list[Any]) -> None:
    """A scripted step that is not (capability, args[, rationale]) is a usage error."""
    with pytest.raises(tether.UsageError, match="scripted step"):
        ScriptedPlanner(steps)


def test_a_proposal_must_have_steps_or_finish() -> None:
    """An empty proposal is refused, since the loop would never end."""
    with pytest.raises(tether.UsageError, match="at least one step"):
        Proposal()
    with pytest.raises(tether.UsageError, match="finish"):
        Proposal(steps=(ProposedStep(capability="net.ping"),), gave_up=True)


def test_run_agent_checks_its_arguments(
    ops: tether.Tether, principal: tether.Principal
) -> None:
    """A non-planner or a `max_steps` below 1 is refused before any run opens."""
    with pytest.raises(tether.UsageError, match="not a planner"):
        run_agent(ops, object(), principal=principal, request="x")  # type: ignore[arg-type]  # under test
    with pytest.raises(tether.UsageError, match="max_steps"):
        run_agent(ops, Forever(), principal=principal, request="x", max_steps=0)

    assert ops.store.list_runs() == []


@tether.capability("infra.resize", effect="write", idempotency="keyed", cost=6)
def resize(args: HostIn) -> HostOut:
    """Resize a host, at a cost of 6."""
    return HostOut(host=args.host, up=True)


class AskFirst:
    """Require a person's approval for every step on one host."""

    id = "ask-first"

    def __init__(self, host: str) -> None:
        self.host = host

    def evaluate(self, request: DecisionRequest) -> Decision | None:
        if request.args.get("host") == self.host:
            return Decision(
                verdict=Verdict.REQUIRE_APPROVAL,
                rule_ids=(self.id,),
                reasons=("a person checks it",),
            )
        return None


@pytest.fixture
def approving(tmp_path: Path) -> Iterator[tether.Tether]:
    """An app where alice may approve; resizes of host `big` need her."""
    config = tmp_path / "tether.yaml"
    config.write_text("approvers: {alice: [ops]}\n")
    with temporary_app(config=config, clock=FakeClock()) as app:
        app.register(resize)
        app.add_policy(AskFirst("big"))
        app.register_planner(
            "resizes",
            ScriptedPlanner(
                [
                    ("infra.resize", {"host": "big"}),
                    ("infra.resize", {"host": "a"}),
                    ("infra.resize", {"host": "b"}),
                ],
                stop_on_error=True,
            ),
        )
        yield app


def _park_approve_resume(
    app: tether.Tether, principal: tether.Principal, **start: Any
) -> tether.Run:
    """Start a run that parks on its first step, approve it, and resume the run."""
    parked = app.start("resize", planner="resizes", principal=principal, **start)
    assert parked.status is tether.RunState.AWAITING_APPROVAL
    (request,) = app.approvals(status="pending")
    app.approve(request.id, by="alice")
    return app.resume(parked.id)


def test_a_resumed_run_keeps_its_budget(
    approving: tether.Tether, principal: tether.Principal
) -> None:
    """A run parked for approval and resumed still refuses a plan past its budget."""
    run = _park_approve_resume(approving, principal, budget=10)

    recorded = events(approving, run.id)
    assert run.status is tether.RunState.FAILED
    assert (run.budget, run.cost) == (Decimal(10), Decimal(6))
    assert sum(e["kind"] == "executed" for e in recorded) == 1
    assert recorded[0]["budget"] == "10"
    admitted = [e for e in recorded if e["kind"] == "plan_admitted"]
    assert admitted[-1]["status"] == "refused"


def test_a_resumed_run_keeps_its_max_steps(
    approving: tether.Tether, principal: tether.Principal
) -> None:
    """A run parked for approval and resumed still stops at its `max_steps`."""
    run = _park_approve_resume(approving, principal, max_steps=2)

    recorded = events(approving, run.id)
    assert run.status is tether.RunState.FAILED
    assert recorded[0]["max_steps"] == 2
    assert sum(e["kind"] == "executed" for e in recorded) == 2
    assert finished(approving, run.id)["error_code"] == "max_steps_exceeded"
