"""The same call made by one agent for different people is a different call.

A `Principal`'s `on_behalf_of` names the person an agent acts for. Approval
requests and idempotency keys are matched by tenant and principal (and the
call's digest or key), so without the person an agent's call for bob would
wait on, or run under, what was asked or stored for alice. Every test runs on
a real SQLite file, on PostgreSQL and on `memory://`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
from tether._stages import args_fingerprint
from tether.record import Outcome, OutcomeStatus
from tether.store import ApprovalStatus, KeyId
from tether.testing import FakeClock

POLICY = """\
rules:
  - id: big
    match: {capability: pay.refund}
    when: "args.cents > 100"
    decision: require_approval
    reason: big refund
    approvers: [finance]
approvals: {ttl: 1h}
approvers:
  dave: [finance]
  erin: [finance]
  alice: [finance]
"""

BACKENDS = ["sqlite", "memory", pytest.param("postgres", marks=pytest.mark.postgres)]


class RefundIn(BaseModel, extra="forbid"):
    order: str
    cents: int


class RefundOut(BaseModel):
    refunded: int
    order: str


@dataclass
class World:
    """An app on one backend and the refunds its handler made."""

    app: tether.Tether
    clock: FakeClock
    refunds: list[tuple[str, int]] = field(default_factory=list)


def agent(on_behalf_of: str | None) -> tether.Principal:
    return tether.Principal(
        "bot", roles=["agent"], tenant="acme", on_behalf_of=on_behalf_of
    )


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "postgres":
        db = request.getfixturevalue("postgres_url")
    elif request.param == "sqlite":
        db = f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
    else:
        db = "memory://"
    config = tmp_path / "tether.yaml"
    config.write_text(POLICY)
    clock = FakeClock()
    app = tether.Tether(db=db, config=config, clock=clock, env={})
    world = World(app, clock)

    @tether.capability("pay.refund", effect="write", idempotency="keyed")
    def refund(args: RefundIn) -> RefundOut:
        world.refunds.append((args.order, args.cents))
        return RefundOut(refunded=args.cents, order=args.order)

    app.register(refund)
    try:
        yield world
    finally:
        app.close()


BIG = {"order": "o-1", "cents": 500}
SMALL = {"order": "o-1", "cents": 50}


def asked(outcome: Outcome) -> tether.ApprovalRequired:
    assert outcome.status is OutcomeStatus.REFUSED, outcome
    assert isinstance(outcome.error, tether.ApprovalRequired), outcome.error
    return outcome.error


def ask(app: tether.Tether, on_behalf_of: str | None) -> tether.ApprovalRequired:
    """Make the big refund in a run of its own; return the request it was refused for."""
    with app.run(principal=agent(on_behalf_of), request="refund") as run:
        return asked(run.step("pay.refund", BIG))


def used_grant(app: tether.Tether, on_behalf_of: str | None) -> str | None:
    """Make the big refund in a run of its own; return the grant it ran under."""
    with app.run(principal=agent(on_behalf_of), request="refund") as run:
        outcome = run.step("pay.refund", BIG)
    if outcome.status is not OutcomeStatus.EXECUTED:
        return None
    evs = [e.data() for e in app.store.events(run.id)]
    [used] = [e for e in evs if e["kind"] == "approval_used"]
    return str(used["approval_id"])


# -- approvals ------------------------------------------------------------------------


class TestApprovals:
    def test_the_same_call_for_two_people_makes_two_requests(
        self, world: World
    ) -> None:
        """Bob's call makes its own request: it does not wait on alice's."""
        app = world.app
        for_alice = ask(app, "alice")
        for_bob = ask(app, "bob")

        assert for_alice.created
        assert for_bob.created
        assert for_alice.approval_id != for_bob.approval_id
        assert for_alice.approval_id is not None
        assert for_bob.approval_id is not None
        assert app.approval(for_alice.approval_id).on_behalf_of == "alice"
        assert app.approval(for_bob.approval_id).on_behalf_of == "bob"
        # asking again for each coalesces onto that person's own request
        assert ask(app, "bob").approval_id == for_bob.approval_id
        assert ask(app, "alice").approval_id == for_alice.approval_id
        assert len(app.approvals()) == 2

    def test_each_request_is_decided_separately_and_runs_only_its_own_call(
        self, world: World
    ) -> None:
        app = world.app
        for_alice = ask(app, "alice").approval_id
        for_bob = ask(app, "bob").approval_id
        assert for_alice is not None
        assert for_bob is not None

        app.approve(for_alice, by="dave")
        # alice's grant is not bob's: his call still waits on his own request
        waiting = ask(app, "bob")
        assert (waiting.approval_id, waiting.created) == (for_bob, False)
        assert app.approval(for_alice).status is ApprovalStatus.APPROVED

        app.approve(for_bob, by="erin")
        assert used_grant(app, "bob") == for_bob
        assert used_grant(app, "alice") == for_alice
        assert world.refunds == [("o-1", 500), ("o-1", 500)]
        assert app.approval(for_alice).status is ApprovalStatus.USED
        assert app.approval(for_bob).status is ApprovalStatus.USED
        # each grant was single use: both ask anew
        assert ask(app, "alice").created
        assert ask(app, "bob").created

    def test_a_person_who_approves_for_another_does_not_approve_their_own_call(
        self, world: World
    ) -> None:
        """Alice may approve bob's request; that runs bob's call, never hers."""
        app = world.app
        for_alice = ask(app, "alice").approval_id
        for_bob = ask(app, "bob").approval_id
        assert for_alice is not None
        assert for_bob is not None

        app.approve(for_bob, by="alice")
        assert used_grant(app, "alice") is None
        assert used_grant(app, "bob") == for_bob
        assert world.refunds == [("o-1", 500)]
        assert app.approval(for_alice).status is ApprovalStatus.PENDING

    def test_an_older_grant_is_found_after_a_newer_request_for_someone_else(
        self, world: World
    ) -> None:
        """Bob's approved request is his call's grant, however many asked for alice since."""
        app = world.app
        for_bob = ask(app, "bob").approval_id
        assert for_bob is not None
        app.approve(for_bob, by="dave")
        world.clock.advance(timedelta(seconds=1))
        for_alice = ask(app, "alice")  # the newest row for this call's digest
        assert for_alice.created

        assert used_grant(app, "bob") == for_bob
        assert world.refunds == [("o-1", 500)]
        assert app.approval(str(for_alice.approval_id)).status is (
            ApprovalStatus.PENDING
        )

    def test_a_denial_for_one_person_is_not_the_others(self, world: World) -> None:
        app = world.app
        for_alice = ask(app, "alice").approval_id
        assert for_alice is not None
        app.deny(for_alice, by="dave", reason="not this order")

        for_bob = ask(app, "bob")
        assert for_bob.created
        assert for_bob.approval_id != for_alice
        with app.run(principal=agent("alice"), request="refund") as run:
            again = run.step("pay.refund", BIG)
        assert isinstance(again.error, tether.Denied), again.error

    def test_a_call_for_nobody_and_for_a_person_are_different_calls(
        self, world: World
    ) -> None:
        """No one (NULL) matches only no one: its grant is found, and not alice's."""
        app = world.app
        for_nobody = ask(app, None).approval_id
        for_alice = ask(app, "alice").approval_id
        assert for_nobody is not None
        assert for_alice is not None
        assert for_nobody != for_alice
        assert app.approval(for_nobody).on_behalf_of is None

        app.approve(for_nobody, by="dave")
        assert used_grant(app, "alice") is None
        assert used_grant(app, None) == for_nobody
        assert world.refunds == [("o-1", 500)]


