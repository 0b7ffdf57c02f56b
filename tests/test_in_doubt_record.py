"""A step in doubt that reserved nothing: its record says so without an empty `limit_settled`.

Before 2026-12-03 the settle stage wrote a `limit_settled` event with no limits
for every step in doubt (or cut off) that reserved nothing: an event saying
nothing, on every such step. Records holding one still replay the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
from tether import _guards, record
from tether.limits import Reserved
from tether.record import OutcomeStatus
from tether.replay import RecordedRun, Replayer

BOT = tether.Principal("ops-bot", tenant="acme")


class Hit(BaseModel):
    target: str


@tether.capability("pager.page", effect="write", idempotency="none")
def page(args: Hit) -> Hit:
    """A `none` write whose upstream hangs up after the call started."""
    raise ConnectionResetError(f"{args.target}: connection reset by peer")


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tether.Tether]:
    db = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/t.db"
    with tether.Tether(db=db) as app:
        app.register(page)
        yield app


def _kinds(app: tether.Tether, run_id: str) -> list[str]:
    return [json.loads(e.body)["kind"] for e in app.store.events(run_id)]


def test_a_step_in_doubt_that_reserved_nothing_records_no_limit_settled(
    app: tether.Tether,
) -> None:
    with app.run(principal=BOT, request="page") as run:
        outcome = run.step("pager.page", {"target": "oncall"})

    assert outcome.status is OutcomeStatus.IN_DOUBT
    assert _kinds(app, run.id) == [
        "run_started",
        "run_status",
        "validated",
        "decided",
        "intent",
        "in_doubt",
        "run_status",
        "run_finished",
    ]


def test_a_record_from_before_with_an_empty_limit_settled_replays_the_same(
    app: tether.Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The older record is made by the settle stage as it was; today's replay finds no divergence."""
    real = _guards.settlements

    def as_before(
        run_id: str,
        reserved: Sequence[Reserved],
        number: int,
        end: datetime,
        actual: Decimal | None,
        in_doubt: bool,
        *,
        keep_leases: bool = False,
    ) -> tuple[list[object], list[record.Event]]:
        settles, events = real(
            run_id, reserved, number, end, actual, in_doubt, keep_leases=keep_leases
        )
        if in_doubt and not reserved:
            events = [record.LimitSettled(at=end, step=number, limits=())]
        return list(settles), events

    monkeypatch.setattr(_guards, "settlements", as_before)
    with app.run(principal=BOT, request="page") as run:
        run.step("pager.page", {"target": "oncall"})
    monkeypatch.undo()
    assert "limit_settled" in _kinds(app, run.id)  # the older shape, as recorded

    report = Replayer(app).replay(RecordedRun.from_store(app.store, run.id))

    assert report.ok, report.to_json()
    assert report.divergences == []
