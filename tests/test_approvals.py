"""Durable approval requests and single-use grants, through the Python API (RELIABILITY G.41).

Issue 6, items 1 and 2 as far as they exist: a call that policy says needs a
person's approval makes one durable request (coalesced while it waits), a
named approver with the rule's role decides it, and the grant runs exactly
that call exactly once. Every test runs on a real SQLite file and on
`memory://`; the races run 100 trials each, on SQLite with two `Tether` apps
(two connections) on one file.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import tether
from tether.errors import ApprovalClosed, NotAllowedToApprove, NotFound, UsageError
from tether.record import Outcome, OutcomeStatus
from tether.store import ApprovalRow, ApprovalStatus, Batch, Committed, Store
from tether.testing import FakeClock, write_config

TTL = timedelta(hours=1)

POLICY = """\
rules:
  - id: big
    match: {capability: pay.refund}
    when: "args.cents > 100"
    decision: require_approval
    reason: big refund
    approvers: [finance]
  - id: vault
    match: {capability: vault.rotate}
    decision: require_approval
    reason: rotating a credential
approvals: {ttl: 1h}
approvers:
  alice: [finance]
  dave: [finance, sre]
  bob: [sre]
  bot: [finance]    # the agent's own id, named by mistake: still never its own approver
  carol: [finance]  # the person the agent acts for: never approves for it either
"""

# The same policy with one more, unrelated rule: another policy version.
POLICY_V2 = POLICY.replace(
    "approvals:",
    "  - {id: small, match: {capability: pay.refund}, when: 'args.cents <= 10', "
    "decision: allow, reason: petty cash}\napprovals:",
)

CANARY = "canary-s3cr3t-7f3a"


class RefundIn(BaseModel, extra="forbid"):
    order: str
    cents: int


class RefundOut(BaseModel):
    refunded: int
    balance_after: int


class RotateIn(BaseModel, extra="forbid"):
    name: str
    token: tether.Secret


class RotateOut(BaseModel):
    rotated: str


@dataclass
class Bank:
    """The world the capabilities act on: a balance the dry run reads, calls counted."""

    balance: int = 10_000
    refunds: list[int] = field(default_factory=list)
    rotations: list[str] = field(default_factory=list)
    previews: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def refund_capability(
    bank: Bank, version: str = "1"
) -> tether.Capability[RefundIn, RefundOut]:
    """`pay.refund`: its dry run previews the balance after, read from the bank."""

    def preview(args: RefundIn) -> RefundOut:
        with bank.lock:
            bank.previews += 1
        return RefundOut(refunded=args.cents, balance_after=bank.balance - args.cents)

    def refund(args: RefundIn) -> RefundOut:
        with bank.lock:
            bank.refunds.append(args.cents)
            bank.balance -= args.cents
            return RefundOut(refunded=args.cents, balance_after=bank.balance)

    return tether.capability(
        "pay.refund",
        version=version,
        effect="write",
        idempotency="keyed",
        dry_run=preview,
    )(refund)


def rotate_capability(bank: Bank) -> tether.Capability[RotateIn, RotateOut]:
    """`vault.rotate`: takes a secret; its rule lists no approver roles."""

    def preview(args: RotateIn) -> RotateOut:
        return RotateOut(rotated=args.name)

    def rotate(args: RotateIn) -> RotateOut:
        with bank.lock:
            bank.rotations.append(args.name)
        return RotateOut(rotated=args.name)

    return tether.capability(
        "vault.rotate", effect="write", idempotency="keyed", dry_run=preview
    )(rotate)


@dataclass
class World:
    """An app on one backend, its clock, its policy file and the bank."""

    backend: str
    app: tether.Tether
    clock: FakeClock
    config: Path
    bank: Bank
    tmp_path: Path
    bot: tether.Principal = field(
        default_factory=lambda: tether.Principal(
            "bot", roles=["agent"], tenant="acme", on_behalf_of="carol"
        )
    )

    def second_app(self) -> tether.Tether:
        """Another app on the same database (another connection), or this one for memory."""
        if self.backend == "memory":
            return self.app
        other = open_app(self.backend, self.tmp_path, self.config, self.clock)
        other.register(refund_capability(self.bank), rotate_capability(self.bank))
        return other


def open_app(
    backend: str, tmp_path: Path, config: Path, clock: FakeClock
) -> tether.Tether:
    db = (
        "memory://"
        if backend == "memory"
        else f"sqlite:///{tmp_path / 'tether.db'}?synchronous=normal"
    )
    return tether.Tether(db=db, config=config, clock=clock, env={})


@pytest.fixture(params=["sqlite", "memory"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    config = tmp_path / "tether.yaml"
    config.write_text(POLICY)
    clock = FakeClock()
    bank = Bank()
    app = open_app(str(request.param), tmp_path, config, clock)
    app.register(refund_capability(bank), rotate_capability(bank))
    try:
        yield World(str(request.param), app, clock, config, bank, tmp_path)
    finally:
        app.close()


# -- helpers ---------------------------------------------------------------------------


def events(app: tether.Tether, run_id: str) -> list[dict[str, Any]]:
    """Return a run's events as data, in order."""
    return [e.data() for e in app.store.events(run_id)]


def of_step(evs: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    return [e for e in evs if e.get("step") == step]


def kinds(evs: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in evs]


def only(evs: list[dict[str, Any]], kind: str, **match: object) -> dict[str, Any]:
    """Return the one event of `kind` whose fields equal `match`."""
    found = [
        e
        for e in evs
        if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())
    ]
    assert len(found) == 1, (kind, match, kinds(evs))
    return found[0]


def asked(outcome: Outcome) -> tether.ApprovalRequired:
    """Return the step's ApprovalRequired (failing the test if it is anything else)."""
    assert outcome.status is OutcomeStatus.REFUSED, outcome
    assert isinstance(outcome.error, tether.ApprovalRequired), outcome.error
    return outcome.error


def asked_id(outcome: Outcome) -> str:
    """Return the id of the approval request the step was refused for."""
    approval_id = asked(outcome).approval_id
    assert approval_id is not None
    return approval_id


def refund(cents: int, order: str = "o-1") -> dict[str, object]:
    return {"order": order, "cents": cents}


