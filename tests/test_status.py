"""`tether status`: where every limit, breaker and retry budget stands, from the store.

The scenario: three charges against a tenant budget, an hourly quota, a
concurrency cap and a per-run quota, the third failing twice (one retry, then
the breaker opens), plus a planner's model usage. The report's numbers are
asserted exactly; then time moves (cool-down, window ends, run end) and the
config changes, and the report follows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

import tether
import tether.cli
from tether.clock import system_rng
from tether.status import (
    BreakerStatus,
    CapabilityRetries,
    Counter,
    RetryCounter,
    StatusReport,
    UnconfiguredCounter,
    status,
)
from tether.testing import FakeClock, write_config

CLI = os.environ.get("TETHER_CLI") or str(Path(sys.executable).parent / "tether")

START = datetime(2026, 1, 1, 0, 10, tzinfo=UTC)
"""Ten minutes into the day, hour and minute windows: windows start before the calls."""

CONFIG = """\
limits:
  - {id: spend, kind: budget, scope: tenant, per: day, amount: 100, capability: "pay.*"}
  - {id: charges-per-hour, kind: quota, per: hour, max: 5, capability: pay.charge}
  - {id: in-flight, kind: concurrency, max: 2, capability: pay.charge, ttl: 30s}
  - {id: per-run, kind: quota, scope: run, per: run, max: 10, capability: pay.charge}
  - {id: k8s, kind: rate, rate: 10/s, burst: 5, resource: k8s}
  - {id: idle, kind: quota, per: minute, max: 3, capability: never.called}
  - {id: model-spend, kind: budget, per: day, amount: 1000, capability: llm}
breakers:
  - {id: pay-br, resource: pay, failure_rate: 0.5, window: 4, min_calls: 4,
     open_for: 30s, half_open_calls: 2, on_open: escalate}
retry_budget: {per_run: 1, ratio: 0.5, min_retries: 1, window: 1m, backoff: 10ms,
               max_attempts: 2}
"""


class ChargeIn(BaseModel, extra="forbid"):
    cents: int


class ChargeOut(BaseModel):
    charged_cents: int


@dataclass
class Upstream:
    """The fake payments API: fails while `failing`; `peek` reads the status mid-call."""

    app: tether.Tether | None = None
    failing: bool = False
    flaky: bool = False
    """Fail every other attempt, the first included."""
    attempts: int = 0
    peek: bool = False
    hang: timedelta | None = None
    """Peeking, also hang this long (fake time) and peek again."""
    seen: list[StatusReport] = field(default_factory=list)


def make_app(
    db: str, config: Path, clock: FakeClock, upstream: Upstream
) -> tether.Tether:
    """An app with `pay.charge`: reserves `cents`, settles at what it charged (2 less)."""

    @tether.capability(
        "pay.charge",
        effect="write",
        idempotency="keyed",
        resource="pay",
        cost=lambda a: a.cents,
        actual_cost=lambda out: out.charged_cents,
    )
    def charge(args: ChargeIn) -> ChargeOut:
        if upstream.peek:
            assert upstream.app is not None
            upstream.seen.append(status(upstream.app))
            if upstream.hang is not None:
                clock.advance(upstream.hang)
                upstream.seen.append(status(upstream.app))
        upstream.attempts += 1
        if upstream.failing or (upstream.flaky and upstream.attempts % 2):
            raise RuntimeError("payments API answered 503")
        return ChargeOut(charged_cents=args.cents - 2)

    app = tether.Tether(db=db, config=config, clock=clock, env={})
    app.random = system_rng(7)
    app.register(charge)
    upstream.app = app
    return app


@dataclass
class Scene:
    """The app after the calls, inside its still-open run."""

    app: tether.Tether
    clock: FakeClock
    run: tether.Run
    config: Path
    upstream: Upstream
    opened_at: datetime
    """When the breaker opened, as the run's record says."""


