"""The PostgreSQL backend: opening, migrating, and losing the server (A.9).

What every backend must do is in the conformance suites; here is what only
PostgreSQL has: a server to reach, schemas several processes migrate at once,
and connections that die under a running store.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from pydantic import BaseModel

import tether
from _pgcluster import Cluster, throwaway_cluster
from _postgres import with_options
from tether import record
from tether.store import Batch, NewRun, PostgresStore, RunRow, Store, open_store
from tether.store.postgres import parse_url
from tether.testing import FakeClock

pytestmark = pytest.mark.postgres

LATEST = 8
"""The newest migration's number."""


class Note(BaseModel):
    text: str


def closed_port() -> int:
    """Return a local port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_run(store: Store, run_id: str) -> None:
    """Create a run with its first event."""
    at = FakeClock().now()
    store.commit(
        Batch(
            run_id=run_id,
            epoch=1,
            base_seq=0,
            base_hash=record.genesis(run_id),
            events=[record.RunStarted(at=at, request="r", principal={"id": "bot"})],
            new_run=NewRun(
                tenant="acme",
                principal_id="bot",
                request="r",
                status="executing",
                created_at=at,
            ),
            at=at,
        )
    )


def append(store: Store, run_id: str, n: int, *, row: RunRow | None = None) -> None:
    """Append `n` status events to a run, extending `row`'s head (default: the stored one)."""
    row = row or store.get_run(run_id)
    at = FakeClock().now()
    store.commit(
        Batch(
            run_id=run_id,
            epoch=row.epoch,
            base_seq=row.head_seq,
            base_hash=row.head_hash,
            events=[
                record.RunStatus(at=at, previous="executing", status="executing")
                for _ in range(n)
            ],
            at=at,
        )
    )


def chain_ok(store: Store, run_id: str) -> bool:
    """Tell whether a run's events are numbered 1..n without gaps and verify."""
    row = store.get_run(run_id)
    events = store.events(run_id)
    report = record.verify(
        run_id,
        events,
        head_seq=row.head_seq,
        head_hash=row.head_hash,
        head_sig=row.head_sig,
        key=store.record_key,
    )
    return report.ok and [e.seq for e in events] == list(range(1, row.head_seq + 1))


def version(url: str) -> int:
    """Return the schema version stored at `url`."""
    with psycopg.connect(parse_url(url)[0]) as conn:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
    assert row is not None
    return int(row[0])


# -- opening ---------------------------------------------------------------------------


def test_an_unreachable_server_is_one_store_error_without_the_password() -> None:
    """Opening a URL where no server listens raises one line naming the URL (password masked) and what to check."""
    url = f"postgresql://postgres:hunter2@127.0.0.1:{closed_port()}/x"

    with pytest.raises(tether.StoreError) as caught:
        open_store(url)

    message = caught.value.message
    assert message.startswith(
        f"cannot connect to postgresql://postgres:***@127.0.0.1:{url.split(':')[3]}"
    )
    assert message.endswith("check the server is running and the URL")
    assert "\n" not in message
    assert "hunter2" not in message


def test_both_url_schemes_open_a_postgres_store_with_its_pool_size(
    postgres_url: str,
) -> None:
    """`postgresql://` and `postgres://` both open the PostgreSQL backend; `?pool_size` sizes its pool."""
    short = "postgres://" + postgres_url.removeprefix("postgresql://")

    long_store = open_store(with_options(postgres_url, pool_size="2"))
    short_store = open_store(short)
    try:
        assert isinstance(long_store, PostgresStore)
        assert isinstance(short_store, PostgresStore)
        assert long_store._pool.max_size == 2
        assert short_store._pool.max_size == 4
    finally:
        long_store.close()
        short_store.close()


def test_a_fresh_schema_is_migrated_to_the_latest_version(postgres_url: str) -> None:
    """Opening an empty schema creates every table and records the latest version."""
    open_store(postgres_url).close()

    assert version(postgres_url) == LATEST


def test_stores_opening_a_fresh_schema_together_migrate_it_once(
    postgres_url: str,
) -> None:
    """Six stores opening one empty schema at once all open, and the schema is migrated once."""
    barrier = threading.Barrier(6)
    errors: list[Exception] = []
    opened: list[Store] = []

    def open_one() -> None:
        barrier.wait(timeout=10)
        try:
            opened.append(open_store(postgres_url))
        except Exception as exc:  # the test's answer
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for s in opened:
        s.close()

    assert errors == []
    assert len(opened) == 6
    with psycopg.connect(parse_url(postgres_url)[0]) as conn:
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
    assert rows == [(LATEST,)]


def test_a_schema_from_a_newer_tether_is_refused_with_upgrade_advice(
    postgres_url: str,
) -> None:
    """A schema whose version is newer than this tether's raises a one-line `StoreError` and is left alone."""
    open_store(postgres_url).close()
    with psycopg.connect(parse_url(postgres_url)[0]) as conn:
        conn.execute("UPDATE schema_version SET version=99")

    with pytest.raises(tether.StoreError, match="upgrade tether") as caught:
        open_store(postgres_url)

    assert "\n" not in caught.value.message
    assert version(postgres_url) == 99


