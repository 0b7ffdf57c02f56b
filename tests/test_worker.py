"""Approval lifecycle across processes: the agent parks and exits, a person approves, a worker resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether.testing import FakeClock


class Cents(BaseModel):
    cents: int


CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")

AGENT = textwrap.dedent(
    """
    import os
    from pathlib import Path
    from pydantic import BaseModel
    import tether

    HERE = Path(os.environ["AGENT_HOME"])

    class RefundIn(BaseModel):
        cents: int

    class RefundOut(BaseModel):
        refunded: int

    def preview(args: RefundIn) -> RefundOut:
        return RefundOut(refunded=args.cents)

    @tether.capability("pay.refund", effect="write", idempotency="keyed", dry_run=preview)
    def refund(args: RefundIn) -> RefundOut:
        with open(HERE / "effects", "a") as f:  # the upstream's own count
            f.write(f"{args.cents}\\n")
        return RefundOut(refunded=args.cents)

    app = tether.Tether(
        db=f"sqlite:///{HERE / 'agent.db'}", config=HERE / "tether.yaml"
    )
    app.register(refund)
    app.register_planner(
        "refunds",
        tether.ScriptedPlanner([("pay.refund", {"cents": 50}), ("pay.refund", {"cents": 500})]),
    )
    """
)

CONFIG = """
rules:
  - {id: big, match: {capability: pay.refund}, when: "args.cents > 100",
     decision: require_approval, reason: big refunds need finance, approvers: [finance]}
