"""Who may abort a run: a person under `approvers:` who decides for the run's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import _cli
import tether
from tether.scenarios import SCENARIOS

SCENARIO = SCENARIOS["cloud-ops"]
KEY = {"TETHER_RECORD_KEY": "ab" * 32}
RESTART = ("service.restart", {"service": "payments", "reason": "pool exhausted"})
"""A write the scenario's rule asks a person about: the run parks on it."""

APPROVERS = """\
approvers:
  bob: [sre]
  carol: {roles: [sre], tenants: [globex]}
"""
"""bob decides for every tenant; carol only for globex (the scenario's is another)."""


@pytest.fixture
def parked(tmp_path: Path) -> Iterator[tuple[tether.Tether, str, Path]]:
    """An app on a SQLite file, a run of it parked on an approval, and its tether.yaml."""
    config = tmp_path / "tether.yaml"
    config.write_text(APPROVERS)
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    with tether.Tether(db=db, config=config, env=KEY) as app:
        SCENARIO.setup(app)
        app.register_planner("ops", tether.ScriptedPlanner([RESTART]))
        run = app.start(
            "restart payments",
            planner="ops",
            principal=SCENARIO.principal,
            context=SCENARIO.context,
        )
        assert run.status is tether.RunState.AWAITING_APPROVAL
        yield app, run.id, config


def _unchanged(app: tether.Tether, run_id: str, events: int) -> None:
    row = app.store.get_run(run_id)
    assert row.status == "awaiting_approval"
    assert row.head_seq == events


@pytest.mark.parametrize(
    ("by", "why"),
    [
        ("mallory", "mallory is not an approver"),
        ("carol", "carol decides for globex, not for tenant"),
    ],
)
def test_only_an_approver_of_the_runs_tenant_may_abort(
    parked: tuple[tether.Tether, str, Path], by: str, why: str
) -> None:
    """A name not under `approvers:`, or one for other tenants, is refused; nothing is written."""
    app, run_id, _ = parked
    events = app.store.get_run(run_id).head_seq

    with pytest.raises(tether.NotAllowedToApprove, match=why) as refused:
        app.abort(run_id, by=by, reason="stop")

    assert refused.value.code == "not_an_approver"
    assert "\n" not in refused.value.message
    _unchanged(app, run_id, events)


def test_the_runs_own_principal_is_no_approver(
    parked: tuple[tether.Tether, str, Path],
) -> None:
    """The agent the run acts as cannot stop it in its own name unless it is an approver."""
    app, run_id, _ = parked

    with pytest.raises(tether.NotAllowedToApprove, match="is not an approver"):
        app.abort(run_id, by=SCENARIO.principal.id, reason="stop")


def test_an_approver_aborts_and_is_recorded(
    parked: tuple[tether.Tether, str, Path],
) -> None:
    """An approver of every tenant stops the run; the record names them."""
    app, run_id, _ = parked

    row = app.abort(run_id, by="bob", reason="wrong service")

    assert row.status == "aborted"
    moved = [
        e.data() for e in app.store.events(run_id) if e.data()["kind"] == "run_status"
    ]
    assert (moved[-1]["by"], moved[-1]["reason"]) == ("bob", "wrong service")


def test_cli_abort_by_a_non_approver_is_one_error_line_exit_1(
    tmp_path: Path, parked: tuple[tether.Tether, str, Path]
) -> None:
    """`runs abort --as` a non-approver: `error[not_an_approver]`, exit 1, nothing written."""
    app, run_id, config = parked
    events = app.store.get_run(run_id).head_seq

    done = _cli.run(
        tmp_path,
        "runs", "abort", run_id, "--as", "mallory", "--reason", "stop",
        "--db", app.store.url, "--config", str(config),
        env=KEY,
    )  # fmt: skip

    line = _cli.one_error(done, "not_an_approver", exit=1)
    assert "mallory is not an approver" in line
    _unchanged(app, run_id, events)


def test_cli_abort_by_an_approver_succeeds(
    tmp_path: Path, parked: tuple[tether.Tether, str, Path]
) -> None:
    """`runs abort --as bob` with bob under `approvers:` stops the run, exit 0."""
    app, run_id, config = parked

    done = _cli.run(
        tmp_path,
        "runs", "abort", run_id, "--as", "bob", "--reason", "stop",
        "--db", app.store.url, "--config", str(config),
        env=KEY,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert app.store.get_run(run_id).status == "aborted"
