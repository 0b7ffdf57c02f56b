"""A look for ready runs reads parked runs a page at a time, and only as far as it needs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether._ready import ReadyRuns
from tether.store import RunRow
from tether.testing import FakeClock

CONFIG = """
rules:
  - {id: big, match: {capability: pay.refund}, when: "args.cents > 100",
     decision: require_approval, reason: big refunds need finance, approvers: [finance]}
approvers: {alice: [finance]}
"""

PARKED = 30
"""Runs parked awaiting approval in each test."""


class Cents(BaseModel):
    cents: int


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tether.Tether]:
    """An app with `PARKED` runs awaiting approval, created a millisecond apart."""
    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    db = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 't.db'}"
    clock = FakeClock(tick=timedelta(milliseconds=1))
    with tether.Tether(db=db, config=config, clock=clock, env={}) as app:

        @tether.capability("pay.refund", effect="write", idempotency="keyed")
        def refund(args: Cents) -> Cents:
            return args

        app.register(refund)
        for n in range(PARKED):  # each its own call, so each its own request
            app.register_planner(
                f"big{n}", tether.ScriptedPlanner([("pay.refund", {"cents": 500 + n})])
            )
            app.start("refund", planner=f"big{n}", principal=tether.Principal("bot"))
        yield app


def parked(app: tether.Tether) -> list[str]:
    """Return the parked runs, oldest first."""
    rows = app.store.list_runs(status="awaiting_approval", limit=1000)
    return [r.run_id for r in reversed(rows)]


def approve(app: tether.Tether, run_ids: list[str]) -> None:
    """Approve the request each of `run_ids` waits on."""
    for a in app.approvals(status="pending", limit=1000):
        if a.run_id in run_ids:
            app.approve(a.id, by="alice")


def count_rows(app: tether.Tether) -> list[int]:
    """Count the rows each `list_runs` call of `app.store` returns, from now on."""
    counts: list[int] = []
    listing: Callable[..., list[RunRow]] = app.store.list_runs

    def counted(**query: Any) -> list[RunRow]:
        rows = listing(**query)
        counts.append(len(rows))
        return rows

    app.store.list_runs = counted  # type: ignore[method-assign]  # a spy on the real store
    return counts


def test_a_look_that_finds_a_full_batch_reads_no_further(app: tether.Tether) -> None:
    """With the oldest runs ready, a look returns them after one page, not every parked row."""
    runs = parked(app)
    approve(app, runs[:3])
    look = ReadyRuns(page=5)
    read = count_rows(app)

    ready = look.look(app.store, app.clock.now(), app.guards, limit=3)

    assert ready == runs[:3]
    assert sum(read) == 5 < PARKED


def test_a_ready_run_behind_many_pages_of_waiting_ones_is_found_a_page_at_a_time(
    app: tether.Tether,
) -> None:
    """The newest parked run, approved, is found behind older waiting ones, no read holding more than a page."""
    runs = parked(app)
    approve(app, runs[-1:])
    look = ReadyRuns(page=4)
    read = count_rows(app)

    ready = look.look(app.store, app.clock.now(), app.guards, limit=100)

    assert ready == runs[-1:]
    assert max(read) == 4
    assert sum(read) == PARKED


def test_a_worker_working_through_a_backlog_reads_each_parked_run_about_once(
    app: tether.Tether,
) -> None:
    """Resuming 20 approved runs 5 a look reads the parked runs a handful of times, not once a look each."""
    runs = parked(app)
    approve(app, runs[:20])
    look = ReadyRuns(page=5)
    read = count_rows(app)

    resumed = []
    while batch := look.look(app.store, app.clock.now(), app.guards, limit=5):
        resumed += [app.resume(run_id).id for run_id in batch]

    assert resumed == runs[:20]
    assert sum(read) == 4 * 5 + (PARKED - 20)  # a page per batch, then the rest once
    assert parked(app) == runs[20:]
