"""Worker processes for the limits chaos tests (RELIABILITY C.19, C.20, C.21).

Run as a module (`python -m chaos._limit_workers COMMAND ...`, see `spawner`):
each command opens its own `Tether` on the database (a SQLite file or a
PostgreSQL schema, with the record key from `TETHER_RECORD_KEY` when set) and
`tether.yaml` the parent names, waits for the parent's go file when it is
given one, calls a capability in a loop and prints one `RESULT` line of JSON. The capabilities
here keep their own account outside the database: `meter.hold` counts the
calls in flight across every process in a counter file under `fcntl.flock`,
so the parent can check a concurrency cap against what really ran at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel

import tether
from tether.errors import HeadMoved

from ._workers import (
    IN_HANDLER,
    PRINCIPAL,
    READY,
    RESULT,
    Worker,
    module_spawner,
    worker_env,
)

__all__ = [
    "CALLED",
    "LimitWorker",
    "SpendIn",
    "SpendOut",
    "inflight_peak",
    "make_block",
    "make_hold",
    "make_spend",
    "spawner",
]

CALLED = "CALLED"
CALM_TIMEOUT_S = 10.0
"""How long `endure` tries to write a kept result once the chaos stopped."""
GO_TIMEOUT_S = 60.0
"""How long a worker waits for the parent's signal (8 interpreters start slowly)."""


class SpendIn(BaseModel, extra="forbid"):
    cost: int
    """What the call is estimated to cost (budgets reserve it)."""
    actual: int
    """What the call will report it cost (budgets settle at it)."""


class SpendOut(BaseModel):
    actual: int


def make_spend(
    on_call: Callable[[], None] | None = None,
) -> tether.Capability[SpendIn, SpendOut]:
    """Declare `meter.spend`: estimated at `args.cost`, settled at `args.actual`; `on_call` counts calls."""

    def spend(args: SpendIn) -> SpendOut:
        if on_call is not None:
            on_call()
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
    _signal(READY, Path(opts.go))


def _signal(marker: str, path: Path) -> None:
    """Print `marker`, then wait for the parent to make `path`."""
    print(marker, flush=True)
    deadline = time.monotonic() + GO_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no signal at {path} within {GO_TIMEOUT_S}s")
        time.sleep(0.002)


def _plan(opts: argparse.Namespace) -> list[dict[str, int]]:
    """Return the `meter.spend` arguments of each of `--calls` calls.

    Each costs 1 and settles at 1; with `--random`, each is estimated at 1..10
    and settles up to 3 below or above (at least 0), drawn from `--seed`.
    """
    rng = random.Random(opts.seed)
    plan = []
    for _ in range(opts.calls):
        if opts.random:
            cost = rng.randint(1, 10)
            plan.append({"cost": cost, "actual": max(0, cost + rng.randint(-3, 3))})
        else:
            plan.append({"cost": 1, "actual": 1})
    return plan


def spend(opts: argparse.Namespace) -> None:
    """Call `meter.spend` `--calls` times in one run; costs 1, or random ones from `--seed`."""
    app = tether.Tether(db=opts.db, config=opts.config, env=worker_env())
    app.register(make_spend())
    plan = _plan(opts)
    tally: Counter[str] = Counter()
    _go(opts)
    with app.run(principal=PRINCIPAL, request="spend") as run:
        for args in plan:
            tally[_tally(run.step("meter.spend", args))] += 1
    app.close()
    print(RESULT + json.dumps({"runs": [run.id], "tally": tally}), flush=True)


def _code(exc: tether.StoreError) -> str:
    """Return the error's code; `record_moved` for a `HeadMoved` a run wrapped, and `landed_unknown` for a write the store could not tell landed."""
    cause = exc.__cause__
    if isinstance(cause, HeadMoved):
        return cause.code
    if "cannot tell whether it landed" in exc.message:  # PostgresStore._landed
        return "landed_unknown"
    return exc.code


