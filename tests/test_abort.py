"""Stopping a run: `Tether.abort` and `tether runs abort`, whoever holds the run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import _cli
import tether
from tether.agent import PlannerInput, Proposal
from tether.replay import RecordedRun, Replayer
from tether.scenarios import SCENARIOS
from tether.store import ApprovalStatus
from tether.testing import FakeClock

SCENARIO = SCENARIOS["cloud-ops"]
KEY = {"TETHER_RECORD_KEY": "ab" * 32}
"""Every app of a test signs with one key, so PostgreSQL heads are signed too."""

CHECK = ("metrics.query", {"service": "checkout"})
RESTART = ("service.restart", {"service": "payments", "reason": "pool exhausted"})
"""A write outside the incident's service: the scenario's rule asks a person."""

APPROVERS = "approvers: {alice: [sre], bob: [sre]}\n"
"""alice stops runs; bob decides requests (both may do either)."""


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
        opened.append(app)
        return app

    yield make
    for app in opened:
        app.close()


def _parked(app: tether.Tether) -> tether.Run:
    """Start the scenario's agent on a check and a restart; it parks on the restart."""
    app.register_planner("ops", tether.ScriptedPlanner([CHECK, RESTART]))
    run = app.start(
        "check, then restart payments",
        planner="ops",
        principal=SCENARIO.principal,
        context=SCENARIO.context,
    )
    assert run.status is tether.RunState.AWAITING_APPROVAL
    return run


def _kinds(app: tether.Tether, run_id: str) -> list[dict[str, Any]]:
    return [e.data() for e in app.store.events(run_id)]


# -- the Python API ----------------------------------------------------------------------


def test_abort_ends_a_parked_run_and_closes_its_pending_request(open_app: Any) -> None:
    """A run awaiting approval ends `aborted`, recording who and why; its request is closed undecided."""
    app = open_app()
    run = _parked(app)
    (request,) = app.approvals(status="pending")

    row = app.abort(run.id[:10], by="alice", reason="wrong service")

    events = _kinds(app, run.id)
    moved, finished, closed = events[-3:]
    assert row.status == "aborted"
    assert row.error_code == "aborted"
    assert moved == {
        **moved,
        "kind": "run_status",
        "previous": "awaiting_approval",
        "status": "aborted",
        "by": "alice",
        "reason": "wrong service",
    }
    assert finished == {
        **finished,
        "kind": "run_finished",
        "status": "aborted",
        "error_code": "aborted",
        "message": "aborted by alice: wrong service",
    }
    assert (closed["kind"], closed["outcome"], closed["by"]) == (
        "approval_decided",
        "expired",
        "alice",
    )
    assert closed["note"] == (
        f"closed undecided: run {run.id} was aborted by alice: wrong service"
    )
    shut = app.approval(request.id)
    assert (shut.status, shut.decided_by) == (ApprovalStatus.EXPIRED, "alice")
    assert app.verify(run.id).ok
    assert run.id not in app.ready_runs()


def test_an_aborted_runs_request_cannot_be_approved_after(open_app: Any) -> None:
    """Nobody approves a call of a stopped run: its request is closed."""
    app = open_app()
    run = _parked(app)
    (request,) = app.approvals(status="pending")
    app.abort(run.id, by="alice", reason="wrong service")

    with pytest.raises(tether.ApprovalClosed):
        app.approve(request.id, by="bob")

    assert app.store.get_run(run.id).status == "aborted"


def test_abort_of_an_ended_run_says_it_already_ended(open_app: Any) -> None:
    """A finished run cannot be aborted: one line saying how it ended."""
    app = open_app()
    with app.run(principal=SCENARIO.principal, request="check") as run:
        run.call(*CHECK)

    with pytest.raises(tether.UsageError) as caught:
        app.abort(run.id, by="alice", reason="too late")

    assert caught.value.message == (
        f"run {run.id} already ended succeeded; nothing to abort"
    )
    assert app.store.get_run(run.id).status == "succeeded"


