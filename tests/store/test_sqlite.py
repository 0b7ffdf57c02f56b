"""The SQLite backend: its settings (A.7), I/O faults (A.8), and files it must refuse."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether.store import SQLiteStore
from tether.testing import FakeClock

# -- capabilities the workloads call ------------------------------------------------


class ChargeIn(BaseModel, extra="forbid"):
    order_id: str
    amount_cents: int


class ChargeOut(BaseModel):
    charge_id: str


class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    length: int


ARGS = {"order_id": "o-1", "amount_cents": 1200}


@dataclass
class Handlers:
    """Capabilities whose handler calls are counted."""

    charges: list[str | None] = field(default_factory=list)

    def register(self, app: tether.Tether) -> None:
        """Register `pay.charge` (keyed), `pay.transfer` (none, fails) and `notes.count` (read)."""

        @tether.capability("pay.charge", effect="write", idempotency="keyed")
        def charge(args: ChargeIn, ctx: tether.CallContext) -> ChargeOut:
            self.charges.append(ctx.idempotency_key)
            return ChargeOut(charge_id=f"ch-{len(self.charges)}")

        @tether.capability("pay.transfer", effect="write", idempotency="none")
        def transfer(args: ChargeIn) -> ChargeOut:
            raise ConnectionResetError("upstream hung up")

        @tether.capability("notes.count")
        def count(args: NoteIn) -> NoteOut:
            return NoteOut(length=len(args.text))

        app.register(charge, transfer, count)


def one_line(exc: BaseException) -> bool:
    """Tell whether an error's message is a single line."""
    return len(str(exc).splitlines()) == 1


# -- A.7 settings of every connection and transaction ------------------------------


@dataclass
class Traced:
    """A connection tether opened, with every statement it ran."""

    con: sqlite3.Connection
    statements: list[str] = field(default_factory=list)


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> list[Traced]:
    """Trace every `sqlite3` connection opened from now on."""
    opened: list[Traced] = []
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        con: sqlite3.Connection = real_connect(*args, **kwargs)
        entry = Traced(con)
        con.set_trace_callback(entry.statements.append)
        opened.append(entry)
        return con

    monkeypatch.setattr(sqlite3, "connect", connect)
    return opened


WRITES = re.compile(
    r"^(INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|PRAGMA\s+USER_VERSION\s*=)"
)


def _bare(sql: str) -> str:
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return " ".join(" ".join(lines).split()).rstrip(";").upper()


def transaction_problems(statements: list[str]) -> list[str]:
    """Return each statement that writes outside a `BEGIN IMMEDIATE` or begins otherwise."""
    problems = []
    open_txn = False
    for sql in statements:
        bare = _bare(sql)
        if bare.startswith("BEGIN"):
            if bare != "BEGIN IMMEDIATE" or open_txn:
                problems.append(sql)
            open_txn = True
        elif bare in {"COMMIT", "END", "ROLLBACK", "END TRANSACTION"}:
            open_txn = False
        elif WRITES.match(bare) and not open_txn:
            problems.append(sql)
    return problems


def workload(app: tether.Tether) -> None:
    """Exercise every write the call path makes: start, claim, result, hit, refusal, doubt, finish."""
    Handlers().register(app)
    with app.run(principal=tether.Principal("pay-bot"), request="charge") as run:
        run.call("pay.charge", ARGS, idempotency_key="charge-o-1")
        run.call("pay.charge", ARGS, idempotency_key="charge-o-1")
        run.call("notes.count", {"text": "hello"})
        run.step("pay.charge", {"order_id": "o-2"})
        run.step("pay.transfer", ARGS, idempotency_key="transfer-o-1")
    with (
        pytest.raises(tether.InDoubt),
        app.run(principal=tether.Principal("pay-bot"), request="again") as run,
    ):
        run.call("pay.transfer", ARGS, idempotency_key="transfer-o-1")


@pytest.mark.parametrize(
    ("query", "synchronous"),
    [("", 2), ("?synchronous=full", 2), ("?synchronous=normal", 1)],
    ids=["default", "full", "normal"],
)
def test_every_connection_uses_wal_the_documented_sync_level_and_timeouts(
    traced: list[Traced], tmp_path: Path, query: str, synchronous: int
) -> None:
    """Each connection tether opens reports WAL, the configured `synchronous`, a busy timeout of 5 s or more, and foreign keys on."""
    app = tether.Tether(db=f"sqlite:///{tmp_path / 'tether.db'}{query}", env={})

    workload(app)

    assert traced
    for entry in traced:
        entry.con.set_trace_callback(None)
        pragmas = {
            name: entry.con.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        }
        assert pragmas["journal_mode"] == "wal"
        assert pragmas["synchronous"] == synchronous
        assert pragmas["busy_timeout"] >= 5000
        assert pragmas["foreign_keys"] == 1
    app.close()


