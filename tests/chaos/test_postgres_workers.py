"""Many `tether worker` processes on one PostgreSQL schema share the parked runs (issue 8, item 4).

M scripted runs each take a step, then park on a step that needs a person's
approval; a person approves them all. Then N `tether worker --until-idle`
processes, released together, race for the ready runs. Every run is resumed by
exactly one worker (the others find it taken: its take-over bumped the lease
epoch, and a worker overtaken before its first write is fenced off), no step's
handler runs twice (counted in the upstream's own file, outside the database),
every run finishes and verifies, and more than one worker did the work.

A waiting worker is woken by the decision itself (LISTEN/NOTIFY), not by its
next look: with looks a minute apart, an approved run is resumed at once.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from ._agents import (
    AGENT,
    agent_env,
    calls,
    effects,
    start_worker,
    stop,
    worker_output,
)
from ._backends import postgres_backend

pytestmark = [pytest.mark.chaos, pytest.mark.postgres]

STEPS = 4
GATED = 1
"""The step each run parks on until a person approves it."""
CONFIG = """
rules:
  - {id: gate, match: {capability: ops.gated}, decision: require_approval,
     reason: a person checks, approvers: [ops]}
approvers: {alice: [ops]}
"""
SEED_RUNS = """
import sys, agentapp, tether
app = agentapp.app
ids = []
for i in range(int(sys.argv[1])):
    # A principal each: identical calls of one principal share one request.
    run = app.start(f"run {i}", planner="ops",
                    principal=tether.Principal(f"ops-bot-{i}", on_behalf_of="carol"))
    assert run.status.value == "awaiting_approval", run.status
    ids.append(run.id)
for request in app.approvals(status="pending", limit=10_000):
    app.approve(request.id, by="alice")
assert not app.approvals(status="pending")
print(" ".join(ids))
"""
RESUMED = re.compile(r"^resumed (\S+) (\S+)$", re.MULTILINE)


def script(home: Path, env: dict[str, str], code: str, *args: str) -> str:
    """Run `code` in a Python of the agent's deployment; return what it printed."""
    done = subprocess.run(  # our interpreter, our script
        [sys.executable, "-c", code, *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def share(
    tmp_path: Path, make_url: Callable[[], str], *, workers: int, runs: int
) -> None:
    """Park `runs` runs, approve them, let `workers` workers race for them; check the result."""
    backend = postgres_backend(make_url())
    (tmp_path / "agentapp.py").write_text(AGENT)
    (tmp_path / "tether.yaml").write_text(CONFIG)
    env = agent_env(tmp_path, backend, steps=STEPS, pause=0.02, AGENT_GATED=str(GATED))
    run_ids = script(tmp_path, env, SEED_RUNS, str(runs)).split()
    go = tmp_path / "go"
    procs = [
        start_worker(tmp_path, {**env, "AGENT_GO": str(go)}, "--until-idle", *POLL)
        for _ in range(workers)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("waiting-*"))) < workers:  # all imported, waiting
        assert time.monotonic() < deadline, "the workers did not start"
        for p in procs:
            assert p.poll() is None, worker_output(tmp_path, p)
        time.sleep(0.01)

    go.touch()
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    outputs = [worker_output(tmp_path, p) for p in procs]
    with backend.open(tmp_path / "tether.yaml") as app:
        rows = {run_id: app.store.get_run(run_id) for run_id in run_ids}
        reports = {run_id: app.verify(run_id) for run_id in run_ids}
        events = {
            run_id: [e.data() for e in app.store.events(run_id)] for run_id in run_ids
        }

    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    resumed = [RESUMED.findall(out) for out, _ in outputs]
    by_run = Counter(run_id for found in resumed for run_id, _ in found)
    assert by_run == dict.fromkeys(run_ids, 1)  # each run resumed by one worker
    assert {status for found in resumed for _, status in found} == {"succeeded"}
    assert sum(1 for found in resumed if found) >= 2, "one worker did all the work"
    for run_id in run_ids:
        kinds = Counter(e["kind"] for e in events[run_id])
        executed = Counter(e["step"] for e in events[run_id] if e["kind"] == "executed")
        assert reports[run_id].ok, reports[run_id].reason
        assert rows[run_id].status == "succeeded"
        assert rows[run_id].epoch >= 2  # taken over at least once, from the park
        assert len(executed) == STEPS
        assert set(executed.values()) == {1}
        assert kinds["approval_used"] == 1
    handled = Counter(key for _, key in calls(tmp_path))
    assert len(handled) == runs * STEPS
    assert set(handled.values()) == {1}  # no step's handler ran twice
    assert Counter(effects(tmp_path)) == dict.fromkeys(handled, 1)
    print("runs per worker:", sorted((len(found) for found in resumed), reverse=True))


POLL = ("--interval", "0.05")


@pytest.mark.timeout(180)
def test_five_workers_resume_twenty_approved_runs_each_exactly_once(
    tmp_path: Path, postgres_urls: Callable[[], str]
) -> None:
    """Five workers race for 20 approved runs: each run is resumed by one worker, no step runs twice, all succeed."""
    share(tmp_path, postgres_urls, workers=5, runs=20)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eight_workers_resume_two_hundred_approved_runs_each_exactly_once(
    tmp_path: Path, postgres_urls: Callable[[], str]
) -> None:
    """Eight workers race for 200 approved runs: the same, at soak scale."""
    share(tmp_path, postgres_urls, workers=8, runs=200)


PARK_ONE = """
import agentapp, tether
run = agentapp.app.start("one", planner="ops",
                         principal=tether.Principal("ops-bot", on_behalf_of="carol"))
assert run.status.value == "awaiting_approval", run.status
print(run.id)
"""


@pytest.mark.timeout(120)
def test_a_waiting_worker_resumes_an_approved_run_at_once_not_at_its_next_look(
    tmp_path: Path, postgres_url: str
) -> None:
    """A worker looking every 60 s resumes a run within seconds of its approval: the decision wakes it."""
    backend = postgres_backend(postgres_url)
    (tmp_path / "agentapp.py").write_text(AGENT)
    (tmp_path / "tether.yaml").write_text(CONFIG)
    env = agent_env(tmp_path, backend, steps=STEPS, pause=0.0, AGENT_GATED=str(GATED))
    run_id = script(tmp_path, env, PARK_ONE).strip()
    worker = start_worker(tmp_path, env, "--interval", "60")
    try:
        with (
            backend.open(tmp_path / "tether.yaml") as app,
            psycopg.connect(postgres_url, autocommit=True) as conn,
        ):
            deadline = time.monotonic() + 60
            while not conn.execute(  # the worker found nothing ready and listens
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'LISTEN %%'"
                " AND pid <> pg_backend_pid()"
            ).fetchone():
                assert time.monotonic() < deadline, worker_output(tmp_path, worker)
                assert worker.poll() is None, worker_output(tmp_path, worker)
                time.sleep(0.05)
            (request,) = app.approvals(status="pending")
            app.approve(request.id, by="alice")
            approved = time.monotonic()
            while app.store.get_run(run_id).status != "succeeded":
                assert time.monotonic() - approved < 20, worker_output(tmp_path, worker)
                time.sleep(0.05)
            took = time.monotonic() - approved
            assert app.verify(run_id).ok
    finally:
        stop(worker)

    out, _ = worker_output(tmp_path, worker)
    assert RESUMED.findall(out) == [(run_id, "succeeded")]
    assert took < 20  # the next look was 60 s away
    print(f"resumed {took:.2f} s after the approval")