@pytest.fixture(params=["sqlite", "memory"])
def scene(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scene]:
    """Three charges (10, 20, then 5 failing twice), 7 of model usage; the run left open."""
    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    db = (
        f"sqlite:///{tmp_path / 'tether.db'}"
        if request.param == "sqlite"
        else "memory://"
    )
    clock = FakeClock(START)
    upstream = Upstream()
    app = make_app(db, config, clock, upstream)
    principal = tether.Principal("bot", tenant="acme")
    with app.run(principal=principal, request="charge the three orders") as run:
        upstream.peek = True
        first = run.step("pay.charge", {"cents": 10})
        upstream.peek = False
        second = run.step("pay.charge", {"cents": 20})
        upstream.failing = True
        third = run.step("pay.charge", {"cents": 5})
        run.charge_usage(7, input_tokens=1200, model="m-1")
        assert [first.status, second.status, third.status] == [
            "executed",
            "executed",
            "failed",
        ]
        opened = [
            e.data()
            for e in app.store.events(run.id)
            if e.data()["kind"] == "breaker_transition"
        ]
        assert [(e["previous"], e["state"]) for e in opened] == [("closed", "open")]
        yield Scene(
            app=app,
            clock=clock,
            run=run,
            config=config,
            upstream=upstream,
            opened_at=datetime.fromisoformat(opened[0]["at"]),
        )
    app.close()


def counters(report: StatusReport) -> dict[str, tuple[Counter, ...]]:
    return {lim.id: lim.counters for lim in report.limits}


def test_the_report_counts_exactly_what_the_calls_used(scene: Scene) -> None:
    """Budget settled at actual cost, quota counted, failures released, retries spent (C.19, D.30)."""
    report = status(scene.app)
    now = scene.clock.now()
    day = datetime(2026, 1, 1, tzinfo=UTC)
    hour = day

    assert report.at == now
    assert report.config == str(scene.config)
    assert counters(report) == {
        "spend": (
            Counter(
                scope="acme",
                window_start=day,
                window_end=day + timedelta(days=1),
                used=Decimal(26),  # 8 + 18 settled; the failed 5 released
                held=Decimal(0),
                holds=0,
                cap=Decimal(100),
                left=Decimal(74),
            ),
        ),
        "charges-per-hour": (
            Counter(
                scope="*",
                window_start=hour,
                window_end=hour + timedelta(hours=1),
                used=Decimal(3),
                held=Decimal(0),
                holds=0,
                cap=Decimal(5),
                left=Decimal(2),
            ),
        ),
        "in-flight": (),
        "per-run": (
            Counter(
                scope=scene.run.id,
                window_start=None,
                window_end=None,
                used=Decimal(3),
                held=Decimal(0),
                holds=0,
                cap=Decimal(10),
                left=Decimal(7),
            ),
        ),
        "k8s": (),
        "idle": (),
        "model-spend": (
            Counter(
                scope="*",
                window_start=day,
                window_end=day + timedelta(days=1),
                used=Decimal(7),
                held=Decimal(0),
                holds=0,
                cap=Decimal(1000),
                left=Decimal(993),
            ),
        ),
    }
    unused = {lim.id for lim in report.limits if lim.unused}
    assert unused == {"in-flight", "idle"}
    k8s = report.limits[4]
    assert (k8s.kind, k8s.rate, k8s.burst, k8s.cap) == ("rate", 10.0, 5, None)
    assert report.breakers == (
        BreakerStatus(
            id="pay-br",
            resource="pay",
            state="open",
            since=scene.opened_at,
            calls=0,
            window=4,
            failure_rate=None,
            slow_rate=None,
            threshold=0.5,
            min_calls=4,
            probes=0,
            half_open_calls=2,
            probe_deadline=None,
            retry_at=scene.opened_at + timedelta(seconds=30),
            on_open="escalate",
        ),
    )
    retry = report.retry_budget
    assert retry is not None
    assert retry.runs == (RetryCounter(scope=scene.run.id, used=1, cap=1, left=0),)
    assert retry.incidents == ()
    minute = START
    assert retry.capabilities == (
        CapabilityRetries(
            capability="pay.charge",
            window_start=minute,
            window_end=minute + timedelta(minutes=1),
            retries=1,
            calls=3,
            allowed=Decimal("1.5"),  # max(0.5 * 3 calls, 1)
            left=0,
        ),
    )
    assert (report.unconfigured, report.unconfigured_breakers, report.hidden) == (
        (),
        (),
        0,
    )


