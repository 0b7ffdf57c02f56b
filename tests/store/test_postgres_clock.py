"""A host whose clock is off from the PostgreSQL server's is told so.

Every host sharing a PostgreSQL store reckons leases, claim TTLs, limit
windows, rate limits and approval expiry by its own clock. tether reads the
server's clock (one `SELECT clock_timestamp()`) to measure how far the app's
clock is off: opening the app logs a warning past `CLOCK_SKEW_WARN`, `tether
status` shows the skew (a warning line past the bound), and `tether worker`
warns as it starts. The server here is the real one; a host whose clock is off
is an app with a `FakeClock` set off from the real time.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tether
import tether.cli
from tether.status import status
from tether.store import CLOCK_SKEW_WARN
from tether.testing import FakeClock

pytestmark = pytest.mark.postgres

OFF = timedelta(seconds=30)
CLOSE = timedelta(milliseconds=500)
"""A host on the server's own machine is within this (half a round trip, and then some)."""
SLACK = timedelta(seconds=5)
"""A `FakeClock` stands still while real time goes on: by the time a test reads
the skew it has shrunk by the time the test took so far."""


def off_by(url: str, skew: timedelta) -> tether.Tether:
    """Open an app on `url` whose clock is `skew` ahead of the real time."""
    return tether.Tether(db=url, clock=FakeClock(datetime.now(UTC) + skew), env={})


@pytest.fixture
def as_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """A module `clockapp` whose `app` the test sets, for `--app clockapp:app`."""
    module = types.SimpleNamespace(app=None)
    monkeypatch.setitem(sys.modules, "clockapp", module)
    monkeypatch.setenv("COLUMNS", "300")  # the warning on one line, to read it back
    yield module
    if module.app is not None:
        module.app.close()


def seconds_off(line: str, way: str) -> timedelta:
    """Return the skew a warning line states, checking it says `way` and what to do."""
    found = re.search(
        rf"this host's clock is (\d+\.\d{{3}}) s {way} the database server's", line
    )
    assert found is not None, line
    assert "keep every host's clock in sync (NTP)" in line
    return timedelta(seconds=float(found[1]))


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = tether.cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_host_in_step_with_the_server_measures_a_small_skew_and_logs_nothing(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tether"):
        app = tether.Tether(db=postgres_url, env={})
    with app:
        skew = app.clock_skew()
        doc = status(app).to_json()

    assert skew is not None
    assert abs(skew) < CLOSE
    assert abs(doc["clock_skew_s"]) < CLOSE.total_seconds()
    assert [r for r in caplog.records if r.getMessage() == "store.clock_skew"] == []


def test_a_store_on_this_host_has_no_clock_of_its_own(tmp_path: Path) -> None:
    with tether.Tether(db=f"sqlite:///{tmp_path / 't.db'}", env={}) as app:
        assert app.clock_skew() is None
        assert status(app).to_json()["clock_skew_s"] is None


@pytest.mark.parametrize(("skew", "way"), [(OFF, "ahead of"), (-OFF, "behind")])
def test_a_host_whose_clock_is_off_is_warned_at_open(
    postgres_url: str, caplog: pytest.LogCaptureFixture, skew: timedelta, way: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="tether"):
        app = off_by(postgres_url, skew)
    with app:
        measured = app.clock_skew()

    assert measured is not None
    assert abs(measured - skew) < SLACK
    (warned,) = [r for r in caplog.records if r.getMessage() == "store.clock_skew"]
    stated = seconds_off(warned.__dict__["tether.error"], way)
    assert OFF - SLACK < stated < OFF + SLACK
    assert warned.__dict__["tether.db"] == app.store.url


def test_just_within_the_bound_is_not_warned(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tether"):
        app = off_by(postgres_url, CLOCK_SKEW_WARN - CLOSE)
    app.close()

    assert [r for r in caplog.records if r.getMessage() == "store.clock_skew"] == []


def test_status_shows_the_skew_and_warns_past_the_bound(
    postgres_url: str,
    as_module: types.SimpleNamespace,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    config = tmp_path / "tether.yaml"
    config.write_text("limits:\n  - {id: calls, kind: quota, per: hour, max: 5}\n")
    as_module.app = tether.Tether(db=postgres_url, config=config, env={})
    code, in_step, err = run_cli(capsys, "status", "--app", "clockapp:app")
    assert (code, err) == (0, "")
    assert "clock" in in_step
    assert "the database server's" in in_step
    assert "warning" not in in_step
    as_module.app.close()

    as_module.app = tether.Tether(
        db=postgres_url,
        config=config,
        clock=FakeClock(datetime.now(UTC) + OFF),
        env={},
    )
    code, off, err = run_cli(capsys, "status", "--app", "clockapp:app")
    json_code, doc, _ = run_cli(capsys, "status", "--app", "clockapp:app", "--json")

    assert (code, json_code, err) == (0, 0, "")
    (line,) = [x for x in off.splitlines() if x.startswith("warning:")]
    assert OFF - SLACK < seconds_off(line, "ahead of") < OFF + CLOSE
    skew = timedelta(seconds=json.loads(doc)["clock_skew_s"])
    assert OFF - SLACK < skew < OFF + CLOSE


def test_the_worker_warns_as_it_starts(
    postgres_url: str,
    as_module: types.SimpleNamespace,
    capsys: pytest.CaptureFixture[str],
) -> None:
    as_module.app = off_by(postgres_url, -OFF)
    code, out, err = run_cli(capsys, "worker", "--app", "clockapp:app", "--until-idle")

    assert (code, err) == (0, "")
    (line,) = [x for x in out.splitlines() if x.startswith("warning:")]
    assert OFF - CLOSE < seconds_off(line, "behind") < OFF + SLACK
