"""Review of the check before a planner turn (`Run.check_turn_room`), live and replayed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether import record
from tether.agent import PlannerInput, Proposal, ProposedStep, Usage, run_agent
from tether.replay import RecordedRun, Replayer
from tether.testing import FakeClock, write_config


class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    saved: bool


@tether.capability("notes.save", effect="write", idempotency="keyed", cost=10)
def save(args: NoteIn) -> NoteOut:
    """Save a note."""
    return NoteOut(saved=True)


BOT = tether.Principal("planner-bot", tenant="acme")
OTHER = tether.Principal("other-bot", tenant="acme")

LIMITS = (
    "defaults: {write: allow}\n"
    "approvers: {alice: [ops]}\n"
    "limits:\n"
    "  - {id: tenant-spend, kind: budget, scope: tenant, per: day, amount: 100}\n"
)


def _app(tmp_path: Path, db: str, limits: str = LIMITS) -> tether.Tether:
    config = tmp_path / "tether.yaml"
    config.write_text(limits)
    app = tether.Tether(db=db, config=config, clock=FakeClock(), env={})
    app.register(save)
    return app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tether.Tether]:
    with _app(tmp_path, f"sqlite:///{tmp_path / 't.db'}") as app:
        yield app


class Paid:
    """Each turn costs `cost` and proposes one note; it never finishes."""

    def __init__(self, cost: int, tag: str = "") -> None:
        self.cost = cost
        self.tag = tag
        self.turns = 0

    def propose(self, state: PlannerInput) -> Proposal:
        self.turns += 1
        step = ProposedStep(
            capability="notes.save", args={"text": f"{self.tag}{self.turns}"}
        )
        return Proposal(steps=(step,), usage=Usage(cost=Decimal(self.cost)))


def _kinds(app: tether.Tether, run_id: str) -> list[str]:
    return [e.data()["kind"] for e in app.store.events(run_id)]


def _replays_the_same(app: tether.Tether, run_id: str) -> None:
    report = Replayer(app).replay(RecordedRun.from_store(app.store, run_id))
    assert report.ok, report.divergences


# -- a free planner ---------------------------------------------------------------


def test_a_free_planner_finishes_a_run_whose_steps_spent_its_own_budget(
    app: tether.Tether,
) -> None:
    """Steps that spend the run's budget exactly leave a free planner its `finish`."""
    planner = tether.ScriptedPlanner([("notes.save", {"text": "a"})])
    run = run_agent(app, planner, principal=BOT, request="one note", budget=10)

    assert run.status == "succeeded", app.store.get_run(run.id).error_code
    assert "limit_refused" not in _kinds(app, run.id)
    _replays_the_same(app, run.id)


def test_a_free_planner_finishes_when_its_steps_spent_a_budget_of_every_capability(
    tmp_path: Path,
) -> None:
    limits = (
        "defaults: {write: allow}\n"
        "limits:\n"
        '  - {id: per-run, kind: budget, capability: "*", scope: run, per: run, amount: 20}\n'
    )
    with _app(tmp_path, f"sqlite:///{tmp_path / 't.db'}", limits) as app:
        planner = tether.ScriptedPlanner(
            [("notes.save", {"text": "a"}), ("notes.save", {"text": "b"})]
        )
        run = run_agent(app, planner, principal=BOT, request="two notes")

        assert run.status == "succeeded", app.store.get_run(run.id).error_code
        _replays_the_same(app, run.id)


def test_a_paid_planner_is_still_stopped_when_its_steps_spent_the_budget(
    app: tether.Tether,
) -> None:
    """A planner whose turns cost something gets no turn past a spent budget."""
    planner = Paid(0)
    planner.cost = 1
    run = run_agent(app, planner, principal=BOT, request="x", budget=11, max_steps=9)

    # turn 1 (1) and its note (10) spend the 11: no turn 2
    assert planner.turns == 1
    assert run.status == "failed"
    assert app.store.get_run(run.id).error_code == "limit_exceeded"
    _replays_the_same(app, run.id)


# -- a budget other runs spent ------------------------------------------------------


def test_replay_of_a_turn_refused_by_other_runs_spending_finds_no_divergence(
    app: tether.Tether, tmp_path: Path
) -> None:
    """A tenant's budget spent by another run refuses this run's turn; replay agrees."""
    run_agent(app, Paid(45), principal=OTHER, request="spend", max_steps=20)
    late = run_agent(app, Paid(45), principal=BOT, request="late", max_steps=20)

    assert late.status == "failed"
    assert "limit_refused" in _kinds(app, late.id)
    recorded = RecordedRun.from_store(app.store, late.id)
    _replays_the_same(app, late.id)

    # a bigger budget would have let the turn be taken: that is a divergence
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(LIMITS.replace("amount: 100", "amount: 1000"))
    changed = Replayer.for_file(app, bigger, mode="verify").replay(recorded)
    assert [(d.kind, d.recorded) for d in changed.divergences][:1] == [
        ("missing", "limit_refused (limit tenant-spend)")
    ]


