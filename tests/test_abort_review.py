"""Stopping a run, reviewed: what an abort leaves behind for other runs, workers and people."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import _cli
import tether
from tether.replay import RecordedRun, Replayer
from tether.run import ABORTABLE_STATES
from tether.scenarios import SCENARIOS
from tether.store import ApprovalStatus
from tether.testing import FakeClock

SCENARIO = SCENARIOS["cloud-ops"]
KEY = {"TETHER_RECORD_KEY": "ab" * 32}
CHECK = ("metrics.query", {"service": "checkout"})
RESTART = ("service.restart", {"service": "payments", "reason": "pool exhausted"})
APPROVERS = "approvers: {alice: [sre], bob: [sre]}\n"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database on each backend."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'tether.db'}"


@pytest.fixture
def open_app(db: str, clock: FakeClock, tmp_path: Path) -> Iterator[Any]:
    """Open apps on the test's database (each its own connection), closed after."""
    opened: list[tether.Tether] = []
    config = tmp_path / "tether.yaml"
    config.write_text(APPROVERS)

    def make() -> tether.Tether:
        app = tether.Tether(db=db, config=config, env=KEY, clock=clock)
        SCENARIO.setup(app)
        app.register_planner("ops", tether.ScriptedPlanner([CHECK, RESTART]))
        opened.append(app)
        return app

    yield make
    for app in opened:
        app.close()


def _start(app: tether.Tether) -> tether.Run:
    return app.start(
        "check, then restart payments",
        planner="ops",
        principal=SCENARIO.principal,
        context=SCENARIO.context,
    )


# -- what the abort does to the run's approval requests -----------------------------------


def test_a_later_run_making_the_same_call_asks_a_person_again(open_app: Any) -> None:
    """Aborting a run is no verdict on its call: a new run's same call is asked anew, not denied."""
    app = open_app()
    first = _start(app)
    assert first.status is tether.RunState.AWAITING_APPROVAL
    app.abort(first.id, by="alice", reason="started on the wrong incident")

    second = _start(app)

    assert second.status is tether.RunState.AWAITING_APPROVAL
    (asked,) = app.approvals(status="pending")
    assert asked.run_id == second.id


def test_a_run_waiting_on_the_aborted_runs_request_is_not_told_a_person_denied(
    open_app: Any, clock: FakeClock
) -> None:
    """Another run coalesced onto the request: the abort leaves its call for a person to judge."""
    app = open_app()
    first = _start(app)
    second = _start(app)  # the same call: it waits on the first run's request
    (request,) = app.approvals(status="pending")
    assert request.run_id == first.id
    assert second.status is tether.RunState.AWAITING_APPROVAL

    app.abort(first.id, by="alice", reason="a duplicate")
    clock.advance(timedelta(seconds=1))  # the second run's own request is the newer
    resumed = app.resume(second.id) if second.id in app.ready_runs() else None

    # The second run's call still goes to a person, in a request of its own.
    pending = app.approvals(status="pending")
    assert [r.run_id for r in pending] == [second.id]
    assert resumed is None or resumed.status is tether.RunState.AWAITING_APPROVAL
    assert app.approve(pending[0].id, by="bob").status is ApprovalStatus.APPROVED
    done = app.resume(second.id)
    assert done.status is tether.RunState.SUCCEEDED


# -- the process that held the run -------------------------------------------------------


