"""What limits and a breaker add to a call, against the same call without them.

Every case is measured in one run, interleaved in short chunks taken in a
shuffled turn, so noise on a shared machine hits them alike. For each store
(memory, SQLite `synchronous=normal`, SQLite `synchronous=full`) a keyed write
is timed as a bare function, through tether with no limits (the foundation's
call path), with a budget and a breaker on its resource (the bar's case), and
with every kind at once (a budget, a quota, a concurrency cap, a rate limit and
the breaker). A read without a key is timed with a breaker
only (it reads the breaker; it writes nothing before it runs).

    .venv/bin/python benchmarks/limits.py            # about 1 minute
    .venv/bin/python benchmarks/limits.py --quick    # about 15 seconds

Writes `benchmarks/results/limits.json` with each figure and the bar
(limits + breaker add under 50 us p50 per call on SQLite).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import tether

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BAR_US = 50.0

LIMITS_YAML = """
limits:
  - {id: spend, kind: budget, scope: tenant, per: day, amount: "1000000000"}
  - {id: calls, kind: quota, scope: principal, per: hour, max: 1000000000}
  - {id: inflight, kind: concurrency, capability: "bench.*", max: 64}
  - {id: upstream-rate, kind: rate, resource: bench-api, rate: 1000000, burst: 1000000}
breakers:
  - {id: bench-api, resource: bench-api, window: 20, failure_rate: 0.5}
"""
TYPICAL_YAML = """
limits:
  - {id: spend, kind: budget, scope: tenant, per: day, amount: "1000000000"}
breakers:
  - {id: bench-api, resource: bench-api, window: 20, failure_rate: 0.5}
"""
BREAKER_YAML = """
breakers:
  - {id: bench-api, resource: bench-api, window: 20, failure_rate: 0.5}
