"""Where the idempotency lookup sits on the call path (RELIABILITY.md B.10, B.14).

DESIGN.md orders the stages policy -> idempotency lookup -> limits -> breaker
-> claim: a retry of a finished call is answered from its key without being
charged or refused by a breaker, but never past a policy that now denies it;
a call in progress refuses its retry before any limit is asked; and a call
refused before it started leaves its key free. Each test drives a `Tether` app
as a user would, on `memory://`, on a SQLite file and on PostgreSQL, and reads
the stores' own rows (`lookup_key`, `breaker_row`, `limit_rows`) besides the
outcome. The fake clock moves time; nothing sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

import tether
from tether.store import KeyId, KeyRecord, KeyState
from tether.store._base import LimitRow
from tether.store._breakers import BreakerState
from tether.testing import FakeClock, write_config

BOT = tether.Principal("pay-bot", roles=["agent"], tenant="acme")
KEY = "charge-o-1"
ARGS: dict[str, Any] = {"order_id": "o-1", "amount": 30}
BREAKER = "pay-br"
OPEN_FOR = timedelta(seconds=10)


# -- the capabilities and their fake upstream -----------------------------------------


class ChargeIn(BaseModel, extra="forbid"):
    order_id: str
    amount: int = Field(gt=0)
    """What the call costs: budgets reserve it."""


class ChargeOut(BaseModel):
    charge_id: str
    key: str | None


class PokeIn(BaseModel, extra="forbid"):
    fail: bool


class PokeOut(BaseModel):
    ok: bool


class Upstream:
    """A fake payments API: it counts charges by key; a gate holds charges inside it."""

    def __init__(self) -> None:
        self.charges: list[str | None] = []
        """The idempotency key of every charge handler call, in order."""
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        """While set to an unset event, a charge waits inside the handler for it."""

    def charge(self, args: ChargeIn, ctx: tether.CallContext) -> ChargeOut:
        self.charges.append(ctx.idempotency_key)
        if self.gate is not None:
            self.entered.set()
            assert self.gate.wait(10), "the test never released the charge"
        return ChargeOut(charge_id=f"ch-{len(self.charges)}", key=ctx.idempotency_key)

    def poke(self, args: PokeIn) -> PokeOut:
        if args.fail:
            raise ConnectionError("pay-api 503")
        return PokeOut(ok=True)


def capabilities(upstream: Upstream) -> list[tether.Capability[Any, Any]]:
    """`pay.charge` (keyed, costs its amount) and `pay.poke`, both on resource `pay-api`."""

    def charge(args: ChargeIn, ctx: tether.CallContext) -> ChargeOut:
        return upstream.charge(args, ctx)

    def poke(args: PokeIn) -> PokeOut:
        return upstream.poke(args)

    return [
        tether.capability(
            "pay.charge",
            effect="write",
            idempotency="keyed",
            resource="pay-api",
            cost=lambda a: a.amount,
        )(charge),
        tether.capability(
            "pay.poke", effect="write", idempotency="keyed", resource="pay-api"
        )(poke),
    ]


def config(
    *,
    budget: int = 100,
    on_open: str = "read_only",
    deny_bot: bool = False,
    extra_limits: str = "",
) -> str:
    """Return a `tether.yaml`: a daily tenant budget, the breaker, maybe a deny rule.

    The breaker opens on one failure once its window of 4 holds a failure rate
    of 0.5, so a window holding one success (`0`) and one failure opens it.
    """
    text = (
        "defaults: {read: allow, write: allow, destructive: allow}\n"
        "limits:\n"
        f"  - {{id: budget, kind: budget, scope: tenant, per: day, amount: {budget}}}\n"
        + extra_limits
        + "breakers:\n"
        f"  - {{id: {BREAKER}, resource: pay-api, window: 4, min_calls: 1, "
        f"failure_rate: 0.5, open_for: {OPEN_FOR.seconds}s, half_open_calls: 1, "
        f"probe_timeout: 60s, on_open: {on_open}}}\n"
    )
    if deny_bot:
        text += (
            "rules:\n"
            "  - id: pay-bot-frozen\n"
            "    match: {capability: pay.charge}\n"
            "    when: \"principal.id == 'pay-bot'\"\n"
            "    decision: deny\n"
            "    reason: pay-bot is frozen\n"
        )
    return text


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend under test."""
    return str(request.param)


