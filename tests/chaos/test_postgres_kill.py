"""Kill the agent and three workers at random; the run still ends with every effect once (issue 8's second bar).

Issue 6's kill test (`test_resume_kill.py`) on PostgreSQL, with the workers
killed too. In each round a scripted 40-step run starts in an agent process on
a fresh schema, and three `tether worker` processes poll the same schema. The
agent is SIGKILLed at a random moment; once its lease runs out a worker takes
the run over, and at a random moment after that worker's first call it is
SIGKILLed too, and a fresh worker takes its place: three times. The survivors
finish the run. Every round: each step's effect happened exactly once (the
upstream dedups by the idempotency key tether passes it), each step is recorded
executed once, the run succeeded and its chain verifies against the signed
head, and no worker died of anything but our SIGKILL.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tether.store import Store, open_store

from ._agents import (
    AGENT,
    Calls,
    agent_env,
    effects,
    start_worker,
    stop,
    worker_output,
)
from ._backends import Backend, postgres_backend

pytestmark = [pytest.mark.chaos, pytest.mark.postgres]

STEPS = 40
PAUSE = 0.02
"""Seconds each step's handler takes: the run takes about 1.5 s of work."""
WORKERS = 3
"""Workers polling at once, and workers killed in each round."""
KILLS = int(os.environ.get("TETHER_PG_KILLS", "8"))
"""Kills per PR run (CI: 8, two rounds of the agent and three workers); the slow soak runs 100."""
POLL = ("--interval", "0.05")
"""Each worker looks for ready runs every 50 ms."""
CONFIG = "idempotency: {claim_ttl: 1s}\n"
"""A dead writer's run is free for a worker 1 s after its last write."""


@dataclass
class Round:
    """One run, killed as often as it lets us."""

    home: Path
    backend: Backend
    env: dict[str, str]
    watch: Store
    """The parent's own look at the schema."""
    kills: int = 0
    """SIGKILLs that landed while the run was unfinished (the agent's included)."""
    workers: list[subprocess.Popen[str]] = field(default_factory=list)


def start_agent(r: Round) -> subprocess.Popen[str]:
    """Start the agent process on the round's schema."""
    return subprocess.Popen(  # our interpreter, our script
        [
            sys.executable,
            "-c",
            "import agentapp, tether, pathlib; pathlib.Path('ready').touch(); "
            "agentapp.app.start('forty steps', planner='ops', "
            "principal=tether.Principal('ops-bot'))",
        ],
        cwd=r.home,
        env=r.env,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def run_state(r: Round) -> tuple[str, str] | None:
    """Return `(run id, status)` of the round's run, or None before it exists."""
    runs = r.watch.list_runs(limit=1)
    return None if not runs else (runs[0].run_id, runs[0].status)


def next_call(r: Round, calls: Calls, run_id: str) -> tuple[int, str] | None:
    """Wait for the next call to reach the upstream; None if the run ends first."""
    after = len(calls.read())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = calls.wait_for_new(after, time.monotonic() + 0.1)
        if found is not None:
            return found
        if run_state(r) == (run_id, "succeeded"):
            return None
    raise AssertionError(f"no worker took run {run_id} over: {r.home}")


def kill_round(r: Round, rng: random.Random) -> str | None:
    """Kill the agent, then WORKERS workers holding the run, each at a random moment; return the run id."""
    agent = start_agent(r)
    deadline = time.monotonic() + 60
    # Kill relative to the run's start, not the interpreter's: importing may
    # take longer than the run on a loaded machine.
    while not (r.home / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.5))
    r.kills += agent.poll() is None
    stop(agent)
    state = run_state(r)
    if state is None:
        return None  # killed before the run began: nothing to finish
    run_id, _ = state
    r.workers = [start_worker(r.home, r.env, *POLL) for _ in range(WORKERS)]
    calls = Calls(r.home)
    for _ in range(WORKERS):
        # A worker takes the run over once its lease has run out: wait for
        # its first call, then kill it a random moment later.
        first = next_call(r, calls, run_id)
        if first is None:
            break  # the run ended first
        holder = next((w for w in r.workers if w.pid == first[0]), None)
        assert holder is not None, f"call from an unknown process {first[0]}"
        time.sleep(rng.uniform(0.0, 0.3))
        if holder.poll() is None and run_state(r) != (run_id, "succeeded"):
            r.kills += 1
        assert stop(holder) == -9, worker_output(r.home, holder)
        r.workers.remove(holder)
        r.workers.append(start_worker(r.home, r.env, *POLL))
    deadline = time.monotonic() + 60
    while run_state(r) != (run_id, "succeeded"):
        assert time.monotonic() < deadline, f"run {run_id} never finished: {r.home}"
        for w in r.workers:
            assert w.poll() is None, worker_output(r.home, w)
        time.sleep(0.05)
    for w in r.workers:
        assert stop(w) == -9, worker_output(r.home, w)
    return run_id


