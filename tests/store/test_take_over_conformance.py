"""`Store.take_over` fences by lease, alike on every backend (RELIABILITY.md F.37).

Part of the store conformance suite: "lease acquire/renew/expire with epochs".
Each test runs on memory, SQLite and PostgreSQL (the local server, a fresh
schema per test), as `test_conformance.py` does. A run's lease is the latest
`Batch.lease_until` its writer committed (or `renew_lease` moved on); a run
left in an orphaned state may be taken over only once that lease ran out, a
parked one whatever its lease says, an ended one never. Times are the test's
own (`now=`), never the wall clock's: nothing sleeps and nothing is timed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tether
from tether import record
from tether.store import Batch, Committed, RunRow, Store, open_store

from .test_conformance import create_run

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TTL = timedelta(minutes=5)
SECOND = timedelta(seconds=1)
PARKED = ("awaiting_approval", "degraded")
ORPHANED = ("executing", "planning")
RACES = 30
"""How many times the two-worker race is run, each on a fresh run (bounded)."""

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend, by URL."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
    return "memory://"


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    """A store on the fresh database."""
    s = open_store(url, record_key=b"take-over-key")
    yield s
    s.close()


@pytest.fixture
def opener(url: str, store: Store) -> Iterator[Callable[[], Store]]:
    """Open another store on the same database (memory: the one store, shared)."""
    opened: list[Store] = []

    def another() -> Store:
        if url.startswith("memory:"):
            return store  # a memory store is one process's: share it
        s = open_store(url, record_key=b"take-over-key")
        opened.append(s)
        return s

    yield another
    for s in opened:
        s.close()


# -- helpers ---------------------------------------------------------------------------


def write(
    store: Store,
    run_id: str,
    *,
    epoch: int,
    at: datetime,
    lease_until: datetime | None = None,
    status: str | None = None,
) -> Committed:
    """Commit one event at the run's head as the writer holding `epoch`."""
    row = store.get_run(run_id)
    return store.commit(
        Batch(
            run_id=run_id,
            epoch=epoch,
            base_seq=row.head_seq,
            base_hash=row.head_hash,
            events=[
                record.RunStatus(
                    at=at, previous=row.status, status=status or row.status
                )
            ],
            status=status,
            lease_until=lease_until,
            at=at,
        )
    )


def take_over(store: Store, run_id: str, now: datetime | None) -> RunRow:
    """Take a run over as `Tether.resume` does: parked or orphaned states, with a lease."""
    return store.take_over(
        run_id,
        parked=PARKED,
        orphaned=ORPHANED,
        now=now,
        lease_until=None if now is None else now + TTL,
    )


def refused(store: Store, run_id: str, now: datetime | None) -> bool:
    """Tell whether a take-over at `now` is refused with `UsageError`."""
    try:
        take_over(store, run_id, now)
    except tether.UsageError:
        return True
    return False


# -- an orphaned run: taken over only once its lease ran out ----------------------------


@pytest.mark.parametrize("late", [timedelta(0), SECOND], ids=["at_end", "past_end"])
def test_an_orphaned_run_is_taken_over_only_once_its_last_writes_lease_ran_out(
    store: Store, late: timedelta
) -> None:
    """A run left `executing` is refused to a new writer while the lease of its last
    write is live (the first write's, run out, does not count), epoch unchanged;
    at or past that lease's end it is taken over with epoch + 1, and from then
    on the old writer is fenced off (`LeaseLost`) while the new one writes."""
    create_run(store, "run_orph01", lease_until=T0 + TTL)
    last = T0 + timedelta(minutes=1)
    write(store, "run_orph01", epoch=1, at=last, lease_until=last + TTL)
    lease_end = last + TTL

    live = [
        refused(store, "run_orph01", now)
        for now in (last, T0 + TTL, lease_end - SECOND)
    ]
    before = store.get_run("run_orph01")
    taken = take_over(store, "run_orph01", lease_end + late)
    after = store.get_run("run_orph01")

    assert live == [True, True, True]
    assert before.epoch == 1
    assert before.lease_until == lease_end
    assert (taken.run_id, taken.epoch, taken.status) == ("run_orph01", 2, "executing")
    assert after.epoch == 2
    assert taken.head_seq == after.head_seq == before.head_seq  # nothing was written

    with pytest.raises(tether.LeaseLost):
        write(store, "run_orph01", epoch=1, at=lease_end, lease_until=lease_end + TTL)
    assert store.get_run("run_orph01").head_seq == before.head_seq
    landed = write(
        store, "run_orph01", epoch=2, at=lease_end, lease_until=lease_end + TTL
    )
    assert landed.head_seq == before.head_seq + 1
    assert store.get_run("run_orph01").head_seq == before.head_seq + 1


