"""An aborted run's limit holds end in the abort's transaction, not by their TTL.

A step reserves budget and concurrency room with its intent, in one write; a
run aborted before the step settles can settle nothing more (its writer is
fenced). The abort ends those holds at once: a budget's is charged at its
reservation (the cut-off call may have spent it upstream), and a concurrency
lease is freed when no live process can still be in the call (the run's lease
had run out); while one may (a live holder), the slot stays until its TTL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
from tether.replay import RecordedRun, Replayer
from tether.store import LimitRow
from tether.testing import FakeClock

AGENT = tether.Principal("pay-bot", roles=["agent"], tenant="acme")
CONFIG = """\
approvers: {alice: [ops]}
limits:
  - {id: spend, kind: budget, scope: tenant, per: day, amount: 100, cost: "args.cents"}
  - {id: slots, kind: concurrency, capability: pay.send, max: 1, ttl: 1h}
"""
"""A budget of 100 per day, one `pay.send` in flight at once (a lease of an hour)."""

CLAIM_TTL = timedelta(minutes=5)
"""`idempotency.claim_ttl` by default: a run's lease lasts that long after its last write."""


class SendArgs(BaseModel, extra="forbid"):
    cents: int


class SendOut(BaseModel):
    sent: int


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database on each backend."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path / 'tether.db'}"


@pytest.fixture
def app(db: str, clock: FakeClock, tmp_path: Path) -> Iterator[tether.Tether]:
    """An app with the budget and the concurrency cap, and `pay.send` registered."""
    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    with tether.Tether(db=db, config=config, clock=clock, env={}) as made:
        yield made


def _send(app: tether.Tether, during: Callable[[str], object] | None = None) -> None:
    """Register `pay.send`; `during(run_id)` runs inside the first call, mid-call."""
    calls: list[str] = []

    @tether.capability("pay.send", effect="write", idempotency="none")
    def send(args: SendArgs, ctx: tether.CallContext) -> SendOut:
        calls.append(ctx.run_id)
        if during is not None and len(calls) == 1:
            during(ctx.run_id)
        return SendOut(sent=args.cents)

    app.register(send)


def _cut_off(app: tether.Tether, cents: int) -> str:
    """Run one `pay.send` of `cents`; the run is aborted mid-call. Return its id."""
    with app.run(principal=AGENT, request="send") as run:
        with pytest.raises(tether.RunAborted):
            run.call("pay.send", {"cents": cents})
        return run.id


def _row(app: tether.Tether, clock: FakeClock, limit_id: str) -> LimitRow:
    """The limit's row as `tether status` shows it (an empty one if it has none)."""
    rows = [r for r in app.store.limit_rows(clock.now()) if r.limit_id == limit_id]
    if not rows:
        zero = Decimal(0)
        return LimitRow(
            limit_id=limit_id, scope="", window=None, used=zero, held=zero, holds=0
        )
    (row,) = rows
    return row


def _send_again(app: tether.Tether, cents: int) -> tether.Run:
    """Another run's `pay.send` of `cents`; raises what the call raises."""
    with app.run(principal=AGENT, request="send again") as run:
        run.call("pay.send", {"cents": cents})
    return run


def test_a_cut_off_steps_budget_is_charged_by_the_abort(
    app: tether.Tether, clock: FakeClock
) -> None:
    """The budget a step held when its run was aborted counts as spent at once, held by none."""
    _send(app, lambda run_id: app.abort(run_id, by="alice", reason="stop"))

    _cut_off(app, 40)

    spend = _row(app, clock, "spend")
    assert (spend.used, spend.held, spend.holds) == (Decimal(40), Decimal(0), 0)


def test_a_charged_budget_is_not_given_back(
    app: tether.Tether, clock: FakeClock
) -> None:
    """What the cut-off call may have spent stays spent: the rest of the budget is all that fits."""
    _send(app, lambda run_id: app.abort(run_id, by="alice", reason="stop"))
    _cut_off(app, 40)
    clock.advance(timedelta(hours=2))  # past the lease's TTL: nothing is held

    with pytest.raises(tether.LimitExceeded):
        _send_again(app, 61)
    _send_again(app, 60)

    assert _row(app, clock, "spend").used == Decimal(100)


def test_a_dead_holders_concurrency_slot_frees_at_the_abort(
    app: tether.Tether, clock: FakeClock
) -> None:
    """A run whose lease ran out (its process died mid-call) frees its slot when aborted."""

    def died_then_aborted(run_id: str) -> None:
        clock.advance(CLAIM_TTL + timedelta(minutes=1))  # no renewal: the lease is out
        app.abort(run_id, by="alice", reason="its worker died")

    _send(app, died_then_aborted)
    _cut_off(app, 10)

    slots = _row(app, clock, "slots")
    assert (slots.held, slots.holds) == (Decimal(0), 0)
    assert _send_again(app, 10).status is tether.RunState.SUCCEEDED


