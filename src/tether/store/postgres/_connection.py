"""A PostgreSQL store's connections: the URL, the pool, migrations and retries.

`Connected` is the part of `PostgresStore` every other part stands on: it opens
and migrates the database, runs each operation on a pooled connection through
`_run` (which retries what is safe to retry and turns driver errors into
`StoreError`), and holds the connection that listens for decided requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from tether import _chain
from tether.errors import ConfigError, StoreError
from tether.store._base import Store
from tether.store.postgres._pipeline import rollback

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_POOL_SIZE",
    "POOL_TIMEOUT_S",
    "Connected",
    "lock_key",
    "one_line",
    "parse_url",
]

DEFAULT_POOL_SIZE = 4
"""Connections a store keeps at most, unless the URL says `?pool_size=N`."""
POOL_TIMEOUT_S = 10.0
"""How long an operation waits for a free (or new) connection before it fails."""
CONNECT_TIMEOUT_S = 10
"""libpq's `connect_timeout`, unless the URL sets its own."""
RETRIES = 5
"""Deadlocks and serialization failures retried before a write gives up."""
NEWS_SLICE_S = 0.1
"""How often a wait for news looks whether the store is closing (`close` waits that long at most)."""

T = TypeVar("T")

_OPTIONS = ("pool_size",)
"""Query options tether reads itself; every other one goes to libpq."""


def parse_url(url: str) -> tuple[str, int]:
    """Split a `postgresql://` URL into libpq's connection string and the pool size.

    Raises:
        ConfigError: an option neither tether nor libpq knows, or a bad pool size.
    """
    shown = _safe_url(url)
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    size_text = query.pop("pool_size", [str(DEFAULT_POOL_SIZE)])[-1]
    try:
        size = int(size_text)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(
            f"database URL {shown!r}: pool_size must be a whole number >= 1, "
            f"got {size_text!r}"
        )
    # quote, not quote_plus: libpq reads no "+" as a space.
    libpq_url = parts._replace(
        query=urlencode(query, doseq=True, quote_via=quote)
    ).geturl()
    try:
        params = conninfo_to_dict(libpq_url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"database URL {shown!r}: {one_line(exc)}; tether knows ?pool_size=N, "
            "the rest must be libpq connection parameters"
        ) from exc
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    return make_conninfo("", **params), size


def _safe_url(url: str) -> str:
    from tether.store import safe_url  # the package imports this module lazily

    return safe_url(url)


def one_line(exc: BaseException) -> str:
    """Return an error's message on one line, for a message of our own."""
    return " ".join(str(exc).split())


