"""H.55 record completeness: 10 000+ recorded events checked against the published schema.

The events come from every shipped scenario, run the way `tether demo` runs it
(a SQLite file store, `Scenario.setup` then `Scenario.run`): on a fresh app per
run, many times on one app (the world drifts: a second rollback finds nothing
to roll back) and under a `tether.yaml` with rules, limits, breakers and
approvers. To them are added the busy record of test_record.py and runs made
here for the event kinds no scenario makes: approvals granted and denied,
limits reserved, refused and settled, model usage, retries, a breaker that
opens and stashes a plan, an expired key, an abort and a step in doubt that a
person resolves.

Every event is checked against `record-event.schema.json` with `jsonschema`
(draft 2020-12, date-times held to UTC), the branch its kind names.
Every run's chain verifies and its export is one JSON event per line. Every
kind the schema knows must appear, so a new kind needs a test that makes it.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from pydantic import BaseModel

import tether
from test_record import ALL, BigRefunds, _varied_steps
from tether import schemas
from tether.agent import PlannerInput, Proposal, ProposedStep, Usage
from tether.scenarios import SCENARIOS, Scenario
from tether.testing import FakeClock

SCHEMA: dict[str, Any] = json.loads(
    (schemas.FOLDER / "record-event.schema.json").read_text(encoding="utf-8")
)
KNOWN_KINDS = frozenset(SCHEMA["discriminator"]["mapping"])

NEVER_MADE: frozenset[str] = frozenset()
"""Kinds the schema knows that no record here makes. Keep it empty: a new event
kind comes with a run below (or a scenario) that makes it."""

MIN_EVENTS = 10_000

# -- the schema, checked by jsonschema ----------------------------------------------------

_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("date-time")
def _is_utc_date_time(value: object) -> bool:
    """RFC 3339 date-time, always UTC (`Z`) in tether's record."""
    if not isinstance(value, str) or "T" not in value or not value.endswith("Z"):
        return False
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return False
    return at.utcoffset() == timedelta(0)


def _resolve(ref: str) -> dict[str, Any]:
    found: dict[str, Any] = SCHEMA["$defs"][ref.removeprefix("#/$defs/")]
    return found


@functools.cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    """The validator of one kind's branch (the discriminator's mapping names it).

    `discriminator` is an OpenAPI keyword JSON Schema ignores: checking the
    branch the kind names, not all of `oneOf`, is what it means (and 26 times
    cheaper); `test_the_schema_maps_each_kind_to_one_event` checks the mapping.
    """
    target = SCHEMA["discriminator"]["mapping"][kind]
    return jsonschema.Draft202012Validator(
        {"$defs": SCHEMA["$defs"], "$ref": target}, format_checker=_FORMATS
    )


def problems(event: Any) -> list[str]:
    """Return where `event` breaks the published schema (empty: it conforms)."""
    kind = event.get("kind") if isinstance(event, dict) else None
    if kind not in KNOWN_KINDS:
        return [f"$: kind {kind!r} is not in the schema"]
    return [
        f"${''.join(f'[{p!r}]' for p in error.absolute_path)}: {error.message:.200}"
        for error in _validator(str(kind)).iter_errors(event)
    ]


def undocumented(event: dict[str, Any]) -> list[str]:
    """Fields of `event` its kind's schema does not name (the schema allows extras)."""
    target = SCHEMA["discriminator"]["mapping"].get(event.get("kind"))
    if target is None:
        return []
    named = _resolve(target)["properties"]
    return [f"{event['kind']}.{name}" for name in event if name not in named]


# -- the records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One run's record as stored and as exported, and whether its chain verified."""

    source: str
    run_id: str
    stored: list[tuple[int, bytes, bytes]]
    """(seq, body, hash) per event, in order."""
    export: list[bytes]
    verified: bool
    verify_error: str | None
    policy_version: str
    """The app's policy version: `sha256:...` of its tether.yaml and Python
    policies, or `none` with neither."""
    has_config: bool
    has_policies: bool


def _collect(app: tether.Tether, source: str, run_id: str) -> Recorded:
    report = app.verify(run_id)
    return Recorded(
        source=source,
        run_id=run_id,
        policy_version=app.policy.version,
        has_config=app.config_path is not None,
        has_policies=bool(app.policy.policies),
        stored=[(e.seq, e.body, e.hash) for e in app.store.events(run_id)],
        export=[chunk.removesuffix(b"\n") for chunk in app.export(run_id)],
        verified=report.ok,
        verify_error=None if report.ok else repr(report),
    )


