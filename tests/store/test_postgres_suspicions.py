"""PostgreSQL decisions, given-back grants and waits for news, against a real server (A.9).

A decision whose `COMMIT` went out before its connection dropped may land on
the server all the same: the decider is answered as if it had not been cut.
A step that gives back its grant and a decision on that request lock the
request's row and the run's row in one order, so they never deadlock. A store
closed while another thread waits for news closes at once.

Here the server really makes the `COMMIT` wait (a deferred trigger on a lock
the test holds, as a synchronous standby would), the socket is really shut
(client side only, as after a network failure), the race window between two
locks is held open by a real conflicting transaction, and the waiter really
listens.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

import tether
from tether import record
from tether.store import (
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Committed,
    Store,
    open_store,
)
from tether.store.postgres import parse_url
from tether.testing import FakeClock

from .test_conformance import pending_request
from .test_postgres import chain_ok, create_run
from .test_postgres_lost_writes import cut_client_socket, until, waiters

pytestmark = pytest.mark.postgres

RUN = "run_a"
REQUEST = "apr_suspect"
T0 = FakeClock().now()
GATE = 4242
"""The advisory lock a gated `COMMIT` waits for."""


def ask(store: Store) -> None:
    """Create the run and park it on a pending request."""
    create_run(store, RUN)
    row = store.get_run(RUN)
    committed = store.commit(
        Batch(
            run_id=RUN,
            epoch=row.epoch,
            base_seq=row.head_seq,
            base_hash=row.head_hash,
            events=[
                record.RunStatus(
                    at=T0, previous="executing", status="awaiting_approval"
                )
            ],
            status="awaiting_approval",
            approval=pending_request(REQUEST, RUN, principal_id="bot", at=T0),
            at=T0,
        )
    )
    assert committed.blocked is None


def decide(store: Store, by: str) -> ApprovalRow:
    """Approve the request as `by`, recording the decision in the run."""
    at = T0 + timedelta(minutes=1)
    return store.decide_approval(
        REQUEST,
        status=ApprovalStatus.APPROVED,
        by=by,
        note=None,
        now=at,
        event=lambda r, refused: record.ApprovalDecided(
            approval_id=r.id,
            at=at,
            by=by,
            outcome="refused" if refused else "approved",
            reason=refused,
        ),
    )


def step(
    store: Store, *, use_grant: str | None = None, return_grant: str | None = None
) -> Batch:
    """Return a one-event batch on the run's stored head, spending or giving back a grant."""
    row = store.get_run(RUN)
    return Batch(
        run_id=RUN,
        epoch=row.epoch,
        base_seq=row.head_seq,
        base_hash=row.head_hash,
        events=[record.RunStatus(at=T0, previous="executing", status="executing")],
        at=T0 + timedelta(minutes=2),
        use_grant=use_grant,
        return_grant=return_grant,
    )


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Start `fn` in a thread; its answer or error lands in the list."""
    answer: list[object] = []

    def run() -> None:
        try:
            answer.append(fn())
        except Exception as exc:  # the test looks at it
            answer.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, answer


def outcomes(store: Store) -> list[str]:
    """Return the outcomes of the decisions recorded in the run, in order."""
    return [
        e.data()["outcome"]
        for e in store.events(RUN)
        if e.data()["kind"] == "approval_decided"
    ]


# -- a decision that lands after its connection dropped ------------------------


def gate_commits(url: str) -> None:
    """Make the `COMMIT` of a decision wait while the `GATE` advisory lock is held."""
    with psycopg.connect(parse_url(url)[0], autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"PERFORM pg_advisory_xact_lock_shared({GATE}); RETURN NULL; END $$"
        )
        conn.execute(
            "CREATE CONSTRAINT TRIGGER gate AFTER UPDATE ON approvals "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION gate()"
        )


@pytest.mark.timeout(60)
def test_a_decision_landing_after_its_connection_dropped_is_answered_as_made(
    postgres_url: str,
) -> None:
    """The decision's `COMMIT` lands after its socket was cut: the decider is told it approved (not a lost connection, not "already approved by" itself), and the record holds one decision."""
    store = open_store(postgres_url)
    try:
        ask(store)
        gate_commits(postgres_url)
        with (
            psycopg.connect(parse_url(postgres_url)[0], autocommit=True) as gate,
            psycopg.connect(parse_url(postgres_url)[0], autocommit=True) as watch,
        ):
            gate.execute("SELECT pg_advisory_lock(%s)", (GATE,))
            blocker = gate.info.backend_pid
            thread, answer = in_thread(lambda: decide(store, "alice"))
            [(lost, port)] = until(lambda: waiters(watch, [blocker]))
            cut_client_socket(port)
            # The lost try's COMMIT still waits on the server; the retry
            # queues behind its row lock (or the call gave up).
            until(
                lambda: (
                    [w for w in waiters(watch, [blocker, lost]) if w[0] != lost]
                    or ([(0, 0)] if not thread.is_alive() else [])
                )
            )
            gate.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            thread.join(20)

        assert len(answer) == 1
        decided = answer[0]
        assert isinstance(decided, ApprovalRow), decided
        assert (decided.status, decided.decided_by) == (
            ApprovalStatus.APPROVED,
            "alice",
        )
        assert store.get_approval(REQUEST).decided_by == "alice"
        assert outcomes(store) == ["approved"]
        assert chain_ok(store, RUN)
    finally:
        store.close()


