"""Fixtures shared by the whole suite: an app on a fresh SQLite file, a fake clock.

The PostgreSQL fixtures (`postgres_database`, `postgres_urls`, `postgres_url`)
live in `_postgres.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tether
from _postgres import postgres_database, postgres_url, postgres_urls
from tether.testing import FakeClock, temporary_app

__all__ = ["postgres_database", "postgres_url", "postgres_urls"]


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when the test says."""
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock) -> Iterator[tether.Tether]:
    """A Tether on a fresh SQLite file (WAL, synchronous=NORMAL) with the fake clock."""
    with temporary_app(clock=clock) as a:
        yield a


@pytest.fixture
def principal() -> tether.Principal:
    """The agent most tests act as."""
    return tether.Principal("ops-bot", roles=["agent"], tenant="acme")


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run a gateway test through both drivers."""
    return str(request.param)