def _sqlite(folder: Path, name: str) -> str:
    return f"sqlite:///{folder / name}?synchronous=normal"


SCENARIO_CONFIG = """\
approvers: {dana: [sre]}
approvals: {ttl: 30d}
rules:
  - id: wide-log-searches
    match: {capability: logs.search}
    when: "args.limit > 50"
    decision: deny
    reason: searches that wide load the log cluster
limits:
  - {id: k8s-changes, kind: quota, per: hour, max: 5, resource: k8s}
  - {id: reads, kind: quota, per: hour, max: 40, effect: read}
breakers:
  - {id: k8s-api, resource: k8s, window: 4, failure_rate: 0.5, open_for: 30s}
"""
"""A rule, a quota and a breaker on k8s (the demo's restarts and rollbacks), a read
quota and a person who approves the restart the scenario's own rule holds."""


def scenario_records(folder: Path, scenario: Scenario) -> list[Recorded]:
    """Run `scenario` as `tether demo` does, in three ways; return every record."""
    out: list[Recorded] = []
    name = scenario.name
    db = _sqlite(folder, f"{name}-demo.db")
    # `tether demo --db FILE`, again and again: a fresh world each time
    for _ in range(50):
        with tether.Tether(db=db, env={}) as app:
            scenario.setup(app)
            run = scenario.run(app)
            out.append(_collect(app, f"{name}: demo", run.id))
    with tether.Tether(db=_sqlite(folder, f"{name}-drift.db"), env={}) as app:
        scenario.setup(app)  # one world for every run: it drifts
        for _ in range(40):
            run = scenario.run(app)
            out.append(_collect(app, f"{name}: one world", run.id))
    config = folder / f"{name}.tether.yaml"
    config.write_text(SCENARIO_CONFIG)
    clock = FakeClock()
    with tether.Tether(
        db=_sqlite(folder, f"{name}-config.db"), config=config, clock=clock, env={}
    ) as app:
        scenario.setup(app)
        run_ids = []
        for n in range(30):
            run_ids.append(scenario.run(app).id)
            for pending in app.approvals(status="pending"):
                if n % 3 == 2:
                    app.deny(pending.id, by="dana", reason="not today")
                else:
                    app.approve(pending.id, by="dana", note="go ahead")
            clock.advance(timedelta(minutes=7 + n % 5))
        # collected last: a decision is recorded in the run that asked
        out += [_collect(app, f"{name}: tether.yaml", r) for r in run_ids]
    return out


def busy_records(folder: Path) -> list[Recorded]:
    """The busy record of test_record.py: 300 varied steps over six runs."""
    config = folder / "busy.tether.yaml"
    config.write_text("version: 1\n")
    clock = FakeClock(tick=timedelta(milliseconds=3))
    agent = tether.Principal("support-bot", tenant="acme", on_behalf_of="alice")
    ops = tether.Principal("ops-bot", roles=["agent"], tenant="acme")
    out: list[Recorded] = []
    with tether.Tether(
        db=_sqlite(folder, "busy.db"), config=config, clock=clock, env={}
    ) as app:
        app.register(*ALL)
        app.add_policy(BigRefunds())
        for r in range(6):
            with app.run(principal=agent if r % 2 else ops, request=f"b {r}") as run:
                for i in range(r * 5, r * 5 + 5):
                    list(_varied_steps(run, i))
            out.append(_collect(app, "test_record busy record", run.id))
    return out


# -- runs for the kinds no scenario makes --------------------------------------------------


class Transfer(BaseModel):
    """Move money to an account."""

    to: str
    cents: int


class Receipt(BaseModel):
    """What the bank did."""

    to: str
    cents: int


@dataclass
class Bank:
    """The fake upstreams: a bank that may hang up, a flaky push service."""

    hang_up: bool = False
    broken: bool = False


BANK = Bank()

