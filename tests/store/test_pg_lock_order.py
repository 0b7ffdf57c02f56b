"""The advisory locks of limit rows a batch did not foresee never deadlock.

`limit_keys` names every group the limit rules read, so the locked path takes
them all up front, sorted. `Tables` still locks a group it was not told about
when the rules read one (a guard for a rule that reads more than `limit_keys`
says): that late lock must keep the global order, or two transactions that
read the same two groups in opposite orders deadlock. These tests drive
`Tables` directly, as the rules would, on the real server.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg import errors as pg_errors

import tether.store.postgres as pg
from _postgres import with_options
from tether.store.postgres._connection import lock_key, parse_url
from tether.store.postgres._pipeline import Writer, rollback
from tether.store.postgres._tables import Tables

ROUNDS = 30


def _schema_url(postgres_urls: Callable[[], str]) -> tuple[str, str]:
    url = postgres_urls()
    schema = parse_qs(urlsplit(url).query)["options"][0].removeprefix("-csearch_path=")
    pg.PostgresStore(url).close()  # migrates: limit_state and breakers exist
    # The server's detector runs soon, so a deadlock costs a round 0.1 s, not 1 s.
    fast = with_options(url, options=f"-csearch_path={schema} -cdeadlock_timeout=100ms")
    return parse_url(fast)[0], schema


def _opposite_orders(
    url: str, schema: str, read: Callable[[Tables, str], Any], names: list[str]
) -> tuple[list[BaseException], int, int]:
    """Two transactions read `names` through `Tables`, in opposite orders, at once.

    Each round, both take their first lock, meet at a barrier, then take the
    second: without a global order, each waits for the other's first lock.
    A retryable conflict (what `Connected._run` retries) rolls back and tries
    the round again. Returns the deadlocks seen, the rounds both finished, and
    the times a side gave way.
    """
    deadlocks: list[BaseException] = []
    done = [0, 0]
    gave_way = [0, 0]
    barrier = threading.Barrier(2, timeout=2)

    def side(i: int, order: list[str]) -> None:
        with psycopg.connect(url) as conn:
            for _ in range(ROUNDS):
                for _attempt in range(50):
                    w = Writer(conn)
                    try:
                        w.execute("BEGIN")
                        assert w.sync() is None
                        tables = Tables(schema, w)
                        read(tables, order[0])
                        with contextlib.suppress(threading.BrokenBarrierError):
                            barrier.wait()  # broken: the other side is done
                        read(tables, order[1])
                        conn.execute("COMMIT")
                        done[i] += 1
                        break
                    except pg_errors.DeadlockDetected as exc:
                        deadlocks.append(exc)
                        rollback(conn)
                        break
                    except pg_errors.SerializationFailure:
                        gave_way[i] += 1
                        rollback(conn)  # retried, as the store's writes are
                    finally:
                        w.close()
        barrier.abort()  # done: the other side no longer waits for this one

    threads = [
        threading.Thread(target=side, args=(0, names)),
        threading.Thread(target=side, args=(1, names[::-1])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return deadlocks, min(done), sum(gave_way)


def test_unforeseen_limit_groups_read_in_opposite_orders_never_deadlock(
    postgres_urls: Callable[[], str],
) -> None:
    url, schema = _schema_url(postgres_urls)
    names = ["l0", "l1"]
    started = time.monotonic()
    deadlocks, finished, gave_way = _opposite_orders(
        url, schema, lambda t, n: t.counter(n, "*", 0), names
    )
    assert deadlocks == []
    assert finished == ROUNDS
    assert gave_way > 0  # the rounds did meet: one side gave way instead of waiting
    assert time.monotonic() - started < 60


def test_unforeseen_breakers_read_in_opposite_orders_never_deadlock(
    postgres_urls: Callable[[], str],
) -> None:
    url, schema = _schema_url(postgres_urls)
    names = ["b0", "b1"]
    deadlocks, finished, gave_way = _opposite_orders(
        url, schema, lambda t, n: t.breaker(n), names
    )
    assert deadlocks == []
    assert finished == ROUNDS
    assert gave_way > 0


def test_an_unforeseen_group_after_a_foreseen_one_keeps_the_order(
    postgres_urls: Callable[[], str],
) -> None:
    """A late group above every held lock waits for it; one below never waits."""
    url, schema = _schema_url(postgres_urls)
    lo, hi = sorted(
        [("l0", "*", 0), ("l1", "*", 0)],
        key=lambda g: lock_key(schema, "limit", g[0], g[1], str(g[2])),
    )
    with psycopg.connect(url) as holder, psycopg.connect(url) as conn:
        conn.execute("SET lock_timeout = '2s'")  # a wait fails the test, never hangs it
        conn.commit()
        holder.execute(
            "SELECT pg_advisory_xact_lock(%s)",
            (lock_key(schema, "limit", lo[0], lo[1], str(lo[2])),),
        )
        w = Writer(conn)
        w.execute("BEGIN")
        w.execute(
            "SELECT pg_advisory_xact_lock(%s)",
            (lock_key(schema, "limit", hi[0], hi[1], str(hi[2])),),
        )
        assert w.sync() is None
        tables = Tables(schema, w)
        tables.groups[hi] = {}  # foreseen, and locked above
        started = time.monotonic()
        try:
            tables.counter(*lo)
        except pg_errors.SerializationFailure:
            pass  # retryable: the store's write rolls back and tries again
        else:
            raise AssertionError("took a lower lock held elsewhere")
        finally:
            w.close()
            rollback(conn)
            holder.rollback()
        assert time.monotonic() - started < 0.5  # never waited for it
