"""A person's answer to a step in doubt settles its key: the call runs again, or never.

A `none` write that fails after it started is in doubt: its key refuses every
retry until someone checks the upstream. `Tether.resolve_in_doubt` (and
`tether runs resolve`) records what they found in the step's run and settles
the key in the same write: not acted, a retry under the key runs the call
again; acted, a retry gets the result the person gave and never acts twice.
Every test runs on a real SQLite file, on PostgreSQL and on `memory://`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import _cli
import tether
from _resolving import (
    AGENT,
    BACKENDS,
    KEY,
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


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with make_world(request, tmp_path) as w:
        yield w


def test_not_acted_lets_a_retry_under_the_key_run_the_call_again(world: World) -> None:
    """Resolved as not acted, the key is failed: the next call under it charges."""
    key = f"charge-{uuid.uuid4().hex}"
    run_id = doubted(world, key)
    with (
        world.app.run(principal=AGENT, request="retry") as before,
        pytest.raises(tether.InDoubt),
    ):
        before.call("pay.charge", {"order": "o-1", "cents": 500}, idempotency_key=key)

    done = world.app.resolve_in_doubt(
        run_id, 1, acted=False, by="alice", reason="no charge o-1 in the ledger"
    )
    with world.app.run(principal=AGENT, request="retry") as after:
        out = after.call(
            "pay.charge", {"order": "o-1", "cents": 500}, idempotency_key=key
        )

    assert (done.key, done.key_state, done.capability) == (key, "failed", "pay.charge")
    assert world.charges == ["o-1", "o-1"]
    assert out == ChargeOut(charge_id="ch_2", cents=500)
    assert kinds(world.app, run_id)[-1] == "in_doubt_resolved"
    resolved = world.app.store.events(run_id)[-1].data()
    assert resolved | {"at": None} == {
        "acted": False,
        "at": None,
        "by": "alice",
        "key": key,
        "key_state": "failed",
        "kind": "in_doubt_resolved",
        "output": None,
        "reason": "no charge o-1 in the ledger",
        "seq": done.seq,
        "step": 1,
    }
    assert world.app.verify(run_id).ok  # after run_finished, the chain holds


def test_acted_gives_a_retry_the_persons_result_and_never_charges_again(
    world: World,
) -> None:
    """Resolved as acted with the result, a retry under the key is an idempotent hit."""
    key = f"charge-{uuid.uuid4().hex}"
    run_id = doubted(world, key)

    world.app.resolve_in_doubt(
        run_id,
        1,
        acted=True,
        by="alice",
        reason="ch_1 is in the ledger",
        output={"charge_id": "ch_1", "cents": 500},
    )
    with world.app.run(principal=AGENT, request="retry") as run:
        outcome = run.step(
            "pay.charge", {"order": "o-1", "cents": 500}, idempotency_key=key
        )

    assert outcome.status is OutcomeStatus.IDEMPOTENT_HIT
    assert outcome.output == ChargeOut(charge_id="ch_1", cents=500)
    assert world.charges == ["o-1"]
    stored = world.app.store.lookup_key(key_of(key))
    assert stored is not None
    assert stored.state is KeyState.COMPLETED


def test_an_incomplete_or_repeated_answer_is_refused_and_changes_nothing(
    world: World,
) -> None:
    """No reason, acted without the result, a result that misfits, twice: one line each."""
    key = f"charge-{uuid.uuid4().hex}"
    run_id = doubted(world, key)
    resolve = world.app.resolve_in_doubt
    head = world.app.store.get_run(run_id).head_seq

    with pytest.raises(tether.UsageError, match="needs a reason"):
        resolve(run_id, 1, acted=False, by="alice", reason="  ")
    with pytest.raises(tether.UsageError, match="give the call's result"):
        resolve(run_id, 1, acted=True, by="alice", reason="charged")
    with pytest.raises(tether.UsageError, match="cents"):
        resolve(
            run_id, 1, acted=True, by="alice", reason="x", output={"charge_id": "c"}
        )
    with pytest.raises(tether.UsageError, match="drop it, or say it acted"):
        resolve(run_id, 1, acted=False, by="alice", reason="x", output={"a": 1})
    with pytest.raises(tether.UsageError, match="no step 7"):
        resolve(run_id, 7, acted=False, by="alice", reason="x")
    assert world.app.store.get_run(run_id).head_seq == head
    stored = world.app.store.lookup_key(key_of(key))
    assert stored is not None
    assert stored.state is KeyState.IN_DOUBT

    resolve(run_id, 1, acted=False, by="alice", reason="not charged")
    with pytest.raises(tether.UsageError, match="resolved already: alice found it"):
        resolve(run_id, 1, acted=True, by="bob", reason="x", output={})


def test_a_step_that_finished_is_not_in_doubt(world: World) -> None:
    with world.app.run(principal=AGENT, request="charge") as run:
        run.call("pay.charge", {"order": "o-2", "cents": 1})

    with pytest.raises(
        tether.UsageError, match=r"step 1 \(pay.charge\) is not in doubt"
    ):
        world.app.resolve_in_doubt(run.id, 1, acted=False, by="alice", reason="x")


def test_a_live_run_takes_the_answer_up_and_goes_on(world: World) -> None:
    """Resolved while its run is still open (from anywhere), the run writes after it.

    The handler raised, so nothing is still in the call: the key's claim ended
    with it, and "did not act" is taken at once, without waiting out the claim.
    """
    key = f"charge-{uuid.uuid4().hex}"
    world.hang_up.append(True)
    with world.app.run(principal=AGENT, request="charge, then retry") as run:
        with pytest.raises(tether.InDoubt):
            run.call("pay.charge", {"order": "o-1", "cents": 500}, idempotency_key=key)
        stored = world.app.store.lookup_key(key_of(key))
        assert stored is not None
        assert stored.state is KeyState.IN_DOUBT
        assert stored.lease_until == world.app.clock.now()  # the claim ended with it
        world.app.resolve_in_doubt(
            run.id, 1, acted=False, by="alice", reason="not in the ledger"
        )
        out = run.call(
            "pay.charge", {"order": "o-1", "cents": 500}, idempotency_key=key
        )

    assert out == ChargeOut(charge_id="ch_2", cents=500)
    assert world.app.store.get_run(run.id).status == "succeeded"
    assert kinds(world.app, run.id).count("in_doubt_resolved") == 1
    assert world.app.verify(run.id).ok


def test_a_step_an_abort_cut_off_is_resolved_with_its_claim(world: World) -> None:
    """A keyed step aborted mid-call keeps its key claimed; acted, a retry gets the result."""
    app = world.app

    @tether.capability("pay.capture", effect="write", idempotency="keyed")
    def capture(args: ChargeIn) -> ChargeOut:
        world.charges.append(args.order)
        app.abort(run_id, by="oncall", reason="stop everything")  # mid-call
        return ChargeOut(charge_id="ch_cut", cents=args.cents)

    app.register(capture)
    key = f"capture-{uuid.uuid4().hex}"
    with app.run(principal=AGENT, request="x") as run:
        run_id = run.id
        with pytest.raises(tether.RunAborted):
            run.call(capture, {"order": "o-3", "cents": 9}, idempotency_key=key)
    claimed = app.store.lookup_key(
        KeyId(tenant="acme", principal_id="pay-bot", capability="pay.capture", key=key)
    )
    assert claimed is not None
    assert claimed.state is KeyState.IN_PROGRESS

    with pytest.raises(tether.UsageError, match="may still be running"):
        app.resolve_in_doubt(run_id, 1, acted=False, by="bob", reason="no capture")
    done = app.resolve_in_doubt(
        run_id,
        1,
        acted=True,
        by="alice",
        reason="captured",
        output=ChargeOut(charge_id="ch_cut", cents=9),
    )
    with app.run(principal=AGENT, request="retry") as again:
        hit = again.step(capture, {"order": "o-3", "cents": 9}, idempotency_key=key)

    assert done.key_state == "completed"
    assert hit.status is OutcomeStatus.IDEMPOTENT_HIT
    assert world.charges == ["o-3"]
    assert app.verify(run_id).ok


def test_a_resolved_retry_replays_the_same(tmp_path: Path) -> None:
    """Replay settles the key as the record's answer did, so the retry after it matches."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    hang_up = [True]
    charge = hanging_charge(hang_up, "ch_2")

    with tether.Tether(
        db=db, config=resolvers(tmp_path), clock=FakeClock(), env={}
    ) as app:
        app.register(charge)
        recorded = _resolved_then_retried(app)
        hang_up.append(True)  # the replayed first call is in doubt again

        report = Replayer(app).replay(recorded)

    assert report.ok, report.to_json()
    assert report.notes == []


