"""What tether's call path adds per call, against bare SQLite, LangGraph and DBOS.

One run measures every case, interleaved: in each round every case runs in
chunks of about 2 ms, taken in a shuffled turn, so that a burst of noise on a
shared machine hits them all alike. It prints Rich tables and writes the same
figures, with machine info, versions and each bar's pass/fail, to
`benchmarks/results/call_path.json`. README.md beside this file explains the
cases and what durability each one has.

    .venv/bin/python benchmarks/call_path.py            # full: 1.5 to 3 minutes
    .venv/bin/python benchmarks/call_path.py --quick    # about 30 seconds
    .venv/bin/python benchmarks/call_path.py --profile tether.memory.read

A bar that misses is reported, not an error: the exit code is non-zero only when
the benchmark itself fails.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from itertools import count
from pathlib import Path
from typing import Any, TypedDict

from pydantic import BaseModel

import tether

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FORMAT = 1
"""Version of the JSON document this script writes."""

# -- the capabilities every case runs ------------------------------------------


class Ping(BaseModel):
    n: int


class Pong(BaseModel):
    n: int


@tether.capability("bench.noop", effect="read")
def noop(args: Ping) -> Pong:
    """Do nothing, typed."""
    return Pong(n=args.n)


@tether.capability("bench.write", effect="write", idempotency="keyed")
def write(args: Ping) -> Pong:
    """Do nothing, typed, as a keyed write."""
    return Pong(n=args.n)


PING = Ping(n=1)
PRINCIPAL = tether.Principal("bench-agent")
_SYNC_NAMES = {0: "off", 1: "normal", 2: "full", 3: "extra"}

# -- modes -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Mode:
    name: str
    rounds: int
    """Each case runs once per round, in chunks interleaved with the others."""
    budget_s: float
    """Time each case may spend in timed calls, over all rounds (a hard cap)."""
    max_samples: int
    warmup_s: float
    warmup_max: int
    prime_max_s: float
    """Longest a case may take to bring its WAL to steady state."""


FULL = Mode(
    name="full",
    rounds=10,
    budget_s=10.0,
    max_samples=40_000,
    warmup_s=0.4,
    warmup_max=3_000,
    prime_max_s=30.0,
)
QUICK = Mode(
    name="quick",
    rounds=5,
    budget_s=1.2,
    max_samples=5_000,
    warmup_s=0.15,
    warmup_max=500,
    prime_max_s=10.0,
)

# -- cases -------------------------------------------------------------------------


@dataclass(kw_only=True)
class Stats:
    n: int
    median_us: float
    p99_us: float
    mean_us: float
    min_us: float
    p90_us: float
    calls_per_s: float
    round_medians_us: list[float]


def _percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(q * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e3


def _stats(samples: list[int], rounds: list[list[int]]) -> Stats:
    ordered = sorted(samples)
    mean = statistics.fmean(ordered) / 1e3
    return Stats(
        n=len(ordered),
        median_us=statistics.median(ordered) / 1e3,
        p99_us=_percentile(ordered, 0.99),
        mean_us=mean,
        min_us=ordered[0] / 1e3,
        p90_us=_percentile(ordered, 0.90),
        # Throughput of one caller in a loop: calls per second of measured time.
        calls_per_s=1e6 / mean,
        round_medians_us=[statistics.median(r) / 1e3 for r in rounds if r],
    )


def _db_size(paths: list[Path]) -> int:
    """Size of the main database files (the WAL is checkpointed into them first)."""
    return sum(p.stat().st_size for p in paths if p.exists())


def _wal_size(paths: list[Path]) -> int:
    return sum(
        Path(f"{p}-wal").stat().st_size for p in paths if Path(f"{p}-wal").exists()
    )


def _checkpoint(paths: list[Path]) -> None:
    """Copy the WAL into the main file, without truncating the WAL (no VACUUM either).

    TRUNCATE would send the next commits back through the WAL's growth phase,
    where each commit that extends the file costs a file-system journal commit
    (about ten times a plain fsync on ext4): steady state reuses the WAL in place.
    """
    for p in paths:
        con = sqlite3.connect(p)
        try:
            con.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            con.close()


WAL_FULL = 1000 * (4096 + 24)
"""WAL size at SQLite's default auto-checkpoint (1000 pages of 4 KiB, plus frame headers)."""


def _is_commit(sql: str) -> bool:
    return sql.lstrip().upper().startswith(("COMMIT", "END"))


