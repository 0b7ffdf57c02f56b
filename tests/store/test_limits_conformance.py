"""Limits behave the same on every store backend (RELIABILITY F.37 for C's limits).

Each test drives a `Tether` app, as a user would, on `memory://`, on a SQLite
file and on PostgreSQL (a fresh schema per app, see `_postgres.py`), and reads the outcome three ways: what the step returned, what its record
says, and what `store.limit_rows` holds. The fake clock moves time; nothing sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether import gateway
from tether._effects import Execute, Flow
from tether.store import KeyId
from tether.store._base import LimitRow
from tether.store._breakers import BreakerState
from tether.testing import FakeClock

BOT = tether.Principal("pay-bot", tenant="acme")
TWIN = tether.Principal("pay-twin", tenant="acme")
STRANGER = tether.Principal("pay-bot", tenant="globex")
US = 1_000_000


class ChargeIn(BaseModel, extra="forbid"):
    amount: int
    """The estimate: budgets reserve it."""
    actual: int | None = None
    """What the call reports it cost (default: the estimate)."""
    fail: bool = False


class ChargeOut(BaseModel):
    actual: int


class Handler:
    """What the capabilities do: count calls, run a hook inside, fail when asked."""

    def __init__(self) -> None:
        self.calls = 0
        self.during: Callable[[], None] | None = None

    def __call__(self, args: ChargeIn) -> ChargeOut:
        self.calls += 1
        if self.during is not None:
            self.during()
        if args.fail:
            raise RuntimeError("upstream 503")
        return ChargeOut(actual=args.amount if args.actual is None else args.actual)


def capabilities(handler: Handler) -> list[tether.Capability[ChargeIn, ChargeOut]]:
    """`pay.charge` (keyed, settles at its reported cost), `pay.refund` (keyed), `pay.unsure` (no key: in doubt when it fails)."""

    def charge(args: ChargeIn) -> ChargeOut:
        return handler(args)

    def unsure(args: ChargeIn) -> ChargeOut:
        return handler(args)

    def refund(args: ChargeIn) -> ChargeOut:
        return handler(args)

    return [
        tether.capability(
            "pay.charge",
            effect="write",
            idempotency="keyed",
            cost=lambda a: a.amount,
            actual_cost=lambda o: o.actual,
        )(charge),
        tether.capability(
            "pay.unsure", effect="write", idempotency="none", cost=lambda a: a.amount
        )(unsure),
        tether.capability(
            "pay.refund", effect="write", idempotency="keyed", cost=lambda a: a.amount
        )(refund),
    ]


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend under test."""
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when the test says (2026-01-01 00:00 UTC: windows start there)."""
    return FakeClock()


@pytest.fixture
def handler() -> Handler:
    """The capabilities' shared behaviour."""
    return Handler()


@pytest.fixture
def make_app(
    backend: str,
    tmp_path: Path,
    clock: FakeClock,
    handler: Handler,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[[str], tether.Tether]]:
    """Return a function that opens a fresh app on the backend with `limits:` as given."""
    opened: list[tether.Tether] = []
    fresh_postgres: Callable[[], str] | None = (
        request.getfixturevalue("postgres_urls") if backend == "postgres" else None
    )

    def make(limits: str) -> tether.Tether:
        folder = tmp_path / f"app-{len(opened)}"
        folder.mkdir()
        config = folder / "tether.yaml"
        config.write_text(f"limits:\n{limits}")
        if fresh_postgres is not None:
            db = fresh_postgres()
        elif backend == "sqlite":
            db = f"sqlite:///{folder / 'tether.db'}?synchronous=normal"
        else:
            db = "memory://"
        app = tether.Tether(db=db, config=config, env={}, clock=clock)
        app.register(*capabilities(handler))
        opened.append(app)
        return app

    yield make
    for app in opened:
        app.close()


def rows(app: tether.Tether, clock: FakeClock) -> dict[str, LimitRow]:
    """Return the live limit rows by `limit_id/scope` (one window each in these tests)."""
    found: dict[str, LimitRow] = {}
    for r in app.store.limit_rows(clock.now()):
        name = f"{r.limit_id}/{r.scope}"
        assert name not in found, f"{name} has rows in two windows"
        found[name] = r
    return found