def test_abort_of_an_aborted_run_says_it_already_ended(open_app: Any) -> None:
    """Aborting twice: the second says the run already ended aborted."""
    app = open_app()
    run = _parked(app)
    app.abort(run.id, by="alice", reason="first")

    with pytest.raises(tether.UsageError, match="already ended aborted"):
        app.abort(run.id, by="bob", reason="second")


def test_abort_of_an_unknown_run_is_not_found(open_app: Any) -> None:
    """An id no run has is `NotFound`."""
    app = open_app()

    with pytest.raises(tether.NotFound):
        app.abort("run_nosuchrun", by="alice", reason="typo")


@pytest.mark.parametrize(("by", "reason"), [("alice", " "), ("", "why"), ("a\nb", "x")])
def test_abort_needs_a_name_and_a_reason(open_app: Any, by: str, reason: str) -> None:
    """An abort without a name or a reason is refused before anything is written."""
    app = open_app()
    run = _parked(app)
    head = app.store.get_run(run.id).head_seq

    with pytest.raises(tether.UsageError):
        app.abort(run.id, by=by, reason=reason)

    assert app.store.get_run(run.id).head_seq == head


class _N(BaseModel):
    n: int


@tether.capability("up.call", effect="write", idempotency="keyed", resource="up")
def _broken(args: _N) -> _N:
    """Call an upstream that is down."""
    raise RuntimeError("upstream 503")