class Case:
    """One measured thing: `call()` is timed; the rest is set-up around it."""

    id: str
    title: str
    group: str  # "baseline", "tether" or "peer"
    phase = 1
    """Cases of one phase are open together and interleaved; phases run in turn."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.rounds: list[list[int]] = []
        self.calls = 0
        self.commits_per_call: float | None = None
        self.storage: dict[str, Any] = {}
        self.bytes_per_event: float | None = None
        self.bytes_per_step: float | None = None
        self.growth_per_call: float | None = None
        self.growth_per_event: float | None = None
        self._size0 = 0
        self._calls0 = 0
        self._grown = 0

    # set-up and tear-down, never timed
    def open(self) -> None:
        pass

    def start_batch(self) -> None:
        pass

    def stop_batch(self) -> None:
        pass

    def close(self) -> None:
        pass

    def call(self) -> None:
        raise NotImplementedError

    # what the harness asks
    def durability(self) -> str:
        return "nothing is written"

    def db_paths(self) -> list[Path]:
        return []

    def trace(self, callback: Callable[[str], None] | None) -> bool:
        """Install (or remove) a statement tracer; False when the case runs no SQL."""
        return False

    def mark_size(self) -> None:
        """Note the file size before the measured calls."""
        paths = self.db_paths()
        if paths:
            _checkpoint(paths)
            self._size0 = _db_size(paths)
            self._calls0 = self.calls

    def finish(self) -> None:
        """Measure what the calls left on disk."""
        paths = self.db_paths()
        if paths and self.calls > self._calls0:
            _checkpoint(paths)
            self._grown = _db_size(paths) - self._size0
            self.growth_per_call = self._grown / (self.calls - self._calls0)


class BareFunction(Case):
    id = "baseline.function"
    title = "bare function call"
    group = "baseline"

    def __init__(self) -> None:
        super().__init__()
        self.fn = noop.handler.fn

    def call(self) -> None:
        self.fn(PING)


_EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS events (
    run    INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    step   INTEGER,
    body   BLOB NOT NULL,
    hash   BLOB NOT NULL,
    PRIMARY KEY (run, seq)
) STRICT, WITHOUT ROWID
"""
"""The events table as tether's store lays it out, without the other tables."""


class BareInsert(Case):
    """One committed `BEGIN IMMEDIATE; INSERT ...; COMMIT` of a real step's event rows."""

    group = "baseline"

    def __init__(
        self, path: Path, synchronous: str, rows: list[tuple[str, int, bytes, bytes]]
    ) -> None:
        super().__init__()
        self.id = f"baseline.sqlite.{synchronous}"
        self.title = f"bare SQLite insert, WAL, synchronous={synchronous.upper()}"
        self.path = path
        self.synchronous = synchronous
        self.rows = rows
        self.seq = 0

    def open(self) -> None:
        self.con = sqlite3.connect(self.path, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        self.con.execute("PRAGMA busy_timeout=10000")
        self.con.execute(_EVENTS_DDL)
        self.storage = _pragmas(self.con)
        body = [len(b) + len(h) for _, _, b, h in self.rows]
        self.bytes_per_event = statistics.fmean(body)
        self.bytes_per_step = float(sum(body))

    def call(self) -> None:
        base = self.seq
        self.seq += len(self.rows)
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT INTO events (run, seq, kind, step, body, hash) VALUES (?,?,?,?,?,?)",
            [
                (1, base + i, kind, step, body, h)
                for i, (kind, step, body, h) in enumerate(self.rows, 1)
            ],
        )
        con.execute("COMMIT")

    def durability(self) -> str:
        return _durability_text(self.storage)

    def db_paths(self) -> list[Path]:
        return [self.path]

    def trace(self, callback: Callable[[str], None] | None) -> bool:
        self.con.set_trace_callback(callback)
        return True

    def finish(self) -> None:
        super().finish()
        if self.growth_per_call is not None:
            self.growth_per_event = self.growth_per_call / len(self.rows)

    def close(self) -> None:
        self.con.close()


