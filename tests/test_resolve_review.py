"""Review of resolving a step in doubt: races, replays, secrets, the CLI's error lines.

An adversarial review's probes, each asserting the behaviour a user needs: a
key a retry took over meanwhile is not recorded as settled; a call whose
handler may still run is not answered "not acted"; a step a resume asked a
person about is answered by its request only; a secret the person gives is
never stored in clear; a busy live run does not starve the answer; replays
of answered steps add no false notes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import _cli
import tether
from _resolving import (
    AGENT,
    BACKENDS,
    KEY,
    RESOLVERS,
    ChargeIn,
    ChargeOut,
    World,
    cut_off_capture,
    doubted,
    hanging_charge,
    key_of,
    kinds,
    make_world,
    resolvers,
)
from tether.record import OutcomeStatus
from tether.replay import RecordedRun, Replayer
from tether.store import KeyId, KeyState
from tether.testing import FakeClock


class MintIn(BaseModel):
    account: str


class MintOut(BaseModel):
    token: SecretStr
    n: int


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with make_world(request, tmp_path) as w:
        yield w


# -- run id prefix, concurrent answers ---------------------------------------------


def test_a_run_id_prefix_resolves_the_run_it_names(world: World) -> None:
    """The docstring's unique prefix of 6+ characters: the answer lands in the full run."""
    key = f"charge-{uuid.uuid4().hex}"
    run_id = doubted(world, key)

    done = world.app.resolve_in_doubt(
        run_id[:12], 1, acted=False, by="alice", reason="not in the ledger"
    )

    assert done.run_id == run_id
    assert kinds(world.app, run_id)[-1] == "in_doubt_resolved"
    stored = world.app.store.lookup_key(key_of(key))
    assert stored is not None
    assert stored.state is KeyState.FAILED
    assert world.app.verify(run_id).ok


def test_two_people_answering_at_once_record_one_answer(world: World) -> None:
    """Concurrent answers are serialized by the record: one wins, the other is told."""
    key = f"charge-{uuid.uuid4().hex}"
    run_id = doubted(world, key)
    barrier = threading.Barrier(4)
    results: list[object] = []

    def answer(i: int) -> None:
        barrier.wait()
        try:
            acted = i % 2 == 0
            results.append(
                world.app.resolve_in_doubt(
                    run_id,
                    1,
                    acted=acted,
                    by=f"p{i}",
                    reason="checked",
                    output={"charge_id": "ch_1", "cents": 500} if acted else None,
                )
            )
        except tether.TetherError as exc:
            results.append(exc)

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, tether.UsageError)]
    assert (len(won), len(lost)) == (1, 3), results
    assert all("resolved already" in e.message for e in lost)
    assert kinds(world.app, run_id).count("in_doubt_resolved") == 1
    assert world.app.verify(run_id).ok


# -- races with a retry taking the key over ----------------------------------------


