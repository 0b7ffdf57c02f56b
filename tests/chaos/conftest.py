"""The chaos tests' shared database (`backend`: a SQLite file or a PostgreSQL schema) and `spawn`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ._backends import Backend, postgres_backend, sqlite_backend
from ._limit_workers import LimitWorker, spawner


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The database a test's processes share: SQLite (4 processes) or PostgreSQL (8)."""
    if request.param == "postgres":
        make_url: Callable[[], str] = request.getfixturevalue("postgres_urls")
        return postgres_backend(make_url())
    return sqlite_backend(tmp_path)


@pytest.fixture
def spawn(tmp_path: Path, backend: Backend) -> Iterator[Callable[..., LimitWorker]]:
    """Start limit worker processes in `tmp_path` on `backend`; any still running at teardown are killed."""
    with spawner(tmp_path, backend.env) as start:
        yield start
