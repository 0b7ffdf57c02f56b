"""Retry budgets and timeouts (RELIABILITY D.30, D.32).

tether retries a failed call itself only when `retry_budget` is configured,
only when the call is safe to repeat (a `keyed` or `native` capability, or a
read), and only while every bound allows: attempts per call, the run's and
the incident's budgets, and the capability's retry ratio per window. These
tests drive a fake upstream that fails on purpose, on a fake clock, and read
what happened back from the record.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import tether
from tether.clock import system_rng
from tether.record import OutcomeStatus
from tether.store._limits import to_us
from tether.testing import FakeClock, temporary_app

PRINCIPAL = tether.Principal("ops-bot", roles=["agent"], tenant="acme")
US = 1_000_000


class PayIn(BaseModel, extra="forbid"):
    order: str


class PayOut(BaseModel):
    order: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One time the upstream was called."""

    capability: str
    key: str | None
    run_id: str
    step: int
    at: int
    """Fake time, µs."""


class Upstream:
    """A fake upstream that fails while `failing` is set, and logs every attempt."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.failing = True
        self.attempts: list[Attempt] = []

    def _hit(self, ctx: tether.CallContext) -> None:
        self.attempts.append(
            Attempt(
                capability=ctx.capability,
                key=ctx.idempotency_key,
                run_id=ctx.run_id,
                step=ctx.step,
                at=to_us(self.clock.now()),
            )
        )
        if self.failing:
            raise ConnectionError("upstream 503 Service Unavailable")

    def capabilities(self) -> list[tether.Capability[Any, Any]]:
        @tether.capability(
            "pay.charge", effect="write", idempotency="keyed", resource="pay"
        )
        def charge(args: PayIn, ctx: tether.CallContext) -> PayOut:
            self._hit(ctx)
            return PayOut(order=args.order)

        @tether.capability("pay.send", effect="write", idempotency="none")
        def send(args: PayIn, ctx: tether.CallContext) -> PayOut:
            self._hit(ctx)
            return PayOut(order=args.order)

        @tether.capability("pay.status", effect="read")
        def status(args: PayIn, ctx: tether.CallContext) -> PayOut:
            self._hit(ctx)
            return PayOut(order=args.order)

        return [charge, send, status]

    def of(self, run_id: str, step: int) -> list[Attempt]:
        return [a for a in self.attempts if (a.run_id, a.step) == (run_id, step)]


@contextlib.contextmanager
def retry_app(
    tmp_path: Path, budget: str, *, seed: int = 7
) -> Iterator[tuple[tether.Tether, FakeClock, Upstream]]:
    """Yield an app with `retry_budget: {budget}` and the fake upstream registered."""
    config = tmp_path / "tether.yaml"
    config.write_text(f"retry_budget: {{{budget}}}\n")
    clock = FakeClock()
    with temporary_app(clock=clock, config=config) as app:
        app.random = system_rng(seed)
        upstream = Upstream(clock)
        app.register(*upstream.capabilities())
        yield app, clock, upstream


def events(app: tether.Tether, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e.data() for e in app.store.events(run_id) if e.data()["kind"] == kind]


def at_us(data: dict[str, Any]) -> int:
    return to_us(datetime.fromisoformat(data["at"]))


# -- D.30: a failing upstream under steady load -----------------------------------------------

LOAD = (
    "per_run: 1000, max_attempts: 3, ratio: 0.1, min_retries: 3, window: 1m, "
    "backoff: 100ms, backoff_cap: 400ms"
)
CAP_US = 400_000
BACKOFF_US = 100_000


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_retries_stay_within_every_bound_while_the_upstream_is_down(
    tmp_path: Path, seed: int
) -> None:
    """D.30: for 60 s of a 100% failing upstream under steady load, each call makes at
    most 3 attempts, retries per window stay within max(10% of calls, 3), every retry
    is recorded with its reason and a capped, jittered backoff slept on the app clock,
    and all attempts of a call share its idempotency key."""
    with retry_app(tmp_path, LOAD, seed=seed) as (app, clock, upstream):
        start = to_us(clock.now())
        run_ids: list[str] = []
        while to_us(clock.now()) < start + 60 * US:
            with app.run(principal=PRINCIPAL, request="charge") as run:
                for n in range(5):
                    outcome = run.step("pay.charge", {"order": f"o-{n}"})
                    assert outcome.status is OutcomeStatus.FAILED, f"seed {seed}"
                    clock.advance(timedelta(milliseconds=250))
            run_ids.append(run.id)
        upstream.failing = False
        with app.run(principal=PRINCIPAL, request="recovered") as run:
            recovered = run.step("pay.charge", {"order": "late"})
        records = [
            (run_id, [e.data() for e in app.store.events(run_id)]) for run_id in run_ids
        ]

    assert recovered.status is OutcomeStatus.EXECUTED
    assert len(upstream.of(run.id, 1)) == 1
    window = 60 * US
    retries: Counter[int] = Counter()
    calls: Counter[int] = Counter()
    delays: list[int] = []
    per_call: dict[tuple[str, int], int] = {}
    for (
        run_id,
        data,
    ) in records:  # the runs ran one after the other: record order is time order
        keys = {d["step"]: d["key"] for d in data if d["kind"] == "intent"}
        scheduled: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for d in data:
            if d["kind"] == "retry_scheduled":
                w = at_us(d) - at_us(d) % window
                retries[w] += 1
                allowed = max(calls[w] // 10, 3)
                assert retries[w] <= allowed, f"seed {seed}: window {w} over its ratio"
                scheduled[d["step"]].append(d)
            elif d["kind"] == "failed" and d["stage"] == "execute":
                calls[at_us(d) - at_us(d) % window] += 1
        for step, key in keys.items():
            tries = upstream.of(run_id, step)
            per_call[(run_id, step)] = len(tries)
            assert len(tries) <= 3, f"seed {seed}"
            assert [t.key for t in tries] == [key] * len(tries), f"seed {seed}"
            retried = scheduled[step]
            assert len(retried) == len(tries) - 1, (
                f"seed {seed}: a retry without a record"
            )
            for attempt, (event, nxt) in enumerate(
                zip(retried, tries[1:], strict=True), 1
            ):
                assert event["attempt"] == attempt
                assert event["error_code"] == "capability_failed"
                assert "upstream 503" in event["message"]
                bound = min(BACKOFF_US * 2 ** (attempt - 1), CAP_US)
                assert 0 <= event["delay_us"] <= bound, f"seed {seed}"
                assert nxt.at - at_us(event) == event["delay_us"], f"seed {seed}"
                delays.append(event["delay_us"])
    spread = Counter(per_call.values())
    assert sum(calls.values()) == len(per_call)
    assert spread[3] >= 1, f"seed {seed}: no call was retried to the limit"
    assert spread[1] >= 1, f"seed {seed}: the ratio never held a retry back"
    assert len(set(delays)) > 1, f"seed {seed}: backoff without jitter"
    assert sum(retries.values()) >= 3


def test_retries_of_a_call_with_a_given_key_reuse_that_key(tmp_path: Path) -> None:
    """D.30: a caller's idempotency key is the key of every attempt."""
    with retry_app(tmp_path, "per_run: 5") as (app, _, upstream):
        with app.run(principal=PRINCIPAL, request="charge") as run:
            outcome = run.step(
                "pay.charge", {"order": "o-1"}, idempotency_key="order-1"
            )
        tries = upstream.of(run.id, 1)

    assert outcome.status is OutcomeStatus.FAILED
    assert [t.key for t in tries] == ["order-1"] * 3
    assert outcome.idempotency_key == "order-1"


