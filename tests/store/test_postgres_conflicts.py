"""Conflicting transactions on PostgreSQL: retried with a bound, never applied twice (F.39).

tether writes at READ COMMITTED and orders its own writers with advisory locks
taken in sorted order, so two tether writers never deadlock each other. Other
transactions on the same database can still conflict with it: a deadlock
(SQLSTATE 40P01) with an outside transaction, or a serialization failure
(40001) from a trigger, an extension or a stricter default isolation. The
server rolls such a transaction back whole; the store tries it again, at most
`RETRIES` more times, and then gives up with one line saying so.

Here the conflicts are real server errors. A trigger on `runs` raises 40001
on the next N updates (armed through a sequence, which a rollback does not
undo); an outside transaction locks a run's row and then the advisory lock
the tether write holds, and the server's deadlock detector picks the tether
write, which waited first. Each test counts the handler's runs, the budget's
charge, the server's deadlock counter and the record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from pydantic import BaseModel

import tether
from _postgres import with_options
from tether.record import OutcomeStatus
from tether.store.postgres._connection import RETRIES
from tether.store.postgres._pipeline import Writer, rollback

pytestmark = pytest.mark.postgres

PRINCIPAL = tether.Principal("pay-bot", tenant="acme")
LIMITS = """\
limits:
  - {id: spend, kind: budget, scope: tenant, per: day, amount: 100}
"""
DEADLINE_S = 20.0

# A serialization failure on the next N updates of `runs`: `setval` arms it
# (the sequence then counts up through the armed values), and since a sequence
# is not transactional, a failed try still uses one value up.
TRIGGER = """
CREATE SEQUENCE tt_conflicts MINVALUE -1000000 START 1;
CREATE FUNCTION tt_conflict() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('tt_conflicts') <= 0 THEN
    RAISE EXCEPTION 'injected conflict' USING ERRCODE = '40001';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER tt_conflict BEFORE UPDATE ON runs
  FOR EACH ROW EXECUTE FUNCTION tt_conflict();
"""


class ChargeIn(BaseModel):
    order: str


class ChargeOut(BaseModel):
    charge_id: str


class Bench:
    """An app on a fresh schema, a side connection to it, and a handler that counts."""

    def __init__(self, url: str, app_url: str, config: Path) -> None:
        self.side = psycopg.connect(url, autocommit=True)
        self.side.execute(
            "SET deadlock_timeout = '30s'"
        )  # never this side's detector: the tether write's, which waits first
        self.effects: list[str] = []
        self.arm_on_effect = 0
        bench = self

        @tether.capability("pay.charge", effect="write", idempotency="keyed", cost=10)
        def charge(args: ChargeIn) -> ChargeOut:
            bench.effects.append(args.order)
            if bench.arm_on_effect:  # the result write, after this, conflicts
                bench.arm(bench.arm_on_effect)
            return ChargeOut(charge_id=f"ch-{args.order}")

        self.app = tether.Tether(db=app_url, config=config, env={})
        self.app.register(charge)

    def install_trigger(self) -> None:
        self.side.execute(TRIGGER)

    def arm(self, conflicts: int) -> None:
        """Make the next `conflicts` updates of `runs` fail with a serialization failure."""
        self.side.execute("SELECT setval('tt_conflicts', %s, false)", (1 - conflicts,))

    def conflicts_left(self) -> int:
        """Armed conflicts not yet raised (0 once they are spent)."""
        row = self.side.execute(
            "SELECT last_value, is_called FROM tt_conflicts"
        ).fetchone()
        assert row is not None
        last, called = int(row[0]), bool(row[1])
        return max(0, -last) if called else max(0, 1 - last)

    def spent(self) -> Decimal:
        """What the budget has used (0 before its first charge makes its row)."""
        rows = self.app.store.limit_rows(self.app.clock.now())
        return sum((r.used for r in rows if r.limit_id == "spend"), Decimal(0))

    def close(self) -> None:
        self.app.close()
        self.side.close()


@pytest.fixture
def bench(postgres_urls: Callable[[], str], tmp_path: Path) -> Iterator[Bench]:
    config = tmp_path / "tether.yaml"
    config.write_text(LIMITS)
    url = postgres_urls()
    schema = parse_qs(urlsplit(url).query)["options"][0].removeprefix("-csearch_path=")
    # The tether side's detector runs soon, so a deadlock costs the test 0.1 s.
    app_url = with_options(
        url, options=f"-csearch_path={schema} -cdeadlock_timeout=100ms"
    )
    b = Bench(url, app_url, config)
    yield b
    b.close()


def deadlocks(conn: psycopg.Connection[TupleRow]) -> int:
    """The server's count of deadlocks detected in this database, as of now."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_serialization_failures_are_retried_and_the_call_runs_once(
    bench: Bench,
) -> None:
    bench.install_trigger()
    with bench.app.run(principal=PRINCIPAL, request="charge o-1") as run:
        bench.arm(RETRIES)  # the intent's write: RETRIES failures, then it lands
        bench.arm_on_effect = RETRIES  # the result's write: the same
        out = run.call("pay.charge", {"order": "o-1"}, idempotency_key="k-1")

    assert out == ChargeOut(charge_id="ch-o-1")
    assert bench.conflicts_left() == 0  # every armed conflict was raised and retried
    assert bench.effects == ["o-1"]
    assert bench.spent() == Decimal(10)
    assert bench.app.verify(run.id).ok
    steps = [e.data() for e in bench.app.store.events(run.id) if e.data().get("step")]
    assert [e["kind"] for e in steps].count("executed") == 1


