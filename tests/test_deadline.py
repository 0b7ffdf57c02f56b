"""A caller's deadline shortens the capability's timeout (RELIABILITY.md D.32).

`run.call(..., timeout=seconds)` is the most the caller waits for the handler:
the shorter of it and the capability's own timeout applies to that one call,
and the record keeps it (`validated.timeout`) so replay redoes the call under
the same limit. A call past it ends as one past the capability's timeout does:
`StepTimeout` (a `keyed` write may be retried under its key), or `InDoubt` for
a `none` write that started. Handlers here hang on an event the test releases;
no assertion is about time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
from tether.record import OutcomeStatus
from tether.replay import RecordedRun, Replayer
from tether.testing import FakeClock

BOT = tether.Principal("ops-bot", tenant="acme")


class HostIn(BaseModel):
    host: str


class HostOut(BaseModel):
    host: str
    up: bool


class Hang:
    """Handlers that wait inside the call while `hang` holds entries."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hang: list[bool] = []
        self.calls: list[str] = []

    def __call__(self, args: HostIn) -> HostOut:
        self.calls.append(args.host)
        if self.hang and self.hang.pop(0):
            self.release.wait(10)
        return HostOut(host=args.host, up=True)


@pytest.fixture
def hang() -> Iterator[Hang]:
    h = Hang()
    yield h
    h.release.set()  # let hung handler threads end


@pytest.fixture
def app(tmp_path: Path, hang: Hang) -> Iterator[tether.Tether]:
    with tether.Tether(
        db=f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal",
        clock=FakeClock(),
        env={},
    ) as app:
        for name, effect, idempotency, timeout in (
            ("net.check", "read", "none", 30.0),  # its own timeout: long
            ("net.probe", "read", "none", None),  # no timeout of its own
            ("svc.restart", "write", "keyed", 30.0),
            ("pay.send", "write", "none", 30.0),
        ):
            app.register(
                tether.capability(
                    name, effect=effect, idempotency=idempotency, timeout=timeout
                )(_named(hang, name))
            )
        yield app


def _named(hang: Hang, name: str) -> Callable[[HostIn], HostOut]:
    def handler(args: HostIn) -> HostOut:
        return hang(args)

    handler.__name__ = handler.__qualname__ = name.replace(".", "_")
    handler.__doc__ = f"{name}, through the test's hanging upstream."
    return handler


def _validated(app: tether.Tether, run_id: str, step: int) -> dict[str, object]:
    return next(
        e.data()
        for e in app.store.events(run_id)
        if e.data()["kind"] == "validated" and e.data()["step"] == step
    )


@pytest.mark.parametrize("capability", ["net.check", "net.probe"])
def test_a_callers_deadline_ends_a_call_its_capability_would_wait_longer_for(
    app: tether.Tether, hang: Hang, capability: str
) -> None:
    """30 s of the capability's own (or none at all) and 0.05 s of the caller's: 0.05 s wins."""
    hang.hang.append(True)
    with app.run(principal=BOT, request="check") as run:
        late = run.step(capability, {"host": "a"}, timeout=0.05)
        hang.release.set()
        fine = run.step(capability, {"host": "b"}, timeout=5)

    assert late.status is OutcomeStatus.FAILED
    assert isinstance(late.error, tether.StepTimeout)
    assert "0.05s timeout" in late.error.message
    assert fine.status is OutcomeStatus.EXECUTED
    assert _validated(app, run.id, 1)["timeout"] == 0.05
    assert _validated(app, run.id, 2)["timeout"] == 5.0
    assert app.verify(run.id).ok


def test_a_callers_deadline_never_lengthens_the_capabilitys_timeout(
    app: tether.Tether, hang: Hang
) -> None:
    """A capability of 0.05 s called with 60 s of patience still stops at 0.05 s."""

    @tether.capability("net.quick", effect="read", timeout=0.05)
    def quick(args: HostIn) -> HostOut:
        return hang(args)

    app.register(quick)
    hang.hang.append(True)
    with app.run(principal=BOT, request="check") as run:
        outcome = run.step(quick, {"host": "a"}, timeout=60)

    assert isinstance(outcome.error, tether.StepTimeout)
    assert "0.05s timeout" in outcome.error.message
    assert _validated(app, run.id, 1)["timeout"] == 60.0  # what the caller gave


def test_past_the_deadline_a_keyed_write_is_retried_under_its_key_and_a_none_write_is_in_doubt(
    app: tether.Tether, hang: Hang
) -> None:
    """The outcome is the capability timeout's: retryable under the key, or unknown."""
    hang.hang += [True, True]
    with app.run(principal=BOT, request="restart, then pay") as run:
        timed_out = run.step(
            "svc.restart", {"host": "a"}, idempotency_key="r-1", timeout=0.05
        )
        with pytest.raises(tether.InDoubt, match="timeout"):
            run.call("pay.send", {"host": "a"}, idempotency_key="p-1", timeout=0.05)
        hang.release.set()
        clock = app.clock
        assert isinstance(clock, FakeClock)
        clock.advance(app.settings.idempotency.claim_ttl)  # the hung thread's claim
        retried = run.step("svc.restart", {"host": "a"}, idempotency_key="r-1")

    assert isinstance(timed_out.error, tether.StepTimeout)
    assert retried.status is OutcomeStatus.EXECUTED
    assert app.verify(run.id).ok


def test_a_step_past_its_callers_deadline_replays_the_same(
    app: tether.Tether, hang: Hang
) -> None:
    """Replay calls the step again under the recorded deadline: the same outcome, message and all."""
    hang.hang.append(True)
    with app.run(principal=BOT, request="check") as run:
        run.step("net.check", {"host": "a"}, timeout=0.05)
        hang.release.set()
        run.step("net.check", {"host": "b"}, timeout=timedelta(seconds=5))

    report = Replayer(app).replay(RecordedRun.from_store(app.store, run.id))

    assert report.ok, report.to_json()
    assert report.divergences == []


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "5", None])
def test_a_deadline_that_is_not_a_positive_number_of_seconds_is_refused_first(
    app: tether.Tether, hang: Hang, bad: object
) -> None:
    """One line saying what a timeout must be; nothing runs and nothing is recorded."""
    with app.run(principal=BOT, request="check") as run:
        if bad is None:  # None is no deadline: the call runs
            assert run.step("net.check", {"host": "a"}, timeout=None).error is None
            return
        with pytest.raises(tether.UsageError, match="timeout must be") as refused:
            run.step("net.check", {"host": "a"}, timeout=bad)  # type: ignore[arg-type]
        head = app.store.get_run(run.id).head_seq

    assert "\n" not in refused.value.message
    assert hang.calls == []
    assert head == 2  # run_started, run_status: no step was recorded