def state(
    app: tether.Tether, clock: FakeClock, name: str
) -> tuple[Decimal, Decimal, int]:
    """Return `(used, held, holds)` of one limit row; zeros when it has none."""
    r = rows(app, clock).get(name)
    return (Decimal(0), Decimal(0), 0) if r is None else (r.used, r.held, r.holds)


def room(used: int, held: int, holds: int) -> tuple[Decimal, Decimal, int]:
    """Spell a `state` to compare with: used, held, and the number of live holds."""
    return Decimal(used), Decimal(held), holds


def step_events(app: tether.Tether, run_id: str, step: int) -> list[dict[str, Any]]:
    """Return one step's events, in order."""
    return [e.data() for e in app.store.events(run_id) if e.data()["step"] == step]


def limit_of(outcome: tether.Outcome) -> tuple[str, str | None]:
    """Return the outcome's error code and the limit it names."""
    assert outcome.error is not None, outcome
    return outcome.error.code, getattr(outcome.error, "limit_id", None)


BUDGET = "  - {id: budget, kind: budget, scope: tenant, per: day, amount: 10}\n"


# -- budgets ---------------------------------------------------------------------------


def test_a_budget_refusal_writes_no_intent_no_hold_and_no_key(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, handler: Handler
) -> None:
    """A call that does not fit is refused saying what is left; nothing ran, nothing is held, its key is unclaimed."""
    app = make_app(BUDGET)
    with app.run(principal=BOT, request="charge twice") as run:
        first = run.step("pay.charge", {"amount": 6})
        before = rows(app, clock)
        refused = run.step("pay.charge", {"amount": 5}, idempotency_key="k-2")
    after = rows(app, clock)
    events = step_events(app, run.id, refused.step)
    key = app.store.lookup_key(
        KeyId(tenant="acme", principal_id="pay-bot", capability="pay.charge", key="k-2")
    )

    assert first.status is tether.OutcomeStatus.EXECUTED
    assert refused.status is tether.OutcomeStatus.REFUSED
    assert isinstance(refused.error, tether.LimitExceeded)
    assert (refused.error.code, refused.error.limit_id) == ("limit_exceeded", "budget")
    assert refused.error.left == 4
    assert handler.calls == 1
    kinds = [e["kind"] for e in events]
    assert "intent" not in kinds
    assert "limit_reserved" not in kinds
    assert kinds[-2:] == ["limit_refused", "failed"]
    assert events[-1]["stage"] == "limits"
    refusal = events[-2]
    assert (refusal["limit"], refusal["requested"], refusal["left"]) == (
        "budget",
        "5",
        "4",
    )
    assert before == after
    assert (after["budget/acme"].used, after["budget/acme"].holds) == (Decimal(6), 0)
    assert key is None


def test_a_reservation_is_held_while_the_call_runs_and_released_when_it_fails(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, handler: Handler
) -> None:
    """While a call of 7 runs, 7 is held and a call of 4 elsewhere is refused; the failed call then releases it all."""
    app = make_app(BUDGET)
    seen: list[tuple[Decimal, Decimal, int]] = []
    elsewhere: list[tether.Outcome] = []

    def during() -> None:
        handler.during = None
        seen.append(state(app, clock, "budget/acme"))
        with app.run(principal=TWIN, request="meanwhile") as other:
            elsewhere.append(other.step("pay.charge", {"amount": 4}))

    handler.during = during
    with app.run(principal=BOT, request="charge") as run:
        failed = run.step("pay.charge", {"amount": 7, "fail": True})
        after_failure = state(app, clock, "budget/acme")
        retried = run.step("pay.charge", {"amount": 10})
    settled = [
        e for e in step_events(app, run.id, failed.step) if e["kind"] == "limit_settled"
    ]

    assert seen == [room(0, 7, 1)]
    assert limit_of(elsewhere[0]) == ("limit_exceeded", "budget")
    assert isinstance(elsewhere[0].error, tether.LimitExceeded)
    assert elsewhere[0].error.left == 3
    assert failed.status is tether.OutcomeStatus.FAILED
    assert after_failure == room(0, 0, 0)
    assert [line["actual"] for line in settled[0]["limits"]] == [None]
    assert retried.status is tether.OutcomeStatus.EXECUTED  # the whole budget was back


