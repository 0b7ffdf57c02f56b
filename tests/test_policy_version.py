"""The policy version a decision records names the Python policies too, not only `tether.yaml`.

Before, a step decided by a policy added with `Tether.add_policy` (the demo's
own rules are one) recorded the file's version, or `none` without a file: the
record did not say which policies decided, a grant given under one set of
policies stayed valid under another, and replay could not tell them apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import tether
from tether.policy import PolicySet, RuleSet, combined_version, file_part
from tether.policy.rules import Rule
from tether.record import OutcomeStatus
from tether.replay import RecordedRun, Replayer
from tether.store import ApprovalStatus

POLICY = """\
rules:
  - id: big
    match: {capability: pay.refund}
    when: "args.cents > 100"
    decision: require_approval
    reason: big refund
approvers:
  alice: [admin]
"""


class RefundIn(BaseModel):
    cents: int


class RefundOut(BaseModel):
    refunded: int


@tether.capability("pay.refund", effect="write", idempotency="keyed")
def refund(args: RefundIn) -> RefundOut:
    return RefundOut(refunded=args.cents)


class Guard:
    """A Python policy that abstains, at a version its author bumps when it changes."""

    id = "guard"

    def __init__(self, version: str | None = "1") -> None:
        if version is not None:
            self.version = version

    def evaluate(self, request: tether.DecisionRequest) -> tether.Decision | None:
        return None


def rule_set(reason: str) -> RuleSet:
    return RuleSet(
        [Rule.model_validate({"id": "r", "decision": "deny", "reason": reason})],
        id="extra",
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tether.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tether.db'}"


def open_app(db: str, config: Path, *policies: Any) -> tether.Tether:
    app = tether.Tether(db=db, config=config, env={})
    app.register(refund)
    for policy in policies:
        app.add_policy(policy)
    return app


@pytest.fixture
def apps() -> Iterator[list[tether.Tether]]:
    """Apps a test opens; closed at teardown."""
    opened: list[tether.Tether] = []
    yield opened
    for app in opened:
        app.close()


def asked_id(outcome: tether.Outcome) -> str:
    """Return the id of the approval request the step was refused for."""
    assert isinstance(outcome.error, tether.ApprovalRequired), outcome
    assert outcome.error.approval_id is not None
    return outcome.error.approval_id


def decided(app: tether.Tether, run_id: str) -> list[dict[str, Any]]:
    return [e.data() for e in app.store.events(run_id) if e.data()["kind"] == "decided"]


def test_the_version_is_the_files_alone_without_python_policies_and_changes_with_them() -> (
    None
):
    """No policy: the file's version as before; each policy's id, order, content or stated version makes another."""
    base = PolicySet(version="sha256:00112233aabbccdd")
    with_guard = base.add(Guard("1"))

    assert base.version == base.file_version == "sha256:00112233aabbccdd"
    assert PolicySet().version == "none"
    assert with_guard.version.startswith("sha256:00112233aabbccdd+policies:")
    assert file_part(with_guard.version) == base.version
    assert PolicySet().add(Guard()).version.startswith("none+policies:")
    assert with_guard.file_version == base.version
    # the same set, built twice: the same version (a record replays under it)
    assert base.add(Guard("1")).version == with_guard.version
    assert with_guard.version == combined_version(base.version, [Guard("1")])
    # what changes it
    assert base.add(Guard("2")).version != with_guard.version
    assert with_guard.add(rule_set("a")).version != with_guard.version
    assert (
        base.add(rule_set("a")).add(Guard()).version
        != base.add(Guard()).add(rule_set("a")).version
    )
    assert base.add(rule_set("a")).version != base.add(rule_set("b")).version
    assert base.add(rule_set("a")).version == base.add(rule_set("a")).version
    # a reload of the file keeps the policies and counts them
    reloaded = with_guard.replace(version="sha256:ffffffffffffffff")
    assert reloaded.file_version == "sha256:ffffffffffffffff"
    assert reloaded.version == combined_version(reloaded.file_version, [Guard("1")])
    # a policy that states no version counts by its id only (documented)
    assert base.add(Guard(None)).version == base.add(Guard(None)).version
    assert base.add(Guard(None)).version != base.add(Guard("1")).version


def test_every_decision_records_the_version_with_the_python_policies(
    db: str, config: Path, apps: list[tether.Tether]
) -> None:
    """A rule's decision and a default decision both record the combined version, not the file's."""
    app = open_app(db, config, Guard())
    apps.append(app)
    principal = tether.Principal("bot", tenant="acme")
    with app.run(principal=principal, request="refunds") as run:
        small = run.step("pay.refund", {"cents": 5})  # no rule: the default allows
        big = run.step("pay.refund", {"cents": 500})  # the rule asks a person

    versions = [(e["verdict"], e["policy_version"]) for e in decided(app, run.id)]
    assert small.status is OutcomeStatus.EXECUTED
    assert isinstance(big.error, tether.ApprovalRequired)
    assert versions == [
        ("allow", app.policy.version),
        ("require_approval", app.policy.version),
    ]
    assert app.policy.version not in (app.policy.file_version, "none")


def test_a_grant_given_under_one_policy_version_is_not_used_under_another(
    db: str, config: Path, apps: list[tether.Tether]
) -> None:
    """Approved under Guard 1; a process running Guard 2 asks again; one back on Guard 1 uses the grant."""
    principal = tether.Principal("bot", tenant="acme")
    first = open_app(db, config, Guard("1"))
    apps.append(first)
    with first.run(principal=principal, request="refund") as run:
        granted = asked_id(run.step("pay.refund", {"cents": 500}))
    first.approve(granted, by="alice")

    changed = open_app(db, config, Guard("2"))  # a deploy changed the policy's code
    apps.append(changed)
    with changed.run(principal=principal, request="refund again") as run:
        again = asked_id(run.step("pay.refund", {"cents": 500}))
    same = open_app(db, config, Guard("1"))
    apps.append(same)
    with same.run(principal=principal, request="refund once more") as run:
        used = run.step("pay.refund", {"cents": 500})

    assert again != granted
    assert used.status is OutcomeStatus.EXECUTED, used.error
    assert first.approval(granted).status is ApprovalStatus.USED
    assert first.approval(again).status is ApprovalStatus.PENDING


def test_replay_under_a_changed_python_policy_notes_the_new_version(
    db: str, config: Path, apps: list[tether.Tether]
) -> None:
    """A run recorded under Guard 1 replays under Guard 2 with the same verdicts, noting both versions."""
    principal = tether.Principal("bot", tenant="acme")
    recorder = open_app(db, config, Guard("1"))
    apps.append(recorder)
    with recorder.run(principal=principal, request="refunds") as run:
        run.step("pay.refund", {"cents": 5})
    recorded = RecordedRun.from_store(recorder.store, run.id)
    changed = open_app("memory://", config, Guard("2"))
    apps.append(changed)

    same = Replayer(recorder).replay(recorded)
    other = Replayer(changed).replay(recorded)

    assert (same.ok, same.notes) == (True, [])
    assert other.ok, other.divergences
    assert other.notes == [
        f"recorded under policy version {recorder.policy.version}, replayed under "
        f"{changed.policy.version}"
    ]


def test_a_cedar_policy_states_a_version_that_follows_its_text() -> None:
    """The same Cedar text: one version; an edit or another `no_permit`: another."""
    from tether.policy.cedar import CedarPolicy

    text = '@id("no-drops") forbid(principal, action == Action::"db.drop", resource);'
    edited = text.replace("db.drop", "db.truncate")

    assert CedarPolicy(text).version == CedarPolicy(text).version
    assert CedarPolicy(text).version != CedarPolicy(edited).version
    assert CedarPolicy(text).version != CedarPolicy(text, no_permit="deny").version
