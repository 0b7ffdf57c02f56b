"""The databases the multi-process chaos tests share: a SQLite file, or a PostgreSQL schema.

A test takes the `backend` fixture (`conftest.py`) and hands `backend.db` and
`backend.env` to every process it starts, and to the `Tether` it opens to
check the result. On PostgreSQL the record key cannot live in a key file beside
the database, so every process gets the same `TETHER_RECORD_KEY`, as every host
of a real deployment does; the processes count doubles, as issue 8 asks.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import tether
from _postgres import with_options

from ._workers import RECORD_KEY_VAR

__all__ = ["Backend", "postgres_backend", "sqlite_backend"]


@dataclass(frozen=True)
class Backend:
    """One database every process of a test opens, and how they open it."""

    name: str
    """`sqlite` or `postgres`."""
    db: str
    """The database URL each process passes as `db=`."""
    processes: int
    """How many worker processes the contention tests start on it."""
    env: Mapping[str, str] = field(default_factory=dict)
    """What each process's `Tether(env=...)` reads, and its children inherit."""

    def open(self, config: Path | None = None) -> tether.Tether:
        """Open a `Tether` on the shared database, as every worker does."""
        return tether.Tether(db=self.db, config=config, env=self.env)

    def child_env(self, **extra: str) -> dict[str, str]:
        """Return the environment for a child process: ours, plus the backend's."""
        return {**os.environ, **self.env, **extra}

    def tagged(self, tag: str) -> Backend:
        """Return this PostgreSQL database, every connection to it carrying `tag`.

        The tag is the connections' `application_name`, so a test can find (and
        kill) exactly the sessions of the processes it gave this URL to.
        """
        return replace(self, db=with_options(self.db, application_name=tag))


def sqlite_backend(tmp_path: Path) -> Backend:
    """A SQLite file in `tmp_path` (its record key: the key file beside it), 4 processes."""
    db = f"sqlite:///{tmp_path / 'shared.db'}?synchronous=normal"
    return Backend(name="sqlite", db=db, processes=4)


def postgres_backend(url: str) -> Backend:
    """A fresh PostgreSQL schema at `url` (from the `postgres_urls` fixture) with one record key for all, 8 processes."""
    key = secrets.token_hex(32)
    return Backend(name="postgres", db=url, processes=8, env={RECORD_KEY_VAR: key})
