"""Planner-driven runs: `register_planner`, `start`, and parking on a person's approval."""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

import tether
import tether.cli
from tether._chain import StoredEvent
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


def test_a_parked_run_resumes_after_approval_and_the_approved_step_runs_once(
    app: tether.Tether,
) -> None:
    """Approve, resume: steps already taken are not taken again; the parked one runs under its grant."""
    run = app.start("refund two", planner="refunds", principal=BOT)
    (request,) = app.approvals(status="pending")
    app.approve(request.id, by="alice")

    resumed = app.resume(run.id)

    assert resumed.id == run.id
    assert resumed.status is RunState.SUCCEEDED
    assert done == [50, 500]  # the small refund once, the approved one once
    assert app.approval(request.id).status == "used"
    kinds = [e.data()["kind"] for e in app.store.events(run.id)]
    at = kinds.index("approval_decided")
    assert kinds[at:].count("approval_used") == 1
    assert kinds[-1] == "run_finished"
    assert app.store.get_run(run.id).epoch == 2
    assert app.verify(run.id).ok


def test_a_run_waiting_on_another_runs_request_is_ready_once_it_is_decided(
    app: tether.Tether,
) -> None:
    """Two runs ask for the same call: one request; both are ready once it is decided.

    The grant runs one call: the run resumed first takes it, the other asks
    again with a request of its own, and runs once that one is approved.
    """
    first = app.start("refund two", planner="refunds", principal=BOT)
    second = app.start("refund two, again", planner="refunds", principal=BOT)
    (request,) = app.approvals(status="pending")
    waiting = app.ready_runs()
    app.approve(request.id, by="alice")

    ready = app.ready_runs()
    resumed = [app.resume(first.id)]
    clock = app.clock
    assert isinstance(clock, FakeClock)
    clock.advance(
        timedelta(seconds=1)
    )  # the newest request for a call is the one in force
    resumed.append(app.resume(second.id))
    (again,) = app.approvals(status="pending")
    app.approve(again.id, by="alice")
    ready_again = app.ready_runs()
    last = app.resume(second.id)

    assert request.run_id == first.id
    assert second.status is RunState.AWAITING_APPROVAL
    assert waiting == []
    assert sorted(ready) == sorted([first.id, second.id])
    assert [r.status for r in resumed] == [
        RunState.SUCCEEDED,
        RunState.AWAITING_APPROVAL,
    ]
    assert again.run_id == second.id
    assert ready_again == [second.id]
    assert last.status is RunState.SUCCEEDED
    assert done == [50, 50, 500, 500]  # each run's refunds, each once
    assert app.verify(first.id).ok
    assert app.verify(second.id).ok


