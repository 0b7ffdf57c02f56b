"""PostgreSQL writes whose answer is lost or late: told apart from a moved head and from a timeout (A.9).

A one-statement write waiting on a row lock goes on running on the server
after its client's socket drops, and commits once the lock frees: its retry
then finds the head moved, by the write itself. A statement or lock timeout
is the server's answer on a live connection, not a lost one: the write is not
sent again. Here the lock is a real transaction's, the socket is really shut
(client side only, as after a network failure), and the timeouts are the
server's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

import tether
from _postgres import with_options
from tether import record
from tether._run_writer import RunWriter
from tether.errors import HeadMoved
from tether.store import (
    Batch,
    Claim,
    Committed,
    KeyId,
    KeyState,
    PostgresStore,
    Store,
    open_store,
)
from tether.store.postgres import parse_url
from tether.testing import FakeClock

from .test_postgres import create_run

pytestmark = pytest.mark.postgres

RUN = "run_a"
KEY = KeyId(tenant="acme", principal_id="bot", capability="pay.charge", key="k-1")


def step(store: Store, *, claim: bool = False) -> Batch:
    """Return a one-event batch on the run's stored head: a status, or an intent claiming `KEY`."""
    row = store.get_run(RUN)
    at = FakeClock().now()
    event = (
        record.Intent(
            at=at, capability=KEY.capability, key=KEY.key, step=1, version="1"
        )
        if claim
        else record.RunStatus(at=at, previous="executing", status="executing")
    )
    return Batch(
        run_id=RUN,
        epoch=row.epoch,
        base_seq=row.head_seq,
        base_hash=row.head_hash,
        events=[event],
        at=at,
        step=1,
        claim=None
        if not claim
        else Claim(
            id=KEY,
            fingerprint=b"\1" * 32,
            run_id=RUN,
            step=1,
            now=at,
            lease_until=at + timedelta(minutes=5),
            retention=timedelta(hours=24),
            take_over_stale=True,
        ),
    )


def lock_the_run(url: str) -> psycopg.Connection:
    """Open a transaction holding the run's row lock (as a decider's would)."""
    side = psycopg.connect(parse_url(url)[0])
    side.execute("SELECT 1 FROM runs WHERE run_id=%s FOR UPDATE", (RUN,))
    return side


def waiters(watch: psycopg.Connection, blockers: list[int]) -> list[tuple[int, int]]:
    """Return (pid, client port) of the sessions waiting on one of `blockers`."""
    return watch.execute(
        "SELECT pid, client_port FROM pg_stat_activity "
        "WHERE pg_blocking_pids(pid) && %s::int[] ORDER BY backend_start",
        (blockers,),
    ).fetchall()