def test_a_holder_refused_by_an_abort_is_told_it_and_by_a_resume_is_not(
    open_app: Any,
) -> None:
    """The abort takes the run and ends it in one transaction (`Store.abort_run`).

    So a holder whose write the abort's epoch refused finds the run aborted
    already, and is told who aborted it (`RunAborted`); one refused by a
    worker that took the run over (a resume) gets the plain lease message,
    and nobody is said to have aborted anything.
    """
    holder, person = open_app(), open_app()
    outcomes: dict[str, BaseException] = {}
    for how in ("aborted", "resumed"):
        run, outcomes[how] = _refused(holder, person, how)
        if how == "aborted":
            assert run.status is tether.RunState.ABORTED
            kinds = [e.data()["kind"] for e in person.store.events(run.id)]
            assert kinds[-1] == "run_finished"
            assert person.verify(run.id).ok

    assert isinstance(outcomes["aborted"], tether.RunAborted)
    assert str(outcomes["aborted"]).startswith("run ")
    assert "was aborted by alice: runaway" in str(outcomes["aborted"])
    assert not isinstance(outcomes["resumed"], tether.RunAborted)
    assert "aborted" not in str(outcomes["resumed"])


def _refused(
    holder: tether.Tether, person: tether.Tether, how: str
) -> tuple[tether.Run, tether.LeaseLost]:
    """Step in `holder`; let `person` abort the run or take it over; step again."""
    held: list[tether.Run] = []
    try:
        with holder.run(
            principal=SCENARIO.principal, request="check", context=SCENARIO.context
        ) as run:
            held.append(run)
            run.call(*CHECK)
            if how == "aborted":
                person.abort(run.id, by="alice", reason="runaway")
            else:  # what a worker's resume does first
                person.store.take_over(run.id, parked=ABORTABLE_STATES)
            run.call(*CHECK)
    except tether.LeaseLost as refused:
        return held[0], refused
    raise AssertionError(f"the holder's write after the run was {how} was not refused")


def test_a_long_reason_is_quoted_short_to_the_holder_and_kept_whole(
    open_app: Any,
) -> None:
    """A 10 KB reason: the holder's `RunAborted` quotes its start; the record keeps it all."""
    holder, person = open_app(), open_app()
    reason = "the agent keeps restarting pods " + "x" * 10_000
    with pytest.raises(tether.RunAborted) as caught:
        _abort_between_steps(holder, person, reason)

    message = caught.value.message
    assert len(message) < 700
    assert "was aborted by alice: the agent keeps restarting pods xxx" in message
    assert "…" in message
    (row,) = person.store.list_runs(limit=1)
    said = [e.data() for e in person.store.events(row.run_id)][-2]
    assert said["reason"] == reason


def _abort_between_steps(
    holder: tether.Tether, person: tether.Tether, reason: str
) -> None:
    with holder.run(
        principal=SCENARIO.principal, request="check", context=SCENARIO.context
    ) as run:
        run.call(*CHECK)
        person.abort(run.id, by="alice", reason=reason)
        run.call(*CHECK)


def test_an_aborted_runs_unspent_grant_does_not_run_the_call_in_a_later_run(
    open_app: Any, clock: FakeClock
) -> None:
    """Approved, then aborted before a worker ran it: a later run's same call asks again."""
    app = open_app()
    first = _start(app)
    (request,) = app.approvals(status="pending")
    app.approve(request.id, by="bob")
    app.abort(first.id, by="alice", reason="do not restart payments after all")
    clock.advance(timedelta(seconds=1))

    second = _start(app)

    assert second.status is tether.RunState.AWAITING_APPROVAL


# -- abort racing a worker ----------------------------------------------------------------


