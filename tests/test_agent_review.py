"""The agent loop under hostile planners, plans that break mid-way, resumes and model usage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether import record
from tether.agent import PlannerInput, Proposal, ProposedStep, Usage, run_agent
from tether.record import OutcomeStatus
from tether.run import RunState
from tether.testing import FakeClock

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")


class RefundIn(BaseModel, extra="forbid"):
    order: str
    cents: int


class RefundOut(BaseModel):
    refunded: int


done: list[str] = []


@tether.capability(
    "pay.refund", effect="write", idempotency="keyed", cost=lambda a: a.cents
)
def refund(args: RefundIn) -> RefundOut:
    """Refund an order; order `boom` fails upstream."""
    if args.order == "boom":
        raise RuntimeError("the payments API said no")
    done.append(args.order)
    return RefundOut(refunded=args.cents)


BOT = tether.Principal("bot", tenant="acme", on_behalf_of="carol")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tether.Tether]:
    config = tmp_path / "tether.yaml"
    config.write_text(
        "rules:\n"
        "  - {id: big, match: {capability: pay.refund}, when: 'args.cents > 100',\n"
        "     decision: require_approval, reason: big refunds need finance,\n"
        "     approvers: [finance]}\n"
        "approvers: {alice: [finance]}\n"
        "limits:\n"
        "  - {id: model-spend, kind: budget, scope: tenant, per: day, amount: 1000,"
        " capability: llm}\n"
    )
    done.clear()
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 't.db'}",
        config=config,
        clock=FakeClock(),
        env={},
    ) as app:
        app.register(refund)
        yield app


class Turns:
    """A planner that answers each turn with the next function of a list, keeping what it saw."""

    def __init__(self, *turns: Callable[[PlannerInput], Proposal]) -> None:
        self.turns = turns
        self.seen: list[PlannerInput] = []

    def propose(self, state: PlannerInput) -> Proposal:
        self.seen.append(state)
        turn = self.turns[min(len(self.seen), len(self.turns)) - 1]
        return turn(state)


def _step(order: str, cents: int) -> ProposedStep:
    return ProposedStep(capability="pay.refund", args={"order": order, "cents": cents})


def _events(
    app: tether.Tether, run_id: str, kind: str | None = None
) -> list[dict[str, Any]]:
    found = [e.data() for e in app.store.events(run_id)]
    return found if kind is None else [e for e in found if e["kind"] == kind]


# -- a plan that also says `finish` ---------------------------------------------------


@pytest.mark.parametrize(
    ("first", "code"),
    [
        pytest.param(_step("boom", 10), "capability_failed", id="a-step-fails"),
        pytest.param(
            _step("o-big", 500), "approval_required", id="a-step-needs-approval"
        ),
    ],
)
def test_a_plan_meant_to_finish_re_plans_when_a_step_does_not_produce_an_output(
    app: tether.Tether, first: ProposedStep, code: str
) -> None:
    """Steps plus `finish` end the run only when every step ran; a broken plan goes back to the planner."""
    planner = Turns(
        lambda s: Proposal(
            steps=(first, _step("o-2", 20)), finish=True, answer="both refunded"
        ),
        lambda s: Proposal(finish=True, gave_up=True, answer="could not refund"),
    )

    run = run_agent(app, planner, principal=BOT, request="refund two orders")

    assert len(planner.seen) == 2  # the planner was told, not skipped
    (seen,) = planner.seen[1].observations
    assert seen.error_code == code
    assert done == []  # the second step counted on the first: never taken
    assert run.status is RunState.FAILED
    (finished,) = _events(app, run.id, "run_finished")
    assert finished["error_code"] == "planner_gave_up"


# -- garbage from a planner -----------------------------------------------------------


def _once(proposal: Callable[[], Proposal]) -> Callable[[PlannerInput], Proposal]:
    return lambda state: proposal()


GARBAGE: dict[str, Callable[[], Proposal]] = {
    "answer-not-text": lambda: Proposal(finish=True, answer=123),  # type: ignore[arg-type]
    "finish-not-bool": lambda: Proposal(finish="yes"),  # type: ignore[arg-type]
    "usage-not-usage": lambda: Proposal(finish=True, usage={"cost": 1}),  # type: ignore[arg-type]
    "tokens-not-int": lambda: Proposal(
        finish=True,
        usage=Usage(cost=Decimal(1), input_tokens="lots"),  # type: ignore[arg-type]
    ),
    "tokens-negative": lambda: Proposal(
        finish=True, usage=Usage(cost=Decimal(1), output_tokens=-3)
    ),
    "model-not-text": lambda: Proposal(
        finish=True,
        usage=Usage(cost=Decimal(1), model=5),  # type: ignore[arg-type]
    ),
    "cost-a-float": lambda: Proposal(
        finish=True,
        usage=Usage(cost=0.5),  # type: ignore[arg-type]
    ),
    "rationale-not-text": lambda: Proposal(
        steps=(
            ProposedStep(
                capability="pay.refund",
                args={"order": "o-1", "cents": 1},
                rationale=object(),  # type: ignore[arg-type]
            ),
        )
    ),
    "key-not-text": lambda: Proposal(
        steps=(
            ProposedStep(
                capability="pay.refund",
                args={"order": "o-1", "cents": 1},
                idempotency_key=7,  # type: ignore[arg-type]
            ),
        )
    ),
    "dry-run-not-bool": lambda: Proposal(
        steps=(
            ProposedStep(
                capability="pay.refund",
                args={"order": "o-1", "cents": 1},
                dry_run="no",  # type: ignore[arg-type]
            ),
        )
    ),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_a_malformed_proposal_fails_the_run_with_its_reason_and_leaves_a_readable_record(
    app: tether.Tether, garbage: Callable[[], Proposal]
) -> None:
    """Wrong types from a planner are a usage error recorded as the run's failure; nothing odd is recorded or run."""
    planner = Turns(_once(garbage))

    with pytest.raises(tether.UsageError) as raised:
        run_agent(app, planner, principal=BOT, request="refund")

    (row,) = app.store.list_runs()
    (finished,) = _events(app, row.run_id, "run_finished")
    assert (row.status, finished["error_code"]) == ("failed", "usage_error")
    assert finished["message"] == raised.value.message
    for event in app.store.events(row.run_id):
        record.decode(event.body)  # every event is one this tether can read back
    assert _events(app, row.run_id, "usage_charged") == []
    assert _events(app, row.run_id, "plan_proposed") == []
    assert done == []


