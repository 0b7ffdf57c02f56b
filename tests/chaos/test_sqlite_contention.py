"""SQLite write contention: eight processes writing to one file (RELIABILITY F.38).

Eight worker processes (`_contention_workers.py`) each open their own `Tether`
on one SQLite file and make runs of mixed writes through the public API: run
opens and finishes, read steps charged to a global budget through a breaker,
and keyed write steps, some retrying a key. Every write is a `BEGIN IMMEDIATE`
transaction on the file's one write lock, so the processes queue for it.

Checked: no "database is locked" or "busy" error reaches a caller; the
workers made at least the target number of commits; every run finished and
verifies, and holds every step its worker took; each key acted once (counted
in an effects file outside the database); the budget's counter equals the sum
of the costs the records settled; the breaker stayed closed. The lock wait
(how long each `BEGIN IMMEDIATE` took) is printed with the throughput, and its
p99 must stay below the 10 s busy timeout.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.store.sqlite import BUSY_TIMEOUT_MS

from ._contention_workers import (
    BREAKER,
    BUDGET,
    CONFIG,
    ContentionWorker,
    percentile,
    spawner,
)
from ._limit_checks import new_seed, settlement, steps
from ._workers import READY, RESULT, START_S, effect_lines

pytestmark = pytest.mark.chaos

PROCESSES = 8
EXPECTED_STEPS = {
    "read:executed",
    "write:executed",
    "write:idempotent_hit",
    "write:called",
}
"""What a worker's steps may come to: nothing refused, failed or in doubt."""


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ContentionWorker]]:
    """Start contention workers in `tmp_path`; any still running at teardown are killed."""
    with spawner(tmp_path) as start:
        yield start


@dataclass(frozen=True)
class Contention:
    """What the workers reported, summed."""

    commits: int
    locked: list[str]
    waits_us: list[int]
    steps: Counter[str]
    runs: list[str]
    keys: int
    seconds: float
    """From the first worker's start to the last one's end."""


def contend(
    spawn: Callable[..., ContentionWorker],
    tmp_path: Path,
    *,
    commits: int,
    finish_s: float,
) -> Contention:
    """Make the database, start the workers, release them together, and sum their accounts."""
    seed = new_seed()
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    tether.Tether(db=db, config=config, env={}).close()  # schema and key file, once
    go = tmp_path / "go"
    share = -(-commits // PROCESSES)
    workers = [
        spawn(
            "write",
            *(
                "--db",
                db,
                "--config",
                str(config),
                "--effects",
                str(tmp_path / "effects"),
            ),
            *("--go", str(go), "--commits", str(share)),
            *("--worker", str(n), "--seed", str(seed + n)),
        )
        for n in range(PROCESSES)
    ]
    started_by = time.monotonic() + START_S
    for worker in workers:
        worker.expect(READY, started_by)
    go.touch()
    deadline = time.monotonic() + finish_s
    accounts: list[dict[str, Any]] = []
    for worker in workers:
        accounts.append(json.loads(worker.expect(RESULT, deadline)))
        assert worker.wait(deadline) == 0
    for account in accounts:
        assert account["commits"] >= share, account["commits"]
    return Contention(
        commits=sum(a["commits"] for a in accounts),
        locked=[m for a in accounts for m in a["locked"]],
        waits_us=[w for a in accounts for w in a["waits_us"]],
        steps=sum((Counter(a["steps"]) for a in accounts), Counter()),
        runs=[r for a in accounts for r in a["runs"]],
        keys=sum(a["keys"] for a in accounts),
        seconds=max(a["ended_s"] for a in accounts)
        - min(a["started_s"] for a in accounts),
    )


def report(seen: Contention) -> str:
    """Return the F.38 line: commits, locked errors, lock wait percentiles, throughput."""
    ordered = sorted(seen.waits_us)
    p50, p99 = percentile(ordered, 0.50), percentile(ordered, 0.99)
    return (
        f"F.38: {PROCESSES} processes, {seen.commits:,} commits, "
        f"{len(seen.locked)} locked errors, lock wait p50 {p50:,} µs, "
        f"p99 {p99:,} µs, max {ordered[-1] / 1000:,.1f} ms, "
        f"{seen.commits / seen.seconds:,.0f} commits/s"
    )


@pytest.mark.parametrize(
    ("commits", "finish_s"),
    [
        pytest.param(10_000, 45.0, id="10k"),
        pytest.param(
            100_000,
            900.0,
            id="100k",
            marks=[pytest.mark.slow, pytest.mark.timeout(1200)],
        ),
    ],
)
def test_eight_processes_writing_one_file_never_surface_a_lock_error(
    spawn: Callable[..., ContentionWorker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    commits: int,
    finish_s: float,
) -> None:
    """Eight processes make 10,000 mixed commits (100,000 in the soak) on one file: no caller sees "database is locked", every run verifies, the budget equals its records, and p99 lock wait is under the busy timeout."""
    seen = contend(spawn, tmp_path, commits=commits, finish_s=finish_s)
    app = tether.Tether(
        db=f"sqlite:///{tmp_path / 'shared.db'}",
        config=tmp_path / "tether.yaml",
        env={},
    )
    reports = [app.verify(run_id) for run_id in seen.runs]
    statuses = Counter(app.store.get_run(run_id).status for run_id in seen.runs)
    stored = len(app.store.list_runs(limit=10 * len(seen.runs)))
    by_step = [step for run_id in seen.runs for step in steps(app, run_id)]
    budget = [
        r for r in app.store.limit_rows(datetime.now(UTC)) if r.limit_id == BUDGET
    ]
    breaker = app.store.breaker_row(BREAKER)
    app.close()
    charged = [line for s in by_step if (line := settlement(s, BUDGET)) is not None]
    acted = Counter(line.split()[2] for line in effect_lines(tmp_path / "effects"))
    with capsys.disabled():
        print(f"\n{report(seen)}")

    assert seen.locked == [], seen.locked[:5]
    assert seen.commits >= commits
    assert set(seen.steps) <= EXPECTED_STEPS, seen.steps
    assert [r for r in reports if not r.ok] == []
    assert statuses == {"succeeded": len(seen.runs)}
    assert stored == len(seen.runs)  # no run was made but the ones reported
    assert len(by_step) == seen.steps.total()
    assert (len(acted), set(acted.values())) == (seen.keys, {1})  # each key acted once
    assert len(charged) == seen.steps["read:executed"]
    assert sum(r.used for r in budget) == sum(Decimal(c["actual"]) for c in charged)
    assert (sum(r.held for r in budget), sum(r.holds for r in budget)) == (0, 0)
    assert breaker.state.value == "closed"
    assert percentile(sorted(seen.waits_us), 0.99) < BUSY_TIMEOUT_MS * 1000
