"""`limits:`, `breakers:` and `retry_budget:` in tether.yaml: bad files, and budget throttles.

A mistake in a limit must fail the load with one line naming the file, the
line and what is wrong (the style of tests/test_policy_tooling.py); a budget
with a `throttle` slows calls that spend ahead of an even pace, never longer
than its `max_delay`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether.config import check_config, load_settings
from tether.record import OutcomeStatus
from tether.store._limits import to_us
from tether.testing import FakeClock, temporary_app, write_config

PRINCIPAL = tether.Principal("ops-bot", roles=["agent"], tenant="acme")

# -- bad files -------------------------------------------------------------------------------

BAD: list[Any] = [
    pytest.param(
        "limits:\n  - id: spend\n    kind: budget\n    per: day\n",
        2,
        "limits[0] (id 'spend'): a budget limit needs `amount`",
        id="budget-without-amount",
    ),
    pytest.param(
        "limits:\n  - id: spend\n    kind: budget\n    per: day\n    amount: 12.5\n",
        5,
        "amount: 12.5 is a float, which budgets cannot add exactly",
        id="float-amount",
    ),
    pytest.param(
        "limits:\n  - {id: spend, kind: budget, per: day, amount: -5}\n",
        2,
        "amount: -5 is not an amount >= 0",
        id="negative-amount",
    ),
    pytest.param(
        "limits:\n  - {id: q, kind: quota, max: 3, per: run}\n",
        2,
        "`per: run` counts over one run's lifetime: use `scope: run`",
        id="per-run-without-scope-run",
    ),
    pytest.param(
        "limits:\n  - {id: b, kind: budget, scope: run, per: run, amount: 10,"
        " throttle: {max_delay: 5s}}\n",
        2,
        "a throttle paces a window: use per minute, hour or day",
        id="throttle-over-a-run",
    ),
    pytest.param(
        "limits:\n  - {id: b, kind: budget, amount: 10, throttle: {max_delay: 5s}}\n",
        2,
        "a budget limit needs `per`",
        id="throttle-without-per",
    ),
    pytest.param(
        "limits:\n  - {id: q, kind: quota, max: 3, per: hour, throttle: {max_delay: 1s}}\n",
        2,
        "a quota limit takes no `throttle`",
        id="throttle-on-a-quota",
    ),
    pytest.param(
        "limits:\n  - {id: r, kind: rate, rate: fast}\n",
        2,
        "rate: 'fast' is not a rate; write calls per second (10) or '600/m'",
        id="rate-text",
    ),
    pytest.param(
        "limits:\n  - {id: r, kind: rate, rate: 10/x}\n",
        2,
        "rate: '10/x' is not a rate",
        id="rate-unit",
    ),
    pytest.param(
        "limits:\n  - {id: r, kind: rate, rate: 0}\n",
        2,
        "rate: 0 is not a rate",
        id="rate-zero",
    ),
    pytest.param(
        "limits:\n  - {id: r, kind: rate, rate: 2000000}\n",
        2,
        "rate: 2000000 is more than 1000000 calls per second",
        id="rate-finer-than-a-microsecond",
    ),
    pytest.param(
        "limits:\n  - {id: b, kind: budget, per: day, amount: 100,"
        " capability: Payments.Refund}\n",
        2,
        "capability: bad capability glob 'Payments.Refund': use lowercase names",
        id="capability-no-capability-can-have",
    ),
    pytest.param(
        "limits:\n  - {id: q, kind: quota, per: day, max: 5, capability: llm}\n",
        2,
        "model usage (`capability: llm`) is charged to budgets only",
        id="quota-on-model-usage",
    ),
    pytest.param(
        "limits:\n  - {id: b, kind: budget, per: day, amount: 5, cost: '1',"
        " capability: [llm]}\n",
        2,
        "use a budget without `cost`",
        id="budget-with-own-cost-on-model-usage",
    ),
    pytest.param(
        "breakers:\n  - id: a\n    resource: pay\n    window: 5\n    min_calls: 6\n",
        2,
        "min_calls 6 is more than the window (5); the breaker could never open",
        id="min-calls-over-window",
    ),
    pytest.param(
        "retry_budget:\n  per_run: 3\n  per_incident: 10\n",
        1,
        "per_incident and incident go together: name the context field",
        id="per-incident-without-incident",
    ),
    pytest.param(
        "retry_budget: {incident: ticket}\n",
        1,
        "per_incident and incident go together",
        id="incident-without-per-incident",
    ),
]


@pytest.mark.parametrize(("text", "line", "fragment"), BAD)
def test_a_bad_limit_fails_the_load_in_one_line_with_its_place(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    """`load_settings` raises one line, `FILE:LINE: ...`, saying what is wrong;
    `check_config` reports the same single problem."""
    path = tmp_path / "tether.yaml"
    path.write_text(text)

    checked = check_config(path)
    with pytest.raises(tether.ConfigError) as caught:
        load_settings(path)

    message = caught.value.message
    assert caught.value.code == "config_invalid"
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message
    assert [(p.line, str(p)) for p in checked.problems] == [(line, message)]
    assert checked.value is None


def test_a_quoted_decimal_amount_is_exact(tmp_path: Path) -> None:
    """`amount: '12.50'` loads as the exact decimal 12.50 (the float 12.5 does not)."""
    path = tmp_path / "tether.yaml"
    path.write_text(
        "limits:\n  - {id: spend, kind: budget, per: day, amount: '12.50',"
        " throttle: {max_delay: 2s, min_cost: '0.25'}}\n"
    )

    settings, _ = load_settings(path)

    (limit,) = settings.limits
    assert limit.amount == Decimal("12.50")
    assert str(limit.amount) == "12.50"
    assert limit.throttle is not None
    assert limit.throttle.min_cost == Decimal("0.25")


CROSS_SECTION = """\
rules:
  - id: spend
    match: {effect: write}
    decision: allow
    reason: writes are fine
