"""The least a typed, recorded step can cost here, beside what tether's step costs.

`call_path.py`'s memory and `synchronous=NORMAL` bars are absolute (added over
the bare call: under 10 us and under 40 us). This measures, in one run on one
machine, the floors under them: the work any step that keeps tether's record
must do, written straight, with nothing of tether's call path around it:

- `floor.typed`: validate the args (pydantic), dump them for the record, build
  the step's three events (`validated`, `decided`, `executed`, the classes the
  record uses), call the handler, validate and dump its output;
- `floor.recorded`: the same, then encode the events canonically and chain
  their hashes (SHA-256), as the stored record needs;
- `floor.normal`: `floor.recorded`, then write the rows to SQLite in one
  transaction (WAL, `synchronous=NORMAL`: the durability of the NORMAL bar);

beside `baseline.function` (the bare handler), the bare `NORMAL` insert of the
same rows (`baseline.sqlite.normal`, as in `call_path.py`), and tether's own
read step on `memory://` (whose store keeps the event objects, encoding and
chaining nothing: its floor is `floor.typed`) and on SQLite `NORMAL` (its
floor is `floor.normal`). No idempotency key, limit,
breaker, lease, approval or retry is involved: the read step takes none of
them either; but tether checks for each, and writes the run's head and lease.

Cases are interleaved in short chunks, round by round, as in `call_path.py`.

    .venv/bin/python benchmarks/floor.py            # about 40 s
    .venv/bin/python benchmarks/floor.py --quick    # about 10 s

Prints a Rich table (median and p99 per call, and the median added over the
bare call, against each bar) and writes `benchmarks/results/floor.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import tether
from call_path import (
    _EVENTS_DDL,
    PING,
    PRINCIPAL,
    Ping,
    Pong,
    _cpu_model,
    _git,
    _probe_rows,
    noop,
)
from tether import _canonical, _chain, record

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BARS_US = {"memory": 10.0, "normal": 40.0}
"""call_path.py's absolute bars: median added over the bare call."""


def _typed() -> Callable[[list[record.Event]], Any]:
    """One step's typed checks and events, kept in `events`: nothing else."""
    args_in, out_in = Ping.__pydantic_validator__, Pong.__pydantic_validator__
    args_out, out_out = Ping.__pydantic_serializer__, Pong.__pydantic_serializer__
    handler = noop.handler.fn
    clock = tether.clock.SystemClock()
    numbers = count(1)

    def step(events: list[record.Event]) -> Any:
        number = next(numbers)
        now = clock.now()
        args = args_in.validate_python(PING)
        events.append(
            record.Validated(
                at=now,
                step=number,
                capability="bench.noop",
                version="1",
                effect="read",
                args=args_out.to_python(args, mode="json"),
            )
        )
        events.append(
            record.Decided(
                at=now,
                step=number,
                verdict="allow",
                policy_version="floor",
                principal=PRINCIPAL.id,
            )
        )
        start = time.perf_counter_ns()
        out = out_in.validate_python(handler(args))
        took = time.perf_counter_ns() - start
        events.append(
            record.Executed(
                at=clock.now(),
                step=number,
                output=out_out.to_python(out, mode="json"),
                duration_us=took // 1000,
            )
        )
        return out

    return step


class _Chained:
    """`_typed`, then the events encoded and hash-chained as the record stores them."""

    def __init__(self) -> None:
        self.typed = _typed()
        self.seq = 0
        self.head = b"\x00" * 32

    def rows(self) -> list[tuple[int, int, str, int | None, bytes, bytes]]:
        events: list[record.Event] = []
        self.typed(events)
        rows = []
        for event in events:
            self.seq += 1
            body = _canonical.dumps_fields(event)
            self.head = _chain.chain_hash(self.head, self.seq, body)
            rows.append((1, self.seq, event.kind, event.step, body, self.head))
        return rows