def test_a_write_that_conflicts_past_the_bound_fails_in_one_line_and_a_retry_runs_nothing_twice(
    bench: Bench,
) -> None:
    bench.install_trigger()
    bench.arm_on_effect = RETRIES + 1  # the result's write conflicts every try
    with bench.app.run(principal=PRINCIPAL, request="charge o-2") as run:
        with pytest.raises(tether.StoreError) as failed:
            run.call("pay.charge", {"order": "o-2"}, idempotency_key="k-2")
        message = str(failed.value)
        assert "\n" not in message
        assert f"conflicted with other writers {RETRIES + 1} times" in message
        assert "try again" in message
        assert bench.conflicts_left() == 0  # bounded: exactly RETRIES + 1 tries

        # The handler ran once; its result is kept and answers the retry.
        bench.arm_on_effect = 0
        again = run.call("pay.charge", {"order": "o-2"}, idempotency_key="k-2")

    assert again == ChargeOut(charge_id="ch-o-2")
    assert bench.effects == ["o-2"]
    assert bench.spent() == Decimal(10)
    assert bench.app.verify(run.id).ok
    row = bench.app.store.get_run(run.id)
    assert row.status == "succeeded"


def test_an_intent_that_conflicts_past_the_bound_runs_nothing_and_charges_nothing(
    bench: Bench,
) -> None:
    bench.install_trigger()
    with bench.app.run(principal=PRINCIPAL, request="charge o-3") as run:
        bench.arm(RETRIES + 1)
        outcome = None
        with pytest.raises(tether.StoreError):
            outcome = run.step("pay.charge", {"order": "o-3"}, idempotency_key="k-3")
        assert outcome is None
        assert bench.effects == []
        assert bench.spent() == Decimal(0)

        later = run.step("pay.charge", {"order": "o-3"}, idempotency_key="k-3")

    assert later.status is OutcomeStatus.EXECUTED
    assert bench.effects == ["o-3"]
    assert bench.spent() == Decimal(10)
    assert bench.app.verify(run.id).ok


def test_a_deadlock_with_an_outside_transaction_is_retried_and_the_call_runs_once(
    bench: Bench,
) -> None:
    app, side = bench.app, bench.side
    before = deadlocks(side)
    with app.run(principal=PRINCIPAL, request="charge o-4") as run:
        side.execute("BEGIN")
        side.execute("SELECT 1 FROM runs WHERE run_id = %s FOR UPDATE", (run.id,))
        answer: list[object] = []

        def call() -> None:
            try:
                answer.append(
                    run.call("pay.charge", {"order": "o-4"}, idempotency_key="k-4")
                )
            except BaseException as exc:  # reported to the test
                answer.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        # The tether write holds its budget's advisory lock and waits for the
        # run's row: take that lock too, and the two wait on each other.
        key = wait_for_held_advisory_lock(side)
        side.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        side.execute("COMMIT")
        caller.join(DEADLINE_S)
        assert not caller.is_alive()

    assert answer == [ChargeOut(charge_id="ch-o-4")]
    assert bench.effects == ["o-4"]
    assert bench.spent() == Decimal(10)
    assert app.verify(run.id).ok
    deadline = time.monotonic() + DEADLINE_S  # the statistics arrive a little later
    while deadlocks(side) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deadlocks(side) == before + 1


def wait_for_held_advisory_lock(side: psycopg.Connection[TupleRow]) -> int:
    """Wait until another backend holds an advisory lock and waits for a row; return its key."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        rows = side.execute(
            """
            SELECT held.classid::bigint, held.objid::bigint
            FROM pg_locks held
            JOIN pg_locks waiting ON waiting.pid = held.pid AND NOT waiting.granted
            WHERE held.locktype = 'advisory' AND held.granted
              AND held.pid <> pg_backend_pid()
              AND held.database = (SELECT oid FROM pg_database
                                   WHERE datname = current_database())
            """
        ).fetchall()
        if rows:
            high, low = (int(v) for v in rows[0])
            key = (high << 32) | low
            return key - (1 << 64) if key >= 1 << 63 else key
        time.sleep(0.01)
    raise AssertionError("the tether write never held its lock while waiting")


def test_a_failed_pipeline_leaves_no_statement_prepared_on_one_side_only(
    postgres_url: str,
) -> None:
    # psycopg marks a statement prepared when it queues the statement's first
    # named Parse; the server skips a Parse queued behind a failed statement.
    # The conflicts above hit this at a write's `COMMIT`; here it is made
    # certain by preparing from the second use on.
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.prepare_threshold = 1
        # A ROLLBACK psycopg has seen before no longer clears its cache.
        conn.execute("ROLLBACK")
        conn.execute("SELECT 1")  # seen once: its next use prepares it
        w = Writer(conn)
        w.execute("BEGIN")
        w.execute("SELECT 1/0")
        w.execute("SELECT 1")  # its Parse is skipped by the server
        failed = w.sync()
        assert isinstance(failed, psycopg.errors.DivisionByZero)
        w.close()
        rollback(conn)  # as every caller does after a failed write
        assert conn.info.transaction_status is TransactionStatus.IDLE
        for _ in range(3):
            assert conn.execute("SELECT 1").fetchone() == (1,)