class TetherCase(Case):
    """Steps through `run.call`, one run per batch."""

    group = "tether"

    def __init__(
        self,
        *,
        kind: str,
        db: str,
        path: Path | None,
        cap: str,
        whole_run: bool = False,
    ) -> None:
        super().__init__()
        self.id = f"tether.{kind}.{'run' if whole_run else cap}"
        what = {
            "read": "read step (bench.noop)",
            "write": "keyed write step (bench.write)",
        }[cap]
        where = {
            "memory": "memory://",
            "full": "SQLite synchronous=FULL (default)",
            "normal": "SQLite ?synchronous=normal",
        }[kind]
        self.title = (
            f"tether, {where}: a whole run with one read step"
            if whole_run
            else f"tether, {where}: {what}"
        )
        self.kind = kind
        self.db = db
        self.path = path
        self.cap = cap
        self.whole_run = whole_run
        self.keys = count()
        self.app: tether.Tether | None = None
        self.run: tether.Run | None = None
        self.last_run_id: str | None = None
        self._events0 = 0
        if whole_run:
            self.call = self._whole_run  # type: ignore[method-assign]
        elif cap == "read":
            self.call = self._read  # type: ignore[method-assign]
        else:
            self.call = self._write  # type: ignore[method-assign]

    def _new_app(self) -> tether.Tether:
        # env={}: the user's TETHER_* variables must not change what is measured;
        # the record key then comes from a key file beside the database, as by default.
        app = tether.Tether(db=self.db, env={})
        app.register(noop, write)
        return app

    def open(self) -> None:
        self.app = self._new_app()
        if self.path is not None:
            self.storage = _pragmas(self.app.store._con)  # type: ignore[attr-defined]
        # One checked call, so a broken call path fails loudly instead of timing errors.
        with self.app.run(principal=PRINCIPAL, request="bench: check") as run:
            out = run.call(write if self.cap == "write" else noop, PING)
            assert out == Pong(n=1), out

    def mark_size(self) -> None:
        super().mark_size()
        if self.path is not None:
            self._events0 = self._event_rows()

    def start_batch(self) -> None:
        if self.kind == "memory":
            # A fresh app per batch: the memory store keeps every event object of
            # every run, and a growing heap would be measured as slower calls.
            assert self.app is not None
            self.app.close()
            self.app = self._new_app()
        if not self.whole_run:
            assert self.app is not None
            self.run = self.app.run(principal=PRINCIPAL, request="bench")
            self.run.__enter__()

    def _read(self) -> None:
        self.run.call(noop, PING)  # type: ignore[union-attr]

    def _write(self) -> None:
        self.run.call(write, PING, idempotency_key=f"k-{next(self.keys)}")  # type: ignore[union-attr]

    def _whole_run(self) -> None:
        with self.app.run(principal=PRINCIPAL, request="bench") as run:  # type: ignore[union-attr]
            run.call(noop, PING)

    def stop_batch(self) -> None:
        if self.run is not None:
            self.run.__exit__(None, None, None)
            self.last_run_id = self.run.id
            self.run = None

    def durability(self) -> str:
        if self.path is None:
            return "the record lives in process memory: nothing survives the process"
        return _durability_text(self.storage)

    def db_paths(self) -> list[Path]:
        return [] if self.path is None else [self.path]

    def trace(self, callback: Callable[[str], None] | None) -> bool:
        if self.path is None:
            return False
        assert self.app is not None
        self.app.store._con.set_trace_callback(callback)  # type: ignore[attr-defined]
        return True

    def _event_rows(self) -> int:
        assert self.app is not None
        con = self.app.store._con  # type: ignore[attr-defined]
        return int(con.execute("SELECT count(*) FROM events").fetchone()[0])

    def finish(self) -> None:
        super().finish()
        assert self.app is not None
        if self.last_run_id is None and self.path is not None:
            self.last_run_id = self.app.store.list_runs(limit=1)[0].run_id
        if self.last_run_id is not None:
            events = self.app.store.events(self.last_run_id)
            steps: dict[int, list[int]] = {}
            for ev in events:
                number = ev.data().get("step")
                if number is not None:
                    steps.setdefault(number, []).append(len(ev.body) + len(ev.hash))
            sizes = [s for step in steps.values() for s in step]
            self.bytes_per_event = statistics.fmean(sizes)
            self.bytes_per_step = statistics.fmean(sum(s) for s in steps.values())
            if self.path is not None:
                report = self.app.verify(self.last_run_id)
                if not report.ok:
                    raise RuntimeError(
                        f"{self.id}: the record does not verify: {report}"
                    )
        if self.path is not None and self.growth_per_call is not None:
            added = self._event_rows() - self._events0
            self.growth_per_event = self._grown / max(added, 1)

    def close(self) -> None:
        if self.app is not None:
            self.app.close()


class LangGraphCase(Case):
    """A one-node graph (the same no-op) checkpointed by `SqliteSaver`, `durability="sync"`."""

    id = "langgraph.sqlite"
    title = "LangGraph 1-node graph, SqliteSaver, durability=sync"
    group = "peer"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.threads = count()
        self.config: Any = {}  # a RunnableConfig

    def open(self) -> None:
        from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
        from langgraph.checkpoint.sqlite import SqliteSaver
        from langgraph.graph import END, START, StateGraph

        class State(TypedDict, total=False):
            args: Ping
            result: Pong

        def tool(state: State) -> State:
            return {"result": noop.handler.fn(state["args"])}

        # As `SqliteSaver.from_conn_string` connects; the models are allowed
        # explicitly, as LangGraph asks, so no warning is printed per call.
        self.con = sqlite3.connect(self.path, check_same_thread=False)
        serde = JsonPlusSerializer(
            allowed_msgpack_modules=[
                (Ping.__module__, "Ping"),
                (Pong.__module__, "Pong"),
            ]
        )
        saver = SqliteSaver(self.con, serde=serde)
        saver.setup()
        graph = StateGraph(State)
        graph.add_node("tool", tool)
        graph.add_edge(START, "tool")
        graph.add_edge("tool", END)
        self.graph = graph.compile(checkpointer=saver)
        self.storage = _pragmas(self.con)
        self.start_batch()
        out = self.graph.invoke({"args": PING}, self.config, durability="sync")
        assert out["result"] == Pong(n=1), out

    def start_batch(self) -> None:
        # One thread per batch, as tether opens one run per batch.
        self.config = {"configurable": {"thread_id": f"bench-{next(self.threads)}"}}

    def call(self) -> None:
        self.graph.invoke({"args": PING}, self.config, durability="sync")

    def durability(self) -> str:
        return _durability_text(self.storage)

    def db_paths(self) -> list[Path]:
        return [self.path]

    def trace(self, callback: Callable[[str], None] | None) -> bool:
        self.con.set_trace_callback(callback)
        return True

    def close(self) -> None:
        self.con.close()


_DBOS_WORKFLOW: Callable[[Ping], Pong] | None = None


def _dbos_workflow() -> Callable[[Ping], Pong]:
    """Register the DBOS workflow once per process (DBOS keeps a global registry)."""
    global _DBOS_WORKFLOW
    if _DBOS_WORKFLOW is None:
        from dbos import DBOS

        @DBOS.step()
        def bench_step(args: Ping) -> Pong:
            return noop.handler.fn(args)  # type: ignore[no-any-return]

        @DBOS.workflow()
        def bench_workflow(args: Ping) -> Pong:
            return bench_step(args)

        _DBOS_WORKFLOW = bench_workflow
    return _DBOS_WORKFLOW


