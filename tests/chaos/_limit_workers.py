"""Worker processes for the limits chaos tests (RELIABILITY C.19, C.21).

Run as a module (`python -m chaos._limit_workers COMMAND ...`, see `spawner`):
each command opens its own `Tether` on the SQLite file and `tether.yaml` the
parent names, waits for the parent's go file when it is given one, calls a
capability in a loop and prints one `RESULT` line of JSON. The capabilities
here keep their own account outside the database: `meter.hold` counts the
calls in flight across every process in a counter file under `fcntl.flock`,
so the parent can check a concurrency cap against what really ran at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

import tether

from ._workers import IN_HANDLER, PRINCIPAL, READY, RESULT, Worker, spawning

__all__ = [
    "LimitWorker",
    "SpendIn",
    "SpendOut",
    "inflight_peak",
    "make_block",
    "make_hold",
    "make_spend",
    "spawner",
]

GO_TIMEOUT_S = 10.0


class SpendIn(BaseModel, extra="forbid"):
    cost: int
    """What the call is estimated to cost (budgets reserve it)."""
    actual: int
    """What the call will report it cost (budgets settle at it)."""


class SpendOut(BaseModel):
    actual: int


def make_spend() -> tether.Capability[SpendIn, SpendOut]:
    """Declare `meter.spend`: estimated at `args.cost`, settled at `args.actual`."""

    def spend(args: SpendIn) -> SpendOut:
        return SpendOut(actual=args.actual)

    return tether.capability(
        "meter.spend",
        effect="write",
        idempotency="keyed",
        cost=lambda a: a.cost,
        actual_cost=lambda o: o.actual,
    )(spend)


class HoldIn(BaseModel, extra="forbid"):
    n: int


class HoldOut(BaseModel):
    in_flight: int
    """How many calls were in flight, this one included, when it started."""


def _bump(counter: Path, by: int) -> int:
    """Add `by` to the in-flight count under an exclusive file lock; return the new count.

    The file holds `current peak`; the lock is released when the file closes.
    """
    with counter.open("r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        current, peak = (int(x) for x in f.read().split())
        current += by
        f.seek(0)
        f.truncate()
        f.write(f"{current} {max(peak, current)}")
        return current


def inflight_peak(counter: Path) -> tuple[int, int]:
    """Return `(in flight now, most ever in flight)` from a counter file."""
    current, peak = (int(x) for x in counter.read_text().split())
    return current, peak


def make_hold(counter: Path, hold: float) -> tether.Capability[HoldIn, HoldOut]:
    """Declare `meter.hold`: count itself in flight in `counter` for `hold` seconds."""

    def hold_call(args: HoldIn) -> HoldOut:
        now = _bump(counter, +1)
        try:
            time.sleep(hold)
        finally:
            _bump(counter, -1)
        return HoldOut(in_flight=now)

    return tether.capability("meter.hold", effect="write", idempotency="keyed")(
        hold_call
    )


def make_block(*, hang: bool) -> tether.Capability[HoldIn, HoldOut]:
    """Declare `meter.block`: say so and block until killed (`hang`), or answer at once."""

    def block(args: HoldIn, ctx: tether.CallContext) -> HoldOut:
        if hang:
            print(f"{IN_HANDLER}{ctx.run_id}", flush=True)
            time.sleep(60)  # the parent SIGKILLs us here
        return HoldOut(in_flight=1)

    return tether.capability("meter.block", effect="write", idempotency="keyed")(block)


# -- the worker's side -------------------------------------------------------------


def _tally(outcome: tether.Outcome) -> str:
    """Name an outcome: `executed`, or `CODE:LIMIT` for a refusal or failure."""
    if outcome.error is None:
        return outcome.status.value
    limit = getattr(outcome.error, "limit_id", "")
    return f"{outcome.error.code}:{limit}"


def _go(opts: argparse.Namespace) -> None:
    print(READY, flush=True)
    path = Path(opts.go)
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no go signal at {path} within {GO_TIMEOUT_S}s")
        time.sleep(0.002)


def spend(opts: argparse.Namespace) -> None:
    """Call `meter.spend` `--calls` times in one run; costs 1, or random ones from `--seed`."""
    app = tether.Tether(db=opts.db, config=opts.config, env={})
    app.register(make_spend())
    rng = random.Random(opts.seed)
    plan = []
    for _ in range(opts.calls):
        if opts.random:
            cost = rng.randint(1, 10)
            plan.append({"cost": cost, "actual": max(0, cost + rng.randint(-3, 3))})
        else:
            plan.append({"cost": 1, "actual": 1})
    tally: Counter[str] = Counter()
    _go(opts)
    with app.run(principal=PRINCIPAL, request="spend") as run:
        for args in plan:
            tally[_tally(run.step("meter.spend", args))] += 1
    app.close()
    print(RESULT + json.dumps({"runs": [run.id], "tally": tally}), flush=True)


def hold(opts: argparse.Namespace) -> None:
    """Call `meter.hold` from `--threads` threads, `--calls` times each, one run per thread."""
    app = tether.Tether(db=opts.db, config=opts.config, env={})
    app.register(make_hold(Path(opts.counter), opts.hold))
    tally: Counter[str] = Counter()
    runs: list[str] = []
    lock = threading.Lock()

    def fire() -> None:
        with app.run(principal=PRINCIPAL, request="hold") as run:
            for n in range(opts.calls):
                name = _tally(run.step("meter.hold", {"n": n}))
                with lock:
                    tally[name] += 1
        with lock:
            runs.append(run.id)

    threads = [threading.Thread(target=fire) for _ in range(opts.threads)]
    _go(opts)
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    app.close()
    print(RESULT + json.dumps({"runs": runs, "tally": tally}), flush=True)


def hang(opts: argparse.Namespace) -> None:
    """Call `meter.block`, which blocks in its handler until the parent kills us."""
    app = tether.Tether(db=opts.db, config=opts.config, env={})
    app.register(make_block(hang=True))
    with app.run(principal=PRINCIPAL, request="block") as run:
        run.call("meter.block", {"n": 0})


def main(argv: Sequence[str]) -> None:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(prog="_limit_workers.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("spend", "hold", "hang"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--db", required=True)
        cmd.add_argument("--config", required=True)
        if name != "hang":
            cmd.add_argument("--go", required=True)
            cmd.add_argument("--calls", type=int, required=True)
        if name == "spend":
            cmd.add_argument("--seed", type=int, default=0)
            cmd.add_argument("--random", action="store_true")
        if name == "hold":
            cmd.add_argument("--counter", required=True)
            cmd.add_argument("--threads", type=int, default=3)
            cmd.add_argument("--hold", type=float, default=0.005)
    opts = parser.parse_args(argv)
    {"spend": spend, "hold": hold, "hang": hang}[opts.command](opts)


# -- the parent's side ----------------------------------------------------------


class LimitWorker(Worker):
    """A `Worker` that runs a command of this module (`python -m`) instead of `_workers.py`."""

    def __init__(self, args: Sequence[str], *, cwd: Path) -> None:
        # The package root is on the child's path so `-m` finds this module
        # under the same name pytest imported it as (relative imports work).
        root = Path(__file__).parents[len(__name__.split(".")) - 1]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(root), env.get("PYTHONPATH", "")) if p
        )
        super().__init__(
            args, cwd=cwd, command=(sys.executable, "-m", __name__), env=env
        )


def spawner(cwd: Path) -> contextlib.AbstractContextManager[Callable[..., LimitWorker]]:
    """Yield a function that starts limit workers; kill any still running on exit."""
    return spawning(cwd, LimitWorker)


if __name__ == "__main__":
    main(sys.argv[1:])