def test_a_call_in_flight_holds_its_estimate_and_a_lease(scene: Scene) -> None:
    """Mid-call, the budget holds the estimate (not yet used) and the cap one lease (C.21)."""
    (during,) = scene.upstream.seen
    mid = counters(during)

    assert mid["spend"] == (
        Counter(
            scope="acme",
            window_start=datetime(2026, 1, 1, tzinfo=UTC),
            window_end=datetime(2026, 1, 2, tzinfo=UTC),
            used=Decimal(0),
            held=Decimal(10),
            holds=1,
            cap=Decimal(100),
            left=Decimal(90),
        ),
    )
    assert mid["in-flight"] == (
        Counter(
            scope="*",
            window_start=None,
            window_end=None,
            used=Decimal(0),
            held=Decimal(1),
            holds=1,
            cap=Decimal(2),
            left=Decimal(1),
        ),
    )
    assert not during.limits[2].unused


def test_an_open_breaker_past_its_cool_down_shows_half_open(scene: Scene) -> None:
    """Time alone moves open to half-open; asking for the status writes nothing (D.25)."""
    scene.clock.advance(scene.opened_at + timedelta(seconds=30) - scene.clock.now())

    (breaker,) = status(scene.app).breakers

    assert (breaker.state, breaker.since) == (
        "half_open",
        scene.opened_at + timedelta(seconds=30),
    )
    assert (breaker.probes, breaker.half_open_calls, breaker.retry_at) == (0, 2, None)
    stored = scene.app.store.breaker_row("pay-br")
    assert stored.state.value == "open"  # the report is a view, not a transition


def test_a_trial_call_out_shows_its_deadline(scene: Scene) -> None:
    """Half-open with a probe out: the probe count and the time it must answer by (D.27)."""
    scene.clock.advance(timedelta(seconds=31))
    scene.upstream.failing = False
    scene.upstream.peek = True

    probe = scene.run.step("pay.charge", {"cents": 5})

    assert probe.status == "executed", probe.error
    (during,) = scene.upstream.seen[1:]
    (breaker,) = during.breakers
    assert (breaker.state, breaker.probes) == ("half_open", 1)
    assert breaker.probe_deadline == scene.clock.now() + timedelta(seconds=60)
    (after,) = status(scene.app).breakers
    assert (after.state, after.probes, after.calls, after.failure_rate) == (
        "half_open",
        1,
        1,
        0.0,
    )


def test_ended_windows_and_finished_runs_are_hidden(scene: Scene) -> None:
    """Only live counters show: the next minute and hour start from 0, a finished run drops out."""
    scene.clock.advance(timedelta(minutes=50))  # 01:00: minute and hour windows over
    in_next_hour = status(scene.app)
    scene.run.__exit__(None, None, None)  # ends it (the fixture's exit is then a no-op)
    finished = status(scene.app)

    assert counters(in_next_hour)["charges-per-hour"] == ()
    assert in_next_hour.limits[1].unused
    assert counters(in_next_hour)["spend"][0].used == Decimal(26)  # the day goes on
    retry = in_next_hour.retry_budget
    assert retry is not None
    assert retry.capabilities == ()
    assert in_next_hour.hidden == 3  # the hour's quota, the minute's retries and calls
    assert counters(finished)["per-run"] == ()
    assert finished.retry_budget is not None
    assert finished.retry_budget.runs == ()
    assert finished.hidden == 5


