"""Durable state: the store interface and its backends.

`open_store(url)` picks the backend from the URL: `sqlite:///path/to/file.db`
(optionally `?synchronous=normal`), `postgresql://user@host:port/dbname`
(optionally `?pool_size=N`, beside libpq's own parameters) or `memory://`.
`PostgresStore` is imported on first use: it needs the `postgres` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from tether.errors import ConfigError
from tether.store._base import (
    CLOCK_SKEW_WARN,
    ApprovalRow,
    ApprovalStatus,
    Batch,
    Claim,
    Committed,
    GrantGone,
    KeyId,
    KeyRecord,
    KeyState,
    KeyUpdate,
    LimitRow,
    NewRun,
    PendingExists,
    RunRow,
    Store,
    skew_problem,
)
from tether.store.memory import MemoryStore
from tether.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from tether.store.postgres import PostgresStore

__all__ = [
    "CLOCK_SKEW_WARN",
    "ApprovalRow",
    "ApprovalStatus",
    "Batch",
    "Claim",
    "Committed",
    "GrantGone",
    "KeyId",
    "KeyRecord",
    "KeyState",
    "KeyUpdate",
    "LimitRow",
    "MemoryStore",
    "NewRun",
    "PendingExists",
    "PostgresStore",
    "RunRow",
    "SQLiteStore",
    "Store",
    "open_store",
    "safe_url",
    "skew_problem",
    "sqlite_path",
]


def __getattr__(name: str) -> Any:
    # psycopg is an optional extra: import the PostgreSQL backend only when asked.
    if name == "PostgresStore":
        return _postgres().PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _postgres() -> Any:
    try:
        from tether.store import postgres
    except ImportError as exc:
        raise ConfigError(
            f"the PostgreSQL backend needs psycopg ({exc}); "
            "pip install 'tether[postgres]'"
        ) from exc
    return postgres


def sqlite_path(url: str) -> str | None:
    """Return the file path of a `sqlite:///` URL, or None for other URLs."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        return None
    # sqlite:///rel/path -> "rel/path"; sqlite:////abs/path -> "/abs/path"
    return parts.path[1:] if parts.path.startswith("/") else parts.path


def safe_url(url: str) -> str:
    """Return `url` without a password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return parts._replace(netloc=user + host).geturl()


def open_store(
    url: str, *, record_key: bytes | None = None, read_only: bool = False
) -> Store:
    """Open the store named by `url`.

    `read_only` opens a SQLite file only if it is a tether database of this
    schema, and neither creates, configures nor migrates it. (A PostgreSQL
    database is migrated by whoever opens it first: its readers are workers.)

    Raises:
        ConfigError: the URL names no backend tether has, or an option it does
            not know (a PostgreSQL URL may carry libpq's parameters).
        StoreError: the database cannot be opened (or the server reached).
    """
    parts = urlsplit(url)
    given, url = url, safe_url(url)  # every message below quotes the safe one
    if parts.scheme == "memory":
        return MemoryStore()
    if parts.scheme == "sqlite":
        path = sqlite_path(url)
        if not path:
            raise ConfigError(
                f"database URL {url!r} has no file path; write sqlite:///path/to/file.db"
            )
        query = parse_qs(parts.query)
        sync = query.pop("synchronous", ["full"])[0].lower()
        if query:
            raise ConfigError(
                f"database URL {url!r}: unknown option(s) {', '.join(sorted(query))}; "
                "only ?synchronous=full|normal is known"
            )
        if sync not in ("full", "normal"):
            raise ConfigError(
                f"database URL {url!r}: synchronous must be full or normal, got {sync!r}"
            )
        return SQLiteStore(
            path,
            synchronous=sync,  # type: ignore[arg-type]  # checked above
            record_key=record_key,
            read_only=read_only,
        )
    if parts.scheme in ("postgresql", "postgres"):
        store: Store = _postgres().PostgresStore(given, record_key=record_key)
        return store
    raise ConfigError(
        f"database URL {url!r} is not one tether knows; use sqlite:///path/to/file.db, "
        "postgresql://user@host:port/dbname or memory://"
    )