@pytest.fixture
def upstream() -> Upstream:
    """A fresh fake upstream."""
    return Upstream()


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """Where the app's `tether.yaml` lives (rewrite it with `write_config`)."""
    return tmp_path / "tether.yaml"


@pytest.fixture
def make_app(
    backend: str,
    tmp_path: Path,
    config_path: Path,
    clock: FakeClock,
    upstream: Upstream,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[[str], tether.Tether]]:
    """Return a function that opens an app on the backend with `tether.yaml` as given."""
    opened: list[tether.Tether] = []

    def make(text: str) -> tether.Tether:
        write_config(config_path, text)
        if backend == "postgres":
            db = request.getfixturevalue("postgres_urls")()
        elif backend == "sqlite":
            db = f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
        else:
            db = "memory://"
        app = tether.Tether(db=db, config=config_path, env={}, clock=clock)
        app.register(*capabilities(upstream))
        opened.append(app)
        return app

    yield make
    for app in opened:
        app.close()


# -- helpers -------------------------------------------------------------------------------


def key_record(app: tether.Tether, key: str = KEY) -> KeyRecord | None:
    """Return what the store holds under `key` for BOT's `pay.charge`, if anything."""
    return app.store.lookup_key(
        KeyId(tenant=BOT.tenant, principal_id=BOT.id, capability="pay.charge", key=key)
    )


def limits(app: tether.Tether, clock: FakeClock) -> dict[str, LimitRow]:
    """Return the live limit rows by `limit_id/scope`."""
    return {f"{r.limit_id}/{r.scope}": r for r in app.store.limit_rows(clock.now())}


def held(
    app: tether.Tether, clock: FakeClock, name: str
) -> tuple[Decimal, Decimal, int]:
    """Return `(used, held, holds)` of one limit row; zeros when it has none."""
    r = limits(app, clock).get(name)
    return (Decimal(0), Decimal(0), 0) if r is None else (r.used, r.held, r.holds)


def room(used: int, held: int, holds: int) -> tuple[Decimal, Decimal, int]:
    """Spell a `held` to compare with: used, held, and the number of live holds."""
    return Decimal(used), Decimal(held), holds


def step_events(
    app: tether.Tether, run_id: str, step: int, kind: str
) -> list[dict[str, Any]]:
    """Return one step's events of one kind, in order."""
    data = (e.data() for e in app.store.events(run_id))
    return [d for d in data if d["step"] == step and d["kind"] == kind]


def step_kinds(app: tether.Tether, run_id: str, step: int) -> list[str]:
    """Return the kinds of one step's events, in order."""
    return [
        d["kind"]
        for d in (e.data() for e in app.store.events(run_id))
        if d["step"] == step
    ]


def charge(
    app: tether.Tether,
    request: str,
    args: dict[str, Any] = ARGS,
    key: str = KEY,
) -> tether.Outcome:
    """Take one `pay.charge` step as BOT (under KEY by default), in a run of its own."""
    with app.run(principal=BOT, request=request) as run:
        return run.step("pay.charge", args, idempotency_key=key)


def poke(app: tether.Tether, *, fail: bool) -> tether.Outcome:
    """Take one `pay.poke` step (on the same resource) in a run of its own."""
    with app.run(principal=BOT, request="poke pay-api") as run:
        return run.step("pay.poke", {"fail": fail})


FRESH = {
    "closed": tether.OutcomeStatus.EXECUTED,
    "open": tether.OutcomeStatus.REFUSED,
    "half_open": tether.OutcomeStatus.EXECUTED,
}
"""How a call under a new key fares after the retry, by the breaker's state."""


# -- B.10: a finished call's retry passes the breaker and the limits untouched ---------------