def test_one_counter_reads_as_the_whole_list_shows_it(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, handler: Handler
) -> None:
    """`limit_row` (what a planner turn's check reads) agrees with `limit_rows`, holds included."""
    app = make_app(BUDGET)
    day = int(clock.now().timestamp()) // 86400 * 86400 * US  # the window's start
    seen: list[LimitRow | None] = []

    def during() -> None:
        handler.during = None
        seen.append(app.store.limit_row("budget", "acme", day, clock.now()))

    with app.run(principal=BOT, request="charge") as run:
        run.step("pay.charge", {"amount": 3})
        handler.during = during
        run.step("pay.charge", {"amount": 4})
    whole = rows(app, clock)["budget/acme"]
    one = app.store.limit_row("budget", "acme", day, clock.now())

    assert [(r.used, r.held, r.holds) for r in seen if r is not None] == [
        (Decimal(3), Decimal(4), 1)
    ]
    assert one == whole
    assert one is not None
    assert (one.used, one.held, one.holds) == (Decimal(7), Decimal(0), 0)
    assert app.store.limit_row("budget", "globex", day, clock.now()) is None
    assert app.store.limit_row("budget", "acme", day + 86400 * US, clock.now()) is None


def test_a_budget_settles_at_the_actual_cost_below_and_above_the_estimate(
    make_app: Callable[[str], tether.Tether], clock: FakeClock
) -> None:
    """Estimate 6 settling at 2, then estimate 3 settling at 5: 7 is used, and the record shows each reserve and actual."""
    app = make_app(BUDGET)
    with app.run(principal=BOT, request="charge") as run:
        below = run.step("pay.charge", {"amount": 6, "actual": 2})
        middle = state(app, clock, "budget/acme")
        above = run.step("pay.charge", {"amount": 3, "actual": 5})
    lines = [
        (e["limits"][0]["reserved"], e["limits"][0]["actual"])
        for e in (x.data() for x in app.store.events(run.id))
        if e["kind"] == "limit_settled"
    ]

    assert (below.status, above.status) == (tether.OutcomeStatus.EXECUTED,) * 2
    assert middle == room(2, 0, 0)
    assert state(app, clock, "budget/acme") == room(7, 0, 0)
    assert lines == [("6", "2"), ("3", "5")]


def test_a_budget_hold_whose_worker_stopped_lapses_after_its_ttl_and_stays_charged(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, handler: Handler
) -> None:
    """A call stuck holding 8 of 10 lapses after its 2 s ttl; like a call in doubt, its 8 counts as spent (its upstream may have acted), so another 8 is still refused, with 2 left; when the call does answer, its answer replaces that charge."""
    app = make_app(
        "  - {id: budget, kind: budget, scope: tenant, per: day, amount: 10, ttl: 2s}\n"
    )
    inside, release = threading.Event(), threading.Event()
    stuck: list[tether.Outcome] = []

    def during() -> None:
        handler.during = None
        inside.set()
        assert release.wait(timeout=10)

    def stuck_call() -> None:
        with app.run(principal=BOT, request="stuck") as run:
            stuck.append(run.step("pay.charge", {"amount": 8, "fail": True}))

    handler.during = during
    worker = threading.Thread(target=stuck_call)
    worker.start()
    try:
        assert inside.wait(timeout=10)
        with app.run(principal=TWIN, request="meanwhile") as run:
            early = run.step("pay.charge", {"amount": 8})
            hold = state(app, clock, "budget/acme")
            clock.advance(timedelta(seconds=2))
            lapsed = state(app, clock, "budget/acme")
            late = run.step("pay.charge", {"amount": 8})
    finally:
        release.set()
        worker.join(timeout=10)

    assert limit_of(early) == ("limit_exceeded", "budget")
    assert hold == room(0, 8, 1)
    assert lapsed == room(8, 0, 0)  # no longer held: spent, as a call in doubt is
    assert limit_of(late) == ("limit_exceeded", "budget")
    assert isinstance(late.error, tether.LimitExceeded)
    assert late.error.left == Decimal(2)
    assert stuck[0].status is tether.OutcomeStatus.FAILED
    assert state(app, clock, "budget/acme") == room(0, 0, 0)  # it failed: nothing spent