def lock_key(*parts: str) -> int:
    """Return a signed 64-bit advisory lock key for `parts`."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _session_ended(exc: psycopg.OperationalError) -> bool:
    """Tell whether `exc` says the connection is gone, not what the server answered.

    A dropped socket has no SQLSTATE; a shutdown, a crash, a dropped database
    or an idle-session timeout ends the session (class 57P), as does a
    connection exception (class 08).
    """
    state = exc.sqlstate
    return state is None or state.startswith(("57P", "08"))


class Connected(Store):
    """A migrated PostgreSQL database and a pool of connections to it.

    See `PostgresStore` for the arguments.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int | None = None,
        record_key: bytes | None = None,
    ) -> None:
        conninfo, url_pool_size = parse_url(url)
        self.url = _safe_url(url)
        self.record_key = record_key
        self._macs: dict[bytes, _chain.Mac] = {}
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                self._schema = self._migrate(conn)
        except psycopg.OperationalError as exc:
            raise StoreError(
                f"cannot connect to {self.url}: {one_line(exc)}; check the server "
                "is running and the URL"
            ) from exc
        except psycopg.Error as exc:
            raise StoreError(
                f"{self.url} is not a usable tether database ({one_line(exc)}); "
                "check the URL's database and search_path"
            ) from exc
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=pool_size or url_pool_size,
            kwargs={"autocommit": True},
            timeout=POOL_TIMEOUT_S,
            name="tether",
            open=False,
        )
        self._pool.open(wait=False)
        self._conninfo = conninfo
        # Deciding a request notifies this channel; a worker waiting for news
        # listens on it (one per schema: stores in other schemas are others).
        self._channel = (
            "tether_news_" + hashlib.sha256(self._schema.encode()).hexdigest()[:16]
        )
        self._listener: psycopg.Connection[Any] | None = None
        self._listen_lock = threading.Lock()
        self._closing = False

    # -- setup ------------------------------------------------------------------

    def _migrate(self, conn: psycopg.Connection[Any]) -> str:
        """Bring the schema to the latest version; return the schema's name."""
        scripts = sorted(
            (int(f.name.split("_", 1)[0]), f)
            for f in resources.files("tether.store.migrations")
            .joinpath("postgres")
            .iterdir()
            if f.name.endswith(".sql")
        )
        latest = scripts[-1][0] if scripts else 0
        schema, current = self._version(conn)
        if current is None or current < latest:
            with conn.transaction():
                # Processes opening a fresh database together queue here; the
                # first migrates, the others find the work done.
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s)", (lock_key(schema, "migrate"),)
                )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
                )
                _, current = self._version(conn)
                for number, script in scripts:
                    if number > (current or 0):
                        conn.execute(script.read_text())  # no parameters: a script
                if (current or 0) < latest:
                    conn.execute("DELETE FROM schema_version")
                    conn.execute("INSERT INTO schema_version VALUES (%s)", (latest,))
                current = latest
        if current > latest:
            raise StoreError(
                f"{self.url} has schema version {current}, newer than this tether "
                f"knows ({latest}); upgrade tether"
            )
        return schema

    def _version(self, conn: psycopg.Connection[Any]) -> tuple[str, int | None]:
        """Return the schema tether's tables go in, and its version (None: none yet)."""
        row = conn.execute(
            "SELECT current_schema(), to_regclass('schema_version') IS NOT NULL"
        ).fetchone()
        assert row is not None
        schema, exists = row
        if schema is None:
            raise StoreError(
                f"{self.url}: no schema of the search_path exists; create it or "
                "fix ?options=-csearch_path"
            )
        if not exists:
            return str(schema), None
        found = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return str(schema), None if found is None or found[0] is None else int(found[0])

    # -- running operations ---------------------------------------------------------

    def _run(
        self,
        fn: Callable[[psycopg.Connection[Any]], T],
        what: str,
        *,
        lost: Callable[[psycopg.OperationalError], T | None] | None = None,
    ) -> T:
        """Run `fn` on a pooled connection, retrying what is safe to retry.

        A deadlock or serialization failure rolled the transaction back: it is
        tried again, a bounded number of times. A lost connection is replaced;
        `lost` then says whether to try once more (returning None), gives the
        answer (a write that landed before the connection went), or raises.
        Without `lost`, a lost connection is a `StoreError`. A statement or
        lock timeout, like any other error the server answers with, is a
        `StoreError` at once: the server undid the statement, and the
        connection is fine.
        """
        reconnected = False
        for attempt in range(RETRIES + 1):
            broken = False
            try:
                with self._pool.connection() as conn:
                    try:
                        return fn(conn)
                    except BaseException:
                        broken = conn.broken  # the pool closes it on return
                        rollback(conn)
                        raise
            except (
                pg_errors.DeadlockDetected,
                pg_errors.SerializationFailure,
            ) as exc:
                if attempt == RETRIES:
                    raise StoreError(
                        f"cannot {what} in {self.url}: it conflicted with other "
                        f"writers {RETRIES + 1} times ({one_line(exc)}); try again"
                    ) from exc
            except PoolTimeout as exc:
                raise StoreError(
                    f"cannot {what}: no connection to {self.url} within "
                    f"{POOL_TIMEOUT_S:g} s; check the server is running and the URL"
                ) from exc
            except (pg_errors.QueryCanceled, pg_errors.LockNotAvailable) as exc:
                # OperationalErrors, but the server's answer on a live
                # connection: the statement was undone, so nothing is retried.
                raise StoreError(
                    f"cannot {what} in {self.url}: the server canceled it "
                    f"({exc.diag.message_primary or one_line(exc)}); try again, "
                    "or raise the database's statement_timeout or lock_timeout"
                ) from exc
            except psycopg.OperationalError as exc:
                if not (broken or _session_ended(exc)):
                    # Disk full, out of memory, ...: the server's answer too.
                    raise StoreError(
                        f"cannot {what} in {self.url}: {one_line(exc)}"
                    ) from exc
                # The connection broke (server restart, network): the pool drops
                # it on return; check() drops its idle siblings, dead too.
                self._pool.check()
                gone = StoreError(
                    f"cannot {what}: lost the connection to {self.url} "
                    f"({one_line(exc)}); check the server, then try again"
                )
                if lost is None:
                    raise gone from exc
                # Asked after every loss, not just the first: a retry may land
                # before its own connection goes, and its answer must stand.
                answer = lost(exc)
                if answer is not None:
                    return answer
                if reconnected:
                    raise gone from exc  # twice lost, nothing landed: give up
                reconnected = True
            except psycopg.Error as exc:
                raise StoreError(
                    f"cannot {what} in {self.url}: {one_line(exc)}"
                ) from exc
        raise AssertionError("the loop returns or raises")  # pragma: no cover

    def _read(self, fn: Callable[[psycopg.Connection[Any]], T], what: str) -> T:
        # A read is safe to repeat: after a lost connection it is tried once more.
        return self._run(fn, what, lost=lambda exc: None)

    def _by_id(
        self, table: str, column: str, columns: str, value: str
    ) -> list[tuple[Any, ...]]:
        """Return the rows whose id is `value`, else the (at most 2) it is a prefix of."""
        exact = f"SELECT {columns} FROM {table} WHERE {column}=%s"  # noqa: S608  # constant names
        # The id columns are COLLATE "C": the range is a prefix, in byte order.
        prefix = f"SELECT {columns} FROM {table} WHERE {column} >= %s AND {column} < %s LIMIT 2"  # noqa: S608

        def query(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            rows = conn.execute(exact, (value,)).fetchall()
            if not rows and len(value) >= 6:
                rows = conn.execute(prefix, (value, value + "\U0010ffff")).fetchall()
            return rows

        if "\0" in value:
            return []  # PostgreSQL text holds no NUL: no id has one
        return self._read(query, f"read {table}")

    def _mac(self, key: bytes) -> _chain.Mac:
        # record_key may be set after opening (Tether does); build the pads once per key.
        mac = self._macs.get(key)
        if mac is None:
            mac = self._macs[key] = _chain.Mac(key)
        return mac

    # -- news and closing -----------------------------------------------------------

    def wait_for_news(self, seconds: float, sleep: Callable[[float], None]) -> None:
        """Wait up to `seconds`, less once an approval request is decided (LISTEN/NOTIFY).

        The first wait opens a connection of its own that listens; a decision
        made after that wakes the waiter as it commits, from any host. While
        the server cannot be reached, it waits with `sleep`, as a poller does.
        It listens a slice at a time, and ends once the store is closed: a
        `close` from another thread waits for a slice, not for the whole wait.
        """
        with self._listen_lock:
            try:
                conn = self._listener
                if conn is None or conn.closed:
                    if self._closing:
                        return  # closed: no new connection
                    conn = self._listener = psycopg.connect(
                        self._conninfo, autocommit=True
                    )
                    conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
                    )
                slices = max(1, math.ceil(seconds / NEWS_SLICE_S))
                for i in range(slices):
                    if self._closing:
                        break
                    left = seconds - i * NEWS_SLICE_S
                    if _news(conn, min(left, NEWS_SLICE_S)):
                        break
            except psycopg.Error:
                self._close_listener()
            else:
                return
        sleep(seconds)

    def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def close(self) -> None:
        """Close the pool's connections (and the listener's)."""
        self._closing = True  # a wait for news ends within a slice
        with self._listen_lock:
            self._close_listener()
        self._pool.close()


def _news(conn: psycopg.Connection[Any], timeout: float) -> bool:
    """Wait up to `timeout` for a notification on `conn`; tell whether one came."""
    came = False
    for _ in conn.notifies(timeout=timeout, stop_after=1):
        came = True  # the loop runs on: the generator ends, releasing the connection
    return came
