"""Database URLs: which backend they name, and one-line errors for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

import tether
from tether.store import MemoryStore, SQLiteStore, open_store, safe_url


def test_memory_url_opens_the_in_memory_store() -> None:
    """`memory://` gives a store that lives in the process."""
    assert isinstance(open_store("memory://"), MemoryStore)


def test_sqlite_url_takes_the_synchronous_option(tmp_path: Path) -> None:
    """`?synchronous=normal` sets the level; the default is full."""
    normal = open_store(f"sqlite:///{tmp_path / 'a.db'}?synchronous=NORMAL")
    full = open_store(f"sqlite:///{tmp_path / 'b.db'}")

    assert isinstance(normal, SQLiteStore)
    assert isinstance(full, SQLiteStore)
    assert (normal.synchronous, full.synchronous) == ("normal", "full")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("sqlite://", "has no file path"),
        ("sqlite:///x.db?journal=wal", r"unknown option\(s\) journal"),
        ("sqlite:///x.db?synchronous=off", "synchronous must be full or normal"),
        ("postgresql://u:hunter2@db/tether?flavour=x", r"invalid URI query parameter"),
        ("postgres://u:hunter2@db/tether?pool_size=0", "pool_size must be"),
        ("postgresql://u:hunter2@db/tether?pool_size=many", "pool_size must be"),
        ("mysql://db/tether", "not one tether knows"),
    ],
)
def test_bad_urls_are_one_line_config_errors(url: str, fragment: str) -> None:
    """A URL naming no usable backend is a `ConfigError` saying what to write."""
    with pytest.raises(tether.ConfigError, match=fragment) as caught:
        open_store(url)

    assert "\n" not in caught.value.message
    assert "hunter2" not in caught.value.message


def test_passwords_are_masked_in_urls() -> None:
    """`safe_url` keeps the user, host and port and hides the password."""
    assert (
        safe_url("postgresql://ops:s3cret@db:5432/t")
        == "postgresql://ops:***@db:5432/t"
    )
    assert safe_url("sqlite:///x.db") == "sqlite:///x.db"