def test_a_lapsed_hold_already_counted_as_spent_is_replaced_by_the_late_answer(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, handler: Handler
) -> None:
    """A stuck call's lapsed 6 is folded in as spent when another call reserves; when the stuck call then succeeds at 5, the budget holds 5 + 2, never 6 + 5 + 2."""
    app = make_app(
        "  - {id: budget, kind: budget, scope: tenant, per: day, amount: 20, ttl: 2s}\n"
    )
    inside, release = threading.Event(), threading.Event()
    stuck: list[tether.Outcome] = []

    def during() -> None:
        handler.during = None
        inside.set()
        assert release.wait(timeout=10)

    def stuck_call() -> None:
        with app.run(principal=BOT, request="stuck") as run:
            stuck.append(run.step("pay.charge", {"amount": 6, "actual": 5}))

    handler.during = during
    worker = threading.Thread(target=stuck_call)
    worker.start()
    try:
        assert inside.wait(timeout=10)
        clock.advance(timedelta(seconds=2))
        with app.run(principal=TWIN, request="meanwhile") as run:
            other = run.step("pay.charge", {"amount": 2})
        folded = state(app, clock, "budget/acme")
    finally:
        release.set()
        worker.join(timeout=10)

    assert other.status is tether.OutcomeStatus.EXECUTED
    assert folded == room(8, 0, 0)  # the lapsed 6 counted as spent, plus 2
    assert stuck[0].status is tether.OutcomeStatus.EXECUTED
    assert state(app, clock, "budget/acme") == room(7, 0, 0)


def test_a_call_in_doubt_keeps_its_estimate_charged(
    make_app: Callable[[str], tether.Tether], clock: FakeClock
) -> None:
    """A write without a key that raises is in doubt: its 6 stays spent (the upstream may have acted), so a call of 5 no longer fits."""
    app = make_app(BUDGET)
    with app.run(principal=BOT, request="unsure") as run:
        unsure = run.step("pay.unsure", {"amount": 6, "fail": True})
        charged = state(app, clock, "budget/acme")
        next_call = run.step("pay.charge", {"amount": 5})
    settled = [
        e for e in step_events(app, run.id, unsure.step) if e["kind"] == "limit_settled"
    ]

    assert unsure.status is tether.OutcomeStatus.IN_DOUBT
    assert charged == room(6, 0, 0)
    assert [line["actual"] for line in settled[0]["limits"]] == ["6"]
    assert limit_of(next_call) == ("limit_exceeded", "budget")


def test_a_retry_of_a_finished_keyed_call_is_answered_free_even_with_the_limits_spent(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, handler: Handler
) -> None:
    """Same key, same args after budget and quota are spent: an idempotent hit with the stored output, nothing charged, nothing refused."""
    app = make_app(
        BUDGET + "  - {id: once, kind: quota, scope: tenant, per: hour, max: 1}\n"
    )
    with app.run(principal=BOT, request="charge") as run:
        done = run.step("pay.charge", {"amount": 10}, idempotency_key="order-1")
    spent = rows(app, clock)
    with app.run(principal=BOT, request="charge again") as again:
        hit = again.step("pay.charge", {"amount": 10}, idempotency_key="order-1")
        fresh = again.step("pay.charge", {"amount": 1}, idempotency_key="order-2")
    hit_kinds = [e["kind"] for e in step_events(app, again.id, hit.step)]

    assert done.status is tether.OutcomeStatus.EXECUTED
    assert hit.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert hit.output == done.output
    assert handler.calls == 1
    assert "limit_refused" not in hit_kinds
    assert "limit_reserved" not in hit_kinds
    assert (spent["budget/acme"].used, spent["once/acme"].used) == (
        Decimal(10),
        Decimal(1),
    )
    assert limit_of(fresh) == ("limit_exceeded", "budget")  # spent indeed
    assert rows(app, clock) == spent


# -- quotas, scopes, leases, rates ----------------------------------------------------