# -- resume sees what the planner saw -----------------------------------------------


class Replanner:
    """Both refunds at once; if admission refuses that plan, only the one that fits."""

    def propose(self, state: PlannerInput) -> Proposal:
        if not state.observations:
            return Proposal(steps=(_step("o-1", 300), _step("o-2", 300)))
        if state.observations[-1].admission is not None:  # refused: nothing ran
            return Proposal(steps=(_step("o-1", 300),))
        return Proposal(finish=True, answer="o-1 refunded")


def test_a_resumed_planner_sees_a_refused_plan_as_it_did_before_parking(
    app: tether.Tether,
) -> None:
    """A refused plan's observation read back from the record holds its admission and args, so the approved step runs."""
    app.register_planner("re", Replanner())
    run = app.start("refund", planner="re", principal=BOT, budget=400)
    assert run.status is RunState.AWAITING_APPROVAL
    (request,) = app.approvals(status="pending")
    app.approve(request.id, by="alice")

    resumed = app.resume(run.id)

    assert resumed.status is RunState.SUCCEEDED
    assert done == ["o-1"]
    (refused, executed) = tether.agent.loop.observations_from(app.store.events(run.id))
    assert refused.admission is not None
    assert refused.admission.status == "refused"
    assert refused.admission.total_cost == 600
    assert refused.admission.budget_left == 400
    assert refused.args == {"order": "o-2", "cents": 300}
    assert refused.error_message == refused.admission.message
    assert (executed.status, executed.output) == (
        OutcomeStatus.EXECUTED,
        {"refunded": 300},
    )


# -- model usage across a SIGKILL ----------------------------------------------------

