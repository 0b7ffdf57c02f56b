"""The PostgreSQL server the tests use: a fresh database per session, a schema per store.

`TETHER_TEST_POSTGRES_URL` names the server (default: the machine's own, trust
auth, user `postgres`). The session creates a database `tether_test_<hex>` on
it and drops it at the end; every store a test opens gets a schema of its own
in that database (`?options=-csearch_path=t_<hex>`), which is faster than a
database per test and leaves nothing to clean between tests.

An unreachable server fails the tests that need it, in one line saying how to
point them at one: they never skip.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import psycopg
import pytest

__all__ = [
    "DEFAULT_URL",
    "postgres_database",
    "postgres_url",
    "postgres_urls",
    "with_options",
]

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def with_options(url: str, **options: str) -> str:
    """Return `url` with query options added (or replaced)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    query.update(options)
    return parts._replace(query=urlencode(query)).geturl()


def _with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """Create a fresh database for the test session; yield its URL; drop it at the end."""
    admin = os.environ.get("TETHER_TEST_POSTGRES_URL", DEFAULT_URL)
    name = f"tether_test_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        pytest.fail(
            f"no PostgreSQL server at {admin} ({reason}); start one or set "
            "TETHER_TEST_POSTGRES_URL=postgresql://user@host:port/dbname",
            pytrace=False,
        )
    try:
        yield _with_database(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_urls(postgres_database: str) -> Callable[[], str]:
    """Return a function that makes a fresh, empty schema and the URL that uses it."""

    def fresh() -> str:
        schema = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(postgres_database, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return with_options(postgres_database, options=f"-csearch_path={schema}")

    return fresh


@pytest.fixture
def postgres_url(postgres_urls: Callable[[], str]) -> str:
    """The URL of a fresh, empty schema in the session's database."""
    return postgres_urls()
