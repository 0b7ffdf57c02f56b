"""Worker processes for the SQLite write contention test (RELIABILITY F.38).

Run as a module (`python -m chaos._contention_workers write ...`, see
`spawner`): each worker opens its own `Tether` on the one SQLite file the parent
names, waits for the parent's go file, then makes runs of mixed writes through
the public API until it has made its share of commits, and prints one `RESULT`
line of JSON. A run is about 20% of its commits opening and finishing it, 40%
read steps under a global budget and a breaker (one commit each: a read is
charged after it answers), and 40% keyed write steps (two each: intent, then
result), one in ten a retry of a key already used.

Each worker counts what the store did on its connection: every `COMMIT`
(a trace callback, as `benchmarks/call_path.py` counts them), and how long
every `BEGIN IMMEDIATE` took (a proxy around the connection): that statement is
where a writer waits for the file's write lock, up to the 10 s busy timeout. A
"database is locked" or "busy" error that reaches the worker is counted, not
raised, so the parent sees how many surfaced; any other error ends the worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import tether
from tether.store.sqlite import SQLiteStore

from ._workers import (
    PRINCIPAL,
    READY,
    RESULT,
    Worker,
    make_charge,
    module_spawner,
    worker_env,
)

__all__ = [
    "BREAKER",
    "BUDGET",
    "CONFIG",
    "ContentionWorker",
    "TimedConnection",
    "percentile",
    "spawner",
    "summary",
]

BUDGET = "budget"
"""The id of the budget every read step is charged to."""
BREAKER = "inventory-api"
CONFIG = f"""\
limits:
  - {{id: {BUDGET}, kind: budget, per: day, amount: 1000000000000, capability: stock.lookup}}
breakers:
  - {{id: {BREAKER}, resource: inventory, window: 20}}
"""
"""The workers' `tether.yaml`: a budget and a breaker no caller comes near tripping."""
GO_TIMEOUT_S = 60.0
"""How long a worker waits for the parent's go file (8 interpreters start slowly)."""
BEGIN = "BEGIN IMMEDIATE"
READS, WRITES = 4, 2
"""Steps per run: with its open and finish, 2 + 4 + 2 * 2 = 10 commits."""
RETRY_SHARE = 0.1
"""The share of write steps that retry a key this worker used before."""


class LookupIn(BaseModel, extra="forbid"):
    sku: str
    cost: int
    """What the budget reserves for the read."""
    actual: int
    """What the read reports it cost (the budget settles at it)."""


class LookupOut(BaseModel):
    sku: str
    in_stock: int
    actual: int


def make_lookup() -> tether.Capability[LookupIn, LookupOut]:
    """Declare `stock.lookup`: a read of the `inventory` resource, charged to the budget."""

    def lookup(args: LookupIn) -> LookupOut:
        return LookupOut(sku=args.sku, in_stock=len(args.sku), actual=args.actual)

    return tether.capability(
        "stock.lookup",
        effect="read",
        resource="inventory",
        cost=lambda a: a.cost,
        actual_cost=lambda o: o.actual,
    )(lookup)


class TimedConnection:
    """A store's connection that times each `BEGIN IMMEDIATE` and forwards the rest.

    The store runs every write as `BEGIN IMMEDIATE; ...; COMMIT`, and the
    `BEGIN IMMEDIATE` is where SQLite's busy handler waits for the file's write
    lock, so its duration is this connection's lock wait.
    """

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con
        self.waits_ns: list[int] = []
        """How long each `BEGIN IMMEDIATE` took, failed ones included, in ns."""

    def execute(
        self, sql: str, parameters: Sequence[Any] | Mapping[str, Any] = (), /
    ) -> sqlite3.Cursor:
        """Run one statement, timing it if it is `BEGIN IMMEDIATE`."""
        if sql != BEGIN:
            return self._con.execute(sql, parameters)
        start = time.perf_counter_ns()
        try:
            return self._con.execute(sql, parameters)
        finally:
            self.waits_ns.append(time.perf_counter_ns() - start)

    def __getattr__(self, name: str) -> Any:
        # executemany, in_transaction, set_trace_callback, close: the connection's own.
        return getattr(self._con, name)


def percentile(ordered: Sequence[int], q: float) -> int:
    """Return the nearest-rank `q` percentile (0 < q <= 1) of sorted values."""
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def summary(waits_us: Sequence[int]) -> dict[str, int]:
    """Return count, p50, p99 and max of lock waits in µs (all 0 when there are none)."""
    ordered = sorted(waits_us) or [0]
    return {
        "count": len(waits_us),
        "p50_us": percentile(ordered, 0.50),
        "p99_us": percentile(ordered, 0.99),
        "max_us": ordered[-1],
    }