def test_counters_of_a_removed_limit_are_listed_as_unconfigured(
    scene: Scene, as_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """After an edit of tether.yaml, old limits' counters are shown apart: each one's latest window."""
    scene.clock.advance(timedelta(hours=1))  # 01:10: a new hour; the breaker half-open
    scene.upstream.failing = False
    assert (
        scene.run.step("pay.charge", {"cents": 5}).status == "executed"
    )  # a trial call
    removed = (
        '  - {id: spend, kind: budget, scope: tenant, per: day, amount: 100, capability: "pay.*"}\n',
        "  - {id: charges-per-hour, kind: quota, per: hour, max: 5, capability: pay.charge}\n",
    )
    kept = CONFIG
    for line in removed:
        kept = kept.replace(line, "")
    kept = kept.replace("{id: pay-br,", "{id: pay-breaker,")
    write_config(scene.config, kept)

    report = status(scene.app)

    assert {"spend", "charges-per-hour"}.isdisjoint(lim.id for lim in report.limits)
    assert report.unconfigured == (
        UnconfiguredCounter(
            limit_id="charges-per-hour",
            scope="*",
            window_start=datetime(2026, 1, 1, 1, tzinfo=UTC),  # not the 00:00 hour's
            used=Decimal(1),
            held=Decimal(0),
            holds=0,
        ),
        UnconfiguredCounter(
            limit_id="spend",
            scope="acme",
            window_start=datetime(2026, 1, 1, tzinfo=UTC),
            used=Decimal(29),  # 8 + 18 + 3
            held=Decimal(0),
            holds=0,
        ),
    )
    assert (
        report.hidden == 3
    )  # the 00:00 hour's quota, the 00:10 minute's retries and calls
    assert [(b.id, b.state, b.since) for b in report.unconfigured_breakers] == [
        ("pay-br", "half_open", scene.opened_at + timedelta(seconds=30))
    ]
    assert report.breakers[0].state == "closed"  # the new id has no history
    code, out, _ = run_cli(capsys, "status", "--app", as_module)
    assert code == 0
    assert "\nUnconfigured (no longer in tether.yaml)\n" in out
    assert row(out, "spend", "acme") == [
        "spend", "acme", "2026-01-01", "00:00:00", "29", "0", "0", "-",
    ]  # fmt: skip
    assert row(out, "pay-br", "-")[-1] == "half_open"


def test_to_json_is_json_with_decimals_as_text_and_iso_times(scene: Scene) -> None:
    """The JSON form round-trips through json and keeps exact amounts as text."""
    doc = json.loads(json.dumps(status(scene.app).to_json()))

    spend = doc["limits"][0]
    assert spend["counters"] == [
        {
            "scope": "acme",
            "window_start": "2026-01-01T00:00:00+00:00",
            "window_end": "2026-01-02T00:00:00+00:00",
            "used": "26",
            "held": "0",
            "holds": 0,
            "cap": "100",
            "left": "74",
        }
    ]
    assert doc["breakers"][0]["state"] == "open"
    assert doc["retry_budget"]["capabilities"][0]["allowed"] == "1.5"
    assert doc["limits"][4]["rate"] == 10.0


def test_a_lapsed_lease_frees_its_slot_while_a_budget_hold_stays(
    tmp_path: Path,
) -> None:
    """A call still running past its lease ttl no longer counts against the cap (C.21, C.23)."""
    config = tmp_path / "tether.yaml"
    config.write_text(CONFIG)
    clock = FakeClock(START)
    upstream = Upstream(peek=True, hang=timedelta(seconds=31))  # past the 30 s ttl
    app = make_app(f"sqlite:///{tmp_path / 'db'}", config, clock, upstream)
    with (
        app,
        app.run(principal=tether.Principal("bot", tenant="acme"), request="x") as run,
    ):
        run.step("pay.charge", {"cents": 10})

    fresh, late = upstream.seen
    assert [c.holds for c in counters(fresh)["in-flight"]] == [1]
    assert counters(late)["in-flight"] == ()  # lapsed: the slot is free
    assert [(c.held, c.holds) for c in counters(late)["spend"]] == [(Decimal(10), 1)]


def test_incident_retries_and_a_removed_retry_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-incident retries are counted by incident; without `retry_budget:` they are unconfigured."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "retry_budget: {per_run: 5, per_incident: 2, incident: ticket, backoff: 1ms}\n"
    )
    clock = FakeClock(START)
    upstream = Upstream(failing=True)
    app = make_app(f"sqlite:///{tmp_path / 'db'}", config, clock, upstream)
    with app:
        principal = tether.Principal("bot", tenant="acme")
        with app.run(
            principal=principal, request="x", context={"ticket": "INC-7"}
        ) as run:
            run.step("pay.charge", {"cents": 10})
            retry = status(app).retry_budget
            monkeypatch.setitem(
                sys.modules, "incidentapp", types.SimpleNamespace(app=app)
            )
            monkeypatch.setenv("COLUMNS", "200")
            _, text, _ = run_cli(capsys, "status", "--app", "incidentapp:app")
            write_config(config, "rules: []\n")
            after = status(app)

    assert retry is not None
    assert retry.incidents == (RetryCounter(scope="INC-7", used=2, cap=2, left=0),)
    assert retry.runs == (RetryCounter(scope=run.id, used=2, cap=5, left=3),)
    assert [(c.capability, c.retries, c.calls) for c in retry.capabilities] == [
        ("pay.charge", 2, 1)
    ]
    assert after.retry_budget is None
    assert not after.configured
    assert row(text, "per", "ticket")[2:7] == ["INC-7", "2", "2", "0", "-"]
    assert [(u.limit_id, u.scope, u.used) for u in after.unconfigured] == [
        (":retry:incident", "INC-7", Decimal(2)),
        (":retry:pay.charge", "*", Decimal(2)),
        (":retry:pay.charge:calls", "*", Decimal(1)),
        (":retry:run", run.id, Decimal(2)),
    ]