def test_a_quota_refuses_until_its_window_turns_then_counts_afresh(
    make_app: Callable[[str], tether.Tether], clock: FakeClock
) -> None:
    """Two calls a minute: the third is refused with retry_after to the minute's end, refused 1 µs before it, admitted at it."""
    app = make_app("  - {id: q, kind: quota, per: minute, max: 2}\n")
    clock.advance(timedelta(seconds=10))
    with app.run(principal=BOT, request="charge") as run:
        ok = [run.step("pay.refund", {"amount": 1}) for _ in range(2)]
        third = run.step("pay.refund", {"amount": 1})
        clock.advance(timedelta(seconds=50) - timedelta(microseconds=1))
        just_before = run.step("pay.refund", {"amount": 1})
        clock.advance(timedelta(microseconds=1))
        next_window = [run.step("pay.refund", {"amount": 1}) for _ in range(3)]
    counters = sorted(
        (r.window, r.used)
        for r in app.store.limit_rows(clock.now())
        if r.limit_id == "q"
    )

    assert [o.status for o in ok] == [tether.OutcomeStatus.EXECUTED] * 2
    assert limit_of(third) == ("limit_exceeded", "q")
    assert isinstance(third.error, tether.LimitExceeded)
    assert third.error.retry_after == 50
    assert limit_of(just_before) == ("limit_exceeded", "q")
    assert [o.status for o in next_window[:2]] == [tether.OutcomeStatus.EXECUTED] * 2
    assert limit_of(next_window[2]) == ("limit_exceeded", "q")
    assert [used for _, used in counters] == [2, 2]


# Who shares a counter with the first call (BOT, run 1, pay.charge), by the limit's scope.
SHARED = {
    "global": {"same run", "other run", "twin", "other tenant", "other capability"},
    "tenant": {"same run", "other run", "twin", "other capability"},
    "principal": {"same run", "other run", "other capability"},
    "run": {"same run", "other capability"},
    "capability": {"same run", "other run", "twin", "other tenant"},
}
SCOPE_KEYS = {
    "global": "*",
    "tenant": "acme",
    "principal": "acme/pay-bot",
    "capability": "pay.charge",
}


@pytest.mark.parametrize("scope", sorted(SHARED))
def test_scope_keys_give_each_run_principal_tenant_or_capability_its_own_counter(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, scope: str
) -> None:
    """A quota of 1 per scope: a second call is refused exactly when it falls in the first call's scope."""
    per = "run" if scope == "run" else "hour"
    limit = f"  - {{id: q, kind: quota, scope: {scope}, per: {per}, max: 1}}\n"
    seconds = {
        "same run": (BOT, True, "pay.charge"),
        "other run": (BOT, False, "pay.charge"),
        "twin": (TWIN, False, "pay.charge"),
        "other tenant": (STRANGER, False, "pay.charge"),
        "other capability": (BOT, True, "pay.refund"),
    }
    for what, (principal, same_run, capability) in seconds.items():
        app = make_app(limit)
        with app.run(principal=BOT, request="first") as first_run:
            first = first_run.step("pay.charge", {"amount": 1})
            if same_run:
                second = first_run.step(capability, {"amount": 1})
        if not same_run:
            with app.run(principal=principal, request="second") as second_run:
                second = second_run.step(capability, {"amount": 1})
        keys = {r.scope for r in app.store.limit_rows(clock.now()) if r.limit_id == "q"}

        assert first.status is tether.OutcomeStatus.EXECUTED, what
        if what in SHARED[scope]:
            assert limit_of(second) == ("limit_exceeded", "q"), what
        else:
            assert second.status is tether.OutcomeStatus.EXECUTED, what
        assert SCOPE_KEYS.get(scope, first_run.id) in keys, what


def test_a_concurrency_lease_is_given_back_whether_the_call_succeeds_or_fails(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, handler: Handler
) -> None:
    """Cap 1: while a call runs a second is refused; after it fails, and after it succeeds, the next call is admitted."""
    app = make_app("  - {id: one, kind: concurrency, max: 1}\n")
    meanwhile: list[tether.Outcome] = []

    def during() -> None:
        handler.during = None
        with app.run(principal=TWIN, request="meanwhile") as other:
            meanwhile.append(other.step("pay.refund", {"amount": 1}))

    handler.during = during
    with app.run(principal=BOT, request="charge") as run:
        outcomes = [
            run.step("pay.charge", {"amount": 1, "fail": True}),
            run.step("pay.charge", {"amount": 1}),
            run.step("pay.charge", {"amount": 1}),
        ]

    assert limit_of(meanwhile[0]) == ("limit_exceeded", "one")
    assert [o.status for o in outcomes] == [
        tether.OutcomeStatus.FAILED,
        tether.OutcomeStatus.EXECUTED,
        tether.OutcomeStatus.EXECUTED,
    ]
    assert state(app, clock, "one/*") == room(0, 0, 0)