def _is_lock_error(exc: BaseException, db_path: str) -> bool:
    """Tell whether `exc` (or what it wraps) says the database was locked or busy."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "sqlite_errorcode", None)
        if code is not None and (code & 0xFF) in (
            sqlite3.SQLITE_BUSY,
            sqlite3.SQLITE_LOCKED,
        ):
            return True
        # The message names the file, whose path must not say "locked" for it.
        text = str(seen).replace(db_path, "").lower()
        if "locked" in text or "busy" in text:
            return True
        seen = seen.__cause__
    return False


class Contender:
    """One worker's app, its plan of runs, and its account of what the store did."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.app = tether.Tether(db=opts.db, config=opts.config, env=worker_env())
        self.charge = make_charge(Path(opts.effects))
        self.app.register(make_lookup(), self.charge)
        store = self.app.store
        assert isinstance(store, SQLiteStore), store
        self.db_path = str(store.path)
        self.timed = TimedConnection(store._con)
        store._con = self.timed  # type: ignore[assignment]  # a proxy with every method the store calls
        self.commits = 0
        self.locked: list[str] = []
        self.steps: Counter[str] = Counter()
        self.runs: list[str] = []
        self.keys: list[tuple[str, dict[str, object]]] = []
        """Every key this worker wrote under, with its args, in order."""
        self.rng = random.Random(opts.seed)
        self.worker = opts.worker

    def count_commit(self, sql: str) -> None:
        """Count a statement if it is a `COMMIT` (a trace callback)."""
        if sql == "COMMIT":
            self.commits += 1

    @contextlib.contextmanager
    def absorbing_lock_errors(self) -> Iterator[None]:
        """Count a locked or busy error raised inside, and go on; raise any other."""
        try:
            yield
        except (tether.StoreError, sqlite3.OperationalError) as exc:
            if not _is_lock_error(exc, self.db_path):
                raise
            self.locked.append(f"{type(exc).__name__}: {exc}")

    def one_run(self) -> None:
        """Open a run, take its mix of steps in a random order, and finish it."""
        plan = ["read"] * READS + ["write"] * WRITES
        self.rng.shuffle(plan)
        n = len(self.runs)
        with (
            self.absorbing_lock_errors(),
            self.app.run(
                principal=PRINCIPAL, request=f"restock {self.worker}-{n}"
            ) as run,
        ):
            for i, kind in enumerate(plan):
                with self.absorbing_lock_errors():
                    if kind == "read":
                        self.read(run)
                    else:
                        self.write(run, via_call=i % 2 == 0)
            self.runs.append(run.id)

    def read(self, run: tether.Run) -> None:
        """Take a read step charged to the budget, through the breaker."""
        cost = self.rng.randint(1, 10)
        args = {
            "sku": f"sku-{self.rng.randrange(1000)}",
            "cost": cost,
            "actual": max(0, cost + self.rng.randint(-3, 3)),
        }
        self.steps[f"read:{run.step('stock.lookup', args).status.value}"] += 1

    def write(self, run: tether.Run, *, via_call: bool) -> None:
        """Take a keyed write step: a new key, or (one in ten) a retry of an old one."""
        if self.keys and self.rng.random() < RETRY_SHARE:
            key, args = self.rng.choice(self.keys)
        else:
            key = f"charge-{self.worker}-{len(self.keys)}"
            args = {"order_id": key, "amount_cents": self.rng.randint(100, 5000)}
            self.keys.append((key, args))
        if via_call:
            out = run.call(self.charge, args, idempotency_key=key)
            assert out.key == key, out
            self.steps["write:called"] += 1
        else:
            outcome = run.step(self.charge, args, idempotency_key=key)
            self.steps[f"write:{outcome.status.value}"] += 1

    def contend(self, share: int, go: Path) -> dict[str, object]:
        """Wait for `go`, make runs until `share` commits are made, and return the account."""
        _signal(READY, go)
        self.timed.set_trace_callback(self.count_commit)
        started = time.monotonic()
        while self.commits < share:
            self.one_run()
        ended = time.monotonic()
        self.timed.set_trace_callback(None)
        waits_us = [ns // 1000 for ns in self.timed.waits_ns]
        return {
            "commits": self.commits,
            "locked": self.locked,
            "lock_wait": summary(waits_us),
            "waits_us": waits_us,
            "steps": self.steps,
            "runs": self.runs,
            "keys": len(self.keys),
            "started_s": started,
            "ended_s": ended,
        }


def _signal(marker: str, path: Path) -> None:
    """Print `marker`, then wait for the parent to make `path`."""
    print(marker, flush=True)
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no signal at {path} within {GO_TIMEOUT_S}s")
        time.sleep(0.002)


def write(opts: argparse.Namespace) -> None:
    """Make runs of mixed writes until `--commits` commits; print the account."""
    contender = Contender(opts)
    account = contender.contend(opts.commits, Path(opts.go))
    contender.app.close()
    print(RESULT + json.dumps(account), flush=True)


def main(argv: Sequence[str]) -> None:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(prog="_contention_workers.py")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("write")
    cmd.add_argument("--db", required=True)
    cmd.add_argument("--config", required=True)
    cmd.add_argument("--effects", required=True)
    cmd.add_argument("--go", required=True)
    cmd.add_argument("--commits", type=int, required=True)
    cmd.add_argument("--worker", type=int, required=True)
    cmd.add_argument("--seed", type=int, required=True)
    opts = parser.parse_args(argv)
    write(opts)


# -- the parent's side ----------------------------------------------------------


ContentionWorker = Worker
"""A worker running a command of this module (see `spawner`)."""


def spawner(
    cwd: Path, env: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[Callable[..., ContentionWorker]]:
    """Yield a function that starts contention workers; kill any still running on exit."""
    return module_spawner(__name__, cwd, env)


if __name__ == "__main__":
    main(sys.argv[1:])
