"""A SQLite store's file: opening, configuring and migrating it, and its transactions.

`Connected` is the part of `SQLiteStore` every other part stands on: the
file's one connection, shared by the store's threads under a lock, configured
(see the package docstring) and migrated when the store opens, and the
transactions (`_write`, `_read`) the other parts run in.

Opened `read_only`, the file is neither created, configured nor migrated: it
must already be a tether database of this version's schema, and nothing is
written to it (SQLite may still make its `-wal` and `-shm` files beside it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import quote

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
        read_only: bool = False,
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
        self.read_only = read_only
        try:
            if read_only:
                # mode=ro: a missing file is an error, never a new empty database.
                where = f"file:{quote(str(self.path.absolute()))}?mode=ro"
                self._con = sqlite3.connect(
                    where,
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=BUSY_TIMEOUT_MS / 1000,
                )
            else:
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
            if read_only:
                self._con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                self._con.execute("PRAGMA query_only=ON")
                self._check_schema()
            else:
                self._configure()
                self._migrate()
        except StoreError:
            self._con.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._con.close()
            raise self._unusable(exc) from exc

    def _unusable(self, exc: sqlite3.Error) -> StoreError:
        """The error for a file SQLite could not use, saying what to do about it."""
        name = str(self.path)
        folder = self.path.parent
        # A busy file or a full or failing disk says nothing about the file
        # itself: it is the right one, and opens once the fault clears.
        code = getattr(exc, "sqlite_errorname", "")
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return StoreError(
                f"{name!r} is busy: another process held its write lock for more "
                f"than {BUSY_TIMEOUT_MS / 1000:g} s ({exc}); try again once it "
                "lets go"
            )
        if code.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
            return StoreError(
                f"{name!r} could not be written: the disk is full or failing "
                f"({exc}); free space or fix the disk, then try again"
            )
        denied = "unable to open" in str(exc) or "readonly" in str(exc)
        if denied and self.path.is_file() and not os.access(folder, os.W_OK):
            return StoreError(
                f"{name!r} cannot be opened: its folder {str(folder)!r} is not "
                "writable, and SQLite keeps its -wal and -shm files beside the "
                "database; make the folder writable or copy the database to one "
                "that is"
            )
        if denied and not self.read_only and not os.access(self.path, os.W_OK):
            return StoreError(
                f"{name!r} is read-only and this command writes to it; make the "
                "file writable, or use a command that only reads"
            )
        what = "a tether database" if self.read_only else "a usable tether database"
        return StoreError(
            f"{name!r} is not {what} ({exc}); point --db at the database your app "
            "records to"
        )

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

    def _check_schema(self) -> None:
        """Check, without writing, that the file is a tether database of this schema."""
        latest = _latest_version()
        current = self._con.execute("PRAGMA user_version").fetchone()[0]
        tables = {
            row[0]
            for row in self._con.execute(
                "SELECT name FROM sqlite_master WHERE type='table'"
            )
        }
        name = str(self.path)
        if current == 0 or "runs" not in tables or "events" not in tables:
            what = (
                "it is empty"
                if not tables
                else f"it has no tether tables: {', '.join(sorted(tables)[:5])}"
                + (", ..." if len(tables) > 5 else "")
            )
            raise StoreError(
                f"{name!r} is not a tether database ({what}); point --db at the "
                "database your app records to"
            )
        if current > latest:
            raise StoreError(
                f"{name!r} has schema version {current}, newer than this tether "
                f"knows ({latest}); upgrade tether"
            )
        if current < latest:
            raise StoreError(
                f"{name!r} has schema version {current} and this tether needs "
                f"{latest}; a read does not migrate it: back it up, then open it "
                "once for writing (your app's tether.Tether(db=...), or "
                "`tether worker --app ...`), which migrates it"
            )

    def _migrate(self) -> None:
        scripts = _scripts()
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


def _scripts() -> list[tuple[int, Traversable]]:
    """The migration scripts, by number."""
    return sorted(
        (
            (int(f.name.split("_", 1)[0]), f)
            for f in resources.files("tether.store.migrations")
            .joinpath("sqlite")
            .iterdir()
            if f.name.endswith(".sql")
        ),
        key=lambda pair: pair[0],
    )


def _latest_version() -> int:
    scripts = _scripts()
    return scripts[-1][0] if scripts else 0


def rollback(con: sqlite3.Connection) -> None:
    """End the transaction a failed write or COMMIT left open, if any."""
    # A failed COMMIT (SQLITE_BUSY, I/O error) may leave the transaction open;
    # without this every later write fails "within a transaction".
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
