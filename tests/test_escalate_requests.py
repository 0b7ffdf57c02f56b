"""What becomes of the request an `escalate` breaker makes, once its outage is over.

An open breaker with `on_open: escalate` asks a person whether a refused call
may go past it anyway: a durable approval request (rule id `breaker:ID`). The
question is about that outage. Once the breaker closes, nobody need answer
it (the call goes through on its own), and an answer given for one outage
must not decide the same call in a later one:

- a request still pending when the breaker closes is closed `expired`: nobody
  can approve it after, through the API or the CLI;
- a grant approved but not spent (the call went through the closed, or
  half-open, breaker on its own) is withdrawn when it closes: a later outage
  asks a person anew instead of letting the call past under the old grant;
- a denial stands for its outage only: a later outage asks anew;
- a planner-driven run parked on the request is ready to resume once the
  breaker closes, and its step then runs through the closed breaker;
- an aborted run's breaker request is closed like any other (`Tether.abort`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

import _cli
import tether
from tether.errors import ApprovalClosed
from tether.store._breakers import BreakerState
from tether.testing import FakeClock

BREAKER = "up-br"
BOT = tether.Principal("ops-bot", roles=["agent"], tenant="acme")
CALL = {"n": 7}
"""The call the breaker escalates, in every test."""
CONFIG = f"""\
defaults: {{read: allow, write: allow, destructive: allow}}
breakers:
  - {{id: {BREAKER}, resource: up, window: 2, min_calls: 2, failure_rate: 0.5,
     open_for: 30s, half_open_calls: 1, on_open: escalate}}
approvers: {{alice: [sre]}}
"""
COOL_DOWN = timedelta(seconds=31)
"""Longer than `open_for`: the breaker lets a trial call through after it."""


class UpIn(BaseModel, extra="forbid"):
    n: int
    fail: bool = False


class UpOut(BaseModel):
    n: int


@dataclass
class Scene:
    """An app over a fresh store with the escalating breaker, and its upstream's calls."""

    app: tether.Tether
    clock: FakeClock
    db: str
    folder: Path
    calls: list[int] = field(default_factory=list)
    """The `n` of each call that reached the upstream."""

    def open_breaker(self) -> None:
        """Fail two calls: the breaker opens."""
        with self.app.run(principal=BOT, request="break it") as run:
            run.step("up.call", {"n": 1, "fail": True})
            run.step("up.call", {"n": 2, "fail": True})
        assert self.app.store.breaker_row(BREAKER).state is BreakerState.OPEN

    def close_breaker(self) -> None:
        """Wait out the cool-down; another call is the trial call, which closes it."""
        self.clock.advance(COOL_DOWN)
        with self.app.run(principal=BOT, request="probe") as run:
            run.call("up.call", {"n": 3})
        assert self.app.store.breaker_row(BREAKER).state is BreakerState.CLOSED

    def escalated(self) -> str:
        """Make the call while the breaker is open; return the request it parks on."""
        with self.app.run(principal=BOT, request="the call") as run:
            done = run.step("up.call", CALL)
        assert isinstance(done.error, tether.ApprovalRequired), done
        assert done.error.approval_id is not None
        return done.error.approval_id

    def call(self) -> tether.record.Outcome:
        """Make the call once more, in a run of its own; return its outcome."""
        with self.app.run(principal=BOT, request="the call again") as run:
            return run.step("up.call", CALL)

    def ran(self) -> int:
        """How many times the escalated call reached the upstream."""
        return self.calls.count(CALL["n"])


def make_app(
    db: str, config: Path, clock: FakeClock, calls: list[int]
) -> tether.Tether:
    @tether.capability("up.call", effect="write", idempotency="keyed", resource="up")
    def up_call(args: UpIn) -> UpOut:
        calls.append(args.n)
        if args.fail:
            raise ConnectionError("upstream 503")
        return UpOut(n=args.n)

    app = tether.Tether(db=db, config=config, clock=clock, env={})
    app.register(up_call)
    app.register_planner("one-call", tether.ScriptedPlanner([("up.call", CALL)]))
    return app


BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def scene(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scene]:
    with _scene(request.param, tmp_path, request.getfixturevalue) as made:
        yield made


@contextlib.contextmanager
def _scene(
    backend: str, folder: Path, fixture: Callable[[str], object]
) -> Iterator[Scene]:
    if backend == "memory":
        db = "memory://"
    elif backend == "sqlite":
        db = f"sqlite:///{folder / 'tether.db'}"
    else:
        db = str(fixture("postgres_url"))
    config = folder / "tether.yaml"
    config.write_text(CONFIG)
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    calls: list[int] = []
    with make_app(db, config, clock, calls) as app:
        yield Scene(app=app, clock=clock, db=db, folder=folder, calls=calls)


# -- a request left pending ------------------------------------------------------------------


def test_a_request_pending_when_the_breaker_closes_is_closed_with_it(
    scene: Scene,
) -> None:
    """Nobody can approve a breaker's request once the breaker closed: the call goes through on its own."""
    scene.open_breaker()
    asked = scene.escalated()
    scene.close_breaker()

    request = scene.app.approval(asked)
    assert request.status == "expired", request
    assert scene.app.approvals(status="pending") == []
    with pytest.raises(ApprovalClosed):
        scene.app.approve(asked, by="alice", note="the upstream looks fine now")
    done = scene.call()  # the call itself goes through the closed breaker
    assert done.status == "executed", done
    assert scene.ran() == 1


