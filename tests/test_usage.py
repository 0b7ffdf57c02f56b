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
