"""A history check of budget operations under kills (RELIABILITY C.24).

Sixteen clients (4 processes x 4 threads on SQLite, 8 x 2 on PostgreSQL)
spend against one daily budget and read its counter, each logging every
operation's invoke and ending (`_history_workers.py`), while the parent
SIGKILLs 2 or 3 processes at random moments and starts replacements. The
operations a kill left open are `info`: maybe applied. Once every client is
done and every hold has lapsed, the parent reads the final counter and hands
the whole history to a counter-model checker (`_history.py`, Elle's approach in
Python): no overspend, each read within what the operations around it allow,
reads monotonic, and a final counter that the ok spends plus at most one of
0, cost or actual per info spend explain. The records cross-check it: the
settlements recorded in every run sum to the final counter, each ok or fail
spend's step ended as its client saw, and what the records say each info
spend did explains the counter too.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

import tether

from ._backends import Backend
from ._history import Event, History, Verdict, check, parse
from ._history_workers import BUDGET, HistoryWorker, spawner
from ._limit_checks import (
    clear_of_midnight,
    events,
    new_seed,
    settled,
    settlement,
    setup,
    steps,
)
from ._workers import READY, RESULT, START_S

pytestmark = pytest.mark.chaos

CLIENTS = 16
READS = 0.25
"""The share of a client's operations that read the counter."""
TTL_S = 3
"""The budget's `ttl`: a killed client's reservation lapses (and counts as spent) after it."""
MEAN_ACTUAL = 4
"""About what a spend settles at on average (cost 1..10, actual up to 3 below)."""
FINISH_S = 120.0
"""How long the clients get to finish, kills and restarts included."""
EXPECTED_TALLY = {"read:ok", "spend:ok", f"spend:fail:limit_exceeded:{BUDGET}"}
"""What a live client may see: nothing raised, no refusal but the budget's."""


@pytest.fixture
def clients(tmp_path: Path, backend: Backend) -> Iterator[Callable[..., HistoryWorker]]:
    """Start client processes in `tmp_path` on `backend`; any still running at teardown are killed."""
    with spawner(tmp_path, backend.env) as start:
        yield start


@dataclass(frozen=True)
class Seen:
    """What one history run produced, for the checks."""

    events: list[Event]
    history: History
    verdict: Verdict
    amount: Decimal
    final: tether.store.LimitRow
    killed: list[str]
    tally: Counter[str]
    summary: str


