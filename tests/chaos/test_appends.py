"""Concurrent appends (H.52): eight processes write chains at once; none breaks or forks.

Six processes share one SQLite file and two write files of their own; each runs
two threads, each thread two runs of reads, keyed writes and failures. The
workers are started together (they wait for a "go" file), so their
transactions interleave on the shared file.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import tether
from tether import record

pytestmark = pytest.mark.chaos

DEADLINE_S = 9.0
START_S = 60.0
PROCESSES = 8
SHARED = 6
"""Processes writing the shared file; the others write one file each."""
THREADS = 2
RUNS_PER_THREAD = 2
STEPS_PER_RUN = 30

WORKER = r"""
import json, sys, threading, time
from pathlib import Path
from pydantic import BaseModel
import tether

db, go, name, threads, runs, steps = sys.argv[1:7]
threads, runs, steps = int(threads), int(runs), int(steps)


class NoteIn(BaseModel):
    text: str


class NoteOut(BaseModel):
    text: str


@tether.capability("notes.read")
def read(args: NoteIn) -> NoteOut:
    return NoteOut(text=args.text)


@tether.capability("notes.write", effect="write", idempotency="keyed")
def write(args: NoteIn) -> NoteOut:
    return NoteOut(text=args.text.upper())


@tether.capability("notes.flaky")
def flaky(args: NoteIn) -> NoteOut:
    raise RuntimeError("upstream 503")


app = tether.Tether(db=f"sqlite:///{db}?synchronous=normal", env={})
app.register(read, write, flaky)
who = tether.Principal(f"agent-{name}", tenant="acme")
done, errors = [], []

Path(f"{go}.{name}.ready").touch()
deadline = time.monotonic() + 60
while not Path(go).exists():
    if time.monotonic() > deadline:
        sys.exit("no go file")
    time.sleep(0.005)


def work(t):
    try:
        for r in range(runs):
            with app.run(principal=who, request=f"{name}/{t}/{r}") as run:
                for s in range(steps):
                    kind = s % 3
                    if kind == 0:
                        run.call("notes.read", {"text": f"{name}-{s}"})
                    elif kind == 1:
                        run.call(
                            "notes.write",
                            {"text": f"{name}-{s}"},
                            idempotency_key=f"{name}-{t}-{r}-{s}",
                        )
                    else:
                        run.step("notes.flaky", {"text": "x"})
            done.append(run.id)
    except BaseException as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for th in pool:
    th.start()
for th in pool:
    th.join()
app.close()
print(json.dumps({"runs": done, "errors": errors}))
"""


def _events(path: Path) -> dict[str, list[tuple[int, bytes, bytes]]]:
    con = sqlite3.connect(path)
    try:
        rows = con.execute(
            "SELECT r.run_id, e.seq, e.body, e.hash FROM events e "
            "JOIN runs r ON r.id = e.run ORDER BY r.run_id, e.seq"
        ).fetchall()
    finally:
        con.close()
    out: dict[str, list[tuple[int, bytes, bytes]]] = {}
    for run_id, seq, body, digest in rows:
        out.setdefault(run_id, []).append((seq, body, digest))
    return out


def _kill_stragglers(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()


def test_eight_processes_append_without_breaking_or_forking(tmp_path: Path) -> None:
    """Chains written by eight concurrent processes all verify, with each seq once per run."""
    go = tmp_path / "go"
    shared = tmp_path / "shared.db"
    dbs = [shared] * SHARED + [
        tmp_path / f"own-{i}.db" for i in range(PROCESSES - SHARED)
    ]
    results = []
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        WORKER,
                        str(db),
                        str(go),
                        f"p{i}",
                        str(THREADS),
                        str(RUNS_PER_THREAD),
                        str(STEPS_PER_RUN),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            for i, db in enumerate(dbs)
        ]
        stack.callback(_kill_stragglers, procs)  # runs before each Popen's exit waits
        # Starting eight interpreters is not under test: on a busy 2-core machine
        # it takes a while, so it gets its own, generous deadline.
        started_by = time.monotonic() + START_S
        while len(list(tmp_path.glob("go.*.ready"))) < PROCESSES:
            assert time.monotonic() < started_by, "workers did not start in time"
            assert all(p.poll() is None for p in procs), "a worker died at start"
            time.sleep(0.01)
        go.touch()  # every worker is ready: their appends start together
        deadline = time.monotonic() + DEADLINE_S
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))

    assert [r["errors"] for r in results] == [[]] * PROCESSES
    runs_by_db: dict[Path, list[str]] = {}
    for db, result in zip(dbs, results, strict=True):
        runs_by_db.setdefault(db, []).extend(result["runs"])
    per_process = THREADS * RUNS_PER_THREAD
    assert len(runs_by_db[shared]) == SHARED * per_process
    # run_started and run_status on each side; a read or a failure is validated,
    # decided and executed/failed; a keyed write also records its intent.
    per_step = {0: 3, 1: 4, 2: 3}
    expected_events = 4 + sum(per_step[s % 3] for s in range(STEPS_PER_RUN))
    for db, run_ids in runs_by_db.items():
        stored = _events(db)
        assert sorted(stored) == sorted(run_ids), db.name
        digests: Counter[bytes] = Counter()
        for run_id, events in stored.items():
            seqs = [seq for seq, _, _ in events]
            assert seqs == list(range(1, len(seqs) + 1)), run_id
            previous = record.genesis(run_id)
            for seq, body, digest in events:
                assert digest == record.chain_hash(previous, seq, body), (run_id, seq)
                previous = digest
                digests[digest] += 1
            assert len(events) == expected_events, run_id
        assert max(digests.values()) == 1, "two events share a hash: a fork"
        with tether.Tether(db=f"sqlite:///{db}", env={}) as auditor:
            reports = [auditor.verify(run_id) for run_id in run_ids]
        assert [(r.run_id, r.ok, r.reason) for r in reports] == [
            (run_id, True, None) for run_id in run_ids
        ]