limits:
  - {id: q, kind: quota, max: 3, per: hour}
  - {id: spend, kind: budget, per: day, amount: 5}
breakers:
  - {id: br, resource: pay}
"""
TWO_BREAKERS = """\
breakers:
  - {id: a, resource: pay}
  - {id: b, resource: pay}
"""


@pytest.mark.parametrize(
    ("text", "places"),
    [
        pytest.param(CROSS_SECTION, ("rules[0]", "limits[1]"), id="rule-and-limit"),
        pytest.param(
            "limits:\n  - {id: q, kind: quota, max: 3, per: hour}\n"
            "breakers:\n  - {id: q, resource: pay}\n",
            ("limits[0]", "breakers[0]"),
            id="limit-and-breaker",
        ),
        pytest.param(TWO_BREAKERS, ("breakers[0]", "breakers[1]"), id="two-breakers"),
    ],
)
def test_a_clash_between_items_names_both_places(
    tmp_path: Path, text: str, places: tuple[str, str]
) -> None:
    """An id used by a rule and a limit (or a limit and a breaker), or two breakers
    on one resource, fail the load in one line that names both items."""
    path = tmp_path / "tether.yaml"
    path.write_text(text)

    with pytest.raises(tether.ConfigError) as caught:
        load_settings(path)

    message = caught.value.message
    assert "\n" not in message
    assert message.startswith(f"{path}:"), message
    assert all(place in message for place in places), message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(CROSS_SECTION, 8, id="rule-and-limit"),
        pytest.param(TWO_BREAKERS, 3, id="two-breakers"),
    ],
)
def test_a_clash_points_at_the_second_item(
    tmp_path: Path, text: str, line: int
) -> None:
    """Like a duplicate rule id, the clash is reported at the item that repeats."""
    path = tmp_path / "tether.yaml"
    path.write_text(text)

    (problem,) = check_config(path).problems

    assert problem.line == line, str(problem)


def test_a_boolean_amount_is_not_called_a_float(tmp_path: Path) -> None:
    """`amount: true` is refused with a message that says what it is."""
    path = tmp_path / "tether.yaml"
    path.write_text("limits:\n  - {id: b, kind: budget, per: day, amount: true}\n")

    (problem,) = check_config(path).problems

    assert "float" not in problem.message, problem.message


# -- throttles -------------------------------------------------------------------------------


class JobIn(BaseModel, extra="forbid"):
    cost: int


class JobOut(BaseModel):
    started_at: str


@contextlib.contextmanager
def throttled_app(
    tmp_path: Path, throttle: str | None, *, amount: int = 3600
) -> Iterator[tuple[tether.Tether, FakeClock, list[int]]]:
    """Yield an app with an hourly budget (with `throttle`, if given) over `job.run`."""
    extra = "" if throttle is None else f", throttle: {{{throttle}}}"
    config = tmp_path / "tether.yaml"
    config.write_text(
        f"limits:\n  - {{id: pace, kind: budget, per: hour, amount: {amount}{extra}}}\n"
    )
    clock = FakeClock()
    started: list[int] = []

    @tether.capability(
        "job.run", effect="write", idempotency="keyed", cost=lambda a: a.cost
    )
    def job(args: JobIn) -> JobOut:
        started.append(to_us(clock.now()))
        return JobOut(started_at=clock.now().isoformat())

    with temporary_app(clock=clock, config=config) as app:
        app.register(job)
        yield app, clock, started


@pytest.fixture
def paced(tmp_path: Path) -> Iterator[tuple[tether.Tether, FakeClock, list[int]]]:
    """3600 an hour (an even pace of 1 a second), delays up to 10 s, calls under 2 never."""
    with throttled_app(tmp_path, "max_delay: 10s, min_cost: 2") as found:
        yield found


@pytest.fixture
def unpaced(tmp_path: Path) -> Iterator[tuple[tether.Tether, FakeClock, list[int]]]:
    """The same budget without a throttle."""
    with throttled_app(tmp_path, None) as found:
        yield found


def reserved(app: tether.Tether, run_id: str) -> list[int]:
    """Return `throttled_us` of each step's `limit_reserved` event, in order."""
    return [
        e.data()["throttled_us"]
        for e in app.store.events(run_id)
        if e.data()["kind"] == "limit_reserved"
    ]