def test_abort_stops_a_degraded_run(tmp_path: Path, clock: FakeClock) -> None:
    """A run a stash-mode breaker parked `degraded` can be stopped too."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "breakers:\n"
        "  - {id: up-br, resource: up, window: 2, min_calls: 2, failure_rate: 0.5,\n"
        "     open_for: 1h, on_open: stash}\n" + APPROVERS
    )
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    with tether.Tether(db=db, config=config, env=KEY, clock=clock) as app:
        app.register(_broken)
        app.register_planner(
            "calls", tether.ScriptedPlanner([("up.call", {"n": n}) for n in (1, 2, 3)])
        )
        run = app.start("three calls", planner="calls", principal=SCENARIO.principal)
        assert run.status is tether.RunState.DEGRADED

        row = app.abort(run.id, by="alice", reason="the upstream is gone for good")

        assert row.status == "aborted"
        assert _kinds(app, run.id)[-2]["previous"] == "degraded"
        assert app.verify(run.id).ok
        assert run.id not in app.ready_runs()


# -- the process that held the run ---------------------------------------------------------


def test_a_live_holder_in_another_thread_is_told_who_aborted_and_why(
    open_app: Any,
) -> None:
    """A run stepped in one thread and aborted from another connection: its next call says so."""
    holder, person = open_app(), open_app()
    stepped, aborted = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def hold() -> None:
        try:
            with holder.run(
                principal=SCENARIO.principal,
                request="check twice",
                context=SCENARIO.context,
            ) as run:
                seen["run"] = run
                run.call(*CHECK)
                stepped.set()
                assert aborted.wait(30)
                run.call(*CHECK)
        except tether.TetherError as exc:
            seen["error"] = exc

    thread = threading.Thread(target=hold)
    thread.start()
    assert stepped.wait(30)
    run = seen["run"]
    person.abort(run.id, by="alice", reason="runaway loop")
    aborted.set()
    thread.join(30)

    error = seen["error"]
    assert isinstance(error, tether.RunAborted)
    assert isinstance(error, tether.LeaseLost)  # what callers caught before
    assert error.code == "run_aborted"
    assert error.message.startswith(f"run {run.id} was aborted by alice: runaway loop")
    assert run.status is tether.RunState.ABORTED
    events = _kinds(person, run.id)
    assert [e["kind"] for e in events[-2:]] == ["run_status", "run_finished"]
    assert events[-1]["status"] == "aborted"  # the holder wrote nothing after it
    assert person.store.get_run(run.id).status == "aborted"
    assert person.verify(run.id).ok


def test_a_holder_leaving_its_block_after_the_abort_writes_nothing(
    open_app: Any,
) -> None:
    """A `with` block that ends normally after an abort raises the abort, and succeeds nothing."""
    holder, person = open_app(), open_app()

    held: list[tether.Run] = []

    with pytest.raises(tether.RunAborted, match="aborted by alice: stop"):
        _abort_while_held(holder, person, held, reason="stop")

    (run,) = held
    assert run.status is tether.RunState.ABORTED
    assert person.store.get_run(run.id).status == "aborted"
    assert _kinds(person, run.id)[-1]["kind"] == "run_finished"


def _abort_while_held(
    holder: tether.Tether,
    person: tether.Tether,
    held: list[tether.Run],
    *,
    reason: str,
    again: bool = False,
) -> None:
    """Step a run in `holder`; `person` aborts it inside the block; step again if asked."""
    with holder.run(
        principal=SCENARIO.principal, request="check", context=SCENARIO.context
    ) as run:
        held.append(run)
        run.call(*CHECK)
        person.abort(run.id, by="alice", reason=reason)
        if again:
            run.call(*CHECK)


def test_an_async_holder_is_told_too(open_app: Any) -> None:
    """`async with` and `acall`: the call after the abort raises it; the exit writes nothing."""
    holder, person = open_app(), open_app()
    held: list[tether.Run] = []

    async def hold() -> None:
        async with holder.run(
            principal=SCENARIO.principal, request="check", context=SCENARIO.context
        ) as run:
            held.append(run)
            await run.acall(*CHECK)
            person.abort(run.id, by="alice", reason="async too")
            await run.acall(*CHECK)

    with pytest.raises(tether.RunAborted, match="aborted by alice: async too"):
        asyncio.run(hold())

    (run,) = held
    assert run.status is tether.RunState.ABORTED
    assert _kinds(person, run.id)[-1]["status"] == "aborted"


class _AbortingPlanner:
    """Proposes the check forever; on its second turn a person aborts the run."""

    def __init__(self, person: tether.Tether) -> None:
        self.person = person
        self.turns = 0

    def propose(self, state: PlannerInput) -> Proposal:
        self.turns += 1
        if self.turns == 2:
            (row,) = self.person.store.list_runs(limit=1)
            self.person.abort(row.run_id, by="alice", reason="runaway agent")
        return tether.ScriptedPlanner([CHECK] * 10).propose(state)


def test_the_agent_loop_stops_at_an_abort_without_writing_the_end(
    open_app: Any,
) -> None:
    """A planner-driven run aborted mid-loop stops with the abort's error; its record ends aborted."""
    holder, person = open_app(), open_app()
    holder.register_planner("loop", _AbortingPlanner(person))

    with pytest.raises(tether.LeaseLost, match="was aborted by alice: runaway agent"):
        holder.start(
            "check forever",
            planner="loop",
            principal=SCENARIO.principal,
            context=SCENARIO.context,
        )

    (row,) = person.store.list_runs(limit=1)
    events = _kinds(person, row.run_id)
    assert row.status == "aborted"
    assert events[-1] == {**events[-1], "kind": "run_finished", "status": "aborted"}
    assert sum(e["kind"] == "executed" for e in events) == 1
    assert person.verify(row.run_id).ok


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import tether
    from tether.scenarios import SCENARIOS

    db, home = sys.argv[1], Path(sys.argv[2])
    scenario = SCENARIOS["cloud-ops"]
    app = tether.Tether(db=db)
    scenario.setup(app)
    try:
        with app.run(principal=scenario.principal, request="hold",
                     context=scenario.context) as run:
            run.call("metrics.query", {"service": "checkout"})
            (home / "run_id").write_text(run.id)
            deadline = time.monotonic() + 30
            while not (home / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            run.call("metrics.query", {"service": "checkout"})
    except tether.LeaseLost as exc:
        print("refused:", exc.message)
    print("status:", run.status.value)
    app.close()
    """
)


def test_a_holder_in_another_process_is_told_by_the_cli_abort(tmp_path: Path) -> None:
    """A live run in another process, aborted with `tether runs abort`: its next write says so."""
    (tmp_path / "holder.py").write_text(HOLDER)
    (tmp_path / "tether.yaml").write_text(APPROVERS)  # the CLI's, in its folder
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    holder = subprocess.Popen(  # our own interpreter and script
        [sys.executable, str(tmp_path / "holder.py"), db, str(tmp_path)],
        env={**os.environ, **KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = _wait_for(tmp_path / "run_id", holder)

        done = _cli.run(
            tmp_path,
            "runs", "abort", run_id[:12], "--as", "alice",
            "--reason", "stuck on a check", "--db", db,
            env=KEY,
        )  # fmt: skip
        (tmp_path / "go").touch()
        out, err = holder.communicate(timeout=60)
    finally:
        holder.kill()

    assert done.returncode == 0, done.stderr
    assert f"run {run_id} aborted by alice: stuck on a check" in done.stdout
    assert holder.returncode == 0, err
    assert "Traceback" not in err
    assert f"refused: run {run_id} was aborted by alice: stuck on a check" in out
    assert "status: aborted" in out
    verified = _cli.run(tmp_path, "verify", run_id, "--db", db, env=KEY)
    assert verified.returncode == 0, verified.stderr


def _wait_for(path: Path, process: subprocess.Popen[str]) -> str:
    for _ in range(3000):
        if path.exists() and path.read_text():
            return path.read_text()
        if process.poll() is not None:
            raise AssertionError(process.communicate())
        threading.Event().wait(0.01)
    raise AssertionError(f"{path} never appeared")


# -- tether worker ------------------------------------------------------------------------

AGENT = textwrap.dedent(
    """
    import os
    import tether
    from tether.scenarios import SCENARIOS

    CHECK = ("metrics.query", {"service": "checkout"})
    RESTART = ("service.restart", {"service": "payments", "reason": "pool exhausted"})

    class Planner:
        def __init__(self):
            self.aborted = False

        def propose(self, state):
            if os.environ.get("ABORT_ON_RESUME") and not self.aborted:
                self.aborted = True
                with tether.Tether() as person:  # another connection: a person
                    (row,) = person.store.list_runs(limit=1)
                    person.abort(row.run_id, by="alice", reason="not today")
            return tether.ScriptedPlanner([CHECK, RESTART]).propose(state)

    app = tether.Tether()
    SCENARIOS["cloud-ops"].setup(app)
    app.register_planner("ops", Planner())
    """
)


def test_a_worker_whose_run_is_aborted_says_so_and_goes_on(tmp_path: Path) -> None:
    """`tether worker` resuming a run aborted under it names the abort; no traceback, exit 0."""
    (tmp_path / "agentapp.py").write_text(AGENT)
    (tmp_path / "tether.yaml").write_text(APPROVERS)
    env = {**KEY, "PYTHONPATH": str(tmp_path), "TETHER_DB": "sqlite:///agent.db"}
    scenario = SCENARIOS["cloud-ops"]
    started = _cli_python(
        tmp_path,
        env,
        "import agentapp, tether; from tether.scenarios import SCENARIOS; "
        "s = SCENARIOS['cloud-ops']; r = agentapp.app.start('restart', planner='ops', "
        "principal=s.principal, context=s.context); print(r.id, r.status.value)",
    )
    run_id, status = started.stdout.split()
    listed = _cli.run(tmp_path, "approvals", "list", "--json", env=env)
    (request,) = json.loads(listed.stdout)["approvals"]
    _cli.run(tmp_path, "approvals", "approve", request["id"], "--as", "bob", env=env)

    worked = _cli.run(
        tmp_path,
        "worker", "--app", "agentapp:app", "--until-idle",
        env={**env, "ABORT_ON_RESUME": "1"},
    )  # fmt: skip

    assert (status, scenario.name) == ("awaiting_approval", "cloud-ops")
    assert worked.returncode == 0, worked.stderr
    assert "Traceback" not in worked.stdout + worked.stderr
    said = " ".join(worked.stdout.split())
    assert f"skipped {run_id}: run {run_id} was aborted by alice: not today" in said
    shown = _cli.run(tmp_path, "runs", "show", run_id, "--json", env=env)
    assert json.loads(shown.stdout)["run"]["status"] == "aborted"


def _cli_python(
    folder: Path, env: dict[str, str], code: str
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(  # our own interpreter
        [sys.executable, "-c", code],
        cwd=folder,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def parked_db(tmp_path: Path) -> tuple[str, str]:
    """A SQLite file holding a run parked on an approval; its URL and the run's id."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    (tmp_path / "tether.yaml").write_text(APPROVERS)  # the CLI's, in its folder
    with tether.Tether(db=db, env=KEY) as app:
        SCENARIO.setup(app)
        return db, _parked(app).id


def test_cli_abort_prints_one_json_document(
    tmp_path: Path, parked_db: tuple[str, str]
) -> None:
    """`runs abort --json` prints the aborted run, found by a prefix of its id."""
    db, run_id = parked_db

    done = _cli.run(
        tmp_path,
        "runs", "abort", run_id[:10], "--as", "alice", "--reason", "wrong service",
        "--json", "--db", db,
        env=KEY,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc == {
        **doc,
        "format": 1,
        "run_id": run_id,
        "status": "aborted",
        "by": "alice",
        "reason": "wrong service",
        "error_code": "aborted",
    }


def test_cli_abort_of_an_ended_run_is_one_error_line(
    tmp_path: Path, parked_db: tuple[str, str]
) -> None:
    """Aborting a run that already ended: one usage error line, exit 2."""
    db, run_id = parked_db
    args = ("runs", "abort", run_id, "--as", "alice", "--reason", "x", "--db", db)
    _cli.run(tmp_path, *args, env=KEY)

    again = _cli.run(tmp_path, *args, env=KEY)

    line = _cli.one_error(again, "usage_error")
    assert f"run {run_id} already ended aborted; nothing to abort" in line


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("run_nosuchrun", "--as", "alice", "--reason", "x"), "not_found"),
        (("RUN", "--as", "alice", "--reason", "  "), "usage_error"),
        (("RUN", "--as", " ", "--reason", "x"), "usage_error"),
        (("RUN", "--as", "alice"), "usage_error"),
    ],
)
def test_cli_abort_refusals_are_one_error_line(
    tmp_path: Path, parked_db: tuple[str, str], args: tuple[str, ...], code: str
) -> None:
    """An unknown run, an empty reason or name, a missing --reason: one line, exit 2, nothing written."""
    db, run_id = parked_db
    given = [run_id if a == "RUN" else a for a in args]

    done = _cli.run(tmp_path, "runs", "abort", *given, "--db", db, env=KEY)

    _cli.one_error(done, code)
    with tether.Tether(db=db, env=KEY) as app:
        assert app.store.get_run(run_id).status == "awaiting_approval"


