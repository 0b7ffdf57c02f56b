"""A SQLite store's file: opening, configuring and migrating it, and its transactions.

`Connected` is the part of `SQLiteStore` every other part stands on: the
file's one connection, shared by the store's threads under a lock, configured
(see the package docstring) and migrated when the store opens, and the
transactions (`_write`, `_read`) the other parts run in.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Literal, TypeVar

from tether import _chain
from tether.errors import StoreError
from tether.store._base import Store

__all__ = ["BUSY_TIMEOUT_MS", "PAGE_SIZE", "Connected", "Synchronous", "rollback"]

Synchronous = Literal["full", "normal"]
PAGE_SIZE = 8192
"""Page size of a new database file, in bytes."""
BUSY_TIMEOUT_MS = 10_000
"""How long a writer waits for the file lock before the store reports it busy."""

T = TypeVar("T")


class Connected(Store):
    """One SQLite file, open, configured and migrated.

    See `SQLiteStore` for the arguments.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "full",
        record_key: bytes | None = None,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise StoreError(
                f"synchronous must be 'full' or 'normal', got {synchronous!r}"
            )
        self.path = Path(path)
        self.synchronous = synchronous
        self.record_key = record_key
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        self._pks: dict[str, int] = {}
        """Integer keys of the runs this store wrote, by run id."""
        self._macs: dict[bytes, _chain.Mac] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(
                self.path,
                isolation_level=None,  # we issue BEGIN IMMEDIATE ourselves
                check_same_thread=False,  # guarded by self._lock
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the database {str(self.path)!r}: {exc}; check the path "
                "and its permissions, or pass --db"
            ) from exc
        try:
            self._configure()
            self._migrate()
        except StoreError:
            self._con.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._con.close()
            raise StoreError(
                f"{str(self.path)!r} is not a usable tether database ({exc}); "
                "point --db at another file"
            ) from exc

    # -- setup ------------------------------------------------------------------

    def _configure(self) -> None:
        con = self._con
        # 8 KiB pages (a new file only; an existing one keeps its own): a step's
        # events fill a 4 KiB leaf every few steps, and the splits made a
        # synchronous=normal step ~4 us slower (benchmarks/call_path.py); with
        # synchronous=full the fsync dominates and the size makes no difference.
        con.execute(f"PRAGMA page_size={PAGE_SIZE}")
        mode = con.execute("PRAGMA journal_mode").fetchone()[0]
        for attempt in range(200):
            if mode == "wal":
                break
            try:
                mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                # Switching a new file to WAL needs an exclusive lock and returns
                # SQLITE_BUSY without calling the busy handler, so when several
                # processes open a fresh file at once the losers wait here.
                if "locked" not in str(exc) or attempt == 199:
                    raise
                time.sleep(0.01 + 0.0001 * attempt)  # noqa: TID251  # lock wait, not logic
        if mode != "wal":
            raise StoreError(
                f"{str(self.path)!r}: cannot switch to WAL mode (got {mode!r}); "
                "use a local file system"
            )
        con.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        con.execute("PRAGMA foreign_keys=ON")

    def _migrate(self) -> None:
        scripts = sorted(
            (int(f.name.split("_", 1)[0]), f)
            for f in resources.files("tether.store.migrations")
            .joinpath("sqlite")
            .iterdir()
            if f.name.endswith(".sql")
        )
        latest = scripts[-1][0] if scripts else 0
        with self._write() as con:
            current = con.execute("PRAGMA user_version").fetchone()[0]
            if current > latest:
                raise StoreError(
                    f"{str(self.path)!r} has schema version {current}, newer than this "
                    f"tether knows ({latest}); upgrade tether"
                )
            for number, script in scripts:
                if number > current:
                    for statement in script.read_text().split(";\n"):
                        if statement.strip():
                            con.execute(statement)
                    con.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            con = self._con
            # BEGIN IMMEDIATE: a deferred transaction that upgrades to write gets
            # SQLITE_BUSY at once, ignoring busy_timeout.
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                rollback(con)
                raise

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._lock:
                return fn(self._con)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {str(self.path)!r}: {exc}") from exc

    def _by_id(
        self, table: str, column: str, columns: str, value: str
    ) -> list[tuple[object, ...]]:
        """Return the rows whose id is `value`, else the (at most 2) it is a prefix of."""
        exact = f"SELECT {columns} FROM {table} WHERE {column}=?"  # noqa: S608  # constant names
        prefix = f"SELECT {columns} FROM {table} WHERE {column} >= ? AND {column} < ? LIMIT 2"  # noqa: S608

        def query(con: sqlite3.Connection) -> list[tuple[object, ...]]:
            rows = con.execute(exact, (value,)).fetchall()
            if not rows and len(value) >= 6:
                rows = con.execute(prefix, (value, value + "\U0010ffff")).fetchall()
            return rows

        return self._read(query)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._con.close()


def rollback(con: sqlite3.Connection) -> None:
    """End the transaction a failed write or COMMIT left open, if any."""
    # A failed COMMIT (SQLITE_BUSY, I/O error) may leave the transaction open;
    # without this every later write fails "within a transaction".
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