class DBOSCase(Case):
    """A DBOS workflow holding one `@DBOS.step()` (the same no-op), on SQLite."""

    group = "peer"

    def __init__(self, path: Path, *, wal: bool) -> None:
        super().__init__()
        self.path = path
        self.wal = wal
        # One DBOS per process: the WAL variant runs in a second phase.
        self.phase = 2 if wal else 1
        if wal:
            self.id = "dbos.sqlite_wal"
            self.title = "DBOS workflow + 1 step, SQLite file pre-set to WAL"
        else:
            self.id = "dbos.sqlite"
            self.title = "DBOS workflow + 1 step, SQLite as DBOS sets it up"
        self._cons: list[Any] = []
        self._tracer: Callable[[str], None] | None = None

    def open(self) -> None:
        import sqlalchemy as sa
        from dbos import DBOS

        if self.wal:
            # WAL is stored in the file, so DBOS's own connections inherit it.
            con = sqlite3.connect(self.path)
            con.execute("PRAGMA journal_mode=WAL")
            con.close()
        self.workflow = _dbos_workflow()
        # Listen on the Pool class before DBOS builds its engine: adding a listener
        # to a live engine races DBOS's background threads as they connect.
        sa.event.listen(sa.pool.Pool, "connect", self._remember)
        self.dbos = DBOS(
            config={
                "name": "tether-bench",
                "system_database_url": f"sqlite:///{self.path}",
                "log_level": "WARNING",
            }
        )
        DBOS.launch()
        engine = self.dbos._sys_db.engine
        with engine.connect() as c:
            self.storage = _pragmas(c.connection.dbapi_connection)
        out = self.workflow(PING)
        assert out == Pong(n=1), out

    def _remember(self, dbapi_con: Any, _record: Any) -> None:
        self._cons.append(dbapi_con)
        if self._tracer is not None:
            dbapi_con.set_trace_callback(self._tracer)

    def call(self) -> None:
        self.workflow(PING)

    def durability(self) -> str:
        return _durability_text(self.storage)

    def db_paths(self) -> list[Path]:
        return [self.path]

    def trace(self, callback: Callable[[str], None] | None) -> bool:
        self._tracer = callback
        for con in self._cons:
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed by the pool
                con.set_trace_callback(callback)
        return True

    def close(self) -> None:
        import sqlalchemy as sa
        from dbos import DBOS

        DBOS.destroy()
        sa.event.remove(sa.pool.Pool, "connect", self._remember)


def _pragmas(con: Any) -> dict[str, Any]:
    journal = con.execute("PRAGMA journal_mode").fetchone()[0]
    sync = int(con.execute("PRAGMA synchronous").fetchone()[0])
    return {
        "journal_mode": str(journal).lower(),
        "synchronous": _SYNC_NAMES.get(sync, sync),
    }


def _durability_text(storage: dict[str, Any]) -> str:
    journal, sync = storage.get("journal_mode"), storage.get("synchronous")
    if sync in ("full", "extra"):
        what = "each commit fsync'd before it returns: survives power loss"
    elif sync == "normal" and journal == "wal":
        what = "survives a process crash; the last commits may be lost on power loss"
    else:
        what = "may lose or corrupt data on a crash"
    return f"journal_mode={journal}, synchronous={sync}: {what}"


# -- the harness ------------------------------------------------------------------


def _timed(fn: Callable[[], None], n: int) -> list[int]:
    out = [0] * n
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn()
        out[i] = clock() - t0
    return out