def until(found: Callable[[], list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Poll `found` until it finds something (10 s at most)."""
    for _ in range(200):
        rows = found()
        if rows:
            return rows
        time.sleep(0.05)
    raise AssertionError("nothing came")


def cut_client_socket(port: int) -> None:
    """Shut this process's TCP socket bound to local `port`; the server does not notice."""
    for name in os.listdir("/dev/fd"):
        with contextlib.suppress(OSError):
            s = socket.socket(fileno=os.dup(int(name)))
            try:
                if s.family in (socket.AF_INET, socket.AF_INET6) and (
                    s.getsockname()[1] == port
                ):
                    s.shutdown(socket.SHUT_RDWR)
                    return
            finally:
                s.close()
    raise AssertionError(f"no socket on local port {port}")


def commit_while_cut(
    store: Store, url: str, batch: Batch, write: Callable[[], object]
) -> object:
    """Run `write` while the run is locked; cut its connection; free the lock once the retry waits too."""
    side = lock_the_run(url)
    answer: list[object] = []

    def run() -> None:
        try:
            answer.append(write())
        except Exception as exc:  # the test looks at it
            answer.append(exc)

    thread = threading.Thread(target=run)
    with psycopg.connect(parse_url(url)[0], autocommit=True) as watch:
        thread.start()
        [(lost, port)] = until(lambda: waiters(watch, [side.info.backend_pid]))
        cut_client_socket(port)
        # The lost try still waits on the server; the retry queues behind it.
        until(
            lambda: [
                w for w in waiters(watch, [side.info.backend_pid, lost]) if w[0] != lost
            ]
        )
        side.commit()
        thread.join(20)
    side.close()
    assert len(answer) == 1
    return answer[0]


# -- a write that lands after its connection dropped -----------------------------


@pytest.mark.timeout(60)
def test_a_write_landing_after_its_connection_dropped_is_answered_as_landed(
    postgres_url: str,
) -> None:
    """The lost try commits once the lock frees and its retry fails the fence: `commit` returns the lost try's answer, not `HeadMoved`."""
    store = open_store(postgres_url)
    try:
        create_run(store, RUN)
        batch = step(store)

        answer = commit_while_cut(
            store, postgres_url, batch, lambda: store.commit(batch)
        )

        assert isinstance(answer, Committed), answer
        row = store.get_run(RUN)
        assert (answer.head_seq, answer.head_hash) == (row.head_seq, row.head_hash)
        assert [e.seq for e in store.events(RUN)] == [1, 2]
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_a_run_writer_whose_intent_landed_late_writes_on(postgres_url: str) -> None:
    """The writer's intent lands after its connection dropped: the writer takes its head, and its next write goes on."""
    store = open_store(postgres_url)
    try:
        create_run(store, RUN)
        row = store.get_run(RUN)
        writer = RunWriter(
            store,
            RUN,
            FakeClock(),
            timedelta(minutes=5),
            head=(row.head_seq, row.head_hash),
        )
        intent = step(store, claim=True)

        answer = commit_while_cut(
            store, postgres_url, intent, lambda: writer.commit(intent)
        )
        writer.commit(step(store))

        assert isinstance(answer, Committed), answer
        assert store.get_run(RUN).head_seq == 3
    finally:
        store.close()


class LateAnswer(PostgresStore):
    """A store whose first step write lands but answers `HeadMoved`, as a late landing did."""

    late = True

    def commit(self, batch: Batch) -> Committed:
        committed = super().commit(batch)
        if self.late and batch.new_run is None:
            self.late = False
            raise HeadMoved(f"run {batch.run_id}: the record moved")
        return committed


def test_a_run_writer_told_head_moved_by_its_own_landed_intent_closes_it(
    postgres_url: str,
) -> None:
    """The writer looks at a write refused with `HeadMoved` before its next one: an intent of its own that landed is closed (key failed, step failed), and writing goes on."""
    store = LateAnswer(postgres_url)
    try:
        create_run(store, RUN)
        row = store.get_run(RUN)
        writer = RunWriter(
            store,
            RUN,
            FakeClock(),
            timedelta(minutes=5),
            head=(row.head_seq, row.head_hash),
        )
        with pytest.raises(tether.StoreError):
            writer.commit(step(store, claim=True))
        writer.commit(step(store))

        key = store.lookup_key(KEY)
        assert key is not None
        assert key.state is KeyState.FAILED
        closing = [e.data() for e in store.events(RUN)][2:]
        assert [e["kind"] for e in closing] == ["failed", "run_status"]
        assert closing[0]["stage"] == "intent"
    finally:
        store.close()


# -- a timeout is not a lost connection -------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("setting", "said"),
    [("lock_timeout", "lock timeout"), ("statement_timeout", "statement timeout")],
)
def test_a_timed_out_write_is_one_store_error_naming_the_timeout_sent_once(
    postgres_url: str, setting: str, said: str
) -> None:
    """A write canceled by the server's timeout fails after one timeout, says so on one line, and the connection serves the next write."""
    options = parse_qs(urlsplit(postgres_url).query)["options"][-1]
    url = with_options(postgres_url, options=f"{options} -c{setting}=1000")
    store = open_store(url)
    try:
        create_run(store, RUN)
        batch = step(store)
        side = lock_the_run(postgres_url)
        started = time.monotonic()
        try:
            with pytest.raises(tether.StoreError) as caught:
                store.commit(batch)
        finally:
            took = time.monotonic() - started
            side.rollback()
            side.close()
        store.commit(step(store))

        message = caught.value.message
        assert said in message
        assert setting in message  # what to do: the setting to raise
        assert "lost the connection" not in message
        assert "\n" not in message
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        assert took < 1.8  # one timeout: the write was not sent again
        assert store.get_run(RUN).head_seq == 2
    finally:
        store.close()