approvers: {alice: [finance]}
"""


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AGENT_HOME": str(home),
        "PYTHONPATH": str(home),
        "TETHER_DB": f"sqlite:///{home / 'agent.db'}",
        "TETHER_CONFIG": str(home / "tether.yaml"),
    }
    return subprocess.run(  # our own CLI and interpreter
        args, cwd=home, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_park_exit_approve_elsewhere_and_a_worker_finishes(tmp_path: Path) -> None:
    """Three processes: the agent parks and exits; the CLI approves; `tether worker` resumes it once."""
    (tmp_path / "agentapp.py").write_text(AGENT)
    (tmp_path / "tether.yaml").write_text(CONFIG)

    started = _run(
        tmp_path,
        sys.executable,
        "-c",
        "import agentapp; r = agentapp.app.start('refund two', planner='refunds', "
        "principal=__import__('tether').Principal('bot', on_behalf_of='carol')); "
        "print(r.id, r.status.value)",
    )
    assert started.returncode == 0, started.stderr
    run_id, status = started.stdout.split()
    listed = _run(tmp_path, CLI, "approvals", "list", "--status", "pending", "--json")
    assert listed.returncode == 0, listed.stderr
    (request,) = json.loads(listed.stdout)["approvals"]
    idle = _run(tmp_path, CLI, "worker", "--app", "agentapp:app", "--until-idle")
    approved = _run(
        tmp_path, CLI, "approvals", "approve", request["id"], "--as", "alice"
    )
    worked = _run(tmp_path, CLI, "worker", "--app", "agentapp:app", "--until-idle")

    assert status == "awaiting_approval"
    assert (idle.returncode, "resumed" in idle.stdout) == (
        0,
        False,
    )  # nothing ready yet
    assert "idle: no run is ready to resume here" in idle.stdout  # it says so
    assert approved.returncode == 0, approved.stderr
    assert worked.returncode == 0, worked.stderr
    assert f"resumed {run_id} succeeded" in " ".join(worked.stdout.split())
    assert (tmp_path / "effects").read_text().split() == ["50", "500"]
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 'agent.db'}", config=tmp_path / "tether.yaml"
    ) as app:
        kinds = [e.data()["kind"] for e in app.store.events(run_id)]
        assert app.verify(run_id).ok
        assert app.store.get_run(run_id).status == "succeeded"
    order = [
        kinds.index("approval_requested"),
        kinds.index("approval_decided"),
        kinds.index("approval_used"),
        len(kinds) - 1 - kinds[::-1].index("executed"),
    ]
    assert order == sorted(order)
    assert kinds.count("approval_used") == 1


CRASHING = textwrap.dedent(
    """
    import os
    from pathlib import Path
    from pydantic import BaseModel
    import tether

    HERE = Path(os.environ["AGENT_HOME"])

    class In(BaseModel):
        n: int

    class Out(BaseModel):
        n: int

    @tether.capability("mail.send", effect="write")  # idempotency none: not safe to repeat
    def send(args: In) -> Out:
        with open(HERE / "sent", "a") as f:
            f.write(f"{args.n}\\n")
        if not (HERE / "crashed").exists():
            (HERE / "crashed").touch()
            os._exit(9)  # the process dies mid-call, after the upstream acted
        return Out(n=args.n)

    app = tether.Tether(db=f"sqlite:///{HERE / 'agent.db'}", config=HERE / "tether.yaml")
    app.register(send)
    app.register_planner(
        "mail", tether.ScriptedPlanner([("mail.send", {"n": 1}), ("mail.send", {"n": 2})])
    )
    """
)


def _crash_then_worker(tmp_path: Path) -> tuple[str, str]:
    """Crash the agent mid-call in a `none` write, let a worker pass; return the run and request ids."""
    (tmp_path / "agentapp.py").write_text(CRASHING)
    (tmp_path / "tether.yaml").write_text(
        "idempotency: {claim_ttl: 1s}\napprovers: {alice: [ops]}\n"
    )
    crashed = _run(
        tmp_path,
        sys.executable,
        "-c",
        "import agentapp, tether; agentapp.app.start('mail', planner='mail', "
        "principal=tether.Principal('bot'))",
    )
    assert crashed.returncode == 9
    time.sleep(1.1)  # the dead writer's lease runs out
    worked = _run(tmp_path, CLI, "worker", "--app", "agentapp:app", "--until-idle")
    assert worked.returncode == 0, worked.stderr
    listed = _run(tmp_path, CLI, "approvals", "list", "--status", "pending", "--json")
    (request,) = json.loads(listed.stdout)["approvals"]
    return request["run_id"], request["id"]


def _record(tmp_path: Path, run_id: str) -> tuple[str, list[dict[str, Any]]]:
    with tether.Tether(db=f"sqlite:///{tmp_path / 'agent.db'}", env={}) as app:
        assert app.verify(run_id).ok
        return app.store.get_run(run_id).status, [
            e.data() for e in app.store.events(run_id)
        ]


def test_a_none_step_cut_off_by_a_crash_goes_to_a_person_and_runs_again_if_approved(
    tmp_path: Path,
) -> None:
    """The worker records the cut-off `none` write in doubt, asks a person, parks; approved, it runs again, once."""
    run_id, request_id = _crash_then_worker(tmp_path)
    parked, events = _record(tmp_path, run_id)
    approved = _run(tmp_path, CLI, "approvals", "approve", request_id, "--as", "alice")
    again = _run(tmp_path, CLI, "worker", "--app", "agentapp:app", "--until-idle")
    status, _ = _record(tmp_path, run_id)

    assert parked == "awaiting_approval"
    doubt = [e for e in events if e["kind"] == "in_doubt"]
    assert [(e["step"], e["error_type"]) for e in doubt] == [(1, "WriterLost")]
    asked = [e for e in events if e["kind"] == "approval_requested"]
    assert [e["rule_ids"] for e in asked] == [["in_doubt"]]
    assert approved.returncode == 0, approved.stderr
    assert again.returncode == 0, again.stderr
    assert status == "succeeded"
    assert (tmp_path / "sent").read_text().split() == ["1", "1", "2"]


def test_a_none_step_cut_off_by_a_crash_is_never_run_again_if_denied(
    tmp_path: Path,
) -> None:
    """Denied (the person found it happened): the planner is told it is in doubt and goes on; it never runs again."""
    run_id, request_id = _crash_then_worker(tmp_path)
    denied = _run(
        tmp_path,
        CLI,
        "approvals",
        "deny",
        request_id,
        "--as",
        "alice",
        "--reason",
        "the mail went out",
    )
    again = _run(tmp_path, CLI, "worker", "--app", "agentapp:app", "--until-idle")
    status, _ = _record(tmp_path, run_id)

    assert denied.returncode == 0, denied.stderr
    assert again.returncode == 0, again.stderr
    assert status == "succeeded"
    assert (tmp_path / "sent").read_text().split() == ["1", "2"]


def test_without_news_to_hear_a_worker_waits_on_the_apps_clock(tmp_path: Path) -> None:
    """On SQLite (and memory) nothing can tell a worker a request was decided: its wait is a sleep, on the app's clock."""
    clock = FakeClock()
    started = clock.now()
    for db in (f"sqlite:///{tmp_path / 't.db'}", "memory://"):
        with tether.Tether(db=db, clock=clock, env={}) as app:
            app.wait_for_news(5)

    assert clock.now() - started == timedelta(seconds=10)


