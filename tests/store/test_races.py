"""Writers racing on one database: exactly one wins (RELIABILITY.md F.37).

Each racer is a thread with a store of its own, as a worker process has: on
SQLite its own connection to the file, on PostgreSQL its own pool. A barrier
releases them together, so the race is real on every run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

import tether
from tether import record
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Claim,
    KeyId,
    NewRun,
    Store,
    open_store,
)

from .test_conformance import pending_request

T = TypeVar("T")

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RACERS = 8
KEY = KeyId(tenant="acme", principal_id="pay-bot", capability="pay.charge", key="k-1")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database that several stores share."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'shared.db'}?synchronous=normal"


@pytest.fixture
def stores(url: str) -> Iterator[list[Store]]:
    """One store per racer, all on the same database."""
    opened = [open_store(url, record_key=b"race-key") for _ in range(RACERS)]
    yield opened
    for s in opened:
        s.close()


def race(stores: list[Store], attempt: Callable[[Store], T]) -> list[T | Exception]:
    """Run `attempt` on every store at once; return each result or error, in order."""
    barrier = threading.Barrier(len(stores))
    results: list[T | Exception] = [RuntimeError("did not run")] * len(stores)

    def run(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[i] = attempt(stores[i])
        except Exception as exc:  # the race's losers are the answer
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def create_run(
    store: Store, run_id: str, *, status: str = "executing", claim: Claim | None = None
) -> None:
    """Create a run in `status` with its first event."""
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
                status=status,
                created_at=T0,
            ),
            claim=claim,
            at=T0,
        )
    )
    assert committed.conflict is None


def verified(store: Store, run_id: str) -> bool:
    """Tell whether a run's chain verifies against its signed head."""
    row = store.get_run(run_id)
    report = record.verify(
        run_id,
        store.events(run_id),
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        key=store.record_key,
    )
    return report.ok


def test_racing_workers_move_each_parked_run_on_exactly_once(
    stores: list[Store],
) -> None:
    """Eight workers resume the same six parked runs at once: each run is moved on by exactly one; a worker whose take-over was overtaken is fenced off."""
    runs = [f"run_{i}" for i in range(6)]
    for run_id in runs:
        create_run(stores[0], run_id, status="awaiting_approval")

    def take_all(store: Store) -> list[str]:
        won = []
        for run_id in runs:
            try:
                row = store.take_over(run_id, parked=["awaiting_approval"])
                # A worker that holds a run moves it on, as resuming does.
                store.commit(
                    Batch(
                        run_id=run_id,
                        epoch=row.epoch,
                        base_seq=row.head_seq,
                        base_hash=row.head_hash,
                        events=[
                            record.RunStatus(
                                at=T0, previous="awaiting_approval", status="executing"
                            )
                        ],
                        status="executing",
                        at=T0,
                    )
                )
            except tether.UsageError:
                continue  # no longer parked: another worker moved it on
            except tether.LeaseLost:
                continue  # another worker took it over after this one
            won.append(run_id)
        return won

    results = race(stores, take_all)

    assert [r for r in results if isinstance(r, Exception)] == []
    won = [run_id for r in results if isinstance(r, list) for run_id in r]
    assert sorted(won) == runs
    for run_id in runs:
        assert stores[0].get_run(run_id).status == "executing"
        assert [e.data()["kind"] for e in stores[0].events(run_id)] == [
            "run_started",
            "run_status",
        ]
        assert verified(stores[0], run_id)


def test_racing_claims_of_one_key_let_exactly_one_through(stores: list[Store]) -> None:
    """Eight runs claim the same key at once: one claim is taken, seven conflict, and only the winner's intent is written."""
    for i, store in enumerate(stores):
        create_run(store, f"run_{i}")

    def claim(store: Store) -> bool:
        run_id = f"run_{stores.index(store)}"
        row = store.get_run(run_id)
        committed = store.commit(
            Batch(
                run_id=run_id,
                epoch=1,
                base_seq=row.head_seq,
                base_hash=row.head_hash,
                events=[
                    record.Intent(
                        at=T0, step=1, capability="pay.charge", version="1", key=KEY.key
                    )
                ],
                claim=Claim(
                    id=KEY,
                    fingerprint=b"\x01" * 32,
                    run_id=run_id,
                    step=1,
                    now=T0,
                    lease_until=T0 + timedelta(minutes=5),
                    retention=timedelta(hours=1),
                    take_over_stale=True,
                ),
                at=T0,
            )
        )
        return committed.conflict is None

    results = race(stores, claim)

    assert sorted(map(str, results)) == ["False"] * 7 + ["True"]
    winner = f"run_{results.index(True)}"
    held = stores[0].lookup_key(KEY)
    assert held is not None
    assert held.run_id == winner
    intents = [
        run_id
        for run_id in (f"run_{i}" for i in range(RACERS))
        if len(stores[0].events(run_id)) == 2
    ]
    assert intents == [winner]


def test_racing_decisions_on_one_request_let_exactly_one_apply(
    stores: list[Store],
) -> None:
    """Eight people approve one request at once: one decision applies, seven are refused as closed, and all eight are recorded in one verifying chain."""
    create_run(stores[0], "run_a", status="awaiting_approval")
    row = stores[0].get_run("run_a")
    request = pending_request("apr_race", "run_a", digest=b"\x03" * 32, at=T0)
    committed = stores[0].commit(
        Batch(
            run_id="run_a",
            epoch=1,
            base_seq=row.head_seq,
            base_hash=row.head_hash,
            events=[record.RunStatus(at=T0, previous="executing", status="parked")],
            approval=request,
            at=T0,
        )
    )
    assert committed.blocked is None

    def decide(store: Store) -> ApprovalRow:
        who = f"person-{stores.index(store)}"
        return store.decide_approval(
            "apr_race",
            status=ApprovalStatus.APPROVED,
            by=who,
            note=None,
            now=T0 + timedelta(minutes=1),
            event=lambda r, refused: record.ApprovalDecided(
                approval_id=r.id,
                at=T0 + timedelta(minutes=1),
                by=who,
                outcome="refused" if refused else "approved",
                reason=refused,
            ),
        )

    results = race(stores, decide)

    applied = [r for r in results if isinstance(r, ApprovalRow)]
    closed = [r for r in results if isinstance(r, tether.ApprovalClosed)]
    assert (len(applied), len(closed)) == (1, 7)
    final = stores[0].get_approval("apr_race")
    assert final.status is ApprovalStatus.APPROVED
    assert final.decided_by == applied[0].decided_by
    outcomes = [
        e.data()["outcome"]
        for e in stores[0].events("run_a")
        if e.data()["kind"] == "approval_decided"
    ]
    assert sorted(outcomes) == ["approved"] + ["refused"] * 7
    assert verified(stores[0], "run_a")
