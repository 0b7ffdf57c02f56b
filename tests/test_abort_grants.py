"""An aborted run's approved, unspent grants are withdrawn: no later run runs the call under them.

The store's part (`Store.decide_approval(..., withdraw=True)`) on every
backend: a withdrawal closes an approved request `expired` in the
withdrawer's name and records it in the request's run, in one transaction;
it races a step spending the grant (approved -> used) with exactly one
winner; it leaves a used, denied, expired or pending request as it is. Then
`Tether.abort`'s part: it withdraws the run's grants, those approved while
it ends the run too, and leaves a grant another run spent alone.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import _cli
import tether
from tether import record
from tether.replay import RecordedRun, Replayer
from tether.scenarios import SCENARIOS
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Committed,
    GrantGone,
    NewRun,
    Store,
    open_store,
)
from tether.testing import FakeClock

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LATER = T0 + timedelta(minutes=1)
WITHDRAWN = T0 + timedelta(minutes=2)
ROUNDS = 40

# -- the store ----------------------------------------------------------------------------


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Store]]:
    """Two stores on one fresh database (on memory, one store twice), as two processes."""
    if request.param == "memory":
        only = open_store("memory://")
        yield [only, only]
        only.close()
        return
    if request.param == "postgres":
        url = str(request.getfixturevalue("postgres_url"))
    else:
        url = f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
    opened = [open_store(url, record_key=b"grant-key") for _ in range(2)]
    yield opened
    for s in opened:
        s.close()


def _create_run(store: Store, run_id: str) -> None:
    committed = store.commit(
        Batch(
            run_id=run_id,
            epoch=1,
            base_seq=0,
            base_hash=record.genesis(run_id),
            events=[record.RunStarted(at=T0, request="r", principal={"id": "pay-bot"})],
            new_run=NewRun(
                tenant="acme",
                principal_id="pay-bot",
                request="r",
                status="executing",
                created_at=T0,
            ),
            at=T0,
        )
    )
    assert committed.conflict is None


def _append(store: Store, run_id: str, **batch: Any) -> Committed:
    row = store.get_run(run_id)
    return store.commit(
        Batch(
            run_id=run_id,
            epoch=row.epoch,
            base_seq=row.head_seq,
            base_hash=row.head_hash,
            at=batch.pop("at", T0),
            **batch,
        )
    )


def _request(store: Store, run_id: str, approval_id: str, n: int = 0) -> ApprovalRow:
    """Ask for approval in `run_id`: a pending request for a call of its own."""
    request = ApprovalRow(
        id=approval_id,
        run_id=run_id,
        step=1,
        tenant="acme",
        principal_id="pay-bot",
        on_behalf_of=None,
        capability="pay.charge",
        version="1",
        args=b"{}",
        preview=None,
        digest=n.to_bytes(32, "big"),
        policy_version="p1",
        rule_ids=("big",),
        reasons=("big charges need a human",),
        approvers=(),
        status=ApprovalStatus.PENDING,
        created_at=T0,
        expires_at=T0 + timedelta(hours=1),
    )
    committed = _append(
        store,
        run_id,
        events=[record.RunStatus(at=T0, previous="executing", status="parked")],
        approval=request,
    )
    assert committed.blocked is None
    return request


def _decided(
    approval_id: str, by: str, outcome: str, at: datetime
) -> Callable[[ApprovalRow, str | None], record.Event]:
    def event(row: ApprovalRow, refused: str | None) -> record.Event:
        return record.ApprovalDecided(
            approval_id=approval_id,
            at=at,
            by=by,
            outcome="refused" if refused else outcome,
            reason=refused,
            step=row.step,
        )

    return event


def _decide(
    store: Store, approval_id: str, status: ApprovalStatus, by: str = "bob"
) -> ApprovalRow:
    return store.decide_approval(
        approval_id,
        status=status,
        by=by,
        note=None,
        now=LATER,
        event=_decided(approval_id, by, status.value, LATER),
    )


def _withdraw(store: Store, approval_id: str) -> ApprovalRow:
    return store.decide_approval(
        approval_id,
        status=ApprovalStatus.EXPIRED,
        by="alice",
        note="withdrawn: the run was aborted",
        now=WITHDRAWN,
        event=_decided(approval_id, "alice", "expired", WITHDRAWN),
        withdraw=True,
    )


def _spend(store: Store, run_id: str, approval_id: str) -> Committed:
    """A step of `run_id` runs under the grant: approved -> used, in its batch."""
    return _append(
        store,
        run_id,
        events=[
            record.ApprovalUsed(
                approval_id=approval_id, at=WITHDRAWN, decided_by="bob", step=1
            )
        ],
        use_grant=approval_id,
        at=WITHDRAWN,
    )


def _verified(store: Store, run_id: str) -> bool:
    row = store.get_run(run_id)
    return record.verify(
        run_id,
        store.events(run_id),
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        key=store.record_key,
    ).ok


def _decisions(store: Store, run_id: str) -> list[tuple[str, str]]:
    return [
        (e.data()["by"], e.data()["outcome"])
        for e in store.events(run_id)
        if e.data()["kind"] == "approval_decided"
    ]


def test_a_withdrawn_grant_is_expired_in_the_withdrawers_name_and_recorded(
    stores: list[Store],
) -> None:
    """Approved, then withdrawn: expired by alice with her note, recorded in one verifying chain."""
    store = stores[0]
    _create_run(store, "run_a")
    _create_run(store, "run_b")
    _request(store, "run_a", "apr_1")
    _decide(store, "apr_1", ApprovalStatus.APPROVED)

    withdrawn = _withdraw(stores[1], "apr_1")

    row = store.get_approval("apr_1")
    assert row == withdrawn
    assert (row.status, row.decided_by, row.decided_at, row.note) == (
        ApprovalStatus.EXPIRED,
        "alice",
        WITHDRAWN,
        "withdrawn: the run was aborted",
    )
    assert _decisions(store, "run_a") == [("bob", "approved"), ("alice", "expired")]
    assert _verified(store, "run_a")
    # No step runs under it any more.
    spent = _spend(store, "run_b", "apr_1")
    assert spent.blocked == GrantGone(approval_id="apr_1")
    assert store.get_approval("apr_1").status is ApprovalStatus.EXPIRED
    assert [e.data()["kind"] for e in store.events("run_b")] == ["run_started"]


def test_a_spent_grant_is_not_withdrawn(stores: list[Store]) -> None:
    """Used by a step: the withdrawal is refused as closed (and recorded), the grant stays used."""
    store = stores[0]
    _create_run(store, "run_a")
    _create_run(store, "run_b")
    _request(store, "run_a", "apr_1")
    _decide(store, "apr_1", ApprovalStatus.APPROVED)
    assert _spend(store, "run_b", "apr_1").blocked is None

    with pytest.raises(tether.ApprovalClosed, match="apr_1 is used by bob"):
        _withdraw(stores[1], "apr_1")

    row = store.get_approval("apr_1")
    assert (row.status, row.decided_by, row.note) == (
        ApprovalStatus.USED,
        "bob",
        None,
    )
    assert _decisions(store, "run_a") == [("bob", "approved"), ("alice", "refused")]
    assert _verified(store, "run_a")


@pytest.mark.parametrize(
    "status", [ApprovalStatus.DENIED, ApprovalStatus.EXPIRED, ApprovalStatus.PENDING]
)
def test_a_request_that_is_not_approved_is_not_withdrawn(
    stores: list[Store], status: ApprovalStatus
) -> None:
    """Denied, closed expired or still pending: a withdrawal leaves it as it is."""
    store = stores[0]
    _create_run(store, "run_a")
    _request(store, "run_a", "apr_1")
    if status is not ApprovalStatus.PENDING:
        _decide(store, "apr_1", status)
    before = store.get_approval("apr_1")

    with pytest.raises(tether.ApprovalClosed, match="can be withdrawn"):
        _withdraw(stores[1], "apr_1")

    assert store.get_approval("apr_1") == before
    assert _decisions(store, "run_a")[-1] == ("alice", "refused")
    assert _verified(store, "run_a")


def test_a_withdrawal_closes_a_grant_expired_only(stores: list[Store]) -> None:
    """`withdraw` with another status is a caller's mistake: refused before the store."""
    store = stores[0]
    _create_run(store, "run_a")
    _request(store, "run_a", "apr_1")
    _decide(store, "apr_1", ApprovalStatus.APPROVED)
    before = store.events("run_a")

    with pytest.raises(ValueError, match="closed expired"):
        store.decide_approval(
            "apr_1",
            status=ApprovalStatus.DENIED,
            by="alice",
            note=None,
            now=WITHDRAWN,
            event=_decided("apr_1", "alice", "denied", WITHDRAWN),
            withdraw=True,
        )

    assert store.get_approval("apr_1").status is ApprovalStatus.APPROVED
    assert store.events("run_a") == before