def test_a_read_only_connection_waits_on_locks_and_cannot_write(
    traced: list[Traced], tmp_path: Path
) -> None:
    """The commands that only read (`verify`, `runs`, `status`, `replay`) open the file read-only.

    Such a connection waits out a writer's lock like the others (a busy timeout
    of 5 s or more, in WAL), and refuses every write (`query_only`). It sets
    neither `synchronous` nor foreign keys: it writes nothing they govern.
    """
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    with tether.Tether(db=db, env={}) as writer:
        workload(writer)
    traced.clear()

    with tether.Tether(db=db, env={}, read_only=True) as app:
        runs = app.store.list_runs()
        assert len(runs) == 2
        assert all(app.verify(run.run_id).ok for run in runs)
        (entry,) = traced
        entry.con.set_trace_callback(None)
        pragmas = {
            name: entry.con.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("journal_mode", "busy_timeout", "query_only")
        }
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            entry.con.execute("DELETE FROM events")

    assert pragmas == {
        "journal_mode": "wal",
        "busy_timeout": pragmas["busy_timeout"],
        "query_only": 1,
    }
    assert pragmas["busy_timeout"] >= 5000
    assert not [s for s in entry.statements if WRITES.match(_bare(s))]


def test_every_writing_transaction_begins_immediate(
    traced: list[Traced], tmp_path: Path
) -> None:
    """Every statement that writes runs inside a transaction opened with `BEGIN IMMEDIATE`, and no other kind of `BEGIN` is issued."""
    app = tether.Tether(db=f"sqlite:///{tmp_path / 'tether.db'}", env={})

    workload(app)
    app.close()

    statements = [sql for entry in traced for sql in entry.statements]
    assert sum(_bare(s) == "BEGIN IMMEDIATE" for s in statements) >= 10
    assert any(WRITES.match(_bare(s)) for s in statements)
    assert transaction_problems(statements) == []


def test_the_transaction_check_catches_deferred_and_implicit_writes() -> None:
    """The checker above flags a plain or deferred `BEGIN` and a write outside any transaction."""
    statements = [
        "BEGIN",
        "INSERT INTO runs VALUES (1)",
        "COMMIT",
        "BEGIN DEFERRED",
        "COMMIT",
        "UPDATE runs SET status='x'",
        "BEGIN IMMEDIATE",
        "DELETE FROM runs",
        "COMMIT",
    ]

    problems = transaction_problems(statements)

    assert problems == ["BEGIN", "BEGIN DEFERRED", "UPDATE runs SET status='x'"]


# -- A.8 I/O-error injection ----------------------------------------------------------

FAULTS = ["disk I/O error", "database or disk is full", "database is locked"]


class FaultyConnection:
    """A real connection that raises `OperationalError` on its `fail_at`-th statement.

    With `only`, statements are counted only when their text is `only`.
    """

    def __init__(
        self,
        con: sqlite3.Connection,
        fail_at: int,
        message: str,
        *,
        only: str | None = None,
    ) -> None:
        self._con = con
        self.fail_at = fail_at
        self.message = message
        self.only = only
        self.calls: list[str] = []
        self.failed: str | None = None
        """The statement that was made to fail."""

    def _run(self, fn: Callable[..., Any], sql: str, *args: Any) -> Any:
        if self.only is None or sql == self.only:
            self.calls.append(sql)
            if len(self.calls) == self.fail_at:
                self.failed = sql
                raise sqlite3.OperationalError(self.message)
        return fn(sql, *args)

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self._run(self._con.execute, sql, *args)  # type: ignore[no-any-return]

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self._run(self._con.executemany, sql, *args)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def durable_events(path: Path) -> list[tuple[str, int | None]]:
    """Return the (kind, step) of every event another connection sees on disk.

    Raw SQL on purpose: the store's own connection would also see its uncommitted
    writes, and a second store would wait on a write lock a fault may have left.
    """
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT kind, step FROM events ORDER BY seq").fetchall()
    finally:
        con.close()


