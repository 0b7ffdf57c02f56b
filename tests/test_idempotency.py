"""Idempotency semantics (RELIABILITY.md B.10 to B.18), on a real SQLite file.

A fake upstream stands in for the service a capability calls: it counts every
handler call with the idempotency key the handler was given, and applies an
effect at most once per key, as a payments API that deduplicates by key does.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

import tether
from tether.store import KeyId, KeyState
from tether.testing import FakeClock, temporary_app

_KEYS = itertools.count()

hypothesis_settings = settings(
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# -- the capability under test and its fake upstream ---------------------------------


class ChargeIn(BaseModel, extra="forbid"):
    order_id: str
    amount_cents: int = Field(gt=0)
    currency: str = "EUR"
    note: str = ""
    express: bool = False


class ChargeOut(BaseModel):
    charge_id: str
    order_id: str
    amount_cents: int
    run_id: str
    key: str | None


class WorkerDied(BaseException):
    """Stands in for a process that dies inside the handler (nothing catches it)."""


@dataclass
class Upstream:
    """A fake payments API: it counts calls and applies one effect per key."""

    calls: list[str | None] = field(default_factory=list)
    """The idempotency key of every handler call, in order."""
    effects: dict[str | None, int] = field(default_factory=dict)
    """Effects applied per key (a keyed upstream deduplicates; `None` never does)."""
    raise_after_effect: list[BaseException] = field(default_factory=list)
    """Errors to raise, one per call, after the effect was applied."""

    def charge(self, args: ChargeIn, ctx: tether.CallContext) -> ChargeOut:
        key = ctx.idempotency_key
        self.calls.append(key)
        if key is None or key not in self.effects:
            self.effects[key] = self.effects.get(key, 0) + 1
        if self.raise_after_effect:
            raise self.raise_after_effect.pop(0)
        return ChargeOut(
            charge_id=f"ch-{len(self.calls)}",
            order_id=args.order_id,
            amount_cents=args.amount_cents,
            run_id=ctx.run_id,
            key=key,
        )


def make_charge(
    upstream: Upstream,
    *,
    idempotency: str = "keyed",
    preconditions: Sequence[Callable[[Any], bool | str | None]] = (),
) -> tether.Capability[ChargeIn, ChargeOut]:
    """Declare `pay.charge` over `upstream`."""

    def charge(args: ChargeIn, ctx: tether.CallContext) -> ChargeOut:
        return upstream.charge(args, ctx)

    return tether.capability(
        "pay.charge",
        effect="write",
        idempotency=idempotency,
        preconditions=preconditions,
    )(charge)


@pytest.fixture
def upstream() -> Upstream:
    """A fresh fake upstream."""
    return Upstream()


@pytest.fixture
def charge(
    app: tether.Tether, upstream: Upstream
) -> tether.Capability[ChargeIn, ChargeOut]:
    """`pay.charge` (write, keyed), registered on the app."""
    return app.register(make_charge(upstream))


ARGS: dict[str, Any] = {"order_id": "o-1", "amount_cents": 1200}


def call_in(
    mode: str,
    run: tether.Run,
    cap: tether.Capability[ChargeIn, ChargeOut],
    args: dict[str, Any],
    key: str | None,
) -> ChargeOut:
    """Call through the sync or the async driver."""
    if mode == "sync":
        return run.call(cap, args, idempotency_key=key)
    return asyncio.run(run.acall(cap, args, idempotency_key=key))


def records(
    app: tether.Tether, run_id: str, kind: str | None = None
) -> list[dict[str, Any]]:
    """Return a run's events as data, optionally only those of one kind."""
    data = [e.data() for e in app.store.events(run_id)]
    return [d for d in data if kind is None or d["kind"] == kind]


def key_id(principal: tether.Principal, key: str) -> KeyId:
    """Return the scoped id of `key` for `pay.charge`."""
    return KeyId(
        tenant=principal.tenant,
        principal_id=principal.id,
        capability="pay.charge",
        key=key,
    )


# -- B.10 replay is free -------------------------------------------------------------