# -- idempotency keys -----------------------------------------------------------------


def keyed(
    app: tether.Tether, on_behalf_of: str | None, key: str = "refund-o-1"
) -> Outcome:
    with app.run(principal=agent(on_behalf_of), request="refund") as run:
        return run.step("pay.refund", SMALL, idempotency_key=key)


class TestIdempotencyKeys:
    @pytest.mark.parametrize(
        ("first", "second"), [("alice", "bob"), (None, "alice"), ("alice", None)]
    )
    def test_a_key_used_for_one_person_conflicts_for_another(
        self, world: World, first: str | None, second: str | None
    ) -> None:
        """The same key and args for another person: a conflict, not the first one's result."""
        app = world.app
        assert keyed(app, first).status is OutcomeStatus.EXECUTED
        outcome = keyed(app, second)

        assert outcome.status is OutcomeStatus.REFUSED, outcome
        assert isinstance(outcome.error, tether.IdempotencyConflict), outcome.error
        assert outcome.output is None
        assert world.refunds == [("o-1", 50)]

    def test_the_conflict_says_the_key_was_used_for_another_call_or_person(
        self, world: World
    ) -> None:
        app = world.app
        keyed(app, "alice")
        error = keyed(app, "bob").error

        assert isinstance(error, tether.IdempotencyConflict), error
        assert "for a different call" in error.message
        assert "on behalf of another person" in error.message

    @pytest.mark.parametrize("person", ["alice", None])
    def test_the_same_key_for_the_same_person_answers_with_the_stored_result(
        self, world: World, person: str | None
    ) -> None:
        app = world.app
        first = keyed(app, person)
        again = keyed(app, person)

        assert again.status is OutcomeStatus.IDEMPOTENT_HIT, again.error
        assert again.output == first.output
        assert world.refunds == [("o-1", 50)]

    def test_a_key_for_nobody_keeps_the_fingerprint_stored_before(
        self, world: World
    ) -> None:
        """Keys stored before `on_behalf_of` counted still match their calls."""
        app = world.app
        keyed(app, None)
        stored = app.store.lookup_key(
            KeyId(
                tenant="acme",
                principal_id="bot",
                capability="pay.refund",
                key="refund-o-1",
            )
        )
        assert stored is not None
        cap = app.capabilities.get("pay.refund")
        _, args_bytes = cap.dump_args(RefundIn.model_validate(SMALL))
        assert stored.fingerprint == args_fingerprint(app.store.record_key, args_bytes)