def endure(opts: argparse.Namespace) -> None:
    """Call `meter.spend` `--calls` times in one run while the parent kills our sessions.

    Costs are 1, or random ones from `--seed` with `--random`, as for `spend`.

    After the calls it prints `CALLED` and waits for the `--calm` file (the
    parent has stopped the chaos), then writes what it keeps and ends the run.
    Prints the tally of what this worker saw: `executed` and refusals as
    `spend` does; `raised:CODE` for each step that raised a `StoreError`;
    `kept` for a step whose handler ran but whose result could not be written
    (the run keeps it and writes it first at its next write), and `late` when
    such a result landed; `flush:CODE` for each failed try to write it at the
    end; `unknown` for one still kept when the worker gave up on it; `handled`
    for every call the handler took; `cost` for what the calls seen executed
    reported they cost, and `cost:kept` for what the kept ones did; `cut` for
    the operations whose connection broke under them; `unfinished:CODE` when
    the run's end could not be written. A `HeadMoved` the run wrapped counts under its own code,
    `record_moved`, and a write the store cannot tell landed as
    `landed_unknown`.
    """
    handled = [0]

    def count() -> None:
        handled[0] += 1

    app = tether.Tether(db=opts.db, config=opts.config, env=worker_env())
    app.register(make_spend(count))
    plan = _plan(opts)
    tally: Counter[str] = Counter()
    # The run opens before the chaos does: its first write is not what is tested.
    run = app.run(principal=PRINCIPAL, request="endure").__enter__()
    _go(opts)
    for args in plan:
        was_kept, before = run.has_pending(), handled[0]
        try:
            outcome = run.step("meter.spend", args)
        except tether.LeaseLost:
            raise  # nobody else writes this run: a lost lease is a bug
        except tether.StoreError as exc:
            tally[f"raised:{_code(exc)}"] += 1
            ran = handled[0] > before
            # A kept result is written before the next step goes on: if this one
            # ran, or nothing is kept now, the earlier one landed.
            tally["late"] += was_kept and (ran or not run.has_pending())
            tally["kept"] += ran
            if ran:
                tally["cost:kept"] += args["actual"]
            assert not ran or run.has_pending(), "a step ran and its result is gone"
        else:
            tally[_tally(outcome)] += 1
            tally["late"] += was_kept
            if isinstance(outcome.output, SpendOut):
                tally["cost"] += outcome.output.actual
    _signal(CALLED, Path(opts.calm))  # the parent stops the chaos
    deadline = time.monotonic() + CALM_TIMEOUT_S
    while run.has_pending() and time.monotonic() < deadline:
        try:
            run.flush_pending()
        except tether.StoreError as exc:
            tally[f"flush:{_code(exc)}"] += 1
            if isinstance(exc, HeadMoved):
                break  # with the chaos over, nothing will move the head back
            time.sleep(0.05)
        else:
            tally["late"] += 1
    tally["unknown"] += run.has_pending()
    tally["handled"] = handled[0]
    # Operations whose connection broke under them, as the store's pool counts
    # them (psycopg_pool's stats): the proof that the chaos cut operations mid-flight.
    tally["cut"] = app.store._pool.get_stats().get("returns_bad", 0)  # type: ignore[attr-defined]  # PostgresStore's pool
    try:
        run.__exit__(None, None, None)
    except tether.StoreError as exc:
        tally[f"unfinished:{_code(exc)}"] += 1
    app.close()
    print(RESULT + json.dumps({"runs": [run.id], "tally": tally}), flush=True)


def hold(opts: argparse.Namespace) -> None:
    """Call `meter.hold` from `--threads` threads, `--calls` times each, one run per thread.

    Each call holds `--hold` seconds. The threads get `--within` seconds to
    finish; a run still calling then is missing from the `RESULT` line, and its
    calls from the tally, which the parent counts.
    """
    app = tether.Tether(db=opts.db, config=opts.config, env=worker_env())
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
    within = time.monotonic() + opts.within
    for t in threads:
        t.join(timeout=max(0.0, within - time.monotonic()))
    with lock:
        print(RESULT + json.dumps({"runs": runs, "tally": tally}), flush=True)
    app.close()


def hang(opts: argparse.Namespace) -> None:
    """Call `meter.block`, which blocks in its handler until the parent kills us."""
    app = tether.Tether(db=opts.db, config=opts.config, env=worker_env())
    app.register(make_block(hang=True))
    with app.run(principal=PRINCIPAL, request="block") as run:
        run.call("meter.block", {"n": 0})


def main(argv: Sequence[str]) -> None:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(prog="_limit_workers.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("spend", "endure", "hold", "hang"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--db", required=True)
        cmd.add_argument("--config", required=True)
        if name != "hang":
            cmd.add_argument("--go", required=True)
            cmd.add_argument("--calls", type=int, required=True)
        if name == "endure":
            cmd.add_argument("--calm", required=True)
        if name in ("spend", "endure"):
            cmd.add_argument("--seed", type=int, default=0)
            cmd.add_argument("--random", action="store_true")
        if name == "hold":
            cmd.add_argument("--counter", required=True)
            cmd.add_argument("--threads", type=int, default=3)
            cmd.add_argument("--hold", type=float, default=0.005)
            cmd.add_argument("--within", type=float, default=30.0)
    opts = parser.parse_args(argv)
    commands = {"spend": spend, "endure": endure, "hold": hold, "hang": hang}
    commands[opts.command](opts)


# -- the parent's side ----------------------------------------------------------


LimitWorker = Worker
"""A worker running a command of this module (see `spawner`)."""


def spawner(
    cwd: Path, env: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[Callable[..., LimitWorker]]:
    """Yield a function that starts limit workers (with `env` added to ours); kill any still running on exit."""
    return module_spawner(__name__, cwd, env)


if __name__ == "__main__":
    main(sys.argv[1:])