def test_retries_of_a_completed_key_replay_the_first_reply_byte_for_byte(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
    mode: str,
) -> None:
    """A thousand retries after completion run nothing and return the first reply's bytes, each recorded as a hit."""
    with app.run(principal=principal, request="charge o-1") as first_run:
        first = first_run.call(charge, ARGS, idempotency_key="charge-o-1")

    with app.run(principal=principal, request="retry charge o-1") as run:
        if mode == "sync":
            replies = [
                run.call(charge, ARGS, idempotency_key="charge-o-1")
                for _ in range(1000)
            ]
        else:

            async def retry() -> list[ChargeOut]:
                return [
                    await run.acall(charge, ARGS, idempotency_key="charge-o-1")
                    for _ in range(1000)
                ]

            replies = asyncio.run(retry())

    assert upstream.calls == ["charge-o-1"]
    assert {r.model_dump_json() for r in replies} == {first.model_dump_json()}
    hits = records(app, run.id, "idempotent_hit")
    assert len(hits) == 1000
    assert {(h["key"], h["original_run"], h["original_step"]) for h in hits} == {
        ("charge-o-1", first_run.id, 1)
    }
    assert all(h["output"] == first.model_dump(mode="json") for h in hits)
    assert records(app, run.id, "intent") == []
    assert len(records(app, first_run.id, "intent")) == 1
    assert app.verify(run.id).ok


# -- B.11 mismatched args ------------------------------------------------------------

CHANGES: dict[str, st.SearchStrategy[Any]] = {
    "order_id": st.text(min_size=1, max_size=12),
    "amount_cents": st.integers(min_value=1, max_value=10**12),
    "currency": st.sampled_from(["USD", "GBP", "JPY", "eur"]),
    "note": st.text(max_size=30),
    "express": st.booleans(),
}
BASE = {
    "order_id": "o-1",
    "amount_cents": 1200,
    "currency": "EUR",
    "note": "",
    "express": False,
}


@hypothesis_settings
@given(data=st.data())
def test_same_key_with_any_changed_field_is_a_conflict_and_runs_nothing(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
    data: st.DataObject,
) -> None:
    """Reusing a key with one field changed raises `IdempotencyConflict` and executes nothing."""
    name = data.draw(st.sampled_from(sorted(CHANGES)), label="field")
    value = data.draw(CHANGES[name].filter(lambda v: v != BASE[name]), label="value")
    key = f"k-{next(_KEYS)}"
    with app.run(principal=principal, request="charge") as run:
        run.call(charge, BASE, idempotency_key=key)
    calls_before = len(upstream.calls)

    with (
        app.run(principal=principal, request="charge again") as run,
        pytest.raises(tether.IdempotencyConflict) as caught,
    ):
        run.call(charge, {**BASE, name: value}, idempotency_key=key)

    assert caught.value.code == "idempotency_error"
    assert len(upstream.calls) == calls_before
    assert records(app, run.id, "intent") == []
    [failed] = records(app, run.id, "failed")
    assert (failed["stage"], failed["error_code"]) == (
        "idempotency",
        "idempotency_error",
    )


def test_conflict_message_names_the_key(
    app: tether.Tether,
    principal: tether.Principal,
    charge: tether.Capability[ChargeIn, ChargeOut],
) -> None:
    """The mismatch error names the reused key on one line, so the caller knows which to change."""
    with app.run(principal=principal, request="charge") as run:
        run.call(charge, ARGS, idempotency_key="refund-7f3a")

        with pytest.raises(tether.IdempotencyConflict) as caught:
            run.call(
                charge, {**ARGS, "amount_cents": 1300}, idempotency_key="refund-7f3a"
            )

    assert "refund-7f3a" in caught.value.message
    assert "\n" not in caught.value.message


# -- B.13 key scoping ----------------------------------------------------------------

_names = st.text(alphabet="ab:/é -", min_size=1, max_size=4)


@hypothesis_settings
@given(callers=st.lists(st.tuples(_names, _names), min_size=2, max_size=6))
def test_one_client_key_never_returns_another_principals_result(
    app: tether.Tether,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
    callers: list[tuple[str, str]],
) -> None:
    """Principals reusing one client key each get only results of their own runs."""
    key = f"shared-{next(_KEYS)}"
    owner: dict[str, tuple[str, str]] = {}
    got: list[tuple[tuple[str, str], ChargeOut]] = []

    for tenant, pid in callers:
        with app.run(
            principal=tether.Principal(pid, tenant=tenant), request="charge"
        ) as run:
            owner[run.id] = (tenant, pid)
            got.append(((tenant, pid), run.call(charge, ARGS, idempotency_key=key)))

    assert all(owner[out.run_id] == caller for caller, out in got)
    assert upstream.calls.count(key) == len(set(callers))


# -- B.14 not-started outcomes are not cached ------------------------------------------