def test_reads_are_retried(tmp_path: Path) -> None:
    """D.30: a read is safe to repeat, so it is retried like a keyed write."""
    with retry_app(tmp_path, "per_run: 5") as (app, _, upstream):
        with app.run(principal=PRINCIPAL, request="look") as run:
            outcome = run.step("pay.status", {"order": "o-1"})
        scheduled = events(app, run.id, "retry_scheduled")

    assert outcome.status is OutcomeStatus.FAILED
    assert len(upstream.of(run.id, 1)) == 3
    assert [s["attempt"] for s in scheduled] == [1, 2]


def test_a_none_write_is_never_retried(tmp_path: Path) -> None:
    """D.30: an `idempotency="none"` write that failed may have acted: it is in doubt,
    not retried, even with a key and budget to spare."""
    with retry_app(tmp_path, "per_run: 100, min_retries: 100") as (
        app,
        clock,
        upstream,
    ):
        before = clock.now()
        with app.run(principal=PRINCIPAL, request="send") as run:
            plain = run.step("pay.send", {"order": "o-1"})
            keyed = run.step("pay.send", {"order": "o-2"}, idempotency_key="send-2")
        scheduled = events(app, run.id, "retry_scheduled")

    assert (plain.status, keyed.status) == (OutcomeStatus.IN_DOUBT,) * 2
    assert isinstance(plain.error, tether.InDoubt)
    assert [len(upstream.of(run.id, s)) for s in (1, 2)] == [1, 1]
    assert scheduled == []
    assert clock.now() == before


