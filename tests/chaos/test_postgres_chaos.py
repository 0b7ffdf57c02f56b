"""No overspend while the server cuts the workers' connections (RELIABILITY C.20, with A.9's invariants).

Eight processes spend one budget on one PostgreSQL schema while a thread here
terminates their server sessions (`pg_terminate_backend`) at random intervals;
and, as C.20 states it, three groups of processes standing in for three hosts
(each group's connections tagged with an `application_name` of its own) spend
one budget in calls of random cost that settle below and above their
estimate (C.19's workload), while every group's sessions are cut.

A caller may see `StoreError` (the workers count them), but the budget never
overspends: successes stay within it (with random costs: within it plus the
overruns recorded at settle), what the store holds equals what the records
say (used: the sum of recorded executed costs; held: the reservations
recorded without a result), every refusal names the budget and what was left,
and what the workers saw succeed is what the records say executed (beyond it,
only results a worker was told it could not be sure of). Once the chaos
stops, every run writes again: each result a worker was told is kept lands,
each run ends, and the workers' view and the records are equal.

Two paces: every 80-300 ms (in CI, and for the three hosts in the soak), every
5-40 ms in the eight processes' soak. At the dense pace some writes commit
while both their answer and the store's look at whether they landed are cut:
the step is told the store failed, and the run's next write finds the write
landed and takes it up (the last test here places that loss exactly).
"""

from __future__ import annotations

import random
import secrets
import threading
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

import tether
from tether.store.postgres import PostgresStore

from ._backends import postgres_backend
from ._limit_checks import (
    clear_of_midnight,
    events,
    fire,
    new_seed,
    row,
    settlement,
    setup,
    steps,
)
from ._limit_workers import make_spend, spawner
from ._workers import PRINCIPAL

pytestmark = [pytest.mark.chaos, pytest.mark.postgres]


class Chaos:
    """A thread that terminates every server session tagged with one of `tags`, at random intervals."""

    def __init__(
        self,
        admin_url: str,
        tags: Sequence[str],
        rng: random.Random,
        pace: tuple[float, float],
    ) -> None:
        self.admin_url, self.tags, self.rng, self.pace = admin_url, tags, rng, pace
        self.terminated: Counter[str] = Counter()
        """Sessions terminated, by tag."""
        self.sweeps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                while not self._stop.wait(self.rng.uniform(*self.pace)):
                    rows = conn.execute(
                        "SELECT application_name, pg_terminate_backend(pid) "
                        "FROM pg_stat_activity "
                        "WHERE datname = current_database() "
                        "AND application_name = ANY(%s) AND pid <> pg_backend_pid()",
                        (list(self.tags),),
                    ).fetchall()
                    self.terminated.update(tag for tag, ok in rows if ok)
                    self.sweeps += 1
        except BaseException as exc:  # reported by __exit__, in the test's thread
            self._error = exc

    def __enter__(self) -> Chaos:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert self._error is None, f"the chaos thread failed: {self._error!r}"