def test_a_rate_refusal_says_exactly_when_the_next_call_fits(
    make_app: Callable[[str], tether.Tether], clock: FakeClock
) -> None:
    """Rate 4/s, burst 2: the third call at once is refused with retry_after 250 ms; 1 µs early is refused, on time is admitted."""
    app = make_app("  - {id: r, kind: rate, rate: 4/s, burst: 2}\n")
    with app.run(principal=BOT, request="burst") as run:
        burst = [run.step("pay.refund", {"amount": 1}) for _ in range(2)]
        third = run.step("pay.refund", {"amount": 1})
        assert isinstance(third.error, tether.LimitExceeded), third
        wait = third.error.retry_after
        clock.advance(timedelta(seconds=0.25) - timedelta(microseconds=1))
        early = run.step("pay.refund", {"amount": 1})
        clock.advance(timedelta(microseconds=1))
        on_time = run.step("pay.refund", {"amount": 1})

    assert [o.status for o in burst] == [tether.OutcomeStatus.EXECUTED] * 2
    assert limit_of(third) == ("limit_exceeded", "r")
    assert wait == 0.25
    assert limit_of(early) == ("limit_exceeded", "r")
    assert on_time.status is tether.OutcomeStatus.EXECUTED


# -- breakers --------------------------------------------------------------------------


def _to_execute(run: tether.Run, args: dict[str, Any]) -> tuple[Flow, Execute]:
    """Take a step of `up.call` up to its handler; return the flow and its `Execute`."""
    flow = gateway.step(run, run.app.capabilities.get("up.call"), args)
    reply: object = None
    while True:
        effect = flow.send(reply)
        if isinstance(effect, Execute):
            return flow, effect
        reply = effect.perform()


def _finish(flow: Flow, execute: Execute) -> tether.Outcome:
    """Run the handler and drive the step to its end."""
    reply: object = execute.perform()
    while True:
        try:
            effect = flow.send(reply)
        except StopIteration as done:
            outcome: tether.Outcome = done.value
            return outcome
        reply = effect.perform()


def test_each_trial_call_has_its_own_deadline(
    make_app: Callable[[str], tether.Tether], clock: FakeClock
) -> None:
    """A half-open breaker keeps when each unanswered trial call was let through:
    once the first answers, it waits for the second from the second's admission."""
    app = make_app(
        "  []\nbreakers:\n  - {id: br, resource: up, window: 1, min_calls: 1, "
        "failure_rate: 1.0, open_for: 10s, half_open_calls: 2, probe_timeout: 60s, "
        "on_open: read_only}\n"
    )

    @tether.capability("up.call", effect="write", idempotency="keyed", resource="up")
    def call(args: ChargeIn) -> ChargeOut:
        if args.fail:
            raise RuntimeError("upstream 503")
        return ChargeOut(actual=args.amount)

    app.register(call)
    with app.run(principal=BOT, request="open it") as run:
        run.step("up.call", {"amount": 1, "fail": True})
    clock.advance(timedelta(seconds=10))
    first, second = (app.run(principal=BOT, request=f"trial {n}") for n in (1, 2))
    first.__enter__()
    flow_a, exec_a = _to_execute(first, {"amount": 1})
    clock.advance(timedelta(seconds=50))
    second.__enter__()
    flow_b, exec_b = _to_execute(second, {"amount": 2})
    admitted = app.store.breaker_row("br")
    clock.advance(timedelta(seconds=5))
    done_a = _finish(flow_a, exec_a)
    answered = app.store.breaker_row("br")
    clock.advance(timedelta(seconds=6))  # past the first's deadline
    done_b = _finish(flow_b, exec_b)
    for run in (first, second):
        run.__exit__(None, None, None)
    closed = app.store.breaker_row("br")

    start = admitted.since
    assert (admitted.state, admitted.probes) == (BreakerState.HALF_OPEN, 2)
    assert admitted.probe_deadline == start + 60 * US
    assert (
        answered.probe_deadline == start + 110 * US
    )  # the second's, admitted at +50 s
    assert (done_a.status, done_b.status) == (tether.OutcomeStatus.EXECUTED,) * 2
    assert closed.state is BreakerState.CLOSED