def test_abort_racing_a_worker_resuming_the_run_always_ends_it_once(
    open_app: Any,
) -> None:
    """A person approves, a worker resumes the run and a person aborts it, at once.

    Whoever wins, the run ends once (one `run_finished`, an intact chain);
    when the abort wins, the worker is told who aborted the run, not that
    another worker took it.
    """
    person, worker = open_app(), open_app()
    aborted = 0
    for turn in range(12):
        restart = (RESTART[0], {**RESTART[1], "reason": f"pool exhausted {turn}"})
        for app in (person, worker):  # a call of its own: no grant carries over
            app.register_planner(
                f"ops{turn}", tether.ScriptedPlanner([CHECK, restart, CHECK, CHECK])
            )
        run = person.start(
            "restart", planner=f"ops{turn}", principal=SCENARIO.principal,
            context=SCENARIO.context,
        )  # fmt: skip
        (request,) = [
            r for r in person.approvals(status="pending") if r.run_id == run.id
        ]
        person.approve(request.id, by="bob")
        said: dict[str, Any] = {}
        resuming = threading.Thread(target=_resume, args=(worker, run.id, said))
        resuming.start()
        threading.Event().wait(0.002 * (turn % 6))
        refused = _abort(person, run.id)
        resuming.join(60)
        assert refused in ("", "already ended succeeded"), refused

        kinds = [e.data()["kind"] for e in person.store.events(run.id)]
        status = person.store.get_run(run.id).status
        assert kinds.count("run_finished") == 1, kinds
        assert person.verify(run.id).ok
        if status == "aborted":
            aborted += 1
            error = said.get("error")
            # The worker lost the race to take the run (a usage error), or was told.
            assert error is None or isinstance(
                error, tether.RunAborted | tether.UsageError
            ), error
        else:
            assert status == "succeeded"
    assert aborted


def _resume(app: tether.Tether, run_id: str, said: dict[str, Any]) -> None:
    try:
        said["status"] = app.resume(run_id).status
    except tether.TetherError as exc:
        said["error"] = exc


def _abort(app: tether.Tether, run_id: str) -> str:
    """Abort the run; return "" or, if the worker finished it first, how it ended."""
    try:
        app.abort(run_id, by="alice", reason="stop")
    except tether.UsageError as exc:
        return exc.message.removeprefix(f"run {run_id} ").split(";")[0]
    return ""


# -- the command line ------------------------------------------------------------------------


@pytest.mark.postgres
def test_cli_abort_on_postgres_ends_the_run_and_closes_its_request(
    tmp_path: Path, postgres_url: str
) -> None:
    """`tether runs abort --db postgresql://...`: the run ends aborted, its request expired."""
    with tether.Tether(db=postgres_url, env=KEY) as app:
        SCENARIO.setup(app)
        app.register_planner("ops", tether.ScriptedPlanner([CHECK, RESTART]))
        run = _start(app)
    reason = "looping\x1b[31m on\nrestarts"

    (tmp_path / "tether.yaml").write_text(APPROVERS)  # the CLI's, in its folder
    done = _cli.run(
        tmp_path,
        "runs", "abort", run.id[:12], "--as", "alice", "--reason", reason,
        "--db", postgres_url,
        env=KEY,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"run {run.id} aborted by alice: looping\\x1b[31m on\\x0arestarts\n"
    )
    with tether.Tether(db=postgres_url, env=KEY) as app:
        assert app.store.get_run(run.id).status == "aborted"
        (request,) = app.approvals()
        assert (request.status, request.decided_by) == (
            ApprovalStatus.EXPIRED,
            "alice",
        )


# -- a step cut off by the abort ------------------------------------------------------------

DYING = textwrap.dedent(
    """
    import os, sys
    from pydantic import BaseModel
    import tether

    class N(BaseModel):
        n: int

    @tether.capability("pay.send", effect="write", idempotency="none")
    def send(args: N) -> N:
        os._exit(3)  # the process dies mid-call: did the payment go out?

    app = tether.Tether(db=sys.argv[1])
    app.register(send)
    app.register_planner("pay", tether.ScriptedPlanner([("pay.send", {"n": 1})]))
    app.start("pay", planner="pay", principal=tether.Principal("bot"))
    """
)


