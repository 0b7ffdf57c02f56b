"""A write whose limits only charge counters is one statement on PostgreSQL.

A read charged after it answers carries its quotas' and budgets' reservations
and their settlements in the batch that records it. `PostgresStore` writes such
a batch in one autocommit statement whose `tether_charge` call takes the
locked path's advisory locks and checks and adds to the counters in the
server. These tests hold it to that: one round trip (counted on the wire, with
libpq's trace), the locked path's decisions and rows on the same state, the
same locks and a fresh read under them, nothing written when it is refused,
and no overspend when both paths race on one budget.
"""

from __future__ import annotations

import contextlib
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

import tether
from _postgres import with_options
from tether import record
from tether.errors import HeadMoved
from tether.store import Batch, Committed, NewRun, PostgresStore, Store, open_store
from tether.store._limits import LimitBlocked, LimitKind, Reserve, Settle, to_us
from tether.store.postgres import _write as pg_write
from tether.store.postgres import parse_url
from tether.store.postgres._connection import lock_key
from tether.store.postgres._tables import counter_charges

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = to_us(T0)
DAY_US = 86_400_000_000
SCOPE = "acme"
LATER = T0 + timedelta(seconds=2)
"""When the charges in these tests are made: holds made at T0 with a 1 s ttl have lapsed."""


# -- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def locked_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every PostgreSQL write inside take the locked path (two round trips)."""
    with monkeypatch.context() as m:
        m.setattr(pg_write, "counter_charges", lambda batch: None)
        yield


@contextlib.contextmanager
def round_trips(store: PostgresStore, log: Path) -> Iterator[list[int]]:
    """Count the round trips the store makes inside, on the wire.

    The store must have one connection (`?pool_size=1`). libpq's trace logs
    every message it sends; each `Sync` (extended protocol, pipelined or not)
    and each `Query` (simple protocol) is answered by a `ReadyForQuery` the
    client waits for: one round trip each. The count lands in the list.
    """
    counted: list[int] = []
    with log.open("w") as f:
        with store._pool.connection() as conn:
            conn.pgconn.trace(f.fileno())
        try:
            yield counted
        finally:
            with store._pool.connection() as conn:
                conn.pgconn.untrace()
    sent = re.findall(r"\tF\t\d+\t(\w+)", log.read_text())
    counted.append(sum(1 for message in sent if message in ("Sync", "Query")))


@dataclass
class Writer:
    """Writes batches to one run of a store, each extending the head the last one left."""

    store: Store
    run_id: str = field(default_factory=lambda: f"run_{secrets.token_hex(4)}")
    step: int = 0
    head: tuple[int, bytes] = (0, b"")

    def __post_init__(self) -> None:
        done = self.store.commit(
            Batch(
                run_id=self.run_id,
                epoch=1,
                base_seq=0,
                base_hash=record.genesis(self.run_id),
                events=[record.RunStarted(at=T0, request="r", principal={"id": "bot"})],
                new_run=NewRun(
                    tenant=SCOPE,
                    principal_id="bot",
                    request="r",
                    status="executing",
                    created_at=T0,
                ),
                at=T0,
            )
        )
        self.head = (done.head_seq, done.head_hash)

    def commit(self, *, at: datetime = T0, **commands: Any) -> Committed:
        """Commit one step's event with `commands` (reserve, settle, ...)."""
        self.step += 1
        done = self.store.commit(
            Batch(
                run_id=self.run_id,
                epoch=1,
                base_seq=self.head[0],
                base_hash=self.head[1],
                events=[
                    record.RunStatus(at=at, previous="executing", status="executing")
                ],
                at=at,
                step=self.step,
                **commands,
            )
        )
        self.head = (done.head_seq, done.head_hash)
        return done

    def charge(self, charges: Sequence[Charge], *, at: datetime = LATER) -> Committed:
        """Commit a read charged after it answers: each reservation with its settlement."""
        step = self.step + 1
        return self.commit(
            at=at,
            reserve=[c.reserve() for c in charges],
            settle=[
                c.settle(self.run_id, step)
                for c in charges
                if c.kind is LimitKind.BUDGET
            ],
        )