def test_a_step_spending_a_grant_and_its_withdrawal_racing_let_exactly_one_win(
    stores: list[Store],
) -> None:
    """A step of another run spends the grant as the run that asked is aborted, round after round.

    Either the step ran under it (used; the withdrawal refused) or it was
    withdrawn (expired; the step told the grant is gone, nothing written),
    never both and never neither; both records verify.
    """
    spender, withdrawer = stores
    _create_run(spender, "run_b")
    won = {"used": 0, "expired": 0}
    for n in range(ROUNDS):
        run_id, approval_id = f"run_a{n}", f"apr_{n}"
        _create_run(spender, run_id)
        _request(spender, run_id, approval_id, n)
        _decide(spender, approval_id, ApprovalStatus.APPROVED)
        spent_before = len(spender.events("run_b"))
        said = _race(spender, withdrawer, approval_id, delay=0.0005 * (n % 4))

        spent = said["spent"].blocked is None
        withdrawn = isinstance(said["withdrawn"], ApprovalRow)
        assert spent != withdrawn, said
        final = spender.get_approval(approval_id)
        used = [
            e.data()
            for e in spender.events("run_b")[spent_before:]
            if e.data()["kind"] == "approval_used"
        ]
        if spent:
            won["used"] += 1
            assert isinstance(said["withdrawn"], tether.ApprovalClosed)
            assert (final.status, final.decided_by) == (ApprovalStatus.USED, "bob")
            assert [u["approval_id"] for u in used] == [approval_id]
            assert _decisions(spender, run_id)[-1] == ("alice", "refused")
        else:
            won["expired"] += 1
            assert said["spent"].blocked == GrantGone(approval_id=approval_id)
            assert (final.status, final.decided_by) == (ApprovalStatus.EXPIRED, "alice")
            assert used == []
            assert _decisions(spender, run_id)[-1] == ("alice", "expired")
        assert _verified(spender, run_id)
    assert _verified(spender, "run_b")
    assert sum(won.values()) == ROUNDS, won