def spend_through_chaos(
    tmp_path: Path,
    postgres_database: str,
    url: str,
    *,
    pace: tuple[float, float],
    calls: int,
    budget: int,
    groups: int = 1,
    processes: int = 8,
    random_costs: bool = False,
) -> None:
    """Spend `budget` from `groups` of `processes` processes of `calls` calls while `Chaos` at `pace` cuts their sessions; check it all.

    Each group stands in for a host: its processes' connections carry a tag
    of its own (`application_name`), and the chaos cuts every group's. All
    spend one budget on the schema at `url`. Calls cost 1, or with
    `random_costs` are estimated at 1..10 and settle up to 3 below or above
    (each worker's costs drawn from a seed of its own, drawn from the test's).
    """
    seed = new_seed()
    prefix = f"tether-chaos-{secrets.token_hex(4)}"
    tags = [prefix] if groups == 1 else [f"{prefix}-{n}" for n in range(groups)]
    # The parent's own connections are untagged: out of the chaos's reach.
    backend = postgres_backend(url)
    _, config = setup(
        backend,
        tmp_path,
        f"  - {{id: budget, kind: budget, per: day, amount: {budget}}}\n",
    )
    clear_of_midnight()
    draw = random.Random(f"workers-{seed}")
    runs = [
        [
            "endure",
            *("--db", backend.tagged(tag).db),
            *("--config", str(config), "--calls", str(calls)),
            *(
                ("--random", "--seed", str(draw.randrange(2**32)))
                if random_costs
                else ()
            ),
        ]
        for tag in tags
        for _ in range(processes)
    ]
    chaos = Chaos(postgres_database, tags, random.Random(seed), pace)

    with spawner(tmp_path, backend.env) as spawn:
        run_ids, tally = fire(spawn, tmp_path, runs, during=chaos)
    with backend.open(config) as app:
        executed = events(app, run_ids, "executed")
        refused = events(app, run_ids, "limit_refused")
        by_step = [s for run_id in run_ids for s in steps(app, run_id)]
        final = row(app, "budget")
        ended = Counter(app.store.get_run(run_id).status for run_id in run_ids)

    everyone = groups * processes
    # Each executed step's settlement: at its reservation, or as `limit_settled` says.
    ran = [s for s in by_step if "executed" in s]
    lines = [x for s in ran if (x := settlement(s, "budget")) is not None]
    spent = sum(Decimal(e["cost"]) for e in executed)
    over = sorted(
        max(Decimal(x["actual"]) - Decimal(x["reserved"]), Decimal(0)) for x in lines
    )
    # At the last admission everything settled was counted exactly, so only
    # the calls then in flight (one per process at most: a kept result is
    # written before its run reserves again) can overrun.
    allowance = budget + sum(over[-everyone:])
    why = (
        f"seed={seed} groups={groups}x{processes} calls={calls} budget={budget} "
        f"spent={spent} overruns={sum(over)} "
        f"terminated={dict(sorted(chaos.terminated.items()))} "
        f"tally={dict(sorted(tally.items()))}"
    )
    print(why, dict(ended))
    succeeded = tally["executed"] + tally["late"]
    # A reservation whose step recorded no result is still held.
    open_holds = [
        Decimal(line["amount"])
        for s in by_step
        if "limit_reserved" in s and "executed" not in s and "failed" not in s
        for line in s["limit_reserved"]["limits"]
    ]
    assert all(chaos.terminated[tag] > 0 for tag in tags), why  # every host was cut
    assert tally["cut"] > 0, why  # operations lost their connection mid-flight
    # Never overspent beyond the overruns the record shows at settle; the
    # store holds exactly what the record says.
    assert spent <= allowance, why
    assert final.used == spent, why
    assert (final.held, final.holds) == (sum(open_holds), len(open_holds)), why
    assert final.used + final.held <= allowance, why
    # Each settlement is the call's own estimate and report: an overrun is
    # recorded as one.
    assert len(lines) == len(ran) == len(executed), why
    for step, line in zip(ran, lines, strict=True):
        assert line["reserved"] == step["intent"]["cost_estimate"], why
        assert line["actual"] == step["executed"]["cost"], why
        assert int(line["actual"]) == step["executed"]["output"]["actual"], why
    assert refused, why  # the budget ran out: the checks above had room to fail
    if random_costs:  # and calls settled above and below
        assert any(Decimal(x["actual"]) > Decimal(x["reserved"]) for x in lines), why
        assert any(Decimal(x["actual"]) < Decimal(x["reserved"]) for x in lines), why
    # Every refusal names the budget and what was left, and saw no overspend.
    for e in refused:
        left = max(
            Decimal(e["cap"]) - Decimal(e["used"]) - Decimal(e["held"]), Decimal(0)
        )
        assert e["limit"] == "budget", why
        assert (Decimal(e["cap"]), Decimal(e["left"])) == (Decimal(budget), left), why
        assert Decimal(e["requested"]) > left, why
        assert Decimal(e["used"]) <= allowance, why
    # What the workers saw succeed (or refused) is recorded so; what else is
    # recorded executed is a result a worker still keeps, unsure it landed.
    assert tally["handled"] == tally["executed"] + tally["kept"], why
    assert succeeded <= len(executed) <= succeeded + tally["unknown"], why
    assert tally["cost"] <= spent <= tally["cost"] + tally["cost:kept"], why
    assert tally["limit_exceeded:budget"] <= len(refused), why
    # Once the chaos stopped, every kept result landed and every run ended.
    ends = (
        (tally["unknown"], tally["kept"]) == (0, tally["late"]),
        spent == tally["cost"] + tally["cost:kept"],
        tally["limit_exceeded:budget"] == len(refused),
        ended == {"succeeded": everyone},
        open_holds == [],  # no reservation outlived its step
    )
    assert all(ends), f"{why} ends={ends}"