RARE_CONFIG = """\
defaults: {write: allow}
approvers: {dana: [sre], erin: {roles: [sre], tenants: [acme]}}
idempotency: {retention: 90m}
retry_budget: {per_run: 4, max_attempts: 3, ratio: 1, min_retries: 10, backoff: 10ms}
rules:
  - id: big-transfers-need-a-person
    match: {capability: bank.transfer}
    when: "args.cents > 10000"
    decision: require_approval
    reason: transfers over 100.00 need a second pair of eyes
limits:
  - {id: tenant-spend, kind: budget, scope: tenant, per: day, amount: 600}
  - {id: pushes, kind: quota, per: hour, max: 40, resource: up}
breakers:
  - {id: up-br, resource: up, window: 2, min_calls: 2, failure_rate: 0.5,
     open_for: 30s, on_open: stash}
"""


@tether.capability(
    "bank.transfer",
    effect="write",
    idempotency="keyed",
    cost=lambda a: Decimal(a.cents) / 100,
)
def transfer(args: Transfer) -> Receipt:
    """Transfer money (a keyed write, charged to the budget)."""
    return Receipt(to=args.to, cents=args.cents)


@tether.capability("bank.wire", effect="write", idempotency="none", cost=5)
def wire(args: Transfer) -> Receipt:
    """Wire money; the bank may hang up after acting (then the step is in doubt)."""
    if BANK.hang_up:
        raise ConnectionResetError("the bank hung up after the wire was sent")
    return Receipt(to=args.to, cents=args.cents)


@tether.capability("bank.refuse", effect="write", idempotency="keyed", cost=3)
def refuse(args: Transfer) -> Receipt:
    """A charged write whose upstream says no (its budget reservation is settled)."""
    raise ValueError(f"account {args.to} is closed")


@tether.capability("up.push", effect="write", idempotency="keyed", resource="up")
def push(args: Transfer) -> Receipt:
    """Push to a flaky upstream behind a breaker."""
    if BANK.broken:
        raise ConnectionError("upstream answered 503")
    return Receipt(to=args.to, cents=args.cents)


RARE = (transfer, wire, refuse, push)
TELLER = tether.Principal("teller-bot", roles=["agent"], tenant="acme")


class _Thinker:
    """Each turn costs model usage; proposes one transfer, then finishes."""

    def propose(self, state: PlannerInput) -> Proposal:
        usage = Usage(cost=Decimal(2), input_tokens=300, output_tokens=40, model="m")
        if not state.observations:
            step = ProposedStep(
                capability="bank.transfer", args={"to": "a", "cents": 1}
            )
            return Proposal(steps=(step,), usage=usage)
        return Proposal(finish=True, answer="sent", usage=usage)