def _warm(case: Case, mode: Mode) -> float:
    """Warm the case up to steady state; return its median seconds per call.

    A database's WAL grows until the first auto-checkpoint, then is reused in
    place; a case on a WAL file warms up until its WAL reached that size, so that
    no case is timed in the growth phase (README.md, "Steady state").
    """
    paths = case.db_paths()
    primed = not paths or case.storage.get("journal_mode") != "wal"
    clock = time.perf_counter_ns
    times: list[int] = []
    started = clock()
    case.start_batch()
    try:
        while True:
            t0 = clock()
            case.call()
            times.append(clock() - t0)
            if not primed and len(times) % 20 == 0:
                primed = _wal_size(paths) >= WAL_FULL
            elapsed = (clock() - started) / 1e9
            if elapsed > mode.prime_max_s:
                break  # a WAL that never fills (a huge page size?): go on anyway
            warm = elapsed >= mode.warmup_s or len(times) >= mode.warmup_max
            if primed and len(times) >= 20 and warm:
                break
    finally:
        case.stop_batch()
    case.calls += len(times)
    tail = times[len(times) // 2 :]  # the second half: past the growth phase
    return statistics.median(tail) / 1e9


def _count_commits(case: Case, calls: int = 40) -> None:
    seen: list[str] = []
    case.start_batch()
    try:
        if not case.trace(seen.append):
            return
        try:
            for _ in range(calls):
                case.call()
        finally:
            case.trace(None)
        case.calls += calls
    finally:
        case.stop_batch()
    case.commits_per_call = sum(map(_is_commit, seen)) / calls


def _round(
    cases: list[Case],
    plan: dict[str, tuple[int, int, int]],
    rng: random.Random,
) -> None:
    """Run one round: every case's batch, in small chunks taken in turn.

    Noise on a shared machine comes in bursts (another process's fsyncs, a CPU
    hog) lasting tens of milliseconds; chunks of about `CHUNK_S` each, in a
    shuffled turn, make a burst hit every case alike, so p99s compare. `plan`
    gives each case its samples, chunk size and time budget (ns) for the round,
    so that a burst of noise cannot stretch the run past its budget.
    """
    started: list[Case] = []
    left = {case.id: plan[case.id][0] for case in cases}
    spent = dict.fromkeys(left, 0)
    per_round: dict[str, list[int]] = {case.id: [] for case in cases}
    try:
        for case in cases:
            case.start_batch()
            started.append(case)
        gc.collect()
        active = list(cases)
        while active:
            rng.shuffle(active)
            for case in active:
                _, chunk, _ = plan[case.id]
                samples = _timed(case.call, min(chunk, left[case.id]))
                per_round[case.id].extend(samples)
                left[case.id] -= len(samples)
                spent[case.id] += sum(samples)
                case.calls += len(samples)
            active = [
                case
                for case in active
                if left[case.id] > 0 and spent[case.id] < plan[case.id][2]
            ]
    finally:
        for case in started:
            case.stop_batch()
    for case in cases:
        case.samples.extend(per_round[case.id])
        case.rounds.append(per_round[case.id])


CHUNK_S = 0.002
"""Time each case runs before the next one takes its turn."""


def _measure(
    cases: list[Case], mode: Mode, rng: random.Random, say: Callable[[str], None]
) -> None:
    plan: dict[str, tuple[int, int, int]] = {}
    budget_ns = int(mode.budget_s / mode.rounds * 1e9)
    for case in cases:
        per_call = _warm(case, mode)
        _count_commits(case)
        case.mark_size()
        total = min(mode.max_samples, int(mode.budget_s / per_call))
        chunk = max(1, round(CHUNK_S / per_call))
        plan[case.id] = (max(1, math.ceil(total / mode.rounds)), chunk, budget_ns)
        say(
            f"  warmed {case.id}: ~{per_call * 1e6:,.1f} µs/call; up to "
            f"{plan[case.id][0] * mode.rounds:,} samples or {mode.budget_s:g} s"
        )
    for r in range(mode.rounds):
        _round(cases, plan, rng)
        say(f"  round {r + 1}/{mode.rounds} done")
    for case in cases:
        case.finish()


def _probe_rows(workdir: Path) -> list[tuple[str, int, bytes, bytes]]:
    """Return (kind, step, body, hash) of a real read step's events, as stored."""
    path = workdir / "probe.db"
    with tether.Tether(db=f"sqlite:///{path}", env={}) as app:
        app.register(noop)
        with app.run(principal=PRINCIPAL, request="bench: probe") as run:
            run.call(noop, PING)
        rows = []
        for ev in app.store.events(run.id):
            data = ev.data()
            if data.get("step") == 1:
                rows.append((str(data["kind"]), 1, ev.body, ev.hash))
    return rows


def _build(workdir: Path, rows: list[tuple[str, int, bytes, bytes]]) -> list[Case]:
    def sqlite_url(name: str, sync: str) -> tuple[str, Path]:
        path = workdir / f"{name}.db"
        suffix = "" if sync == "full" else "?synchronous=normal"
        return f"sqlite:///{path}{suffix}", path

    cases: list[Case] = [
        BareFunction(),
        BareInsert(workdir / "bare-full.db", "full", rows),
        BareInsert(workdir / "bare-normal.db", "normal", rows),
        TetherCase(kind="memory", db="memory://", path=None, cap="read"),
        TetherCase(kind="memory", db="memory://", path=None, cap="write"),
    ]
    for sync in ("full", "normal"):
        for cap in ("read", "write"):
            url, path = sqlite_url(f"tether-{sync}-{cap}", sync)
            cases.append(TetherCase(kind=sync, db=url, path=path, cap=cap))
    url, path = sqlite_url("tether-full-run", "full")
    cases.append(TetherCase(kind="full", db=url, path=path, cap="read", whole_run=True))
    try:
        import langgraph.checkpoint.sqlite  # noqa: F401

        cases.append(LangGraphCase(workdir / "langgraph.db"))
    except ImportError as exc:
        _SKIPPED["langgraph.sqlite"] = f"not installed ({exc}); run `make bench`"
    try:
        import dbos  # noqa: F401

        cases.append(DBOSCase(workdir / "dbos.sqlite", wal=False))
        cases.append(DBOSCase(workdir / "dbos-wal.sqlite", wal=True))
        # Its own tether companion, so that its ratio compares like with like.
        url, path = sqlite_url("tether-full-read-2", "full")
        companion = TetherCase(kind="full", db=url, path=path, cap="read")
        companion.id = "tether.full.read.phase2"
        companion.title += " (measured beside dbos.sqlite_wal)"
        companion.phase = 2
        cases.append(companion)
    except ImportError as exc:
        _SKIPPED["dbos.sqlite"] = f"not installed ({exc}); run `make bench`"
        _SKIPPED["dbos.sqlite_wal"] = _SKIPPED["dbos.sqlite"]
    return cases


_SKIPPED: dict[str, str] = {}

# -- bars and ratios ----------------------------------------------------------------


@dataclass(kw_only=True)
class Bar:
    id: str
    what: str
    value: float | None
    op: str  # "<", "<=", ">="
    threshold: float
    unit: str
    passed: bool | None = field(init=False)

    def __post_init__(self) -> None:
        if self.value is None:
            self.passed = None
        elif self.op == "<":
            self.passed = self.value < self.threshold
        elif self.op == "<=":
            self.passed = self.value <= self.threshold
        else:
            self.passed = self.value >= self.threshold


def _bars(by_id: dict[str, Case], stats: dict[str, Stats]) -> list[Bar]:
    def median(case_id: str) -> float | None:
        return stats[case_id].median_us if case_id in stats else None

    def ratio(num: float | None, den: float | None) -> float | None:
        return None if num is None or den is None or den == 0 else num / den

    def added(case_id: str) -> float | None:
        # What the call path adds: the case's median less the bare function call's,
        # which is the same handler called through the same timing harness.
        whole, bare_call = median(case_id), median("baseline.function")
        return None if whole is None or bare_call is None else whole - bare_call

    bars: list[Bar] = []
    for cap in ("read", "write"):
        bars.append(
            Bar(
                id=f"memory.{cap}.median",
                what=f"memory:// {cap} step, median added over the bare call",
                value=added(f"tether.memory.{cap}"),
                op="<",
                threshold=10.0,
                unit="µs",
            )
        )
    bare = stats.get("baseline.sqlite.full")
    for cap, most in (("read", 1.0), ("write", 2.0)):
        case_id = f"tether.full.{cap}"
        commits = by_id[case_id].commits_per_call if case_id in by_id else None
        bars.append(
            Bar(
                id=f"full.{cap}.commits",
                what=f"FULL {cap} step, fsync'd commits per call",
                value=commits,
                op="<=",
                threshold=most,
                unit="commits",
            )
        )
        s = stats.get(case_id)
        per = commits or None
        bars.append(
            Bar(
                id=f"full.{cap}.median_per_commit",
                what=f"FULL {cap} step, median per commit / bare FULL insert median",
                value=ratio(
                    s.median_us / per if s and per else None,
                    bare.median_us if bare else None,
                ),
                op="<",
                threshold=1.6,
                unit="x",
            )
        )
        bars.append(
            Bar(
                id=f"full.{cap}.p99_per_commit",
                what=f"FULL {cap} step, p99 per commit / bare FULL insert p99",
                value=ratio(
                    s.p99_us / per if s and per else None, bare.p99_us if bare else None
                ),
                op="<",
                threshold=2.0,
                unit="x",
            )
        )
    for cap in ("read", "write"):
        bars.append(
            Bar(
                id=f"normal.{cap}.median",
                what=f"NORMAL {cap} step, median added over the bare call",
                value=added(f"tether.normal.{cap}"),
                op="<",
                threshold=40.0,
                unit="µs",
            )
        )
    for peer, least, label in (
        ("langgraph.sqlite", 5.0, "LangGraph"),
        ("dbos.sqlite", 10.0, "DBOS (as set up by DBOS)"),
        ("dbos.sqlite_wal", 10.0, "DBOS (file pre-set to WAL)"),
    ):
        bars.append(
            Bar(
                id=f"vs.{peer}",
                what=f"{label} median / tether FULL read step median",
                value=ratio(
                    median(peer), median(_beside(peer, "tether.full.read", stats))
                ),
                op=">=",
                threshold=least,
                unit="x",
            )
        )
    return bars


def _ratios(stats: dict[str, Stats]) -> dict[str, dict[str, float]]:
    """Peer median / tether median, for each durable tether case."""
    out: dict[str, dict[str, float]] = {}
    for peer in ("langgraph.sqlite", "dbos.sqlite", "dbos.sqlite_wal"):
        if peer not in stats:
            continue
        out[peer] = {
            mine: stats[peer].median_us / stats[_beside(peer, mine, stats)].median_us
            for mine in ("tether.full.read", "tether.full.write", "tether.full.run")
            if mine in stats
        }
    return out


def _beside(peer: str, mine: str, stats: dict[str, Stats]) -> str:
    """The tether case measured in the same phase as `peer`, when there is one."""
    if peer == "dbos.sqlite_wal" and f"{mine}.phase2" in stats:
        return f"{mine}.phase2"
    return mine


# -- machine and versions -------------------------------------------------------------


def _timer_overhead_ns() -> float:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(20_000):
        t0 = clock()
        samples.append(clock() - t0)
    return float(statistics.median(samples))


def _mount_of(path: Path) -> dict[str, str]:
    best = {"mount": "?", "fstype": "?", "device": "?"}
    real = str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    length = -1
    for line in lines:
        dev, mnt, fstype, *_ = line.split()
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(
            mnt
        ) > length:
            best, length = {"mount": mnt, "fstype": fstype, "device": dev}, len(mnt)
    return best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _pressure() -> dict[str, float | None]:
    """Linux pressure stall: % of the last 60 s that some task waited on CPU / IO."""
    out: dict[str, float | None] = {}
    for what in ("cpu", "io"):
        try:
            line = Path(f"/proc/pressure/{what}").read_text().splitlines()[0]
            out[f"{what}_some_avg60"] = float(line.split("avg60=")[1].split()[0])
        except (OSError, IndexError, ValueError):
            out[f"{what}_some_avg60"] = None
    return out


def _machine(workdir: Path) -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "memory": mem,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "db_dir": str(workdir),
        "db_filesystem": _mount_of(workdir),
        "loadavg_start": list(os.getloadavg()),
        "pressure_start": _pressure(),
        "timer_overhead_ns": _timer_overhead_ns(),
    }


