"""Replay of runs that met a breaker other runs moved.

A breaker is shared: other runs' failures open it, another run's trial call
closes it. Their outcomes are not in the replayed run's record, but where the
breaker stood is: a step that met it not closed recorded `breaker_checked`
(open, or half-open with its trial), and a step that passed a closed one
recorded none. The replay puts the breaker there, so an unchanged system
replays the same, and a changed degraded mode or a removed breaker still shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
from tether.record import OutcomeStatus
from tether.replay import RecordedRun, Replayer
from tether.testing import FakeClock

BOT = tether.Principal("ops-bot", tenant="acme")
BREAKER = (
    "breakers:\n"
    "  - {{id: k8s, resource: k8s, window: 4, min_calls: 2, failure_rate: 0.5,\n"
    "     open_for: 30s, half_open_calls: 1, on_open: {mode}}}\n"
)


class Restart(BaseModel):
    service: str


class Restarted(BaseModel):
    ok: bool


UPSTREAM = {"up": False}


@tether.capability("k8s.restart", effect="write", idempotency="keyed", resource="k8s")
def restart(args: Restart) -> Restarted:
    if not UPSTREAM["up"]:
        raise ConnectionError("k8s API: 503")
    return Restarted(ok=True)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tether.Tether]:
    (tmp_path / "tether.yaml").write_text(BREAKER.format(mode="read_only"))
    UPSTREAM["up"] = False
    opened = tether.Tether(
        db=f"sqlite:///{tmp_path / 'r.db'}",
        config=tmp_path / "tether.yaml",
        clock=FakeClock(),
        env={},
    )
    opened.register(restart)
    yield opened
    opened.close()


def _open_the_breaker(app: tether.Tether) -> str:
    with app.run(principal=BOT, request="restart, failing") as run:
        statuses = [run.step("k8s.restart", {"service": s}).status for s in "ab"]
    assert statuses == [OutcomeStatus.FAILED, OutcomeStatus.FAILED]
    return run.id


def _replay(app: tether.Tether, run_id: str) -> list[str]:
    report = Replayer(app).replay(RecordedRun.from_store(app.store, run_id))
    return [d.describe() for d in report.divergences]


def _advance(app: tether.Tether, seconds: int) -> None:
    clock = app.clock
    assert isinstance(clock, FakeClock)
    clock.advance(timedelta(seconds=seconds))


def test_a_step_refused_by_a_breaker_another_run_opened_replays_the_same(
    app: tether.Tether,
) -> None:
    opener = _open_the_breaker(app)
    with app.run(principal=BOT, request="restart api") as run:
        refused = run.step("k8s.restart", {"service": "api"})

    assert refused.status is OutcomeStatus.REFUSED
    assert isinstance(refused.error, tether.BreakerOpen)
    assert _replay(app, run.id) == []
    assert _replay(app, opener) == []


def test_a_trial_call_and_the_steps_after_it_replay_the_same(
    app: tether.Tether,
) -> None:
    """A run meets the breaker open, then (after another run's trial call
    closed it) passes it: both steps replay as recorded."""
    _open_the_breaker(app)
    with app.run(principal=BOT, request="waits out the breaker") as waiting:
        first = waiting.step("k8s.restart", {"service": "api"})
        _advance(app, 31)
        UPSTREAM["up"] = True
        with app.run(principal=BOT, request="the trial call") as trial:
            probe = trial.step("k8s.restart", {"service": "db"})
        second = waiting.step("k8s.restart", {"service": "api"})

    kinds = [e.data()["kind"] for e in app.store.events(trial.id)]
    assert "breaker_checked" in kinds  # admitted as the trial call
    assert (first.status, probe.status, second.status) == (
        OutcomeStatus.REFUSED,
        OutcomeStatus.EXECUTED,
        OutcomeStatus.EXECUTED,
    )
    assert _replay(app, trial.id) == []
    assert _replay(app, waiting.id) == []


def test_a_changed_mode_or_a_removed_breaker_still_shows(
    app: tether.Tether, tmp_path: Path
) -> None:
    _open_the_breaker(app)
    with app.run(principal=BOT, request="restart api") as run:
        assert run.step("k8s.restart", {"service": "api"}).status is (
            OutcomeStatus.REFUSED
        )
    recorded = RecordedRun.from_store(app.store, run.id)

    escalate = tmp_path / "escalate.yaml"
    escalate.write_text(BREAKER.format(mode="escalate"))
    by_mode = Replayer.for_file(app, escalate, mode="verify").replay(recorded)
    none = tmp_path / "none.yaml"
    none.write_text("rules: []\n")
    unguarded = Replayer.for_file(app, none, mode="verify").replay(recorded)

    assert not by_mode.ok  # escalate asks a person instead of refusing
    assert not unguarded.ok  # no breaker: the call would have gone ahead