@pytest.mark.parametrize("breaker", ["closed", "open", "half_open"])
def test_a_retry_of_a_finished_key_is_answered_past_the_breaker_and_charges_nothing(
    make_app: Callable[[str], tether.Tether],
    clock: FakeClock,
    upstream: Upstream,
    breaker: str,
) -> None:
    """A retry under a completed key is an idempotent hit in every breaker state and leaves the breaker's row and the budget's counter untouched, since the lookup precedes limits and breaker so a finished call is never charged twice, refused, sampled or given a trial slot."""
    app = make_app(config())
    first = charge(app, "charge o-1")
    if breaker != "closed":
        assert poke(app, fail=True).status is tether.OutcomeStatus.FAILED
        assert app.store.breaker_row(BREAKER).state is BreakerState.OPEN
    if breaker == "half_open":
        clock.advance(OPEN_FOR)  # half-open from now: its one trial call is free
    breaker_before = app.store.breaker_row(BREAKER)
    limits_before = limits(app, clock)

    with app.run(principal=BOT, request="retry charge o-1") as run:
        retry = run.step("pay.charge", ARGS, idempotency_key=KEY)
    breaker_after = app.store.breaker_row(BREAKER)
    limits_after = limits(app, clock)
    charges = list(upstream.charges)
    fresh = charge(app, "a new charge", {"order_id": "o-2", "amount": 1}, "charge-o-2")

    assert first.status is tether.OutcomeStatus.EXECUTED
    assert retry.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert retry.output == first.output
    assert charges == [KEY]
    assert breaker_after == breaker_before
    assert limits_after == limits_before
    assert limits_before["budget/acme"].used == Decimal(30)
    assert step_kinds(app, run.id, retry.step) == [
        "validated",
        "decided",
        "idempotent_hit",
    ]
    # The breaker did bite: open refuses a new call, half-open keeps its slot for one.
    assert fresh.status is FRESH[breaker]


# -- B.10: policy comes before the lookup -------------------------------------------------


def test_a_retry_of_a_finished_key_is_denied_once_policy_denies_the_principal(
    make_app: Callable[[str], tether.Tether],
    config_path: Path,
    upstream: Upstream,
) -> None:
    """Once policy denies the principal, a retry under a completed key is `Denied` rather than given the stored result, since policy precedes the lookup so no one fetches a result it may no longer cause; the result stays stored for when policy allows again."""
    app = make_app(config())
    first = charge(app, "charge o-1")
    write_config(config_path, config(deny_bot=True))

    with app.run(principal=BOT, request="retry under deny") as run:
        denied = run.step("pay.charge", ARGS, idempotency_key=KEY)
    stored = key_record(app)
    write_config(config_path, config())
    allowed_again = charge(app, "retry once allowed")

    assert first.status is tether.OutcomeStatus.EXECUTED
    assert denied.status is tether.OutcomeStatus.REFUSED
    assert isinstance(denied.error, tether.Denied)
    assert denied.error.code == "policy_denied"
    assert denied.output is None
    assert step_kinds(app, run.id, denied.step) == ["validated", "decided", "failed"]
    [decided] = step_events(app, run.id, denied.step, "decided")
    assert (decided["verdict"], decided["rule_ids"]) == ("deny", ["pay-bot-frozen"])
    [failed] = step_events(app, run.id, denied.step, "failed")
    assert (failed["stage"], failed["error_code"]) == ("policy", "policy_denied")
    assert stored is not None
    assert stored.state is KeyState.COMPLETED
    assert allowed_again.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert allowed_again.output == first.output
    assert upstream.charges == [KEY]


# -- B.10: a key in progress refuses before any limit is asked --------------------------------


