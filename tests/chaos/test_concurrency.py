"""Several processes, many threads each, one database, one idempotency key (B.12).

The processes share the `backend` fixture's database: a SQLite file, or a
PostgreSQL schema (every process with the one record key).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tether

from ._backends import Backend
from ._workers import (
    ARGS,
    PRINCIPAL,
    READY,
    RESULT,
    START_S,
    Worker,
    effect_lines,
    make_charge,
    spawner,
)

pytestmark = pytest.mark.chaos

DEADLINE_S = 9.0
"""How long released workers get to finish 32 calls; a bigger test gets more in proportion."""


@pytest.fixture
def spawn(tmp_path: Path, backend: Backend) -> Iterator[Callable[..., Worker]]:
    """Start worker processes in `tmp_path` on `backend`; any still running at teardown are killed."""
    with spawner(tmp_path, backend.env) as start:
        yield start


def fire_same_key(
    spawn: Callable[..., Worker],
    tmp_path: Path,
    backend: Backend,
    *,
    processes: int,
    threads: int,
    hold: float,
) -> list[dict[str, str | None]]:
    """Start the workers, release them together, and return every thread's outcome."""
    # No one makes the database first: the workers open a new file (or an empty
    # schema) together, which must work too.
    go = tmp_path / "go"
    within = DEADLINE_S * max(1.0, processes * threads / 32)
    workers = [
        spawn(
            "same-key",
            "--db",
            backend.db,
            "--effects",
            str(tmp_path / "effects"),
            "--go",
            str(go),
            "--threads",
            str(threads),
            "--hold",
            str(hold),
            "--within",
            str(within),
        )
        for _ in range(processes)
    ]
    started_by = time.monotonic() + START_S
    for worker in workers:
        worker.expect(READY, started_by)
    go.touch()
    deadline = time.monotonic() + within + 5  # the workers' own limit, then closing
    outcomes = []
    for worker in workers:
        outcomes += json.loads(worker.expect(RESULT, deadline))
        assert worker.wait(deadline) == 0
    return outcomes


@pytest.mark.parametrize(
    "threads",
    [
        pytest.param(8, id="4x8"),
        pytest.param(50, id="4x50", marks=[pytest.mark.slow, pytest.mark.timeout(180)]),
    ],
)
def test_the_same_key_from_four_processes_executes_once(
    spawn: Callable[..., Worker], tmp_path: Path, backend: Backend, threads: int
) -> None:
    """8 threads in each of 4 processes (50 in the soak, the catalogue's size) fire one key together, holding it 0.3 s, on SQLite and PostgreSQL: exactly one execution; every other thread is refused with `idempotency_key_in_use` (some are: the calls overlapped) or replays the one stored result; none raises."""
    outcomes = fire_same_key(
        spawn, tmp_path, backend, processes=4, threads=threads, hold=0.3
    )

    raised = [o for o in outcomes if o["status"] == "raised"]
    assert raised == []
    assert len(outcomes) == 4 * threads
    assert len(effect_lines(tmp_path / "effects")) == 1
    kinds = Counter((o["status"], o["code"]) for o in outcomes)
    assert kinds[("executed", None)] == 1
    assert kinds[("refused", "idempotency_key_in_use")] > 0  # the calls overlapped
    assert set(kinds) <= {
        ("executed", None),
        ("idempotent_hit", None),
        ("refused", "idempotency_key_in_use"),
    }
    assert len({o["output"] for o in outcomes if o["output"] is not None}) == 1


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_two_processes_on_one_file_act_once_and_later_callers_replay(
    spawn: Callable[..., Worker], tmp_path: Path, backend: Backend
) -> None:
    """Two processes call one keyed capability with one key: the effect happens once, and a later caller gets the stored reply."""
    outcomes = fire_same_key(spawn, tmp_path, backend, processes=2, threads=1, hold=0.0)
    effects = tmp_path / "effects"
    app = backend.open()
    app.register(make_charge(effects))

    with app.run(principal=PRINCIPAL, request="charge o-1 later") as run:
        later = run.step("pay.charge", ARGS, idempotency_key="charge-o-1")
    app.close()

    assert len(effect_lines(effects)) == 1
    executed = [o["output"] for o in outcomes if o["status"] == "executed"]
    assert len(executed) == 1
    assert {o["status"] for o in outcomes} <= {"executed", "idempotent_hit", "refused"}
    assert later.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert later.output is not None
    assert later.output.model_dump_json() == executed[0]
