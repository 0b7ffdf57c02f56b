"""`tether worker` names a run it cannot resume once, and forgets it once it is no longer parked."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel
from rich.console import Console

import tether
from tether.cli._worker import _resume_ready
from tether.testing import FakeClock

CONFIG = """
rules:
  - {id: big, match: {capability: pay.refund}, when: "args.cents > 100",
     decision: require_approval, reason: big refunds need finance, approvers: [finance]}
approvers: {alice: [finance]}
"""


class Cents(BaseModel):
    cents: int


@tether.capability("pay.refund", effect="write", idempotency="keyed")
def refund(args: Cents) -> Cents:
    return args


class Hosts:
    """Two apps on one SQLite file: the worker's, and another host's with planners it lacks."""

    def __init__(self, tmp_path: Path) -> None:
        config = tmp_path / "tether.yaml"
        config.write_text(CONFIG)
        db = f"sqlite:///{tmp_path / 't.db'}"
        clock = FakeClock(tick=timedelta(milliseconds=1))
        self.worker = tether.Tether(db=db, config=config, clock=clock, env={})
        self.other = tether.Tether(db=db, config=config, clock=clock, env={})
        for app in (self.worker, self.other):
            app.register(refund)
        self.said = io.StringIO()
        self.console = Console(file=self.said, width=300, highlight=False)

    def park(self, planner: str, cents: int, *, on: tether.Tether) -> str:
        """Start a run of a one-step planner registered `on` an app; it parks for approval."""
        on.register_planner(
            planner, tether.ScriptedPlanner([("pay.refund", {"cents": cents})])
        )
        return on.start("refund", planner=planner, principal=tether.Principal("bot")).id

    def approve_all(self) -> None:
        """Approve every pending request."""
        for a in self.other.approvals(status="pending", limit=1000):
            self.other.approve(a.id, by="alice")

    def close(self) -> None:
        self.worker.close()
        self.other.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """The worker's app and another host's, sharing one database."""
    h = Hosts(tmp_path)
    yield h
    h.close()


def test_a_run_given_up_on_is_said_once_and_forgotten_once_resumed_elsewhere(
    hosts: Hosts,
) -> None:
    """A run the worker cannot resume is named once while parked, and leaves its memory once another host resumes it."""
    elsewhere = [hosts.park(f"elsewhere{n}", 500 + n, on=hosts.other) for n in range(3)]
    hosts.approve_all()
    given_up: set[str] = set()

    _resume_ready(hosts.worker, hosts.console, given_up)
    _resume_ready(hosts.worker, hosts.console, given_up)
    while_parked = set(given_up)
    for run_id in elsewhere[:2]:
        hosts.other.resume(run_id)
    _resume_ready(hosts.worker, hosts.console, given_up)

    said = hosts.said.getvalue()
    assert while_parked == set(elsewhere)
    assert [said.count(f"cannot resume {run_id}") for run_id in elsewhere] == [1, 1, 1]
    assert given_up == {elsewhere[2]}


def test_given_up_runs_do_not_pile_up_as_other_hosts_resume_them(
    hosts: Hosts,
) -> None:
    """Over many rounds of runs resumed elsewhere, the worker remembers only those still parked."""
    given_up: set[str] = set()
    sizes = []

    for round_ in range(5):
        runs = [
            hosts.park(f"r{round_}x{n}", 500 + 10 * round_ + n, on=hosts.other)
            for n in range(4)
        ]
        hosts.approve_all()
        _resume_ready(hosts.worker, hosts.console, given_up)
        sizes.append(len(given_up))
        for run_id in runs:
            hosts.other.resume(run_id)

    _resume_ready(hosts.worker, hosts.console, given_up)
    assert sizes == [4] * 5
    assert given_up == set()


def test_a_worker_resumes_its_own_run_behind_a_full_batch_of_runs_it_cannot(
    hosts: Hosts,
) -> None:
    """More ready runs than a look asks for, all for planners elsewhere, do not hide a run the worker can resume."""
    for n in range(101):
        hosts.park(f"elsewhere{n}", 500 + n, on=hosts.other)
    ours = hosts.park("ours", 2000, on=hosts.worker)
    hosts.approve_all()
    given_up: set[str] = set()

    while _resume_ready(hosts.worker, hosts.console, given_up):
        pass

    assert f"resumed {ours} succeeded" in " ".join(hosts.said.getvalue().split())
    assert len(given_up) == 101


class _Broken:
    """A planner that raises once a person has answered (its second turn)."""

    def __init__(self) -> None:
        self.turns = 0

    def propose(self, state: tether.agent.PlannerInput) -> tether.agent.Proposal:
        self.turns += 1
        if self.turns > 1:
            raise RuntimeError("model API: 500 (prompt held sk-live-ZZZZ)")
        return tether.agent.Proposal(
            steps=(
                tether.agent.ProposedStep(capability="pay.refund", args={"cents": 900}),
            )
        )


def test_a_planner_that_raises_ends_its_run_failed_and_the_worker_goes_on(
    hosts: Hosts,
) -> None:
    """The failed run records `planner_failed` (the exception's type, not its
    message); the run behind it is resumed in the same look."""
    hosts.worker.register_planner("broken", _Broken())
    broken = hosts.worker.start(
        "refund", planner="broken", principal=tether.Principal("bot")
    )
    fine = hosts.park("fine", 700, on=hosts.worker)
    hosts.approve_all()

    dealt_with = _resume_ready(hosts.worker, hosts.console, set())
    said = hosts.said.getvalue()

    assert dealt_with == 2
    failed = hosts.worker.store.get_run(broken.id)
    assert (failed.status, failed.error_code) == ("failed", "planner_failed")
    assert hosts.worker.store.get_run(fine).status == "succeeded"
    assert f"resumed {fine} succeeded" in " ".join(said.split())
    record = b"".join(e.body for e in hosts.worker.store.events(broken.id))
    assert b"RuntimeError" in record
    assert b"sk-live" not in record