def test_a_request_answered_after_the_breaker_closed_lets_nothing_past_a_later_outage(
    scene: Scene,
) -> None:
    """An approval given for an outage that is over never lets the call past the next one."""
    scene.open_breaker()
    asked = scene.escalated()
    scene.close_breaker()
    with contextlib.suppress(ApprovalClosed):  # refused, with the fix
        scene.app.approve(asked, by="alice", note="seen late")

    scene.open_breaker()  # another outage
    again = scene.call()

    assert isinstance(again.error, tether.ApprovalRequired), again
    assert again.error.approval_id != asked  # a person is asked about this outage
    assert scene.ran() == 0  # nothing went past the open breaker


def test_a_grant_the_call_did_not_need_is_withdrawn_when_the_breaker_closes(
    scene: Scene,
) -> None:
    """Approved, then the call went through the half-open breaker on its own: the grant is unspent; closing withdraws it."""
    scene.open_breaker()
    asked = scene.escalated()
    scene.app.approve(asked, by="alice", note="go ahead")
    scene.clock.advance(COOL_DOWN)
    through = scene.call()  # the breaker's trial call: no grant needed
    assert through.status == "executed", through
    assert scene.app.store.breaker_row(BREAKER).state is BreakerState.CLOSED

    assert scene.app.approval(asked).status == "expired"  # withdrawn, unspent
    scene.open_breaker()
    again = scene.call()

    assert isinstance(again.error, tether.ApprovalRequired), again
    assert again.error.approval_id != asked
    assert scene.ran() == 1  # the trial call only


def test_a_grant_still_holds_through_its_own_outage(scene: Scene) -> None:
    """A grant approved while the breaker is open lets the call past it once, though the breaker reopened meanwhile."""
    scene.open_breaker()
    asked = scene.escalated()
    scene.clock.advance(COOL_DOWN)
    with scene.app.run(principal=BOT, request="probe") as run:
        run.step("up.call", {"n": 4, "fail": True})  # the trial fails: open again
    assert scene.app.store.breaker_row(BREAKER).state is BreakerState.OPEN
    scene.app.approve(asked, by="alice", note="go ahead")

    through = scene.call()

    assert through.status == "executed", through
    assert scene.app.approval(asked).status == "used"
    assert scene.ran() == 1


def test_a_denial_stands_for_its_outage_only(scene: Scene) -> None:
    """Denied during one outage, the call is refused during it; a later outage asks a person anew."""
    scene.open_breaker()
    asked = scene.escalated()
    scene.app.deny(asked, by="alice", reason="not while the upstream is down")
    refused = scene.call()
    assert isinstance(refused.error, tether.Denied), refused

    scene.close_breaker()
    closed = scene.app.approval(asked)
    assert (closed.status, closed.decided_by) == ("expired", "alice")
    assert closed.note is not None
    assert closed.note.startswith(f"denial lapsed: breaker {BREAKER} closed")
    scene.open_breaker()
    again = scene.call()

    assert isinstance(again.error, tether.ApprovalRequired), again
    assert again.error.approval_id != asked
    assert scene.ran() == 0


# -- a parked run, the CLI, an abort ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_run_parked_on_the_request_is_ready_once_the_breaker_closes(
    backend: str, tmp_path: Path
) -> None:
    """A worker that looked while it was parked, and one that starts after the breaker closed, find it ready; it resumes."""
    with _scene(backend, tmp_path, lambda name: None) as scene:
        scene.open_breaker()
        parked = scene.app.start("the call", planner="one-call", principal=BOT)
        assert parked.status == "awaiting_approval"
        assert parked.id not in scene.app.ready_runs()  # the look keeps its gist
        scene.close_breaker()

        # The closing writes nothing to the run's record: the gist is read past.
        assert parked.id in scene.app.ready_runs()
        if backend == "sqlite":  # and a worker of its own, started after
            config = tmp_path / "tether.yaml"
            with make_app(scene.db, config, scene.clock, scene.calls) as worker:
                assert parked.id in worker.ready_runs()
        resumed = scene.app.resume(parked.id)
        assert resumed.status == "succeeded"
        assert scene.ran() == 1


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_cli_cannot_approve_a_request_whose_breaker_closed(
    backend: str, tmp_path: Path
) -> None:
    """`tether approvals approve` says the request is closed (exit 1, approval_closed)."""
    with _scene(backend, tmp_path, lambda name: None) as scene:
        scene.open_breaker()
        asked = scene.escalated()
        scene.close_breaker()
        done = _cli.run(
            tmp_path,
            "approvals", "approve", asked, "--as", "alice",
            "--db", scene.db, "--config", str(tmp_path / "tether.yaml"),
        )  # fmt: skip
        _cli.one_error(done, "approval_closed", exit=1)
        assert scene.app.approval(asked).status == "expired"


def test_an_aborted_runs_breaker_request_is_closed(scene: Scene) -> None:
    """`Tether.abort` closes a parked run's breaker request: nobody approves it after."""
    scene.open_breaker()
    parked = scene.app.start("the call", planner="one-call", principal=BOT)
    assert parked.status == "awaiting_approval"
    (request,) = scene.app.approvals(status="pending")

    scene.app.abort(parked.id, by="alice", reason="not needed")

    assert scene.app.approval(request.id).status == "expired"
    with pytest.raises(ApprovalClosed):
        scene.app.approve(request.id, by="alice")