def _normal_db(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(_EVENTS_DDL)
    return con


_INSERT = "INSERT INTO events (run, seq, kind, step, body, hash) VALUES (?,?,?,?,?,?)"


def _cases(folder: Path) -> tuple[dict[str, Callable[[], object]], list[Any]]:
    """Each case's one call, and what to close after."""
    closing: list[Any] = []
    rows = _probe_rows(folder)
    bare = _normal_db(folder / "bare-normal.db")
    floor = _normal_db(folder / "floor-normal.db")
    closing += [bare, floor]
    seqs = count(0, len(rows))

    def bare_insert() -> None:
        base = next(seqs)
        bare.execute("BEGIN IMMEDIATE")
        bare.executemany(
            _INSERT,
            [(1, base + i, k, s, b, h) for i, (k, s, b, h) in enumerate(rows, 1)],
        )
        bare.execute("COMMIT")

    typed = _typed()
    kept: list[record.Event] = []

    def floor_typed() -> None:
        if len(kept) > 30_000:  # a memory store keeps them too; bounded here
            kept.clear()
        typed(kept)

    chained, written = _Chained(), _Chained()

    def floor_normal() -> None:
        got = written.rows()
        floor.execute("BEGIN IMMEDIATE")
        floor.executemany(_INSERT, got)
        floor.execute("COMMIT")

    cases: dict[str, Callable[[], object]] = {
        "baseline.function": lambda: noop.handler.fn(PING),
        "baseline.sqlite.normal": bare_insert,
        "floor.typed": floor_typed,
        "floor.recorded": chained.rows,
        "floor.normal": floor_normal,
    }
    for name, db in (
        ("tether.memory.read", "memory://"),
        (
            "tether.normal.read",
            f"sqlite:///{folder / 'tether-normal.db'}?synchronous=normal",
        ),
    ):
        app = tether.Tether(db=db, env={})
        app.register(noop)
        run = app.run(principal=PRINCIPAL, request="floor")
        run.__enter__()
        closing.append((app, run))
        cases[name] = lambda run=run: run.call(noop, PING)
    return cases, closing


def _close(closing: list[Any]) -> None:
    for item in closing:
        if isinstance(item, tuple):
            app, run = item
            run.__exit__(None, None, None)
            app.close()
        else:
            item.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--out", default=str(RESULTS / "floor.json"), help="the JSON file to write"
    )
    args = parser.parse_args(argv)
    rounds, chunk_s, warm = (5, 0.05, 1_000) if args.quick else (20, 0.1, 3_000)
    console = Console()
    rng = random.Random(args.seed)
    samples: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases, closing = _cases(Path(tmp))
        try:
            for name, call in cases.items():
                console.print(f"warming {name} ...")
                for _ in range(warm):  # past the WAL's first checkpoint
                    call()
            samples = {name: [] for name in cases}
            order = list(cases)
            for r in range(rounds):
                rng.shuffle(order)
                for name in order:
                    call, got = cases[name], samples[name]
                    gc.disable()
                    try:
                        end = time.perf_counter() + chunk_s
                        while time.perf_counter() < end:
                            t0 = time.perf_counter_ns()
                            call()
                            got.append(time.perf_counter_ns() - t0)
                    finally:
                        gc.enable()
                console.print(f"  round {r + 1}/{rounds} done")
        finally:
            _close(closing)

    def median(name: str) -> float:
        return statistics.median(samples[name]) / 1000

    def p99(name: str) -> float:
        ordered = sorted(samples[name])
        return ordered[int(0.99 * (len(ordered) - 1))] / 1000

    base = median("baseline.function")
    figures = {
        name: {
            "median_us": round(median(name), 3),
            "p99_us": round(p99(name), 3),
            "added_us": round(median(name) - base, 3),
            "samples": len(samples[name]),
        }
        for name in samples
    }
    bar_of = {
        "floor.typed": "memory",
        "floor.recorded": "memory",
        "tether.memory.read": "memory",
        "floor.normal": "normal",
        "baseline.sqlite.normal": "normal",
        "tether.normal.read": "normal",
    }
    table = Table(title="the least a typed, recorded read step costs, and tether's")
    for column in ("case", "median µs", "p99 µs", "added µs", "bar µs", ""):
        table.add_column(column, justify="left" if column == "case" else "right")
    for name, fig in figures.items():
        bar = BARS_US.get(bar_of.get(name, ""))
        verdict = "" if bar is None else ("under" if fig["added_us"] < bar else "over")
        table.add_row(
            name,
            f"{fig['median_us']:.2f}",
            f"{fig['p99_us']:.2f}",
            f"{fig['added_us']:.2f}",
            "-" if bar is None else f"{bar:.0f}",
            verdict,
        )
    console.print(table)
    console.print(
        "added = median minus baseline.function's median; bar = call_path.py's "
        "absolute bar for that durability (memory: 10 µs, NORMAL: 40 µs)"
    )
    document = {
        "benchmark": "floor",
        "mode": "quick" if args.quick else "full",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "started_at": datetime.now(UTC).isoformat(),
        "machine": {"cpu": _cpu_model()},
        "git": _git(),
        "bars_us": BARS_US,
        "cases": figures,
        "ratios": {
            # The memory store keeps event objects: it encodes and chains nothing.
            "tether.memory.read / floor.typed (added)": round(
                figures["tether.memory.read"]["added_us"]
                / figures["floor.typed"]["added_us"],
                2,
            ),
            "tether.normal.read / floor.normal (added)": round(
                figures["tether.normal.read"]["added_us"]
                / figures["floor.normal"]["added_us"],
                2,
            ),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    for what, ratio in document["ratios"].items():
        console.print(f"{what}: {ratio:.2f}x")
    console.print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