@dataclass(frozen=True)
class Charge:
    """One limit of a read charged after it answers."""

    kind: LimitKind
    amount: int
    cap: int
    actual: int | None = None
    """What a budget settles at (default: the amount)."""
    released: bool = False
    """The call failed: the budget settles at nothing."""

    @property
    def limit_id(self) -> str:
        return "b" if self.kind is LimitKind.BUDGET else "q"

    def reserve(self) -> Reserve:
        return Reserve(
            limit_id=self.limit_id,
            kind=self.kind,
            scope=SCOPE,
            window=WINDOW,
            window_us=DAY_US,
            amount=Decimal(self.amount),
            cap=Decimal(self.cap),
            hold_until=to_us(LATER) + 60_000_000,
        )

    def settle(self, run_id: str, step: int) -> Settle:
        actual = None
        if not self.released:
            actual = Decimal(self.amount if self.actual is None else self.actual)
        return Settle(
            limit_id=self.limit_id,
            kind=self.kind,
            scope=SCOPE,
            window=WINDOW,
            run_id=run_id,
            step=step,
            actual=actual,
            reserved=Decimal(self.amount),
        )


@dataclass(frozen=True)
class Hold:
    """A hold another step left in the budget's group."""

    amount: int
    lapsed: bool
    charged: bool
    """A budget's reservation (spent if it lapses); else a lease (nothing spent)."""


def set_up(writer: Writer, counters: dict[str, int], holds: Sequence[Hold]) -> None:
    """Give the counters their values and leave the holds, as other steps would."""
    for limit_id, value in counters.items():
        writer.commit(
            settle=[
                Settle(
                    limit_id=limit_id,
                    kind=LimitKind.COUNT,
                    scope=SCOPE,
                    window=WINDOW,
                    run_id=writer.run_id,
                    step=writer.step + 1,
                    actual=Decimal(value),
                )
            ]
        )
    for h in holds:
        writer.commit(
            reserve=[
                Reserve(
                    limit_id="b",
                    kind=LimitKind.BUDGET if h.charged else LimitKind.CONCURRENCY,
                    scope=SCOPE,
                    window=WINDOW,
                    amount=Decimal(h.amount),
                    cap=Decimal(1000),
                    hold_until=to_us(T0) + (1_000_000 if h.lapsed else 3_600_000_000),
                )
            ]
        )


def table(url: str) -> list[tuple[Any, ...]]:
    """Return every row of a store's `limit_state`, in order."""
    with psycopg.connect(parse_url(url)[0]) as conn:
        return conn.execute(
            'SELECT limit_id, scope, "window", holder, amount, until, charged '
            'FROM limit_state ORDER BY limit_id, scope, "window", holder'
        ).fetchall()


def counter(url: str, limit_id: str = "b") -> Decimal | None:
    """Return a counter's stored value (None: it has no row)."""
    with psycopg.connect(parse_url(url)[0]) as conn:
        row = conn.execute(
            "SELECT amount FROM limit_state WHERE limit_id=%s AND holder=''",
            (limit_id,),
        ).fetchone()
    return None if row is None else Decimal(row[0])


def wait_for(what: str, check: Callable[[], Any], seconds: float = 10.0) -> Any:
    """Return `check()`'s first truthy answer; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def waiting_charges(watch: psycopg.Connection[Any]) -> list[int]:
    """Return the pids of one-statement charges waiting for an advisory lock.

    `watch` must be in autocommit: a transaction sees `pg_stat_activity` as it
    was at its first look.
    """
    return [
        pid
        for (pid,) in watch.execute(
            "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND NOT l.granted "
            "AND starts_with(a.query, 'WITH ch AS (SELECT tether_charge(')"
        ).fetchall()
    ]


def charge_in_background(
    writer: Writer,
) -> tuple[threading.Thread, list[Committed | BaseException]]:
    """Start a thread charging 2 of a budget of 10; its answer (or error) lands in the list."""
    answers: list[Committed | BaseException] = []

    def charge() -> None:
        try:
            answers.append(writer.charge([Charge(LimitKind.BUDGET, 2, 10)]))
        except BaseException as exc:  # reported by the test, in its thread
            answers.append(exc)

    thread = threading.Thread(target=charge)
    thread.start()
    return thread, answers


@pytest.fixture
def one_connection(postgres_urls: Callable[[], str]) -> Callable[[], str]:
    """Return a function that makes a fresh schema's URL with a one-connection pool."""
    return lambda: with_options(postgres_urls(), pool_size="1")