def take(run: tether.Run, mode: str, name: str, args: dict[str, object]) -> Outcome:
    if mode == "sync":
        return run.step(name, args)
    return anyio.run(functools.partial(run.astep, name, args))


# -- 1. lifecycle ---------------------------------------------------------------------


class TestLifecycle:
    def test_a_call_needing_approval_makes_one_request_and_is_refused_with_its_id(
        self, world: World
    ) -> None:
        """The request is stored and recorded with masked args, the preview and its rule."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            error = asked(run.step("pay.refund", refund(500)))

        rows = app.approvals()
        assert [r.id for r in rows] == [error.approval_id]
        row = rows[0]
        assert row.status is ApprovalStatus.PENDING
        assert (row.run_id, row.step, row.capability, row.version) == (
            run.id,
            1,
            "pay.refund",
            "1",
        )
        assert (row.tenant, row.principal_id, row.on_behalf_of) == (
            "acme",
            "bot",
            "carol",
        )
        assert (row.rule_ids, row.reasons, row.approvers) == (
            ("big",),
            ("big refund",),
            ("finance",),
        )
        assert row.expires_at == row.created_at + TTL
        assert row.decided_by is None
        assert world.bank.refunds == []  # nothing happened
        assert world.bank.previews == 1

        step = of_step(events(app, run.id), 1)
        assert kinds(step) == ["validated", "decided", "approval_requested", "failed"]
        requested = step[2]
        assert requested["approval_id"] == row.id
        assert requested["args"] == refund(500)
        assert requested["preview"] == {
            "output": {"refunded": 500, "balance_after": 9_500}
        }
        assert requested["digest"] == row.digest.hex()
        assert requested["approvers"] == ["finance"]
        assert requested["rule_ids"] == ["big"]
        failed = step[3]
        assert (failed["stage"], failed["error_code"]) == (
            "policy",
            "approval_required",
        )
        assert row.id in failed["message"]
        assert app.approval(row.id) == row
        assert app.approval(row.id[:12]) == row  # a unique prefix finds it
        assert app.verify(run.id).ok

    def test_a_capability_without_dry_run_asks_with_no_preview(
        self, world: World
    ) -> None:
        """No dry-run handler: the request is made all the same, without a preview."""

        def bare(args: RefundIn) -> RefundOut:
            return RefundOut(refunded=args.cents, balance_after=0)

        world.app.register(
            tether.capability("pay.refund", version="0-bare", effect="write")(bare)
        )
        with world.app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))

        assert world.app.approval(request_id).preview is None
        assert only(events(world.app, run.id), "approval_requested")["preview"] is None

    def test_asking_again_while_pending_coalesces_onto_the_same_request(
        self, world: World
    ) -> None:
        """Same principal, same call, in the same or another run: the same request, no new row."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            first = asked(run.step("pay.refund", refund(500)))
            again = asked(run.step("pay.refund", refund(500)))
        with app.run(principal=world.bot, request="refund, later") as later:
            third = asked(later.step("pay.refund", refund(500)))

        assert first.approval_id == again.approval_id == third.approval_id
        assert len(app.approvals()) == 1
        assert "waiting for a person's decision" in again.message
        assert kinds(of_step(events(app, run.id), 2)) == [
            "validated",
            "decided",
            "failed",
        ]
        assert "approval_requested" not in kinds(events(app, later.id))
        assert world.bank.refunds == []

    def test_another_principal_asking_for_the_same_call_gets_its_own_request(
        self, world: World
    ) -> None:
        """A grant is for the principal that asked: another agent's identical call asks anew."""
        app = world.app
        other = tether.Principal("other-bot", tenant="acme")
        with app.run(principal=world.bot, request="refund") as run:
            mine = asked_id(run.step("pay.refund", refund(500)))
            app.approve(mine, by="alice")
        with app.run(principal=other, request="refund") as theirs:
            outcome = theirs.step("pay.refund", refund(500))

        assert asked_id(outcome) != mine
        assert world.bank.refunds == []
        assert app.approval(mine).status is ApprovalStatus.APPROVED

    def test_an_approved_call_runs_once_under_the_grant(
        self, world: World, mode: str
    ) -> None:
        """approval_used, intent, executed in that order; the handler ran once; the grant is spent."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(take(run, mode, "pay.refund", refund(500)))
            decided = app.approve(request_id, by="alice", note="customer called")
            assert (decided.status, decided.decided_by, decided.note) == (
                ApprovalStatus.APPROVED,
                "alice",
                "customer called",
            )
            outcome = take(run, mode, "pay.refund", refund(500))

        assert outcome.status is OutcomeStatus.EXECUTED, outcome.error
        assert outcome.output == RefundOut(refunded=500, balance_after=9_500)
        assert world.bank.refunds == [500]
        assert app.approval(request_id).status is ApprovalStatus.USED

        evs = events(app, run.id)
        decision = only(evs, "approval_decided", approval_id=request_id)
        assert (decision["outcome"], decision["by"], decision["note"]) == (
            "approved",
            "alice",
            "customer called",
        )
        assert decision["step"] == 1  # the requesting step
        step = of_step(evs, outcome.step)
        assert kinds(step) == [
            "validated",
            "decided",
            "approval_used",
            "intent",
            "executed",
        ]
        used = step[2]
        assert (used["approval_id"], used["decided_by"]) == (request_id, "alice")
        # the call that ran is the call that was approved
        requested = only(evs, "approval_requested", approval_id=request_id)
        assert step[0]["args"] == requested["args"]
        assert app.verify(run.id).ok

    def test_a_grant_is_single_use_the_next_identical_call_asks_again(
        self, world: World
    ) -> None:
        """After the grant ran its call, the same call makes a new request; nothing runs twice."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            first = asked_id(run.step("pay.refund", refund(500)))
            app.approve(first, by="alice")
            assert run.step("pay.refund", refund(500)).status is OutcomeStatus.EXECUTED
            second = asked_id(run.step("pay.refund", refund(500)))
            third = asked_id(run.step("pay.refund", refund(500)))

        assert second != first
        assert third == second  # the new request coalesces like any other
        assert world.bank.refunds == [500]
        statuses = {r.id: r.status for r in app.approvals()}
        assert statuses == {first: ApprovalStatus.USED, second: ApprovalStatus.PENDING}
        assert app.verify(run.id).ok

    def test_approvals_filter_by_status(self, world: World) -> None:
        """`app.approvals(status=...)` lists each request under the status it is in."""
        app = world.app
        with app.run(principal=world.bot, request="refunds") as run:
            ids = [asked_id(run.step("pay.refund", refund(200 + i))) for i in range(4)]
            app.approve(ids[0], by="alice")
            app.approve(ids[1], by="alice")
            run.step("pay.refund", refund(201))  # spends ids[1]
            app.deny(ids[2], by="dave", reason="no")

        def listed(status: str) -> list[str]:
            return [r.id for r in app.approvals(status=status)]

        assert listed("approved") == [ids[0]]
        assert listed("used") == [ids[1]]
        assert listed("denied") == [ids[2]]
        assert listed("pending") == [ids[3]]
        assert listed("expired") == []
        assert len(app.approvals(limit=2)) == 2
        with pytest.raises(NotFound):
            app.approval("apr_nosuchrequest")