def test_an_aborted_run_verifies_and_replays_the_same(
    tmp_path: Path, parked_db: tuple[str, str]
) -> None:
    """`tether verify` passes on an aborted run and `tether replay` finds it unchanged."""
    db, run_id = parked_db
    aborted = _cli.run(
        tmp_path,
        "runs", "abort", run_id, "--as", "alice", "--reason", "wrong service",
        "--db", db,
        env=KEY,
    )  # fmt: skip
    assert aborted.returncode == 0, aborted.stderr

    verified = _cli.run(tmp_path, "verify", run_id, "--db", db, env=KEY)
    replayed = _cli.run(tmp_path, "replay", run_id, "--json", "--db", db, env=KEY)

    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"intact run {run_id}")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    report = json.loads(replayed.stdout)
    assert report["divergences"] == [], report


def test_a_live_run_aborted_mid_run_replays_the_same(open_app: Any, db: str) -> None:
    """A run aborted between its steps by another connection replays without divergence."""
    holder, person = open_app(), open_app()
    held: list[tether.Run] = []
    with pytest.raises(tether.LeaseLost):
        _abort_while_held(holder, person, held, reason="enough", again=True)
    (run,) = held

    report = Replayer(person).replay(RecordedRun.from_store(person.store, run.id))

    assert report.divergences == []