# -- one round trip ----------------------------------------------------------------------


class Reading(BaseModel):
    n: int


@tether.capability("metrics.read", effect="read", cost=2)
def read_metrics(args: Reading) -> Reading:
    return args


@pytest.mark.parametrize(
    "limit",
    [
        "{id: reads, kind: budget, scope: tenant, per: day, amount: 100}",
        "{id: reads, kind: quota, scope: tenant, per: day, max: 100}",
        "{id: reads, kind: budget, scope: tenant, per: day, amount: 100}\n"
        "  - {id: calls, kind: quota, scope: principal, per: hour, max: 100}",
    ],
    ids=["budget", "quota", "budget+quota"],
)
def test_a_read_charged_after_it_answers_costs_one_round_trip(
    one_connection: Callable[[], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limit: str,
) -> None:
    """A read step under quotas and budgets makes one round trip to the server in all, where the locked path makes two."""
    config = tmp_path / "tether.yaml"
    config.write_text(f"limits:\n  - {limit}\n")
    app = tether.Tether(db=one_connection(), config=config, env={})
    app.register(read_metrics)
    store = app.store
    assert isinstance(store, PostgresStore)
    try:
        with app.run(
            principal=tether.Principal("bot", tenant="acme"), request="r"
        ) as run:
            run.call("metrics.read", {"n": 0})
            with round_trips(store, tmp_path / "fast.log") as fast:
                run.call("metrics.read", {"n": 1})
            with (
                locked_path(monkeypatch),
                round_trips(store, tmp_path / "locked.log") as locked,
            ):
                run.call("metrics.read", {"n": 2})
        used = {r.limit_id: r.used for r in store.limit_rows(app.clock.now())}
    finally:
        app.close()

    assert fast == [1]
    assert locked == [2]
    assert used["reads"] == (6 if "budget" in limit else 3)


def test_a_charge_keeps_any_tenant_and_principal_name_exactly(
    one_connection: Callable[[], str], tmp_path: Path
) -> None:
    """Scopes holding quotes, backslashes, commas, braces and spaces are charged to their own counters, in one round trip."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "limits:\n"
        "  - {id: reads, kind: budget, scope: tenant, per: day, amount: 100}\n"
        "  - {id: calls, kind: quota, scope: principal, per: hour, max: 100}\n"
    )
    app = tether.Tether(db=one_connection(), config=config, env={})
    app.register(read_metrics)
    store = app.store
    assert isinstance(store, PostgresStore)
    odd = 'a "b", c\\d {e} NULL é'
    try:
        with app.run(principal=tether.Principal(odd, tenant=odd), request="r") as run:
            run.call("metrics.read", {"n": 0})
            with round_trips(store, tmp_path / "odd.log") as trips:
                run.call("metrics.read", {"n": 1})
        rows = {
            (r.limit_id, r.scope): r.used for r in store.limit_rows(app.clock.now())
        }
    finally:
        app.close()

    assert trips == [1]
    assert rows == {("reads", odd): Decimal(4), ("calls", f"{odd}/{odd}"): Decimal(2)}


def test_a_refused_charge_takes_the_locked_path_after_its_one_statement(
    one_connection: Callable[[], str], tmp_path: Path
) -> None:
    """A charge with no room costs its statement, then the locked path's read and rollback: three round trips."""
    store = open_store(one_connection())
    assert isinstance(store, PostgresStore)
    try:
        writer = Writer(store)
        set_up(writer, {"b": 9}, ())
        with round_trips(store, tmp_path / "trace.log") as trips:
            refused = writer.charge([Charge(LimitKind.BUDGET, 2, 10)])
    finally:
        store.close()

    assert isinstance(refused.blocked, LimitBlocked)
    assert trips == [3]


def batch_of(reserve: Sequence[Reserve], settle: Sequence[Settle]) -> Batch:
    """Return step 1 of run `r` with these limit commands."""
    return Batch(
        run_id="r", events=[], at=LATER, step=1, reserve=reserve, settle=settle
    )


BUDGET = Charge(LimitKind.BUDGET, 2, 10)
QUOTA = Charge(LimitKind.QUOTA, 1, 2)
LOCKED = {
    "a lease settled": batch_of(
        [BUDGET.reserve()], [replace(BUDGET.settle("r", 1), kind=LimitKind.CONCURRENCY)]
    ),
    "another step settled": batch_of([BUDGET.reserve()], [BUDGET.settle("r", 2)]),
    "one group reserved twice": batch_of([QUOTA.reserve(), QUOTA.reserve()], []),
    "a rate": batch_of([replace(QUOTA.reserve(), kind=LimitKind.RATE)], []),
    "a throttle": batch_of(
        [replace(BUDGET.reserve(), throttle_max_us=1_000_000)],
        [BUDGET.settle("r", 1)],
    ),
    "a budget held, not settled": batch_of([BUDGET.reserve()], []),
    "a settle without its reservation": batch_of(
        [QUOTA.reserve()], [BUDGET.settle("r", 1)]
    ),
}


@pytest.mark.parametrize("batch", LOCKED.values(), ids=LOCKED.keys())
def test_a_batch_that_needs_more_than_counters_takes_the_locked_path(
    batch: Batch,
) -> None:
    """Anything but counters each charged once, budgets settled by their own step, is left to the locked path."""
    assert counter_charges(batch) is None


def test_a_read_charged_after_it_answers_is_all_counters() -> None:
    """A budget settled by its step and a quota: each counter gains the actual cost or the amount."""
    budget = replace(BUDGET, actual=3)
    batch = batch_of([budget.reserve(), QUOTA.reserve()], [budget.settle("r", 1)])

    charges = counter_charges(batch)

    assert charges is not None
    assert [(r.limit_id, gain) for r, gain in charges] == [
        ("b", Decimal(3)),
        ("q", Decimal(1)),
    ]


# -- the locked path's decisions, on the same state --------------------------------------


@dataclass(frozen=True)
class Case:
    counters: dict[str, int]
    holds: tuple[Hold, ...]
    charges: tuple[Charge, ...]
    admitted: bool


CASES = {
    "fresh": Case({}, (), (Charge(LimitKind.BUDGET, 2, 10),), True),
    "under the cap": Case({"b": 3}, (), (Charge(LimitKind.BUDGET, 2, 10),), True),
    "exactly at the cap": Case({"b": 8}, (), (Charge(LimitKind.BUDGET, 2, 10),), True),
    "over the cap": Case({"b": 9}, (), (Charge(LimitKind.BUDGET, 2, 10),), False),
    "a live hold fits": Case(
        {"b": 4}, (Hold(4, lapsed=False, charged=True),),
        (Charge(LimitKind.BUDGET, 2, 10),), True,
    ),
    "a live hold leaves no room": Case(
        {"b": 4}, (Hold(4, lapsed=False, charged=True),),
        (Charge(LimitKind.BUDGET, 3, 10),), False,
    ),
    "a lapsed charged hold is spent": Case(
        {"b": 4}, (Hold(4, lapsed=True, charged=True),),
        (Charge(LimitKind.BUDGET, 2, 10),), True,
    ),
    "a lapsed charged hold leaves no room": Case(
        {"b": 4}, (Hold(4, lapsed=True, charged=True),),
        (Charge(LimitKind.BUDGET, 3, 10),), False,
    ),
    "a lapsed lease is gone": Case(
        {"b": 8}, (Hold(5, lapsed=True, charged=False),),
        (Charge(LimitKind.BUDGET, 2, 10),), True,
    ),
    "a live lease counts": Case(
        {"b": 8}, (Hold(1, lapsed=False, charged=False),),
        (Charge(LimitKind.BUDGET, 2, 10),), False,
    ),
    "holds of every kind": Case(
        {"b": 1},
        (
            Hold(2, lapsed=True, charged=True),
            Hold(3, lapsed=True, charged=False),
            Hold(2, lapsed=False, charged=True),
            Hold(1, lapsed=False, charged=False),
        ),
        (Charge(LimitKind.BUDGET, 4, 10),), True,
    ),
    "settled above the estimate": Case(
        {"b": 3}, (), (Charge(LimitKind.BUDGET, 5, 10, actual=9),), True
    ),
    "settled below the estimate": Case(
        {"b": 3}, (), (Charge(LimitKind.BUDGET, 5, 10, actual=1),), True
    ),
    "released": Case({}, (), (Charge(LimitKind.BUDGET, 5, 10, released=True),), True),
    "released, lapsed hold folded in": Case(
        {}, (Hold(3, lapsed=True, charged=True),),
        (Charge(LimitKind.BUDGET, 5, 10, released=True),), True,
    ),
    "quota with room": Case({"q": 1}, (), (Charge(LimitKind.QUOTA, 1, 2),), True),
    "quota full": Case({"q": 2}, (), (Charge(LimitKind.QUOTA, 1, 2),), False),
    "budget and quota fit": Case(
        {"b": 5, "q": 1}, (),
        (Charge(LimitKind.BUDGET, 5, 10), Charge(LimitKind.QUOTA, 1, 2)), True,
    ),
    "the budget fits, the quota is full": Case(
        {"b": 0, "q": 2}, (Hold(1, lapsed=True, charged=True),),
        (Charge(LimitKind.BUDGET, 5, 10), Charge(LimitKind.QUOTA, 1, 2)), False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_charge_decides_and_writes_as_the_locked_path_and_the_rules_do(
    one_connection: Callable[[], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: Case,
) -> None:
    """On the same counters and holds, the one statement admits or refuses as the locked path and the in-memory rules, and leaves the same rows; refused, it writes nothing."""
    urls = {"fast": one_connection(), "locked": one_connection()}
    stores: dict[str, Store] = {name: open_store(u) for name, u in urls.items()}
    stores["memory"] = open_store("memory://")
    fast_store = stores["fast"]
    assert isinstance(fast_store, PostgresStore)
    writers = {}
    try:
        with locked_path(monkeypatch):  # the state is made the same way everywhere
            for name, store in stores.items():
                writers[name] = Writer(store, run_id="run_same")
                set_up(writers[name], case.counters, case.holds)
        before = table(urls["fast"]), fast_store.get_run("run_same")
        with round_trips(fast_store, tmp_path / "trace.log") as trips:
            fast = writers["fast"].charge(case.charges)
        with locked_path(monkeypatch):
            locked = writers["locked"].charge(case.charges)
        memory = writers["memory"].charge(case.charges)
        views = {
            name: sorted(s.limit_rows(LATER), key=repr) for name, s in stores.items()
        }
        after = table(urls["fast"]), fast_store.get_run("run_same")
    finally:
        for s in stores.values():
            s.close()

    assert (fast.blocked is None) is case.admitted
    assert fast.blocked == locked.blocked == memory.blocked
    assert table(urls["fast"]) == table(urls["locked"])
    assert views["fast"] == views["locked"] == views["memory"]
    if case.admitted:
        assert trips == [1]
        assert (fast.head_seq, fast.head_hash) == (locked.head_seq, locked.head_hash)
    else:
        assert isinstance(fast.blocked, LimitBlocked)
        assert after == before  # no counter, hold, event or head of it


# -- the same locks, and a read under them ----------------------------------------------


@pytest.mark.parametrize(
    ("committed", "admitted", "final"),
    [(7, True, 9), (9, False, 9)],
    ids=["room left", "no room left"],
)
def test_the_charge_waits_for_the_locked_path_and_reads_what_it_committed(
    one_connection: Callable[[], str], committed: int, admitted: bool, final: int
) -> None:
    """A charge whose statement began while a locked-path writer held the budget's lock waits for it, then sees its counter: it never writes over it."""
    url = one_connection()
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    lock = lock_key(store._schema, "limit", "b", SCOPE, str(WINDOW))
    try:
        writer = Writer(store)
        set_up(writer, {"b": 5}, ())
        with (
            psycopg.connect(parse_url(url)[0]) as other,
            psycopg.connect(parse_url(url)[0], autocommit=True) as watch,
        ):
            # What the locked path does: lock, then write the counter's new value.
            other.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
            other.execute(
                "UPDATE limit_state SET amount=%s WHERE limit_id='b' AND holder=''",
                (committed,),
            )
            thread, answers = charge_in_background(writer)
            wait_for("the charge to wait for the lock", lambda: waiting_charges(watch))
            other.commit()
        thread.join(timeout=10)
    finally:
        store.close()

    assert len(answers) == 1
    answer = answers[0]
    assert isinstance(answer, Committed), answer
    assert (answer.blocked is None) is admitted
    if not admitted:
        assert isinstance(answer.blocked, LimitBlocked)
        assert answer.blocked.used == committed
    assert counter(url) == final


def test_a_charge_cut_off_while_it_waits_is_tried_again_and_charged_once(
    one_connection: Callable[[], str],
) -> None:
    """A charge whose connection dies while it waits for the lock wrote nothing; the store asks, tries again on a new connection, and it lands once."""
    url = one_connection()
    store = open_store(url, record_key=b"k" * 32)
    assert isinstance(store, PostgresStore)
    lock = lock_key(store._schema, "limit", "b", SCOPE, str(WINDOW))
    try:
        writer = Writer(store)
        set_up(writer, {"b": 5}, ())
        with (
            psycopg.connect(parse_url(url)[0]) as other,
            psycopg.connect(parse_url(url)[0], autocommit=True) as watch,
        ):
            other.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
            thread, answers = charge_in_background(writer)
            [first] = wait_for("the charge to wait", lambda: waiting_charges(watch))
            watch.execute("SELECT pg_terminate_backend(%s)", (first,))
            wait_for(
                "the charge to wait again, on a new connection",
                lambda: [p for p in waiting_charges(watch) if p != first],
            )
            other.commit()
        thread.join(timeout=10)
        row = store.get_run(writer.run_id)
        events = store.events(writer.run_id)
    finally:
        store.close()

    assert len(answers) == 1
    answer = answers[0]
    assert isinstance(answer, Committed), answer
    assert answer.blocked is None
    assert (row.head_seq, row.head_hash) == (answer.head_seq, answer.head_hash)
    assert [e.seq for e in events] == list(range(1, row.head_seq + 1))
    assert counter(url) == 7


def test_a_stale_writers_charge_is_refused_by_the_fence_and_charges_nothing(
    one_connection: Callable[[], str],
) -> None:
    """A charge with room from a writer whose head moved raises `HeadMoved`, and the counter is untouched."""
    url = one_connection()
    store = open_store(url)
    try:
        writer = Writer(store)
        set_up(writer, {"b": 5}, ())
        row = store.get_run(writer.run_id)
        writer.commit()  # the head moves on

        with pytest.raises(HeadMoved):
            store.commit(
                Batch(
                    run_id=writer.run_id,
                    epoch=row.epoch,
                    base_seq=row.head_seq,
                    base_hash=row.head_hash,
                    events=[
                        record.RunStatus(
                            at=LATER, previous="executing", status="executing"
                        )
                    ],
                    at=LATER,
                    step=99,
                    reserve=[Charge(LimitKind.BUDGET, 2, 10).reserve()],
                    settle=[Charge(LimitKind.BUDGET, 2, 10).settle(writer.run_id, 99)],
                )
            )
    finally:
        store.close()

    assert counter(url) == 5


# -- racing ---------------------------------------------------------------------------------


def test_one_statement_and_locked_charges_racing_on_one_budget_never_overspend(
    postgres_urls: Callable[[], str],
) -> None:
    """Six stores charge one budget at once, half as reads in one statement, half as writes (reserve, then settle): the counter ends at exactly the sum admitted, within the cap, and nothing is held."""
    seed = secrets.randbelow(2**32)
    print(f"seed={seed}")
    url = postgres_urls()
    cap = 60
    stores = [open_store(url) for _ in range(6)]
    admitted: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def spend(i: int, store: Store) -> None:
        rng = random.Random(seed + i)
        try:
            writer = Writer(store)
            barrier.wait(timeout=10)
            for _ in range(25):
                amount = rng.randint(1, 3)
                c = Charge(LimitKind.BUDGET, amount, cap)
                if i % 2 == 0:  # a read charged after it answers: one statement
                    if writer.charge([c]).blocked is None:
                        admitted.append(amount)
                    continue
                if writer.commit(at=LATER, reserve=[c.reserve()]).blocked is not None:
                    continue
                writer.commit(at=LATER, settle=[c.settle(writer.run_id, writer.step)])
                admitted.append(amount)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=spend, args=(i, s)) for i, s in enumerate(stores)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    try:
        [row] = stores[0].limit_rows(LATER)
    finally:
        for s in stores:
            s.close()

    assert errors == []
    assert row.used == sum(admitted)
    assert row.used <= cap
    assert (row.held, row.holds) == (Decimal(0), 0)
    assert row.used > cap - 3  # every caller went on until the budget was spent