def test_a_live_holders_concurrency_slot_stays_until_its_ttl(
    app: tether.Tether, clock: FakeClock
) -> None:
    """A slot whose handler may still run in a live process is kept until its TTL, then frees."""
    _send(app, lambda run_id: app.abort(run_id, by="alice", reason="stop"))
    _cut_off(app, 10)

    with pytest.raises(tether.LimitExceeded):
        _send_again(app, 10)
    clock.advance(timedelta(hours=1))

    assert _send_again(app, 10).status is tether.RunState.SUCCEEDED


def test_an_abort_ends_only_its_own_runs_holds(
    app: tether.Tether, clock: FakeClock
) -> None:
    """Another run's hold, taken while the aborted run is mid-call, is left as it is."""

    @tether.capability("pay.hold", effect="write", idempotency="none")
    def hold(args: SendArgs, ctx: tether.CallContext) -> SendOut:
        with app.run(principal=AGENT, request="aborted inside") as inner:
            inner_id = inner.id
            with pytest.raises(tether.RunAborted):
                inner.call("pay.send", {"cents": 5})
        assert app.store.get_run(inner_id).status == "aborted"
        seen.append(_row(app, clock, "spend"))
        return SendOut(sent=args.cents)

    seen: list[LimitRow] = []
    app.register(hold)
    _send(app, lambda run_id: app.abort(run_id, by="alice", reason="stop"))

    with app.run(principal=AGENT, request="holds 30") as outer:
        outer.call(hold, {"cents": 30})

    (during,) = seen
    assert (during.used, during.held, during.holds) == (Decimal(5), Decimal(30), 1)


def test_a_run_aborted_holding_room_replays_the_same(
    app: tether.Tether, clock: FakeClock
) -> None:
    """Ending the holds writes no event: the aborted run verifies and replays unchanged."""
    _send(app, lambda run_id: app.abort(run_id, by="alice", reason="stop"))
    run_id = _cut_off(app, 40)

    kinds = [e.data()["kind"] for e in app.store.events(run_id)]
    report = Replayer(app).replay(RecordedRun.from_store(app.store, run_id))

    assert kinds[-3:] == ["in_doubt", "run_status", "run_finished"]
    assert "limit_settled" not in kinds
    assert report.divergences == [], report.divergences
    assert app.verify(run_id).ok


@pytest.mark.postgres
def test_a_postgres_abort_takes_again_the_locks_of_a_group_the_run_took_room_in_meanwhile(
    postgres_url: str, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The abort locks the run's limit groups before its row; a hold in a new group found after is retried in order, then ended."""
    from tether.store.postgres import PostgresStore

    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    ending = PostgresStore._end_holds
    seen: list[set[tuple[str, str, int]]] = []

    def racing(
        self: PostgresStore,
        conn: object,
        row: object,
        at: object,
        locked: set[tuple[str, str, int]],
    ) -> None:
        seen.append(set(locked))
        if len(seen) == 1:  # between the abort's locks and its reads: a hold elsewhere
            with self._pool.connection() as other:
                other.execute(
                    'INSERT INTO limit_state (limit_id, scope, "window", holder, '
                    "amount, until, charged) VALUES ('other', 'acme', 0, %s, 7, %s, true)",
                    (f"{row.run_id}/9", 2**62),  # type: ignore[attr-defined]  # a RunRow
                )
        ending(self, conn, row, at, locked)  # type: ignore[arg-type]  # as the store passes them

    monkeypatch.setattr(PostgresStore, "_end_holds", racing)
    with tether.Tether(db=postgres_url, config=config, clock=clock, env={}) as app:
        _send(app, lambda run_id: app.abort(run_id, by="alice", reason="stop"))
        run_id = _cut_off(app, 40)
        store = app.store
        assert isinstance(store, PostgresStore)
        with store._pool.connection() as conn:
            other = conn.execute(
                "SELECT holder, amount FROM limit_state WHERE limit_id='other'"
            ).fetchall()
        status = store.get_run(run_id).status

    assert status == "aborted"
    assert len(seen) == 2, (
        seen
    )  # the first try rolled back (OutOfOrder), the second went
    assert ("other", "acme", 0) not in seen[0]
    assert ("other", "acme", 0) in seen[1]
    assert other == [("", Decimal(7))]  # charged as spent, its hold gone