def test_a_retry_while_the_key_is_in_progress_is_key_in_use_and_reserves_nothing(
    make_app: Callable[[str], tether.Tether], clock: FakeClock, upstream: Upstream
) -> None:
    """While the first call holds the only concurrency lease and the whole budget, its retry is `KeyInUse`, not `LimitExceeded`, and holds nothing, since the lookup precedes limits: the caller learns the call is running, and a refused retry takes no room."""
    app = make_app(
        config(
            budget=30,
            extra_limits="  - {id: one, kind: concurrency, capability: pay.charge, max: 1}\n",
        )
    )
    upstream.gate = gate = threading.Event()
    first: list[tether.Outcome] = []
    worker = threading.Thread(target=lambda: first.append(charge(app, "charge o-1")))
    worker.start()
    try:
        assert upstream.entered.wait(10), "the first charge never reached the upstream"
        holding = limits(app, clock)
        with app.run(principal=BOT, request="retry meanwhile") as run:
            retry = run.step("pay.charge", ARGS, idempotency_key=KEY)
        after_retry = limits(app, clock)
    finally:
        gate.set()
        worker.join(10)
    upstream.gate = None
    later = charge(app, "retry after it finished")

    assert isinstance(retry.error, tether.KeyInUse), retry
    assert retry.error.code == "idempotency_key_in_use"
    assert (holding["budget/acme"].held, holding["budget/acme"].holds) == (
        Decimal(30),
        1,
    )
    assert holding["one/*"].holds == 1
    assert after_retry == holding
    kinds = step_kinds(app, run.id, retry.step)
    assert kinds == ["validated", "decided", "failed"]
    [failed] = step_events(app, run.id, retry.step, "failed")
    assert (failed["stage"], failed["error_code"]) == (
        "idempotency",
        "idempotency_key_in_use",
    )
    assert [o.status for o in first] == [tether.OutcomeStatus.EXECUTED]
    assert later.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert upstream.charges == [KEY]
    assert held(app, clock, "budget/acme") == room(30, 0, 0)
    assert held(app, clock, "one/*") == room(0, 0, 0)


# -- B.14: a refusal by the breaker or a limit leaves the key free ---------------------------------


REFUSAL: dict[str, type[tether.TetherError]] = {
    "read_only": tether.BreakerOpen,
    "escalate": tether.ApprovalRequired,
}
"""What an open breaker refuses a write with, by its degraded mode."""


@pytest.mark.parametrize("on_open", sorted(REFUSAL))
def test_a_call_refused_by_its_open_breaker_leaves_its_key_free_for_the_retry(
    make_app: Callable[[str], tether.Tether],
    clock: FakeClock,
    upstream: Upstream,
    on_open: str,
) -> None:
    """A keyed call refused by its open breaker stores nothing under its key, since it never started; once a probe closes the breaker the retry under that key runs, once."""
    app = make_app(config(on_open=on_open))
    assert poke(app, fail=True).status is tether.OutcomeStatus.FAILED

    refused = charge(app, "charge while open")
    stored_before_retry = key_record(app)
    clock.advance(OPEN_FOR)
    probe = poke(app, fail=False)
    closed = app.store.breaker_row(BREAKER).state
    retry = charge(app, "retry once closed")
    again = charge(app, "retry again")

    assert refused.status is tether.OutcomeStatus.REFUSED
    assert isinstance(refused.error, REFUSAL[on_open])
    assert BREAKER in refused.error.message
    assert stored_before_retry is None
    assert probe.status is tether.OutcomeStatus.EXECUTED
    assert closed is BreakerState.CLOSED
    assert retry.status is tether.OutcomeStatus.EXECUTED
    assert again.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert upstream.charges == [KEY]


def test_a_call_refused_by_its_budget_leaves_its_key_free_for_the_retry(
    make_app: Callable[[str], tether.Tether],
    config_path: Path,
    clock: FakeClock,
    upstream: Upstream,
) -> None:
    """A keyed call its budget refuses stores nothing under its key, since it never started; once `tether.yaml` raises the budget the retry under that key runs, once, and is charged once."""
    app = make_app(config(budget=20))

    refused = charge(app, "charge over budget")
    stored_before_retry = key_record(app)
    budget_after_refusal = held(app, clock, "budget/acme")
    write_config(config_path, config(budget=40))
    retry = charge(app, "retry with a bigger budget")
    again = charge(app, "retry again")

    assert isinstance(refused.error, tether.LimitExceeded), refused
    assert refused.error.limit_id == "budget"
    assert stored_before_retry is None
    assert budget_after_refusal == room(0, 0, 0)
    assert retry.status is tether.OutcomeStatus.EXECUTED
    assert again.status is tether.OutcomeStatus.IDEMPOTENT_HIT
    assert upstream.charges == [KEY]
    assert held(app, clock, "budget/acme") == room(30, 0, 0)