@dataclass
class Injected:
    """What happened when one statement of a keyed step failed."""

    fail_at: int
    statements: list[str] = field(default_factory=list)
    """Every statement the step ran, the failed one included."""
    failed: str | None = None
    """The statement that was made to fail."""
    error: BaseException | None = None
    """What the caller got from the faulted call."""
    calls_during_fault: int = 0
    intent_durable: bool = False
    after: list[str] = field(default_factory=list)
    """Errors after the fault cleared (the run must go on)."""
    retry: tether.OutcomeStatus | None = None
    calls_total: int = 0
    verified: bool = False

    def problems(self) -> list[str]:
        """Return each invariant this fault point broke, naming the failed statement."""
        where = f"fault at statement {self.fail_at} ({self.failed!r:.60})"
        expected_retry = (
            tether.OutcomeStatus.IDEMPOTENT_HIT
            if self.calls_during_fault
            else tether.OutcomeStatus.EXECUTED
        )
        checks = {
            "the caller gets a one-line StoreError": isinstance(
                self.error, tether.StoreError
            )
            and one_line(self.error),
            "the handler runs only after its intent is on disk": self.calls_during_fault
            == int(self.intent_durable),
            "the run goes on once the fault clears": not self.after,
            "a retry under the key replays a step that ran, or runs it once": self.retry
            is expected_retry,
            "the handler runs once in all": self.calls_total == 1,
            "the record verifies": self.verified,
        }
        extra = f"; caller got {self.error!r}; after the fault: {self.after}"
        return [f"{where}: {name}{extra}" for name, ok in checks.items() if not ok]


def inject(folder: Path, fail_at: int, message: str) -> Injected:
    """Take a keyed step on a fresh database with its `fail_at`-th statement failing."""
    seen = Injected(fail_at=fail_at)
    handlers = Handlers()
    path = folder / f"fault-{fail_at}.db"
    app = tether.Tether(
        db=f"sqlite:///{path}?synchronous=normal", env={}, clock=FakeClock()
    )
    handlers.register(app)
    store: Any = app.store  # reaching into the backend to put a faulty connection in
    real = store._con
    try:
        with app.run(principal=tether.Principal("pay-bot"), request="charge") as run:
            faulty = FaultyConnection(real, fail_at, message)
            store._con = faulty
            try:
                run.call("pay.charge", ARGS, idempotency_key="charge-o-1")
            except tether.TetherError as exc:
                seen.error = exc
            finally:
                store._con = real
                seen.statements, seen.failed = faulty.calls, faulty.failed
            seen.calls_during_fault = len(handlers.charges)
            seen.intent_durable = ("intent", 1) in durable_events(path)  # one run
            try:
                run.call("notes.count", {"text": "after the fault"})
                seen.retry = run.step(
                    "pay.charge", ARGS, idempotency_key="charge-o-1"
                ).status
            except tether.TetherError as exc:
                seen.after.append(repr(exc))
    except tether.TetherError as exc:
        seen.after.append(f"finishing the run: {exc!r}")
    seen.calls_total = len(handlers.charges)
    seen.verified = app.verify(run.id).ok
    app.close()
    return seen


@pytest.mark.parametrize("message", FAULTS)
def test_a_failed_write_fails_closed_and_the_run_goes_on_after_it(
    tmp_path: Path, message: str
) -> None:
    """Whichever statement of a keyed step fails, the handler never runs without a durable intent, the caller gets a one-line `StoreError`, and the run goes on once the fault clears."""
    statements = len(inject(tmp_path / "calibrate", 0, message).statements)
    (tmp_path / "faults").mkdir()

    seen = [inject(tmp_path / "faults", n, message) for n in range(1, statements + 1)]

    assert statements >= 8
    assert [problem for s in seen for problem in s.problems()] == []