def test_a_limit_never_shares_its_counter_with_the_retry_budget(tmp_path: Path) -> None:
    """A quota of 3 calls admits 3 calls even when each is retried (or its id is refused)."""
    config = tmp_path / "tether.yaml"
    config.write_text(
        "limits:\n"
        "  - {id: 'retry:pay.charge', kind: quota, per: minute, max: 3}\n"
        "retry_budget: {per_run: 10, backoff: 1ms}\n"
    )
    upstream = Upstream(flaky=True)
    try:
        app = make_app(
            f"sqlite:///{tmp_path / 'db'}", config, FakeClock(START), upstream
        )
    except tether.ConfigError as exc:  # the other fix: the prefix is reserved
        refused: str | None = exc.message
    else:
        refused = None
    if refused is not None:
        assert "retry:" in refused
        return
    with app, app.run(principal=tether.Principal("bot"), request="x") as run:
        statuses = [run.step("pay.charge", {"cents": 10}).status for _ in range(3)]
        report = status(app)

    assert statuses == ["executed"] * 3  # each after one retry
    assert [c.used for c in counters(report)["retry:pay.charge"]] == [Decimal(3)]


# -- the command -------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `tether` in this process (the one error handler included)."""
    code = tether.cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def as_module(scene: Scene, monkeypatch: pytest.MonkeyPatch) -> str:
    """The scene's app as `--app statusapp:app` (its fake clock comes with it)."""
    monkeypatch.setitem(sys.modules, "statusapp", types.SimpleNamespace(app=scene.app))
    monkeypatch.setenv("COLUMNS", "200")
    return "statusapp:app"


def row(out: str, first: str, second: str) -> list[str]:
    """Return the table row that starts with `first` then `second`, split on blanks."""
    found = [
        line.split() for line in out.splitlines() if line.split()[:2] == [first, second]
    ]
    assert len(found) == 1, out
    return found[0]