"""


class Ping(BaseModel):
    n: int


class Pong(BaseModel):
    n: int


@tether.capability(
    "bench.write", effect="write", idempotency="keyed", cost=1, resource="bench-api"
)
def write(args: Ping) -> Pong:
    """Do nothing, typed, as a keyed write."""
    return Pong(n=args.n)


@tether.capability("bench.read", effect="read", resource="bench-api")
def read(args: Ping) -> Pong:
    """Do nothing, typed, as a read."""
    return Pong(n=args.n)


PING = Ping(n=1)
PRINCIPAL = tether.Principal("bench-agent", tenant="bench")


@dataclass
class Case:
    name: str
    store: str
    guards: str
    """bare | none | budget (one budget + breaker) | all (every limit kind + breaker) | breaker"""
    capability: str
    calls: Callable[[], None] = field(init=False)
    samples: list[int] = field(default_factory=list)
    _exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def open(self, folder: Path) -> None:
        if self.guards == "bare":
            fn = (
                write.handler.fn
                if self.capability == "bench.write"
                else read.handler.fn
            )
            self.calls = lambda: fn(PING)
            return
        config = None
        if self.guards != "none":
            config = folder / f"{self.name}.yaml"
            config.write_text(
                {"all": LIMITS_YAML, "budget": TYPICAL_YAML, "breaker": BREAKER_YAML}[
                    self.guards
                ]
            )
        db = {
            "memory": "memory://",
            "normal": f"sqlite:///{folder / self.name}.db?synchronous=normal",
            "full": f"sqlite:///{folder / self.name}.db",
        }[self.store]
        app = self._exit.enter_context(
            tether.Tether(db=db, config=config, env={"TETHER_RECORD_KEY": "k" * 64})
        )
        app.register(write, read)
        run = self._exit.enter_context(app.run(principal=PRINCIPAL, request="bench"))
        keys = count()
        if self.capability == "bench.write":
            self.calls = lambda: run.call(write, PING, idempotency_key=f"k{next(keys)}")
        else:
            self.calls = lambda: run.call(read, PING)

    def close(self) -> None:
        self._exit.close()


def cases() -> list[Case]:
    out = []
    for store in ("memory", "normal", "full"):
        for guards in ("none", "budget", "all"):
            out.append(Case(f"{store}.write.{guards}", store, guards, "bench.write"))
        for guards in ("none", "breaker"):
            out.append(Case(f"{store}.read.{guards}", store, guards, "bench.read"))
    out.append(Case("bare.write", "memory", "bare", "bench.write"))
    return out


def measure(all_cases: list[Case], seconds: float, chunk_s: float, seed: int) -> None:
    rng = random.Random(seed)
    per_case = {c.name: 0.0 for c in all_cases}
    while min(per_case.values()) < seconds:
        order = list(all_cases)
        rng.shuffle(order)
        for case in order:
            if per_case[case.name] >= seconds:
                continue
            start_chunk = time.perf_counter()
            gc.disable()
            try:
                while time.perf_counter() - start_chunk < chunk_s:
                    t0 = time.perf_counter_ns()
                    case.calls()
                    case.samples.append(time.perf_counter_ns() - t0)
            finally:
                gc.enable()
            per_case[case.name] += time.perf_counter() - start_chunk


def p(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


@contextlib.contextmanager
def folder(given: str | None) -> Iterator[Path]:
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="tether-bench-limits-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="about 15 s instead of 1 min"
    )
    parser.add_argument(
        "--dir", help="where the database files go (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "limits.json"))
    args = parser.parse_args()
    seconds = 0.8 if args.quick else 4.0
    all_cases = cases()
    with folder(args.dir) as where:
        for case in all_cases:
            case.open(where)
        try:
            measure(all_cases, 0.2, 0.002, args.seed)  # warm up
            for case in all_cases:
                case.samples.clear()
            measure(all_cases, seconds, 0.002, args.seed + 1)
        finally:
            for case in all_cases:
                case.close()
    by = {c.name: c for c in all_cases}
    bare = statistics.median(by["bare.write"].samples) / 1000
    rows: list[dict[str, Any]] = []
    bars: list[dict[str, Any]] = []
    print(f"{'case':<24}{'p50 us':>10}{'p99 us':>10}{'calls':>9}")
    for case in all_cases:
        print(
            f"{case.name:<24}{p(case.samples, 0.5):>10.1f}{p(case.samples, 0.99):>10.1f}"
            f"{len(case.samples):>9}"
        )
    print()
    print(f"{'what':<34}{'without':>10}{'with':>10}{'added us':>10}{'ratio':>8}")
    for store in ("memory", "normal", "full"):
        for kind, guards in (
            ("write", "budget"),
            ("write", "all"),
            ("read", "breaker"),
        ):
            base = by[f"{store}.{kind}.none"]
            with_ = by[f"{store}.{kind}.{guards}"]
            b50, w50 = p(base.samples, 0.5), p(with_.samples, 0.5)
            added = w50 - b50
            label = (
                f"{store} {kind} + "
                + {
                    "budget": "a budget + breaker",
                    "all": "5 limits + breaker",
                    "breaker": "breaker",
                }[guards]
            )
            print(f"{label:<34}{b50:>10.1f}{w50:>10.1f}{added:>10.1f}{w50 / b50:>8.2f}")
            rows.append(
                {
                    "store": store,
                    "call": kind,
                    "guards": guards,
                    "p50_without_us": round(b50, 2),
                    "p50_with_us": round(w50, 2),
                    "p99_without_us": round(p(base.samples, 0.99), 2),
                    "p99_with_us": round(p(with_.samples, 0.99), 2),
                    "added_p50_us": round(added, 2),
                    "ratio_p50": round(w50 / b50, 3),
                    "foundation_added_p50_us": round(b50 - bare, 2),
                }
            )
            if store != "memory" and guards != "all":
                bars.append(
                    {
                        "bar": f"limits + breaker add < {BAR_US:g} us p50 ({store} {kind})",
                        "value_us": round(added, 2),
                        "threshold_us": BAR_US,
                        "pass": added < BAR_US,
                    }
                )
    print()
    for bar in bars:
        print(
            f"{'PASS' if bar['pass'] else 'MISS'}  {bar['bar']}: {bar['value_us']} us"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bare_call_us": round(bare, 3),
                "rows": rows,
                "bars": bars,
                "quick": args.quick,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