def lines_in(path: Path) -> int:
    """Return how many whole lines a history file holds so far."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def make_history(
    spawn: Callable[..., HistoryWorker],
    tmp_path: Path,
    backend: Backend,
    *,
    ops: int,
) -> Seen:
    """Run the clients under kills, wait out every hold, and check the history."""
    seed = new_seed()
    rng = random.Random(seed)
    began = time.monotonic()
    processes = backend.processes
    threads = CLIENTS // processes
    expected = CLIENTS * ops * (1 - READS) * MEAN_ACTUAL
    amount = rng.randint(int(0.5 * expected), int(0.7 * expected))
    db, config = setup(
        backend,
        tmp_path,
        f"  - {{id: {BUDGET}, kind: budget, per: day, amount: {amount}, ttl: {TTL_S}s}}\n",
    )
    clear_of_midnight()
    logs, go = tmp_path / "history", tmp_path / "go"
    logs.mkdir()

    def start(slot: int, incarnation: int) -> tuple[str, HistoryWorker]:
        name = f"p{slot}.{incarnation}"
        worker = spawn(
            "clients",
            *("--db", db, "--config", str(config), "--go", str(go)),
            *("--history", str(logs / f"{name}.jsonl"), "--process", name),
            *("--threads", str(threads), "--ops", str(ops)),
            *("--reads", str(READS), "--seed", str(rng.randrange(2**31))),
        )
        return name, worker

    live = {slot: start(slot, 0) for slot in range(processes)}
    started_by = time.monotonic() + START_S
    for _, worker in live.values():
        worker.expect(READY, started_by)
    # Each kill waits until its victim has written a random share of its
    # lines, so it lands mid-operation whatever the machine's speed.
    plan = sorted(
        (
            (rng.uniform(0.05, 0.6), rng.randrange(processes))
            for _ in range(rng.randint(2, 3))
        ),
    )
    go.touch()
    deadline = time.monotonic() + FINISH_S
    killed: list[str] = []
    for share, slot in plan:
        name, worker = live[slot]
        due = share * 2 * threads * ops
        while lines_in(logs / f"{name}.jsonl") < due and worker.proc.poll() is None:
            assert time.monotonic() < deadline, f"{name} stalled before its kill"
            time.sleep(0.002)
        if worker.proc.poll() is None:
            worker.kill()
            killed.append(name)
            live[slot] = start(slot, int(name.split(".")[1]) + 1)
    tally: Counter[str] = Counter()
    for _, worker in live.values():
        tally.update(json.loads(worker.expect(RESULT, deadline))["tally"])
        assert worker.wait(deadline) == 0

    app = backend.open(config)
    # The killed clients' reservations lapse after the ttl; then the counter is final.
    lapsed_by = time.monotonic() + TTL_S + 10
    while (final := budget_row(app)).holds:
        assert time.monotonic() < lapsed_by, f"holds never lapsed: {final}"
        time.sleep(0.05)
    found = [
        e
        for path in sorted(logs.iterdir())
        for e in parse(path.read_text(), source=path.name)
    ]
    history = History.of(found, crashed=killed)
    run_ids = sorted({op.run for op in history.spends() if op.run is not None})
    recorded = sum(
        (Decimal(line["actual"]) for line in settled(app, run_ids, BUDGET)), Decimal(0)
    )
    executed = events(app, run_ids, "executed")
    by_record, wrong = reconcile(app, history, found)
    app.close()
    verdict = check(history, amount=Decimal(amount), final_used=final.used)

    spends = Counter(op.type for op in history.spends())
    applied = ", ".join(f"{op_id}={how} {n}" for op_id, how, n in verdict.applied)
    ended = Counter(by_record.values())
    summary = (
        f"C.24 {backend.name}: seed={seed}, {CLIENTS} clients ({processes}x{threads}), "
        f"{len(history.ops)} ops, {verdict.summary()}; {len(killed)} kills "
        f"({', '.join(killed)}); final used {final.used} of {amount} "
        f"(recorded {recorded}); info applied: {applied or 'none'} (records: "
        f"{ended['actual']} at actual, {ended['cost']} at cost, {ended['none']} not); "
        f"{time.monotonic() - began:.1f} s"
    )
    assert recorded == final.used, summary  # the store's counter is the record's
    assert wrong == [], wrong
    # What the records say each info spend did explains the counter too.
    from_record = sum(
        (
            {"none": Decimal(0), "cost": op.cost, "actual": op.actual}[by_record[op.id]]
            for op in history.spends()
            if op.type == "info"
        ),
        Decimal(0),
    )
    ok_sum = sum((op.actual for op in history.spends() if op.type == "ok"), Decimal(0))
    assert ok_sum + from_record == final.used, summary
    assert spends["ok"] <= len(executed) <= spends["ok"] + spends["info"], summary
    return Seen(
        events=found,
        history=history,
        verdict=verdict,
        amount=Decimal(amount),
        final=final,
        killed=killed,
        tally=tally,
        summary=summary,
    )


def reconcile(
    app: tether.Tether, history: History, found: list[Event]
) -> tuple[dict[str, str], list[str]]:
    """Match each spend with its step in the record: the k-th spend of a client is its run's k-th step.

    Returns:
        How the record says each info spend ended (`none`: no step, or refused;
        `cost`: reserved, then lapsed; `actual`: executed), and every ok or
        fail spend whose step says otherwise.
    """
    ops = {op.id: op for op in history.spends()}
    by_client: dict[tuple[str, int], list[Event]] = {}
    for e in found:
        if e.type == "invoke" and e.f == "spend":
            by_client.setdefault((e.process, e.thread), []).append(e)
    info: dict[str, str] = {}
    wrong: list[str] = []
    for invokes in by_client.values():
        invokes.sort(key=lambda e: e.op)
        run_id = ops[invokes[0].op_id].run
        assert run_id is not None
        taken = steps(app, run_id)
        assert len(taken) <= len(invokes), (run_id, len(taken), len(invokes))
        for k, e in enumerate(invokes):
            op = ops[e.op_id]
            step = taken[k] if k < len(taken) else {}
            line = settlement(step, BUDGET) if step else None
            if "executed" in step:
                ended = "actual"
                charged = None if line is None else Decimal(line["actual"])
                if charged != op.actual:
                    wrong.append(f"{op.describe()}: its step settled {charged}")
            elif line is not None:
                ended = "cost"  # reserved, never settled: the hold lapsed as spent
            else:
                ended = "none"
            if op.type == "info":
                info[op.id] = ended
            elif (op.type == "ok") != (ended == "actual") or (
                op.type == "fail" and "limit_refused" not in step
            ):
                wrong.append(f"{op.describe()}: its step ended {sorted(step)}")
    return info, wrong


def budget_row(app: tether.Tether) -> tether.store.LimitRow:
    """Return the budget's one counter now (a global scope, one day window)."""
    rows = [r for r in app.store.limit_rows(app.clock.now()) if r.limit_id == BUDGET]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize(
    "ops",
    [
        pytest.param(100, id="bounded"),
        pytest.param(300, id="3x", marks=[pytest.mark.slow, pytest.mark.timeout(300)]),
    ],
)
def test_sixteen_clients_under_kills_leave_a_history_one_budget_counter_explains(
    clients: Callable[..., HistoryWorker],
    tmp_path: Path,
    backend: Backend,
    capsys: pytest.CaptureFixture[str],
    ops: int,
) -> None:
    """Sixteen clients spend and read under 2-3 SIGKILLs: the counter-model checker finds the history valid, counting each info spend as applied at most once, and the records sum to the final counter."""
    seen = make_history(clients, tmp_path, backend, ops=ops)
    with capsys.disabled():
        print(f"\n{seen.summary}")

    seen.verdict.raise_for_problems()
    assert seen.verdict.valid
    assert len(seen.killed) >= 2, seen.summary
    assert set(seen.tally) <= EXPECTED_TALLY, seen.tally
    assert seen.verdict.counts.get("spend:ok", 0) > 0, seen.summary
    assert seen.verdict.counts.get("spend:fail", 0) > 0, (
        seen.summary
    )  # the budget ran out
    assert sum(op.type == "info" for op in seen.history.ops) >= 1, seen.summary
    assert (seen.final.held, seen.final.holds) == (Decimal(0), 0)
    windows = {
        e.value.get("window")
        for e in seen.events
        if e.f == "read" and e.type == "ok" and e.value and e.value.get("window")
    }
    assert len(windows) <= 1, f"the day window turned mid-test: {windows}"
    # The same history, one unit past what it can explain, is rejected: the
    # checker could have failed on this data.
    spends, reads = seen.history.spends(), seen.history.reads()
    most = seen.final.used + sum((op.most for op in spends if op.type == "info"), 0)
    beyond = check(seen.history, amount=seen.amount, final_used=most + 1)
    peak = max(r.used + r.held for r in reads)
    tighter = check(seen.history, amount=peak - 1, final_used=seen.final.used)
    assert any(p.startswith("final counter unexplained") for p in beyond.problems)
    assert any(p.startswith("overspend") for p in tighter.problems)
