"""Several processes, several threads each, one SQLite file, one idempotency key (B.12)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tether

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


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start worker processes in `tmp_path`; any still running at teardown are killed."""
    with spawner(tmp_path) as start:
        yield start


def fire_same_key(
    spawn: Callable[..., Worker],
    tmp_path: Path,
    *,
    processes: int,
    threads: int,
    hold: float,
) -> list[dict[str, str | None]]:
    """Start the workers, release them together, and return every thread's outcome."""
    deadline = time.monotonic() + DEADLINE_S
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    go = tmp_path / "go"
    workers = [
        spawn(
            "same-key",
            "--db",
            db,
            "--effects",
            str(tmp_path / "effects"),
            "--go",
            str(go),
            "--threads",
            str(threads),
            "--hold",
            str(hold),
        )
        for _ in range(processes)
    ]
    started_by = time.monotonic() + START_S
    for worker in workers:
        worker.expect(READY, started_by)
    go.touch()
    deadline = time.monotonic() + DEADLINE_S
    outcomes = []
    for worker in workers:
        outcomes += json.loads(worker.expect(RESULT, deadline))
        assert worker.wait(deadline) == 0
    return outcomes


def test_the_same_key_from_four_processes_executes_once(
    spawn: Callable[..., Worker], tmp_path: Path
) -> None:
    """Eight threads in each of four processes fire one key together: one execution, the rest in use or replayed."""
    outcomes = fire_same_key(spawn, tmp_path, processes=4, threads=8, hold=0.3)

    assert len(outcomes) == 32
    assert len(effect_lines(tmp_path / "effects")) == 1
    kinds = Counter((o["status"], o["code"]) for o in outcomes)
    assert kinds[("executed", None)] == 1
    assert set(kinds) <= {
        ("executed", None),
        ("idempotent_hit", None),
        ("refused", "idempotency_key_in_use"),
    }
    assert len({o["output"] for o in outcomes if o["output"] is not None}) == 1


def test_two_processes_on_one_file_act_once_and_later_callers_replay(
    spawn: Callable[..., Worker], tmp_path: Path
) -> None:
    """Two processes call one keyed capability with one key: the effect happens once, and a later caller gets the stored reply."""
    outcomes = fire_same_key(spawn, tmp_path, processes=2, threads=1, hold=0.0)
    effects = tmp_path / "effects"
    app = tether.Tether(db=f"sqlite:///{tmp_path / 'shared.db'}", env={})
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