def test_the_tables_show_the_numbers(
    scene: Scene,
    as_module: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Limits, Breakers and Retry budgets tables carry the report's numbers."""
    monkeypatch.setenv("COLUMNS", "200")  # one line per row, to read it back

    code, out, err = run_cli(capsys, "status", "--app", as_module)

    assert (code, err) == (0, "")
    for title in ("Limits", "Breakers", "Retry budgets"):
        assert f"\n{title}\n" in out
    assert row(out, "spend", "budget/day") == [
        "spend", "budget/day", "acme", "26", "0", "0", "100", "74", "2026-01-02", "00:00:00",
    ]  # fmt: skip
    assert row(out, "charges-per-hour", "quota/hour")[2:8] == [
        "*", "3", "0", "0", "5", "2",
    ]  # fmt: skip
    assert row(out, "in-flight", "concurrency")[2:] == [
        "unused", "0", "0", "0", "2", "2", "-",
    ]  # fmt: skip
    assert row(out, "per-run", "quota/run")[2:] == [
        scene.run.id, "3", "0", "0", "10", "7", "-",
    ]  # fmt: skip
    assert row(out, "k8s", "rate")[2:] == [
        "10/s",
        "-",
        "-",
        "-",
        "-",
        "burst",
        "5",
        "-",
        "-",
    ]
    opened = scene.opened_at.strftime("%H:%M:%S")
    reopen = (scene.opened_at + timedelta(seconds=30)).strftime("%H:%M:%S")
    assert row(out, "pay-br", "pay") == [
        "pay-br", "pay", "open", "2026-01-01", opened, "0/4", "-", "-", "-",
        "escalate", "2026-01-01", reopen,
    ]  # fmt: skip
    assert row(out, "per", "run")[2:7] == [scene.run.id, "1", "1", "0", "-"]
    assert row(out, "0.5", "of")[5:10] == ["pay.charge", "1", "1.5", "0", "3"]


def test_a_narrow_terminal_folds_names_and_keeps_numbers_whole(
    scene: Scene,
    as_module: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 80 columns a long run id folds inside its cell; no number is cut to an ellipsis."""
    monkeypatch.setenv("COLUMNS", "80")

    code, out, _ = run_cli(capsys, "status", "--app", as_module)

    assert code == 0
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert row(out, "spend", "budget/day")[3:8] == ["26", "0", "0", "100", "74"]


def test_json_is_one_document_matching_the_report(
    scene: Scene, as_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--json` prints the report's JSON form with `format` and the database."""
    code, out, err = run_cli(capsys, "status", "--app", as_module, "--json")

    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "format": 1,
        "database": scene.app.store.url,
        **json.loads(json.dumps(status(scene.app).to_json())),
    }


def test_the_command_shows_half_open_after_the_cool_down(
    scene: Scene, as_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command reads the breaker as of now: past `open_for` it is half_open."""
    scene.clock.advance(timedelta(seconds=45))

    code, out, _ = run_cli(capsys, "status", "--app", as_module, "--json")
    text_code, text, _ = run_cli(capsys, "status", "--app", as_module)

    assert (code, text_code) == (0, 0)
    (breaker,) = json.loads(out)["breakers"]
    assert (breaker["state"], breaker["probes"], breaker["half_open_calls"]) == (
        "half_open",
        0,
        2,
    )
    assert row(text, "pay-br", "pay")[2] == "half_open"


@pytest.mark.parametrize("scene", ["sqlite"], indirect=True)
def test_the_installed_command_reads_db_and_config(
    scene: Scene, tmp_path: Path
) -> None:
    """`tether status --db URL --config FILE` in another process sees the run's counters."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}

    done = subprocess.run(
        [
            CLI,
            "status",
            "--db",
            scene.app.store.url,
            "--config",
            str(scene.config),
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    per_run = next(lim for lim in doc["limits"] if lim["id"] == "per-run")
    assert [(c["scope"], c["used"], c["left"]) for c in per_run["counters"]] == [
        (scene.run.id, "3", "7")
    ]
    assert doc["format"] == 1


def test_no_config_is_one_line_saying_where_to_declare_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing configured: one line naming the sections, with or without a database."""
    monkeypatch.chdir(tmp_path)
    for name in ("TETHER_DB", "TETHER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "tether.yaml"
    empty.write_text("rules: []\n")
    absent = f"sqlite:///{tmp_path / 'absent.db'}"

    code, out, err = run_cli(capsys, "status", "--db", absent, "--config", str(empty))
    json_code, doc, _ = run_cli(capsys, "status", "--db", absent, "--json")

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"no limits, breakers or retry budget are configured in {empty}; declare "
        "them under limits:, breakers: and retry_budget: in tether.yaml (see "
        "docs/limits.md)"
    ]
    assert json_code == 0
    parsed = json.loads(doc)
    assert (parsed["limits"], parsed["breakers"], parsed["retry_budget"]) == (
        [],
        [],
        None,
    )
    assert not (tmp_path / "absent.db").exists()  # a read creates no database


@pytest.mark.parametrize(
    ("args", "code", "starts"),
    [
        (["--db", "DB"], "not_found", "no database at "),
        (["--app", "statusapp:app", "--db", "DB"], "usage_error", "--app reads"),
        (["--app", "nocolon"], "usage_error", "--app 'nocolon': write MODULE:ATTR"),
        (["--config", "missing.yaml"], "config_invalid", ""),
    ],
)
def test_a_status_that_cannot_run_is_one_error_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    code: str,
    starts: str,
) -> None:
    """A missing database (with limits configured), a bad --app or config: exit 2, one line."""
    monkeypatch.chdir(tmp_path)
    for name in ("TETHER_DB", "TETHER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "tether.yaml").write_text(CONFIG)
    db = f"sqlite:///{tmp_path / 'absent.db'}"

    exit_code, out, err = run_cli(
        capsys, "status", *(db if a == "DB" else a for a in args)
    )

    assert exit_code == 2
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"error[{code}] {starts}"), line
    assert not (tmp_path / "absent.db").exists()


def test_help_teaches_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    """`tether status --help` names the three tables and gives an example."""
    code, out, _ = run_cli(capsys, "status", "--help")

    text = " ".join(out.split())
    assert code == 0
    assert "Example: tether status" in text
    for word in ("--json", "--db", "--config", "--app", "half_open", "unconfigured"):
        assert word in text