def test_a_spent_run_budget_returns_the_failure_at_once(tmp_path: Path) -> None:
    """D.30: once a run has spent `per_run` retries, its next failure comes back after
    one attempt, without waiting; another run has its own budget."""
    budget = "per_run: 2, ratio: 1, min_retries: 100"
    with retry_app(tmp_path, budget) as (app, clock, upstream):
        with app.run(principal=PRINCIPAL, request="first") as run:
            first = run.step("pay.charge", {"order": "o-1"})
            spent_at = clock.now()
            second = run.step("pay.charge", {"order": "o-2"})
            after = clock.now()
        with app.run(principal=PRINCIPAL, request="other") as other:
            fresh = other.step("pay.charge", {"order": "o-3"})
        scheduled = events(app, run.id, "retry_scheduled")

    assert (first.status, second.status, fresh.status) == (OutcomeStatus.FAILED,) * 3
    assert isinstance(second.error, tether.CapabilityFailed)
    assert len(upstream.of(run.id, 1)) == 3
    assert len(upstream.of(run.id, 2)) == 1
    assert after == spent_at  # returned at once: no backoff slept
    assert [s["step"] for s in scheduled] == [1, 1]
    assert len(upstream.of(other.id, 1)) == 3


def test_an_incident_budget_is_shared_by_the_runs_of_one_incident(
    tmp_path: Path,
) -> None:
    """D.30: `per_incident` retries are shared across runs with the same context field;
    another incident, or a run without one, has its own."""
    budget = (
        "per_run: 10, per_incident: 3, incident: ticket, ratio: 1, min_retries: 100"
    )
    with retry_app(tmp_path, budget) as (app, _, upstream):
        attempts: dict[str, list[int]] = {}
        for name, context in [
            ("a", {"ticket": "INC-1"}),
            ("b", {"ticket": "INC-1"}),
            ("c", {"ticket": "INC-2"}),
            ("d", {}),
        ]:
            with app.run(principal=PRINCIPAL, request=name, context=context) as run:
                run.step("pay.charge", {"order": "o-1"})
                run.step("pay.charge", {"order": "o-2"})
            attempts[name] = [len(upstream.of(run.id, s)) for s in (1, 2)]

    assert attempts == {
        "a": [3, 2],  # 2 + 1 retries: the incident's 3 are spent
        "b": [1, 1],  # same incident: none left
        "c": [3, 2],
        "d": [3, 3],  # no incident: only its run's budget counts
    }


def test_without_a_retry_budget_nothing_is_retried(tmp_path: Path) -> None:
    """D.30: retries happen only when `retry_budget` is configured."""
    clock = FakeClock()
    with temporary_app(clock=clock) as app:
        upstream = Upstream(clock)
        app.register(*upstream.capabilities())
        with app.run(principal=PRINCIPAL, request="charge") as run:
            outcome = run.step("pay.charge", {"order": "o-1"})

    assert outcome.status is OutcomeStatus.FAILED
    assert len(upstream.attempts) == 1


# -- D.32: timeouts -----------------------------------------------------------------------------


