"""Edges of limits, breakers and retries found in review (RELIABILITY C.19, C.21, D.29, D.32).

Each test here is a user's expectation that the first version of the limits
broke: a call that acted upstream is never recorded as failed (nor run twice)
because its `actual_cost` function failed; a refusal says when to retry in
whole units; a concurrency lease holds for as long as a step may keep its
upstream busy, retries and backoff included, or its thread still runs after a
timeout; a `read_only` breaker lets reads through while it is half-open too;
and limits that cannot mean what they say fail the config load.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether._guards import after, busy_for
from tether.clock import system_rng
from tether.config import check_config, load_settings
from tether.record import Outcome, OutcomeStatus
from tether.resilience import RetryBudget
from tether.store._breakers import BreakerState
from tether.testing import FakeClock

PRINCIPAL = tether.Principal("ops-bot", roles=["agent"], tenant="acme")
SEED = 7
"""The seed of the app's random source (backoff jitter)."""


class PayIn(BaseModel, extra="forbid"):
    n: int


class PayOut(BaseModel):
    fee: str = ""


@pytest.fixture(params=["sqlite", "memory"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run a test on a SQLite file and on the in-memory store."""
    return str(request.param)


@contextlib.contextmanager
def make_app(
    tmp_path: Path,
    backend: str,
    config: str,
    *caps: tether.Capability[Any, Any],
    clock: FakeClock | None = None,
) -> Iterator[tuple[tether.Tether, FakeClock]]:
    """Yield an app on `backend` with `config` as its tether.yaml and `caps` registered."""
    path = tmp_path / "tether.yaml"
    path.write_text(config)
    clock = clock or FakeClock()
    db = (
        "memory://"
        if backend == "memory"
        else f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
    )
    app = tether.Tether(db=db, config=path, clock=clock, env={})
    app.random = system_rng(SEED)
    for cap in caps:
        app.register(cap)
    try:
        yield app, clock
    finally:
        app.close()


def kinds(app: tether.Tether, run_id: str) -> list[str]:
    """Return the kinds of a run's recorded events, in order."""
    return [str(e.data()["kind"]) for e in app.store.events(run_id)]


def transitions(app: tether.Tether, run_id: str) -> list[tuple[str, str]]:
    """Return the breaker transitions a run's record holds, as (previous, state)."""
    return [
        (str(d["previous"]), str(d["state"]))
        for d in (e.data() for e in app.store.events(run_id))
        if d["kind"] == "breaker_transition"
    ]


def row(app: tether.Tether, clock: FakeClock, limit_id: str) -> tuple[Decimal, Decimal]:
    """Return (used, held) of one limit's counter now; (0, 0) when it has none."""
    rows = [r for r in app.store.limit_rows(clock.now()) if r.limit_id == limit_id]
    if not rows:
        return Decimal(0), Decimal(0)
    (found,) = rows
    return found.used, found.held


# -- 1. actual_cost that fails after a valid output ----------------------------------------

BAD_ACTUAL_COST: list[Any] = [
    pytest.param(lambda o: int(o.fee), id="raises"),
    pytest.param(lambda o: o.fee, id="not-a-number"),
    pytest.param(lambda o: -5, id="negative"),
]


@pytest.mark.parametrize("actual_cost", BAD_ACTUAL_COST)
def test_a_call_whose_actual_cost_fails_is_executed_and_charged_at_its_estimate(
    tmp_path: Path,
    backend: str,
    actual_cost: Callable[[Any], Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A keyed write that returned a valid output is executed even when its
    `actual_cost` function fails on it: the budget is charged the estimate, the
    failure is logged, and a retry under the same key is an idempotent hit that
    does not move the money again."""
    calls: list[int] = []

    @tether.capability(
        "pay.charge",
        effect="write",
        idempotency="keyed",
        cost=lambda a: a.n,
        actual_cost=actual_cost,
    )
    def charge(args: PayIn) -> PayOut:
        calls.append(args.n)
        return PayOut(
            fee="n/a"
        )  # the upstream's answer is valid; its fee is not a number

    config = "limits:\n  - {id: b, kind: budget, per: day, amount: 100}\n"
    with make_app(tmp_path, backend, config, charge) as (app, clock):
        with (
            caplog.at_level(logging.WARNING, logger="tether"),
            app.run(principal=PRINCIPAL, request="charge") as run,
        ):
            first = run.step("pay.charge", {"n": 40}, idempotency_key="k1")
            charged = row(app, clock, "b")
            again = run.step("pay.charge", {"n": 40}, idempotency_key="k1")

        assert first.status is OutcomeStatus.EXECUTED, first.error
        assert first.error is None
        assert again.status is OutcomeStatus.IDEMPOTENT_HIT, again.error
        assert calls == [40]
        assert charged == (Decimal(40), Decimal(0))
        assert row(app, clock, "b") == (Decimal(40), Decimal(0))
        assert kinds(app, run.id).count("executed") == 1
        assert "failed" not in kinds(app, run.id)
        assert any("actual_cost_failed" in r.getMessage() for r in caplog.records)


# -- 2. waits in refusal messages ----------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (0.25, "in 250ms"),
        (30, "in 30s"),
        (125, "in 2m 5s"),
        (3600, "in 1h"),
        (3930, "in 1h 6m"),  # rounded up: retrying then fits
        (4210, "in 1h 11m"),
        (36061, "in 10h 2m"),
        (7259, "in 2h 1m"),  # never "2h 59s", read as 2 h 59 min
    ],
)
def test_a_wait_is_said_in_its_two_largest_whole_units(
    seconds: float, said: str
) -> None:
    """A wait is shown in its two largest units, each number whole: 3930 s is
    'in 1h 6m', rounded up, never a cut-off number or a bare figure without its unit."""
    assert after(seconds) == said


def test_a_daily_quota_refusal_says_when_in_hours_and_minutes(
    tmp_path: Path, backend: str
) -> None:
    """A daily quota used up at 22:54:30 refuses with `retry in 1h 6m` (rounded up) and
    `retry_after` 3930 s: the time left until its window turns at midnight."""

    @tether.capability("x.do", effect="write", idempotency="keyed")
    def do(args: PayIn) -> PayOut:
        return PayOut()

    clock = FakeClock()  # starts at midnight
    clock.advance(timedelta(hours=22, minutes=54, seconds=30))
    config = "limits:\n  - {id: q, kind: quota, per: day, max: 1}\n"
    with (
        make_app(tmp_path, backend, config, do, clock=clock) as (app, _),
        app.run(principal=PRINCIPAL, request="twice") as run,
    ):
        first = run.step("x.do", {"n": 1})

        refused = run.step("x.do", {"n": 2})

    assert first.status is OutcomeStatus.EXECUTED
    error = refused.error
    assert isinstance(error, tether.LimitExceeded)
    assert error.limit_id == "q"
    assert error.retry_after == 3930.0
    assert error.message.endswith("1 of 1 calls used; retry in 1h 6m"), error.message


# -- 3. a lease holds through a step's retries ---------------------------------------------


RETRYING = """\
limits:
  - {id: c, kind: concurrency, max: 1, ttl: 1s}
retry_budget: {per_run: 5, max_attempts: 3, backoff: 100ms}
"""


def test_a_concurrency_lease_holds_through_the_retries_of_its_step(
    tmp_path: Path, backend: str
) -> None:
    """With `max: 1`, a call made while another step is in its third attempt
    (past the lease's ttl and the capability timeout) is refused: the lease
    lasts as long as the step may keep the upstream busy, retries included;
    once the step ends the next call goes through."""
    clock = FakeClock()
    attempts: list[int] = []
    nested: list[Outcome] = []

    def charge(args: PayIn) -> PayOut:
        if args.n == 2:
            return PayOut()
        attempts.append(args.n)
        clock.advance(timedelta(milliseconds=800))  # each attempt takes 0.8 s
        if len(attempts) < 3:
            raise ConnectionError("upstream 503 Service Unavailable")
        with app.run(principal=PRINCIPAL, request="meanwhile") as other:
            nested.append(other.step("pay.charge", {"n": 2}))
        return PayOut()

    cap = tether.capability(
        "pay.charge", effect="write", idempotency="keyed", timeout=1.0
    )(charge)
    with make_app(tmp_path, backend, RETRYING, cap, clock=clock) as (app, _):
        with app.run(principal=PRINCIPAL, request="charge") as run:
            outcome = run.step("pay.charge", {"n": 1})
        with app.run(principal=PRINCIPAL, request="after") as later:
            afterwards = later.step("pay.charge", {"n": 2})

        retried = kinds(app, run.id).count("retry_scheduled")

    assert outcome.status is OutcomeStatus.EXECUTED, outcome.error
    assert (len(attempts), retried) == (3, 2)
    (during,) = nested
    assert during.status is OutcomeStatus.REFUSED
    assert isinstance(during.error, tether.LimitExceeded)
    assert during.error.limit_id == "c"
    assert afterwards.status is OutcomeStatus.EXECUTED, afterwards.error


def _write(args: PayIn) -> PayOut:
    return PayOut()


@pytest.mark.parametrize(
    ("idempotency", "effect", "timeout", "retry", "held"),
    [
        pytest.param(  # 4 attempts of 2 s; waits of 1 s, 2 s, then 3 s (the cap, not 4 s)
            "keyed",
            "write",
            2.0,
            {"max_attempts": 4, "backoff": "1s", "backoff_cap": "3s"},
            14.0,
            id="keyed-write-capped",
        ),
        pytest.param(
            "none",
            "read",
            2.0,
            {"max_attempts": 3, "backoff": "1s"},
            9.0,
            id="read-retried",
        ),
        pytest.param("keyed", "write", 2.0, {"max_attempts": 1}, 2.0, id="one-attempt"),
        pytest.param("keyed", "write", 2.0, None, 2.0, id="no-retry-budget"),
        pytest.param(
            "none", "write", 2.0, {"max_attempts": 3}, 2.0, id="unkeyed-never-retried"
        ),
        pytest.param(
            "keyed", "write", None, {"max_attempts": 3}, None, id="no-timeout"
        ),
    ],
)
def test_busy_for_is_every_attempt_and_every_capped_backoff(
    idempotency: str,
    effect: str,
    timeout: float | None,
    retry: dict[str, Any] | None,
    held: float | None,
) -> None:
    """How long a step's holds last is its timeout times its attempts plus each
    backoff bound (doubling, capped at backoff_cap); one timeout when it is
    never retried; None without a timeout."""
    cap = tether.capability(
        "x.do", effect=effect, idempotency=idempotency, timeout=timeout
    )(_write)
    budget = None if retry is None else RetryBudget.model_validate(retry)

    busy = busy_for(cap, budget)

    assert busy == (None if held is None else timedelta(seconds=held))


# -- 4. read_only breakers let reads through while half-open -------------------------------

READ_ONLY = """\
breakers:
  - {id: db-br, resource: db, window: 2, min_calls: 2, failure_rate: 0.5, open_for: 10s,
     half_open_calls: 1, on_open: read_only}
"""


def test_a_read_only_breaker_lets_reads_through_open_and_half_open(
    tmp_path: Path, backend: str
) -> None:
    """Under `on_open: read_only`, reads go through while the breaker is open and
    while it is half-open with its one trial call taken (a second write is then
    refused); a read takes no trial slot, and the trial write's success closes
    the breaker, in that write's run."""
    failing = [True]
    during_trial: dict[str, Outcome] = {}

    @tether.capability("db.read", effect="read", resource="db")
    def read(args: PayIn) -> PayOut:
        return PayOut()

    @tether.capability("db.write", effect="write", idempotency="keyed", resource="db")
    def write(args: PayIn) -> PayOut:
        if args.n == 99:  # the trial write: others call while it is in flight
            with app.run(principal=PRINCIPAL, request="meanwhile") as other:
                during_trial["read"] = other.step("db.read", {"n": 1})
                during_trial["write"] = other.step("db.write", {"n": 3})
            return PayOut()
        if failing[0]:
            raise ConnectionError("upstream 503 Service Unavailable")
        return PayOut()

    with make_app(tmp_path, backend, READ_ONLY, write, read) as (app, clock):
        with app.run(principal=PRINCIPAL, request="open it") as run:
            run.step("db.write", {"n": 1})
            run.step("db.write", {"n": 2})
            opened = app.store.breaker_row("db-br")
            read_open = run.step("db.read", {"n": 1})
            write_open = run.step("db.write", {"n": 4})
        clock.advance(timedelta(seconds=11))
        failing[0] = False
        with app.run(principal=PRINCIPAL, request="read first") as reader:
            read_half_open = reader.step("db.read", {"n": 1})
        untouched = app.store.breaker_row("db-br")
        with app.run(principal=PRINCIPAL, request="trial") as trial:
            trial_write = trial.step("db.write", {"n": 99})

        closed = app.store.breaker_row("db-br")
        trial_moves = transitions(app, trial.id)
        reader_moves = transitions(app, reader.id)

    assert opened.state is BreakerState.OPEN
    assert read_open.status is OutcomeStatus.EXECUTED, read_open.error
    assert isinstance(write_open.error, tether.BreakerOpen)
    assert write_open.error.mode == "read_only"
    assert read_half_open.status is OutcomeStatus.EXECUTED, read_half_open.error
    assert (untouched.state, untouched.probes) == (BreakerState.HALF_OPEN, 0)
    # time moved it to half-open in the reader's run; the read did not close it
    assert reader_moves == [("open", "half_open")]
    assert during_trial["read"].status is OutcomeStatus.EXECUTED
    assert isinstance(during_trial["write"].error, tether.BreakerOpen)
    assert trial_write.status is OutcomeStatus.EXECUTED, trial_write.error
    assert closed.state is BreakerState.CLOSED
    assert trial_moves == [("half_open", "closed")]


# -- 5. a timed-out call still running keeps its holds -------------------------------------

HOLDS = """\
limits:
  - {id: c, kind: concurrency, max: 1, ttl: 5m}
  - {id: b, kind: budget, per: day, amount: 100}
"""


@contextlib.contextmanager
def slow_charge(
    tmp_path: Path, backend: str
) -> Iterator[tuple[tether.Tether, FakeClock, dict[str, int]]]:
    """Yield an app whose `pay.charge` (timeout 0.2 s) hangs on `n: 80` until the
    test ends, counting the calls in flight upstream (`now`, `max`)."""
    gate = threading.Event()
    finished = threading.Event()
    lock = threading.Lock()
    inflight = {"now": 0, "max": 0}

    def charge(args: PayIn) -> PayOut:
        with lock:
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
        try:
            if args.n == 80:
                gate.wait(10)  # the payment goes through, late
            return PayOut()
        finally:
            with lock:
                inflight["now"] -= 1
            if args.n == 80:
                finished.set()

    cap = tether.capability(
        "pay.charge",
        effect="write",
        idempotency="keyed",
        timeout=0.2,
        cost=lambda a: a.n,
    )(charge)
    with make_app(tmp_path, backend, HOLDS, cap) as (app, clock):
        try:
            yield app, clock, inflight
        finally:
            gate.set()
            assert finished.wait(10), "the hung call never finished"


def test_a_timed_out_call_still_running_keeps_its_concurrency_lease(
    tmp_path: Path, backend: str
) -> None:
    """With `max: 1`, a keyed call that timed out while its thread still acts
    keeps its lease: the next call is refused rather than run beside it, and is
    admitted once the lease's ttl has passed."""
    with slow_charge(tmp_path, backend) as (app, clock, inflight):
        with app.run(principal=PRINCIPAL, request="restart") as run:
            timed_out = run.step("pay.charge", {"n": 80})

            second = run.step("pay.charge", {"n": 1})

        most = inflight["max"]
        clock.advance(timedelta(minutes=5, seconds=1))
        with app.run(principal=PRINCIPAL, request="later") as later:
            lapsed = later.step("pay.charge", {"n": 1})

    assert timed_out.status is OutcomeStatus.FAILED
    assert timed_out.error is not None
    assert timed_out.error.code == "step_timeout"
    assert second.status is OutcomeStatus.REFUSED
    assert isinstance(second.error, tether.LimitExceeded)
    assert second.error.limit_id == "c"
    assert most == 1
    assert lapsed.status is OutcomeStatus.EXECUTED, lapsed.error


def test_a_timed_out_call_still_running_keeps_its_budget_estimate(
    tmp_path: Path, backend: str
) -> None:
    """A keyed write that timed out but may still pay keeps its estimate charged
    to the budget (not released as for a failure): 80 of 100 stay spent, so a
    call for 30 is refused while one for 20 fits."""
    with slow_charge(tmp_path, backend) as (app, clock, _):
        with app.run(principal=PRINCIPAL, request="pay") as run:
            timed_out = run.step("pay.charge", {"n": 80})
        charged = row(app, clock, "b")
        clock.advance(
            timedelta(minutes=5, seconds=1)
        )  # past the lease: only the budget is left

        with app.run(principal=PRINCIPAL, request="pay more") as later:
            too_much = later.step("pay.charge", {"n": 30})
            fits = later.step("pay.charge", {"n": 20})

    assert timed_out.error is not None
    assert timed_out.error.code == "step_timeout"
    assert charged == (Decimal(80), Decimal(0))
    assert isinstance(too_much.error, tether.LimitExceeded)
    assert too_much.error.limit_id == "b"
    assert too_much.error.left == Decimal(20)
    assert fits.status is OutcomeStatus.EXECUTED, fits.error


# -- 6. limits that cannot mean what they say ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        pytest.param(
            "limits:\n  - {id: q, kind: quota, per: hour, max: 5, burst: 10}\n",
            2,
            "limits[0] (id 'q'): a quota limit takes no `burst`",
            id="burst-on-a-quota",
        ),
        pytest.param(
            "limits:\n  - id: r\n    kind: rate\n    rate: 5/s\n    ttl: 2s\n",
            2,
            "limits[0] (id 'r'): a rate limit takes no `ttl`",
            id="ttl-on-a-rate",
        ),
        pytest.param(
            "retry_budget:\n  per_run: 3\n  backoff: 30s\n  backoff_cap: 1s\n",
            1,
            "retry_budget: backoff (0:00:30) is longer than backoff_cap (0:00:01)",
            id="backoff-over-its-cap",
        ),
    ],
)
def test_a_setting_a_limit_cannot_use_fails_the_load_in_one_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    """`burst` on a quota, `ttl` on a rate limit and a `backoff` longer than its
    `backoff_cap` are refused, each in one line naming the file, the line and
    what is wrong, by `check_config` and by the load alike."""
    path = tmp_path / "tether.yaml"
    path.write_text(text)

    checked = check_config(path)
    with pytest.raises(tether.ConfigError) as caught:
        load_settings(path)

    message = caught.value.message
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message
    assert [(p.line, str(p)) for p in checked.problems] == [(line, message)]
    assert checked.value is None


def test_the_same_settings_where_they_belong_load(tmp_path: Path) -> None:
    """`burst` on a rate limit, `ttl` on a concurrency limit and a backoff equal
    to its cap are fine."""
    path = tmp_path / "tether.yaml"
    path.write_text(
        "limits:\n"
        "  - {id: r, kind: rate, rate: 5/s, burst: 10}\n"
        "  - {id: c, kind: concurrency, max: 2, ttl: 2s}\n"
        "retry_budget: {backoff: 1s, backoff_cap: 1s}\n"
    )

    checked = check_config(path)

    assert not checked.problems, [str(p) for p in checked.problems]
    assert checked.value is not None
    assert [lim.id for lim in checked.value.limits] == ["r", "c"]


# -- the wall clock steps back -----------------------------------------------------------


def test_a_wall_clock_stepped_back_does_not_refuse_until_it_catches_up(
    tmp_path: Path, backend: str
) -> None:
    """After the wall clock steps back an hour (an NTP step, a VM restored), a
    rate limit of 1/s and a breaker open for 30 s refuse for no longer than
    their settings say, not for the hour the clock lost."""

    @tether.capability("up.read", effect="read", resource="up")
    def read(args: PayIn) -> PayOut:
        return PayOut()

    @tether.capability("up2.write", effect="write", idempotency="keyed", resource="up2")
    def write(args: PayIn) -> PayOut:
        if args.n == 0:
            raise ConnectionError("503 from upstream")
        return PayOut()

    config = (
        "limits:\n  - {id: r, kind: rate, rate: 1/s, resource: up}\n"
        "breakers:\n  - {id: br, resource: up2, window: 1, min_calls: 1,"
        " failure_rate: 1.0, open_for: 30s, on_open: read_only}\n"
    )
    with make_app(tmp_path, backend, config, read, write) as (app, clock):
        with app.run(principal=PRINCIPAL, request="before") as run:
            assert run.step("up.read", {"n": 1}).status is OutcomeStatus.EXECUTED
            assert run.step("up2.write", {"n": 0}).status is OutcomeStatus.FAILED
        clock.advance(timedelta(hours=-1))
        clock.advance(timedelta(seconds=60))

        with app.run(principal=PRINCIPAL, request="after") as run:
            first = run.step("up.read", {"n": 2})
            second = run.step("up.read", {"n": 3})
            probe = run.step("up2.write", {"n": 1})
        clock.advance(timedelta(seconds=1))
        with app.run(principal=PRINCIPAL, request="a second later") as run:
            third = run.step("up.read", {"n": 4})
        breaker = app.store.breaker_row("br")

    assert first.status is OutcomeStatus.EXECUTED
    # the rate holds again at once: the next call in the same instant waits 1 s
    assert second.status is OutcomeStatus.REFUSED
    assert isinstance(second.error, tether.LimitExceeded)
    assert second.error.retry_after == 1.0
    assert third.status is OutcomeStatus.EXECUTED
    # the breaker's cool-down is over: a trial call goes through and closes it
    assert probe.status is OutcomeStatus.EXECUTED
    assert breaker.state is BreakerState.CLOSED


def test_a_call_costing_more_than_the_whole_budget_says_it_can_never_fit(
    tmp_path: Path, backend: str
) -> None:
    """A call whose cost is more than the budget's whole amount is refused with
    a message saying it can never fit, and no time to retry after."""

    @tether.capability(
        "pay.refund", effect="write", idempotency="keyed", cost=lambda a: a.n
    )
    def refund(args: PayIn) -> PayOut:
        return PayOut()

    config = "limits:\n  - {id: b, kind: budget, per: day, amount: 5000}\n"
    with (
        make_app(tmp_path, backend, config, refund) as (app, _clock),
        app.run(principal=PRINCIPAL, request="big refund") as run,
    ):
        out = run.step("pay.refund", {"n": 6000})

    assert out.status is OutcomeStatus.REFUSED
    assert isinstance(out.error, tether.LimitExceeded)
    assert out.error.retry_after is None
    assert "more than the whole budget of 5000: it can never fit" in out.error.message


# -- 6. a retry passes the breaker again after its backoff -----------------------------------


class _TrippingClock(FakeClock):
    """A fake clock that runs `during` once, inside its next sleep (a retry's backoff)."""

    __slots__ = ("during",)

    def __init__(self) -> None:
        super().__init__()
        self.during: Callable[[], None] | None = None

    def sleep(self, seconds: float) -> None:
        during, self.during = self.during, None
        super().sleep(seconds)
        if during is not None:
            during()


TRIPPING = """\
breakers:
  - {id: br, resource: up, window: 2, min_calls: 2, failure_rate: 1.0, open_for: 30s,
     on_open: read_only}
retry_budget: {per_run: 5, max_attempts: 3, backoff: 1s, backoff_cap: 10s}
"""


def test_a_retry_is_not_made_once_another_call_opened_the_breaker_in_its_backoff(
    tmp_path: Path, backend: str
) -> None:
    """D.30: a failed call waits out its backoff; meanwhile another run's failure
    opens the breaker. The retry is not made (the upstream sees no call the
    breaker refuses everyone else): the failure goes back, and the record says
    the breaker stopped the retry."""
    clock = _TrippingClock()
    upstream: list[int] = []

    @tether.capability("up.write", effect="write", idempotency="keyed", resource="up")
    def write(args: PayIn) -> PayOut:
        upstream.append(args.n)
        if args.n == 0 or upstream.count(1) == 1:
            raise ConnectionError("upstream 503 Service Unavailable")
        return PayOut()

    with make_app(tmp_path, backend, TRIPPING, write, clock=clock) as (app, _):

        def another_call() -> None:
            with app.run(principal=PRINCIPAL, request="another call") as other:
                assert other.step("up.write", {"n": 0}).status is OutcomeStatus.FAILED

        clock.during = another_call
        with app.run(principal=PRINCIPAL, request="retried") as run:
            outcome = run.step("up.write", {"n": 1})
        row = app.store.breaker_row("br")
        step = [e.data() for e in app.store.events(run.id) if e.data().get("step") == 1]

    assert upstream == [1, 0]  # the failed attempt, then the other run's call
    assert outcome.status is OutcomeStatus.FAILED
    assert row.state is BreakerState.OPEN
    assert [e["kind"] for e in step][-3:] == [
        "retry_scheduled",
        "breaker_checked",
        "failed",
    ]
    checked = step[-2]
    assert (checked["breaker"], checked["state"], checked["admitted"]) == (
        "br",
        "open",
        False,
    )
    assert step[-1]["stage"] == "execute"