def _resolved_then_retried(app: tether.Tether) -> RecordedRun:
    """Leave a keyed charge in doubt, answer "not acted", retry it; return the run's record."""
    with app.run(principal=AGENT, request="charge") as run:
        with pytest.raises(tether.InDoubt):
            run.call("pay.charge", {"order": "o", "cents": 5}, idempotency_key="k")
        app.resolve_in_doubt(run.id, 1, acted=False, by="alice", reason="none")
        run.call("pay.charge", {"order": "o", "cents": 5}, idempotency_key="k")
    return RecordedRun.from_store(app.store, run.id)


PAYAPP = """\
import tether
from pydantic import BaseModel


class ChargeIn(BaseModel):
    order: str
    cents: int


class ChargeOut(BaseModel):
    charge_id: str
    cents: int


@tether.capability("pay.charge", effect="write", idempotency="none")
def charge(args: ChargeIn) -> ChargeOut:
    return ChargeOut(charge_id="ch_1", cents=args.cents)


app = tether.Tether(db="sqlite:///tether.db")
app.register(charge)
"""
"""The app a user points `runs resolve --app` at: it registers the capability."""


def test_cli_resolves_a_step_and_says_what_the_key_became(tmp_path: Path) -> None:
    """`tether runs resolve`: one error line for a bad answer, a JSON document for a good one."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    hang_up = [True]
    charge = hanging_charge(hang_up, "ch_1")

    with tether.Tether(db=db, config=resolvers(tmp_path), env=KEY) as app:
        app.register(charge)
        with (
            app.run(principal=AGENT, request="charge") as run,
            pytest.raises(tether.InDoubt),
        ):
            run.call("pay.charge", {"order": "o", "cents": 5}, idempotency_key="k")
    resolve = ("runs", "resolve", run.id, "1", "--as", "alice", "--db", db)

    missing = _cli.run(tmp_path, *resolve, "--acted", "--reason", "seen", env=KEY)
    bad = _cli.run(
        tmp_path, *resolve, "--acted", "--output", "{nope", "--reason", "x", env=KEY
    )
    neither = _cli.run(tmp_path, *resolve, "--reason", "x", env=KEY)
    unchecked = _cli.run(
        tmp_path, *resolve, "--acted", "--output", '{"a": 1}', "--reason", "x", env=KEY
    )
    (tmp_path / "payapp.py").write_text(PAYAPP)
    ok = _cli.run(
        tmp_path,
        "runs",
        "resolve",
        run.id,
        "1",
        "--as",
        "alice",
        "--app",
        "payapp:app",
        "--acted",
        "--output",
        '{"charge_id": "ch_1", "cents": 5}',
        "--reason",
        "ch_1 in the ledger",
        "--json",
        env=KEY,
    )  # from the app: its result is checked against pay.charge's output schema
    again = _cli.run(tmp_path, *resolve, "--not-acted", "--reason", "x", env=KEY)
    verified = _cli.run(tmp_path, "verify", run.id, "--db", db, env=KEY)
    shown = _cli.run(tmp_path, "runs", "show", run.id, "--db", db, "--json", env=KEY)
    text = _cli.run(tmp_path, "runs", "show", run.id, "--db", db, env=KEY)

    assert "give the call's result" in _cli.one_error(missing, "usage_error")
    assert "--output is not JSON" in _cli.one_error(bad, "usage_error")
    assert neither.returncode == 2
    _cli.one_error(unchecked, "usage_error")
    assert "is not registered here" in unchecked.stderr
    assert "--acted" in neither.stderr
    assert ok.returncode == 0, ok.stderr
    document = json.loads(ok.stdout)
    assert document | {"seq": None, "format": None} == {
        "format": None,
        "run_id": run.id,
        "step": 1,
        "capability": "pay.charge",
        "acted": True,
        "key": "k",
        "key_state": "completed",
        "seq": None,
    }
    assert "resolved already: alice found it acted" in _cli.one_error(
        again, "usage_error"
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    step = json.loads(shown.stdout)["steps"][0]
    assert (step["status"], step["resolved"]) == (
        "in_doubt",
        {
            "acted": True,
            "by": "alice",
            "reason": "ch_1 in the ledger",
            "key_state": "completed",
        },
    )
    assert "resolved: acted (alice)" in text.stdout
    assert "acted, by alice: ch_1 in the ledger; key k completed" in text.stdout


def test_a_cut_off_claim_is_answered_not_acted_once_it_lapsed(world: World) -> None:
    """While a cut-off step's claim is live it may still act; once lapsed, not acted runs it again."""
    app = world.app
    clock = app.clock
    assert isinstance(clock, FakeClock)
    run_id, key = cut_off_capture(world)
    clock.advance(timedelta(hours=1))  # past any claim_ttl

    done = app.resolve_in_doubt(run_id, 1, acted=False, by="bob", reason="no capture")
    with app.run(principal=AGENT, request="retry") as again:
        out = again.call(
            "pay.capture", {"order": "o-4", "cents": 9}, idempotency_key=key
        )

    assert done.key_state == "failed"
    assert out == ChargeOut(charge_id="ch_2", cents=9)
    assert world.charges == ["o-4", "o-4"]