def test_aborting_a_run_whose_process_died_mid_call_records_the_step_in_doubt(
    tmp_path: Path,
) -> None:
    """A `none` payment cut off by a crash, then the run aborted: the record says in doubt.

    A worker resuming the run would have recorded the step in doubt and asked
    a person; aborted, nobody ever will, so the abort itself says the step's
    outcome is unknown instead of leaving the record ending at its intent.
    """
    (tmp_path / "dying.py").write_text(DYING)
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    died = subprocess.run(  # our own interpreter and script
        [sys.executable, str(tmp_path / "dying.py"), db],
        env={**os.environ, **KEY},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert died.returncode == 3, died.stderr

    with tether.Tether(db=db, env=KEY) as app:
        (row,) = app.store.list_runs(limit=1)
        assert row.status == "executing"

    (tmp_path / "tether.yaml").write_text(APPROVERS)  # the CLI's, in its folder
    done = _cli.run(
        tmp_path,
        "runs", "abort", row.run_id, "--as", "alice",
        "--reason", "the agent crashed mid-payment", "--db", db,
        env=KEY,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    said = done.stdout.splitlines()
    assert (
        said[0] == f"run {row.run_id} aborted by alice: the agent crashed mid-payment"
    )
    assert said[1].startswith("in doubt: pay.send step 1: the run was aborted mid-call")
    with tether.Tether(db=db, env=KEY) as app:
        events = [e.data() for e in app.store.events(row.run_id)]
        assert app.verify(row.run_id).ok

    cut, moved, finished = events[-3:]
    assert [e["kind"] for e in events[-4:]] == [
        "intent",
        "in_doubt",
        "run_status",
        "run_finished",
    ]
    assert cut["step"] == 1
    assert cut["message"].startswith(
        "pay.send step 1: the run was aborted mid-call; its outcome is unknown"
    )
    assert (moved["status"], finished["status"]) == ("aborted", "aborted")


class _N(BaseModel):
    n: int


@tether.capability("slow.call", effect="write", idempotency="keyed")
def _slow(args: _N) -> _N:
    """Take as long as the test says."""
    _SLOW["inside"].set()
    assert _SLOW["go"].wait(30)
    return args


_SLOW: dict[str, threading.Event] = {}


def test_a_holder_inside_a_long_step_records_nothing_after_the_abort(
    open_app: Any,
) -> None:
    """Aborted while its handler runs: the step is in doubt, the holder is told when it returns."""
    holder, person = open_app(), open_app()
    holder.register(_slow)
    _SLOW.update(inside=threading.Event(), go=threading.Event())
    said: dict[str, Any] = {}

    def hold() -> None:
        try:
            with holder.run(principal=SCENARIO.principal, request="slow") as run:
                said["run"] = run
                run.call("slow.call", {"n": 1}, idempotency_key="slow-1")
        except tether.TetherError as exc:
            said["error"] = exc

    thread = threading.Thread(target=hold)
    thread.start()
    assert _SLOW["inside"].wait(30)
    run = said["run"]
    person.abort(run.id, by="alice", reason="too slow")
    _SLOW["go"].set()
    thread.join(30)

    assert isinstance(said["error"], tether.RunAborted), said["error"]
    assert run.status is tether.RunState.ABORTED
    kinds = [e.data()["kind"] for e in person.store.events(run.id)]
    assert kinds[-4:] == ["intent", "in_doubt", "run_status", "run_finished"]
    assert person.verify(run.id).ok
    report = Replayer(holder).replay(RecordedRun.from_store(person.store, run.id))
    assert report.divergences == []


def test_cli_abort_json_counts_every_event_and_names_no_step_in_doubt(
    tmp_path: Path,
) -> None:
    """`--json`: `events` is the record's length, closing of the request included."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    with tether.Tether(db=db, env=KEY) as app:
        SCENARIO.setup(app)
        app.register_planner("ops", tether.ScriptedPlanner([CHECK, RESTART]))
        run = _start(app)

    (tmp_path / "tether.yaml").write_text(APPROVERS)  # the CLI's, in its folder
    done = _cli.run(
        tmp_path,
        "runs", "abort", run.id, "--as", "alice", "--reason", "wrong service",
        "--json", "--db", db,
        env=KEY,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    with tether.Tether(db=db, env=KEY) as app:
        events = app.store.events(run.id)
    assert events[-1].data()["kind"] == "approval_decided"
    assert (doc["events"], doc["in_doubt"]) == (len(events), None)