def _race(
    spender: Store, withdrawer: Store, approval_id: str, *, delay: float
) -> dict[str, Any]:
    """Spend the grant in `run_b` and withdraw it at once; the withdrawal `delay`s."""
    barrier = threading.Barrier(2)
    said: dict[str, Any] = {}

    def spend() -> None:
        barrier.wait(10)
        said["spent"] = _spend(spender, "run_b", approval_id)

    def withdraw() -> None:
        barrier.wait(10)
        threading.Event().wait(delay)  # now one goes first, now the other
        try:
            said["withdrawn"] = _withdraw(withdrawer, approval_id)
        except tether.ApprovalClosed as exc:
            said["withdrawn"] = exc

    threads = [threading.Thread(target=spend), threading.Thread(target=withdraw)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return said


# -- the abort ------------------------------------------------------------------------------

SCENARIO = SCENARIOS["cloud-ops"]
KEY = {"TETHER_RECORD_KEY": "ab" * 32}
CHECK = ("metrics.query", {"service": "checkout"})
RESTART = ("service.restart", {"service": "payments", "reason": "pool exhausted"})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database on each backend."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'tether.db'}"


@pytest.fixture
def app(db: str, clock: FakeClock, tmp_path: Path) -> Iterator[tether.Tether]:
    """An app with the cloud-ops scenario and bob as an approver."""
    config = tmp_path / "tether.yaml"
    config.write_text("approvers: {alice: [sre], bob: [sre]}\n")
    with tether.Tether(db=db, config=config, env=KEY, clock=clock) as opened:
        SCENARIO.setup(opened)
        opened.register_planner("ops", tether.ScriptedPlanner([CHECK, RESTART]))
        yield opened


def _start(app: tether.Tether) -> tether.Run:
    return app.start(
        "check, then restart payments",
        planner="ops",
        principal=SCENARIO.principal,
        context=SCENARIO.context,
    )


def test_abort_withdraws_the_runs_unspent_grant(
    app: tether.Tether, clock: FakeClock, db: str, tmp_path: Path
) -> None:
    """Approved, then aborted: expired by alice, said in the record; verify and replay agree."""
    run = _start(app)
    (request,) = app.approvals(status="pending")
    app.approve(request.id, by="bob")
    clock.advance(timedelta(seconds=5))

    app.abort(run.id, by="alice", reason="do not restart payments after all")

    row = app.approval(request.id)
    assert (row.status, row.decided_by, row.decided_at) == (
        ApprovalStatus.EXPIRED,
        "alice",
        clock.now(),
    )
    assert row.note == (
        f"approval withdrawn unspent: run {run.id} was aborted by alice: "
        "do not restart payments after all"
    )
    events = [e.data() for e in app.store.events(run.id)]
    assert [e["kind"] for e in events[-3:]] == [
        "run_status",
        "run_finished",
        "approval_decided",
    ]
    last = events[-1]
    assert (last["approval_id"], last["by"], last["outcome"], last["note"]) == (
        request.id,
        "alice",
        "expired",
        row.note,
    )
    assert app.verify(run.id).ok
    report = Replayer(app).replay(RecordedRun.from_store(app.store, run.id))
    assert report.divergences == []
    verified = _cli.run(tmp_path, "verify", run.id, "--db", db, env=KEY)
    assert verified.returncode == 0, verified.stderr
    replayed = _cli.run(tmp_path, "replay", run.id, "--json", "--db", db, env=KEY)
    assert replayed.returncode == 0, (replayed.stdout, replayed.stderr)
    assert json.loads(replayed.stdout)["divergences"] == []
    # The same call in a later run goes to a person again.
    assert _start(app).status is tether.RunState.AWAITING_APPROVAL


def test_abort_leaves_a_grant_another_run_spent_as_used(
    app: tether.Tether, clock: FakeClock
) -> None:
    """A later run made the identical call under the grant before the abort: it stays used."""
    first = _start(app)
    (request,) = app.approvals(status="pending")
    app.approve(request.id, by="bob")
    clock.advance(timedelta(seconds=1))
    second = _start(app)  # runs under the first run's grant
    assert second.status is tether.RunState.SUCCEEDED
    assert app.approval(request.id).status is ApprovalStatus.USED

    app.abort(first.id, by="alice", reason="too late, it ran")

    row = app.approval(request.id)
    assert (row.status, row.decided_by) == (ApprovalStatus.USED, "bob")
    kinds = [e.data()["kind"] for e in app.store.events(first.id)]
    assert kinds[-2:] == ["run_status", "run_finished"]
    assert app.verify(first.id).ok


def test_abort_withdraws_a_grant_approved_after_it_ended_the_run(
    app: tether.Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob approves between the abort's end write and its closing of the requests."""
    run = _start(app)
    (request,) = app.approvals(status="pending")
    end = app.store.abort_run

    def end_then_approve(run_id: str, **how: Any) -> Any:
        ended = end(run_id, **how)
        app.approve(request.id, by="bob")
        return ended

    monkeypatch.setattr(app.store, "abort_run", end_then_approve)

    app.abort(run.id, by="alice", reason="stop")

    row = app.approval(request.id)
    assert (row.status, row.decided_by) == (ApprovalStatus.EXPIRED, "alice")
    outcomes = [
        (e.data()["by"], e.data()["outcome"])
        for e in app.store.events(run.id)
        if e.data()["kind"] == "approval_decided"
    ]
    assert outcomes == [("bob", "approved"), ("alice", "expired")]
    assert app.verify(run.id).ok
    report = Replayer(app).replay(RecordedRun.from_store(app.store, run.id))
    assert report.divergences == []
    assert _start(app).status is tether.RunState.AWAITING_APPROVAL


def test_abort_withdraws_a_grant_approved_as_it_closes_the_request(
    app: tether.Tether, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob approves after the abort listed the request pending, before it closed it."""
    run = _start(app)
    (request,) = app.approvals(status="pending")
    listing = app.store.list_approvals

    def list_then_approve(**kwargs: Any) -> list[ApprovalRow]:
        rows = listing(**kwargs)
        if kwargs.get("status") is ApprovalStatus.APPROVED:
            app.approve(request.id, by="bob")  # the pending list was read already
        return rows

    monkeypatch.setattr(app.store, "list_approvals", list_then_approve)

    app.abort(run.id, by="alice", reason="stop")

    row = app.approval(request.id)
    assert (row.status, row.decided_by) == (ApprovalStatus.EXPIRED, "alice")
    outcomes = [
        (e.data()["by"], e.data()["outcome"])
        for e in app.store.events(run.id)
        if e.data()["kind"] == "approval_decided"
    ]
    # The closing found it approved (refused, recorded), then withdrew it.
    assert outcomes == [("bob", "approved"), ("alice", "refused"), ("alice", "expired")]
    assert app.verify(run.id).ok
    report = Replayer(app).replay(RecordedRun.from_store(app.store, run.id))
    assert report.divergences == []
    monkeypatch.undo()
    assert _start(app).status is tether.RunState.AWAITING_APPROVAL