# -- a grant given back while its request is decided ---------------------------


@pytest.mark.timeout(60)
def test_a_step_giving_its_grant_back_and_a_decision_on_it_do_not_deadlock(
    postgres_url: str,
) -> None:
    """A step gives back the grant it spent while someone approves the request again: both finish as soon as the step can, without waiting out the server's deadlock detection, and the record verifies."""
    store = open_store(postgres_url)
    other = open_store(postgres_url)  # a second worker's
    try:
        ask(store)
        decide(store, "alice")
        spent = store.commit(step(store, use_grant=REQUEST))
        assert spent.blocked is None
        back = step(store, return_grant=REQUEST)
        with (
            psycopg.connect(parse_url(postgres_url)[0]) as side,
            psycopg.connect(parse_url(postgres_url)[0], autocommit=True) as watch,
        ):
            # Holds the step between locking the run's row and its grant's:
            # an uncommitted event where the step writes its own.
            side.execute(
                "INSERT INTO events (run, seq, kind, step, body, hash) SELECT id, "
                "%s, 'x', 0, '', '' FROM runs WHERE run_id=%s",
                (back.base_seq + 1, RUN),
            )
            (deadlock_timeout,) = watch.execute(
                "SELECT setting::int / 1000.0 FROM pg_settings "
                "WHERE name='deadlock_timeout'"
            ).fetchone() or (1.0,)
            giving, given = in_thread(lambda: store.commit(back))
            [(writer, _)] = until(lambda: waiters(watch, [side.info.backend_pid]))
            deciding, decided = in_thread(lambda: decide(other, "bob"))
            blockers = [side.info.backend_pid, writer]
            until(lambda: [w for w in waiters(watch, blockers) if w[0] != writer])
            side.rollback()
            started = time.monotonic()
            giving.join(20)
            deciding.join(20)
            took = time.monotonic() - started

        assert [type(a) for a in given + decided] == [
            Committed,
            tether.ApprovalClosed,
        ], given + decided
        assert took < float(deadlock_timeout) / 2
        assert store.get_approval(REQUEST).status is ApprovalStatus.APPROVED
        assert outcomes(store) == ["approved", "refused"]
        assert chain_ok(store, RUN)
    finally:
        other.close()
        store.close()


# -- closing while a thread waits for news -------------------------------------


def listener(watch: psycopg.Connection, url: str) -> list[tuple[int, int]]:
    """Return (pid, client port) of the session listening for the store's news."""
    options = parse_qs(urlsplit(url).query)["options"][-1]
    schema = options.removeprefix("-csearch_path=")
    channel = "tether_news_" + hashlib.sha256(schema.encode()).hexdigest()[:16]
    return watch.execute(
        "SELECT pid, client_port FROM pg_stat_activity WHERE query = %s",
        (f'LISTEN "{channel}"',),
    ).fetchall()


@pytest.mark.timeout(60)
def test_closing_a_store_does_not_wait_for_a_thread_waiting_for_news(
    postgres_url: str,
) -> None:
    """Another thread waits 5 s for news: `close` returns at once, the wait ends with it (no sleep instead), and no connection is left, even by a wait after the close."""
    store = open_store(postgres_url)
    slept: list[float] = []
    with psycopg.connect(parse_url(postgres_url)[0], autocommit=True) as watch:
        waiting, _ = in_thread(lambda: store.wait_for_news(5, slept.append))
        until(lambda: listener(watch, postgres_url))

        started = time.monotonic()
        store.close()
        closing = time.monotonic() - started
        waiting.join(5)
        waited = time.monotonic() - started
        store.wait_for_news(5, slept.append)
        again = time.monotonic() - started - waited

        assert closing < 1
        assert waited < 1
        assert again < 1
        assert slept == []
        for _ in range(50):  # the server ends the session as the close reaches it
            if not listener(watch, postgres_url):
                break
            time.sleep(0.02)
        assert listener(watch, postgres_url) == []