@pytest.mark.parametrize("command", ["abort", "resolve"])
def test_cli_abort_and_resolve_read_the_config_they_are_given(
    tmp_path: Path, command: str
) -> None:
    """`--config` is honoured: a broken file is one error line, and nothing is written."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    with tether.Tether(db=db, env=KEY) as app:
        app.register(hanging_charge([True], "ch_1"))
        with (
            app.run(principal=AGENT, request="charge") as run,
            pytest.raises(tether.InDoubt),
        ):
            run.call("pay.charge", {"order": "o", "cents": 5}, idempotency_key="k")
        head = app.store.get_run(run.id).head_seq
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n")
    extra = ("1", "--acted") if command == "resolve" else ()
    args = ("runs", command, run.id, *extra, "--as", "alice", "--reason", "x")

    refused = _cli.run(tmp_path, *args, "--db", db, "--config", str(broken), env=KEY)
    both = _cli.run(tmp_path, *args, "--app", "x:app", "--config", str(broken), env=KEY)

    assert "broken.yaml" in _cli.one_error(refused, "config_invalid")
    if command == "resolve":
        assert "drop --db and --config" in _cli.one_error(both, "usage_error")
    with tether.Tether(db=db, env=KEY) as app:
        assert app.store.get_run(run.id).head_seq == head


# -- who may answer ------------------------------------------------------------------

WHO_MAY = """
approvers:
  alice: [ops]
  pay-bot: [ops]            # the agent's own principal, listed by mistake
  boss: [finance]           # whom the agent acts for
  globex-sre: {roles: [ops], tenants: [globex]}
