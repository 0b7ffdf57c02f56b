"""Planner-driven runs: `register_planner`, `start`, and parking on a person's approval."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
from tether.run import RunState
from tether.testing import FakeClock


class RefundIn(BaseModel):
    cents: int


class RefundOut(BaseModel):
    refunded: int


done: list[int] = []


def _preview(args: RefundIn) -> RefundOut:
    return RefundOut(refunded=args.cents)


@tether.capability("pay.refund", effect="write", idempotency="keyed", dry_run=_preview)
def refund(args: RefundIn) -> RefundOut:
    """Refund a customer."""
    done.append(args.cents)
    return RefundOut(refunded=args.cents)


BOT = tether.Principal("bot", on_behalf_of="carol")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tether.Tether]:
    config = tmp_path / "tether.yaml"
    config.write_text(
        "rules:\n"
        "  - {id: big, match: {capability: pay.refund}, when: 'args.cents > 100',\n"
        "     decision: require_approval, reason: big refunds need finance, "
        "approvers: [finance]}\n"
        "approvers: {alice: [finance]}\n"
    )
    done.clear()
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 't.db'}?synchronous=normal",
        config=config,
        clock=FakeClock(),
        env={},
    ) as app:
        app.register(refund)
        app.register_planner(
            "refunds",
            tether.ScriptedPlanner(
                [("pay.refund", {"cents": 50}), ("pay.refund", {"cents": 500})]
            ),
        )
        yield app


def test_start_runs_a_registered_planner_to_the_end(app: tether.Tether) -> None:
    """Small refunds need nobody: the run succeeds and every step ran once."""
    app.register_planner(
        "small", tether.ScriptedPlanner([("pay.refund", {"cents": 10})])
    )

    run = app.start("refund 10", planner="small", principal=BOT)

    assert run.status is RunState.SUCCEEDED
    assert done == [10]
    assert app.verify(run.id).ok


def test_a_step_that_needs_a_person_parks_the_run(app: tether.Tether) -> None:
    """The run stops in awaiting_approval with a durable request; nothing after it ran."""
    run = app.start("refund two", planner="refunds", principal=BOT)

    assert run.status is RunState.AWAITING_APPROVAL
    assert done == [50]  # the small one ran; the big one waits
    (request,) = app.approvals(status="pending")
    assert request.run_id == run.id
    assert request.capability == "pay.refund"
    assert app.store.get_run(run.id).status == "awaiting_approval"
    kinds = [e.data()["kind"] for e in app.store.events(run.id)]
    assert kinds[-2:] == ["failed", "run_status"]
    assert "run_finished" not in kinds
    assert app.verify(run.id).ok


def test_a_parked_runs_request_can_be_decided_and_recorded(app: tether.Tether) -> None:
    """Approving the parked run's request records the decision in it (resume comes later)."""
    run = app.start("refund two", planner="refunds", principal=BOT)
    (request,) = app.approvals(status="pending")

    app.approve(request.id, by="alice", note="checked the order")

    kinds = [e.data()["kind"] for e in app.store.events(run.id)]
    assert kinds[-1] == "approval_decided"
    assert app.verify(run.id).ok


def test_planners_are_registered_once_and_by_name(app: tether.Tether) -> None:
    """A taken name, a nameless or a non-planner is refused; an unknown name says which exist."""
    planner = tether.ScriptedPlanner([])
    with pytest.raises(tether.UsageError, match="taken"):
        app.register_planner("refunds", planner)
    with pytest.raises(tether.UsageError, match="not a planner"):
        app.register_planner("odd", object())  # type: ignore[arg-type]
    with pytest.raises(tether.NotFound, match="refunds"):
        app.start("x", planner="nope", principal=BOT)