def test_a_resumed_run_whose_budget_was_spent_while_parked_is_stopped(
    app: tether.Tether,
) -> None:
    """Another run spends the tenant's budget while this one waits for a person."""

    class AskFirst:
        id = "ask-first"

        def evaluate(self, request: Any) -> tether.Decision | None:
            if request.args.get("text") == "1":
                return tether.Decision(
                    verdict=tether.Verdict.REQUIRE_APPROVAL,
                    rule_ids=(self.id,),
                    reasons=("a person checks it",),
                )
            return None

    app.add_policy(AskFirst())
    app.register_planner("paid", Paid(5))
    parked = app.start("notes", planner="paid", principal=BOT)
    assert parked.status is tether.RunState.AWAITING_APPROVAL
    run_agent(app, Paid(45, "o"), principal=OTHER, request="spend", max_steps=20)
    (request,) = app.approvals(status="pending")
    app.approve(request.id, by="alice")

    run = app.resume(parked.id)

    assert run.status is tether.RunState.FAILED
    assert app.store.get_run(run.id).error_code == "limit_exceeded"
    _replays_the_same(app, run.id)


def test_a_day_budget_spent_yesterday_leaves_room_today(app: tether.Tether) -> None:
    clock = app.clock
    assert isinstance(clock, FakeClock)
    run_agent(app, Paid(100), principal=OTHER, request="spend", max_steps=3)
    refused = run_agent(app, Paid(5), principal=BOT, request="x", max_steps=3)
    assert app.store.get_run(refused.id).error_code == "limit_exceeded"
    message = [e.data() for e in app.store.events(refused.id)][-1]["message"]
    assert "its window turns" in message

    clock.advance(timedelta(days=1))
    planner = Paid(5)
    run = run_agent(app, planner, principal=BOT, request="x", max_steps=3)
    assert planner.turns >= 2  # the new day's window has room
    _replays_the_same(app, run.id)


# -- PostgreSQL -------------------------------------------------------------------


def test_the_turn_check_reads_the_counter_on_postgres(
    tmp_path: Path, postgres_url: str
) -> None:
    with _app(tmp_path, postgres_url) as app:
        run_agent(app, Paid(45), principal=OTHER, request="spend", max_steps=20)
        late = run_agent(app, Paid(45), principal=BOT, request="late", max_steps=20)

        assert app.store.get_run(late.id).error_code == "limit_exceeded"
        refused = next(
            e.data()
            for e in app.store.events(late.id)
            if e.data()["kind"] == "limit_refused"
        )
        assert (refused["limit"], refused["used"]) == ("tenant-spend", "100")
        _replays_the_same(app, late.id)


# -- records made before the check ------------------------------------------------


def _record_without_turn_checks(app: tether.Tether, turns: int) -> str:
    """Drive a paid planner as the agent loop did before it checked a turn's room.

    Each turn costs 40 and proposes one note (10): past the tenant's 100 after
    two turns, the record goes on taking turns (its notes refused by the limit).
    """
    run = app.run(principal=BOT, request="notes")
    run.planner = "Paid"
    run.max_steps = turns
    with run:
        for turn in range(1, turns + 1):
            if run.status is not tether.RunState.PLANNING:
                run.transition(tether.RunState.PLANNING)
            run.charge_usage(Decimal(40), model="m")
            step = ProposedStep(capability="notes.save", args={"text": str(turn)})
            run.append(
                record.PlanProposed(
                    at=run.clock.now(),
                    planner="Paid",
                    steps=(step.describe(),),
                    finish=False,
                    answer=None,
                )
            )
            admission = run.admit([("notes.save", {"text": str(turn)})])
            assert admission.admitted
            run.transition(tether.RunState.EXECUTING)
            run.step("notes.save", {"text": str(turn)})
    return run.id


def test_a_record_made_before_turns_were_checked_replays_without_divergence(
    app: tether.Tether, tmp_path: Path
) -> None:
    """Under the settings it was made with, an older record's turns are not refused."""
    run_id = _record_without_turn_checks(app, turns=4)
    recorded = RecordedRun.from_store(app.store, run_id)
    assert sum(e["kind"] == "usage_charged" for e in recorded.events) == 4

    same = Replayer(app).replay(recorded)
    assert same.ok, same.divergences
    assert any("predates the check before a turn" in n for n in same.notes)

    # under other settings the refusal is today's answer: a divergence
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(LIMITS.replace("amount: 100", "amount: 90"))
    changed = Replayer.for_file(app, stricter, mode="verify").replay(recorded)
    assert ("extra", "limit_refused (limit tenant-spend)") in [
        (d.kind, d.now) for d in changed.divergences
    ]


# -- hot reload -------------------------------------------------------------------


def test_a_budget_raised_in_the_file_applies_at_the_next_turn(tmp_path: Path) -> None:
    """A run refused at its first turn takes no step, so nothing else reloads the file.

    Before: the raised budget applied only once some step reloaded the policy;
    every planner-driven run kept failing on the old amount.
    """
    with _app(tmp_path, f"sqlite:///{tmp_path / 't.db'}") as app:
        config = app.config_path
        assert config is not None
        run_agent(app, Paid(45, "o"), principal=OTHER, request="spend", max_steps=20)
        refused = run_agent(app, Paid(45), principal=BOT, request="x", max_steps=2)
        assert app.store.get_run(refused.id).error_code == "limit_exceeded"

        write_config(config, LIMITS.replace("amount: 100", "amount: 1000"))
        planner = Paid(45)
        run = run_agent(app, planner, principal=BOT, request="x", max_steps=2)

        assert planner.turns == 3  # two notes, then a third the step limit stops
        assert app.store.get_run(run.id).error_code == "max_steps_exceeded"