@dataclass
class World:
    """What the cause of a refusal depends on; the test fixes it between calls."""

    deny: bool = False
    ready: bool = True


@dataclass
class DenySwitch:
    """A Python policy that denies `pay.charge` while the world says so."""

    world: World
    id: str = "deny-switch"

    def evaluate(self, request: tether.DecisionRequest) -> tether.Decision | None:
        if not self.world.deny:
            return None
        return tether.Decision(
            verdict=tether.Verdict.DENY,
            rule_ids=(self.id,),
            reasons=("charges are paused",),
        )


@pytest.mark.parametrize(
    ("cause", "error"),
    [
        ("validation", tether.ValidationFailed),
        ("policy", tether.Denied),
        ("precondition", tether.PreconditionFailed),
    ],
)
def test_a_refused_call_leaves_its_key_free_for_the_fixed_retry(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    cause: str,
    error: type[tether.TetherError],
) -> None:
    """A call refused before it started stores nothing under its key; the fixed retry executes once."""
    world = World(deny=cause == "policy", ready=cause != "precondition")

    def account_open(args: ChargeIn) -> bool | str:
        return world.ready or "the account is frozen"

    cap = app.register(make_charge(upstream, preconditions=[account_open]))
    app.add_policy(DenySwitch(world))
    bad = {**ARGS, "amount_cents": 0} if cause == "validation" else ARGS
    with app.run(principal=principal, request="charge") as run:
        with pytest.raises(error):
            run.call(cap, bad, idempotency_key="charge-o-1")
        stored_before_retry = app.store.lookup_key(key_id(principal, "charge-o-1"))
        world.deny, world.ready = False, True

        out = run.call(cap, ARGS, idempotency_key="charge-o-1")
        again = run.call(cap, ARGS, idempotency_key="charge-o-1")

    assert stored_before_retry is None
    assert upstream.calls == ["charge-o-1"]
    assert again == out
    assert [e["step"] for e in records(app, run.id, "intent")] == [2]


# -- B.15 failure after start -----------------------------------------------------------


def test_keyed_call_that_fails_after_acting_reruns_under_the_same_key(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
    mode: str,
) -> None:
    """A keyed handler that raises after acting fails retryably; the retry runs under the same key, so the upstream acts once."""
    upstream.raise_after_effect.append(ConnectionResetError("upstream hung up"))
    with app.run(principal=principal, request="charge") as run:
        with pytest.raises(tether.CapabilityFailed) as caught:
            call_in(mode, run, charge, ARGS, "charge-o-1")

        out = call_in(mode, run, charge, ARGS, "charge-o-1")

    assert caught.value.code == "capability_failed"
    assert upstream.calls == ["charge-o-1", "charge-o-1"]
    assert upstream.effects == {"charge-o-1": 1}
    assert out.key == "charge-o-1"
    assert [e["key"] for e in records(app, run.id, "intent")] == ["charge-o-1"] * 2
    assert app.verify(run.id).ok


def test_unkeyed_write_that_fails_after_acting_is_in_doubt_and_never_rerun(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    mode: str,
) -> None:
    """A `none` write that raises after acting is in doubt, and every retry under its key is refused in doubt."""
    cap = app.register(make_charge(upstream, idempotency="none"))
    upstream.raise_after_effect.append(ConnectionResetError("upstream hung up"))
    with app.run(principal=principal, request="charge") as run:
        with pytest.raises(tether.InDoubt) as first:
            call_in(mode, run, cap, ARGS, "charge-o-1")

        with pytest.raises(tether.InDoubt) as retry:
            call_in(mode, run, cap, ARGS, "charge-o-1")
    with (
        app.run(principal=principal, request="another run retries") as later,
        pytest.raises(tether.InDoubt) as retry_elsewhere,
    ):
        call_in(mode, later, cap, ARGS, "charge-o-1")

    assert {first.value.code, retry.value.code, retry_elsewhere.value.code} == {
        "in_doubt"
    }
    assert upstream.calls == ["charge-o-1"]
    assert len(records(app, run.id, "in_doubt")) == 1
    assert records(app, later.id, "intent") == []
    stored = app.store.lookup_key(key_id(principal, "charge-o-1"))
    assert stored is not None
    assert stored.state is KeyState.IN_DOUBT


# -- B.16 retention boundary --------------------------------------------------------------


