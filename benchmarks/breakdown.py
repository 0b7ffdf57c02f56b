"""Where a durable read step's time goes, phase by phase, beside a bare insert's.

A diagnostic for `call_path.py`'s SQLite bars: it splits each call into the
phases the store's connection shows: the connection is wrapped in a proxy that
notes the time as each statement starts (sqlite3's own trace callback would
expand every bound blob into the SQL text, and cost more than it measures),
so nothing in the store itself changes:

- `before write`: from the call to `BEGIN IMMEDIATE`: validation, the policy
  decision, the handler, the output's checks and the step's events;
- `begin + encode`: `BEGIN` itself, then encoding, chaining and signing the
  events, until the first write statement;
- `statements`: the run's head `UPDATE` and the events' `INSERT`s;
- `commit`: `COMMIT` itself (with `synchronous=full`, its fsync);
- `return`: the way back to the caller (the store's answer, the step's outcome).

The bare insert (the same event rows, `BEGIN IMMEDIATE; INSERT ...; COMMIT`)
is split the same way. Cases are interleaved in short chunks, round by round,
as in `call_path.py`. Medians per phase; they need not add up to the call's
median.

    .venv/bin/python benchmarks/breakdown.py            # about 15 s
    .venv/bin/python benchmarks/breakdown.py --quick    # about 5 s

Prints a Rich table and writes `benchmarks/results/breakdown.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import tether
from call_path import (
    _EVENTS_DDL,
    PING,
    PRINCIPAL,
    _cpu_model,
    _git,
    _probe_rows,
    noop,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PHASES = ("before write", "begin + encode", "statements", "commit", "return")
WARMUP = 3_000
"""Calls before timing: past the WAL's growth to its first checkpoint."""


class Split:
    """Timestamps of one call's statements, noted by a `Timed` connection."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, int]] = []
        self.samples: dict[str, list[int]] = {p: [] for p in ("call", *PHASES)}

    def mark(self, statement: str) -> None:
        self.marks.append((statement.split(None, 1)[0].upper(), time.perf_counter_ns()))

    def timed(self, call: Callable[[], object]) -> None:
        self.marks.clear()
        start = time.perf_counter_ns()
        call()
        end = time.perf_counter_ns()
        kinds = [k for k, _ in self.marks]
        if kinds.count("BEGIN") != 1 or kinds.count("COMMIT") != 1:
            raise SystemExit(f"expected one transaction per call, saw {kinds}")
        at = dict(self.marks[::-1])  # the first mark of each kind
        begin, commit, committed = at["BEGIN"], at["COMMIT"], at["COMMITTED"]
        first = next(t for k, t in self.marks if k not in ("BEGIN", "COMMIT"))
        for phase, ns in zip(
            ("call", *PHASES),
            (
                end - start,
                begin - start,
                first - begin,
                commit - first,
                committed - commit,
                end - committed,
            ),
            strict=True,
        ):
            self.samples[phase].append(ns)


class Timed:
    """A sqlite3 connection that marks the start of each statement on a `Split`."""

    def __init__(self, con: sqlite3.Connection, split: Split) -> None:
        self._con = con
        self._split = split

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._split.mark(sql)
        cursor = self._con.execute(sql, *args)
        if sql == "COMMIT":
            self._split.mark("COMMITTED")
        return cursor

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self._split.mark(sql)
        return self._con.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def _tether(folder: Path, sync: str) -> tuple[Callable[[], object], Split, Any]:
    suffix = "" if sync == "full" else "?synchronous=normal"
    app = tether.Tether(db=f"sqlite:///{folder / f'tether-{sync}.db'}{suffix}", env={})
    app.register(noop)
    run = app.run(principal=PRINCIPAL, request="breakdown")
    run.__enter__()
    split = Split()
    store: Any = app.store
    store._con = Timed(store._con, split)
    return lambda: run.call(noop, PING), split, (app, run)


def _bare(
    folder: Path, sync: str, rows: list[tuple[str, int, bytes, bytes]]
) -> tuple[Callable[[], object], Split, Any]:
    raw = sqlite3.connect(folder / f"bare-{sync}.db", isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute(f"PRAGMA synchronous={sync.upper()}")
    raw.execute(_EVENTS_DDL)
    split = Split()
    con = Timed(raw, split)
    seq = iter(range(0, 10**12, len(rows)))

    def insert() -> None:
        base = next(seq)
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT INTO events (run, seq, kind, step, body, hash) VALUES (?,?,?,?,?,?)",
            [
                (1, base + i, kind, step, body, h)
                for i, (kind, step, body, h) in enumerate(rows, 1)
            ],
        )
        con.execute("COMMIT")

    return insert, split, raw


def _medians(split: Split) -> dict[str, float]:
    return {p: statistics.median(v) / 1000 for p, v in split.samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument(
        "--out", default=str(RESULTS / "breakdown.json"), help="the JSON file to write"
    )
    args = parser.parse_args(argv)
    rounds, chunk = (5, 200) if args.quick else (20, 500)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = _probe_rows(folder)
        cases = {}
        for sync in ("normal", "full"):
            cases[f"tether.{sync}.read"] = _tether(folder, sync)
            cases[f"bare.{sync}.insert"] = _bare(folder, sync, rows)
        for name, (call, _, _) in cases.items():
            console.print(f"warming {name} ...")
            for _ in range(WARMUP):
                call()
        order = list(cases)
        for _ in range(rounds):
            random.shuffle(order)
            for name in order:
                call, split, _ = cases[name]
                for _ in range(chunk):
                    split.timed(call)
        figures = {name: _medians(split) for name, (_, split, _) in cases.items()}
        for _, _, handle in cases.values():
            if isinstance(handle, tuple):
                app, run = handle
                run.__exit__(None, None, None)
                app.close()
            else:
                handle.close()

    table = Table(title="median µs per phase (one call: one transaction)")
    table.add_column("case")
    for column in ("call", *PHASES):
        table.add_column(column, justify="right")
    for name, medians in figures.items():
        table.add_row(name, *(f"{medians[c]:.1f}" for c in ("call", *PHASES)))
    console.print(table)
    document = {
        "benchmark": "breakdown",
        "mode": "quick" if args.quick else "full",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "started_at": datetime.now(UTC).isoformat(),
        "machine": {"cpu": _cpu_model()},
        "git": _git(),
        "samples_per_case": rounds * chunk,
        "median_us": figures,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
