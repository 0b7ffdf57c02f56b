"""A planner's model usage is a cost too: charged to the same budgets as capabilities."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
from tether.agent import PlannerInput, Proposal, ProposedStep, Usage, run_agent
from tether.testing import FakeClock


class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    saved: bool


@tether.capability("notes.save", effect="write", idempotency="keyed", cost=10)
def save(args: NoteIn) -> NoteOut:
    """Save a note."""
    return NoteOut(saved=True)


BOT = tether.Principal("planner-bot", tenant="acme")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tether.Tether]:
    config = tmp_path / "tether.yaml"
    config.write_text(
        "defaults: {write: allow}\n"
        "limits:\n"
        "  - {id: tenant-spend, kind: budget, scope: tenant, per: day, amount: 100}\n"
        "  - {id: notes-only, kind: budget, capability: notes.save, per: day, amount: 1000}\n"
    )
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 't.db'}?synchronous=normal",
        config=config,
        clock=FakeClock(),
        env={},
    ) as app:
        app.register(save)
        yield app


def _used(app: tether.Tether, limit_id: str) -> Decimal:
    rows = [r for r in app.store.limit_rows(app.clock.now()) if r.limit_id == limit_id]
    return sum((r.used for r in rows), Decimal(0))


def test_usage_is_charged_to_budgets_that_cover_the_llm(app: tether.Tether) -> None:
    with app.run(principal=BOT, request="think") as run:
        run.charge_usage(
            Decimal("12.5"), input_tokens=900, output_tokens=120, model="m"
        )
    assert _used(app, "tenant-spend") == Decimal("12.5")
    assert _used(app, "notes-only") == 0  # a budget for one capability is not charged
    kinds = [e.data() for e in app.store.events(run.id)]
    charged = next(e for e in kinds if e["kind"] == "usage_charged")
    assert charged["limits"] == ["tenant-spend"]
    assert (charged["input_tokens"], charged["output_tokens"]) == (900, 120)
    assert run.cost == Decimal("12.5")


def test_usage_over_the_budget_refuses_the_next_step(app: tether.Tether) -> None:
    with app.run(principal=BOT, request="think hard") as run:
        run.charge_usage(95)  # charged in full: the tokens were spent
        outcome = run.step("notes.save", {"text": "x"})
    assert outcome.status == "refused"
    assert isinstance(outcome.error, tether.LimitExceeded)
    assert outcome.error.limit_id == "tenant-spend"
    assert outcome.error.left == Decimal(5)


def test_a_float_cost_is_refused(app: tether.Tether) -> None:
    with (
        app.run(principal=BOT, request="x") as run,
        pytest.raises(tether.UsageError, match="never a float"),
    ):
        run.charge_usage(0.1)  # type: ignore[arg-type]


class _Thinker:
    def __init__(self) -> None:
        self.turns = 0

    def propose(self, state: PlannerInput) -> Proposal:
        self.turns += 1
        usage = Usage(cost=Decimal(30), input_tokens=1000, output_tokens=50, model="m")
        if self.turns == 1:
            step = ProposedStep(capability="notes.save", args={"text": "a"})
            return Proposal(steps=(step,), usage=usage)
        return Proposal(finish=True, answer="done", usage=usage)


def test_the_agent_loop_charges_each_turn(app: tether.Tether) -> None:
    run = run_agent(app, _Thinker(), principal=BOT, request="save a note")
    assert run.status == "succeeded"
    # two turns of 30 and one step of 10
    assert _used(app, "tenant-spend") == Decimal(70)
    assert _used(app, "notes-only") == Decimal(10)


class _Spender:
    """Each turn costs 40 and proposes one note (cost 10); it never finishes."""

    def __init__(self) -> None:
        self.turns = 0

    def propose(self, state: PlannerInput) -> Proposal:
        self.turns += 1
        step = ProposedStep(capability="notes.save", args={"text": str(self.turns)})
        return Proposal(steps=(step,), usage=Usage(cost=Decimal(40), model="m"))


def test_no_planner_turn_is_taken_once_its_budget_is_spent(
    app: tether.Tether,
) -> None:
    planner = _Spender()
    run = run_agent(app, planner, principal=BOT, request="write notes", max_steps=20)

    # turn 1: 40 + 10; turn 2: 40 + 10 = 100, the whole budget; no turn 3
    assert planner.turns == 2
    assert _used(app, "tenant-spend") == Decimal(100)
    assert run.status == "failed"
    assert app.store.get_run(run.id).error_code == "limit_exceeded"
    events = [e.data() for e in app.store.events(run.id)]
    refused = [e for e in events if e["kind"] == "limit_refused"]
    assert [(e["limit"], e.get("step"), e["used"]) for e in refused] == [
        ("tenant-spend", None, "100")
    ]
    finished = events[-1]
    assert finished["kind"] == "run_finished"
    assert "'tenant-spend'" in finished["message"]
    assert "the planner is not asked again" in finished["message"]


def test_the_turn_that_overruns_is_charged_and_is_the_last(
    app: tether.Tether,
) -> None:
    class Thinker:
        turns = 0

        def propose(self, state: PlannerInput) -> Proposal:
            self.turns += 1  # 60 a turn, and a note of 10
            step = ProposedStep(capability="notes.save", args={"text": "x"})
            return Proposal(steps=(step,), usage=Usage(cost=Decimal(60)))

    planner = Thinker()
    run = run_agent(app, planner, principal=BOT, request="think", max_steps=20)

    # 60 + 10, then 60: 130, over the 100 (the second note is refused); no turn 3
    assert planner.turns == 2
    assert _used(app, "tenant-spend") == Decimal(130)
    assert run.status == "failed"


def test_the_runs_own_budget_counts_model_usage_too(app: tether.Tether) -> None:
    planner = _Spender()
    run = run_agent(app, planner, principal=BOT, request="x", budget=30, max_steps=20)

    # turn 1 costs 40: past the run's budget of 30, so its plan is refused and
    # no turn follows
    assert planner.turns == 1
    assert run.status == "failed"
    events = [e.data() for e in app.store.events(run.id)]
    refused = next(e for e in events if e["kind"] == "limit_refused")
    assert (refused["limit"], refused["cap"], refused["used"]) == (
        "run budget",
        "30",
        "40",
    )


def test_replay_re_checks_each_turn_against_the_budget(
    app: tether.Tether, tmp_path: Path
) -> None:
    from tether.replay import RecordedRun, Replayer

    run = run_agent(app, _Spender(), principal=BOT, request="notes", max_steps=20)
    recorded = RecordedRun.from_store(app.store, run.id)

    same = Replayer(app).replay(recorded)
    assert same.ok, same.divergences

    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(
        "defaults: {write: allow}\n"
        "limits:\n"
        "  - {id: tenant-spend, kind: budget, scope: tenant, per: day, amount: 1000}\n"
        "  - {id: notes-only, kind: budget, capability: notes.save, per: day, amount: 1000}\n"
    )
    changed = Replayer.for_file(app, bigger, mode="verify").replay(recorded)
    assert [(d.step, d.kind, d.recorded) for d in changed.divergences] == [
        (None, "missing", "limit_refused (limit tenant-spend)")
    ]

    smaller = tmp_path / "smaller.yaml"
    smaller.write_text(
        bigger.read_text().replace(
            "amount: 1000}\n  - {id: notes", "amount: 50}\n  - {id: notes"
        )
    )
    stricter = Replayer.for_file(app, smaller, mode="verify").replay(recorded)
    assert (None, "extra") in [(d.step, d.kind) for d in stricter.divergences]