def rare_records(folder: Path) -> list[Recorded]:
    """Runs that make every kind the scenarios do not."""
    config = folder / "rare.tether.yaml"
    config.write_text(RARE_CONFIG)
    clock = FakeClock()
    out: list[Recorded] = []
    BANK.hang_up = BANK.broken = False
    with tether.Tether(
        db=_sqlite(folder, "rare.db"), config=config, clock=clock, env={}
    ) as app:
        app.register(*RARE)
        app.register_planner("thinker", _Thinker())
        pushes = tether.ScriptedPlanner(
            [("up.push", {"to": f"p-{n}", "cents": n}) for n in range(4)]
        )
        app.register_planner("pushes", pushes)

        # approvals: one granted and used, one denied
        with app.run(principal=TELLER, request="big transfers") as run:
            big = {"to": "acct-1", "cents": 20_000}
            held = run.step("bank.transfer", big, idempotency_key="t-big-1")
            assert isinstance(held.error, tether.ApprovalRequired), held
            assert held.error.approval_id is not None
            app.approve(held.error.approval_id, by="dana", note="checked")
            done = run.step("bank.transfer", big, idempotency_key="t-big-1")
            assert done.status == "executed", done
            other = {"to": "acct-2", "cents": 30_000}
            held = run.step("bank.transfer", other)
            assert isinstance(held.error, tether.ApprovalRequired), held
            assert held.error.approval_id is not None
            app.deny(held.error.approval_id, by="erin", reason="unknown payee")
            refused = run.step("bank.transfer", other)
            assert refused.status == "refused", refused
        out.append(_collect(app, "approvals", run.id))

        # limits: reserved, settled after a failure, refused once the budget is spent;
        # model usage charged to the same budget
        with app.run(principal=TELLER, request="spend") as run:
            run.charge_usage(
                Decimal("1.5"), input_tokens=90, output_tokens=9, model="m"
            )
            assert run.step("bank.refuse", {"to": "closed", "cents": 1}).status == (
                "failed"
            )
            for n in range(6):
                run.step("bank.transfer", {"to": f"s-{n}", "cents": 9_000})
            over = run.step("bank.transfer", {"to": "s-x", "cents": 9_000})
            assert isinstance(over.error, tether.LimitExceeded), over
        out.append(_collect(app, "limits", run.id))
        clock.advance(timedelta(days=1))
        thought = app.start("think", planner="thinker", principal=TELLER)
        out.append(_collect(app, "usage", thought.id))

        # an expired key: the same key after its retention executes anew
        with app.run(principal=TELLER, request="first") as run:
            run.call("bank.transfer", {"to": "k", "cents": 5}, idempotency_key="k-1")
        out.append(_collect(app, "key", run.id))
        clock.advance(timedelta(hours=2))
        with app.run(principal=TELLER, request="again") as run:
            run.call("bank.transfer", {"to": "k", "cents": 5}, idempotency_key="k-1")
        out.append(_collect(app, "key expired", run.id))

        # a wire in doubt, resolved by a person
        BANK.hang_up = True
        with app.run(principal=TELLER, request="wire") as run:
            doubt = run.step("bank.wire", {"to": "w", "cents": 70})
        BANK.hang_up = False
        assert doubt.status == "in_doubt", doubt
        app.resolve_in_doubt(
            run.id, 1, acted=False, by="dana", reason="no wire at the bank"
        )
        out.append(_collect(app, "in doubt resolved", run.id))

        # retries, then a breaker that opens and stashes the plan; one run resumes,
        # the other is aborted
        BANK.broken = True
        first = app.start("push", planner="pushes", principal=TELLER)
        second = app.start("push again", planner="pushes", principal=TELLER)
        clock.advance(timedelta(seconds=31))
        BANK.broken = False
        resumed = app.resume(first.id)
        app.abort(second.id, by="dana", reason="pushes are on hold")
        out.append(_collect(app, "breaker, resumed", resumed.id))
        out.append(_collect(app, "breaker, aborted", second.id))
    return out