def test_an_orphaned_run_refused_by_a_live_lease_keeps_its_epoch(store: Store) -> None:
    """A refused take-over changes nothing: the live writer goes on writing at its
    epoch, and the run is still the same row."""
    create_run(store, "run_orph02", lease_until=T0 + TTL)

    with pytest.raises(tether.UsageError):
        take_over(store, "run_orph02", T0 + TTL - SECOND)
    kept = write(store, "run_orph02", epoch=1, at=T0 + SECOND, lease_until=T0 + TTL)
    row = store.get_run("run_orph02")

    assert row.epoch == 1
    assert kept.head_seq == row.head_seq == 3


# -- a parked run: taken over whatever its lease says -----------------------------------


@pytest.mark.parametrize(
    ("lease_until", "now"),
    [
        (T0 + TTL, T0 + SECOND),  # live
        (T0 + TTL, T0 + TTL),  # just run out
        (T0 + TTL, T0 + 10 * TTL),  # long run out
        (None, T0 + SECOND),  # never set
        (T0 + TTL, None),  # no time given
    ],
    ids=["live", "at_end", "lapsed", "no_lease", "no_now"],
)
@pytest.mark.parametrize("status", PARKED)
def test_a_parked_run_is_taken_over_whatever_its_lease_says(
    store: Store, status: str, lease_until: datetime | None, now: datetime | None
) -> None:
    """A run parked in `awaiting_approval` or `degraded` is taken over (epoch + 1),
    live lease or not; its old writer is fenced off from then on."""
    create_run(store, "run_park01", status=status, lease_until=lease_until)

    taken = take_over(store, "run_park01", now)

    assert (taken.epoch, taken.status) == (2, status)
    assert store.get_run("run_park01").epoch == 2
    with pytest.raises(tether.LeaseLost):
        write(store, "run_park01", epoch=1, at=T0 + SECOND)
    assert write(store, "run_park01", epoch=2, at=T0 + SECOND).head_seq == 3


# -- two workers racing for one orphaned run --------------------------------------------


def test_two_workers_racing_for_an_orphaned_run_one_wins(
    store: Store, opener: Callable[[], Store]
) -> None:
    """Two workers take over the same orphaned run, its lease run out: exactly one
    gets it (epoch 2), the other is refused with `UsageError`.

    Each worker is a thread with a store of its own on the same database (memory:
    the one store, shared). The race is run `RACES` (30) times, each on a fresh
    run: a bounded count, not a soak. In half of them a barrier releases both
    workers at once (any interleaving); in the other half the second starts as
    soon as the first returned (the latest a racer can arrive while the winner
    has not written yet), so both ends of the race are covered on every run.
    """
    workers = [opener(), opener()]
    now = T0 + TTL
    outcomes: list[tuple[str, list[str], int]] = []
    for n in range(RACES):
        run_id = f"run_race{n:03d}"
        create_run(store, run_id, lease_until=T0 + TTL)
        together = n % 2 == 0

        def attempt(s: Store, r: str = run_id) -> RunRow:
            return take_over(s, r, now)

        results = race(workers, attempt, together=together)
        outcomes.append(
            (
                "together" if together else "one after the other",
                sorted(describe(r) for r in results),
                store.get_run(run_id).epoch,
            )
        )

    assert [o for o in outcomes if o[1:] != (["UsageError", "epoch 2"], 2)] == []