SCRIPT = [  # (seconds to wait first, cost)
    (0, 3),  # the window's first spend: never slowed
    (0, 20),  # 23 by second 0: the pace allows it at second 23; waits the 10 s most
    (0, 1),  # under min_cost: never slowed
    (87, 5),  # at second 97, 29 spent: behind the pace, not slowed
    (0, 80),  # 109 by second 97: 12 s ahead; waits the 10 s most
    (0, 1),  # under min_cost: never slowed
    (0, 5),  # 115 by second 107: 8 s ahead; waits 8 s
]


def play(app: tether.Tether, clock: FakeClock) -> tuple[str, list[int], list[int]]:
    """Run the script; return the run id and how far the clock moved in each step."""
    moved: list[int] = []
    with app.run(principal=PRINCIPAL, request="jobs") as run:
        for wait, cost in SCRIPT:
            clock.advance(timedelta(seconds=wait))
            before = to_us(clock.now())
            outcome = run.step("job.run", {"cost": cost})
            assert outcome.status is OutcomeStatus.EXECUTED, outcome
            moved.append(to_us(clock.now()) - before)
    return run.id, moved, reserved(app, run.id)


def test_a_throttle_slows_calls_that_spend_ahead_of_the_pace(
    paced: tuple[tether.Tether, FakeClock, list[int]],
) -> None:
    """Each call waits until even spending would have reached it, at most max_delay;
    the wait is recorded as `throttled_us` and is what the clock moved."""
    app, clock, started = paced
    start = to_us(clock.now())

    _, moved, throttled = play(app, clock)

    s = 1_000_000
    assert throttled == [0, 10 * s, 0, 0, 10 * s, 0, 8 * s]
    assert moved == throttled
    assert [t - start for t in started] == [
        0,
        10 * s,
        10 * s,
        97 * s,
        107 * s,
        107 * s,
        115 * s,
    ]


def test_a_budget_without_a_throttle_never_slows(
    unpaced: tuple[tether.Tether, FakeClock, list[int]],
) -> None:
    """The same calls against a budget without `throttle` all start at once."""
    app, clock, _ = unpaced

    _, moved, throttled = play(app, clock)

    assert throttled == [0] * len(SCRIPT)
    assert moved == [0] * len(SCRIPT)


