"""What a step costs on PostgreSQL, and how it scales with client processes, beside SQLite.

One run, one machine, one PostgreSQL server (`--url`, default the local one; a
fresh database is made and dropped). Single-client latency, interleaved round
by round:

- `baseline.pg.insert`: a bare `INSERT` of one step's event bytes, committed
  (autocommit: one statement, one round trip, one WAL flush): the floor;
- `tether.pg.read_budget`: `run.call` of a no-op `read` capability that a
  budget charges (cost 1), through the full call path on PostgreSQL: a read
  charged after it answers, so its record and its budget charge are one
  autocommit statement (`tether_charge` checks and adds to the counter in the
  server, under the locked path's advisory lock);
- `dbos.pg` (with the `bench` group): a DBOS workflow holding one step on the
  same server, in a subprocess (DBOS keeps one global instance per process).

Beside the insert's and tether's latency, their round trips per call, counted
on the wire: libpq's trace of the one connection each uses (the app on
`?pool_size=1`), where every `Sync` (extended protocol, pipelined or not) and
every `Query` (simple protocol) waits for the server's `ReadyForQuery`; and
the client's CPU time per call (this process's `process_time` over the timed
calls): the rest of a call's time is the server's and the wire's.

Then throughput: calls per second through the full call path with 1, 4 and 8
client processes, on PostgreSQL and on SQLite (one file, WAL,
`synchronous=FULL`), each process with its own runs; and decisions per second
with 8 processes charging one shared budget (the hot row) beside 8
independent budgets.

    .venv/bin/python benchmarks/postgres.py            # about 2 minutes
    .venv/bin/python benchmarks/postgres.py --quick    # about 40 seconds

Bars (issue 8): the read step with its budget charge costs one round trip and
has a median under 1.3x the bare insert's, and is at least 5x faster than a
DBOS step. Figures go to `benchmarks/results/postgres.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

import tether
from call_path import Bar, _cpu_model, _git, _pressure, bars_json, bars_table
from tether.store import PostgresStore

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KEY = "a" * 64  # the record key every process shares (TETHER_RECORD_KEY)


class Ping(BaseModel):
    n: int


class Pong(BaseModel):
    n: int


@tether.capability("bench.read", effect="read", cost=1)
def read(args: Ping) -> Pong:
    return Pong(n=args.n)


def _config(folder: Path, scope: str) -> Path:
    """A tether.yaml with one budget big enough never to refuse."""
    path = folder / f"tether-{scope}.yaml"
    path.write_text(
        "limits:\n"
        f"  - {{id: bench-budget, kind: budget, scope: {scope}, per: day, "
        "amount: 1000000000}\n"
    )
    return path


def _app(db: str, config: Path) -> tether.Tether:
    app = tether.Tether(db=db, config=config, env={"TETHER_RECORD_KEY": KEY})
    app.register(read)
    return app


# -- single client ------------------------------------------------------------------


_CPU_NS: dict[str, int] = {}
"""Client CPU time (this process's) spent in each case's timed calls, ns."""


def _timed_loop(
    fn: Callable[[], None], seconds: float, case: str | None = None
) -> list[int]:
    samples: list[int] = []
    gc.collect()
    end = time.perf_counter() + seconds
    cpu = time.process_time_ns()
    while time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    if case is not None:
        _CPU_NS[case] = _CPU_NS.get(case, 0) + time.process_time_ns() - cpu
    return samples


def _round_trips(
    conn: psycopg.Connection[Any], call: Callable[[], object], n: int
) -> float:
    """Return the round trips per call of `call`, which uses only `conn`, over `n` calls.

    Ten calls go first, untraced: psycopg prepares a statement on its fifth
    use, which costs one more round trip, once per connection.
    """
    for _ in range(10):
        call()
    with tempfile.TemporaryFile("w+") as log:
        conn.pgconn.trace(log.fileno())
        try:
            for _ in range(n):
                call()
        finally:
            conn.pgconn.untrace()  # flushes libpq's trace
        log.seek(0)
        sent = re.findall(r"\tF\t\d+\t(\w+)", log.read())
    return sum(message in ("Sync", "Query") for message in sent) / n


def _single(
    db: str, pg_admin: str, config: Path, rounds: int, seconds: float
) -> tuple[dict[str, list[int]], dict[str, float]]:
    samples: dict[str, list[int]] = {
        "baseline.pg.insert": [],
        "tether.pg.read_budget": [],
    }
    body = json.dumps({"kind": "executed", "output": {"n": 1}, "step": 1}).encode() * 3
    conn = psycopg.connect(db, autocommit=True)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_events "
        "(run bigint, seq bigint, body bytea, hash bytea, PRIMARY KEY (run, seq))"
    )
    seq = iter(range(1, 10**9))
    run_no = secrets.randbelow(2**40)

    def insert() -> None:
        conn.execute(
            "INSERT INTO bench_events (run, seq, body, hash) VALUES (%s, %s, %s, %s)",
            (run_no, next(seq), body, b"\x00" * 32),
        )

    app = _app(db, config)
    who = tether.Principal("bench", tenant="acme")
    trips = {"baseline.pg.insert": _round_trips(conn, insert, 100)}
    # An app of one connection, so the trace of that one sees all it sends.
    one = _app(f"{db}{'&' if urlsplit(db).query else '?'}pool_size=1", config)
    store = one.store
    assert isinstance(store, PostgresStore)
    with one.run(principal=who, request="bench") as run:
        numbers = iter(range(10**9))
        # The pool's only connection: traced while the app takes it for its work.
        with store._pool.connection() as traced:
            pass
        trips["tether.pg.read_budget"] = _round_trips(
            traced, lambda: run.call("bench.read", {"n": next(numbers)}), 100
        )
    one.close()
    for _ in range(rounds):
        samples["baseline.pg.insert"] += _timed_loop(
            insert, seconds, "baseline.pg.insert"
        )
        with app.run(principal=who, request="bench") as run:
            numbers = iter(range(10**9))

            def step(run: Any = run, numbers: Any = numbers) -> None:
                run.call("bench.read", {"n": next(numbers)})

            samples["tether.pg.read_budget"] += _timed_loop(
                step, seconds, "tether.pg.read_budget"
            )
    app.close()
    conn.close()
    return samples, trips


def _dbos(pg_url: str, seconds: float) -> list[int] | str:
    """A DBOS workflow + one step on the server, in its own process; None without DBOS."""
    code = f"""
import json, sys, time
from dbos import DBOS
@DBOS.step()
def step(n):
    return n
@DBOS.workflow()
def flow(n):
    return step(n)
DBOS(config={{"name": "tether-bench", "system_database_url": {pg_url!r}, "log_level": "WARNING"}})
DBOS.launch()
flow(0)
samples = []
end = time.perf_counter() + {seconds}
i = 0
while time.perf_counter() < end:
    t0 = time.perf_counter_ns(); flow(i); samples.append(time.perf_counter_ns() - t0); i += 1
print(json.dumps(samples))
DBOS.destroy()
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"DBOS did not run: {last}"
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- many clients -------------------------------------------------------------------


def _worker(
    db: str, config: str, name: str, go: float, seconds: float, out: Any
) -> None:
    app = _app(db, Path(config))
    who = tether.Principal(f"bench-{name}", tenant=f"t-{name}")
    calls = 0
    while time.time() < go:
        time.sleep(0.001)
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        with app.run(principal=who, request=f"bench {name}") as run:
            for _ in range(50):
                run.call("bench.read", {"n": n})
                n += 1
                calls += 1
    app.close()
    out.put(calls)


def _many(db: str, config: Path, processes: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    go = time.time() + 3.0  # every process imported and connected before the start
    procs = [
        ctx.Process(target=_worker, args=(db, str(config), str(i), go, seconds, out))
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def _stats(ns: list[int]) -> dict[str, float]:
    ordered = sorted(ns)
    return {
        "n": len(ordered),
        "median_us": statistics.median(ordered) / 1e3,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "TETHER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL server to make a scratch database on",
    )
    parser.add_argument("--out", default=str(RESULTS / "postgres.json"))
    args = parser.parse_args(argv)
    rounds, seconds, span = (3, 1.0, 3.0) if args.quick else (5, 2.0, 8.0)
    console = Console()
    name = f"tether_bench_{secrets.token_hex(4)}"
    admin = psycopg.connect(args.url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    pg = urlsplit(args.url)._replace(path=f"/{name}").geturl()
    doc: dict[str, Any] = {
        "benchmark": "postgres",
        "at": datetime.now(UTC).isoformat(),
        "cpu": _cpu_model(),
        "pressure": _pressure(),
        "git": _git(),
        "server": admin.execute("SHOW server_version").fetchone()[0],  # type: ignore[index]
    }
    try:
        with tempfile.TemporaryDirectory() as folder:
            shared = _config(Path(folder), "global")
            own = _config(Path(folder), "principal")
            console.print("single client, interleaved rounds ...")
            single, trips = _single(pg, args.url, shared, rounds, seconds)
            latency = {k: _stats(v) for k, v in single.items()}
            for case, used in _CPU_NS.items():  # the client's share of each call
                latency[case]["client_cpu_us"] = used / len(single[case]) / 1e3
            console.print("DBOS on the same server ...")
            dbos = _dbos(
                urlsplit(args.url)._replace(path=f"/{name}_dbos").geturl(),
                seconds * rounds,
            )
            if isinstance(dbos, list):
                latency["dbos.pg"] = _stats(dbos)
            else:
                console.print(f"[yellow]{dbos}")
            throughput: dict[str, float] = {}
            sqlite_db = f"sqlite:///{Path(folder) / 'bench.db'}"
            for procs in (1, 4, 8):
                console.print(f"throughput, {procs} processes ...")
                throughput[f"pg.{procs}"] = _many(pg, own, procs, span)
                throughput[f"sqlite.{procs}"] = _many(sqlite_db, own, procs, span)
            console.print("8 processes on one shared budget ...")
            throughput["pg.8.shared_budget"] = _many(pg, shared, 8, span)
            throughput["pg.8.own_budgets"] = throughput["pg.8"]
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'DROP DATABASE IF EXISTS "{name}_dbos" WITH (FORCE)')
        admin.close()
    base = latency["baseline.pg.insert"]["median_us"]
    step = latency["tether.pg.read_budget"]["median_us"]
    bars = [
        Bar(
            id="pg.read_step_round_trips",
            what="round trips per read step + budget charge (libpq trace)",
            value=trips["tether.pg.read_budget"],
            op="<=",
            threshold=1.0,
            unit="",
        ),
        Bar(
            id="pg.read_step_vs_insert",
            what="read step + budget charge, median / bare INSERT+COMMIT median",
            value=step / base,
            op="<",
            threshold=1.3,
            unit="x",
        ),
        Bar(
            id="pg.dbos_vs_read_step",
            what="DBOS step median / tether read step median",
            value=(latency["dbos.pg"]["median_us"] / step)
            if "dbos.pg" in latency
            else None,
            op=">=",
            threshold=5.0,
            unit="x",
        ),
    ]
    table = Table(title="single client (µs)")
    for column in (
        "case", "median", "p99", "n", "vs insert", "round trips", "client CPU"
    ):  # fmt: skip
        table.add_column(column)
    for case, s in latency.items():
        table.add_row(
            case, f"{s['median_us']:.0f}", f"{s['p99_us']:.0f}", str(s["n"]),
            f"{s['median_us'] / base:.2f}x",
            f"{trips[case]:.2f}" if case in trips else "-",
            f"{s['client_cpu_us']:.0f}" if "client_cpu_us" in s else "-",
        )  # fmt: skip
    console.print(table)
    table = Table(title="calls per second, full call path")
    for column in ("case", "calls/s"):
        table.add_column(column)
    for case, rate in throughput.items():
        table.add_row(case, f"{rate:,.0f}")
    console.print(table)
    console.print(bars_table(bars_json(bars)["bars"], ".2f"))
    doc.update(
        latency=latency, round_trips=trips, throughput=throughput, **bars_json(bars)
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
