"""`Store.list_runs` pages by a keyset cursor, alike on every backend.

Part of the store conformance suite (RELIABILITY.md F.37): each test runs on
memory, SQLite and PostgreSQL through the `store` fixture, as
`test_conformance.py` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tether import record
from tether.store import Batch, NewRun, RunRow, Store, open_store

T0 = datetime(2026, 1, 1, tzinfo=UTC)

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store of each backend."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
    else:
        url = "memory://"
    s = open_store(url, record_key=b"conformance-key")
    yield s
    s.close()


def create_run(store: Store, run_id: str, at: datetime) -> None:
    """Create an executing run at `at`."""
    store.commit(
        Batch(
            run_id=run_id,
            epoch=1,
            base_seq=0,
            base_hash=record.genesis(run_id),
            events=[
                record.RunStarted(at=at, request="charge", principal={"id": "pay-bot"}),
                record.RunStatus(at=at, previous="pending", status="executing"),
            ],
            new_run=NewRun(
                tenant="acme",
                principal_id="pay-bot",
                request="charge",
                status="executing",
                created_at=at,
            ),
            at=at,
        )
    )


def set_status(store: Store, run_id: str, status: str, at: datetime) -> None:
    """Move a run to `status`."""
    row = store.get_run(run_id)
    store.commit(
        Batch(
            run_id=run_id,
            epoch=1,
            base_seq=row.head_seq,
            base_hash=row.head_hash,
            events=[record.RunStatus(at=at, previous=row.status, status=status)],
            status=status,
            at=at,
        )
    )


def walk(store: Store, *, page: int, **query: object) -> list[list[str]]:
    """Return every page of a listing, each page's run ids, following `after`."""
    pages: list[list[str]] = []
    after: RunRow | None = None
    while True:
        rows = store.list_runs(limit=page, after=after, **query)  # type: ignore[arg-type]  # status, oldest_first
        if not rows:
            return pages
        pages.append([r.run_id for r in rows])
        after = rows[-1]


def test_pages_followed_by_after_list_every_run_once_in_creation_order(
    store: Store,
) -> None:
    """Pages linked by `after` hold every run once; runs created at one instant go by id."""
    for run_id, seconds in [
        ("run_e", 2),
        ("run_c", 1),
        ("run_a", 1),  # three at one instant, created out of id order
        ("run_b", 1),
        ("run_d", 0),
    ]:
        create_run(store, run_id, T0 + timedelta(seconds=seconds))

    newest = walk(store, page=2)
    oldest = walk(store, page=2, oldest_first=True)

    assert newest == [["run_e", "run_c"], ["run_b", "run_a"], ["run_d"]]
    assert oldest == [["run_d", "run_a"], ["run_b", "run_c"], ["run_e"]]
    assert [r.run_id for r in store.list_runs()] == [i for p in newest for i in p]


def test_a_status_listing_goes_on_after_a_run_that_left_the_status(
    store: Store,
) -> None:
    """The next page of a status starts after the cursor row even when that run has left the status."""
    for n in range(5):
        create_run(store, f"run_{n}", T0 + timedelta(seconds=n))
    set_status(store, "run_2", "succeeded", T0 + timedelta(seconds=9))
    first = store.list_runs(status="executing", limit=2, oldest_first=True)
    set_status(store, first[-1].run_id, "succeeded", T0 + timedelta(seconds=10))

    rest = store.list_runs(
        status="executing", limit=10, after=first[-1], oldest_first=True
    )
    older = store.list_runs(status="executing", limit=10, after=rest[0])

    assert [r.run_id for r in first] == ["run_0", "run_1"]
    assert [r.run_id for r in rest] == ["run_3", "run_4"]
    assert [r.run_id for r in older] == ["run_0"]


def test_a_page_after_the_last_run_is_empty(store: Store) -> None:
    """Past the newest (or oldest) run a listing has nothing more to give."""
    for n in range(3):
        create_run(store, f"run_{n}", T0 + timedelta(seconds=n))
    newest, oldest = store.list_runs(limit=1)[0], store.list_runs(limit=3)[-1]

    assert store.list_runs(after=oldest) == []
    assert store.list_runs(after=newest, oldest_first=True) == []