def race(
    stores: list[Store], attempt: Callable[[Store], RunRow], *, together: bool = True
) -> list[RunRow | Exception]:
    """Run `attempt` on every store; return each result or error, in order.

    `together`: a barrier releases every racer at once; else each racer starts
    as soon as the one before it returned.
    """
    barrier = threading.Barrier(len(stores))
    done = [threading.Event() for _ in stores]
    results: list[RunRow | Exception] = [RuntimeError("did not run")] * len(stores)

    def run(i: int) -> None:
        if together:
            barrier.wait(timeout=10)
        elif i > 0:
            done[i - 1].wait(timeout=10)
        try:
            results[i] = attempt(stores[i])
        except Exception as exc:  # the race's loser is the answer
            results[i] = exc
        finally:
            done[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def describe(result: RunRow | Exception) -> str:
    """Name a racer's outcome: the epoch it won, or the error's class."""
    if isinstance(result, Exception):
        return type(result).__name__
    return f"epoch {result.epoch}"


def test_an_orphaned_run_just_taken_over_is_not_taken_over_again(store: Store) -> None:
    """Once a worker took an orphaned run over, another worker is refused with
    `UsageError` (the run is held), even before the new holder's first write."""
    create_run(store, "run_orph03", lease_until=T0 + TTL)
    first = take_over(store, "run_orph03", T0 + TTL)

    with pytest.raises(tether.UsageError):
        take_over(store, "run_orph03", T0 + TTL)
    assert store.get_run("run_orph03").epoch == first.epoch == 2


def test_an_orphaned_run_whose_new_writer_wrote_is_not_taken_over_again(
    store: Store,
) -> None:
    """Once the new holder of a taken-over run wrote (renewing the lease), a second
    take-over is refused and the holder keeps writing."""
    create_run(store, "run_orph04", lease_until=T0 + TTL)
    take_over(store, "run_orph04", T0 + TTL)
    write(store, "run_orph04", epoch=2, at=T0 + TTL, lease_until=T0 + 2 * TTL)

    with pytest.raises(tether.UsageError):
        take_over(store, "run_orph04", T0 + TTL + SECOND)
    kept = write(store, "run_orph04", epoch=2, at=T0 + TTL + SECOND)
    assert store.get_run("run_orph04").epoch == 2
    assert kept.head_seq == 4


def test_an_orphaned_run_is_not_taken_over_without_a_time(
    store: Store,
) -> None:
    """Without `now` nothing can have run out: a run left `executing` is refused
    with `UsageError`, even one whose writer never set a lease."""
    create_run(store, "run_orph05", lease_until=None)

    with pytest.raises(tether.UsageError):
        take_over(store, "run_orph05", None)
    assert store.get_run("run_orph05").epoch == 1


# -- an ended run: never taken over ------------------------------------------------------


@pytest.mark.parametrize(
    ("lease_until", "now"),
    [
        (T0 + TTL, T0 + SECOND),  # live
        (T0 + TTL, T0 + TTL),  # just run out
        (T0 + TTL, T0 + 10 * TTL),  # long run out
        (None, T0 + SECOND),  # never set
        (T0 + TTL, None),  # no time given
    ],
    ids=["live", "at_end", "lapsed", "no_lease", "no_now"],
)
def test_a_succeeded_run_is_never_taken_over(
    store: Store, lease_until: datetime | None, now: datetime | None
) -> None:
    """A run that ended `succeeded` is refused with `UsageError`, lease live or run
    out; its epoch stays, and nothing is written."""
    create_run(store, "run_done01", lease_until=lease_until)
    write(
        store,
        "run_done01",
        epoch=1,
        at=T0 + SECOND,
        lease_until=lease_until,
        status="succeeded",
    )
    before = store.get_run("run_done01")

    with pytest.raises(tether.UsageError):
        take_over(store, "run_done01", now)
    after = store.get_run("run_done01")

    assert before.status == after.status == "succeeded"
    assert before.epoch == after.epoch == 1
    assert before.head_seq == after.head_seq == 3


# -- renew_lease: a heartbeat keeps the run from looking orphaned -----------------------


def test_a_renewed_lease_keeps_an_orphaned_state_run_from_being_taken_over(
    store: Store,
) -> None:
    """A live writer's `renew_lease` moves its run's lease forward, never back: a
    take-over past the old lease but before the renewed one is refused (epoch
    unchanged); once the renewed lease ran out, the run is taken over."""
    create_run(store, "run_beat01", lease_until=T0 + TTL)
    renewed_until = T0 + 3 * TTL

    renewed = store.renew_lease("run_beat01", epoch=1, until=renewed_until)
    not_back = store.renew_lease("run_beat01", epoch=1, until=T0 + SECOND)
    held = [
        refused(store, "run_beat01", now)
        for now in (T0 + TTL, T0 + 2 * TTL, renewed_until - SECOND)
    ]
    before = store.get_run("run_beat01")
    taken = take_over(store, "run_beat01", renewed_until)
    stale_beat = store.renew_lease("run_beat01", epoch=1, until=T0 + 10 * TTL)

    assert (renewed, not_back) == (True, True)
    assert held == [True, True, True]
    assert before.epoch == 1
    assert before.lease_until == renewed_until
    assert taken.epoch == 2
    assert stale_beat is False  # the old writer's heartbeat is fenced off too
    lease = store.get_run("run_beat01").lease_until
    assert lease is not None
    assert lease < T0 + 10 * TTL  # and moved nothing