AGENT = textwrap.dedent(
    """
    import os, sys, time
    from decimal import Decimal
    from pathlib import Path
    from pydantic import BaseModel
    import tether
    from tether.agent import Proposal, ProposedStep, Usage

    HERE = Path(os.environ["AGENT_HOME"])

    class StepIn(BaseModel):
        n: int

    class StepOut(BaseModel):
        n: int

    @tether.capability("ops.step", effect="write", idempotency="keyed")
    def step(args: StepIn, ctx: tether.CallContext) -> StepOut:
        with open(HERE / "calls", "a") as f:
            f.write(f"{args.n} {ctx.idempotency_key}\\n")
        if args.n == 1 and os.environ.get("AGENT_HANG"):
            time.sleep(60)  # the parent SIGKILLs us here
        return StepOut(n=args.n)

    class Thinker:
        def propose(self, state):
            usage = Usage(cost=Decimal(5), input_tokens=100, output_tokens=10, model="m")
            done = [o for o in state.observations if o.ok]
            if len(done) == 3:
                return Proposal(finish=True, answer="3 steps", usage=usage)
            step = ProposedStep(capability="ops.step", args={"n": len(done)})
            return Proposal(steps=(step,), usage=usage)

    app = tether.Tether(db=f"sqlite:///{HERE / 'agent.db'}", config=HERE / "tether.yaml")
    app.register(step)
    app.register_planner("thinker", Thinker())

    if __name__ == "__main__":
        app.start("three steps", planner="thinker",
                  principal=tether.Principal("bot", tenant="acme"))
    """
)


def test_model_usage_survives_a_sigkill_and_is_charged_once_per_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed mid-step and resumed charges each planner turn once: record, budget and `tether status` agree."""
    (tmp_path / "agent_app.py").write_text(AGENT)
    (tmp_path / "tether.yaml").write_text(
        "idempotency: {claim_ttl: 1s}\n"
        "limits:\n"
        "  - {id: model-spend, kind: budget, scope: tenant, per: day, amount: 1000,"
        " capability: llm}\n"
    )
    env = {
        **os.environ,
        "AGENT_HOME": str(tmp_path),
        "PYTHONPATH": str(tmp_path),
        "AGENT_HANG": "1",
    }
    agent = subprocess.Popen(  # our interpreter, our script
        [sys.executable, str(tmp_path / "agent_app.py")], env=env
    )
    try:
        deadline = time.monotonic() + 30
        calls = tmp_path / "calls"
        while not (calls.exists() and "1 " in calls.read_text()):
            assert agent.poll() is None, "the agent ended before its second step"
            assert time.monotonic() < deadline, (
                "the agent never reached its second step"
            )
            time.sleep(0.02)
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()

    env.pop("AGENT_HANG")
    monkeypatch.setenv("AGENT_HOME", str(tmp_path))
    sys.path.insert(0, str(tmp_path))
    try:
        import agent_app  # type: ignore[import-not-found]  # the script above

        resumer: tether.Tether = agent_app.app
        deadline = time.monotonic() + 30
        while not (ready := resumer.ready_runs()):  # its lease runs out after 1 s
            assert time.monotonic() < deadline, "the killed run never became ready"
            time.sleep(0.05)
        (run_id,) = ready
        run = resumer.resume(run_id)
        events = _events(resumer, run_id)
        status = subprocess.run(
            [
                CLI,
                "status",
                "--json",
                "--db",
                f"sqlite:///{tmp_path / 'agent.db'}",
                "--config",
                str(tmp_path / "tether.yaml"),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        resumer.close()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("agent_app", None)

    assert run.status is RunState.SUCCEEDED
    executed = Counter(e["output"]["n"] for e in events if e["kind"] == "executed")
    assert executed == {0: 1, 1: 1, 2: 1}  # none twice, none skipped
    keys = [line.split()[1] for line in calls.read_text().splitlines()]
    assert len(set(keys)) == 3  # the cut-off step ran again under its own key
    charged = [Decimal(e["cost"]) for e in events if e["kind"] == "usage_charged"]
    proposed = [e for e in events if e["kind"] == "plan_proposed"]
    assert len(charged) == len(proposed) == 5  # 2 turns before the kill, 3 after
    assert run.cost == sum(charged) == 25
    (limit,) = json.loads(status.stdout)["limits"]
    assert limit["id"] == "model-spend"
    assert sum(Decimal(c["used"]) for c in limit["counters"]) == 25
