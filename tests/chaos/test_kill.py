"""SIGKILL a worker at a step boundary or inside a handler; the record and the keys hold (A, B.17)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tether
from tether.store import KeyId, KeyState
from tether.testing import FakeClock

from ._workers import (
    ARGS,
    IN_HANDLER,
    PRINCIPAL,
    STEP_RETURNED,
    Worker,
    effect_lines,
    make_charge,
    spawner,
)

pytestmark = pytest.mark.chaos

DEADLINE_S = 9.0
KEY = KeyId(
    tenant=PRINCIPAL.tenant,
    principal_id=PRINCIPAL.id,
    capability="pay.charge",
    key="charge-o-1",
)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start worker processes in `tmp_path`; any still running at teardown are killed."""
    with spawner(tmp_path) as start:
        yield start


def kill_after_step(spawn: Callable[..., Worker], db: str, effects: Path) -> str:
    """Run one durable step in a worker, SIGKILL it once `call` returned; return the run id."""
    worker = spawn("step-then-hang", "--db", db, "--effects", str(effects))
    run_id = worker.expect(STEP_RETURNED, time.monotonic() + DEADLINE_S)
    worker.kill()
    return run_id


def test_a_step_that_returned_survives_sigkill_and_the_record_verifies(
    spawn: Callable[..., Worker], tmp_path: Path
) -> None:
    """A worker killed right after a `synchronous=full` step returned leaves the step's `executed` event and a chain that verifies."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"  # the default: synchronous=full
    effects = tmp_path / "effects"
    run_id = kill_after_step(spawn, db, effects)
    app = tether.Tether(db=db, env={})
    app.register(make_charge(effects))

    kinds = [(e.data()["kind"], e.data()["step"]) for e in app.store.events(run_id)]
    report = app.verify(run_id)
    with app.run(principal=PRINCIPAL, request="retry o-1") as run:
        retry = run.step("pay.charge", ARGS, idempotency_key="charge-o-1")
    app.close()

    assert kinds[-2:] == [("intent", 1), ("executed", 1)]
    assert report.ok, report.reason
    assert retry.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert len(effect_lines(effects)) == 1


def test_tether_verify_accepts_the_record_of_a_killed_worker(
    spawn: Callable[..., Worker], tmp_path: Path
) -> None:
    """`tether verify RUN --db URL` exits 0 on the record a SIGKILLed worker left."""
    pytest.importorskip("tether.cli", reason="the CLI has not landed yet")
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    run_id = kill_after_step(spawn, db, tmp_path / "effects")

    done = subprocess.run(
        [str(Path(sys.executable).with_name("tether")), "verify", run_id, "--db", db],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        check=False,
    )

    assert done.returncode == 0, done.stderr


def kill_in_handler(
    spawn: Callable[..., Worker], db: str, effects: Path, idempotency: str
) -> None:
    """Start a call in a worker and SIGKILL it inside the handler, after the effect."""
    worker = spawn(
        "die-in-handler",
        "--db",
        db,
        "--effects",
        str(effects),
        "--idempotency",
        idempotency,
    )
    worker.expect(IN_HANDLER, time.monotonic() + DEADLINE_S)
    worker.kill()


def test_a_keyed_call_killed_mid_handler_reruns_under_its_key_after_the_claim_ttl(
    spawn: Callable[..., Worker], tmp_path: Path
) -> None:
    """After SIGKILL inside a keyed handler, retries are refused until the claim TTL, then re-execute under the same key."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    effects = tmp_path / "effects"
    kill_in_handler(spawn, db, effects, "keyed")
    clock = FakeClock(datetime.now(UTC))
    app = tether.Tether(db=db, env={}, clock=clock)
    app.register(make_charge(effects))

    with app.run(principal=PRINCIPAL, request="retry at once") as early:
        refused = early.step("pay.charge", ARGS, idempotency_key="charge-o-1")
    clock.advance(app.settings.idempotency.claim_ttl + timedelta(seconds=1))
    with app.run(principal=PRINCIPAL, request="retry after the TTL") as late:
        rerun = late.step("pay.charge", ARGS, idempotency_key="charge-o-1")
    stored = app.store.lookup_key(KEY)
    app.close()

    assert refused.error is not None
    assert refused.error.code == "idempotency_key_in_use"
    assert rerun.status is tether.OutcomeStatus.EXECUTED
    assert [line.split()[-1] for line in effect_lines(effects)] == ["charge-o-1"] * 2
    assert stored is not None
    assert (stored.state, stored.run_id) == (KeyState.COMPLETED, late.id)


def test_an_unkeyed_call_killed_mid_handler_is_never_rerun(
    spawn: Callable[..., Worker], tmp_path: Path
) -> None:
    """After SIGKILL inside a `none` handler, retries are refused until the claim TTL and in doubt after it: no second effect."""
    db = f"sqlite:///{tmp_path / 'tether.db'}"
    effects = tmp_path / "effects"
    kill_in_handler(spawn, db, effects, "none")
    clock = FakeClock(datetime.now(UTC))
    app = tether.Tether(db=db, env={}, clock=clock)
    app.register(make_charge(effects, idempotency="none"))

    with app.run(principal=PRINCIPAL, request="retry at once") as early:
        refused = early.step("pay.charge", ARGS, idempotency_key="charge-o-1")
    clock.advance(app.settings.idempotency.claim_ttl + timedelta(seconds=1))
    with app.run(principal=PRINCIPAL, request="retry after the TTL") as late:
        in_doubt = late.step("pay.charge", ARGS, idempotency_key="charge-o-1")
    app.close()

    assert refused.error is not None
    assert refused.error.code == "idempotency_key_in_use"
    assert in_doubt.status is tether.OutcomeStatus.IN_DOUBT
    assert len(effect_lines(effects)) == 1