@dataclass(frozen=True)
class Corpus:
    records: list[Recorded]

    def events(self) -> Iterator[tuple[Recorded, dict[str, Any]]]:
        """Every event as exported (without its seq), with its record."""
        for rec in self.records:
            for line in rec.export[1:]:
                yield rec, orjson.loads(line)["event"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Every record: all shipped scenarios, the busy record and the rare kinds."""
    folder = tmp_path_factory.mktemp("completeness")
    records: list[Recorded] = []
    for scenario in SCENARIOS.values():
        records += scenario_records(folder, scenario)
    records += busy_records(folder)
    records += rare_records(folder)
    return Corpus(records)


# -- the checks -----------------------------------------------------------------------------


def test_the_schema_maps_each_kind_to_one_event() -> None:
    """The discriminator names each branch of oneOf once, and each branch's kind is its key."""
    mapping: dict[str, str] = SCHEMA["discriminator"]["mapping"]
    refs = [option["$ref"] for option in SCHEMA["oneOf"]]
    assert sorted(refs) == sorted(mapping.values())
    for kind, ref in mapping.items():
        event = _resolve(ref)
        assert event["properties"]["kind"]["const"] == kind, ref
        assert "at" in event["required"], ref  # every event says when, in UTC
        assert event["properties"]["at"]["format"] == "date-time", ref


def test_the_check_finds_what_breaks_the_schema() -> None:
    """The check is no rubber stamp: each kind of break is reported."""
    good = {
        "kind": "decided",
        "at": "2026-01-01T14:00:00.000000Z",
        "step": 1,
        "principal": "ops-bot",
        "on_behalf_of": None,
        "rule_ids": ["r"],
        "reasons": [],
        "policy_version": "sha256:00",
        "verdict": "allow",
    }
    assert problems(good) == []
    bad = {
        "missing": {k: v for k, v in good.items() if k != "principal"},
        "type": {**good, "step": "1"},
        "bool": {**good, "step": True},
        "anyOf": {**good, "on_behalf_of": 3},
        "items": {**good, "rule_ids": ["r", 2]},
        "naive": {**good, "at": "2026-01-01T14:00:00"},
        "offset": {**good, "at": "2026-01-01T15:00:00+01:00"},
        "kind": {**good, "kind": "decided_maybe"},
        "no kind": {k: v for k, v in good.items() if k != "kind"},
    }
    for name, event in bad.items():
        assert problems(event), name
    assert undocumented({**good, "surprise": 1}) == ["decided.surprise"]


def test_ten_thousand_events_match_the_published_schema(corpus: Corpus) -> None:
    """H.55: every event of every record conforms to record-event.schema.json and
    names no field the schema leaves out."""
    count = 0
    bad: list[str] = []
    for rec, event in corpus.events():
        count += 1
        found = problems(event) + undocumented(event)
        bad += [f"{rec.source} {rec.run_id}: {p}" for p in found]

    assert bad == []
    assert count >= MIN_EVENTS
    assert {rec.source.split(":")[0] for rec in corpus.records} >= set(SCENARIOS)


def test_every_kind_the_schema_knows_is_made(corpus: Corpus) -> None:
    """Each kind appears: a kind added without a run that makes it fails here."""
    seen = Counter(event["kind"] for _, event in corpus.events())

    never = sorted(KNOWN_KINDS - set(seen))
    assert set(seen) <= KNOWN_KINDS
    assert never == sorted(NEVER_MADE), f"no record here makes: {never}"
    made_by_scenarios = {
        event["kind"]
        for rec, event in corpus.events()
        if rec.source.split(":")[0] in SCENARIOS
    }
    assert {"run_started", "decided", "executed", "run_finished"} <= made_by_scenarios


def test_every_chain_verifies(corpus: Corpus) -> None:
    """Each run's hash chain and signed head verify."""
    failed = [
        (r.source, r.run_id, r.verify_error) for r in corpus.records if not r.verified
    ]

    assert failed == []


def test_every_export_is_one_json_event_per_line(corpus: Corpus) -> None:
    """The export is a header, then one line per stored event: its seq, hash and body."""
    for rec in corpus.records:
        lines = [orjson.loads(line) for line in rec.export]
        assert all(b"\n" not in line and b"\r" not in line for line in rec.export)
        assert len(lines) == 1 + len(rec.stored), rec.run_id
        for parsed, (seq, body, digest) in zip(lines[1:], rec.stored, strict=True):
            assert parsed["seq"] == seq, rec.run_id
            assert parsed["hash"] == digest.hex(), rec.run_id
            assert parsed["event"] == orjson.loads(body), rec.run_id
        assert [p["seq"] for p in lines[1:]] == list(range(1, len(lines))), rec.run_id


def test_decisions_and_executions_carry_what_an_auditor_needs(corpus: Corpus) -> None:
    """H.55: each decision names principal, on-behalf-of, rule ids, policy version
    hash and capability version; each execution its duration, cost and output."""
    missing: list[str] = []
    for rec in corpus.records:
        validated: dict[int, dict[str, Any]] = {}
        for line in rec.export[1:]:
            event = orjson.loads(line)["event"]
            step = event.get("step")
            where = f"{rec.source} {rec.run_id} {event['kind']} step {step}"
            if event["kind"] == "validated":
                validated[step] = event
            elif event["kind"] == "decided":
                for name in ("principal", "on_behalf_of", "rule_ids", "verdict"):
                    if name not in event:
                        missing.append(f"{where}: no {name}")
                if event.get("policy_version") != rec.policy_version:
                    missing.append(f"{where}: not the app's policy version")
                v = validated.get(step)
                if v is None or not v.get("capability") or not v.get("version"):
                    missing.append(f"{where}: no capability version before it")
            elif event["kind"] == "executed":
                if not isinstance(event.get("duration_us"), int):
                    missing.append(f"{where}: no duration")
                if Decimal(event.get("cost", "-1")) < 0:
                    missing.append(f"{where}: no cost")
                if not isinstance(event.get("output"), dict):
                    missing.append(f"{where}: no output")

    assert missing == []
    # The file's hash, or `none` (documented) without one; then the Python
    # policies' hash when there are some.
    for rec in corpus.records:
        file, _, policies = rec.policy_version.partition("+policies:")
        assert file.startswith("sha256:") if rec.has_config else file == "none"
        assert bool(policies) == rec.has_policies, rec.source