"""


def test_only_an_approver_for_the_runs_tenant_who_did_not_make_the_call_may_answer(
    tmp_path: Path,
) -> None:
    """As for approval requests: named under approvers:, for the tenant, not the caller.

    An answer lets the call run again (not acted) or stand for it (acted): the
    agent, or whom it acts for, answering for its own call would be the call
    approving itself. A refusal writes nothing, and the CLI says no with exit 1.
    """
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    config = tmp_path / "tether.yaml"
    config.write_text(WHO_MAY)
    hang_up = [True]
    agent = tether.Principal("pay-bot", tenant="acme", on_behalf_of="boss")
    with tether.Tether(db=db, config=config, env=KEY) as app:
        app.register(hanging_charge(hang_up, "ch_2"))
        with (
            app.run(principal=agent, request="charge") as run,
            pytest.raises(tether.InDoubt),
        ):
            run.call("pay.charge", {"order": "o", "cents": 5}, idempotency_key="k")
        head = app.store.get_run(run.id).head_seq

        refusals = {}
        for who in ("mallory", "pay-bot", "boss", "globex-sre"):
            with pytest.raises(tether.NotAllowedToApprove) as refused:
                app.resolve_in_doubt(run.id, 1, acted=False, by=who, reason="x")
            refusals[who] = refused.value.message
        cli = _cli.run(
            tmp_path,
            *("runs", "resolve", run.id, "1", "--not-acted", "--as", "mallory"),
            *("--reason", "x", "--db", db),
            env=KEY,
        )
        untouched = app.store.get_run(run.id).head_seq
        held = app.store.lookup_key(
            KeyId(
                tenant="acme", principal_id="pay-bot", capability="pay.charge", key="k"
            )
        )
        done = app.resolve_in_doubt(run.id, 1, acted=False, by="alice", reason="none")

    assert "mallory is not an approver" in refusals["mallory"]
    assert "pay-bot made the call" in refusals["pay-bot"]
    assert "boss made the call" in refusals["boss"]  # it acts for them
    assert "not for tenant acme" in refusals["globex-sre"]
    assert "mallory is not an approver" in _cli.one_error(cli, "not_an_approver", 1)
    assert untouched == head
    assert held is not None
    assert held.state is KeyState.IN_DOUBT
    assert done.key_state == "failed"


def test_a_recorded_answer_replays_whoever_the_replaying_app_names(
    tmp_path: Path,
) -> None:
    """Who answered was checked when they did: replay applies the answer as recorded."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    hang_up = [True]
    charge = hanging_charge(hang_up, "ch_2")
    with tether.Tether(db=db, config=resolvers(tmp_path), env=KEY) as app:
        app.register(charge)
        recorded = _resolved_then_retried(app)
    (tmp_path / "tether.yaml").write_text("approvers: {}\n")  # nobody, now

    hang_up.append(True)
    with tether.Tether(db=db, config=tmp_path / "tether.yaml", env=KEY) as later:
        later.register(charge)
        report = Replayer(later).replay(recorded)

    assert later.settings.approvers == {}
    assert report.ok, report.to_json()
    assert not [n for n in report.notes if "cannot resolve" in n], report.notes