class Gate:
    """Holds sync handlers until the test ends (a handler thread cannot be stopped)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.keys: list[str | None] = []
        self.hang = True


@contextlib.contextmanager
def slow_app(
    tmp_path: Path, budget: str | None = "per_run: 5"
) -> Iterator[tuple[tether.Tether, FakeClock, Gate]]:
    """Yield an app with capabilities whose first call overruns a 50 ms timeout."""
    gate = Gate()

    @tether.capability("slow.none", effect="write", idempotency="none", timeout=0.05)
    def slow_none(args: PayIn, ctx: tether.CallContext) -> PayOut:
        gate.keys.append(ctx.idempotency_key)
        gate.release.wait(10)
        return PayOut(order=args.order)

    @tether.capability("slow.keyed", effect="write", idempotency="keyed", timeout=0.05)
    def slow_keyed(args: PayIn, ctx: tether.CallContext) -> PayOut:
        gate.keys.append(ctx.idempotency_key)
        if gate.hang:
            gate.release.wait(10)
        return PayOut(order=args.order)

    @tether.capability("slow.akeyed", effect="write", idempotency="keyed", timeout=0.05)
    async def slow_akeyed(args: PayIn, ctx: tether.CallContext) -> PayOut:
        gate.keys.append(ctx.idempotency_key)
        if len(gate.keys) == 1:
            await anyio.sleep(10)  # cancelled at the timeout
        return PayOut(order=args.order)

    config = tmp_path / "tether.yaml"
    config.write_text("" if budget is None else f"retry_budget: {{{budget}}}\n")
    clock = FakeClock()
    try:
        with temporary_app(clock=clock, config=config) as app:
            app.random = system_rng(5)
            app.register(slow_none, slow_keyed, slow_akeyed)
            yield app, clock, gate
    finally:
        gate.release.set()


def test_a_none_write_that_overruns_its_timeout_is_in_doubt(tmp_path: Path) -> None:
    """D.32: a `none` write past its timeout may have acted: in doubt, recorded as a
    timeout, and not retried."""
    with slow_app(tmp_path) as (app, _, gate):
        with app.run(principal=PRINCIPAL, request="send") as run:
            outcome = run.step("slow.none", {"order": "o-1"})
        (doubt,) = events(app, run.id, "in_doubt")
        scheduled = events(app, run.id, "retry_scheduled")

    assert outcome.status is OutcomeStatus.IN_DOUBT
    assert isinstance(outcome.error, tether.InDoubt)
    assert "did not finish within its 0.05s timeout" in doubt["message"]
    assert scheduled == []
    assert len(gate.keys) == 1


def test_a_keyed_write_that_overruns_is_retryable_under_its_key(tmp_path: Path) -> None:
    """D.32: a keyed write past its timeout fails with step_timeout and keeps its key
    claimed while its thread may still act (no automatic retry, a retry now is
    KeyInUse); once the claim expires, a retry under the same key runs."""
    with slow_app(tmp_path) as (app, clock, gate):
        with app.run(principal=PRINCIPAL, request="charge") as run:
            timed_out = run.step("slow.keyed", {"order": "o-1"}, idempotency_key="k-1")
            too_soon = run.step("slow.keyed", {"order": "o-1"}, idempotency_key="k-1")
            gate.hang = False
            clock.advance(app.settings.idempotency.claim_ttl)
            retried = run.step("slow.keyed", {"order": "o-1"}, idempotency_key="k-1")
        failed = events(app, run.id, "failed")
        scheduled = events(app, run.id, "retry_scheduled")
        expired = events(app, run.id, "key_expired")

    assert timed_out.status is OutcomeStatus.FAILED
    assert isinstance(timed_out.error, tether.StepTimeout)
    assert (failed[0]["stage"], failed[0]["error_code"]) == ("execute", "step_timeout")
    assert (
        scheduled == []
    )  # its thread may still be acting: no second attempt beside it
    assert isinstance(too_soon.error, tether.KeyInUse)
    assert retried.status is OutcomeStatus.EXECUTED
    assert gate.keys == ["k-1", "k-1"]
    assert [e["previous_state"] for e in expired] == ["in_progress"]


def test_an_async_keyed_write_that_overruns_is_retried_under_its_key(
    tmp_path: Path,
) -> None:
    """D.32: an async handler past its timeout is cancelled, so nothing still runs:
    the retry budget retries it under the same key, recording step_timeout."""
    with slow_app(tmp_path) as (app, _, gate):
        with app.run(principal=PRINCIPAL, request="charge") as run:
            outcome = run.step("slow.akeyed", {"order": "o-1"})
        scheduled = events(app, run.id, "retry_scheduled")

    assert outcome.status is OutcomeStatus.EXECUTED
    assert [s["error_code"] for s in scheduled] == ["step_timeout"]
    assert gate.keys == [outcome.idempotency_key] * 2


def test_a_timed_out_none_write_records_its_timeout_as_the_error_type(
    tmp_path: Path,
) -> None:
    """D.32: the in_doubt event names the timeout as its error type, as it names the
    exception a handler raised."""
    with slow_app(tmp_path) as (app, _, _gate):
        with app.run(principal=PRINCIPAL, request="send") as run:
            run.step("slow.none", {"order": "o-1"})
        (doubt,) = events(app, run.id, "in_doubt")

    assert doubt["error_type"] == "StepTimeout"
