"""Replay and determinism, RELIABILITY section E (items 33-36).

- E.33: a corpus of recorded runs replays against an app whose handlers,
  dry-run handlers and preconditions fail the test if called, with the network
  refused: every run matches and nothing upstream is asked.
- E.34: one mutation at a time (a rule threshold, an input schema, a limit
  amount, a breaker threshold) and the replay diverges, first at the step
  and stage the mutation touches.
- E.35: the same export replays to byte-identical reports under another time
  zone, locale and hash seed, and with the wall clock ten years on.
- E.36: the golden records in tests/golden/ verify and replay; an older
  format marker replays or is refused naming the format.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

import tether
from tether import _canonical, _chain
from tether.cli import main
from tether.clock import SystemClock
from tether.policy import RulesConfig, RuleSet
from tether.replay import RecordedRun, Replayer, ReplayReport
from tether.scenarios import SCENARIOS, cloud_ops
from tether.testing import FakeClock

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")
"""The installed command, for the replays that need a process of their own."""

GOLDEN = Path(__file__).parent / "golden"

GOLDEN_FILES = {
    "cloud-ops-demo.tether.jsonl": "run_01a22fc92d83e5664dea15f21e60e892",
    "cloud-ops-demo-policy.tether.jsonl": "run_01a22fc93b517a7f040a6a78d4eb5909",
}
"""Each golden record and the run it holds (see tests/golden/README.md)."""

SCENARIO = SCENARIOS["cloud-ops"]

POLICY = """\
defaults: {destructive: allow}
approvers: {dana: [sre]}
approvals: {ttl: 30d}
rules:
  - id: wide-log-searches
    match: {capability: logs.search}
    when: "args.limit > LIMIT"
    decision: deny
    reason: searches that wide load the log cluster
limits:
  - {id: k8s-changes, kind: quota, per: hour, max: MAX, resource: k8s}
  - {id: reads, kind: quota, per: hour, max: 6, effect: read}
breakers:
  - {id: k8s-api, resource: k8s, window: 4, failure_rate: 0.5, open_for: 30s}
