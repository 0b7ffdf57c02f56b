"""How fast replay verifies recorded events, beside recording them and checking their chain.

A corpus of recorded runs is made first (the cloud-ops demo, with and without a
`tether.yaml` of rules and limits, so decisions, approvals and dry runs appear),
then, interleaved round by round:

- `replay.verify`: `Replayer.replay` of every run (verify mode): each step
  re-driven through the call path on a scratch store, every outcome compared;
- `record.chain`: recomputing every run's hash chain (what `tether verify`
  does), the cheapest pass over the same events: the baseline;
- `record.live`: recording the same runs live on the in-memory store (the
  scripted planner, handlers real): what replay re-does, plus the handlers.

Figures are events per second (events walked / wall time of the pass); ratios
are against `record.chain` and `record.live` from the same round.

    .venv/bin/python benchmarks/replay.py            # about 30 s
    .venv/bin/python benchmarks/replay.py --quick    # about 10 s

It prints a Rich table and writes the figures to `benchmarks/results/replay.json`.
The bar (issue 7): replay verifies at least 20,000 events per second.
"""

from __future__ import annotations

import argparse
import gc
import json
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
from call_path import Bar, _cpu_model, _git, _pressure, bars_json, bars_table
from tether import _canonical, _chain
from tether.replay import RecordedRun, Replayer
from tether.scenarios import SCENARIOS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

POLICY = """\
rules:
  - id: wide-log-searches
    match: {capability: logs.search}
    when: "args.limit > 50"
    decision: deny
    reason: searches that wide load the log cluster
limits:
  - {id: restarts-per-hour, kind: quota, capability: service.restart, per: hour, max: 50}
  - {id: run-budget, kind: budget, scope: run, per: run, amount: 1000}
"""


def _record(app: tether.Tether) -> str:
    scenario = SCENARIOS["cloud-ops"]
    run = scenario.run(app)
    return run.id


def _corpus(folder: Path, runs: int) -> list[tuple[tether.Tether, RecordedRun]]:
    """`runs` demo runs, half under POLICY; each with the app that recorded it."""
    config = folder / "tether.yaml"
    config.write_text(POLICY)
    out = []
    for with_policy in (False, True):
        app = tether.Tether(
            db="memory://", config=config if with_policy else None, env={}
        )
        SCENARIOS["cloud-ops"].setup(app)
        for _ in range(runs // 2):
            run_id = _record(app)
            out.append((app, RecordedRun.from_store(app.store, run_id)))
    return out


def _timed(fn: Callable[[], int]) -> tuple[float, int]:
    gc.collect()
    start = time.perf_counter_ns()
    events = fn()
    return (time.perf_counter_ns() - start) / 1e9, events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and rounds")
    parser.add_argument(
        "--out", default=str(RESULTS / "replay.json"), help="the JSON file to write"
    )
    args = parser.parse_args(argv)
    runs, rounds = (20, 3) if args.quick else (60, 7)
    console = Console()
    with tempfile.TemporaryDirectory() as folder:
        corpus = _corpus(Path(folder), runs)
        replayers = {id(app): Replayer(app) for app, _ in corpus}
        total = sum(len(r.events) for _, r in corpus)
        console.print(f"corpus: {len(corpus)} runs, {total} events")

        def replay() -> int:
            n = 0
            for app, recorded in corpus:
                report = replayers[id(app)].replay(recorded)
                if not report.ok:
                    raise SystemExit(f"replay diverged: {report.to_json()}")
                n += report.events
            return n

        bodies = [
            (r.run_id, [_canonical.dumps(e) for e in r.events]) for _, r in corpus
        ]

        def chain() -> int:
            n = 0
            for run_id, events in bodies:
                head = _chain.genesis(run_id)
                for seq, body in enumerate(events, start=1):
                    head = _chain.chain_hash(head, seq, body)
                n += len(events)
            return n

        apps = [app for app, _ in corpus]

        def live() -> int:
            n = 0
            for app in apps:
                run_id = _record(app)
                n += len(app.store.events(run_id))
            return n

        cases: dict[str, Callable[[], int]] = {
            "replay.verify": replay,
            "record.chain": chain,
            "record.live": live,
        }
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                seconds, events = _timed(fn)
                rates[name].append(events / seconds)
    median = {name: statistics.median(r) for name, r in rates.items()}
    replay_rate = median["replay.verify"]
    bars = [
        Bar(
            id="replay.events_per_s",
            what="replay verifies events per second",
            value=replay_rate,
            op=">=",
            threshold=20_000,
            unit="events/s",
        )
    ]
    table = Table(title="replay (events per second, median of rounds)")
    for column in ("case", "events/s", "vs record.chain", "vs record.live"):
        table.add_column(column, justify="right" if column != "case" else "left")
    for name, rate in median.items():
        table.add_row(
            name,
            f"{rate:,.0f}",
            f"{rate / median['record.chain']:.3f}x",
            f"{rate / median['record.live']:.2f}x",
        )
    console.print(table)
    console.print(bars_table(bars_json(bars)["bars"], ",.0f"))
    doc: dict[str, Any] = {
        "benchmark": "replay",
        "at": datetime.now(UTC).isoformat(),
        "cpu": _cpu_model(),
        "pressure": _pressure(),
        "git": _git(),
        "python": sys.version.split()[0],
        "tether": tether.__version__,
        "corpus": {"runs": len(corpus), "events": total},
        "rounds": rounds,
        "events_per_s": {name: round(rate) for name, rate in median.items()},
        "rounds_events_per_s": {n: [round(x) for x in r] for n, r in rates.items()},
        **bars_json(bars),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
