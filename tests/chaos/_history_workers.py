"""Client processes for the budget history check (RELIABILITY C.24).

Run as a module (`python -m chaos._history_workers clients ...`, see
`spawner`): a process opens its own `Tether` on the database and `tether.yaml`
the parent names, prints `READY`, waits for the parent's go file, then runs
`--threads` clients at once. Each client opens one run and makes `--ops`
operations on the global budget `budget`: a `read` (the counter as
`store.limit_rows` returns it) with probability `--reads`, else a `spend`
(`meter.spend`, estimated at a random `cost` 1..10 and settling at an `actual`
up to 3 below it).

Every operation is two lines in the process's history file (`_history.Event`):
its invoke, written before it begins, and its ending, written once it is
known: `ok` (a spend executed, a read returned), `fail` (a spend refused or
failed before it ran), or `info` when a step raised, so its outcome is
unknown. One `write` a line under a lock (`O_APPEND`): a SIGKILL loses at most
the line being written, and none interleave. The parent kills these processes
at random moments; their open operations are the history's `info` ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tether

from ._history import Event, EventType, Function, line
from ._limit_workers import make_spend
from ._workers import PRINCIPAL, READY, RESULT, Worker, module_spawner, worker_env

__all__ = ["BUDGET", "HistoryWorker", "spawner"]

BUDGET = "budget"
"""The id of the budget every spend is charged to."""
GO_TIMEOUT_S = 60.0
"""How long a process waits for the parent's go file (8 interpreters start slowly)."""
JOIN_S = 120.0
"""How long a process waits for its clients to finish."""


class Log:
    """A process's history file: one `write` a line, under a lock, so lines never interleave."""

    def __init__(self, path: Path, process: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.process = process
        self.lock = threading.Lock()

    def write(
        self,
        thread: int,
        op: int,
        kind: EventType,
        f: Function,
        value: dict[str, Any] | None = None,
    ) -> None:
        """Append one event, stamped with the wall-clock and monotonic time now."""
        with self.lock:
            event = Event(
                process=self.process,
                thread=thread,
                op=op,
                type=kind,
                f=f,
                value=value,
                wall=time.time(),
                mono=time.monotonic(),
            )
            os.write(self.fd, (line(event) + "\n").encode())


def read_budget(app: tether.Tether) -> dict[str, Any]:
    """Return the budget's counter as one snapshot: used, held and holds (zero before its first spend)."""
    rows = [r for r in app.store.limit_rows(app.clock.now()) if r.limit_id == BUDGET]
    assert len(rows) <= 1, rows  # one scope, one day window
    if not rows:
        return {"used": "0", "held": "0", "holds": 0}
    (row,) = rows
    return {
        "used": str(row.used),
        "held": str(row.held),
        "holds": row.holds,
        "window": row.window.isoformat() if row.window else None,
    }


def client(
    app: tether.Tether,
    log: Log,
    thread: int,
    *,
    ops: int,
    reads: float,
    seed: int,
    tally: Callable[[str], None],
) -> None:
    """Make `ops` operations in one run, logging each one's invoke and ending."""
    rng = random.Random(seed)
    with app.run(principal=PRINCIPAL, request=f"history {log.process}/{thread}") as run:
        for op in range(ops):
            if rng.random() < reads:
                log.write(thread, op, "invoke", "read")
                log.write(thread, op, "ok", "read", read_budget(app))
                tally("read:ok")
                continue
            cost = rng.randint(1, 10)
            args = {"cost": cost, "actual": rng.randint(max(0, cost - 3), cost)}
            log.write(thread, op, "invoke", "spend", {**args, "run": run.id})
            try:
                outcome = run.step("meter.spend", args)
            except tether.TetherError as exc:  # the step's outcome is unknown
                log.write(thread, op, "info", "spend", {"error": exc.code})
                tally(f"spend:info:{exc.code}")
                continue
            status = outcome.status
            if status is tether.OutcomeStatus.EXECUTED:
                log.write(thread, op, "ok", "spend", {"step": outcome.step})
                tally("spend:ok")
            elif status in (tether.OutcomeStatus.REFUSED, tether.OutcomeStatus.FAILED):
                assert outcome.error is not None
                limit = getattr(outcome.error, "limit_id", None)
                said = {"status": status.value, "code": outcome.error.code}
                log.write(thread, op, "fail", "spend", {**said, "limit": limit})
                tally(f"spend:fail:{outcome.error.code}:{limit}")
            else:  # in doubt, say: it may have been applied
                log.write(thread, op, "info", "spend", {"status": status.value})
                tally(f"spend:info:{status.value}")


def clients(opts: argparse.Namespace) -> None:
    """Run `--threads` clients, once the go file appears; print the tally."""
    app = tether.Tether(db=opts.db, config=opts.config, env=worker_env())
    app.register(make_spend())
    log = Log(Path(opts.history), opts.process)
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def tally(name: str) -> None:
        with lock:
            counts[name] += 1

    threads = [
        threading.Thread(
            target=client,
            args=(app, log, n),
            kwargs={
                "ops": opts.ops,
                "reads": opts.reads,
                "seed": opts.seed * 1000 + n,
                "tally": tally,
            },
        )
        for n in range(opts.threads)
    ]
    print(READY, flush=True)
    go = Path(opts.go)
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no go signal at {go} within {GO_TIMEOUT_S}s")
        time.sleep(0.002)
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
    app.close()
    print(RESULT + json.dumps({"tally": counts}), flush=True)


def main(argv: Sequence[str]) -> None:
    """Parse the command line and run the clients."""
    parser = argparse.ArgumentParser(prog="_history_workers.py")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("clients")
    cmd.add_argument("--db", required=True)
    cmd.add_argument("--config", required=True)
    cmd.add_argument("--go", required=True)
    cmd.add_argument("--history", required=True, help="the file to append events to")
    cmd.add_argument("--process", required=True, help="this process's name")
    cmd.add_argument("--threads", type=int, default=4)
    cmd.add_argument("--ops", type=int, required=True, help="operations per client")
    cmd.add_argument("--reads", type=float, default=0.25, help="the share of reads")
    cmd.add_argument("--seed", type=int, default=0)
    clients(parser.parse_args(argv))


# -- the parent's side ----------------------------------------------------------


HistoryWorker = Worker
"""A process running this module's clients (see `spawner`)."""


def spawner(
    cwd: Path, env: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[Callable[..., HistoryWorker]]:
    """Yield a function that starts client processes (with `env` added to ours); kill any still running on exit."""
    return module_spawner(__name__, cwd, env)


if __name__ == "__main__":
    main(sys.argv[1:])