@pytest.fixture(params=["default", "configured"])
def retained_app(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> Iterator[tuple[tether.Tether, timedelta]]:
    """An app with the default retention (24 h) or one set in `tether.yaml` (90 min)."""
    if request.param == "default":
        with temporary_app(clock=clock) as a:
            yield a, timedelta(hours=24)
        return
    config = tmp_path / "tether.yaml"
    config.write_text("idempotency: {retention: 90m}\n")
    with temporary_app(clock=clock, config=config) as a:
        yield a, timedelta(minutes=90)


def test_a_stored_result_answers_until_retention_and_not_after(
    retained_app: tuple[tether.Tether, timedelta],
    clock: FakeClock,
    principal: tether.Principal,
    upstream: Upstream,
) -> None:
    """A retry one second before retention gets the stored result; one second after, it executes anew and records `key_expired`."""
    app, retention = retained_app
    charge = app.register(make_charge(upstream))
    with app.run(principal=principal, request="charge") as run:
        first = run.call(charge, ARGS, idempotency_key="charge-o-1")

    clock.advance(retention - timedelta(seconds=1))
    with app.run(principal=principal, request="retry before expiry") as before:
        replay = before.call(charge, ARGS, idempotency_key="charge-o-1")
    clock.advance(timedelta(seconds=2))
    with app.run(principal=principal, request="retry after expiry") as after:
        fresh = after.call(charge, ARGS, idempotency_key="charge-o-1")

    assert app.settings.idempotency.retention == retention
    assert replay == first
    assert len(records(app, before.id, "idempotent_hit")) == 1
    assert upstream.calls == ["charge-o-1", "charge-o-1"]
    assert fresh != first
    [expired] = records(app, after.id, "key_expired")
    assert (expired["key"], expired["previous_state"]) == ("charge-o-1", "completed")


# -- B.17 expired in-progress claim ---------------------------------------------------------


def die_mid_call(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    cap: tether.Capability[ChargeIn, ChargeOut],
) -> None:
    """Leave an in-progress claim behind, as a worker killed inside the handler does."""
    upstream.raise_after_effect.append(WorkerDied())
    dead = app.run(principal=principal, request="charge").__enter__()
    with pytest.raises(WorkerDied):
        dead.call(cap, ARGS, idempotency_key="charge-o-1")


def test_a_keyed_claim_left_by_a_dead_worker_is_retried_under_its_key_after_the_ttl(
    app: tether.Tether,
    clock: FakeClock,
    principal: tether.Principal,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
) -> None:
    """A dead worker's keyed claim refuses retries until its TTL, then re-executes under the same key and records `key_expired`."""
    ttl = app.settings.idempotency.claim_ttl
    die_mid_call(app, principal, upstream, charge)

    clock.advance(ttl - timedelta(seconds=1))
    with (
        app.run(principal=principal, request="retry too early") as early,
        pytest.raises(tether.KeyInUse) as in_use,
    ):
        early.call(charge, ARGS, idempotency_key="charge-o-1")
    clock.advance(timedelta(seconds=2))
    with app.run(principal=principal, request="retry after the TTL") as late:
        out = late.call(charge, ARGS, idempotency_key="charge-o-1")
        again = late.step(charge, ARGS, idempotency_key="charge-o-1")

    assert in_use.value.code == "idempotency_key_in_use"
    assert upstream.calls == ["charge-o-1", "charge-o-1"]
    assert upstream.effects == {"charge-o-1": 1}
    assert out.key == "charge-o-1"
    [expired] = records(app, late.id, "key_expired")
    assert (expired["key"], expired["previous_state"]) == ("charge-o-1", "in_progress")
    assert again.status is tether.OutcomeStatus.IDEMPOTENT_HIT


def test_an_unkeyed_claim_left_by_a_dead_worker_is_never_rerun(
    app: tether.Tether,
    clock: FakeClock,
    principal: tether.Principal,
    upstream: Upstream,
) -> None:
    """A dead worker's `none` claim refuses retries until its TTL, and after it is in doubt, however late the retry."""
    cap = app.register(make_charge(upstream, idempotency="none"))
    ttl = app.settings.idempotency.claim_ttl
    die_mid_call(app, principal, upstream, cap)

    clock.advance(ttl - timedelta(seconds=1))
    with app.run(principal=principal, request="retry too early") as early:
        too_early = early.step(cap, ARGS, idempotency_key="charge-o-1")
    clock.advance(timedelta(seconds=2))
    with app.run(principal=principal, request="retry after the TTL") as late:
        after_ttl = late.step(cap, ARGS, idempotency_key="charge-o-1")
    clock.advance(timedelta(days=30))
    with app.run(principal=principal, request="retry a month later") as much_later:
        month_later = much_later.step(cap, ARGS, idempotency_key="charge-o-1")

    assert too_early.error is not None
    assert too_early.error.code == "idempotency_key_in_use"
    assert after_ttl.status is month_later.status is tether.OutcomeStatus.IN_DOUBT
    assert upstream.calls == ["charge-o-1"]
    assert (
        records(app, late.id, "intent") == records(app, much_later.id, "intent") == []
    )


# -- B.18 key grammar ----------------------------------------------------------------------

_printable = st.characters(categories=["L", "M", "N", "P", "S"])
invalid_keys = st.one_of(
    st.just(""),
    st.text(alphabet=_printable, min_size=256, max_size=600),
    st.builds(
        lambda head, ctrl, tail: head + ctrl + tail,
        st.text(alphabet=_printable, max_size=20),
        st.characters(categories=["Cc"]),
        st.text(alphabet=_printable, max_size=20),
    ),
)
_meta = st.sampled_from(
    [
        "'",
        '"',
        "\\",
        ";",
        "--",
        "%",
        "_",
        "*",
        "{}",
        "[]",
        "' OR '1'='1",
        '"); DROP TABLE idempotency_keys; --',
        '{"key": null}',
        "\\u0000",
        "💳",
        "ключ",
        "鍵",
        " ",
    ]
)
valid_keys = (
    st.lists(
        st.one_of(_meta, st.text(alphabet=_printable, min_size=1, max_size=12)),
        min_size=1,
        max_size=10,
    )
    .map("".join)
    .filter(lambda k: len(k) <= 255)
)


@hypothesis_settings
@given(key=invalid_keys)
def test_an_invalid_key_is_rejected_with_one_line_and_runs_nothing(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
    key: str,
) -> None:
    """An empty, over-long or control-character key raises `InvalidKey` with a one-line reason and executes nothing."""
    with (
        app.run(principal=principal, request="charge") as run,
        pytest.raises(tether.InvalidKey) as caught,
    ):
        run.call(charge, ARGS, idempotency_key=key)

    assert caught.value.code == "invalid_idempotency_key"
    assert len(caught.value.message.splitlines()) == 1
    assert len(caught.value.message) < 300
    assert upstream.calls == []
    assert records(app, run.id, "intent") == []


@hypothesis_settings
@given(key=valid_keys)
def test_a_valid_key_round_trips_exactly(
    app: tether.Tether,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
    key: str,
) -> None:
    """Non-ASCII keys and keys full of SQL or JSON metacharacters are stored and read back exactly."""
    principal = tether.Principal(f"agent-{next(_KEYS)}")
    with app.run(principal=principal, request="charge") as run:
        out = run.call(charge, ARGS, idempotency_key=key)
        again = run.call(charge, ARGS, idempotency_key=key)

    assert out.key == key
    assert again == out
    [intent] = records(app, run.id, "intent")
    [hit] = records(app, run.id, "idempotent_hit")
    assert intent["key"] == hit["key"] == key
    stored = app.store.lookup_key(key_id(principal, key))
    assert stored is not None
    assert stored.state is KeyState.COMPLETED
    assert upstream.calls[-1] == key


def test_a_key_of_255_characters_is_valid_and_256_is_not(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
) -> None:
    """The longest valid key has 255 characters; one more is `InvalidKey`."""
    with app.run(principal=principal, request="charge") as run:
        longest = run.call(charge, ARGS, idempotency_key="é" * 255)
        too_long = run.step(charge, ARGS, idempotency_key="é" * 256)

    assert longest.key == "é" * 255
    assert isinstance(too_long.error, tether.InvalidKey)
    assert upstream.calls == ["é" * 255]


def test_lookalike_keys_are_different_keys(
    app: tether.Tether,
    principal: tether.Principal,
    upstream: Upstream,
    charge: tether.Capability[ChargeIn, ChargeOut],
) -> None:
    """Keys that differ only in Unicode normalization, compatibility form, case or spaces are distinct and kept as given."""
    keys = ["caf\u00e9", "cafe\u0301", "\ufb01", "fi", "K", "\u212a", "k", " k", "k "]

    with app.run(principal=principal, request="charge") as run:
        outcomes = [run.step(charge, ARGS, idempotency_key=k) for k in keys]

    assert {o.status for o in outcomes} == {tether.OutcomeStatus.EXECUTED}
    assert upstream.calls == keys
    assert [e["key"] for e in records(app, run.id, "intent")] == keys