def test_a_call_that_does_not_fit_is_refused_not_slowed(
    paced: tuple[tether.Tether, FakeClock, list[int]],
) -> None:
    """A call over what is left is refused at once (LimitExceeded), without waiting."""
    app, clock, started = paced
    before = clock.now()

    with app.run(principal=PRINCIPAL, request="too big") as run:
        outcome = run.step("job.run", {"cost": 3601})

    assert isinstance(outcome.error, tether.LimitExceeded)
    assert outcome.error.limit_id == "pace"
    assert clock.now() == before
    assert started == []


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_a_throttle_never_waits_longer_than_max_delay(
    tmp_path: Path, seed: int
) -> None:
    """Random costs at random times: every wait is the gap to the even pace, capped at
    max_delay, none for calls under min_cost, and exactly what the clock moved."""
    rng = random.Random(seed)
    hour = 3_600_000_000
    most = 2_000_000
    with throttled_app(tmp_path, "max_delay: 2s, min_cost: 3", amount=18000) as (
        app,
        clock,
        _,
    ):
        start = to_us(clock.now())
        seen: set[str] = set()
        with app.run(principal=PRINCIPAL, request="jobs") as run:
            spent = 0
            for i in range(60):  # bursts of a dozen calls, then quieter spells
                wait = 0 if i % 20 < 12 else rng.choice([1, 2, 5, 10, 30])
                clock.advance(timedelta(seconds=wait))
                cost = rng.randint(0, 20)
                before = to_us(clock.now())
                outcome = run.step("job.run", {"cost": cost})
                moved = to_us(clock.now()) - before
                if outcome.status is not OutcomeStatus.EXECUTED:
                    assert isinstance(outcome.error, tether.LimitExceeded)
                    assert spent + cost > 18000, f"seed {seed}"
                    assert moved == 0, f"seed {seed}"
                    continue
                (throttled,) = reserved(app, run.id)[-1:]
                due = start + Fraction(hour) * (spent + cost) / 18000
                # the window's first spend is never slowed, nor a cheap call
                gap = max(int(due) - before, 0) if cost >= 3 and spent else 0
                assert throttled == min(gap, most), f"seed {seed}"
                assert moved == throttled, f"seed {seed}"
                spent += cost
                seen.add(
                    "none" if not throttled else "max" if throttled == most else "gap"
                )
        assert to_us(clock.now()) - start < hour  # one window throughout
    assert {"none", "max"} <= seen, f"seed {seed}: the throttle was never tested"


class _Ping(BaseModel):
    host: str


class _Pong(BaseModel):
    up: bool


@tether.capability("net.slowping", effect="read", resource="net", timeout=20)
def _slow_ping(args: _Ping) -> _Pong:
    return _Pong(up=True)


def test_a_capability_slower_than_its_breakers_trial_deadline_is_refused(
    tmp_path: Path,
) -> None:
    """A trial call could outlast `probe_timeout` and reopen the breaker while it still runs: register says so."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "breakers:\n  - {id: net-br, resource: net, probe_timeout: 10s}\n"
    )
    with (
        tether.Tether(db="memory://", config=config, env={}) as app,
        pytest.raises(tether.UsageError, match="probe_timeout") as refused,
    ):
        app.register(_slow_ping)

    assert "net-br" in refused.value.message
    assert "net.slowping" in refused.value.message


def test_a_reload_that_makes_a_trial_deadline_too_short_keeps_the_last_good_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hot reload refuses a breaker whose probe_timeout is shorter than a registered capability's timeout."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "breakers:\n  - {id: net-br, resource: net, probe_timeout: 30s}\n"
    )
    with tether.Tether(db="memory://", config=config, env={}) as app:
        app.register(_slow_ping)
        write_config(
            config,
            "breakers:\n  - {id: net-br, resource: net, probe_timeout: 5s}\n# edited\n",
        )
        with caplog.at_level("WARNING", logger="tether.app"):
            app.current_policy()
        guards = app.guards

    assert guards is not None
    (kept,) = guards.breakers.breakers
    assert kept.probe_timeout.total_seconds() == 30
    assert any(r.getMessage() == "policy.reload_failed" for r in caplog.records)
