"""What the limits chaos tests share: setting a database up, releasing workers, reading records back.

Every check reads the result three ways: what the workers saw (their `RESULT`
tallies), what the records say (events read back from the store, each run
verified), and what `store.limit_rows` holds at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tether
from tether.store._base import LimitRow

from ._backends import Backend
from ._limit_workers import CALLED, LimitWorker
from ._workers import READY, RESULT, START_S

__all__ = [
    "DEADLINE_S",
    "clear_of_midnight",
    "events",
    "fire",
    "new_seed",
    "row",
    "settled",
    "settlement",
    "setup",
    "steps",
]

DEADLINE_S = 30.0
"""How long workers get to start (8 interpreters on a small machine take a while)."""
FINISH_S = 90.0
"""How long released workers get to finish their calls."""


def new_seed() -> int:
    """Return the seed for a randomized test: `TETHER_TEST_SEED`, or a fresh one."""
    seed = int(
        os.environ.get("TETHER_TEST_SEED") or random.SystemRandom().randrange(2**32)
    )
    print(f"seed={seed} (rerun with TETHER_TEST_SEED={seed})")
    return seed


def setup(backend: Backend, tmp_path: Path, limits: str) -> tuple[str, Path]:
    """Write `tether.yaml` with `limits`, create the database, return (db URL, config)."""
    config = tmp_path / "tether.yaml"
    config.write_text(f"limits:\n{limits}")
    backend.open(config).close()  # schema (and key file), made once
    return backend.db, config


def clear_of_midnight() -> None:
    """Wait out the last seconds of a UTC day, so a day window cannot turn mid-test.

    The multi-process tests use the real clock and a day window; a window that
    turned halfway would give a second budget and fail them for no fault.
    """
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    if midnight - now < timedelta(seconds=30):
        time.sleep((midnight - now).total_seconds() + 0.1)


def fire(
    spawn: Callable[..., LimitWorker],
    tmp_path: Path,
    runs: Sequence[Sequence[str]],
    *,
    during: contextlib.AbstractContextManager[object] | None = None,
    finish: float = FINISH_S,
) -> tuple[list[str], Counter[str]]:
    """Start one worker per argument list, release them together; return run ids and the summed tally.

    Args:
        spawn: starts one worker.
        tmp_path: where the signal files are made.
        runs: each worker's arguments.
        during: entered just before the workers are released, and left once
            each has printed `CALLED` (a thread making chaos, say); the workers
            (`endure`) then get the `--calm` file and finish.
        finish: how long the released workers get to finish (`FINISH_S`
            unless a bigger test says more).
    """
    deadline = time.monotonic() + DEADLINE_S
    go, calm = tmp_path / "go", tmp_path / "calm"
    extra = ["--go", str(go)] + (["--calm", str(calm)] if during else [])
    workers = [spawn(*args, *extra) for args in runs]
    started_by = time.monotonic() + START_S
    for worker in workers:
        worker.expect(READY, started_by)
    with during or contextlib.nullcontext():
        go.touch()
        deadline = time.monotonic() + finish
        if during is not None:
            for worker in workers:
                worker.expect(CALLED, deadline)
    calm.touch()
    run_ids: list[str] = []
    tally: Counter[str] = Counter()
    for worker in workers:
        result = json.loads(worker.expect(RESULT, deadline))
        run_ids += result["runs"]
        tally.update(result["tally"])
        assert worker.wait(deadline) == 0
    return run_ids, tally


def events(
    app: tether.Tether, run_ids: Sequence[str], kind: str
) -> list[dict[str, Any]]:
    """Return the events of `kind` in the records of `run_ids`, read back from the store."""
    found = []
    for run_id in run_ids:
        assert app.verify(run_id).ok
        found += [
            e.data() for e in app.store.events(run_id) if e.data()["kind"] == kind
        ]
    return found


def settled(
    app: tether.Tether, run_ids: Sequence[str], limit: str
) -> list[dict[str, Any]]:
    """Return every settlement line of `limit` in the records, one per reserving step.

    A step that settled as it reserved has no `limit_settled` event (its
    `limit_reserved` and `executed` say it): its line is the reservation's.
    """
    found = []
    for run_id in run_ids:
        assert app.verify(run_id).ok
        for step in steps(app, run_id):
            line = settlement(step, limit)
            if line is not None:
                found.append(line)
    return found


def settlement(step: dict[str, dict[str, Any]], limit: str) -> dict[str, Any] | None:
    """Return how `limit` settled in one step (None: the step reserved none of it)."""
    reserved = step.get("limit_reserved")
    if reserved is None:
        return None
    (taken,) = [x for x in reserved["limits"] if x["id"] == limit]
    for line in step.get("limit_settled", {}).get("limits", []):
        if line["id"] == limit:
            return dict(line)
    return {
        "id": limit,
        "scope": taken["scope"],
        "reserved": taken["amount"],
        "actual": taken["amount"],
    }


def steps(app: tether.Tether, run_id: str) -> list[dict[str, dict[str, Any]]]:
    """Return a run's steps in order, each its events by kind."""
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for e in app.store.events(run_id):
        data = e.data()
        if data["step"] is not None:
            found.setdefault(data["step"], {})[data["kind"]] = data
    return [found[n] for n in sorted(found)]


def row(app: tether.Tether, limit: str) -> LimitRow:
    """Return the one counter row of `limit` (a global scope, one window)."""
    rows = [r for r in app.store.limit_rows(datetime.now(UTC)) if r.limit_id == limit]
    assert len(rows) == 1, rows
    return rows[0]