def test_a_workers_looks_read_a_parked_runs_record_once_until_it_grows(
    app: tether.Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ready_runs` reads a waiting run's record at its first look only; a decision it records makes it read again."""
    run = app.start("refund two", planner="refunds", principal=BOT)
    (request,) = app.approvals(status="pending")
    read: list[str] = []
    events = app.store.events

    def counting(run_id: str) -> list[StoredEvent]:
        read.append(run_id)
        return events(run_id)

    monkeypatch.setattr(app.store, "events", counting)
    looks = [app.ready_runs() for _ in range(3)]
    app.approve(request.id, by="alice")  # recorded in the run: its record grows
    after = app.ready_runs()

    assert looks == [[], [], []]
    assert after == [run.id]
    assert read.count(run.id) == 2


def test_a_run_still_waiting_parks_again_on_resume(app: tether.Tether) -> None:
    """Resumed before anyone decided, the run asks again, coalesces, and parks again."""
    run = app.start("refund two", planner="refunds", principal=BOT)

    again = app.resume(run.id)

    assert again.status is RunState.AWAITING_APPROVAL
    assert len(app.approvals(status="pending")) == 1
    assert done == [50]
    assert app.verify(run.id).ok


def test_a_denied_step_is_the_planners_to_handle(app: tether.Tether) -> None:
    """After a denial the planner sees the refusal; the scripted one then finishes."""
    run = app.start("refund two", planner="refunds", principal=BOT)
    (request,) = app.approvals(status="pending")
    app.deny(request.id, by="alice", reason="duplicate order")

    resumed = app.resume(run.id)

    assert resumed.status is RunState.SUCCEEDED
    assert done == [50]


def test_only_a_parked_run_can_be_resumed(app: tether.Tether) -> None:
    """A finished run, or one still held, is refused with why; the old holder can no longer write."""
    app.register_planner(
        "small", tether.ScriptedPlanner([("pay.refund", {"cents": 10})])
    )
    finished = app.start("refund 10", planner="small", principal=BOT)
    with pytest.raises(tether.UsageError, match="not parked"):
        app.resume(finished.id)


def test_the_old_holder_of_a_resumed_run_cannot_write(app: tether.Tether) -> None:
    """Resume bumps the lease epoch: the handle that parked the run is a zombie now."""
    run = app.start("refund two", planner="refunds", principal=BOT)
    (request,) = app.approvals(status="pending")
    app.approve(request.id, by="alice")
    app.resume(run.id)

    with pytest.raises(tether.errors.LeaseLost, match="epoch"):
        run.transition(RunState.EXECUTING)


def test_tether_runs_resume_continues_a_parked_run(
    app: tether.Tether,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`tether runs resume RUN --app MODULE:ATTR` resumes with the app's planner; exit 0 once it succeeded."""
    run = app.start("refund two", planner="refunds", principal=BOT)
    (request,) = app.approvals(status="pending")
    module = types.ModuleType("resume_target")
    module.app = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "resume_target", module)

    waiting = tether.cli.main(["runs", "resume", run.id, "--app", "resume_target:app"])
    parked = capsys.readouterr().out
    app.approve(request.id, by="alice")
    finished = tether.cli.main(
        ["runs", "resume", run.id, "--app", "resume_target:app", "--json"]
    )
    document = json.loads(capsys.readouterr().out)

    assert (waiting, "awaiting_approval" in parked) == (1, True)
    assert finished == 0
    assert document == {"format": 1, "run_id": run.id, "status": "succeeded"}
    assert done == [50, 500]


def test_two_resumers_never_run_one_run_twice(tmp_path: Path) -> None:
    """Two apps on one file resume the same approved run at once, 20 times: one runs it, the grant runs once."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "rules:\n"
        "  - {id: big, match: {capability: pay.refund}, when: 'args.cents > 100',\n"
        "     decision: require_approval, reason: big, approvers: [finance]}\n"
        "approvers: {alice: [finance]}\n"
    )
    db = f"sqlite:///{tmp_path / 't.db'}?synchronous=normal"
    apps = [tether.Tether(db=db, config=config, env={}) for _ in range(2)]
    script = tether.ScriptedPlanner([("pay.refund", {"cents": 500})])
    for a in apps:
        a.register(refund)
        a.register_planner("one", script)
    try:
        for _ in range(20):
            done.clear()
            run = apps[0].start("refund", planner="one", principal=BOT)
            (request,) = apps[0].approvals(status="pending")
            apps[0].approve(request.id, by="alice")
            barrier = threading.Barrier(2)
            results: list[str] = []

            def resume(
                a: tether.Tether,
                run_id: str = run.id,
                barrier: threading.Barrier = barrier,
                results: list[str] = results,
            ) -> None:
                barrier.wait()
                try:
                    results.append(a.resume(run_id).status.value)
                except tether.TetherError as exc:
                    results.append(exc.code)

            threads = [threading.Thread(target=resume, args=(a,)) for a in apps]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)

            assert done == [500], results
            assert "succeeded" in results, results
            assert apps[0].verify(run.id).ok
    finally:
        for a in apps:
            a.close()


class PingIn(BaseModel):
    n: int


class PingOut(BaseModel):
    n: int


upstream: dict[str, object] = {"broken": True, "calls": []}


@tether.capability("up.call", effect="write", idempotency="keyed", resource="up")
def up_call(args: PingIn) -> PingOut:
    """Call a flaky upstream."""
    calls = upstream["calls"]
    assert isinstance(calls, list)
    calls.append(args.n)
    if upstream["broken"]:
        raise RuntimeError("upstream 503")
    return PingOut(n=args.n)


def test_a_stashed_run_resumes_its_plan_once_the_breaker_lets_calls_through(
    tmp_path: Path,
) -> None:
    """A stash-mode breaker parks the run degraded; once the cool-down is over it is ready, and resume takes the stashed step, then the planner goes on."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "breakers:\n"
        "  - {id: up-br, resource: up, window: 2, min_calls: 2, failure_rate: 0.5,\n"
        "     open_for: 30s, on_open: stash}\n"
    )
    upstream.update(broken=True, calls=[])
    clock = FakeClock()
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 't.db'}?synchronous=normal",
        config=config,
        clock=clock,
        env={},
    ) as app:
        app.register(up_call)
        app.register_planner(
            "calls",
            tether.ScriptedPlanner([("up.call", {"n": n}) for n in (1, 2, 3, 4)]),
        )
        run = app.start("four calls", planner="calls", principal=BOT)
        parked = (run.status, app.ready_runs())
        clock.advance(timedelta(seconds=31))
        upstream["broken"] = False
        ready = app.ready_runs()
        resumed = app.resume(run.id)
        ok = app.verify(run.id).ok
        kinds = [e.data()["kind"] for e in app.store.events(run.id)]

    assert parked == (RunState.DEGRADED, [])  # the breaker is still open
    assert ready == [run.id]
    assert resumed.status is RunState.SUCCEEDED
    assert upstream["calls"] == [1, 2, 3, 4]  # 3 was stashed, not run, then run once
    assert kinds.count("plan_stashed") == 1
    assert ok


class SendArgs(BaseModel):
    to: str
    token: tether.Secret


sent: list[tuple[str, str]] = []


@tether.capability("up.send", effect="write", idempotency="keyed", resource="up")
def up_send(args: SendArgs) -> PingOut:
    """Send through the flaky upstream with a credential."""
    if upstream["broken"]:
        raise RuntimeError("upstream 503")
    sent.append((args.to, str.__str__(args.token)))
    return PingOut(n=len(sent))


def _stash_on_failure(tmp_path: Path) -> tuple[Path, FakeClock]:
    """A tether.yaml whose breaker on `up` opens at one failure and stashes; a
    broken upstream; a fake clock."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "breakers:\n"
        "  - {id: up-br, resource: up, window: 1, min_calls: 1, failure_rate: 1,\n"
        "     open_for: 30s, on_open: stash}\n"
    )
    upstream.update(broken=True, calls=[])
    sent.clear()
    return config, FakeClock()


def test_a_stashed_step_with_secrets_keeps_them_out_of_the_record_and_resumes_with_the_real_ones(
    tmp_path: Path,
) -> None:
    """A stash-mode breaker parks a plan whose steps carry credentials: the
    record (and its export) holds them masked, never in clear, and resuming
    hands those steps back to the planner, which sends them with the real
    credentials, not the mask."""
    config, clock = _stash_on_failure(tmp_path)
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 't.db'}?synchronous=normal",
        config=config,
        clock=clock,
        env={},
    ) as app:
        app.register(up_call, up_send)
        app.register_planner(
            "pay",
            tether.ScriptedPlanner(
                [
                    ("up.call", {"n": 1}),  # fails and opens the breaker
                    ("up.send", {"to": "alice", "token": "sk-live-AAAA1111"}),
                    ("up.send", {"to": "bob", "token": "sk-live-BBBB2222"}),
                ]
            ),
        )
        run = app.start("pay two people", planner="pay", principal=BOT)
        parked = run.status
        clock.advance(timedelta(seconds=31))
        upstream["broken"] = False
        resumed = app.resume(run.id)
        exported = b"".join(app.export(run.id))

    assert parked is RunState.DEGRADED
    assert resumed.status is RunState.SUCCEEDED
    assert sent == [("alice", "sk-live-AAAA1111"), ("bob", "sk-live-BBBB2222")]
    assert b"sk-live-" not in exported


class LooseSendArgs(BaseModel):
    to: str
    extra: dict[str, Any]
    """Free-form: a SecretStr in it is masked by no schema."""


@tether.capability("up.send_loose", effect="write", idempotency="keyed", resource="up")
def up_send_loose(args: LooseSendArgs) -> PingOut:
    """Send through the flaky upstream with a credential in a free-form field."""
    if upstream["broken"]:
        raise RuntimeError("upstream 503")
    token = args.extra["token"]
    clear = token.get_secret_value() if isinstance(token, SecretStr) else token
    sent.append((args.to, clear))
    return PingOut(n=len(sent))


def test_a_stashed_step_with_a_secret_in_a_free_form_field_resumes_with_it(
    tmp_path: Path,
) -> None:
    """The same as above when the credential rides in an `Any` field: the
    record masks it, so resuming must not send the mask upstream."""
    config, clock = _stash_on_failure(tmp_path)
    secret = SecretStr("sk-live-CCCC3333")
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 't.db'}?synchronous=normal",
        config=config,
        clock=clock,
        env={},
    ) as app:
        app.register(up_call, up_send_loose)
        app.register_planner(
            "pay",
            tether.ScriptedPlanner(
                [
                    ("up.call", {"n": 1}),  # fails and opens the breaker
                    ("up.send_loose", {"to": "carol", "extra": {"token": secret}}),
                ]
            ),
        )
        run = app.start("pay carol", planner="pay", principal=BOT)
        parked = run.status
        clock.advance(timedelta(seconds=31))
        upstream["broken"] = False
        resumed = app.resume(run.id)
        exported = b"".join(app.export(run.id))

    assert parked is RunState.DEGRADED
    assert resumed.status is RunState.SUCCEEDED
    assert sent == [("carol", "sk-live-CCCC3333")]
    assert b"sk-live-" not in exported


class WipeIn(BaseModel):
    volume: str


class WipeOut(BaseModel):
    wiped: bool


def _wipe_preview(args: WipeIn) -> WipeOut:
    return WipeOut(wiped=False)


@tether.capability(
    "disk.wipe",
    effect="write",
    idempotency="keyed",
    dry_run=_wipe_preview,
    requires_approval=True,
)
def wipe(args: WipeIn) -> WipeOut:
    """Wipe a volume."""
    return WipeOut(wiped=True)


def test_a_capability_that_always_needs_approval_asks_even_when_policy_allows(
    tmp_path: Path,
) -> None:
    """`requires_approval=True`: a durable request naming the capability, whatever the rules allow; once approved it runs."""
    config = tmp_path / "tether.yaml"
    config.write_text("defaults: {write: allow}\napprovers: {alice: [ops]}\n")
    with tether.Tether(db="memory://", config=config, clock=FakeClock(), env={}) as app:
        app.register(wipe)
        with app.run(principal=BOT, request="wipe") as run:
            first = run.step("disk.wipe", {"volume": "scratch"})
            assert isinstance(first.error, tether.ApprovalRequired)
            request_id = first.error.approval_id
            assert request_id is not None
            request = app.approval(request_id)
            app.approve(request_id, by="alice")
            second = run.step("disk.wipe", {"volume": "scratch"})

    assert request.rule_ids == ("capability:disk.wipe",)
    assert request.preview is not None
    assert second.status == "executed"


def test_an_escalating_breaker_asks_a_person_who_may_let_one_call_through(
    tmp_path: Path,
) -> None:
    """`on_open: escalate`: the refused call is a durable request naming the breaker; approved, that call runs once despite the open breaker."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "breakers:\n"
        "  - {id: up-br, resource: up, window: 2, min_calls: 2, failure_rate: 0.5,\n"
        "     open_for: 5m, on_open: escalate}\n"
        "approvers: {alice: [sre]}\n"
    )
    upstream.update(broken=True, calls=[])
    with tether.Tether(db="memory://", config=config, clock=FakeClock(), env={}) as app:
        app.register(up_call)
        with app.run(principal=BOT, request="calls") as run:
            run.step("up.call", {"n": 1})
            run.step("up.call", {"n": 2})  # the breaker opens
            upstream["broken"] = False
            asked = run.step("up.call", {"n": 3})
            assert isinstance(asked.error, tether.ApprovalRequired)
            request_id = asked.error.approval_id
            assert request_id is not None
            request = app.approval(request_id)
            app.approve(request_id, by="alice", note="the upstream is back")
            through = run.step("up.call", {"n": 3})
            again = run.step("up.call", {"n": 3})
        breaker = app.store.breaker_row("up-br")

    assert request.rule_ids == ("breaker:up-br",)
    assert through.status == "executed"
    assert isinstance(again.error, tether.ApprovalRequired)  # one call per grant
    assert upstream["calls"] == [1, 2, 3]
    assert breaker.state == "open"  # the grant let a call past it, nothing more


class SlowIn(BaseModel):
    n: int


class SlowOut(BaseModel):
    n: int


slow_gate = threading.Event()
slow_inside = threading.Event()


@tether.capability("ops.slow", effect="write", idempotency="keyed", timeout=1.5)
def slow(args: SlowIn) -> SlowOut:
    """A step that takes a while."""
    slow_inside.set()
    assert slow_gate.wait(timeout=10)
    return SlowOut(n=args.n)


def test_a_slow_step_within_its_lease_is_not_taken_over(tmp_path: Path) -> None:
    """RELIABILITY A, slow step vs lease TTL: while a live writer's step runs, no worker sees its run as ready or may take it."""
    config = tmp_path / "tether.yaml"
    config.write_text("idempotency: {claim_ttl: 2s}\n")
    db = f"sqlite:///{tmp_path / 't.db'}?synchronous=normal"
    slow_gate.clear()
    slow_inside.clear()
    with (
        tether.Tether(db=db, config=config, env={}) as owner,
        tether.Tether(db=db, config=config, env={}) as worker,
    ):
        for a in (owner, worker):
            a.register(slow)
            a.register_planner("slow", tether.ScriptedPlanner([("ops.slow", {"n": 1})]))
        runs: list[tether.Run] = []
        thread = threading.Thread(
            target=lambda: runs.append(
                owner.start("slow", planner="slow", principal=BOT)
            )
        )
        thread.start()
        try:
            assert slow_inside.wait(timeout=10)
            (row,) = worker.store.list_runs()
            ready = worker.ready_runs()
            with pytest.raises(tether.UsageError, match="not parked"):
                worker.resume(row.run_id)
        finally:
            slow_gate.set()
            thread.join(timeout=10)

    assert ready == []
    assert runs[0].status is RunState.SUCCEEDED


long_calls: list[int] = []


@tether.capability("ops.long", effect="write", idempotency="keyed")
def long_step(args: SlowIn) -> SlowOut:
    """A step with no timeout that outlasts the claim TTL."""
    long_calls.append(args.n)
    slow_inside.set()
    assert slow_gate.wait(timeout=10)
    return SlowOut(n=args.n)


def test_a_step_longer_than_the_claim_ttl_is_kept_alive_and_never_run_twice(
    tmp_path: Path,
) -> None:
    """RELIABILITY A, slow step vs lease TTL: a handler with no timeout runs
    three times the claim TTL; the live process renews its run's lease and the
    step's key claim meanwhile, so no worker sees the run as orphaned, none can
    take it over, and the step runs once."""
    config = tmp_path / "tether.yaml"
    config.write_text("idempotency: {claim_ttl: 1s}\n")
    db = f"sqlite:///{tmp_path / 't.db'}?synchronous=normal"
    slow_gate.clear()
    slow_inside.clear()
    long_calls.clear()
    with (
        tether.Tether(db=db, config=config, env={}) as owner,
        tether.Tether(db=db, config=config, env={}) as worker,
    ):
        for a in (owner, worker):
            a.register(long_step)
            a.register_planner("long", tether.ScriptedPlanner([("ops.long", {"n": 1})]))
        runs: list[tether.Run] = []
        thread = threading.Thread(
            target=lambda: runs.append(
                owner.start("long", planner="long", principal=BOT)
            )
        )
        thread.start()
        try:
            assert slow_inside.wait(timeout=10)
            time.sleep(3)  # three claim TTLs: every lease written at the intent is out
            (row,) = worker.store.list_runs()
            ready = worker.ready_runs()
            with pytest.raises(tether.UsageError, match="not parked"):
                worker.resume(row.run_id)
            key = worker.store.lookup_key(
                tether.store.KeyId(
                    tenant=BOT.tenant,
                    principal_id=BOT.id,
                    capability="ops.long",
                    key=f"{row.run_id}/1",
                )
            )
            now = worker.clock.now()
        finally:
            slow_gate.set()
            thread.join(timeout=10)

    assert ready == []
    assert row.lease_until is not None
    assert row.lease_until > now - timedelta(seconds=1)
    assert key is not None
    assert key.state is tether.store.KeyState.IN_PROGRESS
    assert key.lease_until > now
    assert runs[0].status is RunState.SUCCEEDED
    assert long_calls == [1]
