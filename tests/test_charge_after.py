"""A read whose limits only count is charged after it answers, in the write that records it.

A read acts on nothing, so it may run before its quota or budget is checked:
the check, the charge and the record are then one write (one commit on SQLite,
one transaction on PostgreSQL) instead of an intent before and a result after.
When the limit has no room by then, the step is refused and its answer dropped,
and nothing is charged. Limits that bound a call while it happens (a
concurrency cap, a rate, a budget's throttle) are still taken before it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether.record import OutcomeStatus
from tether.replay import RecordedRun, Replayer
from tether.store import Batch, Committed, Store
from tether.testing import FakeClock

PRINCIPAL = tether.Principal("ops-bot", tenant="acme")


class MetricsArgs(BaseModel):
    n: int


class MetricsValue(BaseModel):
    n: int


CALLS: list[int] = []


@tether.capability("metrics.read", effect="read", cost=2)
def query(args: MetricsArgs) -> MetricsValue:
    CALLS.append(args.n)
    return MetricsValue(n=args.n)


class Counting:
    """Wraps a store's `commit` to count the writes a step makes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.real = store.commit
        self.batches: list[Batch] = []

    def __call__(self, batch: Batch) -> Committed:
        self.batches.append(batch)
        return self.real(batch)


@pytest.fixture(
    params=["sqlite", "memory", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def app_for(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Return a function that opens an app with `limits` on each backend."""
    opened: list[tether.Tether] = []
    fresh: Callable[[], str] | None = (
        request.getfixturevalue("postgres_urls")
        if request.param == "postgres"
        else None
    )

    def make(limits: str) -> tuple[tether.Tether, Counting]:
        config = tmp_path / f"tether-{len(opened)}.yaml"
        config.write_text(f"limits:\n{limits}")
        if fresh is not None:
            db = fresh()
        elif request.param == "memory":
            db = "memory://"
        else:
            db = f"sqlite:///{tmp_path / f'{len(opened)}.db'}?synchronous=normal"
        app = tether.Tether(db=db, config=config, clock=FakeClock(), env={})
        app.register(query)
        counting = Counting(app.store)
        app.store.commit = counting  # type: ignore[method-assign]  # counts writes
        opened.append(app)
        return app, counting

    CALLS.clear()
    yield make
    for app in opened:
        app.close()


def kinds(app: tether.Tether, run_id: str) -> list[str]:
    return [e.data()["kind"] for e in app.store.events(run_id)][2:]  # after the start


def test_a_read_under_a_budget_is_checked_charged_and_recorded_in_one_write(
    app_for: Any,
) -> None:
    app, writes = app_for(
        "  - {id: reads, kind: budget, scope: tenant, per: day, amount: 10}\n"
    )
    with app.run(principal=PRINCIPAL, request="read") as run:
        before = len(writes.batches)
        out = run.call("metrics.read", {"n": 1})
        during = len(writes.batches) - before

    assert out.n == 1
    assert during == 1
    assert kinds(app, run.id)[:4] == [
        "validated",
        "decided",
        "limit_reserved",
        "executed",
    ]
    rows = {r.limit_id: r for r in app.store.limit_rows(app.clock.now())}
    assert rows["reads"].used == Decimal(2)


def test_a_read_past_its_budget_is_refused_after_answering_and_charged_nothing(
    app_for: Any,
) -> None:
    app, _ = app_for(
        "  - {id: reads, kind: budget, scope: tenant, per: day, amount: 5}\n"
    )
    with app.run(principal=PRINCIPAL, request="read") as run:
        outcomes = [run.step("metrics.read", {"n": n}) for n in range(3)]

    assert [o.status for o in outcomes] == [
        OutcomeStatus.EXECUTED,
        OutcomeStatus.EXECUTED,
        OutcomeStatus.REFUSED,
    ]
    refused = outcomes[-1].error
    assert isinstance(refused, tether.LimitExceeded)
    assert refused.limit_id == "reads"
    assert CALLS == [0, 1, 2]  # the third read ran: it acts on nothing
    step3 = [e.data() for e in app.store.events(run.id) if e.data().get("step") == 3]
    assert [e["kind"] for e in step3][-2:] == ["limit_refused", "failed"]
    assert "executed" not in [e["kind"] for e in step3]
    rows = {r.limit_id: r for r in app.store.limit_rows(app.clock.now())}
    assert rows["reads"].used == Decimal(4)  # the refused read charged nothing


def test_a_quota_counts_reads_charged_after_and_refuses_past_its_max(
    app_for: Any,
) -> None:
    app, _ = app_for("  - {id: reads, kind: quota, scope: run, per: run, max: 2}\n")
    with app.run(principal=PRINCIPAL, request="read") as run:
        statuses = [run.step("metrics.read", {"n": n}).status for n in range(3)]

    assert statuses[:2] == [OutcomeStatus.EXECUTED, OutcomeStatus.EXECUTED]
    assert statuses[2] is OutcomeStatus.REFUSED


@tether.capability("metrics.peek", effect="read", cost=1)
def peek(args: MetricsArgs) -> MetricsValue:
    CALLS.append(-args.n)
    return MetricsValue(n=args.n)


def test_reads_past_a_full_counter_stop_reaching_the_upstream(app_for: Any) -> None:
    """The first read past a full quota runs and is refused after it answered;
    the next ones check first and are refused before they run, until the
    window turns: a quota guards a paid or rate-limited upstream too."""
    app, writes = app_for(
        "  - {id: reads, kind: quota, scope: tenant, per: day, max: 2}\n"
    )
    with app.run(principal=PRINCIPAL, request="read") as run:
        statuses = [run.step("metrics.read", {"n": n}).status for n in range(6)]
        assert statuses == [OutcomeStatus.EXECUTED] * 2 + [OutcomeStatus.REFUSED] * 4
        assert CALLS == [0, 1, 2]  # the third ran; the last three did not

        app.clock.advance(timedelta(days=1))  # a new window: room again
        before = len(writes.batches)
        out = run.call("metrics.read", {"n": 7})
        assert (out.n, len(writes.batches) - before) == (7, 1)  # charged after again
    assert CALLS == [0, 1, 2, 7]
    refused = [
        e.data() for e in app.store.events(run.id) if e.data().get("step") in (4, 5, 6)
    ]
    assert [e["kind"] for e in refused].count("limit_refused") == 3
    assert "executed" not in [e["kind"] for e in refused]
    report = Replayer(app).replay(RecordedRun.from_store(app.store, run.id))
    assert report.ok, report.to_json()


def test_a_run_refused_before_reading_by_another_runs_full_counter_replays(
    app_for: Any,
) -> None:
    """The hint that made a read check first came from another run: replayed
    alone, the run's refusals and answers are the same."""
    app, _ = app_for("  - {id: reads, kind: quota, scope: tenant, per: day, max: 1}\n")
    with app.run(principal=PRINCIPAL, request="fill") as first:
        statuses = [first.step("metrics.read", {"n": n}).status for n in range(2)]
    with app.run(principal=PRINCIPAL, request="read") as run:
        refused = run.step("metrics.read", {"n": 5})

    assert statuses == [OutcomeStatus.EXECUTED, OutcomeStatus.REFUSED]
    assert refused.status is OutcomeStatus.REFUSED
    assert CALLS == [0, 1]  # the second run's read never reached the upstream
    for run_id in (first.id, run.id):
        report = Replayer(app).replay(RecordedRun.from_store(app.store, run_id))
        assert report.ok, report.to_json()


def test_a_read_that_fits_a_full_counter_again_clears_the_check_first(
    app_for: Any,
) -> None:
    """A budget one read found full may still fit a cheaper read: it is taken
    before it runs, and once it fit, reads are charged after they answer again."""
    app, writes = app_for(
        "  - {id: reads, kind: budget, scope: tenant, per: day, amount: 5}\n"
    )
    app.register(peek)
    with app.run(principal=PRINCIPAL, request="read") as run:
        first = [run.step("metrics.read", {"n": n}).status for n in range(3)]
        before = len(writes.batches)
        fits = run.step("metrics.peek", {"n": 1}).status
        checked_first = len(writes.batches) - before
        last = run.step("metrics.read", {"n": 9}).status

    assert first[-1] is OutcomeStatus.REFUSED
    assert (fits, checked_first) == (OutcomeStatus.EXECUTED, 2)  # intent, then result
    assert last is OutcomeStatus.REFUSED
    assert CALLS == [0, 1, 2, -1, 9]  # charged after again: it ran, then was refused
    rows = {r.limit_id: r.used for r in app.store.limit_rows(app.clock.now())}
    assert rows["reads"] == Decimal(5)


@pytest.mark.parametrize(
    "limit",
    [
        "  - {id: reads, kind: concurrency, max: 2}\n",
        "  - {id: reads, kind: rate, rate: 100/s, burst: 10}\n",
        "  - {id: reads, kind: budget, scope: tenant, per: day, amount: 1000,"
        " throttle: {max_delay: 1s}}\n",
    ],
    ids=["concurrency", "rate", "throttled-budget"],
)
def test_limits_that_bound_a_call_while_it_runs_are_taken_before_it(
    app_for: Any, limit: str
) -> None:
    app, writes = app_for(limit)
    with app.run(principal=PRINCIPAL, request="read") as run:
        before = len(writes.batches)
        run.call("metrics.read", {"n": 1})
        during = len(writes.batches) - before

    assert during == 2  # the reservation before, the result after
    assert "intent" in kinds(app, run.id)


@tether.capability("metrics.flaky", effect="read", cost=2)
def flaky(args: MetricsArgs) -> MetricsValue:
    """A read that fails on every other call (the first one included)."""
    CALLS.append(args.n)
    if len(CALLS) % 2:
        raise ConnectionError("upstream 503")
    return MetricsValue(n=args.n)


RETRY = "retry_budget: {per_run: 5, max_attempts: 3, backoff: 100ms}\n"


@pytest.mark.parametrize(
    ("amount", "status", "last"),
    [
        (10, OutcomeStatus.EXECUTED, ["limit_reserved", "executed"]),
        (1, OutcomeStatus.REFUSED, ["limit_refused", "failed"]),
    ],
)
def test_a_retried_read_charged_after_records_its_checks_once(
    app_for: Any, amount: int, status: OutcomeStatus, last: list[str]
) -> None:
    """The retry's write recorded the read's checks: the write after its answer
    charges it (or refuses it) without writing them again."""
    app, _ = app_for(
        f"  - {{id: reads, kind: budget, scope: tenant, per: day, amount: {amount}}}\n"
        + RETRY
    )
    app.register(flaky)
    with app.run(principal=PRINCIPAL, request="read") as run:
        outcome = run.step("metrics.flaky", {"n": 1})
    recorded = RecordedRun.from_store(app.store, run.id)

    assert outcome.status is status
    assert CALLS == [1, 1]
    assert kinds(app, run.id)[:5] == ["validated", "decided", "retry_scheduled", *last]
    rows = {r.limit_id: r.used for r in app.store.limit_rows(app.clock.now())}
    assert rows.get("reads", Decimal(0)) == (
        2 if status is OutcomeStatus.EXECUTED else 0
    )
    assert app.verify(run.id).ok
    report = Replayer(app).replay(recorded)
    assert report.ok, report.to_json()


def test_a_read_refused_after_answering_replays_under_a_retry_budget(
    app_for: Any,
) -> None:
    """A read refused after it answered keeps no answer in its record; replay
    stands in a failure that is never retried, so a retry budget does not make
    it invent attempts the record never had."""
    app, _ = app_for(
        "  - {id: reads, kind: budget, scope: tenant, per: day, amount: 5}\n" + RETRY
    )
    with app.run(principal=PRINCIPAL, request="read") as run:
        outcomes = [run.step("metrics.read", {"n": n}) for n in range(3)]
    report = Replayer(app).replay(RecordedRun.from_store(app.store, run.id))

    assert outcomes[-1].status is OutcomeStatus.REFUSED
    assert report.ok, report.to_json()