def test_reopening_keeps_the_records(postgres_url: str) -> None:
    """A run written by one store is read whole, and extended, by the next store on the database."""
    first = open_store(postgres_url, record_key=b"k" * 32)
    create_run(first, "run_a")
    append(first, "run_a", 2)
    first.close()

    second = open_store(postgres_url, record_key=b"k" * 32)
    try:
        append(second, "run_a", 1)
        assert second.get_run("run_a").head_seq == 4
        assert chain_ok(second, "run_a")
    finally:
        second.close()


def test_an_app_records_to_postgres_as_to_sqlite(
    postgres_url: str, clock: FakeClock
) -> None:
    """A `Tether` on a PostgreSQL URL runs a step and its record verifies (heads unsigned without TETHER_RECORD_KEY)."""
    app = tether.Tether(db=postgres_url, env={}, clock=clock)

    @tether.capability("notes.echo")
    def echo(args: Note) -> Note:
        return args

    try:
        app.register(echo)
        with app.run(principal=tether.Principal("bot"), request="echo") as run:
            run.call("notes.echo", {"text": "hi"})
        row = app.store.get_run(run.id)

        assert app.store.record_key is None
        assert row.status == "succeeded"
        assert chain_ok(app.store, run.id)
    finally:
        app.close()


# -- LISTEN/NOTIFY: a decision wakes a waiting worker ----------------------------------


@tether.capability("notes.gated", requires_approval=True)
def gated(args: Note) -> Note:
    return args


def _ask(app: tether.Tether) -> str:
    """Park a step on a new approval request; return the request's id."""
    app.register(gated)
    with app.run(principal=tether.Principal("bot"), request="ask") as run:
        outcome = run.step("notes.gated", {"text": "hi"})
    assert isinstance(outcome.error, tether.ApprovalRequired)
    assert outcome.error.approval_id is not None
    return outcome.error.approval_id


@pytest.mark.timeout(60)
def test_a_decision_wakes_a_waiting_worker_and_one_in_another_schema_does_not(
    postgres_urls: Callable[[], str], tmp_path: Path
) -> None:
    """A wait ends as a request of its schema is decided; a decision in another schema, or none, lets it run out."""
    url, elsewhere = postgres_urls(), postgres_urls()
    config = tmp_path / "tether.yaml"
    config.write_text("approvers: {alice: [ops]}\n")
    waiter, decider, other = (
        tether.Tether(db=u, config=config, env={}) for u in (url, url, elsewhere)
    )
    slept: list[float] = []
    woke: list[float] = []
    try:
        here, there = _ask(decider), _ask(other)
        started = time.monotonic()
        waiter.store.wait_for_news(0.2, slept.append)  # no news: runs out; listens
        quiet = time.monotonic() - started

        def wait() -> None:
            t0 = time.monotonic()
            waiter.store.wait_for_news(30, slept.append)
            woke.append(time.monotonic() - t0)

        thread = threading.Thread(target=wait)
        thread.start()
        other.approve(there, by="alice")
        time.sleep(0.5)
        asleep = not woke
        decider.approve(here, by="alice")
        thread.join(10)
    finally:
        for app in (waiter, decider, other):
            app.close()

    assert quiet >= 0.2
    assert asleep  # another schema's decision is not this store's news
    assert woke  # woken by the decision, 30 s before the wait's end
    assert woke[0] < 5
    assert slept == []  # the server answered: nothing fell back to sleeping


# -- A.9: the server goes away under a running store -----------------------------------


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL server of this test's own, which it may restart."""
    with throwaway_cluster() as c:
        yield c


@pytest.mark.timeout(120)
def test_a_server_restart_costs_at_most_one_failed_write_and_no_gap(
    cluster: Cluster,
) -> None:
    """After a restart the next write raises `StoreError` at most once or succeeds; writes go on, and the chain has no gap and verifies."""
    store = open_store(cluster.url, record_key=b"k" * 32)
    try:
        create_run(store, "run_a")
        append(store, "run_a", 3)

        cluster.restart()
        failures = 0
        for _ in range(3):
            try:
                append(store, "run_a", 2)
            except tether.StoreError:
                failures += 1

        assert failures <= 1
        assert store.get_run("run_a").head_seq == 4 + 2 * (3 - failures)
        assert chain_ok(store, "run_a")
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_writes_fail_closed_while_the_server_is_down_and_resume_after(
    cluster: Cluster,
) -> None:
    """With the server stopped a write raises a one-line `StoreError` and writes nothing; once it is back, reads and writes work."""
    store = open_store(cluster.url, record_key=b"k" * 32)
    try:
        create_run(store, "run_a")
        append(store, "run_a", 1)
        row = store.get_run("run_a")

        cluster.stop()
        with pytest.raises(tether.StoreError) as caught:
            append(store, "run_a", 1, row=row)
        cluster.start()
        append(store, "run_a", 1)

        assert "\n" not in caught.value.message
        assert store.get_run("run_a").head_seq == 3
        assert chain_ok(store, "run_a")
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_waiting_for_news_while_the_server_is_down_sleeps_and_listens_again_after(
    cluster: Cluster,
) -> None:
    """With the server stopped a worker's wait falls back to sleeping; once it is back, it listens again."""
    store = open_store(cluster.url)
    slept: list[float] = []
    try:
        store.wait_for_news(0.01, slept.append)  # listens
        cluster.stop()
        store.wait_for_news(0.01, slept.append)  # the listener is gone: sleeps
        cluster.start()
        store.wait_for_news(0.01, slept.append)  # listens on a new connection
    finally:
        store.close()

    assert slept == [0.01]