"""
"""A rule, a quota and a breaker on k8s (the demo's restarts and rollbacks), and a
read quota; destructive steps are allowed, so the demo's rollback runs."""


def policy(*, limit: int = 50, k8s: int = 5) -> str:
    """Return `POLICY` with the rule's threshold and the k8s quota's max."""
    return POLICY.replace("LIMIT", str(limit)).replace("MAX", str(k8s))


def write(path: Path, text: str) -> Path:
    """Write `text` to `path` and return the path."""
    path.write_text(text)
    return path


def scenario_rules() -> RuleSet:
    """The cloud-ops scenario's own rules, as `build_app` installs them."""
    rules = RulesConfig.model_validate(yaml.safe_load(cloud_ops.POLICY)).rules
    return RuleSet(rules, id=cloud_ops.NAME)


def demo(config: Path | None) -> tuple[tether.Tether, RecordedRun]:
    """Run the cloud-ops demo on a fresh `memory://` app; return it and the record."""
    app = tether.Tether(db="memory://", config=config, env={})
    SCENARIO.setup(app)
    run = SCENARIO.run(app)
    assert run.status is tether.RunState.SUCCEEDED
    return app, RecordedRun.from_store(app.store, run.id)


def first_divergence(report: ReplayReport) -> tuple[int | None, str, str | None]:
    """The first divergence as (step, stage, field)."""
    assert not report.ok, report.to_json()
    first = report.divergences[0]
    return first.step, first.kind, first.field


# -- a flaky upstream -----------------------------------------------------------------------


class Push(BaseModel):
    """One numbered call to the flaky upstream."""

    n: int


@dataclass
class Flaky:
    """An upstream on resource `up` that fails push `n` its first `failures[n]` times."""

    failures: dict[int, int] = field(default_factory=dict)

    def capabilities(self) -> list[tether.Capability[Push, Push]]:
        """Return `up.push` (a keyed write), `up.note` (an unkeyed write) and `up.peek` (a read)."""

        @tether.capability(
            "up.push", effect="write", idempotency="keyed", resource="up"
        )
        def push(args: Push) -> Push:
            if self.failures.get(args.n, 0) > 0:
                self.failures[args.n] -= 1
                raise ConnectionError("upstream answered 503")
            return args

        @tether.capability("up.note", effect="write", resource="up")
        def note(args: Push) -> Push:
            raise ConnectionError("connection reset after the request was sent")

        @tether.capability("up.peek", effect="read", resource="up")
        def peek(args: Push) -> Push:
            return args

        return [push, note, peek]


# -- E.33 zero upstream calls --------------------------------------------------------------


@dataclass
class Upstream:
    """Every call the replay app's capabilities received, as `name: what`."""

    calls: list[str]

    def counterfeit(
        self, cap: tether.Capability[Any, Any]
    ) -> tether.Capability[Any, Any]:
        """Return `cap` declared again (name, version, models, effect...) over failing code."""
        models = {"args": cap.input_model, "return": cap.output_model}

        def handler(args: BaseModel) -> BaseModel:
            self.calls.append(f"{cap.name}: handler")
            raise AssertionError(f"replay called {cap.name}'s handler")

        def preview(args: BaseModel) -> BaseModel:
            self.calls.append(f"{cap.name}: dry-run handler")
            raise AssertionError(f"replay called {cap.name}'s dry-run handler")

        handler.__annotations__ = preview.__annotations__ = models
        return tether.capability(
            cap.name,
            version=cap.version,
            effect=cap.effect,
            idempotency=cap.idempotency,
            dry_run=None if cap.dry_run_handler is None else preview,
            preconditions=[self.check(cap.name, p.__name__) for p in cap.preconditions],
            cost=cap.cost,
            scopes=cap.scopes,
            timeout=cap.timeout,
            resource=cap.resource,
            description=cap.description,
        )(handler)

    def check(self, capability: str, name: str) -> Any:
        """Return a precondition named `name` that records being asked."""

        def check(args: BaseModel) -> bool:
            self.calls.append(f"{capability}: precondition {name}")
            raise AssertionError(f"replay asked {capability}'s precondition {name}")

        check.__name__ = name
        return check


@pytest.fixture
def upstream() -> Upstream:
    """Where the counterfeit capabilities note any call."""
    return Upstream(calls=[])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Refuse every socket connection; return the addresses anything tried."""
    tried: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        tried.append(address)
        raise ConnectionRefusedError(f"no network in this test: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tried


SEED = 20261201
"""The corpus's random plans come from this seed, so a failure reproduces."""


Plan = list[tuple[str, dict[str, Any], str | None, bool]]


def random_plan(rng: random.Random, run: int) -> Plan:
    """Return 3-12 random steps over the cloud-ops capabilities (some args invalid).

    A write's reason names its run: a person's grant is then used in the run it
    was made for (see `test_a_grant_made_in_another_run_replays_as_used`).
    """
    plan: Plan = []
    for _ in range(rng.randint(3, 12)):
        service = rng.choice(["checkout", "payments", "search", "billing"])
        choices: list[tuple[str, dict[str, Any]]] = [
            ("metrics.query", {"service": service, "window_minutes": rng.randint(1, 90)}),
            ("logs.search", {"service": service, "query": "pool", "limit": rng.randint(1, 99)}),
            ("service.restart", {"service": service, "reason": f"run {run}: try"}),
            ("deploy.rollback", {"service": service, "reason": f"run {run}: bad deploy"}),
            ("ticket.comment", {"ticket_id": cloud_ops.TICKET, "body": f"run {run}"}),
        ]  # fmt: skip
        capability, args = rng.choice(choices)
        if rng.random() < 0.15:
            args = {**args, "unexpected": True}  # refused by the input model
        key = None
        if rng.random() < 0.3:  # one key per capability and args: never a conflict
            digest = hashlib.sha256(_canonical.dumps(args)).hexdigest()[:16]
            key = f"{capability}-{digest}"
        dry_run = (
            capability in ("metrics.query", "deploy.rollback") and rng.random() < 0.3
        )
        plan.append((capability, args, key, dry_run))
        if key is not None and rng.random() < 0.5:
            plan.append((capability, args, key, dry_run))  # the same call, retried
    return plan


def record_corpus(config: Path) -> tuple[tether.Tether, list[RecordedRun]]:
    """Record 4 demo runs and 18 random runs under `config`, on one app.

    The demo runs share a pending request (each asks to restart payments);
    the random runs share keys (reads with the same args) and quotas, and a
    person approves some held steps, which are then taken again.
    """
    clock = FakeClock()
    app = tether.Tether(db="memory://", config=config, clock=clock, env={})
    SCENARIO.setup(app)
    runs = []
    for _ in range(4):
        run = SCENARIO.run(app)
        runs.append(run.id)
        clock.advance(timedelta(minutes=20))
    rng = random.Random(SEED)
    for n in range(18):
        with app.run(
            principal=cloud_ops.PRINCIPAL,
            request=f"plan {n}",
            context=cloud_ops.CONTEXT,
        ) as run:
            for capability, args, key, dry_run in random_plan(rng, n):
                clock.advance(timedelta(seconds=rng.choice([1, 30, 600])))
                held = run.step(capability, args, idempotency_key=key, dry_run=dry_run)
                if (
                    isinstance(held.error, tether.ApprovalRequired)
                    and held.error.approval_id is not None
                    and rng.random() < 0.5
                ):
                    app.approve(held.error.approval_id, by="dana")
                    run.step(capability, args, idempotency_key=key, dry_run=dry_run)
        runs.append(run.id)
    return app, [RecordedRun.from_store(app.store, r) for r in runs]


def counterfeit_app(
    source: tether.Tether, config: Path | None, upstream: Upstream
) -> tether.Tether:
    """An app declaring `source`'s capabilities over code that fails if called."""
    app = tether.Tether(db="memory://", config=config, env={})
    for cap in source.capabilities:
        app.register(upstream.counterfeit(cap))
    app.add_policy(scenario_rules())
    return app


def test_a_corpus_replays_the_same_with_no_upstream_call(
    tmp_path: Path, upstream: Upstream, no_network: list[object]
) -> None:
    """22 runs (4 demos, 18 random plans) replay with no divergence and no handler, check or socket called."""
    config = write(tmp_path / "tether.yaml", policy())
    source, corpus = record_corpus(config)
    outcomes = {e["kind"] for r in corpus for e in r.events}
    replay_app = counterfeit_app(source, config, upstream)

    reports = [Replayer(replay_app).replay(r) for r in corpus]

    assert len(corpus) >= 20
    assert {
        "executed",
        "limit_refused",
        "approval_decided",
        "idempotent_hit",
    } <= outcomes
    failing = [r.to_json() for r in reports if not r.ok]
    assert failing == []
    assert sum(r.steps for r in reports) >= 150
    assert upstream.calls == []
    assert no_network == []


RETRIES = (
    "retry_budget: {per_run: 5, max_attempts: 3, ratio: 0.5, min_retries: 3,"
    " backoff: 100ms, backoff_cap: 2s}\n"
)
FLAKY_POLICY = RETRIES + (
    "breakers:\n  - {id: up-api, resource: up, window: 4, failure_rate: 0.5,"
    " open_for: 30s, on_open: read_only}\n"
)


def record_flaky(
    config: Path, steps: list[tuple[str, int, int]]
) -> tuple[tether.Tether, RecordedRun, list[str]]:
    """Record one run of (capability, n, failures) steps on the flaky upstream."""
    clock = FakeClock()
    flaky = Flaky()
    app = tether.Tether(db="memory://", config=config, clock=clock, env={})
    app.register(*flaky.capabilities())
    statuses = []
    with app.run(principal=tether.Principal("push-bot"), request="push") as run:
        for capability, n, failures in steps:
            flaky.failures[n] = failures
            statuses.append(run.step(capability, {"n": n}).status.value)
            clock.advance(timedelta(seconds=11))
    return app, RecordedRun.from_store(app.store, run.id), statuses


def test_retries_and_an_open_breaker_replay_with_no_upstream_call(
    tmp_path: Path, upstream: Upstream, no_network: list[object]
) -> None:
    """Retried, exhausted and breaker-refused calls replay from the record alone."""
    config = write(tmp_path / "tether.yaml", FLAKY_POLICY)
    source, recorded, statuses = record_flaky(
        config,
        [
            ("up.push", 1, 0),
            ("up.push", 2, 1),  # retried once, then done
            ("up.push", 3, 5),  # every attempt fails: the breaker opens
            ("up.peek", 1, 0),  # reads go on while it is open
            ("up.push", 4, 0),  # refused while it is open
            ("up.peek", 2, 0),
            ("up.push", 5, 0),  # a trial call after open_for: it closes
            ("up.push", 6, 0),
            ("up.push", 7, 0),
        ],
    )
    kinds = {e["kind"] for e in recorded.events}
    with source:
        replay_app = tether.Tether(db="memory://", config=config, env={})
        replay_app.register(*[upstream.counterfeit(c) for c in source.capabilities])

        report = Replayer(replay_app).replay(recorded)

    assert statuses == ["executed", "executed", "failed", "executed", "refused",
                        "executed", "executed", "executed", "executed"]  # fmt: skip
    assert {"retry_scheduled", "breaker_transition", "breaker_checked"} <= kinds
    transitions = [
        e["state"] for e in recorded.events if e["kind"] == "breaker_transition"
    ]
    assert transitions == ["open", "half_open", "closed"]
    assert report.ok, report.to_json()
    assert report.steps == 9
    assert upstream.calls == []
    assert no_network == []


def test_a_write_left_in_doubt_replays_the_same(tmp_path: Path) -> None:
    """An unkeyed write whose handler raised after starting is in doubt, and replays so."""
    config = write(tmp_path / "tether.yaml", "")
    app, recorded, statuses = record_flaky(config, [("up.note", 1, 0)])

    with app:
        report = Replayer(app).replay(recorded)

    assert statuses == ["in_doubt"]
    assert report.ok, report.to_json()


def test_a_retry_other_runs_spent_is_reported_not_guessed(
    tmp_path: Path,
) -> None:
    """A retry budget other runs spent is not seeded (docs/replay.md): replay says so.

    With one retry per window, the second run's failure was not retried; the
    scratch store has the window unspent, so the replay retries and reports
    that step as divergent, rather than passing a run it could not re-check.
    """
    config = write(
        tmp_path / "tether.yaml",
        RETRIES.replace("ratio: 0.5, min_retries: 3", "ratio: 0.1, min_retries: 1"),
    )
    flaky = Flaky()
    runs = []
    with tether.Tether(db="memory://", config=config, clock=FakeClock(), env={}) as app:
        app.register(*flaky.capabilities())
        for n in (1, 2):
            flaky.failures[n] = 1
            with app.run(principal=tether.Principal("push-bot"), request=f"{n}") as run:
                runs.append(run.step("up.push", {"n": n}).status.value)
        recorded = RecordedRun.from_store(app.store, run.id)

        report = Replayer(app).replay(recorded)

    assert runs == ["executed", "failed"]  # the first run took the window's retry
    assert not report.ok
    first = report.divergences[0]
    assert (first.step, first.now) == (1, "retry_scheduled"), report.to_json()


def test_a_grant_made_in_another_run_replays_as_used(tmp_path: Path) -> None:
    """A held restart approved after its run ended runs in the next run under the grant, and replays so."""
    config = write(tmp_path / "tether.yaml", "approvers: {dana: [sre]}\n")
    payments = {"service": "payments", "reason": "it shares the db pool"}
    runs = []
    with tether.Tether(db="memory://", config=config, clock=FakeClock(), env={}) as app:
        cloud_ops.build_app(app)
        for request in ("ask", "ask again"):
            with app.run(
                principal=cloud_ops.PRINCIPAL,
                request=request,
                context=cloud_ops.CONTEXT,
            ) as run:
                outcome = run.step("service.restart", payments)
            runs.append(run.id)
            if isinstance(outcome.error, tether.ApprovalRequired):
                app.approve(str(outcome.error.approval_id), by="dana")
        recorded = RecordedRun.from_store(app.store, runs[1])

        report = Replayer(app).replay(recorded)

    assert (
        outcome.status is tether.OutcomeStatus.EXECUTED
    )  # under the first run's grant
    assert report.ok, report.to_json()


def test_dry_run_replay_asks_dry_run_handlers_only(
    tmp_path: Path, upstream: Upstream, no_network: list[object]
) -> None:
    """`--dry-run` mode asks the dry-run handler of each executed step that has one, and nothing else."""
    source, recorded = demo(None)
    replay_app = counterfeit_app(source, None, upstream)

    report = Replayer(replay_app, mode="dry_run").replay(recorded)

    assert report.ok, report.to_json()
    assert [(p.step, p.capability) for p in report.predictions] == [
        (7, "deploy.rollback")
    ]
    assert "replay called deploy.rollback's dry-run handler" in str(
        report.predictions[0].error
    )
    assert upstream.calls == ["deploy.rollback: dry-run handler"]
    assert no_network == []


# -- E.34 replay must fail when it should --------------------------------------------------


class TightLogQuery(BaseModel):
    """`LogQuery` with the query cut to 3 characters: the demo's `pool` no longer fits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service: str
    query: str = Field(min_length=1, max_length=3)
    limit: int = Field(default=20, ge=1, le=200)


def tighter_logs_app(source: tether.Tether, config: Path) -> tether.Tether:
    """`source`'s capabilities, with `logs.search` (same name, same version) on `TightLogQuery`."""
    original = source.capabilities.get("logs.search")

    def search(args: TightLogQuery) -> cloud_ops.LogMatches:
        raise AssertionError("replay called the handler")

    variant = tether.capability(
        "logs.search",
        version=original.version,
        effect=original.effect,
        preconditions=original.preconditions,
        scopes=original.scopes,
        resource=original.resource,
    )(search)
    app = tether.Tether(db="memory://", config=config, env={})
    app.register(variant, *[c for c in source.capabilities if c.name != "logs.search"])
    app.add_policy(scenario_rules())
    return app


@pytest.fixture
def recorded_demo(tmp_path: Path) -> Iterator[tuple[tether.Tether, RecordedRun]]:
    """The demo run under `POLICY` (rule, k8s quota, k8s breaker), and its app."""
    app, recorded = demo(write(tmp_path / "tether.yaml", policy()))
    with app:
        yield app, recorded


def test_the_unchanged_demo_replays_the_same(
    recorded_demo: tuple[tether.Tether, RecordedRun],
) -> None:
    """Under the policy it ran under, the demo run replays with no divergence."""
    app, recorded = recorded_demo

    report = Replayer(app).replay(recorded)

    assert report.ok, report.to_json()
    assert report.steps == 9


def test_a_tighter_rule_threshold_diverges_first_at_the_log_search(
    tmp_path: Path, recorded_demo: tuple[tether.Tether, RecordedRun]
) -> None:
    """`args.limit > 10` refuses step 2's plan, then denies the step, both naming the rule."""
    app, recorded = recorded_demo
    changed = write(tmp_path / "changed.yaml", policy(limit=10))

    report = Replayer.for_file(app, changed, mode="verify").replay(recorded)

    assert first_divergence(report) == (2, "plan_admitted", "status")
    step = next(d for d in report.divergences if d.kind != "plan_admitted")
    assert (step.step, step.kind, step.field, step.recorded, step.now) == (
        2,
        "decided",
        "verdict",
        "allow",
        "deny",
    )
    assert all(d.rule_ids == ("wide-log-searches",) for d in report.divergences)


def test_a_tighter_input_schema_diverges_first_at_the_log_search(
    tmp_path: Path, recorded_demo: tuple[tether.Tether, RecordedRun]
) -> None:
    """`logs.search` redeclared with a 3-character query refuses step 2's recorded args."""
    app, recorded = recorded_demo
    variant = tighter_logs_app(app, tmp_path / "tether.yaml")

    report = Replayer(variant).replay(recorded)

    assert first_divergence(report) == (2, "plan_admitted", "status")
    step = next(d for d in report.divergences if d.kind != "plan_admitted")
    assert (step.step, step.kind, step.field) == (2, "validated", None)
    assert step.now == "failed (stage validate)"
    assert all(d.step == 2 for d in report.divergences)


def test_a_smaller_limit_diverges_first_at_the_call_it_no_longer_admits(
    tmp_path: Path, recorded_demo: tuple[tether.Tether, RecordedRun]
) -> None:
    """With the k8s quota cut to 1, the run's second k8s call is the first divergence."""
    app, recorded = recorded_demo
    k8s_calls = [
        e["step"]
        for e in recorded.events
        if e["kind"] == "limit_reserved"
        and any(x["id"] == "k8s-changes" for x in e["limits"])
    ]
    changed = write(tmp_path / "changed.yaml", policy(k8s=1))

    report = Replayer.for_file(app, changed, mode="verify").replay(recorded)

    assert k8s_calls == [4, 7]  # the checkout restart and the rollback
    assert first_divergence(report) == (7, "limit_reserved", None)
    assert report.divergences[0].now == "limit_refused (limit k8s-changes)"


def breaker(rate: str) -> str:
    """Return a `tether.yaml` with a breaker on `up` opening at failure rate `rate`."""
    return (
        "breakers:\n  - {id: up-api, resource: up, window: 4, "
        f"failure_rate: {rate}, open_for: 30s, on_open: read_only}}\n"
    )


@pytest.mark.parametrize(
    ("recorded_rate", "replayed_rate", "stage"),
    [("0.5", "0.75", "breaker_checked"), ("0.75", "0.5", "intent")],
    ids=["tripped-in-the-record", "trips-in-the-replay"],
)
def test_a_changed_breaker_threshold_diverges_first_at_the_fifth_push(
    tmp_path: Path, recorded_rate: str, replayed_rate: str, stage: str
) -> None:
    """Pushes 3 and 4 fail: at rate 0.5 the breaker refuses push 5, at 0.75 it lets it through."""
    config = write(tmp_path / "tether.yaml", breaker(recorded_rate))
    with tether.Tether(db="memory://", config=config, clock=FakeClock(), env={}) as app:
        app.register(*Flaky({3: 1, 4: 1}).capabilities())
        with app.run(principal=tether.Principal("push-bot"), request="push 6") as run:
            statuses = [run.step("up.push", {"n": n}).status.value for n in range(1, 7)]
        recorded = RecordedRun.from_store(app.store, run.id)
        changed = write(tmp_path / "changed.yaml", breaker(replayed_rate))

        same = Replayer(app).replay(recorded)
        report = Replayer.for_file(app, changed, mode="verify").replay(recorded)

    assert same.ok, same.to_json()
    assert statuses[2:4] == ["failed", "failed"]
    tripped = statuses[4:] == ["refused", "refused"]
    assert tripped is (recorded_rate == "0.5")
    assert first_divergence(report) == (5, stage, None)


# -- E.35 environment independence ---------------------------------------------------------


def replay_in_subprocess(folder: Path, env: dict[str, str], *args: str) -> bytes:
    """Run `tether replay ARGS` in `folder` with `env` over a TETHER_*-free environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    done = subprocess.run(
        [CLI, "replay", *args],
        cwd=folder,
        env={**base, **env},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1, done.stderr  # the proposed policy diverges
    return done.stdout


def test_a_replay_report_is_the_same_in_any_time_zone_locale_hash_seed_and_year(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The golden policy run, replayed with divergences and predictions, prints the same bytes everywhere."""
    export = GOLDEN / "cloud-ops-demo.tether.jsonl"
    write(tmp_path / "proposed.yaml", policy(limit=10, k8s=1))
    args = (str(export), "--policy", "proposed.yaml", "--dry-run", "--json")
    environments = [
        {"PYTHONHASHSEED": "0"},
        {"PYTHONHASHSEED": "12345", "TZ": "Asia/Kathmandu", "LC_ALL": "C.UTF-8"},
        {"PYTHONHASHSEED": "random", "TZ": "Pacific/Chatham", "LANG": "C.UTF-8"},
    ]
    later = datetime.now(UTC) + timedelta(days=3653)
    monkeypatch.chdir(tmp_path)

    outputs = [replay_in_subprocess(tmp_path, env, *args) for env in environments]
    monkeypatch.setattr(SystemClock, "now", lambda self: later)
    code = main(["replay", *args])
    in_process, err = capsys.readouterr()

    assert code == 1, err
    assert outputs[0] == outputs[1] == outputs[2] == in_process.encode()
    report = json.loads(outputs[0])
    assert report["divergences"], report
    assert {2, 7} <= {d["step"] for d in report["divergences"]}
    assert [(p["step"], p["capability"]) for p in report["predictions"]] == [
        (7, "deploy.rollback")
    ]


# -- E.36 old records on new code ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN_FILES))
def test_a_golden_record_verifies_and_replays(
    name: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A golden export's chain holds, and `tether replay FILE` re-checks its 9 steps: exit 0."""
    path = GOLDEN / name
    monkeypatch.chdir(tmp_path)

    recorded = RecordedRun.from_file(path)
    code = main(["replay", str(path), "--json"])
    out = capsys.readouterr().out

    assert recorded.run_id == GOLDEN_FILES[name]
    assert recorded.events[0]["format"] == 1  # the format these goldens keep alive
    assert len(recorded.events) == recorded.header["head_seq"]
    assert code == 0, out
    report = json.loads(out)
    assert (report["ok"], report["steps"], report["divergences"]) == (True, 9, [])


def test_the_goldens_are_the_files_the_readme_describes() -> None:
    """Exactly the listed goldens are in tests/golden/, beside its README."""
    names = sorted(p.name for p in GOLDEN.iterdir())

    assert names == sorted([*GOLDEN_FILES, "README.md"])
    readme = (GOLDEN / "README.md").read_text()
    assert all(name in readme for name in GOLDEN_FILES)


def rechained(source: Path, target: Path, change: Any) -> Path:
    """Copy an export with `change(run_started)` applied and its hash chain made whole."""
    lines = source.read_bytes().splitlines()
    header = _canonical.loads(lines[0])
    previous = _chain.genesis(header["run_id"])
    out = []
    for line in lines[1:]:
        entry = _canonical.loads(line)
        if entry["event"]["kind"] == "run_started":
            change(entry["event"])
        previous = _chain.chain_hash(
            previous, entry["seq"], _canonical.dumps(entry["event"])
        )
        entry["hash"] = previous.hex()
        out.append(_canonical.dumps(entry))
    header["head"] = previous.hex()
    target.write_bytes(b"\n".join([_canonical.dumps(header), *out]) + b"\n")
    return target


def set_format(value: int) -> Any:
    """Return a change that sets run_started's format to `value`."""
    return lambda event: event.update(format=value)


def drop_format(event: dict[str, Any]) -> None:
    """Remove run_started's format, as a record from before it had one would be."""
    del event["format"]


@pytest.mark.parametrize(
    "change", [set_format(0), drop_format], ids=["format-0", "no-format"]
)
def test_an_older_format_marker_replays_or_names_its_format(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    change: Any,
) -> None:
    """A golden rewritten as format 0 (or with no format) replays, or exits 2 naming the format."""
    path = rechained(
        GOLDEN / "cloud-ops-demo.tether.jsonl", tmp_path / "old.tether.jsonl", change
    )
    monkeypatch.chdir(tmp_path)

    code = main(["replay", str(path), "--json"])
    out, err = capsys.readouterr()

    if code == 0:
        assert json.loads(out)["ok"] is True
    else:
        assert code == 2, (out, err)
        assert "format" in err


def test_a_format_that_is_not_a_number_is_refused_as_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose format is the text "1" exits 2 naming the format, without calling it newer."""
    path = rechained(
        GOLDEN / "cloud-ops-demo.tether.jsonl",
        tmp_path / "odd.tether.jsonl",
        lambda event: event.update(format="1"),
    )
    monkeypatch.chdir(tmp_path)

    code = main(["replay", str(path)])
    err = capsys.readouterr().err

    assert code == 2
    assert "format" in err
    assert "newer" not in err, err


def test_a_golden_record_changed_by_one_byte_is_refused(tmp_path: Path) -> None:
    """Flipping one digit in a golden record's event fails the chain check, naming the line."""
    lines = (GOLDEN / "cloud-ops-demo.tether.jsonl").read_bytes().splitlines()
    number = next(n for n, line in enumerate(lines, 1) if b'"limit":20' in line)
    lines[number - 1] = lines[number - 1].replace(b'"limit":20', b'"limit":21')
    path = tmp_path / "changed.tether.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    with pytest.raises(tether.TetherError) as caught:
        RecordedRun.from_file(path)

    assert caught.value.code == "replay_impossible"
    assert f"{path}:{number}:" in caught.value.message


def test_the_golden_files_are_unchanged() -> None:
    """The golden files hash as when they were written: regenerating one is a reviewed change."""
    digests = {
        name: hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest()[:16]
        for name in GOLDEN_FILES
    }

    assert digests == GOLDEN_DIGESTS


GOLDEN_DIGESTS = {
    "cloud-ops-demo.tether.jsonl": "32a4a140228129f2",
    "cloud-ops-demo-policy.tether.jsonl": "b1880a4b0280bead",
}