class _Exploding(list[int]):
    """A ledger whose upstream is down: the refund handler fails when it books."""

    def append(self, value: int) -> None:
        raise ConnectionError("payments upstream: 503")


class TestGrantAndTheRestOfTheCallPath:
    def test_a_limit_refusal_leaves_the_grant_unspent_until_the_call_can_run(
        self, world: World
    ) -> None:
        """The grant is spent with the intent, in one write: a call a limit refuses keeps it."""
        write_config(
            world.config,
            POLICY
            + "limits:\n  - {id: q, kind: quota, per: minute, max: 1, capability: 'pay.*'}\n",
        )
        app = world.app
        with app.run(principal=world.bot, request="refunds") as run:
            assert run.step("pay.refund", refund(50)).status is OutcomeStatus.EXECUTED
            request_id = asked_id(run.step("pay.refund", refund(500)))
            app.approve(request_id, by="alice")
            limited = run.step("pay.refund", refund(500))
            assert isinstance(limited.error, tether.LimitExceeded)
            assert app.approval(request_id).status is ApprovalStatus.APPROVED
            world.clock.advance(timedelta(minutes=1))
            ran = run.step("pay.refund", refund(500))

        assert ran.status is OutcomeStatus.EXECUTED, ran.error
        assert world.bank.refunds == [50, 500]
        assert app.approval(request_id).status is ApprovalStatus.USED
        assert "approval_used" not in kinds(of_step(events(app, run.id), limited.step))
        assert app.verify(run.id).ok

    def test_a_granted_call_that_fails_spent_its_grant_the_next_asks_again(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The failed call was the one call the grant allowed: calling again asks a person again."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
            app.approve(request_id, by="alice")
            with monkeypatch.context() as m:
                m.setattr(world.bank, "refunds", _Exploding())
                failed = run.step("pay.refund", refund(500))
            again = run.step("pay.refund", refund(500))

        assert failed.status is OutcomeStatus.FAILED
        assert app.approval(request_id).status is ApprovalStatus.USED
        assert asked_id(again) != request_id
        assert kinds(of_step(events(app, run.id), failed.step))[2:4] == [
            "approval_used",
            "intent",
        ]
        assert app.verify(run.id).ok

    def test_a_grant_spent_by_an_intent_whose_answer_was_lost_is_given_back(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The intent landed but the store's answer did not: the step never ran, so the next try runs under the same grant, without asking again."""
        app = world.app
        answer_lost = _answer_lost_when_spending(app.store)

        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
            app.approve(request_id, by="alice")
            with monkeypatch.context() as m:
                m.setattr(app.store, "commit", answer_lost)
                with pytest.raises(tether.StoreError):
                    run.step("pay.refund", refund(500))
            assert world.bank.refunds == []
            again = run.step("pay.refund", refund(500))

        assert again.status is OutcomeStatus.EXECUTED, again.error
        assert world.bank.refunds == [500]
        assert app.approval(request_id).status is ApprovalStatus.USED
        evs = events(app, run.id)
        lost = of_step(evs, again.step - 1)
        assert kinds(lost)[2:] == ["approval_used", "intent", "failed"]
        assert lost[-1]["stage"] == "intent"
        assert "approval given back" in lost[-1]["message"]
        assert only(of_step(evs, again.step), "approval_used")["approval_id"] == (
            request_id
        )
        assert len(app.store.list_approvals()) == 1  # nobody was asked again
        assert app.verify(run.id).ok

    def test_a_grant_given_back_after_its_run_was_aborted_is_not_approved_again(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An abort withdraws its run's grants; one another run was spending comes back expired.

        Run A asked and was approved; run B, making the identical call, spent
        the grant with an intent whose answer was lost (the step never ran).
        A is aborted meanwhile: the grant, spent, is not A's to withdraw then.
        When B gives it back, it must not become approved again, or a third
        run would make the call under the aborted run's approval, unasked.
        """
        app = world.app
        answer_lost = _answer_lost_when_spending(app.store)

        seen: dict[str, Any] = {}

        def ask_spend_elsewhere_and_abort() -> None:
            with app.run(principal=world.bot, request="refund") as asking:
                seen["request"] = asked_id(asking.step("pay.refund", refund(500)))
                app.approve(seen["request"], by="alice")
                with app.run(principal=world.bot, request="refund too") as spending:
                    seen["spending"] = spending.id
                    with monkeypatch.context() as m:
                        m.setattr(app.store, "commit", answer_lost)
                        with pytest.raises(tether.StoreError):
                            spending.step("pay.refund", refund(500))
                    seen["spent"] = app.approval(seen["request"]).status
                    app.abort(asking.id, by="dave", reason="stop the refunds")
                # Its next write (the run's end) gave the grant back.

        with pytest.raises(tether.RunAborted):
            ask_spend_elsewhere_and_abort()
        request_id = seen["request"]
        with app.run(principal=world.bot, request="refund again") as third:
            later = third.step("pay.refund", refund(500))

        assert seen["spent"] is ApprovalStatus.USED
        assert app.approval(request_id).status is ApprovalStatus.EXPIRED
        assert asked_id(later) != request_id  # a person is asked anew
        assert world.bank.refunds == []
        lost = of_step(events(app, seen["spending"]), 1)
        assert kinds(lost)[-1] == "failed"
        assert lost[-1]["stage"] == "intent"
        assert world.bank.refunds == []


def _answer_lost_when_spending(store: Store) -> Callable[[Batch], Committed]:
    """`store.commit` whose answer is lost when the batch spends a grant: it landed."""
    commit = store.commit

    def answer_lost(batch: Batch) -> Committed:
        committed = commit(batch)
        if batch.use_grant is not None:
            raise tether.StoreError("failpoint: the answer was lost")
        return committed

    return answer_lost


# -- 2. digest binding ---------------------------------------------------------------


class Abstains:
    """A Python policy with no opinion on any step."""

    id = "abstains"

    def evaluate(self, request: tether.DecisionRequest) -> tether.Decision | None:
        return None


def change_args(world: World) -> dict[str, object]:
    return refund(501)


def change_policy(world: World) -> dict[str, object]:
    write_config(world.config, POLICY_V2)
    return refund(500)


def change_version(world: World) -> dict[str, object]:
    world.app.register(refund_capability(world.bank, version="2"))
    return refund(500)


def change_preview(world: World) -> dict[str, object]:
    world.bank.balance = 600  # what the dry run predicts changes, the args do not
    return refund(500)


def add_python_policy(world: World) -> dict[str, object]:
    world.app.add_policy(
        Abstains()
    )  # decides nothing: the policy set changed all the same
    return refund(500)


CHANGES: dict[str, Callable[[World], dict[str, object]]] = {
    "args": change_args,
    "policy": change_policy,
    "python-policy": add_python_policy,
    "version": change_version,
    "preview": change_preview,
}


class TestDigestBinding:
    @pytest.mark.parametrize("change", list(CHANGES))
    def test_a_changed_call_does_not_use_the_grant_and_asks_again(
        self, world: World, change: str
    ) -> None:
        """Other args, policy, capability version or preview: a new request, the grant unused."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            granted = asked_id(run.step("pay.refund", refund(500)))
            app.approve(granted, by="alice")
            args = CHANGES[change](world)
            fresh = asked_id(run.step("pay.refund", args))
            assert world.bank.refunds == []
            assert fresh != granted
            assert app.approval(granted).status is ApprovalStatus.APPROVED  # not spent

            # the new request, approved, runs exactly what it showed
            app.approve(fresh, by="dave")
            outcome = run.step("pay.refund", args)

        assert outcome.status is OutcomeStatus.EXECUTED, outcome.error
        assert world.bank.refunds == [args["cents"]]
        assert app.approval(fresh).status is ApprovalStatus.USED
        assert app.approval(granted).status is ApprovalStatus.APPROVED

        evs = events(app, run.id)
        old = only(evs, "approval_requested", approval_id=granted)
        new = only(evs, "approval_requested", approval_id=fresh)
        assert new["digest"] != old["digest"]
        assert only(evs, "approval_used")["approval_id"] == fresh
        ran = of_step(evs, outcome.step)
        assert ran[0]["args"] == new["args"] == args
        assert ran[0]["version"] == new["version"]
        assert (
            ran[1]["policy_version"] == of_step(evs, new["step"])[1]["policy_version"]
        )
        if change in ("policy", "python-policy"):
            assert ran[1]["policy_version"] != of_step(evs, 1)[1]["policy_version"]
        if change == "version":
            assert (old["version"], new["version"]) == ("1", "2")
        if change == "preview":
            assert new["preview"] != old["preview"]
            assert new["args"] == old["args"]
        assert app.verify(run.id).ok


# -- 3. abuse matrix (G.41) ------------------------------------------------------------


def approve_as(who: str) -> Callable[[World, str], object]:
    def attempt(world: World, request_id: str) -> object:
        return world.app.approve(request_id, by=who)

    return attempt


def deny_as(who: str) -> Callable[[World, str], object]:
    def attempt(world: World, request_id: str) -> object:
        return world.app.deny(request_id, by=who, reason="not today")

    return attempt


def nothing(world: World, request_id: str) -> None:
    return None


def approved_by_alice(world: World, request_id: str) -> None:
    world.app.approve(request_id, by="alice")


def denied_by_alice(world: World, request_id: str) -> None:
    world.app.deny(request_id, by="alice", reason="duplicate refund")


def past_expiry(world: World, request_id: str) -> None:
    world.clock.advance(TTL + timedelta(seconds=1))


@dataclass(frozen=True)
class Abuse:
    before: Callable[[World, str], None]
    attempt: Callable[[World, str], object]
    who: str
    error: type[tether.TetherError]
    says: tuple[str, ...]
    """Words the one-line message must hold (why it was refused)."""
    status_after: ApprovalStatus


ABUSES: dict[str, Abuse] = {
    "self-approval by the principal id": Abuse(
        nothing,
        approve_as("bot"),
        "bot",
        NotAllowedToApprove,
        ("bot", "own request"),
        ApprovalStatus.PENDING,
    ),
    "self-approval by the person behind the agent": Abuse(
        nothing,
        approve_as("carol"),
        "carol",
        NotAllowedToApprove,
        ("carol", "own request"),
        ApprovalStatus.PENDING,
    ),
    "self-denial by the person behind the agent": Abuse(
        nothing,
        deny_as("carol"),
        "carol",
        NotAllowedToApprove,
        ("carol", "own request"),
        ApprovalStatus.PENDING,
    ),
    "approver without the rule's role": Abuse(
        nothing,
        approve_as("bob"),
        "bob",
        NotAllowedToApprove,
        ("bob", "none of the roles", "finance"),
        ApprovalStatus.PENDING,
    ),
    "name not in approvers": Abuse(
        nothing,
        approve_as("zed"),
        "zed",
        NotAllowedToApprove,
        ("zed", "not an approver", "approvers:"),
        ApprovalStatus.PENDING,
    ),
    "approving twice": Abuse(
        approved_by_alice,
        approve_as("alice"),
        "alice",
        ApprovalClosed,
        ("approved by alice", "final"),
        ApprovalStatus.APPROVED,
    ),
    "another approver after approval": Abuse(
        approved_by_alice,
        deny_as("dave"),
        "dave",
        ApprovalClosed,
        ("approved by alice", "final"),
        ApprovalStatus.APPROVED,
    ),
    "approving after deny": Abuse(
        denied_by_alice,
        approve_as("dave"),
        "dave",
        ApprovalClosed,
        ("denied by alice", "final"),
        ApprovalStatus.DENIED,
    ),
    "approving an expired request": Abuse(
        past_expiry,
        approve_as("alice"),
        "alice",
        ApprovalClosed,
        ("expired at",),
        ApprovalStatus.EXPIRED,
    ),
}


class TestAbuse:
    @pytest.mark.parametrize("case", list(ABUSES))
    def test_refused_and_recorded_in_the_requesting_run(
        self, world: World, case: str
    ) -> None:
        """Refused with a one-line reason, an approval_decided `refused` event, the record verifies."""
        abuse = ABUSES[case]
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
            abuse.before(world, request_id)
            before = app.approval(request_id)
            with pytest.raises(abuse.error) as caught:
                abuse.attempt(world, request_id)
            after = app.approval(request_id)

        message = caught.value.message
        assert "\n" not in message
        if abuse.error is ApprovalClosed:
            assert request_id in message
        for word in abuse.says:
            assert word in message, (word, message)
        assert after == before  # the attempt changed nothing
        assert after.status is abuse.status_after
        refused = only(events(app, run.id), "approval_decided", outcome="refused")
        assert (refused["approval_id"], refused["by"], refused["reason"]) == (
            request_id,
            abuse.who,
            message,
        )
        assert refused["step"] == 1
        assert world.bank.refunds == []
        assert app.verify(run.id).ok

    def test_a_refused_attempt_leaves_the_request_open_for_a_real_approver(
        self, world: World
    ) -> None:
        """Every refusal is recorded; the request still waits, and alice's grant runs the call."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
            for who in ("bot", "carol", "bob", "zed"):
                with pytest.raises(NotAllowedToApprove):
                    app.approve(request_id, by=who)
            app.approve(request_id, by="alice")
            outcome = run.step("pay.refund", refund(500))

        assert outcome.status is OutcomeStatus.EXECUTED
        decisions = [
            (e["by"], e["outcome"])
            for e in events(app, run.id)
            if e["kind"] == "approval_decided"
        ]
        assert decisions == [
            ("bot", "refused"),
            ("carol", "refused"),
            ("bob", "refused"),
            ("zed", "refused"),
            ("alice", "approved"),
        ]
        assert app.verify(run.id).ok

    def test_a_rule_without_roles_lets_any_named_approver_but_the_requester_decide(
        self, world: World
    ) -> None:
        """`vault` lists no roles: bob (sre) may approve it; a name not listed may not."""
        app = world.app
        with app.run(principal=world.bot, request="rotate") as run:
            args = {"name": "db", "token": CANARY}
            request_id = asked_id(run.step("vault.rotate", args))
            with pytest.raises(NotAllowedToApprove):
                app.approve(request_id, by="zed")
            with pytest.raises(NotAllowedToApprove):
                app.approve(request_id, by="carol")
            app.approve(request_id, by="bob")
            outcome = run.step("vault.rotate", args)

        assert outcome.status is OutcomeStatus.EXECUTED
        assert world.bank.rotations == ["db"]

    @pytest.mark.parametrize("reason", ["", "   \n"])
    def test_deny_without_a_reason_is_a_usage_error_that_records_nothing(
        self, world: World, reason: str
    ) -> None:
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
            count = len(events(app, run.id))
            with pytest.raises(UsageError, match="reason"):
                app.deny(request_id, by="alice", reason=reason)
            assert len(events(app, run.id)) == count
            assert app.approval(request_id).status is ApprovalStatus.PENDING
        assert app.verify(run.id).ok

    def test_deciding_an_unknown_request_is_not_found_and_records_nothing(
        self, world: World
    ) -> None:
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            asked(run.step("pay.refund", refund(500)))
            count = len(events(app, run.id))
            with pytest.raises(NotFound):
                app.approve("apr_00000000000000000000", by="alice")
            assert len(events(app, run.id)) == count

    def test_a_spent_grant_cannot_be_decided_again(self, world: World) -> None:
        """Denying a request whose grant already ran is refused as closed (`used`) and recorded."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
            app.approve(request_id, by="alice")
            run.step("pay.refund", refund(500))
            with pytest.raises(ApprovalClosed, match="is used"):
                app.deny(request_id, by="dave", reason="too late")

        assert app.approval(request_id).status is ApprovalStatus.USED
        refused = only(events(app, run.id), "approval_decided", outcome="refused")
        assert refused["by"] == "dave"
        assert app.verify(run.id).ok

    def test_a_decision_after_the_requesting_run_ended_keeps_its_record_valid(
        self, world: World
    ) -> None:
        """The agent process is gone when the person decides: the record must still verify."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
        with pytest.raises(NotAllowedToApprove):
            app.approve(request_id, by="carol")
        app.approve(request_id, by="alice")

        assert app.approval(request_id).status is ApprovalStatus.APPROVED
        assert app.verify(run.id).ok


# -- 5. expiry -------------------------------------------------------------------------


class TestExpiry:
    def test_an_undecided_request_expires_and_the_next_call_asks_anew(
        self, world: World
    ) -> None:
        """Listed as expired; the next identical call is denied by the expiry (recorded, by `tether`); the one after asks anew."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            old = asked_id(run.step("pay.refund", refund(500)))
            world.clock.advance(TTL - timedelta(seconds=1))
            assert [r.id for r in app.approvals(status="pending")] == [old]
            world.clock.advance(timedelta(seconds=1))  # exactly at expiry: expired

            assert [r.id for r in app.approvals(status="expired")] == [old]
            assert app.approvals(status="pending") == []
            assert app.approval(old).status is ApprovalStatus.EXPIRED

            lapsed = run.step("pay.refund", refund(500))
            outcome = run.step("pay.refund", refund(500))
            new = asked_id(outcome)

        assert isinstance(lapsed.error, tether.Denied)  # expiry is a no, for that call
        assert "expired undecided" in lapsed.error.message
        assert new != old
        assert world.bank.refunds == []
        step = of_step(events(app, run.id), lapsed.step)
        assert kinds(step) == ["validated", "decided", "approval_decided", "failed"]
        expired = step[2]
        assert (expired["approval_id"], expired["outcome"], expired["by"]) == (
            old,
            "expired",
            "tether",
        )
        asked = of_step(events(app, run.id), outcome.step)
        assert kinds(asked) == ["validated", "decided", "approval_requested", "failed"]
        assert asked[2]["approval_id"] == new
        assert [r.id for r in app.approvals(status="pending")] == [new]
        assert [r.id for r in app.approvals(status="expired")] == [old]
        assert app.verify(run.id).ok

    def test_a_grant_not_used_before_expiry_runs_nothing(self, world: World) -> None:
        """Approved a second before expiry, called after it: a new request, the handler never ran."""
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            old = asked_id(run.step("pay.refund", refund(500)))
            world.clock.advance(TTL - timedelta(seconds=1))
            app.approve(old, by="alice")
            world.clock.advance(timedelta(seconds=2))
            new = asked_id(run.step("pay.refund", refund(500)))

        assert new != old
        assert world.bank.refunds == []
        assert "approval_used" not in kinds(events(app, run.id))
        assert app.verify(run.id).ok

    def test_expired_requests_are_listed_however_many_newer_requests_there_are(
        self, world: World
    ) -> None:
        app = world.app
        with app.run(principal=world.bot, request="refunds") as run:
            old = asked_id(run.step("pay.refund", refund(500)))
            world.clock.advance(TTL)
            newer = [
                asked_id(run.step("pay.refund", refund(200 + i))) for i in range(3)
            ]
        assert old not in newer
        assert [r.id for r in app.approvals(status="expired", limit=2)] == [old]


# -- 6. deny ---------------------------------------------------------------------------


class TestDeny:
    def test_a_denied_call_is_refused_with_the_persons_reason(
        self, world: World
    ) -> None:
        """tether.Denied carries alice's reason; the record shows request, decision, refusal."""
        app = world.app
        why = "order o-1 was refunded last week"
        with app.run(principal=world.bot, request="refund") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
            row = app.deny(request_id, by="alice", reason=why)
            assert (row.status, row.decided_by, row.note) == (
                ApprovalStatus.DENIED,
                "alice",
                why,
            )
            outcome = run.step("pay.refund", refund(500))
            again = run.step("pay.refund", refund(500))

        for o in (outcome, again):  # denied stays denied: no new request
            assert o.status is OutcomeStatus.REFUSED
            assert isinstance(o.error, tether.Denied)
            assert why in o.error.message
            assert "alice" in o.error.message
            assert o.error.reasons == (why,)
        assert len(app.approvals()) == 1
        assert world.bank.refunds == []

        evs = events(app, run.id)
        sequence = [
            (e["kind"], e.get("outcome") or e.get("error_code"))
            for e in evs
            if e["kind"] in {"approval_requested", "approval_decided", "failed"}
        ]
        assert sequence == [
            ("approval_requested", None),
            ("failed", "approval_required"),
            ("approval_decided", "denied"),
            ("failed", "policy_denied"),
            ("failed", "policy_denied"),
        ]
        decision = only(evs, "approval_decided")
        assert (decision["by"], decision["note"]) == ("alice", why)
        assert app.verify(run.id).ok

    def test_a_changed_call_after_a_denial_asks_again(self, world: World) -> None:
        app = world.app
        with app.run(principal=world.bot, request="refund") as run:
            denied = asked_id(run.step("pay.refund", refund(500)))
            app.deny(denied, by="alice", reason="too much")
            fresh = asked_id(run.step("pay.refund", refund(300)))
        assert fresh != denied


# -- 7. secrets ------------------------------------------------------------------------


class TestSecrets:
    def test_a_secret_arg_never_reaches_the_request_or_its_event(
        self, world: World
    ) -> None:
        """Masked in the row and the record; two calls differing only in the secret differ."""
        app = world.app
        with app.run(principal=world.bot, request="rotate") as run:
            first = asked(run.step("vault.rotate", {"name": "db", "token": CANARY}))
            other = asked(
                run.step("vault.rotate", {"name": "db", "token": CANARY + "-2"})
            )
            same = asked_id(run.step("vault.rotate", {"name": "db", "token": CANARY}))

        first_id, other_id = first.approval_id, other.approval_id
        assert first_id is not None
        assert other_id is not None
        assert other_id != first_id
        assert same == first_id
        rows = {r.id: r for r in app.approvals()}
        assert set(rows) == {first_id, other_id}
        a, b = rows[first_id], rows[other_id]
        assert a.args == b.args  # both masked alike ...
        assert a.digest != b.digest  # ... yet bound to different secrets
        for row in (a, b):
            assert CANARY.encode() not in row.args
            assert CANARY.encode() not in (row.preview or b"")
            assert CANARY not in repr(row)
        for e in app.store.events(run.id):
            assert CANARY.encode() not in e.body
        requested = [
            e for e in events(app, run.id) if e["kind"] == "approval_requested"
        ]
        assert [e["args"]["name"] for e in requested] == ["db", "db"]
        assert all(e["args"]["token"] != CANARY for e in requested)
        assert CANARY not in (first.message + other.message)
        if world.backend == "sqlite":
            app.close()
            for f in world.tmp_path.glob("tether.db*"):
                assert CANARY.encode() not in f.read_bytes(), f

    def test_a_grant_for_one_secret_does_not_run_the_call_with_another(
        self, world: World
    ) -> None:
        app = world.app
        with app.run(principal=world.bot, request="rotate") as run:
            granted = asked_id(
                run.step("vault.rotate", {"name": "db", "token": CANARY})
            )
            app.approve(granted, by="alice")
            swapped = run.step("vault.rotate", {"name": "db", "token": "another"})
            assert asked_id(swapped) != granted
            assert world.bank.rotations == []
            ran = run.step("vault.rotate", {"name": "db", "token": CANARY})

        assert ran.status is OutcomeStatus.EXECUTED
        assert world.bank.rotations == ["db"]


# -- 4. races --------------------------------------------------------------------------

TRIALS = 100


def both(
    first: Callable[[], object], second: Callable[[], object]
) -> list[object | BaseException]:
    """Run two callables at once (a barrier lines them up); return results or errors."""
    gate = threading.Barrier(2, timeout=10)
    results: list[object | BaseException] = [None, None]

    def go(i: int, fn: Callable[[], object]) -> None:
        gate.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # the test inspects it
            results[i] = exc

    threads = [
        threading.Thread(target=go, args=(i, fn))
        for i, fn in enumerate((first, second))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    return results


class LookupGate:
    """While armed, holds each caller after it read the latest request until both have.

    Both racing callers then see the same request (say, one approved grant)
    before either writes: the race the store must settle.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *apps: tether.Tether) -> None:
        self.gate: threading.Barrier | None = None
        for store in {id(a.store): a.store for a in apps}.values():
            read = store.latest_approval

            def held(
                tenant: str,
                principal_id: str,
                digest: bytes,
                rule_ids: tuple[str, ...],
                *,
                on_behalf_of: str | None,
                read: Callable[..., ApprovalRow | None] = read,
            ) -> ApprovalRow | None:
                row = read(
                    tenant, principal_id, digest, rule_ids, on_behalf_of=on_behalf_of
                )
                gate = self.gate
                if gate is not None:
                    gate.wait()
                return row

            monkeypatch.setattr(store, "latest_approval", held)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self.gate = threading.Barrier(2, timeout=10)
        try:
            yield
        finally:
            self.gate = None


class TestRaces:
    def test_two_approvers_racing_on_one_request_exactly_one_wins(
        self, world: World
    ) -> None:
        """100 races (two apps on one SQLite file): one decision applies, the other is closed."""
        app_a, app_b = world.app, world.second_app()
        wins: dict[str, int] = {"alice": 0, "dave": 0}
        try:
            with app_a.run(principal=world.bot, request="refunds") as run:
                for trial in range(TRIALS):
                    request_id = asked_id(run.step("pay.refund", refund(1_000 + trial)))
                    dave_denies = trial % 2 == 1
                    dave: Callable[[], object] = (
                        functools.partial(
                            app_b.deny, request_id, by="dave", reason="no"
                        )
                        if dave_denies
                        else functools.partial(app_b.approve, request_id, by="dave")
                    )
                    results = both(
                        functools.partial(app_a.approve, request_id, by="alice"), dave
                    )
                    won = [r for r in results if isinstance(r, ApprovalRow)]
                    lost = [r for r in results if isinstance(r, ApprovalClosed)]
                    assert (len(won), len(lost)) == (1, 1), (trial, results)
                    winner = won[0]
                    wins[winner.decided_by or ""] += 1
                    stored = app_b.approval(request_id)
                    assert stored == winner
                    assert f"by {winner.decided_by}" in lost[0].message
                    expected = (
                        ApprovalStatus.DENIED
                        if dave_denies and winner.decided_by == "dave"
                        else ApprovalStatus.APPROVED
                    )
                    assert stored.status is expected
        finally:
            if app_b is not app_a:
                app_b.close()

        decided = [e for e in events(app_a, run.id) if e["kind"] == "approval_decided"]
        by_request: dict[str, list[str]] = {}
        for e in decided:
            by_request.setdefault(e["approval_id"], []).append(e["outcome"])
        assert len(by_request) == TRIALS
        for outcomes in by_request.values():
            assert sorted(outcomes) in (["approved", "refused"], ["denied", "refused"])
        assert app_a.verify(run.id).ok
        print(f"wins: {wins}")

    @pytest.mark.parametrize("held", [True, False], ids=["both-see-it", "free-race"])
    def test_two_callers_racing_to_spend_one_grant_exactly_one_executes(
        self, world: World, monkeypatch: pytest.MonkeyPatch, held: bool
    ) -> None:
        """100 races: one caller spends the grant and runs, the other is refused.

        Held, both callers read the approved grant before either writes, so the
        store's atomic spend decides; free, the loser may also come late and
        find the grant used, and ask again.
        """
        app_a, app_b = world.app, world.second_app()
        gate = LookupGate(monkeypatch, app_a, app_b)
        spent_meanwhile = 0
        try:
            with (
                app_a.run(principal=world.bot, request="refunds") as run_a,
                app_b.run(principal=world.bot, request="refunds too") as run_b,
            ):
                for trial in range(TRIALS):
                    cents = 1_000 + trial
                    args = refund(cents)
                    grant = asked_id(run_a.step("pay.refund", args))
                    app_a.approve(grant, by="alice")
                    with gate.armed() if held else contextlib.nullcontext():
                        results = both(
                            functools.partial(run_a.step, "pay.refund", args),
                            functools.partial(run_b.step, "pay.refund", args),
                        )
                    outcomes = [r for r in results if isinstance(r, Outcome)]
                    assert len(outcomes) == 2, (trial, results)
                    executed = [
                        o for o in outcomes if o.status is OutcomeStatus.EXECUTED
                    ]
                    refused = [o for o in outcomes if o.status is OutcomeStatus.REFUSED]
                    assert (len(executed), len(refused)) == (1, 1), (trial, outcomes)
                    loser = asked(refused[0])
                    assert loser.approval_id is not None
                    if loser.approval_id == grant:
                        assert "spent by another call" in loser.message
                        spent_meanwhile += 1
                    else:  # came after the spend: a new request for a new grant
                        assert held is False
                        new = app_a.approval(loser.approval_id)
                        assert new.status is ApprovalStatus.PENDING
                    assert world.bank.refunds.count(cents) == 1
                    assert app_b.approval(grant).status is ApprovalStatus.USED
        finally:
            if app_b is not app_a:
                app_b.close()

        assert len(world.bank.refunds) == TRIALS
        used = [
            e["approval_id"]
            for rid in (run_a.id, run_b.id)
            for e in events(app_a, rid)
            if e["kind"] == "approval_used"
        ]
        assert len(used) == len(set(used)) == TRIALS
        intents = sum(
            e["kind"] == "intent"
            for rid in (run_a.id, run_b.id)
            for e in events(app_a, rid)
        )
        assert intents == TRIALS  # the loser wrote no intent
        assert app_a.verify(run_a.id).ok
        assert app_a.verify(run_b.id).ok
        print(f"losers refused by the atomic spend: {spent_meanwhile}/{TRIALS}")

    def test_two_callers_asking_at_once_share_one_request(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Coalescing holds under a race too: one request, whichever caller made it."""
        app_a, app_b = world.app, world.second_app()
        try:
            gate = LookupGate(monkeypatch, app_a, app_b)
            with (
                app_a.run(principal=world.bot, request="refund") as run_a,
                app_b.run(principal=world.bot, request="refund too") as run_b,
                gate.armed(),
            ):
                results = both(
                    functools.partial(run_a.step, "pay.refund", refund(500)),
                    functools.partial(run_b.step, "pay.refund", refund(500)),
                )
        finally:
            if app_b is not app_a:
                app_b.close()
        ids = {asked_id(r) for r in results if isinstance(r, Outcome)}
        assert len(ids) == 1
        assert len(app_a.approvals()) == 1


class TestDecisionsLandingOnAnOpenRun:
    def test_a_run_takes_up_a_decision_made_while_it_is_open(
        self, world: World
    ) -> None:
        """A decision from another app lands in the open run's record; the run's next write extends it."""
        app, other = world.app, world.second_app()
        try:
            with app.run(principal=world.bot, request="refunds") as run:
                request_id = asked_id(run.step("pay.refund", refund(500)))
                with pytest.raises(NotAllowedToApprove):
                    other.approve(request_id, by="zed")
                other.approve(request_id, by="alice")
                big = run.step("pay.refund", refund(500))
                small = run.step("pay.refund", refund(50))  # needs no approval
        finally:
            if other is not app:
                other.close()

        assert (small.status, big.status) == (OutcomeStatus.EXECUTED,) * 2
        assert world.bank.refunds == [500, 50]
        assert app.verify(run.id).ok

    def test_a_run_keeps_stepping_while_decisions_keep_landing(
        self, world: World, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two decisions land back to back around the run's write: the step still runs."""
        app = world.app
        with app.run(principal=world.bot, request="refunds") as run:
            request_id = asked_id(run.step("pay.refund", refund(500)))
            with pytest.raises(NotAllowedToApprove):
                app.approve(request_id, by="zed")  # the run's head moved: it must adopt
            read = app.store.events
            landed: list[str] = []

            def read_then_another_decision(run_id: str) -> Any:
                # Another attempt lands just after the run re-read its record to adopt.
                stored = read(run_id)
                if not landed:
                    landed.append(run_id)
                    with contextlib.suppress(NotAllowedToApprove):
                        app.approve(request_id, by="zed")
                return stored

            monkeypatch.setattr(app.store, "events", read_then_another_decision)
            outcome = run.step("pay.refund", refund(50))
            monkeypatch.undo()

        assert landed
        assert outcome.status is OutcomeStatus.EXECUTED
        assert app.verify(run.id).ok


def test_an_approver_for_one_tenant_cannot_decide_anothers_request(
    tmp_path: Path,
) -> None:
    """G.41: `approvers: {bob: {roles: [finance], tenants: [acme]}}` may not decide globex's request; refused and recorded."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "rules:\n"
        "  - {id: big, match: {capability: pay.refund}, when: 'args.cents > 100',\n"
        "     decision: require_approval, reason: big, approvers: [finance]}\n"
        "approvers:\n"
        "  bob: {roles: [finance], tenants: [acme]}\n"
        "  alice: [finance]\n"
    )
    with tether.Tether(db="memory://", config=config, clock=FakeClock(), env={}) as app:
        app.register(_tenant_refund)
        asker = tether.Principal("bot", tenant="globex")
        with app.run(principal=asker, request="refund") as run:
            outcome = run.step("pay.refund", {"cents": 500})
        assert isinstance(outcome.error, tether.ApprovalRequired)
        request_id = outcome.error.approval_id
        assert request_id is not None
        with pytest.raises(tether.NotAllowedToApprove, match="not for tenant globex"):
            app.approve(request_id, by="bob")
        approved = app.approve(request_id, by="alice")
        kinds = [e.data() for e in app.store.events(run.id)]

    assert approved.status == "approved"
    refused = [
        e
        for e in kinds
        if e["kind"] == "approval_decided" and e["outcome"] == "refused"
    ]
    assert [e["by"] for e in refused] == ["bob"]


class _TenantIn(BaseModel):
    cents: int


class _TenantOut(BaseModel):
    refunded: int


@tether.capability("pay.refund", effect="write", idempotency="keyed")
def _tenant_refund(args: _TenantIn) -> _TenantOut:
    return _TenantOut(refunded=args.cents)


def test_a_grant_for_one_rules_call_does_not_run_the_same_call_another_rule_guards(
    tmp_path: Path,
) -> None:
    """The same call (capability, args, policy version) asked for by a staging
    rule that an SRE may approve and by a production rule that needs finance:
    the SRE's grant for the staging call does not run the production one,
    which asks anew, for finance; once finance approves, it runs once, and the
    staging call still runs under bob's grant."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "rules:\n"
        "  - {id: staging-needs-sre, match: {capability: pay.refund},\n"
        "     when: \"context.env == 'staging'\", decision: require_approval,\n"
        "     reason: staging refunds need an SRE, approvers: [sre]}\n"
        "  - {id: prod-needs-finance, match: {capability: pay.refund},\n"
        "     when: \"context.env == 'prod'\", decision: require_approval,\n"
        "     reason: production refunds need finance, approvers: [finance]}\n"
        "approvers: {alice: [finance], bob: [sre]}\n"
    )
    bot = tether.Principal("bot", tenant="acme")
    paid: list[str] = []

    @tether.capability("pay.refund", effect="write", idempotency="keyed")
    def pay(args: _TenantIn, ctx: tether.CallContext) -> _TenantOut:
        paid.append(str(ctx.run_id))
        return _TenantOut(refunded=args.cents)

    clock = FakeClock()

    def call(app: tether.Tether, env: str) -> Outcome:
        clock.advance(timedelta(seconds=1))
        with app.run(principal=bot, request=env, context={"env": env}) as run:
            return run.step("pay.refund", {"cents": 500})

    with tether.Tether(db="memory://", config=config, clock=clock, env={}) as app:
        app.register(pay)
        staging = asked_id(call(app, "staging"))
        app.approve(staging, by="bob")

        prod = call(app, "prod")
        prod_request = asked_id(prod)
        with pytest.raises(tether.NotAllowedToApprove):
            app.approve(prod_request, by="bob")
        app.approve(prod_request, by="alice")
        prod_again = call(app, "prod")
        staging_again = call(app, "staging")  # bob's grant, still unspent

    assert prod.status is OutcomeStatus.REFUSED
    assert prod_request != staging
    assert "prod-needs-finance" in asked(prod).message
    assert prod_again.status is OutcomeStatus.EXECUTED
    assert staging_again.status is OutcomeStatus.EXECUTED
    assert len(paid) == 2