def test_a_key_taken_over_mid_resolution_is_not_recorded_as_settled(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = world.app
    clock = app.clock
    assert isinstance(clock, FakeClock)
    run_id, key = cut_off_capture(world)
    clock.advance(timedelta(hours=1))  # the cut-off claim lapsed
    real = app.store.lookup_key
    raced: list[bool] = []

    def lookup_then_retry(key_id: KeyId) -> Any:
        found = real(key_id)
        if not raced:  # the resolution's read: a retry takes the key over now
            raced.append(True)
            with app.run(principal=AGENT, request="retry") as again:
                again.call(
                    "pay.capture", {"order": "o-4", "cents": 9}, idempotency_key=key
                )
        return found

    monkeypatch.setattr(app.store, "lookup_key", lookup_then_retry)
    done = app.resolve_in_doubt(run_id, 1, acted=False, by="bob", reason="no capture")
    monkeypatch.undo()

    stored = app.store.lookup_key(key_of(key, "pay.capture"))
    assert stored is not None
    assert (stored.run_id, stored.state) != (run_id, KeyState.FAILED)
    # What the record says must be what the key is: not settled by this answer.
    assert done.key_state is None
    assert app.store.events(run_id)[-1].data()["key_state"] is None


# -- a `none` write still running past its timeout --------------------------------


def test_not_acted_is_refused_while_a_timed_out_none_write_still_runs(
    tmp_path: Path,
) -> None:
    release = threading.Event()
    started: list[str] = []

    @tether.capability("slow.send", effect="write", idempotency="none", timeout=0.05)
    def send(args: ChargeIn) -> ChargeOut:
        started.append(args.order)
        if len(started) == 1:
            release.wait(10)  # still in the call long after its timeout
        return ChargeOut(charge_id=f"ch_{len(started)}", cents=args.cents)

    db = f"sqlite:///{tmp_path / 'tether.db'}"
    try:
        with tether.Tether(
            db=db, config=resolvers(tmp_path), clock=FakeClock(), env={}
        ) as app:
            app.register(send)
            with app.run(principal=AGENT, request="send") as run:
                first = run.step(
                    "slow.send", {"order": "o", "cents": 1}, idempotency_key="k"
                )
            assert first.status is OutcomeStatus.IN_DOUBT
            assert not release.is_set()  # the first handler is still in the call

            with pytest.raises(tether.UsageError):
                app.resolve_in_doubt(
                    run.id, 1, acted=False, by="alice", reason="nothing upstream yet"
                )
    finally:
        release.set()


# -- a step a worker resume put in doubt (with its `in_doubt` approval request) ----

CLI = _cli.CLI

CRASHING = textwrap.dedent(
    """
    import os
    from pathlib import Path
    from pydantic import BaseModel
    import tether

    HERE = Path(os.environ["AGENT_HOME"])

    class In(BaseModel):
        n: int

    class Out(BaseModel):
        n: int

    @tether.capability("mail.send", effect="write")  # idempotency none
    def send(args: In) -> Out:
        with open(HERE / "sent", "a") as f:
            f.write(f"{args.n}\\n")
        if not (HERE / "crashed").exists():
            (HERE / "crashed").touch()
            os._exit(9)  # the process dies mid-call, after the upstream acted
        return Out(n=args.n)

    app = tether.Tether(db=f"sqlite:///{HERE / 'agent.db'}", config=HERE / "tether.yaml")
    app.register(send)
    app.register_planner(
        "mail", tether.ScriptedPlanner([("mail.send", {"n": 1}), ("mail.send", {"n": 2})])
    )
    """
)


def _agent(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TETHER_")},
        "AGENT_HOME": str(home),
        "PYTHONPATH": str(home),
        "TETHER_DB": f"sqlite:///{home / 'agent.db'}",
        "TETHER_CONFIG": str(home / "tether.yaml"),
    }
    return subprocess.run(  # our own CLI and interpreter
        args, cwd=home, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _crash_then_worker(home: Path) -> tuple[str, str]:
    """Crash the agent mid-call in a `none` write, let a worker pass; return run and request ids."""
    (home / "agentapp.py").write_text(CRASHING)
    (home / "tether.yaml").write_text("idempotency: {claim_ttl: 1s}\n" + RESOLVERS)
    crashed = _agent(
        home,
        sys.executable,
        "-c",
        "import agentapp, tether; agentapp.app.start('mail', planner='mail', "
        "principal=tether.Principal('bot'))",
    )
    assert crashed.returncode == 9, crashed.stderr
    time.sleep(1.1)  # the dead writer's lease runs out
    worked = _agent(home, CLI, "worker", "--app", "agentapp:app", "--until-idle")
    assert worked.returncode == 0, worked.stderr
    listed = _agent(home, CLI, "approvals", "list", "--status", "pending", "--json")
    (request,) = json.loads(listed.stdout)["approvals"]
    return request["run_id"], request["id"]


def test_a_step_a_resume_asked_about_is_answered_by_its_request_only(
    tmp_path: Path,
) -> None:
    """A step the worker asked a person about (rule in_doubt) has one answer: its request.

    Resolving it too could disagree with the request (acted, yet approved to
    run again): it is refused, naming the request; denied, it never runs again.
    """
    run_id, request_id = _crash_then_worker(tmp_path)
    resolved = _agent(
        tmp_path,
        CLI,
        "runs",
        "resolve",
        run_id,
        "1",
        "--acted",
        "--as",
        "alice",
        "--reason",
        "the mail went out",
    )
    denied = _agent(
        tmp_path,
        CLI,
        "approvals",
        "deny",
        request_id,
        "--as",
        "alice",
        "--reason",
        "the mail went out",
    )
    again = _agent(tmp_path, CLI, "worker", "--app", "agentapp:app", "--until-idle")

    assert f"waits on approval request {request_id}" in _cli.one_error(
        resolved, "usage_error"
    )
    assert denied.returncode == 0, denied.stderr
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "sent").read_text().split() == ["1", "2"]


# -- secrets -------------------------------------------------------------------------


def _mint_in_doubt(db: str, env: dict[str, str]) -> str:
    hang = [True]

    @tether.capability("acct.mint", effect="write", idempotency="none")
    def mint(args: MintIn) -> MintOut:
        if hang and hang.pop(0):
            raise ConnectionResetError("hung up after minting")
        return MintOut(token=SecretStr("sk_live_fresh"), n=1)

    with tether.Tether(db=db, env=env) as app:
        app.register(mint)
        with (
            app.run(principal=AGENT, request="mint") as run,
            pytest.raises(tether.InDoubt),
        ):
            run.call("acct.mint", {"account": "a"}, idempotency_key="k")
    return run.id


def test_a_registered_secret_output_is_masked_in_the_record_and_the_key(
    tmp_path: Path,
) -> None:
    """From Python with the capability registered, a SecretStr the person gives is never stored."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    run_id = _mint_in_doubt(db, KEY)

    @tether.capability("acct.mint", effect="write", idempotency="none")
    def mint(args: MintIn) -> MintOut:  # pragma: no cover - never called
        raise AssertionError

    with tether.Tether(db=db, config=resolvers(tmp_path), env=KEY) as app:
        app.register(mint)
        app.resolve_in_doubt(
            run_id,
            1,
            acted=True,
            by="alice",
            reason="minted",
            output={"token": "sk_live_SECRET", "n": 1},
        )
        stored = app.store.lookup_key(key_of("k", "acct.mint"))
        events = json.dumps([e.data() for e in app.store.events(run_id)])
        assert app.verify(run_id).ok
    assert stored is not None
    assert stored.output is not None
    assert b"sk_live_SECRET" not in stored.output
    assert "sk_live_SECRET" not in events


def test_cli_never_stores_a_secret_output_in_clear(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    run_id = _mint_in_doubt(db, KEY)

    done = _cli.run(
        tmp_path,
        "runs",
        "resolve",
        run_id,
        "1",
        "--acted",
        "--output",
        '{"token": "sk_live_SECRET", "n": 1}',
        "--as",
        "alice",
        "--reason",
        "minted",
        "--db",
        db,
        env=KEY,
    )

    with tether.Tether(db=db, config=resolvers(tmp_path), env=KEY) as app:
        stored = app.store.lookup_key(key_of("k", "acct.mint"))
        events = json.dumps([e.data() for e in app.store.events(run_id)])
    assert stored is not None
    # Refused (one error line), or taken with the secret masked: never in clear.
    assert done.returncode == 2 or (
        b"sk_live_SECRET" not in (stored.output or b"")
        and "sk_live_SECRET" not in events
    )


# -- replay --------------------------------------------------------------------------


def test_an_acted_answer_and_the_hit_after_it_replay_the_same(tmp_path: Path) -> None:
    """Replay completes the scratch key with the person's result: the retry is a hit again."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    hang_up = [True]
    with tether.Tether(
        db=db, config=resolvers(tmp_path), clock=FakeClock(), env=KEY
    ) as app:
        app.register(hanging_charge(hang_up, "ch_live"))
        with app.run(principal=AGENT, request="charge") as run:
            with pytest.raises(tether.InDoubt):
                run.call("pay.charge", {"order": "o", "cents": 5}, idempotency_key="k")
            app.resolve_in_doubt(
                run.id,
                1,
                acted=True,
                by="alice",
                reason="ch_9 is in the ledger",
                output={"charge_id": "ch_9", "cents": 5},
            )
            hit = run.step(
                "pay.charge", {"order": "o", "cents": 5}, idempotency_key="k"
            )
        assert hit.status is OutcomeStatus.IDEMPOTENT_HIT
        assert hit.output == ChargeOut(charge_id="ch_9", cents=5)
        recorded = RecordedRun.from_store(app.store, run.id)
        hang_up.append(True)

        report = Replayer(app).replay(recorded)

    assert report.ok, report.to_json()
    assert report.notes == []


def test_an_answer_to_an_aborted_step_replays_without_a_cannot_resolve_note(
    world: World,
) -> None:
    """Resolved after run_finished (a step an abort cut off, claim lapsed): replay applies it."""
    app = world.app
    clock = app.clock
    assert isinstance(clock, FakeClock)
    run_id, _ = cut_off_capture(world)
    clock.advance(timedelta(hours=1))
    app.resolve_in_doubt(run_id, 1, acted=False, by="bob", reason="no capture")
    recorded = RecordedRun.from_store(app.store, run_id)

    report = Replayer(app).replay(recorded)

    assert report.ok, report.to_json()
    assert not [n for n in report.notes if "cannot resolve" in n], report.notes


# -- the CLI's error lines -----------------------------------------------------------


def test_cli_refusals_are_one_error_line_each(tmp_path: Path) -> None:
    """Unknown run, a step not in doubt, a non-object --output, an empty reason."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    hang_up = [False, True]
    with tether.Tether(db=db, config=resolvers(tmp_path), env=KEY) as app:
        app.register(hanging_charge(hang_up, "ch_live"))
        with app.run(principal=AGENT, request="charge") as run:
            run.call("pay.charge", {"order": "fine", "cents": 1})
            with pytest.raises(tether.InDoubt):
                run.call("pay.charge", {"order": "o", "cents": 5}, idempotency_key="k")
    base = ("--as", "alice", "--db", db)

    def resolve(*args: str) -> subprocess.CompletedProcess[str]:
        return _cli.run(tmp_path, "runs", "resolve", *args, *base, env=KEY)

    unknown = resolve("run_nope0000", "1", "--not-acted", "--reason", "x")
    finished = resolve(run.id, "1", "--not-acted", "--reason", "x")
    listed = resolve(run.id, "2", "--acted", "--output", "[1]", "--reason", "x")
    blank = resolve(run.id, "2", "--not-acted", "--reason", "   ")
    no_step = resolve(run.id, "9", "--not-acted", "--reason", "x")

    assert "run_nope0000" in _cli.one_error(unknown, "not_found")
    assert "is not in doubt" in _cli.one_error(finished, "usage_error")
    assert "JSON object" in _cli.one_error(listed, "usage_error")
    assert "needs a reason" in _cli.one_error(blank, "usage_error")
    assert "no step 9" in _cli.one_error(no_step, "usage_error")
    with tether.Tether(db=db, config=resolvers(tmp_path), env=KEY) as app:
        assert kinds(app, run.id).count("in_doubt_resolved") == 0
        stored = app.store.lookup_key(key_of("k"))
        assert stored is not None
        assert stored.state is KeyState.IN_DOUBT


def test_cli_step_zero_is_one_error_line(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    with tether.Tether(db=db, config=resolvers(tmp_path), env=KEY) as app:
        app.register(hanging_charge([], "ch_live"))
        with app.run(principal=AGENT, request="charge") as run:
            run.call("pay.charge", {"order": "fine", "cents": 1})
    done = _cli.run(
        tmp_path,
        "runs",
        "resolve",
        run.id,
        "0",
        "--not-acted",
        "--as",
        "alice",
        "--reason",
        "x",
        "--db",
        db,
        env=KEY,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


# -- a live writer writing while the answer lands --------------------------------------


def test_an_answer_racing_a_busy_live_run_is_taken_up(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's writer writes a step between each of the answer's reads and its write.

    With real threads (a run making quick calls while a person answers) this
    fails on SQLite and PostgreSQL most times; here it is made deterministic.
    """
    key = f"charge-{uuid.uuid4().hex}"
    world.hang_up.append(True)
    real = world.app.store.lookup_key
    writes: list[int] = []

    with world.app.run(principal=AGENT, request="charge, then more") as run:
        with pytest.raises(tether.InDoubt):
            run.call("pay.charge", {"order": "o-1", "cents": 500}, idempotency_key=key)
        clock = world.app.clock  # the call's claim lapsed: nothing can still act
        assert isinstance(clock, FakeClock)
        clock.advance(world.app.settings.idempotency.claim_ttl)

        def lookup_while_the_run_writes(key_id: KeyId) -> Any:
            found = real(key_id)
            if len(writes) < 40:  # the live run writes its next step meanwhile
                writes.append(1)
                run.call("pay.charge", {"order": f"more-{len(writes)}", "cents": 1})
            return found

        monkeypatch.setattr(world.app.store, "lookup_key", lookup_while_the_run_writes)
        try:
            done = world.app.resolve_in_doubt(
                run.id, 1, acted=False, by="alice", reason="not in the ledger"
            )
        finally:
            monkeypatch.undo()

    assert done.key_state == "failed"
    assert kinds(world.app, run.id).count("in_doubt_resolved") == 1
    assert world.app.verify(run.id).ok