def test_a_retry_right_after_a_failed_result_write_returns_the_stored_result(
    tmp_path: Path,
) -> None:
    """When a step ran but its result write failed, the next call under its key (the fault cleared) returns that result without running again."""
    handlers = Handlers()
    app = tether.Tether(
        db=f"sqlite:///{tmp_path / 'tether.db'}", env={}, clock=FakeClock()
    )
    handlers.register(app)
    store: Any = app.store  # reaching into the backend to put a faulty connection in
    real = store._con
    with app.run(principal=tether.Principal("pay-bot"), request="charge") as run:
        store._con = FaultyConnection(  # fail the step's second write: its result
            real, 2, "disk I/O error", only="BEGIN IMMEDIATE"
        )
        with pytest.raises(tether.StoreError):
            run.call("pay.charge", ARGS, idempotency_key="charge-o-1")
        store._con = real

        retry = run.step("pay.charge", ARGS, idempotency_key="charge-o-1")

    assert retry.status is tether.OutcomeStatus.IDEMPOTENT_HIT, retry.error
    assert handlers.charges == ["charge-o-1"]
    assert app.verify(run.id).ok
    app.close()


# -- files the store must refuse, and migrations ----------------------------------------


def latest_schema() -> int:
    """Return the number of the newest SQLite migration tether ships."""
    folder = resources.files("tether.store.migrations").joinpath("sqlite")
    return max(
        int(f.name.split("_")[0]) for f in folder.iterdir() if f.name.endswith(".sql")
    )


def test_a_text_file_is_refused_as_a_database_and_left_alone(tmp_path: Path) -> None:
    """Opening a text file as the database raises a one-line `StoreError` and leaves the file unchanged."""
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a database\n" * 100)

    with pytest.raises(tether.StoreError) as caught:
        tether.Tether(db=f"sqlite:///{path}", env={"TETHER_RECORD_KEY": "k"})

    assert one_line(caught.value)
    assert str(path) in caught.value.message
    assert path.read_text() == "these are my notes, not a database\n" * 100


def test_a_refused_file_gets_no_files_beside_it(tmp_path: Path) -> None:
    """Opening a text file as the database fails without creating anything beside it (no key file, no WAL)."""
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a database\n")

    with pytest.raises(tether.StoreError):
        tether.Tether(db=f"sqlite:///{path}", env={})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_directory_is_refused_as_a_database(tmp_path: Path) -> None:
    """Opening a directory as the database raises a one-line `StoreError`."""
    with pytest.raises(tether.StoreError) as caught:
        SQLiteStore(tmp_path)

    assert one_line(caught.value)


def test_a_database_from_a_newer_tether_is_refused_with_upgrade_advice(
    tmp_path: Path,
) -> None:
    """A database whose schema version is newer than this tether raises a one-line `StoreError` saying to upgrade."""
    path = tmp_path / "tether.db"
    SQLiteStore(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={latest_schema() + 7}")
    con.close()

    with pytest.raises(tether.StoreError) as caught:
        SQLiteStore(path)

    assert one_line(caught.value)
    assert "upgrade" in caught.value.message


def schema(path: Path) -> tuple[int, list[tuple[str, str]]]:
    """Return a database's user_version and its schema objects."""
    con = sqlite3.connect(path)
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        objects = con.execute(
            "SELECT type, name FROM sqlite_master ORDER BY type, name"
        ).fetchall()
    finally:
        con.close()
    return version, objects


def test_a_fresh_file_is_migrated_to_the_latest_schema(tmp_path: Path) -> None:
    """Opening a path that does not exist yet (nor its folder) creates the database at the latest schema version."""
    path = tmp_path / "new" / "folder" / "tether.db"

    SQLiteStore(path).close()

    version, objects = schema(path)
    assert version == latest_schema()
    assert {
        ("table", "runs"),
        ("table", "events"),
        ("table", "idempotency_keys"),
    } <= set(objects)


def test_reopening_a_database_keeps_its_schema_and_records(tmp_path: Path) -> None:
    """Opening an up-to-date database again changes neither its schema nor its records."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    with tether.Tether(db=db, env={}, clock=FakeClock()) as app:
        workload(app)
        runs = [r.run_id for r in app.store.list_runs()]
    before = schema(tmp_path / "tether.db")

    for _ in range(2):
        tether.Tether(db=db, env={}).close()

    with tether.Tether(db=db, env={}) as app:
        assert [r.run_id for r in app.store.list_runs()] == runs
        assert all(app.verify(run_id).ok for run_id in runs)
    assert schema(tmp_path / "tether.db") == before


def test_a_new_database_uses_8_kib_pages(tmp_path: Path) -> None:
    """A fresh file gets 8 KiB pages, which keep a step's events in fewer page splits."""
    db = tmp_path / "fresh.db"

    tether.Tether(db=f"sqlite:///{db}", env={}).close()

    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA page_size").fetchone()[0] == 8192