def check(r: Round, run_id: str, why: str) -> int:
    """Check one round's run as the workers left it; return how many times it was taken over."""
    with r.backend.open() as app:
        row = app.store.get_run(run_id)
        report = app.verify(run_id)
        events = [e.data() for e in app.store.events(run_id)]
    calls = Counter(key for _, key in Calls(r.home).read())
    done = Counter(effects(r.home))

    assert report.ok, f"{why}: {report.reason}"
    assert row.head_sig is not None, why  # signed with the shared TETHER_RECORD_KEY
    assert row.status == "succeeded", why
    assert len(done) == STEPS, why
    assert set(done.values()) == {1}, why  # each side effect once
    executed = Counter(e["step"] for e in events if e["kind"] == "executed")
    assert len(executed) == STEPS, why
    assert set(executed.values()) == {1}, why
    # A kill cuts off at most the call in flight, which runs again under its key.
    assert sum(calls.values()) <= STEPS + r.kills, why
    assert row.epoch >= r.kills, why  # every kill that landed cost a take-over
    return row.epoch - 1


def kill_rounds(
    tmp_path: Path, make_url: Callable[[], str], kills: int, seed: int
) -> None:
    """Run rounds of one agent kill and WORKERS worker kills until `kills` kills."""
    rng = random.Random(seed)
    print(f"seed={seed} (rerun with TETHER_TEST_SEED={seed})")
    rounds = finished = landed = taken_over = 0
    while rounds * (1 + WORKERS) < kills:
        home = tmp_path / f"r{rounds}"
        home.mkdir()
        (home / "agentapp.py").write_text(AGENT)
        (home / "tether.yaml").write_text(CONFIG)
        backend = postgres_backend(make_url())
        r = Round(
            home=home,
            backend=backend,
            env=agent_env(home, backend, steps=STEPS, pause=PAUSE),
            watch=open_store(backend.db),
        )
        rounds += 1
        try:
            run_id = kill_round(r, rng)
        finally:
            for w in r.workers:
                stop(w)
            r.watch.close()
        if run_id is None:
            continue
        taken_over += check(r, run_id, f"seed {seed}, round {rounds}, {home}")
        finished += 1
        landed += r.kills
    print(f"rounds={rounds} finished={finished} kills={landed} take-overs={taken_over}")
    assert finished >= rounds // 2 + rounds % 2, (
        f"seed {seed}: most kills came too early"
    )
    assert landed >= kills // 2, f"seed {seed}: most kills came after the run"


def new_seed() -> int:
    """Return the seed: `TETHER_TEST_SEED`, or a fresh one."""
    return int(
        os.environ.get("TETHER_TEST_SEED") or random.SystemRandom().randrange(2**32)
    )


@pytest.mark.timeout(300)
def test_a_run_whose_agent_and_workers_are_killed_ends_with_every_effect_once(
    tmp_path: Path, postgres_urls: Callable[[], str]
) -> None:
    """The agent and three workers in a row SIGKILLed mid-run, TETHER_PG_KILLS kills in all (8 on a PR): each run succeeds with every effect once."""
    kill_rounds(tmp_path, postgres_urls, KILLS, new_seed())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_hundred_kills_of_agents_and_workers(
    tmp_path: Path, postgres_urls: Callable[[], str]
) -> None:
    """The full bar: 25 rounds of the agent and three workers killed, 100 kills."""
    kill_rounds(tmp_path, postgres_urls, 100, new_seed())