@pytest.mark.timeout(180)
def test_eight_processes_never_overspend_a_budget_while_their_connections_are_cut(
    tmp_path: Path, postgres_database: str, postgres_url: str
) -> None:
    """240 calls of cost 1 against 100, every session cut every 80-300 ms: successes <= 100, the store equals the record, the workers' view equals the record, and after the chaos every run ends."""
    spend_through_chaos(
        tmp_path,
        postgres_database,
        postgres_url,
        pace=(0.08, 0.3),
        calls=30,
        budget=100,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eight_processes_never_overspend_while_retries_lose_their_connection_too(
    tmp_path: Path, postgres_database: str, postgres_url: str
) -> None:
    """640 calls against 40 with every session cut every 5-40 ms, so that retries lose their connections too.

    At this pace most calls raise `StoreError` (about 70 of 640 succeeded, in
    runs on the 2-core machine): a budget of 40 still runs out, so the
    overspend checks have something to check.
    """
    spend_through_chaos(
        tmp_path,
        postgres_database,
        postgres_url,
        pace=(0.005, 0.04),
        calls=80,
        budget=40,
    )


@pytest.mark.timeout(180)
def test_three_hosts_of_random_costs_never_overspend_beyond_recorded_overruns_while_cut(
    tmp_path: Path, postgres_database: str, postgres_url: str
) -> None:
    """3 groups (hosts) of 4 processes x 25 calls of random cost 1..10, settling up to 3 below or above, against 500, every host's sessions cut every 80-300 ms: spending stays within the budget plus recorded overruns, and store, record and workers agree."""
    spend_through_chaos(
        tmp_path,
        postgres_database,
        postgres_url,
        pace=(0.08, 0.3),
        calls=25,
        budget=500,
        groups=3,
        processes=4,
        random_costs=True,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_hosts_of_eight_processes_never_overspend_random_costs_while_cut(
    tmp_path: Path, postgres_database: str, postgres_url: str
) -> None:
    """RELIABILITY C.20 at full size: 3 groups of 8 processes x 40 calls of random cost 1..10 against 1000, every session cut every 80-300 ms."""
    spend_through_chaos(
        tmp_path,
        postgres_database,
        postgres_url,
        pace=(0.08, 0.3),
        calls=40,
        budget=1000,
        groups=3,
        processes=8,
        random_costs=True,
    )


# -- failpoints: a write commits, and the connection goes before its answer -----------


@pytest.fixture
def lossy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the store's next write tries lose their connection, as the returned list says.

    Each entry is one try of a write: `before` (the connection goes before
    anything is sent), `after` (the write commits, then the connection goes
    before the answer comes), or `after-unseen` (as `after`, and the store's
    look at whether it landed cannot reach the server either). A failpoint,
    like `test_resume_kill.py`'s `DIE_AT`: real server, real transactions,
    the losses placed exactly.
    """
    plan: list[str] = []
    blind: list[bool] = []
    commit, get_run = PostgresStore._commit, PostgresStore.get_run

    def lossy_commit(self: PostgresStore, conn: Any, attempt: Any) -> Any:
        what = plan.pop(0) if plan else None
        if what == "before":
            raise psycopg.OperationalError("failpoint: lost before the write")
        committed = commit(self, conn, attempt)
        if what in ("after", "after-unseen"):
            blind.append(what == "after-unseen")
            raise psycopg.OperationalError("failpoint: lost after COMMIT")
        return committed

    def blind_get_run(self: PostgresStore, run_id: str) -> Any:
        if blind and blind.pop():
            raise tether.StoreError("failpoint: the read lost its connection twice")
        return get_run(self, run_id)

    monkeypatch.setattr(PostgresStore, "_commit", lossy_commit)
    monkeypatch.setattr(PostgresStore, "get_run", blind_get_run)
    return plan


def three_steps(
    url: str, lossy: list[str], plan: list[str]
) -> tuple[list[object], list[dict[str, Any]]]:
    """Take three steps; the second's intent write tries go as `plan` says.

    Returns:
        What each step gave, the run's end and its record's verdict; and the
        second step's recorded events.
    """
    app = tether.Tether(db=url, env={"TETHER_RECORD_KEY": "k" * 32})
    app.register(make_spend())
    seen: list[object] = []
    with app:
        with app.run(principal=PRINCIPAL, request="lossy") as run:
            for n in range(3):
                lossy[:] = plan if n == 1 else []
                try:
                    seen.append(
                        run.step("meter.spend", {"cost": 1, "actual": 1}).status
                    )
                except tether.StoreError as exc:
                    seen.append(type(exc))
        seen.append(app.store.get_run(run.id).status)
        seen.append(app.verify(run.id).ok)
        second = [e.data() for e in app.store.events(run.id) if e.data()["step"] == 2]
    return seen, second


def test_a_write_whose_retry_lands_as_its_connection_drops_is_not_reported_lost(
    postgres_url: str, lossy: list[str]
) -> None:
    """The second step's intent loses its connection before the write, and its retry after COMMIT: every step runs, and the run ends."""
    seen, _ = three_steps(postgres_url, lossy, ["before", "after"])

    assert seen == [tether.OutcomeStatus.EXECUTED] * 3 + ["succeeded", True]


def test_a_write_that_landed_unseen_leaves_the_run_able_to_write(
    postgres_url: str, lossy: list[str]
) -> None:
    """The second step's intent commits, and neither its answer nor a look at the run gets back: the step fails unsure, and the third step and the run's end are written."""
    seen, second = three_steps(postgres_url, lossy, ["after-unseen"])

    assert seen == [
        tether.OutcomeStatus.EXECUTED,
        tether.StoreError,
        tether.OutcomeStatus.EXECUTED,
        "succeeded",
        True,
    ]
    # The intent landed; the step never ran: the record closes it as failed.
    assert [e["kind"] for e in second] == ["validated", "decided", "intent", "failed"]
    assert (second[-1]["stage"], second[-1]["error_code"]) == ("intent", "store_error")


APPROVE_SPEND = """\
rules:
  - {id: spend, match: {capability: meter.spend}, decision: require_approval,
     reason: spending}
approvers:
  alice: [finance]
"""


def test_a_grant_spent_by_an_intent_that_landed_unseen_is_given_back(
    postgres_url: str, lossy: list[str], tmp_path: Path
) -> None:
    """An approved step's intent commits, and neither its answer nor a look gets back: the step never ran, so its next try runs under the same grant."""
    config = tmp_path / "tether.yaml"
    config.write_text(APPROVE_SPEND)
    calls: list[int] = []
    app = tether.Tether(db=postgres_url, config=config, env={})
    app.register(make_spend(on_call=lambda: calls.append(1)))
    args = {"cost": 1, "actual": 1}
    with app, app.run(principal=PRINCIPAL, request="approved spend") as run:
        asked = run.step("meter.spend", args)
        assert isinstance(asked.error, tether.ApprovalRequired)
        request_id = asked.error.approval_id
        assert request_id is not None
        app.approve(request_id, by="alice")
        # The decision moved the run's head: the first try meets it and is
        # made again on top of it, and that one's answer is lost.
        lossy[:] = ["head moved", "after-unseen"]
        with pytest.raises(tether.StoreError):
            run.step("meter.spend", args)
        assert calls == []
        again = run.step("meter.spend", args)

        assert again.status is tether.OutcomeStatus.EXECUTED, again.error
        assert calls == [1]
        assert app.approval(request_id).status.value == "used"
        assert len(app.store.list_approvals()) == 1  # nobody was asked twice
        lost = [e.data() for e in app.store.events(run.id) if e.data()["step"] == 2]
        assert [e["kind"] for e in lost] == [
            "validated",
            "decided",
            "approval_used",
            "intent",
            "failed",
        ]
        assert app.verify(run.id).ok