def _git() -> dict[str, Any]:
    """The commit measured, and whether `src/` differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "src_dirty": bool(git("status", "--porcelain", "--", "src")),
    }


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in (
        "tether",
        "pydantic",
        "pydantic-core",
        "orjson",
        "langgraph",
        "langgraph-checkpoint",
        "langgraph-checkpoint-sqlite",
        "dbos",
        "sqlalchemy",
        "rich",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# -- output ------------------------------------------------------------------------------


def bars_json(bars: Sequence[Bar]) -> dict[str, Any]:
    """Return the bars, and how many passed and missed, for the JSON document."""
    return {
        "bars": [
            {
                "id": b.id,
                "what": b.what,
                "value": b.value,
                "op": b.op,
                "threshold": b.threshold,
                "unit": b.unit,
                "passed": b.passed,
            }
            for b in bars
        ],
        "bars_passed": sum(b.passed is True for b in bars),
        "bars_missed": sum(b.passed is False for b in bars),
    }


def bars_table(bars: Sequence[Mapping[str, Any]], number_format: str) -> Any:
    """Return the bars as a Rich table: value, threshold, pass/MISS and what each is."""
    from rich.table import Table  # imported where printing starts, as in report()

    table = Table(title="bars", title_justify="left")
    for col, just in (
        ("bar", "left"),
        ("value", "right"),
        ("threshold", "right"),
        ("", "left"),
        ("what", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    marks = {
        True: "[green]pass[/green]",
        False: "[red]MISS[/red]",
        None: "[yellow]n/a[/yellow]",
    }
    for b in bars:
        table.add_row(
            b["id"],
            f"{_fmt(b['value'], number_format)} {b['unit']}",
            f"{b['op']} {b['threshold']:g} {b['unit']}",
            marks[b["passed"]],
            b["what"],
        )
    return table


def _fmt(value: float | None, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def _short(storage: dict[str, Any]) -> str:
    if not storage:
        return "none"
    return f"{storage['journal_mode'].upper()}+{str(storage['synchronous']).upper()}"


def _render(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, shutil.get_terminal_size().columns))
    m = doc["machine"]
    console.print(
        f"[bold]tether call path[/bold] ({doc['mode']}, {doc['duration_s']:.0f} s) "
        f"on {m['cpu']}, {m['cpus_usable']} CPUs, Python {m['python']}, SQLite {m['sqlite']}, "
        f"files on {m['db_filesystem']['fstype']} ({m['db_filesystem']['device']})"
    )
    git = doc["git"]
    pressure = m["pressure_end"]
    console.print(
        f"commit {str(git['commit'])[:10]}{' + uncommitted src changes' if git['src_dirty'] else ''}; "
        f"load {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f}; "
        f"CPU/IO pressure (avg60) {pressure['cpu_some_avg60']}% / {pressure['io_some_avg60']}%"
    )
    table = Table(title="per call", title_justify="left")
    for col, just in (
        ("case", "left"),
        ("median µs", "right"),
        ("p99 µs", "right"),
        ("calls/s", "right"),
        ("commits", "right"),
        ("B/event", "right"),
        ("B/step", "right"),
        ("disk B/call", "right"),
        ("n", "right"),
        ("storage", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for case_id, c in doc["cases"].items():
        if "skipped" in c:
            table.add_row(
                case_id,
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                f"skipped: {c['skipped']}",
            )
            continue
        table.add_row(
            case_id,
            _fmt(c["median_us"]),
            _fmt(c["p99_us"]),
            _fmt(c["calls_per_s"], ",.0f"),
            _fmt(c["commits_per_call"], ".2f"),
            _fmt(c["bytes_per_event"], ".0f"),
            _fmt(c["bytes_per_step"], ".0f"),
            _fmt(c["db_growth_bytes_per_call"], ",.0f"),
            f"{c['n']:,}",
            _short(c["storage"]),
        )
    console.print(table)

    ratios = Table(title="peer median / tether median (x faster)", title_justify="left")
    ratios.add_column("peer")
    mine = ("tether.full.read", "tether.full.write", "tether.full.run")
    for col in mine:
        ratios.add_column(col, justify="right")
    for peer, row in doc["ratios"].items():
        ratios.add_row(peer, *(_fmt(row.get(c), ".1f") for c in mine))
    console.print(ratios)

    console.print(bars_table(doc["bars"], ".2f"))
    legends = {
        _short(c["storage"]): c["durability"]
        for c in doc["cases"].values()
        if "storage" in c
    }
    for short, text in legends.items():
        console.print(f"- {short}: {text}")
    for note in doc["notes"]:
        console.print(f"- {note}")
    console.print(f"JSON: {doc['json_path']}")


def _case_doc(case: Case, s: Stats) -> dict[str, Any]:
    return {
        "title": case.title,
        "group": case.group,
        "n": s.n,
        "median_us": s.median_us,
        "p99_us": s.p99_us,
        "p90_us": s.p90_us,
        "mean_us": s.mean_us,
        "min_us": s.min_us,
        "calls_per_s": s.calls_per_s,
        "round_medians_us": s.round_medians_us,
        "commits_per_call": case.commits_per_call,
        "bytes_per_event": case.bytes_per_event,
        "bytes_per_step": case.bytes_per_step,
        "db_growth_bytes_per_call": case.growth_per_call,
        "db_growth_bytes_per_event": case.growth_per_event,
        "storage": case.storage,
        "durability": case.durability(),
        "phase": case.phase,
    }


# -- entry points ----------------------------------------------------------------------


def _workdir(base: str | None) -> Path:
    root = Path(base) if base else RESULTS
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = root / f"_db-{stamp}-{os.getpid()}"
    path.mkdir()
    return path


class _Session:
    """The cases that are open, so that an error still closes every one."""

    def __init__(self) -> None:
        self.opened: list[Case] = []

    def open(self, case: Case) -> None:
        case.open()
        self.opened.append(case)

    def close(self, case: Case) -> None:
        if case in self.opened:
            self.opened.remove(case)
            case.close()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def benchmark(mode: Mode, workdir: Path, out: Path, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    machine = _machine(workdir)
    git = _git()  # before the run: what was imported is what was measured
    rows = _probe_rows(workdir)
    cases = _build(workdir, rows)
    rng = random.Random(seed)
    session = _Session()
    try:
        for phase in sorted({c.phase for c in cases}):
            together = [c for c in cases if c.phase == phase]
            for case in together:
                session.open(case)
            _say(
                f"phase {phase}: {len(together)} cases interleaved over "
                f"{mode.rounds} rounds"
            )
            _measure(together, mode, rng, _say)
            for case in together:
                session.close(case)
    finally:
        for case in list(session.opened):
            session.close(case)
    stats = {c.id: _stats(c.samples, c.rounds) for c in cases if c.samples}
    by_id = {c.id: c for c in cases}
    docs: dict[str, Any] = {
        c.id: _case_doc(c, stats[c.id]) for c in cases if c.id in stats
    }
    for case_id, why in _SKIPPED.items():
        docs[case_id] = {"skipped": why}
    bars = _bars(by_id, stats)
    machine["loadavg_end"] = list(os.getloadavg())
    machine["pressure_end"] = _pressure()
    notes = [
        "median and p99 are per call, timed with perf_counter_ns around each call "
        f"(timer overhead ~{machine['timer_overhead_ns']:.0f} ns, not subtracted); "
        "calls/s = 1 / mean",
        "commits = COMMIT statements per call, counted with sqlite3 trace callbacks; "
        "with synchronous=FULL each is one fsync of the WAL (or journal + file for DBOS's rollback journal)",
        "B/event = canonical body + 32-byte hash; B/step = all events of one step; "
        "disk B/call = file growth after a WAL checkpoint, no VACUUM",
        "tether.full.run is a whole run (open, one read step, close: 3 commits), "
        "the unit a DBOS workflow or a LangGraph invoke is",
    ]
    if machine["db_filesystem"]["fstype"] in ("tmpfs", "ramfs", "overlay"):
        notes.append(
            f"the database files are on {machine['db_filesystem']['fstype']}: fsync may be "
            "free there; pass --dir on a real disk"
        )
    doc: dict[str, Any] = {
        "format": FORMAT,
        "benchmark": "call_path",
        "mode": mode.name,
        "seed": seed,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": time.perf_counter() - started,
        "machine": machine,
        "versions": _versions(),
        "git": git,
        "cases": docs,
        "ratios": _ratios(stats),
        **bars_json(bars),
        "notes": notes,
        "json_path": str(out),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return doc


def profile(case_id: str, calls: int, workdir: Path, out_dir: Path) -> None:
    """Run one case under cProfile and print where its time goes."""
    cases = {c.id: c for c in _build(workdir, _probe_rows(workdir))}
    if case_id not in cases:
        raise SystemExit(
            f"unknown case {case_id!r}; choose one of: {', '.join(sorted(cases))}"
        )
    case = cases[case_id]
    case.open()
    try:
        _warm(case, QUICK)
        case.start_batch()
        prof = cProfile.Profile()
        try:
            prof.enable()
            for _ in range(calls):
                case.call()
            prof.disable()
        finally:
            case.stop_batch()
    finally:
        case.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    dump = out_dir / f"profile-{case_id}.prof"
    prof.dump_stats(dump)
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        ps = pstats.Stats(prof, stream=text).strip_dirs().sort_stats(order)
        ps.print_stats(30)
        print(f"== {case_id}, {calls} calls, by {order} ==")
        print(text.getvalue())
    print(f"profile written to {dump} (open with `python -m pstats` or snakeviz)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick", action="store_true", help="a ~30 s run with fewer samples"
    )
    parser.add_argument(
        "--dir",
        help="where the database files go (default: benchmarks/results/); fsync cost depends on this disk",
    )
    parser.add_argument(
        "--out", default=str(RESULTS / "call_path.json"), help="the JSON file to write"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database files")
    parser.add_argument("--seed", type=int, default=1, help="seed for the round order")
    parser.add_argument(
        "--profile", metavar="CASE", help="profile one case with cProfile instead"
    )
    parser.add_argument(
        "--profile-calls", type=int, default=20_000, help="calls to profile"
    )
    args = parser.parse_args(argv)
    workdir = _workdir(args.dir)
    try:
        if args.profile:
            profile(args.profile, args.profile_calls, workdir, RESULTS)
            return 0
        doc = benchmark(
            QUICK if args.quick else FULL, workdir, Path(args.out), args.seed
        )
        _render(doc)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