def test_a_worker_goes_on_past_runs_it_cannot_resume(tmp_path: Path) -> None:
    """A run no planner here can continue is named once and left; the others are resumed.

    A run its caller drove (`app.run`, no planner) is not offered at all: only
    that caller could go on with it.
    """
    (tmp_path / "agentapp.py").write_text(AGENT)
    (tmp_path / "tether.yaml").write_text(CONFIG + "idempotency: {claim_ttl: 1s}\n")
    by_hand = _run(  # the caller's process dies inside its run: left executing
        tmp_path,
        sys.executable,
        "-c",
        "import os, agentapp, tether; r = agentapp.app.run(principal="
        "tether.Principal('bot'), request='by hand'); r.__enter__(); "
        "r.call('pay.refund', {'cents': 5}); print(r.id, flush=True); os._exit(0)",
    )
    elsewhere = _run(  # driven by a planner the worker's app does not have
        tmp_path,
        sys.executable,
        "-c",
        "import agentapp, tether; agentapp.app.register_planner('elsewhere', "
        "tether.ScriptedPlanner([('pay.refund', {'cents': 500})])); "
        "print(agentapp.app.start('big', planner='elsewhere', "
        "principal=tether.Principal('bot')).id)",
    )
    ours = _run(
        tmp_path,
        sys.executable,
        "-c",
        "import agentapp, tether; print(agentapp.app.start('refund two', "
        "planner='refunds', principal=tether.Principal('bot')).id)",
    )
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 'agent.db'}", config=tmp_path / "tether.yaml"
    ) as app:
        for request in app.approvals(status="pending"):
            app.approve(request.id, by="alice")
    time.sleep(1.1)  # the dead caller's lease runs out

    worked = _run(tmp_path, CLI, "worker", "--app", "agentapp:app", "--until-idle")

    assert worked.returncode == 0, worked.stderr
    said = " ".join(worked.stdout.split())
    assert f"resumed {ours.stdout.strip()} succeeded" in said
    assert said.count(f"cannot resume {elsewhere.stdout.strip()}") == 1
    assert "error[not_found]" in said
    assert by_hand.stdout.strip() not in said
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 'agent.db'}", config=tmp_path / "tether.yaml"
    ) as app:
        assert app.ready_runs() == [elsewhere.stdout.strip()]


def test_an_approved_run_is_ready_behind_any_number_of_newer_waiting_ones(
    tmp_path: Path,
) -> None:
    """The oldest parked run, approved, is ready although more than 100 newer ones still wait."""
    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    with tether.Tether(db="memory://", config=config, clock=FakeClock(), env={}) as app:

        @tether.capability("pay.refund", effect="write", idempotency="keyed")
        def refund(args: Cents) -> Cents:
            return args

        app.register(refund)
        for n in range(101):  # each its own call, so each its own request
            app.register_planner(
                f"big{n}",
                tether.ScriptedPlanner([("pay.refund", {"cents": 500 + n})]),
            )
        runs = [
            app.start("refund", planner=f"big{n}", principal=tether.Principal("bot"))
            for n in range(101)
        ]
        (oldest,) = [
            a
            for a in app.approvals(status="pending", limit=500)
            if a.run_id == runs[0].id
        ]
        app.approve(oldest.id, by="alice")

        ready = app.ready_runs()

    assert ready == [runs[0].id]


@pytest.mark.parametrize("interval", ["inf", "nan", "0", "86400"])
def test_a_worker_interval_out_of_range_is_one_usage_line(
    tmp_path: Path, interval: str
) -> None:
    """`--interval` takes 0.05 to 3600 seconds; anything else (infinite, not a
    number, zero, a day) is refused in one line, not a crash at the first wait."""
    done = _run(
        tmp_path, CLI, "worker", "--app", "agentapp:app", "--interval", interval
    )

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "error[usage_error] tether worker: Invalid value for '--interval'"
    )
